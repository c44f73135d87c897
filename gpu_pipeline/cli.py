"""The `declump` command: run, batch, train, demo, app, evaluate."""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import shlex
import sys
from pathlib import Path

import numpy as np

from gpu_pipeline import __version__
from gpu_pipeline._backend import DeclumpError, resolve_device, to_host
from gpu_pipeline._common import counted

PARAMETER_HELP = {
    "spacing": "voxel size per axis, plane/row/column order, physical units (e.g. nm): 'Z,Y,X' or 'Y,X' or one "
               "number; default: from OME-Zarr metadata, else 1 (all sizes below are then in voxels)",
    "sigma": "Gaussian smoothing sigma before thresholding, physical units; 0 disables; 'auto': one voxel, doubled "
             "(up to 8) while that makes the objects found 3x larger (noise grain, not particles) (default %(default)s; chunked "
             "runs need a number)",
    "threshold": "how the smoothed image becomes a foreground: 'otsu', 'li', 'triangle' (global, from the histogram), "
                 "'local' (Otsu above a background estimated over an eighth of the image: uneven illumination), 'auto' "
                 "(percentile-normalised: Otsu, or Li where Otsu misses dim particles, with Otsu's outline kept for the "
                 "particles it finds; reports the pick in the summary) or a number in the "
                 "image's intensity units (default %(default)s; chunked runs: otsu, li, triangle or a number)",
    "polarity": "particles brighter ('bright') or darker ('dark') than the background; 'auto': the side rarer "
                "on the image border than inside it and split into more pieces (default %(default)s)",
    "min_distance": "smallest distance between particle centres, physical units; about the smallest particle "
                    "radius, or 'auto': 0.5 x the typical particle radius measured on the foreground (2D), 0.5 x "
                    "the median depth of its distance map's maxima, at least 2 voxels (3D) (default %(default)s; "
                    "chunked runs need a number)",
    "min_size": "remove objects smaller than this area (2D) or volume (3D), physical units; 'auto': 0.2 (2D) or "
                "1/512 (3D) x a ball of the typical particle radius, for objects and again for the particles after "
                "the split (default %(default)s; chunked runs: a ball of diameter --min-distance)",
    "max_hole_size": "fill holes smaller than this area/volume, physical units; 'auto': holes up to a ball of 0.4 x "
                     "the typical particle radius (nucleoli, not the larger pockets enclosed between touching "
                     "particles) and the cavities of hollow particles (a rim thinner than 1.5 x the cavity's radius); "
                     "0: off (default %(default)s; chunked runs need 0)",
    "neck_ratio": "peaks of one region joined by no neck narrower than this times the higher peak's depth make "
                  "one particle; 'auto', a number in (0, 1] or 'off'. 1.0: only peaks on a flat ridge or plateau "
                  "(rods, elongated nuclei; in 2D a dip of up to one voxel is allowed, the grid's sampling of a rod's "
                  "axis). Default %(default)s: 0.97 in 2D (a dip of 3 %% or one voxel), 0.95 in 3D (a large "
                  "particle pressed by its neighbours, two maxima a few percent apart). Lower values also join "
                  "shallow necks (0.7: rods, hollow particles; merges overlapping spheres). The watershed method "
                  "ignores it",
    "nearby_ratio": "a peak closer to a higher peak of its region than this times the higher peak's depth joins "
                    "it whatever the neck (it lies inside that peak's inscribed ball; PoreSpy SNOW's rule); 'auto', "
                    "a number in (0, 1] or 'off'. Default %(default)s: off in 2D (overlapping particles of a "
                    "projection), 0.8 in 3D. The watershed method ignores it",
    "peak_reach": "a peak must also be the highest point within this times its own depth (the window grows with "
                  "the particle, so a large particle's second maxima are no centres); 'auto', a number in (0, 1] "
                  "or 'off'. Default %(default)s: off in 2D, 0.7 in 3D. Both methods use the same peaks",
    "reach_share": "a maximum that the peak reach overlooks stays a peak when it keeps at least this share of its "
                   "own inscribed ball from every other peak of its region (a small particle pressed against "
                   "larger ones, not a second maximum); 'auto', a number in (0, 1] or 'off' (the reach drops "
                   "them all). Default %(default)s: 0.6. Only with the peak reach",
    "ball_share": "a group of peaks that keeps less than this share of its own inscribed ball from the other "
                  "groups of its region (a second maximum where particles meet) is dropped and its voxels go to "
                  "its neighbours; 'auto', a number in (0, 1] or 'off'. Default %(default)s: 0.5. "
                  "The watershed method ignores it",
}


def _spacing(text):
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"spacing must be comma-separated numbers, got {text!r}")
    return values[0] if len(values) == 1 else values


def _ratio(name):
    """The argparse type of ``--neck-ratio``, ``--nearby-ratio``, ``--peak-reach``, ``--reach-share`` and
    ``--ball-share``: 'auto', a number in (0, 1], or 'off' (None)."""
    def parse(text):
        if text == "off":
            return None
        if text == "auto":
            return text
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not 0 < value <= 1:
            raise argparse.ArgumentTypeError(f"{name} must be 'auto', a number in (0, 1] or 'off', got {text!r}")
        return value
    return parse


def _threshold(text):
    from gpu_pipeline.stages.threshold import THRESHOLD_METHODS

    if text in THRESHOLD_METHODS:
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"threshold must be one of {', '.join(THRESHOLD_METHODS)} or a number, "
                                         f"got {text!r}")


def _auto_or_number(what):
    def parse(text):
        if text == "auto":
            return text
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be 'auto' or a number, got {text!r}")

    return parse


def add_separation_options(parser):
    from gpu_pipeline.stages.outline import OUTLINES

    group = parser.add_argument_group("separation")
    group.add_argument("--spacing", type=_spacing, default=None, help=PARAMETER_HELP["spacing"])
    group.add_argument("--sigma", type=_auto_or_number("sigma"), default="auto", help=PARAMETER_HELP["sigma"])
    group.add_argument("--threshold", type=_threshold, default="auto", help=PARAMETER_HELP["threshold"])
    group.add_argument("--polarity", choices=("auto", "bright", "dark"), default="auto", help=PARAMETER_HELP["polarity"])
    group.add_argument("--min-distance", type=_auto_or_number("min distance"), default="auto",
                       help=PARAMETER_HELP["min_distance"])
    group.add_argument("--min-size", type=_auto_or_number("min size"), default="auto", help=PARAMETER_HELP["min_size"])
    group.add_argument("--max-hole-size", type=_auto_or_number("max hole size"), default="auto",
                       help=PARAMETER_HELP["max_hole_size"])
    group.add_argument("--reject-annotations", nargs="?", const="on", choices=("auto", "on", "off"), default="auto",
                       help="2D: remove figure annotations from the foreground. auto (default): text, letters and "
                            "bars drawn in pure ink (the dtype's extreme value, thin strokes), for a thresholded or "
                            "--classifier foreground, not a --mask; on (or the bare flag): also foreground shaped "
                            "like filled axis-aligned rectangles (bars, info bands; an axis-aligned rod is one too); "
                            "off: keep everything")
    group.add_argument("--outline", choices=OUTLINES, default="auto",
                       help="where particle outlines lie. edge: moved outward by up to two pixels, or inward by one, to "
                            "the steepest point of each particle's edge where that is clearly steeper than the "
                            "threshold's contour; threshold: on the threshold's contour; auto (default): edge for a "
                            "thresholded 2D image, threshold in 3D and for a --mask or --classifier foreground "
                            "(chunked runs: threshold)")
    group.add_argument("--neck-ratio", type=_ratio("neck ratio"), default="auto", help=PARAMETER_HELP["neck_ratio"])
    group.add_argument("--nearby-ratio", type=_ratio("nearby ratio"), default="auto",
                       help=PARAMETER_HELP["nearby_ratio"])
    group.add_argument("--peak-reach", type=_ratio("peak reach"), default="auto", help=PARAMETER_HELP["peak_reach"])
    group.add_argument("--reach-share", type=_ratio("reach share"), default="auto",
                       help=PARAMETER_HELP["reach_share"])
    group.add_argument("--ball-share", type=_ratio("ball share"), default="auto", help=PARAMETER_HELP["ball_share"])
    group.add_argument("--method", choices=("kmeans", "watershed"), default="kmeans",
                       help="kmeans: k-means per region from the peaks (default); watershed: the classical "
                            "watershed of the distance map from the same peaks, for comparison")
    group.add_argument("--assignment", choices=("power", "euclidean"), default="power",
                       help="k-means distance: size-aware power distance |x-c|^2 - r^2 (default) or plain Euclidean")
    group.add_argument("--max-iter", type=int, default=0,
                       help="Lloyd iterations of the k-means after the assignment to the peaks (default %(default)s)")
    group.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto",
                       help="auto: the GPU when CuPy (>= 14.1) sees one, else the CPU (default)")


