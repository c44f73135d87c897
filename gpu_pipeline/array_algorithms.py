"""Exact algorithms written once against the array module (NumPy or CuPy), behind GPU primitives.

`ops_cuda.py` uses them where no CUDA library routine fits (cuCIM's and
cupyx's PBA+ distance transform pads a non-cubic volume to a cube and returns
finite distances when there is no background; labelling equal-value pieces
of a label image by pairs of face neighbours took 80-100 bytes per voxel).
CI runs them on NumPy against SciPy and scikit-image. This module imports
only the leaf `_common`, never the stages.
"""
from __future__ import annotations

import numpy as np

from gpu_pipeline._common import get_array_module


def neighbour_slices(ndim, axis, step=1):
    """Index tuples (low, high) selecting every voxel and its neighbour ``step`` voxels further along ``axis``."""
    low = [slice(None)] * ndim
    high = [slice(None)] * ndim
    low[axis], high[axis] = slice(None, -step), slice(step, None)
    return tuple(low), tuple(high)


# --- exact Euclidean distance transform ---------------------------------------------------------------------


def distance_transform_edt(mask, spacing, *, max_distance=None):
    """Exact Euclidean distance of every foreground voxel to the nearest background voxel, physical units, float32.

    The same values as ``scipy.ndimage.distance_transform_edt(mask,
    sampling=spacing)`` (to float32 rounding) for any shape, with one
    difference: a mask without any background voxel gives ``inf`` everywhere
    (SciPy measures to a point outside the array; declump caps ``inf``).

    Separable, one axis after the other, each step a whole-array operation
    (no per-line loop, no padding):

    1. axis 0: distance in voxels to the nearest background voxel of the
       same line, by doubling (pass ``k`` adds offsets ``2**k``; log2(n) passes);
    2. every further axis: ``f(i) = min_j g(j) + (s (i - j))**2`` over the
       offsets ``|i - j| = 1, 2, ...``, stopped as soon as ``(s k)**2``
       exceeds every value that a farther ``j`` could still lower, so the
       passes number about the largest partial distance in voxels.

    Parameters
    ----------
    mask : ndarray of bool, 2D or 3D (NumPy or CuPy)
        Foreground True.
    spacing : sequence of float
        Voxel size per axis.
    max_distance : float, optional
        Values below it are exact; values at or above it are only
        guaranteed to be at least ``max_distance`` (the caller caps them).
        Bounds the passes (a chunk's halo is this deep).

    Returns
    -------
    distance : ndarray of float32, on the input's device

    Notes
    -----
    Memory: the mask plus three float32 arrays of its shape (12 bytes per
    voxel); work: about ``log2(n) + sum over axes of (largest partial
    distance / spacing)`` passes over the array.
    """
    xp = get_array_module(mask)
    mask = mask.astype(bool, copy=False)
    spacing = [float(s) for s in spacing]
    if not bool((~mask).any()):
        return xp.full(mask.shape, xp.inf, dtype=xp.float32)
    cap2 = None if max_distance is None else float(max_distance) ** 2
    squared = _line_distance_squared(mask, spacing[0], cap2, xp)
    for axis in range(1, mask.ndim):
        squared = _lower_envelope(squared, axis, spacing[axis] ** 2, cap2, xp)
    return xp.sqrt(squared, out=squared)


def _line_distance_squared(mask, step_size, cap2, xp):
    """Squared physical distance to the nearest background voxel along axis 0 (inf where the line has none)."""
    n = mask.shape[0]
    far = n + 1  # beyond any in-line distance: no background reached yet
    steps = xp.where(mask, far, 0).astype(xp.int32)
    step = 1
    while step < n and (cap2 is None or (step * step_size) ** 2 <= cap2):
        lo, hi = neighbour_slices(mask.ndim, 0, step)
        xp.minimum(steps[lo], steps[hi] + step, out=steps[lo])
        xp.minimum(steps[hi], steps[lo] + step, out=steps[hi])
        step *= 2
    squared = steps.astype(xp.float32)
    squared *= xp.float32(step_size)
    squared *= squared
    squared[steps >= far] = xp.inf
    return squared


