"""Bytes per voxel of each pipeline stage, and the chunked run's peak memory against its chunk size.

    python -m bench.memory [--size 128] [--chunked-sizes 192,384] [--whole 512,512,512] [--library PATH] [--out NAME]

Stages: the steps of `gpu_pipeline.pipeline.separate` one by one
(:func:`stage_steps`), each measured as the memory it allocates on top of
what it was handed: on the CPU the peak of Python's tracemalloc (NumPy
arrays; scikit-image's C++ buffers are not traced) and the rise
of the resident high-water mark (VmHWM, reset before each stage through
/proc/self/clear_refs; it sees every allocation, and misses memory that
glibc reuses), the larger of the two per voxel; on a GPU (`bench/gpu_check.py`)
the growth of CuPy's pool over the stage, emptied before it. The distance
transform and the equal-value labelling have two rows each: the CPU
primitive (compiled transform, scikit-image) and the array-module algorithm that the GPU
runs (`gpu_pipeline/array_algorithms.py`), here on NumPy.

Chunked: `declump run in.zarr out.zarr --workers 1` in fresh processes on
volumes of different sizes with the same chunks; the peak resident memory
should follow the chunk size, not the volume.

Whole runs (``--whole``): one in-memory `separate` of a generated volume in
a fresh process (the volume saved beforehand, so generating it does not
count), its peak resident memory (VmHWM, interpreter and libraries
included) and the resident size after loading the input; ``--library`` runs
the pipeline of another checkout (e.g. an older commit) to compare.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

from bench.common import (RESULTS, machine_info, nonnegative_int, out_help, positive_int, shape_arg,
                          size_list_arg, write_results)
from bench.stages import particles_for

HERE = Path(__file__).resolve().parent


def stage_steps(*, spacing, sigma=1.0, min_distance=4.0, neck_ratio="auto", nearby_ratio="auto",
                peak_reach="auto", reach_share="auto", ball_share="auto", both_variants=True):
    """The pipeline's steps as (name, step) pairs; each step reads and extends a ``state`` dict.

    The same sequence as `separate` (k-means method, power assignment), with
    its defaults for the neck, nearby, reach, reach-share and ball-share ratios ("auto": resolved per
    dimension by `resolve_ratio`). With ``both_variants`` the distance transform and the equal-value
    labelling also run as the GPU's array-module algorithms on whatever
    array module holds the data.
    """
    from gpu_pipeline._backend import ops_for
    from gpu_pipeline.array_algorithms import distance_transform_edt, label_by_value_propagation
    from gpu_pipeline.pipeline import cap_distance, group_step, peaks_step, rescue_step, resolve_ratio
    from gpu_pipeline.stages.cleanup import clean_mask
    from gpu_pipeline.stages.peaks import quantize_distance
    from gpu_pipeline.stages.split import finish_labels, split_regions_kmeans
    from gpu_pipeline.stages.threshold import choose_polarity, foreground, otsu_threshold

    ndim = len(spacing)
    neck_ratio, nearby_ratio, peak_reach, reach_share, ball_share = (
        resolve_ratio(name, value, ndim) for name, value in (("neck_ratio", neck_ratio), ("nearby_ratio", nearby_ratio),
                                                             ("peak_reach", peak_reach), ("reach_share", reach_share),
                                                             ("ball_share", ball_share)))
    min_size = math.pi * min_distance ** 3 / 6 if ndim == 3 else math.pi * min_distance ** 2 / 4

    def smoothing(s):
        s["smoothed"] = ops_for(s["image"]).gaussian(s["image"], tuple(sigma / v for v in spacing))

    def threshold(s):
        t = otsu_threshold(s["smoothed"])
        s["fg"] = foreground(s["smoothed"], t, choose_polarity(s["smoothed"], t, "auto"))
        del s["smoothed"]

    def cleanup(s):
        s["fg"] = clean_mask(s["fg"], spacing=spacing, min_size=min_size, max_hole_size=0)

    def distance_primitive(s):
        s["distance"] = cap_distance(ops_for(s["fg"]).distance_transform(s["fg"], spacing), None, spacing)

    def distance_array_module(s):
        s["distance_xp"] = distance_transform_edt(s["fg"], spacing)
        del s["distance_xp"]

    def peaks(s):
        s["distance_q"], s["quantum"] = quantize_distance(s["distance"], spacing)
        del s["distance"]
        s["peaks"], s["overlooked"] = peaks_step(s["distance_q"], spacing=spacing, min_distance=min_distance,
                                                 reach=peak_reach, reach_share=reach_share)

    def regions(s):
        s["regions"], s["n_regions"] = ops_for(s["fg"]).label(s["fg"])

    def necks(s):
        s["peaks"] = rescue_step(s["peaks"], s.pop("overlooked"), s["distance_q"], s["regions"], spacing=spacing,
                                 reach_share=reach_share)
        s["peaks"], s["group"] = group_step(s["peaks"], s["distance_q"], s["regions"], spacing=spacing,
                                            neck_ratio=neck_ratio, nearby_ratio=nearby_ratio, ball_share=ball_share,
                                            max_radius=None)

    def kmeans(s):
        xp = type(s["distance_q"]).__module__.split(".")[0] == "cupy" and __import__("cupy") or np
        radii = s["distance_q"][tuple(s["peaks"].T)].astype(xp.float64) * s["quantum"]
        s["labels"], _ = split_regions_kmeans(s["regions"], s["n_regions"], s["peaks"], radii, spacing=spacing,
                                              assignment="power", engine="batched", max_iter=0,
                                              peak_group=s["group"])
        for key in ("distance_q", "regions", "fg"):
            del s[key]

    def label_by_value_primitive(s):
        s["pieces"] = ops_for(s["labels"]).label_by_value(s["labels"])
        del s["pieces"]

    def label_by_value_array_module(s):
        s["pieces"] = label_by_value_propagation(s["labels"], ops_for(s["labels"]).scatter_min)
        del s["pieces"]

    def finish(s):
        s["final"] = finish_labels(s["labels"])

    steps = [("smoothing", smoothing), ("threshold", threshold), ("cleanup", cleanup),
             ("distance_transform", distance_primitive)]
    if both_variants:
        steps.append(("distance_transform [array module]", distance_array_module))
    steps += [("peaks", peaks), ("regions", regions), ("necks", necks), ("kmeans", kmeans)]
    if both_variants:
        steps += [("label_by_value", label_by_value_primitive),
                  ("label_by_value [array module]", label_by_value_array_module)]
    steps.append(("finish", finish))
    return steps


def _rss_bytes(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_high_water():
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_cpu_stages(image, spacing):
    """Per step: seconds, tracemalloc peak and VmHWM rise over the step's start, in bytes and bytes/voxel."""
    warm, _ = __import__("gpu_pipeline.synthetic", fromlist=["x"]).make_touching_particles((32,) * 3, 12, seed=1)
    warm_state = {"image": warm}
    for _, step in stage_steps(spacing=spacing):  # imports and first-call caches, outside the measurement
        step(warm_state)
    state = {"image": image}
    rows = []
    for name, step in stage_steps(spacing=spacing):
        rss_before = _rss_bytes("VmRSS")
        hwm_ok = _reset_high_water()
        tracemalloc.start()
        t0 = time.perf_counter()
        step(state)
        seconds = time.perf_counter() - t0
        _, traced_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rss_rise = max(0, _rss_bytes("VmHWM") - rss_before) if hwm_ok else None
        peak = max(traced_peak, rss_rise or 0)
        rows.append({"stage": name, "seconds": round(seconds, 3), "tracemalloc_peak_bytes": traced_peak,
                     "rss_rise_bytes": rss_rise, "bytes_per_voxel": round(peak / image.size, 2)})
        print(f"  {name}: {peak / image.size:.1f} B/voxel (tracemalloc {traced_peak / image.size:.1f}, "
              f"RSS rise {'-' if rss_rise is None else f'{rss_rise / image.size:.1f}'}), {seconds:.2f} s", flush=True)
    return rows


# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across exec, so a child would report the
# parent's resident size at fork (this bench's generated volume) when that was larger.
PRINT_PEAK = ("print('PEAK', next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') "
              "if l.startswith('VmHWM:')))")
def chunked_peak(size, chunk, workdir):
    """Peak RSS of `declump run` on a generated (size/2, size, size) Zarr volume stored in cubic chunks and run in
    blocks of the same shape (``--chunks``: the run's own choice groups small chunks into larger blocks), own
    process. The store is kept per size and chunk (keyed by size alone, a second chunk shape reused the first's)."""
    import zarr

    from gpu_pipeline.synthetic import make_touching_particles

    shape = (size // 2, size, size)
    store = workdir / f"in_{size}_c{chunk}.zarr"
    if not store.exists():
        image, _ = make_touching_particles(shape, particles_for(size) // 2, radius_range=(5, 12), overlap=0.15,
                                           seed=size)
        zarr.create_array(str(store), shape=shape, dtype=image.dtype, chunks=(chunk,) * 3)[...] = image
        del image
    out = workdir / f"out_{size}.zarr"
    code = "import sys; from gpu_pipeline.cli import main; rc = main(sys.argv[1:]); " + PRINT_PEAK + "; sys.exit(rc)"
    cmd = [sys.executable, "-c", code, "run", str(store), str(out), "--workers", "1", "--device", "cpu",
           "--chunks", ",".join([str(chunk)] * 3), "--max-radius", "13", "--overwrite", "--quiet"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
    peak = int(next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("PEAK")))
    n = int(np.prod(shape))
    return {"shape": list(shape), "chunks": [chunk] * 3, "voxels": n, "peak_rss_bytes": peak,
            "seconds": round(time.perf_counter() - t0, 1)}


#: A whole in-memory run in a fresh process: the throughput bench's parameters (no hole filling).
WHOLE_RUN = """
import json, sys, time
import numpy as np
def hwm():
    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM:'))
image = np.load(sys.argv[1])
loaded = hwm()
from cpu_fallback import separate
t0 = time.perf_counter()
labels = separate(image, sigma=1.0, min_distance=4, min_size=65, polarity='bright', max_hole_size=0.0)
print(json.dumps({'seconds': time.perf_counter() - t0, 'peak_rss_bytes': hwm(), 'rss_after_input_bytes': loaded,
                  'n_particles': int(labels.max())}))
"""


def whole_run_peak(shape, workdir, library=None):
    """Peak RSS of one in-memory `separate` on a generated volume of ``shape`` (1500 spheres per 256^3), own process."""
    from gpu_pipeline.synthetic import make_touching_particles

    path = workdir / f"whole_{'x'.join(map(str, shape))}.npy"
    if not path.exists():
        n = int(round(1500 * np.prod(shape) / 256**3))
        np.save(path, make_touching_particles(shape, n, radius_range=(5, 12), overlap=0.15, seed=int(shape[0]))[0])
    root = Path(library).resolve() if library else HERE.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1",
           "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", WHOLE_RUN, str(path)], capture_output=True, text=True, cwd=root,
                          env=env)
    if done.returncode != 0:
        raise RuntimeError(f"whole run of {shape} failed: {done.stderr[-1000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    return {"shape": list(shape), "voxels": int(np.prod(shape)), "library": str(root), **row,
            "load_average": [round(v, 2) for v in os.getloadavg()]}


