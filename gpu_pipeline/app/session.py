"""What one browser session of the web app holds and does, without any web code.

A :class:`Session` keeps the image, the painted strokes, the cached features,
the trained classifier and the last separation; the :class:`SessionStore`
holds one per browser tab (keyed by a random id made when the page loads), so
two tabs never see each other's state. Every computation calls the public
API that the command line calls (``read_image``, ``train_classifier``,
``separate``, ``particle_table``, ``overlay_rgb``, ``size_histogram_rgb``).
"""
from __future__ import annotations

import argparse
import base64
import io
import shlex
import math
import re
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gpu_pipeline._backend import DeclumpError, to_host
from gpu_pipeline.classifier import PixelClassifier
from gpu_pipeline.io import tiff_spacing

#: Scribble values, as in ``declump train --labels``: 0 unlabelled, 1 background, 2 particle, 3 boundary.
CLASS_NAMES = {1: "background", 2: "particle", 3: "boundary"}
CLASS_COLOURS = {1: "#00b4ff", 2: "#ff2d55", 3: "#ffd60a"}
#: Largest side of the picture sent to the browser; bigger images are shown downsampled, processed in full.
MAX_DISPLAY_SIDE = 1024
#: Default limit on the voxels of an image the app accepts (``declump app --max-voxels``).
DEFAULT_MAX_VOXELS = 64 * 1024 * 1024
#: Features are cached per image while they take at most this many bytes (beyond: recomputed per training).
FEATURE_CACHE_BYTES = 1536 * 1024 * 1024
#: Features are computed in tiles of this many voxels, one progress step each (a 1024^2 image: 4 steps).
FEATURE_TILE_VOXELS = 1 << 18
UPLOAD_SUFFIXES = (".tif", ".tiff", ".png", ".npy")
#: The forest trained in the app: smaller than `declump train`'s default (32 trees, depth 12, 20000 pixels per
#: class) so that retraining and predicting a 1024^2 image after a new stroke takes about a second of CPU.
TRAINING = dict(n_estimators=16, max_depth=10, samples_per_class=5000, seed=0)
#: The `declump run` options that the app's Separate panel sets; every other option keeps the CLI's default.
SEPARATION_OPTIONS = ("--method", "--min-distance", "--min-size", "--max-hole-size", "--sigma", "--polarity")


@dataclass
class Stroke:
    """One painted stroke: its class, plane (3D; 0 in 2D), width in pixels, and (row, column) vertices."""

    value: int
    plane: int
    width: float
    points: np.ndarray


@dataclass
class Result:
    """A finished separation: labels, table and what produced them."""

    labels: np.ndarray
    table: dict
    argv: list
    foreground: str
    seconds: float
    classifier: object = None  # the classifier that made the foreground, and its source ("painted", a name)
    classifier_source: str | None = None


