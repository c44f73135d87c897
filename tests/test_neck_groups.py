"""Peak grouping: peaks with no neck between them (``neck_ratio``), or nearby (``nearby_ratio``), make one particle."""
from fractions import Fraction

import numpy as np
import pytest
from scipy import ndimage as ndi

from cpu_fallback import separate
from gpu_pipeline._backend import DeclumpError
from gpu_pipeline.stages.peaks import find_peaks, neck_groups, quantize_distance, window_half_widths


def _capsule(shape, start, end, radius):
    """A rod: every pixel within ``radius`` of the segment start-end."""
    yy, xx = np.indices(shape, dtype=float)
    p, q = np.asarray(start, float), np.asarray(end, float)
    d = q - p
    t = np.clip(((yy - p[0]) * d[0] + (xx - p[1]) * d[1]) / (d @ d), 0, 1)
    return np.hypot(yy - (p[0] + t * d[0]), xx - (p[1] + t * d[1])) <= radius


def _disks(shape, centres, radii):
    """Disks (2D) or balls (3D) of the given centres and radii."""
    grid = np.indices(shape, dtype=float)
    return np.any([sum((g - ci) ** 2 for g, ci in zip(grid, c)) <= r * r for c, r in zip(centres, radii)], axis=0)


def _reference_groups(peaks, distance_q, regions, spacing, ratio, quantum, nearby=None):
    """Pairs tested one by one in Python with exact fractions; groups by scipy's connected components."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(peaks)
    heights = [int(distance_q[tuple(p)]) for p in peaks]
    a, b = [], []
    for i in range(n):
        for j in range(i + 1, n):
            p, q = peaks[i], peaks[j]
            if regions[tuple(p)] != regions[tuple(q)]:
                continue
            gap = np.sqrt(sum(((int(x) - int(y)) * s) ** 2 for x, y, s in zip(p, q, spacing)))
            if not gap < (heights[i] + heights[j]) * quantum:
                continue
            if nearby is not None and gap < nearby * max(heights[i], heights[j]) * quantum:
                a.append(i), b.append(j)
                continue
            if ratio is None:
                continue
            length = max(abs(int(y) - int(x)) for x, y in zip(p, q))
            low = min(int(distance_q[tuple(int(x) + int(Fraction(2 * (int(y) - int(x)) * k + length, 2 * length)
                                                      .__floor__()) for x, y in zip(p, q))])
                      for k in range(length + 1))
            if low >= ratio * max(heights[i], heights[j]):
                a.append(i), b.append(j)
    _, comp = connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n)), directed=False)
    return np.array([min(np.flatnonzero(comp == c)) for c in comp])


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (1.5, 1.0)])
def test_neck_groups_equal_a_pair_by_pair_reference(rng, spacing):
    shape = (120, 140)
    mask = np.zeros(shape, bool)
    for _ in range(12):
        mask |= _capsule(shape, rng.uniform(10, 110, 2), rng.uniform(10, 130, 2), rng.uniform(4, 12))
    distance = ndi.distance_transform_edt(mask, sampling=spacing)
    distance_q, quantum = quantize_distance(distance.astype(np.float32), spacing)
    regions, _ = ndi.label(mask)
    peaks = find_peaks(distance_q, half_widths=window_half_widths(3, spacing))
    assert len(peaks) > 10
    seen = set()
    for ratio, nearby in ((0.5, None), (0.7, None), (0.9, None), (1.0, None), (None, 0.8), (None, 1.0), (0.5, 0.8)):
        ours = neck_groups(peaks, distance_q, regions, spacing, ratio, nearby)
        ref = _reference_groups(peaks, distance_q, regions, spacing, ratio, quantum, nearby)
        np.testing.assert_array_equal(ours, ref)
        seen.add(tuple(ours.tolist()))
        if (ratio, nearby) == (None, 0.8):
            assert (ours != np.arange(len(peaks))).any()  # nearby peaks joined with no neck test at all
    assert len(seen) >= 4  # the settings group these peaks in different ways


def test_a_rod_is_one_particle_and_touching_disks_stay_two():
    shape = (100, 200)
    rod = _capsule(shape, (50, 30), (50, 170), 12)
    image = np.where(rod, 200, 20).astype(np.uint8)
    plain = separate(image, sigma=0, min_distance=4, polarity="bright", neck_ratio=None)
    assert plain.max() > 1  # without grouping the ridge's peaks cut the rod
    for ratio in (0.7, 1.0):  # 1.0 is the default: the ridge never dips
        grouped = separate(image, sigma=0, min_distance=4, polarity="bright", neck_ratio=ratio)
        assert grouped.max() == 1 and np.array_equal(grouped > 0, rod)
    assert np.array_equal(separate(image, sigma=0, min_distance=4, polarity="bright"), grouped)
    # Two disks of radius 15 whose centres are 24 apart: a neck of half-width 9 (0.6 of the radius).
    disks = _disks(shape, [(50, 80), (50, 104)], [15, 15])
    image = np.where(disks, 200, 20).astype(np.uint8)
    for ratio in (0.7, 1.0):
        labels = separate(image, sigma=0, min_distance=4, polarity="bright", neck_ratio=ratio)
        assert labels.max() == 2
        left, right = labels[50, 70], labels[50, 114]
        assert left != right and left > 0 and right > 0


def test_default_joins_the_plateau_of_a_particle_deeper_than_max_radius(rng):
    # Two touching balls whose inscribed radii (15, 14) exceed the cap: each
    # gets a plateau of capped distances and many peaks on it.
    shape = (48, 48, 80)
    centres = [(24, 24, 22), (24, 24, 52)]
    centres = [tuple(c + int(rng.integers(-2, 3)) for c in centre) for centre in centres]
    balls = _disks(shape, centres, [15, 14])
    image = np.where(balls, 200, 20).astype(np.uint8)
    # min_size=None: the plateau's pieces are the point here, not the size filter that would join them.
    kwargs = dict(sigma=0, min_distance=4, polarity="bright", max_radius=7.0, min_size=None)
    assert separate(image, **kwargs, neck_ratio=None, nearby_ratio=None).max() > 10
    labels = separate(image, **kwargs)
    assert labels.max() == 2
    assert labels[centres[0]] != labels[centres[1]] and labels[centres[0]] > 0 and labels[centres[1]] > 0


def test_neck_ratio_is_validated():
    image = np.zeros((20, 20), np.uint8)
    image[5:15, 5:15] = 100
    with pytest.raises(DeclumpError, match="neck_ratio must be 'auto', a number in"):
        separate(image, neck_ratio=1.5)
    with pytest.raises(DeclumpError, match="neck_ratio must be 'auto', a number in"):
        separate(image, neck_ratio=0)


def test_watershed_ignores_neck_ratio():
    shape = (100, 200)
    image = np.where(_capsule(shape, (50, 30), (50, 170), 12), 200, 20).astype(np.uint8)
    kwargs = dict(sigma=0, min_distance=4, polarity="bright", method="watershed")
    classical = separate(image, **kwargs, neck_ratio=None)
    assert classical.max() > 1  # the classical method cuts the rod at its ridge's peaks
    assert np.array_equal(separate(image, **kwargs), classical)
