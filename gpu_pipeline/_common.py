"""What every layer shares and nothing else: the error type, the Gaussian cut-off, array-type helpers.

A leaf module (it imports nothing from declump), so the backend primitives
(`cpu_fallback/ops.py`, `ops_cuda.py`, `array_algorithms.py`) can use it
without importing the dispatching `_backend` module that the stages import.
"""
from __future__ import annotations

import os
import sys

import numpy as np

GPU_EXTRA_HINT = "install the GPU extra: pip install 'declump[gpu-cu12]' (CUDA 12) or 'declump[gpu-cu13]' (CUDA 13)"

#: Gaussians are cut at this many sigmas on both backends; the chunked halo depends on it.
GAUSSIAN_TRUNCATE = 4.0


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (what a batch scheduler such as SLURM grants, or
    ``taskset``), not the machine's count, so threads never outnumber the cores a job was given."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def each_on_threads(function, items, threads):
    """``function(item)`` for every item, on up to ``threads`` threads at once (in this thread where that is
    one, or there is one item): for work that releases the GIL (compiled kernels, NumPy on large arrays).
    Returns nothing; ``function`` writes its results where they belong."""
    items = list(items)
    threads = min(int(threads), len(items))
    if threads <= 1:
        for item in items:
            function(item)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(function, items))


class DeclumpError(ValueError):
    """Bad input or an impossible request; its message is one line for the user."""


def whole_number_at_least(value, least) -> bool:
    """Is ``value`` an integer (Python's or NumPy's, not a bool) of at least ``least``? The one test behind the
    checks of counts (workers, threads, iterations, trees, an axis index)."""
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= least


class UnusableValuesError(DeclumpError):
    """The image's values give no foreground whatever the options: NaN or inf, or one constant value."""


class UnreadableChunkError(DeclumpError):
    """A Zarr chunk that does not decode or may not be read: once it is written again the input's chunk files
    differ, so a chunked run's work folder could not be resumed (it is removed)."""


class ChunkShapeError(DeclumpError):
    """A chunked run's blocks are smaller than a pass's halo: the same command stops the same way again."""


class ScratchSpaceError(DeclumpError):
    """A chunked run's work folder lacks the room for an uncompressed staged store: refused before writing it."""


def is_cupy_array(array) -> bool:
    return type(array).__module__.split(".")[0] == "cupy"


def get_array_module(array):
    """``numpy`` or ``cupy``, whichever holds ``array``."""
    if is_cupy_array(array):
        return sys.modules["cupy"]
    return np


def to_host(array) -> np.ndarray:
    """A NumPy copy of a NumPy or CuPy array."""
    if is_cupy_array(array):
        return array.get()
    return np.asarray(array)


def weighted_median(values, weights) -> float:
    """The value at which the cumulative weight of the sorted ``values`` first reaches half the total (host arrays)."""
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(weights[order])
    return float(values[order][int(np.searchsorted(cumulative, cumulative[-1] / 2))])


def native_byte_order(array):
    """``array`` in this machine's byte order: itself, or a converted copy where it is big-endian (Java/N5
    tools, some TIFFs and Zarr stores); the compiled passes (Numba) take native arrays only."""
    dtype = np.dtype(array.dtype)
    return array if dtype.isnative else array.astype(dtype.newbyteorder("="))


#: What a label image may be, in the one line that refuses one.
LABELS_ACCEPTED = "an integer label image (0 background, each object its own id > 0; bool: one object)"


def as_label_image(labels, name="labels", ndims=(2, 3)):
    """``labels`` as an integer label image in native byte order (NumPy or CuPy), else a one-line `DeclumpError`.

    Accepted: integer arrays of non-negative ids, bool (one object), floats holding whole non-negative numbers
    (label images saved as float), with ``ndims`` dimensions and at least one voxel.
    """
    if not hasattr(labels, "dtype"):
        labels = np.asarray(labels)
    xp = get_array_module(labels)
    dims = " or ".join(f"{n}D" for n in ndims) if len(ndims) < 3 else f"{min(ndims)}D to {max(ndims)}D"
    if labels.ndim not in ndims or labels.size == 0:
        raise DeclumpError(f"{name} has shape {tuple(labels.shape)}; accepted: a non-empty {dims} array, "
                           f"{LABELS_ACCEPTED}")
    kind = np.dtype(labels.dtype).kind
    if kind == "b":
        return labels.astype(np.uint8)
    if kind == "f":
        if not bool(xp.isfinite(labels).all()) or not bool((labels == xp.round(labels)).all()):
            raise DeclumpError(f"{name} has dtype {labels.dtype} with values that are not whole numbers "
                               f"(NaN, inf or fractions); accepted: {LABELS_ACCEPTED}")
        if float(labels.max()) >= 2.0 ** 63:
            raise DeclumpError(f"{name} holds ids up to {float(labels.max()):.3g}; accepted: ids below 2**63")
        labels = labels.astype(np.int64)
        kind = "i"
    elif kind not in "iu":
        raise DeclumpError(f"{name} has dtype {labels.dtype}; accepted: {LABELS_ACCEPTED}")
    if kind == "i" and int(labels.min()) < 0:
        raise DeclumpError(f"{name} holds negative ids (down to {int(labels.min())}); accepted: {LABELS_ACCEPTED}")
    if np.dtype(labels.dtype) == np.uint64 and int(labels.max()) > np.iinfo(np.int64).max:
        raise DeclumpError(f"{name} holds ids up to {int(labels.max())}; accepted: ids below 2**63 "
                           "(renumber them, e.g. skimage.segmentation.relabel_sequential)")
    return native_byte_order(labels)


def counted(n, noun):
    """``"1 particle"``, ``"3 particles"``: a count with its noun (a result line read "1 particles")."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
