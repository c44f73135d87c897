"""GPU parity: the CuPy/cuCIM path equals the CPU fallback (runs only where CuPy sees a GPU)."""
import numpy as np
import pytest

from conftest import CHUNKED_DEFAULTS
from gpu_pipeline._backend import gpu_available

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA device")]


@pytest.fixture
def cp():
    return pytest.importorskip("cupy")


def test_histogram_otsu_equals_cucim_threshold_otsu(cp, rng):
    pytest.importorskip("cucim")
    from cucim.skimage.filters import threshold_otsu

    from gpu_pipeline.stages.threshold import otsu_threshold

    image = cp.asarray(np.concatenate([rng.normal(60, 10, 4000), rng.normal(170, 20, 3000)]).clip(0, 255)
                       .astype(np.uint8).reshape(70, 100))
    assert otsu_threshold(image) == float(threshold_otsu(image))


def test_primitives_match_the_cpu(cp, rng):
    from scipy import ndimage as ndi

    from cpu_fallback import ops as cpu
    from gpu_pipeline import ops_cuda as gpu

    mask = ndi.binary_dilation(rng.random((30, 40, 35)) > 0.97, iterations=3)
    spacing = (2.0, 1.0, 0.5)
    np.testing.assert_allclose(gpu.distance_transform(cp.asarray(mask), spacing).get(),
                               cpu.distance_transform(mask, spacing), rtol=1e-6, atol=1e-5)
    labels, n = gpu.label(cp.asarray(mask))
    ref, n_ref = cpu.label(mask)
    assert n == n_ref and np.array_equal(labels.get(), ref)
    table, want = gpu.label_table(cp.asarray(mask)), cpu.label_table(mask)
    assert table[1] == want[1] and np.array_equal(table[0].get(), want[0]) and np.array_equal(table[2].get(), want[2])
    values = rng.integers(0, 4, (20, 30, 25)).astype(np.int32)
    np.testing.assert_array_equal(gpu.label_by_value(cp.asarray(values)).get(), cpu.label_by_value(values))
    arr = rng.random((40, 50)).astype(np.float32)
    np.testing.assert_array_equal(gpu.maximum_filter(cp.asarray(arr), (5, 7)).get(), cpu.maximum_filter(arr, (5, 7)))
    maxed = cpu.maximum_filter(values, (5, 5, 5))
    core = (slice(2, 18), slice(2, 28), slice(0, 25))
    for got, want in zip(gpu.box_maxima(cp.asarray(values), cp.asarray(maxed), 0, (2, 2, 2), core),
                         cpu.box_maxima(values, maxed, 0, (2, 2, 2), core)):
        np.testing.assert_array_equal(got.get(), want)
    distance = cpu.distance_transform(mask, spacing)
    np.testing.assert_array_equal(gpu.local_maxima(cp.asarray(distance), 1.5).get(), cpu.local_maxima(distance, 1.5))
    image = rng.integers(0, 255, values.shape).astype(np.uint8)
    on_gpu, on_cpu = gpu.label_sums(cp.asarray(values), cp.asarray(image)), cpu.label_sums(values, image)
    for key in on_cpu:
        np.testing.assert_array_equal(on_gpu[key].get(), on_cpu[key])


@pytest.mark.parametrize("shape,spacing", [((192, 192), (1.0, 1.0)), ((40, 96, 96), (2.0, 1.0, 1.0))])
def test_pipeline_parity_threshold_peaks_and_labels(cp, rng, shape, spacing):
    from cpu_fallback import separate as cpu_separate
    from gpu_pipeline.pipeline import separate as pipeline_separate
    from gpu_pipeline.synthetic import make_touching_particles

    image, _ = make_touching_particles(shape, 60, spacing=spacing, seed=int(rng.integers(1e6)))
    # sigma=0: Gaussian filters in float32 round differently on the two backends, which can move
    # a voxel across the threshold; without smoothing every later stage is exact integer/quantised work.
    kw = dict(spacing=spacing, sigma=0.0, min_distance=4)
    cpu_labels, cpu_d = cpu_separate(image, return_details=True, **kw)
    gpu_labels, gpu_d = pipeline_separate(cp.asarray(image), return_details=True, **kw)
    assert gpu_d.threshold == cpu_d.threshold and gpu_d.n_peaks == cpu_d.n_peaks
    gpu_labels = gpu_labels.get()
    # Power distances are computed in float64 on both; NVRTC may fuse multiply-adds, so a voxel
    # exactly equidistant from two centroids may go either way: allow 0.1% of foreground voxels.
    differ = np.count_nonzero(gpu_labels != cpu_labels)
    assert gpu_labels.max() == cpu_labels.max()
    assert differ <= 1e-3 * np.count_nonzero(cpu_labels), differ