def markdown(result):
    m = result["machine"]
    lines = [f"# declump memory per stage: {m['cpu']} ({m['cpu_count']} cores, {m['memory_gib']} GiB), "
             f"GPU: {m['gpu'] or 'none'}, {m['date']}", "",
             f"Load average at start {result['load_average_start']}, at end {result['load_average_end']} "
             "(a shared machine: other jobs ran beside this one; memory figures do not depend on load, times do)."]
    if result["stages"]:
        lines += ["", f"In memory, {result['size']}^3 generated spheres, spacing 1: memory a stage allocates beyond "
                  "what it is handed (the larger of tracemalloc's peak and the VmHWM rise), per voxel of the volume.",
                  "", "| stage | bytes/voxel | tracemalloc B/voxel | RSS rise B/voxel | seconds |", "|---|---|---|---|---|"]
    n = result["size"] ** 3
    for r in result["stages"]:
        rss = "-" if r["rss_rise_bytes"] is None else f"{r['rss_rise_bytes'] / n:.1f}"
        lines.append(f"| {r['stage']} | {r['bytes_per_voxel']:.1f} | {r['tracemalloc_peak_bytes'] / n:.1f} | {rss} "
                     f"| {r['seconds']:.2f} |")
    if result.get("whole"):
        lines += ["", "Whole in-memory runs (`separate`, sigma 1, min_distance 4, min_size 65, no hole filling; "
                  "generated spheres radius 5-12), each in its own process; the input is loaded before the run starts:",
                  "", "| volume | code | peak RSS (VmHWM) | RSS after input | peak bytes/voxel | s | load |",
                  "|---|---|---|---|---|---|---|"]
        for r in result["whole"]:
            lines.append(f"| {'x'.join(map(str, r['shape']))} | {r['library']} | {r['peak_rss_bytes'] / 2**30:.2f} GiB "
                         f"| {r['rss_after_input_bytes'] / 2**30:.2f} GiB | {r['peak_rss_bytes'] / r['voxels']:.1f} "
                         f"| {r['seconds']:.1f} | {r['load_average'][0]:.1f} |")
    if result.get("chunked"):
        lines += ["", "Chunked `declump run in.zarr out.zarr --workers 1 --max-radius 13`, each in its own process:",
                  "", "| volume | voxels | chunks | peak RSS (VmHWM) | seconds |", "|---|---|---|---|---|"]
        for r in result["chunked"]:
            lines.append(f"| {'x'.join(map(str, r['shape']))} | {r['voxels']} | {'x'.join(map(str, r['chunks']))} "
                         f"| {r['peak_rss_bytes'] / 2**30:.2f} GiB | {r['seconds']} |")
        if len(result["chunked"]) > 1:
            a, b = result["chunked"][0], result["chunked"][-1]
            ratio = b["peak_rss_bytes"] / a["peak_rss_bytes"]
            lines += ["", f"{b['voxels'] / a['voxels']:.0f}x the voxels, {ratio:.2f}x "
                          "the peak memory (both include the interpreter and its libraries)."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=nonnegative_int, default=128,
                        help="in-memory volume edge for the per-stage rows (default %(default)s; 0 skips them)")
    parser.add_argument("--chunked-sizes", type=size_list_arg, default="192,384",
                        help="chunked volume edges (volume size/2 x size x size; default %(default)s); '' skips")
    parser.add_argument("--chunk", type=positive_int, default=96, help="cubic chunk edge (default %(default)s)")
    parser.add_argument("--whole", action="append", type=shape_arg, default=[],
                        help="also one whole in-memory run of this shape, e.g. 512,512,512 (repeatable)")
    parser.add_argument("--library", action="append", default=None,
                        help="checkout whose pipeline the whole runs use (repeatable; default this one)")
    parser.add_argument("--out", default=None, help=out_help("memory"))
    args = parser.parse_args(argv)
    from gpu_pipeline.chunked.workspace import RUN_ARENAS, limit_malloc_arenas
    from gpu_pipeline.synthetic import make_touching_particles

    limit_malloc_arenas(RUN_ARENAS)  # as `declump run` sets it (run_malloc_setup)
    result = {"machine": machine_info(), "load_average_start": [round(v, 2) for v in os.getloadavg()],
              "size": args.size}
    result["stages"] = []
    if args.size:
        image, _ = make_touching_particles((args.size,) * 3, particles_for(args.size), radius_range=(5, 12),
                                           overlap=0.15, seed=args.size)
        print(f"stages on {args.size}^3:", flush=True)
        result["stages"] = measure_cpu_stages(image, (1.0, 1.0, 1.0))
        del image
    result["chunked"] = []
    work = HERE / "results" / "scratch" / "memory"
    work.mkdir(parents=True, exist_ok=True)
    result["whole"] = []
    for shape in args.whole:
        for library in args.library or [None]:
            row = whole_run_peak(shape, work, library)
            print(f"whole {shape} ({row['library']}): peak {row['peak_rss_bytes'] / 2**30:.2f} GiB in "
                  f"{row['seconds']:.1f} s", flush=True)
            result["whole"].append(row)
    for size in [int(s) for s in args.chunked_sizes.split(",") if s]:
        row = chunked_peak(size, args.chunk, work)
        print(f"chunked {row['shape']}: peak {row['peak_rss_bytes'] / 2**30:.2f} GiB in {row['seconds']} s",
              flush=True)
        result["chunked"].append(row)
    result["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    stem = write_results(result, "memory", markdown(result), args.out)
    print(f"wrote {RESULTS / stem}.json and .md")
    return result


if __name__ == "__main__":
    main()
