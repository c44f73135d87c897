"""The trainable pixel classifier: features, the array-module forest, model files, training, runs in memory and
chunked (same bytes for any chunking), the CLI, and boolean masks as input."""
import json
import numpy as np
import pytest
import tifffile

import gpu_pipeline.classifier as classifier_module
from gpu_pipeline._backend import DeclumpError
from gpu_pipeline.classifier import (classes_from_instances, forest_from_sklearn,
                                     forest_probabilities, foreground_probability, load_classifier,
                                     train_classifier)
from gpu_pipeline.stages.features import (feature_halo, feature_names, intensity_limits, pixel_features,
                                          symmetric_eigenvalues, tile_features, normalize_intensity)
from gpu_pipeline.synthetic import make_touching_particles

#: Small scales keep the halo (and so the chunks the tests need) small; the code paths are those of the defaults.
SCALES = (0.7, 1.6, 3.5)


def _trained(rng, shape=(120, 110), spacing=None, n=30, **kwargs):
    image, truth = make_touching_particles(shape, n, radius_range=(5, 10), spacing=spacing,
                                           seed=int(rng.integers(1e6)))
    model = train_classifier(image, classes_from_instances(truth), spacing=spacing, scales=SCALES,
                             samples_per_class=1500, n_estimators=12, max_depth=10, **kwargs)
    return model, image, truth


# --- the forest evaluator --------------------------------------------------------------------------------
@pytest.mark.parametrize("n_classes,max_depth", [(2, 1), (3, 2), (2, 6), (3, 14)])
def test_forest_evaluator_equals_sklearn_predict_proba(rng, n_classes, max_depth):
    from sklearn.ensemble import RandomForestClassifier

    x = rng.normal(size=(3000, 9)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] * x[:, 2] > 0).astype(int) + (n_classes == 3) * (x[:, 3] > 0.8)
    model = RandomForestClassifier(n_estimators=7, max_depth=max_depth, random_state=int(rng.integers(1e6))).fit(x, y)
    test = rng.normal(size=(5000, 9)).astype(np.float32)
    # Pixels exactly at split thresholds (rounded to float32 both ways) decide as scikit-learn does.
    tree = model.estimators_[0].tree_
    inner = np.flatnonzero(tree.children_left >= 0)
    for k, node in enumerate(inner[:200]):
        value = np.float32(tree.threshold[node])
        test[k, tree.feature[node]] = value
        test[200 + k, tree.feature[node]] = np.nextafter(value, np.float32(np.inf))
    forest = forest_from_sklearn(model)
    ours = forest_probabilities(test, forest, engine="arrays")
    assert ours.dtype == np.float32 and ours.shape == (5000, n_classes)
    np.testing.assert_allclose(ours, model.predict_proba(test), rtol=0, atol=1e-6)
    # The compiled traversal of the rebuilt trees (the NumPy default) reaches the same leaves: same bytes.
    assert forest_probabilities(test, forest, engine="sklearn").tobytes() == ours.tobytes()
    assert forest_probabilities(test, forest).tobytes() == ours.tobytes()


# --- features --------------------------------------------------------------------------------------------
def test_symmetric_eigenvalues_equal_numpy_eigvalsh(rng):
    for ndim in (2, 3):
        a = rng.normal(size=(500, ndim, ndim))
        a = a + np.swapaxes(a, 1, 2)
        a[:20] = np.eye(ndim) * rng.normal(size=(20, 1, 1))  # repeated eigenvalues
        ours = symmetric_eigenvalues({(i, j): a[:, i, j] for i in range(ndim) for j in range(i, ndim)})
        np.testing.assert_allclose(np.stack(ours, 1), np.linalg.eigvalsh(a)[:, ::-1], atol=1e-4, rtol=1e-5)


