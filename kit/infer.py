"""Whole-slide prediction in bounded memory: plan, predict, merge, one column strip at a time.

    mask = predict_slide("test/aa05346ff.tiff", model)                 # uint8 (H, W)
    rle = predict_slide_rle(path, model, InferConfig(tta=True))        # never holds (H, W)
    for cols, probs in iter_probability_strips(path, model, scale=2):  # float32 (H, w) strips
        ...
    predict_slide_rle(path, model, on_progress=print)  # (tiles done, tiles in the plan)

Plan: `kit.tiling.plan` lays windows of ``window`` px overlapping by at least ``overlap`` px,
starts aligned to ``scale``, ordered column strip by column strip. Read: a reader thread with
its own `Slide` decodes the slide once, column strip by column strip: each strip's band of
windows is read at full resolution and downscaled by ``scale`` once (window starts are multiples
of ``scale``, so every window is a slice of the downscaled band), and the columns a strip shares
with the previous one are kept instead of decoded again. Tiles whose core shows no tissue (judged
on the tile's own downscaled pixels) give 0 and are never predicted. Predict: the reader
fills a bounded queue with batches of windows while the predictor runs: any callable taking
float (N, 3, h, w) RGB in [0, 1] and returning logits (N, 1, h, w), e.g. a model from
`kit.model`. Merge: each window's probabilities are upsampled back to full resolution and only
its core is kept. Cores partition the slide, so every pixel comes from exactly one window and
nothing is accumulated; a column strip (the cores of one column of windows) is handed on as soon
as its windows are done. Memory is O(H x strip width). Progress: an ``on_progress(done, total)``
callback hears how many of the plan's tiles are done (skipped ones count) before the first strip
and with each strip; `kit.progress.tile_bar` makes one that draws a bar.

Exactness (pinned in tests/test_infer.py): for a pointwise predictor, `predict_slide` equals,
pixel for pixel, the whole-image computation: downscale the padded slide, predict, sigmoid,
upsample, crop, threshold. This holds

- when ``scale == 1``, or ``upsample == "nearest"``, for any overlap;
- for ``upsample == "bilinear"`` when ``overlap >= 2 * scale``: every core then stays at least
  ``scale`` px away from the inner edges of its window, so each output pixel interpolates the same
  low-resolution values, with the same weights, as in the whole image. At the slide's edges only
  the windows' part inside the slide is upsampled, so edges are clamped as in the whole image.

It is exact to the bit because nothing depends on where a pixel falls in a tensor: the sigmoid is
taken in float64 (vectorised float32 ``exp`` differs from the scalar one by an ulp, and which one a
pixel gets depends on the tensor's size) and `upsample` is made of elementwise operations.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kit.config import option
from kit.device import amp_dtype
from kit.rle import RleEncoder
from kit.slides import Slide
from kit.tiling import (
    MIN_TISSUE,
    TISSUE_SATURATION,
    Tile,
    has_tissue,
    plan,
    tissue_fraction,
)

__all__ = [
    "InferConfig",
    "iter_mask_strips",
    "iter_probability_strips",
    "predict_slide",
    "predict_slide_rle",
    "resolve_config",
    "sigmoid",
    "upsample",
]

Predictor = Callable[[torch.Tensor], torch.Tensor]
# Called with (tiles done, tiles in the plan): once with 0, then after each column strip.
OnProgress = Callable[[int, int], None]

UPSAMPLE_MODES = ("bilinear", "nearest")

# Flip TTA: the dims flipped for each view of a batch (N, 3, h, w).
_FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))

# Margin around the threshold within which a window's upsampled values are always computed. An
# interpolated value is a convex combination of its neighbours, off by a few float32 ulps (< 1e-6
# for probabilities), so a window whose low-resolution probabilities all lie farther than this
# below (above) the threshold is all 0 (1) at full resolution and needs no upsampling.
_SHORTCUT_MARGIN = 1e-5
# Low-resolution rows per band when merging a mask: bands are checked against that margin one
# by one (smaller bands skip more upsampling, at a little Python overhead each).
_MERGE_BAND_ROWS = 16
# Full-resolution pixels per read of a column strip's band (6 MB of RGB): requests of many
# blocks are what GDAL decodes in parallel; a bound, so memory stays O(H x strip width) small.
_READ_CHUNK_PIXELS = 2 * 2**20


@dataclass
class InferConfig:
    """How a slide is tiled, predicted and merged (one config for predict, submit, evaluate).

    Tissue detection (``tissue``) is the kit's tissue rule (`kit.tiling.has_tissue`), the one
    training labels its negatives by: each tile is judged on its own core as the predictor sees
    it, downscaled by ``scale``, not on a separate thumbnail (the slide is decoded only once).
    """

    window: int = option(1024, "side of the full-resolution window read from the slide (px)")
    overlap: int = option(256, "least overlap of neighbouring windows (px); cores meet midway")
    scale: int = option(4, "downscale factor: the predictor sees windows of window // scale px")
    threshold: float = option(0.5, "mask = probability > threshold")
    tta: bool = option(False, "average probabilities over identity, hflip, vflip and hvflip")
    upsample: str = option("bilinear", "bilinear (align_corners=False) or nearest")
    batch_size: int = option(8, "windows per predictor call (per flip with tta)")
    tissue: bool = option(True, "tiles whose core shows no tissue are 0, never predicted")
    tissue_saturation: int = option(TISSUE_SATURATION, "HSV saturation (0..255) of tissue")
    # As DataConfig.min_tissue, whose "tissue" negatives are the tiles inference predicts.
    min_tissue: float = option(MIN_TISSUE, "tiles whose core's tissue fraction is <= this skip")
    device: str | torch.device | None = option(None, "cpu, cuda ... (default: the predictor's)")
    amp: bool | None = option(None, "CUDA autocast (bf16 on Ampere+, else fp16); default: on CUDA")
    # workers: 0 reads in the calling thread, otherwise one reader thread with its own Slide
    # (strips are decoded in order, each column once; GDAL decodes with GDAL_THREADS).
    workers: int = option(1, "slide reader threads (0: read in the calling thread)")
    prefetch: int = option(4, "batches read ahead of the predictor (bounds the queue's memory)")

    def __post_init__(self) -> None:
        for name in ("window", "scale", "batch_size", "prefetch"):
            _check_int(self, name, low=1)
        for name in ("overlap", "workers"):
            _check_int(self, name, low=0)
        if self.window % self.scale:
            raise ValueError(f"window {self.window} is not a multiple of scale {self.scale}")
        if self.overlap >= self.window:
            raise ValueError(f"overlap {self.overlap} must be smaller than window {self.window}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold!r}")
        if not 0.0 <= self.min_tissue < 1.0:
            raise ValueError(f"min_tissue must be in [0, 1), got {self.min_tissue!r}")
        if self.upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {self.upsample!r}")


def _check_int(cfg: InferConfig, name: str, low: int) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"InferConfig.{name} must be an integer >= {low}, got {value!r}")


def resolve_config(cfg: InferConfig | None = None, **overrides) -> InferConfig:
    """``cfg`` (default `InferConfig()`) with ``overrides`` applied, e.g. ``scale=2``."""
    cfg = InferConfig() if cfg is None else cfg
    if not isinstance(cfg, InferConfig):
        raise ValueError(f"cfg must be an InferConfig, got {type(cfg).__name__}")
    names = {f.name for f in dataclasses.fields(InferConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"unknown InferConfig option(s): {', '.join(unknown)}")
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


def config_from_checkpoint(checkpoint: dict, **overrides) -> InferConfig:
    """The inference settings a kit checkpoint was trained and validated with.

    Takes ``window``, ``scale``, ``overlap``, ``threshold``, ``tta`` and ``min_tissue`` (the
    tissue rule its negatives were chosen by) from the checkpoint's ``config``: its ``infer``
    section (kit.train.TrainConfig), or the flat fields of checkpoints written before it had
    sections. Missing ones keep `InferConfig`'s defaults; then ``overrides`` apply, an override
    of None ignored, so command-line options can be passed through as they are.
    """
    trained = checkpoint.get("config") or {}
    trained = trained.get("infer", trained)  # flat: the overlap, threshold... of inference
    names = ("window", "scale", "overlap", "threshold", "tta", "min_tissue")
    base = {name: trained[name] for name in names if trained.get(name) is not None}
    given = {name: value for name, value in overrides.items() if value is not None}
    return resolve_config(InferConfig(**base), **given)


# ---------------------------------------------------------------------------------------------
# Public entry points


def predict_slide(
    path: str | Path,
    predictor: Predictor,
    cfg: InferConfig | None = None,
    *,
    on_progress: OnProgress | None = None,
    **overrides,
) -> np.ndarray:
    """Binary mask of a whole slide.

    Args:
        path: the slide's TIFF.
        predictor: float (N, 3, h, w) RGB in [0, 1] -> logits (N, 1, h, w).
        cfg: an `InferConfig`; ``overrides`` replace its fields (``scale=2, tta=True``).
        on_progress: called with (tiles done, tiles in the plan), tiles skipped as
            tissue-free counting as done: with 0 first, then after each column strip.

    Returns:
        uint8 (H, W) of 0/1: probability > ``cfg.threshold``.
    """
    cfg = resolve_config(cfg, **overrides)
    with Slide(path) as slide:
        height, width = slide.shape
    mask = np.zeros((height, width), np.uint8)
    for cols, strip in iter_mask_strips(path, predictor, cfg, on_progress=on_progress):
        mask[:, cols] = strip
    return mask


def predict_slide_rle(
    path: str | Path,
    predictor: Predictor,
    cfg: InferConfig | None = None,
    *,
    on_progress: OnProgress | None = None,
    **overrides,
) -> str:
    """The competition RLE of a slide's mask, encoded strip by strip (no full-size mask).

    Equals ``kit.rle.encode(predict_slide(path, predictor, cfg))``. Memory beyond the model: one
    uint8 column strip (H x strip width), a batch of windows and the RLE itself. ``on_progress``
    as in `predict_slide`.
    """
    cfg = resolve_config(cfg, **overrides)
    with Slide(path) as slide:
        height = slide.shape[0]
    encoder = RleEncoder(height)
    for _, strip in iter_mask_strips(path, predictor, cfg, on_progress=on_progress):
        encoder.add(strip)
    return encoder.finish()


def iter_probability_strips(
    path: str | Path,
    predictor: Predictor,
    cfg: InferConfig | None = None,
    *,
    on_progress: OnProgress | None = None,
    **overrides,
) -> Iterator[tuple[slice, np.ndarray]]:
    """Yield the slide's probabilities column strip by column strip, left to right.

    Each strip is the union of the cores of one column of windows; the strips partition the
    slide's columns. Tiles whose core shows no tissue (``cfg.tissue``, judged on the core
    downscaled by ``cfg.scale``) give zeros and are never predicted. ``on_progress(done,
    total)`` is called with 0 of the plan's tiles first, then before each strip is yielded with
    the tiles of the strips so far (skipped ones count); ``done == total`` with the last.

    Yields:
        (cols, probs): ``cols`` a slice of the slide's columns, ``probs`` float32 (H, width of
        cols) in [0, 1]. A new array each time: the consumer may keep it.
    """
    cfg = resolve_config(cfg, **overrides)
    _check_callables(predictor, on_progress)
    return _iter_strips(Path(path), predictor, cfg, binary=False, on_progress=on_progress)


def iter_mask_strips(
    path: str | Path,
    predictor: Predictor,
    cfg: InferConfig | None = None,
    *,
    on_progress: OnProgress | None = None,
    **overrides,
) -> Iterator[tuple[slice, np.ndarray]]:
    """As `iter_probability_strips`, thresholded: uint8 (H, w) strips of 0/1.

    Cheaper than thresholding the probability strips: the strip is a quarter of the size, and
    windows whose probabilities are all far from the threshold are filled without upsampling.
    """
    cfg = resolve_config(cfg, **overrides)
    _check_callables(predictor, on_progress)
    return _iter_strips(Path(path), predictor, cfg, binary=True, on_progress=on_progress)


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


# ---------------------------------------------------------------------------------------------
# The shared core


def _iter_strips(
    path: Path,
    predictor: Predictor,
    cfg: InferConfig,
    binary: bool,
    on_progress: OnProgress | None = None,
) -> Iterator[tuple[slice, np.ndarray]]:
    """Column strips of probabilities (float32) or, with ``binary``, of the mask (uint8)."""
    with Slide(path) as slide:
        shape = slide.shape
    columns = list(_columns(plan(shape, cfg.window, cfg.overlap, align=cfg.scale)))
    done, total = 0, sum(len(column) for column in columns)
    device = _resolve_device(predictor, cfg.device)
    reader = _read_batches(path, columns, cfg)
    # (tile, probabilities) of the predicted tiles, in plan order: the reader leaves out those
    # without tissue, so a tile that is not the next predicted one was skipped.
    results = _predict_batches(reader, predictor, device, cfg)
    dtype = np.uint8 if binary else np.float32
    try:
        if on_progress is not None:
            on_progress(done, total)
        pending = next(results, None)
        for column in columns:
            cols = column[0].core[1]
            # Fortran order: each column of the strip is contiguous, as column-major RLE reads it.
            strip = np.zeros((shape[0], cols.stop - cols.start), dtype, order="F")
            for tile in column:
                if pending is not None and pending[0] == tile:
                    _merge(strip, pending[1], tile, shape, cfg, binary)
                    pending = next(results, None)
            done += len(column)
            if on_progress is not None:
                on_progress(done, total)
            yield cols, strip
    finally:
        results.close()
        reader.close()


def _columns(tiles: Sequence[Tile]) -> Iterator[list[Tile]]:
    """Group the plan's tiles (ordered column by column) into columns sharing one core span."""
    column: list[Tile] = []
    for tile in tiles:
        if column and (tile.cx0, tile.cx1) != (column[0].cx0, column[0].cx1):
            yield column
            column = []
        column.append(tile)
    if column:
        yield column


