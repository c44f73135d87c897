"""The whole pipeline on a chunked volume: the same labels as the in-memory `separate`, for any chunking.

Passes over the volume (each a Dask graph of one or two tasks per chunk, run
on the active scheduler; nothing holds more than a few chunks; where a pass
needs halos, the tasks that read the neighbouring chunks hand them over:
:func:`~gpu_pipeline.chunked.source.map_haloed`):

1. smoothing (halo: the Gaussian's radius), a global Otsu threshold from a
   histogram reduced over chunks, polarity, foreground; regions (connected
   components merged across chunk faces) without objects below ``min_size``
   (:func:`~gpu_pipeline.chunked.foreground.regions_chunked`);
2. distance transform and peak candidates per chunk with a halo of
   ``max_radius`` (physical) plus the peak window: the distance of a voxel is
   exact when its nearest background lies within the halo, and the map is
   capped at ``max_radius`` (in-memory ``separate(max_radius=...)`` caps the
   same way), so the capped map, its local maxima and their values are exact.
   The greedy peak spacing then runs once on all candidates
   (:func:`~gpu_pipeline.stages.peaks.space_candidates`; those the peak reach
   overlooks apart, flagged, for the reach share's rescue on the global peak
   list, :func:`~gpu_pipeline.stages.peaks.rescued_peaks`); with
   ``neck_ratio``, a second pass of the same distance map samples the
   segments between neighbouring peaks in the chunk that holds each sample
   (:func:`neck_groups_chunked`);
3. k-means: every chunk assigns its voxels with the global peak list and the
   candidate lists of :func:`~gpu_pipeline.stages.split.block_candidates`
   (which depend on coordinates only); Lloyd updates, when asked for, reduce
   per-chunk integer coordinate sums per centroid;
4. one piece per particle: one pass per round labels each block's
   equal-value pieces (the first round computes the block's k-means split
   in the same task) and returns per-piece sizes and face counts; the
   in-memory rule for stray pieces decides on those tables, repeated as
   in-memory; ids by first voxel in C order come from the last round.

Particles whose inscribed radius exceeds ``max_radius`` see a plateau of
capped distances, whose peaks the default ``neck_ratio`` (0.97 in 2D, 0.95 in 3D) joins where
the segments between them stay on the plateau, and which are otherwise
over-split (as in-memory with the same cap); the
run counts voxels at the cap and reports them.
"""
from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass, field

import numpy as np

from gpu_pipeline._backend import DeclumpError, get_array_module, ops_for, to_host
from gpu_pipeline.array_algorithms import unique_ids
from gpu_pipeline.chunked.components import components_chunked, id_dtype
from gpu_pipeline.chunked.foreground import PEAK_HALOS, fit_halo, gaussian_radius, regions_chunked
from gpu_pipeline.chunked.source import (halo_box, haloed_tasks, neighbours_hold_halo, shells_key,
                                         stored_volume)
from gpu_pipeline.chunked.workspace import (BLOCK_GROUP, Workspace, block_boxes, block_origin, chunk_starts,
                                             engine_threads, grid_edges, read_staged, run_call, run_grouped,
                                             run_tasks, to_device, write_block)
from gpu_pipeline.pipeline import (MASK_ACCEPTED, NoParticlesError, ball_size, cap_distance, check_auto_or_number,
                                   check_max_iter, resolve_ratio, validate_spacing)
from gpu_pipeline.stages import by_box
from gpu_pipeline.stages.components import settle_pieces
from gpu_pipeline.stages.kmeans import batched_kmeans
from gpu_pipeline.stages.peaks import (PeakReach, join_peaks, local_maxima, quantize_cap,
                                       quantize_distance, regroup, rescued_peaks, segment_points, shadowed_peaks,
                                       space_candidates_by_reach, window_half_widths, within_reach)
from gpu_pipeline.stages.split import (KMeansSeeds, assign_compiled, block_candidates, candidate_selections,
                                      kmeans_seeds, selection_passes)

#: Default ``max_radius``: this many times ``min_distance``.
MAX_RADIUS_FACTOR = 4.0
#: As in-memory ``enforce_one_piece``.
ONE_PIECE_ROUNDS = 10


@dataclass
class ChunkedDetails:
    """What a chunked run decided, and how many blocks each stage computed (resumed runs compute fewer)."""

    threshold: float | None = None
    polarity: str | None = None
    max_radius: float = 0.0
    halo: tuple = ()
    n_regions: int = 0
    n_peaks: int = 0
    n_particles: int = 0
    n_capped_voxels: int = 0
    one_piece_rounds: int = 0
    blocks_computed: dict = field(default_factory=dict)
    blocks_total: dict = field(default_factory=dict)
    probabilities: object = None  # lazy (n_classes, *shape) map of the pixel classifier, when one was used
    warnings: list = field(default_factory=list)  # one-line warnings on the choices made (printed with verbose)


def peak_reach_voxels(half_widths, max_radius, spacing, reach=None):
    """How far (voxels per axis) the peak test looks beyond a voxel: the window's ``half_widths``, or the
    reach of the highest possible peak (``reach`` times ``max_radius``, as
    :class:`~gpu_pipeline.stages.peaks.PeakReach` reads it) where that is wider."""
    if reach is None:
        return tuple(half_widths)
    highest = PeakReach(reach, spacing, max_radius)
    return tuple(max(h, v) for h, v in zip(half_widths, highest.voxels(highest.cap_q)))


