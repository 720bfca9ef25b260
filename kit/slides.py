"""Whole-slide TIFFs read window by window, exactly, in every layout the competition uses.

A `Slide` reads any rectangle of a slide at full resolution through rasterio windows and then
block-averages it with `downscale`, so a tiled reader sees exactly what a whole-image reader
would: ``slide.read(rows, cols, s) == downscale(padded[rows, cols], s)`` where ``padded`` is the
slide surrounded by ``fill`` on every side. Only the window is decoded; 30k x 37k slides never
have to fit in memory.

Layouts (``Slide.layout``):

- ``"rgb"``: one page, 3 samples per pixel (rasterio ``count == 3``), tiled or striped.
- ``"planes"``: one colour plane per page; rasterio opens page 0 with ``count == 1`` and lists
  the pages as ``GTIFF_DIR:n:path`` subdatasets; the first three (same shape and dtype as page 0)
  are stacked as R, G, B.
- ``"grey"``: one band and no plane pages: replicated to RGB.
- ``"rgba"``: 4 samples: the alpha sample is dropped.

uint16 sources are mapped to uint8 by ``value >> 8`` (0..65535 onto 0..255, 256 values per
level). That rule depends on the pixel alone, so every window of a slide is mapped alike; a rule
based on the slide's maximum would need a pass over the whole slide first.

Example::

    with Slide("train/aaa6a05cc.tiff") as slide:
        tile = slide.read(slice(0, 1024), slice(-128, 896), scale=4)  # (256, 256, 3) uint8
        thumb = slide.thumbnail(32)
"""

from __future__ import annotations

import errno
import math
import operator
import os
import struct
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import rasterio
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window

LAYOUTS = ("rgb", "planes", "grey", "rgba")

# GDAL keeps decoded blocks in a process-wide cache of up to GDAL_CACHEMAX, 5% of RAM by default
# (over 1 GB on a 24 GB machine): a pass over a slide would fill it, memory that grows with the
# slide. Every open and read of a Slide runs inside rasterio.Env(GDAL_CACHEMAX=this): GDAL (>=
# 3.6) applies the new maximum at once, evicting down to it, and the caller's returns on exit.
# 64 MB holds a few rows of windows' blocks, so vertically overlapping windows reuse them.
GDAL_CACHE_BYTES = 64 * 2**20
# Threads GDAL decodes the blocks of one request with (it releases the GIL while decoding).
GDAL_THREADS = 2
# Pixels per chunk of a thumbnail computed from full-resolution reads (24 MB of RGB): requests
# of many blocks are what GDAL decodes in parallel (2048 x 2048 ones gain little).
_THUMB_CHUNK_PIXELS = 8 * 2**20


