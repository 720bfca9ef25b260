"""Kit checkpoints: the format, saving and reading them, and rebuilding the model they hold.

A checkpoint (a run's ``best.pt``/``last.pt``) is a dict of plain types and tensors that
``torch.load(weights_only=True)`` reads; a model dataset is a checkpoint with its run's files.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kit import atomic
from kit.device import default_device
from kit.kaggle import (
    DATASET_METADATA,
    MODEL_SLUG,
    MODEL_TITLE,
    check_new_dataset_metadata,
    dataset_metadata,
    read_user,
    validate_user,
)
from kit.model import SegmentationModel, build_model, check_model_name, torch_load

CHECKPOINT_FORMAT = "hubmap-kit/1"
CHECKPOINTS = {"best": "best.pt", "last": "last.pt"}
RUN_FILES = ("config.json", "history.csv")
# Checkpoint entries only resuming training needs: left out of an export (they triple its size).
TRAINING_STATE = ("optimizer_state", "scheduler_state", "scaler_state", "raw_model_state")

_EXPECTED = (
    f"A kit checkpoint is the best.pt or last.pt that `python -m kit train` writes: a dict "
    f"(format {CHECKPOINT_FORMAT!r}, model_name, model_state, config, epoch, metrics) that "
    "torch.load reads with weights_only=True."
)


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
    ckpt = torch_load(path, "checkpoint", _EXPECTED)
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
    if not isinstance(ckpt["model_name"], str):
        raise ValueError(f"{path}: model_name is not a string: {ckpt['model_name']!r}")
    try:
        check_model_name(ckpt["model_name"])
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


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


# --- model datasets ---------------------------------------------------------------------------


def export_model(
    run: str | os.PathLike,
    out: str | os.PathLike,
    *,
    which: str = "best",
    user: str | None = None,
    slug: str = MODEL_SLUG,
    title: str = MODEL_TITLE,
    keep_training_state: bool = False,
    root: str | os.PathLike | None = None,
) -> Path:
    """Write a model dataset: a run's checkpoint, config.json, history.csv + dataset metadata.

    From a folder holding ``ensemble.json`` (a cross-validation folder of ``kit cv``, or a
    previous export of one) the dataset holds every member instead, each named for its run
    folder (``fold0/best.pt`` -> ``fold0.pt``), and the manifest rewritten to name them.

    Args:
        run: a kit.train run folder (best.pt, last.pt, config.json, history.csv), or a folder
            holding ensemble.json.
        out: the dataset folder to write; an existing one must be empty or a previous export
            (it is replaced as a whole).
        which: "best" (best held-out Dice) or "last"; a manifest names its members: "best" only.
        user: the Kaggle owner (default: kaggle-user.txt under `root`).
        slug, title: the dataset's URL slug (6-50 characters) and title (6-50 characters).
        keep_training_state: keep optimizer/scheduler/scaler state (only resuming needs them).

    Returns:
        `out`, assembled in a hidden folder next to it and renamed into place.

    Raises:
        FileNotFoundError: no run folder, no such checkpoint, or a member of the manifest.
        ValueError: a checkpoint is not a kit checkpoint loadable with ``weights_only=True``,
            the manifest is invalid, or the metadata would be rejected by Kaggle (the message
            lists why).
        FileExistsError: `out` holds something other than a previous export.
    """
    from kit.ensemble import write_manifest  # imported here: kit.ensemble builds on this module

    run, out = Path(run), Path(out)
    members, manifest = _export_members(run, which)
    checkpoints = [read_checkpoint(source) for source, _, _ in members]
    user = validate_user(user) if user is not None else read_user(root)
    meta = dataset_metadata(user, slug, title, _description(checkpoints, run))
    check_new_dataset_metadata(meta, f"{out / DATASET_METADATA} (to be written)")
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        for (source, name, _), ckpt in zip(members, checkpoints, strict=True):
            _copy_checkpoint(source, ckpt, staging / name, keep_training_state)
        for name in RUN_FILES:
            if (run / name).is_file():
                shutil.copy2(run / name, staging / name)
        if manifest is not None:
            write_manifest(staging, [(name, w) for _, name, w in members], **manifest)
        atomic.write_json(staging / DATASET_METADATA, meta)
        atomic.swap_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _export_members(run: Path, which: str) -> tuple[list[tuple[Path, str, float]], dict | None]:
    """(source, name in the dataset, weight) of each checkpoint to export, and the manifest's
    settings (None: ``run`` is a run folder, exported as its checkpoint ``which``)."""
    from kit.ensemble import MANIFEST, SETTINGS, read_manifest

    source = _run_checkpoint(run, which)
    if not (run / MANIFEST).is_file():
        return [(source, source.name, 1.0)], None
    if which != "best":
        raise ValueError(
            f"{run} holds {MANIFEST}: its members are exported, which={which!r} does not apply"
        )
    document = read_manifest(run)
    members = [
        (m["path"], _member_name(m["path"]), float(m.get("weight", 1.0)))
        for m in document["members"]
    ]
    names = [name for _, name, _ in members]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"{run / MANIFEST}: members would share the names {repeated}")
    return members, {k: document[k] for k in SETTINGS if k in document}


def _member_name(path: Path) -> str:
    """A member's file name in a model dataset: a run's best.pt or last.pt is named for its run
    folder (``fold0/best.pt`` -> ``fold0.pt``), any other checkpoint keeps its name."""
    return f"{path.parent.name}.pt" if path.name in CHECKPOINTS.values() else path.name


def _run_checkpoint(run: Path, which: str) -> Path:
    """The path of checkpoint ``which`` ("best" or "last") of the run folder ``run``."""
    if which not in CHECKPOINTS:
        raise ValueError(f"which must be one of {list(CHECKPOINTS)}, got {which!r}")
    if not run.is_dir():
        raise FileNotFoundError(f"run folder not found: {run}")
    return run / CHECKPOINTS[which]


def _description(checkpoints: list[Mapping[str, Any]], run: Path) -> str:
    """The model dataset's one-sentence description: model, epoch, metrics, run folder; the
    members' models and epochs for an ensemble."""
    if len(checkpoints) > 1:
        models = ", ".join(sorted({c["model_name"] for c in checkpoints}))
        epochs = ", ".join(str(c["epoch"]) for c in checkpoints)
        return (
            f"HuBMAP kit ensemble of {len(checkpoints)} checkpoints ({models}; epochs {epochs}) "
            f"with its ensemble.json, from run {run.resolve().name}."
        )
    ckpt = checkpoints[0]
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in ckpt["metrics"].items())
    return (
        f"HuBMAP kit checkpoint: {ckpt['model_name']}, epoch {ckpt['epoch']}"
        + (f" ({metrics})" if metrics else "")
        + f", from run {run.resolve().name}."
    )


def _copy_checkpoint(
    source: Path, ckpt: Mapping[str, Any], dest: Path, keep_training_state: bool
) -> None:
    """Copy the checkpoint ``source`` (read as ``ckpt``) to ``dest``, slimmed of
    `TRAINING_STATE` unless ``keep_training_state``."""
    if keep_training_state:
        shutil.copy2(source, dest)
    else:
        save_checkpoint(dest, {k: v for k, v in ckpt.items() if k not in TRAINING_STATE})


def _check_replaceable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / DATASET_METADATA).is_file():
        raise FileExistsError(
            f"{out} is not empty and holds no {DATASET_METADATA} (not a previous export): "
            "choose another --out"
        )
