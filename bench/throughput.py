"""Side by side on generated volumes: declump's CPU fallback, the scikit-image watershed pipeline and PoreSpy SNOW.

    python -m bench.throughput [--shape 256,256,256] [--seed 7] [--particles 1200] [--radius 5,12] [--rounds 2]
    python -m bench.throughput --methods none --chunked 128,128,128 --rounds 3   # the chunked part only
    python -m bench.throughput --methods none --scaling 128,128,128 --shape 256,512,512 --shape 512,512,1024

The acceptance check of issue 16: on a generated volume (seed, density and
radii given on the command line), each method labels it with the same
smoothing and ``min_distance``, each run in a fresh process (so its peak
resident memory is its own) after a warm-up on a 64-voxel crop (imports,
compiled kernels), methods interleaved round by round so that a change in
the machine's load hits all of them alike. Recorded per method: F1@0.5 and
mean F1 over IoU 0.5-0.95 against the ground truth, seconds (median of the
rounds, min-max), MVox/s, peak RSS, and the load average around every run;
the ratio of the watershed's time to declump's, per round and overall; and
the hours per terabyte of uint8 EM volume per node this in-memory rate
projects (voxels per TB / rate / cores used, with its inputs).

With ``--chunked CHUNKS``: ``declump run`` from a Zarr store in memory and
chunked on one core (wall and CPU seconds, per voxel and per thread), a
local cluster of worker processes with 1 and 2 workers (scaling efficiency
t1 / (2 t2)), peak memory of the run and of each worker process, and the
projected hours per TB per node of 2 and 16 cores from those rates.

With ``--scaling CHUNKS``: that 1 -> 2 worker scaling on a running cluster
for every ``--shape``, each volume generated the same way: how the passes'
fixed costs weigh as the volume and its number of chunks grow.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import (RESULTS, chunks_arg, in_fresh_process, machine_info, out_help, positive_int,
                          radius_range_arg, shape_arg, write_results)
from bench.compare_methods import DECLUMP_DEFAULTS, SNOW, WATERSHED, peak_rss_gib, pooled_scores, run_method
from gpu_pipeline.synthetic import make_touching_particles

DECLUMP = "declump (default: power, 0 Lloyd, neck, nearby, reach, reach share and ball share auto)"
METHODS = (DECLUMP, WATERSHED, SNOW)
SHORT = {"declump": DECLUMP, "watershed": WATERSHED, "snow": SNOW, "declump-defaults": DECLUMP_DEFAULTS}
#: Voxels in a terabyte of uint8 volume.
VOXELS_PER_TB = 1e12


def _one_run(name, image_path, p, out_path, queue):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core for every method, threads included
    image = np.load(image_path)
    try:
        run_method(name, np.ascontiguousarray(image[tuple(slice(0, 64) for _ in image.shape)]), p)  # warm-up
        load = os.getloadavg()
        t0 = time.perf_counter()
        labels = run_method(name, image, p)
        seconds = time.perf_counter() - t0
        np.save(out_path, labels)
        queue.put({"seconds": seconds, "peak_rss_gib": peak_rss_gib(), "load_before": load,
                   "load_after": os.getloadavg()})
    except Exception as exc:  # a peer that cannot run here is reported, not fatal
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def run_once(name, image_path, p):
    """One timed run of method ``name`` in a fresh process: (info, labels or None)."""
    out = Path(image_path).with_name(f"labels_{abs(hash(name))}.npy")
    info = in_fresh_process(_one_run, name, str(image_path), p, str(out))
    return info, (None if "error" in info else np.load(out))


def side_by_side(shape, particles, radius, seed, rounds, methods=METHODS):
    image, truth = make_touching_particles(shape, particles, radius_range=radius, overlap=0.15, seed=seed)
    p = dict(sigma=1.0, min_distance=4, min_size=65, polarity="bright", spacing=(1.0,) * len(shape))
    runs = {m: [] for m in methods}
    scores = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "image.npy"
        np.save(path, image)
        for r in range(rounds):
            for name in methods:
                info, labels = run_once(name, path, p)
                runs[name].append(info)
                if labels is not None and name not in scores:
                    scores[name] = pooled_scores([(labels, truth)])
                print(f"round {r + 1} {name:45s} " + (info["error"] if labels is None else
                      f"{info['seconds']:.2f}s F1@0.5 {scores[name]['f1_50']:.3f} mean F1 {scores[name]['mean_f1']:.3f}"
                      f" load {info['load_before'][0]:.1f}"), flush=True)
    rows = {}
    for name in methods:
        ok = [i for i in runs[name] if "error" not in i]
        if not ok:
            rows[name] = {"error": runs[name][0]["error"]}
            continue
        seconds = [i["seconds"] for i in ok]
        rows[name] = {**scores[name], "seconds": {"median": statistics.median(seconds), "min": min(seconds),
                                                  "max": max(seconds), "runs": len(seconds)},
                      "mvox_per_s": image.size / statistics.median(seconds) / 1e6,
                      "peak_rss_gib": max(i["peak_rss_gib"] for i in ok),
                      "load_averages": [[round(x, 2) for x in i["load_before"] + i["load_after"]] for i in ok]}
    def watershed_over(name):
        if "error" in rows.get(name, {"error": 1}) or "error" in rows.get(WATERSHED, {"error": 1}):
            return None
        per_round = [w["seconds"] / d["seconds"] for d, w in zip(runs[name], runs[WATERSHED])
                     if "error" not in d and "error" not in w]
        return {"per_round": per_round, "median": statistics.median(per_round)}

    return {"shape": list(shape), "voxels": int(image.size), "particles": int(truth.max()), "radius": list(radius),
            "seed": seed, "params": p, "methods": rows, "watershed_over_declump_time": watershed_over(DECLUMP),
            "watershed_over_declump_defaults_time": watershed_over(DECLUMP_DEFAULTS)}


def _cli_run(argv, out_dir, folder=None, interval=0.2):
    """``declump`` with ``argv`` in a fresh process (bench.chunked's child): seconds, CPU seconds and peak RSS
    of the process, and the peaks of its worker processes (and of ``folder``'s bytes on disk), sampled every
    ``interval`` seconds."""
    from bench.chunked import run_child

    report = Path(out_dir) / "report.json"
    returncode, stderr, workers, most = run_child([str(report), *argv], interval=interval, folder=folder)
    if returncode != 0:
        raise RuntimeError(f"declump {' '.join(argv)} failed: {stderr[-1000:]}")
    return {**json.loads(report.read_text()), "worker_peak_rss_gib": workers,
            **({} if folder is None else {"folder_peak_bytes": most})}


#: What a chunked run does not choose automatically (it prints them): the in-memory run is given the same,
#: so both compute the same labels, byte for byte (min size: a ball of diameter --min-distance 4).
SAME_AS_CHUNKED = ["--threshold", "otsu", "--max-hole-size", "0", "--min-size", repr(math.pi * 4 ** 3 / 6),
                   "--reject-annotations", "off"]
#: Side of the corner of the volume that each chunked-part mode also runs, in one chunk: the command's
#: start-up (imports, kernels, the passes' and outputs' fixed costs), subtracted for the per-voxel figures.
START_UP_SIDE = 64
#: The chunked part's runs: (mode, CLI options, cores it is pinned to).
CHUNKED_MODES = (("in_memory", SAME_AS_CHUNKED, 1),
                 ("chunked", ["--workers", "1"], 1),
                 ("chunked_2", ["--workers", "2"], 2),
                 ("cluster_1", ["--cluster", "local", "--workers", "1"], 1),
                 ("cluster_2", ["--cluster", "local", "--workers", "2"], 2))
MODE_TITLES = {"in_memory": "in memory (.npy output, the chunked run's options), 1 core", "chunked": "chunked, local threads, 1 worker, 1 core",
               "chunked_2": "chunked, local threads (the default engine), 2 workers, 2 cores",
               "cluster_1": "chunked, local cluster of processes, 1 worker, 1 core",
               "cluster_2": "chunked, local cluster of processes, 2 workers, 2 cores",
               "chunked_tmpfs": "chunked, local threads, 1 worker, 1 core, work folder (--scratch) on a RAM file system",
               "warm_1": "chunked, a running cluster (--scheduler), 1 worker process, 1 core (CPU s: the command only)",
               "warm_2": "chunked, a running cluster (--scheduler), 2 worker processes, 2 cores (CPU s: the command only)"}


def chunked_vs_in_memory(shape, particles, radius, seed, chunks, rounds):
    """``declump run`` on one Zarr volume in memory and chunked, and the chunked run's scaling from 1 to 2 workers.

    Every run takes the same parameters (bench.chunked's, with --max-radius
    for the chunked halos; the in-memory run also the options a chunked run
    fixes, :data:`SAME_AS_CHUNKED`, so both write the same labels) in a
    fresh process pinned to its cores
    (:data:`CHUNKED_MODES`), modes interleaved round by round. In memory and
    chunked on one core give the per-voxel, per-thread ratio; a local
    cluster of worker processes with 1 worker on 1 core and with 2 workers
    on 2 cores gives the scaling efficiency t1 / (2 t2). Peak memory: the
    run's own process (VmHWM) and each worker process (sampled every 0.2 s).
    """
    import zarr

    from bench.chunked import PARAMS

    image, _ = make_touching_particles(shape, particles, radius_range=radius, overlap=0.15, seed=seed)
    keep = sorted(os.sched_getaffinity(0))
    runs = {mode: [] for mode, _, _ in CHUNKED_MODES}
    runs.update(chunked_tmpfs=[], pair=[], **{f"{mode}_small": [] for mode, _, _ in CHUNKED_MODES})
    shm = ram_folder(4 * int(np.prod(shape)) * 3)  # the staged float32 smoothed volume and more, with room
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        if shm is not None:
            shm = stack.enter_context(tempfile.TemporaryDirectory(dir=shm, prefix="declump-bench-"))
        volume = Path(tmp) / "in.zarr"
        zarr.create_array(str(volume), shape=image.shape, dtype=image.dtype, chunks=chunks,
                          compressors=zarr.codecs.ZstdCodec(level=3))[...] = image
        small = Path(tmp) / "small" / "in.zarr"
        corner = image[tuple(slice(0, min(START_UP_SIDE, n)) for n in image.shape)]
        zarr.create_array(str(small), shape=corner.shape, dtype=corner.dtype, chunks=chunks,
                          compressors=zarr.codecs.ZstdCodec(level=3))[...] = corner
        del image, corner
        try:
            for _ in range(rounds):
                for mode, options, cores in CHUNKED_MODES:
                    if cores > len(keep):
                        continue
                    out = "labels.npy" if mode == "in_memory" else "labels.zarr"
                    extra = options if mode == "in_memory" else ["--chunks", ",".join(map(str, chunks)), *options]
                    measured = _timed_run(volume, Path(tmp) / mode, out, extra, set(keep[:cores]))
                    runs[mode].append(measured)
                    runs[f"{mode}_small"].append(_timed_run(small, Path(tmp) / "small" / mode, out, extra,
                                                            set(keep[:cores])))
                    print(f"{mode:10s} {measured['seconds']:.1f}s CPU {measured['cpu_seconds']:.1f}s peak RSS {measured['peak_rss_gib']:.2f} GiB "
                          f"workers {measured.get('worker_peak_rss_gib')} load {measured['load_before'][0]:.1f}",
                          flush=True)
                chunked_options = ["--chunks", ",".join(map(str, chunks)), "--workers", "1"]
                if shm is not None:
                    # The same chunked run with its work folder in RAM: what this machine's disk adds to it.
                    measured = _timed_run(volume, Path(tmp) / "chunked_tmpfs", "labels.zarr",
                                          [*chunked_options, "--scratch", str(Path(shm) / "work")], {keep[0]})
                    shutil.rmtree(Path(shm) / "work", ignore_errors=True)
                    runs["chunked_tmpfs"].append(measured)
                    print(f"chunked_tmpfs {measured['seconds']:.1f}s", flush=True)
                if len(keep) >= 2:
                    pair = _pair_runs(volume, Path(tmp) / "pair", chunked_options, keep[:2])
                    runs["pair"].extend(pair)
                    print("pair " + " ".join(f"{m['seconds']:.1f}s" for m in pair), flush=True)
            # Untimed: the work folder's peak on disk (walking it every 0.1 s costs the run some CPU).
            scratch = work_folder_peak(volume, Path(tmp) / "scratch", chunks)
        finally:
            os.sched_setaffinity(0, set(keep))
        if len(keep) >= 2:
            runs.update(warm_cluster_runs(volume, chunks, rounds, keep, small))
    voxels = int(np.prod(shape))
    out = {"shape": list(shape), "chunks": list(chunks), "params": PARAMS, "in_memory_options": SAME_AS_CHUNKED,
           "runs": runs, "modes": {}}
    for mode, cores in [(m, c) for m, _, c in CHUNKED_MODES] + [("chunked_tmpfs", 1), ("warm_1", 1), ("warm_2", 2)]:
        rows = runs.get(mode)
        if not rows:
            continue
        seconds = [r["seconds"] for r in rows]
        workers = [w for r in rows for w in r.get("worker_peak_rss_gib", [])]
        out["modes"][mode] = {"cores": cores, "seconds": statistics.median(seconds), "min": min(seconds),
                              "max": max(seconds), "runs": len(seconds),
                              "cpu_seconds": statistics.median(r["cpu_seconds"] for r in rows),
                              "mvox_per_s": voxels / statistics.median(seconds) / 1e6,
                              "peak_rss_gib": max(r["peak_rss_gib"] for r in rows),
                              "worker_peak_rss_gib": max(workers) if workers else None}
    out["chunked_over_in_memory"] = [c["seconds"] / m["seconds"] for m, c in zip(runs["in_memory"], runs["chunked"])]
    out["chunked_over_in_memory_cpu"] = [c["cpu_seconds"] / m["cpu_seconds"]
                                         for m, c in zip(runs["in_memory"], runs["chunked"])]
    out["scaling_efficiency"] = [one["seconds"] / (2 * two["seconds"])
                                 for one, two in zip(runs["cluster_1"], runs["cluster_2"])]
    out["threads_scaling_efficiency"] = [one["seconds"] / (2 * two["seconds"])
                                         for one, two in zip(runs["chunked"], runs.get("chunked_2", []))]
    out["warm_scaling_efficiency"] = [one["seconds"] / (2 * two["seconds"])
                                      for one, two in zip(runs.get("warm_1", []), runs.get("warm_2", []))]
    # The same from the runs' own seconds (their summaries: from the first pass to the last file written),
    # without the interpreter's start, the imports and opening the store, which do not shrink with workers.
    out["warm_scaling_efficiency_run"] = [one["run_seconds"] / (2 * two["run_seconds"])
                                          for one, two in zip(runs.get("warm_1", []), runs.get("warm_2", []))
                                          if "run_seconds" in one and "run_seconds" in two]
    # Per voxel net of each command's start-up: (t - t_small) over the voxels between the two volumes, the
    # small one a corner of the big one in one chunk, run by the same mode right after it (imports, the
    # compiled kernels' loading, the passes' and the outputs' fixed costs cancel; per-chunk costs do not).
    out["start_up_voxels"] = int(np.prod([min(START_UP_SIDE, n) for n in shape]))
    net = {mode: [r["seconds"] - s["seconds"] for r, s in zip(runs.get(mode, []), runs.get(f"{mode}_small", []))]
           for mode in ("in_memory", "chunked", "warm_1", "warm_2")}  # not the clusters the command starts:
    # starting them dominates the corner's run and varies more than its work (1.55-1.71 "efficiency" on 256^3)
    out["net_seconds"] = net
    out["net_chunked_over_in_memory"] = [c / m for m, c in zip(net["in_memory"], net["chunked"]) if m > 0]
    out["net_warm_scaling_efficiency"] = [one / (2 * two) for one, two in zip(net["warm_1"], net["warm_2"])
                                          if two > 0]
    out["chunked_tmpfs_over_in_memory"] = [c["seconds"] / m["seconds"]
                                           for m, c in zip(runs["in_memory"], runs["chunked_tmpfs"])]
    # Two independent one-core chunked runs at once, one per core: t_alone / t_together is the most that 1 -> 2
    # scaling can reach on this machine (shared caches, memory bandwidth and disk, the hypervisor).
    out["machine_ceiling"] = [alone["seconds"] / statistics.mean(r["seconds"] for r in runs["pair"][2 * i:2 * i + 2])
                              for i, alone in enumerate(runs["chunked"][:len(runs["pair"]) // 2])]
    out["client_share"] = client_share(runs)
    out["work_folder_peak"] = {"bytes": scratch, "bytes_per_voxel": scratch / voxels}
    out["per_tb"] = per_tb(out["modes"], out["scaling_efficiency"], out["client_share"])
    out["library"] = library_side_by_side(shape, particles, radius, seed, chunks, rounds)
    return out


def work_folder_peak(volume, target, chunks):
    """The most bytes on disk of a chunked run's work folder (``declump run`` on one worker, its folder walked
    every 0.1 s, :func:`gpu_pipeline.chunked.workspace.folder_bytes`): the scratch space a run of this volume needs."""
    from bench.chunked import run_argv

    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    out = target / "labels.zarr"
    argv = run_argv(volume, out, ["--chunks", ",".join(map(str, chunks)), "--workers", "1"])
    return _cli_run(argv, target, folder=f"{out}.work", interval=0.1)["folder_peak_bytes"]


def ram_folder(needed_bytes):
    """``/dev/shm`` where it is a writable RAM file system with ``needed_bytes`` free, else None."""
    shm = Path("/dev/shm")
    try:
        stat = os.statvfs(shm)
    except OSError:
        return None
    return shm if os.access(shm, os.W_OK) and stat.f_bavail * stat.f_frsize >= needed_bytes else None


def _pair_runs(volume, target, options, cores):
    """Two copies of the chunked command started together, each pinned to one of ``cores`` (the first two):
    their :func:`_cli_run` measurements (no worker sampling: the copies are single processes)."""
    from bench.chunked import run_argv, start_child

    keep = os.sched_getaffinity(0)
    load = os.getloadavg()
    procs = []
    try:
        for i, core in enumerate(cores[:2]):
            folder = Path(f"{target}_{i}")
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            os.sched_setaffinity(0, {core})  # the child inherits it
            procs.append((folder, start_child([str(folder / "report.json"),
                                               *run_argv(volume, folder / "labels.zarr", options)])))
    finally:
        os.sched_setaffinity(0, keep)
    out = []
    for folder, process in procs:
        _, stderr = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"the paired chunked run failed: {stderr[-1000:]}")
        out.append({**json.loads((folder / "report.json").read_text()), "load_before": load,
                    "load_after": os.getloadavg()})
    return out


def _timed_run(volume, target, out, options, cores):
    """``declump run VOLUME TARGET/OUT`` with bench.chunked's parameters and ``options``, in a fresh folder,
    pinned to ``cores`` (the child and its workers inherit them; the caller restores its own): what
    :func:`_cli_run` measures, with the load before and after."""
    from bench.chunked import run_argv

    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    os.sched_setaffinity(0, cores)
    load = os.getloadavg()
    measured = _cli_run(run_argv(volume, target / out, options), target)
    summary = target / f"{Path(out).stem}_summary.json"
    if Path(out).suffix == ".zarr" and summary.exists():  # the chunked run's own seconds, imports and opening aside
        measured["run_seconds"] = json.loads(summary.read_text())["seconds"]
    return {**measured, "load_before": load, "load_after": os.getloadavg()}


def warm_cluster_runs(volume, chunks, rounds, cores, small=None):
    """The chunked command on a running local cluster of 1 and of 2 worker processes (``--scheduler``).

    How a large job runs: the cluster is started once and its workers have
    imported the library and loaded its compiled kernels before the first
    chunk; the cold modes of :data:`CHUNKED_MODES` pay that start in every
    run, which on a small bench volume is a large share of the time. Each
    cluster (1 thread per worker, workers pinned to 1 or 2 cores with the
    scheduler and the command) does one untimed run first; the timed runs
    then alternate between the two clusters, round by round. Worker memory
    is not sampled here (the workers are not the command's children).
    ``small``: a corner of the volume, run after each timed run on the same
    cluster (``warm_1_small``, ``warm_2_small``: the command's start-up).
    """
    import dask
    from dask.distributed import Client, LocalCluster

    from gpu_pipeline.chunked.workspace import LOCAL_CLUSTER_HTTP, local_cluster_config

    clusters, clients, runs = {}, {}, {"warm_1": [], "warm_2": [], "warm_1_small": [], "warm_2_small": []}
    # Clusters started as README's cluster section says (glibc's malloc environment of malloc_environ, the
    # dashboard's timed diagnostics quiet), as `declump run --cluster local` starts its own.
    environ = local_cluster_config()
    try:
        for n in (1, 2):
            os.sched_setaffinity(0, set(cores[:n]))  # the worker processes inherit it
            with dask.config.set(environ):
                clusters[n] = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, memory_limit=0,
                                           **LOCAL_CLUSTER_HTTP)
            clients[n] = Client(clusters[n], set_as_default=False)  # idle during the runs: reads CPU times
        for r in range(rounds + 1):
            for n in (1, 2):
                options = ["--chunks", ",".join(map(str, chunks)), "--scheduler", clusters[n].scheduler_address]
                measured = _timed_cluster_run(clients[n], volume, f"warm_{n}", options, set(cores[:n]))
                if r == 0:
                    continue  # the warm-up: workers import and load the compiled kernels
                runs[f"warm_{n}"].append(measured)
                if small is not None:
                    runs[f"warm_{n}_small"].append(_timed_cluster_run(clients[n], small, f"warm_{n}", options,
                                                                      set(cores[:n])))
                print(f"warm_{n}     {measured['seconds']:.1f}s CPU {measured['cpu_seconds']:.1f}s (command only) "
                      f"load {measured['load_before'][0]:.1f}", flush=True)
    finally:
        os.sched_setaffinity(0, set(cores))
        log = logging.getLogger("distributed")
        level = log.level
        log.setLevel(logging.WARNING)  # no INFO lines of each worker's retirement
        for client in clients.values():
            client.close()
        for cluster in clusters.values():
            cluster.close()
        log.setLevel(level)
    return runs


def _timed_cluster_run(client, volume, mode, options, cores):
    """:func:`_timed_run` of the command on a running cluster whose scheduler runs in this process (``client``
    connected to it), with the scheduler's CPU seconds (this process's) and the workers' added: with the
    command's, they say how much of one core the client and the scheduler need per worker (:func:`client_share`)."""
    workers_before, scheduler_before = client.run(time.process_time), time.process_time()
    measured = _timed_run(volume, Path(volume).parent / mode, "labels.zarr", options, cores)
    measured["scheduler_cpu_seconds"] = time.process_time() - scheduler_before
    after = client.run(time.process_time)
    measured["worker_cpu_seconds"] = sum(after[w] - workers_before[w] for w in after)
    return measured


def client_share(runs):
    """The share of one core the client and the scheduler need per busy worker, or None: median over the
    2-worker runs on a running cluster of (the command's CPU s + the scheduler's) / the workers' CPU s, each net
    of the same run on the volume's one-chunk corner (``warm_2_small``; the command's interpreter start and
    imports, and each pass's fixed costs, cancel) where that was run."""
    def cpu(r):
        return r["cpu_seconds"] + r["scheduler_cpu_seconds"], r["worker_cpu_seconds"]

    shares = []
    big, small = runs.get("warm_2", []), runs.get("warm_2_small", [])
    for i, r in enumerate(big):
        if "worker_cpu_seconds" not in r:
            continue
        client, workers = cpu(r)
        if i < len(small) and "worker_cpu_seconds" in small[i]:
            corner_client, corner_workers = cpu(small[i])
            client, workers = client - corner_client, workers - corner_workers
        if workers > 0:
            shares.append(client / workers)
    return statistics.median(shares) if shares else None


def scaling_by_size(shapes, particles, radius, seed, chunks, rounds):
    """The chunked command's 1 -> 2 worker scaling for each volume, generated as the other modes' are: on a
    running cluster (:func:`warm_cluster_runs`), and with the cluster the command starts itself
    (:func:`own_cluster_runs`). What each pass's fixed costs (the client's steps between passes, the last tasks
    of a pass running on one worker) and the cluster's start and close weigh as the volume, and its chunks,
    grow."""
    import zarr

    keep = sorted(os.sched_getaffinity(0))
    rows = []
    for shape, n in zip(shapes, particles):
        image, _ = make_touching_particles(shape, n, radius_range=radius, overlap=0.15, seed=seed)
        with tempfile.TemporaryDirectory() as tmp:
            volume = Path(tmp) / "in.zarr"
            zarr.create_array(str(volume), shape=image.shape, dtype=image.dtype, chunks=chunks,
                              compressors=zarr.codecs.ZstdCodec(level=3))[...] = image
            del image
            runs = warm_cluster_runs(volume, chunks, rounds, keep)
            runs.update(own_cluster_runs(volume, chunks, rounds, keep))
        pairs = list(zip(runs["warm_1"], runs["warm_2"]))
        own = list(zip(runs["cluster_1"], runs["cluster_2"]))
        rows.append({"shape": list(shape), "particles": n, "chunks": list(chunks),
                     "blocks": int(np.prod([-(-a // c) for a, c in zip(shape, chunks)])), "runs": runs,
                     "efficiency": [one["seconds"] / (2 * two["seconds"]) for one, two in pairs],
                     "efficiency_run": [one["run_seconds"] / (2 * two["run_seconds"]) for one, two in pairs
                                        if "run_seconds" in one and "run_seconds" in two],
                     "own_cluster_efficiency": [one["seconds"] / (2 * two["seconds"]) for one, two in own]})
    return rows


def own_cluster_runs(volume, chunks, rounds, cores):
    """The chunked command starting its own local cluster of 1 and of 2 worker processes (``--cluster local``,
    the cold modes of :data:`CHUNKED_MODES`), alternating round by round: what one command of a user's sees,
    the cluster's start, the workers' imports and compiled kernels and the close included."""
    runs = {"cluster_1": [], "cluster_2": []}
    try:
        for _ in range(rounds):
            for mode, options, n in CHUNKED_MODES:
                if mode not in runs:
                    continue
                measured = _timed_run(volume, Path(volume).parent / mode, "labels.zarr",
                                      ["--chunks", ",".join(map(str, chunks)), *options], set(cores[:n]))
                runs[mode].append(measured)
                print(f"{mode:10s} {measured['seconds']:.1f}s CPU {measured['cpu_seconds']:.1f}s "
                      f"load {measured['load_before'][0]:.1f}", flush=True)
    finally:
        os.sched_setaffinity(0, set(cores))
    return runs


def scaling_markdown(rows):
    lines = ["## Scaling 1 -> 2 workers by volume size", "",
             "Each volume generated as above (spheres in proportion to the voxels), chunks "
             f"{'x'.join(map(str, rows[0]['chunks']))}; 1 worker pinned to 1 core, 2 workers to 2, with the "
             "scheduler and the command. **A running cluster** (`--scheduler`): started once per volume and "
             "warmed by one untimed run, runs alternating; 'run' is timed by the runs' own summaries (without the "
             "command's interpreter start, imports and store opening). **The command's own cluster** "
             "(`--cluster local --workers 1` and `2`): each run starts and closes its cluster, whose workers "
             "import the library and load the compiled kernels, runs alternating after the running cluster's. "
             "t1 / (2 t2) per round.", "",
             "| volume | blocks | running: 1 worker s | 2 workers s | t1 / (2 t2) | the same, run | "
             "own cluster: 1 worker s | 2 workers s | t1 / (2 t2) |", "|---|---|---|---|---|---|---|---|---|"]

    def secs(runs):
        return ', '.join(f'{x["seconds"]:.1f}' for x in runs) or "not run"

    def ratios(values):
        return f"**{', '.join(f'{x:.2f}' for x in values)}**" if values else "—"

    for r in rows:
        runs = r["runs"]
        lines.append(f"| {'x'.join(map(str, r['shape']))} | {r['blocks']} | {secs(runs['warm_1'])} | "
                     f"{secs(runs['warm_2'])} | {ratios(r['efficiency'])} | "
                     f"{', '.join(f'{x:.2f}' for x in r['efficiency_run'])} | {secs(runs.get('cluster_1', []))} | "
                     f"{secs(runs.get('cluster_2', []))} | {ratios(r.get('own_cluster_efficiency', []))} |")
    return lines + [""]


def _engine_run(kind, path, work, options, core, queue):
    """One timed run of engine ``kind`` ('separate' or 'separate_chunked') in this fresh process, set up as its
    command sets up its own (:func:`library_side_by_side`), after a warm-up on a 64-voxel corner."""
    import hashlib

    import dask
    import dask.array as da
    import dask.threaded
    import zarr

    from gpu_pipeline import separate
    from gpu_pipeline.chunked.pipeline import separate_chunked
    from gpu_pipeline.chunked.workspace import Workspace, no_hugepage_advice, run_malloc_setup

    os.sched_setaffinity(0, {core})
    if kind == "separate_chunked":
        run_malloc_setup()  # as run_chunked, before any I/O thread allocates
    else:
        no_hugepage_advice()  # as every declump command

    def run(volume, folder):
        if kind == "separate":
            return separate(volume[...], max_hole_size=0.0, min_size=None, reject_annotations=False, **options)
        shutil.rmtree(folder, ignore_errors=True)
        with dask.config.set(scheduler=dask.threaded.get, num_workers=1):
            labels, _ = separate_chunked(da.from_zarr(volume), workspace=Workspace(folder), **options)
            return labels.compute()

    try:
        volume = zarr.open_array(str(path), mode="r")
        corner = tuple(slice(0, 64) for _ in volume.shape)
        small = Path(work) / "corner.zarr"
        zarr.create_array(str(small), shape=volume[corner].shape, dtype=volume.dtype,
                          chunks=volume[corner].shape, overwrite=True)[...] = volume[corner]
        run(zarr.open_array(str(small), mode="r"), Path(work) / "corner")
        load = os.getloadavg()
        start, cpu = time.perf_counter(), time.process_time()
        labels = run(volume, Path(work) / "work")
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        queue.put({"seconds": seconds, "cpu_seconds": cpu, "load_before": load, "load_after": os.getloadavg(),
                   "labels_sha256": hashlib.sha256(np.ascontiguousarray(labels).tobytes()).hexdigest()})
    except Exception as exc:
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def library_side_by_side(shape, particles, radius, seed, chunks, rounds):
    """``separate`` against ``separate_chunked`` on one core, interleaved, same labels.

    The engines alone, without the command line's reading, writing and
    process start: the chunked run reads the Zarr volume and stages its
    passes in a scratch folder, the in-memory one reads the whole volume.
    Each run is a fresh process pinned to one core, set up as its command
    sets up its own process: NumPy's huge-page advice off for both (every
    ``declump`` command; with it, the in-memory engine's large temporaries
    stall on memory compaction), and glibc's malloc settings of
    ``run_malloc_setup`` for the chunked one (``run_chunked`` applies them
    to its process; in one process shared with the in-memory engine, which
    runs without them, the chunked engine took 1.45x its time on
    2026-12-06 against 1.14x for the commands). Each run first warms up on
    a 64-voxel corner (imports, compiled kernels). The labels of every run
    are checked byte-identical (their SHA-256).
    """
    import zarr

    image, _ = make_touching_particles(shape, particles, radius_range=radius, overlap=0.15, seed=seed)
    options = dict(spacing=(1.0,) * len(shape), sigma=1.0, min_distance=4.0, max_radius=13.0, threshold="otsu")
    core = min(os.sched_getaffinity(0))
    rows = {"separate": [], "separate_chunked": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "in.zarr"
        zarr.create_array(str(path), shape=image.shape, dtype=image.dtype, chunks=chunks,
                          compressors=zarr.codecs.ZstdCodec(level=3))[...] = image
        del image
        digests = set()
        for _ in range(rounds):
            for name in rows:
                work = Path(tmp) / name
                work.mkdir(exist_ok=True)
                info = in_fresh_process(_engine_run, name, str(path), str(work), options, core)
                if "error" in info:
                    raise RuntimeError(f"{name} failed: {info['error']}")
                digests.add(info.pop("labels_sha256"))
                if len(digests) > 1:
                    raise RuntimeError("separate and separate_chunked disagree; the comparison would be void")
                rows[name].append(info)
                print(f"{name:17s} {info['seconds']:.2f}s CPU {info['cpu_seconds']:.2f}s "
                      f"load {info['load_before'][0]:.1f}", flush=True)
    return {"runs": rows,
            "wall_ratio": [c["seconds"] / m["seconds"] for m, c in zip(rows["separate"], rows["separate_chunked"])],
            "cpu_ratio": [c["cpu_seconds"] / m["cpu_seconds"]
                          for m, c in zip(rows["separate"], rows["separate_chunked"])]}


def per_tb(modes, efficiency, share=None, node_cores=(2, 16)):
    """Projected hours per TB of uint8 volume per node, from the measured one-core rates (a projection).

    ``share`` (:func:`client_share`): with it, the chunked rows also give the hours when no more workers run
    than one core for the client and the scheduler keeps busy (``1 / share``), linear up to there."""
    rows = []
    eff = statistics.median(efficiency) if efficiency else None
    bound = 1.0 / share if share else None
    for mode in ("chunked", "in_memory"):
        if mode not in modes:
            continue
        rate = modes[mode]["mvox_per_s"] * 1e6  # one core
        for cores in node_cores:
            chunked = mode == "chunked"
            rows.append({"mode": mode, "node_cores": cores, "mvox_per_s_per_core": rate / 1e6,
                         "hours_linear": VOXELS_PER_TB / (rate * cores) / 3600,
                         "hours_at_measured_efficiency": (VOXELS_PER_TB / (rate * cores * eff) / 3600
                                                          if eff and chunked else None),
                         "hours_client_bound": (VOXELS_PER_TB / (rate * min(cores, bound)) / 3600
                                                if bound and chunked else None)})
    return {"efficiency_used": eff, "client_share": share, "workers_until_client_bound": bound, "rows": rows}


def projection(row, threads=1):
    """Hours per TB of uint8 volume per node from an in-memory MVox/s on ``threads`` threads, per core and per 16."""
    rate = row["mvox_per_s"] * 1e6 / threads
    return {"mvox_per_s_per_thread": rate / 1e6, "hours_per_tb_one_core": VOXELS_PER_TB / rate / 3600,
            "hours_per_tb_16_core_node": VOXELS_PER_TB / rate / 3600 / 16,
            "inputs": "in-memory end-to-end rate of one run pinned to one core, divided over the "
                      "cores of a node assuming linear scaling (the chunked run's scaling is measured by "
                      "bench.chunked)"}


def markdown(result):
    m = result["machine"]
    lines = [f"# Throughput side by side, {m['date'][:10]}", "",
             f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, {m['memory_gib']} GiB, GPU: {m['gpu'] or 'none'}. "
             f"1-minute load from {result['load_range'][0]:.1f} to {result['load_range'][1]:.1f} before the runs "
             "(per run in the JSON; it counts this bench's own processes, the two-process modes included, so it "
             "does not say whether other jobs shared the machine). Absolute times move with the machine's speed; "
             "the interleaved ratios are the comparable figures. Each run in a fresh process pinned "
             "to one core, after a warm-up on a 64-voxel crop; methods interleaved per round.", ""]
    for case in result["cases"]:
        lines += [f"## {'x'.join(map(str, case['shape']))}, {case['particles']} spheres, radius "
                  f"{case['radius'][0]}-{case['radius'][1]}, seed {case['seed']}", "",
                  "| method | F1@0.5 | mean F1 | s (median, min-max) | MVox/s | peak RSS GiB |", "|---|---|---|---|---|---|"]
        for name, r in case["methods"].items():
            if "error" in r:
                lines.append(f"| {name} | — | — | {r['error']} | | |")
                continue
            s = r["seconds"]
            lines.append(f"| {name} | {r['f1_50']:.3f} | {r['mean_f1']:.3f} | {s['median']:.1f} ({s['min']:.1f}-"
                         f"{s['max']:.1f}, {s['runs']} runs) | {r['mvox_per_s']:.2f} | {r['peak_rss_gib']:.2f} |")
        for key, what in (("watershed_over_declump_time", "declump time"),
                          ("watershed_over_declump_defaults_time", "the time of declump at its defaults")):
            ratio = case.get(key)
            if ratio:
                lines += ["", f"Watershed time / {what}: **{ratio['median']:.2f}x** (per round: "
                          + ", ".join(f"{x:.2f}" for x in ratio["per_round"]) + ")."]
        if case.get("projection"):
            pr = case["projection"]
            lines += [f"Projected from declump's in-memory rate ({pr['mvox_per_s_per_thread']:.2f} MVox/s per thread): "
                      f"{pr['hours_per_tb_one_core']:.0f} h per TB of uint8 on one core, "
                      f"{pr['hours_per_tb_16_core_node']:.0f} h on a 16-core node ({pr['inputs']})."]
        lines.append("")
    c = result.get("chunked")
    if c and "modes" in c:
        lines += chunked_markdown(c)
    if result.get("scaling"):
        lines += scaling_markdown(result["scaling"])
    return "\n".join(lines)


def chunked_markdown(c):
    loads = [r["load_before"][0] for rows in c["runs"].values() for r in rows]
    lines = [f"## `declump run` on one Zarr volume {'x'.join(map(str, c['shape']))}, chunks "
             f"{'x'.join(map(str, c['chunks']))}: in memory, chunked, 1 -> 2 workers", "",
             f"Parameters {' '.join(c['params'])}"
             + (f" (in memory also {' '.join(c['in_memory_options'])}: what the chunked run fixes, so both write "
                "the same labels)" if c.get("in_memory_options") else "")
             + "; each run a fresh process pinned to its cores, modes interleaved "
             f"per round; 1-minute load before the runs {min(loads):.1f}-{max(loads):.1f} (this bench's own "
             "processes included).", "",
             "| mode | s (median, min-max) | CPU s (median) | MVox/s | MVox/s per core | peak RSS GiB (main process) | "
             "peak RSS GiB per worker process |", "|---|---|---|---|---|---|---|"]
    for mode, row in c["modes"].items():
        worker = row["worker_peak_rss_gib"]
        lines.append(f"| {MODE_TITLES[mode]} | {row['seconds']:.1f} ({row['min']:.1f}-{row['max']:.1f}, "
                     f"{row['runs']} runs) | {row['cpu_seconds']:.1f} | {row['mvox_per_s']:.2f} | {row['mvox_per_s'] / row['cores']:.2f} | "
                     f"{row['peak_rss_gib']:.2f} | {'(one process)' if worker is None else f'{worker:.2f}'} |")
    lines += ["| GPU, in memory and chunked | not run (no GPU lent) | | | | | |", ""]
    lines.append("Chunked time / in-memory time per voxel per thread (one core each): wall **"
                 + ", ".join(f"{x:.2f}" for x in c["chunked_over_in_memory"]) + "**, CPU **"
                 + ", ".join(f"{x:.2f}" for x in c["chunked_over_in_memory_cpu"]) + "** (per round; CPU seconds "
                 "of the process and its workers, less distorted than wall time when other jobs share the core).")
    if c.get("chunked_tmpfs_over_in_memory"):
        lines.append("The same with the chunked run's work folder on a RAM file system (`--scratch /dev/shm/...`; its "
                     "staged stores, 4 bytes per voxel of smoothed volume at the most, never reach this machine's "
                     "disk; the output still does): **"
                     + ", ".join(f"{x:.2f}" for x in c["chunked_tmpfs_over_in_memory"]) + "** (per round).")
    if c.get("machine_ceiling"):
        lines.append("This machine's own ceiling for 1 -> 2 scaling: two independent one-core chunked runs started "
                     "together, one per core, t_alone / t_together: **"
                     + ", ".join(f"{x:.2f}" for x in c["machine_ceiling"]) + "** (per round; 1.0 on an ideal "
                     "machine; the cores share caches, memory bandwidth, the disk and the hypervisor).")
    if c["scaling_efficiency"]:
        lines.append("Scaling 1 -> 2 workers (local cluster of processes, 1 core per worker), t1 / (2 t2): **"
                     + ", ".join(f"{x:.2f}" for x in c["scaling_efficiency"]) + "** (per round; the scheduler "
                     "and the command share the two cores with the workers: not a node's figure with a core to "
                     "spare).")
    if c.get("threads_scaling_efficiency"):
        lines.append("Scaling 1 -> 2 threads of one process (the default engine, `--workers 2`; their tasks hold "
                     "the GIL only between compiled kernels), t1 / (2 t2): **"
                     + ", ".join(f"{x:.2f}" for x in c["threads_scaling_efficiency"]) + "** (per round).")
    if c.get("warm_scaling_efficiency"):
        lines.append("Scaling 1 -> 2 workers on a running cluster (started once, workers warmed by one untimed run, "
                     "the command given `--scheduler`; how a long job runs), t1 / (2 t2): **"
                     + ", ".join(f"{x:.2f}" for x in c["warm_scaling_efficiency"]) + "** (per round).")
    if c.get("warm_scaling_efficiency_run"):
        runs = c["runs"]
        lines.append("The same runs timed by their own summaries (`seconds`: from the first pass to the last file "
                     "written, without the command's interpreter start, imports and store opening, which do not "
                     "shrink with workers; 1 worker "
                     + ", ".join(f"{r['run_seconds']:.1f}" for r in runs["warm_1"]) + " s, 2 workers "
                     + ", ".join(f"{r['run_seconds']:.1f}" for r in runs["warm_2"]) + " s): **"
                     + ", ".join(f"{x:.2f}" for x in c["warm_scaling_efficiency_run"]) + "** (per round).")
    if c.get("net_chunked_over_in_memory"):
        net = c["net_seconds"]
        side = round(c["start_up_voxels"] ** (1 / len(c["shape"])))
        lines.append(f"**Per voxel, net of each command's start-up** (every mode also ran a {side}-voxel corner "
                     "of the volume, one chunk, right after the volume; t - t_corner is the time the voxels "
                     "between them took: imports, compiled kernels' loading and each pass's and output's fixed "
                     "costs cancel, per-chunk costs do not; in memory "
                     + ", ".join(f"{x:.1f}" for x in net["in_memory"]) + " s, chunked "
                     + ", ".join(f"{x:.1f}" for x in net["chunked"]) + " s): chunked / in memory **"
                     + ", ".join(f"{x:.2f}" for x in c["net_chunked_over_in_memory"]) + "**; scaling 1 -> 2 "
                     "workers on a running cluster **"
                     + ", ".join(f"{x:.2f}" for x in c["net_warm_scaling_efficiency"]) + "** (per round; not "
                     "given for the clusters the command starts: starting them dominates the corner's run and "
                     "varies more than its work).")
    lib = c.get("library")
    if lib:
        med = {k: statistics.median(r["seconds"] for r in v) for k, v in lib["runs"].items()}
        lines.append("The engines alone, each run a fresh process on one core set up as its command sets up its "
                     "own (the chunked one with `run_malloc_setup`'s malloc settings), interleaved (`separate` vs "
                     f"`separate_chunked`, byte-identical labels checked): {med['separate']:.2f} s vs {med['separate_chunked']:.2f} s "
                     "(medians); chunked / in memory wall **" + ", ".join(f"{x:.2f}" for x in lib["wall_ratio"])
                     + "**, CPU **" + ", ".join(f"{x:.2f}" for x in lib["cpu_ratio"]) + "** (per round).")
    scratch = c.get("work_folder_peak")
    if scratch:
        lines.append(f"Scratch space: the chunked run's work folder peaked at {scratch['bytes'] / 2**20:.0f} MiB on "
                     f"disk, **{scratch['bytes_per_voxel']:.2f} bytes per voxel** (one untimed run, its folder walked "
                     "every 0.1 s; almost all of it the smoothed volume, float32 stored uncompressed): about "
                     f"{scratch['bytes_per_voxel']:.1f} TB of `--scratch` per TB of uint8 volume.")
    t = c["per_tb"]
    lines += ["", "Projected hours per TB of uint8 EM volume (10^12 voxels) per node (a projection from the one-core "
              "rates above, not a measurement):", "",
              "| mode | node cores | measured MVox/s per core (whole runs, start-up included) | "
              "h per TB, linear scaling | "
              "h per TB at the measured 1 -> 2 efficiency | h per TB, linear up to the client's bound |",
              "|---|---|---|---|---|---|"]
    for row in t["rows"]:
        at, held = row["hours_at_measured_efficiency"], row.get("hours_client_bound")
        lines.append(f"| {row['mode'].replace('_', ' ')} | {row['node_cores']} | {row['mvox_per_s_per_core']:.2f} | "
                     f"{_hours(row['hours_linear'])} | {'—' if at is None else _hours(at)} | "
                     f"{'—' if held is None else _hours(held)} |")
    eff = "not measured" if t["efficiency_used"] is None else f"{t['efficiency_used']:.2f}"
    share = t.get("client_share")
    held = ("not measured" if share is None else
            f"the client and the scheduler spent {share:.3f} CPU s per CPU s of the workers on the running "
            f"2-worker cluster, net of the one-chunk corner's run, so their one process keeps about "
            f"{1 / share:.0f} workers busy")
    lines += ["| GPU | — | not run by this bench (`bench/gpu_check.py` on a GPU machine) | | | |", "",
              "Inputs: hours = 10^12 / (one-core MVox/s x cores [x efficiency]) / 3600; the efficiency "
              f"({eff}) is "
              "measured from 1 to 2 workers and assumed to hold up to the node's cores; the last column counts at "
              f"most the workers the client's process keeps busy ({held}; an extrapolation, "
              "`bench.pass_timeline`); the in-memory rows are the per-voxel ceiling (a terabyte does not fit in "
              "memory). The rates are whole runs' (start-up included), so on a small volume, where the start-up "
              "is a large share of the run, the hours are an upper bound: the per-voxel figures net of start-up "
              "are above.", ""]
    return lines


def _hours(value):
    """Hours to 3 figures at most (1.38 h printed as 1 h before)."""
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", action="append", type=shape_arg,
                        help="volume shape, e.g. 256,256,256 (repeat for several; default 256^3)")
    parser.add_argument("--particles", action="append", type=positive_int,
                        help="spheres per volume (one per --shape; default 1500 per 256^3)")
    parser.add_argument("--radius", type=radius_range_arg, default=(5.0, 12.0),
                        help="sphere radius range LOW,HIGH (default 5,12)")
    parser.add_argument("--seed", type=int, default=7, help="generator seed (default %(default)s)")
    parser.add_argument("--rounds", type=positive_int, default=2, help="interleaved rounds (default %(default)s)")
    parser.add_argument("--methods", default="declump,watershed,snow",
                        help="comma-separated subset of: " + ", ".join(SHORT) + " (default %(default)s; "
                        "declump-defaults: declump given only sigma and min_distance, as a new user runs it); "
                        "'none' with --chunked runs only that part")
    parser.add_argument("--chunked", type=chunks_arg, default=None, metavar="CHUNKS",
                        help="also time `declump run` chunked (these chunks) against in memory on the first shape")
    parser.add_argument("--scaling", type=chunks_arg, default=None, metavar="CHUNKS",
                        help="also time the chunked run's 1 -> 2 worker scaling on a running cluster for every "
                             "--shape (these chunks)")
    parser.add_argument("--out", default=None, help=out_help("throughput"))
    args = parser.parse_args(argv)
    shapes = args.shape or [(256, 256, 256)]
    particles = args.particles or [int(round(1500 * np.prod(s) / 256**3)) for s in shapes]
    unknown = [m.strip() for m in args.methods.split(",") if m.strip() not in SHORT] if args.methods != "none" else []
    if unknown:
        parser.error(f"--methods: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(SHORT)} (or none)")
    if args.methods == "none" and not (args.chunked or args.scaling):
        parser.error("--methods none runs nothing without --chunked or --scaling")
    if len(particles) != len(shapes):
        parser.error(f"{len(shapes)} --shape but {len(particles)} --particles; give one --particles per --shape")
    for option, chunks, on in (("--chunked", args.chunked, shapes[:1]), ("--scaling", args.scaling, shapes)):
        if chunks is not None and any(len(chunks) != len(shape) for shape in on):
            parser.error(f"{option} {','.join(map(str, chunks))} needs one length per axis of "
                         f"{'the first --shape' if option == '--chunked' else 'every --shape'}")
    methods = () if args.methods == "none" else tuple(SHORT[m.strip()] for m in args.methods.split(","))
    result = {"machine": machine_info(), "cases": []}
    for shape, n in zip(shapes, particles) if methods else ():
        case = side_by_side(shape, n, args.radius, args.seed, args.rounds, methods)
        if "error" not in case["methods"].get(DECLUMP, {"error": 1}):
            case["projection"] = projection(case["methods"][DECLUMP])
        result["cases"].append(case)
    if args.chunked:
        result["chunked"] = chunked_vs_in_memory(shapes[0], particles[0], args.radius, args.seed, args.chunked,
                                                 args.rounds)
    if args.scaling:
        result["scaling"] = scaling_by_size(shapes, particles, args.radius, args.seed, args.scaling, args.rounds)
    loads = [x[0] for c in result["cases"] for r in c["methods"].values() for x in r.get("load_averages", [])]
    loads += [r["load_before"][0] for rows in result.get("chunked", {}).get("runs", {}).values() for r in rows]
    loads += [r["load_before"][0] for row in result.get("scaling", []) for rows in row["runs"].values() for r in rows]
    result["load_range"] = [min(loads), max(loads)] if loads else [0.0, 0.0]
    stem = write_results(result, "throughput", markdown(result), args.out)
    print(f"wrote {RESULTS / stem}.json and .md")
    return result


if __name__ == "__main__":
    main()
