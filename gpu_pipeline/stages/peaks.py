"""Peaks of the distance map: the particle centres.

Found entirely with array operations on the device (a maximum filter, a
compare, a nonzero, then sorting and searching among the candidates), never
with a host KD-tree.
"""
from __future__ import annotations

import itertools
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
    exclude_border=False)`` (Chebyshev distance), ties included, computed on
    the device: one maximum filter, then :func:`space_candidates` on the
    (few) candidates, never a host KD-tree.

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
    candidates = local_maxima(values, half_widths=half_widths, min_value=min_value)
    keep = space_candidates(candidates, half_widths)
    return candidates[keep]


def local_maxima(values, *, half_widths, min_value=0, core=None):
    """Coordinates (C order, int64) of voxels equal to the maximum of their ``2*h+1`` box and above ``min_value``.

    ``core`` (a tuple of slices) restricts the result to that part of
    ``values`` (the rest is the halo of a chunk); coordinates stay relative
    to ``values``.
    """
    xp = get_array_module(values)
    size = tuple(2 * h + 1 for h in half_widths)
    is_max = (values == ops_for(values).maximum_filter(values, size)) & (values > min_value)
    if core is not None:
        inside = xp.zeros(values.shape, dtype=bool)
        inside[core] = True
        is_max &= inside
    return xp.stack(xp.nonzero(is_max), axis=1).astype(xp.int64)


def space_candidates(coords, half_widths):
    """Which candidates (sorted in C order) survive the greedy spacing of :func:`find_peaks`.

    Two candidates interact when they lie within ``h - 1`` voxels of each
    other on every axis (scikit-image's ``ensure_spaced``: those exactly ``h``
    apart both stay). Rounds, all candidates at once: a live candidate with
    no live neighbour before it in C order is kept; live candidates next to
    a kept one are dropped. Neighbour pairs come from a grid of cells ``h - 1``
    wide (sort and search), so the work scales with the candidates, not the
    volume, and the result depends only on the candidate set (which is what
    lets a chunked run reproduce it exactly).

    Returns a boolean array over ``coords``.
    """
    xp = get_array_module(coords)
    n, ndim = coords.shape
    if n == 0:
        return xp.zeros(0, dtype=bool)
    reach = [max(0, int(h) - 1) for h in half_widths]
    cell = xp.asarray([max(1, r) for r in reach], dtype=xp.int64)
    cells = coords // cell
    extent = cells.max(axis=0) + 1
    strides = xp.concatenate([xp.cumprod(extent[::-1])[::-1][1:], xp.ones(1, dtype=xp.int64)])
    keys = (cells * strides).sum(axis=1)
    order = xp.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    first_i, first_j = [], []
    for offset in itertools.product(*[(-1, 0, 1) if r else (0,) for r in reach]):
        neighbour = cells + xp.asarray(offset, dtype=xp.int64)
        valid = ((neighbour >= 0) & (neighbour < extent)).all(axis=1)
        nk = (neighbour * strides).sum(axis=1)
        low = xp.searchsorted(sorted_keys, nk, side="left")
        count = xp.where(valid, xp.searchsorted(sorted_keys, nk, side="right") - low, 0)
        total = int(count.sum())
        if total == 0:
            continue
        ends = xp.cumsum(count)
        src = xp.searchsorted(ends, xp.arange(total, dtype=xp.int64), side="right")
        dst = order[low[src] + xp.arange(total, dtype=xp.int64) - (ends - count)[src]]
        near = (xp.abs(coords[src] - coords[dst]) <= xp.asarray(reach, dtype=xp.int64)).all(axis=1) & (src != dst)
        first_i.append(src[near])
        first_j.append(dst[near])
    i = xp.concatenate(first_i) if first_i else xp.zeros(0, dtype=xp.int64)
    j = xp.concatenate(first_j) if first_j else xp.zeros(0, dtype=xp.int64)
    alive = xp.ones(n, dtype=bool)
    kept = xp.zeros(n, dtype=bool)
    while bool(alive.any()):
        live = alive[i] & alive[j]
        beaten = xp.zeros(n, dtype=bool)
        beaten[i[live & (j < i)]] = True  # a live neighbour comes first in C order
        winners = alive & ~beaten
        kept |= winners
        covered = winners.copy()
        covered[i[live & winners[j]]] = True
        alive &= ~covered
    return kept
