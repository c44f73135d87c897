"""Volumes on disk as Dask arrays: Zarr v2/v3 arrays and OME-Zarr images, read chunk by chunk.

A chunk that cannot be decoded raises a one-line error naming the chunk;
nothing is read until a computation asks for it. One listing of the store's
files, taken when it is opened, finds missing chunks (which Zarr would read
as the fill value) and gives the input's fingerprint.
"""
from __future__ import annotations

import hashlib

import numpy as np

from gpu_pipeline._backend import DeclumpError
from gpu_pipeline.io import check_chunks, list_stored_files, open_zarr


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


def fingerprint(array, files):
    """What identifies the stored input: shape, dtype, chunking, codecs and a hash of its files' sizes and times."""
    digest = hashlib.sha256()
    for key in sorted(files):
        digest.update(f"{key}\0{files[key][0]}\0{files[key][1]}\n".encode())
    codecs = [*array.filters, *([array.serializer] if getattr(array, "serializer", None) else []),
              *array.compressors]
    return {"shape": [int(n) for n in array.shape], "dtype": str(array.dtype),
            "chunks": [int(c) for c in array.chunks], "shards": [int(c) for c in array.shards or ()],
            "codecs": [repr(c) for c in codecs], "files": len(files), "files_sha256": digest.hexdigest()}


def open_volume(path, *, channel=None, timepoint=None, chunks=None, missing_chunks="error",
                return_fingerprint=False, accept_bool=False):
    """A lazy Dask array of a 2D/3D volume stored as Zarr or OME-Zarr, and its spacing.

    Parameters
    ----------
    path : str or Path
        A Zarr array, or an OME-Zarr image group (level 0 is read).
    channel, timepoint : int, optional
        Pick from ``c``/``t`` axes (required when they hold more than one).
    chunks : tuple of int, optional
        Processing chunk shape; default: the store's chunks.
    missing_chunks : "error" or "fill"
        A chunk file absent from the store (found from one listing of its
        files) raises a `DeclumpError` naming it (default); ``fill``: read
        as the array's fill value, as Zarr does, for stores that are sparse
        on purpose (Zarr 3 skips chunks that are all fill value unless
        written with ``write_empty_chunks=True``).
    return_fingerprint : bool
        Also return the input's fingerprint (see :func:`fingerprint`).
    accept_bool : bool
        Also accept a boolean array (a mask), not only intensities.

    Returns
    -------
    volume : dask.array.Array
    spacing : list of float or None
    fingerprint : dict, only with ``return_fingerprint``
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
    files = list_stored_files(array)
    check_chunks(array, selection, path, files, missing_chunks)
    store_chunks = tuple(array.chunks[i] for i in kept)
    grid = da.core.normalize_chunks(chunks or store_chunks, shape)
    volume = da.map_blocks(_read_block, array, str(path), selection, dtype=array.dtype, chunks=grid,
                           meta=np.empty((0,) * len(shape), dtype=array.dtype))
    if return_fingerprint:
        return volume, spacing, fingerprint(array, files)
    return volume, spacing

