"""Data integrity of chunked runs: missing chunks, changed inputs, disk faults, completion written last.

Every case runs the real command on real Zarr stores on disk; disk faults use
a real tmpfs (full, or remounted read-only), skipped where mounting is not
permitted.
"""
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

zarr = pytest.importorskip("zarr")

from conftest import CHUNKED_DEFAULTS  # noqa: E402
from gpu_pipeline.cli import main  # noqa: E402
from gpu_pipeline.pipeline import separate  # noqa: E402
from gpu_pipeline.synthetic import make_touching_particles  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--max-radius", "13", "--quiet"]


def _store(path, image, chunks):
    """A plain Zarr v3 array (zstd), every chunk written."""
    zarr.create_array(str(path), shape=image.shape, dtype=image.dtype, chunks=chunks)[...] = image
    return path


def _image(rng, shape=(192, 192), n=70):
    image, _ = make_touching_particles(shape, n, seed=int(rng.integers(1e6)))
    return image


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("declump: error: ") and "\n" not in err, err
    return err


def _labels(out):
    return zarr.open_array(str(out / "particles" / "0"), mode="r")[...]


def _complete(out):
    return zarr.open_group(str(out), mode="r").attrs["declump"]["complete"] is True


def test_missing_input_chunk_is_refused_unless_filled(tmp_path, rng, capsys):
    image = _image(rng)
    src = _store(tmp_path / "in.zarr", image, (64, 64))
    (src / "c" / "1" / "2").unlink()
    out = tmp_path / "out.zarr"
    assert main(["run", str(src), str(out), *ARGS]) == 2
    err = _one_error_line(capsys)
    assert "chunk (1, 2) of" in err and "--missing-chunks fill" in err
    # Refused before any work: no output or work folder left to trip a later run.
    assert not out.exists() and not (tmp_path / "out.zarr.work").exists()
    # Opted in: the chunk reads as the fill value (0), exactly as an image with that block zeroed.
    assert main(["run", str(src), str(out), *ARGS, "--missing-chunks", "fill"]) == 0
    filled = image.copy()
    filled[64:128, 128:192] = 0
    assert np.array_equal(_labels(out), separate(filled, max_radius=13, **CHUNKED_DEFAULTS))
    # The chunk restored: the finished output is stale, and saying "already complete" would be wrong.
    _store(tmp_path / "restored.zarr", image, (64, 64))
    os.replace(tmp_path / "restored.zarr" / "c" / "1" / "2", src / "c" / "1" / "2")
    assert main(["run", str(src), str(out), *ARGS]) == 2
    err = _one_error_line(capsys)
    assert "changed" in err and "--overwrite" in err
    assert main(["run", str(src), str(out), *ARGS, "--overwrite"]) == 0
    assert np.array_equal(_labels(out), separate(image, max_radius=13, **CHUNKED_DEFAULTS))


def test_missing_chunk_of_an_in_memory_run_is_refused_unless_filled(tmp_path, rng, capsys):
    image = _image(rng, (128, 128), 30)
    src = _store(tmp_path / "in.zarr", image, (64, 64))
    (src / "c" / "0" / "1").unlink()
    out = tmp_path / "labels.tif"
    assert main(["run", str(src), str(out), "--device", "cpu"]) == 2
    assert "chunk (0, 1) of" in _one_error_line(capsys) and not list(tmp_path.glob("labels*"))
    assert main(["run", str(src), str(out), "--device", "cpu", "--missing-chunks", "fill"]) == 0
    filled = image.copy()
    filled[:64, 64:] = 0
    assert np.array_equal(tifffile.imread(out), separate(filled))


def test_missing_mask_chunk_is_refused(tmp_path, rng, capsys):
    image = _image(rng, (130, 130), 30)
    src = _store(tmp_path / "in.zarr", image, (65, 65))
    mask = _store(tmp_path / "mask.zarr", (image > image.mean()).astype(np.uint8), (65, 65))
    (mask / "c" / "0" / "1").unlink()
    assert main(["run", str(src), str(tmp_path / "out.zarr"), "--mask", str(mask), *ARGS]) == 2
    assert "chunk (0, 1) of" in _one_error_line(capsys)
    assert not (tmp_path / "out.zarr").exists() and not (tmp_path / "out.zarr.work").exists()


