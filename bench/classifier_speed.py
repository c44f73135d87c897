"""Pixel-classifier speed: features + prediction, voxels/s, declump beside scikit-image + scikit-learn.

    python -m bench.classifier_speed [--size-2d 2048] [--size-3d 256] [--rounds 3] [--rounds-3d 1] [--out NAME]

declump: ``PixelClassifier.predict_proba`` (its features, :mod:`gpu_pipeline.stages.features`, and on the CPU
scikit-learn's compiled traversal of the trees rebuilt from the model arrays, tile by tile; one thread). Peer:
``skimage.feature.multiscale_basic_features`` + ``RandomForestClassifier.predict_proba`` at a similar feature
count (10 sigmas from 0.5 to 16: 40 features in 2D, 50 in 3D; declump: 41 and 51), with ``workers=1``/``n_jobs=1``
and with 2 threads. Both forests: 32 trees, depth 12, trained on the same generated image. The peer's 3D
features are float64 and would take 6.7 GB for a 256^3 volume, so it runs on declump's tiles with no
halo (which favours it: no overlap is computed, and its result is wrong near tile faces). Methods run
interleaved, round after round, on a machine other sessions share: each row records the load average.
With a GPU, declump also runs on CuPy (the GPU's name is recorded).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

from bench.common import RESULTS, machine_info

TREES, DEPTH = 32, 12
PEER_SIGMAS = dict(sigma_min=0.5, sigma_max=16, num_sigma=10)


def _data(ndim, size, seed):
    from gpu_pipeline.synthetic import make_touching_particles

    if ndim == 2:
        shape, n = (size, size), int(size * size / 900)
    else:
        shape, n = (size,) * 3, int(size ** 3 / 11000)
    return make_touching_particles(shape, n, radius_range=(5, 12), seed=seed)


def _train(ndim):
    """Both forests, trained on one small generated image of the same kind."""
    from sklearn.ensemble import RandomForestClassifier
    from skimage.feature import multiscale_basic_features

    from gpu_pipeline.classifier import classes_from_instances, train_classifier

    image, truth = _data(ndim, 256 if ndim == 2 else 64, seed=1)
    classes = classes_from_instances(truth)
    ours = train_classifier(image, classes, n_estimators=TREES, max_depth=DEPTH, samples_per_class=20000)
    rng = np.random.default_rng(0)
    pick = np.concatenate([rng.choice(np.flatnonzero(classes.ravel() == c), min(20000, int((classes == c).sum())),
                                      replace=False) for c in (1, 2, 3)])
    features = multiscale_basic_features(image, **PEER_SIGMAS).reshape(-1, 10 * (ndim + 2))
    peer = RandomForestClassifier(n_estimators=TREES, max_depth=DEPTH, random_state=0).fit(
        features[pick], classes.ravel()[pick])
    return ours, peer


def _peer(image, peer, threads):
    """scikit-image features + scikit-learn predict_proba over declump's tiles (no halo)."""
    from skimage.feature import multiscale_basic_features

    from gpu_pipeline.classifier import tiles

    peer.set_params(n_jobs=threads)
    seconds = {"features": 0.0, "prediction": 0.0}
    out = np.empty((len(peer.classes_),) + image.shape, np.float32)
    for core in tiles(image.shape):
        t0 = time.perf_counter()
        features = multiscale_basic_features(image[core], workers=threads, **PEER_SIGMAS)
        t1 = time.perf_counter()
        proba = peer.predict_proba(features.reshape(-1, features.shape[-1]))
        seconds["features"] += t1 - t0
        seconds["prediction"] += time.perf_counter() - t1
        out[(slice(None),) + core] = np.moveaxis(proba.reshape(features.shape[:-1] + (-1,)), -1, 0)
    return seconds


def _ours(image, model, xp=np):
    """declump's predict_proba; features alone timed in a separate pass over the same tiles."""
    from gpu_pipeline.classifier import tiles
    from gpu_pipeline.stages.features import normalize_intensity, tile_features

    image = xp.asarray(image)
    sync = (lambda: xp.cuda.Device().synchronize()) if xp is not np else (lambda: None)
    sync()
    t0 = time.perf_counter()
    model.predict_proba(image)
    sync()
    total = time.perf_counter() - t0
    t0 = time.perf_counter()
    normalized = normalize_intensity(image)
    for core in tiles(image.shape):
        tile_features(normalized, core, spacing=(1.0,) * image.ndim, scales=model.scales)
    sync()
    features = time.perf_counter() - t0
    return {"features": features, "prediction": total - features, "total": total}


