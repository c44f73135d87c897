"""The automatic foreground: threshold methods, auto choice, scale, hole filling, annotations, chunked refusal."""
import json

import numpy as np
import pytest
import tifffile
from skimage.filters import threshold_li, threshold_triangle

from bench.peers import skimage_watershed
from cpu_fallback import separate
from gpu_pipeline._backend import DeclumpError
from gpu_pipeline.cli import main
from gpu_pipeline.metrics import evaluate
from gpu_pipeline.stages.annotations import annotation_ink, annotation_mask, info_band
from gpu_pipeline.stages.scale import typical_radius
from gpu_pipeline.stages.threshold import (intensity_histogram, li_from_histogram,
                                           percentile_from_histogram, threshold_foreground,
                                           triangle_from_histogram)
from gpu_pipeline.synthetic import make_touching_particles, make_uneven_nuclei


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_li_and_triangle_equal_skimage_on_integer_images(rng, dtype):
    image = np.concatenate([rng.normal(40, 8, 6000), rng.normal(150, 30, 50 * rng.integers(6, 60))])
    image = np.clip(image, 0, 255).astype(dtype).reshape(-1, 50)
    counts, bins = intensity_histogram(image)
    assert li_from_histogram(counts, bins) == pytest.approx(threshold_li(image), abs=1e-9)
    assert triangle_from_histogram(counts, bins) == threshold_triangle(image)
    assert percentile_from_histogram(counts, bins, 30) == np.percentile(image, 30, method="higher")


def test_li_and_triangle_on_float_images_within_one_bin_of_skimage(rng):
    image = np.concatenate([rng.normal(-2, 1, 6000), rng.gamma(2.0, 2.0, 1500)]).astype(np.float32).reshape(-1, 75)
    counts, bins = intensity_histogram(image)
    width = (bins.high - bins.low) / bins.nbins
    assert abs(li_from_histogram(counts, bins) - threshold_li(image)) <= width
    assert abs(triangle_from_histogram(counts, bins) - threshold_triangle(image)) <= width


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_li_for_dark_particles_is_skimage_li_of_the_inverted_image(rng, dtype):
    """Li's threshold for dark particles is scikit-image's Li of the inverted image, mapped back (Li's criterion
    is not symmetric: its plain value lies on the particles' side of Otsu's on an inverted image)."""
    image = np.concatenate([rng.normal(40, 8, 6000), rng.normal(150, 30, 50 * rng.integers(6, 60))])
    image = np.clip(image, 0, 255).astype(dtype).reshape(-1, 50)
    top = int(image.max()) + int(image.min())
    inverted = (top - image.astype(np.int64)).astype(dtype)  # dark particles on a bright background
    counts, bins = intensity_histogram(inverted)
    assert li_from_histogram(counts, bins, "dark") == pytest.approx(top - threshold_li(image), abs=1e-9)
    assert li_from_histogram(counts, bins, "dark") > threshold_li(inverted)  # toward the background, not the particles


def test_auto_threshold_finds_dim_dark_particles_as_it_finds_dim_bright_ones(rng):
    """Dim and dark nuclei on a bright background (brightfield, an inverted fluorescence frame): auto takes Li
    for the dim ones as it does on the bright original, and scores as it does there (before, Li's plain value
    lay on the particles' side for dark images, auto never took it, and the dim nuclei were lost)."""
    for _ in range(3):
        image, truth = make_uneven_nuclei((256, 256), 60, seed=int(rng.integers(1e6)))
        top = int(image.max()) + int(image.min())
        inverted = (top - image.astype(np.int64)).astype(image.dtype)
        bright, bright_details = separate(image, return_details=True)
        dark, dark_details = separate(inverted, return_details=True)
        assert (bright_details.polarity, dark_details.polarity) == ("bright", "dark")
        assert bright_details.threshold_method == dark_details.threshold_method == "li"
        assert dark_details.threshold == pytest.approx(top - bright_details.threshold, abs=0.5)
        f1_bright, f1_dark = evaluate(bright, truth)["f1_50"], evaluate(dark, truth)["f1_50"]
        assert abs(f1_dark - f1_bright) <= 0.03, (f1_dark, f1_bright)
        assert f1_dark > evaluate(separate(inverted, threshold="otsu"), truth)["f1_50"]


def test_typical_radius_is_the_particles_not_the_specks(rng):
    radius = float(rng.uniform(6, 10))
    image, truth = make_touching_particles((200, 200), 30, radius_range=(radius, radius), overlap=0.1,
                                           seed=int(rng.integers(1e6)))
    mask = truth > 0
    specks = rng.random(mask.shape) < 0.01  # many one-pixel specks, more components than particles
    measured = typical_radius(mask | specks, (1.0, 1.0))
    assert abs(measured - radius) <= 1.5, (measured, radius)
    # Physical units: the same mask with pixels of 0.5 nm has half the radius.
    assert typical_radius(mask | specks, (0.5, 0.5)) == pytest.approx(measured / 2, rel=1e-6)


def test_auto_min_distance_scales_with_the_particles(rng):
    seed = int(rng.integers(1e6))
    small, _ = make_touching_particles((160, 160), 40, radius_range=(5, 7), seed=seed)
    large, _ = make_touching_particles((320, 320), 40, radius_range=(10, 14), seed=seed)
    _, a = separate(small, return_details=True)
    _, b = separate(large, return_details=True)
    assert 1.6 <= b.min_distance / a.min_distance <= 2.4, (a.min_distance, b.min_distance)


def test_auto_min_distance_in_3d_merges_fewer_small_spheres(rng):
    """In 3D ``min_distance='auto'`` is 0.5 x the median depth of the distance map's maxima (each sphere has its
    own): against 0.4 x the typical radius (the rule before, which follows the largest spheres), fewer pieces
    hold two true spheres and F1@0.5 is no lower, on touching spheres of radius 3-15."""
    merges, f1 = np.zeros(2), np.zeros(2)
    for _ in range(2):
        image, truth = make_touching_particles((112,) * 3, 110, radius_range=(3.0, 15.0), overlap=0.15,
                                               seed=int(rng.integers(1e6)))
        labels, details = separate(image, return_details=True)
        assert details.min_distance < 0.4 * details.particle_radius
        for i, result in enumerate((labels, separate(image, min_distance=0.4 * details.particle_radius))):
            scores = evaluate(result, truth)
            merges[i] += scores["merges"]
            f1[i] += scores["f1_50"]
    assert merges[0] < merges[1]
    assert f1[0] >= f1[1]


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 1.0, 1.0)])
def test_maxima_radius_is_the_median_radius_of_the_balls_touching_or_apart(rng, spacing):
    """``maxima_radius``: one maximum per ball at its centre, as deep as the ball's radius (SciPy's exact
    transform of balls drawn here), so the median of the radii; overlapping balls keep their own maxima."""
    from scipy import ndimage as ndi

    from gpu_pipeline.stages.scale import maxima_radius

    radii = rng.uniform(3.0, 16.0, size=7)
    shape = (int(2 * 40 / spacing[0]), 80, 7 * 40)
    zz, yy, xx = (np.indices(shape).T * np.asarray(spacing)).T
    mask = np.zeros(shape, dtype=bool)
    for i, r in enumerate(radii):  # apart: one per 40-voxel cell along x
        mask |= (zz - 40) ** 2 + (yy - 40) ** 2 + (xx - 20 - 40 * i) ** 2 <= r ** 2
    distance = ndi.distance_transform_edt(mask, sampling=spacing).astype(np.float32)
    assert maxima_radius(distance, spacing) == pytest.approx(np.median(radii), abs=1.0)
    # Two overlapping balls (radii 5 and 14, centres 16 apart): two maxima, their mean is the median.
    mask = ((zz - 40) ** 2 + (yy - 40) ** 2 + (xx - 60) ** 2 <= 14 ** 2) | \
           ((zz - 40) ** 2 + (yy - 40) ** 2 + (xx - 76) ** 2 <= 5 ** 2)
    distance = ndi.distance_transform_edt(mask, sampling=spacing).astype(np.float32)
    assert maxima_radius(distance, spacing) == pytest.approx((14 + 5) / 2, abs=1.0)
    assert maxima_radius(np.zeros((8, 8, 8), np.float32), spacing) is None


def test_auto_fills_nucleoli_and_keeps_touching_particles_apart(rng):
    image, truth = make_uneven_nuclei((256, 256), 50, brightness_range=(0.8, 1.0), nucleoli=(1, 2),
                                      nucleolus_level=(0.0, 0.05), illumination=0.0, seed=int(rng.integers(1e6)))
    filled = evaluate(separate(image), truth)
    holes = evaluate(separate(image, max_hole_size=0), truth)
    assert filled["f1_50"] >= holes["f1_50"] + 0.05 and filled["splits"] < holes["splits"], (filled, holes)
    # Four just-touching disks enclose a pocket; filling it would add a false peak or fuse them.
    square = np.zeros((120, 120), dtype=bool)
    yy, xx = np.mgrid[:120, :120]
    for cy, cx in ((40, 40), (40, 80), (80, 40), (80, 80)):
        square |= (yy - cy) ** 2 + (xx - cx) ** 2 <= 20.5 ** 2
    image = np.where(square, 200, 20).astype(np.uint8)
    labels, details = separate(image, return_details=True)
    assert labels.max() == 4 and not labels[60, 60], details


