"""The pixel classifier on a chunked volume: the in-memory probabilities, bit for bit, for any chunking.

Each chunk is read with the feature halo around it (the largest scale's
reach, :func:`~gpu_pipeline.stages.features.feature_halo`), and the
normalisation limits come from one histogram reduced over all chunks, so
every pixel's features, and so its probabilities and the labels, are those
of ``PixelClassifier.predict_proba`` on the whole volume.
"""
from __future__ import annotations

import functools

import numpy as np

from gpu_pipeline._backend import get_array_module
from gpu_pipeline.chunked.foreground import fit_halo
from gpu_pipeline.chunked.histogram import histogram_chunked
from gpu_pipeline.chunked.source import map_haloed, neighbours_hold_halo, stored_volume
from gpu_pipeline.stages.features import feature_halo, intensity_limits, normalize_intensity, tile_features


def intensity_limits_chunked(volume, percentiles):
    """``intensity_limits`` of a Dask array (the same histogram, reduced over chunks)."""
    counts, bins = histogram_chunked(volume)
    return intensity_limits(None, low=percentiles[0], high=percentiles[1], counts=counts, bins=bins)


def _block_probabilities(block, classifier, limits, spacing, halo, chunks, block_info=None):
    index = block_info[0]["chunk-location"]
    left = [h if i > 0 else 0 for h, i in zip(halo, index)]
    core = tuple(slice(lo, lo + int(chunks[a][i])) for a, (lo, i) in enumerate(zip(left, index)))
    return _core_probabilities(block, core, classifier, limits, spacing)


def _haloed_probabilities(extended, left, core_shape, shared, *, limits, spacing):
    """:func:`_core_probabilities` of a block handed over with its halo by
    :func:`~gpu_pipeline.chunked.source.map_haloed` (``shared``: [the classifier])."""
    core = tuple(slice(lo, lo + int(n)) for lo, n in zip(left, core_shape))
    return _core_probabilities(extended, core, shared[0], limits, spacing)


def _core_probabilities(block, core, classifier, limits, spacing):
    """The class probabilities of the ``core`` of ``block`` (the core with its feature halo, clipped to the
    volume), shape (n_classes, *core shape)."""
    normalized = normalize_intensity(block, limits=limits)
    xp = get_array_module(block)
    out = xp.empty((len(classifier.classes),) + tuple(s.stop - s.start for s in core), dtype=xp.float32)
    # The chunk may be larger than a tile: classify it tile by tile, each tile with its halo from the chunk.
    from gpu_pipeline.classifier import tiles

    for tile in tiles(out.shape[1:]):
        window = tuple(slice(c.start + t.start, c.start + t.stop) for c, t in zip(core, tile))
        out[(slice(None),) + tile] = classifier.predict_features(  # one thread: Dask runs a task per core
            tile_features(normalized, window, spacing=spacing, scales=classifier.scales), threads=1)
    return out


def probabilities_chunked(volume, classifier, *, spacing, workspace=None, device=None):
    """Class probabilities of a chunked volume: a lazy float32 Dask array (n_classes, *volume.shape).

    Equal to ``classifier.predict_proba(volume.compute(), spacing=spacing)``
    for any chunking. With a ``workspace`` the normalisation limits are
    saved and the probabilities staged (computed once per chunk, resumable).
    """
    import dask.array as da
    from dask import delayed

    from gpu_pipeline.chunked.workspace import Workspace

    workspace = workspace or Workspace(None)
    classifier.check_image(volume.shape, "the volume")
    spacing = tuple(float(s) for s in spacing)
    limits = workspace.remember("intensity_limits", lambda: {
        "limits": np.asarray(intensity_limits_chunked(volume, classifier.percentiles))})["limits"]
    limits = (float(limits[0]), float(limits[1]))
    halo = feature_halo(spacing, classifier.scales)
    stored = stored_volume(volume)
    volume = fit_halo(volume, halo, "pixel-feature")
    chunks = ((len(classifier.classes),),) + volume.chunks
    meta = get_array_module(volume._meta).empty((0,) * (volume.ndim + 1), dtype=np.float32)
    if stored is not None and neighbours_hold_halo(volume.chunks, halo):
        # A volume read from a store: each block read twice, its halo handed over by its neighbours' tasks,
        # not ~60 small tasks per block cutting it out of 27 blocks (as smoothing, map_haloed).
        def build():
            return map_haloed(stored, volume.chunks, halo, functools.partial(
                _haloed_probabilities, limits=limits, spacing=spacing), dtype=np.float32, meta=meta,
                name="probabilities", spill=workspace.halos("probabilities"), clipped=True,
                leading=len(classifier.classes), shared=(classifier,))
    else:
        extended = da.overlap.overlap(volume, depth=dict(enumerate(halo)), boundary="none")

        def build():
            return extended.map_blocks(_block_probabilities, delayed(classifier, traverse=False), limits, spacing,
                                       halo, volume.chunks, dtype=np.float32, chunks=chunks, new_axis=0, meta=meta)

    staged = workspace.stage("probabilities", build, chunks=chunks, shape=(chunks[0][0],) + volume.shape,
                             dtype=np.float32, device=device)
    workspace.discard_halos("probabilities")  # (none on the overlap path)
    return staged
