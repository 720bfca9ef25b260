"""Whole-slide prediction: tiles merged from cores equal the whole-image computation exactly."""

from __future__ import annotations

import dataclasses
import threading
import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kit.infer import (
    InferConfig,
    Probabilities,
    iter_mask_strips,
    iter_probability_strips,
    predict_slide,
    predict_slide_rle,
    resolve_config,
    sigmoid,
)
from kit.merge import StripMerger, upsample
from kit.polygons import rasterize
from kit.rle import encode
from kit.slides import Slide, downscale
from kit.tiling import has_tissue, plan, tissue_fraction, tissue_mask
from kit.windows import Splitter


def pointwise(x: torch.Tensor) -> torch.Tensor:
    """A dummy predictor: logits from each pixel's colour alone (N, 3, h, w) -> (N, 1, h, w)."""
    return 8 * (x[:, 0:1] - x[:, 2:3]) + 0.5 * x[:, 1:2] - 0.2


def reference_probs(image: np.ndarray, cfg: InferConfig, f=pointwise) -> np.ndarray:
    """The whole-image computation: downscale the padded image, f, sigmoid, upsample, crop."""
    low = downscale(image, cfg.scale)
    x = torch.from_numpy(low).permute(2, 0, 1)[None].float().div(255)
    flips = ((), (-1,), (-2,), (-2, -1)) if cfg.tta else ((),)
    total = np.zeros((1, 1, *x.shape[2:]), np.float64)
    for dims in flips:
        p = sigmoid(f(x.flip(dims)).numpy())
        total += np.flip(p, dims)
    probs = (total / len(flips)).astype(np.float32)
    up = upsample(probs, cfg.scale, cfg.upsample)[0, 0]
    return up[: image.shape[0], : image.shape[1]]


def collect(strips, shape, dtype) -> np.ndarray:
    """Assemble (cols, strip) pairs, checking they tile the columns left to right."""
    out = np.zeros(shape, dtype)
    stop = 0
    for cols, strip in strips:
        assert cols.start == stop and cols.stop > cols.start
        assert strip.shape == (shape[0], cols.stop - cols.start) and strip.dtype == dtype
        out[:, cols] = strip
        stop = cols.stop
    assert stop == shape[1]
    return out


