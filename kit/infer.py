"""Whole-slide prediction in bounded memory: plan, predict, merge, one column strip at a time.

    mask = predict_slide("test/aa05346ff.tiff", model)                 # uint8 (H, W)
    rle = predict_slide_rle(path, model, InferConfig(tta=True))        # never holds (H, W)
    for cols, probs in iter_probability_strips(path, model, scale=2):  # float32 (H, w) strips
        ...

Plan: `kit.tiling.plan` lays windows of ``window`` px overlapping by at least ``overlap`` px,
starts aligned to ``scale``, ordered column strip by column strip. Tiles whose core shows no
tissue (judged on a thumbnail) are predicted 0 and never read. Predict: a reader thread with its
own `Slide` fills a bounded queue with batches of windows downscaled by ``scale`` while the
predictor runs: any callable taking float (N, 3, h, w) RGB in [0, 1] and returning logits
(N, 1, h, w), e.g. a model from `kit.model`. Merge: each window's probabilities are upsampled
back to full resolution and only its core is kept. Cores partition the slide, so every pixel
comes from exactly one window and nothing is accumulated; a column strip (the cores of one column
of windows) is handed on as soon as its windows are done. Memory is O(H x strip width).

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

from kit.rle import RleEncoder
from kit.slides import Slide
from kit.tiling import Tile, plan, tissue_fraction, tissue_mask

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


@dataclass
class InferConfig:
    """How a slide is tiled, predicted and merged (one config for predict, submit, evaluate)."""

    window: int = 1024  # side of the full-resolution window read from the slide (px)
    overlap: int = 256  # least overlap between neighbouring windows (px); cores meet mid-overlap
    scale: int = 4  # downscale factor: the predictor sees windows of window // scale px
    threshold: float = 0.5  # mask = probability > threshold (strict)
    tta: bool = False  # average probabilities over identity, hflip, vflip and hvflip
    upsample: str = "bilinear"  # back to full resolution: "bilinear" (align_corners=False) or
    # "nearest" (each low-resolution pixel becomes a scale x scale block)
    batch_size: int = 8  # windows per predictor call (per flip with tta)
    tissue: bool = True  # skip tiles whose core shows no tissue: 0, never read nor predicted
    tissue_saturation: int = 40  # HSV saturation (0..255) above which a thumbnail pixel is tissue
    min_tissue: float = 0.001  # tiles whose core's tissue fraction is <= this are skipped
    tissue_scale: int | None = None  # thumbnail downscale for tissue detection; None: window // 16
    device: str | torch.device | None = None  # None: where the predictor's parameters are, or CPU
    amp: bool | None = None  # CUDA autocast, bf16 where supported else fp16; None: on for CUDA
    # (never used on other devices)
    workers: int = 1  # reader threads, each with its own Slide; 0 reads in the calling thread
    prefetch: int = 4  # batches read ahead of the predictor (bounds the queue's memory)

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
        if self.tissue_scale is not None:
            _check_int(self, "tissue_scale", low=1)

    @property
    def thumb_scale(self) -> int:
        """The thumbnail downscale used for tissue detection (about 16 x 16 pixels per window)."""
        return self.tissue_scale or max(1, self.window // 16)


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

    Takes ``window``, ``scale``, ``overlap``, ``threshold`` and ``tta`` from the checkpoint's
    ``config`` (missing ones keep `InferConfig`'s defaults), then applies ``overrides``; an
    override of None is ignored, so command-line options can be passed through as they are.
    """
    trained = checkpoint.get("config") or {}
    names = ("window", "scale", "overlap", "threshold", "tta")
    base = {name: trained[name] for name in names if trained.get(name) is not None}
    given = {name: value for name, value in overrides.items() if value is not None}
    return resolve_config(InferConfig(**base), **given)


# ---------------------------------------------------------------------------------------------
# Public entry points


