"""`declump run in.zarr out.zarr`: a chunked run from a Zarr store to an OME-Zarr labels group.

Outputs (``out.zarr`` and companions beside it):

- ``out.zarr``: an OME-Zarr (NGFF 0.4, Zarr v2) labels container: root
  attribute ``labels: ["particles"]`` and the label image at
  ``out.zarr/particles/0`` (int32, chunk-aligned with the processing chunks,
  each chunk written by one task), with ``multiscales`` (the input's spacing
  as its scale) and ``image-label`` metadata. The metadata is written last:
  until then the store does not look like a finished label image.
- ``out_particles.parquet``: the per-particle table (the columns of
  :func:`gpu_pipeline.measure.particle_table`), reduced from per-chunk partial sums.
- ``out_overlay.png`` (middle plane) and ``out_summary.json`` (written last).

Work in progress lives in ``out.zarr.work/`` (or ``--scratch``): staged
arrays, saved global results, block markers. The same command after an
interruption resumes from there; a different set of parameters is refused
unless ``--overwrite``. The folder is removed when the run completes.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from gpu_pipeline._backend import DeclumpError, get_array_module, ops_for, to_host
from gpu_pipeline.chunked.workspace import Workspace, active_client, chunk_starts, run_tasks, release_freed_memory, \
    save_parameters, write_blocks
from gpu_pipeline.io import LABEL_NAME, write_ngff_label_metadata
from gpu_pipeline.measure import table_from_sums

@contextlib.contextmanager
def engine(*, cluster=None, scheduler=None, workers=None):
    """The Dask engine for a run: local threads (default), a local cluster, dask-cuda, or an existing scheduler."""
    import dask

    if cluster and scheduler:
        raise DeclumpError("give --cluster or --scheduler, not both")
    if scheduler:
        from distributed import Client

        try:
            client = Client(scheduler, timeout="20s")
        except OSError as exc:
            raise DeclumpError(f"cannot reach the Dask scheduler at {scheduler} ({exc}); start one with "
                               "`dask scheduler` / `dask-cuda-worker`, or drop --scheduler") from exc
        with client:
            yield client
        return
    if cluster == "local-cuda":
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError as exc:
            raise DeclumpError("--cluster local-cuda needs dask-cuda; install the GPU extra "
                               "(pip install 'declump[gpu-cu12]') or use the conda environment.yml") from exc
        from distributed import Client

        with LocalCUDACluster(dashboard_address=None) as lc, Client(lc) as client:
            yield client
        return
    if cluster == "local":
        from distributed import Client, LocalCluster

        with LocalCluster(n_workers=workers or 2, threads_per_worker=1, processes=True,
                          dashboard_address=None) as lc, Client(lc) as client:
            yield client
        return
    if cluster is not None:
        raise DeclumpError(f"--cluster must be 'local' or 'local-cuda', got {cluster!r}")
    with dask.config.set(scheduler="threads", num_workers=workers or os.cpu_count()):
        yield None


def _block_table(labels, image, origin):
    """Per-chunk partial sums for the particle table (host arrays keyed by label id)."""
    xp = get_array_module(labels)
    flat = xp.flatnonzero(labels.ravel())
    ids = labels.ravel()[flat].astype(xp.int64)
    if ids.size == 0:
        return None
    present, inverse, counts = xp.unique(ids, return_inverse=True, return_counts=True)
    inverse = inverse.ravel()
    n = present.size
    coords = [c.astype(xp.int64) + int(o) for c, o in zip(xp.unravel_index(flat, labels.shape), origin)]
    out = {"label": present, "count": counts.astype(xp.int64)}
    for axis, c in enumerate(coords):
        out[f"sum{axis}"] = xp.bincount(inverse, weights=c.astype(xp.float64), minlength=n)
        low = xp.full(n, np.iinfo(np.int64).max, dtype=xp.int64)
        high = xp.full(n, -1, dtype=xp.int64)
        ops_for(labels).scatter_min(low, inverse, c)
        ops_for(labels).scatter_max(high, inverse, c)
        out[f"min{axis}"], out[f"max{axis}"] = low, high
    if image is not None:
        out["intensity"] = xp.bincount(inverse, weights=image.ravel()[flat].astype(xp.float64), minlength=n)
    return {k: to_host(v) for k, v in out.items()}


def table_chunked(labels, image, spacing, n_particles, *, verbose=False):
    """The per-particle table of a chunked label image, from per-chunk partial sums (see `particle_table`)."""
    from dask import delayed

    ndim = labels.ndim
    starts = chunk_starts(labels.chunks)
    l_blocks = labels.to_delayed()
    i_blocks = image.rechunk(labels.chunks).to_delayed() if image is not None else None
    tasks = []
    for index in np.ndindex(*labels.numblocks):
        origin = [int(starts[a][i]) for a, i in enumerate(index)]
        tasks.append(delayed(_block_table)(l_blocks[index], None if i_blocks is None else i_blocks[index], origin))
    parts = [p for p in run_tasks(tasks, "particle table", verbose=verbose) if p is not None]
    n = n_particles + 1
    count = np.zeros(n, np.int64)
    sums = np.zeros((ndim, n))
    low = np.full((ndim, n), np.iinfo(np.int64).max)
    high = np.full((ndim, n), -1, dtype=np.int64)
    intensity = np.zeros(n)
    for p in parts:
        ids = p["label"]
        count[ids] += p["count"]
        for a in range(ndim):
            sums[a, ids] += p[f"sum{a}"]
            low[a, ids] = np.minimum(low[a, ids], p[f"min{a}"])
            high[a, ids] = np.maximum(high[a, ids], p[f"max{a}"])
        if "intensity" in p:
            intensity[ids] += p["intensity"]
    return table_from_sums(count, sums, low, high, intensity if image is not None else None, spacing)


def write_parquet(table, path):
    """Write a particle table as Parquet (atomically)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise DeclumpError("writing the Parquet table needs pyarrow; pip install pyarrow") from exc
    from gpu_pipeline.io import atomic_path

    with atomic_path(path) as tmp:
        pq.write_table(pa.table({k: np.asarray(v) for k, v in table.items()}), tmp)