def test_pipeline_parity_with_smoothing_is_close(cp, rng):
    from cpu_fallback import separate as cpu_separate
    from gpu_pipeline.metrics import evaluate
    from gpu_pipeline.pipeline import separate as pipeline_separate
    from gpu_pipeline.synthetic import make_touching_particles

    image, _ = make_touching_particles((40, 96, 96), 60, spacing=(2, 1, 1), seed=int(rng.integers(1e6)))
    a = cpu_separate(image, spacing=(2, 1, 1), min_distance=4)
    b = pipeline_separate(cp.asarray(image), spacing=(2, 1, 1), min_distance=4).get()
    assert evaluate(b, a)["mean_f1"] >= 0.99


def test_chunked_on_the_gpu_equals_gpu_in_memory(cp, rng, tmp_path):
    """Chunks as CuPy arrays (device='gpu'): byte-identical to the in-memory GPU result, for several chunkings."""
    import dask.array as da

    from gpu_pipeline.chunked.pipeline import separate_chunked
    from gpu_pipeline.chunked.workspace import Workspace
    from gpu_pipeline.pipeline import separate
    from gpu_pipeline.synthetic import make_touching_particles

    spacing = (2.0, 1.0, 1.0)
    image, _ = make_touching_particles((40, 64, 60), 60, spacing=spacing, seed=int(rng.integers(1e6)))
    expected = separate(cp.asarray(image), spacing=spacing, max_radius=13.0, **CHUNKED_DEFAULTS).get()
    for chunks in [(20, 32, 30), (17, 25, 23), (14, 24, 24)]:  # (the last still holds the halo, 11 x 22 x 22)
        labels, _ = separate_chunked(da.from_array(image, chunks=chunks), spacing=spacing, max_radius=13.0,
                                     workspace=Workspace(tmp_path / str(chunks)), device="gpu")
        out = labels.map_blocks(lambda b: b.get() if hasattr(b, "get") else b, dtype=labels.dtype).compute()
        assert out.tobytes() == expected.tobytes(), chunks


def test_cli_on_a_local_cuda_cluster(cp, rng, tmp_path):
    """`declump run --cluster local-cuda`: dask-cuda workers, same bytes as the GPU in-memory result."""
    pytest.importorskip("dask_cuda")
    import zarr

    from gpu_pipeline.cli import main
    from gpu_pipeline.pipeline import separate
    from gpu_pipeline.synthetic import make_touching_particles

    image, _ = make_touching_particles((48, 96, 96), 120, seed=int(rng.integers(1e6)))
    zarr.create_array(str(tmp_path / "in.zarr"), shape=image.shape, dtype=image.dtype, chunks=(24, 48, 48))[...] = image
    assert main(["run", str(tmp_path / "in.zarr"), str(tmp_path / "out.zarr"), "--cluster", "local-cuda",
                 "--max-radius", "13", "--quiet"]) == 0
    expected = separate(cp.asarray(image), max_radius=13.0, **CHUNKED_DEFAULTS).get()
    assert zarr.open_array(str(tmp_path / "out.zarr" / "particles" / "0"))[...].tobytes() == expected.tobytes()


