"""Where a chunked run keeps what it has finished: staged arrays, small results, progress.

A :class:`Workspace` is a folder. Each staged array is a Zarr store written
block by block, one task per block, each block followed by a marker file;
small global results (threshold, peaks, id tables) are saved as they are
decided. Running the same command again after an interruption (Ctrl-C,
SIGKILL, a lost node) reuses every finished block and result, so only the
missing blocks are computed, and the output is the same bytes.

Tasks run on whatever Dask scheduler is active: the local threaded one by
default, or a ``dask.distributed`` client (then a worker that dies has its
tasks rerun by the scheduler; block writes are idempotent).
"""
from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import json
import logging
import math
import os
import shutil
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from gpu_pipeline._backend import DeclumpError, get_array_module, to_host
from gpu_pipeline._common import ScratchSpaceError


def intermediate_codecs(dtype):
    """Zarr codecs of staged intermediates (read back by later passes, deleted at the end): chosen for speed.

    Ids, masks and distances: LZ4 without shuffle (Blosc, level 1); floats
    (the smoothed volume): no compression, since its mantissas barely
    compress. Per 128^3 chunk on one core, 2026-12-02 (write / read ms,
    stored / raw bytes), on the bench volume's labels (int32), its capped
    distance (uint16) and its smoothed image (float32):

    - int32: LZ4 7.6 / 3.6, 0.046; Zstandard level 1 (before) 10.9 / 7.1, 0.015;
    - uint16: LZ4 12.7 / 3.6, 0.093; Zstandard level 1 11.7 / 5.4, 0.025;
    - float32: none 16.7 / 2.6, 1.0; LZ4 with byte shuffle (before) 36.1 / 6.3, 0.79.

    A 256^3 run reads about 150 staged chunks (haloed blocks span up to 8)
    and writes about 60; those codecs took 2.2 s of an 8.5 s run. The final
    output keeps Zarr's defaults.
    """
    import zarr

    if np.dtype(dtype).kind == "f":
        return {"compressors": None}
    return {"compressors": zarr.codecs.BloscCodec(cname="lz4", clevel=1, shuffle="noshuffle")}


#: Voxels of one inner chunk of a staged store's shards (64^3; 512^2 in 2D).
INNER_CHUNK_VOXELS = 64 ** 3