@dataclass
class Session:
    """The state of one browser tab."""

    id: str
    lock: threading.RLock = field(default_factory=threading.RLock)
    image: np.ndarray | None = None
    name: str | None = None
    source: str | None = None
    spacing: tuple | None = None
    unit: str = "px"
    strokes: list = field(default_factory=list)
    features: object = None
    features_spacing: tuple | None = None
    classifier: object = None
    classifier_source: str | None = None
    probabilities: np.ndarray | None = None
    # (classifier, probabilities, scribbles): trained from the strokes (the scribble image then), kept beside a
    # shipped model
    painted: tuple | None = None
    result: Result | None = None
    message: str = ""
    job: str | None = None
    job_started: float = 0.0
    job_error: str | None = None
    jobs_done: int = 0  # jobs ended so far: the page shows an end whose number it has not acknowledged yet
    last_error: str = ""  # the last ended job's error ("" if none)
    timings: dict = field(default_factory=dict)
    version: int = 0

    # -- loading ---------------------------------------------------------------------------------------------
    def refuse_while_busy(self, what=None):
        """A one-line error if a job runs (one job per session; its results would land on what ``what``
        replaces)."""
        with self.lock:
            if self.job is not None:
                before = f" before {what}" if what else ""
                raise DeclumpError(f"still busy: {self.job}; wait until it finishes{before}")

    def set_image(self, image, *, name, source=None, spacing=None, unit=None, max_voxels=DEFAULT_MAX_VOXELS):
        image = check_image(image, name=name, max_voxels=max_voxels)
        with self.lock:
            self.refuse_while_busy("loading another image")
            self.image, self.name, self.source = image, name, source
            self.spacing = tuple(float(s) for s in spacing) if spacing is not None else (1.0,) * image.ndim
            self.unit = unit or ("px" if spacing is None else "units")
            self.strokes, self.result = [], None
            self.features = self.features_spacing = self.classifier = self.classifier_source = None
            self.probabilities = self.painted = None
            self.timings = {}
            self.message, self.version = "", self.version + 1

    def set_spacing(self, spacing, unit=None):
        from gpu_pipeline.pipeline import validate_spacing

        if self.image is None:
            return
        spacing = validate_spacing(spacing, self.image.ndim)
        with self.lock:
            if spacing != self.spacing:
                self.refuse_while_busy("changing the spacing")
                self.spacing = spacing
                self.result = None
                self.probabilities = self.classifier = self.classifier_source = self.painted = None
            if unit:
                self.unit = unit

    # -- painting --------------------------------------------------------------------------------------------
    def set_plane_strokes(self, plane, strokes):
        """Replace the strokes of one plane (the browser sends the whole list of a plane's shapes)."""
        with self.lock:
            self.strokes = [s for s in self.strokes if s.plane != plane] + list(strokes)

    def undo(self, plane):
        with self.lock:
            for i in range(len(self.strokes) - 1, -1, -1):
                if self.strokes[i].plane == plane:
                    del self.strokes[i]
                    return

    def clear_strokes(self):
        with self.lock:
            self.strokes = []

    def scribbles(self):
        """The strokes as the scribble label image of ``declump train`` (uint8, 0 unlabelled, 1..3 classes)."""
        return rasterize_strokes(self.strokes, self.image.shape)

    # -- training and prediction -----------------------------------------------------------------------------
    def cached_features(self, progress=lambda text: None):
        """Pixel features of the image, computed once per image and spacing (when they fit the cache)."""
        from gpu_pipeline.classifier import tiles
        from gpu_pipeline.stages.features import DEFAULT_SCALES, feature_names, normalize_intensity, tile_features

        if self.features is not None and self.features_spacing == self.spacing:
            return self.features
        # Tile by tile, as predict_proba does (tile_features equals pixel_features of the whole image), so that a
        # big image or volume reports its progress.
        normalized = normalize_intensity(self.image)
        cores = list(tiles(self.image.shape, FEATURE_TILE_VOXELS))
        features = np.empty(self.image.shape + (len(feature_names(self.image.ndim, DEFAULT_SCALES)),), np.float32)
        kept = ("cached for the next training" if features.nbytes <= FEATURE_CACHE_BYTES else
                f"{features.nbytes / 2 ** 30:.1f} GiB: too large to cache, computed again at each training")
        for i, core in enumerate(cores):
            progress(f"computing pixel features, tile {i + 1} of {len(cores)} ({kept})")
            features[core] = tile_features(normalized, core, spacing=self.spacing, scales=DEFAULT_SCALES)
        if features.nbytes <= FEATURE_CACHE_BYTES:
            self.features, self.features_spacing = features, self.spacing
        return features

    def train(self, progress=lambda text: None):
        """Train the pixel classifier from the strokes and predict the probability map."""
        if self.image is None:
            raise DeclumpError("load an image first (upload a TIFF, PNG or NPY file, or open the sample)")
        scribbles = self.scribbles()
        painted = sorted(int(v) for v in np.unique(scribbles) if v)
        if len(painted) < 2:
            have = ", ".join(CLASS_NAMES[v] for v in painted) or "none"
            raise DeclumpError(f"paint strokes of at least two classes (background and particle) before training; "
                               f"painted so far: {have}")
        from gpu_pipeline.classifier import train_classifier

        began = time.perf_counter()
        features = self.cached_features(progress)
        started = time.perf_counter()
        progress("training the random forest on the painted pixels")
        classifier = train_classifier([self.image], [scribbles], spacing=self.spacing, features=[features],
                                      **TRAINING)
        trained = time.perf_counter()
        progress("predicting class probabilities")
        probabilities = to_host(classifier.predict_features(features))
        classifier = MemoizedClassifier.wrap(classifier, self.image, self.spacing, probabilities)
        with self.lock:
            self.classifier, self.classifier_source, self.probabilities = classifier, "painted", probabilities
            self.painted = (classifier, probabilities, scribbles)
            # (The features' time too: computed for a new image, or where they are too large to cache, they took
            # 16 of the 19 s a 4096^2 training took, and the page said "trained in 0.19 s, predicted in 2.12 s".)
            self.timings.update(features_s=started - began, train_s=trained - started,
                                predict_s=time.perf_counter() - trained)
        return classifier

    def use_painted_classifier(self):
        """Make the classifier trained from the strokes the one that separates (after a shipped model was used)."""
        with self.lock:
            if self.painted is None:
                raise DeclumpError("train the classifier on painted strokes first (3. Train), or choose the shipped "
                                   "EM model or the automatic foreground")
            (self.classifier, self.probabilities, _), self.classifier_source = self.painted, "painted"

    def use_shipped_model(self, name="em-particles", progress=lambda text: None):
        from gpu_pipeline.classifier import load_classifier

        classifier = load_classifier(name)
        progress(f"predicting with the shipped model {name}")
        started = time.perf_counter()
        probabilities = to_host(classifier.predict_proba(self.image, spacing=self.spacing))
        classifier = MemoizedClassifier.wrap(classifier, self.image, self.spacing, probabilities)
        with self.lock:
            self.classifier, self.classifier_source, self.probabilities = classifier, name, probabilities
            self.timings["shipped_predict_s"] = time.perf_counter() - started

    # -- separation ------------------------------------------------------------------------------------------
    def separate(self, options=None, *, foreground="automatic", device="cpu", progress=lambda text: None):
        """Separate the image with ``options`` ({'--min-distance': '3', ...}, parsed as `declump run` parses them).

        ``foreground``: "automatic" (the threshold) or "classifier" (the trained or shipped pixel classifier).
        """
        from gpu_pipeline import particle_table, separate

        if self.image is None:
            raise DeclumpError("load an image first (upload a TIFF, PNG or NPY file, or open the sample)")
        kwargs, argv = separation_options(options)
        with self.lock:  # a failed separation leaves no result: the last one, shown beside the error with
            self.result = None  # other settings, was what the downloads gave (2026-12-05 audit)
        if foreground == "classifier":
            if self.classifier is None:
                raise DeclumpError("train the classifier (or choose the shipped EM model) first, or separate with "
                                   "the automatic foreground")
            kwargs["classifier"] = self.classifier
        progress("separating particles")
        started = time.perf_counter()
        labels = to_host(separate(self.image, spacing=self.spacing, device=device, **kwargs))
        table = particle_table(labels, self.image, self.spacing)
        with self.lock:
            used = foreground == "classifier"
            self.result = Result(labels, table, argv, foreground, time.perf_counter() - started,
                                 classifier=self.classifier if used else None,
                                 classifier_source=self.classifier_source if used else None)
        return self.result

    def drop_result(self, *, own_job=False):
        """Forget the separation shown (a separation refused for its settings: that result had others), unless a
        job runs (its own result is on the way); ``own_job``: called by that job (a separation refused before it
        starts, for its classifier)."""
        with self.lock:
            if self.job is None or own_job:
                self.result = None

    # -- background jobs -------------------------------------------------------------------------------------
    def start_job(self, title, work):
        """Run ``work(progress)`` in a thread so the page stays responsive; one job per session at a time."""
        with self.lock:
            self.refuse_while_busy()
            self.job, self.job_started, self.job_error = title, time.perf_counter(), None

        def progress(text):
            with self.lock:
                self.job = text

        def runner():
            try:
                work(progress)
            except DeclumpError as exc:
                self.job_error = str(exc)
            except MemoryError:
                self.job_error = "out of memory; use a smaller image (or crop it) or a machine with more memory"
            except Exception as exc:  # the server must keep running; say what happened in the page
                self.job_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            finally:
                with self.lock:
                    self.job, self.last_error = None, self.job_error or ""
                    self.jobs_done += 1
                    self.version += 1

        threading.Thread(target=runner, daemon=True, name=f"declump-app-{self.id[:8]}").start()

    def finished_since(self, shown):
        """``(jobs_done, error or "")`` where a job ended after the ``shown``-th (the number the page last
        acknowledged) and none runs, else None.

        Not taken once: a page's reply that shows the end can be dropped (Dash keeps only the latest
        reply of a callback, and a poll overtakes a reply slower than its interval: a 4096^2 image's), and
        the end was then never shown (the status stayed at the job's last progress line). The page
        acknowledges the number with the reply that shows it, so every reply until one lands shows it.
        """
        with self.lock:
            if self.job is not None or self.jobs_done <= int(shown or 0):
                return None
            return self.jobs_done, self.last_error

    def job_status(self):
        """(running, text): the current job's progress line with its elapsed seconds."""
        with self.lock:
            if self.job is None:
                return False, ""
            return True, f"{self.job} ... {time.perf_counter() - self.job_started:.0f} s"


