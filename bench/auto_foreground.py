"""Which automatic foreground choices win, on all the shared real data and on generated nuclei.

    python -m bench.auto_foreground [--emps-limit N] [--out NAME]
    python -m bench.auto_foreground --polarity [--emps-limit N] [--out NAME]

Every method runs as a new user would run it, one image at a time, scores
pooled over images (F1@0.5 and mean F1 over IoU 0.50-0.95):

- ``defaults``: ``separate(image)``, every option at its default (sigma,
  threshold, min_distance, min_size and hole size ``auto``, annotation ink
  rejected);
- ``threshold=X``: the defaults with one threshold method forced (which
  method ``auto`` should pick);
- ``no hole filling``, ``min_size=None`` (a ball of diameter min_distance,
  the rule before ``auto``), ``sigma: no radius rule`` (sigma ``auto``
  without SIGMA_PER_RADIUS), ``no annotation rejection``, ``reject
  annotations + rectangles``: the defaults with one step changed;
- ``polarity: border majority (before)``: the defaults with the ``auto``
  polarity rule before 2026-12-01 (``border_majority_polarity``);
- ``old defaults``: the defaults before the automatic options (Otsu,
  min_distance 4, no hole filling, sigma 1, min_size a ball of diameter 4,
  no annotation rejection);
- ``skimage watershed (tuned)``: the scikit-image watershed pipeline with
  the per-dataset parameters of ``bench.compare_methods`` (polarity by
  declump's rule);
- ``minority Otsu + CC``: Otsu, the side with fewer pixels is particles,
  connected components (sigma and min_size as the watershed's).

EMPS is reported per folder: the rules were chosen on ``emps_subset`` (132
images, half 1) and checked on ``emps_train_rest`` (234, half 2). Generated
nuclei of uneven brightness with dark nucleoli: rules chosen on seeds 0-3,
checked on seeds 100-105. The constants behind ``auto`` are in
``gpu_pipeline.stages.threshold`` (MISSED_AREA), ``gpu_pipeline.stages.scale``
(MIN_DISTANCE_PER_RADIUS), ``gpu_pipeline.pipeline`` (HOLE_RADIUS_PER_RADIUS,
SIGMA_PER_RADIUS, MIN_SIZE_PER_PARTICLE) and ``gpu_pipeline.stages.annotations``.

``--polarity`` audits the ``auto`` polarity instead, per EMPS image: the defaults with the polarity rule
before (``border_majority_polarity``: the background is what covers most of the border) and now
(``gpu_pipeline.stages.threshold.choose_polarity``), and the defaults with each polarity forced; the right side
is the forced one whose foreground has the higher Dice with the ground truth's, and each image's loss is the
F1@0.5 of that forced run minus the rule's. Every row keeps its counts, so any rule can be pooled again.

The annotation rule's safety is measured first (``annotation safety``): per
EMPS folder, how many true particles have 5 %, 20 % or 50 % of their pixels
in the zone it removes (ink plus margin), and which images hold them.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import time

import numpy as np
from scipy import ndimage as ndi

from bench.common import RESULTS, SHARED, machine_info
from bench.compare_methods import EMPS_MAX_HOLE, pooled_scores, with_polarity

OLD_DEFAULTS = dict(sigma=1.0, threshold="otsu", min_distance=4.0, max_hole_size=0.0, min_size=None,
                    reject_annotations=False)
#: Not run on the EMPS folders, to fit a shared 2-core machine (the full run takes over an hour there):
#: ``local`` (4.5 s per image); the forced thresholds, no hole filling and the rectangle rule (about the
#: threshold and hole choices, which the 2026-12-01 results cover) on both; on the check folder also the
#: one-step ablations (their choosing was on emps_subset); the polarity rule before, which ``--polarity``
#: runs on every EMPS image.
_EMPS_SUBSET, _EMPS_REST = "EMPS emps_subset (rules chosen)", "EMPS emps_train_rest (check)"
SLOW = ({(m, d) for m in ("threshold=local", "threshold=li", "threshold=triangle", "no hole filling",
                          "reject annotations + rectangles") for d in (_EMPS_SUBSET, _EMPS_REST)}
        | {(m, _EMPS_REST) for m in ("threshold=otsu", "min_size=None", "sigma: no radius rule")}
        | {("polarity: border majority (before)", d) for d in (_EMPS_SUBSET, _EMPS_REST)})  # in --polarity


def minority_otsu_components(image, *, sigma, min_size):
    """Otsu on the smoothed image, the side with fewer pixels as particles, connected components."""
    from skimage.filters import gaussian, threshold_otsu
    from skimage.morphology import remove_small_objects

    smoothed = gaussian(image.astype(np.float32), sigma=sigma, preserve_range=True)
    above = smoothed > threshold_otsu(smoothed)
    fg = above if above.mean() <= 0.5 else ~above
    fg = remove_small_objects(fg, max_size=max(int(min_size) - 1, 0))
    return ndi.label(fg)[0]


def without_sigma_radius_rule(fn):
    """``fn`` run with ``SIGMA_PER_RADIUS`` 0 (sigma ``auto`` as before the radius rule)."""
    from gpu_pipeline import pipeline

    def run(image, p):
        saved, pipeline.SIGMA_PER_RADIUS = pipeline.SIGMA_PER_RADIUS, 0.0
        try:
            return fn(image, p)
        finally:
            pipeline.SIGMA_PER_RADIUS = saved
    return run


def border_majority_polarity(image, threshold, polarity="auto", **_):
    """The ``auto`` polarity before 2026-12-01: the background is what covers most of the border (a split
    border: the minority side of the image is the particles)."""
    from gpu_pipeline.stages.threshold import face_counts_above, face_voxels

    if polarity != "auto":
        return polarity
    # Every face pooled, an information band's too (the rule had no band exception).
    border = sum(int(c) for c in face_counts_above(image, threshold)) / sum(face_voxels(image.shape))
    if border != 0.5:
        return "bright" if border < 0.5 else "dark"
    return "bright" if float((image > threshold).mean()) <= 0.5 else "dark"


def with_border_majority_polarity(fn):
    """``fn`` run with :func:`border_majority_polarity` as the ``auto`` polarity rule."""
    from gpu_pipeline.stages import threshold

    def run(image, p):
        saved, threshold.choose_polarity = threshold.choose_polarity, border_majority_polarity
        try:
            return fn(image, p)
        finally:
            threshold.choose_polarity = saved
    return run


def polarity_audit(emps_limit=None, save=None):
    """Per EMPS image: the right polarity, what the rules before and now pick, and what each loses."""
    from cpu_fallback import separate
    from gpu_pipeline._backend import DeclumpError
    from gpu_pipeline.io import read_image
    from gpu_pipeline.metrics import evaluate

    def ours(image, p, **options):
        return separate(image, spacing=p["spacing"], return_details=True, **options)

    runs = {"before": with_border_majority_polarity(ours), "now": ours,
            "bright": lambda image, p: ours(image, p, polarity="bright"),
            "dark": lambda image, p: ours(image, p, polarity="dark")}
    rows = []
    for folder in ("emps_subset", "emps_train_rest"):
        path = SHARED / folder
        if not path.exists():
            continue
        for name in sorted(p.stem for p in (path / "images").glob("*.png"))[:emps_limit]:
            image = read_image(path / "images" / f"{name}.png")[0]
            truth = read_image(path / "segmaps" / f"{name}.png")[0]
            row = {"folder": folder, "image": name}
            for key, fn in runs.items():
                try:
                    labels, details = fn(image, {"spacing": (1.0, 1.0)})
                    side = details.polarity
                except DeclumpError:  # nothing left: an empty result, scored as such
                    labels, side = np.zeros(truth.shape, dtype=np.int32), None
                s = evaluate(labels, truth)
                row[key] = {"polarity": side, "f1": [round(v, 5) for v in s["f1"]], "n_pred": s["n_pred"],
                            "dice": round(s["dice"], 4)}
                row["n_gt"] = s["n_gt"]
            right = max(("bright", "dark"), key=lambda k: row[k]["dice"])
            row["right"] = right
            for key in ("before", "now"):
                row[key]["loss_f1_50"] = round(row[right]["f1"][0] - row[key]["f1"][0], 4)
            rows.append(row)
            print(f"{folder[:10]} {name} right {right:6s} before {row['before']['polarity']} "
                  f"({row['before']['loss_f1_50']:+.2f}) now {row['now']['polarity']} ({row['now']['loss_f1_50']:+.2f})",
                  flush=True)
        if save:
            save(rows)
    return rows


def polarity_summary(rows):
    """Pooled F1@0.5 / mean F1 per folder and over all: rules before and now, each polarity forced, the right one."""
    from bench.compare_methods import pool_scores

    def scores(subset, pick):
        per = []
        for r in subset:
            run = r[pick(r)]
            per.append({"f1": run["f1"], "n_pred": run["n_pred"], "n_gt": r["n_gt"], "splits": 0, "merges": 0})
        p = pool_scores(per)
        return {"f1_50": round(p["f1_50"], 4), "mean_f1": round(p["mean_f1"], 4), "n_pred": p["n_pred"],
                "n_gt": p["n_gt"]}

    picks = {"defaults, polarity rule before (border majority)": lambda r: "before",
             "defaults, polarity rule now": lambda r: "now",
             "forced bright": lambda r: "bright", "forced dark": lambda r: "dark",
             "forced right side (by Dice; an upper bound for a polarity rule)": lambda r: r["right"]}
    from bench.emps_classifier import FOLDS, emps_items

    # The folds of bench.emps_classifier's cross-validation (the defaults train nothing: the spread over its folds).
    items = emps_items()
    fold_of = dict(zip(items, np.random.default_rng(2026).permutation(len(items)) % FOLDS))
    parts = [(f, [r for r in rows if r["folder"] == f]) for f in ("emps_subset", "emps_train_rest")]
    parts += [("both folders (366)", rows)]
    parts += [(f"bench.emps_classifier fold {k}", [r for r in rows if fold_of.get((r["folder"], r["image"])) == k])
              for k in range(FOLDS)]
    out = {}
    for label, subset in parts:
        if not subset:
            continue
        block = {"images": len(subset), "methods": {k: scores(subset, v) for k, v in picks.items()}}
        for key in ("before", "now"):
            wrong = [r for r in subset if r[key]["polarity"] != r["right"]]
            block[f"wrong_{key}"] = len(wrong)
            block[f"loss_{key}_sum_f1"] = round(sum(max(r[key]["loss_f1_50"], 0) for r in wrong), 2)
        out[label] = block
    return out


def _heading(title, result):
    """A result file's title and machine line (date, CPU, load at start and end, wall time)."""
    m = result["machine"]
    return [f"# {title} ({m['date']})", "",
            f"CPU: {m['cpu']} ({m['cpu_count']} cores, shared with other jobs: load average "
            f"{result['loadavg_start']} at start, {result['loadavg_end']} at end); wall {result['wall_seconds']:.0f} s."]


