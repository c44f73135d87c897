"""The EM particle pixel classifier on real images: 5-fold cross-validation by image, the painted workflow, the shipped model.

    python -m bench.emps_classifier [--limit N] [--painted 20] [--workers 1] [--train-shipped] [--grid] [--out NAME]

Data: the 366 EMPS training images in ../shared/data (emps_subset, 132, and emps_train_rest, 234).
Folds: by image, a seeded permutation cut into 5. For each fold a model is trained on the other
four (``train_classifier`` on ``classes_from_instances`` of the ground truth, the EM model's
settings below) and every image of the held-out fold is classified and split the way
``separate(image, classifier=model)`` does (checked on one image per run). All objects are pooled
(F1@0.5 and mean F1 over IoU 0.50-0.95, :func:`bench.compare_methods.pool_scores`), over all
366 images, over the 132 of emps_subset alone, and per fold (the spread).

Beside it, on the same images: declump's defaults (no model), minority-side Otsu + connected
components, and the scikit-image watershed pipeline (``compare_methods``' EMPS parameters).

Painted workflow: on the ``--painted`` images with the most touching ground-truth pairs, strokes
are simulated from the ground truth (lines along particle skeletons, lines in the background
far from particles, the lines of contact between particles; at most 300 pixels per class), a
model is trained on that image alone and applied to it, beside the shipped model (and the
cross-validated model) on the same images.

``--grid`` draws a few emps_subset images with the shipped model and the baselines. ``--train-shipped`` (alone) trains the shipped model on all 366 images and writes
``gpu_pipeline/models/em-particles.npz``; the cross-validation then compares against it. Features are computed once per image and kept in a
temporary folder (float32, about 60 MB per image) for the run.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import RESULTS, SHARED, machine_info

#: The EM model: feature scales (px; EMPS particles are 5-150 px across, so the context reaches 16 px),
#: trees, depth, labelled pixels per class (split evenly over the training images), boundary width.
#: On folds 0-1 (146 held-out images, minority-high features, relative seeds) 32 trees of depth 14 with
#: 400 px per image and class reached F1@0.5 0.523 / 0.489 against 0.529 / 0.449 for 16 trees of depth 12 with
#: 300 px; 24 trees keep the shipped model under 5 MB.
EM_SCALES = (1.0, 2.0, 4.0, 8.0, 16.0)
EM_TREES, EM_DEPTH, EM_SAMPLES_PER_IMAGE, EM_BOUNDARY_WIDTH = 32, 14, 800, 2
FOLDS = 5
MODEL_PATH = Path(__file__).resolve().parents[1] / "gpu_pipeline" / "models" / "em-particles.npz"
PAINT_LIMIT = 300

MODEL = "classifier (CV) + boundary split"
OLD = "declump defaults (no model)"
OTSU_CC = "minority-side Otsu + connected components"
WATERSHED = "skimage watershed pipeline"


def emps_items(limit=None):
    """(folder, name) of the 366 EMPS training images, emps_subset first, in the folders' list order."""
    items = []
    for folder, listing in (("emps_subset", "subset.txt"), ("emps_train_rest", "names.txt")):
        path = SHARED / folder / listing
        if path.exists():
            items += [(folder, n) for n in path.read_text().split() if n]
    return items[:limit] if limit else items


def load(folder, name):
    from gpu_pipeline.io import read_image

    image = read_image(SHARED / folder / "images" / f"{name}.png")[0]
    image = image[..., 0] if image.ndim == 3 else image
    return np.ascontiguousarray(image), read_image(SHARED / folder / "segmaps" / f"{name}.png")[0].astype(np.int32)


def split_probabilities(probabilities, classes):
    """Labels from a classifier's probabilities, as ``separate(image, classifier=...)`` makes them by default."""
    from gpu_pipeline.classifier import class_probability, foreground_probability
    from gpu_pipeline.stages.boundary_split import boundary_split
    from gpu_pipeline.stages.cleanup import clean_mask

    fg = foreground_probability(probabilities, classes) > 0.5
    fg = clean_mask(fg, spacing=(1.0, 1.0), min_size=math.pi * 4.0 ** 2 / 4, max_hole_size=0.0)
    if not fg.any():
        return np.zeros(fg.shape, np.int32)
    return boundary_split(fg, class_probability(probabilities, classes, "boundary"),
                          interior=class_probability(probabilities, classes, "particle"))