def test_neck_groups_on_the_gpu_equal_numpy(cp, rng):
    """Neck grouping on CuPy arrays: the same groups as on NumPy from the same quantised distance map."""
    from scipy import ndimage as ndi

    from gpu_pipeline.stages.peaks import find_peaks, neck_groups, quantize_distance, window_half_widths

    spacing = (1.5, 1.0)
    mask = ndi.gaussian_filter(rng.random((160, 160)), 5) > 0.5
    distance_q, _ = quantize_distance(ndi.distance_transform_edt(mask, sampling=spacing).astype(np.float32), spacing)
    regions, _ = ndi.label(mask)
    peaks = find_peaks(distance_q, half_widths=window_half_widths(3, spacing))
    for ratio in (0.7, 0.9):
        expected = neck_groups(peaks, distance_q, regions, spacing, ratio)
        assert len(np.unique(expected)) < len(peaks)  # something was joined
        got = neck_groups(cp.asarray(peaks), cp.asarray(distance_q), cp.asarray(regions), spacing, ratio)
        np.testing.assert_array_equal(got.get(), expected)


# --- the GPU path beyond parity of the default run ------------------------------------------------------------


def _sample(shape, n, rng, spacing=None):
    from gpu_pipeline.synthetic import make_touching_particles

    return make_touching_particles(shape, n, spacing=spacing, seed=int(rng.integers(1e6)))[0]


def test_distance_transform_on_non_cubic_and_all_foreground_chunks_equals_the_cpu(cp, rng):
    """No padding to a cube, inf without background (PBA+ gave distances to a corner), exact below the cap."""
    from cpu_fallback import ops as cpu
    from gpu_pipeline import ops_cuda as gpu

    for shape, spacing in [((12, 300, 200), (3.0, 1.0, 0.8)), ((150, 20), (1.0, 2.5)), ((64, 65, 66), (1, 1, 1))]:
        mask = rng.random(shape) > 0.08
        np.testing.assert_allclose(gpu.distance_transform(cp.asarray(mask), spacing).get(),
                                   cpu.distance_transform(mask, spacing), rtol=2e-6, atol=1e-5)
    full = np.ones((40, 80, 30), dtype=bool)
    assert cp.isinf(gpu.distance_transform(cp.asarray(full), (2.0, 1.0, 1.0))).all()
    capped = gpu.distance_transform(cp.asarray(mask), (1, 1, 1), max_distance=3.0)
    expected = np.minimum(cpu.distance_transform(mask, (1, 1, 1)), 3.0)
    np.testing.assert_array_equal(cp.minimum(capped, 3.0).get(), expected)


def test_equal_value_labels_and_int64_scatters_on_the_device(cp, rng):
    from skimage.measure import label as sk_label

    from gpu_pipeline import ops_cuda as gpu

    values = rng.integers(0, 3, (40, 50, 45)).astype(np.int64)
    np.testing.assert_array_equal(gpu.label_by_value(cp.asarray(values)).get(),
                                  sk_label(values, background=0, connectivity=1))
    target = cp.full(5, 2**40, dtype=cp.int64)
    gpu.scatter_min(target, cp.asarray([1, 1, 3]), cp.asarray([2**35, 7, 2**36], dtype=cp.int64))
    gpu.scatter_max(target, cp.asarray([0]), cp.asarray([2**41], dtype=cp.int64))
    assert target.get().tolist() == [2**41, 7, 2**40, 2**36, 2**40]


def test_piece_stats_on_the_device_equal_the_compiled_cpu_pass(cp, rng):
    """Label, size and first voxel of every piece: the device's scatters give the CPU kernel's arrays."""
    from skimage.measure import label as sk_label

    from gpu_pipeline.stages.components import piece_stats

    labels = rng.integers(0, 4, (30, 40, 35)).astype(np.int32)
    pieces = sk_label(labels, background=0, connectivity=1).astype(np.int32)
    pieces[pieces == 3] = 0
    got = piece_stats(cp.asarray(pieces), cp.asarray(labels), return_first=True)
    want = piece_stats(pieces, labels, return_first=True)
    np.testing.assert_array_equal(got[0][1:].get(), want[0][1:])  # index 0: background, any of its values
    for got_array, want_array in zip(got[1:], want[1:]):
        np.testing.assert_array_equal(got_array.get(), want_array)