def downscale(image: np.ndarray, scale: int, fill: int = 0) -> np.ndarray:
    """Block-mean downscale by an integer factor (cv2.INTER_AREA semantics, exact integers).

    The image is padded at the bottom and right with ``fill`` to a multiple of ``scale``; each
    output pixel is the mean of one ``scale x scale`` block aligned to (0, 0), rounded to the
    nearest integer, ties up (as GDAL's average resampling and cv2 at scale 2 do; cv2 rounds
    ties to even at larger factors, so it can differ from this by 1 on exact ties).

    Args:
        image: uint8 (h, w) or (h, w, c).
        scale: integer >= 1; 1 returns ``image`` itself.
        fill: 0..255, the value of the padding.

    Returns:
        uint8 (ceil(h / scale), ceil(w / scale)[, c]).
    """
    scale = _check_scale(scale)
    fill = _check_fill(fill)
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(
            f"image must be a uint8 array of shape (h, w) or (h, w, c), got "
            f"{getattr(image, 'dtype', type(image))} {getattr(image, 'shape', '')}"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image must not be empty, got shape {image.shape}")
    if scale == 1:
        return image
    return _block_mean(image, scale, fill, axis=0)


def _block_mean(image: np.ndarray, scale: int, fill: int, axis: int) -> np.ndarray:
    """`downscale` of the rows at ``axis`` and the columns at ``axis + 1`` (scale >= 2)."""
    h, w = image.shape[axis : axis + 2]
    pad_h, pad_w = -h % scale, -w % scale
    if pad_h or pad_w:
        pad = [(0, 0)] * image.ndim
        pad[axis], pad[axis + 1] = (0, pad_h), (0, pad_w)
        image = np.pad(image, pad, constant_values=fill)
    lead = (slice(None),) * axis
    # Exact integer block sums (a float mean could round a tie either way), accumulated
    # row-phase by row-phase then column-phase by column-phase: vectorised and with temporaries
    # of only 1/scale of the image, where a box filter would need 4x the image in int32. On
    # planes (axis 1) the row phases are whole contiguous rows: about 3x faster than on (h, w, 3).
    area = scale * scale
    dtype = np.min_scalar_type(255 * area + area // 2)
    rows = image[(*lead, slice(0, None, scale))].astype(dtype)
    for i in range(1, scale):
        rows += image[(*lead, slice(i, None, scale))]
    sums = rows[(*lead, slice(None), slice(0, None, scale))].copy()
    for j in range(1, scale):
        sums += rows[(*lead, slice(None), slice(j, None, scale))]
    sums += area // 2
    sums //= area
    return sums.astype(np.uint8)


class Slide:
    """A whole-slide TIFF read by windows; a context manager.

    Args:
        path: the TIFF file.
        fill: 0..255, the value of every pixel outside the slide.

    Attributes: ``path``, ``fill``, ``shape`` (H, W), ``layout`` (one of ``LAYOUTS``), ``dtype``
    (of the source samples: uint8 or uint16).

    Raises FileNotFoundError if ``path`` does not exist and ValueError naming the file if it is
    not a TIFF, is cut short (checked on open), or a block fails to decode (checked on read).
    A Slide holds open rasterio datasets: use one per thread or worker process.
    """

    def __init__(self, path: str | os.PathLike, fill: int = 0):
        self.path = Path(path)
        self.fill = _check_fill(fill)
        self._datasets: list = []
        if not self.path.exists():
            raise FileNotFoundError(errno.ENOENT, "slide not found", str(self.path))
        if not self.path.is_file():
            raise ValueError(f"{self.path}: not a file")
        _check_tiff_structure(self.path)
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        main = self._open(self.path)
        self._datasets.append(main)
        self.shape = (main.height, main.width)
        if main.count == 1 and main.colorinterp[0] == ColorInterp.palette:
            raise ValueError(f"{self.path}: palette (colour-mapped) TIFFs are not supported")
        if main.count in (3, 4):
            self.layout = "rgb" if main.count == 3 else "rgba"
            self._bands = (1, 2, 3)
        elif main.count == 1:
            self.layout, self._bands = "grey", (1,)
        else:
            raise ValueError(f"{self.path}: {main.count} bands per pixel; expected 1, 3 or 4")
        dtypes = set(main.dtypes[: len(self._bands)])
        if len(dtypes) != 1 or not dtypes <= {"uint8", "uint16"}:
            raise ValueError(
                f"{self.path}: samples of type {main.dtypes}; expected uint8 or uint16"
            )
        self.dtype = np.dtype(main.dtypes[0])
        if self.layout == "grey":
            planes = self._open_planes(main)
            if planes:
                main.close()
                self._datasets = planes
                self.layout = "planes"

    def _open(self, name: str | Path):
        """Open a dataset (the file or one of its pages), quietly and with errors named."""
        with warnings.catch_warnings():
            # Slides carry no geotransform; GDAL's warning about it is noise here.
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            try:
                with _gdal_env():
                    return rasterio.open(name, driver="GTiff")
            except RasterioError as e:
                raise ValueError(f"{self.path}: not a readable TIFF ({e})") from e

    def _open_planes(self, main) -> list:
        """The first three pages as datasets if they are colour planes, else []."""
        names = main.subdatasets
        if len(names) < 3:
            return []
        pages = []
        try:
            for name in names[:3]:
                pages.append(self._open(name))
            if all(
                p.count == 1 and p.shape == main.shape and p.dtypes == main.dtypes for p in pages
            ):
                return pages
        except BaseException:
            for p in pages:
                p.close()
            raise
        for p in pages:
            p.close()
        return []

    @property
    def block_shape(self) -> tuple[int, int]:
        """(rows, cols) of the file's blocks: its tiles, or its strips (as wide as the slide).

        GDAL decodes whole blocks: reads whose edges fall on block edges decode each block once.
        """
        self._check_open()
        rows, cols = self._datasets[0].block_shapes[0]
        return int(rows), int(cols)

    def read(self, rows: slice, cols: slice, scale: int = 1) -> np.ndarray:
        """Read a rectangle of the slide, padded with ``fill`` outside it, then downscale it.

        Args:
            rows, cols: slices in full-resolution pixels, step 1, ``start < stop``; they may run
                past the slide on any side (a negative start means above/left of the slide, not
                Python's from-the-end indexing). ``None`` bounds mean the slide's edges.
            scale: integer >= 1, the downscale factor.

        Returns:
            uint8 (ceil(h / scale), ceil(w / scale), 3) RGB with h, w the slice lengths; equal to
            ``downscale(padded[rows, cols], scale, fill)``.
        """
        return np.ascontiguousarray(self.read_planes(rows, cols, scale).transpose(1, 2, 0))

    def read_planes(self, rows: slice, cols: slice, scale: int = 1) -> np.ndarray:
        """`read` as colour planes: uint8 (3, h', w'), the layout GDAL decodes into and models
        take, so no (h, w, 3) copy is ever made (`kit.windows` reads through this)."""
        scale = _check_scale(scale)
        self._check_open()
        r0, r1 = _bounds(rows, self.shape[0], "rows")
        c0, c1 = _bounds(cols, self.shape[1], "cols")
        y0, y1 = max(r0, 0), min(r1, self.shape[0])
        x0, x1 = max(c0, 0), min(c1, self.shape[1])
        inside = y0 < y1 and x0 < x1
        if inside:
            window = Window(x0, y0, x1 - x0, y1 - y0)
            block = self._read_sources(f"rows {y0}:{y1}, cols {x0}:{x1}", window=window)
        if inside and (y0, y1, x0, x1) == (r0, r1, c0, c1):
            planes = block  # within the slide: no padding, no copy
        else:
            planes = np.full((3, r1 - r0, c1 - c0), self.fill, np.uint8)
            if inside:
                planes[:, y0 - r0 : y1 - r0, x0 - c0 : x1 - c0] = block
        return planes if scale == 1 else _block_mean(planes, scale, self.fill, axis=1)

    def thumbnail(self, scale: int, chunk_pixels: int = _THUMB_CHUNK_PIXELS) -> np.ndarray:
        """An approximate downscaled picture of the whole slide, for tissue detection and plots.

        If the file has overviews (reduced-resolution pages), a decimated read (GDAL average
        resampling) onto (ceil(H / scale), ceil(W / scale)) that uses them: approximate, each
        output pixel averaging H / ceil(H / scale) x W / ceil(W / scale) source pixels or
        coming from an overview. Otherwise exactly ``read(full slide, scale)``, computed chunk
        by chunk (a few MB each, aligned to the file's blocks so each is decoded once): GDAL's
        decimated read would decode every block too, more slowly, and several times over when
        the blocks of a chunk do not fit its block cache (``GDAL_CACHE_BYTES``).

        Args:
            scale: the downscale factor (integer >= 1).
            chunk_pixels: about how many full-resolution pixels a chunk reads (the memory it
                takes; the result does not depend on it).

        Returns:
            uint8 (ceil(H / scale), ceil(W / scale), 3) RGB.
        """
        scale = _check_scale(scale)
        if isinstance(chunk_pixels, bool) or not isinstance(chunk_pixels, int) or chunk_pixels < 1:
            raise ValueError(f"chunk_pixels must be an int >= 1, got {chunk_pixels!r}")
        self._check_open()
        height, width = self.shape
        out_shape = (len(self._bands), -(-height // scale), -(-width // scale))
        if any(source.overviews(1) for source in self._datasets):
            thumb = self._read_sources(
                f"a thumbnail at scale {scale}", out_shape=out_shape, resampling=Resampling.average
            )
            return np.ascontiguousarray(thumb.transpose(1, 2, 0))
        block_h, block_w = self._datasets[0].block_shapes[0]
        step_w = _chunk_step(block_w, width, scale, chunk_pixels // min(block_h, height))
        step_h = _chunk_step(block_h, height, scale, chunk_pixels // step_w)
        thumb = np.empty((out_shape[1], out_shape[2], 3), np.uint8)
        for y in range(0, height, step_h):
            for x in range(0, width, step_w):
                rows, cols = slice(y, min(y + step_h, height)), slice(x, min(x + step_w, width))
                part = self.read_planes(rows, cols, scale).transpose(1, 2, 0)
                ty, tx = y // scale, x // scale
                thumb[ty : ty + part.shape[0], tx : tx + part.shape[1]] = part
        return thumb

    def _read_sources(self, what: str, **read_args) -> np.ndarray:
        """``DatasetReader.read(bands, **read_args)`` of every source -> uint8 (3, h, w)."""
        try:
            with _gdal_env():
                bands = [ds.read(self._bands, **read_args) for ds in self._datasets]
        except RasterioError as e:
            # rasterio's message is generic; GDAL's (which block failed) is in the cause.
            cause = f"; {e.__cause__}" if e.__cause__ else ""
            raise ValueError(f"{self.path}: cannot read {what} ({e}{cause})") from e
        planes = bands[0] if len(bands) == 1 else np.concatenate(bands, axis=0)
        if planes.dtype == np.uint16:
            planes = (planes >> 8).astype(np.uint8)
        if planes.shape[0] == 1:
            planes = np.repeat(planes, 3, axis=0)
        return planes

    def _check_open(self) -> None:
        if not self._datasets:
            raise ValueError(f"{self.path}: slide is closed")

    def close(self) -> None:
        """Close the underlying datasets; reading afterwards raises ValueError."""
        for ds in self._datasets:
            ds.close()
        self._datasets = []

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        if not hasattr(self, "layout"):
            return f"Slide({str(self.path)!r}, unopened)"
        state = "" if self._datasets else ", closed"
        return (
            f"Slide({str(self.path)!r}, shape={self.shape}, layout={self.layout!r}, "
            f"dtype={self.dtype}{state})"
        )


def _gdal_env() -> rasterio.Env:
    """The GDAL settings every open and read runs with: a bounded block cache, threaded decoding."""
    return rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES, GDAL_NUM_THREADS=str(GDAL_THREADS))


def _chunk_step(block: int, n: int, scale: int, budget: int) -> int:
    """Chunk side along one axis for a thumbnail: a multiple of ``scale`` (so the chunks'
    block means are the whole slide's) and, where possible, of the file's ``block`` side (so
    no block is decoded twice), about ``budget`` pixels long, at most the axis (``n``)."""
    if block >= n:
        return n  # one block (strip) spans the axis: chunks span it too
    unit = math.lcm(scale, block)
    if unit > 4096:
        unit = scale  # blocks never line up with the scale: GDAL's block cache makes up
    return min(unit * max(1, budget // unit), unit * -(-n // unit))


def _check_scale(scale) -> int:
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 1:
        raise ValueError(f"scale must be an integer >= 1, got {scale!r}")
    return int(scale)


def _check_fill(fill) -> int:
    if isinstance(fill, bool) or not isinstance(fill, (int, np.integer)) or not 0 <= fill <= 255:
        raise ValueError(f"fill must be an integer in 0..255, got {fill!r}")
    return int(fill)


def _bounds(sl: slice, n: int, name: str) -> tuple[int, int]:
    """(start, stop) of a window slice; None means the slide edge; negatives are kept."""
    if not isinstance(sl, slice) or sl.step not in (None, 1):
        raise ValueError(f"{name} must be a slice with step 1, got {sl!r}")
    try:
        start = 0 if sl.start is None else operator.index(sl.start)
        stop = n if sl.stop is None else operator.index(sl.stop)
    except TypeError:
        raise ValueError(f"{name} bounds must be integers, got {sl!r}") from None
    if start >= stop:
        raise ValueError(f"{name} slice is empty or inverted: {sl!r}")
    return start, stop


# TIFF tags holding where the image data lies: StripOffsets, StripByteCounts, TileOffsets,
# TileByteCounts; and the field types those use (SHORT, LONG, LONG8).
_DATA_TAGS = {273: "offsets", 279: "counts", 324: "offsets", 325: "counts"}
_INT_TYPES = {3: "H", 4: "I", 16: "Q"}


class _PageTableFormat(NamedTuple):
    """How a TIFF lays out its page tables (IFDs): classic TIFF (42) or BigTIFF (43)."""

    order: str  # "<" little-endian, ">" big-endian
    count_fmt: str  # struct format of a table's entry count
    entry_size: int  # bytes per entry
    off_fmt: str  # struct format of an offset (and of an entry's value count)


def _check_tiff_structure(path: Path) -> None:
    """Raise ValueError unless ``path`` is a TIFF whose pages and image data lie in the file.

    GDAL opens a cut-off TIFF happily and fails only on the missing blocks; worse, a cut-off
    one-plane-per-page slide loses its last pages and would read as greyscale. Walking the page
    (IFD) chain and the strip/tile offsets costs a few kilobytes of reading.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:

        def read_at(offset: int, length: int) -> bytes:
            if offset < 0 or offset + length > size:
                raise ValueError(f"{path}: truncated or corrupt TIFF (offset {offset} past end)")
            fh.seek(offset)
            return fh.read(length)

        fmt, offset = _tiff_header(fh.read(16), path)
        count_size, off_size = struct.calcsize(fmt.count_fmt), struct.calcsize(fmt.off_fmt)
        seen: set[int] = set()
        while offset:
            if offset in seen:
                raise ValueError(f"{path}: corrupt TIFF (page chain loops at offset {offset})")
            seen.add(offset)
            (n_entries,) = struct.unpack(fmt.order + fmt.count_fmt, read_at(offset, count_size))
            table = read_at(offset + count_size, n_entries * fmt.entry_size + off_size)
            end = _image_data_end(table, n_entries, fmt, read_at)
            if end > size:
                raise ValueError(
                    f"{path}: truncated TIFF (image data runs to byte {end}, file has {size})"
                )
            (offset,) = struct.unpack(fmt.order + fmt.off_fmt, table[-off_size:])


def _tiff_header(head: bytes, path: Path) -> tuple[_PageTableFormat, int]:
    """The page-table format of a TIFF from its first 16 bytes, and its first table's offset."""
    order = {b"II": "<", b"MM": ">"}.get(head[:2])
    version = struct.unpack(order + "H", head[2:4])[0] if order and len(head) >= 8 else None
    if version == 42:
        return _PageTableFormat(order, "H", 12, "I"), struct.unpack(order + "I", head[4:8])[0]
    if version == 43 and len(head) == 16:
        return _PageTableFormat(order, "Q", 20, "Q"), struct.unpack(order + "Q", head[8:16])[0]
    raise ValueError(f"{path}: not a TIFF file (header {head[:4]!r})")


def _image_data_end(
    table: bytes, n_entries: int, fmt: _PageTableFormat, read_at: Callable[[int, int], bytes]
) -> int:
    """The byte where a page's image data ends: the furthest end of its written strips or tiles
    (0 for a page without them).

    Args:
        table: the page's ``n_entries`` entries (and the next page's offset after them).
        read_at: ``read_at(offset, length)`` reads the file, for values stored outside the table.
    """
    off_size = struct.calcsize(fmt.off_fmt)
    data: dict[str, np.ndarray] = {}
    for i in range(n_entries):
        entry = table[i * fmt.entry_size : (i + 1) * fmt.entry_size]
        tag, typ = struct.unpack(fmt.order + "HH", entry[:4])
        if tag not in _DATA_TAGS or typ not in _INT_TYPES:
            continue
        (count,) = struct.unpack(fmt.order + fmt.off_fmt, entry[4 : 4 + off_size])
        dtype = np.dtype(fmt.order + _INT_TYPES[typ])
        raw = entry[4 + off_size :]
        if count * dtype.itemsize > off_size:  # values stored elsewhere in the file
            (where,) = struct.unpack(fmt.order + fmt.off_fmt, raw)
            raw = read_at(where, count * dtype.itemsize)
        values = np.frombuffer(raw[: count * dtype.itemsize], dtype).astype(np.uint64)
        data[_DATA_TAGS[tag]] = values
    if "offsets" not in data or "counts" not in data:
        return 0
    offsets, counts = data["offsets"], data["counts"]
    n = min(len(offsets), len(counts))
    # A zero byte count marks a block never written (GDAL reads it as empty).
    ends = np.where(counts[:n] > 0, offsets[:n] + counts[:n], 0)
    return int(ends.max()) if n else 0