class _OptionParser(argparse.ArgumentParser):
    def error(self, message):
        raise DeclumpError(message)


def _separation_parser():
    from gpu_pipeline.cli import add_separation_options

    parser = _OptionParser(prog="declump run", add_help=False)
    add_separation_options(parser)
    return parser


def separation_defaults():
    """The `declump run` defaults of :data:`SEPARATION_OPTIONS`, by option name (None: derived at run time)."""
    args = _separation_parser().parse_args([])
    return {option: getattr(args, option[2:].replace("-", "_")) for option in SEPARATION_OPTIONS}


def separation_options(values=None):
    """``separate`` keywords and the argv of `declump run` options, parsed by the CLI's own parser.

    ``values`` maps option names of :data:`SEPARATION_OPTIONS` to text (None or empty: the default), so the
    app's parameters, defaults and messages are exactly the command line's.
    """
    from gpu_pipeline.cli import separation_kwargs

    argv = []
    for option, value in (values or {}).items():
        if option not in SEPARATION_OPTIONS:
            raise DeclumpError(f"unknown separation option {option}; the app sets {', '.join(SEPARATION_OPTIONS)}")
        text = "" if value is None else (f"{value:g}" if isinstance(value, float) else str(value)).strip()
        if text:
            argv += [option, text]
    kwargs = separation_kwargs(_separation_parser().parse_args(argv))
    kwargs.pop("spacing", None)
    return kwargs, argv


