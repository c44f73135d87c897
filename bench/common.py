"""What every benchmark records: machine, versions, timing with warm-up and spread."""
from __future__ import annotations

import datetime as dt
import importlib.metadata as md
import json
import os
import platform
import queue
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
#: The real images with ground truth: ``shared/data`` beside the checkout, or where DECLUMP_SHARED_DATA says.
SHARED = Path(os.environ.get("DECLUMP_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
PACKAGES = ("numpy", "scipy", "scikit-image", "scikit-learn", "numba", "dask", "dask-image", "pyclesperanto",
            "cupy-cuda12x", "cupy-cuda13x", "cucim-cu12", "cucim-cu13")


def in_fresh_process(target, *args):
    """``target(*args, results)`` in a fresh (spawned) process, where ``results`` is a queue on which it puts one
    dict; returns that dict, or ``{"error": ...}`` where the process ended without one (killed by the system,
    a crash in compiled code) instead of waiting for it forever."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, results))
    proc.start()
    info = None
    while info is None:
        try:
            info = results.get(timeout=5)
        except queue.Empty:
            if not proc.is_alive():
                info = {"error": f"the process ended with exit code {proc.exitcode} and no result"}
    proc.join()
    return info


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_info():
    """Name and memory of the first CUDA device, or None without one."""
    from gpu_pipeline._backend import gpu_available

    if not gpu_available():
        return None
    import cupy as cp

    props = cp.cuda.runtime.getDeviceProperties(0)
    return {"name": props["name"].decode(), "memory_gib": round(props["totalGlobalMem"] / 2**30, 1)}


def machine_info():
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    total_mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
            "cpu": cpu_model(), "cpu_count": len(os.sched_getaffinity(0)), "memory_gib": round(total_mem, 1),
            "gpu": gpu_info(), "python": platform.python_version(), "versions": versions}


def timed(fn, repeats, warm_up=True, sync=None):
    """Run ``fn`` (after a warm-up run) ``repeats`` times: last result, list of seconds."""
    if warm_up:
        fn()
    times, out = [], None
    for _ in range(repeats):
        if sync:
            sync()
        t0 = time.perf_counter()
        out = fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return out, times


def spread(times):
    """Median and (min, max) of a list of seconds."""
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "runs": len(times)}


def write_results(result, name, markdown_text, stem=None):
    """Write ``RESULTS/STEM.json`` and ``.md``; ``STEM`` defaults to ``NAME_DATE`` (the run's date). Returns STEM."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = stem or f"{name}_{result['machine']['date'][:10]}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown_text)
    return stem
