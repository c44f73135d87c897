"""Batched k-means over many regions at once, started from the peaks.

All regions of an image run together: each Lloyd iteration is a handful of
array operations per bucket of regions with similar k (k padded to the next
power of two), never a Python loop over regions. Centroid sums are
accumulated from integer voxel coordinates, which float64 adds exactly, so
the result does not depend on summation order (or on how a volume was
chunked).

Two assignment rules:

``euclidean``
    plain k-means: nearest centroid. Cuts touching particles of different
    sizes by the perpendicular bisector, i.e. through the bigger one.
``power``
    size-aware: nearest in power distance ``|x - c|^2 - r^2``, with ``r`` the
    distance-map height of the region's peak (the inscribed radius). For two
    overlapping spheres the boundary is then their radical plane, the
    physical neck.
"""
from __future__ import annotations

import numpy as np

from gpu_pipeline._backend import DeclumpError, get_array_module, to_host

#: Elements (voxels x candidate centroids) processed per block; bounds memory.
BLOCK_ELEMENTS = 1 << 22

#: Width, in voxels per axis, of the cells whose candidate lists
#: :func:`prune_candidates` narrows to the centroids that can be nearest.
PRUNE_CELL = 4

#: On the CPU, lists up to this wide go to the compiled assignment unpruned
#: (pruning costs more than it saves there).
KERNEL_WIDTH = 64


def _bucket_plan(k_per_group, xp):
    """Padded width per group: k rounded up to the next power of two (1, 2, 4, ...)."""
    width = xp.ones_like(k_per_group)
    while True:
        short = width < k_per_group
        if not bool(short.any()):
            return width
        width = xp.where(short, width * 2, width)


