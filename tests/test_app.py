"""The web app's work without a browser: strokes to scribbles, uploads, sessions, histogram, command line."""
import base64
import csv
import io
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from PIL import Image

from gpu_pipeline._backend import DeclumpError
from gpu_pipeline.app import session as sess
from gpu_pipeline.cli import main
from gpu_pipeline.plots import size_histogram, size_histogram_rgb
from gpu_pipeline.synthetic import demo_sample, make_touching_particles


def _segment_distance(points, a, b):
    """Euclidean distance of each point to the segment a-b (independent of the rasteriser)."""
    ab = b - a
    t = np.clip(((points - a) @ ab) / max(ab @ ab, 1e-12), 0, 1)
    return np.linalg.norm(points - (a + t[:, None] * ab), axis=1)


def test_strokes_cover_pixels_within_half_their_width_and_nothing_far(rng):
    shape = (80, 90)
    strokes = []
    for value in (1, 2, 3, 2):
        points = rng.uniform([5, 5], [75, 85], size=(int(rng.integers(2, 5)), 2))
        strokes.append(sess.Stroke(value, 0, float(rng.uniform(2, 9)), points))
    scribbles = sess.rasterize_strokes(strokes, shape).ravel()
    grid = np.stack(np.indices(shape), -1).reshape(-1, 2).astype(float)
    # Signed distance of every pixel to every stroke's edge (path distance minus half the width).
    edge = np.array([np.min([_segment_distance(grid, a, b) for a, b in zip(s.points[:-1], s.points[1:])], 0)
                     - s.width / 2 for s in strokes])
    for k, stroke in enumerate(strokes):  # later strokes paint over earlier ones
        surely = (edge[k] <= -1) & np.all(edge[k + 1:] > 1, axis=0)
        assert surely.any() and np.all(scribbles[surely] == stroke.value)
    assert np.all(scribbles[np.all(edge > 1, axis=0)] == 0)
    assert np.all(np.min(edge, 0)[scribbles > 0] <= 1)


def test_strokes_of_a_volume_stay_in_their_plane(rng):
    strokes = [sess.Stroke(2, 3, 4.0, np.array([[10.0, 10.0], [20.0, 30.0]])),
               sess.Stroke(1, 5, 4.0, np.array([[30.0, 5.0], [31.0, 35.0]]))]
    scribbles = sess.rasterize_strokes(strokes, (8, 40, 40))
    assert set(np.unique(scribbles[3])) == {0, 2} and set(np.unique(scribbles[5])) == {0, 1}
    assert not scribbles[[0, 1, 2, 4, 6, 7]].any()


def test_plotly_shape_round_trips_to_the_same_stroke(rng):
    points = rng.uniform(0, 100, size=(6, 2)).round(2)
    stroke = sess.Stroke(3, 0, 7.0, points)
    back = sess.stroke_from_shape(sess.stroke_to_shape(stroke, 1.7), 0, 1 / 1.7)
    assert back.value == 3 and back.width == pytest.approx(7.0) and np.allclose(back.points, points, atol=0.01)
    assert sess.stroke_from_shape({"type": "path", "path": "M1,2L3,4", "line": {"color": "#123456"}}, 0) is None


def test_parse_path_reads_plotly_numbers():
    assert np.allclose(sess.parse_path("M10.5,2L-3e1,4.25L.5,6"), [[2, 10.5], [4.25, -30], [6, 0.5]])


