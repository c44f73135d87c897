"""Global Otsu threshold from a histogram, and the particles' polarity.

The histogram is the unit of work: histograms of parts of a volume add up to
the histogram of the whole, so a chunked run gets the same threshold. Bin
indices are computed with explicit float64 arithmetic, so NumPy and CuPy put
every value in the same bin.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gpu_pipeline._backend import DeclumpError, get_array_module, to_host
from gpu_pipeline._common import UnusableValuesError, weighted_median
from gpu_pipeline.stages.components import component_table

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
        raise UnusableValuesError("the image holds NaN or inf values; declump accepts finite intensities only")
    if high <= low:
        raise UnusableValuesError(f"the image is constant (every value is {low:g}), so no threshold separates "
                                  "particles from background; pass an image with contrast or a mask (--mask, mask= "
                                  "in Python)")
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
    if xp.__name__ == "numpy":  # one compiled pass, no temporaries (None: a non-finite value, handled below)
        from cpu_fallback.kernels import histogram

        counts = histogram(image, bins.low, bins.high, bins.nbins, bins.integer)
        if counts is not None:
            return counts, bins
    flat = image.ravel()
    counts = xp.zeros(bins.nbins, dtype=xp.int64)
    # In slices: bin_index makes float64 and int64 temporaries (about 24 bytes
    # per value), which for a whole 1024^3 volume would be 24 GiB. Integer
    # counts add exactly, so the result does not depend on the slicing.
    for start in range(0, flat.size, HISTOGRAM_SLICE):
        counts += xp.bincount(bin_index(flat[start:start + HISTOGRAM_SLICE], bins), minlength=bins.nbins)
    return to_host(counts).astype(np.int64), bins


#: What to pass instead of an image of one intensity level (the threshold methods' refusal).
ONE_LEVEL = ("pass an image with contrast, a numeric threshold or a mask (--threshold N / --mask; threshold= / mask= "
             "in Python)")


def otsu_from_histogram(counts, bins: HistogramBins) -> float:
    """Otsu's threshold from a histogram: the bin centre maximising between-class variance.

    Same formula and tie-breaking as ``skimage.filters.threshold_otsu``
    (foreground is ``value > threshold``).
    """
    counts = np.asarray(counts, dtype=np.float64)
    centers = bins.centers
    if np.count_nonzero(counts) < 2:
        raise DeclumpError(f"the image has a single intensity level, so Otsu's threshold is undefined; {ONE_LEVEL}")
    weight1 = np.cumsum(counts)
    weight2 = np.cumsum(counts[::-1])[::-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        mean1 = np.cumsum(counts * centers) / weight1
        mean2 = (np.cumsum((counts * centers)[::-1]) / weight2[::-1])[::-1]
        variance = weight1[:-1] * weight2[1:] * (mean1[:-1] - mean2[1:]) ** 2
    return float(centers[int(np.nanargmax(variance))])


def li_from_histogram(counts, bins: HistogramBins, side="bright") -> float:
    """Li's minimum cross-entropy threshold from a histogram.

    The iteration of ``skimage.filters.threshold_li`` (values shifted to start
    at 0, started at the mean, stopped below half a bin) run on bin centres:
    scikit-image's integer-image result exactly, within a bin for floats.

    ``side="dark"``: Li's threshold for dark particles: the same iteration on
    the mirrored values (the highest shifted to where the lowest is), mapped
    back. Li's criterion is not symmetric: on an inverted image its plain
    threshold lies on the particles' side of Otsu's, where it finds fewer
    particles than Otsu instead of the dim ones too.
    """
    counts = np.asarray(counts, dtype=np.float64)
    centers = bins.centers - bins.low
    if np.count_nonzero(counts) < 2:
        raise DeclumpError(f"the image has a single intensity level, so Li's threshold is undefined; {ONE_LEVEL}")
    if side == "dark":
        top = float(centers[-1] + centers[0])  # (the mirrored values start where the plain ones do)
        return float(bins.low + top - _li_iteration(top - centers, counts))
    return float(_li_iteration(centers, counts) + bins.low)


def _li_iteration(centers, counts):
    """Li's iteration on non-negative bin ``centers`` (any order) with ``counts``: the threshold, same units."""
    tolerance = abs(centers[1] - centers[0]) / 2
    t_next = float(np.average(centers, weights=counts))
    t_curr = -2 * tolerance
    while abs(t_next - t_curr) > tolerance:
        t_curr = t_next
        above = centers > t_curr
        if not above.any() or above.all() or counts[above].sum() == 0 or counts[~above].sum() == 0:
            break
        mean_fore = np.average(centers[above], weights=counts[above])
        mean_back = np.average(centers[~above], weights=counts[~above])
        if mean_back == 0:
            break
        t_next = (mean_back - mean_fore) / (np.log(mean_back) - np.log(mean_fore))
    return t_next


