"""Where 1 -> 2 worker scaling goes, pass by pass: a chunked run on a warm local cluster of 1 and of 2 workers.

    python -m bench.pass_timeline [--shape 256,512,512] [--chunks 128,128,128] [--blocks 64,64,64] [--rounds 2]

``bench.throughput --chunked`` measures the whole run's scaling
efficiency t1 / (2 t2); this bench says which passes lose it. The volume
is ``bench.throughput``'s (same generator, seed, density and radii); the
run is ``run_chunked`` with ``bench.chunked``'s parameters, called in this
process on a running ``LocalCluster`` (``--scheduler``), as a long job
runs: the scheduler and the client share this process, as they do in
``declump run --cluster local``. ``--chunks``: the store's chunks;
``--blocks``: the run's processing blocks (``declump run --chunks``; by
default the store's chunks grouped into blocks of 128 voxels an edge). One cluster of 1 worker pinned to one core
(this process too) and one of 2 workers on two cores, each warmed by one
untimed run, then timed runs alternating between them.

Per pass (the library's DEBUG records of ``gpu_pipeline.chunked.passes``:
what, tasks, start and end on the client) it records the wall time, the
seconds the workers spent computing its tasks (Dask's task stream) and
their efficiency t1 / (2 t2); for the run, the time no worker computed
anything (the client's work between passes and the round trips to start
a pass), the time one worker computed while the other waited, the CPU
seconds of this process (client and scheduler) and of the workers, and
Dask's split of the tasks' time into their threads' CPU and the rest
(``thread-cpu``, ``thread-noncpu``); from these, where 2 t2 - t1 goes. A
task belongs to the pass in whose interval it starts; its times are the
worker's, moved onto the scheduler's clock by the worker's estimate of the
offset (on one machine a few milliseconds off, tens under load).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import (RESULTS, chunks_arg, machine_info, out_help, positive_int, radius_range_arg, shape_arg,
                          write_results)
from gpu_pipeline.synthetic import make_touching_particles

#: ``bench.chunked.PARAMS`` as keyword arguments of ``run_chunked``.
RUN_KWARGS = dict(sigma=1.0, min_distance=4.0, max_radius=13.0)


class PassRecords(logging.Handler):
    """Collects the library's per-pass records (``what``, ``tasks``, ``start``, ``end``)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.passes = []

    def emit(self, record):
        self.passes.append({k: getattr(record, k) for k in ("what", "tasks", "start", "end")})


def idle_seconds(intervals, start, end, min_gap=0.0):
    """Seconds of [start, end] covered by none of ``intervals`` ((begin, finish) pairs), counting gaps longer
    than ``min_gap`` only."""
    idle, reached = 0.0, start
    for begin, finish in sorted(intervals):
        if begin > reached and begin - reached > min_gap:
            idle += begin - reached
        reached = max(reached, finish)
    if end > reached and end - reached > min_gap:
        idle += end - reached
    return idle


def some_idle_seconds(per_worker, start, end):
    """Seconds of [start, end] in which at least one worker but not all of ``per_worker`` (one list of
    (begin, finish) compute intervals per worker) computed: the others idle while work was left."""
    merged = []
    for intervals in per_worker:  # each worker's own intervals made disjoint (threads of one worker overlap)
        union = []
        for begin, finish in sorted(intervals):
            if union and begin <= union[-1][1]:
                union[-1][1] = max(union[-1][1], finish)
            else:
                union.append([begin, finish])
        merged.append(union)
    edges = sorted([(begin, 1) for union in merged for begin, _ in union]
                   + [(finish, -1) for union in merged for _, finish in union])
    busy, at, seconds = 0, start, 0.0
    for time_, step in edges:
        now = min(max(time_, start), end)
        if 0 < busy < len(per_worker):
            seconds += now - at
        busy, at = busy + step, now
    return seconds