@pytest.mark.parametrize("max_rounds", [1, 10])
def test_one_piece_rounds_on_the_device_equal_numpy(cp, rng, max_rounds):
    """The device's pieces, piece pairs (array path) and host-side graph rounds give NumPy's labels and pieces."""
    from scipy import ndimage as ndi

    from gpu_pipeline.stages.components import one_piece_rounds

    shape = (30, 40, 36)
    seeds = np.zeros(shape, dtype=np.int32)
    seeds[tuple(rng.integers(0, n, 40) for n in shape)] = np.arange(1, 41)
    labels = seeds[tuple(ndi.distance_transform_edt(seeds == 0, return_indices=True)[1])]
    specks = rng.random(shape) < 0.2
    labels[specks] = rng.integers(0, 41, int(specks.sum()))
    want_labels, want_pieces = one_piece_rounds(labels, max_rounds)
    got_labels, got_pieces = one_piece_rounds(cp.asarray(labels), max_rounds)
    np.testing.assert_array_equal(got_labels.get(), want_labels)
    np.testing.assert_array_equal(got_pieces.get(), want_pieces)


@pytest.mark.parametrize("options", [dict(method="watershed"), dict(assignment="euclidean", max_iter=5),
                                     dict(kmeans_engine="sklearn", assignment="euclidean", max_iter=3),
                                     dict(max_hole_size=30.0), dict(neck_ratio=0.8),
                                     dict(neck_ratio=None, nearby_ratio=1.0), dict(peak_reach=1.0),
                                     dict(ball_share=0.7), dict(peak_reach=0.7, reach_share=0.4)])
def test_public_separate_on_the_gpu_equals_the_cpu_for_each_option(cp, rng, options):
    """``separate(..., device='gpu')`` on NumPy input: NumPy out, the CPU result (sigma 0: exact stages)."""
    from gpu_pipeline import evaluate, separate

    image = _sample((32, 80, 72), 40, rng, spacing=(2.0, 1.0, 1.0))
    kw = dict(spacing=(2.0, 1.0, 1.0), sigma=0.0, min_distance=4, **options)
    on_gpu = separate(image, device="gpu", **kw)
    on_cpu = separate(image, device="cpu", **kw)
    assert isinstance(on_gpu, np.ndarray) and on_gpu.dtype == on_cpu.dtype
    assert on_gpu.max() == on_cpu.max()
    assert evaluate(on_gpu, on_cpu)["mean_f1"] >= 0.999


def test_cuml_engine_on_the_gpu_matches_sklearn(cp, rng):
    pytest.importorskip("cuml")
    from gpu_pipeline import evaluate
    from gpu_pipeline.pipeline import separate

    image = _sample((96, 96), 30, rng)
    kw = dict(sigma=0.0, min_distance=4, assignment="euclidean", max_iter=5)
    a = separate(cp.asarray(image), kmeans_engine="cuml", **kw).get()
    b = separate(image, kmeans_engine="sklearn", **kw)
    assert evaluate(a, b)["mean_f1"] >= 0.98


def test_mask_input_and_particle_table_on_cupy(cp, rng):
    from gpu_pipeline import evaluate
    from gpu_pipeline.measure import particle_table
    from gpu_pipeline.pipeline import separate

    image = _sample((120, 140), 40, rng)
    mask = (image > np.percentile(image, 60)).astype(np.float32) * 0.9  # a probability map, foreground > 0.5
    gpu_labels = separate(cp.asarray(image), mask=cp.asarray(mask), min_distance=4)
    cpu_labels = separate(image, mask=mask, min_distance=4)
    assert gpu_labels.get().max() == cpu_labels.max()
    assert evaluate(gpu_labels.get(), cpu_labels)["mean_f1"] >= 0.999
    gpu_table = particle_table(cp.asarray(cpu_labels), cp.asarray(image), spacing=(1.5, 1.0))
    cpu_table = particle_table(cpu_labels, image, spacing=(1.5, 1.0))
    assert list(gpu_table) == list(cpu_table)
    for column in cpu_table:
        assert isinstance(gpu_table[column], np.ndarray)
        np.testing.assert_allclose(gpu_table[column], cpu_table[column], rtol=1e-12)