def triangle_from_histogram(counts, bins: HistogramBins) -> float:
    """The triangle threshold (Zack et al. 1977) from a histogram, as ``skimage.filters.threshold_triangle``.

    The line from the histogram's peak to the end of its longer tail; the
    threshold is the bin farthest below it. Suited to a dominant background
    peak with the particles in a long, flat tail.
    """
    hist = np.asarray(counts, dtype=np.float64)
    centers = bins.centers
    nbins = hist.size
    occupied = np.flatnonzero(hist)
    if occupied.size < 2:
        raise DeclumpError("the image has a single intensity level, so the triangle threshold is undefined; "
                           + ONE_LEVEL)
    peak = int(np.argmax(hist))
    low, high = int(occupied[0]), int(occupied[-1])
    flip = peak - low < high - peak
    if flip:
        hist = hist[::-1]
        low = nbins - high - 1
        peak = nbins - peak - 1
    width = peak - low
    if width == 0:  # the peak is at the end of the longer tail: nothing to measure against
        return float(centers[nbins - peak - 1] if flip else centers[peak])
    x = np.arange(width)
    y = hist[x + low]
    norm = np.sqrt(hist[peak] ** 2 + width ** 2)
    level = int(np.argmax(hist[peak] / norm * x - width / norm * y)) + low
    return float(centers[nbins - level - 1] if flip else centers[level])


def percentile_from_histogram(counts, bins: HistogramBins, percent) -> float:
    """The value below which ``percent`` % of the voxels lie, at bin resolution (the bin's upper edge)."""
    counts = np.asarray(counts, dtype=np.float64)
    cumulative = np.cumsum(counts)
    index = int(np.searchsorted(cumulative, cumulative[-1] * float(percent) / 100.0))
    index = min(index, bins.nbins - 1)
    if bins.integer:
        return float(bins.low + index)
    return float(bins.low + (index + 1) * (bins.high - bins.low) / bins.nbins)


#: Global thresholds computed from the histogram alone (chunked runs reduce one histogram over chunks).
HISTOGRAM_METHODS = {"otsu": otsu_from_histogram, "li": li_from_histogram, "triangle": triangle_from_histogram}


def histogram_thresholds(counts, bins: HistogramBins) -> dict:
    """Every :data:`HISTOGRAM_METHODS` threshold of one histogram: ``{"otsu": ..., "li": ..., "triangle": ...}``."""
    return {name: method(counts, bins) for name, method in HISTOGRAM_METHODS.items()}


def otsu_threshold(image) -> float:
    """Otsu's threshold of a whole image (NumPy or CuPy), via :func:`otsu_from_histogram`."""
    counts, bins = intensity_histogram(image)
    return otsu_from_histogram(counts, bins)


def face_voxels(shape):
    """The voxels of each outer face of an image of ``shape``, in :func:`face_counts_above`'s order (axis 0's
    first and last layer, then axis 1's, ...): a voxel on an edge or corner lies on each of its faces."""
    return [math.prod(shape[:axis] + shape[axis + 1:]) for axis in range(len(shape)) for _ in (0, -1)]


def face_counts_above(image, threshold):
    """Per outer face (:func:`face_voxels`' order), the voxels brighter than ``threshold``: lazy for a Dask
    array (computed together)."""
    xp = get_array_module(image)
    return [(xp.take(image, index, axis=axis) > threshold).sum() for axis in range(image.ndim) for index in (0, -1)]


#: A face counts as an annotation band (:func:`border_fraction`) where it lies wholly on one side of the
#: threshold and the faces' median fraction lies over this far from it: a band's other faces are mostly
#: background (particles cut by the frame, and the band's own ends, cover about a third of them at most), an
#: illumination ramp's median is about 1/2 (two of its faces cross the ramp); between the two.
BAND_MEDIAN_GAP = 0.6


def border_fraction(counts, sizes) -> float:
    """The fraction of the outermost voxels above the threshold, as the ``auto`` polarity weighs it, from each
    face's count above it and size (:func:`face_counts_above`, :func:`face_voxels`).

    The faces are pooled, leaving out a face that lies wholly on one side while the faces' median fraction
    lies more than :data:`BAND_MEDIAN_GAP` from it: an information band or frame along one edge (a
    microscope's data bar, a dark strip of padding), the one part of an image other than its background that
    covers a whole edge. Particles cut by the frame seldom do. An illumination ramp (one edge dark, the
    opposite one bright) puts the median near 1/2, nearer than the gap to either edge: all its faces stay.
    At least half the faces stay: those on the median's side of 1/2.
    """
    counts, sizes = [int(c) for c in counts], [int(n) for n in sizes]
    fractions = [c / n for c, n in zip(counts, sizes)]
    middle = float(np.median(fractions))
    kept = [(c, n) for c, n, f in zip(counts, sizes, fractions)
            if not (f in (0.0, 1.0) and abs(f - middle) > BAND_MEDIAN_GAP)]
    return sum(c for c, _ in kept) / sum(n for _, n in kept)


