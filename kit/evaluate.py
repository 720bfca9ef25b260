"""Per-slide Dice of a predictor on training slides, at full resolution, as the competition scores.

    scores = evaluate_slides("data/synthetic", model, cfg=InferConfig(scale=2))
    scores                   # one row per slide: id, dice, dice@0.3 ... dice@0.7, pixel counts
    mean_dice(scores)        # the competition's score: the mean over slides of each Dice column
    best_threshold(scores)   # (threshold, mean Dice) of the best column
    print(format_report(scores))

Predictions go through `kit.infer.iter_probability_strips`, the path submissions take (each
slide opened once), and are compared strip by strip with the truth decoded from ``train.csv``
for the same columns (`kit.rle.decode_columns`): neither the probabilities nor the truth of a
whole slide is ever held. The counts are accumulated by `kit.metrics.ThresholdSweep`, so each
slide's Dice is computed once from its totals.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from kit.competition import Competition
from kit.infer import InferConfig, OnProgress, Predictor, iter_probability_strips, resolve_config
from kit.metrics import ThresholdSweep
from kit.progress import tile_bar
from kit.rle import RleEncoder, decode_columns, parse
from kit.slides import Slide

__all__ = ["DEFAULT_THRESHOLDS", "best_threshold", "evaluate_slides", "format_report", "mean_dice"]

DEFAULT_THRESHOLDS = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7)


def evaluate_slides(
    data_dir: str | os.PathLike,
    predictor: Predictor,
    ids: Sequence[str] | None = None,
    cfg: InferConfig | None = None,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    *,
    progress: bool | None = None,
    keep_rle: bool = False,
) -> pd.DataFrame:
    """Dice of each training slide's full-resolution prediction against ``train.csv``.

    Args:
        data_dir: the competition folder: ``train.csv`` (id,encoding) and ``train/{id}.tiff``.
        predictor: float (N, 3, h, w) RGB in [0, 1] -> logits (N, 1, h, w).
        ids: the slides to score, in this order; default every id of train.csv.
        cfg: the `InferConfig`; its ``threshold`` gives the ``dice`` column.
        thresholds: more thresholds to score (``prob > t``), one ``dice@t`` column each.
        progress: a bar over each slide's tiles, ``evaluate {id} ({i}/{n})``; None: on a
            terminal or in Jupyter, never into a log file (`kit.progress.show_progress`).
        keep_rle: also return each slide's predicted mask at ``cfg.threshold`` as an RLE (an
            ``rle`` column), so pictures of the prediction need no second inference pass.

    Returns:
        One row per slide: ``id``, ``dice`` (at ``cfg.threshold``), ``dice@t`` per threshold,
        ``pred_px``, ``true_px`` and ``both_px`` (foreground pixels at ``cfg.threshold``, in the
        truth, in both: ``dice`` is `kit.metrics.dice_from_counts` of them), ``seconds`` (and
        ``rle`` with ``keep_rle``).

    Raises:
        ValueError: an id not in train.csv (named), or repeated ids.
        FileNotFoundError: train.csv or a slide's TIFF is missing.
    """
    cfg = resolve_config(cfg)
    data_dir = Path(data_dir)
    comp = Competition(data_dir)
    ids = comp.train_ids if ids is None else [str(i) for i in ids]
    unknown = [i for i in ids if i not in set(comp.train_ids)]
    if unknown:
        raise ValueError(f"id(s) not in {data_dir / 'train.csv'}: {', '.join(unknown)}")
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise ValueError(f"repeated id(s): {', '.join(repeated)}")
    paths = comp.slide_paths(ids)
    truth = {i: comp.truth(i) for i in ids}
    keep = {i: comp.cortex(i) if cfg.cortex_only else None for i in ids}

    extra = list(dict.fromkeys(float(t) for t in thresholds))
    rows = []
    for i, slide_id in enumerate(ids, 1):
        with tile_bar(f"evaluate {slide_id} ({i}/{len(ids)})", progress) as advance:
            row = _score_slide(
                paths[slide_id], truth[slide_id], predictor, cfg, extra, keep_rle, advance,
                keep[slide_id],
            )  # fmt: skip
        rows.append({"id": slide_id, **row})
    return pd.DataFrame(rows, columns=_columns(extra) + (["rle"] if keep_rle else []))


def mean_dice(scores: pd.DataFrame) -> pd.Series:
    """Mean over slides of every Dice column: the competition's score is the ``dice`` entry."""
    return scores[[c for c in scores.columns if c.startswith("dice")]].mean()


def best_threshold(scores: pd.DataFrame) -> tuple[float, float]:
    """(threshold, mean Dice) of the ``dice@t`` column with the highest mean over slides."""
    means = mean_dice(scores).drop("dice")
    if means.empty:
        raise ValueError("scores have no dice@t columns")
    best = means.idxmax()
    return float(best.removeprefix("dice@")), float(means[best])


def format_report(scores: pd.DataFrame) -> str:
    """The per-slide table with a ``mean`` row, the competition's score and the best threshold."""
    dice_columns = [c for c in scores.columns if c.startswith("dice")]
    means = mean_dice(scores)
    table = scores.astype(object)
    table.loc[len(table)] = {"id": "mean", **means.to_dict()}
    for column in dice_columns:
        table[column] = [f"{v:.4f}" for v in table[column]]
    lines = [
        table.fillna("").to_string(index=False),
        f"score (mean Dice over {len(scores)} slides): {means.get('dice', float('nan')):.4f}",
    ]
    if len(dice_columns) > 1 and len(scores):
        threshold, best = best_threshold(scores)
        lines.append(f"best threshold: {threshold:g} (mean Dice {best:.4f})")
    return "\n".join(lines)


def _score_slide(
    path: Path,
    rle: str,
    predictor: Predictor,
    cfg: InferConfig,
    thresholds: Sequence[float],
    keep_rle: bool,
    on_progress: OnProgress | None,
    keep: list | None = None,
) -> dict:
    """One slide's row of `evaluate_slides` (without its id): the slide is opened once, and its
    probability strips go to two sinks, a threshold sweep and (``keep_rle``) an RLE encoder."""
    start = time.perf_counter()
    with Slide(path) as slide:
        shape = slide.shape
        try:
            runs = parse(rle, shape)  # once, and before predicting, so an error names the slide
        except ValueError as e:
            raise ValueError(f"train.csv encoding of {path.stem} (shape {shape}): {e}") from e
        sweep = ThresholdSweep(sorted({*thresholds, float(cfg.threshold)}))
        encoder = RleEncoder(shape[0]) if keep_rle else None
        strips = iter_probability_strips(slide, predictor, cfg, on_progress=on_progress, keep=keep)
        for cols, probs in strips:
            sweep.update(probs, decode_columns(runs, shape, cols))
            if encoder is not None:
                encoder.add(probs > cfg.threshold)
    scores = sweep.compute()
    at = sweep.thresholds.index(float(cfg.threshold))
    return {
        "dice": scores[float(cfg.threshold)],
        **{f"dice@{t:g}": scores[t] for t in thresholds},
        "pred_px": int(sweep.pred_sum[at]),
        "true_px": int(sweep.target_sum),
        "both_px": int(sweep.intersection[at]),
        "seconds": round(time.perf_counter() - start, 2),
        **({"rle": encoder.finish()} if encoder else {}),
    }


def _columns(thresholds: Sequence[float]) -> list[str]:
    dice = ["dice", *(f"dice@{t:g}" for t in thresholds)]
    return ["id", *dice, "pred_px", "true_px", "both_px", "seconds"]
