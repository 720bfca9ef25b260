"""Cross-validation (kit.cv, ``python -m kit cv``): folds, out-of-fold scores, threshold, resume,
the fold ensemble and its export."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch

import kit.evaluate
from kit import kaggle
from kit.checkpoint import export_model, load_model, read_checkpoint
from kit.cli import build_parser, config_from_args, main
from kit.competition import Competition
from kit.cv import OOF, fold_dir, run_cv
from kit.ensemble import MANIFEST, load_predictor, read_manifest
from kit.evaluate import DEFAULT_THRESHOLDS, evaluate_slides
from kit.infer import Ensemble, config_from_checkpoint
from kit.synthetic import make_dataset
from kit.train import DEFAULT_FOLDS, fold_setup, split

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 2


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # 3 training slides with glomeruli (as in test_train.py), from 2 patients: 2 folds.
    return make_dataset(
        tmp_path_factory.mktemp("data") / "ds", slides=4, test_slides=1, size=(470, 590), seed=1
    )


def cv_argv(data, out, *extra):
    """A cross-validation of a few seconds a fold: 64 px tiles, the smallest network, on the CPU
    (the independent recomputations below must run where the folds were scored)."""
    return [
        "cv", "--data", str(data), "--out", str(out), "--preset", "quick", "--window", "128",
        "--tile-overlap", "0", "--overlap", "32", "--batch-size", "4", "--epochs", str(EPOCHS),
        "--device", "cpu", "--no-progress", *extra,
    ]  # fmt: skip


def run(argv) -> tuple[int, str]:
    """``python -m kit`` in this process: (status, what it printed)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(argv)
    return status, out.getvalue()


def crash_at_call(monkeypatch, n: int) -> None:
    """Make the n-th whole-slide validation raise, as if the process died in that epoch."""
    calls = []
    real = kit.evaluate.evaluate_slides

    def evaluate(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(kit.evaluate, "evaluate_slides", evaluate)


@pytest.fixture(scope="module")
def cv(dataset, tmp_path_factory):
    """A cross-validation interrupted in fold 1's last epoch, then run again to the end.

    fit validates whole slides in the last epoch (the quick preset's eval_every is 3): fold 0's,
    then the crash in fold 1's. Returns the folder, the stamps of fold 0's files after the
    crash and what the second run printed.
    """
    out = tmp_path_factory.mktemp("cv") / "cv"
    with pytest.MonkeyPatch.context() as monkeypatch:
        crash_at_call(monkeypatch, 2)
        status, _ = run(cv_argv(dataset, out))
    assert status == 130  # interrupted
    assert read_checkpoint(out / "fold1" / "last.pt")["epoch"] == 1
    assert not (out / OOF).exists() and not (out / MANIFEST).exists()
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "fold0").iterdir()}
    status, printed = run(cv_argv(dataset, out))
    assert status == 0, printed
    return out, stamps, printed


def read_oof(folder: Path) -> tuple[pd.DataFrame, pd.Series]:
    """oof.csv as (the per-slide rows, the mean row)."""
    table = pd.read_csv(folder / OOF, dtype={"id": str})
    return table[table["id"] != "mean"].reset_index(drop=True), table.iloc[-1]


def cv_config(data, out, *extra):
    return config_from_args(build_parser().parse_args(cv_argv(data, out, *extra)))


def test_rerun_skips_finished_folds_and_resumes_the_interrupted_one(cv, dataset):
    out, stamps, printed = cv
    assert f"fold 0 of 2: finished in {out / 'fold0'}, skipped" in printed
    assert f"resuming {out / 'fold1'} after epoch 1 of {EPOCHS}" in printed
    assert {p.name: p.stat().st_mtime_ns for p in (out / "fold0").iterdir()} == stamps
    for k in (0, 1):
        history = pd.read_csv(fold_dir(out, k) / "history.csv")
        assert list(history["epoch"]) == list(range(1, EPOCHS + 1))
        assert read_checkpoint(fold_dir(out, k) / "last.pt")["epoch"] == EPOCHS

    # A third run trains nothing: every fold is finished.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("fold*/*")}
    status, again = run(cv_argv(dataset, out))
    assert status == 0, again
    assert "skipped" in again and "training in" not in again
    assert {p: p.stat().st_mtime_ns for p in out.glob("fold*/*")} == stamps


def test_folds_default_to_trains_and_each_slide_is_held_out_once(cv, dataset):
    out, _, _ = cv
    comp = Competition(dataset)
    default, _, _ = fold_setup(comp.train_ids, None, None, comp.patients)
    assert default == min(DEFAULT_FOLDS, len(set(comp.patients[i] for i in comp.train_ids))) == 2
    oof, _ = read_oof(out)
    assert sorted(oof["id"]) == sorted(comp.train_ids)  # each training slide exactly once
    cfg = cv_config(dataset, out)
    for k in range(default):
        held = split(replace(cfg, fold=k, n_folds=default))[1]
        assert sorted(oof.loc[oof["fold"] == k, "id"]) == sorted(held)


def test_oof_dice_is_each_fold_model_on_the_slides_it_held_out(cv, dataset):
    """Every row of oof.csv equals the fold's best.pt scored again, loaded by hand."""
    out, _, _ = cv
    oof, mean = read_oof(out)
    cfg = cv_config(dataset, out)
    thresholds = sorted({*DEFAULT_THRESHOLDS, cfg.infer.threshold})
    columns = ["dice", *(f"dice@{t:g}" for t in thresholds)]
    assert [c for c in oof.columns if c.startswith("dice")] == columns
    for k in (0, 1):
        model, ckpt = load_model(fold_dir(out, k) / "best.pt", device="cpu")
        held = split(replace(cfg, fold=k, n_folds=2))[1]
        again = evaluate_slides(
            dataset, model, held, config_from_checkpoint(ckpt), thresholds, progress=False
        )
        rows = oof[oof["fold"] == k].set_index("id").loc[held]
        for column in columns:
            assert list(rows[column]) == pytest.approx(list(again[column]), abs=1e-12), column
        assert list(rows["true_px"]) == list(again["true_px"])
    assert list(mean[columns]) == pytest.approx(list(oof[columns].mean()), abs=1e-12)
    assert oof["true_px"].gt(0).all()  # the slides have glomeruli: the Dice are not trivial