def border_fraction_above(image, threshold) -> float:
    """:func:`border_fraction` of ``image`` at ``threshold``."""
    return border_fraction(face_counts_above(image, threshold), face_voxels(tuple(image.shape)))


#: ``auto`` polarity: weight of the connectivity evidence against the border evidence (both in [-1, 1]).
#: Chosen on emps_subset (the weight of a logistic fit there, 8.94 : 2.92; 1/3 scores the same), checked on
#: emps_train_rest: ``python -m bench.auto_foreground --polarity``.
CONNECTIVITY_WEIGHT = 1 / 3


def share_of_largest(sizes) -> float:
    """Largest of the component ``sizes`` over their sum (0 when there are none)."""
    return float(sizes.max()) / float(sizes.sum()) if sizes.size else 0.0


def largest_component_share(mask) -> float:
    """Fraction of ``mask``'s voxels in its largest face-connected component (0 for an empty mask)."""
    return share_of_largest(component_table(mask)[2][1:])


def largest_component_shares(above, keep=None):
    """:func:`largest_component_share` of ``above`` and of ``~above``: the two sides of a threshold. ``keep``
    (a dict): their :func:`component_table` are put there as ``"above"`` and ``"below"``."""
    shares = []
    xp = get_array_module(above)
    # Where only the sizes are kept, the two labellings share one buffer on the CPU: a fresh one would have its
    # pages faulted in again (0.15-0.2 s of a 256x512x512 volume on the 2-core VM).
    scratch = xp.empty(above.shape, dtype=xp.int32) if keep is None and xp is np else None
    for name, mask in (("above", above), ("below", ~above)):
        table = component_table(mask, out=scratch)
        shares.append(share_of_largest(table[2][1:]))
        if keep is not None:
            keep[name] = table
    return tuple(shares)


def polarity_score(above_fraction, border_above, largest_above, largest_below) -> float:
    """The ``auto`` polarity's evidence that particles are bright (> 0) rather than dark (< 0).

    Two statistics of the two sides of the threshold, each in [-1, 1]:

    - border: ``above_fraction - border_above``, how much less of the
      image's outermost voxels than of the whole image the bright side
      covers. Particles lie inside the frame, so they are rarer on the border
      than in the image; the background (support film, a vignette, a frame)
      is rarer inside. Whichever side is the majority, crowded or not.
      ``border_above`` leaves out an information band along one edge
      (:func:`border_fraction`).
    - connectivity: ``largest_below - largest_above``, the share of each
      side's voxels in its largest connected piece. The background around
      particles is one connected piece; particles are many. This decides
      where the border is no evidence: particles crowded everywhere, cut by
      the frame as often as the background.

    The score is ``border + CONNECTIVITY_WEIGHT * connectivity``.
    """
    return (float(above_fraction) - float(border_above)) + CONNECTIVITY_WEIGHT * (float(largest_below)
                                                                                  - float(largest_above))


def choose_polarity(image, threshold, polarity="auto", *, largest_shares=largest_component_shares,
                    evaluate=lambda *values: values) -> str:
    """Decide whether particles are ``"bright"`` or ``"dark"`` relative to the background.

    ``auto``: the sign of :func:`polarity_score` at ``threshold`` (the side
    rarer on the border than in the image, and split into more pieces, is the
    particles); a score of exactly 0 falls back to the minority side being
    the particles. With the defaults on the 366 EMPS images, the rule
    before this one (the background is what covers most of the border)
    picked the side with the worse foreground on 61; this one, with
    ``separate``'s fallback (a side that fills the image once its holes are
    filled is the background), on 34, which lose less; with the border's
    information bands left out (:func:`border_fraction`), on 33
    (``python -m bench.auto_foreground --polarity``).

    ``largest_shares``: how :func:`largest_component_shares` is computed for
    the mask above ``threshold`` (the chunked engine passes its own, for Dask
    arrays: both sides in one pass); ``evaluate``: how the two fractions are
    computed together (``dask.compute`` for Dask arrays: one pass, not two).
    """
    if polarity in ("bright", "dark"):
        return polarity
    if polarity != "auto":
        raise DeclumpError(f"polarity must be 'auto', 'bright' or 'dark', got {polarity!r}")
    above = image > threshold
    above_fraction, counts = evaluate(above.mean(), face_counts_above(image, threshold))
    return polarity_from(float(above_fraction), border_fraction(counts, face_voxels(tuple(image.shape))),
                         lambda: largest_shares(above))


