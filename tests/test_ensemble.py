"""Ensembles: equivalences pinned bit for bit, the manifest, loading and finding models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from kit.checkpoint import checkpoint_dict, save_checkpoint
from kit.ensemble import (
    MANIFEST,
    describe,
    find_model,
    load_predictor,
    read_manifest,
    write_manifest,
)
from kit.infer import (
    Ensemble,
    InferConfig,
    Member,
    iter_probability_strips,
    predict_slide,
    predict_slide_rle,
    sigmoid,
)
from kit.merge import upsample
from kit.model import build_model
from kit.slides import downscale


def pointwise(x: torch.Tensor) -> torch.Tensor:
    """Logits from each pixel's colour alone: (N, 3, h, w) -> (N, 1, h, w)."""
    return 8 * (x[:, 0:1] - x[:, 2:3]) + 0.5 * x[:, 1:2] - 0.2


def other_pointwise(x: torch.Tensor) -> torch.Tensor:
    return 6 * (x[:, 1:2] - 0.5) - 2 * x[:, 0:1]


def smooth_image(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (shape[0] // 16 + 2, shape[1] // 16 + 2, 3)).astype(np.float32)
    yy = np.linspace(0, low.shape[0] - 1.001, shape[0])
    xx = np.linspace(0, low.shape[1] - 1.001, shape[1])
    image = low[yy.astype(int)][:, xx.astype(int)]
    return np.clip(image + rng.normal(0, 20, image.shape), 0, 255).astype(np.uint8)


def probability_image(path, predictor, cfg) -> np.ndarray:
    strips = list(iter_probability_strips(path, predictor, cfg))
    return np.concatenate([s for _, s in strips], axis=1)


@pytest.fixture
def slide(tmp_path, write_tiff):
    image = smooth_image((203, 277), seed=1)
    return write_tiff(tmp_path / "s.tiff", image), image


@pytest.mark.parametrize("tta", [False, True])
def test_an_ensemble_of_one_member_is_that_member_bit_for_bit(slide, tta):
    path, _ = slide
    cfg = InferConfig(window=64, overlap=16, scale=2, tissue=False, tta=tta)
    alone = probability_image(path, pointwise, cfg)
    ensemble = Ensemble([Member(pointwise, scale=2)])
    np.testing.assert_array_equal(probability_image(path, ensemble, cfg), alone)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 3.0)])
def test_the_same_member_twice_is_that_member(slide, weights):
    path, _ = slide
    cfg = InferConfig(window=64, overlap=16, scale=2, tissue=False)
    alone = probability_image(path, pointwise, cfg)
    twice = Ensemble([Member(pointwise, 2, weights[0]), Member(pointwise, 2, weights[1])])
    np.testing.assert_array_equal(probability_image(path, twice, cfg), alone)
    assert predict_slide_rle(path, twice, cfg) == predict_slide_rle(path, pointwise, cfg)


def test_members_at_scales_1_and_2_average_the_whole_image_predictions(slide):
    # Each member sees the window at its own scale; the mean is taken at full resolution. The
    # reference computes each member on the whole image (padded to blocks of 2) instead.
    path, image = slide
    height, width = image.shape[:2]
    cfg = InferConfig(window=64, overlap=16, scale=4, tissue=False)  # scale: the ensemble's
    ensemble = Ensemble([Member(pointwise, 1), Member(other_pointwise, 2)])
    ours = probability_image(path, ensemble, cfg)

    def whole(f, scale):
        x = torch.from_numpy(downscale(image, scale)).permute(2, 0, 1)[None].float().div(255)
        p = sigmoid(f(x).numpy()).astype(np.float32)
        return upsample(p, scale)[0, 0, :height, :width]

    expected = ((whole(pointwise, 1).astype(np.float64) + whole(other_pointwise, 2)) / 2).astype(
        np.float32
    )
    np.testing.assert_array_equal(ours, expected)
    # and differs from either member alone
    assert np.abs(ours - whole(pointwise, 1)).max() > 0.05


def test_weights_weigh_the_members(slide):
    path, _ = slide
    cfg = InferConfig(window=64, overlap=16, scale=1, tissue=False)
    a = probability_image(path, pointwise, cfg).astype(np.float64)
    b = probability_image(path, other_pointwise, cfg).astype(np.float64)
    ensemble = Ensemble([Member(pointwise, 1, 1.0), Member(other_pointwise, 1, 3.0)])
    np.testing.assert_array_equal(
        probability_image(path, ensemble, cfg), (0.25 * a + 0.75 * b).astype(np.float32)
    )


