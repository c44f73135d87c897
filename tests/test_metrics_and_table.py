"""Metrics against a plain per-object reference; the particle table against scikit-image regionprops."""
import numpy as np
import pytest
from skimage.measure import regionprops

from gpu_pipeline.measure import particle_table
from gpu_pipeline.metrics import IOU_THRESHOLDS, evaluate
from gpu_pipeline.synthetic import make_touching_particles


def reference_scores(pred, gt):
    """Loops over object pairs: IoU, greedy matching per threshold (unique above 0.5)."""
    p_ids = [i for i in np.unique(pred) if i]
    g_ids = [i for i in np.unique(gt) if i]
    iou = np.zeros((len(p_ids), len(g_ids)))
    for a, p in enumerate(p_ids):
        for b, g in enumerate(g_ids):
            inter = np.sum((pred == p) & (gt == g))
            iou[a, b] = inter / np.sum((pred == p) | (gt == g))
    f1 = []
    for t in IOU_THRESHOLDS:
        tp = int(np.sum(iou > t))
        f1.append(2 * tp / (len(p_ids) + len(g_ids)))
    return f1


def test_metrics_equal_the_per_object_reference(rng):
    _, gt = make_touching_particles((96, 96), 20, seed=int(rng.integers(1e6)))
    pred = gt.copy()
    pred[np.isin(pred, [2, 5])] = 2  # a merge
    pred[(pred == 7) & (np.indices(pred.shape)[1] % 2 == 0)] = 99  # a split into stripes
    pred = np.roll(pred, 1, axis=0)  # and a shift
    scores = evaluate(pred, gt)
    np.testing.assert_allclose(scores["f1"], reference_scores(pred, gt))
    assert scores["merges"] >= 1
    assert scores["f1"][0] < 1


def test_perfect_prediction_scores_one_and_split_merge_counts(rng):
    _, gt = make_touching_particles((64, 64), 10, seed=int(rng.integers(1e6)))
    s = evaluate(gt, gt)
    assert s["mean_f1"] == 1 and s["dice"] == 1 and s["splits"] == 0 and s["merges"] == 0
    halves = gt.copy()
    target = int(np.bincount(gt.ravel())[1:].argmax()) + 1
    cols = np.nonzero(gt == target)[1]
    halves[(gt == target) & (np.indices(gt.shape)[1] > np.median(cols))] = gt.max() + 1
    assert evaluate(halves, gt)["splits"] == 1
    assert evaluate(gt, halves)["merges"] == 1


def test_empty_images_score_consistently(rng):
    """Both empty: every score 1 (precision and recall were 0 beside an F1 of 1); one side empty: every count-based
    score 0."""
    _, gt = make_touching_particles((48, 48), 4, seed=int(rng.integers(1e6)))
    empty = np.zeros_like(gt)
    both = evaluate(empty, empty)
    assert all(v == [1.0] * len(IOU_THRESHOLDS) for k, v in both.items() if k in ("precision", "recall", "f1", "ap"))
    assert both["dice"] == 1.0 and both["n_pred"] == both["n_gt"] == 0
    for pred, truth in ((empty, gt), (gt, empty)):
        s = evaluate(pred, truth)
        assert all(v == [0.0] * len(IOU_THRESHOLDS) for k, v in s.items() if k in ("precision", "recall", "f1", "ap"))
        assert s["dice"] == 0.0


@pytest.mark.parametrize("shape,spacing", [((80, 90), (0.5, 2.0)), ((20, 40, 40), (3.0, 1.0, 1.0))])
def test_particle_table_matches_regionprops(rng, shape, spacing):
    image, labels = make_touching_particles(shape, 15, spacing=spacing, seed=int(rng.integers(1e6)))
    table = particle_table(labels, image, spacing)
    props = regionprops(labels, intensity_image=image, spacing=spacing)
    assert list(table["label"]) == [p.label for p in props]
    axes = ("z", "y", "x")[-len(shape):]
    for row, p in enumerate(props):
        assert table["voxel_count"][row] == p.num_pixels
        np.testing.assert_allclose([table[f"centroid_{a}"][row] for a in axes], p.centroid, rtol=1e-9)
        np.testing.assert_allclose(table["mean_intensity"][row], p.intensity_mean, rtol=1e-9)
        assert tuple(table[f"bbox_min_{a}"][row] for a in axes) + tuple(table[f"bbox_max_{a}"][row] for a in axes) == p.bbox
        size = table["area" if len(shape) == 2 else "volume"][row]
        np.testing.assert_allclose(size, p.area, rtol=1e-9)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_particle_table_refuses_non_finite_intensities_in_one_line(rng, bad):
    """A NaN or inf pixel inside a particle made its mean_intensity NaN or inf without a word."""
    from gpu_pipeline import DeclumpError

    image, labels = make_touching_particles((40, 40), 5, seed=int(rng.integers(1e6)))
    image = image.astype(np.float32)
    inside = np.argwhere(labels > 0)
    image[tuple(inside[rng.integers(len(inside))])] = bad
    with pytest.raises(DeclumpError, match="NaN or inf") as caught:
        particle_table(labels, image)
    assert "\n" not in str(caught.value)
    assert np.isfinite(particle_table(labels, np.nan_to_num(image, posinf=1, neginf=0))["mean_intensity"]).all()


