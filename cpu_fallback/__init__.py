"""The CPU fallback: the GPU pipeline's stages on NumPy, SciPy, scikit-image, scikit-learn and Numba kernels.

``cpu_fallback.separate`` has the GPU pipeline's signature and contract and
returns NumPy labels; the primitives that differ per backend are in
:mod:`cpu_fallback.ops`.
"""
from __future__ import annotations

from gpu_pipeline._common import to_host


def separate(image, *, device="cpu", mask=None, **kwargs):
    """Split touching particles on the CPU; same parameters as :func:`gpu_pipeline.separate` (``device``: 'cpu'
    only)."""
    from gpu_pipeline import DeclumpError, pipeline

    if device != "cpu":
        raise DeclumpError(f"cpu_fallback.separate runs on the CPU (device='cpu'), got device={device!r}; "
                           "gpu_pipeline.separate takes 'auto', 'gpu' or 'cpu'")
    pipeline.check_not_masked(image, mask)
    image = None if image is None else to_host(image)
    mask = None if mask is None else to_host(mask)
    return pipeline.separate(image, mask=mask, **kwargs)


__all__ = ["separate"]


def _signature():
    from gpu_pipeline import _with_pipeline_parameters

    _with_pipeline_parameters(separate, "cpu")


_signature()
