"""Side-by-side accuracy and CPU speed: declump vs the scikit-image watershed pipeline vs naive k-means.

    python -m bench.compare_methods [--size 256] [--repeats 3] [--quick]

Datasets: a generated 3D volume of touching spheres (radius 5-12 voxels),
and the real 2D DSB-2018 nuclei and EMPS particles in ../shared/data (skipped
with a note when absent). Methods run on the same data with the same
smoothing, min_distance and min_size. Writes bench/results/compare_<date>.json
and .md. Times are medians of --repeats runs after a warm-up run.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from bench.peers import skimage_watershed
from cpu_fallback import separate as cpu_separate
from gpu_pipeline.metrics import evaluate, overlap_table
from gpu_pipeline.synthetic import make_touching_particles

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results"

# (name, callable(image, params) -> labels); params hold sigma, min_distance, min_size, polarity, spacing.
DECLUMP_VARIANTS = {
    "declump power (default)": dict(assignment="power", max_iter=0),
    "declump power + 3 Lloyd": dict(assignment="power", max_iter=3),
    "declump power + 10 Lloyd": dict(assignment="power", max_iter=10),
    "declump euclidean batched + 10 Lloyd": dict(assignment="euclidean", max_iter=10),
}


def method_table(include_naive=True):
    methods = {}
    for name, extra in DECLUMP_VARIANTS.items():
        methods[name] = (lambda extra: lambda img, p: cpu_separate(
            img, spacing=p["spacing"], sigma=p["sigma"], min_distance=p["min_distance"], min_size=p["min_size"],
            max_hole_size=0, polarity=p["polarity"], **extra))(extra)
    if include_naive:
        methods["naive sklearn KMeans per region"] = lambda img, p: cpu_separate(
            img, spacing=p["spacing"], sigma=p["sigma"], min_distance=p["min_distance"], min_size=p["min_size"],
            max_hole_size=0, polarity=p["polarity"], assignment="euclidean", kmeans_engine="sklearn", max_iter=300)
    methods["skimage watershed"] = lambda img, p: skimage_watershed(
        img, sigma=p["sigma"], min_distance=p["min_distance"], polarity=p["polarity"], spacing=p["spacing"],
        min_size=p["min_size"])
    return methods


def pooled_scores(pairs):
    """Scores pooled over images: TP/FP/FN summed per IoU threshold, then F1 and AP."""
    per = [evaluate(pred, gt) for pred, gt in pairs]
    thresholds = per[0]["iou_thresholds"]
    tp = np.zeros(len(thresholds))
    n_pred = n_gt = splits = merges = 0
    for s in per:
        tp += np.asarray(s["f1"]) * (s["n_pred"] + s["n_gt"]) / 2
        n_pred += s["n_pred"]
        n_gt += s["n_gt"]
        splits += s["splits"]
        merges += s["merges"]
    f1 = 2 * tp / max(n_pred + n_gt, 1)
    ap = tp / np.maximum(n_pred + n_gt - tp, 1)
    return {"f1_50": float(f1[0]), "mean_f1": float(f1.mean()), "ap_50": float(ap[0]), "mean_ap": float(ap.mean()),
            "n_pred": n_pred, "n_gt": n_gt, "splits": splits, "merges": merges, "images": len(per)}


def time_call(fn, repeats):
    fn()  # warm-up
    times = []
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, times


def dataset_synthetic(size, n):
    image, truth = make_touching_particles((size,) * 3, n, radius_range=(5, 12), overlap=0.15, seed=2026)
    return [("synthetic", image, truth)], dict(sigma=1.0, min_distance=4, min_size=65, polarity="bright",
                                               spacing=(1.0, 1.0, 1.0))


def dataset_dsb():
    import tifffile

    folder = SHARED / "dsb2018_stardist_sample"
    if not folder.exists():
        return None, f"{folder} absent"
    return ([("img2d", tifffile.imread(folder / "img2d.tif"), tifffile.imread(folder / "mask2d.tif"))],
            dict(sigma=1.0, min_distance=6, min_size=20, polarity="bright", spacing=(1.0, 1.0)))


def dataset_emps(limit=None):
    from gpu_pipeline.io import read_image

    folder = SHARED / "emps_subset"
    if not folder.exists():
        return None, f"{folder} absent"
    names = sorted(p.stem for p in (folder / "images").glob("*.png"))[:limit]
    items = [(n, read_image(folder / "images" / f"{n}.png")[0], read_image(folder / "segmaps" / f"{n}.png")[0])
             for n in names]
    return items, dict(sigma=2.0, min_distance=20, min_size=400, polarity="auto", spacing=(1.0, 1.0))


def run_dataset(name, items, params, methods, repeats):
    from gpu_pipeline.stages.threshold import choose_polarity, otsu_threshold
    from cpu_fallback.ops import gaussian

    rows = {}
    for method, fn in methods.items():
        pairs, seconds = [], []
        for item, image, truth in items:
            p = dict(params)
            if p["polarity"] == "auto":  # the same decision for every method: declump's auto rule
                smoothed = gaussian(image, (p["sigma"],) * image.ndim)
                p["polarity"] = choose_polarity(smoothed, otsu_threshold(smoothed), "auto")
            labels, times = time_call(lambda: fn(image, p), repeats if len(items) == 1 else 1)
            pairs.append((labels, truth))
            seconds.append(statistics.median(times))
            if len(items) == 1:
                spread = (min(times), max(times))
        scores = pooled_scores(pairs)
        scores["seconds"] = float(sum(seconds))
        if len(items) == 1:
            scores["seconds_min_max"] = list(spread)
            scores["voxels_per_second"] = float(items[0][1].size / scores["seconds"])
        rows[method] = scores
        print(f"{name:10s} {method:38s} F1@0.5 {scores['f1_50']:.3f} meanF1 {scores['mean_f1']:.3f} "
              f"AP@0.5 {scores['ap_50']:.3f} splits {scores['splits']:4d} merges {scores['merges']:4d} "
              f"time {scores['seconds']:.2f}s", flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="edge of the generated 3D volume (default 256)")
    parser.add_argument("--particles", type=int, default=1500, help="spheres to place (default 1500)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method after a warm-up")
    parser.add_argument("--emps-limit", type=int, default=None, help="use only the first N EMPS images")
    parser.add_argument("--no-naive", action="store_true", help="skip the slow per-region scikit-learn k-means")
    parser.add_argument("--out", default=None, help="result file stem (default compare_<date>)")
    args = parser.parse_args(argv)

    methods = method_table(include_naive=not args.no_naive)
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": platform.node(), "cpu": platform.processor() or platform.machine(),
              "cpu_count": len(os.sched_getaffinity(0)), "python": platform.python_version(),
              "versions": _versions(), "repeats": args.repeats, "datasets": {}, "skipped": {}}
    items, params = dataset_synthetic(args.size, args.particles)
    result["datasets"][f"synthetic {args.size}^3, {int(items[0][2].max())} spheres r5-12"] = {
        "params": params, "methods": run_dataset("synthetic", items, params, methods, args.repeats)}
    for label, (items, params) in (("DSB-2018 nuclei (1 image)", dataset_dsb()),
                                   ("EMPS particles", dataset_emps(args.emps_limit))):
        if items is None:
            result["skipped"][label] = params
            print(f"skipped {label}: {params}")
            continue
        result["datasets"][f"{label}, {len(items)} images" if len(items) > 1 else label] = {
            "params": params, "methods": run_dataset(label.split()[0], items, params, methods, args.repeats)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = args.out or f"compare_{dt.date.today().isoformat()}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(result))
    print(f"wrote {RESULTS / stem}.json and .md")


def _versions():
    import importlib.metadata as md

    out = {}
    for pkg in ("numpy", "scipy", "scikit-image", "scikit-learn", "edt"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def markdown(result):
    lines = [f"# declump vs peers, CPU ({result['cpu_count']} cores, {result['machine']}, {result['date']})", "",
             f"Times: median of {result['repeats']} runs after a warm-up (single-image datasets); multi-image "
             "datasets: one run per image, summed. Scores pooled over images.", ""]
    for dataset, block in result["datasets"].items():
        lines += [f"## {dataset}", "", f"Parameters: `{block['params']}`", "",
                  "| method | F1@0.5 | mean F1 | AP@0.5 | splits | merges | seconds |", "|---|---|---|---|---|---|---|"]
        for method, s in block["methods"].items():
            spread = f" ({s['seconds_min_max'][0]:.2f}-{s['seconds_min_max'][1]:.2f})" if "seconds_min_max" in s else ""
            lines.append(f"| {method} | {s['f1_50']:.3f} | {s['mean_f1']:.3f} | {s['ap_50']:.3f} | {s['splits']} | "
                         f"{s['merges']} | {s['seconds']:.2f}{spread} |")
        lines.append("")
    for label, why in result["skipped"].items():
        lines.append(f"- skipped {label}: {why}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
