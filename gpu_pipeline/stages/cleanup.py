"""Mask cleanup: drop specks, fill small holes. Sizes are physical (volume in 3D, area in 2D)."""
from __future__ import annotations

import math

import numpy as np

from gpu_pipeline._backend import get_array_module, ops_for, to_host
from gpu_pipeline.stages.components import component_table
from gpu_pipeline.stages.peaks import find_peaks, quantize_distance, segment_minima, window_half_widths


def voxels_for(size, spacing) -> int:
    """Physical size (area or volume, units of ``spacing``) as a voxel count, rounded up."""
    return int(math.ceil(float(size) / math.prod(float(s) for s in spacing) - 1e-9))


def remove_small_objects(mask, min_voxels: int, table=None):
    """Drop face-connected foreground components smaller than ``min_voxels`` voxels.

    Same result as ``skimage.morphology.remove_small_objects(mask, min_voxels, connectivity=1)``.
    ``table``: ``mask``'s ``(labels, count, sizes)`` where they are known
    (:func:`gpu_pipeline.stages.components.component_table`).
    """
    if min_voxels <= 1:
        return mask
    labels, count, sizes = component_table(mask) if table is None else table
    if count == 0:
        return mask
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[labels]


def fill_small_holes(mask, max_hole_voxels: int, background_table=None):
    """Fill face-connected background components smaller than ``max_hole_voxels`` voxels.

    Like ``skimage.morphology.remove_small_holes``; a bounded hole size keeps
    the operation local, which a chunked volume needs. ``background_table``:
    the component table of ``~mask`` where it is known.
    """
    if max_hole_voxels <= 1:
        return mask
    return ~remove_small_objects(~mask, max_hole_voxels, background_table)


#: ``max_hole_size="auto"`` also fills the cavity of a hollow particle: a hole (a background component that
#: touches no face of the image) whose inscribed radius is at least this fraction of the depth of the
#: foreground at the hole once every hole is filled (:func:`fill_shell_holes`): a rim thinner than 1.5 times
#: its cavity's radius. SEM particles with bright edges, rings and hollow rods pass (their rims alone were
#: split into dozens of wedges). Gaps among touching solid particles inside a cluster do not: the cluster's
#: other gaps are filled for the measurement, so the gap is as deep as the cluster. Chosen on emps_subset
#: (pooled F1@0.5 of the defaults, 2026-12-05: 0.333 -> 0.426; per image 0.533 -> 0.578); emps_train_rest, the
#: check, 0.456 -> 0.472; 33 images changed, one lower (-0.058), and no generated 2D or 3D condition of
#: bench.defaults_sweep changed. 0.3 and below filled gaps among particles (11 EMPS images and the generated
#: large particles lost); 0.5 filled half the cavities that 0.4 fills. Measured against the rim's own depth
#: instead (the foreground nearer the hole than any other background), which also tells a gap in a lone ring of
#: six solid particles (filled here) from a cavity, it gave 0.408 and 0.465: one thick spot on a rim kept the
#: cavity open.
SHELL_HOLE_DEPTH = 0.4

