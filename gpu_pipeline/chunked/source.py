"""Volumes on disk as Dask arrays: Zarr v2/v3 arrays and OME-Zarr images, read chunk by chunk.

A chunk that cannot be decoded raises a one-line error naming the chunk;
nothing is read until a computation asks for it. One listing of the store's
files, taken when it is opened, finds missing chunks (which Zarr would read
as the fill value) and gives the input's fingerprint.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import math
import os
import threading
import weakref

import numpy as np

from gpu_pipeline._backend import DeclumpError
from gpu_pipeline._common import native_byte_order, whole_number_at_least
from gpu_pipeline.io import (CORRUPT_CHUNK, EVERY_CHUNK, check_chunks, list_stored_files, open_zarr, piecewise_store,
                             unreadable_chunk, write_in_pieces)


class _InPlace(concurrent.futures.ThreadPoolExecutor):
    """An executor that runs each call at once in the calling thread (a ThreadPoolExecutor only in name:
    asyncio takes no other kind as a loop's default executor)."""

    def submit(self, fn, /, *args, **kwargs):
        done = concurrent.futures.Future()
        try:
            done.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # handed to the awaiting coroutine, as a thread pool would
            done.set_exception(exc)
        return done


class _OwnLoop:
    """One thread's event loop for :func:`zarr_call`, closed when the thread ends (its thread-local value
    goes) or the process is a fork of the one that made it."""

    def __init__(self):
        self.pid, self.loop = os.getpid(), asyncio.new_event_loop()
        self.loop.set_default_executor(_InPlace(max_workers=1))

    def __del__(self):
        if not self.loop.is_closed():
            self.loop.close()


_thread_loop = threading.local()


def zarr_call(coroutine_function, *args):
    """``await coroutine_function(*args)`` (Zarr's asynchronous API) run to its end in the calling thread.

    Zarr's synchronous API hands each call to its own I/O thread, which hands
    each chunk's decoding, encoding and file access on to a thread pool while
    the caller waits: tens of hand-overs per block of a sharded store. With
    as many busy processes as cores, as a cluster's workers are, a core idles
    at each hand-over until the woken thread gets one. Here the same calls run
    in the caller's thread, on an event loop of its own whose executor runs
    them in place. From a thread that runs an event loop already (a
    notebook's main thread), which cannot run another, the call runs so in a
    short-lived thread of its own (public API only: no use of Zarr's
    internal ``sync``).
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        with concurrent.futures.ThreadPoolExecutor(1) as helper:
            return helper.submit(zarr_call, coroutine_function, *args).result()
    own = getattr(_thread_loop, "own", None)
    if own is None or own.pid != os.getpid():
        own = _thread_loop.own = _OwnLoop()
    return own.loop.run_until_complete(coroutine_function(*args))


async def _open_async(path, mode):
    import zarr.api.asynchronous

    # Writes through a store that hands large chunks to the kernel in pieces (gpu_pipeline.io.write_in_pieces).
    store = str(path) if mode == "r" else piecewise_store(path)
    return await zarr.api.asynchronous.open_array(store=store, mode=mode)


def open_array(path, mode="r"):
    """``zarr.open_array(path, mode=mode)``, its metadata read in the calling thread (:func:`zarr_call`);
    the array's own reads and writes take Zarr's path unless made through :func:`zarr_call`."""
    import zarr

    return zarr.Array(zarr_call(_open_async, path, mode))


async def _write_region(path, region, data):
    array = await _open_async(path, "r+")
    await array.with_config(EVERY_CHUNK).setitem(region, data)


def write_region(path, region, data):
    """``zarr.open_array(path, mode='r+')[region] = data`` (a NumPy array), in the calling thread
    (:func:`zarr_call`).

    Every chunk is written, those holding only the fill value too: Zarr
    otherwise compares each chunk with it before encoding (about 5 ms of a
    128^3 int32 block's 22 ms write, 2026-12-03), and a chunk missing from a
    finished store then always means a damaged one (see ``missing_chunks``)."""
    zarr_call(_write_region, path, region, data)


class StoredVolume:
    """Where a volume lies on disk (the input of :func:`open_volume`, or a staged store of a run's work
    folder): reads any box of it from its Zarr array.

    The Dask array of that volume is one task per block, each reading its
    block; with this, a pass can read its blocks and hand their halos to
    their neighbours (:func:`map_haloed`), instead of Dask cutting the halo
    out of the neighbouring blocks in many small tasks. ``damaged``:
    what the one-line error of an undecodable chunk says after naming it.
    """

    def __init__(self, array, path, selection, device=None, damaged=CORRUPT_CHUNK):
        self.array, self.path, self.selection, self.device = array, path, selection, device
        self.damaged = damaged

    def __dask_tokenize__(self):
        return ("StoredVolume", self.path, repr(self.selection), self.device, tuple(self.array.shape),
                str(self.array.dtype), tuple(self.array.chunks))

    def on(self, device):
        """The same store, its boxes read onto ``device`` ('gpu': CuPy arrays)."""
        return StoredVolume(self.array, self.path, self.selection, device, self.damaged)

    def read(self, box):
        """The voxels of ``box`` (slices over the volume's axes): a NumPy array (CuPy on the GPU).

        A chunk that cannot be decoded raises a one-line error naming it.
        """
        stored = _compose(self.selection, box)
        try:
            block = np.asarray(zarr_call(self.array.async_array.getitem, stored))
        except Exception as exc:
            raise unreadable_chunk(self.array, stored, exc, self.path, self.damaged)
        block = native_byte_order(block)
        if self.device == "gpu":
            import cupy

            return cupy.asarray(block)
        return block


#: Dask array name -> its StoredVolume, for arrays that read a store block by block (weak: an entry goes with
#: the last graph that holds its StoredVolume).
_STORED = weakref.WeakValueDictionary()


def stored_volume(array):
    """The :class:`StoredVolume` that ``array`` (a Dask array) reads block by block unchanged, or None."""
    return _STORED.get(getattr(array, "name", None))


def register_stored(array, stored):
    """Record that each block of ``array`` is ``stored.read`` of that block's box (see :func:`stored_volume`)."""
    _STORED[array.name] = stored
    return array


def _read_block(stored, edges, block_id=None):
    from gpu_pipeline.chunked.workspace import block_box

    return stored.read(block_box(edges, block_id))


def blockwise_reads(stored, shape, dtype, chunks):
    """A lazy Dask array of ``shape`` whose every block is ``stored.read`` of its box (one task per block),
    registered for :func:`stored_volume`."""
    import dask.array as da

    from gpu_pipeline.chunked.workspace import grid_edges

    grid = da.core.normalize_chunks(chunks, shape)
    return register_stored(da.map_blocks(functools.partial(_read_block, edges=grid_edges(grid)), stored,
                                         dtype=dtype, chunks=grid,
                                         meta=np.empty((0,) * len(shape), dtype=dtype)), stored)


def halo_box(start, stop, depth, shape):
    """The box ``start``..``stop`` grown by ``depth`` voxels per axis and clipped to ``shape``.

    Returns ``(box, left)``: the slices, and how many voxels it gained on
    each axis's low side.
    """
    low = [max(0, int(a) - d) for a, d in zip(start, depth)]
    high = [min(int(n), int(b) + d) for b, d, n in zip(stop, depth, shape)]
    return tuple(slice(a, b) for a, b in zip(low, high)), [int(a) - lo for a, lo in zip(start, low)]


def map_haloed(stored, chunks, depth, function, *, dtype, meta, name, spill=None, clipped=False, leading=None,
               shared=()):
    """A lazy Dask array of ``function(block with a halo of depth voxels)``, cut back to each block of ``chunks``.

    Each block's halo is what its neighbouring blocks hold, with the edge
    voxels repeated where it leaves the volume (as ``map_overlap`` with
    ``boundary='nearest'``). Two tasks per block: one reads the block from
    ``stored`` and hands its neighbours the slabs of it they need
    (:func:`_block_shell`), one reads the block again, puts those slabs
    around it and calls ``function`` (:func:`_haloed_call`). Every stored
    chunk is thus decoded about twice, where a box with a halo read straight
    from the store decodes every chunk it touches whole: 27 for an interior
    3D block of a volume stored in chunks of the block's shape (1.15 s of
    reads against 0.10 s for the 32 blocks of a 256x512x512 volume in 128^3
    chunks, 2026-12-03). Needs every block but the first and the last along
    an axis to hold the halo (:func:`neighbours_hold_halo`; ``fit_halo``
    makes it so).

    ``spill``: a folder where each block's slabs go, one file per block,
    each neighbour reading only its own slab of it (the caller removes the
    folder after the pass); one task writes the files of a run of
    :data:`~gpu_pipeline.chunked.workspace.BLOCK_GROUP` blocks along the
    last axis (a few milliseconds a block). Without it the slabs go from task to task in
    memory, where they wait for the neighbours that need them: up to two
    planes of blocks' worth (8 MB more on 256x512x512 in 128^3 blocks, 17 MB
    on 512^3; gigabytes for a terabyte volume's planes of thousands of blocks).

    ``clipped``: the halo stops at the volume's faces (nothing repeated) and
    ``function(extended, left, core_shape, shared)`` returns the block's own
    result (``left``: the halo's width on each low side). ``leading``: the
    length of a new first axis of the result, one chunk (a classifier's
    classes). ``shared``: objects every task takes (as the list ``shared``),
    in the graph once, not in every task.
    """
    import dask.array as da

    from gpu_pipeline.chunked.workspace import block_boxes

    args = None
    if clipped:
        args = [(tuple(b.stop - b.start for b in box),) for _, box in block_boxes(chunks)]
    graph, keys = _haloed_graph(stored, chunks, depth, function, name, pad=not clipped, foreground=False,
                                args=args, spill=spill, lead=() if leading is None else (0,), shared=shared)
    return da.Array(graph, keys[0][0], chunks=chunks if leading is None else ((int(leading),),) + tuple(chunks),
                    dtype=dtype, meta=meta)


def haloed_tasks(stored, chunks, depth, function, args, *, name, foreground=False, spill=None, given=None):
    """Per block of ``chunks`` (C order), a Delayed ``function(extended, left, *args[k])``: the block with its
    halo of ``depth`` voxels clipped to the volume (``left``: its width on each low side), exchanged between
    neighbouring blocks as in :func:`map_haloed`. ``foreground``: the halo carries ``block > 0`` only (as 0
    and 1, packed to bits between tasks; the core keeps its values): what a distance transform reads.
    ``spill``: as :func:`map_haloed`'s. ``given``: a folder that already holds every block's slabs, written
    by the pass that stored the blocks (:func:`write_shells`): one task per block, none handing slabs on."""
    from dask.delayed import Delayed

    graph, keys = _haloed_graph(stored, chunks, depth, function, name, pad=False, foreground=foreground,
                                args=args, spill=spill, given=given)
    return [Delayed(key, graph, layer=key[0]) for key in keys]


def write_shells(block, beside, origin, *, chunks, depth, foreground, folder):
    """Write the slabs of one block (at ``origin`` in the grid ``chunks``) that its neighbours' tasks of a
    later :func:`haloed_tasks` pass read, to ``folder`` as that pass's own slab tasks would: a ``measure``
    of :func:`~gpu_pipeline.chunked.workspace.write_blocks`, run by the task that stores the block (the
    block then read once less, and the later pass one task per block with no inputs from other tasks)."""
    from gpu_pipeline.chunked.workspace import chunk_starts

    depth = tuple(int(d) for d in depth)
    index = tuple(int(np.searchsorted(s, o)) for s, o in zip(chunk_starts(chunks), origin))
    _block_slabs(block, depth, _near(index, chunks, depth), foreground, f"{folder}/{_shell_name(index)}")


def shells_key(chunks, depth):
    """What the slab files of :func:`write_shells` depend on, as a string: the blocks and the depth."""
    return repr((tuple(tuple(int(n) for n in c) for c in chunks), tuple(int(d) for d in depth)))


def _shell_name(index):
    return "_".join(map(str, index))


def _near(index, chunks, depth):
    """The offsets (-1, 0, 1 per axis) of the neighbours of block ``index`` that lie in the grid ``chunks``,
    along axes with a halo: whose slabs the block's slab file holds, in this order."""
    counts = [len(c) for c in chunks]
    return [o for o in _offsets(tuple(d > 0 for d in depth))
            if all(0 <= i + x < n for i, x, n in zip(index, o, counts))]


@functools.lru_cache(maxsize=None)
def _offsets(haloed):
    """The offsets (-1, 0, 1 per axis) but the zero one, zero along the axes not ``haloed``, in C order."""
    import itertools

    return [o for o in itertools.product((-1, 0, 1), repeat=len(haloed))
            if any(o) and all(h or x == 0 for x, h in zip(o, haloed))]


def _shell_plan(chunks, depth, foreground, itemsize):
    """Per block index: :func:`_near`, and where each slab its neighbours need lies in its slab file,
    ``{offset: (byte offset, bytes, shape)}``."""
    import itertools

    near, layout = {}, {}
    for index in itertools.product(*[range(len(c)) for c in chunks]):
        near[index], at, layout[index] = _near(index, chunks, depth), 0, {}
        for o in near[index]:
            slab = tuple(int(chunks[a][i]) if x == 0 else min(d, int(chunks[a][i]))
                         for a, (i, x, d) in enumerate(zip(index, o, depth)))
            size = -(-math.prod(slab) // 8) if foreground else math.prod(slab) * itemsize
            layout[index][o] = (at, size, slab)
            at += size
    return near, layout


def neighbours_hold_halo(chunks, depth):
    """Whether every block's halo of ``depth`` lies in its direct neighbours (or outside the volume): each
    block but the first and the last along an axis at least ``depth`` long."""
    return all(all(int(n) >= int(d) for n in c[1:-1]) for c, d in zip(chunks, depth))


def _haloed_graph(stored, chunks, depth, function, name, *, pad, foreground, args, spill, lead=(), shared=(),
                  given=None):
    import uuid

    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    from gpu_pipeline.chunked.workspace import block_boxes, block_run

    depth = tuple(int(d) for d in depth)
    if not neighbours_hold_halo(chunks, depth):
        raise DeclumpError(f"internal: blocks of {chunks} are shorter than the halo {depth} inside the volume")
    shape = tuple(int(sum(c)) for c in chunks)
    # New keys every call: a running cluster must not hand back an earlier call's result (or its error, a full
    # disk since freed) for tasks that write the spill files.
    token = tokenize(stored, chunks, depth, function, name, pad, foreground, args, spill, given)
    token = f"{token}-{uuid.uuid4().hex}"
    shells, out = f"{name}-shells-{token}", f"{name}-{token}"
    near, layout = _shell_plan(chunks, depth, foreground, np.dtype(stored.array.dtype).itemsize)
    layers, keys = {out: {}} if given is not None else {shells: {}, out: {}}, []
    together = f"{name}-shared-{token}"
    if shared:
        layers[together] = {f"{together}-{i}": value for i, value in enumerate(shared)}
    runs, after = {}, None
    files = given is not None or spill is not None  # the slabs in files (their paths), else handed by tasks
    for k, (index, box) in enumerate(block_boxes(chunks)):
        neighbours = [tuple(i + x for i, x in zip(index, o)) for o in near[index]]
        if given is None and spill is not None:
            # Slab files: one task writes those of a run of BLOCK_GROUP blocks along the last axis (a few ms
            # each), and a block's task waits for its neighbours' runs and reads their files.
            runs.setdefault(block_run(index), []).append((box, near[index], f"{spill}/{_shell_name(index)}"))
            sources = [f"{spill}/{_shell_name(j)}" for j in neighbours]
            after = list(dict.fromkeys((shells, *block_run(j)) for j in neighbours))  # the runs writing them
        elif given is None:
            layers[shells][(shells, *index)] = (_block_shell, stored, box, depth, near[index], foreground, None)
            sources = [(shells, *j) for j in neighbours]
        else:  # the slab files are there: their paths, no tasks
            sources = [f"{given}/{_shell_name(j)}" for j in neighbours]
        where = [layout[j][tuple(-x for x in o)] for j, o in zip(neighbours, near[index])]
        keys.append((out, *lead, *index))
        # What is the same in every run of the task in a partial, which Dask does not look into: walking its
        # nested lists for keys took the client 0.4-0.5 ms per block (70 000 calls for 256 blocks). The graph's
        # own inputs after it: the slabs' tasks (or, for files, the tasks writing them, whose values are None)
        # and the shared objects' keys, in lists of the task's own arguments (Dask hands it their values).
        fixed = [stored, box, depth, shape, function, near[index], where, foreground, pad,
                 () if args is None else tuple(args[k])]
        shared_keys = [f"{together}-{i}" for i in range(len(shared))] if shared else None
        if files:
            layers[out][keys[-1]] = (functools.partial(_haloed_call, *fixed, sources), shared_keys, after)
        else:
            layers[out][keys[-1]] = (functools.partial(_haloed_call, *fixed), sources, shared_keys)
    for run, blocks in runs.items():  # one task per run writing its blocks' slab files (a spill)
        layers[shells][(shells, *run)] = (functools.partial(_blocks_shells, stored, blocks, depth, foreground),)
    if given is None and spill is not None:
        layers[out] = _queued(layers[out], {key for name in layers if name != out for key in layers[name]})
    dependencies = {layer: set() for layer in layers}
    dependencies[out] = set(layers) - {out}  # the shells (unless given), and the shared objects' layer if any
    return HighLevelGraph(layers, dependencies), keys


def _queued(layer, known):
    """The tasks of ``layer`` (legacy tuples whose inputs are among the keys ``known``: every other task's)
    marked as Dask marks the tasks that read data in (``data_producer``): a distributed scheduler then holds
    them in its queue and gives each to the first worker with a free thread, as it gives tasks with no inputs.

    For the blocks of a pass whose inputs from other tasks are only the slab files' writing (a path, no data).
    Placed by their inputs instead, every block of the pass went to a worker as soon as the slab tasks had
    run, half to each; the worker that shared its core with the client and the scheduler then finished
    0.1-0.2 s after the other, which waited (the smoothing pass, 256x512x512 in 128^3 blocks on the 2-core VM,
    2026-12-07: 1 -> 2 worker efficiency of the pass 0.79 and 0.87 before, 0.99 and 0.99 queued). Where this
    Dask has no such flag (before its task specs), the tasks as they were.
    """
    queued = {}
    try:  # Dask's own task specs (a private module): where they are not as here, the tasks as they were
        from dask._task_spec import Task, convert_legacy_task

        for key, task in layer.items():
            spec = convert_legacy_task(key, task, known)
            if not isinstance(spec, Task) or not hasattr(spec, "_data_producer"):  # pragma: no cover - older Dask
                return layer
            spec._data_producer = True
            queued[key] = spec
    except (ImportError, TypeError, AttributeError):  # pragma: no cover - Dask before 2024.12, or changed
        return layer
    return queued


def _slab(offset, depth):
    """Per axis, the part of a block that its neighbour at ``offset`` needs: its last (1) or first (-1)
    ``depth`` voxels, or all of it (0)."""
    return tuple(slice(None) if x == 0 else (slice(-d, None) if x > 0 else slice(0, d))
                 for x, d in zip(offset, depth))


def _blocks_shells(stored, blocks, depth, foreground):
    """:func:`_block_shell` of each ``(box, offsets, target)`` of ``blocks`` in turn, into its file."""
    for box, offsets, target in blocks:
        _block_shell(stored, box, depth, offsets, foreground, target)


def _block_shell(stored, box, depth, offsets, foreground, target):
    """One block read from ``stored`` (on the host): per offset in turn, the slab its neighbour at that offset
    needs (with ``foreground``: ``slab > 0`` packed to bits). ``target``: written there, one file (its path
    returned); else ``{offset: slab}``."""
    return _block_slabs(stored.on(None).read(box), depth, offsets, foreground, target)


def _block_slabs(block, depth, offsets, foreground, target):
    """The slabs of ``block`` (NumPy or CuPy) for its neighbours at ``offsets``, as :func:`_block_shell`
    hands them on: ``{offset: slab}`` on the host, or written to ``target`` (its path returned)."""
    import os

    from gpu_pipeline._backend import to_host

    slabs = {o: np.packbits(to_host(block[_slab(o, depth)] > 0)) if foreground else
             np.ascontiguousarray(to_host(block[_slab(o, depth)])) for o in offsets}
    if target is None:
        return slabs
    partial = f"{target}.partial"
    with open(partial, "wb") as f:
        for o in offsets:
            # Contiguous already: written from its own buffer, no copy. Not ndarray.tofile: its own C stream
            # can lose a failed write (a full disk) at its close and leave a short file that reads back wrong.
            write_in_pieces(f, slabs[o])
    os.replace(partial, target)  # a rerun of the task rewrites it whole
    return target


def _haloed_call(stored, box, depth, shape, function, offsets, where, foreground, pad, args, shells, shared=None,
                 after=None):
    """``function`` of the block ``box`` with its halo from its neighbours' ``shells`` (their slabs, or the
    files holding them at ``where``: (byte offset, bytes, shape); packed bits with ``foreground``).
    ``pad``: the edges repeated outside the volume and the result cut back to the block; else
    ``function(extended, left, *args)``, and ``shared`` (a list) after them when given. ``after``: the
    values (None) of the tasks that wrote the slab files, for Dask to run those first."""
    from gpu_pipeline._backend import get_array_module

    block = stored.read(box)
    xp = get_array_module(block)
    extended, left = halo_box([b.start for b in box], [b.stop for b in box], depth, shape)
    array = xp.empty(tuple(b.stop - b.start for b in extended), dtype=block.dtype)
    core = tuple(slice(lo, lo + b.stop - b.start) for lo, b in zip(left, box))
    array[core] = block
    for offset, shell, (at, size, slab_shape) in zip(offsets, shells, where):
        part = tuple(c if x == 0 else (slice(0, c.start) if x < 0 else slice(c.stop, n))
                     for x, c, n in zip(offset, core, array.shape))
        if isinstance(shell, str):  # the neighbour's spill file: only this slab's bytes
            slab = np.fromfile(shell, dtype=np.uint8, count=size, offset=at)
            slab = slab if foreground else slab.view(block.dtype)
        else:
            slab = shell[tuple(-x for x in offset)]
        if foreground:
            slab = np.unpackbits(slab, count=math.prod(slab_shape))
        array[part] = xp.asarray(slab).reshape(slab_shape)
    if not pad:
        return function(array, left, *args, *(() if shared is None else (shared,)))
    widths = [(d - lo, d - (e.stop - b.stop)) for b, e, lo, d in zip(box, extended, left, depth)]
    if any(w != (0, 0) for w in widths):
        array = xp.pad(array, widths, mode="edge")
    return function(array)[tuple(slice(d, d + b.stop - b.start) for d, b in zip(depth, box))]


def _compose(selection, slices):
    """Apply ``slices`` (over the volume's axes) inside ``selection`` (over the stored array's axes)."""
    out, it = [], iter(slices)
    for item in selection:
        out.append(next(it) if isinstance(item, slice) else item)
    return tuple(out)


def fingerprint(array, files):
    """What identifies the stored input: shape, dtype, chunking, codecs and a hash of its files' sizes and times."""
    digest = hashlib.sha256()
    for key in sorted(files):
        digest.update(f"{key}\0{files[key][0]}\0{files[key][1]}\n".encode())
    codecs = [*array.filters, *([array.serializer] if getattr(array, "serializer", None) else []),
              *array.compressors]
    return {"shape": [int(n) for n in array.shape], "dtype": str(array.dtype),
            "chunks": [int(c) for c in array.chunks], "shards": [int(c) for c in array.shards or ()],
            "codecs": [repr(c) for c in codecs], "files": len(files), "files_sha256": digest.hexdigest()}


#: Default processing blocks (:func:`default_blocks`): whole stored chunks grouped until each edge has this
#: many voxels (or the volume's extent), by the volume's dimensions.
BLOCK_EDGE = {2: 1024, 3: 128}
#: ... and this many in a 3D volume of at least :data:`LARGE_VOLUME_VOXELS` (:func:`block_edge`).
LARGE_BLOCK_EDGE = {3: 256}
#: 2^33 voxels (8 GiB of uint8; 512 blocks of 256^3).
LARGE_VOLUME_VOXELS = 1 << 33
#: ... while a block holds at most this many voxels (2^25: 256 MiB of float64).
BLOCK_VOXELS = 1 << 25


def block_edge(shape):
    """The edge :func:`default_blocks` groups stored chunks to for a volume of ``shape``: :data:`BLOCK_EDGE`,
    or :data:`LARGE_BLOCK_EDGE` in a 3D volume of :data:`LARGE_VOLUME_VOXELS` or more.

    A block's distance transform runs on its core and a halo of the peak window plus ``--max-radius`` (17
    voxels at the CLI's defaults): 2.0 times the voxels of a 128^3 core, 1.45 times those of a 256^3 one. On
    512^3 (2026-12-07, one core, ``declump run --workers 1``, four runs each, interleaved, identical labels)
    256^3 blocks took 17.7-19.0 s against 20.2-21.8 s in 128^3, and a worker's peak memory grew from about
    0.3 to 0.6 GiB. Their cost is in the passes' tails: a pass ends on each worker's last block, and a
    256^3 block is seconds of work, so a volume needs many of them a worker; from 2^33 voxels it has 512, 32
    a thread of a 16-core node (a terabyte: 60,000). The volume's shape alone decides, not the engine's
    threads, so a resumed run meets the same blocks on any cluster.
    """
    ndim = len(shape)
    if ndim in LARGE_BLOCK_EDGE and math.prod(int(n) for n in shape) >= LARGE_VOLUME_VOXELS:
        return LARGE_BLOCK_EDGE[ndim]
    return BLOCK_EDGE[ndim]


def default_blocks(store_chunks, shape):
    """Processing block shape for a volume stored in ``store_chunks``: whole stored chunks, grouped per axis
    until each edge reaches :func:`block_edge` voxels (:data:`BLOCK_EDGE`, larger in a large 3D volume) or
    the volume's extent, within :data:`BLOCK_VOXELS`.

    Every block is read with a halo (4 voxels for the smoothing, 17 for the
    peaks at the CLI's defaults), and a read decodes every stored chunk it
    touches whole. In blocks of the store's own small chunks the halos cost
    more than the cores: 256^3 stored in 64^3 chunks took 7.1 s on one core
    in 64^3 blocks and 4.4 s in 128^3 blocks (2026-12-02). The axis with the
    shortest edge grows first, one stored chunk at a time; chunks already as
    long as the target are kept.
    """
    edge = block_edge(shape)
    block = [min(int(c), int(n)) for c, n in zip(store_chunks, shape)]
    while True:
        for axis in sorted(range(len(block)), key=lambda a: block[a]):
            if block[axis] >= min(edge, int(shape[axis])):
                continue
            grown = min(int(shape[axis]), block[axis] + int(store_chunks[axis]))
            if math.prod(block[:axis] + [grown] + block[axis + 1:]) <= BLOCK_VOXELS:
                block[axis] = grown
                break
        else:
            return tuple(block)


def open_volume(path, *, channel=None, timepoint=None, chunks=None, missing_chunks="error",
                return_fingerprint=False, accept_bool=False):
    """A lazy Dask array of a 2D/3D volume stored as Zarr or OME-Zarr, and its spacing.

    Parameters
    ----------
    path : str or Path
        A Zarr array, or an OME-Zarr image group (level 0 is read).
    channel, timepoint : int, optional
        Pick from ``c``/``t`` axes (required when they hold more than one).
    chunks : tuple of int or "auto", optional
        Processing chunk shape; default: the store's chunks; ``"auto"``:
        :func:`default_blocks` of them (what ``declump run`` uses).
    missing_chunks : "error" or "fill"
        A chunk file absent from the store (found from one listing of its
        files) raises a `DeclumpError` naming it (default); ``fill``: read
        as the array's fill value, as Zarr does, for stores that are sparse
        on purpose (Zarr 3 skips chunks that are all fill value unless
        written with ``write_empty_chunks=True``).
    return_fingerprint : bool
        Also return the input's fingerprint (see :func:`fingerprint`).
    accept_bool : bool
        Also accept a boolean array (a mask), not only intensities.

    Returns
    -------
    volume : dask.array.Array
    spacing : list of float or None
    fingerprint : dict, only with ``return_fingerprint``
    """
    array, selection, spacing = open_zarr(path, channel=channel, timepoint=timepoint)
    kept = [i for i, item in enumerate(selection) if isinstance(item, slice)]
    shape = tuple(array.shape[i] for i in kept)
    if len(shape) not in (2, 3):
        raise DeclumpError(f"{path} holds a {len(shape)}D volume {shape}; declump accepts 2D or 3D "
                           "(pick a channel/time point with --channel/--timepoint)")
    from gpu_pipeline.pipeline import refuse_channels_last

    refuse_channels_last(shape, str(path))
    if min(shape) == 0:
        raise DeclumpError(f"{path} holds an empty volume (shape {shape}); pass a non-empty 2D or 3D array")
    if min(shape) < 2:  # as in memory (validate_image): it ran as a volume of one plane, by the 3D rules
        raise DeclumpError(f"{path} holds a volume of shape {shape}, one voxel along an axis; declump accepts 2D and "
                           "3D arrays at least 2 voxels along every axis (a stack of one plane: store that plane as "
                           "a 2D array, or as an OME-Zarr image with a z axis of size 1)")
    if np.dtype(array.dtype).kind not in ("buif" if accept_bool else "uif"):
        raise DeclumpError(f"{path} has dtype {array.dtype}; declump accepts integer or floating-point intensities")
    files = list_stored_files(array)
    check_chunks(array, selection, path, files, missing_chunks)
    store_chunks = tuple(array.chunks[i] for i in kept)
    if isinstance(chunks, str) and chunks == "auto":
        chunks = default_blocks(store_chunks, shape)
    elif chunks is not None and not all(whole_number_at_least(c, 1) for axis in tuple(chunks)
                                        for c in (axis if isinstance(axis, (tuple, list)) else (axis,))):
        raise DeclumpError(f"chunks must be whole numbers of at least 1, got {tuple(chunks)}")
    elif chunks is not None and len(tuple(chunks)) != len(shape):
        raise DeclumpError(f"--chunks {','.join(str(c) for c in chunks)} has {len(tuple(chunks))} values but "
                           f"{path} is {len(shape)}D {shape}; give one chunk length per axis")
    volume = blockwise_reads(StoredVolume(array, str(path), selection), shape,
                             np.dtype(array.dtype).newbyteorder("="), chunks or store_chunks)
    if return_fingerprint:
        return volume, spacing, fingerprint(array, files)
    return volume, spacing

