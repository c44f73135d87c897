"""``declump batch``: many image files, each run in memory as ``declump run`` runs it, on a Dask engine.

A folder of TEM images, or of DSB-style fluorescence frames, is the common
case: each image is one Dask task (read, separate, write its outputs), so
images run side by side on the engine ``declump run`` uses for chunked
volumes (local threads, a local cluster of processes, dask-cuda, or a
running scheduler). Each image's outputs are those of ``declump run IMAGE
OUT/NAME_labels.tif``, written by the task that made them; then the
combined table (``particles.csv``, one row per particle with its image) and,
last, ``batch_summary.json``, which lists every image with its status. An
image that fails (bad input, nothing found) is one line naming it; the
others go on, and the command exits 2 naming how many failed. The same
command again resumes: an image whose outputs were made from the same file
(path, size, modification time) with the same options (both in its
summary) is kept, not run again; ``--overwrite`` runs every image.
"""
from __future__ import annotations

import csv
import json
import sys
import time
import traceback
from pathlib import Path

from gpu_pipeline._backend import DeclumpError
from gpu_pipeline._common import counted

#: Files a folder given as input contributes (Zarr stores: folders ending in .zarr).
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".npy", ".zarr")
#: The batch's own outputs in the output folder.
TABLE_NAME, SUMMARY_NAME = "particles.csv", "batch_summary.json"
#: What ``batch_summary.json`` repeats of each image's own summary: the automatic choices, so that an image
#: whose choice stands out (another polarity, a radius far from the others') is found without opening each.
CHOICES = ("polarity", "threshold_method", "threshold", "sigma", "particle_radius", "min_distance",
           "equivalent_diameter_median")


def collect_inputs(inputs, out_dir, left_out=None):
    """The image files named by ``inputs`` (files, or folders whose images are taken in name order), checked
    before any work: each exists, the output folder is none of them, and no two share a name (their outputs
    would collide). ``left_out``: a list that receives the other files of those folders (not images declump
    reads: a ``.jpg``, notes), so that the command can say which it left out."""
    out_dir = Path(out_dir).resolve()
    found = []
    for given in inputs:
        path = Path(given)
        if not path.exists():
            raise DeclumpError(f"{given} does not exist; give image files or folders of them "
                               f"({', '.join(IMAGE_SUFFIXES)})")
        if path.resolve() == out_dir:
            raise DeclumpError(f"the output folder {given} is also an input; choose another output folder "
                               "(nothing was written)")
        if path.is_dir() and path.suffix.lower() != ".zarr":
            outputs = declump_outputs(path)
            images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                            and not p.name.startswith(".") and p.resolve().parent != out_dir
                            and p.resolve() not in outputs)
            if not images:
                raise DeclumpError(f"{given} holds no images; accepted: {', '.join(IMAGE_SUFFIXES)} files")
            found.extend(images)
            if left_out is not None:
                left_out.extend(sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                                       and p.suffix.lower() not in IMAGE_SUFFIXES and p.resolve() not in outputs))
        else:
            found.append(path)
    unique = {}
    for path in found:  # a file named twice (given alone and in its folder) runs once
        unique.setdefault(path.resolve(), path)
    found = list(unique.values())
    names = {}
    for path in found:
        names.setdefault(output_name(path), []).append(str(path))
    clashes = {name: paths for name, paths in names.items() if len(paths) > 1}
    if clashes:
        name, paths = next(iter(clashes.items()))
        raise DeclumpError(f"{len(paths)} inputs are named {name} ({', '.join(paths[:3])}): their outputs would "
                           "overwrite each other; rename them or run them in separate batches")
    return found


def declump_outputs(folder):
    """The files in ``folder`` that declump wrote (labels, overlays, histograms of a ``declump run`` into that
    folder), by the summaries it wrote beside them: a folder's images, not its results, make a batch."""
    found = set()
    for summary in Path(folder).glob("*_summary.json"):
        try:
            outputs = json.loads(summary.read_text()).get("outputs", {})
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(outputs, dict):
            found.update(Path(p).resolve() for p in outputs.values() if isinstance(p, str))
    return found


def output_name(path):
    """An image's name in the batch's outputs: its file name without the suffix (``a.ome.tif`` -> ``a``)."""
    name = Path(path).name
    for suffix in (".ome.tif", ".ome.tiff", ".ome.zarr"):
        if name.lower().endswith(suffix):
            return name[:-len(suffix)]
    return Path(name).stem


