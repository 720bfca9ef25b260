"""Training with held-out-slide validation, resumable run folders and optional multi-GPU.

    python -m kit train --data data/synthetic --out runs/quick --preset quick
    python -m kit train --data /kaggle/input/hubmap-kidney-segmentation --out runs/f0 \\
        --preset full --fold 0
    torchrun --nproc_per_node 2 -m kit train --data DIR --out runs/ddp --preset full

A run folder holds ``config.json`` (the TrainConfig, sections included), ``history.csv`` (a row per
finished epoch), ``last.pt`` (model, optimizer, scheduler and scaler state: what resuming needs)
and ``best.pt`` (the epoch with the best whole-slide Dice on the held-out slides). Running the same
command again after a crash continues from ``last.pt``: only the epoch in progress is lost.

Model selection uses the submission path itself (``kit.evaluate.evaluate_slides``): whole slides,
full resolution, the same tiling and threshold as the final prediction. A cheaper tile-level Dice
on the held-out tiles is logged every epoch.

Under torchrun each rank builds the tile caches of its share of the slides and scores its share
of the held-out slides; their pixel counts are summed, so every rank gets the Dice one process
would. Waits and those sums go through a gloo group, which sleeps where NCCL spins a core.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import random
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, DistributedSampler

from kit import atomic
from kit.checkpoint import checkpoint_dict, read_checkpoint, save_checkpoint
from kit.competition import Competition
from kit.config import option
from kit.data import (
    DataConfig,
    TileDataset,
    build_caches,
    cache_stain_stats,
    default_workers,
    eval_transforms,
    split_slides,
    tile_loader,
    train_transforms,
)
from kit.device import amp_dtype, available_cpus, rank_device
from kit.env import scratch_dir
from kit.infer import InferConfig
from kit.losses import BCEDiceLoss
from kit.metrics import DiceScore, Mean, dice_from_counts
from kit.model import build_model, check_model_name
from kit.progress import progress_bar, show_progress
from kit.pseudo import PseudoLabels, read_pseudo_labels
from kit.sampling import CropDataset, build_slide_cache
from kit.stain import stats_list, target_stats
from kit.submit import share_slides

# Folds of a grouped k-fold when n_folds is not given (fewer when there are fewer groups).
DEFAULT_FOLDS = 4
# Fields that change how a run executes but not what it computes: a resumed run may differ in them.
RUNTIME_FIELDS = (
    "resume", "workers", "device", "progress", "cache_dir",
    "infer.device", "infer.workers", "infer.prefetch", "infer.batch_size", "infer.channels_last",
)  # fmt: skip
# Inference settings set once, in the data section: the model predicts the windows it learned on.
SHARED_FIELDS = ("window", "scale", "min_tissue", "tissue_saturation", "stain_norm")
# Inference settings fit computes from the training slides (the stain target: their mean
# statistics, kit.stain.target_stats); the checkpoints carry them.
FITTED_FIELDS = ("stain_target",)
# Fields set from other fields (see TrainConfig; the device: the model's): no command-line flag.
DERIVED_FIELDS = (
    "data.seed", "infer.device", *(f"infer.{name}" for name in (*SHARED_FIELDS, *FITTED_FIELDS)),
)  # fmt: skip
# How often a shown training bar reads the running loss from the device.
BAR_SECONDS = 10.0
HISTORY_FIELDS = (
    "epoch", "lr", "train_loss", "valid_loss", "tile_dice", "slide_dice", "tiles_per_s", "seconds",
)  # fmt: skip


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved in config.json and in every checkpoint.

    ``data`` holds the tile settings (kit.data.DataConfig), ``infer`` those of whole-slide
    validation and of the submission (kit.infer.InferConfig); either may be given as a dict of
    its fields. Window, scale, the tissue rule and the stain normalisation are set once, in
    ``data``: ``infer`` takes them from it (the model predicts the windows it learned on), and
    ``data.seed`` is ``seed``. ``infer.stain_target`` is computed by `fit` (FITTED_FIELDS).
    """

    data_dir: str = option("data", "competition folder", flag="--data", required=True)
    out: str = option("runs/train", "run folder (resumed if it exists)", required=True)
    cache_dir: str | None = option(
        None, "tile cache folder (default: beside --out; on Kaggle outside /kaggle/working)"
    )
    # Held-out slides: `valid` if given, else fold `fold` of a grouped k-fold.
    valid: list[str] = option(help="held-out slide ids", factory=list, metavar="ID")
    fold: int = option(0, "hold out this fold of a grouped k-fold (0-based)")
    n_folds: int | None = option(None, f"folds (default {DEFAULT_FOLDS}, or one per group)")
    group_by: str | None = option(None, "patient or slide (default: patient if several)")
    # Test slides labelled by a submission (kit.pseudo): training slides in every fold.
    pseudo: str = option("", "submission CSV whose test slides join the training slides")
    model: str = option("fcn_resnet50", "kit.model name, e.g. fcn_resnet50 or unet_resnet34")
    pretrained: str | None = option(None, "'auto' (local torchvision files), a .pth file or none")
    # torchvision's MobileNetV3 uses 0.01: its running statistics then lag far behind the weights
    # in a run of a few hundred steps, and the model in eval mode predicts nothing.
    bn_momentum: float | None = option(None, "BatchNorm momentum (none: the architecture's)")
    # Optimisation: AdamW, linear warmup then cosine decay, stepped per batch.
    epochs: int = option(30, "training epochs")
    batch_size: int = option(16, "training tiles per step")
    lr: float = option(3e-4, "peak learning rate")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    warmup_epochs: float = option(1.0, "linear warmup from ~0 to lr")
    min_lr_ratio: float = option(0.01, "the cosine ends at lr * min_lr_ratio")
    bce_weight: float = option(0.8, "weight of BCE in the loss")
    dice_weight: float = option(0.2, "weight of soft Dice in the loss")
    lovasz_weight: float = option(0.0, "weight of the Lovász hinge in the loss (1st place: 1)")
    grad_clip: float | None = option(1.0, "max gradient norm (none: no clipping)")
    # An exponential moving average of the weights (the 2nd place: 0.995), updated every step,
    # BatchNorm statistics included: it is what validation scores and checkpoints hold.
    ema: float | None = option(
        None, "EMA decay of the weights, e.g. 0.995, warmed up as timm's (none: off)"
    )
    # albumentations' HEStain (kit.data.train_transforms): stain-space colour jitter.
    stain_augment: float = option(0.0, "probability of HEStain stain augmentation (0: off)")
    amp: bool = option(True, "mixed precision on CUDA (bf16 where supported, else fp16)")
    seed: int = option(0, "model init, data order, augmentation and tile selection")
    eval_every: int = option(1, "whole-slide validation every n epochs (and the last)")
    # Default: kit.data.default_workers (3 on Kaggle's 4 vCPUs, 1 per rank for two ranks).
    workers: int | None = option(None, "DataLoader workers per process (default: from the CPUs)")
    device: str | None = option(None, "cpu, cuda, cuda:1 ... (default: cuda:LOCAL_RANK or cpu)")
    progress: bool | None = option(None, "progress bars (default: on a terminal or in Jupyter)")
    resume: bool = option(True, "continue the run found in --out (--overwrite: start over)")
    data: DataConfig = field(default_factory=DataConfig)
    infer: InferConfig = field(default_factory=InferConfig)

    def __post_init__(self) -> None:
        if self.group_by not in (None, "patient", "slide"):
            raise ValueError(f"group_by must be 'patient' or 'slide', got {self.group_by!r}")
        if self.n_folds is not None and (isinstance(self.n_folds, bool) or self.n_folds < 2):
            raise ValueError(f"n_folds must be an integer >= 2, got {self.n_folds!r}")
        for name in ("epochs", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise ValueError(f"ema must be a decay in (0, 1) or None, got {self.ema!r}")
        if not 0.0 <= self.stain_augment <= 1.0:
            raise ValueError(f"stain_augment must be in [0, 1], got {self.stain_augment!r}")
        check_model_name(self.model)  # before any tile is cached
        self.valid = list(self.valid)
        self.data = DataConfig(**{**_as_dict(self.data), "seed": self.seed})
        shared = {name: getattr(self.data, name) for name in SHARED_FIELDS}
        self.infer = InferConfig(**{**_as_dict(self.infer), **shared})


def _as_dict(section) -> dict:
    return dict(section) if isinstance(section, Mapping) else asdict(section)


def merge_config(base: Mapping, overrides: Mapping) -> dict:
    """``base`` with ``overrides``; the ``data`` and ``infer`` dicts merged field by field."""
    merged = {**base, **overrides}
    for section in ("data", "infer"):
        if isinstance(overrides.get(section), Mapping):
            merged[section] = {**base.get(section, {}), **overrides[section]}
    return merged


PRESETS = {
    # The demo on the synthetic default dataset, 2 CPU cores, from scratch (no pretrained weights
    # offline): the smallest network on 256 px windows seen at 128 px. Measured on fold 0 of the
    # synthetic-v3 default: held-out whole-slide Dice 0.939 (0.946 on v2, folds 1, 2: 0.930,
    # 0.948). Scale 2 rather than 4: the boundaries are the Dice at stake.
    "quick": dict(
        model="lraspp_mobilenet_v3_large",
        bn_momentum=0.1,
        epochs=12,
        batch_size=8,
        lr=2e-3,
        weight_decay=1e-4,
        warmup_epochs=0.5,
        eval_every=3,
        workers=0,  # on 2 cores a worker process competes with the training step's threads
        data=dict(window=256, scale=2, overlap=0, tissue_share=1.0, background_share=0.2),
        infer=dict(overlap=64),
    ),
    # Real-scale data (the realistic synthetic profile, or the competition's slides) on 2 CPU
    # cores: the quick preset's small network from scratch on the `full` preset's 1024 px windows
    # seen at 256 px, which hold a whole 200-400 px glomerulus with its surroundings, trained with
    # the RECIPE below. Measured on the realistic default (patient fold 0, seeds 0 1 2;
    # bench/quality.py --recipes cpu best --cortex-filter): held-out whole-slide Dice 0.940 0.950
    # 0.942 (mean 0.944), against 0.925 0.884 0.898 (mean 0.903) for the same network on the
    # fixed grid with BCE + Dice (the +cortex-filter row of `best` is this preset).
    "cpu": dict(
        model="lraspp_mobilenet_v3_large",
        bn_momentum=0.1,
        epochs=10,
        batch_size=8,
        lr=2e-3,
        warmup_epochs=0.5,
        eval_every=5,
        workers=0,
        data=dict(window=1024, scale=4, overlap=256, tissue_share=1.0, background_share=0.2),
        infer=dict(overlap=256),
    ),
    # Competition settings for one GPU (or several under torchrun): 1024 px windows seen at 256 px,
    # FCN-ResNet50 from torchvision's COCO (or ImageNet backbone) weights attached locally, trained
    # with the RECIPE below. Not measured at this scale (no GPU here): bench/quality.py --recipes
    # full full-unet-resnet34 compares it with a U-Net on ResNet-34.
    "full": dict(
        model="fcn_resnet50",
        pretrained="auto",
        epochs=35,
        batch_size=16,
        lr=2e-4,
        weight_decay=1e-4,
        warmup_epochs=1.0,
        eval_every=5,
        data=dict(window=1024, scale=4, overlap=256),
        infer=dict(overlap=256),
    ),
}
# The training recipe of the real-scale presets, what beat the fixed grid with BCE + Dice on
# every seed of bench/quality.py (issue 14; the README's quality table): crops drawn each epoch
# around glomeruli, tissue crops weighted by region (cortex / medulla / elsewhere), each slide's
# stain mapped onto the training slides' mean (Reinhard), the Lovász hinge added to the loss, and
# predictions outside the Cortex polygons zeroed (where the slide has an anatomy file).
RECIPE = dict(
    data=dict(sampling="centred", region_weighting=True, stain_norm="reinhard"),
    lovasz_weight=1.0,
    infer=dict(cortex_only=True),
)
PRESETS.update({name: merge_config(PRESETS[name], RECIPE) for name in ("cpu", "full")})


def preset(name: str, **overrides) -> TrainConfig:
    """A named TrainConfig (see PRESETS), with fields replaced by ``overrides``.

    ``data`` and ``infer`` overrides are dicts merged into the preset's sections, e.g.
    ``preset("quick", epochs=3, data={"window": 128}, infer={"tta": True})``.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return TrainConfig(**merge_config(PRESETS[name], overrides))


# --------------------------------------------------------------------------- steps


def train_one_epoch(
    model,
    loader,
    criterion,
    optimizer,
    scheduler,
    scaler,
    *,
    device,
    amp_dtype,
    grad_clip=None,
    progress=False,
    desc="train",
    after_step=None,
) -> dict:
    """One pass over ``loader``; returns the mean loss and the throughput in tiles/s.

    ``after_step``: called after each optimizer step (e.g. to update an average of the weights).

    The loss is summed on the device and read once, at the end (a shown bar reads it every
    `BAR_SECONDS`): a read per step would make the CPU wait for the GPU at every step.
    """
    model.train()
    loss_mean, seen, start = Mean(), 0, time.perf_counter()
    shown = start
    bar = progress_bar(loader, desc=desc, unit="batch", progress=progress, leave=False)
    for images, masks in bar:
        images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        loss = criterion(logits, masks)  # in float32 (the loss casts)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip:
            scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if after_step is not None:
            after_step()
        loss_mean.update(loss, len(images))
        seen += len(images)
        if not bar.disable and time.perf_counter() - shown >= BAR_SECONDS:
            loss_so_far, shown = loss_mean.compute(), time.perf_counter()
            bar.set_postfix(loss=f"{loss_so_far:.4f}", tiles_s=f"{seen / (shown - start):.1f}")
    loss = loss_mean.compute()  # waits for the last step: the rate is the device's
    return {"train_loss": loss, "tiles_per_s": seen / (time.perf_counter() - start)}


@torch.no_grad()
def evaluate(model, loader, criterion, *, device, amp_dtype, threshold=0.5, progress=False) -> dict:
    """Loss and Dice over all held-out tiles (pixels pooled, not a mean of per-tile Dice).

    Both are accumulated on the device and read once, at the end.
    """
    model.eval()
    score, loss_mean = DiceScore(), Mean()
    bar = progress_bar(loader, desc="valid", unit="batch", progress=progress, leave=False)
    for images, masks in bar:
        images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        loss_mean.update(criterion(logits, masks), len(images))
        score.update(torch.sigmoid(logits.float()) > threshold, masks)
    return {"valid_loss": loss_mean.compute(), "tile_dice": score.compute()}


def warmup_cosine(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Learning-rate factor at ``step``: linear warmup to 1, then cosine down to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------- fit


def fit(cfg: TrainConfig) -> dict:
    """Train per ``cfg`` into the run folder ``cfg.out``; resumes a run left there.

    Returns a dict: ``best_dice`` (mean whole-slide Dice of the held-out slides at the best
    epoch), ``best_path``, ``last_path``, ``run_dir``, ``valid_ids``, ``train_ids``, ``history``
    (list of per-epoch dicts), ``rank`` and ``model`` (the trained network, unwrapped).
    Under torchrun every rank returns; only rank 0 writes files.
    """
    ctx = _Distributed.start(cfg.device)
    try:
        return _fit(cfg, ctx)
    finally:
        ctx.stop()


def _fit(cfg: TrainConfig, ctx: _Distributed) -> dict:
    run = Path(cfg.out)
    labels = read_pseudo_labels(cfg.pseudo, cfg.data_dir) if cfg.pseudo else None
    state = _open_run(cfg, run, ctx, labels)  # last.pt and the rows of finished epochs, or None
    _seed_everything(cfg.seed)  # the same initial weights on every rank
    data = _Data.build(cfg, ctx, labels)
    # Validation and every checkpoint map slides onto the training slides' stain statistics.
    cfg = replace(cfg, infer=replace(cfg.infer, stain_target=data.stain_target))
    training = _Training.build(cfg, ctx, steps=len(data.train_dl))
    history, best, start = _resume(state, training, cfg, run, ctx)
    ctx.print(data.describe(ctx.device, ctx.world))
    for epoch in range(start + 1, cfg.epochs + 1):
        row = _run_epoch(epoch, cfg, ctx, data, training)
        if row is not None:  # rank 0 writes while the others wait at the barrier
            history.append(row)
            best = _save_epoch(run, cfg, history, best, training)
            ctx.print(_epoch_line(row, cfg.epochs))
        ctx.barrier()

    model = training.weights
    ctx.share_buffers(model)
    if ctx.rank == 0 and not (run / "best.pt").exists():
        raise ValueError(f"{run}: no epoch was validated (epochs={cfg.epochs})")
    return {
        "best_dice": ctx.from_rank0(best["slide_dice"]),
        "best_epoch": int(ctx.from_rank0(best["epoch"])),
        "best_path": run / "best.pt",
        "last_path": run / "last.pt",
        "run_dir": run,
        "train_ids": data.train_ids,
        "valid_ids": data.valid_ids,
        "history": history,
        "rank": ctx.rank,
        "model": model.eval(),
    }


def _run_epoch(
    epoch: int, cfg: TrainConfig, ctx: _Distributed, data: _Data, training: _Training
) -> dict | None:
    """Train one epoch on every rank, then validate it: the held-out tiles on rank 0, the
    held-out slides shared among the ranks. Returns its history row on rank 0 (None on the
    others)."""
    t0 = time.perf_counter()
    _seed_epoch(cfg.seed, ctx.rank, epoch, data.sampler)
    model, optimizer, dtype = training.model, training.optimizer, training.dtype
    row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
    row |= train_one_epoch(
        training.net, data.train_dl, training.criterion, optimizer, training.scheduler,
        training.scaler, device=ctx.device, amp_dtype=dtype, grad_clip=cfg.grad_clip,
        progress=data.progress, desc=f"epoch {epoch}/{cfg.epochs}",
        after_step=training.update_average if training.ema is not None else None,
    )  # fmt: skip
    row["train_loss"] = ctx.mean(row["train_loss"])
    model = training.weights
    whole = epoch % cfg.eval_every == 0 or epoch == cfg.epochs
    if whole:  # every rank scores the weights rank 0 saves (before its tiles: no wait there)
        ctx.share_buffers(model)
    if ctx.rank == 0:
        row |= evaluate(
            model, data.valid_dl, training.criterion, device=ctx.device, amp_dtype=dtype,
            threshold=cfg.infer.threshold, progress=data.progress,
        )  # fmt: skip
    row["slide_dice"] = math.nan
    if whole:
        row["slide_dice"] = _slide_dice(model, cfg, data.valid_ids, data.progress, ctx)
    row["seconds"] = time.perf_counter() - t0
    return row if ctx.rank == 0 else None


def split(cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """The run's (training, held-out) slide ids: ``cfg.valid``, else fold ``cfg.fold``."""
    train, valid, _ = _split(cfg)
    return train, valid


def _split(cfg: TrainConfig) -> tuple[list[str], list[str], list[str]]:
    """`split` and the notes saying how unset fold settings were fitted to the data."""
    ids = Competition(cfg.data_dir).train_ids
    if cfg.valid:
        return *split_slides(ids, valid=cfg.valid), []
    patients = Competition(cfg.data_dir).patients if cfg.group_by != "slide" else None
    n_folds, groups, notes = fold_setup(ids, cfg.n_folds, cfg.group_by, patients)
    return *split_slides(ids, fold=cfg.fold, n_folds=n_folds, groups=groups), notes


def fold_setup(
    ids: list[str],
    n_folds: int | None,
    group_by: str | None,
    patients: Mapping[str, str] | None = None,
) -> tuple[int, Mapping[str, str] | None, list[str]]:
    """(number of folds, slide -> group or None for one group per slide, notes).

    Settings left unset (None) are fitted to the data, each with a note for the run's log:
    ``group_by`` falls back from patients to slides when all slides come from one patient, and
    ``n_folds`` is ``DEFAULT_FOLDS``, or one fold per group when there are fewer groups. Settings
    that were given and cannot be met raise ValueError (in `kit.data.group_folds`).

    Args:
        ids: the training slide ids.
        patients: slide id -> patient (`Competition.patients`); needed unless grouping by slide.
    """
    notes, groups = [], None
    if group_by in (None, "patient"):
        if patients is None:
            raise ValueError("grouping by patient needs the slides' patients")
        found = sorted({str(patients.get(i, f"slide {i}")) for i in ids})
        if len(found) > 1 or group_by == "patient":
            groups = patients
        else:
            notes.append(
                f"all {len(ids)} training slides come from patient {found[0]}: folds hold out "
                "slides instead of patients (group_by='slide')"
            )
    unit = "patient" if groups is not None else "slide"
    count = len({str(groups.get(i, f"slide {i}")) for i in ids}) if groups else len(ids)
    if count < 2:
        raise ValueError(
            f"cannot hold out a {unit}: the {len(ids)} training slide(s) come from one {unit}"
            + (" (group_by='patient'; use 'slide' or give valid ids)" if groups else "")
        )
    if n_folds is None:
        n_folds = min(DEFAULT_FOLDS, count)
        if n_folds < DEFAULT_FOLDS:
            notes.append(
                f"{count} {unit}s to hold out: {n_folds} folds instead of {DEFAULT_FOLDS} "
                "(n_folds not given)"
            )
    return n_folds, groups, notes


def tile_caches(
    cfg: TrainConfig,
    ids: list[str],
    progress: bool | None = None,
    labels: PseudoLabels | None = None,
) -> list[Path]:
    """The tile cache folders of slides ``ids`` for this run's settings, built where missing.

    They are in `tile_cache_dir`. Slides of ``labels`` (pseudo-labelled test slides) get
    their masks from it.
    """
    masks = labels.masks if labels is not None else None
    return build_caches(
        cfg.data_dir, ids, cfg.data, tile_cache_dir(cfg), progress=progress, masks=masks
    )


def stain_target(cfg: TrainConfig, train_caches: list[Path]) -> list[float] | None:
    """The statistics every slide is mapped to with ``cfg.data.stain_norm``: the mean of the
    training slides' (`kit.stain.target_stats`, from their tile or slide caches); None without
    it."""
    if cfg.data.stain_norm == "none":
        return None
    return stats_list(target_stats([cache_stain_stats(f) for f in train_caches]))


def train_dataset(
    cfg: TrainConfig,
    ids: list[str],
    progress: bool | None = None,
    labels: PseudoLabels | None = None,
) -> TileDataset | CropDataset:
    """The training set of slides ``ids``, its caches built where missing: grid tiles, or crops
    drawn each epoch around glomeruli (``cfg.data.sampling == "centred"``, `kit.sampling`).

    Slides of ``labels`` get their masks from it. With ``cfg.data.stain_norm`` every tile is
    mapped onto the mean stain statistics of these slides (`stain_target`)."""
    transforms = train_transforms(stain_augment=cfg.stain_augment)
    centred = cfg.data.sampling == "centred"
    if centred:
        masks = labels.masks if labels is not None else None
        folders = build_caches(
            cfg.data_dir, ids, cfg.data, tile_cache_dir(cfg), progress=progress, masks=masks,
            build=build_slide_cache,
        )  # fmt: skip
    else:
        folders = tile_caches(cfg, ids, progress=progress, labels=labels)
    stain = {"stain_norm": cfg.data.stain_norm, "stain_target": stain_target(cfg, folders)}
    if centred:
        return CropDataset(folders, cfg.data, transforms, **stain)
    return TileDataset(folders, transforms, **stain)


def tile_cache_dir(cfg: TrainConfig) -> Path:
    """The folder of the run's tile caches: ``cfg.cache_dir``, else ``tile-cache`` beside the run
    folder (runs with the same tile settings share it).

    On Kaggle the default is in `kit.env.scratch_dir` instead: a cache of several GB under
    /kaggle/working would count against the notebook's 20 GB of output.
    """
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    scratch = scratch_dir()
    if scratch is not None:
        return scratch / "tile-cache"
    return Path(cfg.out).resolve().parent / "tile-cache"


@dataclass
class _Data:
    """The split, the tile datasets and their loaders of a run."""

    train_ids: list[str]
    valid_ids: list[str]
    train_ds: TileDataset | CropDataset
    valid_ds: TileDataset
    train_dl: DataLoader
    valid_dl: DataLoader
    sampler: DistributedSampler | None
    workers: int  # per loader
    progress: bool  # show bars (rank 0 only)
    stain_target: list[float] | None  # with data.stain_norm: the training slides' mean stats

    @classmethod
    def build(cls, cfg: TrainConfig, ctx: _Distributed, labels: PseudoLabels | None) -> _Data:
        """``labels``: pseudo-labelled test slides, added to the training slides."""
        train_slides, valid_slides, notes = _split(cfg)
        for note in notes:  # the run's first lines: how unset fold settings fit the data
            ctx.print(note)
        if labels is not None:
            train_slides += labels.ids
            ctx.print(f"pseudo-labelled test slides from {labels.csv}: {labels.ids}")
        progress = show_progress(cfg.progress) and ctx.rank == 0
        ctx.print(f"tile cache: {tile_cache_dir(cfg)}")
        # Each rank builds the caches of its share of the slides (a cache is placed whole, by
        # one rename: kit.data.build_tile_cache); then every rank finds them all complete.
        mine = set(slide_share(cfg, train_slides + valid_slides, ctx.rank, ctx.world))
        n = len(train_slides)
        train_dataset(cfg, [s for k, s in enumerate(train_slides) if k in mine], progress, labels)
        tile_caches(
            cfg, [s for k, s in enumerate(valid_slides) if k + n in mine], progress=progress
        )
        ctx.barrier()
        train_ds = train_dataset(cfg, train_slides, False, labels)
        stain = {
            "stain_norm": cfg.data.stain_norm,
            "stain_target": stain_target(cfg, train_ds.folders),
        }
        valid_ds = TileDataset(
            tile_caches(cfg, valid_slides, progress=False), eval_transforms(), **stain
        )
        workers = cfg.workers
        if workers is None:
            workers = default_workers(available_cpus(), ctx.local_world)
        train_dl, sampler = _train_loader(train_ds, cfg, ctx, workers)
        pin = ctx.device.type == "cuda"
        valid_dl = tile_loader(valid_ds, cfg.batch_size, workers=workers, pin_memory=pin)
        return cls(
            train_slides, valid_slides, train_ds, valid_ds, train_dl, valid_dl, sampler, workers,
            progress, stain["stain_target"],
        )  # fmt: skip

    def describe(self, device: torch.device, world: int) -> str:
        return (
            f"train slides {self.train_ids} ({len(self.train_ds)} tiles), held out "
            f"{self.valid_ids} ({len(self.valid_ds)} tiles) on {device}"
            + (f" x{world}" if world > 1 else "")
            + f", {self.workers} loader worker{'' if self.workers == 1 else 's'}"
            + (" per process" if world > 1 else "")
        )


@dataclass
class _Training:
    """The network and what trains it: what last.pt saves and a resumed run restores."""

    model: torch.nn.Module  # what checkpoints hold and validation runs
    net: torch.nn.Module  # the model, in DistributedDataParallel when there are several ranks
    criterion: BCEDiceLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR  # stepped per batch
    scaler: torch.amp.GradScaler  # enabled for fp16 only
    dtype: torch.dtype | None  # of autocast; None: full precision
    ema: AveragedModel | None  # the moving average of the model, with cfg.ema

    @property
    def weights(self) -> torch.nn.Module:
        """What validation scores and checkpoints hold: the average with EMA, else the model."""
        return self.ema.module if self.ema is not None else self.model

    def update_average(self) -> None:
        self.ema.update_parameters(self.model)

    @classmethod
    def build(cls, cfg: TrainConfig, ctx: _Distributed, steps: int) -> _Training:
        """``steps``: batches per epoch, the unit of the learning-rate schedule."""
        model = _build_model(cfg).to(ctx.device)
        net = DistributedDataParallel(model, device_ids=ctx.device_ids) if ctx.world > 1 else model
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup, total = round(cfg.warmup_epochs * steps), cfg.epochs * steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: warmup_cosine(s, warmup=warmup, total=total, min_ratio=cfg.min_lr_ratio),
        )
        dtype = amp_dtype(ctx.device, cfg.amp)
        scaler = torch.amp.GradScaler(ctx.device.type, enabled=dtype == torch.float16)
        criterion = BCEDiceLoss(cfg.bce_weight, cfg.dice_weight, lovasz_weight=cfg.lovasz_weight)
        ema = None
        if cfg.ema is not None:
            ema = AveragedModel(model, multi_avg_fn=ema_update(cfg.ema), use_buffers=True)
        return cls(model, net, criterion, optimizer, scheduler, scaler, dtype, ema)


