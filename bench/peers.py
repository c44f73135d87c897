"""Reference pipelines written directly on scikit-image / SciPy, independent of declump's stages."""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi


def skimage_watershed(image, *, sigma, min_distance, polarity, spacing=None, min_size=0):
    """The textbook pipeline: Gaussian, Otsu, cleanup, EDT, peak_local_max per region, watershed."""
    from skimage.feature import peak_local_max
    from skimage.filters import gaussian, threshold_otsu
    from skimage.morphology import remove_small_objects
    from skimage.segmentation import watershed

    spacing = (1.0,) * image.ndim if spacing is None else tuple(spacing)
    smoothed = gaussian(image.astype(np.float32), sigma=tuple(sigma / s for s in spacing), preserve_range=True)
    t = threshold_otsu(smoothed)
    fg = smoothed > t if polarity == "bright" else smoothed <= t
    if min_size:
        fg = remove_small_objects(fg, max_size=int(math.ceil(min_size)) - 1)
    distance = ndi.distance_transform_edt(fg, sampling=spacing)
    regions, _ = ndi.label(fg)
    coords = peak_local_max(distance, min_distance=int(min_distance), labels=regions, exclude_border=False)
    markers = np.zeros(image.shape, dtype=np.int32)
    markers[tuple(coords.T)] = np.arange(1, len(coords) + 1)
    return watershed(-distance, markers, mask=fg)
