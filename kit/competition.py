"""The one reader of a HuBMAP competition folder.

Layout (see DOMAIN.md "The data"): ``train.csv`` (id, encoding), ``train/{id}.tiff``,
``train/{id}.json`` (glomerulus polygons), ``train/{id}-anatomical-structure.json``,
``test/{id}.tiff``, ``sample_submission.csv`` (id, predicted) and
``HuBMAP-20-dataset_information.csv``. Every file is parsed on first use and cached.

    comp = Competition("/kaggle/input/hubmap-kidney-segmentation")
    comp.train_ids, comp.truth(comp.train_ids[0]), comp.slide_path("aaa6a05cc")
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from kit.atomic import write_text

INFO_CSV = "HuBMAP-20-dataset_information.csv"

Polygon = list[np.ndarray]  # rings, exterior first then holes; each a (k, 2) float64 (x, y) array


@dataclass(frozen=True)
class Competition:
    """A competition folder; its files are read lazily, once each."""

    root: Path
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # ------------------------------------------------------------------ csv files

    def _ids_csv(self, name: str) -> pd.DataFrame:
        """``name`` indexed by its stripped ``id`` column, all strings ("" for empty cells)."""
        if name not in self._cache:
            path = self.root / name
            if not path.is_file():
                raise FileNotFoundError(f"no {name} in {self.root}")
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
            if "id" not in frame.columns:
                raise ValueError(f"{path}: no 'id' column (columns: {list(frame.columns)})")
            frame["id"] = frame["id"].str.strip()
            repeated = sorted(set(frame["id"][frame["id"].duplicated()]))
            if repeated:
                raise ValueError(f"{path}: repeated id(s): {', '.join(repeated)}")
            self._cache[name] = frame.set_index("id")
        return self._cache[name]

    @property
    def train_ids(self) -> list[str]:
        """Slide ids of ``train.csv``, in file order."""
        return list(self._ids_csv("train.csv").index)

    @property
    def test_ids(self) -> list[str]:
        """Slide ids of ``sample_submission.csv`` (the rows to answer), in file order."""
        return list(self._ids_csv("sample_submission.csv").index)

    def truth(self, slide_id: str) -> str:
        """The ``train.csv`` RLE of a slide; "" when the encoding is empty or NaN."""
        table = self._ids_csv("train.csv")
        if slide_id not in table.index:
            raise ValueError(f"slide {slide_id!r} has no row in {self.root / 'train.csv'}")
        if "encoding" not in table:
            raise ValueError(f"{self.root / 'train.csv'}: expected columns id,encoding")
        rle = table.at[slide_id, "encoding"]
        return "" if rle.strip().lower() == "nan" else rle.strip()

    @cached_property
    def patients(self) -> dict[str, str]:
        """Slide id (no ``.tiff``) -> patient number, from ``HuBMAP-20-dataset_information.csv``."""
        path = self.root / INFO_CSV
        if not path.is_file():
            raise FileNotFoundError(f"no {INFO_CSV} in {self.root}")
        table = pd.read_csv(path, dtype=str)
        for column in ("image_file", "patient_number"):
            if column not in table:
                raise ValueError(f"{path}: no column {column!r}")
        ids = table["image_file"].str.replace(r"\.tiff?$", "", regex=True)
        return dict(zip(ids, table["patient_number"], strict=True))

    def subset(self, keep: list[str], out: str | os.PathLike) -> Competition:
        """A competition folder at ``out`` whose ``train.csv`` lists only the slides ``keep``
        (their rows copied from this one, in this one's order); every other file, and the kept
        slides' files, symlinked. ``out`` may already hold such a view: its ``train.csv`` is
        rewritten (links to slides no longer kept stay; ``train.csv`` is what lists the slides).

        For training on part of the slides with code that reads a whole folder (cross-validation
        without a held-out fold's patients). ValueError naming any id not in ``train.csv``.
        """
        table = self._ids_csv("train.csv")
        unknown = [i for i in keep if i not in table.index]
        if unknown:
            raise ValueError(f"id(s) not in {self.root / 'train.csv'}: {', '.join(unknown)}")
        out, kept = Path(out), set(keep)
        (out / "train").mkdir(parents=True, exist_ok=True)
        for name in (INFO_CSV, "sample_submission.csv", "test"):
            if (self.root / name).exists() and not (out / name).exists():
                (out / name).symlink_to((self.root / name).resolve())
        for path in (self.root / "train").iterdir():
            # train/{id}.tiff, {id}.json, {id}-anatomical-structure.json
            if path.name.split(".")[0].removesuffix("-anatomical-structure") in kept:
                if not (out / "train" / path.name).exists():
                    (out / "train" / path.name).symlink_to(path.resolve())
        rows = table.loc[[i for i in table.index if i in kept]]
        write_text(out / "train.csv", rows.reset_index().to_csv(index=False))
        return Competition(out)

    # ------------------------------------------------------------------ slides

    def _tiff(self, slide_id: str) -> Path:
        train = self.root / "train" / f"{slide_id}.tiff"
        return train if train.is_file() else self.root / "test" / f"{slide_id}.tiff"

    def slide_path(self, slide_id: str) -> Path:
        """``train/{id}.tiff``, else ``test/{id}.tiff``; FileNotFoundError naming the id."""
        path = self._tiff(slide_id)
        if not path.is_file():
            raise FileNotFoundError(f"slide {slide_id!r} not found: {self.root}/{{train,test}}")
        return path

    def slide_paths(self, ids: list[str]) -> dict[str, Path]:
        """``slide_path`` per id; one FileNotFoundError naming every missing slide at once."""
        paths = {i: self._tiff(i) for i in ids}
        missing = [i for i, p in paths.items() if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} slide(s) have no TIFF in {self.root / 'train'} or "
                f"{self.root / 'test'}: {', '.join(missing)}"
            )
        return paths

    # ------------------------------------------------------------------ json files

    def polygons_path(self, slide_id: str) -> Path:
        """``train/{id}.json``; FileNotFoundError naming it when missing."""
        path = self.root / "train" / f"{slide_id}.json"
        if not path.is_file():
            raise FileNotFoundError(f"no polygon file for slide {slide_id!r}: {path}")
        return path

    def polygons(self, slide_id: str) -> list[Polygon]:
        """The glomeruli of a slide: each a list of rings, exterior first (`rasterize` input)."""
        return read_polygons(self.polygons_path(slide_id))

    def anatomy(self, slide_id: str) -> dict[str, list[Polygon]]:
        """Region name ("Cortex", "Medulla", ...) -> polygons; {} when the file is absent.

        The file lies next to the slide: ``train/`` or ``test/{id}-anatomical-structure.json``.
        """
        path = self._tiff(slide_id).with_name(f"{slide_id}-anatomical-structure.json")
        if not path.is_file():
            return {}
        regions: dict[str, list[Polygon]] = {}
        for name, polygon in _features(path):
            regions.setdefault(name, []).append(polygon)
        return regions

    def cortex(self, slide_id: str) -> list[Polygon] | None:
        """The slide's Cortex polygons; None when it has no anatomy file or no Cortex in it."""
        return self.anatomy(slide_id).get("Cortex") or None


def read_polygons(path: str | os.PathLike) -> list[Polygon]:
    """The polygons of a GeoJSON file (Feature list or FeatureCollection; Polygon/MultiPolygon).

    Vertices are (x, y) full-resolution pixel coordinates, float64. Each polygon is a list of
    rings, exterior first then its holes; ``[p[0] for p in polygons]`` gives the outlines.
    """
    return [polygon for _, polygon in _features(Path(path))]


def _features(path: Path) -> list[tuple[str, Polygon]]:
    """(classification name or "", polygon) per polygon of a GeoJSON file."""
    try:
        doc = json.loads(path.read_text())
        features = doc["features"] if isinstance(doc, dict) else doc
        out = []
        for feature in features:
            geometry = feature["geometry"]
            props = feature.get("properties") or {}
            name = (props.get("classification") or {}).get("name", "")
            parts = geometry["coordinates"]
            if geometry["type"] == "Polygon":
                parts = [parts]
            elif geometry["type"] != "MultiPolygon":
                continue
            for rings in parts:
                out.append((name, [np.asarray(r, dtype=np.float64).reshape(-1, 2) for r in rings]))
    except (KeyError, TypeError, IndexError, AttributeError, ValueError) as err:
        raise ValueError(f"{path}: not a GeoJSON polygon file ({err})") from err
    return out
