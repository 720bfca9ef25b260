"""kit.checkpoint: the format, save/read, load_model, fingerprint."""

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from kit.checkpoint import (
    CHECKPOINT_FORMAT,
    checkpoint_dict,
    load_model,
    save_checkpoint,
)
from kit.model import build_model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.equal(a, b)


@dataclasses.dataclass
class FakeConfig:
    model: str = "lraspp_mobilenet_v3_large"
    out_dir: Path = Path("runs/x")
    window: int = 1024
    scales: tuple = (2, 4)
    lr: float = 1e-3


def trained_checkpoint(model, epoch=3):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    model(torch.rand(2, 3, 32, 32)).mean().backward()
    opt.step()
    return checkpoint_dict(
        model, FakeConfig(), epoch, {"dice": np.float32(0.75)}, optimizer_state=opt.state_dict()
    )


def test_checkpoint_round_trip(tmp_path):
    model = build_model("lraspp_mobilenet_v3_large")
    ckpt = trained_checkpoint(model)
    path = save_checkpoint(tmp_path / "runs" / "best.pt", ckpt)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["format"] == CHECKPOINT_FORMAT and raw["model_name"] == model.name
    assert raw["config"] == {
        "model": "lraspp_mobilenet_v3_large",
        "out_dir": "runs/x",
        "window": 1024,
        "scales": (2, 4),
        "lr": 1e-3,
    }
    assert raw["epoch"] == 3 and raw["metrics"] == {"dice": 0.75}
    assert "optimizer_state" in raw

    loaded, ckpt2 = load_model(path)
    assert not loaded.training and loaded.name == model.name
    assert ckpt2["epoch"] == 3
    x = torch.rand(2, 3, 40, 56)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))
    assert [p.name for p in path.parent.iterdir()] == ["best.pt"]  # no temp file left


def test_checkpoint_state_is_a_snapshot():
    model = build_model("lraspp_mobilenet_v3_large")
    ckpt = checkpoint_dict(model, {}, 0, {})
    key = "net.classifier.cbr.0.weight"
    saved = ckpt["model_state"][key].clone()
    with torch.no_grad():
        model.net.classifier.cbr[0].weight.add_(1.0)
    assert_same(ckpt["model_state"][key], saved)


def test_checkpoint_of_an_aux_model_loads_without_the_aux_head(tmp_path):
    model = build_model("deeplabv3_mobilenet_v3_large")
    ckpt = checkpoint_dict(model, {"window": 256}, 1, {"dice": 0.5})
    ckpt["model_state"]["net.aux_classifier.0.weight"] = torch.zeros(10, 40, 3, 3)  # older kits
    loaded, _ = load_model(save_checkpoint(tmp_path / "aux.pt", ckpt), device="cpu")
    assert not any(k.startswith("net.aux_classifier.") for k in loaded.state_dict())
    x = torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))


def test_failed_save_keeps_the_previous_file(tmp_path):
    model = build_model("lraspp_mobilenet_v3_large")
    path = save_checkpoint(tmp_path / "last.pt", checkpoint_dict(model, {}, 1, {}))
    before = path.read_bytes()
    bad = checkpoint_dict(model, {}, 2, {}, scheduler_state=lambda: None)  # not picklable
    with pytest.raises(Exception):  # noqa: B017 (whatever pickle raises)
        save_checkpoint(path, bad)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.pt"]


def test_checkpoint_dict_refuses_unstorable_config():
    model = build_model("lraspp_mobilenet_v3_large")
    with pytest.raises(ValueError, match=r"config\.fn"):
        checkpoint_dict(model, {"fn": object()}, 0, {})


def test_load_model_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_model(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="garbage.pt: not a checkpoint: it is not a readable"):
        load_model(garbage)
    # A pickled object: torch advises weights_only=False (runs the file's code); the kit must
    # say what the file is not and what a checkpoint is instead.
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": build_model("lraspp_mobilenet_v3_large")}, pickled)
    with pytest.raises(ValueError) as caught:
        load_model(pickled)
    message = str(caught.value)
    assert message.startswith(f"{pickled}: not a checkpoint: it holds Python objects")
    assert "python -m kit train" in message and "hubmap-kit/1" in message
    # Torch's advice reads "`weights_only` set to `False`" and names add_safe_globals.
    assert "False" not in message and "safe_globals" not in message
    assert caught.value.__cause__ is None
    plain = tmp_path / "plain.pt"
    torch.save(build_model("lraspp_mobilenet_v3_large").state_dict(), plain)
    with pytest.raises(ValueError, match="plain.pt.*not a kit checkpoint"):
        load_model(plain)

    ckpt = checkpoint_dict(build_model("lraspp_mobilenet_v3_large"), {}, 0, {})
    renamed = tmp_path / "renamed.pt"
    torch.save({**ckpt, "model_name": "unet"}, renamed)
    with pytest.raises(ValueError, match="renamed.pt.*unknown model name 'unet'"):
        load_model(renamed)
    mismatched = tmp_path / "mismatched.pt"
    torch.save({**ckpt, "model_name": "deeplabv3_mobilenet_v3_large"}, mismatched)
    with pytest.raises(ValueError, match="mismatched.pt.*does not fit"):
        load_model(mismatched)
    with pytest.raises(ValueError, match="kit checkpoint, not torchvision weights"):
        build_model("lraspp_mobilenet_v3_large", pretrained=renamed)


def test_fingerprint_follows_the_bytes(tmp_path):
    from kit.checkpoint import fingerprint

    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes(b"weights-1")
    b.write_bytes(b"weights-2")
    assert fingerprint(a) == fingerprint(a) != fingerprint(b)
    assert len(fingerprint(a)) == 16
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        fingerprint(tmp_path / "missing.pt")