def add_axis_options(parser):
    """``--channel`` and ``--timepoint`` (``declump run``, ``batch`` and ``train``: of the images, not of
    their labels)."""
    parser.add_argument("--channel", type=int, help="channel index for inputs with a 'c' axis")
    parser.add_argument("--timepoint", type=int, help="time index for inputs with a 't' axis")


def add_classifier_option(parser):
    """``--classifier`` (``declump run`` and ``declump batch``)."""
    parser.add_argument("--classifier", default=None,
                        help="pixel classifier for the foreground instead of the threshold: a model file from "
                             "`declump train` (.npz) or a shipped model name (em-particles)")


def separation_kwargs(args):
    return dict(spacing=args.spacing, sigma=args.sigma, threshold=args.threshold, polarity=args.polarity,
                min_distance=args.min_distance, min_size=args.min_size, max_hole_size=args.max_hole_size,
                neck_ratio=args.neck_ratio, nearby_ratio=args.nearby_ratio, peak_reach=args.peak_reach,
                reach_share=args.reach_share, ball_share=args.ball_share, method=args.method,
                assignment=args.assignment, max_iter=args.max_iter,
                reject_annotations={"auto": "auto", "on": True, "off": False}[args.reject_annotations],
                outline=args.outline)


def run_and_write(image, output, *, device, spacing, mask=None, source=None, probabilities_path=None, unit=None,
                  record=None, levels=None, **params):
    """Separate ``image`` and write labels, table, overlay, size histogram, then the summary (last: it marks
    completion).

    ``probabilities_path``: where to write the pixel classifier's probability map (with ``classifier=``);
    ``record``: entries added to the summary (the input's fingerprint and the options, :func:`run_file`);
    ``unit``: the spacing's unit where the input named it (OME-Zarr axes), kept in the outputs; ``levels``: an
    OME-Zarr input's offset and pyramid, which ``.zarr`` labels follow (:func:`gpu_pipeline.io.ngff_levels`).
    """
    from gpu_pipeline import separate
    from gpu_pipeline.chunked.workspace import run_lock
    from gpu_pipeline.io import (check_replaceable_outputs, output_paths, remove_stale_table, run_outputs, write_json,
                                 write_labels)
    from gpu_pipeline.measure import particle_table, summary, write_csv
    from gpu_pipeline.overlay import write_overlay
    from gpu_pipeline.pipeline import validate_spacing
    from gpu_pipeline.plots import write_size_histogram

    paths = output_paths(output)
    if paths["labels"].suffix.lower() not in (".tif", ".tiff", ".npy", ".zarr"):
        raise DeclumpError(f"unsupported output format {paths['labels'].suffix or '(no suffix)'}; "
                           "accepted: .tif, .tiff, .npy, .zarr")
    if probabilities_path is not None:
        check_probabilities_path(probabilities_path, chunked=False)
    check_replaceable_outputs(run_outputs(paths, probabilities_path))  # a folder at a companion's path too
    # One run per output at a time, in memory or chunked (the chunked run holds the same lock): an in-memory
    # run into a chunked run's output finished first and was then replaced, its table left beside the other's.
    with run_lock(paths["labels"]):
        unit = "px" if spacing is None else unit
        spacing = validate_spacing(spacing, image.ndim)
        labels, details = separate(image, spacing=spacing, mask=mask, device=device, return_details=True, **params)
        labels = to_host(labels)
        table = particle_table(labels, image, spacing)
        # The earlier run's outputs stay whole until this one has something to replace them with: a run refused
        # (a model file's typo, no particles) removed their summary and left them looking unfinished.
        remove_stale_table(paths)
        paths["summary"].unlink(missing_ok=True)
        from gpu_pipeline.io import atomic_path

        write_labels(paths["labels"], labels, spacing, source=source, unit=unit, levels=levels)
        with atomic_path(paths["table"]) as tmp:
            write_csv(table, tmp)
        write_overlay(paths["overlay"], image, labels)
        write_size_histogram(paths["histogram"], table["equivalent_diameter"], unit=unit)
        if probabilities_path is not None:
            from gpu_pipeline.io import write_probabilities

            from gpu_pipeline.classifier import load_classifier

            write_probabilities(probabilities_path, to_host(details.probabilities), spacing,
                                classes=load_classifier(params["classifier"]).classes)
            paths["probabilities"] = Path(probabilities_path)
        info = summary(table, image.ndim, spacing, details)
        parameters = {k: (str(getattr(v, "given_as", None) or v) if k == "classifier" and v is not None else v)
                      for k, v in params.items()}
        info.update(unit=unit, device=device, input_shape=list(image.shape),
                    outputs={k: str(v) for k, v in paths.items()}, parameters=parameters, **(record or {}))
        write_json(paths["summary"], info)
        return labels, info


def check_probabilities_path(path, *, chunked):
    suffix = Path(path).suffix.lower()
    accepted = (".zarr",) if chunked else (".tif", ".tiff", ".npy", ".zarr")
    if suffix not in accepted:
        raise DeclumpError(f"--save-probabilities {path}: unsupported format {suffix or '(no suffix)'}; accepted "
                           f"{'in chunked runs' if chunked else 'here'}: {', '.join(accepted)}")


def _is_zarr(path):
    path = Path(path)
    return path.suffix.lower() == ".zarr" or (path.is_dir() and any(
        (path / name).exists() for name in ("zarr.json", ".zarray", ".zgroup")))


def _int_at_least(what, low):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"{what} must be a whole number of at least {low}, got {text!r}")
        return value

    return parse


def _positive_int(what):
    return _int_at_least(what, 1)


def _positive_number(what):
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{what} must be a positive number, got {text!r}")
        return value

    return parse


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (the option, what was wrong, what is accepted) and a pointer to
    --help, instead of the whole usage block (18 lines for `declump run`) before it."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        return super().parse_args(_negative_values_attached(self, sys.argv[1:] if args is None else list(args)),
                                  namespace)


def _value_options(parser):
    """The option strings of ``parser`` and its subcommands that take one value."""
    found = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _value_options(sub)
        elif action.option_strings and action.nargs is None:
            found.update(action.option_strings)
    return found


