"""Chunked building blocks equal the in-memory result for any chunking, on a real Dask cluster."""
import collections
import itertools

import numpy as np
import pytest
from scipy import ndimage as ndi

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")
zarr = pytest.importorskip("zarr")

from gpu_pipeline.chunked import label_chunked, otsu_threshold_chunked  # noqa: E402
from gpu_pipeline.stages.threshold import otsu_threshold  # noqa: E402
from gpu_pipeline.synthetic import make_touching_particles  # noqa: E402

CHUNKINGS = {
    2: [(64, 64), (37, 50), (9, 13)],            # divides; does not divide; smaller than a particle
    3: [(32, 32, 32), (17, 40, 23), (8, 9, 10)],  # the last: smaller than the smallest particle (10 voxels)
}


@pytest.mark.parametrize("ndim", [2, 3])
def test_labels_do_not_depend_on_chunking(cluster_client, rng, ndim):
    shape = (150, 170) if ndim == 2 else (40, 56, 50)
    _, truth = make_touching_particles(shape, 60 if ndim == 2 else 40, seed=int(rng.integers(1e6)))
    mask = (truth > 0) & (rng.random(shape) > 0.05)  # holes and ragged edges
    reference, n_ref = ndi.label(mask, ndi.generate_binary_structure(ndim, 1))
    for chunks in CHUNKINGS[ndim]:
        labels, n = label_chunked(da.from_array(mask, chunks=chunks))
        out = labels.compute()
        assert n == n_ref
        assert out.dtype == np.int32 and out.tobytes() == reference.astype(np.int32).tobytes(), chunks


def _brighter_logged(block, log, block_info=None):
    with open(log, "a") as f:  # the workers' calls, on disk
        f.write(" ".join(map(str, block_info[0]["chunk-location"])) + "\n")
    return block > 0.5


def test_a_components_pass_is_one_task_per_block_and_one_per_run_of_blocks(cluster_client, rng, tmp_path):
    """On a cluster, the pass computes each block of its input once, in one task with its labelling,
    staging and summary (a chain of elementwise steps before it included), and one task per run of blocks
    along the last axis hands their results over with those of their faces with their next blocks: 12 tasks
    here. It ran every step of the chain as a task of its own (60 tasks here), then one task per face (12),
    then a task for the result and one for the faces of each block with a next block (23); then a second
    task per block (16)."""
    from distributed import get_task_stream

    from gpu_pipeline.chunked.components import components_chunked
    from gpu_pipeline.chunked.workspace import Workspace

    image = rng.random((30, 40, 44))
    log = tmp_path / "calls.txt"
    values = da.from_array(image, chunks=(15, 20, 22)).map_blocks(_brighter_logged, str(log), dtype=bool)
    values = values.astype(np.uint8) + 1
    with get_task_stream(cluster_client) as stream:
        found = components_chunked(values, by_value=True, workspace=Workspace(tmp_path / "work"), name="sides")
    blocks = 8
    assert sorted(log.read_text().split("\n")[:-1]) == sorted(" ".join(map(str, i)) for i in
                                                             itertools.product(range(2), range(2), range(2)))
    names = [(key if isinstance(key, str) else key[0]).rsplit("-", 5)[0] for key in (t["key"] for t in stream.data)]
    assert names.count("_results_and_faces") == blocks // 2, names  # runs of 2 blocks along the last axis
    # and the input's own tasks (from_array, one per block): 20 here; 24 with a task per block, 31 before that
    assert len(stream.data) <= blocks + blocks // 2 + blocks, len(stream.data)
    reference = ndi.label(image > 0.5)[0], ndi.label(image <= 0.5)[0]
    assert found.n == reference[0].max() + reference[1].max()


def _origin_and_sum(block, beside, origin):
    return tuple(origin), int(block.sum())


def _origin_and_sum_as_objects(block, beside, origin):
    return np.array([tuple(origin), int(block.sum())], dtype=object)


def test_a_resumed_write_hands_back_every_measure_as_it_was_returned(rng, tmp_path):
    """Half the blocks written before, half now: each block's measure comes back as the measure returned it,
    an object array included (the written blocks' results travel in 1-element object blocks)."""
    from gpu_pipeline.chunked.workspace import write_blocks

    image = rng.random((30, 40))
    values = da.from_array((image > 0.5).astype(np.uint8), chunks=(15, 20))
    done = tmp_path / "done"
    write_blocks(values, tmp_path / "out.zarr", done, what="test")
    for marker in ("1.0", "1.1"):
        (done / marker).unlink()  # the bottom row not written yet
    _, measured = write_blocks(values, tmp_path / "out.zarr", done, what="test", measure=_origin_and_sum_as_objects)
    for got, (y, x) in zip(measured, itertools.product((0, 15), (0, 20))):
        assert isinstance(got, np.ndarray) and got.dtype == object
        assert got.tolist() == [(y, x), int((image[y:y + 15, x:x + 20] > 0.5).sum())]


@pytest.mark.parametrize("chunks", [((4, 13, 13), (24, 24), (23, 23)), ((16, 16, 9), (10, 20, 14), (46,)),
                                    ((12, 12, 6), (8, 8), (7, 7))])