class SessionStore:
    """One :class:`Session` per browser tab.

    At most ``max_sessions`` sessions hold an image (the least recently used idle one is dropped beyond that)
    and at most ``max_pages`` exist at all (pages that never loaded an image go first), so opening pages does
    not push out a tab's work. A dropped session's id is remembered: its page is told that it expired.
    """

    def __init__(self, max_sessions=16, max_pages=1024):
        self.max_sessions, self.max_pages = max_sessions, max_pages
        self._sessions = OrderedDict()
        self._dropped = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def new_id():
        return uuid.uuid4().hex

    def get(self, session_id):
        if not isinstance(session_id, str) or not re.fullmatch(r"[0-9a-f]{32}", session_id):
            raise DeclumpError("this page has no valid session; reload it")
        with self._lock:
            if session_id in self._dropped:
                raise DeclumpError(f"this page's session expired: the app keeps the {self.max_sessions} most "
                                   "recently used images; reload the page and load the image again")
            session = self._sessions.get(session_id)
            if session is None:
                session = self._sessions[session_id] = Session(session_id)
            self._sessions.move_to_end(session_id)
            self._evict(keep=session_id)
            return session

    def _evict(self, keep):
        """Drop pages beyond ``max_pages`` (empty ones first) and images beyond ``max_sessions`` (idle ones)."""
        while True:
            items = [(k, s) for k, s in self._sessions.items() if k != keep]
            loaded = [k for k, s in items if s.image is not None and s.job is None]
            held = sum(s.image is not None for s in self._sessions.values())
            if len(self._sessions) > self.max_pages:
                victim = next((k for k, s in items if s.image is None), loaded[0] if loaded else None)
            elif held > self.max_sessions and loaded:
                victim = loaded[0]
            else:
                return
            if victim is None:
                return
            del self._sessions[victim]
            self._dropped[victim] = True
            while len(self._dropped) > 16 * self.max_pages:
                self._dropped.popitem(last=False)


