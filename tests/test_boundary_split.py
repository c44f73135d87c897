"""The boundary-guided split (gpu_pipeline.stages.boundary_split) against ground truth and scikit-image."""
import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from gpu_pipeline._backend import DeclumpError
from gpu_pipeline.metrics import evaluate
from gpu_pipeline.stages.boundary_split import (SEED_THRESHOLD, boundary_seeds, boundary_split, drop_small_particles,
                                               typical_size)


def packed_cells(rng, shape=(160, 200), spacing=28):
    """Close-packed particles with no neck: Voronoi cells of a jittered grid of points, the whole cells
    whose point lies in a central ellipse (one blob).

    Returns ground-truth labels, the blob and a noisy boundary probability
    that is high on the lines between touching cells (what a trained boundary
    class gives).
    """
    centres = np.stack(np.meshgrid(np.arange(spacing / 2, shape[0], spacing), np.arange(spacing / 2, shape[1], spacing),
                                   indexing="ij"), axis=-1).reshape(-1, 2)
    points = centres + rng.uniform(-spacing / 5, spacing / 5, centres.shape)
    grid = np.indices(shape).reshape(2, -1).T
    nearest = np.argmin(((grid[:, None, :] - points[None]) ** 2).sum(-1), axis=1).reshape(shape)
    inside = ((points[:, 0] - shape[0] / 2) / (shape[0] * 0.4)) ** 2 + ((points[:, 1] - shape[1] / 2) / (shape[1] * 0.4)) ** 2 < 1
    blob = inside[nearest]
    truth = np.where(blob, nearest + 1, 0)
    edge = (ndi.maximum_filter(truth, 3) != truth) | (ndi.minimum_filter(np.where(blob, truth, 10**6), 3) != truth)
    edge &= blob
    boundary = np.clip(ndi.gaussian_filter(edge.astype(np.float32), 1.0) * 2.5 + rng.normal(0, 0.08, shape), 0, 1)
    return truth, blob, boundary.astype(np.float32)


def test_split_recovers_packed_cells_that_geometry_cannot(rng):
    truth, blob, boundary = packed_cells(rng)
    labels = boundary_split(blob, boundary, min_seed_size=10)
    scores = evaluate(labels, truth)
    # The whole blob is one connected component with no neck: geometry alone gives one object.
    assert ndi.label(blob)[1] == 1
    assert scores["n_pred"] == scores["n_gt"]
    assert scores["f1"][scores["iou_thresholds"].index(0.8)] == 1.0
    assert labels.dtype == np.int32 and set(np.unique(labels[blob])) == set(range(1, int(labels.max()) + 1))


def test_split_equals_scikit_image_watershed_from_interior_seeds(rng):
    shape = (90, 110)
    foreground = ndi.gaussian_filter(rng.random(shape), 4) > 0.5
    interior = rng.random(shape).astype(np.float32)
    boundary = rng.random(shape).astype(np.float32)
    labels = boundary_split(foreground, boundary, interior=interior, threshold=0.7, smoothing=0, min_seed_size=0,
                            min_relative_seed_size=0, min_relative_size=0)
    markers, n = ndi.label((interior > 0.7) & foreground)
    regions, n_regions = ndi.label(foreground)
    unseeded = np.setdiff1d(np.arange(1, n_regions + 1), regions[markers > 0])
    for k, region in enumerate(unseeded, start=n + 1):
        markers[regions == region] = k
    reference = watershed(boundary, markers, mask=foreground, connectivity=1)
    # The same partition (ids may differ): a one-to-one map between labels.
    pairs = np.unique(np.stack([labels[foreground], reference[foreground]]), axis=1)
    assert pairs.shape[1] == len(np.unique(labels[foreground])) == len(np.unique(reference[foreground]))
    assert np.array_equal(labels > 0, foreground)


def test_foreground_without_a_confident_interior_stays_whole(rng):
    foreground = np.zeros((60, 60), bool)
    foreground[5:25, 5:25] = True
    foreground[35:55, 35:55] = True
    interior = np.zeros(foreground.shape, np.float32)
    interior[8:22, 8:13] = 0.9
    interior[8:22, 17:22] = 0.9
    boundary = np.full(foreground.shape, 0.5, np.float32)
    markers, n = boundary_seeds(foreground, interior, spacing=(1.0, 1.0), smoothing=0, min_seed_size=4)
    assert n == 3
    labels = boundary_split(foreground, boundary, interior=interior, smoothing=0, min_seed_size=4)
    assert labels.max() == 3
    assert len(np.unique(labels[35:55, 35:55])) == 1 and labels[40, 40] > 0


