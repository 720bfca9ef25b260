"""Progress: a bar per slide over its tiles, named for the slide; quiet when off or in a log.

Every loop over a slide's tiles has one: predict, evaluate (also the whole-slide validation of
training) and the tile cache.
"""

from __future__ import annotations

import io
import sys
import types

import numpy as np
import pytest
import torch

from kit.data import DataConfig, build_tile_cache
from kit.evaluate import evaluate_slides
from kit.infer import InferConfig, iter_probability_strips
from kit.progress import show_progress
from kit.submit import write_submission
from kit.tiling import plan

CFG = InferConfig(window=64, overlap=16, scale=2, tissue=True)
# The same grid for the tile cache, every window kept: its bar counts the plan's tiles too.
DATA_CFG = DataConfig(window=64, overlap=16, scale=2, tissue_share=1.0, background_share=1.0)
SHAPE = (200, 400)
TILES = plan(SHAPE, CFG.window, CFG.overlap, align=CFG.scale)
COLUMNS = len({t.cx0 for t in TILES})  # column strips of the plan
SLIDE_ID = "5e1f7a"


def zeros(x: torch.Tensor) -> torch.Tensor:
    """A trivial predictor: logits 0 for every pixel, (N, 3, h, w) -> (N, 1, h, w)."""
    return torch.zeros(x.shape[0], 1, *x.shape[2:])


def glass_and_tissue(shape: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W, 3): bright grey glass on the left half, saturated pink tissue on the right."""
    rng = np.random.default_rng(0)
    image = np.full((*shape, 3), 235, np.uint8) + rng.integers(0, 6, (*shape, 3), dtype=np.uint8)
    image[:, shape[1] // 2 :] = (200, 80, 160)
    return image


@pytest.fixture
def data_dir(tmp_path, write_tiff):
    """A competition folder whose one slide (half glass) is both a test and a training slide."""
    root = tmp_path / "data"
    for split in ("test", "train"):
        (root / split).mkdir(parents=True)
        write_tiff(root / split / f"{SLIDE_ID}.tiff", glass_and_tissue(SHAPE))
    (root / "sample_submission.csv").write_text(f"id,predicted\n{SLIDE_ID},\n")
    (root / "train.csv").write_text(f"id,encoding\n{SLIDE_ID},\n")
    return root


ENTRIES = {"predict": "(1/1)", "evaluate": "(1/1)", "tiles": ""}  # entry -> after the slide id


def run(entry: str, data_dir, **progress) -> None:
    """`python -m kit predict`, `evaluate` or the tile cache of `train` on ``data_dir``,
    through the public functions."""
    if entry == "predict":
        write_submission(data_dir, zeros, data_dir / "sub.csv", CFG, **progress)
    elif entry == "evaluate":
        evaluate_slides(data_dir, zeros, cfg=CFG, thresholds=(), **progress)
    else:
        build_tile_cache(data_dir, SLIDE_ID, DATA_CFG, data_dir / "cache", **progress)


@pytest.mark.parametrize("entry", ENTRIES)
def test_bar_names_the_slide_and_counts_every_tile_of_the_plan(data_dir, capfd, entry):
    run(entry, data_dir, progress=True)
    err = capfd.readouterr().err
    assert f"{entry} {SLIDE_ID} {ENTRIES[entry]}".strip() + ":" in err
    # Tiles of glass are skipped, never predicted, and still counted: the bar reaches the plan.
    # The finished count is drawn even when the tiles take less than tqdm's redraw interval.
    assert f"{len(TILES)}/{len(TILES)}" in err


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("progress", [{"progress": False}, {}], ids=["off", "default"])
def test_no_bar_when_off_or_by_default_when_stderr_is_not_a_terminal(
    data_dir, capfd, monkeypatch, entry, progress
):
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)  # not in Jupyter
    assert not sys.stderr.isatty()  # captured, as in a CI log
    run(entry, data_dir, **progress)
    assert capfd.readouterr().err == ""


def test_show_progress_draws_on_a_terminal_or_in_jupyter_only(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert show_progress(None) is False
    assert show_progress(True) is True
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert show_progress(None) is True
    assert show_progress(False) is False
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    assert show_progress(None) is True


def test_progress_moves_strip_by_strip_and_skipped_tiles_count_as_done(tmp_path, write_tiff):
    path = write_tiff(tmp_path / "s.tiff", glass_and_tissue(SHAPE))
    calls, predicted = [], []

    def counting(x: torch.Tensor) -> torch.Tensor:
        predicted.append(len(x))
        return zeros(x)

    def record(done: int, total: int) -> None:
        calls.append((done, total))

    strips = iter_probability_strips(path, counting, CFG, on_progress=record)
    per_column = len(TILES) // COLUMNS
    for k, _ in enumerate(strips, 1):
        # Reported before the strip is handed on: every tile of the strips so far is done.
        assert calls[-1] == (k * per_column, len(TILES))
    assert calls[0] == (0, len(TILES))
    assert len(calls) == 1 + COLUMNS
    assert 0 < sum(predicted) < len(TILES)  # the glass half was skipped


def test_a_progress_callback_that_is_not_callable_is_named(tmp_path, write_tiff):
    path = write_tiff(tmp_path / "s.tiff", glass_and_tissue((70, 70)))
    with pytest.raises(ValueError, match="on_progress must be callable"):
        iter_probability_strips(path, zeros, CFG, on_progress=True)
