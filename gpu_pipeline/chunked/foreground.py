"""The first half of the pipeline on a chunked volume: smoothing, threshold, polarity, cleanup, regions.

Equal to the in-memory stages for any chunking: smoothing runs with a halo
of the Gaussian's radius (each separable pass only reads that far), the
threshold and polarity are global reductions, and objects are removed by
their global size from the chunked connected components.
"""
from __future__ import annotations

import functools
import math
import sys

import numpy as np

from gpu_pipeline._backend import GAUSSIAN_TRUNCATE, DeclumpError, get_array_module, ops_for
from gpu_pipeline._common import ChunkShapeError, UnusableValuesError
from gpu_pipeline.chunked.components import components_chunked
from gpu_pipeline.chunked.histogram import block_range, histogram_chunked
from gpu_pipeline.chunked.source import (map_haloed, neighbours_hold_halo, shells_key, stored_volume,
                                        write_shells)
from gpu_pipeline.stages.cleanup import voxels_for
from gpu_pipeline.stages.threshold import (HISTOGRAM_METHODS, beyond_noise_thresholds, border_fraction,
                                           choose_polarity, face_voxels, foreground, histogram_thresholds,
                                           polarity_from, share_of_largest)

#: The workspace's halos (:meth:`~gpu_pipeline.chunked.workspace.Workspace.halos`) that the tasks staging the
#: regions write and the peak pass reads (``regions_chunked``'s ``halo``, ``peaks_chunked``).
PEAK_HALOS = "peaks"


def gaussian_radius(sigma_voxels):
    """Filter radius per axis in voxels, as scipy.ndimage computes it."""
    return tuple(int(GAUSSIAN_TRUNCATE * float(s) + 0.5) for s in sigma_voxels)


def fit_halo(volume, halo, what):
    """``volume`` with chunks no smaller than ``halo``: a short last chunk joins its neighbour.

    A chunk shape itself smaller than the halo is refused (one line).
    """
    chunks = []
    for axis, h in enumerate(halo):
        sizes = list(volume.chunks[axis])
        if h and len(sizes) > 1 and max(sizes) < h:
            raise ChunkShapeError(f"chunks of {max(sizes)} voxels along axis {axis} are smaller than the {what} halo "
                               f"{tuple(halo)}; use chunks of at least the halo per axis")
        merged = []
        for size in sizes:
            if merged and size < h:
                merged[-1] += size
            else:
                merged.append(size)
        chunks.append(tuple(merged))
    chunks = tuple(chunks)
    return volume if chunks == volume.chunks else volume.rechunk(chunks)


def smooth_chunked(volume, sigma_voxels, spill=None):
    """Gaussian smoothing of a Dask array, equal to the in-memory ``ops.gaussian``.

    A volume read from a store by :func:`~gpu_pipeline.chunked.source.open_volume`
    is smoothed in two tasks per chunk, each chunk read from the store and
    its halo handed over by its neighbours
    (:func:`~gpu_pipeline.chunked.source.map_haloed`); any other Dask array
    through ``map_overlap`` (its halos cut from the neighbouring blocks by
    Dask: about 60 small tasks per 3D chunk). ``spill``: the folder where
    the halos go between tasks (see ``map_haloed``).
    """
    halo = gaussian_radius(sigma_voxels)
    fitted = fit_halo(volume, halo, "smoothing")

    def smooth(block):
        return ops_for(block).gaussian(block, sigma_voxels)

    stored = stored_volume(volume)
    if stored is None:
        return fitted.map_overlap(smooth, depth=halo, boundary="nearest", dtype=np.float32)
    return map_haloed(stored, fitted.chunks, halo, smooth, dtype=np.float32, name="smooth", spill=spill,
                      meta=get_array_module(volume._meta).empty((0,) * volume.ndim, dtype=np.float32))


#: The values of :func:`side_components_chunked`: voxels at or below the threshold, and above it.
BELOW, ABOVE = 1, 2


def side_components_chunked(above, *, workspace=None, name=None, device=None, border_value=None):
    """The face-connected pieces of both sides of a threshold in one :func:`components_chunked` pass: the
    components of equal value of ``above + 1`` (:data:`BELOW`, :data:`ABOVE`; ``border_value``: one of
    them, counted on the outer faces too)."""
    return components_chunked(above.astype(np.uint8) + 1, by_value=True, workspace=workspace, name=name,
                              device=device, border_value=border_value)


