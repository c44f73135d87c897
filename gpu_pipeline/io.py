"""Reading images (TIFF, PNG, NPY, Zarr/OME-Zarr) and writing results atomically.

Every output is written under a temporary name in its destination folder
and renamed into place only when complete, so an interrupted or failed run
never leaves a file that looks finished.
"""
from __future__ import annotations

import asyncio
import errno
import functools
import itertools
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from gpu_pipeline._backend import DeclumpError
from gpu_pipeline._common import UnreadableChunkError, native_byte_order, whole_number_at_least

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".npy", ".zarr")
LABEL_SUFFIXES = (".tif", ".tiff", ".npy", ".zarr")


#: The most bytes one ``write`` call hands the kernel (:func:`write_in_pieces`).
WRITE_PIECE = 1 << 18


def write_in_pieces(handle, data):
    """``handle.write(data)`` (an open binary file; ``data`` any contiguous buffer) in calls of at most
    :data:`WRITE_PIECE` bytes.

    One call with a large buffer lets Linux (6.x) put a file's page cache in
    2 MiB folios, order-9 allocations; on a virtual machine whose host takes
    back the guest's free memory (a ballooned guest, as the bench VM is) such
    blocks are likely to come back untouched, and the copy into them ran
    several times slower (the time all in the kernel's copy into the page
    cache, by ``perf``). Measured 2026-12-07 on the 2-core VM (ext4, kernel
    6.18), 32 files of 8 MiB: 0.35-0.65 s (all of it system time) in one
    call each or in 2 MiB calls, 0.064-0.085 s in calls of 256 KiB or 1 MiB;
    on tmpfs 0.10-0.13 s either way. A chunked run writes every staged
    float32 block (8 MiB at 128^3) this way. On a machine without the effect
    it costs a few system calls per MiB.
    """
    data = data.reshape(-1).view(np.uint8) if isinstance(data, np.ndarray) else memoryview(data).cast("B")
    for start in range(0, data.nbytes, WRITE_PIECE):
        handle.write(data[start:start + WRITE_PIECE])
    return data.nbytes


def save_npy(handle, array):
    """``np.save(handle, array)`` (the same bytes) with the data written by :func:`write_in_pieces`."""
    array = np.asanyarray(array)
    if array.dtype.hasobject:  # pickled by np.save
        np.save(handle, array)
        return
    if not (array.flags.c_contiguous or array.flags.f_contiguous):
        array = np.ascontiguousarray(array)  # (np.save writes such an array in C order too)
    header = np.lib.format.header_data_from_array_1_0(array)
    try:
        np.lib.format.write_array_header_1_0(handle, header)
    except ValueError:  # a header past 64 KiB (a structured dtype of many fields): np.save's version 2.0
        np.lib.format.write_array_header_2_0(handle, header)
    write_in_pieces(handle, array.T if header["fortran_order"] else array)


def _put_in_pieces(path, data):
    """Zarr's ``LocalStore`` write of one key (a temporary sibling, renamed into place), the bytes written by
    :func:`write_in_pieces`."""
    import uuid

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    try:
        with open(partial, "wb") as handle:
            write_in_pieces(handle, data)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


@functools.lru_cache(maxsize=None)
def _piecewise_store_class():
    from zarr.storage import LocalStore

    class PiecewiseLocalStore(LocalStore):
        """A ``LocalStore`` whose values larger than :data:`WRITE_PIECE` are written by
        :func:`write_in_pieces` (an uncompressed 128^3 float32 chunk is 8 MiB); reads,
        listing and the metadata are Zarr's own."""

        async def set(self, key, value):
            data = value.as_buffer_like()
            if memoryview(data).nbytes <= WRITE_PIECE:
                return await super().set(key, value)
            if not getattr(self, "_is_open", True):  # (Zarr opens a store as it opens the array)
                await self._open()
            await asyncio.to_thread(_put_in_pieces, self.root / key, data)

    return PiecewiseLocalStore


def piecewise_store(path):
    """A Zarr store at ``path`` (a folder) whose large values are written by :func:`write_in_pieces`."""
    return _piecewise_store_class()(str(path))


def _suffix(path: Path) -> str:
    return path.suffix.lower()


def output_paths(output, table=".csv"):
    """The label image path and its companions: the particle table (``table``: ``.csv`` in memory,
    ``.parquet`` chunked), summary JSON, overlay and size-histogram PNGs. They are named after ``output``
    without its suffix, nor an ``.ome`` before it (``cells.ome.zarr`` -> ``cells_particles.csv``)."""
    output = Path(output)
    stem = output.with_suffix("")
    stem = stem.with_suffix("") if stem.suffix.lower() == ".ome" else stem
    return {"labels": output, "table": Path(f"{stem}_particles{table}"), "summary": Path(f"{stem}_summary.json"),
            "overlay": Path(f"{stem}_overlay.png"), "histogram": Path(f"{stem}_histogram.png")}


