"""The splitter of whole-slide inference: one open slide -> batches of downscaled windows.

    with Slide(path) as slide:
        splitter = Splitter(slide, window=1024, overlap=256, scale=4, batch_size=8)
        for tiles, windows in read_ahead(splitter, depth=4):   # uint8 (n, 3, 256, 256)
            ...
    splitter.columns   # the plan's tiles, grouped into column strips (what a merger completes)

The plan (`kit.tiling.plan`) lays windows aligned to the scale, ordered column strip by column
strip. The slide is decoded once, left to right, into one buffer of downscaled columns (the
band): window starts are multiples of the scale, so a window is a slice of the band. Columns a
strip shares with the previous one (the overlap) are kept, not decoded again. A file stored in
strips (blocks as wide as the slide) would be decoded again for every column strip, so it is
read whole, strip band by strip band, into one downscaled picture of the slide (its size is
``3 * H * W / scale**2`` bytes: 221 MB for 30720 x 38400 at scale 4), when that fits
``max_band_bytes``; above it, column strips again (each decoding the whole width). Tiles whose core
shows no tissue (the kit's tissue rule, `kit.tiling.has_tissue`, judged on the tile's own
downscaled pixels) are left out: a merger fills them with 0. A ``normalise`` function (e.g. the
slide's `kit.stain.normaliser`) maps each batch after the tissue rule has judged its raw pixels,
as training judged its tiles before normalising them.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from kit.slides import Slide
from kit.tiling import MIN_TISSUE, TISSUE_SATURATION, Tile, has_tissue, plan, tissue_fraction

__all__ = ["Batch", "Splitter", "column_strips", "read_ahead"]

# (tiles, uint8 (n, 3, h, w) their windows downscaled, RGB): what a splitter yields.
Batch = tuple[list[Tile], np.ndarray]

# Full-resolution pixels per read of a column strip's band (6 MB of RGB): requests of many
# blocks are what GDAL decodes in parallel; a bound, so memory stays O(H x strip width) small.
_READ_CHUNK_PIXELS = 2 * 2**20
# The default bound on a striped slide read whole, downscaled (see the module's docstring).
MAX_BAND_BYTES = 1 << 30


def column_strips(tiles: Sequence[Tile]) -> list[list[Tile]]:
    """Group a plan's tiles (ordered column by column) into columns sharing one core span."""
    columns: list[list[Tile]] = []
    for tile in tiles:
        if not columns or (tile.cx0, tile.cx1) != (columns[-1][0].cx0, columns[-1][0].cx1):
            columns.append([])
        columns[-1].append(tile)
    return columns


