import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from kit import plots


def test_overlay_blends_only_the_mask():
    img = np.full((3, 4, 3), 100, np.uint8)
    mask = np.zeros((3, 4), np.uint8)
    mask[1, 2] = 1
    out = plots.overlay(img, mask, color=(200, 0, 0), alpha=0.5)
    assert out.dtype == np.uint8
    assert out[1, 2].tolist() == [150, 50, 50]
    untouched = np.ones((3, 4), bool)
    untouched[1, 2] = False
    assert (out[untouched] == 100).all()


def test_error_overlay_colours_tp_fp_fn():
    img = np.zeros((1, 4, 3), np.uint8)
    pred = np.array([[1, 1, 0, 0]])
    truth = np.array([[1, 0, 1, 0]])
    out = plots.error_overlay(img, pred, truth, alpha=1.0)
    assert out[0, 0].tolist() == list(plots.TP_COLOR)
    assert out[0, 1].tolist() == list(plots.FP_COLOR)
    assert out[0, 2].tolist() == list(plots.FN_COLOR)
    assert out[0, 3].tolist() == [0, 0, 0]


def test_shape_errors():
    with pytest.raises(ValueError, match="does not match"):
        plots.overlay(np.zeros((3, 4, 3), np.uint8), np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        plots.overlay(np.zeros((3, 4), np.uint8), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="empty"):
        plots.plot_history(pd.DataFrame({"epoch": []}))


def test_figures_are_written(tmp_path):
    hist = pd.DataFrame({"epoch": [1, 2], "train_loss": [0.5, 0.3], "valid_dice": [0.6, 0.8]})
    figs = {
        "history": plots.plot_history(hist),
        "sweep": plots.plot_sweep([0.3, 0.5, 0.7], [0.8, 0.85, 0.82]),
        "grid": plots.image_grid([np.zeros((8, 8, 3), np.uint8)] * 3, titles=["a", "b", "c"]),
        "image": plots.show_image(np.zeros((10, 30, 3), np.uint8), "wide"),
    }
    for name, fig in figs.items():
        path = plots.save_figure(fig, tmp_path / "figs" / f"{name}.png")
        assert imread(path).shape[0] > 50
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == [
        "grid.png",
        "history.png",
        "image.png",
        "sweep.png",
    ]


def test_plot_colours_draws_one_swatch_per_row(tmp_path):
    colours = pd.DataFrame({"r": [255, 0], "g": [0, 0], "b": [0, 255]}, index=["p1", "p2"])
    fig = plots.plot_colours(colours)
    swatch = fig.axes[0].images[0].get_array()
    assert swatch.shape == (1, 2, 3)
    assert np.allclose(swatch[0, 0], [1, 0, 0]) and np.allclose(swatch[0, 1], [0, 0, 1])
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["p1", "p2"]
    with pytest.raises(ValueError):
        plots.plot_colours(colours.iloc[:0])
