"""Evaluation: per-slide Dice at full resolution, strip by strip, equal to whole-mask Dice."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

from kit.evaluate import best_threshold, evaluate_slides, format_report, mean_dice
from kit.infer import InferConfig, iter_probability_strips
from kit.metrics import dice, dice_from_counts
from kit.rle import decode, encode

CFG = InferConfig(window=64, overlap=16, scale=2, tissue=False)
SHAPES = {"b2": (90, 130), "a1": (70, 61), "c3": (40, 50)}


def pointwise(x: torch.Tensor) -> torch.Tensor:
    return 8 * (x[:, 0:1] - x[:, 2:3]) - 0.2


@pytest.fixture
def data_dir(tmp_path, write_tiff):
    """train.csv + train/{id}.tiff; c3's truth is empty (and so is its prediction: black)."""
    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    rng = np.random.default_rng(1)
    rows = []
    for slide_id, shape in SHAPES.items():
        h, w = shape
        yy, xx = np.mgrid[0:h, 0:w]
        image = np.stack([255 * xx / w, rng.integers(0, 256, shape), 255 * yy / h], -1)
        truth = (xx / w > yy / h + 0.05).astype(np.uint8)  # close to, not equal to, the prediction
        if slide_id == "c3":
            image[:], truth[:] = 0, 0
        write_tiff(root / "train" / f"{slide_id}.tiff", image.astype(np.uint8))
        rows.append((slide_id, encode(truth)))
    pd.DataFrame(rows, columns=["id", "encoding"]).to_csv(root / "train.csv", index=False)
    return root


def whole_slide_probs(path) -> np.ndarray:
    return np.concatenate([p for _, p in iter_probability_strips(path, pointwise, CFG)], axis=1)


def test_per_slide_dice_equals_whole_mask_dice(data_dir):
    scores = evaluate_slides(data_dir, pointwise, cfg=CFG, thresholds=(0.3, 0.7), progress=False)
    assert list(scores.columns) == [
        "id", "dice", "dice@0.3", "dice@0.7", "pred_px", "true_px", "both_px", "seconds",
    ]  # fmt: skip
    assert scores["id"].tolist() == ["b2", "a1", "c3"]  # train.csv's order
    truth = pd.read_csv(data_dir / "train.csv", keep_default_na=False).set_index("id")
    for _, row in scores.iterrows():
        probs = whole_slide_probs(data_dir / "train" / f"{row['id']}.tiff")
        mask = decode(truth.loc[row["id"], "encoding"], SHAPES[row["id"]])
        assert row["dice"] == pytest.approx(dice(probs > 0.5, mask))
        assert row["dice@0.3"] == pytest.approx(dice(probs > 0.3, mask))
        assert row["dice@0.7"] == pytest.approx(dice(probs > 0.7, mask))
        assert row["pred_px"] == (probs > 0.5).sum() and row["true_px"] == mask.sum()
        assert row["both_px"] == ((probs > 0.5) & (mask > 0)).sum()
        assert row["dice"] == dice_from_counts(row["both_px"], row["pred_px"], row["true_px"])
    b2 = scores.set_index("id").loc["b2"]
    assert 0.5 < b2["dice"] < 1 and b2["dice@0.3"] != b2["dice@0.7"]
    assert scores.set_index("id").loc["c3", "dice"] == 1.0  # both empty


def test_mean_dice_is_the_mean_over_slides(data_dir):
    scores = evaluate_slides(data_dir, pointwise, ["a1", "b2"], CFG, (0.4, 0.5), progress=False)
    assert scores["id"].tolist() == ["a1", "b2"]
    means = mean_dice(scores)
    assert means["dice"] == pytest.approx(scores["dice"].mean())
    assert means["dice@0.5"] == pytest.approx(means["dice"])
    t, best = best_threshold(scores)
    assert t in (0.4, 0.5) and best == pytest.approx(means.drop("dice").max())


