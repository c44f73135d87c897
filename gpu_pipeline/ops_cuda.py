"""GPU primitives (CuPy, cupyx.scipy.ndimage): the CUDA twin of `cpu_fallback/ops.py`.

Imported only when a CuPy array reaches a stage (`_backend.ops_for` checks
the CuPy version and the device first), so the package imports and runs
without CUDA. Every CuPy-only function of declump is here and each is a
few lines; the logic that has no library routine (exact distance
transform, equal-value labelling) is array-module code in
`array_algorithms.py`, which CI runs on NumPy.
"""
from __future__ import annotations

import weakref

from scipy import ndimage as ndi

from gpu_pipeline._common import GAUSSIAN_TRUNCATE, GPU_EXTRA_HINT

try:
    import cupy as cp
    import cupyx
    from cupyx.scipy import ndimage as cndi
except ImportError as exc:  # imported directly, not through _backend: say what is missing, in one line
    raise ImportError(f"gpu_pipeline.ops_cuda is the GPU backend and needs CuPy ({exc}); {GPU_EXTRA_HINT}") from None
from gpu_pipeline.array_algorithms import box_maxima as array_box_maxima
from gpu_pipeline.array_algorithms import distance_transform_edt, label_by_value_propagation
from gpu_pipeline.array_algorithms import label_sums as array_label_sums
from gpu_pipeline.array_algorithms import local_maxima as array_local_maxima

xp = cp


def gaussian(image, sigma_voxels):
    """Gaussian smoothing, float32, reflecting borders (sigma per axis, voxels)."""
    return cndi.gaussian_filter(cp.asarray(image, dtype=cp.float32), sigma=sigma_voxels, mode="nearest",
                                truncate=GAUSSIAN_TRUNCATE)


def distance_transform(mask, spacing, max_distance=None, threads=None, window=None):
    """Exact Euclidean distance to the background, physical units, float32; inf without background.

    ``threads`` (CPU threads of the host twin) has no meaning on the device; ``window`` (slices): only that
    part is returned (the whole transform is computed).

    The separable array-module transform (any shape, 12 bytes per voxel),
    not PBA+ (cuCIM, cupyx), which pads a non-cubic volume to a cube of its
    longest side and returns finite distances when there is no background.
    """
    distance = distance_transform_edt(mask, spacing, max_distance=max_distance)
    return distance if window is None else distance[tuple(window)]


def label(mask):
    """Face-connected components of a binary mask: (int32 labels, count)."""
    structure = cp.asarray(ndi.generate_binary_structure(mask.ndim, 1))
    labels, count = cndi.label(mask, structure=structure)
    return labels.astype(cp.int32, copy=False), int(count)


def label_table(mask, out=None):
    """``label(mask)`` with the voxels per label 0..count: ``(labels, count, sizes)``. ``out`` is ignored
    (CuPy's memory pool reuses freed blocks already)."""
    labels, count = label(mask)
    return labels, count, label_sizes(labels, count)


def label_by_value(labels):
    """Face-connected components of equal non-zero value, on the device (see `label_by_value_propagation`)."""
    return label_by_value_propagation(labels, scatter_min)


def maximum_filter(array, size):
    """Maximum over a box of ``size`` voxels per axis (edge values replicated)."""
    return cndi.maximum_filter(array, size=tuple(int(s) for s in size), mode="nearest")


def local_maxima(values, min_value):
    """Voxels equal to the maximum of their 3x3(x3) box and at least ``min_value``: the array-module version."""
    return array_local_maxima(values, min_value, maximum_filter)


def box_maxima(values, maxed, min_value, half_widths, core=None):
    """The candidates of a local-maximum search from a box maximum filter: the array-module version."""
    return array_box_maxima(values, maxed, min_value, half_widths, core)


def label_sums(labels, image=None):
    """Per-label sums for the particle table: the array-module version (cupyx's scatter reductions)."""
    return array_label_sums(labels, image, scatter_min, scatter_max)


def scatter_min(target, index, values):
    """target[index] = min(target[index], values), repeated indices allowed (int64 needs CuPy >= 14.1)."""
    cupyx.scatter_min(target, index, values)


def scatter_max(target, index, values):
    """target[index] = max(target[index], values), repeated indices allowed (int64 needs CuPy >= 14.1)."""
    cupyx.scatter_max(target, index, values)


def label_sizes(labels, count):
    """Voxels per label 0..count, int64."""
    return cp.bincount(labels.ravel(), minlength=count + 1).astype(cp.int64, copy=False)


def watershed(surface, markers, mask):
    """No GPU watershed (cuCIM has none): this comparison method runs scikit-image on the host."""
    from cpu_fallback.ops import watershed as host_watershed

    return cp.asarray(host_watershed(surface.get(), markers.get(), mask.get()))


def asarray(array):
    return cp.asarray(array)


_device_tables = {}


def device_table(table):
    """The device copy of a host lookup table, made once per table and device and reused by every chunk task.

    Keyed on the host array's identity; the copy is dropped when the host
    array is. Chunked runs index blocks with tables decided on the host
    (label maps, seeds), and a copy per chunk would put a host-to-device
    transfer and a sync on every chunk.
    """
    key = (id(table), cp.cuda.runtime.getDevice())
    hit = _device_tables.get(key)
    if hit is not None and hit[0]() is table:
        return hit[1]
    copy = cp.asarray(table)
    try:
        ref = weakref.ref(table, lambda _, key=key: _device_tables.pop(key, None))
    except TypeError:  # not weak-referenceable (a list): no caching
        return copy
    _device_tables[key] = (ref, copy)
    return copy


def synchronize():
    cp.cuda.Device().synchronize()  # the current device (CuPy 14 has no cuda.get_current_device)


def limit_memory_pool(fraction):
    """Cap CuPy's default pool at ``fraction`` of this device's memory; returns the cap in bytes.

    The pool then reuses cached blocks up to the cap and frees them before it would pass it.
    """
    pool = cp.get_default_memory_pool()
    pool.set_limit(fraction=float(fraction))
    return pool.get_limit()
