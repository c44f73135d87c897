"""Suites 2 and 3: declump end to end against peers, on generated and real data, same parameters.

    python -m bench.compare_methods [--size 256] [--repeats 3] [--emps-limit N]

Suite 2, a generated 3D volume of touching spheres (radius 5-12 voxels):
each method runs in a fresh process (spawned, so its peak resident memory is
its own), timed as the median of --repeats runs after a warm-up; accuracy
against the ground truth. Also dask-image's chunked ``label`` against
SciPy's on the same mask (the connected-components step).

Suite 3, real 2D/3D data in ../shared/data (DSB-2018 nuclei, EMPS particles,
3D embryo nuclei; skipped with a note where absent): scores pooled over
images, plus an image grid (input, ground truth, each method) of a few crops.

Writes bench/results/compare_<date>.json, .md and compare_<date>_grid.png.
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import (RESULTS, SHARED, in_fresh_process, machine_info, out_help, spread, timed,
                          write_results)
from gpu_pipeline.metrics import evaluate
from gpu_pipeline.synthetic import make_touching_particles

#: Declump as a new user runs it, given only the smoothing and min_distance: threshold, polarity, hole filling and
#: min_size at their ``auto`` defaults (the other variants get Otsu, no hole filling and the dataset's min_size).
DECLUMP_DEFAULTS = "declump, the rest at its defaults"
DECLUMP_VARIANTS = {
    "declump (default: power, 0 Lloyd, neck, nearby, reach, reach share and ball share auto)": dict(assignment="power",
                                                                                                   max_iter=0),
    "declump --neck-ratio off --nearby-ratio off": dict(assignment="power", max_iter=0, neck_ratio=None,
                                                        nearby_ratio=None),
    "declump power + 3 Lloyd": dict(assignment="power", max_iter=3),
    "declump power + 10 Lloyd": dict(assignment="power", max_iter=10),
    "declump euclidean batched + 10 Lloyd": dict(assignment="euclidean", max_iter=10),
    DECLUMP_DEFAULTS: dict(threshold="auto", polarity="auto", max_hole_size="auto", min_size="auto"),
}
NAIVE = "naive sklearn KMeans per region"
WATERSHED = "skimage watershed"
CLESPERANTO = "pyclesperanto voronoi_otsu_labeling"
SNOW = "porespy snow_partitioning"
#: EMPS hole filling, px^2: many EMPS particles have bright rims and darker
#: interiors that Otsu leaves as background; holes up to the area of a large
#: particle (20000 px^2 is about the 90th percentile of EMPS particle areas)
#: are filled, for every method alike. ``python -m bench.neck_sweep`` shows
#: the other choices.
EMPS_MAX_HOLE = 20000.0
#: Methods timed once without a warm-up on the large volume (minutes per run
#: there); on the small volume they are timed like the others.
SINGLE_RUN_ON_LARGE = {NAIVE}


def separation_kwargs(p):
    """The parameters every separation method shares, from a dataset's parameter dict ``p``."""
    return dict(spacing=p["spacing"], sigma=p["sigma"], min_distance=p["min_distance"], min_size=p["min_size"],
                max_hole_size=p.get("max_hole_size", 0.0), polarity=p["polarity"])


def with_polarity(image, params):
    """``params`` with ``auto`` polarity decided once by declump's rule, so that every method sees the same one."""
    from cpu_fallback.ops import gaussian
    from gpu_pipeline.stages.threshold import choose_polarity, otsu_threshold

    p = dict(params)
    if p["polarity"] == "auto":
        smoothed = gaussian(image, (p["sigma"],) * image.ndim)
        p["polarity"] = choose_polarity(smoothed, otsu_threshold(smoothed), "auto")
    return p