def _negative_values_attached(parser, argv):
    """``--spacing -1,1`` as ``--spacing=-1,1``: argparse takes a value that starts with '-' and is not one
    plain number for an option, and said "expected one argument" instead of the option's own check ("must
    be positive"). Only after options that take a value, and only for values that start like a number."""
    options, out, i = _value_options(parser), [], 0
    while i < len(argv):
        token = argv[i]
        if token in options and i + 1 < len(argv) and re.match(r"-\.?\d", argv[i + 1]):
            out.append(f"{token}={argv[i + 1]}")
            i += 2
            continue
        out.append(token)
        i += 1
    return out


#: ``--scratch-limit`` units: powers of 1000 and of 1024.
BYTE_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
              "p": 1e15, "pb": 1e15, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "pib": 2**50}


def _byte_size(text):
    """A size in bytes from ``800G``, ``1.5TB``, ``2TiB`` or a plain number of bytes."""
    import re

    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = found.group(2).lower() if found else None
    if unit not in BYTE_UNITS or not float(found.group(1)) > 0:
        raise argparse.ArgumentTypeError(f"scratch limit must be a positive size such as 800G or 2T (k, M, G, T, P: "
                                         f"powers of 1000; KiB, MiB, GiB, TiB: of 1024; none: bytes), got {text!r}")
    return int(float(found.group(1)) * BYTE_UNITS[unit])


def _chunks(text):
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"chunks must be comma-separated integers, got {text!r}")
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"chunks must be positive, got {text!r}")
    return values


#: What a chunked run uses where the in-memory run would choose automatically: (argument, option, value).
CHUNKED_FIXED = (("sigma", "--sigma", 1.0), ("threshold", "--threshold", "otsu"), ("min_distance", "--min-distance", 4.0),
                 ("max_hole_size", "--max-hole-size", 0.0))
#: Those of :data:`CHUNKED_FIXED` that are lengths: in voxels of the volume's finest axis (``run_chunked``'s
#: ``voxel_defaults``), the physical length following the store's calibration.
VOXEL_LENGTHS = ("sigma", "min_distance")


def cmd_run_chunked(args, device):
    from gpu_pipeline.chunked.run import run_chunked

    if args.method != "kmeans":
        raise DeclumpError("chunked runs (Zarr in, .zarr out) support --method kmeans only; the watershed is the "
                           "in-memory comparison (write a .tif/.npy output to run it)")
    if args.threshold == "local":
        raise DeclumpError("chunked runs need --threshold otsu, li, triangle or a number: 'local' looks at the whole "
                           "image at once, which a chunked run does not hold")
    if args.reject_annotations == "on":
        raise DeclumpError("--reject-annotations is for 2D images in memory; chunked runs do not take it")
    if args.outline == "edge":
        raise DeclumpError("--outline edge is for images in memory; chunked runs keep the threshold's outlines "
                           "(leave --outline unset, or write a .tif/.npy output to run in memory)")
    if args.max_hole_size not in (0, "auto"):
        raise DeclumpError("--max-hole-size is not available in chunked runs (hole filling is not local); leave it "
                           "unset or 0")
    # The automatic choices measure the whole image at once; a chunked run takes the fixed values instead and
    # says so, so that the default command works on a volume of any size.
    given_note = classifier_note(args)  # (before the fixed values below fill the options in)
    fixed = [(name, option, value) for name, option, value in CHUNKED_FIXED if getattr(args, name) == "auto"]
    for name, _, value in fixed:
        setattr(args, name, value)
    if args.classifier is not None:  # the model's probabilities make the foreground: no threshold to fix
        fixed = [f for f in fixed if f[0] not in dict(THRESHOLD_OPTIONS)]
    if args.min_size == "auto":
        args.min_size = None
        fixed.append(("min_size", "--min-size", "a ball of diameter --min-distance"))
    # Lengths in voxels of the volume's finest axis, not in its physical unit: 1 and 4 of a store calibrated in
    # nanometres were a third of a pixel and 1.3 pixels (215 particles for 35).
    voxel_defaults = {name: value for name, _, value in fixed if name in VOXEL_LENGTHS}
    notes = [given_note] if given_note else []
    if fixed:  # (printed by the run once the input and parameters are checked: an error stays one line)
        notes.append("declump: chunked runs do not choose " + ", ".join(option for _, option, _ in fixed) +
                     " automatically (that needs the whole image at once); using " +
                     " ".join(f"{option} {value:g}{' voxels' if name in VOXEL_LENGTHS else ''}"
                              if not isinstance(value, str) else f"{option} {value}"
                              for name, option, value in fixed) + "; set them to choose others")
    # What a 2D image in memory gets by default and a chunked run does not (they look at the whole image).
    not_done = [what for what, applies in (
        ("remove no annotations (text, scale bars; --reject-annotations auto)",
         args.reject_annotations == "auto" and args.mask is None),
        ("keep outlines on the threshold's contour (--outline auto moves them to the steepest edge)",
         args.outline == "auto" and args.mask is None and args.classifier is None)) if applies]
    notes_2d = [f"declump: unlike a 2D image in memory, chunked runs {' and '.join(not_done)}; write a .tif/.npy "
                "output to run it in memory"] if not_done else []
    kwargs = separation_kwargs(args)
    for key in ("method", "max_hole_size", "reject_annotations", "outline"):
        kwargs.pop(key)
    if args.save_probabilities is not None:
        check_probabilities_path(args.save_probabilities, chunked=True)
        kwargs["probabilities_path"] = args.save_probabilities
    if args.classifier is not None:
        kwargs["classifier"] = args.classifier
    try:
        summary = run_chunked(args.input, args.output, chunks=args.chunks, channel=args.channel,
                              timepoint=args.timepoint, mask_path=args.mask, max_radius=args.max_radius,
                              device=device, cluster=args.cluster, scheduler=args.scheduler, workers=args.workers,
                              gpu_threads=args.gpu_threads, scratch=args.scratch, scratch_limit=args.scratch_limit,
                              overwrite=args.overwrite,
                              missing_chunks=args.missing_chunks, verbose=not args.quiet, notes=notes,
                              notes_2d=notes_2d, voxel_defaults=voxel_defaults, **kwargs)
    except MemoryError as exc:  # NumPy's, or CuPy's OutOfMemoryError (a MemoryError) on a GPU worker
        exc.chunked = True  # read by memory_error_message, as separate's exc.stage is
        raise
    print(f"{counted(summary['n_particles'], 'particle')}; labels -> {summary['outputs']['labels']}/particles, "
          f"table -> {summary['outputs']['table']}, summary -> {summary['outputs']['summary']}")


def engine_device(args):
    """The device of ``declump run`` and ``batch``: ``--cluster local-cuda`` is the GPU's engine, and refused
    beside ``--device cpu`` (it was taken as the GPU without a word), or where dask-cuda is not installed
    (said after the run's notes, so two lines)."""
    if args.cluster != "local-cuda":
        return resolve_device(args.device)
    if args.device == "cpu":
        raise DeclumpError("--cluster local-cuda starts one worker per GPU; with --device cpu use --cluster local "
                           "(or leave --device out)")
    import importlib.util

    from gpu_pipeline.chunked.run import DASK_CUDA_MISSING

    if importlib.util.find_spec("dask_cuda") is None:
        raise DeclumpError(DASK_CUDA_MISSING)
    return "gpu"


#: Options that make the thresholded foreground: with --classifier the model's probabilities make it instead.
THRESHOLD_OPTIONS = (("sigma", "--sigma"), ("threshold", "--threshold"), ("polarity", "--polarity"))


