import json
import os
import pickle
import subprocess
import sys
import time

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from kit import data
from kit.competition import Competition, read_polygons
from kit.data import (
    DataConfig,
    TileDataset,
    build_tile_cache,
    default_workers,
    downscale_mask,
    eval_transforms,
    group_folds,
    index_slide,
    init_worker,
    mask_source,
    select_tiles,
    split_slides,
    tile_loader,
    train_transforms,
)
from kit.infer import InferConfig, predict_slide
from kit.rle import decode
from kit.slides import Slide
from kit.stain import Normaliser, slide_stats, target_stats
from kit.synthetic import make_dataset
from kit.tiling import has_tissue, plan, tissue_mask

# Awkward sizes: neither the slide nor the grid stride divides evenly.
SIZE = (470, 590)
CFG = DataConfig(window=128, scale=2, overlap=40)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(
        tmp_path_factory.mktemp("data") / "ds", slides=4, test_slides=1, size=SIZE, seed=1
    )


def full_mask(data_dir, slide_id):
    table = pd.read_csv(data_dir / "train.csv", index_col="id")
    return decode(table.at[slide_id, "encoding"], SIZE)


def window_of(array, y0, x0, y1, x1):
    """array[y0:y1, x0:x1] with zero padding outside."""
    out = np.zeros((y1 - y0, x1 - x0) + array.shape[2:], array.dtype)
    a, b = max(y0, 0), min(y1, array.shape[0])
    c, d = max(x0, 0), min(x1, array.shape[1])
    out[a - y0 : b - y0, c - x0 : d - x0] = array[a:b, c:d]
    return out


def test_data_config_rejects_bad_values():
    with pytest.raises(ValueError, match="multiple of scale"):
        DataConfig(window=100, scale=3)
    with pytest.raises(ValueError, match="overlap"):
        DataConfig(window=128, scale=2, overlap=128)
    with pytest.raises(ValueError, match="tissue_share"):
        DataConfig(tissue_share=1.5)
    with pytest.raises(ValueError, match="mask_source"):
        DataConfig(mask_source="png")


def test_downscale_mask_is_a_majority_vote():
    mask = np.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 1], [1, 1, 1, 1, 1], [1, 0, 0, 1, 0]], np.uint8)
    # 2 x 2 blocks, the last column padded with 0: 3/4, 1/4, 1/4 over 3/4, 3/4, 1/4.
    out = downscale_mask(mask, 2)
    assert out.dtype == np.uint8
    assert out.tolist() == [[1, 0, 0], [1, 1, 0]]
    assert downscale_mask(mask, 1) is mask


def test_index_labels_every_window_from_the_mask(dataset):
    slide_id = Competition(dataset).train_ids[0]
    path = Competition(dataset).slide_path(slide_id)
    strip, _ = mask_source(dataset, slide_id, SIZE)
    index = index_slide(path, strip, CFG, slide_id)
    mask = full_mask(dataset, slide_id)
    assert len(index) == len(data.plan(SIZE, CFG.window, CFG.overlap, align=CFG.scale))
    for row in index.itertuples():
        expected = window_of(mask, row.y0, row.x0, row.y1, row.x1).sum() / CFG.window**2
        assert row.mask_fraction == pytest.approx(expected)
        if expected >= CFG.min_mask_fraction and expected > 0:
            assert row.kind == "positive"
        else:
            tissue = has_tissue(row.tissue_fraction, CFG.min_tissue)
            assert row.kind == ("tissue" if tissue else "background")
    assert set(index["kind"]) == {"positive", "tissue", "background"}
    assert (index["kind"] == "positive").any() and (index["kind"] != "positive").any()


