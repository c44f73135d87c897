"""Connected components of a chunked mask, equal to the in-memory labelling for any chunking.

1. Each chunk is labelled on its own (NumPy or CuPy, face connectivity);
   ids are offset by the running count of earlier chunks.
2. On every face between two chunks, the pairs of ids that touch are
   collected (a few thousand per face) and merged with a sparse
   connected-components step on that small graph; no Python object per
   voxel and no task per label, so it scales with the number of labels,
   not the number of chunks times labels.
3. Ids are renumbered by each component's first voxel in C order (the
   per-chunk minimum flat index, reduced), which is also how
   ``scipy.ndimage.label`` numbers them: the result is byte-identical to it.
"""
from __future__ import annotations

import itertools

import numpy as np

from gpu_pipeline._backend import get_array_module, ops_for, to_host
from gpu_pipeline.chunked.workspace import chunk_starts


#: Ids spanning at most this many times the array's length (plus a little) are counted, not sorted.
DENSE_ID_SPAN = 4


def unique_ids(values, *, return_index=False, return_inverse=False, return_counts=False):
    """``np.unique`` of a 1-D integer array (sorted ids; first index, inverse, counts on request).

    Where the ids span at most ``DENSE_ID_SPAN`` times the array's length, as
    the ids of one block of a chunked label image nearly always do (they are
    numbered block by block), they are counted with ``bincount`` instead of
    sorting every voxel; the result is the same arrays as ``np.unique``.
    """
    xp = get_array_module(values)
    wanted = (return_index, return_inverse, return_counts)
    lo = int(values.min()) if values.size else 0
    span = int(values.max()) - lo + 1 if values.size else 0
    if values.size == 0 or span > DENSE_ID_SPAN * values.size + 1024:
        return xp.unique(values, return_index=return_index, return_inverse=return_inverse,
                         return_counts=return_counts)
    shifted = values.astype(xp.int64) - lo
    counts = xp.bincount(shifted, minlength=span)
    present = xp.flatnonzero(counts)
    out = [(present + lo).astype(values.dtype)]
    if return_index:
        first = xp.full(span, values.size, dtype=xp.int64)
        ops_for(values).scatter_min(first, shifted, xp.arange(values.size, dtype=xp.int64))
        out.append(first[present])
    if return_inverse:
        out.append((xp.cumsum(counts > 0) - 1)[shifted])
    if return_counts:
        out.append(counts[present])
    return out[0] if not any(wanted) else tuple(out)


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


def _count_block(local):
    count = int(local.max()) if local.size else 0
    return np.array([count], dtype=np.int64).reshape((1,) * local.ndim)


def _offset_block(local, offsets, block_info=None):
    """A block's local ids shifted to global ones (int64), background kept 0."""
    xp = get_array_module(local)
    offset = int(offsets[tuple(block_info[0]["chunk-location"])])
    out = local.astype(xp.int64)
    if offset:
        out[local > 0] += offset
    return out


def _lookup_block(local, offsets, counts, lookup, block_info=None):
    """``lookup[global id]`` of a block's local ids through the block's slice of the table (0 stays 0)."""
    xp = get_array_module(local)
    index = tuple(block_info[0]["chunk-location"])
    offset, count = int(offsets[index]), int(counts[index])
    table = np.empty(count + 1, dtype=lookup.dtype)
    table[0] = 0
    table[1:] = lookup[offset + 1:offset + count + 1]
    return xp.asarray(table)[local]


def _first_voxels(block, start, shape):
    """(label, first global flat index) for each label in a block, as a (2, n) int64 NumPy array.

    The volume's C order restricted to a block is the block's own C order,
    so each label's first voxel in the block is its first occurrence there.
    """
    xp = get_array_module(block)
    flat = xp.flatnonzero(block.ravel())
    if flat.size == 0:
        return np.zeros((2, 0), dtype=np.int64)
    values, first = unique_ids(block.ravel()[flat], return_index=True)
    local = xp.unravel_index(flat[first], block.shape)
    global_flat = xp.ravel_multi_index(tuple(c + int(s) for c, s in zip(local, start)), shape)
    return to_host(xp.stack([values.astype(xp.int64), global_flat.astype(xp.int64)]))


def _touching_pairs(low, high, low_values, high_values):
    """Unique (a, b) id pairs facing each other across one chunk face, with equal values (NumPy)."""
    xp = get_array_module(low)
    a, b = low.ravel(), high.ravel()
    keep = (a > 0) & (b > 0) & (low_values.ravel() == high_values.ravel())
    if not bool(keep.any()):
        return np.zeros((0, 2), dtype=np.int64)
    return to_host(xp.unique(xp.stack([a[keep], b[keep]], axis=1), axis=0))


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


def _across_face(low_summary, high_summary, axis, per_face):
    """``per_face`` of the slabs facing each other: the low block's last layer, the high block's first."""
    (a, va), (b, vb) = low_summary[1][axis][1], high_summary[1][axis][0]
    return per_face(a, b, va, vb, axis)


