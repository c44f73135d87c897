"""Metrics against a plain per-object reference; the particle table against scikit-image regionprops."""
import numpy as np
import pytest
from skimage.measure import regionprops

from gpu_pipeline.measure import particle_table
from gpu_pipeline.metrics import IOU_THRESHOLDS, evaluate
from gpu_pipeline.synthetic import make_touching_particles


def reference_scores(pred, gt):
    """Loops over object pairs: IoU, greedy matching per threshold (unique above 0.5)."""
    p_ids = [i for i in np.unique(pred) if i]
    g_ids = [i for i in np.unique(gt) if i]
    iou = np.zeros((len(p_ids), len(g_ids)))
    for a, p in enumerate(p_ids):
        for b, g in enumerate(g_ids):
            inter = np.sum((pred == p) & (gt == g))
            iou[a, b] = inter / np.sum((pred == p) | (gt == g))
    f1 = []
    for t in IOU_THRESHOLDS:
        tp = int(np.sum(iou > t))
        f1.append(2 * tp / (len(p_ids) + len(g_ids)))
    return f1


def test_metrics_equal_the_per_object_reference(rng):
    _, gt = make_touching_particles((96, 96), 20, seed=int(rng.integers(1e6)))
    pred = gt.copy()
    pred[np.isin(pred, [2, 5])] = 2  # a merge
    pred[(pred == 7) & (np.indices(pred.shape)[1] % 2 == 0)] = 99  # a split into stripes
    pred = np.roll(pred, 1, axis=0)  # and a shift
    scores = evaluate(pred, gt)
    np.testing.assert_allclose(scores["f1"], reference_scores(pred, gt))
    assert scores["merges"] >= 1
    assert scores["f1"][0] < 1


def test_perfect_prediction_scores_one_and_split_merge_counts(rng):
    _, gt = make_touching_particles((64, 64), 10, seed=int(rng.integers(1e6)))
    s = evaluate(gt, gt)
    assert s["mean_f1"] == 1 and s["dice"] == 1 and s["splits"] == 0 and s["merges"] == 0
    halves = gt.copy()
    target = int(np.bincount(gt.ravel())[1:].argmax()) + 1
    cols = np.nonzero(gt == target)[1]
    halves[(gt == target) & (np.indices(gt.shape)[1] > np.median(cols))] = gt.max() + 1
    assert evaluate(halves, gt)["splits"] == 1
    assert evaluate(gt, halves)["merges"] == 1


@pytest.mark.parametrize("shape,spacing", [((80, 90), (0.5, 2.0)), ((20, 40, 40), (3.0, 1.0, 1.0))])
def test_particle_table_matches_regionprops(rng, shape, spacing):
    image, labels = make_touching_particles(shape, 15, spacing=spacing, seed=int(rng.integers(1e6)))
    table = particle_table(labels, image, spacing)
    props = regionprops(labels, intensity_image=image, spacing=spacing)
    assert list(table["label"]) == [p.label for p in props]
    axes = ("z", "y", "x")[-len(shape):]
    for row, p in enumerate(props):
        assert table["voxel_count"][row] == p.num_pixels
        np.testing.assert_allclose([table[f"centroid_{a}"][row] for a in axes], p.centroid, rtol=1e-9)
        np.testing.assert_allclose(table["mean_intensity"][row], p.intensity_mean, rtol=1e-9)
        assert tuple(table[f"bbox_min_{a}"][row] for a in axes) + tuple(table[f"bbox_max_{a}"][row] for a in axes) == p.bbox
        size = table["area" if len(shape) == 2 else "volume"][row]
        np.testing.assert_allclose(size, p.area, rtol=1e-9)