def classifier_note(args):
    """The note for threshold options given beside ``--classifier`` (they were ignored without a word: a user may
    take ``--threshold 0.9`` for the probability's cut-off), or None."""
    given = [option for name, option in THRESHOLD_OPTIONS if getattr(args, name, "auto") != "auto"]
    if args.classifier is None or not given:
        return None
    return (f"declump: note: {', '.join(given)} {'makes' if len(given) == 1 else 'make'} the thresholded foreground; "
            "with --classifier the model's probabilities make it (particle where above 0.5), so "
            f"{'it is' if len(given) == 1 else 'they are'} not used")


def cmd_run(args):
    device = engine_device(args)
    if _is_zarr(args.input) and Path(args.output).suffix.lower() == ".zarr":
        return cmd_run_chunked(args, device)
    chunked_only = [name for name, value in (("--chunks", args.chunks), ("--cluster", args.cluster),
                                             ("--scheduler", args.scheduler), ("--scratch", args.scratch),
                                             ("--scratch-limit", args.scratch_limit),
                                             ("--workers", args.workers),
                                             ("--gpu-threads", None if args.gpu_threads == 1 else args.gpu_threads))
                    if value is not None]
    if chunked_only:
        raise DeclumpError(f"{', '.join(chunked_only)} {'applies' if len(chunked_only) == 1 else 'apply'} to chunked "
                           "runs only (a Zarr input and a .zarr output)")
    info = run_file(args, args.input, args.output, device, notes=not args.quiet)
    print(f"{counted(info['n_particles'], 'particle')}; labels -> {info['outputs']['labels']}, table -> "
          f"{info['outputs']['table']}, overlay -> {info['outputs']['overlay']}, summary -> {info['outputs']['summary']}")


def run_file(args, input_path, output, device, *, notes=True):
    """The in-memory run of one file (``declump run``, and each image of ``declump batch``): read and check the
    input (and ``args.mask``), separate with ``args``' options, write the outputs; returns the summary.
    ``notes``: print the notes on the input (a TIFF's calibration, few planes) on stderr, after the run."""
    from gpu_pipeline.io import (boolean_input_as_mask, check_foreground_options, check_not_inputs, input_fingerprint,
                                 ngff_levels, output_paths, read_image, run_inputs, run_outputs, spatial_unit)

    check_foreground_options(mask=args.mask, classifier=args.classifier, probabilities_path=args.save_probabilities)
    check_not_inputs(run_outputs(output_paths(output), args.save_probabilities),
                     run_inputs(input_path, args.mask, args.classifier))
    image, file_spacing = read_image(input_path, channel=args.channel, timepoint=args.timepoint,
                                     missing_chunks=args.missing_chunks)
    mask = None
    if args.mask is not None:
        if not Path(args.mask).exists():
            raise DeclumpError(f"--mask {args.mask} does not exist; accepted: a mask or probability map file "
                               "(.tif, .png, .npy, .zarr) of the image's shape")
        mask, _ = read_image(args.mask, channel=args.channel, timepoint=args.timepoint,
                             missing_chunks=args.missing_chunks, colour="any")
        check_mask(mask, image.shape, "--mask")
    image, mask = boolean_input_as_mask(image, mask, classifier=args.classifier, input_path=input_path)
    if args.spacing is None and file_spacing is not None:
        from gpu_pipeline.pipeline import validate_file_spacing

        file_spacing = validate_file_spacing(file_spacing, image.ndim, input_path)
    spacing = args.spacing if args.spacing is not None else file_spacing
    unit = spatial_unit(input_path) if args.spacing is None and file_spacing is not None else None
    levels = ngff_levels(input_path) if args.spacing is None and file_spacing is not None else None
    said = [note for note in [classifier_note(args)] if note]  # printed once the run has succeeded: a refusal
    # stays one line on stderr
    if spacing is None and notes and Path(input_path).suffix.lower() in (".tif", ".tiff"):
        from gpu_pipeline.io import tiff_spacing

        calibrated, calibration_unit = tiff_spacing(input_path, imagej_only=True)
        if calibrated is not None and len(calibrated) == image.ndim:
            # Not taken silently: sizes given in voxels (--min-distance 4) would change meaning.
            said.append(f"declump: note: {input_path}'s calibration is {', '.join(f'{v:g}' for v in calibrated)} "
                        f"{calibration_unit} per voxel; this run measures in voxels (spacing 1); add --spacing "
                        f"{','.join(f'{v:g}' for v in calibrated)} to measure in {calibration_unit}")
    if notes:
        from gpu_pipeline.io import images_left_out

        said.extend(note for note in [images_left_out(input_path)] if note)
    if image.ndim == 3 and image.shape[0] <= FEW_PLANES and min(image.shape[1:]) >= 16 * FEW_PLANES and notes:
        said.append(f"declump: note: {input_path} has only {image.shape[0]} planes of {image.shape[1]} x "
                    f"{image.shape[2]}; it runs as a volume. If the planes are channels or time points, pick one "
                    "(--channel/--timepoint where the file names its axes, else save one plane)")
    kwargs = separation_kwargs(args)
    kwargs.pop("spacing")
    if args.classifier is not None:
        from gpu_pipeline.classifier import load_classifier, spacing_note

        model = load_classifier(args.classifier)  # once: the run takes it loaded (a batch's every image)
        model.check_image(image.shape, "the image")
        model.given_as = args.classifier  # what the summary records: the path or name given
        kwargs["classifier"] = model
        said.extend(note for note in [spacing_note(model, spacing if spacing is not None else (1.0,) * image.ndim,
                                                   unit)] if note)
    if getattr(args, "max_radius", None) is not None:  # (ignored in memory before: the chunked run's cap, the same)
        kwargs["max_radius"] = args.max_radius
    # NGFF's image-label source names the Zarr image the labels belong to: a TIFF or NPY input is none (a viewer
    # looked for a Zarr image there and warned).
    source = (os.path.relpath(Path(input_path).resolve(), (Path(output) / "particles").resolve())
              if _is_zarr(input_path) else None)
    _, info = run_and_write(image, output, device=device, spacing=spacing, mask=mask, source=source, unit=unit,
                            levels=levels,
                            probabilities_path=args.save_probabilities,
                            record={"input": input_fingerprint(input_path), "options": run_options(args, device)},
                            **kwargs)
    for note in () if getattr(args, "quiet", False) else said:
        print(note, file=sys.stderr)
    return info


def run_options(args, device):
    """Every option of an in-memory run that its outputs depend on, as JSON values (the summary records them;
    ``declump batch`` skips an image whose outputs were made from the same input with the same options)."""
    from gpu_pipeline.io import input_fingerprint

    # A mask or model file by its fingerprint: retrained or replaced under the same name, it makes other outputs.
    files = {key: input_fingerprint(value) if value is not None and Path(str(value)).is_file() else value
             for key, value in (("mask", args.mask), ("classifier", args.classifier))}
    options = dict(separation_kwargs(args), channel=args.channel, timepoint=args.timepoint, **files, device=device)
    return json.loads(json.dumps(options, default=str))