def test_staged_stores_never_share_a_chunk_between_two_blocks(rng, tmp_path, chunks):
    """Blocks written concurrently must not write parts of one Zarr chunk (a read-modify-write that loses one
    of them: with a first block shorter than the next, the last plane of the second block was lost under load,
    one run in about 15). Every block of a staged store, a pass's own store and write_blocks' output starts
    on a chunk boundary of its store, and the values read back are the values written."""
    from gpu_pipeline.chunked.workspace import Workspace, write_blocks

    shape = tuple(sum(c) for c in chunks)
    values = da.from_array(rng.integers(1, 200, shape).astype(np.uint8), chunks=chunks)
    workspace = Workspace(tmp_path / "w")
    staged = workspace.stage("a", lambda: values, chunks=values.chunks, shape=shape, dtype=np.uint8)
    in_pass, after = workspace.stage_in_pass("b", values, lambda block: block, dtype=np.uint8)
    in_pass.compute()
    after()
    workspace.open_stage("d", shape=shape, chunks=values.chunks, dtype=np.uint8)
    write_blocks(values, tmp_path / "c.zarr", tmp_path / "c.done", what="test")
    for path in [tmp_path / "w" / "a.zarr", tmp_path / "w" / "b.zarr", tmp_path / "c.zarr", tmp_path / "w" / "d.zarr"]:
        store = zarr.open_array(str(path), mode="r")
        grid = store.shards or store.chunks
        for axis, sizes in enumerate(chunks):
            starts = np.cumsum((0,) + sizes[:-1])
            assert all(start % grid[axis] == 0 for start in starts), (path.name, axis, grid, sizes)
        if path.name != "d.zarr":  # open_stage only creates the store its pass writes
            assert np.array_equal(store[...], values.compute())
    assert np.array_equal(staged.compute(), values.compute())


def test_a_write_pass_computes_each_block_in_the_task_writing_it(cluster_client, rng, tmp_path):
    """On a cluster, write_blocks computes each block in the task that writes and measures it: no task beside
    the blocks' own (8 blocks on 2 threads run in groups of 2, 2, 1, 1, 1, 1: 6 tasks; before, a fused task
    and its alias per block: 16 tasks here; earlier, a block's task handed it to a write task: 24); a second
    call finds every block marked, computes nothing and measures the stored blocks."""
    import zarr
    from distributed import get_task_stream

    from gpu_pipeline.chunked.workspace import write_blocks

    image = rng.random((30, 40, 44))
    log = tmp_path / "calls.txt"
    values = da.from_array(image, chunks=(15, 20, 22)).map_blocks(_brighter_logged, str(log), dtype=bool)
    values = values.astype(np.uint8)
    expected = (image > 0.5).astype(np.uint8)
    sums = sorted(((z, y, x), int(expected[z:z + 15, y:y + 20, x:x + 22].sum()))
                  for z, y, x in itertools.product((0, 15), (0, 20), (0, 22)))
    with get_task_stream(cluster_client) as stream:
        computed, measured = write_blocks(values, tmp_path / "out.zarr", tmp_path / "done", what="test",
                                          measure=_origin_and_sum)
    assert computed == 8 and len(stream.data) == 6, [t["key"] for t in stream.data]
    assert len(log.read_text().split("\n")[:-1]) == 8
    assert zarr.open_array(str(tmp_path / "out.zarr"), mode="r")[...].tobytes() == expected.tobytes()
    assert sorted(measured) == sums
    computed, measured = write_blocks(values, tmp_path / "out.zarr", tmp_path / "done", what="test",
                                      measure=_origin_and_sum)
    assert computed == 0 and sorted(measured) == sums and len(log.read_text().split("\n")[:-1]) == 8


def _block_sum_and_place(block, block_info=None):
    out = np.empty((1,) * block.ndim, dtype=object)
    out[(0,) * block.ndim] = (tuple(block_info[0]["chunk-location"]), float(block.sum()))
    return out


def _pair_sums(*parts):
    return [part.flat[0][1] for part in parts]


@pytest.mark.parametrize("threads, expected_sizes", [
    (1, [8] * 6),
    (2, [8, 8, 8, 6, 5, 4, 3, 2, 1, 1, 1, 1]),
    (6, [4, 4, 4, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2] + [1] * 12),
    (40, None)])
def test_grouped_graph_runs_blocks_in_shrinking_groups_with_the_same_values(rng, threads, expected_sizes):
    """A layer of 48 block tasks runs in groups that each take the tasks left over twice the threads
    (rounded up; at most 8; on one thread 8 all through; none grouped where every group would be one task),
    in C order of the blocks, the groups' priorities falling in that order; the tasks that need them (here,
    one per pair of blocks along the first axis, each needing two blocks of different groups) get each
    block's own value; every block's value comes back in the caller's order, equal to Dask's own
    computation of the same tasks."""
    from dask import delayed
    from dask.local import get_sync

    from gpu_pipeline.chunked.workspace import _group_priority, grouped_graph

    image = rng.random((24, 32, 36))
    blocks = da.from_array(image, chunks=(6, 16, 6)).map_blocks(  # 4 x 2 x 6 = 48 blocks
        _block_sum_and_place, dtype=object, chunks=((1,) * 4, (1,) * 2, (1,) * 6))
    per_block = list(blocks.to_delayed().ravel())
    pairs = [delayed(_pair_sums)(a, b) for a, b in zip(per_block[:24], per_block[24:])]
    tasks = per_block + pairs
    graph, keys, unpack, priority = grouped_graph(tasks, threads)
    values = get_sync(graph, keys)
    by_key = dict(zip(keys, values))
    got = [by_key[key] if position is None else by_key[key][position] for key, position in unpack]
    expected = list(dask.compute(*tasks, scheduler="sync"))
    assert len(got) == len(expected) == 72
    for g, e in zip(got[:48], expected[:48]):
        assert g.flat[0] == e.flat[0]
    assert got[48:] == expected[48:]
    for (index, total), (z, y, x) in zip((g.flat[0] for g in got[:48]), np.ndindex(4, 2, 6)):
        assert index == (z, y, x) and total == pytest.approx(image[6 * z:6 * z + 6, 16 * y:16 * y + 16,
                                                                   6 * x:6 * x + 6].sum())
    members = [(key, position) for key, position in unpack[:48]]
    groups = list(dict.fromkeys(key for key, position in members if position is not None))
    if expected_sizes is None:
        assert not groups and priority == {}
        return
    assert [sum(1 for key, _ in members if key == group) for group in groups] == expected_sizes
    assert members == sorted(members, key=lambda m: (m[0][1], m[1]))  # consecutive blocks together, in order
    assert len(keys) == len(groups) + 24
    priorities = [_group_priority(priority, group) for group in groups]
    assert priorities == sorted(priorities, reverse=True) and len(set(priorities)) == len(groups)
    assert all(_group_priority(priority, key) == 0 for key in keys[len(groups):])  # the pairs: Dask's own


