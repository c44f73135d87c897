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
from gpu_pipeline._common import weighted_median
from gpu_pipeline.stages.components import component_table

#: ``min_distance="auto"`` is this fraction of a particle radius measured on the foreground, per number of
#: dimensions: in 2D the typical radius (:func:`typical_radius`), in 3D the median depth of the distance map's
#: maxima (:func:`maxima_radius`).
#: 2D: 0.5, chosen on EMPS half 1 (see bench). Revisited (2026-12-01 sweep on emps_subset and nuclei seeds 0-3,
#: sigma rule on, size rule 0.15): 0.75 gives emps_subset 0.312 instead of 0.287 but the nuclei 0.812 instead
#: of 0.905 (touching nuclei merge), so it stays 0.5; EMPS over-splitting is met by the sigma and size rules in
#: gpu_pipeline.pipeline instead. Smaller, revisited 2026-12-05 at the full defaults
#: (defaults_sweep_2026-12-05_s41_window030/035/040.md against ..._s40_outlines_inward.md): 0.3 / 0.35 / 0.4
#: raise every generated 2D set (base 2D 0.841 -> 0.871 / 0.872 / 0.862; a small disc pressed against a large
#: one keeps its own maximum in the smaller window) and DSB (0.767 -> 0.776), but on the EMPS images more
#: F1@0.5 fall than rise at each (emps_subset 21 / 19 / 14 down, 14 / 10 / 14 up; emps_train_rest 50 / 38 / 28
#: down, 34 / 29 / 21 up; pooled 0.6035 -> 0.5873 / 0.5908 / 0.5991 and 0.6687 -> 0.6739 / 0.6721 / 0.6682):
#: 0.5 stays, on the real images' side.
#: 3D: 0.5 of the maxima's median depth. The typical radius follows the largest particles there (a cluster of
#: touching spheres is as deep as its largest), and a window in proportion to it merged the smaller spheres;
#: each sphere has its own maximum. At the full defaults (2026-12-04), mean F1@0.5 on 24 random 160^3 volumes
#: (bench.random_volumes draws, rng 31 and 32): 0.4 x the typical radius 0.9792, 0.5 x the maxima's depth
#: 0.9876 (11 higher, 1 lower); on six 256^3 volumes whose largest radius is 4-8 x the smallest
#: 0.833 -> 0.894 (all six higher). 0.45 and 0.4 of it gave 0.9877 and 0.9710 (0.5468 on one volume, a window
#: under two voxels) on the first set; the embryo 3D nuclei (textured, real, similar sizes) keep 0.840 at 0.5
#: and 0.45 and lose at 0.4 (0.815). Before, 0.4 x the typical radius: 0.33 and 0.25 of it over-split the embryo
#: (0.830, and 0.166 with 80 pieces for 8).
MIN_DISTANCE_PER_RADIUS = {2: 0.5, 3: 0.5}


def component_depths(mask, spacing, return_distance=False, table=None):
    """Per face-connected component of ``mask``: size in voxels and deepest distance (physical), on the host;
    with ``return_distance`` also the distance transform of ``mask`` it was measured on (None when empty).
    ``table``: ``mask``'s ``(labels, count, sizes)`` where they are known
    (:func:`gpu_pipeline.stages.components.component_table`)."""
    xp = get_array_module(mask)
    ops = ops_for(mask)
    labels, count, sizes = component_table(mask) if table is None else table
    if count == 0:
        empty = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
        return (*empty, None) if return_distance else empty
    distance = ops.distance_transform(mask, spacing)
    # A component with no background anywhere has infinite distances: cap them at the image's diagonal.
    diagonal = math.sqrt(sum((n * float(d)) ** 2 for n, d in zip(mask.shape, spacing)))
    depth = xp.zeros(count + 1, dtype=xp.float32)
    ops.scatter_max(depth, labels.ravel(), distance.ravel())
    depth = xp.minimum(depth, xp.float32(diagonal))  # = the maximum of the capped distances
    out = to_host(sizes[1:]).astype(np.int64), to_host(depth[1:]).astype(np.float64)
    return (*out, distance) if return_distance else out


def typical_radius(mask, spacing, return_distance=False, table=None):
    """The size-weighted median of the components' inscribed radii (physical units); with ``return_distance``
    ``(radius, distance)``, the distance transform of ``mask`` it was measured on (the pipeline keeps it:
    :func:`gpu_pipeline.stages.distance.cleaned_distance`).

    ``table``: ``mask``'s component table where it is known (:func:`component_depths`).

    Raises :class:`DeclumpError` when ``mask`` is empty (there is nothing to measure).
    """
    sizes, depths, distance = component_depths(mask, spacing, return_distance=True, table=table)
    if sizes.size == 0:
        raise DeclumpError("min_distance='auto' found no foreground to measure the particle size on; "
                           "check polarity or threshold, or set --min-distance")
    radius = weighted_median(depths, sizes)
    return (radius, distance) if return_distance else radius


