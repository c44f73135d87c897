"""The backend on the CPU: the array-module algorithms the GPU runs (on NumPy, against SciPy and scikit-image),
the import layers, the CuPy floor and the GPU scheduling rules.

`gpu_pipeline/array_algorithms.py` is the code the GPU runs (with CuPy as
the array module), so these CPU tests check the GPU path's logic in CI.
"""
import ast
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.measure import label as sk_label

from cpu_fallback import ops
from gpu_pipeline.array_algorithms import distance_transform_edt, label_by_value_propagation

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("shape,spacing", [((7, 61, 23), (2.5, 1.0, 0.7)), ((40, 9, 33), (0.6, 1.3, 1.0)),
                                           ((53, 17), (1.0, 2.2)), ((3, 90), (0.8, 0.5))])
def test_separable_edt_equals_scipy_on_non_cubic_anisotropic_masks(rng, shape, spacing):
    for density in (0.02, 0.3):
        mask = ndi.binary_dilation(rng.random(shape) < density / 8, iterations=2) | (rng.random(shape) > density)
        ours = distance_transform_edt(mask, spacing)
        assert ours.dtype == np.float32 and ours.shape == shape
        np.testing.assert_allclose(ours, ndi.distance_transform_edt(mask, sampling=spacing), rtol=2e-6, atol=1e-5)


def test_separable_edt_without_background_is_infinite_like_the_cpu_primitive(rng):
    for shape in [(6, 11, 4), (9, 5)]:
        mask = np.ones(shape, dtype=bool)
        assert np.isinf(distance_transform_edt(mask, (2.0,) * len(shape))).all()
        assert np.isinf(ops.distance_transform(mask, (2.0,) * len(shape))).all()
    # One background voxel in a slab: every distance is finite and exact.
    mask = np.ones((5, 40, 30), dtype=bool)
    mask[tuple(rng.integers(0, s) for s in mask.shape)] = False
    np.testing.assert_allclose(distance_transform_edt(mask, (3.0, 1.0, 1.0)),
                               ndi.distance_transform_edt(mask, sampling=(3.0, 1.0, 1.0)), rtol=2e-6)


def test_separable_edt_is_exact_below_max_distance(rng):
    mask = ndi.binary_dilation(rng.random((30, 50, 44)) < 0.004, iterations=6)
    spacing = (1.7, 1.0, 0.9)
    cap = 4.3
    ours = np.minimum(distance_transform_edt(mask, spacing, max_distance=cap), np.float32(cap))
    ref = np.minimum(ndi.distance_transform_edt(mask, sampling=spacing), cap).astype(np.float32)
    assert (ref == np.float32(cap)).any() and (ref < cap).any()
    np.testing.assert_allclose(ours, ref, rtol=2e-6, atol=1e-5)


@pytest.mark.parametrize("shape,levels", [((30, 40, 20), 4), ((64, 80), 3), ((12, 70, 9), 2)])
def test_equal_value_labels_equal_skimage_including_ids(rng, shape, levels):
    values = rng.integers(0, levels, shape).astype(np.int32)
    # Snakes and long runs, where propagation alone would need many rounds.
    values = np.maximum(values, np.roll(values, 1, axis=-1))
    ours = label_by_value_propagation(values, ops.scatter_min)
    np.testing.assert_array_equal(ours, sk_label(values, background=0, connectivity=1))
    assert ours.dtype == np.int32


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # (the NaNs, in the ufunc's reference)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.int64])
@pytest.mark.parametrize("highest", [False, True])
def test_compiled_scatter_equals_the_ufunc_at(rng, dtype, highest):
    """ops.scatter_min / scatter_max (compiled) equal np.minimum.at / np.maximum.at, repeated indices, NaN
    included; a scalar value, a 2D target and negative indices go to the ufunc itself."""
    ufunc, ours = (np.maximum, ops.scatter_max) if highest else (np.minimum, ops.scatter_min)
    n = 2 * ops.COMPILED_SCATTER_MIN  # (smaller inputs take the ufunc itself)
    target = (rng.standard_normal(500) * 100).astype(dtype)
    index = rng.integers(0, 500, n)
    values = (rng.standard_normal(n) * 100).astype(dtype)
    if np.issubdtype(dtype, np.floating):
        values[rng.integers(0, n, 5)] = np.nan
        target[:3] = np.nan
    expected = target.copy()
    ufunc.at(expected, index, values)
    ours(target, index, values)
    np.testing.assert_array_equal(target, expected)
    for args in ((target.copy(), index, values[0]), (target.reshape(20, 25).copy(), (index % 20, index % 25), values),
                 (target.copy(), -1 - index, values)):
        expected = args[0].copy()
        ufunc.at(expected, *args[1:])
        ours(*args)
        np.testing.assert_array_equal(args[0], expected)