def test_bad_ensembles_are_named(slide):
    path, _ = slide
    with pytest.raises(ValueError, match="divide the largest"):
        Ensemble([Member(pointwise, 2), Member(pointwise, 3)])
    with pytest.raises(ValueError, match="weight"):
        Ensemble([Member(pointwise, 2, 0.0)])
    with pytest.raises(ValueError, match="scale"):
        Ensemble([Member(pointwise, 0)])
    with pytest.raises(ValueError, match="one or more"):
        Ensemble([])
    with pytest.raises(ValueError, match="window 96 is not a multiple of member scale 64"):
        predict_slide(
            path, Ensemble([Member(pointwise, 2), Member(pointwise, 64)]), window=96, overlap=16
        )


class Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.modes = []
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        self.modes.append(self.training)
        return pointwise(x) + self.bias


def test_every_member_runs_in_eval_mode_and_is_restored(slide):
    path, _ = slide
    a, b = Recorder(), Recorder().eval()
    predict_slide(path, Ensemble([Member(a, 2), Member(b, 4)]), window=64, overlap=16)
    assert a.modes and not any(a.modes) and b.modes and not any(b.modes)
    assert a.training and not b.training


# ---------------------------------------------------------------------------------------------
# On disk


def save_model(path, seed, scale=2, window=64, threshold=0.5, **infer):
    torch.manual_seed(seed)
    model = build_model("lraspp_mobilenet_v3_large")
    config = {
        "infer": {"window": window, "scale": scale, "overlap": 16, "threshold": threshold, **infer}
    }
    return save_checkpoint(path, checkpoint_dict(model, config, 1, {"dice": 0.5 + seed / 10}))


def test_manifest_round_trip_and_errors_name_the_file(tmp_path):
    save_model(tmp_path / "fold0.pt", 0)
    save_model(tmp_path / "fold1.pt", 1)
    write_manifest(tmp_path, [("fold0.pt", 1.0), ("fold1.pt", 2.0)], threshold=0.4, tta=None)
    document = read_manifest(tmp_path)
    assert [m["path"] for m in document["members"]] == [
        tmp_path / "fold0.pt",
        tmp_path / "fold1.pt",
    ]
    assert document["threshold"] == 0.4 and "tta" not in document
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        write_manifest(tmp_path / "x", [("missing.pt", 1.0)])
    bad = tmp_path / "bad"
    bad.mkdir()
    for text, match in [
        ("{", "not a JSON"),
        ('{"members": []}', "empty"),
        ('{"members": [{"path": "a.pt", "weight": -1}]}', "weight"),
        ('{"members": [{"path": "a.pt"}], "treshold": 0.5}', "unknown key.*treshold"),
        ('{"members": [{"path": "a.pt"}], "window": "big"}', "'window' must be a int"),
    ]:
        (bad / MANIFEST).write_text(text)
        with pytest.raises(ValueError, match=match) as caught:
            read_manifest(bad)
        assert str(bad / MANIFEST) in str(caught.value)
    (bad / MANIFEST).write_text('{"members": [{"path": "gone.pt"}]}')
    with pytest.raises(FileNotFoundError, match="gone.pt"):
        read_manifest(bad)


def test_one_checkpoint_loads_as_the_model_itself(tmp_path):
    path = save_model(tmp_path / "run" / "best.pt", 0, scale=2, threshold=0.3)
    for source in (path, tmp_path / "run"):
        loaded = load_predictor([source], device="cpu", tta=True, threshold=None)
        assert isinstance(loaded.predictor, nn.Module) and loaded.paths == [path]
        assert (loaded.cfg.scale, loaded.cfg.threshold, loaded.cfg.tta) == (2, 0.3, True)
    assert "lraspp_mobilenet_v3_large, epoch 1 (dice 0.5000)" in describe(loaded)


