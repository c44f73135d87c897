"""Particle outlines at the steepest point of their edges, not at the threshold's level.

A global threshold draws every outline at one intensity. Where a particle's
edge is a ramp whose midpoint lies beyond that level (a soft TEM edge, a
blurred SEM rim, a particle dimmer than the rest), the steepest point of the
ramp, where the particle ends, lies outside the threshold's contour; where
the midpoint lies short of it (a bright particle, a threshold set low for
dim ones), inside. :func:`edge_outlines` moves each particle's outline by
whole rings of pixels, outward (up to ``OUTLINE_MAX_STEP``) or one ring
inward, to where the image's gradient is steepest on average over the ring,
and leaves it where it is when no ring is clearly steeper (a blurred step
edge, whose midpoint the threshold already found).
"""
from __future__ import annotations

import itertools

import numpy as np

from gpu_pipeline._backend import get_array_module, ops_for
from gpu_pipeline.stages.components import relabel_by_first_voxel

#: What ``separate``'s ``outline`` (``declump run --outline``) takes.
OUTLINES = ("auto", "edge", "threshold")
#: Rings of pixels an outline may move outward (inward: one, ``edge_outlines(inward=True)``): a refinement of
#: the threshold's contour, never a second segmentation.
OUTLINE_MAX_STEP = 2
#: A ring is taken when its mean gradient exceeds the outline's own (the particle's pixels next to the
#: background) by more than this fraction. On a blurred step edge the threshold's contour lies within half a
#: pixel of the steepest point and the rings on either side of it are about equally steep: there sampling and
#: noise decide. 0.05, 0.1 and 0.2 were compared at the defaults on every set of bench.defaults_sweep at once
#: (2026-12-05): 0.2 is the smallest of them that leaves every generated set (discs, whose ground truth is
#: exact) as it was; 0.1 moved some of their outlines outward (mean F1, discs of radius 3-30 0.572 -> 0.568,
#: 5 in 1024^2 0.810 -> 0.802) and scored the EMPS images higher than 0.2 (mean F1 0.570 / 0.510 against
#: 0.564 / 0.499 on emps_subset / emps_train_rest): the conservative value, not the best one on the real images
#: (defaults_sweep_2026-12-05_s40_outlines.md; README, Automatic choices). Chosen for outward rings; the
#: inward ring, added at the same margin, changes no generated disc set either
#: (defaults_sweep_2026-12-05_s40_outlines_inward.md).
OUTLINE_MARGIN = 0.2


def _box_maximum(array):
    """The maximum over each voxel's 3x3(x3) box (edge values replicated)."""
    return ops_for(array).maximum_filter(array, (3,) * array.ndim)


