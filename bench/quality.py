"""Which training recipe is better? Held-out whole-slide Dice on held-out patients, over seeds.

    .venv/bin/python bench/quality.py                          # every recipe, 3 seeds
    .venv/bin/python bench/quality.py --recipes quick-1024 quick-256 --seeds 0 1 2 --epochs 8
    .venv/bin/python bench/quality.py --data DIR --fold 1      # another held-out patient group

Trains each recipe of RECIPES on the realistic synthetic profile (`kit.synthetic.default_dataset`
with ``profile="realistic"``: 8 slides, 6 train + 2 test, 5 patients; built once, ~2 minutes)
with the held-out slides of one patient fold (``group_by="patient"``: a held-out patient is a
stain shift), once per seed, and prints per recipe the held-out whole-slide Dice (the last
epoch's model through `kit.evaluate.evaluate_slides`, the submission path) as mean, spread
(sample standard deviation over seeds), min and max, with the mean wall time of a run.

What it takes on 2 CPU cores: a run of the ``quick-1024`` recipe (~200 training tiles of 256 px
an epoch) takes a few minutes; every recipe over 3 seeds is of the order of an hour. To show a
0.01 Dice difference above the seed spread, compare recipes on the same fold and seeds (the
differences are paired: the same held-out slides, the same data order) and add seeds until the
spread of the paired differences is below 0.01; the per-seed Dice are printed for that.

``--cv-ensemble RECIPE`` measures cross-validation and its ensemble instead: the held-out
patients' slides are set aside, `kit.cv.run_cv` trains every fold on the other training slides
(a view of the dataset without them), and the held-out slides are scored by each fold model and
by the fold ensemble (`kit.ensemble.load_predictor` on the cv folder: every fold, at the
out-of-fold threshold; and at the recipe's own threshold). It also recomputes each slide's
out-of-fold Dice from the fold checkpoints and prints the largest difference from oof.csv.
A seed of ``quick-1024`` with 4 epochs takes about 15 minutes on 2 cores.

The recipes are `kit.train.preset` overrides (top-level fields, and ``data`` / ``infer``
sections merged field by field), so a later issue adds a recipe with one line.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from kit.competition import Competition
from kit.synthetic import default_dataset
from kit.train import fit, preset

# name -> (preset, TrainConfig overrides). "quick" is the mini-profile preset (256/2 windows).
RECIPES = {
    # today's `full` window and scale (1024 px seen at 256 px) with the quick model
    "quick-1024": (
        "quick",
        dict(data=dict(window=1024, scale=4, overlap=256), infer=dict(overlap=256)),
    ),
    # today's quick settings unchanged: 256 px windows seen at 128 px
    "quick-256": ("quick", dict()),
    # as quick-1024 without the hard negatives (tissue windows with no glomerulus)
    "no-hard-negatives": (
        "quick",
        dict(
            data=dict(window=1024, scale=4, overlap=256, tissue_share=0.0),
            infer=dict(overlap=256),
        ),
    ),
    # as quick-1024, with the Lovász hinge added to BCE + Dice (the 1st place's loss)
    "lovasz": (
        "quick",
        dict(
            lovasz_weight=1.0,
            data=dict(window=1024, scale=4, overlap=256),
            infer=dict(overlap=256),
        ),
    ),
    # as quick-1024, validating and saving an exponential moving average of the weights
    "ema": (
        "quick",
        dict(ema=0.995, data=dict(window=1024, scale=4, overlap=256), infer=dict(overlap=256)),
    ),
    # the `cpu` preset (kit.train.PRESETS)
    "cpu": ("cpu", dict()),
    # as quick-1024, trained on crops drawn each epoch around glomeruli plus tissue and glass
    # negatives (kit.sampling) instead of the fixed grid; validation unchanged
    "centred": (
        "quick",
        dict(
            data=dict(window=1024, scale=4, overlap=256, sampling="centred"),
            infer=dict(overlap=256),
        ),
    ),
    # as centred, tissue crops weighted by region: cortex 0.7, medulla 0.2, elsewhere 0.1
    "cortex-weighted": (
        "quick",
        dict(
            data=dict(window=1024, scale=4, overlap=256, sampling="centred", region_weighting=True),
            infer=dict(overlap=256),
        ),
    ),
}


def run_recipe(name: str, data: Path, seed: int, fold: int, out: Path, epochs: int | None):
    """Train one recipe for one seed; returns ``(held-out whole-slide Dice, seconds)``."""
    base, overrides = RECIPES[name]
    overrides = {**overrides, **({"epochs": epochs} if epochs else {})}
    cfg = preset(base, **overrides)
    # validate only after the last epoch: the figure is the final model's, not a selected one
    cfg = preset(
        base,
        **overrides,
        data_dir=str(data),
        out=str(out / f"{name}-s{seed}"),
        cache_dir=str(out / "tile-cache"),
        group_by="patient",
        fold=fold,
        seed=seed,
        eval_every=cfg.epochs,
        resume=False,
        progress=False,
    )
    start = time.perf_counter()
    result = fit(cfg)
    return float(result["best_dice"]), time.perf_counter() - start


def subset_view(data: Path, keep: list[str], out: Path) -> Path:
    """A competition folder at ``out`` whose train.csv lists only ``keep`` (files symlinked)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("HuBMAP-20-dataset_information.csv", "sample_submission.csv", "test"):
        if (data / name).exists() and not (out / name).exists():
            (out / name).symlink_to((data / name).resolve())
    (out / "train").mkdir(exist_ok=True)
    for path in (data / "train").iterdir():
        if (
            path.name.split(".")[0].split("-")[0] in keep
            and not (out / "train" / path.name).exists()
        ):
            (out / "train" / path.name).symlink_to(path.resolve())
    comp = Competition(data)  # the one reader of the competition folder
    rows = [(i, comp.truth(i)) for i in comp.train_ids if i in keep]
    pd.DataFrame(rows, columns=["id", "encoding"]).to_csv(out / "train.csv", index=False)
    return out