def _upload(data, mime="application/octet-stream"):
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _tiff_bytes(array, **kwargs):
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("name,data,words", [
    ("notes.txt", b"hello", "unsupported file type .txt"),
    ("broken.tif", b"this is not a tiff", "could not read"),
    ("broken.png", b"\x89PNG but not really", "could not read"),
    ("stack.npy", None, "declump accepts 2D or 3D"),
    ("flat.npy", "constant", "constant"),
    ("big.npy", "big", "limit"),
    ("empty.npy", "empty", "empty"),
])
def test_bad_uploads_give_one_line_messages(name, data, words):
    if data is None:
        buffer = io.BytesIO()
        np.save(buffer, np.random.default_rng(0).random((2, 3, 4, 5, 6)))
        data = buffer.getvalue()
    elif data == "constant":
        buffer = io.BytesIO()
        np.save(buffer, np.full((20, 20), 7, dtype=np.uint8))
        data = buffer.getvalue()
    elif data == "empty":
        buffer = io.BytesIO()
        np.save(buffer, np.zeros((0, 7), dtype=np.uint8))
        data = buffer.getvalue()
    elif data == "big":
        buffer = io.BytesIO()
        np.save(buffer, np.random.default_rng(0).random((64, 64)))
        data = buffer.getvalue()
    with pytest.raises(DeclumpError) as info:
        sess.read_upload(name, _upload(data), max_voxels=1000)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_upload_reads_like_the_cli_and_takes_spacing_from_tiff_metadata(rng):
    image = rng.integers(0, 4000, size=(5, 30, 40)).astype(np.uint16)
    data = _tiff_bytes(image, imagej=True, resolution=(1 / 0.25, 1 / 0.5), metadata={"spacing": 2.0, "unit": "um",
                                                                                     "axes": "ZYX"})
    read, spacing, unit = sess.read_upload("vol.tif", _upload(data))
    assert np.array_equal(read, image)
    assert spacing == pytest.approx([2.0, 0.5, 0.25]) and unit == "um"
    plain, spacing, unit = sess.read_upload("plain.npy", _upload(_npy_bytes(image[0])))
    assert np.array_equal(plain, image[0]) and spacing is None and unit is None


def _npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_each_browser_session_has_its_own_state(rng):
    store = sess.SessionStore(max_sessions=2, max_pages=4)
    first, second = store.new_id(), store.new_id()
    image = rng.random((20, 20))
    store.get(first).set_image(image, name="a")
    assert store.get(second).image is None and store.get(first).image is image
    with pytest.raises(DeclumpError):
        store.get("../../etc/passwd")


def test_opening_pages_never_drops_a_tab_with_an_image_and_a_dropped_tab_is_told(rng):
    """16 page loads in another tab pushed out the first tab's image, which then said 'separate first' next to
    its own count of particles. Pages without an image go first now; images beyond the limit drop the least
    recently used idle one, and that page says it expired."""
    store = sess.SessionStore(max_sessions=2, max_pages=4)
    work = store.new_id()
    store.get(work).set_image(rng.random((20, 20)), name="work")
    for _ in range(10):  # page loads that never load an image
        store.get(store.new_id())
    assert store.get(work).name == "work"
    others = [store.new_id() for _ in range(2)]
    for other in others:
        store.get(other).set_image(rng.random((20, 20)), name="other")
        store.get(other)
    with pytest.raises(DeclumpError, match="session expired.*reload the page"):
        store.get(work)  # the least recently used of three images
    assert all(store.get(other).name == "other" for other in others)


def test_a_job_keeps_its_image_and_a_shipped_model_never_replaces_the_painted_one(rng):
    """An upload during a job put the job's results on the new image (3D probabilities on a 2D image: every
    render failed); choosing the painted classifier after the shipped model ran the shipped model."""
    import threading

    from importlib import resources

    image, _ = make_touching_particles((64, 64), 6, seed=int(rng.integers(1e6)))
    session = sess.Session(sess.SessionStore.new_id())
    session.set_image(image, name="a")
    release = threading.Event()
    session.start_job("training", lambda progress: release.wait(30))
    for change in (lambda: session.set_image(rng.random((30, 30)), name="b"),
                   lambda: session.set_spacing((2.0, 2.0))):
        with pytest.raises(DeclumpError, match="still busy: training"):
            change()
    release.set()
    for _ in range(300):
        if session.finished_since(0):
            break
        threading.Event().wait(0.01)
    assert session.name == "a" and session.job is None
    with pytest.raises(DeclumpError, match="train the classifier on painted strokes first"):
        session.use_painted_classifier()
    session.strokes = [sess.Stroke(1, 0, 3.0, np.array([[2.0, 2.0], [2.0, 60.0]])),
                       sess.Stroke(2, 0, 3.0, np.argwhere(image == image.max())[:2].astype(float))]
    painted = session.train()
    if resources.files("gpu_pipeline.models").joinpath("em-particles.npz").is_file():
        session.use_shipped_model("em-particles")
        assert session.classifier_source == "em-particles"
    session.use_painted_classifier()
    assert session.classifier is painted and session.classifier_source == "painted"