def polarity_from(above_fraction, border_above, largest_shares) -> str:
    """:func:`choose_polarity`'s ``auto`` pick from its statistics: the fraction of the voxels above the
    threshold, the fraction of the outermost voxels above it, and ``largest_shares()`` (the largest piece's
    share of each side, ``(above, below)``), called only where it can change the pick."""
    if abs(above_fraction - border_above) > CONNECTIVITY_WEIGHT:
        # The connectivity term lies in [-1, 1]: it cannot flip this score's sign, so its two labellings (two
        # more passes over a chunked volume) are skipped. Same pick as the full score.
        score = polarity_score(above_fraction, border_above, 0.0, 0.0)
    else:
        largest_above, largest_below = largest_shares()
        score = polarity_score(above_fraction, border_above, largest_above, largest_below)
    if score != 0:
        return "bright" if score > 0 else "dark"
    return "bright" if above_fraction <= 0.5 else "dark"


#: ``polarity="auto"`` in 2D: the other side's separation is taken instead where its particles' solidity
#: (:func:`shape_solidity`) exceeds the first side's by more than this. Particles are round or convex; what lies
#: between them is not: where the first side was the gaps of close-packed particles (many small pieces, while
#: the packed particles are one connected piece), its pieces are concave slivers. Measured 2026-12-07 on the 366
#: EMPS images (both sides run on each): pooled F1@0.5 0.661 -> 0.717, 11 images change side, 9 better, 1 worse;
#: the margin 0.1 gave the best figure on emps_subset and on emps_train_rest alike (0.05: 0.7166, 0.2: 0.664).
POLARITY_SOLIDITY_MARGIN = 0.1
#: ... over particles of at least this many pixels, and only where both sides give at least
#: ``POLARITY_MIN_PIECES`` of them.
POLARITY_MIN_PIECE = 10
POLARITY_MIN_PIECES = 3


def shape_solidity(labels):
    """``(solidity, pieces)`` of a 2D label image: the particles' mean solidity (area over convex hull area),
    weighted by area, over those of at least ``POLARITY_MIN_PIECE`` pixels, and their count. On the host
    (scikit-image's convex hulls; a CuPy label image is copied there: it is 2D)."""
    from skimage.measure import regionprops

    host = np.asarray(to_host(labels))
    props = [p for p in regionprops(host) if p.area >= POLARITY_MIN_PIECE]
    if not props:
        return 0.0, 0
    area = np.array([p.area for p in props], dtype=np.float64)
    return float((area * np.array([p.solidity for p in props])).sum() / area.sum()), len(props)


def foreground(image, threshold, polarity):
    """The particle mask: ``image > threshold`` for bright particles, ``<=`` for dark ones."""
    return image > threshold if polarity == "bright" else image <= threshold


#: What ``threshold`` accepts besides a number.
THRESHOLD_METHODS = ("auto", "otsu", "li", "triangle", "local")


def check_threshold(threshold):
    """Refuse a ``threshold`` that is neither one of :data:`THRESHOLD_METHODS` nor a finite number (one line)."""
    if isinstance(threshold, str):
        ok = threshold in THRESHOLD_METHODS
    else:
        ok = (not isinstance(threshold, (bool, np.bool_)) and isinstance(threshold, (int, float, np.integer,
                                                                                     np.floating))
              and math.isfinite(float(threshold)))
    if not ok:
        raise DeclumpError(f"threshold must be one of {', '.join(THRESHOLD_METHODS)} or a finite number (image "
                           f"units), got {threshold!r}")
#: ``auto`` clips the smoothed image to these percentiles before its histogram (percentile normalisation)
#: when they span less than ``SQUEEZE`` of its full range: then a few hot or dead voxels would squeeze the
#: particles and background into a few of the 256 bins. Otherwise clipping would only move the thresholds.
NORMALISE_PERCENTILES = (0.5, 99.9)
SQUEEZE = 0.5
#: Float images get this many bins for the percentiles (integer images: one per value).
PERCENTILE_BINS = 4096
#: ``local``: the background is a Gaussian average of the background voxels with sigma this fraction of the
#: image's extent per axis, re-estimated this many times without the particles found.
LOCAL_SCALE = 0.125
LOCAL_ROUNDS = 2


@dataclass
class ThresholdDecision:
    """How the foreground was found: method, threshold (image units; for ``local``: above the local
    background), polarity, the candidates ``auto`` weighed and the percentile range it clipped to."""

    method: str
    threshold: float
    polarity: str
    candidates: dict
    intensity_range: tuple | None = None


