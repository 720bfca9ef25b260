"""Benchmark ``kit.infer.predict_slide_rle`` against the seeds' one-window-at-a-time loop.

Run from the repository root (a few minutes on 2 CPU cores)::

    .venv/bin/python bench/predict.py                      # 6144 px slide, fcn_resnet50
    .venv/bin/python bench/predict.py --size 3072 --model lraspp_mobilenet_v3_large
    .venv/bin/python bench/predict.py --skip-model --memory-sizes 20000 5000

The slide is synthetic (``kit.synthetic.make_slide``: about half glass, half tissue), written as
a tiled, zlib-compressed RGB TIFF and cached under the temp dir. The measurements:

(a) the model (random init, the same weights for both). The baseline is the loop of the
    seeds' kernels: their grid (``make_grid``, MIN_OVERLAP 32), one window at a time: rasterio
    read, PIL resize down, the model on a batch of one, sigmoid, cv2 resize back, threshold into
    a full-size uint8 mask, then the classic numba RLE of ``mask.T`` flattened. Against it,
    ``predict_slide_rle`` (plan aligned to the scale, the slide decoded once column strip by
    column strip in a background thread, tissue skipping, batches, cores merged strip by strip
    into a streaming RLE), twice: at its own overlap (256) and at the seeds' (32), like for
    like; each line says how many windows the model saw. All timed end to end, side by side.
(b) the same with a trivial pointwise predictor: each pipeline's own cost.
(d) the trivial predictor on the same slide stored in each TIFF layout the competition has
    (tiled or in strips of 16 rows; RGB in one page or one colour plane per page; zlib or raw):
    the reader's speed per layout, as Mpx/s and as a ratio to the tiled zlib RGB file.
(e) with (a): an ensemble of two copies of the model (one read, two model passes) against two
    separate single-model runs.
(c) peak RSS of ``predict_slide_rle`` (trivial predictor) on big slides, each in a fresh
    subprocess: peak (VmHWM, reset through /proc/self/clear_refs) minus the RSS before the call,
    and the extra bytes per pixel between two sizes: what grows with the slide's area. Bounded
    buffers a small slide never fills count in it too: the read-ahead queue (``prefetch``
    batches) fills only when the slide has more tissue tiles than that and reading outruns the
    predictor. Run with
    GDAL_CACHEMAX unset (kit.slides caps GDAL's block cache itself) and set from outside.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
import rasterio
import tifffile
import torch
from numba import njit
from PIL import Image
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kit.infer import Ensemble, InferConfig, Member, predict_slide_rle  # noqa: E402
from kit.rle import decode  # noqa: E402
from kit.synthetic import make_slide  # noqa: E402
from kit.tiling import plan  # noqa: E402

PATTERN_SIZE = 4096  # the synthetic slide tiled periodically into bigger slides
TIFF_TILE = 512


# ---------------------------------------------------------------------------------------------
# The baseline: the seeds' loop, as the Kaggle kernels wrote it


def make_grid(shape, window=256, min_overlap=32):
    """The seeds' grid: (N, 4) of x1, x2, y1, y2 (rows, then columns)."""
    x, y = shape
    nx = x // (window - min_overlap) + 1
    x1 = np.linspace(0, x, num=nx, endpoint=False, dtype=np.int64)
    x1[-1] = x - window
    x2 = (x1 + window).clip(0, x)
    ny = y // (window - min_overlap) + 1
    y1 = np.linspace(0, y, num=ny, endpoint=False, dtype=np.int64)
    y1[-1] = y - window
    y2 = (y1 + window).clip(0, y)
    slices = np.zeros((nx, ny, 4), dtype=np.int64)
    for i in range(nx):
        for j in range(ny):
            slices[i, j] = x1[i], x2[i], y1[j], y2[j]
    return slices.reshape(nx * ny, 4)


@njit(cache=True)
def rle_numba(pixels):
    size = len(pixels)
    points = []
    if pixels[0] == 1:
        points.append(1)
        flag = False
    else:
        flag = True
    for i in range(1, size):
        if pixels[i] != pixels[i - 1]:
            if flag:
                points.append(i + 1)
                flag = False
            else:
                points.append(i + 1 - points[-1])
                flag = True
    if pixels[-1] == 1:
        points.append(size - points[-1] + 1)
    return points


