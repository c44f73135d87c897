"""Peaks of the distance map: the particle centres, and the necks that group them.

The voxel work is array operations on the device (a maximum filter, a
compare, a nonzero); the greedy spacing of the candidates, sequential by
nature, is a compiled kernel on the host over the candidate list. Every
step's memory is bounded whatever the data (plateaus of thousands of peaks
included): linear in the candidates, pairs in batches.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

from gpu_pipeline._backend import get_array_module, ops_for, to_host
from gpu_pipeline.stages.kmeans import to_list

#: Distances are compared on a grid of min(spacing)/QUANTUM_DIVISOR, so that
#: float rounding differences between backends cannot flip a tie.
QUANTUM_DIVISOR = 256

#: Candidate peak pairs, or segment samples, held at once by the neck search:
#: bounds its memory (about 100 bytes each) whatever the number of peaks.
PAIR_BATCH = 1 << 21

#: The neck test's allowance for the grid, in voxels of the finest axis, by the number of dimensions: a
#: segment between two peaks on a rod's axis is sampled at the nearest voxels, up to about 0.7 voxel off an
#: axis at an angle to the grid, so the equal peaks of one ridge show dips of that size, which any ratio
#: below 1 scaled by the rod's width misses on thin rods. In 2D a dip of at most one voxel below
#: ``ratio`` times the higher peak is no neck. With the hollow particles' cavities filled
#: (cleanup.SHELL_HOLE_DEPTH), rods were the largest error left on EMPS (f32c7bd62b: 1148 pieces for 277
#: nanorods); at the defaults (2026-12-05) one voxel raised pooled F1@0.5 0.4256 -> 0.4502 on emps_subset
#: and 0.4719 -> 0.5880 on emps_train_rest (43 images higher, 6 lower, the largest loss 0.044), 25
#: generated rods in 256^2 (four seeds) 0.094 -> 0.952; it cost DSB 0.7615 -> 0.7468 and generated nuclei
#: seeds 0-3 0.9382 -> 0.9270 (seeds 100-105 0.8687 -> 0.8699). Half a voxel kept most rods cut (0.41),
#: 1.5 voxels cost the nuclei more (0.9247, 0.8547); 0.95 in 2D instead, without the allowance, gained a
#: quarter as much on EMPS. 3D: none (the bench's spheres, measured with the 3D defaults, have no rods).
#: Its cost: small touching discs. Between two discs of radius 3-4 px the dip is about a voxel, so at the 2D
#: defaults 400 discs of radius 3-7 in 512^2 pool F1@0.5 0.631 and 600 of radius 2.5-5 0.454 (seeds 0-2;
#: --neck-ratio off: 0.754 and 0.713). Measured 2026-12-05 and not taken: the allowance capped at 0.1 / 0.15
#: of the higher peak (those sets 0.66 -> 0.76 / 0.69, but EMPS pooled 0.6035 -> 0.5925 / 0.5990 and
#: 0.6687 -> 0.6355 / 0.6530: thin rods cut); the profile taken as the highest value within a voxel across
#: the segment (removes the grid's offset from a rod's axis), with an allowance of 0 or 0.5 voxel: rods of
#: half-width 5-7 on the noisy test image fell from 0.92 to 0.17 / 0.70, so their dips come mostly from the
#: rough edges of a thresholded rod, not from the sampling; and no allowance where the measured 2D radius is
#: small: it is 6.7 px on the discs of radius 3-7 (a cluster is as deep as its largest disc) and 4.1-4.5 px on
#: rods of half-width 2.5-4, the other way round.
#: Also not taken (2026-12-05 night): the allowance only for peaks closer than 1.5 times the lower one's height
#: (ridge peaks lie close, two discs' centres about two radii apart): generated rods of half-width 5-7 / 2.5-4
#: (four 256^2 images each) 0.919 / 1.000 -> 0.804 / 0.675, the small discs 0.645 / 0.476 -> 0.673 / 0.508, uneven
#: nuclei of radius 4-8 0.724 -> 0.740: a rough ridge's maxima lie farther apart than that.
NECK_TOLERANCE_VOXELS = {2: 1.0, 3: 0.0}

#: The neck test's reach by the number of dimensions: two peaks of one region are tested when they lie closer
#: than this times the sum of their heights (1: their inscribed balls overlap). A rod's ridge can hold peaks
#: farther apart than that: where its width varies slowly, or where ``min_distance`` exceeds its radius (the
#: auto one follows the larger particles of the image), and a rod whose peaks were never tested was cut into
#: pieces (EMPS 441414704c: one rod of half-width 43, peaks 109 px apart, cut in three). In 2D, 2: with the 2D
#: ratio 0.97, at the defaults (2026-12-05, defaults_sweep_2026-12-05_s37_necks.md) pooled F1@0.5 on
#: emps_subset 0.5075 -> 0.5129 with the reach alone, 0.5202 with both, on emps_train_rest 0.6088 -> 0.6174
#: -> 0.6246; DSB and the generated 2D sets unchanged by the reach (1.5 gained two thirds as much; the ratio's
#: own effect: pipeline.NECK_RATIO_AUTO). 3D: 1. At 2 the F1 of six random 192^3 volumes (rng 777, both
#: spreads) was unchanged and the neck stage took about twice as long (0.01-0.04 s more); no 3D data of ours
#: has rods.
NECK_REACH = {2: 2.0, 3: 1.0}

#: Window offsets tested together by :func:`local_maxima` before dropping the candidates they exceed.
WINDOW_OFFSET_GROUP = 8
#: The CPU tests each candidate against its window's and reach's offsets in a compiled kernel
#: (:func:`cpu_fallback.kernels.any_higher`); False runs the array code that the GPU runs, on NumPy (the tests
#: compare the two).
COMPILED_WINDOW_TEST = True
#: The CPU tests the samples of :func:`ball_shares` a pair of peaks at a time in a compiled kernel
#: (:func:`cpu_fallback.kernels.ball_takes`: the same bits); False runs the array code that the GPU runs, on
#: NumPy (the tests compare the two). The shares of `shadowed_peaks` on the 5882 peaks of the 256x512x512 bench
#: volume, one core of the 2-core VM (2026-12-07): 0.15-0.20 s -> 0.08-0.10 s, the rest finding the pairs.
COMPILED_BALL_TEST = True


def window_half_widths(min_distance, spacing):
    """Half-width of the peak window per axis, in voxels: floor(min_distance / spacing)."""
    return tuple(max(0, int(math.floor(float(min_distance) / float(s) + 1e-9))) for s in spacing)


#: Arrays smaller than this are quantised by the NumPy expression itself (the compiled pass gives the same
#: values): a handful of values, such as a cap, then never start the compiler in a process that needs it for
#: nothing else (the client of a cluster: about 0.35 s to import Numba and load a kernel).
COMPILED_QUANTIZE_MIN = 1 << 16


def quantize_distance(distance, spacing):
    """Distance map as int32 multiples of ``min(spacing) / QUANTUM_DIVISOR``."""
    xp = get_array_module(distance)
    quantum = min(float(s) for s in spacing) / QUANTUM_DIVISOR
    if xp.__name__ == "numpy" and distance.size >= COMPILED_QUANTIZE_MIN:  # one compiled pass, no float64 copy
        from cpu_fallback.kernels import quantize

        return quantize(distance, quantum), quantum
    return xp.rint(distance.astype(xp.float64) / quantum).astype(xp.int32), quantum


def quantize_cap(cap, spacing):
    """The physical cap of the distance map (:func:`~gpu_pipeline.pipeline.distance_cap`) as the quantised value
    that :func:`quantize_distance` gives the capped voxels."""
    return int(quantize_distance(np.asarray([cap], dtype=np.float32), spacing)[0][0])


def find_peaks(values, *, half_widths, min_value=0, reach=None, return_overlooked=False):
    """Local maxima of ``values`` over an ellipsoidal window of half-widths ``half_widths`` voxels per axis.

    A voxel is a peak when it is at least as high as every voxel of its
    window (the ellipsoid ``sum((d / h)^2) <= 1`` around it, a ball of
    radius ``h`` when every axis has the same ``h``; on axes where ``h`` is 0
    the window is one voxel thick) and exceeds ``min_value``. Among equal
    maxima, the first in C order is kept and the others strictly inside its
    ellipsoid are dropped; a dropped one suppresses nothing, so along a
    ridge of equal values peaks are kept about every ``h`` voxels. This is
    ``skimage.feature.peak_local_max(values, footprint=ellipsoid,
    exclude_border=False)`` followed by a greedy spacing with the same
    ellipsoid (:func:`space_candidates`).

    Why an ellipsoid and not the box of ``2*h+1`` voxels: the box's corners
    reach ``h * sqrt(ndim)`` away, where the flank of a larger touching
    particle is higher than a small particle's centre and suppressed it
    (``python -m bench.peak_diagnosis``: 44 of the 48 particles that SNOW
    found and declump missed); the ball suppresses only within ``h``.

    With ``reach`` (a :class:`PeakReach`), a candidate must moreover be the
    highest voxel within ``reach.ratio`` times its own value (physical units,
    and no more than its distance to the image's border) before the spacing:
    the window grows with the peak (:func:`within_reach`). With
    ``return_overlooked`` the candidates that the reach overlooks are kept
    too, spaced among themselves, and flagged, for :func:`rescued_peaks`.

    Parameters
    ----------
    values : ndarray (NumPy or CuPy), integer or float
    half_widths : tuple of int
        Window half-width per axis, in voxels.
    min_value : scalar
        Peaks must be strictly greater.
    reach : PeakReach, optional
    return_overlooked : bool
        Also return which peaks the reach overlooks (all False without it).

    Returns
    -------
    coords : ndarray, shape (n_peaks, ndim), int64
        Peak coordinates sorted in C order, on the input's device.
    overlooked : ndarray, shape (n_peaks,), bool
        Only with ``return_overlooked``.
    """
    xp = get_array_module(values)
    candidates = local_maxima(values, half_widths=half_widths, min_value=min_value)
    within = None if reach is None else within_reach(values, candidates, reach, half_widths, values.shape)
    if within is not None and not return_overlooked:
        candidates, within = candidates[within], None
    keep = space_candidates_by_reach(candidates, within, half_widths)
    if not return_overlooked:
        return candidates[keep]
    return candidates[keep], (xp.zeros(int(keep.sum()), dtype=bool) if within is None else ~within[keep])


def space_candidates_by_reach(coords, within, half_widths):
    """:func:`space_candidates` of the candidates within their reach and, apart, of those the reach overlooks
    (``within``: boolean per candidate, or None: one set), so that the peaks within reach are those of the run
    that drops the others. Returns a boolean array over ``coords``."""
    if within is None:
        return space_candidates(coords, half_widths)
    xp = get_array_module(coords)
    keep = xp.zeros(coords.shape[0], dtype=bool)
    for part in (within, ~within):
        index = xp.flatnonzero(part)
        keep[index[space_candidates(coords[index], half_widths)]] = True
    return keep


class PeakReach:
    """The window of a peak grown with its height: no voxel within ``ratio`` times the peak's distance
    (physical: its quantised value times ``min(spacing) / QUANTUM_DIVISOR``) may be higher. ``cap``: the
    physical cap of the distance map; a peak at the cap is its highest value, which nothing can exceed, so
    those are not tested (a capped plateau's thousands of candidates would each test a ball of offsets)."""

    def __init__(self, ratio, spacing, cap):
        self.ratio, self.spacing = float(ratio), tuple(float(s) for s in spacing)
        self.quantum = min(self.spacing) / QUANTUM_DIVISOR
        self.cap_q = quantize_cap(cap, self.spacing)

    def voxels(self, value):
        """Half-widths (voxels per axis) of the box that holds the reach of a peak of quantised ``value``."""
        radius = self.ratio * float(value) * self.quantum
        return tuple(int(math.floor(radius / s + 1e-9)) for s in self.spacing)


def reach_offset_shells(reach, value_max, half_widths):
    """Offsets (m, ndim) int64 within the reach of the highest possible peak, outside the window of
    :func:`find_peaks` (already tested), nearest first, with their squared physical length (float64, summed
    axis by axis); one slab of the first axis at a time, as :func:`window_offset_slabs`."""
    for offsets in _box_slabs(reach.voxels(value_max)):
        length2 = np.zeros(offsets.shape[0])
        for a, s in enumerate(reach.spacing):
            length2 = length2 + (offsets[:, a] * s) ** 2
        outside = window_norm(offsets, half_widths) > 1.0
        inside = outside & (length2 <= (reach.ratio * float(value_max) * reach.quantum) ** 2)
        order = np.argsort(length2[inside], kind="stable")
        yield offsets[inside][order], length2[inside][order]


def within_reach(values, coords, reach, half_widths, shape, origin=None):
    """Which of ``coords`` (candidates of :func:`local_maxima`) no voxel within their reach exceeds.

    The reach of a candidate of value ``v`` is a ball of physical radius
    ``reach.ratio * min(v * reach.quantum, b)``, ``b`` its distance to the
    border of the whole image (``shape``; ``origin``: where ``values``
    starts in it): near the border a particle may continue beyond the image,
    its distance map is not its inscribed radius there, and the reach would
    overlook its neighbours from their own inflated flanks. Voxels beyond
    ``values`` do not count (coordinates are clipped to it, which only moves
    them nearer). A
    distance-map maximum that a higher voxel overlooks from within this
    fraction of its own inscribed radius lies on the flank or ridge of a
    larger body, not at a particle's centre: in a volume of touching spheres
    such maxima are the second maxima of one sphere, 6-10 voxels from its
    first (README, Method step 6). The test runs in batches of at most
    :data:`PAIR_BATCH` gathers, nearest offsets first, and a candidate leaves
    as soon as one voxel exceeds it. Returns a boolean array over ``coords``.
    """
    xp = get_array_module(values)
    if coords.shape[0] == 0:
        return xp.ones(0, dtype=bool)
    height = values[tuple(coords.T)]
    at = coords + (0 if origin is None else xp.asarray(origin, dtype=xp.int64))
    radius = reach.ratio * xp.minimum(height.astype(xp.float64) * reach.quantum,
                                      border_distance(at, shape, reach.spacing))
    # Only candidates below the cap whose reach leaves their window (an ellipsoid of half_widths voxels) can be
    # overlooked: the window's voxels were tested by local_maxima. The work is then these candidates (distance-map
    # maxima, at most a ridge of them below the cap) times the offsets of their reach.
    within_window = xp.ones(coords.shape[0], dtype=bool)
    for h, s in zip(half_widths, reach.spacing):
        within_window &= radius / s <= h
    alive = xp.flatnonzero((height < reach.cap_q) & ~within_window)
    if alive.size == 0:
        return xp.ones(coords.shape[0], dtype=bool)
    return _none_higher(values, coords, alive, reach_offset_shells(reach, int(to_list(height[alive].max())),
                                                                     half_widths), radius * radius)


def border_distance(coords, shape, spacing):
    """Physical distance (float64) of each of ``coords`` to the border of an image of ``shape``, as if background
    lay beyond it: ``(min(x, n - 1 - x) + 1) * spacing``, least over the axes."""
    xp = get_array_module(coords)
    top = xp.asarray([int(n) - 1 for n in shape], dtype=xp.int64)
    return ((xp.minimum(coords, top - coords) + 1).astype(xp.float64)
            * xp.asarray([float(s) for s in spacing], dtype=xp.float64)).min(axis=1)


def window_norm(offsets, half_widths):
    """``sum((d / h)^2)`` over the axes (float64, summed axis by axis exactly as
    :func:`cpu_fallback.kernels.greedy_spacing` sums it), inf where ``d != 0`` on an axis with ``h = 0``.

    The window of :func:`find_peaks` is ``<= 1``; candidates interact when ``< 1``, so two that interact lie
    in each other's window.
    """
    norm = np.zeros(offsets.shape[0])
    for a, h in enumerate(half_widths):
        if h > 0:
            t = offsets[:, a] / int(h)
            norm = norm + t * t
        else:
            norm[offsets[:, a] != 0] = np.inf
    return norm


def _box_slabs(box):
    """The offsets (m, ndim) int64 of the box of half-widths ``box`` voxels, one slab of the first axis at a time
    (offset 0, then -1, 1, -2, 2, ...): memory of one slab whatever the box."""
    rest = (np.stack(np.meshgrid(*[np.arange(-b, b + 1) for b in box[1:]], indexing="ij"), axis=-1)
            .reshape(-1, len(box) - 1) if len(box) > 1 else np.zeros((1, 0), dtype=np.int64))
    for first in sorted(range(-box[0], box[0] + 1), key=lambda d: (abs(d), d)):
        yield np.concatenate([np.full((rest.shape[0], 1), first), rest], axis=1).astype(np.int64)


def window_offset_slabs(half_widths):
    """The offsets (m, ndim) int64 of :func:`find_peaks`' window, centre excluded, one slab of the first axis
    at a time (offset 0, then -1, 1, -2, 2, ...), nearest first within a slab: memory of one slab whatever
    the window."""
    half = [max(0, int(h)) for h in half_widths]
    for offsets in _box_slabs(half):
        norm = window_norm(offsets, half)
        inside = (norm <= 1.0) & (np.abs(offsets).sum(axis=1) > 0)
        yield offsets[inside][np.argsort(norm[inside], kind="stable")]


def local_maxima(values, *, half_widths, min_value=0, core=None):
    """Coordinates (C order, int64) of voxels at least as high as their window (:func:`find_peaks`) and above
    ``min_value``.

    The window is an ellipsoid, which no separable filter computes: a box
    maximum filter of ``2*h+1`` (separable, compiled on the CPU) keeps every
    voxel it finds, since the ellipsoid lies inside the box; the voxels it
    rejects that are at least as high as their face neighbours are tested
    against the ellipsoid's offsets, nearest first, in batches of at most
    :data:`PAIR_BATCH` gathers (edges replicated, as the box filter's), and
    those with no higher voxel in it are kept too. ``core`` (a tuple of
    slices) restricts the result to that part of ``values`` (the rest is the
    halo of a chunk, at least ``h`` deep); coordinates stay relative to
    ``values``.
    """
    xp = get_array_module(values)
    ops = ops_for(values)
    size = tuple(2 * h + 1 for h in half_widths)
    # The box's maxima, and the face-neighbour maxima (edges replicated) that the box rejected: the only
    # voxels the ellipsoid can keep.
    maxima, maybe = ops.box_maxima(values, ops.maximum_filter(values, size), min_value, half_widths, core)
    if not maybe.shape[0]:
        return maxima
    coords = xp.concatenate([maxima, maybe[_highest_in_window(values, maybe, half_widths)]])
    order = xp.argsort(xp.ravel_multi_index(tuple(coords.T), values.shape), kind="stable")
    return coords[order]


def _highest_in_window(values, coords, half_widths):
    """Which of ``coords`` no voxel of their window (:func:`window_offset_slabs`) exceeds; edges replicated."""
    xp = get_array_module(values)
    return _none_higher(values, coords, xp.arange(coords.shape[0], dtype=xp.int64),
                        ((offsets, None) for offsets in window_offset_slabs(half_widths)))


def _none_higher(values, coords, alive, slabs, limit2=None):
    """Which of ``coords`` no voxel at the offsets ``slabs`` yields exceeds (only those listed in ``alive`` are
    tested; the others are kept); edges replicated.

    ``slabs`` yields (offsets, squared lengths or None) nearest first; with
    ``limit2`` (per coordinate) an offset counts only where its squared
    length is at most the coordinate's. Offsets go :data:`WINDOW_OFFSET_GROUP`
    at a time (more once few coordinates are left), a coordinate leaves as
    soon as one exceeds it, and at most :data:`PAIR_BATCH` values are
    gathered at once. On the CPU (:data:`COMPILED_WINDOW_TEST`) a compiled kernel tests a coordinate at a time
    against each slab (:func:`cpu_fallback.kernels.any_higher`): the same result, without the gathers.
    """
    xp = get_array_module(values)
    keep = xp.ones(coords.shape[0], dtype=bool)
    if xp is np and COMPILED_WINDOW_TEST:
        from cpu_fallback.kernels import any_higher

        for slab, length2 in slabs:
            hit = any_higher(values, coords, alive, slab, length2, limit2)
            keep[alive[hit]] = False
            alive = alive[~hit]
            if alive.size == 0:
                break
        return keep
    top = xp.asarray([n - 1 for n in values.shape], dtype=xp.int64)
    for slab, length2 in slabs:
        start = 0
        while start < slab.shape[0] and alive.size:
            group = max(WINDOW_OFFSET_GROUP, PAIR_BATCH // int(alive.size))
            step = xp.asarray(slab[start:start + group])
            near = None if length2 is None else xp.asarray(length2[start:start + group])
            start += group
            per = max(1, PAIR_BATCH // step.shape[0])
            exceeded = []
            for part in range(0, alive.size, per):
                mine = alive[part:part + per]
                here = coords[mine]
                around = xp.clip(here[:, None, :] + step[None, :, :], 0, top)
                higher = values[tuple(xp.moveaxis(around, -1, 0))] > values[tuple(here.T)][:, None]
                if near is not None:
                    higher &= near[None, :] <= limit2[mine][:, None]
                exceeded.append(higher.any(axis=1))
            hit = xp.concatenate(exceeded)
            keep[alive[hit]] = False
            alive = alive[~hit]
        if alive.size == 0:
            break
    return keep


def space_candidates(coords, half_widths):
    """Which candidates (sorted in C order) survive the greedy spacing of :func:`find_peaks`.

    Two candidates interact when each lies strictly inside the other's
    window ellipsoid (``sum((d / h)^2) < 1``; those on its surface both
    stay, as scikit-image keeps those exactly ``h`` apart); interacting
    candidates are equal, since each is at least as high as the other's
    window. In C order, a candidate is kept when no kept candidate interacts
    with it. This is sequential by nature, so it runs as a compiled kernel on
    the host (:func:`cpu_fallback.kernels.greedy_spacing`, linear in the
    candidates, even for a plateau where every voxel is one); the result
    depends only on the candidate set (which is what lets a chunked run
    reproduce it exactly).

    Returns a boolean array over ``coords``, on their device.
    """
    from cpu_fallback.kernels import greedy_spacing

    xp = get_array_module(coords)
    keep = greedy_spacing(to_host(coords), [max(0, int(h)) for h in half_widths])
    return keep if xp is np else xp.asarray(keep)


def neck_groups(peaks, distance_q, regions, spacing, ratio, nearby=None):
    """Group peaks that belong to one particle: peaks joined by no neck narrower than ``ratio``, or nearby.

    Two peaks of one region closer than :data:`NECK_REACH` times the sum of
    their heights (physical units; 2 in 2D, 1 in 3D: their inscribed balls
    overlap) are tested along the straight segment
    between them (one sample per voxel step, nearest voxel): when the
    distance map never drops below ``ratio`` times the higher peak there, no
    neck separates them and they join one group. ``ratio`` 1.0 joins only
    peaks of equal height on a flat ridge or plateau (a rod's axis, a capped
    plateau); lower ratios also join shallow necks (rods of varying width,
    the rim of a hollow particle) and a lower peak on the flank of a higher
    one that is at least ``ratio`` times as high. Two touching spheres of
    radius r whose centres are d apart have a neck of half-width
    sqrt(r^2 - d^2/4): ``ratio`` 0.7 joins them only when they overlap by
    more than about 30% of their diameter. With ``nearby``, two peaks of one
    region also join, whatever lies between them, when they are closer than
    ``nearby`` times the higher peak's height: the lower peak lies deep inside
    the higher one's inscribed ball (PoreSpy's ``trim_nearby_peaks`` with
    ``f = nearby``). Groups are the connected components of the joined pairs.
    In 2D a dip of up to one voxel below ``ratio`` times the higher peak is
    no neck (:data:`NECK_TOLERANCE_VOXELS`): the grid's sampling of a thin
    rod's axis.

    Parameters
    ----------
    peaks : ndarray (n, ndim) int64, C order
    distance_q : ndarray of int32
        Quantised distance map (:func:`quantize_distance`).
    regions : ndarray of int
        Connected regions; peaks of different regions are never joined.
    spacing : tuple of float
    ratio : float in (0, 1] or None
        None: no neck test (only ``nearby`` joins).
    nearby : float in (0, 1] or None

    Returns
    -------
    group : ndarray (n,) int64, on the peaks' device
        The smallest peak index in each peak's group.

    Notes
    -----
    On a plateau (all-foreground image, capped distance map) thousands of
    high peaks overlap each other, and the pairs to test grow with the
    square of the peaks. :func:`join_peaks` tests them nearest first, in
    batches of at most :data:`PAIR_BATCH`, and skips pairs already joined
    through others, so memory stays bounded and a plateau costs about as
    much as its near pairs.
    """
    heights = distance_q[tuple(peaks.T)]
    return join_peaks(peaks, heights, regions[tuple(peaks.T)], spacing, ratio,
                      lambda i, j: segment_minima(distance_q, peaks, i, j), nearby=nearby)


def segment_minima(values, peaks, i, j):
    """The lowest of ``values`` on each segment from ``peaks[i]`` to ``peaks[j]`` (:func:`segment_points`), in
    batches of :func:`sample_batches` (bounded memory, whatever the pairs): int64 for integer ``values``, else
    ``values``' dtype."""
    xp = get_array_module(peaks)
    if np.dtype(values.dtype).kind in "iub":
        dtype, start = np.int64, np.iinfo(np.int64).max
    else:
        dtype, start = values.dtype, np.inf
    low = xp.full(i.size, start, dtype=dtype)
    for part in sample_batches(peaks, i, j):
        pair, points = segment_points(peaks, i[part], j[part])
        lowest = low[part]
        ops_for(low).scatter_min(lowest, pair, values[tuple(points.T)].astype(dtype))
        low[part] = lowest
    return low


def sample_batches(peaks, i, j):
    """Slices of the pairs (i, j) whose segments hold at most :data:`PAIR_BATCH` samples together (one pair at least)."""
    xp = get_array_module(peaks)
    if i.size == 0:
        return []
    ends = to_host(xp.cumsum(xp.abs(peaks[j] - peaks[i]).max(axis=1) + 1))
    bounds = [0]
    while bounds[-1] < ends.size:
        done = int(ends[bounds[-1] - 1]) if bounds[-1] else 0
        bounds.append(max(bounds[-1] + 1, int(np.searchsorted(ends, done + PAIR_BATCH, side="right"))))
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def join_peaks(peaks, heights, region, spacing, ratio, segment_minima, *, nearby=None, nearest_first=True):
    """Groups of peaks joined by necks no narrower than ``ratio``, or nearby (the search of :func:`neck_groups`).

    A pair of peaks of one region closer than :data:`NECK_REACH` times the
    sum of their heights is joined when ``segment_minima(i, j)`` (the
    lowest quantised distance on each pair's segment, see
    :func:`segment_points`) is at least ``ratio`` times
    the higher peak, less :data:`NECK_TOLERANCE_VOXELS` (one voxel in 2D),
    or (``nearby`` not None) when the peaks lie less than ``nearby`` times
    the higher peak apart; ``ratio`` None: ``nearby`` only,
    and ``segment_minima`` is never called. Candidate pairs come from levels
    of cells (:func:`_cell_levels`): pairs in neighbouring cells, with cells
    from one voxel up to the reach of the highest peak, so near pairs come
    first, and at each coarser level only the pairs
    with a peak high enough to reach across it (the pairs of many low peaks
    under a few high ones are not enumerated at the high ones' level). A
    cell pair whose peaks already form one group is skipped, as is every
    pair already joined through others, and a pair is met at one level only.
    Each batch of pairs is tested as it comes; with ``nearest_first`` False
    (for callers whose ``segment_minima`` has a fixed cost per call) the
    pairs are gathered and tested about :data:`PAIR_BATCH` at a time. At
    most about twice :data:`PAIR_BATCH` pairs are held at once, whatever the
    data. The groups do not depend on the order. ``heights``: quantised
    distances at the peaks; ``region``: each peak's region. Returns the
    smallest peak index in each peak's group.
    """
    xp = get_array_module(peaks)
    n = peaks.shape[0]
    group = xp.arange(n, dtype=xp.int64)
    if n < 2:
        return group
    heights = xp.asarray(heights).astype(xp.int64)
    region = xp.asarray(region).astype(xp.int64)
    quantum = min(float(s) for s in spacing) / QUANTUM_DIVISOR
    allowance = NECK_TOLERANCE_VOXELS.get(peaks.shape[1], 0.0) * QUANTUM_DIVISOR  # quanta
    widen = NECK_REACH.get(peaks.shape[1], 1.0)
    scale = xp.asarray([float(s) / quantum for s in spacing], dtype=xp.float64)
    held = []  # without ``nearest_first``: pairs gathered over batches, up to PAIR_BATCH per call

    def merge_tested(i, j, gap2, group):
        higher = xp.maximum(heights[i], heights[j]).astype(xp.float64)
        joined = xp.zeros(i.size, dtype=bool)
        if nearby is not None:
            joined |= gap2 < (float(nearby) * higher) ** 2
        necks = ~joined
        if ratio is not None and bool(necks.any()):
            low = xp.asarray(segment_minima(i[necks], j[necks])).astype(xp.float64)
            joined[necks] = low >= float(ratio) * higher[necks] - allowance
        return _merge_groups(group, i[joined], j[joined])

    # Balls widened by ``widen`` overlap within twice that times the higher peak.
    for cell, previous, tall in _cell_levels(peaks, widen * heights.astype(xp.float64) * quantum, spacing):
        for i, j in _neighbour_cell_pairs(peaks, cell, group, tall, previous):
            step = peaks[j] - peaks[i]
            gap2 = ((step.astype(xp.float64) * scale) ** 2).sum(axis=1)
            keep = (region[i] == region[j]) & (group[i] != group[j])
            keep &= gap2 < (widen * (heights[i] + heights[j]).astype(xp.float64)) ** 2
            i, j, gap2 = i[keep], j[keep], gap2[keep]
            if i.size == 0:
                continue
            if nearest_first:
                group = merge_tested(i, j, gap2, group)
                continue
            held.append((i, j, gap2))
            if sum(part[0].size for part in held) >= PAIR_BATCH:
                group = merge_tested(*(xp.concatenate(parts) for parts in zip(*held)), group)
                held = []
    if held:
        group = merge_tested(*(xp.concatenate(parts) for parts in zip(*held)), group)
    return group


#: Points per axis of the grid on which :func:`ball_shares` counts a peak's share of its inscribed ball (those
#: within the unit ball: 257 in 3D, 69 in 2D).
BALL_SAMPLES_PER_AXIS = 9

#: Set bits of each byte value (a popcount table for packed samples).
_BITS_SET = np.asarray([bin(v).count("1") for v in range(256)], dtype=np.int64)


def unit_ball_samples(ndim):
    """The points (m, ndim) float64 of a grid of :data:`BALL_SAMPLES_PER_AXIS` per axis on [-1, 1] that lie
    within the unit ball."""
    axis = np.linspace(-1.0, 1.0, BALL_SAMPLES_PER_AXIS)
    grid = np.stack(np.meshgrid(*[axis] * ndim, indexing="ij"), axis=-1).reshape(-1, ndim)
    return grid[(grid ** 2).sum(axis=1) <= 1.0]


def ball_shares(peaks, heights, region, group, spacing, *, power=True, tested=None, shape=None):
    """Per peak, the samples of its inscribed ball (:func:`unit_ball_samples` scaled by its height) that no
    peak of another group of its region takes from it; and the number of samples counted.

    The ball of a peak lies in the foreground and in the peak's region, and
    the assignment gives each of its points to the nearest peak of the
    region (power distance ``|x - c|^2 - r^2`` with the heights as radii, or
    Euclidean with ``power`` False). A point ``x = p + r_p u`` of ``p``'s
    ball is nearer to ``q`` when ``|d|^2 + 2 r_p d.u + w_p - w_q < 0``
    (``d = p - q``, physical; ``w = r^2``, or 0 for Euclidean): a half-space
    of the ball, so only peaks whose balls overlap ``p``'s (Euclidean: within
    twice ``p``'s radius) take any of it. A
    point counts as taken once, whatever the number of peaks that take it.
    Peaks of ``p``'s own group take nothing (the group is one piece), so a
    peak's count is a lower bound of its group's share of its ball.

    ``heights``: quantised distances at the peaks (:func:`quantize_distance`);
    ``region``, ``group``: each peak's region and group (None: one group per
    peak); ``tested`` (boolean per peak, default all): the peaks whose share
    is counted (the others report all ``m``, and only take). ``shape``: the
    image's, when given: a sample beyond its border (more than half a voxel
    outside, :func:`samples_outside`) is neither kept nor counted, so a peak
    at the border is measured on the part of its ball that the image holds.
    Pairs come from a grid of cells as in :func:`join_peaks`, at most
    :data:`PAIR_BATCH` samples tested at once; the taken samples are held as
    bits, ``ceil(m / 8)`` bytes per peak. Returns (kept (n,) int64, counted
    (n,) int64): ``counted`` is ``m`` less the samples beyond the border.
    """
    xp = get_array_module(peaks)
    n, ndim = peaks.shape
    samples = unit_ball_samples(ndim)
    m = samples.shape[0]
    width = (m + 7) // 8
    taken = xp.zeros((n, width), dtype=xp.uint8)
    bit = xp.asarray([1 << (7 - b) for b in range(8)], dtype=xp.int32)
    if n >= 2:
        group = xp.arange(n, dtype=xp.int64) if group is None else xp.asarray(group).astype(xp.int64)
        region = xp.asarray(region).astype(xp.int64)
        quantum = min(float(s) for s in spacing) / QUANTUM_DIVISOR
        radius = xp.asarray(heights).astype(xp.float64) * quantum
        weight = radius ** 2 if power else xp.zeros(n, dtype=xp.float64)
        scale = xp.asarray([float(s) for s in spacing], dtype=xp.float64)
        unit = xp.asarray(samples)
        per = max(1, PAIR_BATCH // m)
        # Overlapping balls (power), or a ball and a peak within twice its radius (Euclidean), lie within twice
        # the larger radius.
        pairs = (pair for cell, previous, tall in _cell_levels(peaks, radius, spacing)
                 for pair in _neighbour_cell_pairs(peaks, cell, group, tall, previous))
        if xp is np and COMPILED_BALL_TEST:
            from cpu_fallback.kernels import ball_takes

            every = xp.ones(n, dtype=bool) if tested is None else tested
            for i, j in pairs:
                ball_takes(i, j, peaks, scale, radius, weight, region, group, every, power, unit, taken)
        else:
            for i, j in pairs:
                d = (peaks[i] - peaks[j]).astype(xp.float64) * scale
                gap2 = (d ** 2).sum(axis=1)
                # Power: a point of p's ball that q takes lies in q's ball too. Euclidean: it lies nearer to q than
                # p's radius, so q lies within twice that.
                near = radius[i] + radius[j] if power else 2 * xp.maximum(radius[i], radius[j])
                test = (region[i] == region[j]) & (group[i] != group[j]) & (gap2 < near ** 2)
                i, j, d, gap2 = i[test], j[test], d[test], gap2[test]
                for p, q, step in ((i, j, d), (j, i, -d)):
                    if tested is not None:
                        counted = tested[p]
                        p, q, step, near2 = p[counted], q[counted], step[counted], gap2[counted]
                    else:
                        near2 = gap2
                    for start in range(0, p.size, per):
                        mine, theirs, dd = p[start:start + per], q[start:start + per], step[start:start + per]
                        along = dd[:, 0:1] * unit[None, :, 0]
                        for a in range(1, ndim):
                            along = along + dd[:, a:a + 1] * unit[None, :, a]
                        bound = weight[theirs] - weight[mine] - near2[start:start + per]
                        lost = 2 * radius[mine][:, None] * along < bound[:, None]
                        _or_into(taken, mine, lost, bit, xp)
    counted = xp.full(n, m, dtype=xp.int64)
    if shape is not None:
        outside = samples_outside(peaks, heights, spacing, shape, tested)
        if outside is not None:
            rows, beyond = outside
            _or_into(taken, rows, beyond, bit, xp)
            counted[rows] -= beyond.sum(axis=1)
    kept = m - xp.asarray(_BITS_SET)[taken].sum(axis=1)
    return kept.astype(xp.int64), counted


def samples_outside(peaks, heights, spacing, shape, tested=None):
    """Which of the :func:`unit_ball_samples` of each peak's inscribed ball (radius: its quantised ``heights``)
    lie beyond the border of an image of ``shape``: more than half a voxel outside on some axis. Only peaks whose
    ball reaches that far (and that are ``tested``, default all) are looked at: (their indices, (k, m) bool), or
    None where there are none."""
    xp = get_array_module(peaks)
    quantum = min(float(s) for s in spacing) / QUANTUM_DIVISOR
    radius = xp.asarray(heights).astype(xp.float64) * quantum
    scale = xp.asarray([float(s) for s in spacing], dtype=xp.float64)
    top = xp.asarray([int(k) - 1 for k in shape], dtype=xp.int64)
    room = (xp.minimum(peaks, top - peaks).astype(xp.float64) + 0.5) * scale
    reaches = (radius[:, None] > room).any(axis=1)
    rows = xp.flatnonzero(reaches if tested is None else reaches & xp.asarray(tested, dtype=bool))
    if rows.size == 0:
        return None
    points = peaks[rows].astype(xp.float64)[:, None, :] + (radius[rows][:, None, None]
                                                             * xp.asarray(unit_ball_samples(peaks.shape[1]))) / scale
    return rows, ((points < -0.5) | (points > top.astype(xp.float64) + 0.5)).any(axis=2)


def _or_into(taken, rows, lost, bit, xp):
    """``taken[rows] |= lost`` packed 8 samples a byte, ``rows`` possibly repeated (OR over repeats)."""
    order = xp.argsort(rows, kind="stable")
    rows, lost = rows[order], lost[order]
    first = xp.flatnonzero(xp.concatenate([xp.ones(1, dtype=bool), rows[1:] != rows[:-1]]))
    count = xp.cumsum(lost, axis=0, dtype=xp.int32)
    last = xp.concatenate([first[1:], xp.asarray([rows.size], dtype=first.dtype)]) - 1
    before = count[xp.maximum(first - 1, 0)] * (first > 0)[:, None]
    any_lost = (count[last] - before) > 0
    padded = xp.zeros((first.size, taken.shape[1] * 8), dtype=xp.int32)
    padded[:, :any_lost.shape[1]] = any_lost
    packed = (padded.reshape(first.size, taken.shape[1], 8) * bit).sum(axis=2).astype(xp.uint8)
    where = rows[first]
    taken[where] = taken[where] | packed


def shadowed_peaks(peaks, heights, region, group, spacing, shape, cap, share, *, power=True, shares=None):
    """Which peaks to keep: all but those of a group that keeps less than ``share`` of its ball.

    A group's share is the largest :func:`ball_shares` fraction of its
    peaks. A particle's own centre keeps most of its inscribed ball; a second
    maximum where three or four particles meet, or on the flank of a larger
    particle, sits in the balls of higher neighbours and keeps a sliver:
    its piece would cut bits off each of them. Such a group is dropped and
    its voxels go to the neighbours. At the image border (``shape``) a peak's
    share is of the part of its ball that the image holds: a particle cut by
    the border keeps its half, and a maximum where particles meet at the
    border is judged as one inside. Not dropped: a group with a peak whose
    height is the distance map's ``cap`` (physical,
    :func:`~gpu_pipeline.pipeline.distance_cap`: a plateau of capped peaks is
    not counted at all), nor the group of a region that keeps the largest
    share there (a region always keeps one). ``share`` None keeps every
    peak. ``shares``: a function that returns what :func:`ball_shares` does
    (default: it; a chunked run spreads it over its workers). Returns a
    boolean array over the peaks.
    """
    xp = get_array_module(peaks)
    ops = ops_for(peaks)
    n = peaks.shape[0]
    keep = xp.ones(n, dtype=bool)
    if share is None or n < 2:
        return keep
    group = xp.arange(n, dtype=xp.int64) if group is None else xp.asarray(group).astype(xp.int64)
    region = xp.asarray(region).astype(xp.int64)
    heights = xp.asarray(heights).astype(xp.int64)
    exempt = heights >= quantize_cap(cap, spacing)
    kept, counted = (shares or ball_shares)(peaks, heights, region, group, spacing, power=power, tested=~exempt,
                                            shape=shape)
    fraction = kept / xp.maximum(counted, 1)
    best = xp.full(n, -1.0, dtype=xp.float64)
    ops.scatter_max(best, group, fraction)
    any_exempt = xp.zeros(n, dtype=xp.int64)
    ops.scatter_max(any_exempt, group, exempt.astype(xp.int64))
    region_best = xp.full(int(region.max()) + 1, -1.0, dtype=xp.float64)
    ops.scatter_max(region_best, region, best[group])
    dropped = (best < float(share)) & (any_exempt == 0) & (best < region_best[region])
    return ~dropped[group]


def rescued_peaks(peaks, heights, region, overlooked, spacing, shape, share, *, power=True, shares=None):
    """Which peaks to keep: those the reach did not overlook, and those it did that keep at least ``share`` of
    their own inscribed ball from every other peak of their region (:func:`ball_shares`, one group per peak).

    The reach (:func:`within_reach`) takes a maximum that a higher voxel
    overlooks from within its reach for a second maximum on the flank of a
    larger body. A small particle pressed against larger ones can be
    overlooked the same way, from the rising flank of a neighbour: but its
    centre, unlike a second maximum, keeps most of its ball from the other
    peaks' balls. At the image border (``shape``) the share is of the part
    of the ball that the image holds, as for :func:`shadowed_peaks`.
    ``share`` None rescues none. ``heights``: quantised, as for
    :func:`ball_shares`; ``shares``: as for :func:`shadowed_peaks`. Returns
    a boolean array over the peaks.
    """
    xp = get_array_module(peaks)
    overlooked = xp.asarray(overlooked, dtype=bool)
    if share is None or not bool(overlooked.any()):
        return ~overlooked
    kept, counted = (shares or ball_shares)(peaks, heights, region, None, spacing, power=power, tested=overlooked,
                                            shape=shape)
    return ~overlooked | (overlooked & (kept >= float(share) * counted))


def regroup(group, keep):
    """The groups of the kept peaks (whole groups dropped), each named by its smallest kept peak index."""
    if group is None:
        return None
    xp = get_array_module(keep)
    index = xp.cumsum(keep.astype(xp.int64)) - 1
    return index[xp.asarray(group)[keep]]


def _cell_levels(peaks, reach, spacing):
    """Levels of cells for the pairs of peaks closer than twice the larger of their ``reach`` (physical
    units, per peak): ``(cell, previous, tall)`` for :func:`_neighbour_cell_pairs`, from cells of one voxel
    up to twice the largest reach (the peaks' extent at most), doubling, so that near pairs come first and
    the peaks they join are one group, one run of each cell, at the next level (a plateau where every voxel
    is a peak: 3,300 pairs per peak in cells of 8 voxels, 14 from one voxel up).

    A pair first met at a level (its cells are not neighbours at the
    ``previous`` level's) lies farther apart than that cell along some axis;
    only the peaks whose reach is more than half that distance (``tall``;
    None at the first level: all) can be in such a pair, and every pair
    enumerated there holds one. The levels stop where no peak is tall.
    """
    xp = get_array_module(peaks)
    reach = xp.asarray(reach, dtype=xp.float64)
    extent = to_list(peaks.max(axis=0) - peaks.min(axis=0))
    top = float(reach.max())
    widest = [min(int(e), int(math.ceil(2 * top / float(s)))) for e, s in zip(extent, spacing)]
    count = max(0, math.ceil(math.log2(max(1, max(widest)))))
    previous = tall = None
    for level in range(count + 1):
        cell = [max(1, math.ceil(w / 2 ** (count - level))) for w in widest]
        if previous is not None:
            apart = min((c + 1) * float(s) for c, s in zip(previous, spacing))
            tall = 2 * reach > apart
            if not bool(tall.any()):
                return
        yield cell, previous, tall
        previous = cell


def _neighbour_cell_pairs(peaks, cell, group, tall=None, previous=None):
    """Batches (i, j), i < j, of peaks of different groups in the same or neighbouring cells.

    Cells are ``cell`` voxels wide per axis. A cell's peaks are taken in
    runs of one group (and one kind, tall or not); two runs of one group
    yield nothing, so the many pairs of peaks already joined (a plateau's)
    cost their runs, not their pairs. The other runs of two neighbouring
    cells yield all their peak pairs, at most :data:`PAIR_BATCH` per batch
    (and at most that many pairs of runs held). ``tall`` (boolean per peak;
    None: all): only pairs with at least one tall peak. ``previous`` (cell
    widths): pairs whose cells of that width are the same or neighbours are
    left out (met at a finer level of :func:`_cell_levels`).
    """
    xp = get_array_module(peaks)
    ndim = peaks.shape[1]
    cell = xp.asarray(cell, dtype=xp.int64)
    low = peaks.min(axis=0)
    cells = (peaks - low) // cell
    grid = cells.max(axis=0) + 1
    strides = xp.concatenate([xp.cumprod(grid[::-1])[::-1][1:], xp.ones(1, dtype=xp.int64)])
    keys = (cells * strides).sum(axis=1)
    tall = xp.ones(peaks.shape[0], dtype=bool) if tall is None else xp.asarray(tall, dtype=bool)
    group = xp.asarray(group, dtype=xp.int64)
    # Runs: the peaks sorted by cell, then tall first, then group (keys, groups below 2^62: peaks of an image).
    order = xp.lexsort(xp.stack([group, (~tall).astype(xp.int64), keys]))
    k, g, s = keys[order], group[order], tall[order]
    new = xp.ones(order.size, dtype=bool)
    new[1:] = (k[1:] != k[:-1]) | (g[1:] != g[:-1]) | (s[1:] != s[:-1])
    run_start = xp.flatnonzero(new)
    run_count = xp.diff(xp.concatenate([run_start, xp.asarray([order.size], dtype=run_start.dtype)]))
    run_key, run_group, run_tall = k[run_start], g[run_start], s[run_start]
    # Cells: their runs are consecutive.
    cell_new = xp.ones(run_key.size, dtype=bool)
    cell_new[1:] = run_key[1:] != run_key[:-1]
    cell_first = xp.flatnonzero(cell_new)
    cell_runs = xp.diff(xp.concatenate([cell_first, xp.asarray([run_key.size], dtype=cell_first.dtype)]))
    unique_keys = run_key[cell_first]
    unique_cells = cells[order[run_start[cell_first]]]
    first, second = [], []
    # A neighbour's key is the cell's plus the offset's (keys are linear in the cells); it names that
    # neighbour where the neighbour lies inside the grid on every axis the offset moves along. Per axis, with
    # no per-offset array of cells: 14 offsets in 3D took 5.6 ms for 5900 peaks with the cells moved and
    # reduced over their axis, one level of five or six of every search (2026-12-07).
    step = to_list(strides)
    low_side = [unique_cells[:, axis] > 0 for axis in range(ndim)]
    high_side = [unique_cells[:, axis] < grid[axis] - 1 for axis in range(ndim)]
    # Half of the 3^ndim offsets (the zero offset and those positive in C order): every unordered pair of cells
    # once; a cell of one run (one group) with itself yields nothing.
    for offset in itertools.product((-1, 0, 1), repeat=ndim):
        if offset < (0,) * ndim:
            continue
        nk = unique_keys + sum(o * k for o, k in zip(offset, step))
        at = xp.minimum(xp.searchsorted(unique_keys, nk), unique_keys.size - 1)
        found = unique_keys[at] == nk
        for axis, o in enumerate(offset):
            if o:
                found &= low_side[axis] if o < 0 else high_side[axis]
        if not any(offset):
            found &= cell_runs > 1
        first.append(xp.flatnonzero(found))
        second.append(at[found])
    a, b = xp.concatenate(first), xp.concatenate(second)
    finer = None if previous is None else (peaks - low) // xp.asarray(previous, dtype=xp.int64)
    # A cell's tall runs come first: per cell pair, a's tall runs with all of b's (``head``), then a's other
    # runs with b's tall ones, so that the pairs of low peaks are not enumerated even as runs.
    tall_so_far = xp.concatenate([xp.zeros(1, dtype=xp.int64), xp.cumsum(run_tall.astype(xp.int64))])
    cell_talls = tall_so_far[cell_first + cell_runs] - tall_so_far[cell_first]
    head = cell_talls[a] * cell_runs[b]
    run_pairs = head + (cell_runs[a] - cell_talls[a]) * cell_talls[b]
    for pair, local in _flat_batches(run_pairs):
        in_head = local < head[pair]
        rest = local - head[pair]
        width = xp.where(in_head, cell_runs[b[pair]], xp.maximum(cell_talls[b[pair]], 1))
        x = xp.where(in_head, local // width, cell_talls[a[pair]] + rest // width)
        y = xp.where(in_head, local % width, rest % width)
        u, v = cell_first[a[pair]] + x, cell_first[b[pair]] + y
        keep = (run_group[u] != run_group[v]) & ((a[pair] != b[pair]) | (u < v))
        u, v = u[keep], v[keep]
        for which, place in _flat_batches(run_count[u] * run_count[v]):
            p, q = divmod(place, run_count[v[which]])
            i = order[run_start[u[which]] + p]
            j = order[run_start[v[which]] + q]
            if finer is not None:  # (per axis: a reduction over a short last axis is slow in NumPy)
                far = xp.abs(finer[j, 0] - finer[i, 0]) > 1
                for axis in range(1, ndim):
                    far |= xp.abs(finer[j, axis] - finer[i, axis]) > 1
                i, j = i[far], j[far]
            yield xp.minimum(i, j), xp.maximum(i, j)


def _flat_batches(sizes, batch=None):
    """Over items of ``sizes`` things each, batches of at most ``batch`` (default :data:`PAIR_BATCH`) things as
    (item, offset within it) arrays, in order."""
    xp = get_array_module(sizes)
    ends = xp.cumsum(sizes)
    total = int(ends[-1]) if ends.size else 0
    batch = batch or PAIR_BATCH
    for start in range(0, total, batch):
        flat = xp.arange(start, min(total, start + batch), dtype=xp.int64)
        item = xp.searchsorted(ends, flat, side="right")
        yield item, flat - (ends - sizes)[item]


def _merge_groups(group, i, j):
    """Groups after joining the pairs (i, j): connected components, each named by its smallest peak index."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    xp = get_array_module(group)
    if i.size == 0:
        return group
    n = group.size
    current = to_host(group)
    a = np.concatenate([np.arange(n), to_host(i)])
    b = np.concatenate([current, to_host(j)])
    _, component = connected_components(coo_matrix((np.ones(a.size, dtype=np.int8), (a, b)), shape=(n, n)),
                                        directed=False)
    first = np.full(n, n, dtype=np.int64)
    np.minimum.at(first, component, np.arange(n))
    merged = first[component]
    return merged if xp is np else xp.asarray(merged)


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
    (pair, k), = _flat_batches(count, batch=int(count.sum()))  # every sample at once (one batch)
    points = peaks[i][pair] + xp.floor_divide(2 * step[pair] * k[:, None] + length[pair][:, None],
                                              2 * length[pair][:, None])
    return pair, points
