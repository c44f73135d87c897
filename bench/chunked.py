"""Suite 4 (chunked end to end from a compressed Zarr store) and suite 5 (a scale model, a projection).

    python -m bench.chunked [--quick] [--full-size 512,1024,1024]

Each run is the real command, ``declump run in.zarr out.zarr``, in its own
process (so its peak resident memory, VmHWM, is its own), on generated
volumes written to compressed Zarr stores (zstd, Zarr v3) under
``bench/data/`` (re-used between runs). Measured:

- peak memory vs volume size with the same chunks (the full volume and one
  4x smaller);
- throughput vs chunk shape and vs number of threads (scaling efficiency),
  on a smaller volume, medians of ``--repeats`` runs with their spread;
- the cost of neck grouping (the default ``--neck-ratio auto``, 1.0 in 2D and 0.95 in 3D, against
  ``off``) on that smaller volume;
- time to read and decode every input chunk, beside the codec's decode rate
  on one chunk in memory (the ceiling for reading), measured here;
- blocks computed by each stage, from the run's summary.

Suite 5 projects a 1 TB uint8 volume's wall time from these per-voxel
rates; it is a projection from CPU measurements, not a GPU measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import machine_info, spread
from gpu_pipeline.chunked.workspace import folder_bytes

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
RESULTS = HERE / "results"
TILE = (128, 256, 256)
TILE_PARTICLES = 700
PARAMS = ["--sigma", "1", "--min-distance", "4", "--max-radius", "13"]


def make_volume(path, shape, chunks, seed=0):
    """A generated volume of touching spheres in a zstd-compressed Zarr v3 store, written tile by tile."""
    import zarr

    from gpu_pipeline.synthetic import make_touching_particles

    path = Path(path)
    if (path / "complete").exists():
        return path
    shutil.rmtree(path, ignore_errors=True)
    array = zarr.create_array(str(path), shape=shape, dtype=np.uint8, chunks=chunks,
                              compressors=zarr.codecs.ZstdCodec(level=3))
    grid = [range(0, s, t) for s, t in zip(shape, TILE)]
    for k, origin in enumerate(np.array(np.meshgrid(*grid, indexing="ij")).reshape(len(shape), -1).T):
        tile_shape = tuple(min(t, s - o) for t, s, o in zip(TILE, shape, origin))
        n = max(1, int(TILE_PARTICLES * np.prod(tile_shape) / np.prod(TILE)))
        image, _ = make_touching_particles(tile_shape, n, radius_range=(5, 12), seed=seed * 100003 + k)
        array[tuple(slice(o, o + t) for o, t in zip(origin, tile_shape))] = image
    (path / "complete").touch()
    return path


def run_argv(volume, out, options=()):
    """``declump run`` arguments of a measured run: :data:`PARAMS`, then ``options``."""
    return ["run", str(volume), str(out), "--quiet", "--device", "cpu", *PARAMS, *options]


def start_child(argv, env=None):
    """``python -m bench.chunked --child ARGV`` started (not waited for): its ``Popen``, stderr piped.
    ``env``: default this environment with this checkout first on the path."""
    return subprocess.Popen([sys.executable, "-m", "bench.chunked", "--child", *argv],
                            env=env or dict(os.environ, PYTHONPATH=str(HERE.parent)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def run_child(argv, env=None, interval=0.2, folder=None):
    """``python -m bench.chunked --child ARGV`` (the CLI in a fresh process, which reports its own peak) while
    this process samples the resident memory of the processes it starts (Dask worker processes).

    The sampling runs here, not in a thread of the measured process: a thread there would take a malloc arena
    of its own before the run caps them (``limit_malloc_arenas``), and its peak memory would not be the
    command's. Returns ``(returncode, stderr, worker peaks in GiB, folder peak)``: with ``folder`` (a run's
    work folder), the most bytes on disk under it at a sample (``folder_bytes``; walking it costs the
    measured run some CPU: for an untimed run), else None.
    """
    import psutil

    process = start_child(argv, env)
    peaks = {}
    stderr = []
    most = None if folder is None else 0
    reader = threading.Thread(target=lambda: stderr.append(process.stderr.read()), daemon=True)
    reader.start()
    try:
        me = psutil.Process(process.pid)
        while process.poll() is None:
            for child in me.children(recursive=True):
                try:
                    peaks[child.pid] = max(peaks.get(child.pid, 0), child.memory_info().rss)
                except psutil.Error:
                    pass
            if folder is not None:
                most = max(most, folder_bytes(folder))
            time.sleep(interval)
    except psutil.Error:
        pass
    process.wait()
    reader.join()
    # Processes under 64 MiB are helpers (multiprocessing's resource tracker), not workers.
    return process.returncode, "".join(stderr), sorted(v / 2**30 for v in peaks.values() if v > 64 * 2**20), most


def _child(argv):
    """Run the CLI in this process, then report its seconds, CPU seconds and peak resident memory."""
    from gpu_pipeline.cli import main

    import resource

    def cpu():  # this process and its reaped children (worker processes of a local cluster)
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    start, cpu_start = time.perf_counter(), cpu()
    code = main(argv[1:])
    seconds, cpu_seconds = time.perf_counter() - start, cpu() - cpu_start
    peak = 0.0
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 2**20
    Path(argv[0]).write_text(json.dumps({"code": code, "seconds": seconds, "cpu_seconds": cpu_seconds,
                                         "peak_rss_gib": peak}))
    return code


def run_declump(volume, out_dir, *, chunks=None, workers=None, extra=()):
    """One ``declump run`` in a fresh process: seconds, peak RSS, the run's summary."""
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    report = out_dir / "report.json"
    argv = [str(report), *run_argv(volume, out_dir / "labels.zarr", extra)]
    if chunks:
        argv += ["--chunks", ",".join(str(c) for c in chunks)]
    if workers:
        argv += ["--workers", str(workers)]
    returncode, stderr, _, _ = run_child(argv)
    if returncode != 0:
        raise RuntimeError(f"declump run failed: {stderr[-2000:]}")
    measured = json.loads(report.read_text())
    summary = json.loads((out_dir / "labels_summary.json").read_text())
    shutil.rmtree(out_dir, ignore_errors=True)
    return {"seconds": measured["seconds"], "peak_rss_gib": measured["peak_rss_gib"],
            "voxels": int(np.prod(summary["shape"])), "chunks": summary["chunks"],
            "mvox_per_s": np.prod(summary["shape"]) / measured["seconds"] / 1e6, "n_particles": summary["n_particles"],
            "blocks_computed": summary["blocks_computed"], "one_piece_rounds": summary["one_piece_rounds"]}