@pytest.mark.parametrize("seed", range(6))
def test_group_sizes_shrink_to_single_tasks_and_cover_the_layer(seed):
    """For any layer and thread count: the groups cover the layer, never grow, hold at most 8 and at most
    what is left over twice the threads (rounded up), and the last ``threads`` of them are single tasks, so a
    pass ends with every thread on work of one block."""
    from gpu_pipeline.chunked.workspace import group_sizes

    rng = np.random.default_rng(seed)
    for n, threads in zip(rng.integers(1, 3000, 40), rng.integers(2, 40, 40)):
        sizes = group_sizes(int(n), int(threads))
        if sizes is None:
            assert -(-int(n) // (2 * int(threads))) <= 1
            continue
        assert sum(sizes) == n and sizes == sorted(sizes, reverse=True) and max(sizes) <= 8
        left = int(n)
        for k in sizes:
            assert k <= max(1, -(-left // (2 * int(threads))))
            left -= k
        assert sizes[-min(len(sizes), int(threads)):] == [1] * min(len(sizes), int(threads))


def test_a_pass_of_many_blocks_on_a_cluster_runs_several_to_a_task(cluster_client, rng, tmp_path):
    """64 blocks on 2 worker threads: in shrinking groups (8, 8, 8, 8, 8, 6, 5, 4, 3, 2, 1, 1, 1, 1), each
    block written and marked, its measure handed back in order, each worker starting its groups in their
    order (largest first); a run resumed with half the markers gone computes only those blocks and measures
    the others from the store, each kind several to a task; and the pass's log record counts the tasks run."""
    import logging

    import zarr
    from distributed import get_task_stream

    from gpu_pipeline.chunked.workspace import pass_log, write_blocks

    tasks_for = {64: 14, 32: 10}.get  # 32: 8, 6, 5, 4, 3, 2, 1, 1, 1, 1
    image = rng.random((32, 48, 64))
    log = tmp_path / "calls.txt"
    values = da.from_array(image, chunks=(8, 12, 16)).map_blocks(_brighter_logged, str(log), dtype=bool)
    values = values.astype(np.uint8)
    expected = (image > 0.5).astype(np.uint8)
    corners = list(itertools.product(range(0, 32, 8), range(0, 48, 12), range(0, 64, 16)))
    sums = [((z, y, x), int(expected[z:z + 8, y:y + 12, x:x + 16].sum())) for z, y, x in corners]
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler, level = Keep(logging.DEBUG), pass_log.level
    pass_log.addHandler(handler)
    pass_log.setLevel(logging.DEBUG)
    try:
        with get_task_stream(cluster_client) as stream:
            computed, measured = write_blocks(values, tmp_path / "out.zarr", tmp_path / "done", what="test",
                                              measure=_origin_and_sum)
        assert computed == 64 and len(stream.data) == tasks_for(64), [t["key"] for t in stream.data]
        assert [r.tasks for r in records] == [tasks_for(64)]
        started = collections.defaultdict(list)  # per worker, its groups by start
        for task in sorted(stream.data, key=lambda t: min(s["start"] for s in t["startstops"])):
            started[task["worker"]].append(task["key"][1])
        assert sorted(i for places in started.values() for i in places) == list(range(14))
        assert all(places == sorted(places) for places in started.values()), dict(started)
        assert 0 in [places[0] for places in started.values()]  # the largest group first
        assert len(log.read_text().split("\n")[:-1]) == 64
        assert zarr.open_array(str(tmp_path / "out.zarr"), mode="r")[...].tobytes() == expected.tobytes()
        assert measured == sums  # in the blocks' order
        for marker in sorted((tmp_path / "done").iterdir())[::2]:
            marker.unlink()
        with get_task_stream(cluster_client) as stream:
            computed, measured = write_blocks(values, tmp_path / "out.zarr", tmp_path / "done", what="test",
                                              measure=_origin_and_sum)
        # 32 computed and 32 measured from the store, several to a task
        assert computed == 32 and len(stream.data) == 2 * tasks_for(32), [t["key"] for t in stream.data]
        assert measured == sums and len(log.read_text().split("\n")[:-1]) == 96
    finally:
        pass_log.removeHandler(handler)
        pass_log.setLevel(level)


def test_staged_labelling_equals_scipy_and_labels_each_block_once(rng, tmp_path):
    """With a workspace the blocks are labelled in one pass whose local ids every later pass reads back."""
    import zarr

    from gpu_pipeline.chunked.workspace import Workspace

    _, truth = make_touching_particles((40, 56, 50), 40, seed=int(rng.integers(1e6)))
    mask = (truth > 0) & (rng.random(truth.shape) > 0.05)
    reference, n_ref = ndi.label(mask, ndi.generate_binary_structure(3, 1))
    for chunks in CHUNKINGS[3]:
        workspace = Workspace(tmp_path / str(chunks))
        labels, n = label_chunked(da.from_array(mask, chunks=chunks), workspace=workspace, name="components")
        assert n == n_ref and labels.compute().tobytes() == reference.astype(np.int32).tobytes(), chunks
        grid = da.from_array(mask, chunks=chunks)
        assert workspace.computed["components"] == grid.npartitions
        local = zarr.open_array(str(tmp_path / str(chunks) / "components.zarr"), mode="r")
        assert local.dtype == np.int32
        # Each stored block holds that block's own components, numbered from 1.
        block = tuple(slice(0, c) for c in chunks)
        expected_block, _ = ndi.label(mask[block], ndi.generate_binary_structure(3, 1))
        assert np.array_equal(local[block], expected_block)


def test_unique_ids_equals_numpy_unique(rng):
    """Counting (ids within a few times the length) and sorting (ids spread wide) give np.unique's arrays."""
    from gpu_pipeline.array_algorithms import unique_ids

    cases = [rng.integers(0, 300, 5000), rng.integers(10**6, 10**6 + 40, 2000).astype(np.int32),
             rng.integers(0, 10**12, 3000), np.repeat(rng.integers(0, 50, 30), rng.integers(1, 9, 30)),
             np.zeros(0, np.int64)]
    for values in cases:
        for flags in itertools.product([False, True], repeat=2):
            kwargs = dict(zip(("return_inverse", "return_counts"), flags))
            got, want = unique_ids(values, **kwargs), np.unique(values, **kwargs)
            got, want = (got, want) if any(flags) else ((got,), (want,))
            assert len(got) == len(want)
            for g, w in zip(got, want):
                np.testing.assert_array_equal(g, w)
            assert got[0].dtype == values.dtype


def test_a_run_collects_garbage_less_often_and_restores_the_thresholds():
    import gc

    from gpu_pipeline.chunked.workspace import RUN_GC_THRESHOLDS, fewer_full_collections

    before = gc.get_threshold()
    assert RUN_GC_THRESHOLDS[0] > before[0]  # fewer collections than Python's default, not more
    with fewer_full_collections():
        inside = gc.get_threshold()
    assert inside == RUN_GC_THRESHOLDS and gc.get_threshold() == before
    with pytest.raises(KeyboardInterrupt), fewer_full_collections():
        raise KeyboardInterrupt  # Ctrl-C during a run
    assert gc.get_threshold() == before
    # Two runs overlapping (threads of one process): the first to end leaves the second's thresholds.
    first, second = fewer_full_collections(), fewer_full_collections()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert gc.get_threshold() == RUN_GC_THRESHOLDS
    second.__exit__(None, None, None)
    assert gc.get_threshold() == before


def test_otsu_of_chunks_equals_in_memory(cluster_client, rng):
    for image in (rng.integers(0, 4000, (60, 70, 50)).astype(np.uint16),
                  rng.gamma(2.0, 3.0, (60, 70, 50)).astype(np.float32)):
        expected = otsu_threshold(image)
        for chunks in CHUNKINGS[3]:
            assert otsu_threshold_chunked(da.from_array(image, chunks=chunks)) == expected


def test_empty_mask_gives_no_labels(rng):
    labels, n = label_chunked(da.zeros((40, 40), dtype=bool, chunks=(16, 16)))
    assert n == 0 and not labels.compute().any()


def _ome_zarr(path, data, scale, chunks):
    import zarr

    group = zarr.open_group(str(path), mode="w")
    array = group.create_array("0", shape=data.shape, dtype=data.dtype, chunks=chunks)
    array[...] = data
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": n} for n in "tczyx"],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": list(scale)}]}]}]}
    return array


