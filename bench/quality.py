"""Which training recipe is better? Held-out whole-slide Dice on held-out patients, over seeds.

    .venv/bin/python bench/quality.py                          # DEFAULT_RECIPES, 3 seeds
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

With ``--out DIR`` every finished (recipe, seed) is appended to DIR/results.csv with a digest of
its config, and a later run with the same DIR reuses those rows instead of training again: a long
table can be built over several sessions, or by processes on disjoint recipes, each with its own
DIR (two processes must not share one results.csv). ``--report DIR [DIR ...]`` trains nothing and
prints the table of the rows those folders hold. The ``vs cpu`` column is the mean (± sd) of a
recipe's Dice minus the ``cpu`` row's on the same seed, over the seeds both have.

The table of issue 14, measured on one H200 (bf16 autocast, every recipe and seed its own
process, 12 at once: its seconds are not a speed figure), is committed: ``--report
bench/results/quality-h200 --cortex-filter`` prints it here (rows are keyed by a digest of the
config with the dataset and pseudo-label file by name, not path).

``--cortex-filter`` scores every trained model a second time with ``InferConfig.cortex_only``
(predictions outside the slide's Cortex polygons zeroed) as a ``RECIPE+cortex-filter`` row: the
same model, so the difference from the recipe's row is the filter's alone, at the cost of one
more whole-slide evaluation instead of a training run.

``--cv-ensemble RECIPE`` measures cross-validation and its ensemble instead: the held-out
patients' slides are set aside, `kit.cv.run_cv` trains every fold on the other training slides
(a view of the dataset without them), and the held-out slides are scored by each fold model and
by the fold ensemble (`kit.ensemble.load_predictor` on the cv folder: every fold, at the
out-of-fold threshold; and at the recipe's own threshold). It also recomputes each slide's
out-of-fold Dice from the fold checkpoints and prints the largest difference from oof.csv.
A seed of ``quick-1024`` with 4 epochs takes about 15 minutes on 2 cores.

The ``pseudo`` recipe is the ``cpu`` recipe (the grid baseline, GRID) plus pseudo-labels
(`kit.pseudo`, ``--pseudo``): the ``cpu`` model of the same seed (trained first when ``--out``
does not hold it) predicts the test slides through the submission path, and that CSV's masks join
the training slides. By hand, with the ``cpu`` preset as shipped (kit.train.RECIPE)::

    python -m kit train --data DIR --out runs/r1 --preset cpu --fold 0 --seed 0
    python -m kit predict --data DIR --weights runs/r1/best.pt --out runs/r1/submission.csv
    python -m kit train --data DIR --out runs/r2 --preset cpu --fold 0 --seed 0 \
        --pseudo runs/r1/submission.csv

The recipes are `kit.train.preset` overrides (top-level fields, and ``data`` / ``infer``
sections merged field by field), so a later issue adds a recipe with one line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd

from kit.atomic import write_text
from kit.competition import Competition
from kit.synthetic import default_dataset
from kit.train import RECIPE, TrainConfig, fit, merge_config, preset


def defaults_of(recipe: dict) -> dict:
    """The TrainConfig defaults of the fields ``recipe`` sets (``data`` / ``infer`` by field)."""
    base = TrainConfig()
    return {
        key: {f: getattr(getattr(base, key), f) for f in value}
        if isinstance(value, dict)
        else getattr(base, key)
        for key, value in recipe.items()
    }


# The baseline of the issue-14 recipes: the `cpu` preset's network and schedule with every field
# of kit.train.RECIPE (which the quality table below made the `cpu` and `full` presets' recipe)
# at its default: the fixed grid, BCE + Dice, no stain normalisation, no cortex filter.
GRID = defaults_of(RECIPE)


def on_grid(**change) -> dict:
    """GRID with ``change`` (``data`` / ``infer`` dicts merged field by field)."""
    return merge_config(GRID, change)


# The `best` recipe: RECIPE scored without the cortex filter (--cortex-filter scores it with).
RECIPES_BEST = merge_config(RECIPE, dict(infer=dict(cortex_only=False)))

# name -> (preset, TrainConfig overrides); ``data`` / ``infer`` overrides are merged field by field.
# The issue-14 recipes are each GRID with one change, so their rows compare with the "cpu" row
# (the grid baseline), paired by seed.
RECIPES = {
    # the quick model at the `full` window and scale (1024 px seen at 256 px), 12 epochs
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
    # the `cpu` preset: the fixed grid of tiles, BCE + Dice (the baseline of the rows below)
    "cpu": ("cpu", on_grid()),
    # crops drawn each epoch around glomeruli plus tissue and glass negatives (kit.sampling)
    # instead of the fixed grid; validation unchanged
    "centred": ("cpu", on_grid(data=dict(sampling="centred"))),
    # as centred, tissue crops weighted by region: cortex 0.7, medulla 0.2, elsewhere 0.1
    "cortex-weighted": (
        "cpu",
        on_grid(data=dict(sampling="centred", region_weighting=True)),
    ),
    # smp's U-Net on a ResNet-34 encoder (kit.unet), randomly initialised: no ImageNet weights
    # are at hand here (pass pretrained="auto" where resnet34-b627a593.pth is)
    "unet-resnet34": ("cpu", on_grid(model="unet_resnet34")),
    # the same on ResNet-18: a U-Net whose 3 seeds fit a CPU session
    "unet-resnet18": ("cpu", on_grid(model="unet_resnet18")),
    # each slide's tissue colours mapped onto the training slides' mean (kit.stain: Reinhard
    # in LAB, per-slide statistics from the thumbnail)
    "stain-norm": ("cpu", on_grid(data=dict(stain_norm="reinhard"))),
    # albumentations' HEStain (stain-space colour jitter) on half the tiles
    "stain-aug": ("cpu", on_grid(stain_augment=0.5)),
    # the Lovász hinge (over the tiles with glomeruli) added to BCE + Dice (the 1st place's loss)
    "lovasz": ("cpu", on_grid(lovasz_weight=1.0)),
    # validating and saving an exponential moving average of the weights (the 2nd place's 0.995)
    "ema": ("cpu", on_grid(ema=0.995)),
    # the changes that beat the grid baseline on seed 0, together: cortex-weighted centred crops,
    # Reinhard stain normalisation and the Lovász hinge (GRID with those three changes, which is
    # now the `cpu` preset itself scored without the cortex filter: its +cortex-filter row is the
    # preset as shipped)
    "best": ("cpu", on_grid(**RECIPES_BEST)),
    # the cpu recipe plus the test slides, labelled by the cpu model of the same seed (PSEUDO)
    "pseudo": ("cpu", on_grid()),
    # the best recipe plus the test slides, labelled by the best model of the same seed: do
    # pseudo-labels add to the recipe the presets ship?
    "best-pseudo": ("cpu", on_grid(**RECIPES_BEST)),
    # GPU scale (35 epochs of batch 16; hours on a CPU): the `full` preset's FCN-ResNet50 against
    # a U-Net on ResNet-34, each from the local weight files `pretrained="auto"` finds
    "full": ("full", dict()),
    "full-unet-resnet34": ("full", dict(model="unet_resnet34")),
}
# what a run without --recipes compares: the cpu-scale recipes of issue 14
DEFAULT_RECIPES = [
    "cpu", "centred", "cortex-weighted", "unet-resnet18", "stain-norm", "stain-aug", "lovasz",
    "ema", "pseudo", "best", "best-pseudo",
]  # fmt: skip
# recipe -> the recipe whose model (same seed) labels the test slides it trains on
PSEUDO = {"pseudo": "cpu", "best-pseudo": "best"}


def recipe_config(name: str, data: Path, seed: int, fold: int, out: Path, epochs: int | None):
    """The TrainConfig of one run of recipe ``name``."""
    base, overrides = RECIPES[name]
    overrides = {**overrides, **({"epochs": epochs} if epochs else {})}
    if name in PSEUDO:
        overrides["pseudo"] = str(pseudo_csv(name, seed, out))
    epochs = preset(base, **overrides).epochs
    # validate only after the last epoch: the figure is the final model's, not a selected one
    return preset(
        base,
        **overrides,
        data_dir=str(data),
        out=str(out / f"{name}-s{seed}"),
        cache_dir=str(out / "tile-cache"),
        group_by="patient",
        fold=fold,
        seed=seed,
        eval_every=epochs,
        resume=False,
        progress=False,
    )


def config_digest(cfg) -> str:
    """What a run's result depends on: its config without the folders it writes to, the dataset
    and the pseudo-label file by name only (the dataset folder's name carries its version), so
    that rows measured on another machine (bench/results) are found where the paths differ."""
    fields = {k: v for k, v in asdict(cfg).items() if k not in ("out", "cache_dir", "progress")}
    fields["data_dir"] = Path(cfg.data_dir).name
    fields["pseudo"] = Path(cfg.pseudo).name if cfg.pseudo else ""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def pseudo_csv(name: str, seed: int, out: Path) -> Path:
    """Where the test-slide labels of pseudo-label recipe ``name`` and ``seed`` are written."""
    return out / f"{name}-s{seed}-labels.csv"


def label_test_slides(name: str, seed: int, data: Path, out: Path, args) -> Path:
    """The submission CSV made by the ``PSEUDO[name]`` run of ``seed`` in ``out`` (trained
    first when absent): the pseudo-labels of recipe ``name``."""
    from kit.ensemble import load_predictor
    from kit.submit import write_submission

    csv, checkpoint = pseudo_csv(name, seed, out), out / f"{PSEUDO[name]}-s{seed}" / "best.pt"
    if not checkpoint.exists():
        run_recipe(PSEUDO[name], data, seed, args.fold, out, args.epochs)
    if not csv.exists():
        loaded = load_predictor([checkpoint])
        write_submission(data, loaded.predictor, csv, loaded.cfg, progress=False)
    return csv


def run_recipe(name: str, data: Path, seed: int, fold: int, out: Path, epochs: int | None):
    """Train one recipe for one seed: ``(held-out whole-slide Dice, seconds, fit's result)``."""
    cfg = recipe_config(name, data, seed, fold, out, epochs)
    start = time.perf_counter()
    result = fit(cfg)
    return float(result["best_dice"]), time.perf_counter() - start, result


def cortex_filtered(result: dict, data: Path) -> float:
    """Held-out whole-slide Dice of the run's model again, predictions outside the Cortex zeroed.

    The same model as the recipe's own row: the difference is the filter's alone (paired)."""
    from kit.ensemble import load_predictor
    from kit.evaluate import evaluate_slides, mean_dice

    loaded = load_predictor([result["best_path"]])
    cfg = replace(loaded.cfg, cortex_only=True)
    scores = evaluate_slides(data, loaded.predictor, result["valid_ids"], cfg, progress=False)
    return float(mean_dice(scores)["dice"])


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
    view = Competition(data).subset(train_ids, out / f"view-f{fold}").root
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


def summarise(rows: pd.DataFrame, baseline: str = "cpu") -> pd.DataFrame:
    """Per recipe: ``mean, std`` (over seeds, ddof 1), ``min, max, seeds``, ``seconds``, and
    ``vs BASELINE``: the mean and sd of its Dice minus the baseline's on the same seed (paired:
    the same held-out slides and data order), over the seeds both have."""
    grouped = rows.groupby("recipe", sort=False)
    table = grouped["dice"].agg(["mean", "std", "min", "max", "count"])
    table["seconds"] = grouped["seconds"].mean()
    table["per seed"] = grouped["dice"].agg(lambda d: " ".join(f"{v:.4f}" for v in d))
    base = rows[rows["recipe"] == baseline].set_index("seed")["dice"]
    if not base.empty:
        table[f"vs {baseline}"] = grouped.apply(lambda g: _paired(g, base), include_groups=False)
    return table.rename(columns={"count": "seeds"}).round(4)


def _paired(group: pd.DataFrame, base: pd.Series) -> str:
    diff = (group.set_index("seed")["dice"] - base).dropna()
    if diff.empty:
        return ""
    sd = f" ± {diff.std():.4f}" if len(diff) > 1 else ""
    return f"{diff.mean():+.4f}{sd} ({len(diff)})"


def report(args, data: Path) -> pd.DataFrame:
    """The rows of ``args.recipes`` x ``args.seeds`` found in the results.csv of the folders of
    ``--report`` (each row with its own folder's config digest), without training anything."""
    rows, missing = [], []
    for name in args.recipes:
        for seed in args.seeds:
            wanted = [name, *([f"{name}+cortex-filter"] if args.cortex_filter else [])]
            for recipe in wanted:
                found = None
                for out in args.report:
                    digest = config_digest(recipe_config(name, data, seed, args.fold, out, None))
                    found = found or Results(out / "results.csv").get(recipe, digest)
                if found is None:
                    missing.append(f"{recipe} seed {seed}")
                else:
                    rows.append(found)
    if missing:
        print("not in", " ".join(map(str, args.report)) + ":", ", ".join(missing))
    return pd.DataFrame(rows, columns=Results.COLUMNS)


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, help="default: the realistic synthetic dataset")
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=DEFAULT_RECIPES)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fold", type=int, default=0, help="held-out patient fold")
    parser.add_argument("--epochs", type=int, help="override every recipe's epochs")
    parser.add_argument("--out", type=Path, help="run folders (default: a temporary folder)")
    parser.add_argument("--cv-ensemble", choices=list(RECIPES), help="cross-validation mode")
    parser.add_argument(
        "--cortex-filter",
        action="store_true",
        help="also score each trained model with InferConfig.cortex_only (a '+cortex-filter' row)",
    )
    parser.add_argument(
        "--report",
        type=Path,
        nargs="+",
        metavar="DIR",
        help="train nothing: the table of the rows already in these --out folders' results.csv",
    )
    args = parser.parse_args(argv)
    data = args.data or default_dataset(profile="realistic")
    if args.cv_ensemble:
        return main_cv(args, data)
    if args.report:
        rows = report(args, data)
    else:
        with tempfile.TemporaryDirectory(prefix="quality-") as tmp:
            out = args.out or Path(tmp)
            results = Results(out / "results.csv")
            rows = []
            for name in args.recipes:
                for seed in args.seeds:
                    rows += run_or_reuse(name, seed, data, out, results, args)
        rows = pd.DataFrame(rows)
    table = summarise(rows)
    print(f"\nheld-out whole-slide Dice, {data}, fold {args.fold}, seeds {args.seeds}")
    print(table.to_string())
    return table


