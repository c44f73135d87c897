"""Which array library an array lives in, and the lazy, optional GPU imports.

Every stage is written once against the array module ``xp`` (NumPy or CuPy);
the few primitives that differ per backend (filters, distance transform,
labelling) come from :func:`ops_for`, keyed on the array type as dask-image does.
"""
from __future__ import annotations

import importlib
import numpy as np

GPU_EXTRA_HINT = "install the GPU extra: pip install 'declump[gpu-cu12]' (CUDA 12) or 'declump[gpu-cu13]' (CUDA 13)"


#: Gaussians are cut at this many sigmas on both backends; the chunked halo depends on it.
GAUSSIAN_TRUNCATE = 4.0


class DeclumpError(ValueError):
    """Bad input or an impossible request; its message is one line for the user."""


def _try_import(name):
    try:
        return importlib.import_module(name)
    except Exception:  # ImportError, or a CUDA runtime error while importing
        return None


def cupy_module():
    """The ``cupy`` module, or None when it is not installed."""
    return _try_import("cupy")


def gpu_available() -> bool:
    """True when CuPy is installed and sees at least one CUDA device."""
    cp = cupy_module()
    if cp is None:
        return False
    try:
        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def require_gpu():
    """Return cupy, or raise a one-line error naming what is missing."""
    cp = cupy_module()
    if cp is None:
        raise DeclumpError(f"--device gpu needs CuPy, which is not installed; {GPU_EXTRA_HINT}, or use --device cpu")
    if not gpu_available():
        raise DeclumpError("--device gpu was asked for but CuPy sees no CUDA device; use --device cpu or auto")
    for mod in ("cucim.skimage", "cupyx.scipy.ndimage"):
        if _try_import(mod) is None:
            raise DeclumpError(f"the GPU backend needs {mod.split('.')[0]}, which is not importable; {GPU_EXTRA_HINT}")
    return cp


def is_cupy_array(array) -> bool:
    return type(array).__module__.split(".")[0] == "cupy"


def get_array_module(array):
    """``numpy`` or ``cupy``, whichever holds ``array``."""
    if is_cupy_array(array):
        return cupy_module()
    return np


def ops_for(array):
    """The backend primitives (module) for ``array``: CPU fallback or CUDA."""
    if is_cupy_array(array):
        from gpu_pipeline import ops_cuda
        return ops_cuda
    from cpu_fallback import ops
    return ops


def to_host(array) -> np.ndarray:
    """A NumPy copy of a NumPy or CuPy array."""
    if is_cupy_array(array):
        return array.get()
    return np.asarray(array)


def resolve_device(device: str) -> str:
    """Map ``auto|gpu|cpu`` to ``gpu`` or ``cpu``."""
    if device not in ("auto", "gpu", "cpu"):
        raise DeclumpError(f"device must be 'auto', 'gpu' or 'cpu', got {device!r}")
    if device == "auto":
        return "gpu" if gpu_available() and _try_import("cucim.skimage") is not None else "cpu"
    if device == "gpu":
        require_gpu()
    return device
