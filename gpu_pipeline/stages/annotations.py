"""Figure annotations in 2D images: scale bars and info bands that a threshold turns into "particles".

Figure panels carry scale bars (solid axis-aligned bars) and info bands
(a strip across the whole width at the top or bottom). Both are filled,
axis-aligned rectangles, which particles almost never are, so removing
components shaped like that is safe; text and panel letters are not
rectangles and stay (a rule for them would also remove small particles).
"""
from __future__ import annotations

from gpu_pipeline._backend import get_array_module, ops_for

#: A component filling at least this fraction of its bounding box is rectangle-like.
RECTANGULARITY = 0.9
#: ... and is a scale bar when its bounding box is at least this many times longer than wide.
BAR_ASPECT = 4.0
#: ... and at least this many pixels long (thin specks are min_size's business).
BAR_MIN_LENGTH = 16
#: ... or an info band when it spans at least this fraction of the image width.
BAND_WIDTH = 0.9


def annotation_mask(mask):
    """The components of a 2D ``mask`` shaped like scale bars or info bands (bool, same shape).

    3D masks have no annotations: returns all False.
    """
    xp = get_array_module(mask)
    if mask.ndim != 2:
        return xp.zeros(mask.shape, dtype=bool)
    ops = ops_for(mask)
    labels, count = ops.label(mask)
    if count == 0:
        return xp.zeros(mask.shape, dtype=bool)
    flat = labels.ravel()
    rows, cols = (xp.broadcast_to(g, mask.shape).ravel() for g in xp.ogrid[:mask.shape[0], :mask.shape[1]])
    extent = []
    for coord in (rows, cols):
        low = xp.full(count + 1, max(mask.shape), dtype=xp.int32)
        high = xp.full(count + 1, -1, dtype=xp.int32)
        ops.scatter_min(low, flat, coord.astype(xp.int32))
        ops.scatter_max(high, flat, coord.astype(xp.int32))
        extent.append((high - low + 1).astype(xp.float64))
    height, width = extent
    area = xp.bincount(flat, minlength=count + 1).astype(xp.float64)
    rectangular = area >= RECTANGULARITY * height * width
    long_side = xp.maximum(height, width)
    short_side = xp.minimum(height, width)
    bar = rectangular & (long_side >= BAR_ASPECT * short_side) & (long_side >= BAR_MIN_LENGTH)
    band = rectangular & (width >= BAND_WIDTH * mask.shape[1]) & (height < 0.5 * mask.shape[0])
    drop = bar | band
    drop[0] = False
    return drop[labels]