def check_image(image, *, name="image", max_voxels=DEFAULT_MAX_VOXELS):
    """The image as a NumPy array the pipeline accepts, or a one-line DeclumpError saying what is wrong."""
    from gpu_pipeline.pipeline import refuse_channels_last, validate_image

    image = np.asarray(image)
    if image.dtype == bool:
        raise DeclumpError(f"{name} is a bool mask; the app separates intensity images (a mask is separated with "
                           "declump run MASK OUT, or declump run IMAGE OUT --mask MASK)")
    if image.ndim not in (2, 3):
        raise DeclumpError(f"{name} has {image.ndim} dimensions {tuple(image.shape)}; the app accepts 2D images or "
                           "3D volumes (pick a channel or time point first)")
    # A colour image saved as an array (rows, columns, 3 or 4), refused as `declump run` refuses it: the app showed
    # it as a volume of 3 planes, and only Separate failed (2026-12 audit).
    refuse_channels_last(image.shape, name)
    validate_image(image, name)
    if image.size > max_voxels:
        raise DeclumpError(f"{name} has {image.size:,} voxels {tuple(image.shape)}, more than this app's limit of "
                           f"{max_voxels:,} (declump app --max-voxels); crop it, or use declump run")
    if image.min() == image.max():
        raise DeclumpError(f"{name} is constant (every value {image.flat[0]}); there is nothing to separate")
    return image


def read_image_file(path, *, name=None, max_voxels=DEFAULT_MAX_VOXELS):
    """Read an image file as `declump run` reads its input, with the spacing and unit the file gives.

    The spacing is the file's (OME-Zarr ``coordinateTransformations``; else a
    TIFF's OME-XML, ImageJ or resolution tags) and the unit the one it names
    for it: an OME-Zarr's axes' ``unit``, as `declump run` records it
    (:func:`gpu_pipeline.io.spatial_unit`), or a TIFF's. ``name`` (default
    ``path``) is what messages call the image. What the app loads from a
    path (``declump app FILE``) and from an upload.

    Returns ``(image, spacing or None, unit or None)``.
    """
    from gpu_pipeline.io import read_image, spatial_unit

    path = Path(path)
    image, spacing = read_image(path)
    unit = None
    if spacing is None and path.suffix.lower() in (".tif", ".tiff"):
        spacing, unit = tiff_spacing(path)
    elif spacing is not None:
        unit = spatial_unit(path)
    image = check_image(image, name=str(path) if name is None else name, max_voxels=max_voxels)
    if spacing is not None and len(spacing) != image.ndim:
        spacing, unit = None, None
    return image, spacing, unit


def read_upload(filename, contents, *, max_voxels=DEFAULT_MAX_VOXELS):
    """Decode a browser upload (``data:...;base64,...``) and read it with the CLI's reader.

    Returns ``(image, spacing or None, unit or None)`` (:func:`read_image_file`).
    """
    filename = Path(filename or "upload").name
    suffix = Path(filename).suffix.lower()
    if suffix not in UPLOAD_SUFFIXES:
        raise DeclumpError(f"{filename}: unsupported file type {suffix or '(no suffix)'}; accepted: "
                           f"{', '.join(UPLOAD_SUFFIXES)} (2D image or 3D volume)")
    try:
        data = base64.b64decode(contents.split(",", 1)[1], validate=False)
    except Exception:
        raise DeclumpError(f"{filename}: the upload could not be decoded; try again")
    with tempfile.TemporaryDirectory(prefix="declump-upload-") as folder:
        path = Path(folder) / filename
        path.write_bytes(data)
        try:
            return read_image_file(path, name=filename, max_voxels=max_voxels)
        except DeclumpError as exc:  # the file's name, not the server's temporary path
            message = str(exc).replace(str(path), filename)
            for option, what in (("--channel", "channel"), ("--timepoint", "time point")):  # no such field here
                message = message.replace(f"pick one with {option}", f"the app reads one {what}: save it as its own "
                                          f"file (Fiji: Image > Stacks or Color > Split Channels), or use "
                                          f"declump run {option} N")
            raise DeclumpError(message) from None


# -- strokes ---------------------------------------------------------------------------------------------------
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


