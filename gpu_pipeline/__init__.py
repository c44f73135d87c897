"""declump: split touching particles into separate objects, on the GPU (CuPy/cuCIM) or the CPU.

``separate`` is the whole pipeline; the stages live in :mod:`gpu_pipeline.stages`,
the CPU primitives in :mod:`cpu_fallback.ops` and their CUDA twins in
:mod:`gpu_pipeline.ops_cuda`.
"""
from __future__ import annotations

__version__ = "0.1.0"

from gpu_pipeline._backend import DeclumpError, gpu_available, resolve_device, to_host  # noqa: E402
from gpu_pipeline._common import UnusableValuesError  # noqa: E402
from gpu_pipeline import pipeline as _pipeline  # noqa: E402
from gpu_pipeline.metrics import evaluate  # noqa: E402
from gpu_pipeline.measure import particle_table  # noqa: E402
from gpu_pipeline.pipeline import NoParticlesError, SeparationDetails  # noqa: E402


def __getattr__(name):
    # The generator on first use: it imports scipy.ndimage (0.25 s), which a run of the pipeline never needs, and
    # every command and every worker of a cluster imports this package.
    if name == "make_touching_particles":
        from gpu_pipeline.synthetic import make_touching_particles

        return make_touching_particles
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), "make_touching_particles"})


def separate(image, *, device="auto", mask=None, **kwargs):
    """Split touching particles on ``device`` ('auto', 'gpu' or 'cpu'); see :func:`gpu_pipeline.pipeline.separate`.

    NumPy input gives NumPy output (moved to the GPU and back when the device
    is the GPU); CuPy input stays on the GPU.
    """
    import os

    from gpu_pipeline._backend import is_cupy_array

    for name, given in (("image", image), ("mask", mask)):
        if isinstance(given, (str, bytes, os.PathLike)):  # (read as a 0-d array: "image has 0 dimensions ()")
            raise DeclumpError(f"separate takes the {name} as an array, got the path {given!r}; read it first "
                               "with gpu_pipeline.io.read_image(path)[0]")
    _pipeline.check_not_masked(image, mask)
    device = resolve_device(device)
    on_gpu_already = image is not None and is_cupy_array(image)
    if device == "gpu":
        import cupy as cp

        image = None if image is None else cp.asarray(image)
        mask = None if mask is None else cp.asarray(mask)
    else:
        image = None if image is None else to_host(image)
        mask = None if mask is None else to_host(mask)
    result = _pipeline.separate(image, mask=mask, **kwargs)
    if device == "gpu" and not on_gpu_already:
        if isinstance(result, tuple):
            return (to_host(result[0]),) + tuple(result[1:])
        return to_host(result)
    return result


def _with_pipeline_parameters(wrapper, device_default):
    """``wrapper``'s signature and help as the pipeline's own (every parameter, not ``**kwargs``), with
    ``device`` added: what ``help()``, ``inspect.signature`` and editors show."""
    import inspect

    full = inspect.signature(_pipeline.separate)
    parameters = list(full.parameters.values())
    device = inspect.Parameter("device", inspect.Parameter.KEYWORD_ONLY, default=device_default)
    wrapper.__signature__ = full.replace(parameters=parameters[:1] + [device] + parameters[1:])
    wrapper.__doc__ = f"{wrapper.__doc__.rstrip()}\n\n{_pipeline.separate.__doc__}"
    return wrapper


_with_pipeline_parameters(separate, "auto")

__all__ = ["separate", "evaluate", "particle_table", "make_touching_particles", "DeclumpError",
           "NoParticlesError", "UnusableValuesError", "SeparationDetails", "gpu_available", "__version__"]
