"""What stain normalisation and stain augmentation cost, per tile and per slide, side by side.

    .venv/bin/python bench/stain.py                   # the realistic synthetic profile's slides
    .venv/bin/python bench/stain.py --data DIR --repeat 20

Prints milliseconds per 256 x 256 tile (and Mpx/s) for

1. `kit.stain.Normaliser` (Reinhard in OpenCV's 8-bit LAB: two cvtColor and a LUT), alone and on
   a batch of 64 tiles (what `kit.windows.Splitter` hands it);
2. torchstain's numpy Reinhard and Macenko ``normalize`` (each fitted to the target tile once),
   when torchstain is installed (it is not a dependency);
3. albumentations' ``HEStain`` (``random_preset`` and ``macenko``), the stain augmentation;

then per slide: the thumbnail at `kit.stain.STATS_SCALE` (a decode of the whole slide), the
statistics on it, and torchstain's Reinhard ``fit`` on the same thumbnail. Last, how far the 8-bit
mapping is from a float CIELAB Reinhard with the same statistics (OpenCV's float32 conversion),
and how much ``HEStain`` changes a tile with no augmentation at all (scale 1, shift 0), the part
of a PAS tile its two-stain model cannot represent.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import albumentations as A
import cv2
import numpy as np

from kit.competition import Competition
from kit.slides import Slide
from kit.stain import STATS_SCALE, normaliser, slide_stats, target_stats
from kit.synthetic import default_dataset
from kit.tiling import tissue_mask


def timed(fn, repeat: int) -> float:
    """Best seconds of ``repeat`` calls (the least disturbed by other jobs on the machine)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def line(name: str, seconds: float, pixels: int) -> None:
    print(f"  {name:<44} {seconds * 1e3:9.2f} ms  {pixels / seconds / 1e6:8.1f} Mpx/s")