def test_select_keeps_all_positives_and_a_seeded_share_of_negatives():
    kinds = ["positive"] * 30 + ["tissue"] * 400 + ["background"] * 600
    index = pd.DataFrame({"id": "s1", "y0": np.arange(len(kinds)), "kind": kinds})
    cfg = DataConfig(tissue_share=0.5, background_share=0.1, seed=7)
    kept = select_tiles(index, cfg)
    counts = kept["kind"].value_counts()
    assert counts["positive"] == 30
    assert 160 <= counts["tissue"] <= 240  # 200 expected; binomial sd 10
    assert 35 <= counts["background"] <= 85  # 60 expected; sd 7.3
    assert kept.equals(select_tiles(index, cfg))  # deterministic
    assert not kept.equals(select_tiles(index, DataConfig(tissue_share=0.5, background_share=0.1)))
    none = select_tiles(index, DataConfig(tissue_share=0.0, background_share=0.0))
    assert set(none["kind"]) == {"positive"} and len(none) == 30
    assert len(select_tiles(index, DataConfig(tissue_share=1.0, background_share=1.0))) == 1030


def test_cache_holds_the_slide_windows_and_their_masks(dataset, tmp_path):
    slide_id = Competition(dataset).train_ids[1]
    folder = build_tile_cache(dataset, slide_id, CFG, tmp_path, progress=False)
    images = np.load(folder / "images.npy", mmap_mode="r", allow_pickle=False)
    masks = np.load(folder / "masks.npy", mmap_mode="r", allow_pickle=False)
    index = pd.read_csv(folder / "index.csv", dtype={"id": str})
    manifest = json.loads((folder / "manifest.json").read_text())
    n, t = len(index), CFG.tile
    assert images.shape == (n, t, t, 3) and images.dtype == np.uint8
    assert masks.shape == (n, t, t) and masks.dtype == np.uint8
    assert manifest["count"] == n and folder.name == f"{slide_id}-{manifest['key'][:16]}"
    assert sum(manifest["kinds"].values()) == n
    assert set(index["id"]) == {slide_id}
    mask = full_mask(dataset, slide_id)
    with Slide(Competition(dataset).slide_path(slide_id)) as slide:
        for i, row in enumerate(index.itertuples()):
            rows, cols = slice(row.y0, row.y1), slice(row.x0, row.x1)
            np.testing.assert_array_equal(images[i], slide.read(rows, cols, CFG.scale))
            expected = downscale_mask(window_of(mask, row.y0, row.x0, row.y1, row.x1), CFG.scale)
            np.testing.assert_array_equal(masks[i], expected)
    assert set(np.unique(masks)) <= {0, 1}
    assert not list(tmp_path.glob(".*"))  # no temporary folder left behind


def test_cache_is_reused_and_rebuilt_when_an_input_changes(dataset, tmp_path):
    slide_id = Competition(dataset).train_ids[0]
    first = build_tile_cache(dataset, slide_id, CFG, tmp_path, progress=False)
    stamp = (first / "images.npy").stat().st_mtime_ns
    assert build_tile_cache(dataset, slide_id, CFG, tmp_path, progress=False) == first
    assert (first / "images.npy").stat().st_mtime_ns == stamp  # reused, not rewritten

    other = DataConfig(**{**CFG.__dict__, "background_share": 0.5})
    assert build_tile_cache(dataset, slide_id, other, tmp_path, progress=False) != first
    assert len(list(tmp_path.iterdir())) == 2  # other parameters: both kept

    # A slide file touched (same bytes, new mtime) counts as a new input.
    path = Competition(dataset).slide_path(slide_id)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        touched = build_tile_cache(dataset, slide_id, CFG, tmp_path, progress=False)
    finally:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert touched != first
    # Every cache of the old file version is gone, whatever its parameters.
    assert [p.name for p in tmp_path.iterdir()] == [touched.name]
    rebuilt = build_tile_cache(dataset, slide_id, CFG, tmp_path, progress=False)
    assert rebuilt == first and [p.name for p in tmp_path.iterdir()] == [first.name]


