"""The trainable pixel classifier: a random forest on multi-scale pixel features, trained with scikit-learn.

Training runs scikit-learn on the host. Prediction (:func:`forest_probabilities`)
runs the exported trees tile by tile (never the features of a whole large
volume at once): on the GPU as array code on CuPy, on the CPU with
scikit-learn's compiled traversal of the same trees rebuilt from the arrays;
both reach the same leaves, so the probabilities are the same bytes, and
equal scikit-learn's ``predict_proba``. A model is one ``.npz`` file of the tree
arrays and a JSON header (feature set, scales, spacing, classes, versions);
loading it runs no code (no pickle).

Classes, by scribble value: 0 unlabelled, 1 ``background``, 2 ``particle``,
3 ``boundary`` (optional: the line between touching particles).
"""
from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import numpy as np

from gpu_pipeline._backend import DeclumpError, get_array_module, is_cupy_array
from gpu_pipeline._common import each_on_threads, usable_cores, whole_number_at_least
from gpu_pipeline.stages.features import (DEFAULT_PERCENTILES, DEFAULT_SCALES, FEATURE_SET_VERSION, feature_halo,
                                          feature_names, intensity_limits, normalize_intensity, tile_features)

#: Scribble value -> class name. 0 is unlabelled.
CLASS_NAMES = {1: "background", 2: "particle", 3: "boundary"}
MODEL_FORMAT = "declump-pixel-classifier"
MODEL_FORMAT_VERSION = 1
#: Shipped models, by name: files in gpu_pipeline/models/.
SHIPPED_MODELS = {"em-particles": "em-particles.npz"}

DEFAULT_TREES = 32
DEFAULT_DEPTH = 12
DEFAULT_SAMPLES_PER_CLASS = 20000
#: Pixels per tile whose features are held at once (times n_features x 4 bytes).
TILE_VOXELS = 1 << 21
#: Pixels per batch of the array evaluator (its index arrays are n_trees x this; small
#: enough to stay in cache, which measured faster than larger batches); 16x this for the compiled one.
EVALUATOR_BATCH = 1 << 12


