import cv2
import numpy as np
import pytest
import torch

from kit.infer import InferConfig, predict_slide
from kit.slides import Slide, downscale
from kit.stain import (
    STATS_SCALE,
    Normaliser,
    lab_stats,
    normaliser,
    slide_stats,
    target_stats,
)
from kit.synthetic import make_dataset
from kit.tiling import tissue_mask

SIZE = (470, 590)  # awkward: neither side a multiple of STATS_SCALE


@pytest.fixture(scope="module")
def slide_image(tmp_path_factory):
    """uint8 (470, 590, 3): a PAS-like synthetic slide (tissue, glomeruli, glass)."""
    data = make_dataset(
        tmp_path_factory.mktemp("data") / "ds", slides=2, test_slides=0, size=SIZE, seed=3
    )
    path = sorted((data / "train").glob("*.tiff"))[0]
    with Slide(path) as slide:
        return slide.thumbnail(1)


def restain(rgb: np.ndarray, gain=(0.8, 1.4, 0.7), shift=(-25.0, 6.0, -8.0)) -> np.ndarray:
    """Another stain of the same tissue: an affine map of each LAB channel (8-bit OpenCV LAB)
    about the tissue's mean, i.e. the shift Reinhard's method undoes. Glass stays glass."""
    tissue = tissue_mask(rgb)
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float64)
    mean = lab[tissue].mean(axis=0)
    moved = (lab - mean) * np.array(gain) + mean + np.array(shift)
    out = cv2.cvtColor(np.clip(np.rint(moved), 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)
    return np.where(tissue[..., None], out, rgb)


def levels(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16))


def test_a_restained_slide_normalises_back_to_the_original(slide_image):
    original = slide_image
    tissue = tissue_mask(original)
    shifted = restain(original)
    assert levels(shifted, original)[tissue].mean() > 15  # a large stain shift
    # The statistics of each, on the same (tissue) pixels; the map takes one onto the other.
    mapped = Normaliser(lab_stats(shifted, tissue), lab_stats(original, tissue))(shifted)
    diff = levels(mapped, original)[tissue]
    assert mapped.dtype == np.uint8 and mapped.shape == original.shape
    assert diff.mean() < 1.5 and np.quantile(diff, 0.99) <= 6


def test_stats_are_those_of_the_tissue_whatever_the_background(tmp_path, write_tiff):
    rng = np.random.default_rng(0)
    tissue = np.stack(
        [
            rng.integers(120, 200, (64, 96)),
            rng.integers(40, 110, (64, 96)),
            rng.integers(120, 220, (64, 96)),
        ],
        axis=-1,
    ).astype(np.uint8)  # purple-ish, saturated
    small = np.full((96, 128, 3), 235, np.uint8)  # glass
    small[16:80, 16:112] = tissue
    large = np.full((400, 448, 3), 240, np.uint8)  # more glass, and black scanner padding
    large[:, 384:] = 0
    large[128:192, 64:160] = tissue  # the tissue on whole blocks of the thumbnail again
    stats = []
    for name, image in (("small", small), ("large", large)):
        with Slide(write_tiff(tmp_path / f"{name}.tiff", image)) as slide:
            stats.append(slide_stats(slide))
    np.testing.assert_allclose(stats[0], stats[1], atol=1e-9)
    # Counted over every pixel of the thumbnails, the background would have moved them.
    everything = [lab_stats(downscale(im, STATS_SCALE)) for im in (small, large)]
    assert np.abs(everything[0] - everything[1]).max() > 10
    blank = np.full((64, 64, 3), 240, np.uint8)
    with Slide(write_tiff(tmp_path / "blank.tiff", blank)) as slide:
        assert slide_stats(slide) is None  # no tissue: nothing to normalise by


def test_the_map_is_pointwise_on_any_batch_layout(slide_image):
    tiles = np.stack(
        [slide_image[:64, :80], slide_image[100:164, 200:280], slide_image[-64:, -80:]]
    )
    norm = normaliser(lab_stats(slide_image), [[120, 150, 110], [30, 9, 7]])
    alone = np.stack([norm(t) for t in tiles])
    np.testing.assert_array_equal(norm(tiles), alone)  # (N, h, w, 3)
    planar = norm(np.ascontiguousarray(tiles.transpose(0, 3, 1, 2)), channel_axis=1)
    np.testing.assert_array_equal(planar.transpose(0, 2, 3, 1), alone)  # (N, 3, h, w)
    # A crop of the normalised image is the normalised crop (inference stays exact).
    np.testing.assert_array_equal(norm(slide_image)[100:164, 200:280], alone[1])
    assert levels(alone, tiles).mean() > 5  # it did map


