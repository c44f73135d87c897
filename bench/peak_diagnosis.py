"""Why declump misses particles that a peer finds: each miss classified by its cause, on small generated volumes.

    python -m bench.peak_diagnosis [--size 128] [--seeds 1,2,3] [--radius 4,11] [--radius 5,12] [--peers snow,watershed]

For every ground-truth particle that declump does not match at IoU 0.5 but
SNOW or the watershed pipeline does (bench.throughput's parameters: sigma 1,
min_distance 4, min_size 65), the cause, from declump's own intermediate
results (peaks, neck groups, labels before and after the finish):

- ``no peak: window`` the particle holds no peak because a higher voxel lies
  in the peak window (``min_distance``) of its distance-map maximum (a
  larger neighbour's flank); the window was a box of ``2*h+1`` voxels before
  the ellipsoid of :func:`gpu_pipeline.stages.peaks.find_peaks`;
- ``no peak: spacing`` its maximum was a candidate but the greedy spacing
  dropped it for an equal one nearby;
- ``no peak: not a maximum`` its highest voxel is no local maximum at all;
- ``merged`` it holds a peak whose particle also holds another particle's
  peak (neck groups, or one peak for two);
- ``split`` two or more of its peaks label it in pieces;
- ``min_size`` its peak's piece was merged away by the finish;
- ``boundary`` a peak of its own, kept, but the assignment's boundary is off;
- ``foreground`` less than half of it is foreground.

Writes bench/results/peak_diagnosis_<date>.json and .md.
"""
from __future__ import annotations

import argparse
import os
import time
from collections import Counter

import numpy as np

from bench.common import RESULTS, machine_info, out_help, write_results
from bench.compare_methods import SNOW, WATERSHED, pooled_scores, run_method, separation_kwargs
from gpu_pipeline.metrics import overlap_table
from gpu_pipeline.synthetic import make_touching_particles

PARAMS = dict(sigma=1.0, min_distance=4, min_size=65, polarity="bright")
PEERS = {"snow": SNOW, "watershed": WATERSHED}
CAUSES = ("no peak: window", "no peak: spacing", "no peak: not a maximum", "merged", "split", "min_size",
          "boundary", "foreground")


def declump_internals(image, p):
    """separate()'s steps one by one (its default options): the labels and what each step decided."""
    from cpu_fallback import ops
    from gpu_pipeline import pipeline as pl
    from gpu_pipeline.stages.peaks import local_maxima, neck_groups, window_half_widths

    kw = separation_kwargs(p)
    details = pl.SeparationDetails()
    clock = pl._StageClock(ops, details.timings)
    fg, radius, distance, tables = pl.foreground_step(image, None, spacing=kw["spacing"], sigma=kw["sigma"],
                                                      threshold="auto", polarity=kw["polarity"], details=details,
                                                      clock=clock)
    fg, min_distance, particle_min_size, distance = pl.cleanup_step(
        fg, spacing=kw["spacing"], min_distance=kw["min_distance"], min_size=kw["min_size"],
        max_hole_size=kw["max_hole_size"], details=details, radius=radius, distance=distance, tables=tables)
    distance_q, quantum = pl.distance_step(fg, spacing=kw["spacing"], max_radius=None, distance=distance)
    peaks, overlooked = pl.peaks_step(distance_q, spacing=kw["spacing"], min_distance=min_distance,
                                      reach=pl.resolve_ratio("peak_reach", "auto", fg.ndim), max_radius=None,
                                      reach_share=pl.resolve_ratio("reach_share", "auto", fg.ndim))
    regions, _ = ops.label(fg)
    peaks = pl.rescue_step(peaks, overlooked, distance_q, regions, spacing=kw["spacing"],
                           reach_share=pl.resolve_ratio("reach_share", "auto", fg.ndim))
    half = window_half_widths(min_distance, kw["spacing"])
    candidates = local_maxima(distance_q, half_widths=half)
    neck, nearby, share = (pl.resolve_ratio(name, "auto", fg.ndim) for name in ("neck_ratio", "nearby_ratio",
                                                                                  "ball_share"))
    split = pl.split_step(fg, distance_q, quantum, peaks, spacing=kw["spacing"], method="kmeans", neck_ratio=neck,
                          nearby_ratio=nearby, ball_share=share, assignment="power", kmeans_engine="batched",
                          max_iter=0, details=details, clock=clock)
    group = neck_groups(peaks, distance_q, regions, kw["spacing"], neck, nearby)
    labels = pl.finish_step(split, details=details, min_size=particle_min_size, spacing=kw["spacing"])
    return dict(fg=fg, distance_q=distance_q, peaks=peaks, candidates=candidates, half=half, split=split,
                group=group, labels=labels)