def run_repeated(volume, out_dir, repeats, **kwargs):
    """``repeats`` runs of :func:`run_declump`: median seconds with min-max, the largest peak RSS."""
    rows = [run_declump(volume, out_dir, **kwargs) for _ in range(repeats)]
    seconds = [r["seconds"] for r in rows]
    row = dict(rows[0], **{"seconds_spread": spread(seconds), "peak_rss_gib": max(r["peak_rss_gib"] for r in rows)})
    row["seconds"] = row["seconds_spread"]["median"]
    row["mvox_per_s"] = row["voxels"] / row["seconds"] / 1e6
    return row


def decode_rates(volume):
    """Seconds to read and decode every chunk of ``volume`` (threads), and one chunk's in-memory decode rate."""
    import dask
    import dask.array as da
    import zarr

    array = zarr.open_array(str(volume), mode="r")
    lazy = da.from_zarr(str(volume))
    start = time.perf_counter()
    with dask.config.set(scheduler="threads"):
        lazy.map_blocks(lambda b: np.zeros((1,) * b.ndim), dtype=float).sum().compute()
    read_seconds = time.perf_counter() - start
    # The codec alone: decompress one stored chunk repeatedly.
    codec = zarr.codecs.ZstdCodec(level=3)
    from numcodecs import Zstd

    chunk = np.ascontiguousarray(array[tuple(slice(0, c) for c in array.chunks)])
    encoded = Zstd(level=3).encode(chunk)
    start, repeats = time.perf_counter(), 20
    for _ in range(repeats):
        Zstd(level=3).decode(encoded)
    per_chunk = (time.perf_counter() - start) / repeats
    del codec
    return {"read_all_chunks_seconds": read_seconds,
            "read_mvox_per_s": array.size / read_seconds / 1e6,
            "codec_decode_mvox_per_s_one_core": chunk.size / per_chunk / 1e6,
            "compression_ratio": chunk.nbytes / len(encoded)}


def scale_model(rate_mvox_per_s, decode_mvox_per_s_core, cores):
    """Projected hours for 1 TB (10^12 uint8 voxels) from a measured per-node rate; a projection, labelled so."""
    voxels = 1e12
    rows = []
    for nodes in (1, 8, 64):
        compute_h = voxels / (rate_mvox_per_s * 1e6 * nodes) / 3600
        decode_h = voxels / (decode_mvox_per_s_core * 1e6 * cores * nodes) / 3600
        rows.append({"nodes": nodes, "compute_hours": compute_h, "decode_hours": decode_h,
                     "bound": "compute" if compute_h >= decode_h else "decode"})
    return rows