def polarity_markdown(result):
    lines = [*_heading("Automatic polarity: per-image audit on the EMPS images", result),
             "`python -m bench.auto_foreground --polarity`. Every run is `separate(image)` with the defaults; "
             "`before`: with the polarity rule before (the background is what covers most of the border), `now`: "
             "`choose_polarity` (border and connectivity evidence), forced: `polarity='bright'/'dark'`. Right side: "
             "the forced run whose foreground has the higher Dice with the ground truth's. The weight was chosen on "
             "emps_subset; emps_train_rest is the check.", ""]
    for label, block in result["summary"].items():
        lines += [f"## {label} ({block['images']} images)", "",
                  f"Wrong side: before {block['wrong_before']} images (F1@0.5 lost on them, summed over images: "
                  f"{block['loss_before_sum_f1']}), now {block['wrong_now']} ({block['loss_now_sum_f1']}).", "",
                  "| run | pooled F1@0.5 | mean F1 | objects found / true |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['f1_50']:.3f} | {v['mean_f1']:.3f} | {v['n_pred']} / {v['n_gt']} |"
                  for k, v in block["methods"].items()]
        lines.append("")
    lines += ["## Images where either rule picks the wrong side", "",
              "| folder | image | true objects | right | before (loss F1@0.5) | now (loss F1@0.5) |",
              "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["before"]["polarity"] != r["right"] or r["now"]["polarity"] != r["right"]:
            lines.append(f"| {r['folder']} | {r['image']} | {r['n_gt']} | {r['right']} | {r['before']['polarity']} "
                         f"({r['before']['loss_f1_50']:+.2f}) | {r['now']['polarity']} ({r['now']['loss_f1_50']:+.2f}) |")
    return "\n".join(lines) + "\n"


def annotation_safety():
    """Per EMPS folder: true particles with 5 / 20 / 50 % of their pixels in the annotation zone, and where."""
    from gpu_pipeline.io import read_image
    from gpu_pipeline.stages.annotations import annotation_zone

    out = {}
    for folder in ("emps_subset", "emps_train_rest"):
        path = SHARED / folder
        if not path.exists():
            continue
        fractions, images_with_ink, where = [], 0, {}
        names = sorted(p.stem for p in (path / "images").glob("*.png"))
        for name in names:
            image = read_image(path / "images" / f"{name}.png")[0]
            truth = read_image(path / "segmaps" / f"{name}.png")[0]
            zone = annotation_zone(image)
            images_with_ink += bool(zone.any())
            ids = np.unique(truth[truth > 0])
            share = ndi.sum(zone, truth, ids) / ndi.sum(np.ones_like(zone), truth, ids)
            fractions.extend(share.tolist())
            if (share >= 0.5).any():
                where[name] = int((share >= 0.5).sum())
        f = np.asarray(fractions)
        out[folder] = {"images": len(names), "images_with_ink": images_with_ink, "true_particles": int(f.size),
                       **{f"particles_{int(t * 100)}pct_in_zone": int((f >= t).sum()) for t in (0.05, 0.2, 0.5)},
                       "images_with_particles_half_in_zone": where}
        print(folder, out[folder], flush=True)
    return out


def methods():
    from bench.peers import skimage_watershed
    from cpu_fallback import separate

    def ours(**options):
        return lambda image, p: separate(image, spacing=p["spacing"], return_details=True, **options)

    def watershed(image, p):
        q = with_polarity(image, p)
        return skimage_watershed(image, sigma=q["sigma"], min_distance=q["min_distance"], polarity=q["polarity"],
                                 spacing=q["spacing"], min_size=q["min_size"], max_hole_size=q["max_hole_size"])

    return {
        "defaults": ours(),
        "threshold=otsu": ours(threshold="otsu"),
        "threshold=li": ours(threshold="li"),
        "threshold=triangle": ours(threshold="triangle"),
        "threshold=local": ours(threshold="local"),
        "no hole filling": ours(max_hole_size=0.0),
        "min_size=None": ours(min_size=None),
        "sigma: no radius rule": without_sigma_radius_rule(ours()),
        "no annotation rejection": ours(reject_annotations=False),
        "reject annotations + rectangles": ours(reject_annotations=True),
        "old defaults": ours(**OLD_DEFAULTS),
        "polarity: border majority (before)": with_border_majority_polarity(ours()),
        "skimage watershed (tuned)": watershed,
        "minority Otsu + CC": lambda image, p: minority_otsu_components(image, sigma=p["sigma"],
                                                                          min_size=p["min_size"]),
    }


def datasets(emps_limit=None):
    """(name, items, tuned parameters for the peers); items are (id, image, truth)."""
    import tifffile

    from gpu_pipeline.io import read_image
    from gpu_pipeline.synthetic import make_uneven_nuclei

    nuclei = dict(sigma=1.0, min_distance=6, min_size=20, max_hole_size=0.0, polarity="bright", spacing=(1.0, 1.0))
    out = [("generated nuclei, seeds 0-3 (rules chosen)",
            [(f"seed{s}", *make_uneven_nuclei((256, 256), 60, seed=s)) for s in range(4)], nuclei),
           ("generated nuclei, seeds 100-105 (check)",
            [(f"seed{s}", *make_uneven_nuclei((256, 256), 60, seed=s)) for s in range(100, 106)], nuclei)]
    dsb = SHARED / "dsb2018_stardist_sample"
    if dsb.exists():
        out.append(("DSB-2018 nuclei (check)", [("img2d", tifffile.imread(dsb / "img2d.tif"),
                                                 tifffile.imread(dsb / "mask2d.tif"))], nuclei))
    emps = dict(sigma=2.0, min_distance=20, min_size=400, max_hole_size=EMPS_MAX_HOLE, polarity="auto",
                spacing=(1.0, 1.0))
    for folder, role in (("emps_subset", "rules chosen"), ("emps_train_rest", "check")):
        path = SHARED / folder
        if not path.exists():
            continue
        names = sorted(p.stem for p in (path / "images").glob("*.png"))[:emps_limit]
        out.append((f"EMPS {folder} ({role})", [(n, read_image(path / "images" / f"{n}.png")[0],
                                                 read_image(path / "segmaps" / f"{n}.png")[0]) for n in names], emps))
    embryo = SHARED / "qcanet_embryo3d"
    if embryo.exists():
        out.append(("embryo 3D nuclei", [(s, tifffile.imread(embryo / "images_raw" / f"{s}.tif"),
                                          tifffile.imread(embryo / "labels" / f"{s}_labels.tif"))
                                         for s in ("8_cell_stage", "16_cell_stage")],
                    dict(sigma=2.0, min_distance=6, min_size=200, max_hole_size=0.0, polarity="bright",
                         spacing=(1.0, 1.0, 1.0))))
    return out


def run(emps_limit=None, save=None):
    from gpu_pipeline._backend import DeclumpError

    table = methods()
    results = {}
    for name, items, params in datasets(emps_limit):
        rows = {}
        for method, fn in table.items():
            if (method, name) in SLOW:
                continue
            pairs, chosen, seconds, failed = [], collections.Counter(), 0.0, 0
            for item, image, truth in items:
                t0 = time.perf_counter()
                try:
                    out = fn(image, params)
                except DeclumpError:  # e.g. nothing left after cleanup: an empty result, scored as such
                    out, failed = np.zeros(truth.shape, dtype=np.int32), failed + 1
                seconds += time.perf_counter() - t0
                if isinstance(out, tuple):
                    out, details = out
                    chosen[details.threshold_method] += 1
                pairs.append((out, truth))
            rows[method] = {**pooled_scores(pairs), "seconds_total": round(seconds, 2), "no_result": failed}
            if chosen:
                rows[method]["threshold_chosen"] = dict(chosen)
            r = rows[method]
            print(f"{name[:44]:44s} {method:26s} F1@0.5 {r['f1_50']:.3f} meanF1 {r['mean_f1']:.3f} "
                  f"{dict(chosen) if chosen else ''} {seconds:.0f}s", flush=True)
        results[name] = {"images": len(items), "peer_params": params, "methods": rows}
        if save:
            save(results)  # after each set, so a stopped run keeps what it measured
    return results


def pooled_emps(results):
    """The two EMPS folders pooled (366 images): TP recovered from each folder's F1 and counts."""
    blocks = [b for name, b in results.items() if name.startswith("EMPS")]
    if len(blocks) < 2:
        return None
    out = {}
    for method in [m for m in blocks[0]["methods"] if m in blocks[1]["methods"]]:
        tp = n = 0.0
        for b in blocks:
            r = b["methods"][method]
            tp += r["f1_50"] * (r["n_pred"] + r["n_gt"]) / 2
            n += r["n_pred"] + r["n_gt"]
        out[method] = round(2 * tp / n, 4)
    return out


def markdown(result):
    lines = [*_heading("Automatic foreground: which choices win", result),
             "Scores pooled over each set's images; `threshold chosen`: how often `auto` picked each method.", ""]
    for name, block in result["results"].items():
        lines += [f"## {name} ({block['images']} images)", "", f"Peer parameters: `{block['peer_params']}`", "",
                  "| method | F1@0.5 | mean F1 | objects found / true | splits | merges | no result | threshold chosen |",
                  "|---|---|---|---|---|---|---|---|"]
        for method, r in block["methods"].items():
            lines.append(f"| {method} | {r['f1_50']:.3f} | {r['mean_f1']:.3f} | {r['n_pred']} / {r['n_gt']} | "
                         f"{r['splits']} | {r['merges']} | {r['no_result']} | {r.get('threshold_chosen', '')} |")
        lines.append("")
    if result.get("annotation_safety"):
        lines += ["## Annotation rule: true EMPS particles in the zone it removes", "",
                  "| folder | images | with ink found | true particles | >= 5 % in zone | >= 20 % | >= 50 % | "
                  "images with particles >= 50 % in zone |", "|---|---|---|---|---|---|---|---|"]
        for folder, a in result["annotation_safety"].items():
            lines.append(f"| {folder} | {a['images']} | {a['images_with_ink']} | {a['true_particles']} | "
                         f"{a['particles_5pct_in_zone']} | {a['particles_20pct_in_zone']} | "
                         f"{a['particles_50pct_in_zone']} | {a['images_with_particles_half_in_zone']} |")
        lines.append("")
    if result.get("not_run"):
        lines += ["Not run: " + "; ".join(result["not_run"]) + ".", ""]
    if result.get("emps_pooled"):
        lines += ["## EMPS, both folders pooled (366 images): F1@0.5", "", "| method | F1@0.5 |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in result["emps_pooled"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--emps-limit", type=int, default=None, help="only the first N images of each EMPS folder")
    parser.add_argument("--out", default=None, help="result file stem in bench/results (default auto_foreground_DATE)")
    parser.add_argument("--polarity", action="store_true", help="the per-image polarity audit on the EMPS images")
    args = parser.parse_args(argv)
    start, t0 = [round(v, 2) for v in os.getloadavg()], time.perf_counter()
    machine = machine_info()
    if args.polarity:
        stem = args.out or f"auto_foreground_{machine['date'][:10]}_polarity"
        RESULTS.mkdir(exist_ok=True)

        def save_audit(rows):
            result = {"machine": machine, "loadavg_start": start,
                      "loadavg_end": [round(v, 2) for v in os.getloadavg()],
                      "wall_seconds": time.perf_counter() - t0, "emps_limit": args.emps_limit,
                      "summary": polarity_summary(rows), "rows": rows}
            (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=1))
            (RESULTS / f"{stem}.md").write_text(polarity_markdown(result))

        polarity_audit(args.emps_limit, save_audit)
        print(f"wrote {RESULTS / stem}.json/.md")
        return
    stem = args.out or f"auto_foreground_{machine['date'][:10]}"
    RESULTS.mkdir(exist_ok=True)

    def save(results):
        result = {"machine": machine, "loadavg_start": start,
                  "loadavg_end": [round(v, 2) for v in os.getloadavg()], "wall_seconds": time.perf_counter() - t0,
                  "emps_limit": args.emps_limit, "annotation_safety": safety, "results": results,
                  "emps_pooled": pooled_emps(results),
                  "not_run": sorted(f"{m} on {d}" for m, d in SLOW)}
        (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
        (RESULTS / f"{stem}.md").write_text(markdown(result))

    safety = annotation_safety()
    run(args.emps_limit, save)
    print(f"wrote {RESULTS / stem}.json/.md")


if __name__ == "__main__":
    main()
