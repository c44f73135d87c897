"""`declump run in.zarr out.zarr`: a chunked run from a Zarr store to an OME-Zarr labels group.

Outputs (``out.zarr`` and companions beside it):

- ``out.zarr``: an OME-Zarr (NGFF 0.4, Zarr v2) labels container: root
  attribute ``labels: ["particles"]`` and the label image at
  ``out.zarr/particles/0`` (int32, chunk-aligned with the processing chunks,
  each chunk written by one task), with ``multiscales`` (the input's spacing
  as its scale) and ``image-label`` metadata. That metadata and the root's
  ``declump: {complete: true}`` are written after every other file but the
  summary, which comes last: until then the store does not look like a
  finished label image.
- ``out_particles.parquet``: the per-particle table (the columns of
  :func:`gpu_pipeline.measure.particle_table`), reduced from per-chunk partial sums.
- ``out_overlay.png`` (middle plane) and ``out_summary.json``.

Work in progress lives in ``out.zarr.work/`` (or a folder of its own in ``--scratch``, :func:`work_folder`): staged
arrays, saved global results, block markers, the parameters and the input's
fingerprint (:func:`~gpu_pipeline.chunked.source.fingerprint`). The same
command after an interruption resumes from there; other parameters or a
changed input are refused unless ``--overwrite``. The folder is removed when
the run completes (or, if left behind, by the next run of the same command).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from gpu_pipeline._backend import DeclumpError, get_array_module, gpu_count, ops_for, to_host
from gpu_pipeline._common import (ChunkShapeError, ScratchSpaceError, UnreadableChunkError, UnusableValuesError,
                                  usable_cores, whole_number_at_least)
from gpu_pipeline.chunked.workspace import (LOCAL_CLUSTER_HTTP, Workspace, active_client, fewer_full_collections,
                                            local_cluster_config, own_worker_setup, return_freed_memory, run_lock,
                                            run_malloc_setup, save_records, write_blocks)
from gpu_pipeline.io import (DISK_FAULTS, LABEL_NAME, PROBABILITIES_MARK, boolean_input_as_mask, check_folders,
                             check_foreground_options, check_not_inputs, check_replaceable_outputs, disk_error,
                             ngff_levels, open_zarr, output_paths, remove_stale_table, run_inputs, run_outputs,
                             spatial_unit, write_label_levels, write_ngff_label_metadata)
from gpu_pipeline.measure import summary as size_summary, table_from_sums

#: On --device gpu, CuPy's memory pool on every GPU worker is capped at this fraction of the device's
#: memory (CuPy's own CUPY_GPU_MEMORY_LIMIT, when set, wins): cached blocks of earlier chunks are
#: reused up to the cap and freed before an allocation would pass it, instead of the pool growing
#: until a differently shaped chunk fails.
GPU_POOL_FRACTION = 0.8


def engine_plan(*, device="cpu", cluster=None, scheduler=None, workers=None, n_gpus=0, have_dask_cuda=False,
                gpu_threads=1):
    """Which Dask engine a run uses: ``(kind, n_workers)``, kind one of threads, local, local-cuda, scheduler.

    On the GPU every worker owns one device: ``gpu_threads`` threads (default
    1) for one GPU, a dask-cuda ``LocalCUDACluster`` (one worker per GPU, of
    ``gpu_threads`` threads) for several, never ``usable_cores()`` threads or
    CPU worker processes sharing a device. Threads of one process share the
    device's context and CuPy's memory pool; each works on its own chunk, so
    one chunk's Zarr reads and writes and host steps can overlap another's
    GPU work.
    """
    if cluster and scheduler:
        raise DeclumpError("give --cluster or --scheduler, not both")
    if not whole_number_at_least(gpu_threads, 1):
        raise DeclumpError(f"--gpu-threads must be a whole number of at least 1, got {gpu_threads!r}")
    if workers is not None and not whole_number_at_least(workers, 1):
        raise DeclumpError(f"--workers must be a whole number of at least 1 (or left out: one per core), got "
                           f"{workers!r}")
    if gpu_threads != 1 and device != "gpu":
        raise DeclumpError(f"--gpu-threads {gpu_threads} applies to --device gpu (host threads per GPU); CPU runs "
                           "take --workers")
    if cluster not in (None, "local", "local-cuda"):
        raise DeclumpError(f"--cluster must be 'local' or 'local-cuda', got {cluster!r}")
    if scheduler:
        wrong = scheduler_address_error(scheduler)
        if wrong:
            raise DeclumpError(wrong)
        if workers is not None:
            raise DeclumpError(f"--workers {workers} applies to the engines this command starts; a running "
                               "scheduler's workers are the ones started for it (dask worker --nworkers)")
        if gpu_threads != 1:
            raise DeclumpError(f"--gpu-threads {gpu_threads} applies to the workers this command starts; the workers "
                               f"of a running scheduler take theirs when started (dask cuda worker --nthreads "
                               f"{gpu_threads})")
        return "scheduler", None
    if device != "gpu":
        if cluster == "local-cuda":
            return "local-cuda", None
        return ("local" if cluster == "local" else "threads"), workers or usable_cores()
    if cluster == "local":
        raise DeclumpError("--cluster local starts CPU worker processes that would share one GPU; with --device gpu "
                           "use --cluster local-cuda (one worker per GPU) or no --cluster")
    if cluster == "local-cuda" or (n_gpus > 1 and have_dask_cuda and not workers):
        return "local-cuda", None
    if workers and workers > 1:
        raise DeclumpError(f"--workers {workers} with --device gpu would put {workers} workers on one GPU; the GPU "
                           "engine runs one worker per GPU (--cluster local-cuda for several GPUs; --gpu-threads "
                           "for more host threads on each)")
    return "threads", int(gpu_threads)


def _gpu_worker_setup(fraction=GPU_POOL_FRACTION):
    """Pin CuPy's pool on this process's GPU (see GPU_POOL_FRACTION); run on every GPU worker."""
    if os.environ.get("CUPY_GPU_MEMORY_LIMIT"):
        return False
    from gpu_pipeline import ops_cuda

    return ops_cuda.limit_memory_pool(fraction)


def _setup_workers(client, device, gpu_error, own=True):
    """Every worker of ``client``: glibc's malloc for chunk-sized arrays (run_malloc_setup), on workers
    this command started (``own``) no log records that repeat what the command reports and Ctrl-C left to
    the command (own_worker_setup), and on ``device="gpu"`` the CuPy pool cap (_gpu_worker_setup);
    ``gpu_error`` starts the error if that fails."""
    client.run(run_malloc_setup)
    if own:
        client.run(own_worker_setup)
    if device != "gpu":
        return
    try:
        client.run(_gpu_worker_setup)
    except Exception as exc:
        raise DeclumpError(f"{gpu_error} ({type(exc).__name__}: {exc}); start them with dask-cuda-worker, or "
                           "drop --device gpu") from exc


@contextlib.contextmanager
def _quiet_interrupt():
    """Ctrl-C during a run on a Dask cluster (one the command started, or a running one's client): this
    process's logging is off from the interrupt until the cluster or the client has closed (then back as it
    was).

    Dask logs its own stop between Ctrl-C and the command's one line: an
    interrupted gather gave "Couldn't gather keys", "rescheduling" and a
    callback's NameError traceback from ``distributed.utils.sync`` (12 lines,
    2026-12-04). The handler turns logging off before it raises
    ``KeyboardInterrupt``, so before any of that. Only in the main thread,
    and only where Python's own handler is in place (a caller's handler is
    left alone).
    """
    import logging
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    level = logging.root.manager.disable

    def interrupted(signum, frame):
        logging.disable(logging.CRITICAL)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        logging.disable(level)


@contextlib.contextmanager
def _environ_restored():
    """``os.environ`` as it was, once the block ends. Dask's nanny sets its ``pre-spawn-environ`` (its own
    ``OMP_NUM_THREADS=1`` and the like, and :func:`local_cluster_config`'s malloc settings) in the process
    that runs it, which is this one for the clusters a run starts: a Python session's later subprocesses
    would inherit them."""
    before = dict(os.environ)
    try:
        yield
    finally:
        for name in set(os.environ) - set(before):
            del os.environ[name]
        os.environ.update(before)


class _LostSchedulerLog(logging.Filter):
    """Drops the client's tracebacks of its attempts to reach a scheduler that went away (a run reports the
    loss in one line, :func:`~gpu_pipeline.chunked.workspace.worker_deaths`)."""

    def filter(self, record):
        error = record.exc_info[1] if record.exc_info else None
        return not (isinstance(error, OSError)  # (CommClosedError, ConnectionRefusedError: OSErrors)
                    or str(record.msg).startswith("Failed to reconnect to scheduler"))


@contextlib.contextmanager
def _quiet_lost_scheduler():
    log, drop = logging.getLogger("distributed.client"), _LostSchedulerLog()
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


#: The refusal of ``--cluster local-cuda`` where dask-cuda is not installed.
DASK_CUDA_MISSING = ("--cluster local-cuda needs dask-cuda; install the GPU extra (pip install 'declump[gpu-cu12]') "
                     "or use the conda environment.yml")
#: Seconds a run waits for a running scheduler to answer (``--scheduler``).
CONNECT_SECONDS = 20


def scheduler_address_error(address):
    """Why ``address`` cannot be a Dask scheduler's address (a missing port, an http:// one), or None."""
    from distributed.comm.addressing import get_address_host_port

    try:
        get_address_host_port(str(address))
    except ValueError as exc:
        return (f"--scheduler {address} is not a Dask scheduler's address ({exc}); give tcp://HOST:PORT, the "
                "scheduler's port (8786 by default, not the dashboard's 8787), as `dask scheduler` prints it or "
                "its --scheduler-file holds it")
    return None


