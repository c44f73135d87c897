"""CPU primitives (NumPy, SciPy, scikit-image, compiled kernels) behind the pipeline's stages.

`gpu_pipeline/ops_cuda.py` has the same functions with the same contracts on
CuPy/cuCIM; the stage code picks one set by the array type (`ops_for`).
"""
from __future__ import annotations

import numpy as np

from gpu_pipeline._common import GAUSSIAN_TRUNCATE, usable_cores

xp = np


def gaussian(image, sigma_voxels):
    """Gaussian smoothing, float32, edges replicated (sigma per axis, voxels): SciPy's values, in compiled passes."""
    from cpu_fallback.kernels import gaussian_filter

    return gaussian_filter(image, sigma_voxels, GAUSSIAN_TRUNCATE)


def distance_transform(mask, spacing, max_distance=None, threads=None, window=None):
    """Exact Euclidean distance of each foreground voxel to the background, physical units, float32.

    A compiled separable transform (:func:`cpu_fallback.kernels.distance_transform`, Felzenszwalb and
    Huttenlocher's lower envelope of parabolas along each axis), equal to
    `scipy.ndimage.distance_transform_edt(mask, sampling=spacing)` to float32 rounding (bit for bit where the
    squared spacings are whole numbers; checked in tests). It releases the GIL: the chunks of a run's threads
    are transformed at once. A mask without background gives inf everywhere, as on the GPU. ``max_distance``
    is the GPU twin's bound on exact values; here every value is exact. ``threads``: default every usable
    core (one whole image); a chunk's task passes 1, since Dask already runs one task per core. ``window``
    (slices): only that part is returned, and only the lines it needs are transformed.
    """
    from cpu_fallback.kernels import distance_transform as compiled

    return compiled(mask, tuple(float(s) for s in spacing), threads=threads or usable_cores(), window=window)


def label(mask):
    """Face-connected components of a binary mask: (int32 labels, count), numbered as SciPy's ``ndimage.label``."""
    if 1 <= np.ndim(mask) <= 3:  # the compiled union-find of label_by_value: same components, same C-order ids
        from cpu_fallback.kernels import label_by_value as compiled

        return compiled(np.asarray(mask, dtype=bool), return_count=True)
    from scipy import ndimage as ndi  # (here: importing it costs each process 0.25 s; the kernels serve 1-3D)

    structure = ndi.generate_binary_structure(mask.ndim, 1)
    labels, count = ndi.label(mask, structure=structure, output=np.int32)
    return labels, int(count)


def label_table(mask, out=None):
    """``label(mask)`` with the voxels per label 0..count: ``(labels, count, sizes)``, the sizes counted as the
    ids are written (no pass of their own over the labels). ``out``: an int32 array of the mask's shape to
    hold the labels (see the kernel's ``label_by_value``), or None."""
    if 1 <= np.ndim(mask) <= 3:
        from cpu_fallback.kernels import label_by_value as compiled

        return compiled(np.asarray(mask, dtype=bool), return_count=True, return_sizes=True, out=out)
    labels, count = label(mask)
    return labels, count, label_sizes(labels, count)


def label_by_value(labels):
    """Face-connected components of equal non-zero value (0 stays background), as scikit-image numbers them."""
    from cpu_fallback.kernels import label_by_value as compiled

    return compiled(labels)


def maximum_filter(array, size):
    """Maximum over a box of ``size`` voxels per axis (edge values replicated)."""
    from cpu_fallback.kernels import maximum_filter as compiled
    from gpu_pipeline.array_algorithms import narrow_maximum_filter

    if np.dtype(array.dtype).kind in "iub" and all(int(s) in (1, 3) for s in size):
        return narrow_maximum_filter(array, [int(s) for s in size])  # a few times faster than the general pass
    result = compiled(array, size)  # integer data, odd sizes (the peak windows): compiled, SciPy's values
    if result is None:
        from scipy import ndimage as ndi

        result = ndi.maximum_filter(array, size=tuple(int(s) for s in size), mode="nearest")
    return result


def local_maxima(values, min_value):
    """Voxels equal to the maximum of their 3x3(x3) box and at least ``min_value`` (``array_algorithms.
    local_maxima``): one compiled pass, each voxel stopping at its first higher neighbour."""
    from cpu_fallback.kernels import local_maxima as compiled

    result = compiled(values, min_value)
    if result is None:
        from gpu_pipeline.array_algorithms import local_maxima as array_version

        result = array_version(values, min_value, maximum_filter)
    return result


def box_maxima(values, maxed, min_value, half_widths, core=None):
    """The candidates of a local-maximum search from a box maximum filter (``array_algorithms.box_maxima``).

    One compiled pass over ``core`` for 1-3D integer or float arrays (the
    array-module version makes about twenty whole-array passes and mask
    temporaries); the same coordinates.
    """
    from cpu_fallback.kernels import box_maxima as compiled

    result = compiled(values, maxed, min_value, half_widths, core)
    if result is None:
        from gpu_pipeline.array_algorithms import box_maxima as array_version

        result = array_version(values, maxed, min_value, half_widths, core)
    return result


def label_sums(labels, image=None):
    """Per-label sums for the particle table (``array_algorithms.label_sums``): compiled, one pass over the
    voxels after one for the ids' range; the array version where that does not apply."""
    from cpu_fallback.kernels import label_sums as compiled

    if image is not None and image.dtype == np.float16:  # Numba has no float16; its values are float32's
        image = image.astype(np.float32)
    result = compiled(labels, image)
    if result is None:
        from gpu_pipeline.array_algorithms import label_sums as array_version

        result = array_version(labels, image, scatter_min, scatter_max)
    return result


#: Inputs smaller than this take NumPy's own ``ufunc.at`` / ``bincount`` (the compiled passes give the same
#: values): the per-chunk tables a cluster's client merges then never start the compiler in a process that needs
#: it for nothing else (about 0.35 s to import Numba and load a kernel).
COMPILED_SCATTER_MIN = 1 << 16


def _scatter(target, index, values, highest):
    if np.size(index) < COMPILED_SCATTER_MIN:
        (np.maximum if highest else np.minimum).at(target, index, values)
        return
    from cpu_fallback.kernels import scatter

    scatter(target, index, values, highest=highest)


def scatter_min(target, index, values):
    """target[index] = min(target[index], values), repeated indices allowed (``np.minimum.at``, compiled)."""
    _scatter(target, index, values, highest=False)


def scatter_max(target, index, values):
    """target[index] = max(target[index], values), repeated indices allowed (``np.maximum.at``, compiled)."""
    _scatter(target, index, values, highest=True)


def label_sizes(labels, count):
    """Voxels per label 0..count, int64 (``bincount``; a compiled pass here)."""
    if np.size(labels) < COMPILED_SCATTER_MIN:
        return np.bincount(np.ravel(labels), minlength=count + 1).astype(np.int64, copy=False)
    from cpu_fallback.kernels import label_sizes as compiled

    return compiled(labels, count)


def watershed(surface, markers, mask):
    """scikit-image watershed (face connectivity) of ``surface`` from ``markers`` inside ``mask``."""
    from skimage.segmentation import watershed as sk_watershed

    return sk_watershed(surface, markers=markers, mask=mask, connectivity=1).astype(np.int32, copy=False)


def asarray(array):
    return np.asarray(array)


def synchronize():
    """No-op on the CPU (the GPU twin waits for the device)."""


def device_table(table):
    """The host table itself (the GPU twin keeps one device copy per table)."""
    return np.asarray(table)