def predict_slide(
    path: str | Path, predictor: Predictor, cfg: InferConfig | None = None, **overrides
) -> np.ndarray:
    """Binary mask of a whole slide.

    Args:
        path: the slide's TIFF.
        predictor: float (N, 3, h, w) RGB in [0, 1] -> logits (N, 1, h, w).
        cfg: an `InferConfig`; ``overrides`` replace its fields (``scale=2, tta=True``).

    Returns:
        uint8 (H, W) of 0/1: probability > ``cfg.threshold``.
    """
    cfg = resolve_config(cfg, **overrides)
    with Slide(path) as slide:
        height, width = slide.shape
    mask = np.zeros((height, width), np.uint8)
    for cols, strip in iter_mask_strips(path, predictor, cfg):
        mask[:, cols] = strip
    return mask


def predict_slide_rle(
    path: str | Path, predictor: Predictor, cfg: InferConfig | None = None, **overrides
) -> str:
    """The competition RLE of a slide's mask, encoded strip by strip (no full-size mask).

    Equals ``kit.rle.encode(predict_slide(path, predictor, cfg))``. Memory beyond the model: one
    uint8 column strip (H x strip width), a batch of windows and the RLE itself.
    """
    cfg = resolve_config(cfg, **overrides)
    with Slide(path) as slide:
        height = slide.shape[0]
    encoder = RleEncoder(height)
    for _, strip in iter_mask_strips(path, predictor, cfg):
        encoder.add(strip)
    return encoder.finish()


def iter_probability_strips(
    path: str | Path, predictor: Predictor, cfg: InferConfig | None = None, **overrides
) -> Iterator[tuple[slice, np.ndarray]]:
    """Yield the slide's probabilities column strip by column strip, left to right.

    Each strip is the union of the cores of one column of windows; the strips partition the
    slide's columns. Tiles whose core shows no tissue (``cfg.tissue``) give zeros and are never
    read nor predicted.

    Yields:
        (cols, probs): ``cols`` a slice of the slide's columns, ``probs`` float32 (H, width of
        cols) in [0, 1]. A new array each time: the consumer may keep it.
    """
    cfg = resolve_config(cfg, **overrides)
    _check_predictor(predictor)
    return _iter_strips(Path(path), predictor, cfg, binary=False)


def iter_mask_strips(
    path: str | Path, predictor: Predictor, cfg: InferConfig | None = None, **overrides
) -> Iterator[tuple[slice, np.ndarray]]:
    """As `iter_probability_strips`, thresholded: uint8 (H, w) strips of 0/1.

    Cheaper than thresholding the probability strips: the strip is a quarter of the size, and
    windows whose probabilities are all far from the threshold are filled without upsampling.
    """
    cfg = resolve_config(cfg, **overrides)
    _check_predictor(predictor)
    return _iter_strips(Path(path), predictor, cfg, binary=True)


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
    path: Path, predictor: Predictor, cfg: InferConfig, binary: bool
) -> Iterator[tuple[slice, np.ndarray]]:
    """Column strips of probabilities (float32) or, with ``binary``, of the mask (uint8)."""
    with Slide(path) as slide:
        shape = slide.shape
        tiles = plan(shape, cfg.window, cfg.overlap, align=cfg.scale)
        keep = _tissue_tiles(slide, tiles, cfg)
    device = _resolve_device(predictor, cfg.device)
    todo = [t for t, k in zip(tiles, keep, strict=True) if k]
    batches = [todo[i : i + cfg.batch_size] for i in range(0, len(todo), cfg.batch_size)]
    reader = _read_batches(path, batches, cfg.scale, cfg.workers, cfg.prefetch)
    results = _predict_batches(reader, predictor, device, cfg)
    dtype = np.uint8 if binary else np.float32
    try:
        for column in _columns(tiles, keep):
            cols = column[0][0].core[1]
            # Fortran order: each column of the strip is contiguous, as column-major RLE reads it.
            strip = np.zeros((shape[0], cols.stop - cols.start), dtype, order="F")
            for tile, predicted in column:
                if predicted:
                    _merge(strip, next(results), tile, shape, cfg, binary)
            yield cols, strip
    finally:
        results.close()
        reader.close()