def test_cache_key_follows_the_annotation(dataset, tmp_path):
    copy = tmp_path / "copy"
    (copy / "train").mkdir(parents=True)
    slide_id = Competition(dataset).train_ids[0]
    os.link(Competition(dataset).slide_path(slide_id), copy / "train" / f"{slide_id}.tiff")
    table = pd.read_csv(dataset / "train.csv", dtype=str)
    table.to_csv(copy / "train.csv", index=False)
    first = build_tile_cache(copy, slide_id, CFG, tmp_path / "cache", progress=False)
    table.loc[table["id"] == slide_id, "encoding"] = "1 5"
    table.to_csv(copy / "train.csv", index=False)
    second = build_tile_cache(copy, slide_id, CFG, tmp_path / "cache", progress=False)
    assert second != first
    assert np.load(second / "masks.npy").sum() < np.load(first / "masks.npy").sum()


def test_failed_build_leaves_nothing_behind(dataset, tmp_path, monkeypatch):
    slide_id = Competition(dataset).train_ids[0]
    calls = []

    def failing_read(self, rows, cols, scale=1):
        calls.append(1)
        if len(calls) > 2:
            raise ValueError("disk on fire")
        return original(self, rows, cols, scale)

    original = Slide.read
    monkeypatch.setattr(Slide, "read", failing_read)
    with pytest.raises(ValueError, match="disk on fire"):
        build_tile_cache(dataset, slide_id, CFG, tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(Slide, "read", original)
    # A build killed outright (SIGKILL) cannot clean up: the next build of the slide does.
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    orphan = tmp_path / f".{slide_id}-{dead.stdout.strip()}-x1y2"
    (orphan / "images.npy").parent.mkdir()
    (orphan / "images.npy").write_bytes(b"partial")
    folder = build_tile_cache(dataset, slide_id, CFG, tmp_path, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]


def test_json_polygons_give_the_rle_masks(dataset, tmp_path):
    slide_id = Competition(dataset).train_ids[0]
    rle = build_tile_cache(dataset, slide_id, CFG, tmp_path, progress=False)
    cfg = DataConfig(**{**CFG.__dict__, "mask_source": "json"})
    poly = build_tile_cache(dataset, slide_id, cfg, tmp_path, progress=False)
    a, b = np.load(rle / "masks.npy"), np.load(poly / "masks.npy")
    assert a.sum() > 0
    np.testing.assert_array_equal(a, b)


def test_json_masks_are_the_union_of_the_polygons_minus_their_holes(tmp_path):
    def box(x0, y0, x1, y1):
        return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]

    doc = [
        # A polygon with a hole, and one overlapping it.
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [box(10, 5, 20, 15)]}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [box(18, 2, 26, 9)]}},
        # A MultiPolygon, one part of which fills part of the first polygon's hole.
        {
            "type": "Feature",
            "geometry": {
                "type": "MultiPolygon",
                "coordinates": [[box(30, 2, 34, 6)], [box(14, 8, 15, 10)]],
            },
        },
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 1]}},
    ]
    doc[0]["geometry"]["coordinates"].append(box(12, 7, 16, 11))
    (tmp_path / "train").mkdir()
    path = tmp_path / "train" / "s.json"
    path.write_text(json.dumps(doc))

    polygons = read_polygons(path)
    assert [p[0].shape for p in polygons] == [(5, 2)] * 4  # exterior rings first
    assert [len(p) for p in polygons] == [2, 1, 1, 1]
    np.testing.assert_array_equal(polygons[0][1][0], [12, 7])

    # Pixel (r, c) is foreground when its centre (c + 0.5, r + 0.5) is inside (kit.polygons).
    shape = (23, 41)
    expected = np.zeros(shape, np.uint8)
    expected[5:15, 10:20] = 1
    expected[7:11, 12:16] = 0  # the hole
    expected[2:9, 18:26] = 1  # the overlap stays foreground
    expected[2:6, 30:34] = 1
    expected[8:10, 14:15] = 1  # a polygon inside the hole
    strip, _ = mask_source(tmp_path, "s", shape, "json")
    for cols in (slice(0, 41), slice(0, 12), slice(12, 31), slice(31, 41)):
        np.testing.assert_array_equal(strip(cols), expected[:, cols])
    path.write_text('{"features": [{"geometry": 3}]}')
    with pytest.raises(ValueError, match="s.json"):
        read_polygons(path)


