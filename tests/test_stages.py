"""Each stage against an independent reference (scikit-image, SciPy) on fresh random data."""
import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.filters import threshold_otsu
from skimage.measure import label as sk_label
from skimage.morphology import remove_small_holes, remove_small_objects

from cpu_fallback import kernels, ops
from gpu_pipeline._backend import DeclumpError
from gpu_pipeline.stages.cleanup import clean_mask, fill_small_holes, remove_small_objects as our_remove
from gpu_pipeline.array_algorithms import label_by_value_propagation
from gpu_pipeline.stages.components import enforce_one_piece, relabel_by_first_voxel
from gpu_pipeline.stages.distance import cleaned_distance
from gpu_pipeline.stages.peaks import find_peaks
from gpu_pipeline.stages.threshold import (choose_polarity, histogram_bins, intensity_histogram, otsu_from_histogram,
                                           otsu_threshold)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16])
def test_otsu_equals_skimage_on_integer_images(rng, dtype):
    info = np.iinfo(dtype)
    low = max(info.min, -1000)
    image = np.concatenate([rng.normal(0.3, 0.05, 3000), rng.normal(0.7, 0.08, 2000)])
    image = (low + np.clip(image, 0, 1) * (min(info.max, 3000) - low)).astype(dtype).reshape(50, 100)
    assert otsu_threshold(image) == threshold_otsu(image)


def test_otsu_on_float_images_within_one_bin_of_skimage(rng):
    image = np.concatenate([rng.normal(-2, 1, 5000), rng.normal(3, 1.5, 3000)]).reshape(80, 100)
    bins = histogram_bins(image.min(), image.max(), image.dtype)
    width = (bins.high - bins.low) / bins.nbins
    # The only difference allowed: a value on a bin edge may fall in the neighbouring bin (np.histogram's rule).
    assert abs(otsu_threshold(image) - threshold_otsu(image)) <= width + 1e-12


def test_histograms_of_parts_add_up_to_the_whole(rng):
    image = rng.gamma(2.0, 30.0, (60, 70)).astype(np.float32)
    bins = histogram_bins(image.min(), image.max(), image.dtype)
    whole, _ = intensity_histogram(image, bins)
    parts = sum(intensity_histogram(part, bins)[0] for part in np.array_split(image, 7, axis=0))
    np.testing.assert_array_equal(parts, whole)
    assert otsu_from_histogram(parts, bins) == otsu_from_histogram(whole, bins)


def test_histogram_in_slices_counts_every_value_once(rng, monkeypatch):
    import gpu_pipeline.stages.threshold as threshold

    image = rng.integers(3, 900, (41, 53, 7)).astype(np.uint16)
    expected = np.bincount(image.ravel() - 3)  # one bin per value from the minimum
    floats = rng.normal(0.0, 1.0, (41, 53, 7)).astype(np.float32)
    whole, fbins = intensity_histogram(floats)
    monkeypatch.setattr(threshold, "HISTOGRAM_SLICE", 37)  # many slices, the last one short
    counts, bins = intensity_histogram(image)
    assert bins.integer and bins.nbins == 897
    np.testing.assert_array_equal(counts, expected)
    sliced, _ = intensity_histogram(floats, fbins)
    np.testing.assert_array_equal(sliced, whole)
    assert sliced.sum() == floats.size


def test_constant_image_and_nan_are_refused():
    with pytest.raises(DeclumpError, match="constant"):
        otsu_threshold(np.full((10, 10), 7, np.uint8))
    with pytest.raises(DeclumpError, match="NaN"):
        histogram_bins(0.0, np.nan, np.float32)


def test_auto_polarity_finds_dark_particles_on_bright_background(rng):
    from gpu_pipeline.synthetic import make_touching_particles

    for polarity in ("bright", "dark"):
        image, _ = make_touching_particles((128, 128), 15, polarity=polarity, seed=int(rng.integers(1000)))
        assert choose_polarity(image, otsu_threshold(image), "auto") == polarity


def _window(h, ndim):
    """scikit-image's disk / ball of radius h: find_peaks' window for equal half-widths."""
    from skimage.morphology import ball, disk

    return disk(h) if ndim == 2 else ball(h)


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("shape,h", [((80, 90), 3), ((24, 30, 28), 2), ((20, 22, 24), 4)])
def test_peaks_equal_skimage_peak_local_max_with_a_ball_window_without_ties(rng, monkeypatch, shape, h, compiled):
    """Both the CPU's compiled window test and the array code the GPU runs (on NumPy)."""
    from gpu_pipeline.stages import peaks as peaks_module

    monkeypatch.setattr(peaks_module, "COMPILED_WINDOW_TEST", compiled)
    values = rng.random(shape)
    ours = find_peaks(values, half_widths=(h,) * len(shape), min_value=0.5)
    ref = peak_local_max(values, min_distance=h, footprint=_window(h, len(shape)), p_norm=2, threshold_abs=0.5,
                         exclude_border=False)
    ref = ref[np.lexsort(ref.T[::-1])]
    np.testing.assert_array_equal(ours, ref)


def test_a_plateau_within_min_distance_gives_one_peak_the_first_in_c_order():
    values = np.zeros((30, 30), np.int32)
    values[5:8, 6:9] = 9  # a 3x3 flat top, within min_distance 4
    values[20, 5:25] = 6  # a 20-voxel ridge: one peak every min_distance along it
    peaks = find_peaks(values, half_widths=(4, 4))
    np.testing.assert_array_equal(peaks, [[5, 6]] + [[20, x] for x in range(5, 25, 4)])


@pytest.mark.parametrize("h", [1, 2, 4])
def test_ties_follow_skimage_greedy_spacing_with_a_disk_window(rng, h):
    # Few distinct levels: many equal maxima, ridges and chains of ties.
    values = rng.integers(0, 4, (50, 60)).astype(np.int32)
    values = np.maximum(values, np.roll(values, 1, axis=1))
    ours = find_peaks(values, half_widths=(h, h), min_value=0)
    ref = peak_local_max(values, min_distance=h, footprint=_window(h, 2), p_norm=2, threshold_abs=0,
                         exclude_border=False)
    ref = ref[np.lexsort(ref.T[::-1])]
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("half", [(2, 4), (1, 3, 3), (0, 3, 2), (5,)])
def test_anisotropic_window_is_the_ellipsoid_of_the_half_widths(rng, monkeypatch, half, compiled):
    # No ties: every voxel at least as high as its ellipsoid (SciPy's maximum filter, edges replicated) is a peak;
    # the CPU's compiled window test and the array code the GPU runs (on NumPy) alike.
    from gpu_pipeline.stages import peaks as peaks_module

    monkeypatch.setattr(peaks_module, "COMPILED_WINDOW_TEST", compiled)
    values = rng.random(tuple(int(rng.integers(15, 30)) for _ in half))
    grid = np.ogrid[tuple(slice(-h, h + 1) for h in half)]
    footprint = sum(((g / h) ** 2 if h else np.where(g == 0, 0.0, 2.0)) for g, h in zip(grid, half)) <= 1
    ref = np.argwhere(values == ndi.maximum_filter(values, footprint=footprint, mode="nearest"))
    np.testing.assert_array_equal(find_peaks(values, half_widths=half), ref)