def cmd_batch(args):
    from gpu_pipeline.batch import SUMMARY_NAME, run_batch
    from gpu_pipeline.io import IMAGE_SUFFIXES

    device = engine_device(args)
    summary = run_batch(args, device)
    for record in summary["images"]:
        if record["status"] != "ok":
            # (the input's name once: many messages name it already)
            error = record["error"] if record["input"] in record["error"] else f"{record['input']}: {record['error']}"
            print(f"declump: error: {error}", file=sys.stderr)
    if summary["left_out"]:
        kinds = collections.Counter(Path(p).suffix.lower() or "(no suffix)" for p in summary["left_out"])
        by_kind = ", ".join(f"{suffix}: {count}" for suffix, count in sorted(kinds.items()))
        n = len(summary["left_out"])
        print(f"declump: note: {n} file{'s' if n > 1 else ''} of the folders {'are' if n > 1 else 'is'} not an image "
              f"declump reads and {'were' if n > 1 else 'was'} left out ({by_kind}; accepted: "
              f"{', '.join(IMAGE_SUFFIXES)}); batch_summary.json lists them", file=sys.stderr)
    skipped = sum(1 for record in summary["images"] if record.get("skipped"))
    if skipped:
        print(f"declump: note: {skipped} of {summary['n_images']} images were done before (their outputs, from the "
              "same files and options, are kept); --overwrite runs them again", file=sys.stderr)
    print(f"{summary['n_ok']} of {summary['n_images']} images, {counted(summary['n_particles'], 'particle')}; table -> "
          f"{summary['table']}, summary -> {Path(args.out) / SUMMARY_NAME}")
    if summary["n_failed"]:
        raise DeclumpError(f"{summary['n_failed']} of {summary['n_images']} images failed (each named above); the "
                           f"others' outputs and the combined table are in {args.out}")


def check_mask(mask, shape, option):
    """A mask read from a file, checked with the CLI option's name in the message."""
    if tuple(mask.shape) != tuple(shape):
        raise DeclumpError(f"{option} has shape {tuple(mask.shape)} but the input image has shape {tuple(shape)}; "
                           f"{option} must have the image's shape")
    if np.dtype(mask.dtype).kind not in "buif":
        raise DeclumpError(f"{option} has dtype {mask.dtype}; accepted: bool, 0/1 integers or a probability map "
                           "in [0, 1] (foreground where > 0.5)")


def cmd_train(args):
    """declump train: a pixel classifier from scribbles or instance ground truth, written as .npz."""
    from gpu_pipeline._common import as_label_image
    from gpu_pipeline.classifier import classes_from_instances, train_classifier
    from gpu_pipeline.io import check_folders, read_image

    out = Path(args.out)
    if out.suffix.lower() != ".npz":
        raise DeclumpError(f"--out {out}: a model file is written as .npz")
    check_folders(out, "--out")  # before the training, not after it
    if args.boundary_width is not None and not args.from_instances:
        raise DeclumpError("--boundary-width applies to --from-instances (scribbles paint the boundary class as 3); "
                           "add --from-instances or leave it out")
    if len(args.images) != len(args.labels):
        raise DeclumpError(f"{len(args.images)} images but {len(args.labels)} --labels files; give one --labels "
                           "file per image, in the same order")
    images, labels, spacings = [], [], []
    for image_path, label_path in zip(args.images, args.labels):
        image, spacing = read_image(image_path, channel=args.channel, timepoint=args.timepoint)
        label, _ = read_image(label_path)
        if tuple(label.shape) != tuple(image.shape):
            raise DeclumpError(f"--labels {label_path} has shape {tuple(label.shape)} but its image {image_path} has "
                               f"shape {tuple(image.shape)}; each --labels file must match its image")
        if image.size and float(image.min()) == float(image.max()):  # (said as training, not as a threshold)
            raise DeclumpError(f"{image_path} is constant (every value is {float(image.min()):g}); a pixel classifier "
                               "learns from the image's contrast: train on images with contrast")
        if args.from_instances:
            # Read as `declump evaluate` reads ground truth: whole-number floats and a bool mask are label images.
            label = as_label_image(label, f"--labels {label_path}")
            if not bool(label.any()):
                raise DeclumpError(f"--labels {label_path} holds no particle (every id is 0); --from-instances "
                                   "takes instance ground truth with particles (0 background, one id per particle)")
            label = classes_from_instances(label, boundary_width=2 if args.boundary_width is None
                                           else args.boundary_width)
        images.append(image)
        labels.append(label)
        spacings.append(spacing)
    spacing = args.spacing if args.spacing is not None else spacings  # per image, from the files (else 1)
    model = train_classifier(images, labels, spacing=spacing, n_estimators=args.trees, max_depth=args.max_depth,
                             samples_per_class=args.samples_per_class, seed=args.seed, option="--labels",
                             names=[str(p) for p in args.labels])
    model.save(out)
    counts = ", ".join(f"{k} {v}" for k, v in model.header["training"]["samples_per_class"].items())
    print(f"trained a {model.ndim}D pixel classifier ({', '.join(model.classes)}; {model.forest.n_trees} trees, "
          f"{model.n_features} features) on {len(images)} image(s), pixels per class: {counts}; model -> {out}")


def cmd_demo(args):
    from gpu_pipeline.io import check_folders, write_json
    from gpu_pipeline.metrics import evaluate
    from gpu_pipeline.synthetic import demo_sample
    import tifffile

    if args.spacing is not None:
        raise DeclumpError("declump demo generates its sample with its own voxel size (1,1 in 2D, 2,1,1 with --3d); "
                           "--spacing is for declump run (nothing was written)")
    device = resolve_device(args.device)
    out = Path(args.out)
    check_folders(out, "--out", folder_itself=True, advice="give a folder for the demo's outputs")
    out.mkdir(parents=True, exist_ok=True)
    image, truth, spacing = demo_sample(three_d=args.three_d, seed=args.seed)
    # The voxel size in ImageJ's metadata (as the app and `declump run`'s note read it): a 3D sample saved without
    # it ran at 1,1,1 when given to `declump run` or the app (F1@0.5 0.646 against the demo's 0.979).
    calibration = {"unit": "pixel", **({"spacing": float(spacing[0])} if image.ndim == 3 else {})}
    tifffile.imwrite(out / "sample.tif", image, imagej=True, resolution=(1 / spacing[-1], 1 / spacing[-2]),
                     metadata={"axes": "ZYX"[-image.ndim:], **calibration})
    tifffile.imwrite(out / "sample_truth.tif", truth, compression="zlib", photometric="minisblack")
    kwargs = separation_kwargs(args)
    kwargs.pop("spacing")
    labels, info = run_and_write(image, out / "sample_labels.tif", device=device, spacing=spacing, **kwargs)
    scores = evaluate(labels, truth)
    write_json(out / "sample_scores.json", scores)
    print(f"demo: {counted(info['n_particles'], 'particle')} found, {scores['n_gt']} in the ground truth; "
          f"F1@0.5 {scores['f1_50']:.3f}, mean F1 {scores['mean_f1']:.3f}, DSB AP@0.5 {scores['ap_50']:.3f}; "
          f"outputs in {out}/ (overlay: {info['outputs']['overlay']})")
    if any(v != 1 for v in spacing):
        print(f"demo: the sample's voxel size is {','.join(f'{v:g}' for v in spacing)}; to run it again: declump run "
              f"{shlex.quote(str(out / 'sample.tif'))} OUTPUT --spacing {','.join(f'{v:g}' for v in spacing)}")


def cmd_evaluate(args):
    from gpu_pipeline.io import read_image
    from gpu_pipeline.metrics import evaluate

    if Path(args.prediction).is_dir() and not _is_zarr(args.prediction):
        return evaluate_folders(args)
    if Path(args.ground_truth).is_dir() and not _is_zarr(args.ground_truth):
        raise DeclumpError(f"{args.prediction} is a file, so the ground truth must be one too; {args.ground_truth} is "
                           "a folder (two folders are scored image by image)")
    pred, _ = read_image(args.prediction)
    truth, _ = read_image(args.ground_truth)
    scores = evaluate(pred, truth)  # checks both as label images (as_label_image), as the Python API does
    if args.json:
        print(json.dumps(scores, indent=2))
        return
    print(f"objects: predicted {scores['n_pred']}, ground truth {scores['n_gt']}")
    print("IoU   precision recall  F1     AP(DSB)")
    for t, p, r, f, a in zip(scores["iou_thresholds"], scores["precision"], scores["recall"], scores["f1"],
                             scores["ap"]):
        print(f"{t:.2f}  {p:.3f}     {r:.3f}   {f:.3f}  {a:.3f}")
    print(f"mean F1 {scores['mean_f1']:.3f}, mean AP {scores['mean_ap']:.3f}, foreground Dice {scores['dice']:.3f}, "
          f"splits {scores['splits']}, merges {scores['merges']}")