def run_method(name, image, p):
    """Labels of ``image`` by method ``name`` with parameters ``p``."""
    from bench.peers import porespy_snow, pyclesperanto_voronoi_otsu, skimage_watershed
    from cpu_fallback import separate

    common = separation_kwargs(p)
    threshold = p.get("threshold", "auto")  # declump's; the peers threshold with Otsu
    if name in DECLUMP_VARIANTS:
        return separate(image, **{**common, "threshold": threshold, **DECLUMP_VARIANTS[name]})
    if name == NAIVE:
        return separate(image, **common, threshold=threshold, assignment="euclidean", kmeans_engine="sklearn",
                        max_iter=300)
    if name == WATERSHED:
        return skimage_watershed(image, **common)
    if name == SNOW:
        return porespy_snow(image, **common)
    if name == CLESPERANTO:
        data = image if p["polarity"] == "bright" else image.max() - image
        return pyclesperanto_voronoi_otsu(data, spot_sigma=p["spot_sigma"], outline_sigma=p["sigma"])
    raise KeyError(name)


def peak_rss_gib():
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited across fork+exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _isolated(name, image_path, p, repeats, warm_up, out_path, queue):
    image = np.load(image_path)
    base = peak_rss_gib()
    try:
        labels, times = timed(lambda: run_method(name, image, p), repeats, warm_up=warm_up)
        np.save(out_path, labels)
        queue.put({"times": times, "peak_rss_gib": peak_rss_gib(), "rss_after_loading_input_gib": base})
    except Exception as exc:  # a peer that cannot run here is reported, not fatal
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def run_isolated(name, image_path, p, repeats, warm_up=True):
    """Run and time one method in a fresh process (so that its peak memory is its own)."""
    out = Path(image_path).with_name(f"labels_{abs(hash(name))}.npy")
    result = in_fresh_process(_isolated, name, str(image_path), p, repeats, warm_up, str(out))
    if "error" in result:
        return result, None
    return result, np.load(out)


def pooled_scores(pairs):
    """Scores pooled over images: TP summed per IoU threshold, then F1 and AP."""
    return pool_scores([evaluate(pred, gt) for pred, gt in pairs])


def pool_scores(per):
    """Pool per-image :func:`gpu_pipeline.metrics.evaluate` results (TP summed per IoU threshold)."""
    tp = sum(np.asarray(s["f1"]) * (s["n_pred"] + s["n_gt"]) / 2 for s in per)
    n_pred = sum(s["n_pred"] for s in per)
    n_gt = sum(s["n_gt"] for s in per)
    f1 = 2 * tp / max(n_pred + n_gt, 1)
    ap = tp / np.maximum(n_pred + n_gt - tp, 1)
    return {"f1_50": float(f1[0]), "mean_f1": float(f1.mean()), "ap_50": float(ap[0]), "mean_ap": float(ap.mean()),
            "n_pred": n_pred, "n_gt": n_gt, "splits": sum(s["splits"] for s in per),
            "merges": sum(s["merges"] for s in per), "images": len(per)}



#: The generated benchmark volume: edge (voxels) and spheres requested (radius 5-12).
SYNTHETIC_SIZE, SYNTHETIC_PARTICLES = 256, 1500


def synthetic_volume(size=SYNTHETIC_SIZE, n=SYNTHETIC_PARTICLES):
    """The generated benchmark volume (touching spheres, radius 5-12), its ground truth and the shared parameters."""
    image, truth = make_touching_particles((size,) * 3, n, radius_range=(5, 12), overlap=0.15, seed=2026)
    p = dict(sigma=1.0, min_distance=4, min_size=65, polarity="bright", spacing=(1.0, 1.0, 1.0), spot_sigma=3.0)
    return image, truth, p


def suite_synthetic(size, n, repeats, methods, single_run=()):
    """Accuracy, time and peak memory of ``methods`` on a generated volume; ``single_run``: timed once, no warm-up."""
    image, truth, p = synthetic_volume(size, n)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "image.npy"
        np.save(path, image)
        for name in methods:
            once = name in single_run
            info, labels = run_isolated(name, path, p, 1 if once else repeats, warm_up=not once)
            if labels is None:
                rows[name] = info
                print(f"synthetic {name}: {info['error']}", flush=True)
                continue
            row = {**pooled_scores([(labels, truth)]), "seconds": spread(info["times"]),
                   "peak_rss_gib": info["peak_rss_gib"], "rss_after_loading_input_gib": info["rss_after_loading_input_gib"]}
            row["voxels_per_second"] = image.size / row["seconds"]["median"]
            rows[name] = row
            print(f"synthetic {name:40s} F1@0.5 {row['f1_50']:.3f} meanF1 {row['mean_f1']:.3f} "
                  f"time {row['seconds']['median']:.2f}s peak RSS {row['peak_rss_gib']:.2f} GiB", flush=True)
    return {"name": f"generated {size}^3, {int(truth.max())} spheres r5-12, overlap 0.15", "params": p,
            "single_run": sorted(set(single_run) & set(methods)), "methods": rows}, image, truth