def task_seconds(digests):
    """Dask's own split of the time tasks ran (summed over every task of ``digests``, a worker's
    ``digests_total``): ``(cpu, off_cpu)``, the thread's CPU seconds and the rest (waiting for a core, the GIL,
    the disk)."""
    cpu = off = 0.0
    for key, value in digests.items():
        if isinstance(key, tuple) and len(key) == 5 and key[0] == "execute" and key[4] == "seconds":
            if key[3] == "thread-cpu":
                cpu += value
            elif key[3] == "thread-noncpu":
                off += value
    return cpu, off


def _worker_task_seconds(dask_worker):
    return task_seconds(dask_worker.digests_total)


def timeline(passes, stream, start, end):
    """Per pass: its tasks, wall seconds and the workers' compute seconds of the tasks that started in it; for the run:
    wall, the seconds no worker computed, and the same outside every pass (the client's steps between)."""
    per_worker = collections.defaultdict(list)
    for t in stream:
        per_worker[t["worker"]].extend((d["start"], d["stop"]) for d in t["startstops"] if d["action"] == "compute")
    workers = list(per_worker.values())
    computes = [c for intervals in workers for c in intervals]
    rows = []
    for p in passes:
        busy = sum(min(b, p["end"]) - a for a, b in computes if p["start"] <= a < p["end"])
        # Tasks: those the workers ran in the pass (the record counts the results the client asked for).
        rows.append({"what": p["what"], "tasks": sum(p["start"] <= a < p["end"] for a, _ in computes),
                     "seconds": p["end"] - p["start"],
                     "compute_seconds": busy,
                     "idle_seconds": idle_seconds([c for c in computes if p["start"] <= c[0] < p["end"]],
                                                  p["start"], p["end"]),
                     # A worker idle while another computes, within the pass: its tail, its single tasks.
                     "some_idle_seconds": some_idle_seconds(workers, p["start"], p["end"])})
    between = idle_seconds([(p["start"], p["end"]) for p in passes], start, end)
    return {"seconds": end - start, "passes": rows, "no_worker_computing": idle_seconds(computes, start, end),
            "some_workers_idle": some_idle_seconds(workers, start, end),
            "between_passes": between, "compute_seconds": sum(b - a for a, b in computes)}


def timed_run(volume, out, client, cluster, records, blocks=None):
    """One ``run_chunked`` on ``cluster`` (processing ``blocks``, None: its default): its timeline, this
    process's CPU seconds and the workers', and the blocks it used."""
    from dask.distributed import get_task_stream

    from gpu_pipeline.chunked.run import run_chunked

    shutil.rmtree(out, ignore_errors=True)
    records.passes.clear()
    workers_before, tasks_before = client.run(time.process_time), client.run(_worker_task_seconds)
    cpu, start = time.process_time(), time.time()
    with get_task_stream(client) as stream:
        summary = run_chunked(volume, out, chunks=blocks, scheduler=cluster.scheduler_address, verbose=False,
                              **RUN_KWARGS)
    end, cpu = time.time(), time.process_time() - cpu
    workers_after, tasks_after = client.run(time.process_time), client.run(_worker_task_seconds)
    result = timeline(list(records.passes), stream.data, start, end)
    result.update(command_cpu_seconds=cpu, blocks=list(summary["chunks"]),
                  worker_cpu_seconds=sum(workers_after[w] - workers_before[w] for w in workers_after),
                  task_cpu_seconds=sum(tasks_after[w][0] - tasks_before[w][0] for w in tasks_after),
                  task_off_cpu_seconds=sum(tasks_after[w][1] - tasks_before[w][1] for w in tasks_after))
    return result


def summarise(runs):
    """Medians per mode and per pass (passes matched by order: every run makes the same passes)."""
    out = {}
    for mode, rows in runs.items():
        out[mode] = {k: statistics.median(r[k] for r in rows) for k in
                     ("seconds", "no_worker_computing", "some_workers_idle", "between_passes", "compute_seconds",
                      "task_cpu_seconds", "task_off_cpu_seconds", "command_cpu_seconds", "worker_cpu_seconds")}
        out[mode]["passes"] = [{"what": p["what"], "tasks": p["tasks"],
                                **{k: statistics.median(r["passes"][i][k] for r in rows)
                                   for k in ("seconds", "compute_seconds", "idle_seconds", "some_idle_seconds")}}
                               for i, p in enumerate(rows[0]["passes"])]
    return out