def ema_decay(decay: float, updates: torch.Tensor) -> torch.Tensor:
    """The decay of the average's next update after ``updates`` earlier ones (a tensor, so no
    host sync): ``min(decay, (1 + n) / (10 + n))``, timm's warm-up. With a fixed 0.995 a CPU
    run of ~270 steps would keep 0.995 ** 270 = 26% of the random initial weights (and their
    batch-norm statistics) in the average; with the warm-up, under 0.1%."""
    n = updates.to(torch.float64)
    return torch.clamp((1.0 + n) / (10.0 + n), max=decay)


def ema_update(decay: float):
    """The ``multi_avg_fn`` of `AveragedModel`: ``average += (1 - d) * (model - average)`` with
    d = `ema_decay`; integer buffers (batch-norm's step count) take the model's value."""

    @torch.no_grad()
    def update(averages: list, current: list, updates: torch.Tensor) -> None:
        weight = 1.0 - ema_decay(decay, updates)
        for average, value in zip(averages, current, strict=True):
            if average.is_floating_point():
                average.add_((value - average) * weight.to(average.dtype))
            else:
                average.copy_(value)

    return update


def _build_model(cfg: TrainConfig) -> torch.nn.Module:
    model = build_model(cfg.model, pretrained=cfg.pretrained)
    if cfg.bn_momentum is not None:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.momentum = cfg.bn_momentum
    return model