def test_the_threshold_maximises_the_mean_oof_dice_and_the_ensemble_uses_it(cv):
    out, _, printed = cv
    oof, _ = read_oof(out)
    means = {float(c.removeprefix("dice@")): oof[c].mean() for c in oof if c.startswith("dice@")}
    assert len(set(means.values())) > 1  # the sweep discriminates: the argmax means something
    best = max(means, key=lambda t: (means[t], -t))  # the first of equal means
    manifest = read_manifest(out)
    assert manifest["threshold"] == best
    assert (manifest["window"], manifest["overlap"]) == (128, 32)
    assert [(m["path"], m["weight"]) for m in manifest["members"]] == [
        (out / "fold0" / "best.pt", 1.0),
        (out / "fold1" / "best.pt", 1.0),
    ]
    assert f"out-of-fold threshold {best:g} (mean Dice {means[best]:.4f})" in printed
    loaded = load_predictor([out], device="cpu")
    assert isinstance(loaded.predictor, Ensemble) and len(loaded.predictor.members) == 2
    assert loaded.cfg.threshold == best


def test_export_of_a_cv_folder_holds_every_member_and_the_manifest(cv, tmp_path):
    out, _, _ = cv
    dataset = tmp_path / "model"
    status, printed = run(["export", "--run", str(out), "--out", str(dataset), "--user", "alice"])
    assert status == 0, printed
    assert sorted(p.name for p in dataset.iterdir()) == [
        kaggle.DATASET_METADATA, MANIFEST, "fold0.pt", "fold1.pt"
    ]  # fmt: skip
    assert kaggle.validate_dataset_metadata(dataset / kaggle.DATASET_METADATA) == []
    exported = json.loads((dataset / MANIFEST).read_text())
    original = json.loads((out / MANIFEST).read_text())
    assert exported == {
        **original,
        "members": [{"path": "fold0.pt", "weight": 1.0}, {"path": "fold1.pt", "weight": 1.0}],
    }
    loaded = load_predictor([dataset], device="cpu")
    assert isinstance(loaded.predictor, Ensemble) and len(loaded.predictor.members) == 2
    assert loaded.cfg.threshold == original["threshold"]
    for k, member in enumerate(loaded.predictor.members):
        saved = read_checkpoint(fold_dir(out, k) / "best.pt")["model_state"]
        for key, value in member.predictor.state_dict().items():
            assert torch.equal(value.cpu(), saved[key]), key
    with pytest.raises(ValueError, match="which='last' does not apply"):
        export_model(out, tmp_path / "last", which="last", user="alice")


def test_keep_training_state_copies_each_member_whole(cv, tmp_path):
    out, _, _ = cv
    dataset = export_model(out, tmp_path / "model", user="alice", keep_training_state=True)
    for k in (0, 1):
        assert (dataset / f"fold{k}.pt").read_bytes() == (fold_dir(out, k) / "best.pt").read_bytes()


def test_bad_input_is_one_clear_line_before_any_training(dataset, tmp_path):
    too_many = run_error(cv_argv(dataset, tmp_path / "a", "--folds", "3"))
    assert "3 folds of 3 training slides: n_folds must be in [2, 2]" in too_many
    assert "folds must be an integer >= 2, got 1" in run_error(
        cv_argv(dataset, tmp_path / "b", "--folds", "1")
    )
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    for name in ("sample_submission.csv", "HuBMAP-20-dataset_information.csv"):
        (empty / name).write_bytes((dataset / name).read_bytes())
    (empty / "train.csv").write_text("id,encoding\n")
    assert f"{empty / 'train.csv'} lists no training slides" in run_error(
        cv_argv(empty, tmp_path / "c")
    )
    assert not any((tmp_path / name).exists() for name in "abc")  # nothing trained or written
    with pytest.raises(ValueError, match="valid ids"):
        run_cv(replace(cv_config(dataset, tmp_path / "d"), valid=["x"]))


def run_error(argv) -> str:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status, _ = run(argv)
    assert status == 2 and err.getvalue().count("\n") == 1, err.getvalue()
    return err.getvalue()


def test_cv_command_has_folds_instead_of_a_fold():
    options = build_parser()._subparsers._group_actions[0].choices["cv"]._option_string_actions
    assert "--folds" in options and "--epochs" in options and "--tile-overlap" in options
    assert not {"--fold", "--valid", "--n-folds"} & set(options)


DDP_SCRIPT = """
from kit.cli import main
raise SystemExit(main({argv!r}))
"""


@pytest.mark.slow
def test_under_torchrun_every_rank_trains_each_fold_and_rank_0_scores(dataset, tmp_path):
    out = tmp_path / "cv"
    script = tmp_path / "cv_ddp.py"
    script.write_text(DDP_SCRIPT.format(argv=cv_argv(dataset, out, "--epochs", "1")))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(" x2") == 2  # each fold announced both processes
    assert done.stdout.count("out-of-fold threshold") == 1  # one report: rank 0's
    oof, _ = read_oof(out)
    assert len(oof) == 3 and set(oof["fold"]) == {0, 1}
    assert len(read_manifest(out)["members"]) == 2
