"""The chunked pipeline: same bytes as the in-memory `separate` for any chunking, resumable, fault tolerant."""
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndi

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")
zarr = pytest.importorskip("zarr")

from conftest import CHUNKED_DEFAULTS  # noqa: E402
from gpu_pipeline._backend import DeclumpError  # noqa: E402
from gpu_pipeline.chunked.pipeline import peak_halo, separate_chunked  # noqa: E402
from gpu_pipeline.chunked.run import run_chunked  # noqa: E402
from gpu_pipeline.chunked.workspace import Workspace  # noqa: E402
from gpu_pipeline.measure import particle_table  # noqa: E402
from gpu_pipeline.pipeline import separate as separate_in_memory  # noqa: E402
from gpu_pipeline.synthetic import make_touching_particles  # noqa: E402

CHUNKED_OPTIONS = ["--sigma", "1", "--threshold", "otsu", "--min-distance", "4", "--max-hole-size", "0"]


def separate(image, **kwargs):
    """In-memory ``separate`` with the chunked engine's defaults for the options a call leaves out."""
    return separate_in_memory(image, **{**CHUNKED_DEFAULTS, **kwargs})

REPO = Path(__file__).resolve().parents[1]
MAX_RADIUS = 13.0  # generated radii reach 12
# Per dimension: shape, spacing, particles, and three chunk shapes: one dividing the shape, one not, and one
# not dividing and smaller than the largest particle (24 voxels across) while still holding the halo.
CASES = {
    2: ((200, 180), (1.0, 1.0), 100, [(100, 90), (37, 50), (18, 20)]),
    3: ((40, 64, 60), (2.0, 1.0, 1.0), 60, [(20, 32, 30), (17, 25, 23), (14, 24, 24)]),
}


def _ome_zarr(path, data, spacing, chunks):
    group = zarr.open_group(str(path), mode="w")
    group.create_array("0", shape=data.shape, dtype=data.dtype, chunks=chunks)[...] = data
    axes = [{"name": n, "type": "space"} for n in "zyx"[-data.ndim:]]
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": axes, "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": list(spacing)}]}]}]}
    return path


@pytest.mark.parametrize("ndim", [2, 3])
def test_chunked_labels_equal_in_memory_for_any_chunking(cluster_client, rng, tmp_path, ndim, monkeypatch):
    """On a real cluster; the ball shares and the neck search of the global peak list box by box on the
    workers (a box per 10 peaks here, one halo across; per 20,000 by default, four halos across)."""
    from gpu_pipeline.stages import by_box

    boxes, real = [], by_box.peak_boxes

    def counted(*args, **kwargs):
        found = list(real(*args, **kwargs))
        boxes.append(len(found))
        return iter(found)

    shape, spacing, n, chunkings = CASES[ndim]
    image, _ = make_touching_particles(shape, n, radius_range=(5, 12), spacing=spacing,
                                       seed=int(rng.integers(1e6)))
    expected = separate(image, spacing=spacing, max_radius=MAX_RADIUS)  # (the whole list's steps: few peaks)
    assert expected.max() > 20
    monkeypatch.setattr(by_box, "PEAKS_PER_BOX", 10)
    monkeypatch.setattr(by_box, "BOX_HALOS", 1)
    monkeypatch.setattr(by_box, "BOX_WORTH", float("inf"))  # (such small boxes are all halo: boxes anyway)
    monkeypatch.setattr(by_box, "peak_boxes", counted)
    for chunks in chunkings:
        assert any(c < 24 for c in chunks) or chunks == chunkings[0] or any(s % c for s, c in zip(shape, chunks))
        labels, details = separate_chunked(da.from_array(image, chunks=chunks), spacing=spacing,
                                           max_radius=MAX_RADIUS, workspace=Workspace(tmp_path / str(chunks)))
        out = labels.compute()
        assert out.dtype == np.int32 and out.tobytes() == expected.tobytes(), chunks
        assert details.n_particles == expected.max()
        # Staged ids are each block's own pieces, int32 (half the bytes of int64 to write and read back).
        assert zarr.open_array(str(tmp_path / str(chunks) / "pieces.zarr"), mode="r").dtype == np.int32
        if details.n_capped_voxels == 0:  # then the cap changed nothing: plain separate agrees too
            assert out.tobytes() == separate(image, spacing=spacing).tobytes()
    assert len(boxes) >= 2 * len(chunkings) and min(boxes) >= 4  # per chunking: the necks, the ball shares


def test_the_peak_pass_reads_each_staged_block_once_its_halos_written_by_the_staging(rng, tmp_path, monkeypatch):
    """Each chunk's distance transform and peaks run in one task that reads the chunk from the staged regions
    and its halo (the foreground, in bits) from the files that the tasks staging the regions wrote: the peak
    pass reads each block of the staged regions once, never a box with a halo (which decodes every chunk it
    touches whole), and the labels are the in-memory ones. A resumed run whose regions were staged without
    those files (or for another halo) reads each block twice: its neighbours' slabs, then its own pass.
    The peak pass read each block twice every time before."""
    import shutil

    import gpu_pipeline.chunked.pipeline as chunked_pipeline
    from gpu_pipeline.chunked.source import StoredVolume

    shape, spacing, n, chunkings = CASES[3]
    image, _ = make_touching_particles(shape, n, radius_range=(5, 12), spacing=spacing,
                                       seed=int(rng.integers(1e6)))
    expected = separate(image, spacing=spacing, max_radius=MAX_RADIUS)
    volume = da.from_array(image, chunks=chunkings[0])
    reads, in_peaks, original, peaks = [], [False], StoredVolume.read, chunked_pipeline.peaks_chunked

    def logged(self, box):
        if str(self.path).endswith("regions.zarr") and in_peaks[0]:
            reads.append(tuple((b.start, b.stop) for b in box))
        return original(self, box)

    def peak_pass(*args, **kwargs):
        in_peaks[0] = True
        try:
            return peaks(*args, **kwargs)
        finally:
            in_peaks[0] = False

    monkeypatch.setattr(StoredVolume, "read", logged)
    monkeypatch.setattr(chunked_pipeline, "peaks_chunked", peak_pass)
    # In this process (a cluster another test started stays the default client): the reads are counted here.
    monkeypatch.setattr("gpu_pipeline.chunked.workspace.active_client", lambda: None)
    starts = [np.concatenate([[0], np.cumsum(c)[:-1]]) for c in volume.chunks]
    blocks = [tuple((int(s[i]), int(s[i] + c[i])) for s, c, i in zip(starts, volume.chunks, index))
              for index in itertools.product(*[range(len(c)) for c in volume.chunks])]
    work = tmp_path / "work"
    with dask.config.set(scheduler="threads"):
        labels, _ = separate_chunked(volume, spacing=spacing, max_radius=MAX_RADIUS, workspace=Workspace(work))
        assert labels.compute().tobytes() == expected.tobytes()
        assert sorted(reads) == sorted(blocks)
        assert not (work / "peaks.halos").exists()  # gone once the peak pass has run
        for marker in (None, "another halo"):  # resumed: regions staged, the peak pass not run
            for name in ("peaks.npz", "necks.npz", "one_piece.npz", "distance.zarr", "distance.done", "pieces.zarr",
                         "pieces.done"):
                shutil.rmtree(work / name, ignore_errors=True) if (work / name).is_dir() else \
                    (work / name).unlink(missing_ok=True)
            if marker is not None:
                (work / "peaks.halos").mkdir()
                (work / "peaks.halos" / "complete").write_text(marker)
            reads.clear()
            labels, details = separate_chunked(volume, spacing=spacing, max_radius=MAX_RADIUS,
                                               workspace=Workspace(work))
            assert details.blocks_computed["regions"] == 0
            assert labels.compute().tobytes() == expected.tobytes(), marker
            assert sorted(reads) == sorted(blocks * 2), marker


def test_lloyd_updates_and_mask_input_match_in_memory(rng):
    shape, spacing = (160, 150), (1.0, 1.0)
    image, truth = make_touching_particles(shape, 60, spacing=spacing, seed=int(rng.integers(1e6)))
    probability = np.clip((truth > 0) * 0.8 + rng.random(shape) * 0.15, 0, 1).astype(np.float32)
    for kwargs in (dict(max_iter=5), dict(assignment="euclidean", max_iter=3)):
        expected = separate(image, spacing=spacing, max_radius=MAX_RADIUS, **kwargs)
        labels, _ = separate_chunked(da.from_array(image, chunks=(45, 64)), spacing=spacing, max_radius=MAX_RADIUS,
                                     **kwargs)
        assert labels.compute().tobytes() == expected.tobytes(), kwargs
    expected = separate(image, mask=probability, spacing=spacing, max_radius=MAX_RADIUS)
    labels, _ = separate_chunked(None, mask=da.from_array(probability, chunks=(50, 50)), spacing=spacing,
                                 max_radius=MAX_RADIUS)
    assert labels.compute().tobytes() == expected.tobytes()


@pytest.mark.parametrize("bad, says", [(np.nan, "NaN or inf values in its chunk at (40, 0)"),
                                       (3.0, "mask values span [0, 3] in its chunk at (40, 0)"),
                                       (-0.5, "mask values span [-0.5, 1] in its chunk at (40, 0)")])
def test_a_mask_of_values_no_mask_holds_is_refused_as_in_memory(rng, bad, says):
    """A chunked run checks each block of a float mask as the in-memory run checks the whole: a NaN, a value
    above 1 or below 0 in one chunk is a one-line error naming that chunk, not a run on what > 0.5 makes of it."""
    shape = (80, 72)
    probability = (rng.random(shape) > 0.6).astype(np.float32)
    probability[40 + int(rng.integers(40)), int(rng.integers(72))] = bad
    with pytest.raises(DeclumpError, match="mask holds NaN" if np.isnan(bad) else "mask values span"):
        separate_in_memory(None, mask=probability)
    with pytest.raises(DeclumpError) as caught:
        separate_chunked(None, mask=da.from_array(probability, chunks=(40, 72)), max_radius=MAX_RADIUS)
    assert says in str(caught.value) and "accepted:" in str(caught.value)


def _rods(shape, n, rng):
    """Touching rods (capsules: points within a radius of a segment), bright on dark, any dimension."""
    grid = np.indices(shape, dtype=float).reshape(len(shape), -1).T
    inside = np.zeros(len(grid), bool)
    for _ in range(n):
        p, q = (rng.uniform(4, np.asarray(shape) - 4) for _ in range(2))
        d = q - p
        t = np.clip((grid - p) @ d / (d @ d), 0, 1)
        inside |= np.linalg.norm(grid - (p + t[:, None] * d), axis=1) <= rng.uniform(3, 6)
    return np.where(inside.reshape(shape), 200, 30).astype(np.uint8)


@pytest.mark.parametrize("shape, chunkings", [((90, 110), [(40, 37), (23, 29)]),
                                              ((30, 48, 44), [(15, 20, 22), (13, 17, 19)])])
