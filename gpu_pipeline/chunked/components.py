"""Connected components of a chunked mask, equal to the in-memory labelling for any chunking.

One pass over the blocks (:func:`components_chunked`):

1. each task labels its block on its own (NumPy or CuPy, face
   connectivity), stages the block's ids (when a workspace is given) and
   returns small summaries: per component its first voxel, size and value,
   optionally the faces it shares with other values, and its boundary slabs;
2. one task per run of blocks along the last axis collects, per face between
   two chunks, the pairs of ids that touch (a few thousand per face), merged
   with a sparse connected-components step
   on that small graph; no Python object per voxel and no task per label;
3. ids are renumbered by each component's first voxel in C order, which is
   also how ``scipy.ndimage.label`` numbers them: byte-identical. Later passes
   read the staged block ids through a small table per block.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np

from gpu_pipeline._backend import get_array_module, ops_for, to_host
from gpu_pipeline.chunked.workspace import block_origin, block_run, grid_edges, run_tasks
from gpu_pipeline.stages.components import count_pairs, face_pairs_between_labels, piece_stats


def _label_local(block, by_value):
    """Components of one block: (labels, count); equal-value components when ``by_value``."""
    ops = ops_for(block)
    if by_value:
        labels = ops.label_by_value(block)
        return labels, int(labels.max()) if labels.size else 0
    return ops.label(block)


def _local_labels(block, by_value):
    """One block's own components numbered 1..count (int32: a block holds far fewer than 2^31 voxels)."""
    labels, _ = _label_local(block, by_value)
    return labels.astype(get_array_module(labels).int32, copy=False)


def _summary(ids, values, start, shape, per_block):
    """One block's own result and its six (four in 2D) boundary slabs, as small host arrays."""
    result = per_block(ids, values, start, shape) if per_block is not None else None
    faces = []
    for axis in range(ids.ndim):
        ends = []
        for part in (slice(0, 1), slice(-1, None)):
            index = [slice(None)] * ids.ndim
            index[axis] = part
            # Copies: a view would keep the whole block alive until every face task has run.
            ends.append((to_host(ids[tuple(index)]).copy(), to_host(values[tuple(index)]).copy()))
        faces.append(tuple(ends))
    return result, faces


def _summary_block(ids, values, per_block, edges, block_id=None):
    """:func:`_summary` of one block, in a 1-element object array: a block of the blockwise array that
    :func:`summarize_blocks` builds, so that Dask fuses it with the tasks computing ``ids`` and ``values``.
    ``edges``: :func:`~gpu_pipeline.chunked.workspace.grid_edges` of their blocks."""
    out = np.empty((1,) * ids.ndim, dtype=object)
    out[(0,) * ids.ndim] = _summary(ids, values, block_origin(edges, block_id),
                                    tuple(e[-1] for e in edges), per_block)
    return out


def _across_face(low_summary, high_summary, axis, per_face):
    """``per_face`` of the slabs facing each other: the low block's last layer, the high block's first."""
    (a, va), (b, vb) = low_summary.flat[0][1][axis][1], high_summary.flat[0][1][axis][0]
    return per_face(a, b, va, vb, axis)


def _result_and_faces(low_summary, axes, per_face, *high_summaries):
    """A block's own result from its :func:`_summary_block`, and :func:`_across_face` of each face it shares
    with its next block along one of ``axes`` (none for the last block along every axis)."""
    return low_summary.flat[0][0], [_across_face(low_summary, high, axis, per_face)
                                    for axis, high in zip(axes, high_summaries)]


def _results_and_faces(per_face, plan, *summaries):
    """:func:`_result_and_faces` of each block of ``plan`` (``(its summary, axes, its next blocks'
    summaries)``, as positions in ``summaries``), in one task."""
    return [_result_and_faces(summaries[low], axes, per_face, *[summaries[h] for h in highs])
            for low, axes, highs in plan]