def test_a_small_particle_touching_a_larger_one_keeps_its_peak():
    # A sphere of radius 4 against one of radius 11 (centres 12.75 apart, diagonal): the larger one's flank,
    # within the 9^3 box of the small centre but outside its ball of radius 4, is higher than that centre.
    from scipy.ndimage import distance_transform_edt

    shape = (40, 40, 40)
    big, small = np.array([14.0, 14.0, 14.0]), np.array([14.0, 14.0, 14.0]) + 12.75 / np.sqrt(3)
    grid = np.indices(shape).astype(float)
    d_big = np.sqrt(((grid - big[:, None, None, None]) ** 2).sum(0))
    d_small = np.sqrt(((grid - small[:, None, None, None]) ** 2).sum(0))
    fg = (d_big <= 11) | (d_small <= 4)
    distance = distance_transform_edt(fg)
    peaks = find_peaks(distance, half_widths=(4, 4, 4))
    near = lambda centre: (np.abs(peaks - centre) <= 1).all(axis=1).sum()
    assert near(big) == 1 and near(small) == 1 and len(peaks) == 2


def test_face_label_and_equal_value_label_match_references(rng):
    for shape in [(300,), (40, 50), (20, 30, 40), (3, 4, 5, 6)]:
        mask = rng.random(shape) > 0.5
        labels, n = ops.label(mask)
        ref, n_ref = ndi.label(mask)
        assert n == n_ref and labels.dtype == np.int32 and np.array_equal(labels, ref), shape
    assert ops.label(np.zeros((4, 5), bool))[1] == 0
    values = rng.integers(0, 4, (30, 40, 20)).astype(np.int32)
    np.testing.assert_array_equal(label_by_value_propagation(values, ops.scatter_min), sk_label(values, background=0, connectivity=1))


def test_relabel_orders_ids_by_first_voxel(rng):
    labels = rng.choice([0, 7, 3, 12], size=(10, 12)).astype(np.int32)
    out = relabel_by_first_voxel(labels)
    firsts = [np.flatnonzero(out.ravel() == i)[0] for i in range(1, out.max() + 1)]
    assert firsts == sorted(firsts)
    # Same partition: a one-to-one map between old and new ids.
    pairs = set(zip(labels.ravel(), out.ravel()))
    assert len(pairs) == len(set(labels.ravel())) == out.max() + 1


def test_enforce_one_piece_leaves_every_label_connected(rng):
    labels = rng.integers(1, 4, (40, 40)).astype(np.int32)
    out = enforce_one_piece(labels)
    for value in np.unique(out[out > 0]):
        _, pieces = ndi.label(out == value)
        assert pieces == 1
    # Voxels never leave the foreground and large pieces keep their label.
    assert np.array_equal(out > 0, labels > 0)


def _voxel_rounds(labels, max_rounds):
    """The one-piece rule round by round on the voxels (scikit-image labels every round): the reference."""
    from gpu_pipeline.stages.components import face_pairs_between_labels, piece_stats, reassign_strays, \
        stray_pieces

    for _ in range(max_rounds):
        pieces = sk_label(labels, connectivity=1, background=0)
        value, size = piece_stats(pieces, labels)
        stray = stray_pieces(value, size)
        if stray is None:
            return labels, pieces, True
        labels = reassign_strays(value, stray, *face_pairs_between_labels(pieces, labels)).astype(labels.dtype)[pieces]
    pieces = sk_label(labels, connectivity=1, background=0)
    return pieces.astype(labels.dtype), pieces, False


@pytest.mark.parametrize("ndim", [2, 3])
def test_one_piece_rounds_on_the_piece_graph_equal_the_voxel_rounds(rng, ndim):
    """one_piece_rounds (one labelling, the rounds on the graph of touching pieces) gives the labels and
    pieces of the rule applied round by round to the voxels (on labels with many stray pieces, some beside
    other strays), both where the rounds settle and where max_rounds = 1, 2 (or the rule's oscillation
    between two strays) cut them short with strays left, which keep ids of their own."""
    from gpu_pipeline.stages.components import one_piece_rounds

    shape = (60, 70) if ndim == 2 else (16, 20, 22)
    cut_short = settled = 0
    for _ in range(4):
        # Cells around 25 random seeds (particles cut apart), and specks of any label or background in them:
        # pieces of one label split by others, strays beside strays.
        seeds = np.zeros(shape, dtype=np.int32)
        seeds[tuple(rng.integers(0, n, 25) for n in shape)] = np.arange(1, 26)
        labels = seeds[tuple(ndi.distance_transform_edt(seeds == 0, return_indices=True)[1])]
        specks = rng.random(shape) < 0.25
        labels[specks] = rng.integers(0, 26, int(specks.sum()))
        for max_rounds in (1, 2, 10):
            want_labels, want_pieces, done = _voxel_rounds(labels, max_rounds)
            got_labels, got_pieces = one_piece_rounds(labels, max_rounds)
            assert got_labels.dtype == labels.dtype and np.array_equal(got_labels, want_labels), max_rounds
            assert np.array_equal(got_pieces, want_pieces), max_rounds
            none, only = one_piece_rounds(labels, max_rounds, pieces_only=True)
            assert none is None and np.array_equal(only, want_pieces), max_rounds
            cut_short, settled = cut_short + (not done), settled + done
    assert cut_short and settled  # both cases happened


def test_cleanup_matches_skimage(rng):
    mask = ndi.binary_opening(rng.random((60, 60)) > 0.45)
    np.testing.assert_array_equal(our_remove(mask, 12), remove_small_objects(mask, max_size=11))
    np.testing.assert_array_equal(fill_small_holes(mask, 9), remove_small_holes(mask, max_size=8))


def _shells_reference(mask, spacing, ratio, share=None):
    """fill_shell_holes from SciPy alone: per enclosed hole (face-connected background touching no face), its
    deepest background distance against the deepest distance of the mask with every such hole filled, at the
    hole; with ``share``, also its voxels against those of its piece of that filled mask where that piece
    touches no face. Returns the labels, the holes filled, the ids too close to the ratio to call (float32
    against float64) and the number of enclosed holes."""
    labels, count = ndi.label(~mask)
    on_faces = set()
    for axis in range(mask.ndim):
        for index in (0, -1):
            on_faces |= set(np.unique(np.take(labels, index, axis=axis)).tolist())
    enclosed = [i for i in range(1, count + 1) if i not in on_faces]
    inside = np.isin(labels, enclosed)
    radius = ndi.maximum(ndi.distance_transform_edt(~mask, sampling=spacing), labels, enclosed)
    depth = ndi.maximum(ndi.distance_transform_edt(mask | inside, sampling=spacing), labels, enclosed)
    filled = {i for i, r, d in zip(enclosed, radius, depth) if r >= ratio * d}
    close = {i for i, r, d in zip(enclosed, radius, depth) if abs(r - ratio * d) < 1e-3}
    if share is not None:
        pieces, _ = ndi.label(mask | inside)
        for i in enclosed:
            hole = labels == i
            piece = pieces == pieces[hole][0]
            on_face = any(np.take(piece, index, axis=axis).any() for axis in range(mask.ndim) for index in (0, -1))
            if not on_face and hole.sum() >= share * piece.sum():
                filled.add(i)
                close.discard(i)
    return labels, filled, close, len(enclosed)


@pytest.mark.parametrize("shape, spacing", [((90, 110), (1.0, 1.0)), ((90, 110), (1.3, 0.8)),
                                            ((30, 40, 36), (2.0, 1.0, 1.0))])