def test_none_and_slides_without_tissue_are_left_as_they_are(slide_image):
    stats = lab_stats(slide_image)
    assert normaliser(stats, stats, "none")(slide_image) is slide_image
    assert normaliser(None, stats)(slide_image) is slide_image
    with pytest.raises(ValueError, match="needs target statistics"):
        normaliser(stats, None)
    with pytest.raises(ValueError, match="must be one of"):
        normaliser(stats, stats, "macenko")


def test_bad_inputs_are_named(slide_image):
    norm = Normaliser([100, 128, 128, 20, 5, 5], [110, 130, 126, 25, 6, 4])
    with pytest.raises(ValueError, match="uint8"):
        norm(slide_image.astype(np.float32))
    with pytest.raises(ValueError, match="3 channels"):
        norm(slide_image[..., :2])
    with pytest.raises(ValueError, match="target must be finite"):
        Normaliser([100, 128, 128, 20, 5, 5], [110, 130, 126, -1, 6, 4])
    with pytest.raises(ValueError, match="stats must be 6 numbers"):
        Normaliser([1, 2, 3], [110, 130, 126, 25, 6, 4])
    with pytest.raises(ValueError, match="mask shape"):
        lab_stats(slide_image, np.ones((3, 3), bool))


def test_the_target_is_the_mean_of_the_slides_with_tissue():
    a = np.array([[100.0, 130, 120], [20, 6, 4]])
    b = np.array([[140.0, 150, 100], [30, 8, 6]])
    np.testing.assert_allclose(target_stats([a, None, b]), (a + b) / 2)
    with pytest.raises(ValueError, match="no slide with tissue"):
        target_stats([None])


def colour_predictor(x: torch.Tensor) -> torch.Tensor:
    """Pointwise logits from colour alone: a pixel is 'found' where its green is dark."""
    return 40.0 * (0.45 - x[:, 1:2])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


def test_inference_maps_a_restained_slide_onto_the_training_stain(
    slide_image, tmp_path, write_tiff
):
    original = write_tiff(tmp_path / "original.tiff", slide_image)
    shifted = write_tiff(tmp_path / "shifted.tiff", restain(slide_image))
    with Slide(original) as slide:
        target = slide_stats(slide)  # as if the model had been trained on this slide alone
    plain = InferConfig(window=64, overlap=16, scale=2)
    norm = InferConfig(window=64, overlap=16, scale=2, stain_norm="reinhard", stain_target=target)
    reference = predict_slide(original, colour_predictor, plain)
    assert 0.1 < reference.mean() < 0.4  # the predictor finds part of the tissue
    # Measured: 0.74 as read, 0.96 normalised (the statistics come from a 30 x 37 thumbnail,
    # whose glass-and-tissue border blocks mix the stains), 0.997 for the original itself.
    assert dice(predict_slide(shifted, colour_predictor, plain), reference) < 0.8
    assert dice(predict_slide(shifted, colour_predictor, norm), reference) > 0.94
    assert dice(predict_slide(original, colour_predictor, norm), reference) > 0.98


def test_configs_check_their_stain_options():
    from kit.data import DataConfig
    from kit.train import TrainConfig

    with pytest.raises(ValueError, match="stain_norm must be one of"):
        InferConfig(stain_norm="macenko")
    with pytest.raises(ValueError, match="stain_norm must be one of"):
        DataConfig(stain_norm="Reinhard")
    with pytest.raises(ValueError, match="stain_target must be 6 numbers"):
        InferConfig(stain_target=[1.0, 2.0])
    with pytest.raises(ValueError, match="stain_augment must be in"):
        TrainConfig(stain_augment=1.5)
    target = InferConfig(stain_target=np.arange(6.0).reshape(2, 3)).stain_target
    assert target == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0] and type(target[0]) is float  # JSON-ready
    cfg = TrainConfig(data={"stain_norm": "reinhard"})
    assert cfg.infer.stain_norm == "reinhard"  # set once, in data