def suite_connected_components(image, repeats, chunk_sizes=(128,)):
    """SciPy's label vs dask-image's chunked label on the same mask (declump's regions step).

    Every timing is a median of ``repeats`` runs after a warm-up. 64^3 chunks
    (1.5 minutes per run on 2 cores) are opt-in: ``--dask-image-64``.
    """
    from scipy import ndimage as ndi

    from bench.peers import dask_image_label

    mask = image > 127
    out = {}
    (ref, n_ref), t_scipy = timed(lambda: ndi.label(mask, ndi.generate_binary_structure(3, 1)), repeats)
    out["scipy.ndimage.label"] = {"seconds": spread(t_scipy), "regions": int(n_ref)}
    for chunk in chunk_sizes:
        (labels, n), t = timed(lambda: dask_image_label(mask, (chunk,) * 3), repeats)
        same = n == n_ref and len(set(zip(labels[mask].tolist(), ref[mask].tolist()))) == n_ref
        out[f"dask_image.ndmeasure.label chunks {chunk}^3"] = {"seconds": spread(t), "regions": n,
                                                               "same_partition_as_scipy": bool(same)}
    for k, v in out.items():
        print(f"connected components {k}: {v['seconds']['median']:.2f}s regions {v['regions']}", flush=True)
    return out


def real_datasets(emps_limit):
    import tifffile

    from gpu_pipeline.io import read_image

    sets = {}
    dsb = SHARED / "dsb2018_stardist_sample"
    if dsb.exists():
        sets["DSB-2018 nuclei"] = ([("img2d", tifffile.imread(dsb / "img2d.tif"), tifffile.imread(dsb / "mask2d.tif"))],
                                   dict(sigma=1.0, min_distance=6, min_size=20, polarity="bright", spacing=(1.0, 1.0),
                                        spot_sigma=4.0))
    emps = SHARED / "emps_subset"
    if emps.exists():
        names = sorted(p.stem for p in (emps / "images").glob("*.png"))[:emps_limit]
        sets["EMPS particles"] = ([(n, read_image(emps / "images" / f"{n}.png")[0],
                                    read_image(emps / "segmaps" / f"{n}.png")[0]) for n in names],
                                  dict(sigma=2.0, min_distance=20, min_size=400, max_hole_size=EMPS_MAX_HOLE,
                                       polarity="auto", spacing=(1.0, 1.0), spot_sigma=8.0))
    embryo = SHARED / "qcanet_embryo3d"
    if embryo.exists():
        sets["embryo 3D nuclei"] = ([(s, tifffile.imread(embryo / "images_raw" / f"{s}.tif"),
                                      tifffile.imread(embryo / "labels" / f"{s}_labels.tif"))
                                     for s in ("8_cell_stage", "16_cell_stage")],
                                    # Otsu, as the peers: these fixed sigma and min_distance were chosen for
                                    # Otsu's foreground; 'auto' takes Li here (F1@0.5 0.29 at these numbers,
                                    # 0.875 with every option automatic), whose looser boundaries need the
                                    # automatic sigma and scale that go with it.
                                    dict(sigma=2.0, min_distance=6, min_size=200, polarity="bright",
                                         spacing=(1.0, 1.0, 1.0), spot_sigma=4.0, threshold="otsu"))
    return sets