def maxima_radius(distance, spacing):
    """The median depth (physical units) of the local maxima of the distance map ``distance``: voxels equal to
    the maximum of their 3x3(x3) box and deeper than 1.5 voxels of the coarsest axis, one per face-connected
    plateau (face neighbours that are both maxima are equal, so a plateau has one value); None where there is
    none.

    Every particle of a cluster has a maximum at its centre about as deep as its radius, so the median follows
    the particles' radii, the small ones included; :func:`typical_radius` follows the largest particles.
    """
    xp = get_array_module(distance)
    ops = ops_for(distance)
    peaks = ops.local_maxima(distance, 1.5 * max(float(d) for d in spacing))
    labels, count = ops.label(peaks)
    if count == 0:
        return None
    depth = xp.zeros(count + 1, dtype=xp.float32)
    ops.scatter_max(depth, labels[peaks], distance[peaks])  # the maxima only: a few voxels in a thousand
    return float(np.median(to_host(depth[1:])))


#: Voxels sampled (whole rows along the last axis, evenly spaced) by :func:`contrast_to_noise`.
CNR_SAMPLE = 1 << 20


def contrast_to_noise(image, fg):
    """The particles' contrast over the image's noise: ``|median(particles) - median(background)|`` of
    ``image`` on the two sides of the foreground ``fg``, over the noise's standard deviation estimated from
    neighbouring voxels along the last axis (1.4826 MAD of their differences over sqrt 2: edges are few, so
    the differences are the noise's). Measured on evenly spaced rows, about :data:`CNR_SAMPLE` voxels.
    Where the noise is correlated (a blurred detector), the differences understate it and the ratio is
    higher. None where a side is empty or the differences show no noise."""
    xp = get_array_module(image)
    width = int(image.shape[-1])
    if width < 2:
        return None
    # Every k-th row along each leading axis: a view of the image (a reshape would copy a non-contiguous one).
    lead = image.shape[:-1]
    k = max(1, math.ceil((math.prod(lead) * width / CNR_SAMPLE) ** (1.0 / len(lead))))
    sample = (slice(None, None, k),) * len(lead) + (slice(None),)
    values, inside = image[sample].astype(xp.float32), fg[sample]
    if not bool(inside.any()) or bool(inside.all()):
        return None
    contrast = abs(float(xp.median(values[inside])) - float(xp.median(values[~inside])))
    steps = xp.diff(values, axis=-1).ravel()
    noise = 1.4826 * float(xp.median(xp.abs(steps - xp.median(steps)))) / math.sqrt(2.0)
    return contrast / noise if noise > 0 else None


def smoothed_noise_share(voxel_sigmas) -> float:
    """The share of white noise's standard deviation that a Gaussian of ``voxel_sigmas`` (per axis, voxels)
    leaves: the product over axes of ``(2 sqrt(pi) sigma)^(-1/2)``, each factor at most 1."""
    share = 1.0
    for sigma in voxel_sigmas:
        share /= math.sqrt(max(2.0 * math.sqrt(math.pi) * float(sigma), 1.0))
    return share


#: ``sigma="auto"`` in 3D: smoothing is raised from one voxel (``NOISE_SIGMA_STEPS`` times it) until the
#: particles' contrast is at least this many times the noise it leaves (:func:`contrast_to_noise` over
#: :func:`smoothed_noise_share`). A noisy foreground's rough surface puts several maxima on each particle's
#: distance map and over-splits it. Chosen 2026-12-06 on generated 96x128x128 volumes (contrast 0.07-0.45 on
#: a 0.15 background, noise 0.05-0.15, radius 3-6 and 5-10, seeds 0-1): at a contrast-to-noise of 1.7 and
#: above one voxel scores best or equal (1.5 voxels lose up to 0.16), below 1.4 1.5 voxels (0.44 -> 0.93 at
#: 0.95), below 0.7 two. The threshold 10 puts the step from 1 to 1.5 voxels at 1.5 and to 2 at 0.82. On
#: seeds 2-3, not used to choose it (``python -m bench.noise_sigma``, 60 volumes): mean F1@0.5 0.754 at one
#: voxel, 0.845 with the step, 0.852 with the best fixed sigma per volume (docs/design_notes.md).
NOISE_CNR = 10.0
NOISE_SIGMA_STEPS = (1.0, 1.5, 2.0, 3.0, 4.0)


def noise_sigma(image, fg, spacing, sigma):
    """The smallest of ``NOISE_SIGMA_STEPS`` times ``sigma`` (physical) at which the particles' contrast in
    ``image`` (their foreground ``fg`` at ``sigma``) is at least :data:`NOISE_CNR` times the noise left by that
    smoothing; the largest step where none is; ``sigma`` where the contrast cannot be measured."""
    cnr = contrast_to_noise(image, fg)
    if cnr is None:
        return sigma
    for step in NOISE_SIGMA_STEPS:
        if cnr >= NOISE_CNR * smoothed_noise_share([step * sigma / s for s in spacing]):
            return step * sigma
    return NOISE_SIGMA_STEPS[-1] * sigma