@pytest.mark.parametrize("by_box", [False, True])
def test_neck_grouping_matches_in_memory(rng, tmp_path, shape, chunkings, by_box, monkeypatch):
    """by_box: the search box by box on (4) local threads, boxes one halo across, of a few peaks each (the
    in-memory reference computed on the whole list first)."""
    from gpu_pipeline.stages import by_box as boxing

    boxes, real = [], boxing.peak_boxes
    image = _rods(shape, 10 if len(shape) == 2 else 8, rng)
    kwargs = dict(sigma=0, min_distance=3, max_radius=7.0, neck_ratio=0.7)
    expected = separate(image, **kwargs)  # (the whole list's steps: few peaks)
    plain = separate(image, **dict(kwargs, neck_ratio=None))
    assert expected.max() < plain.max()  # the grouping joined peaks here
    if by_box:
        monkeypatch.setattr(boxing, "PEAKS_PER_BOX", 3)
        monkeypatch.setattr(boxing, "BOX_HALOS", 1)
        monkeypatch.setattr(boxing, "BOX_WORTH", float("inf"))
        monkeypatch.setattr(boxing, "peak_boxes", lambda *a, **k: boxes.append(list(real(*a, **k))) or boxes[-1])
    for chunks in chunkings:
        with dask.config.set(num_workers=4):
            labels, _ = separate_chunked(da.from_array(image, chunks=chunks),
                                         workspace=Workspace(tmp_path / str(chunks)), **kwargs)
        assert labels.compute().tobytes() == expected.tobytes(), chunks
    assert not by_box or min(len(b) for b in boxes) >= 4