class Splitter:
    """Batches of the windows to predict of one open slide, in plan order.

    Args:
        slide: an open `Slide`; iterating reads it (from one thread at a time).
        window: side of the full-resolution window (px), a multiple of ``scale``.
        overlap: least overlap of neighbouring windows (px).
        scale: downscale factor; windows come out ``window // scale`` px a side.
        batch_size: windows per batch (the last one may hold fewer).
        tissue: leave out tiles whose core shows no tissue.
        align: window starts are multiples of it (default ``scale``; a multiple of it).
        tissue_saturation, min_tissue: the tissue rule's settings (`kit.tiling.has_tissue`).
        max_band_bytes: the most the band may hold when a striped file is read whole.
        normalise: ``f(windows, channel_axis=1)`` applied to each batch (uint8 (n, 3, h, w) in
            and out), e.g. `kit.stain.normaliser`; None: windows as read.

    Iterating yields `Batch` es: (tiles, uint8 (n, 3, h, w) windows, RGB). Each batch is a new
    array, so batches may be queued (`read_ahead`).
    """

    def __init__(
        self,
        slide: Slide,
        window: int,
        overlap: int,
        scale: int,
        batch_size: int,
        *,
        align: int | None = None,
        tissue: bool = True,
        tissue_saturation: int = TISSUE_SATURATION,
        min_tissue: float = MIN_TISSUE,
        max_band_bytes: int = MAX_BAND_BYTES,
        normalise: Callable[..., np.ndarray] | None = None,
    ) -> None:
        self.slide = slide
        self.normalise = normalise
        self.shape = slide.shape
        self.scale, self.batch_size = scale, batch_size
        self.tissue, self.saturation, self.min_tissue = tissue, tissue_saturation, min_tissue
        align = scale if align is None else align
        if align % scale:
            raise ValueError(f"align {align} is not a multiple of scale {scale}")
        self.columns = column_strips(plan(self.shape, window, overlap, align=align))
        rows, cols = self.columns[-1][-1].y1, self.columns[-1][-1].x1  # the plan's extent
        striped = slide.block_shape[1] >= self.shape[1] > window
        self.whole = striped and 3 * (rows // scale) * (cols // scale) <= max_band_bytes

    def __len__(self) -> int:
        """Tiles in the plan (predicted or not)."""
        return sum(len(column) for column in self.columns)

    def __iter__(self) -> Iterator[Batch]:
        tiles: list[Tile] = []
        batch = None
        for tile, window in self._windows():
            if batch is None:
                batch = np.empty((self.batch_size, *window.shape), np.uint8)
            batch[len(tiles)] = window
            tiles.append(tile)
            if len(tiles) == self.batch_size:
                yield tiles, self._normalised(batch)
                tiles, batch = [], None
        if tiles:
            yield tiles, self._normalised(batch[: len(tiles)])

    def _normalised(self, batch: np.ndarray) -> np.ndarray:
        return batch if self.normalise is None else self.normalise(batch, channel_axis=1)

    def _windows(self) -> Iterator[tuple[Tile, np.ndarray]]:
        """(tile, uint8 (3, h, w) view of the band) per tile to predict, valid until the next.

        Reads end on the file's block edges where the scale allows (the band then runs a little
        ahead), so no block is decoded twice and GDAL's block cache is not relied on.
        """
        s, (height, width) = self.scale, self.shape
        block_h, block_w = self.slide.block_shape
        unit_x, unit_y = _read_unit(block_w, width, s), _read_unit(block_h, height, s)
        if self.whole:
            yield from self._whole_windows(unit_y)
            return
        band = None  # uint8 (3, rows / s, capacity): downscaled slide columns [band_x0, band_x1)
        band_x0 = band_x1 = 0
        for column in self.columns:
            x0, x1, rows = column[0].x0, column[0].x1, column[-1].y1
            if band is None:
                band = np.empty((3, rows // s, (x1 - x0 + unit_x) // s), np.uint8)
            if x0 > band_x0:  # drop the columns left of this column of windows
                lo, hi = (x0 - band_x0) // s, (band_x1 - band_x0) // s
                if hi > lo:
                    band[:, :, : hi - lo] = band[:, :, lo:hi]
                band_x0, band_x1 = x0, max(band_x1, x0)
            if x1 > band_x1:
                stop = max(x1, min(-(-x1 // unit_x) * unit_x, -(-width // s) * s))
                out = band[:, :, (band_x1 - x0) // s : (stop - x0) // s]
                self._read_band(band_x1, stop, unit_y, out)
                band_x1 = stop
            yield from self._column_windows(band[:, :, : (x1 - x0) // s], column)

    def _whole_windows(self, unit_y: int) -> Iterator[tuple[Tile, np.ndarray]]:
        """As `_windows`, from the whole plan read at once (a striped file: each strip once)."""
        s, rows, cols = self.scale, self.columns[0][-1].y1, self.columns[-1][0].x1
        band = np.empty((3, rows // s, cols // s), np.uint8)
        self._read_band(0, cols, unit_y, band)
        for column in self.columns:
            x0, x1 = column[0].x0, column[0].x1
            yield from self._column_windows(band[:, :, x0 // s : x1 // s], column)

    def _column_windows(self, low: np.ndarray, column: Sequence[Tile]):
        """(tile, window) of a column's tiles to predict; ``low`` uint8 (3, h, w) the column's
        windows downscaled, from slide row 0 and column ``column[0].x0``."""
        for tile, keep in zip(column, self._keep(low, column), strict=True):
            if keep:
                yield tile, low[:, tile.y0 // self.scale : tile.y1 // self.scale]

    def _read_band(self, x0: int, x1: int, unit: int, out: np.ndarray) -> None:
        """Read slide cols [x0, x1), rows [0, out.shape[1] * scale) (``fill`` past the slide),
        downscaled into ``out`` (uint8 (3, rows / scale, (x1 - x0) / scale)), a bounded number
        of pixels (rows a multiple of ``unit``) at a time."""
        s, rows = self.scale, out.shape[1] * self.scale
        step = unit * max(1, _READ_CHUNK_PIXELS // ((x1 - x0) * unit))
        for y in range(0, rows, step):
            part = self.slide.read_planes(slice(y, min(y + step, rows)), slice(x0, x1), s)
            out[:, y // s : y // s + part.shape[1]] = part

    def _keep(self, band: np.ndarray, column: Sequence[Tile]) -> list[bool]:
        """Per tile of a column: whether it is predicted (its core shows tissue).

        Args:
            band: uint8 (3, h, w) the column's windows downscaled, from slide row 0 and column
                ``column[0].x0``.
        """
        if not self.tissue:
            return [True] * len(column)
        fraction = tissue_fraction(
            column,
            band.transpose(1, 2, 0),
            self.scale,
            saturation=self.saturation,
            origin=(0, column[0].x0),
        )
        return has_tissue(fraction, self.min_tissue).tolist()


def _read_unit(block: int, n: int, scale: int) -> int:
    """What reads along an axis are aligned to: a multiple of the scale, and of the file's
    block side where that stays small, else the scale alone (e.g. strips spanning the axis)."""
    unit = math.lcm(block, scale)
    return unit if block < n and unit <= 4096 else scale


class _Failure:
    """An exception raised in the reading thread, handed to the consumer to re-raise."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def read_ahead(items: Iterable, depth: int) -> Iterator:
    """Iterate ``items`` in a background thread, at most ``depth`` items ahead of the consumer.

    ``depth == 0`` iterates in the calling thread. An exception in the thread is re-raised in
    the consumer; closing the returned generator stops the thread (and waits for it), so a
    `Splitter`'s slide may be closed right after.
    """
    if depth == 0:
        yield from items
        return
    stop = threading.Event()
    queued: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                queued.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # handed to the consumer, which re-raises it
            put(_Failure(e))

    thread = threading.Thread(target=work, name="kit-read-ahead", daemon=True)
    thread.start()
    try:
        while (item := queued.get()) is not done:
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()