def test_sklearn_engine_takes_host_arrays_from_cupy_input(cp, rng):
    from gpu_pipeline.stages.kmeans import per_region_kmeans

    coords = rng.integers(0, 50, (400, 2))
    groups = np.repeat(np.arange(4), 100)
    centres = np.stack([coords[g * 100:g * 100 + 3].astype(np.float64) for g in range(4)]).reshape(-1, 2)
    centre_groups = np.repeat(np.arange(4), 3)
    expected = per_region_kmeans(coords, groups, centres, centre_groups, spacing=(1, 1), max_iter=5)
    got = per_region_kmeans(*(cp.asarray(a) for a in (coords, groups, centres, centre_groups)), spacing=(1, 1),
                            max_iter=5)
    assert isinstance(got, cp.ndarray)
    np.testing.assert_array_equal(got.get(), expected)


def test_lookup_tables_go_to_the_device_once(cp):
    from gpu_pipeline import ops_cuda

    table = np.arange(1000, dtype=np.int64)
    first = ops_cuda.device_table(table)
    assert ops_cuda.device_table(table) is first  # no second host-to-device copy
    other = np.arange(1000, dtype=np.int64)
    assert ops_cuda.device_table(other) is not first
    key = (id(table), cp.cuda.runtime.getDevice())
    del table, first
    assert key not in ops_cuda._device_tables  # dropped with its host table


def test_cli_device_gpu_in_memory_and_chunked_with_workspace(cp, rng, tmp_path):
    """`declump run --device gpu`: a TIFF in memory and a Zarr chunk by chunk (one GPU worker, staged workspace)."""
    import tifffile
    import zarr

    from gpu_pipeline.cli import main
    from gpu_pipeline.pipeline import separate

    image = _sample((40, 96, 88), 70, rng)
    tifffile.imwrite(tmp_path / "in.tif", image)
    assert main(["run", str(tmp_path / "in.tif"), str(tmp_path / "out.tif"), "--device", "gpu"]) == 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out.tif"), separate(cp.asarray(image)).get())
    zarr.create_array(str(tmp_path / "in.zarr"), shape=image.shape, dtype=image.dtype,
                      chunks=(20, 48, 44))[...] = image
    assert main(["run", str(tmp_path / "in.zarr"), str(tmp_path / "out.zarr"), "--device", "gpu",
                 "--max-radius", "13", "--quiet"]) == 0
    expected = separate(cp.asarray(image), max_radius=13.0, **CHUNKED_DEFAULTS).get()
    assert zarr.open_array(str(tmp_path / "out.zarr" / "particles" / "0"))[...].tobytes() == expected.tobytes()
    assert cp.get_default_memory_pool().get_limit() > 0  # the pool was pinned for the chunked run
    # Three host threads on the one GPU, each on its own chunk (8 chunks here): the same labels.
    assert main(["run", str(tmp_path / "in.zarr"), str(tmp_path / "out3.zarr"), "--device", "gpu",
                 "--max-radius", "13", "--gpu-threads", "3", "--quiet"]) == 0
    assert zarr.open_array(str(tmp_path / "out3.zarr" / "particles" / "0"))[...].tobytes() == expected.tobytes()


def test_reach_share_rescue_on_the_gpu_equals_the_cpu(cp):
    """The reach's overlooked peaks and their rescue (find_peaks' flags, rescued_peaks) on CuPy: separate's
    labels on a 64^3 box where the default rescues a small sphere's centre (the CPU's differ without it)."""
    from gpu_pipeline import separate  # the public one, which takes device=
    from gpu_pipeline.synthetic import make_touching_particles

    image, _ = make_touching_particles((256, 256, 256), 845, radius_range=(8.4, 16), overlap=0.15, seed=26035)
    image = np.ascontiguousarray(image[0:64, 37:101, 94:158])
    kw = dict(min_distance=4, max_radius=16.0, min_size=65)
    on_cpu = separate(image, device="cpu", **kw)
    assert on_cpu.max() == separate(image, device="cpu", reach_share=None, **kw).max() + 1
    np.testing.assert_array_equal(separate(image, device="gpu", **kw), on_cpu)