def peak_halo(min_distance, max_radius, spacing, reach=None):
    """Halo per axis (voxels) for the distance transform and peaks: what the peak test reads beyond the core
    (:func:`peak_reach_voxels`) + max_radius, so that every distance it reads is exact."""
    return tuple(h + int(math.ceil(float(max_radius) / s - 1e-9))
                 for h, s in zip(peak_reach_voxels(window_half_widths(min_distance, spacing), max_radius, spacing,
                                                   reach), spacing))


def _capped_distance_q(extended, spacing, max_radius, window=None):
    """The quantised distance map of ``extended > 0``, capped at ``max_radius`` (exact in a chunk's core).

    ``window`` (slices): only that part is capped and quantised (the rest of
    the halo is needed by the transform, not by what reads its values).
    Returns ``(foreground, distance)`` over the window.
    """
    fg = extended > 0
    # max_distance: the GPU transform stops its passes at the cap (values above it are capped anyway).
    # One thread: Dask runs a task per core already (all cores per task would put cores^2 threads on them).
    # window: the CPU transform skips the lines that no value in the window depends on.
    distance = ops_for(extended).distance_transform(fg, spacing, max_distance=max_radius, threads=1, window=window)
    if window is not None:
        fg = fg[window]
    return fg, quantize_distance(cap_distance(distance, max_radius, spacing), spacing)[0]


@dataclass(frozen=True)
class StagedBox:
    """A chunk and its halo to read from a staged store in the task that uses them (one task per chunk, not
    a read task handing the extended block to another)."""

    store: str
    box: tuple
    device: str | None

    def read(self):
        return read_staged(self.store, self.box, self.device)


def _extended(block):
    return block.read() if isinstance(block, StagedBox) else block


def _block_peak_candidates(extended, origin, left, core_shape, spacing, half_widths, max_radius, distance_out=None,
                           reach=None):
    """Peak candidates (global coords, quantised distance, region) in one chunk's core, and capped voxels.

    ``extended``: the chunk with its halo, or the :class:`StagedBox` to read it from.
    ``distance_out``: (store, marker, dtype) where the core of the capped quantised distance map is staged
    for the neck pass, which then reads it instead of computing the distance transform again.
    ``reach``: (the ``peak_reach`` ratio, the whole volume's shape, whether to keep and flag the candidates it
    overlooks) for :func:`~gpu_pipeline.stages.peaks.within_reach`, or None.
    """
    extended = _extended(extended)
    xp = get_array_module(extended)
    # The maxima of the core only look one peak window (or reach) beyond it: the rest of the halo serves the
    # transform.
    look = peak_reach_voxels(half_widths, max_radius, spacing, None if reach is None else reach[0])
    window = tuple(slice(max(0, int(lo) - h), min(int(n), int(lo) + int(c) + h))
                   for lo, c, h, n in zip(left, core_shape, look, extended.shape))
    fg, distance_q = _capped_distance_q(extended, spacing, max_radius, window)
    left = [int(lo) - w.start for lo, w in zip(left, window)]
    extended = extended[window]
    core = tuple(slice(lo, lo + int(n)) for lo, n in zip(left, core_shape))
    if distance_out is not None:
        store, marker, dtype = distance_out
        region = tuple(slice(int(o), int(o) + int(n)) for o, n in zip(origin, core_shape))
        write_block(distance_q[core].astype(dtype), store, region, marker)
    coords = local_maxima(distance_q, half_widths=half_widths, core=core)
    shift = xp.asarray([int(o) - int(lo) for o, lo in zip(origin, left)], dtype=xp.int64)
    overlooked = None
    if reach is not None:
        ratio, shape, flagged = reach
        within = within_reach(distance_q, coords, PeakReach(ratio, spacing, max_radius), half_widths, shape, shift)
        if flagged:
            overlooked = to_host(~within)
        else:
            coords = coords[within]
    capped = int(((distance_q[core] >= quantize_cap(max_radius, spacing)) & fg[core]).sum())
    values = distance_q[tuple(coords.T)]
    region = extended[tuple(coords.T)]
    return to_host(coords + shift), to_host(values), to_host(region), capped, overlooked


def _haloed_peak_candidates(extended, left, origin, core_shape, spacing, half_widths, max_radius, distance_out,
                            reach):
    """:func:`_block_peak_candidates` of a block whose halo holds its neighbours' foreground as 0 and 1
    (:func:`~gpu_pipeline.chunked.source.haloed_tasks`): the distance transform reads the halo as foreground
    only, and the candidates' regions come from the core."""
    return _block_peak_candidates(extended, origin, left, core_shape, spacing, half_widths, max_radius,
                                  distance_out, reach)


def distance_dtype(max_radius, spacing):
    """The narrowest type of the staged capped distance map (uint16 while the cap's quantised value fits)."""
    return np.dtype(np.uint16) if quantize_cap(max_radius, spacing) <= np.iinfo(np.uint16).max else np.dtype(np.int32)