def connect_scheduler(address, seconds=CONNECT_SECONDS):
    """A ``distributed.Client`` of the running scheduler at ``address``, or one line saying why not.

    Dask's own timeout covers reaching the address, not the handshake after it: a service that accepts the
    connection without speaking Dask's protocol (the dashboard's port, a web server) held the command without
    a word until it was killed, and one that answered in HTTP was read as a frame of 3 EiB (a MemoryError).
    The client is made in a daemon thread, waited for at most ``seconds`` more.
    """
    import threading

    from distributed import Client

    found = {}

    def connect():
        try:
            found["client"] = Client(address, timeout=f"{seconds}s")
        except BaseException as exc:  # noqa: BLE001 (handed to the caller's thread)
            found["error"] = exc

    thread = threading.Thread(target=connect, name="declump-connect", daemon=True)
    thread.start()
    thread.join(seconds + 5)
    error = found.get("error")
    if thread.is_alive() or (error is not None and not isinstance(error, OSError)):
        raise DeclumpError(f"the service at {address} does not answer as a Dask scheduler"
                           f"{f' ({type(error).__name__})' if error is not None else f' (nothing in {seconds + 5} s)'}; "
                           "give the scheduler's address (port 8786 by default, not the dashboard's 8787)")
    if error is not None:
        raise DeclumpError(f"cannot reach the Dask scheduler at {address} ({error}); start one with "
                           "`dask scheduler` / `dask-cuda-worker`, or drop --scheduler") from error
    client = found["client"]
    if not client.scheduler_info().get("workers"):
        print(f"declump: note: the scheduler at {address} has no workers yet; the run waits for them (start them "
              "with `dask worker ADDRESS` or `dask-cuda-worker ADDRESS`)", file=sys.stderr)
    return client


