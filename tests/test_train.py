import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from kit.data import read_patients, train_ids
from kit.model import load_model
from kit.synthetic import make_dataset
from kit.train import (
    PRESETS,
    TrainConfig,
    add_train_arguments,
    config_diff,
    config_from_args,
    fit,
    preset,
    split,
    tile_caches,
    warmup_cosine,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # 3 training slides (all with glomeruli at this size and seed) and 1 test slide.
    return make_dataset(
        tmp_path_factory.mktemp("data") / "ds", slides=4, test_slides=1, size=(470, 590), seed=1
    )


def tiny_args(dataset, out, cache, epochs=2):
    """CLI arguments of a run that takes a few seconds: 64 px tiles, the smallest network."""
    return [
        "--data", str(dataset), "--out", str(out), "--cache-dir", str(cache),
        "--valid", train_ids(dataset)[0], "--model", "lraspp_mobilenet_v3_large",
        "--window", "128", "--scale", "2", "--tile-overlap", "0", "--overlap", "32",
        "--batch-size", "4", "--epochs", str(epochs), "--workers", "0", "--no-progress",
    ]  # fmt: skip


def parse(argv):
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def read_history(run):
    with open(run / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_warmup_then_cosine():
    kw = dict(warmup=4, total=14, min_ratio=0.1)
    assert [warmup_cosine(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warmup_cosine(4, **kw) == pytest.approx(1.0)
    assert warmup_cosine(9, **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # half way down the cosine
    assert warmup_cosine(14, **kw) == pytest.approx(0.1)
    assert warmup_cosine(100, **kw) == pytest.approx(0.1)  # stays at the floor
    assert warmup_cosine(0, warmup=0, total=10, min_ratio=0.0) == pytest.approx(1.0)


def test_presets():
    quick, full = preset("quick"), preset("full", epochs=3)
    assert quick.model == "lraspp_mobilenet_v3_large" and quick.pretrained is None
    assert (full.model, full.pretrained, full.window, full.scale) == (
        "fcn_resnet50",
        "auto",
        1024,
        4,
    )
    assert full.epochs == 3 and full.batch_size == 16
    with pytest.raises(ValueError, match="unknown preset 'fast'"):
        preset("fast")
    assert set(PRESETS) == {"quick", "full"}


def test_config_checks_and_diff():
    with pytest.raises(ValueError, match="group_by"):
        TrainConfig(group_by="site")
    with pytest.raises(ValueError, match="multiple of scale"):
        TrainConfig(window=1000, scale=3)
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    a = TrainConfig(valid=["x"])
    b = replace(a, epochs=7, lr=1e-3, workers=9, device="cpu", valid=["x"])
    assert config_diff(vars(a), vars(b)) == ["epochs: 30 -> 7", "lr: 0.0003 -> 0.001"]


def test_config_from_command_line():
    cfg = parse(
        ["--data", "d", "--out", "r", "--preset", "quick", "--epochs", "3", "--valid", "a", "b"]
        + ["--overwrite", "--pretrained", "none", "--no-amp"]
    )
    assert (cfg.data_dir, cfg.out, cfg.epochs, cfg.valid) == ("d", "r", 3, ["a", "b"])
    assert cfg.model == PRESETS["quick"]["model"] and cfg.pretrained is None
    assert cfg.resume is False and cfg.amp is False
    default = parse(["--data", "d", "--out", "r", "--fold", "2"])
    assert default == TrainConfig(data_dir="d", out="r", fold=2)


def test_split_and_tile_caches_of_a_config(dataset, tmp_path):
    ids = train_ids(dataset)
    cfg = TrainConfig(data_dir=str(dataset), out=str(tmp_path / "runs" / "a"), n_folds=2)
    patients = read_patients(dataset)
    held = []
    for fold in (0, 1):
        train, valid = split(replace(cfg, fold=fold))
        assert sorted(train + valid) == sorted(ids)
        assert not {patients[i] for i in train} & {patients[i] for i in valid}
        held += valid
    assert sorted(held) == sorted(ids)
    assert split(replace(cfg, valid=[ids[2]])) == (ids[:2], [ids[2]])

    small = replace(cfg, window=128, scale=2, tile_overlap=0)
    folders = tile_caches(small, ids[:2], progress=False)
    assert [f.parent for f in folders] == [tmp_path / "runs" / "tile-cache"] * 2
    assert [f.name.split("-")[0] for f in folders] == ids[:2]


def test_fit_writes_a_run_folder_and_refuses_another_config(dataset, tmp_path):
    run = tmp_path / "run"
    cfg = parse(tiny_args(dataset, run, tmp_path / "cache"))
    result = fit(cfg)

    assert sorted(p.name for p in run.iterdir()) == [
        "best.pt", "config.json", "history.csv", "last.pt"
    ]  # fmt: skip
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["window"] == 128 and saved["data"]["overlap"] == 0
    rows = read_history(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    dice = [float(r["slide_dice"]) for r in rows]
    assert all(0.0 <= d <= 1.0 for d in dice)  # eval_every=1: every epoch scored
    assert result["best_dice"] == pytest.approx(max(dice))
    assert result["valid_ids"] == [train_ids(dataset)[0]]
    assert result["train_ids"] == train_ids(dataset)[1:]

    last = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 2 and last["config"]["scale"] == 2
    assert {"optimizer_state", "scheduler_state", "scaler_state"} <= set(last)
    model, best = load_model(run / "best.pt")
    assert best["epoch"] == result["best_epoch"] and best["config"]["overlap"] == 32
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, 1, 64, 64)

    # Same command again: nothing left to do, nothing rewritten.
    stamp = (run / "last.pt").stat().st_mtime_ns
    fit(cfg)
    assert (run / "last.pt").stat().st_mtime_ns == stamp
    assert len(read_history(run)) == 2

    with pytest.raises(ValueError, match=r"another config \(epochs: 2 -> 3; lr: 0.0003 -> 0.01\)"):
        fit(replace(cfg, epochs=3, lr=0.01))
    fit(replace(cfg, epochs=1, resume=False))  # an explicit overwrite starts over
    assert [int(r["epoch"]) for r in read_history(run)] == [1]


def test_resume_after_sigkill_matches_an_uninterrupted_run(dataset, tmp_path):
    epochs = 4
    run, cache = tmp_path / "killed", tmp_path / "cache"
    command = [sys.executable, "-m", "kit", "train", *tiny_args(dataset, run, cache, epochs)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    # Kill it as soon as one epoch is saved: it is then in the middle of the next one.
    while not (run / "last.pt").exists():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.monotonic() < deadline, "no epoch finished in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(read_history(run))
    assert killed_at < epochs

    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"resuming {run} after epoch" in done.stdout
    assert done.stdout.strip().splitlines()[-1].startswith("held-out whole-slide Dice: ")
    rows = read_history(run)
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))

    # Per-epoch seeding makes the resumed run follow the uninterrupted one step for step.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocess (OMP_NUM_THREADS=1): same reduction order
    try:
        reference = fit(parse(tiny_args(dataset, tmp_path / "reference", cache, epochs)))
    finally:
        torch.set_num_threads(threads)
    assert [r["train_loss"] for r in reference["history"]] == pytest.approx(
        [float(r["train_loss"]) for r in rows], rel=1e-4
    )
    resumed = torch.load(run / "last.pt", weights_only=True)["model_state"]
    for key, value in reference["model"].state_dict().items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-4, atol=1e-5, msg=key)

    other = subprocess.run(
        [*command, "--lr", "0.5"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert other.returncode == 2 and "lr: 0.0003 -> 0.5" in other.stderr


DDP_SCRIPT = """
import sys, torch
from kit.train import TrainConfig, fit
cfg = TrainConfig(**{cfg!r})
result = fit(cfg)
torch.save(result["model"].state_dict(), f"{weights}/rank{{result['rank']}}.pt")
print("rank", result["rank"], "dice", result["best_dice"])
"""


def test_two_processes_train_in_step_and_write_once(dataset, tmp_path):
    run, weights = tmp_path / "ddp", tmp_path / "weights"
    weights.mkdir()
    cfg = vars(parse(tiny_args(dataset, run, tmp_path / "cache")))
    script = tmp_path / "train_ddp.py"
    script.write_text(DDP_SCRIPT.format(cfg=cfg, weights=weights))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "x2" in done.stdout  # the run announced both processes
    assert sorted(p.name for p in run.iterdir()) == [
        "best.pt", "config.json", "history.csv", "last.pt"
    ]  # fmt: skip
    assert [int(r["epoch"]) for r in read_history(run)] == [1, 2]
    rank0 = torch.load(weights / "rank0.pt", weights_only=True)
    rank1 = torch.load(weights / "rank1.pt", weights_only=True)
    last = torch.load(run / "last.pt", weights_only=True)["model_state"]
    for key, value in rank0.items():
        torch.testing.assert_close(rank1[key], value, rtol=0, atol=0, msg=key)
        torch.testing.assert_close(last[key], value, rtol=0, atol=0, msg=key)
    dice = {
        line.split()[1]: line.split()[3]
        for line in done.stdout.splitlines()
        if line.startswith("rank ")
    }
    assert dice.keys() == {"0", "1"} and dice["0"] == dice["1"] != "nan"