def matched(pred, gt):
    """Ground-truth ids (1..n) matched at IoU > 0.5, as a boolean array indexed by id."""
    pp, gg, inter, ps, gs = overlap_table(pred, gt)
    iou = inter / (ps[pp] + gs[gg] - inter)
    hit = np.zeros(gs.size, dtype=bool)
    hit[gg[iou > 0.5]] = True
    return hit


def classify(g, truth, d):
    """The cause of declump's miss of ground-truth particle ``g`` (one of :data:`CAUSES`)."""
    from gpu_pipeline.stages.peaks import _highest_in_window

    inside = truth == g
    if d["fg"][inside].mean() < 0.5:
        return "foreground"
    peaks = d["peaks"]
    own = np.flatnonzero(truth[tuple(peaks.T)] == g)
    if own.size == 0:
        values = np.where(inside, d["distance_q"], -1)
        top = np.unravel_index(int(np.argmax(values)), truth.shape)
        if not _highest_in_window(d["distance_q"], np.asarray([top], dtype=np.int64), d["half"])[0]:
            near = tuple(slice(max(0, t - 1), t + 2) for t in top)
            return "no peak: window" if d["distance_q"][near].max() <= d["distance_q"][top] else \
                "no peak: not a maximum"
        return "no peak: spacing"
    split_ids = np.unique(d["split"][tuple(peaks[own].T)])
    final_ids = np.unique(d["labels"][tuple(peaks[own].T)])
    if final_ids.size > 1:
        return "split"
    # Another particle's peak in the same final label: merged (neck group or assignment).
    others = np.flatnonzero((truth[tuple(peaks.T)] != g) & (truth[tuple(peaks.T)] > 0))
    if np.isin(d["labels"][tuple(peaks[others].T)], final_ids).any():
        return "merged"
    if split_ids.size == 1 and (d["split"] == split_ids[0]).sum() != (d["labels"] == final_ids[0]).sum():
        return "min_size"
    return "boundary"


def diagnose(shape, n, radius, seed, peers):
    image, truth = make_touching_particles(shape, n, radius_range=radius, overlap=0.15, seed=seed)
    p = dict(PARAMS, spacing=(1.0,) * len(shape))
    d = declump_internals(image, p)
    hit = matched(d["labels"], truth)
    case = {"shape": list(shape), "particles": int(truth.max()), "radius": list(radius), "seed": seed,
            "f1_50": {"declump": pooled_scores([(d["labels"], truth)])["f1_50"]}, "misses": {}, "examples": []}
    volumes = np.bincount(truth.ravel())
    for name in peers:
        labels = run_method(PEERS[name], image, p)
        case["f1_50"][name] = pooled_scores([(labels, truth)])["f1_50"]
        peer_hit = matched(labels, truth)
        lost = np.flatnonzero(peer_hit & ~hit)
        causes = Counter(classify(int(g), truth, d) for g in lost)
        case["misses"][name] = {"declump_misses_peer_finds": int(lost.size),
                                "peer_misses_declump_finds": int((hit & ~peer_hit)[1:].sum()),
                                "causes": {c: causes.get(c, 0) for c in CAUSES}}
    declump_only = np.flatnonzero(~hit[1:]) + 1
    case["declump_misses"] = {c: 0 for c in CAUSES}
    for g in declump_only:
        cause = classify(int(g), truth, d)
        case["declump_misses"][cause] += 1
        case["examples"].append({"gt": int(g), "radius": round(float((3 * volumes[g] / (4 * np.pi)) ** (1 / 3)), 1),
                                 "cause": cause})
    return case


