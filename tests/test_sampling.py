import argparse
import functools
import json
import os
import pickle
import shutil
import tracemalloc

import numpy as np
import pandas as pd
import pytest
import torch

from kit.cli import add_train_arguments, config_from_args
from kit.competition import Competition
from kit.data import (
    DataConfig,
    build_caches,
    build_tile_cache,
    cache_stain_stats,
    downscale_mask,
    tile_loader,
    train_transforms,
)
from kit.rle import decode, encode
from kit.sampling import (
    CELL,
    CropDataset,
    build_slide_cache,
    cell_counts,
    crop_window,
    pick,
    region_map,
)
from kit.slides import Slide
from kit.stain import normaliser
from kit.synthetic import make_dataset
from kit.tiling import tissue_mask
from kit.train import TrainConfig, fit, tile_cache_dir

# Awkward sizes: neither the slide nor the cells divide evenly.
SIZE = (470, 590)
CFG = DataConfig(window=128, scale=2, overlap=40, sampling="centred", crops_per_slide=40)
SEEDS = range(12)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(
        tmp_path_factory.mktemp("data") / "ds", slides=4, test_slides=1, size=SIZE, seed=1
    )


@pytest.fixture(scope="module")
def caches(dataset, tmp_path_factory):
    """Slide caches of the training slides, and the cache folder."""
    cache_dir = tmp_path_factory.mktemp("cache")
    ids = Competition(dataset).train_ids
    return [build_slide_cache(dataset, i, CFG, cache_dir, progress=False) for i in ids], cache_dir


@functools.cache
def arrays(folder):
    return {n: np.load(folder / f"{n}.npy") for n in ("image", "mask", "region")}


def draws(ds, seeds=SEEDS):
    return [ds.crop(i, seed) for seed in seeds for i in range(len(ds))]


# --------------------------------------------------------------------------- config


def test_config_checks_the_sampler_fields():
    for bad, match in [
        (dict(sampling="random"), "sampling"),
        (dict(crops_per_slide=0), "crops_per_slide"),
        (dict(crops_per_slide=2.5), "crops_per_slide"),
        (dict(positive_crops=1.2), "positive_crops"),
        (dict(positive_crops=0.7, background_crops=0.4), r"positive_crops \+ background_crops"),
        (dict(crop_shift=0.6), "crop_shift"),
        (dict(region_weights=[0.7, 0.3]), "region_weights"),
        (dict(region_weights=[0.7, -0.2, 0.1]), "region_weights"),
        (dict(region_weights=[0, 0, 0]), "region_weights"),
        (dict(region_weights=["a", 1, 1]), "region_weights"),
    ]:
        with pytest.raises(ValueError, match=match):
            DataConfig(**bad)
    assert DataConfig().sampling == "grid"  # today's behaviour is the default


def test_sampler_options_on_the_command_line_reach_the_config():
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    argv = ["--data", "d", "--out", "o", "--sampling", "centred", "--crops-per-slide", "9"]
    argv += ["--region-weighting", "--region-weights", "0.6", "0.3", "0.1", "--crop-shift", "0.1"]
    cfg = config_from_args(parser.parse_args(argv)).data
    assert (cfg.sampling, cfg.crops_per_slide, cfg.crop_shift) == ("centred", 9, 0.1)
    assert cfg.region_weighting and cfg.region_weights == [0.6, 0.3, 0.1]


def test_sampler_fields_leave_the_grid_tile_cache_alone(dataset, tmp_path):
    slide_id = Competition(dataset).train_ids[0]
    grid = DataConfig(window=128, scale=2, overlap=40)
    first = build_tile_cache(dataset, slide_id, grid, tmp_path, progress=False)
    other = DataConfig(window=128, scale=2, overlap=40, crops_per_slide=7, region_weighting=True)
    assert build_tile_cache(dataset, slide_id, other, tmp_path, progress=False) == first


# --------------------------------------------------------------------------- the slide cache


