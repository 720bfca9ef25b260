"""``python -m kit``: the command line that mirrors the notebooks.

    python -m kit synth --out data/synthetic            # a dataset in the competition's layout
    python -m kit train --data DIR --out runs/r1 --preset quick --valid ID
    python -m kit evaluate --data DIR --weights runs/r1/best.pt --slides ID
    python -m kit predict --data DIR --weights runs/r1/best.pt --out submission.csv
    python -m kit demo                                  # all of the above on the synthetic default
    python -m kit export --run runs/r1 --out model-dataset
    python -m kit wheels                                # the offline wheelhouse for Kaggle

A user error (bad path, bad value) prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# The argument definitions live next to what they configure; the work is imported per command.
from kit import kaggle, wheels
from kit.synthetic import DEFAULT_PARAMS as SYNTH
from kit.train import add_train_arguments


def _synth(args: argparse.Namespace) -> None:
    from kit.synthetic import make_dataset

    out = make_dataset(
        args.out,
        slides=args.slides,
        test_slides=args.test_slides,
        size=tuple(args.size) if args.size else None,
        seed=args.seed,
        patients=args.patients,
        overwrite=args.overwrite,
        profile=args.profile,
    )
    _describe_dataset(out)


def _describe_dataset(path: Path) -> None:
    import pandas as pd

    train = pd.read_csv(path / "train.csv")
    test = pd.read_csv(path / "sample_submission.csv")
    print(f"dataset: {path}")
    print(f"  train slides ({len(train)}): {' '.join(train['id'])}")
    print(f"  test slides ({len(test)}): {' '.join(test['id'])}")


def _infer_config(args: argparse.Namespace, checkpoint: dict):
    """Inference options: the checkpoint's training settings, then the command line's."""
    from kit.infer import config_from_checkpoint

    return config_from_checkpoint(
        checkpoint,
        overlap=args.overlap,
        threshold=args.threshold,
        batch_size=args.batch_size,
        device=args.device,
        tta=True if args.tta else None,
    )


def _load(args: argparse.Namespace):
    from kit.model import load_model

    model, ckpt = load_model(args.weights, device=args.device)  # None: kit.device's default
    return model, ckpt


def _predict(args: argparse.Namespace) -> None:
    from kit.model import fingerprint
    from kit.submit import check_submission, write_submission

    model, ckpt = _load(args)
    cfg = _infer_config(args, ckpt)
    out = write_submission(args.data, model, args.out, cfg, fingerprint=fingerprint(args.weights))
    check_submission(out, args.data)
    print(f"submission: {out}")


def _evaluate(args: argparse.Namespace) -> None:
    from kit.evaluate import evaluate_slides, format_report

    model, ckpt = _load(args)
    cfg = _infer_config(args, ckpt)
    table = evaluate_slides(args.data, model, args.slides, cfg)
    print(format_report(table))


def _train(args: argparse.Namespace) -> None:
    from kit.train import config_from_args, fit

    result = fit(config_from_args(args))
    if result.get("rank", 0) == 0:
        print(f"held-out whole-slide Dice: {result['best_dice']:.4f} ({result['best_path']})")


def _demo(args: argparse.Namespace) -> None:
    from kit.demo import run_demo

    run_demo(args.out, data=args.data)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kit",
        description="HuBMAP 'Hacking the Kidney' kit: synthetic data, training, whole-slide "
        "inference and Kaggle submission.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("synth", help="write a synthetic dataset in the competition's layout")
    p.add_argument("--out", type=Path, required=True, help="folder to create")
    p.add_argument("--slides", type=int, default=SYNTH["slides"], help="number of slides in all")
    p.add_argument("--test-slides", type=int, default=SYNTH["test_slides"], help="test slides")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="default: the profile's")
    p.add_argument(
        "--profile", choices=("mini", "realistic"), default="mini", help="scale/difficulty"
    )
    p.add_argument("--seed", type=int, default=SYNTH["seed"])
    p.add_argument("--patients", type=int, help="number of patients (default ~0.6/slide)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    p.set_defaults(run=_synth)

    p = sub.add_parser("train", help="train a model with held-out-slide validation")
    add_train_arguments(p)
    p.set_defaults(run=_train)

    for name, helptext, run in (
        ("predict", "write submission.csv for the ids of sample_submission.csv", _predict),
        ("evaluate", "whole-slide Dice on training slides, with a threshold sweep", _evaluate),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--data", type=Path, required=True, help="competition folder")
        p.add_argument("--weights", type=Path, required=True, help="a kit checkpoint (best.pt)")
        p.add_argument("--overlap", type=int, help="tile overlap in full-resolution pixels")
        p.add_argument("--threshold", type=float, help="probability threshold")
        p.add_argument("--batch-size", type=int)
        p.add_argument("--tta", action="store_true", help="flip test-time augmentation")
        p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
        if name == "predict":
            p.add_argument("--out", type=Path, default=Path("submission.csv"))
        else:
            p.add_argument("--slides", nargs="+", metavar="ID", help="default: all of train.csv")
        p.set_defaults(run=run)

    p = sub.add_parser("demo", help="synth -> train (quick) -> evaluate -> predict")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder for all results")
    p.add_argument("--data", type=Path, help="use this dataset instead of the synthetic default")
    p.set_defaults(run=_demo)

    for name, helptext in (
        ("wheels", "build the offline wheelhouse for the Kaggle notebook"),
        ("export", "write a model dataset (checkpoint + dataset-metadata.json)"),
        ("kaggle-metadata", "fill your Kaggle user name into every metadata file"),
    ):
        p = sub.add_parser(name, help=helptext)
        attr = name.replace("-", "_")
        module = wheels if name == "wheels" else kaggle
        getattr(module, f"add_{attr}_arguments")(p)
        p.set_defaults(run=getattr(module, f"run_{attr}"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
