# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Training with held-out-slide validation
#
# Builds the tile cache, shows augmented tiles, trains a torchvision segmentation model with
# BCE + Dice, and selects the model by whole-slide Dice on held-out slides computed at full
# resolution through the same path as the submission. On the competition data it trains every
# fold of the grouped k-fold (cross-validation, `kit.cv`) and tunes the threshold on the
# out-of-fold predictions of all slides; on the synthetic dataset one fold, with the quick
# settings (a small model, minutes on a CPU). Then a threshold sweep, an error map and the model
# (every fold, with cross-validation) exported as a Kaggle dataset for the offline submission
# notebook.

# %%
# Set-up: make `kit` importable. Locally and under pytest it already is; on Colab it is
# installed from the repository; on Kaggle (internet off) from the attached wheels dataset.
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO = "https://github.com/hubmap-kit/hubmap-kit"  # set in pyproject.toml; `make sync` copies it
if importlib.util.find_spec("kit") is None:
    if "google.colab" in sys.modules:
        pip = ["install", "-q", f"git+{REPO}"]
    else:
        root = Path(os.environ.get("KAGGLE_INPUT", "/kaggle/input"))
        wheels = sorted(root.glob("**/hubmap_kit-*.whl"))
        if not wheels:
            raise FileNotFoundError(f"kit is not installed and no hubmap_kit wheel is under {root}")
        pip = ["install", "-q", "--no-index", "--find-links", str(wheels[-1].parent), "hubmap-kit"]
    subprocess.run([sys.executable, "-m", "pip", *pip], check=True)
    importlib.invalidate_caches()
# Fail here, naming the module, if an installed dependency does not import (pip can succeed
# where an import then fails: a library built for another numpy, a missing shared library).
importlib.import_module("kit.env").check_imports()

# %%
import pandas as pd

from kit import eda, plots
from kit.checkpoint import export_model, load_model
from kit.competition import Competition
from kit.cv import fold_dir, run_cv
from kit.data import TileDataset, train_transforms
from kit.env import environment
from kit.evaluate import best_threshold, evaluate_slides, format_report
from kit.infer import config_from_checkpoint
from kit.slides import Slide
from kit.train import fit, preset, split, tile_caches

# %% [markdown]
# ## Configuration
#
# A `TrainConfig` preset: `full` (FCN-ResNet50, 1024 px windows seen at 256 px, for a GPU) on the
# competition data, `quick` on the synthetic dataset. Change fields with keyword arguments, e.g.
# `valid=["aaa6a05cc"]` to hold out given slides instead of fold `fold` of a grouped k-fold. The
# tile settings (`cfg.data`) and those of validation and submission (`cfg.infer`) are sections:
# change them with dicts, e.g. `data={"window": 512}` or `infer={"tta": True}`; window, scale and
# the tissue rule are set in `data` only (`infer` follows them).
#
# `FOLDS`: 1 trains fold 0 only (as `python -m kit train`); None trains every fold (as `python -m
# kit cv`; as many folds as train's default, 4 or one per patient when fewer), a number that many.

# %%
env = environment()
FOLDS = 1 if env.synthetic else None  # one fold on the synthetic data, for time
cfg = preset(
    "quick" if env.synthetic else "full",
    data_dir=str(env.data_dir),
    out=str(env.out_dir / "02_train"),
    cache_dir=str(env.scratch_dir / "tile-cache"),  # one for the pictures and every fold
    fold=0,  # hold out the slides of fold 0 (grouped by patient); pictured below
    n_folds=None if FOLDS == 1 else FOLDS,
    progress=True,
)
FIGURES = env.out_dir / "figures" / "02_train"
train_ids, valid_ids = split(cfg)
print(f"running on {env.kind}; data: {env.data_dir} ({env.data_source}); run: {cfg.out}")
print(f"train slides: {train_ids}\nheld-out slides: {valid_ids}")
cfg

# %% [markdown]
# ## The tile cache
#
# Windows are read from the TIFFs once, downscaled and stored as plain arrays; later runs reuse
# them and any change of slide, mask or tile setting rebuilds them.