def percentile_range(image, percents=NORMALISE_PERCENTILES):
    """The image values at ``percents`` (low, high), from one histogram (so a chunked run can reduce it)."""
    bins = histogram_bins(image.min(), image.max(), image.dtype)
    if not bins.integer:
        bins = HistogramBins(bins.low, bins.high, PERCENTILE_BINS, False)
    counts, _ = intensity_histogram(image, bins)
    low, high = (percentile_from_histogram(counts, bins, p) for p in percents)
    return (low, high) if high > low else (bins.low, bins.high)


#: A tail of the histogram beyond the normalising percentiles that holds a connected piece of at least a ball
#: of this radius (voxels) is particles, not hot or dead voxels: few particles in a large field (one particle
#: in 512^2 covers 0.04 % of it) lie wholly beyond the 99.9th percentile, and clipping them away left Otsu
#: to split the background noise (thousands of specks, F1 0).
TAIL_OBJECT_RADIUS = 4


def tails_without_objects(image, low, high, lowest, highest):
    """``(low, high)`` with each tail that holds a particle-sized piece opened to the image's extreme
    (``lowest``, ``highest``: the image's minimum and maximum)."""
    size = tail_object_voxels(image.ndim)
    return tuple(extreme if largest_piece(beyond) >= size else bound
                 for beyond, extreme, bound in ((image < low, lowest, low), (image > high, highest, high)))


def tail_object_voxels(ndim) -> float:
    """The voxels of a ball (a disc in 2D) of radius :data:`TAIL_OBJECT_RADIUS`: the smallest particle-sized piece."""
    return math.pi * TAIL_OBJECT_RADIUS ** 2 if ndim == 2 else 4 / 3 * math.pi * TAIL_OBJECT_RADIUS ** 3


def largest_piece(mask) -> int:
    """Voxels in ``mask``'s largest face-connected piece (0 where it is empty)."""
    from gpu_pipeline._backend import ops_for

    ops = ops_for(mask)
    labels, count = ops.label(mask)
    return int(ops.label_sizes(labels, count)[1:].max()) if count else 0


#: Otsu's weights favour classes of similar size: where the particles are a tiny share of the image (one particle
#: of radius 6 in 256^3 covers 0.006 % of it), splitting the background's noise in two has the larger
#: between-class variance, and Otsu's threshold lies in the middle of the background (224,713 specks found, F1
#: 0, 2026-12-06). ``auto`` recognises this where the histogram is one mode (at most SPARSE_TAIL of the voxels
#: lie beyond its noise: its peak +- NOISE_SIGMAS standard deviations measured from its width at half height)
#: and Otsu's threshold lies within that noise; it then takes Otsu's threshold of the voxels beyond the noise on
#: the side where that finds a particle-sized piece (:func:`sparse_foreground`). The width at half height, not
#: the spread of all voxels: on a real micrograph the particles widen the whole histogram's spread until
#: Otsu's threshold between two modes lies "within" it (130 of the 366 EMPS images, 99 of them then lower).
SPARSE_TAIL = 0.02


def mode_band(counts, bins):
    """``(low, high)``: the histogram's highest bin -+ :data:`NOISE_SIGMAS` standard deviations of its mode, the
    deviation from the mode's full width at half its height (interpolated between bins; at least one bin)."""
    counts = np.asarray(counts, dtype=np.float64)
    centers = bins.centers
    peak = int(np.argmax(counts))
    half = counts[peak] / 2
    step = float(centers[1] - centers[0]) if bins.nbins > 1 else 1.0
    edges = []
    for direction in (-1, 1):
        i = peak
        while 0 <= i + direction < counts.size and counts[i + direction] >= half:
            i += direction
        j = i + direction  # the first bin below half height, where there is one
        inside = 0.0 if not 0 <= j < counts.size else (counts[i] - half) / (counts[i] - counts[j])
        edges.append(centers[i] + direction * step * inside)
    sigma = max((edges[1] - edges[0]) / 2.3548, step)
    return centers[peak] - NOISE_SIGMAS * sigma, centers[peak] + NOISE_SIGMAS * sigma