def test_ome_zarr_volume_opens_lazily_with_spacing_and_channel(tmp_path, rng):
    from gpu_pipeline._backend import DeclumpError
    from gpu_pipeline.chunked.source import open_volume

    data = rng.integers(0, 255, (1, 2, 20, 30, 40)).astype(np.uint8)
    _ome_zarr(tmp_path / "img.zarr", data, (1, 1, 2.0, 0.5, 0.5), (1, 1, 8, 16, 16))
    volume, spacing = open_volume(tmp_path / "img.zarr", channel=1, chunks=(7, 11, 40))
    assert spacing == [2.0, 0.5, 0.5] and volume.chunks[0] == (7, 7, 6)
    np.testing.assert_array_equal(volume.compute(), data[0, 1])
    with pytest.raises(DeclumpError, match="2 channels; pick one with --channel"):
        open_volume(tmp_path / "img.zarr")
    with pytest.raises(DeclumpError, match="not a Zarr store"):
        open_volume(tmp_path / "nothing.zarr")


@pytest.mark.parametrize("store_chunks, shape, expected", [
    ((64, 64, 64), (256, 256, 256), (128, 128, 128)),   # small chunks grouped two by two
    ((24, 24, 24), (48, 96, 96), (48, 96, 96)),          # an axis shorter than the target: its whole extent
    ((100, 30, 200), (400, 400, 400), (200, 150, 200)),  # whole stored chunks, past the target where they must
    ((200, 160, 128), (400, 400, 400), (200, 160, 128)),  # long enough already: the store's chunks
    ((1, 512, 512), (300, 512, 512), (128, 512, 512)),   # single planes: 128 of them, 2^25 voxels
    ((1, 2048, 2048), (100, 2048, 2048), (8, 2048, 2048)),  # ... as many as 2^25 voxels hold
    ((64, 64), (5000, 3000), (1024, 1024)),              # 2D
    ((64, 64, 64), (1024, 2048, 4096), (256, 256, 256)),  # 2^33 voxels: the large volumes' edge
    ((64, 64, 64), (1024, 2048, 4095), (128, 128, 128)),  # one plane of voxels short of it
    ((128, 128, 128), (4096, 4096, 4096), (256, 256, 256)),
    ((1, 4096, 4096), (1024, 4096, 4096), (2, 4096, 4096)),  # single planes: 2^25 voxels still bound a block
    ((64, 64), (100000, 100000), (1024, 1024)),          # a large 2D image keeps the 2D edge
])
def test_default_blocks_group_whole_stored_chunks(store_chunks, shape, expected):
    from gpu_pipeline.chunked.source import default_blocks

    assert default_blocks(store_chunks, shape) == expected