def markdown(result):
    m = result["machine"]
    lines = [f"# Why declump misses particles a peer finds, {m['date'][:10]}", "",
             f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, shared with other jobs (1-minute load "
             f"{result['load'][0]:.1f} at the start, {result['load'][1]:.1f} at the end; times not measured here). "
             f"Parameters {PARAMS} (bench.throughput's); generated touching spheres, overlap 0.15. "
             "`python -m bench.peak_diagnosis` " + " ".join(result["argv"]), "",
             "Ground-truth particles matched at IoU 0.5 by the peer and not by declump, by cause "
             "(see the module docstring for the causes):", "",
             "| volume | seed | radius | F1@0.5 declump / " + " / ".join(result["peers"]) + " | peer | "
             "declump misses, peer finds | peer misses, declump finds | " + " | ".join(CAUSES) + " |",
             "|" + "---|" * (7 + len(CAUSES))]
    totals = {name: Counter() for name in result["peers"]}
    for case in result["cases"]:
        f1 = " / ".join(f"{case['f1_50'][k]:.3f}" for k in ["declump", *result["peers"]])
        for name, miss in case["misses"].items():
            totals[name].update(miss["causes"])
            totals[name]["_lost"] += miss["declump_misses_peer_finds"]
            totals[name]["_won"] += miss["peer_misses_declump_finds"]
            lines.append(f"| {'x'.join(map(str, case['shape']))} ({case['particles']}) | {case['seed']} | "
                         f"{case['radius'][0]:g}-{case['radius'][1]:g} | {f1} | {name} | "
                         f"{miss['declump_misses_peer_finds']} | {miss['peer_misses_declump_finds']} | "
                         + " | ".join(str(miss["causes"][c]) for c in CAUSES) + " |")
    for name, t in totals.items():
        lines.append(f"| **total** | | | | {name} | **{t['_lost']}** | **{t['_won']}** | "
                     + " | ".join(f"**{t[c]}**" for c in CAUSES) + " |")
    lines += ["", "All of declump's misses (whatever the peers did), by cause:", "",
              "| seed | radius | " + " | ".join(CAUSES) + " |", "|" + "---|" * (2 + len(CAUSES))]
    for case in result["cases"]:
        lines.append(f"| {case['seed']} | {case['radius'][0]:g}-{case['radius'][1]:g} | "
                     + " | ".join(str(case["declump_misses"][c]) for c in CAUSES) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    import sys

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128, help="cube side in voxels (default %(default)s)")
    parser.add_argument("--seeds", default="1,2,3", help="generator seeds (default %(default)s)")
    parser.add_argument("--radius", action="append", type=lambda t: tuple(float(v) for v in t.split(",")),
                        help="sphere radius range (repeat; default 4,11 and 5,12)")
    parser.add_argument("--density", type=float, default=1500 / 256**3 * 1.2,
                        help="spheres per voxel (default %(default).2e, bench.throughput's seed-31 density)")
    parser.add_argument("--peers", default="snow,watershed", help="comma-separated subset of snow,watershed")
    parser.add_argument("--out", default=None, help=out_help("peak_diagnosis"))
    args = parser.parse_args(argv)
    radii = args.radius or [(4.0, 11.0), (5.0, 12.0)]
    peers = [s.strip() for s in args.peers.split(",")]
    shape = (args.size,) * 3
    n = int(round(args.density * np.prod(shape)))
    result = {"machine": machine_info(), "argv": list(sys.argv[1:] if argv is None else argv), "peers": peers,
              "cases": [], "load": [os.getloadavg()[0]]}
    t0 = time.perf_counter()
    for radius in radii:
        for seed in (int(s) for s in args.seeds.split(",")):
            case = diagnose(shape, n, radius, seed, peers)
            print(f"seed {seed} radius {radius}: F1@0.5 {case['f1_50']} misses {case['misses']}", flush=True)
            result["cases"].append(case)
    result["load"].append(os.getloadavg()[0])
    result["seconds"] = time.perf_counter() - t0
    stem = write_results(result, "peak_diagnosis", markdown(result), args.out)
    print(f"wrote {RESULTS / stem}.json and .md")
    return result


if __name__ == "__main__":
    main()