def image_task(path, out_dir, args, device):
    """One image of the batch, run as ``declump run`` runs it: ``{"input", "name", "status", ...}``. Bad input,
    no particles, a refused write or too little memory are the image's error line. Anything else is a bug,
    reported as the image's error (with its traceback in the batch summary): the other images still run, and
    the batch's summary and table are still written."""
    from gpu_pipeline.cli import memory_error_message, run_file
    from gpu_pipeline.io import write_fault

    name = output_name(path)
    record = {"input": str(path), "name": name}
    output = Path(out_dir) / f"{name}_labels.tif"
    done = None if args.overwrite else finished(output, path, args, device)
    if done is not None:
        return _progress(args, _succeeded(record, done, 0.0, skipped=True))
    started = time.perf_counter()
    try:
        info = run_file(args, str(path), str(output), device, notes=False)
    except DeclumpError as exc:
        error = str(exc)
    except MemoryError as exc:
        error = memory_error_message(exc)
    except Exception as exc:  # noqa: BLE001 (one image's bug is that image's error line, not the batch's end)
        error = write_fault(exc, str(out_dir), "batch") if isinstance(exc, OSError) else None
        if error is None:
            return _progress(args, {**record, "status": "error", "traceback": traceback.format_exc(),
                                    "error": f"unexpected {type(exc).__name__}: {exc} (a declump bug: please report "
                                             "it with this image; the traceback is in the batch summary)"})
    else:
        return _progress(args, _succeeded(record, info, round(time.perf_counter() - started, 3)))
    return _progress(args, {**record, "status": "error", "error": error})


def _succeeded(record, summary, seconds, **extra):
    """An image's entry in ``batch_summary.json`` from its own summary (made now, or before: ``skipped``)."""
    return {**record, "status": "ok", "n_particles": int(summary["n_particles"]), "shape": summary["input_shape"],
            "seconds": seconds, "outputs": summary["outputs"], **extra, **{k: summary.get(k) for k in CHOICES}}


def _progress(args, record):
    """One line on stderr as an image finishes (unless ``--quiet``), a failure's with its cause (the failures are
    reported again at the end, as errors); returns ``record``."""
    if not args.quiet:
        what = ("kept (done before)" if record.get("skipped") else f"failed: {record['error']}"
                if record["status"] != "ok"
                else f"{counted(record['n_particles'], 'particle')}, {record['seconds']:.1f} s")
        print(f"declump: {record['name']}: {what}", file=sys.stderr, flush=True)
    return record


def finished(output, path, args, device):
    """The summary of an earlier run of this image into ``output`` where its outputs are complete and were
    made from the same input file (path, size, modification time) with the same options; else None."""
    from gpu_pipeline.cli import run_options
    from gpu_pipeline.io import input_fingerprint, output_paths

    paths = output_paths(output)
    try:
        done = json.loads(paths["summary"].read_text())
    except (OSError, ValueError):
        return None
    fingerprint = input_fingerprint(path)
    if fingerprint is None or done.get("input") != fingerprint or done.get("options") != run_options(args, device):
        return None
    if not all(Path(p).exists() for p in done.get("outputs", {}).values()):
        return None
    return done


def write_combined_table(records, path):
    """One CSV of every particle of the images that ran, an ``image`` column first (each image's rows as its
    own table has them; 2D and 3D images together leave the other's columns empty)."""
    from gpu_pipeline.io import atomic_path

    columns, rows = ["image"], []
    for record in records:
        if record["status"] != "ok":
            continue
        with open(record["outputs"]["table"], newline="") as f:
            reader = csv.DictReader(f)
            columns += [c for c in reader.fieldnames if c not in columns]
            rows += [{"image": record["name"], **row} for row in reader]
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
    return len(rows)


def run_batch(args, device):
    """Run every image of ``args.inputs`` into ``args.out`` on the engine the options name; returns the summary
    (also written, last, as ``batch_summary.json``)."""
    import dask

    from gpu_pipeline.chunked.run import engine
    from gpu_pipeline.io import check_folders, write_json

    out_dir = Path(args.out)
    check_folders(out_dir, "--out", folder_itself=True, advice="give a folder for the outputs")
    left_out = []
    images = collect_inputs(args.inputs, out_dir, left_out)
    started = time.perf_counter()
    with engine(cluster=args.cluster, scheduler=args.scheduler, workers=args.workers, device=device,
                gpu_threads=args.gpu_threads) as client:
        # (A client the engine started is Dask's default scheduler inside this block; else its threads are.)
        del client
        # The folder once the engine runs (an engine refused leaves none behind), without the summary of an
        # earlier batch, so that an interrupted one leaves none that looks complete.
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / SUMMARY_NAME).unlink(missing_ok=True)
        tasks = [dask.delayed(image_task, pure=False)(str(p), str(out_dir.resolve()), args, device) for p in images]
        records = list(dask.compute(*tasks))
    failed = [r for r in records if r["status"] != "ok"]
    n_rows = write_combined_table(records, out_dir / TABLE_NAME)
    summary = {"n_images": len(records), "n_ok": len(records) - len(failed), "n_failed": len(failed),
               "n_particles": n_rows, "seconds": round(time.perf_counter() - started, 3), "device": device,
               "engine": {"cluster": args.cluster, "scheduler": args.scheduler, "workers": args.workers},
               "table": str(out_dir / TABLE_NAME), "left_out": [str(p) for p in left_out], "images": records}
    write_json(out_dir / SUMMARY_NAME, summary)
    return summary