def test_default_blocks_properties_on_random_layouts(rng):
    from gpu_pipeline.chunked.source import (BLOCK_EDGE, BLOCK_VOXELS, LARGE_BLOCK_EDGE, LARGE_VOLUME_VOXELS,
                                             block_edge, default_blocks)

    for trial in range(400):
        ndim = int(rng.integers(2, 4))
        # A quarter of them volumes that may reach the large volumes' edge (up to 4000^3 in 3D).
        high = (3000 if ndim == 2 else 600) if trial % 4 else (200000 if ndim == 2 else 4000)
        shape = tuple(int(n) for n in rng.integers(1, high, ndim))
        large = ndim == 3 and np.prod(shape, dtype=np.float64) >= LARGE_VOLUME_VOXELS
        assert block_edge(shape) == (LARGE_BLOCK_EDGE[3] if large else BLOCK_EDGE[ndim])
        chunks = tuple(int(c) for c in rng.integers(1, 300, ndim))
        block = default_blocks(chunks, shape)
        stored = [min(c, n) for c, n in zip(chunks, shape)]
        for b, c, n in zip(block, chunks, shape):
            assert b == n or b % c == 0, (chunks, shape, block)  # whole stored chunks, or the whole axis
            assert min(c, n) <= b <= n
        if np.prod(block) > BLOCK_VOXELS:  # only where the stored chunk alone is that large
            assert tuple(block) == tuple(stored)
        for axis, (b, c, n) in enumerate(zip(block, chunks, shape)):
            if b < min(block_edge(shape), n):  # short of the target: one more stored chunk passes the budget
                grown = list(block)
                grown[axis] = min(n, b + c)
                assert np.prod(grown) > BLOCK_VOXELS, (chunks, shape, block)


def test_open_volume_gives_a_large_store_the_large_blocks(tmp_path):
    """`declump run`'s blocks (``open_volume(chunks="auto")``) of stores whose chunks are not written (the
    metadata alone: 2^33 voxels of fill value): 256^3 blocks from 2^33 voxels on, 128^3 below."""
    from gpu_pipeline.chunked.source import open_volume

    for shape, expected in (((1024, 2048, 4096), (256, 256, 256)), ((1024, 2048, 4095), (128, 128, 128))):
        path = tmp_path / f"{shape[-1]}.zarr"
        zarr.create_array(str(path), shape=shape, dtype=np.uint8, chunks=(64, 64, 64))
        volume, _ = open_volume(path, chunks="auto", missing_chunks="fill")
        assert volume.chunksize == expected


def test_declump_run_groups_small_stored_chunks_by_default(tmp_path, rng):
    """`declump run` without --chunks on a store of 32^3 chunks: blocks of whole chunks, 128 voxels on the
    long axes (the short one whole), and the in-memory labels."""
    from gpu_pipeline import separate
    from gpu_pipeline.chunked.run import run_chunked

    image, _ = make_touching_particles((64, 160, 160), 90, seed=int(rng.integers(1e6)))
    zarr.create_array(str(tmp_path / "in.zarr"), shape=image.shape, dtype=image.dtype, chunks=(32, 32, 32))[...] = image
    summary = run_chunked(tmp_path / "in.zarr", tmp_path / "out.zarr", max_radius=13, workers=1, verbose=False)
    assert summary["chunks"] == [64, 128, 128]
    labels = zarr.open_array(str(tmp_path / "out.zarr" / "particles" / "0"), mode="r")
    assert labels.chunks == (64, 128, 128)
    expected = separate(image, sigma=1.0, threshold="otsu", min_distance=4.0, max_hole_size=0, min_size=None,
                        reject_annotations=False, max_radius=13)
    assert labels[...].tobytes() == expected.tobytes()


def test_corrupt_chunk_is_named(tmp_path, rng):
    from gpu_pipeline._backend import DeclumpError
    from gpu_pipeline.chunked.source import open_volume

    data = rng.integers(0, 255, (1, 1, 16, 32, 32)).astype(np.uint8)
    _ome_zarr(tmp_path / "img.zarr", data, (1, 1, 1, 1, 1), (1, 1, 8, 16, 16))
    (tmp_path / "img.zarr" / "0" / "c" / "0" / "0" / "1" / "0" / "1").write_bytes(b"not zstd")
    volume, _ = open_volume(tmp_path / "img.zarr")
    with pytest.raises(DeclumpError, match=r"chunk \(0, 0, 1, 0, 1\) of .* could not be read"):
        volume.compute(scheduler="threads")


