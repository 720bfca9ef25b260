import warnings
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm
import torchvision.models.segmentation as tvseg

from kit.model import (
    MODEL_NAMES,
    SegmentationModel,
    build_model,
    find_weights,
    load_pretrained,
    weight_file_names,
)

# torchvision's own file names (DOMAIN.md): derived from its weights enums, pinned here.
FCN50_COCO = "fcn_resnet50_coco-1167a1af.pth"
RESNET50_V1 = "resnet50-0676ba61.pth"
MOBILENET_V1 = "mobilenet_v3_large-8738ca79.pth"
LRASPP_COCO = "lraspp_mobilenet_v3_large-d234d4ea.pth"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def coco_model(name: str) -> torch.nn.Module:
    """A random torchvision model shaped like the COCO release (21 classes, aux head if any)."""
    kwargs = {} if name.startswith("lraspp") else {"aux_loss": True}
    return getattr(tvseg, name)(weights=None, weights_backbone=None, num_classes=21, **kwargs)


def fake_torch_home(tmp_path: Path, monkeypatch, files: dict[str, dict]) -> Path:
    """Write state dicts under torchvision's names in $TORCH_HOME/hub/checkpoints."""
    home = tmp_path / "torch_home"
    ckpt_dir = home / "hub" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    for file_name, state in files.items():
        torch.save(state, ckpt_dir / file_name)
    monkeypatch.setenv("TORCH_HOME", str(home))
    return ckpt_dir


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.equal(a, b)


# --- building ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_each_name_maps_rgb_to_one_logit_channel(name):
    model = build_model(name).eval()
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        out = model(x)
    assert isinstance(model, SegmentationModel) and model.name == name
    assert out.shape == (2, 1, 64, 96) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unet.*fcn_resnet50.*lraspp_mobilenet_v3_large"):
        build_model("unet")


def test_normalisation_is_inside_the_model():
    model = build_model("lraspp_mobilenet_v3_large").eval()
    x = torch.rand(2, 3, 37, 51)  # odd size: the upsampling must restore it exactly
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        ours = model(x)
        theirs = model.net((x - mean) / std)["out"]
    assert ours.shape == (2, 1, 37, 51)
    torch.testing.assert_close(ours, theirs)
    # The statistics travel with the weights.
    assert {"mean", "std"} <= set(model.state_dict())


def test_bad_input_shape_is_refused():
    model = build_model("lraspp_mobilenet_v3_large")
    with pytest.raises(ValueError, match=r"\(N, 3, h, w\).*\(2, 1, 32, 32\)"):
        model(torch.rand(2, 1, 32, 32))


# --- pretrained weights -----------------------------------------------------------------------


def test_weight_file_names_are_torchvisions():
    names = weight_file_names("fcn_resnet50")
    assert names[0] == FCN50_COCO  # the whole model first
    assert RESNET50_V1 in names and "resnet50-11ad3fa6.pth" in names
    names = weight_file_names("lraspp_mobilenet_v3_large")
    assert names[0] == LRASPP_COCO and names[1] == MOBILENET_V1


def test_auto_loads_full_model_file_and_keeps_a_new_head(tmp_path, monkeypatch):
    reference = coco_model("fcn_resnet50").state_dict()
    fake_torch_home(tmp_path, monkeypatch, {FCN50_COCO: reference})
    model = build_model("fcn_resnet50", pretrained="auto", weight_dirs=None)
    state = model.net.state_dict()
    for key, value in state.items():
        if key.startswith("backbone."):
            assert_same(value, reference[key])
    # The head body is reused; its last conv is new and 1-channel.
    assert_same(state["classifier.0.weight"], reference["classifier.0.weight"])
    assert state["classifier.4.weight"].shape == (1, 512, 1, 1)
    report = model.weights_report
    assert report.kind == "model" and report.path.name == FCN50_COCO
    assert set(report.skipped) == {
        "classifier.4.weight",
        "classifier.4.bias",
        *(k for k in reference if k.startswith("aux_classifier.")),
    }
    assert "shape (21, 512, 1, 1) != (1, 512, 1, 1)" in report.skipped["classifier.4.weight"]
    assert "classifier.0.weight" in report.loaded


