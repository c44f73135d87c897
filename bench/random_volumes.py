"""Accuracy side by side on generated volumes whose parameters are drawn at random, not chosen.

    python -m bench.random_volumes [--draws 24] [--rng 777] [--size 256] [--methods declump,watershed,snow]
                                   [--spread wide] [--option ball_share=off ...] [--out NAME]

Each draw takes a seed, a radius range (smallest radius uniform in 3-9
voxels, largest 4-9 voxels more; with ``--spread wide``, smallest uniform in
3-6 and largest 2-6 times that, so small spheres touch ones up to 6 times
their radius) and a volume fraction (15-45 %) from
``--rng``, generates the bench's touching spheres (overlap 0.15) and runs
every method on it with the bench's parameters (sigma 1, ``min_distance`` 4,
``min_size`` 65, bright particles), in this process, one method after the
other. Scores are F1@0.5 and mean F1 against the ground truth; the summary
counts the volumes where declump's F1@0.5 is below each peer's (by more than
5e-5, a tenth of a piece in a thousand) and its mean over the draws. Times
are not compared here (``bench.throughput`` times the methods in fresh
processes); the seconds are recorded only as a guide. ``--option`` runs
declump with a changed option (``name=value``, ``off`` for None) under its
own column, e.g. to measure a default against off. ``declump-defaults``
(a method) is declump given only sigma and ``min_distance``: threshold,
polarity, hole filling and ``min_size`` at their ``auto`` defaults, as a new
user runs it.

The draws of ``--rng 20261203`` chose the 3D peak defaults and those of
``--rng 777`` checked them (README, Method steps 6 and 8).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from bench.common import machine_info, write_results
from bench.compare_methods import pooled_scores, run_method, separation_kwargs
from bench.throughput import SHORT
from gpu_pipeline.synthetic import make_touching_particles

PARAMS = dict(sigma=1.0, min_distance=4, min_size=65, polarity="bright")
METHODS = SHORT  # (bench.throughput's short names: declump, watershed, snow, declump-defaults)
#: A lower F1@0.5 counts when it is lower by more than this (one piece in 1000 spheres is 0.0005-0.001).
BELOW = 5e-5
#: How the radius ranges are drawn (:func:`draws`).
SPREADS = ("narrow", "wide")


def draws(rng_seed, count, size=256, spread="narrow"):
    """(index, seed, particles, smallest radius, largest radius) of ``count`` random volumes of ``size``³.

    ``spread``: ``"narrow"`` (the largest radius 4-9 voxels above the smallest) or ``"wide"`` (2-6 times it)."""
    if spread not in SPREADS:
        raise ValueError(f"spread must be one of {SPREADS}, got {spread!r}")
    rng = np.random.default_rng(rng_seed)
    out = []
    for i in range(count):
        if spread == "wide":
            lo = float(rng.uniform(3.0, 6.0))
            hi = lo * float(rng.uniform(2.0, 6.0))
        else:
            lo = float(rng.uniform(3.0, 9.0))
            hi = lo + float(rng.uniform(4.0, 9.0))
        fraction = float(rng.uniform(0.15, 0.45))
        n = int(fraction * 256 ** 3 / (4 / 3 * np.pi * ((lo + hi) / 2) ** 3) * (size / 256) ** 3)
        out.append((i, int(rng.integers(10000, 99999)), n, round(lo, 1), round(hi, 1)))
    return out


def _option(text):
    name, _, value = text.partition("=")
    if not name or not value:
        raise argparse.ArgumentTypeError(f"--option takes name=value (e.g. ball_share=off), got {text!r}")
    return name, None if value == "off" else (value if value == "auto" else float(value))


def run(rng_seed, count, size, methods, options=(), spread="narrow"):
    """Per draw, each method's F1@0.5, mean F1, pieces and seconds; then the summary."""
    from cpu_fallback import separate

    columns = [(m, None) for m in methods] + [(f"declump {name}={value}", (name, value)) for name, value in options]
    rows = []
    for i, seed, n, lo, hi in draws(rng_seed, count, size, spread):
        image, truth = make_touching_particles((size,) * 3, n, radius_range=(lo, hi), overlap=0.15, seed=seed)
        row = {"draw": i, "seed": seed, "particles": n, "radius": [lo, hi], "truth": int(truth.max())}
        for column, option in columns:
            p = dict(PARAMS, spacing=(1.0,) * 3)
            t0 = time.perf_counter()
            if option is None:
                labels = run_method(METHODS[column], image, p)
            else:
                labels = separate(image, **{**separation_kwargs(p), option[0]: option[1]})
            seconds = time.perf_counter() - t0
            scores = pooled_scores([(labels, truth)])
            row[column] = {"f1_50": scores["f1_50"], "mean_f1": scores["mean_f1"], "pieces": int(labels.max()),
                           "seconds": round(seconds, 2)}
        rows.append(row)
        print(f"draw {i} seed {seed} r {lo}-{hi} {row['truth']} spheres: " + ", ".join(
            f"{c} {row[c]['f1_50']:.5f}/{row[c]['mean_f1']:.3f}" for c, _ in columns), flush=True)
    return {"rng": rng_seed, "draws": count, "size": size, "spread": spread, "params": PARAMS, "columns": [c for c, _ in columns],
            "rows": rows, "summary": summary(rows, [c for c, _ in columns])}


