import subprocess
import sys

import pandas as pd
import pytest

from kit.cli import main

COMMANDS = ("synth", "train", "predict", "evaluate", "demo", "export", "wheels", "kaggle-metadata")


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
