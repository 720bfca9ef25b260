"""Fold settings fitted to small datasets (kit.train.fold_setup and the train command)."""

from __future__ import annotations

import pytest

from kit.cli import main
from kit.competition import Competition
from kit.data import split_slides
from kit.synthetic import make_dataset
from kit.train import DEFAULT_FOLDS, fold_setup

IDS = ["a", "b", "c", "d", "e", "f"]


def test_unset_folds_fit_the_number_of_patients():
    patients = {"a": "1", "b": "1", "c": "2", "d": "3", "e": "3", "f": "2"}
    n, groups, notes = fold_setup(IDS, None, None, patients)
    assert (n, groups) == (3, patients)
    assert notes == [
        f"3 patients to hold out: 3 folds instead of {DEFAULT_FOLDS} (n_folds not given)"
    ]
    held = [split_slides(IDS, fold=k, n_folds=n, groups=groups)[1] for k in range(n)]
    assert sorted(map(sorted, held)) == [["a", "b"], ["c", "f"], ["d", "e"]]


def test_enough_patients_keep_the_default_silently():
    patients = {i: str(k) for k, i in enumerate(IDS)}
    assert fold_setup(IDS, None, None, patients) == (DEFAULT_FOLDS, patients, [])
    assert fold_setup(IDS, 5, "patient", patients) == (5, patients, [])


def test_one_patient_falls_back_to_slides_and_says_so():
    patients = dict.fromkeys(IDS[:3], "67347")
    n, groups, notes = fold_setup(IDS[:3], None, None, patients)
    assert (n, groups) == (3, None)
    assert notes[0].startswith("all 3 training slides come from patient 67347")
    assert "3 slides to hold out: 3 folds" in notes[1]


def test_settings_that_were_given_and_cannot_be_met_stay_errors():
    patients = {"a": "1", "b": "1", "c": "2"}
    n, groups, _ = fold_setup(IDS[:3], 4, None, patients)
    with pytest.raises(ValueError, match=r"n_folds must be in \[2, 2\] .* got 4"):
        split_slides(IDS[:3], fold=0, n_folds=n, groups=groups)
    with pytest.raises(ValueError, match="come from one patient.*group_by='patient'"):
        fold_setup(IDS[:2], None, "patient", {"a": "1", "b": "1"})
    with pytest.raises(ValueError, match="come from one slide"):
        fold_setup(["a"], None, "slide")


def test_train_command_on_three_patients_runs_with_three_folds(tmp_path, capsys):
    data = make_dataset(
        tmp_path / "ds", slides=4, test_slides=1, size=(300, 300), seed=3, patients=3
    )
    ids = Competition(data).train_ids
    assert len({Competition(data).patients[i] for i in ids}) == 3  # the situation under test

    def argv(run, *extra):
        return [
            "train", "--data", str(data), "--out", str(tmp_path / run), "--preset", "quick",
            "--window", "128", "--epochs", "1", "--cache-dir", str(tmp_path / "cache"),
            "--no-progress", *extra,
        ]  # fmt: skip

    assert main(argv("run")) == 0
    out = capsys.readouterr().out.splitlines()
    assert (
        out[0] == f"3 patients to hold out: 3 folds instead of {DEFAULT_FOLDS} (n_folds not given)"
    )
    # An explicit --n-folds that the data cannot meet stays an error.
    assert main(argv("run2", "--n-folds", "4")) == 2
    assert "n_folds must be in [2, 3]" in capsys.readouterr().err
