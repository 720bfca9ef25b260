import argparse
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.optim.swa_utils import AveragedModel
from torch.overrides import TorchFunctionMode

from kit.checkpoint import export_model, load_model, read_checkpoint
from kit.cli import add_train_arguments, config_from_args
from kit.competition import Competition
from kit.data import DataConfig
from kit.ensemble import load_predictor
from kit.env import scratch_dir
from kit.evaluate import evaluate_slides
from kit.infer import InferConfig, config_from_checkpoint, iter_probability_strips
from kit.losses import BCEDiceLoss
from kit.model import build_model
from kit.slides import Slide
from kit.stain import slide_stats, target_stats
from kit.synthetic import make_dataset
from kit.train import (
    BAR_SECONDS,
    DERIVED_FIELDS,
    PRESETS,
    TrainConfig,
    config_diff,
    ema_update,
    evaluate,
    fit,
    preset,
    split,
    tile_cache_dir,
    tile_caches,
    train_one_epoch,
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
    """CLI arguments of a run that takes a few seconds: 64 px tiles, the smallest network.

    On the CPU even where a GPU is visible: runs compared weight for weight must run on the same
    device, and two torchrun ranks must not both ask for a GPU on a one-GPU machine.
    """
    return [
        "--data", str(dataset), "--out", str(out), "--cache-dir", str(cache),
        "--valid", Competition(dataset).train_ids[0], "--model", "lraspp_mobilenet_v3_large",
        "--window", "128", "--scale", "2", "--tile-overlap", "0", "--overlap", "32",
        "--batch-size", "4", "--epochs", str(epochs), "--workers", "0", "--no-progress",
        "--device", "cpu",
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


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_sets_its_fields_and_overrides_win(name):
    cfg = preset(name)
    saved = asdict(cfg)
    for key, value in PRESETS[name].items():
        if isinstance(value, dict):  # a section: its given fields
            assert {k: saved[key][k] for k in value} == value
        else:
            assert saved[key] == value
    assert (cfg.infer.window, cfg.infer.scale) == (cfg.data.window, cfg.data.scale)
    window = 2 * cfg.data.window
    changed = preset(name, epochs=cfg.epochs + 1, valid=["x"], data={"window": window})
    assert changed == replace(
        cfg, epochs=cfg.epochs + 1, valid=["x"], data=replace(cfg.data, window=window)
    )
    assert changed.data.scale == cfg.data.scale and changed.infer.window == window


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_model_maps_its_tiles_to_logits_of_the_same_size(name):
    cfg = preset(name)
    side = cfg.data.window // cfg.data.scale  # what the network sees of each window
    model = build_model(cfg.model).eval()  # random weights: no files needed
    with torch.no_grad():
        assert model(torch.rand(2, 3, side, side)).shape == (2, 1, side, side)


def test_unknown_preset_names_the_choices():
    with pytest.raises(
        ValueError, match=f"unknown preset 'fast'; choose one of {', '.join(PRESETS)}"
    ):
        preset("fast")


def test_config_checks_and_diff():
    with pytest.raises(ValueError, match="group_by"):
        TrainConfig(group_by="site")
    with pytest.raises(ValueError, match="multiple of scale"):
        TrainConfig(data={"window": 1000, "scale": 3})
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    wide = TrainConfig(data={"window": 2048}, infer={"overlap": 1500, "window": 64})
    assert (wide.infer.window, wide.infer.overlap) == (2048, 1500)  # the window is data's
    a = TrainConfig(valid=["x"])
    b = replace(a, epochs=7, lr=1e-3, workers=9, device="cpu", valid=["x"])
    b = replace(b, data=replace(b.data, overlap=0), infer=replace(b.infer, tta=True, workers=0))
    assert config_diff(asdict(a), asdict(b)) == [
        "data.overlap: 256 -> 0", "epochs: 30 -> 7", "infer.tta: False -> True",
        "lr: 0.0003 -> 0.001",
    ]  # fmt: skip
    # The flat config.json of an older kit: compared on its own fields, by their new names.
    flat = {"epochs": 30, "tile_overlap": 256, "overlap": 256, "infer_batch_size": 8, "seed": 0}
    assert config_diff(flat, asdict(a)) == []
    assert config_diff({**flat, "tile_overlap": 0}, asdict(a)) == ["data.overlap: 0 -> 256"]


def test_config_from_command_line():
    cfg = parse(
        ["--data", "d", "--out", "r", "--preset", "quick", "--epochs", "3", "--valid", "a", "b"]
        + ["--overwrite", "--pretrained", "none", "--no-amp"]
    )
    assert cfg == preset(
        "quick", data_dir="d", out="r", epochs=3, valid=["a", "b"], resume=False,
        pretrained=None, amp=False,
    )  # fmt: skip
    default = parse(["--data", "d", "--out", "r", "--fold", "2"])
    assert default == TrainConfig(data_dir="d", out="r", fold=2)
    nested = parse(
        ["--data", "d", "--out", "r", "--preset", "quick", "--window", "128", "--tile-overlap"]
        + ["16", "--overlap", "32", "--infer-batch-size", "3", "--tta", "--grad-clip", "none"]
    )
    assert nested == preset(
        "quick", data_dir="d", out="r", data={"window": 128, "overlap": 16},
        infer={"overlap": 32, "batch_size": 3, "tta": True}, grad_clip=None,
    )  # fmt: skip
    with pytest.raises(ValueError, match="--valid and --fold"):
        parse(["--data", "d", "--out", "r", "--fold", "2", "--valid", "a"])


def test_every_config_field_has_a_flag():
    """A field added to TrainConfig, DataConfig or InferConfig gets its flag (or is derived)."""
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    dests = {action.dest for action in parser._actions}
    sections = {"": TrainConfig, "data.": DataConfig, "infer.": InferConfig}
    for prefix, cls in sections.items():
        for f in fields(cls):
            name = prefix + f.name
            assert name in dests or name in DERIVED_FIELDS or f.name in ("data", "infer"), name


def test_split_and_tile_caches_of_a_config(dataset, tmp_path):
    ids = Competition(dataset).train_ids
    cfg = TrainConfig(data_dir=str(dataset), out=str(tmp_path / "runs" / "a"), n_folds=2)
    patients = Competition(dataset).patients
    held = []
    for fold in (0, 1):
        train, valid = split(replace(cfg, fold=fold))
        assert sorted(train + valid) == sorted(ids)
        assert not {patients[i] for i in train} & {patients[i] for i in valid}
        held += valid
    assert sorted(held) == sorted(ids)
    assert split(replace(cfg, valid=[ids[2]])) == (ids[:2], [ids[2]])

    data = replace(cfg.data, window=128, scale=2, overlap=0)
    small = replace(cfg, data=data, infer={"overlap": 32})
    assert (small.infer.window, small.infer.scale, small.infer.overlap) == (128, 2, 32)
    folders = tile_caches(small, ids[:2], progress=False)
    assert [f.parent for f in folders] == [tmp_path / "runs" / "tile-cache"] * 2
    assert [f.name.split("-")[0] for f in folders] == ids[:2]


def test_on_kaggle_the_tile_cache_defaults_outside_the_output_folder(tmp_path, monkeypatch):
    working = tmp_path / "working"  # the notebook's output: 20 GB at most
    cfg = TrainConfig(data_dir="d", out=str(working / "run"))
    assert tile_cache_dir(cfg) == working / "tile-cache"
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")  # set in Kaggle's notebooks
    assert tile_cache_dir(cfg) == scratch_dir("kaggle") / "tile-cache"
    assert not tile_cache_dir(cfg).is_relative_to(working)
    assert tile_cache_dir(replace(cfg, cache_dir=str(working / "c"))) == working / "c"


def test_fit_writes_a_run_folder_and_refuses_another_config(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = parse(tiny_args(dataset, run, tmp_path / "cache"))
    result = fit(cfg)
    log = capsys.readouterr().out
    assert log.count("tile cache: ") == 1 and f"tile cache: {tmp_path / 'cache'}\n" in log
    assert "on cpu, 0 loader workers\n" in log  # --workers 0 is kept

    assert sorted(p.name for p in run.iterdir()) == [
        "best.pt", "config.json", "history.csv", "last.pt"
    ]  # fmt: skip
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["data"]["window"] == 128 and saved["train"]["data"]["overlap"] == 0
    rows = read_history(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    dice = [float(r["slide_dice"]) for r in rows]
    assert not any(math.isnan(d) for d in dice)  # eval_every=1: every epoch scored
    assert result["best_dice"] == pytest.approx(max(dice))
    assert result["valid_ids"] == [Competition(dataset).train_ids[0]]
    assert result["train_ids"] == Competition(dataset).train_ids[1:]

    last = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 2 and last["config"]["data"]["scale"] == 2
    assert {"optimizer_state", "scheduler_state", "scaler_state"} <= set(last)
    model, best = load_model(run / "best.pt")
    assert best["epoch"] == result["best_epoch"] and best["config"]["infer"]["overlap"] == 32
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


@pytest.mark.slow  # ~30 s on 2 busy cores
def test_the_stain_target_is_fitted_on_the_training_slides_and_travels_with_the_model(
    dataset, tmp_path
):
    run = tmp_path / "run"
    args = tiny_args(dataset, run, tmp_path / "cache", epochs=1)
    cfg = parse([*args, "--stain-norm", "reinhard", "--stain-augment", "0.5"])
    assert (cfg.data.stain_norm, cfg.infer.stain_norm, cfg.stain_augment) == ("reinhard",) * 2 + (
        0.5,
    )
    assert cfg.infer.stain_target is None  # fit computes it
    result = fit(cfg)
    comp = Competition(dataset)
    stats = {}
    for slide_id in comp.train_ids:
        with Slide(comp.slide_path(slide_id)) as slide:
            stats[slide_id] = slide_stats(slide)
    target = target_stats([stats[i] for i in result["train_ids"]])  # not the held-out slide's
    assert not np.allclose(target, target_stats(list(stats.values())))

    loaded = load_predictor([run], device="cpu")
    assert config_from_checkpoint(read_checkpoint(run / "best.pt")) == replace(
        loaded.cfg, device=None
    )
    assert loaded.cfg.stain_norm == "reinhard"
    np.testing.assert_allclose(loaded.cfg.stain_target, target.ravel())
    # The held-out slide is scored as validation scored it, through the same mapping ...
    table = evaluate_slides(dataset, loaded.predictor, result["valid_ids"], loaded.cfg)
    assert table["dice"].mean() == pytest.approx(result["best_dice"])
    # ... which changes what the model sees (after one epoch it barely tells colours apart).
    path = comp.slide_path(result["valid_ids"][0])
    mapped = predict_probabilities(path, loaded.predictor, loaded.cfg)
    plain = predict_probabilities(path, loaded.predictor, replace(loaded.cfg, stain_norm="none"))
    assert not np.array_equal(mapped, plain)

    # The fitted target is not a change of config: the same command finds the run finished.
    stamp = (run / "last.pt").stat().st_mtime_ns
    fit(cfg)
    assert (run / "last.pt").stat().st_mtime_ns == stamp


def predict_probabilities(path, predictor, cfg):
    return np.concatenate([p for _, p in iter_probability_strips(path, predictor, cfg)], axis=1)


def test_progress_shows_the_tile_cache_and_the_whole_slide_validation_per_slide(
    dataset, tmp_path, capfd, monkeypatch
):
    """Bars over the tiles of each slide, named for it, for the tile cache and the held-out
    whole-slide Dice; none by default when stderr is a log (not a terminal, not Jupyter)."""
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    ids = Competition(dataset).train_ids
    cfg = parse(tiny_args(dataset, tmp_path / "quiet", tmp_path / "c1", epochs=1))
    fit(replace(cfg, progress=None))
    assert capfd.readouterr().err == ""

    fit(replace(cfg, out=str(tmp_path / "shown"), cache_dir=str(tmp_path / "c2"), progress=True))
    err = capfd.readouterr().err
    assert f"evaluate {ids[0]} (1/1):" in err  # the held-out slide, validated whole
    for slide_id in ids:
        assert f"tiles {slide_id}:" in err


@pytest.mark.slow
def test_quick_preset_finds_glomeruli_on_a_held_out_slide(tmp_path):
    """Training learns: on a slide it never saw, the quick preset's whole-slide Dice is far above
    that of the same network untrained, which marks all of the slide or nothing.

    Measured with seeds 0-5: 0.57 to 0.74 trained, 0 to 0.09 untrained, 0.07 after the same
    run at lr 1e-9; the margin leaves room for other CPUs and thread counts. 1024 x 1280 slides:
    the `dataset` fixture's 470 x 590 gives 12 training tiles, too few to learn from. About 35 s
    on a busy 2-core machine.
    """
    data = make_dataset(tmp_path / "ds", slides=3, test_slides=0, size=(1024, 1280), seed=1)
    held_out = [Competition(data).train_ids[0]]
    cfg = preset(
        "quick", data_dir=str(data), out=str(tmp_path / "run"), valid=held_out, device="cpu",
        epochs=10, batch_size=4, eval_every=10, progress=False,  # 90 steps, scored once
    )  # fmt: skip
    infer_cfg = replace(cfg.infer, device="cpu")
    torch.manual_seed(cfg.seed)
    untrained = build_model(cfg.model).eval()
    before = evaluate_slides(data, untrained, held_out, infer_cfg, (), progress=False)["dice"]

    result = fit(cfg)
    assert before.mean() < 0.2
    assert result["best_dice"] > before.mean() + 0.35, (result["best_dice"], before.mean())

    # The Dice the run selected by is the one its best.pt gives on the submission path.
    model, ckpt = load_model(result["best_path"], device="cpu")
    again = evaluate_slides(
        data, model, held_out, config_from_checkpoint(ckpt, device="cpu"), (), progress=False
    )
    assert again["dice"].mean() == pytest.approx(result["best_dice"], abs=1e-4)


def wait_for_saved_epoch(proc: subprocess.Popen, run: Path, log: Path, timeout: float) -> None:
    """Wait until the training in ``proc`` has saved an epoch to ``run``.

    Saved means what resuming needs: a ``last.pt`` that reads as a kit checkpoint, and the
    history rows up to its epoch. Fails with the tail of ``log`` (the run's output) when the
    process ends first or ``timeout`` seconds pass.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            epoch = read_checkpoint(run / "last.pt")["epoch"]
        except (FileNotFoundError, ValueError):  # not written yet (or, if ever, half written)
            epoch = 0
        if epoch and (run / "history.csv").exists() and len(read_history(run)) >= epoch:
            return
        if proc.poll() is not None:
            why = f"exited with status {proc.returncode} before it could be killed"
        elif time.monotonic() > deadline:
            why = f"saved no epoch within {timeout:.0f} s"
        else:
            time.sleep(0.05)
            continue
        raise AssertionError(f"the training run {why}; its output ends:\n{log.read_text()[-4000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("averaging", [[], ["--ema", "0.9"]], ids=["plain", "ema"])
def test_resume_after_sigkill_matches_an_uninterrupted_run(dataset, tmp_path, averaging):
    epochs, cache = 4, tmp_path / "cache"
    # Fresh processes with one thread each, on the CPU (tiny_args): the killed run and the
    # reference then reduce in the same order, so their numbers can be compared closely.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    kit_train = [sys.executable, "-m", "kit", "train"]

    def train(out, *extra):
        return [*kit_train, *tiny_args(dataset, out, cache, epochs), *averaging, *extra]

    run, log = tmp_path / "killed", tmp_path / "killed.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(train(run), cwd=tmp_path, env=env, stdout=out, stderr=out)
    try:
        # Generous: on a busy 2-core machine the first epoch also builds the tile cache.
        wait_for_saved_epoch(proc, run, log, timeout=300)
    finally:
        proc.send_signal(signal.SIGKILL)  # no-op if it already ended
        proc.wait()
    killed_at = read_checkpoint(run / "last.pt")["epoch"]
    assert killed_at < epochs, "the run finished before the kill: nothing was resumed"

    done = subprocess.run(train(run), cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"resuming {run} after epoch {killed_at} of {epochs}" in done.stdout
    assert done.stdout.strip().splitlines()[-1].startswith("held-out whole-slide Dice: ")
    rows = read_history(run)
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))

    # Per-epoch seeding makes the resumed run follow an uninterrupted one step for step.
    ref = tmp_path / "reference"
    reference = subprocess.run(train(ref), cwd=tmp_path, env=env, capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr
    assert [float(r["train_loss"]) for r in rows] == pytest.approx(
        [float(r["train_loss"]) for r in read_history(ref)], rel=1e-4
    )
    resumed, reference_ckpt = read_checkpoint(run / "last.pt"), read_checkpoint(ref / "last.pt")
    states = ("model_state", "raw_model_state") if averaging else ("model_state",)
    for state in states:  # with EMA: the average and the model it averages
        for key, value in reference_ckpt[state].items():
            torch.testing.assert_close(resumed[state][key], value, rtol=1e-4, atol=1e-5, msg=key)
    if averaging:
        assert resumed["ema_steps"] == reference_ckpt["ema_steps"] > 0

    other = subprocess.run(
        train(run, "--lr", "0.5"), cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert other.returncode == 2 and "lr: 0.0003 -> 0.5" in other.stderr


DDP_SCRIPT = """
import sys, torch
import kit.data, kit.evaluate
from kit.train import TrainConfig, fit

# Spies: the slides this rank scores whole, and those it cuts tiles of (builds caches of).
scored, built = set(), set()
evaluate_slides, index_slide = kit.evaluate.evaluate_slides, kit.data.index_slide
def scoring(data_dir, predictor, ids, *args, **kwargs):
    scored.update(ids)
    return evaluate_slides(data_dir, predictor, ids, *args, **kwargs)
def indexing(path, mask_strip, cfg, slide_id=""):
    built.add(slide_id)
    return index_slide(path, mask_strip, cfg, slide_id)
kit.evaluate.evaluate_slides, kit.data.index_slide = scoring, indexing

cfg = TrainConfig(**{cfg!r})
result = fit(cfg)
rank = result["rank"]
torch.save(result["model"].state_dict(), f"{weights}/rank{{rank}}.pt")
# One write per line: the two ranks share stdout, and print's pieces interleave.
sys.stdout.write("rank %d dice %r\\n" % (rank, result["best_dice"]))
sys.stdout.write("rank %d scored %s\\n" % (rank, " ".join(sorted(scored))))
sys.stdout.write("rank %d built %s\\n" % (rank, " ".join(sorted(built))))
"""


@pytest.mark.slow
def test_two_processes_train_in_step_and_write_once(dataset, tmp_path):
    """Two gloo ranks on the CPU: the same weights, one run folder; each rank builds the tile
    caches of its share of the slides and scores its share of the held-out slides, and their
    summed pixel counts give the Dice one process computes, exactly."""
    run, weights = tmp_path / "ddp", tmp_path / "weights"
    weights.mkdir()
    ids = Competition(dataset).train_ids
    cfg = parse(tiny_args(dataset, run, tmp_path / "cache"))
    cfg = asdict(replace(cfg, valid=ids[:2]))  # a held-out slide for each rank
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
    said = {}  # (rank, what) -> the rest of the line
    for line in done.stdout.splitlines():
        if line.startswith("rank "):
            _, rank, what, *rest = line.split()
            said[rank, what] = rest
    assert said["0", "dice"] == said["1", "dice"] != ["nan"]
    scored = [set(said[r, "scored"]) for r in "01"]
    assert all(scored) and not scored[0] & scored[1] and scored[0] | scored[1] == set(ids[:2])
    built = [set(said[r, "built"]) for r in "01"]
    assert all(built) and not built[0] & built[1] and built[0] | built[1] == set(ids)

    # One process scoring the saved best weights on both slides: the same Dice, to the bit.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran (OMP_NUM_THREADS=1)
    try:
        loaded = load_predictor([run / "best.pt"], device="cpu")
        table = evaluate_slides(dataset, loaded.predictor, ids[:2], loaded.cfg, (), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert float(said["0", "dice"][0]) == float(table["dice"].mean())


def test_a_trained_config_gives_its_inference_settings_to_the_checkpoint_reader():
    cfg = preset("quick", data={"window": 512, "min_tissue": 0.02}, infer={"threshold": 0.4})
    ckpt = {"config": asdict(cfg)}
    assert config_from_checkpoint(ckpt) == replace(cfg.infer, device=None)
    assert (cfg.infer.window, cfg.infer.min_tissue, cfg.infer.overlap) == (512, 0.02, 64)


class HostReads(TorchFunctionMode):
    """Counts the calls that copy a tensor's value to the host: on a GPU, each makes the CPU
    wait until the GPU has computed it, and a wait per step leaves the GPU idle between steps."""

    READS = (torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy)
    READS += (torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__)

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += func in self.READS
        return func(*args, **(kwargs or {}))


def host_reads_of_an_epoch(steps, progress=False):
    """Host reads of one training and one validation pass over ``steps`` batches."""
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 1, 3, padding=1)
    loader = [(torch.rand(2, 3, 9, 7), (torch.rand(2, 1, 9, 7) > 0.5).float())] * steps
    # SGD: AdamW reads its step count on the host every step, but keeps it on the CPU (no wait).
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    run = dict(device=torch.device("cpu"), amp_dtype=None, progress=progress)
    with HostReads() as reads:
        row = train_one_epoch(
            model, loader, BCEDiceLoss(), optimizer, scheduler, scaler, grad_clip=1.0, **run
        )
        row |= evaluate(model, loader, BCEDiceLoss(), **run)
    assert all(math.isfinite(v) for v in row.values())
    return reads.count


def test_an_epoch_reads_from_the_device_a_fixed_number_of_times():
    few = host_reads_of_an_epoch(2)
    assert 0 < few  # the counter sees the reads of the epoch's results
    assert host_reads_of_an_epoch(9) == few
    start = time.perf_counter()
    shown = host_reads_of_an_epoch(9, progress=True)  # a bar reads the loss every BAR_SECONDS
    assert shown <= few + 1 + (time.perf_counter() - start) // BAR_SECONDS


def test_the_lovasz_weight_reaches_the_training_loss(dataset, tmp_path):
    # Same data, seed and first steps: only the loss differs, by the Lovász term (>= 0).
    losses = []
    for weight in ("0", "1"):
        argv = tiny_args(dataset, tmp_path / f"l{weight}", tmp_path / "cache", epochs=1)
        cfg = parse([*argv, "--lovasz-weight", weight, "--eval-every", "1"])
        assert cfg.lovasz_weight == float(weight)
        fit(cfg)
        losses.append(float(read_history(tmp_path / f"l{weight}")[0]["train_loss"]))
    assert losses[1] > losses[0] + 0.01


def test_ema_follows_the_warmed_up_recursion_and_forgets_the_initial_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    average = AveragedModel(model, multi_avg_fn=ema_update(0.995), use_buffers=True)
    expected, steps = None, 270  # about a `cpu` recipe run
    for n in range(steps + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(0.0 if n == 0 else 1.0)  # a step away from the start
        model.train()(torch.randn(4, 3))  # moves the batch-norm buffers too
        average.update_parameters(model)
        value = 0.0 if n == 0 else 1.0
        decay = min(0.995, (1 + n - 1) / (10 + n - 1)) if n else 0.0  # n - 1 earlier updates
        expected = value if expected is None else decay * expected + (1 - decay) * value
    for p in average.module.parameters():
        torch.testing.assert_close(p, torch.full_like(p, expected), rtol=1e-6, atol=0)
    # a fixed 0.995 would keep 0.995 ** 270 = 26% of the start (0.0) in the average
    assert expected > 0.999
    bn, bn_average = model[1], average.module[1]
    assert int(bn_average.num_batches_tracked) == int(bn.num_batches_tracked) == steps + 1


def test_ema_weights_are_what_validation_scores_and_checkpoints_hold(dataset, tmp_path):
    cfg = parse([*tiny_args(dataset, tmp_path / "r", tmp_path / "cache", epochs=1), "--ema", "0.5"])
    result = fit(cfg)
    last = read_checkpoint(tmp_path / "r" / "last.pt")
    best = read_checkpoint(tmp_path / "r" / "best.pt")
    assert last["config"]["ema"] == 0.5 and last["ema_steps"] > 0
    returned = result["model"].state_dict()
    differs = 0
    for key, value in last["model_state"].items():
        torch.testing.assert_close(best["model_state"][key], value, rtol=0, atol=0)
        torch.testing.assert_close(returned[key], value, rtol=0, atol=0)
        differs += not torch.equal(value, last["raw_model_state"][key])
    assert differs > 0  # the average is not the model
    exported = export_model(tmp_path / "r", tmp_path / "export", user="someone", which="last")
    assert "raw_model_state" not in read_checkpoint(exported / "last.pt")
    with pytest.raises(ValueError, match="ema must be a decay"):
        preset("quick", ema=1.0)


@pytest.mark.slow  # ~20 s
def test_the_cpu_preset_trains_with_its_recipe_and_submits_inside_the_cortex(dataset, tmp_path):
    from kit.polygons import rasterize
    from kit.rle import decode
    from kit.submit import read_submission, write_submission
    from kit.train import RECIPE

    run = tmp_path / "run"
    argv = tiny_args(dataset, run, tmp_path / "cache", epochs=1)
    cfg = parse(["--preset", "cpu", *argv, "--crops-per-slide", "8"])
    saved = asdict(cfg)
    for key, value in RECIPE.items():  # the quality table's recipe, through the command line
        got = {k: saved[key][k] for k in value} if isinstance(value, dict) else saved[key]
        assert got == value, key
    fit(cfg)
    loaded = load_predictor([run], device="cpu")
    assert loaded.cfg.cortex_only and loaded.cfg.stain_norm == "reinhard"
    assert loaded.cfg.stain_target is not None
    # At threshold 0 every tissue window is foreground: the filter is what bounds the mask.
    comp, masks = Competition(dataset), {}
    for cortex_only in (True, False):
        cfg = replace(loaded.cfg, threshold=0.0, cortex_only=cortex_only)
        csv = write_submission(dataset, loaded.predictor, tmp_path / f"{cortex_only}.csv", cfg)
        masks[cortex_only] = read_submission(csv).set_index("id")["predicted"]
    (slide_id,) = comp.test_ids
    with Slide(comp.slide_path(slide_id)) as slide:
        shape = slide.shape[:2]
    cortex = rasterize(comp.cortex(slide_id), shape).astype(bool)
    inside, anywhere = (decode(masks[k][slide_id], shape).astype(bool) for k in (True, False))
    assert inside.any() and not (inside & ~cortex).any()
    assert (anywhere & ~cortex).any()  # without the filter the model predicts outside it
    np.testing.assert_array_equal(inside, anywhere & cortex)