@pytest.mark.parametrize("shape,ids,dtype,image_dtype", [
    ((500,), 7, np.int32, np.uint8), ((37, 41), 30, np.uint16, np.float32), ((13, 17, 19), 60, np.int64, np.uint16),
    ((13, 17, 19), 10**9, np.int64, None),  # ids spread far beyond the voxels: the sorted (array) path
    ((9, 11), 5, np.uint64, np.uint8),  # uint64 ids: the array path
])
def test_label_sums_are_each_labels_count_coordinate_sums_bounds_and_intensity(rng, shape, ids, dtype, image_dtype):
    """The CPU's compiled per-label sums and the array-module ones (the GPU's) against a per-label loop."""
    from cpu_fallback import ops
    from gpu_pipeline.array_algorithms import label_sums as array_version

    labels = np.where(rng.random(shape) < 0.7, rng.integers(1, ids, shape), 0).astype(dtype)
    labels.ravel()[rng.integers(0, labels.size)] = ids  # the largest id, so the sparse case is sparse
    image = None if image_dtype is None else (rng.random(shape) * 200).astype(image_dtype)
    grid = np.indices(shape)
    present = np.unique(labels[labels > 0]).astype(np.int64)
    for ours in (ops.label_sums(labels, image), array_version(labels, image, ops.scatter_min, ops.scatter_max)):
        np.testing.assert_array_equal(ours["label"], present)
        for n, label in enumerate(present):
            where = labels == label
            assert ours["count"][n] == where.sum()
            for axis in range(len(shape)):
                assert ours["sum"][axis, n] == grid[axis][where].sum()
                assert (ours["low"][axis, n], ours["high"][axis, n]) == (grid[axis][where].min(), grid[axis][where].max())
            if image is None:
                assert ours["intensity"] is None
            else:
                np.testing.assert_allclose(ours["intensity"][n], image[where].astype(np.float64).sum(), rtol=1e-12)
    empty = ops.label_sums(np.zeros(shape, dtype), image)
    assert empty["label"].size == 0 and empty["sum"].shape == (len(shape), 0)


def test_random_volume_bench_scores_each_drawn_volume_and_counts_where_declump_trails():
    """bench.random_volumes: its draws are reproducible, each column's scores are evaluate()'s on the generated
    volume, and its summary lists exactly the draws where declump's F1@0.5 trails."""
    from bench.random_volumes import BELOW, draws, run
    from gpu_pipeline import separate
    from gpu_pipeline.synthetic import make_touching_particles

    result = run(777, 3, 48, ["declump", "watershed"], [("ball_share", None)])
    assert [(r["draw"], r["seed"], r["particles"], *r["radius"]) for r in result["rows"]] == draws(777, 3, 48)
    assert draws(777, 3, 48) != draws(778, 3, 48)
    first = result["rows"][0]
    image, truth = make_touching_particles((48,) * 3, first["particles"], radius_range=tuple(first["radius"]),
                                           overlap=0.15, seed=first["seed"])
    labels = separate(image, sigma=1.0, min_distance=4, min_size=65, polarity="bright", max_hole_size=0.0,
                      ball_share=None)
    scores = evaluate(labels, truth)
    column = first["declump ball_share=None"]
    assert column["pieces"] == labels.max() and column["f1_50"] == pytest.approx(scores["f1"][0])
    assert column["mean_f1"] == pytest.approx(float(np.mean(scores["f1"])))
    below = [r["seed"] for r in result["rows"] if r["declump"]["f1_50"] < r["watershed"]["f1_50"] - BELOW]
    assert result["summary"]["declump"]["f1_50_below_watershed"] == below
    assert result["summary"]["watershed"]["mean_f1_50"] == pytest.approx(
        np.mean([r["watershed"]["f1_50"] for r in result["rows"]]))


