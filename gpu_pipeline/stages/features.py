"""Multi-scale pixel features for the trainable pixel classifier, in 2D and 3D, on NumPy or CuPy.

Per scale: Gaussian-smoothed intensity, gradient magnitude, Laplacian of
Gaussian, difference of Gaussians, Hessian eigenvalues and structure-tensor
eigenvalues (the filter bank ilastik made standard), after a per-image
percentile normalisation. Scales are physical (divided by ``spacing`` per
axis), so an anisotropic volume is smoothed correctly. Every feature of a
pixel depends only on the image within :func:`feature_halo` of it, and is
computed with the same arithmetic wherever the window starts: features of a
tile read with that halo equal the whole image's, bit for bit, which is what
makes tiled and chunked classification independent of the tiling.
"""
from __future__ import annotations

import math

import numpy as np

from gpu_pipeline._backend import GAUSSIAN_TRUNCATE, DeclumpError, get_array_module, ops_for, to_host

#: Changes whenever a feature's definition or order changes; saved in every model file.
FEATURE_SET_VERSION = "declump-features-2"  # 2: the side with fewer pixels normalises high (minority_high)

#: Physical scales (units of ``spacing``; pixels at spacing 1). ilastik's set is 0.3, 0.7, 1, 1.6, 3.5, 5, 10 px:
#: 0.3 px is a kernel of weights (0.004, 0.992, 0.004), i.e. the raw intensity, which is always the first
#: feature here; 10 px would need a halo of 61 px (its structure tensor adds a 5-px Gaussian), so an inner 128^3
#: tile would read 7.5x its own volume at that scale (5 px: 31 px, 3.3x). The set kept spans fine edges (0.7 px) to
#: particle-sized context (5 px, a 41 px wide kernel); larger context is a ``scales=`` option away.
DEFAULT_SCALES = (0.7, 1.0, 1.6, 3.5, 5.0)

#: Per-image normalisation: these percentiles map to 0 and 1.
DEFAULT_PERCENTILES = (1.0, 99.0)

_PER_SCALE = ("gaussian", "gradient_magnitude", "laplacian_of_gaussian", "difference_of_gaussians")


def feature_names(ndim, scales=DEFAULT_SCALES):
    """Names of the features :func:`pixel_features` returns, in channel order."""
    if ndim not in (2, 3):
        raise DeclumpError(f"pixel features are defined for 2D and 3D images, not {ndim}D")
    names = ["intensity"]
    for scale in _check_scales(scales):
        names += [f"{kind}_{scale:g}" for kind in _PER_SCALE]
        names += [f"hessian_eigenvalue{i}_{scale:g}" for i in range(ndim)]
        names += [f"structure_tensor_eigenvalue{i}_{scale:g}" for i in range(ndim)]
    return names


def _check_scales(scales):
    scales = tuple(float(s) for s in scales)
    if not scales or not all(math.isfinite(s) and s > 0 for s in scales) or list(scales) != sorted(set(scales)):
        raise DeclumpError(f"feature scales must be increasing positive physical sizes, got {scales}")
    return scales


def _radius(sigma_voxels):
    """scipy.ndimage's Gaussian radius per axis (voxels)."""
    return tuple(int(GAUSSIAN_TRUNCATE * float(s) + 0.5) for s in sigma_voxels)


def _scale_halo(scale, spacing):
    """Voxels per axis that the features of one scale read around a pixel."""
    inner = _radius([scale / s for s in spacing])
    outer = _radius([scale / 2 / s for s in spacing])
    # Hessian: two finite differences of the smoothed image; structure tensor: one, then the outer Gaussian.
    return tuple(i + max(2, 1 + o) for i, o in zip(inner, outer))


def feature_halo(spacing, scales=DEFAULT_SCALES):
    """Voxels per axis around a tile that its features depend on (the largest scale's reach)."""
    return tuple(max(h) for h in zip(*[_scale_halo(s, spacing) for s in _check_scales(scales)]))


