"""Exploratory statistics of a dataset in the competition's layout, computed per slide.

Everything works on thumbnails, column strips and polygon files, so it runs on the real 30k x 37k
slides without decoding a whole slide or its mask at full resolution.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from kit.competition import Competition, read_polygons
from kit.rle import decode_columns, parse
from kit.slides import Slide, downscale
from kit.tiling import tissue_mask

# Columns decoded at a time when shrinking a mask: bounds memory to about H * STRIP bytes.
STRIP = 2048


def polygon_areas(polygons: list[np.ndarray]) -> np.ndarray:
    """Areas in full-resolution pixels of (k, 2) polygon rings (shoelace formula)."""
    areas = [
        0.5 * abs(np.dot(p[:, 0], np.roll(p[:, 1], 1)) - np.dot(p[:, 1], np.roll(p[:, 0], 1)))
        for p in polygons
    ]
    return np.asarray(areas, dtype=np.float64)


def mask_thumbnail(rle: str | float | None, shape: tuple[int, int], scale: int) -> np.ndarray:
    """The RLE's mask shrunk by ``scale`` (block mean), as float32 coverage in [0, 1].

    Decodes ``STRIP`` columns at a time (rounded to a multiple of ``scale``), never the whole mask.

    Returns:
        float32 (ceil(H/scale), ceil(W/scale)).
    """
    h, w = shape
    runs = parse(rle, shape)
    step = max(scale, STRIP // scale * scale)
    parts = []
    for x0 in range(0, w, step):
        strip = decode_columns(runs, shape, slice(x0, min(x0 + step, w))) * np.uint8(255)
        parts.append(downscale(strip, scale))
    if not parts:
        return np.zeros((-(-h // scale), 0), np.float32)
    return np.concatenate(parts, axis=1).astype(np.float32) / 255.0


def slide_table(data_dir: str | os.PathLike, thumb_scale: int = 32) -> pd.DataFrame:
    """One row per slide (train and test): size, layout, patient, glomeruli, coverage, tissue.

    Columns: ``id, split, height, width, layout, patient, glomeruli`` (polygons in the JSON file,
    train only), ``mask_coverage`` (share of pixels inside a glomerulus, from train.csv),
    ``tissue_fraction`` (share of the thumbnail that passes the HSV tissue test), the mean RGB
    of tissue pixels ``r, g, b`` and their HSV statistics (``h_mean, h_std, s_mean, ...``, see
    `hsv_statistics`).
    """
    comp = Competition(data_dir)
    patients = comp.patients
    rows = []
    for split, ids in (("train", comp.train_ids), ("test", comp.test_ids)):
        for slide_id in ids:
            with Slide(comp.slide_path(slide_id)) as slide:
                (h, w), layout = slide.shape, slide.layout
                thumb = slide.thumbnail(thumb_scale)
            tissue = tissue_mask(thumb)
            row = {"id": slide_id, "split": split, "height": h, "width": w, "layout": layout}
            row["patient"] = patients.get(slide_id, "")
            row["glomeruli"], row["mask_coverage"] = np.nan, np.nan
            if split == "train":
                if (comp.root / "train" / f"{slide_id}.json").is_file():
                    row["glomeruli"] = len(comp.polygons(slide_id))
                _, lengths = parse(comp.truth(slide_id), (h, w))
                row["mask_coverage"] = lengths.sum() / (h * w)
            row["tissue_fraction"] = float(tissue.mean())
            colour = thumb[tissue].mean(axis=0) if tissue.any() else np.full(3, np.nan)
            row.update(zip("rgb", np.round(colour, 1), strict=True))
            row.update(hsv_statistics(thumb, tissue))
            rows.append(row)
    return pd.DataFrame(rows)


def glomerulus_sizes(data_dir: str | os.PathLike) -> pd.DataFrame:
    """Every annotated glomerulus of the training slides: ``id, area, diameter`` (full-res px).

    ``diameter`` is that of the disc of equal area.
    """
    data_dir = Path(data_dir)
    frames = []
    for path in sorted((data_dir / "train").glob("*.json")):
        if path.name.endswith("-anatomical-structure.json"):
            continue
        areas = polygon_areas([rings[0] for rings in read_polygons(path)])
        frames.append(
            pd.DataFrame({"id": path.stem, "area": areas, "diameter": 2 * np.sqrt(areas / np.pi)})
        )
    if not frames:
        return pd.DataFrame({"id": [], "area": [], "diameter": []})
    return pd.concat(frames, ignore_index=True)


def glomerulus_windows(
    data_dir: str | os.PathLike, slide_id: str, size: int = 512, n: int = 4, seed: int = 0
) -> list[tuple[slice, slice]]:
    """Up to ``n`` (rows, cols) windows of ``size`` px centred on annotated glomeruli."""
    polygons = [rings[0] for rings in Competition(data_dir).polygons(slide_id)]
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(polygons), size=min(n, len(polygons)), replace=False)
    windows = []
    for i in picks:
        cx, cy = polygons[i].mean(axis=0)
        y0, x0 = int(cy) - size // 2, int(cx) - size // 2
        windows.append((slice(y0, y0 + size), slice(x0, x0 + size)))
    return windows


def hsv_statistics(thumb: np.ndarray, tissue: np.ndarray) -> dict[str, float]:
    """Mean and spread of hue, saturation and value (OpenCV scales) over tissue pixels."""
    hsv = cv2.cvtColor(thumb, cv2.COLOR_RGB2HSV)[tissue.astype(bool)]
    if len(hsv) == 0:
        return {f"{c}_{s}": float("nan") for c in "hsv" for s in ("mean", "std")}
    return {
        f"{c}_{s}": float(f(hsv[:, i]))
        for i, c in enumerate("hsv")
        for s, f in (("mean", np.mean), ("std", np.std))
    }


def mask_window(runs, shape: tuple[int, int], rows: slice, cols: slice) -> np.ndarray:
    """The mask under a window that may extend past the slide (outside is 0).

    Args:
        runs: an RLE string or the ``(starts0, lengths)`` pair from ``kit.rle.parse``.
        rows, cols: the window, start/stop in full-resolution pixels.
    Returns:
        uint8 (rows length, cols length).
    """
    h, w = shape
    c0, c1 = max(cols.start, 0), min(cols.stop, w)
    r0, r1 = max(rows.start, 0), min(rows.stop, h)
    out = np.zeros((rows.stop - rows.start, cols.stop - cols.start), np.uint8)
    if c0 < c1 and r0 < r1:
        strip = decode_columns(runs, shape, slice(c0, c1))[r0:r1]
        out[r0 - rows.start : r1 - rows.start, c0 - cols.start : c1 - cols.start] = strip
    return out


def patient_colours(table: pd.DataFrame) -> pd.DataFrame:
    """Mean tissue colour per patient from a `slide_table`: ``r, g, b`` (0-255) and ``slides``.

    Indexed by patient (slides without one are grouped as ``"?"``), sorted by brightness, so a
    held-out patient's stain can be compared with the training patients' at a glance.
    """
    if table.empty:
        raise ValueError("patient_colours needs a slide table with at least one slide")
    patient = table["patient"].astype(str).replace("", "?")
    grouped = table.assign(patient=patient).groupby("patient")
    out = grouped[["r", "g", "b"]].mean().round(1)
    out["slides"] = grouped.size()
    return out.loc[out[["r", "g", "b"]].sum(axis=1).sort_values().index]