def beyond_noise_thresholds(counts, bins, otsu, polarity="auto") -> dict:
    """``{side: threshold}`` where the histogram is one mode and ``otsu`` splits its noise (see
    :data:`SPARSE_TAIL`, :func:`mode_band`): for each side ``polarity`` allows, Otsu's threshold of the voxels
    beyond the noise there, where it lies at least twice as far from the peak as the noise reaches. Empty where
    the histogram is not one mode, Otsu's threshold lies beyond the noise, or no side has such a threshold (one
    broad mode, as on a micrograph of large particles shading into the background). From the histogram alone:
    a chunked run reads it from its reduced histogram."""
    low, high = mode_band(counts, bins)
    peak = (low + high) / 2
    counts = np.asarray(counts)
    centers = bins.centers
    if not low < otsu < high or counts[(centers < low) | (centers > high)].sum() > SPARSE_TAIL * counts.sum():
        return {}
    found = {}
    for side, beyond in (("bright", centers > high), ("dark", centers < low)):
        tail = np.where(beyond, counts, 0)
        if polarity not in ("auto", side) or np.count_nonzero(tail) < 2:
            continue
        value = otsu_from_histogram(tail, bins)
        if abs(value - peak) >= 2 * (high - peak):  # clear of the noise: not one broad mode
            found[side] = value
    return found


def sparse_foreground(image, counts, bins, otsu, polarity):
    """``(threshold, side, mask)`` where ``otsu`` splits the noise of a one-mode histogram: of the
    :func:`beyond_noise_thresholds`, the one whose foreground holds the larger piece of at least
    :func:`tail_object_voxels`. None where there is none, or no side holds such a piece (nothing beyond the
    noise looks like a particle)."""
    found = None
    for side, value in beyond_noise_thresholds(counts, bins, otsu, polarity).items():
        mask = foreground(image, value, side)
        piece = largest_piece(mask)
        if piece >= tail_object_voxels(image.ndim) and (found is None or piece > found[0]):
            found = (piece, value, side, mask)
    return None if found is None else found[1:]


def local_background(image, background_guess, sigma_voxels):
    """The background level at every voxel, from the background voxels within a few ``sigma_voxels``.

    Normalised convolution: Gaussian of the background voxels' values over
    the Gaussian of their indicator, so particles do not raise the estimate.
    Where no background voxel is near, the mean background is used.
    """
    from gpu_pipeline._backend import ops_for

    xp = get_array_module(image)
    ops = ops_for(image)
    weight = background_guess.astype(xp.float32)
    if not bool(weight.any()):
        return xp.full(image.shape, float(image.mean()), dtype=xp.float32)
    values = ops.gaussian(xp.where(background_guess, image, 0).astype(xp.float32), sigma_voxels)
    support = ops.gaussian(weight, sigma_voxels)
    fallback = xp.float32(float(image[background_guess].mean()))
    return xp.where(support > 1e-3, values / xp.maximum(support, xp.float32(1e-3)), fallback)


def threshold_foreground(smoothed, threshold, polarity, *, components=False):
    """The particle mask of a smoothed image and the :class:`ThresholdDecision` that made it.

    ``threshold``: a number (image units), a histogram method (``otsu``,
    ``li``, ``triangle``: global, equal to scikit-image's), ``local`` (Otsu
    above a background estimated over an eighth of the image, for uneven
    illumination: :func:`_flattened`) or ``auto`` (see :func:`choose_method`).

    With ``components``, a third value: the :func:`component_table` of the
    mask and of its background, where the ``auto`` polarity labelled them at
    this very threshold (Otsu's), so that cleanup and the scale measurement
    need not label them again; else None.
    """
    check_threshold(threshold)
    if not isinstance(threshold, str):
        value = float(threshold)
        side = choose_polarity(smoothed, value, polarity)
        found = foreground(smoothed, value, side), ThresholdDecision("fixed", value, side, {})
        return (*found, None) if components else found
    xp = get_array_module(smoothed)
    intensity_range = None
    image = smoothed
    if threshold == "auto":
        low, high = percentile_range(smoothed)
        lowest, highest = float(smoothed.min()), float(smoothed.max())
        if high - low < SQUEEZE * (highest - lowest):
            low, high = tails_without_objects(smoothed, low, high, lowest, highest)
        if high - low < SQUEEZE * (highest - lowest):
            intensity_range = (low, high)
            image = xp.clip(smoothed, xp.asarray(low, dtype=smoothed.dtype), xp.asarray(high, dtype=smoothed.dtype))
    counts, bins = intensity_histogram(image)
    candidates = histogram_thresholds(counts, bins)
    sparse = sparse_foreground(image, counts, bins, candidates["otsu"], polarity) if threshold == "auto" else None
    if sparse is not None:  # a few particles in a large field: Otsu's threshold splits the background's noise
        candidates["sparse"], side, mask = sparse
        found = mask, ThresholdDecision("sparse", candidates["sparse"], side, candidates, intensity_range)
        return (*found, None) if components else found
    tables = {} if components else None
    side = choose_polarity(image, candidates["otsu"], polarity,
                          largest_shares=lambda above: largest_component_shares(above, keep=tables))
    if threshold == "auto" and side == "dark":
        candidates["li"] = li_from_histogram(counts, bins, side)  # (see there: Li's plain value suits bright ones)
    method, mask = choose_method(image, counts, bins, candidates, side) if threshold == "auto" else (threshold, None)
    parts = None
    if tables and method == "otsu":  # the mask is one side at Otsu's threshold, its background the other
        parts = (tables["above"], tables["below"]) if side == "bright" else (tables["below"], tables["above"])
    tables = None  # (both freed here where the method is not Otsu's)
    if method != "local":
        value = candidates[method]
        found = (foreground(image, value, side) if mask is None else mask,
                 ThresholdDecision(method, value, side, candidates, intensity_range))
        return (*found, parts) if components else found
    flat, value = _flattened(image, side)
    candidates["local"] = value
    found = flat > value, ThresholdDecision("local", value, side, candidates, intensity_range)
    return (*found, None) if components else found


