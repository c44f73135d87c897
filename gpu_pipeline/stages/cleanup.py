"""Mask cleanup: drop specks, fill small holes. Sizes are physical (volume in 3D, area in 2D)."""
from __future__ import annotations

import math

from gpu_pipeline._backend import get_array_module, ops_for


def voxels_for(size, spacing) -> int:
    """Physical size (area or volume, units of ``spacing``) as a voxel count, rounded up."""
    return int(math.ceil(float(size) / math.prod(float(s) for s in spacing) - 1e-9))


def remove_small_objects(mask, min_voxels: int):
    """Drop face-connected foreground components smaller than ``min_voxels`` voxels.

    Same result as ``skimage.morphology.remove_small_objects(mask, min_voxels, connectivity=1)``.
    """
    if min_voxels <= 1:
        return mask
    xp = get_array_module(mask)
    labels, count = ops_for(mask).label(mask)
    if count == 0:
        return mask
    sizes = xp.bincount(labels.ravel(), minlength=count + 1)
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[labels]


def fill_small_holes(mask, max_hole_voxels: int):
    """Fill face-connected background components smaller than ``max_hole_voxels`` voxels.

    Like ``skimage.morphology.remove_small_holes``; a bounded hole size keeps
    the operation local, which a chunked volume needs.
    """
    if max_hole_voxels <= 1:
        return mask
    return ~remove_small_objects(~mask, max_hole_voxels)


def clean_mask(mask, *, spacing, min_size, max_hole_size):
    """Remove objects smaller than ``min_size`` and fill holes smaller than ``max_hole_size`` (physical units)."""
    mask = fill_small_holes(mask, voxels_for(max_hole_size, spacing))
    return remove_small_objects(mask, voxels_for(min_size, spacing))