def test_random_volume_bench_wide_spread_draws_radius_ratios_of_two_to_six():
    """``--spread wide``: the largest radius 2-6 times the smallest (3-6 voxels), reproducibly; the narrow draws
    keep the largest 4-9 voxels above the smallest."""
    from bench.random_volumes import draws

    wide = draws(5, 200, 64, "wide")
    assert wide == draws(5, 200, 64, "wide") and wide != draws(5, 200, 64)
    ratios = np.array([hi / lo for _, _, _, lo, hi in wide])
    assert all(2.9 <= lo <= 6.1 for _, _, _, lo, _ in wide)
    assert ratios.min() >= 1.95 and ratios.max() <= 6.1 and ratios.max() > 5 and ratios.min() < 2.5
    gaps = np.array([hi - lo for _, _, _, lo, hi in draws(5, 200, 64)])
    assert gaps.min() >= 3.9 and gaps.max() <= 9.1
    with pytest.raises(ValueError, match="spread"):
        draws(5, 1, 64, "broad")


def test_pass_timeline_extrapolation_is_amdahl_and_the_client_cpu_bound(rng):
    """bench.pass_timeline's beyond_two: a run whose client steps take S seconds with several workers (S + M
    with one: M of them go to the workers where there are several) and whose passes take P takes S + (M + P) / n
    on n workers, and a client spending c CPU s per CPU s of the workers' saturates one core at 1 / c workers."""
    from bench.pass_timeline import beyond_two

    serial, moved, parallel = rng.uniform(0.1, 2.0), rng.uniform(0.0, 1.0), rng.uniform(5.0, 50.0)
    worker_cpu, share = rng.uniform(5.0, 50.0), rng.uniform(0.01, 0.2)
    tasks = [int(t) for t in rng.integers(1, 200, size=5)]
    one = {"seconds": serial + moved + parallel, "between_passes": serial + moved}
    two = {"command_cpu_seconds": share * worker_cpu, "worker_cpu_seconds": worker_cpu, "between_passes": serial,
           "passes": [{"tasks": t} for t in tasks]}
    b = beyond_two(one, two, workers=16)
    assert b["amdahl_speedup"] == pytest.approx((serial + moved + parallel) / (serial + (moved + parallel) / 16))
    assert b["workers_until_client_bound"] * share == pytest.approx(1.0)
    assert b["client_cpu_ms_per_task"] == pytest.approx(1e3 * share * worker_cpu / sum(tasks))


def test_pass_timeline_counts_the_time_some_workers_wait_while_others_compute(rng):
    """bench.pass_timeline's some_idle_seconds against a sweep of a fine time grid: the seconds in which at
    least one worker but not every one computes, for random overlapping intervals of 2 and 3 workers (touching
    and nested intervals of one worker included), clipped to the run."""
    from bench.pass_timeline import some_idle_seconds

    for workers in (2, 3):
        per_worker = []
        for _ in range(workers):
            starts = np.sort(rng.integers(0, 9000, size=int(rng.integers(1, 12))))
            per_worker.append([(int(a), int(a + rng.integers(0, 1500))) for a in starts])
        per_worker[0].append(per_worker[0][0])  # a repeated interval: no double count
        start, end = int(rng.integers(0, 2000)), int(rng.integers(8000, 11000))
        grid = np.arange(start, end) + 0.5
        busy = sum(np.any([(grid > a) & (grid < b) for a, b in intervals], axis=0) for intervals in per_worker)
        expected = float(((busy > 0) & (busy < workers)).sum())
        assert some_idle_seconds(per_worker, start, end) == pytest.approx(expected, abs=1e-6), workers


def test_pass_timeline_reads_dasks_own_split_of_task_time(cluster_client):
    """The task CPU and off-CPU seconds bench.pass_timeline reports come from the workers' digests under the
    keys Dask writes them: a task that spins 0.3 s adds about 0.3 s of thread CPU, one that sleeps 0.3 s about
    0.3 s off a core."""
    import time

    from bench.pass_timeline import _worker_task_seconds

    def spin(seconds):
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass
        return 1

    def sleep(seconds):
        time.sleep(seconds)
        return 1

    def total():
        values = cluster_client.run(_worker_task_seconds).values()
        return sum(v[0] for v in values), sum(v[1] for v in values)

    cpu0, off0 = total()
    cluster_client.submit(spin, 0.3, pure=False).result()
    cpu1, off1 = total()
    cluster_client.submit(sleep, 0.3, pure=False).result()
    cpu2, off2 = total()
    assert 0.25 <= cpu1 - cpu0 <= 0.6 and off1 - off0 < 0.2
    assert 0.25 <= off2 - off1 <= 0.6 and cpu2 - cpu1 < 0.1


