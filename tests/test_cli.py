import argparse
import subprocess
import sys

import pandas as pd
import pytest
import torch

from kit.cli import main
from kit.synthetic import make_dataset

COMMANDS = (
    "synth",
    "train",
    "cv",
    "predict",
    "evaluate",
    "demo",
    "export",
    "wheels",
    "kaggle-metadata",
)


def test_help_lists_every_subcommand():
    out = subprocess.run(
        [sys.executable, "-m", "kit", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in COMMANDS:
        assert command in out


def test_synth_writes_the_competition_layout(tmp_path, capsys):
    out = tmp_path / "data"
    argv = "synth --slides 3 --test-slides 1 --size 300 400 --out".split() + [str(out)]
    assert main(argv) == 0
    assert len(pd.read_csv(out / "train.csv")) == 2
    assert len(pd.read_csv(out / "sample_submission.csv")) == 1
    assert str(out) in capsys.readouterr().out
    # A second run refuses to overwrite, with one clear line and status 2.
    assert main(argv) == 2
    assert "overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["synth", "--out", "{tmp}/x", "--slides", "0"], "slides"),
        (["predict", "--data", "{tmp}", "--weights", "{tmp}/missing.pt"], "missing.pt"),
        (["evaluate", "--data", "{tmp}", "--weights", "{tmp}/missing.pt"], "missing.pt"),
        (["export", "--run", "{tmp}/norun", "--out", "{tmp}/model"], "norun"),
    ],
)
def test_user_errors_are_one_line_and_status_2(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("content", ["bytes", "pickle"])
def test_predict_with_a_file_that_is_not_a_checkpoint_says_so_and_writes_nothing(
    tmp_path, capsys, content
):
    """`kit predict --weights garbage.pt`: one line naming the file and what a kit checkpoint
    is; never torch's advice to load with weights_only=False (which runs the file's code)."""
    data = make_dataset(tmp_path / "data", slides=2, test_slides=1, size=(300, 300), seed=0)
    weights = tmp_path / "garbage.pt"
    if content == "bytes":
        weights.write_bytes(b"\x00not a torch file" * 10)
    else:  # a pickled Python object: torch's own error advises weights_only=False
        torch.save(argparse.Namespace(lr=0.1), weights)
    out = tmp_path / "run" / "submission.csv"
    out.parent.mkdir()
    argv = ["predict", "--data", str(data), "--weights", str(weights), "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {weights}: not a checkpoint: ")
    assert "A kit checkpoint is the best.pt or last.pt" in err
    # Torch's advice reads "`weights_only` set to `False`" and names add_safe_globals.
    assert "False" not in err and "safe_globals" not in err and err.count("\n") == 1
    assert list(out.parent.iterdir()) == []  # no submission.csv, no submission.csv.parts/