def summary(rows, columns):
    """Mean F1@0.5 and mean F1 per column; for declump, the draws where another column is higher."""
    out = {c: {"mean_f1_50": float(np.mean([r[c]["f1_50"] for r in rows])),
               "mean_mean_f1": float(np.mean([r[c]["mean_f1"] for r in rows]))} for c in columns}
    if "declump" in columns:
        for c in columns:
            if c != "declump":
                out["declump"][f"f1_50_below_{c}"] = [r["seed"] for r in rows
                                                      if r["declump"]["f1_50"] < r[c]["f1_50"] - BELOW]
                out["declump"][f"mean_f1_below_{c}"] = [r["seed"] for r in rows
                                                        if r["declump"]["mean_f1"] < r[c]["mean_f1"]]
    return out


def markdown(result):
    columns = result["columns"]
    m = result["machine"]
    lines = [f"# Random generated volumes side by side: {m['cpu']}, {m['date']}", "",
             f"{result['draws']} draws of `--rng {result['rng']}`"
             f"{' --spread wide' if result.get('spread') == 'wide' else ''}, {result['size']}³ each (radii and "
             f"volume fraction drawn; overlap 0.15); parameters {result['params']}. F1@0.5 / mean F1 (pieces) per method.", "",
             "| draw | seed | radii | spheres | " + " | ".join(columns) + " |",
             "|---|---|---|---|" + "---|" * len(columns)]
    for r in result["rows"]:
        lines.append(f"| {r['draw']} | {r['seed']} | {r['radius'][0]}-{r['radius'][1]} | {r['truth']} | " + " | ".join(
            f"{r[c]['f1_50']:.5f} / {r[c]['mean_f1']:.3f} ({r[c]['pieces']})" for c in columns) + " |")
    s = result["summary"]
    lines += ["", "| method | mean F1@0.5 | mean of mean F1 |", "|---|---|---|"]
    lines += [f"| {c} | {s[c]['mean_f1_50']:.5f} | {s[c]['mean_mean_f1']:.5f} |" for c in columns]
    if "declump" in s:
        lines.append("")
        for c in columns:
            if c != "declump":
                below, mean_below = s["declump"][f"f1_50_below_{c}"], s["declump"][f"mean_f1_below_{c}"]
                lines.append(f"- declump's F1@0.5 below {c}'s (by more than {BELOW:g}) on {len(below)} of "
                             f"{result['draws']} (seeds {below or 'none'}); mean F1 below on {len(mean_below)}.")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=24)
    parser.add_argument("--rng", type=int, default=777, help="seed of the draws (default %(default)s)")
    parser.add_argument("--size", type=int, default=256, help="volume edge; particles scale with the volume")
    parser.add_argument("--methods", default="declump,watershed,snow",
                        help="comma-separated, of " + ", ".join(METHODS))
    parser.add_argument("--option", action="append", type=_option, default=[],
                        help="also declump with this option changed, name=value or name=off (repeatable)")
    parser.add_argument("--spread", choices=SPREADS, default="narrow",
                        help="radius ranges: largest 4-9 voxels above the smallest (narrow, default) or 2-6 times it")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    result = run(args.rng, args.draws, args.size, methods, args.option, args.spread)
    result["machine"] = machine_info()
    stem = write_results(result, "random_volumes", markdown(result), args.out)
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
