"""No quadratic blow-ups: plateaus of thousands of peaks, one huge region, large min_distance.

The stages whose work grows with pairs of peaks (spacing, neck search) or
with centroids per block (k-means candidate lists) are checked against
simple references on random data, and the worst cases run in a subprocess
whose peak resident memory is measured.
"""
import itertools
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import label as ndi_label

from cpu_fallback.kernels import greedy_spacing
from gpu_pipeline.stages.split import BLOCK_DIVISOR, local_candidates

REPO = Path(__file__).resolve().parents[1]
#: The bound the worst cases must stay within (peak RSS of the whole process).
MEMORY_BOUND_MB = 2048


def _sequential_spacing(coords, half):
    """Greedy spacing one point at a time: keep a point unless a kept one lies strictly inside its ellipsoid."""
    kept = []
    for i, p in enumerate(coords):
        def inside(q):
            d = q - p
            if (d[half == 0] != 0).any():
                return False
            return ((d[half > 0] / half[half > 0]) ** 2).sum() < 1
        if not any(inside(coords[j]) for j in kept):
            kept.append(i)
    keep = np.zeros(len(coords), bool)
    keep[kept] = True
    return keep


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_greedy_spacing_keeps_what_a_sequential_greedy_keeps(rng, ndim):
    for _ in range(15):
        shape = rng.integers(3, (40, 20, 10)[ndim - 1], ndim)
        coords = np.stack(np.nonzero(rng.random(shape) < rng.uniform(0.05, 1.0)), axis=1).astype(np.int64)
        coords += rng.integers(0, 1000, ndim)  # the kernel must not assume an origin at zero
        half = rng.integers(0, 7, ndim)
        np.testing.assert_array_equal(greedy_spacing(coords, half), _sequential_spacing(coords, half))