def smooth_image(shape: tuple[int, int], seed: int = 0, noise: float = 40) -> np.ndarray:
    """uint8 (H, W, 3): waves plus noise, so masks have both runs and isolated pixels."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 100 * np.sin(xx / 23.0), 128 + 0 * yy, 128 + 100 * np.cos(yy / 17.0)])
    noisy = base.transpose(1, 2, 0) + rng.normal(0, noise, (h, w, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


# (shape, window, overlap, scale, upsample): awkward sizes — not multiples of the window, smaller
# than it, one pixel past a multiple of it — in each exactness regime of the module docstring.
EXACT_CASES = [
    ((301, 517), 128, 32, 1, "bilinear"),  # scale 1: any overlap
    ((257, 257), 128, 0, 1, "bilinear"),
    ((129, 385), 64, 0, 1, "bilinear"),
    ((301, 517), 128, 0, 4, "nearest"),  # nearest: any overlap
    ((1, 700), 128, 16, 4, "nearest"),
    ((257, 257), 128, 8, 2, "nearest"),
    ((301, 517), 128, 8, 4, "bilinear"),  # bilinear: overlap >= 2 * scale
    ((257, 257), 128, 4, 2, "bilinear"),
    ((257, 258), 128, 8, 4, "bilinear"),  # last windows run 3 and 2 px past the slide
    ((1, 700), 128, 16, 4, "bilinear"),
    ((700, 1), 64, 16, 2, "bilinear"),
    ((40, 47), 128, 32, 4, "bilinear"),  # smaller than one window, clamped at its last rows
    ((256, 512), 128, 8, 4, "bilinear"),  # exact multiples: cores meet mid-overlap
]


@pytest.mark.parametrize("tta", [False, True], ids=["plain", "tta"])
@pytest.mark.parametrize(("shape", "window", "overlap", "scale", "mode"), EXACT_CASES)
def test_predict_slide_equals_whole_image(
    tmp_path, write_tiff, shape, window, overlap, scale, mode, tta
):
    image = smooth_image(shape, seed=sum(shape))
    path = write_tiff(tmp_path / "s.tiff", image)
    cfg = InferConfig(window, overlap, scale, tta=tta, upsample=mode, tissue=False, batch_size=3)
    expected = reference_probs(image, cfg)

    probs = collect(iter_probability_strips(path, pointwise, cfg), shape, np.float32)
    np.testing.assert_array_equal(probs, expected)
    mask = predict_slide(path, pointwise, cfg)
    assert mask.dtype == np.uint8 and mask.shape == shape
    np.testing.assert_array_equal(mask, (expected > 0.5).astype(np.uint8))
    assert 0 < mask.sum() < mask.size
    assert predict_slide_rle(path, pointwise, cfg) == encode(mask)


@pytest.mark.parametrize("band_rows", [1, 3, 1000])
@pytest.mark.parametrize(
    ("shape", "window", "overlap", "scale", "mode"),
    [EXACT_CASES[3], EXACT_CASES[6], EXACT_CASES[8], EXACT_CASES[10]],
)
def test_mask_merged_in_row_bands_equals_whole_image(
    tmp_path, write_tiff, band_rows, shape, window, overlap, scale, mode
):
    # A smooth image gives bands all below, all above and across the threshold; each kind is
    # shortcut or upsampled on its own, and band edges must not show. The three objects wired
    # by hand: splitter -> predictor -> merger.
    image = smooth_image(shape, seed=3, noise=2)
    path = write_tiff(tmp_path / "s.tiff", image)
    cfg = InferConfig(window, overlap, scale, upsample=mode, tissue=False)
    expected = (reference_probs(image, cfg) > 0.5).astype(np.uint8)
    assert 0 < expected.sum() < expected.size
    with Slide(path) as slide:
        splitter = Splitter(slide, window, overlap, scale, batch_size=4, tissue=False)
        merger = StripMerger(splitter.columns, shape, scale, mode, 0.5, band_rows=band_rows)
        predict = Probabilities(pointwise)
        strips = [
            strip
            for tiles, windows in splitter
            for tile, probs in zip(tiles, predict(windows), strict=True)
            for strip in merger.add(tile, probs)
        ]
    strips += list(merger.finish())
    np.testing.assert_array_equal(collect(strips, shape, np.uint8), expected)


@pytest.mark.parametrize("threshold", [0.37, 0.5000001, 0.93])
@pytest.mark.parametrize(
    ("shape", "window", "overlap", "scale", "mode"), [EXACT_CASES[6], EXACT_CASES[8]]
)
def test_the_mask_is_the_probabilities_above_any_threshold(
    tmp_path, write_tiff, threshold, shape, window, overlap, scale, mode
):
    # The mask path thresholds as it upsamples, never holding the probabilities: the same
    # pixels as thresholding the probability strips (a float32 array against a Python float).
    image = smooth_image(shape, seed=5)
    path = write_tiff(tmp_path / "s.tiff", image)
    cfg = InferConfig(window, overlap, scale, upsample=mode, tissue=False, threshold=threshold)
    probs = collect(iter_probability_strips(path, pointwise, cfg), shape, np.float32)
    expected = (probs > threshold).astype(np.uint8)
    assert 0 < expected.sum() < expected.size
    np.testing.assert_array_equal(predict_slide(path, pointwise, cfg), expected)


@pytest.mark.parametrize(
    ("layout", "tile"), [("rgb", None), ("planes", (64, 64)), ("planes", None)]
)
def test_every_tiff_layout_gives_the_reference(tmp_path, write_tiff, layout, tile):
    image = smooth_image((203, 330), seed=3)
    path = write_tiff(tmp_path / "s.tiff", image, layout, tile=tile)
    cfg = InferConfig(window=96, overlap=16, scale=2, tissue=False)
    expected = (reference_probs(image, cfg) > 0.5).astype(np.uint8)
    np.testing.assert_array_equal(predict_slide(path, pointwise, cfg), expected)
    assert predict_slide_rle(path, pointwise, cfg) == encode(expected)


def test_bilinear_without_enough_overlap_is_not_exact(tmp_path, write_tiff):
    """The documented condition is needed: with windows meeting edge to edge, pixels near the
    inner window edges are clamped within their window instead of reading the neighbour."""
    image = smooth_image((256, 512), seed=5)
    path = write_tiff(tmp_path / "s.tiff", image)
    cfg = InferConfig(window=128, overlap=0, scale=4, tissue=False)
    probs = collect(iter_probability_strips(path, pointwise, cfg), image.shape[:2], np.float32)
    ys, xs = np.nonzero(probs != reference_probs(image, cfg))
    near_edge = np.isin(ys % 128, [0, 1, 126, 127]) | np.isin(xs % 128, [0, 1, 126, 127])
    assert ys.size and near_edge.all()


def test_mask_strips_threshold_the_probability_strips(tmp_path, write_tiff):
    image = smooth_image((190, 260), seed=7)
    path = write_tiff(tmp_path / "s.tiff", image)
    cfg = InferConfig(window=64, overlap=16, scale=2, threshold=0.3, tissue=False)
    probs = collect(iter_probability_strips(path, pointwise, cfg), (190, 260), np.float32)
    mask = collect(iter_mask_strips(path, pointwise, cfg), (190, 260), np.uint8)
    np.testing.assert_array_equal(mask, (probs > 0.3).astype(np.uint8))
    assert probs.min() >= 0 and probs.max() <= 1


def test_reading_threads_do_not_change_the_result(tmp_path, write_tiff):
    image = smooth_image((230, 300), seed=8)
    path = write_tiff(tmp_path / "s.tiff", image)
    cfg = InferConfig(window=64, overlap=16, scale=2, tissue=False, batch_size=2)
    masks = [
        predict_slide(path, pointwise, cfg, workers=w, prefetch=p)
        for w, p in ((0, 1), (1, 1), (3, 5))
    ]
    np.testing.assert_array_equal(masks[0], masks[1])
    np.testing.assert_array_equal(masks[0], masks[2])


@pytest.mark.parametrize("tile", [(64, 64), None])
@pytest.mark.parametrize("tissue", [False, True])
def test_the_slide_is_decoded_once(tmp_path, write_tiff, recording_slide, tissue, tile):
    # Neighbouring column strips overlap; the shared columns are kept, not read again, and the
    # tissue test needs no thumbnail pass: every pixel of the padded plan is requested once.
    # A file in strips (tile None) is read in full-width row bands: each strip decoded once.
    image = smooth_image((301, 517), seed=4)
    path = write_tiff(tmp_path / "s.tiff", image, tile=tile)
    cfg = InferConfig(window=128, overlap=32, scale=4, tissue=tissue, batch_size=3)
    with recording_slide(path) as slide:
        mask = predict_slide(slide, pointwise, cfg)
    reads = slide.reads
    np.testing.assert_array_equal(mask, (reference_probs(image, cfg) > 0.5).astype(np.uint8))
    tiles = plan(image.shape[:2], 128, 32, align=4)
    height, width = max(t.y1 for t in tiles), max(t.x1 for t in tiles)
    assert max(y1 for _, y1, _, _ in reads) == height
    assert max(x1 for _, _, _, x1 in reads) == width
    hits = np.zeros((height, width), np.int64)
    for y0, y1, x0, x1 in reads:
        hits[y0:y1, x0:x1] += 1
    assert (hits == 1).all()
    if tile is None:
        assert all(x0 == 0 and x1 >= image.shape[1] for _, _, x0, x1 in reads)
    else:
        assert max(x1 - x0 for _, _, x0, x1 in reads) < image.shape[1]


def glass_and_tissue(shape=(200, 400)) -> np.ndarray:
    """Bright grey glass on the left half, saturated pink tissue on the right."""
    rng = np.random.default_rng(0)
    image = np.full((*shape, 3), 235, np.uint8) + rng.integers(0, 6, (*shape, 3), dtype=np.uint8)
    image[:, shape[1] // 2 :] = (200, 80, 160)
    return image


def test_tissue_skipping_zeroes_glass_and_never_predicts_it(tmp_path, write_tiff):
    image = glass_and_tissue()
    path = write_tiff(tmp_path / "s.tiff", image)
    cfg = InferConfig(window=64, overlap=16, scale=2, tissue=True)
    seen = []

    def always_on(x):
        seen.append(x.clone())
        return torch.full((x.shape[0], 1, *x.shape[2:]), 10.0)

    mask = predict_slide(path, always_on, cfg)

    # Tissue is judged on each tile's core as the predictor sees it: downscaled by the scale.
    tiles = plan(image.shape[:2], 64, 16, align=2)
    low = downscale(image, 2)
    keep = has_tissue(tissue_fraction(tiles, low, 2), cfg.min_tissue)
    kept = [t for t, k in zip(tiles, keep, strict=True) if k]
    # Tiles with tissue only in their window's margin, not in their core, are skipped too.
    in_window = [
        tissue_mask(low[t.y0 // 2 : t.y1 // 2, t.x0 // 2 : t.x1 // 2]).any() for t in tiles
    ]
    assert 0 < len(kept) < sum(in_window) < len(tiles)
    expected = np.zeros(image.shape[:2], np.uint8)
    for t in kept:
        expected[t.core] = 1
    np.testing.assert_array_equal(mask, expected)
    assert mask[:, :150].sum() == 0 and mask[:, 200:].all()
    windows = torch.cat(seen)
    assert len(windows) == len(kept)
    # Every window the predictor saw holds tissue (pink: red well above green).
    assert bool(((windows[:, 0] - windows[:, 1]) > 0.3).flatten(1).any(1).all())


def test_glass_only_slide_never_calls_the_predictor(tmp_path, write_tiff):
    image = glass_and_tissue()[:, :150]
    path = write_tiff(tmp_path / "s.tiff", image)

    def refuse(x):
        raise AssertionError("predictor called on glass")

    assert predict_slide_rle(path, refuse, window=64, overlap=16, scale=2) == ""
    assert predict_slide(path, refuse, window=64, overlap=16, scale=2).sum() == 0


def test_rle_path_never_holds_the_full_mask(tmp_path, write_tiff):
    h, w = 600, 4000
    yy, xx = np.mgrid[0:h, 0:w]
    # Red grows left to right, blue top to bottom: one foreground run per column, a small RLE.
    image = np.stack([255 * xx / w, np.full((h, w), 128), 255 * yy / h], -1).astype(np.uint8)
    path = write_tiff(tmp_path / "s.tiff", image)
    cfg = InferConfig(window=128, overlap=32, scale=4, tissue=False, workers=0)
    expected = encode(predict_slide(path, pointwise, cfg))
    tracemalloc.start()
    try:
        rle = predict_slide_rle(path, pointwise, cfg)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rle == expected and len(rle.split()) <= 2 * w
    # The full uint8 mask would take 2.4 MB; a strip takes 58 kB, reading and downscaling a
    # band of columns (one column of windows, up to the file's next block edge) ~0.7 MB.
    assert peak < 0.5 * h * w


class Recorder(nn.Module):
    """A pointwise module with a BatchNorm, recording its mode and input device per call."""

    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm2d(1)
        self.modes: list[bool] = []

    def forward(self, x):
        self.modes.append(self.training)
        return pointwise(x)


def test_module_predictor_runs_in_eval_mode_and_is_restored(tmp_path, write_tiff):
    image = smooth_image((100, 100), seed=10)
    path = write_tiff(tmp_path / "s.tiff", image)
    model = Recorder().train()
    cfg = InferConfig(window=64, overlap=16, scale=2, tissue=False, amp=True)  # amp: CUDA only
    mask = predict_slide(path, model, cfg)
    assert model.modes and not any(model.modes)
    assert model.training
    np.testing.assert_array_equal(mask, (reference_probs(image, cfg) > 0.5).astype(np.uint8))


def test_bad_predictor_output_is_named(tmp_path, write_tiff):
    path = write_tiff(tmp_path / "s.tiff", smooth_image((70, 70)))
    with pytest.raises(ValueError, match=r"logits of shape \(4, 1, 32, 32\).*got \(4, 3, 32, 32\)"):
        predict_slide(path, lambda x: x, window=64, overlap=16, scale=2, tissue=False)
    with pytest.raises(ValueError, match="callable"):
        predict_slide(path, "model", window=64, overlap=16, scale=2)


def test_errors_stop_the_reader_threads(tmp_path, write_tiff):
    path = write_tiff(tmp_path / "s.tiff", smooth_image((300, 300)))
    calls = []

    def fail_second(x):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return pointwise(x)

    with pytest.raises(RuntimeError, match="boom"):
        predict_slide(path, fail_second, window=64, overlap=16, scale=2, tissue=False, batch_size=1)
    strips = iter_probability_strips(path, pointwise, window=64, overlap=16, tissue=False)
    next(strips)
    strips.close()  # a consumer that stops early
    assert not [t for t in threading.enumerate() if t.name.startswith("kit-read")]


def test_missing_slide_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tiff"):
        predict_slide(tmp_path / "nope.tiff", pointwise)


def test_config_is_validated():
    with pytest.raises(ValueError, match="multiple of scale"):
        InferConfig(window=100, scale=3)
    with pytest.raises(ValueError, match="overlap"):
        InferConfig(window=64, overlap=64, scale=1)
    with pytest.raises(ValueError, match="upsample"):
        InferConfig(upsample="cubic")
    with pytest.raises(TypeError, match="windw"):
        resolve_config(None, windw=3)
    cfg = resolve_config(InferConfig(scale=2), tta=True)
    assert cfg.scale == 2 and cfg.tta


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_upsample_is_bilinear_align_corners_false(scale):
    probs = torch.rand(2, 1, 19, 27, generator=torch.Generator().manual_seed(scale))
    ours = upsample(probs.numpy(), scale, "bilinear")
    theirs = F.interpolate(probs, scale_factor=scale, mode="bilinear", align_corners=False)
    # torch computes the source coordinate in float32: ~1e-5 off at scale 3, exact at 2 and 4
    np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-5, rtol=0)
    nearest = upsample(probs.numpy(), scale, "nearest")
    np.testing.assert_array_equal(nearest[..., ::scale, ::scale], probs.numpy())
    np.testing.assert_array_equal(nearest, F.interpolate(probs, scale_factor=scale).numpy())


def test_sigmoid_is_stable_and_matches_torch():
    logits = np.array([-1000.0, -30.0, -1.5, 0.0, 2.0, 40.0, 1000.0], np.float32)
    probs = sigmoid(logits)
    assert probs.dtype == np.float64 and probs[0] == 0.0 and probs[-1] == 1.0
    np.testing.assert_allclose(probs, torch.sigmoid(torch.from_numpy(logits).double()), rtol=1e-15)


def test_config_from_checkpoint_takes_training_settings_then_overrides():
    from kit.infer import config_from_checkpoint

    trained = {"window": 512, "scale": 2, "overlap": 64, "threshold": 0.4, "min_tissue": 0.02}
    ckpt = {"config": {**trained, "lr": 1e-3}}
    cfg = config_from_checkpoint(ckpt, threshold=None, tta=True, batch_size=3)
    assert (cfg.window, cfg.scale, cfg.overlap, cfg.threshold) == (512, 2, 64, 0.4)
    assert cfg.min_tissue == 0.02  # the tissue rule the model's negatives were chosen by
    assert cfg.tta and cfg.batch_size == 3
    assert config_from_checkpoint({}).window == InferConfig().window
    # The sectioned config of kit.train.TrainConfig: inference settings from its `infer` section.
    nested = {"lr": 1e-3, "data": {"window": 512, "overlap": 0}, "infer": {**trained, "tta": True}}
    assert config_from_checkpoint({"config": nested}) == InferConfig(**trained, tta=True)
    with pytest.raises(ValueError, match="overlap"):
        config_from_checkpoint(ckpt, overlap=512)


@pytest.mark.parametrize(("scale", "tta"), [(2, False), (4, True)])
def test_probabilities_match_an_independent_reference(tmp_path, write_tiff, scale, tta):
    # torch's own sigmoid, flips and bilinear interpolation on the whole image, none of the
    # kit's functions: equal up to float rounding (torch's source coordinates are float32).
    image = smooth_image((211, 173), seed=scale)
    path = write_tiff(tmp_path / "s.tiff", image)
    cfg = InferConfig(window=64, overlap=16, scale=scale, tissue=False, tta=tta)
    ours = collect(iter_probability_strips(path, pointwise, cfg), image.shape[:2], np.float32)
    # The slide padded to whole blocks and downscaled by block means (`downscale`, tested in
    # tests/test_slides.py): the low-resolution image every window is a slice of.
    low = torch.from_numpy(downscale(image, scale)).permute(2, 0, 1)[None].float().div(255)
    flips = ((), (-1,), (-2,), (-2, -1)) if tta else ((),)
    probs = sum(torch.sigmoid(pointwise(low.flip(d)).double()).flip(d) for d in flips) / len(flips)
    up = F.interpolate(probs.float(), scale_factor=scale, mode="bilinear", align_corners=False)
    height, width = image.shape[:2]
    np.testing.assert_allclose(ours, up[0, 0, :height, :width].numpy(), atol=2e-6, rtol=0)


def test_an_open_slide_is_used_as_it_is_and_left_open(tmp_path, write_tiff):
    image = smooth_image((150, 190), seed=5)
    path = write_tiff(tmp_path / "s.tiff", image)
    cfg = InferConfig(window=64, overlap=16, scale=2, tissue=False)
    with Slide(path) as slide:
        mask = predict_slide(slide, pointwise, cfg)
        rle = predict_slide_rle(slide, pointwise, cfg)
        assert slide.read(slice(0, 2), slice(0, 2)).shape == (2, 2, 3)  # still open
    np.testing.assert_array_equal(mask, predict_slide(path, pointwise, cfg))
    assert rle == encode(mask)


def test_tta_is_one_predictor_call_per_batch():
    calls = []

    def recording(x):
        calls.append(tuple(x.shape))
        return pointwise(x)

    windows = np.random.default_rng(0).integers(0, 256, (3, 3, 8, 6), dtype=np.uint8)
    probs = Probabilities(recording, tta=True)(windows)
    assert calls == [(12, 3, 8, 6)] and probs.shape == (3, 8, 6) and probs.dtype == np.float32
    # Un-flipped before averaging: a predictor that ignores position gives the plain result.
    single = Probabilities(pointwise)(windows)
    np.testing.assert_allclose(probs, single, atol=1e-7)


@pytest.mark.parametrize(
    ("tile", "max_band_bytes", "whole"),
    [((32, 32), 1 << 30, False), (None, 1 << 30, True), (None, 100, False)],
)
def test_splitter_windows_are_slices_of_the_downscaled_slide(
    tmp_path, write_tiff, tile, max_band_bytes, whole
):
    # An awkward size: windows run past both edges, filled like the padded slide. A striped
    # file is read whole when it fits max_band_bytes, else column strip by column strip.
    image = smooth_image((237, 511), seed=6)
    path = write_tiff(tmp_path / "s.tiff", image, tile=tile)
    with Slide(path) as slide:
        splitter = Splitter(
            slide, 96, 24, 3, batch_size=5, tissue=False, max_band_bytes=max_band_bytes
        )
        batches = list(splitter)
    assert splitter.whole == whole
    tiles = [t for column in splitter.columns for t in column]
    assert [t for ts, _ in batches for t in ts] == tiles and len(splitter) == len(tiles)
    assert all(len(ts) == len(w) <= 5 for ts, w in batches)
    height, width = max(t.y1 for t in tiles), max(t.x1 for t in tiles)
    padded = np.zeros((height, width, 3), np.uint8)
    padded[: image.shape[0], : image.shape[1]] = image
    low = downscale(padded, 3).transpose(2, 0, 1)
    for ts, windows in batches:
        for t, w in zip(ts, windows, strict=True):
            np.testing.assert_array_equal(w, low[:, t.y0 // 3 : t.y1 // 3, t.x0 // 3 : t.x1 // 3])


def test_merger_hands_on_strips_in_order_and_fills_skipped_columns():
    tiles = plan((50, 90), 32, 8, align=2)
    splitter_columns = [[t for t in tiles if t.cx0 == x] for x in sorted({t.cx0 for t in tiles})]
    merger = StripMerger(splitter_columns, (50, 90), scale=2, threshold=0.5)
    ones = np.ones((16, 16), np.float32)
    # Only the last column's first tile is predicted: the earlier strips come out empty first.
    last = splitter_columns[-1][0]
    strips = list(merger.add(last, ones))
    assert [c for c, _ in strips] == [col[0].core[1] for col in splitter_columns[:-1]]
    assert all(not s.any() for _, s in strips)
    assert merger.done == sum(len(c) for c in splitter_columns[:-1])
    with pytest.raises(ValueError, match="not in the plan or came after its column"):
        list(merger.add(splitter_columns[0][0], ones))
    (cols, strip), *rest = list(merger.finish())
    assert not rest and cols == last.core[1] and merger.done == merger.total == len(tiles)
    assert strip[last.core[0]].all() and not strip[last.cy1 :].any()


def test_keep_zeroes_everything_outside_the_polygons_strip_by_strip(tmp_path, write_tiff):
    image = smooth_image((150, 260), seed=9)
    path = write_tiff(tmp_path / "s.tiff", image)
    cfg = InferConfig(window=64, overlap=16, scale=2, tissue=False)
    # a triangle with a square hole, across several column strips
    outer = np.array([[10.0, 5.0], [250.0, 20.0], [40.0, 140.0]])
    hole = np.array([[60.0, 40.0], [90.0, 40.0], [90.0, 70.0], [60.0, 70.0]])
    inside = rasterize([[outer, hole]], image.shape[:2])
    assert 0 < inside.sum() < inside.size
    mask = predict_slide(path, pointwise, cfg)
    assert (mask * (1 - inside)).any()  # the filter has something to remove
    kept = predict_slide(path, pointwise, cfg, keep=[[outer, hole]])
    np.testing.assert_array_equal(kept, mask * inside)
    probs = collect(iter_probability_strips(path, pointwise, cfg), image.shape[:2], np.float32)
    kept_probs = iter_probability_strips(path, pointwise, cfg, keep=[[outer, hole]])
    np.testing.assert_array_equal(collect(kept_probs, image.shape[:2], np.float32), probs * inside)
    assert predict_slide_rle(path, pointwise, cfg, keep=[[outer, hole]]) == encode(kept)


def test_a_checkpoints_batch_size_is_restored_unless_overridden():
    from kit.infer import config_from_checkpoint

    sectioned = {"config": {"infer": {"window": 512, "batch_size": 5}}}
    assert config_from_checkpoint(sectioned).batch_size == 5
    assert config_from_checkpoint(sectioned, batch_size=None).batch_size == 5  # not given
    assert config_from_checkpoint(sectioned, batch_size=2).batch_size == 2
    flat = {"config": {"window": 512, "infer_batch_size": 6}}  # a kit before config sections
    assert config_from_checkpoint(flat).batch_size == 6
    assert config_from_checkpoint({}).batch_size == InferConfig().batch_size


class LayoutSpy(nn.Module):
    """A small convolutional network that records whether its input was channels_last."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 1, 3, padding=1),
        )
        with torch.no_grad():  # logits of a few units: probabilities across (0, 1)
            self.net[-1].weight.mul_(30)
        self.layouts = set()

    def forward(self, x):
        self.layouts.add(x.is_contiguous(memory_format=torch.channels_last))
        return self.net(x)