def _seconds(row):
    s = row.get("seconds_spread")
    return f"{row['seconds']:.1f}" + (f" ({s['min']:.1f}-{s['max']:.1f}, {s['runs']} runs)" if s else "")


def markdown(result):
    lines = [f"# Chunked end to end, {result['date']}", "",
             f"Machine: {result['machine']['cpu']}, {result['machine']['cpu_count']} CPUs, "
             f"{result['machine']['memory_gib']:.1f} GiB, GPU: {result['machine']['gpu'] or 'none'}. "
             "`declump run in.zarr out.zarr` (CPU fallback, local threads), each in a fresh process; "
             f"parameters {' '.join(PARAMS)} (neck grouping at its default, auto: 0.95 in 3D, unless a row says otherwise); "
             "zstd-compressed Zarr v3 input. Seconds: median (min-max) of "
             "repeated runs; peak RSS: the largest of those runs.", "",
             "## Peak memory vs volume size (same chunks)", "",
             "| volume | voxels | chunks | s | Mvox/s | peak RSS GiB | particles |", "|---|---|---|---|---|---|---|"]
    for row in result["memory"]:
        lines.append(f"| {'x'.join(map(str, row['shape']))} | {row['voxels'] / 1e6:.0f} M | "
                     f"{'x'.join(map(str, row['chunks']))} | {_seconds(row)} | {row['mvox_per_s']:.2f} | "
                     f"{row['peak_rss_gib']:.2f} | {row['n_particles']} |")
    if len(result["memory"]) == 2:
        small, big = result["memory"]
        lines += ["", f"Peak RSS ratio, {big['voxels'] / small['voxels']:.0f}x the voxels: "
                      f"**{big['peak_rss_gib'] / small['peak_rss_gib']:.2f}x**."]
    if "chunk_shapes" not in result or "workers" not in result:
        lines += ["", "Throughput vs chunk shape and vs threads: not run for this file (`--suites chunks,workers`)."]
    scaling = result.get("scaling_volume")
    where = f" ({'x'.join(map(str, scaling))} volume; median and min-max of repeated runs)" if scaling else ""
    lines += ["", f"## Throughput vs chunk shape{where}", "", "| chunks | s | Mvox/s | peak RSS GiB |",
              "|---|---|---|---|"]
    for row in result.get("chunk_shapes", []):
        lines.append(f"| {'x'.join(map(str, row['chunks']))} | {_seconds(row)} | {row['mvox_per_s']:.2f} | "
                     f"{row['peak_rss_gib']:.2f} |")
    lines += ["", f"## Throughput vs threads{where}", "", "| threads | s | Mvox/s | scaling efficiency |",
              "|---|---|---|---|"]
    base = (result.get("workers") or [None])[0]
    for row in result.get("workers", []):
        eff = base["seconds"] / row["seconds"] / (row["threads"] / base["threads"])
        lines.append(f"| {row['threads']} | {_seconds(row)} | {row['mvox_per_s']:.2f} | {eff:.2f} |")
    if result.get("neck"):
        lines += ["", f"## Cost of neck grouping{where}", "", "| --neck-ratio | s | Mvox/s | peak RSS GiB | particles |",
                  "|---|---|---|---|---|"]
        for row in result["neck"]:
            lines.append(f"| {row['neck_ratio']} | {_seconds(row)} | {row['mvox_per_s']:.2f} | "
                         f"{row['peak_rss_gib']:.2f} | {row['n_particles']} |")
    d = result["decode"]
    lines += ["", "## Decoding vs computing", "",
              f"Reading and decoding every input chunk (threads): {d['read_all_chunks_seconds']:.1f} s "
              f"({d['read_mvox_per_s']:.0f} Mvox/s); zstd decode of one chunk in memory: "
              f"{d['codec_decode_mvox_per_s_one_core']:.0f} Mvox/s per core (compression ratio "
              f"{d['compression_ratio']:.1f}). A run reads the input about four times (range, histogram, border "
              "polarity, foreground; the smoothing is recomputed for each) and then only its own staged stores: "
              "decoding is a small share of the run time here.", "",
              "## Scale model (a projection, not a measurement)", "",
              f"1 TB of uint8 voxels at this machine's measured end-to-end rate "
              f"({result['scale_model_rate_mvox_per_s']:.2f} Mvox/s per node of {result['machine']['cpu_count']} "
              "cores, CPU fallback), assuming linear scaling over nodes that each read their own chunks:", "",
              "| nodes | compute h | input decode h | bound |", "|---|---|---|---|"]
    for row in result["scale_model"]:
        lines.append(f"| {row['nodes']} | {row['compute_hours']:.0f} | {row['decode_hours']:.1f} | {row['bound']} |")
    lines += ["", "No GPU was available for these runs, so no GPU-node projection is given from measurements."]
    return "\n".join(lines) + "\n"


