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


def _chunk_starts(chunks):
    return [np.concatenate([[0], np.cumsum(c)[:-1]]).astype(np.int64) for c in chunks]


def _label_local(block, by_value):
    """Components of one block: (labels, count); equal-value components when ``by_value``."""
    ops = ops_for(block)
    if by_value:
        labels = ops.label_by_value(block)
        return labels, int(labels.max()) if labels.size else 0
    return ops.label(block)


def _count_block(block, by_value):
    _, count = _label_local(block, by_value)
    return np.array([count], dtype=np.int64).reshape((1,) * block.ndim)


def _label_block(block, offsets, by_value, block_info=None):
    index = tuple(block_info[0]["chunk-location"])
    xp = get_array_module(block)
    labels, _ = _label_local(block, by_value)
    labels = labels.astype(xp.int64)
    offset = int(offsets[index])
    return xp.where(labels > 0, labels + offset, 0)


def _first_voxels(block, start, shape):
    """(label, first global flat index) for each label in a block, as a (2, n) int64 NumPy array."""
    xp = get_array_module(block)
    flat = xp.flatnonzero(block.ravel())
    if flat.size == 0:
        return np.zeros((2, 0), dtype=np.int64)
    values = block.ravel()[flat]
    local = xp.unravel_index(flat, block.shape)
    global_flat = xp.ravel_multi_index(tuple(c + int(s) for c, s in zip(local, start)), shape)
    # Within a block C order of the block is not C order of the volume: reduce by min per label.
    order = xp.lexsort(xp.stack([global_flat, values]))
    values, global_flat = values[order], global_flat[order]
    first = xp.concatenate([xp.ones(1, dtype=bool), values[1:] != values[:-1]])
    return to_host(xp.stack([values[first], global_flat[first]]))


def _touching_pairs(low, high, low_values, high_values):
    """Unique (a, b) id pairs facing each other across one chunk face, with equal values (NumPy)."""
    xp = get_array_module(low)
    a, b = low.ravel(), high.ravel()
    keep = (a > 0) & (b > 0) & (low_values.ravel() == high_values.ravel())
    if not bool(keep.any()):
        return np.zeros((0, 2), dtype=np.int64)
    return to_host(xp.unique(xp.stack([a[keep], b[keep]], axis=1), axis=0))


def face_slabs(arrays):
    """For every internal chunk face: the delayed 1-voxel slabs of each array on both sides.

    Yields ``(low_blocks, high_blocks)``, lists holding one delayed block per
    array; only 2-voxel-thick slabs are ever read.
    """
    first = arrays[0]
    for axis in range(first.ndim):
        for position in _chunk_starts(first.chunks)[axis][1:]:
            index = [slice(None)] * first.ndim
            index[axis] = slice(int(position) - 1, int(position) + 1)
            per_array = [a[tuple(index)].to_delayed() for a in arrays]
            lows = [np.take(b, 0, axis=axis).ravel() for b in per_array]
            highs = [np.take(b, 1, axis=axis).ravel() for b in per_array]
            for i in range(lows[0].size):
                yield [lo[i] for lo in lows], [hi[i] for hi in highs]


def _face_tasks(labels, values):
    """Delayed pair lists for every internal chunk face."""
    from dask import delayed

    return [delayed(_touching_pairs)(low[0], high[0], low[1], high[1])
            for low, high in face_slabs([labels, values])]


def label_chunked(mask, *, by_value=False, compute_kwargs=None):
    """Face-connected components of a chunked boolean Dask array.

    Returns a lazy Dask array of int32 (int64 past 2^31 - 1 labels) equal to
    ``scipy.ndimage.label(mask.compute())[0]`` byte for byte, and the count.
    With ``by_value``, ``mask`` is a label image and the components are the
    face-connected pieces of equal non-zero value, numbered the same way
    (``skimage.measure.label(labels, connectivity=1)``).
    The computation of the merge graph runs on the active Dask scheduler
    (threads by default, or a distributed client).
    """
    import dask
    from dask import delayed
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    compute_kwargs = compute_kwargs or {}
    counts = mask.map_blocks(_count_block, by_value, dtype=np.int64, chunks=tuple((1,) * n for n in mask.numblocks))
    counts = to_host(np.asarray(counts.compute(**compute_kwargs)))
    offsets = (np.cumsum(counts.ravel()) - counts.ravel()).reshape(counts.shape)
    total = int(counts.sum())
    labels = mask.map_blocks(_label_block, offsets, by_value, dtype=np.int64)
    if total == 0:
        return labels.map_blocks(lambda b: b.astype(np.int32), dtype=np.int32), 0

    # Pairs across every internal chunk face, merged on a small sparse graph.
    starts = _chunk_starts(mask.chunks)
    blocks = labels.to_delayed()
    first_tasks = [delayed(_first_voxels)(blocks[idx], [starts[a][i] for a, i in enumerate(idx)], mask.shape)
                   for idx in itertools.product(*[range(n) for n in mask.numblocks])]
    pair_lists, first_lists = dask.compute(_face_tasks(labels, mask), first_tasks, **compute_kwargs)
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

    def apply(block):
        xp = get_array_module(block)
        return xp.asarray(lookup)[block]

    return labels.map_blocks(apply, dtype=dtype), n
