"""Outlines at the steepest point of the particles' edges (stages/outline.py, separate's ``outline``), against
the true discs that made the images."""
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.measure import label as sk_label

from gpu_pipeline import separate
from gpu_pipeline._backend import DeclumpError
from gpu_pipeline.stages.outline import OUTLINE_MAX_STEP, edge_outlines
from gpu_pipeline.synthetic import make_touching_particles


def _discs(rng, levels, shape=(120, 240), blur=2.5, noise=1.0):
    """An image of discs (one per level, 20 on a background of 20) blurred by ``blur``, and their true masks."""
    grids = np.indices(shape, dtype=float)
    image = np.full(shape, 20.0)
    truths = []
    for k, level in enumerate(levels):
        centre = (rng.uniform(45, shape[0] - 45), rng.uniform(20, 40) + k * shape[1] / len(levels))
        radius = rng.uniform(10, 16)
        disc = np.sqrt(sum((g - c) ** 2 for g, c in zip(grids, centre))) <= radius
        image[disc] = level
        truths.append(disc)
    image = ndi.gaussian_filter(image, blur) + rng.normal(0, noise, shape)
    return image.astype(np.float32), truths


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_a_dim_particles_outline_moves_out_to_its_edge_and_a_bright_ones_in(rng):
    """A threshold of 65 between a background of 20, a dim disc of 80 and a bright one of 400 (soft edges, sigma
    2.5): the dim disc's contour lies 1-2 px inside its edge (65 is three quarters up its ramp), the bright
    one's about 3 px outside (an eighth up). ``edge`` moves the dim disc's outline out and the bright one's in
    (by one ring at most), each closer to its true disc."""
    image, (dim, bright) = _discs(rng, (80.0, 400.0))
    kept, details = separate(image, threshold=65.0, outline="threshold", return_details=True)
    moved, moved_details = separate(image, threshold=65.0, outline="edge", return_details=True)
    assert kept.max() == moved.max() == 2 and details.outlines_moved == 0 and moved_details.outlines_moved == 2
    for disc, outward in ((dim, True), (bright, False)):
        before, after = kept == kept[disc].max(), moved == moved[disc].max()
        assert (after.sum() > before.sum()) == outward and (before.sum() < disc.sum()) == outward
        assert _iou(after, disc) > _iou(before, disc) + 0.03
    lost = (kept > 0) & (moved == 0)
    assert lost.any() and ndi.distance_transform_cdt(kept > 0, metric="chessboard")[lost].max() == 1


def test_a_step_edge_thresholded_at_its_midpoint_keeps_its_outline(rng):
    """Discs of one level thresholded half way up their (blurred) edges: the contour is at the steepest point
    already, the rings on either side about equally steep, and no outline moves."""
    for _ in range(3):
        image, _ = _discs(rng, (120.0, 120.0, 120.0), blur=rng.uniform(1.0, 2.5))
        labels, details = separate(image, threshold=70.0, outline="edge", return_details=True)
        assert details.outlines_moved == 0
        assert np.array_equal(labels, separate(image, threshold=70.0, outline="threshold"))


def test_edge_outlines_join_no_particles_and_move_at_most_the_rings(rng):
    """Touching particles thresholded high on their edges (140 of 255, the particles at 0.6-1.0 of the range on
    0.15), with no margin at all (every ring steeper than the outline is taken): the same particles, each one
    face-connected piece (scikit-image's labelling), each holding all its pixels from before, grown by at most
    OUTLINE_MAX_STEP pixels (chessboard distance), and no pixel whose 3x3 box held two particles before
    taken."""
    image, _ = make_touching_particles((160, 160), 40, blur=2.0, intensity_range=(0.6, 1.0),
                                       seed=int(rng.integers(1 << 30)))
    labels, details = separate(image, threshold=140.0, outline="threshold", return_details=True)
    smoothed = ndi.gaussian_filter(image.astype(np.float32), details.sigma, truncate=4.0)
    grown, moved = edge_outlines(labels, smoothed, (1.0, 1.0), margin=0.0, inward=False)
    assert moved > 0 and grown.max() == labels.max()
    assert sk_label(grown, connectivity=1, background=0).max() == grown.max()  # one piece each
    pairs = np.unique(np.stack([labels[labels > 0], grown[labels > 0]]), axis=1)
    assert pairs.shape[1] == labels.max() and np.unique(pairs[1]).size == labels.max()  # a bijection
    new = (grown > 0) & (labels == 0)
    assert new.any()
    reach = ndi.distance_transform_cdt(labels == 0, metric="chessboard")
    assert reach[new].max() <= OUTLINE_MAX_STEP
    between = ndi.maximum_filter(labels, 3) != -ndi.maximum_filter(np.where(labels > 0, -labels, -(1 << 30)), 3)
    assert not (new & between & (reach == 1)).any()


