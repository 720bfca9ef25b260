"""kit.synthetic: the competition's layout, labels that match the pixels, determinism, atomicity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import rasterio
import tifffile

from kit import synthetic
from kit.competition import read_polygons
from kit.polygons import rasterize
from kit.rle import decode
from kit.synthetic import INFO_COLUMNS, default_dataset, make_dataset, make_slide

# Awkward on purpose: no power of two divides either side.
SIZE = (700, 900)
ARGS = dict(slides=6, test_slides=2, size=SIZE, seed=3, patients=3)
REAL_INFO_COLUMNS = [
    "image_file",
    "width_pixels",
    "height_pixels",
    "anatomical_structures_segmention_file",
    "glomerulus_segmentation_file",
    "patient_number",
    "race",
    "ethnicity",
    "sex",
    "age",
    "weight_kilograms",
    "height_centimeters",
    "bmi_kg/m^2",
    "laterality",
    "percent_cortex",
    "percent_medulla",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("synth") / "hubmap", **ARGS)


def train_ids(data: Path) -> list[str]:
    return pd.read_csv(data / "train.csv")["id"].tolist()


def test_layout_and_csv_headers(data):
    ids = train_ids(data)
    tests = pd.read_csv(data / "sample_submission.csv")["id"].tolist()
    assert len(ids) == 4 and len(tests) == 2
    expected = {"train.csv", "sample_submission.csv", "HuBMAP-20-dataset_information.csv"}
    expected |= {f"train/{i}{suffix}" for i in ids for suffix in (".tiff", ".json")}
    expected |= {
        f"{split}/{i}-anatomical-structure.json"
        for split, group in (("train", ids), ("test", tests))
        for i in group
    }
    expected |= {f"test/{i}.tiff" for i in tests}
    found = {p.relative_to(data).as_posix() for p in data.rglob("*") if p.is_file()}
    assert found - {synthetic.MANIFEST_NAME} == expected
    first_lines = {
        name: (data / name).read_text().splitlines()[0]
        for name in ("train.csv", "sample_submission.csv", "HuBMAP-20-dataset_information.csv")
    }
    assert first_lines["train.csv"] == "id,encoding"
    assert first_lines["sample_submission.csv"] == "id,predicted"
    assert first_lines["HuBMAP-20-dataset_information.csv"] == ",".join(REAL_INFO_COLUMNS)
    assert list(INFO_COLUMNS) == REAL_INFO_COLUMNS
    for slide_id in ids + tests:
        assert len(slide_id) == 9 and set(slide_id) <= set("0123456789abcdef")
    assert len(set(ids + tests)) == 6


def test_dataset_information_covers_all_slides(data):
    info = pd.read_csv(data / "HuBMAP-20-dataset_information.csv")
    ids = train_ids(data)
    tests = pd.read_csv(data / "sample_submission.csv")["id"].tolist()
    assert sorted(info["image_file"]) == sorted(f"{i}.tiff" for i in ids + tests)
    assert (info["width_pixels"] == SIZE[1]).all() and (info["height_pixels"] == SIZE[0]).all()
    by_id = info.set_index(info["image_file"].str[:9])
    assert by_id.loc[ids, "glomerulus_segmentation_file"].tolist() == [f"{i}.json" for i in ids]
    assert by_id.loc[tests, "glomerulus_segmentation_file"].isna().all()
    assert (
        by_id["anatomical_structures_segmention_file"] == by_id.index + "-anatomical-structure.json"
    ).all()
    assert ((info["percent_cortex"] + info["percent_medulla"]) == 100).all()
    assert info["percent_cortex"].between(50, 95).all()
    # 6 slides from exactly 3 patients: some patients have several slides
    assert info["patient_number"].nunique() == 3
    assert info["patient_number"].value_counts().max() >= 2
    # a patient's rows agree on the patient's facts
    facts = ["race", "ethnicity", "sex", "age", "weight_kilograms", "height_centimeters"]
    assert (info.groupby("patient_number")[facts].nunique() == 1).all().all()
    assert set(info["laterality"]) <= {"Left", "Right"}


def read_rgb(path: Path) -> np.ndarray:
    """uint8 (H, W, 3) whatever the layout (tifffile; independent of kit.slides)."""
    image = tifffile.imread(path)
    if image.ndim == 5:  # planes: (1, 1, 3, H, W)
        image = image[0, 0].transpose(1, 2, 0)
    return image


def polygon_mask(json_path: Path, shape) -> np.ndarray:
    """uint8 (H, W): every polygon of a json file filled, minus its holes."""
    return rasterize(read_polygons(json_path), shape)


def test_train_csv_encodes_the_json_polygons(data):
    table = pd.read_csv(data / "train.csv", index_col="id")
    for slide_id in table.index:
        mask = decode(table.at[slide_id, "encoding"], SIZE)
        features = json.loads((data / "train" / f"{slide_id}.json").read_text())
        assert len(features) >= 1
        for feature in features:
            assert feature["type"] == "Feature" and feature["id"] == "PathAnnotationObject"
            assert feature["geometry"]["type"] == "Polygon"
            props = feature["properties"]
            assert props["classification"]["name"] == "glomerulus"
            assert props["isLocked"] is False and props["measurements"] == []
            ring = np.asarray(feature["geometry"]["coordinates"][0])
            assert ring.shape[1] == 2 and (ring[0] == ring[-1]).all()  # closed
            assert (ring[:, 0] < SIZE[1]).all() and (ring[:, 1] < SIZE[0]).all()  # x=col, y=row
        # The one rasterizer made both: training with either mask source learns the same mask.
        np.testing.assert_array_equal(mask, polygon_mask(data / "train" / f"{slide_id}.json", SIZE))


def eroded(mask: np.ndarray, k: int) -> np.ndarray:
    return cv2.erode(mask, np.ones((k, k), np.uint8)).astype(bool)


def test_labels_sit_on_glomeruli_in_the_pixels(data):
    """The masked pixels look like glomeruli: a dense dark tuft inside a pale Bowman's space, so
    darker inside and paler near the edge than the tissue around them."""
    table = pd.read_csv(data / "train.csv", index_col="id")
    for slide_id in table.index:
        image = read_rgb(data / "train" / f"{slide_id}.tiff")
        mask = decode(table.at[slide_id, "encoding"], SIZE)
        green = image[..., 1].astype(float)  # PAS and haematoxylin both absorb green
        tissue = polygon_mask(data / "train" / f"{slide_id}-anatomical-structure.json", SIZE)

        core, band = eroded(mask, 25), eroded(mask, 3) & ~eroded(mask, 25)
        around = tissue.astype(bool) & ~cv2.dilate(mask, np.ones((31, 31), np.uint8)).astype(bool)
        p80 = {
            name: np.percentile(green[where], 80)
            for name, where in (("core", core), ("band", band), ("around", around))
        }
        assert p80["core"] < p80["around"] - 40, (slide_id, p80)
        assert p80["band"] > p80["around"] + 15, (slide_id, p80)


def test_anatomical_structures(data):
    for path in sorted(data.glob("*/*-anatomical-structure.json")):
        features = json.loads(path.read_text())
        names = {f["properties"]["classification"]["name"] for f in features}
        assert names == {"Cortex", "Medulla"}
        for f in features:
            for ring in f["geometry"]["coordinates"]:
                assert ring[0] == ring[-1]
    # glomeruli lie in the cortex
    for slide_id in train_ids(data):
        anatomy = json.loads((data / "train" / f"{slide_id}-anatomical-structure.json").read_text())
        rings = [f["geometry"]["coordinates"] for f in anatomy]
        classes = [f["properties"]["classification"]["name"] for f in anatomy]
        cortex = rasterize([r for r, c in zip(rings, classes, strict=True) if c == "Cortex"], SIZE)
        glom = polygon_mask(data / "train" / f"{slide_id}.json", SIZE).astype(bool)
        assert cortex[glom].mean() > 0.99


def test_tissue_covers_about_half_and_glass_is_unsaturated(data):
    for path in sorted(data.glob("*/*.tiff")):
        image = read_rgb(path)
        anatomy = path.with_name(f"{path.stem}-anatomical-structure.json")
        tissue = polygon_mask(anatomy, SIZE).astype(bool)  # cortex + medulla
        assert 0.4 < tissue.mean() < 0.65, (path.name, tissue.mean())
        # what a tiler sees: HSV saturation > 40 on a 4x thumbnail
        thumb = cv2.resize(image, (SIZE[1] // 4, SIZE[0] // 4), interpolation=cv2.INTER_AREA)
        saturated = cv2.cvtColor(thumb, cv2.COLOR_RGB2HSV)[..., 1] > 40
        assert abs(saturated.mean() - tissue.mean()) < 0.08, path.name
        glass = cv2.erode((~tissue).astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        assert np.median(hsv[..., 1][glass]) < 15 and np.median(hsv[..., 2][glass]) > 200


def test_foreground_fraction_is_sane(data):
    table = pd.read_csv(data / "train.csv", index_col="id")
    for slide_id in table.index:
        fraction = decode(table.at[slide_id, "encoding"], SIZE).mean()
        assert 0.003 < fraction < 0.15, (slide_id, fraction)


def test_default_size_slide_has_the_specified_objects():
    slide = make_slide(synthetic.DEFAULT_SIZE, seed=11)
    assert slide.image.shape == (*synthetic.DEFAULT_SIZE, 3) and slide.image.dtype == np.uint8
    assert 25 <= len(slide.glomeruli) <= 60
    diameters = [2 * np.sqrt(cv2.contourArea(r) / np.pi) for r in slide.glomeruli]
    assert 60 <= min(diameters) and max(diameters) <= 160
    kinds = {kind for kind, _ in slide.distractors}
    assert kinds == {"vessel", "tubules", "blob"}
    # look-alikes are not labelled and do not touch the glomeruli
    others = rasterize([[r] for _, r in slide.distractors], slide.image.shape[:2])
    assert not (others & slide.mask).any()
    assert 0.45 <= slide.region_fraction("tissue") <= 0.62
    assert 0.005 < slide.mask.mean() < 0.12


def test_same_seed_same_bytes_other_seed_differs(data, tmp_path):
    again = make_dataset(tmp_path / "again", **ARGS)
    for name in ("train.csv", "sample_submission.csv", "HuBMAP-20-dataset_information.csv"):
        assert (again / name).read_bytes() == (data / name).read_bytes()
    for path in sorted(data.glob("*/*.tiff")):
        twin = again / path.relative_to(data)
        assert np.array_equal(read_rgb(path), read_rgb(twin))
        assert twin.read_bytes() == path.read_bytes()
    other = make_dataset(tmp_path / "other", **{**ARGS, "seed": 4})
    assert set(train_ids(other)).isdisjoint(train_ids(data))
    a = read_rgb(next((data / "train").glob("*.tiff")))
    b = read_rgb(next((other / "train").glob("*.tiff")))
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 10


def test_both_tiff_layouts_open_with_rasterio(data):
    seen = {"train": set(), "test": set()}
    for path in sorted(data.glob("*/*.tiff")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NotGeoreferencedWarning
            with rasterio.open(path) as ds:
                assert (ds.height, ds.width) == SIZE and ds.dtypes[0] == "uint8"
                if ds.count == 3:
                    assert ds.subdatasets == [] and ds.block_shapes[0] == (256, 256)
                    layout, pixels = "rgb", ds.read().transpose(1, 2, 0)
                else:
                    assert ds.count == 1 and len(ds.subdatasets) == 3
                    planes = []
                    for name in ds.subdatasets:
                        with rasterio.open(name) as sub:
                            assert sub.count == 1
                            planes.append(sub.read(1))
                    layout, pixels = "planes", np.stack(planes, -1)
        assert np.array_equal(pixels, read_rgb(path))
        seen[path.parent.name].add(layout)
    assert seen == {"train": {"rgb", "planes"}, "test": {"rgb", "planes"}}
    planes = [p for p in data.glob("*/*.tiff") if tifffile.TiffFile(p).series[0].ndim == 5]
    with tifffile.TiffFile(planes[0]) as tif:
        assert tif.series[0].shape == (1, 1, 3, *SIZE) and len(tif.pages) == 3


def test_sample_submission_lists_exactly_the_test_ids(data):
    lines = (data / "sample_submission.csv").read_text().splitlines()
    tiffs = sorted(p.stem for p in (data / "test").glob("*.tiff"))
    assert sorted(line.split(",")[0] for line in lines[1:]) == tiffs
    assert all(line.endswith(",") for line in lines[1:])  # empty predictions
    assert pd.read_csv(data / "sample_submission.csv")["predicted"].isna().all()


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        (dict(slides=0), "slides"),
        (dict(slides=2.5), "slides"),
        (dict(slides=True), "slides"),
        (dict(slides=3, test_slides=3), "test_slides"),
        (dict(test_slides=-1), "test_slides"),
        (dict(size=(100, 900)), "size"),
        (dict(size=(700,)), "size"),
        (dict(size="700x900"), "size"),
        (dict(seed=-1), "seed"),
        (dict(slides=3, test_slides=1, patients=4), "patients"),
        (dict(patients=0), "patients"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(tmp_path, kwargs, named):
    with pytest.raises(ValueError, match=named):
        make_dataset(tmp_path / "x", **{**ARGS, **kwargs})
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def small(out, **kwargs):
    return make_dataset(out, **{**ARGS, "slides": 2, "test_slides": 1, "patients": 1, **kwargs})


def test_refuses_to_overwrite_unless_asked(tmp_path):
    out = small(tmp_path / "ds", seed=1)
    before = (out / "train.csv").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        small(out, seed=2)
    assert (out / "train.csv").read_bytes() == before
    assert small(out, seed=2, overwrite=True) == out
    assert (out / "train.csv").read_bytes() != before
    assert synthetic.is_complete(out)
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no temporary folders left
    (tmp_path / "empty").mkdir()
    assert synthetic.is_complete(small(tmp_path / "empty"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        small(tmp_path / "file", overwrite=True)


def test_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthetic, "_write_tiff", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        small(tmp_path / "ds")
    assert list(tmp_path.iterdir()) == []


TINY_DEFAULT = {"slides": 2, "test_slides": 1, "size": (300, 400), "seed": 5, "patients": 1}


def test_default_dataset_is_built_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "DEFAULT_PARAMS", TINY_DEFAULT)
    path = default_dataset(tmp_path)
    assert path.parent == tmp_path and f"v{synthetic.DATASET_VERSION}" in path.name
    assert synthetic.is_complete(path)
    assert pd.read_csv(path / "train.csv").shape == (1, 2)

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt a complete dataset")

    monkeypatch.setattr(synthetic, "make_dataset", fail)
    assert default_dataset(tmp_path) == path
    monkeypatch.setenv(synthetic.CACHE_ENV, str(tmp_path))
    assert default_dataset() == path
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_default_dataset_replaces_an_incomplete_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "DEFAULT_PARAMS", TINY_DEFAULT)
    stale = tmp_path / f"synthetic-v{synthetic.DATASET_VERSION}"
    (stale / "train").mkdir(parents=True)  # e.g. a copy interrupted by hand: no manifest
    assert default_dataset(tmp_path) == stale and synthetic.is_complete(stale)
    assert [p.name for p in tmp_path.iterdir()] == [stale.name]


def test_default_dataset_loser_of_a_race_keeps_the_winners_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "DEFAULT_PARAMS", TINY_DEFAULT)
    real = synthetic.make_dataset
    target = tmp_path / f"synthetic-v{synthetic.DATASET_VERSION}"
    winner = {}

    def racing(out, **kwargs):
        built = real(out, **kwargs)
        real(target, **kwargs)  # another process publishes first
        winner["inode"] = target.stat().st_ino
        return built

    monkeypatch.setattr(synthetic, "make_dataset", racing)
    assert default_dataset(tmp_path) == target
    assert target.stat().st_ino == winner["inode"]  # the winner's folder, untouched
    assert synthetic.is_complete(target)
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # the loser's copy is gone


def test_default_dataset_two_processes_at_once(tmp_path):
    code = (
        "import sys, kit.synthetic as s;"
        f"s.DEFAULT_PARAMS = {TINY_DEFAULT!r};"
        "print(s.default_dataset(sys.argv[1]))"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    command = [sys.executable, "-c", code, str(tmp_path)]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, env=env) for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0].decode().strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outputs[0] == outputs[1]
    assert synthetic.is_complete(outputs[0])
    assert [p.name for p in tmp_path.iterdir()] == [Path(outputs[0]).name]


# ----------------------------------------------------------------------------------------------
# Profiles


def test_mini_profile_keeps_the_bytes_of_the_generator_before_profiles():
    # sha256 of make_slide((300, 400), seed=5).image, taken from the generator before profiles
    # existed: the mini profile must not change cached datasets or the tests' data.
    import hashlib

    image = make_slide((300, 400), seed=5).image
    digest = "cd72e9537b0499f7601a2d02c7f1fad30225c83f060488863820e61c5a9e85bc"
    assert hashlib.sha256(image.tobytes()).hexdigest() == digest
    assert np.array_equal(make_slide((300, 400), seed=5, profile="mini").image, image)


@pytest.fixture(scope="module")
def realistic_slide():
    return make_slide((2048, 2560), seed=4, profile="realistic")


def test_realistic_glomeruli_are_200_to_400_px_and_inside_the_cortex(realistic_slide):
    slide = realistic_slide
    areas = np.array([cv2.contourArea(r.astype(np.float32)) for r in slide.glomeruli])
    assert len(areas) >= 5
    assert 200 <= np.median(2 * np.sqrt(areas / np.pi)) <= 400
    cortex = rasterize(slide.cortex, slide.image.shape[:2]).astype(bool)
    for ring in slide.glomeruli:
        inside = rasterize([[ring]], slide.image.shape[:2]).astype(bool)
        # the cortex polygon is a 1 px simplification of its mask: allow its rounding
        assert cortex[inside].mean() > 0.97


def test_realistic_has_lookalikes_of_every_kind(realistic_slide):
    kinds = {kind for kind, _ in realistic_slide.distractors}
    assert kinds == {"vessel", "tubules", "blob"}


def test_realistic_patients_differ_in_colour(tmp_path):
    from kit.eda import patient_colours, slide_table

    out = make_dataset(
        tmp_path / "r",
        slides=4,
        test_slides=1,
        size=(768, 1024),
        seed=1,
        patients=4,
        profile="realistic",
    )
    colours = patient_colours(slide_table(out, thumb_scale=8))[["r", "g", "b"]].to_numpy()
    assert len(colours) == 4
    gaps = np.linalg.norm(colours[:, None] - colours[None], axis=-1)
    # at least 3 patients whose mean tissue colours are >= 10 RGB levels apart pairwise
    assert any(
        min(gaps[i, j], gaps[i, k], gaps[j, k]) >= 10
        for i in range(4)
        for j in range(i + 1, 4)
        for k in range(j + 1, 4)
    )
    manifest = json.loads((out / synthetic.MANIFEST_NAME).read_text())
    assert manifest["params"]["profile"] == "realistic"


def test_unknown_profile_is_named(tmp_path):
    with pytest.raises(ValueError, match="huge"):
        make_dataset(tmp_path / "x", profile="huge")