def _flattened(image, side):
    """The image minus its local background (signed so particles are positive) and Otsu's threshold on it.

    The background is estimated at ``LOCAL_SCALE`` of the image's extent
    (illumination varies over the field, not from particle to particle),
    first from every voxel, then ``LOCAL_ROUNDS`` times from the voxels the
    previous round left as background.
    """
    xp = get_array_module(image)
    signed = image.astype(xp.float32) if side == "bright" else -image.astype(xp.float32)
    sigma = tuple(LOCAL_SCALE * n for n in image.shape)
    background_voxels = xp.ones(image.shape, dtype=bool)
    for _ in range(LOCAL_ROUNDS + 1):
        flat = signed - local_background(signed, background_voxels, sigma)
        counts, bins = intensity_histogram(flat)
        value = otsu_from_histogram(counts, bins)
        background_voxels = flat <= value
    return flat, value


#: ``auto`` leaves Otsu for Li when Li's foreground has at least this fraction of its area in objects that
#: Otsu misses entirely (dim particles). With Li's outline kept only for what Otsu misses (OTSU_COVERED, below),
#: lower shares were measured again (2026-12-05 evening, bench.defaults_sweep): 0.01 / 0.001 take Li on 17 / 47
#: of the 366 EMPS images instead of 11, pooled emps_subset 0.6028 -> 0.6027 / 0.6027, emps_train_rest 0.6704 ->
#: 0.6708 / 0.6748 (7 images up and 6 down at 0.001, by up to 0.5 each way), everything else unchanged: 0.03 stays.
MISSED_AREA = 0.03


#: Where ``auto`` takes Li, Li's objects that Otsu's foreground already covers this share of or more keep
#: Otsu's outline: they are Otsu's particles seen through a lower threshold, wider by the blur of their edges and
#: joined where neighbours touch; Li's mask stays for the objects Otsu misses or sees only in part (dim
#: particles, dim parts of a cluster). Measured 2026-12-05 (bench.defaults_sweep against
#: defaults_sweep_2026-12-05_s41_lone_strokes.md, and make_uneven_nuclei sets not used before: seeds
#: 200-219 radius 7-13, 300-309 radius 4-8 (150 nuclei), 400-409 radius 10-20 (30), each 256^2), pooled
#: F1@0.5 / mean F1, Li everywhere (1.0) -> 0.8 / 0.7 / 0.5:
#: DSB 0.767 / 0.504 -> 0.792 / 0.530, 0.870 / 0.601, 0.848 / 0.562; radius 7-13 0.870 / 0.640 -> 0.869 / 0.672,
#: 0.875 / 0.687, 0.847 / 0.676; radius 4-8 0.731 / 0.440 -> 0.743 / 0.462, 0.759 / 0.511, 0.778 / 0.545;
#: radius 10-20 0.927 / 0.759 -> 0.929 / 0.784, 0.898 / 0.759, 0.840 / 0.728; the sweep's nuclei (seeds 0-2,
#: 100-105) 0.9072 / 0.676 -> 0.9075 / 0.704 at 0.8; EMPS (Li on 11 of the 366) 0.6035 / 0.6687 -> 0.6028 /
#: 0.6704 at 0.8 (e211d9d7ac: tighter particles lower the auto min_size under a scale bar's two pieces); the
#: embryo 3D nuclei and every Otsu image unchanged. 0.8: no set lower by more than 0.0015 at F1@0.5, mean F1
#: higher on every nuclei set.
#: Two ways of narrowing Li's outline in the objects kept, measured and not taken (2026-12-05 night, fresh
#: make_uneven_nuclei seeds 600-611 radius 4-8, 700-715 radius 7-13, 800-811 radius 10-20, 1000-1009 radius 5-9
#: (110 nuclei), and DSB; pooled F1@0.5, this rule -> the variant): Li's pixels beyond Otsu's opened by a cross
#: (strips of two pixels or less go) 0.734 / 0.879 / 0.844 / 0.837, DSB 0.792 -> 0.786 / 0.875 / 0.826 / 0.862,
#: DSB 0.831 (mean F1 higher on the small nuclei, +0.08, lower on DSB, -0.017); the objects Otsu sees half or more
#: of at the threshold halfway between Otsu's and Li's -> 0.764 / 0.871 / 0.782 / 0.836, DSB 0.844. Each gains on
#: small crowded nuclei, where Li's wider outline joins neighbours, and loses on large dim ones (more splits),
#: the same trade as lowering this share.
OTSU_COVERED = 0.8


