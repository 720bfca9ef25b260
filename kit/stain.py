"""Per-slide stain normalisation: a slide's colour statistics mapped onto the training slides'.

    stats = slide_stats(slide)                        # float64 (2, 3): LAB means, stds of tissue
    target = target_stats([stats_a, stats_b, ...])   # the training slides' mean (kit.train.fit)
    normalise = normaliser(stats, target)             # one per slide
    tiles = normalise(tiles)                          # uint8 (..., 3) RGB -> the same shape
    windows = normalise(windows, channel_axis=1)      # uint8 (N, 3, h, w), as kit.windows yields

Reinhard's method in OpenCV's 8-bit CIELAB: each of L, a, b is standardised with the slide's
mean and standard deviation and rescaled to the target's. The statistics are estimated once per
slide, from its tissue pixels only (the kit's tissue rule, `kit.tiling.tissue_mask`) on the
thumbnail at `STATS_SCALE`, so every tile of a slide gets the same mapping, whatever it shows (a
tile full of glomerulus is not pulled towards the colours of plain cortex). The mapping is a
function of the pixel alone: a window normalised alone equals the same crop of the normalised
slide, so inference stays exact (`kit.infer`). In 8-bit LAB the per-channel affine map is a
256-entry table per channel, applied with ``cv2.LUT`` between two ``cv2.cvtColor`` calls.

Why this and not a library, measured by ``python bench/stain.py`` on the realistic synthetic
slides (2 CPU cores at a load average of 7 from other jobs: absolute figures are pessimistic, the
ratios are what count):

- per 256 x 256 tile: this module 1.3 ms (49-51 Mpx/s; 16-31 Mpx/s on a (64, 3, 256, 256) batch
  as the splitter yields, the layout's transposes included); a float32 CIELAB Reinhard in
  OpenCV 4.0-4.8 ms (14-16 Mpx/s); torchstain 1.4.1's numpy Reinhard 51-57 ms and Macenko 53-55
  ms (1.1-1.3 Mpx/s), 40x slower. A 30k x 37k slide read at scale 4 with 256 px of overlap is
  about 125 Mpx of windows: 2.5-8 s of normalisation a slide, in the reader thread.
- per slide: the statistics of a 340 x 381 thumbnail take 15-28 ms; the thumbnail itself is a
  decode of the whole slide (0.8-1.6 s for 5437 x 6089 px; a 30k x 37k slide is ~34 times
  that), once per slide at inference and once per tile cache in training.
- torchstain's ``normalize(I)`` estimates the source statistics (or stain vectors) from ``I``
  itself: per tile, not per slide, so a tile's mapping would change with what it shows, and
  there is no way to hand it a slide's statistics nor a tissue mask. Macenko would need its
  private methods for that, and assumes two stains (H&E) where PAS is not that.
- exactness: against a float CIELAB Reinhard with the same statistics, where that map stays
  inside the RGB gamut (88% of the pixels of 64 tissue tiles of a strongly shifted pair) the
  8-bit map is within 0.72 levels on average and 3 levels for 99.9% of the values; outside it
  the two clip differently (up to 39 levels, on the darkest pixels). The 8-bit LAB round trip
  alone moves a pixel by 0.43 levels on average, which is why even the identity mapping (a
  slide already at the target) goes through it: every slide is treated alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import cv2
import numpy as np

from kit.slides import Slide
from kit.tiling import TISSUE_SATURATION, tissue_mask

__all__ = [
    "METHODS",
    "STATS_SCALE",
    "Normaliser",
    "as_stats",
    "lab_stats",
    "normaliser",
    "slide_stats",
    "stats_list",
    "target_stats",
]

METHODS = ("none", "reinhard")
# The thumbnail statistics are estimated on: 1/16 of each side (a 30k x 37k slide gives a
# 1900 x 2300 picture: millions of tissue pixels, a few MB). Block means shrink a slide's
# standard deviations, but alike for every slide, training and test.
STATS_SCALE = 16
# Standard deviations below this (8-bit LAB units) are taken as this: a nearly uniform slide
# would otherwise have its noise stretched to the target's contrast.
MIN_STD = 1.0

Stats = np.ndarray  # float64 (2, 3): [[mean L, a, b], [std L, a, b]], OpenCV 8-bit LAB


def lab_stats(rgb: np.ndarray, mask: np.ndarray | None = None) -> Stats | None:
    """Mean and standard deviation of L, a, b (OpenCV 8-bit LAB) over the pixels of ``mask``.

    Args:
        rgb: uint8 (h, w, 3) RGB.
        mask: bool (h, w): the pixels to count; None: all.

    Returns:
        float64 (2, 3): row 0 the means, row 1 the standard deviations; None when ``mask``
        selects no pixel.
    """
    _check_rgb(rgb, channel_axis=-1)
    if rgb.ndim != 3:
        raise ValueError(f"rgb must be uint8 (h, w, 3), got shape {rgb.shape}")
    lab = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2LAB)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != rgb.shape[:2]:
            raise ValueError(f"mask shape {mask.shape} does not match the image's {rgb.shape[:2]}")
        lab = lab[mask]
    lab = lab.reshape(-1, 3).astype(np.float64)
    if not len(lab):
        return None
    return np.stack([lab.mean(axis=0), lab.std(axis=0)])


def slide_stats(
    slide: Slide,
    saturation: int = TISSUE_SATURATION,
    scale: int = STATS_SCALE,
    chunk_pixels: int | None = None,
) -> Stats | None:
    """A slide's stain statistics: `lab_stats` of its tissue on the thumbnail at ``scale``.

    Tissue is the kit's tissue rule (`kit.tiling.tissue_mask` with ``saturation``), so glass,
    scanner padding and dark borders do not count. None for a slide showing no tissue.
    ``Slide.thumbnail`` decodes the whole slide unless the file has overviews, ``chunk_pixels``
    (default: its own) at a time.
    """
    thumb = slide.thumbnail(scale, *([] if chunk_pixels is None else [chunk_pixels]))
    return lab_stats(thumb, tissue_mask(thumb, saturation))


def target_stats(stats: Sequence[Stats | None]) -> Stats:
    """The mean of slides' statistics (those showing no tissue, None, left out): the target
    every slide is mapped to."""
    found = [np.asarray(s, dtype=np.float64) for s in stats if s is not None]
    if not found:
        raise ValueError("no slide with tissue to take stain statistics from")
    for s in found:
        as_stats(s, "slide statistics")
    return np.mean(found, axis=0)


def stats_list(stats: Stats | None) -> list[float] | None:
    """Statistics as 6 plain floats (means, then standard deviations): for JSON and configs."""
    return None if stats is None else [float(v) for v in np.asarray(stats).reshape(-1)]


class Normaliser:
    """Maps a slide's colours onto the target's (Reinhard in 8-bit LAB); see the module doc.

    Args:
        stats: the slide's statistics (`slide_stats`): float (2, 3) or 6 floats.
        target: the target's, alike.

    Calling it maps uint8 RGB of any shape whose ``channel_axis`` holds 3 channels: (h, w, 3),
    (N, h, w, 3), or (N, 3, h, w) with ``channel_axis=1``; returns a new uint8 array of the same
    shape.
    """

    def __init__(self, stats: Stats | Sequence[float], target: Stats | Sequence[float]) -> None:
        stats, target = as_stats(stats, "stats"), as_stats(target, "target")
        self.stats, self.target = stats, target
        mean, std = stats[0], np.maximum(stats[1], MIN_STD)
        t_mean, t_std = target[0], np.maximum(target[1], MIN_STD)
        values = np.arange(256, dtype=np.float64)[:, None]
        mapped = (values - mean) * (t_std / std) + t_mean  # (256, 3): a table per channel
        self.table = np.clip(np.rint(mapped), 0, 255).astype(np.uint8)[:, None, :]

    def __call__(self, image: np.ndarray, channel_axis: int = -1) -> np.ndarray:
        _check_rgb(image, channel_axis)
        last = np.moveaxis(image, channel_axis, -1)
        flat = np.ascontiguousarray(last).reshape(-1, last.shape[-2], 3)
        lab = cv2.LUT(cv2.cvtColor(flat, cv2.COLOR_RGB2LAB), self.table)
        rgb = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB).reshape(last.shape)
        return np.ascontiguousarray(np.moveaxis(rgb, -1, channel_axis))


def normaliser(
    stats: Stats | Sequence[float] | None,
    target: Stats | Sequence[float] | None,
    method: str = "reinhard",
) -> Callable[..., np.ndarray]:
    """The function a dataset or reader calls on a slide's uint8 RGB: ``f(image,
    channel_axis=-1)``.

    A `Normaliser` from ``stats`` to ``target`` for ``method="reinhard"``; the identity (the
    image itself) for ``"none"``, and for a slide without tissue (``stats`` None), whose
    statistics would only describe its glass.
    """
    if method not in METHODS:
        raise ValueError(f"stain normalisation must be one of {METHODS}, got {method!r}")
    if method == "none" or stats is None:
        return _identity
    if target is None:
        raise ValueError(f"stain normalisation {method!r} needs target statistics, got None")
    return Normaliser(stats, target)


def _identity(image: np.ndarray, channel_axis: int = -1) -> np.ndarray:
    return image


def as_stats(stats, name: str = "stain statistics") -> Stats:
    """``stats`` (6 numbers, or (2, 3)) as float64 (2, 3); ValueError naming ``name`` if they
    are not finite statistics."""
    try:
        array = np.asarray(stats, dtype=np.float64).reshape(2, 3)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be 6 numbers (LAB means, stds), got {stats!r}") from None
    if not np.all(np.isfinite(array)) or np.any(array[1] < 0):
        raise ValueError(f"{name} must be finite with stds >= 0, got {array.tolist()}")
    return array


def _check_rgb(image, channel_axis: int) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim < 3:
        raise ValueError(
            f"expected uint8 RGB with 3 or more dims, got "
            f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}"
        )
    if image.shape[channel_axis] != 3:
        raise ValueError(f"expected 3 channels on axis {channel_axis}, got shape {image.shape}")
