"""Compiled CPU kernels (Numba) for the steps that are sequential by nature.

Both backends call them on host arrays: their inputs are short lists of
coordinates (peak candidates), not voxels, so a GPU run copies them over.
"""
from __future__ import annotations

import itertools

import numpy as np
from numba import njit

from gpu_pipeline._common import each_on_threads
from gpu_pipeline.array_algorithms import DENSE_ID_SPAN


@njit(cache=True, nogil=True)
def _greedy_spacing(coords, half, cell, span):  # pragma: no cover - compiled; tested through greedy_spacing
    n, ndim = coords.shape
    keep = np.zeros(n, dtype=np.bool_)
    low = coords[0].copy()
    high = coords[0].copy()
    for i in range(n):
        for a in range(ndim):
            low[a] = min(low[a], coords[i, a])
            high[a] = max(high[a], coords[i, a])
    # Two points of one cell interact, so a cell holds at most one kept
    # point; a conflicting kept point lies within `span` cells per axis. Only
    # span[0] + 1 slabs of cells along the first axis are live at a time
    # (points come in C order): a ring that keeps the table to a few
    # cross-sections of the bounding box.
    dims = np.ones(ndim, dtype=np.int64)
    widths = np.ones(ndim, dtype=np.int64)
    slab = 1
    n_offsets = 1
    for a in range(1, ndim):
        dims[a] = (high[a] - low[a]) // cell[a] + 1
        widths[a] = 2 * span[a] + 1
        slab *= dims[a]
        n_offsets *= widths[a]
    ring = span[0] + 1
    table = np.full((ring, slab), -1, dtype=np.int64)
    kept_list = np.empty(n, dtype=np.int64)
    n_kept = 0
    cleared = 0
    own = np.empty(ndim, dtype=np.int64)
    for i in range(n):
        for a in range(ndim):
            own[a] = (coords[i, a] - low[a]) // cell[a]
        k = own[0]
        # Forget kept points `ring` or more slabs back (their slots are reused).
        while cleared < n_kept:
            j = kept_list[cleared]
            kj = (coords[j, 0] - low[0]) // cell[0]
            if kj > k - ring:
                break
            key = 0
            for a in range(1, ndim):
                key = key * dims[a] + (coords[j, a] - low[a]) // cell[a]
            table[kj % ring, key] = -1
            cleared += 1
        blocked = False
        for slab_k in range(max(0, k - span[0]), k + 1):
            if blocked:
                break
            for o in range(n_offsets):
                rest = o
                key = 0
                stride = 1
                inside = True
                for a in range(ndim - 1, 0, -1):
                    c = own[a] + rest % widths[a] - span[a]
                    rest //= widths[a]
                    if c < 0 or c >= dims[a]:
                        inside = False
                        break
                    key += c * stride
                    stride *= dims[a]
                if not inside:
                    continue
                j = table[slab_k % ring, key]
                if j < 0:
                    continue
                # find_peaks' interaction: (d / h)^2 summed over the axes below 1, d = 0 where h = 0.
                norm = 0.0
                near = True
                for a in range(ndim):
                    d = coords[j, a] - coords[i, a]
                    if half[a] == 0:
                        if d != 0:
                            near = False
                            break
                    else:
                        t = d / half[a]
                        norm = norm + t * t
                if near and norm < 1.0:
                    blocked = True
                    break
        if not blocked:
            keep[i] = True
            key = 0
            for a in range(1, ndim):
                key = key * dims[a] + own[a]
            table[k % ring, key] = i
            kept_list[n_kept] = i
            n_kept += 1
    return keep


def greedy_spacing(coords, half_widths):
    """Which of ``coords`` (sorted in C order) the greedy C-order spacing keeps.

    A point is kept when no point kept before it lies strictly inside the
    ellipsoid of half-widths ``half_widths`` around it: ``sum((d / h)^2) <
    1`` over the axes, with ``d = 0`` required on axes where ``h = 0`` (the
    interaction of :func:`gpu_pipeline.stages.peaks.find_peaks`). Time and
    memory grow linearly with the points (plus a few cross-sections of their
    bounding box, in cells about ``h / sqrt(ndim)`` voxels wide), whatever
    their density.

    Parameters
    ----------
    coords : ndarray (n, ndim) of int, NumPy, sorted in C order
    half_widths : sequence of int >= 0, one per axis

    Returns
    -------
    keep : ndarray (n,) of bool
    """
    coords = np.ascontiguousarray(coords, dtype=np.int64)
    if coords.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    half = np.asarray([max(0, int(h)) for h in half_widths], dtype=np.int64)
    cell, span = spacing_cells(half)
    return _greedy_spacing(coords, half, cell, span)


@njit(cache=True, nogil=True)
def _any_higher(values, coords, alive, steps, near, limit2, hit):  # pragma: no cover - compiled; see any_higher
    nz, ny, nx = values.shape
    bounded = near.size > 0
    for a in range(alive.size):
        c = alive[a]
        z, y, x = coords[c, 0], coords[c, 1], coords[c, 2]
        value = values[z, y, x]
        for s in range(steps.shape[0]):
            if bounded and not near[s] <= limit2[c]:
                continue
            zz = min(max(z + steps[s, 0], 0), nz - 1)
            yy = min(max(y + steps[s, 1], 0), ny - 1)
            xx = min(max(x + steps[s, 2], 0), nx - 1)
            if values[zz, yy, xx] > value:
                hit[a] = True
                break


def any_higher(values, coords, alive, steps, near=None, limit2=None):
    """For each coordinate ``coords[alive]``: whether a voxel at one of the offsets ``steps`` from it (edges
    replicated) is higher than it, with ``near`` (squared length per offset) and ``limit2`` (per coordinate)
    counting only the offsets where ``near <= limit2``. The test of
    :func:`gpu_pipeline.stages.peaks._none_higher` for one slab of offsets, a coordinate at a time, leaving at
    the first higher voxel (bool over ``alive``)."""
    values = np.asarray(values)
    pad = 3 - values.ndim
    values3 = values.reshape((1,) * pad + values.shape)
    def wide(a):  # (m, 3) int64: a volume's coordinates as they are (no copy), others with leading zeros
        a = np.asarray(a, dtype=np.int64).reshape(-1, values.ndim)
        return np.ascontiguousarray(np.pad(a, ((0, 0), (pad, 0))) if pad else a)

    hit = np.zeros(np.size(alive), dtype=bool)
    empty = np.zeros(0, dtype=np.float64)
    _any_higher(values3, wide(coords), np.ascontiguousarray(alive, dtype=np.int64), wide(steps),
                empty if near is None else np.ascontiguousarray(near, dtype=np.float64),
                empty if limit2 is None else np.ascontiguousarray(limit2, dtype=np.float64), hit)
    return hit


@njit(cache=True, nogil=True)
def _ball_takes(i, j, peaks, scale, radius, weight, region, group, tested, power, unit, taken):  # pragma: no cover
    ndim = peaks.shape[1]
    m = unit.shape[0]
    d = np.empty(ndim, dtype=np.float64)
    for k in range(i.size):
        p, q = i[k], j[k]
        if region[p] != region[q] or group[p] == group[q]:
            continue
        gap2 = 0.0
        for a in range(ndim):
            d[a] = float(peaks[p, a] - peaks[q, a]) * scale[a]
            gap2 += d[a] * d[a]
        near = radius[p] + radius[q] if power else 2.0 * max(radius[p], radius[q])
        if not gap2 < near * near:
            continue
        for side in range(2):
            mine, theirs, sign = (p, q, 1.0) if side == 0 else (q, p, -1.0)
            if not tested[mine]:
                continue
            bound = weight[theirs] - weight[mine] - gap2
            twice = 2.0 * radius[mine]
            for s in range(m):
                along = (sign * d[0]) * unit[s, 0]
                for a in range(1, ndim):
                    along = along + (sign * d[a]) * unit[s, a]
                if twice * along < bound:
                    taken[mine, s >> 3] |= np.uint8(1 << (7 - (s & 7)))


def ball_takes(i, j, peaks, scale, radius, weight, region, group, tested, power, unit, taken):
    """The samples of inscribed balls that other peaks take, for the candidate pairs ``(i, j)``: the test of
    :func:`gpu_pipeline.stages.peaks.ball_shares` a pair at a time, its bits set in ``taken`` in place.

    A pair counts where both peaks share a region and not a group and lie
    closer than the sum of their radii (``power``) or twice the larger one;
    then each of the two that is ``tested`` loses the samples ``u`` of its
    ball (``unit``, (m, ndim)) where ``2 r_p (d . u) < w_q - w_p - |d|^2``
    (``d = p - q``, physical, from ``p``'s side). Same operations, in the same
    order, as the array code, so the same bits.
    """
    _ball_takes(np.ascontiguousarray(i, dtype=np.int64), np.ascontiguousarray(j, dtype=np.int64),
                np.ascontiguousarray(peaks, dtype=np.int64), np.ascontiguousarray(scale, dtype=np.float64),
                np.ascontiguousarray(radius, dtype=np.float64), np.ascontiguousarray(weight, dtype=np.float64),
                np.ascontiguousarray(region, dtype=np.int64), np.ascontiguousarray(group, dtype=np.int64),
                np.ascontiguousarray(tested, dtype=np.bool_), bool(power),
                np.ascontiguousarray(unit, dtype=np.float64), taken)


