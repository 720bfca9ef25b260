"""The merger of whole-slide inference: (tile, probabilities) -> finished column strips.

    merger = StripMerger(splitter.columns, slide.shape, scale=4, threshold=0.5)
    for tile, probs in predicted:                 # in plan order; skipped tiles never come
        for cols, strip in merger.add(tile, probs):
            sink(cols, strip)                     # RLE encoder, threshold sweep, full mask...
    for cols, strip in merger.finish():
        sink(cols, strip)

Each window's low-resolution probabilities are upsampled back to full resolution and only its
core is kept. Cores partition the slide, so every pixel comes from exactly one window and nothing
is accumulated; a column strip (the cores of one column of windows) is handed on as soon as a
tile of a later column arrives. Tiles that never arrive (no tissue) stay 0. Memory is one strip,
O(H x strip width).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import numpy as np
from numba import njit

from kit.tiling import Tile

__all__ = ["UPSAMPLE_MODES", "StripMerger", "upsample"]

UPSAMPLE_MODES = ("bilinear", "nearest")

# Margin around the threshold within which a window's upsampled values are always computed. An
# interpolated value is a convex combination of its neighbours, off by a few float32 ulps (< 1e-6
# for probabilities), so a window whose low-resolution probabilities all lie farther than this
# below (above) the threshold is all 0 (1) at full resolution and needs no upsampling.
_SHORTCUT_MARGIN = 1e-5

Strip = tuple[slice, np.ndarray]


class StripMerger:
    """Writes tiles' cores into column strips and hands each strip on when it is complete.

    Args:
        columns: the plan's tiles grouped by column strip (`kit.windows.Splitter.columns`).
        shape: (H, W) of the slide.
        scale: the factor the probabilities are downscaled by.
        upsample: "bilinear" or "nearest" (see `upsample`).
        threshold: None for float32 probability strips; a float for uint8 0/1 mask strips
            (probability > threshold), cheaper: windows far from the threshold skip upsampling.
        band_rows: low-resolution rows per band when merging a mask: bands are checked against
            the threshold one by one (smaller bands skip more upsampling, at a little Python
            overhead each); the result does not depend on it.

    Strips are (cols, array (H, width of cols)) in Fortran order (each column contiguous, as
    column-major RLE reads it), a new array each: the consumer may keep it. ``done`` counts the
    plan's tiles of the strips handed on, ``total`` all of them.
    """

    def __init__(
        self,
        columns: Sequence[Sequence[Tile]],
        shape: tuple[int, int],
        scale: int,
        upsample: str = "bilinear",
        threshold: float | None = None,
        band_rows: int = 16,
    ) -> None:
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")
        self.columns, self.shape, self.scale = columns, shape, scale
        self.mode, self.threshold, self.band_rows = upsample, threshold, band_rows
        self.dtype = np.float32 if threshold is None else np.uint8
        self.column_of = {tile: k for k, column in enumerate(columns) for tile in column}
        self.total = len(self.column_of)
        self.done = 0
        self._next = 0  # the column whose strip is being filled
        self._strip = self._new_strip(0) if columns else None

    def add(self, tile: Tile, probs: np.ndarray) -> Iterator[Strip]:
        """Merge one tile's probabilities, float32 (window // scale,) * 2, of its whole window.

        Yields the strips completed before this tile's column (tiles come in plan order).
        """
        k = self.column_of.get(tile)
        if k is None or k < self._next:
            raise ValueError(f"tile {tile} is not in the plan or came after its column")
        while self._next < k:
            yield self._hand_on()
        self._merge(tile, probs)

    def finish(self) -> Iterator[Strip]:
        """The strips not yet handed on, through the last."""
        while self._next < len(self.columns):
            yield self._hand_on()

    def _new_strip(self, k: int) -> np.ndarray:
        cols = self.columns[k][0].core[1]
        return np.zeros((self.shape[0], cols.stop - cols.start), self.dtype, order="F")

    def _hand_on(self) -> Strip:
        k, strip = self._next, self._strip
        self.done += len(self.columns[k])
        self._next += 1
        if self._next < len(self.columns):
            self._strip = self._new_strip(self._next)
        return self.columns[k][0].core[1], strip

    def _merge(self, tile: Tile, probs: np.ndarray) -> None:
        """Write a tile's core into the current strip (H, core width)."""
        s, binary, t = self.scale, self.threshold is not None, self.threshold
        strip = self._strip
        # Low-resolution rows/cols the core's pixels interpolate from: the core's span widened by
        # one pixel, and never past the slide (the window may extend beyond it, filled): the
        # slide's edge is then clamped exactly as when the whole slide is upsampled at once.
        c0, c1 = _source_span(
            tile.cx0 - tile.x0, tile.cx1 - tile.x0, min(tile.x1, self.shape[1]) - tile.x0, s
        )
        valid_h = min(tile.y1, self.shape[0]) - tile.y0
        # The core within the upsampled piece, whose first column is c0 * s in the window.
        dx, core_w = tile.cx0 - tile.x0 - c0 * s, tile.cx1 - tile.cx0
        # A mask is merged in bands of rows, each widened like the core, so that bands whose
        # probabilities all lie far from the threshold (most of a slide) skip the upsampling.
        band = self.band_rows * s if binary else tile.cy1 - tile.cy0
        for y0 in range(tile.cy0, tile.cy1, band):
            y1 = min(y0 + band, tile.cy1)
            r0, r1 = _source_span(y0 - tile.y0, y1 - tile.y0, valid_h, s)
            low = probs[r0:r1, c0:c1]
            rows = slice(y0, y1)
            if binary:
                if low.max() <= t - _SHORTCUT_MARGIN:
                    continue  # all 0, as the strip already is
                if low.min() > t + _SHORTCUT_MARGIN:
                    strip[rows] = 1
                    continue
                if self.mode == "nearest":  # thresholding commutes with nearest: upsample 0/1
                    low = (low > t).view(np.uint8)
            dy = y0 - tile.y0 - r0 * s
            if binary and self.mode == "bilinear":
                _bilinear_above(low, s, np.float32(t), dy, dx, strip[rows])
                continue
            up = upsample(low, s, self.mode)[dy : dy + y1 - y0, dx : dx + core_w]
            strip[rows] = up


