"""Whole-slide prediction in bounded memory: a splitter, a predictor and a merger.

    mask = predict_slide("test/aa05346ff.tiff", model)                 # uint8 (H, W)
    rle = predict_slide_rle(path, model, InferConfig(tta=True))        # never holds (H, W)
    for cols, probs in iter_probability_strips(path, model, scale=2):  # float32 (H, w) strips
        ...
    predict_slide_rle(path, model, on_progress=print)  # (tiles done, tiles in the plan)

Three objects, each readable alone, wired by `iter_probability_strips` / `iter_mask_strips`:

- the splitter (`kit.windows.Splitter`) decodes the open slide once, column strip by column
  strip, and yields batches of windows downscaled by ``scale`` (uint8), leaving out tiles whose
  core shows no tissue; `kit.windows.read_ahead` runs it in a thread, a bounded queue ahead, and
  the predictor in another, so neither the reader nor the merge keeps the predictor waiting;
- the predictor: any callable taking float (N, 3, h, w) RGB in [0, 1] and returning logits
  (N, 1, h, w), e.g. a model from `kit.model`; `Probabilities` wraps it into uint8 windows ->
  float32 probabilities (device upload, AMP, flip TTA as one batch, sigmoid);
- the merger (`kit.merge.StripMerger`) upsamples each window's probabilities back to full
  resolution, keeps only its core (cores partition the slide: nothing is accumulated) and hands
  on each column strip as soon as it is complete, as probabilities or thresholded to a mask.

The sinks consume the strips: `predict_slide` (a full mask), `predict_slide_rle` (the streamed
RLE, `kit.rle.RleEncoder`), `kit.evaluate` (a threshold sweep against the truth). Memory is
O(H x strip width). Each entry point takes a path or an open `kit.slides.Slide` (opened once).

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
pixel gets depends on the tensor's size) and `kit.merge.upsample` is made of elementwise operations.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kit.competition import Polygon
from kit.config import option
from kit.device import amp_dtype, channels_last, tune_convolutions
from kit.merge import UPSAMPLE_MODES, StripMerger, upsample
from kit.polygons import rasterize
from kit.rle import RleEncoder
from kit.slides import Slide, downscale
from kit.stain import METHODS as STAIN_METHODS
from kit.stain import as_stats, normaliser, slide_stats, stats_list
from kit.tiling import MIN_TISSUE, TISSUE_SATURATION
from kit.windows import Splitter, read_ahead

__all__ = [
    "Ensemble",
    "InferConfig",
    "Member",
    "Probabilities",
    "config_from_checkpoint",
    "iter_mask_strips",
    "iter_probability_strips",
    "predict_slide",
    "predict_slide_rle",
    "resolve_config",
    "sigmoid",
    "slide_normaliser",
]

Predictor = Callable[[torch.Tensor], torch.Tensor]
# Called with (tiles done, tiles in the plan): once with 0, then after each column strip.
OnProgress = Callable[[int, int], None]
# A slide's TIFF, or a Slide already open (not closed by the callee).
SlideSource = str | Path | Slide

# Flip TTA: the dims flipped for each view of a batch (N, 3, h, w).
_FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))


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
    # fcn_resnet50 (the `full` preset) on 256 px windows holds at most ~29 MB of activations
    # per window in float32 without gradients (measured on the CPU, batch 1 and 4: linear), half
    # that under fp16 autocast. 16 windows with TTA (64 through the model) then need ~1.8 GB
    # above the ~100 MB of weights even in float32: a margin on a 16 GB T4 even while a training
    # run holds its own memory (validation), and enough to keep the GPU busy. Not yet timed on a
    # T4: bench/gpu.py (b) measures 8, 16 and 32 end to end (and the model alone up to 64).
    batch_size: int = option(16, "windows per batch (with tta the predictor sees 4x as many)")
    tissue: bool = option(True, "tiles whose core shows no tissue are 0, never predicted")
    # The 2nd place's post-processing; the polygons come from the competition folder
    # (kit.submit / kit.evaluate ask kit.competition), a slide without them is left as it is.
    cortex_only: bool = option(False, "zero predictions outside the slide's Cortex polygons")
    tissue_saturation: int = option(TISSUE_SATURATION, "HSV saturation (0..255) of tissue")
    # As DataConfig.min_tissue, whose "tissue" negatives are the tiles inference predicts.
    min_tissue: float = option(MIN_TISSUE, "tiles whose core's tissue fraction is <= this skip")
    device: str | torch.device | None = option(None, "cpu, cuda ... (default: the predictor's)")
    amp: bool | None = option(None, "CUDA autocast (bf16 on Ampere+, else fp16); default: on CUDA")
    # NHWC lets fp16/bf16 convolutions use the tensor cores with no layout change per layer.
    channels_last: bool | None = option(
        None, "feed the predictor channels_last windows (default: on CUDA only)"
    )
    # workers: 0 reads in the calling thread, otherwise one reader thread with its own Slide
    # (strips are decoded in order, each column once; GDAL decodes with GDAL_THREADS).
    workers: int = option(1, "slide reader threads (0: read in the calling thread)")
    prefetch: int = option(4, "batches read ahead of the predictor (bounds the queue's memory)")
    # Per-slide stain normalisation (kit.stain), as the model was trained: each slide's
    # statistics are estimated from its thumbnail when it is opened and mapped onto
    # stain_target, the training slides' mean (kit.train.fit sets it; checkpoints carry it).
    stain_norm: str = option("none", "per-slide stain normalisation: none or reinhard")
    stain_target: list[float] | None = option(None, "LAB means and stds the slides are mapped to")

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
        if self.stain_norm not in STAIN_METHODS:
            raise ValueError(f"stain_norm must be one of {STAIN_METHODS}, got {self.stain_norm!r}")
        if self.stain_target is not None:  # plain floats: configs are saved as JSON
            self.stain_target = stats_list(as_stats(self.stain_target, "stain_target"))


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

    Takes ``window``, ``scale``, ``overlap``, ``threshold``, ``tta``, ``cortex_only``,
    ``min_tissue`` (the tissue rule its negatives were chosen by), ``batch_size``, ``stain_norm``
    and ``stain_target`` (the stain statistics its slides were mapped to) from the checkpoint's
    ``config``: its ``infer`` section (kit.train.TrainConfig), or the flat fields of checkpoints
    written before it had sections (``infer_batch_size`` there). Missing ones keep
    `InferConfig`'s defaults; then ``overrides`` apply, an override of None ignored, so
    command-line options can be passed through as they are.
    """
    trained = checkpoint.get("config") or {}
    if "infer" not in trained and "infer_batch_size" in trained:
        trained = {**trained, "batch_size": trained["infer_batch_size"]}
    trained = trained.get("infer", trained)  # flat: the overlap, threshold... of inference
    names = ("window", "scale", "overlap", "threshold", "tta", "min_tissue", "cortex_only")
    names += ("batch_size", "stain_norm", "stain_target")
    base = {name: trained[name] for name in names if trained.get(name) is not None}
    given = {name: value for name, value in overrides.items() if value is not None}
    return resolve_config(InferConfig(**base), **given)