#: By the number of dimensions: ``max_hole_size="auto"`` also fills a hole that takes at least this share of the
#: piece of foreground it lies in (that piece with every hole filled), where that piece touches no face of
#: the image: a particle's grainy or slit-shaped core (SEM rods with bright edges, hollow shells whose cavity
#: is rough), whose inscribed radius stays under :data:`SHELL_HOLE_DEPTH` of the depth, cut the particle into
#: dozens of pieces (EMPS 41bb4d19a4: 93 for 4). The pockets among touching particles take a small share of
#: their cluster: three touching discs enclose 1.7 % of it, four in a square 6.4 %, a ring of five 12 %.
#: 2D 0.07, set by that geometry (just above the four discs' pocket), measured at the defaults (2026-12-05,
#: defaults_sweep_2026-12-05_s37_core_share.md, ..._s37_variants.md): pooled F1@0.5 on emps_subset 0.5202 ->
#: 0.5536, mean F1 0.4848 -> 0.5142; emps_train_rest 0.6246 -> 0.6340, 0.4493 -> 0.4572; 16 EMPS images
#: gain and 3 lose more than 0.02 (at most 0.096, e3a800b533); the generated nuclei 0.8855 -> 0.8936, DSB,
#: the other generated sets and 3D unchanged. 0.05 scored a little higher (0.5595, 0.6345) but fills the
#: pocket of four touching discs. Without the faces condition 0.05 and 0.1 each lost two or three images
#: whole: the gaps among packed cubes in a cluster the frame cuts (34864e691e, 0.588 -> 0) and a figure's
#: letter box in a corner, filled, then set the typical radius (e73bcbd77d, 0.571 -> 0). 3D: off (None), not
#: measured on volumes with such cores.
SHELL_HOLE_SHARE = {2: 0.07, 3: None}


def enclosed_components(labels, count):
    """Per label 0..``count`` of ``labels``: whether that component touches no face of the image (label 0:
    False)."""
    xp = get_array_module(labels)
    enclosed = xp.ones(count + 1, dtype=bool)
    enclosed[0] = False
    for axis in range(labels.ndim):
        for index in (0, -1):
            enclosed[xp.take(labels, index, axis=axis).ravel()] = False
    return enclosed


def fill_shell_holes(mask, spacing, ratio=SHELL_HOLE_DEPTH, share="auto"):
    """Fill the holes of ``mask`` that are the cavities of hollow particles: ``(mask, holes filled)``.

    A hole is a face-connected background component that touches no face of
    the image. Its inscribed radius (the deepest point of the background's
    distance map in it) is compared with the depth of the mask with every
    hole filled, at the hole (the maximum of that distance map over the
    hole): the hole is filled where the first is at least ``ratio`` of the
    second (:data:`SHELL_HOLE_DEPTH`), a rim thinner than
    ``(1 - ratio) / ratio`` times the hole's radius. A gap among solid
    particles inside a cluster is as deep as the cluster and stays; a gap
    in a lone ring of particles, near the background outside, can pass.
    A hole is also filled where it takes at least ``share`` of the piece of
    the mask it lies in, that piece with its holes filled, and that piece
    touches no face of the image (a particle's grainy core; ``"auto"``:
    :data:`SHELL_HOLE_SHARE` by the number of dimensions, None: off).
    Physical units (``spacing``); the two distance transforms and the
    labelling of the filled mask run only where there is a hole.
    """
    if share == "auto":
        share = SHELL_HOLE_SHARE[mask.ndim]
    xp = get_array_module(mask)
    ops = ops_for(mask)
    labels, count = ops.label(~mask)
    if count == 0:
        return mask, 0
    enclosed = enclosed_components(labels, count)
    if not bool(enclosed.any()):
        return mask, 0
    inside = enclosed[labels]
    owner = labels[inside]
    radius = xp.zeros(count + 1, dtype=xp.float32)
    # A hole voxel's distance to the mask is its distance to the nearest voxel outside the holes: walking from
    # it towards any such voxel, axis by axis, the first voxel that leaves its hole is a face neighbour of the
    # hole, so a mask voxel, and no farther along any axis. The transform of the holes alone gives the same
    # values where they are read and costs a read of each line without holes (the mask's background would
    # cost a whole transform: 0.2 s of a 4096^2 image, twice a run).
    ops.scatter_max(radius, owner, ops.distance_transform(inside, spacing)[inside])
    depth = xp.zeros(count + 1, dtype=xp.float32)
    ops.scatter_max(depth, owner, ops.distance_transform(mask | inside, spacing)[inside])
    shells = enclosed & (radius >= xp.float32(ratio) * depth)
    if share is not None:
        # Each hole lies in one piece of the mask with its holes filled; compare the voxel counts.
        pieces, n_pieces = ops.label(mask | inside)
        piece = xp.zeros(count + 1, dtype=xp.int64)
        ops.scatter_max(piece, owner, pieces[inside].astype(xp.int64))
        # Only a piece wholly inside the image: one the frame cuts may be part of a cluster or a figure's
        # panel whose share cannot be judged.
        area = xp.bincount(owner.ravel(), minlength=count + 1)
        whole = enclosed_components(pieces, n_pieces)[piece]
        shells |= whole & (area >= float(share) * xp.bincount(pieces.ravel(), minlength=n_pieces + 1)[piece])
    filled = int(shells.sum())
    return (mask | shells[labels], filled) if filled else (mask, 0)