def gradient_magnitude_at(image, at, spacing):
    """``sqrt(sum(g * g for g in gradient(image as float32, *spacing)))`` at the flat indices ``at`` (C order)
    only: NumPy's central differences inside, one-sided ones at the image's edges (``edge_order=1``), each from
    the two values it reads, so the same float32 values as the whole image's gradient where it is read.

    The outlines read it on the pixels next to the particles' edges, a small share of a large image (a 4096^2
    EM image's whole gradient took 0.3 s of its 1.9 s outline step on the 2-core VM)."""
    xp = get_array_module(image)
    if min(image.shape) < 2:  # NumPy's own refusal (too few values along an axis for a gradient)
        whole = xp.sqrt(sum(g * g for g in xp.gradient(image.astype(xp.float32), *(float(s) for s in spacing))))
        return whole.reshape(-1)[at]
    values = image.reshape(-1)  # (each value read is converted as the whole image was)
    total = 0
    for axis, (n, step) in enumerate(zip(image.shape, spacing)):
        stride = int(np.prod(image.shape[axis + 1:], dtype=np.int64))
        coord = (at // stride) % n
        inner = (coord > 0) & (coord < n - 1)
        diff = (values[xp.where(coord < n - 1, at + stride, at)].astype(xp.float32)
                - values[xp.where(coord > 0, at - stride, at)].astype(xp.float32))
        g = xp.where(inner, diff / (2.0 * float(step)), diff / float(step))
        total = total + g * g
    return xp.sqrt(total)


def edge_outlines(labels, image, spacing, *, allowed=None, max_step=OUTLINE_MAX_STEP, inward=True,
                  margin=OUTLINE_MARGIN):
    """Move each particle's outline to the steepest ring of its edge: ``(labels, moved)``.

    ``image``: the intensities the foreground was thresholded from (smoothed
    as they were); ``spacing``: per axis, for the gradient. Rings: the
    background pixels whose 3x3 box holds exactly one particle (ring 1),
    then exactly one particle or ring (ring 2, ...), up to ``max_step``; a
    background pixel between two particles is never taken, so particles are
    not joined and gaps between them stay. ``allowed`` (bool, optional): the
    only pixels the rings may take (e.g. not the annotation zone). With
    ``inward``, the ring inside: the particle's pixels next to its outline.
    Per particle, the mean gradient magnitude over its outline (its pixels
    next to background that the rings may take) and over each ring is
    compared; the particle takes its rings up to the steepest one, or gives
    up its outline when the ring inside is the steepest, when that one's
    mean is more than ``1 + margin`` times the outline's. Taken pixels
    joined to their particle only through a corner go back to the
    background, and a particle its outline's removal would leave in pieces
    or empty (thinner than three pixels somewhere) keeps it: each particle
    stays one face-connected piece.

    Returns the labels renumbered 1..n by first voxel (the same particles)
    and the number of particles whose outline moved; ``labels`` itself when
    none would.
    """
    xp = get_array_module(labels)
    count = int(labels.max()) if labels.size else 0
    if count == 0 or (max_step < 1 and not inward):
        return labels, 0
    own = labels.astype(xp.int32, copy=False)
    # The rings, as flat indices into the labels padded by one (the frame: nothing there) and their owners:
    # one box maximum per ring over the whole image, then only its candidates (the pixels next to the
    # particles) are checked against their neighbours.
    inner = (slice(1, -1),) * own.ndim
    owner = xp.zeros(tuple(n + 2 for n in own.shape), dtype=xp.int32)
    owner[inner] = own
    takeable = xp.zeros(owner.shape, dtype=bool)
    takeable[inner] = True if allowed is None else allowed
    flat, takeable = owner.reshape(-1), takeable.reshape(-1)
    strides = [int(np.prod(owner.shape[axis + 1:])) for axis in range(own.ndim)]
    offsets = [sum(d * s for d, s in zip(step, strides))
               for step in itertools.product((-1, 0, 1), repeat=own.ndim) if any(step)]
    rings, owners = [], []
    for _ in range(max_step):
        highest = _box_maximum(owner).reshape(-1)
        at = xp.flatnonzero((flat == 0) & (highest > 0) & takeable)
        who = highest[at]
        alone = xp.ones(at.size, dtype=bool)  # no other particle (or ring of one) in the pixel's box
        for offset in offsets:
            beside = flat[at + offset]
            alone &= (beside == 0) | (beside == who)
        at, who = at[alone], who[alone]
        flat[at] = who  # (the next ring grows from this one)
        rings.append(xp.ravel_multi_index(tuple(i - 1 for i in xp.unravel_index(at, owner.shape)), own.shape))
        owners.append(who)
    open_ = own == 0 if allowed is None else (own == 0) & allowed
    edge = (own > 0) & (_box_maximum(open_.view(xp.int8)) > 0)  # the outlines, facing what rings may take
    outline = xp.flatnonzero(edge)
    own_flat = own.reshape(-1)

    def mean_gradient(at, ids):
        total = xp.bincount(ids, weights=gradient_magnitude_at(image, at, spacing), minlength=count + 1)
        pixels = xp.bincount(ids, minlength=count + 1)
        return xp.where(pixels > 0, total / xp.maximum(pixels, 1), -1.0)  # -1: no such pixel

    bands = [mean_gradient(outline, own_flat[outline])] + [mean_gradient(at, who) for at, who in zip(rings, owners)]
    shifts = list(range(max_step + 1))
    if inward:  # the ring of the particle's own pixels just inside its outline
        within = xp.flatnonzero((own > 0) & ~edge & (_box_maximum(edge.view(xp.int8)) > 0))
        bands.append(mean_gradient(within, own_flat[within]))
        shifts.append(-1)
    means = xp.stack(bands)
    shift = xp.asarray(shifts)[xp.argmax(means, axis=0)]  # 0 where the outline is the steepest (ties keep it)
    shift = xp.where(means.max(axis=0) > (1.0 + margin) * means[0], shift, 0)
    shift[0] = 0
    if not bool((shift != 0).any()):
        return labels, 0
    grown = own.copy().reshape(-1)
    take = xp.zeros(grown.size, dtype=bool)
    for k, (at, who) in enumerate(zip(rings, owners), start=1):
        chosen = shift[who] >= k
        grown[at[chosen]] = who[chosen]
        take[at[chosen]] = True
    shrunk = shift < 0
    grown[outline[shrunk[own_flat[outline]]]] = 0
    grown, take = grown.reshape(own.shape), take.reshape(own.shape)
    pieces = ops_for(grown).label_by_value(grown)
    # A ring pixel may touch its particle only at a corner: pieces of the grown particles that hold none of their
    # pixels from before (each particle was one face-connected piece) are given back to the background.
    home = xp.zeros(count + 1, dtype=pieces.dtype)
    ops_for(home).scatter_max(home, own.ravel(), pieces.ravel())
    grown = xp.where(take & (pieces != home[grown]), 0, grown)
    if bool(shrunk.any()):
        # A particle whose outline, taken off, leaves it in several pieces or none (thinner than three pixels
        # somewhere) keeps its outline.
        kept = grown.reshape(-1)
        at = xp.flatnonzero((kept > 0) & shrunk[kept])
        span = int(pieces.max()) + 1
        key = kept[at].astype(xp.int64) * span + pieces.reshape(-1)[at]
        count_pieces = xp.bincount(xp.unique(key) // span, minlength=count + 1)
        broken = shrunk & (count_pieces != 1)
        back = outline[broken[own_flat[outline]]]
        kept[back] = own_flat[back]
        shift[broken] = 0
    moved = int((shift != 0).sum())
    return relabel_by_first_voxel(grown.astype(labels.dtype, copy=False)), moved
