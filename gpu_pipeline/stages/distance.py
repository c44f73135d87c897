"""The distance map of the cleaned foreground from the one the scale measurement already computed.

The ``auto`` sizes (:func:`gpu_pipeline.stages.scale.typical_radius`) take
the exact distance transform of the thresholded foreground; cleanup then
removes whole objects and fills small holes, and the pipeline needs the
transform of that cleaned mask. Computing it again costs a second full
transform (about an eighth of a 3D run at the bench's parameters). It differs
from the first only near what cleanup changed:

- **Removed objects** are whole face-connected components of the mask they
  were removed from (the mask with its holes filled). They become zero, and
  no other voxel comes closer to the background through them: for voxels
  ``x`` and ``s`` of different components, the lattice path from ``x`` to
  ``s`` that moves one axis at a time towards ``s`` stays in their bounding
  box, so every point on it is at most ``|x - s|`` from ``x`` (with any
  spacing), and it must cross the background.
- **Filled holes** (background components, now foreground) change the voxels
  whose nearest background voxel lay in a hole: those are at most as far from
  the hole as their old distance, so within the old map's maximum ``R`` of
  it. Those voxels are recomputed on crops: the blocks holding filled voxels,
  widened by ``R``, transformed with ``R`` more around them; a crop's values
  are exact where they do not exceed that margin (the background beyond it is
  farther), which is checked, and the whole transform is taken where the
  check fails or the crops would cost more than it.

So the result is the transform of the cleaned mask, value for value (tested
against it on random masks, with anisotropic spacing, with the CPU's compiled transform
and with the GPU's array-module transform run on NumPy; on CuPy only inside the
pipeline, in the H200 check of 2026-12-04).
"""
from __future__ import annotations

import math

import numpy as np

from gpu_pipeline._backend import get_array_module, ops_for, to_host

#: Edge of the blocks (voxels) that locate filled holes.
HOLE_BLOCK = 8
#: Crops are used while their voxels total at most this fraction of the volume's (else one whole transform).
CROP_BUDGET = 0.5


def cleaned_distance(distance, before, after, spacing):
    """The exact distance transform of ``after`` (as ``ops.distance_transform`` gives it), from ``distance``,
    that of ``before``; ``after`` is ``before`` with holes filled, then objects removed
    (:func:`gpu_pipeline.stages.cleanup.clean_mask`). ``distance`` is overwritten and returned."""
    xp = get_array_module(distance)
    ops = ops_for(distance)
    removed = before > after  # (bools: True > False) objects removed; the background is 0 already
    if bool(removed.any()):
        distance[removed] = 0
    del removed
    added = after > before
    if not bool(added.any()):
        return distance
    reach = float(distance.max())  # no voxel's nearest background lies farther than this, before the fill
    if not math.isfinite(reach):
        return ops.distance_transform(after, spacing)
    margin = [int(math.ceil(reach / float(s))) + 1 for s in spacing]
    where = to_host(xp.flatnonzero(added.ravel()))  # (few; argwhere on the whole mask costs three times more)
    blocks = np.unique(np.stack(np.unravel_index(where, added.shape), axis=1) // HOLE_BLOCK, axis=0)
    crops = []
    for block in blocks:
        inner = tuple(slice(max(0, int(b) * HOLE_BLOCK - m), min(n, (int(b) + 1) * HOLE_BLOCK + m))
                      for b, m, n in zip(block, margin, after.shape))
        outer = tuple(slice(max(0, i.start - m), min(n, i.stop + m)) for i, m, n in zip(inner, margin, after.shape))
        crops.append((inner, outer))
    if sum(math.prod(s.stop - s.start for s in outer) for _, outer in crops) > CROP_BUDGET * after.size:
        return ops.distance_transform(after, spacing)
    # A crop's value is exact where it does not exceed the physical margin beyond the block's widened box.
    exact_up_to = min(m * float(s) for m, s in zip(margin, spacing))
    update = []
    for inner, outer in crops:
        values = ops.distance_transform(after[outer], spacing)
        values = values[tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner, outer))]
        if float(values.max()) > exact_up_to:
            return ops.distance_transform(after, spacing)
        update.append((inner, values))
    for inner, values in update:  # overlapping boxes carry equal (exact) values
        distance[inner] = values
    return distance
