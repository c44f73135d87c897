"""Reference pipelines written directly on scikit-image / SciPy, independent of declump's stages."""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi


def skimage_watershed(image, *, sigma, min_distance, polarity, spacing=None, min_size=0, max_hole_size=0):
    """The textbook pipeline: Gaussian, Otsu, cleanup (holes, then specks), EDT, peak_local_max per region, watershed.

    Sizes are in pixels/voxels (the bench's data have unit spacing).
    """
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    spacing = (1.0,) * image.ndim if spacing is None else tuple(spacing)
    fg = _textbook_foreground(image, sigma=sigma, polarity=polarity, spacing=spacing, min_size=min_size,
                              max_hole_size=max_hole_size)
    distance = ndi.distance_transform_edt(fg, sampling=spacing)
    regions, _ = ndi.label(fg)
    coords = peak_local_max(distance, min_distance=int(min_distance), labels=regions, exclude_border=False)
    markers = np.zeros(image.shape, dtype=np.int32)
    markers[tuple(coords.T)] = np.arange(1, len(coords) + 1)
    return watershed(-distance, markers, mask=fg)


def _textbook_foreground(image, *, sigma, polarity, spacing, min_size, max_hole_size):
    from skimage.filters import gaussian, threshold_otsu
    from skimage.morphology import remove_small_holes, remove_small_objects

    smoothed = gaussian(image.astype(np.float32), sigma=tuple(sigma / s for s in spacing), preserve_range=True)
    t = threshold_otsu(smoothed)
    fg = smoothed > t if polarity == "bright" else smoothed <= t
    if max_hole_size:
        fg = remove_small_holes(fg, max_size=int(math.ceil(max_hole_size)) - 1, connectivity=1)
    if min_size:
        fg = remove_small_objects(fg, max_size=int(math.ceil(min_size)) - 1)
    return fg


def porespy_snow(image, *, sigma, min_distance, polarity, spacing=None, min_size=0, max_hole_size=0):
    """PoreSpy's SNOW partitioning (distance transform, peak trimming, watershed) of the textbook foreground.

    The foreground is the watershed pipeline's (same smoothing, Otsu and
    cleanup); SNOW's own ``r_max`` (peak search radius, voxels) is
    ``min_distance`` and its ``sigma`` (distance-map smoothing) keeps
    PoreSpy's default. Unit spacing only (as in the bench's data).
    """
    import porespy

    spacing = (1.0,) * image.ndim if spacing is None else tuple(spacing)
    fg = _textbook_foreground(image, sigma=sigma, polarity=polarity, spacing=spacing, min_size=min_size,
                              max_hole_size=max_hole_size)
    return np.asarray(porespy.filters.snow_partitioning(fg, r_max=int(min_distance)).regions * fg, dtype=np.int32)


def _pocl_icd_dir():
    """An OpenCL vendor folder pointing at the pocl library that pocl-binary-distribution installs."""
    import importlib.util
    import tempfile
    from pathlib import Path

    spec = importlib.util.find_spec("pyopencl")
    if spec is None:
        return None
    # pocl-binary-distribution may install pyopencl/.libs alone (a namespace package, no origin).
    roots = [Path(spec.origin).parent] if spec.origin else [Path(p) for p in spec.submodule_search_locations or []]
    libs = sorted(lib for root in roots for lib in (root / ".libs").glob("libpocl*.so*"))
    if not libs:
        return None
    folder = Path(tempfile.gettempdir()) / "declump-bench-icd"
    folder.mkdir(exist_ok=True)
    (folder / "pocl.icd").write_text(str(libs[0]) + "\n")
    return str(folder)


def pyclesperanto_voronoi_otsu(image, *, spot_sigma, outline_sigma):
    """pyclesperanto's voronoi_otsu_labeling (OpenCL; on a CPU through pocl)."""
    import os

    if "OCL_ICD_VENDORS" not in os.environ:
        folder = _pocl_icd_dir()
        if folder:
            os.environ["OCL_ICD_VENDORS"] = folder
    import pyclesperanto as cle

    if not hasattr(cle, "voronoi_otsu_labeling"):
        raise RuntimeError("pyclesperanto has no usable OpenCL device (install pyclesperanto-opencl and "
                           "pocl-binary-distribution)")
    labels = cle.voronoi_otsu_labeling(image.astype(np.float32), spot_sigma=spot_sigma, outline_sigma=outline_sigma)
    return np.asarray(cle.pull(labels)).astype(np.int32)


def dask_image_label(mask, chunks):
    """dask-image's chunked connected components of a mask (face connectivity), computed with threads."""
    import dask.array as da
    from dask_image.ndmeasure import label

    labels, count = label(da.from_array(mask, chunks=chunks), structure=ndi.generate_binary_structure(mask.ndim, 1))
    return labels.compute(scheduler="threads"), int(count.compute())
