"""Peaks of the distance map: the particle centres.

Found entirely with array operations on the device (two maximum filters, a
compare, a nonzero), never with a host KD-tree.
"""
from __future__ import annotations

import math

from gpu_pipeline._backend import get_array_module, ops_for

#: Distances are compared on a grid of min(spacing)/QUANTUM_DIVISOR, so that
#: float rounding differences between backends cannot flip a tie.
QUANTUM_DIVISOR = 256


def window_half_widths(min_distance, spacing):
    """Half-width of the peak window per axis, in voxels: floor(min_distance / spacing)."""
    return tuple(max(0, int(math.floor(float(min_distance) / float(s) + 1e-9))) for s in spacing)


def quantize_distance(distance, spacing):
    """Distance map as int32 multiples of ``min(spacing) / QUANTUM_DIVISOR``."""
    xp = get_array_module(distance)
    quantum = min(float(s) for s in spacing) / QUANTUM_DIVISOR
    return xp.rint(distance.astype(xp.float64) / quantum).astype(xp.int32), quantum


def find_peaks(values, *, half_widths, min_value=0):
    """Local maxima of ``values`` separated by more than ``half_widths`` voxels per axis.

    A voxel is a peak when it equals the maximum of the box of ``2*h+1``
    voxels around it and exceeds ``min_value``. Among equal maxima within one
    box, the first in C order is kept and the others closer than ``h`` to it
    are dropped; a dropped one suppresses nothing, so along a ridge of equal
    values peaks are kept every ``h`` voxels. This is the greedy spacing of
    ``skimage.feature.peak_local_max(values, min_distance=h,
    exclude_border=False)`` (Chebyshev distance), ties included, computed in
    parallel rounds instead of a host KD-tree: each round keeps the live
    candidates that come first in their box and removes the candidates in the
    boxes of those kept.

    Parameters
    ----------
    values : ndarray (NumPy or CuPy), integer or float
    half_widths : tuple of int
        Window half-width per axis, in voxels.
    min_value : scalar
        Peaks must be strictly greater.

    Returns
    -------
    coords : ndarray, shape (n_peaks, ndim), int64
        Peak coordinates sorted in C order, on the input's device.
    """
    xp = get_array_module(values)
    ops = ops_for(values)
    size = tuple(2 * h + 1 for h in half_widths)
    is_max = (values == ops.maximum_filter(values, size)) & (values > min_value)
    flat = xp.flatnonzero(is_max.ravel())
    if flat.size == 0:
        return xp.zeros((0, values.ndim), dtype=xp.int64)
    # Spacing as scikit-image's ensure_spaced: candidates closer than h (Chebyshev) to a
    # kept one are dropped; those exactly h away stay.
    spacing_box = tuple(max(1, 2 * h - 1) for h in half_widths)
    index_dtype = xp.int32 if values.size < 2**31 - 1 else xp.int64
    key = xp.full(values.shape, -1, dtype=index_dtype)
    kept_mark = xp.zeros(values.shape, dtype=xp.uint8)
    alive, kept = flat, []
    while alive.size:
        key.fill(-1)
        key.ravel()[alive] = (values.size - 1 - alive).astype(index_dtype)
        first = ops.maximum_filter(key, spacing_box).ravel()[alive] == key.ravel()[alive]
        winners = alive[first]
        kept.append(winners)
        kept_mark.fill(0)
        kept_mark.ravel()[winners] = 1
        covered = ops.maximum_filter(kept_mark, spacing_box).ravel()[alive] > 0
        alive = alive[~covered]
    flat = xp.sort(xp.concatenate(kept))
    return xp.stack(xp.unravel_index(flat, values.shape), axis=1).astype(xp.int64)