def losses(one, two):
    """Where ``2 t2 - t1`` (worker-seconds a 2-worker run spends beyond the 1-worker run, from the summaries
    ``one`` and ``two``) goes: the tasks' CPU and off-core time grown, both workers idle (twice the 2-worker
    run's no-computing time against once the 1-worker run's), one idle while the other computes; the rest."""
    total = 2 * two["seconds"] - one["seconds"]
    parts = {"task_cpu": two["task_cpu_seconds"] - one["task_cpu_seconds"],
             "task_off_cpu": two["task_off_cpu_seconds"] - one["task_off_cpu_seconds"],
             "both_idle": 2 * two["no_worker_computing"] - one["no_worker_computing"],
             "one_idle": two["some_workers_idle"]}
    return {"total": total, **parts, "rest": total - sum(parts.values())}


def beyond_two(one, two, workers=16):
    """What the 1- and 2-worker summaries say of more workers (an extrapolation, not a measurement).

    ``client_share``: CPU seconds of the process holding the client and the
    scheduler per CPU second of the workers (2-worker run); that process
    runs on one core at most (one event loop, one GIL), so it keeps up with
    about ``1 / client_share`` workers (``workers_until_client_bound``).
    ``serial_share``: the 2-worker run's seconds outside every pass (the
    client's steps between them, which more workers do not shorten) over the
    1-worker run's wall time (with one worker the steps on the global peak
    list run in the client, with more they go to the workers, so the
    1-worker run's own steps overstate it); ``amdahl_speedup``: at most
    ``1 / (s + (1 - s) / workers)`` times one worker with ``workers`` of them.
    """
    share = two["command_cpu_seconds"] / two["worker_cpu_seconds"]
    serial = two["between_passes"] / one["seconds"]
    tasks = sum(p["tasks"] for p in two["passes"])
    return {"client_share": share, "workers_until_client_bound": 1.0 / share,
            "client_cpu_ms_per_task": 1e3 * two["command_cpu_seconds"] / tasks, "tasks": tasks,
            "serial_share": serial, "workers": workers,
            "amdahl_speedup": 1.0 / (serial + (1.0 - serial) / workers)}


def matched_passes(first, second):
    """The passes of two runs side by side, matched by name and by their order among passes of that name:
    ``(what, pass or None, pass or None)``, in the order of the run that has the pass (a step that runs in
    the client with one worker and as a pass with two appears in one run only)."""
    def keyed(passes):
        seen = {}
        out = []
        for p in passes:
            seen[p["what"]] = seen.get(p["what"], 0) + 1
            out.append(((p["what"], seen[p["what"]]), p))
        return out

    a, b = keyed(first), keyed(second)
    in_b = dict(b)
    rows, done = [], set()
    for key, p in a:
        rows.append((key[0], p, in_b.get(key)))
        done.add(key)
    for at, (key, p) in enumerate(b):
        if key not in done:
            # After the row of the pass before it in the second run.
            before = next((i for i, r in enumerate(rows) if b[at - 1][1] is r[2]), len(rows) - 1) if at else -1
            rows.insert(before + 1, (key[0], None, p))
    return rows