def _bilinear_above(
    low: np.ndarray, scale: int, threshold: np.float32, dy: int, dx: int, out: np.ndarray
) -> None:
    """``out[:] = upsample(low, scale)[dy:dy + h, dx:dx + w] > threshold``, (h, w) = out.shape,
    in one pass without the float32 picture: the same float32 operations in the same order as
    `_linear_rows` then `_linear_cols` (so the same bits), compared in float32 as NumPy
    compares a float32 array with a Python float."""
    side, own, other = _phase_arrays(scale)
    _bilinear_above_kernel(np.ascontiguousarray(low), side, own, other, threshold, dy, dx, out)


@functools.lru_cache(maxsize=8)
def _phase_arrays(scale: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`_phases` as the kernel's three arrays (side, own, other), built once per scale rather
    than once per band (read-only: they are shared)."""
    phases = _phases(scale)
    arrays = (
        np.array([p[0] for p in phases], np.int64),
        np.array([p[1] for p in phases], np.float32),
        np.array([p[2] for p in phases], np.float32),
    )
    for array in arrays:
        array.flags.writeable = False
    return arrays


@njit(cache=True, nogil=True)
def _bilinear_above_kernel(low, side, own, other, threshold, dy, dx, out):  # pragma: no cover
    h, w = low.shape
    scale = own.shape[0]
    rows, cols = out.shape
    # per output row: the low-res row and its neighbour, and their weights (likewise per column)
    k, kk, row_own, row_other = _taps(dy, rows, scale, h, side, own, other)
    m, mm, col_own, col_other = _taps(dx, cols, scale, w, side, own, other)
    for j in range(cols):  # column by column, down each: ``out`` is a band of a Fortran strip
        a, b, c, d = m[j], mm[j], col_own[j], col_other[j]
        for i in range(rows):
            # the row pass at columns a and b, then the column pass between them
            here = low[k[i], a] * row_own[i] + low[kk[i], a] * row_other[i]
            there = low[k[i], b] * row_own[i] + low[kk[i], b] * row_other[i]
            out[i, j] = 1 if here * c + there * d > threshold else 0


@njit(cache=True, nogil=True)
def _taps(start, n, scale, size, side, own, other):  # pragma: no cover
    """For output pixels start..start + n - 1 of one axis: source index, neighbour index
    (clamped to the source's size), own weight, neighbour weight."""
    index = np.empty(n, np.int64)
    neighbour = np.empty(n, np.int64)
    w_own = np.empty(n, np.float32)
    w_other = np.empty(n, np.float32)
    for t in range(n):
        block, phase = divmod(start + t, scale)
        index[t] = block
        neighbour[t] = min(max(block + side[phase], 0), size - 1)
        w_own[t] = own[phase]
        w_other[t] = other[phase]
    return index, neighbour, w_own, w_other


def _source_span(core0: int, core1: int, valid: int, scale: int) -> tuple[int, int]:
    """Low-resolution index range [lo, hi) that full-resolution pixels [core0, core1) need.

    Coordinates are relative to the window; ``valid`` is how many of its pixels are inside the
    slide. Bilinear output pixel y reads source pixels floor((y + 0.5) / s - 0.5) and the next.
    """
    lo = max(core0 // scale - 1, 0)
    hi = min(-(-core1 // scale) + 1, -(-valid // scale))
    return lo, hi


def upsample(probs: np.ndarray, scale: int, mode: str = "bilinear") -> np.ndarray:
    """Upsample by an integer factor: (..., h, w) -> (..., h * scale, w * scale).

    "bilinear" is ``F.interpolate(mode="bilinear", align_corners=False)`` (edges clamped) up to
    float rounding; "nearest" repeats each value over a ``scale x scale`` block. Built from
    elementwise multiplications and additions only, so a value never depends on the array's size
    or on the pixel's position in it (``F.interpolate``'s vectorised and scalar paths may differ
    by an ulp): a window upsampled alone matches the same pixels of the whole image bit for bit.

    Args:
        probs: float32 (..., h, w) for "bilinear"; any dtype for "nearest"; h, w >= 1.
        scale: integer >= 1.
        mode: "bilinear" or "nearest".
    """
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"mode must be one of {UPSAMPLE_MODES}, got {mode!r}")
    if scale == 1:
        return probs
    if mode == "nearest":
        return np.repeat(np.repeat(probs, scale, axis=-2), scale, axis=-1)
    return _linear_cols(_linear_rows(probs, scale), scale)


def _phases(scale: int) -> list[tuple[int, np.float32, np.float32]]:
    """Per output pixel j of a block: (neighbour side -1/+1, own weight, neighbour weight).

    Output pixel j of block k samples the source at k + (2j + 1 - scale) / (2 scale)
    (half-pixel centres), between pixel k and its neighbour on that side.
    """
    out = []
    for j in range(scale):
        offset = (2 * j + 1 - scale) / (2 * scale)
        side = -1 if offset < 0 else 1
        out.append((side, np.float32(1 - abs(offset)), np.float32(abs(offset))))
    return out


def _linear_rows(x: np.ndarray, scale: int) -> np.ndarray:
    """Linear upsampling along axis -2, edges clamped: (..., h, w) -> (..., h * scale, w)."""
    padded = np.concatenate([x[..., :1, :], x, x[..., -1:, :]], axis=-2)
    here = padded[..., 1:-1, :]
    out = np.empty((*x.shape[:-1], scale, x.shape[-1]), x.dtype)  # (..., h, scale, w)
    for j, (side, own, other) in enumerate(_phases(scale)):
        neighbour = padded[..., :-2, :] if side < 0 else padded[..., 2:, :]
        np.multiply(here, own, out=out[..., j, :])
        out[..., j, :] += neighbour * other
    return out.reshape(*x.shape[:-2], x.shape[-2] * scale, x.shape[-1])


def _linear_cols(x: np.ndarray, scale: int) -> np.ndarray:
    """Linear upsampling along axis -1, edges clamped: (..., h, w) -> (..., h, w * scale)."""
    padded = np.concatenate([x[..., :1], x, x[..., -1:]], axis=-1)
    here = padded[..., 1:-1]
    out = np.empty((*x.shape, scale), x.dtype)  # (..., h, w, scale)
    for j, (side, own, other) in enumerate(_phases(scale)):
        neighbour = padded[..., :-2] if side < 0 else padded[..., 2:]
        np.multiply(here, own, out=out[..., j])
        out[..., j] += neighbour * other
    return out.reshape(*x.shape[:-1], x.shape[-1] * scale)