def _lower_envelope(partial, axis, weight, cap2, xp):
    """``min_j partial[.., j, ..] + weight (i - j)**2`` along ``axis`` by growing offsets (see above)."""
    n = partial.shape[axis]
    result = partial.copy()
    shifted = xp.empty_like(partial)
    # Lines along `axis` with no finite value stay inf; elsewhere an inf voxel still waits for one.
    has_finite = xp.isfinite(partial).any(axis=axis)
    next_check = 1
    for k in range(1, n):
        offset_cost = weight * k * k
        if cap2 is not None and offset_cost > cap2:
            break
        cost = xp.float32(offset_cost)
        lo, hi = neighbour_slices(partial.ndim, axis, k)
        xp.add(partial[hi], cost, out=shifted[lo])
        xp.minimum(result[lo], shifted[lo], out=result[lo])
        xp.add(partial[lo], cost, out=shifted[hi])
        xp.minimum(result[hi], shifted[hi], out=result[hi])
        if k == next_check:  # a farther j can only help a voxel whose value exceeds weight (k + 1)**2
            next_check *= 2
            worst = float(xp.where(has_finite, result.max(axis=axis), 0).max())
            if weight * (k + 1) ** 2 > worst:
                break
    return result


# --- local maxima ------------------------------------------------------------------------------------------


def box_maxima(values, maxed, min_value, half_widths, core=None):
    """The two candidate sets of a local-maximum search from a box maximum filter, as coordinates.

    ``maxed``: ``values`` through a box maximum filter of ``2*h+1`` voxels
    per axis (edges replicated). Returns ``(maxima, maybe)``, (n, ndim)
    int64 in C order, both within ``core`` (a tuple of slices; default all):
    ``maxima``, the voxels above ``min_value`` equal to their box maximum;
    ``maybe``, the other voxels above ``min_value`` at least as high as each
    face neighbour along the axes where ``h`` >= 1 (edges replicated: a
    missing neighbour is no constraint), the only ones a smaller window
    inside the box can still keep.
    """
    xp = get_array_module(values)
    above = values > min_value
    is_max = (values == maxed) & above
    rejected = above & ~is_max
    for axis, h in enumerate(half_widths):
        if h < 1 or values.shape[axis] < 2:
            continue
        low, high = neighbour_slices(values.ndim, axis)
        rejected[low] &= values[low] >= values[high]
        rejected[high] &= values[high] >= values[low]
    if core is not None:
        inside = xp.zeros(values.shape, dtype=bool)
        inside[core] = True
        is_max &= inside
        rejected &= inside
    return (xp.stack(xp.nonzero(is_max), axis=1).astype(xp.int64),
            xp.stack(xp.nonzero(rejected), axis=1).astype(xp.int64))


# --- per-label sums -----------------------------------------------------------------------------------------


#: Ids spanning at most this many times the array's length (plus a little) are counted, not sorted.
DENSE_ID_SPAN = 4


def narrow_maximum_filter(array, size):
    """The maximum over a box of ``size`` voxels per axis, each 1 or 3 (edge values replicated): two shifted
    maxima per axis of size 3, SciPy's ``maximum_filter(array, size, mode="nearest")`` value for value."""
    xp = get_array_module(array)
    out = array.copy()
    for axis, width in enumerate(size):
        if width == 1 or array.shape[axis] < 2:
            continue
        here = out.copy()
        lower, upper = ([slice(None)] * array.ndim for _ in range(2))
        lower[axis], upper[axis] = slice(None, -1), slice(1, None)
        xp.maximum(out[tuple(upper)], here[tuple(lower)], out=out[tuple(upper)])
        xp.maximum(out[tuple(lower)], here[tuple(upper)], out=out[tuple(lower)])
    return out


def local_maxima(values, min_value, maximum_filter):
    """Voxels equal to the maximum of their 3x3(x3) box (edges replicated) and at least ``min_value``: a bool
    array. ``maximum_filter(array, size)``: the backend's box maximum."""
    return (values == maximum_filter(values, (3,) * values.ndim)) & (values >= min_value)


def unique_ids(values, *, return_inverse=False, return_counts=False):
    """``np.unique`` of a 1-D integer array (sorted ids; inverse, counts on request).

    Where the ids span at most ``DENSE_ID_SPAN`` times the array's length, as
    the ids of one block of a chunked label image nearly always do (they are
    numbered block by block), they are counted with ``bincount`` instead of
    sorting every voxel; the result is the same arrays as ``np.unique``.
    """
    xp = get_array_module(values)
    wanted = (return_inverse, return_counts)
    lo = int(values.min()) if values.size else 0
    span = int(values.max()) - lo + 1 if values.size else 0
    if values.size == 0 or span > DENSE_ID_SPAN * values.size + 1024:
        return xp.unique(values, return_inverse=return_inverse, return_counts=return_counts)
    shifted = values.astype(xp.int64) - lo
    counts = xp.bincount(shifted, minlength=span)
    present = xp.flatnonzero(counts)
    out = [(present + lo).astype(values.dtype)]
    if return_inverse:
        out.append((xp.cumsum(counts > 0) - 1)[shifted])
    if return_counts:
        out.append(counts[present])
    return out[0] if not any(wanted) else tuple(out)