def rle_numba_encode(mask):
    pixels = mask.T.flatten()
    return " ".join(str(x) for x in rle_numba(pixels))


def baseline_rle(path, predictor, window, overlap, scale):
    """The seeds' prediction loop, one window at a time, into a full-size mask."""
    side = window // scale
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        dataset = rasterio.open(path)
    with dataset:
        slices = make_grid(dataset.shape, window=window, min_overlap=overlap)
        preds = np.zeros(dataset.shape, dtype=np.uint8)
        for x1, x2, y1, y2 in slices:
            image = dataset.read([1, 2, 3], window=Window.from_slices((x1, x2), (y1, y2)))
            image = np.moveaxis(image, 0, -1)
            image = np.array(Image.fromarray(image).resize((side, side), Image.BILINEAR))
            x = torch.from_numpy(image).permute(2, 0, 1).float().div(255)[None]
            with torch.no_grad():
                score = predictor(x)[0][0]
            score_sigmoid = score.sigmoid().cpu().numpy()
            score_sigmoid = cv2.resize(score_sigmoid, (window, window))
            preds[x1:x2, y1:y2] = (score_sigmoid > 0.5).astype(np.uint8)
    return rle_numba_encode(preds)


# ---------------------------------------------------------------------------------------------
# Predictors and slides


def trivial(x: torch.Tensor) -> torch.Tensor:
    """Pointwise logits: dark purple (low red) pixels, ~1.5% of the slide, glomerulus-like."""
    return 16 * (0.35 - x[:, 0:1])


def build(name: str) -> torch.nn.Module:
    from kit.model import build_model

    torch.manual_seed(0)
    return build_model(name, pretrained=None).eval()


def pattern(cache: Path) -> np.ndarray:
    """The synthetic slide that bigger slides repeat (generated once, cached as .npy)."""
    path = cache / f"pattern-{PATTERN_SIZE}.npy"
    if not path.exists():
        image = make_slide((PATTERN_SIZE, PATTERN_SIZE), seed=1).image
        np.save(path.with_suffix(".tmp.npy"), image)
        os.replace(path.with_suffix(".tmp.npy"), path)
    return np.load(path, mmap_mode="r")