def clean_mask(mask, *, spacing, min_size, max_hole_size, tables=None):
    """Remove objects smaller than ``min_size`` and fill holes smaller than ``max_hole_size`` (physical units).

    ``tables``: the component tables of ``mask`` and of its background, where the threshold's polarity
    labelled them (:func:`gpu_pipeline.stages.threshold.threshold_foreground`); the mask's serves the object
    removal where no hole was filled (the mask is then unchanged)."""
    own, background = tables if tables is not None else (None, None)
    hole_voxels = voxels_for(max_hole_size, spacing)
    if background is not None and hole_voxels > 1 and bool((background[2][1:] < hole_voxels).any()):
        own = None  # holes are filled: the mask's components change
    mask = fill_small_holes(mask, hole_voxels, background)
    return remove_small_objects(mask, voxels_for(min_size, spacing), own)


#: 2D ``max_hole_size="auto"``: a filled hole is opened again where it is a pocket between particles, not a hole
#: in one (:func:`pocket_holes`): two peaks whose inscribed balls reach it have a neck between them in the filled
#: mask, the distance map on their segment dropping below this fraction of the lower peak. Inside one convex
#: particle the distance map is concave and never dips between two of its points, so a hole there (a nucleolus,
#: grain) stays filled; the pocket among touching discs leaves their necks, about 0.6 of a disc's radius at the
#: generated 20 % overlap. Chosen on generated images before any EMPS image was run (demo and base discs, discs
#: of radius 25-40, uneven nuclei seeds 0-2 and 100-105: 0.9 split nuclei whose dim, ragged mask dips around a
#: nucleolus, F1@0.5 0.894 -> 0.870; 0.7 0.887, 0.6 0.886, with the same gains on the discs; a first form that
#: took the peaks from a whole split of the unfilled mask), then measured on the 366 EMPS images (see README,
#: Automatic choices).
POCKET_NECK_RATIO = 0.7
#: Holes smaller than this many voxels are pixel noise in the particles: always filled, not judged.
POCKET_MIN_VOXELS = 4
#: Directions in which a peak's inscribed circle is probed for the holes it touches, one and two voxels beyond it.
POCKET_DIRECTIONS = 64
#: Peaks that a hole's test looks at, the deepest first, and pairs of them tested, nearest first (four discs
#: around a pocket make 6 pairs, six make 15): the work grows linearly with the holes.
POCKET_MAX_PEAKS = 32
POCKET_MAX_PAIRS = 16
#: Peaks probed at once (their probes' coordinates: about 4 MiB per thousand).
POCKET_PEAK_BATCH = 1 << 14


def _place_in_runs(group):
    """For a host array ``group`` sorted so that equal values are adjacent: each element's place in its run of
    equal values (0, 1, ...) and that run's length."""
    start = np.r_[0, np.flatnonzero(group[1:] != group[:-1]) + 1] if group.size else np.zeros(0, np.int64)
    length = np.diff(np.r_[start, group.size])
    return np.arange(group.size) - np.repeat(start, length), np.repeat(length, length)