def test_shell_holes_on_the_gpu_equal_the_cpu(cp, rng):
    from gpu_pipeline.stages.cleanup import fill_shell_holes

    grids = np.indices((80, 90), dtype=float)
    mask = rng.random((80, 90)) < 0.01
    for _ in range(10):
        centre, outer = rng.uniform(0, (80, 90)), rng.uniform(4, 12)
        d = np.sqrt(sum((g - c) ** 2 for g, c in zip(grids, centre)))
        mask |= (d <= outer) & (d > outer * rng.uniform(0.2, 0.8))
    for share in ("auto", 0.05, None):  # the 2D core share (labelling of the filled mask, bincounts) and without
        want, n_want = fill_shell_holes(mask, (1.0, 1.3), share=share)
        got, n_got = fill_shell_holes(cp.asarray(mask), (1.0, 1.3), share=share)
        assert n_got == n_want > 0 and np.array_equal(got.get(), want)


def test_pocket_holes_on_the_gpu_equal_the_cpu(cp, rng):
    """pocket_holes (hole labels, peaks, the probes of the inscribed circles, the segment minima) on CuPy equals
    NumPy on touching discs around a pocket beside a disc with a round hole, and on random rings."""
    from scipy import ndimage as ndi
    from test_stages import _ring_and_cored_nucleus

    from gpu_pipeline.stages.cleanup import pocket_holes

    _, truth, _, core = _ring_and_cored_nucleus(rng)
    before = (truth > 0) & ~core
    grids = np.indices(truth.shape, dtype=float)
    for _ in range(6):
        centre, outer = rng.uniform(0, truth.shape), rng.uniform(4, 12)
        d = np.sqrt(sum((g - c) ** 2 for g, c in zip(grids, centre)))
        before |= (d <= outer) & (d > outer * rng.uniform(0.2, 0.8))
    after = ndi.binary_fill_holes(before)
    for spacing in ((1.0, 1.0), (1.0, 1.3)):
        want, n_want = pocket_holes(before, after, spacing, 6.0)
        got, n_got = pocket_holes(cp.asarray(before), cp.asarray(after), spacing, 6.0)
        assert n_got == n_want and np.array_equal(got.get(), want)
    assert want.any()


def test_an_information_band_on_the_gpu_equals_the_cpu(cp, rng):
    """The band found on the device (its per-line shares) and the labels of the barred image, ink included."""
    from test_autofg import with_data_bar

    from gpu_pipeline import separate
    from gpu_pipeline.stages.annotations import info_band
    from gpu_pipeline.synthetic import make_touching_particles

    image, _ = make_touching_particles((200, 240), 25, seed=int(rng.integers(1e6)))
    for edge, ground in (("bottom", 0), ("left", 255)):
        barred, _ = with_data_bar(image, rng, edge, ground)
        assert info_band(cp.asarray(barred)) == info_band(barred) is not None
        on_gpu, details = separate(cp.asarray(barred), sigma=0.0, return_details=True)  # (sigma 0: exact stages)
        assert details.info_band == info_band(barred)
        np.testing.assert_array_equal(on_gpu.get(), separate(barred, sigma=0.0))


def test_label_box_ink_on_the_gpu_equals_the_cpu(cp, rng):
    """Annotation ink with a label box (its ground found by labelling, hole filling and bounding boxes)."""
    from test_autofg import draw_text

    from gpu_pipeline.stages.annotations import annotation_ink
    from gpu_pipeline.synthetic import make_touching_particles

    image, _ = make_touching_particles((240, 280), 25, seed=int(rng.integers(1e6)))
    image = (20 + 0.85 * image).astype(np.uint8)
    image[4:42, 5:39] = 255
    draw_text(image, "b", 11, 15, height=24, stroke=4, value=0)
    want = annotation_ink(image)
    assert want[4:42, 5:39].all()
    np.testing.assert_array_equal(annotation_ink(cp.asarray(image)).get(), want)


def test_lone_stroke_ink_on_the_gpu_equals_the_cpu(cp, rng, monkeypatch):
    """The companion rule on CuPy (pairs of pieces in batches, the corner and shape tests): a lone glyph in a
    side margin is no ink, a pair on one line and a corner letter are, as on the CPU."""
    from test_autofg import draw_text

    from gpu_pipeline.stages import annotations

    image = np.clip(rng.normal(40, 4, (300, 360)), 0, 250).astype(np.uint8)
    lone = draw_text(image, "5", int(rng.integers(120, 160)), int(rng.integers(8, 40)))
    pair = draw_text(image, "50", int(rng.integers(120, 160)), int(rng.integers(300, 320)))
    letter = draw_text(image, "b", 6, 6)
    want = annotations.annotation_ink(image)
    assert not want[lone].any() and want[pair].all() and want[letter].all()
    monkeypatch.setattr(annotations, "COMPANION_PAIRS", 1)  # batches of one row
    np.testing.assert_array_equal(annotations.annotation_ink(cp.asarray(image)).get(), want)