def test_a_job_s_end_is_shown_by_every_reply_until_the_page_acknowledges_it(rng):
    """A poll's reply that shows a job's end can be dropped by the page (Dash keeps a callback's latest reply;
    on a 4096^2 image a poll overtook the slower one): the end was taken once and never shown, the status
    stuck at the job's last progress line. finished_since gives the same end, with its error, until the page
    acknowledges its number; then nothing until the next job ends."""
    import threading

    session = sess.Session(sess.SessionStore.new_id())
    session.set_image(make_touching_particles((48, 48), 4, seed=int(rng.integers(1e6)))[0], name="a")
    assert session.finished_since(0) is None  # no job yet
    for number, work, error in ((1, lambda progress: None, ""),
                                (2, lambda progress: (_ for _ in ()).throw(DeclumpError("bad value")), "bad value")):
        release = threading.Event()
        session.start_job("job", lambda progress, work=work, release=release: (release.wait(30), work(progress)))
        assert session.finished_since(number - 1) is None  # running
        release.set()
        for _ in range(300):
            if session.job is None:
                break
            threading.Event().wait(0.01)
        assert session.finished_since(number - 1) == (number, error)
        assert session.finished_since(number - 1) == (number, error)  # a dropped reply: shown again
        assert session.finished_since(number) is None  # acknowledged


@pytest.mark.parametrize("name,array,words", [
    ("objects.npy", np.array([{"a": 1}, None], dtype=object), "holds Python objects (a pickle)"),
    ("mask.npy", np.ones((20, 20), bool), "is a bool mask; the app separates intensity images"),
])
def test_upload_messages_name_the_file_not_the_server_folder(name, array, words):
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    with pytest.raises(DeclumpError) as info:
        sess.read_upload(name, _upload(buffer.getvalue()))
    assert words in str(info.value) and "declump-upload-" not in str(info.value)
    assert "allow_pickle" not in str(info.value) and "mask=" not in str(info.value)


def test_a_multichannel_tiff_upload_says_how_to_pick_a_channel_in_the_app():
    """The reader's 'pick one with --channel' names an option the app has not got."""
    data = _tiff_bytes(np.zeros((2, 16, 16), np.uint8), imagej=True, metadata={"axes": "CYX"})
    with pytest.raises(DeclumpError) as info:
        sess.read_upload("two.tif", _upload(data))
    assert "two.tif has 2 channels; the app reads one channel" in str(info.value)
    assert "declump run --channel N" in str(info.value) and "pick one with" not in str(info.value)


@pytest.mark.parametrize("channels", [3, 4])
def test_a_colour_array_is_refused_as_declump_run_refuses_it_not_shown_as_a_volume(tmp_path, rng, capsys, channels):
    """Found by an audit: a (128, 160, 3) or (128, 160, 4) uint8 .npy, uploaded or given to `declump app`, was shown
    as a volume "128 x 160 x 3" with no message (only Separate failed), while `declump run` refused it at once."""
    colour = rng.integers(0, 256, size=(128, 160, channels)).astype(np.uint8)
    path = tmp_path / "colour.npy"
    np.save(path, colour)
    assert main(["run", str(path), str(tmp_path / "out.tif"), "--device", "cpu"]) == 2
    refused = capsys.readouterr().err.strip().split(" has shape ", 1)[1]  # the CLI's line, after the image's name
    assert f"a 2D image with {channels} channels last" in refused
    with pytest.raises(DeclumpError) as uploaded:
        sess.read_upload("colour.npy", _upload(_npy_bytes(colour)))
    with pytest.raises(DeclumpError) as given:  # declump app colour.npy
        sess.read_image_file(path)
    assert str(uploaded.value) == f"colour.npy has shape {refused}"
    assert str(given.value) == f"{path} has shape {refused}"
    session = sess.Session(sess.SessionStore.new_id())
    with pytest.raises(DeclumpError, match="channels last"):
        session.set_image(colour, name="colour")
    assert session.image is None


