"""An overlay picture: the image in grey with each particle in its own colour and outlined."""
from __future__ import annotations

import numpy as np

from gpu_pipeline._backend import to_host


def label_colours(n, seed=7):
    """``n + 1`` RGB colours, background black, well spread and deterministic."""
    rng = np.random.default_rng(seed)
    hue = (np.arange(n) * 0.618033988749895 + rng.random()) % 1.0
    sat = 0.65 + 0.35 * rng.random(n)
    val = 0.8 + 0.2 * rng.random(n)
    i = np.floor(hue * 6).astype(int) % 6
    f = hue * 6 - np.floor(hue * 6)
    p, q, t = val * (1 - sat), val * (1 - f * sat), val * (1 - (1 - f) * sat)
    rgb = np.select([i[:, None] == k for k in range(6)],
                    [np.stack(c, 1) for c in ((val, t, p), (q, val, p), (p, val, t), (p, q, val), (t, p, val),
                                              (val, p, q))])
    return np.vstack([[0, 0, 0], rgb])


#: Pixels a step of :func:`overlay_rgb` blends at once (its float64 temporaries are per step, not per image).
OVERLAY_STEP_PIXELS = 1 << 18


def overlay_rgb(image, labels, alpha=0.45):
    """RGB uint8 picture of a 2D image with its labels (3D: the middle plane).

    The image in grey (its 0.5-99.5 percentiles stretched to black-white), each particle blended with its own
    colour (``alpha``) and its outline (pixels whose right or lower neighbour, or left or upper one, has another
    label) in that colour. Computed in float64, a band of rows at a time: a 4096^2 picture took 1.3 GB of
    temporaries when the whole image was blended at once (float64 RGB and copies of it).
    """
    image, labels = to_host(image), to_host(labels)
    if labels.ndim == 3:
        middle = labels.shape[0] // 2
        image, labels = image[middle], labels[middle]
    low, high = (float(v) for v in np.percentile(image, (0.5, 99.5)))
    span = max(high - low, 1e-12)
    colours = label_colours(int(labels.max()))
    from gpu_pipeline.stages.components import neighbour_slices

    edge = np.zeros(labels.shape, dtype=bool)
    for axis in range(2):
        lo, hi = neighbour_slices(2, axis)
        differ = labels[lo] != labels[hi]
        edge[lo] |= differ
        edge[hi] |= differ
        del differ
    out = np.empty((*labels.shape, 3), dtype=np.uint8)
    rows = max(1, OVERLAY_STEP_PIXELS // max(1, labels.shape[1]))
    for top in range(0, labels.shape[0], rows):
        band = slice(top, top + rows)
        grey = np.clip((image[band].astype(np.float64) - low) / span, 0, 1)
        label = labels[band]
        inside = label > 0
        outline = edge[band] & inside
        for channel in range(3):
            colour = colours[:, channel][label]
            value = np.where(inside, (1 - alpha) * grey + alpha * colour, grey)
            out[band][..., channel] = (np.where(outline, colour, value) * 255).round()
    return out


def write_overlay(path, image, labels):
    """Save :func:`overlay_rgb` as PNG (written under a temporary name, renamed when complete)."""
    from gpu_pipeline.io import atomic_path
    from gpu_pipeline.plots import png_bytes

    with atomic_path(path) as tmp:
        tmp.write_bytes(png_bytes(overlay_rgb(image, labels)))