def test_fill_shell_holes_equals_a_scipy_reference(rng, shape, spacing):
    from gpu_pipeline.stages.cleanup import SHELL_HOLE_DEPTH, SHELL_HOLE_SHARE, fill_shell_holes

    grids = np.indices(shape, dtype=float)
    seen = by_share = 0
    for _ in range(4):
        # Shells of random thickness (thin ones are cavities, thick ones not), solid balls and noise specks.
        mask = rng.random(shape) < 0.01
        for _ in range(12):
            centre = rng.uniform(0, shape)
            outer = rng.uniform(3, 12)
            d = np.sqrt(sum(((g - c) * s) ** 2 for g, c, s in zip(grids, centre, spacing)))
            mask |= (d <= outer) & (d > outer * rng.uniform(0, 0.8))
        counts = {}
        for share in {SHELL_HOLE_SHARE[len(shape)], None, 0.05, 0.1}:
            labels, want, close, enclosed = _shells_reference(mask, spacing, SHELL_HOLE_DEPTH, share)
            counts[share] = len(want)
            got, filled = fill_shell_holes(mask, spacing, share=share)
            if share == SHELL_HOLE_SHARE[len(shape)]:
                assert np.array_equal(fill_shell_holes(mask, spacing)[0], got)  # "auto": the table's value
            assert filled == len(want) or close
            expected = mask | np.isin(labels, sorted(want))
            undecided = np.isin(labels, sorted(close))
            np.testing.assert_array_equal(got[~undecided], expected[~undecided])
            seen += enclosed > len(want) > 0  # some holes filled and some left, in the same mask
        by_share += counts[0.05] > counts[None]  # holes that only their share fills
    assert seen and (by_share or len(shape) == 3)  # (3D: the share is compared too, but rarely decides here)


def test_thin_shells_are_filled_and_gaps_among_touching_disks_are_not():
    from gpu_pipeline.stages.cleanup import fill_shell_holes

    yy, xx = np.indices((220, 220), dtype=float)
    disk = lambda y, x, r: (yy - y) ** 2 + (xx - x) ** 2 <= r * r
    ring = disk(40, 40, 20) & ~disk(40, 40, 14)        # rim 6 around a cavity of radius 14: filled
    thick = disk(40, 140, 20) & ~disk(40, 140, 4)      # rim 16 around radius 4: kept
    cut = disk(110, 2, 20) & ~disk(110, 2, 14)          # the cavity reaches the image's edge: kept
    # A hexagonal patch of touching disks of radius 10 with its centre missing: the vacancy is a gap among
    # particles, and so are the small pockets between them.
    patch = np.zeros_like(ring)
    for row in range(-2, 3):
        for col in range(-2, 3):
            y, x = 160 + row * 20 * np.sqrt(3) / 2, 130 + col * 20 + row * 10
            if (row, col) != (0, 0) and abs(row + col) <= 2:
                patch |= disk(y, x, 10.4)
    mask = ring | thick | cut | patch
    holes, _ = ndi.label(~mask)
    assert holes[160, 130] not in (holes[0, 0], holes[110, 4]) and holes[40, 140] != holes[0, 0]  # all enclosed
    for share in ("auto", None):  # with the 2D core share and with the depth rule alone
        out, filled = fill_shell_holes(mask, (1.0, 1.0), share=share)
        assert filled == 1
        np.testing.assert_array_equal(out, mask | (disk(40, 40, 20) & ~mask))
        assert not out[160, 130] and not out[40, 140] and not out[110, 4]
    # The vacancy takes 5.6 % of its patch of 18 disks (the small pockets 0.2-0.4 % each): under the 2D share
    # (0.07, above the 6.4 % that four touching disks in a square enclose), filled by a share of 0.05.
    assert fill_shell_holes(mask, (1.0, 1.0), share=0.05)[0][160, 130]


def test_a_slit_shaped_core_is_filled_and_the_particle_stays_whole(rng, monkeypatch):
    """Discs of radius 45 with a dark elliptical core (30 x 9 px, as SEM rods and shells with bright edges show):
    the core's inscribed radius (9) is under SHELL_HOLE_DEPTH of the disc's depth, but it takes 13 % of its
    disc, so the 2D core share fills it and each disc is one particle; without it each was cut in two. The
    same disc cut by the image's edge is not filled: its share of a piece the frame cuts is not known."""
    from cpu_fallback import separate
    from gpu_pipeline.metrics import evaluate
    from gpu_pipeline.stages import cleanup

    shape = (300, 300)
    yy, xx = np.indices(shape, dtype=float)
    truth, image = np.zeros(shape, np.int32), np.full(shape, 0.2)
    for k, (y, x) in enumerate([(80, 80), (80, 220), (220, 150)]):
        y, x, angle = y + rng.uniform(-3, 3), x + rng.uniform(-3, 3), rng.uniform(0, np.pi)
        u = (yy - y) * np.cos(angle) + (xx - x) * np.sin(angle)
        v = (xx - x) * np.cos(angle) - (yy - y) * np.sin(angle)
        disc = (yy - y) ** 2 + (xx - x) ** 2 <= 45 ** 2
        truth[disc], image[disc] = k + 1, 0.7
        image[(u / 30) ** 2 + (v / 9) ** 2 <= 1] = 0.2
    image = (image + rng.normal(0, 0.04, shape)).astype(np.float32)
    labels, details = separate(image, return_details=True)
    assert details.shell_holes == 3 and evaluate(labels, truth)["f1_50"] == 1.0
    monkeypatch.setitem(cleanup.SHELL_HOLE_SHARE, 2, None)
    assert evaluate(separate(image), truth)["f1_50"] < 0.5
    monkeypatch.undo()
    for x, filled in ((100, 1), (20, 0)):  # inside the image; cut by its left edge (the core stays inside)
        disc = (yy - 100) ** 2 + (xx - x) ** 2 <= 45 ** 2
        core = ((yy - 100) / 30) ** 2 + ((xx - x) / 9) ** 2 <= 1
        assert cleanup.fill_shell_holes(disc & ~core, (1.0, 1.0))[1] == filled


def _ring_and_cored_nucleus(rng, shape=(240, 240)):
    """Four discs touching in a ring around a pocket (centres 1.75 radii apart) and, apart, a larger disc with a
    round dark core: ``(image uint8, truth, ring centre, core mask)``; ground truth split on radical lines."""
    yy, xx = np.indices(shape, dtype=float)
    truth, power = np.zeros(shape, np.int32), np.full(shape, np.inf)

    def add(y, x, r):
        p = (yy - y) ** 2 + (xx - x) ** 2 - r * r
        win = (p <= 0) & (p < power)
        power[win], truth[win] = p[win], truth.max() + 1

    r = rng.uniform(11, 14)
    rho = 1.75 * r / (2 * np.sin(np.pi / 4))
    centre, phase = (120 + rng.uniform(-5, 5), 80 + rng.uniform(-5, 5)), rng.uniform(0, 2 * np.pi)
    for k in range(4):
        add(centre[0] + rho * np.sin(phase + k * np.pi / 2), centre[1] + rho * np.cos(phase + k * np.pi / 2), r)
    ny, nx, big = 120 + rng.uniform(-5, 5), 190 + rng.uniform(-3, 3), rng.uniform(16, 20)
    add(ny, nx, big)
    core = (yy - ny - rng.uniform(-3, 3)) ** 2 + (xx - nx - rng.uniform(-3, 3)) ** 2 <= (0.3 * big) ** 2
    image = np.where(truth > 0, 0.8, 0.15)
    image[core] = 0.15
    image = ndi.gaussian_filter(image, 1.0) + rng.normal(0, 0.03, shape)
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8), truth, centre, core


