"""Segmentation models: torchvision architectures with a 1-channel head, and kit checkpoints.

    model = build_model("fcn_resnet50", pretrained="auto")  # RGB in [0, 1] -> logits (N, 1, h, w)
    model, ckpt = load_model("runs/quick/best.pt", device="cuda")

Pretrained weights are never downloaded (Kaggle notebooks run offline): ``pretrained`` names a
local ``.pth`` file, or ``"auto"`` looks for torchvision's own file names under
``$TORCH_HOME/hub/checkpoints`` and ``/kaggle/input`` (attach them as a dataset).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import logging
import os
import pickle
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.models as tvm
import torchvision.models.segmentation as tvseg
from torch import nn

from kit import atomic
from kit.device import default_device

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
MODEL_NAMES = tuple(BACKBONES)

CHECKPOINT_FORMAT = "hubmap-kit/1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SegmentationModel(nn.Module):
    """A torchvision segmentation network behind ImageNet normalisation, giving 1-channel logits.

    The mean/std are registered buffers, so they are saved in (and restored from) checkpoints.

    Shape:
        - Input: float (N, 3, h, w) RGB in [0, 1].
        - Output: float logits (N, 1, h, w).
    """

    def __init__(self, net: nn.Module, name: str) -> None:
        super().__init__()
        self.net = net
        self.name = name
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
        return self.net(self.normalize(x))["out"]


@dataclass(frozen=True)
class WeightsReport:
    """What `load_pretrained` took from a weights file.

    Attributes:
        path: the file read.
        kind: "model" (a whole torchvision segmentation model) or "backbone" (a classifier
            network such as resnet50, whose body became the backbone).
        loaded: keys of the torchvision network (``model.net``) that received weights.
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


def build_model(
    name: str = "fcn_resnet50",
    pretrained: bool | str | os.PathLike | None = None,
    *,
    weight_dirs: Iterable[str | os.PathLike] | None = None,
) -> SegmentationModel:
    """Build a torchvision segmentation model with a 1-channel head, never downloading weights.

    Args:
        name: one of `MODEL_NAMES`.
        pretrained: None/False for random initialisation; a path to a ``.pth`` state dict of the
            whole torchvision model (e.g. ``fcn_resnet50_coco-1167a1af.pth``) or of its backbone
            network (e.g. ``resnet50-0676ba61.pth``); or True/"auto" to look for torchvision's
            file names under `weight_dirs` (whole-model file preferred), warning and falling back
            to random initialisation when none is there.
        weight_dirs: folders searched (recursively) by "auto"; default `default_weight_dirs()`.

    Returns:
        A `SegmentationModel` in training mode; ``.weights_report`` says what was loaded.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown model name {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    kwargs: dict[str, Any] = {"weights": None, "weights_backbone": None, "num_classes": 1}
    if not name.startswith("lraspp"):
        kwargs["aux_loss"] = False  # no auxiliary head: never trained
    model = SegmentationModel(getattr(tvseg, name)(**kwargs), name)

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
    """torchvision's file names for `name`'s weights: whole-model files first, then backbone files.

    The names come from torchvision's weights enums (the basename of each ``url``), so they are
    what ``torch.hub`` would have saved in ``$TORCH_HOME/hub/checkpoints``.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown model name {name!r}; valid names: {', '.join(MODEL_NAMES)}")
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


def _torch_load(path: Path, what: str) -> Any:
    """``torch.load`` on the CPU with ``weights_only=True``; errors name the file and ``what``.

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
        raise ValueError(f"{path}: not a {what}: {why}. {_EXPECTED[what]}") from None


# What each kind of file _torch_load reads should be, for its error messages.
_EXPECTED = {
    "checkpoint": (
        f"A kit checkpoint is the best.pt or last.pt that `python -m kit train` writes: a dict "
        f"(format {CHECKPOINT_FORMAT!r}, model_name, model_state, config, epoch, metrics) that "
        "torch.load reads with weights_only=True."
    ),
    "weights file": (
        "Pretrained weights are a torchvision .pth file: a state dict of tensors that torch.load "
        "reads with weights_only=True."
    ),
}


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict read with ``weights_only=True``; errors name the file."""
    state = _torch_load(path, "weights file")
    if isinstance(state, Mapping) and state.get("format") == CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: is a kit checkpoint, not torchvision weights; use load_model")
    if not (
        isinstance(state, Mapping)
        and state
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    ):
        raise ValueError(f"{path}: not a state dict (a mapping of names to tensors)")
    return dict(state)


# --- checkpoints -------------------------------------------------------------------------------


