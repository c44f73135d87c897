"""Global thresholds of a chunked volume (Otsu, Li, triangle): one histogram reduced over all chunks.

The bins come from the global min and max (a first pass for float data), so
every chunk uses the same layout and the sum equals the whole volume's
histogram: every threshold computed from it is the in-memory one exactly.
"""
from __future__ import annotations

import numpy as np

from gpu_pipeline._backend import to_host
from gpu_pipeline.chunked.source import stored_volume
from gpu_pipeline.stages.threshold import histogram_bins, histogram_thresholds, intensity_histogram


def _block_histogram(block, bins):
    counts, _ = intensity_histogram(block, bins)
    return counts.reshape((1,) * block.ndim + (-1,))


def _boxes_histogram(stored, boxes, bins):
    """The histogram (host counts) of several boxes of a stored volume, each read in turn."""
    total = None
    for box in boxes:
        counts, _ = intensity_histogram(stored.read(box), bins)
        total = to_host(counts) if total is None else total + to_host(counts)
    return total


def _sum(parts):
    return np.sum(parts, axis=0)


def _stored_histogram(stored, chunks, bins):
    """The histogram of a volume read from a store block by block: :data:`BLOCK_GROUP` blocks per task (each
    read and counted in turn), the counts tree-summed on the workers (the client holds one histogram)."""
    from dask import delayed

    from gpu_pipeline.chunked.workspace import BLOCK_GROUP, block_boxes, run_tasks

    boxes = [box for _, box in block_boxes(chunks)]
    level = [delayed(_boxes_histogram)(stored, boxes[i:i + BLOCK_GROUP], bins)
             for i in range(0, len(boxes), BLOCK_GROUP)]
    fan_in = max(BLOCK_GROUP, 2)
    while len(level) > 1:
        level = [delayed(_sum)(level[i:i + fan_in]) for i in range(0, len(level), fan_in)]
    return run_tasks(level, "histogram")[0]


def otsu_threshold_chunked(image):
    """Otsu's threshold of a Dask array, equal to ``otsu_threshold`` of the computed array."""
    return histogram_thresholds_chunked(image)["otsu"]


def histogram_thresholds_chunked(image, value_range=None):
    """Every histogram method's threshold of a Dask array (``{"otsu": ..., "li": ..., "triangle": ...}``).

    Equal to the in-memory ``HISTOGRAM_METHODS`` on the computed array's histogram.
    """
    return histogram_thresholds(*histogram_chunked(image, value_range))


def block_range(block, *_):
    """(min, max) of one block as host floats: ``value_range`` gathered by a pass that already reads the blocks."""
    return (float(block.min()), float(block.max())) if block.size else (np.inf, -np.inf)


def histogram_chunked(image, value_range=None):
    """``intensity_histogram`` of a Dask array: (counts, bins), equal to the computed array's.

    ``value_range``: the array's (min, max) when known (per-block
    :func:`block_range` results of an earlier pass, reduced); else a pass computes it.
    """
    import time

    import dask
    import dask.array as da

    from gpu_pipeline.chunked.workspace import log_pass

    low, high = value_range if value_range is not None else dask.compute(image.min(), image.max())
    if not (np.isfinite(float(low)) and np.isfinite(float(high))):
        from gpu_pipeline._common import UnusableValuesError

        raise UnusableValuesError("the volume holds NaN or inf values (or, in float64, values beyond float32's "
                                  "range, 3.4e38, in which declump smooths); declump accepts finite intensities only")
    bins = histogram_bins(float(low), float(high), image.dtype)
    stored = stored_volume(image)
    if stored is not None:
        return _stored_histogram(stored, image.chunks, bins), bins
    # One histogram per chunk (no reshape: flattening would rechunk into huge blocks), tree-summed. The counts
    # are host arrays on either device; ``meta`` says so, or Dask would find out by histogramming an empty
    # block in this process, whose first compiled call (about 0.3 s) a client of a cluster never needs.
    per_chunk = image.map_blocks(_block_histogram, bins, dtype=np.int64, new_axis=image.ndim,
                                 chunks=tuple((1,) * n for n in image.numblocks) + ((bins.nbins,),),
                                 meta=np.empty((0,) * (image.ndim + 1), dtype=np.int64))
    start = time.time()
    counts = to_host(da.sum(per_chunk, axis=tuple(range(image.ndim))).compute())
    log_pass("histogram", int(np.prod(image.numblocks)), start)
    return counts, bins