def summarize_blocks(ids, values, *, per_block=None, per_face=None):
    """Delayed per-block and per-chunk-face results over two aligned chunked arrays.

    One task per block computes ``per_block(ids_block, values_block, start,
    shape)`` and keeps only the block's boundary slabs; for every internal
    face, ``per_face(low_slab_ids, high_slab_ids, low_slab_values,
    high_slab_values, axis)`` runs on the two slabs that face each other.
    One task per run of up to :data:`~gpu_pipeline.chunked.workspace.BLOCK_GROUP`
    blocks along the last axis (:func:`~gpu_pipeline.chunked.workspace.block_run`)
    hands back those blocks' own results with those of the faces they
    share with their next blocks (up to one per axis): that many times fewer
    tasks and results for the scheduler and the client, each task holding
    that many blocks' summaries with those of their next blocks (boundary
    slabs: about 0.8 MB per 128^3 block). No task holds a
    whole block for later, so memory stays at a few blocks in flight plus
    slabs, whatever the number of chunks. The per-block task is one
    blockwise step after those computing ``ids`` and ``values`` (which is
    often computed from ``values``): Dask fuses them into one task per
    block that computes each block of both once.

    Returns ``(results, face_blocks)``: per run of blocks, in C order of the
    blocks, a delayed list of ``(block result, [face results])`` per block;
    and per block, the list of the (low, high) block indices of its faces.
    """
    import dask.array as da
    from dask import delayed

    summarised = da.map_blocks(functools.partial(_summary_block, edges=grid_edges(ids.chunks)), ids, values,
                               per_block, dtype=object,
                               chunks=tuple((1,) * n for n in ids.numblocks),
                               meta=np.empty((0,) * ids.ndim, dtype=object))
    blocks = summarised.to_delayed()  # optimised: the blockwise steps before it fused into each block's task
    groups, face_blocks = {}, []
    for index in itertools.product(*[range(n) for n in ids.numblocks]):
        axes = tuple(axis for axis in range(ids.ndim) if index[axis] + 1 < ids.numblocks[axis])
        others = [tuple(i + (a == axis) for a, i in enumerate(index)) for axis in axes]
        groups.setdefault(block_run(index), []).append((index, axes, others))
        face_blocks.append([(index, other) for other in others])
    results = []
    for members in groups.values():  # in C order of their blocks
        used = list(dict.fromkeys(i for index, _, others in members for i in (index, *others)))
        at = {index: k for k, index in enumerate(used)}
        plan = [(at[index], axes, [at[o] for o in others]) for index, axes, others in members]
        results.append(delayed(_results_and_faces)(per_face, plan, *[blocks[i] for i in used]))
    return results, face_blocks


def _face_counts(values, start, shape, value):
    """Voxels of one block (at ``start``) equal to ``value`` on each outer face of the volume (``shape``), in
    :func:`~gpu_pipeline.stages.threshold.face_counts_above`'s order (int64, 0 on the faces the block does
    not lie on)."""
    xp = get_array_module(values)
    counts = np.zeros(2 * values.ndim, np.int64)
    for axis in range(values.ndim):
        for side, (index, on_face) in enumerate(((0, start[axis] == 0),
                                                 (-1, start[axis] + values.shape[axis] == shape[axis]))):
            if on_face:
                counts[2 * axis + side] = int((xp.take(values, index, axis=axis) == value).sum())
    return counts


