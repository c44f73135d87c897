"""The steps on a global peak list (ball shares, the neck search) box by box: the same results, in parallel.

A peak list's ball shares (:func:`~gpu_pipeline.stages.peaks.ball_shares`)
and neck groups (:func:`~gpu_pipeline.stages.peaks.join_peaks`) depend only on
pairs of peaks within a reach, so a grid of boxes, each with a halo of peaks
around it, splits them into independent tasks whose results are the whole
list's, byte for byte. Serial on one core (2026-12-06) these steps took
about 36 µs a peak for the two ball-share calls and 17 µs for the neck search
on 31,000 peaks in 256x512x512 (3D balls have 257 samples, 2D discs 69), and
4.4 s and 13.8 s on a 4096² speckled foreground of 1.5 M peaks: about 1.5 h
for the ~10^8 peaks of a terabyte, in the command's process, while the
passes spread over the workers.

How the tasks run is the caller's: ``run(function, calls)`` returns
``[function(*call) for call in calls]``, on local threads in memory
(:func:`on_threads`) or on Dask's workers in a chunked run. Host (NumPy)
arrays only; the GPU in-memory path keeps the whole-list stages.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

from gpu_pipeline._common import each_on_threads
from gpu_pipeline.stages.peaks import (NECK_REACH, _merge_groups, ball_shares, join_peaks, quantize_distance,
                                       segment_minima, unit_ball_samples)

#: Peaks per box on average: a task of about 0.3 s (ball shares, 12-20 µs a peak on one core, 2026-12-06). A
#: list of fewer peaks stays one call.
PEAKS_PER_BOX = 20000
#: The most voxels of a box's core in the neck search, which reads its box of the distance map with the halo.
NECK_BOX_VOXELS = 1 << 24
#: A box is at least this many halos across (at least one: its halo then lies in its neighbours).
BOX_HALOS = 4
#: Boxes are used where their halos leave a gain: the peaks the boxes hold, halos included, over the boxes
#: that run at once, at most this share of the list's peaks; else the whole list is one call. The halo follows
#: the highest peak. On two threads (2026-12-06): specks around a few large balls in 160x256x256 (400,000
#: peaks) made 18 neck boxes holding 2.77 times the list (1.39 a thread) and 4 ball-share boxes holding
#: 1.69 (0.85): 1.60 -> 2.19 s and 1.66 -> 1.87 s by box; the 4096^2 speckled mask (1.49 M peaks) 81 boxes
#: holding 1.25 (0.62): 12.2 -> 7.9 s and 4.2 -> 3.3 s.
BOX_WORTH = 0.8


def peak_boxes(peaks, shape, halo, per_box, *, voxels=None, empty=False):
    """A grid of boxes over an image of ``shape`` for work on ``peaks`` that looks ``halo`` voxels (per axis)
    around each peak: for each box holding peaks, ``(core, near, low, high)``, ascending indices of its own
    peaks and of the peaks within ``halo`` of it (its own included), and the corners of the box with its
    halo, clipped to the image (``high`` exclusive). ``empty``: the boxes without peaks of their own whose
    halo holds some, too (a pair's midpoint may lie in one).

    Boxes hold ``per_box`` peaks on average (and at most about ``voxels``
    voxels, where given), and their edges are at least :data:`BOX_HALOS`
    halos (or the image's extent, one box along that axis), so that the halo
    lies in the neighbouring boxes and costs at most a few times the core.
    """
    n, ndim = peaks.shape
    halo = np.asarray([int(h) for h in halo], np.int64)
    extent = np.asarray([int(k) for k in shape], np.int64)
    edge = box_edges(shape, halo, n, per_box, voxels)
    cells = tuple(int(c) for c in -(-extent // edge))
    key = np.ravel_multi_index(tuple((peaks // edge).T), cells)
    order = np.argsort(key, kind="stable")
    ordered = key[order]
    present = np.unique(ordered)
    around = np.asarray(list(itertools.product((-1, 0, 1), repeat=ndim)), np.int64)

    def neighbours(at):
        index = np.stack(np.unravel_index(at, cells), axis=-1).astype(np.int64)[..., None, :] + around
        inside = ((index >= 0) & (index < np.asarray(cells))).all(axis=-1)
        return np.ravel_multi_index(tuple(np.moveaxis(index[inside], -1, 0)), cells)

    for at in np.unique(neighbours(present)) if empty else present:
        keys = neighbours(np.asarray([at]))
        near = np.concatenate([order[a:b] for a, b in zip(np.searchsorted(ordered, keys, side="left"),
                                                           np.searchsorted(ordered, keys, side="right"))])
        index = np.asarray(np.unravel_index(int(at), cells), np.int64)
        low, high = index * edge - halo, (index + 1) * edge + halo
        near = near[((peaks[near] >= low) & (peaks[near] < high)).all(axis=1)]
        core = order[np.searchsorted(ordered, at, side="left"):np.searchsorted(ordered, at, side="right")]
        if near.size:
            yield np.sort(core), np.sort(near), np.maximum(low, 0), np.minimum(high, extent)


def box_edges(shape, halo, n, per_box, voxels=None):
    """The edges of :func:`peak_boxes`' boxes for ``n`` peaks in an image of ``shape``."""
    halo = np.asarray([int(h) for h in halo], np.int64)
    extent = np.asarray([int(k) for k in shape], np.int64)
    side = math.ceil((float(np.prod(extent)) * per_box / max(n, 1)) ** (1.0 / len(extent)))
    if voxels is not None:
        side = min(side, max(1, int(round(float(voxels) ** (1.0 / len(extent))))))
    return np.minimum(extent, np.maximum(np.maximum(BOX_HALOS * halo, 1), side))


def worth_boxes(shape, halo, n, per_box, parallel, voxels=None):
    """Whether :func:`peak_boxes`' boxes, ``parallel`` of them at once, beat one call on the whole list: the
    peaks they hold, halos included, over the boxes that run at once, at most :data:`BOX_WORTH` of the list,
    with the peaks spread evenly (the boxes are not built to decide). Never with one call at a time (their
    halos would only add work); ``parallel`` None: always (tests of the boxes themselves)."""
    if parallel is None:
        return True
    if int(parallel) <= 1:
        return False
    edge = box_edges(shape, halo, n, per_box, voxels)
    held, boxes = 1.0, 1
    for length, step, reach in zip((int(k) for k in shape), edge.tolist(), (int(h) for h in halo)):
        starts = range(0, length, step)
        boxes *= len(starts)
        held *= sum(min(length, a + step + reach) - max(0, a - reach) for a in starts) / length
    return boxes > 1 and held / min(int(parallel), boxes) <= BOX_WORTH


def _halo(reach_per_height, heights, spacing):
    """Voxels per axis within ``reach_per_height`` times the highest of the quantised ``heights``."""
    _, quantum = quantize_distance(np.zeros(1, np.float32), spacing)
    reach = reach_per_height * float(np.max(heights)) * quantum
    return [math.ceil(reach / float(s)) for s in spacing]


def on_threads(threads):
    """A ``run`` for this module's functions: the calls on up to ``threads`` threads of this process (NumPy
    releases the GIL in its loops over the boxes' arrays; :func:`~gpu_pipeline._common.each_on_threads`),
    results in order."""
    def run(function, calls):
        results = [None] * len(calls)

        def one(at):
            results[at] = function(*calls[at])
        each_on_threads(one, range(len(calls)), threads)
        return results
    return run


def box_ball_shares(peaks, heights, region, group, tested, spacing, power, shape, only_tested=True):
    """:func:`~gpu_pipeline.stages.peaks.ball_shares` of the ``tested`` peaks among ``peaks`` (a box's peaks
    and those near it), for those peaks only (``only_tested``; else for all peaks, ``tested`` None: all tested)."""
    kept, counted = ball_shares(peaks, heights, region, group, spacing, power=power, tested=tested, shape=shape)
    return (kept[tested], counted[tested]) if only_tested else (kept, counted)


def ball_shares_by_box(peaks, heights, region, group, spacing, *, run, parallel=None, power=True, tested=None,
                       shape=None, per_box=None, whole=None):
    """:func:`~gpu_pipeline.stages.peaks.ball_shares` box by box (:func:`peak_boxes`): the same arrays.

    A peak's count depends only on the peaks whose balls overlap its own
    (Euclidean: within twice its radius): both lie within twice the largest
    radius, the box's halo. Each call counts the tested peaks of one box
    among the peaks of the box and its halo. ``per_box``: peaks per box on
    average (default :data:`PEAKS_PER_BOX`); a list of no more, or boxes not
    worth it with ``parallel`` calls at once (:func:`worth_boxes`), is one
    call of ``whole`` (the same arguments as :func:`box_ball_shares`; default: that, here).
    """
    n = peaks.shape[0]
    per_box = per_box or PEAKS_PER_BOX
    whole = whole or box_ball_shares
    if n <= per_box:
        return whole(peaks, heights, region, group, tested, tuple(spacing), power, shape, False)
    halo = _halo(2.0, heights, spacing)  # twice the largest radius
    extent = peaks.max(axis=0) + 1 if shape is None else shape
    if not worth_boxes(extent, halo, n, per_box, parallel):
        return whole(peaks, heights, region, group, tested, tuple(spacing), power, shape, False)
    tested = np.ones(n, dtype=bool) if tested is None else np.asarray(tested, dtype=bool)
    calls, rows = [], []
    for core, near, _, _ in peak_boxes(peaks, extent, halo, per_box):
        core = core[tested[core]]
        if core.size == 0:
            continue
        mine = np.isin(near, core, assume_unique=True)
        calls.append((peaks[near], heights[near], region[near], None if group is None else group[near], mine,
                      tuple(spacing), power, shape))
        rows.append(core)
    m = unit_ball_samples(peaks.shape[1]).shape[0]
    kept, counted = np.full(n, m, dtype=np.int64), np.full(n, m, dtype=np.int64)
    for core, (box_kept, box_counted) in zip(rows, run(box_ball_shares, calls)):
        kept[core], counted[core] = box_kept, box_counted
    return kept, counted


def box_neck_groups(read, low, high, peaks, heights, region, spacing, ratio, nearby):
    """:func:`~gpu_pipeline.stages.peaks.join_peaks` of ``peaks`` (a box's and those near it) on ``read(low,
    high)``, the box of the distance map: the joined peaks and their group's first peak, both as indices into
    ``peaks``."""
    local = peaks - np.asarray(low, np.int64)  # segment samples are integer steps: the same voxels shifted
    distance_q = None if ratio is None else read(low, high)
    group = join_peaks(local, heights, region, spacing, ratio, lambda i, j: segment_minima(distance_q, local, i, j),
                       nearby=nearby)
    joined = np.flatnonzero(group != np.arange(group.size))
    return joined, group[joined]


def neck_groups_by_box(peaks, heights, region, shape, spacing, ratio, nearby, *, read, run, parallel=None,
                       per_box=None):
    """The groups of :func:`~gpu_pipeline.stages.peaks.join_peaks` on a peak list, box by box
    (:func:`peak_boxes`): the same array; or None for a list of no more than ``per_box`` peaks (default
    :data:`PEAKS_PER_BOX`), or where the boxes are not worth it with ``parallel`` calls at once
    (:func:`worth_boxes`). ``read(low, high)``: the quantised distance map's box (host array).

    join_peaks tests the pairs closer than ``NECK_REACH`` times the sum of
    their heights, and its groups are the connected components of the
    joined pairs, whatever the order (a pair is skipped only when its peaks
    are joined already). Each call groups all the peaks of its box and
    halo with join_peaks (pairs of two halo peaks too), on its box of the
    distance map, and the components of all the boxes' joins are the groups.
    A pair is in the box that holds its midpoint, with its segment, when the
    halo is half the longest pair: ``NECK_REACH`` times the highest peak.
    """
    n, ndim = peaks.shape
    per_box = per_box or PEAKS_PER_BOX
    if n <= per_box:
        return None
    halo = _halo(NECK_REACH.get(ndim, 1.0), heights, spacing)  # half the longest pair
    if not worth_boxes(shape, halo, n, per_box, parallel, voxels=NECK_BOX_VOXELS):
        return None
    calls, near_of = [], []
    for _, near, low, high in peak_boxes(peaks, shape, halo, per_box, voxels=NECK_BOX_VOXELS, empty=True):
        if near.size < 2:
            continue
        calls.append((read, low, high, peaks[near], heights[near], region[near], tuple(spacing), ratio, nearby))
        near_of.append(near)
    pairs = [(near[joined], near[first]) for near, (joined, first) in zip(near_of, run(box_neck_groups, calls))]
    group = np.arange(n, dtype=np.int64)
    if not pairs:
        return group
    return _merge_groups(group, np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs]))
