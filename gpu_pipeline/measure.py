"""Per-particle table: size, equivalent diameter, centroid, bounding box, intensity.

Computed from per-label sums (`label_sums` of the backend: one compiled pass on
the CPU, bincounts and scatter reductions on the GPU; no per-object loop), the
same reductions that chunked runs sum over chunks.
"""
from __future__ import annotations

import csv
import math

import numpy as np

from gpu_pipeline._backend import DeclumpError, get_array_module, ops_for, to_host
from gpu_pipeline._common import as_label_image, native_byte_order

AXES = ("z", "y", "x")


def particle_table(labels, image=None, spacing=None):
    """Measurements of every particle in ``labels``.

    Parameters
    ----------
    labels : ndarray of int, 2D or 3D (NumPy or CuPy)
        Instance labels, 0 background.
    image : ndarray, optional
        Intensities for ``mean_intensity``.
    spacing : sequence of float, optional
        Voxel size per axis (physical units); default 1.

    Returns
    -------
    dict of column name -> NumPy array, one row per label present, ordered by id:
        ``label``; ``voxel_count``; ``area`` (2D) or ``volume`` (3D), physical;
        ``equivalent_diameter`` (of the disk/ball with that area/volume);
        ``centroid_<axis>`` (physical); ``bbox_min_<axis>``, ``bbox_max_<axis>``
        (voxel index, max exclusive, as in scikit-image); ``mean_intensity``.
    """
    from gpu_pipeline.pipeline import validate_spacing

    labels = as_label_image(labels)
    if min(labels.shape) < 2:  # (rows, columns, 1) was measured as a volume: centroid_z the row, centroid_x 0
        raise DeclumpError(f"labels have shape {tuple(labels.shape)}, one voxel along an axis; pass 2D labels as "
                           "(rows, columns) and 3D as (planes, rows, columns): drop that axis (e.g. np.squeeze), "
                           "as separate takes the image")
    ndim = labels.ndim
    spacing = validate_spacing(spacing, ndim)
    if image is not None:
        if not hasattr(image, "dtype"):
            image = np.asarray(image)
        if tuple(image.shape) != tuple(labels.shape):
            raise DeclumpError(f"image shape {tuple(image.shape)} differs from labels shape {tuple(labels.shape)}; "
                               "mean_intensity needs the image the labels were made from")
        if np.dtype(image.dtype).kind not in "uifb":
            raise DeclumpError(f"image has dtype {image.dtype}; accepted: integer or floating-point intensities")
        if np.dtype(image.dtype).kind == "f" and not bool(get_array_module(image).isfinite(image).all()):
            raise DeclumpError("image holds NaN or inf values; mean_intensity needs finite intensities (the "
                               "image the labels were made from)")
        image = native_byte_order(image)
    sums = {k: None if v is None else to_host(v) for k, v in ops_for(labels).label_sums(labels, image).items()}
    # Rows by position (0: background), not by id: ids from other tools can be sparse and huge (hashes, tracks).
    ids = sums["label"]
    n = ids.size + 1
    rows = np.arange(1, n)
    counts = np.zeros(n, np.int64)
    total = np.zeros((ndim, n), np.float64)
    low = np.stack([np.full(n, labels.shape[a], dtype=np.int64) for a in range(ndim)])
    high = np.full((ndim, n), -1, dtype=np.int64)
    counts[rows], total[:, rows], low[:, rows], high[:, rows] = sums["count"], sums["sum"], sums["low"], sums["high"]
    intensity = None
    if image is not None:
        intensity = np.zeros(n, np.float64)
        intensity[rows] = sums["intensity"]
    table = table_from_sums(counts, total, low, high, intensity, spacing)
    table["label"] = ids[table["label"] - 1].astype(np.int64)
    return table


def table_from_sums(counts, sums, low, high, intensity, spacing):
    """The particle table from per-label sums indexed by label id (host arrays).

    ``counts`` (n,) voxels; ``sums`` (ndim, n) coordinate sums (index units);
    ``low``/``high`` (ndim, n) smallest/largest coordinate; ``intensity`` (n,)
    summed intensities or None. Chunked runs add these up over chunks first.
    """
    ndim = len(spacing)
    axes = AXES[-ndim:]
    present = np.flatnonzero(counts)
    present = present[present > 0]
    table = {"label": present, "voxel_count": counts[present]}
    size = table["voxel_count"] * math.prod(spacing)
    table["area" if ndim == 2 else "volume"] = size
    table["equivalent_diameter"] = np.sqrt(4 * size / math.pi) if ndim == 2 else np.cbrt(6 * size / math.pi)
    for axis, name in enumerate(axes):
        table[f"centroid_{name}"] = sums[axis, present] / counts[present] * spacing[axis]
    for axis, name in enumerate(axes):
        table[f"bbox_min_{name}"] = low[axis, present]
        table[f"bbox_max_{name}"] = high[axis, present] + 1
    if intensity is not None:
        table["mean_intensity"] = intensity[present] / counts[present]
    return table


def write_csv(table, path):
    """Write a :func:`particle_table` as CSV (header row, one row per particle; floats as they read back)."""
    columns = list(table)
    with open(path, "w", newline="") as handle:
        # Lines end in LF, as pandas writes them (csv's default, CRLF, made the command's CSV and the app's
        # download, read back as text, differ byte for byte).
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(columns)
        for row in zip(*(table[c] for c in columns)):
            # Floats in full (the shortest text that reads back as the same number): 6 significant digits
            # wrote a volume of 359100.5 as 359100 and an area in nm² as 1.52416e+08, unlike the Parquet table.
            writer.writerow([repr(float(v)) if isinstance(v, (float, np.floating)) else int(v) for v in row])


def summary(table, ndim, spacing, details=None):
    """A short dict summary: count, size statistics, and what the run decided."""
    diam = table["equivalent_diameter"]
    out = {
        "n_particles": int(len(table["label"])),
        "spacing": list(spacing),
        "equivalent_diameter_median": float(np.median(diam)) if len(diam) else None,
        "equivalent_diameter_mean": float(np.mean(diam)) if len(diam) else None,
        "equivalent_diameter_min": float(np.min(diam)) if len(diam) else None,
        "equivalent_diameter_max": float(np.max(diam)) if len(diam) else None,
        "foreground_voxels": int(np.sum(table["voxel_count"])),
    }
    if details is not None:
        out.update(threshold=details.threshold, polarity=details.polarity, n_regions=details.n_regions,
                   n_peaks=details.n_peaks, n_iter=details.n_iter,
                   stage_seconds={k: round(v, 4) for k, v in details.timings.items()})
        # What the automatic options chose (in-memory runs; a chunked run's options are all explicit).
        for key in ("threshold_method", "threshold_candidates", "intensity_range", "particle_radius", "sigma",
                    "min_distance", "min_size", "max_hole_size", "annotation_pixels", "info_band", "shell_holes",
                    "pocket_holes", "outlines_moved", "polarity_solidity"):
            if hasattr(details, key):
                value = getattr(details, key)
                out[key] = list(value) if isinstance(value, tuple) else value
    return out