def _block_components(ids, values, start, shape, by_value, faces, border_value=None):
    """One block's own components ``ids`` (1..count): count, and per component its first global flat
    index, size and value; with ``faces``, (component, touching component, shared faces) inside the block
    over faces between different values; with ``border_value``, its voxels of that value on each of the
    volume's outer faces (:func:`_face_counts`)."""
    xp = get_array_module(ids)
    # Ids are 1..count, each present: one pass gives each one's value, size and first voxel in the block's
    # (= the volume's) C order.
    value, size, first = piece_stats(ids, values if by_value else ids, return_first=True)
    count = int(size.size) - 1
    out = {"count": np.int64(count)}
    if count:
        local = xp.unravel_index(first[1:], ids.shape)
        out["first"] = xp.ravel_multi_index(tuple(c + int(s) for c, s in zip(local, start)), shape).astype(xp.int64)
        out["size"] = size[1:]
        out["value"] = value[1:] if by_value else xp.ones(count, dtype=xp.int64)
    else:
        out.update(first=xp.zeros(0, xp.int64), size=xp.zeros(0, xp.int64), value=xp.zeros(0, xp.int64))
    if faces:
        out["faces"] = face_pairs_between_labels(ids, values, other=ids) if count else tuple(
            xp.zeros(0, xp.int64) for _ in range(3))
    if border_value is not None:
        out["border"] = _face_counts(values, start, shape, border_value)
    return {key: (tuple(to_host(a) for a in value) if isinstance(value, tuple) else to_host(value))
            for key, value in out.items()}


def _face_components(low, high, low_values, high_values, axis, by_value, faces):
    """Across one chunk face: the (low id, high id) pairs to merge (equal values) and, with ``faces``, each
    side's (component, the other side's component, faces) where the values differ."""
    xp = get_array_module(low)
    a, b, va, vb = low.ravel(), high.ravel(), low_values.ravel(), high_values.ravel()
    both = (a > 0) & (b > 0)
    same = both & (va == vb) if by_value else both
    out = {"pairs": to_host(xp.stack(count_pairs(a[same], b[same])[:2], axis=1)) if bool(same.any())
           else np.zeros((0, 2), dtype=np.int64)}
    if faces:
        touch = both & (va != vb)
        low, high = a[touch].astype(xp.int64), b[touch].astype(xp.int64)
        out["low"] = tuple(to_host(v) for v in count_pairs(low, high))
        out["high"] = tuple(to_host(v) for v in count_pairs(high, low))
    return out


@dataclass
class Components:
    """Face-connected components of a chunked array, numbered 1..n by first voxel in C order.

    ``labels``: lazy Dask array (int32; int64 past 2^31 - 1 ids); ``value``
    and ``size`` (int64, index = id, 0 = background): each component's value
    (1 for a mask) and voxel count; ``piece_pairs``: (component, touching
    component, shared faces) over faces between different non-zero values,
    both directions, as ``face_pairs_between_labels(components, array,
    other=components)`` of the whole array (with ``faces=True``);
    ``border_counts``: the array's voxels equal to ``border_value`` on each
    of its outer faces (with ``border_value``; int64, in
    :func:`~gpu_pipeline.stages.threshold.face_counts_above`'s order).
    """

    labels: object
    n: int
    value: np.ndarray
    size: np.ndarray
    piece_pairs: tuple | None = None
    local: object = None      # each block's own ids (the staged store when there is one)
    offsets: np.ndarray = None
    lookup: np.ndarray = None

    counts: np.ndarray = None
    border_counts: np.ndarray | None = None

    def of_value(self, value):
        """The components of one ``value`` alone, numbered 1..m in the same first-voxel order: the components
        of the mask ``array == value`` (as :func:`components_chunked` of that mask gives them), read through
        the same per-block ids and tables without another pass."""
        keep = self.value == value
        keep[0] = False
        renumber = np.where(keep, np.cumsum(keep), 0)
        n = int(keep.sum())
        dtype = id_dtype(n)
        size = np.zeros(n + 1, dtype=np.int64)
        size[1:] = self.size[keep]
        found = Components(labels=None, n=n, value=(np.arange(n + 1) > 0).astype(np.int64), size=size,
                           local=self.local, offsets=self.offsets, lookup=renumber[self.lookup], counts=self.counts)
        found.labels = found.through(np.arange(n + 1, dtype=dtype), dtype)
        return found

    def through(self, table, dtype):
        """``table[labels]`` (lazy), block by block through the local ids: one small table per block."""
        return _through_tables(self.local, self.offsets, self.counts, self.lookup, table, dtype)


