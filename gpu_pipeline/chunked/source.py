"""Volumes on disk as Dask arrays: Zarr v2/v3 arrays and OME-Zarr images, read chunk by chunk.

A chunk that cannot be decoded raises a one-line error naming the chunk;
nothing is read until a computation asks for it.
"""
from __future__ import annotations

import numpy as np

from gpu_pipeline._backend import DeclumpError
from gpu_pipeline.io import open_zarr


def _read_block(array, path, selection, block_info=None):
    location = block_info[None]["array-location"]
    stored = _compose(selection, tuple(slice(lo, hi) for lo, hi in location))
    try:
        return np.asarray(array[stored])
    except Exception as exc:
        # Name the stored chunks this block covers (all axes of the stored array, t and c included).
        low = tuple(int((s.start if isinstance(s, slice) else s) // c) for s, c in zip(stored, array.chunks))
        high = tuple(int(((s.stop - 1) if isinstance(s, slice) else s) // c) for s, c in zip(stored, array.chunks))
        where = f"chunk {low}" if low == high else f"chunks {low} to {high}"
        raise DeclumpError(f"{where} of {path} could not be read ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); the store is corrupt there")


def _compose(selection, slices):
    """Apply ``slices`` (over the volume's axes) inside ``selection`` (over the stored array's axes)."""
    out, it = [], iter(slices)
    for item in selection:
        out.append(next(it) if isinstance(item, slice) else item)
    return tuple(out)


def open_volume(path, *, channel=None, timepoint=None, chunks=None, accept_bool=False):
    """A lazy Dask array of a 2D/3D volume stored as Zarr or OME-Zarr, and its spacing.

    Parameters
    ----------
    path : str or Path
        A Zarr array, or an OME-Zarr image group (level 0 is read).
    channel, timepoint : int, optional
        Pick from ``c``/``t`` axes (required when they hold more than one).
    chunks : tuple of int, optional
        Processing chunk shape; default: the store's chunks.
    accept_bool : bool
        Also accept a boolean array (a mask), not only intensities.

    Returns
    -------
    volume : dask.array.Array
    spacing : list of float or None
    """
    import dask.array as da

    array, selection, spacing = open_zarr(path, channel=channel, timepoint=timepoint)
    kept = [i for i, item in enumerate(selection) if isinstance(item, slice)]
    shape = tuple(array.shape[i] for i in kept)
    if len(shape) not in (2, 3):
        raise DeclumpError(f"{path} holds a {len(shape)}D volume {shape}; declump accepts 2D or 3D "
                           "(pick a channel/time point with --channel/--timepoint)")
    if np.dtype(array.dtype).kind not in ("buif" if accept_bool else "uif"):
        raise DeclumpError(f"{path} has dtype {array.dtype}; declump accepts integer or floating-point intensities")
    store_chunks = tuple(array.chunks[i] for i in kept)
    grid = da.core.normalize_chunks(chunks or store_chunks, shape)
    volume = da.map_blocks(_read_block, array, str(path), selection, dtype=array.dtype, chunks=grid,
                           meta=np.empty((0,) * len(shape), dtype=array.dtype))
    return volume, spacing