def otsu_connected_components(image, min_size=30):
    """Otsu's threshold, the side with fewer pixels as foreground, face-connected components over ``min_size`` px."""
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    above = image > threshold_otsu(image)
    fg = above if above.sum() <= above.size / 2 else ~above
    labels, _ = ndi.label(fg)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return np.where(keep[labels], labels, 0)


def baselines(image):
    from bench.compare_methods import EMPS_MAX_HOLE, run_method, with_polarity
    from bench.compare_methods import WATERSHED as COMPARE_WATERSHED
    from cpu_fallback import separate
    from gpu_pipeline.pipeline import NoParticlesError

    try:
        old = separate(image)
    except NoParticlesError:
        old = np.zeros(image.shape, np.int32)
    p = with_polarity(image, dict(sigma=2.0, min_distance=20, min_size=400, max_hole_size=EMPS_MAX_HOLE,
                                  polarity="auto", spacing=(1.0, 1.0), spot_sigma=8.0))
    return {OLD: old, OTSU_CC: otsu_connected_components(image), WATERSHED: run_method(COMPARE_WATERSHED, image, p)}


def simulated_strokes(truth, rng, limit=PAINT_LIMIT):
    """Scribbles a user would paint, from ground truth: 1 background, 2 particle, 3 boundary; <= ``limit`` px each.

    Particle: the skeletons of particles shrunk by 2 px; background: straight lines of 60 px
    kept where they are over 10 px from any particle; boundary: the 1-px lines of contact
    between touching particles. Whole strokes (skeleton pieces, lines) are added in random order
    until the next would exceed ``limit``.
    """
    from scipy import ndimage as ndi
    from skimage.draw import line
    from skimage.morphology import skeletonize

    from gpu_pipeline.classifier import classes_from_instances

    scribbles = np.zeros(truth.shape, np.uint8)
    shrunk = (truth > 0) & (ndi.minimum_filter(truth, 5) == truth) & (ndi.maximum_filter(truth, 5) == truth)
    particle = skeletonize(shrunk)
    contact = classes_from_instances(truth, boundary_width=1) == 3
    contact = skeletonize(contact) | (contact & ~ndi.binary_erosion(contact))
    gap = ndi.distance_transform_edt(truth == 0)
    far = gap > min(10.0, gap.max() / 2)  # crowded frames have little background: stay half-way from particles
    background = np.zeros(truth.shape, bool)
    for _ in range(60):
        r, c = rng.integers(0, truth.shape[0]), rng.integers(0, truth.shape[1])
        angle = rng.uniform(0, np.pi)
        r1 = int(np.clip(r + 60 * np.sin(angle), 0, truth.shape[0] - 1))
        c1 = int(np.clip(c + 60 * np.cos(angle), 0, truth.shape[1] - 1))
        rr, cc = line(r, c, r1, c1)
        background[rr[far[rr, cc]], cc[far[rr, cc]]] = True
    if not background.any():  # the random lines missed a small background: its skeleton instead
        background = skeletonize(far)
    for value, mask in ((1, background), (2, particle), (3, contact)):
        strokes, n = ndi.label(mask, structure=np.ones((3, 3)))
        used = 0
        for stroke in rng.permutation(np.arange(1, n + 1)):
            where = strokes == stroke
            size = int(where.sum())
            if used + size > limit:
                if used == 0:  # one long stroke: keep its first ``limit`` pixels
                    flat = np.flatnonzero(where)[:limit]
                    scribbles.ravel()[flat] = value
                    used = flat.size
                break
            scribbles[where] = value
            used += size
    return scribbles


def touching_pixels(truth):
    """Pixels of the 1-px contact lines between touching ground-truth particles."""
    from gpu_pipeline.classifier import classes_from_instances

    return int((classes_from_instances(truth, boundary_width=1) == 3).sum())


