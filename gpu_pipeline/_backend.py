"""The backend module the stages import: which array library holds an array, and its primitives.

Every stage is written once against the array module ``xp`` (NumPy or CuPy);
the few primitives that differ per backend (filters, distance transform,
labelling) come from :func:`ops_for`, keyed on the array type as dask-image
does, with the CUDA module imported only when a CuPy array arrives. The
primitive modules never import this one (they use the leaf `_common`), so
the layers import one way: stages -> `_backend` -> primitives -> `_common`.
"""
from __future__ import annotations

import importlib
import sys

from gpu_pipeline._common import (GAUSSIAN_TRUNCATE, GPU_EXTRA_HINT, DeclumpError, get_array_module, is_cupy_array,
                                  to_host)

__all__ = ["GAUSSIAN_TRUNCATE", "GPU_EXTRA_HINT", "CUPY_MIN_VERSION", "DeclumpError", "check_cupy_version",
           "cupy_module", "get_array_module", "gpu_available", "gpu_count", "is_cupy_array", "ops_for", "require_gpu",
           "resolve_device", "to_host"]

#: The oldest CuPy declump runs on: ``cupyx.scatter_min/max`` take int64 from 14.1
#: (the stages scatter int64 ids and flat indices). Keep pyproject and environment.yml in step.
CUPY_MIN_VERSION = (14, 1)


def _try_import(name):
    try:
        return importlib.import_module(name)
    except Exception:  # ImportError, or a CUDA runtime error while importing
        return None


def cupy_module():
    """The ``cupy`` module, or None when it is not installed."""
    return _try_import("cupy")


def gpu_count() -> int:
    """CUDA devices CuPy sees (0 without CuPy or a driver)."""
    cp = cupy_module()
    if cp is None:
        return 0
    try:
        return int(cp.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


def gpu_available() -> bool:
    """True when CuPy is installed and sees at least one CUDA device."""
    return gpu_count() > 0


def check_cupy_version(version: str) -> None:
    """Refuse a CuPy older than :data:`CUPY_MIN_VERSION` with a one-line error naming the fix."""
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    if tuple(parts) < CUPY_MIN_VERSION:
        floor = ".".join(str(v) for v in CUPY_MIN_VERSION)
        raise DeclumpError(f"CuPy {version} is too old: declump needs CuPy >= {floor} (int64 scatter_min/max); "
                           f"{GPU_EXTRA_HINT}, or use the CPU (device 'cpu', --device cpu)")


def require_gpu():
    """Return cupy, or raise a one-line error naming what is missing."""
    cp = cupy_module()
    if cp is None:
        raise DeclumpError(f"the GPU (device 'gpu', --device gpu) needs CuPy, which is not installed; {GPU_EXTRA_HINT}, "
                           "or use the CPU (device 'cpu', --device cpu)")
    check_cupy_version(cp.__version__)
    if not gpu_available():
        raise DeclumpError("the GPU (device 'gpu', --device gpu) was asked for but CuPy sees no CUDA device; use device "
                           "'cpu' or 'auto' (--device cpu or auto)")
    if _try_import("cupyx.scipy.ndimage") is None:
        raise DeclumpError(f"the GPU backend needs cupyx.scipy.ndimage, which is not importable; {GPU_EXTRA_HINT}")
    return cp


def ops_for(array):
    """The backend primitives (module) for ``array``: CPU fallback or CUDA."""
    if is_cupy_array(array):
        if "gpu_pipeline.ops_cuda" not in sys.modules:
            require_gpu()
        from gpu_pipeline import ops_cuda
        return ops_cuda
    from cpu_fallback import ops
    return ops


def resolve_device(device: str) -> str:
    """Map ``auto|gpu|cpu`` to ``gpu`` or ``cpu``."""
    if device not in ("auto", "gpu", "cpu"):
        raise DeclumpError(f"device must be 'auto', 'gpu' or 'cpu', got {device!r}")
    if device == "auto":
        if not gpu_available():
            return "cpu"
        try:
            require_gpu()
        except DeclumpError:
            return "cpu"
        return "gpu"
    if device == "gpu":
        require_gpu()
    return device