def label_sums(labels, image, scatter_min, scatter_max):
    """Per-label sums of a label image, the particle table's reductions: a dict of arrays, one entry per id.

    ``label`` (the non-zero ids present, ascending, int64), ``count``
    (voxels, int64), ``sum`` (ndim, n) coordinate sums (float64, in the
    array's own index coordinates), ``low`` / ``high`` (ndim, n) smallest and
    largest coordinate (int64), ``intensity`` (summed ``image`` values,
    float64; None without an image). Sums accumulate in C order.
    ``scatter_min`` / ``scatter_max``: the backend's repeated-index reductions.
    """
    xp = get_array_module(labels)
    flat = xp.flatnonzero(labels.ravel())
    ids = labels.ravel()[flat].astype(xp.int64)
    present, inverse, counts = unique_ids(ids, return_inverse=True, return_counts=True)
    inverse = inverse.ravel()
    n = present.size
    coords = [c.astype(xp.int64) for c in xp.unravel_index(flat, labels.shape)]
    low = xp.full((labels.ndim, n), np.iinfo(np.int64).max, dtype=xp.int64)
    high = xp.full((labels.ndim, n), -1, dtype=xp.int64)
    for axis, c in enumerate(coords):
        scatter_min(low[axis], inverse, c)
        scatter_max(high[axis], inverse, c)
    sums = xp.stack([xp.bincount(inverse, weights=c.astype(xp.float64), minlength=n) for c in coords]) if n else \
        xp.zeros((labels.ndim, 0), dtype=xp.float64)
    intensity = None
    if image is not None:
        intensity = xp.bincount(inverse, weights=image.ravel()[flat].astype(xp.float64), minlength=n)
    return {"label": present.astype(xp.int64), "count": counts.astype(xp.int64), "sum": sums, "low": low,
            "high": high, "intensity": intensity}


# --- equal-value components ---------------------------------------------------------------------------------


def label_by_value_propagation(labels, scatter_min):
    """Face-connected pieces of equal non-zero value: ``skimage.measure.label(labels, connectivity=1)`` on the device.

    Every voxel holds a pointer (a flat index) to a voxel of its component,
    starting with itself. One sweep copies the smaller pointer between equal
    face neighbours along each axis; then, until no equal neighbours point
    differently, the larger of two differing roots is hooked onto the
    smaller (``scatter_min``, the backend's primitive, over the differing
    pairs only) and pointers jump to their roots. A component's root ends
    as its first voxel in C order, so ids 1..n follow that order, as in
    scikit-image. Nothing per pair of voxels is kept: about 14 bytes per voxel
    besides the input (int32 pointers below 2**31 voxels; NumPy, tracemalloc).

    Returns int32 labels (int64 from 2**31 components), 0 where ``labels`` is 0.
    """
    xp = get_array_module(labels)
    shape, size = labels.shape, labels.size
    index = xp.int32 if size < 2**31 - 1 else xp.int64
    parent = xp.arange(size, dtype=index)
    grid = parent.reshape(shape)
    for axis in range(labels.ndim):
        lo, hi = neighbour_slices(labels.ndim, axis)
        same = _equal_nonzero(labels, lo, hi)
        smaller = xp.minimum(grid[lo], grid[hi])
        xp.copyto(grid[lo], smaller, where=same)
        xp.copyto(grid[hi], smaller, where=same)
        del smaller, same
    parent = _jump_to_roots(parent, xp)
    while True:
        grid = parent.reshape(shape)
        hooked = False
        for axis in range(labels.ndim):
            lo, hi = neighbour_slices(labels.ndim, axis)
            differ = _equal_nonzero(labels, lo, hi)
            differ &= grid[lo] != grid[hi]
            if bool(differ.any()):
                a, b = grid[lo][differ], grid[hi][differ]
                scatter_min(parent, xp.maximum(a, b), xp.minimum(a, b))
                hooked = True
            del differ
        if not hooked:
            break
        parent = _jump_to_roots(parent, xp)
    root = parent == xp.arange(size, dtype=index)
    root &= labels.ravel() != 0
    ids = xp.cumsum(root, dtype=index)
    del root
    count = int(ids[-1]) if size else 0
    out = ids[parent].reshape(shape)
    del ids, parent
    out[labels == 0] = 0
    return out.astype(xp.int32 if count < 2**31 - 1 else xp.int64, copy=False)


def _equal_nonzero(labels, lo, hi):
    same = labels[lo] == labels[hi]
    same &= labels[lo] != 0
    return same


def _jump_to_roots(parent, xp):
    """Pointer jumping: every voxel points at its tree's root."""
    while True:
        grand = parent[parent]
        if bool((grand == parent).all()):
            return parent
        parent = grand