def _extended_blocks(regions, depth, store, device):
    """Per chunk: (index, origin, core shape, halo width on the low side, chunk with its halo).

    ``store``: the Zarr store ``regions`` was staged in: the chunk with its
    halo is a :class:`StagedBox` that the task using it reads (only its block
    and halo); without it, a delayed block with the halo from ``dask.array.overlap``.
    """
    import dask.array as da

    if store is None:
        regions = fit_halo(regions, depth, "distance-transform and peak")
        blocks = da.overlap.overlap(regions, depth=dict(enumerate(depth)), boundary="none").to_delayed()
    for index, core in block_boxes(regions.chunks):
        origin, core_shape = [b.start for b in core], [b.stop - b.start for b in core]
        if store is None:
            left = [depth[a] if i > 0 else 0 for a, i in enumerate(index)]
            extended = blocks[index]
        else:
            box, left = halo_box(origin, [o + c for o, c in zip(origin, core_shape)], depth, regions.shape)
            extended = StagedBox(store, tuple(box), device)
        yield index, origin, core_shape, left, extended


def peaks_chunked(regions, *, spacing, min_distance, max_radius, store=None, device=None, verbose=False,
                  workspace=None, reach=None, return_overlooked=False):
    """Peaks of the capped distance map of ``regions > 0``: the in-memory `find_peaks` result, for any chunking.

    ``store``: the Zarr store ``regions`` was staged in; each chunk is then
    read from it by two tasks, one handing its neighbours the foreground of
    their halos, one computing the chunk's candidates with its halo (memory:
    one extended block per task); by the second alone when the tasks that
    staged the regions wrote those halos (``regions_chunked``'s ``halo``).
    Without it the halo comes from ``dask.array.overlap``.

    ``workspace`` (with ``store``): each task also stages its core of the
    capped distance map as ``distance``, for :func:`neck_groups_chunked`.

    ``reach``: the ``peak_reach`` ratio or None (the halo then reaches further, :func:`peak_halo`).
    ``return_overlooked``: keep the candidates the reach overlooks, as `find_peaks` does.

    Returns a dict: ``peaks`` (n, ndim) int64 in C order, ``values`` (int32
    quantised distances), ``region`` (int64), ``n_capped`` voxels at the cap;
    with ``return_overlooked`` (and a reach), ``overlooked`` (bool per peak).
    """
    from dask import delayed

    half = window_half_widths(min_distance, spacing)
    depth = peak_halo(min_distance, max_radius, spacing, reach)
    flagged = reach is not None and return_overlooked
    block_reach = None if reach is None else (float(reach), tuple(int(n) for n in regions.shape), flagged)
    staged = None
    if workspace is not None and store is not None:
        dtype = distance_dtype(max_radius, spacing)
        staged = workspace.open_stage("distance", shape=regions.shape, chunks=regions.chunks, dtype=dtype)
    stored = stored_volume(regions) if store is not None else None
    if stored is not None and neighbours_hold_halo(regions.chunks, depth):
        # Each block read twice, its halo (the foreground only, in bits) from its neighbours' tasks: a box read
        # with its halo from the store decodes every chunk it touches whole (0.87 s against 0.11 s for the 32
        # blocks of 256x512x512 in 128^3 chunks, halo 17, 2026-12-03).
        args = []
        for index, core in block_boxes(regions.chunks):
            args.append(([b.start for b in core], [b.stop - b.start for b in core], tuple(spacing), half,
                         float(max_radius), None if staged is None else (staged[0], staged[1](index), dtype),
                         block_reach))
        # The halos' slabs as the regions' staging tasks wrote them, when they did (regions_chunked's ``halo``).
        given = None if workspace is None else workspace.written_halos(PEAK_HALOS, shells_key(regions.chunks, depth))
        tasks = haloed_tasks(stored, regions.chunks, depth, _haloed_peak_candidates, args, name="peak-candidates",
                             foreground=True, spill=None if workspace is None or given else workspace.halos(PEAK_HALOS),
                             given=given)
    else:
        tasks = []
        for index, origin, core_shape, left, extended in _extended_blocks(regions, depth, store, device):
            out = None if staged is None else (staged[0], staged[1](index), dtype)
            tasks.append(delayed(_block_peak_candidates)(extended, origin, left, core_shape, tuple(spacing), half,
                                                         float(max_radius), out, block_reach))
    parts = run_tasks(tasks, "distance transform + peak candidates", voxels=int(np.prod(regions.shape)),
                      verbose=verbose)
    if workspace is not None:
        workspace.discard_halos(PEAK_HALOS)
    if staged is not None:
        staged[2]()
    ndim = regions.ndim
    coords = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, ndim), np.int64)
    values = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int32)
    region = np.concatenate([p[2] for p in parts]).astype(np.int64) if parts else np.zeros(0, np.int64)
    overlooked = np.concatenate([p[4] for p in parts]) if parts and flagged else np.zeros(coords.shape[0], bool)
    order = np.argsort(np.ravel_multi_index(tuple(coords.T), regions.shape), kind="stable")
    coords, values, region, overlooked = coords[order], values[order], region[order], overlooked[order]
    keep = run_call(space_candidates_by_reach, coords, ~overlooked if flagged else None, half)
    found = {"peaks": coords[keep].astype(np.int64), "values": values[keep].astype(np.int32),
             "region": region[keep], "n_capped": int(sum(p[3] for p in parts))}
    if flagged:
        found["overlooked"] = overlooked[keep]
    return found