def batched_kmeans(coords, groups, candidate_offsets, candidate_ids, centres, *, spacing, radii=None,
                   max_iter=10):
    """k-means of grouped voxels, each group choosing among its own list of centroids.

    A group is typically a connected region, or a region's share of one
    block of a fixed grid (then its list holds only the region's centroids
    near that block, which bounds the work per voxel).

    Parameters
    ----------
    coords : (N, ndim) int64
        Voxel coordinates (index units).
    groups : (N,) int64
        Group of each voxel, in ``[0, G)``.
    candidate_offsets : (G + 1,) int64
        CSR offsets: group ``g`` may use ``candidate_ids[offsets[g]:offsets[g+1]]``
        (ascending, at least one).
    candidate_ids : (M,) int64
        Indices into ``centres``.
    centres : (K, ndim) float64
        Initial centroids (index units).
    spacing : sequence of float
        Voxel size per axis; distances are physical.
    radii : (K,) float64, optional
        Physical radii for the power distance; ``None`` gives plain Euclidean k-means.
    max_iter : int
        Maximum Lloyd updates; 0 assigns each voxel to the initial centroids.

    Returns
    -------
    assignment : (N,) int64
        Index of each voxel's centroid in ``centres`` (ties: the lower index).
    centres : (K, ndim) float64
        Final centroids (index units).
    n_iter : int
        Lloyd updates run (stops early when no voxel changes centroid).
    """
    xp = get_array_module(coords)
    n_voxels, ndim = coords.shape
    n_centres = centres.shape[0]
    if n_voxels == 0:
        return xp.zeros(0, dtype=xp.int64), centres, 0
    scale = xp.asarray([float(s) for s in spacing], dtype=xp.float64)
    k = xp.diff(candidate_offsets)
    if bool((k[xp.unique(groups)] == 0).any()):
        raise DeclumpError("internal: a group without candidate centroids reached k-means")
    power = xp.zeros(n_centres, dtype=xp.float64) if radii is None else radii.astype(xp.float64) ** 2
    if max_iter == 0:  # the centroids stay put: lists can be cut to those that can win
        on_host = xp.__name__ == "numpy"
        if not on_host or int(k.max()) > KERNEL_WIDTH:
            groups, candidate_offsets, candidate_ids = prune_candidates(coords, groups, candidate_offsets,
                                                                        candidate_ids, centres, spacing=spacing,
                                                                        power=power)
            k = xp.diff(candidate_offsets)
        if on_host:
            # One compiled pass over the voxels (same sums, same ties) instead of
            # the padded (voxels x width) tables below, which NumPy needs.
            from cpu_fallback.kernels import nearest_candidate

            return nearest_candidate(coords, groups, candidate_offsets, candidate_ids, centres * scale, -power,
                                     scale), centres, 0
    width = _bucket_plan(k, xp)

    physical = coords.astype(xp.float64) * scale
    voxel_width = width[groups]
    # Per bucket, a (groups x width) table of candidates padded with the
    # sentinel centroid n_centres, whose power is -inf (distance +inf).
    sentinel = n_centres
    index_dtype = xp.int32 if n_centres < 2**31 - 1 else xp.int64
    plans = []
    for bucket in [int(b) for b in to_list(xp.unique(voxel_width))]:
        members = xp.flatnonzero(voxel_width == bucket)
        bucket_groups = xp.flatnonzero(width == bucket)
        offset = xp.arange(bucket, dtype=xp.int64)[None, :]
        valid = offset < k[bucket_groups][:, None]
        table = xp.where(valid, candidate_ids[xp.minimum(candidate_offsets[bucket_groups][:, None] + offset,
                                                         candidate_ids.size - 1)], sentinel).astype(index_dtype)
        row_of_group = xp.zeros(width.size, dtype=xp.int64)
        row_of_group[bucket_groups] = xp.arange(bucket_groups.size)
        rows = max(1, BLOCK_ELEMENTS // bucket)
        for start in range(0, int(members.size), rows):
            idx = members[start:start + rows]
            # The (voxels x width) candidate table is gathered per block when
            # used, never held for all voxels at once: with wide lists that
            # would be voxels x width indices.
            plans.append((idx, physical[idx], table, row_of_group[groups[idx]]))

    assignment = xp.full(n_voxels, -1, dtype=xp.int64)
    coord_float = coords.astype(xp.float64)
    n_updates = 0
    while True:
        centre_phys = xp.concatenate([centres * scale, xp.zeros((1, ndim))], axis=0)
        neg_power = xp.concatenate([-power, xp.asarray([xp.inf])])
        new = xp.empty_like(assignment)
        for idx, voxel_phys, table, rows in plans:
            if table.shape[1] == 1:
                new[idx] = table[rows, 0]
                continue
            candidates = table[rows]
            d = neg_power[candidates]
            for axis in range(ndim):
                diff = voxel_phys[:, axis][:, None] - centre_phys[candidates, axis]
                d += diff * diff
            new[idx] = xp.take_along_axis(candidates, xp.argmin(d, axis=1)[:, None], axis=1)[:, 0]
        changed = bool((new != assignment).any())
        assignment = new
        if not changed or n_updates >= max_iter:
            break
        counts = xp.bincount(assignment, minlength=n_centres)
        sums = xp.stack([xp.bincount(assignment, weights=coord_float[:, a], minlength=n_centres)
                         for a in range(ndim)], axis=1)
        filled = counts > 0
        centres = xp.where(filled[:, None], sums / xp.maximum(counts, 1)[:, None], centres)
        n_updates += 1
    return assignment, centres, n_updates


def prune_candidates(coords, groups, candidate_offsets, candidate_ids, centres, *, spacing, power):
    """Split each group by cells of :data:`PRUNE_CELL` voxels and keep, per piece, the centroids that can be nearest.

    A piece's voxels lie in a box; a centroid whose smallest power distance
    over the box (``|x - c|^2 - power``, physical) exceeds the smallest
    largest one of the list cannot be nearest to any voxel of the piece, nor
    tie with the nearest, so dropping it changes no assignment (ties still go
    to the lower index: lists stay ascending). A small relative slack keeps
    every candidate that float rounding could make a winner. With wide lists
    (large particles, plateaus of peaks) this cuts the work per voxel to
    the few centroids around it. Pairs of (piece, candidate) are handled in
    slices of a quarter of :data:`BLOCK_ELEMENTS` (about 200 MB of temporaries).

    Returns ``(groups, candidate_offsets, candidate_ids)`` in the form
    :func:`batched_kmeans` takes.
    """
    xp = get_array_module(coords)
    from gpu_pipeline._backend import ops_for

    ops = ops_for(coords)
    n_voxels, ndim = coords.shape
    cells = coords // PRUNE_CELL
    low = cells.min(axis=0)
    extent = cells.max(axis=0) - low + 1
    strides = xp.concatenate([xp.cumprod(extent[::-1])[::-1][1:], xp.ones(1, dtype=xp.int64)])
    n_cells = int(xp.prod(extent))
    keys, pieces = xp.unique(groups * n_cells + ((cells - low) * strides).sum(axis=1), return_inverse=True)
    pieces = pieces.reshape(-1)
    parent = keys // n_cells
    n_pieces = keys.size
    scale = xp.asarray([float(s) for s in spacing], dtype=xp.float64)
    box_low, box_high = [], []
    for a in range(ndim):
        lo = xp.full(n_pieces, np.iinfo(np.int64).max, dtype=xp.int64)
        hi = xp.full(n_pieces, -1, dtype=xp.int64)
        ops.scatter_min(lo, pieces, coords[:, a])
        ops.scatter_max(hi, pieces, coords[:, a])
        box_low.append(lo.astype(xp.float64) * scale[a])
        box_high.append(hi.astype(xp.float64) * scale[a])
    box_low, box_high = xp.stack(box_low, axis=1), xp.stack(box_high, axis=1)
    centre_phys = centres.astype(xp.float64) * scale
    k = xp.diff(candidate_offsets)[parent]
    ends = xp.cumsum(k)
    host_ends = ends.get() if hasattr(ends, "get") else ends  # slice bounds are chosen on the host
    kept_ids, kept_count = [], xp.zeros(n_pieces, dtype=xp.int64)
    first = 0
    while first < n_pieces:
        done = int(host_ends[first - 1]) if first else 0
        last = max(first + 1, int(np.searchsorted(host_ends, done + BLOCK_ELEMENTS // 4, side="right")))
        t = xp.arange(done, int(host_ends[last - 1]), dtype=xp.int64)
        piece = xp.searchsorted(ends, t, side="right")
        c = candidate_ids[candidate_offsets[parent[piece]] + t - (ends - k)[piece]]
        lo, hi, at = box_low[piece], box_high[piece], centre_phys[c]
        near = xp.maximum(xp.maximum(lo - at, at - hi), 0)
        far = xp.maximum(xp.abs(lo - at), xp.abs(hi - at))
        lower = (near * near).sum(axis=1) - power[c]
        upper = (far * far).sum(axis=1) - power[c]
        bound = xp.full(last - first, xp.inf, dtype=xp.float64)
        ops.scatter_min(bound, piece - first, upper)
        bound = bound[piece - first]
        keep = lower <= bound + 1e-9 * (xp.abs(bound) + power[c] + 1.0)
        kept_ids.append(c[keep])
        kept_count[first:last] = xp.bincount(piece[keep] - first, minlength=last - first)
        first = last
    offsets = xp.concatenate([xp.zeros(1, dtype=xp.int64), xp.cumsum(kept_count)])
    return pieces.astype(xp.int64), offsets, xp.concatenate(kept_ids).astype(candidate_ids.dtype)


def to_list(array):
    """A small device array as a Python list."""
    return array.tolist() if hasattr(array, "tolist") else list(array)


def per_region_kmeans(coords, groups, centres, centre_groups, *, spacing, max_iter=10, engine="sklearn"):
    """Reference: one scikit-learn (or cuML) ``KMeans`` per region, Euclidean, started at the peaks.

    The naive form of the method, kept as the reference the batched version is
    tested against and as a baseline in the bench. Loops over regions in Python.
    """
    xp = get_array_module(coords)
    if engine == "sklearn":
        from sklearn.cluster import KMeans
    elif engine == "cuml":
        try:
            from cuml.cluster import KMeans
        except Exception as exc:  # pragma: no cover - needs cuML
            raise DeclumpError("kmeans_engine='cuml' needs cuML; install the GPU extra or conda environment.yml "
                               "(cuml), or use kmeans_engine='batched'") from exc
    else:
        raise DeclumpError(f"kmeans engine must be 'batched', 'sklearn' or 'cuml', got {engine!r}")
    result_module = xp
    if engine == "sklearn":  # scikit-learn takes host arrays (init too): one copy there and one back, not per region
        xp = np
        coords, groups, centres, centre_groups = (to_host(a) for a in (coords, groups, centres, centre_groups))
    scale = xp.asarray([float(s) for s in spacing], dtype=xp.float64)
    physical = coords.astype(xp.float64) * scale
    assignment = xp.zeros(coords.shape[0], dtype=xp.int64)
    order = xp.argsort(groups, kind="stable")
    n_groups = int(centre_groups.max()) + 1
    # Region bounds as host lists, read once: no device sync per region.
    bounds = to_list(xp.searchsorted(groups[order], xp.arange(n_groups + 1)))
    centre_bounds = to_list(xp.searchsorted(centre_groups, xp.arange(n_groups + 1)))
    for g in range(n_groups):
        members = order[bounds[g]:bounds[g + 1]]
        c0, c1 = centre_bounds[g], centre_bounds[g + 1]
        if c1 - c0 == 1:
            assignment[members] = c0
            continue
        init = centres[c0:c1] * scale
        model = KMeans(n_clusters=c1 - c0, init=init, n_init=1, max_iter=max_iter, tol=0.0)
        model.fit(physical[members])
        assignment[members] = c0 + xp.asarray(model.labels_, dtype=xp.int64)
    return result_module.asarray(assignment)