def test_small_seeds_are_dropped_by_physical_size(rng):
    foreground = np.ones((40, 40), bool)
    interior = np.zeros(foreground.shape, np.float32)
    interior[5:8, 5:8] = 1  # 9 px
    interior[20:30, 20:30] = 1  # 100 px
    # Pixels of 2 x 2 units: 9 px are 36 units^2, under a 50 units^2 minimum; 100 px are 400.
    _, n = boundary_seeds(foreground, interior, spacing=(2.0, 2.0), smoothing=0, min_seed_size=50,
                          min_relative_seed_size=0)
    assert n == 1
    _, n = boundary_seeds(foreground, interior, spacing=(1.0, 1.0), smoothing=0, min_seed_size=5,
                          min_relative_seed_size=0)
    assert n == 2
    # Relative to the typical seed (100 px, the size of the seed a random seed pixel is in): 9 px is under 0.2 x.
    _, n = boundary_seeds(foreground, interior, spacing=(1.0, 1.0), smoothing=0, min_seed_size=0,
                          min_relative_seed_size=0.2)
    assert n == 1
    _, n = boundary_seeds(foreground, interior, spacing=(1.0, 1.0), smoothing=0, min_seed_size=0,
                          min_relative_seed_size=0.05)
    assert n == 2


def touching_discs(rng, radius, shape=(200, 260)):
    """A row of touching discs of ``radius`` (each overlapping the next by a fifth of its diameter) and
    what a trained classifier gives on them: noisy interior and boundary probabilities, with specks of
    false interior on the contact lines (the noise that over-splits large particles)."""
    step = 1.6 * radius
    centres = [(shape[0] / 2 + rng.uniform(-1, 1), radius + 4 + k * step) for k in range(int((shape[1] - 2 * radius - 8)
                                                                                            // step) + 1)]
    rows, cols = np.indices(shape)
    distance = np.stack([np.hypot(rows - r, cols - c) for r, c in centres])
    truth = np.where(distance.min(0) <= radius, distance.argmin(0) + 1, 0).astype(np.int32)
    fg = truth > 0
    contact = fg & ((ndi.maximum_filter(truth, 3) != truth) | (ndi.minimum_filter(np.where(fg, truth, 99), 3) != truth))
    boundary = np.clip(ndi.gaussian_filter(contact.astype(np.float32), 1.0) * 3 + rng.normal(0, 0.05, shape), 0, 1)
    interior = np.clip(ndi.gaussian_filter((fg & ~ndi.binary_dilation(contact, iterations=max(1, radius // 4)))
                                           .astype(np.float32), 1.0) + rng.normal(0, 0.05, shape), 0, 1)
    specks = np.flatnonzero(contact)[rng.choice(int(contact.sum()), 6, replace=False)]
    for r, c in zip(*np.unravel_index(specks, shape)):
        interior[r - 1:r + 2, c - 1:c + 2] = 1.0  # 3 x 3 specks of confident interior between two discs
    return truth, fg, boundary.astype(np.float32), interior.astype(np.float32)


def test_relative_seed_size_follows_the_particle_scale_where_a_fixed_size_cannot(rng):
    """Small and large touching discs, each image with specks of false interior: seeds relative to the typical
    seed split both exactly. A fixed seed size fit for one scale fails the other: none keeps the large discs'
    specks (each a false particle), a fifth of the large discs' typical seed drops the small discs' seeds (they
    merge). The final size filter is off to test the seed rule alone."""
    for radius in (6, 30):
        truth, fg, boundary, interior = touching_discs(rng, radius)
        labels = boundary_split(fg, boundary, interior=interior, smoothing=0, min_seed_size=0,
                                min_relative_seed_size=0.2, min_relative_size=0)
        scores = evaluate(labels, truth)
        assert scores["n_pred"] == scores["n_gt"] >= 5 and scores["f1_50"] == 1.0, radius
    small, large = touching_discs(rng, 6), touching_discs(rng, 30)
    large_seed = typical_size(ndi.label((large[3] > SEED_THRESHOLD) & large[1])[0])
    for fixed, fails in ((0, large), (0.2 * large_seed, small)):
        truth, fg, boundary, interior = fails
        labels = boundary_split(fg, boundary, interior=interior, smoothing=0, min_seed_size=fixed,
                                min_relative_seed_size=0, min_relative_size=0)
        assert evaluate(labels, truth)["n_pred"] != truth.max(), fixed


def test_relative_seed_rule_equals_scikit_image_watershed_from_the_kept_seeds(rng):
    truth, fg, boundary, interior = touching_discs(rng, 12)
    labels = boundary_split(fg, boundary, interior=interior, smoothing=0, min_seed_size=0, min_relative_seed_size=0.3,
                            min_relative_size=0)
    markers, n = ndi.label((interior > 0.5) & fg)
    sizes = np.bincount(markers.ravel())
    per_pixel = np.sort(sizes[markers[markers > 0]])  # the seed size a random seed pixel is in
    typical = per_pixel[int(np.ceil(per_pixel.size / 2)) - 1]
    kept = sizes >= 0.3 * typical
    kept[0] = False
    assert not kept[1:].all()  # the specks are there and get dropped
    markers, n = ndi.label(kept[markers])
    regions, n_regions = ndi.label(fg)
    for k, region in enumerate(np.setdiff1d(np.arange(1, n_regions + 1), regions[markers > 0]), start=n + 1):
        markers[regions == region] = k
    reference = watershed(boundary, markers, mask=fg, connectivity=1)
    pairs = np.unique(np.stack([labels[fg], reference[fg]]), axis=1)
    assert pairs.shape[1] == len(np.unique(labels[fg])) == len(np.unique(reference[fg]))


def test_typical_size_is_the_median_particle_size_over_voxels(rng):
    labels = rng.integers(0, 60, (120, 90))
    labels[labels > 40] = 1  # two large particles among many specks
    labels[(labels > 30) & (labels <= 40)] = 2
    sizes = np.bincount(labels.ravel())
    per_voxel = np.sort(sizes[labels[labels > 0]])
    assert typical_size(labels) == per_voxel[int(np.ceil(per_voxel.size / 2)) - 1]
    kept = drop_small_particles(labels, 0.1)
    small = sizes < 0.1 * typical_size(labels)
    small[0] = False
    assert small.any() and not small.all()
    assert np.array_equal(kept, np.where(small[labels], 0, labels))


@pytest.mark.parametrize("bad, match", [
    (dict(foreground=np.ones((10, 10), np.uint8)), "bool mask"),
    (dict(boundary=np.ones((10, 11), np.float32)), "differs"),
    (dict(boundary=np.ones((10, 10), np.int32)), "floating-point"),
    (dict(spacing=(1.0, 0.0)), "positive"),
])
def test_bad_input_is_one_line_error(bad, match):
    args = dict(foreground=np.ones((10, 10), bool), boundary=np.zeros((10, 10), np.float32))
    args.update(bad)
    with pytest.raises(DeclumpError, match=match) as info:
        boundary_split(args.pop("foreground"), args.pop("boundary"), **args)
    assert "\n" not in str(info.value)


@pytest.mark.gpu
def test_gpu_split_equals_cpu(rng):
    cp = pytest.importorskip("cupy")
    from gpu_pipeline._backend import gpu_available

    if not gpu_available():
        pytest.skip("no CUDA device")
    truth, blob, boundary = packed_cells(rng)
    cpu = boundary_split(blob, boundary)
    gpu = boundary_split(cp.asarray(blob), cp.asarray(boundary))
    assert np.array_equal(cp.asnumpy(gpu), cpu)


def test_shipped_em_model_loads_by_name_with_a_boundary_class():
    from importlib import resources

    from gpu_pipeline.classifier import load_classifier

    model = load_classifier("em-particles")
    assert model.classes == ("background", "particle", "boundary") and model.ndim == 2
    size = resources.files("gpu_pipeline.models").joinpath("em-particles.npz").stat().st_size
    assert size < 5e6


def test_shipped_em_model_finds_particles_but_not_scale_bar_or_text(shared_data):
    """A real EMPS image with a drawn scale bar, "50 nm" and a panel letter: no particle on them."""
    from PIL import Image, ImageDraw, ImageFont

    from gpu_pipeline.io import read_image
    from gpu_pipeline.pipeline import separate

    folder = shared_data / "emps_subset"
    name = "7ea28e7e54"  # 42 particles, none in the corners drawn on
    image = read_image(folder / "images" / f"{name}.png")[0]
    truth = read_image(folder / "segmaps" / f"{name}.png")[0]
    # Annotations contrast with the background, as particles do.
    ink = 255 if image[truth == 0].mean() < 128 else 0
    picture = Image.fromarray(image.copy())
    draw = ImageDraw.Draw(picture)
    rows, cols = image.shape
    bar = (cols - 170, rows - 40, cols - 40, rows - 30)
    draw.rectangle(bar, fill=ink)
    draw.text((cols - 150, rows - 80), "50 nm", fill=ink, font=ImageFont.load_default(size=28))
    draw.text((12, 8), "a", fill=ink, font=ImageFont.load_default(size=40))
    annotated = np.asarray(picture)
    drawn = annotated != image
    labels = separate(annotated, classifier="em-particles")
    clean = separate(image, classifier="em-particles")
    # The annotations add no particle: every label on a drawn pixel was there without the drawing, and
    # the particles elsewhere are found as well as without them.
    assert drawn.sum() > 1000
    on_drawing = np.unique(labels[drawn & (truth == 0)])
    assert set(on_drawing) <= {0}, on_drawing
    assert evaluate(labels, truth)["f1_50"] >= evaluate(clean, truth)["f1_50"] - 0.05