def test_tissue_negatives_are_the_tiles_inference_predicts(tmp_path, write_tiff):
    """One tissue rule: with the inference grid, a negative window is "tissue" exactly when
    inference predicts that tile, and "background" exactly when inference skips it."""
    shape = (190, 330)
    rng = np.random.default_rng(0)
    image = (235 + rng.integers(0, 6, (*shape, 3))).astype(np.uint8)  # bright grey glass
    image[20:90, 200:300] = (200, 80, 160)  # a block of pink tissue
    image[141:144, 61:64] = (200, 80, 160)  # a speck: a few tissue pixels at scale 2
    path = write_tiff(tmp_path / "s.tiff", image)
    window, overlap, scale = 64, 16, 2
    cfg = DataConfig(window=window, scale=scale, overlap=overlap)
    infer = InferConfig(window=window, overlap=overlap, scale=scale)
    assert (cfg.min_tissue, cfg.tissue_saturation) == (infer.min_tissue, infer.tissue_saturation)

    def no_glomeruli(cols):
        return np.zeros((shape[0], cols.stop - cols.start), np.uint8)

    def always_on(x):
        return torch.full((x.shape[0], 1, *x.shape[2:]), 10.0)

    index = index_slide(path, no_glomeruli, cfg, "s")
    predicted = predict_slide(path, always_on, infer)  # 1 on the core of every predicted tile
    tiles = plan(shape, window, overlap, align=scale)
    assert len(index) == len(tiles)
    for row, tile in zip(index.itertuples(), tiles, strict=True):
        assert (row.y0, row.x0, row.y1, row.x1) == (tile.y0, tile.x0, tile.y1, tile.x1)
        core = predicted[tile.core]
        assert core.all() or not core.any()
        assert row.kind == ("tissue" if core.all() else "background"), tile

    # The rule is on the core, as the model sees it: the speck's tile is a tissue negative
    # although tissue covers a tiny share of it, and tiles with tissue only in their margins
    # (which lies in a neighbour's core) are background.
    speck = index[(index.y0 <= 141) & (index.y1 >= 144) & (index.x0 <= 61) & (index.x1 >= 64)]
    assert 0 < speck.loc[speck["kind"] == "tissue", "tissue_fraction"].max() < 0.05
    seen = tissue_mask(image)
    margin_only = [
        row.kind == "background" and seen[max(row.y0, 0) : row.y1, max(row.x0, 0) : row.x1].any()
        for row in index.itertuples()
    ]
    assert any(margin_only)
    assert 0 < (index["kind"] == "tissue").sum() < len(index)


def test_dataset_items_are_float_tensors(dataset, tmp_path):
    folders = data.build_caches(
        dataset, Competition(dataset).train_ids, CFG, tmp_path, progress=False
    )
    plain = TileDataset(folders, eval_transforms())
    assert len(plain) == len(plain.index) > 0
    image, mask = plain[len(plain) - 1]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert mask.shape == (1, 64, 64) and mask.dtype == torch.float32
    last = np.load(folders[-1] / "images.npy")[-1]
    np.testing.assert_allclose(image.numpy(), last.transpose(2, 0, 1) / 255, atol=1e-7)
    assert set(torch.unique(mask).tolist()) <= {0.0, 1.0}
    with pytest.raises(IndexError):
        plain[len(plain)]

    augmented = TileDataset(folders, train_transforms(seed=0))
    for i in range(len(augmented)):
        image, mask = augmented[i]
        assert 0 <= image.min() and image.max() <= 1
        assert set(torch.unique(mask).tolist()) <= {0.0, 1.0}
    # Pickled for worker processes without the memory-mapped arrays.
    assert len(pickle.dumps(plain)) < 100_000
    loader = torch.utils.data.DataLoader(augmented, batch_size=4, num_workers=2)
    assert sum(len(x) for x, _ in loader) == len(augmented)


