"""Neck grouping ratio and EMPS hole-size sweeps on the real 2D data and the generated spheres: is there a default that helps everywhere?

    python -m bench.neck_sweep

For each ``neck_ratio`` (and off), declump's default method on DSB-2018 and
on EMPS (all images, and each half separately, to see whether a ratio
chosen on one half holds on the other), beside the scikit-image watershed
pipeline with the same parameters (those of ``compare_methods``). Then, on
EMPS, ``max_hole_size`` from 0 up, for declump (neck ratio 1.0, the default,
and off) and the watershed pipeline, all filling the same holes. Writes
``bench/results/neck_sweep_<date>.{json,md}``. Last, every ratio on the
generated 256^3 volume of packed touching spheres of ``compare_methods``.
"""
from __future__ import annotations

import json
import sys
import time

from bench.common import RESULTS, machine_info
from bench.compare_methods import (WATERSHED, pooled_scores, real_datasets, run_method, separation_kwargs,
                                   synthetic_volume, with_polarity)

RATIOS = (None, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 1.0)
#: EMPS hole sizes, px^2 (particle areas: median 3466, 90th percentile 20008).
HOLES = (0, 300, 1000, 3000, 10000, 20000, 30000)
HOLE_METHODS = (1.0, None, WATERSHED)


def _label(name):
    name = str(name)
    return name if name == WATERSHED else f"declump, neck_ratio {name}" + (" (default)" if name == "1.0" else "")


def _labels(name, image, p):
    from cpu_fallback import separate

    if name == WATERSHED:
        return run_method(WATERSHED, image, p)
    return separate(image, **separation_kwargs(p), threshold=p.get("threshold", "auto"), neck_ratio=name)


def _parts(pairs, n):
    half = n // 2
    parts = {"all": slice(None)} if n < 2 else {"all": slice(None), "first half": slice(0, half),
                                                "second half": slice(half, None)}
    return {part: {str(name): pooled_scores(p[sl]) for name, p in pairs.items()} for part, sl in parts.items()}


def main(argv=None):
    result = {"machine": machine_info(), "ratios": list(RATIOS), "holes": list(HOLES), "datasets": {},
              "emps_holes": {}}
    for dataset, (items, params) in real_datasets(None).items():
        if dataset not in ("DSB-2018 nuclei", "EMPS particles"):
            continue
        result.setdefault("params", {})[dataset] = params
        prepared = [(image, truth, with_polarity(image, params)) for _, image, truth in items]
        pairs = {name: [(_labels(name, image, p), truth) for image, truth, p in prepared]
                 for name in (*RATIOS, WATERSHED)}
        result["datasets"][dataset] = _parts(pairs, len(items))
        if dataset == "EMPS particles":
            for hole in HOLES:
                pairs = {name: [(_labels(name, image, dict(p, max_hole_size=float(hole))), truth)
                                for image, truth, p in prepared] for name in HOLE_METHODS}
                result["emps_holes"][str(hole)] = _parts(pairs, len(items))
                print(f"EMPS holes {hole}: " + ", ".join(
                    f"{_label(n)} {s['f1_50']:.4f}/{s['mean_f1']:.4f}"
                    for n, s in result["emps_holes"][str(hole)]["all"].items()), flush=True)
    # The packed spheres of compare_methods: every pair of touching particles has a neck, so a ratio that
    # joins some of them shows here.
    image, truth, p = synthetic_volume()
    dataset = f"generated {image.shape[0]}^3, {int(truth.max())} touching spheres"
    result.setdefault("params", {})[dataset] = p
    pairs = {name: [(_labels(name, image, p), truth)] for name in (*RATIOS, WATERSHED)}
    result["datasets"][dataset] = _parts(pairs, 1)
    print(dataset + ": " + ", ".join(f"{_label(n)} {s['f1_50']:.4f}/{s['mean_f1']:.4f}"
                                     for n, s in result["datasets"][dataset]["all"].items()), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"neck_sweep_{time.strftime('%Y-%m-%d')}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(stem.with_suffix(".md").read_text())
    return 0


def _table(parts):
    names = list(next(iter(parts.values())))
    lines = ["| method | " + " | ".join(parts) + " |", "|---|" + "---|" * len(parts)]
    for name in names:
        label = _label(name)
        cells = [f"{parts[p][name]['f1_50']:.4f} / {parts[p][name]['mean_f1']:.4f}" for p in parts]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def markdown(result):
    m = result["machine"]
    lines = [f"# Neck grouping ratio and EMPS hole-size sweeps, {m['date'][:10]}", "",
             f"Machine: {m['cpu']} ({m['cpu_count']} cores). declump default method with `neck_ratio` as given "
             "(1.0 is the default; None = off), vs the scikit-image watershed pipeline; parameters as in "
             "`compare_methods`: "
             + "; ".join(f"{d}: {p}" for d, p in result.get("params", {}).items())
             + ". F1@0.5 / mean F1 (IoU 0.5-0.95), pooled over images.", ""]
    for dataset, parts in result["datasets"].items():
        lines += [f"## {dataset}", "", *_table(parts), ""]
    if result.get("emps_holes"):
        lines += ["## EMPS particles vs max_hole_size (px^2; the same holes filled for every method)", ""]
        for hole, parts in result["emps_holes"].items():
            lines += [f"### max_hole_size {hole}", "", *_table(parts), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
