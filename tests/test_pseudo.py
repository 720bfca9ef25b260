import argparse
import hashlib
import json
import shutil
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from kit.cli import add_train_arguments, config_from_args
from kit.competition import Competition
from kit.cv import fold_config, fold_finished
from kit.data import downscale_mask
from kit.pseudo import read_pseudo_labels
from kit.rle import encode
from kit.slides import Slide
from kit.synthetic import make_dataset
from kit.train import fit, split, tile_caches


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # 3 training slides and 2 test slides.
    return make_dataset(
        tmp_path_factory.mktemp("data") / "ds", slides=5, test_slides=2, size=(470, 590), seed=1
    )


def shape_of(dataset, slide_id):
    with Slide(Competition(dataset).slide_path(slide_id)) as slide:
        return slide.shape


def box_mask(shape, y0, y1, x0, x1):
    mask = np.zeros(shape, np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def write_csv(path, rows, header="id,predicted"):
    path.write_text(header + "\n" + "".join(f"{i},{rle}\n" for i, rle in rows))
    return path


def train_config(dataset, tmp_path, *extra):
    comp = Competition(dataset)
    argv = [
        "--data", str(dataset), "--out", str(tmp_path / "run"), "--cache-dir",
        str(tmp_path / "cache"), "--valid", comp.train_ids[0], "--model",
        "lraspp_mobilenet_v3_large", "--window", "128", "--scale", "2", "--tile-overlap", "0",
        "--overlap", "32", "--batch-size", "4", "--epochs", "1", "--workers", "0",
        "--no-progress", "--device", "cpu", *extra,
    ]  # fmt: skip
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_the_csv_masks_decoded_per_slide_with_the_files_digest(dataset, tmp_path):
    test = Competition(dataset).test_ids
    rles = [encode(box_mask(shape_of(dataset, test[0]), 10, 90, 20, 60)), ""]
    csv = write_csv(tmp_path / "s.csv", zip(test, rles, strict=True))
    labels = read_pseudo_labels(csv, dataset)
    assert labels.ids == test and labels.masks == dict(zip(test, rles, strict=True))
    assert labels.sha256 == hashlib.sha256(csv.read_bytes()).hexdigest()
    assert labels.record() == {"csv": str(csv), "sha256": labels.sha256, "ids": test}


@pytest.mark.parametrize(
    "case", ["train id", "unknown id", "out of bounds", "unsorted", "columns", "repeated", "empty"]
)
def test_a_bad_csv_fails_naming_the_file_and_the_problem(dataset, tmp_path, case):
    comp = Competition(dataset)
    test, train = comp.test_ids[0], comp.train_ids[1]
    h, w = shape_of(dataset, test)
    rows, header, message = [(test, "1 5")], "id,predicted", ""
    if case == "train id":
        rows, message = [(test, ""), (train, "")], f"not among the test slides.*: {train} "
    elif case == "unknown id":
        rows, message = [("nosuchslide", "")], "not among the test slides.*: nosuchslide "
    elif case == "out of bounds":
        rows, message = [(test, f"{h * w - 2} 5")], f"row 0, id {test}.*past H \\* W"
    elif case == "unsorted":
        rows, message = [(test, "50 2 10 2")], f"row 0, id {test}.*not sorted"
    elif case == "columns":
        header, message = "id,encoding", "no column\\(s\\) predicted"
    elif case == "repeated":
        rows, message = [(test, ""), (test, "")], f"repeated id\\(s\\): {test}"
    elif case == "empty":
        rows, message = [], "no rows"
    csv = write_csv(tmp_path / "bad.csv", rows, header)
    with pytest.raises(ValueError, match=f"^{csv}: .*{message}"):
        read_pseudo_labels(csv, dataset)
    # fit reads them first: nothing is written, nothing trained.
    cfg = train_config(dataset, tmp_path, "--pseudo", str(csv))
    with pytest.raises(ValueError, match=f"^{csv}: "):
        fit(cfg)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_a_test_slide_without_its_tiff_fails_naming_it(dataset, tmp_path):
    copy = shutil.copytree(dataset, tmp_path / "ds")
    test = Competition(copy).test_ids
    (copy / "test" / f"{test[1]}.tiff").unlink()
    csv = write_csv(tmp_path / "s.csv", [(test[0], ""), (test[1], "")])
    with pytest.raises(FileNotFoundError, match=f"^{csv}: 1 slide.*: {test[1]}$"):
        read_pseudo_labels(csv, copy)
    with pytest.raises(FileNotFoundError, match="pseudo-label file not found"):
        read_pseudo_labels(tmp_path / "absent.csv", copy)


def test_pseudo_slides_train_with_the_csv_masks_and_are_never_held_out(dataset, tmp_path, capsys):
    comp = Competition(dataset)
    pseudo = comp.test_ids[1]
    truth = box_mask(shape_of(dataset, pseudo), 100, 300, 150, 420)  # not the slide's glomeruli
    csv = write_csv(tmp_path / "s.csv", [(pseudo, encode(truth))])
    cfg = train_config(dataset, tmp_path, "--pseudo", str(csv))
    assert cfg.pseudo == str(csv)
    result = fit(cfg)
    assert result["train_ids"] == [*comp.train_ids[1:], pseudo]
    assert result["valid_ids"] == [comp.train_ids[0]]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    digest = hashlib.sha256(csv.read_bytes()).hexdigest()
    assert saved["pseudo"] == {"csv": str(csv), "sha256": digest, "ids": [pseudo]}
    assert saved["train"]["pseudo"] == str(csv)

    # The slide's tiles are those of the training set, their masks the CSV's.
    labels = read_pseudo_labels(csv, dataset)
    folders = tile_caches(cfg, result["train_ids"], progress=False, labels=labels)
    manifests = [json.loads((f / "manifest.json").read_text()) for f in folders]
    assert manifests[-1]["slide_id"] == pseudo and manifests[-1]["kinds"]["positive"] > 0
    log = capsys.readouterr().out
    assert f"({sum(m['count'] for m in manifests)} tiles), held out" in log
    index = json.loads((folders[-1] / "manifest.json").read_text())["count"]
    masks = np.load(folders[-1] / "masks.npy")
    rows = pd.read_csv(folders[-1] / "index.csv")
    assert len(rows) == index == len(masks)
    padded = np.pad(truth, 128)  # windows may pass the slide's edges: zeros there
    for k, r in rows.iterrows():
        window = padded[r.y0 + 128 : r.y1 + 128, r.x0 + 128 : r.x1 + 128]
        np.testing.assert_array_equal(masks[k], downscale_mask(window, 2), err_msg=str(k))

    # Another file content: the run refuses to resume with it; as a fold, it is not finished.
    assert fold_finished(cfg)
    write_csv(csv, [(pseudo, "")])
    assert not fold_finished(cfg)
    with pytest.raises(ValueError, match="pseudo-label file sha256"):
        fit(cfg)


def test_each_mask_has_its_own_cache_and_every_fold_trains_on_the_pseudo_slides(dataset, tmp_path):
    comp = Competition(dataset)
    pseudo = comp.test_ids[0]
    shape = shape_of(dataset, pseudo)
    a = write_csv(tmp_path / "a.csv", [(pseudo, encode(box_mask(shape, 0, 200, 0, 200)))])
    b = write_csv(tmp_path / "b.csv", [(pseudo, encode(box_mask(shape, 200, 400, 200, 500)))])
    cfg = train_config(dataset, tmp_path, "--pseudo", str(a))
    first, second = (
        tile_caches(cfg, [pseudo], progress=False, labels=read_pseudo_labels(f, dataset))[0]
        for f in (a, b)
    )
    assert first != second
    assert not np.array_equal(np.load(first / "masks.npy"), np.load(second / "masks.npy"))

    cv = replace(cfg, valid=[])
    for k in range(3):
        fold = fold_config(cv, k, 3)
        assert fold.pseudo == str(a) and pseudo not in split(fold)[1]