def pocket_holes(before, after, spacing, min_distance, before_distance=None, after_distance=None):
    """The holes that filling made in 2D ``after`` (``before`` with its small holes filled, specks removed) which
    are pockets between particles: ``(mask, count)``, the bool mask of those to open again and their number.

    The particle centres are the peaks of ``before``'s distance map (``before_distance``, computed when None)
    at least ``min_distance`` apart (:func:`~gpu_pipeline.stages.peaks.find_peaks`); a peak touches the holes
    that its inscribed circle reaches (probed in :data:`POCKET_DIRECTIONS` directions one and two voxels beyond
    it). A hole of :data:`POCKET_MIN_VOXELS` voxels or more is a pocket where two peaks touching it have a neck
    between them in the filled mask: the distance map of ``after`` (``after_distance``) on their segment drops
    below :data:`POCKET_NECK_RATIO` of the lower of the two (see there). A hole inside one particle leaves no
    such neck: filling it is what makes the particle whole, while filling a pocket between touching particles
    widens their necks until the peaks join or merge. Physical units (``spacing``).
    """
    xp = get_array_module(after)
    ops = ops_for(after)

    def none():
        return xp.zeros(after.shape, dtype=bool), 0

    filled = after & ~before
    if after.ndim != 2 or not bool(filled.any()):
        return none()
    holes, count = ops.label(filled)
    sizes = ops.label_sizes(holes, count)
    judged = sizes >= POCKET_MIN_VOXELS
    judged[0] = False
    if not bool(judged.any()):
        return none()
    if before_distance is None:
        before_distance = ops.distance_transform(before, spacing)
    quantized, _ = quantize_distance(before_distance, spacing)
    peaks = find_peaks(quantized, half_widths=window_half_widths(min_distance, spacing))
    del quantized
    if peaks.shape[0] < 2:
        return none()
    # The holes each peak's inscribed circle reaches: its circle probed one and two voxels beyond its radius;
    # only peaks that lie that near a judged hole, in batches (bounded memory, whatever the peaks).
    step = min(float(s) for s in spacing)
    near = ops.distance_transform(~judged[holes], spacing)[tuple(peaks.T)]
    radius = before_distance[tuple(peaks.T)].astype(xp.float64)
    probed = xp.flatnonzero(near <= radius + 2 * step + math.hypot(*spacing) / 2)
    angle = xp.arange(POCKET_DIRECTIONS, dtype=xp.float64) * (2 * math.pi / POCKET_DIRECTIONS)
    unit = xp.stack([xp.sin(angle) / float(spacing[0]), xp.cos(angle) / float(spacing[1])], axis=1)
    upper = xp.asarray(after.shape, dtype=xp.float64) - 1
    n_peaks = peaks.shape[0]
    touched = []  # hole * n_peaks + peak, for each probe that lands in a judged hole
    for start in range(0, int(probed.size), POCKET_PEAK_BATCH):
        some = probed[start:start + POCKET_PEAK_BATCH]
        for beyond in (1, 2):
            points = xp.rint(peaks[some][:, None, :] + (radius[some] + beyond * step)[:, None, None] * unit[None])
            points = xp.clip(points, 0, upper).astype(xp.int64)
            found = holes[points[..., 0], points[..., 1]].astype(xp.int64)
            key = (found * n_peaks + some[:, None]).ravel()
            touched.append(key[judged[found.ravel()]])
    if not touched:
        return none()
    touched = to_host(xp.unique(xp.concatenate(touched)))  # each (hole, peak) once, by hole then peak
    peak_of, hole_of = touched % n_peaks, touched // n_peaks
    # At most POCKET_MAX_PEAKS per hole, the deepest (the particles' centres around it), so that its pairs stay
    # bounded where a ridge of equal peaks surrounds one hole.
    order = np.lexsort((-to_host(radius)[peak_of], hole_of))
    peak_of, hole_of = peak_of[order], hole_of[order]
    kept = _place_in_runs(hole_of)[0] < POCKET_MAX_PEAKS
    peak_of, hole_of = peak_of[kept], hole_of[kept]
    # Every pair of those peaks, once per hole: each (hole, peak) row with the rows after it in its hole's run.
    place, run = _place_in_runs(hole_of)
    later = run - place - 1
    row = np.repeat(np.arange(hole_of.size), later)
    partner = row + 1 + np.arange(row.size) - np.repeat(np.cumsum(later) - later, later)
    if row.size == 0:
        return none()
    # At most POCKET_MAX_PAIRS per hole, nearest first (particles around a pocket are each other's nearest).
    first, second, pair_hole = peak_of[row], peak_of[partner], hole_of[row]
    host_peaks = to_host(peaks)
    gap = (((host_peaks[first] - host_peaks[second]) * np.asarray(spacing, dtype=np.float64)) ** 2).sum(axis=1)
    order = np.lexsort((gap, pair_hole))
    first, second, pair_hole = first[order], second[order], pair_hole[order]
    kept = _place_in_runs(pair_hole)[0] < POCKET_MAX_PAIRS
    first, second, pair_hole = (xp.asarray(v[kept]) for v in (first, second, pair_hole))
    if after_distance is None:
        after_distance = ops.distance_transform(after, spacing)
    lowest = segment_minima(after_distance, peaks, first, second)
    ends = xp.minimum(after_distance[tuple(peaks[first].T)], after_distance[tuple(peaks[second].T)])
    neck = lowest < xp.float32(POCKET_NECK_RATIO) * ends.astype(xp.float32)
    pocket = xp.zeros(count + 1, dtype=bool)
    pocket[pair_hole[neck]] = True
    return pocket[holes], int(pocket.sum())