def _tissue_tiles(slide: Slide, tiles: Sequence[Tile], cfg: InferConfig) -> list[bool]:
    """Per tile: whether it is predicted (its core shows tissue, or tissue detection is off).

    A tile supplies only its core, so tissue in the rest of its window (context) does not
    count: that tissue lies in a neighbour's core, and the neighbour predicts it.
    """
    if not cfg.tissue:
        return [True] * len(tiles)
    thumb = slide.thumbnail(cfg.thumb_scale)
    mask = tissue_mask(thumb, saturation=cfg.tissue_saturation)
    cores = [dataclasses.replace(t, y0=t.cy0, x0=t.cx0, y1=t.cy1, x1=t.cx1) for t in tiles]
    fraction = tissue_fraction(cores, mask, cfg.thumb_scale)
    return [bool(f > cfg.min_tissue) for f in fraction]


def _columns(tiles: Sequence[Tile], keep: Sequence[bool]) -> Iterator[list[tuple[Tile, bool]]]:
    """Group the plan's tiles (ordered column by column) into columns sharing one core span."""
    column: list[tuple[Tile, bool]] = []
    for tile, k in zip(tiles, keep, strict=True):
        if column and (tile.cx0, tile.cx1) != (column[0][0].cx0, column[0][0].cx1):
            yield column
            column = []
        column.append((tile, k))
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
    batches: Iterator[np.ndarray], predictor: Predictor, device: torch.device, cfg: InferConfig
) -> Iterator[np.ndarray]:
    """Per window, in order: float32 (h, w) probabilities (numpy).

    Args:
        batches: float32 (n, 3, h, w) arrays of windows, RGB in [0, 1].
    """
    use_amp = device.type == "cuda" and cfg.amp is not False
    with _eval_mode(predictor):
        for batch in batches:
            x = torch.from_numpy(batch).to(device, non_blocking=True)
            yield from _probabilities(predictor, x, cfg.tta, use_amp)


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


def _check_predictor(predictor) -> None:
    if not callable(predictor):
        raise ValueError(f"predictor must be callable, got {type(predictor).__name__}")


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
    """Mixed precision on CUDA (bf16 where supported, else fp16); a no-op elsewhere."""
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device.type, dtype=dtype)


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


def _read_batch(slide: Slide, tiles: Sequence[Tile], scale: int) -> np.ndarray:
    """float32 (n, 3, h, w) RGB in [0, 1]: the tiles' windows downscaled by ``scale``.

    The conversion happens here, in the reader thread, off the predictor's thread.
    """
    # Planes (3, h, w), as GDAL decodes them and the predictor takes them: `Slide.read`'s
    # (h, w, 3) would cost two transposing copies per window.
    first = slide._read_planes(*tiles[0].window, scale=scale)
    batch = np.empty((len(tiles), *first.shape), np.float32)
    for k, tile in enumerate(tiles):
        window = first if k == 0 else slide._read_planes(*tile.window, scale=scale)
        np.divide(window, np.float32(255), out=batch[k])
    return batch


def _read_batches(
    path: Path, batches: Sequence[Sequence[Tile]], scale: int, workers: int, prefetch: int
) -> Iterator[np.ndarray]:
    """Yield the batches' windows in order, read ahead by ``workers`` threads.

    Worker k reads batches k, k + workers, ... into its own bounded queue (so at most about
    ``prefetch`` batches wait in memory) and the consumer takes them round robin. Each worker
    opens its own Slide: rasterio datasets must not be shared between threads. Closing this
    generator stops the workers.
    """
    if not batches:
        return
    if workers == 0:
        with Slide(path) as slide:
            for tiles in batches:
                yield _read_batch(slide, tiles, scale)
        return
    workers = min(workers, len(batches))
    stop = threading.Event()
    queues = [queue.Queue(maxsize=max(1, math.ceil(prefetch / workers))) for _ in range(workers)]

    def put(q: queue.Queue, item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work(k: int) -> None:
        try:
            with Slide(path) as slide:
                for b in range(k, len(batches), workers):
                    if not put(queues[k], _read_batch(slide, batches[b], scale)):
                        return
        except BaseException as e:  # handed to the consumer, which re-raises it
            put(queues[k], _Failure(e))

    threads = [
        threading.Thread(target=work, args=(k,), name=f"kit-read-{k}", daemon=True)
        for k in range(workers)
    ]
    for t in threads:
        t.start()
    try:
        for b in range(len(batches)):
            item = queues[b % workers].get()
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        for t in threads:
            t.join()