def _ome_zarr(path, image, spacing, unit):
    import zarr

    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    group.create_array("0", shape=image.shape, chunks=image.shape, dtype=image.dtype)[:] = image
    axes = [{"name": name, "type": "space", "unit": unit} for name in "zyx"[-image.ndim:]]
    group.attrs["multiscales"] = [{"version": "0.4", "name": "image", "axes": axes, "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": list(spacing)}]}]}]


def test_an_ome_zarr_given_to_the_app_brings_its_unit_as_to_declump_run(tmp_path, rng):
    """Found by an audit: `declump app vol.zarr` took an OME-Zarr's spacing but not its axes' unit (the unit box
    said 'units', the table 'volume (units³)'), where `declump run` recorded 'micrometer'."""
    import json

    image, _ = make_touching_particles((16, 48, 48), 10, spacing=(2.0, 1.0, 1.0), seed=int(rng.integers(1e6)))
    path = tmp_path / "vol.zarr"
    _ome_zarr(path, image, (2.0, 1.0, 1.0), "micrometer")
    assert main(["run", str(path), str(tmp_path / "out.tif"), "--device", "cpu", "--quiet"]) == 0
    summary = json.loads((tmp_path / "out_summary.json").read_text())
    assert summary["unit"] == "micrometer"
    read, spacing, unit = sess.read_image_file(path)
    assert np.array_equal(read, image) and spacing == [2.0, 1.0, 1.0] and unit == summary["unit"]
    pytest.importorskip("dash", reason="the app extra is not installed")
    from gpu_pipeline.app import create_app
    from gpu_pipeline.app.ui import table_view

    app = create_app(path)
    app.layout()  # a page opens: its new session holds the image given
    session = list(app.declump_sessions._sessions.values())[-1]
    assert session.spacing == (2.0, 1.0, 1.0) and session.unit == "micrometer"
    names = [column["name"] for column in table_view(session.separate(), session.unit)[0]]
    assert "volume (micrometer³)" in names and "equivalent diameter (micrometer)" in names


def test_a_sigma_wider_than_the_image_is_refused_not_run_out_of_memory(rng):
    from gpu_pipeline import separate

    image, _ = make_touching_particles((64, 64), 6, seed=int(rng.integers(1e6)))
    with pytest.raises(DeclumpError, match="sigma 1e\\+09 is wider than the image"):
        separate(image, sigma=1e9)


def test_training_with_one_class_says_what_is_missing(rng):
    session = sess.Session(sess.SessionStore.new_id())
    session.set_image(rng.random((40, 40)), name="a")
    session.strokes = [sess.Stroke(2, 0, 4.0, np.array([[5.0, 5.0], [20.0, 20.0]]))]
    with pytest.raises(DeclumpError, match="at least two classes.*particle"):
        session.train()


def _bar_heights(rgb, edges):
    """Height in pixels of the bar drawn at the middle of each bin (the plot frame of size_histogram_rgb)."""
    bar = np.all(rgb == (70, 110, 180), axis=-1)
    left, right = 56, rgb.shape[1] - 16
    middles = left + ((edges[:-1] + edges[1:]) / 2 - edges[0]) / (edges[-1] - edges[0]) * (right - left)
    return np.array([bar[:, int(round(m))].sum() for m in middles])


def test_size_histogram_counts_equal_numpy_and_bars_are_drawn_to_scale(rng):
    diameters = rng.gamma(4.0, 3.0, size=int(rng.integers(50, 400)))
    counts, edges = size_histogram(diameters)
    assert np.array_equal(counts, np.histogram(diameters, bins=edges)[0])
    assert edges[0] == diameters.min() and edges[-1] == diameters.max() and counts.sum() == diameters.size
    rgb = size_histogram_rgb(diameters, unit="nm", size=(640, 400))
    top, bottom = 30, 400 - 46
    assert np.allclose(_bar_heights(rgb, edges), counts / counts.max() * (bottom - top), atol=2)