def cv_ensemble(name: str, data: Path, seed: int, fold: int, out: Path, epochs: int | None):
    """Cross-validate ``name`` without the held-out patients of ``fold``, then score each fold
    model and their ensemble on those patients' slides. Returns a dict of the figures."""
    from kit.cv import fold_dir, run_cv
    from kit.ensemble import load_predictor
    from kit.evaluate import evaluate_slides, mean_dice
    from kit.train import split

    base, overrides = RECIPES[name]
    overrides = {**overrides, **({"epochs": epochs} if epochs else {})}
    probe = preset(base, **overrides, data_dir=str(data), group_by="patient", fold=fold)
    train_ids, held_out = split(probe)
    view = subset_view(data, train_ids, out / f"view-f{fold}")
    run = out / f"cv-{name}-s{seed}"
    cfg = preset(
        base, **overrides, data_dir=str(view), out=str(run), cache_dir=str(out / "tile-cache"),
        group_by="patient", seed=seed, eval_every=probe.epochs, resume=True, progress=False,
    )  # fmt: skip
    start = time.perf_counter()
    oof = run_cv(cfg)
    seconds = time.perf_counter() - start
    members, recomputed = [], []
    for k in sorted(oof["fold"].unique()):
        loaded = load_predictor([fold_dir(run, k) / "best.pt"])
        scores = evaluate_slides(data, loaded.predictor, held_out, loaded.cfg, progress=False)
        members.append(float(mean_dice(scores)["dice"]))
        own = oof[oof["fold"] == k]
        again = evaluate_slides(
            view, loaded.predictor, own["id"].tolist(), loaded.cfg, progress=False
        )
        recomputed.append(float(np.abs(again["dice"].to_numpy() - own["dice"].to_numpy()).max()))
    ensemble = load_predictor([run])
    tuned = evaluate_slides(data, ensemble.predictor, held_out, ensemble.cfg, progress=False)
    at_own = replace(ensemble.cfg, threshold=probe.infer.threshold)
    plain = evaluate_slides(data, ensemble.predictor, held_out, at_own, progress=False)
    return {
        "recipe": name, "seed": seed, "folds": len(members), "members": members,
        "member_mean": sum(members) / len(members), "ensemble": float(mean_dice(tuned)["dice"]),
        "oof_threshold": ensemble.cfg.threshold, "ensemble_at_own_threshold":
        float(mean_dice(plain)["dice"]), "oof_mean": float(oof["dice"].mean()),
        "oof_recompute_max_diff": max(recomputed), "seconds": seconds,
    }  # fmt: skip


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """Per recipe: ``mean, std`` (over seeds, ddof 1), ``min, max, seeds`` and ``seconds``."""
    grouped = rows.groupby("recipe", sort=False)
    table = grouped["dice"].agg(["mean", "std", "min", "max", "count"])
    table["seconds"] = grouped["seconds"].mean()
    table["per seed"] = grouped["dice"].agg(lambda d: " ".join(f"{v:.4f}" for v in d))
    return table.rename(columns={"count": "seeds"}).round(4)


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, help="default: the realistic synthetic dataset")
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fold", type=int, default=0, help="held-out patient fold")
    parser.add_argument("--epochs", type=int, help="override every recipe's epochs")
    parser.add_argument("--out", type=Path, help="run folders (default: a temporary folder)")
    parser.add_argument("--cv-ensemble", choices=list(RECIPES), help="cross-validation mode")
    args = parser.parse_args(argv)
    data = args.data or default_dataset(profile="realistic")
    if args.cv_ensemble:
        return main_cv(args, data)
    with tempfile.TemporaryDirectory(prefix="quality-") as tmp:
        out = args.out or Path(tmp)
        rows = []
        for name in args.recipes:
            for seed in args.seeds:
                dice, seconds = run_recipe(name, data, seed, args.fold, out, args.epochs)
                rows.append({"recipe": name, "seed": seed, "dice": dice, "seconds": seconds})
                print(f"{name} seed {seed}: dice {dice:.4f} in {seconds:.0f} s", flush=True)
    table = summarise(pd.DataFrame(rows))
    print(f"\nheld-out whole-slide Dice, {data}, fold {args.fold}, seeds {args.seeds}")
    print(table.to_string())
    return table


def main_cv(args, data: Path) -> pd.DataFrame:
    with tempfile.TemporaryDirectory(prefix="quality-cv-") as tmp:
        out = args.out or Path(tmp)
        rows = []
        for seed in args.seeds:
            row = cv_ensemble(args.cv_ensemble, data, seed, args.fold, out, args.epochs)
            rows.append(row)
            members = " ".join(f"{d:.4f}" for d in row["members"])
            print(
                f"{row['recipe']} seed {seed}: held-out Dice of the {row['folds']} fold models "
                f"{members} (mean {row['member_mean']:.4f}); their ensemble {row['ensemble']:.4f} "
                f"at the out-of-fold threshold {row['oof_threshold']:g}, "
                f"{row['ensemble_at_own_threshold']:.4f} at the recipe's; out-of-fold mean "
                f"{row['oof_mean']:.4f}, recomputed from the checkpoints within "
                f"{row['oof_recompute_max_diff']:.1e}; {row['seconds']:.0f} s",
                flush=True,
            )
    table = pd.DataFrame(rows).drop(columns=["members"]).round(4)
    print(f"\ncross-validation and ensemble, held-out patients of fold {args.fold}, {data}")
    print(table.to_string(index=False))
    return table


if __name__ == "__main__":
    main()