def merge_small_particles(labels, min_voxels: int, *, renumber=False):
    """Particles of under ``min_voxels`` voxels dropped, unless touching small ones together reach it: then one.

    A split can cut a fragment off a particle's rim (dropped: the particle
    is whole without it) or cut a rod into short pieces that touch each
    other (joined again, so that nothing that passed the object size check
    vanishes). Joined pieces take the lowest of their ids. Ids are not
    renumbered, unless ``renumber``: then ``labels`` must be numbered 1..n
    in C order of first voxel (as :func:`~gpu_pipeline.stages.split.finish_labels`
    leaves them) and the result is too, in the same gather, equal to
    :func:`~gpu_pipeline.stages.components.relabel_by_first_voxel` of the
    result without it: the lowest id of joined pieces is the one whose first
    voxel comes first, so the particles left keep the order of their ids.
    """
    import numpy as np
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    xp = get_array_module(labels)
    count = int(labels.max())
    if min_voxels <= 1 or count == 0:
        return labels
    sizes = to_host(ops_for(labels).label_sizes(labels, count))
    small = sizes < min_voxels
    small[0] = False
    if not small.any():
        return labels
    # Face contacts between two different small particles.
    small_on_device = xp.asarray(small)
    pairs = []
    for axis in range(labels.ndim):
        a = xp.moveaxis(labels, axis, 0)
        first, second = a[:-1].ravel(), a[1:].ravel()
        touching = (first != second) & small_on_device[first] & small_on_device[second]
        pairs.append(xp.stack([first[touching], second[touching]]).astype(xp.int64))
    owner, neighbour = to_host(xp.concatenate(pairs, axis=1))
    graph = coo_matrix((np.ones(owner.size), (owner, neighbour)), shape=(count + 1, count + 1))
    _, group = connected_components(graph, directed=False)
    total = np.bincount(group, weights=sizes, minlength=group.max() + 1)
    # A group is named by its lowest id; big particles are their own group.
    head = np.full(group.max() + 1, count + 1, dtype=np.int64)
    np.minimum.at(head, group, np.arange(count + 1))
    mapping = head[group]
    mapping[small & (total[group] < min_voxels)] = 0
    mapping[0] = 0
    if renumber:
        kept = np.zeros(count + 1, dtype=np.int64)
        kept[mapping[mapping > 0]] = 1
        mapping = np.cumsum(kept)[mapping] * (mapping > 0)
    return xp.asarray(mapping.astype(np.int32))[labels]