def test_features_equal_independent_references(rng):
    from scipy import ndimage as ndi

    image = (rng.random((30, 40, 36)) ** 3 * 4000).astype(np.uint16)  # most pixels dark: a clear minority side
    spacing = (2.0, 1.0, 0.5)
    features = pixel_features(image, spacing=spacing, scales=SCALES)
    names = feature_names(3, SCALES)
    assert features.shape == image.shape + (len(names),) and features.dtype == np.float32
    from skimage.filters import threshold_otsu

    low, high = np.percentile(image, [1, 99], method="inverted_cdf")
    if (image > threshold_otsu(image)).mean() > 0.5:  # the side with fewer pixels normalises high
        low, high = high, low
    normalized = (image.astype(np.float64) - low) / (high - low)
    np.testing.assert_allclose(features[..., 0], normalized, atol=1e-6)
    for scale in SCALES:
        sigma = [scale / s for s in spacing]
        smooth = ndi.gaussian_filter(normalized, sigma, mode="nearest", truncate=4.0)
        np.testing.assert_allclose(features[..., names.index(f"gaussian_{scale:g}")], smooth, atol=1e-5)
        # Away from the edges (where np.gradient goes one-sided) the derivatives are central differences.
        inner = tuple(slice(r, -r) for r in (int(4 * g / 2 + 0.5) + 2 for g in sigma))
        gradient = np.gradient(smooth, *spacing)
        magnitude = np.sqrt(sum(g ** 2 for g in gradient))
        np.testing.assert_allclose(features[..., names.index(f"gradient_magnitude_{scale:g}")][inner],
                                   magnitude[inner], atol=1e-4)
        hessian = np.empty(image.shape + (3, 3))
        for i in range(3):
            for j in range(3):
                hessian[..., i, j] = (ndi.correlate1d(smooth, [1.0, -2.0, 1.0], axis=i) / spacing[i] ** 2 if i == j
                                      else np.gradient(gradient[i], spacing[j], axis=j))
        tensor = np.empty(image.shape + (3, 3))
        for i in range(3):
            for j in range(3):
                tensor[..., i, j] = ndi.gaussian_filter(gradient[i] * gradient[j], [g / 2 for g in sigma],
                                                        mode="nearest", truncate=4.0)
        for kind, matrix in (("hessian", hessian), ("structure_tensor", tensor)):
            expected = np.linalg.eigvalsh(matrix[inner])[..., ::-1]
            ours = np.stack([features[..., names.index(f"{kind}_eigenvalue{k}_{scale:g}")] for k in range(3)], -1)
            np.testing.assert_allclose(ours[inner], expected, atol=2e-3 * np.abs(expected).max(), err_msg=kind)
        laplacian = features[..., names.index(f"laplacian_of_gaussian_{scale:g}")]
        np.testing.assert_allclose(laplacian[inner], np.trace(hessian, axis1=-2, axis2=-1)[inner], atol=1e-4)


def test_features_are_contrast_invariant(rng):
    image = rng.integers(0, 200, (50, 60)).astype(np.uint16)
    brighter = image * 7 + 300
    np.testing.assert_allclose(pixel_features(image, scales=SCALES), pixel_features(brighter, scales=SCALES),
                               atol=2e-5)


def test_intensity_limits_are_the_percentiles(rng):
    image = rng.integers(0, 60000, (70, 80)).astype(np.uint16)
    assert intensity_limits(image, low=2, high=97, minority_high=False) == tuple(
        np.percentile(image, [2, 97], method="inverted_cdf"))


@pytest.mark.parametrize("dark_particles", [True, False])
def test_the_side_with_fewer_pixels_normalises_high(rng, dark_particles):
    """Particles (the minority side of Otsu's threshold, from scikit-image) map high, dark or bright: an image and
    its negative give the same features."""
    from skimage.filters import threshold_otsu

    rows, cols = np.indices((90, 120))
    discs = np.zeros((90, 120), bool)
    for r, c in rng.uniform(15, 75, (6, 2)) * [1, 1.3]:
        discs |= np.hypot(rows - r, cols - c) < rng.uniform(5, 9)
    image = np.where(discs, 60, 190) + rng.integers(-3, 4, discs.shape)
    image = (image if dark_particles else 255 - image).astype(np.uint8)
    a, b = intensity_limits(image)
    low, high = np.percentile(image, [1, 99], method="inverted_cdf")
    majority_above = (image > threshold_otsu(image)).mean() > 0.5
    assert (a, b) == ((high, low) if majority_above else (low, high)) and majority_above == dark_particles
    normalized = normalize_intensity(image)
    assert normalized[discs].mean() > 0.9 and normalized[~discs].mean() < 0.1
    np.testing.assert_allclose(pixel_features(image, scales=SCALES), pixel_features(255 - image, scales=SCALES),
                               atol=1e-5)


@pytest.mark.parametrize("shape,spacing", [((70, 90), (1.0, 1.0)), ((26, 40, 38), (2.0, 1.0, 1.0))])
def test_tile_features_equal_the_whole_images(rng, shape, spacing):
    image = rng.normal(size=shape).astype(np.float32)
    whole = pixel_features(image, spacing=spacing, scales=SCALES)
    normalized = normalize_intensity(image)
    for _ in range(4):
        start = [int(rng.integers(0, n - 2)) for n in shape]
        core = tuple(slice(s, int(rng.integers(s + 1, n + 1))) for s, n in zip(start, shape))
        tile = tile_features(normalized, core, spacing=spacing, scales=SCALES)
        assert tile.tobytes() == np.ascontiguousarray(whole[core]).tobytes(), core


# --- the model ---------------------------------------------------------------------------------------------
def test_predict_proba_does_not_depend_on_tiles_and_finds_particles(rng, monkeypatch):
    model, _, _ = _trained(rng)
    image, truth = make_touching_particles((150, 130), 40, radius_range=(5, 10), seed=int(rng.integers(1e6)))
    proba = model.predict_proba(image)
    assert proba.shape == (3, 150, 130) and model.classes == ("background", "particle", "boundary")
    np.testing.assert_allclose(proba.sum(axis=0), 1, atol=1e-5)
    assert proba.tobytes() == model.predict_proba(image, tile_voxels=900).tobytes()
    # Tiles on threads (smaller tiles, as many at once), and forest batches on threads: the same bytes.
    assert proba.tobytes() == model.predict_proba(image, tile_voxels=3000, threads=3).tobytes()
    assert proba.tobytes() == model.predict_proba(image, threads=1).tobytes()
    features = pixel_features(image, scales=model.scales)
    monkeypatch.setattr(classifier_module, "EVALUATOR_BATCH", 256)  # batches of 4096 pixels: several
    assert model.predict_features(features, threads=4).tobytes() == model.predict_features(features, threads=1).tobytes()
    fg = foreground_probability(proba) > 0.5
    dice = 2 * (fg & (truth > 0)).sum() / (fg.sum() + (truth > 0).sum())
    assert dice > 0.95