def evaluate_folders(args):
    """``declump evaluate PRED_DIR GT_DIR``: each ground-truth image against the prediction of its name (``NAME.*``
    or ``declump batch``'s ``NAME_labels.*``), a line each, then the scores pooled over every object. An image
    without a prediction counts as nothing found (an image ``declump batch`` reported as failed)."""
    from gpu_pipeline.batch import IMAGE_SUFFIXES, SUMMARY_NAME, output_name
    from gpu_pipeline.io import read_image
    from gpu_pipeline.metrics import evaluate

    if not Path(args.ground_truth).is_dir():
        raise DeclumpError(f"{args.prediction} is a folder, so the ground truth must be one too (images matched by "
                           f"name); {args.ground_truth} is not")
    truths = sorted(p for p in Path(args.ground_truth).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                    and not p.name.startswith("."))
    if not truths:
        raise DeclumpError(f"{args.ground_truth} holds no label images; accepted: {', '.join(IMAGE_SUFFIXES)} files")
    def unique(paths, what):
        """``paths`` by name; two files of one name (``a.tif`` and ``a.png``) are refused: which one is meant?"""
        named = {}
        for p in paths:
            if output_name(p) in named:
                raise DeclumpError(f"{what} {named[output_name(p)]} and {p} have the same name; keep one of them in "
                                   "the folder (images are matched by name)")
            named[output_name(p)] = p
        return named

    truths = unique(truths, "the ground truth")
    plain = unique((p for p in sorted(Path(args.prediction).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES
                    and not p.name.startswith(".")), "the predictions")
    # A batch's NAME_labels.* wins over a NAME.* of the same folder.
    predictions = {**{n: p for n, p in plain.items() if not n.endswith("_labels")},
                   **{n[:-len("_labels")]: p for n, p in plain.items() if n.endswith("_labels")}}
    # An image the folder's last batch reported as failed counts as nothing found: its outputs there are an
    # earlier batch's (other options), and were scored beside the new ones without a word.
    failed = []
    try:
        records = json.loads((Path(args.prediction) / SUMMARY_NAME).read_text())["images"]
        failed = sorted({r["name"] for r in records if r.get("status") != "ok"} & set(predictions))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    for name in failed:
        del predictions[name]
    matched = {}  # the ground truth's names as matched: NAME_labels.* is NAME where no prediction has its name
    for name, truth_path in truths.items():
        if name not in predictions and name.endswith("_labels"):
            name = name[:-len("_labels")]
        if name in matched:  # NAME.* and NAME_labels.* would score one prediction twice
            raise DeclumpError(f"the ground truth {matched[name]} and {truth_path} are both matched with the "
                               f"prediction of {name}; keep one of them in the folder (images are matched by name)")
        matched[name] = truth_path
    rows, missing = [], []
    found = weight = 0.0
    for name, truth_path in matched.items():
        truth, _ = read_image(truth_path)
        if name in predictions:
            pred, _ = read_image(predictions[name])
        else:
            pred = np.zeros(truth.shape, np.int32)
            missing.append(name)
        try:
            scores = evaluate(pred, truth)
        except DeclumpError as exc:  # (its messages say prediction and ground truth, not which files)
            raise DeclumpError(f"{predictions.get(name)} against {truth_path}: {exc}") from exc
        rows.append(dict(image=name, prediction=str(predictions.get(name)), n_pred=scores["n_pred"],
                         n_gt=scores["n_gt"], f1_50=scores["f1_50"], mean_f1=scores["mean_f1"], dice=scores["dice"],
                         splits=scores["splits"], merges=scores["merges"]))
        found += scores["f1_50"] * (scores["n_pred"] + scores["n_gt"])
        weight += scores["n_pred"] + scores["n_gt"]
    pooled = dict(images=len(rows), without_prediction=missing, failed_in_batch=failed, f1_50_pooled=found / weight if weight else 1.0,
                  mean_f1_per_image=float(np.mean([r["mean_f1"] for r in rows])),
                  n_pred=int(sum(r["n_pred"] for r in rows)), n_gt=int(sum(r["n_gt"] for r in rows)))
    if args.json:
        print(json.dumps({"pooled": pooled, "images": rows}, indent=2))
        return
    print("image                      predicted  truth  F1@0.5  mean F1  splits  merges")
    for r in rows:
        print(f"{r['image'][:26]:<26} {r['n_pred']:>9} {r['n_gt']:>6}  {r['f1_50']:.3f}   {r['mean_f1']:.3f}"
              f"  {r['splits']:>6}  {r['merges']:>6}")
    print(f"{len(rows)} images: objects predicted {pooled['n_pred']}, ground truth {pooled['n_gt']}; F1@0.5 pooled "
          f"over all objects {pooled['f1_50_pooled']:.4f}; mean F1 per image {pooled['mean_f1_per_image']:.4f}")
    if failed:
        print(f"declump: note: {len(failed)} images failed in the last batch into {args.prediction} "
              f"({SUMMARY_NAME}); the outputs of theirs there are an earlier run's and are not scored: "
              f"{', '.join(failed[:5])}{' ...' if len(failed) > 5 else ''}", file=sys.stderr)
    missing = [name for name in missing if name not in failed]
    if missing:
        print(f"declump: note: {len(missing)} images have no prediction in {args.prediction} and count as nothing "
              f"found: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}", file=sys.stderr)


#: What to change when an in-memory stage runs out of memory, by stage (see `_StageClock`).
MEMORY_ADVICE = {
    "necks": "add --neck-ratio off (the neck search between peaks), or ",
    "kmeans": "use a larger --min-distance (fewer peaks), or ",
}


def memory_error_message(exc):
    """One line for a MemoryError: the in-memory stage that ran out (when `separate` named it) and what to change;
    for a chunked run (``exc.chunked``), what sets its memory."""
    stage = getattr(exc, "stage", None)
    detail = str(exc).splitlines()[0] if str(exc) else "no detail"
    if getattr(exc, "chunked", False):
        return (f"out of memory in a chunked run ({detail}); each thread or worker holds one block of --chunks with "
                "its halo at a time: give smaller --chunks, fewer --workers (--gpu-threads on a GPU), or a machine "
                "with more memory (the output is not marked complete; add --overwrite when --chunks changes)")
    where = f" in the '{stage}' stage" if stage else ""
    return (f"out of memory{where} ({detail}); {MEMORY_ADVICE.get(stage, '')}run it chunked (a Zarr input and a "
            ".zarr output: memory follows --chunks), or use a smaller image or a machine with more memory")


def cmd_app(args):
    from gpu_pipeline.app import require_app_dependencies, serve

    require_app_dependencies()
    if args.image is not None and not Path(args.image).exists():
        raise DeclumpError(f"image {args.image} does not exist; accepted: .tif/.tiff, .png, .npy, .zarr files")
    if not 0 < args.port < 65536:
        raise DeclumpError(f"--port must be in 1-65535, got {args.port}")
    if args.max_voxels < 1:
        raise DeclumpError(f"--max-voxels must be positive, got {args.max_voxels}")
    serve(args.image, host=args.host, port=args.port, max_voxels=args.max_voxels)


def build_parser():
    parser = _Parser(prog="declump", description="Split touching particles in 2D images and 3D "
                                     "volumes into separate objects (GPU with CuPy, or CPU).")
    parser.add_argument("--version", action="version", version=f"declump {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="separate particles in an image file or a chunked Zarr volume",
                         description="In memory: write OUTPUT (labels: .tif/.npy/.zarr), OUTPUT_particles.csv "
                                     "(per-particle table), OUTPUT_overlay.png, OUTPUT_histogram.png (sizes) and OUTPUT_summary.json "
                                     "(written last). "
                                     "Chunked (a Zarr input and a .zarr OUTPUT): stream the volume chunk by chunk "
                                     "through Dask; OUTPUT becomes an OME-Zarr labels group (OUTPUT/particles), with "
                                     "OUTPUT_particles.parquet, OUTPUT_overlay.png, OUTPUT_histogram.png and OUTPUT_summary.json; the same "
                                     "command resumes an interrupted run.")
    run.add_argument("input", help="image: .tif/.tiff, .png, .npy, .zarr (array or OME-Zarr), 2D or 3D")
    run.add_argument("output", help="label image to write: .tif/.tiff, .npy or .zarr")
    run.add_argument("--mask", help="foreground mask (same shape; bool, or integers with the foreground > 0: 0/1, 0/255, "
                                    "a label image) or probability map in [0, 1] (foreground > 0.5), used instead of "
                                    "the threshold")
    add_axis_options(run)
    run.add_argument("--missing-chunks", choices=("error", "fill"), default="error",
                     help="a chunk file missing from a Zarr input or mask: 'error' (default) stops before any work, "
                          "naming it; 'fill' reads it as the array's fill value, for stores that are sparse on purpose")
    add_classifier_option(run)
    run.add_argument("--save-probabilities", default=None, metavar="PATH",
                     help="write the classifier's class probabilities (float32, classes first) to PATH: .tif, "
                          ".npy or .zarr in memory, .zarr in chunked runs")
    add_separation_options(run)
    chunked = run.add_argument_group("chunked runs (Zarr in, .zarr out)")
    chunked.add_argument("--chunks", type=_chunks, default=None,
                         help="processing chunk shape 'Z,Y,X' in voxels (default: the store's chunks, whole ones grouped "
                              "until each edge has 128 voxels, 256 in volumes of 2^33 voxels or more, 1024 in 2D); "
                              "each must be at least the halo (peak "
                              "window + --max-radius). With more than about 8 workers give 256,256,256: fewer, "
                              "larger tasks, so the scheduler keeps up (README, Performance)")
    chunked.add_argument("--max-radius", type=_positive_number("max radius"), default=None,
                         help="largest particle radius, physical units; sets the distance-transform halo "
                              "(default: 4 x --min-distance); deeper voxels are capped (see --neck-ratio for what "
                              "happens to such particles); in memory the same cap (default: none)")
    chunked.add_argument("--cluster", choices=("local", "local-cuda"), default=None,
                         help="local: a Dask LocalCluster of worker processes on this machine; local-cuda: a "
                              "dask-cuda LocalCUDACluster, one worker per GPU (default: local threads)")
    chunked.add_argument("--scheduler", default=None,
                         help="address of a running Dask scheduler (e.g. tcp://node1:8786) to run on")
    chunked.add_argument("--workers", type=_positive_int("workers"), default=None,
                         help="threads (default engine) or worker processes (--cluster local), one per core this process may use "
                              "by default (its CPU affinity: what SLURM or taskset grants)")
    chunked.add_argument("--gpu-threads", type=_positive_int("gpu threads"), default=1,
                         help="with --device gpu: host threads per GPU, each on its own chunk, so one chunk's Zarr "
                              "reads and writes and host steps overlap another's GPU work; each holds one chunk's "
                              "working set in GPU memory (default 1; not yet measured on a GPU, README GPU)")
    chunked.add_argument("--scratch", default=None,
                         help="folder for work in progress: the run keeps it in a folder of its own in SCRATCH "
                              "(declump-OUTPUTNAME-HASH.work), removed when the run completes; SCRATCH itself and "
                              "anything else in it are left alone (default OUTPUT.work, beside the output; must be "
                              "shared by all workers)")
    chunked.add_argument("--scratch-limit", type=_byte_size, default=None, metavar="SIZE",
                         help="the room the work folder's staged stores may take, e.g. 800G (a quota that the file "
                              "system's free space does not show); within it the smoothed volume is staged where it "
                              "fits, else smoothed again by each pass that reads it (same labels, slower), and a "
                              "classifier's probabilities that do not fit are refused (default: the file system's "
                              "free space). The rest of the folder, compressed, is not held to it (about 0.7 bytes "
                              "per voxel)")
    chunked.add_argument("--overwrite", action="store_true",
                         help="start over, deleting an existing output and its work folder")
    chunked.add_argument("--quiet", action="store_true", help="no notes and no progress lines on stderr (errors still are)")
    run.set_defaults(func=cmd_run)

    batch = sub.add_parser("batch", help="separate particles in many image files (a folder of TEM images), side by side",
                           description="Run every image (files, or the .tif/.tiff/.png/.npy/.zarr images of a "
                                       "folder) in memory as `declump run IMAGE OUT/NAME_labels.tif` would, each "
                                       "image one Dask task on local threads (default), a local cluster of "
                                       "processes or a running scheduler. OUT gets each image's outputs, "
                                       "particles.csv (every particle, with its image) and, last, "
                                       "batch_summary.json (every image with its status). An image that fails is "
                                       "one line naming it; the others go on, and the command exits 2. The same "
                                       "command again resumes: images done before with the same file and options "
                                       "are kept, not run again (--overwrite runs them).")
    batch.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders of them")
    batch.add_argument("--out", required=True, help="output folder (created if missing)")
    add_axis_options(batch)
    add_classifier_option(batch)
    add_separation_options(batch)
    engines = batch.add_argument_group("engine")
    engines.add_argument("--cluster", choices=("local", "local-cuda"), default=None,
                         help="local: a Dask LocalCluster of worker processes on this machine (images side by side "
                              "without sharing one process's GIL); local-cuda: one worker per GPU (default: local "
                              "threads)")
    engines.add_argument("--scheduler", default=None,
                         help="address of a running Dask scheduler; its workers must see the inputs and the output "
                              "folder at the same paths")
    engines.add_argument("--workers", type=_positive_int("workers"), default=None,
                         help="threads (default engine) or worker processes (--cluster local), one per core this "
                              "process may use by default")
    engines.add_argument("--gpu-threads", type=_positive_int("gpu threads"), default=1,
                         help="with --device gpu: host threads per GPU, each on its own image (default 1)")
    batch.add_argument("--overwrite", action="store_true",
                       help="run every image again; by default an image whose outputs in OUT were made from the same "
                            "file (path, size, modification time) with the same options is not run again, so the "
                            "same command resumes an interrupted batch")
    batch.add_argument("--quiet", action="store_true",
                       help="no line per image on stderr as it finishes (errors and the final lines still are)")
    batch.set_defaults(func=cmd_batch, mask=None, save_probabilities=None, missing_chunks="error")

    from gpu_pipeline.classifier import DEFAULT_DEPTH, DEFAULT_SAMPLES_PER_CLASS, DEFAULT_TREES

    train = sub.add_parser("train", help="train a pixel classifier from scribbles or instance ground truth",
                           description="Train a random-forest pixel classifier on multi-scale features. --labels "
                                       "are scribbles as painted (0 unlabelled, 1 background, 2 particle, 3 "
                                       "boundary between touching particles), one file per image; with "
                                       "--from-instances they are full instance ground truth (0 background, one "
                                       "id per particle) and the classes are derived, with pixels sampled "
                                       "balanced per class and per image.")
    train.add_argument("images", nargs="+", metavar="IMAGE", help="training images (.tif/.png/.npy/.zarr), 2D or 3D")
    train.add_argument("--labels", nargs="+", required=True, metavar="LABELS",
                       help="one labels image per IMAGE, same shape, same order")
    train.add_argument("--out", required=True, metavar="MODEL", help="model file to write (.npz)")
    train.add_argument("--from-instances", action="store_true",
                       help="--labels are instance ground truth, not scribbles")
    train.add_argument("--boundary-width", type=int, default=None,
                       help="with --from-instances: particle pixels within this many pixels of another particle "
                            "are the boundary class (default 2: the boundary-guided split needs the line on both "
                            "sides)")
    train.add_argument("--spacing", type=_spacing, default=None, help=PARAMETER_HELP["spacing"])
    train.add_argument("--trees", type=int, default=DEFAULT_TREES, help="trees in the forest (default %(default)s)")
    train.add_argument("--max-depth", type=int, default=DEFAULT_DEPTH, help="depth of each tree (default %(default)s)")
    train.add_argument("--samples-per-class", type=int, default=DEFAULT_SAMPLES_PER_CLASS,
                       help="labelled pixels drawn per class over all images (default %(default)s)")
    train.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    add_axis_options(train)
    train.set_defaults(func=cmd_train)

    demo = sub.add_parser("demo", help="generate touching particles with ground truth, separate and score them")
    demo.add_argument("--out", default="demo_output", help="output folder (default %(default)s)")
    demo.add_argument("--3d", dest="three_d", action="store_true", help="a 3D anisotropic volume instead of 2D")
    demo.add_argument("--seed", type=_int_at_least("seed", 0), default=0, help="random seed (default %(default)s)")
    add_separation_options(demo)
    demo.set_defaults(func=cmd_demo)

    app = sub.add_parser("app", help="start the web app: load, paint, train, separate, measure, download",
                         description="Start a local web app (Dash) and print its URL; needs the 'app' extra "
                                     "(pip install 'declump[app]').")
    app.add_argument("image", nargs="?", default=None,
                     help="image to open in every new browser session (.tif/.tiff, .png, .npy, .zarr; 2D or 3D)")
    app.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default %(default)s: this machine only)")
    app.add_argument("--port", type=int, default=8050, help="port (default %(default)s)")
    app.add_argument("--max-voxels", type=int, default=64 * 1024 * 1024,
                     help="largest image the app accepts, in voxels (default %(default)s); bigger ones: declump run")
    app.set_defaults(func=cmd_app)

    ev = sub.add_parser("evaluate", help="score predicted labels against ground-truth labels")
    ev.add_argument("prediction", help="predicted label image, or a folder of them (declump batch's output: each "
                                       "ground-truth image is matched with NAME_labels.* or NAME.*)")
    ev.add_argument("ground_truth", help="ground-truth label image, or a folder of them")
    ev.add_argument("--json", action="store_true", help="print all scores as JSON")
    ev.set_defaults(func=cmd_evaluate)
    return parser