@contextlib.contextmanager
def engine(*, cluster=None, scheduler=None, workers=None, device="cpu", gpu_threads=1):
    """The Dask engine for a run (:func:`engine_plan`): local threads, a local cluster, dask-cuda or a scheduler."""
    import dask

    n_gpus, have_dask_cuda = 0, False
    if device == "gpu":
        import importlib.util

        n_gpus = gpu_count()
        have_dask_cuda = importlib.util.find_spec("dask_cuda") is not None
    kind, n_workers = engine_plan(device=device, cluster=cluster, scheduler=scheduler, workers=workers,
                                  n_gpus=n_gpus, have_dask_cuda=have_dask_cuda, gpu_threads=gpu_threads)
    if kind == "scheduler":
        client = connect_scheduler(scheduler)
        with _quiet_interrupt(), _quiet_lost_scheduler(), client:
            _setup_workers(client, device, f"the workers at {scheduler} cannot use a GPU", own=False)
            yield client
        return
    if kind in ("local", "local-cuda"):
        from distributed import Client  # (and distributed's defaults, its nanny's environment, into dask.config)

        # Workers we start get glibc's malloc as the threaded engine has it (run_malloc_setup) from their
        # start, instead of the 64 KiB trim threshold that Dask's nanny gives them; the cluster runs without
        # the dashboard's timed diagnostics (QUIET_DIAGNOSTICS).
        environ = local_cluster_config()
    if kind == "local-cuda":
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError as exc:
            raise DeclumpError(DASK_CUDA_MISSING) from exc
        with _quiet_interrupt(), _environ_restored(), dask.config.set(environ), \
                LocalCUDACluster(threads_per_worker=gpu_threads, **LOCAL_CLUSTER_HTTP) as lc, \
                Client(lc) as client:
            _setup_workers(client, device, "the dask-cuda workers cannot use a GPU")
            yield client
        return
    if kind == "local":
        from distributed import LocalCluster

        with _quiet_interrupt(), _environ_restored(), dask.config.set(environ), \
                LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                             **LOCAL_CLUSTER_HTTP) as lc, Client(lc) as client:
            _setup_workers(client, device, "")
            yield client
        return
    if device == "gpu":
        _gpu_worker_setup()
    import dask.threaded

    # The scheduler function itself, not its name: Dask looks a named scheduler up by importing
    # dask.distributed first (about a second of a run that never uses it).
    with dask.config.set(scheduler=dask.threaded.get, num_workers=n_workers):
        yield None


def _block_table(labels, image, origin):
    """Per-chunk partial sums for the particle table (host arrays keyed by label id), global coordinates."""
    sums = ops_for(labels).label_sums(labels, image)
    if sums["label"].size == 0:
        return None
    xp = get_array_module(sums["count"])
    out = {"label": sums["label"], "count": sums["count"]}
    for axis, o in enumerate(origin):
        # Integer sums in float64: exact, so adding the origin once per voxel here equals summing shifted ones.
        out[f"sum{axis}"] = sums["sum"][axis] + float(int(o)) * sums["count"].astype(xp.float64)
        out[f"min{axis}"], out[f"max{axis}"] = sums["low"][axis] + int(o), sums["high"][axis] + int(o)
    if image is not None:
        out["intensity"] = sums["intensity"]
    return {k: to_host(v) for k, v in out.items()}


