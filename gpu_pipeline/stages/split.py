"""Connected regions of the mask, split into particles at their peaks (k-means or watershed)."""
from __future__ import annotations

import itertools
import math

from gpu_pipeline._backend import DeclumpError, get_array_module, ops_for
from gpu_pipeline.stages.components import enforce_one_piece, relabel_by_first_voxel
from gpu_pipeline.stages.kmeans import batched_kmeans, per_region_kmeans, to_list

#: Blocks of the candidate grid are margin / BLOCK_DIVISOR wide.
BLOCK_DIVISOR = 3


def peaks_per_region(regions, n_regions, peaks):
    """Region of each peak, and the number of peaks in each region (index 0 = background)."""
    xp = get_array_module(regions)
    peak_region = regions[tuple(peaks.T)].astype(xp.int64)
    return peak_region, xp.bincount(peak_region, minlength=n_regions + 1)


def local_candidates(coords, voxel_region, centres, centre_region, *, spacing, margin):
    """Group voxels by (region, block of a fixed grid) and list each group's candidate centroids.

    A centroid is a candidate for a block when it belongs to the same region
    and lies within ``margin`` (physical) of the block. Blocks are a third
    of ``margin`` wide per axis on a grid anchored at the origin, so the lists
    depend only on coordinates, never on how a volume is cut into chunks. Voxels whose
    block has no candidate of their region fall back to all of the region's
    centroids.

    Returns ``(groups, candidate_offsets, candidate_ids)`` for
    :func:`~gpu_pipeline.stages.kmeans.batched_kmeans`.
    """
    xp = get_array_module(coords)
    ndim = coords.shape[1]
    # Blocks a third of the margin wide: a voxel's list then spans about
    # 2.3 margins per axis instead of 3 with margin-wide blocks.
    block = xp.asarray([max(1, int(math.ceil(margin / BLOCK_DIVISOR / float(s)))) for s in spacing], dtype=xp.int64)
    reach = [int(math.ceil(margin / float(s) / int(b))) for s, b in zip(spacing, to_list(block))]
    scale = xp.asarray([float(s) for s in spacing], dtype=xp.float64)
    grid = (coords.max(axis=0) // block + 1) if coords.shape[0] else xp.ones(ndim, dtype=xp.int64)
    grid = xp.maximum(grid, (centres.max(axis=0) // block).astype(xp.int64) + 1)
    strides = xp.concatenate([xp.cumprod(grid[::-1])[::-1][1:], xp.ones(1, dtype=xp.int64)])
    n_blocks = int(xp.prod(grid))
    n_centres = centres.shape[0]
    home = xp.floor(centres / block).astype(xp.int64)
    pair_keys, pair_ids = [], []
    for offset in itertools.product(*[range(-r, r + 1) for r in reach]):
        nb = home + xp.asarray(offset, dtype=xp.int64)
        inside = ((nb >= 0) & (nb < grid)).all(axis=1)
        low, high = nb * block, (nb + 1) * block - 1
        gap = xp.maximum(xp.maximum(low - centres, centres - high), 0) * scale
        near = inside & ((gap * gap).sum(axis=1) <= margin * margin)
        pair_keys.append(centre_region[near] * n_blocks + (nb[near] * strides).sum(axis=1))
        pair_ids.append(xp.flatnonzero(near))
    # Fallback lists, one per region, keyed after every block key.
    fallback_base = (int(centre_region.max()) + 1) * n_blocks
    pair_keys.append(fallback_base + centre_region)
    pair_ids.append(xp.arange(n_centres, dtype=xp.int64))
    keys, ids = xp.concatenate(pair_keys), xp.concatenate(pair_ids)
    order = xp.lexsort(xp.stack([ids, keys]))
    keys, ids = keys[order], ids[order]
    unique_keys, starts = xp.unique(keys, return_index=True)
    offsets = xp.concatenate([starts, xp.asarray([keys.size])]).astype(xp.int64)

    voxel_keys = voxel_region * n_blocks + ((coords // block) * strides).sum(axis=1)
    groups = xp.searchsorted(unique_keys, voxel_keys)
    found = (groups < unique_keys.size) & (unique_keys[xp.minimum(groups, unique_keys.size - 1)] == voxel_keys)
    fallback = xp.searchsorted(unique_keys, fallback_base + voxel_region)
    return xp.where(found, groups, fallback), offsets, ids


def split_regions_kmeans(regions, n_regions, peaks, radii, *, spacing, assignment="power",
                         engine="batched", max_iter=10, margin=None):
    """Split every region holding k > 1 peaks into k particles by k-means on voxel coordinates.

    Regions with zero or one peak stay whole. Centroids start at the peaks;
    distances are physical (``spacing``). See :mod:`gpu_pipeline.stages.kmeans`
    for the ``assignment`` rules. ``margin`` (physical, default 1.5 times
    the largest peak radius) bounds how far from a voxel its candidate
    centroids may lie (:func:`local_candidates`). Returns labels (not yet
    renumbered) and the number of Lloyd updates run.
    """
    xp = get_array_module(regions)
    if assignment not in ("power", "euclidean"):
        raise DeclumpError(f"assignment must be 'power' or 'euclidean', got {assignment!r}")
    peak_region, k = peaks_per_region(regions, n_regions, peaks)
    multi = k >= 2
    multi[0] = False
    labels = regions.astype(xp.int64)
    if not bool(multi.any()):
        return labels, 0
    # Peaks of the regions to split, grouped by region (C order inside each).
    keep = multi[peak_region]
    order = xp.argsort(peak_region[keep], kind="stable")
    centres = peaks[keep][order].astype(xp.float64)
    centre_region = peak_region[keep][order]
    centre_radii = radii[keep][order]

    flat = xp.flatnonzero(multi[regions].ravel())
    coords = xp.stack(xp.unravel_index(flat, regions.shape), axis=1).astype(xp.int64)
    voxel_region = regions.ravel()[flat].astype(xp.int64)
    if engine == "batched":
        if margin is None:
            margin = 1.5 * float(centre_radii.max())
        groups, offsets, ids = local_candidates(coords, voxel_region, centres, centre_region,
                                                spacing=spacing, margin=float(margin))
        chosen, _, n_iter = batched_kmeans(coords, groups, offsets, ids, centres, spacing=spacing,
                                           radii=centre_radii if assignment == "power" else None,
                                           max_iter=max_iter)
    else:
        if assignment != "euclidean":
            raise DeclumpError(f"kmeans_engine={engine!r} supports assignment='euclidean' only; "
                               "use kmeans_engine='batched' for the size-aware power assignment")
        group_of_region = xp.cumsum(multi) - 1
        chosen = per_region_kmeans(coords, group_of_region[voxel_region], centres, group_of_region[centre_region],
                                   spacing=spacing, max_iter=max(1, max_iter), engine=engine)
        n_iter = max_iter
    labels.ravel()[flat] = n_regions + 1 + chosen
    return labels, n_iter


def region_markers(regions, n_regions, peaks, distance):
    """Watershed markers: one per peak, plus the highest voxel of each region without a peak."""
    xp = get_array_module(regions)
    ops = ops_for(regions)
    markers = xp.zeros(regions.shape, dtype=xp.int32)
    markers[tuple(peaks.T)] = xp.arange(1, peaks.shape[0] + 1, dtype=xp.int32)
    _, k = peaks_per_region(regions, n_regions, peaks)
    flat_regions = regions.ravel().astype(xp.int64)
    inside = xp.flatnonzero(flat_regions)
    # Highest voxel per region, ties to the first in C order.
    key = distance.ravel()[inside].astype(xp.int64) * regions.size + (regions.size - 1 - inside)
    best = xp.full(n_regions + 1, -1, dtype=xp.int64)
    ops.scatter_max(best, flat_regions[inside], key)
    empty = xp.flatnonzero(k == 0)
    empty = empty[empty > 0]
    if empty.size:
        top = regions.size - 1 - (best[empty] % regions.size)
        markers.ravel()[top] = peaks.shape[0] + 1 + xp.arange(empty.size, dtype=xp.int32)
    return markers


def split_regions_watershed(mask, regions, n_regions, peaks, distance):
    """Watershed of the negated distance map from the peaks, inside the mask (the classical method)."""
    markers = region_markers(regions, n_regions, peaks, distance)
    return ops_for(mask).watershed(-distance, markers, mask)


def finish_labels(labels):
    """One piece per particle, ids 1..n in C order of first voxel."""
    return relabel_by_first_voxel(enforce_one_piece(labels))