# %%
caches = tile_caches(cfg, train_ids + valid_ids, progress=True)
tiles = TileDataset(caches[: len(train_ids)], train_transforms(seed=0))
tiles.index["kind"].value_counts()

# %% [markdown]
# ## Augmented training tiles (glomeruli in green)

# %%
samples = [tiles[i] for i in range(0, len(tiles), max(1, len(tiles) // 12))][:12]
pictures = [
    plots.overlay((img.permute(1, 2, 0).numpy() * 255).round().astype("uint8"), mask[0].numpy())
    for img, mask in samples
]
plots.show(plots.image_grid(pictures, ncols=6, size=2.2), FIGURES / "augmented_tiles.png")

# %% [markdown]
# ## Training
#
# Rerunning this cell after an interruption resumes from `last.pt`. With cross-validation, every
# fold trains into `fold{k}/` and each slide is then scored by the fold that held it out
# (`oof.csv`); finished folds are skipped on a rerun. The pictures below are fold 0's.

# %%
if FOLDS == 1:
    result = fit(cfg)
    print(f"held-out whole-slide Dice at the best epoch: {result['best_dice']:.4f}")
    run = Path(cfg.out)
else:
    oof = run_cv(cfg)  # prints the out-of-fold table and threshold, writes ensemble.json
    run = fold_dir(cfg.out, cfg.fold)

# %%
history = pd.read_csv(run / "history.csv")
plots.show(plots.plot_history(history), FIGURES / "history.png")
history

# %% [markdown]
# ## Whole-slide Dice on the held-out slides, and the threshold
#
# With cross-validation, of every slide out of fold (the ensemble's threshold is the best here).

# %%
model, checkpoint = load_model(run / "best.pt", device=cfg.device)  # None: GPU if any
infer_cfg = config_from_checkpoint(checkpoint)  # runs where the model is
# With cross-validation every slide is scored already: only the pictured one again, for its mask.
pictured = valid_ids if FOLDS == 1 else valid_ids[:1]
held_out = evaluate_slides(env.data_dir, model, pictured, infer_cfg, keep_rle=True)
scores = held_out.drop(columns="rle") if FOLDS == 1 else oof
print(format_report(scores))
sweep = scores[[c for c in scores.columns if c.startswith("dice@")]].mean()
thresholds = [float(c.removeprefix("dice@")) for c in sweep.index]
plots.show(plots.plot_sweep(thresholds, list(sweep), infer_cfg.threshold), FIGURES / "sweep.png")
best_t, best_dice = best_threshold(scores)
print(f"best threshold {best_t:g}: mean Dice {best_dice:.4f}")

# %% [markdown]
# ## Where the model is right and wrong: true positives green, false positives magenta,
# ## false negatives blue

# %%
slide_id = valid_ids[0]
comp = Competition(env.data_dir)
truth = comp.truth(slide_id)
with Slide(comp.slide_path(slide_id)) as slide:
    shape, scale = slide.shape, max(1, max(slide.shape) // 1500)
    thumb = slide.thumbnail(scale)
predicted = held_out.set_index("id").at[slide_id, "rle"]  # kept by evaluate: no second pass
errors = plots.error_overlay(
    thumb,
    eda.mask_thumbnail(predicted, shape, scale) > 0.5,
    eda.mask_thumbnail(truth, shape, scale) > 0.5,
)
plots.show(plots.show_image(errors, f"{slide_id} (held out)"), FIGURES / "errors.png")

# %% [markdown]
# ## Export the model for the offline submission notebook
#
# One checkpoint, or with cross-validation every fold and the `ensemble.json` that averages them
# at the out-of-fold threshold. Upload the folder with `kaggle datasets create -p <folder>` (see
# `wheels/README.md`).

# %%
export = export_model(cfg.out, env.out_dir / "02_model_dataset")
print(f"model dataset: {export}: {sorted(p.name for p in export.iterdir())}")

# %%
written = sorted(p.name for p in FIGURES.glob("*.png"))
expected = ["augmented_tiles.png", "errors.png", "history.png", "sweep.png"]
assert written == expected, written
print("figures:", ", ".join(written))
