"""Neck grouping ratio sweep on the real 2D data: is there a default that helps everywhere?

    python -m bench.neck_sweep

For each ``neck_ratio`` (and off), declump's default method on DSB-2018 and
on EMPS (all images, and each half separately, to see whether a ratio
chosen on one half holds on the other), beside the scikit-image watershed
pipeline with the same parameters. Writes ``bench/results/neck_sweep_<date>.{json,md}``.
"""
from __future__ import annotations

import json
import sys
import time

from bench.common import RESULTS, machine_info
from bench.compare_methods import WATERSHED, pooled_scores, real_datasets, run_method

RATIOS = (None, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 1.0)


def main(argv=None):
    from cpu_fallback import separate
    from cpu_fallback.ops import gaussian
    from gpu_pipeline.stages.threshold import choose_polarity, otsu_threshold

    result = {"machine": machine_info(), "ratios": [r for r in RATIOS], "datasets": {}}
    for dataset, (items, params) in real_datasets(None).items():
        if dataset not in ("DSB-2018 nuclei", "EMPS particles"):
            continue
        pairs = {str(r): [] for r in RATIOS}
        pairs[WATERSHED] = []
        for _, image, truth in items:
            p = dict(params)
            if p["polarity"] == "auto":  # one decision for every method, as in compare_methods
                smoothed = gaussian(image, (p["sigma"],) * image.ndim)
                p["polarity"] = choose_polarity(smoothed, otsu_threshold(smoothed), "auto")
            pairs[WATERSHED].append((run_method(WATERSHED, image, p), truth))
            for r in RATIOS:
                labels = separate(image, spacing=p["spacing"], sigma=p["sigma"], min_distance=p["min_distance"],
                                  min_size=p["min_size"], polarity=p["polarity"], neck_ratio=r)
                pairs[str(r)].append((labels, truth))
        half = len(items) // 2
        parts = {"all": slice(None)} if len(items) < 2 else {"all": slice(None), "first half": slice(0, half),
                                                              "second half": slice(half, None)}
        result["datasets"][dataset] = {
            part: {name: pooled_scores(p[sl]) for name, p in pairs.items()} for part, sl in parts.items()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"neck_sweep_{time.strftime('%Y-%m-%d')}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(stem.with_suffix(".md").read_text())
    return 0


def markdown(result):
    m = result["machine"]
    lines = [f"# Neck grouping ratio sweep, {m['date'][:10]}", "",
             f"Machine: {m['cpu']} ({m['cpu_count']} cores). declump default method with `neck_ratio` as given "
             "(None = off, the default), vs the scikit-image watershed pipeline; parameters as in "
             "`compare_methods` (DSB: sigma 1, min_distance 6; EMPS: sigma 2, min_distance 20). "
             "F1@0.5 / mean F1 (IoU 0.5-0.95), pooled over images.", ""]
    for dataset, parts in result["datasets"].items():
        names = list(next(iter(parts.values())))
        lines += [f"## {dataset}", "", "| method | " + " | ".join(parts) + " |",
                  "|---|" + "---|" * len(parts)]
        for name in names:
            label = name if name == WATERSHED else f"declump, neck_ratio {name}"
            cells = [f"{parts[p][name]['f1_50']:.4f} / {parts[p][name]['mean_f1']:.4f}" for p in parts]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