def _resume(state, training: _Training, cfg: TrainConfig, run: Path, ctx: _Distributed):
    """(history rows, best epoch so far, last finished epoch): those of ``state`` (last.pt and
    its history), whose states are loaded into ``training``, or a fresh start's."""
    if state is None:
        return [], {"slide_dice": -1.0, "epoch": 0}, 0
    ckpt, history = state
    best = _restore(ckpt, training)
    saved, now = ckpt.get("amp_dtype", "None"), str(training.dtype)
    switched = f" (saved with amp {saved}, now {now})" if saved != now else ""
    ctx.print(f"resuming {run} after epoch {ckpt['epoch']} of {cfg.epochs}{switched}")
    return history, best, ckpt["epoch"]


def _restore(ckpt: dict, training: _Training) -> dict:
    """Load last.pt's states in place; return the best epoch so far.

    The run may resume in another precision (saved on a CPU or in bf16, resumed in fp16 on a
    T4, or the reverse): a disabled scaler saves an empty state, which an enabled one cannot
    load, so the scaler state is loaded only when there is one; an fp16 scaler then starts
    from its default scale.
    """
    # With EMA, model_state is the average (what inference uses) and raw_model_state the model.
    training.model.load_state_dict(ckpt.get("raw_model_state") or ckpt["model_state"])
    if training.ema is not None:
        training.ema.module.load_state_dict(ckpt["model_state"])
        training.ema.n_averaged.fill_(ckpt["ema_steps"])
    training.optimizer.load_state_dict(ckpt["optimizer_state"])
    training.scheduler.load_state_dict(ckpt["scheduler_state"])
    if ckpt.get("scaler_state") and training.scaler.is_enabled():
        training.scaler.load_state_dict(ckpt["scaler_state"])
    return {"slide_dice": ckpt["metrics"]["best_slide_dice"], "epoch": ckpt["best_epoch"]}


