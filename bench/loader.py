"""Is the data loader the bottleneck? Tile cache vs per-sample TIFF reads vs the training step.

    .venv/bin/python bench/loader.py                     # synthetic default dataset, quick preset
    .venv/bin/python bench/loader.py --data DIR --window 1024 --scale 4 --batch 16 --workers 4

Three rates, in samples (tiles) per second:

1. cache: a DataLoader over the tile cache (``kit.data.TileDataset``, train transforms);
2. tiff: the seeds' way, per sample: open the TIFF, read the full-resolution window, resize it
   (cv2 INTER_AREA), cut the mask from the slide's decoded mask, same transforms;
3. step: the quick preset's model, one training step (forward, loss, backward, AdamW) per batch.

The loader keeps up when cache / step > 1 (the data then waits for the model, not the reverse).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from kit.competition import Competition
from kit.data import (
    DataConfig,
    TileDataset,
    build_caches,
    seed_worker,
    train_transforms,
)
from kit.losses import BCEDiceLoss
from kit.model import build_model
from kit.rle import decode
from kit.slides import Slide
from kit.train import PRESETS


class TiffWindows(Dataset):
    """The seeds' dataset: every sample reopens the slide and reads and resizes its window."""

    def __init__(self, data_dir: Path, index: pd.DataFrame, cfg: DataConfig, transforms):
        self.data_dir, self.index, self.cfg, self.transforms = data_dir, index, cfg, transforms
        self.comp = Competition(data_dir)  # the one reader of the competition folder
        self.masks = {}
        for slide_id in index["id"].unique():  # the seeds kept every whole mask in memory
            with Slide(self.comp.slide_path(slide_id)) as slide:
                self.masks[slide_id] = decode(self.comp.truth(slide_id), slide.shape)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        row = self.index.iloc[i]
        rows, cols = slice(int(row.y0), int(row.y1)), slice(int(row.x0), int(row.x1))
        with Slide(self.comp.slide_path(row.id)) as slide:
            image = slide.read(rows, cols)
        mask = np.zeros(image.shape[:2], np.uint8)
        part = self.masks[row.id][max(rows.start, 0) : rows.stop, max(cols.start, 0) : cols.stop]
        mask[: part.shape[0], : part.shape[1]] = part
        size = (self.cfg.tile, self.cfg.tile)
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
        out = self.transforms(image=image, mask=mask)
        image = torch.from_numpy(out["image"].transpose(2, 0, 1).copy()).float().div_(255)
        return image, torch.from_numpy(out["mask"])[None].float()


def loader_rate(ds: Dataset, batch: int, workers: int, samples: int) -> float:
    """Samples per second drawn from a shuffled DataLoader (after its first batch)."""
    loader = DataLoader(
        ds, batch_size=batch, shuffle=True, num_workers=workers, worker_init_fn=seed_worker
    )
    seen, start = 0, None
    while True:
        for images, _ in loader:
            if start is None:  # worker start-up is a one-off cost, not a rate
                start = time.perf_counter()
                continue
            seen += len(images)
            if seen >= samples:
                return seen / (time.perf_counter() - start)


def step_rate(model_name: str, tile: int, batch: int, steps: int) -> float:
    """Samples per second through forward, loss, backward and an AdamW step on the CPU."""
    torch.manual_seed(0)
    model = build_model(model_name).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    criterion = BCEDiceLoss()
    x = torch.rand(batch, 3, tile, tile)
    y = (torch.rand(batch, 1, tile, tile) > 0.7).float()
    for i in range(steps + 1):
        if i == 1:  # the first step allocates: leave it out
            start = time.perf_counter()
        loss = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    quick = PRESETS["quick"]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, help="competition folder (default: synthetic default)")
    p.add_argument("--cache-dir", type=Path, default=Path("runs/tile-cache"))
    p.add_argument("--window", type=int, default=quick["data"]["window"])
    p.add_argument("--scale", type=int, default=quick["data"]["scale"])
    p.add_argument("--batch", type=int, default=quick["batch_size"])
    p.add_argument("--workers", type=int, default=quick["workers"])
    p.add_argument("--samples", type=int, default=160, help="samples timed per loader")
    p.add_argument("--steps", type=int, default=5, help="training steps timed")
    p.add_argument("--model", default=quick["model"])
    args = p.parse_args()
    if args.data is None:
        from kit.synthetic import default_dataset

        args.data = default_dataset()
    cfg = DataConfig(window=args.window, scale=args.scale, overlap=quick["data"]["overlap"])
    ids = Competition(args.data).train_ids

    start = time.perf_counter()
    folders = build_caches(args.data, ids, cfg, args.cache_dir)
    cache = TileDataset(folders, train_transforms(seed=0))
    print(
        f"tile cache: {len(cache)} tiles of {cfg.tile} px from {len(ids)} slides, "
        f"ready in {time.perf_counter() - start:.1f} s ({args.cache_dir})"
    )

    rates = {
        "cache": loader_rate(cache, args.batch, args.workers, args.samples),
        "tiff": loader_rate(
            TiffWindows(args.data, cache.index, cfg, train_transforms(seed=0)),
            args.batch,
            args.workers,
            args.samples,
        ),
        "step": step_rate(args.model, cfg.tile, args.batch, args.steps),
    }
    print(f"batch {args.batch}, {args.workers} workers, {torch.get_num_threads()} torch threads")
    for name, label in (
        ("cache", "tile cache + train transforms"),
        ("tiff", "TIFF read + resize per sample (seeds)"),
        ("step", f"training step ({args.model})"),
    ):
        print(f"  {label:40s} {rates[name]:9.1f} samples/s")
    print(
        f"cache / tiff: {rates['cache'] / rates['tiff']:.1f}x   "
        f"cache / step: {rates['cache'] / rates['step']:.1f}x "
        f"({'loader keeps up' if rates['cache'] > rates['step'] else 'LOADER IS THE BOTTLENECK'})"
    )


if __name__ == "__main__":
    main()