def test_a_cross_validation_folder_loads_every_fold_and_its_manifest_settings(tmp_path, slide):
    cv = tmp_path / "cv"
    for k, scale in enumerate((2, 4, 2)):
        save_model(cv / f"fold{k}" / "best.pt", k, scale=scale)
    loaded = load_predictor([cv], device="cpu")
    assert isinstance(loaded.predictor, Ensemble)
    assert [m.scale for m in loaded.predictor.members] == [2, 4, 2] and loaded.cfg.scale == 2
    assert loaded.paths == [cv / f"fold{k}" / "best.pt" for k in range(3)]
    # A manifest in the folder takes precedence: its members, weights and threshold.
    write_manifest(cv, [("fold0/best.pt", 1.0), ("fold2/best.pt", 3.0)], threshold=0.35)
    again = load_predictor([cv], device="cpu", overlap=24)
    assert [m.weight for m in again.predictor.members] == [1.0, 3.0]
    assert (again.cfg.threshold, again.cfg.overlap) == (0.35, 24)
    assert again.fingerprint != loaded.fingerprint
    assert again.fingerprint == load_predictor([cv], device="cpu").fingerprint
    # and it predicts: the members' mean, at the threshold of the manifest
    path, _ = slide
    mask = predict_slide(path, again.predictor, again.cfg)
    assert mask.shape == (203, 277)
    with pytest.raises(FileNotFoundError, match="no kit model at"):
        load_predictor([tmp_path / "empty-nothing"])


def test_members_share_one_stain_normalisation_the_mean_of_their_targets(tmp_path):
    a = [100.0, 130, 120, 20, 6, 4]
    b = [140.0, 150, 100, 30, 8, 6]
    save_model(tmp_path / "a.pt", 0, stain_norm="reinhard", stain_target=a)
    save_model(tmp_path / "b.pt", 1, stain_norm="reinhard", stain_target=b)
    save_model(tmp_path / "plain.pt", 2)
    alone = load_predictor([tmp_path / "b.pt"], device="cpu").cfg
    assert (alone.stain_norm, alone.stain_target) == ("reinhard", b)
    both = load_predictor([tmp_path / "a.pt", tmp_path / "b.pt"], device="cpu").cfg
    assert both.stain_norm == "reinhard"
    assert both.stain_target == pytest.approx([(x + y) / 2 for x, y in zip(a, b, strict=True)])
    with pytest.raises(ValueError, match=r"normalise stains differently.*a.pt: reinhard.*none"):
        load_predictor([tmp_path / "a.pt", tmp_path / "plain.pt"], device="cpu")


def test_find_model_takes_the_one_model_and_never_guesses(tmp_path):
    assert find_model([tmp_path / "absent", tmp_path]) is None
    run = tmp_path / "input" / "my-model"
    run.mkdir(parents=True)
    (run / "last.pt").write_bytes(b"x")
    assert find_model([tmp_path / "input"]) == run / "last.pt"
    (run / "best.pt").write_bytes(b"x")  # a run folder: its best.pt is the model
    assert find_model([tmp_path / "input"]) == run / "best.pt"
    other = tmp_path / "input" / "old-run" / "nested"
    other.mkdir(parents=True)
    (other / "best.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="2 models found") as caught:
        find_model([tmp_path / "input"])
    assert str(run / "best.pt") in str(caught.value) and str(other / "best.pt") in str(caught.value)
    # An exported ensemble is one model, however many checkpoints it holds.
    (other / "best.pt").unlink()
    (run / "last.pt").unlink()
    (run / "best.pt").unlink()
    ensemble = tmp_path / "input" / "cv-model"
    for k in range(3):
        (ensemble / f"fold{k}").mkdir(parents=True)
        (ensemble / f"fold{k}" / "best.pt").write_bytes(b"x")
    (ensemble / MANIFEST).write_text(json.dumps({"members": [{"path": "fold0/best.pt"}]}))
    assert find_model([tmp_path / "input"]) == ensemble


def test_the_checkpoints_batch_size_travels_and_channels_last_converts_the_weights(tmp_path):
    torch.manual_seed(0)
    model = build_model("lraspp_mobilenet_v3_large")
    config = {"infer": {"window": 64, "scale": 2, "overlap": 16, "batch_size": 5}}
    path = save_checkpoint(tmp_path / "best.pt", checkpoint_dict(model, config, 1, {"dice": 0.5}))
    plain = load_predictor([path], device="cpu")
    assert plain.cfg.batch_size == 5 and plain.cfg.channels_last is None
    assert load_predictor([path], device="cpu", batch_size=2).cfg.batch_size == 2

    def layouts(model):  # of the weights whose two layouts differ (not 1x1, not depthwise)
        weights = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
        weights = [w for w in weights if w.shape[1] > 1 and w.shape[-1] > 1]
        assert weights  # the stem: 3x3 over 3 channels
        return {w.is_contiguous(memory_format=torch.channels_last) for w in weights}

    assert layouts(plain.predictor) == {False}
    assert layouts(load_predictor([path], device="cpu", channels_last=True).predictor) == {True}
