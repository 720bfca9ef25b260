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
# # 03 · Offline submission
#
# Runs with the internet off, as Kaggle requires. Attach three inputs to the notebook: the
# competition, the wheels dataset (`python -m kit wheels`, see `wheels/README.md`) and the model
# dataset (`python -m kit export`). It predicts every id of `sample_submission.csv` slide by slide
# in bounded memory, writes `submission.csv`, checks it and shows one prediction. On the synthetic
# dataset with no trained weights around it trains a quick model first, and says so.

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

from kit import eda, plots
from kit.competition import Competition
from kit.device import default_device
from kit.ensemble import describe, find_model, load_predictor
from kit.env import KAGGLE_INPUT, environment
from kit.slides import Slide
from kit.submit import check_submission, read_submission, write_submission
from kit.train import fit, preset

# %% [markdown]
# ## Configuration

# %%
env = environment()
# A kit checkpoint, a run or cross-validation folder, or a model dataset from `kit export`
# (an ensemble.json with its members); None: the one model attached under the inputs.
WEIGHTS = None
TTA = not env.synthetic  # flip test-time augmentation: 4x the compute, usually +0.002-0.005 Dice
THRESHOLD = None  # None: the ensemble's out-of-fold threshold, else the model's validated one
# Windows per batch (4x as many through the model with TTA); None: the model's, 16 unless it was
# trained with another. Larger batches keep a GPU busier; on a 16 GB T4 the estimate for
# fcn_resnet50 at 256 px is ~1 GB per 16 windows with TTA (kit.infer.InferConfig.batch_size).
BATCH_SIZE = None
DEVICE = default_device()  # cuda when there is a GPU, else cpu
OUT = env.out_dir / "submission.csv"
FIGURES = env.out_dir / "figures" / "03_submission"
print(f"running on {env.kind} ({DEVICE}); data: {env.data_dir} ({env.data_source}); out: {OUT}")

# %% [markdown]
# ## The model

# %%
# Exactly the model named, or the one attached: several attached models are an error that
# lists them (set WEIGHTS). On the synthetic dataset, notebook 02's model, else a quick one.
weights = Path(WEIGHTS) if WEIGHTS else find_model([KAGGLE_INPUT])
notebook_02 = env.out_dir / "02_train" / "best.pt"
if weights is None and env.synthetic and notebook_02.is_file():
    weights = notebook_02
elif weights is None and env.synthetic:
    print("No trained weights found: training a quick model on the synthetic dataset first.")
    quick = preset("quick", data_dir=str(env.data_dir), out=str(env.out_dir / "03_quick_model"))
    weights = fit(quick)["best_path"]
elif weights is None:
    raise FileNotFoundError(
        f"no model under {KAGGLE_INPUT}: attach the model dataset made by `python -m kit "
        "export`, or set WEIGHTS to a kit checkpoint"
    )
model = load_predictor(
    [weights], device=DEVICE, tta=TTA, threshold=THRESHOLD, batch_size=BATCH_SIZE
)
print(describe(model))
cfg = model.cfg
cfg

# %% [markdown]
# ## Predict every listed slide and write `submission.csv`

# %%
write_submission(env.data_dir, model.predictor, OUT, cfg, fingerprint=model.fingerprint)
check_submission(OUT, env.data_dir)  # header, ids and order, every RLE valid for its slide
submission = read_submission(OUT)
submission.assign(predicted=submission["predicted"].str.slice(0, 60))

# %% [markdown]
# ## One prediction, on the slide's thumbnail

# %%
first = submission.iloc[0]
with Slide(Competition(env.data_dir).slide_path(first["id"])) as slide:
    scale = max(1, max(slide.shape) // 1500)
    thumb = slide.thumbnail(scale)
    mask = eda.mask_thumbnail(first["predicted"], slide.shape, scale) > 0.25
picture = plots.show_image(plots.overlay(thumb, mask, alpha=0.6), f"{first['id']}: prediction")
plots.show(picture, FIGURES / "prediction.png")

# %%
written = sorted(p.name for p in FIGURES.glob("*.png"))
assert written == ["prediction.png"], written
print(f"{OUT} holds {len(submission)} rows; figures: {', '.join(written)}")