def id_dtype(largest):
    """int32 for ids up to 2^31 - 1, else int64: the staged label arrays take half the bytes in every real case."""
    return np.dtype(np.int32) if int(largest) <= np.iinfo(np.int32).max else np.dtype(np.int64)


def _apply_table(block, table):
    # take, not table[block]: the same values, 0.5-1.5 ms less for a 128^3 int32 block (2.1-3.4 ms against
    # 3.6-4.8 ms, one core, 2026-12-06; from 256^3 up the two were within this VM's noise).
    return get_array_module(block).take(ops_for(block).device_table(table), block)


def _through_tables(local, offsets, counts, lookup, table, dtype):
    """``table[lookup[offset + local]]`` per block (0 stays 0), each task given only its block's table.

    One graph layer of one task per block, written out directly: building it
    costs a table slice per block in the client, which is serial time between
    passes (a ``from_delayed`` per block and ``dask.array.block`` cost more
    than the tasks they describe on small blocks, and grow with the blocks).
    """
    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    name = f"apply-table-{tokenize(local.name, offsets, counts, lookup, table, np.dtype(dtype).str)}"
    layer = {}
    for index in np.ndindex(*local.numblocks):
        offset, count = int(offsets[index]), int(counts[index])
        block_table = np.zeros(count + 1, dtype=dtype)
        block_table[1:] = table[lookup[offset + 1:offset + count + 1]]
        layer[(name, *index)] = (_apply_table, (local.name, *index), block_table)
    graph = HighLevelGraph.from_collections(name, layer, dependencies=[local])
    return da.Array(graph, name, chunks=local.chunks, dtype=dtype, meta=local._meta.astype(dtype))


