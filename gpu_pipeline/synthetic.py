"""Generated touching particles with exact ground truth, deterministic by seed.

Particles are disks (2D) or spheres (3D) in physical units on a possibly
anisotropic voxel grid. Where two overlap, the ground truth splits them
along the radical plane (each voxel goes to the particle of least power
distance ``|x - c|^2 - r^2``), which is the physical neck of two spheres.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
from scipy import ndimage as ndi

from gpu_pipeline._backend import DeclumpError
from gpu_pipeline._common import whole_number_at_least


def _place_centres(rng, shape_phys, n, radius_range, overlap, touching_fraction, max_tries=60):
    """Centres and radii: about ``touching_fraction`` of particles are set against an earlier one.

    A touching pair's centre distance is ``(r1 + r2) * (1 - overlap)``; no
    particle overlaps any other by more than that.
    """
    ndim = len(shape_phys)
    lo_r, hi_r = radius_range
    centres = np.zeros((0, ndim))
    radii = np.zeros(0)
    for _ in range(n):
        for _try in range(max_tries):
            r = rng.uniform(lo_r, hi_r)
            if len(radii) and rng.random() < touching_fraction:
                j = rng.integers(len(radii))
                direction = rng.normal(size=ndim)
                direction /= np.linalg.norm(direction)
                c = centres[j] + direction * (radii[j] + r) * (1 - overlap)
            else:
                c = rng.uniform(0, 1, ndim) * np.asarray(shape_phys)
            if np.any(c < 0) or np.any(c >= shape_phys):
                continue
            if len(radii):
                gap = np.linalg.norm(centres - c, axis=1)
                if np.any(gap < (radii + r) * (1 - overlap) - 1e-9):
                    continue
            centres = np.vstack([centres, c])
            radii = np.append(radii, r)
            break
    return centres, radii


def _real(value):
    """Is ``value`` one finite real number (Python's or NumPy's, not a bool)?"""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _pair(value):
    """``value`` as ``(low, high)`` floats where it is two finite real numbers with low <= high, else None."""
    try:
        items = tuple(value)
    except TypeError:
        return None
    if len(items) != 2 or not all(_real(v) for v in items) or items[0] > items[1]:
        return None
    return float(items[0]), float(items[1])


def _check_arguments(shape, n_particles, radius_range, overlap, touching_fraction, spacing, intensity_range,
                     background, blur, noise, polarity, rim, seed):
    """``(shape, spacing)`` of :func:`make_touching_particles` as tuples, or a one-line DeclumpError naming the
    argument that is wrong and what it accepts."""
    from gpu_pipeline.pipeline import validate_spacing

    try:
        dims = tuple(shape)
    except TypeError:
        dims = None
    if dims is None or len(dims) not in (2, 3) or not all(whole_number_at_least(n, 2) for n in dims):
        raise DeclumpError(f"shape must be 2 or 3 whole numbers of at least 2 ((rows, columns) or (planes, rows, "
                           f"columns)), got {shape!r}")
    dims = tuple(int(n) for n in dims)
    if not whole_number_at_least(n_particles, 0):
        raise DeclumpError(f"n_particles must be a whole number of at least 0, got {n_particles!r}")
    radii = _pair(radius_range)
    if radii is None or radii[0] <= 0:
        raise DeclumpError(f"radius_range must be two numbers (low, high) with 0 < low <= high (physical units), "
                           f"got {radius_range!r}")
    if not (_real(overlap) and 0 <= overlap < 1):
        raise DeclumpError(f"overlap must be a number from 0 (just touching) to below 1 (a fraction of the sum of "
                           f"radii), got {overlap!r}")
    if not (_real(touching_fraction) and 0 <= touching_fraction <= 1):
        raise DeclumpError(f"touching_fraction must be a probability from 0 to 1, got {touching_fraction!r}")
    spacing = validate_spacing(spacing, len(dims))
    levels = _pair(intensity_range)
    if levels is None or levels[0] < 0 or levels[1] > 1:
        raise DeclumpError(f"intensity_range must be two numbers (low, high) with 0 <= low <= high <= 1, got "
                           f"{intensity_range!r}")
    if not (_real(background) and 0 <= background <= 1):
        raise DeclumpError(f"background must be a number from 0 to 1, got {background!r}")
    if not (_real(blur) and blur >= 0):
        raise DeclumpError(f"blur must be a number of at least 0 (a Gaussian sigma, physical units; 0: none), "
                           f"got {blur!r}")
    if not (_real(noise) and noise >= 0):
        raise DeclumpError(f"noise must be a number of at least 0 (a standard deviation, 0..1 scale; 0: none), "
                           f"got {noise!r}")
    if not isinstance(polarity, str) or polarity not in ("bright", "dark"):
        raise DeclumpError(f"polarity must be 'bright' or 'dark', got {polarity!r}")
    if rim is not None and not (_real(rim) and rim > 0):
        raise DeclumpError(f"rim must be None (solid particles) or a thickness above 0 (physical units), "
                           f"got {rim!r}")
    if not whole_number_at_least(seed, 0):
        raise DeclumpError(f"seed must be a whole number of at least 0, got {seed!r}")
    return dims, spacing


def make_touching_particles(shape=(128, 128), n_particles=40, *, radius_range=(5.0, 12.0), overlap=0.2,
                            touching_fraction=0.7, spacing=None, intensity_range=(0.75, 1.0),
                            background=0.15, blur=1.0, noise=0.04, polarity="bright", rim=None, seed=0):
    """A sample image of touching particles and its ground-truth instance labels.

    Parameters
    ----------
    shape : tuple of int
        Output shape, 2D or 3D, in voxels.
    n_particles : int
        Particles to place (fewer when the volume fills up).
    radius_range : (float, float)
        Particle radii, physical units (``spacing`` units).
    overlap : float
        How far touching particles interpenetrate, as a fraction of the sum
        of radii (0: just touching).
    touching_fraction : float
        Probability that a new particle is placed against an existing one.
    spacing : sequence of float, optional
        Voxel size per axis, physical units (anisotropy); default 1. One
        number is the size of every axis, as in :func:`separate`.
    intensity_range : (float, float)
        Per-particle brightness, drawn uniformly (0..1 scale).
    background : float
        Background level (0..1 scale).
    blur : float
        Gaussian blur sigma, physical units.
    noise : float
        Standard deviation of additive Gaussian noise (0..1 scale).
    polarity : "bright" or "dark"
        Particles brighter than the background, or darker (inverted image).
    rim : float, optional
        Hollow particles: only each particle's outer shell of this thickness
        (physical units, measured from its own boundary, the faces it shares
        with its neighbours included) has its brightness, its cavity the
        background's; the ground truth is the whole particle. Default: solid.
    seed : int
        Random seed; the same seed gives the same bytes.

    Returns
    -------
    image : ndarray of uint8
    labels : ndarray of int32
        Ground truth, 0 background, 1..n in C order of first voxel.

    Raises
    ------
    DeclumpError
        On an argument outside what is listed above, in one line.
    """
    from gpu_pipeline.stages.components import relabel_by_first_voxel

    shape, spacing = _check_arguments(shape, n_particles, radius_range, overlap, touching_fraction, spacing,
                                      intensity_range, background, blur, noise, polarity, rim, seed)
    rng = np.random.default_rng(seed)
    spacing = np.asarray(spacing, dtype=float)
    shape_phys = np.asarray(shape) * spacing
    centres, radii = _place_centres(rng, shape_phys, n_particles, radius_range, overlap, touching_fraction)
    best_power = np.full(shape, np.inf)
    labels = np.zeros(shape, dtype=np.int32)
    for i, (c, r) in enumerate(zip(centres, radii)):
        lo = np.maximum(np.floor((c - r) / spacing).astype(int), 0)
        hi = np.minimum(np.ceil((c + r) / spacing).astype(int) + 1, shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        grids = np.ogrid[box]
        power = sum(((g * s) - cc) ** 2 for g, s, cc in zip(grids, spacing, c)) - r * r
        win = (power <= 0) & (power < best_power[box])
        best_power[box][win] = power[win]
        labels[box][win] = i + 1
    labels = relabel_by_first_voxel(labels)
    brightness = np.concatenate([[background], rng.uniform(*intensity_range, int(labels.max()))])
    image = brightness[labels]
    if rim is not None:
        from skimage.segmentation import find_boundaries

        depth = ndi.distance_transform_edt((labels > 0) & ~find_boundaries(labels, mode="inner"), sampling=spacing)
        image[(labels > 0) & (depth >= rim)] = background
    if blur > 0:
        image = ndi.gaussian_filter(image, sigma=blur / spacing)
    image = image + rng.normal(0, noise, shape)
    if polarity == "dark":
        image = 1.0 - image
    image = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
    return image, labels


def demo_sample(*, three_d=False, seed=0):
    """The sample of `declump demo` and of the web app: ``(image, truth, spacing)``.

    2D: 160 touching disks on 384x384 pixels; 3D: 120 spheres in 64x128x128
    voxels of spacing (2, 1, 1). Radii 5-12 (physical units).
    """
    if three_d:
        shape, n, spacing = (64, 128, 128), 120, (2.0, 1.0, 1.0)
    else:
        shape, n, spacing = (384, 384), 160, (1.0, 1.0)
    image, truth = make_touching_particles(shape, n, radius_range=(5, 12), spacing=spacing, seed=seed)
    return image, truth, spacing


def make_uneven_nuclei(shape=(256, 256), n_nuclei=60, *, radius_range=(7.0, 13.0), brightness_range=(0.15, 1.0),
                       nucleoli=(1, 3), nucleolus_radius=(0.15, 0.3), nucleolus_level=(0.05, 0.3),
                       illumination=0.4, background=0.04, blur=1.0, noise=0.02, touching_fraction=0.4, seed=0):
    """Fluorescence-like nuclei of uneven brightness with dark nucleoli, and their ground-truth labels.

    The hard case for one global threshold: per-nucleus brightness is
    log-uniform over ``brightness_range`` (dim and bright nuclei in one
    frame), the illumination falls off linearly by ``illumination`` across
    the last axis, and each nucleus holds ``nucleoli`` (min, max) dark disks
    (radius a fraction ``nucleolus_radius`` of the nucleus, intensity a
    fraction ``nucleolus_level`` of it) that punch holes in a thresholded
    mask. The shapes come from :func:`make_touching_particles` (radical-plane
    contacts, ``overlap`` 0.2), so ground truth is exact.

    Returns
    -------
    image : ndarray of uint16 (0..4095, a 12-bit camera)
    labels : ndarray of int32
    """
    rng = np.random.default_rng(seed)
    _, labels = make_touching_particles(shape, n_nuclei, radius_range=radius_range,
                                        touching_fraction=touching_fraction, blur=0, noise=0, seed=seed)
    n = int(labels.max())
    low, high = np.log(brightness_range[0]), np.log(brightness_range[1])
    level = np.concatenate([[0.0], np.exp(rng.uniform(low, high, n))])
    image = level[labels]
    grids = np.indices(labels.shape)
    centres = ndi.center_of_mass(np.ones_like(labels), labels, np.arange(1, n + 1))
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    for i, (centre, area) in enumerate(zip(centres, areas), start=1):
        radius = math.sqrt(area / math.pi) if labels.ndim == 2 else (3 * area / (4 * math.pi)) ** (1 / 3)
        for _ in range(int(rng.integers(nucleoli[0], nucleoli[1] + 1))):
            r = radius * rng.uniform(*nucleolus_radius)
            offset = rng.normal(size=labels.ndim)
            offset *= rng.uniform(0, max(radius - r - 2.0, 0.0)) / max(np.linalg.norm(offset), 1e-9)
            inside = sum((g - (c + o)) ** 2 for g, c, o in zip(grids, centre, offset)) <= r * r
            image[inside & (labels == i)] = level[i] * rng.uniform(*nucleolus_level)
    ramp = 1.0 - illumination * grids[-1] / max(labels.shape[-1] - 1, 1)
    image = background + image * ramp
    if blur > 0:
        image = ndi.gaussian_filter(image, blur)
    image = image + rng.normal(0, noise, labels.shape)
    return np.clip(np.rint(image * 4095), 0, 4095).astype(np.uint16), labels