def polarity_statistics(sides):
    """:func:`~gpu_pipeline.stages.threshold.choose_polarity`'s fractions from the pass that labelled both
    sides (:func:`side_components_chunked` with ``border_value=ABOVE``): the voxels above the threshold
    (the sizes of the pieces above it), and the outermost voxels above it (per face, for
    :func:`~gpu_pipeline.stages.threshold.border_fraction`); the same numbers, not two more passes over the
    volume."""
    shape = tuple(int(n) for n in sides.local.shape)
    above = int(sides.size[1:][sides.value[1:] == ABOVE].sum())
    return above / math.prod(shape), border_fraction(sides.border_counts, face_voxels(shape))


def largest_component_shares_chunked(above, sides=None):
    """:func:`gpu_pipeline.stages.threshold.largest_component_shares` of a chunked boolean Dask array, from
    ``sides`` (:func:`side_components_chunked` of ``above``, computed when not given): the per-component
    sizes are summed over blocks already."""
    found = sides if sides is not None else side_components_chunked(above)
    return (share_of_largest(found.size[1:][found.value[1:] == ABOVE]),
            share_of_largest(found.size[1:][found.value[1:] == BELOW]))


#: The order of the two thresholds beyond the noise in the workspace's saved decision.
SIDES = ("bright", "dark")


def beyond_noise_warning(otsu, beyond, polarity) -> str:
    """The chunked run's one-line warning where Otsu's threshold (``otsu``) lies within the noise of a one-mode
    histogram: the thresholds beyond the noise (``beyond``, :func:`~gpu_pipeline.stages.threshold.\
beyond_noise_thresholds`) to rerun with."""
    options = " or ".join(f"--threshold {value:.6g}" + ("" if polarity == side else f" --polarity {side}")
                          for side, value in beyond.items())
    return (f"declump: warning: Otsu's threshold {otsu:.6g} lies within the background's noise (the histogram is "
            "one mode with few voxels beyond it): with a few particles in a large volume it splits the noise into "
            f"specks; rerun with {options} (Otsu's threshold of the voxels beyond the noise, which the in-memory "
            "--threshold auto takes where it finds a particle there)")


def _check_wide_values(volume):
    """For a volume of a dtype wider than float32 that smoothed to one value: the in-memory run's one line
    where its own values differ but float32 holds them as one (a pass over the volume, on that failure only)."""
    import dask

    from gpu_pipeline.pipeline import check_float32_range, wider_than_float32

    if wider_than_float32(volume.dtype):
        low, high = dask.compute(volume.min(), volume.max())
        try:
            check_float32_range(float(low), float(high), "the volume")
        except DeclumpError as exc:  # no threshold will ever separate them: as the constant volume's error
            raise UnusableValuesError(str(exc)) from None


def _mask_block(block, edges, block_id=None):
    from gpu_pipeline.chunked.workspace import block_origin
    from gpu_pipeline.pipeline import mask_foreground

    origin = block_origin(edges, block_id) if block_id is not None else None
    return mask_foreground(block, "" if origin is None else f" in its chunk at {origin}")


#: The smoothed volume is staged where the work folder's file system has this many times its size free: the
#: rest of the work folder took 10-15 % more at its peak (2026-12-06, 256x512x512 in 128^3 chunks: 284 MiB for a
#: 256 MiB smoothed volume, ``bench.throughput``'s scratch figure).
SMOOTHED_ROOM = 1.15


def _room_for_smoothed(workspace, smoothing):
    """Is there room in the work folder to stage the smoothed volume (:data:`SMOOTHED_ROOM`)? Where there is not,
    a verbose workspace says at once, on stderr, that each pass reading it smooths its chunks again (the same
    values: the same labels)."""
    room = workspace.room_needed("smoothed", smoothing.shape, smoothing.dtype)
    if room is None or room[0] * SMOOTHED_ROOM <= room[1]:
        return True
    from gpu_pipeline.chunked.workspace import _bytes_text

    line = (f"declump: note: the work folder needs {_bytes_text(room[0] * SMOOTHED_ROOM)} at its peak to stage the "
            f"smoothed volume and {workspace.room_text(room[1])}: each "
            "pass that reads it (range, histogram, threshold) smooths its chunks again instead (slower; the same "
            "labels). Give --scratch a file system with room to stage it")
    if workspace.verbose:
        print(line, file=sys.stderr)
    return False


