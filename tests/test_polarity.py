"""The ``auto`` polarity: particles crowded to the frame, the mirror case, chunked equality, nuclei unchanged."""
import numpy as np
import pytest
from scipy import ndimage as ndi

from cpu_fallback import separate
from gpu_pipeline._backend import DeclumpError
from gpu_pipeline.metrics import evaluate
from gpu_pipeline.stages.threshold import (border_fraction, border_fraction_above, choose_polarity,
                                           largest_component_share, otsu_threshold, polarity_score)
from gpu_pipeline.synthetic import make_touching_particles


def crowded_to_the_frame(rng, polarity, shape=(200, 232), pitch=24):
    """Separate round particles on a jittered grid whose rows and columns the frame cuts through.

    The particles cover most of the image's border (so the background is not what covers most of it) and
    about two thirds of the image; the film between them is one connected piece. Returns the image (film
    0.7, particles 0.25 for dark ones; the mirror for bright ones, with noise) and the true labels.
    """
    rows = np.arange(rng.integers(4, 8), shape[0] + pitch, pitch)
    cols = np.arange(rng.integers(4, 8), shape[1] + pitch, pitch)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    truth = np.zeros(shape, np.int32)
    for r in rows:
        for c in cols:
            cy, cx = r + rng.uniform(-1, 1), c + rng.uniform(-1, 1)
            truth[(yy - cy) ** 2 + (xx - cx) ** 2 <= rng.uniform(9.5, 10.5) ** 2] = truth.max() + 1
    inside = truth > 0
    image = np.where(inside, 0.25, 0.7) if polarity == "dark" else np.where(inside, 0.75, 0.3)
    image = ndi.gaussian_filter(image, 1.0) + rng.normal(0, 0.03, shape)
    return image.astype(np.float32), truth


@pytest.mark.parametrize("polarity", ["dark", "bright"])
def test_particles_crowded_to_the_frame_get_their_polarity(rng, polarity):
    image, truth = crowded_to_the_frame(rng, polarity)
    t = otsu_threshold(image)
    particles_on_border = border_fraction_above(image, t) if polarity == "bright" else 1 - border_fraction_above(image, t)
    assert particles_on_border > 0.5  # the rule "background covers most of the border" picks the other side
    assert choose_polarity(image, t, "auto") == polarity
    labels, details = separate(image, return_details=True)
    assert details.polarity == polarity
    assert evaluate(labels, truth)["f1_50"] > 0.9


@pytest.mark.parametrize("polarity", ["dark", "bright"])
def test_sparse_particles_keep_their_polarity(rng, polarity):
    image, _ = make_touching_particles((160, 160), 12, polarity=polarity, seed=int(rng.integers(1e6)))
    assert choose_polarity(image, otsu_threshold(image), "auto") == polarity


def test_polarity_skips_the_labellings_only_where_they_cannot_change_the_pick(rng):
    """choose_polarity equals the sign of the full score (both labellings computed) on images from a clear frame
    to particles everywhere, and labels only where the border term alone does not decide."""
    skipped = 0
    for trial in range(40):
        shape = (int(rng.integers(30, 90)), int(rng.integers(30, 90)))
        image = ndi.gaussian_filter(rng.random(shape), rng.uniform(0.5, 3))
        frame = int(rng.integers(0, 8))
        if frame:  # a dark or bright frame around some images: the border term decides there
            ring = np.ones(shape, bool)
            ring[frame:-frame, frame:-frame] = False
            image[ring] = rng.choice([image.min(), image.max()])
        t = otsu_threshold(image)
        above = image > t
        full = polarity_score(above.mean(), border_fraction_above(image, t), largest_component_share(above),
                              largest_component_share(~above))
        calls = []

        def counting(mask):
            calls.append(1)
            return largest_component_share(mask), largest_component_share(~mask)

        picked = choose_polarity(image, t, "auto", largest_shares=counting)
        if full != 0:
            assert picked == ("bright" if full > 0 else "dark")
        skipped += not calls
    assert 0 < skipped < 40  # both branches ran


def test_largest_component_share_equals_scipy(rng):
    mask = rng.random((60, 70)) > 0.55
    labels, n = ndi.label(mask)
    sizes = np.bincount(labels.ravel())[1:]
    assert largest_component_share(mask) == pytest.approx(sizes.max() / sizes.sum())
    assert largest_component_share(np.zeros((5, 5), bool)) == 0.0