#: A 3D input of at most this many planes, each much larger, is pointed out: channels or time points stored as
#: planes (a TIFF without axis metadata) would otherwise run silently as a thin volume.
FEW_PLANES = 4


#: The arguments that name files or folders, by their ``dest``: an empty one is refused (``""`` is the working
#: folder to Python's paths: ``run in.tif ""`` failed with a traceback, ``--out ""`` wrote into the working folder).
PATH_ARGUMENTS = {"input": "the input", "output": "the output", "mask": "--mask", "save_probabilities":
                  "--save-probabilities", "scratch": "--scratch", "inputs": "an input", "out": "--out",
                  "images": "an image", "labels": "--labels", "classifier": "--classifier", "image": "the image",
                  "prediction": "the prediction", "ground_truth": "the ground truth"}


def _refuse_empty_paths(args):
    """One line for a path argument given as an empty string (see :data:`PATH_ARGUMENTS`)."""
    for name, what in PATH_ARGUMENTS.items():
        value = getattr(args, name, None)
        for one in value if isinstance(value, list) else [value]:
            if isinstance(one, str) and not one.strip():
                raise DeclumpError(f"{what} path is empty ({one!r}); give a file or folder name")


def _expand_home(args):
    """``~`` at the start of a path argument is the home folder, also where the shell did not expand it (quoted,
    or after ``--option=``), rather than a folder named ``~`` in the working directory."""
    for name, value in vars(args).items():
        if isinstance(value, str) and value.startswith("~"):
            setattr(args, name, os.path.expanduser(value))
        elif isinstance(value, list) and any(isinstance(v, str) and v.startswith("~") for v in value):
            setattr(args, name, [os.path.expanduser(v) if isinstance(v, str) else v for v in value])