def run(size_2d, size_3d, rounds, rounds_3d):
    from gpu_pipeline._backend import gpu_available

    rows = []
    for ndim, size in ((2, size_2d), (3, size_3d)):
        if not size:
            continue
        ours, peer = _train(ndim)
        image, _ = _data(ndim, size, seed=2)
        voxels = image.size
        methods = {"declump (1 thread)": lambda: _ours(image, ours),
                   "skimage + sklearn (1 thread)": lambda: _peer(image, peer, 1),
                   "skimage + sklearn (2 threads)": lambda: _peer(image, peer, 2)}
        if gpu_available():
            import cupy

            methods["declump (GPU)"] = lambda: _ours(image, ours, cupy)
        n_features = {"declump (1 thread)": ours.n_features, "declump (GPU)": ours.n_features}
        for round_ in range(rounds if ndim == 2 else rounds_3d):
            for name, fn in methods.items():
                load = os.getloadavg()[0]
                seconds = fn()
                seconds["total"] = seconds.get("total", seconds["features"] + seconds["prediction"])
                rows.append({"ndim": ndim, "shape": list(image.shape), "voxels": voxels, "method": name,
                             "round": round_, "n_features": n_features.get(name, 10 * (ndim + 2)),
                             "seconds": {k: round(v, 3) for k, v in seconds.items()},
                             "voxels_per_second": round(voxels / seconds["total"]), "load_before": round(load, 2),
                             "load_after": round(os.getloadavg()[0], 2)})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def write(rows, info, name):
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=2) + "\n")
    gpu = info["gpu"]["name"] if info["gpu"] else "none"
    lines = [f"# Pixel classifier speed: {info['cpu']} ({info['cpu_count']} cores, shared with other sessions), "
             f"GPU: {gpu}, {info['date']}", "",
             f"Features + prediction, {TREES} trees of depth {DEPTH}; median (min-max) over the interleaved rounds "
             f"({info['rounds']} in 2D, {info['rounds_3d']} in 3D); load = 1-min load average before each run "
             f"(2 cores); suite wall time {info['wall_seconds']:.0f} s. declump's prediction column is its total "
             "minus a separate features-only pass over the same tiles. The peer runs on declump's tiles (2^21 "
             "voxels) with no halo, which favours it (no overlap computed; its result is wrong near tile faces); "
             "its features are float64, 6.7 GB for the whole 256^3 volume.", "",
             "| image | method | features | seconds: features | prediction | total | Mvoxel/s | load |",
             "|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["ndim"], r["method"]) for r in rows}, key=lambda k: (k[0], k[1]))
    for ndim, method in keys:
        mine = [r for r in rows if r["ndim"] == ndim and r["method"] == method]
        med = {k: statistics.median(r["seconds"][k] for r in mine) for k in ("features", "prediction", "total")}
        totals = [r["seconds"]["total"] for r in mine]
        loads = [r["load_before"] for r in mine]
        shape = "x".join(map(str, mine[0]["shape"]))
        lines.append(f"| {shape} | {method} | {mine[0]['n_features']} | {med['features']:.1f} | "
                     f"{med['prediction']:.1f} | {med['total']:.1f} ({min(totals):.1f}-{max(totals):.1f}) | "
                     f"{mine[0]['voxels'] / med['total'] / 1e6:.3f} | {min(loads):.1f}-{max(loads):.1f} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-2d", type=int, default=2048)
    parser.add_argument("--size-3d", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds in 2D (default %(default)s)")
    parser.add_argument("--rounds-3d", type=int, default=1, help="interleaved rounds in 3D (default %(default)s)")
    parser.add_argument("--out", default=None, help="result file stem (default classifier_speed_DATE)")
    args = parser.parse_args(argv)
    info = machine_info()
    started = time.perf_counter()
    rows = run(args.size_2d, args.size_3d, args.rounds, args.rounds_3d)
    info.update(rounds=args.rounds, rounds_3d=args.rounds_3d, wall_seconds=round(time.perf_counter() - started, 1),
                threads_env={k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    write(rows, info, args.out or f"classifier_speed_{info['date'][:10]}")


if __name__ == "__main__":
    main()