def train_shipped(items, path=MODEL_PATH):
    """The shipped model: trained on every image of ``items`` with the EM settings, written to ``path``."""
    from gpu_pipeline.classifier import classes_from_instances, train_classifier

    images, classes = [], []
    for folder, name in items:
        image, truth = load(folder, name)
        images.append(image)
        classes.append(classes_from_instances(truth, boundary_width=EM_BOUNDARY_WIDTH))
    model = train_classifier(images, classes, scales=EM_SCALES, n_estimators=EM_TREES, max_depth=EM_DEPTH, seed=0,
                             samples_per_class=EM_SAMPLES_PER_IMAGE * len(images))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return model


def painted_workflow(args, items, images, truths, per_image, features, feature_files, shipped):
    """Per image: strokes simulated from its ground truth, a model trained on them alone, applied to it."""
    from scipy import ndimage as ndi

    from bench.compare_methods import pool_scores
    from gpu_pipeline.classifier import train_classifier
    from gpu_pipeline.metrics import evaluate

    # (those with a background of at least 3 px away from particles: strokes need room there)
    eligible = [i for i in range(len(items)) if (ndi.distance_transform_edt(truths[i] == 0) > 3).sum() >= 100]
    order = sorted(eligible, key=lambda i: -touching_pixels(truths[i]))
    painted = {}
    rng = np.random.default_rng(7)
    for i in order:
        scribbles = simulated_strokes(truths[i], rng)
        if len(painted) == args.painted:
            break
        if not all((scribbles == v).any() for v in (1, 2, 3)):
            continue
        own = train_classifier(images[i], scribbles, features=features([i]), scales=EM_SCALES, seed=0)
        F = np.load(feature_files[i])
        row = {"pixels_per_class": {int(v): int((scribbles == v).sum()) for v in (1, 2, 3)},
               "painted": evaluate(split_probabilities(own.predict_features(F), own.classes), truths[i]),
               "cross-validated model": per_image[items[i][1]]["scores"][MODEL]}
        if shipped is not None:
            row["shipped model"] = evaluate(split_probabilities(shipped.predict_features(F), shipped.classes),
                                            truths[i])
        painted[items[i][1]] = row
    return {"images": painted, "pooled": {
        k: pool_scores([row[k] for row in painted.values()]) for k in next(iter(painted.values()))
        if k != "pixels_per_class"}} if painted else {}


def _cross_validate_fold(job):
    """Train on the other folds, classify and split this fold's images: their scores by name (a worker process)."""
    from gpu_pipeline.classifier import classes_from_instances, train_classifier
    from gpu_pipeline.metrics import evaluate

    fold, items, fold_of, feature_files = job
    train = [i for i in range(len(items)) if fold_of[i] != fold]
    images, classes = [], []
    for i in train:
        image, truth = load(*items[i])
        images.append(image)
        classes.append(classes_from_instances(truth, boundary_width=EM_BOUNDARY_WIDTH))
    model = train_classifier(images, classes, features=[np.load(feature_files[i], mmap_mode="r") for i in train],
                             samples_per_class=EM_SAMPLES_PER_IMAGE * len(train), scales=EM_SCALES,
                             n_estimators=EM_TREES, max_depth=EM_DEPTH, seed=0)
    scores = {}
    for i in (i for i in range(len(items)) if fold_of[i] == fold):
        image, truth = load(*items[i])
        labels = split_probabilities(model.predict_features(np.load(feature_files[i])), model.classes)
        if not scores and fold == 0:  # the bench's shortcut gives separate()'s labels
            from cpu_fallback import separate

            assert np.array_equal(labels, separate(image, classifier=model)), "bench != separate(classifier=)"
        scores[items[i][1]] = evaluate(labels, truth)
    return scores


def _features_and_baselines(job):
    """One image: its features saved to ``path``, and the baselines' scores (a worker process)."""
    from gpu_pipeline.metrics import evaluate
    from gpu_pipeline.stages.features import pixel_features

    folder, name, path = job
    image, truth = load(folder, name)
    np.save(path, pixel_features(image, scales=EM_SCALES))
    return {k: evaluate(v, truth) for k, v in baselines(image).items()}