def test_a_bin_of_one_particle_beside_thousands_is_drawn_one_pixel_high(rng):
    """Thousands of particles in one bin and one in another: the one's bar is under a pixel to scale; it is
    drawn one pixel high (Pillow raised "y1 must be greater than or equal to y0" at the end of a run of
    24,000 particles, 2026-12-03), the others to scale."""
    many = rng.normal(10.0, 0.05, size=int(rng.integers(2000, 6000)))
    diameters = np.concatenate([many, [30.0 + rng.random()]])
    counts, edges = size_histogram(diameters)
    assert counts[-1] == 1 and counts.max() > 400 - 46 - 30  # one particle: under a pixel to scale
    rgb = size_histogram_rgb(diameters, unit="nm", size=(640, 400))
    expected = np.where(counts > 0, np.maximum(counts / counts.max() * (400 - 46 - 30), 1), 0)
    assert _bar_heights(rgb, edges)[-1] == 1
    assert np.allclose(_bar_heights(rgb, edges), expected, atol=2)


def test_run_writes_the_size_histogram_beside_the_overlay(tmp_path, rng):
    image, _ = make_touching_particles((96, 96), 14, seed=int(rng.integers(1e6)))
    np.save(tmp_path / "in.npy", image)
    assert main(["run", str(tmp_path / "in.npy"), str(tmp_path / "out.tif"), "--device", "cpu"]) == 0
    with open(tmp_path / "out_particles.csv") as handle:
        diameters = [float(row["equivalent_diameter"]) for row in csv.DictReader(handle)]
    written = np.asarray(Image.open(tmp_path / "out_histogram.png").convert("RGB"))
    assert written.shape == (400, 640, 3)
    counts, edges = size_histogram(diameters)
    assert np.allclose(_bar_heights(written, edges), counts / counts.max() * (400 - 46 - 30), atol=2)