# --- the forest as arrays ----------------------------------------------------------------------------------
class _Forest:
    """Trees as scikit-learn stores them, concatenated; and the same trees padded to complete binary trees.

    The padded layout (every tree ``depth`` levels deep; a leaf above the
    bottom sends every pixel left to copies of itself) lets the evaluator
    run the same fixed number of gather-compare steps for every pixel, with
    children at ``2 i + 1`` and ``2 i + 2``: no child tables, no branches.
    """

    def __init__(self, node_count, children_left, children_right, feature, threshold, value):
        self.node_count = np.asarray(node_count, dtype=np.int64)
        self.children_left = np.asarray(children_left, dtype=np.int64)
        self.children_right = np.asarray(children_right, dtype=np.int64)
        self.feature = np.asarray(feature, dtype=np.int64)
        self.threshold = np.asarray(threshold, dtype=np.float64)
        self.value = np.asarray(value, dtype=np.float32)
        self._padded = {}

    @property
    def n_trees(self):
        return int(self.node_count.size)

    def arrays(self):
        # Smaller files, same trees and predictions: node and feature indices in the narrowest integer
        # type that holds them (loading widens them again), and the class values of inner nodes, which
        # no prediction reads (only leaves are), written as zeros that compress to almost nothing.
        leaf = (self.children_left < 0)[:, None]
        return {"node_count": self.node_count, "children_left": _narrow(self.children_left),
                "children_right": _narrow(self.children_right), "feature": _narrow(self.feature),
                "threshold": self.threshold, "value": np.where(leaf, self.value, np.float32(0))}

    def __getstate__(self):
        # Pickled (a chunked run hands the model to its Dask workers in a task graph) as its file holds it,
        # compressed: the shipped model's 21.7 MB as 4.2 MB, 0.1 s (Dask warned on stderr of every
        # --classifier run on a cluster: "Sending large graph of size 20.67 MiB"). The padded copies stay
        # behind: each process builds its own (on the GPU they are device arrays).
        import pickle
        import zlib

        return {"arrays": zlib.compress(pickle.dumps(self.arrays(), protocol=5), 1)}

    def __setstate__(self, state):
        import pickle
        import zlib

        self.__init__(**pickle.loads(zlib.decompress(state["arrays"])))

    def depths(self):
        out = []
        for start, n in zip(np.cumsum(self.node_count) - self.node_count, self.node_count):
            left, right = self.children_left[start:start + n], self.children_right[start:start + n]
            depth = np.zeros(n, np.int64)
            for node in range(n):  # scikit-learn numbers children after their parent
                if left[node] >= 0:
                    depth[left[node]] = depth[right[node]] = depth[node] + 1
            out.append(int(depth.max()))
        return out

    def padded(self, xp):
        """(feature, threshold, node id of each bottom slot, depth) of the complete trees, on ``xp``'s device."""
        key = xp.__name__
        if key not in self._padded:
            self._padded[key] = tuple(xp.asarray(a) if isinstance(a, np.ndarray) else a for a in self._pad())
        return self._padded[key]

    def _pad(self):
        depth = max(1, max(self.depths()))
        n_inner, n_leaves = (1 << depth) - 1, 1 << depth
        feature = np.zeros((self.n_trees, n_inner), np.int64)
        threshold = np.full((self.n_trees, n_inner), np.inf, np.float32)
        leaves = np.zeros((self.n_trees, n_leaves), np.int64)  # the global node id each bottom slot stands for
        # Float32 features compare with a float64 threshold t exactly as with the largest float32 <= t.
        thr32 = self.threshold.astype(np.float32)
        above = thr32.astype(np.float64) > self.threshold
        thr32[above] = np.nextafter(thr32[above], np.float32(-np.inf))
        starts = np.cumsum(self.node_count) - self.node_count
        for t, start in enumerate(starts):
            left, right = self.children_left[start:], self.children_right[start:]
            current = np.zeros(1, np.int64)
            for level in range(depth):
                leaf = left[current] < 0
                slot = (1 << level) - 1 + np.arange(current.size)
                feature[t, slot] = np.where(leaf, 0, self.feature[start + current])
                threshold[t, slot] = np.where(leaf, np.inf, thr32[start + current])
                nxt = np.empty(2 * current.size, np.int64)
                nxt[0::2] = np.where(leaf, current, left[current])
                nxt[1::2] = np.where(leaf, current, right[current])
                current = nxt
            leaves[t] = start + current
        return feature.ravel(), threshold.ravel(), leaves.ravel(), depth

    def values(self, xp):
        """Class fractions of every node (float32, nodes x classes), as scikit-learn's predict_proba normalises them."""
        key = ("values", xp.__name__)
        if key not in self._padded:
            total = self.value.sum(axis=1, keepdims=True)
            self._padded[key] = xp.asarray(self.value / np.where(total > 0, total, np.float32(1)))
        return self._padded[key]

    def sklearn_trees(self):
        """scikit-learn ``Tree`` objects rebuilt from the arrays (its pickling state, no unpickling), or None."""
        if "sklearn" not in self._padded:
            self._padded["sklearn"] = _sklearn_trees(self)
        return self._padded["sklearn"]


def _sklearn_trees(forest):
    try:
        from sklearn.tree._tree import NODE_DTYPE, Tree
    except ImportError:  # pragma: no cover - scikit-learn moved its tree module
        return None
    trees = []
    n_classes = forest.value.shape[1]
    n_features = int(forest.feature.max()) + 1
    for start, count in zip(np.cumsum(forest.node_count) - forest.node_count, forest.node_count):
        part = slice(int(start), int(start + count))
        nodes = np.zeros(int(count), dtype=NODE_DTYPE)
        nodes["left_child"], nodes["right_child"] = forest.children_left[part], forest.children_right[part]
        leaf = forest.children_left[part] < 0
        nodes["feature"] = np.where(leaf, -2, forest.feature[part])
        nodes["threshold"] = np.where(leaf, -2.0, forest.threshold[part])
        tree = Tree(max(n_features, 1), np.array([n_classes], dtype=np.intp), 1)
        tree.__setstate__({"max_depth": 0, "node_count": int(count), "nodes": nodes,
                           "values": forest.value[part].astype(np.float64)[:, None, :]})
        trees.append(tree)
    return trees