def test_defaults_beat_otsu_and_watershed_on_uneven_nuclei_with_nucleoli():
    """Seeds never used to choose the rules (those were 0-3)."""
    ours, old, ref = [], [], []
    for seed in (200, 201):
        image, truth = make_uneven_nuclei((256, 256), 60, seed=seed)
        labels, details = separate(image, return_details=True)
        assert details.threshold_method == "li"
        ours.append(evaluate(labels, truth)["f1_50"])
        old.append(evaluate(separate(image, threshold="otsu", min_distance=6, max_hole_size=0), truth)["f1_50"])
        ref.append(evaluate(skimage_watershed(image, sigma=1.0, min_distance=6, min_size=20, polarity="bright"),
                            truth)["f1_50"])
    assert min(ours) >= 0.7 and np.mean(ours) > np.mean(ref) + 0.1 and np.mean(ours) > np.mean(old), (ours, old, ref)


def test_auto_keeps_otsu_where_particles_are_equally_bright(rng):
    """The generated volumes of tests/ and bench/ keep their scores under threshold='auto'."""
    for shape, spacing in (((200, 200), (1.0, 1.0)), ((32, 64, 64), (2.0, 1.0, 1.0))):
        image, truth = make_touching_particles(shape, 60, spacing=spacing, seed=int(rng.integers(1e6)))
        options = dict(spacing=spacing, min_distance=4, max_hole_size=0)
        explicit = evaluate(separate(image, threshold="otsu", **options), truth)
        auto, details = separate(image, return_details=True, **options)
        assert details.threshold_method == "otsu"
        # Otsu on the percentile-clipped histogram: the same foreground up to a bin.
        assert abs(evaluate(auto, truth)["f1_50"] - explicit["f1_50"]) <= 0.02
        np.testing.assert_array_equal(auto, separate(image, threshold=details.threshold, **options))


@pytest.mark.parametrize("shape,n", [((512, 512), 1), ((1024, 1024), 4), ((128, 128, 128), 1)])
def test_a_few_particles_in_a_large_field_are_found_not_the_background_noise(rng, shape, n):
    """One particle in 512^2 (0.04 % of it) lay beyond the 99.9th percentile that 'auto' clips to, and Li's
    iteration settled at the background's mean: thousands of noise specks, F1 0, where Otsu on the whole
    histogram finds the particle. Isolated particles (no touching pair) so that the count is exact."""
    image, truth = make_touching_particles(shape, n, radius_range=(6, 12), touching_fraction=0.0,
                                           seed=int(rng.integers(1e6)))
    labels, details = separate(image, return_details=True, reject_annotations=False)
    assert details.threshold_method == "otsu" and details.intensity_range is None, details
    assert evaluate(labels, truth)["f1_50"] == 1.0, (labels.max(), details.threshold)


def _otsu_specks(image, sigma, polarity):
    """Pieces of scikit-image's Otsu foreground of the Gaussian-smoothed image (the reference the rule replaces)."""
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    smoothed = ndi.gaussian_filter(image.astype(np.float32), sigma)
    otsu = threshold_otsu(smoothed)
    return ndi.label(smoothed > otsu if polarity == "bright" else smoothed <= otsu)[1]


@pytest.mark.parametrize("shape,radius,noise,polarity", [((1024, 1024), (5, 8), 0.1, "bright"),
                                                         ((1024, 1024), (5, 8), 0.1, "dark"),
                                                         ((192, 192, 192), (5, 6), 0.08, "dark")])
def test_one_small_particle_in_a_large_field_is_found_beyond_the_noise(rng, shape, radius, noise, polarity):
    """One small particle covering 0.01-0.02 % of the image: Otsu's between-class variance is larger for a split
    of the background's noise than for the particle, so Otsu's foreground is thousands of specks (F1 0). The
    ``sparse`` rule takes Otsu's threshold of the voxels beyond the background's noise and finds the particle
    alone, bright or dark. Annotation rejection off: a lone 2D particle in a corner is taken for a label glyph."""
    image, truth = make_touching_particles(shape, 1, radius_range=radius, noise=noise, polarity=polarity,
                                           seed=int(rng.integers(1e6)))
    labels, details = separate(image, return_details=True, reject_annotations=False)
    assert details.threshold_method == "sparse" and details.polarity == polarity, details
    assert evaluate(labels, truth)["f1_50"] == 1.0, (labels.max(), details.threshold)
    assert _otsu_specks(image, details.sigma, polarity) > 100  # the case Otsu fails on


def test_the_noise_band_is_the_backgrounds_spread(rng):
    """mode_band of pure Gaussian noise is its mean -+ 3 standard deviations (to a tenth of one, from the
    histogram's width at half height); noise alone has no threshold beyond it that finds a particle-sized piece."""
    from gpu_pipeline.stages.threshold import mode_band, otsu_from_histogram, sparse_foreground

    for scale in (1.0, 7.5):
        noise = rng.normal(100.0, scale, (256, 256, 64)).astype(np.float32)
        counts, bins = intensity_histogram(noise)
        low, high = mode_band(counts, bins)
        mean, sd = float(noise.mean()), float(noise.std())
        assert abs((low + high) / 2 - mean) < 0.1 * sd and abs((high - low) / 6 - sd) < 0.1 * sd, (low, high, sd)
        assert sparse_foreground(noise, counts, bins, otsu_from_histogram(counts, bins), "auto") is None


def test_a_chunked_otsu_run_in_the_noise_warns_with_the_threshold_beyond_it(tmp_path, capsys, rng):
    """The chunked run keeps Otsu's threshold (its default), but where that splits the background's noise it
    says so at once, with the threshold beyond the noise; rerun with it, the run finds the one particle."""
    zarr = pytest.importorskip("zarr")
    image, truth = make_touching_particles((192, 192, 192), 1, radius_range=(5, 6), noise=0.08, polarity="dark",
                                           seed=int(rng.integers(1e6)))
    zarr.create_array(str(tmp_path / "in.zarr"), shape=image.shape, dtype=image.dtype, chunks=(96, 96, 96))[...] = image
    _, details = separate(image, return_details=True, sigma=1.0)  # the in-memory run's choice at the same sigma
    assert details.threshold_method == "sparse"
    assert main(["run", str(tmp_path / "in.zarr"), str(tmp_path / "noise.zarr"), "--workers", "1", "--polarity",
                 "dark"]) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if "within the background's noise" in line]
    assert len(warning) == 1 and f"--threshold {details.threshold:.6g}" in warning[0], warning
    assert main(["run", str(tmp_path / "in.zarr"), str(tmp_path / "out.zarr"), "--workers", "1", "--polarity",
                 "dark", "--threshold", f"{details.threshold:.6g}"]) == 0
    assert "within the background's noise" not in capsys.readouterr().err
    stored = zarr.open_array(str(tmp_path / "out.zarr" / "particles" / "0"), mode="r")[...]
    assert evaluate(stored, truth)["f1_50"] == 1.0


def test_hot_pixels_are_still_clipped_away(rng):
    """The percentile clip's purpose stays: a few hot pixels (isolated, not particle-sized) beyond the 99.9th
    percentile still squeeze the histogram and are clipped, with the same threshold as without them up to the
    clipped histogram's bins (the smoothed hot pixels' halos stay inside the clip and move it by about one)."""
    image, truth = make_touching_particles((256, 256), 60, seed=int(rng.integers(1e6)))
    hot = image.astype(np.uint16) * 4
    spots = rng.choice(hot.size, 12, replace=False)
    hot.ravel()[spots] = 65535
    labels, details = separate(hot, return_details=True, sigma=1.0, reject_annotations=False)
    assert details.intensity_range is not None and details.intensity_range[1] < 10000, details.intensity_range
    plain, plain_details = separate(image, sigma=1.0, reject_annotations=False, return_details=True)
    low, high = details.intensity_range
    # 0.3-1.4 bins over DECLUMP_TEST_SEED 0-29 (a bin: about 4 grey levels of the 8-bit image).
    assert abs(details.threshold - 4 * plain_details.threshold) <= 2 * (high - low) / 256
    # A threshold a bin higher moves a particle or two of about 50 either way (F1 -0.031 to +0.123 over seeds 0-29).
    assert evaluate(labels, truth)["f1_50"] >= evaluate(plain, truth)["f1_50"] - 0.05


def test_local_threshold_follows_an_illumination_gradient(rng):
    image, truth = make_touching_particles((256, 256), 70, intensity_range=(0.3, 0.35), background=0.05,
                                           touching_fraction=0.2, seed=int(rng.integers(1e6)))
    ramp = np.linspace(0.0, 0.5, 256)[None, :]  # the background rises above the particles on the left
    image = np.clip(image / 255.0 + ramp, 0, 1)
    local = evaluate(separate(image, threshold="local", min_distance=4), truth)
    otsu = evaluate(separate(image, threshold="otsu", min_distance=4), truth)
    assert local["f1_50"] >= 0.8 and local["f1_50"] > otsu["f1_50"] + 0.2, (local, otsu)


