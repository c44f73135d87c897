"""``declump batch``: many images, each exactly as ``declump run`` does it, on real files and a real Dask cluster."""
import csv
import json

import numpy as np
import pytest
import tifffile
from PIL import Image

from gpu_pipeline.cli import main
from gpu_pipeline.synthetic import make_touching_particles

OPTIONS = ["--sigma", "1", "--min-distance", "4", "--device", "cpu"]


def _images(folder, rng):
    """A uint8 PNG, a float32 .npy (2D), a 3D TIFF and a constant TIFF (which must fail), from fresh seeds."""
    folder.mkdir()
    a, _ = make_touching_particles((160, 192), 25, seed=int(rng.integers(1e6)))
    Image.fromarray(a).save(folder / "a.png")
    b, _ = make_touching_particles((128, 128), 18, seed=int(rng.integers(1e6)))
    np.save(folder / "b.npy", b.astype(np.float32) / 255)
    c, _ = make_touching_particles((24, 64, 64), 12, seed=int(rng.integers(1e6)))
    tifffile.imwrite(folder / "c.ome.tif", c, metadata={"axes": "ZYX"})
    tifffile.imwrite(folder / "flat.tif", np.full((64, 64), 9, np.uint8))
    (folder / "notes.txt").write_text("not an image")
    return {"a": folder / "a.png", "b": folder / "b.npy", "c": folder / "c.ome.tif"}


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_batch_equals_run_per_image_and_names_the_failed_one(tmp_path, rng, capsys):
    good = _images(tmp_path / "in", rng)
    out = tmp_path / "out"
    assert main(["batch", str(tmp_path / "in"), "--out", str(out), *OPTIONS]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    # A line per image as it finishes (in any order), then the failure again, as an error, and the count; the
    # file that is no image is named in a note (it was left out silently).
    notes = [line for line in lines if line.startswith("declump: note:")]
    assert len(notes) == 1 and "1 file of the folders is not an image declump reads" in notes[0] and "(.txt: 1;" in notes[0]
    lines = [line for line in lines if line not in notes]
    progress, err = lines[:4], lines[4:]
    assert {p.split(":")[1].strip() for p in progress} == {"a", "b", "c", "flat"}, lines
    flat = next(p for p in progress if p.startswith("declump: flat:"))  # with its cause (was "see the end")
    assert flat.startswith("declump: flat: failed: ") and "constant" in flat, flat
    assert len(err) == 2 and err[0].startswith(f"declump: error: {tmp_path / 'in' / 'flat.tif'}: ") and \
        "constant" in err[0], err
    assert err[1].startswith("declump: error: 1 of 4 images failed"), err
    summary = json.loads((out / "batch_summary.json").read_text())
    assert (summary["n_images"], summary["n_ok"], summary["n_failed"]) == (4, 3, 1)
    assert summary["left_out"] == [str(tmp_path / "in" / "notes.txt")]
    assert [r["status"] for r in summary["images"]] == ["ok", "ok", "ok", "error"]  # a, b, c, flat (name order)
    assert not any(p.name.startswith("flat") for p in out.iterdir())
    combined = _rows(out / "particles.csv")
    total = 0
    for name, path in good.items():
        # The same image through `declump run` gives the same labels and table.
        alone = tmp_path / "alone" / f"{name}.tif"
        assert main(["run", str(path), str(alone), *OPTIONS, "--quiet"]) == 0
        labels = tifffile.imread(out / f"{name}_labels.tif")
        assert labels.max() > 0 and np.array_equal(labels, tifffile.imread(alone))
        own = _rows(out / f"{name}_labels_particles.csv")
        assert own == _rows(alone.with_name(f"{name}_particles.csv"))
        # ... and its rows are in the combined table under its name, nothing added or lost.
        mine = [{k: v for k, v in row.items() if k != "image" and v != ""} for row in combined if row["image"] == name]
        assert mine == own
        record = next(r for r in summary["images"] if r["name"] == name)
        assert record["n_particles"] == int(labels.max())
        own_summary = json.loads((out / f"{name}_labels_summary.json").read_text())
        assert record["polarity"] == own_summary["polarity"] == "bright"
        assert record["particle_radius"] == own_summary["particle_radius"] and record["sigma"] == 1.0
        total += len(own)
    assert len(combined) == total == summary["n_particles"]
    assert {"area", "volume", "centroid_z"} <= set(combined[0])  # 2D and 3D images in one table


def test_a_folder_s_own_declump_results_are_not_taken_for_images(tmp_path, rng, capsys):
    """`declump run a.png a_labels.tif` written into the image folder: a batch of that folder runs a.png only,
    not the labels, overlay and histogram beside it."""
    good = _images(tmp_path / "in", rng)
    (tmp_path / "in" / "flat.tif").unlink()
    assert main(["run", str(good["a"]), str(tmp_path / "in" / "a_labels.tif"), *OPTIONS, "--quiet"]) == 0
    assert main(["batch", str(tmp_path / "in"), "--out", str(tmp_path / "out"), *OPTIONS, "--quiet"]) == 0
    summary = json.loads((tmp_path / "out" / "batch_summary.json").read_text())
    assert [r["name"] for r in summary["images"]] == ["a", "b", "c"]


def test_batch_on_a_local_cluster_of_processes_equals_threads(tmp_path, rng):
    import os

    good = _images(tmp_path / "in", rng)
    inputs = [str(good["a"]), str(good["c"])]
    assert main(["batch", *inputs, "--out", str(tmp_path / "threads"), *OPTIONS]) == 0
    environ = dict(os.environ)
    assert main(["batch", *inputs, "--out", str(tmp_path / "cluster"), "--cluster", "local", "--workers", "2",
                 *OPTIONS]) == 0
    # The workers' malloc settings (Dask's nanny sets them in the process that starts the cluster) do not stay
    # behind in this one, where later subprocesses would inherit them.
    assert dict(os.environ) == environ
    for name in ("a", "c"):
        threads = tifffile.imread(tmp_path / "threads" / f"{name}_labels.tif")
        assert threads.max() > 0
        assert np.array_equal(threads, tifffile.imread(tmp_path / "cluster" / f"{name}_labels.tif"))
    assert (tmp_path / "threads" / "particles.csv").read_text() == (tmp_path / "cluster" / "particles.csv").read_text()


@pytest.mark.parametrize("case,message", [
    ("missing", "does not exist"),
    ("empty", "holds no images"),
    ("out_is_input", "is also an input"),
    ("same_names", "inputs are named x"),
    ("out_is_file", "is a file"),
    ("engine_refused", "--gpu-threads 2 applies to --device gpu"),
])
def test_batch_refuses_bad_inputs_before_any_work(tmp_path, capsys, case, message):
    image, _ = make_touching_particles((64, 64), 5, seed=1)
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    tifffile.imwrite(tmp_path / "one" / "x.tif", image)
    Image.fromarray(image).save(tmp_path / "two" / "x.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    (tmp_path / "file.txt").write_text("")
    inputs, out = {"missing": ([tmp_path / "nowhere.tif"], tmp_path / "out"),
                   "empty": ([tmp_path / "empty"], tmp_path / "out"),
                   "out_is_input": ([tmp_path / "one"], tmp_path / "one"),
                   "same_names": ([tmp_path / "one", tmp_path / "two"], tmp_path / "out"),
                   "out_is_file": ([tmp_path / "one"], tmp_path / "file.txt"),
                   "engine_refused": ([tmp_path / "one"], tmp_path / "out")}[case]
    extra = ["--gpu-threads", "2"] if case == "engine_refused" else []
    assert main(["batch", *map(str, inputs), "--out", str(out), *OPTIONS, "--quiet", *extra]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("declump: error:") and message in lines[0], lines
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["x.tif"]


def test_batch_again_keeps_what_is_done_and_runs_what_changed(tmp_path, rng, capsys):
    """The same command resumes: an image whose outputs came from the same file and options is not run again;
    a touched file, a deleted summary (an interrupted image), other options or --overwrite run it again."""
    import os

    good = _images(tmp_path / "in", rng)
    (tmp_path / "in" / "flat.tif").unlink()
    out = tmp_path / "out"

    def batch(*extra):
        assert main(["batch", str(tmp_path / "in"), "--out", str(out), *OPTIONS, *extra]) == 0
        summary = json.loads((out / "batch_summary.json").read_text())
        return {r["name"]: bool(r.get("skipped")) for r in summary["images"]}, summary

    first, summary = batch()
    assert first == {"a": False, "b": False, "c": False}
    table = (out / "particles.csv").read_text()
    labels = {name: tifffile.imread(out / f"{name}_labels.tif") for name in good}
    again, summary_again = batch()
    assert again == {"a": True, "b": True, "c": True}
    assert (out / "particles.csv").read_text() == table and summary_again["n_particles"] == summary["n_particles"]
    assert "3 of 3 images were done before" in capsys.readouterr().err
    stat = good["b"].stat()
    os.utime(good["b"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file changed (a newer copy)
    (out / "c_labels_summary.json").unlink()  # c was interrupted before its summary
    assert batch()[0] == {"a": True, "b": False, "c": False}
    assert batch("--min-distance", "5")[0] == {"a": False, "b": False, "c": False}
    assert batch("--min-distance", "5", "--overwrite")[0] == {"a": False, "b": False, "c": False}
    batch()
    for name, expected in labels.items():
        assert np.array_equal(tifffile.imread(out / f"{name}_labels.tif"), expected)


def test_evaluate_folders_scores_a_batch_against_its_ground_truth(tmp_path, rng, capsys):
    """``declump evaluate OUT GT``: each image's scores as evaluate() gives them, pooled over every object; an
    image the batch could not run counts as nothing found."""
    from gpu_pipeline.metrics import evaluate

    (tmp_path / "in").mkdir()
    (tmp_path / "gt").mkdir()
    for name, n in (("p", 20), ("q", 14)):
        image, truth = make_touching_particles((128, 144), n, seed=int(rng.integers(1e6)))
        tifffile.imwrite(tmp_path / "in" / f"{name}.tif", image)
        tifffile.imwrite(tmp_path / "gt" / f"{name}.tif", truth)
    tifffile.imwrite(tmp_path / "in" / "r.tif", np.full((64, 64), 3, np.uint8))  # fails in the batch
    tifffile.imwrite(tmp_path / "gt" / "r.tif", make_touching_particles((64, 64), 4, seed=1)[1])
    assert main(["batch", str(tmp_path / "in"), "--out", str(tmp_path / "out"), *OPTIONS, "--quiet"]) == 2
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "out"), str(tmp_path / "gt"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    found = weight = 0.0
    for row in result["images"]:
        truth = tifffile.imread(tmp_path / "gt" / f"{row['image']}.tif")
        pred = (tifffile.imread(tmp_path / "out" / f"{row['image']}_labels.tif") if row["image"] != "r"
                else np.zeros_like(truth))
        scores = evaluate(pred, truth)
        assert (row["f1_50"], row["mean_f1"], row["n_pred"], row["n_gt"]) == \
            (scores["f1_50"], scores["mean_f1"], scores["n_pred"], scores["n_gt"])
        found += scores["f1_50"] * (scores["n_pred"] + scores["n_gt"])
        weight += scores["n_pred"] + scores["n_gt"]
    assert [row["image"] for row in result["images"]] == ["p", "q", "r"]
    assert result["pooled"]["without_prediction"] == ["r"] and result["images"][2]["f1_50"] == 0.0
    assert result["pooled"]["f1_50_pooled"] == pytest.approx(found / weight)
    assert 0.5 < result["images"][0]["f1_50"] <= 1.0
    # An image that failed in the folder's last batch, with an earlier batch's outputs of it still there: they
    # were scored beside the new run's without a word. It counts as nothing found, and the note says why.
    tifffile.imwrite(tmp_path / "out" / "r_labels.tif", make_touching_particles((64, 64), 4, seed=1)[1])
    assert main(["evaluate", str(tmp_path / "out"), str(tmp_path / "gt"), "--json"]) == 0
    stale = json.loads(capsys.readouterr().out)
    assert stale["images"] == result["images"] and stale["pooled"]["failed_in_batch"] == ["r"]
    assert main(["evaluate", str(tmp_path / "out"), str(tmp_path / "gt")]) == 0
    assert "failed in the last batch" in capsys.readouterr().err
    result["pooled"]["failed_in_batch"] = ["r"]
    # Ground truth named NAME_labels.* (as the shared embryo data) was matched to nothing: every image 0.
    for name in ("p", "q", "r"):
        (tmp_path / "gt" / f"{name}.tif").rename(tmp_path / "gt" / f"{name}_labels.tif")
    assert main(["evaluate", str(tmp_path / "out"), str(tmp_path / "gt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == result
    # Two ground-truth files of one name: which one is meant? (Both were scored, each object counted twice.)
    tifffile.imwrite(tmp_path / "gt" / "p_labels.tiff", tifffile.imread(tmp_path / "gt" / "p_labels.tif"))
    assert main(["evaluate", str(tmp_path / "out"), str(tmp_path / "gt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "p_labels.tif" in err and "same name" in err
    # NAME.* beside NAME_labels.* in the ground truth: both were matched with the prediction NAME and scored,
    # the image counted twice in the pooled figure.
    (tmp_path / "gt" / "p_labels.tiff").rename(tmp_path / "gt" / "p.tif")
    assert main(["evaluate", str(tmp_path / "out"), str(tmp_path / "gt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "p.tif" in err and "p_labels.tif" in err and "both matched" in err


def test_a_bug_in_one_image_is_that_image_s_error_and_the_batch_goes_on(tmp_path, rng, capsys, monkeypatch):
    """A 1-pixel-high image (since refused as bad input) raised a plain ValueError in one image: the batch
    stopped with a traceback and wrote neither its summary nor its table. An unexpected exception is now the
    image's error line, its traceback in the summary, and the other images' outputs are all there."""
    import gpu_pipeline.cli as cli

    _images(tmp_path / "in", rng)
    (tmp_path / "in" / "flat.tif").unlink()
    run_file = cli.run_file

    def buggy(args, input_path, output, device, **kwargs):
        if input_path.endswith("b.npy"):
            raise ZeroDivisionError("a bug")
        return run_file(args, input_path, output, device, **kwargs)

    monkeypatch.setattr(cli, "run_file", buggy)
    out = tmp_path / "out"
    assert main(["batch", str(tmp_path / "in"), "--out", str(out), *OPTIONS]) == 2
    err = capsys.readouterr().err
    assert "b.npy: unexpected ZeroDivisionError: a bug (a declump bug" in err and "Traceback" not in err
    summary = json.loads((out / "batch_summary.json").read_text())
    assert [(r["name"], r["status"]) for r in summary["images"]] == [("a", "ok"), ("b", "error"), ("c", "ok")]
    assert "ZeroDivisionError" in summary["images"][1]["traceback"]
    assert {row["image"] for row in _rows(out / "particles.csv")} == {"a", "c"}


def test_batch_runs_an_image_again_when_its_classifier_model_changed(tmp_path, rng, capsys):
    """The resume compared the --classifier's path only: a model retrained under the same name kept the
    outputs of the old one ("done before")."""
    image, truth = make_touching_particles((96, 96), 14, seed=int(rng.integers(1e6)))
    tifffile.imwrite(tmp_path / "train.tif", image)
    tifffile.imwrite(tmp_path / "truth.tif", truth)
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "a.tif", make_touching_particles((96, 96), 14, seed=int(rng.integers(1e6)))[0])
    model, out = tmp_path / "model.npz", tmp_path / "out"

    def train(trees):
        assert main(["train", str(tmp_path / "train.tif"), "--labels", str(tmp_path / "truth.tif"),
                     "--from-instances", "--out", str(model), "--trees", str(trees)]) == 0

    def batch():
        assert main(["batch", str(tmp_path / "in"), "--out", str(out), "--classifier", str(model), *OPTIONS]) == 0
        return json.loads((out / "batch_summary.json").read_text())["images"][0].get("skipped", False)

    train(4)
    assert batch() is False and batch() is True
    train(6)  # the same path, another model
    assert batch() is False


def test_an_image_named_twice_runs_once(tmp_path, rng, capsys):
    """A file given alone and in its folder was refused as '2 inputs are named a (in/a.png, in/a.png)'."""
    (tmp_path / "in").mkdir()
    Image.fromarray(make_touching_particles((64, 64), 6, seed=int(rng.integers(1e6)))[0]).save(tmp_path / "in" / "a.png")
    assert main(["batch", str(tmp_path / "in"), str(tmp_path / "in" / "a.png"), "--out", str(tmp_path / "out"),
                 *OPTIONS, "--quiet"]) == 0
    assert json.loads((tmp_path / "out" / "batch_summary.json").read_text())["n_images"] == 1
