"""The steps of the prepared GPU check (`bench/gpu_check.sh`), one subcommand each.

    python -m bench.gpu_check results-path [--dry-run]
    python -m bench.gpu_check versions | parity | stages --size N | chunked --shape Z,Y,X [--cluster local-cuda]

Every step prints what it measures as it goes (the shell script appends
it to one results file, so a killed step leaves what it had printed) and
ends with a ``RESULT {json}`` line. ``--dry-run`` (or DECLUMP_GPU_CHECK_DRY_RUN=1,
which the script sets) rehearses the same code on the CPU: NumPy where CuPy
would be, a CPU LocalCluster where dask-cuda's would be, small sizes.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
#: Where the chunked step writes its Zarr volumes (not the project tree: several GB).
SCRATCH = Path(os.environ.get("DECLUMP_GPU_CHECK_SCRATCH", "/tmp/declump_gpu_check"))


def dry_run():
    return os.environ.get("DECLUMP_GPU_CHECK_DRY_RUN") == "1"


def emit(step, **values):
    print("RESULT " + json.dumps({"step": step, **values}, default=str), flush=True)


def device_name():
    if dry_run():
        return "cpu-rehearsal"
    try:
        import cupy as cp

        return cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    except Exception as exc:  # the file still gets a name, and the versions step says what failed
        return f"no-device-{type(exc).__name__}"


def cmd_results_path(args):
    name = re.sub(r"[^A-Za-z0-9.]+", "-", device_name()).strip("-")
    path = HERE / "results" / f"gpu_check_{name}_{dt.date.today().isoformat()}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(f"\n# declump GPU check on {device_name()}, started "
                     f"{dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}"
                     f"{' (CPU rehearsal: --dry-run, no GPU)' if dry_run() else ''}\n\n")
    print(path)


def spec_bandwidth(props):
    """Peak memory bandwidth (bytes/s) from the device properties, when the runtime still reports them."""
    clock_khz, bus_bits = props.get("memoryClockRate"), props.get("memoryBusWidth")
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8


def cmd_versions(args):
    import importlib.metadata as md

    from bench.common import machine_info

    info = machine_info()
    versions = {}
    for pkg in ("numpy", "scipy", "scikit-image", "scikit-learn", "numba", "dask", "distributed", "dask-cuda", "zarr",
                "cupy-cuda13x", "cupy-cuda12x", "cucim-cu13", "cucim-cu12", "cuml-cu13", "pytest"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    print(f"python {sys.version.split()[0]}, cpu {info['cpu']} x{info['cpu_count']}, {info['memory_gib']} GiB, "
          f"load {os.getloadavg()}")
    print("packages: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v))
    print("missing: " + ", ".join(k for k, v in versions.items() if not v))
    gpu = None
    if shutil.which("nvidia-smi"):
        print(subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip())
    if not dry_run():
        import cupy as cp

        from bench.stages import device_bandwidth
        from gpu_pipeline._backend import require_gpu

        props = cp.cuda.runtime.getDeviceProperties(0)
        gpu = {"name": props["name"].decode(), "memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
               "compute_capability": f"{props['major']}.{props['minor']}", "cupy": cp.__version__,
               "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(), "cuda_driver": cp.cuda.runtime.driverGetVersion(),
               "devices": cp.cuda.runtime.getDeviceCount(), "spec_bandwidth_gbs": None,
               "copy_bandwidth_gbs": round(device_bandwidth() / 1e9, 1)}
        spec = spec_bandwidth(props)
        gpu["spec_bandwidth_gbs"] = round(spec / 1e9, 1) if spec else None
        print(f"gpu: {gpu}")
        require_gpu()  # the CuPy floor and a device: what --device gpu checks
    else:
        print("dry run: no GPU queried")
    emit("versions", versions=versions, gpu=gpu, load=os.getloadavg())


def _sample(shape, n, seed, spacing=None):
    from gpu_pipeline.synthetic import make_touching_particles

    return make_touching_particles(shape, n, spacing=spacing, radius_range=(5, 12), overlap=0.15, seed=seed)


def _cached_block(shape, n, seed):
    """A generated image (no truth), saved in SCRATCH: the 256^3 block takes about 10-25 s to make, once."""
    path = SCRATCH / f"block_{'x'.join(map(str, shape))}_{n}_{seed}.npy"
    if path.exists():
        return np.load(path)
    image, _ = _sample(shape, n, seed)
    SCRATCH.mkdir(parents=True, exist_ok=True)
    np.save(path.with_suffix(".partial.npy"), image)
    os.replace(path.with_suffix(".partial.npy"), path)
    return image


def _device_array(array):
    if dry_run():
        return array
    import cupy as cp

    return cp.asarray(array)


def cmd_parity(args):
    """GPU (CuPy input) against the CPU fallback, end to end, 2D and 3D, with and without smoothing."""
    from cpu_fallback import separate as cpu_separate
    from gpu_pipeline import evaluate
    from gpu_pipeline._common import to_host
    from gpu_pipeline.pipeline import separate

    cases = [("2D", (384, 384), 220, (1.0, 1.0)), ("3D", (64, 160, 160), 260, (2.0, 1.0, 1.0))]
    if dry_run():
        cases = [("2D", (128, 128), 30, (1.0, 1.0)), ("3D", (24, 64, 64), 30, (2.0, 1.0, 1.0))]
    for name, shape, n, spacing in cases:
        image, truth = _sample(shape, n, seed=7, spacing=spacing)
        for sigma in (0.0, 1.0):
            kw = dict(spacing=spacing, sigma=sigma, min_distance=4, return_details=True)
            t0 = time.perf_counter()
            cpu_labels, cpu_d = cpu_separate(image, **kw)
            t1 = time.perf_counter()
            gpu_labels, gpu_d = separate(_device_array(image), **kw)
            gpu_labels = to_host(gpu_labels)
            t2 = time.perf_counter()
            differ = int(np.count_nonzero(gpu_labels != cpu_labels))
            row = dict(case=name, shape=shape, sigma=sigma, gpu_side="NumPy (dry run)" if dry_run() else "CuPy",
                       cpu_particles=int(cpu_labels.max()),
                       gpu_particles=int(gpu_labels.max()), threshold_equal=gpu_d.threshold == cpu_d.threshold,
                       peaks_equal=gpu_d.n_peaks == cpu_d.n_peaks, differing_voxels=differ,
                       differing_fraction=differ / max(1, int(np.count_nonzero(cpu_labels))),
                       mean_f1_gpu_vs_cpu=round(evaluate(gpu_labels, cpu_labels)["mean_f1"], 5),
                       f1_50_vs_truth_cpu=round(evaluate(cpu_labels, truth)["f1_50"], 4),
                       f1_50_vs_truth_gpu=round(evaluate(gpu_labels, truth)["f1_50"], 4),
                       cpu_seconds=round(t1 - t0, 3), gpu_seconds_first_call=round(t2 - t1, 3))
            print(f"  {name} {shape} sigma {sigma}: {row}", flush=True)
            emit("parity", **row)


def _tiled_volume(size):
    """A size^3 volume at the density of bench.stages: one generated 256^3 (or smaller) block, tiled."""
    from bench.stages import particles_for

    block = min(size, 256)
    image = _cached_block((block,) * 3, particles_for(block), seed=block)
    reps = size // block
    return np.tile(image, (reps, reps, reps)) if reps > 1 else image


def cmd_stages(args):
    """Per-stage seconds, effective GB/s against the device bandwidth, and the memory each stage allocates."""
    from bench.memory import stage_steps
    from bench.stages import MIN_BYTES_PER_VOXEL
    from gpu_pipeline._backend import ops_for
    from gpu_pipeline.pipeline import separate

    size = args.size
    image = _tiled_volume(size)
    spacing = (1.0, 1.0, 1.0)
    warm, _ = _sample((48,) * 3, 20, seed=1)
    separate(_device_array(warm), min_distance=4)  # kernel compilation outside the timings
    bandwidth = None
    if not dry_run():
        from bench.stages import device_bandwidth

        bandwidth = device_bandwidth()
    data = _device_array(image)
    ops = ops_for(data)
    ops.synchronize()
    t0 = time.perf_counter()
    _, details = separate(data, min_distance=4, min_size=65, polarity="bright", return_details=True)
    total = time.perf_counter() - t0
    rows = []
    for stage, seconds in details.timings.items():
        row = {"stage": stage, "seconds": round(seconds, 4), "mvox_per_s": round(image.size / seconds / 1e6, 1)}
        if stage in MIN_BYTES_PER_VOXEL:
            row["effective_gbs"] = round(MIN_BYTES_PER_VOXEL[stage] * image.size / seconds / 1e9, 1)
            if bandwidth:
                row["of_copy_bandwidth"] = round(MIN_BYTES_PER_VOXEL[stage] * image.size / seconds / bandwidth, 3)
        rows.append(row)
        print(f"  {size}^3 {stage}: {row}", flush=True)
    print(f"  {size}^3 total {total:.2f} s ({image.size / total / 1e6:.1f} Mvox/s), "
          f"{details.n_particles} particles", flush=True)
    emit("stages", size=size, voxels=image.size, total_seconds=round(total, 3), particles=details.n_particles,
         copy_bandwidth_gbs=None if bandwidth is None else round(bandwidth / 1e9, 1), rows=rows)
    if args.skip_memory:
        return
    del details
    memory = _stage_memory(data, spacing, stage_steps)
    emit("stage_memory", size=size, voxels=image.size, rows=memory)


def _stage_memory(data, spacing, stage_steps):
    """Growth of CuPy's pool (emptied first) over each step, per voxel; tracemalloc on the dry run."""
    import tracemalloc

    state = {"image": data}
    rows = []
    for name, step in stage_steps(spacing=spacing):
        if dry_run():
            tracemalloc.start()
            step(state)
            grown = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        else:
            import cupy as cp

            pool = cp.get_default_memory_pool()
            pool.free_all_blocks()
            live = pool.total_bytes()
            step(state)
            cp.cuda.Device().synchronize()
            grown = pool.total_bytes() - live
        rows.append({"stage": name, "bytes_per_voxel": round(grown / data.size, 1)})
        print(f"  memory {name}: {grown / data.size:.1f} B/voxel", flush=True)
    return rows