#: The suites of this bench, in the order they run.
SUITES = ("memory", "chunks", "workers", "neck", "decode")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return _child(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small volumes (a smoke run)")
    parser.add_argument("--full-size", default="512,1024,1024")
    parser.add_argument("--out", default="chunked")
    parser.add_argument("--repeats", type=int, default=3, help="runs per row of the chunks and workers suites")
    parser.add_argument("--memory-repeats", type=int, default=3,
                        help="runs per volume of the memory suite (the 0.5 GVox run takes about 10 minutes here)")
    parser.add_argument("--scaling-size", default="128,512,512",
                        help="volume of the chunks and workers suites (repeated runs)")
    parser.add_argument("--suites", default=",".join(SUITES),
                        help=f"comma-separated subset of {','.join(SUITES)} (default: all)")
    args = parser.parse_args(argv)
    unknown = set(args.suites.split(",")) - set(SUITES)
    if unknown:  # (before any volume is generated)
        parser.error(f"--suites: unknown {', '.join(sorted(unknown))}; choose from {','.join(SUITES)}")
    full = tuple(int(v) for v in args.full_size.split(","))
    if args.quick:
        full = (128, 256, 256)
    quarter = (full[0] // 2, full[1] // 2, full[2])
    chunks = (128, 256, 256) if not args.quick else (64, 128, 128)
    DATA.mkdir(exist_ok=True)
    work = DATA / "runs"
    small = make_volume(DATA / f"vol_{'x'.join(map(str, quarter))}.zarr", quarter, chunks)
    big = make_volume(DATA / f"vol_{'x'.join(map(str, full))}.zarr", full, chunks)
    scaling = tuple(int(v) for v in args.scaling_size.split(",")) if not args.quick else (64, 128, 256)
    scaling_volume = make_volume(DATA / f"vol_{'x'.join(map(str, scaling))}.zarr", scaling, chunks)
    suites = args.suites.split(",")
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"{args.out}_{time.strftime('%Y-%m-%d')}"
    # Suites can run in separate invocations; each one updates the same result file.
    result = json.loads(stem.with_suffix(".json").read_text()) if stem.with_suffix(".json").exists() else {}
    result.update({"date": time.strftime("%Y-%m-%d"), "machine": machine_info(), "parameters": PARAMS})

    def save():
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2, default=float) + "\n")
        if all(k in result for k in ("memory", "decode")):
            stem.with_suffix(".md").write_text(markdown(result))

    if "memory" in suites:
        result["memory"] = []
        for shape, volume in ((quarter, small), (full, big)):
            row = run_repeated(volume, work / "memory", args.memory_repeats)
            row["shape"] = list(shape)
            result["memory"].append(row)
            print("memory", row, flush=True)
        save()
    cpu = os.cpu_count() or 1
    if "chunks" in suites:
        result["chunk_shapes"], result["scaling_volume"] = [], list(scaling)
        for chunk_shape in ([(64, 128, 128), (128, 128, 128), chunks] if not args.quick else [(32, 64, 64), chunks]):
            row = run_repeated(scaling_volume, work / "chunks", args.repeats, chunks=chunk_shape)
            result["chunk_shapes"].append(row)
            print("chunks", row, flush=True)
        save()
    if "workers" in suites:
        result["workers"], result["scaling_volume"] = [], list(scaling)
        for threads in sorted({1, cpu}):
            row = run_repeated(scaling_volume, work / "workers", args.repeats, workers=threads)
            row["threads"] = threads
            result["workers"].append(row)
            print("workers", row, flush=True)
        save()
    if "neck" in suites:
        result["neck"], result["scaling_volume"] = [], list(scaling)
        for ratio, extra in (("auto (default; 0.95 in 3D)", ()), ("off", ("--neck-ratio", "off"))):
            row = run_repeated(scaling_volume, work / "neck", args.repeats, extra=extra)
            row["neck_ratio"] = ratio
            result["neck"].append(row)
            print("neck", row, flush=True)
        save()
    if "decode" in suites:
        result["decode"] = decode_rates(small)
        save()
    if "memory" in result and "decode" in result:
        rate = result["memory"][-1]["mvox_per_s"]
        result["scale_model_rate_mvox_per_s"] = rate
        result["scale_model"] = scale_model(rate, result["decode"]["codec_decode_mvox_per_s_one_core"], cpu)
        save()
    if stem.with_suffix(".md").exists():
        print(stem.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