def _merge(
    strip: np.ndarray,
    probs: np.ndarray,
    tile: Tile,
    shape: tuple[int, int],
    cfg: InferConfig,
    binary: bool,
) -> None:
    """Write a tile's core into its column strip.

    Args:
        strip: (H, core width) float32 probabilities or uint8 mask, written in place.
        probs: float32 (h, w) low-resolution probabilities of the tile's whole window.
    """
    s = cfg.scale
    # Low-resolution rows/cols the core's pixels interpolate from: the core's span widened by
    # one pixel, and never past the slide (the window may extend beyond it, filled): the slide's
    # edge is then clamped exactly as when the whole slide is upsampled at once.
    c0, c1 = _source_span(
        tile.cx0 - tile.x0, tile.cx1 - tile.x0, min(tile.x1, shape[1]) - tile.x0, s
    )
    valid_h = min(tile.y1, shape[0]) - tile.y0
    # The core within the upsampled piece, whose first column is c0 * s in the window.
    dx, core_w = tile.cx0 - tile.x0 - c0 * s, tile.cx1 - tile.cx0
    # A mask is merged in bands of rows, each widened like the core, so that bands whose
    # probabilities all lie far from the threshold (most of a slide) skip the upsampling.
    band = _MERGE_BAND_ROWS * s if binary else tile.cy1 - tile.cy0
    for y0 in range(tile.cy0, tile.cy1, band):
        y1 = min(y0 + band, tile.cy1)
        r0, r1 = _source_span(y0 - tile.y0, y1 - tile.y0, valid_h, s)
        low = probs[r0:r1, c0:c1]
        rows = slice(y0, y1)
        if binary:
            if low.max() <= cfg.threshold - _SHORTCUT_MARGIN:
                continue  # all 0, as the strip already is
            if low.min() > cfg.threshold + _SHORTCUT_MARGIN:
                strip[rows] = 1
                continue
            if cfg.upsample == "nearest":  # thresholding commutes with nearest: upsample 0/1
                low = (low > cfg.threshold).view(np.uint8)
        dy = y0 - tile.y0 - r0 * s
        up = upsample(low, s, cfg.upsample)[dy : dy + y1 - y0, dx : dx + core_w]
        strip[rows] = up > cfg.threshold if binary and up.dtype != np.uint8 else up