def test_stain_normalised_tiles_map_each_slide_onto_the_target(dataset, tmp_path):
    ids = Competition(dataset).train_ids[:2]
    folders = data.build_caches(dataset, ids, CFG, tmp_path, progress=False)
    stained = DataConfig(**{**CFG.__dict__, "stain_norm": "reinhard"})
    # Tiles are cached as read: the normalisation is not a cache input.
    assert data.build_caches(dataset, ids, stained, tmp_path, progress=False) == folders
    stats = []
    for slide_id, folder in zip(ids, folders, strict=True):
        with Slide(Competition(dataset).slide_path(slide_id)) as slide:
            stats.append(slide_stats(slide))
        np.testing.assert_allclose(data.cache_stain_stats(folder), stats[-1])
    target = target_stats(stats)
    ds = TileDataset(folders, eval_transforms(), stain_norm="reinhard", stain_target=target)
    plain = TileDataset(folders, eval_transforms())
    for i in (0, len(ds) - 1):  # a tile of each slide
        part = 0 if i < len(TileDataset(folders[:1])) else 1
        raw = np.load(folders[part] / "images.npy")[i if part == 0 else -1]
        expected = Normaliser(stats[part], target)(raw).transpose(2, 0, 1) / 255
        np.testing.assert_allclose(ds[i][0].numpy(), expected, atol=1e-7)
        assert (ds[i][0] - plain[i][0]).abs().mean() > 0.005  # the slides differ from the mean
        assert torch.equal(ds[i][1], plain[i][1])
    with pytest.raises(ValueError, match="needs target statistics"):
        TileDataset(folders, stain_norm="reinhard")


def test_stain_augmentation_is_seeded_and_changes_a_tissue_tile(dataset, tmp_path):
    folder = build_tile_cache(dataset, Competition(dataset).train_ids[1], CFG, tmp_path)
    images = np.load(folder / "images.npy")
    tile = images[np.argmax([tissue_mask(t).mean() for t in images])]
    assert not any(isinstance(t, A.HEStain) for t in train_transforms().transforms)
    pipeline = train_transforms(stain_augment=0.5)
    (stain,) = [t for t in pipeline.transforms if isinstance(t, A.HEStain)]
    assert stain.p == 0.5

    def augmented(transform, seed):
        transform.set_random_seed(seed)
        return transform(image=tile)["image"]

    np.testing.assert_array_equal(augmented(pipeline, 7), augmented(pipeline, 7))
    stain.p = 1.0
    first, again, other = augmented(stain, 7), augmented(stain, 7), augmented(stain, 8)
    np.testing.assert_array_equal(first, again)
    tissue = tissue_mask(tile)
    colour = np.abs(first.astype(float) - tile)[tissue].mean()
    assert colour > 5 and np.abs(other.astype(float) - first)[tissue].mean() > 2
    with pytest.raises(ValueError, match="stain_augment"):
        train_transforms(stain_augment=1.5)


def test_default_workers_share_the_cpus_among_the_processes():
    # (cpus, processes on the machine) -> workers per process, one CPU left to each process.
    cases = {(4, 1): 3, (4, 2): 1, (2, 1): 1, (2, 2): 0, (1, 1): 0, (3, 2): 0, (16, 1): 8}
    assert {k: default_workers(*k) for k in cases} == cases  # 16 CPUs: at most MAX_WORKERS
    with pytest.raises(ValueError, match="local_world must be >= 1, got 4 and 0"):
        default_workers(4, 0)


class WorkerProbe(torch.utils.data.Dataset):
    """Items say which process read them and with how many OpenCV threads."""

    def __len__(self):
        return 6

    def __getitem__(self, item):
        return torch.tensor([os.getpid(), cv2.getNumThreads()])


