"""The split guided by the image's own boundaries: seeds from a pixel classifier's interior class, flooded
across the boundary probability, so that close-packed particles with no neck still come apart.

Input is what a classifier with a boundary class gives (background, particle interior, boundary
probabilities); the geometric split (:mod:`gpu_pipeline.stages.split`) stays for masks without one.
"""
from __future__ import annotations

import math

from gpu_pipeline._backend import DeclumpError, get_array_module, ops_for
from gpu_pipeline.stages.cleanup import remove_small_objects, voxels_for
from gpu_pipeline.stages.split import finish_labels

#: Defaults chosen by 5-fold cross-validation by image on the 366 EMPS training images
#: (``python -m bench.emps_classifier``).
SEED_THRESHOLD = 0.5
SEED_SMOOTHING = 1.0
MIN_SEED_SIZE = 0.0
#: Seeds smaller than this fraction of the typical seed (:func:`typical_size` of the seeds) are dropped:
#: EM particle sizes vary tenfold between images, so a fixed size either keeps the specks of interior that
#: noise leaves in large particles (over-splitting them) or drops whole small particles.
MIN_RELATIVE_SEED_SIZE = 0.2
#: Particles smaller than this fraction of the typical particle (see :func:`drop_small_particles`) are dropped.
MIN_RELATIVE_SIZE = 0.2


def _probability(array, name, shape):
    xp = get_array_module(array)
    if tuple(array.shape) != tuple(shape):
        raise DeclumpError(f"{name} probability shape {tuple(array.shape)} differs from the foreground's "
                           f"{tuple(shape)}")
    if array.dtype.kind != "f":
        raise DeclumpError(f"{name} probability has dtype {array.dtype}; accepted: floating-point values in [0, 1]")
    return array.astype(xp.float32, copy=False)


def boundary_seeds(foreground, interior, *, spacing, threshold=SEED_THRESHOLD, smoothing=SEED_SMOOTHING,
                   min_seed_size=MIN_SEED_SIZE, min_relative_seed_size=MIN_RELATIVE_SEED_SIZE):
    """Seed markers: face-connected components of confident interior inside the foreground.

    ``interior`` (particle-interior probability) is smoothed by a Gaussian of
    ``smoothing`` (physical units, 0 = off), thresholded at ``threshold``, and
    components smaller than ``min_seed_size`` (physical area/volume) or than
    ``min_relative_seed_size`` x the typical seed (:func:`typical_size` of the
    components) are dropped (specks of noise would each become a particle). Every foreground
    component left without a seed gets one seed covering it, so no particle
    is lost. Returns ``(markers int32, n_seeds)``; markers are 1..n.
    """
    xp = get_array_module(foreground)
    ops = ops_for(foreground)
    if smoothing and smoothing > 0:
        interior = ops.gaussian(interior, tuple(float(smoothing) / s for s in spacing))
    seeds = remove_small_objects((interior > threshold) & foreground, voxels_for(min_seed_size, spacing))
    markers, n_seeds = ops.label(seeds)
    if min_relative_seed_size and n_seeds:
        markers = drop_small_particles(markers, min_relative_seed_size)
        seeds = markers > 0
        markers, n_seeds = ops.label(seeds)
    regions, n_regions = ops.label(foreground)
    seeded = xp.zeros(n_regions + 1, dtype=bool)
    seeded[regions[seeds]] = True
    unseeded = foreground & ~seeded[regions]
    extra, n_extra = ops.label(unseeded)
    markers = xp.where(extra > 0, extra + n_seeds, markers).astype(xp.int32)
    return markers, n_seeds + n_extra


def typical_size(labels):
    """The area-weighted median particle size (voxels): the size of the particle a random foreground voxel is in.

    Unlike the plain median it is not dragged down by many specks, and it
    follows the particles' scale from image to image (EM particle sizes
    vary tenfold between images). 0 for an empty label image.
    """
    xp = get_array_module(labels)
    sizes = xp.bincount(labels.ravel().astype(xp.int64))[1:]
    sizes = xp.sort(sizes[sizes > 0])
    if sizes.size == 0:
        return 0
    covered = xp.cumsum(sizes)
    return int(sizes[int(xp.searchsorted(covered, covered[-1] / 2))])