def cmd_chunked(args):
    """`declump run in.zarr out.zarr --device gpu` (one GPU worker, or --cluster local-cuda) on a generated volume,
    once per value of ``--gpu-threads`` (host threads per GPU, in the order given; the rehearsal gives the CPU run
    as many ``--workers``). The first run also pays what is left of CuPy's kernel compilation, so the order
    4,1 puts that cost on the threads, not on the one thread they are compared with."""
    import zarr

    shape = tuple(int(v) for v in args.shape.split(","))
    chunks = tuple(int(v) for v in args.chunks.split(","))
    SCRATCH.mkdir(parents=True, exist_ok=True)
    store = SCRATCH / f"in_{'x'.join(map(str, shape))}.zarr"
    if not store.exists():
        t0 = time.perf_counter()
        block_shape = tuple(min(256, s) for s in shape)
        cube = block_shape == (256,) * 3  # the stages step's block: generated once for both
        block = _cached_block(block_shape, 1500 if cube else 200, seed=256 if cube else 3)
        array = zarr.create_array(str(store), shape=shape, dtype=np.uint8, chunks=chunks)
        reps = [s // b for s, b in zip(shape, block.shape)]
        array[...] = np.tile(block, reps)
        print(f"  wrote {store} ({np.prod(shape) / 2**30:.2f} GiB uint8) in {time.perf_counter() - t0:.1f} s",
              flush=True)
    out = SCRATCH / f"out_{args.cluster or 'threads'}.zarr"
    device = "cpu" if dry_run() else "gpu"
    cluster = args.cluster
    if dry_run() and cluster == "local-cuda":
        cluster = "local"  # the rehearsal: a CPU LocalCluster where dask-cuda's would be
    from gpu_pipeline.cli import main

    for threads in (int(v) for v in args.gpu_threads.split(",")):
        cmd = ["run", str(store), str(out), "--device", device, "--max-radius", "13", "--overwrite"]
        if cluster:
            cmd += ["--cluster", cluster]
        if threads != 1:
            cmd += ["--workers" if dry_run() else "--gpu-threads", str(threads)]
        print(f"  declump {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        rc = main(cmd)
        seconds = time.perf_counter() - t0
        summary = json.loads((SCRATCH / f"out_{args.cluster or 'threads'}_summary.json").read_text()) if rc == 0 \
            else {}
        row = dict(shape=shape, chunks=chunks, cluster=cluster, device=device, gpu_threads=threads, exit_code=rc,
                   seconds=round(seconds, 1), mvox_per_s=round(float(np.prod(shape)) / seconds / 1e6, 2),
                   particles=summary.get("n_particles"), blocks_total=summary.get("blocks_total"))
        if not dry_run():
            import cupy as cp

            row["pool_limit_gib"] = round(cp.get_default_memory_pool().get_limit() / 2**30, 1)
        print(f"  {row}", flush=True)
        emit("chunked", **row)
        shutil.rmtree(out, ignore_errors=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="rehearse on the CPU (small sizes, NumPy)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("results-path")
    sub.add_parser("versions")
    sub.add_parser("parity")
    stages = sub.add_parser("stages")
    stages.add_argument("--size", type=int, required=True)
    stages.add_argument("--skip-memory", action="store_true")
    chunked = sub.add_parser("chunked")
    chunked.add_argument("--shape", required=True)
    chunked.add_argument("--chunks", required=True)
    chunked.add_argument("--cluster", default=None, choices=(None, "local-cuda"))
    chunked.add_argument("--gpu-threads", default="1", help="host threads per GPU, one run per value: '4,1'")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["DECLUMP_GPU_CHECK_DRY_RUN"] = "1"
    {"results-path": cmd_results_path, "versions": cmd_versions, "parity": cmd_parity, "stages": cmd_stages,
     "chunked": cmd_chunked}[args.command](args)


if __name__ == "__main__":
    main()