def test_compiled_label_sizes_equal_bincount(rng):
    labels = rng.integers(0, 300, (40, 50, 80)).astype(np.int32)
    assert labels.size >= ops.COMPILED_SCATTER_MIN
    np.testing.assert_array_equal(ops.label_sizes(labels, 310), np.bincount(labels.ravel(), minlength=311))
    np.testing.assert_array_equal(ops.label_sizes(labels[:2, :3], 310),
                                  np.bincount(labels[:2, :3].ravel(), minlength=311))


def test_compiled_labels_present_equal_numpy_marking(rng):
    from cpu_fallback.kernels import labels_present

    for dtype in (np.int32, np.int64):
        labels = rng.choice(rng.permutation(500)[:int(rng.integers(1, 60))], size=(30, 20, 17)).astype(dtype)
        for view in (labels, labels[::2, 3:, ::-1]):  # contiguous and strided
            expected = np.zeros(520, dtype=bool)
            expected[view.ravel()] = True
            np.testing.assert_array_equal(labels_present(view, 519), expected)


def test_equal_value_labels_of_a_spiral_are_one_piece():
    size = 41
    spiral = np.zeros((size, size), dtype=np.int32)
    y, x, dy, dx = 0, 0, 0, 1
    for _ in range(size * size):  # a one-voxel-wide spiral path, value 5, walls 0
        spiral[y, x] = 5
        ny, nx = y + 2 * dy, x + 2 * dx
        if not (0 <= ny < size and 0 <= nx < size) or spiral[ny, nx]:
            dy, dx = dx, -dy
            ny, nx = y + 2 * dy, x + 2 * dx
            if not (0 <= ny < size and 0 <= nx < size) or spiral[ny, nx]:
                break
        spiral[y + dy, x + dx] = 5
        y, x = ny, nx
    ours = label_by_value_propagation(spiral, ops.scatter_min)
    np.testing.assert_array_equal(ours, sk_label(spiral, background=0, connectivity=1))
    assert ours.max() == 1


def test_equal_value_labelling_needs_far_less_memory_than_face_pairs(rng):
    values = rng.integers(1, 6, (48, 64, 64)).astype(np.int32)
    tracemalloc.start()
    label_by_value_propagation(values, ops.scatter_min)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # Face-pair lists took 73-184 bytes per voxel here; the propagation about 14 (input not counted).
    assert peak / values.size < 25, peak / values.size


