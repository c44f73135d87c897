"""Cost of the power assignment against the number of peaks in one region (issue 16, item 1).

    python -m bench.assignment_scaling [--sizes 96,160] [--pitches 48,24,12,6,4] [--rounds 3]

The default assignment (``max_iter=0``) gives each voxel of a multi-peak
region to the peak of smallest power distance. A direct evaluation costs
voxels x peaks; the compiled pass over 4^3 cells keeps, per cell, only the
peaks that can win somewhere in it. This bench times
:func:`gpu_pipeline.stages.split.split_regions_kmeans` on one cubic region
that fills the volume (the worst case: every peak is a candidate of every
voxel before pruning) with peaks on a jittered lattice, 8 to 13,824 of them
in 96^3, each with a radius about half the pitch (particles packed into one
region), and reports nanoseconds per voxel: flat in the number of peaks
means the cost grows with the voxels only. Candidates are the peaks within
the margin (1.5 x the largest radius) of a voxel's cell, so the share of
sampled voxels at the power argmin over all peaks is reported as well. Each size and peak count runs after an untimed
warm-up, in this process, rounds interleaved; the labels are checked against
a brute-force power argmin on a random sample of voxels.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from bench.common import machine_info, write_results


def _case(size, spacing, seed):
    """One region filling a cube; peaks on a lattice of pitch ``spacing`` (jittered by up to a quarter of
    it), radii 0.4-0.6 of the pitch: particles packed so tightly they form one region, as the
    pipeline's peaks are (at least ``min_distance`` apart, each about its particle's radius deep)."""
    rng = np.random.default_rng(seed)
    regions = np.ones((size,) * 3, np.int32)
    axis = np.arange(spacing / 2, size, spacing)
    lattice = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3)
    jitter = rng.uniform(-spacing / 4, spacing / 4, lattice.shape)
    peaks = np.unique(np.clip(np.rint(lattice + jitter), 0, size - 1).astype(np.int64), axis=0)
    radii = rng.uniform(0.4, 0.6, len(peaks)) * spacing
    return regions, peaks, radii


def _check(labels, peaks, radii, rng, samples=2000):
    """The label of sampled voxels is the power argmin over all peaks (ties: the first peak in C order)."""
    coords = rng.integers(0, labels.shape[0], (samples, 3))
    d = ((coords[:, None, :] - peaks[None, :, :]) ** 2).sum(axis=2) - radii[None, :] ** 2
    best = d.min(axis=1, keepdims=True)
    got = labels[tuple(coords.T)]
    # Labels are 2 + the peak's index (1: the region, 0: background); any peak at the minimum is right.
    ok = d[np.arange(samples), got - 2] == best[:, 0]
    return int(ok.sum()), samples


def run(sizes, pitches, rounds, seed=0):
    from gpu_pipeline.stages.split import split_regions_kmeans

    rows = []
    for size in sizes:
        for pitch in pitches:
            regions, peaks, radii = _case(size, pitch, seed + pitch)
            split_regions_kmeans(regions, 1, peaks, radii, spacing=(1.0, 1.0, 1.0), max_iter=0)  # warm-up
            seconds = []
            for _ in range(rounds):
                start = time.perf_counter()
                labels, _ = split_regions_kmeans(regions, 1, peaks, radii, spacing=(1.0, 1.0, 1.0), max_iter=0)
                seconds.append(time.perf_counter() - start)
            right, sampled = _check(labels, peaks, radii, np.random.default_rng(seed))
            row = {"size": size, "pitch": pitch, "voxels": int(regions.size), "peaks": int(len(peaks)),
                   "seconds": seconds,
                   "ns_per_voxel": statistics.median(seconds) / regions.size * 1e9,
                   "sampled_right": right, "sampled": sampled, "load": os.getloadavg()[0]}
            rows.append(row)
            print(f"{size}^3 pitch {pitch:3d} {len(peaks):6d} peaks: {row['ns_per_voxel']:.1f} ns/voxel "
                  f"(median of {rounds}), power argmin on {right}/{sampled} sampled voxels, load {row['load']:.1f}",
                  flush=True)
    return rows


def markdown(result):
    rows = result["rows"]
    lines = [f"# Power assignment against peaks per region, {result['machine']['date'][:10]}", "",
             f"Machine: {result['machine']['cpu']}, {result['machine']['cpu_count']} CPUs; GPU: not run. One process, "
             "one thread (the compiled CPU pass); one cubic region filling the volume, peaks on a jittered lattice "
             "of the given pitch with radii 0.4-0.6 of it, `split_regions_kmeans(max_iter=0)`, median of the rounds "
             "after a warm-up. A direct evaluation would cost voxels x peaks. Last column: sampled voxels whose "
             "label is the power argmin over all peaks (candidates lie within the margin, 1.5 x the largest "
             "radius).", "",
             "| region | pitch | voxels | peaks | ns per voxel (median) | runs (s) | sampled voxels at the power argmin |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']}^3 | {r['pitch']} | {r['voxels']:,} | {r['peaks']:,} | {r['ns_per_voxel']:.1f} | "
                     + ", ".join(f"{s:.3f}" for s in r["seconds"]) + f" | {r['sampled_right']}/{r['sampled']} |")
    by_pitch = {}
    for r in rows:
        by_pitch.setdefault(r["pitch"], []).append(r)
    lines.append("")
    lines.append("Same pitch (same particle size and packing), larger region: the time per voxel does not follow "
                 "the number of peaks in the region.")
    lines.append("")
    for pitch, group in by_pitch.items():
        if len(group) > 1:
            lo, hi = group[0], group[-1]
            lines.append(f"- pitch {pitch}: {hi['peaks'] / lo['peaks']:.1f}x the peaks ({lo['peaks']:,} -> "
                         f"{hi['peaks']:,}), {hi['ns_per_voxel'] / lo['ns_per_voxel']:.2f}x the time per voxel")
    lines.append(f"\n1-minute load during the runs: {min(r['load'] for r in rows):.1f}-"
                 f"{max(r['load'] for r in rows):.1f} (a shared machine).")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="96,160", help="region edges (default %(default)s)")
    parser.add_argument("--pitches", default="48,24,12,6,4",
                        help="peak lattice pitches in voxels (default %(default)s: 8 to 13,824 peaks in 96^3)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rows = run([int(s) for s in args.sizes.split(",")], [int(n) for n in args.pitches.split(",")], args.rounds)
    result = {"machine": machine_info(), "rows": rows}
    stem = write_results(result, "assignment_scaling", markdown(result), args.out)
    print(f"wrote {stem}.json and .md")
    return result


if __name__ == "__main__":
    main()
