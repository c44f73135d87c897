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


def command_line():
    """The command that runs this bench, as typed (``python -m bench.NAME ARGS``): recorded in its results."""
    import shlex
    import sys

    module = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else "?"
    return " ".join(["python", "-m", f"bench.{module}", *map(shlex.quote, sys.argv[1:])])


def write_results(result, name, markdown_text, stem=None):
    """Write ``RESULTS/STEM.json`` and ``.md``; ``STEM`` defaults to ``NAME_DATE`` (the run's date); an absolute
    ``STEM`` writes there instead. Both record the command that made them (:func:`command_line`). Returns the
    path written, without its suffix."""
    stem = stem or f"{name}_{result['machine']['date'][:10]}"
    path = RESULTS / stem  # (an absolute stem replaces RESULTS)
    path.parent.mkdir(parents=True, exist_ok=True)
    command = command_line()
    result = {"command": command, **result}
    path.with_name(path.name + ".json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown_text.split("\n", 1)
    text = text[0] + f"\n\n`{command}`\n" + (("\n" + text[1].lstrip("\n")) if len(text) > 1 else "")
    path.with_name(path.name + ".md").write_text(text)
    return path


def out_help(name):
    """The help of a bench's ``--out`` that :func:`write_results` writes."""
    return f"result file stem under bench/results, or an absolute path without suffix (default {name}_<date>)"


def argument_type(convert, what):
    """An argparse ``type=`` from ``convert`` (text -> value, raising ValueError or TypeError where the text is
    no such value): argparse's one-line error naming ``what`` is accepted, not a traceback later."""
    import argparse

    def parse(text):
        try:
            return convert(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    return parse


def _whole_numbers(text, counts=None, least=1):
    """Comma-separated whole numbers of at least ``least``, as many as one of ``counts`` says (None: any)."""
    values = tuple(int(v) for v in text.split(","))
    if (counts is not None and len(values) not in counts) or min(values) < least:
        raise ValueError(text)
    return values


#: ``--rounds``, ``--size``, ``--repeats``: a whole number of at least 1.
positive_int = argument_type(lambda t: _whole_numbers(t, (1,))[0], "a whole number of at least 1")
#: ``--size`` where 0 skips a part: a whole number of at least 0.
nonnegative_int = argument_type(lambda t: _whole_numbers(t, (1,), least=0)[0], "a whole number of at least 0")
#: A comma-separated list of whole numbers of at least 1, or '' for none (kept as the text).
size_list_arg = argument_type(lambda t: t and ",".join(map(str, _whole_numbers(t))),
                              "whole numbers of at least 1, comma-separated, or '' for none")
#: ``--shape``: 2 or 3 whole numbers of at least 1, comma-separated.
shape_arg = argument_type(lambda t: _whole_numbers(t, (2, 3)), "2 or 3 whole numbers of at least 1 (e.g. 256,256,256)")
#: ``--chunks``, ``--blocks``: 2 or 3 whole numbers of at least 1, comma-separated.
chunks_arg = argument_type(lambda t: _whole_numbers(t, (2, 3)), "2 or 3 whole numbers of at least 1 (e.g. 128,128,128)")


def _radius_range(text):
    low, high = (float(v) for v in text.split(","))
    if not 0 < low <= high < float("inf"):
        raise ValueError(text)
    return low, high


#: ``--radius``: two numbers, 0 < low <= high.
radius_range_arg = argument_type(_radius_range, "two numbers LOW,HIGH with 0 < LOW <= HIGH (e.g. 5,12)")