#: The most pixels of the chunked run's preview plane (its overlay picture, the middle plane of a volume or a 2D
#: image whole): the command assembles that plane in its own process from the output pass's blocks, so a 2D
#: montage or a terabyte volume's plane is drawn every k-th pixel per axis (:func:`preview_stride`), not held
#: whole (a 40,000^2 montage's labels are 6.4 GB, its overlay 4.8 GB more).
PREVIEW_PIXELS = 1 << 24


def preview_stride(shape):
    """The step per axis at which the preview samples a plane of ``shape``: the smallest with at most
    :data:`PREVIEW_PIXELS` pixels (1 for any plane up to 4096^2)."""
    step = max(1, math.isqrt(math.prod(int(n) for n in shape) // PREVIEW_PIXELS))
    while math.prod(-(-int(n) // step) for n in shape) > PREVIEW_PIXELS:
        step += 1
    return step


def _block_outputs(labels, image, origin, *, plane, stride=1):
    """What the output pass keeps of one block: its partial sums (:func:`_block_table`) and its part of the
    preview ``plane`` (the index along the first axis; None: a 2D image, whole), every ``stride``-th pixel
    of the volume's grid per axis (:func:`preview_stride`), as ``(origin in the preview, labels, image)``, or
    None where the block does not cross that plane (or holds none of its sampled pixels)."""
    part = None
    if plane is None or int(origin[0]) <= plane < int(origin[0]) + labels.shape[0]:
        corner = [int(o) for o in origin][plane is not None:]
        first = [-o % stride for o in corner]  # the block's first pixel on the preview's grid, per axis
        at = (() if plane is None else (plane - int(origin[0]),)) + tuple(slice(f, None, stride) for f in first)
        # Copies: a view would keep the whole block alive with the result (all the plane's blocks at the end).
        part = ([(o + f) // stride for o, f in zip(corner, first)], to_host(labels[at]).copy(),
                to_host(image[at]).copy())
        if not part[1].size:
            part = None
    return {"table": _block_table(labels, image, origin), "plane": part}


def preview_planes(parts, shape, dtypes, stride=1):
    """The preview plane (image, labels) of a plane of ``shape`` sampled every ``stride``-th pixel, assembled from
    :func:`_block_outputs`' parts."""
    image, labels = (np.zeros(tuple(-(-int(n) // stride) for n in shape), dtype=d) for d in dtypes)
    for origin, label_part, image_part in (p["plane"] for p in parts if p["plane"] is not None):
        at = tuple(slice(o, o + n) for o, n in zip(origin, label_part.shape))
        labels[at], image[at] = label_part, image_part
    return image, labels


def table_from_parts(parts, ndim, spacing, n_particles, with_intensity):
    """The per-particle table reduced from the per-chunk partial sums of :func:`_block_table`."""
    parts = [p for p in parts if p is not None]
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
    return table_from_sums(count, sums, low, high, intensity if with_intensity else None, spacing)


def write_parquet(table, path):
    """Write a particle table as Parquet (atomically)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise DeclumpError("writing the Parquet table needs pyarrow; pip install pyarrow") from exc
    from gpu_pipeline.io import atomic_path

    with atomic_path(path) as tmp:
        columns = {k: _arrow_column(pa, np.asarray(v)) for k, v in table.items()}
        pq.write_table(pa.Table.from_arrays(list(columns.values()), names=list(columns)), tmp)


def _arrow_column(pa, values):
    """A 1D NumPy array as an Arrow array. Numbers are wrapped without a copy through their buffer:
    ``pa.array`` would first import pandas (0.3 s of a run's start) to check for pandas objects."""
    if values.ndim == 1 and values.dtype.kind in "iuf":
        values = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("="))
        return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)])
    return pa.array(values)


def run_chunked(input_path, output, *, spacing=None, chunks=None, channel=None, timepoint=None, mask_path=None,
                sigma=1.0, threshold="otsu", polarity="auto", min_distance=4.0, min_size=None, max_radius=None,
                neck_ratio="auto", nearby_ratio="auto", peak_reach="auto", reach_share="auto", ball_share="auto",
                assignment="power", max_iter=0, device="cpu", cluster=None, scheduler=None, workers=None,
                scratch=None, scratch_limit=None, overwrite=False, missing_chunks="error", verbose=True,
                classifier=None, probabilities_path=None, gpu_threads=1, notes=(), notes_2d=(), voxel_defaults=None):
    """Separate a Zarr volume chunk by chunk into an OME-Zarr labels group (see the module docstring).

    ``notes``: lines to print on stderr (with ``verbose``) once the input and every parameter have been
    checked (the command's note on the values it fixed: a refusal stays one line); ``notes_2d`` too, where
    the input is 2D.

    ``scratch_limit``: bytes the work folder may take (a quota its file system's free space does not show):
    the smoothed volume is then staged only within it, and a classifier's probabilities refused beyond it
    (:meth:`~gpu_pipeline.chunked.workspace.Workspace.room_needed`). The labels do not depend on it.

    ``missing_chunks``: ``"error"`` (default) refuses an input or mask with a
    missing chunk file; ``"fill"`` reads it as the fill value (see
    :func:`~gpu_pipeline.chunked.source.open_volume`).

    ``chunks``: the processing block shape; default: the store's chunks
    grouped by :func:`~gpu_pipeline.chunked.source.default_blocks`.

    ``gpu_threads``: with ``device="gpu"``, host threads per GPU (default 1),
    each on its own chunk (:func:`engine_plan`); each holds one chunk's
    working set in the GPU's memory. The labels do not depend on it.

    ``classifier``: a pixel-classifier model file or shipped name for the
    foreground; ``probabilities_path``: a ``.zarr`` path for its probability
    map (float32, classes first), written before the summary. A boolean
    volume is taken as the foreground mask itself.

    ``voxel_defaults``: ``{"sigma": ..., "min_distance": ...}`` given in voxels
    of the volume's finest axis instead of physical units (the command's
    values where the user gave none): they become ``value * min(spacing)``
    once the spacing is known, and a note says so where that is not 1.

    Returns the summary dict (also written to ``*_summary.json``).

    Raises
    ------
    DeclumpError
        On bad input, on an output or work folder left by another run or
        another input (unless ``overwrite``), and when the disk refuses a
        write (read-only, full): the run is then not marked complete, and the
        same call resumes once the disk is writable again.
    """
    from gpu_pipeline.chunked.pipeline import chunked_parameters
    from gpu_pipeline.chunked.source import open_volume
    from gpu_pipeline.io import input_fingerprint
    from gpu_pipeline.pipeline import validate_file_spacing, validate_spacing

    # Absolute paths: the tasks run on workers, and those of a running cluster (``scheduler``) were started in
    # folders of their own, where a relative path would name another place.
    input_path = Path(input_path).absolute()
    output = Path(output).absolute()
    scratch = Path(scratch).absolute() if scratch else None
    mask_path = Path(mask_path).absolute() if mask_path is not None else None
    probabilities_path = Path(probabilities_path).absolute() if probabilities_path is not None else None
    if not input_path.exists():
        raise DeclumpError(f"input {input_path} does not exist; chunked runs read a Zarr array or OME-Zarr image")
    paths = output_paths(output, table=".parquet")
    if paths["labels"].suffix.lower() != ".zarr":
        raise DeclumpError(f"chunked output must be a .zarr path, got {paths['labels']}")
    engine_plan(device=device, cluster=cluster, scheduler=scheduler, workers=workers, n_gpus=1,
                gpu_threads=gpu_threads)  # refuse early
    run_malloc_setup()  # before Zarr's I/O threads allocate
    work = work_folder(paths["labels"], scratch)
    check_not_inputs(run_outputs(paths, probabilities_path, work), run_inputs(input_path, mask_path, classifier))
    check_folders(paths["labels"])
    # A user's folder at a companion's path (the labels' own path: below, a file there too).
    check_replaceable_outputs(run_outputs({k: v for k, v in paths.items() if k != "labels"}, probabilities_path))
    check_folders(work, "work folder", folder_itself=True, advice="give --scratch a folder that can be created and "
                  "written (or leave it out: beside the output)")
    volume, file_spacing, volume_print = open_volume(input_path, channel=channel, timepoint=timepoint,
                                                     chunks=chunks or "auto", missing_chunks=missing_chunks,
                                                     return_fingerprint=True, accept_bool=True)
    mask = mask_print = None
    if mask_path is not None:
        if not mask_path.exists():
            raise DeclumpError(f"--mask {mask_path} does not exist; a chunked run takes its mask as a Zarr array of "
                               "the volume's shape")
        try:
            # Its shape first: opened in the volume's blocks, a mask of other dimensions was refused for --chunks.
            array, selection, _ = open_zarr(mask_path, channel=channel, timepoint=timepoint)
            shape = tuple(n for n, item in zip(array.shape, selection) if isinstance(item, slice))
            if shape == tuple(volume.shape):
                mask, _, mask_print = open_volume(mask_path, channel=channel, timepoint=timepoint,
                                                  chunks=volume.chunksize, missing_chunks=missing_chunks,
                                                  return_fingerprint=True, accept_bool=True)
        except DeclumpError as exc:  # named as the mask: the messages name a path, not which of the two it is
            raise DeclumpError(f"--mask: {exc}") from exc
        if shape != tuple(volume.shape):
            raise DeclumpError(f"--mask has shape {shape} but the volume has shape {tuple(volume.shape)}; --mask must "
                               "have the volume's shape")
    check_foreground_options(mask=mask, classifier=classifier, probabilities_path=probabilities_path)
    volume, mask = boolean_input_as_mask(volume, mask, classifier=classifier, input_path=input_path, what="volume")
    model = None
    if classifier is not None:
        from gpu_pipeline.classifier import load_classifier

        model = load_classifier(classifier)
        model.check_image(volume.shape, "the volume")
    # Lengths in voxels where neither --spacing nor the store gives one: "px", as in memory.
    unit = (spatial_unit(input_path) if file_spacing is not None else "px") if spacing is None else None
    levels = ngff_levels(input_path) if spacing is None and file_spacing is not None else None
    spacing = (validate_spacing(spacing, volume.ndim) if spacing is not None or file_spacing is None
               else validate_file_spacing(file_spacing, volume.ndim, input_path))
    if voxel_defaults:
        finest = min(spacing)
        physical = {name: float(voxels) * finest for name, voxels in voxel_defaults.items()}
        sigma, min_distance = physical.get("sigma", sigma), physical.get("min_distance", min_distance)
        if finest != 1:
            notes = [*notes, "declump: at spacing " + ", ".join(f"{s:g}" for s in spacing) +
                     (f" {unit}" if unit else "") + ": " + ", ".join(
                         f"--{name.replace('_', '-')} {voxel_defaults[name]:g} voxels = {value:g}"
                         for name, value in physical.items())]
    if model is not None:
        from gpu_pipeline.classifier import spacing_note

        notes = [*notes, *[note for note in [spacing_note(model, spacing, unit)] if note]]
        if "boundary" in model.classes:  # (in memory the split follows it: other particles, said, not silent)
            notes.append("declump: note: chunked runs split by the distance map and do not follow the model's "
                         "boundary class, as in-memory runs do (the boundary split is not local); the particles "
                         "can differ from an in-memory run's")
    # Every parameter checked before a folder is touched: a bad one is reported as such (not as a work folder
    # "with other parameters") and leaves nothing behind.
    chunked_parameters(volume.ndim, sigma=sigma, min_distance=min_distance, min_size=min_size, max_radius=max_radius,
                       max_iter=max_iter, neck_ratio=neck_ratio, nearby_ratio=nearby_ratio, peak_reach=peak_reach,
                       reach_share=reach_share, ball_share=ball_share)
    parameters = dict(input=str(input_path.resolve()), mask=str(Path(mask_path).resolve()) if mask_path else None,
                      shape=list(volume.shape), chunks=[int(c[0]) for c in volume.chunks], channel=channel,
                      timepoint=timepoint, spacing=list(spacing), sigma=sigma, threshold=threshold,
                      polarity=polarity, min_distance=min_distance, min_size=min_size, max_radius=max_radius,
                      neck_ratio=neck_ratio, nearby_ratio=nearby_ratio, peak_reach=peak_reach,
                      reach_share=reach_share, ball_share=ball_share, assignment=assignment, max_iter=max_iter)
    inputs = {"input": volume_print, "mask": mask_print}
    for note in [*notes, *(notes_2d if volume.ndim == 2 else ())] if verbose else ():
        print(note, file=sys.stderr)
    changed = (f"{input_path}{' or ' + str(mask_path) if mask_path else ''} changed (shape, dtype, chunking, "
               "codecs, or its chunk files' sizes or times)")
    if classifier is not None:  # added only when used, so earlier runs' work folders stay resumable
        model_file = Path(str(classifier)).is_file()
        parameters["classifier"] = str(Path(classifier).resolve()) if model_file else str(classifier)
        if model_file:
            # A model retrained or replaced under the same name makes other probabilities: neither an output
            # made with the old one is "complete", nor may its unfinished blocks be resumed with the new one.
            inputs["classifier"] = input_fingerprint(classifier)
            changed = (f"{input_path}{', ' + str(mask_path) if mask_path else ''} or the model {classifier} changed "
                       "(a volume's shape, dtype, chunking, codecs or chunk files; the model file's size or time)")

    # One run per output at a time: held until this run has finished or stopped (see run_lock).
    with run_lock(paths["labels"]):
        root_attrs = _existing_attrs(paths["labels"])
        if paths["labels"].exists() and (root_attrs is None or "declump" not in root_attrs):
            # Never replaced, --overwrite or not (as an in-memory run's output): a user's store or file.
            raise DeclumpError(f"{paths['labels']} exists and was not written by declump; choose another output "
                               "(nothing was replaced)")
        if work.exists() and not is_work_folder(work):
            raise DeclumpError(f"the work folder {work} exists and is not a declump run's; choose another "
                               f"{'--scratch' if scratch else 'output'} (nothing was replaced)")
        if paths["labels"].exists() and not overwrite:
            if root_attrs["declump"].get("parameters") != parameters:
                raise DeclumpError(f"{paths['labels']} was written with other parameters; use the same ones to resume, "
                                   "or add --overwrite to start over")
            if root_attrs["declump"].get("inputs") != inputs:
                raise DeclumpError(f"{changed} since {paths['labels']} was written; add --overwrite to start over")
            if root_attrs["declump"].get("complete") and paths["summary"].exists():
                summary = json.loads(paths["summary"].read_text())
                saved = summary.get("outputs", {}).get("probabilities")
                if probabilities_path is not None and (saved is None or Path(saved) != probabilities_path
                                                       or not probabilities_path.exists()):
                    # Not one of the run's parameters (they set the labels): the finished run did not save them.
                    raise DeclumpError(f"{paths['labels']} is already complete, without the probabilities that "
                                       f"--save-probabilities asks for ({probabilities_path}); add --overwrite to "
                                       "run it again and save them")
                # A run killed after completing but before removing its work folder left it behind.
                shutil.rmtree(work, ignore_errors=True)
                if verbose:
                    print(f"{paths['labels']} is already complete ({summary['n_particles']} particles); nothing to do")
                return summary
        work_existed = work.exists()
        try:
            with fewer_full_collections():
                return _run(volume, mask, spacing, parameters, inputs, changed, paths, work, input_path,
                            device=device, cluster=cluster, scheduler=scheduler, workers=workers, gpu_threads=gpu_threads,
                            scratch_limit=scratch_limit, overwrite=overwrite, verbose=verbose,
                            model=model, probabilities_path=probabilities_path, unit=unit, levels=levels)
        except OSError as exc:
            if exc.errno not in DISK_FAULTS:
                raise
            raise DeclumpError(disk_error(exc, work)) from exc
        except DeclumpError as exc:
            from gpu_pipeline.pipeline import NoParticlesError

            # Nothing in the work folder can be resumed where this input and these parameters decided the stop (the
            # same command stops the same way again; keeping it refused the next command, other parameters or the
            # input fixed, as "an unfinished run" until --overwrite), or where bad input was found before anything
            # was computed. Leave no folder behind that a later run would trip on.
            # A work folder this run made and found no room in, before any staged pass was complete, holds
            # nothing to resume.
            if isinstance(exc, (NoParticlesError, UnusableValuesError, ChunkShapeError, UnreadableChunkError)) or (
                    not work_existed and work.is_dir() and (
                        {p.name for p in work.iterdir()} <= RECORDS
                        or isinstance(exc, ScratchSpaceError) and not any(work.glob("*.done/complete")))):
                shutil.rmtree(work, ignore_errors=True)
            raise


#: The files a chunked run writes in its work folder before computing anything.
RECORDS = {"parameters.json", "inputs.json"}


def work_folder(labels, scratch=None):
    """A chunked run's work folder: ``OUTPUT.work`` beside the output, or a folder of its own in ``scratch``
    named after the output (the same output gets the same folder, so that a stopped run resumes from it).

    ``scratch`` itself is never removed: it is a folder the user names (a node's local disk, ``$SCRATCH``)
    and may hold anything else.
    """
    labels = Path(labels)
    if scratch is None:
        return Path(f"{labels}.work")
    digest = hashlib.sha256(str(labels.resolve()).encode()).hexdigest()[:12]
    return Path(scratch) / f"declump-{labels.name}-{digest}.work"


def is_work_folder(path):
    """Is the existing ``path`` a folder a chunked run may remove: empty, or holding a run's records?"""
    path = Path(path)
    return path.is_dir() and (not any(path.iterdir()) or any((path / name).exists() for name in RECORDS))


def _run(volume, mask, spacing, parameters, inputs, changed, paths, work, input_path, *, device, cluster,
         scheduler, workers, gpu_threads, overwrite, verbose, scratch_limit=None, model=None, probabilities_path=None,
         unit=None, levels=None):
    import zarr

    from gpu_pipeline.chunked.pipeline import separate_chunked
    from gpu_pipeline.io import write_json
    from gpu_pipeline.overlay import write_overlay
    from gpu_pipeline.plots import write_size_histogram

    started = time.perf_counter()
    p = parameters
    remove_stale_table(paths)
    if overwrite:
        for key in ("labels", "table", "summary", "overlay", "histogram"):
            path = paths[key]
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    paths["summary"].unlink(missing_ok=True)
    save_records(work, {
        "parameters.json": (parameters, f"{work} holds an unfinished run with other parameters; rerun with those, "
                                        "or add --overwrite to start over"),
        "inputs.json": (inputs, f"{changed} since the unfinished run in {work} started; add --overwrite to start "
                                "over")}, overwrite=overwrite)
    workspace = Workspace(work, verbose=verbose, limit=scratch_limit)
    with engine(cluster=cluster, scheduler=scheduler, workers=workers, device=device, gpu_threads=gpu_threads):
        if verbose:
            client = active_client()
            where = f"Dask cluster {client.scheduler.address}" if client else "local threads"
            print(f"declump: {tuple(volume.shape)} voxels in {volume.npartitions} chunks of "
                  f"{volume.chunksize}, spacing {spacing}, on {device} via {where}", file=sys.stderr)
        labels, details = separate_chunked(
            volume, spacing=spacing, sigma=p["sigma"], threshold=p["threshold"], polarity=p["polarity"],
            mask=mask, min_distance=p["min_distance"], min_size=p["min_size"], max_radius=p["max_radius"],
            neck_ratio=p["neck_ratio"], nearby_ratio=p["nearby_ratio"], peak_reach=p["peak_reach"],
            reach_share=p["reach_share"], ball_share=p["ball_share"], assignment=p["assignment"],
            max_iter=p["max_iter"], workspace=workspace, device=device, verbose=verbose, classifier=model)
        n_particles = details.n_particles
        labels = labels.map_blocks(to_host, dtype=labels.dtype)
        # The output folder appears once there is something to put in it, marked unfinished until the end.
        root = zarr.open_group(str(paths["labels"]), mode="a", zarr_format=2)
        root.attrs["declump"] = {"complete": False, "parameters": parameters, "inputs": inputs}
        target = paths["labels"] / LABEL_NAME / "0"
        zarr.open_group(str(paths["labels"] / LABEL_NAME), mode="a", zarr_format=2)
        # The table's per-chunk sums come from the tasks that write the labels (no pass reading them back).
        # The same tasks keep their part of the preview's plane (the middle one of a volume): no pass reads
        # the input and the labels again for it.
        plane = volume.shape[0] // 2 if volume.ndim == 3 else None
        plane_shape = tuple(int(n) for n in volume.shape[plane is not None:])
        stride = preview_stride(plane_shape)
        if verbose and stride > 1:
            print(f"declump: the overlay shows every {stride}th pixel per axis of its {plane_shape} plane (at most "
                  f"{PREVIEW_PIXELS} pixels are drawn)", file=sys.stderr)
        computed, parts = write_blocks(labels, target, work / "output.done", what="write labels + particle table",
                                       verbose=verbose, zarr_kwargs={"zarr_format": 2},
                                       measure=functools.partial(_block_outputs, plane=plane, stride=stride),
                                       beside=volume)
        details.blocks_computed["output"] = computed
        details.blocks_total["output"] = int(np.prod(labels.numblocks))
        if levels and len(levels["factors"]) > 1:  # the input's pyramid, for viewers (rewritten on a resume)
            write_label_levels(paths["labels"], levels["factors"])
        table = table_from_parts([p["table"] for p in parts], labels.ndim, spacing, n_particles, volume is not None)
        planes = preview_planes(parts, plane_shape, (volume.dtype, labels.dtype), stride)
        if probabilities_path is not None:
            from gpu_pipeline.io import atomic_path

            probabilities = details.probabilities.map_blocks(to_host, dtype=np.float32)
            with atomic_path(probabilities_path) as tmp:
                write_blocks(probabilities, tmp, tmp.parent / "written", what="write probabilities",
                             verbose=verbose)
                zarr.open_array(str(tmp), mode="r+").attrs.update(
                    {"spacing": [float(s) for s in spacing], **PROBABILITIES_MARK, "classes": list(model.classes)})
            paths["probabilities"] = Path(probabilities_path)
    return_freed_memory()  # the passes' freed temporaries, before the output stage loads pyarrow and matplotlib
    client = active_client()
    if client is not None:  # and the workers' (those of a running cluster live on; run_malloc_setup never trims)
        client.run(return_freed_memory)
    write_parquet(table, paths["table"])
    write_overlay(paths["overlay"], *planes)
    write_size_histogram(paths["histogram"], table["equivalent_diameter"], unit=unit)  # as in-memory runs
    summary = {
        **size_summary(table, volume.ndim, spacing),  # the in-memory run's count and size statistics
        "n_particles": n_particles, "spacing": list(spacing), "unit": unit, "shape": list(volume.shape),
        "chunks": [int(c[0]) for c in volume.chunks], "threshold": details.threshold, "polarity": details.polarity,
        "n_regions": details.n_regions, "n_peaks": details.n_peaks, "max_radius": details.max_radius,
        "halo_voxels": list(details.halo), "voxels_at_max_radius": details.n_capped_voxels,
        "one_piece_rounds": details.one_piece_rounds,
        "blocks_computed": details.blocks_computed, "blocks_total": details.blocks_total,
        "seconds": round(time.perf_counter() - started, 3), "device": device, "parameters": parameters,
        "outputs": {k: str(v) for k, v in paths.items()},
    }
    # Completion, after every other file is in place: the metadata that makes it a readable label image, with
    # `complete: true` in the same write of the root's attributes, then the summary, last, as in memory (a run
    # stopped between the two left a summary beside labels marked unfinished, without their metadata; stopped
    # there now, it leaves no summary, and the same command finishes it).
    source = os.path.relpath(input_path.resolve(), (paths["labels"] / LABEL_NAME).resolve())
    write_ngff_label_metadata(paths["labels"], spacing, source, unit=unit, levels=levels,
                              extra={"declump": {"complete": True, "parameters": parameters, "inputs": inputs}})
    write_json(paths["summary"], summary)
    shutil.rmtree(work, ignore_errors=True)
    if verbose and details.n_capped_voxels:
        print(f"declump: warning: {details.n_capped_voxels} voxels lie deeper than --max-radius {details.max_radius:g}; "
              "particles that large may be over-split (or merged across wide necks); rerun with a larger "
              "--max-radius", file=sys.stderr)
    return summary


def _existing_attrs(path):
    import zarr

    if not Path(path).exists():
        return None
    try:
        return dict(zarr.open_group(str(path), mode="r").attrs)
    except Exception:
        return None
