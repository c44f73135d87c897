"""Suite 1: per-stage time and throughput of the pipeline, CPU fallback and GPU, across volume sizes.

    python -m bench.stages [--sizes 64,128,256,512] [--repeats 3]

Each stage's time comes from `separate(..., return_details=True)` (the GPU
waits for the device before each lap). GPU rows also give the fraction of
the memory-bandwidth bound: the bytes a stage must move at least (each input
read once, each output written once; `MIN_BYTES_PER_VOXEL`) over the
bandwidth of a device-to-device copy measured on the same GPU.
"""
from __future__ import annotations

import argparse
import statistics
import time

from bench.common import RESULTS, machine_info, spread, write_results
from gpu_pipeline.synthetic import make_touching_particles

#: Least bytes per voxel each stage must read + write (uint8 image, float32/int32 maps, bool masks).
MIN_BYTES_PER_VOXEL = {
    "smoothing": 1 + 4,            # uint8 in, float32 out
    "threshold": 4 + 4 + 1,        # histogram pass, compare pass, bool out
    "cleanup": 1 + 4 + 4 + 1,      # label the mask, read labels, write mask
    "distance_transform": 1 + 4,   # bool in, float32 out
    "regions": 1 + 4,              # bool in, int32 out
    "peaks": 4 + 4 + 4,            # quantise (float32 in, int32 out), one filter pass
    "kmeans": 4 + 4,               # region id in, label out (per voxel of the volume)
    "finish": 4 + 4,               # labels in, renumbered labels out
}


def particles_for(size):
    """Keep the density of 1500 spheres (radius 5-12) in 256^3."""
    return max(4, int(round(1500 * (size / 256) ** 3)))


def device_bandwidth():
    """Device-to-device copy bandwidth in bytes/s (read + write), median of 10 after a warm-up."""
    import cupy as cp

    src = cp.ones(1 << 28, dtype=cp.uint8)
    dst = cp.empty_like(src)
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    dst[...] = src
    times = []
    for _ in range(10):
        start.record()
        dst[...] = src
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) / 1e3)
    return 2 * src.nbytes / statistics.median(times)


def run(sizes, repeats, devices):
    from gpu_pipeline.pipeline import separate

    rows = []
    bandwidth = None
    if "gpu" in devices:
        bandwidth = device_bandwidth()
    warm, _ = make_touching_particles((48,) * 3, 20, seed=1)
    for device in devices:
        to_device = (lambda a: a) if device == "cpu" else __import__("cupy").asarray
        separate(to_device(warm), min_distance=4)  # imports, caches, kernel compilation
        for size in sizes:
            image, _ = make_touching_particles((size,) * 3, particles_for(size), radius_range=(5, 12),
                                               overlap=0.15, seed=size)
            data = to_device(image)
            per_stage = {}
            totals = []
            for _ in range(repeats):
                _, details = separate(data, min_distance=4, min_size=65, polarity="bright", return_details=True)
                totals.append(sum(details.timings.values()))
                for stage, seconds in details.timings.items():
                    per_stage.setdefault(stage, []).append(seconds)
            for stage, times in per_stage.items():
                s = spread(times)
                row = {"device": device, "size": size, "voxels": image.size, "stage": stage, **s,
                       "voxels_per_second": image.size / s["median"]}
                if device == "gpu" and stage in MIN_BYTES_PER_VOXEL:
                    needed = MIN_BYTES_PER_VOXEL[stage] * image.size / bandwidth
                    row["bandwidth_bound_fraction"] = needed / s["median"]
                rows.append(row)
            total = spread(totals)
            rows.append({"device": device, "size": size, "voxels": image.size, "stage": "total", **total,
                         "voxels_per_second": image.size / total["median"]})
            print(f"{device} {size}^3: total {total['median']:.2f} s "
                  f"({image.size / total['median'] / 1e6:.1f} Mvox/s); " +
                  ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in per_stage.items()), flush=True)
    return {"bandwidth_bytes_per_second": bandwidth, "rows": rows}


def markdown(result):
    m = result["machine"]
    lines = [f"# declump per stage: {m['cpu']} ({m['cpu_count']} cores, {m['memory_gib']} GiB), GPU: "
             f"{m['gpu'] or 'none'}, {m['date']}", "",
             f"Median (min-max) of {result['repeats']} runs per size, after one warm-up run on a 48^3 volume"
             + (f"; suite wall time {result['wall_seconds']:.0f} s" if "wall_seconds" in result else "") + ".", "",
             "| device | size | stage | median s (min-max) | Mvox/s | of bandwidth bound |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        frac = f"{100 * r['bandwidth_bound_fraction']:.0f} %" if "bandwidth_bound_fraction" in r else "-"
        lines.append(f"| {r['device']} | {r['size']}^3 | {r['stage']} | {r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f}) "
                     f"| {r['voxels_per_second'] / 1e6:.1f} | {frac} |")
    return "\n".join(lines) + "\n"


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for device in sorted({r["device"] for r in result["rows"]}):
        stages = [s for s in dict.fromkeys(r["stage"] for r in result["rows"]) if s != "total"]
        for stage in stages + ["total"]:
            pts = [(r["size"], r["voxels_per_second"] / 1e6) for r in result["rows"]
                   if r["device"] == device and r["stage"] == stage]
            if pts:
                x, y = zip(*pts)
                ax.plot(x, y, marker="o", lw=2.5 if stage == "total" else 1.2, label=f"{device} {stage}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("volume edge (voxels)")
    ax.set_ylabel("throughput (Mvoxel/s)")
    ax.set_title("declump per-stage throughput")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    from gpu_pipeline._backend import gpu_available

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64,128,256,512", help="volume edges (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    devices = ["cpu"] + (["gpu"] if gpu_available() else [])
    start = time.perf_counter()
    result = {"machine": machine_info(), "repeats": args.repeats,
              **run([int(s) for s in args.sizes.split(",")], args.repeats, devices)}
    result["wall_seconds"] = time.perf_counter() - start
    if "gpu" not in devices:
        result["gpu_note"] = "no CUDA device on this machine: GPU rows not measured"
    stem = write_results(result, "stages", markdown(result), args.out)
    plot(result, RESULTS / f"{stem}.png")
    print(f"wrote {RESULTS / stem}.json, .md, .png")
    return result


if __name__ == "__main__":
    main()
