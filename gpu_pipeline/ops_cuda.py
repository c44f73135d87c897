"""GPU primitives (CuPy, cupyx.scipy.ndimage, cuCIM): the CUDA twin of `cpu_fallback/ops.py`.

Imported only when a CuPy array reaches a stage, so the package imports and
runs without CUDA.
"""
from __future__ import annotations

import sys

from scipy import ndimage as ndi

from gpu_pipeline._backend import GAUSSIAN_TRUNCATE, require_gpu
from gpu_pipeline.stages.components import label_by_value_propagation

cp = require_gpu()
import cupyx  # noqa: E402
from cupyx.scipy import ndimage as cndi  # noqa: E402

xp = cp

try:  # the user's stack: cuCIM's PBA+ distance transform (cupyx carries the same algorithm)
    from cucim.core.operations.morphology import distance_transform_edt as _edt
except ImportError:  # pragma: no cover - depends on the installed cuCIM
    _edt = cndi.distance_transform_edt


def gaussian(image, sigma_voxels):
    """Gaussian smoothing, float32, reflecting borders (sigma per axis, voxels)."""
    return cndi.gaussian_filter(cp.asarray(image, dtype=cp.float32), sigma=sigma_voxels, mode="nearest",
                                truncate=GAUSSIAN_TRUNCATE)


def distance_transform(mask, spacing):
    """Exact Euclidean distance to the background, physical units, float32 (cuCIM's PBA+ algorithm)."""
    dist = _edt(mask.astype(bool, copy=False), sampling=tuple(float(s) for s in spacing), float64_distances=False)
    return dist.astype(cp.float32, copy=False)


def label(mask):
    """Face-connected components of a binary mask: (int32 labels, count)."""
    structure = cp.asarray(ndi.generate_binary_structure(mask.ndim, 1))
    labels, count = cndi.label(mask, structure=structure)
    return labels.astype(cp.int32, copy=False), int(count)


def label_by_value(labels):
    """Face-connected components of equal non-zero value, on the device (min-label propagation)."""
    return label_by_value_propagation(labels, ops=sys.modules[__name__])


def maximum_filter(array, size):
    """Maximum over a box of ``size`` voxels per axis (edge values replicated)."""
    return cndi.maximum_filter(array, size=tuple(int(s) for s in size), mode="nearest")


def scatter_min(target, index, values):
    cupyx.scatter_min(target, index, values)


def scatter_max(target, index, values):
    cupyx.scatter_max(target, index, values)


def watershed(surface, markers, mask):
    """cuCIM has no watershed: this comparison method runs scikit-image on the host."""
    from cpu_fallback.ops import watershed as host_watershed

    return cp.asarray(host_watershed(surface.get(), markers.get(), mask.get()))


def asarray(array):
    return cp.asarray(array)


def synchronize():
    cp.cuda.get_current_device().synchronize()