def _local_candidates_reference(coords, voxel_region, centres, centre_region, *, spacing, margin):
    """The loop over block offsets that local_candidates replaced (one array pass per offset)."""
    block = np.asarray([max(1, int(math.ceil(margin / BLOCK_DIVISOR / float(s)))) for s in spacing], np.int64)
    reach = [int(math.ceil(margin / float(s) / int(b))) for s, b in zip(spacing, block)]
    scale = np.asarray(spacing, np.float64)
    grid = np.maximum(coords.max(axis=0) // block + 1, (centres.max(axis=0) // block).astype(np.int64) + 1)
    strides = np.concatenate([np.cumprod(grid[::-1])[::-1][1:], [1]])
    n_blocks = int(np.prod(grid))
    home = np.floor(centres / block).astype(np.int64)
    lists = {}
    for offset in itertools.product(*[range(-r, r + 1) for r in reach]):
        nb = home + np.asarray(offset)
        inside = ((nb >= 0) & (nb < grid)).all(axis=1)
        gap = np.maximum(np.maximum(nb * block - centres, centres - ((nb + 1) * block - 1)), 0) * scale
        for c in np.flatnonzero(inside & ((gap * gap).sum(axis=1) <= margin * margin)):
            key = int(centre_region[c]) * n_blocks + int((nb[c] * strides).sum())
            lists.setdefault(key, set()).add(int(c))
    result = []
    for x, r in zip(coords, voxel_region):
        key = int(r) * n_blocks + int(((x // block) * strides).sum())
        result.append(sorted(lists.get(key) or np.flatnonzero(centre_region == r).tolist()))
    return result


def _random_candidate_case(rng, ndim, *, density, n_centres, margin_range):
    """Voxels (a 40-voxel cube or square at ``density``) and centroids in three regions, and a margin."""
    coords = np.stack(np.nonzero(rng.random((40,) * ndim) < density), axis=1).astype(np.int64)
    voxel_region = rng.integers(1, 4, len(coords))
    centres = rng.integers(0, 40, (n_centres, ndim)).astype(np.float64)
    centre_region = np.sort(rng.integers(1, 4, n_centres))
    return coords, voxel_region, centres, centre_region, float(rng.uniform(*margin_range))


@pytest.mark.parametrize("ndim,spacing", [(2, (1.0, 1.0)), (3, (2.0, 1.0, 1.5))])
def test_local_candidates_equal_the_per_offset_loop(rng, ndim, spacing, monkeypatch):
    from cpu_fallback import kernels
    from gpu_pipeline.stages import split

    coords, voxel_region, centres, centre_region, margin = _random_candidate_case(
        rng, ndim, density=0.05, n_centres=30, margin_range=(3, 12))
    groups, offsets, ids, n_fallback = local_candidates(coords, voxel_region, centres, centre_region,
                                                        spacing=spacing, margin=margin)
    ours = [ids[offsets[g]:offsets[g + 1]].tolist() for g in groups]
    ref = _local_candidates_reference(coords, voxel_region, centres, centre_region, spacing=spacing, margin=margin)
    assert ours == ref
    assert 0 < n_fallback < len(coords)
    # The array forms (the GPU's) find the same lists as the compiled ones.
    monkeypatch.setattr(kernels, "block_groups", split.block_groups)
    monkeypatch.setattr(kernels, "block_pairs", split.block_pairs)
    groups2, offsets2, ids2, _ = local_candidates(coords, voxel_region, centres, centre_region, spacing=spacing,
                                                  margin=margin)
    assert [ids2[offsets2[g]:offsets2[g + 1]].tolist() for g in groups2] == ours


@pytest.mark.parametrize("ndim", [2, 3])
def test_block_lists_compiled_and_array_forms_agree(rng, ndim, monkeypatch):
    """The (region, block) lists from the compiled pair pass equal the array form's (the GPU's), key for key,
    on fractional centroids, anisotropic spacing, margins from under a voxel to many blocks, and ``listed``."""
    from cpu_fallback import kernels
    from gpu_pipeline.stages import split

    fields = ("block", "strides", "keys", "offsets", "ids")
    for trial in range(40):
        n = int(rng.integers(1, 300))
        shape = rng.integers(5, 80, ndim)
        centres = rng.integers(0, shape, (n, ndim)) + (rng.random((n, ndim)) if trial % 2 else 0.0)
        centre_region = np.sort(rng.integers(1, 20, n))
        kwargs = dict(spacing=tuple(rng.choice([0.3, 0.5, 1.0, 1.7, 2.0], ndim)), margin=float(rng.uniform(0.5, 25)),
                      highest=shape - 1, listed=rng.random(n) < 0.6 if trial % 3 == 0 else None)
        compiled = split.block_lists(centres, centre_region, **kwargs)
        with monkeypatch.context() as m:
            m.setattr(kernels, "block_pairs", split.block_pairs)
            array_form = split.block_lists(centres, centre_region, **kwargs)
        for field in fields:
            np.testing.assert_array_equal(getattr(compiled, field), getattr(array_form, field), err_msg=field)
        assert (compiled.n_blocks, compiled.fallback_base) == (array_form.n_blocks, array_form.fallback_base)
        # Each list holds its ids in ascending order (the assignment's tie rule takes the first).
        for start, stop in zip(compiled.offsets[:-1], compiled.offsets[1:]):
            assert np.all(np.diff(compiled.ids[start:stop]) > 0)


@pytest.mark.parametrize("ndim,spacing", [(2, (1.0, 1.0)), (3, (2.0, 1.0, 1.5))])
def test_lists_from_the_near_centroids_are_the_full_lists_inside_the_box(rng, ndim, spacing):
    """``listed``: only the centroids near a box get per-block lists; inside the box every voxel's list is still
    the one from all centroids (the brute-force reference), fallbacks included."""
    coords, voxel_region, centres, centre_region, margin = _random_candidate_case(
        rng, ndim, density=0.2, n_centres=200, margin_range=(3, 8))
    # A box of 8-13 voxels an edge inside the volume: its near centroids are some, never all, of the 200.
    low = rng.integers(8, 18, ndim)
    high = low + rng.integers(7, 13, ndim)
    block = np.asarray([max(1, int(math.ceil(margin / BLOCK_DIVISOR / float(s)))) for s in spacing])
    gap = np.maximum(np.maximum((low - block) - centres, centres - (high + block)), 0) * np.asarray(spacing)
    listed = (gap * gap).sum(axis=1) <= margin * margin
    assert 0 < listed.sum() < len(centres)
    groups, offsets, ids, _ = local_candidates(coords, voxel_region, centres, centre_region, spacing=spacing,
                                               margin=margin, listed=listed)
    ref = _local_candidates_reference(coords, voxel_region, centres, centre_region, spacing=spacing, margin=margin)
    inside = np.flatnonzero(((coords >= low) & (coords <= high)).all(axis=1))
    assert inside.size
    assert [ids[offsets[groups[i]]:offsets[groups[i] + 1]].tolist() for i in inside] == [ref[i] for i in inside]


def test_a_chunk_with_fallback_voxels_lists_only_its_near_centroids(rng, monkeypatch):
    """Dense touching spheres in small chunks: some chunks hold voxels farther than the margin from every peak
    of their region, which fall back to the region's full list. That pass builds per-block lists only for
    the centroids near the chunk (before, for every centroid of its regions: 1.25 s a chunk on a 640^3
    volume's 16,600-centroid region), and the labels equal in-memory ``separate``."""
    da = pytest.importorskip("dask.array")
    import dask

    from gpu_pipeline import separate
    from gpu_pipeline.chunked.pipeline import separate_chunked
    from gpu_pipeline.stages import split
    from gpu_pipeline.synthetic import make_touching_particles

    built = []
    original = split.block_lists

    def recording(centres, centre_region, *, listed=None, **kwargs):
        built.append((len(centres), len(centres) if listed is None else int(np.sum(listed))))
        return original(centres, centre_region, listed=listed, **kwargs)

    monkeypatch.setattr(split, "block_lists", recording)
    options = dict(spacing=(1.0, 1.0, 1.0), sigma=1.0, min_distance=3.0, max_radius=10.0)
    for _ in range(5):  # dense enough that nearly every volume has fallback voxels somewhere
        image, _ = make_touching_particles((96,) * 3, 300, radius_range=(3.0, 8.0), overlap=0.25,
                                           seed=int(rng.integers(1e6)))
        built.clear()
        with dask.config.set(scheduler="sync"):
            labels, _ = separate_chunked(da.from_array(image, chunks=24), **options)
            labels = labels.compute()
        if any(listed < n for n, listed in built):
            break
    fallback_passes = [i for i, (n, listed) in enumerate(built) if listed < n]
    assert fallback_passes, "no chunk fell back in five volumes; the case is not exercised"
    for i in fallback_passes:  # the pass before, the same chunk's, built the lists of exactly those centroids
        listed = built[i][1]
        assert listed == 0 or built[i - 1] == (listed, listed)
    expected = separate(image, threshold="otsu", max_hole_size=0.0, min_size=None, reject_annotations=False,
                        **options)
    np.testing.assert_array_equal(labels, expected)


def _peak_rss_of(script):
    """Run ``script`` in a fresh interpreter (address space capped at 4 GB so a regression fails, not the machine).

    The script prints one JSON line; returns it with the child's peak RSS in MB.
    """
    runner = textwrap.dedent("""
        import json, resource, runpy, sys
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
        out = {}
        try:
            exec(sys.argv[1], {"out": out})
        except MemoryError as exc:
            out["error"] = f"MemoryError: {exc}"
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(out))
    """)
    env = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", runner, textwrap.dedent(script)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_user_report_emps_image_with_holes_filled_runs_within_the_memory_bound(shared_data):
    """Issue 16: a 517x512 EM image, ``min_distance=4, max_hole_size=139000``, asked for 2 GiB arrays and was killed."""
    path = shared_data / "emps_subset" / "images" / "fab3633337.png"
    if not path.exists():
        pytest.skip(f"{path} not found")
    out = _peak_rss_of(f"""
        import numpy as np
        from PIL import Image
        from gpu_pipeline import separate
        image = np.asarray(Image.open({str(path)!r}))[..., 0]
        labels, details = separate(image, min_distance=4, max_hole_size=139000, polarity="bright",
                                   return_details=True)
        out.update(n_peaks=details.n_peaks, n_particles=int(labels.max()), shape=list(labels.shape))
    """)
    assert "error" not in out, out
    # The holes filled, the whole frame is one region with a plateau of peaks: one particle.
    assert out["shape"] == [517, 512] and out["n_peaks"] > 10000 and out["n_particles"] == 1
    assert out["peak_rss_mb"] < MEMORY_BOUND_MB, out


def test_a_plateau_of_thousands_of_peaks_in_one_region_runs_within_the_memory_bound():
    """All foreground in 3D: every voxel a peak candidate, thousands of overlapping peaks, one region."""
    out = _peak_rss_of("""
        import numpy as np
        from cpu_fallback import separate
        mask = np.ones((96, 96, 96), bool)
        labels, details = separate(None, mask=mask, min_distance=4, max_hole_size=0, return_details=True)
        out.update(n_peaks=details.n_peaks, n_particles=int(labels.max()), whole=bool((labels == 1).all()))
    """)
    assert "error" not in out, out
    assert out["n_peaks"] >= 10000 and out["n_particles"] == 1 and out["whole"]
    assert out["peak_rss_mb"] < MEMORY_BOUND_MB, out


@pytest.mark.parametrize("shape, radius", [((1024, 1024), 40), ((80, 128, 128), 25)])
def test_specks_around_a_few_large_particles_enumerate_pairs_in_proportion_to_the_peaks(rng, monkeypatch, shape,
                                                                                        radius):
    """A noisy classifier's foreground: tens of thousands of specks (peaks of height 1) and a few large balls.
    The cells of the neck search and of the ball shares grow to the balls' reach; the specks' pairs are not
    enumerated at that scale, nor in cells of 8 voxels (hundreds of specks' pairs each in 3D). Pairs per peak:
    8,700 in 2D (94 s) and more than 300 in 3D before, 15 and 12 now (4096^2, 446,000 peaks: 57 -> 5 s; 3D,
    400,000: 28 -> 3 s). The pairs are counted, not timed."""
    from cpu_fallback import separate

    specks = rng.random(shape) < (0.03 if len(shape) == 2 else 0.02)
    mask = specks | np.roll(specks, 1, axis=-1)
    grid = np.indices(shape)
    for centre in rng.uniform(0.25, 0.75, (4 if len(shape) == 2 else 2, len(shape))) * shape:
        mask |= sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius ** 2
    counted = _counting_pairs(monkeypatch)
    labels, details = separate(None, mask=mask, min_distance=1, max_hole_size=0, return_details=True)
    sizes = np.bincount(labels[mask])[1:]
    assert details.n_peaks > 30000 and labels.max() > 15000
    assert (sizes > 1000).sum() >= 1 and sizes.max() > 0.4 * np.pi * radius ** 2  # the large ones stay large
    assert 0 < sum(counted) < 40 * details.n_peaks


def _counting_pairs(monkeypatch):
    """A list that the neck search and the ball shares add each batch's number of candidate pairs to."""
    from gpu_pipeline.stages import peaks as peak_stage

    counted = []
    enumerate_pairs = peak_stage._neighbour_cell_pairs

    def counting(*args, **kwargs):
        for i, j in enumerate_pairs(*args, **kwargs):
            counted.append(i.size)
            yield i, j

    monkeypatch.setattr(peak_stage, "_neighbour_cell_pairs", counting)
    return counted


def test_a_capped_plateau_where_every_voxel_is_a_peak_enumerates_pairs_in_proportion_to_the_peaks(monkeypatch):
    """Two balls of radius 20 under --max-radius 4 with --min-distance 1 (the chunked default cap): every voxel of
    their plateaus is a peak (36,000). In cells of 8 voxels from the start the neck search met 3,300 pairs per
    peak (122 million, 22 s); from one voxel up, the plateau's peaks join as one group early and each cell's
    run of it pairs with nothing of its own group."""
    from cpu_fallback import separate

    shape = (64, 96, 96)
    grid = np.indices(shape)
    mask = np.zeros(shape, bool)
    for centre in ((32, 30, 30), (32, 62, 64)):
        mask |= sum((g - c) ** 2 for g, c in zip(grid, centre)) <= 20 ** 2
    counted = _counting_pairs(monkeypatch)
    labels, details = separate(None, mask=mask, min_distance=1, max_radius=4, max_hole_size=0, return_details=True)
    assert details.n_peaks > 30000 and labels.max() == 2
    assert 0 < sum(counted) < 40 * details.n_peaks


def test_pocket_holes_around_a_band_of_equal_peaks_and_in_a_sponge_run_within_the_memory_bound():
    """pocket_holes where one hole is reached by thousands of peaks (a square band 10 voxels wide around a
    square hole of side 1200: its centre line is a plateau of equal maxima, one peak every voxel or two with a
    window of one voxel; without the cap of peaks per hole, 1.8 GB and 6 s for a band of side 800) and where
    tens of thousands of holes are (a sponge). Neither hole is a pocket: the band is one hollow particle."""
    out = _peak_rss_of("""
        import numpy as np
        from scipy import ndimage as ndi
        from gpu_pipeline.stages.cleanup import pocket_holes
        after = np.zeros((1400, 1400), bool)
        after[90:1310, 90:1310] = True
        before = after.copy()
        before[100:1300, 100:1300] = False
        band, count = pocket_holes(before, after, (1.0, 1.0), 1.0)
        rng = np.random.default_rng(7)
        sponge = np.ones((2048, 2048), bool)
        sponge[:8] = sponge[-8:] = False
        sponge[:, :8] = sponge[:, -8:] = False
        dots = np.zeros_like(sponge)
        dots[tuple(rng.integers(10, 2038, (2, 40000)))] = True
        sponge &= ~ndi.binary_dilation(dots, iterations=2)
        holes = ndi.binary_fill_holes(sponge) & ~sponge
        found, pockets = pocket_holes(sponge, sponge | holes, (1.0, 1.0), 1.0)
        out.update(band_pockets=count, band_any=bool(band.any()), holes=int(ndi.label(holes)[1]),
                   pocket_voxels_inside=bool((found <= holes).all()))
    """)
    assert "error" not in out, out
    assert out["band_pockets"] == 0 and not out["band_any"] and out["holes"] > 20000 and out["pocket_voxels_inside"]
    assert out["peak_rss_mb"] < MEMORY_BOUND_MB, out


def _listed_power_argmin(coords, groups, offsets, ids, centres, radii, spacing):
    """Brute force: per voxel, the first candidate of its list with the smallest power distance."""
    out = np.empty(len(coords), np.int64)
    for v, (x, g) in enumerate(zip(coords, groups)):
        c = ids[offsets[g]:offsets[g + 1]]
        d = (((x - centres[c]) * np.asarray(spacing)) ** 2).sum(axis=1) - radii[c] ** 2
        out[v] = c[np.argmin(d)]
    return out


@pytest.mark.parametrize("ndim,spacing", [(2, (1.0, 1.0)), (3, (1.0, 0.5, 1.0))])
def test_power_assignment_and_pruned_lists_choose_the_power_nearest_centroid(rng, ndim, spacing):
    """max_iter=0: the compiled assignment, and the lists pruned for the GPU path, pick the region's power argmin."""
    from gpu_pipeline.stages import kmeans

    shape = (48,) * ndim if ndim == 2 else (20, 40, 24)
    coords = np.stack(np.nonzero(rng.random(shape) < 0.5), axis=1).astype(np.int64)
    regions = 1 + (coords[:, -1] >= shape[-1] // 2)
    centres = np.concatenate([rng.integers(0, s, (25, 1)) for s in shape], axis=1).astype(np.float64)
    centres[:5] = centres[5:10]  # duplicated centroids: exact ties, the lower index must win
    centre_region = 1 + (centres[:, -1] >= shape[-1] // 2)
    order = np.argsort(centre_region, kind="stable")
    centres, centre_region = centres[order], centre_region[order]
    radii = rng.choice([2.0, 3.0, 5.5], len(centres))  # few distinct radii: ties between neighbours too
    d = (((coords[:, None, :] - centres[None]) * np.asarray(spacing)) ** 2).sum(axis=2) - radii ** 2
    d[regions[:, None] != centre_region[None]] = np.inf
    expected = np.argmin(d, axis=1)  # the margin below covers each region, so lists hold the whole region
    groups, offsets, ids, _ = local_candidates(coords, regions, centres, centre_region, spacing=spacing, margin=80.0)
    chosen, _, n_iter = kmeans.batched_kmeans(coords, groups, offsets, ids, centres, spacing=spacing, radii=radii,
                                              max_iter=0)
    np.testing.assert_array_equal(chosen, expected)
    assert n_iter == 0
    pieces, pruned_offsets, pruned_ids = kmeans.prune_candidates(coords, groups, offsets, ids, centres,
                                                                 spacing=spacing, power=radii ** 2)
    assert np.diff(pruned_offsets).mean() < np.diff(offsets)[groups].mean() / 2  # it does prune
    np.testing.assert_array_equal(
        _listed_power_argmin(coords, pieces, pruned_offsets, pruned_ids, centres, radii, spacing), expected)


def _split_by_candidate_lists(regions, n_regions, peaks, radii, *, spacing, margin=None, peak_group=None):
    """The assignment as the chunked engine and the GPU run it: coordinate arrays, lists, batched_kmeans."""
    from gpu_pipeline.stages.kmeans import batched_kmeans
    from gpu_pipeline.stages.split import block_candidates, kmeans_seeds, peaks_per_region

    peak_region, _ = peaks_per_region(regions, n_regions, peaks)
    seeds = kmeans_seeds(peak_region, n_regions, peaks, radii, margin=margin, peak_group=peak_group)
    labels = regions.astype(np.int64)
    flat, coords, groups, offsets, ids = block_candidates(regions, seeds, origin=(0,) * regions.ndim, spacing=spacing)
    chosen, _, _ = batched_kmeans(coords, groups, offsets, ids, seeds.centres, spacing=spacing, radii=seeds.radii,
                                  max_iter=0)
    labels.ravel()[flat] = n_regions + 1 + seeds.centre_label[chosen]
    return labels


def _random_regions_and_peaks(rng, shape, n_peaks, radii_choice):
    regions, n_regions = ndi_label(rng.random(shape) < 0.93)
    peaks = np.unique(np.stack([rng.integers(0, s, n_peaks) for s in shape], axis=1), axis=0)
    peaks = peaks[regions[tuple(peaks.T)] > 0]
    return regions, n_regions, peaks, rng.choice(radii_choice, len(peaks))


@pytest.mark.parametrize("ndim,spacing,margin", [(2, (1.0, 1.0), None), (3, (2.0, 1.0, 1.5), None),
                                                 (3, (1.0, 1.0, 1.0), 3.0), (3, (1.0, 0.5, 1.0), 60.0)])
def test_whole_volume_assignment_equals_the_candidate_list_path(rng, ndim, spacing, margin):
    """The CPU's one-pass assignment (cells, lists pruned per cell) gives the labels of the array path.

    Margins: default, small (many voxels fall back to their region's full
    list) and large (lists of every centroid of a region, wider than the
    per-cell pruning threshold, so pruning is exercised); few distinct radii
    and grouped peaks make exact ties.
    """
    from gpu_pipeline.stages.split import split_regions_kmeans

    shape = (150, 130) if ndim == 2 else (28, 44, 36)
    regions, n_regions, peaks, radii = _random_regions_and_peaks(rng, shape, 300 if ndim == 2 else 400,
                                                                 [2.0, 3.0, 4.5])
    peak_group = np.arange(len(peaks))
    peak_group[1::7] = peak_group[0::7][:len(peak_group[1::7])]  # some peaks share a label
    for group in (None, peak_group):
        ours, n_iter = split_regions_kmeans(regions, n_regions, peaks, radii, spacing=spacing, max_iter=0,
                                            margin=margin, peak_group=group)
        expected = _split_by_candidate_lists(regions, n_regions, peaks, radii, spacing=spacing, margin=margin,
                                             peak_group=group)
        assert n_iter == 0
        np.testing.assert_array_equal(ours, expected)


def test_whole_volume_assignment_is_the_power_diagram_of_each_regions_peaks(rng):
    """With a margin covering every region, each voxel goes to its region's power-nearest peak (ties: C order)."""
    from gpu_pipeline.stages.split import split_regions_kmeans

    spacing = (1.0, 0.5, 1.0)
    regions, n_regions, peaks, radii = _random_regions_and_peaks(rng, (20, 40, 24), 150, [2.0, 3.0, 5.5])
    ours, _ = split_regions_kmeans(regions, n_regions, peaks, radii, spacing=spacing, max_iter=0, margin=80.0)
    coords = np.stack(np.nonzero(regions), axis=1)
    peak_region = regions[tuple(peaks.T)]
    d = (((coords[:, None, :] - peaks[None]) * np.asarray(spacing)) ** 2).sum(axis=2) - radii ** 2
    d[regions[tuple(coords.T)][:, None] != peak_region[None]] = np.inf
    nearest = np.argmin(d, axis=1)  # peaks are in C order, so the first minimum is the first in C order
    k = np.bincount(peak_region, minlength=n_regions + 1)
    multi = k[regions[tuple(coords.T)]] >= 2
    # Multi-peak regions' centroids are numbered by region, then C order within the region.
    centre_order = np.argsort(np.where(k[peak_region] >= 2, peak_region, n_regions + 1), kind="stable")
    centre_index = np.empty(len(peaks), np.int64)
    centre_index[centre_order] = np.arange(len(peaks))
    got = ours[tuple(coords.T)]
    np.testing.assert_array_equal(got[multi], n_regions + 1 + centre_index[nearest[multi]])
    np.testing.assert_array_equal(got[~multi], regions[tuple(coords.T)][~multi])