def packed_discs(rng, shape=(320, 360), radius=30.0, gap=1.5):
    """Bright discs on a hexagonal grid, neighbours ``gap`` px apart: thin dark gaps between them and wider
    pockets where three meet, as in SEM images of packed spheres."""
    from skimage.segmentation import relabel_sequential

    pitch = 2 * radius + gap
    rows, cols = np.indices(shape)
    truth = np.zeros(shape, np.int32)
    for i, y in enumerate(np.arange(-radius, shape[0] + radius, pitch * np.sqrt(3) / 2)):
        for x in np.arange(-radius + (i % 2) * pitch / 2, shape[1] + radius, pitch):
            y0, x0 = y + rng.uniform(-0.5, 0.5), x + rng.uniform(-0.5, 0.5)
            truth[(rows - y0) ** 2 + (cols - x0) ** 2 <= radius ** 2] = truth.max() + 1
    truth = relabel_sequential(truth)[0]
    return (np.where(truth > 0, 0.7, 0.2) + rng.normal(0, 0.05, shape)).astype(np.float32), truth


@pytest.mark.parametrize("texture_rule", [True, False])
def test_the_sigma_raise_does_not_smooth_away_the_gaps_between_packed_particles(rng, monkeypatch, texture_rule):
    """Large discs 1.5 px apart: raising the smoothing to a tenth of their radius (3 px) closes the gaps, so the
    discs become one piece and the pockets between them look like the particles (the polarity flips to dark: F1
    0 before 2026-12-05, as on six EMPS images of packed spheres). The discs are solid, so the texture rule
    does not raise the sigma; with that rule off (the raise forced), a raise that changes the polarity is
    undone."""
    from scipy import ndimage as ndi

    from gpu_pipeline import pipeline

    if not texture_rule:
        monkeypatch.setattr(pipeline, "TEXTURE_GROWTH", 0.0)
    image, truth = packed_discs(rng)
    raised = ndi.gaussian_filter(image, pipeline.SIGMA_PER_RADIUS * 30.0)
    assert threshold_foreground(raised, "auto", "auto")[1].polarity == "dark"  # what the raise alone picks
    labels, details = separate(image, return_details=True)
    assert details.polarity == "bright" and details.sigma < pipeline.SIGMA_PER_RADIUS * details.particle_radius
    assert evaluate(labels, truth)["f1_50"] >= 0.6  # 0.75-0.81 over DECLUMP_TEST_SEED 0-3 (some pairs merge)


def test_sigma_auto_keeps_the_edges_and_gaps_of_large_solid_particles(rng, monkeypatch):
    """Touching discs of radius 25-40 with no texture: twice the sigma leaves their typical radius as it is, so
    'auto' does not raise the sigma to a tenth of it (about 4 px), which blurred their edges and merged some
    (F1@0.5 0.692 -> 0.825 over three seeds of bench.defaults_sweep's 'large radius 25-40')."""
    from gpu_pipeline import pipeline

    samples = [make_touching_particles((384, 384), 20, radius_range=(25, 40), seed=int(rng.integers(1e6)))
               for _ in range(5)]
    runs = [separate(image, return_details=True) for image, _ in samples]
    assert sum(details.sigma == 1.0 for _, details in runs) >= 3  # (where two particles' gap heals, it rises)
    monkeypatch.setattr(pipeline, "TEXTURE_GROWTH", 0.0)  # the raise wherever the radius allows it
    forced = [separate(image, return_details=True) for image, _ in samples]
    assert all(details.sigma >= pipeline.SIGMA_RAISE for _, details in forced)
    ours = [evaluate(labels, truth) for (labels, _), (_, truth) in zip(runs, samples)]
    theirs = [evaluate(labels, truth) for (labels, _), (_, truth) in zip(forced, samples)]
    # Over five images, as one clump's wrong scale can go either way (one generator seed in twelve was
    # better raised, 0.27 -> 0.56); mean F1 higher by 0.03-0.18 per image on the other eleven.
    assert np.mean([o["mean_f1"] for o in ours]) > np.mean([t["mean_f1"] for t in theirs]) + 0.02, (ours, theirs)
    assert np.mean([o["f1_50"] for o in ours]) >= np.mean([t["f1_50"] for t in theirs]), (ours, theirs)


def test_contrast_to_noise_is_measured_as_the_truth_gives_it(rng):
    """contrast_to_noise on the foreground of a threshold agrees with the same ratio on the true particles
    (within 10 %), and is the generator's contrast over its noise (the sample medians, 8-bit rounding aside)."""
    from scipy import ndimage as ndi

    from gpu_pipeline.stages.scale import contrast_to_noise

    for noise, contrast in ((0.05, 0.15), (0.1, 0.6)):
        image, truth = make_touching_particles((64, 96, 96), 120, radius_range=(5, 9), intensity_range=(
            0.15 + contrast, 0.15 + contrast), background=0.15, noise=noise, blur=0.5, seed=int(rng.integers(1e6)))
        fg, _ = threshold_foreground(ndi.gaussian_filter(image.astype(np.float32), 1.0), "otsu", "bright")
        true = contrast_to_noise(image, truth > 0)
        assert abs(contrast_to_noise(image, fg) - true) < 0.1 * true
        assert abs(true - contrast / noise) < 0.15 * contrast / noise, (true, contrast / noise)


def test_sigma_auto_smooths_a_noisy_volume_until_its_particles_stand_out(rng):
    """Spheres at 0.25-0.35 on a 0.15 background with noise 0.1 (contrast about 1.2 times the noise): at one
    voxel their rough surfaces give several maxima each and they over-split; sigma auto raises the smoothing
    to 1.5 voxels and scores as well as that fixed sigma, far above one voxel. A clean volume keeps one voxel."""
    seed = int(rng.integers(1e6))
    image, truth = make_touching_particles((96, 128, 128), 260, radius_range=(5, 10), intensity_range=(0.25, 0.35),
                                           background=0.15, noise=0.1, seed=seed)
    labels, details = separate(image, return_details=True)
    assert details.sigma == 1.5, details.sigma
    auto, one = evaluate(labels, truth)["f1_50"], evaluate(separate(image, sigma=1.0), truth)["f1_50"]
    assert auto >= one + 0.05 and auto >= 0.85, (auto, one)
    clean, truth = make_touching_particles((64, 96, 96), 120, radius_range=(5, 10), seed=seed)
    assert separate(clean, return_details=True)[1].sigma == 1.0


def test_sigma_auto_still_smooths_the_texture_of_large_particles(rng, monkeypatch):
    """Discs of radius 55 with a grain of 1-2 px inside: the foreground at sigma 1 is full of cracks, and twice
    the sigma grows its typical radius by more than ``TEXTURE_GROWTH``, so the sigma is raised (to a tenth of
    the radius measured at sigma 1) and each disc is one particle."""
    from scipy import ndimage as ndi

    from gpu_pipeline import pipeline

    shape = (320, 320)
    rows, cols = np.indices(shape)
    truth = np.zeros(shape, np.int32)
    for k, (y, x) in enumerate([(90, 90), (230, 120), (140, 240)]):
        y, x = y + rng.uniform(-4, 4), x + rng.uniform(-4, 4)
        truth[(rows - y) ** 2 + (cols - x) ** 2 <= 55 ** 2] = k + 1
    grain = ndi.gaussian_filter(rng.normal(0, 1, shape), 1.0)
    image = np.where(truth > 0, 0.6 + 0.1 * grain / grain.std(), 0.2) + rng.normal(0, 0.03, shape)
    image = image.astype(np.float32)
    labels, details = separate(image, return_details=True)
    assert details.sigma >= pipeline.SIGMA_RAISE, details.sigma  # raised: 2.7-4.2 over seeds 0-9
    assert evaluate(labels, truth)["f1_50"] == 1.0
    monkeypatch.setattr(pipeline, "TEXTURE_GROWTH", np.inf)  # the rule decides: asked for more growth, no raise
    assert separate(image, return_details=True)[1].sigma == 1.0


def test_scale_bar_and_info_band_are_not_particles(rng):
    image, truth = make_touching_particles((200, 240), 25, seed=int(rng.integers(1e6)))
    image[160:, :] = image[truth == 0].min()  # annotations sit apart from the particles
    truth[160:, :] = 0
    image[170:176, 20:90] = 255  # a scale bar
    image[188:, :] = 250  # an info band along the bottom
    labels = separate(image, reject_annotations=True)
    assert not labels[170:176, 20:90].any() and not labels[188:, :].any()
    kept = separate(image, reject_annotations=False)
    assert kept[172, 50] and kept[195, 120]
    # Default: the annotation-ink rule only; the bar is pure ink (the dtype's maximum), the band is not, and
    # filled rectangles stay (an axis-aligned rod is one too).
    assert image.dtype == np.uint8
    default = separate(image)
    assert not default[170:176, 20:90].any() and default[195, 120]
    assert not annotation_mask(truth > 0).any()  # generated particles are never taken for annotations