# ---------------------------------------------------------------------------------------------
# Entry points: the sinks


def predict_slide(
    source: SlideSource,
    predictor: Predictor,
    cfg: InferConfig | None = None,
    *,
    on_progress: OnProgress | None = None,
    keep: Sequence[Polygon] | None = None,
    **overrides,
) -> np.ndarray:
    """Binary mask of a whole slide.

    Args:
        source: the slide's TIFF, or an open `Slide`.
        predictor: float (N, 3, h, w) RGB in [0, 1] -> logits (N, 1, h, w).
        cfg: an `InferConfig`; ``overrides`` replace its fields (``scale=2, tta=True``).
        on_progress: called with (tiles done, tiles in the plan), tiles skipped as
            tissue-free counting as done: with 0 first, then after each column strip.
        keep: polygons (`kit.polygons.rasterize` input, e.g. the Cortex regions) outside which
            every prediction is 0; applied strip by strip (no full-size mask). None: keep all.

    Returns:
        uint8 (H, W) of 0/1: probability > ``cfg.threshold``.
    """
    cfg = resolve_config(cfg, **overrides)
    with _opened(source) as slide:
        mask = np.zeros(slide.shape, np.uint8)
        for cols, strip in iter_mask_strips(
            slide, predictor, cfg, on_progress=on_progress, keep=keep
        ):
            mask[:, cols] = strip
    return mask