def test_predict_proba_of_a_volume_does_not_depend_on_threads(rng):
    """In 3D the tiles on threads keep at least a quarter of the tile size; the bytes are those of one thread."""
    image, truth = make_touching_particles((24, 40, 40), 12, radius_range=(4, 7), seed=int(rng.integers(1e6)))[:2]
    model = train_classifier([image], [classes_from_instances(truth)], n_estimators=4, max_depth=6)
    one = model.predict_proba(image, threads=1)
    assert one.tobytes() == model.predict_proba(image, threads=8, tile_voxels=4000).tobytes()
    assert one.tobytes() == model.predict_proba(image, threads=3, tile_voxels=9000).tobytes()


def test_model_file_round_trip_loads_no_code(rng, tmp_path):
    model, image, _ = _trained(rng)
    path = model.save(tmp_path / "model.npz")
    with np.load(path, allow_pickle=False) as data:  # plain arrays: nothing to unpickle
        header = json.loads(data["header"].tobytes().decode())
        # Small files: narrow indices, inner nodes' unused class values as zeros (the predictions below
        # are still byte-equal to the trained model's, which keeps them).
        assert data["feature"].dtype == np.int8 and data["children_left"].dtype == np.int16
        inner = data["children_left"] >= 0
        assert inner.any() and not data["value"][inner].any() and data["value"][~inner].any()
    assert header["feature_set"] == "declump-features-2" and header["scales"] == list(SCALES)
    assert header["classes"] == ["background", "particle", "boundary"] and header["ndim"] == 2
    again = load_classifier(path)
    assert again.predict_proba(image).tobytes() == model.predict_proba(image).tobytes()


def test_pickled_model_is_its_compact_arrays_and_predicts_the_same(rng):
    """A model pickled (as a chunked run hands it to Dask workers) and loaded back: byte-equal probabilities;
    the pickle is smaller than the in-memory trees (the shipped model under Dask's 10 MB large-graph
    warning) and carries no padded copies of a model that already predicted."""
    import pickle

    model, image, _ = _trained(rng)
    expected = model.predict_proba(image)  # builds the padded trees in this process
    assert model.forest._padded
    again = pickle.loads(pickle.dumps(model, protocol=5))
    assert not again.forest._padded
    assert again.predict_proba(image).tobytes() == expected.tobytes()
    assert np.array_equal(again.forest.children_left, model.forest.children_left)
    assert again.forest.children_left.dtype == np.int64  # widened again, as a loaded file is
    shipped = load_classifier("em-particles")
    arrays = sum(a.nbytes for a in vars(shipped.forest).values() if isinstance(a, np.ndarray))
    assert len(pickle.dumps(shipped, protocol=5)) < min(10e6, arrays / 4), arrays


def _rewrite(path, target, change_header=None, change_arrays=None):
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    header = json.loads(arrays["header"].tobytes().decode())
    if change_header:
        change_header(header)
    if change_arrays:
        change_arrays(arrays)
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    np.savez(target, **arrays)
    return target


def test_bad_model_files_are_one_line_errors(rng, tmp_path):
    model, image, _ = _trained(rng)
    good = model.save(tmp_path / "good.npz")
    (tmp_path / "truncated.npz").write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
    tifffile.imwrite(tmp_path / "image.tif", image)
    np.savez(tmp_path / "foreign.npz", weights=np.ones(3))
    np.save(tmp_path / "array.npy", np.ones(3))
    cases = {
        "truncated.npz": "not a readable declump model",
        "image.tif": "not a readable declump model",
        "foreign.npz": "not a declump pixel-classifier model",
        "array.npy": "not a declump pixel-classifier model",
        "missing.npz": "does not exist",
        "features.npz": "feature set",
        "channels.npz": "3-channel",
        "trees.npz": "inconsistent tree arrays",
    }
    _rewrite(good, tmp_path / "features.npz", lambda h: h.update(feature_set="declump-features-1"))  # a model from before the minority-high normalisation
    _rewrite(good, tmp_path / "channels.npz", lambda h: h.update(channels=3))
    _rewrite(good, tmp_path / "trees.npz", change_arrays=lambda a: a["children_left"].__setitem__(
        0, np.iinfo(a["children_left"].dtype).max))  # a child beyond its tree
    for name, message in cases.items():
        with pytest.raises(DeclumpError) as info:
            load_classifier(tmp_path / name)
        assert message in str(info.value) and "\n" not in str(info.value), name
    with pytest.raises(DeclumpError, match="trained on 2D"):
        model.predict_proba(np.zeros((5, 20, 20), np.float32) + np.arange(20))