def covered_objects(low_mask, high_mask):
    """``low_mask``'s face-connected components and how much of each ``high_mask`` covers:
    ``(labels, area, covered)``, voxels per label 0..count (label 0, the background, included)."""
    from gpu_pipeline._backend import ops_for

    xp = get_array_module(low_mask)
    labels, count = ops_for(low_mask).label(low_mask)
    if xp.__name__ == "numpy":  # one compiled pass instead of two bincounts and a float64 copy of the mask
        from cpu_fallback.kernels import area_and_covered

        area, covered = area_and_covered(labels, high_mask & low_mask, count)
    else:
        flat = labels.ravel()
        area = xp.bincount(flat, minlength=count + 1)
        covered = xp.bincount(flat, weights=(high_mask & low_mask).ravel().astype(xp.float64), minlength=count + 1)
    return labels, area, covered


def missed_share(area, covered) -> float:
    """Fraction of the area of :func:`covered_objects`' components (``area``, ``covered``: per label, 0 the
    background) in those that the high mask covers less than half of (objects missed)."""
    missed = (2 * covered < area)
    missed[0] = False
    return float(area[missed].sum()) / max(float(area[1:].sum()), 1.0)


def combined_foreground(high_mask, objects):
    """``high_mask`` (Otsu's foreground) and the objects of the low mask (Li's) that it covers less than
    :data:`OTSU_COVERED` of, whole (``objects``: :func:`covered_objects` of the low and the high mask)."""
    labels, area, covered = objects
    own = covered < OTSU_COVERED * area  # (on the masks' device)
    own[0] = False
    return high_mask | own[labels]


#: ``auto`` takes Li only where Li's threshold lies beyond the background's noise: the median of the voxels on
#: the background side of Otsu's threshold plus this many robust standard deviations (1.4826 MAD) of them.
#: Where particles cover a tiny share of the image (one particle in 512^2), Li's iteration settles at the
#: background's mean, and its "missed particles" were the noise specks above it.
NOISE_SIGMAS = 3.0


def background_noise_bound(counts, bins, otsu, side):
    """The level the background's noise reaches (median + ``NOISE_SIGMAS`` robust sigmas toward the particles,
    from the histogram's voxels on the background side of ``otsu``), or None where that side is empty."""
    centers, counts = bins.centers, np.asarray(counts, dtype=np.float64)
    background = centers <= otsu if side == "bright" else centers > otsu
    values, weights = centers[background], counts[background]
    if weights.sum() == 0:
        return None
    median = weighted_median(values, weights)
    spread = NOISE_SIGMAS * 1.4826 * weighted_median(np.abs(values - median), weights)
    return median + spread if side == "bright" else median - spread


def choose_method(image, counts, bins, candidates, side):
    """``auto``'s choice for one image: ``(method, mask)``. Otsu (the mask: Otsu's foreground, or None where it
    was not needed), unless it misses whole particles that Li's lower threshold finds; then Li, and its
    foreground (:func:`combined_foreground`: Otsu's outline for the particles Otsu finds, Li's for those it
    misses).

    One Otsu threshold suits particles of similar brightness (a bimodal
    histogram); where particles differ in brightness (dim and bright nuclei
    in one frame) it keeps only the bright ones, and the components of Li's
    foreground that hold no Otsu voxel are those missed particles. When they
    make up :data:`MISSED_AREA` or more of Li's foreground, Li is chosen,
    unless Li's threshold lies within the background's noise
    (:func:`background_noise_bound`). The rule and its evidence:
    ``bench/auto_foreground.py``.
    """
    noise = background_noise_bound(counts, bins, candidates["otsu"], side)
    if noise is not None and (candidates["li"] <= noise if side == "bright" else candidates["li"] >= noise):
        return "otsu", None  # Li's foreground would be the background's noise
    otsu_fg = foreground(image, candidates["otsu"], side)
    objects = covered_objects(foreground(image, candidates["li"], side), otsu_fg)
    if missed_share(*objects[1:]) < MISSED_AREA:
        return "otsu", otsu_fg
    return "li", combined_foreground(otsu_fg, objects)
