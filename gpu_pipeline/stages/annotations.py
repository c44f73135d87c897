"""Figure annotations in 2D images: scale bars, info bands, text and panel letters that would come out as particles.

Figure panels carry scale bars and info bands (filled axis-aligned
rectangles in the foreground, which particles almost never are) and text:
"50 nm", panel letters, microscope info. Text and bars are drawn in a pure
ink, at the very end of the image's dtype range (0 or 255 in 8 bits), in
strokes a few pixels wide; particles are neither. :func:`annotation_ink`
finds such ink from the image itself, so it works for any foreground (a
threshold or a pixel classifier), and :func:`annotation_mask` the
rectangles of a foreground.
"""
from __future__ import annotations

import numpy as np

from gpu_pipeline._backend import get_array_module, ops_for
from gpu_pipeline._common import to_host

#: A component filling at least this fraction of its bounding box is rectangle-like.
RECTANGULARITY = 0.9
#: ... and is a scale bar when its bounding box is at least this many times longer than wide.
BAR_ASPECT = 4.0
#: ... and at least this many pixels long (thin specks are min_size's business).
BAR_MIN_LENGTH = 16
#: ... or an info band when it spans at least this fraction of the image width.
BAND_WIDTH = 0.9
#: Ink: values within this fraction of the dtype's range of its minimum or maximum (1 of 255 in 8 bits:
#: compression noise). On the 366 EMPS images 6 of 8,927 true particles have half or more of their pixels there.
INK_TOLERANCE = 1 / 255
#: Ink pixels this close (pixels) are measured as one piece (a glyph that anti-aliasing broke up).
INK_GAP = 1.5
#: ... and is drawn: the image in a ring ``INK_RING`` pixels wide around it differs from the ink value by at
#: least ``INK_CONTRAST`` of the dtype's range on average.
INK_RING = 2.0
INK_CONTRAST = 0.25
#: ... in strokes: an ink component whose inscribed radius is at most this many pixels (glyph strokes and bars,
#: not a clipped background or particle) ...
STROKE_RADIUS = 8
#: ... elongated: its area is at least this many times its inscribed radius squared (a disk's is pi; a
#: stroke's is twice its length over its half width), and at least ``INK_MIN_PIXELS`` pixels.
STROKE_ELONGATION = 10
INK_MIN_PIXELS = 20
#: ... and the piece its ink pixels make up together (joined across ``INK_GAP``) has an inscribed radius of at
#: most this many pixels, or at most ``STROKE_PIECE_MARGIN`` more than its ink's own (solid strokes: their
#: joined piece is as wide as they are, plus the gap and the corners where strokes meet), so a saturated
#: particle's speckled core (thin ink pixels, a wide piece) is not a stroke while bold glyphs stay strokes.
STROKE_PIECE_RADIUS = 6
STROKE_PIECE_MARGIN = 4
#: ... or a filled rectangle (``RECTANGULARITY``, ``BAR_ASPECT``, ``BAR_MIN_LENGTH``) of any thickness; never a
#: frame around the whole panel (bounding box over ``BAND_WIDTH`` of both axes).
#: ... and lies in the panel's margin: wholly within this fraction of the height or width from an edge, where
#: figures put labels, scale bars and text. Where such strokes of one extreme also lie in the middle of the
#: panel, they are the particles' own saturated values (generated disks, clipped dark rods), and no stroke of
#: that extreme is taken for ink; likewise bars with bars.
EDGE_BAND = 0.25
#: A label box (a panel letter's white or black box) is ink too: at most this fraction of the panel.
BOX_MAX_SHARE = 0.05
#: Text comes in words and labels. A round stroke piece (its box less than ``LONE_ASPECT`` times as long as
#: wide: a glyph, or a particle's clipped core; not a line, a bar, or a word whose glyphs joined) is ink only
#: with another kept piece of ink beside it on its line of text (boxes sharing ``COMPANION_LINE`` of the lower
#: one's rows, at most ``COMPANION_REACH`` times its extent apart along the line), or in a corner of the panel
#: (reaching into the ``EDGE_BAND`` of a row edge and of a column edge: a panel letter). A lone round piece
#: along an edge is a saturated particle's core. Measured 2026-12-05 on bench.defaults_sweep's generated 2D
#: sets (seeds 0-9, both polarities, 120 images): 34 images had such "ink", 66 particles under it, before the
#: rule; 12 and 18 with it (in corners, or beside another clipped core on a line). At the defaults, F1@0.5 of
#: 3 in 512^2 0.875 -> 0.941, 5 in 1024^2 0.889 -> 0.966, sparse 20 in 512^2 0.769 -> 0.844; on the 366 EMPS
#: images the ink of 10 changes (clipped cores and particle edges no longer ink: 406975041a, 6d1574872b,
#: f32c7bd62b; glyph fragments lost: 2bc87a8698, 707120d0f5, b392e4784f) and F1@0.5 of none
#: (defaults_sweep_2026-12-05_s41_lone_strokes.md). The corners stay wide: EMPS panel letters reach 0.14-0.25
#: of the panel from its edges, as deep as the generated cores left in corners (0.12-0.24).
COMPANION_REACH = 2.0
LONE_ASPECT = 2.5
COMPANION_LINE = 0.5
#: Pairs of kept ink pieces compared at once by :func:`_lone_strokes` (whole rows of the pair table: at least
#: one): bounded memory whatever the number of pieces.
COMPANION_PAIRS = 1 << 21
#: The ink is removed with a margin of this many pixels (anti-aliased and blurred stroke edges).
#: Chosen by looking at emps_subset; its safety on all 366 EMPS images (true particles in the zone removed) is
#: measured by bench/auto_foreground.py ("annotation safety"; see README): saturated dark rods look like strokes.
INK_MARGIN = 3