def test_a_pocket_between_touching_discs_stays_open_and_a_particle_core_is_filled(rng, monkeypatch):
    """The automatic hole size fills the pocket among four touching discs as well as the round core of a
    larger disc (a nucleolus). pocket_holes opens the pocket again (the discs' peaks have necks between them
    in the filled mask) and leaves the core filled (one convex particle: no neck): every particle is found.
    With every pocket kept filled (the rule off), the ring's discs merge."""
    from cpu_fallback import separate
    from gpu_pipeline.metrics import evaluate
    from gpu_pipeline.stages import cleanup

    image, truth, centre, core = _ring_and_cored_nucleus(rng)
    labels, details = separate(image, return_details=True)
    assert details.pocket_holes == 1
    assert labels[int(round(centre[0])), int(round(centre[1]))] == 0  # the pocket is background
    assert np.all(labels[core] > 0) and len(np.unique(labels[core])) == 1  # the core belongs to its disc
    assert evaluate(labels, truth)["f1_50"] == 1.0
    monkeypatch.setattr(cleanup, "POCKET_NECK_RATIO", 0.0)
    merged = separate(image)
    assert merged.max() < truth.max() and evaluate(merged, truth)["f1_50"] < 0.5


def test_pocket_holes_returns_the_pocket_alone(rng):
    """On a mask of touching discs around a pocket and a disc with a round hole, every hole filled: the pocket
    (the background component holding the ring's centre, found with SciPy) is returned, voxel for voxel, and
    nothing of the disc's hole; a filled mask with no pocket returns nothing."""
    from gpu_pipeline.stages.cleanup import pocket_holes

    image, truth, centre, core = _ring_and_cored_nucleus(rng)
    before = truth > 0
    before[core] = False
    after = ndi.binary_fill_holes(before)
    background, _ = ndi.label(~before)
    pocket = background == background[int(round(centre[0])), int(round(centre[1]))]
    got, count = pocket_holes(before, after, (1.0, 1.0), 6.0)
    assert pocket.sum() > 0 and np.array_equal(got, pocket) and count == 1
    nothing, count = pocket_holes(before | pocket, after, (1.0, 1.0), 6.0)
    assert not nothing.any() and count == 0


def test_distance_transform_equals_scipy_with_anisotropic_spacing(rng):
    mask = ndi.binary_dilation(rng.random((20, 30, 25)) > 0.97, iterations=3)
    spacing = (2.5, 1.0, 0.7)
    ours = ops.distance_transform(mask, spacing)
    ref = ndi.distance_transform_edt(mask, sampling=spacing)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-5)