def _save_epoch(
    run: Path, cfg: TrainConfig, history: list, best: dict, training: _Training
) -> dict:
    """Write history.csv, best.pt when the whole-slide Dice improved, then last.pt.

    last.pt records the autocast dtype (None for full precision) the run trained in.

    In this order, a crash between two writes costs at most the epoch: on resume, history rows
    after last.pt's epoch are dropped and that epoch runs again.
    """
    row, model = history[-1], training.weights
    _write_history(run / "history.csv", history)
    metrics = {k: row[k] for k in HISTORY_FIELDS}
    if row["slide_dice"] > best["slide_dice"]:  # False for NaN (epochs not scored)
        best = {"slide_dice": row["slide_dice"], "epoch": row["epoch"]}
        save_checkpoint(run / "best.pt", checkpoint_dict(model, cfg, row["epoch"], metrics))
    metrics["best_slide_dice"] = best["slide_dice"]
    last = checkpoint_dict(
        model,
        cfg,
        row["epoch"],
        metrics,
        best_epoch=best["epoch"],
        optimizer_state=training.optimizer.state_dict(),
        scheduler_state=training.scheduler.state_dict(),
        scaler_state=training.scaler.state_dict(),
        amp_dtype=str(training.dtype),
        **_averaging_state(training),
    )
    save_checkpoint(run / "last.pt", last)
    return best