def _leaves_by_arrays(features, forest):
    """Global node id of the leaf each (tree, pixel) reaches: array code, NumPy or CuPy. (n_trees, n) int64.

    Level by level over the complete trees: every pair advances together,
    ``node = 2 node + 1 + (x[feature[node]] > threshold[node])``; pairs that
    reached a leaf above the bottom are set aside as they finish.
    """
    xp = get_array_module(features)
    feature, threshold, slot_node, depth = forest.padded(xp)
    n, n_features = features.shape
    n_trees, n_inner = forest.n_trees, (1 << depth) - 1
    passing = xp.isinf(threshold)  # leaves above the bottom, padded with left-going copies
    flat = features.ravel()
    # Indices are in range by construction; NumPy's 'clip' mode skips its bounds check (measured 25 % faster).
    take = (lambda a, i: np.take(a, i, mode="clip")) if xp is np else xp.take
    # One entry per (tree, pixel) pair. Node indices are global (tree t's nodes start at t * n_inner), so the
    # child of g is 2 g + step + go with step = 1 - t * n_inner.
    node = xp.repeat(xp.arange(n_trees, dtype=xp.int64)[:, None] * n_inner, n, axis=1).ravel()
    step = 1 - node
    row = xp.tile(xp.arange(n, dtype=xp.int64) * n_features, n_trees)
    pair = xp.arange(n_trees * n, dtype=xp.int64)
    slot = xp.empty(n_trees * n, dtype=xp.int64)
    for level in range(depth + 1):
        if level >= 3 or level == depth:  # a shallow forest still ends its pairs at the bottom
            done = take(passing, node) if level < depth else xp.ones(node.shape, dtype=bool)
            if level == depth or int(done.sum()) * 8 > node.size:
                # A pair at a pass-through node of level k ends at its leftmost bottom slot:
                # (l + 1) * 2^(depth - k) - 2^depth, l being the node's index within its tree.
                t = (1 - step[done]) // n_inner
                local = node[done] - t * n_inner
                slot[pair[done]] = t * (1 << depth) + ((local + 1) << (depth - level)) - (1 << depth)
                keep = ~done
                node, step, row, pair = node[keep], step[keep], row[keep], pair[keep]
        if level == depth or node.size == 0:
            break
        right = take(flat, take(feature, node) + row) > take(threshold, node)
        node *= 2
        node += step
        node += right
    return take(slot_node, slot).reshape(n_trees, n)


def _leaves_by_sklearn(features, forest):
    """The same leaf ids from scikit-learn's compiled ``Tree.apply`` on the rebuilt trees (NumPy only)."""
    starts = np.cumsum(forest.node_count) - forest.node_count
    return np.stack([tree.apply(features) + start for tree, start in zip(forest.sklearn_trees(), starts)])


def forest_probabilities(features, forest, *, engine=None, out=None, threads=None):
    """Mean class probabilities of the trees for ``features`` (n, n_features) float32, on NumPy or CuPy.

    The leaf each tree sends a pixel to comes from ``engine``: ``"arrays"``
    (array code, :func:`_leaves_by_arrays`; the default on CuPy) or
    ``"sklearn"`` (scikit-learn's compiled traversal of the same trees,
    rebuilt from the arrays; the default on NumPy, where it is several
    times faster than array code). Both give the same leaves, and the leaf
    values are summed the same way, in tree order, so the result is the same
    bytes and depends on each pixel's own features only (not on its batch
    or tile). Equal to scikit-learn's ``predict_proba`` to float32 rounding.
    ``threads`` (NumPy): batches classified at once (the traversal and the
    sums release the GIL); default every usable core (a whole image); a
    chunk's task passes 1, since Dask already runs one task per core.
    Returns float32 (n, n_classes).
    """
    xp = get_array_module(features)
    if engine is None:
        engine = "sklearn" if xp is np and forest.sklearn_trees() is not None else "arrays"
    if engine not in ("sklearn", "arrays") or (engine == "sklearn" and xp is not np):
        raise DeclumpError(f"forest engine must be 'arrays' (NumPy or CuPy) or 'sklearn' (NumPy), got {engine!r}")
    leaves_of = _leaves_by_sklearn if engine == "sklearn" else _leaves_by_arrays
    values = forest.values(xp)
    n = features.shape[0]
    if out is None:
        out = xp.empty((n, values.shape[1]), dtype=xp.float32)
    batch = EVALUATOR_BATCH if engine == "arrays" else 16 * EVALUATOR_BATCH

    def classify(start):
        stop = min(n, start + batch)
        leaves = leaves_of(features[start:stop], forest)
        total = xp.take(values, leaves[0], axis=0)
        for t in range(1, forest.n_trees):
            total += xp.take(values, leaves[t], axis=0)
        out[start:stop] = total / xp.float32(forest.n_trees)

    each_on_threads(classify, range(0, n, batch), 1 if xp is not np else threads or usable_cores())
    return out


