"""`separate`: the whole pipeline on one in-memory image, on whichever device holds the array."""
from __future__ import annotations

import contextvars
import functools
import math
import time
from dataclasses import dataclass, field

import numpy as np

from gpu_pipeline._backend import DeclumpError, get_array_module, ops_for
from gpu_pipeline._common import UnusableValuesError, usable_cores, whole_number_at_least
from gpu_pipeline.stages.annotations import annotation_ink, annotation_mask, annotation_zone, info_band
from gpu_pipeline.stages import by_box
from gpu_pipeline.stages.boundary_split import boundary_split
from gpu_pipeline.stages.cleanup import (clean_mask, fill_shell_holes, merge_small_particles, pocket_holes,
                                         voxels_for)
from gpu_pipeline.stages.distance import cleaned_distance
from gpu_pipeline.stages.outline import OUTLINES, edge_outlines
from gpu_pipeline.stages.peaks import (PeakReach, find_peaks, neck_groups, quantize_distance, regroup, rescued_peaks,
                                       shadowed_peaks, window_half_widths)
from gpu_pipeline.stages.split import finish_labels, split_regions_kmeans, split_regions_watershed
from gpu_pipeline.stages.scale import MIN_DISTANCE_PER_RADIUS, maxima_radius, noise_sigma, typical_radius
from gpu_pipeline.stages.threshold import THRESHOLD_METHODS, check_threshold, threshold_foreground


#: ``max_hole_size="auto"`` fills holes up to a ball of this fraction of the typical particle radius.
HOLE_RADIUS_PER_RADIUS = 0.4
#: ``sigma="auto"``: one voxel, doubled (at most this many times) while doubling it makes the foreground's
#: typical radius at least ``NOISE_GROWTH`` times larger (it was noise grain, not particles).
SIGMA_DOUBLINGS = 3
NOISE_GROWTH = 3.0
#: ``sigma="auto"`` is then raised to this fraction of the typical particle radius (measured at the sigma
#: above), where that at least ``SIGMA_RAISE``-fold raises it: the texture of large particles (EM film, crystal
#: facets) is smoothed away and does not over-split them, and small particles keep their sigma. Chosen on
#: emps_subset and nuclei seeds 0-3 (0.15 and 0.2 cost the nuclei 0.03-0.14 F1@0.5 in a sweep); the 2-fold
#: guard came after the DSB image (a check set) lost 0.06 (0.759 -> 0.699) to a raise from 1 to 1.4 px.
#: bench/auto_foreground.py, row "sigma: no radius rule": emps_subset 0.256 -> 0.272, nuclei unchanged. A raise
#: that changes the polarity is undone (foreground_step): it closed the gaps of packed particles (2026-12-05,
#: defaults_sweep_2026-12-05_s36_raise_guard.md: EMPS pooled F1@0.5 0.5640 -> 0.5829).
SIGMA_PER_RADIUS = 0.1
SIGMA_RAISE = 2.0
#: ``sigma="auto"`` raises the sigma (above) only where the last doubling of it grew the typical radius at least
#: this many times (it was not ``NOISE_GROWTH`` times, or the doubling would have been kept): texture that
#: smoothing heals, which the raise is for. Solid particles keep their radius when the sigma doubles (their edges
#: move by a fraction of it), and for them the raise only blurred the edges and closed the gaps between touching
#: particles (generated discs of radius 25-40: F1@0.5 0.692 with the raise, 0.825 without). 1.25 was chosen
#: before measuring; on emps_subset (the design set) 1.1, 1.15, 1.25 and 1.4 give pooled F1@0.5 0.5144, 0.5108,
#: 0.5075, 0.5055 and mean F1 0.4726, 0.4726, 0.4768, 0.4724, against 0.5067 and 0.4418 with the raise
#: everywhere and 0.5012 and 0.4631 with no raise; on emps_train_rest 0.5992 -> 0.6088 and mean F1 0.4006 ->
#: 0.4402 (2026-12-05, defaults_sweep_2026-12-05_s37_texture.md). DSB, generated nuclei and 3D unchanged.
TEXTURE_GROWTH = 1.25
#: ``min_size="auto"``: objects, and after the split particles, smaller than this fraction of the typical
#: particle (a ball of the typical radius) are specks of film texture or fragments split off a rim; per number
#: of dimensions. 2D: 0.2 (a disk of 0.45 x the radius), chosen on emps_subset, nuclei seeds 0-3 and the demo's
#: generated disks (radii 5-12, the smallest 0.21 of that ball): 0.2 / 0.35 give F1@0.5 0.272 / 0.308 on
#: emps_subset and 0.909 / 0.893 on the nuclei; on the demo 0.2 keeps 0.764, 0.25 gives 0.750 and 0.35 for the
#: pieces after the split 0.69. bench/auto_foreground.py, row "min_size=None": emps_subset 0.235 -> 0.272.
#: Revisited at the full defaults (2026-12-05 evening, against defaults_sweep_2026-12-05_s41_lone_strokes.md):
#: it drops the small particles of a wide size range (radius 3-30 in 512^2: the typical radius 26-28, so
#: particles under 12 px go; F1@0.5 0.674, 0.737 with min_size 20), but smaller fractions lose more on the
#: real images: 0.1 / 0.05 give radius 3-30 0.713 / 0.724, and EMPS 0.6035 -> 0.5880 / 0.5734 and
#: 0.6687 -> 0.6468 / 0.6206, the uneven nuclei 0.907 -> 0.895 / 0.888; keeping 0.2 for the objects and
#: taking a quarter of it (or none) for the particles after the split: radius 3-30 0.688, EMPS 0.5856 / 0.6345
#: (0.5766 / 0.6094). 0.2 stays.
#: 3D: 1/512 (a ball of an eighth of the radius). The typical radius (size-weighted: clusters of touching
#: spheres, each as deep as its largest) is near the largest particles' radius, so the fraction must leave room
#: for spheres much smaller than the largest. 0.2 (a ball of 0.58 x the radius) merged and dropped the smaller
#: spheres: on 24 random 160^3 volumes (bench.random_volumes draws, rng 31 and 32, radii 3-18), sigma 1 and
#: min_distance 4, mean F1@0.5 0.840 (lowest 0.578) where the bench's fixed min_size 65 gives 0.978. 1/64 (a
#: quarter of the radius) matched the fixed 65 there, but not where the largest radius is 4-8 x the smallest
#: (eight 256^3 volumes, radii 3-20 (two), 3-24, 4-18, 3-16, 3-14, 5-25, 3-12; sigma 1, min_distance 4,
#: 2026-12-04): mean F1@0.5 0.8757 (0.833-0.939) against 0.9012 with 65, whole small spheres merged into their
#: larger neighbours; 1/216 0.8976, 1/512 0.9006 (0.874-0.962; below 65 by 0.004 at most). On the narrow draws
#: (rng 31, 32) 1/64, 1/216 and 1/512 score the same (0.9792 at the defaults). The embryo 3D nuclei (24,
#: similar sizes) keep 0.840 at all three (0.875 with 0.2).
MIN_SIZE_PER_PARTICLE = {2: 0.2, 3: 1 / 512}


#: ``min_distance="auto"`` in 3D is at least this many voxels of the coarsest axis. A window of one voxel (a
#: 3x3x3 box) takes noise maxima for particles: touching spheres of radius 2-4 and 2.5-5 (160^3, 2026-12-04)
#: gave F1@0.5 0.290 and 0.407 at the 1.5 and 1.58 the maxima's depth asked for, 0.557 and 0.713 at 2.
MIN_WINDOW_VOXELS_3D = 2.0


class NoParticlesError(DeclumpError):
    """The foreground is empty after thresholding and cleanup."""


class FilledImageError(NoParticlesError):
    """After hole filling the foreground covers the whole image: nothing is left to tell particles apart."""


@dataclass
class SeparationDetails:
    """What a run decided and measured: threshold, polarity, scale, counts, per-stage seconds.

    ``threshold_method`` is the method that made the foreground (``auto``
    reports the one it chose; where that is ``li``, the particles Otsu's
    threshold finds keep Otsu's outline; ``sparse`` where Otsu's threshold split the background's noise and
    Otsu's threshold beyond it was taken; ``fixed`` for a number, None for a mask),
    ``threshold_candidates`` the thresholds of the methods weighed (under ``auto``
    with dark particles, ``li`` is Li's threshold for the dark side, on the
    mirrored histogram: ``threshold.li_from_histogram``),
    ``intensity_range`` the percentile range ``auto`` clipped to;
    ``particle_radius`` the typical radius measured for the ``auto`` options,
    ``min_distance``, ``max_hole_size`` and ``min_size`` the values used
    (physical units); ``annotation_pixels`` the foreground pixels removed as
    figure annotations, ``info_band`` the lines an information band along
    one edge left to the picture (``(axis, start, stop)``, see
    :func:`~gpu_pipeline.stages.annotations.info_band`; None: no band);
    ``shell_holes`` the cavities of hollow particles that ``auto`` hole
    filling filled; ``pocket_holes`` the small holes it left open as pockets
    between touching particles (2D, :func:`~gpu_pipeline.stages.cleanup.pocket_holes`); ``outlines_moved`` the
    particles whose outline ``outline="edge"`` moved to their edge (:func:`~gpu_pipeline.stages.outline.edge_outlines`);
    ``polarity_solidity`` both sides' particle solidity where ``auto`` polarity weighed them (2D, see ``separate``).
    """

    threshold: float | None = None
    polarity: str | None = None
    threshold_method: str | None = None
    threshold_candidates: dict = field(default_factory=dict)
    intensity_range: tuple | None = None
    particle_radius: float | None = None
    sigma: float | None = None
    min_distance: float | None = None
    max_hole_size: float | None = None
    min_size: float | None = None
    annotation_pixels: int = 0
    info_band: tuple | None = None
    shell_holes: int = 0
    pocket_holes: int = 0
    outlines_moved: int = 0
    polarity_solidity: dict | None = None
    n_regions: int = 0
    n_peaks: int = 0
    n_particles: int = 0
    n_iter: int = 0
    timings: dict = field(default_factory=dict)
    probabilities: object = None  # the pixel classifier's (n_classes, *shape) map, when one was used