def test_command_line_reproduces_the_app_result_from_the_cli(tmp_path, rng):
    image, _ = make_touching_particles((100, 120), 16, seed=int(rng.integers(1e6)))
    path = tmp_path / "particles.npy"
    np.save(path, image)
    session = sess.Session(sess.SessionStore.new_id())
    session.set_image(image, name=path.name, source=str(path), spacing=(0.5, 0.5), unit="nm")
    result = session.separate({"--min-distance": "2", "--polarity": "bright", "--max-hole-size": 3.0})
    line = sess.command_line(session, device="cpu").strip().splitlines()[-1]
    argv = shlex.split(line)
    assert argv[:2] == ["declump", "run"]
    argv[3] = str(tmp_path / argv[3])
    done = subprocess.run([sys.executable, "-m", "gpu_pipeline", *argv[1:]], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert np.array_equal(tifffile.imread(argv[3]), result.labels)
    # Byte for byte: the command's CSV ended its lines in CRLF, the app's download in LF.
    assert (tmp_path / "particles_labels_particles.csv").read_bytes() == sess.table_csv_text(result.table).encode()


def _paint_two_classes(session, truth, rng):
    """Strokes along rows: background where the truth is background, particle inside particles."""
    strokes = []
    for value, where in ((1, truth == 0), (2, truth > 0)):
        rows, cols = np.nonzero(where)
        for i in rng.choice(rows.size, size=6, replace=False):
            strokes.append(sess.Stroke(value, 0, 2.0, np.array([[rows[i], cols[i]], [rows[i] + 0.4, cols[i] + 0.4]])))
    session.strokes = strokes


def test_painted_classifier_result_is_reproduced_by_declump_train_and_run(tmp_path, rng):
    image, truth = make_touching_particles((90, 110), 14, seed=int(rng.integers(1e6)))
    path = tmp_path / "particles.tif"
    tifffile.imwrite(path, image)
    session = sess.Session(sess.SessionStore.new_id())
    session.set_image(image, name=path.name, source=str(path))
    _paint_two_classes(session, truth, rng)
    session.train()
    # The probabilities the app predicted from its cached features are the classifier's tile-by-tile ones.
    plain = sess.PixelClassifier(session.classifier.forest, session.classifier.header)
    assert np.allclose(session.probabilities, plain.predict_proba(image.copy(), spacing=(1.0, 1.0)), atol=1e-6)
    result = session.separate(foreground="classifier")
    tifffile.imwrite(tmp_path / "particles_scribbles.tif", session.scribbles())
    for argv in _commands(sess.command_line(session, device="cpu")):
        done = subprocess.run([sys.executable, "-m", "gpu_pipeline", *argv[1:]], capture_output=True, text=True,
                              cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    assert np.array_equal(tifffile.imread(tmp_path / "particles_labels.tif"), result.labels)
    assert (tmp_path / "particles_labels_particles.csv").read_bytes() == sess.table_csv_text(result.table).encode()


def _commands(text):
    """The argv of each command of the app's command line, as bash reads it: comment lines skipped, a line ending
    in a backslash joined to the next, commands separated by ``&&``."""
    words = shlex.split("\n".join(line for line in text.splitlines() if not line.startswith("#")).replace("\\\n", ""))
    commands = [[]]
    for word in words:
        if word == "&&":
            commands.append([])
        else:
            commands[-1].append(word)
    return commands


def _bash(text, cwd):
    """Run the app's command line in bash, with `declump` this checkout's (``python -m gpu_pipeline``)."""
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not installed")
    script = f"declump() {{ {shlex.quote(sys.executable)} -m gpu_pipeline \"$@\"; }}\n{text}"
    return subprocess.run([bash, "-c", script], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("name", ["my image.tif", "it's my image (2).tif"])
def test_the_command_line_quotes_every_file_name_and_stops_at_the_first_failure(tmp_path, rng, name):
    """Found by an audit: for an image named 'my image.tif' the `declump train` line gave --labels my
    image_scribbles.tif and --out my image_model.npz unquoted, and `declump run` then ran after train failed."""
    image, truth = make_touching_particles((90, 110), 14, seed=int(rng.integers(1e6)))
    tifffile.imwrite(tmp_path / name, image)
    session = sess.Session(sess.SessionStore.new_id())
    session.set_image(image, name=name)  # an upload: the command names the file by its name
    _paint_two_classes(session, truth, rng)
    session.train()
    result = session.separate(foreground="classifier")
    text = sess.command_line(session, device="cpu")
    stem = name[:-len(".tif")]
    train, run = _commands(text)
    assert train[:3] == ["declump", "train", name] and run[:4] == ["declump", "run", name, f"{stem}_labels.tif"]
    assert train[train.index("--labels") + 1] == f"{stem}_scribbles.tif"
    assert train[train.index("--out") + 1] == run[run.index("--classifier") + 1] == f"{stem}_model.npz"
    assert text.splitlines()[0].endswith(" && \\")  # the next command runs only if this one succeeded
    # In bash: without the strokes file, train fails and run never starts.
    done = _bash(text, tmp_path)
    assert done.returncode != 0 and f"{stem}_scribbles.tif" in done.stderr
    assert not (tmp_path / f"{stem}_labels.tif").exists()
    # With it (the strokes download), the two reproduce the result shown.
    tifffile.imwrite(tmp_path / f"{stem}_scribbles.tif", session.scribbles())
    done = _bash(text, tmp_path)
    assert done.returncode == 0, done.stderr
    assert np.array_equal(tifffile.imread(tmp_path / f"{stem}_labels.tif"), result.labels)


def test_the_sample_command_line_makes_the_sample_first():
    image, _, spacing = demo_sample()
    session = sess.Session(sess.SessionStore.new_id())
    session.set_image(image, name="sample", spacing=spacing, unit="px")
    session.separate({"--min-distance": "4"})
    text = sess.command_line(session, device="cpu")
    assert text.startswith("# ")  # what the first command is for: a comment line, before the commands
    demo, run = _commands(text)
    assert demo == ["declump", "demo", "--out", "demo_output"]
    assert run[:4] == ["declump", "run", "demo_output/sample.tif", "sample_labels.tif"] and "--min-distance" in run


def test_the_command_line_describes_the_result_shown_not_a_later_model(rng):
    """Found by an audit in the browser: after a separation with the painted classifier, choosing the shipped
    model, or training again (new strokes), gave a command line for the new model beside the old result."""
    image, truth = make_touching_particles((90, 110), 14, seed=int(rng.integers(1e6)))
    session = sess.Session(sess.SessionStore.new_id())
    session.set_image(image, name="particles.tif", source="particles.tif")
    _paint_two_classes(session, truth, rng)
    session.train()
    session.separate(foreground="classifier")
    painted = sess.command_line(session, device="cpu")
    assert "declump train" in painted and "--classifier particles_model.npz" in painted
    session.use_shipped_model()  # chosen, not yet separated with: the line still describes the painted result
    assert sess.command_line(session, device="cpu") == painted
    session.separate(foreground="classifier")
    assert "--classifier em-particles" in sess.command_line(session, device="cpu")
    session.use_painted_classifier()
    session.separate(foreground="classifier")
    assert sess.command_line(session, device="cpu") == painted
    session.train()  # the same strokes, another model object: no longer the one that made the result
    with pytest.raises(DeclumpError, match="trained again since this result was made; separate again"):
        sess.command_line(session, device="cpu")
    session.separate(foreground="classifier")
    _paint_two_classes(session, truth, rng)  # new strokes after the result
    # The advice was "separate again", which gave the same refusal: the classifier is the old strokes' one.
    with pytest.raises(DeclumpError, match="the strokes changed since the classifier of this result was trained; "
                                           "train and separate again"):
        sess.command_line(session, device="cpu")
    session.separate(foreground="classifier")
    with pytest.raises(DeclumpError, match="train and separate again"):
        sess.command_line(session, device="cpu")
    session.train()
    session.separate(foreground="classifier")
    assert "declump train" in sess.command_line(session, device="cpu")


def test_the_model_download_is_named_after_the_model_it_holds(rng):
    """After the shipped model was used, "model" gave it as IMAGE_model.npz, the name the painted command line
    gives the painted model: a user running that command line got the shipped model's labels."""
    from gpu_pipeline.app.ui import _model_bytes, _model_name
    from gpu_pipeline.classifier import load_classifier

    image, truth = make_touching_particles((90, 110), 14, seed=int(rng.integers(1e6)))
    session = sess.Session(sess.SessionStore.new_id())
    session.set_image(image, name="particles.tif", source="particles.tif")
    _paint_two_classes(session, truth, rng)
    session.train()
    assert _model_name(session) == "particles_model.npz"
    painted = _model_bytes(session)
    session.use_shipped_model()
    assert _model_name(session) == "em-particles.npz"
    shipped = _model_bytes(session)
    assert shipped != painted and load_classifier("em-particles").forest.n_trees == 32
    session.use_painted_classifier()
    assert _model_name(session) == "particles_model.npz" and _model_bytes(session) == painted


def test_app_without_dash_is_a_one_line_error_naming_the_extra():
    code = ("import sys; sys.modules['dash'] = None; from gpu_pipeline.cli import main; "
            "sys.exit(main(['app', '--port', '1']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "declump[app]" in done.stderr and "dash" in done.stderr


def test_an_address_the_app_cannot_listen_on_is_one_line_before_any_url(capsys):
    """A port another program holds, an address not of this machine, a host name that does not resolve: exit
    2 and one line saying which and what to do, with no URL printed (it used to print its URL, then
    Werkzeug's lines, exit 1)."""
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        cases = [(["--port", str(taken)], "another program holds that port"),
                 (["--host", "192.0.2.1"], "192.0.2.1 is not an address of this machine"),
                 (["--host", "no-such-host.invalid"], "--host no-such-host.invalid is not an address")]
        for options, message in cases:
            assert main(["app", *options]) == 2, options
            out, err = capsys.readouterr()
            assert out == "" and err.count("\n") == 1 and message in err, (options, out, err)


def test_a_big_image_is_shown_downsampled_in_full_resolution_coordinates(rng):
    pytest.importorskip("dash", reason="the app extra is not installed")
    from gpu_pipeline.app.ui import build_figure

    image = rng.random((700, 2100)).astype(np.float32)
    session = sess.Session(sess.SessionStore.new_id())
    session.set_image(image, name="wide")
    session.strokes = [sess.Stroke(1, 0, 5.0, np.array([[10.0, 2000.0], [600.0, 30.0]]))]
    figure = build_figure(session, 0, [], 0.5, 2, 6).to_dict()
    trace = figure["data"][0]
    factor = sess.display_factor(image.shape)
    assert factor == 3 and trace["dx"] == trace["dy"] == 3 and trace["x0"] == trace["y0"] == 1
    shown = Image.open(io.BytesIO(base64.b64decode(trace["source"].split(",", 1)[1])))
    assert shown.size == (700, 234)  # columns, rows of image[::3, ::3]
    assert np.allclose(sess.parse_path(figure["layout"]["shapes"][0]["path"]), [[10, 2000], [600, 30]])
    assert figure["layout"]["xaxis"]["range"] == [-0.5, 2099.5]


def test_a_volume_is_painted_per_plane_trained_and_separated_in_3d(rng):
    image, truth = make_touching_particles((20, 48, 48), 10, spacing=(2.0, 1.0, 1.0), seed=int(rng.integers(1e6)))
    session = sess.Session(sess.SessionStore.new_id())
    session.set_image(image, name="volume", spacing=(2.0, 1.0, 1.0))
    strokes = []
    # Three inner planes that hold particles (a drawn volume can leave a plane without any).
    planes = [p for p in (6, 10, 14, 8, 12, 4, 16) if (truth[p] > 0).sum() >= 4][:3]
    assert len(planes) == 3
    for plane in planes:
        for value, where in ((1, truth[plane] == 0), (2, truth[plane] > 0)):
            rows, cols = np.nonzero(where)
            for i in rng.choice(rows.size, size=4, replace=False):
                strokes.append(sess.Stroke(value, plane, 2.0, np.array([[rows[i], cols[i]]], dtype=float)))
    session.strokes = strokes
    scribbles = session.scribbles()
    assert scribbles.shape == image.shape and not scribbles[[0, 19]].any()
    session.train()
    assert session.probabilities.shape == (2,) + image.shape
    result = session.separate({"--min-distance": "3"}, foreground="classifier")
    from gpu_pipeline import separate

    expected = separate(image, spacing=(2.0, 1.0, 1.0), classifier=sess.PixelClassifier(
        session.classifier.forest, session.classifier.header), min_distance=3.0)
    assert result.labels.shape == image.shape and np.array_equal(result.labels, expected)
    assert "volume" in result.table


def test_separation_options_are_parsed_by_the_cli_parser_with_its_defaults_and_messages():
    kwargs, argv = sess.separation_options({"--min-distance": "2.5", "--min-size": "", "--polarity": "dark"})
    assert argv == ["--min-distance", "2.5", "--polarity", "dark"]
    from gpu_pipeline.cli import build_parser, separation_kwargs

    cli = separation_kwargs(build_parser().parse_args(["run", "a.tif", "b.tif", *argv]))
    cli.pop("spacing")
    assert kwargs == cli
    with pytest.raises(DeclumpError, match="--min-distance"):
        sess.separation_options({"--min-distance": "far"})


def test_cached_features_computed_by_tiles_equal_pixel_features(rng):
    from gpu_pipeline.stages.features import pixel_features

    image = rng.normal(100, 20, size=(700, 610)).astype(np.float32)  # two tiles of FEATURE_TILE_VOXELS
    session = sess.Session(sess.SessionStore.new_id())
    session.set_image(image, name="a", spacing=(0.5, 0.7))
    said = []
    features = session.cached_features(said.append)
    assert len(said) > 1 and "tile 2 of" in said[1]
    assert np.allclose(features, pixel_features(image, spacing=(0.5, 0.7)), atol=1e-5)
    assert session.cached_features() is features


def test_the_shipped_model_option_predicts_or_says_it_is_not_installed(rng):
    from importlib import resources

    image, _ = make_touching_particles((64, 64), 6, seed=int(rng.integers(1e6)))
    session = sess.Session(sess.SessionStore.new_id())
    session.set_image(image, name="a")
    if not resources.files("gpu_pipeline.models").joinpath("em-particles.npz").is_file():
        with pytest.raises(DeclumpError, match="em-particles.*not part of this installation"):
            session.use_shipped_model("em-particles")
        return
    session.use_shipped_model("em-particles")  # installed (the emsplit branch ships it): it predicts
    assert session.probabilities.shape[1:] == image.shape and session.classifier_source == "em-particles"