#: What a RuntimeError or ImportError says where memory ran out: a thread's stack or a shared library could not
#: be mapped.
OUT_OF_MEMORY_SIGNS = ("can't start new thread", "failed to map segment", "Cannot allocate memory")


def _report(message):
    """The one line of a failed command, on stderr. Then asyncio's own complaints are silenced: a Zarr read
    that failed in one task left the others' reads pending in Zarr's event loop, and at exit asyncio logged
    "Task was destroyed but it is pending!" for each (8 lines after the error, 2026-12-05)."""
    import logging

    print(f"declump: error: {message}", file=sys.stderr)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)


def main(argv=None):
    from gpu_pipeline.chunked.workspace import no_hugepage_advice, skip_exit_collection

    parser = build_parser()
    args = parser.parse_args(argv)
    _expand_home(args)
    no_hugepage_advice()  # every command: large temporaries without the kernel's compaction on each fault
    skip_exit_collection()
    try:
        _refuse_empty_paths(args)
        args.func(args)
    except DeclumpError as exc:
        if args.debug:
            raise
        _report(exc)
        return 2
    except KeyboardInterrupt:
        print("declump: interrupted; no output was marked complete", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Whoever read the standard output stopped (`| head`): no traceback, as for other commands of a
        # pipeline. Later writes to it (Python's own flush at exit) go nowhere; the run stopped where it
        # printed, before its summary where it had not written that yet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:
        from gpu_pipeline.io import write_fault

        message = None if args.debug else write_fault(exc, getattr(args, "output", None) or getattr(args, "out", None)
                                                      or ".", args.command)
        if message is None:
            raise
        _report(message)
        return 2
    except MemoryError as exc:
        if args.debug:
            raise
        _report(memory_error_message(exc))
        return 3
    except (RuntimeError, ImportError) as exc:
        # Out of memory as a limit on the address space (ulimit -v, a batch system's h_vmem) shows it: a thread
        # that cannot start (Zarr's I/O, Dask's pool) or a library that cannot be mapped (a lazy import), each
        # a traceback and exit 1 before.
        text = str(exc)
        if not args.debug and text.startswith("Symlink loop from "):  # (pathlib's resolve(), Python 3.11-3.12)
            _report(f"{text[len('Symlink loop from '):]} runs through symbolic links that point at each other (a "
                    "symlink loop); give a path without the loop (nothing was marked complete)")
            return 2
        if args.debug or not any(sign in text for sign in OUT_OF_MEMORY_SIGNS):
            raise
        _report(f"out of memory ({text.splitlines()[0]}): the process reached its memory limit (ulimit -v, a "
                "batch system's memory request); give it more memory, or use smaller --chunks or fewer --workers "
                "(nothing was marked complete)")
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