def _source_span(core0: int, core1: int, valid: int, scale: int) -> tuple[int, int]:
    """Low-resolution index range [lo, hi) that full-resolution pixels [core0, core1) need.

    Coordinates are relative to the window; ``valid`` is how many of its pixels are inside the
    slide. Bilinear output pixel y reads source pixels floor((y + 0.5) / s - 0.5) and the next.
    """
    lo = max(core0 // scale - 1, 0)
    hi = min(-(-core1 // scale) + 1, -(-valid // scale))
    return lo, hi


# ---------------------------------------------------------------------------------------------
# Predict


def _predict_batches(
    batches: Iterator[tuple[list[Tile], np.ndarray]],
    predictor: Predictor,
    device: torch.device,
    cfg: InferConfig,
) -> Iterator[tuple[Tile, np.ndarray]]:
    """Per window, in order: (tile, float32 (h, w) probabilities (numpy)).

    Args:
        batches: (tiles, float32 (n, 3, h, w) arrays of their windows, RGB in [0, 1]).
    """
    use_amp = device.type == "cuda" and cfg.amp is not False
    with _eval_mode(predictor):
        for tiles, batch in batches:
            x = torch.from_numpy(batch).to(device, non_blocking=True)
            yield from zip(tiles, _probabilities(predictor, x, cfg.tta, use_amp), strict=True)


def _probabilities(predictor: Predictor, x: torch.Tensor, tta: bool, amp: bool) -> np.ndarray:
    """Sigmoid of the predictor's logits, averaged over flips with ``tta``.

    Args:
        x: float32 (N, 3, h, w) RGB in [0, 1], on the predictor's device.

    Returns:
        float32 (N, h, w), on the CPU: the merge is cheap elementwise work, and torch's
        intra-op threads cost more than they save on it.
    """
    expected = (x.shape[0], 1, *x.shape[2:])
    flips = _FLIPS if tta else _FLIPS[:1]
    total = np.zeros(expected, np.float64)
    for dims in flips:
        # Grad and autocast modes are thread-wide: entered per call, never held across the
        # caller's yield, so the consumer's code runs in its own modes.
        with torch.no_grad(), _autocast(x.device, amp):
            logits = predictor(x.flip(dims) if dims else x)
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != expected:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
            raise ValueError(
                f"the predictor must return logits of shape {expected} for input "
                f"{tuple(x.shape)}, got {got}"
            )
        p = sigmoid(logits.float().cpu().numpy())
        total += np.flip(p, dims) if dims else p
    return (total / len(flips)).astype(np.float32)[:, 0]


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-logits)) in float64: (...) any float -> float64 (...).

    float64 because float32 ``exp``'s vectorised and scalar paths differ by an ulp, and which one
    a pixel takes depends on the array's size and the pixel's place in it; rounded to float32
    once, the float64 result does not, so windows match the whole image bit for bit.
    """
    with np.errstate(over="ignore"):  # exp(-x) = inf for x < -709: the probability is 0
        return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))


def _check_callables(predictor, on_progress) -> None:
    if not callable(predictor):
        raise ValueError(f"predictor must be callable, got {type(predictor).__name__}")
    if on_progress is not None and not callable(on_progress):
        raise ValueError(f"on_progress must be callable or None, got {on_progress!r}")


def _resolve_device(predictor: Predictor, device: str | torch.device | None) -> torch.device:
    """``device``, else the device of the predictor's parameters, else CPU."""
    own = None
    if isinstance(predictor, nn.Module):
        tensor = next(iter(predictor.parameters()), None)
        if tensor is None:
            tensor = next(iter(predictor.buffers()), None)
        own = tensor.device if tensor is not None else None
    if device is None:
        return own or torch.device("cpu")
    device = torch.device(device)
    if own is not None and own.type != device.type:
        raise ValueError(
            f"the predictor's parameters are on {own} but device={device}: move the model "
            "(model.to(device)) or leave device=None"
        )
    return device


def _autocast(device: torch.device, enabled: bool):
    """Mixed precision on CUDA (`kit.device.amp_dtype`: bf16 on Ampere+, fp16 before); a no-op
    elsewhere."""
    dtype = amp_dtype(device, enabled)
    return contextlib.nullcontext() if dtype is None else torch.autocast("cuda", dtype=dtype)


@contextlib.contextmanager
def _eval_mode(predictor: Predictor):
    """Put a module in eval mode for the prediction, restoring its mode afterwards."""
    if not isinstance(predictor, nn.Module) or not predictor.training:
        yield
        return
    predictor.eval()
    try:
        yield
    finally:
        predictor.train()


# ---------------------------------------------------------------------------------------------
# Read


class _Failure:
    """An exception raised in a reader thread, handed to the consumer to re-raise."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def _read_batches(
    path: Path, columns: Sequence[Sequence[Tile]], cfg: InferConfig
) -> Iterator[tuple[list[Tile], np.ndarray]]:
    """Yield (tiles, float32 (n, 3, h, w) windows in [0, 1]) of the tiles to predict, in order.

    With ``cfg.workers`` >= 1 one thread reads ahead into a bounded queue (``cfg.prefetch``
    batches): it opens its own Slide, as rasterio datasets must not be shared between threads.
    Closing this generator stops it.
    """
    if cfg.workers == 0:
        with Slide(path) as slide:
            yield from _batches(slide, columns, cfg)
        return
    stop = threading.Event()
    items: queue.Queue = queue.Queue(maxsize=cfg.prefetch)
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work() -> None:
        try:
            with Slide(path) as slide:
                for batch in _batches(slide, columns, cfg):
                    if not put(batch):
                        return
            put(done)
        except BaseException as e:  # handed to the consumer, which re-raises it
            put(_Failure(e))

    thread = threading.Thread(target=work, name="kit-read-0", daemon=True)
    thread.start()
    try:
        while (item := items.get()) is not done:
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


def _batches(
    slide: Slide, columns: Sequence[Sequence[Tile]], cfg: InferConfig
) -> Iterator[tuple[list[Tile], np.ndarray]]:
    """Batches of up to ``cfg.batch_size`` tiles to predict and their windows, in plan order.

    Each window is converted to float as soon as it is read (here, in the reader thread, off
    the predictor's): `_windows` reuses its buffer for the next column of windows.
    """
    tiles: list[Tile] = []
    batch = None
    for tile, window in _windows(slide, columns, cfg):
        if batch is None:
            batch = np.empty((cfg.batch_size, *window.shape), np.float32)
        np.divide(window, np.float32(255), out=batch[len(tiles)])
        tiles.append(tile)
        if len(tiles) == cfg.batch_size:
            yield tiles, batch
            tiles, batch = [], None
    if tiles:
        yield tiles, batch[: len(tiles)]


def _windows(
    slide: Slide, columns: Sequence[Sequence[Tile]], cfg: InferConfig
) -> Iterator[tuple[Tile, np.ndarray]]:
    """(tile, uint8 (3, h, w) window downscaled by ``cfg.scale``) per tile to predict, in order.

    The slide is read once, left to right, into one buffer of downscaled columns (the band):
    window starts are multiples of the scale, so a window's block means are a slice of the
    band's. The columns the next column of windows shares with this one (the overlap) are kept
    (shifted left), and reads end on the file's block edges where the scale allows (the band
    then runs a little ahead), so no block is decoded twice and GDAL's block cache is not relied
    on. A window is a view of the buffer: valid until the next one is asked for.
    """
    s = cfg.scale
    height, width = slide.shape
    block_h, block_w = slide.block_shape
    unit_x, unit_y = _read_unit(block_w, width, s), _read_unit(block_h, height, s)
    band = None  # uint8 (3, rows / s, capacity): downscaled slide columns [band_x0, band_x1)
    band_x0 = band_x1 = 0
    for column in columns:
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
            _read_band(slide, band_x1, stop, s, unit_y, out)
            band_x1 = stop
        low = band[:, :, : (x1 - x0) // s]
        keep = _tissue(low, column, cfg) if cfg.tissue else [True] * len(column)
        for tile, k in zip(column, keep, strict=True):
            if k:
                yield tile, low[:, tile.y0 // s : tile.y1 // s]


def _read_unit(block: int, n: int, scale: int) -> int:
    """What reads along an axis are aligned to: a multiple of the scale, and of the file's
    block side where that stays small, else the scale alone (e.g. strips spanning the axis)."""
    unit = math.lcm(block, scale)
    return unit if block < n and unit <= 4096 else scale


def _read_band(slide: Slide, x0: int, x1: int, scale: int, unit: int, out: np.ndarray) -> None:
    """Read slide cols [x0, x1), rows [0, out.shape[1] * scale) (``fill`` past the slide),
    downscaled into ``out`` (uint8 (3, rows / scale, (x1 - x0) / scale)), a bounded number of
    pixels (rows a multiple of ``unit``) at a time."""
    rows = out.shape[1] * scale
    step = unit * max(1, _READ_CHUNK_PIXELS // ((x1 - x0) * unit))
    for y in range(0, rows, step):
        part = slide._read_planes(slice(y, min(y + step, rows)), slice(x0, x1), scale)
        out[:, y // scale : y // scale + part.shape[1]] = part


def _tissue(band: np.ndarray, column: Sequence[Tile], cfg: InferConfig) -> list[bool]:
    """Per tile of a column: whether its core shows tissue (`kit.tiling.has_tissue`).

    Args:
        band: uint8 (3, h, w) the column's windows downscaled by ``cfg.scale``, from slide
            row 0 and column ``column[0].x0``.
    """
    fraction = tissue_fraction(
        column,
        band.transpose(1, 2, 0),
        cfg.scale,
        saturation=cfg.tissue_saturation,
        origin=(0, column[0].x0),
    )
    return has_tissue(fraction, cfg.min_tissue).tolist()