def spacing_cells(half):
    """Cells of :func:`greedy_spacing`: the width per axis in which any two points interact, and how many
    cells away an interacting point can lie.

    Interacting points differ by at most ``h - 1`` on each axis; cells ``w``
    wide with ``sum(((w - 1) / h)^2) < 1`` hold interacting points only.
    """
    half = [int(h) for h in half]
    root = max(1, sum(h > 0 for h in half)) ** 0.5
    cell = [max(1, int(np.ceil(h / root))) if h > 0 else 1 for h in half]
    while sum(((w - 1) / h) ** 2 for w, h in zip(cell, half) if h > 0) >= 1:  # a guard on the float bound
        cell = [max(1, w - 1) for w in cell]
    span = [(max(0, h - 1) + w - 1) // w for h, w in zip(half, cell)]
    return np.asarray(cell, dtype=np.int64), np.asarray(span, dtype=np.int64)


@njit(cache=True, nogil=True)
def _nearest_candidate(coords, groups, offsets, ids, centre_phys, neg_power, scale):  # pragma: no cover - compiled
    n, ndim = coords.shape
    out = np.empty(n, dtype=np.int64)
    for v in range(n):
        g = groups[v]
        best = -1
        best_d = np.inf
        for t in range(offsets[g], offsets[g + 1]):
            c = ids[t]
            d = neg_power[c]
            for a in range(ndim):
                diff = coords[v, a] * scale[a] - centre_phys[c, a]
                d += diff * diff
            if best < 0 or d < best_d:
                best, best_d = c, d
        out[v] = best
    return out


def nearest_candidate(coords, groups, offsets, ids, centre_phys, neg_power, scale):
    """Per voxel, the candidate of its group with the smallest ``neg_power + |x * scale - centre_phys|^2``.

    The same sums, in the same order, as :func:`~gpu_pipeline.stages.kmeans.batched_kmeans`'s array
    code (ties: the first in the list, lists ascending), one pass over the voxels with no
    (voxels x candidates) temporaries.
    """
    return _nearest_candidate(np.ascontiguousarray(coords, dtype=np.int64), np.ascontiguousarray(groups, np.int64),
                              np.ascontiguousarray(offsets, np.int64), np.ascontiguousarray(ids, np.int64),
                              np.ascontiguousarray(centre_phys, np.float64), np.ascontiguousarray(neg_power, np.float64),
                              np.ascontiguousarray(scale, np.float64))


@njit(cache=True, nogil=True)
def _block_groups(coords, voxel_region, block, strides, n_blocks, unique_keys, fallback_base):  # pragma: no cover
    n, ndim = coords.shape
    groups = np.empty(n, dtype=np.int64)
    n_fallback = 0
    for v in range(n):
        key = voxel_region[v] * n_blocks
        for a in range(ndim):
            key += (coords[v, a] // block[a]) * strides[a]
        g = np.searchsorted(unique_keys, key)
        if g >= unique_keys.size or unique_keys[g] != key:
            g = np.searchsorted(unique_keys, fallback_base + voxel_region[v])
            n_fallback += 1
        groups[v] = g
    return groups, n_fallback


def block_groups(coords, voxel_region, block, strides, n_blocks, unique_keys, fallback_base):
    """Per voxel, the index in ``unique_keys`` of its (region, block) key, else of its region's fallback key.

    The voxel side of :func:`~gpu_pipeline.stages.split.local_candidates` in one pass (the array
    form builds several (voxels x ndim) temporaries). Returns ``(groups, n_fallback)``.
    """
    return _block_groups(np.ascontiguousarray(coords, dtype=np.int64), np.ascontiguousarray(voxel_region, np.int64),
                         np.ascontiguousarray(block, np.int64), np.ascontiguousarray(strides, np.int64),
                         int(n_blocks), np.ascontiguousarray(unique_keys, np.int64), int(fallback_base))


@njit(cache=True, nogil=True)
def _block_pairs(centres, chosen, centre_region, block, grid, strides, n_blocks, scale, margin2, shifts,
                 keys, ids):  # pragma: no cover - compiled; tested through block_pairs
    ndim = centres.shape[1]
    home = np.empty(ndim, dtype=np.int64)
    n = 0
    for j in range(chosen.size):
        i = chosen[j]
        for a in range(ndim):
            home[a] = np.int64(np.floor(centres[i, a] / block[a]))
        base = centre_region[i] * n_blocks
        for s in range(shifts.shape[0]):
            inside = True
            total = 0.0
            key = base
            for a in range(ndim):
                nb = home[a] + shifts[s, a]
                if nb < 0 or nb >= grid[a]:
                    inside = False
                    break
                c = centres[i, a]
                g = max(max(nb * block[a] - c, c - ((nb + 1) * block[a] - 1)), 0.0) * scale[a]
                total += g * g
                key += nb * strides[a]
            if inside and total <= margin2:
                if keys.size:
                    keys[n] = key
                    ids[n] = i
                n += 1
    return n


def block_pairs(centres, chosen, centre_region, block, grid, strides, n_blocks, scale, margin, shifts):
    """Every (region-and-block key, centroid) pair of :func:`~gpu_pipeline.stages.split.block_lists`, in one pass.

    The array form builds (centroids x shifts x ndim) temporaries; this counts the pairs, then writes
    them, in the same order (centroid by centroid, shift by shift). Returns ``(keys, ids)``.
    """
    args = (np.ascontiguousarray(centres, np.float64), np.ascontiguousarray(chosen, np.int64),
            np.ascontiguousarray(centre_region, np.int64), np.ascontiguousarray(block, np.int64),
            np.ascontiguousarray(grid, np.int64), np.ascontiguousarray(strides, np.int64), int(n_blocks),
            np.ascontiguousarray(scale, np.float64), float(margin) * float(margin),
            np.ascontiguousarray(shifts, np.int64))
    none = np.empty(0, dtype=np.int64)
    n = _block_pairs(*args, none, none)
    keys, ids = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
    _block_pairs(*args, keys, ids)
    return keys, ids


@njit(cache=True, nogil=True)
def _assign_in_cells(regions, multi, block, strides, n_blocks, keys, offsets, ids, fallback_base, centre_phys,
                     power, scale, first_axis, cell, prune_width, centre_value, labels, origin):  # pragma: no cover
    shape = regions.shape
    n_fallback = 0
    per_cell = cell[0] * cell[1] * cell[2]
    slot_key = np.empty(per_cell, dtype=np.int64)
    slot_group = np.empty(per_cell, dtype=np.int64)
    low = np.empty((per_cell, 3), dtype=np.int64)
    high = np.empty((per_cell, 3), dtype=np.int64)
    voxel_slot = np.empty(per_cell, dtype=np.int64)
    widest = 0
    for g in range(offsets.size - 1):
        widest = max(widest, offsets[g + 1] - offsets[g])
    kept = np.empty(widest, dtype=np.int64)
    lower = np.empty(widest, dtype=np.float64)
    x = np.zeros(3, dtype=np.int64)
    for z0 in range(0, shape[0], cell[0]):
        for y0 in range(0, shape[1], cell[1]):
            for x0 in range(0, shape[2], cell[2]):
                z1, y1, x1 = min(z0 + cell[0], shape[0]), min(y0 + cell[1], shape[1]), min(x0 + cell[2], shape[2])
                # Pass 1: the (region, block) groups present in this cell and each one's bounding box.
                n_slots = 0
                i = 0
                for z in range(z0, z1):
                    for y in range(y0, y1):
                        for xx in range(x0, x1):
                            r = regions[z, y, xx]
                            if not multi[r]:
                                voxel_slot[i] = -1
                                i += 1
                                continue
                            x[0], x[1], x[2] = z + origin[0], y + origin[1], xx + origin[2]
                            key = r * n_blocks
                            for a in range(3):
                                key += (x[a] // block[a]) * strides[a]
                            s = 0
                            while s < n_slots and slot_key[s] != key:
                                s += 1
                            if s == n_slots:
                                g = np.searchsorted(keys, key)
                                if g >= keys.size or keys[g] != key:
                                    g = np.searchsorted(keys, fallback_base + r)
                                    if g >= keys.size or keys[g] != fallback_base + r:
                                        return -1  # the lists hold none of this region's centroids
                                    slot_group[s] = -1 - g  # marks a fallback slot, to count its voxels
                                else:
                                    slot_group[s] = g
                                slot_key[s] = key
                                for a in range(3):
                                    low[s, a], high[s, a] = x[a], x[a]
                                n_slots += 1
                            for a in range(3):
                                low[s, a] = min(low[s, a], x[a])
                                high[s, a] = max(high[s, a], x[a])
                            voxel_slot[i] = s
                            i += 1
                for s in range(n_slots):
                    if slot_group[s] < 0:
                        slot_group[s] = -1 - slot_group[s]
                        for j in range(i):
                            if voxel_slot[j] == s:
                                n_fallback += 1
                # Pass 2, per group: its list (pruned to the centroids that can be nearest
                # in its box when wide, as prune_candidates does), then its voxels.
                for s in range(n_slots):
                    g = slot_group[s]
                    n_kept = 0
                    if offsets[g + 1] - offsets[g] <= prune_width:
                        for t in range(offsets[g], offsets[g + 1]):
                            kept[n_kept] = ids[t]
                            n_kept += 1
                    else:
                        bound = np.inf
                        for t in range(offsets[g], offsets[g + 1]):
                            c = ids[t]
                            near_sum = 0.0
                            far_sum = 0.0
                            for a in range(first_axis, 3):
                                lo, hi, at = low[s, a] * scale[a], high[s, a] * scale[a], centre_phys[c, a]
                                near = max(max(lo - at, at - hi), 0.0)
                                far = max(abs(lo - at), abs(hi - at))
                                near_sum += near * near
                                far_sum += far * far
                            lower[t - offsets[g]] = near_sum - power[c]
                            bound = min(bound, far_sum - power[c])
                        for t in range(offsets[g], offsets[g + 1]):
                            c = ids[t]
                            if lower[t - offsets[g]] <= bound + 1e-9 * (abs(bound) + power[c] + 1.0):
                                kept[n_kept] = c
                                n_kept += 1
                    i = 0
                    for z in range(z0, z1):
                        for y in range(y0, y1):
                            for xx in range(x0, x1):
                                if voxel_slot[i] == s:
                                    x[0], x[1], x[2] = z + origin[0], y + origin[1], xx + origin[2]
                                    best = -1
                                    best_d = np.inf
                                    for t in range(n_kept):
                                        c = kept[t]
                                        d = -power[c]
                                        for a in range(first_axis, 3):
                                            diff = x[a] * scale[a] - centre_phys[c, a]
                                            d += diff * diff
                                        if best < 0 or d < best_d:
                                            best, best_d = c, d
                                    labels[z, y, xx] = centre_value[best]
                                i += 1
    return n_fallback


def assign_in_cells(regions, multi, block, strides, n_blocks, keys, offsets, ids, fallback_base, centre_phys, power,
                    scale, centre_value, labels, *, cell, prune_width, origin=None):
    """The whole-volume power assignment in one compiled pass over cells of ``cell`` voxels per axis.

    For every voxel of a ``multi`` region, the candidate of its (region,
    block) list (:func:`~gpu_pipeline.stages.split.local_candidates`: key
    ``region * n_blocks + block``, else its region's fallback key) with the
    smallest ``|x * scale - centre_phys|^2 - power``, ties to the first in the
    list, the same sums in the same order as :func:`nearest_candidate`; its
    label becomes ``centre_value[chosen]``, written into ``labels`` in place.
    Lists wider than ``prune_width`` are first cut, per (list, cell), to the
    centroids that can be nearest in the box of its voxels, by the rule of
    :func:`~gpu_pipeline.stages.kmeans.prune_candidates` (so no choice
    changes). No per-voxel temporaries: the voxels are read from ``regions``.
    ``origin`` (index units, default 0): where ``regions``' first voxel sits
    in the volume that the lists and ``centre_phys`` refer to (a chunk's
    position). Returns the number of voxels that fell back to their region's
    full list, or -1 (labels partly written) when a voxel's region has no
    list at all (lists built from a subset of the centroids).
    """
    ndim = regions.ndim
    if origin is None:
        origin = (0,) * ndim
    pad = 3 - ndim

    def padded(values, fill, dtype):
        return np.ascontiguousarray(np.concatenate([np.full(pad, fill), np.asarray(values)]).astype(dtype))

    phys = np.zeros((centre_phys.shape[0], 3), dtype=np.float64)
    phys[:, pad:] = centre_phys
    return _assign_in_cells(np.ascontiguousarray(regions).reshape((1,) * pad + regions.shape),
                            np.ascontiguousarray(multi, dtype=np.bool_), padded(block, 1, np.int64),
                            padded(strides, 0, np.int64), int(n_blocks), np.ascontiguousarray(keys, np.int64),
                            np.ascontiguousarray(offsets, np.int64), np.ascontiguousarray(ids, np.int64),
                            int(fallback_base), phys, np.ascontiguousarray(power, np.float64),
                            padded(scale, 1.0, np.float64), pad, padded(cell, 1, np.int64), int(prune_width),
                            np.ascontiguousarray(centre_value, np.int64),
                            labels.reshape((1,) * pad + labels.shape), padded([int(o) for o in origin], 0, np.int64))


@njit(cache=True, nogil=True)
def _quantize(values, quantum, out):  # pragma: no cover - compiled; tested through quantize
    for i in range(values.size):
        q = np.rint(np.float64(values[i]) / quantum)
        if not (-2147483648.0 <= q <= 2147483647.0):  # inf, nan, out of range: NumPy's own cast decides
            return False
        out[i] = np.int32(q)
    return True


def quantize(values, quantum):
    """``rint(values.astype(float64) / quantum).astype(int32)`` in one pass, no float64 temporary.

    The same division and rounding (half to even) per value; an array with a
    value the cast cannot hold exactly (inf, nan, beyond int32) goes through
    that NumPy expression instead, so the result is always NumPy's.
    """
    values = np.asarray(values)
    out = np.empty(values.shape, dtype=np.int32)
    if values.size and _quantize(np.ascontiguousarray(values).reshape(-1), float(quantum), out.reshape(-1)):
        return out
    return np.rint(values.astype(np.float64) / quantum).astype(np.int32)


@njit(cache=True, nogil=True)
def _find_root(parent, v):  # pragma: no cover - compiled
    root = v
    while parent[root] != root:
        root = parent[root]
    while parent[v] != root:  # path compression
        parent[v], v = root, parent[v]
    return root


@njit(cache=True, nogil=True)
def _label_runs(values, out):  # pragma: no cover - compiled; tested through label_by_value
    # Pass 1 of label_by_value, run by run: a run is a stretch of one non-zero value along a row (the last
    # axis). Its first voxel is its node: every voxel of the run points at it, and the run is joined to each
    # stretch of the same value that touches it in the row before and in the plane before, one union per
    # stretch (a stretch lies in one run there). Unions keep the smaller root, so every parent is a smaller
    # index and a component's root is its first voxel; a voxel of a run is a child of its run's first voxel,
    # so a find may start at any voxel. The parents are kept in the output itself. Returns the number of
    # components (runs less the unions that joined two sets).
    nz, ny, nx = values.shape
    flat = values.reshape(-1)
    parent = out.reshape(-1)
    plane = ny * nx
    roots = 0
    for z in range(nz):
        for y in range(ny):
            row = (z * ny + y) * nx
            x = 0
            while x < nx:
                v = row + x
                value = flat[v]
                if value == 0:
                    x += 1
                    continue
                end = x + 1
                parent[v] = v
                roots += 1
                while end < nx and flat[row + end] == value:
                    parent[row + end] = v
                    end += 1
                for before, step in ((v - nx, y > 0), (v - plane, z > 0)):
                    if not step:
                        continue
                    touching = False
                    for i in range(end - x):
                        same = flat[before + i] == value
                        if same and not touching:
                            a, b = _find_root(parent, before + i), _find_root(parent, v)
                            if a < b:
                                parent[b] = a
                                roots -= 1
                            elif b < a:
                                parent[a] = b
                                roots -= 1
                        touching = same
                x = end
    return roots


@njit(cache=True, nogil=True)
def _label_ids(values, out, sizes):  # pragma: no cover - compiled; tested through label_by_value
    # Pass 2 of label_by_value, in C order: ids 1..n by each component's first voxel (its root). A voxel's
    # parent is an earlier voxel of its component, which already holds the component's id. With a non-empty
    # `sizes` (n + 1 long), the voxels of each id, 0 the background, counted on the way; -1 where more ids than
    # that turn up (pass 1 miscounted: no write beyond `sizes`).
    flat = values.reshape(-1)
    parent = out.reshape(-1)
    count = sizes.size > 0
    n = 0
    for v in range(flat.size):
        if flat[v] == 0:
            parent[v] = 0
        elif parent[v] == v:
            n += 1
            if count and n >= sizes.size:
                return -1
            parent[v] = n
        else:
            parent[v] = parent[parent[v]]
        if count:
            sizes[parent[v]] += 1
    return n


def label_by_value(values, return_count=False, return_sizes=False, out=None):
    """Face-connected components of equal non-zero value, int32 ids 1..n by first voxel in C order; with
    ``return_count`` also n (the kernel counts them: no pass over the labels for their maximum), with
    ``return_sizes`` also the voxels per id 0..n (int64, ``np.bincount`` of the labels), counted as the ids
    are written. ``out``: an int32 C-contiguous array of ``values``' shape to write the ids into (a
    caller's buffer, whose pages a fresh array would have to fault in again: 0.15-0.2 s of a 256x512x512
    labelling on the 2-core VM); the skimage path for other shapes ignores it.

    The partition and numbering of ``skimage.measure.label(values,
    background=0, connectivity=1)`` in two compiled passes (union-find over
    the runs of each row, the parents kept in the output), without its
    conversions of the input.
    """
    values = np.ascontiguousarray(values)
    shape3 = (1,) * (3 - values.ndim) + values.shape if values.ndim <= 3 else None
    if shape3 is None or values.size >= 2**31 - 1:
        from skimage.measure import label as sk_label

        out, n = sk_label(values, background=0, connectivity=1, return_num=True)
        out = out.astype(np.int32, copy=False)
        sizes = np.bincount(out.ravel(), minlength=n + 1).astype(np.int64) if return_sizes else None
    else:
        if out is None:
            out = np.empty(values.shape, dtype=np.int32)
        elif out.shape != values.shape or out.dtype != np.int32 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous int32 array of shape {values.shape}, got "
                             f"{out.dtype} {out.shape}")
        if values.dtype == np.bool_:
            values = values.view(np.uint8)
        values, flat_out = values.reshape(shape3), out.reshape(shape3)
        roots = _label_runs(values, flat_out)
        sizes = np.zeros(roots + 1 if return_sizes else 0, dtype=np.int64)
        n = _label_ids(values, flat_out, sizes)
        if return_sizes and n != roots:
            raise RuntimeError(f"labelling counted {roots} components and numbered {n}")
    extra = ((int(n),) if return_count else ()) + ((sizes,) if return_sizes else ())
    return (out, *extra) if extra else out


@njit(cache=True, nogil=True)
def _piece_stats(pieces, labels, piece_label, piece_size, piece_first):  # pragma: no cover - compiled; tested through piece_stats
    for i in range(pieces.size):
        p = pieces[i]
        piece_label[p] = labels[i]
        if piece_size[p] == 0:
            piece_first[p] = i
        piece_size[p] += 1


def piece_stats(pieces, labels):
    """Label, size and first flat index (C order) of every piece (index = piece id), one pass: see
    :func:`~gpu_pipeline.stages.components.piece_stats`."""
    pieces, labels = np.ascontiguousarray(pieces).reshape(-1), np.ascontiguousarray(labels).reshape(-1)
    n_pieces = int(pieces.max()) if pieces.size else 0
    piece_label = np.zeros(n_pieces + 1, dtype=np.int64)
    piece_size = np.zeros(n_pieces + 1, dtype=np.int64)
    piece_first = np.full(n_pieces + 1, pieces.size, dtype=np.int64)
    _piece_stats(pieces, labels, piece_label, piece_size, piece_first)
    return piece_label, piece_size, piece_first


@njit(cache=True, nogil=True)
def _face_sides(pieces, labels, other, shape, out_piece, out_other, fill):  # pragma: no cover - compiled
    # Every voxel with its next neighbour along each axis, in one sweep over the (planes, rows, columns) arrays.
    nz, ny, nx = shape
    plane = ny * nx
    count = 0
    for z in range(nz):
        for y in range(ny):
            row = (z * ny + y) * nx
            for x in range(nx):
                i = row + x
                pa = pieces[i]
                if pa == 0:
                    continue
                la = labels[i]
                for j, step in ((i + 1, x + 1 < nx), (i + nx, y + 1 < ny), (i + plane, z + 1 < nz)):
                    if not step:
                        continue
                    pb = pieces[j]
                    if pb != 0 and labels[j] != la:
                        if fill:
                            out_piece[count], out_other[count] = pa, other[j]
                            out_piece[count + 1], out_other[count + 1] = pb, other[i]
                        count += 2
    return count


def face_sides(pieces, labels, other=None):
    """Both sides of every face between voxels of different non-zero labels: ``(piece, the other side's label)``.

    ``other``: what is reported of the other side instead of its label (the
    pieces themselves: which piece touches which). One compiled sweep over
    the voxels, each with its next neighbour along every axis, to count and
    one to fill (int64 arrays), in no particular order: the input of
    :func:`~gpu_pipeline.stages.components.face_pairs_between_labels`
    (which sorts and counts them) without a boolean copy of the volume per
    comparison.
    """
    pieces, labels = np.ascontiguousarray(pieces), np.ascontiguousarray(labels)
    other = labels if other is None else np.ascontiguousarray(other)
    if pieces.ndim > 3:
        raise ValueError(f"face_sides takes 1-3D arrays, got {pieces.ndim}D")
    shape = (1,) * (3 - pieces.ndim) + pieces.shape
    flat_pieces, flat_labels, flat_other = pieces.reshape(-1), labels.reshape(-1), other.reshape(-1)
    empty = np.zeros(0, dtype=np.int64)
    count = _face_sides(flat_pieces, flat_labels, flat_other, shape, empty, empty, False)
    a, b = np.empty(count, dtype=np.int64), np.empty(count, dtype=np.int64)
    _face_sides(flat_pieces, flat_labels, flat_other, shape, a, b, True)
    return a, b


@njit(cache=True, nogil=True)
def _histogram(values, low, factor, integer, counts):  # pragma: no cover - compiled; tested through the histogram
    top = counts.size - 1
    for i in range(values.size):
        v = np.float64(values[i])
        if not np.isfinite(v):
            return False
        index = int(v - low) if integer else int(np.floor((v - low) * factor))
        counts[min(max(index, 0), top)] += 1
    return True


def histogram(values, low, high, nbins, integer):
    """Counts per bin of :func:`~gpu_pipeline.stages.threshold.bin_index` in one pass (None: a non-finite value).

    The same float64 arithmetic per value as ``bin_index`` (offset from
    ``low``, truncated for integer bins, else scaled by ``nbins / (high -
    low)`` and floored; clipped to the bins), without its temporaries.
    """
    counts = np.zeros(int(nbins), dtype=np.int64)
    factor = 0.0 if integer else float(nbins) / (float(high) - float(low))
    if _histogram(np.ascontiguousarray(values).reshape(-1), float(low), factor, bool(integer), counts):
        return counts
    return None


@njit(cache=True, nogil=True)
def _area_and_covered(labels, covered_mask, area, covered):  # pragma: no cover - compiled
    for i in range(labels.size):
        area[labels[i]] += 1
        if covered_mask[i]:
            covered[labels[i]] += 1


def area_and_covered(labels, covered_mask, count):
    """Voxels per label (0..count) and how many of them ``covered_mask`` holds, one pass (int64)."""
    area = np.zeros(count + 1, dtype=np.int64)
    covered = np.zeros(count + 1, dtype=np.int64)
    _area_and_covered(np.ascontiguousarray(labels).reshape(-1), np.ascontiguousarray(covered_mask).reshape(-1),
                      area, covered)
    return area, covered


@njit(cache=True, nogil=True)
def _label_sizes(labels, sizes):  # pragma: no cover - compiled; tested through label_sizes
    for i in range(labels.size):
        sizes[labels[i]] += 1


def label_sizes(labels, count):
    """Voxels per label 0..count (int64): ``np.bincount(labels.ravel(), minlength=count + 1)`` in one compiled
    pass, about 2.5 times faster."""
    sizes = np.zeros(count + 1, dtype=np.int64)
    _label_sizes(np.ascontiguousarray(labels).reshape(-1), sizes)
    return sizes


@njit(cache=True, nogil=True)
def _mark_labels(labels, present):  # pragma: no cover - compiled; tested through labels_present
    for i in range(labels.size):
        present[labels[i]] = True


def labels_present(labels, count):
    """Which labels 0..count occur in ``labels`` (bool): ``present[labels.ravel()] = True`` in one compiled
    pass, without NumPy's conversion of the index to intp (about 7 ms for a 128^3 int32 block)."""
    present = np.zeros(count + 1, dtype=bool)
    _mark_labels(np.ascontiguousarray(labels).reshape(-1), present)
    return present


@njit(cache=True, nogil=True)
def _scatter_min(target, index, values):  # pragma: no cover - compiled; tested through scatter
    for i in range(index.size):
        v = values[i]
        if v < target[index[i]] or v != v:  # NaN wins, as in np.minimum
            target[index[i]] = v


@njit(cache=True, nogil=True)
def _scatter_max(target, index, values):  # pragma: no cover - compiled; tested through scatter
    for i in range(index.size):
        v = values[i]
        if v > target[index[i]] or v != v:
            target[index[i]] = v


def scatter(target, index, values, highest):
    """``np.maximum.at(target, index, values)`` (``highest``) or ``np.minimum.at``, compiled, for a 1D target
    and equally long 1D ``index`` and ``values``; anything else (a scalar, other shapes) goes to the ufunc."""
    ufunc = np.maximum if highest else np.minimum
    if (np.ndim(target) != 1 or np.ndim(index) != 1 or np.ndim(values) != 1 or len(index) != len(values)
            or not np.issubdtype(np.asarray(index).dtype, np.integer) or not target.flags.writeable
            or np.result_type(target, values) != target.dtype):
        ufunc.at(target, index, values)
        return
    if len(index) and (int(index.min()) < 0 or int(index.max()) >= len(target)):
        ufunc.at(target, index, values)  # (negative indices wrap there, and out of range raises)
        return
    (_scatter_max if highest else _scatter_min)(target, np.ascontiguousarray(index),
                                                np.ascontiguousarray(values))


#: Rows of more values than this are filtered this many at a time by :func:`_running_max` (its forward and backward
#: runs held for one tile of columns, not for whole rows). A volume's first axis has rows of a whole plane: 2 x 264
#: rows of 512x512 int32 (554 MB, fresh pages every call) made its pass 0.35-0.79 s on 256x512x512, and 0.13 s in
#: tiles of 1024 (2026-12-07, the 2-core VM, one thread; 512 and 4096 within 10 %). Shorter rows keep the
#: untiled loop, which the compiler vectorises better (the second axis's 512: 0.03 s against 0.13 s tiled).
RUNNING_MAX_TILE = 1024


@njit(cache=True, nogil=True)
def _running_max_columns(src, dst, h, o, k0, k1, forward, backward):  # pragma: no cover - compiled
    # _running_max of slab o for the columns [k0, k1) only, the runs in forward / backward (rows of k1 - k0).
    n = src.shape[1]
    w = 2 * h + 1
    m = n + 2 * h
    for i in range(m):
        j = min(max(i - h, 0), n - 1)
        if i % w == 0:
            for k in range(k0, k1):
                forward[i, k - k0] = src[o, j, k]
        else:
            for k in range(k0, k1):
                forward[i, k - k0] = max(forward[i - 1, k - k0], src[o, j, k])
    for i in range(m - 1, -1, -1):
        j = min(max(i - h, 0), n - 1)
        if i % w == w - 1 or i == m - 1:
            for k in range(k0, k1):
                backward[i, k - k0] = src[o, j, k]
        else:
            for k in range(k0, k1):
                backward[i, k - k0] = max(backward[i + 1, k - k0], src[o, j, k])
    for i in range(n):
        for k in range(k0, k1):
            dst[o, i, k] = max(backward[i, k - k0], forward[i + w - 1, k - k0])


@njit(cache=True, nogil=True)
def _running_max(src, dst, h):  # pragma: no cover - compiled; tested through maximum_filter
    # Max over 2h+1 along axis 1 of (outer, n, inner), edges replicated: van Herk / Gil-Werman,
    # about three comparisons per value whatever h, rows of `inner` values at a time (RUNNING_MAX_TILE at a
    # time where longer). dst may be src: a slab's columns are read whole into forward and backward before
    # their results are written.
    outer, n, inner = src.shape
    w = 2 * h + 1
    m = n + 2 * h
    if inner > RUNNING_MAX_TILE:
        forward = np.empty((m, RUNNING_MAX_TILE), src.dtype)
        backward = np.empty((m, RUNNING_MAX_TILE), src.dtype)
        for o in range(outer):
            for k0 in range(0, inner, RUNNING_MAX_TILE):
                _running_max_columns(src, dst, h, o, k0, min(k0 + RUNNING_MAX_TILE, inner), forward, backward)
        return
    forward = np.empty((m, inner), src.dtype)
    backward = np.empty((m, inner), src.dtype)
    for o in range(outer):
        for i in range(m):
            j = min(max(i - h, 0), n - 1)
            for k in range(inner):
                forward[i, k] = src[o, j, k] if i % w == 0 else max(forward[i - 1, k], src[o, j, k])
        for i in range(m - 1, -1, -1):
            j = min(max(i - h, 0), n - 1)
            for k in range(inner):
                backward[i, k] = src[o, j, k] if (i % w == w - 1 or i == m - 1) else max(backward[i + 1, k],
                                                                                         src[o, j, k])
        for i in range(n):
            for k in range(inner):
                dst[o, i, k] = max(backward[i, k], forward[i + w - 1, k])


@njit(cache=True, nogil=True)
def _running_max_last(src, dst, h):  # pragma: no cover - compiled; the contiguous axis of _running_max
    # Each row padded with its edge values, then maxima over runs of 1, 2, 4, ... values (s doubling while
    # 2s <= 2h + 1) in passes the compiler vectorises; a window of 2h + 1 is then two runs of s that overlap.
    # (van Herk's forward and backward runs, one value at a time, took 0.28-0.35 s on 67 M values against
    # 0.19-0.21 s: the window restarts at every (2h + 1)-th value there, a branch per value.) dst may be src.
    rows, n = src.shape
    w = 2 * h + 1
    m = n + 2 * h
    cur = np.empty(m, src.dtype)
    for o in range(rows):
        row = src[o]
        for i in range(h):
            cur[i] = row[0]
            cur[m - 1 - i] = row[n - 1]
        for i in range(n):
            cur[h + i] = row[i]
        s = 1
        while 2 * s <= w:
            for i in range(m - s):
                a = cur[i]
                b = cur[i + s]
                cur[i] = a if a > b else b
            s *= 2
        out = dst[o]
        for i in range(n):
            a = cur[i]
            b = cur[i + w - s]
            out[i] = a if a > b else b


@njit(cache=True, nogil=True)
def _gaussian_rows(a, weights):  # pragma: no cover - compiled; tested through gaussian_filter
    # Correlate axis 1 of (outer, n, inner) in place with a symmetric kernel (weights[0] the centre, weights[j]
    # at +-j), edges replicated, a row of `inner` values at a time. Row i is written once its sum is made; the
    # sums below it read the originals of the r rows before it from a ring (rows after it are still original).
    # The sums are SciPy's, in its order and in float64 (centre first, then the pairs from the outermost in),
    # so the float32 result is SciPy's bit for bit.
    outer, n, inner = a.shape
    r = weights.shape[0] - 1
    ring = np.empty((max(r, 1), inner), np.float32)
    acc = np.empty(inner, np.float64)
    for o in range(outer):
        for i in range(n):
            centre = a[o, i]
            for k in range(inner):
                acc[k] = np.float64(centre[k]) * weights[0]
            for j in range(r, 0, -1):
                row = max(i - j, 0)
                before = centre if row == i else ring[row % r]  # row i (only at i = 0) is still original
                after = a[o, min(i + j, n - 1)]
                w = weights[j]
                for k in range(inner):
                    acc[k] += (np.float64(before[k]) + np.float64(after[k])) * w
            if r > 0:
                ring[i % r] = centre  # row i's original, needed by the next r rows; then row i is written
            for k in range(inner):
                centre[k] = np.float32(acc[k])


@njit(cache=True, nogil=True)
def _gaussian_last(a, weights):  # pragma: no cover - compiled; tested through gaussian_filter
    # The contiguous axis of 2D (rows, n) float32 `a`, in place, 16 rows at a time: copied side by side into a
    # float64 block with each row's edge values repeated r more times, then _gaussian_rows' sums in its order
    # with the rows as the inner loop. (SciPy's own line pass gives the same values as fast, but holds the
    # GIL: chunks on threads of one process waited for each other.)
    rows, n = a.shape
    r = weights.shape[0] - 1
    width = 16
    block = np.empty((n + 2 * r, width), np.float64)
    acc = np.empty(width, np.float64)
    for first in range(0, rows, width):
        b = min(width, rows - first)
        for k in range(b):
            row = a[first + k]
            for i in range(r):
                block[i, k] = row[0]
                block[n + r + i, k] = row[n - 1]
            for i in range(n):
                block[i + r, k] = row[i]
        for i in range(n):
            w = weights[0]
            for k in range(b):
                acc[k] = block[i + r, k] * w
            for j in range(r, 0, -1):
                w = weights[j]
                for k in range(b):
                    acc[k] += (block[i + r - j, k] + block[i + r + j, k]) * w
            for k in range(b):
                a[first + k, i] = np.float32(acc[k])


def gaussian_half_kernel(sigma, truncate):
    """SciPy's normalised 1D Gaussian weights (``_gaussian_kernel1d``, order 0) from the centre out."""
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / (float(sigma) * float(sigma)) * x ** 2)
    return np.ascontiguousarray((phi / phi.sum())[radius:])


def gaussian_filter(image, sigma, truncate):
    """``scipy.ndimage.gaussian_filter(image as float32, sigma, mode="nearest", truncate=truncate)``, bit for bit.

    SciPy filters one axis after another; along every axis but the last its
    lines are strided, and that pass costs 3-5 times the contiguous one. Here
    those axes are one compiled pass each over whole rows (contiguous inner
    loops), and the last axis one over each row, with SciPy's sums in SciPy's
    order, so every value is SciPy's; the passes release the GIL. Every pass
    works in place on one float32 copy of the input (the input is never
    written; a ring of ``radius`` rows is the only other buffer), so the
    smoothing holds the input and one float32 volume, as SciPy's does for
    float32 input and one volume less for integer input. Axes with sigma 0
    are skipped, as in SciPy.
    """
    out = np.array(image, dtype=np.float32, order="C")  # a copy: the passes write into it
    if out.size == 0:  # (Dask asks a chunk function for its output type on an empty array)
        return out
    sigma = np.broadcast_to(np.asarray(sigma, dtype=np.float64), (out.ndim,))
    for axis in range(out.ndim):
        if sigma[axis] <= 1e-15:
            continue
        inner = int(np.prod(out.shape[axis + 1:]))
        weights = gaussian_half_kernel(sigma[axis], truncate)
        if inner == 1:  # the contiguous axis: one row at a time
            _gaussian_last(out.reshape(-1, out.shape[axis]), weights)
            continue
        shape = (int(np.prod(out.shape[:axis])), out.shape[axis], inner)
        _gaussian_rows(out.reshape(shape), weights)
    return out


def maximum_filter(array, size):
    """``scipy.ndimage.maximum_filter(array, size, mode="nearest")`` for integer arrays and odd sizes, else None.

    One compiled pass per axis (van Herk / Gil-Werman): about three
    comparisons per value whatever the window, against SciPy's per-axis
    filter. Max is exact, so the result is SciPy's value for value.
    """
    array = np.asarray(array)
    size = [int(s) for s in size]
    if array.dtype.kind not in "iu" or any(s < 1 or s % 2 == 0 for s in size) or len(size) != array.ndim:
        return None
    # One copy, filtered in place axis by axis: each slab (row) of an axis is read whole into the kernel's
    # running buffers before its results are written, so the input and output may be one array. (A new array
    # per axis held two volume-sized arrays at once: 1 GiB of int32 at 512^3, and fresh pages for each.)
    out = np.array(array, order="C", copy=True)
    for axis, s in enumerate(size):
        if s == 1 or array.shape[axis] <= 1:
            continue
        shape = (int(np.prod(array.shape[:axis])), array.shape[axis], int(np.prod(array.shape[axis + 1:])))
        if shape[2] == 1:
            _running_max_last(out.reshape(shape[:2]), out.reshape(shape[:2]), (s - 1) // 2)
        else:
            _running_max(out.reshape(shape), out.reshape(shape), (s - 1) // 2)
    return out


@njit(cache=True, nogil=True)
def _local_maxima(values, min_value, out):  # pragma: no cover - compiled; tested through local_maxima
    # values, out: 3D (a 1D/2D array padded with leading axes of 1). A voxel below min_value is not looked at;
    # the others stop at their first higher neighbour (along the slope: most stop at once).
    n0, n1, n2 = values.shape
    for i in range(n0):
        for j in range(n1):
            for k in range(n2):
                v = values[i, j, k]
                if not (v >= min_value):
                    continue
                top = True
                for a in range(max(i - 1, 0), min(i + 2, n0)):
                    for b in range(max(j - 1, 0), min(j + 2, n1)):
                        for c in range(max(k - 1, 0), min(k + 2, n2)):
                            if values[a, b, c] > v:
                                top = False
                                break
                        if not top:
                            break
                    if not top:
                        break
                out[i, j, k] = top


def local_maxima(values, min_value):
    """``(values == maximum_filter(values, 3, mode="nearest")) & (values >= min_value)`` in one compiled pass,
    for 1-3D integer or float arrays; else None. Replicated edges add no higher value, so the box is cut at
    the array's faces."""
    values = np.asarray(values)
    if not (1 <= values.ndim <= 3) or values.dtype.kind not in "iuf":
        return None
    pad = (None,) * (3 - values.ndim)
    out = np.zeros(values.shape, dtype=bool)
    _local_maxima(values[pad], np.result_type(values.dtype, min_value).type(min_value), out[pad])
    return out


@njit(cache=True, nogil=True)
def _append(buffer, count, value):  # pragma: no cover - compiled
    if count == buffer.size:
        grown = np.empty(2 * buffer.size, np.int64)
        grown[:count] = buffer
        buffer = grown
    buffer[count] = value
    return buffer


@njit(cache=True, nogil=True)
def _box_maxima(values, maxed, min_value, lo, hi, check):  # pragma: no cover - compiled; tested through box_maxima
    # values, maxed: 3D (a 1D/2D array padded with leading axes of 1); lo, hi: the core per axis; check: the
    # axes whose face neighbours constrain a candidate. Flat C-order indices of both sets, in order.
    n0, n1, n2 = values.shape
    maxima = np.empty(1024, np.int64)
    maybe = np.empty(1024, np.int64)
    n_max = 0
    n_maybe = 0
    for i in range(lo[0], hi[0]):
        for j in range(lo[1], hi[1]):
            for k in range(lo[2], hi[2]):
                v = values[i, j, k]
                if not (v > min_value):
                    continue
                flat = (i * n1 + j) * n2 + k
                if v == maxed[i, j, k]:
                    maxima = _append(maxima, n_max, flat)
                    n_max += 1
                    continue
                if check[0] and ((i > 0 and not (v >= values[i - 1, j, k]))
                                 or (i < n0 - 1 and not (v >= values[i + 1, j, k]))):
                    continue
                if check[1] and ((j > 0 and not (v >= values[i, j - 1, k]))
                                 or (j < n1 - 1 and not (v >= values[i, j + 1, k]))):
                    continue
                if check[2] and ((k > 0 and not (v >= values[i, j, k - 1]))
                                 or (k < n2 - 1 and not (v >= values[i, j, k + 1]))):
                    continue
                maybe = _append(maybe, n_maybe, flat)
                n_maybe += 1
    return maxima[:n_max], maybe[:n_maybe]


def box_maxima(values, maxed, min_value, half_widths, core=None):
    """``gpu_pipeline.array_algorithms.box_maxima`` in one compiled pass over the core, or None where it does
    not apply (not 1-3D, not integer or float, ``maxed`` of another type or shape).

    ``min_value`` is compared in the type NumPy would compare it in.
    """
    values, maxed = np.asarray(values), np.asarray(maxed)
    ndim = values.ndim
    if not (1 <= ndim <= 3) or maxed.dtype != values.dtype or maxed.shape != values.shape:
        return None
    if not (values.dtype.kind == "f" or (values.dtype.kind in "iu" and values.dtype.itemsize <= 4)):
        return None
    core = core if core is not None else (slice(None),) * ndim
    bounds = [c.indices(n) for c, n in zip(core, values.shape)]
    if any(step != 1 for _, _, step in bounds):
        return None
    pad = 3 - ndim
    lo = np.asarray([0] * pad + [max(0, b[0]) for b in bounds], np.int64)
    hi = np.asarray([1] * pad + [max(b[0], b[1]) for b in bounds], np.int64)
    check = np.asarray([False] * pad + [int(h) >= 1 and n >= 2 for h, n in zip(half_widths, values.shape)])
    pad_axes = (None,) * pad  # leading axes of 1 as views: a window of a larger array is not copied
    # min_value in the type NumPy compares ``values > min_value`` in (a Python float against float32 values:
    # float32), so that the threshold rounds as it does there.
    threshold = np.result_type(values.dtype, min_value).type(min_value)
    maxima, maybe = _box_maxima(values[pad_axes], maxed[pad_axes], threshold, lo, hi, check)
    as_coords = (lambda flat: np.stack(np.unravel_index(flat, values.shape), axis=1).astype(np.int64)
                 if flat.size else np.zeros((0, ndim), np.int64))
    return as_coords(maxima), as_coords(maybe)


@njit(cache=True, nogil=True)
def _id_range(labels):  # pragma: no cover - compiled; tested through label_sums
    # labels: 3D, as _label_sums reads them (a window of a larger array is read in place, not raveled to a copy).
    lo, hi = np.int64(0), np.int64(-1)
    n0, n1, n2 = labels.shape
    for i in range(n0):
        for j in range(n1):
            for k in range(n2):
                v = labels[i, j, k]
                if v != 0:
                    if hi < lo:
                        lo = hi = np.int64(v)
                    elif v < lo:
                        lo = np.int64(v)
                    elif v > hi:
                        hi = np.int64(v)
    return lo, hi


@njit(cache=True, nogil=True)
def _label_sums(labels, image, with_image, lo, count, sums, low, high, intensity):  # pragma: no cover - compiled
    # labels, image: 3D (leading axes of 1 for 1D/2D); per id - lo: voxels, coordinate sums, bounds, intensity,
    # accumulated in C order (the order NumPy's bincount adds them in).
    n0, n1, n2 = labels.shape
    for i in range(n0):
        for j in range(n1):
            for k in range(n2):
                v = labels[i, j, k]
                if v == 0:
                    continue
                s = np.int64(v) - lo
                count[s] += 1
                sums[0, s] += i
                sums[1, s] += j
                sums[2, s] += k
                if i < low[0, s]:
                    low[0, s] = i
                if i > high[0, s]:
                    high[0, s] = i
                if j < low[1, s]:
                    low[1, s] = j
                if j > high[1, s]:
                    high[1, s] = j
                if k < low[2, s]:
                    low[2, s] = k
                if k > high[2, s]:
                    high[2, s] = k
                if with_image:
                    intensity[s] += np.float64(image[i, j, k])


def label_sums(labels, image=None):
    """``gpu_pipeline.array_algorithms.label_sums`` in two compiled passes (the ids' range, then the sums),
    or None where it does not apply: not 1-3D, not integer labels, an image of another shape, ids spread
    over more than ``DENSE_ID_SPAN`` per voxel (sparse ids: the sort of the array version then costs less)."""
    labels = np.asarray(labels)
    ndim = labels.ndim
    if not (1 <= ndim <= 3) or not (labels.dtype.kind == "i" or (labels.dtype.kind == "u" and labels.dtype.itemsize <= 4)):
        return None  # uint64 ids do not all fit the int64 arithmetic
    if image is not None and (np.shape(image) != labels.shape or np.asarray(image).dtype.kind not in "iuf"):
        return None
    pad = (None,) * (3 - ndim)
    lo, hi = _id_range(labels[pad])
    span = int(hi - lo + 1)
    if span > DENSE_ID_SPAN * labels.size + 1024:
        return None
    count = np.zeros(span, np.int64)
    sums = np.zeros((3, span), np.float64)
    low = np.full((3, span), np.iinfo(np.int64).max, np.int64)
    high = np.full((3, span), -1, np.int64)
    intensity = np.zeros(span if image is not None else 0, np.float64)
    values = np.asarray(image)[pad] if image is not None else labels[pad]
    _label_sums(labels[pad], values, image is not None, lo, count, sums, low, high, intensity)
    present = np.flatnonzero(count)
    axes = slice(3 - ndim, 3)
    return {"label": present + lo, "count": count[present], "sum": sums[axes, present],
            "low": low[axes, present], "high": high[axes, present],
            "intensity": intensity[present] if image is not None else None}


@njit(cache=True, nogil=True)
def _envelope_run(f, lo, hi, start, end, step2, v, z, out):  # pragma: no cover - compiled
    # out[q] for q in [start, end) = min over j in [lo, hi] of f[j] + step2 * (q - j)**2 (finite f[j] only; inf
    # where there is none): the lower envelope of the parabolas rooted at f[lo..hi] (Felzenszwalb &
    # Huttenlocher, "Distance transforms of sampled functions", 2012), in float64.
    top = -1
    s = 0.0
    for q in range(lo, hi + 1):
        fq = f[q]
        if fq == np.inf:
            continue
        if top < 0:
            top = 0
            v[0] = q
            z[0] = -np.inf
            z[1] = np.inf
            continue
        while True:
            p = v[top]
            s = ((fq + step2 * q * q) - (f[p] + step2 * p * p)) / (2.0 * step2 * (q - p))
            if s <= z[top] and top > 0:
                top -= 1
            else:
                break
        top += 1  # (z[0] is -inf: the first parabola is never popped)
        v[top] = q
        z[top] = s
        z[top + 1] = np.inf
    if top < 0:
        for q in range(start, end):
            out[q] = np.inf
        return
    j = 0
    for q in range(start, end):
        while z[j + 1] < q:
            j += 1
        d = np.float64(q - v[j])
        out[q] = f[v[j]] + step2 * d * d


#: A run of foreground bounded by zeros whose parabolas (its values and the two zeros) number at most this many
#: takes the direct minimum over them at each of its voxels (:func:`_nearest_run`), the rest the lower envelope
#: (:func:`_envelope_run`): the envelope's per-parabola work (a division, a stack whose pops the branch predictor
#: cannot foresee) costs more than a short run's few candidates. Measured 2026-12-07 on the 2-core VM, one
#: thread, the 256x512x512 bench foreground (23 % of the voxels; particles of radius 5-12): its second axis's
#: pass 0.46-0.49 -> 0.41-0.44 s, its third's 0.38-0.45 -> 0.34-0.43 s (16, 32 and 48 tried: 24 and 32 best);
#: the same float32 values, also with squared spacings 0.1369, 0.25, 1.69, 2.0.
NEAREST_RUN_PARABOLAS = 24


@njit(cache=True, nogil=True)
def _nearest_run(f, lo, hi, start, end, step2, out):  # pragma: no cover - compiled; see distance_transform
    # _envelope_run's out[start:end] as the minimum over all of f[lo..hi]'s parabolas at each voxel, each value
    # computed as the envelope computes its chosen one (inf where none is finite).
    for q in range(start, end):
        best = np.inf
        for j in range(lo, hi + 1):
            d = np.float64(q - j)
            value = f[j] + step2 * d * d
            if value < best:
                best = value
        out[q] = best


@njit(cache=True, nogil=True)
def _envelope_line(f, line, step2, v, z, out):  # pragma: no cover - compiled; see distance_transform
    # One line of _envelope_lines: `f` its values in float64, `line` where the results go (the line itself, or
    # `f` again: a run's results are written once its envelope is made, and later runs read only their own
    # values and the zeros that bound them).
    n = f.shape[0]
    q = 0
    while q < n:
        if f[q] == 0.0:
            q += 1
            continue
        start = q
        while q < n and f[q] != 0.0:
            q += 1
        end = q  # the run [start, end); zeros at start - 1 and end where those are inside the line
        lo, hi = max(start - 1, 0), min(end, n - 1)
        if hi - lo < NEAREST_RUN_PARABOLAS:
            _nearest_run(f, lo, hi, start, end, step2, out)
        else:
            _envelope_run(f, lo, hi, start, end, step2, v, z, out)
        for i in range(start, end):
            line[i] = out[i]


@njit(cache=True, nogil=True)
def _envelope_lines(a, step2, outer_range, inner_range):  # pragma: no cover - compiled; see distance_transform
    # Axis 1 of (outer, n, inner) float32 `a`, in place, lines (o, :, k) of the given ranges: each value becomes
    # min over j of a[o, j, k] + step2 * (i - j)**2, and stays inf where the line has no finite value. Zeros
    # (background) bound the runs of other values: no voxel of a run is nearer anything beyond the zero at
    # either end, so each run is one envelope over itself and those two zeros, and background costs one read.
    # In float64, stored as float32: where the squared spacings are whole numbers every value is exact.
    n = a.shape[1]
    f = np.empty(n, np.float64)
    out = np.empty(n, np.float64)
    v = np.empty(n, np.int64)
    z = np.empty(n + 1, np.float64)
    for o in range(outer_range[0], outer_range[1]):
        for k in range(inner_range[0], inner_range[1]):
            any_run = False
            for q in range(n):
                f[q] = np.float64(a[o, q, k])
                any_run = any_run or f[q] != 0.0
            if any_run:
                _envelope_line(f, a[o, :, k], step2, v, z, out)


@njit(cache=True, nogil=True)
def _envelope_lines_tiled(a, step2, outer_range, inner_range, tile):  # pragma: no cover - compiled
    # _envelope_lines for an axis whose values lie far apart in memory (a wide volume's second axis):
    # `tile` neighbouring lines are read together, a row of `tile` values at a time, into a buffer, transformed
    # there and written back the same way, instead of one value per cache line and page along each line.
    n = a.shape[1]
    buf = np.empty((tile, n), np.float64)
    out = np.empty(n, np.float64)
    v = np.empty(n, np.int64)
    z = np.empty(n + 1, np.float64)
    for o in range(outer_range[0], outer_range[1]):
        for k0 in range(inner_range[0], inner_range[1], tile):
            w = min(tile, inner_range[1] - k0)
            any_run = False
            for q in range(n):
                for t in range(w):
                    value = np.float64(a[o, q, k0 + t])
                    buf[t, q] = value
                    any_run = any_run or value != 0.0
            if not any_run:
                continue
            for t in range(w):
                _envelope_line(buf[t], buf[t], step2, v, z, out)
            for q in range(n):  # (float32 -> float64 -> float32 keeps the values no run changed)
                for t in range(w):
                    a[o, q, k0 + t] = np.float32(buf[t, q])


#: Lines whose neighbouring values lie at least this many bytes apart are transformed :data:`ENVELOPE_TILE` at
#: a time (:func:`_envelope_lines_tiled`). Measured 2026-12-06 on the 2-core VM, one thread: a 4096^2 mask's
#: transform 0.269 -> 0.194 s (its first axis 0.141 -> 0.065 s), 256x512x512 1.57 -> 1.28 s (its first axis
#: 0.50 -> 0.30 s); a volume's second axis (2 KiB apart) got slower tiled, 0.56 -> 0.7-0.9 s, and stays untiled.
#: Since 2026-12-07 the first axis has a pass of its own (:func:`_first_axis`), whose rows are contiguous; a
#: further axis is tiled where a volume is at least 2048 voxels wide.
ENVELOPE_TILE_STRIDE = 8192
ENVELOPE_TILE = 8


#: Smaller masks are transformed on the calling thread whatever ``threads`` asks (2D figure panels, crops).
SPLIT_MIN_VOXELS = 1 << 20


def _lines_kernel(inner, itemsize):
    """The kernel for an axis whose neighbouring lines lie ``inner`` values of ``itemsize`` bytes apart, called as
    ``kernel(lines, step2, outer_range, inner_range)``: tiled (:data:`ENVELOPE_TILE` lines at a time) from
    :data:`ENVELOPE_TILE_STRIDE` bytes, else one line at a time."""
    if inner * itemsize >= ENVELOPE_TILE_STRIDE:
        return lambda *arguments: _envelope_lines_tiled(*arguments, ENVELOPE_TILE)
    return _envelope_lines


@njit(cache=True, nogil=True)
def _first_axis(mask, a, step2, inner_range):  # pragma: no cover - compiled; see distance_transform
    # The first axis's pass straight from the mask: (n, inner) uint8 `mask` (0: background) into float32 `a`,
    # the lines along axis 0 of the columns in inner_range. Each voxel gets step2 * d**2 (in float64, stored as
    # float32), d the steps to its line's nearest background voxel (0 on background), inf where the line has
    # none: what the lower envelope gives a line of zeros and infs. Forward (steps since the last background,
    # n + 1 for none: whole numbers, exact in float32), then backward, a row of columns at a time.
    n = mask.shape[0]
    lo, hi = inner_range
    if n == 0:
        return
    far = np.float32(n + 1)
    for k in range(lo, hi):
        a[0, k] = far if mask[0, k] != 0 else np.float32(0.0)
    for q in range(1, n):
        for k in range(lo, hi):
            a[q, k] = min(a[q - 1, k] + np.float32(1.0), far) if mask[q, k] != 0 else np.float32(0.0)
    after = np.full(hi - lo, far, np.float32)  # per column, the steps to its next background below this row
    for q in range(n - 1, -1, -1):
        for k in range(lo, hi):
            b = min(after[k - lo] + np.float32(1.0), far) if mask[q, k] != 0 else np.float32(0.0)
            after[k - lo] = b
            d = np.float64(min(a[q, k], b))  # (0 on background, whose forward count is 0)
            a[q, k] = np.float32(np.inf) if d > n else np.float32(step2 * d * d)


def _first_pass(mask, a, step, threads):
    """:func:`_first_axis` over all of C-ordered ``a`` from the C-ordered boolean ``mask``, its columns split
    between at most ``threads`` threads."""
    n = a.shape[0]
    inner = a.size // n
    edges = np.linspace(0, inner, max(1, min(int(threads), inner)) + 1).astype(np.int64)
    ranges = [(int(lo), int(hi)) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]
    columns, out, step2 = mask.view(np.uint8).reshape(n, inner), a.reshape(n, inner), float(step) * float(step)
    each_on_threads(lambda r: _first_axis(columns, out, step2, r), ranges, len(ranges))


def _windowed_pass(a, axis, step2, window):
    """One pass of :func:`distance_transform` with a ``window``: the lines along ``axis`` (1 or more) of
    C-ordered ``a`` whose coordinates on the axes before it lie in ``window`` (on one thread)."""
    shape = a.shape
    inner = int(np.prod(shape[axis + 1:], dtype=np.int64))
    # Per index of the axes before the last one before `axis` (none, or the first in 3D), a contiguous slab
    # whose lines along `axis` are numbered by the last of them: the window's range of those.
    before = window[:axis - 1]
    jobs = [(a[index].reshape(shape[axis - 1], shape[axis], inner), (window[axis - 1].start, window[axis - 1].stop))
            for index in itertools.product(*(range(w.start, w.stop) for w in before))]
    kernel = _lines_kernel(inner, a.itemsize)
    for lines, outer in jobs:
        if outer[1] > outer[0]:
            kernel(lines, step2, outer, (0, inner))


def distance_transform(mask, spacing, threads=1, window=None):
    """Exact Euclidean distance of each foreground (True) voxel of a 1-3D ``mask`` to the nearest background
    voxel, physical units, float32; inf everywhere where there is no background (the image's edge is not
    background). Separable: along the first axis each voxel's steps to its line's nearest background, counted
    in two sweeps straight from the mask (:func:`_first_axis`), then along each further axis the lower envelope
    of parabolas (:func:`_envelope_lines`), in compiled kernels that release the GIL, so chunks on threads of
    one process run at once; ``threads`` > 1 splits each axis's lines between that many threads (a whole image
    in memory).

    ``window`` (slices, one per axis): only that part of the transform is returned, and each axis's pass
    runs only on the lines whose coordinates on the axes before it lie in the window (the later passes read
    no others): a chunk's core and the peak window around it, in a block whose halo only serves the
    transform (3D 162^3 with 136^3 wanted: 2.54 passes' worth of lines instead of 3), one thread."""
    # C order whatever the mask's: the lines below are views of C-ordered arrays (a reshape of another order
    # would be a copy the kernel writes into and drops).
    mask = np.ascontiguousarray(np.asarray(mask, dtype=bool))
    shape = mask.shape
    if len(spacing) != mask.ndim:
        raise ValueError(f"spacing has {len(spacing)} values for a {mask.ndim}D mask")
    if mask.size < SPLIT_MIN_VOXELS:
        threads = 1  # (starting threads would cost more than they save)
    a = np.empty(shape, dtype=np.float32)
    if a.size:  # every value written by the first axis's pass (all its lines: the later passes read any)
        _first_pass(mask, a, spacing[0], 1 if window is not None else threads)
    if window is not None:
        window = tuple(slice(*w.indices(n)[:2]) for w, n in zip(window, shape))
        for axis in range(1, mask.ndim):
            _windowed_pass(a, axis, float(spacing[axis]) * float(spacing[axis]), window)
        part = a[window]
        return np.sqrt(part, out=part)
    for axis in range(1, mask.ndim):
        step = spacing[axis]
        lines = a.reshape(int(np.prod(shape[:axis], dtype=np.int64)), shape[axis],
                          int(np.prod(shape[axis + 1:], dtype=np.int64)))
        outer, _, inner = lines.shape
        # Split the lines along whichever of outer / inner is longer, at most `threads` parts.
        parts = max(1, min(int(threads), max(outer, inner)))
        split_outer = outer >= inner
        edges = np.linspace(0, outer if split_outer else inner, parts + 1).astype(np.int64)
        ranges = [((int(lo), int(hi)), (0, inner)) if split_outer else ((0, outer), (int(lo), int(hi)))
                  for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]
        step2 = float(step) * float(step)
        kernel = _lines_kernel(inner, a.itemsize)
        each_on_threads(lambda r: kernel(lines, step2, *r), ranges, len(ranges))
    return np.sqrt(a, out=a)
