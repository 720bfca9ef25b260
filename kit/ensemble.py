"""Models on disk as one predictor: a checkpoint, several, a cross-validation run, a manifest.

    model = load_predictor(["runs/r1/best.pt"])             # one checkpoint: the model itself
    model = load_predictor(["runs/cv"])                      # every fold, the tuned threshold
    model = load_predictor(["a/best.pt", "b/best.pt"], tta=True)
    write_submission(data, model.predictor, out, model.cfg, fingerprint=model.fingerprint)
    find_model(["/kaggle/input"])                            # the one attached model, or None

A source is a checkpoint file, a folder holding ``ensemble.json`` (a manifest, written by
`write_manifest`: ``kit cv`` and ``kit export`` make them), a run folder (``best.pt``, else
``last.pt``), or a cross-validation folder (``fold*/best.pt``, all folds). Several checkpoints make
a `kit.infer.Ensemble`: each member sees windows at the scale it was trained at; weights and the
inference settings come from the manifest, else the first checkpoint. The slide is read once for
all members, so they share one stain normalisation (`kit.stain`): their method (members that
differ are refused) and the mean of their targets (fold models' targets differ only by the
slides each fold held out).

``ensemble.json``::

    {"members": [{"path": "fold0.pt", "weight": 1.0}, ...],   # paths relative to the file
     "threshold": 0.45, "window": 1024, "overlap": 256, "tta": true}   # each optional
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kit import atomic
from kit.checkpoint import CHECKPOINTS, fingerprint, load_model
from kit.device import channels_last
from kit.infer import Ensemble, InferConfig, Member, Predictor, config_from_checkpoint
from kit.stain import stats_list

__all__ = [
    "MANIFEST",
    "Loaded",
    "describe",
    "find_model",
    "load_predictor",
    "read_manifest",
    "sources_checkpoints",
    "write_manifest",
]

MANIFEST = "ensemble.json"
# Inference settings a manifest may fix (the rest come from the checkpoints and the caller).
SETTINGS = {"threshold": float, "window": int, "overlap": int, "tta": bool}
_FOLD = re.compile(r"fold(\d+)$")


def write_manifest(
    folder: str | os.PathLike, members: Sequence[tuple[str, float]], **settings: Any
) -> Path:
    """Write ``folder/ensemble.json`` atomically: members as (path relative to folder, weight),
    and ``settings`` among threshold, window, overlap, tta (None ones left out)."""
    folder = Path(folder)
    document = {
        "members": [{"path": str(path), "weight": float(weight)} for path, weight in members],
        **{k: v for k, v in settings.items() if v is not None},
    }
    _check_manifest(document, folder / MANIFEST)
    for member in document["members"]:
        if not (folder / member["path"]).is_file():
            raise FileNotFoundError(f"{folder / MANIFEST}: member {folder / member['path']}")
    return atomic.write_json(folder / MANIFEST, document)


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest at ``path`` (a file or its folder), member paths made absolute."""
    path = Path(path)
    path = path / MANIFEST if path.is_dir() else path
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"ensemble manifest not found: {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a JSON ensemble manifest ({e})") from e
    _check_manifest(document, path)
    for member in document["members"]:
        member["path"] = path.parent / member["path"]
        if not member["path"].is_file():
            raise FileNotFoundError(f"{path}: member checkpoint not found: {member['path']}")
    return document


