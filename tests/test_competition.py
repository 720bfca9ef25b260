"""kit.competition: the one reader of a competition folder, on real files in tmp_path."""

import json

import numpy as np
import pytest

from kit.competition import INFO_CSV, Competition, read_polygons
from kit.synthetic import make_dataset


def _folder(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    (tmp_path / "train.csv").write_text("id,encoding\nb,1 2\na,\nc,NaN\n")
    (tmp_path / "sample_submission.csv").write_text("id,predicted\nz,\ny,\n")
    (tmp_path / "HuBMAP-20-dataset_information.csv").write_text(
        "image_file,patient_number\nb.tiff,1\na.tiff,2\n"
    )
    for p in ("train/b.tiff", "test/z.tiff"):
        (tmp_path / p).write_bytes(b"x")
    return Competition(tmp_path)


def test_ids_in_file_order_and_truth_empty_for_nan_and_blank(tmp_path):
    comp = _folder(tmp_path)
    assert comp.train_ids == ["b", "a", "c"]
    assert comp.test_ids == ["z", "y"]
    assert [comp.truth(i) for i in comp.train_ids] == ["1 2", "", ""]
    with pytest.raises(ValueError, match="'q' has no row"):
        comp.truth("q")


def test_slide_paths_train_and_test_and_all_missing_named(tmp_path):
    comp = _folder(tmp_path)
    assert comp.slide_path("b") == tmp_path / "train" / "b.tiff"
    assert comp.slide_path("z") == tmp_path / "test" / "z.tiff"
    with pytest.raises(FileNotFoundError, match="'a'"):
        comp.slide_path("a")
    with pytest.raises(FileNotFoundError, match="2 slide.*a, y"):
        comp.slide_paths(["a", "b", "y"])


def test_patients_strip_tiff_suffix(tmp_path):
    assert _folder(tmp_path).patients == {"b": "1", "a": "2"}


def test_malformed_and_missing_csv(tmp_path):
    comp = Competition(tmp_path)
    with pytest.raises(FileNotFoundError, match="train.csv"):
        _ = comp.train_ids
    (tmp_path / "train.csv").write_text("name,encoding\na,\n")
    with pytest.raises(ValueError, match="no 'id' column"):
        _ = Competition(tmp_path).train_ids
    (tmp_path / "train.csv").write_text("id,encoding\na,\na,\n")
    with pytest.raises(ValueError, match="repeated id"):
        _ = Competition(tmp_path).train_ids
    (tmp_path / "HuBMAP-20-dataset_information.csv").write_text("image_file\na.tiff\n")
    with pytest.raises(ValueError, match="patient_number"):
        _ = Competition(tmp_path).patients


def _feature(rings, name=None):
    props = {"classification": {"name": name}} if name else {}
    return {
        "type": "Feature",
        "properties": props,
        "geometry": {"type": "Polygon", "coordinates": rings},
    }


def test_polygons_with_holes_and_anatomy(tmp_path):
    comp = _folder(tmp_path)
    outer = [[0, 0], [10, 0], [10, 10], [0, 0]]
    hole = [[2, 2], [3, 2], [3, 3], [2, 2]]
    (tmp_path / "train" / "b.json").write_text(json.dumps([_feature([outer, hole])]))
    (polygon,) = comp.polygons("b")
    assert [r.shape for r in polygon] == [(4, 2), (4, 2)]
    np.testing.assert_array_equal(polygon[1], np.array(hole, dtype=float))
    with pytest.raises(FileNotFoundError, match="a.json"):
        comp.polygons("a")
    doc = {"type": "FeatureCollection", "features": [_feature([outer], "Cortex")]}
    (tmp_path / "train" / "b-anatomical-structure.json").write_text(json.dumps(doc))
    assert list(comp.anatomy("b")) == ["Cortex"]
    assert comp.anatomy("a") == {} and comp.cortex("a") is None
    np.testing.assert_array_equal(comp.cortex("b")[0][0], np.array(outer, dtype=float))
    # a test slide's anatomy file lies next to it, in test/
    medulla = {"type": "FeatureCollection", "features": [_feature([outer], "Medulla")]}
    (tmp_path / "test" / "z-anatomical-structure.json").write_text(json.dumps(medulla))
    assert list(comp.anatomy("z")) == ["Medulla"] and comp.cortex("z") is None
    (tmp_path / "bad.json").write_text('{"features": [{"geometry": 3}]}')
    with pytest.raises(ValueError, match="bad.json: not a GeoJSON"):
        read_polygons(tmp_path / "bad.json")


def test_synthetic_folder_patients_cover_train_and_missing_info(tmp_path):
    data = make_dataset(tmp_path / "ds", slides=2, test_slides=1, size=(470, 590), seed=1)
    comp = Competition(data)
    assert set(comp.train_ids) | set(comp.test_ids) <= set(comp.patients)
    assert comp.slide_path(comp.test_ids[0]).parent.name == "test"
    (tmp_path / INFO_CSV).write_text("image_file,age\nx.tiff,3\n")
    with pytest.raises(ValueError, match="patient_number"):
        _ = Competition(tmp_path).patients
    with pytest.raises(FileNotFoundError, match="HuBMAP-20"):
        _ = Competition(tmp_path / "missing").patients


def test_subset_lists_only_the_kept_slides_and_links_their_files(tmp_path):
    data = make_dataset(tmp_path / "ds", slides=3, test_slides=1, size=(470, 590), seed=1)
    comp = Competition(data)
    dropped, *keep = comp.train_ids
    view = comp.subset(keep[::-1], tmp_path / "view")  # the source's order, not the argument's
    assert view.train_ids == keep
    assert [view.truth(i) for i in keep] == [comp.truth(i) for i in keep]
    assert view.test_ids == comp.test_ids and view.patients == comp.patients
    assert view.slide_path(keep[0]).resolve() == comp.slide_path(keep[0]).resolve()
    assert view.polygons_path(keep[0]).is_symlink()
    assert not (view.root / "train" / f"{dropped}.tiff").exists()
    # brought up to date in place: a smaller view drops the row, the files stay linked
    assert comp.subset(keep[:1], tmp_path / "view").train_ids == keep[:1]
    with pytest.raises(ValueError, match="'?nope'?.*train.csv|train.csv.*nope"):
        comp.subset(["nope"], tmp_path / "other")
    assert not (tmp_path / "other").exists()  # nothing written for a bad id
