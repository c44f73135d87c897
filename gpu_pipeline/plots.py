"""The particle size distribution as a picture: one histogram of equivalent diameters.

Drawn with Pillow (a core dependency), so `declump run` writes it beside the
overlay and the web app shows the very same PNG, without a plotting library.
"""
from __future__ import annotations

import io

import numpy as np

from gpu_pipeline._common import counted

#: At most this many bars; Freedman-Diaconis/Sturges ('auto') otherwise.
MAX_BINS = 40


def size_histogram(diameters, *, max_bins=MAX_BINS):
    """Counts and bin edges of a histogram of ``diameters`` (NumPy's 'auto' bins, at most ``max_bins``).

    Returns
    -------
    counts : ndarray of int64, (n_bins,)
    edges : ndarray of float64, (n_bins + 1,)
    """
    values = np.asarray(diameters, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(1)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        low, high = low - 0.5, high + 0.5
    edges = np.histogram_bin_edges(values, bins="auto", range=(low, high))
    if len(edges) - 1 > max_bins:
        edges = np.linspace(low, high, max_bins + 1)
    counts, edges = np.histogram(values, bins=edges)
    return counts.astype(np.int64), edges


def _nice_step(span, n_ticks):
    raw = span / max(n_ticks, 1)
    power = 10 ** np.floor(np.log10(raw)) if raw > 0 else 1.0
    for factor in (1, 2, 2.5, 5, 10):
        if factor * power >= raw:
            return factor * power
    return 10 * power


def _ticks(low, high, n_ticks):
    step = _nice_step(high - low, n_ticks)
    first = np.ceil(low / step) * step
    return [t for t in np.arange(first, high + step * 1e-9, step)]


def _label(value):
    return f"{value:.4g}"


def size_histogram_rgb(diameters, *, unit=None, size=(640, 400), highlight=None):
    """RGB uint8 picture of the equivalent-diameter histogram.

    Parameters
    ----------
    diameters : array of float
        Equivalent diameters in physical units (``particle_table(...)["equivalent_diameter"]``).
    unit : str, optional
        The physical unit, shown on the axis ("nm", "px"); None: "spacing units".
    size : (width, height)
        Picture size in pixels.
    highlight : float, optional
        One diameter whose bar is drawn in another colour (the app's hovered particle).
    """
    from PIL import Image, ImageDraw, ImageFont

    width, height = size
    picture = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=13)
    counts, edges = size_histogram(diameters)
    values = np.asarray(diameters, dtype=np.float64)
    left, right, top, bottom = 56, width - 16, 30, height - 46
    unit_text = unit or "spacing units"
    median = f", median {_label(float(np.median(values)))} {unit_text}" if values.size else ""
    draw.text((left, 8), f"{counted(values.size, 'particle')}{median}", fill="black", font=font)
    draw.text(((left + right) // 2, height - 6), f"equivalent diameter ({unit_text})", fill="black", font=font,
              anchor="ms")
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black", width=1)
    if counts.size == 0:
        draw.text(((left + right) // 2, (top + bottom) // 2), "no particles", fill="black", font=font, anchor="mm")
        return np.asarray(picture)
    peak = max(int(counts.max()), 1)
    x_of = lambda v: left + (v - edges[0]) / (edges[-1] - edges[0]) * (right - left)  # noqa: E731
    y_of = lambda c: bottom - c / peak * (bottom - top)  # noqa: E731
    marked = None
    if highlight is not None and np.isfinite(highlight):
        marked = int(np.clip(np.searchsorted(edges, highlight, side="right") - 1, 0, counts.size - 1))
    for i, count in enumerate(counts):
        if count:
            colour = (230, 120, 20) if i == marked else (70, 110, 180)
            # At least one pixel high: a bin of a few particles beside one of thousands is under a pixel to
            # scale (and Pillow rejects a rectangle whose top lies below its bottom).
            draw.rectangle([x_of(edges[i]) + 1, min(y_of(count), bottom - 1), x_of(edges[i + 1]) - 1, bottom - 1],
                           fill=colour)
    for tick in _ticks(edges[0], edges[-1], 6):
        x = x_of(tick)
        draw.line([(x, bottom), (x, bottom + 4)], fill="black")
        draw.text((x, bottom + 6), _label(tick), fill="black", font=font, anchor="mt")
    for tick in _ticks(0, peak, 5):
        if tick == int(tick):
            y = y_of(tick)
            draw.line([(left - 4, y), (left, y)], fill="black")
            draw.text((left - 6, y), str(int(tick)), fill="black", font=font, anchor="rm")
    draw.text((8, top - 6), "count", fill="black", font=font, anchor="ls")
    return np.asarray(picture)


#: zlib level of every PNG declump writes (overlays, histograms, the web app's pictures). Pillow's default, 6,
#: took 80 ms for a 512x512 overlay (412 KB) against 20 ms at 1 (395 KB: smaller, on these pictures' flat
#: colours and grey), 2026-12-03: serial time at the end of every run, and in every picture the app sends.
PNG_COMPRESS_LEVEL = 1


def png_bytes(rgb):
    """PNG file contents of an RGB(A) uint8 array."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def write_size_histogram(path, diameters, *, unit=None):
    """Save :func:`size_histogram_rgb` as PNG (written under a temporary name, renamed when complete)."""
    from gpu_pipeline.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_bytes(png_bytes(size_histogram_rgb(diameters, unit=unit)))