def test_chunked_shares_of_both_sides_equal_in_memory(rng):
    da = pytest.importorskip("dask.array")
    from gpu_pipeline.chunked.foreground import largest_component_shares_chunked
    from gpu_pipeline.stages.threshold import largest_component_shares

    for shape, chunks in (((60, 70), (25, 30)), ((20, 24, 28), (7, 24, 10))):
        for fraction in (0.3, 0.55, 0.8, 1.0):
            above = rng.random(shape) > fraction  # 1.0: one side empty
            assert largest_component_shares_chunked(da.from_array(above, chunks=chunks)) == \
                largest_component_shares(above)


def test_chunked_polarity_equals_in_memory_on_crowded_particles(rng, tmp_path):
    da = pytest.importorskip("dask.array")
    from cpu_fallback import ops
    from gpu_pipeline.chunked.foreground import regions_chunked
    from gpu_pipeline.chunked.workspace import Workspace

    for polarity in ("dark", "bright"):
        image, _ = crowded_to_the_frame(rng, polarity, shape=(120, 136))
        smoothed = ops.gaussian(image, (1.0, 1.0))
        t = otsu_threshold(smoothed)
        for chunks in ((40, 50), (120, 30)):
            _, _, threshold, side = regions_chunked(da.from_array(image, chunks=chunks), spacing=(1.0, 1.0),
                                                    sigma=1.0, workspace=Workspace(tmp_path / f"{polarity}{chunks}"))
            assert (threshold, side) == (t, choose_polarity(smoothed, t, "auto")) == (t, polarity)


@pytest.mark.parametrize("shape, chunkings", [((37, 41), [(37, 41), (10, 41), (13, 7)]),
                                               ((9, 23, 17), [(9, 23, 17), (4, 23, 6), (9, 5, 17)]),
                                               ((1, 30, 20), [(1, 7, 20), (1, 30, 6)])])
def test_chunked_polarity_statistics_come_exactly_from_the_sides_pass(rng, shape, chunkings):
    """The fraction above the threshold and on the border (every face counted on its own, a one-layer axis's
    twice) that the pass labelling both sides counts equal the in-memory ones, for any chunking."""
    da = pytest.importorskip("dask.array")
    from gpu_pipeline.chunked.foreground import ABOVE, polarity_statistics, side_components_chunked

    image = rng.random(shape).astype(np.float32)
    image[tuple(rng.integers(0, n) for n in shape)] = np.nan  # NaN is below any threshold, in both
    t = float(rng.uniform(0.2, 0.8))
    for band in (False, True):
        if band:  # the last layer of axis 0 wholly above a threshold that 85 % of the border lies below
            t = 0.85
            image[-1] = 1.0
        expected = (float((image > t).mean()), border_fraction_above(image, t))
        for chunks in chunkings:
            found = side_components_chunked(da.from_array(image, chunks=chunks) > t, border_value=ABOVE)
            assert polarity_statistics(found) == expected, chunks
        if band and shape[0] > 1:  # the band's face is left out, the others pooled (a one-layer axis: all band)
            others = [image[0]] + [np.take(image, i, axis=a) for a in range(1, image.ndim) for i in (0, -1)]
            assert expected[1] == pytest.approx(sum((f > t).sum() for f in others) / sum(f.size for f in others))


@pytest.mark.parametrize("polarity", ["dark", "bright"])
def test_chunked_polarity_needs_no_pass_of_its_own(rng, tmp_path, polarity):
    """At Otsu's threshold the chunked polarity comes from the pass that labels both sides, which also gives
    the foreground's components: the smoothed volume is read by the histogram and that pass, no labelling of
    the foreground of its own, whichever evidence decides; the pick is the in-memory one."""
    da = pytest.importorskip("dask.array")
    from cpu_fallback import ops
    from gpu_pipeline.chunked.foreground import regions_chunked
    from gpu_pipeline.chunked.workspace import Workspace

    yy, xx = np.mgrid[:90, :100]
    centres = [(y, x) for y in range(17, 80, 15) for x in range(17, 90, 15)]  # a field of disks, a clear frame
    disks = np.any([(yy - y) ** 2 + (xx - x) ** 2 <= 8 ** 2 for y, x in centres], axis=0)
    image = ((disks if polarity == "bright" else ~disks) * 100 + rng.normal(0, 10, disks.shape)).astype(np.float32)
    smoothed = ops.gaussian(image, (1.0, 1.0))
    t = otsu_threshold(smoothed)
    assert abs((smoothed > t).mean() - border_fraction_above(smoothed, t)) > 1 / 3  # the border decides alone
    workspace = Workspace(tmp_path / polarity)
    _, _, threshold, side = regions_chunked(da.from_array(image, chunks=(30, 45)), spacing=(1.0, 1.0), sigma=1.0,
                                            workspace=workspace)
    assert (threshold, side) == (t, choose_polarity(smoothed, t, "auto")) == (t, polarity)
    assert sorted(workspace.computed) == ["regions", "sides", "smoothed"]