def _train_loader(ds: TileDataset | CropDataset, cfg: TrainConfig, ctx: _Distributed, workers: int):
    if len(ds) == 0:
        raise ValueError("no training tiles: check the slides' masks and the tile settings")
    sampler = (
        DistributedSampler(ds, num_replicas=ctx.world, rank=ctx.rank, shuffle=True, seed=cfg.seed)
        if ctx.world > 1
        else None
    )
    per_rank = math.ceil(len(ds) / ctx.world)
    loader = tile_loader(
        ds,
        cfg.batch_size,
        workers=workers,
        shuffle=True,
        sampler=sampler,
        pin_memory=ctx.device.type == "cuda",
        # A last batch of one tile breaks BatchNorm on pooled features; drop partial batches.
        drop_last=per_rank > cfg.batch_size,
    )
    return loader, sampler


def _averaging_state(training: _Training) -> dict:
    """With EMA, what resuming needs besides the average: the model itself and the step count."""
    if training.ema is None:
        return {}
    raw = {k: v.detach().to("cpu", copy=True) for k, v in training.model.state_dict().items()}
    return {"raw_model_state": raw, "ema_steps": int(training.ema.n_averaged)}


def _slide_dice(model, cfg: TrainConfig, ids: list[str], progress: bool, ctx) -> float:
    """Mean full-resolution Dice of the held-out slides through the submission path.

    Each rank scores its share of the slides (`slide_share`); their pixel counts, summed over
    the ranks, give every rank each slide's Dice, exactly as one process computes it.
    """
    from kit.evaluate import evaluate_slides

    mine = slide_share(cfg, ids, ctx.rank, ctx.world)
    infer_cfg = replace(cfg.infer, device=str(next(model.parameters()).device))
    table = evaluate_slides(
        cfg.data_dir, model.eval(), [ids[k] for k in mine], infer_cfg, (), progress=progress
    )
    counts = np.zeros((len(ids), 3), np.int64)
    counts[mine] = table[["both_px", "pred_px", "true_px"]].to_numpy(np.int64)
    counts = ctx.sum(counts)
    return float(np.mean([dice_from_counts(*row) for row in counts.tolist()]))


