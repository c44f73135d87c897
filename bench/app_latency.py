"""Interaction latency of the web app's work (no browser): retrain + re-predict after a new stroke, and separate.

    python -m bench.app_latency [--size 1024] [--repeats 3] [--emps 6]

Runs the functions the app's buttons run (gpu_pipeline.app.session.Session) on a generated SIZE^2 image with
strokes painted from its ground truth: the first training computes and caches the pixel features; then each
repeat adds one stroke and times retraining + predicting every pixel from the cached features, and times the
separation (automatic foreground, and the painted classifier's foreground). Wall and CPU (process) seconds are
both recorded with the load average: on a shared machine the CPU seconds are what an idle one would take.
--emps N: the same strokes-from-ground-truth recipe on the first N shared EMPS images, scored (F1 at IoU 0.5)
against their ground truth next to the automatic foreground, to show the painted path gives plausible results.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from bench.common import SHARED, machine_info, out_help, write_results


def strokes_from_truth(truth, rng, per_class=8, width=3.0, length=6.0):
    """Short horizontal strokes inside the background and inside particles (a user's few scribbles)."""
    from scipy import ndimage as ndi

    from gpu_pipeline.app.session import Stroke

    strokes = []
    for value, where in ((1, truth == 0), (2, truth > 0)):
        inner = ndi.binary_erosion(where, iterations=int(width) + 2)
        rows, cols = np.nonzero(inner)
        for i in rng.choice(rows.size, size=min(per_class, rows.size), replace=False):
            end = cols[i] + length
            while end > cols[i] and not inner[rows[i], min(int(end), truth.shape[1] - 1)]:
                end -= 1
            strokes.append(Stroke(value, 0, width, np.array([[rows[i], cols[i]], [rows[i], max(end, cols[i])]],
                                                            dtype=float)))
    return strokes


def clocked(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


#: The EMPS image with the most particles (179, many touching): a harder image than generated disks, so the
#: forest grows deep and prediction costs what it costs on real data.
EMPS_IMAGE = "f84ce9e349"


def test_image(kind, size, seed=0):
    """(image, truth, description): generated disks, or an EMPS image mirrored/tiled up to size x size."""
    from gpu_pipeline.synthetic import make_touching_particles

    if kind == "generated":
        n = int(160 * (size / 384) ** 2)
        image, truth = make_touching_particles((size, size), n, radius_range=(5, 12), seed=seed)
        return image, truth, f"generated {size}x{size}, {n} touching disks"
    from gpu_pipeline.io import read_image

    folder = SHARED / "emps_subset"
    image, _ = read_image(folder / "images" / f"{EMPS_IMAGE}.png")
    truth, _ = read_image(folder / "segmaps" / f"{EMPS_IMAGE}.png")
    reps = [int(np.ceil(size / n)) for n in image.shape]
    image, truth = (np.pad(a, [(0, (r - 1) * n) for r, n in zip(reps, a.shape)], mode="symmetric")[:size, :size]
                    for a in (image, truth))
    how = "mirrored to" if any(r > 1 for r in reps) else "cropped to"
    return image, truth, f"EMPS {EMPS_IMAGE} {how} {size}x{size}"


def latency(size, repeats, kind="generated", seed=0):
    from gpu_pipeline.app.session import Session, SessionStore

    image, truth, description = test_image(kind, size, seed)
    rng = np.random.default_rng(seed)
    session = Session(SessionStore.new_id())
    session.set_image(image, name=f"{kind}_{size}")
    # Enough painted pixels that the forest reaches the app's sample cap (5000 per class). The trees stop where
    # their leaves are pure, before the app's depth limit: depth 4-7 in the runs so far (the result file says
    # which).
    session.strokes = strokes_from_truth(truth, rng, per_class=30, width=6.0, length=40.0)
    _, first_wall, first_cpu = clocked(session.train)
    out = {"image": description, "first_training_with_features_s":
           {"wall": first_wall, "cpu": first_cpu}, "retrain_predict_s": {"wall": [], "cpu": []},
           "separate_automatic_s": {"wall": [], "cpu": []}, "separate_classifier_s": {"wall": [], "cpu": []}}
    session.separate()  # warm-up
    for _ in range(repeats):
        session.strokes = session.strokes + strokes_from_truth(truth, rng, per_class=1, width=6.0, length=40.0)[:1]
        _, wall, cpu = clocked(session.train)
        out["retrain_predict_s"]["wall"].append(wall)
        out["retrain_predict_s"]["cpu"].append(cpu)
        for key, foreground in (("separate_automatic_s", "automatic"), ("separate_classifier_s", "classifier")):
            result, wall, cpu = clocked(lambda: session.separate(foreground=foreground))
            out[key]["wall"].append(wall)
            out[key]["cpu"].append(cpu)
            out[key.replace("_s", "_particles")] = int(result.labels.max())
    for key in ("retrain_predict_s", "separate_automatic_s", "separate_classifier_s"):
        out[key] = {kind: summary(v) for kind, v in out[key].items()}
    out["training"] = dict(session.classifier.header["training"], n_estimators=session.classifier.forest.n_trees,
                           tree_depth=max(session.classifier.forest.depths()))
    return out


def emps_quality(limit, seed=0):
    from gpu_pipeline.app.session import Session, SessionStore
    from gpu_pipeline.io import read_image
    from gpu_pipeline.metrics import evaluate

    folder = SHARED / "emps_subset"
    if not folder.exists():
        return {"skipped": f"{folder} not found"}
    rows = []
    for name in sorted(p.stem for p in (folder / "images").glob("*.png"))[:limit]:
        image, _ = read_image(folder / "images" / f"{name}.png")
        truth, _ = read_image(folder / "segmaps" / f"{name}.png")
        session = Session(SessionStore.new_id())
        session.set_image(image, name=name)
        session.strokes = strokes_from_truth(truth, np.random.default_rng(seed))
        row = {"image": name, "shape": list(image.shape), "n_truth": int(len(np.unique(truth)) - 1)}
        for foreground in ("automatic", "classifier"):
            try:
                if foreground == "classifier":
                    session.train()
                labels = session.separate(foreground=foreground).labels
                row[f"f1_50_{foreground}"] = round(float(evaluate(labels, truth)["f1_50"]), 3)
            except Exception as exc:  # a failed image is recorded, not hidden
                row[f"f1_50_{foreground}"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
    scores = {k: [r[k] for r in rows if isinstance(r.get(k), float)] for k in ("f1_50_automatic", "f1_50_classifier")}
    return {"images": rows, "mean": {k: round(float(np.mean(v)), 3) if v else None for k, v in scores.items()},
            "strokes": "8 short strokes per class (background, particle) placed from the ground truth, width 3 px"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024,
                        help="edge of the square test images, at least 256 (default %(default)s): smaller ones hold "
                             "too few particles for the simulated strokes of both classes")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats, at least 1 (default %(default)s)")
    parser.add_argument("--emps", type=int, default=6, help="EMPS images to score (0: none)")
    parser.add_argument("--out", default=None, help=out_help("app_latency"))
    args = parser.parse_args(argv)
    if args.size < 256 or args.repeats < 1 or args.emps < 0:
        parser.error(f"--size must be at least 256, --repeats at least 1 and --emps at least 0; got --size "
                     f"{args.size}, --repeats {args.repeats}, --emps {args.emps}")
    load_before = os.getloadavg()
    started = time.perf_counter()
    result = {"machine": machine_info(), "load_average_before": load_before,
              "note": "wall seconds include whatever else the machine runs (see the load); CPU seconds are "
                      "this process's own work",
              "latency": [latency(args.size, args.repeats, kind) for kind in ("generated", "emps")
                          if kind == "generated" or (SHARED / "emps_subset").exists()]}
    if args.emps:
        result["emps"] = emps_quality(args.emps)
    result["load_average_after"] = os.getloadavg()
    result["wall_s"] = time.perf_counter() - started
    load_after = result["load_average_after"]
    lines = [f"# App interaction latency at {args.size}x{args.size}", "",
             f"{result['machine']['cpu']}, {result['machine']['cpu_count']} CPUs, "
             f"GPU: {(result['machine'].get('gpu') or {}).get('name', 'none')}; {result['note']}; load "
             f"average {load_before[0]:.1f} before, {load_after[0]:.1f} after; medians of {args.repeats} runs.", "",
             "| image | step | wall (s) | CPU (s) |", "|---|---|---|---|"]
    for lat in result["latency"]:
        depth = f"{lat['training']['n_estimators']} trees of depth {lat['training']['tree_depth']}"
        for key, title in (("retrain_predict_s", f"retrain + predict every pixel after a new stroke ({depth})"),
                           ("separate_automatic_s", "separate, automatic foreground"),
                           ("separate_classifier_s", "separate, painted classifier's foreground")):
            lines.append(f"| {lat['image']} | {title} | {lat[key]['wall']['median']:.2f} | "
                         f"{lat[key]['cpu']['median']:.2f} |")
        first = lat["first_training_with_features_s"]
        lines.append(f"| {lat['image']} | first training, computing the features | {first['wall']:.2f} | "
                     f"{first['cpu']:.2f} |")
    if "emps" in result and "mean" in result["emps"]:
        lines += ["", f"EMPS, first {args.emps} images, mean F1@0.5: automatic foreground "
                      f"{result['emps']['mean']['f1_50_automatic']}, painted classifier "
                      f"{result['emps']['mean']['f1_50_classifier']} ({result['emps']['strokes']})."]
    stem = write_results(result, "app_latency", "\n".join(lines) + "\n", args.out)
    print(stem.with_name(stem.name + ".md").read_text())


if __name__ == "__main__":
    main()