def predict_slide_rle(
    source: SlideSource,
    predictor: Predictor,
    cfg: InferConfig | None = None,
    *,
    on_progress: OnProgress | None = None,
    keep: Sequence[Polygon] | None = None,
    **overrides,
) -> str:
    """The competition RLE of a slide's mask, encoded strip by strip (no full-size mask).

    Equals ``kit.rle.encode(predict_slide(source, predictor, cfg))``. Memory beyond the model:
    one uint8 column strip (H x strip width), a few batches of windows and the RLE itself.
    Arguments as in `predict_slide`.
    """
    cfg = resolve_config(cfg, **overrides)
    with _opened(source) as slide:
        encoder = RleEncoder(slide.shape[0])
        for _, strip in iter_mask_strips(slide, predictor, cfg, on_progress=on_progress, keep=keep):
            encoder.add(strip)
    return encoder.finish()


def iter_probability_strips(
    source: SlideSource,
    predictor: Predictor,
    cfg: InferConfig | None = None,
    *,
    on_progress: OnProgress | None = None,
    keep: Sequence[Polygon] | None = None,
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
    return _strips(source, predictor, cfg, None, on_progress, keep)


def iter_mask_strips(
    source: SlideSource,
    predictor: Predictor,
    cfg: InferConfig | None = None,
    *,
    on_progress: OnProgress | None = None,
    keep: Sequence[Polygon] | None = None,
    **overrides,
) -> Iterator[tuple[slice, np.ndarray]]:
    """As `iter_probability_strips`, thresholded: uint8 (H, w) strips of 0/1.

    Cheaper than thresholding the probability strips: the strip is a quarter of the size, and
    windows whose probabilities are all far from the threshold are filled without upsampling.
    """
    cfg = resolve_config(cfg, **overrides)
    _check_callables(predictor, on_progress)
    return _strips(source, predictor, cfg, cfg.threshold, on_progress, keep)


def _strips(
    source: SlideSource,
    predictor: Predictor,
    cfg: InferConfig,
    threshold: float | None,
    on_progress: OnProgress | None,
    keep: Sequence[Polygon] | None = None,
) -> Iterator[tuple[slice, np.ndarray]]:
    """Splitter -> predictor -> merger: strips of probabilities, or of the mask (threshold),
    zeroed outside ``keep``."""
    align = cfg.scale
    if isinstance(predictor, Ensemble):  # windows come at the finest member's scale
        cfg, align = dataclasses.replace(cfg, scale=predictor.scale), predictor.align
        if cfg.window % align:
            raise ValueError(f"window {cfg.window} is not a multiple of member scale {align}")
    step = Probabilities(
        predictor, device=cfg.device, tta=cfg.tta, amp=cfg.amp, channels_last=cfg.channels_last
    )
    with _opened(source) as slide, _eval_mode(predictor):
        splitter = Splitter(
            slide,
            cfg.window,
            cfg.overlap,
            cfg.scale,
            cfg.batch_size,
            align=align,
            tissue=cfg.tissue,
            tissue_saturation=cfg.tissue_saturation,
            min_tissue=cfg.min_tissue,
            normalise=slide_normaliser(slide, cfg),
        )
        merger = StripMerger(splitter.columns, slide.shape, cfg.scale, cfg.upsample, threshold)
        # Three stages, each in its own thread with workers: reading, the predictor (which
        # then never waits for a merge), and merging into strips in the caller's thread.
        depth = cfg.prefetch if cfg.workers else 0
        batches = read_ahead(splitter, depth)
        predicted = read_ahead(((tiles, step(windows)) for tiles, windows in batches), depth)
        try:
            if on_progress is not None:
                on_progress(merger.done, merger.total)
            for tiles, probs in predicted:
                for tile, p in zip(tiles, probs, strict=True):
                    for strip in merger.add(tile, p):
                        yield _reported(_kept(strip, keep, slide.shape), merger, on_progress)
            for strip in merger.finish():
                yield _reported(_kept(strip, keep, slide.shape), merger, on_progress)
        finally:  # stop the threads (predictor first) before the slide closes
            predicted.close()
            batches.close()


def slide_normaliser(slide: Slide, cfg: InferConfig):
    """The stain mapping of an open slide under ``cfg`` (`kit.stain.normaliser`), or None.

    With ``cfg.stain_norm`` the slide's statistics come from its thumbnail (a decode of the
    whole slide, unless it has overviews), by the tissue rule of ``cfg``, as for training.
    """
    if cfg.stain_norm == "none":
        return None
    stats = slide_stats(slide, cfg.tissue_saturation)
    return normaliser(stats, cfg.stain_target, cfg.stain_norm)


def _kept(strip, keep: Sequence[Polygon] | None, shape: tuple[int, int]):
    """The strip zeroed outside the ``keep`` polygons (rasterised for its columns only)."""
    if keep is not None:
        cols, values = strip
        values *= rasterize(keep, shape, cols).astype(values.dtype, copy=False)
    return strip


def _reported(strip, merger: StripMerger, on_progress: OnProgress | None):
    if on_progress is not None:
        on_progress(merger.done, merger.total)
    return strip


@contextlib.contextmanager
def _opened(source: SlideSource) -> Iterator[Slide]:
    """The open slide: ``source`` itself, or the TIFF it names, opened and closed here."""
    if isinstance(source, Slide):
        yield source
        return
    with Slide(source) as slide:
        yield slide


# ---------------------------------------------------------------------------------------------
# The predictor


@dataclass(frozen=True)
class Member:
    """One model of an `Ensemble`: its predictor, the scale it sees windows at, its weight."""

    predictor: Predictor  # float (N, 3, h, w) RGB in [0, 1] -> logits (N, 1, h, w)
    scale: int  # the downscale factor it was trained at
    weight: float = 1.0


class Ensemble:
    """Several predictors as one: the weighted mean of their probabilities, thresholded once.

    Each member sees the window at its own scale (block means of the finest member's pixels)
    and its probabilities are upsampled (bilinear) to the finest scale, where they are averaged;
    the merger takes them to full resolution from there. Members may be different architectures
    and scales; flip TTA applies to each member. An ensemble of one member predicts exactly what
    that member does alone.

    Args:
        members: the `Member` s; scales must all divide the largest one.
        fingerprint: identifies the members' weights (resuming a submission); see
            `kit.ensemble.load_ensemble`, which sets it.

    Attributes:
        scale: the finest member's scale: windows are read at it (it replaces ``cfg.scale``).
        align: window starts are multiples of it (the largest member scale), so every member's
            blocks line up with the whole slide's.
    """

    def __init__(self, members: Sequence[Member], fingerprint: str | None = None) -> None:
        members = tuple(members)
        if not members or not all(isinstance(m, Member) for m in members):
            raise ValueError(f"an ensemble needs one or more Member, got {members!r}")
        for m in members:
            if not callable(m.predictor):
                raise ValueError(f"member predictor must be callable, got {m.predictor!r}")
            if isinstance(m.scale, bool) or not isinstance(m.scale, int) or m.scale < 1:
                raise ValueError(f"member scale must be an integer >= 1, got {m.scale!r}")
            if not (
                isinstance(m.weight, (int, float)) and math.isfinite(m.weight) and m.weight > 0
            ):
                raise ValueError(f"member weight must be a finite number > 0, got {m.weight!r}")
        self.members = members
        self.scale = min(m.scale for m in members)
        self.align = max(m.scale for m in members)
        if any(self.align % m.scale for m in members):
            scales = sorted({m.scale for m in members})
            raise ValueError(f"member scales {scales} must all divide the largest, {self.align}")
        self.fingerprint = fingerprint

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{type(m.predictor).__name__}@{m.scale}x{m.weight:g}" for m in self.members
        )
        return f"Ensemble({parts})"