def test_loader_workers_persist_with_one_opencv_thread_each():
    threads = cv2.getNumThreads()
    cv2.setNumThreads(3)  # what a worker would inherit
    # Start OpenCV's pool and let its threads fall asleep, as after building the tile caches: a
    # worker forked now that calls cv2.setNumThreads waits for them forever.
    cv2.resize(np.ones((50, 60), np.float32), (2000, 2400), interpolation=cv2.INTER_CUBIC)
    time.sleep(0.5)
    try:
        loader = tile_loader(WorkerProbe(), 2, workers=2)
        loader.timeout = 30  # a stuck worker fails the test instead of hanging it
        epochs = [[tuple(row) for row in torch.cat(list(loader)).tolist()] for _ in range(2)]
    finally:
        cv2.setNumThreads(threads)
    assert loader.persistent_workers and loader.worker_init_fn is init_worker
    assert {t for _, t in epochs[0] + epochs[1]} == {1}
    workers = {p for p, _ in epochs[0]}
    assert len(workers) == 2 and os.getpid() not in workers
    assert {p for p, _ in epochs[1]} == workers  # the same processes: not started again
    assert not tile_loader(WorkerProbe(), 2, workers=0).persistent_workers


def test_augmentation_depends_on_the_seed_alone_not_on_the_workers(dataset, tmp_path):
    """Batches are the same with 0 or 2 workers, and a loader started at epoch 2 (a resumed run)
    gives what the loader whose workers persisted since epoch 1 gives."""
    folders = data.build_caches(
        dataset, Competition(dataset).train_ids, CFG, tmp_path, progress=False
    )
    ds = TileDataset(folders, train_transforms())

    def epoch(loader, number):
        torch.manual_seed(number)  # as kit.train seeds every epoch
        return torch.cat([images for images, _ in loader])

    def loader(workers):
        return tile_loader(ds, 4, workers=workers, shuffle=True)

    alone, shared = loader(0), loader(2)
    first, second = epoch(alone, 1), epoch(alone, 2)
    assert not torch.equal(first, second)
    assert torch.equal(epoch(shared, 1), first) and torch.equal(epoch(shared, 2), second)
    assert torch.equal(epoch(loader(2), 2), second)


def test_dataset_refuses_a_folder_that_is_not_a_cache(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a tile cache"):
        TileDataset([tmp_path])


def test_splits_never_share_a_slide_or_a_patient():
    ids = [f"s{i}" for i in range(9)]
    patients = {"s0": "a", "s1": "a", "s2": "a", "s3": "b", "s4": "b", "s5": "c", "s6": "d"}
    folds = group_folds(ids, 3, patients)
    assert sorted(sum(folds, [])) == sorted(ids)  # a partition
    assert sorted(len(f) for f in folds) == [3, 3, 3]  # balanced: {a}, {b, c}, {d, s7, s8}
    for k in range(3):
        train, valid = split_slides(ids, fold=k, n_folds=3, groups=patients)
        assert not set(train) & set(valid) and sorted(train + valid) == sorted(ids)
        train_patients = {patients.get(i, i) for i in train}
        assert not train_patients & {patients.get(i, i) for i in valid}
    # By slide: each fold holds whole slides, every slide held out exactly once.
    held = [split_slides(ids, fold=k, n_folds=3)[1] for k in range(3)]
    assert sorted(sum(held, [])) == sorted(ids)


def test_explicit_split_and_its_errors():
    ids = ["aa", "bb", "cc"]
    assert split_slides(ids, valid=["cc", "aa"]) == (["bb"], ["aa", "cc"])
    with pytest.raises(ValueError, match="'zz'"):
        split_slides(ids, valid=["aa", "zz"])
    with pytest.raises(ValueError, match="no training slides"):
        split_slides(ids, valid=ids)
    with pytest.raises(ValueError, match="fold"):
        split_slides(ids, fold=3, n_folds=3)
    with pytest.raises(ValueError, match="n_folds"):
        split_slides(ids, fold=0, n_folds=4)
    with pytest.raises(ValueError, match="valid ids or a fold"):
        split_slides(ids)