def test_channels_last_windows_predict_what_contiguous_ones_do(tmp_path, write_tiff):
    path = write_tiff(tmp_path / "s.tiff", smooth_image((150, 170), seed=3))
    cfg = InferConfig(window=64, overlap=16, scale=2, tissue=False, batch_size=3, tta=True)
    model = LayoutSpy().eval()
    probs = {}
    for wanted in (None, False, True):
        model.layouts.clear()
        config = dataclasses.replace(cfg, channels_last=wanted)
        probs[wanted] = collect(
            iter_probability_strips(path, model, config), (150, 170), np.float32
        )
        # None: on CUDA only, so contiguous windows on the CPU; True: channels_last anywhere.
        assert model.layouts == {wanted is True}, wanted
    np.testing.assert_array_equal(probs[None], probs[False])
    np.testing.assert_allclose(probs[True], probs[False], rtol=0, atol=1e-5)
    assert probs[True].std() > 0.01  # not a constant picture: the comparison says something


def test_cuda_inference_lets_cudnn_pick_its_algorithms_once_per_shape(monkeypatch):
    from kit.infer import Probabilities

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    Probabilities(pointwise, device="cpu")
    assert torch.backends.cudnn.benchmark is False
    Probabilities(pointwise, device="cuda")  # a plain callable: nothing is moved there
    assert torch.backends.cudnn.benchmark is True