def slide_share(cfg: TrainConfig, ids: list[str], rank: int, world: int) -> list[int]:
    """Indices of the slides ``ids`` that process ``rank`` of ``world`` works on (builds their
    tile caches, validates them): `kit.submit.share_slides`, largest TIFFs first, to the
    process with the fewest bytes so far; all of them when ``world`` is 1."""
    if world == 1:
        return list(range(len(ids)))
    paths = Competition(cfg.data_dir).slide_paths(ids)
    return share_slides([paths[i] for i in ids], world)[rank]


def _epoch_line(row: dict, epochs: int) -> str:
    slide = "" if math.isnan(row["slide_dice"]) else f" slide dice {row['slide_dice']:.4f}"
    return (
        f"epoch {row['epoch']}/{epochs}: loss {row['train_loss']:.4f} valid loss "
        f"{row['valid_loss']:.4f} tile dice {row['tile_dice']:.4f}{slide} "
        f"({row['tiles_per_s']:.1f} tiles/s, {row['seconds']:.0f} s)"
    )


# --------------------------------------------------------------------------- run folder


def _open_run(cfg: TrainConfig, run: Path, ctx: _Distributed, labels: PseudoLabels | None):
    """Check the run folder against ``cfg``; return (last checkpoint, history rows) to resume.

    config.json holds the config (``train``) and, with pseudo-labels, their file, digest and
    slides (``pseudo``): a run resumes only with the same file content. Every rank reads; only
    rank 0 writes, after the others have read.
    """
    saved = _read_json(run / "config.json")
    state = None
    pseudo = labels.record() if labels is not None else None
    if saved is not None and cfg.resume:
        diff = config_diff(saved.get("train", {}), asdict(cfg))
        before = (saved.get("pseudo") or {}).get("sha256")
        if before != (pseudo or {}).get("sha256"):
            diff.append(f"pseudo-label file sha256: {before} -> {(pseudo or {}).get('sha256')}")
        if diff:
            raise ValueError(
                f"{run} holds a run with another config ({'; '.join(diff)}): use another --out, "
                "or resume=False (--overwrite) to start it over"
            )
        if (run / "last.pt").exists():
            ckpt = read_checkpoint(run / "last.pt")
            rows = [r for r in _read_history(run / "history.csv") if r["epoch"] <= ckpt["epoch"]]
            state = (ckpt, rows)
    ctx.barrier()
    if ctx.rank == 0 and state is None:
        for name in ("history.csv", "best.pt", "last.pt"):
            (run / name).unlink(missing_ok=True)
        document = {"train": asdict(cfg), **({"pseudo": pseudo} if pseudo else {})}
        atomic.write_text(run / "config.json", json.dumps(document, indent=1))
    ctx.barrier()
    return state