def test_backbone_file_resnet(tmp_path):
    backbone = tvm.resnet50().state_dict()
    # Older torchvision files carry no BatchNorm counters: they must still load.
    backbone = {k: v for k, v in backbone.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / RESNET50_V1
    torch.save(backbone, path)
    model = build_model("deeplabv3_resnet50", pretrained=path)
    state = model.net.state_dict()
    for key, value in backbone.items():
        if not key.startswith("fc."):
            assert_same(state["backbone." + key], value)
    assert model.weights_report.kind == "backbone"
    assert set(model.weights_report.skipped) == {"fc.weight", "fc.bias"}
    assert all(k.startswith("backbone.") for k in model.weights_report.loaded)


def test_backbone_file_mobilenet_and_auto_search_of_kaggle_input(tmp_path):
    backbone = tvm.mobilenet_v3_large().state_dict()
    nested = tmp_path / "kaggle" / "input" / "torchvision-weights" / "pth"
    nested.mkdir(parents=True)
    torch.save(backbone, nested / MOBILENET_V1)
    model = build_model("lraspp_mobilenet_v3_large", pretrained=True, weight_dirs=[tmp_path])
    state = model.net.state_dict()
    for key, value in backbone.items():
        if key.startswith("features."):
            assert_same(state["backbone." + key.removeprefix("features.")], value)
    assert model.weights_report.path == nested / MOBILENET_V1
    assert all(k.startswith("classifier.") for k in model.weights_report.skipped)


def test_auto_prefers_whole_model_over_backbone(tmp_path):
    for sub, name, state in [
        ("a", MOBILENET_V1, tvm.mobilenet_v3_large().state_dict()),
        ("b", LRASPP_COCO, coco_model("lraspp_mobilenet_v3_large").state_dict()),
    ]:
        (tmp_path / sub).mkdir()
        torch.save(state, tmp_path / sub / name)
    assert find_weights("lraspp_mobilenet_v3_large", [tmp_path]) == tmp_path / "b" / LRASPP_COCO
    assert find_weights("fcn_resnet50", [tmp_path]) is None


def test_auto_with_nothing_found_warns_and_builds(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.warns(UserWarning, match=r"no pretrained weights.*lraspp_mobilenet_v3_large-"):
        model = build_model("lraspp_mobilenet_v3_large", pretrained="auto", weight_dirs=[tmp_path])
    assert model.weights_report is None
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 1, 32, 32)


def test_no_pretrained_builds_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_model("lraspp_mobilenet_v3_large", pretrained=False)
        build_model("lraspp_mobilenet_v3_large", pretrained=None)


def test_missing_weights_file_is_named(tmp_path):
    path = tmp_path / "nope" / FCN50_COCO
    with pytest.raises(FileNotFoundError, match="nope"):
        build_model("fcn_resnet50", pretrained=path)


def test_files_that_are_not_weights_are_named(tmp_path):
    model = build_model("lraspp_mobilenet_v3_large")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    not_state = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_state)
    unrelated = tmp_path / "linear.pth"
    torch.save(torch.nn.Linear(3, 2).state_dict(), unrelated)
    wrong_backbone = tmp_path / "resnet18.pth"
    torch.save(tvm.resnet18().state_dict(), wrong_backbone)
    for path, message in [
        (garbage, "not a weights file: it is not a readable torch file"),
        (not_state, "not a state dict"),
        (unrelated, "no tensor matches"),
        (wrong_backbone, "no tensor matches"),
    ]:
        with pytest.raises(ValueError, match=f"{path.name}.*{message}"):
            load_pretrained(model, path)


def test_weights_of_a_smaller_sibling_do_not_fit(tmp_path):
    # resnet50 and resnet101 share their first layers: a partial match must not pass silently.
    path = tmp_path / RESNET50_V1
    torch.save(tvm.resnet50().state_dict(), path)
    with pytest.raises(ValueError, match=f"{RESNET50_V1}.*does not fit the fcn_resnet101"):
        build_model("fcn_resnet101", pretrained=path)
