"""The first half of the pipeline on a chunked volume: smoothing, threshold, polarity, cleanup, regions.

Equal to the in-memory stages for any chunking: smoothing runs with a halo
of the Gaussian's radius (each separable pass only reads that far), the
threshold and polarity are global reductions, and objects are removed by
their global size from the chunked connected components.
"""
from __future__ import annotations

import numpy as np

from gpu_pipeline._backend import GAUSSIAN_TRUNCATE, DeclumpError, get_array_module, ops_for, to_host
from gpu_pipeline.chunked.components import label_chunked
from gpu_pipeline.chunked.histogram import otsu_threshold_chunked
from gpu_pipeline.stages.cleanup import voxels_for
from gpu_pipeline.stages.threshold import choose_polarity, foreground

def gaussian_radius(sigma_voxels):
    """Filter radius per axis in voxels, as scipy.ndimage computes it."""
    return tuple(int(GAUSSIAN_TRUNCATE * float(s) + 0.5) for s in sigma_voxels)


def fit_halo(volume, halo, what):
    """``volume`` with chunks no smaller than ``halo``: a short last chunk joins its neighbour.

    A chunk shape itself smaller than the halo is refused (one line).
    """
    chunks = []
    for axis, h in enumerate(halo):
        sizes = list(volume.chunks[axis])
        if h and len(sizes) > 1 and max(sizes) < h:
            raise DeclumpError(f"chunks of {max(sizes)} voxels along axis {axis} are smaller than the {what} halo "
                               f"{tuple(halo)}; use chunks of at least the halo per axis")
        merged = []
        for size in sizes:
            if merged and size < h:
                merged[-1] += size
            else:
                merged.append(size)
        chunks.append(tuple(merged))
    chunks = tuple(chunks)
    return volume if chunks == volume.chunks else volume.rechunk(chunks)


def smooth_chunked(volume, sigma_voxels):
    """Gaussian smoothing of a Dask array, equal to the in-memory ``ops.gaussian``."""
    halo = gaussian_radius(sigma_voxels)
    volume = fit_halo(volume, halo, "smoothing")

    def smooth(block):
        return ops_for(block).gaussian(block, sigma_voxels)

    return volume.map_overlap(smooth, depth=halo, boundary="nearest", dtype=np.float32)


def _label_sizes(block):
    xp = get_array_module(block)
    values, counts = xp.unique(block[block > 0], return_counts=True)
    return to_host(xp.stack([values.astype(xp.int64), counts.astype(xp.int64)]))


def stage(array, scratch, name):
    """Write ``array`` to a Zarr store under ``scratch`` once and read it back lazily.

    Later passes then read the stored chunks instead of recomputing them;
    memory stays bounded by chunks in flight. Without ``scratch`` the array
    is returned as it is (recomputed by each pass).
    """
    if scratch is None:
        return array
    import dask.array as da

    path = f"{scratch}/{name}.zarr"
    array.to_zarr(path, overwrite=True)
    return da.from_zarr(path)


def regions_chunked(volume, *, spacing, sigma=1.0, threshold="otsu", polarity="auto", min_size=0.0, scratch=None):
    """Connected regions of the cleaned foreground of a chunked volume.

    Returns ``(regions, n_regions, threshold, polarity)``: ``regions`` is a lazy
    Dask array equal to ``ops.label(clean_mask(...))`` of the in-memory
    pipeline (hole filling is not available in chunked runs). ``scratch``: a
    folder for intermediate Zarr stores (the foreground mask), so that the
    smoothing runs once per chunk.
    """
    import dask

    smoothed = smooth_chunked(volume.astype(np.float32), tuple(float(sigma) / s for s in spacing)) \
        if sigma and sigma > 0 else volume
    value = otsu_threshold_chunked(smoothed) if threshold == "otsu" else float(threshold)
    side = choose_polarity(smoothed, value, polarity)
    fg = stage(foreground(smoothed, value, side), scratch, "foreground")
    components, n = label_chunked(fg)
    min_voxels = voxels_for(min_size, spacing)
    if n == 0:
        return components, 0, value, side
    keep = np.ones(n + 1, dtype=bool)
    if min_voxels > 1:
        sizes = np.zeros(n + 1, dtype=np.int64)
        parts = dask.compute(*[dask.delayed(_label_sizes)(b) for b in components.to_delayed().ravel()])
        for part in parts:
            np.add.at(sizes, part[0], part[1])
        keep = sizes >= min_voxels
    keep[0] = False
    rank = np.where(keep, np.cumsum(keep), 0).astype(np.int32)

    def renumber(block):
        return get_array_module(block).asarray(rank)[block]

    return components.map_blocks(renumber, dtype=np.int32), int(keep.sum()), value, side
