"""Mask cleanup: drop specks, fill small holes. Sizes are physical (volume in 3D, area in 2D)."""
from __future__ import annotations

import math

from gpu_pipeline._backend import get_array_module, ops_for, to_host
from gpu_pipeline.stages.components import component_table


def voxels_for(size, spacing) -> int:
    """Physical size (area or volume, units of ``spacing``) as a voxel count, rounded up."""
    return int(math.ceil(float(size) / math.prod(float(s) for s in spacing) - 1e-9))


def remove_small_objects(mask, min_voxels: int, table=None):
    """Drop face-connected foreground components smaller than ``min_voxels`` voxels.

    Same result as ``skimage.morphology.remove_small_objects(mask, min_voxels, connectivity=1)``.
    ``table``: ``mask``'s ``(labels, count, sizes)`` where they are known
    (:func:`gpu_pipeline.stages.components.component_table`).
    """
    if min_voxels <= 1:
        return mask
    labels, count, sizes = component_table(mask) if table is None else table
    if count == 0:
        return mask
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[labels]


def fill_small_holes(mask, max_hole_voxels: int, background_table=None):
    """Fill face-connected background components smaller than ``max_hole_voxels`` voxels.

    Like ``skimage.morphology.remove_small_holes``; a bounded hole size keeps
    the operation local, which a chunked volume needs. ``background_table``:
    the component table of ``~mask`` where it is known.
    """
    if max_hole_voxels <= 1:
        return mask
    return ~remove_small_objects(~mask, max_hole_voxels, background_table)


def clean_mask(mask, *, spacing, min_size, max_hole_size, tables=None):
    """Remove objects smaller than ``min_size`` and fill holes smaller than ``max_hole_size`` (physical units).

    ``tables``: the component tables of ``mask`` and of its background, where the threshold's polarity
    labelled them (:func:`gpu_pipeline.stages.threshold.threshold_foreground`); the mask's serves the object
    removal where no hole was filled (the mask is then unchanged)."""
    own, background = tables if tables is not None else (None, None)
    hole_voxels = voxels_for(max_hole_size, spacing)
    if background is not None and hole_voxels > 1 and bool((background[2][1:] < hole_voxels).any()):
        own = None  # holes are filled: the mask's components change
    mask = fill_small_holes(mask, hole_voxels, background)
    return remove_small_objects(mask, voxels_for(min_size, spacing), own)


def merge_small_particles(labels, min_voxels: int, *, renumber=False):
    """Particles of under ``min_voxels`` voxels dropped, unless touching small ones together reach it: then one.

    A split can cut a fragment off a particle's rim (dropped: the particle
    is whole without it) or cut a rod into short pieces that touch each
    other (joined again, so that nothing that passed the object size check
    vanishes). Joined pieces take the lowest of their ids. Ids are not
    renumbered, unless ``renumber``: then ``labels`` must be numbered 1..n
    in C order of first voxel (as :func:`~gpu_pipeline.stages.split.finish_labels`
    leaves them) and the result is too, in the same gather, equal to
    :func:`~gpu_pipeline.stages.components.relabel_by_first_voxel` of the
    result without it: the lowest id of joined pieces is the one whose first
    voxel comes first, so the particles left keep the order of their ids.
    """
    import numpy as np
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    xp = get_array_module(labels)
    count = int(labels.max())
    if min_voxels <= 1 or count == 0:
        return labels
    sizes = to_host(ops_for(labels).label_sizes(labels, count))
    small = sizes < min_voxels
    small[0] = False
    if not small.any():
        return labels
    # Face contacts between two different small particles.
    small_on_device = xp.asarray(small)
    pairs = []
    for axis in range(labels.ndim):
        a = xp.moveaxis(labels, axis, 0)
        first, second = a[:-1].ravel(), a[1:].ravel()
        touching = (first != second) & small_on_device[first] & small_on_device[second]
        pairs.append(xp.stack([first[touching], second[touching]]).astype(xp.int64))
    owner, neighbour = to_host(xp.concatenate(pairs, axis=1))
    graph = coo_matrix((np.ones(owner.size), (owner, neighbour)), shape=(count + 1, count + 1))
    _, group = connected_components(graph, directed=False)
    total = np.bincount(group, weights=sizes, minlength=group.max() + 1)
    # A group is named by its lowest id; big particles are their own group.
    head = np.full(group.max() + 1, count + 1, dtype=np.int64)
    np.minimum.at(head, group, np.arange(count + 1))
    mapping = head[group]
    mapping[small & (total[group] < min_voxels)] = 0
    mapping[0] = 0
    if renumber:
        kept = np.zeros(count + 1, dtype=np.int64)
        kept[mapping[mapping > 0]] = 1
        mapping = np.cumsum(kept)[mapping] * (mapping > 0)
    return xp.asarray(mapping.astype(np.int32))[labels]
