"""bench/quality.py's bookkeeping: the paired table and the report of finished runs."""

import argparse
import importlib.util
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality", REPO / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows(*items):
    return pd.DataFrame(
        [dict(recipe=r, seed=s, dice=d, seconds=1.0, digest="x") for r, s, d in items]
    )


def test_summarise_pairs_each_recipe_with_the_baseline_by_seed(quality):
    table = quality.summarise(
        rows(
            ("cpu", 0, 0.90),
            ("cpu", 1, 0.80),
            ("cpu", 2, 0.85),
            ("ema", 1, 0.84),
            ("ema", 0, 0.91),
            ("ema", 2, 0.90),
            ("solo", 5, 0.5),
        )  # fmt: skip
    )
    # differences +0.01, +0.04, +0.05 by seed, whatever the row order: mean 0.0333, sd 0.0208
    assert table.loc["ema", "vs cpu"] == "+0.0333 ± 0.0208 (3)"
    assert table.loc["cpu", "vs cpu"] == "+0.0000 ± 0.0000 (3)"
    assert table.loc["solo", "vs cpu"] == ""  # no seed in common
    assert table.loc["ema", "mean"] == pytest.approx(0.8833, abs=1e-4)


def test_report_reads_only_rows_of_the_current_configs(quality, tmp_path):
    data, out = tmp_path / "data", tmp_path / "runs"
    out.mkdir()
    digest = quality.config_digest(quality.recipe_config("cpu", data, 0, 0, out, None))
    other = quality.config_digest(quality.recipe_config("cpu", data, 1, 0, out, None))
    assert digest != other
    results = quality.Results(out / "results.csv")
    results.add(dict(recipe="cpu", seed=0, dice=0.9, seconds=1.0, digest=digest))
    results.add(dict(recipe="cpu", seed=1, dice=0.8, seconds=1.0, digest="stale"))
    args = argparse.Namespace(
        recipes=["cpu"], seeds=[0, 1], fold=0, report=[out], cortex_filter=False
    )
    found = quality.report(args, data)
    assert found[["recipe", "seed", "dice"]].values.tolist() == [["cpu", 0, 0.9]]


def test_a_row_measured_under_other_paths_is_found_and_another_dataset_is_not(quality, tmp_path):
    # bench/results holds rows measured on another machine: the dataset folder and the run
    # folders (where a pseudo-label CSV is written) were elsewhere; the folder names are the same.
    def digest(name, data, out, seed=0):
        return quality.config_digest(quality.recipe_config(name, data, seed, 0, out, None))

    here = tmp_path / "a" / "synthetic-realistic-v3"
    there = Path("/elsewhere/synthetic-realistic-v3")
    for name in ("cpu", "pseudo", "best-pseudo"):
        assert digest(name, here, tmp_path / "runs") == digest(name, there, Path("/tmp/q/p0"))
    assert digest("cpu", here, tmp_path) != digest("cpu", here.with_name("synthetic-v3"), tmp_path)
    assert digest("pseudo", here, tmp_path) != digest("pseudo", here, tmp_path, seed=1)
    assert digest("pseudo", here, tmp_path) != digest("cpu", here, tmp_path)

    # every committed row is found under today's configs; the H200 table is complete
    for machine, complete in (("quality-h200", True), ("quality-cpu", False)):
        committed = REPO / "bench" / "results" / machine
        args = argparse.Namespace(
            recipes=quality.DEFAULT_RECIPES, seeds=[0, 1, 2], fold=0, report=[committed],
            cortex_filter=True,
        )  # fmt: skip
        rows = pd.read_csv(committed / "results.csv")
        assert len(quality.report(args, here)) == len(rows) > 0, machine
        if complete:  # every recipe, with and without the filter, on every seed
            assert len(rows) == 2 * 3 * len(quality.DEFAULT_RECIPES)


def test_the_baseline_is_the_grid_and_best_is_the_cpu_preset_without_the_filter(quality, tmp_path):
    from dataclasses import replace

    from kit.train import preset

    def config(name):
        return quality.recipe_config(name, tmp_path / "data", 0, 0, tmp_path / "runs", None)

    cpu, best = config("cpu"), config("best")
    assert (cpu.data.sampling, cpu.data.region_weighting, cpu.data.stain_norm) == (
        "grid", False, "none",
    )  # fmt: skip
    assert cpu.lovasz_weight == 0.0 and not cpu.infer.cortex_only
    shipped = preset("cpu", **{k: getattr(best, k) for k in ("data_dir", "out", "cache_dir")})
    shipped = replace(shipped, group_by="patient", eval_every=best.eval_every, resume=False)
    shipped = replace(shipped, progress=False, infer=replace(shipped.infer, cortex_only=False))
    assert shipped == best  # the cpu preset is the best recipe, its +cortex-filter row
    # every issue-14 recipe differs from the baseline in the field it names, nothing else
    stain = config("stain-norm")
    data, infer = (
        replace(cpu.data, stain_norm="reinhard"),
        replace(cpu.infer, stain_norm="reinhard"),
    )
    assert stain == replace(cpu, out=stain.out, data=data, infer=infer)