def test_pass_timeline_matches_passes_by_name_and_order_and_keeps_those_of_one_run():
    """Two runs' passes side by side: by name and by their order among passes of that name; a pass of one run
    only (a step that runs in the client with one worker) gets a row of its own, after the pass before it."""
    from bench.pass_timeline import matched_passes

    one = [{"what": w} for w in ("smooth", "peaks", "necks", "pieces", "pieces")]
    two = [{"what": w} for w in ("smooth", "peaks", "shares", "necks", "shares", "pieces", "pieces")]
    rows = matched_passes(one, two)
    assert [r[0] for r in rows] == ["smooth", "peaks", "shares", "necks", "shares", "pieces", "pieces"]
    assert [r[1] is None for r in rows] == [False, False, True, False, True, False, False]
    assert all(r[2] is two[i] for i, r in enumerate(rows))
    assert rows[5][1] is one[3] and rows[6][1] is one[4]


def test_throughput_hours_per_tb_stop_growing_at_the_client_bound(rng):
    """bench.throughput's per-TB projection: linear in cores up to 1 / share workers, flat beyond; the share is the
    median of (command + scheduler CPU) / workers' CPU over the 2-worker runs, net of the corner's runs if any."""
    from bench.throughput import VOXELS_PER_TB, client_share, per_tb

    runs = {"warm_2": [{"cpu_seconds": c, "scheduler_cpu_seconds": s, "worker_cpu_seconds": w}
                       for c, s, w in rng.uniform([0.2, 0.2, 8.0], [1.0, 1.0, 12.0], size=(3, 3))]}
    shares = sorted((r["cpu_seconds"] + r["scheduler_cpu_seconds"]) / r["worker_cpu_seconds"] for r in runs["warm_2"])
    share = client_share(runs)
    assert share == pytest.approx(shares[1])
    rate = rng.uniform(2.0, 8.0)
    table = per_tb({"chunked": {"mvox_per_s": rate}}, [0.8], share, node_cores=(2, 64))
    small, large = table["rows"]
    assert 2 < 1 / share < 64
    assert small["hours_client_bound"] == pytest.approx(small["hours_linear"])
    assert large["hours_client_bound"] == pytest.approx(VOXELS_PER_TB / (rate * 1e6 / share) / 3600)
    assert per_tb({"chunked": {"mvox_per_s": rate}}, [0.8])["rows"][0]["hours_client_bound"] is None
    # Net of the one-chunk corner's run: its CPU seconds come off both sides before the ratio.
    small = [{"cpu_seconds": c, "scheduler_cpu_seconds": s, "worker_cpu_seconds": w}
             for c, s, w in rng.uniform([0.05, 0.05, 0.5], [0.15, 0.15, 1.0], size=(3, 3))]
    net = sorted((r["cpu_seconds"] + r["scheduler_cpu_seconds"] - q["cpu_seconds"] - q["scheduler_cpu_seconds"])
                 / (r["worker_cpu_seconds"] - q["worker_cpu_seconds"]) for r, q in zip(runs["warm_2"], small))
    assert client_share({**runs, "warm_2_small": small}) == pytest.approx(net[1])


def test_the_csv_table_holds_every_digit_of_the_table(tmp_path, rng):
    """write_csv wrote 6 significant digits: a volume of 359100.5 became 359100, an area in nm^2 1.52416e+08,
    and the in-memory table differed from the chunked run's Parquet one."""
    import csv

    from gpu_pipeline.measure import write_csv

    labels = make_touching_particles((40, 50), 6, seed=int(rng.integers(1e6)))[1]
    image = rng.random(labels.shape) * 1e5
    table = particle_table(labels, image, spacing=(0.1234567, 3.3333333))
    write_csv(table, tmp_path / "t.csv")
    with open(tmp_path / "t.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for column, values in table.items():
        read = np.array([float(row[column]) for row in rows])
        assert np.array_equal(read, np.asarray(values, dtype=np.float64)), column


@pytest.mark.parametrize("shape", [(30, 40, 1), (1, 30, 40)])
def test_particle_table_refuses_an_axis_of_one_voxel(rng, shape):
    """(rows, columns, 1) labels were measured as a volume of one plane: volume and centroid_z (the row), and
    centroid_x 0. Refused in one line, as separate refuses such an image."""
    from gpu_pipeline import DeclumpError

    _, labels = make_touching_particles((30, 40), 4, seed=int(rng.integers(1e6)))
    with pytest.raises(DeclumpError, match="one voxel along an axis") as caught:
        particle_table(labels.reshape(shape))
    assert "\n" not in str(caught.value)
    assert "area" in particle_table(labels)
