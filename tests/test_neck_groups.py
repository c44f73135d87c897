"""Peak grouping: peaks with no neck between them (``neck_ratio``), or nearby (``nearby_ratio``), make one particle."""
import functools
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
    """Pairs tested one by one in Python with exact fractions; groups by scipy's connected components. Pairs
    closer than NECK_REACH times the sum of their heights are tested; a dip of up to NECK_TOLERANCE_VOXELS
    voxels of the finest axis (one in 2D) below the ratio is no neck."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from gpu_pipeline.stages.peaks import NECK_REACH, NECK_TOLERANCE_VOXELS

    allowance = NECK_TOLERANCE_VOXELS[len(spacing)] * min(spacing) / quantum  # in quanta

    n = len(peaks)
    heights = [int(distance_q[tuple(p)]) for p in peaks]
    a, b = [], []
    for i in range(n):
        for j in range(i + 1, n):
            p, q = peaks[i], peaks[j]
            if regions[tuple(p)] != regions[tuple(q)]:
                continue
            gap = np.sqrt(sum(((int(x) - int(y)) * s) ** 2 for x, y, s in zip(p, q, spacing)))
            if not gap < NECK_REACH[len(spacing)] * (heights[i] + heights[j]) * quantum:
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
            if low >= ratio * max(heights[i], heights[j]) - allowance:
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


def test_neck_groups_equal_the_reference_under_a_few_high_peaks_among_many_low_ones(rng):
    """Large disks and rods among many specks (the classifier's foreground of a noisy image): the coarse cells
    of the neck search enumerate only the pairs with a high peak; the groups are still every pair's."""
    shape = (160, 180)
    mask = _disks(shape, [rng.uniform(20, 160, 2) for _ in range(10)], np.exp(rng.uniform(np.log(3), np.log(22), 10)))
    for _ in range(6):
        mask |= _capsule(shape, rng.uniform(10, 150, 2), rng.uniform(10, 170, 2), rng.uniform(2, 10))
    specks = rng.random(shape) < 0.04
    mask |= specks | np.roll(specks, 1, axis=1)
    distance = ndi.distance_transform_edt(mask)
    distance_q, quantum = quantize_distance(distance.astype(np.float32), (1.0, 1.0))
    regions, _ = ndi.label(mask)
    peaks = find_peaks(distance_q, half_widths=window_half_widths(1, (1.0, 1.0)))
    heights = distance_q[tuple(peaks.T)] * quantum
    assert (heights >= 9).sum() >= 4 and (heights <= 2).sum() > 20 * (heights >= 9).sum()
    for ratio, nearby in ((0.7, None), (0.7, 0.8), (1.0, None)):
        ours = neck_groups(peaks, distance_q, regions, (1.0, 1.0), ratio, nearby)
        np.testing.assert_array_equal(ours, _reference_groups(peaks, distance_q, regions, (1.0, 1.0), ratio, quantum,
                                                              nearby))
        assert (ours != np.arange(len(peaks))).sum() > 10


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (1.0, 2.0, 0.5)])
def test_neighbour_cell_pairs_with_tall_peaks_and_a_finer_level_are_the_brute_force_pairs(rng, spacing, monkeypatch):
    """Each pair of peaks of different groups in the same or neighbouring cells, with at least one tall peak,
    not in neighbouring cells of the finer level, comes exactly once (in batches smaller than the pairs)."""
    from gpu_pipeline.stages import peaks as peak_stage

    ndim = len(spacing)
    monkeypatch.setattr(peak_stage, "PAIR_BATCH", 97)
    for _ in range(4):
        shape = rng.integers(20, 60, ndim)
        flat = np.sort(rng.choice(int(np.prod(shape)), int(rng.integers(30, 200)), replace=False))
        points = np.stack(np.unravel_index(flat, shape), axis=1).astype(np.int64) + rng.integers(0, 50, ndim)
        tall = rng.random(len(points)) < rng.choice([0.0, 0.1, 0.5, 1.0])
        cell = rng.integers(3, 12, ndim)
        previous = None if rng.random() < 0.3 else np.maximum(1, cell // 2)
        # One peak per group, or a few large groups (a plateau's peaks joined) among single peaks.
        joined = rng.random(len(points)) < (0.0 if rng.random() < 0.3 else 0.7)
        group = np.where(joined, rng.integers(0, 6, len(points)), 6 + np.arange(len(points)))
        got = [(int(a), int(b)) for i, j in peak_stage._neighbour_cell_pairs(
            points, cell.tolist(), group, tall, None if previous is None else previous.tolist())
            for a, b in zip(i, j)]
        low = points.min(axis=0)
        near = lambda a, b, width: (np.abs((points[a] - low) // width - (points[b] - low) // width) <= 1).all()
        expected = [(a, b) for a in range(len(points)) for b in range(a + 1, len(points))
                    if near(a, b, cell) and (tall[a] or tall[b]) and group[a] != group[b]
                    and (previous is None or not near(a, b, previous))]
        assert sorted(got) == expected and len(got) == len(set(got))


def test_a_rod_is_one_particle_and_touching_disks_stay_two():
    shape = (100, 200)
    rod = _capsule(shape, (50, 30), (50, 170), 12)
    image = np.where(rod, 200, 20).astype(np.uint8)
    plain = separate(image, sigma=0, min_distance=4, polarity="bright", neck_ratio=None)
    assert plain.max() > 1  # without grouping the ridge's peaks cut the rod
    for ratio in (0.7, 1.0):  # 1.0 is the default: the ridge never dips by more than a voxel
        grouped = separate(image, sigma=0, min_distance=4, polarity="bright", neck_ratio=ratio)
        assert grouped.max() == 1 and np.array_equal(grouped > 0, rod)
    assert np.array_equal(separate(image, sigma=0, min_distance=4, polarity="bright"), grouped)
    # Two disks of radius 15 whose centres are 26 apart: a neck of half-width 7.5, the distance map 8.0 there
    # (0.53 of the peak; 0.7 of it less the 2D allowance of one voxel is 9.5).
    disks = _disks(shape, [(50, 80), (50, 106)], [15, 15])
    image = np.where(disks, 200, 20).astype(np.uint8)
    for ratio in (0.7, 1.0):
        labels = separate(image, sigma=0, min_distance=4, polarity="bright", neck_ratio=ratio)
        assert labels.max() == 2
        left, right = labels[50, 70], labels[50, 116]
        assert left != right and left > 0 and right > 0


def test_a_rod_is_one_particle_when_min_distance_spaces_its_peaks_beyond_their_balls(monkeypatch):
    """A window wider than the rod's radius leaves peaks on its ridge farther apart than the sum of their
    heights, where their inscribed balls no longer overlap; the 2D reach (twice that) still tests them, and
    the flat ridge joins them. Set by the image's larger particles, the auto window can be that wide."""
    from gpu_pipeline.stages import peaks

    shape = (100, 240)
    for tilt in (0.0, 0.3):
        rod = _capsule(shape, (50 - 40 * np.sin(tilt), 40), (50 + 40 * np.sin(tilt), 200), 12)
        image = np.where(rod, 200, 20).astype(np.uint8)
        for window in (30, 40):  # peaks 26-40 px apart, heights 12
            labels = separate(image, sigma=0, min_distance=window, polarity="bright")
            assert labels.max() == 1 and np.array_equal(labels > 0, rod)
    monkeypatch.setitem(peaks.NECK_REACH, 2, 1.0)  # the balls' reach only: the rod is cut
    assert separate(image, sigma=0, min_distance=30, polarity="bright").max() > 1


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
    assert separate(image, **kwargs, neck_ratio=None, nearby_ratio=None, ball_share=None).max() > 10
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


def _random_peak_groups(rng, shape, n, n_groups=12, n_regions=3):
    """Distinct random peaks (C order), dyadic heights, random regions, groups named by their smallest peak
    index."""
    from gpu_pipeline.stages.peaks import QUANTUM_DIVISOR

    flat = np.sort(rng.choice(int(np.prod(shape)), n, replace=False))
    peaks = np.stack(np.unravel_index(flat, shape), axis=1).astype(np.int64)
    heights = rng.integers(4, 40, n).astype(np.int32) * (QUANTUM_DIVISOR // 4)
    region = rng.integers(1, n_regions + 1, n)
    label = rng.integers(0, n_groups, n)
    first = {lab: int(np.flatnonzero(label == lab)[0]) for lab in np.unique(label)}
    group = np.asarray([first[lab] for lab in label], dtype=np.int64)
    return peaks, heights, region, group


@pytest.mark.parametrize("shape, spacing, power", [((60, 70), (1.0, 1.0), True), ((30, 40, 36), (2.0, 1.0, 0.5), True),
                                                   ((30, 40, 36), (2.0, 1.0, 0.5), False)])
@pytest.mark.parametrize("bordered", [False, True])
@pytest.mark.parametrize("compiled", [True, False])
def test_ball_shares_count_the_samples_no_peak_of_another_group_takes(rng, monkeypatch, shape, spacing, power,
                                                                      bordered, compiled):
    """ball_shares against a direct count: a sample x of p's ball is taken when a peak of p's region outside
    p's group is nearer to x (power distance |x - q|^2 - r_q^2, or Euclidean), every peak tried; with the
    image's shape given, a sample more than half a voxel beyond its border is neither kept nor counted. Dyadic
    coordinates, spacings and heights make both sides exact. The CPU's compiled test and the array code (the
    GPU's) both."""
    from gpu_pipeline.stages import peaks as peaks_module
    from gpu_pipeline.stages.peaks import QUANTUM_DIVISOR, ball_shares, unit_ball_samples

    monkeypatch.setattr(peaks_module, "COMPILED_BALL_TEST", compiled)
    peaks, heights, region, group = _random_peak_groups(rng, shape, 45)
    tested = rng.random(45) < 0.8
    kept, counted = ball_shares(peaks, heights, region, group, spacing, power=power, tested=tested,
                                shape=shape if bordered else None)
    samples = unit_ball_samples(len(shape))
    m = samples.shape[0]
    radius = heights * (min(spacing) / QUANTUM_DIVISOR)
    centre = peaks * np.asarray(spacing)
    weight = radius ** 2 if power else np.zeros(45)
    reference, reference_counted = np.full(45, m), np.full(45, m)
    for p in np.flatnonzero(tested):
        x = centre[p] + radius[p] * samples
        own = ((x - centre[p]) ** 2).sum(axis=1) - weight[p]
        taken = np.zeros(m, dtype=bool)
        for q in np.flatnonzero((region == region[p]) & (group != group[p])):
            taken |= ((x - centre[q]) ** 2).sum(axis=1) - weight[q] < own
        inside = np.ones(m, dtype=bool)
        if bordered:
            voxel = x / np.asarray(spacing)
            inside = ((voxel >= -0.5) & (voxel <= np.asarray(shape) - 0.5)).all(axis=1)
        reference[p] = (~taken & inside).sum()
        reference_counted[p] = inside.sum()
    np.testing.assert_array_equal(kept, reference)
    np.testing.assert_array_equal(counted, reference_counted)
    assert (reference[tested] < m).sum() > 0 and (reference[tested] == m).sum() > 0  # both kinds occur
    assert ((reference_counted[tested] < m).sum() > 0) == bordered


@pytest.mark.parametrize("shape, spacing", [((70, 80), (1.0, 0.7)), ((30, 40, 36), (1.3, 0.9, 0.55))])
@pytest.mark.parametrize("power", [True, False])
def test_the_compiled_ball_test_sets_the_bits_of_the_array_code(rng, monkeypatch, shape, spacing, power):
    """The CPU's compiled sample test (cpu_fallback.kernels.ball_takes) gives the array code's kept and counted
    samples, the same integers, where the spacings and heights are not dyadic (every product and sum rounded:
    the same operations in the same order), some peaks untested, at the border and inside."""
    from gpu_pipeline.stages import peaks as peaks_module
    from gpu_pipeline.stages.peaks import QUANTUM_DIVISOR, ball_shares

    peaks, heights, region, group = _random_peak_groups(rng, shape, 300, n_groups=200, n_regions=2)
    heights = rng.integers(2 * QUANTUM_DIVISOR, 12 * QUANTUM_DIVISOR, 300).astype(np.int32)  # radii 2-12 units
    tested = rng.random(300) < 0.7
    results = []
    for compiled in (False, True):
        monkeypatch.setattr(peaks_module, "COMPILED_BALL_TEST", compiled)
        results.append(ball_shares(peaks, heights, region, group, spacing, power=power, tested=tested, shape=shape))
    (kept_array, counted_array), (kept, counted) = results
    np.testing.assert_array_equal(kept, kept_array)
    np.testing.assert_array_equal(counted, counted_array)
    m = len(peaks_module.unit_ball_samples(len(shape)))
    assert (kept[tested] < counted[tested]).sum() > 100 and (kept[~tested] == m).all()
    assert (counted < m).any()  # balls cut by the border


@pytest.mark.parametrize("power", [True, False])
def test_ball_shares_of_many_low_peaks_beside_a_few_high_ones_equal_a_direct_count(rng, power):
    """ball_shares where the coarse cells take only the pairs with a high peak: the counts of every peak, high
    or low, are those of all pairs."""
    from gpu_pipeline.stages.peaks import QUANTUM_DIVISOR, ball_shares, unit_ball_samples

    shape, n = (90, 100), 160
    peaks, heights, region, group = _random_peak_groups(rng, shape, n, n_groups=80, n_regions=2)
    high = rng.random(n) < 0.06  # and the others spread from low to middling
    heights = np.where(high, rng.integers(40, 100, n), np.exp(rng.uniform(np.log(2), np.log(40), n)).astype(int))
    heights = heights.astype(np.int32) * (QUANTUM_DIVISOR // 4)
    kept, _ = ball_shares(peaks, heights, region, group, (1.0, 1.0), power=power)
    samples = unit_ball_samples(2)
    radius = heights / QUANTUM_DIVISOR
    weight = radius ** 2 if power else np.zeros(n)
    reference = np.empty(n, dtype=np.int64)
    for p in range(n):
        x = peaks[p] + radius[p] * samples
        own = ((x - peaks[p]) ** 2).sum(axis=1) - weight[p]
        taken = np.zeros(len(samples), dtype=bool)
        for q in np.flatnonzero((region == region[p]) & (group != group[p])):
            taken |= ((x - peaks[q]) ** 2).sum(axis=1) - weight[q] < own
        reference[p] = (~taken).sum()
    np.testing.assert_array_equal(kept, reference)
    assert (reference[high] < len(samples)).any() and (reference[~high] < len(samples)).any()


def test_shadowed_peaks_drop_a_maximum_between_particles_but_not_a_cut_centre_a_cap_or_alone():
    """shadowed_peaks on peaks placed by hand (share 0.5, cap 8.5): a lower maximum between two large peaks keeps
    0.42 of its ball and goes; at the image border, where shares are of the ball's part inside the image, a
    lower maximum between two goes (0.46 inside; 0.56 if the samples beyond the border counted as kept) and a
    centre cut by the border beside a larger one stays (0.68 of its 153 samples inside; 0.40 if those beyond
    counted as taken); a capped trio stays (0.32-0.46: capped heights are not radii); in a crowd where every
    peak keeps less than half, the peaks with the largest share stay (a region always keeps a centre) and the
    two lower ones go. regroup names the kept groups by their smallest kept index."""
    from gpu_pipeline.stages.peaks import QUANTUM_DIVISOR, regroup, shadowed_peaks

    placed = [((20, 20, 16), 8, 1), ((20, 20, 30), 8, 1), ((20, 22, 23), 6, 1),  # a maximum between two
              ((20, 20, 50), 8.5, 2), ((20, 21, 51), 8.5, 2), ((20, 19, 51), 8.5, 2),  # capped
              ((20, 20, 80), 6, 3), ((18, 20, 80), 5.75, 3), ((22, 20, 80), 5.75, 3), ((20, 18, 80), 5.75, 3),
              ((20, 22, 80), 5.75, 3), ((20, 20, 78), 5.75, 3), ((20, 20, 82), 5.5, 3),  # a crowd
              ((20, 33, 100), 8, 4), ((20, 33, 114), 8, 4), ((20, 37, 107), 6, 4),  # a maximum between two, at the border
              ((20, 39, 60), 7, 5), ((20, 30, 63), 9, 5)]  # a centre cut by the border, beside a larger one
    goes = {2, 6, 12, 15}
    shape = (40, 40, 120)
    order = np.argsort([np.ravel_multi_index(c, shape) for c, _, _ in placed], kind="stable")
    peaks = np.asarray([placed[k][0] for k in order], dtype=np.int64)
    heights = np.asarray([int(placed[k][1] * QUANTUM_DIVISOR) for k in order], dtype=np.int32)
    region = np.asarray([placed[k][2] for k in order])
    expected = np.asarray([k not in goes for k in order])
    keep = shadowed_peaks(peaks, heights, region, None, (1.0,) * 3, shape, 8.5, 0.5)
    np.testing.assert_array_equal(keep, expected)
    assert shadowed_peaks(peaks, heights, region, None, (1.0,) * 3, shape, 8.5, None).all()
    # Grouped: the crowd's centre joined to one of its rivals takes the larger share of the two (and no longer
    # takes from that rival), so it stays with it, now the crowd's best.
    group = np.arange(len(placed))
    centre, rival = int(np.flatnonzero(order == 6)[0]), int(np.flatnonzero(order == 7)[0])
    group[max(centre, rival)] = min(centre, rival)
    keep = shadowed_peaks(peaks, heights, region, group, (1.0,) * 3, shape, 8.5, 0.5)
    assert keep[centre] and keep[rival] and not keep[region == 3].all()
    new = regroup(group, keep)
    kept = np.flatnonzero(keep)
    for a in range(kept.size):
        assert new[a] == np.flatnonzero(group[kept] == group[kept[a]])[0]


def test_rescued_peaks_keep_an_overlooked_centre_that_keeps_its_ball_but_not_a_second_maximum():
    """rescued_peaks on peaks placed by hand, the overlooked ones flagged: a small sphere's centre beside a
    large one (balls overlapping a little) keeps most of its ball and stays; a second maximum 7 voxels from a
    higher peak keeps little and goes; at the image border the share is of the ball's part inside the image:
    a centre cut by the border stays (0.61 inside; 0.37 if the samples beyond counted as taken) and a second
    maximum there goes (0.50 inside; 0.70 if they counted as kept); peaks within reach always stay. The share
    is ball_shares' with one group per peak: half a sample below the centre's own share it stays, half a sample
    above it goes. share None rescues none."""
    from gpu_pipeline.stages.peaks import QUANTUM_DIVISOR, ball_shares, rescued_peaks

    placed = [((20, 20, 20), 14, 1, False), ((20, 20, 40), 8, 1, True),  # a small sphere beside a large one
              ((20, 20, 70), 12, 2, False), ((20, 20, 77), 9, 2, True),  # a second maximum
              ((20, 10, 119), 7, 3, True), ((20, 10, 108), 10, 3, False),  # a centre cut by the border
              ((20, 30, 119), 6, 4, True), ((20, 25, 112), 9, 4, False)]  # a second maximum at the border
    shape = (40, 40, 120)
    order = np.argsort([np.ravel_multi_index(c, shape) for c, _, _, _ in placed], kind="stable")
    peaks = np.asarray([placed[k][0] for k in order], dtype=np.int64)
    heights = np.asarray([int(placed[k][1] * QUANTUM_DIVISOR) for k in order], dtype=np.int32)
    region = np.asarray([placed[k][2] for k in order])
    overlooked = np.asarray([placed[k][3] for k in order])
    small, second, cut, border_second = (int(np.flatnonzero(order == k)[0]) for k in (1, 3, 4, 6))
    kept, counted = ball_shares(peaks, heights, region, None, (1.0,) * 3, shape=shape)
    share = kept / counted
    assert share[small] > 0.9 and share[second] < 0.5 and 0.6 < share[cut] < 0.65 and share[border_second] < 0.55
    m = counted[small]
    for value, small_stays in ((0.6, True), ((kept[small] - 0.5) / m, True), ((kept[small] + 0.5) / m, False)):
        keep = rescued_peaks(peaks, heights, region, overlooked, (1.0,) * 3, shape, value)
        expected = ~overlooked
        expected[small] = small_stays
        expected[cut] = share[cut] >= value
        np.testing.assert_array_equal(keep, expected)
    assert rescued_peaks(peaks, heights, region, overlooked, (1.0,) * 3, shape, 0.6)[cut]
    np.testing.assert_array_equal(rescued_peaks(peaks, heights, region, overlooked, (1.0,) * 3, shape, None),
                                  ~overlooked)


def _rods(shape, n, rng, length=(30, 60), radius=(5, 7)):
    """Rods (capsules) of random length, width and angle, a voxel or more apart, on a noisy blurred image."""
    truth = np.zeros(shape, np.int32)
    for _ in range(50 * n):
        if truth.max() == n:
            break
        half, r, angle = rng.uniform(*length) / 2, rng.uniform(*radius), rng.uniform(0, np.pi)
        centre = rng.uniform(half + r + 2, np.array(shape) - half - r - 2)
        step = half * np.array([np.sin(angle), np.cos(angle)])
        rod = _capsule(shape, centre - step, centre + step, r)
        if not (truth[ndi.binary_dilation(rod)] > 0).any():
            truth[rod] = truth.max() + 1
    image = ndi.gaussian_filter(0.15 + 0.7 * (truth > 0), 1.0) + rng.normal(0, 0.05, shape)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8), truth


def test_rods_at_an_angle_are_whole_at_the_2d_defaults(rng, monkeypatch):
    # A rod's axis at an angle to the grid is sampled at the nearest voxels, so its equal peaks dip by up to
    # about 0.7 voxel: the 2D allowance of one voxel joins them; without it each rod was cut into pieces.
    from gpu_pipeline.metrics import evaluate
    from gpu_pipeline.stages import peaks

    samples = [_rods((256, 256), 25, rng) for _ in range(3)]
    scores = [evaluate(separate(image), truth)["f1_50"] for image, truth in samples]
    assert np.mean(scores) >= 0.85 and min(scores) >= 0.75, scores
    monkeypatch.setitem(peaks.NECK_TOLERANCE_VOXELS, 2, 0.0)
    without = [evaluate(separate(image), truth)["f1_50"] for image, truth in samples]
    assert max(without) < 0.5, without


def test_small_touching_discs_separate_with_the_neck_test_off(rng):
    # The cost of the 2D allowance above (README, "Where the defaults fail"): between two touching discs of
    # radius 3-4 px the dip is about one voxel, so the defaults join many of them; the documented remedy,
    # neck_ratio=None, finds them (pooled F1@0.5 0.631 -> 0.754 on 400 discs of radius 3-7 in 512^2).
    from gpu_pipeline.metrics import evaluate
    from gpu_pipeline.synthetic import make_touching_particles

    samples = [make_touching_particles((256, 256), 150, seed=int(rng.integers(1e6)), radius_range=(3, 7))
               for _ in range(3)]
    defaults = np.mean([evaluate(separate(image), truth)["f1_50"] for image, truth in samples])
    off = np.mean([evaluate(separate(image, neck_ratio=None), truth)["f1_50"] for image, truth in samples])
    assert off >= 0.62 and off >= defaults, (defaults, off)


def test_peak_boxes_hold_each_peak_once_and_every_peak_within_the_halo(rng, monkeypatch):
    """peak_boxes against brute force: the cores partition the peaks, each box's near peaks are its own and
    every peak within the halo of one of them; with the boxes without peaks of their own (``empty``), every
    pair of peaks at most two halos apart lies in one box's near peaks (the box of its midpoint)."""
    from gpu_pipeline.stages import by_box
    from gpu_pipeline.stages.by_box import peak_boxes

    for shape, halo, n, per_task in [((200, 240), (6, 6), 900, 40), ((40, 120, 90), (3, 7, 5), 1500, 60),
                                     ((30, 300), (40, 2), 500, 20)]:  # a halo longer than an axis: one box there
        flat = np.sort(rng.choice(int(np.prod(shape)), n, replace=False))
        peaks = np.stack(np.unravel_index(flat, shape), axis=1).astype(np.int64)
        boxes = list(peak_boxes(peaks, shape, halo, per_task))
        assert len(boxes) > 4
        cores = np.concatenate([box[0] for box in boxes])
        assert np.array_equal(np.sort(cores), np.arange(n))
        for core, near, low, high in boxes:
            assert np.isin(core, near).all() and np.all(np.diff(near) > 0)
            assert ((peaks[near] >= low) & (peaks[near] < high)).all() and (low >= 0).all()
            assert (high <= np.asarray(shape)).all()
            apart = np.abs(peaks[:, None, :] - peaks[None, core, :])
            within = (apart <= np.asarray(halo)).all(axis=2).any(axis=1)
            assert np.isin(np.flatnonzero(within), near).all()
        together = np.zeros((n, n), dtype=bool)
        monkeypatch.setattr(by_box, "BOX_HALOS", 1)  # (from two halos across, the ends' boxes hold every pair)
        for core, near, low, high in peak_boxes(peaks, shape, halo, 1, empty=True):
            together[np.ix_(near, near)] = True
        monkeypatch.undo()
        close = (np.abs(peaks[:, None, :] - peaks[None, :, :]) <= 2 * np.asarray(halo)).all(axis=2)
        assert together[close].all() and not together[(~close).nonzero()].all()


@pytest.mark.parametrize("shape, spacing, power", [((200, 240), (1.0, 1.0), True), ((60, 120, 100), (2.0, 1.0, 0.5), True),
                                                   ((60, 120, 100), (2.0, 1.0, 0.5), False)])
@pytest.mark.parametrize("grouped", [False, True])
def test_ball_shares_box_by_box_equal_those_of_the_whole_list(rng, shape, spacing, power, grouped):
    """The ball shares box by box (ball_shares_by_box: boxes of a few peaks with a halo of twice the largest
    radius, on 4 threads) are ball_shares of the whole peak list, the same arrays: tested or all peaks, at the
    border of the image, radii from 1 to 12 quanta of the finest spacing."""
    from gpu_pipeline.stages.by_box import ball_shares_by_box, on_threads, peak_boxes
    from gpu_pipeline.stages.peaks import QUANTUM_DIVISOR, ball_shares

    n = 1200
    peaks, heights, region, group = _random_peak_groups(rng, shape, n, n_groups=500, n_regions=2)
    heights = np.exp(rng.uniform(0, np.log(13), n)).astype(np.int32) * QUANTUM_DIVISOR
    group = group if grouped else None
    halo = [int(np.ceil(2 * heights.max() / QUANTUM_DIVISOR * min(spacing) / s)) for s in spacing]
    assert len(list(peak_boxes(peaks, shape, halo, 20))) >= 4
    for tested in (None, rng.random(n) < 0.7):
        expected = ball_shares(peaks, heights, region, group, spacing, power=power, tested=tested, shape=shape)
        got = ball_shares_by_box(peaks, heights, region, group, spacing, power=power, tested=tested, shape=shape,
                                 per_box=20, run=on_threads(4))
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])
        assert (expected[0] < expected[1]).sum() > n // 10  # shares cut, across boxes too


@pytest.mark.parametrize("shape, spacing, nearby", [((160, 200), (1.0, 1.0), None), ((48, 80, 72), (2.0, 1.0, 1.0), 0.5)])
def test_neck_groups_box_by_box_equal_join_peaks_on_the_whole_list(rng, tmp_path, shape, spacing, nearby, monkeypatch):
    """The neck search box by box (neck_groups_by_box: boxes of a few peaks and a halo of half the longest
    pair; here as a chunked run does it, each task reading its box of a staged distance map on Dask's local
    threads) gives join_peaks' groups on the whole list. A plateau cut by walls of zero; pairs of high peaks of a region of their own, 80-98 % of their
    reach apart along an axis (joined unless a wall parts them, and only directly: a halo of 0.4 of the
    longest pair misses some), and low peaks of ten other regions."""
    import dask
    import zarr

    from gpu_pipeline.chunked import pipeline
    from gpu_pipeline.stages import by_box
    from gpu_pipeline.stages.peaks import NECK_REACH, QUANTUM_DIVISOR, join_peaks, segment_minima

    monkeypatch.setattr(by_box, "BOX_HALOS", 1)
    ndim, q = len(shape), QUANTUM_DIVISOR  # quanta per voxel of the finest axis
    distance = np.full(shape, 16 * q, dtype=np.int32) + rng.integers(0, 2 * q, shape).astype(np.int32)
    for _ in range(4):  # walls across one axis each
        at = [slice(None)] * ndim
        axis = int(rng.integers(ndim))
        at[axis] = int(rng.integers(shape[axis]))
        distance[tuple(at)] = 0
    top, unit = 14 * q, min(spacing)  # quantum x QUANTUM_DIVISOR: physical length of a voxel of the finest axis
    reach = NECK_REACH[ndim] * 2 * 14 * unit  # of two peaks of height `top`
    peaks, heights, region = [], [], []
    for k in range(40):
        while True:
            p = rng.uniform(0, 1, ndim) * np.asarray(shape)
            u = np.zeros(ndim)
            u[rng.integers(ndim)] = rng.choice([-1.0, 1.0])
            q2 = p + rng.uniform(0.8, 0.98) * reach * u / np.asarray(spacing)
            if (q2 >= 0).all() and (q2 < np.asarray(shape) - 0.5).all():
                break
        peaks += [np.floor(p), np.round(q2)]
        heights += [top, top]
        region += [k + 1, k + 1]
    for _ in range(60):
        peaks.append(np.floor(rng.uniform(0, 1, ndim) * np.asarray(shape)))
        heights.append(int(rng.integers(2 * q, 6 * q)))
        region.append(int(rng.integers(41, 51)))  # (in a pair's region they would bridge it)
    peaks = np.asarray(peaks, np.int64)
    flat, first = np.unique(np.ravel_multi_index(tuple(peaks.T), shape), return_index=True)
    peaks = np.stack(np.unravel_index(flat, shape), axis=1).astype(np.int64)
    heights, region = np.asarray(heights, np.int32)[first], np.asarray(region, np.int64)[first]
    store = str(tmp_path / "distance.zarr")
    zarr.create_array(store, shape=shape, dtype=np.int32, chunks=(16,) * ndim)[...] = distance
    expected = join_peaks(peaks, heights, region, spacing, 0.7, lambda i, j: segment_minima(distance, peaks, i, j),
                          nearby=nearby)
    with dask.config.set(num_workers=4):
        got = by_box.neck_groups_by_box(peaks, heights, region, shape, spacing, 0.7, nearby, per_box=2,
                                        read=functools.partial(pipeline._read_staged_box, store),
                                        run=functools.partial(pipeline._run_on_workers, what="necks", verbose=False))
    np.testing.assert_array_equal(got, expected)
    sizes = np.bincount(expected)
    assert (sizes > 1).sum() >= 10 and (sizes == 1).sum() >= 10  # joined and lone peaks both
    halo = [np.ceil(2 * NECK_REACH[ndim] * heights.max() * unit / QUANTUM_DIVISOR / s) for s in spacing]
    assert len(list(by_box.peak_boxes(peaks, shape, halo, 2, voxels=by_box.NECK_BOX_VOXELS))) >= 4


def test_with_one_thread_the_ball_shares_and_the_necks_stay_one_call_here(rng, monkeypatch):
    """A chunked run where one task runs at a time (engine_threads() == 1: a one-worker cluster, --workers 1):
    no boxes, whose halos would only add work; the same arrays. With two, boxes."""
    import dask

    from gpu_pipeline.chunked import pipeline
    from gpu_pipeline.stages import by_box
    from gpu_pipeline.stages.peaks import ball_shares

    peaks, heights, region, group = _random_peak_groups(rng, (200, 240), 300, n_groups=100, n_regions=2)
    calls = []
    monkeypatch.setattr(by_box, "PEAKS_PER_BOX", 20)
    monkeypatch.setattr(by_box, "BOX_WORTH", float("inf"))
    monkeypatch.setattr(pipeline, "run_grouped", lambda *a, **k: calls.append(a) or [])
    expected = ball_shares(peaks, heights, region, group, (1.0, 1.0), shape=(200, 240))
    import dask.threaded

    # Local threads as `declump run --workers N` sets them (a client another test left open is not used).
    with dask.config.set(scheduler=dask.threaded.get, num_workers=1):
        got = pipeline.ball_shares_chunked(peaks, heights, region, group, (1.0, 1.0), shape=(200, 240))
    assert not calls and all(np.array_equal(a, b) for a, b in zip(got, expected))
    with dask.config.set(scheduler=dask.threaded.get, num_workers=2):
        pipeline.ball_shares_chunked(peaks, heights, region, group, (1.0, 1.0), shape=(200, 240))
    assert calls


@pytest.mark.parametrize("shape, n", [((320, 360), 260), ((48, 96, 96), 120)])
def test_in_memory_the_peak_steps_box_by_box_on_threads_give_the_same_labels(rng, shape, n, monkeypatch):
    """In memory on the CPU, a peak list of more than PEAKS_PER_BOX peaks goes box by box on threads (the
    reach's rescue, the neck search, the ball shares): the labels of the whole list's steps, byte for byte."""
    from gpu_pipeline import pipeline
    from gpu_pipeline.stages import by_box
    from gpu_pipeline.synthetic import make_touching_particles

    image, _ = make_touching_particles(shape, n, radius_range=(3, 9), seed=int(rng.integers(1e6)))
    expected = separate(image, device="cpu")
    boxes, real = [], by_box.peak_boxes
    monkeypatch.setattr(by_box, "PEAKS_PER_BOX", 8)
    monkeypatch.setattr(by_box, "BOX_HALOS", 1)
    monkeypatch.setattr(by_box, "BOX_WORTH", float("inf"))
    monkeypatch.setattr(by_box, "peak_boxes", lambda *a, **k: boxes.append(list(real(*a, **k))) or boxes[-1])
    monkeypatch.setattr(pipeline, "usable_cores", lambda: 4)
    got = separate(image, device="cpu")
    assert got.tobytes() == expected.tobytes() and expected.max() > n // 2
    assert len(boxes) >= 2 and min(len(b) for b in boxes) >= 4  # the necks and the ball shares, in boxes
    monkeypatch.setattr(pipeline, "usable_cores", lambda: 1)  # one core: the whole list, no boxes
    boxes.clear()
    assert separate(image, device="cpu").tobytes() == expected.tobytes() and not boxes


def test_boxes_are_used_where_their_halos_leave_a_gain(rng):
    """worth_boxes estimates, with the peaks spread evenly, the peaks the boxes hold (halos included) over
    the boxes that run at once, against BOX_WORTH of the list: it agrees with the boxes built; specks under
    one very high peak (whose halo makes a few boxes holding much of the list each) stay one call, the same
    specks alone go by box; ball_shares_by_box gives the same arrays either way."""
    from gpu_pipeline.stages.by_box import BOX_WORTH, ball_shares_by_box, on_threads, peak_boxes, worth_boxes
    from gpu_pipeline.stages.peaks import QUANTUM_DIVISOR, ball_shares

    shape, n = (400, 400), 4000
    flat = np.sort(rng.choice(int(np.prod(shape)), n, replace=False))
    peaks = np.stack(np.unravel_index(flat, shape), axis=1).astype(np.int64)
    heights = np.full(n, QUANTUM_DIVISOR, dtype=np.int32)  # specks of one voxel
    region = np.ones(n, dtype=np.int64)
    for high, expected in ((1, True), (40, False)):
        heights[n // 2] = high * QUANTUM_DIVISOR
        halo = [int(np.ceil(2 * high))] * 2
        boxes = list(peak_boxes(peaks, shape, halo, 200))
        held = sum(b[1].size for b in boxes) / n
        assert (held / min(2, len(boxes)) <= BOX_WORTH) is expected, held
        assert worth_boxes(shape, halo, n, 200, 2) is expected and worth_boxes(shape, halo, n, 200, None)
        got = ball_shares_by_box(peaks, heights, region, None, (1.0, 1.0), shape=shape, per_box=200,
                                 run=on_threads(2), parallel=2)
        assert all(np.array_equal(a, b) for a, b in zip(got, ball_shares(peaks, heights, region, None, (1.0, 1.0),
                                                                          shape=shape)))
    assert not worth_boxes(shape, [1, 1], n, n, 4)  # one box