class Probabilities:
    """The predictor step: uint8 windows -> float32 probabilities, on the predictors' devices.

    Args:
        predictor: float (N, 3, h, w) RGB in [0, 1] -> logits (N, 1, h, w); or an `Ensemble`.
        device: where the windows go; None: each predictor's parameters' device, else the CPU.
        tta: average the probabilities over identity, hflip, vflip and hvflip (un-flipped). The
            four views go through a predictor as one batch of 4N.
        amp: CUDA autocast (`kit.device.amp_dtype`); None: on when the device is CUDA.
        channels_last: the windows go to the predictor in the channels_last memory format
            (`kit.device.channels_last`; None: on CUDA only). A module's convolutions then run
            in it: cuDNN converts the weights itself, or `kit.ensemble.load_predictor` has.

    On CUDA, cuDNN picks its fastest algorithms for the window size once
    (`kit.device.tune_convolutions`): every batch but a slide's last has one shape.

    Windows travel as uint8 (a quarter of float32's bytes; pinned on CUDA, so the copy is
    asynchronous) and become float on the device. The logits come back in one copy per batch
    and member; the sigmoid and the means run on the CPU in float64 (see the module's
    exactness note), rounded to float32 once.
    """

    def __init__(
        self,
        predictor: Predictor | Ensemble,
        device: str | torch.device | None = None,
        tta: bool = False,
        amp: bool | None = None,
        channels_last: bool | None = None,
    ) -> None:
        ensemble = (
            predictor if isinstance(predictor, Ensemble) else Ensemble([Member(predictor, 1)])
        )
        total = sum(m.weight for m in ensemble.members)
        # (predictor, its device, factor below the finest scale, normalised weight)
        self.members = [
            (m.predictor, _resolve_device(m.predictor, device), m.scale // ensemble.scale,
             m.weight / total)
            for m in ensemble.members
        ]  # fmt: skip
        self.flips = _FLIPS if tta else _FLIPS[:1]
        self.amp = amp
        self.channels_last = channels_last
        for _, member_device, _, _ in self.members:
            tune_convolutions(member_device)

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        """uint8 (N, 3, h, w) RGB -> float32 (N, h, w) probabilities."""
        if len(self.members) == 1 and self.members[0][2] == 1:
            return self._member(*self.members[0][:2], windows).astype(np.float32)
        total = np.zeros((windows.shape[0], *windows.shape[2:]), np.float64)
        for predictor, device, factor, weight in self.members:
            seen = windows if factor == 1 else _downscale_batch(windows, factor)
            p = self._member(predictor, device, seen).astype(np.float32)
            # float64 products: a Python float times a float32 array stays float32 in numpy 2
            total += np.float64(weight) * (p if factor == 1 else upsample(p, factor))
        return total.astype(np.float32)

    def _member(self, predictor: Predictor, device: torch.device, windows) -> np.ndarray:
        """One predictor's probabilities of uint8 windows: float64 (N, h, w), flips averaged."""
        x = torch.from_numpy(windows)
        if device.type == "cuda":
            x = x.pin_memory()
        x = x.to(device, non_blocking=True).float().div_(255)
        views = (
            torch.cat([x.flip(dims) if dims else x for dims in self.flips]) if self.flips[1:] else x
        )
        if channels_last(device, self.channels_last):
            views = views.contiguous(memory_format=torch.channels_last)
        amp = device.type == "cuda" and self.amp is not False
        # Grad and autocast modes are thread-wide: entered per call, never held across the
        # caller's yield, so the consumer's code runs in its own modes.
        with torch.no_grad(), _autocast(device, amp):
            logits = predictor(views)
        expected = (views.shape[0], 1, *views.shape[2:])
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != expected:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
            raise ValueError(
                f"the predictor must return logits of shape {expected} for input "
                f"{tuple(views.shape)}, got {got}"
            )
        p = sigmoid(logits.float().cpu().numpy())
        if len(self.flips) == 1:
            return p[:, 0]
        n = len(windows)
        total = np.zeros((n, 1, *p.shape[2:]), np.float64)
        for k, dims in enumerate(self.flips):
            view = p[k * n : (k + 1) * n]
            total += np.flip(view, dims) if dims else view
        return (total / len(self.flips))[:, 0]


