"""The web app's painted workflow on crowded EMPS images, through the same calls the app makes.

Strokes are simulated from the ground truth (``bench.emps_classifier.simulated_strokes``: <= 300 px per
class), the forest is trained with the app's settings (``gpu_pipeline.app.session.TRAINING``) and the
particles come from ``separate(image, classifier=...)``, with and without the boundary strokes, beside the
automatic defaults. Writes ``bench/results/app_painted_emps_DATE.md``.

    python -m bench.app_painted_emps [--images 8]
"""
from __future__ import annotations

import argparse
import datetime
import os
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


def main(argv=None):
    from bench.compare_methods import pool_scores
    from bench.emps_classifier import emps_items, load, simulated_strokes, touching_pixels
    from gpu_pipeline import evaluate, separate
    from gpu_pipeline.app.session import TRAINING
    from gpu_pipeline.classifier import train_classifier

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="crowded images to paint (default %(default)s)")
    parser.add_argument("--candidates", type=int, default=120, help="EMPS images searched for crowded ones")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(7)
    crowded = sorted(((touching_pixels(load(f, n)[1]), f, n) for f, n in emps_items()[:args.candidates]),
                     key=lambda t: -t[0])
    methods = {"painted with boundary strokes": [], "painted, background + particle only": [],
               "automatic defaults": []}
    lines = []
    started = time.perf_counter()
    for _, folder, name in crowded:
        if len(lines) == args.images:
            break
        image, truth = load(folder, name)
        strokes = simulated_strokes(truth, rng)
        if not all((strokes == v).any() for v in (1, 2, 3)):
            continue
        row = []
        for key, scribbles in (("painted with boundary strokes", strokes),
                               ("painted, background + particle only", np.where(strokes == 3, 0, strokes))):
            model = train_classifier([image], [scribbles], **TRAINING)
            methods[key].append(evaluate(separate(image, classifier=model), truth))
            row.append(methods[key][-1]["f1_50"])
        try:
            automatic = separate(image)
        except Exception:  # noqa: BLE001 - no particles found counts as none found
            automatic = np.zeros_like(truth)
        methods["automatic defaults"].append(evaluate(automatic, truth))
        row.append(methods["automatic defaults"][-1]["f1_50"])
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
        print(lines[-1], flush=True)
    pooled = {k: pool_scores(v) for k, v in methods.items()}
    now = datetime.datetime.now(datetime.timezone.utc)
    text = [f"# The app's painted workflow on crowded EMPS images, {now:%Y-%m-%d %H:%M} UTC", "",
            f"`python -m bench.app_painted_emps --images {args.images}`; 2-core CPU, load average "
            f"{os.getloadavg()[0]:.1f}; {time.perf_counter() - started:.0f} s. Training: {TRAINING}.", "",
            "| method | pooled F1@0.5 | mean F1 |", "|---|---|---|"]
    text += [f"| {k} | {p['f1_50']:.3f} | {p['mean_f1']:.3f} |" for k, p in pooled.items()]
    text += ["", "| image | " + " | ".join(methods) + " |", "|---|---|---|---|", *lines, ""]
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"app_painted_emps_{now:%Y-%m-%d}.md"
    out.write_text("\n".join(text))
    print("\n".join(text[4:4 + 2 + len(pooled)]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