def components_chunked(values, *, by_value=False, faces=False, workspace=None, name=None, device=None,
                       verbose=False, border_value=None):
    """Face-connected components of a chunked mask (or of equal values, ``by_value``): a :class:`Components`.

    One pass: each task labels its block, stages the block's own ids in
    ``workspace`` as ``name`` (when both are given) and returns small
    summaries (per component: first voxel, size, value; with ``faces``, the
    faces between different values) and its boundary slabs; one task per
    run of blocks (:func:`summarize_blocks`) merges the slabs across their
    faces. Ids are merged on a small sparse graph and
    numbered by first voxel, as ``scipy.ndimage.label`` (or
    ``skimage.measure.label(labels, connectivity=1)``) numbers them: byte-identical.
    ``border_value``: the same tasks also count the voxels of that value on
    the array's outer faces (:attr:`Components.border_counts`).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from gpu_pipeline.chunked.workspace import Workspace

    workspace = workspace if workspace is not None else Workspace(None)
    local, restage = workspace.stage_in_pass(name, values, functools.partial(_local_labels, by_value=by_value),
                                             dtype=np.int32, device=device)
    per_block = functools.partial(_block_components, by_value=by_value, faces=faces, border_value=border_value)
    per_face = functools.partial(_face_components, by_value=by_value, faces=faces)
    tasks, face_blocks = summarize_blocks(local, values, per_block=per_block, per_face=per_face)
    results = [block for group in run_tasks(tasks, name or "connected components", verbose=verbose,
                                            voxels=int(np.prod(values.shape))) for block in group]
    stats = [stat for stat, _ in results]
    across = [face for _, faces_of_task in results for face in faces_of_task]
    face_blocks = [pair for pairs_of_task in face_blocks for pair in pairs_of_task]
    local = restage()  # later passes read the staged ids (when staged) instead of labelling again
    numblocks = values.numblocks
    counts = np.array([s["count"] for s in stats], dtype=np.int64)
    offsets = np.cumsum(counts) - counts
    total = int(counts.sum())
    linear = {index: k for k, index in enumerate(np.ndindex(*numblocks))}
    root = np.arange(total + 1, dtype=np.int64)
    pairs = [np.stack([f["pairs"][:, 0] + offsets[linear[lo]], f["pairs"][:, 1] + offsets[linear[hi]]], axis=1)
             for f, (lo, hi) in zip(across, face_blocks) if len(f["pairs"])]
    if pairs:
        pairs = np.concatenate(pairs).astype(np.int64)
        nodes, inverse = np.unique(pairs.ravel(), return_inverse=True)
        inverse = inverse.reshape(-1, 2)
        graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (inverse[:, 0], inverse[:, 1])),
                           shape=(len(nodes), len(nodes)))
        _, component = connected_components(graph, directed=False)
        smallest = np.full(component.max() + 1, np.iinfo(np.int64).max)
        np.minimum.at(smallest, component, nodes)
        root[nodes] = smallest[component]
    # First voxel per merged component, then ids 1..n in that order.
    ids = np.concatenate([offsets[k] + 1 + np.arange(c, dtype=np.int64) for k, c in enumerate(counts)]) \
        if total else np.zeros(0, np.int64)
    first_flat = np.full(total + 1, np.iinfo(np.int64).max)
    if total:
        np.minimum.at(first_flat, root[ids], np.concatenate([s["first"] for s in stats]))
    present = np.flatnonzero(first_flat < np.iinfo(np.int64).max)
    n = len(present)
    dtype = id_dtype(n)
    final = np.zeros(total + 1, dtype=dtype)
    final[present[np.argsort(first_flat[present], kind="stable")]] = np.arange(1, n + 1, dtype=dtype)
    lookup = final[root]
    size = np.zeros(n + 1, dtype=np.int64)
    value = np.zeros(n + 1, dtype=np.int64)
    if total:
        np.add.at(size, lookup[ids], np.concatenate([s["size"] for s in stats]))
        value[lookup[ids]] = np.concatenate([s["value"] for s in stats])
    piece_pairs = None
    if faces:
        parts = [(lookup[offsets[k] + s["faces"][0]], lookup[offsets[k] + s["faces"][1]], s["faces"][2])
                 for k, s in enumerate(stats)]
        for f, (lo, hi) in zip(across, face_blocks):
            for side, (mine, theirs) in (("low", (lo, hi)), ("high", (hi, lo))):
                a, b, c = f[side]
                parts.append((lookup[offsets[linear[mine]] + a], lookup[offsets[linear[theirs]] + b], c))
        piece_pairs = count_pairs(*(np.concatenate([p[i] for p in parts]).astype(np.int64) for i in range(3)))
    found = Components(labels=local, n=n, value=value, size=size, piece_pairs=piece_pairs, local=local,
                       offsets=offsets.reshape(numblocks), lookup=lookup, counts=counts.reshape(numblocks),
                       border_counts=None if border_value is None else np.sum([s["border"] for s in stats], axis=0))
    if total:
        found.labels = found.through(np.arange(n + 1, dtype=dtype), dtype)
    return found


def label_chunked(mask, *, by_value=False, workspace=None, name=None, device=None):
    """Face-connected components of a chunked boolean Dask array: ``(lazy labels, count)``.

    The labels (int32; int64 past 2^31 - 1) equal
    ``scipy.ndimage.label(mask.compute())[0]`` byte for byte; with
    ``by_value``, ``mask`` is a label image and the components are the
    face-connected pieces of equal non-zero value, numbered the same way
    (``skimage.measure.label(labels, connectivity=1)``). The passes run on
    the active Dask scheduler (threads by default, or a distributed client).
    ``workspace`` and ``name``: each block is labelled once and its own ids
    staged there as ``name`` (see :func:`components_chunked`).
    """
    found = components_chunked(mask, by_value=by_value, workspace=workspace, name=name, device=device)
    return found.labels, found.n