def validate_file_spacing(spacing, ndim, path):
    """:func:`validate_spacing` of a voxel size read from ``path``'s metadata (OME-Zarr's scale, a TIFF's
    calibration): a refusal names the file and ``--spacing``, which the user did not give and which overrides it."""
    try:
        return validate_spacing(spacing, ndim)
    except DeclumpError as exc:
        why = f"not {ndim} positive numbers (one per axis)" if str(exc).startswith("spacing must be") else exc
        raise DeclumpError(f"{path}'s metadata gives the voxel size {tuple(spacing)}: {why}; give --spacing (one "
                           "positive number per axis) to set it instead") from None


def validate_spacing(spacing, ndim):
    """Voxel size per axis as a tuple of positive floats (default: all 1)."""
    if spacing is None:
        return (1.0,) * ndim
    given = spacing
    if isinstance(spacing, str) and "," in spacing:  # the command line's spelling, "2,1,1"
        spacing = spacing.split(",")
    elif isinstance(spacing, str) or np.ndim(spacing) == 0:
        spacing = (spacing,) * ndim
    try:
        spacing = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise DeclumpError(f"spacing must be {ndim} positive numbers (one per axis, plane/row/column order), got "
                           f"{given!r}") from None
    if len(spacing) != ndim or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise DeclumpError(f"spacing must be {ndim} positive numbers (one per axis, plane/row/column order), "
                           f"got {spacing}")
    if not all(SPACING_RANGE[0] <= s <= SPACING_RANGE[1] for s in spacing):
        raise DeclumpError(f"spacing {spacing} is outside {SPACING_RANGE[0]:g} to {SPACING_RANGE[1]:g}, where squared "
                           "distances stay within float32's range (in which the distance transform runs); give the "
                           "voxel size in a unit that brings it there (e.g. nm instead of m)")
    return spacing


#: Voxel sizes ``validate_spacing`` accepts: their squares (and those of a volume's diagonal) stay well inside
#: float32's normal range (1.2e-38 to 3.4e38); 1e-30 overflowed the outline's gradient and changed the result.
SPACING_RANGE = (1e-12, 1e12)


#: ``neck_ratio="auto"`` by the number of dimensions. 2D: 0.97, peaks with a dip of at most 3 % (and the
#: grid's voxel, peaks.NECK_TOLERANCE_VOXELS) between them make one particle: in a projection image, touching
#: particles overlap and often show no neck (at the 2D defaults 0.95 gave F1@0.5 0.9382 -> 0.9316 on generated
#: nuclei seeds 0-3, equal on seeds 100-105, 0.7615 -> 0.7660 on DSB; 0.9 lowered all three, 2026-12-03).
#: 1.0 until 2026-12-05; with the neck test's wider 2D reach (peaks.NECK_REACH), real images gain from 0.97
#: and 0.95 and generated ones lose a little: pooled F1@0.5 at 1.0 / 0.97 / 0.95 on emps_subset 0.5129 /
#: 0.5202 / 0.5261, emps_train_rest 0.6174 / 0.6246 / 0.6304, DSB 0.7468 / 0.7500 / 0.7532, generated nuclei
#: (seeds 0-2 and 100-105) 0.8925 / 0.8855 / -, the base 2D discs 0.8189 / 0.8110 / 0.8105 and discs of radius
#: 25-40 0.8251 / 0.8251 / 0.8000 (defaults_sweep_2026-12-05_s37_necks.md, ..._s37_variants.md). 3D: 0.95.
#: Solid particles do not overlap in a volume, so touching ones meet at a neck, while a large particle pressed
#: by its neighbours can hold two distance-map maxima a dip of a few percent apart; joined, they stop
#: over-splitting it. Measured
#: 2026-12-03 on ten generated 256^3 volumes (radii 3-16, bench parameters): F1@0.5 equal on eight, higher
#: on two (seed 4711 0.99700 -> 0.99850, 1002 -> 999 particles for 1000; seed 202 0.92140 -> 0.92162),
#: never lower; 0.9 was lower on two; the embryo 3D nuclei unchanged.
NECK_RATIO_AUTO = {2: 0.97, 3: 0.95}

#: ``nearby_ratio="auto"`` by the number of dimensions: off in 2D, 0.8 in 3D. In a volume a solid particle's
#: centre cannot lie deep inside its neighbour's inscribed ball, so a lower peak within 0.8 of a higher peak's
#: height from it is a second maximum of the same particle (PoreSpy SNOW's ``trim_nearby_peaks`` rule, f 0.8);
#: in a projection image overlapping particles do put one centre inside the other's disc. Measured 2026-12-03
#: at the bench parameters: ten generated 256^3 volumes (overlap 0.15, radii 3-16) F1@0.5 higher on six
#: (seed 3141 0.99834 -> 0.99889, 903 -> 902 pieces for 900), equal on four, mean F1 never lower; 60 random
#: 96^3-128^3 volumes (overlap 0.05-0.25) mean F1@0.5 0.96237 -> 0.96253, mean F1 0.78922 -> 0.78948, 9
#: higher and 8 lower (7 of the 8 at overlap 0.25); f 1.0 lowered five of the ten; the 2D sets at f 0.8:
#: generated nuclei 0.9382 -> 0.9204 and 0.8687 -> 0.8576, DSB 0.7615 -> 0.7521 (EMPS rose 0.31 -> 0.33 and
#: 0.43 -> 0.49); the embryo 3D nuclei unchanged.
NEARBY_RATIO_AUTO = {2: None, 3: 0.8}

#: ``peak_reach="auto"`` by the number of dimensions: off in 2D, 0.7 in 3D. A peak must be the highest voxel
#: of the distance map within 0.7 of its own height (its inscribed radius), not only within ``min_distance``:
#: a large particle pressed by its neighbours holds second maxima 6-10 voxels from its first, beyond the
#: peak window of a small ``min_distance`` but well inside its own inscribed ball, while a small particle's
#: centre keeps the small window its size calls for. Measured 2026-12-03 at the bench parameters on 24 held-out
#: random 256^3 volumes (radii 3-17, 15-45 % of the volume): F1@0.5 higher on 10, lower on 4, mean F1 0.84949
#: -> 0.84977, below the watershed pipeline's F1@0.5 on 1 instead of 2 (README, Method step 6). In 2D, 0.7 with
#: the window at 0.3 of the typical radius (2026-12-05, defaults_sweep_2026-12-05_s41_window030_reach07.md):
#: the generated sets rise (base 2D 0.841 -> 0.868), the EMPS images fall (pooled F1@0.5 0.6035 -> 0.5799 and
#: 0.6687 -> 0.6558, 79 images lower, 32 higher), DSB 0.767 -> 0.759.
PEAK_REACH_AUTO = {2: None, 3: 0.7}

#: ``reach_share="auto"``: 0.6 (2D and 3D; it acts only with the reach, off in 2D by default). A maximum that
#: the reach overlooks stays a centre when it keeps at least 0.6 of its own inscribed ball from every other
#: peak of its region: a small sphere pressed against larger ones, overlooked from a neighbour's rising flank,
#: keeps most of its ball, while a second maximum of one sphere keeps well under half. Measured 2026-12-03 at
#: the bench parameters (README, Method step 6), against off: 24 random 256^3 volumes (chosen on) F1@0.5
#: higher on 7, lower on none (0.7: 6 higher, a lower mean); 24 held-out ones higher on 9, lower on 1, mean F1
#: higher on 10, lower on none; 24 fresh ones (run once with the peers) higher on 8, lower on 3.
REACH_SHARE_AUTO = {2: 0.6, 3: 0.6}

#: ``ball_share="auto"`` by the number of dimensions: 0.5 in 2D and 3D. A group of peaks that keeps less than
#: half of its own inscribed ball from the other groups of its region is dropped (a second maximum where
#: particles meet: its piece would take a sliver of each). Measured 2026-12-03 (README, Method step 8): 24
#: held-out random 256^3 volumes F1@0.5 higher on 6, lower on none; the 366 EMPS images at the defaults 0.4085
#: -> 0.4317 (both halves higher); DSB, generated 2D nuclei and the embryo 3D nuclei unchanged.
BALL_SHARE_AUTO = {2: 0.5, 3: 0.5}