def _kill_when(command, done, count):
    process = subprocess.Popen(command, env=dict(os.environ, PYTHONPATH=str(REPO)))
    end = time.time() + 240
    while (len(os.listdir(done)) if done.exists() else 0) < count and process.poll() is None and time.time() < end:
        time.sleep(0.02)
    assert process.poll() is None, "the run finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


def test_an_unreadable_input_chunk_says_so_and_the_rerun_resumes_once_it_is_readable(tmp_path, rng):
    """A chunk this process may not read (its permissions) is not a damaged store: the line says to give read
    permission, and once given the same command resumes. As root, run without the capabilities that let root
    read anything (capsh), as a user would be."""
    import shutil

    command = [sys.executable, "-m", "gpu_pipeline", "run", str(tmp_path / "in.zarr"), str(tmp_path / "out.zarr"),
               *ARGS]
    if os.geteuid() == 0:
        if shutil.which("capsh") is None:
            pytest.skip("root reads any file; capsh (to drop that capability) is not installed")
        command = ["capsh", "--drop=cap_dac_override,cap_dac_read_search", "--", "-c", " ".join(command)]
    image = _image(rng, (96, 96), 12)
    _store(tmp_path / "in.zarr", image, (48, 48))
    chunk = tmp_path / "in.zarr" / "c" / "1" / "0"
    chunk.chmod(0)
    try:
        failed = subprocess.run(command, capture_output=True, text=True)
    finally:
        chunk.chmod(0o644)
    lines = failed.stderr.strip().splitlines()
    assert failed.returncode == 2 and len(lines) == 1, failed.stderr
    assert "chunk (1, 0)" in lines[0] and "give it read permission" in lines[0] and "corrupt" not in lines[0]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert np.array_equal(_labels(tmp_path / "out.zarr"), separate(image, max_radius=13, **CHUNKED_DEFAULTS))