# Flat names of run folders written before TrainConfig had sections -> dotted names.
_FLAT_NAMES = {
    **{n: f"data.{n}" for n in ("window", "scale", "min_mask_fraction", "min_tissue")},
    **{n: f"data.{n}" for n in ("tissue_share", "background_share", "mask_source")},
    "tile_overlap": "data.overlap", "overlap": "infer.overlap", "threshold": "infer.threshold",
    "tta": "infer.tta", "infer_batch_size": "infer.batch_size",
}  # fmt: skip


def config_diff(saved: dict, current: dict) -> list[str]:
    """``"field: saved -> current"`` for every field that differs (runtime fields aside, and
    the fitted ones: computed from the data, a checkpoint's are set where the config's are not).

    Fields of the sections are named with dots (``data.window``). A flat ``saved`` config (of
    an older kit) is compared on the fields it has.
    """
    flat = not isinstance(saved.get("data"), Mapping)
    saved = {_FLAT_NAMES.get(k, k) if flat else k: v for k, v in _dotted(saved).items()}
    current = _dotted(current)
    ignored = {*RUNTIME_FIELDS, *(f"infer.{name}" for name in FITTED_FIELDS)}
    keys = (set(saved) if flat else set(saved) | set(current)) - ignored
    missing = object()
    out = []
    for key in sorted(keys):
        a, b = saved.get(key, missing), current.get(key, missing)
        if isinstance(a, tuple | list) and isinstance(b, tuple | list):
            a, b = list(a), list(b)
        if a != b:
            out.append(
                f"{key}: {'(absent)' if a is missing else a!r} -> "
                f"{'(absent)' if b is missing else b!r}"
            )
    return out