#: The tables of the options :func:`resolve_ratio` resolves.
RATIO_AUTO = {"neck_ratio": NECK_RATIO_AUTO, "nearby_ratio": NEARBY_RATIO_AUTO, "peak_reach": PEAK_REACH_AUTO,
              "reach_share": REACH_SHARE_AUTO, "ball_share": BALL_SHARE_AUTO}


def resolve_ratio(name, value, ndim):
    """``neck_ratio``, ``nearby_ratio``, ``peak_reach``, ``reach_share`` or ``ball_share`` (``name``) as a number
    in (0, 1] or None; ``"auto"`` by its table (:data:`RATIO_AUTO`)."""
    if isinstance(value, str):
        if value == "off":  # the command line's spelling of None
            return None
        if value != "auto":
            raise DeclumpError(f"{name} must be 'auto', a number in (0, 1] or None ('off'), got {value!r}")
        return RATIO_AUTO[name][ndim]
    if value is not None and not (0 < float(value) <= 1):
        raise DeclumpError(f"{name} must be 'auto', a number in (0, 1] or None ('off'), got {value}")
    return None if value is None else float(value)


def binary_values(image) -> bool:
    """Does ``image`` hold exactly two values, 0 and one positive value (a network's mask saved as 0/1 or 0/255)?

    A strided sample decides most images at once; only a sample of two values is checked in full.
    """
    xp = get_array_module(image)
    if np.dtype(image.dtype).kind not in "uif" or image.size < 2:
        return False
    flat = image.reshape(-1)
    sample = flat[::max(1, flat.size // 65536)]
    high = float(sample.max())
    if float(sample.min()) != 0 or high <= 0 or bool(((sample != 0) & (sample != high)).any()):
        return False
    return float(image.min()) == 0 and float(image.max()) == high and not bool(
        xp.logical_and(image != 0, image != image.dtype.type(high)).any())


#: What ``kmeans_engine`` accepts: declump's batched k-means, or a per-region reference (scikit-learn, cuML).
KMEANS_ENGINES = ("batched", "sklearn", "cuml")


def check_not_masked(image, mask):
    """Refuse a NumPy masked array as the image or the mask: its mask was dropped without a word (called by
    every ``separate`` before it converts its arrays)."""
    for what, given in (("image", image), ("mask", mask)):
        if isinstance(given, np.ma.MaskedArray):
            raise DeclumpError(f"the {what} is a NumPy masked array, whose mask declump does not read; pass a plain "
                               f"array ({what}.filled(value) or {what}.data), and where particles may lie as mask=")


def validate_image(image, name="image"):
    """Refuse what the pipeline cannot use, with one line saying what is accepted."""
    xp = get_array_module(image)
    if image.ndim not in (2, 3):
        raise DeclumpError(f"{name} has {image.ndim} dimension{'' if image.ndim == 1 else 's'} {tuple(image.shape)}; "
                           "declump accepts 2D (rows, columns) or 3D (planes, rows, columns) arrays; pick a "
                           "channel/time point first")
    if image.size == 0:
        raise DeclumpError(f"{name} is empty (shape {tuple(image.shape)}); pass a non-empty 2D or 3D array")
    if min(image.shape) < 2:
        raise DeclumpError(f"{name} has shape {tuple(image.shape)}, one pixel along an axis; declump accepts 2D and 3D "
                           "arrays at least 2 pixels along every axis (a stack of one plane: pass that plane as 2D)")
    kind = np.dtype(image.dtype).kind
    if kind not in "uif":
        raise DeclumpError(f"{name} has dtype {image.dtype}; declump accepts integer or floating-point intensities "
                           "(a boolean mask goes to --mask, mask= in Python)")
    if kind == "f" and not bool(xp.isfinite(image).all()):
        raise DeclumpError(f"{name} holds NaN or inf values; declump accepts finite intensities only")
    if wider_than_float32(image.dtype):
        # Values float32 cannot hold apart (smoothing and thresholds run in float32). Two reductions, not
        # abs(image): that was a float64 copy of the whole image (1 GiB for 512^3).
        check_float32_range(float(image.min()), float(image.max()), name)


def wider_than_float32(dtype) -> bool:
    """Whether ``dtype`` holds values float32 (in which declump smooths and thresholds) may not: 64-bit types
    and 32-bit integers."""
    dtype = np.dtype(dtype)
    return dtype.itemsize > 4 or (dtype.kind in "iu" and dtype.itemsize == 4)


def check_float32_range(low, high, name="image"):
    """Refuse values from ``low`` to ``high`` (of a dtype wider than float32) that float32, in which declump
    smooths and thresholds, cannot hold (beyond its range) or tell apart (a span too narrow for their size)."""
    largest = max(-low, high)
    if largest > float(np.finfo(np.float32).max):  # inf there
        raise DeclumpError(f"{name} holds values up to {largest:.3g}, beyond float32's range (3.4e38), in "
                           "which declump smooths and thresholds; rescale the image")
    if high > low and (high - low < largest * FLOAT32_LEVELS or largest < FLOAT32_SMALLEST):
        raise DeclumpError(f"{name}'s values span only {low:.12g} to {high:.12g} (a range of {high - low:.3g}), "
                           "which float32 (in which declump "
                           "smooths and thresholds) cannot tell apart; subtract the offset or rescale "
                           "(e.g. image - image.min(), or image / image.max())")


#: Float32 resolves a range of values when it spans at least this fraction of their magnitude (about 128 of
#: its 2**24 steps) and their magnitude is at least ``FLOAT32_SMALLEST`` (near float32's smallest normal value).
FLOAT32_LEVELS = 2.0 ** -16
FLOAT32_SMALLEST = 1e-30


#: A 3D array whose last axis is at most this long while the others are at least ``CHANNELS_LAST_OTHERS`` is a
#: 2D image with its colour channels (or a channel axis of 1) last, not a volume a few voxels wide.
CHANNELS_LAST_MAX = 4
CHANNELS_LAST_OTHERS = 16


def refuse_channels_last(shape, name="image"):
    """Refuse a 2D colour image given as a 3D array ``(rows, columns, channels)``: it would run as a volume."""
    shape = tuple(int(n) for n in shape)
    if len(shape) == 3 and shape[-1] <= CHANNELS_LAST_MAX and min(shape[:2]) >= CHANNELS_LAST_OTHERS:
        raise DeclumpError(f"{name} has shape {shape}: a 2D image with {shape[-1]} channel"
                           f"{'s' if shape[-1] > 1 else ''} last, not a volume {shape[-1]} voxel"
                           f"{'s' if shape[-1] > 1 else ''} wide; pass one grey 2D image (e.g. "
                           "skimage.color.rgb2gray(image) or image[..., 0]); volumes are (planes, rows, columns)")


#: What a mask may be, in the line that refuses one (in memory and chunked).
MASK_ACCEPTED = ("bool, non-negative integers (foreground where > 0: a 0/1 or 0/255 mask of an integer dtype, a "
                 "label image) or a floating-point probability map in [0, 1] (foreground where > 0.5)")


def _mask_from(mask, shape):
    if tuple(mask.shape) != tuple(shape):
        raise DeclumpError(f"mask shape {tuple(mask.shape)} differs from image shape {tuple(shape)}")
    return mask_foreground(mask)


def mask_foreground(mask, where=""):
    """The foreground of a mask (bool, or > 0.5), or a one-line error for values a mask cannot hold (NaN or inf,
    negative values, a float above 1: :data:`MASK_ACCEPTED`). ``where``: the part of the mask it is (a chunked
    run checks each block: ``" in its chunk at (0, 64, 0)"``)."""
    xp = get_array_module(mask)
    kind = np.dtype(mask.dtype).kind
    if kind == "b":
        return mask
    if kind not in "uif":
        raise DeclumpError(f"mask has dtype {mask.dtype}; accepted: {MASK_ACCEPTED}")
    if kind == "f" and not bool(xp.isfinite(mask).all()):
        raise DeclumpError(f"mask holds NaN or inf values{where}; accepted: {MASK_ACCEPTED}")
    low, high = float(mask.min()), float(mask.max())
    # Integers: > 0.5 is > 0, as chunked runs take them (a 0/255 mask saved as PNG was refused in memory only).
    if low < 0 or (kind == "f" and high > 1):
        raise DeclumpError(f"mask values span [{low:g}, {high:g}]{where}; accepted: {MASK_ACCEPTED}")
    return mask > 0.5


def _memory_error_names_stage(function):
    """A MemoryError raised in ``function`` gets ``stage``: the stage its `_StageClock` was running."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        token = _RUNNING_CLOCK.set(None)
        try:
            return function(*args, **kwargs)
        except MemoryError as exc:
            clock = _RUNNING_CLOCK.get()
            if clock is not None and getattr(exc, "stage", None) is None:
                exc.stage = clock.current
            raise
        finally:
            _RUNNING_CLOCK.reset(token)
    return wrapper


#: Set while :func:`_polarity_by_shape` runs its two separations (they do not ask for a second opinion).
_BY_SHAPE = contextvars.ContextVar("declump_polarity_by_shape", default=None)


def _polarity_by_shape_applies(image, mask, classifier) -> bool:
    """Does ``separate``'s ``polarity="auto"`` weigh the other side's result too: a 2D intensity image, its
    foreground thresholded (no mask, no classifier, not itself a mask)."""
    return (image is not None and mask is None and classifier is None and getattr(image, "ndim", 0) == 2
            and np.dtype(image.dtype).kind in "uif" and min(image.shape) >= 2 and not binary_values(image))


def _polarity_by_shape(arguments):
    """``separate(**arguments)`` with ``polarity="auto"`` in 2D: the side ``auto`` picks, and the other side
    separated too; the other side's labels are taken where their particles' area-weighted solidity
    (:func:`~gpu_pipeline.stages.threshold.shape_solidity`) exceeds the first's by
    ``POLARITY_SOLIDITY_MARGIN`` and both sides give ``POLARITY_MIN_PIECES`` particles. The border and
    connectivity rule (:func:`~gpu_pipeline.stages.threshold.choose_polarity`) takes the gaps of particles packed
    edge to edge for the particles (many small pieces, while the particles touch as one); the gaps' pieces
    are concave slivers, the particles round. The other side is run only where it could be taken (the first
    side's solidity more than the margin below 1). ``details.polarity_solidity`` records the solidity of the
    sides measured; ``details.timings["other polarity"]`` the seconds this step took."""
    from gpu_pipeline.stages.threshold import POLARITY_MIN_PIECES, POLARITY_SOLIDITY_MARGIN, shape_solidity

    token = _BY_SHAPE.set(True)
    try:
        labels, details = separate(**{**arguments, "return_details": True})
        started = time.perf_counter()
        first_solidity, first_pieces = shape_solidity(labels)
        solidity = {details.polarity: round(first_solidity, 4)}
        second = None
        # The other side is separated only where it could be taken: no solidity exceeds 1, so a first side
        # within the margin of it (round particles: most images) or with too few particles keeps its result.
        if first_pieces >= POLARITY_MIN_PIECES and first_solidity + POLARITY_SOLIDITY_MARGIN < 1.0:
            other = "dark" if details.polarity == "bright" else "bright"
            try:
                second = separate(**{**arguments, "polarity": other, "return_details": True})
            except DeclumpError:  # (nothing on that side: no particles, or it fills the image)
                pass
    finally:
        _BY_SHAPE.reset(token)
    if second is not None:
        other_solidity, other_pieces = shape_solidity(second[0])
        solidity[other] = round(other_solidity, 4)
        if other_pieces >= POLARITY_MIN_PIECES and other_solidity > first_solidity + POLARITY_SOLIDITY_MARGIN:
            labels, details = second
    details.polarity_solidity = solidity
    details.timings["other polarity"] = time.perf_counter() - started
    return (labels, details) if arguments["return_details"] else labels


@_memory_error_names_stage
def separate(image, *, spacing=None, sigma="auto", threshold="auto", polarity="auto", mask=None,
             min_distance="auto", min_size="auto", max_hole_size="auto", max_radius=None, neck_ratio="auto",
             nearby_ratio="auto", peak_reach="auto", reach_share="auto", ball_share="auto", method="kmeans",
             assignment="power", kmeans_engine="batched", max_iter=0, reject_annotations="auto", outline="auto",
             return_details=False, classifier=None, follow_boundaries=True):
    """Split touching particles: an instance label image with one id per particle.

    Runs on the device that holds ``image`` (NumPy: CPU fallback; CuPy: GPU).

    Parameters
    ----------
    image : ndarray, 2D (rows, columns) or 3D (planes, rows, columns)
        Intensities (integer or float). May be None when ``mask`` is given.
    spacing : float or sequence of float, optional
        Voxel size per axis, in physical units (e.g. nm); default 1 (voxels).
        Every size and distance below is in these units.
    sigma : "auto" or float
        Gaussian smoothing before thresholding, physical units; 0 disables
        it. ``auto`` (default): one voxel (the finest axis); in 3D raised
        (1.5, 2, 3 or 4 voxels) until the particles' contrast is
        ``NOISE_CNR`` times the noise the smoothing leaves
        (:func:`gpu_pipeline.stages.scale.noise_sigma`: rough surfaces of a
        noisy volume over-split its particles); then doubled up to
        ``SIGMA_DOUBLINGS`` times while doubling it makes the thresholded
        foreground's typical radius ``NOISE_GROWTH`` times larger, i.e.
        while the foreground is noise grain rather than particles (textured
        EM images); particles keep about their size. Then raised to
        ``SIGMA_PER_RADIUS`` times the typical radius measured there, so
        that the texture of large particles does not over-split them, but
        only where the last doubling grew that radius ``TEXTURE_GROWTH``
        times or more (texture that smoothing heals; solid particles keep
        their radius, and the raise would only blur their edges and close
        the gaps between them), and not where the raise changes the
        polarity.
    threshold : "auto", "otsu", "li", "triangle", "local" or float
        How the smoothed image becomes a foreground. ``otsu``, ``li`` and
        ``triangle`` are global thresholds from the histogram (equal to
        scikit-image's); ``local`` is Otsu's threshold above a background
        estimated over an eighth of the image (uneven illumination);
        ``auto`` (default; the image is first clipped to its 0.5-99.9
        percentiles where outliers would squeeze the histogram) picks Otsu
        or Li per image, Li keeping Otsu's outline for the particles Otsu finds
        (:func:`gpu_pipeline.stages.threshold.choose_method`), or ``sparse``
        where a few particles lie in a large field and Otsu's threshold
        splits the background's noise (Otsu's threshold of the voxels beyond
        that noise, :func:`gpu_pipeline.stages.threshold.sparse_foreground`); the choice is
        in the details (``threshold_method``). A number is a fixed
        threshold in image units.
    polarity : "auto", "bright" or "dark"
        Whether particles are brighter or darker than the background; see
        :func:`gpu_pipeline.stages.threshold.choose_polarity` for ``auto``.
        Where the side ``auto`` picks covers the whole image once its holes
        are filled (it was the background around the particles), the other
        side is taken; ``details.polarity`` reports the side used. In a 2D
        image with ``threshold="auto"`` (no ``mask`` or ``classifier``; a
        chunked run's fixed threshold keeps the rule alone, so that its result
        stays this function's) the other side is separated too, and taken
        where its particles are clearly more convex
        (:func:`_polarity_by_shape`: the gaps of close-packed particles make
        concave slivers); ``details.polarity_solidity`` gives both sides'.
    mask : ndarray, optional
        A foreground mask (bool or 0/1) or probability map in [0, 1] (e.g. from
        a neural network), used instead of the threshold; foreground is > 0.5.
    min_distance : "auto" or float
        Minimum separation of particle centres, physical units: a peak is at
        least as high as every voxel within this distance (a ball; with
        anisotropic spacing the ellipsoid of ``floor(min_distance / spacing)``
        voxels per axis), and of equal peaks closer than that one is kept
        (:func:`gpu_pipeline.stages.peaks.find_peaks`). Roughly the smallest
        particle radius. ``auto`` (default): ``MIN_DISTANCE_PER_RADIUS`` (0.5)
        times, in 2D, the typical particle radius measured on the foreground
        (:func:`gpu_pipeline.stages.scale.typical_radius`: the size-weighted
        median of the components' inscribed radii, so specks do not count), in
        3D the median depth of the distance map's maxima after cleanup
        (:func:`gpu_pipeline.stages.scale.maxima_radius`), at least
        ``MIN_WINDOW_VOXELS_3D`` voxels of the coarsest axis (:func:`auto_window`).
    min_size : "auto", float or None
        Objects smaller than this area (2D) or volume (3D), physical units, are
        removed. ``auto`` (default): ``MIN_SIZE_PER_PARTICLE`` (0.2 in 2D, 1/512
        in 3D) times the area or volume of a ball of the typical particle
        radius, applied to the foreground's objects and again to the
        particles after the split (fragments split off a particle's rim are
        dropped, touching pieces that together reach the size are joined:
        :func:`gpu_pipeline.stages.cleanup.merge_small_particles`); with a
        given ``min_distance``, at least a ball of that diameter. None, and
        ``auto`` with a ``mask``: a ball of diameter ``min_distance``,
        objects only.
    max_hole_size : "auto" or float
        Holes smaller than this area/volume (physical) are filled. ``auto``
        (default): holes up to a ball of ``HOLE_RADIUS_PER_RADIUS`` times the
        typical particle radius, which fills nucleoli but not the pockets
        enclosed between touching particles (those are as large as a
        particle, and filling them fuses particles and makes false
        distance-map peaks); and the cavities of hollow particles, holes
        whose rim is thin beside their radius
        (:func:`gpu_pipeline.stages.cleanup.fill_shell_holes`), after which
        the ``auto`` sizes are measured again. 0: off. With a ``mask`` or a
        ``classifier``, ``auto`` is 0: their foreground is taken as given.
    max_radius : float, optional
        Cap on the distance map, physical units (default: none). Chunked
        runs need one (their halo is this deep) and give exactly this
        function's result with the same cap. A particle whose inscribed radius
        exceeds it gets a plateau of peaks; the default ``neck_ratio`` joins
        them where segments between neighbouring plateau peaks stay on the
        plateau (a convex core), otherwise (or with ``neck_ratio=None``) the
        particle is over-split; particles joined by a neck wider than the
        cap merge.
    neck_ratio : "auto", float in (0, 1] or None
        Peaks of one region whose distance map never drops below
        ``neck_ratio`` times the higher peak on the segment between them (no
        neck) make one particle
        (:func:`gpu_pipeline.stages.peaks.neck_groups`; in 2D a dip of up to
        one voxel below that is allowed, the grid's sampling of a rod's
        axis). 1.0: only peaks of
        equal height on a flat ridge or plateau (a rod's axis, the capped
        plateau of a particle deeper than ``max_radius``) are joined;
        touching particles always have a neck and stay apart. ``auto``
        (default, :data:`NECK_RATIO_AUTO`): 0.97 in 2D, 0.95 in 3D. Lower values
        also join peaks across shallow necks (0.7 suits rods and hollow
        particles, and merges overlapping spheres); None: every peak is its
        own particle. ``method="kmeans"`` only: the watershed, the classical
        method, ignores it.
    nearby_ratio : "auto", float in (0, 1] or None
        A peak closer to a higher peak of its region than ``nearby_ratio``
        times that peak's height (its distance to the background) joins it
        whatever the neck between them: it lies deep inside the higher one's
        inscribed ball (PoreSpy SNOW's ``trim_nearby_peaks`` rule). ``auto``
        (default, :data:`NEARBY_RATIO_AUTO`): off in 2D, where overlapping
        particles of a projection put one centre inside the other's disc,
        0.8 in 3D, where solid particles cannot. ``method="kmeans"`` only.
    peak_reach : "auto", float in (0, 1] or None
        A peak must also be the highest voxel of the distance map within
        ``peak_reach`` times its own height (physical), so the peak window
        grows with the particle: a large particle's second maxima, further
        than ``min_distance`` from its first but well inside its inscribed
        ball, are no centres (:func:`gpu_pipeline.stages.peaks.within_reach`).
        ``auto`` (default, :data:`PEAK_REACH_AUTO`): off in 2D, 0.7 in 3D.
        Both methods use the same peaks.
    reach_share : "auto", float in (0, 1] or None
        A maximum that the reach overlooks stays a peak when it keeps at
        least ``reach_share`` of its own inscribed ball from every other
        peak of its region: a small particle pressed against larger ones,
        overlooked from a neighbour's rising flank, not a second maximum
        (:func:`gpu_pipeline.stages.peaks.rescued_peaks`). ``auto``
        (default, :data:`REACH_SHARE_AUTO`): 0.6. None: the reach drops
        every maximum it overlooks. Only with ``peak_reach``.
    ball_share : "auto", float in (0, 1] or None
        A group of peaks (one piece) whose peaks all keep less than
        ``ball_share`` of their own inscribed ball from the other groups of
        their region (the assignment gives the rest to those) is dropped and
        its voxels go to its neighbours: a second maximum where particles
        meet, whose piece would cut a bit off each of them
        (:func:`gpu_pipeline.stages.peaks.shadowed_peaks`). ``auto``
        (default, :data:`BALL_SHARE_AUTO`): 0.5.
        ``method="kmeans"`` only.
    method : "kmeans" or "watershed"
        ``kmeans``: k-means per region started at the peaks (default);
        ``watershed``: scikit-image watershed of the distance map from the
        same peaks, for comparison (runs on the host even on the GPU).
    assignment : "power" or "euclidean"
        k-means distance: size-aware power distance (default) or plain Euclidean.
    kmeans_engine : "batched", "sklearn" or "cuml"
        ``batched``: all regions in one batch (default); ``sklearn``/``cuml``:
        one ``KMeans`` per region (Euclidean only), the reference.
    max_iter : int
        Lloyd updates after the first assignment (default 0: each voxel goes
        to the peak-initialised centroid of least distance). Updates move a
        truncated sphere's centroid away from the neck, which the bench shows
        costs accuracy with the power distance; the naive Euclidean method
        needs them.
    reject_annotations : "auto" or bool
        2D images: remove figure annotations from the foreground before
        anything is measured (:mod:`gpu_pipeline.stages.annotations`): text,
        letters and bars drawn in pure ink (the dtype's extreme value, in
        thin strokes) with a margin of ``INK_MARGIN`` pixels, found from the
        image whatever made the foreground. ``True`` also removes foreground
        components shaped like filled axis-aligned rectangles (bars, info
        bands), which an axis-aligned rod is too. ``auto`` (default): the
        ink rule, for a thresholded or classifier foreground; a ``mask`` is
        used as given. False: off.
    outline : "auto", "edge" or "threshold"
        Where each particle's outline lies. ``threshold``: on the
        threshold's contour. ``edge``: moved outward by up to
        ``OUTLINE_MAX_STEP`` rings of pixels, or inward by one, to the
        steepest point of the particle's edge in the smoothed image, where
        that ring is clearly steeper than the contour
        (:func:`gpu_pipeline.stages.outline.edge_outlines`; particles are
        never joined, split or removed). ``auto`` (default):
        ``edge`` for a thresholded 2D image, ``threshold`` in 3D and for a
        ``mask`` or ``classifier`` foreground (taken as given).
    return_details : bool
        Also return a :class:`SeparationDetails`.
    classifier : PixelClassifier, path or shipped model name, optional
        A trained pixel classifier (:mod:`gpu_pipeline.classifier`): the
        foreground is where its probability of background is below 0.5,
        instead of the threshold (or ``mask``); its probabilities are in
        ``details.probabilities``. Where the model has a boundary class, the
        particles are split along it
        (:func:`gpu_pipeline.stages.boundary_split.boundary_split`: seeds from
        the confident particle interior, flooded across the boundary
        probability) and ``min_distance``, ``max_radius``, ``neck_ratio``,
        ``method`` and the k-means options do not apply.
    follow_boundaries : bool
        With a classifier that has a boundary class: split along it (default)
        or, when False, split its foreground by the distance map like any
        mask (what chunked runs do, :func:`gpu_pipeline.chunked.pipeline.separate_chunked`).


    Returns
    -------
    labels : ndarray of int32, same shape and device as ``image``
        0 is background; particles are 1..n in C order of their first voxel.

    Raises
    ------
    DeclumpError
        On unusable input (wrong dimensions or dtype, NaN, constant image,
        bad spacing or options); :class:`NoParticlesError` when nothing is left.
    """
    if (polarity == "auto" and isinstance(threshold, str) and threshold == "auto" and _BY_SHAPE.get() is None
            and _polarity_by_shape_applies(image, mask, classifier)):
        return _polarity_by_shape(dict(locals()))
    check_not_masked(image, mask)
    if image is not None and mask is None and classifier is None and np.dtype(image.dtype) == bool:
        image, mask = image.astype(np.uint8), image  # a bool image is the foreground itself, as on the CLI
    elif image is not None and mask is None and classifier is None and binary_values(image):
        mask = image > 0  # a 0/1 or 0/255 mask given as the image: the foreground itself, as a bool one is
    reference = image if image is not None else mask
    if reference is None:
        raise DeclumpError("separate needs an image, a mask, or both")
    ops = ops_for(reference)
    details = SeparationDetails()
    clock = _StageClock(ops, details.timings)
    refuse_channels_last(reference.shape, "image" if image is not None else "mask")  # (its message first)
    if image is not None:
        validate_image(image)
    ndim = reference.ndim
    if ndim not in (2, 3) or min(reference.shape) < 2:  # (what validate_image checks before a dtype)
        validate_image(reference, "mask")
    spacing = validate_spacing(spacing, ndim)
    neck_ratio, nearby_ratio = resolve_ratio("neck_ratio", neck_ratio, ndim), resolve_ratio("nearby_ratio",
                                                                                            nearby_ratio, ndim)
    peak_reach = resolve_ratio("peak_reach", peak_reach, ndim)
    reach_share = resolve_ratio("reach_share", reach_share, ndim)
    ball_share = resolve_ratio("ball_share", ball_share, ndim)
    clock.stages = _planned_stages(mask is not None, method, (neck_ratio, nearby_ratio, ball_share) != (None,) * 3,
                                   classifier)
    if method not in ("kmeans", "watershed"):
        raise DeclumpError(f"method must be 'kmeans' or 'watershed', got {method!r}")
    if kmeans_engine not in KMEANS_ENGINES:
        raise DeclumpError(f"kmeans_engine must be one of {', '.join(map(repr, KMEANS_ENGINES))}, got "
                           f"{kmeans_engine!r}")
    sigma = 0.0 if sigma is None else sigma
    check_auto_or_number("sigma", sigma, positive=False)
    extent = max(n * s for n, s in zip(reference.shape, spacing))
    if sigma != "auto" and float(sigma) > extent:  # (1e9 ran out of memory building its kernel)
        raise DeclumpError(f"sigma {float(sigma):g} is wider than the image ({extent:g} physical units along its "
                           "longest axis) and would flatten it; give a sigma below the particles' radius, or 'auto'")
    if isinstance(threshold, str) and threshold not in THRESHOLD_METHODS:  # the command line's "100"
        try:
            threshold = float(threshold)
        except ValueError:
            pass  # refused below, naming what is accepted
    if mask is None and classifier is None:
        check_threshold(threshold)
    check_auto_or_number("min_distance", min_distance, positive=True)
    check_auto_or_number("max_hole_size", max_hole_size, positive=False)
    if min_size is not None:
        check_auto_or_number("min_size", min_size, positive=False)
    check_max_iter(max_iter)

    # A classifier with a boundary class sets these; the split then follows its boundaries
    # (stages/boundary_split) instead of the power-diagram split of the distance map.
    boundary = interior = None
    if classifier is not None:
        from gpu_pipeline.classifier import class_probability, foreground_probability, load_classifier

        if mask is not None or image is None:
            raise DeclumpError("a pixel classifier needs the image and replaces the mask; give one of --classifier "
                               "and --mask")
        classifier = load_classifier(classifier)
        details.probabilities = classifier.predict_proba(image, spacing=spacing)
        mask = foreground_probability(details.probabilities, classifier.classes)
        boundary = class_probability(details.probabilities, classifier.classes, "boundary")
        interior = class_probability(details.probabilities, classifier.classes, "particle")
        clock.lap("classifier")
    reject_annotations = {"on": True, "off": False}.get(reject_annotations, reject_annotations)  # CLI spellings
    if reject_annotations not in ("auto", True, False):
        raise DeclumpError(f"reject_annotations must be 'auto', True ('on') or False ('off'), got "
                           f"{reject_annotations!r}")
    if reject_annotations is True and ndim != 2:
        raise DeclumpError("reject_annotations=True (--reject-annotations on) is for 2D figure panels; a volume "
                           "has no text or scale bars to remove: leave it 'auto' or False")
    if outline not in OUTLINES:
        raise DeclumpError(f"outline must be 'auto', 'edge' or 'threshold', got {outline!r}")
    if outline == "edge" and image is None:
        raise DeclumpError("outline='edge' follows the image's edges; give the image too, or outline='threshold'")
    given = mask is not None
    # ``auto``: a thresholded 2D image only (a mask or a classifier's foreground is taken as given).
    move_outlines = outline == "edge" or (outline == "auto" and ndim == 2 and not given)
    if given and classifier is None and min_size == "auto":
        min_size = None  # a user's mask is taken as given: only objects below the peak window go
    # The annotations are found from the image, so a classifier's foreground is cleaned too; a user's mask is not.
    annotations = reject_annotations is not False and image is not None and (not given or classifier is not None)
    panel = band = zone = None
    if annotations and classifier is None and ndim == 2:
        # A microscope's data bar along one edge is no part of the specimen, yet it would weigh in every
        # statistic of the image (the threshold, the polarity's border, the scale): the picture is
        # separated without it, and the band's lines are background. Annotation ink is still found on the
        # whole panel, where its rules measure the margins (its margin grown within the picture).
        band = info_band(image)
        if band is not None:
            details.info_band = band
            axis, start, stop = band
            panel, band = image, (slice(None),) * axis + (slice(start, stop),)
            image = get_array_module(panel).ascontiguousarray(panel[band])
            if float(image.min()) == float(image.max()):
                edge = (("bottom", "top"), ("right", "left"))[axis][start > 0]
                lines = f"{stop}-{panel.shape[axis] - 1}" if start == 0 else f"0-{start - 1}"
                raise UnusableValuesError(
                    f"the image is constant (every value is {float(image.min()):g}) apart from the information "
                    f"band along its {edge} edge ({'rows' if axis == 0 else 'columns'} {lines}), so no threshold "
                    "separates particles from background; pass an image with contrast, or reject_annotations=False "
                    "(--reject-annotations off) to keep the band")

    def cleaned_foreground(polarity):
        nonlocal zone
        fg, radius, distance, tables = foreground_step(image, mask, spacing=spacing, sigma=sigma,
                                                       threshold=threshold, polarity=polarity, details=details,
                                                       clock=clock)
        if annotations and image.ndim == 2:
            if zone is None:  # once (the polarity's second try reuses it)
                zone = annotation_zone(image, ink=None if panel is None else annotation_ink(panel)[band])
            fg = reject_annotations_step(fg, zone, details=details, rectangles=reject_annotations is True)
            radius = distance = tables = None  # measured before the annotations were removed
        return cleanup_step(fg, spacing=spacing, min_distance=min_distance, min_size=min_size,
                            max_hole_size=max_hole_size, details=details, given=given, radius=radius,
                            distance=distance, tables=tables)

    try:
        fg, min_distance, particle_min_size, distance = cleaned_foreground(polarity)
    except FilledImageError:
        if polarity != "auto" or given:
            raise
        # The side whose holes, filled, cover the whole image is the background around the particles
        # (its holes were the particles): the other side is taken (bench.auto_foreground --polarity).
        fg, min_distance, particle_min_size, distance = cleaned_foreground("dark" if details.polarity == "bright"
                                                                           else "bright")
    clock.lap("cleanup")
    if boundary is not None and follow_boundaries:
        labels = boundary_split(fg, boundary, interior=interior, spacing=spacing)
        if move_outlines:
            labels = outline_step(labels, image, spacing=spacing, zone=zone, details=details)
        details.n_particles = int(labels.max())
        clock.lap("boundary_split")
        return (labels, details) if return_details else labels
    distance_q, quantum = distance_step(fg, spacing=spacing, max_radius=max_radius, distance=distance)
    del distance
    clock.lap("distance_transform")
    peaks, overlooked = peaks_step(distance_q, spacing=spacing, min_distance=min_distance, reach=peak_reach,
                                   max_radius=max_radius, reach_share=reach_share)
    clock.lap("peaks")
    labels = split_step(fg, distance_q, quantum, peaks, spacing=spacing, method=method, neck_ratio=neck_ratio,
                        nearby_ratio=nearby_ratio, ball_share=ball_share, max_radius=max_radius,
                        overlooked=overlooked, reach_share=reach_share,
                        assignment=assignment, kmeans_engine=kmeans_engine, max_iter=max_iter, details=details,
                        clock=clock)
    labels = finish_step(labels, details=details, min_size=particle_min_size, spacing=spacing)
    if move_outlines:
        labels = outline_step(labels, image, spacing=spacing, zone=zone, details=details)
    if band is not None:
        whole = get_array_module(labels).zeros(panel.shape, dtype=labels.dtype)
        whole[band] = labels
        labels = whole
    clock.lap("finish")
    return (labels, details) if return_details else labels


def outline_step(labels, image, *, spacing, zone, details):
    """``outline="edge"``: each particle's outline at the steepest ring of its edge in ``image`` smoothed as it
    was for the threshold (``details.sigma``), not into the annotation ``zone``; the particles moved go to
    ``details.outlines_moved``."""
    sigma = details.sigma or 0.0
    smoothed = ops_for(image).gaussian(image, tuple(sigma / s for s in spacing)) if sigma > 0 else image
    labels, details.outlines_moved = edge_outlines(labels, smoothed, spacing, allowed=None if zone is None else ~zone)
    return labels


def check_max_iter(max_iter):
    """``max_iter`` (Lloyd iterations after the assignment) is a whole number, 0 or more."""
    if not whole_number_at_least(max_iter, 0):
        raise DeclumpError(f"max_iter must be a whole number, 0 or more, got {max_iter!r}")


def check_auto_or_number(name, value, *, positive):
    if isinstance(value, str) and value == "auto":
        return
    try:
        ok = not isinstance(value, bool) and math.isfinite(float(value)) and (
            float(value) > 0 if positive else float(value) >= 0)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise DeclumpError(f"{name} must be 'auto' or a finite {'positive' if positive else 'non-negative'} "
                           f"physical size, got {value!r}")


def ball_size(diameter, ndim):
    """Area (2D) or volume (3D) of a ball of ``diameter``: the default ``min_size``."""
    return math.pi * diameter * diameter / 4 if ndim == 2 else math.pi * diameter ** 3 / 6


def foreground_step(image, mask, *, spacing, sigma, threshold, polarity, details, clock):
    """The particle mask: ``mask`` when given, else smoothing, threshold and polarity (recorded in ``details``).

    Returns ``(mask, radius, distance, tables)``: ``radius`` is the mask's typical particle radius where
    ``sigma="auto"`` measured it (so that the ``auto`` sizes need not measure it again) and ``distance`` the
    mask's distance transform it was measured on, else None; ``tables`` the component tables of the mask and
    of its background where the threshold's polarity labelled them (``threshold_foreground``; a given
    ``sigma`` only), else None.
    """
    radius = distance = tables = None
    if mask is not None:
        fg = _mask_from(mask, (image if image is not None else mask).shape)
        clock.lap("threshold")
        return fg, radius, distance, tables
    ops = ops_for(image)

    def smooth(sigma):
        return ops.gaussian(image, tuple(float(sigma) / s for s in spacing)) if sigma > 0 else image

    if sigma == "auto":
        # (No component tables here: held from the polarity through Li's labelling and the scale measurement,
        # they raised the peak of a 384^3 run at the defaults from 1.416 to 1.481 GiB, also when only the
        # mask's own was passed on to typical_radius.)
        def thresholded(sigma):
            return threshold_foreground(smooth(sigma), threshold, polarity)

        def measured(fg):
            return (typical_radius(fg, spacing, return_distance=True)
                    if bool(fg.any()) and not bool(fg.all()) else (None, None))

        def attempt(sigma):
            fg, decision = thresholded(sigma)
            return (fg, decision, *measured(fg))

        # Noise grain thresholds into small components that twice the smoothing merges into much larger
        # ones; particles keep about their size.
        sigma = min(spacing)
        fg, decision = thresholded(sigma)
        if image.ndim == 3:  # a noisy volume's rough surfaces over-split its particles: smooth to the contrast
            raised = noise_sigma(image, fg, spacing, sigma)
            if raised > sigma:
                sigma = raised
                del fg
                fg, decision = thresholded(sigma)
        radius, distance = measured(fg)  # (after the noise step, which needs the mask only)
        growth = None  # how much twice the sigma grew the typical radius, where measured
        for _ in range(SIGMA_DOUBLINGS):
            if radius is None:
                break
            coarser = attempt(2 * sigma)
            if coarser[2] is None or coarser[2] < NOISE_GROWTH * radius:
                growth = None if coarser[2] is None else coarser[2] / radius
                del coarser
                break
            sigma, (fg, decision, radius, distance) = 2 * sigma, coarser
            del coarser
        # Texture heals under twice the smoothing and the radius grows; solid particles keep theirs. (No
        # growth measured at this sigma: the doublings ran out, or the coarser foreground was empty or full.)
        textured = growth is None or growth >= TEXTURE_GROWTH
        if radius is not None and textured and SIGMA_PER_RADIUS * radius >= SIGMA_RAISE * sigma:
            # Smoothing at a tenth of the particles' radius keeps them and removes their texture.
            finer, side = sigma, decision.polarity
            sigma = SIGMA_PER_RADIUS * radius
            del fg, distance
            fg, decision, radius, distance = attempt(sigma)
            if decision.polarity != side:
                # The raise changed which side is the particles: it smoothed away what told them apart (the
                # thin gaps between particles packed edge to edge), not their texture. The finer sigma stays
                # (measured again rather than kept: two masks and distance maps at once raise the peak).
                sigma = finer
                del fg, distance
                fg, decision, radius, distance = attempt(sigma)
    else:
        fg, decision, tables = threshold_foreground(smooth(float(sigma or 0.0)), threshold, polarity,
                                                    components=True)
    details.sigma = float(sigma or 0.0)
    clock.lap("smoothing")
    details.threshold, details.polarity, details.threshold_method = (decision.threshold, decision.polarity,
                                                                     decision.method)
    details.threshold_candidates, details.intensity_range = decision.candidates, decision.intensity_range
    clock.lap("threshold")
    return fg, radius, distance, tables


def reject_annotations_step(fg, zone, *, details, rectangles=False):
    """The 2D foreground without the image's annotation ink, ``zone``
    (:func:`~gpu_pipeline.stages.annotations.annotation_zone`), and, with ``rectangles``, without foreground
    components shaped like bars and info bands; the foreground pixels removed go to ``details``."""
    drop = zone & fg
    if rectangles:
        drop = drop | annotation_mask(fg)
    details.annotation_pixels = int(drop.sum())
    return fg & ~drop


def auto_window(fg, spacing, details, distance=None):
    """``min_distance="auto"`` for the foreground ``fg``: ``(min_distance, distance)``.

    ``MIN_DISTANCE_PER_RADIUS`` times, in 2D, the typical radius (``details.particle_radius``), in 3D the
    median depth of the distance map's maxima (:func:`~gpu_pipeline.stages.scale.maxima_radius`; the typical
    radius where there is no maximum); at least one voxel of the coarsest axis in 2D, so the peak window is
    never empty, and ``MIN_WINDOW_VOXELS_3D`` in 3D. ``distance``: ``fg``'s distance transform where it is
    known; returned (taken here in 3D when None).
    """
    if fg.ndim == 2:
        return max(MIN_DISTANCE_PER_RADIUS[2] * details.particle_radius, max(spacing)), distance
    if distance is None:
        distance = ops_for(fg).distance_transform(fg, spacing)
    radius = maxima_radius(distance, spacing) or details.particle_radius
    return max(MIN_DISTANCE_PER_RADIUS[3] * radius, MIN_WINDOW_VOXELS_3D * max(spacing)), distance


def cleanup_step(fg, *, spacing, min_distance, min_size, max_hole_size, details, given=False, radius=None,
                 distance=None, tables=None, remeasure=True):
    """Holes filled and specks removed, with the ``auto`` sizes measured first: (mask, min_distance).

    ``given``: the foreground came from a mask or a classifier; it is taken as given, so an ``auto``
    hole size is 0 (the pockets it leaves between packed particles are background it found, and
    filling them would fuse the particles). ``radius``: the foreground's typical radius where the
    caller has measured it already, and ``distance`` the distance transform of ``fg`` it was measured
    on (or None); ``tables``: the component tables of ``fg`` and of its background where they are known
    (:func:`foreground_step`). An empty result is :class:`NoParticlesError`.

    Returns ``(mask, min_distance, particle_min_size, distance)``: ``particle_min_size`` is the ``auto``
    minimum size that :func:`finish_step` applies again to the split particles, None otherwise;
    ``distance`` the distance transform of the returned mask where a measurement of the scale gave one
    (:func:`gpu_pipeline.stages.distance.cleaned_distance`), else None.

    An ``auto`` hole size also fills the cavities of hollow particles (:func:`fill_shell_holes`, counted in
    ``details.shell_holes``); where it fills any, the ``auto`` sizes are measured again on the filled mask
    (``remeasure``): measured on the rims, they were the rims' thickness.
    """
    if given and max_hole_size == "auto":
        max_hole_size = 0.0
    asked = dict(min_distance=min_distance, min_size=min_size, max_hole_size=max_hole_size)
    shells = max_hole_size == "auto"
    if remeasure:  # (a first call: not the measurement again after filled cavities)
        details.shell_holes = details.pocket_holes = 0
    if details.annotation_pixels and not bool(fg.any()):
        raise NoParticlesError(f"no particles found: all {details.annotation_pixels} foreground pixels were taken for "
                               "annotations (text, scale bars, labels) and removed; pass --reject-annotations off "
                               "(reject_annotations=False) if they are particles")
    if "auto" in (min_distance, max_hole_size, min_size):
        if not bool(fg.any()):
            raise NoParticlesError("no particles found: the mask has no foreground voxel (none > 0 in an integer "
                                   "mask, none > 0.5 in a probability map)" if given else
                                   "no particles found: the foreground is empty after thresholding; check polarity "
                                   "or threshold")
        if bool(fg.all()):
            raise NoParticlesError("the foreground covers the whole image (no background voxel), so 'auto' cannot "
                                   "measure the particle size; "
                                   + ("give a mask with background (0, or <= 0.5 in a probability map) or set "
                                      "--min-distance" if given else
                                      "check polarity or threshold, or set --min-distance and --max-hole-size"))
        if radius is None:
            radius, distance = typical_radius(fg, spacing, return_distance=True,
                                              table=None if tables is None else tables[0])
        details.particle_radius = radius
    window_measured = min_distance == "auto"
    if window_measured and (fg.ndim == 2 or min_size is None):
        min_distance, distance = auto_window(fg, spacing, details, distance)
    # (Otherwise in 3D the window comes from the cleaned foreground's distance map, below.)
    min_distance = None if min_distance == "auto" else float(min_distance)
    if max_hole_size == "auto":
        max_hole_size = ball_size(2 * HOLE_RADIUS_PER_RADIUS * details.particle_radius, fg.ndim)
    max_hole_size = float(max_hole_size or 0.0)
    particle_min_size = None
    if min_size == "auto":
        min_size = particle_min_size = MIN_SIZE_PER_PARTICLE[fg.ndim] * ball_size(2 * details.particle_radius, fg.ndim)
        if not window_measured:  # a given min_distance: no particle is smaller than the peak window
            min_size = particle_min_size = max(min_size, ball_size(min_distance, fg.ndim))
    min_size = ball_size(min_distance, fg.ndim) if min_size is None else float(min_size)
    details.min_distance, details.max_hole_size, details.min_size = min_distance, max_hole_size, min_size
    cleaned = clean_mask(fg, spacing=spacing, min_size=min_size, max_hole_size=max_hole_size, tables=tables)
    tables = None
    updated = None  # the distance transform of ``cleaned`` where it is known
    if shells and fg.ndim == 2 and min_distance is not None:
        # Pockets between touching particles are holes too; filled, they join the particles around them.
        updated = None if distance is None else cleaned_distance(distance.copy(), fg, cleaned, spacing)
        pockets, details.pocket_holes = pocket_holes(fg, cleaned, spacing, min_distance, before_distance=distance,
                                                     after_distance=updated)
        if details.pocket_holes:
            cleaned &= ~pockets
            updated = None
        del pockets
    if shells:
        cleaned, filled = fill_shell_holes(cleaned, spacing)
        details.shell_holes += filled
        if filled and remeasure:
            del fg, distance, updated
            return cleanup_step(cleaned, spacing=spacing, details=details, given=given, remeasure=False, **asked)
        if filled:
            updated = None
    if updated is not None:
        distance = updated
    elif distance is not None:
        distance = cleaned_distance(distance, fg, cleaned, spacing)
    del updated
    fg = cleaned
    del cleaned
    if window_measured and bool(fg.all()):
        # Filled holes can leave no background: then every voxel would be a peak candidate of the auto window.
        raise FilledImageError("no particles can be told apart: after hole filling the foreground covers the whole "
                               "image; check polarity or threshold, or set --max-hole-size 0")
    if not bool(fg.any()):
        # Name where the size came from: a given min_distance sets the smallest particle 'auto' keeps.
        origin = (f" (min_size 'auto': at least the ball of min_distance {min_distance:g})"
                  if particle_min_size is not None and not window_measured else "")
        raise NoParticlesError(f"no particles found: the foreground is empty after "
                               f"{'the mask' if given else 'thresholding'} and removing objects smaller than "
                               f"{min_size:g} (physical units){origin}; check "
                               f"{'min_size or min_distance' if origin else 'polarity, threshold or min_size'}")
    if min_distance is None:
        min_distance, distance = auto_window(fg, spacing, details, distance)
        details.min_distance = min_distance
    return fg, min_distance, particle_min_size, distance


def distance_step(fg, *, spacing, max_radius, distance=None):
    """The quantised, capped distance map of the foreground and its quantum (physical units per step);
    ``distance``: the foreground's distance transform where it is known already (:func:`cleanup_step`)."""
    if distance is None:
        distance = ops_for(fg).distance_transform(fg, spacing)
    return quantize_distance(cap_distance(distance, max_radius, spacing), spacing)


def peaks_step(distance_q, *, spacing, min_distance, reach=None, max_radius=None, reach_share=None):
    """Particle centres: maxima of the distance map at least ``min_distance`` apart (per axis), and the
    highest voxel within ``reach`` times their height when it is given, as (n, ndim); and which of them the
    reach overlooks (kept for :func:`split_step` to rescue with ``reach_share``; None when either is None, and
    the peaks are then those within reach). ``max_radius``: the cap of :func:`distance_step`."""
    cap = distance_cap(distance_q.shape, spacing, max_radius)
    flagged = reach is not None and reach_share is not None
    found = find_peaks(distance_q, half_widths=window_half_widths(min_distance, spacing),
                       reach=None if reach is None else PeakReach(reach, spacing, cap), return_overlooked=flagged)
    return found if flagged else (found, None)


def split_step(fg, distance_q, quantum, peaks, *, spacing, method, neck_ratio, assignment, kmeans_engine, max_iter,
               details, clock, nearby_ratio=None, ball_share=None, max_radius=None, overlooked=None,
               reach_share=None):
    """Every foreground voxel assigned to a peak: k-means per region (with neck groups) or the watershed;
    first the peaks the reach ``overlooked`` (None: none) kept only where ``reach_share`` rescues them, and
    counted (``details.n_peaks``)."""
    xp = get_array_module(fg)
    ops = ops_for(fg)
    regions, details.n_regions = ops.label(fg)
    clock.lap("regions")
    peaks = rescue_step(peaks, overlooked, distance_q, regions, spacing=spacing, reach_share=reach_share,
                        power=assignment == "power")
    details.n_peaks = int(peaks.shape[0])
    if method != "kmeans":
        labels = split_regions_watershed(fg, regions, details.n_regions, peaks, distance_q)
        clock.lap("watershed")
        return labels
    peaks, group = group_step(peaks, distance_q, regions, spacing=spacing, neck_ratio=neck_ratio,
                              nearby_ratio=nearby_ratio, ball_share=ball_share, max_radius=max_radius,
                              power=assignment == "power")
    if (neck_ratio, nearby_ratio, ball_share) != (None,) * 3:
        clock.lap("necks")
    radii = distance_q[tuple(peaks.T)].astype(xp.float64) * quantum
    labels, details.n_iter = split_regions_kmeans(regions, details.n_regions, peaks, radii, spacing=spacing,
                                                  assignment=assignment, engine=kmeans_engine,
                                                  max_iter=max_iter, peak_group=group)
    clock.lap("kmeans")
    return labels


def _on_threads(peaks):
    """How the steps on the peak list go box by box (:mod:`gpu_pipeline.stages.by_box`: the same results,
    where the list and the boxes are worth it): their ``run`` and ``parallel`` arguments, on this process's
    usable cores; or None: CuPy peaks or one usable core."""
    if get_array_module(peaks) is not np:
        return None
    threads = usable_cores()
    return {"run": by_box.on_threads(threads), "parallel": threads} if threads > 1 else None


def _shares_on(boxes):
    """The ``shares`` function of the peak steps for :func:`_on_threads`' result (None: the whole list)."""
    return None if boxes is None else functools.partial(by_box.ball_shares_by_box, **boxes)


def rescue_step(peaks, overlooked, distance_q, regions, *, spacing, reach_share, power=True):
    """The peaks less those the reach ``overlooked`` that ``reach_share`` does not rescue
    (:func:`~gpu_pipeline.stages.peaks.rescued_peaks`; ``overlooked`` None: all peaks)."""
    if overlooked is None:
        return peaks
    return peaks[rescued_peaks(peaks, distance_q[tuple(peaks.T)], regions[tuple(peaks.T)], overlooked, spacing,
                               regions.shape, reach_share, power=power, shares=_shares_on(_on_threads(peaks)))]


def group_step(peaks, distance_q, regions, *, spacing, neck_ratio, nearby_ratio, ball_share, max_radius, power=True):
    """The peaks' groups (one piece each; None when neither the neck nor the nearby rule is on), then the groups
    that keep less than ``ball_share`` of their balls dropped: (peaks, group) for the assignment. A large list
    on the CPU goes box by box on threads (the same groups and shares)."""
    group = None
    boxes = _on_threads(peaks)
    if (neck_ratio, nearby_ratio) != (None, None):
        if boxes is not None:
            group = by_box.neck_groups_by_box(
                peaks, distance_q[tuple(peaks.T)], regions[tuple(peaks.T)], regions.shape, spacing, neck_ratio,
                nearby_ratio, **boxes,
                read=lambda low, high: distance_q[tuple(slice(int(a), int(b)) for a, b in zip(low, high))])
        if group is None:
            group = neck_groups(peaks, distance_q, regions, spacing, neck_ratio, nearby_ratio)
    if ball_share is not None:
        keep = shadowed_peaks(peaks, distance_q[tuple(peaks.T)], regions[tuple(peaks.T)], group, spacing,
                              regions.shape, distance_cap(regions.shape, spacing, max_radius), ball_share, power=power,
                              shares=_shares_on(boxes))
        peaks, group = peaks[keep], regroup(group, keep)
    return peaks, group


def finish_step(labels, *, details, min_size=None, spacing=None):
    """One piece per particle, ids 1..n by first voxel in C order; particles smaller than ``min_size``
    (physical units, the ``auto`` one of :func:`cleanup_step`) merged into the neighbour they touch most
    (:func:`gpu_pipeline.stages.cleanup.merge_small_particles`)."""
    labels = finish_labels(labels)
    if min_size is not None:
        labels = merge_small_particles(labels, voxels_for(min_size, spacing), renumber=True)
    details.n_particles = int(labels.max())
    return labels


def cap_distance(distance, max_radius, spacing):
    """The distance map capped at ``max_radius`` (physical), or at the volume's diagonal when None.

    The diagonal cap only replaces the infinite distances of a foreground
    that touches no background at all.
    """
    xp = get_array_module(distance)
    return xp.minimum(distance, xp.float32(distance_cap(distance.shape, spacing, max_radius)))


def distance_cap(shape, spacing, max_radius):
    """The cap of :func:`cap_distance`, physical: ``max_radius``, or the diagonal of ``shape`` when None."""
    if max_radius is None:
        return math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing)))
    if not (float(max_radius) > 0):
        raise DeclumpError(f"max_radius must be a positive physical distance, got {max_radius}")
    return float(max_radius)


#: The `_StageClock` of the `separate` call running in this context (names the stage of a MemoryError).
_RUNNING_CLOCK = contextvars.ContextVar("declump_running_clock", default=None)


def _planned_stages(has_mask, method, grouped, classifier=None):
    """The stages `separate` laps, in order, for these options (``grouped``: peaks grouped, by necks or nearby, or
    trimmed by their ball share; lapped as ``necks``)."""
    start = ["classifier", "threshold"] if classifier is not None else (["threshold"] if has_mask
                                                                       else ["smoothing", "threshold"])
    split = (["necks"] if grouped else []) + ["kmeans"] if method == "kmeans" else ["watershed"]
    return start + ["cleanup", "distance_transform", "peaks", "regions"] + split + ["finish"]


class _StageClock:
    """Per-stage wall time; waits for the device so GPU times are real.

    ``current``: the first planned stage not yet lapped (the one running).
    """

    def __init__(self, ops, timings, stages=()):
        self.ops, self.timings, self.stages = ops, timings, list(stages)
        _RUNNING_CLOCK.set(self)
        self.ops.synchronize()
        self.last = time.perf_counter()

    @property
    def current(self):
        return next((stage for stage in self.stages if stage not in self.timings), None)

    def lap(self, stage):
        self.ops.synchronize()
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - self.last
        self.last = now