def intensity_limits(image, *, low=DEFAULT_PERCENTILES[0], high=DEFAULT_PERCENTILES[1], counts=None, bins=None,
                     minority_high=True):
    """The ``low`` and ``high`` percentiles of an image's intensities, from its histogram, as normalisation limits.

    From the same histogram as the Otsu threshold (one bin per value for
    integer images, 256 bins otherwise), so that a chunked run gets the same
    limits by adding per-chunk histograms (pass ``counts`` and ``bins``).
    Returns ``(a, b)`` as floats, ``a != b``: :func:`normalize_intensity` maps
    ``a`` to 0 and ``b`` to 1. With ``minority_high`` (the default), the side of
    Otsu's threshold with fewer pixels maps high, i.e. ``a`` is the high
    percentile when most pixels are above the threshold: particles (the
    minority) then look alike whether they are dark on bright or bright on
    dark, which lets one model carry across EM images of either polarity
    (5-fold CV on 366 EMPS images, folds 0-1: F1@0.5 0.427 -> 0.480).
    Otherwise ``(lower, upper)``, ``upper > lower``.
    """
    from gpu_pipeline.stages.threshold import intensity_histogram, otsu_from_histogram

    if not 0 <= low < high <= 100:
        raise DeclumpError(f"normalisation percentiles must satisfy 0 <= low < high <= 100, got {low}, {high}")
    if counts is None:
        counts, bins = intensity_histogram(image)
    counts = np.asarray(counts, dtype=np.int64)
    cumulative = np.cumsum(counts)
    total = int(cumulative[-1])
    values = bins.centers if not bins.integer else bins.low + np.arange(bins.nbins, dtype=np.float64)
    lower = float(values[min(int(np.searchsorted(cumulative, low / 100 * total, side="left")), bins.nbins - 1)])
    upper = float(values[min(int(np.searchsorted(cumulative, high / 100 * total, side="left")), bins.nbins - 1)])
    if upper <= lower:  # a mostly constant image: fall back to the full range, which histogram_bins made non-empty
        lower, upper = float(bins.low), float(bins.high)
    if minority_high and np.count_nonzero(counts) >= 2:
        above = int(counts[bins.centers > otsu_from_histogram(counts, bins)].sum())
        if 2 * above > total:
            return upper, lower
    return lower, upper


def normalize_intensity(image, *, low=DEFAULT_PERCENTILES[0], high=DEFAULT_PERCENTILES[1], limits=None):
    """``image`` as float32 with its ``low``/``high`` percentiles mapped to 0/1 (not clipped), the minority side high.

    ``limits``: precomputed ``(a, b)`` values mapped to 0 and 1 (a chunked
    run's global ones); default: :func:`intensity_limits` of this image.
    """
    xp = get_array_module(image)
    lower, upper = limits if limits is not None else intensity_limits(image, low=low, high=high)
    scale = np.float32(1.0 / (float(upper) - float(lower)))
    return (image.astype(xp.float32) - np.float32(lower)) * scale


def _along(ndim, axis, lo, hi):
    """The index of ``lo:hi`` along ``axis`` of an ``ndim``-dimensional array."""
    index = [slice(None)] * ndim
    index[axis] = slice(lo, hi)
    return tuple(index)


def _difference(array, axis, step):
    """Central difference along ``axis`` divided by ``step`` (one-sided at the edges, nearest-value border)."""
    xp = get_array_module(array)
    out = xp.zeros_like(array)
    n = array.shape[axis]
    if n < 2:
        return out

    def cut(lo, hi):
        return _along(array.ndim, axis, lo, hi)

    out[cut(1, n - 1)] = array[cut(2, n)] - array[cut(0, n - 2)]
    out[cut(0, 1)] = array[cut(1, 2)] - array[cut(0, 1)]
    out[cut(n - 1, n)] = array[cut(n - 1, n)] - array[cut(n - 2, n - 1)]
    out *= np.float32(0.5 / step)
    return out


def _second_difference(array, axis, step):
    """Second difference along ``axis`` divided by ``step`` squared (nearest-value border)."""
    xp = get_array_module(array)
    out = xp.zeros_like(array)
    n = array.shape[axis]
    if n < 2:
        return out

    def cut(lo, hi):
        return _along(array.ndim, axis, lo, hi)

    out[cut(1, n - 1)] = array[cut(2, n)] + array[cut(0, n - 2)] - 2 * array[cut(1, n - 1)]
    out[cut(0, 1)] = array[cut(1, 2)] - array[cut(0, 1)]
    out[cut(n - 1, n)] = array[cut(n - 2, n - 1)] - array[cut(n - 1, n)]
    out *= np.float32(1.0 / (step * step))
    return out


def symmetric_eigenvalues(matrix):
    """Eigenvalues, largest first, of symmetric 2x2 or 3x3 matrices given as ``{(i, j): array}`` (i <= j).

    Closed form (3x3: the trigonometric solution of the characteristic
    cubic), elementwise on NumPy or CuPy; computed in float64, returned float32.
    """
    ndim = 2 if (2, 2) not in matrix else 3
    xp = get_array_module(matrix[(0, 0)])
    m = {k: v.astype(xp.float64) for k, v in matrix.items()}
    if ndim == 2:
        mean = (m[0, 0] + m[1, 1]) / 2
        radius = xp.sqrt(((m[0, 0] - m[1, 1]) / 2) ** 2 + m[0, 1] ** 2)
        return [(mean + radius).astype(xp.float32), (mean - radius).astype(xp.float32)]
    q = (m[0, 0] + m[1, 1] + m[2, 2]) / 3
    off = m[0, 1] ** 2 + m[0, 2] ** 2 + m[1, 2] ** 2
    a, b, c = m[0, 0] - q, m[1, 1] - q, m[2, 2] - q
    p = xp.sqrt((a * a + b * b + c * c + 2 * off) / 6)
    safe = xp.where(p > 0, p, 1.0)
    det = (a * (b * c - m[1, 2] ** 2) - m[0, 1] * (m[0, 1] * c - m[1, 2] * m[0, 2])
           + m[0, 2] * (m[0, 1] * m[1, 2] - b * m[0, 2])) / (safe ** 3)
    phi = xp.arccos(xp.clip(det / 2, -1.0, 1.0)) / 3
    first = q + 2 * p * xp.cos(phi)
    last = q + 2 * p * xp.cos(phi + 2 * math.pi / 3)
    middle = 3 * q - first - last
    return [v.astype(xp.float32) for v in (first, middle, last)]