def tissue_tiles(thumb_source: Slide, count: int, side: int = 256) -> np.ndarray:
    """uint8 (count, side, side, 3): the slide's windows at scale 4 with the most tissue."""
    picture = thumb_source.thumbnail(4)
    mask = tissue_mask(picture)
    h, w = (s // side * side for s in mask.shape)
    shares = mask[:h, :w].reshape(h // side, side, w // side, side).mean(axis=(1, 3))
    best = np.argsort(shares.ravel())[::-1][:count]
    rows, cols = np.unravel_index(best, shares.shape)
    return np.stack(
        [
            picture[r * side : (r + 1) * side, c * side : (c + 1) * side]
            for r, c in zip(rows, cols, strict=True)
        ]
    )


def float_reinhard(rgb: np.ndarray, stats: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The reference: Reinhard in float CIELAB (statistics converted from 8-bit LAB units)."""
    unit = np.array([100 / 255, 1, 1])
    offset = np.array([0, 128, 128])
    mean, std = (stats[0] - offset) * unit, stats[1] * unit
    t_mean, t_std = (target[0] - offset) * unit, target[1] * unit
    lab = cv2.cvtColor(rgb.astype(np.float32) / 255, cv2.COLOR_RGB2LAB).astype(np.float64)
    mapped = ((lab - mean) * (t_std / np.maximum(std, 1e-6)) + t_mean).astype(np.float32)
    out = cv2.cvtColor(mapped, cv2.COLOR_LAB2RGB)
    return np.clip(np.rint(out * 255), 0, 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="competition folder (default: realistic)")
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    data = args.data or default_dataset(profile="realistic")
    comp = Competition(data)
    ids = comp.train_ids
    with Slide(comp.slide_path(ids[0])) as a, Slide(comp.slide_path(ids[-1])) as b:
        start = time.perf_counter()
        stats_a = slide_stats(a)
        thumb_s = time.perf_counter() - start
        thumb = a.thumbnail(STATS_SCALE)
        stats_b = slide_stats(b)
        tiles = tissue_tiles(a, 64)
        target_tile = tissue_tiles(b, 1)[0]
    target = target_stats([stats_b])
    tile, px = tiles[0], tiles[0].shape[0] * tiles[0].shape[1]
    norm = normaliser(stats_a, target)
    print(f"slides {ids[0]} -> {ids[-1]}, {args.repeat} repeats (best)")
    print("per 256 x 256 tile:")
    line("kit.stain.Normaliser", timed(lambda: norm(tile), args.repeat), px)
    batch = np.ascontiguousarray(tiles.transpose(0, 3, 1, 2))
    per = timed(lambda: norm(batch, channel_axis=1), args.repeat) / len(tiles)
    line("kit.stain.Normaliser, batch of 64 (N, 3, h, w)", per, px)
    line("float32 CIELAB Reinhard (cv2)", timed(lambda: float_reinhard(tile, stats_a, target),
                                               args.repeat), px)  # fmt: skip
    try:
        from torchstain.numpy.normalizers import NumpyMacenkoNormalizer, NumpyReinhardNormalizer
    except ImportError:
        print("  torchstain: not installed")
        NumpyReinhardNormalizer = NumpyMacenkoNormalizer = None
    if NumpyReinhardNormalizer is not None:
        reinhard, macenko = NumpyReinhardNormalizer(), NumpyMacenkoNormalizer()
        reinhard.fit(target_tile)
        macenko.fit(target_tile)
        line("torchstain numpy Reinhard normalize", timed(lambda: reinhard.normalize(tile),
                                                          args.repeat), px)  # fmt: skip
        line("torchstain numpy Macenko normalize", timed(
            lambda: macenko.normalize(tile, stains=False), args.repeat), px)  # fmt: skip
    for method in ("random_preset", "macenko"):
        aug = A.HEStain(method=method, p=1.0)
        aug.set_random_seed(0)
        seconds = timed(lambda aug=aug: aug(image=tile), args.repeat)
        line(f"albumentations HEStain {method}", seconds, px)

    print(f"per slide ({a.shape[0]} x {a.shape[1]}, thumbnail at scale {STATS_SCALE}):")
    tpx = thumb.shape[0] * thumb.shape[1]
    line("thumbnail + statistics (kit.stain.slide_stats)", thumb_s, tpx)
    line("statistics on the thumbnail", timed(
        lambda: slide_stats_of(thumb), args.repeat), tpx)  # fmt: skip
    if NumpyReinhardNormalizer is not None:
        line("torchstain Reinhard fit on the thumbnail", timed(
            lambda: NumpyReinhardNormalizer().fit(thumb), args.repeat), tpx)  # fmt: skip

    ours = norm(tiles).astype(np.int16)
    ref = np.stack([float_reinhard(t, stats_a, target) for t in tiles]).astype(np.int16)
    diff = np.abs(ours - ref)
    print(
        f"8-bit LAB vs float CIELAB Reinhard: mean |diff| {diff.mean():.2f} levels, max "
        f"{diff.max()}, within 3: {np.mean(diff <= 3):.2%}"
    )
    inside = ((ref > 0) & (ref < 255)).all(axis=-1)  # the float map stays in the RGB gamut
    print(
        f"  where the float map stays in the RGB gamut ({inside.mean():.0%} of the pixels): "
        f"mean |diff| {diff[inside].mean():.2f}, 99.9% within {np.quantile(diff[inside], 0.999):g}"
    )
    same = normaliser(stats_a, stats_a)(tiles).astype(np.int16)
    print(f"8-bit LAB round trip (identity map): mean |diff| {np.abs(same - tiles).mean():.2f}")
    identity = A.HEStain(
        method="macenko", intensity_scale_range=(1, 1), intensity_shift_range=(0, 0), p=1.0
    )
    out = identity(image=tile)["image"].astype(np.int16)
    print(f"HEStain macenko, scale 1 shift 0: mean |diff| {np.abs(out - tile).mean():.2f} levels")


def slide_stats_of(thumb: np.ndarray):
    from kit.stain import lab_stats

    return lab_stats(thumb, tissue_mask(thumb))


if __name__ == "__main__":
    main()