def regions_chunked(volume, *, spacing, sigma=1.0, threshold="otsu", polarity="auto", min_size=0.0, mask=None,
                    workspace=None, device=None, halo=None, notes=None):
    """Connected regions of the cleaned foreground of a chunked volume.

    Returns ``(regions, n_regions, threshold, polarity)``: ``regions`` is a lazy
    Dask array equal to ``ops.label(clean_mask(...))`` of the in-memory
    pipeline (hole filling is not available in chunked runs). ``mask``: a
    chunked foreground mask or probability map used instead of the
    threshold (``volume`` may then be None). ``workspace``: a
    :class:`~gpu_pipeline.chunked.workspace.Workspace` where the foreground
    and the regions are staged (smoothing then runs once per chunk) and the
    global results saved. ``halo`` (with a workspace folder): the tasks
    staging the regions also write each block's slabs of foreground that
    its neighbours' peak tasks read as their halo of this depth (the
    workspace's halos :data:`PEAK_HALOS`, see :func:`~gpu_pipeline.chunked.source.write_shells`).
    ``notes``: a list to which a warning is appended where Otsu's threshold splits the background's noise
    (:func:`beyond_noise_warning`).
    """
    from gpu_pipeline.chunked.workspace import Workspace, grid_edges

    workspace = workspace or Workspace(None)
    source = volume if mask is None else mask
    if isinstance(sigma, str):
        raise DeclumpError(f"chunked runs need sigma as a number (physical units), got {sigma!r}")
    if isinstance(threshold, str) and threshold not in HISTOGRAM_METHODS:
        raise DeclumpError(f"chunked runs take threshold {', '.join(HISTOGRAM_METHODS)} or a number, got "
                           f"{threshold!r} ('auto' and 'local' look at the whole image at once)")
    staged = {}
    if mask is not None:
        # Each block's values checked as it is read (NaN, negative values, floats above 1 refused as in memory);
        # a mask is read by several passes, and the check costs less than a pass of its own.
        fg = mask if np.dtype(mask.dtype).kind == "b" else mask.map_blocks(
            functools.partial(_mask_block, edges=grid_edges(mask.chunks)), dtype=bool)
        value, side = None, None
        chunks = fg.chunks

        def foreground_mask():
            return fg
    else:
        # The input dtype goes into the overlap (ops.gaussian converts each block to float32): the halo
        # slices Dask holds between neighbouring tasks are then 4x smaller for uint8 data.
        smoothing = smooth_chunked(volume, tuple(float(sigma) / s for s in spacing),
                                   spill=workspace.halos("smoothed")) if sigma and sigma > 0 else volume
        chunks = smoothing.chunks

        def smoothed():
            # Staged on first use: the threshold's passes (histogram, polarity) and the foreground then read it
            # instead of smoothing every chunk four times; the staging pass also measures its range for the
            # histogram's bins. Never staged once the regions are; nor where the work folder lacks the room.
            if "smoothed" not in staged:
                if smoothing is not volume and not _room_for_smoothed(workspace, smoothing):
                    # A part staged by an earlier run: its space back. The halos' folder serves every pass that
                    # smooths (removed with the sides, below).
                    workspace.discard("smoothed", halos=False)
                    staged["smoothed"], staged["range"] = smoothing, None
                    return smoothing
                staged["smoothed"], ranges = workspace.stage(
                    "smoothed", lambda: smoothing, chunks=chunks, shape=smoothing.shape, dtype=smoothing.dtype,
                    device=device, measure=block_range) if smoothing is not volume else (volume, None)
                staged["range"] = None if ranges is None else (np.min([r[0] for r in ranges]),  # NaN stays NaN
                                                               np.max([r[1] for r in ranges]))
                workspace.discard_halos("smoothed")
            return staged["smoothed"]

        def decide():
            import dask

            # As in-memory threshold_foreground: a named method's polarity is decided at Otsu's threshold.
            beyond = {}
            if isinstance(threshold, str):
                image = smoothed()  # sets staged["range"] when this call staged it
                try:
                    counts, bins = histogram_chunked(image, staged["range"])
                except UnusableValuesError:
                    _check_wide_values(volume)  # constant in float32, or in the input's own values too?
                    raise
                candidates = histogram_thresholds(counts, bins)
                value, at = candidates[threshold], candidates["otsu"]
                if threshold == "otsu":  # the in-memory `auto` would take one of these (see there)
                    beyond = beyond_noise_thresholds(counts, bins, at, polarity)
            else:
                value = at = float(threshold)
            # (bright, dark): saved in the workspace as numbers, NaN where there is none
            beyond = np.array([beyond.get(side, np.nan) for side in SIDES], dtype=np.float64)

            if polarity == "auto" and value == at:
                # Both sides labelled first, in one pass that also counts the voxels above the threshold and
                # those on the border: the polarity's statistics with no passes of their own, and the
                # foreground's components (one of the two sides) staged for the regions.
                found = side_components_chunked(smoothed() > at, workspace=workspace, name="sides", device=device,
                                                border_value=ABOVE)
                staged["sides"] = found
                return {"threshold": value, "beyond_noise": beyond, "polarity": polarity_from(
                    *polarity_statistics(found), lambda: largest_component_shares_chunked(None, found))}
            # A given polarity; or, at another threshold (Li's, the triangle's), the statistics at Otsu's in
            # passes of their own (both sides labelled in one, unstaged: the foreground is not one of them).
            return {"threshold": value, "beyond_noise": beyond, "polarity": choose_polarity(smoothed(), at, polarity,
                                                                    largest_shares=largest_component_shares_chunked,
                                                                    evaluate=dask.compute)}

        decided = workspace.remember("threshold", decide)
        value, side = float(decided["threshold"]), str(decided["polarity"])
        beyond = {side: float(v) for side, v in zip(SIDES, decided.get("beyond_noise", ())) if np.isfinite(v)}
        if beyond and notes is not None:
            notes.append(beyond_noise_warning(value, beyond, polarity))

        def foreground_mask():
            return foreground(smoothed(), value, side)
    min_voxels = voxels_for(min_size, spacing)
    cache = {}

    def labelled():  # computed at most once, and only when something below needs it
        if not cache:
            if "sides" in staged:  # the polarity's pass labelled the foreground already (as one of two values)
                cache["value"] = staged["sides"].of_value(ABOVE if side == "bright" else BELOW)
            else:
                cache["value"] = components_chunked(foreground_mask(), workspace=workspace, name="components",
                                                    device=device)
        return cache["value"]

    def renumbering():
        found = labelled()
        keep = found.size >= min_voxels if min_voxels > 1 else np.ones(found.n + 1, dtype=bool)
        keep[0] = False
        return {"rank": np.where(keep, np.cumsum(keep), 0).astype(np.int32), "n_components": found.n}

    saved = workspace.remember("regions", renumbering)
    rank = saved["rank"]

    def build():
        found = labelled()
        if found.n != int(saved["n_components"]):
            raise DeclumpError("internal: the foreground changed between passes")
        return found.through(rank, np.int32)

    # Haloed: the distance-transform pass reads each block with its halo, whose slabs the staging tasks write
    # (the blocks are then not read twice, and that pass has no tasks handing slabs on).
    shells = None
    if halo is not None and workspace.root is not None and neighbours_hold_halo(chunks, halo):
        shells = functools.partial(write_shells, chunks=chunks, depth=tuple(halo), foreground=True,
                                   folder=workspace.halos(PEAK_HALOS))
    regions = workspace.stage("regions", build, chunks=chunks, shape=source.shape, dtype=np.int32, device=device,
                              haloed=True, measure=shells)
    if shells is not None:
        regions, written = regions
        if written is not None:  # this call staged the regions (and wrote every block's slabs)
            workspace.halos_written(PEAK_HALOS, shells_key(chunks, halo))
    workspace.discard("smoothed", "components", "sides")  # scratch space: only the regions are read from here on
    return regions, int(rank.max()) if rank.size else 0, value, side