def test_edge_outlines_on_the_gpu_equal_the_cpu(cp, rng):
    """edge_outlines (box maxima of the rings, the gradient, the per-particle means, the corner pieces' check)
    on CuPy equals NumPy on touching particles thresholded high on their edges, with and without a margin, on
    anisotropic spacing, and with pixels not allowed."""
    from scipy import ndimage as ndi

    from gpu_pipeline import separate
    from gpu_pipeline.stages.outline import edge_outlines
    from gpu_pipeline.synthetic import make_touching_particles

    image, _ = make_touching_particles((160, 160), 40, blur=2.0, intensity_range=(0.6, 1.0),
                                       seed=int(rng.integers(1 << 30)))
    labels = separate(image, threshold=140.0, outline="threshold")
    smoothed = ndi.gaussian_filter(image.astype(np.float32), 1.0)
    allowed = rng.random(image.shape) > 0.05
    for spacing, margin, where in (((1.0, 1.0), 0.2, None), ((1.0, 1.3), 0.0, None), ((1.0, 1.0), 0.0, allowed)):
        want, n_want = edge_outlines(labels, smoothed, spacing, margin=margin, allowed=where)
        got, n_got = edge_outlines(cp.asarray(labels), cp.asarray(smoothed), spacing, margin=margin,
                                   allowed=None if where is None else cp.asarray(where))
        assert n_got == n_want and np.array_equal(got.get(), want)
    assert n_want > 0


def test_auto_threshold_with_li_on_the_gpu_equals_the_cpu(cp, rng):
    """auto on dim and bright nuclei: Li chosen, Otsu's outline kept for the objects Otsu finds (covered_objects'
    bincounts and combined_foreground's table lookup on CuPy) - the same mask as on NumPy."""
    from scipy import ndimage as ndi

    from gpu_pipeline.stages.threshold import threshold_foreground
    from gpu_pipeline.synthetic import make_uneven_nuclei

    image, _ = make_uneven_nuclei((256, 256), 60, seed=int(rng.integers(1e6)))
    smoothed = ndi.gaussian_filter(image.astype(np.float32), 1.0)
    mask, decision = threshold_foreground(smoothed, "auto", "bright")
    on_gpu, gpu_decision = threshold_foreground(cp.asarray(smoothed), "auto", "bright")
    assert decision.method == gpu_decision.method == "li" and gpu_decision.threshold == decision.threshold
    np.testing.assert_array_equal(on_gpu.get(), mask)


def test_batch_on_the_gpu_with_two_host_threads_equals_the_cpu(cp, rng, tmp_path):
    """`declump batch --device gpu --gpu-threads 2`: two images side by side on one GPU, each the CPU's labels."""
    import tifffile

    from gpu_pipeline.cli import main

    (tmp_path / "in").mkdir()
    for name, shape in (("a", (192, 160)), ("b", (32, 80, 72))):
        tifffile.imwrite(tmp_path / "in" / f"{name}.tif", _sample(shape, 40, rng),
                         metadata={"axes": "YX" if len(shape) == 2 else "ZYX"})
    options = ["--sigma", "1", "--min-distance", "4"]
    assert main(["batch", str(tmp_path / "in"), "--out", str(tmp_path / "cpu"), "--device", "cpu", *options]) == 0
    assert main(["batch", str(tmp_path / "in"), "--out", str(tmp_path / "gpu"), "--device", "gpu", "--gpu-threads",
                 "2", *options]) == 0
    for name in ("a", "b"):
        expected = tifffile.imread(tmp_path / "cpu" / f"{name}_labels.tif")
        assert expected.max() > 0
        assert np.array_equal(tifffile.imread(tmp_path / "gpu" / f"{name}_labels.tif"), expected)