def summarize_blocks(ids, values, *, per_block=None, per_face=None):
    """Delayed per-block and per-chunk-face results over two aligned chunked arrays.

    One task per block computes ``per_block(ids_block, values_block, start,
    shape)`` and keeps only the block's boundary slabs; one task per internal
    face calls ``per_face(low_slab_ids, high_slab_ids, low_slab_values,
    high_slab_values, axis)`` on the two slabs that face each other. No task
    holds a whole block for later, so memory stays at a few blocks in flight
    plus slabs, whatever the number of chunks.

    Returns ``(block_results, face_results)``, lists of delayed objects.
    """
    import operator

    from dask import delayed

    starts = chunk_starts(ids.chunks)
    id_blocks, value_blocks = ids.to_delayed(), values.to_delayed()
    summaries = {}
    for index in itertools.product(*[range(n) for n in ids.numblocks]):
        start = [int(starts[a][i]) for a, i in enumerate(index)]
        summaries[index] = delayed(_summary)(id_blocks[index], value_blocks[index], start, ids.shape, per_block)
    block_results = [delayed(operator.getitem)(summary, 0) for summary in summaries.values()]
    face_results = []
    for axis in range(ids.ndim):
        for index, summary in summaries.items():
            if index[axis] + 1 < ids.numblocks[axis]:
                other = tuple(i + (a == axis) for a, i in enumerate(index))
                face_results.append(delayed(_across_face)(summary, summaries[other], axis, per_face))
    return block_results, face_results


def _first_voxels_of(ids, values, start, shape):
    return _first_voxels(ids, start, shape)


def _pairs_of(a, b, va, vb, axis):
    return _touching_pairs(a, b, va, vb)


def label_chunked(mask, *, by_value=False, compute_kwargs=None, workspace=None, name=None, device=None):
    """Face-connected components of a chunked boolean Dask array.

    Returns a lazy Dask array of int32 (int64 past 2^31 - 1 labels) equal to
    ``scipy.ndimage.label(mask.compute())[0]`` byte for byte, and the count.
    With ``by_value``, ``mask`` is a label image and the components are the
    face-connected pieces of equal non-zero value, numbered the same way
    (``skimage.measure.label(labels, connectivity=1)``).
    The computation of the merge graph runs on the active Dask scheduler
    (threads by default, or a distributed client).

    ``workspace`` and ``name``: each block is labelled once and its local
    labels staged there as ``name`` (every later pass reads them, moved to
    the GPU with ``device='gpu'``); without a workspace folder every pass
    labels the blocks again.
    """
    import dask
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    compute_kwargs = compute_kwargs or {}
    build = (lambda: mask.map_blocks(_local_labels, by_value, dtype=np.int32))
    if workspace is not None and name is not None:
        local = workspace.stage(name, build, chunks=mask.chunks, shape=mask.shape, dtype=np.int32, device=device)
    else:
        local = build()
    counts = local.map_blocks(_count_block, dtype=np.int64, chunks=tuple((1,) * n for n in mask.numblocks))
    counts = to_host(np.asarray(counts.compute(**compute_kwargs))).reshape(mask.numblocks)
    offsets = (np.cumsum(counts.ravel()) - counts.ravel()).reshape(counts.shape)
    total = int(counts.sum())
    labels = local.map_blocks(_offset_block, offsets, dtype=np.int64)
    if total == 0:
        return local, 0  # all zeros

    # Pairs across every internal chunk face, merged on a small sparse graph.
    first_tasks, pair_tasks = summarize_blocks(labels, mask, per_block=_first_voxels_of, per_face=_pairs_of)
    pair_lists, first_lists = dask.compute(pair_tasks, first_tasks, **compute_kwargs)
    pair_lists = [p for p in pair_lists if len(p)]
    pairs = np.concatenate(pair_lists, axis=0) if pair_lists else np.zeros((0, 2), np.int64)
    root = np.arange(total + 1, dtype=np.int64)
    if len(pairs):
        nodes, inverse = np.unique(pairs.ravel(), return_inverse=True)
        inverse = inverse.reshape(-1, 2)
        graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (inverse[:, 0], inverse[:, 1])),
                           shape=(len(nodes), len(nodes)))
        _, component = connected_components(graph, directed=False)
        smallest = np.full(component.max() + 1, np.iinfo(np.int64).max)
        np.minimum.at(smallest, component, nodes)
        root[nodes] = smallest[component]
    # First voxel per merged component, then ids 1..n in that order.
    firsts = np.concatenate([f for f in first_lists if f.size], axis=1)
    first_flat = np.full(total + 1, np.iinfo(np.int64).max)
    np.minimum.at(first_flat, root[firsts[0]], firsts[1])
    present = np.flatnonzero(first_flat < np.iinfo(np.int64).max)
    n = len(present)
    order = np.argsort(first_flat[present], kind="stable")
    dtype = np.int32 if n < 2**31 - 1 else np.int64
    final = np.zeros(total + 1, dtype=dtype)
    final[present[order]] = np.arange(1, n + 1, dtype=dtype)
    lookup = final[root]
    return local.map_blocks(_lookup_block, offsets, counts, lookup, dtype=dtype), n