def slide_path(cache: Path, size: int) -> Path:
    """A size x size tiled TIFF: the pattern stretched to that size, written block by block.

    Stretched rather than repeated, so the slide keeps one tissue section about half its area,
    as on real slides, whatever the size. Nearest-neighbour stretching plus a little noise keeps
    decoding costs realistic (flat blocks would compress unrealistically well). Cached.
    """
    path = cache / f"slide-{size}.tiff"
    if path.exists():
        return path
    source = pattern(cache)
    n = source.shape[0]
    rng = np.random.default_rng(size)

    def tiles():
        # tifffile takes the tiles in row-major order; edge tiles are padded to full size.
        for y in range(0, size, TIFF_TILE):
            rows = np.minimum(np.arange(y, y + TIFF_TILE) * n // size, n - 1)
            band = source[rows]
            for x in range(0, size, TIFF_TILE):
                cols = np.minimum(np.arange(x, x + TIFF_TILE) * n // size, n - 1)
                block = band[:, cols].astype(np.int16)
                block += rng.integers(-3, 4, block.shape, dtype=np.int16)
                yield np.clip(block, 0, 255).astype(np.uint8)

    tmp = path.with_suffix(".tmp.tiff")
    tifffile.imwrite(
        tmp,
        data=tiles(),
        shape=(size, size, 3),
        dtype=np.uint8,
        tile=(TIFF_TILE, TIFF_TILE),
        photometric="rgb",
        compression="zlib",
        compressionargs={"level": 1},
        metadata=None,
        bigtiff=size * size * 3 > 2**31,
    )
    os.replace(tmp, path)
    return path


# (name, tifffile arguments, planes): the layouts of (d).
LAYOUTS = {
    "tiled rgb zlib": (dict(tile=(TIFF_TILE, TIFF_TILE), compression="zlib"), False),
    "tiled rgb raw": (dict(tile=(TIFF_TILE, TIFF_TILE)), False),
    "striped rgb zlib": (dict(rowsperstrip=16, compression="zlib"), False),
    "striped rgb raw": (dict(rowsperstrip=16), False),
    "striped planes raw": (dict(rowsperstrip=16), True),
    "tiled planes zlib": (dict(tile=(TIFF_TILE, TIFF_TILE), compression="zlib"), True),
}


def layout_path(cache: Path, size: int, name: str) -> Path:
    """The slide of `slide_path` rewritten in one of LAYOUTS (cached)."""
    path = cache / f"slide-{size}-{name.replace(' ', '-')}.tiff"
    if path.exists():
        return path
    with tifffile.TiffFile(slide_path(cache, size)) as tif:
        image = tif.asarray()
    args, planes = LAYOUTS[name]
    args = {**args, "metadata": None}
    if "compression" in args:
        args["compressionargs"] = {"level": 1}
    tmp = path.with_suffix(".tmp.tiff")
    with tifffile.TiffWriter(tmp, bigtiff=image.nbytes > 2**31) as tw:
        if planes:
            for c in range(3):
                tw.write(np.ascontiguousarray(image[..., c]), photometric="minisblack", **args)
        else:
            tw.write(image, photometric="rgb", **args)
    os.replace(tmp, path)
    return path


def layouts(cache: Path, size: int, cfg: InferConfig, repeat: int) -> None:
    """(d): predict_slide_rle with the trivial predictor on each layout, interleaved, best of
    ``repeat``."""
    paths = {name: layout_path(cache, size, name) for name in LAYOUTS}
    best = dict.fromkeys(LAYOUTS, float("inf"))
    for _ in range(repeat):
        for name, path in paths.items():
            best[name] = min(best[name], timed(predict_slide_rle, path, trivial, cfg)[0])
    px = size * size / 1e6
    print(f"\n(d) trivial predictor per TIFF layout, slide {size} x {size}, window {cfg.window}, "
          f"scale {cfg.scale}, best of {repeat}")  # fmt: skip
    base = best["tiled rgb zlib"]
    for name, t in best.items():
        print(f"  {name:20s} {t:7.2f} s  {px / t:7.1f} Mpx/s  {base / t:5.2f}x tiled zlib speed")
    t = inflate_time(paths["tiled rgb zlib"])
    print(f"  the tiled zlib file's blocks inflated by Python's zlib, one thread: {t:.2f} s "
          f"({px / t:.1f} Mpx/s a core: the bound of a compressed slide)")  # fmt: skip


def inflate_time(path: Path) -> float:
    """Seconds to read and inflate every block of a zlib TIFF's first page, on one thread."""
    import zlib

    with tifffile.TiffFile(path) as tif:
        page, fh = tif.pages[0], tif.filehandle
        start = time.perf_counter()
        for offset, count in zip(page.dataoffsets, page.databytecounts, strict=True):
            fh.seek(offset)
            zlib.decompress(fh.read(count))
        return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# Measurements


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def agreement(rle_a: str, rle_b: str, shape) -> str:
    """Dice between two RLE masks, and their foreground fractions."""
    a, b = decode(rle_a, shape).astype(bool), decode(rle_b, shape).astype(bool)
    total = a.sum() + b.sum()
    dice = 1.0 if total == 0 else 2 * (a & b).sum() / total
    return f"Dice {dice:.4f}, foreground {a.mean():.2%} vs {b.mean():.2%}"


class Counting:
    """A predictor wrapper counting the windows it is shown."""

    def __init__(self, predictor):
        self.predictor, self.windows = predictor, 0

    def __call__(self, x):
        self.windows += len(x)
        return self.predictor(x)


def compare(title, path, size, predictor, cfg, base_overlap, repeat=1) -> dict:
    """Time the baseline and predict_slide_rle on one slide, interleaved, best of ``repeat``.

    Same window and scale on both sides; kit twice: at its own overlap (``cfg.overlap``, whose
    cores need context) and at the seeds' MIN_OVERLAP (``base_overlap``, 32), the like-for-like
    comparison. Each line says how many windows the model actually saw (kit skips tissue-free
    tiles; the baseline predicts every window).
    """
    same = dataclasses.replace(cfg, overlap=base_overlap)
    t_base = t_kit = t_same = float("inf")
    for _ in range(repeat):
        t, rle_base = timed(baseline_rle, path, predictor, cfg.window, base_overlap, cfg.scale)
        t_base = min(t_base, t)
        counted = Counting(predictor)
        t, rle_kit = timed(predict_slide_rle, path, counted, cfg)
        t_kit = min(t_kit, t)
        counted_same = Counting(predictor)
        t_same = min(t_same, timed(predict_slide_rle, path, counted_same, same)[0])
    px = size * size / 1e6
    n_base = len(make_grid((size, size), cfg.window, base_overlap))
    n_kit = len(plan((size, size), cfg.window, cfg.overlap, align=cfg.scale))
    n_same = len(plan((size, size), cfg.window, base_overlap, align=cfg.scale))
    best = f", best of {repeat}" if repeat > 1 else ""
    print(f"\n({title}) slide {size} x {size}, window {cfg.window}, scale {cfg.scale}{best}")
    print(f"  baseline (seeds' loop)   {t_base:8.2f} s  {px / t_base:7.2f} Mpx/s  "
          f"(overlap {base_overlap}: {n_base} windows, all predicted, batches of 1)")  # fmt: skip
    for label, t, n, seen, overlap in (
        ("kit, its overlap", t_kit, n_kit, counted.windows, cfg.overlap),
        ("kit, seeds' overlap", t_same, n_same, counted_same.windows, base_overlap),
    ):
        print(f"  {label:24s} {t:8.2f} s  {px / t:7.2f} Mpx/s  (overlap {overlap}: {n} tiles, "
              f"{seen} predicted after tissue skipping, batches of {cfg.batch_size}); "
              f"time {t / t_base:.2f}x the baseline's")  # fmt: skip
    print(f"  masks, kit vs baseline: {agreement(rle_kit, rle_base, (size, size))}")
    return {"baseline_s": t_base, "kit_s": t_kit, "kit_same_overlap_s": t_same}


def ensemble_cost(path, size, predictor, cfg, members: int = 2) -> None:
    """(e): an ensemble of ``members`` copies of the predictor (one read of the slide, N model
    passes) against ``members`` separate single-model runs (N reads, N passes)."""
    ensemble = Ensemble([Member(predictor, cfg.scale) for _ in range(members)])
    t_single, _ = timed(predict_slide_rle, path, predictor, cfg)
    t_ensemble, _ = timed(predict_slide_rle, path, ensemble, cfg)
    print(f"\n(e) ensemble of {members} members, slide {size} x {size}")
    print(f"  one model                {t_single:8.2f} s")
    print(f"  {members} separate runs          {members * t_single:8.2f} s")
    print(f"  ensemble of {members}            {t_ensemble:8.2f} s  "
          f"= {t_ensemble / t_single:.2f} model runs ({t_ensemble / (members * t_single):.2f}x the "
          f"separate runs)")  # fmt: skip


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_child(path: Path, cfg: InferConfig) -> None:
    """Child process: print JSON {rss_before, peak, seconds} for predict_slide_rle(path)."""
    small = path.with_name("slide-warmup.tiff")
    tifffile.imwrite(small, np.full((300, 300, 3), 200, np.uint8), photometric="rgb")
    predict_slide_rle(small, trivial, cfg)  # JIT, imports and thread start-up, not measured
    before = _status_kib("VmRSS") * 1024
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    t, _ = timed(predict_slide_rle, path, trivial, cfg)
    peak = _status_kib("VmHWM") * 1024
    print(json.dumps({"rss_before": before, "peak": peak, "seconds": t}))


def measure_rss(path: Path, cfg: InferConfig, env: dict[str, str]) -> dict:
    cmd = [sys.executable, __file__, "--rss-child", str(path), "--window", str(cfg.window),
           "--overlap", str(cfg.overlap), "--scale", str(cfg.scale)]  # fmt: skip
    base = {k: v for k, v in os.environ.items() if k != "GDAL_CACHEMAX"}
    done = subprocess.run(cmd, capture_output=True, text=True, env={**base, **env})
    if done.returncode != 0:
        raise SystemExit(f"RSS measurement failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory(cache: Path, sizes: list[int], cfg: InferConfig) -> None:
    """(c): peak RSS per slide size, with GDAL's default block cache and with a bounded one."""
    print(f"\n(c) peak RSS of predict_slide_rle, trivial predictor, window {cfg.window}, "
          f"scale {cfg.scale} (fresh subprocess each)")  # fmt: skip
    paths = {}
    for size in sizes:
        t, paths[size] = timed(slide_path, cache, size)
        if t > 1:
            print(
                f"  wrote {paths[size]} ({paths[size].stat().st_size / 2**20:.0f} MiB) in {t:.0f} s"
            )
    # GDAL keeps decoded blocks in a process-wide cache of up to GDAL_CACHEMAX (default 5% of
    # RAM); kit.slides caps it (GDAL_CACHE_BYTES) while it reads: the first run sets nothing,
    # the second caps it from outside as well, for comparison.
    for label, env in (
        ("GDAL_CACHEMAX not set (kit's own cap)", {}),
        ("GDAL_CACHEMAX=64 MB set outside", {"GDAL_CACHEMAX": "64"}),
    ):
        print(f"  {label}:")
        extra = {}
        for size in sizes:
            r = measure_rss(paths[size], cfg, env)
            extra[size] = r["peak"] - r["rss_before"]
            print(f"    {size:6d} x {size:<6d}: RSS before {r['rss_before'] / 2**20:6.0f} MiB, "
                  f"peak {r['peak'] / 2**20:6.0f} MiB, extra {extra[size] / 2**20:7.1f} MiB "
                  f"= {extra[size] / size**2:.3f} B/px  ({r['seconds']:.1f} s, "
                  f"{size**2 / 1e6 / r['seconds']:.1f} Mpx/s)")  # fmt: skip
        if len(sizes) >= 2:
            big, small = max(sizes), min(sizes)
            slope = (extra[big] - extra[small]) / (big**2 - small**2)
            print(f"    growth with area: {slope:.4f} extra bytes per pixel ({small} -> {big})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=6144, help="side of the timed slide (px)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of (b), best kept")
    parser.add_argument("--model", default="fcn_resnet50", help="kit.model name (random init)")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--overlap", type=int, default=256)
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument(
        "--baseline-overlap", type=int, default=32, help="the seeds' MIN_OVERLAP for make_grid"
    )
    parser.add_argument("--memory-sizes", type=int, nargs="*", default=[20000, 5000])
    parser.add_argument("--skip-model", action="store_true", help="skip (a)")
    parser.add_argument("--skip-layouts", action="store_true", help="skip (d)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "kit-bench")
    parser.add_argument("--rss-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    cfg = InferConfig(window=args.window, overlap=args.overlap, scale=args.scale)
    if args.rss_child:
        rss_child(args.rss_child, cfg)
        return

    args.cache.mkdir(parents=True, exist_ok=True)
    path = slide_path(args.cache, args.size)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; slide {path}")
    warm = slide_path(args.cache, 1024)
    baseline_rle(warm, trivial, args.window, args.overlap, args.scale)  # JIT both RLEs
    predict_slide_rle(warm, trivial, cfg)
    if not args.skip_model:
        model = build(args.model)
        with torch.no_grad():
            model(torch.rand(1, 3, args.window // args.scale, args.window // args.scale))
        compare(f"a, {args.model}", path, args.size, model, cfg, args.baseline_overlap)
        ensemble_cost(path, args.size, model, cfg)
    compare(
        "b, trivial predictor", path, args.size, trivial, cfg, args.baseline_overlap, args.repeat
    )
    if not args.skip_layouts:
        layouts(args.cache, args.size, cfg, args.repeat)
    if args.memory_sizes:
        memory(args.cache, args.memory_sizes, cfg)


if __name__ == "__main__":
    main()