def _extents(labels, count, shape):
    """Bounding-box height and width per label (index 0: background), float64."""
    (top, bottom), (left, right) = _bounds(labels, count, shape)
    return bottom - top + 1, right - left + 1


def _bounds(labels, count, shape, where=None):
    """Bounding box per label: ((first row, last row), (first column, last column)), float64 each. ``where``:
    the flat indices of the only pixels to look at (those of the labels that matter, where they are few)."""
    xp = get_array_module(labels)
    ops = ops_for(labels)
    if where is None:
        flat = labels.ravel()
        rows, cols = (xp.broadcast_to(g, shape).ravel() for g in xp.ogrid[:shape[0], :shape[1]])
    else:
        flat, (rows, cols) = labels.ravel()[where], (where // shape[1], where % shape[1])
    extent = []
    for coord in (rows, cols):
        low = xp.full(count + 1, max(shape), dtype=xp.int32)
        high = xp.full(count + 1, -1, dtype=xp.int32)
        ops.scatter_min(low, flat, coord.astype(xp.int32))
        ops.scatter_max(high, flat, coord.astype(xp.int32))
        extent.append((low.astype(xp.float64), high.astype(xp.float64)))
    return extent


def _in_margin(top, bottom, left, right, shape):
    """Which bounding boxes lie wholly within ``EDGE_BAND`` of an edge of a panel of ``shape``."""
    rows, cols = shape
    return ((bottom < EDGE_BAND * rows) | (top >= (1 - EDGE_BAND) * rows)
            | (right < EDGE_BAND * cols) | (left >= (1 - EDGE_BAND) * cols))


def _bars(area, height, width):
    """Which components are filled, long axis-aligned rectangles (scale bars)."""
    xp = get_array_module(area)
    long_side, short_side = xp.maximum(height, width), xp.minimum(height, width)
    return ((area >= RECTANGULARITY * height * width) & (long_side >= BAR_ASPECT * short_side)
            & (long_side >= BAR_MIN_LENGTH))


def annotation_mask(mask):
    """The components of a 2D ``mask`` shaped like scale bars or info bands (bool, same shape).

    3D masks have no annotations: returns all False.
    """
    xp = get_array_module(mask)
    if mask.ndim != 2:
        return xp.zeros(mask.shape, dtype=bool)
    labels, count = ops_for(mask).label(mask)
    if count == 0:
        return xp.zeros(mask.shape, dtype=bool)
    height, width = _extents(labels, count, mask.shape)
    area = xp.bincount(labels.ravel(), minlength=count + 1).astype(xp.float64)
    band = ((area >= RECTANGULARITY * height * width) & (width >= BAND_WIDTH * mask.shape[1])
            & (height < 0.5 * mask.shape[0]))
    drop = _bars(area, height, width) | band
    drop[0] = False
    return drop[labels]


def annotation_ink(image):
    """The pixels of a 2D integer ``image`` drawn in annotation ink: text, letters and bars (bool, same shape).

    Ink is a connected run of values at the dtype's minimum or maximum
    (within ``INK_TOLERANCE``) that is a thin elongated stroke
    (``STROKE_RADIUS``, ``STROKE_ELONGATION``, ``INK_MIN_PIXELS``) or a
    filled bar, lies within ``EDGE_BAND`` of an edge of the panel, and is
    not a frame around it; where strokes (bars) of an extreme lie in the
    middle of the panel too, that extreme's strokes (bars) are the
    particles' own (none of them is ink). A round stroke (a glyph's size
    and shape) with no other ink beside it on its line, outside the
    panel's corners, is a particle's clipped core too (:func:`_lone_strokes`,
    ``COMPANION_REACH``). A label box, the filled box of one extreme around
    a panel letter (ink of the other extreme, or grey), is ink too
    (:func:`_label_boxes`).
    Float images (no ink value) and 3D volumes have none: all False.
    """
    xp = get_array_module(image)
    none = xp.zeros(image.shape, dtype=bool)
    if image.ndim != 2 or np.dtype(image.dtype).kind not in "ui":
        return none
    ops = ops_for(image)
    info = np.iinfo(image.dtype)
    tolerance = int((int(info.max) - int(info.min)) * INK_TOLERANCE)
    found = []  # per extreme: its pieces, those kept, those kept as strokes, their boxes
    extremes = ((info.min, image <= info.min + tolerance), (info.max, image >= info.max - tolerance))
    for value, extreme in extremes:
        if not bool(extreme.any()):
            continue
        # Anti-aliasing breaks a glyph's ink into pieces a pixel apart: they are measured together (their ink
        # pixels and the deepest of them), as one piece.
        gap = ops.distance_transform(~extreme, (1.0, 1.0))
        joined = gap <= INK_GAP
        labels, count = ops.label(joined)
        # Per piece, over its own pixels only (the ink, the joined piece: a small share of the panel); label 0,
        # the rest of the panel, is never ink.
        at_ink, at_piece = xp.flatnonzero(extreme), xp.flatnonzero(joined)
        ink_of, piece_of = labels.ravel()[at_ink], labels.ravel()[at_piece]
        area = xp.bincount(ink_of, minlength=count + 1).astype(xp.float64)
        depth = xp.zeros(count + 1, dtype=xp.float32)
        ops.scatter_max(depth, ink_of, ops.distance_transform(extreme, (1.0, 1.0)).ravel()[at_ink].astype(xp.float32))
        depth = depth.astype(xp.float64)
        (top, bottom), (left, right) = _bounds(labels, count, image.shape, at_ink)  # of the ink
        height, width = bottom - top + 1, right - left + 1
        # ... and thin as a whole: a particle's clipped core is speckled (noise at the dtype's end), so its ink
        # pixels alone look thin, but the piece they make up together is as wide as the core.
        piece = xp.zeros(count + 1, dtype=xp.float32)  # the joined piece's inscribed radius
        ops.scatter_max(piece, piece_of,
                        ops.distance_transform(joined, (1.0, 1.0)).ravel()[at_piece].astype(xp.float32))
        thin = piece.astype(xp.float64) <= xp.maximum(STROKE_PIECE_RADIUS, depth + STROKE_PIECE_MARGIN)
        stroke = ((depth <= STROKE_RADIUS) & (area >= STROKE_ELONGATION * depth * depth) & (area >= INK_MIN_PIXELS)
                  & thin)
        frame = (height >= BAND_WIDTH * image.shape[0]) & (width >= BAND_WIDTH * image.shape[1])
        margin = _in_margin(top, bottom, left, right, image.shape)
        # Ink is drawn on the picture: just off it the image is far from the ink value, where the saturated
        # pixels of a bright particle (noise at the dtype's end) are surrounded by the particle's bright values.
        outer, n_outer = ops.label(gap <= INK_GAP + INK_RING)
        ring = ((gap > INK_GAP) & (gap <= INK_GAP + INK_RING)).ravel()
        outer_of = xp.zeros(count + 1, dtype=outer.dtype)
        ops.scatter_max(outer_of, piece_of, outer.ravel()[at_piece])
        ring_labels = outer.ravel()[ring]
        off = (xp.bincount(ring_labels, weights=xp.abs(image.ravel()[ring].astype(xp.float64) - float(value)),
                           minlength=n_outer + 1)
               / xp.maximum(xp.bincount(ring_labels, minlength=n_outer + 1), 1))
        drawn = off[outer_of] >= INK_CONTRAST * (float(info.max) - float(info.min))
        # Strokes and bars are judged apart: stroke-like runs of this extreme in the middle of the panel make
        # every stroke of it the particles' own values (their clipped cores), bars in the middle every bar;
        # a particle's clipped core is rarely a filled axis-aligned rectangle, so such cores in the middle
        # do not keep a scale bar in the margin.
        bar = _bars(area, height, width) & ~frame & drawn
        stroke = stroke & ~bar & ~frame & drawn
        keep = xp.zeros(count + 1, dtype=bool)
        for kind in (stroke, bar):
            kind[0] = False
            if not bool((kind & ~margin).any()):
                keep |= kind & margin
        found.append((labels, keep, keep & stroke, (top, bottom, left, right)))
    ink = none
    for (labels, keep, _, _), lone in zip(found, _lone_strokes(found, image.shape)):
        ink = ink | (keep & ~lone)[labels]
    (_, low), (_, high) = extremes
    return (ink | _label_boxes(image, ink, ((info.min, low), (info.max, high)))) & (low | high)


def _lone_strokes(found, shape):
    """Per extreme of :func:`annotation_ink`'s ``found`` (its pieces' labels, the pieces kept, those kept as
    strokes, and the boxes (top, bottom, left, right) of their ink): which of its pieces are lone, the
    round strokes (``LONE_ASPECT``) with no other kept piece of either extreme beside them on their line
    (``COMPANION_LINE``, ``COMPANION_REACH``) that do not reach into a corner of the panel. The pieces are
    compared with each other in batches of about :data:`COMPANION_PAIRS` pairs (bounded memory whatever
    their number)."""
    if not found:
        return []
    xp = get_array_module(found[0][1])
    rows, cols = shape
    ids = [xp.flatnonzero(keep) for _, keep, _, _ in found]  # the kept pieces of each extreme, together
    top, bottom, left, right = (xp.concatenate([b[k][i] for (_, _, _, b), i in zip(found, ids)]).astype(xp.int32)
                                for k in range(4))  # (pixel coordinates)
    height, width = bottom - top + 1, right - left + 1
    reach = COMPANION_REACH * xp.maximum(height, width)
    accompanied = xp.zeros(top.size, dtype=bool)
    batch = max(1, COMPANION_PAIRS // max(top.size, 1))  # rows of the pair table
    for start in range(0, top.size, batch):
        part = slice(start, start + batch)
        # On the same line of text: the boxes share at least half the lower one's rows ...
        shared = xp.minimum(bottom[part, None], bottom[None, :]) - xp.maximum(top[part, None], top[None, :]) + 1
        line = shared >= COMPANION_LINE * xp.minimum(height[part, None], height[None, :])
        # ... and lie at most ``reach`` apart along it.
        gap = xp.maximum(xp.maximum(left[None, :] - right[part, None], left[part, None] - right[None, :]), 0)
        near = line & (gap <= reach[part, None])
        near[xp.arange(near.shape[0]), xp.arange(start, start + near.shape[0])] = False  # (itself)
        accompanied[part] = near.any(axis=1)
    # In a corner: reaching into the bands of a row edge and of a column edge (it lies wholly in one of them).
    corner = (((top < EDGE_BAND * rows) | (bottom >= (1 - EDGE_BAND) * rows))
              & ((left < EDGE_BAND * cols) | (right >= (1 - EDGE_BAND) * cols)))
    # A long stroke is a line or a scale bar, alone by nature, and a word whose glyphs joined is wider than
    # tall; a lone glyph's box, and a clipped particle core's, is about as wide as tall.
    round_ = xp.maximum(height, width) < LONE_ASPECT * xp.minimum(height, width)
    alone = ~accompanied & ~corner & round_
    out, start = [], 0
    for (_, keep, strokes, _), i in zip(found, ids):
        lone = xp.zeros(keep.size, dtype=bool)
        lone[i] = alone[start:start + i.size]
        out.append(lone & strokes)
        start += i.size
    return out


def _label_boxes(image, text, extremes):
    """The grounds of label boxes in a 2D panel (bool): filled axis-aligned rectangles of one of its
    ``extremes`` (``(value, mask)``: the dtype's minimum and maximum and the pixels at them), their holes counted
    in, whose holes hold a glyph: at least ``INK_MIN_PIXELS`` pixels of ``text`` (ink found of the other
    extreme) or drawn in a grey far from the box's ground (``INK_CONTRAST`` of the dtype's range: an
    anti-aliased or grey letter, which is no ink), that lie in the panel's margin (``EDGE_BAND``), are shorter
    than ``BAR_ASPECT`` times their width (longer ones are bars) and cover at most ``BOX_MAX_SHARE`` of the
    panel."""
    from gpu_pipeline.stages.cleanup import enclosed_components

    xp = get_array_module(text)
    ops = ops_for(text)
    rows, cols = text.shape
    info = np.iinfo(image.dtype)
    contrast = INK_CONTRAST * (float(info.max) - float(info.min))
    boxes = xp.zeros(text.shape, dtype=bool)
    for value, extreme in extremes:
        if not bool(extreme.any()):
            continue
        # The ground grown by a pixel closes the one-pixel paths of compression noise (a JPEG's 252 beside
        # 255) that would join its glyph to the panel around it and leave the glyph no hole.
        ground = ops.distance_transform(~extreme, (1.0, 1.0)) <= 1.0
        around, n_around = ops.label(~ground)
        filled = ground | enclosed_components(around, n_around)[around]
        labels, count = ops.label(filled)
        where = xp.flatnonzero(filled)  # (the pieces' pixels only: a small share of the panel)
        flat = labels.ravel()[where]
        area = xp.bincount(flat, minlength=count + 1).astype(xp.float64)
        # (in its holes only: the pixel the ground grew by around it is the panel's, not a glyph's)
        drawn = xp.abs(image.ravel()[where].astype(xp.float64) - float(value)) >= contrast
        glyph = (text.ravel()[where] | drawn) & ~ground.ravel()[where]
        inside = xp.bincount(flat, weights=glyph.astype(xp.float64), minlength=count + 1)
        (top, bottom), (left, right) = _bounds(labels, count, text.shape, where)
        height, width = bottom - top + 1, right - left + 1
        box = ((area >= RECTANGULARITY * height * width) & (xp.maximum(height, width) < BAR_ASPECT
                                                             * xp.minimum(height, width))
               & (area <= BOX_MAX_SHARE * rows * cols) & (inside >= INK_MIN_PIXELS)
               & _in_margin(top, bottom, left, right, text.shape))
        box[0] = False
        boxes |= box[labels] & extreme
    return boxes


#: Info band: a run of at least ``BAND_MIN_LINES`` whole rows (or columns) from one edge of the panel, each with
#: at least ``BAND_INK_SHARE`` of its pixels in ink (the band's own white or black ground, or its text: within
#: ``BAND_TOLERANCE`` of the dtype's range of its extremes, wider than ``INK_TOLERANCE``: a compressed band's
#: black ground lies at 0-5 of 255), less than ``EDGE_BAND`` of the panel deep, ...
BAND_MIN_LINES = 4
BAND_INK_SHARE = 0.3
BAND_TOLERANCE = 3 / 255
#: ... and the picture right after it: its next ``BAND_PICTURE_LINES`` lines hold on average under
#: ``BAND_PICTURE_SHARE`` of their pixels in ink (the step from the microscope's data bar to the micrograph).
BAND_PICTURE_LINES = 10
BAND_PICTURE_SHARE = 0.1
#: Up to this many lines along the panel's edge are passed over before the band (a figure's frame line outside
#: it: EMPS 2bc87a8698, b23c478d84), and inside the band a line counts as its own where ``BAND_INK_SHARE`` of it
#: lies within ``BAND_GROUND_TOLERANCE`` of the dtype's ends (its ground at 4-5 of 255 in a compressed JPEG).
BAND_FRAME_LINES = 2
BAND_GROUND_TOLERANCE = 8 / 255


def info_band(image):
    """Where a 2D 8-bit ``image`` carries an information band along one edge (a microscope's data bar: text
    on a white or black ground): ``(axis, start, stop)``, the lines of ``axis`` (0: rows, 1: columns) that the
    band does not cover, else None. Only 8-bit images: microscopes burn their data bar into 8-bit exports and
    figures, while wider integers hold detector counts (a 12-bit camera's in uint16, whose dark film would lie
    within a tolerance of the dtype's minimum); float images and 3D volumes have none.

    The band is no part of the specimen, yet it weighs in the image's statistics: its ground, as common as
    the background or the particles, moves a global threshold and the polarity's count of the border. Its
    lines are each largely in ink (``BAND_INK_SHARE``) from the edge on (``BAND_MIN_LINES``, less than
    ``EDGE_BAND`` of the panel; a frame of up to ``BAND_FRAME_LINES`` lines along the edge is passed over,
    and lines of the band's ground a little further off the dtype's ends, ``BAND_GROUND_TOLERANCE``, are the
    band's), and the micrograph after it is not (``BAND_PICTURE_SHARE`` over the next
    ``BAND_PICTURE_LINES``). Of bands on several edges, the deepest is reported.
    """
    xp = get_array_module(image)
    if image.ndim != 2 or np.dtype(image.dtype).kind not in "ui" or np.dtype(image.dtype).itemsize != 1:
        return None
    info = np.iinfo(image.dtype)
    tolerance = int((int(info.max) - int(info.min)) * BAND_TOLERANCE)
    low, high = image <= info.min + tolerance, image >= info.max - tolerance
    loose = int((int(info.max) - int(info.min)) * BAND_GROUND_TOLERANCE)
    loose_low, loose_high = image <= info.min + loose, image >= info.max - loose
    best = None
    for axis in (0, 1):
        other = 1 - axis
        share = to_host(xp.maximum(low.mean(axis=other), high.mean(axis=other))).tolist()
        ground = to_host(xp.maximum(loose_low.mean(axis=other), loose_high.mean(axis=other))).tolist()
        n = len(share)
        for from_end in (False, True):
            lines, grounds = (share[::-1], ground[::-1]) if from_end else (share, ground)
            depth = inked = 0  # depth: the lines from the edge through the band's last line in ink
            for line in range(int(np.ceil(EDGE_BAND * n))):
                if lines[line] >= BAND_INK_SHARE:
                    depth, inked = line + 1, inked + 1
                elif not ((inked == 0 and line < BAND_FRAME_LINES) or (inked and grounds[line] >= BAND_INK_SHARE)):
                    break
            picture = lines[depth:depth + BAND_PICTURE_LINES]
            if not (inked >= BAND_MIN_LINES and depth < EDGE_BAND * n and picture
                    and sum(picture) / len(picture) < BAND_PICTURE_SHARE):
                continue
            if best is None or depth > best[0]:
                best = (depth, (axis, 0, n - depth) if from_end else (axis, depth, n))
    return None if best is None else best[1]


def annotation_zone(image, ink=None):
    """:func:`annotation_ink` grown by ``INK_MARGIN`` pixels (the blur and anti-aliasing around the strokes).
    ``ink``: the image's ink where it is known (found on the whole panel, ``image`` being a part of it)."""
    ink = annotation_ink(image) if ink is None else ink
    if not bool(ink.any()):
        return ink
    return ops_for(ink).distance_transform(~ink, (1.0, 1.0)) <= INK_MARGIN
