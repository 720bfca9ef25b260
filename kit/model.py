"""Segmentation models with a 1-channel head: torchvision's, and the U-Net family (kit.unet).

    model = build_model("fcn_resnet50", pretrained="auto")  # RGB in [0, 1] -> logits (N, 1, h, w)
    model = build_model("unet_resnet34", pretrained="auto")  # smp's U-Net, torchvision's resnet34
    model, ckpt = load_model("runs/quick/best.pt", device="cuda")

Pretrained weights are never downloaded (Kaggle notebooks run offline): ``pretrained`` names a
local ``.pth`` (or, for timm encoders, ``.safetensors``) file, or ``"auto"`` looks for the
expected file names (torchvision's own, `weight_file_names`) under ``$TORCH_HOME/hub/checkpoints``
and ``/kaggle/input`` (attach them as a dataset).
"""

from __future__ import annotations

import logging
import os
import pickle
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision.models as tvm
import torchvision.models.segmentation as tvseg
from torch import nn

from kit import unet

log = logging.getLogger(__name__)

# Model name -> the torchvision classification network its backbone comes from.
BACKBONES = {
    "fcn_resnet50": "resnet50",
    "fcn_resnet101": "resnet101",
    "deeplabv3_resnet50": "resnet50",
    "deeplabv3_resnet101": "resnet101",
    "deeplabv3_mobilenet_v3_large": "mobilenet_v3_large",
    "lraspp_mobilenet_v3_large": "mobilenet_v3_large",
}
# The torchvision models; the U-Net family (kit.unet) adds {unet,unetplusplus,fpn}_{encoder}.
MODEL_NAMES = tuple(BACKBONES)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SegmentationModel(nn.Module):
    """A torchvision segmentation network behind ImageNet normalisation, giving 1-channel logits.

    The mean/std are registered buffers, so they are saved in (and restored from) checkpoints.

    Shape:
        - Input: float (N, 3, h, w) RGB in [0, 1].
        - Output: float logits (N, 1, h, w).
    """

    def __init__(self, net: nn.Module, name: str, input_multiple: int = 1) -> None:
        super().__init__()
        self.net = net
        self.name = name
        # Sides that are not multiples of this are padded (edge pixels repeated), the logits
        # cropped back: smp's U-Net++ and FPN need multiples of 32 (kit.unet.input_multiple).
        self.input_multiple = input_multiple
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.weights_report: WeightsReport | None = None

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, h, w) RGB in [0, 1] -> ImageNet-normalised input of the torchvision network."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected input of shape (N, 3, h, w), got {tuple(x.shape)}")
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, 1, h, w) for RGB input (N, 3, h, w) in [0, 1]."""
        x = self.normalize(x)
        h, w = x.shape[-2:]
        pad_h, pad_w = -h % self.input_multiple, -w % self.input_multiple
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        out = self.net(x)
        out = out["out"] if isinstance(out, Mapping) else out  # torchvision's dict, smp's tensor
        return out[..., :h, :w]


@dataclass(frozen=True)
class WeightsReport:
    """What `load_pretrained` took from a weights file.

    Attributes:
        path: the file read.
        kind: "model" (a whole torchvision segmentation model), "backbone" (a classifier
            network such as resnet50, whose body became the backbone) or "encoder" (a
            classifier network loaded into a U-Net family encoder, ``model.net.encoder``).
        loaded: keys of the network (``model.net``; for "encoder", of the encoder's weights
            module `kit.unet.encoder_module`) that received weights.
        skipped: keys of the file left out, with the reason (e.g. the 21-class COCO head).
    """

    path: Path
    kind: str
    loaded: tuple[str, ...]
    skipped: dict[str, str]

    def __str__(self) -> str:
        skipped = ", ".join(f"{k} ({why})" for k, why in self.skipped.items()) or "none"
        return (
            f"loaded {len(self.loaded)} tensors from {self.path} ({self.kind} weights); "
            f"skipped: {skipped}"
        )


def check_model_name(name: str) -> None:
    """ValueError naming `name` and the valid ones unless a model can be built under it."""
    if name in BACKBONES:
        return
    if unet.split_name(name) is None:
        raise ValueError(
            f"unknown model name {name!r}; valid names: {', '.join(MODEL_NAMES)}, "
            f"or the U-Net family {unet.family_help()}"
        )
    unet.check_name(name)


def build_model(
    name: str = "fcn_resnet50",
    pretrained: bool | str | os.PathLike | None = None,
    *,
    weight_dirs: Iterable[str | os.PathLike] | None = None,
) -> SegmentationModel:
    """Build a torchvision segmentation model with a 1-channel head, never downloading weights.

    Args:
        name: one of `MODEL_NAMES`, or a U-Net family name ``{arch}_{encoder}`` (`kit.unet`).
        pretrained: None/False for random initialisation; a path to a ``.pth`` state dict of the
            whole torchvision model (e.g. ``fcn_resnet50_coco-1167a1af.pth``) or of its backbone
            network (e.g. ``resnet50-0676ba61.pth``; for a U-Net its encoder's, e.g.
            ``resnet34-b627a593.pth``, or a timm ``.safetensors``/``.pth``); or True/"auto" to
            look for the names of `weight_file_names` under `weight_dirs` (whole-model file
            preferred), warning and falling back to random initialisation when none is there.
        weight_dirs: folders searched (recursively) by "auto"; default `default_weight_dirs()`.

    Returns:
        A `SegmentationModel` in training mode; ``.weights_report`` says what was loaded.
    """
    check_model_name(name)
    if name in BACKBONES:
        kwargs: dict[str, Any] = {"weights": None, "weights_backbone": None, "num_classes": 1}
        if not name.startswith("lraspp"):
            kwargs["aux_loss"] = False  # no auxiliary head: never trained
        model = SegmentationModel(getattr(tvseg, name)(**kwargs), name)
    else:
        net = unet.build_net(name)
        model = SegmentationModel(net, name, unet.input_multiple(net))

    if pretrained is None or pretrained is False:
        return model
    if pretrained is True or pretrained == "auto":
        dirs = default_weight_dirs() if weight_dirs is None else [Path(d) for d in weight_dirs]
        path = find_weights(name, dirs)
        if path is None:
            looked_for = ", ".join(weight_file_names(name))
            warnings.warn(
                f"no pretrained weights for {name}: looked for {looked_for} "
                f"under {', '.join(map(str, dirs))}; using random initialisation",
                stacklevel=2,
            )
            return model
    elif isinstance(pretrained, str | os.PathLike):
        path = Path(pretrained)
    else:
        raise ValueError(f"pretrained must be None, a bool, 'auto' or a path, got {pretrained!r}")
    model.weights_report = load_pretrained(model, path)
    log.info("%s: %s", name, model.weights_report)
    return model


def weight_file_names(name: str) -> tuple[str, ...]:
    """File names of `name`'s weights: whole-model files first, then backbone files.

    The names come from torchvision's weights enums (the basename of each ``url``), so they are
    what ``torch.hub`` would have saved in ``$TORCH_HOME/hub/checkpoints``. A U-Net family model
    has its encoder's (`kit.unet.encoder_file_names`; none for encoders without local weights).
    """
    check_model_name(name)
    if name not in BACKBONES:
        return unet.encoder_file_names(unet.check_name(name)[1])
    enums = [tvm.get_model_weights(name), tvm.get_model_weights(BACKBONES[name])]
    return tuple(Path(w.url).name for weights in enums for w in weights)


def default_weight_dirs() -> list[Path]:
    """Folders "auto" searches: torch.hub's checkpoints folder, then Kaggle's inputs."""
    # torch.hub.get_dir() honours $TORCH_HOME (default ~/.cache/torch) and torch.hub.set_dir().
    return [Path(torch.hub.get_dir()) / "checkpoints", Path("/kaggle/input")]


def find_weights(name: str, weight_dirs: Iterable[str | os.PathLike] | None = None) -> Path | None:
    """The first of `weight_file_names(name)` found anywhere under `weight_dirs`, or None.

    Preference follows the order of the names (whole model before backbone), then of the folders.
    """
    wanted = weight_file_names(name)
    found: dict[str, Path] = {}
    for root in default_weight_dirs() if weight_dirs is None else weight_dirs:
        for file_name, path in _walk_for(Path(root), set(wanted)):
            found.setdefault(file_name, path)
    return next((found[n] for n in wanted if n in found), None)


def _walk_for(root: Path, names: set[str]) -> Iterable[tuple[str, Path]]:
    """(name, path) of files under `root` whose name is in `names`, following links once."""
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop, or a folder reached twice
            dirnames.clear()
            continue
        seen.add(real)
        dirnames.sort()
        for file_name in sorted(names.intersection(filenames)):
            yield file_name, Path(dirpath) / file_name


def load_pretrained(model: SegmentationModel, path: str | os.PathLike) -> WeightsReport:
    """Load a torchvision weights file into `model` in place and report what was used.

    The file is a state dict of either the whole torchvision segmentation model (keys start with
    ``backbone.``) or of the classification network the backbone comes from (``conv1.…``,
    ``layer1.…`` for ResNets; ``features.…`` for MobileNetV3). Head tensors whose shape differs
    (the 21-class COCO classifier against the 1-channel head) and keys the model lacks are
    skipped; every backbone tensor must be loaded, else the file does not belong to this model.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: `path` is not a state dict, or does not fit `model`'s backbone.
    """
    path = Path(path)
    state = _read_state_dict(path)
    if model.name not in BACKBONES:
        return _load_encoder(model, path, state)
    kind = "model" if any(k.startswith("backbone.") for k in state) else "backbone"
    target = model.net.state_dict()
    take: dict[str, torch.Tensor] = {}
    skipped: dict[str, str] = {}
    for key, value in state.items():
        # Backbone networks lose their classifier; MobileNetV3 keeps only its `features`.
        net_key = key if kind == "model" else "backbone." + key.removeprefix("features.")
        if net_key not in target:
            skipped[key] = f"not in {model.name}"
        elif value.shape != target[net_key].shape:
            skipped[key] = f"shape {tuple(value.shape)} != {tuple(target[net_key].shape)}"
        else:
            take[net_key] = value
    if not take:
        raise ValueError(f"{path}: no tensor matches {model.name}; is it a {model.name} file?")
    # BatchNorm counters are absent from older torchvision files and are not weights anyway.
    missing = [
        k
        for k in target
        if k.startswith("backbone.") and k not in take and not k.endswith("num_batches_tracked")
    ]
    if missing:
        raise ValueError(
            f"{path}: does not fit the {model.name} backbone ({len(missing)} backbone tensors "
            f"missing or of another shape, e.g. {', '.join(missing[:3])})"
        )
    model.net.load_state_dict(take, strict=False)
    return WeightsReport(path, kind, tuple(take), skipped)


def _load_encoder(
    model: SegmentationModel, path: Path, state: dict[str, torch.Tensor]
) -> WeightsReport:
    """Load a classifier's state dict into a U-Net family encoder; every encoder tensor must
    fit (a partial match means the file is of another network)."""
    take, unexpected, missing = unet.match_encoder_state(model.net, state)
    if not take:
        raise ValueError(f"{path}: no tensor matches the encoder of {model.name}")
    if missing:
        raise ValueError(
            f"{path}: does not fit the encoder of {model.name} ({len(missing)} tensors missing, "
            f"of another shape or extra, e.g. {', '.join(missing[:3])})"
        )
    unet.encoder_module(model.net).load_state_dict(take, strict=False)
    return WeightsReport(path, "encoder", tuple(take), unexpected)


def torch_load(path: Path, what: str, expected: str) -> Any:
    """``torch.load`` on the CPU with ``weights_only=True``; errors name the file and ``what``
    and end with ``expected``, a sentence on what such a file is.

    Torch's own message is not passed on: for a file holding arbitrary Python objects it
    advises loading with ``weights_only=False``, which runs the file's code: the wrong advice
    for a broken or untrusted file.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or non-torch files
        if isinstance(err, pickle.UnpicklingError) and "Unsupported global" in str(err):
            why = "it holds Python objects other than tensors and plain containers"
        else:
            why = f"it is not a readable torch file ({type(err).__name__})"
        raise ValueError(f"{path}: not a {what}: {why}. {expected}") from None


_WEIGHTS_EXPECTED = (
    "Pretrained weights are a torchvision .pth file: a state dict of tensors that torch.load "
    "reads with weights_only=True (or, for a timm encoder, a .safetensors file)."
)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict read with ``weights_only=True`` (or from a ``.safetensors`` file); errors
    name the file."""
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    state = torch_load(path, "weights file", _WEIGHTS_EXPECTED)
    if isinstance(state, Mapping) and "model_state" in state:
        raise ValueError(f"{path}: is a kit checkpoint, not torchvision weights; use load_model")
    if not (
        isinstance(state, Mapping)
        and state
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    ):
        raise ValueError(f"{path}: not a state dict (a mapping of names to tensors)")
    return dict(state)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file, on the CPU; errors name the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        state = load_file(path, device="cpu")
    except (SafetensorError, OSError) as err:
        why = f"not a readable safetensors file ({err})"
        raise ValueError(f"{path}: not a weights file: {why}") from None
    if not state:
        raise ValueError(f"{path}: not a state dict: the safetensors file holds no tensor")
    return state
