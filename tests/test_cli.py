"""The declump command end to end on real files, and its one-line errors on bad input."""
import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from PIL import Image

from gpu_pipeline.cli import main
from gpu_pipeline.synthetic import make_touching_particles


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "gpu_pipeline", *map(str, args)], capture_output=True, text=True)


def test_help_explains_options_with_units():
    out = run_cli("run", "--help").stdout
    for option in ("--spacing", "--sigma", "--min-distance", "--min-size", "--polarity", "--device", "--method"):
        assert option in out
    assert "physical units" in out


@pytest.mark.parametrize("suffix", [".tif", ".png", ".npy", ".zarr"])
def test_run_writes_labels_table_overlay_and_summary(tmp_path, rng, suffix):
    image, truth = make_touching_particles((96, 96), 12, seed=int(rng.integers(1e6)))
    src = tmp_path / f"in{suffix}"
    if suffix == ".tif":
        tifffile.imwrite(src, image)
    elif suffix == ".png":
        Image.fromarray(np.stack([image] * 3, axis=-1)).save(src)
    elif suffix == ".npy":
        np.save(src, image)
    else:
        import zarr

        zarr.create_array(str(src), shape=image.shape, dtype=image.dtype, chunks=(32, 32))[...] = image
    out = tmp_path / "out" / "labels.tif"
    assert main(["run", str(src), str(out), "--min-distance", "4", "--device", "cpu"]) == 0
    labels = tifffile.imread(out)
    summary = json.loads((tmp_path / "out" / "labels_summary.json").read_text())
    with open(tmp_path / "out" / "labels_particles.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert labels.shape == image.shape and labels.max() == summary["n_particles"] == len(rows)
    assert {"label", "voxel_count", "area", "equivalent_diameter", "centroid_y", "bbox_min_x", "mean_intensity"} <= set(rows[0])
    assert Image.open(tmp_path / "out" / "labels_overlay.png").size == (96, 96)


def _reference_overlay(image, labels, alpha=0.45):
    """The overlay's definition on the whole image at once: grey stretched between the 0.5 and 99.5
    percentiles, each particle blended with its colour, its outline (scikit-image's thick boundaries, 4-connected,
    inside particles) in that colour."""
    from skimage.segmentation import find_boundaries

    from gpu_pipeline.overlay import label_colours

    low, high = np.percentile(image.astype(np.float64), (0.5, 99.5))
    grey = np.clip((image.astype(np.float64) - low) / max(high - low, 1e-12), 0, 1)
    colours = label_colours(int(labels.max()))[labels]
    inside = (labels > 0)[..., None]
    rgb = np.where(inside, (1 - 0.45) * grey[..., None] + 0.45 * colours, grey[..., None])
    outline = (find_boundaries(labels, connectivity=1, mode="thick") & (labels > 0))[..., None]
    return (np.where(outline, colours, rgb) * 255).round().astype(np.uint8)


@pytest.mark.parametrize("step", [None, 1, 777])
def test_overlay_is_its_definition_band_by_band_with_bounded_temporaries(monkeypatch, rng, step):
    """The overlay PNG's picture, blended a band of rows at a time (``step`` pixels; one row, a row and a part,
    the default), equals the whole-image definition byte for byte, for a float32 image far from zero and for a
    3D volume's middle plane. Its temporaries stay a few bytes a pixel: blended at once in float64 RGB, a
    4096^2 picture traced 83 bytes a pixel."""
    import tracemalloc

    from gpu_pipeline import overlay

    if step is not None:
        monkeypatch.setattr(overlay, "OVERLAY_STEP_PIXELS", step)
    image, labels = make_touching_particles((200, 333), 40, seed=int(rng.integers(1e6)))
    labels = labels.astype(np.int32)
    assert np.array_equal(overlay.overlay_rgb(image, labels), _reference_overlay(image, labels))
    far = (1e6 + rng.normal(0, 5, labels.shape)).astype(np.float32)
    assert np.array_equal(overlay.overlay_rgb(far, labels), _reference_overlay(far, labels))
    volume, volume_labels = make_touching_particles((9, 64, 80), 12, seed=int(rng.integers(1e6)))
    assert np.array_equal(overlay.overlay_rgb(volume, volume_labels), _reference_overlay(volume[4], volume_labels[4]))
    if step is None:
        big = rng.integers(0, 256, (2048, 2048)).astype(np.uint8)
        big_labels = (rng.integers(0, 5000, (128, 128)).repeat(16, 0).repeat(16, 1) * (rng.random(big.shape) > 0.3))
        big_labels = big_labels.astype(np.int32)
        tracemalloc.start()
        try:
            picture = overlay.overlay_rgb(big, big_labels)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert picture.shape == (2048, 2048, 3)
        assert peak < 10 * big.size, peak / big.size  # the picture (3 B/px), the outline mask (1) and a band


def test_3d_npy_to_zarr_with_spacing(tmp_path, rng):
    image, _ = make_touching_particles((24, 48, 48), 10, spacing=(2, 1, 1), seed=int(rng.integers(1e6)))
    np.save(tmp_path / "vol.npy", image)
    assert main(["run", str(tmp_path / "vol.npy"), str(tmp_path / "vol_labels.zarr"), "--spacing", "2,1,1",
                 "--device", "cpu"]) == 0
    import zarr

    from gpu_pipeline.io import read_image

    labels = zarr.open(str(tmp_path / "vol_labels.zarr" / "particles" / "0"), mode="r")
    assert labels.shape == image.shape
    # OME-Zarr labels: spacing in the NGFF scale, readable back through the labels container.
    back, spacing = read_image(tmp_path / "vol_labels.zarr")
    assert spacing == [2.0, 1.0, 1.0] and np.array_equal(back, labels[...])


def test_evaluate_prints_scores(tmp_path, rng):
    _, truth = make_touching_particles((64, 64), 8, seed=int(rng.integers(1e6)))
    tifffile.imwrite(tmp_path / "gt.tif", truth)
    result = run_cli("evaluate", tmp_path / "gt.tif", tmp_path / "gt.tif", "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["mean_f1"] == 1.0


def _bad_inputs(tmp_path):
    np.save(tmp_path / "complex.npy", np.ones((20, 20), complex))
    np.save(tmp_path / "four_d.npy", np.ones((2, 3, 20, 20), np.uint8))
    nan = np.ones((20, 20), np.float32)
    nan[3, 3] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    np.save(tmp_path / "constant.npy", np.full((20, 20), 9, np.uint8))
    np.save(tmp_path / "empty.npy", np.zeros((0, 20), np.uint8))
    (tmp_path / "corrupt.tif").write_bytes(b"II*\x00garbage")
    np.save(tmp_path / "one_d.npy", np.arange(50, dtype=np.uint8))
    import zarr

    stack = zarr.create_array(str(tmp_path / "damaged.zarr"), shape=(8, 30, 30), dtype=np.uint8, chunks=(4, 15, 15))
    stack[...] = np.arange(8 * 30 * 30).reshape(8, 30, 30) % 251
    (tmp_path / "damaged.zarr" / "c" / "1" / "0" / "1").write_bytes(b"not zstd")
    (tmp_path / "image.jpg").write_bytes(b"\xff\xd8\xff")
    background = np.zeros((40, 40), np.uint8)
    background[0, 0] = 255  # one speck: removed by the size filter, nothing left
    np.save(tmp_path / "speck.npy", background)
    np.save(tmp_path / "huge.npy", np.where(background > 0, 1e300, 1.0))  # finite, but inf in float32
    barred = np.full((72, 80), 100, np.uint8)  # a flat picture above a microscope's data bar
    barred[60:], barred[64:67, 10:50] = 0, 255
    np.save(tmp_path / "flat_beside_bar.npy", barred)
    return {
        "missing.tif": "does not exist",
        "complex.npy": "dtype complex",
        "four_d.npy": "4D",
        "nan.npy": "NaN",
        "constant.npy": "constant",
        "empty.npy": "empty",
        "corrupt.tif": "could not read",
        "one_d.npy": "is 1D (shape (50,)); declump accepts 2D or 3D",
        "damaged.zarr": "chunk (1, 0, 1) of",
        "image.jpg": "unsupported input format",
        "speck.npy": "no particles found",
        "huge.npy": "beyond float32's range",
        "flat_beside_bar.npy": "constant (every value is 100) apart from the information band along its bottom edge",
    }


def test_bad_input_gives_one_line_error_and_no_output(tmp_path):
    for name, message in _bad_inputs(tmp_path).items():
        out = tmp_path / f"out_{name}.tif"
        # A fixed --min-distance: with 'auto' the size filter follows the objects found, and in an image
        # holding only a speck that speck is the particle.
        result = run_cli("run", tmp_path / name, out, "--device", "cpu", "--polarity", "bright", "--min-distance", "4")
        assert result.returncode == 2, (name, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("declump: error:") and message in lines[0], (name, lines)
        assert "Traceback" not in result.stderr
        assert not any(p.name.startswith(f"out_{name}") for p in tmp_path.iterdir()), name


def test_a_reader_that_stops_early_gets_no_traceback(tmp_path, rng):
    """`declump run ... | head -c 0`: the pipe closed before the command's last line; exit 1 without a
    traceback, the outputs written before that line complete (its summary too)."""
    image, _ = make_touching_particles((96, 96), 12, seed=int(rng.integers(1e6)))
    np.save(tmp_path / "in.npy", image)
    process = subprocess.Popen([sys.executable, "-m", "gpu_pipeline", "run", str(tmp_path / "in.npy"),
                                str(tmp_path / "out.tif"), "--quiet"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # long before the command prints: it imports, then separates
    stderr = process.stderr.read()
    assert process.wait() == 1 and "Traceback" not in stderr and "Broken pipe" not in stderr, stderr
    assert json.loads((tmp_path / "out_summary.json").read_text())["n_particles"] > 0


def test_requests_that_do_not_apply_say_what_does(tmp_path, rng, capsys):
    """A mask that is foreground everywhere names the mask, not the polarity or threshold it never used; the
    figure-panel rule asked for on a volume is refused rather than silently skipped."""
    image = (rng.random((48, 40)) * 255).astype(np.uint8)
    np.save(tmp_path / "img.npy", image)
    np.save(tmp_path / "ones.npy", np.ones(image.shape, np.uint8))
    assert main(["run", str(tmp_path / "img.npy"), str(tmp_path / "a.tif"), "--mask", str(tmp_path / "ones.npy")]) == 2
    err = capsys.readouterr().err
    assert "give a mask with background" in err and "polarity" not in err, err
    np.save(tmp_path / "vol.npy", make_touching_particles((24, 40, 40), 6, seed=int(rng.integers(1e6)))[0])
    assert main(["run", str(tmp_path / "vol.npy"), str(tmp_path / "b.tif"), "--reject-annotations", "on"]) == 2
    assert "is for 2D figure panels" in capsys.readouterr().err
    assert not list(tmp_path.glob("a*")) and not list(tmp_path.glob("b*"))


def test_float16_images_separate_and_measure_as_their_float32_values(tmp_path):
    """A float16 image (a network's output): the labels and the table of the same values as float32, in memory
    and chunked (the table's compiled sums ended in Numba's NotImplementedError: float16)."""
    import zarr

    image, _ = make_touching_particles((32, 64, 64), 25, seed=5)
    half = (image / 255).astype(np.float16)
    np.save(tmp_path / "half.npy", half)
    np.save(tmp_path / "single.npy", half.astype(np.float32))
    zarr.create_array(str(tmp_path / "half.zarr"), shape=half.shape, dtype=half.dtype, chunks=(32, 32, 32))[...] = half
    options = ["--sigma", "1", "--min-distance", "4", "--quiet"]
    for name in ("half", "single"):
        assert main(["run", str(tmp_path / f"{name}.npy"), str(tmp_path / f"{name}.tif"), *options]) == 0
    assert np.array_equal(tifffile.imread(tmp_path / "half.tif"), tifffile.imread(tmp_path / "single.tif"))
    assert (tmp_path / "half_particles.csv").read_text() == (tmp_path / "single_particles.csv").read_text()
    assert main(["run", str(tmp_path / "half.zarr"), str(tmp_path / "chunked.zarr"), "--max-radius", "13",
                 *options]) == 0
    chunked = zarr.open_array(str(tmp_path / "chunked.zarr" / "particles" / "0"))[...]
    from gpu_pipeline.pipeline import separate

    assert np.array_equal(chunked, separate(half.astype(np.float32), sigma=1.0, min_distance=4.0, max_radius=13,
                                            threshold="otsu", max_hole_size=0, min_size=np.pi * 4 ** 3 / 6,
                                            reject_annotations=False))


def test_a_0_255_mask_png_is_the_foreground_as_its_bool_mask_is(tmp_path, capsys):
    """A binary mask saved as an 8-bit PNG (0 and 255), the commonest file a segmentation tool writes: in memory
    the labels of the same mask as bool (it was refused: 'mask values span [0, 255]', while chunked runs took
    it). Negative integers and floats above 1 (logits, another scale) stay refused in one line."""
    image, truth = make_touching_particles((96, 96), 12, seed=6)
    foreground = truth > 0
    tifffile.imwrite(tmp_path / "img.tif", image)
    Image.fromarray((foreground * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    np.save(tmp_path / "mask_bool.npy", foreground)
    options = ["--min-distance", "4", "--quiet"]
    assert main(["run", str(tmp_path / "img.tif"), str(tmp_path / "png.tif"), "--mask", str(tmp_path / "mask.png"),
                 *options]) == 0
    assert main(["run", str(tmp_path / "img.tif"), str(tmp_path / "bool.tif"), "--mask",
                 str(tmp_path / "mask_bool.npy"), *options]) == 0
    assert np.array_equal(tifffile.imread(tmp_path / "png.tif"), tifffile.imread(tmp_path / "bool.tif"))
    np.save(tmp_path / "negative.npy", foreground.astype(np.int8) - 1)
    np.save(tmp_path / "logits.npy", np.where(foreground, 4.0, -4.0).astype(np.float32))
    for name in ("negative.npy", "logits.npy"):
        assert main(["run", str(tmp_path / "img.tif"), str(tmp_path / "x.tif"), "--mask", str(tmp_path / name),
                     *options]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "mask values span" in err and "0/255" in err, err


def test_an_imagej_calibration_is_pointed_out_not_taken_silently(tmp_path, capsys):
    """A TIFF stack with ImageJ's calibration (z 2 um, y/x 0.5 um): the run says so and which --spacing uses
    it (the app takes it; taking it here would change what --min-distance 4 means); the suggested --spacing
    then gives the labels of separate(..., spacing=that). Plain resolution tags (dots per inch) are not a
    calibration: no note."""
    from gpu_pipeline.pipeline import separate

    image, _ = make_touching_particles((16, 48, 48), 10, seed=7)
    tifffile.imwrite(tmp_path / "stack.tif", image, imagej=True, resolution=(2.0, 2.0),
                     metadata={"spacing": 2.0, "unit": "um", "axes": "ZYX"})
    tifffile.imwrite(tmp_path / "dpi.tif", image[0], resolution=(72.0, 72.0), resolutionunit="INCH")
    assert main(["run", str(tmp_path / "stack.tif"), str(tmp_path / "a.tif")]) == 0
    out = capsys.readouterr().err  # a note: on stderr, the result line alone on stdout
    assert "calibration is 2, 0.5, 0.5 um per voxel" in out and "--spacing 2,0.5,0.5" in out, out
    assert main(["run", str(tmp_path / "stack.tif"), str(tmp_path / "b.tif"), "--spacing", "2,0.5,0.5",
                 "--min-distance", "1.5"]) == 0
    assert "note" not in capsys.readouterr().err
    assert np.array_equal(tifffile.imread(tmp_path / "b.tif"), separate(image, spacing=(2.0, 0.5, 0.5),
                                                                       min_distance=1.5))
    assert main(["run", str(tmp_path / "dpi.tif"), str(tmp_path / "c.tif")]) == 0
    assert "note" not in capsys.readouterr().err


def test_gpu_request_without_gpu_is_a_clear_error(tmp_path):
    from gpu_pipeline._backend import gpu_available

    if gpu_available():
        pytest.skip("a GPU is present")
    np.save(tmp_path / "img.npy", make_touching_particles((64, 64), 5)[0])
    result = run_cli("run", tmp_path / "img.npy", tmp_path / "out.tif", "--device", "gpu")
    assert result.returncode == 2 and "--device gpu" in result.stderr and "gpu-cu1" in result.stderr
    assert not (tmp_path / "out.tif").exists()


def test_gpu_threads_are_refused_where_they_mean_nothing(tmp_path):
    """--gpu-threads: only chunked runs with --device gpu take it; elsewhere one line, before any output."""
    image = make_touching_particles((64, 64), 5)[0]
    np.save(tmp_path / "img.npy", image)
    result = run_cli("run", tmp_path / "img.npy", tmp_path / "out.tif", "--gpu-threads", "2")
    assert result.returncode == 2 and "--gpu-threads applies to chunked runs only" in result.stderr
    import zarr

    zarr.create_array(str(tmp_path / "in.zarr"), shape=image.shape, dtype=image.dtype, chunks=(32, 32))[...] = image
    result = run_cli("run", tmp_path / "in.zarr", tmp_path / "out.zarr", "--device", "cpu", "--gpu-threads", "2")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "--gpu-threads 2 applies to --device gpu" in lines[0]
    assert not (tmp_path / "out.tif").exists() and not (tmp_path / "out.zarr").exists()
    assert not (tmp_path / "out.zarr.work").exists()


@pytest.mark.parametrize("options, message", [
    (["--workers", "0"], "workers must be a whole number of at least 1, got '0'"),
    (["--workers", "-1"], "workers must be a whole number of at least 1, got '-1'"),
    (["--max-radius", "-3"], "max radius must be a positive number, got '-3'"),
    (["--gpu-threads", "0"], "gpu threads must be a whole number of at least 1"),
    (["--chunks", "0,8,8"], "chunks must be positive"),
    (["--chunks", "-1,8"], "chunks must be positive, got '-1,8'"),  # (argparse: "expected one argument")
    (["--sigma", "x"], "sigma must be 'auto' or a number"),
    (["--scratch-limit", "lots"], "scratch limit must be a positive size such as 800G or 2T"),
    (["--scratch-limit", "0"], "scratch limit must be a positive size such as 800G or 2T"),
    (["--no-such-option"], "unrecognized arguments: --no-such-option")])
def test_bad_command_lines_are_one_line_errors(tmp_path, options, message):
    """What the parser refuses: exit 2 and one line naming the option and what it accepts (not the 18-line
    usage block first), for in-memory and chunked runs alike; --workers -1 used to end in a traceback."""
    np.save(tmp_path / "img.npy", make_touching_particles((32, 32), 3)[0])
    result = run_cli("run", tmp_path / "img.npy", tmp_path / "out.tif", *options)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], lines
    assert lines[0].startswith(("declump run: error: ", "declump: error: ")) and "--help" in lines[0]
    assert not (tmp_path / "out.tif").exists()


def test_a_negative_list_after_its_option_is_the_options_value(tmp_path):
    """``--spacing -1,1`` reaches the spacing's own check: argparse took '-1,1' for an option and said
    "expected one argument"; ``--spacing=-1,1`` was the only way."""
    np.save(tmp_path / "img.npy", make_touching_particles((32, 32), 3)[0])
    for spacing in (["--spacing", "-1,1"], ["--spacing=-1,1"], ["--spacing", "-.5,1"]):
        result = run_cli("run", tmp_path / "img.npy", tmp_path / "out.tif", *spacing)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, lines
        assert lines[0].startswith("declump: error: spacing must be 2 positive numbers"), lines
    assert not (tmp_path / "out.tif").exists()


@pytest.mark.parametrize("options, message", [
    (["--sigma", "-1"], "sigma must be 'auto' or a finite non-negative physical size"),
    (["--min-size", "-5"], "min_size must be 'auto' or a finite non-negative physical size"),
    (["--max-iter", "-2"], "max_iter must be a whole number, 0 or more")])
def test_bad_parameters_are_refused_alike_in_memory_and_chunked_before_any_folder(tmp_path, options, message):
    """A negative sigma, min_size or max_iter: one line in both modes (a chunked run took the first two as 0,
    an in-memory run the third), and a chunked run creates no work folder, so that the corrected command is
    not refused as a run "with other parameters"."""
    import zarr

    image = make_touching_particles((48, 48, 48), 20, seed=3)[0]
    np.save(tmp_path / "img.npy", image)
    zarr.create_array(str(tmp_path / "in.zarr"), shape=image.shape, dtype=image.dtype, chunks=(24, 48, 48))[...] = image
    for source, out in (("img.npy", "out.tif"), ("in.zarr", "out.zarr")):
        result = run_cli("run", tmp_path / source, tmp_path / out, "--min-distance", "3", "--max-radius", "8",
                         *options)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], (source, lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.npy", "in.zarr"]


def test_options_an_input_cannot_take_are_one_line_errors(tmp_path, capsys):
    """--channel/--timepoint on an input without that axis (ignored before), or outside it (an IndexError);
    --chunks with another number of values than the volume's axes and a --scratch folder that cannot be
    created (tracebacks before): one line each, no output."""
    import zarr

    image = make_touching_particles((40, 40, 40), 12, seed=2)[0]
    np.save(tmp_path / "img.npy", image)
    zarr.create_array(str(tmp_path / "plain.zarr"), shape=image.shape, dtype=image.dtype, chunks=(20, 40, 40))[...] = image
    group = zarr.open_group(str(tmp_path / "czyx.zarr"), mode="w", zarr_format=2)
    group.create_array("0", shape=(2,) + image.shape, dtype=image.dtype, chunks=(1, 40, 40, 40))[...] = np.stack(
        [image, image])
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": n} for n in "czyx"], "datasets": [{"path": "0"}]}]
    (tmp_path / "a_file").write_text("")
    cases = [
        (["img.npy", "o.tif", "--channel", "1"], "img.npy has no 'c' axis (a .npy file)"),
        (["plain.zarr", "o.zarr", "--timepoint", "0"], "has no 't' axis (a plain Zarr array"),
        (["plain.zarr", "o.npy", "--channel", "0"], "has no 'c' axis (a plain Zarr array"),
        (["czyx.zarr", "o.zarr", "--channel", "2"], "--channel 2 is out of range: "),
        (["czyx.zarr", "o.npy", "--channel", "-1"], "--channel -1 is out of range: "),
        (["czyx.zarr", "o.npy", "--timepoint", "0", "--channel", "0"], "has no 't' axis (axes c, z, y, x)"),
        (["plain.zarr", "o.zarr", "--chunks", "20,20"], "--chunks 20,20 has 2 values but"),
        (["plain.zarr", "o.zarr", "--scratch", str(tmp_path / "a_file" / "work")], "cannot create the work folder"),
    ]
    for args, message in cases:
        assert main(["run", *(str(tmp_path / a) if i < 2 else a for i, a in enumerate(args)), "--quiet"]) == 2, args
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("declump: error: ") and message in lines[0], (args, lines)
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("o")], args
    assert main(["run", str(tmp_path / "czyx.zarr"), str(tmp_path / "o.npy"), "--channel", "1", "--quiet"]) == 0


def test_an_in_memory_run_never_replaces_a_folder_or_file_it_did_not_write(tmp_path, capsys):
    """A user's Zarr store, or any folder, named as an in-memory run's output was deleted and replaced by the
    labels; the input named as the output was overwritten. Both are now refused in one line before any work,
    with the store, the folder and the input byte-for-byte as they were. declump's own outputs (this run's,
    a chunked run's, an earlier version's labels container) are still replaced."""
    import zarr

    from gpu_pipeline.io import write_ngff_label_metadata

    image = make_touching_particles((64, 64), 8, seed=4)[0]
    np.save(tmp_path / "img.npy", image)
    store = zarr.create_array(str(tmp_path / "data.zarr"), shape=(16, 16), dtype="uint16", chunks=(8, 8))
    store[...] = np.arange(256, dtype=np.uint16).reshape(16, 16)
    (tmp_path / "folder.tif").mkdir()
    (tmp_path / "folder.tif" / "keep.txt").write_text("mine")

    def snapshot():
        return {p.relative_to(tmp_path): p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}

    before = snapshot()
    for output, message in (("data.zarr", "output " + str(tmp_path / "data.zarr") + " is a folder that declump "
                             "did not write"), ("folder.tif", "is a folder that declump did not write"),
                            ("img.npy", "would replace the input")):
        assert main(["run", str(tmp_path / "img.npy"), str(tmp_path / output), "--quiet"]) == 2, output
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, (output, err)
        assert snapshot() == before, output
    # declump's own folders are outputs to replace: this run's, and a labels container without the mark.
    for _ in range(2):
        assert main(["run", str(tmp_path / "img.npy"), str(tmp_path / "out.zarr"), "--quiet"]) == 0
    old = tmp_path / "old.zarr"
    zarr.open_group(str(old), mode="w", zarr_format=2)
    zarr.create_array(str(old / "particles" / "0"), shape=(4, 4), dtype="int32", zarr_format=2)[...] = 1
    write_ngff_label_metadata(old, (1.0, 1.0))
    assert main(["run", str(tmp_path / "img.npy"), str(old), "--quiet"]) == 0
    assert zarr.open_array(str(old / "particles" / "0"))[...].shape == image.shape


def test_no_output_of_a_run_replaces_or_deletes_an_input_or_a_user_s_folder(tmp_path, rng, capsys):
    """Found by a new user's audit: `run in.zarr in.zarr --overwrite` deleted the input store; a companion
    (`x_overlay.png`), --save-probabilities or a chunked run's --overwrite replaced an input or a user's store;
    --scratch naming a folder of the user's deleted that folder and everything in it at the end of the run.
    Each is refused in one line before any work (or, for --scratch, the folder is kept), every input byte for
    byte as it was."""
    import zarr

    volume, _ = make_touching_particles((24, 40, 40), 10, seed=int(rng.integers(1e6)))
    image = volume[12]
    zarr.create_array(str(tmp_path / "in.zarr"), shape=volume.shape, dtype=volume.dtype,
                      chunks=(24, 40, 40))[...] = volume
    zarr.create_array(str(tmp_path / "user.zarr"), shape=(4, 4), dtype="uint8", chunks=(4, 4))[...] = 7
    Image.fromarray(image).save(tmp_path / "x_overlay.png")
    np.save(tmp_path / "img.npy", image)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")

    def snapshot():
        return {p.relative_to(tmp_path): p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}

    chunked = ["--max-radius", "8", "--quiet"]
    before = snapshot()
    for args, message in [
        (["in.zarr", "in.zarr", "--overwrite", *chunked], "would replace the input"),
        (["in.zarr", "in.zarr/labels.zarr", *chunked], "would replace the input"),
        (["in.zarr", "user.zarr", "--overwrite", *chunked], "was not written by declump"),
        (["in.zarr", "out.zarr", "--scratch", "in.zarr", *chunked], "work folder"),
        (["x_overlay.png", "x.tif", "--quiet"], "the overlay"),
        (["img.npy", "out.tif", "--mask", "out_histogram.png", "--quiet"], "would replace --mask"),
        (["img.npy", "out.tif", "--classifier", "em-particles", "--save-probabilities", "img.npy", "--quiet"],
         "the --save-probabilities"),
        # The probabilities at the labels' own path replaced the labels (in memory) or the output store (chunked)
        # with exit status 0.
        (["img.npy", "o2.tif", "--classifier", "em-particles", "--save-probabilities", "o2.tif", "--quiet"],
         "at one place"),
        (["in.zarr", "o3.zarr", "--classifier", "em-particles", "--save-probabilities", "o3.zarr", *chunked],
         "at one place"),
    ]:
        argv = ["run", *[str(tmp_path / a) if a.endswith((".zarr", ".png", ".npy", ".tif")) or a == "in.zarr"
                         else a for a in args]]
        assert main(argv) == 2, args
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, (args, err)
        assert snapshot() == before, args
    # --scratch names a folder the run works in, never one it removes.
    assert main(["run", str(tmp_path / "in.zarr"), str(tmp_path / "out.zarr"), "--scratch", str(tmp_path / "mine"),
                 *chunked]) == 0
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me" and list((tmp_path / "mine").iterdir()) == [
        tmp_path / "mine" / "notes.txt"]
    assert all(snapshot()[p] == b for p, b in before.items())


def test_a_refused_run_leaves_the_earlier_run_s_outputs_whole(tmp_path, rng, capsys):
    """A run refused after its inputs were read (a model file's typo, no particles at the threshold given)
    removed the earlier run's summary and kept its labels, table and overlay: a complete output made to look
    unfinished."""
    image, _ = make_touching_particles((64, 64), 6, seed=int(rng.integers(1e6)))
    np.save(tmp_path / "img.npy", image)
    out = str(tmp_path / "out.tif")
    assert main(["run", str(tmp_path / "img.npy"), out, "--quiet"]) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert "out_summary.json" in before
    for extra in (["--classifier", str(tmp_path / "typo.npz")], ["--threshold", "1e6"]):
        assert main(["run", str(tmp_path / "img.npy"), out, "--quiet", *extra]) == 2, extra
        assert "\n" not in capsys.readouterr().err.strip()
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before, extra


def test_a_run_of_the_other_kind_with_overwrite_leaves_no_stale_table(tmp_path, rng, capsys):
    """An in-memory run writes a .csv table, a chunked one .parquet; one after the other into the same output
    left the first one's table beside the second one's labels, as if it were theirs."""
    import zarr

    volume, _ = make_touching_particles((24, 40, 40), 10, seed=int(rng.integers(1e6)))
    zarr.create_array(str(tmp_path / "in.zarr"), shape=volume.shape, dtype=volume.dtype,
                      chunks=(24, 40, 40))[...] = volume
    np.save(tmp_path / "in.npy", volume)
    out = str(tmp_path / "o.zarr")
    assert main(["run", str(tmp_path / "in.npy"), out, "--quiet"]) == 0
    assert (tmp_path / "o_particles.csv").exists()
    assert main(["run", str(tmp_path / "in.zarr"), out, "--overwrite", "--max-radius", "8", "--quiet"]) == 0
    assert (tmp_path / "o_particles.parquet").exists() and not (tmp_path / "o_particles.csv").exists()
    assert main(["run", str(tmp_path / "in.npy"), out, "--quiet"]) == 0
    assert (tmp_path / "o_particles.csv").exists() and not (tmp_path / "o_particles.parquet").exists()


def test_an_in_memory_run_takes_the_output_s_lock_and_max_radius_as_a_chunked_run_does(tmp_path, rng, capsys):
    """An in-memory run into the output a chunked run was writing finished first, was replaced, and left its
    table beside the other's labels: it now waits for no one and is refused while the lock is held. And
    --max-radius was ignored in memory (the same cap as a chunked run's, in separate(max_radius=...))."""
    import tifffile

    from gpu_pipeline import separate
    from gpu_pipeline.chunked.workspace import run_lock

    volume, _ = make_touching_particles((32, 64, 64), 30, seed=int(rng.integers(1e6)))
    np.save(tmp_path / "v.npy", volume)
    out = tmp_path / "o.tif"
    with run_lock(out):
        assert main(["run", str(tmp_path / "v.npy"), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "another declump run is writing" in err and not out.exists()
    options = dict(sigma=1.0, threshold="otsu", min_distance=4.0, max_hole_size=0)
    assert main(["run", str(tmp_path / "v.npy"), str(out), "--sigma", "1", "--threshold", "otsu", "--min-distance",
                 "4", "--max-hole-size", "0", "--max-radius", "3", "--quiet"]) == 0
    capped = separate(volume, max_radius=3.0, **options)
    assert np.array_equal(tifffile.imread(out), capped)
    assert not np.array_equal(capped, separate(volume, **options))  # (the cap changes these labels)
    assert not (tmp_path / "o.tif.lock").exists()


def test_scheduler_addresses_that_are_no_scheduler_s_are_one_line(tmp_path, capsys):
    """`--scheduler notanaddress` and an http:// address were tracebacks that left a work folder; a service
    that accepts the connection and never answers as Dask does (the dashboard's port, a web server) held the
    command without a word; --workers beside --scheduler was ignored; --cluster local-cuda --device cpu ran
    on the GPU engine without a word."""
    import socket
    import threading

    import zarr

    from gpu_pipeline._backend import DeclumpError
    from gpu_pipeline.chunked.run import connect_scheduler

    zarr.create_array(str(tmp_path / "in.zarr"), shape=(16, 16, 16), dtype="uint8", chunks=(16, 16, 16))[...] = 1
    for options, message in [(["--scheduler", "notanaddress"], "is not a Dask scheduler's address"),
                             (["--scheduler", "http://127.0.0.1:8787"], "is not a Dask scheduler's address"),
                             (["--scheduler", "tcp://127.0.0.1:8786", "--workers", "2"], "--workers 2 applies to"),
                             (["--cluster", "local-cuda", "--device", "cpu"], "with --device cpu use --cluster local")]:
        assert main(["run", str(tmp_path / "in.zarr"), str(tmp_path / "o.zarr"), *options, "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, (options, err)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in.zarr"], options
    with socket.socket() as silent:  # accepts, reads nothing, answers nothing
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        held = []
        threading.Thread(target=lambda: held.append(silent.accept()), daemon=True).start()
        with pytest.raises(DeclumpError, match="does not answer as a Dask scheduler"):
            connect_scheduler(f"tcp://127.0.0.1:{silent.getsockname()[1]}", seconds=1)


def test_debug_shows_the_traceback(tmp_path):
    result = run_cli("--debug", "run", tmp_path / "missing.tif", tmp_path / "o.tif")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_unsupported_output_suffix_is_refused_before_work(tmp_path):
    np.save(tmp_path / "img.npy", make_touching_particles((64, 64), 5)[0])
    result = run_cli("run", tmp_path / "img.npy", tmp_path / "out.jpg", "--device", "cpu")
    assert result.returncode == 2 and "unsupported output format" in result.stderr


def test_demo_runs_and_scores(tmp_path):
    result = run_cli("demo", "--out", tmp_path / "demo", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    scores = json.loads((tmp_path / "demo" / "sample_scores.json").read_text())
    assert scores["f1_50"] > 0.6


def test_the_3d_demo_s_sample_keeps_its_voxel_size_and_says_how_to_run_it_again(tmp_path, capsys):
    """The 3D sample was saved without its voxel size (2,1,1): run again as a user would, it scored F1@0.5 0.646
    against the demo's 0.979. It carries ImageJ's calibration now (read by the app and by run's note), and the
    demo prints the command that gives its labels back."""
    from gpu_pipeline.io import tiff_spacing

    assert main(["demo", "--3d", "--out", str(tmp_path / "d"), "--device", "cpu", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert tiff_spacing(tmp_path / "d" / "sample.tif") == ([2.0, 1.0, 1.0], "pixel")
    line = next(line for line in out.splitlines() if "to run it again" in line)
    command = line.split("to run it again: ", 1)[1].replace("OUTPUT", str(tmp_path / "again.tif")).split()
    assert command[:2] == ["declump", "run"] and main(command[1:] + ["--quiet", "--device", "cpu"]) == 0
    assert tifffile.imread(tmp_path / "again.tif").tobytes() == tifffile.imread(
        tmp_path / "d" / "sample_labels.tif").tobytes()


def test_demo_refuses_a_spacing_it_would_not_use(tmp_path):
    """The demo's sample has its own voxel size; a --spacing (accepted by run's shared options) is refused in
    one line before anything is written, not silently dropped."""
    result = run_cli("demo", "--out", tmp_path / "demo", "--spacing", "3,3", "--device", "cpu")
    assert result.returncode == 2 and "--spacing is for declump run" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("option, value, extra", [("nearby_ratio", 0.8, {}), ("peak_reach", 0.7, {}),
                                                  ("ball_share", 0.9, {}), ("reach_share", 0.9, {"peak_reach": 0.7})])
def test_3d_peak_options_reach_the_split_and_are_checked(tmp_path, option, value, extra):
    """--nearby-ratio 0.8, --peak-reach 0.7, --ball-share 0.9 and, with the reach on, --reach-share 0.9 on a 2D
    image (default off there, 0.5 for the ball share, 0.6 for the reach share) give separate(..., option=value)'s
    labels; a value outside (0, 1] is refused by the parser in one line, before any output."""
    from gpu_pipeline.pipeline import separate

    flag, words = "--" + option.replace("_", "-"), option.replace("_", " ")
    image, _ = make_touching_particles((200, 200), 60, radius_range=(6, 15), overlap=0.15, seed=1)
    tifffile.imwrite(tmp_path / "in.tif", image)
    options = ["--min-distance", "4", "--device", "cpu"]
    for name, setting in extra.items():
        options += ["--" + name.replace("_", "-"), str(setting)]
    assert main(["run", str(tmp_path / "in.tif"), str(tmp_path / "set.tif"), flag, str(value), *options]) == 0
    assert main(["run", str(tmp_path / "in.tif"), str(tmp_path / "plain.tif"), *options]) == 0
    given, plain = tifffile.imread(tmp_path / "set.tif"), tifffile.imread(tmp_path / "plain.tif")
    assert np.array_equal(given, separate(image, min_distance=4, **{option: value}, **extra))
    assert np.array_equal(plain, separate(image, min_distance=4, **extra)) and not np.array_equal(given, plain)
    result = run_cli("run", tmp_path / "in.tif", tmp_path / "bad.tif", flag, "2")
    assert result.returncode == 2 and f"{words} must be 'auto', a number in (0, 1] or 'off'" in result.stderr
    assert not (tmp_path / "bad.tif").exists()


def test_options_a_classifier_makes_unused_get_a_note_and_wording_names_what_is_wrong(tmp_path, rng, capsys):
    """--threshold, --sigma and --polarity beside --classifier were ignored without a word (a user may take
    --threshold 0.9 for the probability's cut-off); a folder given as the model was "does not exist"; `evaluate
    FILE FOLDER` said "unsupported input format (no suffix)"."""
    from gpu_pipeline.classifier import classes_from_instances, train_classifier

    image, truth = make_touching_particles((64, 64), 6, seed=int(rng.integers(1e6)))
    np.save(tmp_path / "img.npy", image)
    train_classifier(image, classes_from_instances(truth), n_estimators=2).save(tmp_path / "m.npz")
    base = ["run", str(tmp_path / "img.npy"), str(tmp_path / "a.tif"), "--classifier", str(tmp_path / "m.npz")]
    assert main(base) == 0
    assert "not used" not in capsys.readouterr().err
    assert main([*base, "--overwrite", "--threshold", "0.9", "--polarity", "dark"]) == 0
    err = capsys.readouterr().err
    assert "--threshold, --polarity make the thresholded foreground" in err and "not used" in err
    (tmp_path / "models").mkdir()
    assert main([*base[:-1], str(tmp_path / "models")]) == 2
    assert "is a folder" in capsys.readouterr().err
    np.save(tmp_path / "truth.npy", truth)
    assert main(["evaluate", str(tmp_path / "truth.npy"), str(tmp_path / "models")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "is a file, so the ground truth must be one too" in err


@pytest.mark.parametrize("error", [RuntimeError("can't start new thread"),
                                   ImportError("libfoo.so: failed to map segment from shared object")])
def test_memory_limits_seen_as_a_thread_or_a_library_that_cannot_start_are_one_line(tmp_path, monkeypatch, capsys,
                                                                                     error):
    """Under an address-space limit (ulimit -v, a batch system's h_vmem) a chunked run ran out of memory as
    "RuntimeError: can't start new thread" (Zarr's I/O thread) or a lazy import that could not map its library:
    a traceback and exit 1. One line and exit 3 now, as a MemoryError; other errors of those kinds still raise."""
    import gpu_pipeline.cli as cli

    def run_out(args):
        raise error

    monkeypatch.setattr(cli, "cmd_evaluate", run_out)
    assert main(["evaluate", str(tmp_path / "a.tif"), str(tmp_path / "b.tif")]) == 3
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("declump: error: out of memory") and "ulimit -v" in err

    def other(args):
        raise type(error)("something else")

    monkeypatch.setattr(cli, "cmd_evaluate", other)
    with pytest.raises(type(error)):
        main(["evaluate", str(tmp_path / "a.tif"), str(tmp_path / "b.tif")])


def test_an_output_path_no_folder_can_be_made_on_is_one_line_before_any_work(tmp_path, capsys):
    """A folder on an output path that is a file, or a symbolic link to nothing (a drive not mounted): each
    command's outputs (run in memory and chunked, --save-probabilities, a chunked run's --scratch, batch,
    demo, train) were a FileExistsError traceback, some only after the labels or the training. Now one line,
    exit 2, before any work: nothing is written, and train does not train."""
    import os

    import zarr

    image = make_touching_particles((64, 64), 8, seed=3)[0]
    np.save(tmp_path / "img.npy", image)
    zarr.create_array(str(tmp_path / "in.zarr"), shape=image.shape, dtype=image.dtype, chunks=(32, 32))[...] = image
    (tmp_path / "notes.txt").write_text("mine")
    os.symlink(tmp_path / "not_mounted" / "deep", tmp_path / "gone")
    before = sorted(p.name for p in tmp_path.iterdir())
    for bad, message in (("notes.txt", "notes.txt is a file, not a folder"),
                         ("gone", "is a symbolic link to " + str(tmp_path / "not_mounted" / "deep"))):
        cases = [
            ["run", "img.npy", f"{bad}/l.tif"],
            ["run", "in.zarr", f"{bad}/l.zarr"],
            ["run", "in.zarr", "o.zarr", "--scratch", f"{bad}/work"],
            ["run", "img.npy", "o.tif", "--classifier", "em-particles", "--save-probabilities", f"{bad}/p.tif"],
            ["batch", "img.npy", "--out", f"{bad}/b"],
            ["demo", "--out", f"{bad}/d"],
            ["train", "img.npy", "--labels", "img.npy", "--from-instances", "--out", f"{bad}/m.npz"],
        ]
        cases += [["batch", "img.npy", "--out", bad], ["demo", "--out", bad]]  # the folder to create itself
        for args in cases:
            given = [str(tmp_path / a) if a.startswith(("img", "in.", "o.", bad)) else a for a in args]
            assert main([*given, "--quiet"] if args[0] in ("run", "batch") else given) == 2, args
            lines = capsys.readouterr().err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("declump: error: cannot ") and message in lines[0], (
                args, lines)
            assert "nothing was written" in lines[0], lines
            assert sorted(p.name for p in tmp_path.iterdir()) == before, args
    assert (tmp_path / "notes.txt").read_text() == "mine" and os.path.islink(tmp_path / "gone")


def test_in_memory_runs_refuse_chunked_options_and_quiet_silences_every_note(tmp_path, capsys):
    """--workers on an in-memory run was taken silently (it sets a chunked run's threads or workers); and
    --quiet left the classifier's spacing note on stderr."""
    image = make_touching_particles((64, 64), 8, seed=3)[0]
    np.save(tmp_path / "img.npy", image)
    assert main(["run", str(tmp_path / "img.npy"), str(tmp_path / "o.tif"), "--workers", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["declump: error: --workers applies to chunked runs only (a Zarr input and a .zarr output)"]
    assert not (tmp_path / "o.tif").exists()
    args = ["run", str(tmp_path / "img.npy"), str(tmp_path / "o.tif"), "--classifier", "em-particles",
            "--spacing", "3,3"]
    assert main(args) == 0
    assert "declump: note: the model was trained at spacing" in capsys.readouterr().err
    args[2] = str(tmp_path / "o2.tif")
    assert main([*args, "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_a_refused_write_says_what_running_the_command_again_does():
    """The disk's refusal ended with '(a chunked run resumes)' for every command, `declump train` too."""
    import errno

    from gpu_pipeline.io import write_fault

    fault = OSError(errno.ENOSPC, "No space left on device", "/data/out/m.npz")
    said = {command: write_fault(fault, "/data/out", command) for command in ("run", "batch", "train", "demo")}
    assert all(line.startswith("cannot write /data/out/m.npz: No space left on device (ENOSPC); nothing was marked "
                               "complete") for line in said.values())
    assert said["run"].endswith("(or choose another output or --scratch folder), then run the same command again "
                                "(a chunked run resumes)")
    assert said["batch"].endswith("then run the same command again (the images already done are skipped)")
    for command in ("train", "demo"):
        assert said[command].endswith("(or choose another output folder), then run the same command again"), said
    assert write_fault(OSError(errno.ECONNRESET, "reset"), "x", "run") is None


def test_a_file_that_is_not_of_its_suffix_says_so_and_what_is_accepted(tmp_path, capsys, rng):
    """Text or random bytes named .npy were called 'a pickle' (NumPy takes any file without its header for
    one); a text file named .tif named no accepted input. A real pickle is still called one."""
    import pickle

    (tmp_path / "text.npy").write_text("a,b,c\n1,2,3\n")
    (tmp_path / "bytes.npy").write_bytes(rng.integers(0, 256, 100).astype(np.uint8).tobytes().replace(b"\x93", b"x"))
    (tmp_path / "text.tif").write_text("hello")
    (tmp_path / "objects.npy").write_bytes(pickle.dumps({"a": 1}))
    with open(tmp_path / "boxed.npy", "wb") as handle:
        np.save(handle, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    for name, words in (("text.npy", "as .npy: it is not a NumPy file (no .npy header)"),
                        ("bytes.npy", "as .npy: it is not a NumPy file (no .npy header)"),
                        ("objects.npy", "as .npy: it is not a NumPy file (no .npy header)"),
                        ("text.tif", "as .tif: TiffFileError"),
                        ("boxed.npy", "holds Python objects (a pickle), not a numeric array")):
        assert main(["run", str(tmp_path / name), str(tmp_path / "o.tif")]) == 2, name
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and words in lines[0] and "accepted: " in lines[0], (name, lines)
        assert not (tmp_path / "o.tif").exists()


def test_the_result_line_counts_one_particle_in_the_singular(tmp_path, rng, capsys):
    """A run that found one particle said "1 particles"."""
    yy, xx = np.mgrid[:64, :64]
    centre = rng.integers(24, 40, 2)
    image = np.where((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= 100, 200, 20).astype(np.uint8)
    np.save(tmp_path / "one.npy", image)
    options = ["--sigma", "1", "--min-distance", "4", "--quiet"]
    for out in ("one_labels.tif", "one_chunked.zarr"):
        source = tmp_path / ("one.npy" if out.endswith(".tif") else "one.zarr")
        if out.endswith(".zarr"):
            import zarr
            zarr.create_array(str(source), shape=image.shape, dtype=image.dtype, chunks=(64, 64))[...] = image
        assert main(["run", str(source), str(tmp_path / out), *options]) == 0
        assert capsys.readouterr().out.startswith("1 particle; labels -> "), out


def test_paths_no_file_can_be_at_are_one_line(tmp_path, capsys):
    """An empty path (Python's "."), a folder on the output path that is a symbolic link loop, and a folder that
    cannot hold files (ENOENT) were tracebacks (ValueError, RuntimeError from pathlib, FileNotFoundError); a
    name too long was said to be an output's fault, with the advice for a file on the path. Each is one line,
    exit 2, naming the path and what to do, and nothing is written."""
    import os

    import zarr

    image = make_touching_particles((64, 64), 8, seed=3)[0]
    np.save(tmp_path / "img.npy", image)
    zarr.create_array(str(tmp_path / "in.zarr"), shape=image.shape, dtype=image.dtype, chunks=(32, 32))[...] = image
    os.symlink("b", tmp_path / "a")
    os.symlink("a", tmp_path / "b")
    before = sorted(p.name for p in tmp_path.iterdir())
    long_name = "c" * 300 + ".npy"
    cases = [
        (["run", "img.npy", ""], "the output path is empty"),
        (["run", "", "o.tif"], "the input path is empty"),
        (["batch", "img.npy", "--out", ""], "--out path is empty"),
        (["run", "img.npy", "a/l.tif"], "is a symbolic link loop"),
        (["run", "in.zarr", "a/l.zarr"], "is a symbolic link loop"),
        (["run", long_name, "o.tif"], "File name too long (ENAMETOOLONG); shorten the path"),
    ]
    for args, message in cases:
        given = [str(tmp_path / a) if a.startswith(("img", "in.", "o.", "a/", "ccc")) else a for a in args]
        assert main([*given, "--quiet"]) == 2, args
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("declump: error: ") and message in lines[0], (args, lines)
        assert "cannot write" not in lines[0] or "long" not in lines[0], lines  # an input's name is not written
        assert sorted(p.name for p in tmp_path.iterdir()) == before, args
    if os.path.isdir("/proc/self"):  # Linux: a folder that cannot hold files
        assert main(["run", str(tmp_path / "img.npy"), "/proc/l.tif", "--quiet"]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "(ENOENT)" in lines[0] and "nothing was marked complete" in lines[0], lines


def test_inputs_that_are_not_one_image_say_what_they_are(tmp_path, capsys):
    """A folder given as the image, an empty array (.npy or Zarr, chunked), a chunked --mask of other dimensions
    (its error named --chunks, which was not given), and files holding several images (a TIFF of two series of
    other shapes, an animated PNG), whose first image alone was read without a word."""
    import zarr

    from gpu_pipeline import separate

    image = make_touching_particles((64, 64), 8, seed=3)[0]
    (tmp_path / "folder").mkdir()
    np.save(tmp_path / "empty.npy", np.zeros((0, 64, 64), np.uint8))
    zarr.create_array(str(tmp_path / "empty.zarr"), shape=(0, 64, 64), dtype="uint8", chunks=(1, 32, 32))
    zarr.create_array(str(tmp_path / "vol.zarr"), shape=(8, 64, 64), dtype="uint8", chunks=(8, 32, 32))[...] = (
        np.broadcast_to(image, (8, 64, 64)))
    zarr.create_array(str(tmp_path / "flat.zarr"), shape=(64, 64), dtype="uint8", chunks=(32, 32))[...] = image
    chunked = ["--min-distance", "3", "--sigma", "1", "--max-radius", "4"]
    for args, message in (
            (["run", "folder", "o.tif"], "is a folder, not an image file or a Zarr store"),
            (["run", "empty.npy", "o.tif"], "empty"),
            (["run", "empty.zarr", "o.zarr", *chunked], "holds an empty volume (shape (0, 64, 64))"),
            (["run", "vol.zarr", "o.zarr", *chunked, "--mask", "flat.zarr"],
             "--mask has shape (64, 64) but the volume has shape (8, 64, 64)")):
        given = [str(tmp_path / a) if a.endswith((".zarr", ".npy", ".tif")) or a == "folder" else a for a in args]
        assert main([*given, "--quiet"]) == 2, args
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and "--chunks" not in lines[0], (args, lines)
    with tifffile.TiffWriter(tmp_path / "two.tif") as tif:
        tif.write(image)
        tif.write(image[:32, :32])
    frames = [Image.fromarray(image), Image.fromarray(255 - image)]
    frames[0].save(tmp_path / "anim.png", save_all=True, append_images=frames[1:])
    for name, said in (("two.tif", "holds 2 images (TIFF series of shapes (64, 64), (32, 32))"),
                       ("anim.png", "holds 2 frames (an animated PNG of 64 x 64)")):
        assert main(["run", str(tmp_path / name), str(tmp_path / f"{name}.out.tif")]) == 0
        err = capsys.readouterr().err
        assert said in err and "read the first only" in err, err
        assert np.array_equal(tifffile.imread(tmp_path / f"{name}.out.tif"), separate(image))
    tifffile.imwrite(tmp_path / "one.tif", image)
    assert main(["run", str(tmp_path / "one.tif"), str(tmp_path / "one.out.tif")]) == 0
    assert "read the first only" not in capsys.readouterr().err
