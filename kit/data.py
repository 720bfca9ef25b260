"""Training tiles: which windows to learn from, a tile cache on disk, the Dataset and the splits.

Reading 1024 px windows from multi-gigabyte TIFFs and downscaling them is far slower than a
training step, so tiles are prepared once per slide and kept as plain ``.npy`` arrays that
``np.load(mmap_mode="r")`` maps straight into memory (no pickle)::

    cache = build_tile_cache(data_dir, "aaa6a05cc", DataConfig(), cache_dir)
    ds = TileDataset([cache], train_transforms())
    image, mask = ds[0]  # float32 (3, 256, 256) in [0, 1], float32 (1, 256, 256) of 0/1

Every window of the slide's tiling plan is labelled ``positive`` (enough glomerulus pixels),
``tissue`` (no glomerulus, but a window inference would predict: the hard negatives) or
``background`` (one inference would skip as tissue-free). All positives are kept and a
configurable share of the others, so the model also sees what is *not* a glomerulus.

Splits are by slide (or patient), never by tile: tiles of one slide are strongly correlated and a
random tile split overstates Dice by several points.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, RandomSampler, Sampler, SequentialSampler

from kit import atomic
from kit.competition import Competition, read_polygons
from kit.config import option
from kit.polygons import rasterize
from kit.progress import tile_bar
from kit.rle import decode_columns, parse
from kit.slides import Slide, downscale
from kit.stain import METHODS as STAIN_METHODS
from kit.stain import Stats, normaliser, slide_stats, stats_list
from kit.tiling import MIN_TISSUE, TISSUE_SATURATION, Tile, has_tissue, plan, tissue_fraction

# Bump when the way tiles are built changes, so that old caches are rebuilt.
# 3: the manifest holds the slide's stain statistics (kit.stain.slide_stats).
CACHE_FORMAT = 3
KINDS = ("positive", "tissue", "background")


@dataclass
class DataConfig:
    """How training tiles are cut from the slides and which of them are kept."""

    window: int = option(1024, "side of a window read from the slide, full-resolution px")
    scale: int = option(4, "downscale factor: the model sees window // scale px")
    overlap: int = option(256, "overlap of the training tile grid, full-resolution px")
    min_mask_fraction: float = option(0.001, "glomerulus share of a 'positive' window")
    # A negative window is "tissue" when inference would predict it: its core's tissue fraction,
    # on the slide downscaled by scale, is above min_tissue (kit.tiling.has_tissue), else
    # "background". InferConfig.min_tissue is the same rule on the same pixels.
    min_tissue: float = option(MIN_TISSUE, "tissue fraction above which a tile is tissue")
    tissue_share: float = option(0.5, "share of tissue-only negatives kept (hard negatives)")
    background_share: float = option(0.05, "share of background windows kept")
    mask_source: str = option("rle", "'rle' (train.csv) or 'json' (train/{id}.json polygons)")
    tissue_saturation: int = option(TISSUE_SATURATION, "HSV saturation (0..255) of tissue")
    seed: int = option(0, "chooses which negatives are kept")
    # Tiles are cached as read; TileDataset maps each from its slide's statistics (kept in the
    # cache's manifest) to the run's target, which depends on the split: caches stay shared by
    # every fold and setting.
    stain_norm: str = option("none", "per-slide stain normalisation: none or reinhard")
    # How training crops are chosen: the cached grid above, or crops drawn each epoch from a
    # downscaled copy of each slide (kit.sampling); the fields below apply to "centred" only.
    sampling: str = option("grid", "'grid' (cached tiling windows) or 'centred' (kit.sampling)")
    crops_per_slide: int = option(64, "centred: crops drawn from each training slide per epoch")
    positive_crops: float = option(0.5, "centred: share of crops centred on a glomerulus")
    background_crops: float = option(0.1, "centred: share centred on glass; the rest on tissue")
    crop_shift: float = option(0.25, "centred: largest glomerulus offset, share of the crop side")
    region_weighting: bool = option(False, "centred: weight tissue crops by anatomical region")
    region_weights: list[float] = option(
        help="centred: weights of a tissue pixel in cortex, medulla and outside both",
        factory=lambda: [0.7, 0.2, 0.1],
        metavar="W",
    )

    def __post_init__(self) -> None:
        if self.window <= 0 or self.scale <= 0 or self.window % self.scale:
            raise ValueError(
                f"window ({self.window}) must be a positive multiple of scale ({self.scale})"
            )
        if not 0 <= self.overlap < self.window:
            raise ValueError(f"overlap must be in [0, window={self.window}), got {self.overlap}")
        for name in ("tissue_share", "background_share", "min_mask_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.min_tissue < 1.0:
            raise ValueError(f"min_tissue must be in [0, 1), got {self.min_tissue!r}")
        if self.mask_source not in ("rle", "json"):
            raise ValueError(f"mask_source must be 'rle' or 'json', got {self.mask_source!r}")
        if self.stain_norm not in STAIN_METHODS:
            raise ValueError(f"stain_norm must be one of {STAIN_METHODS}, got {self.stain_norm!r}")
        check_sampling(self)

    @property
    def tile(self) -> int:
        """Side of a cached tile in pixels."""
        return self.window // self.scale


# The fields of the centred sampler: the grid tile cache does not depend on them.
SAMPLER_FIELDS = (
    "sampling", "crops_per_slide", "positive_crops", "background_crops", "crop_shift",
    "region_weighting", "region_weights",
)  # fmt: skip
# What a grid tile cache does not depend on: the sampler's fields, and stain_norm (TileDataset
# maps each tile after the cache).
CACHE_FREE_FIELDS = (*SAMPLER_FIELDS, "stain_norm")


def check_sampling(cfg: DataConfig) -> None:
    """ValueError naming the first sampler field of ``cfg`` out of its range."""
    if cfg.sampling not in ("grid", "centred"):
        raise ValueError(f"sampling must be 'grid' or 'centred', got {cfg.sampling!r}")
    count = cfg.crops_per_slide
    if isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 1:
        raise ValueError(f"crops_per_slide must be an integer >= 1, got {cfg.crops_per_slide!r}")
    for name in ("positive_crops", "background_crops"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {getattr(cfg, name)!r}")
    if cfg.positive_crops + cfg.background_crops > 1.0:
        raise ValueError(
            f"positive_crops + background_crops must be <= 1 (the rest are tissue crops), got "
            f"{cfg.positive_crops} + {cfg.background_crops}"
        )
    if not 0.0 <= cfg.crop_shift <= 0.5:
        raise ValueError(
            f"crop_shift must be in [0, 0.5] (of the crop side), got {cfg.crop_shift!r}"
        )
    try:
        weights = [float(w) for w in cfg.region_weights]
    except (TypeError, ValueError):
        weights = []
    if len(weights) != 3 or not all(0 <= w < np.inf for w in weights) or sum(weights) <= 0:
        raise ValueError(
            "region_weights must be 3 finite weights >= 0 (cortex, medulla, outside), not all 0,"
            f" got {cfg.region_weights!r}"
        )
    cfg.region_weights = weights


# --------------------------------------------------------------------------- slides and masks


MaskStrip = Callable[[slice], np.ndarray]


def mask_source(
    data_dir: str | os.PathLike,
    slide_id: str,
    shape: tuple[int, int],
    source: str = "rle",
    rle: str | None = None,
) -> tuple[MaskStrip, str]:
    """The slide's ground truth as a column-strip reader, and a digest of where it comes from.

    Returns ``(strip, digest)``: ``strip(cols)`` gives the uint8 (H, cols width) 0/1 mask of those
    columns (``cols`` within the slide), without building the whole mask (a real slide's mask is
    about 1 GB). ``digest`` changes whenever the annotation does (cache key).

    ``rle``: the mask itself (a pseudo-label of a test slide, `kit.pseudo`) instead of
    ``source``; its digest differs from that of the same RLE as ground truth.
    """
    if rle is not None:
        runs = parse(rle, shape)
        return (lambda cols: decode_columns(runs, shape, cols)), _digest(b"pseudo:" + rle.encode())
    comp = Competition(data_dir)
    if source == "rle":
        rle = comp.truth(slide_id)
        runs = parse(rle, shape)  # once per slide: each strip then only paints its runs
        return (lambda cols: decode_columns(runs, shape, cols)), _digest(rle.encode())
    if source == "json":
        path = comp.polygons_path(slide_id)
        polygons = read_polygons(path)
        return (lambda cols: rasterize(polygons, shape, cols)), _digest(path.read_bytes())
    raise ValueError(f"mask source must be 'rle' or 'json', got {source!r}")


# --------------------------------------------------------------------------- tile index


def index_slide(
    path: str | os.PathLike, mask_strip: MaskStrip, cfg: DataConfig, slide_id: str = ""
) -> pd.DataFrame:
    """Label every window of the slide's tiling plan.

    Returns a DataFrame with one row per window, in plan order (column strip by column strip):
    ``id, y0, x0, y1, x1`` (full-resolution window, may pass the slide edge), ``mask_fraction``
    (share of the window's area), ``tissue_fraction`` (share of its core, `kit.tiling`) and
    ``kind``.

    A window without enough glomerulus is a "tissue" negative when inference would predict it
    and "background" when inference would skip it: the tissue rule (`kit.tiling.has_tissue`)
    judges its core on the slide downscaled by ``cfg.scale``, the pixels the model is shown.
    With the inference grid (``cfg.overlap`` equal to the inference overlap) the windows are the
    inference tiles and the labels its decisions exactly (for a file without overviews, whose
    ``Slide.thumbnail`` is exact); with another grid, each window is judged as inference judges
    a tile with that core. The slide is read once, at ``cfg.scale`` (a 30k x 40k slide at scale 4
    is a 225 MB picture).
    """
    with Slide(path) as slide:
        shape = slide.shape
        tiles = plan(shape, cfg.window, cfg.overlap, align=cfg.scale)
        picture = slide.thumbnail(cfg.scale)
    tissue = tissue_fraction(tiles, picture, cfg.scale, saturation=cfg.tissue_saturation)
    del picture  # hundreds of MB on a real slide: not held while the mask is read
    masked = _masked_pixels(tiles, shape, mask_strip)
    mask_fraction = masked / float(cfg.window * cfg.window)
    kind = np.where(
        (masked > 0) & (mask_fraction >= cfg.min_mask_fraction),
        "positive",
        np.where(has_tissue(tissue, cfg.min_tissue), "tissue", "background"),
    )
    return pd.DataFrame(
        {
            "id": slide_id,
            "y0": [t.y0 for t in tiles],
            "x0": [t.x0 for t in tiles],
            "y1": [t.y1 for t in tiles],
            "x1": [t.x1 for t in tiles],
            "mask_fraction": mask_fraction,
            "tissue_fraction": np.asarray(tissue, dtype=np.float64),
            "kind": kind,
        }
    )


def select_tiles(index: pd.DataFrame, cfg: DataConfig) -> pd.DataFrame:
    """Keep every positive window and a random share of each kind of negative.

    The draw is seeded by ``cfg.seed`` and the slide id, so a slide's selection does not depend on
    which other slides are in the run.
    """
    slide_id = str(index["id"].iloc[0]) if len(index) else ""
    rng = np.random.default_rng([cfg.seed, zlib.crc32(slide_id.encode())])
    draw = rng.random(len(index))
    share = index["kind"].map(
        {"positive": 1.0, "tissue": cfg.tissue_share, "background": cfg.background_share}
    )
    return index[draw < share.to_numpy()].reset_index(drop=True)


def _masked_pixels(tiles: Sequence[Tile], shape: tuple[int, int], mask_strip: MaskStrip):
    """float64 (len(tiles),): the mask's pixels inside each window (within the slide), read
    column strip by column strip."""
    masked = np.zeros(len(tiles))
    for cols, members in _column_strips(tiles, shape):
        strip = mask_strip(cols)
        # One cumulative sum per strip turns each window's count into two lookups.
        rows = np.concatenate([[0], np.cumsum(strip.sum(axis=1, dtype=np.int64))])
        for i in members:
            t = tiles[i]
            masked[i] = rows[min(t.y1, shape[0])] - rows[max(t.y0, 0)]
    return masked


def _column_strips(tiles, shape) -> Iterable[tuple[slice, list[int]]]:
    """Group tile numbers by column range (the plan is ordered strip by strip)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, t in enumerate(tiles):
        groups.setdefault((t.x0, t.x1), []).append(i)
    for (x0, x1), members in groups.items():
        yield slice(max(x0, 0), min(x1, shape[1])), members


# --------------------------------------------------------------------------- tile cache


def file_identity(path: str | os.PathLike) -> dict:
    """What tells a slide file's versions apart in a cache key: its path, size and mtime."""
    stat = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def cache_key(path: str | os.PathLike, mask_digest: str, cfg: DataConfig) -> tuple[str, dict]:
    """Hash of everything a slide's tiles depend on: the file's identity, its mask, the config."""
    inputs = {
        "format": CACHE_FORMAT,
        "slide": file_identity(path),
        "mask": mask_digest,
        "config": {k: v for k, v in asdict(cfg).items() if k not in CACHE_FREE_FIELDS},
    }
    return _digest(json.dumps(inputs, sort_keys=True).encode()), inputs


def build_tile_cache(
    data_dir: str | os.PathLike,
    slide_id: str,
    cfg: DataConfig,
    cache_dir: str | os.PathLike,
    *,
    progress: bool | None = None,
    rle: str | None = None,
) -> Path:
    """Return the cache folder of a slide's tiles, building it first when missing or stale.

    The folder is ``cache_dir/{slide_id}-{key[:16]}`` and holds ``images.npy`` uint8 (N, t, t, 3),
    ``masks.npy`` uint8 (N, t, t) of 0/1, ``index.csv`` (one row per tile: id, window, kind) and
    ``manifest.json`` (the key and the inputs it hashes, and ``stain``: the slide's stain
    statistics, `kit.stain.slide_stats`, as 6 floats or null). It is built in a temporary folder and
    renamed into place, so a crash leaves no half-written cache behind.
    ``progress=None`` shows a bar on a terminal or in Jupyter (`kit.progress.show_progress`).
    ``rle``: the slide's mask given (a pseudo-label, see `mask_source`) instead of its truth.
    """
    path = Competition(data_dir).slide_path(slide_id)
    with Slide(path) as slide:
        shape = slide.shape
    strip, digest = mask_source(data_dir, slide_id, shape, cfg.mask_source, rle)
    key, inputs = cache_key(path, digest, cfg)
    cache_dir = Path(cache_dir)
    folder = cache_dir / f"{slide_id}-{key[:16]}"
    if manifest_key(folder) == key:
        return folder

    def fill(tmp: Path) -> dict:
        index = select_tiles(index_slide(path, strip, cfg, slide_id), cfg)
        with tile_bar(f"tiles {slide_id}", progress) as advance:
            _write_tiles(tmp, path, strip, shape, index, cfg, advance)
        with Slide(path) as slide:
            stain = slide_stats(slide, cfg.tissue_saturation)
        index.to_csv(tmp / "index.csv", index=False)
        return {
            "count": len(index),
            "tile": cfg.tile,
            "kinds": {k: int((index["kind"] == k).sum()) for k in KINDS},
            "stain": stats_list(stain),
        }

    return place_cache(folder, slide_id, key, inputs, fill)


def place_cache(
    folder: Path, slide_id: str, key: str, inputs: dict, fill: Callable[[Path], dict]
) -> Path:
    """Build the cache ``folder`` of slide ``slide_id`` whole or not at all; return it.

    ``fill(tmp)`` writes the cache's files into a temporary folder beside ``folder`` and returns
    the manifest's own fields; ``manifest.json`` (``key``, ``slide_id``, those fields,
    ``inputs``) is written last, then the folder is renamed into place (another process, a
    second rank or a parallel run, may have placed the same cache first: it is kept) and this
    slide's stale caches are pruned. A crash leaves nothing half-written.
    """
    cache_dir = folder.parent
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{slide_id}-{os.getpid()}-", dir=cache_dir))
    try:
        manifest = {"key": key, "slide_id": slide_id, **fill(tmp), "inputs": inputs}
        atomic.write_text(tmp / "manifest.json", json.dumps(manifest, indent=1))  # last: whole
        atomic.place_folder(tmp, folder, keep=lambda f: manifest_key(f) == key)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    prune_stale_caches(cache_dir, slide_id, inputs["slide"])
    return folder


def prune_stale_caches(cache_dir: Path, slide_id: str, slide: dict) -> None:
    """Delete what can never be reused: this slide's caches built from an earlier version of its
    file, and temporary folders of builds whose process died (killed mid-build).

    Caches of the same file with other parameters are kept (another run may use them). Any
    folder ``{slide_id}-*`` whose manifest records ``inputs.slide`` (the file's path, size and
    mtime) counts: the tile caches and `kit.sampling`'s slide caches alike.
    """
    for folder in cache_dir.glob(f"{slide_id}-*"):
        try:
            old = json.loads((folder / "manifest.json").read_text())["inputs"]["slide"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if old["path"] == slide["path"] and old != slide:
            shutil.rmtree(folder, ignore_errors=True)
    for folder in cache_dir.glob(f".{slide_id}-*-*"):
        pid = folder.name[len(slide_id) + 2 :].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def _write_tiles(folder, path, mask_strip, shape, index, cfg, on_progress) -> None:
    """Read, downscale and store the windows of ``index`` (and their masks) into ``folder``.

    Column strip by column strip, so each strip of the mask is decoded once. ``on_progress(done,
    total)`` is called after each tile (`kit.progress.tile_bar`).
    """
    n, t = len(index), cfg.tile
    images = np.lib.format.open_memmap(folder / "images.npy", "w+", np.uint8, (n, t, t, 3))
    masks = np.lib.format.open_memmap(folder / "masks.npy", "w+", np.uint8, (n, t, t))
    height = shape[0]
    done = 0
    with Slide(path) as slide:
        for (x0, x1), rows in index.groupby(["x0", "x1"], sort=False):
            cols = slice(max(x0, 0), min(x1, shape[1]))
            strip = mask_strip(cols)
            for i, row in rows.iterrows():
                images[i] = slide.read(slice(row.y0, row.y1), slice(x0, x1), cfg.scale)
                full = np.zeros((cfg.window, cfg.window), dtype=np.uint8)
                top, bottom = max(row.y0, 0), min(row.y1, height)
                full[top - row.y0 : bottom - row.y0, cols.start - x0 : cols.stop - x0] = strip[
                    top:bottom
                ]
                masks[i] = downscale_mask(full, cfg.scale)
                done += 1
                on_progress(done, n)
    images.flush()
    masks.flush()
    del images, masks


def downscale_mask(mask: np.ndarray, scale: int) -> np.ndarray:
    """Majority vote over scale x scale blocks: uint8 (H, W) 0/1 -> (ceil(H/s), ceil(W/s)) 0/1.

    The block mean of ``kit.slides.downscale`` (rounded to uint8) decides: more than half set
    gives 1; an exact tie follows its rounding.
    """
    if scale == 1:
        return mask
    return (downscale(mask * np.uint8(255), scale) >= 128).astype(np.uint8)


def build_caches(
    data_dir: str | os.PathLike,
    ids: Sequence[str],
    cfg: DataConfig,
    cache_dir: str | os.PathLike,
    *,
    progress: bool | None = None,
    masks: Mapping[str, str] | None = None,
    build: Callable[..., Path] = build_tile_cache,
) -> list[Path]:
    """``build`` (`build_tile_cache`, or `kit.sampling.build_slide_cache`) for each slide id, in
    order; ``masks``: slide id -> RLE given instead of the truth (pseudo-labels)."""
    masks = masks or {}
    return [build(data_dir, i, cfg, cache_dir, progress=progress, rle=masks.get(i)) for i in ids]


def cache_stain_stats(folder: str | os.PathLike) -> Stats | None:
    """The stain statistics of a tile (or `kit.sampling` slide) cache's slide
    (`kit.stain.slide_stats`, saved when the cache was built): float64 (2, 3), or None for a
    slide showing no tissue."""
    path = Path(folder) / "manifest.json"
    try:
        stain = json.loads(path.read_text())["stain"]
    except FileNotFoundError:
        raise FileNotFoundError(f"not a cache (no manifest.json): {folder}") from None
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: no stain statistics ({err!r}); rebuild the cache") from err
    return None if stain is None else np.asarray(stain, dtype=np.float64).reshape(2, 3)


def manifest_key(folder: Path) -> str | None:
    """The key in ``folder/manifest.json``; None when there is none (missing, partial, foreign)."""
    try:
        return json.loads((folder / "manifest.json").read_text())["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- dataset


class TileDataset(torch.utils.data.Dataset):
    """Cached tiles of one or more slides as (image, mask) float32 tensors.

    Args:
        folders: cache folders from ``build_tile_cache``.
        transforms: an albumentations transform applied to ``image=``/``mask=`` (None: identity).
        stain_norm: `kit.stain.METHODS`: "reinhard" maps each tile, before ``transforms``, from
            its slide's stain statistics (`cache_stain_stats`) to ``stain_target``.
        stain_target: the target statistics (`kit.stain.target_stats`), with ``stain_norm``.

    Items: image float32 (3, t, t) in [0, 1] (not normalised: the model does that), mask float32
    (1, t, t) of 0/1. The arrays are memory-mapped lazily in each process, so DataLoader workers
    share the page cache instead of copying the tiles.
    """

    def __init__(
        self,
        folders: Sequence[str | os.PathLike],
        transforms: A.BasicTransform | None = None,
        *,
        stain_norm: str = "none",
        stain_target: Stats | Sequence[float] | None = None,
    ):
        self.folders = [Path(f) for f in folders]
        for folder in self.folders:
            if manifest_key(folder) is None:
                raise FileNotFoundError(f"not a tile cache (no manifest.json): {folder}")
        self.transforms = transforms
        # One per folder: a slide's tiles share its mapping (the identity without stain_norm).
        self.normalisers = [
            normaliser(
                cache_stain_stats(f) if stain_norm != "none" else None, stain_target, stain_norm
            )
            for f in self.folders
        ]
        self.index = (
            pd.concat(
                [pd.read_csv(f / "index.csv", dtype={"id": str}) for f in self.folders],
                ignore_index=True,
            )
            if self.folders
            else pd.DataFrame(columns=["id", "y0", "x0", "y1", "x1", "kind"])
        )
        counts = [int(json.loads((f / "manifest.json").read_text())["count"]) for f in self.folders]
        self._offsets = np.cumsum([0, *counts])
        self._arrays: list[tuple[np.ndarray, np.ndarray]] | None = None

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tile ``i``, or for ``(i, seed)`` tile ``i`` augmented by draws from ``seed``."""
        i, seed = item if isinstance(item, tuple) else (item, None)
        if not -len(self) <= i < len(self):
            raise IndexError(f"tile {i} out of range for {len(self)} tiles")
        i %= len(self)
        if self._arrays is None:
            self._arrays = [
                (np.load(f / "images.npy", mmap_mode="r"), np.load(f / "masks.npy", mmap_mode="r"))
                for f in self.folders
            ]
        part = int(np.searchsorted(self._offsets, i, side="right")) - 1
        images, masks = self._arrays[part]
        k = i - int(self._offsets[part])
        tile, mask = images[k], np.array(masks[k])  # the mask copied off the read-only map
        image = self.normalisers[part](tile)
        if image is tile:  # not normalised: copied too (a normalised tile is a new array)
            image = np.array(tile)
        return to_sample(image, mask, self.transforms, seed)

    def __getstate__(self) -> dict:
        # Workers map the files themselves instead of receiving pickled copies of the arrays.
        return {**self.__dict__, "_arrays": None}


def to_sample(
    image: np.ndarray, mask: np.ndarray, transforms=None, seed: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A training sample from a uint8 (t, t, 3) image and its uint8 (t, t) 0/1 mask: augmented
    by ``transforms`` (reseeded with ``seed`` unless None), as float32 (3, t, t) in [0, 1] and
    float32 (1, t, t)."""
    if transforms is not None:
        if seed is not None:
            transforms.set_random_seed(seed)
        out = transforms(image=image, mask=mask)
        image, mask = out["image"], out["mask"]
    image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255)
    return image, torch.from_numpy(np.ascontiguousarray(mask))[None].float()


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a reproducible, per-worker augmentation stream.

    albumentations 2.x draws from its own generators, not numpy's or torch's, so each worker's
    transform is reseeded from torch's per-worker seed (itself derived from the run's seed).
    """
    info = torch.utils.data.get_worker_info()
    transforms = getattr(info.dataset, "transforms", None) if info else None
    if transforms is not None and hasattr(transforms, "set_random_seed"):
        transforms.set_random_seed(torch.initial_seed() % 2**32)


# --------------------------------------------------------------------------- loaders

# More workers only hold more memory: one prepares cached tiles far faster than a training step
# uses them (bench/loader.py).
MAX_WORKERS = 8


def default_workers(cpus: int, local_world: int = 1) -> int:
    """DataLoader workers per process: the ``cpus`` shared among the ``local_world`` processes on
    this machine, less one each for the process itself (its training step), at most `MAX_WORKERS`.

    4 vCPUs (Kaggle): 3, or 1 per rank for two ranks; 2 (free Colab): 1; 1 CPU: 0 (tiles are
    then read in the training process).
    """
    if cpus < 1 or local_world < 1:
        raise ValueError(f"cpus and local_world must be >= 1, got {cpus} and {local_world}")
    return max(0, min(MAX_WORKERS, cpus // local_world - 1))


def init_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn`` of `tile_loader`: one OpenCV thread, then `seed_worker`.

    The workers already share the CPUs: an OpenCV thread pool in each (augmentation) would only
    oversubscribe them; torch sets one thread per worker itself. A worker forked by `tile_loader`
    already has one thread and this changes nothing; a spawned one (macOS) gets it here.
    """
    cv2.setNumThreads(1)
    seed_worker(worker_id)


class SeededSampler(Sampler):
    """Pairs each index of ``sampler`` with a seed for its augmentation (`TileDataset` items).

    The seeds come from ``generator``, which a random ``sampler`` should share; `tile_loader`
    seeds it as each epoch starts.
    """

    def __init__(self, sampler: Sampler, generator: torch.Generator) -> None:
        self.sampler, self.generator = sampler, generator

    def __iter__(self):
        seeds = torch.randint(2**31, (len(self.sampler),), generator=self.generator).tolist()
        return zip(self.sampler, seeds, strict=True)

    def __len__(self) -> int:
        return len(self.sampler)


class _TileLoader(DataLoader):
    """The DataLoader of `tile_loader`: seeds its sampler, and starts workers with one OpenCV
    thread."""

    def __iter__(self):
        # First, before the DataLoader's own draw (made when workers start, not when they persist).
        self.sampler.generator.manual_seed(int(torch.randint(2**62, ()).item()))
        if self.num_workers == 0:
            return super().__iter__()
        # OpenCV's thread pool does not survive a fork: a worker forked while the parent's pool
        # exists hangs in cv2.setNumThreads. Forked without it, workers inherit one thread.
        threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            return super().__iter__()  # starts the workers (the first time, when persistent)
        finally:
            cv2.setNumThreads(threads)


def tile_loader(
    ds: TileDataset,
    batch_size: int,
    *,
    workers: int = 0,
    shuffle: bool = False,
    sampler: Sampler | None = None,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader of (image, mask) batches whose order and augmentation depend on torch's
    global random state alone.

    As an epoch starts, the loader draws a seed from torch's global generator for the tiles'
    order and for a seed per tile (`SeededSampler`), from which the tile is augmented in whichever
    process reads it. The batches are then the same with any number of workers, and a resumed run
    (fresh workers) draws what the uninterrupted one did. Workers (``workers > 0``) start with
    `init_worker` and persist from one epoch to the next instead of being started again.

    Args:
        sampler: the tiles' order (e.g. a DistributedSampler); default: shuffled when
            ``shuffle``, else in order.
    """
    generator = torch.Generator()
    if sampler is None:
        sampler = RandomSampler(ds, generator=generator) if shuffle else SequentialSampler(ds)
    return _TileLoader(
        ds,
        batch_size=batch_size,
        sampler=SeededSampler(sampler, generator),
        num_workers=workers,
        worker_init_fn=init_worker,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
        drop_last=drop_last,
    )


# --------------------------------------------------------------------------- transforms


def train_transforms(seed: int | None = None, stain_augment: float = 0.0) -> A.Compose:
    """Training augmentation: the dihedral group, a mild affine jitter, stain colour and blur.

    Glomeruli have no preferred orientation, so flips and 90-degree turns are free; the colour
    jitter stands in for the stain variation between slides.

    ``stain_augment`` > 0 adds, with that probability, albumentations' ``HEStain``
    (``random_preset``: the tile's optical density is split into two stains by one of eight
    reference stain matrices, each stain's amount scaled by 0.7-1.3 and shifted by +-0.2, then
    recombined), before the colour jitter. ``bench/stain.py`` measures its cost: 24-39 ms a 256 px
    tile on a busy CPU core (``macenko``, which fits the stains per tile, 34-86 ms).
    """
    if not 0.0 <= stain_augment <= 1.0:
        raise ValueError(f"stain_augment must be a probability in [0, 1], got {stain_augment!r}")
    stain = [A.HEStain(method="random_preset", p=stain_augment)] if stain_augment > 0 else []
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomRotate90(p=0.5),
            A.Affine(
                scale=(0.85, 1.15),
                translate_percent=(-0.0625, 0.0625),
                rotate=(-30, 30),
                border_mode=cv2.BORDER_REFLECT_101,
                p=0.5,
            ),
            *stain,
            A.OneOf(
                [
                    A.HueSaturationValue(
                        hue_shift_limit=10, sat_shift_limit=20, val_shift_limit=10
                    ),
                    A.ColorJitter(brightness=0.15, contrast=0.15, saturation=0.15, hue=0.03),
                ],
                p=0.5,
            ),
            A.GaussianBlur(blur_limit=(3, 5), p=0.1),
        ],
        seed=seed,
    )


def eval_transforms() -> A.Compose:
    """Validation transform: the identity (tiles are used as cached)."""
    return A.Compose([])


# --------------------------------------------------------------------------- splits


def split_slides(
    ids: Sequence[str],
    *,
    valid: Sequence[str] | None = None,
    fold: int | None = None,
    n_folds: int = 4,
    groups: Mapping[str, str] | None = None,
) -> tuple[list[str], list[str]]:
    """Split slide ids into (train, valid); a slide is always wholly on one side.

    Args:
        ids: all training slide ids.
        valid: explicit held-out ids (takes precedence over ``fold``).
        fold: which fold of a grouped k-fold to hold out (0-based).
        n_folds: number of folds.
        groups: slide id -> group (e.g. patient, `Competition.patients`); None: each slide is its
            own group. Ids missing from ``groups`` are their own group.

    Folds are balanced greedily: the largest groups are placed first, each into the fold with the
    fewest slides so far (ties by group name), which is deterministic and never splits a group.
    """
    ids = list(ids)
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate slide ids: {sorted({i for i in ids if ids.count(i) > 1})}")
    if valid:
        unknown = [v for v in valid if v not in ids]
        if unknown:
            raise ValueError(f"unknown slide ids in valid: {unknown} (known: {ids})")
        held = set(valid)
    elif fold is not None:
        held = set(group_folds(ids, n_folds, groups)[_check_fold(fold, n_folds)])
    else:
        raise ValueError("give either valid ids or a fold number")
    train = [i for i in ids if i not in held]
    if not train:
        raise ValueError(f"no training slides left after holding out {sorted(held)}")
    return train, [i for i in ids if i in held]


def _check_fold(fold: int, n_folds: int) -> int:
    if not 0 <= fold < n_folds:
        raise ValueError(f"fold must be in [0, {n_folds}), got {fold}")
    return fold


def group_folds(
    ids: Sequence[str], n_folds: int, groups: Mapping[str, str] | None = None
) -> list[list[str]]:
    """Partition slide ids into ``n_folds`` folds without splitting a group (see split_slides)."""
    members: dict[str, list[str]] = {}
    for i in ids:
        members.setdefault(str((groups or {}).get(i, f"slide:{i}")), []).append(i)
    if not 2 <= n_folds <= len(members):
        raise ValueError(
            f"n_folds must be in [2, {len(members)}] (the number of groups), got {n_folds}"
        )
    folds: list[list[str]] = [[] for _ in range(n_folds)]
    for _, group in sorted(members.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        min(folds, key=len).extend(group)
    return folds
