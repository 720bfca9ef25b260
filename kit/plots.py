"""Pictures: mask overlays, error maps, tile grids, training curves and threshold sweeps.

Array functions (``overlay``, ``error_overlay``) are pure and return uint8 RGB images. Figure
functions build a ``matplotlib.figure.Figure`` without touching pyplot's global state (Jupyter
shows a returned figure; scripts call :func:`save_figure`), so they work under any backend.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from kit import atomic

# Error-map colours: true positives green, false positives magenta, false negatives cyan-blue.
TP_COLOR = (40, 200, 60)
FP_COLOR = (230, 40, 200)
FN_COLOR = (30, 120, 255)


def overlay(
    image: np.ndarray, mask: np.ndarray, color=(0, 255, 0), alpha: float = 0.45
) -> np.ndarray:
    """Blend ``color`` into ``image`` where ``mask`` is nonzero.

    Args:
        image: uint8 (H, W, 3) RGB.
        mask: (H, W), nonzero = foreground.
    Returns:
        uint8 (H, W, 3).
    """
    _check_pair(image, mask)
    out = image.astype(np.float32).copy()
    sel = mask.astype(bool)
    out[sel] = (1 - alpha) * out[sel] + alpha * np.asarray(color, np.float32)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def error_overlay(
    image: np.ndarray, pred: np.ndarray, truth: np.ndarray, alpha: float = 0.55
) -> np.ndarray:
    """Colour true positives, false positives and false negatives (``TP/FP/FN_COLOR``).

    Args:
        image: uint8 (H, W, 3) RGB; pred, truth: (H, W) masks, nonzero = foreground.
    """
    _check_pair(image, pred)
    _check_pair(image, truth)
    p, t = pred.astype(bool), truth.astype(bool)
    out = overlay(image, p & t, TP_COLOR, alpha)
    out = overlay(out, p & ~t, FP_COLOR, alpha)
    return overlay(out, ~p & t, FN_COLOR, alpha)


def _check_pair(image: np.ndarray, mask: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got shape {image.shape}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image {image.shape[:2]}")


def image_grid(
    images: Sequence[np.ndarray], titles: Sequence[str] | None = None, ncols: int = 4, size=3.0
) -> Figure:
    """A grid of RGB images (e.g. augmented tiles with their masks overlaid)."""
    if len(images) == 0:
        raise ValueError("image_grid needs at least one image")
    ncols = min(ncols, len(images))
    nrows = -(-len(images) // ncols)
    fig = Figure(figsize=(size * ncols, size * nrows))
    for i, img in enumerate(images):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.imshow(img)
        ax.set_axis_off()
        if titles is not None:
            ax.set_title(titles[i], fontsize=9)
    fig.tight_layout()
    return fig


def plot_history(history) -> Figure:
    """Loss and Dice per epoch from a run's ``history.csv`` (a DataFrame).

    Plots every column whose name contains ``loss`` on the left and ``dice`` on the right.
    """
    if len(history) == 0:
        raise ValueError("history is empty: no epoch has finished yet")
    x = history["epoch"] if "epoch" in history else np.arange(1, len(history) + 1)
    fig = Figure(figsize=(10, 3.5))
    for i, key in enumerate(("loss", "dice")):
        ax = fig.add_subplot(1, 2, i + 1)
        for col in history.columns:
            if key in col.lower():
                ax.plot(x, history[col], marker="o", label=col)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_sweep(thresholds: Sequence[float], dice: Sequence[float], chosen: float = 0.5) -> Figure:
    """Dice against the probability threshold, with the chosen threshold marked."""
    if len(thresholds) != len(dice) or len(dice) == 0:
        raise ValueError("thresholds and dice must be non-empty and of equal length")
    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(thresholds, dice, marker="o")
    ax.axvline(chosen, color="grey", linestyle="--", label=f"threshold {chosen:g}")
    best = int(np.argmax(dice))
    ax.scatter([thresholds[best]], [dice[best]], color="red", zorder=3, label="best")
    ax.set_xlabel("threshold")
    ax.set_ylabel("mean Dice")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def show_image(image: np.ndarray, title: str = "", size: float = 6.0) -> Figure:
    """One RGB image in a figure of about ``size`` inches on its long side."""
    h, w = image.shape[:2]
    fig = Figure(figsize=(size * w / max(h, w) + 0.2, size * h / max(h, w) + 0.4))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(image)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write ``fig`` as PNG atomically (temp file, then rename); return the path."""
    path = Path(path)
    with atomic.writer(path, "wb") as fh:
        fig.savefig(fh, dpi=dpi, format="png")
    return path


def plot_histogram(values, bins: int = 30, xlabel: str = "", title: str = "") -> Figure:
    """A histogram of ``values`` (e.g. glomerulus diameters)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("plot_histogram needs at least one value")
    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot(1, 1, 1)
    ax.hist(values, bins=bins, color="#8a3f8f")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def show(fig: Figure, path: str | os.PathLike) -> Figure:
    """Save ``fig`` to ``path`` (PNG) and return it, so a notebook cell both keeps and shows it."""
    save_figure(fig, path)
    return fig


def plot_colours(colours, title: str = "mean tissue colour per patient") -> Figure:
    """One swatch per row of ``colours`` (a DataFrame with ``r, g, b`` in 0-255), labelled by
    its index: e.g. `kit.eda.patient_colours`."""
    if len(colours) == 0:
        raise ValueError("plot_colours needs at least one colour")
    rgb = np.clip(colours[["r", "g", "b"]].to_numpy(np.float64) / 255, 0, 1)
    fig = Figure(figsize=(max(3.0, 1.1 * len(rgb)), 2.2))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(rgb[None])
    ax.set_xticks(range(len(rgb)), [str(i) for i in colours.index], rotation=30, fontsize=8)
    ax.set_yticks([])
    ax.set_title(title)
    fig.tight_layout()
    return fig