def test_slide_cache_is_the_slide_downscaled(dataset, caches):
    comp = Competition(dataset)
    folder = caches[0][0]
    slide_id = comp.train_ids[0]
    got = arrays(folder)
    with Slide(comp.slide_path(slide_id)) as slide:
        expected = slide.read(slice(0, SIZE[0]), slice(0, SIZE[1]), CFG.scale)
    np.testing.assert_array_equal(got["image"], expected)
    truth = decode(comp.truth(slide_id), SIZE)
    np.testing.assert_array_equal(got["mask"], downscale_mask(truth, CFG.scale))
    small = got["mask"].shape
    region = region_map(comp.anatomy(slide_id), small, CFG.scale)
    np.testing.assert_array_equal(got["region"], region)
    assert set(np.unique(region)) == {0, 1, 2}  # outside, cortex and medulla all present
    # A block whose full-resolution pixels are all of one region has that region.
    full = region_map(comp.anatomy(slide_id), SIZE, 1).reshape(small[0], 2, small[1], 2)
    uniform = (full.min(axis=(1, 3)) == full.max(axis=(1, 3))).astype(bool)
    np.testing.assert_array_equal(region[uniform], full[:, 0, :, 0][uniform])
    assert uniform.mean() > 0.95
    cells = np.load(folder / "cells.npy")
    tissue = tissue_mask(np.asarray(got["image"]), CFG.tissue_saturation)
    np.testing.assert_array_equal(cells, cell_counts(got["mask"], tissue, region))
    assert cells.shape == (5, -(-small[0] // CELL), -(-small[1] // CELL))
    assert int(cells.sum()) == small[0] * small[1]  # every pixel in exactly one class
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["pixels"]["glomerulus"] == int(got["mask"].sum()) > 0
    assert manifest["size"] == list(small) and manifest["shape"] == list(SIZE)


def test_small_reads_build_the_same_cache_in_less_memory(dataset, caches, tmp_path):
    slide_id = Competition(dataset).train_ids[0]
    tracemalloc.start()
    try:
        folder = build_slide_cache(
            dataset, slide_id, CFG, tmp_path, progress=False, chunk_pixels=64 * 64
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    for name, array in arrays(folder).items():
        np.testing.assert_array_equal(array, arrays(caches[0][0])[name], err_msg=name)
    # Never the full-resolution slide (RGB) at once: the reads are 64 x 64 px (those of the stain
    # statistics' thumbnail aligned to the file's blocks: about half the slide here).
    assert peak < SIZE[0] * SIZE[1] * 3 * 0.7


def test_a_crop_is_the_window_the_grid_would_read_there(dataset, caches):
    """Past the slide edge too: `Slide.read` pads with 0, then downscales."""
    comp = Competition(dataset)
    ds = CropDataset(caches[0][:1], CFG)
    s, t = CFG.scale, CFG.tile
    truth = decode(comp.truth(comp.train_ids[0]), SIZE)
    padded = np.pad(truth, t * s)
    crops = draws(ds, range(6))
    outside = [c for c in crops if min(c.y0, c.x0) < 0 or c.y0 + t > SIZE[0] // s]
    assert len(outside) >= 3
    with Slide(comp.slide_path(comp.train_ids[0])) as slide:
        for crop in outside + crops[:5]:
            image, mask = ds.read(crop)
            rows, cols = (
                slice(crop.y0 * s, (crop.y0 + t) * s),
                slice(crop.x0 * s, (crop.x0 + t) * s),
            )
            np.testing.assert_array_equal(image, slide.read(rows, cols, s))
            window = padded[
                rows.start + t * s : rows.stop + t * s, cols.start + t * s : cols.stop + t * s
            ]
            np.testing.assert_array_equal(mask, downscale_mask(window, s))


def test_crops_equal_the_grid_tiles_where_they_coincide(dataset, caches, tmp_path):
    slide_id = Competition(dataset).train_ids[0]
    grid = DataConfig(window=128, scale=2, overlap=40, tissue_share=1.0, background_share=1.0)
    tiles = build_tile_cache(dataset, slide_id, grid, tmp_path, progress=False)
    index = pd.read_csv(tiles / "index.csv")
    images, masks = np.load(tiles / "images.npy"), np.load(tiles / "masks.npy")
    got = arrays(caches[0][0])
    s, t = grid.scale, grid.tile
    for k, row in enumerate(index.itertuples()):
        y0, x0 = row.y0 // s, row.x0 // s
        np.testing.assert_array_equal(crop_window(got["image"], y0, x0, t), images[k])
        np.testing.assert_array_equal(crop_window(got["mask"], y0, x0, t), masks[k])


def test_cache_is_reused_and_rebuilt_when_its_inputs_change(dataset, tmp_path):
    data = shutil.copytree(dataset, tmp_path / "ds", symlinks=True)
    cache_dir = tmp_path / "cache"
    slide_id = Competition(data).train_ids[0]

    def build(cfg=CFG):
        return build_slide_cache(data, slide_id, cfg, cache_dir, progress=False)

    first = build()
    stamp = (first / "image.npy").stat().st_mtime_ns
    assert build() == first and (first / "image.npy").stat().st_mtime_ns == stamp  # reused
    sampler_only = DataConfig(**{**CFG.__dict__, "crops_per_slide": 3, "window": 64})
    assert build(sampler_only) == first  # crop size and sampler fields do not matter
    assert build(DataConfig(**{**CFG.__dict__, "tissue_saturation": 30})) != first
    assert build(DataConfig(**{**CFG.__dict__, "scale": 4})) != first

    # Another mask: one glomerulus fewer.
    table = pd.read_csv(data / "train.csv", dtype=str, keep_default_na=False)
    mask = decode(table.loc[table.id == slide_id, "encoding"].item(), SIZE)
    ys, xs = np.nonzero(mask)
    mask[ys[0] - 40 : ys[0] + 40, xs[0] - 40 : xs[0] + 40] = 0
    table.loc[table.id == slide_id, "encoding"] = encode(mask)
    table.to_csv(data / "train.csv", index=False)
    second = build()
    assert second != first and (first / "manifest.json").exists()  # both kept: same file
    assert int(np.load(second / "mask.npy").sum()) < int(np.load(first / "mask.npy").sum())

    # Another anatomy file: no Medulla.
    anatomy = data / "train" / f"{slide_id}-anatomical-structure.json"
    features = json.loads(anatomy.read_text())
    kept = [f for f in features if f["properties"]["classification"]["name"] != "Medulla"]
    anatomy.write_text(json.dumps(kept))
    third = build()
    assert third != second and 2 not in np.unique(np.load(third / "region.npy"))

    # A new version of the slide file: rebuilt, the caches of the old one deleted.
    slide = data / "train" / f"{slide_id}.tiff"
    os.utime(slide, ns=(slide.stat().st_atime_ns, slide.stat().st_mtime_ns + 10**9))
    fourth = build()
    assert fourth not in (first, second, third)
    assert sorted(cache_dir.iterdir()) == [fourth]


def test_dataset_refuses_what_is_not_a_slide_cache_of_its_scale(caches, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a slide cache"):
        CropDataset([tmp_path], CFG)
    with pytest.raises(ValueError, match="scale 2, not 4"):
        CropDataset(caches[0][:1], DataConfig(**{**CFG.__dict__, "scale": 4}))


# --------------------------------------------------------------------------- crops


def test_positive_crops_are_centred_on_glomeruli_within_the_shift(caches):
    cfg = DataConfig(**{**CFG.__dict__, "positive_crops": 1.0, "background_crops": 0.0})
    ds = CropDataset(caches[0], cfg)
    shift, half = int(cfg.crop_shift * cfg.tile), cfg.tile // 2
    offsets = []
    for crop in draws(ds):
        mask = arrays(caches[0][crop.slide])["mask"]
        assert crop.kind == "positive" and mask[crop.y, crop.x] == 1
        cy, cx = crop.y0 + half, crop.x0 + half
        offsets.append((cy - crop.y, cx - crop.x))
        # A glomerulus pixel within the shift of the crop's centre.
        assert mask[max(cy - shift, 0) : cy + shift + 1, max(cx - shift, 0) : cx + shift + 1].any()
    offsets = np.array(offsets)
    assert np.abs(offsets).max() == shift  # the whole range is used, never more
    assert abs(offsets.mean()) < 1.0  # symmetric (sd of the mean ~0.3 px)
    still = CropDataset(caches[0], DataConfig(**{**cfg.__dict__, "crop_shift": 0.0}))
    assert all((c.y0 + half, c.x0 + half) == (c.y, c.x) for c in draws(still, range(2)))


def test_kinds_come_in_the_configured_shares_on_their_pixels(caches):
    cfg = DataConfig(**{**CFG.__dict__, "positive_crops": 0.3, "background_crops": 0.2})
    ds = CropDataset(caches[0], cfg)
    crops = draws(ds)
    kinds = pd.Series([c.kind for c in crops]).value_counts(normalize=True)
    assert kinds.to_dict() == pytest.approx({"positive": 0.3, "tissue": 0.5, "background": 0.2})
    for crop in crops[:400]:
        got = arrays(caches[0][crop.slide])
        pixel = np.asarray(got["image"][crop.y : crop.y + 1, crop.x : crop.x + 1])
        tissue = bool(tissue_mask(pixel, cfg.tissue_saturation)[0, 0])
        glomerulus = got["mask"][crop.y, crop.x] == 1
        expected = "positive" if glomerulus else "tissue" if tissue else "background"
        assert crop.kind == expected
    # Each slide gets its crops_per_slide.
    per_slide = len(SEEDS) * cfg.crops_per_slide
    assert np.bincount([c.slide for c in crops]).tolist() == [per_slide] * len(caches[0])


def test_uniform_draws_follow_the_pixel_counts(caches):
    """Without weights, a tissue crop's region is that of a uniformly drawn tissue pixel."""
    cfg = DataConfig(**{**CFG.__dict__, "positive_crops": 0.0, "crops_per_slide": 300})
    crops = draws(CropDataset(caches[0][:1], cfg), range(4))
    tissue = [c for c in crops if c.kind == "tissue"]
    background = len(crops) - len(tissue)
    assert background == 4 * 30  # 0.1 of 300 per epoch
    pixels = json.loads((caches[0][0] / "manifest.json").read_text())["pixels"]
    n = [pixels[f"tissue {r}"] for r in ("outside", "cortex", "medulla")]
    region = arrays(caches[0][0])["region"]
    share = np.mean([region[c.y, c.x] == 1 for c in tissue])
    assert share == pytest.approx(n[1] / sum(n), abs=0.04)  # sd ~0.01 over 1080 draws


def test_region_weights_change_the_share_of_cortex_crops(caches):
    folder = caches[0][0]
    region = arrays(folder)["region"]
    pixels = json.loads((folder / "manifest.json").read_text())["pixels"]
    n_out, n_cortex, n_medulla = (pixels[f"tissue {r}"] for r in ("outside", "cortex", "medulla"))

    def cortex_share(weighting, weights=(0.7, 0.2, 0.1)):
        fields = dict(positive_crops=0.0, background_crops=0.0, crops_per_slide=300)
        fields |= dict(region_weighting=weighting, region_weights=list(weights))
        cfg = DataConfig(**{**CFG.__dict__, **fields})
        crops = draws(CropDataset([folder], cfg), range(4))
        return np.mean([region[c.y, c.x] == 1 for c in crops]), crops

    uniform, _ = cortex_share(False)
    weighted, _ = cortex_share(True)
    expected = 0.7 * n_cortex / (0.7 * n_cortex + 0.2 * n_medulla + 0.1 * n_out)
    assert uniform == pytest.approx(n_cortex / (n_out + n_cortex + n_medulla), abs=0.04)
    assert weighted == pytest.approx(expected, abs=0.04)
    assert weighted > uniform + 0.05
    _, medulla_only = cortex_share(True, (0.0, 1.0, 0.0))
    assert {int(region[c.y, c.x]) for c in medulla_only} == {2}


def test_a_slide_without_glomeruli_gives_tissue_crops_instead(dataset, tmp_path):
    data = shutil.copytree(dataset, tmp_path / "ds", symlinks=True)
    slide_id = Competition(data).train_ids[0]
    table = pd.read_csv(data / "train.csv", dtype=str, keep_default_na=False)
    table.loc[table.id == slide_id, "encoding"] = ""
    table.to_csv(data / "train.csv", index=False)
    folder = build_slide_cache(data, slide_id, CFG, tmp_path / "cache", progress=False)
    crops = draws(CropDataset([folder], CFG), range(2))
    counts = pd.Series([c.kind for c in crops]).value_counts().to_dict()
    assert counts == {"tissue": 2 * 36, "background": 2 * 4}  # the 20 positives became tissue


def test_pick_follows_its_weights():
    rng = np.random.default_rng(0)
    got = np.bincount([pick(np.array([0.0, 3.0, 0.0, 1.0]), rng) for _ in range(4000)], minlength=4)
    assert got[0] == got[2] == 0 and got[1] / 4000 == pytest.approx(0.75, abs=0.03)
    with pytest.raises(ValueError, match="every weight is 0"):
        pick(np.zeros(3), rng)


# --------------------------------------------------------------------------- dataset and loader


def test_items_are_the_crops_read_from_the_cache(caches):
    ds = CropDataset(caches[0], CFG)
    crop = ds.crop(5, seed=11)
    image, mask = ds[5, 11]
    got = arrays(caches[0][crop.slide])
    expected = crop_window(got["image"], crop.y0, crop.x0, CFG.tile)
    assert image.shape == (3, CFG.tile, CFG.tile) and mask.shape == (1, CFG.tile, CFG.tile)
    np.testing.assert_allclose(image.numpy().transpose(1, 2, 0) * 255, expected, atol=1e-3)
    np.testing.assert_array_equal(
        mask[0].numpy(), crop_window(got["mask"], crop.y0, crop.x0, CFG.tile)
    )
    assert ds.crop(5, seed=11) == crop and ds.crop(5, seed=12) != crop
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_pickling_the_dataset_does_not_carry_the_arrays(caches):
    plain = CropDataset(caches[0], CFG)
    fresh = pickle.dumps(plain)
    plain[0, 1]  # maps the arrays in this process
    assert pickle.dumps(plain) == fresh  # the maps and the per-process tables stay behind
    assert len(fresh) < 2000 < (caches[0][0] / "image.npy").stat().st_size
    ds = CropDataset(caches[0], CFG, train_transforms())
    ds[0, 1]
    clone = pickle.loads(pickle.dumps(ds))
    for a, b in zip(clone[3, 9], ds[3, 9], strict=True):
        assert torch.equal(a, b)


def test_epochs_draw_other_crops_and_a_seed_draws_the_same_with_any_workers(caches):
    ds = CropDataset(caches[0], CFG, train_transforms())

    def epoch(loader, number):
        torch.manual_seed(number)  # as kit.train seeds every epoch from (seed, epoch)
        return torch.cat([masks for _, masks in loader])

    alone = tile_loader(ds, 8, shuffle=True)
    first, second = epoch(alone, 1), epoch(alone, 2)
    assert not torch.equal(first, second)
    assert torch.equal(epoch(tile_loader(ds, 8, shuffle=True, workers=1), 2), second)


# --------------------------------------------------------------------------- training


@pytest.mark.slow  # tens of seconds on 2 cores: the whole-slide validation
def test_fit_trains_on_centred_crops(dataset, tmp_path):
    ids = Competition(dataset).train_ids
    cfg = TrainConfig(
        data_dir=str(dataset), out=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
        valid=[ids[0]], model="lraspp_mobilenet_v3_large", epochs=1, batch_size=4, workers=0,
        device="cpu", progress=False,
        data=dict(window=128, scale=2, overlap=0, sampling="centred", crops_per_slide=6),
        infer=dict(overlap=32),
    )  # fmt: skip
    result = fit(cfg)
    assert len(result["history"]) == 1 and np.isfinite(result["history"][0]["train_loss"])
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["train"]["data"]
    assert saved["sampling"] == "centred" and saved["crops_per_slide"] == 6
    names = [p.name for p in tile_cache_dir(cfg).iterdir()]
    # Slide caches for the training slides, grid tiles only for the held-out one.
    assert sorted(n.split("-slide-")[0] for n in names if "-slide-" in n) == sorted(ids[1:])
    assert [n.split("-")[0] for n in names if "-slide-" not in n] == [ids[0]]


# --------------------------------------------------------------------------- with the other options


def test_crops_are_stain_normalised_from_their_slides_statistics(caches):
    folders = caches[0]
    stats = [cache_stain_stats(f) for f in folders]
    assert all(s is not None for s in stats)
    target = np.array([[150.0, 140.0, 120.0], [30.0, 6.0, 5.0]])
    plain, mapped = (
        CropDataset(folders, CFG),
        CropDataset(folders, CFG, stain_norm="reinhard", stain_target=target),
    )
    moved = 0
    for i in range(0, len(plain), 7):
        crop = mapped.crop(i, 3)
        raw = plain.read(crop)[0]
        want = normaliser(stats[crop.slide], target, "reinhard")(raw)
        got = mapped[i, 3][0].numpy().transpose(1, 2, 0) * 255
        np.testing.assert_allclose(got, want, atol=1e-3)
        moved += np.abs(want.astype(int) - raw).mean() > 1
    assert moved > 0  # the mapping changes the crops (this target is far from the slides')


def test_pseudo_labels_give_the_slide_cache_its_mask(dataset, tmp_path):
    slide_id = Competition(dataset).test_ids[0]
    with Slide(Competition(dataset).slide_path(slide_id)) as slide:
        shape = slide.shape
    box = np.zeros(shape, np.uint8)
    box[100:260, 150:330] = 1
    folder = build_caches(
        dataset, [slide_id], CFG, tmp_path, masks={slide_id: encode(box)}, build=build_slide_cache
    )[0]
    np.testing.assert_array_equal(np.load(folder / "mask.npy"), downscale_mask(box, CFG.scale))
    other = build_caches(
        dataset,
        [slide_id],
        CFG,
        tmp_path,
        masks={slide_id: encode(box * 0)},
        build=build_slide_cache,
    )[0]
    assert other != folder and not np.load(other / "mask.npy").any()
