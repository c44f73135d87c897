"""The particles' scale, measured from the foreground: what ``min_distance="auto"`` and hole filling rely on.

Each connected component's deepest point (the maximum of its distance map)
is its inscribed radius; in a cluster of touching particles it is about one
particle's radius, not the cluster's. The typical radius is the median of
these depths weighted by component size, so that specks (many, tiny) do not
drag it down and one frame-filling particle does not need special casing.
"""
from __future__ import annotations

import math

import numpy as np

from gpu_pipeline._backend import DeclumpError, get_array_module, ops_for, to_host

#: ``min_distance="auto"`` is this fraction of the typical particle radius (chosen on EMPS half 1, see bench).
#: Revisited (2026-12-01 sweep on emps_subset and nuclei seeds 0-3, sigma rule on, size rule 0.15): 0.75
#: gives emps_subset 0.312 instead of 0.287 but the nuclei 0.812 instead of 0.905 (touching nuclei merge), so
#: it stays 0.5; EMPS over-splitting is met by the sigma and size rules in gpu_pipeline.pipeline instead.
MIN_DISTANCE_PER_RADIUS = 0.5


def component_depths(mask, spacing):
    """Per face-connected component of ``mask``: size in voxels and deepest distance (physical), on the host."""
    xp = get_array_module(mask)
    ops = ops_for(mask)
    labels, count = ops.label(mask)
    if count == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
    # A component with no background anywhere has infinite distances: cap them at the image's diagonal.
    diagonal = math.sqrt(sum((n * float(d)) ** 2 for n, d in zip(mask.shape, spacing)))
    distance = xp.minimum(ops.distance_transform(mask, spacing), xp.float32(diagonal))
    depth = xp.zeros(count + 1, dtype=xp.float32)
    ops.scatter_max(depth, labels.ravel(), distance.ravel().astype(xp.float32))
    sizes = xp.bincount(labels.ravel(), minlength=count + 1)
    return to_host(sizes[1:]).astype(np.int64), to_host(depth[1:]).astype(np.float64)


def typical_radius(mask, spacing) -> float:
    """The size-weighted median of the components' inscribed radii (physical units).

    Raises :class:`DeclumpError` when ``mask`` is empty (there is nothing to measure).
    """
    sizes, depths = component_depths(mask, spacing)
    if sizes.size == 0:
        raise DeclumpError("min_distance='auto' found no foreground to measure the particle size on; "
                           "check polarity or threshold, or set --min-distance")
    order = np.argsort(depths, kind="stable")
    cumulative = np.cumsum(sizes[order])
    return float(depths[order][int(np.searchsorted(cumulative, cumulative[-1] / 2))])