def test_border_fraction_leaves_out_a_face_wholly_on_the_other_side_of_the_median():
    # Four faces of 10, 10, 20, 20 voxels: the second wholly above while the median (0.15) is far below.
    assert border_fraction([1, 10, 2, 4], [10, 10, 20, 20]) == pytest.approx(7 / 50)
    # Wholly below beside a median below 1/2: the background's own face, kept (the band beside it is not).
    assert border_fraction([0, 10, 2, 4], [10, 10, 20, 20]) == pytest.approx(6 / 50)
    # Two faces of each: the median is 1/2, no band.
    assert border_fraction([0, 0, 20, 20], [10, 10, 20, 20]) == pytest.approx(40 / 60)
    # One edge wholly below and the opposite one wholly above, the median about 1/2: a ramp; all pooled.
    assert border_fraction([9, 11, 0, 20], [20, 20, 20, 20]) == pytest.approx(40 / 80)
    # Six faces of a volume, one wholly below while the rest are mostly above (a dark strip of padding).
    assert border_fraction([9, 0, 8, 9, 10, 7], [10] * 6) == pytest.approx(43 / 50)


@pytest.mark.parametrize("polarity", ["dark", "bright"])
def test_an_information_band_along_one_edge_does_not_decide_the_polarity(rng, polarity):
    """A microscope's data bar along the bottom edge, on the particles' side of the threshold (dark particles
    and a black bar, bright ones and a white bar) and as wide as the image: pooled with the other faces it
    made the border look like particles (the side picked on 3 of 12 seeds of the scale-bar test)."""
    image, truth = make_touching_particles((200, 240), 25, polarity=polarity, seed=int(rng.integers(1e6)))
    bar = 0 if polarity == "dark" else 255
    image[176:], truth[176:] = bar, 0
    image[184:192, 20:90] = 255 - bar  # the bar's text and scale, the other way
    t = otsu_threshold(image)
    faces = [(np.take(image, i, axis=a) > t).mean() for a in range(2) for i in (0, -1)]
    assert faces[1] == (polarity == "bright") and abs(faces[1] - np.median(faces)) > 0.5
    assert choose_polarity(image, t, "auto") == polarity
    # Pooled, the bottom edge counts as a quarter of the border: the border term points the other way.
    pooled = sum((np.take(image, i, axis=a) > t).sum() for a in range(2) for i in (0, -1)) / (2 * sum(image.shape))
    assert (pooled > (image > t).mean()) == (polarity == "bright")