def read_image(path, *, channel=None, timepoint=None, missing_chunks="fill", colour="grey"):
    """Read a 2D/3D image; returns ``(array, spacing or None)``.

    TIFF (tifffile, by its axes: ``channel``/``timepoint`` pick from ``c``/``t``
    axes, colour samples become grey, single pages of one shape are a stack),
    PNG (Pillow; colour and palette images become grey, alpha is dropped), NPY
    (axes of length 1 dropped, as in TIFF), and Zarr arrays or OME-Zarr
    multiscale groups (level 0, spacing from ``coordinateTransformations``;
    ``channel``/``timepoint`` pick from ``c``/``t`` axes). Big-endian data
    is read in native byte order. ``colour="any"`` (a mask): a colour pixel is
    its largest colour channel (a red-on-black mask is > 0 where it is red),
    not its luminance. Zarr chunk files that are missing read as the fill
    value (label images are sparse: Zarr skips all-zero chunks), or, with
    ``missing_chunks="error"`` (what ``declump run`` uses for its input),
    raise a `DeclumpError` naming the first one.
    """
    path = Path(path)
    if not path.exists():
        raise DeclumpError(f"input {path} does not exist; accepted inputs: {', '.join(IMAGE_SUFFIXES)} files")
    suffix = _suffix(path)
    spacing = None
    if suffix == ".npy" or (suffix == ".png" and timepoint is not None):
        _no_axis_for(channel, timepoint, path, f"a {suffix} file")
    try:
        if suffix in (".tif", ".tiff"):
            array = _read_tiff(path, channel, timepoint, colour)
        elif suffix == ".png":
            from PIL import Image

            with Image.open(path) as img:
                if img.mode in ("P", "PA"):  # palette indices: the colours they stand for
                    img = img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
                array = np.asarray(img)
            if channel is not None:  # a colour (red 0, green 1, blue 2) instead of the grey the eye sees
                if array.ndim != 3:
                    _no_axis_for(channel, None, path, "a grey .png")
                array = array[..., _pick(channel, array.shape[-1], "colour channels", "--channel", path)]
            elif array.ndim == 3:
                array = _grey(array, colour)
        elif suffix == ".npy":
            try:
                array = np.load(path, allow_pickle=False)
            except ValueError as exc:
                if "allow_pickle" not in str(exc):
                    raise
                with open(path, "rb") as handle:
                    if handle.read(6) != b"\x93NUMPY":  # NumPy takes any file without its header for a pickle
                        raise DeclumpError(f"could not read {path} as .npy: it is not a NumPy file (no .npy header); "
                                           f"accepted: whole, readable images ({', '.join(IMAGE_SUFFIXES)})") from None
                raise DeclumpError(f"{path} holds Python objects (a pickle), not a numeric array; accepted: .npy "
                                   "files of integer or floating-point values (declump never loads pickles)") from None
            if array.size and array.ndim > 2 and sum(n > 1 for n in array.shape) >= 2:
                array = array.reshape([n for n in array.shape if n > 1])  # one plane is a 2D image, as in a TIFF
        elif suffix == ".zarr" or (path / ".zattrs").exists() or (path / "zarr.json").exists():
            array, spacing = _read_zarr(path, channel=channel, timepoint=timepoint, missing_chunks=missing_chunks)
        elif path.is_dir():
            raise DeclumpError(f"{path} is a folder, not an image file or a Zarr store (it holds no .zattrs, .zarray "
                               f"or zarr.json); accepted: {', '.join(IMAGE_SUFFIXES)} (declump batch takes folders)")
        else:
            raise DeclumpError(f"unsupported input format {suffix or '(no suffix)'} for {path}; accepted: "
                               f"{', '.join(IMAGE_SUFFIXES)}")
    except DeclumpError:
        raise
    except Exception as exc:
        raise DeclumpError(f"could not read {path} as {suffix or 'an image'}: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}; accepted: whole, readable images "
                           f"({', '.join(IMAGE_SUFFIXES)})") from exc
    array = np.asarray(array)
    array = native_byte_order(array)
    if array.size == 0:
        raise DeclumpError(f"could not read {path}: it is empty or corrupt (array shape {array.shape}); "
                           "accepted: non-empty 2D or 3D images")
    if array.ndim < 2:
        raise DeclumpError(f"{path} is {array.ndim}D (shape {array.shape}); declump accepts 2D or 3D images")
    if array.ndim > 3:
        squeezed = np.squeeze(array)
        if squeezed.ndim <= 3:
            array = squeezed
        else:
            raise DeclumpError(f"{path} has shape {array.shape} ({array.ndim}D); declump accepts 2D or 3D images; "
                               "pick a channel/time point first (OME-Zarr and TIFF: --channel/--timepoint)")
    return array, spacing


def _grey(array, colour="grey"):
    """A colour image with its samples last (grey + alpha, RGB, RGBA) as one grey image, as the eye sees it.

    Alpha is dropped; RGB with equal channels is that channel (dtype kept); other RGB is its luminance
    (Rec. 709 weights, float32), as ``skimage.color.rgb2gray``, or with ``colour="any"`` its largest channel.
    """
    if array.shape[-1] not in (2, 3, 4):
        return array
    if array.shape[-1] == 2:
        return array[..., 0]
    rgb = array[..., :3]
    if (rgb == rgb[..., :1]).all():
        return rgb[..., 0]
    if colour == "any":
        return rgb.max(axis=-1)
    return (rgb @ np.array([0.2125, 0.7154, 0.0721])).astype(np.float32)


#: TIFF axes (tifffile's letters) that are planes of a volume: Z, an image sequence (I), unknown (Q).
TIFF_PLANE_AXES = "ZIQ"


def images_left_out(path):
    """A note where the file at ``path`` holds more images than :func:`read_image` reads: a TIFF of several
    series (images of other shapes or types, OME-TIFF positions; not the single pages of one shape that it
    stacks) or an animated PNG, whose first image alone is read. None otherwise."""
    suffix = Path(path).suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                series = tif.series
                first = series[0] if series else None
                if first is None or len(series) < 2 or (not tif.is_ome and all(
                        s.axes == "YX" and s.shape == first.shape and s.dtype == first.dtype for s in series)):
                    return None
                shapes = ", ".join(str(tuple(s.shape)) for s in series[:4]) + (", ..." if len(series) > 4 else "")
                count, what = len(series), f"images (TIFF series of shapes {shapes})"
        elif suffix == ".png":
            from PIL import Image

            with Image.open(path) as img:
                count = int(getattr(img, "n_frames", 1))
                if count < 2:
                    return None
                what = f"frames (an animated PNG of {img.height} x {img.width})"
        else:
            return None
    except Exception:  # (read_image has read it: a file it cannot list is no note's business)
        return None
    return (f"declump: note: {path} holds {count} {what}; this run read the first only. Save each image as its own "
            "file to separate it")