def test_training_refuses_unusable_labels(rng):
    image = rng.normal(size=(40, 40)).astype(np.float32)
    scribbles = np.zeros((40, 40), np.uint8)
    scribbles[5, 5:20], scribbles[30, 5:20] = 1, 2
    for labels, message in [(scribbles[:30], "shape"), (np.where(scribbles == 2, 0, scribbles), "no pixel of class"),
                            (scribbles * 3, "values [6]")]:
        with pytest.raises(DeclumpError, match=message.replace("[", r"\[").replace("]", r"\]")):
            train_classifier(image, labels.astype(np.uint8), scales=SCALES)
    assert train_classifier(image, scribbles, scales=SCALES, n_estimators=3).classes == ("background", "particle")


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint64, np.uint16])
def test_classes_from_instances_marks_contacts_between_particles(rng, dtype):
    """Against a neighbour loop, for every id dtype: with int64 ids the background's sentinel (the dtype's
    maximum) came back from SciPy's minimum filter as -2**63, and particle pixels next to the background were
    marked boundary."""
    _, truth = make_touching_particles((80, 90), 25, radius_range=(4, 9), seed=int(rng.integers(1e6)))
    truth = truth.astype(dtype)
    classes = classes_from_instances(truth, boundary_width=1)
    padded = np.pad(truth, 1, mode="edge")
    other = np.zeros(truth.shape, bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            neighbour = padded[1 + dy:1 + dy + truth.shape[0], 1 + dx:1 + dx + truth.shape[1]]
            other |= (neighbour > 0) & (neighbour != truth)
    expected = np.where(truth > 0, np.where(other, 3, 2), 1)
    assert (classes == 3).sum() > 50 and np.array_equal(classes, expected)


def test_training_from_precomputed_features_equals_computing_them(rng):
    image, truth = make_touching_particles((60, 70), 10, seed=int(rng.integers(1e6)))
    classes = classes_from_instances(truth)
    kwargs = dict(scales=SCALES, n_estimators=4, samples_per_class=300, seed=3)
    a = train_classifier(image, classes, **kwargs)
    b = train_classifier(image, classes, features=[pixel_features(image, scales=SCALES)], **kwargs)
    assert a.predict_proba(image).tobytes() == b.predict_proba(image).tobytes()


# --- in memory and chunked ---------------------------------------------------------------------------------
CHUNK_CASES = {
    2: ((120, 112), (1.0, 1.0), 30, [(60, 56), (41, 33)]),
    3: ((30, 48, 46), (2.0, 1.0, 1.0), 25, [(15, 24, 23), (13, 22, 25)]),
}


@pytest.mark.parametrize("ndim", [2, 3])
def test_chunked_classifier_labels_equal_in_memory_for_any_chunking(cluster_client, rng, tmp_path, ndim):
    da = pytest.importorskip("dask.array")
    from gpu_pipeline.chunked.pipeline import separate_chunked
    from gpu_pipeline.chunked.workspace import Workspace
    from gpu_pipeline.pipeline import separate

    shape, spacing, n, chunkings = CHUNK_CASES[ndim]
    model, _, _ = _trained(rng, shape, spacing, n)
    image, _ = make_touching_particles(shape, n, radius_range=(5, 10), spacing=spacing, seed=int(rng.integers(1e6)))
    # The chunked engine's fixed sizes (its defaults) where the in-memory defaults are automatic.
    expected, details = separate(image, spacing=spacing, classifier=model, max_radius=11.0, return_details=True,
                                 follow_boundaries=False, min_distance=4.0, max_hole_size=0, min_size=None,
                                 reject_annotations=False)
    assert expected.max() > 10
    for chunks in chunkings:
        assert all(c >= h for c, h in zip(chunks, feature_halo(spacing, SCALES)))
        labels, chunked = separate_chunked(da.from_array(image, chunks=chunks), spacing=spacing, classifier=model,
                                           max_radius=11.0, workspace=Workspace(tmp_path / str(chunks)))
        assert labels.compute().tobytes() == expected.tobytes(), chunks
        assert chunked.probabilities.compute().tobytes() == details.probabilities.tobytes(), chunks


def test_chunked_probabilities_from_a_store_read_each_block_twice_and_hold_the_classifier_once(rng, tmp_path):
    """From a stored volume the probabilities equal in-memory ``predict_proba`` bit for bit, with the halos
    in memory or in the work folder; every store read is one block (each block three times: the limits'
    histogram, its neighbours' slabs, then its own features), never a box with a halo (which decodes every
    stored chunk it touches), a short first block included; and the classifier is in the graph once, not
    pickled into every task."""
    import itertools

    zarr = pytest.importorskip("zarr")
    from gpu_pipeline.chunked.classifier import probabilities_chunked
    from gpu_pipeline.chunked.source import StoredVolume, open_volume, register_stored, stored_volume
    from gpu_pipeline.chunked.workspace import Workspace

    shape, spacing, n, _ = CHUNK_CASES[3]
    model, _, _ = _trained(rng, shape, spacing, n)
    image, _ = make_touching_particles(shape, n, radius_range=(5, 10), spacing=spacing, seed=int(rng.integers(1e6)))
    expected = model.predict_proba(image, spacing=spacing)
    zarr.create_array(str(tmp_path / "in.zarr"), shape=shape, dtype=image.dtype, chunks=(15, 16, 23))[...] = image

    log = tmp_path / "reads.txt"

    class Counting(StoredVolume):  # logs to a file: the reads may run in a cluster's worker processes
        def on(self, device):
            return self

        def read(self, box):
            with open(log, "a") as f:
                f.write(" ".join(f"{b.start} {b.stop}" for b in box) + "\n")
            return super().read(box)

    for k, chunks in enumerate([(15, 24, 23), ((4, 13, 13), (24, 24), (23, 23))]):  # 2nd: a first block shorter than the halo
        volume, _ = open_volume(tmp_path / "in.zarr", chunks=chunks)
        inner = stored_volume(volume)
        counting = Counting(inner.array, inner.path, inner.selection)  # the registry holds it weakly
        register_stored(volume, counting)
        for workspace in (Workspace(None), Workspace(tmp_path / f"work{k}")):
            log.write_text("")
            found = probabilities_chunked(volume, model, spacing=spacing, workspace=workspace)
            if workspace.root is None:  # lazy: the graph is there to look at
                graph = dict(found.__dask_graph__())
                assert sum(value is model for value in graph.values()) == 1
                assert not any(isinstance(task, tuple) and any(a is model for a in task) for task in graph.values())
            assert found.compute(scheduler="threads").tobytes() == expected.tobytes(), chunks
            numbers = [list(map(int, line.split())) for line in log.read_text().splitlines()]
            reads = [tuple(zip(r[0::2], r[1::2])) for r in numbers]
            blocks = [tuple((int(s), int(s + c[i])) for s, c, i in zip(start, volume.chunks, index))
                      for start, index in ((tuple(sum(c[:i]) for c, i in zip(volume.chunks, index)), index)
                                           for index in itertools.product(*[range(len(c)) for c in volume.chunks]))]
            # Each block three times: the limits' histogram (BLOCK_GROUP blocks a task, each read once), then
            # the probabilities pass (its neighbours' slabs, then its own features).
            assert sorted(reads) == sorted(blocks * 3), chunks


def test_cli_trains_runs_and_saves_probabilities_in_memory_and_chunked(rng, tmp_path, capsys):
    zarr = pytest.importorskip("zarr")
    from gpu_pipeline.cli import main
    from gpu_pipeline.metrics import evaluate

    for name, seed in (("train", 0), ("test", 1)):
        image, truth = make_touching_particles((100, 96), 22, radius_range=(5, 10), seed=int(rng.integers(1e6)) + seed)
        tifffile.imwrite(tmp_path / f"{name}.tif", image)
        tifffile.imwrite(tmp_path / f"{name}_truth.tif", truth)
    zarr.create_array(str(tmp_path / "test.zarr"), shape=image.shape, dtype=image.dtype, chunks=(50, 48))[...] = image
    assert main(["train", str(tmp_path / "train.tif"), "--labels", str(tmp_path / "train_truth.tif"),
                 "--from-instances", "--out", str(tmp_path / "model.npz"), "--trees", "10"]) == 0
    assert "boundary" in capsys.readouterr().out
    for source, out, probabilities in (("test.tif", "mem.tif", "mem_p.npy"), ("test.zarr", "chunked.zarr", "chunked_p.zarr")):
        assert main(["run", str(tmp_path / source), str(tmp_path / out), "--classifier", str(tmp_path / "model.npz"),
                     "--save-probabilities", str(tmp_path / probabilities), "--max-radius", "12", "--device", "cpu",
                     *(["--quiet", "--chunks", "50,48"] if out.endswith("zarr") else ["--sigma=1"])]) == 0
    in_memory = np.load(tmp_path / "mem_p.npy")
    assert in_memory.shape == (3, 100, 96)
    assert zarr.open_array(str(tmp_path / "chunked_p.zarr"), mode="r")[...].tobytes() == in_memory.tobytes()
    summary = json.loads((tmp_path / "mem_summary.json").read_text())
    assert summary["parameters"]["classifier"] == str(tmp_path / "model.npz") and "classifier" in summary["stage_seconds"]
    # A sanity bound: 10 trees trained on one 100x96 image score F1@0.5 0.55-0.85 over DECLUMP_TEST_SEED 0-7
    # (0.8 held on two of them).
    assert evaluate(tifffile.imread(tmp_path / "mem.tif"), truth)["f1_50"] > 0.5
    # The complete chunked output again: nothing to do where its probabilities were saved there; refused, not
    # passed over in silence, where --save-probabilities asks for them somewhere they are not.
    rerun = ["run", str(tmp_path / "test.zarr"), str(tmp_path / "chunked.zarr"), "--classifier",
             str(tmp_path / "model.npz"), "--max-radius", "12", "--device", "cpu", "--quiet", "--chunks", "50,48"]
    capsys.readouterr()
    assert main([*rerun, "--save-probabilities", str(tmp_path / "chunked_p.zarr")]) == 0
    assert main([*rerun, "--save-probabilities", str(tmp_path / "other_p.zarr")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "already complete, without the probabilities" in err and "--overwrite" in err, err
    assert not (tmp_path / "other_p.zarr").exists()
    # A model retrained under the same name: the chunked output made with the old one was "already complete"
    # (its labels kept), and an unfinished run resumed with the new model beside the old one's blocks.
    capsys.readouterr()
    assert main(["train", str(tmp_path / "train.tif"), "--labels", str(tmp_path / "train_truth.tif"),
                 "--from-instances", "--out", str(tmp_path / "model.npz"), "--trees", "4"]) == 0
    before = (tmp_path / "chunked.zarr" / "particles" / "0").stat().st_mtime_ns
    assert main(["run", str(tmp_path / "test.zarr"), str(tmp_path / "chunked.zarr"), "--classifier",
                 str(tmp_path / "model.npz"), "--save-probabilities", str(tmp_path / "chunked_p.zarr"),
                 "--max-radius", "12", "--device", "cpu", "--quiet", "--chunks", "50,48"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model.npz changed" in err and "--overwrite" in err, err
    assert (tmp_path / "chunked.zarr" / "particles" / "0").stat().st_mtime_ns == before


def test_cli_classifier_errors_are_one_line_and_write_nothing(rng, tmp_path, capsys, monkeypatch):
    from gpu_pipeline.cli import main

    model, image, truth = _trained(rng)
    model.save(tmp_path / "model2d.npz")
    tifffile.imwrite(tmp_path / "img.tif", image)
    tifffile.imwrite(tmp_path / "truth.tif", truth)
    tifffile.imwrite(tmp_path / "small.tif", truth[:50])
    tifffile.imwrite(tmp_path / "volume.tif", np.stack([image] * 4), photometric="minisblack")
    (tmp_path / "cut.npz").write_bytes((tmp_path / "model2d.npz").read_bytes()[:300])
    no_particle = np.where(truth > 0, 0, 1).astype(np.uint8)
    tifffile.imwrite(tmp_path / "no_particle.tif", no_particle)
    tifffile.imwrite(tmp_path / "fraction.tif", truth.astype(np.float32) + 0.5)
    tifffile.imwrite(tmp_path / "empty.tif", np.zeros_like(truth))
    tifffile.imwrite(tmp_path / "flat.tif", np.full_like(image, 7))
    cases = [
        (("train", "img.tif", "--labels", "small.tif", "--out", "m.npz"), "--labels small.tif has shape"),
        (("train", "img.tif", "--labels", "no_particle.tif", "--out", "m.npz"), "no pixel of class particle"),
        (("run", "volume.tif", "o1.tif", "--classifier", "model2d.npz"), "trained on 2D"),
        (("run", "img.tif", "o2.tif", "--classifier", "cut.npz"), "not a readable declump model"),
        (("run", "img.tif", "o3.tif", "--mask", "small.tif"), "--mask has shape"),
        # Forest sizes and the boundary's width out of range (sklearn's tracebacks before, or a model without
        # its boundary class for a negative width).
        (("train", "img.tif", "--labels", "truth.tif", "--from-instances", "--out", "m.npz", "--trees", "0"),
         "trees (n_estimators) must be a whole number of at least 1"),
        (("train", "img.tif", "--labels", "truth.tif", "--from-instances", "--out", "m.npz", "--max-depth", "-1"),
         "max_depth must be a whole number of at least 1"),
        (("train", "img.tif", "--labels", "truth.tif", "--from-instances", "--out", "m.npz",
          "--samples-per-class", "0"), "samples_per_class must be a whole number of at least 1"),
        (("train", "img.tif", "--labels", "truth.tif", "--from-instances", "--out", "m.npz",
          "--boundary-width", "-2"), "boundary_width must be a whole number of at least 0"),
        # Scribbles have no boundary width to apply: it was ignored without a word.
        (("train", "img.tif", "--labels", "no_particle.tif", "--out", "m.npz", "--boundary-width", "1"),
         "--boundary-width applies to --from-instances"),
        (("train", "img.tif", "--labels", "fraction.tif", "--from-instances", "--out", "m.npz"),
         "not whole numbers"),
        (("train", "img.tif", "--labels", "empty.tif", "--from-instances", "--out", "m.npz"), "holds no particle"),
        (("train", "flat.tif", "--labels", "truth.tif", "--from-instances", "--out", "m.npz"), "flat.tif is constant"),
    ]
    monkeypatch.chdir(tmp_path)
    for args, message in cases:
        assert main(list(args)) == 2, args
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("declump: error:") and message in lines[0], (args, lines)
    assert not any(p.name.startswith(("o1", "o2", "o3", "m.npz")) for p in tmp_path.iterdir())


@pytest.mark.parametrize("suffix", [".tif", ".npy", ".zarr"])
def test_boolean_mask_works_as_input_and_as_mask(rng, tmp_path, suffix):
    zarr = pytest.importorskip("zarr")
    from gpu_pipeline.cli import main
    from gpu_pipeline.io import read_image
    from gpu_pipeline.pipeline import separate

    image, truth = make_touching_particles((96, 100), 15, seed=int(rng.integers(1e6)))
    mask = truth > 0
    # Both kinds of run cap the distance map at --max-radius (in memory it was ignored before 2026-12-05).
    expected = separate(None, mask=mask, max_radius=16.0, min_distance=4.0, max_hole_size=0)
    if suffix == ".tif":
        tifffile.imwrite(tmp_path / "mask.tif", mask)
    elif suffix == ".npy":
        np.save(tmp_path / "mask.npy", mask)
    else:
        zarr.create_array(str(tmp_path / "mask.zarr"), shape=mask.shape, dtype=bool, chunks=(48, 50))[...] = mask
        zarr.create_array(str(tmp_path / "img.zarr"), shape=image.shape, dtype=image.dtype, chunks=(48, 50))[...] = image
    out = ".zarr" if suffix == ".zarr" else ".tif"
    src = tmp_path / f"img{suffix if suffix == '.zarr' else '.npy'}"
    if suffix != ".zarr":
        np.save(src, image)
    for args in ((tmp_path / f"mask{suffix}", tmp_path / f"as_input{out}"),
                 (src, tmp_path / f"as_mask{out}", "--mask", tmp_path / f"mask{suffix}")):
        assert main(["run", *map(str, args), "--device", "cpu", "--max-radius", "16", "--min-distance", "4",
                     "--max-hole-size", "0", "--quiet", *(["--chunks", "48,50"] if out == ".zarr" else [])]) == 0

        labels, _ = read_image(args[1])
        assert np.array_equal(labels, expected), args


@pytest.mark.gpu
def test_gpu_probabilities_equal_the_cpu(rng):
    cp = pytest.importorskip("cupy")
    from gpu_pipeline._backend import gpu_available

    if not gpu_available():
        pytest.skip("needs a CUDA device")
    model, image, _ = _trained(rng)
    x = rng.normal(size=(4000, model.n_features)).astype(np.float32)
    assert cp.asnumpy(forest_probabilities(cp.asarray(x), model.forest)).tobytes() == \
        forest_probabilities(x, model.forest, engine="arrays").tobytes()
    features = pixel_features(image, scales=SCALES)
    np.testing.assert_allclose(cp.asnumpy(pixel_features(cp.asarray(image), scales=SCALES)), features, atol=1e-4)
    cpu, gpu = model.predict_proba(image), cp.asnumpy(model.predict_proba(cp.asarray(image)))
    assert np.mean(np.abs(cpu - gpu) > 1e-5) < 0.01  # features differ in the last bits: rare flips at thresholds


def test_train_picks_a_channel_or_time_point_of_its_images(rng, tmp_path, capsys):
    """`declump train` had no --channel or --timepoint: an image with a 'c' or 't' axis was refused with "pick
    one with --channel", which train then did not accept. The channel given trains the model the plain image
    trains."""
    zarr = pytest.importorskip("zarr")
    from gpu_pipeline.classifier import load_classifier
    from gpu_pipeline.cli import main

    image, truth = make_touching_particles((64, 72), 12, radius_range=(5, 9), seed=int(rng.integers(1e6)))
    group = zarr.open_group(str(tmp_path / "two.zarr"), mode="w", zarr_format=2)
    group.create_array("0", shape=(2, *image.shape), dtype=image.dtype, chunks=(1, *image.shape))[...] = np.stack(
        [255 - image, image])
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": "c", "type": "channel"}, {"name": "y", "type": "space"},
                                                           {"name": "x", "type": "space"}],
                                   "datasets": [{"path": "0", "coordinateTransformations": [
                                       {"type": "scale", "scale": [1.0, 1.0, 1.0]}]}]}]
    np.save(tmp_path / "plain.npy", image)
    tifffile.imwrite(tmp_path / "truth.tif", truth)
    common = ["--labels", str(tmp_path / "truth.tif"), "--from-instances", "--trees", "3"]
    assert main(["train", str(tmp_path / "two.zarr"), *common, "--out", str(tmp_path / "c.npz")]) == 2
    assert "--channel" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "two.zarr"), *common, "--out", str(tmp_path / "c.npz"), "--channel", "1"]) == 0
    assert main(["train", str(tmp_path / "plain.npy"), *common, "--out", str(tmp_path / "p.npz")]) == 0
    by_channel, plain = (load_classifier(tmp_path / f"{n}.npz").predict_proba(image) for n in ("c", "p"))
    assert by_channel.shape == (3, *image.shape) and np.array_equal(by_channel, plain)