def inner_chunk(block_shape):
    """Inner chunk shape of a staged store whose shards are the processing blocks (``block_shape``).

    A pass that reads a block with its halo straight from the store then
    decodes only the inner chunks the halo touches, not the whole of every
    neighbouring block: an interior 256^3 block with a 17-voxel halo read
    27 whole blocks of int32 (1.16 s on one core, 2026-12-02) and reads
    6^3 inner chunks of 64^3 when sharded (0.11 s), for 17 ms more per block
    written. Per axis: the largest divisor of the block's length between
    three quarters of the target edge and the edge (64 in 3D, 512 in 2D)
    that splits it in three or more; else the whole length. Blocks of 128^3
    stay whole: halved, each inner chunk's overhead outweighed the smaller
    reads (256^3 bench in 128^3 chunks: 0.3-0.8 s slower of 2.6-3.2 s).
    """
    edge = round(INNER_CHUNK_VOXELS ** (1 / len(block_shape)))
    inner = []
    for n in block_shape:
        n = int(n)
        divisors = [d for d in range(edge, max(1, 3 * edge // 4) - 1, -1) if n % d == 0 and n // d >= 3]
        inner.append(divisors[0] if divisors else n)
    return tuple(inner)


def intermediate_layout(block_shape, dtype, haloed=False):
    """``zarr.create_array`` arguments of a staged store written block by block: codecs
    (:func:`intermediate_codecs`), and for a store that later passes read with halos (2D/3D), one shard
    per block in :func:`inner_chunk` inner chunks (blocks align with the first block's shape, as they do)."""
    block_shape = tuple(int(n) for n in block_shape)
    inner = inner_chunk(block_shape) if haloed and len(block_shape) in (2, 3) else block_shape
    layout = {"chunks": inner, **intermediate_codecs(dtype)}
    if inner != block_shape:
        layout["shards"] = block_shape
    return layout


def store_chunks(chunks):
    """The chunk shape of a Zarr store that the blocks of ``chunks`` are written to concurrently: per axis the
    greatest common divisor of the blocks' lengths but the last, so every block starts on a chunk boundary and
    no two blocks write parts of one chunk (a read-modify-write that loses one of them: a first block shorter
    than the rest lost its neighbour's plane, 2026-12-03). The first length for regular blocks."""
    return tuple(int(math.gcd(*[int(n) for n in c[:-1]])) if len(c) > 1 else int(c[0]) for c in chunks)


def chunk_starts(chunks):
    """Start index of every chunk, per axis."""
    return [np.concatenate([[0], np.cumsum(c)[:-1]]).astype(np.int64) for c in chunks]


def grid_edges(chunks):
    """Per axis, the edges of the blocks of ``chunks`` (0, then each block's end), as tuples of ints.

    With :func:`block_box`, a blockwise function's box from Dask's
    ``block_id``, given the edges inside a ``functools.partial``, in place of
    Dask's ``block_info``: a dict of nested lists per block and per array,
    which the client walked for keys in every task of a pass (most of the
    161 000 ``parse_input`` calls of one run's ``to_delayed`` optimisations
    for 3300 tasks, 64^3 blocks of 256x512x512) and pickled with each task.
    """
    return tuple(tuple(int(e) for e in np.concatenate([[0], np.cumsum(c)])) for c in chunks)


def block_box(edges, index):
    """The slices of block ``index`` of the grid with :func:`grid_edges` ``edges``."""
    return tuple(slice(e[i], e[i + 1]) for e, i in zip(edges, index))


def block_origin(edges, index):
    """The first voxel (a tuple of ints) of block ``index`` of the grid with :func:`grid_edges` ``edges``."""
    return tuple(e[i] for e, i in zip(edges, index))


def block_boxes(chunks):
    """``(index, box)`` of every block of ``chunks`` in C order, ``box`` its slices in the volume."""
    edges = grid_edges(chunks)
    for index in itertools.product(*[range(len(c)) for c in chunks]):
        yield index, block_box(edges, index)


#: What :func:`limit_malloc_arenas` sets: no array is a fresh mmap (``M_MMAP_MAX`` 0: every allocation comes
#: from the heap, and freed memory is reused), the heap is not trimmed during a run (a trim threshold of 2 GiB;
#: :func:`return_freed_memory` trims it once the passes are done), and it grows in steps of at least 64 MiB.
MMAP_MAX = 0
TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes an int
TOP_PAD = 64 << 20
#: Those settings, each as (``mallopt`` parameter, the environment variable that sets it at a process's start,
#: value): the one list that :func:`limit_malloc_arenas` and :func:`malloc_environ` both apply.
MALLOC_SETTINGS = ((-4, "MALLOC_MMAP_MAX_", MMAP_MAX), (-1, "MALLOC_TRIM_THRESHOLD_", TRIM_THRESHOLD),
                   (-2, "MALLOC_TOP_PAD_", TOP_PAD))
#: ``mallopt``'s parameter for the number of arenas (``MALLOC_ARENA_MAX`` at start).
M_ARENA_MAX = -8
#: The arenas of a chunked run's processes, whatever their threads (:func:`run_malloc_setup`,
#: :func:`malloc_environ`): a second arena is built of 64 MiB heaps and serves a larger array from a fresh
#: mmap (:func:`limit_malloc_arenas`).
RUN_ARENAS = 1
#: NumPy's switch for its huge-page advice, read when NumPy is imported.
HUGEPAGE_VARIABLE = "NUMPY_MADVISE_HUGEPAGE"


def malloc_environ():
    """Environment for a worker process a run starts: glibc's malloc as :func:`run_malloc_setup` sets it,
    from the process's start (arenas made before a ``mallopt`` stay), and NumPy without huge-page advice
    (:func:`no_hugepage_advice`). Dask's nanny sets ``MALLOC_TRIM_THRESHOLD_=65536`` for its workers; these
    values replace it."""
    return {"MALLOC_ARENA_MAX": str(RUN_ARENAS), **{name: str(value) for _, name, value in MALLOC_SETTINGS},
            HUGEPAGE_VARIABLE: "0"}


def no_hugepage_advice():
    """Stop NumPy asking the kernel to back each new large array with transparent huge pages.

    NumPy calls ``madvise(MADV_HUGEPAGE)`` on every array of 4 MiB or more
    (on Linux 4.6 and later). Where the kernel's ``transparent_hugepage/defrag``
    is ``madvise`` (its default), a page fault in such an array then compacts
    memory on the spot to find a free 2 MiB page: every chunk-sized and
    volume-sized temporary paid that. Measured 2026-12-02 on the 2-core VM,
    256^3 uint8, ``declump run`` on one core, two interleaved runs each
    (wall, system time): in memory 6.7-7.1 s, 2.9-3.2 s with the advice and
    4.6-4.9 s, 1.2-1.3 s without; chunked in 128^3 chunks 7.1-7.2 s,
    1.8-2.0 s and 5.9-6.3 s, 1.0 s. The kernel may still use huge pages
    where its setting is ``always`` (without stalling the fault).

    Applies to this process (and workers started with :func:`malloc_environ`);
    ``NUMPY_MADVISE_HUGEPAGE`` in the environment the process started with
    is left to decide. Returns whether NumPy's setting was changed.
    """
    if _set_at_start((HUGEPAGE_VARIABLE,)):
        return False
    try:
        from numpy._core.multiarray import _set_madvise_hugepage
    except ImportError:  # NumPy 1.x
        try:
            from numpy.core.multiarray import _set_madvise_hugepage
        except ImportError:
            return False
    _set_madvise_hugepage(False)
    return True


_exit_collection_skipped = False


def skip_exit_collection():
    """Leave the objects alive when this process exits out of the garbage collector's last passes.

    Python's finalization clears every module and runs full cyclic
    collections over what they held: a process that imported the pipeline
    (NumPy, SciPy, scikit-image, Numba's kernels, Dask) and ran it spent
    0.35-0.77 s exiting, after its last output was written, against 0.05-0.08 s
    with ``gc.freeze()`` first (2026-12-06, 2-core VM, a process that separated
    128^3 in memory; three runs each). Each ``declump`` command pays it once
    and each worker process of a local cluster once more, while the command
    waits for its workers to close: fixed seconds of every cold run.

    ``gc.freeze()`` runs from an ``atexit`` hook, after the program and the
    other exit hooks (which flush logs and remove temporary folders), before
    the modules are cleared; objects are still freed by their reference
    counts then, only cycles still alive at exit stay unreclaimed, as the
    operating system reclaims them anyway. Once per process.
    """
    global _exit_collection_skipped
    if not _exit_collection_skipped:
        import atexit
        import gc

        atexit.register(gc.freeze)
        _exit_collection_skipped = True


#: Dask's diagnostics that run on a timer in every server (scheduler, nanny, worker), for the dashboard: each
#: worker's profiler samples its task threads' stacks every 10 ms, and every server reads its CPU, memory and
#: network (``system-monitor``) every 0.5 s and times its event loop (``tick``) every 20 ms. The clusters a run
#: starts have no dashboard; these settings turn the profiler off and slow the others. They share the cores
#: with the tasks: on the 2-core VM (2026-12-03, 256x512x512 in 128^3 chunks, warm clusters, 4 runs each,
#: two interleaved processes per setting, CPU seconds from each thread's ``/proc`` ``schedstat``) the workers'
#: event loops used 0.78-0.86 s a run with one worker and 0.94-1.04 s with two, against 0.51-0.54 and
#: 0.66-0.74 s with these settings, and the scheduler's and client's process 1.23-1.31 and 0.97-1.13 s
#: against 0.88-0.92 and 0.72-0.80 s; the 2-worker run 6.40-6.80 s against 6.00-6.39 s.
QUIET_DIAGNOSTICS = {"distributed.worker.profile.enabled": False,
                     "distributed.admin.system-monitor.interval": "2s",
                     "distributed.admin.tick.interval": "500ms"}


#: ``LocalCluster`` (and ``LocalCUDACluster``) arguments of the clusters declump starts: no dashboard, and the
#: scheduler's HTTP endpoints (health, metrics) on a free port of the loopback interface. With
#: ``dashboard_address=None`` alone they took port 8787, and where it was taken (a notebook's cluster, a
#: second run) Dask printed a 4-line "Port 8787 is already in use" warning on every run.
LOCAL_CLUSTER_HTTP = {"dashboard_address": None, "scheduler_kwargs": {"dashboard_address": "127.0.0.1:0"}}


def local_cluster_config():
    """``dask.config`` settings for starting a ``LocalCluster`` (or dask-cuda's): :func:`malloc_environ` as
    the nanny's ``pre-spawn-environ``, and :data:`QUIET_DIAGNOSTICS` (the nanny hands its configuration to
    the worker processes it starts)."""
    return {**{f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in malloc_environ().items()},
            **QUIET_DIAGNOSTICS}


def _glibc(name):
    """glibc's function ``name`` through ctypes, or None where there is no glibc (not Linux, another libc)."""
    import ctypes

    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def limit_malloc_arenas(threads):
    """Let glibc keep at most ``threads`` malloc arenas in this process, and reuse the memory freed in them.

    A chunked run's footprint and its page faults are both set by how glibc
    reuses freed memory. By default every thread that allocates gets an arena
    of its own (up to 8 per core): the Dask worker threads, Zarr's I/O
    threads, the main thread; each keeps freed chunk-sized arrays for its own
    later use, so resident memory is a multiple of one task's. With few arenas
    (``M_ARENA_MAX``), temporaries are reused across threads and passes.
    Chunked runs ask for one (:func:`run_malloc_setup`).

    Then the thresholds (:data:`MALLOC_SETTINGS`): no array is a fresh mmap
    (``M_MMAP_MAX`` 0), and the heap keeps what is freed until the run trims
    it (``M_TRIM_THRESHOLD``, ``M_TOP_PAD``). A freed array's pages are then
    reused by the next block's arrays and Zarr's decoded chunks; a fresh
    mmap, or a trimmed heap, gives fresh pages, one page fault per 4 KiB.
    Kept pages are pages the run had in use before, so the peak stays the
    same. Measured on the 2-core VM, ``declump run`` on 256x512x512 with
    local threads (wall seconds, system seconds, page faults, peak RSS):

    - 2026-12-06, blocks of 256^3, one thread: with an mmap threshold of
      32 MiB (glibc's ceiling) and a trim threshold and pad of 64 MiB (the
      setting before), every float64 and int64 temporary of a block (64-195
      MiB) was a fresh mmap: 13.5-14.1 s, 3.4-3.6 s, 1.6-1.7 M, 0.70 GiB;
      with these settings 10.4-11.7 s, 0.7-1.0 s, 0.15 M, 0.67 GiB. Two
      threads: 8.6-9.5 s, 4.1-4.7 s, 2.0-2.1 M, 1.18-1.21 GiB against
      6.8-7.0 s, 1.0-1.3 s, 0.28-0.31 M, 1.17-1.28 GiB, with one arena: a
      second arena is built of 64 MiB heaps, and glibc serves a larger array
      there from a fresh mmap whatever ``M_MMAP_MAX`` says (two threads each
      allocating 100 and 40 MiB again: 51 thousand of 72 thousand pages
      faulted with two arenas, 2 with one). Blocks of 128^3 (the default),
      whose temporaries are mostly under 32 MiB, ran as before (one thread
      11.4-12.9 s either way, two threads 6.8-8.3 s).
    - 2026-12-02 (the 128^3 blocks then), 256^3: glibc's adaptive thresholds
      trimmed the heap to almost nothing after each pass's chunk-sized
      temporaries, 5.71-5.78 s, 1.15-1.37 s, 0.32-0.42 M, 0.283-0.284 GiB
      (GiB: 2^30 bytes), against 4.79-5.18 s, 0.45-0.49 s, 0.057-0.067 M,
      0.283 GiB with fixed ones; thresholds fixed at 64 KiB (every
      chunk-sized temporary a fresh mmap, 2026-12-01) 6.4-7.1 s, 1.22-1.24 M
      faults; glibc's defaults (one arena per thread) 0.45 GiB.

    Dask's nanny starts its workers with ``MALLOC_TRIM_THRESHOLD_=65536``;
    the workers the run starts get these settings from their start
    (:func:`malloc_environ`), and those of a running cluster get them set
    here (:func:`run_malloc_setup`).

    Call it before other threads allocate (arenas already made stay).
    Returns False where it does not apply (not glibc).
    """
    mallopt = _glibc("mallopt")
    if mallopt is None:
        return False
    # Every setting is applied (a list, not a short-circuit), then all must have taken.
    return all([bool(mallopt(M_ARENA_MAX, max(1, int(threads))))]
               + [bool(mallopt(parameter, value)) for parameter, _, value in MALLOC_SETTINGS])


def _set_at_start(names):
    """Was any of the environment variables ``names`` set when this process started? glibc (and NumPy, on
    import) read them then: ``/proc/self/environ`` is that environment (``os.environ`` may have changed since:
    Dask's nanny writes its workers' variables into the process that starts them)."""
    try:
        with open("/proc/self/environ", "rb") as handle:
            found = [item.split(b"=", 1)[0] for item in handle.read().split(b"\0")]
    except OSError:
        return any(os.environ.get(name) is not None for name in names)
    return any(name.decode(errors="replace") in names for name in found)


def return_freed_memory():
    """Hand the memory glibc keeps after frees back to the OS (``malloc_trim(0)``); False where not glibc.

    With the thresholds of :func:`limit_malloc_arenas` the heap keeps the
    freed chunk-sized temporaries of the last passes for reuse. A run calls
    this once its passes are done, before the output stage imports its
    libraries (pyarrow, matplotlib): measured 2026-12-02 on 256^3 in 128^3
    chunks, one thread, two runs, the trim returned 0.04-0.05 GiB, and the
    run's peak RSS stayed the engine's (0.269-0.274 GiB) instead of rising
    with those imports to 0.288 GiB at the end.
    """
    malloc_trim = _glibc("malloc_trim")
    if malloc_trim is None:
        return False
    malloc_trim(0)
    return True


#: Python's collector thresholds during a chunked run (:func:`fewer_full_collections`); the default is (700, 10, 10).
RUN_GC_THRESHOLDS = (10_000, 10, 10)


@contextlib.contextmanager
def fewer_full_collections():
    """Python's cyclic garbage collector run less often while a chunked run builds and sends its passes.

    A pass's graph is tens of thousands of short-lived objects per hundred
    blocks (Dask's task specs, their arguments, the pickled messages); with
    the default thresholds they set off a full collection every few passes,
    each walking every object of the process (with a cluster started by the
    run, the scheduler's too): 60-130 ms each, 0.2-0.4 s of CPU a run for
    256x512x512 in 64^3 blocks on the 2-core VM (2026-12-07), time the client
    and the scheduler take from the workers. With :data:`RUN_GC_THRESHOLDS`
    none ran there. Objects freed by their reference counts (nearly all) are
    freed as before; cycles wait for a younger collection at most ~100 000
    allocations, or a full one. The thresholds are restored when the last of the runs in this process
    ends (runs in several threads of one process, as the app's, overlap).
    """
    import gc

    with _GC_RUNS["lock"]:
        if _GC_RUNS["depth"] == 0:
            _GC_RUNS["before"] = gc.get_threshold()
            gc.set_threshold(*RUN_GC_THRESHOLDS)
        _GC_RUNS["depth"] += 1
    try:
        yield
    finally:
        with _GC_RUNS["lock"]:
            _GC_RUNS["depth"] -= 1
            if _GC_RUNS["depth"] == 0:
                gc.set_threshold(*_GC_RUNS["before"])


_GC_RUNS = {"lock": threading.Lock(), "depth": 0, "before": None}


def run_malloc_setup():
    """glibc's malloc as a chunked run sets it in its own process and in a running cluster's workers (through
    ``client.run``): :func:`limit_malloc_arenas` with :data:`RUN_ARENAS` arenas, whatever the threads, and
    :func:`no_hugepage_advice`."""
    no_hugepage_advice()
    return limit_malloc_arenas(RUN_ARENAS)


class OwnWorkerLog(logging.Filter):
    """Drops two records of Dask workers that only repeat what the command itself reports.

    - A failed task's "Compute Failed" (its key, spec, error and traceback):
      the run's client receives the same exception, with its traceback, and
      reports it, in one line where the command knows the cause (bad input,
      a corrupt chunk, a full disk, memory). The record put seven lines
      before that one.
    - "Async instruction for <Task ...> ended with CancelledError", one per
      task a worker was running when the command closed it (an error
      elsewhere, Ctrl-C), and "Failed to communicate with scheduler during
      heartbeat." with its 27-line traceback, when the scheduler (in the
      command's process) closed during a heartbeat.

    Only on the workers a command starts (:func:`own_worker_setup`); a
    running cluster's logs are its owner's.
    """

    def filter(self, record):
        message = str(record.msg)
        return not (message.startswith(("Compute Failed", "Failed to communicate with scheduler during heartbeat"))
                    or (message.startswith("Async instruction for") and message.endswith("with CancelledError")))


def own_worker_setup(dask_worker=None):
    """For ``client.run`` on the workers of a cluster the command started: :class:`OwnWorkerLog` on the
    workers' loggers, and Ctrl-C left to the command. A terminal's Ctrl-C reaches every process of the
    command; a worker interrupted in its event loop stopped answering its nanny, which killed it after 4 s
    and logged that (2026-12-04: 4 more lines and a leaked-semaphore warning after 'interrupted'). The
    command closes its workers itself when it is interrupted."""
    import signal
    import threading

    for name in ("distributed.worker", "distributed.worker.state_machine"):
        log = logging.getLogger(name)
        if not any(isinstance(f, OwnWorkerLog) for f in log.filters):
            log.addFilter(OwnWorkerLog())
    if threading.current_thread() is threading.main_thread():  # client.run runs here in a worker process
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    skip_exit_collection()  # the command waits for its workers' processes to end
    return True


def write_block(data, path, region, marker):
    """Write ``data`` (NumPy or CuPy) into ``region`` of the Zarr array at ``path``, then touch ``marker``."""
    from gpu_pipeline.chunked.source import write_region

    try:
        write_region(path, region, to_host(data))
    except OSError as exc:
        raise named(exc, path) from exc
    Path(marker).touch()
    return 1


def named(exc, path):
    """``exc`` (an OSError) with ``path`` as its file name when the failing call gave none (e.g. a full disk)."""
    if exc.filename is not None:
        return exc
    return type(exc)(exc.errno, exc.strerror or str(exc), str(path))


def active_client():
    """The ``dask.distributed`` client in use, or None (local scheduler): as ``dask.compute`` decides, a client
    unless the ``scheduler`` setting names another (``run_chunked``'s local threads set ``dask.threaded.get``
    while a client that the caller holds for other work stays its default)."""
    if "distributed" not in sys.modules:  # no client without it: a local run skips its import (~1 s)
        return None
    import dask

    if dask.config.get("scheduler", None) not in (None, "dask.distributed", "distributed"):
        return None
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None


def engine_threads():
    """How many tasks the active scheduler runs at once: the threads of the client's workers, or the local
    threads (``num_workers``, default the usable cores). A step that can run whole in this process or split
    with halos over the workers splits only where more than one runs."""
    client = active_client()
    if client is not None:
        return max(1, sum(client.nthreads().values()))
    import dask

    from gpu_pipeline._common import usable_cores

    return int(dask.config.get("num_workers", None) or usable_cores())


#: One DEBUG record per pass (:func:`run_tasks`) and per global step on a worker (:func:`run_call`), when it
#: ends, with ``what``, ``tasks`` and its ``start`` and ``end`` (``time.time()``, as Dask's task stream):
#: what ``bench.pass_timeline`` puts beside the workers' tasks. Silent unless a handler asks for DEBUG.
pass_log = logging.getLogger("gpu_pipeline.chunked.passes")


def log_pass(what, tasks, start):
    if pass_log.isEnabledFor(logging.DEBUG):
        end = time.time()
        pass_log.debug("%s: %d tasks, %.3f s", what, tasks, end - start,
                       extra={"what": what, "tasks": tasks, "start": start, "end": end})


@contextlib.contextmanager
def worker_deaths(what):
    """Dask's ``KilledWorker`` (every worker that ran a task died: a worker's memory limit, the kernel's OOM
    killer) as one line naming the pass, what sets a chunked run's memory, and that the run resumes; a lost
    scheduler (its connection closed, the futures cancelled with it) as one line that says it resumes too."""
    from distributed.client import FutureCancelledError
    from distributed.comm.core import CommClosedError
    from distributed.scheduler import KilledWorker

    try:
        yield
    except (CommClosedError, FutureCancelledError) as exc:
        # The scheduler went away (stopped, killed, its node lost): about 80 lines of tracebacks before.
        raise DeclumpError(
            f"lost the Dask scheduler during the pass '{what}' ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:100]}); once a "
            "scheduler and its workers run again, the same command resumes from the finished blocks") from None
    except KilledWorker as exc:
        raise DeclumpError(
            f"Dask workers died running a task of the pass '{what}' ({exc.allowed_failures + 1} "
            f"{'try' if exc.allowed_failures == 0 else 'tries'}, the last on {exc.last_worker.address}), most "
            "often for lack of memory (a worker's memory limit or the system's OOM killer; the workers' logs say "
            "which): give smaller --chunks, fewer workers or threads per worker, or workers with more memory; the "
            "same command then resumes from the finished blocks (add --overwrite when --chunks changes)") from None


def run_call(function, *args):
    """``function(*args)`` on the active scheduler: on a worker of a distributed cluster, else right here.

    For the small global steps between passes that call compiled kernels
    (the peaks' greedy spacing): the workers have the kernels loaded, and the
    client of a cluster then never starts the compiler (importing Numba and
    loading a first kernel: about 0.35 s of every command, while the workers
    wait). Large arrays go to the worker scattered (:func:`scattered_arrays`), not inside the task.
    """
    client = active_client()
    if client is None:
        return function(*args)
    from distributed.client import FutureCancelledError
    from distributed.comm.core import CommClosedError
    from distributed.scheduler import KilledWorker

    name = getattr(function, "__name__", "call")
    start = time.time()
    for attempt in itertools.count(1):
        try:
            result = client.submit(function, *scattered_arrays(client, [args])[0], pure=False).result()
            break
        except (CommClosedError, FutureCancelledError, KilledWorker, OSError):
            # Scattered data lives on one worker only: where that worker died (killed, out of memory) the
            # scheduler cannot rerun the call as it reruns a pass's tasks, and the call was cancelled ("lost
            # scattered data") or the scatter's connection closed. Sent again to the workers left; a lost
            # scheduler is what worker_deaths reports.
            alive = _scheduler_has_workers(client)
            if attempt >= RUN_CALL_TRIES or not alive:
                if alive:
                    raise DeclumpError(f"Dask workers died {attempt} times running the step '{name}' (most often for "
                                       "lack of memory; the workers' logs say why); the same command resumes from "
                                       "the finished passes") from None
                with worker_deaths(name):
                    raise
    log_pass(name, 1, start)
    return result


#: Tries of a :func:`run_call` whose worker died with it (a pass's tasks are Dask's to rerun: 3 by default).
RUN_CALL_TRIES = 3


def _scheduler_has_workers(client):
    """Whether ``client``'s scheduler answers and has a worker (a nanny restarts a killed one: waited for up to
    Dask's connect timeout)."""
    try:
        client.wait_for_workers(1, timeout=dask_timeout("distributed.comm.timeouts.connect"))
        return True
    except Exception:
        return False


def dask_timeout(key):
    """A Dask configuration duration (``"30s"``) in seconds."""
    import dask
    from dask.utils import parse_timedelta

    return parse_timedelta(dask.config.get(key), default="s")


def unaliased(task):
    """``task`` (a Delayed), or, where its key only names another task of its graph, a Delayed of that task.

    Dask's linear fusion renames a fused chain and leaves an ``Alias`` under
    the chain's last key: a task of its own, which the scheduler sends to a
    worker after the fused one and waits for. A pass of :func:`write_blocks`
    then ran two tasks per block, and each worker took its next block only
    after a round trip for the aliases: 96 of the 489 tasks of a
    256x512x512 run in 128^3 chunks, with 5-8 ms idle before a block
    (2026-12-03). Computing the fused task itself gives the same result.
    """
    from dask.delayed import Delayed

    try:
        node = task.dask[task.key]
    except KeyError:
        return task
    target = getattr(node, "target", None) if type(node).__name__ == "Alias" else None
    return task if target is None else Delayed(target, task.dask, layer=task.__dask_layers__()[0])


#: Short per-block calls (a staged block read and reduced: a few milliseconds) run this many to a task: Dask's
#: own cost per task (about 2 ms of the scheduler's and the client's CPU and as much of the worker's event
#: loop, 2026-12-03) is then not paid per block, and a terabyte's passes hold this many times fewer tasks.
BLOCK_GROUP = 8


def block_run(index):
    """The run of up to :data:`BLOCK_GROUP` consecutive blocks along the last axis that block ``index`` is in,
    as a block index with the last axis counted in runs: the tasks that take a run of blocks at once (slab
    files, components' faces) and those that wait for them agree on it."""
    return (*index[:-1], index[-1] // BLOCK_GROUP)


#: Arrays of more bytes than this in one batch of calls go to the workers scattered (:func:`scattered_arrays`).
SCATTER_BYTES = 1 << 20


def scattered_arrays(client, calls):
    """``calls`` (argument lists) with every NumPy array in them scattered to ``client``'s workers, all in one
    round trip, and replaced by its future, where they hold more than :data:`SCATTER_BYTES` together; else
    the calls as they are (the arrays travel inside the tasks).

    Large arrays go to the workers so, straight from here, not inside the tasks: through the scheduler in
    the graph, the neck pass's segment ends made graphs of 20-30 MiB on an EM image of large particles
    (2026-12-04; Dask warned on stderr at each of its rounds). Small ones ride in the graph: a scatter is a
    round trip of its own (6-7 ms each on a 2-core VM, four a run of the bench volume, 2026-12-07, while
    every worker waits), and a task that holds its data is one the scheduler can rerun where its worker died.
    """
    where = [(c, a) for c, args in enumerate(calls) for a, value in enumerate(args) if isinstance(value, np.ndarray)]
    calls = [list(args) for args in calls]
    if sum(calls[c][a].nbytes for c, a in where) > SCATTER_BYTES:
        for (c, a), future in zip(where, client.scatter([calls[c][a] for c, a in where], hash=False)):
            calls[c][a] = future
    return calls


def _each(function, calls):
    return [function(*args) for args in calls]


def run_grouped(function, calls, what, *, group=BLOCK_GROUP, verbose=False):
    """``[function(*args) for args in calls]`` on the active scheduler, ``group`` consecutive calls per task
    (:func:`run_tasks`). For calls that read their own inputs: a Delayed argument would hold ``group``
    blocks in one task (``group=1`` then)."""
    from dask import delayed

    client = active_client()
    if client is not None:
        calls = scattered_arrays(client, calls)
    tasks = [delayed(_each)(function, calls[i:i + group]) for i in range(0, len(calls), group)]
    return [result for part in run_tasks(tasks, what, verbose=verbose) for result in part]


#: On a cluster, a pass runs several of its blocks' tasks to one Dask task, each at most this fraction of the
#: layer's tasks still left over the cluster's threads (:func:`group_sizes`): large groups first, single blocks
#: last, so that the tail of a pass, where one thread finishes its last task while the others have none, is
#: about half a block's work.
GUIDED_SHARE = 2


def group_sizes(n, threads, *, most=BLOCK_GROUP):
    """The sizes of the consecutive groups :func:`grouped_graph` runs the ``n`` tasks of a layer in, in the
    order they should start, or None (every task alone).

    Guided self-scheduling: each group takes ``1 / (GUIDED_SHARE * threads)`` of the tasks still left (rounded
    up), at most ``most``: 32 blocks on 2 threads go 8, 6, 5, 4, 3, 2, 1, 1, 1, 1; on one thread, 8, 8, 8, 8.
    Equal groups (before 2026-12-07: 2 blocks a task, 8 tasks a thread on two threads) left a tail of up to
    a group (two blocks of the distance-transform pass: about 0.2 s with the other thread idle). With
    single blocks last, the thread that finishes early takes them, and the pass runs fewer tasks (10
    instead of 16), each costing the scheduler, the client and a worker's event loop a few milliseconds.
    """
    sizes, left = [], int(n)
    while left:  # (one thread has no other to share the last tasks with: groups of ``most`` all through)
        share = most if threads <= 1 else -(-left // (GUIDED_SHARE * int(threads)))
        sizes.append(min(left, most, share))  # (share >= 1: the tasks left, rounded up)
        left -= sizes[-1]
    return sizes if len(sizes) < n else None


def _group_priority(priority, key):
    """The priority of ``key`` for ``dask.annotate``: its group's from :func:`grouped_graph`, else Dask's
    default, 0."""
    return priority.get(key, 0)


def _values(*values):
    return values


def grouped_graph(tasks, threads, *, most=BLOCK_GROUP):
    """The optimised graph of the Delayed ``tasks`` with the tasks of each block-indexed layer run in groups,
    a Dask task each, for a distributed scheduler.

    Dask's scheduler, the client and each worker's event loop pay a few milliseconds per task (together about
    7 ms on a 2-core machine, 2026-12-07), whatever the task computes: on passes whose blocks take 20-40 ms
    that is a fifth of the work, and on a core the workers share with the client and the scheduler it holds
    them up. A layer's tasks (keys ``(name, *block index)``, as Dask arrays name them, none depending on
    another of its layer) are taken in groups of :func:`group_sizes` (for ``threads`` threads, at most
    ``most``) in the order of their keys (C order of the blocks: runs along the last axis); a layer whose
    groups would all be single tasks is left as it is. One task runs its members in turn and returns
    their values as a tuple; a task that needs a member takes it from its group's tuple (a getitem nested in
    it, run where it runs). Each member still writes its own blocks and markers: a group that fails or is
    lost is rerun whole, and a run resumed later finds each block written or not, as before.

    Returns ``(graph, keys, unpack, priority)``: the new graph (a dict of Dask tasks), the keys to compute,
    per task of ``tasks`` ``(key, position)`` of its value (position None: the key's value itself), and
    {group key: its priority}, which starts a layer's groups in order, largest first (Dask's own order for
    independent tasks ran them last to first). A layer's first group keeps Dask's default priority, 0, and
    the others fall below it: on a cluster that other clients share, a pass's later groups wait for their
    tasks of default priority.
    """
    import operator

    from dask._task_spec import Task, TaskRef, convert_legacy_graph
    from dask.base import collections_to_expr

    tasks = [unaliased(t) for t in tasks]  # (their keys the fused tasks', not aliases naming them)
    graph = convert_legacy_graph(dict(collections_to_expr(tasks, optimize_graph=True).optimize().__dask_graph__()))
    layers = collections.defaultdict(list)
    for key, node in graph.items():
        if isinstance(key, tuple) and type(node) is Task:
            layers[key[0]].append(key)
    members, subs = {}, {}
    for name, keys in layers.items():
        sizes = group_sizes(len(keys), threads, most=most)
        if sizes is None or any(isinstance(d, tuple) and d[0] == name
                                for key in keys for d in graph[key].dependencies):
            continue
        keys.sort()
        start = 0
        for at, k in enumerate(sizes):
            group = (f"{name}-grouped", at)
            members[group] = keys[start:start + k]
            start += k
            for position, key in enumerate(members[group]):
                subs[key] = Task(None, operator.getitem, TaskRef(group), position)

    def rewired(node):
        return node.substitute(subs) if node.dependencies & subs.keys() else node

    out = {key: rewired(node) for key, node in graph.items() if key not in subs}
    for group, keys in members.items():
        nodes = [rewired(graph[key]) for key in keys]
        out[group] = Task(group, _values, *nodes, _data_producer=any(n.data_producer for n in nodes))
    where = {key: (group, position) for group, keys in members.items() for position, key in enumerate(keys)}
    unpack = [where.get(t.key, (t.key, None)) for t in tasks]
    priority = {group: -group[1] for group in members}
    return out, list(dict.fromkeys(key for key, _ in unpack)), unpack, priority


def run_tasks(tasks, what, *, voxels=0, verbose=False):
    """Compute delayed ``tasks`` on the active scheduler, with a progress line on stderr.

    Returns the results in order. The progress line counts finished tasks
    and, when ``voxels`` (the voxels the tasks cover) is given, voxels per second.
    On a distributed client the blocks' tasks run several to a Dask task where
    the cluster has enough threads for them (:func:`grouped_graph`).
    """
    import dask

    if not tasks:
        return []
    start, started = time.perf_counter(), time.time()
    total = len(tasks)

    interactive = sys.stderr.isatty()

    def report(done):
        if not verbose or (not interactive and done != total):
            return
        seconds = time.perf_counter() - start
        rate = f", {voxels * done / total / seconds / 1e6:.1f} Mvox/s" if voxels and seconds > 0 else ""
        end = "\n" if done == total else ""
        print(f"{chr(13) if interactive else ''}  {what}: {done}/{total} tasks, {seconds:.1f} s{rate}", end=end, file=sys.stderr, flush=True)

    client = active_client()
    if client is not None:
        from dask.delayed import Delayed
        from dask.highlevelgraph import HighLevelGraph
        from distributed import as_completed

        graph, keys, unpack, priority = grouped_graph(tasks, engine_threads())
        # One layer that every Delayed shares: merged once, not once per key.
        layer = f"{what}-{uuid.uuid4().hex}"
        graph = HighLevelGraph.from_collections(layer, graph, dependencies=())
        # The scheduler applies the function to every key of the graph.
        with dask.annotate(priority=functools.partial(_group_priority, priority)):
            futures = client.compute([Delayed(key, graph, layer=layer) for key in keys], optimize_graph=False)
        holds = collections.Counter(key for key, _ in unpack)  # the caller's tasks per key
        # Each result fetched once, as its task finishes, in batches of those finished together: the last
        # batch's alone is left when the pass ends, not a gather of all. A task's error is raised here. Fetched
        # by this thread (gather), not by as_completed's own trackers (with_results): a tracker whose fetch was
        # in flight when an error or Ctrl-C closed the client logged a 40-line CommClosedError traceback.
        results, done = {}, 0
        with worker_deaths(what):
            for batch in as_completed(futures).batches():
                results.update(zip((future.key for future in batch), client.gather(batch)))
                done += sum(holds[future.key] for future in batch)
                report(done)
        log_pass(what, len(keys), started)
        return [results[key] if position is None else results[key][position] for key, position in unpack]

    from dask.callbacks import Callback

    tasks = [unaliased(t) for t in tasks]  # (on a cluster, grouped_graph's first step)
    names = {t.key for t in tasks}
    finished = [0]

    class _Progress(Callback):
        def _posttask(self, key, result, dsk, state, worker_id):
            if key in names:
                finished[0] += 1
                report(finished[0])

    with _Progress():
        results = list(dask.compute(*tasks))
    log_pass(what, total, started)
    return results


class Workspace:
    """A folder of staged arrays and saved results for one chunked run (see module docstring).

    ``Workspace(None)`` stages nothing (every pass recomputes) and remembers
    nothing; it is what the Python API uses when no folder is given.
    """

    def __init__(self, root=None, *, verbose=False, limit=None):
        self.root = Path(root) if root is not None else None
        self.verbose = verbose
        self.limit = limit  # bytes the folder may take (a quota the file system's free space does not show)
        self.computed = {}  # stage name -> blocks computed in this run
        self.totals = {}    # stage name -> blocks in the stage
        if self.root is not None:
            self.root.mkdir(parents=True, exist_ok=True)

    # --- small results -------------------------------------------------
    def remember(self, name, compute):
        """``compute()``'s dict of NumPy arrays / numbers, saved once and reloaded on later runs."""
        if self.root is None:
            return compute()
        path = self.root / f"{name}.npz"
        if path.exists():
            with np.load(path, allow_pickle=False) as saved:
                return {k: (saved[k] if saved[k].ndim else saved[k][()]) for k in saved.files}
        value = compute()
        tmp = path.with_suffix(".partial.npz")
        try:
            np.savez(tmp, **{k: np.asarray(v) for k, v in value.items()})
        except OSError as exc:
            raise named(exc, tmp) from exc
        os.replace(tmp, path)
        return value

    # --- staged arrays -------------------------------------------------
    def store(self, name):
        """Path of the finished staged store ``name``, or None."""
        if self.root is None or not (self.root / f"{name}.done" / "complete").exists():
            return None
        return str(self.root / f"{name}.zarr")

    def stage(self, name, build, *, chunks, shape, dtype, device=None, measure=None, haloed=False):
        """A staged array: ``build()`` (a lazy Dask array) written block by block once, then read back.

        ``haloed``: later passes read its blocks with halos (stored in shards, :func:`intermediate_layout`).

        ``build`` is only called when blocks are missing. Returns a lazy Dask
        array with the processing ``chunks`` read from the store (moved to
        the GPU with ``device='gpu'``). With ``measure`` (as in
        :func:`write_blocks`), returns ``(array, [result per block])``, the
        results None when this call wrote nothing (no folder, or staged before).
        """
        if self.root is None:
            return build() if measure is None else (build(), None)
        path = self.root / f"{name}.zarr"
        done = self.root / f"{name}.done"
        total = int(np.prod([len(c) for c in chunks]))
        self.totals[name] = total
        self.computed[name] = 0
        measured = None
        if not (done / "complete").exists():
            self.check_room(name, shape, dtype)
            written = write_blocks(build(), path, done, what=name, verbose=self.verbose,
                                   zarr_kwargs=intermediate_layout(store_chunks(chunks), dtype, haloed),
                                   measure=measure)
            self.computed[name], measured = written if measure is not None else (written, None)
            (done / "complete").touch()
        array = staged_array(path, chunks)
        if tuple(array.shape) != tuple(shape) or np.dtype(array.dtype) != np.dtype(dtype):
            raise DeclumpError(f"the staged {name} in {self.root} does not match this run; delete that folder "
                               "or run with --overwrite")
        array = to_device(array, device)
        return array if measure is None else (array, measured)

    def room_needed(self, name, shape, dtype):
        """``(bytes the uncompressed store `name` still needs, bytes the work folder may still take)``, or None
        where that size is not known beforehand (no folder, or a compressed store). The room: the free space of
        its file system, and no more than ``limit`` less what the folder holds already where one was given."""
        if self.root is None or intermediate_codecs(dtype)["compressors"] is not None:
            return None
        # Less what a resumed pass wrote already (its blocks stay).
        need = math.prod(int(n) for n in shape) * np.dtype(dtype).itemsize - folder_bytes(self.root / f"{name}.zarr")
        room = shutil.disk_usage(self.root).free
        if self.limit is not None:
            room = min(room, max(0, int(self.limit) - folder_bytes(self.root)))
        return need, room

    def check_room(self, name, shape, dtype):
        """Refuse (:class:`ScratchSpaceError`, one line) to stage ``name`` where the work folder's file system has
        less room than its uncompressed store still needs (:meth:`room_needed`; float stores, stored raw:
        :func:`intermediate_codecs`): checked before its pass, not found full hours into it. A compressed
        store's size is not known beforehand: not checked (a full disk then stops the run with one line, and it
        resumes). The smoothed volume, most of a run's scratch space, is not staged where it would not fit
        (:func:`~gpu_pipeline.chunked.foreground.regions_chunked`); this refuses the others (a classifier's
        probabilities)."""
        room = self.room_needed(name, shape, dtype)
        if room is not None and room[0] > room[1]:
            raise ScratchSpaceError(
                f"the work folder {self.root} needs {_bytes_text(room[0])} for the staged {name} "
                f"({np.dtype(dtype).name}, uncompressed) and {self.room_text(room[1])}; make room, or give "
                "--scratch DIR on a file system with room, then run the same command again")

    def room_text(self, room):
        """How :meth:`room_needed`'s room reads in a message: the file system's free space, or the limit's."""
        if self.limit is None:
            return f"its file system has {_bytes_text(room)} free"
        return f"it may take {_bytes_text(room)} more (--scratch-limit, or its file system's free space)"

    def discard(self, *names, halos=True):
        """Delete staged stores no later pass reads (their disk space back; a resumed run does not need them),
        and their :meth:`halos` folders unless ``halos`` is False."""
        if self.root is None:
            return
        for name in names:
            for suffix in ("zarr", "done", "halos") if halos else ("zarr", "done"):
                shutil.rmtree(self.root / f"{name}.{suffix}", ignore_errors=True)

    def discard_halos(self, name):
        """Remove the folder of :meth:`halos` (its pass has run)."""
        import shutil

        if self.root is not None:
            shutil.rmtree(self.root / f"{name}.halos", ignore_errors=True)

    def halos(self, name):
        """A folder for the halos the tasks of pass ``name`` hand each other (``map_haloed``'s ``spill``:
        on disk, memory stays bounded by blocks), or None without a workspace folder (then in memory);
        :meth:`discard` of ``name`` removes it."""
        if self.root is None:
            return None
        path = self.root / f"{name}.halos"
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    def halos_written(self, name, key):
        """Mark the folder of :meth:`halos` ``name`` complete: an earlier pass wrote every block's halos, for
        ``key`` (a string naming their depth and blocks)."""
        if self.root is not None:
            (self.root / f"{name}.halos" / "complete").write_text(key)

    def written_halos(self, name, key):
        """The folder of :meth:`halos` ``name`` when :meth:`halos_written` marked it complete for ``key``,
        else None."""
        marker = None if self.root is None else self.root / f"{name}.halos" / "complete"
        if marker is None or not marker.exists() or marker.read_text() != key:
            return None
        return str(marker.parent)

    def open_stage(self, name, *, shape, chunks, dtype):
        """A staged store that a pass's own tasks write block by block: ``(path, marker(index), complete())``.

        The store is created in :func:`store_chunks` of ``chunks``; ``complete()``
        marks it finished once the pass has run (then :meth:`store` names it).
        """
        import zarr

        path, done = self.root / f"{name}.zarr", self.root / f"{name}.done"
        if not path.exists():
            zarr.create_array(str(path), shape=shape, dtype=dtype, fill_value=0,
                              **intermediate_layout(store_chunks(chunks), dtype))
        done.mkdir(parents=True, exist_ok=True)
        return (str(path), lambda index: str(block_marker(done, index)),
                lambda: (done / "complete").touch())

    def stage_in_pass(self, name, values, compute, *, dtype, device=None):
        """``values.map_blocks(compute)`` staged by the pass that computes it, not by a pass of its own.

        Returns ``(array, after)``: ``array`` for that one pass (each block is
        read back when its marker exists, else computed, written and marked,
        and handed on in memory to the pass's other tasks); ``after()``, once
        the pass has run, marks the store complete and returns it read from
        disk for later passes. Without a folder (or ``name``) nothing is
        staged and both are the lazy array.
        """
        if self.root is None or name is None:
            array = values.map_blocks(compute, dtype=dtype)
            return array, lambda: array
        import zarr

        path, done = self.root / f"{name}.zarr", self.root / f"{name}.done"
        total = int(np.prod(values.numblocks))
        self.totals[name] = total

        def stored():
            array = staged_array(path, values.chunks)
            if tuple(array.shape) != tuple(values.shape) or np.dtype(array.dtype) != np.dtype(dtype):
                raise DeclumpError(f"the staged {name} in {self.root} does not match this run; delete that folder "
                                   "or run with --overwrite")
            return to_device(array, device)

        if (done / "complete").exists():
            self.computed[name] = 0
            array = stored()
            return array, lambda: array
        if not path.exists():
            zarr.create_array(str(path), shape=values.shape, dtype=dtype, fill_value=0,
                              **intermediate_layout(store_chunks(values.chunks), dtype))
        done.mkdir(parents=True, exist_ok=True)
        self.computed[name] = total - sum(1 for m in done.iterdir() if m.name != "complete")
        array = values.map_blocks(functools.partial(_stage_block, edges=grid_edges(values.chunks)), compute,
                                  str(path), str(done), dtype=dtype)

        def after():
            (done / "complete").touch()
            return stored()

        return array, after


def folder_bytes(folder):
    """Bytes that the files under ``folder`` take on disk (allocated blocks; 0 where it does not exist)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:  # removed meanwhile
                pass
    return total


def _bytes_text(n):
    """``n`` bytes in decimal units to three digits: ``262 kB``, ``4.3 TB``."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000


def block_marker(done, index):
    """The marker of block ``index`` in the folder ``done``: touched once the block is stored."""
    return Path(done) / ".".join(str(i) for i in index)


def _block_place(edges, index, done):
    """``(region, marker)`` of block ``index`` of the grid with :func:`grid_edges` ``edges``."""
    return block_box(edges, index), block_marker(done, index)


def _stage_block(block, compute, path, done, edges, block_id=None):
    """One block of :meth:`Workspace.stage_in_pass`: read back if marked done, else computed, written, marked."""
    region, marker = _block_place(edges, block_id, done)
    if marker.exists():
        return get_array_module(block).asarray(read_staged(path, region))
    result = compute(block)
    write_block(result, path, region, str(marker))
    return result


def write_blocks(array, path, done, *, what, verbose=False, zarr_kwargs=None, measure=None,
                 beside=None):
    """Write a Dask array to a Zarr array at ``path`` block by block, skipping blocks marked in ``done``.

    Each block is one task that computes it, writes its region and then its
    marker (the write a blockwise step that Dask fuses with the steps
    computing the block: no block handed from task to task), so each stored
    chunk is written by exactly one task and an interrupted run resumes where
    it stopped. The Zarr array is created when missing (chunks:
    :func:`store_chunks`, unless ``zarr_kwargs`` gives ``chunks`` and
    ``shards``; blocks must align with them, or with the shards).
    Returns the number of blocks computed.

    ``measure(block, beside_block, origin)``: computed by the same task on
    every block it writes (and, for blocks written before, on the stored
    block), with the aligned block of the Dask array ``beside`` (or None):
    small per-block results without another pass that reads the array back.
    Then returns ``(blocks computed, [result per block])``.
    """
    import dask.array as da
    import zarr
    from dask import delayed

    path, done = Path(path), Path(done)
    chunks = array.chunks
    if not path.exists():
        zarr.create_array(str(path), shape=array.shape, dtype=array.dtype, fill_value=0,
                          **{"chunks": store_chunks(chunks), **(zarr_kwargs or {})})
    done.mkdir(parents=True, exist_ok=True)
    beside = beside.rechunk(chunks) if beside is not None else None
    # One result per block (a 1-element object block), each key new: a running cluster never hands back an
    # earlier call's result for a write.
    token = uuid.uuid4().hex
    write = functools.partial(_write_and_measure, path=str(path), done=str(done), measure=measure,
                              edges=grid_edges(chunks))
    written = da.map_blocks(write, array, *([beside] if beside is not None else []), dtype=object,
                            chunks=tuple((1,) * n for n in array.numblocks),
                            meta=np.empty((0,) * array.ndim, dtype=object), name=f"write-{token}")
    blocks = written.to_delayed()  # optimised: the steps computing each block fused into its writing task
    beside_blocks = None  # ``beside`` block by block, built (a graph optimisation in this process) only on resuming
    tasks, fused, voxels = [], [], 0
    for index, region in block_boxes(chunks):
        fused.append(not block_marker(done, index).exists())
        if not fused[-1]:
            if measure is not None:  # written before: measured from the store
                if beside is not None and beside_blocks is None:
                    beside_blocks = beside.to_delayed()
                other = None if beside_blocks is None else beside_blocks[index]
                # Keyed by block like the written blocks' tasks: a resumed pass runs them several to a task too.
                tasks.append(delayed(_measure_stored)(str(path), region, other, [r.start for r in region], measure,
                                                      dask_key_name=(f"measured-{token}", *index)))
            continue
        tasks.append(blocks[index])
        voxels += int(np.prod([c[i] for c, i in zip(chunks, index)]))
    results = run_tasks(tasks, what, voxels=voxels, verbose=verbose)
    computed = sum(fused)
    if measure is None:
        return computed
    # One task per block here, in order: the written blocks' results in their 1-element blocks, the stored
    # blocks' as they are.
    return computed, [r.flat[0] if f else r for r, f in zip(results, fused)]


def _write_and_measure(block, beside=None, *, path, done, measure, edges, block_id=None):
    """One block of :func:`write_blocks`: written with its marker, then ``measure``'d (None without one),
    the result in a 1-element object array (a block of the blockwise result array)."""
    region, marker = _block_place(edges, block_id, done)
    write_block(block, path, region, str(marker))
    out = np.empty((1,) * block.ndim, dtype=object)
    out[(0,) * block.ndim] = None if measure is None else measure(block, beside, [r.start for r in region])
    return out


def _measure_stored(path, region, beside, origin, measure):
    return measure(read_staged(path, region), beside, origin)


def _staged_volume(path, device=None):
    """The :class:`~gpu_pipeline.chunked.source.StoredVolume` of a store this run wrote (a staged store of
    its work folder, or its output, re-read on resuming): an undecodable chunk's one-line error names it and
    says how to start over."""
    from gpu_pipeline.chunked.source import StoredVolume, open_array

    array = open_array(path)
    return StoredVolume(array, str(path), (slice(None),) * array.ndim, device,
                        damaged="this unfinished run's work folder or output is damaged there; run again with "
                                "--overwrite to start over")


def read_staged(path, box, device=None):
    """The voxels of ``box`` of the staged store at ``path`` (CuPy with ``device='gpu'``)."""
    return _staged_volume(path, device).read(box)


def staged_array(path, chunks):
    """The staged store at ``path`` as a lazy Dask array in ``chunks``, one read per block (see
    :func:`read_staged`)."""
    from gpu_pipeline.chunked.source import blockwise_reads

    stored = _staged_volume(path)
    return blockwise_reads(stored, stored.array.shape, stored.array.dtype, chunks)


def to_device(array, device):
    """A Dask array with CuPy chunks for ``device='gpu'``, NumPy chunks otherwise."""
    if device != "gpu":
        return array
    import cupy

    from gpu_pipeline.chunked.source import register_stored, stored_volume

    moved = array.map_blocks(cupy.asarray, dtype=array.dtype, meta=cupy.empty((0,) * array.ndim, array.dtype))
    stored = stored_volume(array)
    return moved if stored is None else register_stored(moved, stored.on("gpu"))  # still one read per block


@contextlib.contextmanager
def run_lock(output):
    """Hold ``OUTPUT.lock`` (an advisory ``flock``) while a chunked run writes ``output``.

    A second run on the same output, started while the first runs (a job
    submitted twice), is refused in one line naming the holder. Before, the
    two removed each other's work files: the second stopped in a
    FileNotFoundError traceback (2026-12-04). The kernel releases the lock
    when its process ends, SIGKILL included, so a killed run's resume is never
    blocked. Where the file system has no locks (or the folder cannot be
    written, which the run then reports itself), runs go unguarded. The
    holder removes the file when it is done.
    """
    import fcntl
    import socket

    path = Path(f"{output}.lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")
    except OSError:
        yield
        return
    held = False
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = True
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise DeclumpError(f"another declump run is writing {output} ({holder}); wait for it to finish (the same "
                               "command then finds it complete), or choose another output") from None
        except OSError:  # no locks on this file system
            pass
        if held:
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
            handle.flush()
        yield
    finally:
        if held:
            with contextlib.suppress(OSError):
                path.unlink()
        handle.close()


def save_records(root, records, *, overwrite):
    """Record what defines a run (``records``: ``{file name: (JSON value, refusal message)}``) in ``root``.

    When ``root`` already holds records of a run and ``overwrite`` is off,
    each must be present and equal, else its refusal is raised (the first
    record's check comes first: the parameters before the input's fingerprint).
    """
    root = Path(root)
    texts = {name: json.dumps(value, sort_keys=True) for name, (value, _) in records.items()}
    if not overwrite and any((root / name).exists() for name in records):
        for name, (_, refusal) in records.items():
            if not (root / name).exists() or (root / name).read_text() != texts[name]:
                raise DeclumpError(refusal)
        return
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        from gpu_pipeline.io import DISK_FAULTS

        if exc.errno in DISK_FAULTS:  # read-only, full, no permission: the caller's one line, which says resume
            raise
        raise DeclumpError(f"cannot create the work folder {root}: {exc.strerror or exc}; give --scratch a folder "
                           "that can be created and written (or leave it out: beside the output)") from exc
    for name, text in texts.items():
        (root / name).write_text(text)
