"""Global Otsu threshold from a histogram, and the particles' polarity.

The histogram is the unit of work: histograms of parts of a volume add up to
the histogram of the whole, so a chunked run gets the same threshold. Bin
indices are computed with explicit float64 arithmetic, so NumPy and CuPy put
every value in the same bin.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gpu_pipeline._backend import DeclumpError, get_array_module, to_host

#: Number of bins for floating-point images (scikit-image's default).
FLOAT_BINS = 256
#: Integer images get one bin per value while their range is at most this.
MAX_INTEGER_BINS = 65536
#: Values binned per step of :func:`intensity_histogram` (its temporaries stay near 100 MiB).
HISTOGRAM_SLICE = 1 << 22


@dataclass(frozen=True)
class HistogramBins:
    """Bin layout: ``nbins`` bins starting at ``low``; integer layouts have one bin per value."""

    low: float
    high: float
    nbins: int
    integer: bool

    @property
    def centers(self) -> np.ndarray:
        if self.integer:
            return self.low + np.arange(self.nbins, dtype=np.float64)
        edges = np.linspace(self.low, self.high, self.nbins + 1)
        return (edges[:-1] + edges[1:]) / 2


def histogram_bins(low, high, dtype) -> HistogramBins:
    """The bin layout for values in ``[low, high]`` of ``dtype``.

    Integer data with a range of at most 65536 values gets one bin per value
    (the threshold is then exactly scikit-image's); anything else gets 256
    equal bins over ``[low, high]``.
    """
    low, high = float(low), float(high)
    if not np.isfinite(low) or not np.isfinite(high):
        raise DeclumpError("the image holds NaN or inf values; declump accepts finite intensities only")
    if high <= low:
        raise DeclumpError(f"the image is constant (every value is {low:g}), so no threshold separates particles "
                           "from background; pass an image with contrast or a --mask")
    if np.issubdtype(np.dtype(dtype), np.integer) and high - low + 1 <= MAX_INTEGER_BINS:
        return HistogramBins(low, high, int(high - low) + 1, True)
    return HistogramBins(low, high, FLOAT_BINS, False)


def bin_index(values, bins: HistogramBins):
    """The bin of each value (int64), identical on NumPy and CuPy."""
    xp = get_array_module(values)
    v = values.astype(xp.float64)
    if bins.integer:
        index = (v - bins.low).astype(xp.int64)
    else:
        index = xp.floor((v - bins.low) * (bins.nbins / (bins.high - bins.low))).astype(xp.int64)
    return xp.clip(index, 0, bins.nbins - 1)


def intensity_histogram(image, bins: HistogramBins | None = None):
    """Counts of ``image`` values per bin (int64, on the host) and the bin layout.

    Parameters
    ----------
    image : ndarray (NumPy or CuPy)
        Intensities, any real dtype.
    bins : HistogramBins, optional
        A fixed layout (for summing histograms of chunks); default: from the
        image's own min and max.
    """
    xp = get_array_module(image)
    if bins is None:
        bins = histogram_bins(image.min(), image.max(), image.dtype)
    flat = image.ravel()
    counts = xp.zeros(bins.nbins, dtype=xp.int64)
    # In slices: bin_index makes float64 and int64 temporaries (about 24 bytes
    # per value), which for a whole 1024^3 volume would be 24 GiB. Integer
    # counts add exactly, so the result does not depend on the slicing.
    for start in range(0, flat.size, HISTOGRAM_SLICE):
        counts += xp.bincount(bin_index(flat[start:start + HISTOGRAM_SLICE], bins), minlength=bins.nbins)
    return to_host(counts).astype(np.int64), bins


def otsu_from_histogram(counts, bins: HistogramBins) -> float:
    """Otsu's threshold from a histogram: the bin centre maximising between-class variance.

    Same formula and tie-breaking as ``skimage.filters.threshold_otsu``
    (foreground is ``value > threshold``).
    """
    counts = np.asarray(counts, dtype=np.float64)
    centers = bins.centers
    if np.count_nonzero(counts) < 2:
        raise DeclumpError("the image has a single intensity level, so Otsu's threshold is undefined; "
                           "pass an image with contrast, a numeric --threshold or a --mask")
    weight1 = np.cumsum(counts)
    weight2 = np.cumsum(counts[::-1])[::-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        mean1 = np.cumsum(counts * centers) / weight1
        mean2 = (np.cumsum((counts * centers)[::-1]) / weight2[::-1])[::-1]
        variance = weight1[:-1] * weight2[1:] * (mean1[:-1] - mean2[1:]) ** 2
    return float(centers[int(np.nanargmax(variance))])


def otsu_threshold(image) -> float:
    """Otsu's threshold of a whole image (NumPy or CuPy), via :func:`otsu_from_histogram`."""
    counts, bins = intensity_histogram(image)
    return otsu_from_histogram(counts, bins)


def border_fraction_above(image, threshold) -> float:
    """Fraction of the image's outermost voxels (all faces) brighter than ``threshold``."""
    xp = get_array_module(image)
    above = 0
    total = 0
    for axis in range(image.ndim):
        for index in (0, -1):
            face = xp.take(image, index, axis=axis)
            above = above + (face > threshold).sum()  # stays lazy for Dask: one computation at the end
            total += face.size
    return int(above) / total


def choose_polarity(image, threshold, polarity="auto") -> str:
    """Decide whether particles are ``"bright"`` or ``"dark"`` relative to the background.

    ``auto``: the background is what covers most of the image border (on
    the 132 EMPS images this picks the right polarity for 112); an exactly
    split border falls back to the minority class of the whole image being
    the particles.
    """
    if polarity in ("bright", "dark"):
        return polarity
    if polarity != "auto":
        raise DeclumpError(f"polarity must be 'auto', 'bright' or 'dark', got {polarity!r}")
    border = border_fraction_above(image, threshold)
    if border != 0.5:
        return "bright" if border < 0.5 else "dark"
    above = float((image > threshold).mean())
    return "bright" if above <= 0.5 else "dark"


def foreground(image, threshold, polarity):
    """The particle mask: ``image > threshold`` for bright particles, ``<=`` for dark ones."""
    return image > threshold if polarity == "bright" else image <= threshold
