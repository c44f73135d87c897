"""Inputs read by their layout (colour, channels, time, page-by-page stacks, byte order, compression), API
arguments checked as the CLI's are, and outputs that other tools read back as what they are: each case here was read wrongly without a word before (a colour TIFF ran as a
3-plane volume, an ImageJ channel axis as z, a page-by-page stack as its first page, a palette PNG as its
indices), or stopped in a traceback (big-endian data, 32-bit-id label images)."""
import json

import numpy as np
import pytest
import tifffile
from PIL import Image
from skimage.color import rgb2gray
from skimage.measure import regionprops_table

from gpu_pipeline import evaluate, particle_table, separate
from gpu_pipeline._backend import DeclumpError
from gpu_pipeline.cli import main
from gpu_pipeline.io import read_image
from gpu_pipeline.synthetic import make_touching_particles


@pytest.fixture
def image(rng):
    return make_touching_particles((64, 80), 10, seed=int(rng.integers(1e6)))[0]


@pytest.fixture
def volume(rng):
    return make_touching_particles((12, 40, 48), 8, seed=int(rng.integers(1e6)))[0]


def _colour(image, rng):
    """An RGB image whose luminance is ``image``'s structure, channels unequal."""
    tint = rng.uniform(0.6, 1.0, 3)
    return np.clip(image[..., None] * tint, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("layout", ["YXS", "SYX", "YXS4"])
def test_a_colour_tiff_is_read_as_its_grey_image(tmp_path, rng, image, layout):
    rgb = _colour(image, rng)
    if layout == "SYX":
        tifffile.imwrite(tmp_path / "c.tif", np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
    elif layout == "YXS4":
        tifffile.imwrite(tmp_path / "c.tif", np.concatenate([rgb, np.full(image.shape + (1,), 255, np.uint8)], -1),
                         photometric="rgb", extrasamples=["unassalpha"])
    else:
        tifffile.imwrite(tmp_path / "c.tif", rgb, photometric="rgb")
    grey, _ = read_image(tmp_path / "c.tif")
    assert grey.shape == image.shape
    np.testing.assert_allclose(grey, rgb2gray(rgb) * 255, rtol=1e-5, atol=1e-3)  # scikit-image's luminance


def test_channel_picks_one_colour_of_an_rgb_tiff_or_png(tmp_path, capsys, rng, image):
    rgb = np.stack([rng.integers(0, 60, image.shape, dtype=np.uint8), image.astype(np.uint8),
                    rng.integers(0, 60, image.shape, dtype=np.uint8)], -1)  # the particles are green
    tifffile.imwrite(tmp_path / "c.tif", rgb, photometric="rgb")
    Image.fromarray(rgb).save(tmp_path / "c.png")
    for name in ("c.tif", "c.png"):
        np.testing.assert_array_equal(read_image(tmp_path / name, channel=1)[0], image)
        with pytest.raises(DeclumpError, match="--channel 3 is out of range"):
            read_image(tmp_path / name, channel=3)


def test_tiff_samples_not_marked_as_colour_or_alpha_are_channels_to_pick(tmp_path, rng, image):
    """A (rows, columns, 2) TIFF (tifffile marks the second sample 'unspecified') ran silently on its first
    sample; grey + alpha (marked so) is still its grey."""
    other = rng.integers(0, 255, image.shape, dtype=np.uint8)
    tifffile.imwrite(tmp_path / "two.tif", np.stack([other, image.astype(np.uint8)], -1), photometric="minisblack",
                     planarconfig="contig")
    with pytest.raises(DeclumpError, match="2 samples per pixel, not marked as colour and alpha"):
        read_image(tmp_path / "two.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "two.tif", channel=1)[0], image.astype(np.uint8))
    Image.fromarray(np.stack([image.astype(np.uint8), other], -1), mode="LA").save(tmp_path / "la.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "la.tif")[0], image.astype(np.uint8))


def test_colour_palette_and_grey_alpha_pngs_are_read_as_the_grey_they_show(tmp_path, rng, image):
    shown = image.astype(np.uint8)
    palette = Image.fromarray((255 - shown).astype(np.uint8), mode="L").convert("P")
    inverted = list(range(255, -1, -1))
    palette.putpalette([v for i in inverted for v in (i, i, i)])  # index k shows grey 255 - k
    palette.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_image(tmp_path / "p.png")[0], shown)
    Image.fromarray(np.stack([shown, np.full_like(shown, 200)], -1), mode="LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image(tmp_path / "la.png")[0], shown)


def test_a_colour_mask_png_is_the_foreground_where_it_is_coloured(tmp_path, capsys, image):
    """A red-on-black mask (an annotation tool's export) was refused: its luminance spans [0, 54.2]."""
    mask = image > np.percentile(image, 60)
    red = np.zeros(image.shape + (3,), np.uint8)
    red[mask, 0] = 255
    Image.fromarray(red).save(tmp_path / "red.png")
    np.save(tmp_path / "img.npy", image)
    assert main(["run", str(tmp_path / "img.npy"), str(tmp_path / "o.tif"), "--mask", str(tmp_path / "red.png"),
                 "--quiet", "--min-distance", "3"]) == 0, capsys.readouterr().err
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "o.tif"), separate(image, mask=mask, min_distance=3))


def test_tiff_channel_and_time_axes_are_picked_like_ome_zarr_ones(tmp_path, capsys, rng, volume):
    other = rng.integers(0, 255, volume.shape, dtype=np.uint8)
    tifffile.imwrite(tmp_path / "zcyx.tif", np.stack([other, volume], axis=1), imagej=True, metadata={"axes": "ZCYX"})
    tifffile.imwrite(tmp_path / "tyx.tif", np.stack([other[0], volume[0], other[1]]), imagej=True,
                     metadata={"axes": "TYX"})
    with pytest.raises(DeclumpError, match="has 2 channels; pick one with --channel"):
        read_image(tmp_path / "zcyx.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "zcyx.tif", channel=1)[0], volume)
    np.testing.assert_array_equal(read_image(tmp_path / "tyx.tif", timepoint=1)[0], volume[0])
    with pytest.raises(DeclumpError, match="--channel 0 was given but .* has no 'c' axis"):
        read_image(tmp_path / "tyx.tif", channel=0)
    assert main(["run", str(tmp_path / "zcyx.tif"), str(tmp_path / "o.tif"), "--quiet"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--channel" in lines[0] and not (tmp_path / "o.tif").exists()
    assert main(["run", str(tmp_path / "zcyx.tif"), str(tmp_path / "o.tif"), "--channel", "1", "--quiet",
                 "--min-distance", "3"]) == 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "o.tif"), separate(volume, min_distance=3))


def test_a_volume_of_a_few_large_planes_is_pointed_out(tmp_path, capsys, image):
    """A plain TIFF of 2 channels (no axis metadata) ran silently as a 2-plane volume."""
    tifffile.imwrite(tmp_path / "two.tif", np.stack([image, image[::-1]]))
    assert main(["run", str(tmp_path / "two.tif"), str(tmp_path / "o.tif")]) == 0
    assert "has only 2 planes of 64 x 80; it runs as a volume" in capsys.readouterr().err
    tifffile.imwrite(tmp_path / "vol.tif", np.stack([image] * 8))
    assert main(["run", str(tmp_path / "vol.tif"), str(tmp_path / "v.tif")]) == 0
    assert "planes of" not in capsys.readouterr().err


def test_a_tiff_written_page_by_page_is_its_stack(tmp_path, volume):
    with tifffile.TiffWriter(tmp_path / "pages.tif") as tif:
        for plane in volume:
            tif.write(plane)  # each page its own series to tifffile; imread gives the first page only
    np.testing.assert_array_equal(read_image(tmp_path / "pages.tif")[0], volume)
    with tifffile.TiffWriter(tmp_path / "positions.ome.tif", ome=True) as tif:
        for plane in volume[:3]:
            tif.write(plane, metadata={"axes": "YX"})  # OME: three images (positions), not a stack
    np.testing.assert_array_equal(read_image(tmp_path / "positions.ome.tif")[0], volume[0])


def test_big_endian_and_one_plane_npy_inputs(tmp_path, capsys, image):
    np.save(tmp_path / "be.npy", image.astype(">u2"))
    np.save(tmp_path / "yx1.npy", image[:, :, None].astype(np.uint16))
    for name in ("be.npy", "yx1.npy"):
        assert main(["run", str(tmp_path / name), str(tmp_path / f"{name}.tif"), "--quiet",
                     "--min-distance", "3"]) == 0, capsys.readouterr().err
        # Against the same values in native uint16: an 8-bit image's saturated (255) cores can be taken for
        # annotation ink where a 16-bit one's cannot (two particles on DECLUMP_TEST_SEED 2).
        np.testing.assert_array_equal(tifffile.imread(tmp_path / f"{name}.tif"),
                                      separate(image.astype(np.uint16), min_distance=3))


def test_a_big_endian_zarr_runs_chunked_as_in_memory(tmp_path, capsys, rng):
    import zarr

    volume = make_touching_particles((40, 48, 48), 30, seed=int(rng.integers(1e6)))[0]
    zarr.create_array(str(tmp_path / "be.zarr"), shape=volume.shape, dtype=">u2", chunks=(20, 24, 24),
                      zarr_format=2)[...] = volume
    options = ["--sigma", "1", "--threshold", "otsu", "--min-distance", "3", "--max-hole-size", "0", "--quiet"]
    assert main(["run", str(tmp_path / "be.zarr"), str(tmp_path / "chunked.zarr"), "--chunks", "24,24,24",
                 *options]) == 0, capsys.readouterr().err
    chunked, _ = read_image(tmp_path / "chunked.zarr")
    in_memory = separate(volume, sigma=1, threshold="otsu", min_distance=3, max_hole_size=0)
    np.testing.assert_array_equal(chunked, in_memory)
    summary = json.loads((tmp_path / "chunked_summary.json").read_text())  # the in-memory run's statistics too
    diameters = particle_table(in_memory)["equivalent_diameter"]
    assert summary["equivalent_diameter_mean"] == pytest.approx(diameters.mean())
    assert summary["equivalent_diameter_max"] == pytest.approx(diameters.max())
    assert summary["foreground_voxels"] == int((in_memory > 0).sum())


def test_an_lzw_tiff_is_read(tmp_path, image):
    tifffile.imwrite(tmp_path / "lzw.tif", image, compression="lzw")  # Fiji's and many microscopes' choice
    np.testing.assert_array_equal(read_image(tmp_path / "lzw.tif")[0], image)


def test_a_colour_image_as_an_array_is_refused_not_run_as_a_thin_volume(image, rng):
    for array in (_colour(image, rng), image[..., None]):
        with pytest.raises(DeclumpError, match=r"channels? last, not a volume"):
            separate(array)
    assert separate(np.stack([image] * 3)).shape == (3,) + image.shape  # three planes first: a volume


def test_particle_table_checks_its_inputs_and_takes_any_ids(rng):
    labels = rng.integers(0, 4, (20, 30, 40)).astype(np.int64)
    image = rng.random(labels.shape).astype(">f4")
    sparse = np.where(labels > 0, labels * (2 ** 40 + 7), 0)  # ids of another tool: sparse and huge
    table = particle_table(sparse, image, spacing=(2.0, 1.0, 0.5))
    reference = regionprops_table(labels, np.asarray(image, np.float32),
                                  properties=("label", "area", "centroid", "intensity_mean"), spacing=(2.0, 1.0, 0.5))
    np.testing.assert_array_equal(table["label"], reference["label"] * (2 ** 40 + 7))
    np.testing.assert_allclose(table["volume"], reference["area"])
    np.testing.assert_allclose(table["centroid_x"], reference["centroid-2"])
    np.testing.assert_allclose(table["mean_intensity"], reference["intensity_mean"], rtol=1e-6)
    whole = particle_table(labels.astype(np.float32))  # a label image saved as float: whole numbers
    np.testing.assert_array_equal(whole["voxel_count"], np.bincount(labels.ravel())[1:])
    for call, message in [
        (lambda: particle_table(labels, image[..., :-1]), "differs from labels shape"),
        (lambda: particle_table(labels, np.stack([image] * 3, -1)), "differs from labels shape"),
        (lambda: particle_table(labels, spacing=(2.0,)), "spacing must be 3 positive numbers"),
        (lambda: particle_table(labels[None]), "accepted: a non-empty 2D or 3D array"),
        (lambda: particle_table(labels * 1.5), "not whole numbers"),
        (lambda: particle_table(labels - 1), "negative ids"),
        (lambda: evaluate(image.astype(np.float32), labels), "prediction has dtype float32 with values that are not"),
        (lambda: evaluate(labels[:0], labels[:0]), "accepted: a non-empty"),
    ]:
        with pytest.raises(DeclumpError, match=message):
            call()


def test_declump_evaluate_takes_label_images_saved_as_float(tmp_path, capsys, rng):
    """The CLI refused any float label image ('label images must be integer') while the API takes whole numbers."""
    truth = make_touching_particles((64, 64), 8, seed=int(rng.integers(1e6)))[1]
    tifffile.imwrite(tmp_path / "gt.tif", truth)
    tifffile.imwrite(tmp_path / "pred.tif", truth.astype(np.float32))
    tifffile.imwrite(tmp_path / "fraction.tif", truth.astype(np.float32) * 0.5)
    assert main(["evaluate", str(tmp_path / "pred.tif"), str(tmp_path / "gt.tif"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mean_f1"] == 1.0
    assert main(["evaluate", str(tmp_path / "fraction.tif"), str(tmp_path / "gt.tif")]) == 2
    assert "not whole numbers" in capsys.readouterr().err


def test_values_float32_cannot_tell_apart_are_refused_with_the_remedy(image):
    with pytest.raises(DeclumpError, match="cannot tell apart; subtract the offset or rescale"):
        separate(image.astype(np.int64) + 2 ** 40)
    with pytest.raises(DeclumpError, match="cannot tell apart"):
        separate(image * 1e-300)
    # A chunked run smooths in float32 before it sees the values: their one value there is not called constant.
    da = pytest.importorskip("dask.array")
    from gpu_pipeline.chunked.pipeline import separate_chunked

    span = f"{float(image.max()) - float(image.min()):.3g}"
    with pytest.raises(DeclumpError, match=rf"span only .* \(a range of {span}\), which float32 .* cannot tell"):
        separate_chunked(da.from_array(image.astype(np.int64) + 2 ** 40, chunks=32), max_radius=13)
    # An offset float32 still tells apart is taken; smoothing in float32 near 2**20 rounds to 0.125, so a few
    # boundary pixels may differ (4 of 5120 with DECLUMP_TEST_SEED 1), not the particles.
    offset, plain = separate(image.astype(np.int64) + 2 ** 20), separate(image.astype(np.int64))
    assert offset.max() == plain.max() and ((offset > 0) != (plain > 0)).mean() < 0.002


@pytest.mark.parametrize("name", ["out.ome.tif", "out.tif"])
def test_label_tiffs_record_their_axes_and_ome_companions_drop_ome(tmp_path, volume, name):
    assert main(["run", _npy(tmp_path, volume), str(tmp_path / name), "--spacing", "2,0.5,0.25", "--quiet"]) == 0
    with tifffile.TiffFile(tmp_path / name) as tif:
        assert tif.series[0].axes == "ZYX" and tif.series[0].shape == volume.shape
        if name.endswith(".ome.tif"):
            pixels = tif.ome_metadata
            assert 'PhysicalSizeZ="2.0"' in pixels and 'PhysicalSizeX="0.25"' in pixels and 'SizeC="1"' in pixels
    summary = json.loads((tmp_path / "out_summary.json").read_text())
    assert (tmp_path / "out_particles.csv").exists() and summary["n_particles"] > 0


@pytest.mark.parametrize("units, says", [(None, "um"), (("nm", "nm", "nm"), "nm"), (("nm", "nm", "µm"), "(mixed units)")])
def test_an_ome_tiff_calibration_is_pointed_out_as_an_imagej_one_is(tmp_path, capsys, volume, units, says):
    """Its unit as OME-XML names it (micrometres, the default, as "um"); "(mixed units)" only where the axes
    name different ones."""
    metadata = {"axes": "ZYX", "PhysicalSizeZ": 0.8, "PhysicalSizeY": 0.2, "PhysicalSizeX": 0.2}
    if units is not None:
        metadata.update({f"PhysicalSize{a}Unit": u for a, u in zip("ZYX", units)})
    tifffile.imwrite(tmp_path / "in.ome.tif", volume, metadata=metadata)
    assert main(["run", str(tmp_path / "in.ome.tif"), str(tmp_path / "o.tif")]) == 0
    out = capsys.readouterr().err
    assert f"calibration is 0.8, 0.2, 0.2 {says} per voxel" in out and "--spacing 0.8,0.2,0.2" in out, out


def test_ngff_multiscale_scale_multiplies_the_levels(tmp_path, volume):
    import zarr

    group = zarr.open_group(str(tmp_path / "img.zarr"), mode="w", zarr_format=2)
    group.create_array("0", shape=volume.shape, dtype=volume.dtype, chunks=volume.shape)[...] = volume
    group.attrs["multiscales"] = [{
        "version": "0.4", "axes": [{"name": n, "type": "space"} for n in "zyx"],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 2.0, 2.0]}]}],
        "coordinateTransformations": [{"type": "scale", "scale": [0.5, 0.1, 0.1]}]}]
    assert read_image(tmp_path / "img.zarr")[1] == pytest.approx([0.5, 0.2, 0.2])


def test_an_ome_zarr_inputs_unit_is_kept_in_the_outputs_in_memory_and_chunked(tmp_path, capsys, rng):
    """The labels' axes, the summary and the size histogram said nothing of the input's micrometers."""
    import zarr

    volume = make_touching_particles((40, 48, 48), 30, seed=int(rng.integers(1e6)))[0]
    group = zarr.open_group(str(tmp_path / "img.zarr"), mode="w", zarr_format=2)
    group.create_array("0", shape=volume.shape, dtype=volume.dtype, chunks=(20, 24, 24))[...] = volume
    group.attrs["multiscales"] = [{
        "version": "0.4", "axes": [{"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 0.5, 0.5]}]}]}]
    chunked = ["--chunks", "24,24,24", "--sigma", "1", "--threshold", "otsu", "--min-distance", "1.5",
               "--max-hole-size", "0"]
    for out, options, unit in (("mem.zarr", [], "micrometer"), ("chunked.zarr", chunked, "micrometer"),
                               ("given.zarr", ["--spacing", "1,1,1"], None)):
        assert main(["run", str(tmp_path / "img.zarr"), str(tmp_path / out), "--quiet", *options]) == 0, \
            capsys.readouterr().err
        axes = zarr.open_group(str(tmp_path / out / "particles"), mode="r").attrs["multiscales"][0]["axes"]
        assert [a.get("unit") for a in axes] == [unit] * 3, (out, axes)
        summary = json.loads((tmp_path / out.replace(".zarr", "_summary.json")).read_text())
        assert summary["unit"] == unit, out


@pytest.mark.parametrize("scale", [[0.0, 0.5, 0.5], [1.0, -0.5, 0.5], [1.0, 0.5]])
def test_an_unusable_scale_in_the_metadata_names_the_file_and_spacing(tmp_path, capsys, rng, scale):
    """An OME-Zarr scale of 0, a negative one or one of the wrong length was refused as "spacing must be 3
    positive numbers", though no --spacing was given. The line names the file's metadata and --spacing, which
    overrides it, in memory and chunked."""
    import zarr

    volume = make_touching_particles((24, 48, 48), 20, seed=int(rng.integers(1e6)))[0]
    group = zarr.open_group(str(tmp_path / "img.zarr"), mode="w", zarr_format=2)
    group.create_array("0", shape=volume.shape, dtype=volume.dtype, chunks=(24, 24, 24))[...] = volume
    group.attrs["multiscales"] = [{
        "version": "0.4", "axes": [{"name": n, "type": "space"} for n in "zyx"],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}]}]
    chunked = ["--chunks", "24,24,24", "--sigma", "1", "--min-distance", "3", "--max-radius", "6"]
    for out, options in (("mem.tif", []), ("chunked.zarr", chunked)):
        assert main(["run", str(tmp_path / "img.zarr"), str(tmp_path / out), "--quiet", *options]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "img.zarr's metadata gives the voxel size" in lines[0], lines
        assert "--spacing" in lines[0] and not (tmp_path / out).exists(), lines
        assert main(["run", str(tmp_path / "img.zarr"), str(tmp_path / out), "--quiet", "--spacing", "1,1,1",
                     *options]) == 0, capsys.readouterr().err


def test_a_quoted_home_path_is_the_home_folder(tmp_path, monkeypatch, image):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "img.npy", image)
    assert main(["run", "~/img.npy", "~/out/labels.tif", "--quiet"]) == 0
    assert (tmp_path / "out" / "labels.tif").exists() and not (tmp_path / "~").exists()


def test_api_arguments_are_checked_in_one_line_and_cpu_fallback_takes_the_same_signature(image):
    import inspect

    import cpu_fallback
    import gpu_pipeline

    for kwargs, message in [({"sigma": float("inf")}, "sigma must be 'auto' or a finite"),
                            ({"min_distance": float("inf")}, "min_distance must be 'auto' or a finite"),
                            ({"max_hole_size": float("nan")}, "max_hole_size must be 'auto' or a finite"),
                            ({"threshold": None}, "threshold must be one of"),
                            ({"threshold": True}, "threshold must be one of"),
                            ({"spacing": "1,1,1"}, "spacing must be 2 positive numbers"),
                            ({"spacing": 1e-30}, "outside 1e-12 to 1e"),  # its squares underflowed float32
                            ({"spacing": (1.0, 2e12)}, "outside 1e-12 to 1e"),
                            ({"kmeans_engine": "bogus"}, "kmeans_engine must be one of 'batched'")]:
        with pytest.raises(DeclumpError, match=message):
            separate(image, **kwargs)
    assert separate(image, spacing=np.array(2.0)).max() > 0  # a 0-d array is a scalar spacing
    # The command line's spellings, "2,1" and "100", are the same spacing and threshold as (2, 1) and 100.
    assert np.array_equal(separate(image, spacing="2,1"), separate(image, spacing=(2.0, 1.0)))
    level = float(np.median(image))
    assert np.array_equal(separate(image, threshold=str(level)), separate(image, threshold=level))
    for shape in ((1, image.shape[1]), (image.shape[0], 1), (1, *image.shape)):  # ValueError in np.gradient
        with pytest.raises(DeclumpError, match="one pixel along an axis"):
            separate(np.resize(image, shape))
    # The string as given, not repeated per axis; "1 dimension"; a masked array's mask was dropped silently.
    with pytest.raises(DeclumpError, match=r"got 'abc'$"):
        separate(image, spacing="abc")
    with pytest.raises(DeclumpError, match=r"^image has 1 dimension \(50,\); declump accepts 2D"):
        separate(np.arange(50, dtype=np.uint8))
    for kwargs in ({"image": np.ma.masked_array(image, mask=image < 10)},
                   {"image": image, "mask": np.ma.masked_array(image > 100, mask=image < 10)}):
        what = "mask" if "mask" in kwargs else "image"
        for function in (separate, cpu_fallback.separate):
            with pytest.raises(DeclumpError, match=f"the {what} is a NumPy masked array, whose mask declump does "):
                function(**kwargs)
    from gpu_pipeline import NoParticlesError

    with pytest.raises(NoParticlesError, match="the mask has no foreground voxel"):  # was "after thresholding"
        separate(image, mask=np.zeros(image.shape, bool))
    with pytest.raises(NoParticlesError, match="at least the ball of min_distance .*; check min_size or min_distance"):
        separate(image, min_distance=1e6)  # the size came from min_distance, not from a min_size given
    truth = make_touching_particles(image.shape, 10, seed=3)[1]  # a bool image is the mask, as on the CLI
    np.testing.assert_array_equal(separate(truth > 0), separate(np.zeros(image.shape, np.uint8), mask=truth > 0))
    for binary in ((truth > 0).astype(np.uint8) * 255, (truth > 0).astype(np.float32)):  # a mask saved as values
        np.testing.assert_array_equal(separate(binary), separate(truth > 0))  # (was thresholded and hole-filled)
    for name in ("neck_ratio", "ball_share"):  # the CLI's 'off' means None in Python too
        np.testing.assert_array_equal(separate(image, **{name: "off"}), separate(image, **{name: None}))
    np.testing.assert_array_equal(separate(image, reject_annotations="off"), separate(image, reject_annotations=False))
    pipeline_parameters = set(inspect.signature(gpu_pipeline.pipeline.separate).parameters)
    for function in (gpu_pipeline.separate, cpu_fallback.separate):
        assert set(inspect.signature(function).parameters) == pipeline_parameters | {"device"}
    np.testing.assert_array_equal(cpu_fallback.separate(image, device="cpu"), separate(image, device="cpu"))
    with pytest.raises(DeclumpError, match="runs on the CPU"):
        cpu_fallback.separate(image, device="gpu")


def _npy(tmp_path, array):
    np.save(tmp_path / "in.npy", array)
    return str(tmp_path / "in.npy")


def test_zarr_labels_name_a_source_only_where_the_input_is_a_zarr_image(tmp_path, rng):
    """NGFF's image-label source names the Zarr image the labels belong to; labels of a .npy or TIFF named the
    file there, which ome-zarr's reader looked for as an image ("no parent found")."""
    import zarr

    image, _ = make_touching_particles((64, 64), 6, seed=int(rng.integers(1e6)))
    np.save(tmp_path / "img.npy", image)
    assert main(["run", str(tmp_path / "img.npy"), str(tmp_path / "out.zarr"), "--quiet"]) == 0
    attrs = dict(zarr.open_group(str(tmp_path / "out.zarr" / "particles"), mode="r").attrs)
    assert attrs["image-label"] == {"version": "0.4"} and len(attrs["multiscales"][0]["datasets"]) == 1


def test_three_or_four_planes_are_written_as_planes_not_as_colour(tmp_path, rng):
    """A label volume of 3 planes and a 3-class probability map were stored as an RGB picture (tifffile's
    default for 3 samples: a deprecation warning, and a colour image in Fiji); they are grey planes now."""
    from gpu_pipeline.io import read_image, write_labels, write_probabilities

    labels = rng.integers(0, 9, (3, 20, 24)).astype(np.int32)
    write_labels(tmp_path / "l.tif", labels)
    write_probabilities(tmp_path / "p.tif", rng.random((4, 20, 24)).astype(np.float32), classes="abcd")
    for name, axes in (("l.tif", "ZYX"), ("p.tif", "CYX")):
        with tifffile.TiffFile(tmp_path / name) as tif:
            assert tif.pages[0].photometric == tifffile.PHOTOMETRIC.MINISBLACK and tif.series[0].axes == axes
    assert np.array_equal(read_image(tmp_path / "l.tif")[0], labels)


class _Recording:
    """A binary file that records the size of every write call (the bytes go to a real file)."""

    def __init__(self, handle):
        self.handle, self.sizes = handle, []

    def write(self, data):
        self.sizes.append(memoryview(data).nbytes)
        return self.handle.write(data)


@pytest.mark.parametrize("case", ["c", "fortran", "strided", "big_endian", "bool", "scalar", "structured",
                                  "empty"])
def test_npy_outputs_are_np_save_byte_for_byte_written_in_pieces(tmp_path, rng, case, monkeypatch):
    """save_npy writes np.save's file (np.load reads it back) in write calls of at most WRITE_PIECE bytes
    (made small here, so every case spans several)."""
    import gpu_pipeline.io as io

    monkeypatch.setattr(io, "WRITE_PIECE", 1000)
    base = rng.integers(0, 2 ** 31 - 1, (13, 17, 19)).astype(np.int32)
    array = {"c": base, "fortran": np.asfortranarray(base), "strided": base[::2, 1::3],
             "big_endian": base.astype(">u4"), "bool": base % 3 == 0, "scalar": np.float64(rng.random()),
             "structured": np.zeros(900, dtype=[("a", "<i4"), ("b", "<f8")]), "empty": base[:0]}[case]
    if case == "structured":
        array["a"], array["b"] = rng.integers(0, 100, 900), rng.random(900)
    np.save(tmp_path / "want.npy", array)
    with open(tmp_path / "got.npy", "wb") as handle:
        recording = _Recording(handle)
        io.save_npy(recording, array)
    assert (tmp_path / "got.npy").read_bytes() == (tmp_path / "want.npy").read_bytes()
    assert max(recording.sizes) <= 1000
    back = np.load(tmp_path / "got.npy")
    assert back.dtype == np.asarray(array).dtype and np.array_equal(back, array)