def checkpoint_dict(
    model: nn.Module,
    config: Any,
    epoch: int,
    metrics: Mapping[str, float],
    **extra: Any,
) -> dict[str, Any]:
    """Assemble a kit checkpoint (format ``hubmap-kit/1``) readable with ``weights_only=True``.

    Args:
        model: a `SegmentationModel`, possibly wrapped by ``torch.compile`` or DDP.
        config: the run's config, a dataclass or mapping; stored as a plain dict (paths become
            strings, numpy scalars Python numbers).
        epoch: the epoch just finished.
        metrics: name -> value, stored as floats.
        **extra: further entries, e.g. ``optimizer_state=opt.state_dict()``.

    The model state is copied to the CPU, so later training steps do not alter it.
    """
    model = _unwrap(model)
    if not isinstance(model, SegmentationModel):
        raise ValueError(f"expected a SegmentationModel, got {type(model).__name__}")
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    if not isinstance(config, Mapping):
        raise ValueError(f"config must be a dataclass or a mapping, got {type(config).__name__}")
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "model_name": model.name,
        "model_state": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
        "config": _plain(config, "config"),
        "epoch": int(epoch),
        "metrics": {str(k): float(v) for k, v in metrics.items()},
    }
    clash = sorted(set(extra) & set(ckpt))
    if clash:
        raise ValueError(f"extra checkpoint entries clash with the format's keys: {clash}")
    ckpt.update(extra)
    return ckpt


def save_checkpoint(path: str | os.PathLike, ckpt: Mapping[str, Any]) -> Path:
    """Write a kit checkpoint atomically (see :mod:`kit.atomic`)."""
    path = Path(path)
    _check_checkpoint(ckpt, path)
    with atomic.writer(path, "wb") as f:
        torch.save(dict(ckpt), f)
    return path


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a kit checkpoint (``weights_only=True``, on the CPU)."""
    path = Path(path)
    ckpt = _torch_load(path, "checkpoint")
    _check_checkpoint(ckpt, path)
    return ckpt


def load_model(
    path: str | os.PathLike, device: str | torch.device | None = None
) -> tuple[SegmentationModel, dict[str, Any]]:
    """Rebuild the model saved in a kit checkpoint: (model in eval mode on `device`, checkpoint).

    ``device`` None: `kit.device.default_device()` (the GPU when there is one).

    An auxiliary head (``net.aux_classifier.*``, saved by older kits) is dropped: unused.
    """
    ckpt = read_checkpoint(path)
    model = build_model(ckpt["model_name"])
    state = {
        k: v for k, v in ckpt["model_state"].items() if not k.startswith("net.aux_classifier.")
    }
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path}: model_state does not fit {ckpt['model_name']} ({err})") from err
    return model.to(device or default_device()).eval(), ckpt


def find_checkpoint(roots: Iterable[str | os.PathLike]) -> Path | None:
    """The one model under ``roots`` (e.g. the attached inputs); None when there is none.

    A model is a folder holding ``best.pt`` (or only ``last.pt``): a run folder or a model
    dataset from ``python -m kit export``. Nothing is guessed: with several models under the
    roots, the caller must name one.

    Raises:
        ValueError: more than one model was found; the message lists them.
    """
    found: dict[Path, Path] = {}
    for root in map(Path, roots):
        for name in ("last.pt", "best.pt"):  # best.pt replaces last.pt in the same folder
            for path in sorted(root.glob(f"**/{name}")) if root.is_dir() else ():
                found[path.parent] = path
    if len(found) > 1:
        listed = "\n  ".join(str(p) for p in sorted(found.values()))
        raise ValueError(f"{len(found)} models found, name the one to use:\n  {listed}")
    return next(iter(found.values()), None)


def _check_checkpoint(ckpt: Any, path: Path) -> None:
    """Raise ValueError naming `path` unless `ckpt` is a kit checkpoint of a known model."""
    if not isinstance(ckpt, Mapping) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a kit checkpoint (no 'format': {CHECKPOINT_FORMAT!r})")
    missing = [
        k for k in ("model_name", "model_state", "config", "epoch", "metrics") if k not in ckpt
    ]
    if missing:
        raise ValueError(f"{path}: kit checkpoint lacks {', '.join(missing)}")
    if not isinstance(ckpt["model_state"], Mapping):
        raise ValueError(f"{path}: model_state is not a state dict")
    if ckpt["model_name"] not in BACKBONES:
        raise ValueError(
            f"{path}: unknown model name {ckpt['model_name']!r}; valid names: "
            f"{', '.join(MODEL_NAMES)}"
        )


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``torch.compile`` (``_orig_mod``) and DDP/DataParallel (``module``)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _plain(value: Any, where: str) -> Any:
    """`value` as types ``torch.load(weights_only=True)`` accepts; ValueError naming the field."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, enum.Enum):
        return _plain(value.value, where)
    if isinstance(value, torch.device | torch.dtype):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise ValueError(f"{where}: cannot store a {type(value).__name__} in a checkpoint")


def fingerprint(path: str | os.PathLike) -> str:
    """A short hash of a checkpoint file's bytes: identifies the weights (e.g. for resuming)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]