def _grow(core, halo, shape):
    """The window ``core`` (slices) grown by ``halo`` voxels per axis, clipped to ``shape``."""
    return tuple(slice(max(0, c.start - h), min(n, c.stop + h)) for c, h, n in zip(core, halo, shape))


def _within(core, window):
    """``core`` in the coordinates of ``window``."""
    return tuple(slice(c.start - w.start, c.stop - w.start) for c, w in zip(core, window))


def tile_features(normalized, core, *, spacing, scales=DEFAULT_SCALES, out=None):
    """Features of the pixels in ``core`` (a tuple of slices) of an already normalised image.

    Each scale is computed on ``core`` grown by that scale's halo (clipped to
    the image), so the values equal :func:`pixel_features` of the whole
    image. Returns float32 ``(*core_shape, n_features)`` on the image's device.
    """
    xp = get_array_module(normalized)
    ops = ops_for(normalized)
    ndim = normalized.ndim
    scales = _check_scales(scales)
    core = tuple(slice(*c.indices(n)[:2]) for c, n in zip(core, normalized.shape))
    core_shape = tuple(c.stop - c.start for c in core)
    n_features = len(feature_names(ndim, scales))
    if out is None:
        out = xp.empty(core_shape + (n_features,), dtype=xp.float32)
    out[..., 0] = normalized[core]
    previous = out[..., 0]
    k = 1
    pairs = [(i, j) for i in range(ndim) for j in range(i, ndim)]
    for scale in scales:
        window = _grow(core, _scale_halo(scale, spacing), normalized.shape)
        inner = _within(core, window)
        smooth = ops.gaussian(normalized[window], tuple(scale / s for s in spacing))
        gradient = [_difference(smooth, a, spacing[a]) for a in range(ndim)]
        hessian = {}
        for i, j in pairs:
            hessian[i, j] = (_second_difference(smooth, i, spacing[i]) if i == j
                             else _difference(gradient[i], j, spacing[j]))[inner]
        tensor = {(i, j): ops.gaussian(gradient[i] * gradient[j], tuple(scale / 2 / s for s in spacing))[inner]
                  for i, j in pairs}
        out[..., k] = smooth[inner]
        magnitude = gradient[0][inner] ** 2
        for g in gradient[1:]:
            magnitude += g[inner] ** 2
        out[..., k + 1] = xp.sqrt(magnitude)
        laplacian = hessian[0, 0].copy()
        for a in range(1, ndim):
            laplacian += hessian[a, a]
        out[..., k + 2] = laplacian
        out[..., k + 3] = out[..., k] - previous
        previous = out[..., k]
        k += 4
        for values in (symmetric_eigenvalues(hessian), symmetric_eigenvalues(tensor)):
            for v in values:
                out[..., k] = v
                k += 1
    return out


def pixel_features(image, *, spacing=None, scales=DEFAULT_SCALES, limits=None):
    """Multi-scale features of every pixel, channels last, like ``skimage.feature.multiscale_basic_features``.

    Parameters
    ----------
    image : ndarray (NumPy or CuPy), 2D or 3D
        Intensities; normalised first with :func:`normalize_intensity`.
    spacing : float or sequence of float, optional
        Voxel size per axis; ``scales`` are in its units (default 1: pixels).
    scales : sequence of float
        Physical Gaussian scales (default :data:`DEFAULT_SCALES`).
    limits : (float, float), optional
        Normalisation limits (default: this image's 1st and 99th percentiles).

    Returns
    -------
    features : float32 ndarray ``(*image.shape, n_features)`` on the image's device
        In the order of :func:`feature_names`.

    Examples
    --------
    >>> import numpy as np
    >>> pixel_features(np.random.default_rng(0).random((32, 32))).shape
    (32, 32, 41)
    """
    from gpu_pipeline.pipeline import validate_image, validate_spacing

    validate_image(image)
    spacing = validate_spacing(spacing, image.ndim)
    normalized = normalize_intensity(image, limits=limits)
    return tile_features(normalized, tuple(slice(0, n) for n in image.shape), spacing=spacing, scales=scales)


__all__ = ["FEATURE_SET_VERSION", "DEFAULT_SCALES", "feature_names", "feature_halo", "intensity_limits",
           "normalize_intensity", "pixel_features", "tile_features", "symmetric_eigenvalues", "to_host"]