class Results:
    """The rows of finished runs in ``--out``/results.csv, so an interrupted or extended table
    (more recipes, more seeds) reruns only what is missing. A row is reused only for the same
    config digest (recipe definition, seed, fold, epochs, data folder)."""

    COLUMNS = ["recipe", "seed", "dice", "seconds", "digest"]

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows = (
            pd.read_csv(path, dtype={"digest": str})
            if path.exists()
            else pd.DataFrame(columns=self.COLUMNS)
        )

    def get(self, recipe: str, digest: str) -> dict | None:
        hit = self.rows[(self.rows["recipe"] == recipe) & (self.rows["digest"] == digest)]
        return None if hit.empty else hit.iloc[-1].to_dict()

    def add(self, row: dict) -> None:
        new = pd.DataFrame([row])
        self.rows = new if self.rows.empty else pd.concat([self.rows, new], ignore_index=True)
        write_text(self.path, self.rows.to_csv(index=False))


def run_or_reuse(name: str, seed: int, data: Path, out: Path, results: Results, args) -> list:
    """The rows of one (recipe, seed): from results.csv when there, else trained and scored."""
    digest = config_digest(recipe_config(name, data, seed, args.fold, out, args.epochs))
    wanted = [name, *([f"{name}+cortex-filter"] if args.cortex_filter else [])]
    found = [results.get(recipe, digest) for recipe in wanted]
    if all(found):
        for row in found:
            print(f"{row['recipe']} seed {seed}: dice {row['dice']:.4f} (results.csv)")
        return found
    if name in PSEUDO:
        label_test_slides(name, seed, data, out, args)
    dice, seconds, result = run_recipe(name, data, seed, args.fold, out, args.epochs)
    rows = [{"recipe": name, "seed": seed, "dice": dice, "seconds": seconds, "digest": digest}]
    print(f"{name} seed {seed}: dice {dice:.4f} in {seconds:.0f} s", flush=True)
    if args.cortex_filter:
        start = time.perf_counter()
        dice = cortex_filtered(result, data)
        rows.append({"recipe": f"{name}+cortex-filter", "seed": seed, "dice": dice,
                     "seconds": time.perf_counter() - start, "digest": digest})  # fmt: skip
        print(f"{name}+cortex-filter seed {seed}: dice {dice:.4f}", flush=True)
    for row in rows:
        results.add(row)
    return rows


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