def _block_neck_minima(extended, origin, left, core_shape, spacing, max_radius, starts, ends):
    """Lowest capped distance, per segment, over the segment's samples that fall in this chunk's core."""
    _, distance_q = _capped_distance_q(_extended(extended), spacing, max_radius)
    return _segment_minima_in(distance_q, origin, left, core_shape, starts, ends)


def _stored_neck_minima(store, origin, core_shape, starts, ends, device):
    """:func:`_block_neck_minima` from the distance map the peak pass staged (no distance transform)."""
    region = tuple(slice(int(o), int(o) + int(n)) for o, n in zip(origin, core_shape))
    distance_q = read_staged(store, region, device)
    return _segment_minima_in(distance_q, origin, [0] * len(origin), core_shape, starts, ends)


def _segment_minima_in(distance_q, origin, left, core_shape, starts, ends):
    xp = get_array_module(distance_q)
    m = len(starts)
    ends_points = np.concatenate([starts, ends])
    pair, points = segment_points(ends_points, np.arange(m), np.arange(m) + m)
    origin = np.asarray(origin, np.int64)
    inside = ((points >= origin) & (points < origin + np.asarray(core_shape, np.int64))).all(axis=1)
    local = xp.asarray(points[inside] - origin + np.asarray(left, np.int64))
    low = np.full(m, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(low, pair[inside], to_host(distance_q[tuple(local.T)]).astype(np.int64))
    return low


def _pairs_by_block(low_corner, high_corner, starts, numblocks):
    """(block linear index, pair index) for every block a pair's bounding box meets, sorted by block."""
    ndim = len(numblocks)
    lo = np.stack([np.searchsorted(starts[a], low_corner[:, a], side="right") - 1 for a in range(ndim)], axis=1)
    hi = np.stack([np.searchsorted(starts[a], high_corner[:, a], side="right") - 1 for a in range(ndim)], axis=1)
    span = hi - lo + 1
    count = span.prod(axis=1)
    pair = np.repeat(np.arange(len(count)), count)
    rest = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
    block = np.zeros((len(pair), ndim), np.int64)
    for a in reversed(range(ndim)):
        block[:, a] = lo[pair, a] + rest % span[pair, a]
        rest //= span[pair, a]
    key = np.ravel_multi_index(tuple(block.T), numblocks)
    order = np.argsort(key, kind="stable")
    return key[order], pair[order]


def neck_groups_chunked(regions, found, *, spacing, min_distance, max_radius, ratio, nearby=None, store=None,
                        device=None, verbose=False, distance_store=None):
    """The in-memory :func:`~gpu_pipeline.stages.peaks.neck_groups` of the peaks ``found`` by `peaks_chunked`.

    The pairs to test come from the global peak list; each chunk recomputes
    its capped distance map (exact in its core, as for the peaks) and
    reports the lowest value, per segment, of the samples in its core; the
    minima reduce over chunks. ``distance_store``: the map :func:`peaks_chunked`
    staged; each chunk then reads its core from it instead, and a list of
    more than :data:`~gpu_pipeline.stages.by_box.PEAKS_PER_BOX` peaks is
    grouped box by box on the workers where more than one task runs at once
    (:func:`~gpu_pipeline.stages.by_box.neck_groups_by_box`). Returns the
    group of each peak.
    """
    peaks, heights = found["peaks"], found["values"]
    if distance_store is not None:
        group = by_box.neck_groups_by_box(peaks, heights, found["region"], regions.shape, spacing, ratio, nearby,
                                          read=functools.partial(_read_staged_box, distance_store),
                                          run=functools.partial(_run_on_workers, what="necks between peaks",
                                                                verbose=verbose), parallel=engine_threads())
        if group is not None:
            return group
    depth = peak_halo(min_distance, max_radius, spacing)

    def segment_minima(i, j):
        # One pass over the chunks per batch of pairs (one batch unless the
        # peaks' balls overlap by the million).
        nonlocal regions
        if store is None:  # the blocks _extended_blocks iterates: a short last chunk joins its neighbour
            regions = fit_halo(regions, depth, "distance-transform and peak")
        starts = chunk_starts(regions.chunks)
        key, pair = _pairs_by_block(np.minimum(peaks[i], peaks[j]), np.maximum(peaks[i], peaks[j]), starts,
                                    regions.numblocks)
        low = np.full(len(i), np.iinfo(np.int64).max, dtype=np.int64)
        calls, call_pairs = [], []
        for index, origin, core_shape, left, extended in _extended_blocks(regions, depth, store, device):
            b = int(np.ravel_multi_index(index, regions.numblocks))
            mine = pair[np.searchsorted(key, b, side="left"):np.searchsorted(key, b, side="right")]
            if mine.size == 0:
                continue
            call_pairs.append(mine)
            if distance_store is not None:
                calls.append((distance_store, origin, core_shape, peaks[i[mine]], peaks[j[mine]], device))
            else:
                calls.append((extended, origin, left, core_shape, tuple(spacing), float(max_radius),
                               peaks[i[mine]], peaks[j[mine]]))
        # Each chunk's minima are a few milliseconds' work: several chunks per task, each reading its own block
        # (one per task when the blocks come from ``dask.array.overlap``, or a task would hold several).
        function = _stored_neck_minima if distance_store is not None else _block_neck_minima
        parts = run_grouped(function, calls, "necks between peaks", verbose=verbose,
                            group=BLOCK_GROUP if store is not None else 1)
        for mine, part in zip(call_pairs, parts):
            np.minimum.at(low, mine, part)
        return low

    return join_peaks(peaks, heights, found["region"], spacing, ratio, segment_minima, nearby=nearby,
                      nearest_first=False)


def _run_on_workers(function, calls, *, what, verbose):
    """A ``run`` of :mod:`gpu_pipeline.stages.by_box` on the active scheduler, one box a task."""
    return run_grouped(function, calls, what, group=1, verbose=verbose)


def _read_staged_box(store, low, high):
    """The box ``low``-``high`` of the staged store at ``store``, on the host."""
    return to_host(read_staged(store, tuple(slice(int(a), int(b)) for a, b in zip(low, high))))


def ball_shares_chunked(peaks, heights, region, group, spacing, *, power=True, tested=None, shape=None,
                        verbose=False):
    """:func:`~gpu_pipeline.stages.peaks.ball_shares` of a chunked run's global peak list: box by box on the
    active scheduler (:func:`~gpu_pipeline.stages.by_box.ball_shares_by_box`) where it runs more than one task
    at once and the boxes pay, else in one call (with one, their halos would only add work), on a worker of a
    cluster (:func:`~gpu_pipeline.chunked.workspace.run_call`: its compiled test is loaded there, and the
    client never loads the compiler); the same arrays."""
    return by_box.ball_shares_by_box(peaks, heights, region, group, spacing, power=power, tested=tested,
                                     shape=shape, run=functools.partial(_run_on_workers, what="ball shares",
                                                                        verbose=verbose), parallel=engine_threads(),
                                     whole=functools.partial(run_call, by_box.box_ball_shares))


def _seeds_on(seeds, xp):
    if xp is np:
        return seeds
    table = ops_for(xp.empty(0)).device_table  # one device copy per worker, not per chunk
    return KMeansSeeds(centres=table(seeds.centres), centre_region=table(seeds.centre_region),
                       radii=None if seeds.radii is None else table(seeds.radii),
                       multi=table(seeds.multi), margin=seeds.margin, centre_label=table(seeds.centre_label))


def _assign_block(regions, seeds, centres, spacing, origin):
    """Voxels of multi-peak regions in one block: local flat indices and chosen global centroid indices."""
    if get_array_module(regions) is np:
        return _assign_block_compiled(regions, seeds, np.asarray(centres), spacing, origin)
    return _assign_block_array(regions, seeds, centres, spacing, origin)


def _assign_block_array(regions, seeds, centres, spacing, origin):
    """:func:`_assign_block` in array code (the GPU's; on NumPy, the reference of the compiled pass)."""
    xp = get_array_module(regions)
    seeds = _seeds_on(seeds, xp)
    centres = ops_for(regions).device_table(centres)
    flat, coords, groups, offsets, ids = block_candidates(regions, seeds, origin=origin, spacing=spacing)
    if flat.size == 0:
        return flat, xp.zeros(0, dtype=xp.int64)
    # Only the centroids this block can use go to the k-means, in global order (same ties).
    used, local = unique_ids(ids, return_inverse=True)
    chosen, _, _ = batched_kmeans(coords, groups, offsets, local.ravel(), centres[used], spacing=spacing,
                                  radii=None if seeds.radii is None else seeds.radii[used], max_iter=0)
    return flat, used[chosen]


def _assign_block_compiled(regions, seeds, centres, spacing, origin):
    """:func:`_assign_block` on the CPU in one compiled pass (``split.assign_compiled``, as in memory).

    The lists are built from the same centroids as :func:`block_candidates`
    (those of the block's regions near it, or all of those regions'
    centroids when a voxel falls back to its region's full list), in global
    order, so every voxel gets the same candidates, sums and ties: the same
    choice as the array path and as the in-memory run.
    """
    flat = np.flatnonzero(seeds.multi[regions].ravel())
    if flat.size == 0:
        return flat, np.zeros(0, dtype=np.int64)
    choice = np.empty(regions.shape, dtype=np.int64)
    _assign_compiled_into(regions, seeds, centres, spacing, origin, choice, np.arange(seeds.centres.shape[0]))
    return flat, choice.ravel()[flat]


def _assign_compiled_into(regions, seeds, centres, spacing, origin, out, value):
    """``out[voxel] = value[its centroid]`` for the multi-peak voxels of ``regions`` (compiled, CPU), the
    others left as they are: :func:`_assign_block_compiled`'s choice written where it goes."""
    from cpu_fallback.kernels import labels_present

    # Every region id of the block marks it present: the centroids' regions are multi-peak ones, so the
    # selections are those of the multi-peak voxels' regions, without listing those voxels.
    near, of_present = candidate_selections(seeds, None, origin=origin, shape=regions.shape, spacing=spacing,
                                            present=labels_present(regions, seeds.multi.size - 1))
    highest = np.asarray([int(o) for o in origin]) + np.asarray(regions.shape) - 1
    for selection, listed in selection_passes(near, of_present):
        n_fallback = assign_compiled(regions, seeds, selection, centres, value[selection], out,
                                     spacing=spacing, origin=origin, highest=highest, listed=listed)
        if n_fallback == 0:
            break


def _split_block(regions, seeded, spacing, n_regions, dtype, edges, block_id=None):
    seeds, centres = seeded
    origin = block_origin(edges, block_id)
    labels = regions.astype(dtype)
    if get_array_module(regions) is np:  # the compiled pass writes each voxel's label itself
        _assign_compiled_into(regions, seeds, np.asarray(centres), spacing, origin, labels,
                              n_regions + 1 + seeds.centre_label)
        return labels
    flat, chosen = _assign_block(regions, seeds, centres, spacing, origin)
    labels.ravel()[flat] = n_regions + 1 + ops_for(regions).device_table(seeds.centre_label)[chosen]
    return labels


def _partial_sums(regions, seeds, centres, spacing, origin):
    """Per-centroid voxel counts and integer coordinate sums of one block (host arrays)."""
    xp = get_array_module(regions)
    flat, chosen = _assign_block(regions, seeds, centres, spacing, origin)
    n = int(np.asarray(centres).shape[0])
    coords = xp.stack(xp.unravel_index(flat, regions.shape), axis=1).astype(xp.int64)
    coords += xp.asarray([int(o) for o in origin], dtype=xp.int64)
    counts = xp.bincount(chosen, minlength=n)
    sums = xp.stack([xp.bincount(chosen, weights=coords[:, a].astype(xp.float64), minlength=n)
                     for a in range(regions.ndim)], axis=1)
    return to_host(counts), to_host(sums)


def lloyd_chunked(regions, seeds, *, spacing, max_iter, verbose=False):
    """Centroids after up to ``max_iter`` Lloyd updates, reduced over chunks (as in-memory `batched_kmeans`).

    Integer coordinate sums make the reduction order-free; iterations stop
    when the centroids stop moving, which yields the in-memory assignment.
    """
    from dask import delayed

    centres = seeds.centres
    blocks = regions.to_delayed()
    for _ in range(max_iter):
        tasks = [delayed(_partial_sums)(blocks[index], seeds, centres, tuple(spacing), [b.start for b in core])
                 for index, core in block_boxes(regions.chunks)]
        parts = run_tasks(tasks, "k-means update", verbose=verbose)
        counts = sum(p[0] for p in parts)
        sums = sum(p[1] for p in parts)
        filled = counts > 0
        new = np.where(filled[:, None], sums / np.maximum(counts, 1)[:, None], centres)
        if np.array_equal(new, centres):
            break
        centres = new
    return centres


def one_piece_chunked(labels, *, workspace, device=None, verbose=False):
    """In-memory ``relabel_by_first_voxel(enforce_one_piece(labels))`` on a chunked label array.

    One pass (:func:`components_chunked` with faces): each task labels its
    block's pieces, stages them and returns per-piece sizes, values and which
    pieces touch; every round of the one-piece rule then runs on those small
    tables (:func:`~gpu_pipeline.stages.components.settle_pieces`), and the
    final ids are the staged pieces through one table, block by block.

    Returns ``(final labels (lazy int32), number of particles, rounds run)``.
    """
    pieces = components_chunked(labels, by_value=True, faces=True, workspace=workspace, name="pieces",
                                device=device, verbose=verbose)

    def settle():
        table, _, rounds = settle_pieces(pieces.value, pieces.size, pieces.piece_pairs, ONE_PIECE_ROUNDS)
        return {"table": table, "rounds": rounds}

    settled = workspace.remember("one_piece", settle)
    table = settled["table"]
    n = int(table.max()) if table.size else 0
    if n == 0:
        return pieces.labels, 0, int(settled["rounds"])
    dtype = id_dtype(n)
    return pieces.through(table.astype(dtype), dtype), n, int(settled["rounds"])


def _kept_peaks(found, keep):
    """The :func:`peaks_chunked` result ``found`` with only the peaks ``keep`` selects (their values and regions
    too), its ``overlooked`` flags dropped once used."""
    kept = {key: value for key, value in found.items() if key != "overlooked"}
    kept.update({key: found[key][keep] for key in ("peaks", "values", "region")})
    return kept


def chunked_parameters(ndim, *, sigma, min_distance, min_size, max_radius, max_iter, neck_ratio, nearby_ratio,
                       peak_reach, reach_share, ball_share):
    """:func:`separate_chunked`'s parameters checked (a one-line :class:`DeclumpError` for the first bad one, as
    in-memory ``separate`` words it) and resolved: the ratios' ``auto`` for ``ndim``, ``max_radius``'s default
    (``MAX_RADIUS_FACTOR * min_distance``) and ``min_size``'s (a ball of diameter ``min_distance``). ``run_chunked``
    calls it before it touches a folder, so a bad value is reported as such and leaves nothing behind."""
    # 'auto' measures the whole image at once; `declump run` gives a chunked run fixed values instead (1 and 4
    # voxels of the finest axis) and says so, the API asks for them.
    if isinstance(sigma, str):
        raise DeclumpError(f"chunked runs need sigma as a number (physical units), got {sigma!r}: the automatic "
                           "choice needs the whole image at once (declump run uses 1 voxel in a chunked run)")
    if isinstance(min_distance, str):
        raise DeclumpError(f"chunked runs need min_distance as a number (about the smallest particle radius), got "
                           f"{min_distance!r}: the automatic choice needs the whole image at once (declump run uses 4 "
                           "voxels in a chunked run)")
    sigma = 0.0 if sigma is None else sigma
    check_auto_or_number("sigma", sigma, positive=False)
    if not (min_distance > 0):
        raise DeclumpError(f"min_distance must be a positive physical distance, got {min_distance}")
    if min_size is not None:
        check_auto_or_number("min_size", min_size, positive=False)
    check_max_iter(max_iter)
    ratios = {name: resolve_ratio(name, value, ndim) for name, value in (
        ("neck_ratio", neck_ratio), ("nearby_ratio", nearby_ratio), ("peak_reach", peak_reach),
        ("reach_share", reach_share), ("ball_share", ball_share))}
    max_radius = float(max_radius) if max_radius is not None else MAX_RADIUS_FACTOR * float(min_distance)
    if not (max_radius > 0 and math.isfinite(max_radius)):
        raise DeclumpError(f"max_radius must be a positive physical distance, got {max_radius}")
    return {"sigma": float(sigma), "min_size": ball_size(min_distance, ndim) if min_size is None else float(min_size),
            "max_radius": max_radius, **ratios}


def separate_chunked(volume, *, spacing=None, sigma=1.0, threshold="otsu", polarity="auto", mask=None,
                     min_distance=4.0, min_size=None, max_radius=None, neck_ratio="auto", nearby_ratio="auto",
                     peak_reach="auto", reach_share="auto", ball_share="auto", assignment="power", max_iter=0,
                     workspace=None, device=None, verbose=False, classifier=None):
    """`separate` for a chunked Dask array: byte-identical labels for any chunking, memory bounded by chunks.

    Parameters are those of :func:`gpu_pipeline.pipeline.separate` (method
    ``kmeans``, engine ``batched``; no hole filling; outlines on the
    threshold's contour, ``outline="threshold"``), plus:

    max_radius : float, optional
        Largest inscribed particle radius, physical units (default
        ``MAX_RADIUS_FACTOR * min_distance``). Sets the halo of the distance
        transform; the result equals ``separate(..., max_radius=max_radius)``,
        which equals plain ``separate`` when no voxel is deeper than it
        (``details.n_capped_voxels`` counts those that reach it).
    workspace : Workspace, optional
        Folder for staged intermediates and saved results (resumable); none:
        everything stays lazy and is recomputed by each pass.
    device : "gpu" or None
        ``gpu``: chunks are moved to the GPU (CuPy) for every stage.
    classifier : PixelClassifier, path or shipped model name, optional
        The foreground from a pixel classifier, as in-memory ``separate``
        (:mod:`gpu_pipeline.chunked.classifier`); its lazy probabilities are
        in ``details.probabilities``.

    Returns
    -------
    labels : dask.array.Array of int32, lazy (reads the workspace's stores)
    details : ChunkedDetails
    """
    reference = volume if volume is not None else mask
    if reference is None:
        raise DeclumpError("separate_chunked needs a volume, a mask, or both")
    import dask.array as da

    for name, given in (("volume", volume), ("mask", mask)):
        if given is not None and not isinstance(given, da.Array):
            raise DeclumpError(f"separate_chunked takes Dask arrays, got a {type(given).__name__} as the {name}; wrap "
                               "it (dask.array.from_array(a, chunks=...)) or, for an array in memory, use separate")
    if volume is not None and mask is not None and tuple(mask.shape) != tuple(volume.shape):
        raise DeclumpError(f"mask shape {tuple(mask.shape)} differs from the volume's shape {tuple(volume.shape)}")
    if mask is not None and np.dtype(mask.dtype).kind not in "buif":
        raise DeclumpError(f"mask has dtype {mask.dtype}; accepted: {MASK_ACCEPTED}")
    if workspace is not None and not isinstance(workspace, Workspace):  # a folder's path: its workspace
        workspace = Workspace(workspace, verbose=verbose)
    if reference.ndim not in (2, 3):
        raise DeclumpError(f"the volume has {reference.ndim} dimensions {tuple(reference.shape)}; declump accepts "
                           "2D or 3D")
    spacing = validate_spacing(spacing, reference.ndim)
    p = chunked_parameters(reference.ndim, sigma=sigma, min_distance=min_distance, min_size=min_size,
                           max_radius=max_radius, max_iter=max_iter, neck_ratio=neck_ratio, nearby_ratio=nearby_ratio,
                           peak_reach=peak_reach, reach_share=reach_share, ball_share=ball_share)
    sigma, min_size, max_radius = p["sigma"], p["min_size"], p["max_radius"]
    neck_ratio, nearby_ratio, peak_reach = p["neck_ratio"], p["nearby_ratio"], p["peak_reach"]
    reach_share, ball_share = p["reach_share"], p["ball_share"]
    volume, mask = (None if a is None else to_device(a, device) for a in (volume, mask))
    workspace = workspace or Workspace(None, verbose=verbose)
    details = ChunkedDetails(max_radius=max_radius, halo=peak_halo(min_distance, max_radius, spacing, peak_reach))
    halos = {"distance-transform and peak": details.halo}
    if classifier is not None:
        from gpu_pipeline.chunked.classifier import probabilities_chunked
        from gpu_pipeline.classifier import foreground_probability, load_classifier
        from gpu_pipeline.stages.features import feature_halo

        if mask is not None or volume is None:
            raise DeclumpError("a pixel classifier needs the volume and replaces the mask; give one of --classifier "
                               "and --mask")
        classifier = load_classifier(classifier)
        halos["pixel-feature"] = feature_halo(spacing, classifier.scales)
    elif mask is None and sigma and sigma > 0:
        halos["smoothing"] = gaussian_radius(tuple(float(sigma) / s for s in spacing))
    # Refuse a too-small chunk shape before any pass runs, by the largest halo the run needs on each axis
    # (one at a time, a user was sent from one minimum to the next).
    largest = tuple(max(halo[axis] for halo in halos.values()) for axis in range(reference.ndim))
    named = [what for what, halo in halos.items() if tuple(halo) == largest]
    fit_halo(reference, largest, named[0] if named else f"combined ({', '.join(halos)})")
    if classifier is not None:
        details.probabilities = probabilities_chunked(volume, classifier, spacing=spacing, workspace=workspace,
                                                      device=device)
        mask = foreground_probability(details.probabilities, classifier.classes)

    regions, n_regions, details.threshold, details.polarity = regions_chunked(
        volume, spacing=spacing, sigma=sigma, threshold=threshold, polarity=polarity, min_size=min_size,
        mask=mask, workspace=workspace, device=device, halo=details.halo, notes=details.warnings)
    for line in details.warnings if verbose else ():
        print(line, file=sys.stderr)  # now, not after a long run that it may have wasted
    details.n_regions = n_regions
    if n_regions == 0:
        raise NoParticlesError("no particles found: the foreground is empty after thresholding and removing objects "
                               f"smaller than {min_size:g} (physical units); check polarity, threshold or min_size")
    found = workspace.remember("peaks", lambda: peaks_chunked(
        regions, spacing=spacing, min_distance=min_distance, max_radius=max_radius,
        store=workspace.store("regions"), device=device, verbose=verbose, workspace=workspace, reach=peak_reach,
        return_overlooked=reach_share is not None))
    # The ball shares of the global peak list box by box on the workers, as in memory: no voxel is read.
    shares = functools.partial(ball_shares_chunked, verbose=verbose)
    if "overlooked" in found:
        found = _kept_peaks(found, rescued_peaks(found["peaks"], found["values"], found["region"],
                                                 found["overlooked"], spacing, reference.shape, reach_share,
                                                 power=assignment == "power", shares=shares))
    details.n_peaks, details.n_capped_voxels = int(len(found["peaks"])), int(found["n_capped"])
    _, quantum = quantize_distance(np.zeros(1, np.float32), spacing)
    radii = found["values"].astype(np.float64) * quantum
    group = None
    if (neck_ratio, nearby_ratio) != (None, None):
        group = workspace.remember("necks", lambda: {"group": neck_groups_chunked(
            regions, found, spacing=spacing, min_distance=min_distance, max_radius=max_radius, ratio=neck_ratio,
            nearby=nearby_ratio, store=workspace.store("regions"), device=device, verbose=verbose,
            distance_store=workspace.store("distance"))})["group"]
    if ball_share is not None:
        keep = shadowed_peaks(found["peaks"], found["values"], found["region"], group, spacing, reference.shape,
                              max_radius, ball_share, power=assignment == "power", shares=shares)
        found = _kept_peaks(found, keep)
        radii, group = radii[keep], regroup(group, keep)
    seeds = kmeans_seeds(found["region"], n_regions, found["peaks"], radii, assignment=assignment,
                         peak_group=group)
    if seeds is None:
        split = regions
    else:
        centres = seeds.centres
        if max_iter:
            centres = workspace.remember("centres", lambda: {"centres": lloyd_chunked(
                regions, seeds, spacing=spacing, max_iter=max_iter, verbose=verbose)})["centres"]
        from dask import delayed

        # One task holding both: with two roots, Dask's array optimisation (fuse_roots) ran its legacy task
        # fusion over every block's task of the pass (12 ms a run for 32 blocks, 93 ms for 256), to no effect.
        seeded = delayed((seeds, centres), traverse=False)
        dtype = id_dtype(n_regions + 1 + int(np.max(seeds.centre_label, initial=0)))
        # Not staged: the first round of one_piece_chunked computes each block's split and stages its pieces.
        split = regions.map_blocks(functools.partial(_split_block, edges=grid_edges(regions.chunks)), seeded,
                                   tuple(spacing), n_regions, dtype, dtype=dtype)
    labels, details.n_particles, details.one_piece_rounds = one_piece_chunked(split, workspace=workspace, device=device, verbose=verbose)
    details.blocks_computed = dict(workspace.computed)
    details.blocks_total = dict(workspace.totals)
    return labels, details
