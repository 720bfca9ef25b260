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
# # 01 · Exploring the HuBMAP slides
#
# What the data looks like before we train on it: slide sizes and layouts, patients, how many
# glomeruli and how much of each slide they cover, tissue and colour, glomerulus sizes, and how
# many training windows would contain a glomerulus. Runs on Kaggle, Colab or locally; with no
# competition data at hand it uses the kit's synthetic dataset (same layout, smaller slides).

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
from kit.competition import Competition
from kit.data import DataConfig, index_slide, mask_source
from kit.env import environment
from kit.rle import parse
from kit.slides import Slide

# %% [markdown]
# ## Configuration

# %%
env = environment()
THUMB_SCALE = 8 if env.synthetic else 32  # overview downscale factor
WINDOW, SCALE = (512, 4) if env.synthetic else (1024, 4)  # the training tiles' settings
ZOOM = 384 if env.synthetic else 768  # side of the full-resolution zooms
FIGURES = env.out_dir / "figures" / "01_eda"
print(f"running on {env.kind}; data: {env.data_dir} ({env.data_source}); figures: {FIGURES}")

# %% [markdown]
# ## The slides

# %%
table = eda.slide_table(env.data_dir, thumb_scale=THUMB_SCALE)
table

# %%
comp = Competition(env.data_dir)
train_ids = comp.train_ids
shapes = {r.id: (r.height, r.width) for r in table.itertuples()}

# %% [markdown]
# ## Thumbnails with the glomeruli overlaid (green)

# %%
overviews, titles = [], []
for slide_id in train_ids[:6]:
    with Slide(comp.slide_path(slide_id)) as slide:
        thumb = slide.thumbnail(THUMB_SCALE)
    mask = eda.mask_thumbnail(comp.truth(slide_id), shapes[slide_id], THUMB_SCALE) > 0.25
    overviews.append(plots.overlay(thumb, mask, alpha=0.6))
    titles.append(f"{slide_id} {shapes[slide_id][0]}x{shapes[slide_id][1]}")
plots.show(plots.image_grid(overviews, titles, ncols=3, size=4), FIGURES / "thumbnails.png")

# %% [markdown]
# ## Full-resolution zooms on glomeruli

# %%
zoom_id = train_ids[0]
runs = parse(comp.truth(zoom_id), shapes[zoom_id])
zooms = []
with Slide(comp.slide_path(zoom_id)) as slide:
    for rows, cols in eda.glomerulus_windows(env.data_dir, zoom_id, size=ZOOM, n=4):
        mask = eda.mask_window(runs, shapes[zoom_id], rows, cols)
        zooms.append(plots.overlay(slide.read(rows, cols), mask, alpha=0.3))
plots.show(plots.image_grid(zooms, ncols=4, size=3.5), FIGURES / "zooms.png")

# %% [markdown]
# ## Glomerulus sizes (from the polygon files)

# %%
sizes = eda.glomerulus_sizes(env.data_dir)
print(sizes.groupby("id")["diameter"].describe().round(1))
plots.show(
    plots.plot_histogram(sizes["diameter"], xlabel="equivalent diameter (full-res px)"),
    FIGURES / "glomerulus_diameters.png",
)

# %% [markdown]
# ## Tissue and colour
#
# The tissue test (HSV saturation > 40, neither black padding nor white glass) drives which
# windows training and inference skip. Colour varies by patient: that is what the colour
# augmentation is for.

# %%
colour = ["r", "g", "b"] + [f"{c}_{s}" for c in "hsv" for s in ("mean", "std")]
table[["id", "patient", "tissue_fraction", *colour]].round(2)

# %%
patients = eda.patient_colours(table)
plots.show(plots.plot_colours(patients), FIGURES / "patient_colours.png")

# %% [markdown]
# ## How many training windows hold a glomerulus?

# %%
cfg = DataConfig(window=WINDOW, scale=SCALE)
kinds = []
for slide_id in train_ids:
    path = comp.slide_path(slide_id)
    strip, _ = mask_source(env.data_dir, slide_id, shapes[slide_id])
    counts = index_slide(path, strip, cfg, slide_id)["kind"].value_counts()
    kinds.append({"id": slide_id, **counts.to_dict()})
kinds = pd.DataFrame(kinds).fillna(0).set_index("id").astype(int)
kinds["positive share"] = (kinds.get("positive", 0) / kinds.sum(axis=1)).round(3)
print(f"window {WINDOW} px seen at {WINDOW // SCALE} px")
kinds

# %%
# The pictures above were written to disk; check they really were.
written = sorted(p.name for p in FIGURES.glob("*.png"))
assert written == [
    "glomerulus_diameters.png",
    "patient_colours.png",
    "thumbnails.png",
    "zooms.png",
], written
print("figures:", ", ".join(written))
