"""Connected regions of the mask, split into particles at their peaks (k-means or watershed)."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from gpu_pipeline._backend import DeclumpError, get_array_module, ops_for
from gpu_pipeline.stages.components import one_piece_rounds
from gpu_pipeline.stages.kmeans import BLOCK_ELEMENTS, PRUNE_CELL, batched_kmeans, per_region_kmeans, to_list

#: Blocks of the candidate grid are margin / BLOCK_DIVISOR wide.
BLOCK_DIVISOR = 3

#: The CPU's whole-volume assignment prunes, per cell, the candidate lists wider than this.
CELL_PRUNE_WIDTH = 8


def peaks_per_region(regions, n_regions, peaks):
    """Region of each peak, and the number of peaks in each region (index 0 = background)."""
    xp = get_array_module(regions)
    peak_region = regions[tuple(peaks.T)].astype(xp.int64)
    return peak_region, xp.bincount(peak_region, minlength=n_regions + 1)


def local_candidates(coords, voxel_region, centres, centre_region, *, spacing, margin, listed=None):
    """Group voxels by (region, block of a fixed grid) and list each group's candidate centroids.

    A centroid is a candidate for a block when it belongs to the same region
    and lies within ``margin`` (physical) of the block. Blocks are a third
    of ``margin`` wide per axis on a grid anchored at the origin, so the lists
    depend only on coordinates, never on how a volume is cut into chunks. Voxels whose
    block has no candidate of their region fall back to all of the region's
    centroids.

    Returns ``(groups, candidate_offsets, candidate_ids, n_fallback)``: the
    first three for :func:`~gpu_pipeline.stages.kmeans.batched_kmeans`, and
    the number of voxels that fell back to their region's full list.
    ``listed``: see :func:`block_lists`.
    """
    xp = get_array_module(coords)
    highest = coords.max(axis=0) if coords.shape[0] else None
    lists = block_lists(centres, centre_region, spacing=spacing, margin=margin, highest=highest, listed=listed)
    if xp.__name__ == "numpy":  # one compiled pass instead of several (voxels x ndim) temporaries
        from cpu_fallback.kernels import block_groups as find_groups
    else:
        find_groups = block_groups
    groups, n_fallback = find_groups(coords, voxel_region, lists.block, lists.strides, lists.n_blocks, lists.keys,
                                     lists.fallback_base)
    return groups, lists.offsets, lists.ids, n_fallback


@dataclass
class BlockLists:
    """Candidate centroid lists of :func:`local_candidates`, as CSR ``offsets``/``ids`` per sorted key.

    A block's list of a region has key ``region * n_blocks + block`` (the
    C-order index of the block on a grid of ``block`` voxels per axis); each
    region's full list has key ``fallback_base + region``.
    """

    block: object
    strides: object
    n_blocks: int
    keys: object
    offsets: object
    ids: object
    fallback_base: int


def block_lists(centres, centre_region, *, spacing, margin, highest=None, listed=None):
    """The centroid side of :func:`local_candidates`: every (region, block) list, for voxels up to ``highest``.

    ``highest`` (per axis, index units; None: no voxels) sizes the block grid
    with the centroids; a larger grid only adds lists no voxel uses, so the
    list of a voxel does not depend on it.

    ``listed`` (bool per centroid, optional): only these centroids enter the
    (region, block) lists; every centroid still enters its region's full
    list. A chunk whose few fallback voxels need their regions' full lists
    passes its near centroids here (every one a list of its blocks can hold,
    :func:`candidate_selections`): its lists are then the same, and their
    cost does not grow with a region that spans the whole volume.
    """
    xp = get_array_module(centres)
    ndim = centres.shape[1]
    # Blocks a third of the margin wide: a voxel's list then spans about
    # 2.3 margins per axis instead of 3 with margin-wide blocks.
    block = xp.asarray([max(1, int(math.ceil(margin / BLOCK_DIVISOR / float(s)))) for s in spacing], dtype=xp.int64)
    reach = [int(math.ceil(margin / float(s) / int(b))) for s, b in zip(spacing, to_list(block))]
    scale = xp.asarray([float(s) for s in spacing], dtype=xp.float64)
    grid = (xp.asarray(highest, dtype=xp.int64) // block + 1) if highest is not None else xp.ones(ndim, dtype=xp.int64)
    grid = xp.maximum(grid, (centres.max(axis=0) // block).astype(xp.int64) + 1)
    strides = xp.concatenate([xp.cumprod(grid[::-1])[::-1][1:], xp.ones(1, dtype=xp.int64)])
    n_blocks = int(xp.prod(grid))
    n_centres = centres.shape[0]
    chosen = xp.arange(n_centres, dtype=xp.int64) if listed is None else xp.flatnonzero(listed).astype(xp.int64)
    # Every (centre, block offset) at once. Offsets whose nearest point lies
    # beyond the margin from anywhere in the home block are left out first
    # (a block |s| away per axis is at least (|s| - 1) blocks from the centre).
    shifts = xp.asarray(list(itertools.product(*[range(-r, r + 1) for r in reach])), dtype=xp.int64)
    least = xp.maximum(xp.abs(shifts) - 1, 0) * block * scale
    shifts = shifts[(least * least).sum(axis=1) <= margin * margin]
    if xp.__name__ == "numpy":  # one compiled pass instead of (centres x offsets x ndim) temporaries
        from cpu_fallback.kernels import block_pairs as find_pairs
    else:
        find_pairs = block_pairs
    keys, ids = find_pairs(centres, chosen, centre_region, block, grid, strides, n_blocks, scale, margin, shifts)
    # Fallback lists, one per region, keyed after every block key.
    fallback_base = (int(centre_region.max()) + 1) * n_blocks
    keys = xp.concatenate([keys, fallback_base + centre_region])
    ids = xp.concatenate([ids, xp.arange(n_centres, dtype=xp.int64)])
    # The pairs come centre by centre (ids ascending), so a stable sort by key keeps each list's ids ascending.
    order = xp.argsort(keys, kind="stable")
    keys, ids = keys[order], ids[order]
    unique_keys, starts = xp.unique(keys, return_index=True)
    offsets = xp.concatenate([starts, xp.asarray([keys.size])]).astype(xp.int64)
    return BlockLists(block=block, strides=strides, n_blocks=n_blocks, keys=unique_keys, offsets=offsets, ids=ids,
                      fallback_base=fallback_base)


def block_pairs(centres, chosen, centre_region, block, grid, strides, n_blocks, scale, margin, shifts):
    """Array form of :func:`cpu_fallback.kernels.block_pairs` (the GPU's): the pairs' ``(keys, ids)``."""
    xp = get_array_module(centres)
    ndim = centres.shape[1]
    home = xp.floor(centres[chosen] / block).astype(xp.int64)
    # In slices of centres that bound the temporaries to about BLOCK_ELEMENTS entries.
    per_slice = max(1, BLOCK_ELEMENTS // (max(1, shifts.shape[0]) * ndim))
    pair_keys, pair_ids = [xp.empty(0, dtype=xp.int64)], [xp.empty(0, dtype=xp.int64)]
    for start in range(0, int(chosen.size), per_slice):
        stop = min(int(chosen.size), start + per_slice)
        nb = home[start:stop, None, :] + shifts[None, :, :]
        inside = ((nb >= 0) & (nb < grid)).all(axis=2)
        c = centres[chosen[start:stop], None, :]
        gap = xp.maximum(xp.maximum(nb * block - c, c - ((nb + 1) * block - 1)), 0) * scale
        near = inside & ((gap * gap).sum(axis=2) <= margin * margin)
        centre, offset = xp.nonzero(near)
        ids = chosen[start + centre]
        pair_keys.append(centre_region[ids] * n_blocks + (nb[centre, offset] * strides).sum(axis=1))
        pair_ids.append(ids)
    return xp.concatenate(pair_keys).astype(xp.int64), xp.concatenate(pair_ids).astype(xp.int64)


def block_groups(coords, voxel_region, block, strides, n_blocks, unique_keys, fallback_base):
    """Array form of :func:`cpu_fallback.kernels.block_groups` (the GPU's): each voxel's list index, fallbacks."""
    xp = get_array_module(coords)
    voxel_keys = voxel_region * n_blocks + ((coords // block) * strides).sum(axis=1)
    groups = xp.searchsorted(unique_keys, voxel_keys)
    found = (groups < unique_keys.size) & (unique_keys[xp.minimum(groups, unique_keys.size - 1)] == voxel_keys)
    fallback = xp.searchsorted(unique_keys, fallback_base + voxel_region)
    return xp.where(found, groups, fallback), int(found.size - int(found.sum()))


@dataclass
class KMeansSeeds:
    """What every block of a volume needs to split its regions: the global peaks of multi-peak regions.

    ``centres`` (K, ndim) float64 index units, grouped by region (C order
    inside each); ``centre_region`` (K,) int64; ``radii`` (K,) physical
    radii for the power distance or None (Euclidean); ``multi`` (n_regions
    + 1,) bool, regions holding two or more peaks; ``margin`` physical;
    ``centre_label`` (K,) int64, the label offset a voxel assigned to each
    centroid gets (its own index, or its group's first peak index when
    peaks are grouped, see :func:`~gpu_pipeline.stages.peaks.neck_groups`).
    """

    centres: object
    centre_region: object
    radii: object
    multi: object
    margin: float
    centre_label: object


def kmeans_seeds(peak_region, n_regions, peaks, radii, *, assignment="power", margin=None, peak_group=None):
    """Seeds for :func:`block_candidates` from all peaks, their regions and radii (NumPy or CuPy).

    ``margin`` defaults to 1.5 times the largest radius of a peak in a
    multi-peak region. ``peak_group`` (per peak, optional) makes the
    centroids of one group label their voxels alike; a region whose peaks
    all form one group is left whole (``multi`` False). Returns None when no
    region is to be split.
    """
    xp = get_array_module(peaks)
    if assignment not in ("power", "euclidean"):
        raise DeclumpError(f"assignment must be 'power' or 'euclidean', got {assignment!r}")
    k = xp.bincount(peak_region, minlength=n_regions + 1)
    multi = k >= 2
    multi[0] = False
    if not bool(multi.any()):
        return None
    keep = xp.flatnonzero(multi[peak_region])
    if margin is None:
        margin = 1.5 * float(radii[keep].astype(xp.float64).max())
    if peak_group is not None:
        # A region whose peaks all form one group stays whole: it needs no
        # assignment (on a plateau it may hold thousands of peaks).
        peak_group = xp.asarray(peak_group).astype(xp.int64)
        lowest = xp.full(n_regions + 1, np.iinfo(np.int64).max, dtype=xp.int64)
        highest = xp.full(n_regions + 1, -1, dtype=xp.int64)
        ops_for(peak_group).scatter_min(lowest, peak_region[keep], peak_group[keep])
        ops_for(peak_group).scatter_max(highest, peak_region[keep], peak_group[keep])
        multi &= lowest != highest
        if not bool(multi.any()):
            return None
        keep = xp.flatnonzero(multi[peak_region])
    centre_peak = keep[xp.argsort(peak_region[keep], kind="stable")]
    centre_radii = radii[centre_peak].astype(xp.float64)
    centre_label = xp.arange(centre_peak.size, dtype=xp.int64)
    if peak_group is not None:
        centre_label = peak_group[centre_peak]
    return KMeansSeeds(centres=peaks[centre_peak].astype(xp.float64), centre_region=peak_region[centre_peak],
                       radii=centre_radii if assignment == "power" else None, multi=multi, margin=float(margin),
                       centre_label=centre_label)


def candidate_selections(seeds, voxel_region, *, origin, shape, spacing, present=None):
    """The centroids a block's candidate lists are built from: ``(near, of_present)``, global indices.

    ``of_present``: every centroid of the regions in ``voxel_region`` (the
    block's multi-peak voxels' regions); ``near``: those of them within the
    margin plus one grid block of the block (``shape`` at ``origin``), all
    that a (region, block) list of the block can hold. Voxels that fall back
    to their region's full list need ``of_present``. ``present`` (bool per
    region id, instead of ``voxel_region``): the regions found in the block
    (any others than multi-peak ones among them change nothing: only those
    have centroids).
    """
    if present is None:
        present = get_array_module(voxel_region).zeros(seeds.multi.size, dtype=bool)
        present[voxel_region] = True
    xp = get_array_module(present)
    of_present = xp.flatnonzero(present[seeds.centre_region])
    # Centroids within margin + one block of the block's bounding box can be candidates.
    origin_arr = xp.asarray([int(o) for o in origin], dtype=xp.int64)
    scale = xp.asarray([float(s) for s in spacing], dtype=xp.float64)
    block = xp.asarray([max(1, int(math.ceil(seeds.margin / BLOCK_DIVISOR / float(s)))) for s in spacing],
                       dtype=xp.float64)
    low = origin_arr - block
    high = origin_arr + xp.asarray(shape, dtype=xp.int64) - 1 + block
    c = seeds.centres[of_present]
    gap = xp.maximum(xp.maximum(low - c, c - high), 0) * scale
    return of_present[(gap * gap).sum(axis=1) <= seeds.margin * seeds.margin], of_present


def selection_passes(near, of_present):
    """The centroid selections a block's assignment tries in turn (:func:`candidate_selections`' two).

    Yields ``(selection, listed)``: first the near centroids; then, when a
    voxel fell back to its region's full list (the caller stops otherwise),
    every centroid of the block's regions with only the near ones listed
    per block (:func:`block_lists`' ``listed``): the same lists, and full
    lists that are complete. Both passes give the voxels that did not fall
    back the same candidates, so the result is the one of a single pass over
    ``of_present``, at a cost that does not grow with a region spanning the
    volume (a block with a few fallback voxels in a 640^3 volume's
    16,600-centroid region took 1.25 s with every centroid listed).
    """
    xp = get_array_module(of_present)
    if near.size:
        yield near, None
    if near.size < of_present.size:
        listed = xp.zeros(of_present.size, dtype=bool)
        listed[xp.searchsorted(of_present, near)] = True
        yield of_present, listed


def assign_compiled(regions, seeds, selection, centres, centre_value, labels, *, spacing, origin, highest,
                    listed=None):
    """The power assignment of ``regions``' multi-peak voxels in one compiled pass (CPU only).

    Candidate lists from the centroids ``selection`` (global indices) of
    ``seeds``, distances to ``centres[selection]`` (index units),
    ``labels[voxel] = centre_value[chosen]`` in place; ``regions`` sits at
    ``origin`` in a volume whose voxels go up to ``highest``. Returns
    :func:`cpu_fallback.kernels.assign_in_cells`' fallback count (-1: a
    region had no list in ``selection``). ``listed``: see :func:`block_lists`.
    """
    from cpu_fallback.kernels import assign_in_cells

    lists = block_lists(seeds.centres[selection], seeds.centre_region[selection], spacing=spacing,
                        margin=seeds.margin, highest=highest, listed=listed)
    scale = np.asarray([float(s) for s in spacing], dtype=np.float64)
    power = np.zeros(selection.size) if seeds.radii is None else seeds.radii[selection].astype(np.float64) ** 2
    return assign_in_cells(regions, seeds.multi, lists.block, lists.strides, lists.n_blocks, lists.keys,
                           lists.offsets, lists.ids, lists.fallback_base, centres[selection] * scale, power, scale,
                           centre_value, labels, cell=(PRUNE_CELL,) * regions.ndim, prune_width=CELL_PRUNE_WIDTH,
                           origin=origin)


def block_candidates(regions, seeds, *, origin, spacing):
    """The voxels of multi-peak regions in one block and their candidate centroids.

    ``regions`` is a block of the global region labels whose first voxel sits
    at ``origin`` (index units) in the volume; the whole array is one block
    with origin 0. Only centroids of regions present in the block and near it
    are looked at (all of those regions' centroids when a voxel falls back to
    its region's full list), so the candidate lists, as sets of global
    centroid indices, are the ones the whole array would give.

    Returns ``(flat, coords, groups, offsets, ids)``: local flat indices and
    global coordinates of the voxels, and their candidate lists (ids are
    global centroid indices).
    """
    xp = get_array_module(regions)
    flat = xp.flatnonzero(seeds.multi[regions].ravel())
    origin_arr = xp.asarray([int(o) for o in origin], dtype=xp.int64)
    coords = xp.stack(xp.unravel_index(flat, regions.shape), axis=1).astype(xp.int64) + origin_arr
    voxel_region = regions.ravel()[flat].astype(xp.int64)
    if flat.size == 0:
        empty = xp.zeros(0, dtype=xp.int64)
        return flat, coords, empty, xp.zeros(1, dtype=xp.int64), empty
    near, of_present = candidate_selections(seeds, voxel_region, origin=origin, shape=regions.shape,
                                            spacing=spacing)
    for selection, listed in selection_passes(near, of_present):
        groups, offsets, ids, n_fallback = local_candidates(coords, voxel_region, seeds.centres[selection],
                                                            seeds.centre_region[selection], spacing=spacing,
                                                            margin=seeds.margin, listed=listed)
        if n_fallback == 0:
            break
    return flat, coords, groups, offsets, selection[ids]


def split_regions_kmeans(regions, n_regions, peaks, radii, *, spacing, assignment="power",
                         engine="batched", max_iter=10, margin=None, peak_group=None):
    """Split every region holding k > 1 peaks into k particles by k-means on voxel coordinates.

    Regions with zero or one peak stay whole. Centroids start at the peaks;
    distances are physical (``spacing``). See :mod:`gpu_pipeline.stages.kmeans`
    for the ``assignment`` rules. ``margin`` (physical, default 1.5 times
    the largest peak radius) bounds how far from a voxel its candidate
    centroids may lie (:func:`local_candidates`). ``peak_group`` (per peak,
    see :func:`~gpu_pipeline.stages.peaks.neck_groups`) merges the voxels of
    a group's centroids into one particle. Returns labels (not yet
    renumbered; int32, int64 only when the ids need it) and the number of
    Lloyd updates run.
    """
    xp = get_array_module(regions)
    peak_region, _ = peaks_per_region(regions, n_regions, peaks)
    seeds = kmeans_seeds(peak_region, n_regions, peaks, radii, assignment=assignment, margin=margin,
                         peak_group=peak_group)
    # int32 whenever the ids fit: half the memory traffic of int64 here and in the finish.
    top = n_regions + 1 + (int(seeds.centre_label.max()) if seeds is not None else 0)
    labels = regions.astype(xp.int32 if top < 2**31 - 1 else xp.int64)
    if seeds is None:
        return labels, 0
    if engine == "batched" and max_iter == 0 and xp.__name__ == "numpy":
        # The CPU's assignment reads the voxels from `regions` in one compiled
        # pass over cells: no coordinate arrays, candidate lists found and
        # pruned per cell. Same lists and sums, so the same labels as the
        # array form below (which the chunked engine and the GPU use).
        every = np.arange(seeds.centres.shape[0])
        assign_compiled(regions, seeds, every, seeds.centres, n_regions + 1 + seeds.centre_label, labels,
                        spacing=spacing, origin=(0,) * regions.ndim, highest=np.asarray(regions.shape) - 1)
        return labels, 0
    if engine == "batched":
        flat, coords, groups, offsets, ids = block_candidates(regions, seeds, origin=(0,) * regions.ndim,
                                                              spacing=spacing)
        chosen, _, n_iter = batched_kmeans(coords, groups, offsets, ids, seeds.centres, spacing=spacing,
                                           radii=seeds.radii, max_iter=max_iter)
    else:
        if assignment != "euclidean":
            raise DeclumpError(f"kmeans_engine={engine!r} supports assignment='euclidean' only; "
                               "use kmeans_engine='batched' for the size-aware power assignment")
        flat = xp.flatnonzero(seeds.multi[regions].ravel())
        coords = xp.stack(xp.unravel_index(flat, regions.shape), axis=1).astype(xp.int64)
        voxel_region = regions.ravel()[flat].astype(xp.int64)
        group_of_region = xp.cumsum(seeds.multi) - 1
        chosen = per_region_kmeans(coords, group_of_region[voxel_region], seeds.centres,
                                   group_of_region[seeds.centre_region], spacing=spacing,
                                   max_iter=max(1, max_iter), engine=engine)
        n_iter = max_iter
    labels.ravel()[flat] = n_regions + 1 + seeds.centre_label[chosen]
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
    """One piece per particle, ids 1..n in C order of first voxel.

    ``relabel_by_first_voxel(enforce_one_piece(labels))``: the last round's
    equal-value labelling already numbers the pieces so.
    """
    xp = get_array_module(labels)
    pieces = one_piece_rounds(labels, pieces_only=True)[1]
    return pieces.astype(xp.int32 if pieces.size == 0 or int(pieces.max()) < 2**31 - 1 else xp.int64, copy=False)
