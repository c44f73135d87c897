"""What every layer shares and nothing else: the error type, the Gaussian cut-off, array-type helpers.

A leaf module (it imports nothing from declump), so the backend primitives
(`cpu_fallback/ops.py`, `ops_cuda.py`, `array_algorithms.py`) can use it
without importing the dispatching `_backend` module that the stages import.
"""
from __future__ import annotations

import os
import sys

import numpy as np

GPU_EXTRA_HINT = "install the GPU extra: pip install 'declump[gpu-cu12]' (CUDA 12) or 'declump[gpu-cu13]' (CUDA 13)"

#: Gaussians are cut at this many sigmas on both backends; the chunked halo depends on it.
GAUSSIAN_TRUNCATE = 4.0


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (what a batch scheduler such as SLURM grants, or
    ``taskset``), not the machine's count, so threads never outnumber the cores a job was given."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


class DeclumpError(ValueError):
    """Bad input or an impossible request; its message is one line for the user."""


def whole_number_at_least(value, least) -> bool:
    """Is ``value`` an integer (Python's or NumPy's, not a bool) of at least ``least``? The one test behind the
    checks of counts (workers, threads, iterations, trees, an axis index)."""
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= least


class UnusableValuesError(DeclumpError):
    """The image's values give no foreground whatever the options: NaN or inf, or one constant value."""


def is_cupy_array(array) -> bool:
    return type(array).__module__.split(".")[0] == "cupy"


def get_array_module(array):
    """``numpy`` or ``cupy``, whichever holds ``array``."""
    if is_cupy_array(array):
        return sys.modules["cupy"]
    return np


def to_host(array) -> np.ndarray:
    """A NumPy copy of a NumPy or CuPy array."""
    if is_cupy_array(array):
        return array.get()
    return np.asarray(array)