def drop_small_particles(labels, min_relative_size=MIN_RELATIVE_SIZE):
    """Labels with the particles smaller than ``min_relative_size`` x :func:`typical_size` set to background."""
    xp = get_array_module(labels)
    if not min_relative_size:
        return labels
    sizes = xp.bincount(labels.ravel().astype(xp.int64))
    keep = sizes >= min_relative_size * typical_size(labels)
    keep[0] = False
    return xp.where(keep[labels], labels, 0).astype(labels.dtype, copy=False)


def boundary_split(foreground, boundary, *, interior=None, spacing=None, threshold=SEED_THRESHOLD,
                   smoothing=SEED_SMOOTHING, min_seed_size=MIN_SEED_SIZE,
                   min_relative_seed_size=MIN_RELATIVE_SEED_SIZE, min_relative_size=MIN_RELATIVE_SIZE):
    """Split a foreground into particles along high boundary probability.

    Parameters
    ----------
    foreground : bool ndarray, 2D or 3D (NumPy or CuPy)
        The particle mask (e.g. where the classifier's background probability
        is below 0.5).
    boundary : float ndarray, same shape
        Probability of the boundary class (the line between touching
        particles). The flood from the seeds rises across it, so two seeds
        meet on the boundary ridge.
    interior : float ndarray, same shape, optional
        Probability of the particle-interior class; seeds are its confident
        components. Default ``1 - boundary`` inside the foreground.
    spacing : sequence of float, optional
        Voxel size per axis (physical units); default 1.
    threshold, smoothing, min_seed_size, min_relative_seed_size
        Seed rule, see :func:`boundary_seeds`.
    min_relative_size : float
        Particles smaller than this fraction of the image's typical particle
        (:func:`typical_size`) are dropped: the classifier's specks of false
        foreground. 0 keeps all.

    Returns
    -------
    labels : int32 ndarray, same shape and device
        0 background, particles 1..n in C order of their first voxel (the
        project's numbering, :func:`~gpu_pipeline.stages.split.finish_labels`).

    Notes
    -----
    The flood is a marker watershed of the smoothed boundary probability
    inside the foreground (scikit-image; on the GPU it runs on the host like
    the watershed method of :mod:`gpu_pipeline.stages.split`, since cuCIM has
    none). A foreground component without a confident interior stays whole.
    """
    xp = get_array_module(foreground)
    ops = ops_for(foreground)
    if foreground.dtype.kind != "b":
        raise DeclumpError(f"foreground has dtype {foreground.dtype}; accepted: a bool mask")
    if foreground.ndim not in (2, 3):
        raise DeclumpError(f"foreground has {foreground.ndim} dimensions; accepted: 2D or 3D")
    spacing = (1.0,) * foreground.ndim if spacing is None else tuple(float(s) for s in spacing)
    if len(spacing) != foreground.ndim or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise DeclumpError(f"spacing must be {foreground.ndim} positive numbers, got {spacing}")
    boundary = _probability(boundary, "boundary", foreground.shape)
    interior = (1.0 - boundary) if interior is None else _probability(interior, "interior", foreground.shape)
    markers, _ = boundary_seeds(foreground, interior, spacing=spacing, threshold=threshold, smoothing=smoothing,
                                min_seed_size=min_seed_size, min_relative_seed_size=min_relative_seed_size)
    surface = boundary
    if smoothing and smoothing > 0:
        surface = ops.gaussian(boundary, tuple(float(smoothing) / s for s in spacing))
    labels = ops.watershed(surface, markers, foreground)
    return finish_labels(drop_small_particles(xp.asarray(labels), min_relative_size))