def _check_manifest(document: Any, path: Path) -> None:
    if not isinstance(document, dict) or not isinstance(document.get("members"), list):
        raise ValueError(f"{path}: an ensemble manifest is an object with a 'members' list")
    if not document["members"]:
        raise ValueError(f"{path}: 'members' is empty")
    for k, member in enumerate(document["members"]):
        weight = member.get("weight", 1.0) if isinstance(member, dict) else None
        if not isinstance(member, dict) or not isinstance(member.get("path"), str):
            raise ValueError(f"{path}: member {k} needs a 'path' string, got {member!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ValueError(f"{path}: member {k} weight must be a number > 0, got {weight!r}")
    unknown = sorted(set(document) - {"members", *SETTINGS})
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; known: members, {list(SETTINGS)}")
    for key, kind in SETTINGS.items():
        value = document.get(key)
        if value is not None and (
            not isinstance(value, kind) or (kind is int and isinstance(value, bool))
        ):
            raise ValueError(f"{path}: '{key}' must be a {kind.__name__}, got {value!r}")


def sources_checkpoints(
    sources: Iterable[str | os.PathLike],
) -> tuple[list[Path], list[float], dict[str, Any]]:
    """(checkpoint paths, weights, manifest settings) of the sources (see the module's doc).

    Raises:
        FileNotFoundError: a source that is none of those, named.
        ValueError: more than one manifest (its settings would be ambiguous).
    """
    paths: list[Path] = []
    weights: list[float] = []
    settings: dict[str, Any] = {}
    manifests = 0
    for source in map(Path, sources):
        if source.is_dir() and (source / MANIFEST).is_file():
            document = read_manifest(source)
            manifests += 1
            paths += [m["path"] for m in document["members"]]
            weights += [float(m.get("weight", 1.0)) for m in document["members"]]
            settings = {k: document[k] for k in SETTINGS if k in document}
        else:
            found = _checkpoints_in(source)
            paths += found
            weights += [1.0] * len(found)
    if manifests > 1:
        raise ValueError("more than one ensemble manifest given: name one, or the checkpoints")
    if not paths:
        raise ValueError("no checkpoint given")
    return paths, weights, settings


def _checkpoints_in(source: Path) -> list[Path]:
    """A checkpoint file itself, a run folder's best (else last) checkpoint, or every fold's."""
    if source.is_file():
        return [source]
    for name in (CHECKPOINTS["best"], CHECKPOINTS["last"]):
        if (source / name).is_file():
            return [source / name]
    folds = [p for p in source.glob("fold*") if _FOLD.match(p.name)] if source.is_dir() else []
    found = [_checkpoints_in(p)[0] for p in sorted(folds, key=lambda p: int(p.name[4:]))]
    if not found:
        raise FileNotFoundError(
            f"no kit model at {source}: give a checkpoint (.pt), a run folder (best.pt), a "
            f"cross-validation folder (fold*/best.pt) or a folder holding {MANIFEST}"
        )
    return found


@dataclass
class Loaded:
    """What `load_predictor` returns."""

    predictor: Predictor | Ensemble  # the model itself for one checkpoint, else an Ensemble
    cfg: InferConfig  # the first checkpoint's settings, the manifest's, then the caller's
    fingerprint: str  # identifies the weights (and members' weights), for resuming
    paths: list[Path]  # the checkpoints, in member order
    checkpoints: list[dict[str, Any]]  # their metadata: model_name, epoch, metrics, config


def load_predictor(
    sources: Iterable[str | os.PathLike],
    device: str | torch.device | None = None,
    **overrides: Any,
) -> Loaded:
    """Load the models of ``sources`` as one predictor, with the inference settings to use.

    Args:
        sources: checkpoints, run folders, cross-validation folders or manifest folders.
        device: where the models go (None: `kit.device.default_device()`).
        overrides: `InferConfig` fields that replace the checkpoints' and the manifest's; None
            values are ignored (command-line options pass through as they are).
    """
    paths, weights, settings = sources_checkpoints(sources)
    models, checkpoints = [], []
    for path in paths:
        model, ckpt = load_model(path, device=device)
        models.append(model)
        checkpoints.append({k: v for k, v in ckpt.items() if not k.endswith("_state")})
    given = {k: v for k, v in overrides.items() if v is not None}
    stain = _stain_settings(checkpoints, paths)
    cfg = config_from_checkpoint(checkpoints[0], **{**stain, **settings, **given, "device": device})
    for model in models:  # once here, rather than by cuDNN at every call (kit.infer.Probabilities)
        if channels_last(next(model.parameters()).device, cfg.channels_last):
            model.to(memory_format=torch.channels_last)
    prints = [fingerprint(p) for p in paths]
    if len(models) == 1 and weights == [1.0]:
        return Loaded(models[0], cfg, prints[0], paths, checkpoints)
    scales = [config_from_checkpoint(c).scale for c in checkpoints]
    blob = json.dumps([prints, weights, scales]).encode()
    identity = "ensemble:" + hashlib.sha256(blob).hexdigest()[:16]
    members = [Member(m, s, w) for m, s, w in zip(models, scales, weights, strict=True)]
    ensemble = Ensemble(members, fingerprint=identity)
    # cfg at the scale inference will use: the finest member's
    return Loaded(ensemble, replace(cfg, scale=ensemble.scale), identity, paths, checkpoints)


def _stain_settings(checkpoints: Sequence[Mapping], paths: Sequence[Path]) -> dict[str, Any]:
    """The stain normalisation the members share: their method, the mean of their targets."""
    cfgs = [config_from_checkpoint(c) for c in checkpoints]
    if len({c.stain_norm for c in cfgs}) > 1:
        listed = ", ".join(f"{p}: {c.stain_norm}" for p, c in zip(paths, cfgs, strict=True))
        raise ValueError(f"ensemble members normalise stains differently ({listed})")
    targets = [c.stain_target for c in cfgs if c.stain_target is not None]
    return {"stain_target": stats_list(np.mean(targets, axis=0)) if targets else None}


def find_model(roots: Iterable[str | os.PathLike]) -> Path | None:
    """The one model under ``roots`` (e.g. the attached inputs); None when there is none.

    A model is a folder holding ``ensemble.json`` (its members are part of it), else a folder
    holding ``best.pt`` (or only ``last.pt``): a run folder or a model dataset from ``python -m
    kit export``. Returns that folder's manifest folder or checkpoint file. Nothing is guessed:
    with several models under the roots, the caller must name one.

    Raises:
        ValueError: more than one model was found; the message lists them.
    """
    found: dict[Path, Path] = {}
    roots = [Path(r) for r in roots if Path(r).is_dir()]
    manifests = {p.parent for root in roots for p in root.glob(f"**/{MANIFEST}")}
    for root in roots:
        for name in (CHECKPOINTS["last"], CHECKPOINTS["best"]):  # best replaces last
            for path in sorted(root.glob(f"**/{name}")):
                if not any(m in path.parents for m in manifests):
                    found[path.parent] = path
    found.update({folder: folder for folder in manifests})
    if len(found) > 1:
        listed = "\n  ".join(str(p) for p in sorted(found.values()))
        raise ValueError(f"{len(found)} models found, name the one to use:\n  {listed}")
    return next(iter(found.values()), None)


def describe(loaded: Loaded) -> str:
    """One line per checkpoint: path, model, epoch, validation metrics; then the settings."""
    lines = []
    for path, ckpt in zip(loaded.paths, loaded.checkpoints, strict=True):
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in _metrics(ckpt).items())
        lines.append(f"{path}: {ckpt['model_name']}, epoch {ckpt['epoch']} ({metrics})")
    cfg = loaded.cfg
    lines.append(
        f"window {cfg.window}, scale {cfg.scale}, overlap {cfg.overlap}, "
        f"threshold {cfg.threshold:g}, tta {cfg.tta}"
    )
    return "\n".join(lines)


def _metrics(ckpt: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in (ckpt.get("metrics") or {}).items()}