def test_an_outline_taken_inward_never_splits_or_removes_a_particle(rng):
    """Touching particles thresholded low on their edges (60 of 255, the particles at 0.6-1.0 on 0.15), with no
    margin: outlines move inward where the ring inside is steeper, yet every particle stays, one face-connected
    piece, losing only its outermost pixels."""
    image, _ = make_touching_particles((160, 160), 40, blur=2.0, intensity_range=(0.6, 1.0),
                                       seed=int(rng.integers(1 << 30)))
    labels, details = separate(image, threshold=60.0, outline="threshold", return_details=True)
    smoothed = ndi.gaussian_filter(image.astype(np.float32), details.sigma, truncate=4.0)
    shrunk, moved = edge_outlines(labels, smoothed, (1.0, 1.0), margin=0.0, max_step=0)
    assert moved > 0 and shrunk.max() == labels.max()
    assert sk_label(shrunk, connectivity=1, background=0).max() == shrunk.max()
    lost = (labels > 0) & (shrunk == 0)
    assert lost.any() and not ((shrunk > 0) & (labels == 0)).any()
    assert ndi.distance_transform_cdt(labels > 0, metric="chessboard")[lost].max() == 1


def test_a_particle_its_outline_would_cut_in_two_keeps_it():
    """Two particles on intensities that are steepest one ring inside their outlines (0 outside, then 20, 40,
    300, 320 from the outline in): a square sheds its outline; two squares joined by a bridge one pixel wide,
    which would fall in two without it, keep theirs."""
    labels = np.zeros((24, 40), np.int32)
    labels[3:12, 3:12] = 1
    labels[3:12, 20:29] = labels[3:12, 31:40 - 1] = labels[7, 29:31] = 2
    depth = ndi.distance_transform_cdt(labels > 0, metric="chessboard")
    image = np.array([0.0, 20.0, 40.0, 300.0, 320.0])[np.minimum(depth, 4)]
    out, moved = edge_outlines(labels, image, (1.0, 1.0), max_step=0)
    assert moved == 1
    assert np.array_equal(out == out[7, 7], (labels == 1) & (depth > 1))
    assert np.array_equal(out == out[7, 25], labels == 2)


def test_auto_outlines_only_thresholded_2d_images(rng):
    """``auto``: 3D volumes and a given mask keep the threshold's (the mask's) outlines; ``edge`` with a mask
    alone (no image to follow) and unknown values are one-line errors."""
    volume, _ = make_touching_particles((40, 56, 56), 12, blur=2.0, seed=int(rng.integers(1 << 30)))
    assert np.array_equal(separate(volume), separate(volume, outline="threshold"))
    image, truth = make_touching_particles((96, 96), 12, blur=2.0, intensity_range=(0.4, 1.0),
                                           seed=int(rng.integers(1 << 30)))
    mask = truth > 0
    assert np.array_equal(separate(image, mask=mask), separate(image, mask=mask, outline="threshold"))
    with pytest.raises(DeclumpError, match="give the image too"):
        separate(None, mask=mask, outline="edge")
    with pytest.raises(DeclumpError, match="outline must be 'auto', 'edge' or 'threshold'"):
        separate(image, outline="steepest")


def test_chunked_runs_refuse_edge_outlines_in_one_line(tmp_path):
    import zarr

    image = make_touching_particles((48, 48, 48), 20, seed=3)[0]
    zarr.create_array(str(tmp_path / "in.zarr"), shape=image.shape, dtype=image.dtype, chunks=(24, 48, 48))[...] = image
    result = subprocess.run([sys.executable, "-m", "gpu_pipeline", "run", str(tmp_path / "in.zarr"),
                             str(tmp_path / "out.zarr"), "--outline", "edge"], capture_output=True, text=True)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "--outline edge is for images in memory" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.zarr"]