def output_paths(output):
    output = Path(output)
    stem = output.with_suffix("")
    return {"labels": output, "table": Path(f"{stem}_particles.parquet"), "summary": Path(f"{stem}_summary.json"),
            "overlay": Path(f"{stem}_overlay.png")}


def run_chunked(input_path, output, *, spacing=None, chunks=None, channel=None, timepoint=None, mask_path=None,
                sigma=1.0, threshold="otsu", polarity="auto", min_distance=4.0, min_size=None, max_radius=None,
                neck_ratio=1.0, assignment="power", max_iter=0, device="cpu", cluster=None, scheduler=None,
                workers=None, scratch=None, overwrite=False, verbose=True, classifier=None, probabilities_path=None):
    """Separate a Zarr volume chunk by chunk into an OME-Zarr labels group (see the module docstring).

    ``classifier``: a pixel-classifier model file or shipped name for the
    foreground; ``probabilities_path``: a ``.zarr`` path for its probability
    map (float32, classes first), written before the summary. A boolean
    volume is taken as the foreground mask itself.

    Returns the summary dict (also written to ``*_summary.json``).
    """
    import zarr

    from gpu_pipeline.chunked.pipeline import separate_chunked
    from gpu_pipeline.chunked.source import open_volume
    from gpu_pipeline.io import write_json
    from gpu_pipeline.overlay import write_overlay
    from gpu_pipeline.pipeline import validate_spacing

    started = time.perf_counter()
    input_path = Path(input_path)
    if not input_path.exists():
        raise DeclumpError(f"input {input_path} does not exist; chunked runs read a Zarr array or OME-Zarr image")
    paths = output_paths(output)
    if paths["labels"].suffix.lower() != ".zarr":
        raise DeclumpError(f"chunked output must be a .zarr path, got {paths['labels']}")
    work = Path(scratch) if scratch else Path(f"{paths['labels']}.work")
    volume, file_spacing = open_volume(input_path, channel=channel, timepoint=timepoint, chunks=chunks,
                                       accept_bool=True)
    mask = None
    if mask_path is not None:
        mask, _ = open_volume(mask_path, channel=channel, timepoint=timepoint, chunks=volume.chunksize,
                              accept_bool=True)
        if mask.shape != volume.shape:
            raise DeclumpError(f"--mask has shape {mask.shape} but the volume has shape {volume.shape}; --mask must "
                               "have the volume's shape")
    if classifier is not None and mask is not None:
        raise DeclumpError("--classifier and --mask both give the foreground; use one of them")
    if probabilities_path is not None and classifier is None:
        raise DeclumpError("--save-probabilities writes a pixel classifier's output; add --classifier MODEL")
    if volume.dtype == bool:  # a binary mask (e.g. a network's output) as the input itself
        if classifier is not None or mask is not None:
            raise DeclumpError(f"the input {input_path} is a boolean mask; it is the foreground itself, so it takes "
                               "no --mask or --classifier (give the intensity volume instead)")
        mask, volume = volume, volume.astype(np.uint8)
    model = None
    if classifier is not None:
        from gpu_pipeline.classifier import load_classifier

        model = load_classifier(classifier)
        model.check_image(volume.shape, "the volume")
    spacing = validate_spacing(spacing if spacing is not None else file_spacing, volume.ndim)
    parameters = dict(input=str(input_path.resolve()), mask=str(Path(mask_path).resolve()) if mask_path else None,
                      shape=list(volume.shape), chunks=[int(c[0]) for c in volume.chunks], channel=channel,
                      timepoint=timepoint, spacing=list(spacing), sigma=sigma, threshold=threshold,
                      polarity=polarity, min_distance=min_distance, min_size=min_size, max_radius=max_radius,
                      neck_ratio=neck_ratio, assignment=assignment, max_iter=max_iter)
    if classifier is not None:  # added only when used, so earlier runs' work folders stay resumable
        parameters["classifier"] = str(Path(classifier).resolve()) if Path(str(classifier)).is_file() \
            else str(classifier)

    root_attrs = _existing_attrs(paths["labels"])
    if paths["labels"].exists() and not overwrite:
        if root_attrs is None or "declump" not in root_attrs:
            raise DeclumpError(f"{paths['labels']} exists and was not written by declump; choose another output "
                               "or add --overwrite")
        if root_attrs["declump"].get("parameters") != parameters:
            raise DeclumpError(f"{paths['labels']} was written with other parameters; use the same ones to resume, "
                               "or add --overwrite to start over")
        if root_attrs["declump"].get("complete") and paths["summary"].exists():
            summary = json.loads(paths["summary"].read_text())
            if verbose:
                print(f"{paths['labels']} is already complete ({summary['n_particles']} particles); nothing to do")
            return summary
    if overwrite:
        for key in ("labels", "table", "summary", "overlay"):
            p = paths[key]
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    paths["summary"].unlink(missing_ok=True)
    save_parameters(work, parameters, overwrite=overwrite)
    root = zarr.open_group(str(paths["labels"]), mode="a", zarr_format=2)
    root.attrs["declump"] = {"complete": False, "parameters": parameters}

    workspace = Workspace(work, verbose=verbose)
    release_freed_memory()
    with engine(cluster=cluster, scheduler=scheduler, workers=workers):
        if verbose:
            client = active_client()
            where = f"Dask cluster {client.scheduler.address}" if client else "local threads"
            print(f"declump: {tuple(volume.shape)} voxels in {volume.npartitions} chunks of "
                  f"{volume.chunksize}, spacing {spacing}, on {device} via {where}")
        labels, details = separate_chunked(
            volume, spacing=spacing, sigma=sigma, threshold=threshold, polarity=polarity,
            mask=mask, min_distance=min_distance, min_size=min_size, max_radius=max_radius, neck_ratio=neck_ratio,
            assignment=assignment,
            max_iter=max_iter, workspace=workspace, device=device, verbose=verbose, classifier=model)
        n_particles = details.n_particles
        labels = labels.map_blocks(to_host, dtype=labels.dtype)
        target = paths["labels"] / LABEL_NAME / "0"
        zarr.open_group(str(paths["labels"] / LABEL_NAME), mode="a", zarr_format=2)
        computed = write_blocks(labels, target, work / "output.done", what="write labels", verbose=verbose,
                                zarr_kwargs={"zarr_format": 2})
        details.blocks_computed["output"] = computed
        details.blocks_total["output"] = int(np.prod(labels.numblocks))
        import dask.array as da

        stored = da.from_zarr(str(target), chunks=labels.chunks)
        table = table_chunked(stored, volume, spacing, n_particles, verbose=verbose)
        if probabilities_path is not None:
            from gpu_pipeline.io import atomic_path

            probabilities = details.probabilities.map_blocks(to_host, dtype=np.float32)
            with atomic_path(probabilities_path) as tmp:
                write_blocks(probabilities, tmp, tmp.parent / "written", what="write probabilities",
                             verbose=verbose)
                zarr.open_array(str(tmp), mode="r+").attrs["spacing"] = [float(s) for s in spacing]
            paths["probabilities"] = Path(probabilities_path)
    write_parquet(table, paths["table"])
    middle = volume.shape[0] // 2 if volume.ndim == 3 else slice(None)
    write_overlay(paths["overlay"], np.asarray(volume[middle]), np.asarray(stored[middle]))
    # Completion: metadata that makes it a readable label image, then the summary.
    source = os.path.relpath(input_path.resolve(), (paths["labels"] / LABEL_NAME).resolve())
    write_ngff_label_metadata(paths["labels"], spacing, source,
                              extra={"declump": {"complete": True, "parameters": parameters}})
    diameters = table["equivalent_diameter"]
    summary = {
        "n_particles": n_particles, "spacing": list(spacing), "shape": list(volume.shape),
        "chunks": [int(c[0]) for c in volume.chunks], "threshold": details.threshold, "polarity": details.polarity,
        "n_regions": details.n_regions, "n_peaks": details.n_peaks, "max_radius": details.max_radius,
        "halo_voxels": list(details.halo), "voxels_at_max_radius": details.n_capped_voxels,
        "one_piece_rounds": details.one_piece_rounds,
        "equivalent_diameter_median": float(np.median(diameters)) if len(diameters) else None,
        "blocks_computed": details.blocks_computed, "blocks_total": details.blocks_total,
        "seconds": round(time.perf_counter() - started, 3), "device": device, "parameters": parameters,
        "outputs": {k: str(v) for k, v in paths.items()},
    }
    write_json(paths["summary"], summary)
    shutil.rmtree(work, ignore_errors=True)
    if verbose and details.n_capped_voxels:
        print(f"declump: warning: {details.n_capped_voxels} voxels lie deeper than --max-radius {details.max_radius:g}; "
              "particles that large may be over-split (or merged across wide necks); rerun with a larger "
              "--max-radius")
    return summary


def _existing_attrs(path):
    import zarr

    if not Path(path).exists():
        return None
    try:
        return dict(zarr.open_group(str(path), mode="r").attrs)
    except Exception:
        return None
