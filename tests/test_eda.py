import numpy as np
import pandas as pd
import pytest

from kit import eda, rle
from kit.slides import downscale
from kit.synthetic import make_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(
        tmp_path_factory.mktemp("eda") / "data", slides=3, test_slides=1, size=(600, 700), seed=3
    )


def test_polygon_areas_by_hand():
    square = np.array([[0, 0], [4, 0], [4, 3], [0, 3]], float)
    triangle = np.array([[0, 0], [2, 0], [0, 2]], float)
    np.testing.assert_allclose(eda.polygon_areas([square, triangle]), [12.0, 2.0])


@pytest.mark.parametrize("scale", [1, 3, 4])
def test_mask_thumbnail_equals_downscaled_full_mask(monkeypatch, scale):
    monkeypatch.setattr(eda, "STRIP", 8)  # many strips, some not multiples of the scale
    rng = np.random.default_rng(scale)
    mask = (rng.random((37, 53)) < 0.3).astype(np.uint8)
    got = eda.mask_thumbnail(rle.encode(mask), mask.shape, scale)
    want = downscale(mask * np.uint8(255), scale).astype(np.float32) / 255
    np.testing.assert_array_equal(got, want)


def test_slide_table(dataset):
    table = eda.slide_table(dataset, thumb_scale=8)
    train = pd.read_csv(dataset / "train.csv")
    assert list(table["split"]) == ["train"] * len(train) + ["test"]
    assert (table[["height", "width"]].to_numpy() == [600, 700]).all()
    for _, row in table[table["split"] == "train"].iterrows():
        mask = rle.decode(train.set_index("id").at[row["id"], "encoding"], (600, 700))
        assert row["mask_coverage"] == pytest.approx(mask.mean())
        assert row["glomeruli"] >= 1
    assert table["tissue_fraction"].between(0.2, 0.9).all()
    assert (table["s_mean"] > 40).all()  # tissue pixels pass the saturation test
    assert set(table["layout"]) <= {"rgb", "planes"}


def test_glomerulus_sizes_and_windows(dataset):
    sizes = eda.glomerulus_sizes(dataset)
    assert len(sizes) > 0 and (sizes["diameter"] > 10).all()
    slide_id = sizes["id"].iloc[0]
    windows = eda.glomerulus_windows(dataset, slide_id, size=128, n=2)
    assert len(windows) == 2
    assert all(r.stop - r.start == 128 and c.stop - c.start == 128 for r, c in windows)


def test_hsv_statistics():
    thumb = np.zeros((2, 2, 3), np.uint8)
    thumb[0, 0] = (255, 0, 0)
    stats = eda.hsv_statistics(thumb, np.array([[1, 0], [0, 0]]))
    assert stats["s_mean"] == 255 and stats["v_mean"] == 255 and stats["h_std"] == 0
    assert np.isnan(eda.hsv_statistics(thumb, np.zeros((2, 2)))["h_mean"])


def test_mask_window_pads_outside():
    mask = np.arange(20).reshape(4, 5) % 3 == 0
    text = rle.encode(mask)
    padded = np.zeros((8, 9), np.uint8)
    padded[2:6, 2:7] = mask
    for rows, cols in [
        (slice(-2, 3), slice(-1, 4)),
        (slice(1, 6), slice(3, 7)),
        (slice(0, 4), slice(0, 5)),
    ]:
        got = eda.mask_window(text, mask.shape, rows, cols)
        want = padded[rows.start + 2 : rows.stop + 2, cols.start + 2 : cols.stop + 2]
        np.testing.assert_array_equal(got, want)


def test_patient_colours_means_per_patient():
    table = pd.DataFrame(
        {
            "patient": ["a", "b", "a", ""],
            "r": [100, 50, 120, 0],
            "g": [10, 20, 30, 0],
            "b": [0, 0, 60, 0],
        }
    )
    out = eda.patient_colours(table)
    assert list(out.index) == ["?", "b", "a"]  # darkest first
    assert out.loc["a", ["r", "g", "b"]].tolist() == [110, 20, 30]
    assert out.loc["a", "slides"] == 2
    with pytest.raises(ValueError):
        eda.patient_colours(table.iloc[:0])