def _dotted(config: Mapping, prefix: str = "") -> dict:
    """A nested config as one dict with dotted keys."""
    out = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def _read_history(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: (int(v) if k == "epoch" else float(v)) for k, v in r.items()} for r in rows]


def _write_history(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic.write_text(path, buf.getvalue())


# --------------------------------------------------------------------------- runtime


@dataclass
class _Distributed:
    """This process's place in a torchrun job (world 1 when run alone)."""

    rank: int
    world: int
    local_world: int  # the processes on this machine
    device: torch.device
    device_ids: list[int] | None
    owner: bool = False  # this start made the process group: its stop ends it
    # A gloo group beside an NCCL one, for waits and host tensors; None: the default group.
    host: dist.ProcessGroup | None = None

    @classmethod
    def start(cls, device: str | None) -> _Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        dev = rank_device(device, local, world)
        owner = world > 1 and not dist.is_initialized()
        if owner:
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            # Ranks wait for each other's share of the tile caches and of the held-out slides,
            # and for rank 0's checkpoints: allow for long waits.
            dist.init_process_group(
                "nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(hours=2)
            )
        ids = [dev.index] if dev.type == "cuda" else None
        host = None
        if world > 1 and dist.get_backend() != "gloo":
            # Every rank calls new_group, in the same order: each fit (and process_group) does.
            host = dist.new_group(backend="gloo", timeout=timedelta(hours=2))
        return cls(rank, world, local_world, dev, ids, owner, host)

    def barrier(self) -> None:
        """Wait for every rank. On a gloo group: its waits sleep, where NCCL's spin a CPU core
        (one of Kaggle's four) for as long as the slowest rank takes."""
        if self.world > 1:
            dist.barrier(group=self.host)

    def sum(self, counts: np.ndarray) -> np.ndarray:
        """int64 ``counts`` summed over the ranks (exact), through the host group."""
        if self.world == 1:
            return counts
        t = torch.from_numpy(np.ascontiguousarray(counts, dtype=np.int64))
        dist.all_reduce(t, group=self.host)
        return t.numpy()

    def mean(self, value: float) -> float:
        """Mean of ``value`` over ranks."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def share_buffers(self, model: torch.nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics), as saved in the checkpoints.

        DDP keeps the parameters equal, but each rank's last forward pass updates its own
        running statistics after DDP's broadcast.
        """
        if self.world > 1:
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)

    def from_rank0(self, value: float) -> float:
        """Rank 0's ``value`` on every rank."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(t, src=0)
        return float(t.item())

    def print(self, text: str) -> None:
        if self.rank == 0:
            print(text, flush=True)

    def stop(self) -> None:
        if self.owner and dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: str | None = None) -> Iterator[int]:
    """Hold torchrun's process group over several `fit` calls; yields this process's rank.

    Each `fit` otherwise starts the group and ends it, and starting it a second time in one
    torchrun job fails (seen with gloo: the ranks no longer connect). Inside, `fit` joins the
    group and leaves it open. Run alone, this starts nothing and yields 0.
    """
    ctx = _Distributed.start(device)
    try:
        yield ctx.rank
    finally:
        ctx.stop()


def _seed_epoch(seed: int, rank: int, epoch: int, sampler) -> None:
    """Make an epoch's randomness a function of (seed, rank, epoch) alone.

    Data order and augmentation (seeded per tile in this process, `kit.data.tile_loader`) then
    repeat exactly when a run is resumed, so a resumed run follows the same course as one that
    was never interrupted.
    """
    _seed_everything(seed * 1_000_003 + epoch * 1009 + rank)
    if sampler is not None:
        sampler.set_epoch(epoch)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