def test_the_classifier_api_takes_nested_lists_as_separate_does(rng):
    """train_classifier([image.tolist()], ...) and predict_proba(image.tolist()) raised AttributeError
    ('list' object has no attribute 'ndim') from inside; separate(image.tolist()) works."""
    model, image, truth = _trained(rng, shape=(48, 52), n=6)
    listed = train_classifier([image.tolist()], [classes_from_instances(truth).tolist()], scales=SCALES,
                              samples_per_class=1500, n_estimators=12, max_depth=10)
    assert np.array_equal(listed.predict_proba(image.tolist()), listed.predict_proba(image))
    assert np.array_equal(model.predict_proba(image.tolist()), model.predict_proba(image))


def test_a_model_trained_at_another_spacing_gets_a_note(rng, tmp_path, capsys):
    """A model's feature scales are lengths: trained at 1 px and run on the same pixels calibrated at 3 nm, they
    fell on other pixels without a word (F1@0.5 0.590 against 0.824 in the audit). In memory and chunked, the
    run now says so and names the --spacing that matches the training; at the training's spacing, no note."""
    zarr = pytest.importorskip("zarr")
    from gpu_pipeline.cli import main

    model, image, _ = _trained(rng, shape=(64, 64), n=8)
    model.save(tmp_path / "m.npz")
    for name, scale in (("nm", 3.0), ("px", 1.0)):
        group = zarr.open_group(str(tmp_path / f"{name}.zarr"), mode="w")
        group.create_array("0", shape=image.shape, dtype=image.dtype, chunks=image.shape)[...] = image
        group.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": [
            {"name": a, "type": "space", "unit": "nanometer"} for a in "yx"], "datasets": [
            {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [scale, scale]}]}]}]}
        for out in ("mem.tif", "chunked.zarr"):
            assert main(["run", str(tmp_path / f"{name}.zarr"), str(tmp_path / f"{name}_{out}"), "--classifier",
                         str(tmp_path / "m.npz"), "--device", "cpu", "--max-radius", str(12 * scale)]) == 0
            err = capsys.readouterr().err
            assert ("trained at spacing 1,1 and this image's is 3,3 nanometer" in err and "--spacing 1,1" in err) \
                == (name == "nm"), (name, out, err)
    summary = json.loads((tmp_path / "nm_mem_summary.json").read_text())
    assert summary["parameters"]["classifier"] == str(tmp_path / "m.npz")