def test_a_ring_pixel_that_touches_its_particle_only_at_a_corner_goes_back_to_the_background():
    """A 3x3 particle on an intensity ramp that is steepest on the first ring around it (0, 100, 300, 300 at
    chessboard distances 0, 1, 2, 3), with the pixels above it and to its right not allowed, except the corner
    between them: the ring elsewhere is taken, the corner pixel, which would join the particle through a
    corner only, is not."""
    labels = np.zeros((13, 13), np.int32)
    labels[5:8, 5:8] = 1
    ramp = np.array([0.0, 100.0, 300.0, 300.0])[np.minimum(ndi.distance_transform_cdt(labels == 0,
                                                                                       metric="chessboard"), 3)]
    allowed = np.ones(labels.shape, bool)
    allowed[4, 4:9] = allowed[4:9, 8] = False
    allowed[4, 8] = True
    grown, moved = edge_outlines(labels, ramp, (1.0, 1.0), allowed=allowed)
    assert moved == 1 and grown[6, 4] == grown[8, 6] == 1 and grown[4, 8] == 0
    assert sk_label(grown, connectivity=1, background=0).max() == 1
    assert (grown > 0).sum() == 9 + 3 + 4  # the left column and the row below (4 with their corner)


def test_edge_outlines_in_3d_move_a_dim_balls_surface_out_to_its_edge(rng):
    """``outline="edge"`` in a volume (26-neighbour rings, spacing in the gradient): a dim ball thresholded
    three quarters up its blurred edge grows toward the true ball; anisotropic spacing too."""
    shape, spacing = (40, 48, 48), (2.0, 1.0, 1.0)
    grids = np.indices(shape, dtype=float) * np.asarray(spacing)[:, None, None, None]
    centre, radius = rng.uniform((30, 20, 20), (50, 28, 28)), rng.uniform(9, 12)
    ball = np.sqrt(sum((g - c) ** 2 for g, c in zip(grids, centre))) <= radius
    image = ndi.gaussian_filter(np.where(ball, 80.0, 20.0), (1.25, 2.5, 2.5)) + rng.normal(0, 1.0, shape)
    kept = separate(image, spacing=spacing, threshold=65.0, sigma=1.0, outline="threshold")
    moved, details = separate(image, spacing=spacing, threshold=65.0, sigma=1.0, outline="edge",
                              return_details=True)
    assert kept.max() == moved.max() == 1 and details.outlines_moved == 1
    assert _iou(moved > 0, ball) > _iou(kept > 0, ball) + 0.05


@pytest.mark.parametrize("shape, spacing, dtype", [((37, 53), (1.0, 1.0), np.float32), ((2, 41), (0.7, 1.3), np.uint8),
                                                   ((9, 14, 11), (2.0, 1.0, 0.5), np.uint16),
                                                   ((30, 31), (1.0, 1.0), np.float64)])
def test_gradient_magnitude_at_some_pixels_equals_numpys_whole_gradient(rng, shape, spacing, dtype):
    """The outlines' gradient magnitude read at some pixels only (edges and corners included, an axis of two
    values: one-sided differences both ways) is NumPy's np.gradient of the whole image, bit for bit."""
    from gpu_pipeline.stages.outline import gradient_magnitude_at

    if np.dtype(dtype).kind == "f":
        image = (rng.normal(0, 50, shape) * 10.0 ** rng.uniform(-3, 3)).astype(dtype)
    else:
        image = rng.integers(0, np.iinfo(dtype).max, shape).astype(dtype)
    whole = np.sqrt(sum(g * g for g in np.gradient(image.astype(np.float32), *spacing))).reshape(-1)
    at = np.unique(np.r_[rng.integers(0, image.size, image.size // 3), 0, image.size - 1, shape[-1] - 1])
    got = gradient_magnitude_at(image, at, spacing)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, whole[at])
    np.testing.assert_array_equal(gradient_magnitude_at(image, np.arange(image.size), spacing), whole)
    assert gradient_magnitude_at(image, np.zeros(0, np.int64), spacing).size == 0