def _project_imports(path):
    """Every declump module ``path`` imports, at module level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in names if n.split(".")[0] in ("gpu_pipeline", "cpu_fallback")}


def test_backend_primitives_import_nothing_above_them():
    """Layers import one way: stages -> _backend -> primitives -> array_algorithms -> _common."""
    below = ("gpu_pipeline._common", "gpu_pipeline.array_algorithms", "cpu_fallback.ops", "cpu_fallback")
    for module in ["gpu_pipeline/_common.py", "gpu_pipeline/array_algorithms.py", "cpu_fallback/ops.py",
                   "gpu_pipeline/ops_cuda.py", "cpu_fallback/__init__.py"]:
        allowed = below + (("gpu_pipeline", "gpu_pipeline.pipeline") if module == "cpu_fallback/__init__.py" else ())
        above = {n for n in _project_imports(ROOT / module)
                 if not any(n == a or n.startswith(a + ".") for a in allowed) or n.startswith("gpu_pipeline._backend")}
        assert not above, (module, above)  # cpu_fallback's facade calls the pipeline lazily: allowed there only
    assert _project_imports(ROOT / "gpu_pipeline/_common.py") == set()


def test_no_module_level_import_cycle():
    modules = {}
    for path in list((ROOT / "gpu_pipeline").rglob("*.py")) + list((ROOT / "cpu_fallback").rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        top = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module:
                top.add(node.module)
            elif isinstance(node, ast.Import):
                top |= {a.name for a in node.names}
        modules[name] = top
    graph = {m: {t for t in deps if t in modules and t != m} for m, deps in modules.items()}
    state = {}

    def visit(m, path):
        state[m] = "open"
        for t in graph[m]:
            assert state.get(t) != "open", " -> ".join(path + [t])
            if t not in state:
                visit(t, path + [t])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_cupy_floor_is_enforced_and_stated_where_installs_read_it():
    from gpu_pipeline._backend import CUPY_MIN_VERSION, DeclumpError, check_cupy_version

    floor = ".".join(str(v) for v in CUPY_MIN_VERSION)
    for old in ("13.6.0", "14.0.1", "14.0.0rc1"):
        with pytest.raises(DeclumpError, match=f"CuPy >= {floor}"):
            check_cupy_version(old)
    for new in (floor + ".0", "14.2.0", "15.0.0b1"):
        check_cupy_version(new)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"cupy-cuda12x>={floor}"' in pyproject and f'"cupy-cuda13x>={floor}"' in pyproject
    assert f"- cupy>={floor}" in (ROOT / "environment.yml").read_text()


def test_gpu_runs_put_one_chunked_worker_on_each_gpu():
    import os

    from gpu_pipeline._backend import DeclumpError
    from gpu_pipeline.chunked.run import engine_plan

    assert engine_plan(device="gpu", n_gpus=1, have_dask_cuda=True) == ("threads", 1)
    assert engine_plan(device="gpu", n_gpus=4, have_dask_cuda=True) == ("local-cuda", None)
    assert engine_plan(device="gpu", n_gpus=4, have_dask_cuda=False) == ("threads", 1)
    assert engine_plan(device="gpu", cluster="local-cuda", n_gpus=1) == ("local-cuda", None)
    assert engine_plan(device="gpu", scheduler="tcp://head:8786", n_gpus=1) == ("scheduler", None)
    with pytest.raises(DeclumpError, match="--cluster local-cuda"):
        engine_plan(device="gpu", cluster="local", n_gpus=1)
    with pytest.raises(DeclumpError, match="--workers 3 with --device gpu"):
        engine_plan(device="gpu", workers=3, n_gpus=1)
    # More host threads on one GPU (--gpu-threads), or per dask-cuda worker; not for the CPU, not for the
    # workers of a running scheduler (they take theirs when started), and only whole numbers from 1.
    assert engine_plan(device="gpu", n_gpus=1, gpu_threads=3) == ("threads", 3)
    assert engine_plan(device="gpu", cluster="local-cuda", n_gpus=2, gpu_threads=3) == ("local-cuda", None)
    with pytest.raises(DeclumpError, match="--gpu-threads 2 applies to --device gpu"):
        engine_plan(device="cpu", gpu_threads=2)
    with pytest.raises(DeclumpError, match="--nthreads 2"):
        engine_plan(device="gpu", scheduler="tcp://head:8786", gpu_threads=2)
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(DeclumpError, match="--gpu-threads must be a whole number of at least 1"):
            engine_plan(device="gpu", n_gpus=1, gpu_threads=bad)
    # The CPU engines are unchanged.
    assert engine_plan(device="cpu") == ("threads", len(os.sched_getaffinity(0)))
    assert engine_plan(device="cpu", workers=3) == ("threads", 3)
    assert engine_plan(device="cpu", cluster="local") == ("local", len(os.sched_getaffinity(0)))


def test_local_engines_take_the_cores_a_job_was_given_not_the_machines():
    """Under a batch scheduler (SLURM) or taskset a process may run on fewer cores than the machine has:
    the default thread count follows its CPU affinity, so threads never outnumber its cores."""
    import os

    from gpu_pipeline.chunked.run import engine_plan

    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no CPU affinity on this platform")
    cores = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(cores)})
        assert engine_plan(device="cpu") == ("threads", 1)
        assert engine_plan(device="cpu", cluster="local") == ("local", 1)
        assert engine_plan(device="cpu", workers=3) == ("threads", 3)  # an explicit --workers stands
    finally:
        os.sched_setaffinity(0, cores)
    assert engine_plan(device="cpu") == ("threads", len(cores))


def test_the_command_and_the_chunked_tasks_import_no_scipy_ndimage_until_used():
    """Importing the package, the command line and the modules a chunked run's tasks come from leaves SciPy's
    ndimage (0.25 s of each process's start: every command and every worker of a cluster) unimported; the
    generator, which needs it, imports it when used."""
    import subprocess
    import sys

    code = ("import sys; import gpu_pipeline, gpu_pipeline.cli, gpu_pipeline.chunked.run, cpu_fallback.ops; "
            "print('scipy.ndimage' in sys.modules); "
            "from gpu_pipeline import make_touching_particles; print('scipy.ndimage' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "True"]


def test_importing_the_gpu_backend_without_cupy_says_which_extra_to_install():
    """``import gpu_pipeline.ops_cuda`` without CuPy raised a bare "No module named 'cupy'"; the README promises
    a missing GPU library is an error naming the extra to install."""
    import importlib
    import importlib.util
    import sys

    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed: the import succeeds")
    sys.modules.pop("gpu_pipeline.ops_cuda", None)
    with pytest.raises(ImportError, match=r"needs CuPy \(No module named 'cupy'\); install the GPU extra: pip "
                                          r"install 'declump\[gpu-cu12\]'"):
        importlib.import_module("gpu_pipeline.ops_cuda")