@pytest.mark.parametrize("ndim", [2, 3])
def test_regions_do_not_depend_on_chunking(cluster_client, rng, ndim, tmp_path):
    from cpu_fallback import ops
    from gpu_pipeline.chunked.foreground import regions_chunked
    from gpu_pipeline.chunked.workspace import Workspace
    from gpu_pipeline.stages.cleanup import clean_mask
    from gpu_pipeline.stages.threshold import choose_polarity, foreground

    shape, spacing = ((160, 150), (1.0, 1.0)) if ndim == 2 else ((24, 56, 50), (2.0, 1.0, 1.0))
    image, _ = make_touching_particles(shape, 50 if ndim == 2 else 40, spacing=spacing, polarity="dark",
                                       seed=int(rng.integers(1e6)))
    smoothed = ops.gaussian(image, tuple(1.0 / s for s in spacing))
    t = otsu_threshold(smoothed)
    side = choose_polarity(smoothed, t, "auto")
    fg = clean_mask(foreground(smoothed, t, side), spacing=spacing, min_size=30, max_hole_size=0)
    expected, n_expected = ops.label(fg)
    for chunks in CHUNKINGS[ndim]:
        regions, n, threshold, polarity = regions_chunked(da.from_array(image, chunks=chunks), spacing=spacing,
                                                          sigma=1.0, min_size=30,
                                                          workspace=Workspace(tmp_path / str(chunks)))
        assert (threshold, polarity, n) == (t, side, n_expected) == (t, "dark", n_expected)
        assert regions.compute().tobytes() == expected.tobytes(), chunks


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("threshold", ["otsu", "li"])
def test_regions_reuse_the_polarity_labelling_of_both_sides(rng, tmp_path, threshold, ndim):
    """Where the polarity needs both sides labelled (blobs as frequent on the border as inside), that pass
    also gives the foreground's components at Otsu's threshold (no components pass of its own), and the
    regions are still those of the in-memory stages; at another threshold (Li's) the foreground is labelled."""
    from cpu_fallback import ops
    from gpu_pipeline.chunked.foreground import regions_chunked
    from gpu_pipeline.chunked.workspace import Workspace
    from gpu_pipeline.stages.cleanup import clean_mask
    from gpu_pipeline.stages.threshold import (CONNECTIVITY_WEIGHT, border_fraction_above, choose_polarity,
                                               foreground, intensity_histogram, li_from_histogram)

    shape, spacing = ((150, 140), (1.0, 1.0)) if ndim == 2 else ((30, 48, 44), (1.0, 1.0, 1.0))
    blobs = ndi.binary_dilation(rng.random(shape) < (0.01 if ndim == 2 else 0.004), iterations=2)
    image = (blobs * 1000 + rng.normal(0, 150, shape)).astype(np.float32)
    smoothed = ops.gaussian(image, spacing)
    at = otsu_threshold(smoothed)
    assert abs((smoothed > at).mean() - border_fraction_above(smoothed, at)) <= CONNECTIVITY_WEIGHT  # both labelled
    t = at if threshold == "otsu" else li_from_histogram(*intensity_histogram(smoothed))
    side = choose_polarity(smoothed, at, "auto")
    expected, n_expected = ops.label(clean_mask(foreground(smoothed, t, side), spacing=spacing, min_size=20,
                                                max_hole_size=0))
    assert n_expected > 20
    for chunks in [(75, 47), (150, 33)] if ndim == 2 else [(15, 24, 22), (30, 17, 44)]:
        workspace = Workspace(tmp_path / threshold / str(chunks))
        regions, n, got_t, got_side = regions_chunked(da.from_array(image, chunks=chunks), spacing=spacing,
                                                      sigma=1.0, threshold=threshold, min_size=20, workspace=workspace)
        assert (got_t, got_side, n) == (t, side, n_expected)
        assert regions.compute().tobytes() == expected.tobytes(), chunks
        # Otsu's: both sides staged, no pass of the foreground's own; Li's: the reverse.
        assert sorted(set(workspace.computed) & {"sides", "components"}) == \
            (["sides"] if threshold == "otsu" else ["components"])


@pytest.mark.parametrize("ndim", [2, 3])
def test_smoothing_read_from_the_store_equals_in_memory_in_two_tasks_per_chunk(tmp_path, rng, ndim):
    """A stored volume is smoothed in two tasks per chunk, its halo from its neighbours (edges repeated at
    the volume's border): the same bytes as in memory and as map_overlap on the same array in memory."""
    from cpu_fallback import ops
    from gpu_pipeline.chunked.foreground import smooth_chunked
    from gpu_pipeline.chunked.source import open_volume

    shape = (45, 61) if ndim == 2 else (19, 33, 28)
    sigmas = [(1.0,) * ndim, (0.6, 1.7) if ndim == 2 else (0.5, 1.5, 1.0)]
    chunkings = [(16, 20), (45, 9)] if ndim == 2 else [(8, 11, 28), (19, 10, 9)]
    for dtype in (np.uint8, np.float32):
        data = (rng.random((1, 2) + shape) * 200).astype(dtype)
        path = tmp_path / f"{np.dtype(dtype)}.zarr"
        if ndim == 3:  # an OME-Zarr image, one channel of two picked: reads go through the channel selection
            _ome_zarr(path, data, (1, 1, 1.0, 1.0, 1.0), (1, 1, 7, 7, 7))
        else:  # a plain Zarr array
            zarr.create_array(str(path), shape=shape, dtype=dtype, chunks=(7, 7))[...] = data[0, 1]
        for sigma in sigmas:
            expected = ops.gaussian(data[0, 1], sigma)
            for chunks in chunkings:
                volume, _ = open_volume(path, channel=1 if ndim == 3 else None, chunks=chunks)
                smoothed = smooth_chunked(volume, sigma)
                assert len(dict(smoothed.__dask_graph__())) == 2 * smoothed.npartitions
                assert smoothed.compute().tobytes() == expected.tobytes(), (dtype, sigma, chunks)
                overlap = smooth_chunked(da.from_array(data[0, 1], chunks=chunks), sigma)
                assert len(dict(overlap.__dask_graph__())) > 2 * overlap.npartitions
                assert overlap.chunks == smoothed.chunks
                assert overlap.compute().tobytes() == expected.tobytes(), (dtype, sigma, chunks)


