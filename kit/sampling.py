"""Training crops drawn fresh each epoch around glomeruli, from a downscaled copy of each slide.

The grid tile cache (`kit.data`) fixes a slide's training windows once. The top solutions drew
new crops every epoch instead: centred on a glomerulus with a random shift (2nd, 4th place),
plus tissue and glass negatives, the tissue ones weighted by anatomical region (deepflash2:
cortex 0.7, medulla 0.2, elsewhere 0.1). Each slide is downscaled once into a cache folder::

    folder = build_slide_cache(data_dir, "aaa6a05cc", cfg, cache_dir)  # cfg: kit.data.DataConfig
    ds = CropDataset([folder], cfg, train_transforms())
    image, mask = ds[0, seed]  # float32 (3, t, t) in [0, 1], float32 (1, t, t); t = cfg.tile

The folder holds plain npy files (no pickle), each memory-mapped by the process that reads it:
a DataLoader worker reads the crops it serves, never the whole slide.

- ``image.npy`` uint8 (h, w, 3): the slide block-averaged by ``cfg.scale`` (exactly
  ``Slide.read`` of the whole slide, read by windows: a 30k x 37k slide at scale 4 is 208 MB);
- ``mask.npy`` uint8 (h, w) of 0/1: the glomeruli, majority vote per block
  (`kit.data.downscale_mask`, as the grid tiles' masks);
- ``region.npy`` uint8 (h, w): `REGIONS` code of the block's centre from
  ``{id}-anatomical-structure.json`` (0 outside, 1 Cortex, 2 Medulla; all 0 without the file);
- ``cells.npy`` uint16 (5, ceil(h / CELL), ceil(w / CELL)): the pixels of each `CELL_CLASSES`
  class in each `CELL` x `CELL` cell, so a pixel is drawn without scanning the slide;
- ``manifest.json``: the key, the counts, and what the key hashes (`slide_cache_key`).

Item ``i`` of an epoch (`CropDataset.crop`) comes from slide ``i // crops_per_slide``; its kind
is set by its place in that slide's block, so every epoch holds round(positive_crops * n)
positive and round(background_crops * n) glass crops per slide, the rest tissue. Its centre is
a pixel of that kind drawn from the item's seed: uniformly among glomerulus pixels (larger
glomeruli more often), then shifted by up to ``crop_shift`` of the crop side on each axis;
among tissue pixels outside glomeruli, each weighted by its region with ``region_weighting``;
among glass pixels (not tissue by `kit.tiling.tissue_mask`). `kit.data.tile_loader` draws the
seeds from torch's generator as an epoch starts, so an epoch's crops depend on (seed, epoch)
alone and a resumed run draws them again. Parts of a crop past the slide edge are 0, as in the
grid's edge tiles (`Slide.read` pads with its fill, 0).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import albumentations as A
import numpy as np
import torch

from kit.competition import Competition, Polygon
from kit.data import (
    DataConfig,
    cache_stain_stats,
    downscale_mask,
    file_identity,
    manifest_key,
    mask_source,
    place_cache,
    to_sample,
)
from kit.polygons import rasterize
from kit.progress import tile_bar
from kit.slides import Slide
from kit.stain import Stats, normaliser, slide_stats, stats_list
from kit.tiling import tissue_mask

# Bump when the way a slide cache is built changes, so that old caches are rebuilt.
SLIDE_CACHE_FORMAT = 2  # 2: the manifest holds the stain statistics
# The DataConfig fields a slide cache depends on (the crop size and the sampler's are not).
SLIDE_CACHE_FIELDS = ("scale", "mask_source", "tissue_saturation")
REGIONS = ("outside", "cortex", "medulla")  # region.npy codes 0, 1, 2
ANATOMY_NAMES = {"Cortex": 1, "Medulla": 2}  # anatomy file names -> codes, Medulla painted last
_ARRAYS = ("image", "mask", "region")  # the (h, w[, 3]) arrays of a slide cache
CELL = 16  # side of a cell of cells.npy, downscaled px
CELL_CLASSES = ("glomerulus", "glass", "tissue outside", "tissue cortex", "tissue medulla")
CROP_KINDS = ("positive", "tissue", "background")
# What an item is centred on when its slide has no pixel of its kind (of weight > 0).
FALLBACKS = {
    "positive": ("positive", "tissue", "background"),
    "tissue": ("tissue", "background"),
    "background": ("background", "tissue"),
}
# About how many full-resolution pixels one read covers while building (24 MB of RGB).
CHUNK_PIXELS = 8 * 2**20


# --------------------------------------------------------------------------- pure parts


def region_map(
    anatomy: Mapping[str, Sequence[Polygon]],
    shape: tuple[int, int],
    scale: int,
    cols: slice | None = None,
) -> np.ndarray:
    """The `REGIONS` code of each pixel of a slide downscaled by ``scale`` (or of its ``cols``).

    Args:
        anatomy: region name -> polygons in full-resolution (x, y) pixels
            (`Competition.anatomy`); names other than those of `ANATOMY_NAMES` are ignored.
        shape: (h, w) of the downscaled slide.
        scale: the downscale factor: pixel (r, c) takes the region holding the centre of its
            ``scale`` x ``scale`` block, ((c + 0.5) * scale, (r + 0.5) * scale).
        cols: columns of the downscaled slide to return (`kit.polygons.rasterize`).

    Returns:
        uint8 (h, len(cols)): 0 outside, 1 cortex, 2 medulla (medulla wins where both hold).
    """
    width = shape[1] if cols is None else cols.stop - (cols.start or 0)
    out = np.zeros((shape[0], width), np.uint8)
    for name, code in ANATOMY_NAMES.items():
        polygons = [[np.asarray(ring) / scale for ring in p] for p in anatomy.get(name, [])]
        if polygons:
            out[rasterize(polygons, shape, cols).astype(bool)] = code
    return out


def pixel_classes(mask: np.ndarray, tissue: np.ndarray, region: np.ndarray) -> np.ndarray:
    """uint8 (h, w): each pixel's `CELL_CLASSES` index.

    A pixel is "glomerulus" (0) where ``mask``, else "glass" (1) where not ``tissue``, else
    tissue of its ``region`` (uint8 (h, w) `REGIONS` codes): 2 + the code.
    """
    tissue_class = region.astype(np.uint8) + np.uint8(2)
    return np.where(mask > 0, np.uint8(0), np.where(tissue, tissue_class, np.uint8(1)))


def cell_counts(mask: np.ndarray, tissue: np.ndarray, region: np.ndarray) -> np.ndarray:
    """uint16 (5, ceil(h / CELL), ceil(w / CELL)): each cell's pixels of each `CELL_CLASSES`
    class (`pixel_classes`); cells past the arrays' edge count nothing there."""
    codes = pixel_classes(mask, tissue, region)
    h, w = codes.shape
    gh, gw = -(-h // CELL), -(-w // CELL)
    padded = np.full((gh * CELL, gw * CELL), 255, np.uint8)
    padded[:h, :w] = codes
    blocks = padded.reshape(gh, CELL, gw, CELL)
    return np.stack([(blocks == k).sum(axis=(1, 3), dtype=np.uint16) for k in range(5)])


def crop_window(array: np.ndarray, y0: int, x0: int, size: int) -> np.ndarray:
    """``array[y0 : y0 + size, x0 : x0 + size]`` (a copy) with 0 where it passes the edge."""
    out = np.zeros((size, size, *array.shape[2:]), array.dtype)
    a, b = max(y0, 0), min(y0 + size, array.shape[0])
    c, d = max(x0, 0), min(x0 + size, array.shape[1])
    if a < b and c < d:
        out[a - y0 : b - y0, c - x0 : d - x0] = array[a:b, c:d]
    return out


def pick(weights: np.ndarray, rng: np.random.Generator) -> int:
    """An index of ``weights`` (>= 0, some > 0) drawn with probability proportional to it."""
    cumulative = np.cumsum(weights, dtype=np.float64)
    if not cumulative[-1] > 0:
        raise ValueError("nothing to pick: every weight is 0")
    i = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    return i if i < len(weights) else int(np.flatnonzero(weights)[-1])  # rounding at the top


# --------------------------------------------------------------------------- the slide cache


def anatomy_digest(anatomy: Mapping[str, Sequence[Polygon]]) -> str:
    """A hash of the regions a slide cache rasterises (`ANATOMY_NAMES`)."""
    regions = {
        name: [[np.asarray(ring).tolist() for ring in p] for p in anatomy.get(name, [])]
        for name in ANATOMY_NAMES
    }
    return hashlib.sha256(json.dumps(regions).encode()).hexdigest()


def slide_cache_key(
    path: str | os.PathLike, mask_digest: str, regions_digest: str, cfg: DataConfig
) -> tuple[str, dict]:
    """Hash of everything a slide cache depends on, and the inputs hashed: the file's identity
    (path, size, mtime, as for the tile cache), its mask, its regions, `SLIDE_CACHE_FIELDS`."""
    inputs = {
        "format": SLIDE_CACHE_FORMAT,
        "slide": file_identity(path),
        "mask": mask_digest,
        "anatomy": regions_digest,
        "config": {name: getattr(cfg, name) for name in SLIDE_CACHE_FIELDS},
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest(), inputs


def build_slide_cache(
    data_dir: str | os.PathLike,
    slide_id: str,
    cfg: DataConfig,
    cache_dir: str | os.PathLike,
    *,
    progress: bool | None = None,
    chunk_pixels: int = CHUNK_PIXELS,
    rle: str | None = None,
) -> Path:
    """Return the slide cache folder ``cache_dir/{slide_id}-slide-{key[:16]}``, building it
    first when missing or stale (the module docstring lists its files).

    As `kit.data.build_tile_cache`: built in a temporary folder and renamed into place (a crash
    leaves nothing half-written; of two processes building it at once, the first to finish
    wins), and this slide's caches of an earlier version of its file are deleted.

    ``chunk_pixels``: about how many full-resolution pixels one read covers (the memory the
    build takes; the cache does not depend on it). ``progress=None`` shows a bar on a terminal.
    ``rle``: the slide's mask instead of its truth (a pseudo-labelled test slide, `kit.pseudo`).
    The manifest also holds the slide's stain statistics (`kit.stain.slide_stats`, as the tile
    cache's), which `CropDataset` maps crops from with ``stain_norm``.
    """
    if isinstance(chunk_pixels, bool) or not isinstance(chunk_pixels, int) or chunk_pixels < 1:
        raise ValueError(f"chunk_pixels must be an int >= 1, got {chunk_pixels!r}")
    comp = Competition(data_dir)
    path = comp.slide_path(slide_id)
    with Slide(path) as slide:
        shape = slide.shape
    strip, digest = mask_source(data_dir, slide_id, shape, cfg.mask_source, rle)
    anatomy = comp.anatomy(slide_id)
    key, inputs = slide_cache_key(path, digest, anatomy_digest(anatomy), cfg)
    cache_dir = Path(cache_dir)
    folder = cache_dir / f"{slide_id}-slide-{key[:16]}"
    if manifest_key(folder) == key:
        return folder

    def fill(tmp: Path) -> dict:
        with tile_bar(f"slide {slide_id}", progress) as advance:
            _write_image(tmp, path, cfg.scale, chunk_pixels, advance)
        _write_mask(tmp, strip, shape, cfg.scale, chunk_pixels)
        _write_regions(tmp, anatomy, cfg.scale, chunk_pixels)
        counts = _write_cells(tmp, cfg.tissue_saturation)
        with Slide(path) as slide:
            stain = slide_stats(slide, cfg.tissue_saturation, chunk_pixels=chunk_pixels)
        return {
            "shape": list(shape),
            "size": list(np.load(tmp / "mask.npy", mmap_mode="r").shape),
            "scale": cfg.scale,
            "cell": CELL,
            "pixels": {name: int(n) for name, n in zip(CELL_CLASSES, counts, strict=True)},
            "regions": sorted(name for name in ANATOMY_NAMES if anatomy.get(name)),
            "stain": stats_list(stain),
        }

    return place_cache(folder, slide_id, key, inputs, fill)


def _chunk(block: int, n: int, scale: int, budget: int) -> int:
    """A read's side along an axis of ``n`` px: a multiple of ``scale`` (block means stay those of
    the whole slide) and, when it fits in ``budget`` px, of the file's ``block`` (each decoded
    once); at most about ``budget``, at least one unit, no longer than the axis needs."""
    unit = math.lcm(block, scale)
    if unit > budget:
        unit = scale
    return max(unit, min(budget, -(-n // unit) * unit) // unit * unit)


def _write_image(folder: Path, path: Path, scale: int, budget: int, on_progress) -> None:
    """image.npy: the slide read chunk by chunk (``budget`` pixels each) and block-averaged."""
    with Slide(path) as slide:
        (height, width), (block_h, block_w) = slide.shape, slide.block_shape
        step_w = _chunk(block_w, width, scale, max(scale, budget // min(block_h, height)))
        step_h = _chunk(block_h, height, scale, max(scale, budget // step_w))
        size = (-(-height // scale), -(-width // scale), 3)
        image = np.lib.format.open_memmap(folder / "image.npy", "w+", np.uint8, size)
        starts = [(y, x) for y in range(0, height, step_h) for x in range(0, width, step_w)]
        for done, (y, x) in enumerate(starts, 1):
            rows, cols = slice(y, min(y + step_h, height)), slice(x, min(x + step_w, width))
            part = slide.read(rows, cols, scale)
            top, left = y // scale, x // scale
            image[top : top + part.shape[0], left : left + part.shape[1]] = part
            on_progress(done, len(starts))
    image.flush()
    del image


def _write_mask(
    folder: Path, mask_strip: Callable, shape: tuple[int, int], scale: int, budget: int
) -> None:
    """mask.npy: the mask decoded column strip by column strip (``budget`` pixels each)."""
    height, width = shape
    step = max(scale, budget // height // scale * scale)
    size = (-(-height // scale), -(-width // scale))
    mask = np.lib.format.open_memmap(folder / "mask.npy", "w+", np.uint8, size)
    for x in range(0, width, step):
        part = downscale_mask(mask_strip(slice(x, min(x + step, width))), scale)
        mask[:, x // scale : x // scale + part.shape[1]] = part
    mask.flush()
    del mask


def _write_regions(folder: Path, anatomy: Mapping, scale: int, budget: int) -> None:
    """region.npy: `region_map`, column strip by column strip (``budget`` pixels each)."""
    size = np.load(folder / "mask.npy", mmap_mode="r").shape
    region = np.lib.format.open_memmap(folder / "region.npy", "w+", np.uint8, size)
    step = max(1, budget // size[0])
    for x in range(0, size[1], step):
        cols = slice(x, min(x + step, size[1]))
        region[:, cols] = region_map(anatomy, size, scale, cols)
    region.flush()
    del region


def _write_cells(folder: Path, saturation: int) -> np.ndarray:
    """cells.npy from the arrays written, `CELL` rows at a time; returns the totals per class."""
    image, mask, region = (np.load(folder / f"{n}.npy", mmap_mode="r") for n in _ARRAYS)
    h, w = mask.shape
    cells = np.lib.format.open_memmap(
        folder / "cells.npy", "w+", np.uint16, (len(CELL_CLASSES), -(-h // CELL), -(-w // CELL))
    )
    for r in range(cells.shape[1]):
        rows = slice(r * CELL, (r + 1) * CELL)
        tissue = tissue_mask(np.asarray(image[rows]), saturation)
        cells[:, r : r + 1] = cell_counts(mask[rows], tissue, region[rows])
    totals = cells.sum(axis=(1, 2), dtype=np.int64)
    cells.flush()
    del cells
    return totals


# --------------------------------------------------------------------------- crops


class Crop(NamedTuple):
    """One training crop, in pixels of the downscaled slide."""

    slide: int  # which folder of the dataset
    kind: str  # of `CROP_KINDS`: what the drawn pixel is (after `FALLBACKS`)
    y: int  # the drawn pixel
    x: int
    y0: int  # the crop's top-left corner (its centre, y0 + t // 2, is y plus the shift)
    x0: int


class CropDataset(torch.utils.data.Dataset):
    """Crops drawn around glomeruli and on tissue and glass, from slide caches.

    Args:
        folders: slide caches from `build_slide_cache` built with ``cfg.scale``.
        cfg: the sampler's settings (`kit.data.DataConfig`: tile, crops_per_slide,
            positive_crops, background_crops, crop_shift, region_weighting, region_weights).
        transforms: an albumentations transform applied to ``image=``/``mask=`` (None: identity).
        stain_norm, stain_target: as `kit.data.TileDataset`'s: each crop mapped from its slide's
            stain statistics (in the cache's manifest) to ``stain_target``, before ``transforms``.

    Items as `kit.data.TileDataset`'s: ``ds[i]`` or ``ds[i, seed]`` (the crop and its
    augmentation drawn from ``seed``; ``ds[i]`` is ``ds[i, 0]`` without augmentation seeding),
    image float32 (3, t, t) in [0, 1], mask float32 (1, t, t). The arrays are memory-mapped
    lazily in each process; pickling (to a worker) carries only paths and settings.
    """

    def __init__(
        self,
        folders: Sequence[str | os.PathLike],
        cfg: DataConfig,
        transforms: A.BasicTransform | None = None,
        *,
        stain_norm: str = "none",
        stain_target: Stats | Sequence[float] | None = None,
    ):
        self.folders = [Path(f) for f in folders]
        self.saturation = []
        for folder in self.folders:
            manifest = _read_manifest(folder)
            if manifest["scale"] != cfg.scale:
                raise ValueError(f"{folder}: a cache at scale {manifest['scale']}, not {cfg.scale}")
            self.saturation.append(manifest["inputs"]["config"]["tissue_saturation"])
        self.size, self.per_slide, self.transforms = cfg.tile, cfg.crops_per_slide, transforms
        self.normalisers = [
            normaliser(
                cache_stain_stats(f) if stain_norm != "none" else None, stain_target, stain_norm
            )
            for f in self.folders
        ]
        self.shift = int(cfg.crop_shift * cfg.tile)
        positive = round(cfg.positive_crops * self.per_slide)
        background = min(self.per_slide - positive, round(cfg.background_crops * self.per_slide))
        tissue = self.per_slide - positive - background
        self.kinds = ("positive",) * positive + ("tissue",) * tissue + ("background",) * background
        cortex, medulla, outside = cfg.region_weights if cfg.region_weighting else (1.0,) * 3
        # Weight of a pixel of each CELL_CLASSES class for each kind of crop.
        self.class_weights = {
            "positive": np.array([1.0, 0, 0, 0, 0]),
            "background": np.array([0, 1.0, 0, 0, 0]),
            "tissue": np.array([0, 0, outside, cortex, medulla]),
        }
        self._arrays = None  # per process: (image, mask, region, cells) maps per folder
        self._rows = None  # per process: per folder and kind, the weight of each row of cells

    def __len__(self) -> int:
        return len(self.folders) * self.per_slide

    def crop(self, i: int, seed: int = 0) -> Crop:
        """Where item ``i`` is cut when drawn from ``seed`` (an int >= 0); see the module."""
        if not 0 <= i < len(self):
            raise IndexError(f"crop {i} out of range for {len(self)} crops")
        slide, j = divmod(i, self.per_slide)
        rng = np.random.default_rng([seed, i])
        for kind in FALLBACKS[self.kinds[j]]:
            pixel = self._draw(slide, kind, rng)
            if pixel is not None:
                break
        else:
            raise ValueError(f"{self.folders[slide]}: no pixel has a weight to centre a crop on")
        y, x = pixel
        dy, dx = rng.integers(-self.shift, self.shift + 1, 2) if kind == "positive" else (0, 0)
        half = self.size // 2
        return Crop(slide, kind, y, x, y + int(dy) - half, x + int(dx) - half)

    def read(self, crop: Crop) -> tuple[np.ndarray, np.ndarray]:
        """The crop's uint8 (t, t, 3) image and uint8 (t, t) 0/1 mask, 0 past the slide edge."""
        image, mask, _, _ = self._maps(crop.slide)
        return (
            crop_window(image, crop.y0, crop.x0, self.size),
            crop_window(mask, crop.y0, crop.x0, self.size),
        )

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        i, seed = item if isinstance(item, tuple) else (item, None)
        if not -len(self) <= i < len(self):
            raise IndexError(f"crop {i} out of range for {len(self)} crops")
        crop = self.crop(i % len(self), 0 if seed is None else seed)
        image, mask = self.read(crop)
        return to_sample(self.normalisers[crop.slide](image), mask, self.transforms, seed)

    def __getstate__(self) -> dict:
        # Workers map the files themselves instead of receiving pickled copies of the arrays.
        return {**self.__dict__, "_arrays": None, "_rows": None}

    def _maps(self, slide: int) -> tuple[np.ndarray, ...]:
        if self._arrays is None:
            names = (*_ARRAYS, "cells")
            self._arrays = [
                tuple(np.load(f / f"{n}.npy", mmap_mode="r") for n in names) for f in self.folders
            ]
        return self._arrays[slide]

    def _draw(self, slide: int, kind: str, rng: np.random.Generator) -> tuple[int, int] | None:
        """A pixel of ``kind`` drawn by weight: a row of cells, a cell in it, a pixel in it."""
        image, mask, region, cells = self._maps(slide)
        rows = self._row_weights(slide)[kind]
        if not rows.sum() > 0:
            return None
        weights = self.class_weights[kind]
        r = pick(rows, rng)
        c = pick(np.tensordot(weights, cells[:, r].astype(np.float64), axes=1), rng)
        ys, xs = slice(r * CELL, (r + 1) * CELL), slice(c * CELL, (c + 1) * CELL)
        tissue = tissue_mask(np.asarray(image[ys, xs]), self.saturation[slide])
        pixel_class = pixel_classes(mask[ys, xs], tissue, region[ys, xs])
        pixel_weights = weights[pixel_class]
        if not pixel_weights.any():
            raise ValueError(f"{self.folders[slide]}: cells.npy disagrees with the arrays: rebuild")
        k = pick(pixel_weights.ravel(), rng)
        return r * CELL + k // pixel_class.shape[1], c * CELL + k % pixel_class.shape[1]

    def _row_weights(self, slide: int) -> dict[str, np.ndarray]:
        """Per kind, float64 (rows of cells,): the weight of each row of the slide's cells."""
        if self._rows is None:
            self._rows = {}
        if slide not in self._rows:
            cells = self._maps(slide)[3]
            per_row = cells.sum(axis=2, dtype=np.float64)  # (5, rows of cells)
            self._rows[slide] = {kind: w @ per_row for kind, w in self.class_weights.items()}
        return self._rows[slide]


def _read_manifest(folder: Path) -> dict:
    """A slide cache's manifest: FileNotFoundError naming the folder when it is not one."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        config = manifest["inputs"]["config"]
        if "scale" in manifest and "tissue_saturation" in config and "cell" in manifest:
            if (folder / "cells.npy").is_file():
                return manifest
    except (OSError, ValueError, KeyError, TypeError):
        pass
    raise FileNotFoundError(f"not a slide cache (no complete manifest.json, cells.npy): {folder}")