def suite_real(methods, emps_limit, skip=None):
    results, examples = {}, {}
    for dataset, (items, params) in real_datasets(emps_limit).items():
        rows = {}
        for name in methods:
            if (dataset, name) in (skip or {}):
                rows[name] = {"error": skip[(dataset, name)]}
                continue
            pairs, seconds = [], 0.0
            try:
                for item, image, truth in items:
                    p = with_polarity(image, params)
                    t0 = time.perf_counter()
                    labels = run_method(name, image, p)
                    seconds += time.perf_counter() - t0
                    pairs.append((labels, truth))
                    examples.setdefault(dataset, {}).setdefault(item, {"image": image, "truth": truth})[name] = labels
            except Exception as exc:
                rows[name] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"{dataset} {name}: {rows[name]['error']}", flush=True)
                continue
            rows[name] = {**pooled_scores(pairs), "seconds_total": seconds}
            r = rows[name]
            print(f"{dataset:18s} {name:40s} F1@0.5 {r['f1_50']:.3f} meanF1 {r['mean_f1']:.3f} "
                  f"splits {r['splits']} merges {r['merges']} time {seconds:.1f}s", flush=True)
        results[dataset] = {"params": params, "images": len(items), "methods": rows}
    return results, examples


def image_grid(examples, methods, path, picks=(("DSB-2018 nuclei", "img2d"), ("EMPS particles", None),
                                                ("embryo 3D nuclei", "8_cell_stage"))):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gpu_pipeline.overlay import overlay_rgb

    chosen = []
    for dataset, item in picks:
        if dataset not in examples:
            continue
        items = examples[dataset]
        if item is None:  # the EMPS image with the most ground-truth particles
            item = max(items, key=lambda k: int(items[k]["truth"].max()))
        chosen.append((dataset, item, items[item]))
    if not chosen:
        return False
    cols = ["input", "ground truth"] + [m for m in methods if m in chosen[0][2]]
    fig, axes = plt.subplots(len(chosen), len(cols), figsize=(2.4 * len(cols), 2.5 * len(chosen)), squeeze=False)
    for row, (dataset, item, ex) in enumerate(chosen):
        for col, name in enumerate(cols):
            ax = axes[row, col]
            image = ex["image"]
            labels = ex["truth"] if name == "ground truth" else ex.get(name)
            if name == "input":
                pic = overlay_rgb(image, np.zeros_like(ex["truth"]))
            elif labels is None:
                ax.axis("off")
                continue
            else:
                pic = overlay_rgb(image, labels)
            crop = tuple(slice(0, min(s, 256)) for s in pic.shape[:2])
            ax.imshow(pic[crop])
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name.replace(" (default: power, 0 Lloyd)", "").replace("pyclesperanto ", "cle "), fontsize=7)
            if col == 0:
                ax.set_ylabel(f"{dataset}\n{item}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def markdown(result):
    m = result["machine"]
    lines = [f"# declump vs peers, CPU: {m['cpu']} ({m['cpu_count']} cores, {m['memory_gib']} GiB), {m['date']}", ""]
    if "wall_seconds" in result:
        lines += [f"Suite wall time: {result['wall_seconds']:.0f} s.", ""]
    for key in ("synthetic", "synthetic_small"):
        if key not in result:
            continue
        syn = result[key]
        once = syn.get("single_run", [])
        lines += [f"## {syn['name']}", "", f"Parameters: `{syn['params']}`. Each method in its own process; time: "
                  f"median of {result['repeats']} runs after a warm-up, min-max in brackets"
                  + (f" ({', '.join(once)}: one run, no warm-up)" if once else "") + ".", "",
                  "| method | F1@0.5 | mean F1 | AP@0.5 | splits | merges | seconds | Mvox/s | peak RSS GiB |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, r in syn["methods"].items():
            if "error" in r:
                lines.append(f"| {name} | not run: {r['error']} |||||||| ")
                continue
            s = r["seconds"]
            lines.append(f"| {name} | {r['f1_50']:.3f} | {r['mean_f1']:.3f} | {r['ap_50']:.3f} | {r['splits']} | "
                         f"{r['merges']} | {s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f}) | "
                         f"{r['voxels_per_second'] / 1e6:.2f} | {r['peak_rss_gib']:.2f} |")
        lines.append("")
    lines += ["", "Connected components of the same mask (threshold 127):", "",
              "| implementation | seconds (min-max) | timed runs | regions | same partition as SciPy |",
              "|---|---|---|---|---|"]
    for name, r in result["connected_components"].items():
        s = r["seconds"]
        lines.append(f"| {name} | {s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f}) | {s['runs']} | {r['regions']} | "
                     f"{r.get('same_partition_as_scipy', '-')} |")
    for dataset, block in result["real"].items():
        lines += ["", f"## {dataset} ({block['images']} images)", "", f"Parameters: `{block['params']}`; scores "
                  "pooled over images; time: one run per image, summed.", "",
                  "| method | F1@0.5 | mean F1 | AP@0.5 | splits | merges | seconds |", "|---|---|---|---|---|---|---|"]
        for name, r in block["methods"].items():
            if "error" in r:
                lines.append(f"| {name} | not run: {r['error']} ||||||")
                continue
            lines.append(f"| {name} | {r['f1_50']:.3f} | {r['mean_f1']:.3f} | {r['ap_50']:.3f} | {r['splits']} | "
                         f"{r['merges']} | {r['seconds_total']:.1f} |")
    for label, why in result.get("notes", {}).items():
        lines.append(f"- {label}: {why}")
    for label, why in result.get("skipped", {}).items():
        lines.append(f"- skipped {label}: {why}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=SYNTHETIC_SIZE,
                        help="edge of the generated 3D volume (default %(default)s)")
    parser.add_argument("--particles", type=int, default=SYNTHETIC_PARTICLES,
                        help="spheres to place (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method after a warm-up")
    parser.add_argument("--emps-limit", type=int, default=None, help="use only the first N EMPS images")
    parser.add_argument("--naive-on-large", action="store_true",
                        help="also run the naive per-region scikit-learn k-means on the large volume (10 minutes "
                             "on 2 cores); by default it runs on the small volume only")
    parser.add_argument("--clesperanto-emps", action="store_true",
                        help="also run pyclesperanto on EMPS (20 minutes of OpenCL kernel compiles on pocl: "
                             "EMPS images come in dozens of shapes and each shape compiles its kernels)")
    parser.add_argument("--dask-image-64", action="store_true",
                        help="also time dask-image's label with 64^3 chunks (about 1.5 minutes per run on 2 cores, "
                             "a warm-up and --repeats runs; by default only 128^3 chunks)")
    parser.add_argument("--out", default=None, help=out_help("compare"))
    args = parser.parse_args(argv)

    methods = list(DECLUMP_VARIANTS) + [NAIVE, WATERSHED, SNOW, CLESPERANTO]
    large = [m for m in methods if m != NAIVE or args.naive_on_large]
    small = [next(iter(DECLUMP_VARIANTS)), NAIVE, WATERSHED]
    start = time.perf_counter()
    result = {"machine": machine_info(), "repeats": args.repeats, "notes": {}}
    result["synthetic"], image, _ = suite_synthetic(args.size, args.particles, args.repeats, large,
                                                    single_run=SINGLE_RUN_ON_LARGE)
    small_size = args.size // 2
    result["synthetic_small"], _, _ = suite_synthetic(small_size, max(1, args.particles // 8), args.repeats, small)
    if not args.naive_on_large:
        result["notes"]["naive k-means"] = (f"run on the {small_size}^3 volume (same generator, density and "
                                            f"parameters) beside declump and the watershed; on {args.size}^3 it "
                                            "takes about 10 minutes (--naive-on-large)")
    result["connected_components"] = suite_connected_components(image, args.repeats,
                                                              (64, 128) if args.dask_image_64 else (128,))
    skip = {}
    if not args.clesperanto_emps:
        skip[("EMPS particles", CLESPERANTO)] = "skipped by default (--clesperanto-emps): kernel compiles per shape"
    result["real"], examples = suite_real(methods, args.emps_limit, skip)
    result["wall_seconds"] = time.perf_counter() - start
    stem = write_results(result, "compare", markdown(result), args.out)
    image_grid(examples, methods, RESULTS / f"{stem}_grid.png")
    print(f"wrote {RESULTS / stem}.json, .md, _grid.png")
    return result


if __name__ == "__main__":
    main()