def test_summary_reports_the_automatic_choices(tmp_path, rng):
    image, truth = make_uneven_nuclei((128, 128), 15, seed=int(rng.integers(1e6)))
    tifffile.imwrite(tmp_path / "in.tif", image)
    assert main(["run", str(tmp_path / "in.tif"), str(tmp_path / "out.tif"), "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "out_summary.json").read_text())
    assert summary["threshold_method"] in ("otsu", "li")
    assert summary["threshold"] == summary["threshold_candidates"][summary["threshold_method"]]
    assert summary["min_distance"] == pytest.approx(max(0.5 * summary["particle_radius"], 1.0))
    assert summary["parameters"]["threshold"] == summary["parameters"]["min_distance"] == "auto"


def test_chunked_histogram_thresholds_equal_in_memory(rng):
    da = pytest.importorskip("dask.array")
    from gpu_pipeline.chunked.histogram import histogram_thresholds_chunked
    from gpu_pipeline.stages.threshold import HISTOGRAM_METHODS

    image = rng.gamma(2.0, 20.0, (20, 33, 41)).astype(np.float32)
    counts, bins = intensity_histogram(image)
    expected = {name: method(counts, bins) for name, method in HISTOGRAM_METHODS.items()}
    for chunks in ((7, 11, 13), (20, 33, 41), (3, 33, 5)):
        assert histogram_thresholds_chunked(da.from_array(image, chunks=chunks)) == expected


def test_chunked_histogram_histograms_each_block_once_and_nothing_else(rng, monkeypatch):
    """Only the tasks histogram: building the graph histograms nothing (a cluster's client then never loads
    the compiled histogram), and the counts are the in-memory ones."""
    da = pytest.importorskip("dask.array")
    import dask

    import gpu_pipeline.chunked.histogram as chunked_histogram

    image = rng.gamma(2.0, 20.0, (20, 33, 41)).astype(np.float32)
    seen = []

    def counting(block, bins=None):
        seen.append(block.shape)
        return intensity_histogram(block, bins)

    monkeypatch.setattr(chunked_histogram, "intensity_histogram", counting)
    array = da.from_array(image, chunks=(7, 11, 13))
    with dask.config.set(scheduler="sync"):
        counts, bins = chunked_histogram.histogram_chunked(array, (float(image.min()), float(image.max())))
    assert sorted(seen) == sorted(tuple(int(c[i]) for c, i in zip(array.chunks, index))
                                  for index in np.ndindex(*array.numblocks))
    assert np.array_equal(counts, intensity_histogram(image)[0])


def test_a_stored_volumes_histogram_reads_a_group_of_blocks_per_task(rng, tmp_path, monkeypatch):
    """A volume read from a store is histogrammed a group of blocks per task (each block read and counted in
    turn, ragged blocks included), the groups' counts summed on the workers: the in-memory counts, with
    ceil(blocks / BLOCK_GROUP) reading tasks instead of one per block."""
    zarr = pytest.importorskip("zarr")
    import dask

    import gpu_pipeline.chunked.histogram as chunked_histogram
    import gpu_pipeline.chunked.workspace as workspace
    from gpu_pipeline.chunked.source import open_volume
    from gpu_pipeline.chunked.workspace import BLOCK_GROUP

    image = rng.gamma(2.0, 20.0, (20, 33, 41)).astype(np.float32)
    zarr.create_array(str(tmp_path / "v.zarr"), shape=image.shape, dtype=image.dtype, chunks=(7, 11, 13))[...] = image
    volume, _ = open_volume(tmp_path / "v.zarr")
    tasks, read = [], []
    boxes_histogram = chunked_histogram._boxes_histogram

    def counting(stored, boxes, bins):
        tasks.append(len(boxes))
        read.extend(tuple(b.stop - b.start for b in box) for box in boxes)
        return boxes_histogram(stored, boxes, bins)

    monkeypatch.setattr(chunked_histogram, "_boxes_histogram", counting)
    monkeypatch.setattr(workspace, "active_client", lambda: None)  # this process, not a session's cluster
    with dask.config.set(scheduler="sync"):
        counts, bins = chunked_histogram.histogram_chunked(volume, (float(image.min()), float(image.max())))
    blocks = int(np.prod(volume.numblocks))  # 3 x 3 x 4, the last ones ragged
    assert len(tasks) == -(-blocks // BLOCK_GROUP) < blocks and max(tasks) <= BLOCK_GROUP
    assert sorted(read) == sorted(tuple(int(c[i]) for c, i in zip(volume.chunks, index))
                                  for index in np.ndindex(*volume.numblocks))
    expected_counts, expected_bins = intensity_histogram(image)
    assert np.array_equal(counts, expected_counts) and bins == expected_bins


def test_chunked_li_run_equals_in_memory(tmp_path, rng):
    da = pytest.importorskip("dask.array")
    from gpu_pipeline.chunked.pipeline import separate_chunked

    image, _ = make_touching_particles((40, 64, 64), 50, spacing=(2, 1, 1), seed=int(rng.integers(1e6)))
    kwargs = dict(spacing=(2, 1, 1), threshold="li", min_distance=3, max_radius=8.0)
    expected = separate(image, max_hole_size=0, min_size=None, **kwargs)  # the chunked run's size rule
    for chunks in ((20, 32, 32), (40, 24, 64)):
        labels, _ = separate_chunked(da.from_array(image, chunks=chunks), **kwargs)
        np.testing.assert_array_equal(np.asarray(labels), expected)


def test_chunked_run_takes_fixed_values_for_the_automatic_options(tmp_path, capsys):
    """`declump run in.zarr out.zarr` with defaults works: the auto options become the fixed chunked values."""
    zarr = pytest.importorskip("zarr")
    image, truth = make_touching_particles((24, 48, 48), 10, seed=1)
    zarr.create_array(str(tmp_path / "in.zarr"), shape=image.shape, dtype=image.dtype, chunks=(24, 24, 24))[...] = image
    assert main(["run", str(tmp_path / "in.zarr"), str(tmp_path / "out.zarr"), "--workers", "1"]) == 0
    out = capsys.readouterr().err  # the note, on stderr
    assert all(option in out for option in ("--sigma 1", "--threshold otsu", "--min-distance 4", "--max-hole-size 0",
                                            "--min-size a ball of diameter --min-distance"))
    stored = zarr.open_array(str(tmp_path / "out.zarr" / "particles" / "0"), mode="r")[...]
    expected = separate(image, sigma=1.0, threshold="otsu", min_distance=4.0, max_hole_size=0, min_size=None)
    np.testing.assert_array_equal(stored, expected)
    # What cannot be replaced is refused in one line, with no output left behind.
    assert main(["run", str(tmp_path / "in.zarr"), str(tmp_path / "o2.zarr"), "--threshold", "local"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--threshold" in err
    assert not (tmp_path / "o2.zarr").exists() and not (tmp_path / "o2_summary.json").exists()
    with pytest.raises(DeclumpError, match="threshold"):
        from gpu_pipeline.chunked.pipeline import separate_chunked
        import dask.array as da

        separate_chunked(da.from_array(image, chunks=24), threshold="auto", min_distance=3)


@pytest.mark.parametrize("options", [dict(threshold="median"), dict(min_distance="big"), dict(min_distance=-1),
                                     dict(max_hole_size="some"), dict(max_hole_size=-5)])
def test_bad_automatic_options_are_one_line_errors(options):
    image, _ = make_touching_particles((64, 64), 5, seed=3)
    with pytest.raises(DeclumpError) as info:
        separate(image, **options)
    assert "\n" not in str(info.value) and list(options)[0] in str(info.value)


def test_a_mask_is_taken_as_given_by_the_automatic_hole_filling(rng):
    """A network's mask (or a classifier's foreground) keeps its holes under the default ``max_hole_size='auto'``.

    The disks' holes are well under the automatic limit for an intensity image, so without the rule they fill.
    """
    yy, xx = np.mgrid[:120, :120]
    mask = np.zeros((120, 120), bool)
    for cy, cx in ((30 + rng.integers(-3, 4), 30), (85, 80 + rng.integers(-3, 4))):
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= 14 ** 2
        hole = (yy - cy) ** 2 + (xx - cx - 2) ** 2 <= 2 ** 2
        mask |= disk & ~hole
    labels = separate(None, mask=mask)
    assert np.array_equal(labels > 0, mask)
    filled = separate(None, mask=mask, max_hole_size=200.0)
    assert (filled > 0).sum() > mask.sum()  # the holes are fillable: the rule above is what keeps them


# --- automatic sizes -----------------------------------------------------------------------------------------

def test_auto_min_size_removes_specks_that_the_old_rule_kept(rng):
    """Specks a quarter of a particle's area are gone with ``min_size='auto'``; every particle is still found."""
    from skimage.draw import disk

    image, truth = make_touching_particles((192, 192), 14, radius_range=(11, 13), overlap=0.0,
                                           seed=int(rng.integers(1e6)))
    background = truth == 0
    specks = np.zeros(truth.shape, bool)
    while specks.sum() < 8 * 50:
        r, c = rng.integers(6, 186, size=2)
        rows, cols = disk((r, c), 4, shape=truth.shape)
        if background[max(r - 9, 0):r + 10, max(c - 9, 0):c + 10].all():  # clear of the particles
            specks[rows, cols] = True
            background[rows, cols] = False
    image[specks] = image[truth > 0].max()
    labels, details = separate(image, return_details=True)
    old = separate(image, min_size=None)
    assert not labels[specks].any()
    assert old[specks].any()  # what the rule before 'auto' (a ball of diameter min_distance) kept
    assert details.min_size > specks.sum() / 8  # a speck is below the automatic size ...
    # ... and every particle is found as well as without the specks (independent count and F1 against truth).
    assert evaluate(labels, truth)["f1_50"] >= evaluate(old, truth)["f1_50"]
    # About 14 particles: one of them split or missed is F1@0.5 0.93-0.89 (0.897 with DECLUMP_TEST_SEED 1).
    assert evaluate(labels, truth)["f1_50"] >= 0.85


def _matched_truth(labels, truth):
    """Ground-truth ids matched by a piece at IoU > 0.5 (computed here, not by gpu_pipeline.metrics)."""
    inside = truth.ravel() > 0
    width = int(labels.max()) + 1
    key, inter = np.unique(truth.ravel()[inside].astype(np.int64) * width + labels.ravel()[inside],
                           return_counts=True)
    gt, pred = key // width, key % width
    iou = inter / (np.bincount(truth.ravel())[gt] + np.bincount(labels.ravel())[pred] - inter)
    return set(gt[(pred > 0) & (iou > 0.5)].tolist())


def test_auto_min_size_in_3d_keeps_spheres_a_third_of_the_largest(rng):
    """In 3D ``min_size='auto'`` is a ball of an eighth of the typical radius: spheres of radius 3-9 touching each
    other are all particles. The typical radius follows the largest spheres (a cluster is as deep as its largest),
    so the 2D fraction (0.2 of its ball, radius 0.58 x) dropped or merged most spheres below that size (their
    recall at IoU 0.5 was 0.02-0.11 on eight seeds, 0.56-0.70 with a quarter of the radius)."""
    image, truth = make_touching_particles((96,) * 3, 160, radius_range=(3.0, 9.0), overlap=0.15,
                                           seed=int(rng.integers(1e6)))
    labels, details = separate(image, sigma=1.0, min_distance=3, return_details=True)
    radius = details.particle_radius
    assert details.min_size == pytest.approx(max(np.pi / 6 * (radius / 4) ** 3, np.pi / 6 * 3 ** 3))
    small = set(np.flatnonzero(np.bincount(truth.ravel()) < 0.2 * 4 / 3 * np.pi * radius ** 3).tolist()) - {0}
    assert len(small) >= 30
    assert len(small & _matched_truth(labels, truth)) >= 0.45 * len(small)
    # As good as the smallest size a given min_distance allows (a ball of that diameter), against the truth.
    floor = separate(image, sigma=1.0, min_distance=3, min_size=None)
    assert evaluate(labels, truth)["f1_50"] >= evaluate(floor, truth)["f1_50"] - 0.01
    assert evaluate(labels, truth)["f1_50"] >= 0.82


def test_auto_min_size_in_3d_loses_no_sphere_six_times_smaller_than_the_largest(rng):
    """Spheres of radius 3.5-18 touching each other: ``min_size='auto'`` loses no sphere that the smallest size a
    given ``min_distance`` allows (a ball of that diameter) finds at IoU 0.5. A quarter of the typical radius
    (1/64 of its ball) merged 1-2 of the smallest spheres into their neighbours on each of six seeds."""
    image, truth = make_touching_particles((128,) * 3, 90, radius_range=(3.5, 18.0), overlap=0.15,
                                           seed=int(rng.integers(1e6)))
    labels, details = separate(image, sigma=1.0, min_distance=3, return_details=True)
    assert details.particle_radius > 12  # the typical radius follows the largest spheres
    floor = separate(image, sigma=1.0, min_distance=3, min_size=None)
    assert _matched_truth(floor, truth) <= _matched_truth(labels, truth)
    assert evaluate(labels, truth)["f1_50"] >= evaluate(floor, truth)["f1_50"] - 0.005


@pytest.mark.parametrize("case", ["nuclei 2D, defaults", "spheres 3D, defaults", "spheres 3D, sigma 1, min_size 65",
                                  "spheres 3D anisotropic, sigma 1"])
def test_labels_are_those_of_a_second_whole_distance_transform(rng, monkeypatch, case):
    """The pipeline's distance map reuses the transform the scale measurement took (updated where cleanup
    changed the mask, gpu_pipeline.stages.distance); the labels equal those with the whole transform taken
    again after cleanup, as before."""
    import gpu_pipeline.pipeline as pipeline
    from cpu_fallback import ops

    seed = int(rng.integers(1e6))
    if case.startswith("nuclei"):
        image, _ = make_uneven_nuclei((256, 256), 60, seed=seed)  # dark nucleoli: holes that cleanup fills
        options = {}
    else:
        spacing = (2.0, 1.0, 1.0) if "anisotropic" in case else (1.0, 1.0, 1.0)
        image, _ = make_touching_particles((48, 96, 96) if "anisotropic" in case else (80, 80, 80), 120,
                                           radius_range=(4.0, 9.0), noise=0.12, spacing=spacing, seed=seed)
        options = {"spacing": spacing}
        if "sigma 1" in case:
            options.update(sigma=1.0, min_distance=4.0, min_size=65 if "65" in case else "auto")
    updates = []

    def counted(distance, before, after, spacing):
        updates.append(bool((after & ~before).any()))
        return pipeline.cleaned_distance.__wrapped__(distance, before, after, spacing)

    counted.__wrapped__ = pipeline.cleaned_distance
    monkeypatch.setattr(pipeline, "cleaned_distance", counted)
    reused, details = separate(image, return_details=True, **options)
    if case.startswith("nuclei") and not details.shell_holes:
        # (nucleoli filled; updated once more where pockets between nuclei were opened again)
        assert updates == [True] * (1 + bool(details.pocket_holes))
    elif case.startswith("nuclei"):  # (the first pass's update for its pocket test, then as below)
        assert len(updates) == 2 + bool(details.pocket_holes)
    else:  # (where cavities were filled, the transform is taken on the filled mask, and then reused)
        assert len(updates) == 1
    monkeypatch.setattr(pipeline, "cleaned_distance", lambda distance, before, after, spacing:
                        ops.distance_transform(after, spacing))
    np.testing.assert_array_equal(reused, separate(image, **options))


@pytest.mark.parametrize("polarity", ["bright", "dark"])
def test_components_the_polarity_labelled_are_reused_with_the_same_labels(rng, monkeypatch, polarity):
    """With a given sigma, the components the ``auto`` polarity labelled at Otsu's threshold (the mask's and its
    background's) serve the scale measurement, hole filling and speck removal: the labels equal those of a run
    that labels them again."""
    import gpu_pipeline.pipeline as pipeline
    from gpu_pipeline.stages.threshold import threshold_foreground

    image, _ = make_touching_particles((72, 80, 64), 220, radius_range=(4.0, 8.0), noise=0.12, polarity=polarity,
                                       seed=int(rng.integers(1e6)))
    given = []

    def recorded(*args, **kwargs):
        found = threshold_foreground(*args, **kwargs)
        given.append(found[2] is not None)
        return found

    monkeypatch.setattr(pipeline, "threshold_foreground", recorded)
    reused = separate(image, sigma=1.0, min_distance=4.0)
    assert given == [True]  # (packed spheres: the border alone cannot tell the polarity, both sides labelled)
    monkeypatch.setattr(pipeline, "threshold_foreground", lambda *args, **kwargs: (
        *threshold_foreground(*args, **kwargs)[:2], None))
    np.testing.assert_array_equal(reused, separate(image, sigma=1.0, min_distance=4.0))


@pytest.mark.parametrize("holes", [0, 5])
def test_clean_mask_and_typical_radius_with_known_tables_equal_their_own_labelling(rng, holes):
    from scipy import ndimage as ndi

    from gpu_pipeline.stages.cleanup import clean_mask
    from gpu_pipeline.stages.components import component_table

    mask = ndi.binary_opening(rng.random((60, 70, 50)) > 0.45)
    mask |= ndi.binary_dilation(rng.random(mask.shape) > 0.9995, iterations=1)  # specks
    inside = np.argwhere(ndi.binary_erosion(mask, iterations=2))
    for centre in inside[rng.choice(len(inside), size=min(holes, len(inside)), replace=False)]:
        mask[tuple(centre)] = False
    tables = (component_table(mask), component_table(~mask))
    for hole, size in ((0, 9), (9, 9), (9, 1), (200, 30)):
        expected = clean_mask(mask, spacing=(1.0,) * 3, min_size=size, max_hole_size=hole)
        np.testing.assert_array_equal(clean_mask(mask, spacing=(1.0,) * 3, min_size=size, max_hole_size=hole,
                                                 tables=tables), expected)
    assert typical_radius(mask, (1.0, 2.0, 1.5), table=tables[0]) == typical_radius(mask, (1.0, 2.0, 1.5))


def test_small_pieces_of_a_split_are_dropped_or_joined(rng):
    """Small particles: dropped alone or beside a big one, joined where touching small ones reach the size."""
    from gpu_pipeline.stages.cleanup import merge_small_particles

    size = int(rng.integers(30, 60))
    labels = np.zeros((40, 60), np.int32)
    labels[2:20, 2:20] = 1  # big
    labels[20:22, 2:10] = 2  # a rim fragment of 1: dropped
    labels[30:33, 2:2 + size // 6] = 3  # alone: dropped
    width = size // 4 + 2
    labels[30:32, 20:20 + width] = 4  # 4, 5 and 6 are the pieces of a rod, together >= size: one particle
    labels[30:32, 20 + width:20 + 2 * width] = 5
    labels[30:32, 20 + 2 * width:20 + 3 * width] = 6
    for value in (2, 3, 4, 5, 6):
        assert (labels == value).sum() < size
    merged = merge_small_particles(labels, size)
    expected = np.where(np.isin(labels, (2, 3)), 0, np.where(np.isin(labels, (5, 6)), 4, labels))
    np.testing.assert_array_equal(merged, expected)
    # Nothing changes when every particle is big enough.
    np.testing.assert_array_equal(merge_small_particles(labels, 2), labels)


@pytest.mark.parametrize("ndim", [2, 3])
def test_merging_with_renumbering_equals_relabelling_after_the_merge(rng, ndim):
    """On labels numbered by first voxel (finish_labels), the merge's renumbering in its gather equals
    relabel_by_first_voxel of the merge without it, with pieces dropped, joined and left alone."""
    from scipy import ndimage as ndi

    from gpu_pipeline.stages.cleanup import merge_small_particles
    from gpu_pipeline.stages.components import relabel_by_first_voxel
    from gpu_pipeline.stages.split import finish_labels

    shape = (120, 140) if ndim == 2 else (40, 50, 60)
    seeds = np.zeros(shape, np.int32)
    where = tuple(rng.integers(0, n, 150) for n in shape)
    seeds[where] = rng.integers(1, 60, 150)  # repeated values: some particles in several pieces
    labels = finish_labels(ndi.grey_dilation(seeds, size=(3,) * ndim) * (rng.random(shape) < 0.95))
    sizes = np.bincount(labels.ravel())[1:]
    size = int(np.percentile(sizes, 40))
    assert (sizes < size).sum() >= 10 and (sizes >= size).sum() >= 10
    plain = merge_small_particles(labels, size)
    assert len(np.unique(plain)) < len(np.unique(labels))
    np.testing.assert_array_equal(merge_small_particles(labels, size, renumber=True), relabel_by_first_voxel(plain))


# --- figure annotations --------------------------------------------------------------------------------------

#: Seven-segment glyphs (a top, b top right, c bottom right, d bottom, e bottom left, f top left, g middle):
#: text drawn without a font file.
SEGMENTS = {"0": "abcdef", "5": "afgcd", "n": "ceg", "b": "cdefg", "2": "abged"}


def draw_text(image, text, top, left, *, height=18, stroke=3, value=255):
    """Draw ``text`` (characters of ``SEGMENTS``, space) with strokes of ``stroke`` px; returns the ink mask."""
    ink = np.zeros(image.shape, bool)
    width = height // 2
    half = height // 2
    for char in text:
        if char != " ":
            boxes = {"a": (0, stroke, 0, width), "b": (0, half, width - stroke, width),
                     "c": (half, height, width - stroke, width), "d": (height - stroke, height, 0, width),
                     "e": (half, height, 0, stroke), "f": (0, half, 0, stroke),
                     "g": (half - stroke // 2, half - stroke // 2 + stroke, 0, width)}
            for segment in SEGMENTS[char]:
                r0, r1, c0, c1 = boxes[segment]
                ink[top + r0:top + r1, left + c0:left + c1] = True
        left += width + stroke + 2
    image[ink] = value
    return ink


def test_drawn_scale_bar_and_text_are_not_particles(rng):
    """A scale bar, "50 nm" and a panel letter drawn in the particles' contrast: no particle on them by default."""
    image, truth = make_touching_particles((200, 240), 20, seed=int(rng.integers(1e6)))
    image[:40] = image[150:] = image[truth == 0].min()  # annotations sit in the margins, as in figure panels
    truth[:40] = truth[150:] = 0
    top = int(rng.integers(158, 170))
    ink = draw_text(image, "50 nn", top, int(rng.integers(110, 140)))
    ink |= draw_text(image, "b", int(rng.integers(4, 14)), int(rng.integers(4, 30)), height=24, stroke=4)
    bar = np.zeros(image.shape, bool)
    bar[188:193, 100:180] = True
    image[bar] = 255
    drawn = ink | bar
    labels = separate(image)
    assert not labels[drawn].any()
    kept = separate(image, reject_annotations=False)
    assert kept[drawn].any()  # without the rule they come out as particles
    assert evaluate(labels, truth)["f1_50"] >= evaluate(kept, truth)["f1_50"] - 0.02


def test_an_image_of_annotations_only_says_so(rng):
    """A micrograph holding only its scale bar and caption: the one-line error says that the annotation rule took
    every foreground pixel, and how to keep them (not "check polarity or threshold")."""
    from gpu_pipeline.pipeline import NoParticlesError

    image = np.clip(rng.normal(120, 6, (200, 240)), 0, 255).astype(np.uint8)
    draw_text(image, "50 nn", int(rng.integers(158, 170)), int(rng.integers(110, 140)))
    image[188:193, 100:180] = 255
    for options in ({}, dict(min_distance=3, max_hole_size=0, min_size=0)):
        with pytest.raises(NoParticlesError, match="taken for annotations.*--reject-annotations off"):
            separate(image, **options)
    assert separate(image, reject_annotations=False).max() >= 1


@pytest.mark.parametrize("ground", [255, 0])
def test_a_label_box_with_its_letter_is_ink(rng, ground):
    """A panel letter in a filled box (white with a black letter, or the other way) in a corner of the panel:
    the box's ground is ink with the letter, so no particle is made of it. Without the letter, or in the middle
    of the panel, a filled square at the dtype's end is no label box (a clipped particle can be one)."""
    polarity = "bright" if ground == 255 else "dark"
    image, truth = make_touching_particles((240, 280), 25, polarity=polarity, seed=int(rng.integers(1e6)))
    image = (20 + 0.85 * image).astype(np.uint8)  # particles and film off the dtype's ends
    top, left = int(rng.integers(2, 8)), int(rng.integers(2, 8))
    image[top:top + 38, left:left + 34] = ground
    truth[top:top + 38, left:left + 34] = 0
    letter = draw_text(image, "b", top + 7, left + 10, height=24, stroke=4, value=255 - ground)
    box = np.zeros(image.shape, bool)
    box[top:top + 38, left:left + 34] = True
    ink = annotation_ink(image)
    assert ink[box].all() and ink[letter].all() and not ink[~box].any()
    labels = separate(image, polarity=polarity)
    assert not labels[box].any()
    assert separate(image, polarity=polarity, reject_annotations=False)[box].any()  # the box, a particle
    blank = image.copy()
    blank[letter] = ground
    assert not annotation_ink(blank)[box].any()  # no text in it: no label box
    middle = np.full_like(image, image[truth == 0].min())
    middle[100:138, 120:154] = ground
    draw_text(middle, "b", 107, 130, height=24, stroke=4, value=255 - ground)
    assert not annotation_ink(middle).any()  # in the middle of the panel: no text, no box


@pytest.mark.parametrize("ground", [255, 0])
def test_a_label_box_with_a_grey_letter_and_compression_noise_is_ink(rng, ground):
    """EMPS panels (88808139d3, 5d72761807, 4ec7671d11, b996f341bd) carry their panel letter in a box whose
    letter is grey, not ink, and whose ground, saved as JPEG, holds values 2-3 off the dtype's end that run
    from the letter to the box's edge: the letter was no hole of the ground, the box no label box, and it came
    out as particles. The box is ink with such a letter; a box with no letter, or a clipped disc, is not."""
    polarity = "bright" if ground == 255 else "dark"
    image, truth = make_touching_particles((240, 280), 25, polarity=polarity, seed=int(rng.integers(1e6)))
    image = (20 + 0.85 * image).astype(np.uint8)  # particles and film off the dtype's ends
    top, left = int(rng.integers(2, 8)), int(rng.integers(2, 8))
    box = np.zeros(image.shape, bool)
    box[top:top + 38, left:left + 34] = True
    image[box] = ground
    truth[box] = 0
    grey = 110 if ground == 255 else 150
    letter = draw_text(image, "b", top + 7, left + 10, height=24, stroke=4, value=grey)
    noise = 252 if ground == 255 else 3  # (within 3 of the end: no ink at 1/255)
    row = top + 7 + int(rng.integers(2, 10))
    image[row, left:left + 10] = noise  # a one-pixel path from the letter's left stroke out of the box
    image[top + 20, left + 20:left + 34] = noise  # ... and from its right stroke
    ink = annotation_ink(image)
    ground_pixels = box & ~letter & (image == ground)
    assert ink[ground_pixels].all() and not ink[~box].any()
    assert not separate(image, polarity=polarity)[box].any()
    assert separate(image, polarity=polarity, reject_annotations=False)[box].any()  # the box, a particle
    blank = image.copy()
    blank[letter] = ground
    assert not annotation_ink(blank)[box].any()  # no letter in it: no label box
    disc = np.full_like(image, image[truth == 0].min())  # a clipped disc in a corner, a darker spot inside
    yy, xx = np.ogrid[:240, :280]
    disc[(yy - 26) ** 2 + (xx - 28) ** 2 <= 24 ** 2] = ground  # (too deep for a stroke)
    disc[(yy - 26) ** 2 + (xx - 28) ** 2 <= 5 ** 2] = grey
    assert not annotation_ink(disc).any()


def test_text_in_a_framed_panel_is_still_ink(rng):
    """A thin frame of ink around the whole panel is not a stroke (the frame rule). 8dd2d83 named the joined
    pieces' radius `width`, shadowing the bounding-box width the frame and bar rules read: the frame then
    counted as a stroke in the middle of the panel, which declares that whole extreme the particles' own, and
    no text or bar of the panel was removed. The particles stay below 255: where their cores clip at 255 in
    the middle of the panel, strokes at 255 are theirs and the text stays (DECLUMP_TEST_SEED 2 and 4 drew
    such cores; that rule has its own tests)."""
    image, truth = make_touching_particles((200, 240), 20, seed=int(rng.integers(1e6)))
    image = (image * 0.9).astype(np.uint8)
    image[:40] = image[150:] = image[truth == 0].min()
    ink = draw_text(image, "50 nn", int(rng.integers(158, 170)), int(rng.integers(110, 140)))
    image[188:193, 100:180] = 255
    image[:2, :] = image[-2:, :] = image[:, :2] = image[:, -2:] = 255
    found = annotation_ink(image)
    assert found[ink].all() and found[188:193, 100:180].all()


def test_a_scale_bar_is_ink_beside_particles_clipped_in_strokes(rng):
    """Particles whose clipped cores are thin streaks at 255 in the middle of the panel make 255 the particles'
    own value for strokes: their cores, and one in the margin, stay. A filled axis-aligned bar at 255 in the
    margin is judged among bars only, and is still ink (before, any middle stroke kept every bar too)."""
    rows, cols = 240, 320
    yy, xx = np.mgrid[:rows, :cols]
    image = np.clip(rng.normal(40, 4, (rows, cols)), 0, 250)
    cores = []
    for cy, cx in [(90, 120), (150, 200), (40, 290)]:  # two in the middle, one in the right-hand margin
        angle = rng.uniform(0.3, 1.2)
        u = (yy - cy) * np.cos(angle) + (xx - cx) * np.sin(angle)
        v = -(yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle)
        image[(u / 22) ** 2 + (v / 9) ** 2 <= 1] = 170 + rng.normal(0, 3)  # the particle, well below 255
        core = (np.abs(v) <= 1.2) & (np.abs(u) <= 16)  # its clipped core: a streak 3 pixels wide
        image[core] = 255
        cores.append(core)
    left = int(rng.integers(20, 120))
    image[216:222, left:left + 80] = 255  # the scale bar, bottom margin
    found = annotation_ink(image.astype(np.uint8))
    assert found[216:222, left:left + 80].all()
    assert not any(found[core].any() for core in cores)


def test_a_lone_particle_clipped_at_255_in_the_margin_is_not_taken_for_ink():
    """Generated 8-bit images with one particle in 512^2 (the seeds of bench.defaults_sweep): its core clipped
    at 255 and speckled by noise, near the panel's edge on seed 1, where the default removed the whole
    particle as an annotation (F1 0); the piece its ink pixels make up is as wide as the core, not a stroke."""
    for seed in range(3):
        image, truth = make_touching_particles((512, 512), 1, radius_range=(6, 14), seed=seed)
        labels, details = separate(image, return_details=True)
        assert evaluate(labels, truth)["f1_50"] == 1.0, (seed, details.annotation_pixels)


def test_a_lone_glyph_along_an_edge_is_not_ink_but_one_with_a_companion_or_in_a_corner_is(rng):
    """Text comes in words: a single round glyph-sized stroke in a side margin, with no other ink beside it on
    its line, is a particle's clipped core, not text (two such pieces one above the other too); beside a second
    glyph, or in a corner of the panel (a panel letter), it is ink. A scale bar, and a word whose glyphs an
    underline joins into one piece, stay ink alone."""
    image = np.clip(rng.normal(40, 4, (300, 360)), 0, 250).astype(np.uint8)
    top, left = int(rng.integers(120, 160)), int(rng.integers(8, 40))  # left margin, mid height
    five = draw_text(image.copy(), "5", top, left)
    alone = image.copy()
    alone[five] = 255
    assert not annotation_ink(alone).any()
    pair = image.copy()
    both = draw_text(pair, "50", top, left)
    assert annotation_ink(pair)[both].all()
    stacked = image.copy()  # two round pieces one above the other: no line of text
    draw_text(stacked, "5", top, left)
    draw_text(stacked, "0", top + 24, left)
    assert not annotation_ink(stacked).any()
    corner = image.copy()
    letter = draw_text(corner, "5", int(rng.integers(4, 40)), left)
    assert annotation_ink(corner)[letter].all()
    bar = image.copy()
    bar[top:top + 5, left:left + 60] = 255
    assert annotation_ink(bar)[top:top + 5, left:left + 60].all()
    word = image.copy()  # glyphs joined into one piece by an underline: a word, wider than tall
    joined = draw_text(word, "5005", top, left)
    word[top + 19, left:left + 50] = 255
    joined[top + 19, left:left + 50] = True
    assert annotation_ink(word)[joined].all()


@pytest.mark.parametrize("n, shape", [(3, (512, 512)), (20, (512, 512))])
def test_saturated_particles_along_the_edges_are_kept(n, shape):
    """bench.defaults_sweep's sparse generated sets (seeds 0-2): every particle whose core clips at 255 near an
    edge is found. Before the companion rule, on "3 in 512^2" seed 0 and "sparse 20 in 512^2" seed 0, the
    default took such a core for a glyph and removed its particle as an annotation."""
    for seed in range(3):
        image, truth = make_touching_particles(shape, n, radius_range=(6, 14), seed=seed)
        ink = annotation_ink(image)
        assert not np.isin(np.unique(truth[ink]), np.arange(1, truth.max() + 1)).any(), seed


def test_lone_strokes_in_batches_equal_one_batch(rng, monkeypatch):
    """The pairs of kept pieces compared in batches (COMPANION_PAIRS) give the one-batch answer."""
    from gpu_pipeline.stages import annotations

    def random_found(count):
        top = rng.integers(0, 3900, count + 1).astype(np.float64)
        left = rng.integers(0, 3900, count + 1).astype(np.float64)
        bottom, right = top + rng.integers(4, 30, count + 1), left + rng.integers(4, 30, count + 1)
        keep = rng.random(count + 1) < 0.8
        keep[0] = False
        labels = rng.integers(0, count + 1, (40, 40))
        return labels, keep, keep & (rng.random(count + 1) < 0.7), (top, bottom, left, right)

    found = [random_found(300), random_found(200)]
    whole = annotations._lone_strokes(found, (4000, 4000))
    monkeypatch.setattr(annotations, "COMPANION_PAIRS", 7 * 500)  # batches of a few rows
    batched = annotations._lone_strokes(found, (4000, 4000))
    assert any(lone.any() for lone in whole) and any((k & ~lone).any() for (_, k, _, _), lone in zip(found, whole))
    for a, b in zip(whole, batched):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name, boxes", [
    # (rows, columns) of annotations with no particle under them, read off the images.
    ("226dc58f03", [(slice(9, 68), slice(13, 72))]),  # white panel letter, top left
    ("4b07dbd803", [(slice(24, 72), slice(694, 765))]),  # black "(b)", top right
])
def test_real_figure_annotations_are_not_particles(shared_data, name, boxes):
    """EMPS figure panels with text: the defaults make no particle of it (none lies half or more on it)."""
    from gpu_pipeline.io import read_image

    folder = shared_data / "emps_subset"
    image = read_image(folder / "images" / f"{name}.png")[0]
    truth = read_image(folder / "segmaps" / f"{name}.png")[0]
    in_boxes = np.zeros(image.shape, bool)
    for box in boxes:
        in_boxes[box] = True
    assert not truth[in_boxes].any()  # the boxes hold annotations only

    def on_annotations(labels):
        """Particles with half or more of their pixels in the boxes."""
        inside = np.bincount(labels[in_boxes], minlength=labels.max() + 1)
        return set(np.flatnonzero(2 * inside[1:] >= np.bincount(labels.ravel())[1:]) + 1)

    labels = separate(image)
    kept = separate(image, reject_annotations=False)
    assert not on_annotations(labels)
    assert on_annotations(kept)  # without the rule they come out as particles
    assert evaluate(labels, truth)["f1_50"] >= evaluate(kept, truth)["f1_50"]


def with_data_bar(image, rng, edge, ground, frame=0):
    """``image`` with a microscope's data bar added along ``edge`` (new lines, so the picture is unchanged): a
    ``ground`` (0 or 255) band 24-40 lines deep with text, a scale bar and a frame line in the other extreme;
    with ``frame`` lines of grey along the panel's edge outside it, and two lines of the ground 5 off the
    dtype's end (compression) inside it. Returns the barred image and the slices of it that hold the picture."""
    depth = int(rng.integers(24, 41))
    flip = edge in ("left", "right")
    picture = image.T if flip else image
    bar = np.full((depth, picture.shape[1]), ground, picture.dtype)
    ink = 255 - ground
    draw_text(bar, "50 nn", int(rng.integers(2, depth - 20)), int(rng.integers(5, 40)), value=ink)
    start = int(rng.integers(100, max(101, picture.shape[1] - 70)))
    bar[depth - 10:depth - 6, start:start + 60] = ink
    bar[0, :] = ink  # a line along the panel's edge
    if frame:
        bar[:frame] = 90
        bar[frame + 1:frame + 3] = abs(ground - 5)
    joined = np.concatenate([picture, bar[::-1]] if edge in ("bottom", "right") else [bar, picture])
    keep = slice(0, picture.shape[0]) if edge in ("bottom", "right") else slice(depth, depth + picture.shape[0])
    return (joined.T, (slice(None), keep)) if flip else (joined, (keep, slice(None)))


@pytest.mark.parametrize("edge", ["bottom", "top", "left", "right"])
@pytest.mark.parametrize("ground", [0, 255])
def test_an_information_band_changes_nothing_of_the_picture(rng, edge, ground):
    """A data bar along one edge is found line for line and left out: the picture's labels are exactly those of
    the picture alone, and the bar's lines are background. Its ground, as common as the film, otherwise moves
    the threshold and the polarity's count of the border. (The picture is kept off the dtype's ends: where a
    particle clips there, the ink rule's margins, a quarter of the panel, differ with the bar and without.)"""
    image, _ = make_touching_particles((200, 240), 25, polarity=str(rng.choice(["bright", "dark"])),
                                       seed=int(rng.integers(1e6)))
    assert image.dtype == np.uint8
    image = (20 + 0.8 * image).astype(np.uint8)
    barred, picture = with_data_bar(image, rng, edge, ground)
    axis = 0 if edge in ("bottom", "top") else 1
    keep = picture[axis]
    assert info_band(barred) == (axis, keep.start, keep.stop)
    labels, details = separate(barred, return_details=True)
    assert details.info_band == (axis, keep.start, keep.stop)
    alone = separate(image)
    assert np.array_equal(labels[picture], alone) and labels.sum() == alone.sum()
    assert alone.max() >= 5  # the picture is separated, not left empty
    assert separate(barred, reject_annotations=False, return_details=True)[1].info_band is None


@pytest.mark.parametrize("edge", ["bottom", "top", "left", "right"])
def test_an_information_band_inside_a_frame_line_is_found(rng, edge):
    """EMPS 2bc87a8698 and b23c478d84 end their black data bar one or two lines short of the panel's edge (a grey
    frame line) and hold two lines at 4-5 of 255 inside it: the band, read from the edge on, had no first line
    in ink and was not found, and its text came out as particles. A frame of up to two lines is passed over,
    and so are lines of the band's ground a few values off the dtype's end; the band's lines reach the panel's
    edge."""
    ground = int(rng.choice([0, 255]))
    image, _ = make_touching_particles((200, 240), 25, polarity=str(rng.choice(["bright", "dark"])),
                                       seed=int(rng.integers(1e6)))
    image = (20 + 0.8 * image).astype(np.uint8)
    barred, picture = with_data_bar(image, rng, edge, ground, frame=int(rng.integers(1, 3)))
    axis = 0 if edge in ("bottom", "top") else 1
    keep = picture[axis]
    assert info_band(barred) == (axis, keep.start, keep.stop)
    assert np.array_equal(separate(barred)[picture], separate(image))


def test_no_information_band_where_there_is_none(rng):
    """No band in generated images (particles against the frame, packed, clipped at the dtype's ends) nor in
    float or 16-bit images (detector counts, not figures); a band shallower than ``BAND_MIN_LINES`` lines, or
    running into a picture that is itself largely at the dtype's end (a saturated film), is none either."""
    seed = int(rng.integers(1e6))
    for image in (make_touching_particles((256, 256), 150, seed=seed)[0],
                  make_touching_particles((256, 256), 150, polarity="dark", touching_fraction=1.0, seed=seed)[0],
                  make_uneven_nuclei((256, 256), 60, seed=seed)[0],
                  np.clip(make_touching_particles((256, 256), 60, seed=seed)[0].astype(np.int32) * 3 - 200, 0,
                          255).astype(np.uint8)):
        assert info_band(image) is None
    image = make_touching_particles((200, 240), 25, seed=seed)[0]
    barred, _ = with_data_bar(image, rng, "bottom", 0)
    assert info_band(barred.astype(np.float32)) is None and info_band(barred.astype(np.uint16) * 16) is None
    shallow = image.copy()
    shallow[-3:] = 0
    assert info_band(shallow) is None
    film = barred.copy()
    film[film < np.percentile(image, 60)] = 0  # the picture's film at 0 too: no step into the picture
    assert info_band(film) is None


def test_the_information_bands_of_real_images_hold_no_particle(shared_data):
    """On the 366 EMPS images, the bands found (microscopes' data bars along the bottom of 24 images, 11-61 lines
    deep, and a black strip 4 columns wide) never cover a ground-truth particle pixel; there the defaults match
    more particles than without the band rule."""
    from gpu_pipeline.io import read_image

    found, ours, theirs = 0, [], []
    for folder in ("emps_subset", "emps_train_rest"):
        for path in sorted((shared_data / folder / "images").glob("*.png")):
            image = read_image(path)[0]
            band = info_band(image)
            if band is None:
                continue
            truth = read_image(shared_data / folder / "segmaps" / path.name)[0]
            axis, start, stop = band
            outside = np.ones(image.shape, bool)
            outside[(slice(None),) * axis + (slice(start, stop),)] = False
            assert not truth[outside].any(), path.stem
            found += 1
            if found % 4 == 0:  # a sample of them, run both ways
                ours.append(evaluate(separate(image), truth)["f1_50"])
                theirs.append(evaluate(separate(image, reject_annotations=False), truth)["f1_50"])
    assert found >= 20
    assert np.mean(ours) > np.mean(theirs), (ours, theirs)


def test_hollow_particles_are_whole_at_the_defaults():
    # Bright rims around cavities of the background's level (SEM particles with bright edges, rings): the rims
    # alone were split into wedges; with the cavities filled each particle is one piece.
    scores, filled, particles = [], 0, 0
    for seed in range(3):
        image, truth = make_touching_particles((384, 384), 40, radius_range=(12, 20), overlap=0.0, rim=4, seed=seed)
        labels, details = separate(image, return_details=True)
        scores.append(evaluate(labels, truth)["f1_50"])
        filled, particles = filled + details.shell_holes, particles + int(truth.max())
        assert details.particle_radius > 10  # measured again on the filled particles, not on the rims
    assert np.mean(scores) >= 0.85 and min(scores) >= 0.8, scores
    assert filled >= 0.8 * particles


def test_the_rim_generator_leaves_cavities_at_the_background_level():
    image, truth = make_touching_particles((128, 128), 6, radius_range=(14, 18), overlap=0.0, rim=3, blur=0,
                                           noise=0, seed=1)
    solid, _ = make_touching_particles((128, 128), 6, radius_range=(14, 18), overlap=0.0, blur=0, noise=0, seed=1)
    inner = (truth > 0) & (image == image[truth == 0].max())
    assert inner.sum() > 0.3 * (truth > 0).sum()
    np.testing.assert_array_equal(image[~inner], solid[~inner])


@pytest.mark.parametrize("case", ["discs 2D", "few in a large field", "spheres 3D"])
def test_the_defaults_find_dark_particles_as_they_find_bright_ones(rng, case):
    """The automatic choices are symmetric in polarity: the same image inverted (dark particles on a bright
    background) scores as the original at the defaults (threshold, polarity, smoothing, scale)."""
    shape, n, radius = {"discs 2D": ((256, 256), 40, (5, 12)), "few in a large field": ((512, 512), 3, (10, 16)),
                        "spheres 3D": ((48, 96, 96), 60, (4, 9))}[case]
    image, truth = make_touching_particles(shape, n, radius_range=radius, seed=int(rng.integers(1e6)))
    top = int(image.max()) + int(image.min())
    inverted = (top - image.astype(np.int64)).astype(image.dtype)
    bright, bright_details = separate(image, return_details=True)
    dark, dark_details = separate(inverted, return_details=True)
    assert (bright_details.polarity, dark_details.polarity) == ("bright", "dark")
    assert bright_details.threshold_method == dark_details.threshold_method
    f1_bright, f1_dark = evaluate(bright, truth)["f1_50"], evaluate(dark, truth)["f1_50"]
    assert f1_bright > 0.5 and abs(f1_dark - f1_bright) <= 0.05, (f1_bright, f1_dark)