def test_threshold_of_the_config_gives_the_dice_column(data_dir):
    cfg = InferConfig(window=64, overlap=16, scale=2, tissue=False, threshold=0.6)
    scores = evaluate_slides(data_dir, pointwise, ["b2"], cfg, (0.6,), progress=False)
    assert scores.loc[0, "dice"] == scores.loc[0, "dice@0.6"]


def test_unknown_or_missing_slides_are_named(data_dir):
    with pytest.raises(ValueError, match="zz9"):
        evaluate_slides(data_dir, pointwise, ["a1", "zz9"], CFG, progress=False)
    (data_dir / "train" / "a1.tiff").unlink()
    with pytest.raises(FileNotFoundError, match="slide.*: a1"):
        evaluate_slides(data_dir, pointwise, cfg=CFG, progress=False)


def test_bad_truth_is_named_before_predicting(data_dir):
    frame = pd.read_csv(data_dir / "train.csv", keep_default_na=False)
    frame.loc[frame["id"] == "a1", "encoding"] = "1 999999"
    frame.to_csv(data_dir / "train.csv", index=False)

    def refuse(x):
        raise AssertionError("predicted a slide with a bad truth")

    with pytest.raises(ValueError, match="a1.*past"):
        evaluate_slides(data_dir, refuse, ["a1"], CFG, progress=False)


def test_format_report_shows_the_mean_and_best_threshold(data_dir):
    scores = evaluate_slides(data_dir, pointwise, ["a1", "b2"], CFG, (0.4, 0.6), progress=False)
    report = format_report(scores)
    lines = report.splitlines()
    assert lines[0].split() == [
        "id",
        "dice",
        "dice@0.4",
        "dice@0.6",
        "pred_px",
        "true_px",
        "both_px",
        "seconds",
    ]
    assert lines[1].split()[0] == "a1" and lines[3].split()[0] == "mean"
    assert f"{scores['dice'].mean():.4f}" in lines[3] and f"{scores['dice'].mean():.4f}" in lines[4]
    assert lines[5].startswith("best threshold: 0.")


def test_keep_rle_returns_the_submission_path_mask(data_dir):
    """The kept RLE is exactly what predict_slide_rle gives for the same slide and config."""
    from kit.infer import predict_slide_rle

    scores = evaluate_slides(data_dir, pointwise, ["b2", "a1"], CFG, progress=False, keep_rle=True)
    for slide_id, kept in zip(scores["id"], scores["rle"], strict=True):
        path = data_dir / "train" / f"{slide_id}.tiff"
        assert kept == predict_slide_rle(path, pointwise, CFG)
        assert kept != ""  # the pointwise predictor marks something on these slides
    assert "rle" not in evaluate_slides(data_dir, pointwise, ["b2"], CFG, progress=False).columns


def test_cortex_only_scores_the_prediction_inside_the_cortex(data_dir):
    h, w = SHAPES["b2"]
    cortex = [[[0, 0], [w // 2, 0], [w // 2, h], [0, h]]]  # the left half
    feature = {"type": "Feature", "properties": {"classification": {"name": "Cortex"}},
               "geometry": {"type": "Polygon", "coordinates": cortex}}  # fmt: skip
    (data_dir / "train" / "b2-anatomical-structure.json").write_text(json.dumps([feature]))
    cfg = dataclasses.replace(CFG, cortex_only=True)
    scores = evaluate_slides(data_dir, pointwise, ["b2"], cfg, thresholds=(), progress=False)
    probs = whole_slide_probs(data_dir / "train" / "b2.tiff")
    probs[:, w // 2 :] = 0
    truth = pd.read_csv(data_dir / "train.csv", keep_default_na=False).set_index("id")
    mask = decode(truth.loc["b2", "encoding"], SHAPES["b2"])
    assert scores.loc[0, "pred_px"] == (probs > 0.5).sum() > 0
    assert scores.loc[0, "dice"] == pytest.approx(dice(probs > 0.5, mask))
