"""``declump batch`` on a folder of real images: wall time and peak memory per engine, and the labels' scores.

    python -m bench.batch [--folder ../shared/data/emps_subset] [--rounds 1] [--out NAME]

Each mode runs ``declump batch FOLDER/images --out TMP`` as a fresh command
(``/usr/bin/time``-free: the wall clock around the process, and the peak
resident memory of the command and its children from ``getrusage``): one
worker thread, two threads, and a local cluster of two worker processes.
The labels of the last mode are scored against ``FOLDER/segmaps`` by ``declump evaluate`` (pooled
F1@0.5, mean F1 per image), which must equal ``bench.defaults_sweep``'s
figure for that folder: the batch runs each image as ``declump run`` does.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import SHARED, machine_info, out_help, positive_int, write_results

MODES = {"1 thread": ["--workers", "1"], "2 threads": ["--workers", "2"],
         "local cluster, 2 processes": ["--cluster", "local", "--workers", "2"]}


def score(folder, out):
    """``declump evaluate OUT FOLDER/segmaps``: pooled F1@0.5 and mean F1 per image."""
    done = subprocess.run([sys.executable, "-m", "gpu_pipeline", "evaluate", str(out), str(folder / "segmaps"),
                           "--json"], capture_output=True, text=True, check=True)
    pooled = json.loads(done.stdout)["pooled"]
    return dict(images=pooled["images"], f1_50_pooled=round(pooled["f1_50_pooled"], 4),
                mean_f1_per_image=round(pooled["mean_f1_per_image"], 4))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=SHARED / "emps_subset",
                        help="a folder holding images/ and segmaps/ (default the shared emps_subset)")
    parser.add_argument("--rounds", type=positive_int, default=1, help="rounds of the three runs (default 1)")
    parser.add_argument("--out", default=None, help=out_help("batch"))
    args = parser.parse_args()
    images = args.folder / "images"
    if not images.is_dir():
        raise SystemExit(f"{images} is not a folder of images (the shared data is needed: ../shared/data)")
    n_images = sum(1 for _ in images.iterdir())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        for round_ in range(args.rounds):
            for mode, options in MODES.items():
                shutil.rmtree(out, ignore_errors=True)
                before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
                started = time.perf_counter()
                done = subprocess.run([sys.executable, "-m", "gpu_pipeline", "batch", str(images), "--out", str(out),
                                       *options], capture_output=True, text=True)
                seconds = time.perf_counter() - started
                if done.returncode != 0:
                    raise SystemExit(f"{mode}: exit {done.returncode}: {done.stderr.strip()[-500:]}")
                peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
                rows.append(dict(round=round_ + 1, mode=mode, seconds=round(seconds, 2),
                                 images_per_second=round(n_images / seconds, 2),
                                 peak_rss_gib=round(peak / 2**20, 2) if peak > before else None))
                print(rows[-1], flush=True)
        scores = score(args.folder, out) if (args.folder / "segmaps").is_dir() else None
    one = min(r["seconds"] for r in rows if r["mode"] == "1 thread")
    scaling = {m: round(one / (2 * min(r["seconds"] for r in rows if r["mode"] == m)), 2) for m in MODES if "2" in m}
    result = dict(machine=machine_info(), folder=str(args.folder), n_images=n_images, rows=rows, scores=scores,
                  scaling_1_to_2=scaling)
    lines = [f"# declump batch on {args.folder.name}, {result['machine']['date'][:10]}", "",
             f"Machine: {result['machine'].get('cpu', '')}, {n_images} images, `python -m bench.batch`. Each mode a "
             "fresh `declump batch` command (start-up included); peak RSS: the largest child process so far "
             "(getrusage), so a later mode shows its own only where it is larger.", "",
             "| round | mode | s | images/s | peak RSS GiB |", "|---|---|---|---|---|"]
    lines += [f"| {r['round']} | {r['mode']} | {r['seconds']} | {r['images_per_second']} | "
              f"{'not above the earlier' if r['peak_rss_gib'] is None else r['peak_rss_gib']} |" for r in rows]
    lines += ["", "Scaling 1 -> 2 (t1 / (2 t2), best of the rounds): "
              + ", ".join(f"{mode} {value:.2f}" for mode, value in scaling.items()) + "."]
    if scores:
        lines += ["", f"Labels of the last mode against the ground truth: pooled F1@0.5 **{scores['f1_50_pooled']}**, "
                      f"mean F1 per image {scores['mean_f1_per_image']} over {scores['images']} images."]
    stem = write_results(result, "batch", "\n".join(lines) + "\n", stem=args.out)
    print(f"wrote {stem}.md")


if __name__ == "__main__":
    main()