def parse_path(path):
    """(row, column) vertices of a Plotly SVG path ``M x,y L x,y ...`` (data coordinates: x column, y row)."""
    numbers = [float(v) for v in re.findall(_NUMBER, path or "")]
    if len(numbers) < 2:
        return np.zeros((0, 2))
    xy = np.asarray(numbers[: len(numbers) // 2 * 2]).reshape(-1, 2)
    return xy[:, ::-1].copy()


def stroke_from_shape(shape, plane, pixels_per_screen_pixel=1.0):
    """A :class:`Stroke` from a Plotly drawn shape (its colour gives the class), or None if it is not one."""
    colour = str((shape.get("line") or {}).get("color", "")).lower()
    value = next((v for v, c in CLASS_COLOURS.items() if c == colour), None)
    if value is None or shape.get("type") != "path":
        return None
    points = parse_path(shape.get("path"))
    if len(points) == 0:
        return None
    width = float((shape.get("line") or {}).get("width", 4)) * pixels_per_screen_pixel
    return Stroke(value, int(plane), max(width, 1.0), points)


def stroke_to_shape(stroke, screen_pixels_per_pixel=1.0):
    """The Plotly shape that draws ``stroke`` (the inverse of :func:`stroke_from_shape`)."""
    path = "M" + "L".join(f"{x:.2f},{y:.2f}" for y, x in stroke.points)
    return {"type": "path", "path": path, "editable": True, "layer": "above", "opacity": 0.8,
            "line": {"color": CLASS_COLOURS[stroke.value], "width": stroke.width * screen_pixels_per_pixel}}


def rasterize_strokes(strokes, shape):
    """The scribble label image of ``strokes``: pixels within half a stroke's width of its path get its class.

    Later strokes paint over earlier ones. 3D: each stroke lies in its plane.
    """
    from scipy import ndimage as ndi

    scribbles = np.zeros(shape, dtype=np.uint8)
    plane_shape = shape[-2:]
    for stroke in strokes:
        radius = stroke.width / 2
        points = np.asarray(stroke.points, dtype=np.float64)
        if len(points) == 1:
            dense = points
        else:
            steps = np.maximum(np.ceil(np.abs(np.diff(points, axis=0)).max(axis=1) * 4), 1).astype(int)
            dense = np.concatenate([points[i] + np.linspace(0, 1, n, endpoint=False)[:, None] * (points[i + 1] - points[i])
                                    for i, n in enumerate(steps)] + [points[-1:]])
        pad = int(math.ceil(radius)) + 1
        low = np.maximum(np.floor(dense.min(axis=0)).astype(int) - pad, 0)
        high = np.minimum(np.ceil(dense.max(axis=0)).astype(int) + pad + 1, plane_shape)
        if np.any(high <= low):
            continue
        centre = np.zeros(tuple(high - low), dtype=bool)
        idx = np.round(dense).astype(int) - low
        keep = np.all((idx >= 0) & (idx < centre.shape), axis=1)
        centre[tuple(idx[keep].T)] = True
        if not centre.any():
            continue
        inside = ndi.distance_transform_edt(~centre) <= radius
        window = (slice(low[0], high[0]), slice(low[1], high[1]))
        target = scribbles[stroke.plane] if len(shape) == 3 else scribbles
        target[window][inside] = stroke.value
    return scribbles


class MemoizedClassifier(PixelClassifier):
    """A trained classifier that remembers its probabilities for the session's image.

    ``separate(image, classifier=...)`` runs the pipeline's own classifier
    path (foreground, boundary) but takes the probabilities the app already
    predicted from its cached features instead of computing every feature
    again; any other image or spacing is predicted as usual.
    """

    @classmethod
    def wrap(cls, classifier, image, spacing, probabilities):
        memo = cls(classifier.forest, classifier.header)
        memo._memo = (image, tuple(float(s) for s in spacing), probabilities)
        return memo

    def predict_proba(self, image, *, spacing=None, limits=None, **kwargs):
        from gpu_pipeline.pipeline import validate_spacing

        known, known_spacing, probabilities = self._memo
        if image is known and limits is None and validate_spacing(spacing, image.ndim) == known_spacing:
            return probabilities
        return super().predict_proba(image, spacing=spacing, limits=limits, **kwargs)


# -- pictures and files ----------------------------------------------------------------------------------------
def display_factor(shape):
    """Stride of the picture sent to the browser: 1 up to MAX_DISPLAY_SIDE, more for bigger planes."""
    return max(1, math.ceil(max(shape[-2:]) / MAX_DISPLAY_SIDE))


def png_data_uri(rgb):
    from gpu_pipeline.plots import png_bytes

    return "data:image/png;base64," + base64.b64encode(png_bytes(rgb)).decode()


def probability_rgba(probabilities, plane=None, factor=1):
    """RGBA picture of the particle (red) and boundary (yellow) probabilities, alpha = their sum."""
    probs = probabilities if plane is None else probabilities[:, plane]
    probs = probs[:, ::factor, ::factor]
    rgba = np.zeros(probs.shape[1:] + (4,), dtype=np.float64)
    alpha = np.zeros(probs.shape[1:])
    for value in (2, 3):
        if value - 1 < probs.shape[0]:
            colour = np.array([int(CLASS_COLOURS[value][i:i + 2], 16) for i in (1, 3, 5)], dtype=np.float64)
            rgba[..., :3] += probs[value - 1, ..., None] * colour
            alpha += probs[value - 1]
    rgba[..., :3] /= np.maximum(alpha, 1e-6)[..., None]
    rgba[..., 3] = np.clip(alpha, 0, 1) * 255
    return rgba.round().astype(np.uint8)


def labels_tiff_bytes(labels):
    import tifffile

    buffer = io.BytesIO()
    # Axes recorded as `declump run` records them: a 3D label image read back as planes (QYX before).
    tifffile.imwrite(buffer, labels, compression="zlib", metadata={"axes": "ZYX"[-labels.ndim:]},
                     photometric="minisblack")  # a volume of 3 or 4 planes is planes, not an RGB(A) picture
    return buffer.getvalue()


def table_csv_text(table):
    from gpu_pipeline.measure import write_csv

    with tempfile.TemporaryDirectory(prefix="declump-csv-") as folder:
        path = Path(folder) / "particles.csv"
        write_csv(table, path)
        return path.read_bytes().decode()  # as written, byte for byte (no newline translation)


def format_spacing(spacing):
    return ",".join(f"{s:g}" for s in spacing)


def command_line(session, *, device="auto"):
    """The shell commands that reproduce the result: `declump run`, after `declump train` where a painted classifier
    made the foreground (and `declump demo` for the sample).

    Every word is quoted for a POSIX shell (``shlex.quote``: a file name with spaces or quotes is one argument) and
    the commands are joined by ``&& \\`` line continuations, so that pasted into bash they run as one command
    that stops at the first failure (a ``set -e`` line would close an interactive shell on that failure).
    """
    result = session.result
    if result is None:
        return ""
    notes, commands = [], []
    if session.source is not None:
        source = session.source
    elif session.name == "sample":
        source = "demo_output/sample.tif"
        notes.append("# declump demo writes the app's sample as demo_output/sample.tif")
        commands.append(["declump", "demo", "--out", "demo_output"])
    else:
        source = session.name
    stem = Path(source).with_suffix("").name
    options = ["--spacing", format_spacing(session.spacing), *result.argv, "--device", device]
    if result.foreground == "classifier":
        # The result's classifier, not the session's latest: trained again (or another model chosen) after the
        # separation, the command described a result other than the one shown (2026-12-05 audit).
        if result.classifier_source != "painted":
            options += ["--classifier", result.classifier_source]
        else:
            if session.painted is None or result.classifier is not session.painted[0]:
                raise DeclumpError("the classifier was trained again since this result was made; separate again to "
                                   "download the command line that reproduces what is shown")
            if not np.array_equal(session.scribbles(), session.painted[2]):
                # ("separate again" did not help: the classifier is still the one of the strokes before.)
                raise DeclumpError("the strokes changed since the classifier of this result was trained; train and "
                                   "separate again (or undo the changes) to download the command line that "
                                   "reproduces what is shown")
            # (The scribbles are the strokes download, named so: f"{stem}_scribbles.tif".)
            commands.append(["declump", "train", source, "--labels", f"{stem}_scribbles.tif",
                             "--spacing", format_spacing(session.spacing), "--trees", str(TRAINING["n_estimators"]),
                             "--max-depth", str(TRAINING["max_depth"]),
                             "--samples-per-class", str(TRAINING["samples_per_class"]), "--seed", str(TRAINING["seed"]),
                             "--out", f"{stem}_model.npz"])
            options += ["--classifier", f"{stem}_model.npz"]
    commands.append(["declump", "run", source, f"{stem}_labels.tif", *options])
    return "\n".join([*notes, " && \\\n".join(shlex.join(command) for command in commands)]) + "\n"