def test_a_smoothing_pass_reads_each_block_twice_from_the_store_and_no_halo(tmp_path, rng):
    """Reading a block with its halo from a compressed store decodes every stored chunk the halo touches
    whole (27 for an interior 3D block); the pass reads each block alone, twice (its neighbours' slabs, then
    its own smoothing), and gets the same bytes as in memory, the short first chunk's halo edges included.
    With slab files, one task writes those of a run of blocks along the last axis."""
    from cpu_fallback import ops
    from gpu_pipeline.chunked.foreground import smooth_chunked
    from gpu_pipeline.chunked.source import StoredVolume, open_volume, register_stored, stored_volume
    from gpu_pipeline.chunked.workspace import BLOCK_GROUP, block_run

    class Counting(StoredVolume):
        def on(self, device):
            return self

        def read(self, box):
            reads.append(tuple((b.start, b.stop) for b in box))
            return super().read(box)

    data = (rng.random((30, 40, 44)) * 200).astype(np.uint8)
    zarr.create_array(str(tmp_path / "in.zarr"), shape=data.shape, dtype=data.dtype, chunks=(10, 20, 22))[...] = data
    sigma = (1.0, 1.5, 0.7)
    for k, chunks in enumerate([(10, 20, 22), ((3, 9, 9, 9), (15, 15, 10), (22, 22))]):  # 2nd: a first block shorter than the halo
        reads = []
        volume, _ = open_volume(tmp_path / "in.zarr", chunks=chunks)
        inner = stored_volume(volume)
        counting = Counting(inner.array, inner.path, inner.selection)  # the registry holds it weakly
        register_stored(volume, counting)
        for spill in (None, tmp_path / f"halos{k}"):  # slabs in memory, then in one file per block
            if spill is not None:
                spill.mkdir()
            smoothed = smooth_chunked(volume, sigma, spill=None if spill is None else str(spill))
            assert smoothed.compute(scheduler="threads").tobytes() == ops.gaussian(data, sigma).tobytes(), chunks
            # Slab files: one task writes those of a run of BLOCK_GROUP blocks along the last axis.
            shell_tasks = sum(1 for key in dict(smoothed.__dask_graph__())
                              if isinstance(key, tuple) and "-shells-" in key[0])
            runs = int(np.prod(smoothed.numblocks[:-1])) * -(-smoothed.numblocks[-1] // BLOCK_GROUP)
            assert shell_tasks == (smoothed.npartitions if spill is None else runs) and runs < smoothed.npartitions
            if spill is not None:
                # Each block's task waits for the slab files of every neighbour's run, and a distributed scheduler
                # queues it as a task with no inputs (its inputs are paths): marked as a data producer.
                graph = dict(smoothed.__dask_graph__())
                shells = {key[0] for key in graph if isinstance(key, tuple) and "-shells-" in key[0]}.pop()
                for index in itertools.product(*[range(n) for n in smoothed.numblocks]):
                    task = graph[(smoothed.name, *index)]
                    near = {(shells, *block_run(j)) for j in itertools.product(*[
                        range(max(0, i - 1), min(n, i + 2)) for i, n in zip(index, smoothed.numblocks)]) if j != index}
                    assert set(task.dependencies) == near and task.data_producer, index
        assert len(list(spill.iterdir())) == smoothed.npartitions
        starts = [np.concatenate([[0], np.cumsum(c)[:-1]]) for c in smoothed.chunks]
        blocks = [tuple((int(s[i]), int(s[i] + c[i])) for s, c, i in zip(starts, smoothed.chunks, index))
                  for index in itertools.product(*[range(len(c)) for c in smoothed.chunks])]
        assert sorted(reads) == sorted(blocks * 4), chunks  # twice per block for each of the two runs


def test_chunks_smaller_than_the_halo_are_refused():
    from gpu_pipeline._backend import DeclumpError
    from gpu_pipeline.chunked.foreground import smooth_chunked

    with pytest.raises(DeclumpError, match="smaller than the smoothing halo"):
        smooth_chunked(da.zeros((40, 40), dtype=np.float32, chunks=(5, 5)), (2.0, 2.0))
    # A short remainder chunk is merged into its neighbour, not refused.
    smoothed = smooth_chunked(da.ones((40, 40), dtype=np.float32, chunks=(13, 13)), (2.0, 2.0))
    assert smoothed.chunks == ((13, 13, 14), (13, 13, 14))


@pytest.mark.parametrize("ndim", [2, 3])
def test_one_pass_piece_tables_equal_in_memory_piece_stats_and_faces(rng, tmp_path, ndim):
    """The fused pass's per-piece values, sizes and face counts equal the in-memory ones, staged or not."""
    from gpu_pipeline.chunked.components import components_chunked
    from gpu_pipeline.chunked.workspace import Workspace
    from gpu_pipeline.stages.components import count_pairs, face_pairs_between_labels, piece_stats
    from skimage.measure import label as sk_label

    shape = (90, 110) if ndim == 2 else (30, 45, 40)  # multiples of the 5-voxel cells
    # Few values on a coarse grid, upsampled: pieces of one value split by others, touching chunk faces.
    coarse = rng.integers(0, 6, tuple(s // 5 for s in shape))
    labels = np.kron(coarse, np.ones((5,) * ndim, dtype=np.int64)).astype(np.int32)
    labels[rng.random(shape) < 0.03] = rng.integers(0, 6)
    pieces = sk_label(labels, connectivity=1, background=0)
    value, size = piece_stats(pieces, labels)
    expected_faces = face_pairs_between_labels(pieces, labels, near=np.ones(shape, dtype=bool))  # array path
    for k, chunks in enumerate(CHUNKINGS[ndim]):
        workspace = Workspace(tmp_path / str(k)) if k % 2 else None
        found = components_chunked(da.from_array(labels, chunks=chunks), by_value=True, faces=True,
                                   workspace=workspace, name="pieces")
        assert found.n == pieces.max() and found.labels.compute().tobytes() == pieces.astype(np.int32).tobytes()
        assert np.array_equal(found.value, value) and np.array_equal(found.size[1:], size[1:]), chunks
        a, b, faces = found.piece_pairs  # touching pieces, summed per (piece, the other piece's label)
        for got, want in zip(count_pairs(a, found.value[b], faces), expected_faces):
            assert np.array_equal(got, want), chunks
        # A table through the local ids is the table of the final ids.
        table = np.concatenate([[0], rng.permutation(found.n) + 1]).astype(np.int32)  # background stays 0
        assert np.array_equal(found.through(table, np.int32).compute(), table[pieces])


@pytest.mark.parametrize("shape", [(50,), (1, 40), (33, 47), (9, 1, 12), (21, 30, 26), (3, 40, 1)])
def test_compiled_face_count_equals_the_array_path(rng, shape):
    """Every face between different labels, counted by the compiled pass, as by the array code (near = all)."""
    from skimage.measure import label as sk_label

    from gpu_pipeline.stages.components import count_pairs, face_pairs_between_labels

    labels = rng.integers(0, 4, shape).astype(np.int32)
    labels[rng.random(shape) < 0.5] = 2  # runs of one label next to others and to background
    pieces = sk_label(labels, connectivity=1, background=0).astype(np.int32)
    everywhere = np.ones(shape, dtype=bool)
    for other in (None, pieces):  # the neighbouring label, or the neighbouring piece
        compiled = face_pairs_between_labels(pieces, labels, other=other)
        array = face_pairs_between_labels(pieces, labels, near=everywhere, other=other)
        assert len(compiled[0]) > 0 or 1 in shape
        for got, want in zip(compiled, array):
            assert got.dtype == want.dtype and np.array_equal(got, want)
    # Piece pairs summed per (piece, label of the other piece) are the label pairs.
    value = np.zeros(pieces.max() + 1, dtype=np.int64)
    value[pieces.ravel()] = labels.ravel()
    a, b, faces = face_pairs_between_labels(pieces, labels, other=pieces)
    for got, want in zip(count_pairs(a, value[b], faces), face_pairs_between_labels(pieces, labels)):
        assert np.array_equal(got, want)


_IN_THREAD_CHILD = r"""
import sys, threading
import numpy as np
from gpu_pipeline.chunked.source import open_array, write_region, zarr_call
path, region = sys.argv[1], (slice(3, 40), slice(5, 61), slice(0, 17))
block = np.load(sys.argv[2])
write_region(path, region, block)
array = open_array(path)
back = np.asarray(zarr_call(array.async_array.getitem, region))
names = sorted(t.name for t in threading.enumerate())
print("same" if back.tobytes() == block.tobytes() else "differ", names)
"""


def test_zarr_reads_and_writes_run_in_the_calling_thread(tmp_path, rng):
    """A sharded store (inner chunks, zstd) written and read back through zarr_call in a fresh process: the
    data round-trip, and Zarr never started its I/O thread or its codec thread pool (its synchronous API
    hands every call to them, and every chunk's codec and file access on to the pool)."""
    import subprocess
    import sys

    path = tmp_path / "sharded.zarr"
    zarr.create_array(str(path), shape=(45, 70, 33), dtype=np.int32, chunks=(8, 16, 11), shards=(24, 32, 33),
                      compressors=zarr.codecs.ZstdCodec(level=1), fill_value=0)
    block = rng.integers(0, 2 ** 31 - 1, (37, 56, 17)).astype(np.int32)
    np.save(tmp_path / "block.npy", block)
    found = subprocess.run([sys.executable, "-c", _IN_THREAD_CHILD, str(path), str(tmp_path / "block.npy")],
                           capture_output=True, text=True, check=True).stdout
    assert found.startswith("same"), found
    assert "zarr_io" not in found and "zarr_pool" not in found, found
    # and Zarr's own reading sees what was written
    assert zarr.open_array(str(path), mode="r")[3:40, 5:61, 0:17].tobytes() == block.tobytes()


def test_block_writes_hand_large_chunks_to_the_kernel_in_pieces(tmp_path, rng, monkeypatch):
    """write_region writes a chunk larger than WRITE_PIECE (an uncompressed float32 one) in pieces of at most
    that: Zarr reads back every value, no temporary file is left, and small chunks (and the metadata) take
    Zarr's own path."""
    import gpu_pipeline.chunked.source as source
    import gpu_pipeline.io as io

    sizes = []
    original = io.write_in_pieces

    def counted(handle, data):
        sizes.append(memoryview(data).nbytes)
        return original(handle, data)

    monkeypatch.setattr(io, "write_in_pieces", counted)
    image = rng.random((40, 64, 64), dtype=np.float32)
    path = tmp_path / "v.zarr"
    zarr.create_array(str(path), shape=image.shape, dtype=image.dtype, chunks=(20, 64, 64), compressors=None,
                      fill_value=0)
    source.write_region(path, (slice(0, 40), slice(0, 64), slice(0, 64)), image)
    assert sizes == [20 * 64 * 64 * 4] * 2  # both chunks (320 KiB each > 256 KiB), through the pieces
    assert zarr.open_array(str(path), mode="r")[...].tobytes() == image.tobytes()
    assert not list(path.rglob("*.partial"))
    small = tmp_path / "small.zarr"
    zarr.create_array(str(small), shape=image.shape, dtype=image.dtype, chunks=(8, 16, 16), compressors=None)
    source.write_region(small, (slice(0, 40), slice(0, 64), slice(0, 64)), image)
    assert len(sizes) == 2 and zarr.open_array(str(small), mode="r")[...].tobytes() == image.tobytes()


def test_zarr_calls_agree_with_zarr_from_threads_and_inside_a_running_event_loop(tmp_path, rng):
    """Boxes read through StoredVolume (zarr_call) equal Zarr's own reads from four threads at once (each its
    own event loop), and from a thread that runs an event loop (a notebook's), which hands the call to a thread
    of its own."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from gpu_pipeline.chunked.source import StoredVolume, open_array, write_region

    image = rng.integers(0, 60000, (40, 50, 60)).astype(np.uint16)
    zarr.create_array(str(tmp_path / "v.zarr"), shape=image.shape, dtype=image.dtype, chunks=(16, 16, 16),
                      compressors=zarr.codecs.ZstdCodec(level=1))[...] = image
    stored = StoredVolume(open_array(tmp_path / "v.zarr"), str(tmp_path / "v.zarr"), (slice(None),) * 3)
    boxes = []
    for _ in range(24):
        low = rng.integers(0, image.shape)
        high = [int(rng.integers(lo + 1, n + 1)) for lo, n in zip(low, image.shape)]
        boxes.append(tuple(slice(int(a), b) for a, b in zip(low, high)))
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(stored.read, boxes))
    assert all(g.tobytes() == image[b].tobytes() for g, b in zip(got, boxes))

    written = rng.integers(0, 60000, (16, 16, 16)).astype(np.uint16)

    async def inside_a_loop():
        write_region(tmp_path / "v.zarr", (slice(16, 32), slice(0, 16), slice(32, 48)), written)
        return [stored.read(b) for b in boxes[:4]]

    image[16:32, 0:16, 32:48] = written
    got = asyncio.run(inside_a_loop())
    assert all(g.tobytes() == image[b].tobytes() for g, b in zip(got, boxes))
    assert zarr.open_array(str(tmp_path / "v.zarr"), mode="r")[...].tobytes() == image.tobytes()
