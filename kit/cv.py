"""Cross-validation: every fold of the grouped k-fold trained, scored out of fold, ensembled.

    python -m kit cv --data DIR --out runs/cv --preset full [--folds 4]
    torchrun --nproc_per_node 2 -m kit cv --data DIR --out runs/cv --preset full
    python -m kit predict --data DIR --weights runs/cv    # the fold ensemble at the OOF threshold

The cross-validation folder holds::

    fold0/ ... fold{K-1}/   ordinary run folders (kit.train.fit with fold=k, n_folds=K)
    tile-cache/             the folds' shared tile cache (unless cache_dir is set; on Kaggle
                            outside /kaggle/working, see kit.train.tile_cache_dir)
    oof.csv                 a row per training slide: the fold that held it out, its whole-slide
                            Dice at the config's threshold and at each threshold of the sweep;
                            then a mean row
    ensemble.json           every fold's best.pt (weight 1), the threshold of the best mean
                            out-of-fold Dice, the window and overlap (kit.ensemble)

Each slide is scored by the one model that never saw it, at full resolution through the
submission path (`kit.ensemble.load_predictor`, `kit.evaluate.evaluate_slides`), so the threshold
is tuned on predictions of unseen slides, all of them. Running the same command again after a
crash skips the finished folds and resumes the interrupted one from its last.pt (`fit` resumes);
the out-of-fold scores are computed again. Under torchrun every process trains each fold (DDP)
and rank 0 alone scores and writes.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd

from kit import atomic
from kit.checkpoint import CHECKPOINTS, read_checkpoint
from kit.competition import Competition
from kit.ensemble import MANIFEST, load_predictor, write_manifest
from kit.evaluate import (
    DEFAULT_THRESHOLDS,
    best_threshold,
    evaluate_slides,
    format_report,
    mean_dice,
)
from kit.pseudo import file_digest
from kit.train import TrainConfig, config_diff, fit, fold_setup, process_group, split

__all__ = ["OOF", "fold_config", "fold_dir", "fold_finished", "run_cv"]

OOF = "oof.csv"
# InferConfig fields that change how fast slides are scored, not the scores: the run's own.
_RUNTIME_INFER = ("batch_size", "workers", "prefetch")


def run_cv(cfg: TrainConfig, folds: int | None = None) -> pd.DataFrame | None:
    """Train every fold into ``cfg.out``/fold{k}, then write oof.csv and ensemble.json there.

    Args:
        cfg: the config every fold trains with; ``out`` is the cross-validation folder. Its
            ``fold`` is not used (each fold is held out in turn) and ``valid`` must be empty.
        folds: the number of folds; None: ``cfg.n_folds``, else train's default
            (`kit.train.fold_setup`: ``DEFAULT_FOLDS``, one per group when there are fewer).

    Returns:
        On rank 0, the out-of-fold table: one row per training slide, grouped by fold (``id``,
        ``fold``, ``dice``, ``dice@t`` per threshold, ``pred_px``, ``true_px``, ``both_px``,
        ``seconds``),
        as in oof.csv without its mean row; None on the other ranks of a torchrun job.

    Raises:
        ValueError: no training slides, ``valid`` ids given, fewer than 2 folds or more folds
            than groups (patients, or slides), or a fold folder holding a run of another config
            (named by `fit`; ``cfg.resume`` False starts every fold over).
    """
    held_out, notes = _plan(cfg, folds)
    n = len(held_out)
    with process_group(cfg.device) as rank:  # one for all folds: fit cannot start a second
        _say(rank, *notes)
        for k in range(n):
            fold_cfg = fold_config(cfg, k, n)
            if fold_finished(fold_cfg):
                _say(rank, f"fold {k} of {n}: finished in {fold_cfg.out}, skipped")
                continue
            _say(rank, f"fold {k} of {n}: training in {fold_cfg.out}")
            fit(fold_cfg)
    if rank != 0:
        return None
    table = _out_of_fold(cfg, held_out)
    threshold, dice = best_threshold(table)
    out = Path(cfg.out)
    _write_oof(out / OOF, table)
    members = [(fold_dir(out, k) / CHECKPOINTS["best"]).relative_to(out) for k in range(n)]
    write_manifest(
        out,
        [(path, 1.0) for path in members],
        threshold=threshold,
        window=cfg.infer.window,
        overlap=cfg.infer.overlap,
    )
    print(format_report(table))
    print(f"out-of-fold scores: {out / OOF}")
    print(
        f"the {n} folds at the out-of-fold threshold {threshold:g} (mean Dice {dice:.4f}): "
        f"{out / MANIFEST}"
    )
    return table


def fold_dir(out: str | os.PathLike, fold: int) -> Path:
    """The run folder of fold ``fold`` in the cross-validation folder ``out``."""
    return Path(out) / f"fold{fold}"


def fold_config(cfg: TrainConfig, fold: int, n_folds: int) -> TrainConfig:
    """The config of fold ``fold`` of ``n_folds``: ``cfg`` run into `fold_dir`.

    With ``cache_dir`` unset the folds share one tile cache, ``tile-cache`` in ``cfg.out`` (on
    Kaggle outside /kaggle/working: `kit.train.tile_cache_dir`).
    """
    out = str(fold_dir(cfg.out, fold))
    return replace(cfg, fold=fold, n_folds=n_folds, valid=[], out=out)


def fold_finished(cfg: TrainConfig) -> bool:
    """Whether ``cfg.out`` holds a finished run of ``cfg``: one that `fit` would not change.

    `fit` writes each epoch's history.csv, then best.pt (when the Dice improved), then last.pt:
    a last.pt of the final epoch is the last thing a finished run writes, and it records the
    config it was trained with. A run of another config is not finished (`fit` then refuses it,
    naming the fields), nor is any run when ``cfg.resume`` is False (it starts over), nor one
    whose pseudo-label file has changed since (config.json holds its digest).
    """
    run = Path(cfg.out)
    best, last = run / CHECKPOINTS["best"], run / CHECKPOINTS["last"]
    if not (cfg.resume and best.is_file() and last.is_file()):
        return False
    ckpt = read_checkpoint(last)
    if ckpt["epoch"] != cfg.epochs or config_diff(ckpt["config"], asdict(cfg)):
        return False
    if not cfg.pseudo:
        return True
    saved = json.loads((run / "config.json").read_text()).get("pseudo") or {}
    return Path(cfg.pseudo).is_file() and saved.get("sha256") == file_digest(cfg.pseudo)


def _plan(cfg: TrainConfig, folds: int | None) -> tuple[list[list[str]], list[str]]:
    """(the held-out slides of each fold, as `fit` holds them out; notes for the log)."""
    if cfg.valid:
        raise ValueError(
            f"cross-validation holds out each fold in turn: valid ids ({cfg.valid}) do not apply"
        )
    if folds is not None and (isinstance(folds, bool) or folds < 2):
        raise ValueError(f"folds must be an integer >= 2, got {folds!r}")
    comp = Competition(cfg.data_dir)
    ids = comp.train_ids
    if not ids:
        raise ValueError(f"{comp.root / 'train.csv'} lists no training slides")
    patients = comp.patients if cfg.group_by != "slide" else None
    folds = folds if folds is not None else cfg.n_folds
    n, _, notes = fold_setup(ids, folds, cfg.group_by, patients)
    try:
        return [split(fold_config(cfg, k, n))[1] for k in range(n)], notes
    except ValueError as err:  # more folds than groups
        raise ValueError(f"{n} folds of {len(ids)} training slides: {err}") from err


def _out_of_fold(cfg: TrainConfig, held_out: list[list[str]]) -> pd.DataFrame:
    """Each fold's best.pt, loaded as a submission loads it, scored on the slides it held out."""
    thresholds = sorted({*DEFAULT_THRESHOLDS, float(cfg.infer.threshold)})
    runtime = {name: getattr(cfg.infer, name) for name in _RUNTIME_INFER}
    tables = []
    for k, ids in enumerate(held_out):
        best = fold_dir(cfg.out, k) / CHECKPOINTS["best"]
        loaded = load_predictor([best], device=cfg.device, **runtime)
        table = evaluate_slides(
            cfg.data_dir, loaded.predictor, ids, loaded.cfg, thresholds, progress=cfg.progress
        )
        table.insert(1, "fold", k)
        tables.append(table)
    return pd.concat(tables, ignore_index=True)


def _write_oof(path: Path, table: pd.DataFrame) -> None:
    """oof.csv: the table, then a ``mean`` row of its Dice columns (the others left empty)."""
    rows = pd.concat([table, pd.DataFrame([{"id": "mean", **mean_dice(table)}])])
    counts = ["fold", "pred_px", "true_px", "both_px"]  # integers, with the mean row's empty cells
    rows[counts] = rows[counts].astype("Int64")
    atomic.write_text(path, rows.to_csv(index=False))


def _say(rank: int, *lines: str) -> None:
    if rank == 0:
        for line in lines:
            print(line, flush=True)