def test_probability_maps_name_their_classes_and_a_chunked_run_says_it_skips_the_boundary(rng, tmp_path, capsys):
    """The probability outputs did not say which plane is which class; a chunked run with a 3-class model split
    by the distance map without a word (87 particles chunked against 16 in memory in the audit)."""
    zarr = pytest.importorskip("zarr")
    from gpu_pipeline.cli import main

    model, image, _ = _trained(rng, shape=(64, 64), n=8)  # background, particle, boundary
    assert model.classes == ("background", "particle", "boundary")
    model.save(tmp_path / "m.npz")
    np.save(tmp_path / "img.npy", image)
    zarr.create_array(str(tmp_path / "img.zarr"), shape=image.shape, dtype=image.dtype, chunks=image.shape)[...] = image
    for source, out, probabilities in (("img.npy", "a.tif", "p.tif"), ("img.npy", "b.tif", "p.zarr"),
                                       ("img.zarr", "c.zarr", "q.zarr")):
        assert main(["run", str(tmp_path / source), str(tmp_path / out), "--classifier", str(tmp_path / "m.npz"),
                     "--save-probabilities", str(tmp_path / probabilities), "--max-radius", "12"]) == 0
        err = capsys.readouterr().err
        assert ("do not follow the model's boundary class" in err) == out.endswith(".zarr"), (out, err)
    with tifffile.TiffFile(tmp_path / "p.tif") as tif:
        assert json.loads(tif.pages[0].description)["classes"] == list(model.classes)
    for name in ("p.zarr", "q.zarr"):
        assert zarr.open_array(str(tmp_path / name), mode="r").attrs["classes"] == list(model.classes)


def test_train_from_instances_reads_ground_truth_as_evaluate_does(rng, tmp_path, capsys):
    """--from-instances refused whole-number float32 labels (a label image saved as float) and a bool mask, which
    `declump evaluate` accepts: the same model as from the integer labels."""
    from gpu_pipeline.cli import main

    _, image, truth = _trained(rng, shape=(64, 64), n=8)
    tifffile.imwrite(tmp_path / "img.tif", image)
    tifffile.imwrite(tmp_path / "int.tif", truth)
    tifffile.imwrite(tmp_path / "float.tif", truth.astype(np.float32))
    for name in ("int", "float"):
        assert main(["train", str(tmp_path / "img.tif"), "--labels", str(tmp_path / f"{name}.tif"),
                     "--from-instances", "--trees", "2", "--out", str(tmp_path / f"{name}.npz")]) == 0
    from gpu_pipeline.classifier import load_classifier

    assert np.array_equal(load_classifier(tmp_path / "int.npz").predict_proba(image),
                          load_classifier(tmp_path / "float.npz").predict_proba(image))