def image_grid(path, n=3):
    """Input, ground truth, the shipped model + boundary split and the baselines on the emps_subset images with the
    most particles (the shipped model has seen them in training: a picture of what it does, not a score)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gpu_pipeline.overlay import overlay_rgb
    from gpu_pipeline.pipeline import separate

    items = [item for item in emps_items() if item[0] == "emps_subset"]
    counts = [int(load(*item)[1].max()) for item in items]
    chosen = [items[i] for i in np.argsort(counts)[::-1][:n]]
    columns = ["input", "ground truth", "shipped model + boundary split", OTSU_CC, WATERSHED]
    fig, axes = plt.subplots(len(chosen), len(columns), figsize=(2.6 * len(columns), 2.6 * len(chosen)), squeeze=False)
    for row, item in enumerate(chosen):
        image, truth = load(*item)
        panels = {"input": np.zeros_like(truth), "ground truth": truth,
                  "shipped model + boundary split": separate(image, classifier="em-particles"), **baselines(image)}
        for col, name in enumerate(columns):
            ax = axes[row, col]
            ax.imshow(overlay_rgb(image, panels[name])[:256, :256])
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=7)
            if col == 0:
                ax.set_ylabel(item[1], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    from bench.compare_methods import pool_scores
    from gpu_pipeline.classifier import classes_from_instances, load_classifier

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images (quick check)")
    parser.add_argument("--painted", type=int, default=20, help="images for the painted workflow")
    parser.add_argument("--train-shipped", action="store_true",
                        help="only train the shipped model on all images and write it to gpu_pipeline/models/")
    parser.add_argument("--grid", action="store_true", help="only draw the image grid (needs the shipped model)")
    parser.add_argument("--workers", type=int, default=1, help="processes for the features and baselines")
    parser.add_argument("--out", default=None, help="result file stem (default emps_classifier_<date>)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    items = emps_items(args.limit)
    if not items:
        print(f"EMPS data not found under {SHARED}; nothing to do")
        return 1
    if args.grid:
        path = RESULTS / f"{args.out or 'emps_classifier_' + time.strftime('%Y-%m-%d')}_grid.png"
        image_grid(path)
        print(f"wrote {path}")
        return 0
    if args.train_shipped:
        model = train_shipped(items)
        print(f"{model!r} trained on {len(items)} images in {time.perf_counter() - start:.0f} s -> {MODEL_PATH} "
              f"({MODEL_PATH.stat().st_size / 1e6:.2f} MB)")
        return 0
    fold_of = np.random.default_rng(2026).permutation(len(items)) % FOLDS
    settings = dict(scales=EM_SCALES, n_estimators=EM_TREES, max_depth=EM_DEPTH, seed=0)
    result = {"machine": machine_info(), "load_before": os.getloadavg(), "images": len(items),
              "model": {**settings, "samples_per_image_and_class": EM_SAMPLES_PER_IMAGE,
                        "boundary_width": EM_BOUNDARY_WIDTH}, "folds": FOLDS}
    per_image = {}
    with tempfile.TemporaryDirectory(prefix="emps_features_") as tmp:
        images, truths, classes, feature_files = [], [], [], []
        jobs = [(folder, name, str(Path(tmp) / f"{i}.npy")) for i, (folder, name) in enumerate(items)]
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            for i, scores in enumerate(pool.imap(_features_and_baselines, jobs)):
                folder, name, path = jobs[i]
                image, truth = load(folder, name)
                images.append(image)
                truths.append(truth)
                classes.append(classes_from_instances(truth, boundary_width=EM_BOUNDARY_WIDTH))
                feature_files.append(Path(path))
                per_image[name] = {"folder": folder, "fold": int(fold_of[i]), "n_gt": int(truth.max()),
                                   "scores": scores}
                if i % 25 == 0:
                    print(f"features + baselines {i + 1}/{len(items)} {time.perf_counter() - start:.0f}s "
                          f"load {os.getloadavg()[0]:.1f}", flush=True)

        def features(indices):
            return [np.load(feature_files[i], mmap_mode="r") for i in indices]

        jobs = [(fold, items, fold_of, [str(f) for f in feature_files]) for fold in range(FOLDS)]
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            for fold, scores in enumerate(pool.imap(_cross_validate_fold, jobs)):
                for name, score in scores.items():
                    per_image[name]["scores"][MODEL] = score
                print(f"fold {fold} done, {time.perf_counter() - start:.0f}s", flush=True)

        shipped = load_classifier("em-particles") if MODEL_PATH.exists() else None
        if shipped is not None:
            result["shipped_model"] = {"path": str(MODEL_PATH.relative_to(MODEL_PATH.parents[2])),
                                       "bytes": MODEL_PATH.stat().st_size, "header": shipped.header}

        # The painted workflow on the images with the most touching pixels (an error here keeps the CV results).
        try:
            result["painted"] = painted_workflow(args, items, images, truths, per_image, features, feature_files,
                                                 shipped)
        except Exception as exc:  # noqa: BLE001 - reported in the result file
            result["painted"] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"painted workflow failed: {result['painted']['error']}", flush=True)

    methods = list(next(iter(per_image.values()))["scores"])
    subset = [n for n, v in per_image.items() if v["folder"] == "emps_subset"]
    parts = {f"all {len(per_image)}": list(per_image), f"emps_subset ({len(subset)})": subset}
    for fold in range(FOLDS):
        parts[f"fold {fold}"] = [n for n, v in per_image.items() if v["fold"] == fold]
    result["pooled"] = {part: {m: pool_scores([per_image[n]["scores"][m] for n in names]) for m in methods}
                        for part, names in parts.items() if names}
    result["per_image"] = {n: {"folder": v["folder"], "fold": v["fold"], "n_gt": v["n_gt"],
                               **{m: [round(v["scores"][m]["f1_50"], 4), round(v["scores"][m]["mean_f1"], 4)]
                                  for m in methods}} for n, v in per_image.items()}
    result["wall_seconds"] = time.perf_counter() - start
    result["load_after"] = os.getloadavg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / (args.out or f"emps_classifier_{result['machine']['date'][:10]}")
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown(result, methods))
    print(stem.with_suffix(".md").read_text())
    return 0


def markdown(result, methods):
    m = result["machine"]
    lines = [f"# EM particle pixel classifier, EMPS, {m['date']}", "",
             f"Machine: {m['cpu']} ({m['cpu_count']} cores), shared with other sessions (load average before "
             f"{result['load_before'][0]:.1f}, after {result['load_after'][0]:.1f}); wall {result['wall_seconds']:.0f} s. "
             f"{result['images']} images, {result['folds']}-fold cross-validation by image; model: "
             f"`{result['model']}`. Scores pool all objects: F1@0.5 / mean F1 (IoU 0.50-0.95).", "",
             "| method | " + " | ".join(result["pooled"]) + " |", "|---|" + "---|" * len(result["pooled"])]
    for method in methods:
        lines.append(f"| {method} | " + " | ".join(f"{p[method]['f1_50']:.3f} / {p[method]['mean_f1']:.3f}"
                                                   for p in result["pooled"].values()) + " |")
    folds = [result["pooled"][k][MODEL]["f1_50"] for k in result["pooled"] if k.startswith("fold")]
    if folds:
        lines += ["", f"{MODEL}, F1@0.5 across folds: min {min(folds):.3f}, max {max(folds):.3f}, "
                      f"mean {np.mean(folds):.3f}, sd {np.std(folds):.3f}."]
    painted = result.get("painted")
    if painted:
        lines += ["", f"## Painted workflow ({len(painted['images'])} images with the most touching pixels; "
                      f"simulated strokes, <= {PAINT_LIMIT} px per class, model trained and applied per image)", "",
                  "| model | pooled F1@0.5 | mean F1 |", "|---|---|---|"]
        for k, v in painted["pooled"].items():
            lines.append(f"| {k} | {v['f1_50']:.3f} | {v['mean_f1']:.3f} |")
        if all("shipped model" in r for r in painted["images"].values()):
            better = sum(r["painted"]["f1_50"] >= r["shipped model"]["f1_50"] for r in painted["images"].values())
            lines += ["", f"Images where the painted model's F1@0.5 >= the shipped model's: {better} of "
                          f"{len(painted['images'])}."]
    if "shipped_model" in result:
        s = result["shipped_model"]
        lines += ["", f"Shipped model: `{s['path']}`, {s['bytes'] / 1e6:.2f} MB, trained on all {s['header']['training']['n_images']} "
                      "images (`python -m bench.emps_classifier --train-shipped`); it has seen the painted images."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
