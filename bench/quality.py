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

The recipes are `kit.train.preset` overrides (top-level fields, and ``data`` / ``infer``
sections merged field by field), so a later issue adds a recipe with one line.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd

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
    # the `cpu` preset (kit.train.PRESETS)
    "cpu": ("cpu", dict()),
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
    args = parser.parse_args(argv)
    data = args.data or default_dataset(profile="realistic")
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


if __name__ == "__main__":
    main()
