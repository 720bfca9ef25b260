"""Submission files: the sample's ids in order, atomic, resumable to the same bytes, checked."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kit.checkpoint import checkpoint_dict, save_checkpoint
from kit.infer import InferConfig, predict_slide
from kit.model import build_model
from kit.rle import encode
from kit.submit import check_submission, read_ids, share_slides, write_submission

REPO = Path(__file__).resolve().parents[1]

CFG = InferConfig(window=64, overlap=16, scale=2, tissue=False)
IDS = ["d4f1e2", "0a9b3c", "77c0de"]  # deliberately not sorted
SHAPES = {"d4f1e2": (70, 90), "0a9b3c": (50, 40), "77c0de": (81, 33)}


def pointwise(x: torch.Tensor) -> torch.Tensor:
    return 8 * (x[:, 0:1] - x[:, 2:3]) - 0.2


class Counting:
    """A pointwise predictor with a fingerprint, counting calls and windows, failing on demand."""

    def __init__(self, fingerprint="weights-v1", fail_at: int | None = None):
        self.fingerprint = fingerprint
        self.calls = self.windows = 0
        self.fail_at = fail_at

    def __call__(self, x):
        self.calls += 1
        self.windows += len(x)
        if self.calls == self.fail_at:
            raise RuntimeError("interrupted")
        return pointwise(x)


@pytest.fixture
def data_dir(tmp_path, write_tiff):
    """sample_submission.csv listing IDS, their TIFFs (one black: an empty mask), one extra."""
    root = tmp_path / "data"
    (root / "test").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, slide_id in enumerate(IDS):
        image = rng.integers(0, 256, (*SHAPES[slide_id], 3), dtype=np.uint8)
        if slide_id == "0a9b3c":
            image[:] = 0
        write_tiff(root / "test" / f"{slide_id}.tiff", image, "planes" if i == 2 else "rgb")
    write_tiff(root / "test" / "unlisted.tiff", np.zeros((40, 40, 3), np.uint8))
    (root / "sample_submission.csv").write_text(
        "id,predicted\n" + "".join(f"{i},\n" for i in IDS), encoding="ascii"
    )
    return root


def expected_csv(data_dir) -> str:
    rows = [encode(predict_slide(data_dir / "test" / f"{i}.tiff", pointwise, CFG)) for i in IDS]
    return "id,predicted\n" + "".join(f"{i},{r}\n" for i, r in zip(IDS, rows, strict=True))


def test_answers_the_sample_ids_in_order(data_dir, tmp_path):
    out = write_submission(data_dir, pointwise, tmp_path / "sub.csv", CFG, progress=False)
    text = out.read_text(encoding="ascii")
    assert text == expected_csv(data_dir)
    assert "\n0a9b3c,\n" in text and "unlisted" not in text  # empty mask -> empty field
    assert [line.split(",")[0] for line in text.splitlines()[1:]] == IDS
    check_submission(out, data_dir)
    assert not (tmp_path / "sub.csv.parts").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "sub.csv"]


def test_missing_tiffs_are_named_before_any_work(data_dir, tmp_path):
    (data_dir / "test" / "0a9b3c.tiff").unlink()
    (data_dir / "test" / "77c0de.tiff").unlink()
    predictor = Counting()
    with pytest.raises(FileNotFoundError, match="0a9b3c, 77c0de"):
        write_submission(data_dir, predictor, tmp_path / "sub.csv", CFG, progress=False)
    assert predictor.calls == 0 and not (tmp_path / "sub.csv").exists()


def test_failed_run_keeps_the_previous_file_then_resumes_to_the_same_bytes(data_dir, tmp_path):
    out = tmp_path / "sub.csv"
    out.write_text("previous\n")
    failing = Counting(fail_at=2)
    with pytest.raises(RuntimeError, match="interrupted"):
        write_submission(data_dir, failing, out, CFG, progress=False)
    assert out.read_text() == "previous\n"
    assert [p.name for p in (tmp_path / "sub.csv.parts").iterdir()] == ["d4f1e2.rle"]
    assert not list(tmp_path.glob(".sub.csv.*"))  # no temporary file left behind

    resumed = Counting()
    write_submission(data_dir, resumed, out, CFG, progress=False)
    assert resumed.calls == 2  # the first slide came from its part
    assert out.read_text(encoding="ascii") == expected_csv(data_dir)
    assert not (tmp_path / "sub.csv.parts").exists()


def test_a_run_that_finishes_no_slide_leaves_nothing_behind(data_dir, tmp_path):
    # The first slide's TIFF is cut short: the run fails before any slide is done.
    first = data_dir / "test" / f"{IDS[0]}.tiff"
    first.write_bytes(first.read_bytes()[:300])
    with pytest.raises(ValueError, match=IDS[0]):
        write_submission(data_dir, Counting(), tmp_path / "sub.csv", CFG, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_parts_from_another_predictor_or_config_are_not_reused(data_dir, tmp_path):
    out = tmp_path / "sub.csv"
    with pytest.raises(RuntimeError):
        write_submission(data_dir, Counting(fail_at=2), out, CFG, progress=False)
    other_weights = Counting(fingerprint="weights-v2")
    write_submission(data_dir, other_weights, out, CFG, progress=False)
    assert other_weights.calls == 3

    with pytest.raises(RuntimeError):
        write_submission(data_dir, Counting(fail_at=2), out, CFG, progress=False)
    other_config = Counting()
    write_submission(data_dir, other_config, out, InferConfig(64, 16, 2, tissue=False, tta=True))
    # nothing reused: every slide predicted again, each window in four flips (one call)
    assert other_config.calls == 3 and other_config.windows == 4 * other_weights.windows
    # Reading threads cannot change a prediction: such parts are reused.
    with pytest.raises(RuntimeError):
        write_submission(data_dir, Counting(fail_at=2), out, CFG, progress=False)
    same = Counting()
    write_submission(data_dir, same, out, InferConfig(64, 16, 2, tissue=False, workers=0))
    assert same.calls == 2


def test_callables_without_identity_are_never_resumed(data_dir, tmp_path):
    out = tmp_path / "sub.csv"
    with pytest.raises(RuntimeError):
        write_submission(data_dir, Counting(fail_at=2), out, CFG, progress=False)
    calls = []

    def anonymous(x):
        calls.append(1)
        return pointwise(x)

    write_submission(data_dir, anonymous, out, CFG, progress=False)
    assert len(calls) == 3


class Pointwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor(-0.2))

    def forward(self, x):
        return 8 * (x[:, 0:1] - x[:, 2:3]) + self.bias


def test_modules_are_fingerprinted_by_their_weights(data_dir, tmp_path):
    out = tmp_path / "sub.csv"
    model = Pointwise()
    calls = []

    def count_and_fail_second(*_):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("interrupted")

    hook = model.register_forward_hook(count_and_fail_second)
    with pytest.raises(RuntimeError):
        write_submission(data_dir, model, out, CFG, progress=False)
    write_submission(data_dir, model, out, CFG, progress=False)
    assert len(calls) == 4  # 2 (the second failed), then 2: the first slide was reused
    assert out.read_text(encoding="ascii") == expected_csv(data_dir)

    calls.clear()
    with pytest.raises(RuntimeError):
        write_submission(data_dir, model, out, CFG, progress=False)
    hook.remove()
    with torch.no_grad():
        model.bias.fill_(-0.3)  # new weights: nothing reused
    model.register_forward_hook(count_and_fail_second)  # already past its failing call
    write_submission(data_dir, model, out, CFG, progress=False)
    assert len(calls) == 2 + 3


def test_check_submission_names_each_problem(data_dir, tmp_path):
    good = write_submission(data_dir, pointwise, tmp_path / "sub.csv", CFG, progress=False)
    lines = good.read_text().splitlines()
    bad = tmp_path / "bad.csv"

    def check(text: str, match: str) -> None:
        bad.write_text(text)
        with pytest.raises(ValueError, match=match):
            check_submission(bad, data_dir)

    check("id,encoding\n" + "\n".join(lines[1:]) + "\n", "header")
    check("\n".join(lines[:-1]) + "\n", r"2 rows.*missing id\(s\): 77c0de")
    check("\n".join([lines[0], lines[2], lines[1], lines[3]]) + "\n", "row 0 has id '0a9b3c'")
    h, w = SHAPES["0a9b3c"]
    check("\n".join([lines[0], lines[1], f"0a9b3c,{h * w} 2", lines[3]]) + "\n", "0a9b3c.*past")
    check("\n".join([lines[0], lines[1], "0a9b3c,5 2 1 2", lines[3]]) + "\n", "not sorted")


def test_read_ids_rejects_repeats(data_dir):
    assert read_ids(data_dir) == IDS
    (data_dir / "sample_submission.csv").write_text("id,predicted\na,\nb,\na,\n")
    with pytest.raises(ValueError, match="repeated id"):
        read_ids(data_dir)


def test_share_slides_balances_bytes_and_covers_every_slide(tmp_path):
    paths = []
    for k, size in enumerate([50, 400, 10, 300, 120]):
        paths.append(tmp_path / f"{k}.tiff")
        paths[-1].write_bytes(b"x" * size)
    # largest first, each to the lighter process: 400 | 300, 120 -> 420 | 50 -> 450 | 10 -> 430
    assert share_slides(paths, 2) == [[0, 1], [2, 3, 4]]
    assert share_slides(paths, 1) == [[0, 1, 2, 3, 4]]
    assert share_slides(paths[:1], 3) == [[0], [], []]


def test_several_processes_need_a_barrier(data_dir, tmp_path):
    with pytest.raises(ValueError, match="barrier"):
        write_submission(data_dir, pointwise, tmp_path / "s.csv", CFG, rank=0, world=2)


@pytest.mark.slow
def test_torchrun_predict_writes_the_single_process_csv_byte_for_byte(data_dir, tmp_path):
    # Two gloo processes on the CPU share the three slides; rank 0 assembles the CSV.
    torch.manual_seed(3)
    model = build_model("lraspp_mobilenet_v3_large")
    config = {"infer": {"window": 64, "scale": 2, "overlap": 16, "threshold": 0.5}}
    weights = save_checkpoint(tmp_path / "m" / "best.pt", checkpoint_dict(model, config, 1, {}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = ["-m", "kit", "predict", "--data", str(data_dir), "--weights", str(weights),
            "--no-tissue", "--device", "cpu", "--threshold", "0.4985"]  # fmt: skip
    # (the untrained model's probabilities lie within 0.4980-0.4990: about half the pixels)
    single = subprocess.run(
        [sys.executable, *args, "--out", str(tmp_path / "one.csv")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert single.returncode == 0, single.stdout + single.stderr
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         *args, "--out", str(tmp_path / "two.csv")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    one, two = (tmp_path / "one.csv").read_bytes(), (tmp_path / "two.csv").read_bytes()
    assert one == two
    rows = one.decode().splitlines()
    assert len(rows) == 1 + len(IDS) and any(row.split(",")[1] for row in rows[1:])
    assert not (tmp_path / "two.csv.parts").exists()


def test_cortex_only_zeroes_predictions_outside_the_cortex_polygons(data_dir, tmp_path):
    # d4f1e2 has a Cortex polygon (its left half); 77c0de has an anatomy file with no Cortex
    # and 0a9b3c none at all: both are left as they are.
    cortex = [[[0, 0], [45, 0], [45, 70], [0, 70]]]
    features = [
        {
            "type": "Feature",
            "properties": {"classification": {"name": name}},
            "geometry": {"type": "Polygon", "coordinates": cortex},
        }
        for name in ("Cortex",)
    ]
    (data_dir / "test" / "d4f1e2-anatomical-structure.json").write_text(json.dumps(features))
    medulla = [{**features[0], "properties": {"classification": {"name": "Medulla"}}}]
    (data_dir / "test" / "77c0de-anatomical-structure.json").write_text(json.dumps(medulla))
    cfg = dataclasses.replace(CFG, cortex_only=True)
    out = write_submission(data_dir, pointwise, tmp_path / "s.csv", cfg, progress=False)
    rows = dict(line.split(",") for line in out.read_text().splitlines()[1:])
    full = predict_slide(data_dir / "test" / "d4f1e2.tiff", pointwise, CFG)
    assert full[:, 45:].any() and full[:, :45].any()
    left = full.copy()
    left[:, 45:] = 0
    assert rows["d4f1e2"] == encode(left)
    assert rows["77c0de"] == encode(
        predict_slide(data_dir / "test" / "77c0de.tiff", pointwise, CFG)
    )
