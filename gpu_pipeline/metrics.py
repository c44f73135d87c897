"""Instance segmentation scores from one joint label histogram (no per-object loops).

Matching at IoU > t for t >= 0.5 is one-to-one (two objects cannot both
overlap a third by more than half its union), so counting pairs above t is the
optimal matching.
"""
from __future__ import annotations

import numpy as np

from gpu_pipeline._backend import DeclumpError, to_host
from gpu_pipeline._common import as_label_image

#: IoU thresholds of the DSB-2018 metric: 0.50, 0.55, ..., 0.95.
IOU_THRESHOLDS = np.round(np.arange(0.5, 0.96, 0.05), 2)


def _dense_ids(labels):
    values, inverse = np.unique(labels, return_inverse=True)
    if values[0] != 0:  # no background voxel: keep 0 reserved for it anyway
        values = np.concatenate([[0], values])
        inverse = inverse + 1
    return inverse.reshape(labels.shape).astype(np.int64), len(values) - 1


def overlap_table(pred, gt):
    """Pairs of overlapping (pred, gt) ids with their voxel counts, and each object's size.

    Returns ``(pairs_pred, pairs_gt, intersection, pred_sizes, gt_sizes)``
    with ids renumbered densely (1..n) and sizes indexed by those ids.
    """
    pred = to_host(as_label_image(pred, "prediction", ndims=(1, 2, 3, 4)))
    gt = to_host(as_label_image(gt, "ground truth", ndims=(1, 2, 3, 4)))
    if pred.shape != gt.shape:
        raise DeclumpError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    p, n_pred = _dense_ids(pred)
    g, n_gt = _dense_ids(gt)
    joint = np.bincount((p * (n_gt + 1) + g).ravel(), minlength=(n_pred + 1) * (n_gt + 1))
    pair = np.flatnonzero(joint)
    pp, gg = pair // (n_gt + 1), pair % (n_gt + 1)
    pred_sizes = np.bincount(p.ravel(), minlength=n_pred + 1)
    gt_sizes = np.bincount(g.ravel(), minlength=n_gt + 1)
    both = (pp > 0) & (gg > 0)
    return pp[both], gg[both], joint[pair][both], pred_sizes, gt_sizes


def evaluate(pred, gt):
    """Scores of a predicted instance label image against ground truth.

    Returns
    -------
    dict with
        ``n_pred``, ``n_gt``;
        ``precision``, ``recall``, ``f1``, ``ap`` (DSB-2018: TP/(TP+FP+FN)),
        each a list over :data:`IOU_THRESHOLDS`;
        ``f1_50``, ``ap_50``, ``mean_f1``, ``mean_ap``;
        ``dice`` of the foregrounds;
        ``splits``: ground-truth objects that are the majority owner of 2+
        predicted objects (each predicted object lies > 50 % inside it);
        ``merges``: predicted objects that own 2+ ground-truth objects (each
        ground-truth object lies > 50 % inside it).

    Both images empty: every score is 1; one of them empty: 0.
    """
    pp, gg, inter, pred_sizes, gt_sizes = overlap_table(pred, gt)
    n_pred, n_gt = len(pred_sizes) - 1, len(gt_sizes) - 1
    union = pred_sizes[pp] + gt_sizes[gg] - inter
    iou = inter / union
    tp = np.array([(iou > t).sum() for t in IOU_THRESHOLDS], dtype=float)
    fp, fn = n_pred - tp, n_gt - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        # Nothing to find and nothing found is a perfect score, every one of them (F1 and AP were 1 there, but
        # precision and recall 0); one side empty and not the other scores 0.
        nothing = 1.0 if n_pred + n_gt == 0 else 0.0
        precision = np.where(n_pred > 0, tp / max(n_pred, 1), nothing)
        recall = np.where(n_gt > 0, tp / max(n_gt, 1), nothing)
        f1 = np.where(n_pred + n_gt > 0, 2 * tp / max(n_pred + n_gt, 1), 1.0)
        ap = np.where(tp + fp + fn > 0, tp / np.maximum(tp + fp + fn, 1), 1.0)
    fg_pred, fg_gt = pred_sizes[1:].sum(), gt_sizes[1:].sum()
    dice = 2 * inter.sum() / (fg_pred + fg_gt) if fg_pred + fg_gt else 1.0
    owned_by_gt = inter * 2 > pred_sizes[pp]
    splits = int((np.bincount(gg[owned_by_gt], minlength=n_gt + 1) >= 2).sum())
    owned_by_pred = inter * 2 > gt_sizes[gg]
    merges = int((np.bincount(pp[owned_by_pred], minlength=n_pred + 1) >= 2).sum())
    return {
        "n_pred": int(n_pred), "n_gt": int(n_gt),
        "iou_thresholds": IOU_THRESHOLDS.tolist(),
        "precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist(), "ap": ap.tolist(),
        "f1_50": float(f1[0]), "ap_50": float(ap[0]), "mean_f1": float(f1.mean()), "mean_ap": float(ap.mean()),
        "dice": float(dice), "splits": splits, "merges": merges,
    }
