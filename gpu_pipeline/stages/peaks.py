"""Peaks of the distance map: the particle centres.

Found entirely with array operations on the device (a maximum filter, a
compare, a nonzero, then sorting and searching among the candidates), never
with a host KD-tree.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

from gpu_pipeline._backend import get_array_module, ops_for, to_host

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
    a kept one are dropped. Neighbour pairs come from :func:`_pairs_within`
    (sort and search), so the work scales with the candidates, not the
    volume, and the result depends only on the candidate set (which is what
    lets a chunked run reproduce it exactly).

    Returns a boolean array over ``coords``.
    """
    xp = get_array_module(coords)
    n = coords.shape[0]
    if n == 0:
        return xp.zeros(0, dtype=bool)
    i, j = _pairs_within(coords, [max(0, int(h) - 1) for h in half_widths])
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


def _pairs_within(coords, reach):
    """Index pairs (i, j), i != j, of candidates within ``reach`` voxels of each other on every axis (both orders)."""
    xp = get_array_module(coords)
    cell = xp.asarray([max(1, r) for r in reach], dtype=xp.int64)
    cells = coords // cell
    extent = cells.max(axis=0) + 1
    strides = xp.concatenate([xp.cumprod(extent[::-1])[::-1][1:], xp.ones(1, dtype=xp.int64)])
    keys = (cells * strides).sum(axis=1)
    order = xp.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    pairs_i, pairs_j = [], []
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
        pairs_i.append(src[near])
        pairs_j.append(dst[near])
    if not pairs_i:
        return xp.zeros(0, dtype=xp.int64), xp.zeros(0, dtype=xp.int64)
    return xp.concatenate(pairs_i), xp.concatenate(pairs_j)


def neck_groups(peaks, distance_q, regions, spacing, ratio):
    """Group peaks that belong to one particle: peaks joined by no neck narrower than ``ratio``.

    Two peaks of one region whose inscribed balls overlap (physical distance
    below the sum of their heights) are tested along the straight segment
    between them (one sample per voxel step, nearest voxel): when the
    distance map never drops below ``ratio`` times the higher peak there, no
    neck separates them and they join one group. ``ratio`` 1.0 joins only
    peaks of equal height on a flat ridge or plateau (a rod's axis, a capped
    plateau); lower ratios also join shallow necks (rods of varying width,
    the rim of a hollow particle) and a lower peak on the flank of a higher
    one that is at least ``ratio`` times as high. Two touching spheres of
    radius r whose centres are d apart have a neck of half-width
    sqrt(r^2 - d^2/4): ``ratio`` 0.7 joins them only when they overlap by
    more than about 30% of their diameter. Groups are the connected
    components of the joined pairs.

    Parameters
    ----------
    peaks : ndarray (n, ndim) int64, C order
    distance_q : ndarray of int32
        Quantised distance map (:func:`quantize_distance`).
    regions : ndarray of int
        Connected regions; peaks of different regions are never joined.
    spacing : tuple of float
    ratio : float in (0, 1]

    Returns
    -------
    group : ndarray (n,) int64, on the peaks' device
        The smallest peak index in each peak's group.
    """
    xp = get_array_module(peaks)
    heights = distance_q[tuple(peaks.T)]
    i, j = neck_pairs(peaks, heights, regions[tuple(peaks.T)], spacing)
    pair, points = segment_points(peaks, i, j)
    low = xp.full(i.size, np.iinfo(np.int64).max, dtype=xp.int64)
    ops_for(low).scatter_min(low, pair, distance_q[tuple(points.T)].astype(xp.int64))
    return groups_from_necks(peaks.shape[0], i, j, low, heights, ratio)


def neck_pairs(peaks, heights, region, spacing):
    """Pairs (i < j) of peaks of one region whose inscribed balls overlap: the pairs :func:`neck_groups` tests.

    ``heights``: quantised distances at the peaks; ``region``: each peak's region.
    """
    xp = get_array_module(peaks)
    if peaks.shape[0] < 2:
        return xp.zeros(0, dtype=xp.int64), xp.zeros(0, dtype=xp.int64)
    heights = xp.asarray(heights).astype(xp.int64)
    quantum = min(float(s) for s in spacing) / QUANTUM_DIVISOR
    reach = [int(math.ceil(2 * int(heights.max()) * quantum / float(s))) for s in spacing]
    i, j = _pairs_within(peaks, reach)
    scale = xp.asarray([float(s) / quantum for s in spacing], dtype=xp.float64)
    gap2 = (((peaks[i] - peaks[j]).astype(xp.float64) * scale) ** 2).sum(axis=1)
    test = (i < j) & (region[i] == region[j]) & (gap2 < (heights[i] + heights[j]).astype(xp.float64) ** 2)
    return i[test], j[test]


def segment_points(peaks, i, j):
    """Voxels sampled on the segments from ``peaks[i]`` to ``peaks[j]``: (pair index, coordinates) per sample.

    One sample per voxel step along the longest axis: the voxel nearest to
    p + (q - p) k / L, halves rounded up, k = 0..L, in integers (the same on
    every backend and for any chunking).
    """
    xp = get_array_module(peaks)
    if i.size == 0:
        return xp.zeros(0, dtype=xp.int64), xp.zeros((0, peaks.shape[1]), dtype=xp.int64)
    step = peaks[j] - peaks[i]
    length = xp.abs(step).max(axis=1)
    count = length + 1
    ends = xp.cumsum(count)
    total = int(ends[-1])
    pair = xp.searchsorted(ends, xp.arange(total, dtype=xp.int64), side="right")
    k = xp.arange(total, dtype=xp.int64) - (ends - count)[pair]
    points = peaks[i][pair] + xp.floor_divide(2 * step[pair] * k[:, None] + length[pair][:, None],
                                              2 * length[pair][:, None])
    return pair, points


def groups_from_necks(n, i, j, low, heights, ratio):
    """Groups of ``n`` peaks from the tested pairs and the lowest distance on each segment (see :func:`neck_groups`)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    xp = get_array_module(heights)
    if n == 0:
        return xp.zeros(0, dtype=xp.int64)
    heights = xp.asarray(heights).astype(xp.float64)
    joined = xp.asarray(low).astype(xp.float64) >= float(ratio) * xp.maximum(heights[i], heights[j])
    a, b = to_host(i[joined]), to_host(j[joined])
    _, component = connected_components(coo_matrix((np.ones(a.size), (a, b)), shape=(n, n)), directed=False)
    first = np.full(n, n, dtype=np.int64)
    np.minimum.at(first, component, np.arange(n))
    return xp.asarray(first[component])