@pytest.mark.parametrize("option, value_3d, value_2d, off, volume, kwargs, pieces", [
    # A 48^3 corner of the bench's seed-4711 volume (1000 spheres, radii 6-15) around the one sphere of the
    # 256^3 volume that only the neck default kept whole there (before the peak reach, which now drops that
    # sphere's second maximum too: off here).
    ("neck_ratio", 0.95, 0.97, 1.0, ((256, 256, 256), 1000, (6, 15), 4711, np.s_[48:96, 208:256, 160:208]),
     dict(min_distance=4, max_radius=16.0, peak_reach=None, ball_share=None), -1),
    ("nearby_ratio", 0.8, None, None, ((128, 128, 128), 113, (7.5, 14.6), 2008, np.s_[:]),
     dict(min_distance=4, max_radius=16.0, min_size=65, peak_reach=None, ball_share=None), -1),  # both drop it too
    # A 64^3 box of a held-out volume of the peak-reach check (772 spheres, radii 7.2-11.7) around a sphere
    # whose second maximum only the reach drops.
    ("peak_reach", 0.7, None, None, ((256, 256, 256), 772, (7.2, 11.7), 46745, np.s_[14:78, 184:248, 34:98]),
     dict(min_distance=4, max_radius=16.0, min_size=65, ball_share=None), -1),  # the ball share drops it too
    # A 64^3 box of a random volume of the ball-share check (1106 spheres, radii 6.2-10.4) around a second
    # maximum where spheres meet, whose piece only the ball share drops; 2D has the same default.
    ("ball_share", 0.5, 0.5, None, ((256, 256, 256), 1106, (6.2, 10.4), 42563, np.s_[8:72, 34:98, 23:87]),
     dict(min_distance=4, max_radius=16.0, min_size=65), -1),
    # A 64^3 box of the side-by-side volume of seed 26035 (845 spheres, radii 8.4-16) around a sphere of radius
    # 8.5 pressed against larger ones, whose centre the reach overlooks from a neighbour's rising flank: the
    # reach share keeps it (one piece more, the sphere found); in 2D, where the reach is off, it has no effect.
    ("reach_share", 0.6, 0.6, None, ((256, 256, 256), 845, (8.4, 16), 26035, np.s_[0:64, 37:101, 94:158]),
     dict(min_distance=4, max_radius=16.0, min_size=65), 1),
])
def test_3d_defaults_keep_a_spheres_second_maximum_from_splitting_it(tmp_path, option, value_3d, value_2d, off,
                                                                     volume, kwargs, pieces):
    """The 3D defaults of the peak rules, each on a volume where it alone decides one sphere, and the 2D ones.

    neck_ratio 'auto' (0.95 in 3D): a large sphere pressed by its neighbours can hold two distance-map maxima a
    dip of a few percent apart; nearby_ratio 'auto' (0.8 in 3D): a lower peak that deep inside a higher one's
    inscribed ball is a second maximum of the same sphere, since solid particles cannot put a centre there;
    peak_reach 'auto' (0.7 in 3D): a maximum that a higher voxel overlooks from within 0.7 of its own height
    is no centre; ball_share 'auto' (0.5 in 3D): a maximum where spheres meet, which keeps less than half its
    inscribed ball from its neighbours, is no centre. Here each of these 3D defaults keeps one piece fewer
    than the run without it (``off``); reach_share 'auto' (0.6) keeps one more, a small sphere's centre that
    the reach overlooked; each scores higher against the ground truth (the 113 spheres of the second volume
    exactly), in memory and chunked alike. In 2D the neck (0.97), nearby and reach (off) defaults, set for
    particles of a projection that overlap, keep the pieces that the 3D value would join or drop; the ball
    share is 0.5 there too, and changes the 2D image; the reach share acts only with the reach, off in 2D.
    A bad value gets the one-line error."""
    from gpu_pipeline.metrics import evaluate
    from gpu_pipeline.stages.components import relabel_by_first_voxel

    shape, n, radius, seed, box = volume
    image, truth = make_touching_particles(shape, n, radius_range=radius, overlap=0.15, seed=seed)
    image, truth = np.ascontiguousarray(image[box]), relabel_by_first_voxel(truth[box])
    default, alone = separate(image, **kwargs), separate(image, **{option: off}, **kwargs)
    assert default.tobytes() == separate(image, **{option: value_3d}, **kwargs).tobytes()
    assert int(default.max()) == int(alone.max()) + pieces
    assert evaluate(default, truth)["f1_50"] > evaluate(alone, truth)["f1_50"]
    if option == "nearby_ratio":
        assert int(default.max()) == int(truth.max()) and evaluate(default, truth)["f1_50"] == 1.0
    labels, _ = separate_chunked(da.from_array(image, chunks=image.shape[0] // 2),
                                 workspace=Workspace(tmp_path / "w"), **kwargs)
    assert labels.compute().tobytes() == default.tobytes()

    # (Seed 7: an image where each 2D value changes the labels.)
    flat, _ = make_touching_particles((200, 200), 60, radius_range=(6, 15), overlap=0.15, seed=7)
    other = separate(flat, **{option: off if value_2d == value_3d else value_3d}, **kwargs)
    plain = separate(flat, **{option: value_2d}, **kwargs)
    assert separate(flat, **kwargs).tobytes() == plain.tobytes()
    assert (plain.tobytes() == other.tobytes()) == (option == "reach_share")
    for bad in ("loose", 1.5):
        with pytest.raises(DeclumpError, match=f"{option} must be 'auto', a number in"):
            separate(flat, **{option: bad}, **kwargs)


@pytest.mark.parametrize("shape, chunks, pixels, step", [
    ((64, 64, 64), "32,32,32", None, 1),     # the middle plane starts a block
    ((80, 64, 64), "32,32,32", None, 1),     # ... lies inside one
    ((96, 160), "32,64", None, 1),           # 2D: the whole image, short blocks
    ((96, 160), "32,64", 96 * 160 // 4, 2),  # above a (lowered) pixel budget: every 2nd pixel
    ((80, 64, 64), "32,32,32", 22 * 22, 3)])  # every 3rd, which does not divide the 32-voxel blocks
def test_chunked_overlay_is_the_in_memory_overlay_of_the_sampled_plane(tmp_path, rng, monkeypatch, shape, chunks,
                                                                        pixels, step):
    """The preview assembled from the output pass's blocks is the in-memory run's picture of the same labels.
    A plane of more than PREVIEW_PIXELS (a 2D montage, a large volume's middle plane) is drawn every k-th pixel
    per axis, the smallest k within the budget, on the volume's grid whatever the blocks: the overlay of the
    sampled image and labels, not the whole plane held in the command's process."""
    from PIL import Image

    from gpu_pipeline.chunked import run
    from gpu_pipeline.cli import main
    from gpu_pipeline.overlay import overlay_rgb

    if pixels is not None:
        monkeypatch.setattr(run, "PREVIEW_PIXELS", pixels)
    image, _ = make_touching_particles(shape, 12 * len(shape), seed=int(rng.integers(1e6)))
    src = tmp_path / "in.zarr"
    zarr.create_array(str(src), shape=image.shape, dtype=image.dtype, chunks=(32,) * len(shape))[...] = image
    out = tmp_path / "out.zarr"
    assert main(["run", str(src), str(out), "--max-radius", "13", "--chunks", chunks, "--quiet",
                 *CHUNKED_OPTIONS]) == 0
    labels = zarr.open_array(str(out / "particles" / "0"), mode="r")[...]
    assert labels.tobytes() == separate(image, max_radius=13).tobytes() and labels.max() > 1
    if len(shape) == 3:
        image, labels = image[shape[0] // 2], labels[shape[0] // 2]
    assert run.preview_stride(image.shape) == step
    picture = np.asarray(Image.open(tmp_path / "out_overlay.png"))
    assert picture.shape == (*(-(-n // step) for n in image.shape), 3)
    assert np.array_equal(picture, overlay_rgb(image[::step, ::step], labels[::step, ::step]))


def test_a_blocks_part_of_the_preview_plane_holds_only_that_plane(rng):
    """The output pass's results stay in memory until the pass ends: a block's part of the preview must not
    be a view that keeps its whole block alive (8 MB of labels per 128^3 block for 64 KB of plane)."""
    from gpu_pipeline.chunked.run import _block_outputs

    labels = rng.integers(0, 5, (8, 16, 12)).astype(np.int32)
    image = rng.integers(0, 255, labels.shape).astype(np.uint8)
    origin, plane_labels, plane_image = _block_outputs(labels, image, [8, 0, 24], plane=10)["plane"]
    assert origin == [0, 24] and np.array_equal(plane_labels, labels[2]) and np.array_equal(plane_image, image[2])
    assert plane_labels.base is None and plane_image.base is None
    assert _block_outputs(labels, image, [16, 0, 24], plane=10)["plane"] is None
    whole = _block_outputs(labels[0], image[0], [0, 24], plane=None)["plane"]  # 2D: the whole block
    assert whole[0] == [0, 24] and np.array_equal(whole[1], labels[0]) and whole[1].base is None
    # Sampled every 3rd pixel of the volume's grid: rows 6, 9, ... and columns 24, 27, ... of the volume.
    origin, plane_labels, _ = _block_outputs(labels, image, [8, 5, 24], plane=10, stride=3)["plane"]
    assert origin == [2, 8] and np.array_equal(plane_labels, labels[2, 1::3, 0::3]) and plane_labels.base is None


def test_cli_run_writes_ome_zarr_labels_and_parquet_table(tmp_path, rng):
    from gpu_pipeline.cli import main

    spacing = (2.0, 1.0, 1.0)
    image, _ = make_touching_particles((32, 64, 64), 40, spacing=spacing, seed=int(rng.integers(1e6)))
    src = _ome_zarr(tmp_path / "in.zarr", image, spacing, (16, 32, 32))
    out = tmp_path / "out.zarr"
    command = ["run", str(src), str(out), "--max-radius", "13", "--chunks", "16,32,32", "--quiet", *CHUNKED_OPTIONS]
    assert main(command) == 0
    expected = separate(image, spacing=spacing, max_radius=13)
    labels = zarr.open_array(str(out / "particles" / "0"), mode="r")
    assert labels.chunks == (16, 32, 32) and labels[...].tobytes() == expected.tobytes()
    # The table from per-chunk partial sums equals the in-memory one.
    pq = pytest.importorskip("pyarrow.parquet")
    table = pq.read_table(tmp_path / "out_particles.parquet").to_pydict()
    reference = particle_table(expected, image, spacing)
    assert set(table) == set(reference)
    for column, values in reference.items():
        np.testing.assert_allclose(table[column], values, rtol=1e-12, err_msg=column)
    # The size histogram beside the overlay is the in-memory run's picture of the same diameters.
    from gpu_pipeline.plots import png_bytes, size_histogram_rgb

    histogram = (tmp_path / "out_histogram.png").read_bytes()
    assert histogram == png_bytes(size_histogram_rgb(table["equivalent_diameter"]))
    summary = json.loads((tmp_path / "out_summary.json").read_text())
    assert summary["n_particles"] == expected.max() and not (tmp_path / "out.zarr.work").exists()
    assert zarr.open_group(str(out), mode="r").attrs["declump"]["complete"] is True
    # ome-zarr's own reader finds the label image with its spacing.
    ome_reader = pytest.importorskip("ome_zarr.reader")
    from ome_zarr.io import parse_url

    nodes = list(ome_reader.Reader(parse_url(str(out)))())
    label_node = next(node for node in nodes if any(type(s).__name__ == "Label" for s in node.specs))
    scale = label_node.metadata["coordinateTransformations"][0][0]["scale"]
    assert scale == list(spacing) and np.array_equal(np.asarray(label_node.data[0]), expected)
    # The same command again: already complete, nothing recomputed; other parameters: refused.
    assert main(command) == 0
    with pytest.raises(DeclumpError, match="other parameters"):
        run_chunked(src, out, chunks=(16, 32, 32), max_radius=13, sigma=2.0, verbose=False)


def test_without_a_spacing_in_memory_and_chunked_runs_measure_in_px_and_write_no_ngff_unit(tmp_path, rng):
    """A volume without a spacing (an .npy, a plain Zarr array): both runs' summaries say "px" and their
    histograms' axes too; neither writes "px" as an OME-Zarr axis unit (not one of NGFF's units), and a
    store's own unit still is written."""
    from gpu_pipeline.cli import main
    from gpu_pipeline.plots import png_bytes, size_histogram_rgb

    image, _ = make_touching_particles((32, 48, 48), 25, radius_range=(4, 7), seed=int(rng.integers(1e6)))
    np.save(tmp_path / "in.npy", image)
    zarr.open_group(str(tmp_path / "in.zarr"), mode="w").create_array(
        "0", shape=image.shape, dtype=image.dtype, chunks=(16, 48, 48))[...] = image
    for source, out in (("in.npy", "memory.zarr"), ("in.zarr/0", "chunked.zarr")):
        assert main(["run", str(tmp_path / source), str(tmp_path / out), "--quiet"]) == 0
        stem = tmp_path / out.replace(".zarr", "")
        summary = json.loads(Path(f"{stem}_summary.json").read_text())
        assert summary["unit"] == "px", out
        axes = zarr.open_group(str(tmp_path / out / "particles"), mode="r").attrs["multiscales"][0]["axes"]
        assert all("unit" not in axis for axis in axes), out
        table = (pytest.importorskip("pyarrow.parquet").read_table(f"{stem}_particles.parquet").to_pydict()
                 if Path(f"{stem}_particles.parquet").exists()
                 else {"equivalent_diameter": np.loadtxt(f"{stem}_particles.csv", delimiter=",", skiprows=1,
                                                         usecols=_csv_column(f"{stem}_particles.csv",
                                                                             "equivalent_diameter"))})
        assert Path(f"{stem}_histogram.png").read_bytes() == png_bytes(
            size_histogram_rgb(table["equivalent_diameter"], unit="px")), out
    nm = _ome_zarr(tmp_path / "nm.zarr", image, (1.0, 1.0, 1.0), (16, 48, 48))
    group = zarr.open_group(str(nm), mode="a")
    ome = group.attrs["ome"]
    for axis in ome["multiscales"][0]["axes"]:
        axis["unit"] = "nanometer"
    group.attrs["ome"] = ome
    assert main(["run", str(nm), str(tmp_path / "nm_out.zarr"), "--quiet"]) == 0
    axes = zarr.open_group(str(tmp_path / "nm_out.zarr" / "particles"), mode="r").attrs["multiscales"][0]["axes"]
    assert [axis.get("unit") for axis in axes] == ["nanometer"] * 3


def _csv_column(path, name):
    return Path(path).read_text().splitlines()[0].split(",").index(name)


def test_every_chunk_of_the_labels_is_written_background_only_ones_too(tmp_path, rng):
    """Chunks of the output that hold no particle are written like the others (Zarr skips a chunk equal to
    the fill value unless told otherwise, after comparing it with it): the finished labels read back with
    ``missing_chunks="error"``, where a missing chunk then always means a damaged store. It skipped them."""
    from gpu_pipeline.chunked.source import open_volume

    image, truth = make_touching_particles((32, 64, 32), 20, seed=int(rng.integers(1e6)))
    background = int(np.median(image[truth == 0]))
    image = np.pad(image, ((0, 0), (0, 0), (0, 32)), constant_values=background)  # right half: no particles
    src = _ome_zarr(tmp_path / "in.zarr", image, (1.0, 1.0, 1.0), (32, 32, 32))
    out = tmp_path / "out.zarr"
    run_chunked(src, out, chunks=(32, 32, 32), max_radius=13, verbose=False)
    expected = separate(image, spacing=(1.0, 1.0, 1.0), max_radius=13)
    assert expected.max() > 5 and not expected[:, :, 32:].any()
    labels, _ = open_volume(out / "particles" / "0", missing_chunks="error", accept_bool=True)
    assert labels.compute().tobytes() == expected.tobytes()
    chunk_files = [f for f in (out / "particles" / "0").rglob("*") if f.is_file() and not f.name.startswith(".z")]
    assert len(chunk_files) == 4, sorted(str(f.relative_to(out)) for f in chunk_files)
    # The in-memory command's Zarr output too (chunks of 256 voxels an edge at most: three of 32x64x256 here,
    # the last two without a particle).
    from gpu_pipeline.io import write_labels

    padded = np.zeros((32, 64, 600), np.int32)
    padded[:, :, :64] = expected
    write_labels(tmp_path / "memory.zarr", padded)
    labels, _ = open_volume(tmp_path / "memory.zarr" / "particles" / "0", missing_chunks="error", accept_bool=True)
    assert labels.compute().tobytes() == padded.tobytes()


def test_output_opens_in_napari_reader_plugin(tmp_path, rng):
    """napari's OME-Zarr reader plugin (where installed; not in CI) gives a labels layer with the spacing."""
    napari_ome_zarr = pytest.importorskip("napari_ome_zarr", reason="napari-ome-zarr is not installed")
    spacing = (2.0, 1.0, 1.0)
    image, _ = make_touching_particles((24, 48, 40), 20, spacing=spacing, seed=int(rng.integers(1e6)))
    out = tmp_path / "out.zarr"
    run_chunked(_ome_zarr(tmp_path / "in.zarr", image, spacing, (12, 24, 20)), out, chunks=(12, 24, 20), max_radius=13,
                verbose=False)
    layers = napari_ome_zarr.napari_get_reader(str(out))(str(out))
    (data, kwargs, kind), = layers
    assert kind == "labels" and list(kwargs["scale"]) == list(spacing)
    assert np.array_equal(np.asarray(data[0]), separate(image, spacing=spacing, max_radius=13))


def _markers(path):
    return len(os.listdir(path)) if path.exists() else 0


def _kill_when(process, done, count, deadline=240):
    """SIGKILL ``process`` by PID once ``done`` holds ``count`` block markers; returns the markers seen then."""
    end = time.time() + deadline
    while _markers(done) < count and process.poll() is None and time.time() < end:
        time.sleep(0.02)
    assert process.poll() is None, "the run finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    return _markers(done)


def _not_complete(tmp_path):
    assert not (tmp_path / "out_summary.json").exists()
    if (tmp_path / "out.zarr").exists():
        assert zarr.open_group(str(tmp_path / "out.zarr"), mode="r").attrs["declump"]["complete"] is False


def test_sigkill_twice_then_rerun_gives_identical_output_with_fewer_chunks(tmp_path, rng):
    spacing = (1.0, 1.0, 1.0)
    image, _ = make_touching_particles((48, 96, 96), 120, spacing=spacing, seed=int(rng.integers(1e6)))
    src = _ome_zarr(tmp_path / "in.zarr", image, spacing, (24, 24, 24))
    command = [sys.executable, "-m", "gpu_pipeline", "run", str(src), str(tmp_path / "out.zarr"), "--max-radius",
               "13", "--chunks", "24,24,24", "--workers", "1", "--quiet", *CHUNKED_OPTIONS]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    split = tmp_path / "out.zarr.work" / "pieces.done"
    first = _kill_when(subprocess.Popen(command, env=env), split, 6)
    _not_complete(tmp_path)
    # Killed again, in a row, while resuming.
    _kill_when(subprocess.Popen(command, env=env), split, first + 4)
    _not_complete(tmp_path)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "out_summary.json").read_text())
    computed, total = summary["blocks_computed"], summary["blocks_total"]
    print("blocks computed after two SIGKILLs:", computed, "of", total)
    assert computed.get("smoothed", 0) == 0 and computed["regions"] == 0 and computed["pieces"] <= total["pieces"] - first - 4
    expected = separate(image, spacing=spacing, max_radius=13)
    assert zarr.open_array(str(tmp_path / "out.zarr" / "particles" / "0"))[...].tobytes() == expected.tobytes()
    assert not (tmp_path / "out.zarr.work").exists()


def test_a_worker_killed_midway_changes_nothing(tmp_path, rng):
    distributed = pytest.importorskip("distributed")
    spacing = (1.0, 1.0, 1.0)
    image, _ = make_touching_particles((48, 96, 96), 120, spacing=spacing, seed=int(rng.integers(1e6)))
    src = _ome_zarr(tmp_path / "in.zarr", image, spacing, (24, 24, 24))
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as lc, \
            distributed.Client(lc) as client:
        failure = []

        def run():
            try:
                run_chunked(src, tmp_path / "out.zarr", chunks=(24, 24, 24), max_radius=13,
                            scheduler=lc.scheduler_address, verbose=False)
            except BaseException as exc:  # reported below
                failure.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        split = tmp_path / "out.zarr.work" / "pieces.done"
        deadline = time.time() + 240
        while _markers(split) < 4 and thread.is_alive() and time.time() < deadline:
            time.sleep(0.02)
        assert thread.is_alive(), "the run finished before a worker could be killed"
        # (client.run asks every worker; scheduler_info() falls back, when the scheduler does not answer in
        # time on a loaded machine, to a cached identity without workers.)
        pids = client.run(os.getpid)
        os.kill(pids[sorted(pids)[0]], signal.SIGKILL)
        thread.join(600)
        assert not failure, failure
    expected = separate(image, spacing=spacing, max_radius=13)
    assert zarr.open_array(str(tmp_path / "out.zarr" / "particles" / "0"))[...].tobytes() == expected.tobytes()


def test_bad_chunked_inputs_get_one_line_errors(tmp_path, rng):
    image, _ = make_touching_particles((40, 64, 64), 30, seed=int(rng.integers(1e6)))
    src = _ome_zarr(tmp_path / "in.zarr", image, (1.0, 1.0, 1.0), (20, 32, 32))
    (tmp_path / "plain").mkdir()
    cases = [
        (dict(input_path=tmp_path / "missing.zarr"), "does not exist"),
        (dict(input_path=tmp_path / "plain"), "not a Zarr store"),
        (dict(input_path=src, chunks=(8, 8, 8)), "smaller than the distance-transform and peak halo"),
        (dict(input_path=src, gpu_threads=2), "--gpu-threads 2 applies to --device gpu"),
    ]
    for kwargs, message in cases:
        with pytest.raises(DeclumpError, match=message) as info:
            run_chunked(output=tmp_path / "out.zarr", max_radius=10, verbose=False, **kwargs)
        assert "\n" not in str(info.value)
        assert not (tmp_path / "out.zarr").exists() and not (tmp_path / "out.zarr.work").exists()
    # An output that exists and is not declump's is left alone.
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    with pytest.raises(DeclumpError, match="not written by declump"):
        run_chunked(src, tmp_path / "other.zarr", max_radius=10, verbose=False)
    # A corrupt chunk is named.
    chunk_files = sorted(p for p in (src / "0").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk_files[-1].write_bytes(b"not a chunk")
    with pytest.raises(DeclumpError, match=r"chunk \(\d+, \d+, \d+\) of .* could not be read"):
        run_chunked(src, tmp_path / "bad.zarr", chunks=(20, 32, 32), max_radius=10, verbose=False)
    assert not (tmp_path / "bad_summary.json").exists()


def test_chunks_below_the_feature_halo_leave_no_work_folder_behind(tmp_path, rng):
    """Chunks that hold the distance transform's halo but not the pixel classifier's were refused only after
    the work folder held the run's intensity limits: the corrected command was then refused as "an unfinished
    run with other parameters" until --overwrite."""
    from gpu_pipeline.classifier import classes_from_instances, train_classifier

    image, truth = make_touching_particles((40, 64, 64), 30, seed=int(rng.integers(1e6)))
    src = _ome_zarr(tmp_path / "in.zarr", image, (1.0, 1.0, 1.0), (20, 32, 32))
    model = train_classifier(image, classes_from_instances(truth), n_estimators=2).save(tmp_path / "m.npz")
    with pytest.raises(DeclumpError, match="smaller than the pixel-feature halo"):
        run_chunked(src, tmp_path / "out.zarr", chunks=(20, 32, 32), max_radius=6, classifier=model, verbose=False)
    assert not (tmp_path / "out.zarr").exists() and not (tmp_path / "out.zarr.work").exists()
    # Chunks below both halos were refused by the distance transform's, the smaller: the corrected command was
    # then refused by the features'. The message names the largest halo the run needs.
    with pytest.raises(DeclumpError, match=r"chunks of 8 voxels .* smaller than the pixel-feature halo") as refused:
        run_chunked(src, tmp_path / "out.zarr", chunks=(8, 8, 8), max_radius=6, classifier=model, verbose=False)
    assert "distance-transform" not in str(refused.value)
    assert not (tmp_path / "out.zarr").exists() and not (tmp_path / "out.zarr.work").exists()
    assert run_chunked(src, tmp_path / "out.zarr", chunks=(40, 64, 64), max_radius=6, classifier=model,
                       verbose=False)["n_particles"] > 0


def test_every_pass_is_logged_with_its_tasks_and_an_interval_holding_them(cluster_client, tmp_path, rng):
    """The DEBUG records that bench.pass_timeline reads: one per pass, in order, none overlapping, each with
    the number of tasks it ran (the 8 blocks in groups of 2, 2, 1, 1, 1, 1 on the two threads; one per run
    of blocks along the last axis for the components passes, 4, too few to group; one per group of blocks
    for the necks, and one histogram), and every task the workers ran for the run inside its pass's
    interval."""
    import logging

    from distributed import get_task_stream

    from gpu_pipeline.chunked.workspace import pass_log

    image, _ = make_touching_particles((40, 64, 64), 30, seed=int(rng.integers(1e6)))
    src = _ome_zarr(tmp_path / "in.zarr", image, (1.0, 1.0, 1.0), (20, 32, 32))
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    def clock_errors():  # each worker's estimate of its offset to the scheduler's clock: 0 on one machine
        return list(cluster_client.run(lambda dask_worker: abs(dask_worker.scheduler_delay)).values())

    handler, level = Keep(logging.DEBUG), pass_log.level
    pass_log.addHandler(handler)
    pass_log.setLevel(logging.DEBUG)
    errors = clock_errors()
    try:
        with get_task_stream(cluster_client) as stream:
            run_chunked(src, tmp_path / "out.zarr", chunks=(20, 32, 32), max_radius=10,
                        scheduler=cluster_client.scheduler.address, verbose=False)
    finally:
        pass_log.removeHandler(handler)
        pass_log.setLevel(level)
    errors += clock_errors()
    names = [r.what for r in records]
    assert names[:5] == ["smoothed", "histogram", "sides", "regions", "distance transform + peak candidates"]
    assert names[-2:] == ["pieces", "write labels + particle table"], names
    blocks = 8
    for r in records:
        assert r.start <= r.end
        if r.what in ("smoothed", "regions", "write labels + particle table"):
            assert r.tasks == blocks - 2, (r.what, r.tasks)
        if r.what in ("sides", "pieces"):
            assert r.tasks == blocks // 2, (r.what, r.tasks)  # 2 blocks along the last axis
        if r.what in ("histogram", "necks between peaks"):  # BLOCK_GROUP blocks per task: the 8 in one
            assert r.tasks == 1, (r.what, r.tasks)
    assert "necks between peaks" in names
    assert all(a.end <= b.start for a, b in zip(records, records[1:]))
    # Task times come from the workers, moved onto the scheduler's clock by their estimate of its offset,
    # from a heartbeat's round trip: on one machine that moves them by the estimate's error, tens of
    # milliseconds on a loaded machine (30 ms seen; more than 50 once, in a CI run beside other jobs). The
    # slack is 50 ms beyond the largest estimate the workers held before and after the run.
    slack = 0.05 + max(errors)
    outside = [(t["key"], d) for t in stream.data for d in t["startstops"] if d["action"] == "compute"
               and not any(r.start - slack <= d["start"] and d["stop"] <= r.end + slack for r in records)]
    assert not outside, outside


def test_a_task_error_on_a_cluster_stops_the_run_with_its_one_line_message(cluster_client, tmp_path, rng):
    """A corrupt chunk read by a worker process: the run stops with the worker's error (not a Dask traceback,
    not a hang), writes no summary, and a good run on the same cluster still returns every block's result."""
    image, _ = make_touching_particles((40, 64, 64), 30, seed=int(rng.integers(1e6)))
    src = _ome_zarr(tmp_path / "in.zarr", image, (1.0, 1.0, 1.0), (20, 32, 32))
    address = cluster_client.scheduler.address
    run_chunked(src, tmp_path / "good.zarr", chunks=(20, 32, 32), max_radius=10, scheduler=address, verbose=False)
    expected = separate(image, spacing=(1.0, 1.0, 1.0), max_radius=10)
    assert zarr.open_array(str(tmp_path / "good.zarr" / "particles" / "0"))[...].tobytes() == expected.tobytes()
    chunk_files = sorted(p for p in (src / "0").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk_files[len(chunk_files) // 2].write_bytes(b"not a chunk")
    with pytest.raises(DeclumpError, match=r"chunk \(\d+, \d+, \d+\) of .* could not be read") as info:
        run_chunked(src, tmp_path / "bad.zarr", chunks=(20, 32, 32), max_radius=10, scheduler=address, verbose=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "bad_summary.json").exists()


def test_grouped_calls_on_a_cluster_send_their_arrays_scattered_not_in_the_graph(cluster_client, rng,
                                                                                  monkeypatch):
    """run_grouped on a cluster (the neck pass's segment ends): results in order, equal to the calls made
    here; large arrays (17 MB together) reach the workers scattered, in one round trip, not in a graph Dask
    warns about; small ones (at most SCATTER_BYTES together) ride in the tasks, with no scatter."""
    import warnings

    from gpu_pipeline.chunked.workspace import SCATTER_BYTES, active_client, run_grouped

    assert active_client() is cluster_client
    scatters = []
    real = cluster_client.scatter

    def counted(*args, **kwargs):  # the real scatter, counted
        scatters.append(len(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(cluster_client, "scatter", counted)
    # Integers: their sums are exact (a float sum's last bit follows the array's alignment, which differs on the
    # worker: 342463.8278772783 against ...844 with DECLUMP_TEST_SEED 1).
    arrays = [rng.integers(0, 2 ** 20, int(rng.integers(600_000, 800_000))) for _ in range(3)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sums = run_grouped(np.sum, [(a,) for a in arrays], "sums", group=2)
    assert sums == [np.sum(a) for a in arrays]
    assert not [w for w in caught if "large graph" in str(w.message)], [str(w.message) for w in caught]
    assert scatters == [3]
    small = [rng.integers(0, 2 ** 20, int(rng.integers(1000, 5000))) for _ in range(5)]
    assert sum(a.nbytes for a in small) <= SCATTER_BYTES
    assert run_grouped(np.sum, [(a,) for a in small], "sums", group=2) == [np.sum(a) for a in small]
    assert scatters == [3]


def test_local_threads_are_used_while_the_caller_holds_a_client(cluster_client, tmp_path, rng, monkeypatch):
    """run_chunked's local threads (no --scheduler) stay local when the caller's process holds a default client
    (a notebook's): every pass runs in this process, as dask.compute would with that scheduler setting."""
    import dask

    from gpu_pipeline.chunked import workspace

    assert workspace.active_client() is cluster_client
    with dask.config.set(scheduler="threads"):
        assert workspace.active_client() is None
    image, _ = make_touching_particles((40, 64, 64), 30, seed=int(rng.integers(1e6)))
    src = _ome_zarr(tmp_path / "in.zarr", image, (1.0, 1.0, 1.0), (20, 32, 32))
    seen = []
    real = workspace.active_client

    def recorded():
        seen.append(real())
        return seen[-1]

    monkeypatch.setattr(workspace, "active_client", recorded)  # what every pass and global step asks
    run_chunked(src, tmp_path / "out.zarr", chunks=(20, 32, 32), max_radius=10, workers=1, verbose=False)
    assert len(seen) > 5 and all(client is None for client in seen)


def test_workers_killed_for_memory_stop_the_run_in_one_line_and_it_resumes(cluster_client, tmp_path, rng):
    """A real worker death: a cluster whose one worker may hold 200 MiB (Dask's nanny restarts it past 95 %)
    given a 256^3 block (hundreds of MiB). The run stops with one line naming the pass and --chunks, not
    Dask's KilledWorker, and marks nothing complete; the same call on a cluster with memory then finishes
    with the in-memory labels."""
    import dask
    import distributed
    import zarr

    image, _ = make_touching_particles((256, 256, 256), 1200, seed=int(rng.integers(1e6)))
    src = tmp_path / "in.zarr"
    zarr.create_array(str(src), shape=image.shape, dtype=image.dtype, chunks=image.shape)[...] = image
    small = {"distributed.scheduler.allowed-failures": 0, "distributed.worker.memory.target": False,
             "distributed.worker.memory.spill": False, "distributed.worker.memory.pause": False}
    with dask.config.set(small), \
            distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, memory_limit="200MiB",
                                     dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        with pytest.raises(DeclumpError, match=r"Dask workers died running a task of the pass '[^']+' \(1 try") \
                as info:
            run_chunked(src, tmp_path / "out.zarr", max_radius=13, scheduler=client.scheduler.address,
                        verbose=False)
    assert "\n" not in str(info.value) and "smaller --chunks" in str(info.value)
    assert not (tmp_path / "out_summary.json").exists()
    run_chunked(src, tmp_path / "out.zarr", max_radius=13, scheduler=cluster_client.scheduler.address,
                verbose=False)
    expected = separate_in_memory(image, spacing=(1.0, 1.0, 1.0), max_radius=13, **CHUNKED_DEFAULTS)
    assert zarr.open_array(str(tmp_path / "out.zarr" / "particles" / "0"))[...].tobytes() == expected.tobytes()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_voxel_in_a_chunked_float_volume_is_refused(tmp_path, rng, bad):
    """One NaN (or inf) voxel in a chunk that is not the first: the run stops with one line naming it, whether
    the range comes from the staging pass (a folder) or from a pass of its own (the Python API without one)."""
    image, _ = make_touching_particles((40, 64, 64), 30, seed=int(rng.integers(1e6)))
    image = image.astype(np.float32)
    image[30, 50, 40] = bad
    src = _ome_zarr(tmp_path / "in.zarr", image, (1.0, 1.0, 1.0), (20, 32, 32))
    with pytest.raises(DeclumpError, match="NaN or inf") as info:
        run_chunked(src, tmp_path / "out.zarr", chunks=(20, 32, 32), max_radius=10, verbose=False)
    assert "\n" not in str(info.value) and not (tmp_path / "out_summary.json").exists()
    with pytest.raises(DeclumpError, match="NaN or inf"):
        separate_chunked(da.from_array(image, chunks=(20, 32, 32)), max_radius=10)


def test_cluster_results_cross_the_network_once(cluster_client):
    """run_tasks fetches each finished task's result from its worker once, as the tasks finish (it fetched
    every result twice, one round trip at a time: a check for errors, then the return value)."""
    from dask import delayed

    from gpu_pipeline.chunked.workspace import run_tasks

    def sent():
        return sum(cluster_client.run(lambda dask_worker: dask_worker.transfer_outgoing_bytes_total).values())

    tasks = [delayed(np.full)(1 << 17, float(k), pure=False) for k in range(6)]  # 1 MiB each
    before = sent()
    results = run_tasks(tasks, "test")
    assert [float(r[0]) for r in results] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert sent() - before == 6 * (1 << 20)


def test_the_client_of_a_cluster_run_never_starts_the_compiler(tmp_path, rng):
    """In a chunked run on a cluster the compiled kernels run on the workers only: the client (a fresh
    process, as every `declump run --scheduler` is) never imports Numba, whose start took about 0.35 s of
    every command while the workers waited. Its labels are the in-memory ones."""
    pytest.importorskip("distributed")
    import zarr

    image, _ = make_touching_particles((40, 48, 44), 30, seed=int(rng.integers(1e6)))
    zarr.create_array(str(tmp_path / "in.zarr"), shape=image.shape, dtype=image.dtype, chunks=(20, 24, 22))[...] = image
    code = f"""
import sys
from dask.distributed import LocalCluster
from gpu_pipeline.chunked.run import run_chunked
if __name__ == "__main__":
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        run_chunked({str(tmp_path / "in.zarr")!r}, {str(tmp_path / "out.zarr")!r}, max_radius=13,
                    scheduler=cluster.scheduler_address, verbose=False)
    print(sorted(m for m in sys.modules if m == "numba" or m.startswith("numba.")))
"""
    (tmp_path / "client.py").write_text(code)
    done = subprocess.run([sys.executable, str(tmp_path / "client.py")], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
    written = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")["particles"]["0"][...]
    assert written.tobytes() == separate(image, max_radius=13).tobytes()


def test_small_arrays_are_quantised_by_the_expression_the_compiled_pass_equals(rng):
    from gpu_pipeline.stages.peaks import COMPILED_QUANTIZE_MIN, QUANTUM_DIVISOR, quantize_distance

    spacing = (2.0, 0.7, 0.7)
    quantum = 0.7 / QUANTUM_DIVISOR
    halves = (np.arange(40, dtype=np.float64) + 0.5) * quantum  # exactly between two multiples: half to even
    values = np.concatenate([rng.uniform(0, 30, COMPILED_QUANTIZE_MIN), halves]).astype(np.float32)
    whole, q = quantize_distance(values, spacing)  # the compiled pass
    assert q == quantum
    for piece in (values[:5], values[-40:], values[:COMPILED_QUANTIZE_MIN - 1]):
        small, _ = quantize_distance(piece, spacing)
        assert small.dtype == np.int32
        assert np.array_equal(small, np.rint(piece.astype(np.float64) / quantum).astype(np.int32))
    assert np.array_equal(whole[:5], quantize_distance(values[:5], spacing)[0])
    assert np.array_equal(whole[-40:], quantize_distance(values[-40:], spacing)[0])


def test_peak_halo_follows_the_parameters():
    assert peak_halo(4.0, 13.0, (2.0, 1.0, 1.0)) == (2 + 7, 4 + 13, 4 + 13)
    assert peak_halo(4.0, 13.0, (1.0, 1.0)) == (17, 17)
    # The peak reach of the highest possible peak (0.7 x 13 = 9.1 physical: the whole voxels it reads, 4 and 9)
    # where it is wider than the window.
    assert peak_halo(4.0, 13.0, (2.0, 1.0, 1.0), 0.7) == (4 + 7, 9 + 13, 9 + 13)
    assert peak_halo(4.0, 16.0, (1.0, 1.0, 1.0), 0.7) == (11 + 16,) * 3


@pytest.mark.parametrize("spacing, max_radius, ratio", [((2.0, 1.0, 1.0), 13.0, 0.7), ((1.0, 1.0, 1.0), 16.0, 0.7),
                                                        ((3.0, 1.0, 1.5), 20.0, 0.9), ((1.0, 1.0), 9.5, 0.8)])
def test_peak_look_out_is_the_farthest_offset_the_reach_reads(spacing, max_radius, ratio):
    """A chunk's peak look-out (peak_reach_voxels) is, per axis, the farthest offset within_reach reads for
    the highest possible peak (value at the cap) or the window, whichever is wider: no less (peaks would
    depend on the chunking), no more (a wider halo than needed)."""
    from gpu_pipeline.chunked.pipeline import peak_reach_voxels
    from gpu_pipeline.stages.peaks import PeakReach, reach_offset_shells, window_half_widths

    half = window_half_widths(4.0, spacing)
    highest = PeakReach(ratio, spacing, max_radius)
    read = np.concatenate([o for o, _ in reach_offset_shells(highest, highest.cap_q, half)])
    farthest = np.abs(read).max(axis=0)
    assert tuple(int(max(h, f)) for h, f in zip(half, farthest)) == peak_reach_voxels(half, max_radius, spacing,
                                                                                       ratio)
    assert peak_halo(4.0, 5.0, (1.0, 1.0), 0.7) == (4 + 5, 4 + 5)


@pytest.mark.parametrize("margin", [None, 2.0])
def test_compiled_block_assignment_equals_the_array_path(margin):
    """The CPU's compiled per-chunk assignment gives each voxel the array path's centroid (the GPU's and the
    reference), for blocks at any origin, including voxels that fall back to their region's full list."""
    from gpu_pipeline.chunked.pipeline import _assign_block_array, _assign_block_compiled, _assign_compiled_into
    from gpu_pipeline.stages.split import kmeans_seeds, peaks_per_region

    rng = np.random.default_rng(11)
    for ndim, shape in ((2, (70, 90)), (3, (30, 34, 38))):
        mask = ndi.binary_dilation(rng.random(shape) < 0.02, iterations=4)
        regions, n = ndi.label(mask)
        inside = np.argwhere(mask)
        peaks = inside[rng.choice(len(inside), size=min(60, len(inside)), replace=False)]
        peaks = np.unique(peaks, axis=0)
        radii = rng.uniform(1.0, 4.0, size=len(peaks))
        peak_region, _ = peaks_per_region(regions, n, peaks)
        seeds = kmeans_seeds(peak_region, n, peaks, radii, margin=margin)
        spacing = (1.0,) * ndim if ndim == 2 else (2.0, 1.0, 1.0)
        centres = seeds.centres + rng.normal(0, 0.3, seeds.centres.shape)   # after a Lloyd update
        for origin_step in (7, 13):
            starts = [range(0, s, origin_step * (a + 1)) for a, s in enumerate(shape)]
            for origin in itertools.product(*starts):
                block = regions[tuple(slice(o, o + 17) for o in origin)]
                flat_c, chosen_c = _assign_block_compiled(block, seeds, centres, spacing, origin)
                flat_a, chosen_a = _assign_block_array(block, seeds, centres, spacing, origin)
                np.testing.assert_array_equal(flat_c, flat_a)
                np.testing.assert_array_equal(chosen_c, chosen_a)
                # The split's compiled pass writes each voxel's label in place: the array path's labels.
                value = rng.permutation(1000)[:len(seeds.centres)] + n + 1
                expected = block.astype(np.int32)
                expected.ravel()[flat_a] = value[chosen_a]
                written = block.astype(np.int32)
                _assign_compiled_into(block, seeds, centres, spacing, origin, written, value)
                np.testing.assert_array_equal(written, expected)


def test_parquet_table_round_trips_every_column_kind(tmp_path, rng):
    """Numeric columns go to Arrow through their buffers (strided and big-endian ones included), others as before."""
    pq = pytest.importorskip("pyarrow.parquet")
    from gpu_pipeline.chunked.run import write_parquet

    n = int(rng.integers(5, 50))
    table = {"count": rng.integers(1, 1000, 2 * n)[::2], "diameter": rng.random(n).astype(np.float32),
             "big_endian": rng.integers(-5, 5, n).astype(">i4"), "flag": rng.random(n) > 0.5,
             "intensity": rng.random(n)}
    write_parquet(table, tmp_path / "t.parquet")
    read = pq.read_table(tmp_path / "t.parquet").to_pydict()
    assert list(read) == list(table)
    for name, values in table.items():
        assert read[name] == values.tolist(), name


def _in_fresh_glibc_process(code, *args, **environ):
    """``code`` run in a fresh interpreter without the caller's ``MALLOC_*`` variables (plus ``environ``): its
    stdout, stripped. Skips where the C library is not glibc (``code`` prints "not glibc", or loading
    ``libc.so.6`` fails); a failure of ``code`` fails the test."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}, **environ}
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env)
    if "libc.so.6" in done.stderr or done.stdout.strip() == "not glibc":
        pytest.skip("glibc's malloc only (another C library here)")
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


#: The preamble of the :func:`_in_fresh_glibc_process` codes that call ``mallopt``.
_GLIBC_ONLY = """from gpu_pipeline.chunked.workspace import _glibc
if _glibc("mallopt") is None:
    print("not glibc")
    raise SystemExit
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc arenas: Linux only")
@pytest.mark.parametrize("cap", [None, 1, 2])
def test_malloc_arenas_are_capped_at_the_worker_threads(tmp_path, cap):
    """glibc's own report (malloc_info) after six threads allocated: one arena per thread by default, at most
    ``cap`` after limit_malloc_arenas(cap), which chunked runs call with their worker-thread count."""
    code = f"""
import ctypes, sys, threading
import numpy as np
from gpu_pipeline.chunked.workspace import limit_malloc_arenas
if {cap!r} is not None:
    assert limit_malloc_arenas({cap!r})
def work():
    for _ in range(20):
        np.ones(300_000).sum()
threads = [threading.Thread(target=work) for _ in range(6)]
[t.start() for t in threads]
[t.join() for t in threads]
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
fp = libc.fopen(sys.argv[1].encode(), b"w")
libc.malloc_info(0, ctypes.c_void_p(fp))
libc.fclose(ctypes.c_void_p(fp))
"""
    report = tmp_path / "malloc.xml"
    _in_fresh_glibc_process(_GLIBC_ONLY + code, report)
    arenas = report.read_text().count("<heap nr=")
    if cap is None:
        assert arenas > 2, arenas
    else:
        assert 1 <= arenas <= cap, arenas


def _chunk_sized_allocation_is_mmapped(nbytes=8 << 20):
    """In this process: does glibc serve an ``nbytes`` array with a fresh mmap (fresh pages, page faults on
    every use) rather than from its heap? ``mallinfo2().hblkhd``: the bytes in mmapped blocks."""
    import ctypes

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                         "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Mallinfo2
    before = libc.mallinfo2().hblkhd
    block = np.ones(nbytes // 8)
    grown = libc.mallinfo2().hblkhd - before
    del block
    return grown >= nbytes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc: Linux only")
def test_cluster_workers_reuse_freed_chunk_memory_instead_of_dasks_64k_trim():
    """Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which fixes glibc's mmap threshold at
    128 KiB: every chunk-sized temporary is a fresh mmap. The run's engine sets the workers it starts
    (--cluster local) and the workers of a running cluster (--scheduler) to reuse freed memory instead."""
    distributed = pytest.importorskip("distributed")
    import ctypes

    if not hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2"):
        pytest.skip("glibc without mallinfo2 (before 2.33)")
    from gpu_pipeline.chunked.run import engine

    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as lc, \
            distributed.Client(lc) as plain:
        assert list(plain.run(_chunk_sized_allocation_is_mmapped).values()) == [True]  # Dask's default
        with engine(scheduler=lc.scheduler_address) as client:
            assert list(client.run(_chunk_sized_allocation_is_mmapped).values()) == [False]
            # ... and a 256^3 block's float64 temporary, above glibc's 32 MiB ceiling for its mmap threshold.
            assert list(client.run(_chunk_sized_allocation_is_mmapped, 100 << 20).values()) == [False]
    with engine(cluster="local", workers=2) as client:
        # One arena from the worker's start (an arena made before a mallopt stays); the thresholds may come from
        # this process's environment, where the nanny above left Dask's 64 KiB (it takes precedence), and are set
        # again in the running worker.
        assert list(client.run(lambda: os.environ.get("MALLOC_ARENA_MAX")).values()) == ["1", "1"]
        assert list(client.run(_chunk_sized_allocation_is_mmapped).values()) == [False, False]
        assert list(client.run(_chunk_sized_allocation_is_mmapped, 100 << 20).values()) == [False, False]


def _timed_diagnostics(dask_worker=None, dask_scheduler=None):
    """A server's dashboard diagnostics on timers: is its profiler on, and the periods (ms) of its system
    monitor and event-loop tick."""
    server = dask_worker if dask_worker is not None else dask_scheduler
    callbacks = server.periodic_callbacks
    return ("profile" in callbacks, callbacks["monitor"].callback_time, callbacks["tick"].callback_time)


def test_clusters_a_run_starts_run_without_the_dashboards_timed_diagnostics():
    """A worker's profiler samples its task threads every 10 ms, and every server reads its system monitor
    every 0.5 s and times its loop every 20 ms: CPU taken from the tasks on the same cores, for a dashboard
    that the clusters a run starts do not have. Their workers and scheduler run with the profiler off and
    the others slowed (QUIET_DIAGNOSTICS); the settings stay with that cluster."""
    distributed = pytest.importorskip("distributed")
    import dask

    from gpu_pipeline.chunked.run import engine

    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as lc, \
            distributed.Client(lc) as plain:
        assert list(plain.run(_timed_diagnostics).values()) == [(True, 500, 20)]  # as Dask starts a worker
    with engine(cluster="local", workers=2) as client:
        assert list(client.run(_timed_diagnostics).values()) == [(False, 2000, 500)] * 2
        assert client.run_on_scheduler(_timed_diagnostics)[1:] == (2000, 500)
    assert dask.config.get("distributed.worker.profile.enabled") is True


def _new_array_advised_huge():
    """Does a new 64 MiB NumPy array's mapping carry the huge-page advice (``hg`` in /proc/self/smaps)?"""
    array = np.ones(1 << 23)
    address, flags, inside = array.ctypes.data + array.nbytes // 2, None, False  # NumPy advises the aligned middle
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and line.startswith("VmFlags:"):
                flags = line.split()[1:]
                break
    return "hg" in flags


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps: Linux only")
@pytest.mark.parametrize("variable", [None, "1"])
def test_commands_and_workers_allocate_without_numpys_huge_page_advice(tmp_path, variable, monkeypatch):
    """NumPy advises huge pages for every large array, and with the kernel's default THP defrag each fault in
    one then compacts memory: a declump command turns that off for its process and its cluster's workers,
    unless NUMPY_MADVISE_HUGEPAGE is set (then NumPy's choice stands)."""
    np.save(tmp_path / "a.npy", np.arange(12, dtype=np.int32).reshape(3, 4))
    code = ("import sys\nsys.path.insert(0, %r)\nfrom test_chunked_pipeline import _new_array_advised_huge as advised\n"
            "from gpu_pipeline.cli import main\nbefore = advised()\n"
            "assert main(['evaluate', %r, %r]) == 0\nprint(before, advised())"
            % (str(Path(__file__).parent), str(tmp_path / "a.npy"), str(tmp_path / "a.npy")))
    env = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    if variable is not None:
        env["NUMPY_MADVISE_HUGEPAGE"] = variable
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    before, after = done.stdout.split()[-2:]
    if before == "False":
        pytest.skip("NumPy does not advise huge pages on this system (kernel without transparent huge pages)")
    assert after == ("True" if variable == "1" else "False")
    if variable is None:
        distributed = pytest.importorskip("distributed")
        from gpu_pipeline.chunked.run import engine

        # A nanny started earlier in this process may have left its workers' variables here.
        monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE", raising=False)
        with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                      dashboard_address=None) as lc, distributed.Client(lc) as plain:
            assert list(plain.run(_new_array_advised_huge).values()) == [True]  # a worker as Dask starts it
            with engine(scheduler=lc.scheduler_address) as client:
                assert list(client.run(_new_array_advised_huge).values()) == [False]
        with engine(cluster="local", workers=1) as client:
            assert list(client.run(_new_array_advised_huge).values()) == [False]


@pytest.mark.parametrize("skip", [False, True])
def test_objects_alive_at_exit_are_frozen_after_the_other_exit_hooks(skip):
    """skip_exit_collection: at exit, after the hooks registered later (which run first: they flush logs and
    remove temporary folders), gc.freeze takes the objects still alive out of the final collections; without
    it nothing is frozen. The process still exits cleanly, with its output flushed."""
    code = ("import atexit, gc\n"
            "atexit.register(lambda: print('last', gc.get_freeze_count() > 0, flush=True))\n"
            "from gpu_pipeline.chunked.workspace import skip_exit_collection\n"
            + ("skip_exit_collection()\nskip_exit_collection()\n" if skip else "")
            + "atexit.register(lambda: print('first', gc.get_freeze_count(), flush=True))\n"
            "cycle = [open(__import__('os').devnull, 'w')]; cycle.append(cycle)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.split() == ["first", "0", "last", str(skip)]


def test_workers_a_command_starts_skip_the_exit_collection():
    """The worker processes of a cluster the command starts (engine(cluster="local")) have the exit hook of
    skip_exit_collection, as the command's own process has: the command waits for them to end."""
    pytest.importorskip("distributed")
    from gpu_pipeline.chunked.run import engine

    with engine(cluster="local", workers=1) as client:
        assert list(client.run(_exit_collection_is_skipped).values()) == [True]


def _dies_once(marker, values):
    """Ends its worker's process the first time (as the kernel's OOM killer would), then sums ``values``."""
    if not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)
    return int(values.sum())


def test_a_global_step_survives_the_death_of_the_worker_holding_its_data(tmp_path):
    """run_call scatters its arrays to one worker; that worker killed with the call lost them, and the run ended
    with a CommClosedError traceback or "lost the Dask scheduler" while the scheduler ran on. The call is sent
    again to the workers left (the nanny restarts the killed one) and the run goes on."""
    distributed = pytest.importorskip("distributed")
    from gpu_pipeline.chunked.workspace import run_call

    values = np.arange(1 << 18, dtype=np.int64)  # 2 MiB: scattered (smaller arrays ride in the task)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=50) as lc, distributed.Client(lc):
        assert run_call(_dies_once, str(tmp_path / "died"), values) == int(values.sum())
    assert (tmp_path / "died").exists()


def _exit_collection_is_skipped():
    from gpu_pipeline.chunked import workspace

    return workspace._exit_collection_skipped


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/environ: Linux only")
@pytest.mark.parametrize("at_start", [False, True])
def test_numpys_huge_page_switch_is_the_users_only_when_set_at_start(at_start):
    """NumPy reads NUMPY_MADVISE_HUGEPAGE when imported; a value that appears later (Dask's nanny writes its
    workers' variables into the process that starts them) is not the user's choice and does not stop
    no_hugepage_advice."""
    code = ("import os\nfrom gpu_pipeline.chunked.workspace import no_hugepage_advice\n"
            "os.environ['NUMPY_MADVISE_HUGEPAGE'] = '0'\nprint(no_hugepage_advice())")
    env = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    if at_start:
        env["NUMPY_MADVISE_HUGEPAGE"] = "1"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(not at_start)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc: Linux only")
@pytest.mark.parametrize("capped", [False, True])
def test_memory_freed_between_blocks_is_reused_without_page_faults(capped):
    """A block's temporaries (here 24 arrays of 3 MiB, 72 MiB: more than the trim threshold) freed and the next
    block's allocated: with limit_malloc_arenas the heap keeps most of the freed pages (the pad) and the next
    block reuses them, with few page faults; with glibc's adaptive thresholds it trims them, and every 4 KiB
    page of the next block faults again."""
    code = _GLIBC_ONLY + f"""
import resource
import numpy as np
from gpu_pipeline.chunked.workspace import limit_malloc_arenas
if {capped!r}:
    assert limit_malloc_arenas(1)
def block():
    arrays = [np.ones(3 << 17) for _ in range(24)]  # 3 MiB each, every page touched
    del arrays
block()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    pages = 24 * (3 << 20) // 4096
    faults = int(_in_fresh_glibc_process(code))
    if capped:
        assert faults < pages // 4, (faults, pages)
    else:  # the reference: without the setting the same block faults on (nearly) every page
        assert faults > pages // 2, (faults, pages)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc: Linux only")
@pytest.mark.parametrize("setup", ["run", "arena per thread", "none"])
def test_large_block_temporaries_are_reused_from_every_thread(setup):
    """A 256^3 block's float64 temporaries (here 100 and 40 MiB, above glibc's 32 MiB ceiling for its mmap
    threshold) freed by two worker threads and allocated again: with the run's setting (run_malloc_setup: no
    mmap, one arena) the second round reuses the heap's pages; with an arena per thread (the setting before)
    the second thread's arena, built of 64 MiB heaps, serves them from fresh mmaps, and with glibc's own
    settings every array is one: a page fault on every 4 KiB."""
    code = _GLIBC_ONLY + f"""
import resource, threading
import numpy as np
from gpu_pipeline.chunked.workspace import limit_malloc_arenas, run_malloc_setup
if {setup!r} == "run":
    assert run_malloc_setup()
elif {setup!r} == "arena per thread":
    assert limit_malloc_arenas(2)
def block():
    arrays = [np.ones(100 << 17), np.ones(40 << 17)]  # every page touched
    del arrays
def both():
    for thread in [threading.Thread(target=block) for _ in range(2)]:
        thread.start()
        thread.join()
both()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
both()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    # NumPy's huge-page advice off, as in the run (no_hugepage_advice): faults are then counted in 4 KiB pages.
    pages = 2 * (140 << 20) // 4096
    faults = int(_in_fresh_glibc_process(code, NUMPY_MADVISE_HUGEPAGE="0"))
    if setup == "run":
        assert faults < pages // 10, (faults, pages)
    else:
        assert faults > pages // 3, (faults, pages)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc: Linux only")
def test_freed_heap_memory_goes_back_to_the_os_before_the_output_stage():
    """128 MiB of small heap blocks freed under one block still in use stay resident (glibc trims only the top
    of the heap by itself); return_freed_memory, which a chunked run calls before writing its outputs, hands
    their pages back."""
    code = _GLIBC_ONLY + """
from gpu_pipeline.chunked.workspace import limit_malloc_arenas, return_freed_memory
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024
limit_malloc_arenas(1)
blocks = [bytearray(65536) for _ in range(2048)]
keep = blocks[-1]
del blocks
before = rss()
assert return_freed_memory()
print(before - rss())
"""
    handed_back = _in_fresh_glibc_process(code)
    assert float(handed_back) > 64, handed_back  # MiB handed back of the 128 freed


def test_chunk_tasks_run_the_distance_transform_on_one_thread_each(monkeypatch, rng):
    """Dask runs one task per core; a task's distance transform on every core as well would put cores^2
    threads on them. The chunked tasks ask the transform for one thread, an in-memory run for every usable
    core. The chunk task's function is called here, in this process: a cluster left
    running by another test would run the passes' tasks out of this process's sight."""
    from cpu_fallback import kernels
    from gpu_pipeline._common import usable_cores
    from gpu_pipeline.chunked.pipeline import _capped_distance_q

    asked = []
    real = kernels.distance_transform

    def recording(*args, threads=1, **kwargs):
        asked.append(threads)
        return real(*args, threads=threads, **kwargs)

    monkeypatch.setattr(kernels, "distance_transform", recording)
    image, _ = make_touching_particles((40, 48, 44), 25, radius_range=(5, 9), seed=int(rng.integers(1e6)))
    separate(image, max_radius=MAX_RADIUS)
    assert asked and set(asked) == {usable_cores()}
    asked.clear()
    regions = (image > image.mean()).astype(np.int32)
    _capped_distance_q(regions, (1.0, 1.0, 1.0), MAX_RADIUS)
    assert asked == [1]


@pytest.mark.parametrize("ndim", [2, 3])
def test_sharded_staged_stores_give_the_same_labels(monkeypatch, rng, tmp_path, ndim):
    """Staged stores hold one shard per processing block, split into inner chunks, so a block read with its
    halo decodes only the inner chunks it touches. Small inner chunks here (the default, 64^3, exceeds these
    test blocks): the labels still equal in-memory ones for every chunking, the regions (read with halos) are
    stored in one shard per block, the stores read block by block are not."""
    from gpu_pipeline.chunked import workspace as ws

    monkeypatch.setattr(ws, "INNER_CHUNK_VOXELS", 4 ** 3)
    shape, spacing, n, chunkings = CASES[ndim]
    image, _ = make_touching_particles(shape, n, radius_range=(5, 12), spacing=spacing,
                                       seed=int(rng.integers(1e6)))
    expected = separate(image, spacing=spacing, max_radius=MAX_RADIUS)
    sharded = 0
    for chunks in chunkings:
        folder = tmp_path / "x".join(map(str, chunks))
        labels, _ = separate_chunked(da.from_array(image, chunks=chunks), spacing=spacing, max_radius=MAX_RADIUS,
                                     workspace=Workspace(folder))
        assert labels.compute().tobytes() == expected.tobytes(), chunks
        regions = zarr.open_array(str(folder / "regions.zarr"), mode="r")  # read with halos: sharded
        inner = ws.inner_chunk(chunks)
        assert regions.shards == (tuple(chunks) if inner != tuple(chunks) else None), chunks
        assert regions.chunks == inner and all(c % i == 0 and c // i >= 3 for c, i in zip(chunks, inner) if c != i)
        sharded += inner != tuple(chunks)
        for name in ("distance", "pieces"):  # read block by block: whole blocks
            store = zarr.open_array(str(folder / f"{name}.zarr"), mode="r")
            assert store.shards is None and store.chunks == tuple(chunks), (name, chunks)
    assert sharded >= 2


def test_relative_paths_on_a_running_cluster_started_elsewhere(tmp_path, rng, monkeypatch):
    """`declump run in.zarr out.zarr --scheduler ADDR` from one folder, on workers started in another: every
    path the workers' tasks use names the command's folder, not theirs."""
    distributed = pytest.importorskip("distributed")
    spacing = (1.0, 1.0, 1.0)
    image, _ = make_touching_particles((48, 64, 64), 60, spacing=spacing, seed=int(rng.integers(1e6)))
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    _ome_zarr(here / "in.zarr", image, spacing, (24, 32, 32))
    monkeypatch.chdir(elsewhere)  # the worker processes start here and keep this folder
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as lc:
        monkeypatch.chdir(here)
        run_chunked("in.zarr", "out.zarr", chunks=(24, 32, 32), max_radius=13, scheduler=lc.scheduler_address,
                    scratch="work", verbose=False)
    expected = separate(image, spacing=spacing, max_radius=13)
    assert zarr.open_array(str(here / "out.zarr" / "particles" / "0"))[...].tobytes() == expected.tobytes()
    assert json.loads((here / "out_summary.json").read_text())["n_particles"] == int(expected.max())
    assert list(elsewhere.iterdir()) == []


def test_separate_chunked_checks_its_arrays_and_takes_a_workspace_path(tmp_path, rng):
    """A NumPy volume or mask, a list and a workspace given as a path were AttributeErrors; a mask of another
    shape ran (labels of the mask's shape) and a complex one was "no particles found"."""
    import dask.array as da

    image, _ = make_touching_particles((32, 48, 48), 12, seed=int(rng.integers(1e6)))
    volume = da.from_array(image, chunks=(16, 24, 24))
    for kwargs, message in [(dict(volume=image), "takes Dask arrays, got a ndarray as the volume"),
                            (dict(volume=image.tolist()), "takes Dask arrays, got a list"),
                            (dict(volume=volume, mask=image > 100), "got a ndarray as the mask"),
                            (dict(volume=volume, mask=da.ones((16, 48, 48), chunks=16)), "mask shape"),
                            (dict(volume=volume, mask=da.zeros(image.shape, chunks=16, dtype=complex)), "dtype")]:
        with pytest.raises(DeclumpError, match=message):
            separate_chunked(max_radius=8, **kwargs)
    labels, _ = separate_chunked(volume, max_radius=8, workspace=str(tmp_path / "work"))
    expected = separate_in_memory(image, sigma=1.0, threshold="otsu", min_distance=4.0, max_hole_size=0,
                                  min_size=None, max_radius=8)
    assert np.array_equal(labels.compute(), expected)


def test_the_command_s_chunked_defaults_are_voxels_of_the_finest_axis(tmp_path, rng, capsys):
    """`declump run in.zarr out.zarr` with --sigma and --min-distance unset used 1 and 4 in the store's unit: on a
    store calibrated at 3 nm a third of a pixel and 1.3 pixels (215 particles for 35). They are voxels of the
    finest axis now: the same labels as the uncalibrated store's, and a note saying what they are."""
    from gpu_pipeline.cli import main

    image, _ = make_touching_particles((24, 64, 64), 20, radius_range=(5, 9), seed=int(rng.integers(1e6)))
    _ome_zarr(tmp_path / "nm.zarr", image, (6.0, 3.0, 3.0), (24, 32, 32))
    _ome_zarr(tmp_path / "px.zarr", image, (2.0, 1.0, 1.0), (24, 32, 32))
    for name, radius in (("nm", "39"), ("px", "13")):
        assert main(["run", str(tmp_path / f"{name}.zarr"), str(tmp_path / f"{name}_out.zarr"), "--max-radius",
                     radius, "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "--sigma 1 voxels = 3, --min-distance 4 voxels = 12" in err and err.count("declump: at spacing") == 1
    parameters = {n: json.loads((tmp_path / f"{n}_out_summary.json").read_text())["parameters"] for n in ("nm", "px")}
    assert (parameters["nm"]["sigma"], parameters["nm"]["min_distance"]) == (3.0, 12.0)
    assert (parameters["px"]["sigma"], parameters["px"]["min_distance"]) == (1.0, 4.0)
    nm, px = (zarr.open_array(str(tmp_path / f"{n}_out.zarr" / "particles" / "0"))[...] for n in ("nm", "px"))
    assert px.max() > 5 and nm.tobytes() == px.tobytes()


def test_a_chunked_2d_run_says_what_it_does_not_do_that_memory_does(tmp_path, rng, capsys):
    """The README said a chunked run rejects no annotations "and prints a line saying so"; its note named the
    fixed sigma, threshold and sizes only. A 2D run now says that it removes no annotations and keeps the
    threshold's outlines, for the options left at auto; 3D runs and runs that set both say nothing of it."""
    from gpu_pipeline.cli import main

    plane, _ = make_touching_particles((96, 96), 12, seed=int(rng.integers(1e6)))
    volume, _ = make_touching_particles((24, 48, 48), 8, seed=int(rng.integers(1e6)))
    _ome_zarr(tmp_path / "plane.zarr", plane, (1.0, 1.0), (48, 48))
    _ome_zarr(tmp_path / "volume.zarr", volume, (1.0, 1.0, 1.0), (24, 48, 48))
    options = ["--max-radius", "12", "--device", "cpu"]
    for given, expected in (([], ["--reject-annotations auto", "--outline auto"]),
                            (["--outline", "threshold"], ["--reject-annotations auto"]),
                            (["--reject-annotations", "off", "--outline", "threshold"], [])):
        capsys.readouterr()
        out = tmp_path / f"p{len(given)}.zarr"
        assert main(["run", str(tmp_path / "plane.zarr"), str(out), *options, *given]) == 0
        said = [line for line in capsys.readouterr().err.splitlines() if "unlike a 2D image in memory" in line]
        assert len(said) == (1 if expected else 0), (given, said)
        for option in expected:
            assert option in said[0], (given, said)
        if said:
            assert ("--outline auto" in said[0]) == ("--outline auto" in expected)
    assert main(["run", str(tmp_path / "volume.zarr"), str(tmp_path / "v.zarr"), *options]) == 0
    assert "unlike a 2D image" not in capsys.readouterr().err


def test_labels_keep_the_image_s_offset_and_pyramid(tmp_path, rng):
    """NGFF labels sit on their image: the image's translation and as many levels as it has ("the two datasets
    series MUST have the same number of entries"). The labels had level 0 alone, without the translation, so a
    viewer drew them 100 um off the image. Level i is every factor-th voxel of level 0 (ids are not averaged)."""
    image, _ = make_touching_particles((24, 64, 64), 20, radius_range=(5, 9), seed=int(rng.integers(1e6)))
    group = zarr.open_group(str(tmp_path / "img.zarr"), mode="w", zarr_format=2)
    datasets = []
    for i, step in enumerate((1, 2, 4)):
        group.create_array(str(i), shape=image[:, ::step, ::step].shape, dtype=image.dtype,
                           chunks=(24, 32, 32))[...] = image[:, ::step, ::step]
        datasets.append({"path": str(i), "coordinateTransformations": [
            {"type": "scale", "scale": [2.0, 1.0 * step, 1.0 * step]}, {"type": "translation", "translation": [100.0, 0, 50]}]})
    group.attrs["multiscales"] = [{"version": "0.4", "datasets": datasets, "axes": [
        {"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"]}]
    run_chunked(tmp_path / "img.zarr", tmp_path / "out.zarr", max_radius=13, verbose=False)
    out = zarr.open_group(str(tmp_path / "out.zarr" / "particles"), mode="r")
    written = out.attrs["multiscales"][0]["datasets"]
    assert [d["coordinateTransformations"] for d in written] == [d["coordinateTransformations"] for d in datasets]
    base = out["0"][...]
    assert base.tobytes() == separate(image, spacing=(2.0, 1.0, 1.0), max_radius=13).tobytes()
    for i, step in enumerate((1, 2, 4)):
        assert np.array_equal(out[str(i)][...], base[:, ::step, ::step]), i
    # Levels that are no whole-number steps of level 0: one level, as before (and no made-up pyramid).
    datasets[1]["coordinateTransformations"][0]["scale"] = [2.0, 1.5, 1.5]
    group.attrs["multiscales"] = [{"version": "0.4", "datasets": datasets, "axes": [
        {"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"]}]
    run_chunked(tmp_path / "img.zarr", tmp_path / "odd.zarr", max_radius=13, verbose=False)
    odd = zarr.open_group(str(tmp_path / "odd.zarr" / "particles"), mode="r")
    assert len(odd.attrs["multiscales"][0]["datasets"]) == 1 and "1" not in odd
    # Multiscales that name no axes (NGFF before 0.4) are read as the last of t, c, z, y, x, as the input
    # itself is: the labels' levels had a scale of no numbers ("scale": []), which no reader takes back.
    datasets[1]["coordinateTransformations"][0]["scale"] = [2.0, 2.0, 2.0]
    group.attrs["multiscales"] = [{"version": "0.3", "datasets": datasets}]
    run_chunked(tmp_path / "img.zarr", tmp_path / "plain.zarr", max_radius=13, verbose=False)
    plain = zarr.open_group(str(tmp_path / "plain.zarr" / "particles"), mode="r")
    assert [d["coordinateTransformations"] for d in plain.attrs["multiscales"][0]["datasets"]] == \
        [d["coordinateTransformations"] for d in datasets]


def test_axes_named_twice_are_refused_and_a_unit_that_is_no_name_is_not_copied(tmp_path, capsys):
    """NGFF axes z, z, z ran as z, y, x; a unit of 5 went into the labels' axes as it was."""
    from gpu_pipeline.cli import main

    group = zarr.open_group(str(tmp_path / "img.zarr"), mode="w", zarr_format=2)
    image, _ = make_touching_particles((24, 48, 48), 8, radius_range=(5, 8), seed=3)
    group.create_array("0", shape=image.shape, dtype=image.dtype, chunks=image.shape)[...] = image
    datasets = [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0]}]}]
    group.attrs["multiscales"] = [{"version": "0.4", "datasets": datasets,
                                   "axes": [{"name": "z", "type": "space"}] * 3}]
    assert main(["run", str(tmp_path / "img.zarr"), str(tmp_path / "a.zarr"), "--quiet", "--max-radius", "9"]) == 2
    assert "each at most once" in capsys.readouterr().err
    group.attrs["multiscales"] = [{"version": "0.4", "datasets": datasets,
                                   "axes": [{"name": n, "type": "space", "unit": 5} for n in "zyx"]}]
    assert main(["run", str(tmp_path / "img.zarr"), str(tmp_path / "b.zarr"), "--quiet", "--max-radius", "9"]) == 0
    written = zarr.open_group(str(tmp_path / "b.zarr" / "particles"), mode="r").attrs["multiscales"][0]["axes"]
    assert [a.get("unit") for a in written] == [None] * 3


@pytest.mark.parametrize("broken", ["a string", {"datasets": []}, [3], [{"datasets": []}], [{"axes": []}],
                                    [{"datasets": [{"path": "missing"}]}],
                                    [{"datasets": [{"path": "0", "coordinateTransformations": [
                                        {"type": "scale", "scale": None}]}]}]])
def test_malformed_multiscales_metadata_is_one_line_in_memory_and_chunked(tmp_path, broken, capsys):
    """Whatever the 'multiscales' entry holds instead of NGFF's list of levels, both runs say in one line that
    it cannot be read (the chunked run gave a TypeError, KeyError or IndexError traceback) and write nothing."""
    from gpu_pipeline.cli import main

    group = zarr.open_group(str(tmp_path / "img.zarr"), mode="w", zarr_format=2)
    group.create_array("0", shape=(16, 24, 24), dtype=np.uint8, chunks=(16, 24, 24))[...] = 7
    group.attrs["multiscales"] = broken
    for out in ("out.zarr", "out.npy"):
        assert main(["run", str(tmp_path / "img.zarr"), str(tmp_path / out), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("declump: error: ") and "\n" not in err and "cannot be read" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.zarr"]


def test_a_2d_image_stored_5d_runs_as_2d_and_one_plane_of_a_plain_array_is_refused(tmp_path, rng, capsys):
    """A 2D OME-Zarr stored (t, c, z, y, x) with z of size 1 (as bioformats2raw writes one) was refused in memory
    and ran chunked as a volume of one plane by the 3D rules (other particles than the same plane as 2D). It is
    2D now, in both; a plain (1, rows, columns) array, whose axes nobody named, is refused in both."""
    import tifffile

    from gpu_pipeline.cli import main

    image, _ = make_touching_particles((96, 112), 14, radius_range=(5, 9), seed=int(rng.integers(1e6)))
    group = zarr.open_group(str(tmp_path / "five.zarr"), mode="w")
    group.create_array("0", shape=(1, 1, 1, *image.shape), dtype=image.dtype, chunks=(1, 1, 1, 48, 56))[...] = \
        image[None, None, None]
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": [
        {"name": "t", "type": "time"}, {"name": "c", "type": "channel"},
        *({"name": a, "type": "space", "unit": "micrometer"} for a in "zyx")], "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 0.5, 2.0, 2.0]}]}]}]}
    zarr.create_array(str(tmp_path / "plane.zarr"), shape=(1, *image.shape), dtype=image.dtype,
                      chunks=(1, 48, 56))[...] = image[None]
    options = ["--max-radius", "26", "--quiet", "--device", "cpu"]
    assert main(["run", str(tmp_path / "five.zarr"), str(tmp_path / "c.zarr"), *options]) == 0
    # What the chunked run fixes, at spacing 2: sigma 1 and min_distance 4 voxels, min size a disc of diameter 8.
    fixed = ["--sigma", "2", "--min-distance", "8", "--threshold", "otsu", "--max-hole-size", "0", "--min-size",
             repr(math.pi * 4 ** 2), "--reject-annotations", "off", "--outline", "threshold"]
    assert main(["run", str(tmp_path / "five.zarr"), str(tmp_path / "m.tif"), *options, *fixed]) == 0
    chunked = zarr.open_array(str(tmp_path / "c.zarr" / "particles" / "0"))[...]
    summary = json.loads((tmp_path / "c_summary.json").read_text())
    assert chunked.shape == image.shape and summary["spacing"] == [2.0, 2.0] and chunked.max() > 5
    assert chunked.tobytes() == tifffile.imread(tmp_path / "m.tif").astype(chunked.dtype).tobytes()
    capsys.readouterr()
    for out in ("p.zarr", "p.tif"):
        assert main(["run", str(tmp_path / "plane.zarr"), str(tmp_path / out), *options]) == 2, out
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and ("one voxel along an axis" in err or "one pixel along an axis" in err), err


def test_a_run_stopped_at_its_last_write_leaves_no_summary_and_the_same_call_finishes(tmp_path, rng, monkeypatch):
    """Ctrl-C just after the summary was written (before the labels' metadata) left the summary, table and overlay
    beside labels marked unfinished and without metadata: an output that looked complete. The summary is the
    last write now: stopped there, no summary, and the same call finishes the run."""
    import gpu_pipeline.chunked.run as run_module

    image, _ = make_touching_particles((24, 48, 48), 10, radius_range=(5, 8), seed=int(rng.integers(1e6)))
    src = _ome_zarr(tmp_path / "in.zarr", image, (1.0, 1.0, 1.0), (24, 48, 48))
    real = run_module.write_ngff_label_metadata

    def stopped(*args, **kwargs):  # Ctrl-C as the labels' metadata (and the completion mark) are written
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "write_ngff_label_metadata", stopped)
    with pytest.raises(KeyboardInterrupt):
        run_chunked(src, tmp_path / "out.zarr", max_radius=10, verbose=False)
    assert not (tmp_path / "out_summary.json").exists()
    monkeypatch.setattr(run_module, "write_ngff_label_metadata", real)
    summary = run_chunked(src, tmp_path / "out.zarr", max_radius=10, verbose=False)
    assert (tmp_path / "out_summary.json").exists() and summary["n_particles"] > 3
    labels = zarr.open_array(str(tmp_path / "out.zarr" / "particles" / "0"))[...]
    assert labels.tobytes() == separate(image, spacing=(1.0, 1.0, 1.0), max_radius=10).tobytes()
