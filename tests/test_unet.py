"""kit.unet through kit.model: U-Net family names, the wrapper's contract, local encoder weights,
checkpoints. resnet18 encoders keep it quick (smp builds resnet34 the same way)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm

from kit import unet
from kit.checkpoint import checkpoint_dict, load_model, read_checkpoint, save_checkpoint
from kit.model import SegmentationModel, build_model, find_weights, weight_file_names

# torchvision's ImageNet file names (from its weights enums), pinned here.
RESNET18_V1 = "resnet18-f37072fd.pth"
RESNET34_V1 = "resnet34-b627a593.pth"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def encoder_state(model: SegmentationModel) -> dict[str, torch.Tensor]:
    return unet.encoder_module(model.net).state_dict()


# --- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["unet_resnet18", "unetplusplus_resnet18", "fpn_resnet18"])
def test_each_architecture_maps_rgb_to_one_logit_channel(name):
    model = build_model(name).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 96))
    assert isinstance(model, SegmentationModel) and model.name == name
    assert out.shape == (2, 1, 64, 96) and torch.isfinite(out).all()
    assert {"mean", "std"} <= set(model.state_dict())


def test_timm_encoder_builds():
    model = build_model("unet_tu-resnet18").eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, 1, 64, 64)


@pytest.mark.parametrize(
    "name, message",
    [
        ("unet_resnet35", "'unet_resnet35': smp has no encoder 'resnet35'; its encoders: resnet18"),
        ("fpn_tu-nosuchnet", "'fpn_tu-nosuchnet': timm has no model 'nosuchnet'"),
        ("segformer_resnet34", r"unknown model name.*fcn_resnet50.*\{unet,unetplusplus,fpn\}_"),
        ("unet", "unknown model name 'unet'.*unet_resnet34"),
    ],
)
def test_bad_names_are_clear_errors(name, message):
    with pytest.raises(ValueError, match=message):
        build_model(name)


def test_a_bad_model_name_stops_the_config():
    from kit.train import preset

    assert preset("quick", model="unet_resnet34").model == "unet_resnet34"
    with pytest.raises(ValueError, match="smp has no encoder 'resnet35'"):
        preset("quick", model="unet_resnet35")


def test_train_with_a_bad_model_name_is_one_line_listing_the_families(tmp_path, capsys):
    from kit.cli import main

    argv = ["train", "--data", str(tmp_path), "--out", str(tmp_path / "run")]
    assert main([*argv, "--model", "segformer_b0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model name 'segformer_b0'") and err.count("\n") == 1
    assert "lraspp_mobilenet_v3_large" in err and "{unet,unetplusplus,fpn}_ENCODER" in err
    assert not (tmp_path / "run").exists()


# --- input sides ------------------------------------------------------------------------------


def test_sides_not_divisible_by_32_are_padded_and_cropped():
    model = build_model("unetplusplus_resnet18").eval()
    assert model.input_multiple == 32
    x = torch.rand(2, 3, 37, 51)
    with torch.no_grad():
        out = model(x)
        padded = F.pad(model.normalize(x), (0, 64 - 51, 0, 64 - 37), mode="replicate")
        expected = model.net(padded)[..., :37, :51]
    assert out.shape == (2, 1, 37, 51)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # smp itself refuses such a size: the padding is what makes it work.
    with pytest.raises(RuntimeError, match="divisible by 32"):
        model.net(model.normalize(x))


@pytest.mark.parametrize("name", ["unet_resnet18", "fpn_resnet18"])
def test_any_side_gives_logits_of_that_side(name):
    model = build_model(name).eval()  # U-Net resizes its skips itself, FPN is padded
    with torch.no_grad():
        assert model(torch.rand(1, 3, 37, 51)).shape == (1, 1, 37, 51)


# --- local weights ----------------------------------------------------------------------------


def test_weight_file_names():
    assert weight_file_names("unet_resnet34") == (RESNET34_V1,)
    assert weight_file_names("fpn_resnext50_32x4d") == (
        "resnext50_32x4d-7cdf4587.pth",
        "resnext50_32x4d-1a0047aa.pth",
    )
    assert weight_file_names("unet_tu-regnety_016") == (
        "regnety_016.safetensors",
        "regnety_016.pth",
    )
    assert weight_file_names("unet_resnext101_32x16d") == ()  # smp's own, not torchvision's
    assert weight_file_names("unet_vgg11") == ()


def test_torchvision_file_loads_into_the_encoder(tmp_path):
    source = tvm.resnet18()
    torch.nn.init.normal_(source.bn1.running_mean)  # not a default value: a load must copy it
    state = source.state_dict()
    (tmp_path / "nested").mkdir()
    torch.save(state, tmp_path / "nested" / RESNET18_V1)
    assert find_weights("unet_resnet18", [tmp_path]) == tmp_path / "nested" / RESNET18_V1

    model = build_model("unetplusplus_resnet18", pretrained="auto", weight_dirs=[tmp_path])
    loaded = encoder_state(model)
    assert set(loaded) == {k for k in state if not k.startswith("fc.")}
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key
    report = model.weights_report
    assert report.kind == "encoder" and report.path.name == RESNET18_V1
    assert len(report.loaded) == len(loaded)
    assert set(report.skipped) == {"fc.weight", "fc.bias"}
    assert f"loaded {len(loaded)} tensors" in str(report)


def test_timm_safetensors_loads_into_the_encoder(tmp_path):
    import timm
    from safetensors.torch import save_file

    state = timm.create_model("resnet18").state_dict()
    save_file(state, tmp_path / "resnet18.safetensors")
    model = build_model("fpn_tu-resnet18", pretrained="auto", weight_dirs=[tmp_path])
    loaded = encoder_state(model)
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key
    assert set(model.weights_report.skipped) == {"fc.weight", "fc.bias"}


def test_files_of_other_networks_do_not_fit(tmp_path):
    bigger = tmp_path / RESNET34_V1
    torch.save(tvm.resnet34().state_dict(), bigger)
    # resnet34 holds every resnet18 tensor, and more blocks: a partial fit is an error.
    with pytest.raises(ValueError, match=f"{RESNET34_V1}: does not fit the encoder.*layer1.2"):
        build_model("unet_resnet18", pretrained=bigger)
    smaller = tmp_path / RESNET18_V1
    torch.save(tvm.resnet18().state_dict(), smaller)
    with pytest.raises(ValueError, match=f"{RESNET18_V1}: does not fit the encoder of unet_resn"):
        build_model("unet_resnet34", pretrained=smaller)
    unrelated = tmp_path / "mobilenet.pth"
    torch.save(tvm.mobilenet_v3_small().state_dict(), unrelated)
    with pytest.raises(ValueError, match="mobilenet.pth: no tensor matches the encoder"):
        build_model("unet_resnet18", pretrained=unrelated)
    garbage = tmp_path / "broken.safetensors"
    garbage.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="broken.safetensors: not a weights file"):
        build_model("unet_tu-resnet18", pretrained=garbage)


def test_auto_without_a_file_warns_and_builds(tmp_path):
    with pytest.warns(UserWarning, match=f"no pretrained weights for unet_resnet34.*{RESNET34_V1}"):
        model = build_model("unet_resnet34", pretrained="auto", weight_dirs=[tmp_path])
    assert model.weights_report is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_model("unet_resnet18", pretrained=None)


# --- checkpoints ------------------------------------------------------------------------------


def test_checkpoint_round_trip_is_bit_identical(tmp_path):
    model = build_model("unet_resnet18")
    model.train()
    with torch.no_grad():
        model(torch.rand(4, 3, 64, 64))  # moves the BatchNorm statistics off their defaults
    model.eval()
    path = tmp_path / "best.pt"
    save_checkpoint(path, checkpoint_dict(model, {"model": "unet_resnet18"}, 1, {"dice": 0.5}))
    assert read_checkpoint(path)["model_name"] == "unet_resnet18"
    loaded, _ = load_model(path, device="cpu")
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