def _mask_with_holes_and_specks(rng, shape, holes, specks, radius=(3, 6)):
    """Balls of ``radius`` apart from each other (a jittered lattice, so no pockets between them) with ``holes``
    pits of 1-8 voxels punched inside them and ``specks`` dots of 1-8 voxels set in the background, away from
    them."""
    step = 2 * radius[1] + 4
    grid = np.indices(shape)
    mask = np.zeros(shape, bool)
    for corner in np.ndindex(*(n // step for n in shape)):
        centre = np.array(corner) * step + step // 2 + rng.integers(-1, 2, len(shape))
        box = tuple(slice(c - radius[1], c + radius[1] + 1) for c in centre)
        offsets = [g[box] - c for g, c in zip(grid, centre)]
        mask[box] |= sum(o.astype(float) ** 2 for o in offsets) <= rng.uniform(*radius) ** 2
    for count, inside in ((holes, True), (specks, False)):
        where = np.argwhere(ndi.binary_erosion(mask, iterations=2) if inside
                            else ~ndi.binary_dilation(mask, iterations=3))
        for centre in where[rng.choice(len(where), size=min(count, len(where)), replace=False)]:
            mask[tuple(slice(c, c + int(rng.integers(1, 3))) for c in centre)] = not inside
    return mask


def _spy_transforms(monkeypatch):
    """The shapes that ``ops.distance_transform`` is called on from now (it still computes)."""
    shapes, transform = [], ops.distance_transform

    def spy(mask, spacing, *args, **kwargs):
        shapes.append(mask.shape)
        return transform(mask, spacing, *args, **kwargs)

    monkeypatch.setattr(ops, "distance_transform", spy)
    return shapes


@pytest.mark.parametrize("shape, spacing", [((96, 120), (1.0, 1.0)), ((40, 72, 64), (1.0, 1.0, 1.0)),
                                            ((40, 72, 64), (2.5, 1.0, 0.7)), ((150, 130), (0.6, 1.3)),
                                            ((64, 128, 128), (1.0, 1.0, 1.0)), ((64, 128, 128), (1.5, 0.8, 1.0))])
@pytest.mark.parametrize("holes, specks", [(0, 12), (2, 0), (3, 12), (400, 40)])
@pytest.mark.parametrize("transform", ["compiled", "array module"])
def test_cleaned_distance_is_the_transform_of_the_cleaned_mask(rng, monkeypatch, shape, spacing, holes, specks,
                                                               transform):
    """Updated where cleanup filled holes and removed specks, the distance map equals the transform of the cleaned
    mask value for value (and SciPy's to float32 rounding); a few holes in a large volume take crops, not a
    whole transform. ``array module``: with the GPU's transform (gpu_pipeline.array_algorithms), run on NumPy."""
    if transform == "array module":
        from gpu_pipeline.array_algorithms import distance_transform_edt

        monkeypatch.setattr(ops, "distance_transform", lambda mask, spacing, *args, **kwargs:
                            distance_transform_edt(mask, spacing, **kwargs))
    mask = _mask_with_holes_and_specks(rng, shape, holes, specks)
    size = 9 * np.prod(spacing)  # the pits and dots (at most 8 voxels), not the balls
    after = clean_mask(mask, spacing=spacing, min_size=size, max_hole_size=size)
    assert (after & ~mask).any() == (holes > 0) and (mask & ~after).any() >= (specks > 0)
    distance = ops.distance_transform(mask, spacing)
    shapes = _spy_transforms(monkeypatch)
    updated = cleaned_distance(distance, mask, after, spacing)
    np.testing.assert_array_equal(updated, ops.distance_transform(after, spacing))
    np.testing.assert_allclose(updated, ndi.distance_transform_edt(after, sampling=spacing), rtol=1e-6, atol=1e-5)
    if holes == 0:
        assert shapes == [shape]  # (only the check above)
    elif holes <= 3 and np.prod(shape) >= 10 ** 6:
        assert shape not in shapes[:-1] and len(shapes) > 1  # crops


def test_cleaned_distance_of_a_hole_at_a_balls_centre_is_exact(monkeypatch):
    """A hole where filling makes the deepest point deeper than any before: the crops' check fails and the whole
    transform is taken."""
    grid = np.indices((100, 100, 100)) - 50
    ball = (grid ** 2).sum(axis=0) <= 10 ** 2
    holed = ball & ((grid ** 2).sum(axis=0) > 1)
    spacing = (1.0, 1.0, 1.0)
    after = clean_mask(holed, spacing=spacing, min_size=1, max_hole_size=20)
    np.testing.assert_array_equal(after, ball)
    distance = ops.distance_transform(holed, spacing)
    shapes = _spy_transforms(monkeypatch)
    updated = cleaned_distance(distance, holed, after, spacing)
    np.testing.assert_array_equal(updated, ndi.distance_transform_edt(ball).astype(np.float32))
    assert shapes[-1] == ball.shape and len(shapes) == 2  # a crop, its check failed, the whole


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_quantized_distance_equals_the_numpy_rounding(rng, dtype):
    from gpu_pipeline.stages.peaks import quantize_distance

    spacing = (0.7, 1.3, 1.0)
    quantum = 0.7 / 256
    values = (rng.random((30, 40, 50)) * 40).astype(dtype)
    values.ravel()[:500] = (rng.integers(0, 5000, 500) + 0.5) * quantum  # half steps: ties round to even
    ours, q = quantize_distance(values, spacing)
    assert q == quantum and ours.dtype == np.int32
    np.testing.assert_array_equal(ours, np.rint(values.astype(np.float64) / quantum).astype(np.int32))
    values.ravel()[7] = np.inf  # beyond int32: NumPy's cast decides, as before
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(quantize_distance(values, spacing)[0],
                                      np.rint(values.astype(np.float64) / quantum).astype(np.int32))


@pytest.mark.parametrize("shape,dtype", [((200,), np.int32), ((60, 70), np.int64), ((20, 30, 40), np.int64),
                                         ((20, 30, 40), np.uint16), ((30, 40), bool)])
def test_equal_value_label_is_skimage_label_partition_and_numbering(rng, shape, dtype):
    """The CPU's compiled equal-value labelling gives scikit-image's ids (C order of first voxel), 1-3D, any dtype."""
    for values in (rng.integers(0, 3, shape), rng.integers(0, 2, shape) * rng.integers(1, 1000, shape)):
        values = values.astype(dtype)
        ours = ops.label_by_value(values)
        assert ours.dtype == np.int32
        np.testing.assert_array_equal(ours, sk_label(values, background=0, connectivity=1))


def _combs_and_spirals(shape):
    """A 2D or 3D mask whose components join only far from where their runs start: combs whose teeth (runs of
    one row) meet at a spine below them, a spiral, U shapes opening upward."""
    mask = np.zeros(shape, dtype=bool)
    plane = mask.reshape((-1,) + shape[-2:])[0]
    rows, cols = plane.shape
    plane[rows - 2, 1:cols - 1] = True  # a comb's spine on the last rows ...
    plane[1:rows - 2, 1:cols - 1:3] = True  # ... its teeth, each its own run until the spine
    plane[2:rows // 2, 2:cols // 2:6] = True  # teeth of a second comb between them
    y, x = rows // 2, cols // 2
    for step in range(2, min(rows, cols) // 2, 2):  # a square spiral around the middle
        plane[max(y - step, 0):y + step, min(x + step, cols - 1)] = step % 4 == 0
        plane[min(y + step, rows - 1), max(x - step, 0):x + step] = True
    if mask.ndim == 3:
        mask[1:] = mask[0]
        mask[1::2, :rows // 2] = False  # planes that join the combs' halves only through the planes before
    return mask


@pytest.mark.parametrize("shape", [(1, 1, 300), (300, 1, 1), (1, 300, 1), (47, 61), (9, 35, 40), (40, 3, 70)])
def test_compiled_labelling_joins_runs_as_scipy_does(rng, shape):
    """The run-based union-find of the compiled labelling (one node per run of a row, joined to the runs it
    touches in the row and the plane before) gives SciPy's components and ids (first voxel in C order) and
    counts them, on masks whose runs join only far from their starts (combs, spirals, U shapes), thresholded
    smooth noise (one large component with holes, and its background), and a value image of such pieces."""
    masks = [rng.random(shape) < p for p in (0.3, 0.6)]
    smooth = ndi.gaussian_filter(rng.random(shape), 2)
    masks += [smooth > np.median(smooth), smooth <= np.median(smooth)]
    if len(shape) > 1 and min(shape[-2:]) >= 8:
        masks += [_combs_and_spirals(shape), ~_combs_and_spirals(shape)]
    for mask in masks:
        want, count = ndi.label(mask)
        ours, n, sizes = kernels.label_by_value(mask, return_count=True, return_sizes=True)
        np.testing.assert_array_equal(ours, want)
        assert n == count == (int(want.max()) if want.size else 0)
        np.testing.assert_array_equal(sizes, np.bincount(want.ravel(), minlength=count + 1))
        assert ops.label(mask)[1] == count
        table = ops.label_table(mask)
        np.testing.assert_array_equal(table[0], want)
        assert table[1] == count and np.array_equal(table[2], sizes)
        # Into a caller's buffer holding another labelling's leftovers: every voxel rewritten, the same table.
        buffer = rng.integers(-5, 2**31 - 1, shape).astype(np.int32)
        given = ops.label_table(mask, out=buffer)
        assert given[0] is buffer and given[1] == count and np.array_equal(given[2], sizes)
        np.testing.assert_array_equal(buffer, want)
    values = (masks[-1] * rng.integers(1, 4, shape)).astype(np.int64)  # pieces of equal value
    np.testing.assert_array_equal(kernels.label_by_value(values), sk_label(values, background=0, connectivity=1))
    empty = kernels.label_by_value(np.zeros(shape, dtype=bool), return_count=True, return_sizes=True)
    assert empty[1] == 0 and not empty[0].any() and empty[2].tolist() == [int(np.prod(shape))]
    for wrong in (np.zeros(shape, np.int64), np.zeros(tuple(n + 1 for n in shape), np.int32)):
        with pytest.raises(ValueError, match="C-contiguous int32 array of shape"):
            kernels.label_by_value(masks[0], out=wrong)


@pytest.mark.parametrize("high", [50, 2**40])
def test_count_pairs_sums_each_distinct_pair_in_order(rng, high):
    """Distinct (a, b) pairs sorted by a then b, with their summed counts, as a Counter finds them; ids as far
    apart as int64 allows (high=2**40: no single sort key fits, the two-key sort runs)."""
    from collections import Counter

    from gpu_pipeline.stages.components import count_pairs

    a = rng.integers(0, 40, 5000) * (high // 40)
    b = rng.integers(0, 30, 5000) * (high // 30) - high // 2
    counts = rng.integers(1, 9, 5000)
    want = Counter()
    for x, y, c in zip(a.tolist(), b.tolist(), counts.tolist()):
        want[(x, y)] += c
    pairs = sorted(want)
    got_a, got_b, got_counts = count_pairs(a, b, counts)
    assert list(zip(got_a.tolist(), got_b.tolist())) == pairs
    assert got_counts.tolist() == [want[p] for p in pairs]
    once = count_pairs(a, b)[2]
    assert once.tolist() == [Counter(zip(a.tolist(), b.tolist()))[p] for p in pairs]


def test_piece_stats_give_each_pieces_label_voxel_count_and_first_voxel(rng):
    from gpu_pipeline.stages.components import piece_stats

    labels = rng.integers(0, 5, (20, 30, 40)).astype(np.int64) * 1000
    pieces = sk_label(labels, background=0, connectivity=1).astype(np.int32)
    pieces[pieces == 7] = 0  # an absent id
    piece_label, piece_size = piece_stats(pieces, labels)
    np.testing.assert_array_equal(piece_size, np.bincount(pieces.ravel(), minlength=pieces.max() + 1))
    np.testing.assert_array_equal(piece_label[pieces], np.where(pieces > 0, labels, piece_label[0]))
    assert piece_label.dtype == piece_size.dtype == np.int64
    label_again, size_again, first = piece_stats(pieces, labels, return_first=True)
    np.testing.assert_array_equal(label_again, piece_label)
    np.testing.assert_array_equal(size_again, piece_size)
    ids, where = np.unique(pieces.ravel(), return_index=True)
    want = np.full(pieces.max() + 1, pieces.size)
    want[ids] = where
    np.testing.assert_array_equal(first, want)
    assert first[7] == pieces.size and first.dtype == np.int64


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32, np.float64])
def test_compiled_histogram_equals_bincount_of_bin_index(rng, dtype):
    """The CPU's one-pass histogram puts every value in the bin of the array form (edges, clipping, float rounding)."""
    from gpu_pipeline.stages.threshold import bin_index

    image = (rng.gamma(2.0, 30.0, (30, 40, 50)) - 20).astype(dtype)
    for bins in (histogram_bins(image.min(), image.max(), image.dtype),
                 histogram_bins(float(image.min()) + 5, float(image.max()) - 9.5, np.float32)):  # values outside
        if not bins.integer:  # values exactly on bin edges
            edges = bins.low + np.arange(bins.nbins) * ((bins.high - bins.low) / bins.nbins)
            image.ravel()[:300] = edges[rng.integers(0, bins.nbins, 300)].astype(dtype)
        counts, _ = intensity_histogram(image, bins)
        np.testing.assert_array_equal(counts, np.bincount(bin_index(image.ravel(), bins), minlength=bins.nbins))


def test_missed_share_counts_low_mask_objects_mostly_outside_the_high_mask(rng):
    from gpu_pipeline.stages.threshold import covered_objects, missed_share

    low = ndi.binary_opening(rng.random((60, 70, 30)) > 0.4)
    labels, n = ndi.label(low)
    high = low & (rng.random(low.shape) < rng.choice([0.3, 0.7], n + 1)[labels])  # objects mostly in or out
    area = np.bincount(labels.ravel(), minlength=n + 1)
    covered = np.bincount(labels.ravel(), weights=high.ravel(), minlength=n + 1)
    missed = 2 * covered < area
    missed[0] = False
    assert 0 < missed.sum() < n
    assert missed_share(*covered_objects(low, high)[1:]) == area[missed].sum() / area[1:].sum()


def test_combined_foreground_keeps_the_high_mask_and_the_low_objects_it_covers_little_of(rng):
    from gpu_pipeline.stages.threshold import OTSU_COVERED, combined_foreground, covered_objects

    low = ndi.binary_opening(rng.random((60, 70, 30)) > 0.4)
    labels, n = ndi.label(low)
    share = rng.choice([0.2, 0.6, 0.95], n + 1)  # objects barely, partly and mostly covered
    high = low & (rng.random(low.shape) < share[labels])
    area = np.bincount(labels.ravel(), minlength=n + 1)
    covered = np.bincount(labels.ravel(), weights=high.ravel(), minlength=n + 1)
    own = covered < OTSU_COVERED * area
    own[0] = False
    assert 0 < own[1:].sum() < n
    expected = high | own[labels]
    combined = combined_foreground(high, covered_objects(low, high))
    np.testing.assert_array_equal(combined, expected)
    assert combined[low & ~high & ~own[labels]].sum() == 0  # mostly covered objects: the high mask's outline


def test_auto_threshold_outlines_bright_nuclei_at_otsu_and_keeps_dim_ones_at_li(rng):
    """Dim and bright nuclei in one frame: auto takes Li (Otsu misses the dim ones), but an object Otsu finds
    keeps Otsu's outline, not Li's wider one (blur joins touching bright nuclei there)."""
    from gpu_pipeline import separate
    from gpu_pipeline.metrics import evaluate
    from gpu_pipeline.stages.threshold import foreground, threshold_foreground
    from gpu_pipeline.synthetic import make_uneven_nuclei

    scores = {"auto": [], "li": []}
    for _ in range(4):
        image, truth = make_uneven_nuclei((256, 256), 60, seed=int(rng.integers(1e6)))
        smoothed = ndi.gaussian_filter(image.astype(np.float32), 1.0)
        mask, decision = threshold_foreground(smoothed, "auto", "bright")
        assert decision.method == "li"
        otsu = foreground(smoothed, decision.candidates["otsu"], "bright")
        li = foreground(smoothed, decision.candidates["li"], "bright")
        assert (mask >= otsu).all() and (mask <= li).all() and otsu.sum() < mask.sum() < li.sum()
        found, n = ndi.label(li)
        share = ndi.mean(otsu, found, np.arange(1, n + 1))  # how much of each Li object Otsu covers
        dim, bright = np.flatnonzero(share < 0.5) + 1, np.flatnonzero(share >= 0.8) + 1
        assert dim.size and mask[np.isin(found, dim)].all()  # missed by Otsu (Li was chosen for them): Li's
        assert bright.size and np.array_equal(mask[np.isin(found, bright)], otsu[np.isin(found, bright)])
        for name in scores:
            scores[name].append(evaluate(separate(image, threshold=name), truth)["mean_f1"])
    assert np.mean(scores["auto"]) > np.mean(scores["li"]), scores


@pytest.mark.parametrize("shape", [(50, 60), (20, 30, 25)])
def test_finish_labels_is_relabelled_enforce_one_piece(rng, shape):
    """finish_labels reuses the last round's pieces as the numbering: the same as relabelling afterwards."""
    from gpu_pipeline.stages.split import finish_labels

    blocks = tuple(s // 5 for s in shape)
    labels = ndi.zoom(rng.permutation(np.prod(blocks)).reshape(blocks) + 1, 5, order=0)  # blobs in shuffled ids ...
    labels = np.where(rng.random(shape) < 0.1, rng.integers(0, 40, shape), labels).astype(np.int64)  # ... and specks
    expected = relabel_by_first_voxel(enforce_one_piece(labels))
    ours = finish_labels(labels)
    assert ours.dtype == expected.dtype == np.int32
    np.testing.assert_array_equal(ours, expected)
    np.testing.assert_array_equal(finish_labels(np.zeros(shape, np.int64)), np.zeros(shape, np.int32))


@pytest.mark.parametrize("shape,size,dtype", [((300,), (9,), np.int32), ((40, 57), (5, 1), np.uint16),
                                              ((23, 31, 37), (9, 9, 9), np.int32), ((23, 31, 37), (3, 7, 61), np.int64),
                                              ((20, 30), (4, 5), np.int32), ((20, 30), (3, 3), np.float32),
                                              ((41, 1), (3, 3), np.int32), ((17, 23, 9), (3, 1, 3), np.int8),
                                              ((30, 40), (3, 3), bool), ((19, 23, 29), (5, 7, 9), "int32 F"),
                                              ((9, 40, 61), (5, 9, 3), np.int32), ((7, 3000), (9, 5), np.uint16)])
def test_maximum_filter_equals_scipy_nearest(rng, shape, size, dtype):
    """The CPU's maximum filter (shifted maxima for integer data and windows of 1 or 3, compiled for other odd
    windows, filtered in place in one copy, SciPy otherwise) is SciPy's, and leaves its input as it was (also a
    Fortran-ordered one). The last two shapes' first axes have rows longer than ``kernels.RUNNING_MAX_TILE``
    (filtered a tile of columns at a time, the last tile partial)."""
    dtype, order = dtype.split() if isinstance(dtype, str) else (dtype, "C")
    values = np.asarray(rng.integers(0, 50, shape).astype(dtype), order=order)  # few values: many equal maxima
    before = values.copy()
    expected = ndi.maximum_filter(values, size=size, mode="nearest")
    ours = ops.maximum_filter(values, size)
    assert ours.dtype == values.dtype
    np.testing.assert_array_equal(ours, expected)
    np.testing.assert_array_equal(values, before)


@pytest.mark.parametrize("shape,sigma,dtype,order", [
    ((37, 41, 29), (1.0, 1.0, 1.0), np.uint8, "C"),
    ((23, 30, 18), (2.0, 0.6, 1.3), np.uint16, "C"),       # anisotropic, a different radius per axis
    ((19, 26, 33), (0.0, 1.5, 1.0), np.float32, "C"),      # sigma 0 on the first axis: skipped, as in SciPy
    ((17, 21, 25), (1.0, 1.0, 0.0), np.float64, "F"),      # the last axis skipped; Fortran-ordered input
    ((6, 9, 7), (3.0, 2.5, 3.0), np.float32, "C"),         # radius longer than the axes: edges clamp every tap
    ((1, 30, 40), (1.0, 1.0, 1.0), np.int16, "C"),         # a one-voxel axis
    ((64, 70), (1.7, 1.0), np.uint8, "C"),
    ((200,), (2.0,), np.float32, "C"),
    ((3, 5, 0), (1.0, 1.0, 1.0), np.uint8, "C"),           # empty (Dask asks for the type on one)
])
def test_gaussian_equals_scipy_bit_for_bit(rng, shape, sigma, dtype, order):
    """The CPU's smoothing (compiled passes on the strided axes) is SciPy's float32 result value for value."""
    values = rng.normal(100, 40, shape).clip(0, 250)
    values = np.asarray(values.astype(dtype), order=order)
    before = values.copy()
    expected = ndi.gaussian_filter(np.asarray(values, dtype=np.float32), sigma, mode="nearest", truncate=4.0)
    ours = ops.gaussian(values, sigma)
    assert ours.dtype == np.float32 and ours.shape == values.shape
    np.testing.assert_array_equal(ours, expected)
    np.testing.assert_array_equal(values, before)  # the input is never written


@pytest.mark.parametrize("shape,spacing", [((301,), (1.0,)), ((40, 57), (1.0, 1.0)), ((23, 31, 37), (1.0, 1.0, 1.0)),
                                           ((23, 31, 37), (4.0, 2.0, 3.0)), ((17, 9, 40), (2.5, 0.7, 1.3)),
                                           ((1, 30, 40), (1.0, 0.6, 0.6)), ((64, 70), (0.3, 1.7)),
                                           ((30, 2051), (1.0, 1.0)), ((5, 45, 47), (2.5, 0.7, 1.3))])
@pytest.mark.parametrize("density", [0.002, 0.05, 0.5])
def test_compiled_distance_transform_equals_scipy(rng, monkeypatch, shape, spacing, density):
    """``ops.distance_transform`` (the compiled envelope of parabolas, per axis) against SciPy's exact EDT on
    sparse, medium and dense background: bit for bit where the squared spacings are whole numbers (every
    squared distance is then a whole number: exact in float32), to float32 rounding otherwise; the same values
    on one thread as split between threads, and with every axis's lines taken one by one or in tiles (the last
    two shapes tile their first axis by default, with a partial last tile); inf wherever there is no
    background at all. The sparse backgrounds' long runs of foreground take the lower envelope, the dense ones'
    short runs the direct minimum over their parabolas (``kernels.NEAREST_RUN_PARABOLAS``)."""
    background = ndi.binary_dilation(rng.random(shape) < density, iterations=1) if density < 0.1 else \
        rng.random(shape) < density
    background.flat[rng.integers(background.size)] = True  # at least one background voxel
    mask = ~background
    expected = ndi.distance_transform_edt(mask, sampling=spacing)
    ours = ops.distance_transform(mask, spacing, threads=1)
    assert ours.dtype == np.float32 and ours.shape == shape
    if all(float(s * s).is_integer() for s in spacing):
        np.testing.assert_array_equal(ours, expected.astype(np.float32))
    else:
        np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(ops.distance_transform(mask, spacing, threads=3), ours)
    if mask.size >= 4096:  # split between threads even below the size where it pays
        monkeypatch.setattr(kernels, "SPLIT_MIN_VOXELS", 0)
        np.testing.assert_array_equal(ops.distance_transform(mask, spacing, threads=3), ours)
    np.testing.assert_array_equal(ops.distance_transform(np.asfortranarray(mask), spacing, threads=1), ours)
    for stride in (1, 1 << 40):  # every strided axis tiled (a tile of 3: partial tiles too), none
        monkeypatch.setattr(kernels, "ENVELOPE_TILE_STRIDE", stride)
        monkeypatch.setattr(kernels, "ENVELOPE_TILE", 3)
        np.testing.assert_array_equal(ops.distance_transform(mask, spacing, threads=3), ours)
    assert np.isinf(ops.distance_transform(np.ones(shape, bool), spacing, threads=1)).all()
    with pytest.raises(ValueError, match="spacing has"):
        ops.distance_transform(mask, (*spacing, 1.0))


@pytest.mark.parametrize("shape", [(301,), (40, 57), (23, 31, 37), (30, 2051), (5, 45, 47)])
def test_a_windowed_distance_transform_is_the_window_of_the_whole(rng, monkeypatch, shape):
    """``window``: each pass transforms only the lines that the window's values depend on (a chunk's core and
    peak window in a block whose halo serves the transform); what it returns is the whole transform's window,
    bit for bit, for random windows (empty, one voxel wide, touching the edges), anisotropic spacing, lines
    one by one and in tiles."""
    spacing = tuple(rng.uniform(0.4, 2.5, len(shape)))
    mask = ~ndi.binary_dilation(rng.random(shape) < 0.01, iterations=2)
    whole = ops.distance_transform(mask, spacing, threads=1)
    windows = [tuple(slice(None) for _ in shape), tuple(slice(0, 1) for _ in shape),
               tuple(slice(n - 1, None) for n in shape), tuple(slice(2, 2) for _ in shape)]
    for _ in range(6):
        lows = [int(rng.integers(0, n)) for n in shape]
        windows.append(tuple(slice(lo, int(rng.integers(lo + 1, n + 1))) for lo, n in zip(lows, shape)))
    for stride in (kernels.ENVELOPE_TILE_STRIDE, 1):
        monkeypatch.setattr(kernels, "ENVELOPE_TILE_STRIDE", stride)
        for window in windows:
            part = ops.distance_transform(mask, spacing, threads=1, window=window)
            assert part.shape == whole[window].shape
            np.testing.assert_array_equal(part, whole[window])


@pytest.mark.parametrize("shape,dtype", [((301,), np.int32), ((40, 57), np.uint16), ((23, 31, 37), np.float32),
                                         ((19, 26, 33), np.float64), ((2, 1, 3), np.float32)])
def test_local_maxima_are_the_voxels_equal_to_their_box_maximum(rng, shape, dtype):
    """``ops.local_maxima`` (compiled) and the array-module version (the GPU's) against SciPy's 3^n maximum
    filter with replicated edges, on plateaus, specks and a threshold between values."""
    from gpu_pipeline.array_algorithms import local_maxima as array_version

    values = ndi.zoom(rng.integers(0, 9, tuple(max(1, n // 3) for n in shape)), 3, order=0)  # plateaus ...
    values = np.pad(values, [(0, max(0, n - m)) for n, m in zip(shape, values.shape)], mode="edge")
    values = values[tuple(slice(0, n) for n in shape)]
    values = np.where(rng.random(shape) < 0.2, rng.integers(0, 9, shape), values).astype(dtype)  # ... specks
    expected = (values == ndi.maximum_filter(values, size=3, mode="nearest")) & (values >= 2.5)
    assert values.size < 10 or 0 < expected.sum() < values.size
    for got in (ops.local_maxima(values, 2.5), array_version(values, 2.5, ops.maximum_filter)):
        assert got.dtype == bool
        np.testing.assert_array_equal(got, expected)


def _box_maxima_reference(values, size, min_value, half_widths, core):
    """The two candidate sets by definition: SciPy's box maximum, and face neighbours from an edge-padded copy."""
    above = values > min_value
    is_max = above & (values == ndi.maximum_filter(values, size=size, mode="nearest"))
    maybe = above & ~is_max
    padded = np.pad(values, 1, mode="edge")
    for axis, h in enumerate(half_widths):
        if h >= 1:
            for step in (-1, 1):
                neighbour = np.roll(padded, step, axis=axis)[(slice(1, -1),) * values.ndim]
                maybe &= values >= neighbour
    inside = np.zeros(values.shape, bool)
    inside[core] = True
    return np.argwhere(is_max & inside), np.argwhere(maybe & inside)


@pytest.mark.parametrize("shape,half,dtype,core", [
    ((301,), (4,), np.int32, (slice(7, 290),)),
    ((40, 57), (3, 0), np.uint16, (slice(None), slice(None))),
    ((23, 31, 37), (4, 4, 4), np.int32, (slice(4, 19), slice(4, 27), slice(4, 33))),
    ((19, 26, 33), (1, 3, 5), np.float32, (slice(0, 19), slice(2, 20), slice(5, 33))),
    ((23, 31, 37), (4, 4, 4), np.int64, (slice(None),) * 3),  # int64: the array-module path
])
def test_box_maxima_are_the_box_maxima_and_face_neighbour_maxima(rng, shape, half, dtype, core):
    """The CPU's compiled candidate pass and the array-module one (the GPU's) give the defining sets."""
    from gpu_pipeline.array_algorithms import box_maxima as array_version

    values = ndi.zoom(rng.integers(0, 9, tuple(max(2, n // 3) for n in shape)), 3, order=0)  # plateaus ...
    values = np.where(rng.random(values.shape) < 0.2, rng.integers(0, 9, values.shape), values)  # ... and specks
    values = np.pad(values, [(0, max(0, n - m)) for n, m in zip(shape, values.shape)], mode="edge")
    values = values[tuple(slice(0, n) for n in shape)].astype(dtype)
    size = tuple(2 * h + 1 for h in half)
    maxed = ndi.maximum_filter(values, size=size, mode="nearest")
    expected = _box_maxima_reference(values, size, 2, half, core)
    assert expected[0].shape[0] and expected[1].shape[0]  # both sets are exercised
    for ours in (ops.box_maxima(values, maxed, 2, half, core), array_version(values, maxed, 2, half, core)):
        for got, want in zip(ours, expected):
            assert got.dtype == np.int64
            np.testing.assert_array_equal(got, want)
    # A threshold that float32 cannot hold compares as NumPy compares it (rounded to float32).
    if values.dtype == np.float32:
        tenth = np.where(values == 2, np.float32(0.1), values).astype(np.float32)
        for got, want in zip(ops.box_maxima(tenth, ndi.maximum_filter(tenth, size=size, mode="nearest"), 0.1, half,
                                            core),
                             _box_maxima_reference(tenth, size, 0.1, half, core)):
            np.testing.assert_array_equal(got, want)
    # A window of a larger array (not contiguous) gives the window's own result.
    big = np.pad(values, 3, mode="reflect")
    window = big[(slice(3, -3),) * values.ndim]
    for got, want in zip(ops.box_maxima(window, maxed, 2, half, core), expected):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("shape, spacing, ratio", [((40, 50), (1.0, 1.0), 0.7), ((24, 30, 28), (2.0, 1.0, 1.0), 0.8),
                                                   ((22, 26, 30), (1.0, 1.0, 1.0), 1.0)])
def test_peak_reach_keeps_the_candidates_no_voxel_within_their_reach_exceeds(rng, monkeypatch, shape, spacing,
                                                                              ratio, compiled):
    """within_reach against a ball search voxel by voxel: a candidate of the window's peaks stays when no voxel
    within ratio x min(its height, its distance to the border) (physical) is higher; find_peaks applies it
    before the spacing, so its peaks are the reference's kept candidates, spaced. Both the CPU's compiled test
    of the offsets and the array code the GPU runs (on NumPy)."""
    from gpu_pipeline.stages import peaks as peaks_module
    from gpu_pipeline.stages.peaks import PeakReach, QUANTUM_DIVISOR, local_maxima, space_candidates, within_reach

    monkeypatch.setattr(peaks_module, "COMPILED_WINDOW_TEST", compiled)

    # A smooth random landscape of peaks, ridges and flanks on 48 levels (equal voxels beyond the window of a
    # candidate do not exceed it), heights up to 12 voxels as quantised distances.
    values = ndi.gaussian_filter(rng.random(shape), 1.5)
    values = (np.rint((values - values.min()) / np.ptp(values) * 48) * (QUANTUM_DIVISOR // 4)).astype(np.int32)
    half = tuple(max(1, int(2 / s)) for s in spacing)
    candidates = local_maxima(values, half_widths=half)
    keep = within_reach(values, candidates, PeakReach(ratio, spacing, 1e3), half, values.shape)
    grid = np.indices(shape).reshape(len(shape), -1).T
    quantum = min(spacing) / QUANTUM_DIVISOR
    reference = []
    for c in candidates:
        border = min((min(int(x), n - 1 - int(x)) + 1) * s for x, n, s in zip(c, shape, spacing))
        radius = ratio * min(values[tuple(c)] * quantum, border)
        within = (((grid - c) * spacing) ** 2).sum(axis=1) <= radius ** 2
        reference.append(not (values.ravel()[within] > values[tuple(c)]).any())
    np.testing.assert_array_equal(keep, reference)
    assert 0 < np.sum(reference) < len(reference)  # the reach decides here
    kept = candidates[np.asarray(reference)]
    np.testing.assert_array_equal(find_peaks(values, half_widths=half, reach=PeakReach(ratio, spacing, 1e3)),
                                  kept[space_candidates(kept, half)])
    # Kept for the reach share: the same peaks, and the overlooked candidates spaced among themselves, flagged,
    # all in C order.
    peaks, overlooked = find_peaks(values, half_widths=half, reach=PeakReach(ratio, spacing, 1e3),
                                   return_overlooked=True)
    dropped = candidates[~np.asarray(reference)]
    np.testing.assert_array_equal(peaks[~overlooked], kept[space_candidates(kept, half)])
    np.testing.assert_array_equal(peaks[overlooked], dropped[space_candidates(dropped, half)])
    order = np.ravel_multi_index(tuple(peaks.T), shape)
    assert overlooked.any() and (np.diff(order) > 0).all()


@pytest.mark.parametrize("shape, count, seed", [((160, 160), 50, 3), ((64, 64, 64), 60, 1)])
def test_memory_bench_steps_are_the_pipeline_with_its_defaults(shape, count, seed):
    """bench.memory profiles `separate` step by step: its steps, run in turn, give separate's labels (with the
    neck, nearby and reach defaults; in 3D this volume has a sphere that the reach keeps in one piece)."""
    import math

    from bench.memory import stage_steps
    from cpu_fallback import separate
    from gpu_pipeline.synthetic import make_touching_particles

    image, _ = make_touching_particles(shape, count, radius_range=(5, 11), seed=seed)
    state = {"image": image}
    for _, step in stage_steps(spacing=(1.0,) * len(shape), both_variants=False):
        step(state)
    min_size = math.pi * 4.0 ** len(shape) / (6 if len(shape) == 3 else 4)
    np.testing.assert_array_equal(state["final"], separate(image, sigma=1.0, min_distance=4.0, min_size=min_size,
                                                           max_hole_size=0))