def _read_tiff(path, channel, timepoint, colour="grey"):
    """A TIFF's image as a 2D/3D array by its axes: ``C``/``T`` picked (``channel``/``timepoint``), colour to grey.

    A file of single pages of one shape each (written page by page: every page its own series to tifffile)
    is their stack, as ImageJ opens it; otherwise (and in OME-TIFF, whose images are positions) the first
    series (level 0 of a pyramid).
    """
    import logging

    import tifffile

    # tifffile logs and returns an empty array for a broken file; we report it ourselves.
    logging.getLogger("tifffile").setLevel(logging.CRITICAL)
    with tifffile.TiffFile(path) as tif:
        series = tif.series
        if not series:
            raise DeclumpError(f"could not read {path}: it holds no image; accepted: non-empty 2D or 3D images")
        first = series[0]
        # (not OME-TIFF: there several images are positions or wells, each its own image)
        pages = not tif.is_ome and len(series) > 1 and all(
            s.axes == "YX" and s.shape == first.shape and s.dtype == first.dtype for s in series)
        if pages:
            array, axes = np.stack([s.asarray() for s in series]), "I" + first.axes
        else:
            array, axes = first.asarray(), first.axes
        # Samples beyond grey or RGB that the file does not mark as alpha (ExtraSamples 0, unspecified: what
        # tifffile writes for a (rows, columns, 2) array): channels of their own, not a colour's parts.
        unspecified = "S" in axes and 0 in tuple(int(e) for e in (first.keyframe.extrasamples or ()))
    if unspecified and channel is None and "C" not in axes:
        raise DeclumpError(f"{path} has {array.shape[axes.index('S')]} samples per pixel, not marked as colour and "
                           "alpha (TIFF ExtraSamples: unspecified), so they are channels; pick one with --channel "
                           "(0 first)")
    if "S" in axes and channel is not None and "C" not in axes:  # --channel picks a colour (green: 1)
        axes = axes.replace("S", "C")
    if "S" in axes:  # colour samples (RGB, RGBA, planar or not): grey
        array = _grey(np.moveaxis(array, axes.index("S"), -1), colour)
        axes = axes.replace("S", "")
    present = {name for name in "CT" if name in axes}
    _no_axis_for(channel if "C" not in present else None, timepoint if "T" not in present else None, path,
                 f"axes {', '.join(axes.lower())}")
    for name, given, what, option in (("T", timepoint, "time points", "--timepoint"),
                                      ("C", channel, "channels", "--channel")):
        if name in axes:
            at = axes.index(name)
            array = np.take(array, _pick(given, array.shape[at], what, option, path), axis=at)
            axes = axes.replace(name, "")
    keep = [i for i, (name, size) in enumerate(zip(axes, array.shape)) if size > 1 or name in "YX"]
    array = array.reshape([array.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    if array.ndim > 3 or any(name not in TIFF_PLANE_AXES + "YX" for name in axes):
        # (Channel and time axes were picked above: --channel/--timepoint do not apply to what is left.)
        raise DeclumpError(f"{path} has axes {', '.join(axes.lower())} of sizes {array.shape}; declump accepts 2D "
                           "(y, x) or 3D (z, y, x) images, and the extra axes are not named channels or time points "
                           "(--channel/--timepoint pick from those); save the 2D or 3D part as its own file (e.g. "
                           "tifffile.imwrite(out, tifffile.imread(path)[0]))")
    return array


def open_zarr(path, *, channel=None, timepoint=None):
    """Open a Zarr array or OME-Zarr image without reading it.

    Returns ``(array, index, spacing)``: the zarr array (OME-Zarr: level 0),
    the index that picks the 2D/3D volume (``t``/``c`` resolved), and the
    spacing from the level's ``coordinateTransformations`` (None if absent).
    """
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:
        raise DeclumpError(f"{path} is not a Zarr store ({type(exc).__name__}); accepted: a Zarr v2/v3 array "
                           "or an OME-Zarr image group") from exc
    if isinstance(node, zarr.Array):
        _no_axis_for(channel, timepoint, path, "a plain Zarr array, no OME-Zarr axes")
        return node, (slice(None),) * node.ndim, None
    attrs = dict(node.attrs)
    if "labels" in attrs and "multiscales" not in attrs and attrs["labels"]:
        # An OME-Zarr labels container (e.g. declump's output): read its first label image.
        return open_zarr(Path(path) / attrs["labels"][0], channel=channel, timepoint=timepoint)
    multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    if not multiscales:
        raise DeclumpError(f"{path} is a Zarr group without OME-Zarr 'multiscales' metadata; pass an array path")
    try:
        ms = multiscales[0]
        dataset = ms["datasets"][0]
        axes = [a["name"] if isinstance(a, dict) else a for a in ms.get("axes", [])]
        array = node[dataset["path"]]
        spacing = None
        for transform in dataset.get("coordinateTransformations", []):
            if transform.get("type") == "scale":
                spacing = list(transform["scale"])
        for transform in ms.get("coordinateTransformations", []):  # NGFF: applied after the level's own
            if transform.get("type") == "scale":
                spacing = [a * b for a, b in zip(spacing or [1.0] * len(transform["scale"]), transform["scale"])]
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
        # (A dataset path naming no array is a KeyError of zarr's; a list where a mapping belongs, a TypeError.)
        raise DeclumpError(f"{path}'s OME-Zarr 'multiscales' metadata cannot be read ({type(exc).__name__}: "
                           f"{' '.join(str(exc).split())[:80]}); accepted: NGFF multiscales, a list whose first "
                           "entry names its levels' arrays in 'datasets' (each a 'path' and its "
                           "'coordinateTransformations')") from None
    if not axes:
        axes = list("tczyx"[-array.ndim:])
    unknown = [a for a in axes if a not in ("t", "c", "z", "y", "x")]
    if unknown or len(axes) != array.ndim or len(set(axes)) != len(axes):
        raise DeclumpError(f"{path} has axes {axes} for a {array.ndim}D array; declump understands t, c, z, y, x, "
                           "each at most once")
    _no_axis_for(channel if "c" not in axes else None, timepoint if "t" not in axes else None, path,
                 f"axes {', '.join(axes)}")
    index = []
    for name, size in zip(axes, array.shape):
        if name == "t":
            index.append(_pick(timepoint, size, "time points", "--timepoint", path))
        elif name == "c":
            index.append(_pick(channel, size, "channels", "--channel", path))
        elif name == "z" and size == 1:
            index.append(0)  # a 2D image stored 5D (t, c, z, y, x, as bioformats2raw writes it) is 2D
        else:
            index.append(slice(None))
    if spacing is not None:
        spacing = [s for s, a, i in zip(spacing, axes, index) if a in ("z", "y", "x") and isinstance(i, slice)]
    return array, tuple(index), spacing


def _zarr_node_and_attrs(path):
    """``(node, attributes)`` of a Zarr store at ``path`` (an array's attributes read as none), or None where
    it is not one or cannot be opened."""
    if not (_suffix(path) == ".zarr" or (path / ".zattrs").exists() or (path / "zarr.json").exists()):
        return None
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
        return node, ({} if isinstance(node, zarr.Array) else dict(node.attrs))
    except Exception:
        return None


def spatial_unit(path):
    """The unit of an OME-Zarr image's spatial axes (``"micrometer"``...), where all of them name the same one;
    else None (a plain Zarr array, no or mixed units, not Zarr at all)."""
    path = Path(path)
    opened = _zarr_node_and_attrs(path)
    if opened is None:
        return None
    try:
        attrs = opened[1]
        if "labels" in attrs and "multiscales" not in attrs and attrs["labels"]:
            return spatial_unit(path / attrs["labels"][0])
        multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales") or [{}]
        units = {a.get("unit") for a in multiscales[0].get("axes", []) if isinstance(a, dict)
                 and a.get("name") in ("z", "y", "x")}
    except Exception:
        return None
    unit = units.pop() if len(units) == 1 else None
    return unit if isinstance(unit, str) and unit else None  # (NGFF's units are names: "micrometer", ...)


def _spatial_transform(transforms, axes, ndim):
    """``(scale, translation)`` of the spatial axes from an NGFF ``coordinateTransformations`` list (scale,
    then translation; missing ones are 1 and 0)."""
    scale, shift = [1.0] * ndim, [0.0] * ndim
    for transform in transforms or []:
        if transform.get("type") == "scale":
            scale = [float(v) for v in transform["scale"]]
        elif transform.get("type") == "translation":
            shift = [float(v) for v in transform["translation"]]
    keep = [i for i, a in enumerate(axes) if a in ("z", "y", "x")]
    return [scale[i] for i in keep], [shift[i] for i in keep]


def ngff_levels(path):
    """Where an OME-Zarr image lies and its pyramid, for labels that sit on it in a viewer: ``{"translation":
    [...], "factors": [[1, 1, 1], [2, 2, 2], ...]}`` over the spatial axes (level 0's physical offset, the
    multiscales' own transforms applied after it, as NGFF composes them; each level's whole-number size step
    from level 0), or None for a plain array, no multiscales, or levels that are no whole-number steps of level 0
    (then labels get one level and no offset, as before)."""
    opened = _zarr_node_and_attrs(Path(path))
    if opened is None:
        return None
    try:
        node, attrs = opened
        multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
        if not multiscales:
            return None
        ms = multiscales[0]
        axes = [a["name"] if isinstance(a, dict) else a for a in ms.get("axes", [])]
        shape = node[ms["datasets"][0]["path"]].shape
        axes = axes or list("tczyx"[-len(shape):])  # NGFF before 0.4 named none: the last ones, as open_zarr reads them
        ndim = len(axes)
        axes = [a if not (a == "z" and n == 1) else "-" for a, n in zip(axes, shape)]  # (a 2D image's z of one)
        levels = [_spatial_transform(d.get("coordinateTransformations"), axes, ndim) for d in ms["datasets"]]
        outer_scale, outer_shift = _spatial_transform(ms.get("coordinateTransformations"), axes, ndim)
        base_scale, base_shift = levels[0]
        factors = []
        for scale, _ in levels:
            steps = [s / b for s, b in zip(scale, base_scale)]
            if any(abs(f - round(f)) > 1e-6 or round(f) < 1 for f in steps):
                return None
            factors.append([int(round(f)) for f in steps])
        translation = [o * t + u for o, t, u in zip(outer_scale, base_shift, outer_shift)]
    except Exception:
        return None
    return {"translation": translation, "factors": factors}


#: Zarr array config for every array declump writes: every chunk written, background-only ones too (Zarr
#: otherwise compares each chunk with the fill value and skips it), so a chunk missing from a finished store
#: always means a damaged one and declump's outputs pass its own ``missing_chunks="error"`` check.
EVERY_CHUNK = {"write_empty_chunks": True}

#: What ``missing_chunks`` accepts: refuse a store with missing chunk files, or read them as the fill value.
MISSING_CHUNKS = ("error", "fill")


def list_stored_files(array):
    """``{key: (size, mtime_ns)}`` of every file under a local Zarr array's folder: one walk, no chunk read.

    Keys are relative to the array (``c/0/1/2`` or ``0.1.2``, as the
    array's metadata encodes chunk keys). Stores that are not a local folder
    are listed through Zarr (sizes and times unknown: ``(-1, -1)``).
    """
    root = getattr(array.store, "root", None)
    if root is None:
        from zarr.core.sync import collect_aiterator

        prefix = f"{array.path}/" if array.path else ""
        keys = collect_aiterator(array.store.list_prefix(prefix))
        return {key[len(prefix):]: (-1, -1) for key in keys}
    folder = Path(root) / array.path
    files = {}
    for directory, _, names in os.walk(folder):
        for name in names:
            full = os.path.join(directory, name)
            stat = os.stat(full)
            files[Path(os.path.relpath(full, folder)).as_posix()] = (stat.st_size, stat.st_mtime_ns)
    return files


def missing_chunks_of(array, selection, files):
    """Grid indices of the stored chunks (shards, if sharded) that ``selection`` needs and ``files`` lacks."""
    grid = array.shards or array.chunks
    axes = []
    for item, size, step in zip(selection, array.shape, grid):
        axes.append(range(math.ceil(size / step)) if isinstance(item, slice) else [int(item) // step])
    encode = array.metadata.encode_chunk_key
    return [index for index in itertools.product(*axes) if encode(index) not in files]


def check_chunks(array, selection, path, files, missing_chunks):
    """Refuse (``missing_chunks="error"``) a Zarr array whose ``selection`` needs chunk files absent from ``files``."""
    if missing_chunks not in MISSING_CHUNKS:
        raise DeclumpError(f"missing_chunks must be one of {MISSING_CHUNKS}, got {missing_chunks!r}")
    missing = missing_chunks_of(array, selection, files) if missing_chunks == "error" else []
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        key = array.metadata.encode_chunk_key(missing[0])
        raise DeclumpError(f"chunk {missing[0]} of {path} is missing (no file {key}){more}; Zarr would read it as "
                           f"the fill value {array.fill_value}. Restore it if it was lost; if the store is sparse on "
                           "purpose (Zarr 3 skips chunks that are all fill value by default), pass --missing-chunks "
                           "fill")


def _read_zarr(path, *, channel=None, timepoint=None, missing_chunks="fill"):
    array, index, spacing = open_zarr(path, channel=channel, timepoint=timepoint)
    if missing_chunks != "fill":
        check_chunks(array, index, path, list_stored_files(array), missing_chunks)
    try:
        return array[index], spacing
    except MemoryError:
        raise
    except Exception as exc:  # a chunk that does not decode: find it (each chunk of the box read on its own)
        raise unreadable_chunk(array, index, exc, path, CORRUPT_CHUNK) from None


#: What :func:`unreadable_chunk` says of an input's chunk that does not decode, in memory and chunked.
CORRUPT_CHUNK = ("the store is corrupt there; accepted: a Zarr store whose chunks decode (write that chunk again, "
                 "or delete its file and add --missing-chunks fill to read it as the fill value)")


def unreadable_chunk(array, stored, exc, path, remedy):
    """The one-line `DeclumpError` for a box ``stored`` of the zarr ``array`` at ``path`` that failed to read with
    ``exc``: the chunk that fails (:func:`failing_chunk`), its error, then ``remedy``."""
    where, exc = failing_chunk(array, stored, exc)
    # An input's chunk (the remedy CORRUPT_CHUNK's: a staged store's says how to start over) is written again
    # or given permission: UnreadableChunkError, which removes a chunked run's work folder.
    error = UnreadableChunkError if remedy == CORRUPT_CHUNK else DeclumpError
    if isinstance(exc, PermissionError):  # readable once its permissions allow: not damaged
        remedy = "this process may not read it; give it read permission (or run as a user who may)"
    return error(f"{where} of {path} could not be read ({type(exc).__name__}: "
                 f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); {remedy}")


def failing_chunk(array, stored, exc):
    """Which stored chunk of the box ``stored`` (an index over all axes of the zarr ``array``: integers and
    slices, open ones too) fails to read: ``("chunk (i, j, ...)", its error)``, each chunk of the box read
    on its own; the box's range of chunks with ``exc`` if none fails alone."""
    bounds = [(s, s + 1) if not isinstance(s, slice) else s.indices(n)[:2] for s, n in zip(stored, array.shape)]
    low = [int(a // c) for (a, _), c in zip(bounds, array.chunks)]
    high = [int((b - 1) // c) for (_, b), c in zip(bounds, array.chunks)]
    for index in itertools.product(*[range(a, b + 1) for a, b in zip(low, high)]):
        try:
            array[tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, array.chunks))]
        except Exception as single:
            return f"chunk {index}", single
    return (f"chunk {tuple(low)}" if low == high else f"chunks {tuple(low)} to {tuple(high)}"), exc


def _pick(given, size, what, option, path):
    """The index along a ``c`` or ``t`` axis of ``size``: ``given`` (checked), or 0 where it is the only one."""
    if given is None:
        if size == 1:
            return 0
        raise DeclumpError(f"{path} has {size} {what}; pick one with {option}")
    if not (whole_number_at_least(given, 0) and given < size):
        raise DeclumpError(f"{option} {given} is out of range: {path} has {size} {what} (0 to {size - 1})")
    return int(given)


def _no_axis_for(channel, timepoint, path, what):
    """Refuse a --channel or --timepoint that an input without that axis would ignore."""
    for value, option, axis, also in ((channel, "--channel", "c", " or a colour image's channels"),
                                      (timepoint, "--timepoint", "t", "")):
        if value is not None:
            raise DeclumpError(f"{option} {value} was given but {path} has no '{axis}' axis ({what}); {option} "
                               f"picks from an OME-Zarr or TIFF image's '{axis}' axis{also}")


#: OSError numbers that mean the disk refused a write: one line and exit 2 (others keep their traceback).
DISK_FAULTS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}


#: OSError numbers that mean a path cannot name a file to write (a folder on it is a file, it is a folder, it is
#: too long): one line and exit 2, as DISK_FAULTS.
PATH_FAULTS = {errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP}


#: What to do about each of :data:`PATH_FAULTS`.
PATH_REMEDIES = {errno.ENAMETOOLONG: "shorten the path (at most 255 bytes a name)",
                 errno.ELOOP: "give a path without symbolic links that point at each other"}


def path_error(exc, fallback):
    """The one-line message for a path that cannot name a file (``exc``: the OSError). It may be an input's
    (a name too long), so it says "use", not "write"."""
    cause = exc.strerror or str(exc) or type(exc).__name__
    code = errno.errorcode.get(exc.errno, "")
    remedy = PATH_REMEDIES.get(exc.errno, "choose a path whose folders are folders, not files")
    return (f"cannot use {exc.filename or fallback}: {cause}{f' ({code})' if code else ''}; {remedy}; nothing was "
            "marked complete")


#: What running a command again after a write the disk refused does, by command (:func:`disk_error`).
RESUMES = {"run": " (a chunked run resumes)", "batch": " (the images already done are skipped)"}


def disk_error(exc, fallback, command="run"):
    """The one-line message for a write the disk refused (``exc``: the OSError; ``fallback``: a path to name;
    ``command``: the declump command that wrote, for what running it again does, :data:`RESUMES`)."""
    cause = exc.strerror or str(exc) or type(exc).__name__
    code = errno.errorcode.get(exc.errno, "")
    scratch = " or --scratch" if command == "run" else ""
    return (f"cannot write {exc.filename or fallback}: {cause}{f' ({code})' if code else ''}; nothing was marked "
            f"complete. Make room or make it writable (or choose another output{scratch} folder), then run the "
            f"same command again{RESUMES.get(command, '')}")


def write_fault(exc, fallback, command="run"):
    """The one-line message for an OSError a command raised where it is the disk's or the path's
    (:data:`DISK_FAULTS`, :data:`PATH_FAULTS`: :func:`disk_error`, :func:`path_error`; a file or folder that is
    not there, ``ENOENT``, read or written: removed during the run, or a folder that cannot hold files such as
    ``/proc``), else None (not a fault of a path)."""
    if exc.errno in DISK_FAULTS:
        return disk_error(exc, fallback, command)
    if exc.errno in PATH_FAULTS:
        return path_error(exc, fallback)
    if exc.errno == errno.ENOENT:
        return (f"cannot use {exc.filename or fallback}: {exc.strerror or 'No such file or directory'} (ENOENT): "
                "a file or folder on that path is missing, was removed during the run, or lies in a folder that "
                "cannot hold files (such as /proc); nothing was marked complete")
    return None


def _ome_spacing(tif):
    """``(spacing, unit)`` from an OME-TIFF's first image's PhysicalSize (z only for a 3D one), else None."""
    import re

    pixels = re.search(r"<Pixels\b[^>]*>", tif.ome_metadata or "")
    if pixels is None:
        return None
    found = dict(re.findall(r'(PhysicalSize[XYZ](?:Unit)?)="([^"]*)"', pixels.group(0)))
    if "PhysicalSizeX" not in found or "PhysicalSizeY" not in found:
        return None
    axes = "YX" if len(tif.series[0].shape) == 2 or "PhysicalSizeZ" not in found else "ZYX"
    spacing = [float(found[f"PhysicalSize{a}"]) for a in axes]
    units = {found.get(f"PhysicalSize{a}Unit", "\u00b5m") for a in axes}
    if len(units) != 1:
        return spacing, "(mixed units)"
    unit = units.pop()  # OME's unit symbols: "nm", "mm", "Å"...; micrometres written "um" as elsewhere
    return spacing, {"\u00b5m": "um", "µm": "um"}.get(unit, unit)


def tiff_spacing(path, *, imagej_only=False):
    """``(spacing, unit)`` from a TIFF's OME-XML physical sizes, ImageJ metadata or resolution tags, else
    ``(None, None)``.

    ``imagej_only``: only a calibration someone set (OME-XML's physical sizes, or ImageJ's metadata naming a
    unit); plain resolution tags, often a screen's or a printer's dots per inch, give ``(None, None)``.
    """
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if tif.is_ome:
                ome = _ome_spacing(tif)
                if ome is not None:
                    return ome
            page = tif.pages[0]
            ij = tif.imagej_metadata or {}
            if imagej_only and not ij.get("unit"):
                return None, None
            tags = page.tags
            if "XResolution" not in tags or "YResolution" not in tags:
                return None, None
            x_num, x_den = tags["XResolution"].value
            y_num, y_den = tags["YResolution"].value
            if not (x_num and y_num):
                return None, None
            spacing_yx = [y_den / y_num, x_den / x_num]
            unit = ij.get("unit")
            if unit is None:
                resolution_unit = getattr(tags.get("ResolutionUnit"), "value", 1)
                factor = {2: ("um", 25400.0), 3: ("um", 10000.0)}.get(int(resolution_unit))
                if factor is None:
                    return None, None
                unit, scale = factor
                spacing_yx = [s * scale for s in spacing_yx]
            unit = {"micron": "um", "\\u00B5m": "um", "µm": "um"}.get(unit, unit)
            depth = ij.get("spacing")
            series = tif.series[0]
            spacing = spacing_yx if len(series.shape) == 2 else [float(depth or 1.0)] + spacing_yx
            if all(s == 1.0 for s in spacing) and unit in ("", "pixel", None):  # (a plane spacing kept)
                return None, None
            return [float(s) for s in spacing], unit
    except Exception:
        return None, None


#: Root attributes of a probability map declump writes (in memory and chunked): what :func:`declump_wrote` knows.
PROBABILITIES_MARK = {"declump": {"probabilities": True}}


def declump_wrote(path):
    """Is the folder ``path`` a Zarr store that declump wrote? Its outputs carry ``declump`` in their root
    attributes; an in-memory labels container written before that mark is known by its ``labels:
    ["particles"]``."""
    import zarr

    try:
        attrs = dict(zarr.open(str(path), mode="r").attrs)
    except Exception:
        return False
    return "declump" in attrs or attrs.get("labels") == [LABEL_NAME]


def check_replaceable(path, what="output"):
    """Refuse, before any work, to replace a folder at ``path`` that declump did not write (a user's Zarr
    store given as an in-memory run's output was deleted and replaced by the labels). Files are replaced."""
    path = Path(path)
    if path.is_dir() and not declump_wrote(path):
        raise DeclumpError(f"{what} {path} is a folder that declump did not write; choose another "
                           f"{what if what.startswith('--') else 'output'} path (nothing was replaced)")


def check_folders(path, what="output", *, folder_itself=False, advice="choose another path"):
    """Refuse, before any work, a path whose nearest existing folder on it is not one: a file, or a symbolic
    link to nothing (a drive that is not mounted). Creating the folders below it raised FileExistsError (or
    NotADirectoryError) as a traceback, for some outputs only once the others were written.

    ``folder_itself``: ``path`` is a folder to create (``--out`` of ``batch`` and ``demo``, a work folder),
    checked as well; ``advice``: what to do instead, ending the message.
    """
    path = Path(path)
    name = what if what.startswith("--") else f"the {what}"
    start = f"cannot {'create' if folder_itself else 'write'} {name} {path}"
    # Nearest first; the first that exists (a link to nothing counts) decides.
    for folder in ([path] if folder_itself else []) + list(path.parents):
        if not os.path.lexists(folder):
            continue
        if folder.is_dir():
            return
        if folder.is_symlink() and not folder.exists():
            try:
                os.stat(folder)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise DeclumpError(f"{start}: {'it' if folder == path else f'its folder {folder}'} is a "
                                       "symbolic link loop (links that point at each other); "
                                       f"{advice} (nothing was written)") from None
            raise DeclumpError(f"{start}: {'it' if folder == path else f'its folder {folder}'} is a symbolic link "
                               f"to {os.readlink(folder)}, which does not exist (a drive not mounted?); create that "
                               f"folder or {advice} (nothing was written)")
        raise DeclumpError(f"{start}: {folder} is a file, not a folder; {advice} (nothing was written)")


def check_replaceable_outputs(outputs):
    """:func:`check_replaceable` and :func:`check_folders` for each path of ``outputs`` (:func:`run_outputs`;
    None entries skipped): before any work, a user's folder at any path a run writes, and a path no folder can
    be made on."""
    for what, path in outputs.items():
        if path is not None:
            check_folders(path, what)
            check_replaceable(path, what)


def _same_or_nested(a, b):
    """Do the paths ``a`` and ``b`` name the same file or folder (hard links included), or does one hold the
    other?"""
    try:
        a, b = Path(a).resolve(), Path(b).resolve()
    except (RuntimeError, OSError):  # a symlink loop (RuntimeError until Python 3.13): told by the checks after
        a, b = Path(os.path.abspath(a)), Path(os.path.abspath(b))
    if a == b or a in b.parents or b in a.parents:
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_not_inputs(outputs, inputs):
    """Refuse, before any work, a run whose outputs would replace its inputs.

    ``outputs``: what each path a run writes or removes is (``"labels"``,
    ``"overlay"``, ``"--save-probabilities"``, ``"work folder"``) -> the
    path; ``inputs``: ``"the input"``, ``"--mask"``, ``"--classifier"`` ->
    the path (None entries are skipped). A path is refused where it is an
    input, lies inside one (a Zarr store is a folder) or holds one: each
    would be replaced, deleted with ``--overwrite`` or, for a work folder,
    deleted at the end of the run.

    Two outputs at one path (or one inside the other) are refused too: a
    ``--save-probabilities`` path naming the labels would replace them.
    """
    named = [(what, path) for what, path in outputs.items() if path is not None]
    for i, (what, path) in enumerate(named):
        for other, there in named[:i]:
            if _same_or_nested(path, there):
                raise DeclumpError(f"the {what} {path} and the {other} {there} would be written at one place; "
                                   f"choose another {what if what.startswith('--') else 'output'} path (nothing "
                                   "was written)")
    for what, path in outputs.items():
        for source, given in inputs.items():
            if path is not None and given is not None and _same_or_nested(path, given):
                raise DeclumpError(f"the {what} {path} would replace {source} {given}; choose "
                                   f"{'another --scratch' if what == 'work folder' else 'another output path'} "
                                   "(nothing was written)")


def run_outputs(paths, probabilities=None, work=None):
    """What a run writes (for :func:`check_not_inputs`): the labels and their companions
    (``paths``, :func:`output_paths`), ``--save-probabilities`` and a chunked run's work
    folder."""
    names = {"labels": "output", "table": "particle table", "summary": "summary", "overlay": "overlay",
             "histogram": "size histogram"}
    return {**{names.get(key, key): path for key, path in paths.items()}, "--save-probabilities": probabilities,
            "work folder": work}


def run_inputs(input_path, mask=None, classifier=None):
    """What a run reads (for :func:`check_not_inputs`): the input, ``--mask`` and a
    ``--classifier`` model file (a shipped model's name is no path)."""
    model = classifier if classifier is not None and Path(str(classifier)).is_file() else None
    return {"the input": input_path, "--mask": mask, "--classifier": model}


def remove_stale_table(paths):
    """Remove an earlier run's particle table of the other kind (``.csv`` in memory, ``.parquet`` chunked)
    beside the same output, as that run's summary names it: left there, it sat beside the new labels (found
    by ``--overwrite`` runs of the other kind). Call before the summary is removed; ``paths``:
    :func:`output_paths` of the new run."""
    try:
        old = json.loads(Path(paths["summary"]).read_text())["outputs"]["table"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    new, old = Path(paths["table"]), Path(old)  # (the summary's path may be relative to another folder)
    if old.stem == new.stem and old.suffix != new.suffix and old.suffix in (".csv", ".parquet"):
        new.with_suffix(old.suffix).unlink(missing_ok=True)


@contextmanager
def atomic_path(path):
    """Yield a temporary sibling path; on success rename it to ``path`` (replacing it; a folder only if declump
    wrote it, :func:`check_replaceable`)."""
    path = Path(path)
    check_folders(path)
    check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)) / path.name
    try:
        yield tmp
        if path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        # A write that failed (a full disk, a file size limit) names no file: the error's message named the
        # run's labels, which were written whole, when the table or the overlay beside them was not.
        raise type(exc)(exc.errno, exc.strerror or str(exc), str(path)) from exc
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def check_foreground_options(*, mask, classifier, probabilities_path):
    """Refuse `--mask`/`--classifier`/`--save-probabilities` combinations that give no single foreground."""
    if classifier is not None and mask is not None:
        raise DeclumpError("--classifier and --mask both give the foreground; use one of them")
    if probabilities_path is not None and classifier is None:
        raise DeclumpError("--save-probabilities writes a pixel classifier's output; add --classifier MODEL")


def boolean_input_as_mask(image, mask, *, classifier, input_path, what="image"):
    """``(image, mask)``: a boolean input (a network's binary output) is the foreground mask itself.

    Works on NumPy and Dask arrays; it then takes no ``--mask`` or ``--classifier``.
    """
    if image.dtype != bool:
        return image, mask
    if classifier is not None or mask is not None:
        raise DeclumpError(f"the input {input_path} is a boolean mask; it is the foreground itself, so it takes "
                           f"no --mask or --classifier (give the intensity {what} instead)")
    return image.astype(np.uint8), image


def _write_tiff_or_npy(path, suffix, array, axes, spacing=None, extra=None):
    """Write ``array`` to ``path`` as a zlib TIFF or an NPY by ``suffix``; False for any other suffix.

    TIFF: ``axes`` (tifffile's letters, e.g. ``ZYX``) recorded, so a 3D image reads as planes, not channels;
    ``*.ome.tif``: OME-XML with them and ``spacing`` as the physical pixel sizes; ``extra``: more entries of a
    plain TIFF's JSON description (a probability map's class names).
    """
    if suffix in (".tif", ".tiff"):
        import tifffile

        metadata = {"axes": axes}
        ome = Path(path).name.lower().endswith((".ome.tif", ".ome.tiff"))
        if ome and spacing is not None:
            metadata.update({f"PhysicalSize{name}": float(s) for name, s in zip(axes[-len(spacing):], spacing)})
        if not ome and extra:
            metadata.update(extra)
        # minisblack: 3 or 4 planes (a class per plane, a volume of 3 planes) are planes, not an RGB(A) picture
        tifffile.imwrite(path, array, compression="zlib", metadata=metadata, ome=ome, photometric="minisblack")
    elif suffix == ".npy":
        with open(path, "wb") as handle:
            save_npy(handle, array)
    else:
        return False
    return True


def write_labels(path, labels, spacing=None, source=None, unit=None, levels=None):
    """Write a label image as TIFF (zlib), NPY or OME-Zarr labels, chosen by ``path``'s suffix.

    ``.zarr``: the layout of chunked runs, an NGFF 0.4 labels container with
    the image at ``path/particles`` (see :func:`write_ngff_label_metadata`);
    ``levels``: the input image's offset and pyramid (:func:`ngff_levels`).
    """
    path = Path(path)
    suffix = _suffix(path)
    if suffix not in LABEL_SUFFIXES:
        raise DeclumpError(f"unsupported output format {suffix or '(no suffix)'} for {path}; accepted: "
                           f"{', '.join(LABEL_SUFFIXES)}")
    labels = np.asarray(labels)
    with atomic_path(path) as tmp:
        if not _write_tiff_or_npy(tmp, suffix, labels, "ZYX"[-labels.ndim:], spacing):
            import zarr

            zarr.open_group(str(tmp), mode="w", zarr_format=2)
            out = zarr.create_array(piecewise_store(tmp / LABEL_NAME / "0"), shape=labels.shape,
                                    dtype=labels.dtype,
                                    chunks=tuple(min(s, 256) for s in labels.shape), zarr_format=2,
                                    config=EVERY_CHUNK)
            out[...] = labels
            if levels and len(levels["factors"]) > 1:
                write_label_levels(tmp, levels["factors"])
            write_ngff_label_metadata(tmp, spacing if spacing is not None else (1.0,) * labels.ndim, source,
                                      extra={"declump": {"complete": True}}, unit=unit, levels=levels)


def write_probabilities(path, probabilities, spacing=None, classes=None):
    """Write a pixel classifier's probability map (float32, classes first) as TIFF, NPY or Zarr, atomically;
    ``classes``: the model's class names, in the map's order (a Zarr attribute and a TIFF's description)."""
    path = Path(path)
    suffix = _suffix(path)
    probabilities = np.asarray(probabilities, dtype=np.float32)
    named = {"classes": list(classes)} if classes else {}
    with atomic_path(path) as tmp:
        if _write_tiff_or_npy(tmp, suffix, probabilities, "C" + "ZYX"[1 - probabilities.ndim:], spacing, named):
            pass
        elif suffix == ".zarr":
            import zarr

            out = zarr.create_array(piecewise_store(tmp), shape=probabilities.shape, dtype=np.float32,
                                    chunks=(1,) + tuple(min(s, 256) for s in probabilities.shape[1:]),
                                    config=EVERY_CHUNK)
            out[...] = probabilities
            out.attrs.update({**PROBABILITIES_MARK, **named})
            if spacing is not None:
                out.attrs["spacing"] = [float(s) for s in spacing]
        else:
            raise DeclumpError(f"unsupported probability-map format {suffix or '(no suffix)'} for {path}; "
                               "accepted: .tif, .tiff, .npy, .zarr")


#: Name of the label image inside a declump OME-Zarr output (``OUTPUT.zarr/particles``).
LABEL_NAME = "particles"


def write_label_levels(path, factors):
    """Write the pyramid of the labels at ``path/particles/0`` as ``particles/1``, ... (Zarr v2): level ``i``
    takes every ``factors[i]``-th voxel of level 0 along each axis (ids are not averaged: every voxel of a level
    is one of level 0's, at the place its scale and level 0's offset put it). Level 0's chunk shape, clipped.
    Through Dask, so a chunked run's engine writes the levels of a volume larger than memory block by block."""
    import dask.array as da
    import zarr

    base = zarr.open_array(str(Path(path) / LABEL_NAME / "0"), mode="r")
    source = da.from_zarr(base)
    for i, factor in enumerate(factors[1:], start=1):
        level = source[tuple(slice(None, None, int(f)) for f in factor)]
        chunks = tuple(min(c, n) for c, n in zip(base.chunks, level.shape))
        target = zarr.create_array(str(Path(path) / LABEL_NAME / str(i)), shape=level.shape, dtype=base.dtype,
                                   chunks=chunks, zarr_format=2, overwrite=True, config=EVERY_CHUNK)
        da.store(level.rechunk(chunks), target, lock=False)


def write_ngff_label_metadata(path, spacing, source=None, extra=None, unit=None, levels=None):
    """Make ``path`` (a Zarr v2 group holding ``particles/0``) an OME-Zarr (NGFF 0.4) labels container.

    Root: ``labels: ["particles"]``; ``particles``: ``multiscales`` (axes
    z/y/x; level 0 at ``spacing``, the levels ``particles/1``... at
    ``spacing`` times their ``levels["factors"]``, each moved by
    ``levels["translation"]``: :func:`ngff_levels` of the image, the
    pyramid :func:`write_label_levels` wrote) and ``image-label``
    (``source``: the relative path of the image it labels, if known);
    ``unit``: the spatial axes' unit (the input's, where it named one; not
    ``"px"``). Called last, once the pixels are written.
    """
    import zarr

    ndim = len(spacing)
    factors = levels["factors"] if levels else [[1] * ndim]
    shift = levels["translation"] if levels and any(levels["translation"]) else None
    label_group = zarr.open_group(str(Path(path) / LABEL_NAME), mode="a", zarr_format=2)
    # "px" (voxels: no spacing given or found) is no unit of NGFF's list; the scale of 1 says it.
    axes = [{"name": n, "type": "space", **({"unit": unit} if unit and unit != "px" else {})}
            for n in ("z", "y", "x")[-ndim:]]
    datasets = [{"path": str(i), "coordinateTransformations": [
        {"type": "scale", "scale": [float(s) * f for s, f in zip(spacing, factor)]},
        *([{"type": "translation", "translation": [float(t) for t in shift]}] if shift else [])]}
        for i, factor in enumerate(factors)]
    label_group.attrs.update({
        "multiscales": [{"version": "0.4", "name": LABEL_NAME, "axes": axes, "datasets": datasets}],
        "image-label": {"version": "0.4", **({"source": {"image": str(source)}} if source else {})}})
    zarr.open_group(str(path), mode="a", zarr_format=2).attrs.update({"labels": [LABEL_NAME], **(extra or {})})


def write_json(path, data):
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=2) + "\n")


def input_fingerprint(path):
    """What a summary records of its input file: its absolute path, size and modification time (None for a
    Zarr store, a folder whose chunks can change without it)."""
    path = Path(path)
    if path.is_dir():
        return None
    stat = path.stat()
    return {"path": str(path.resolve()), "bytes": stat.st_size, "modified_ns": stat.st_mtime_ns}