# --- the model ---------------------------------------------------------------------------------------------
class PixelClassifier:
    """A trained pixel classifier: its forest, feature set and classes. See :func:`train_classifier`."""

    def __init__(self, forest, header):
        self.forest = forest
        self.header = header
        self.classes = tuple(header["classes"])
        self.ndim = int(header["ndim"])
        self.scales = tuple(float(s) for s in header["scales"])
        self.spacing = tuple(float(s) for s in header["spacing"])
        self.n_features = int(header["n_features"])
        self.percentiles = tuple(float(p) for p in header.get("percentiles", DEFAULT_PERCENTILES))
        #: The file path or shipped name it was loaded from, as a user gave it (the command's summary records it).
        self.given_as = None

    def __repr__(self):
        return (f"PixelClassifier(classes={self.classes}, ndim={self.ndim}, scales={self.scales}, "
                f"trees={self.forest.n_trees})")

    @property
    def halo(self):
        """Halo (voxels per axis) that tiles and chunks read at the model's spacing; see ``feature_halo``."""
        return feature_halo(self.spacing, self.scales)

    def check_image(self, shape, what="the image"):
        if len(shape) != self.ndim:
            raise DeclumpError(f"this pixel classifier was trained on {self.ndim}D single-channel images, but "
                               f"{what} is {len(shape)}D (shape {tuple(shape)}); use a model trained on "
                               f"{len(shape)}D images")

    def predict_features(self, features, *, threads=None):
        """Class probabilities (n_classes, *spatial) float32 from precomputed features (*spatial, n_features);
        ``threads``: as :func:`forest_probabilities`'."""
        xp = get_array_module(features)
        if features.shape[-1] != self.n_features:
            raise DeclumpError(f"features have {features.shape[-1]} channels; this model uses {self.n_features}")
        flat = xp.ascontiguousarray(features.reshape(-1, self.n_features), dtype=xp.float32)
        proba = forest_probabilities(flat, self.forest, threads=threads)
        return xp.moveaxis(proba.reshape(features.shape[:-1] + (len(self.classes),)), -1, 0)

    def predict_proba(self, image, *, spacing=None, limits=None, tile_voxels=TILE_VOXELS, threads=None):
        """Class probabilities of every pixel: float32 (n_classes, *image.shape) on the image's device.

        Tile by tile: each tile's features are computed with the feature halo
        around it and dropped once its pixels are classified, so memory holds
        one tile's features. ``limits``: normalisation limits (default: this
        image's percentiles, as in training). ``threads`` (NumPy; default
        every usable core): tiles classified at once, each ``tile_voxels /
        threads`` voxels (in 3D a quarter of it at least), so memory holds
        about one tile's features (in 3D beyond 4 threads, ``threads / 4``
        tiles'; the Gaussians and the trees release the GIL). The result
        depends on neither.
        """
        from gpu_pipeline.pipeline import validate_image, validate_spacing

        image = image if hasattr(image, "ndim") else np.asarray(image)  # a nested list, as separate takes
        validate_image(image)
        self.check_image(image.shape)
        spacing = validate_spacing(spacing, image.ndim)
        xp = get_array_module(image)
        if limits is None:
            limits = intensity_limits(image, low=self.percentiles[0], high=self.percentiles[1])
        normalized = normalize_intensity(image, limits=limits)
        out = xp.empty((len(self.classes),) + tuple(image.shape), dtype=xp.float32)
        threads = 1 if xp is not np else max(1, threads or usable_cores())

        def classify(core):
            features = tile_features(normalized, core, spacing=spacing, scales=self.scales)
            out[(slice(None),) + core] = self.predict_features(features, threads=1)

        # Tiles of tile_voxels / threads; in 3D not below a quarter of it, where a smaller tile computes mostly
        # its feature halo (31 voxels at the default scales: a 51^3 tile, 2^21 / 16, reads 11 times its voxels,
        # a 128^3 one 3.3 times), so memory holds up to threads / 4 tiles' features beyond 4 threads.
        floor = tile_voxels // 4 if image.ndim == 3 else 1
        each_on_threads(classify, tiles(image.shape, max(1, tile_voxels // threads, floor)), threads)
        return out

    def save(self, path):
        """Write the model as ``.npz`` (tree arrays + JSON header), atomically. Returns the path."""
        from gpu_pipeline.io import atomic_path

        path = Path(path)
        if path.suffix.lower() != ".npz":
            raise DeclumpError(f"a model file is written as .npz, got {path}")
        header = np.frombuffer(json.dumps(self.header, sort_keys=True).encode(), dtype=np.uint8)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                np.savez_compressed(handle, header=header, **self.forest.arrays())
        return path

    @classmethod
    def load(cls, path):
        """Read a model written by :meth:`save`; anything else is a one-line :class:`DeclumpError`."""
        path = Path(path)
        if not path.is_file():
            raise DeclumpError(f"model file {path} {'is a folder' if path.is_dir() else 'does not exist'}; pass a .npz "
                               f"written by `declump train` or a shipped model name ({', '.join(SHIPPED_MODELS)})")
        keys = ("header", "node_count", "children_left", "children_right", "feature", "threshold", "value")
        try:
            with open(path, "rb") as handle:
                data = np.load(handle, allow_pickle=False)
                if not hasattr(data, "files"):  # a plain .npy array
                    raise DeclumpError(f"{path} is not a declump pixel-classifier model (a single array); pass "
                                       "a .npz written by `declump train`")
                with data:
                    missing = [k for k in keys if k not in data.files]
                    if missing:
                        raise DeclumpError(f"{path} is not a declump pixel-classifier model (no {missing[0]} "
                                           "array); pass a .npz written by `declump train`")
                    arrays = {k: data[k] for k in keys}
            header = json.loads(arrays.pop("header").tobytes().decode())
        except DeclumpError:
            raise
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError, UnicodeDecodeError) as exc:
            raise DeclumpError(f"{path} is not a readable declump model file (truncated or another format: "
                               f"{type(exc).__name__}); pass a .npz written by `declump train`") from exc
        return cls(_forest_from_arrays(arrays, header, path), header)


def _narrow(values):
    """``values`` (integers) as the narrowest of int8, int16, int32 and int64 that holds them all."""
    for dtype in (np.int8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if values.size == 0 or (int(values.min()) >= info.min and int(values.max()) <= info.max):
            return values.astype(dtype)
    return values.astype(np.int64)


def _forest_from_arrays(arrays, header, path):
    """Check a loaded model against this declump and for internal consistency; build its forest."""
    if not isinstance(header, dict) or header.get("format") != MODEL_FORMAT:
        raise DeclumpError(f"{path} is not a declump pixel-classifier model; pass a .npz written by `declump train`")
    if header.get("format_version") != MODEL_FORMAT_VERSION:
        raise DeclumpError(f"{path} is model format version {header.get('format_version')}; this declump reads "
                           f"version {MODEL_FORMAT_VERSION}; retrain it with `declump train`")
    if header.get("feature_set") != FEATURE_SET_VERSION:
        raise DeclumpError(f"{path} was trained on feature set {header.get('feature_set')!r}; this declump computes "
                           f"{FEATURE_SET_VERSION!r}; retrain it with `declump train`")
    if header.get("channels", 1) != 1:
        raise DeclumpError(f"{path} was trained on {header.get('channels')}-channel images; this declump classifies "
                           "single-channel images; retrain it on one channel")
    try:
        ndim, scales = int(header["ndim"]), [float(s) for s in header["scales"]]
        names = feature_names(ndim, scales)
        classes = list(header["classes"])
        spacing = [float(s) for s in header["spacing"]]
    except (KeyError, TypeError, ValueError, DeclumpError) as exc:
        raise DeclumpError(f"{path} has an incomplete or invalid model header ({type(exc).__name__}: {exc}); "
                           "retrain it with `declump train`") from exc
    if header.get("feature_names") != names or header.get("n_features") != len(names) or len(spacing) != ndim:
        raise DeclumpError(f"{path} lists other features than this declump computes for {ndim}D scales {scales}; "
                           "retrain it with `declump train`")
    if not (2 <= len(classes) <= 3 and classes[:2] == ["background", "particle"]
            and (len(classes) == 2 or classes[2] == "boundary")):
        raise DeclumpError(f"{path} has classes {classes}; accepted: background, particle and optionally boundary")
    count = arrays["node_count"].astype(np.int64)
    total = int(count.sum()) if count.ndim == 1 and count.size and (count > 0).all() else -1
    ok = total > 0 and all(arrays[k].shape == (total,) for k in ("children_left", "children_right", "feature",
                                                                      "threshold"))
    ok = ok and arrays["value"].shape == (total, len(classes))
    if ok:
        starts = np.repeat(np.cumsum(count) - count, count)
        local = np.arange(total) - starts
        size = np.repeat(count, count)
        for key in ("children_left", "children_right"):
            child = arrays[key].astype(np.int64)
            ok = ok and bool(((child == -1) | ((child > local) & (child < size))).all())
        inner = arrays["children_left"] >= 0
        ok = ok and bool(((arrays["feature"][inner] >= 0) & (arrays["feature"][inner] < len(names))).all())
        ok = ok and bool(np.isfinite(arrays["threshold"][inner]).all() and np.isfinite(arrays["value"]).all())
    if not ok:
        raise DeclumpError(f"{path} holds inconsistent tree arrays (corrupt model file); retrain it with "
                           "`declump train`")
    return _Forest(**arrays)


def spacing_note(model, spacing, unit=None):
    """A note where ``model`` was trained at another spacing than ``spacing`` (an image's): its features'
    scales are physical lengths, so they fall on other voxels (a model trained on a TIFF at 1 px applied to the
    same pixels of an OME-Zarr at 3 nm: F1@0.5 0.590 against 0.824). None where they agree (1 % apart at most)."""
    trained = tuple(float(s) for s in model.spacing)
    given = tuple(float(s) for s in spacing)
    if len(trained) != len(given) or all(abs(a - b) <= 0.01 * max(a, b) for a, b in zip(trained, given)):
        return None
    listed = ",".join(f"{s:g}" for s in trained)
    return (f"declump: note: the model was trained at spacing {listed} and this image's is "
            f"{','.join(f'{s:g}' for s in given)}{' ' + unit if unit else ''}; its features' scales are lengths in "
            f"those units, so they fall on other voxels here: if the pixels are alike, add --spacing {listed}")


def load_classifier(path_or_name):
    """A :class:`PixelClassifier` (returned as is), a model file path, or a shipped model's name."""
    if isinstance(path_or_name, PixelClassifier):
        return path_or_name
    name = str(path_or_name)
    if name in SHIPPED_MODELS:
        from importlib import resources

        resource = resources.files("gpu_pipeline.models").joinpath(SHIPPED_MODELS[name])
        if not resource.is_file():
            raise DeclumpError(f"the shipped model {name!r} is not part of this installation of declump; pass a "
                               "model file written by `declump train`")
        with resources.as_file(resource) as path:
            return PixelClassifier.load(path)
    return PixelClassifier.load(name)


def tiles(shape, tile_voxels=TILE_VOXELS):
    """Core windows (tuples of slices) covering ``shape``: the largest axis halved until a tile fits."""
    tile = list(shape)
    while math.prod(tile) > tile_voxels and max(tile) > 1:
        axis = int(np.argmax(tile))
        tile[axis] = (tile[axis] + 1) // 2
    grids = [range(0, n, t) for n, t in zip(shape, tile)]
    for starts in np.ndindex(*[len(g) for g in grids]):
        yield tuple(slice(g[i], min(g[i] + t, n)) for g, i, t, n in zip(grids, starts, tile, shape))


def foreground_probability(probabilities, classes=None):
    """Probability that a pixel belongs to a particle (interior or boundary): ``1 - P(background)``.

    The foreground is where it exceeds 0.5, like a network's probability map given as ``--mask``.
    """
    xp = get_array_module(probabilities)
    return xp.clip(1 - probabilities[0], 0, 1)  # float32 sums of the trees may exceed 1 by an ulp


def class_probability(probabilities, classes, name):
    """The probability map of class ``name``, or None when the model has no such class."""
    return probabilities[list(classes).index(name)] if name in classes else None


# --- training ----------------------------------------------------------------------------------------------
def _check_count(name, value, *, least):
    """``value`` is a whole number of at least ``least``, else a one-line :class:`DeclumpError`."""
    if not whole_number_at_least(value, least):
        raise DeclumpError(f"{name} must be a whole number of at least {least}, got {value!r}")


def classes_from_instances(instance_labels, *, boundary_width=1):
    """Training classes from full instance ground truth: uint8, 1 background, 2 particle, 3 boundary.

    Boundary: particle pixels within ``boundary_width`` pixels (a box) of a
    pixel of another particle, i.e. both sides of the line between touching
    particles; a particle's rim against the background stays ``particle``.
    """
    from scipy import ndimage as ndi

    labels = np.asarray(instance_labels)
    if labels.dtype.kind not in "ui":
        raise DeclumpError(f"instance labels have dtype {labels.dtype}; accepted: an integer label image "
                           "(0 background, one id per particle)")
    _check_count("boundary_width", boundary_width, least=0)
    size = 2 * int(boundary_width) + 1
    fg = labels > 0
    highest = ndi.maximum_filter(labels, size=size, mode="nearest")
    # Background counts as the highest id present (never below a particle's own): the dtype's maximum, as it
    # was, came back from SciPy's minimum filter of int64 as the minimum (-2**63), and background next to a
    # particle made it a boundary (117 extra boundary pixels in a 64x64 image of int64 ids).
    top = labels.max()
    lowest = ndi.minimum_filter(np.where(fg, labels, top), size=size, mode="nearest")
    touching = fg & ((highest > labels) | (lowest < labels))
    out = np.where(fg, 2, 1).astype(np.uint8)
    out[touching] = 3
    return out


def check_training_labels(images, labels, *, option="labels", names=None):
    """Refuse labels that cannot train a model (one line naming ``option``); returns the classes present."""
    if len(images) != len(labels):
        raise DeclumpError(f"{len(images)} images but {len(labels)} {option}; give one labels image per image")
    if not images:
        raise DeclumpError("no training images given")
    present = set()
    for i, (image, label) in enumerate(zip(images, labels)):
        name = names[i] if names else f"#{i + 1}"
        if tuple(label.shape) != tuple(image.shape):
            raise DeclumpError(f"{option} {name} has shape {tuple(label.shape)} but its image has shape "
                               f"{tuple(image.shape)}; each {option} image must match its image")
        if np.dtype(label.dtype).kind not in "uib":
            raise DeclumpError(f"{option} {name} has dtype {label.dtype}; accepted: integer scribbles (0 unlabelled, "
                               "1 background, 2 particle, 3 boundary)")
        values = np.unique(np.asarray(label))
        bad = [int(v) for v in values if v not in (0, 1, 2, 3)]
        if bad:
            raise DeclumpError(f"{option} {name} holds values {bad[:5]}; accepted scribble values: 0 unlabelled, "
                               "1 background, 2 particle, 3 boundary (instance ground truth: --from-instances)")
        present |= {int(v) for v in values if v}
    for value in (1, 2):
        if value not in present:
            raise DeclumpError(f"the {option} have no pixel of class {CLASS_NAMES[value]} (value {value}); "
                               "label at least a few pixels of background (1) and particle (2)")
    return sorted(present)


def _sample(labels, classes, samples_per_class, rng):
    """Flat pixel indices per image, balanced: each class's quota split evenly over the images that have it."""
    picks = [[] for _ in labels]
    for value in classes:
        holders = [i for i, lab in enumerate(labels) if (np.asarray(lab) == value).any()]
        quota = int(math.ceil(samples_per_class / len(holders)))
        for i in holders:
            where = np.flatnonzero(np.asarray(labels[i]).ravel() == value)
            if where.size > quota:
                where = np.sort(rng.choice(where, quota, replace=False))
            picks[i].append(where)
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in picks]


def _features_at(image, flat_index, spacing, scales, limits=None):
    """Features of the given pixels only: the tiles that hold them, each with its halo."""
    xp = get_array_module(image)
    n_features = len(feature_names(image.ndim, scales))
    out = np.empty((flat_index.size, n_features), np.float32)
    if flat_index.size == 0:
        return out
    normalized = normalize_intensity(image, limits=limits)
    coords = np.stack(np.unravel_index(flat_index, image.shape), axis=1)
    for core in tiles(image.shape):
        inside = np.ones(len(coords), bool)
        for a, c in enumerate(core):
            inside &= (coords[:, a] >= c.start) & (coords[:, a] < c.stop)
        if not inside.any():
            continue
        features = tile_features(normalized, core, spacing=spacing, scales=scales)
        local = coords[inside] - np.array([c.start for c in core])
        picked = features[tuple(xp.asarray(local.T))]
        out[inside] = picked.get() if is_cupy_array(picked) else picked
    return out


def train_classifier(images, labels, *, spacing=None, n_estimators=DEFAULT_TREES, max_depth=DEFAULT_DEPTH,
                     samples_per_class=DEFAULT_SAMPLES_PER_CLASS, seed=0, features=None, scales=DEFAULT_SCALES,
                     n_jobs=1, names=None, option="labels"):
    """Train a pixel classifier from scribbles (0 unlabelled, 1 background, 2 particle, 3 boundary).

    Parameters
    ----------
    images : ndarray or list of ndarray
        2D or 3D intensity images (all of one dimensionality).
    labels : ndarray or list of ndarray
        One scribble image per image, same shape; for full instance ground
        truth, pass ``classes_from_instances(truth)``.
    spacing : sequence of float, or list of them (one per image), optional
        Voxel size; feature scales are physical. Default 1.
    n_estimators, max_depth : int
        Trees and their depth (prediction cost grows with both).
    samples_per_class : int
        Labelled pixels drawn per class, split evenly over the images that
        have the class (all of them when fewer).
    seed : int
        Sampling and forest seed.
    features : list of ndarray or None, optional
        Precomputed :func:`~gpu_pipeline.stages.features.pixel_features` per
        image (entries may be None): only their labelled pixels are read.
    scales : sequence of float
        Feature scales (physical).

    Returns
    -------
    PixelClassifier

    Raises
    ------
    DeclumpError
        Labels of another shape than their image, values other than 0-3, no
        pixel of background or particle, mixed 2D/3D images.
    """
    from sklearn import __version__ as sklearn_version
    from sklearn.ensemble import RandomForestClassifier

    from gpu_pipeline import __version__
    from gpu_pipeline.pipeline import validate_image, validate_spacing

    for name, value in (("trees (n_estimators)", n_estimators), ("max_depth", max_depth),
                        ("samples_per_class", samples_per_class)):
        _check_count(name, value, least=1)
    images = [images] if not isinstance(images, (list, tuple)) else list(images)
    labels = [labels] if not isinstance(labels, (list, tuple)) else list(labels)
    images = [image if hasattr(image, "ndim") else np.asarray(image) for image in images]  # nested lists too
    for image in images:
        validate_image(image)
    ndims = {image.ndim for image in images}
    if len(ndims) != 1:
        raise DeclumpError(f"training images mix {sorted(ndims)}D; a model is for 2D or for 3D images")
    ndim = ndims.pop()
    labels = [np.asarray(lab.get() if is_cupy_array(lab) else lab) for lab in labels]
    classes = check_training_labels(images, labels, option=option, names=names)
    if spacing is None or np.isscalar(spacing) or np.isscalar(spacing[0]):
        spacings = [validate_spacing(spacing, ndim)] * len(images)
    else:
        spacings = [validate_spacing(s, ndim) for s in spacing]
    scales = tuple(float(s) for s in scales)
    n_features = len(feature_names(ndim, scales))
    rng = np.random.default_rng(seed)
    picks = _sample(labels, classes, int(samples_per_class), rng)
    xs, ys = [], []
    for i, (image, label, pick) in enumerate(zip(images, labels, picks)):
        given = features[i] if features is not None else None
        if given is not None:
            if tuple(given.shape) != tuple(image.shape) + (n_features,):
                raise DeclumpError(f"precomputed features for image {i + 1} have shape {tuple(given.shape)}; "
                                   f"expected {tuple(image.shape) + (n_features,)}")
            flat = given.reshape(-1, n_features)[pick]
            xs.append(np.asarray(flat.get() if is_cupy_array(flat) else flat, dtype=np.float32))
        else:
            xs.append(_features_at(image, pick, spacings[i], scales))
        ys.append(label.ravel()[pick].astype(np.int64))
    x, y = np.concatenate(xs), np.concatenate(ys)
    forest = RandomForestClassifier(n_estimators=int(n_estimators), max_depth=max_depth, random_state=seed,
                                    n_jobs=n_jobs).fit(x, y)
    header = {
        "format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, "feature_set": FEATURE_SET_VERSION,
        "ndim": ndim, "channels": 1, "scales": list(scales), "spacing": list(spacings[0]),
        "feature_names": feature_names(ndim, scales), "n_features": n_features,
        "percentiles": list(DEFAULT_PERCENTILES), "classes": [CLASS_NAMES[int(c)] for c in forest.classes_],
        "n_estimators": int(n_estimators), "max_depth": max_depth,
        "training": {"n_images": len(images), "samples_per_class": {CLASS_NAMES[c]: int((y == c).sum())
                                                                    for c in classes}, "seed": seed},
        "versions": {"declump": __version__, "scikit-learn": sklearn_version, "numpy": np.__version__},
    }
    return PixelClassifier(forest_from_sklearn(forest), header)


def forest_from_sklearn(model):
    """The tree arrays of a fitted scikit-learn ``RandomForestClassifier`` (or one decision tree)."""
    trees = [e.tree_ for e in getattr(model, "estimators_", [model])]
    if hasattr(model, "tree_"):
        trees = [model.tree_]
    return _Forest(node_count=[t.node_count for t in trees],
                   children_left=np.concatenate([t.children_left for t in trees]),
                   children_right=np.concatenate([t.children_right for t in trees]),
                   feature=np.concatenate([np.where(t.children_left >= 0, t.feature, 0) for t in trees]),
                   threshold=np.concatenate([np.where(t.children_left >= 0, t.threshold, 0.0) for t in trees]),
                   value=np.concatenate([t.value[:, 0, :] for t in trees]))


__all__ = ["PixelClassifier", "train_classifier", "classes_from_instances", "load_classifier",
           "forest_probabilities", "forest_from_sklearn", "foreground_probability", "class_probability",
           "check_training_labels", "tiles", "CLASS_NAMES"]