def test_input_replaced_after_a_kill_is_not_resumed(tmp_path, rng):
    spacing = (1.0, 1.0, 1.0)
    image, _ = make_touching_particles((48, 96, 96), 120, spacing=spacing, seed=int(rng.integers(1e6)))
    src = _store(tmp_path / "in.zarr", image, (24, 24, 24))
    command = [sys.executable, "-m", "gpu_pipeline", "run", str(src), str(tmp_path / "out.zarr"), "--workers", "1",
               "--chunks", "24,24,24", *ARGS]
    _kill_when(command, tmp_path / "out.zarr.work" / "pieces.done", 4)
    # Another image of the same shape, dtype and chunking at the same path.
    other, _ = make_touching_particles(image.shape, 120, spacing=spacing, seed=int(rng.integers(1e6)))
    zarr.open_array(str(src), mode="r+")[...] = other
    result = subprocess.run(command, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip()
    assert "\n" not in err and "changed" in err and "--overwrite" in err, err
    assert not (tmp_path / "out_summary.json").exists()


@pytest.mark.parametrize("killed_in", ["distance", "pieces"])
def test_corrupt_chunk_in_the_work_folder_is_one_line(tmp_path, rng, killed_in):
    """A run killed during a pass, then a chunk of its staged regions corrupted: the resumed run stops with
    one line naming the chunk and the work folder and saying how to start over, whether the regions are
    read with halos (the distance pass) or block by block (the pieces pass); --overwrite then succeeds."""
    image, _ = make_touching_particles((48, 96, 96), 120, seed=int(rng.integers(1e6)))
    src = _store(tmp_path / "in.zarr", image, (24, 24, 24))
    out = tmp_path / "out.zarr"
    command = [sys.executable, "-m", "gpu_pipeline", "run", str(src), str(out), "--workers", "1",
               "--chunks", "24,24,24", *ARGS]
    _kill_when(command, tmp_path / "out.zarr.work" / f"{killed_in}.done", 2)
    chunks = sorted(p for p in (tmp_path / "out.zarr.work" / "regions.zarr" / "c").rglob("*") if p.is_file())
    assert len(chunks) == 32
    chunks[13].write_bytes(b"not a chunk")
    result = subprocess.run(command, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip()
    where = "chunk (" + ", ".join(chunks[13].relative_to(chunks[13].parents[2]).parts) + ")"
    assert "\n" not in err and where in err and "regions.zarr could not be read" in err, err
    assert "work folder" in err and "--overwrite" in err, err
    assert not (tmp_path / "out_summary.json").exists() and not (out.exists() and _complete(out))
    assert subprocess.run(command + ["--overwrite"], env=dict(os.environ, PYTHONPATH=str(REPO)),
                          timeout=300).returncode == 0
    assert np.array_equal(_labels(out), separate(image, max_radius=13, **CHUNKED_DEFAULTS)) and _complete(out)


def test_corrupt_input_chunk_on_the_commands_own_cluster_is_one_line(tmp_path, rng):
    """A corrupt input chunk read by a worker process of the cluster the command starts (--cluster local):
    stderr holds the command's one line naming the chunk, not Dask's "Compute Failed" record of the failed
    task first (seven lines with its key, spec and traceback), nor its warning that the dashboard's port
    8787 is taken (held here, as a notebook's cluster holds it), and nothing is marked complete."""
    image, _ = make_touching_particles((48, 96, 96), 120, seed=int(rng.integers(1e6)))
    src = _store(tmp_path / "in.zarr", image, (24, 48, 48))
    chunks = sorted(p for p in (src / "c").rglob("*") if p.is_file())
    bad = chunks[int(rng.integers(len(chunks)))]
    bad.write_bytes(b"not a chunk")
    out = tmp_path / "out.zarr"
    command = [sys.executable, "-m", "gpu_pipeline", "run", str(src), str(out), "--cluster", "local",
               "--workers", "2", "--chunks", "24,48,48", *ARGS]
    with socket.socket() as busy:
        with contextlib.suppress(OSError):  # already taken: as good
            busy.bind(("", 8787))
            busy.listen()
        result = subprocess.run(command, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                                text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip()
    where = "chunk (" + ", ".join(bad.relative_to(src / "c").parts) + ")"
    assert err.startswith("declump: error: ") and "\n" not in err, err
    assert where in err and "could not be read" in err, err
    assert not (tmp_path / "out_summary.json").exists() and not (out.exists() and _complete(out))


def _cmdline(pid):
    try:
        return (Path("/proc") / pid / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive_in_group(pgid):
    """The processes of process group ``pgid`` that still run (exited ones waiting to be reaped left out)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # exited meanwhile
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(stat.parent.name)
    return alive


def test_ctrl_c_on_the_commands_own_cluster_is_one_line_and_the_rerun_resumes(tmp_path, rng):
    """Ctrl-C in a terminal (SIGINT to every process of the command) during the distance pass of a
    --cluster local run: exit 130 and stderr the command's one line, not the workers' and Dask's logs of
    their stop (a nanny killing workers that no longer answered, cancelled tasks, an interrupted gather); no
    worker process left; the same command then resumes to the in-memory labels."""
    image, _ = make_touching_particles((64, 128, 128), 300, seed=int(rng.integers(1e6)))
    src = _store(tmp_path / "in.zarr", image, (32, 64, 64))
    out = tmp_path / "out.zarr"
    command = [sys.executable, "-m", "gpu_pipeline", "run", str(src), str(out), "--cluster", "local",
               "--workers", "2", "--chunks", "32,64,64", *ARGS]

    def as_in_a_terminal():  # pytest's runner may ignore SIGINT; a terminal's command gets Python's handler
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.setpgrp()

    process = subprocess.Popen(command, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, preexec_fn=as_in_a_terminal)
    done, end = tmp_path / "out.zarr.work" / "distance.done", time.time() + 240
    while not (done.exists() and os.listdir(done)) and process.poll() is None and time.time() < end:
        time.sleep(0.01)
    assert process.poll() is None, "the run finished before it could be interrupted"
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert err.strip() == "declump: interrupted; no output was marked complete", err
    left = _alive_in_group(process.pid)
    # multiprocessing's resource tracker (or forkserver) ends by itself when the command's end closes its pipe:
    # on a busy machine a moment later. Anything else (a worker, a nanny) must be gone when the command returns.
    # (an empty command line: a process the kernel is tearing down, its memory already gone)
    helpers = [pid for pid in left if "multiprocessing" in _cmdline(pid) or not _cmdline(pid)]
    assert sorted(left) == sorted(helpers), f"processes of the interrupted command still running: {[(p, _cmdline(p)) for p in left]}"
    end = time.time() + 10
    while _alive_in_group(process.pid) and time.time() < end:
        time.sleep(0.1)
    assert not _alive_in_group(process.pid), f"multiprocessing helpers still running: {helpers}"
    assert not (tmp_path / "out_summary.json").exists() and not (out.exists() and _complete(out))
    assert subprocess.run(command, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300).returncode == 0
    assert np.array_equal(_labels(out), separate(image, max_radius=13, **CHUNKED_DEFAULTS)) and _complete(out)


def test_a_run_that_finds_nothing_keeps_no_work_folder_and_the_next_command_runs(tmp_path, rng, capsys):
    """A chunked run stopped by its input's values or its parameters (no particles at this threshold, NaN, a
    constant volume), after passes that staged work: one line, no work folder, no output, so the next command
    (another threshold, the input fixed) runs at once instead of being refused as "an unfinished run with
    other parameters", and gives the in-memory labels."""
    image = _image(rng, (96, 96, 96), 150)
    src = _store(tmp_path / "in.zarr", image, (48, 48, 48))
    out = tmp_path / "out.zarr"
    assert main(["run", str(src), str(out), "--threshold", str(int(image.max()) + 1), *ARGS]) == 2
    assert "no particles found" in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.zarr"]
    assert main(["run", str(src), str(out), *ARGS]) == 0
    assert np.array_equal(_labels(out), separate(image, max_radius=13, **CHUNKED_DEFAULTS)) and _complete(out)
    for name, values, message in (("nan", image.astype(np.float32), "NaN"),
                                  ("constant", np.full(image.shape, 7, np.uint8), "constant")):
        if name == "nan":
            values[int(rng.integers(96)), int(rng.integers(96)), int(rng.integers(96))] = np.nan
        bad = _store(tmp_path / f"{name}.zarr", values, (48, 48, 48))
        assert main(["run", str(bad), str(tmp_path / f"{name}_out.zarr"), *ARGS]) == 2
        assert message in _one_error_line(capsys)
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(f"{name}_out")]


def test_a_second_run_on_the_same_output_is_refused_while_the_first_runs(tmp_path, rng):
    """The same chunked command started twice (a job submitted twice): while the first runs, the second stops
    in one line naming the first's process (before, each removed the other's work files: a FileNotFoundError
    traceback); the first finishes with the in-memory labels and removes its lock file; a run killed by
    SIGKILL holds no lock, so its resume proceeds."""
    image, _ = make_touching_particles((96, 128, 128), 450, seed=int(rng.integers(1e6)))
    src = _store(tmp_path / "in.zarr", image, (32, 64, 64))
    out = tmp_path / "out.zarr"
    command = [sys.executable, "-m", "gpu_pipeline", "run", str(src), str(out), "--workers", "1",
               "--chunks", "32,64,64", *ARGS]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = time.time() + 240
    while not (tmp_path / "out.zarr.work" / "parameters.json").exists() and first.poll() is None and time.time() < end:
        time.sleep(0.01)
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert first.poll() is None, "the first run finished before the second started"
    assert second.returncode == 2, second.stderr
    assert second.stderr.strip() == (f"declump: error: another declump run is writing {out} (pid {first.pid} on "
                                     f"{socket.gethostname()}); wait for it to finish (the same command then finds "
                                     "it complete), or choose another output"), second.stderr
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert np.array_equal(_labels(out), separate(image, max_radius=13, **CHUNKED_DEFAULTS)) and _complete(out)
    assert not (tmp_path / "out.zarr.lock").exists()
    # SIGKILL mid-run: the kernel drops the lock with the process; the same command resumes.
    command[command.index(str(out))] = str(tmp_path / "again.zarr")
    _kill_when(command, tmp_path / "again.zarr.work" / "distance.done", 1)
    assert (tmp_path / "again.zarr.lock").exists()
    assert subprocess.run(command, env=env, timeout=300).returncode == 0
    assert np.array_equal(_labels(tmp_path / "again.zarr"), _labels(out))


def test_completed_output_removes_a_leftover_work_folder(tmp_path, rng, capsys):
    src = _store(tmp_path / "in.zarr", _image(rng, (130, 130), 30), (65, 65))
    out = tmp_path / "out.zarr"
    assert main(["run", str(src), str(out), *ARGS]) == 0
    summary = (tmp_path / "out_summary.json").read_text()
    # The state a kill between the last output file and the folder's removal leaves: the work folder's records
    # and a staged array (large on real volumes).
    work = tmp_path / "out.zarr.work"
    work.mkdir()
    (work / "parameters.json").write_text("{}")
    zarr.create_array(str(work / "pieces.zarr"), shape=(130, 130), dtype=np.int64, chunks=(65, 65))[...] = 1
    assert main(["run", str(src), str(out), *ARGS]) == 0
    assert not work.exists() and _complete(out)
    assert (tmp_path / "out_summary.json").read_text() == summary  # already complete: nothing was redone


_AUDIT = """
import os, sys
events = []
def hook(event, args):
    if event == "open" and isinstance(args[0], str) and args[1] and set(args[1]) & set("wxa"):
        events.append(("write", args[0]))
    elif event == "os.rename":
        events.append(("rename", os.fsdecode(args[1])))
sys.addaudithook(hook)
from gpu_pipeline.cli import main
code = main(sys.argv[2:])
with open(sys.argv[1], "w") as handle:
    handle.writelines(f"{kind} {path}\\n" for kind, path in events)
sys.exit(code)
"""


def test_markers_of_a_finished_output_are_written_last(tmp_path, rng):
    """The order of the real run's file writes (Python's audit events): the labels' pixels, table and overlay,
    then the OME metadata with `complete`, then the summary, last (a run stopped before it leaves no summary
    beside labels marked unfinished)."""
    src = _store(tmp_path / "in.zarr", _image(rng, (130, 130), 30), (65, 65))
    log = tmp_path / "writes.txt"
    result = subprocess.run([sys.executable, "-c", _AUDIT, str(log), "run", str(src), str(tmp_path / "out.zarr"),
                             *ARGS], env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    events = [line.split(" ", 1) for line in log.read_text().splitlines()]
    last = {path: i for i, (_, path) in enumerate(events)}
    finished_files = [tmp_path / name for name in ("out_particles.parquet", "out_overlay.png")]
    summary = str(tmp_path / "out_summary.json")
    markers = [tmp_path / "out.zarr" / ".zattrs", tmp_path / "out.zarr" / "particles" / ".zattrs"]
    label_array = str(tmp_path / "out.zarr" / "particles" / "0")
    pixels = [i for i, (_, path) in enumerate(events) if path.startswith(label_array)]
    assert all(str(p) in last for p in finished_files + markers) and summary in last and pixels
    assert min(last[str(m)] for m in markers) > max([last[str(p)] for p in finished_files] + pixels)
    first_summary = min(i for i, (_, path) in enumerate(events) if path == summary)
    assert first_summary > max(last[str(m)] for m in markers)
    assert json.loads((tmp_path / "out_summary.json").read_text())["n_particles"] > 0


def test_bad_input_found_before_computing_leaves_no_folder(tmp_path, rng, capsys):
    src = _store(tmp_path / "in.zarr", _image(rng, (130, 130), 30), (65, 65))
    out = tmp_path / "out.zarr"
    assert main(["run", str(src), str(out), *ARGS, "--chunks", "8,8"]) == 2
    assert "halo" in _one_error_line(capsys)
    assert not out.exists() and not (tmp_path / "out.zarr.work").exists()
    # So a run with other parameters at that path is not refused.
    assert main(["run", str(src), str(out), *ARGS]) == 0 and _complete(out)


@pytest.fixture
def small_disk(tmp_path):
    """A real tmpfs mounted at a folder (root and mount permission needed), unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small or read-only filesystem needs root (chmod does not stop root either)")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def _remount(disk, options):
    subprocess.run(["mount", "-o", f"remount,{options}", str(disk)], check=True)


def test_full_disk_is_one_line_and_the_rerun_resumes(small_disk, tmp_path, rng, capsys):
    image = _image(rng, (256, 256), 120)
    src = _store(tmp_path / "in.zarr", image, (64, 64))
    out = small_disk / "out.zarr"
    # Room to stage the smoothed volume's 256 KiB (with the 15 % the rest of a work folder takes, by the check
    # before its pass), not for its files, halos and the later stores (a page each at the least): the disk fills
    # during the run.
    _remount(small_disk, "size=350k")
    command = ["run", str(src), str(out), "--chunks", "64,64", *ARGS]  # 16 blocks, some written before the disk fills
    assert main(command) == 2
    err = _one_error_line(capsys)
    assert "No space left on device" in err and str(small_disk) in err
    assert not (small_disk / "out_summary.json").exists() and not (out.exists() and _complete(out))
    _remount(small_disk, "size=64m")  # space freed
    assert main(command) == 0
    summary = json.loads((small_disk / "out_summary.json").read_text())
    # Resumed: the blocks finished before the disk filled are not redone.
    assert summary["blocks_computed"]["smoothed"] < summary["blocks_total"]["smoothed"]
    assert np.array_equal(_labels(out), separate(image, max_radius=13, **CHUNKED_DEFAULTS)) and _complete(out)


def test_a_work_folder_without_room_for_the_smoothed_volume_smooths_again(small_disk, tmp_path, rng, capsys):
    """Where the work folder's file system has less room than the smoothed volume (staged uncompressed, 4 bytes
    per voxel), the passes that read it smooth their chunks again instead: a note says so, nothing is staged
    for it, and the labels are the in-memory run's; with room, it is staged."""
    image = _image(rng, (64, 128, 128), 120)  # 4.2 MB smoothed, on a 2 MB disk
    src = _store(tmp_path / "in.zarr", image, (64, 64, 64))
    expected = separate(image, max_radius=13, **CHUNKED_DEFAULTS)
    _remount(small_disk, "size=2m")
    out = small_disk / "out.zarr"
    assert main(["run", str(src), str(out), "--chunks", "64,64,64", "--max-radius", "13"]) == 0
    assert "needs 4.82 MB at its peak to stage the smoothed volume and its file system has" in capsys.readouterr().err
    summary = json.loads((small_disk / "out_summary.json").read_text())
    assert "smoothed" not in summary["blocks_computed"]  # never staged
    assert np.array_equal(_labels(out), expected) and _complete(out)
    _remount(small_disk, "size=64m")
    again = small_disk / "again.zarr"
    assert main(["run", str(src), str(again), "--chunks", "64,64,64", "--max-radius", "13"]) == 0
    assert "to stage the smoothed volume" not in capsys.readouterr().err
    summary = json.loads((small_disk / "again_summary.json").read_text())
    assert summary["blocks_computed"]["smoothed"] == summary["blocks_total"]["smoothed"] == 4
    assert np.array_equal(_labels(again), expected)


def test_no_room_for_a_classifiers_probabilities_is_refused_before_their_pass(small_disk, tmp_path, rng, capsys):
    """A pixel classifier's probabilities (float32 per class, staged uncompressed; costly to compute again) are
    checked against the work folder's free space before their pass: one line with both sizes, no folder left."""
    image = _image(rng, (1024, 1024), 300)  # 3 classes: 12.6 MB of probabilities, on a 2 MB disk
    src = _store(tmp_path / "in.zarr", image, (256, 256))
    _remount(small_disk, "size=2m")
    out = small_disk / "out.zarr"
    assert main(["run", str(src), str(out), "--classifier", "em-particles", *ARGS]) == 2
    err = _one_error_line(capsys)
    assert f"{out}.work needs 12.6 MB for the staged probabilities (float32, uncompressed)" in err, err
    assert "--scratch" in err and not os.listdir(small_disk)  # nothing half-written: no output, no work folder


def test_a_scratch_limit_is_kept_on_any_disk(tmp_path, rng, capsys):
    """``--scratch-limit`` (a quota the file system's free space does not show): below the smoothed volume, the
    passes smooth again and nothing is staged for it, to the in-memory labels; below a classifier's
    probabilities, the run is refused in one line."""
    image = _image(rng, (64, 128, 128), 120)  # 4.2 MB smoothed, within 2 MB
    src = _store(tmp_path / "in.zarr", image, (64, 64, 64))
    out = tmp_path / "out.zarr"
    assert main(["run", str(src), str(out), "--chunks", "64,64,64", "--max-radius", "13", "--scratch-limit", "2M"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"the work folder needs 4\.82 MB at its peak to stage the smoothed volume and it may take "
                     r"(1\.\d\d|2) MB more \(--scratch-limit", err), err  # (2 MB less what the folder holds)
    summary = json.loads((tmp_path / "out_summary.json").read_text())
    assert "smoothed" not in summary["blocks_computed"]
    assert np.array_equal(_labels(out), separate(image, max_radius=13, **CHUNKED_DEFAULTS)) and _complete(out)
    flat = _store(tmp_path / "flat.zarr", _image(rng, (1024, 1024), 300), (256, 256))
    assert main(["run", str(flat), str(tmp_path / "p.zarr"), "--classifier", "em-particles", "--scratch-limit",
                 "2MB", *ARGS]) == 2
    err = _one_error_line(capsys)
    assert re.search(r"needs 12\.6 MB for the staged probabilities \(float32, uncompressed\) and it may take "
                     r"(1\.\d\d|2) MB more \(--scratch-limit", err), err
    assert not (tmp_path / "p.zarr").exists() and not (tmp_path / "p.zarr.work").exists()


def test_read_only_output_folder_is_one_line(small_disk, tmp_path, rng, capsys):
    image = _image(rng, (130, 130), 30)
    src = _store(tmp_path / "in.zarr", image, (65, 65))
    _remount(small_disk, "ro")
    out = small_disk / "out.zarr"
    assert main(["run", str(src), str(out), *ARGS]) == 2
    err = _one_error_line(capsys)
    assert "Read-only file system" in err and str(small_disk) in err and not os.listdir(small_disk)
    _remount(small_disk, "rw,size=64m")
    assert main(["run", str(src), str(out), *ARGS]) == 0
    assert np.array_equal(_labels(out), separate(image, max_radius=13, **CHUNKED_DEFAULTS)) and _complete(out)


def test_read_only_folder_of_an_in_memory_run_is_one_line(small_disk, tmp_path, rng, capsys):
    tifffile.imwrite(tmp_path / "in.tif", _image(rng, (96, 96), 12))
    _remount(small_disk, "ro")
    assert main(["run", str(tmp_path / "in.tif"), str(small_disk / "labels.tif"), "--device", "cpu"]) == 2
    err = _one_error_line(capsys)
    assert "Read-only file system" in err and str(small_disk) in err and not os.listdir(small_disk)


def test_a_full_disk_during_an_in_memory_run_names_the_file_it_could_not_write(small_disk, tmp_path, rng, capsys):
    """The disk fills while the outputs are written (here at the overlay, after the labels and the table): the
    one line names the file that was not written, not the labels written whole before it, and no summary
    marks the run complete."""
    tifffile.imwrite(tmp_path / "in.tif", _image(rng, (384, 384), 60))
    _remount(small_disk, "size=100k")
    assert main(["run", str(tmp_path / "in.tif"), str(small_disk / "labels.tif"), "--device", "cpu"]) == 2
    err = _one_error_line(capsys)
    assert "No space left on device" in err
    named = Path(err.split("cannot write ", 1)[1].split(": ", 1)[0])
    assert named.parent == small_disk and not named.exists(), (err, os.listdir(small_disk))
    assert (small_disk / "labels.tif").exists() and named.name != "labels.tif"
    assert not (small_disk / "labels_summary.json").exists()


def test_out_of_memory_in_a_chunked_run_is_one_line_with_what_sets_its_memory(tmp_path, rng, capsys, monkeypatch):
    """A real failed allocation (NumPy asked for 4 EiB) in the distance-transform pass of a chunked run: exit 3,
    one line that names --chunks (not "run it chunked"), and no output marked complete."""
    import gpu_pipeline.chunked.pipeline as chunked_pipeline

    monkeypatch.setattr(chunked_pipeline, "_block_peak_candidates", lambda *a, **k: np.empty(2 ** 62, np.uint8))
    src = _store(tmp_path / "in.zarr", _image(rng, (130, 130), 30), (65, 65))
    assert main(["run", str(src), str(tmp_path / "out.zarr"), *ARGS]) == 3
    err = _one_error_line(capsys)
    assert "out of memory in a chunked run" in err and "Unable to allocate" in err and "smaller --chunks" in err
    assert "run it chunked" not in err
    out = tmp_path / "out.zarr"
    assert not (out.exists() and _complete(out)) and not (tmp_path / "out_summary.json").exists()


@pytest.mark.parametrize("stage, advice", [("peaks", "run it chunked"), ("necks", "--neck-ratio off")])
def test_out_of_memory_in_a_stage_is_one_line_naming_it(tmp_path, rng, capsys, monkeypatch, stage, advice):
    """A real failed allocation (NumPy asked for 4 EiB) inside one stage of the in-memory run."""
    import gpu_pipeline.pipeline as pipeline

    name = {"peaks": "find_peaks", "necks": "neck_groups"}[stage]
    monkeypatch.setattr(pipeline, name, lambda *args, **kwargs: np.empty(2 ** 62, np.uint8))
    tifffile.imwrite(tmp_path / "in.tif", _image(rng, (96, 96), 12))
    assert main(["run", str(tmp_path / "in.tif"), str(tmp_path / "out.tif"), "--device", "cpu"]) == 3
    err = _one_error_line(capsys)
    assert f"out of memory in the '{stage}' stage" in err and "Unable to allocate" in err and advice in err
    assert not list(tmp_path.glob("out*"))


def test_a_corrupt_input_chunk_leaves_no_work_folder_so_the_fixed_store_runs(tmp_path, rng, capsys):
    """A chunked run that met a corrupt input chunk kept its work folder; the message says to write that chunk
    again, and once it was, the next run was refused ("changed ... since the unfinished run started; add
    --overwrite"). Such a stop now removes the work folder: the same command then runs the fixed store."""
    image = _image(rng, (96, 96), 12)
    src = _store(tmp_path / "in.zarr", image, (48, 48))
    chunk = src / "c" / "1" / "0"
    good = chunk.read_bytes()
    chunk.write_bytes(b"not a chunk")
    command = ["run", str(src), str(tmp_path / "out.zarr"), "--chunks", "48,48", *ARGS]
    assert main(command) == 2
    err = _one_error_line(capsys)
    assert "chunk (1, 0)" in err and "write that chunk again" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.zarr"]
    chunk.write_bytes(good)
    assert main(command) == 0, capsys.readouterr().err
    assert np.array_equal(_labels(tmp_path / "out.zarr"), separate(image, max_radius=13, **CHUNKED_DEFAULTS))