def _downscale_batch(windows: np.ndarray, factor: int) -> np.ndarray:
    """uint8 (N, 3, h, w) -> (N, 3, h / factor, w / factor) block means (`kit.slides.downscale`)."""
    return np.stack([downscale(w.transpose(1, 2, 0), factor).transpose(2, 0, 1) for w in windows])


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-logits)) in float64: (...) any float -> float64 (...).

    float64 because float32 ``exp``'s vectorised and scalar paths differ by an ulp, and which one
    a pixel takes depends on the array's size and the pixel's place in it; rounded to float32
    once, the float64 result does not, so windows match the whole image bit for bit.
    """
    x = np.negative(logits, dtype=np.float64)  # the same operations as 1 / (1 + exp(-x)),
    with np.errstate(over="ignore"):  # in place; exp(-x) = inf for x < -709: probability 0
        np.exp(x, out=x)
    x += 1.0
    return np.reciprocal(x, out=x)


def _check_callables(predictor, on_progress) -> None:
    if not callable(predictor) and not isinstance(predictor, Ensemble):
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
def _eval_mode(predictor: Predictor | Ensemble):
    """Put modules (an ensemble's too) in eval mode for the prediction, restoring their modes."""
    members = predictor.members if isinstance(predictor, Ensemble) else [Member(predictor, 1)]
    training = [
        m.predictor for m in members if isinstance(m.predictor, nn.Module) and m.predictor.training
    ]
    for module in training:
        module.eval()
    try:
        yield
    finally:
        for module in training:
            module.train()
