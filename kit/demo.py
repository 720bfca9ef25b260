"""The main job end to end on the embedded default: synth -> train -> evaluate -> submission.

    python -m kit demo [--out runs/demo] [--data DIR]     # what `make demo` runs

Trains the ``quick`` preset (a small model that learns the synthetic glomeruli on a CPU in a few
minutes), scores the held-out slides at full resolution through the submission path, and
answers ``sample_submission.csv``. Every result's location is printed; rerunning resumes or
reuses what is already there.
"""

from __future__ import annotations

import os
from pathlib import Path

from kit.checkpoint import fingerprint, load_model
from kit.competition import Competition
from kit.evaluate import evaluate_slides, format_report, mean_dice
from kit.infer import config_from_checkpoint
from kit.submit import check_submission, write_submission
from kit.synthetic import default_dataset
from kit.train import fit, preset


def run_demo(out: str | os.PathLike = "runs/demo", data: str | os.PathLike | None = None) -> dict:
    """Run the demo into ``out``; return the held-out Dice and the paths written."""
    out = Path(out)
    data_dir = Path(data) if data is not None else default_dataset()
    _ = Competition(data_dir).test_ids  # FileNotFoundError naming sample_submission.csv if absent
    print(f"[1/4] dataset: {data_dir}")

    cfg = preset("quick", data_dir=str(data_dir), out=str(out / "run"))
    print(f"[2/4] training {cfg.model} ({cfg.epochs} epochs) into {cfg.out}")
    result = fit(cfg)

    model, checkpoint = load_model(result["best_path"], device="cpu")
    infer_cfg = config_from_checkpoint(checkpoint)
    print(f"[3/4] whole-slide Dice on the held-out slides {result['valid_ids']}")
    scores = evaluate_slides(data_dir, model, result["valid_ids"], infer_cfg)
    print(format_report(scores))

    submission = out / "submission.csv"
    print(f"[4/4] predicting the test slides into {submission}")
    write_submission(
        data_dir, model, submission, infer_cfg, fingerprint=fingerprint(result["best_path"])
    )
    check_submission(submission, data_dir)

    dice = float(mean_dice(scores)["dice"])
    print(f"run folder: {result['run_dir']} (config.json, history.csv, best.pt, last.pt)")
    print(f"submission: {submission}")
    print(f"held-out whole-slide Dice: {dice:.4f}")
    return {"dice": dice, "run_dir": result["run_dir"], "submission": submission}