def particles_lining_the_frame(rng, shape=(240, 260), pitch=40, radius=11):
    """Bright particles cut in half by all four edges of the frame, a few whole ones inside, on a dark film."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    centres = [(0, c) for c in range(20, shape[1], pitch)] + [(shape[0] - 1, c) for c in range(20, shape[1], pitch)]
    centres += [(r, 0) for r in range(40, shape[0] - 30, pitch)] + [(r, shape[1] - 1) for r in range(40, shape[0] - 30, pitch)]
    centres += [(80, 90), (150, 170), (120, 60)]
    truth = np.zeros(shape, np.int32)
    for cy, cx in centres:
        truth[(yy - cy - rng.uniform(-1, 1)) ** 2 + (xx - cx - rng.uniform(-1, 1)) ** 2 <= radius ** 2] = truth.max() + 1
    image = ndi.gaussian_filter(np.where(truth > 0, 0.8, 0.3), 1.0) + rng.normal(0, 0.03, shape)
    return image.astype(np.float32), truth


def test_a_side_whose_filled_holes_cover_the_image_is_the_background(rng):
    image, truth = particles_lining_the_frame(rng)
    # The border evidence points at the film (the particles line the frame), the film's holes are the particles:
    assert choose_polarity(image, otsu_threshold(image), "auto") == "dark"
    labels, details = separate(image, return_details=True)
    assert details.polarity == "bright"
    assert evaluate(labels, truth)["f1_50"] > 0.9
    with pytest.raises(DeclumpError, match="covers the whole image"):
        separate(image, polarity="dark")


@pytest.mark.gpu
def test_polarity_on_the_gpu_equals_the_cpu(rng):
    from gpu_pipeline._backend import gpu_available

    cp = pytest.importorskip("cupy")
    if not gpu_available():
        pytest.skip("needs CuPy and a CUDA device")
    for polarity in ("dark", "bright"):
        image, _ = crowded_to_the_frame(rng, polarity)
        t = otsu_threshold(image)
        mask = image > t
        assert largest_component_share(cp.asarray(mask)) == largest_component_share(mask)
        assert choose_polarity(cp.asarray(image), t, "auto") == choose_polarity(image, t, "auto") == polarity


@pytest.mark.parametrize("name, least", [("5fc8c5b53c", 0.7), ("2ee0518d7a", 0.8)])
def test_close_packed_spheres_take_the_side_whose_particles_are_convex(shared_data, name, least):
    """Two EMPS frames of bright spheres packed edge to edge: the border and connectivity rule takes their
    thin dark gaps for the particles (many small pieces, the spheres one connected piece), F1@0.5 0.005 and 0.
    The other side is separated too, and its particles are far more convex (solidity 0.94-0.97 against the
    gaps' 0.82-0.83), so it is taken."""
    from gpu_pipeline.io import read_image
    from gpu_pipeline.pipeline import _BY_SHAPE

    image = read_image(shared_data / "emps_train_rest" / "images" / f"{name}.png")[0]
    truth = read_image(shared_data / "emps_train_rest" / "segmaps" / f"{name}.png")[0]
    token = _BY_SHAPE.set(True)  # the rule alone
    try:
        alone, said = separate(image, return_details=True)
    finally:
        _BY_SHAPE.reset(token)
    assert said.polarity == "dark" and evaluate(alone, truth)["f1_50"] < 0.05
    labels, details = separate(image, return_details=True)
    assert details.polarity == "bright" and evaluate(labels, truth)["f1_50"] >= least
    assert details.polarity_solidity["bright"] > details.polarity_solidity["dark"] + 0.1
    assert np.array_equal(labels, separate(image, polarity="bright"))


@pytest.mark.parametrize("polarity", ["bright", "dark"])
def test_the_other_sides_shape_changes_nothing_where_the_rule_is_right(rng, polarity):
    """Touching round particles of either polarity: the rule picks their side and the other side's pieces
    (the film between them) are less convex, so the result is the rule's, labels and all."""
    from gpu_pipeline.pipeline import _BY_SHAPE

    image, truth = make_touching_particles((256, 256), 90, polarity=polarity, seed=int(rng.integers(1e6)))
    labels, details = separate(image, return_details=True)
    token = _BY_SHAPE.set(True)
    try:
        alone = separate(image)
    finally:
        _BY_SHAPE.reset(token)
    assert details.polarity == polarity and np.array_equal(labels, alone)
    assert details.polarity_solidity is None or details.polarity_solidity[polarity] > 0.85
    assert evaluate(labels, truth)["f1_50"] > 0.6  # (the defaults on this generated set: 0.77-0.84)


def test_shape_solidity_is_the_area_weighted_solidity_of_scikit_image(rng):
    from skimage.measure import label, regionprops

    from gpu_pipeline.stages.threshold import POLARITY_MIN_PIECE, shape_solidity

    labels = label(ndi.binary_opening(rng.random((120, 140)) < 0.45))
    props = [p for p in regionprops(labels) if p.area >= POLARITY_MIN_PIECE]
    area = np.array([p.area for p in props], float)
    want = (area * np.array([p.solidity for p in props])).sum() / area.sum()
    got, pieces = shape_solidity(labels)
    assert pieces == len(props) and got == pytest.approx(want, rel=1e-12)