def markdown(result):
    one, two = result["summary"]["warm_1"], result["summary"]["warm_2"]
    m = result["machine"]
    lines = [f"# Chunked run pass by pass, 1 and 2 workers, {m['date'][:10]}", "",
             f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, {m['memory_gib']} GiB, GPU: "
             f"{(m['gpu'] or {}).get('name', 'none')}. Volume {'x'.join(map(str, result['shape']))} "
             f"({result['particles']} spheres, radius {result['radius'][0]:g}-{result['radius'][1]:g}, seed "
             f"{result['seed']}), stored in {'x'.join(map(str, result['chunks']))} chunks, processed in "
             f"{'x'.join(map(str, result['blocks']))} blocks; `run_chunked` with "
             f"{RUN_KWARGS} on a warm LocalCluster (1 thread per worker; this process, client and scheduler, "
             f"pinned with the workers), {result['rounds']} timed runs per cluster, alternating; medians.", "",
             "| pass | tasks | 1 worker s | its compute s | 2 workers s | their compute s | one of the 2 idle while the "
             "other computes, s | efficiency t1 / (2 t2) |",
             "|---|---|---|---|---|---|---|---|"]
    def cells(p):
        return f"{p['seconds']:.2f} | {p['compute_seconds']:.2f}" if p else "— | —"

    for what, p1, p2 in matched_passes(one["passes"], two["passes"]):
        tasks = " / ".join(str(p["tasks"]) if p else "—" for p in (p1, p2))
        if p1 and p2 and p1["tasks"] == p2["tasks"]:
            tasks = str(p1["tasks"])
        efficiency = f"{p1['seconds'] / (2 * p2['seconds']):.2f}" if p1 and p2 else "—"
        one_idle = f"{p2['some_idle_seconds']:.2f}" if p2 else "—"
        lines.append(f"| {what} | {tasks} | {cells(p1)} | {cells(p2)} | {one_idle} | {efficiency} |")
    lines += ["", "| whole run | 1 worker | 2 workers |", "|---|---|---|"]
    for key, label in (("seconds", "wall s"), ("compute_seconds", "workers computing tasks, s"),
                       ("task_cpu_seconds", "of which the tasks' threads on a core (Dask's thread-cpu), s"),
                       ("task_off_cpu_seconds", "and off it (thread-noncpu: waiting for a core, the GIL or the "
                                                "disk), s"),
                       ("worker_cpu_seconds", "workers' CPU s"), ("command_cpu_seconds", "this process's CPU s "
                                                                  "(client + scheduler)"),
                       ("no_worker_computing", "no worker computing, s"),
                       ("some_workers_idle", "a worker idle while another computes, s"),
                       ("between_passes", "outside every pass (client steps between passes), s")):
        lines.append(f"| {label} | {one[key]:.2f} | {two[key]:.2f} |")
    lines += ["", f"Scaling efficiency of the whole run t1 / (2 t2): **{one['seconds'] / (2 * two['seconds']):.2f}**"
              f" (per round: {', '.join(f'{e:.2f}' for e in result['efficiency'])})."]
    lost = losses(one, two)
    lines += ["", "What 2 workers lose against 1, in worker-seconds (medians; 2 t2 - t1 = "
              f"{lost['total']:.2f}): the tasks' CPU {lost['task_cpu']:+.2f}, their time off a core "
              f"{lost['task_off_cpu']:+.2f}, both workers idle {lost['both_idle']:+.2f} (2 x "
              f"{two['no_worker_computing']:.2f} s against {one['no_worker_computing']:.2f} s), one idle while the "
              f"other computes {lost['one_idle']:+.2f}; the rest {lost['rest']:+.2f} (the tasks' Dask overhead "
              "and the medians' mismatch)."]
    b = beyond_two(one, two)
    lines += ["", f"Beyond two workers (an extrapolation from these figures, not a measurement): the client and "
              f"the scheduler spend {b['client_share']:.3f} CPU s per CPU s of the workers "
              f"({b['client_cpu_ms_per_task']:.1f} ms per task, {b['tasks']} tasks); their one process keeps up "
              f"with about **{b['workers_until_client_bound']:.0f} workers** before it holds them up. The steps "
              f"between passes with 2 workers are {100 * b['serial_share']:.1f} % of the 1-worker run: at most "
              f"**{b['amdahl_speedup']:.1f}x** one worker with {b['workers']} workers (Amdahl)."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    import dask
    import zarr
    from dask.distributed import Client, LocalCluster

    from gpu_pipeline.chunked.workspace import LOCAL_CLUSTER_HTTP, local_cluster_config, pass_log

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=shape_arg, default=(256, 512, 512),
                        help="the generated volume, Z,Y,X (default %(default)s)")
    parser.add_argument("--chunks", type=chunks_arg, default=(128, 128, 128),
                        help="the store's chunks (default %(default)s)")
    parser.add_argument("--blocks", type=chunks_arg, default=None,
                        help="processing blocks (declump run --chunks; default: the run's own choice, the store's "
                             "chunks grouped into blocks of 128 voxels an edge)")
    parser.add_argument("--particles", type=positive_int, default=None,
                        help="spheres in the volume (default 1500 per 256^3, as bench.throughput)")
    parser.add_argument("--radius", type=radius_range_arg, default=(5.0, 12.0),
                        help="the spheres' smallest and largest radius, voxels (default 5,12)")
    parser.add_argument("--seed", type=int, default=7, help="the volume's seed (default %(default)s)")
    parser.add_argument("--rounds", type=positive_int, default=2,
                        help="timed runs per cluster, alternating (default %(default)s)")
    parser.add_argument("--out", default=None, help=out_help("pass_timeline"))
    args = parser.parse_args(argv)
    for option, value in (("--chunks", args.chunks), ("--blocks", args.blocks)):
        if value is not None and len(value) != len(args.shape):
            parser.error(f"{option} {','.join(map(str, value))} needs one length per axis of --shape")
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("bench.pass_timeline needs two cores (1 and 2 workers)")
    particles = args.particles or int(round(1500 * np.prod(args.shape) / 256 ** 3))
    image, _ = make_touching_particles(args.shape, particles, radius_range=args.radius, overlap=0.15,
                                       seed=args.seed)
    records = PassRecords()
    pass_log.addHandler(records)
    pass_log.setLevel(logging.DEBUG)
    runs = {"warm_1": [], "warm_2": []}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        volume = Path(tmp) / "in.zarr"
        zarr.create_array(str(volume), shape=image.shape, dtype=image.dtype, chunks=args.chunks,
                          compressors=zarr.codecs.ZstdCodec(level=3))[...] = image
        del image
        clusters = {}
        try:
            for n in (1, 2):
                os.sched_setaffinity(0, set(cores[:n]))  # the worker processes inherit it
                with dask.config.set(local_cluster_config()):
                    cluster = stack.enter_context(LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                                               memory_limit=0, **LOCAL_CLUSTER_HTTP))
                clusters[n] = (cluster, stack.enter_context(Client(cluster, set_as_default=False)))
            for r in range(args.rounds + 1):
                for n in (1, 2):
                    os.sched_setaffinity(0, set(cores[:n]))
                    cluster, client = clusters[n]
                    measured = timed_run(volume, Path(tmp) / f"out_{n}.zarr", client, cluster, records, args.blocks)
                    print(f"round {r} {n} worker(s): {measured['seconds']:.2f} s, no worker computing "
                          f"{measured['no_worker_computing']:.2f} s" + (" (warm-up)" if r == 0 else ""), flush=True)
                    if r:
                        runs[f"warm_{n}"].append(measured)
        finally:
            os.sched_setaffinity(0, set(cores))
            pass_log.removeHandler(records)
    summary = summarise(runs)
    result = {"machine": machine_info(), "shape": list(args.shape), "chunks": list(args.chunks),
              "blocks": runs["warm_1"][0]["blocks"],
              "particles": particles, "radius": list(args.radius), "seed": args.seed, "rounds": args.rounds,
              "runs": runs, "summary": summary, "beyond_two": beyond_two(summary["warm_1"], summary["warm_2"]),
              "efficiency": [a["seconds"] / (2 * b["seconds"]) for a, b in zip(runs["warm_1"], runs["warm_2"])]}
    stem = write_results(result, "pass_timeline", markdown(result), args.out)
    print(f"wrote {RESULTS / stem}.json and .md")
    return result


if __name__ == "__main__":
    main()
