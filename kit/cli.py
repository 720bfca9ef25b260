"""``python -m kit``: the command line that mirrors the notebooks.

    python -m kit synth --out data/synthetic            # a dataset in the competition's layout
    python -m kit train --data DIR --out runs/r1 --preset quick --valid ID
    python -m kit cv --data DIR --out runs/cv --preset quick  # every fold, OOF threshold
    python -m kit evaluate --data DIR --weights runs/r1/best.pt --slides ID
    python -m kit predict --data DIR --weights runs/r1/best.pt --out submission.csv
    python -m kit demo                                  # all of the above on the synthetic default
    python -m kit export --run runs/r1 --out model-dataset
    python -m kit wheels                                # the offline wheelhouse for Kaggle

A user error (bad path, bad value) prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

# The work of each command is imported when it runs; the configs are imported for their fields.
from kit import checkpoint, kaggle, wheels
from kit.data import DataConfig
from kit.infer import InferConfig
from kit.synthetic import DEFAULT_PARAMS as SYNTH
from kit.train import (
    DEFAULT_FOLDS,
    DERIVED_FIELDS,
    FITTED_FIELDS,
    PRESETS,
    SHARED_FIELDS,
    TrainConfig,
    merge_config,
)

# --------------------------------------------------------------------------- flags from configs


def add_config_arguments(parser, cls, *, taken: set[str], section="", prefix="", skip=()) -> None:
    """One flag per field of dataclass ``cls``, its help from the field's metadata.

    A field's flag is ``--name`` (or its metadata's ``flag``), or ``--{prefix}-name`` when an
    earlier flag took that name. Fields of a section land in ``args`` as ``section.name``. Bool
    fields get ``--x/--no-x``, list fields take one or more values, optional fields accept
    ``none``; options not given are absent from ``args`` (the preset or default stays).
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        dest = f"{section}.{f.name}" if section else f.name
        if dest in skip or f.name in skip or dataclasses.is_dataclass(hints[f.name]):
            continue
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        if flag in taken:
            flag = f"--{prefix}-{f.name.replace('_', '-')}"
        taken.add(flag)
        kwargs = _value_kwargs(hints[f.name])
        if "action" not in kwargs:
            kwargs["metavar"] = f.metadata.get("metavar") or flag[2:].replace("-", "_").upper()
        parser.add_argument(
            flag, dest=dest, default=argparse.SUPPRESS, help=f.metadata.get("help"),
            required=f.metadata.get("required", False), **kwargs,
        )  # fmt: skip


def _value_kwargs(hint) -> dict:
    args = typing.get_args(hint)
    optional = type(None) in args
    base = args[0] if optional else hint  # X | None (or str | torch.device | None): X
    if base is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(base) is list:
        item = typing.get_args(base)[0]
        return {"nargs": "+", "type": item if item in (int, float) else str}
    convert = base if base in (int, float) else str
    return {"type": _or_none(convert) if optional else convert}


def _or_none(convert):
    def parse(text: str):
        return None if text.lower() == "none" else convert(text)

    parse.__name__ = convert.__name__  # argparse names it in "invalid int value"
    return parse


def add_train_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """The ``train`` options: every TrainConfig field; those of ``infer`` and ``data`` flat, or
    ``--infer-x`` / ``--tile-x`` where a name is taken (``--infer-batch-size``, ``--tile-overlap``).
    TrainConfig fields named in ``skip`` get no flag (the command sets them).
    """
    parser.add_argument("--preset", choices=sorted(PRESETS), help="start from a named config")
    parser.add_argument("--overwrite", action="store_true", help="start the run in --out over")
    taken = {"--preset", "--overwrite"}
    add_config_arguments(parser, TrainConfig, taken=taken, skip=skip)
    for section, cls, prefix in (("infer", InferConfig, "infer"), ("data", DataConfig, "tile")):
        add_config_arguments(
            parser, cls, taken=taken, section=section, prefix=prefix, skip=DERIVED_FIELDS
        )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from parsed ``train`` options: the preset (or defaults), then given options."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {"data": {}, "infer": {}}
    for dest, value in vars(args).items():
        section, _, name = dest.rpartition(".")
        if section in given:
            given[section][name] = value
        elif dest in names:
            given[dest] = value
    if "valid" in given and "fold" in given:
        raise ValueError("--valid and --fold exclude each other: give one")
    if args.overwrite:
        given["resume"] = False
    return TrainConfig(**merge_config(PRESETS.get(args.preset or "", {}), given))


# --------------------------------------------------------------------------- commands


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
    from kit.competition import Competition

    comp = Competition(path)
    print(f"dataset: {path}")
    print(f"  train slides ({len(comp.train_ids)}): {' '.join(comp.train_ids)}")
    print(f"  test slides ({len(comp.test_ids)}): {' '.join(comp.test_ids)}")


def _load(args: argparse.Namespace, device=None):
    """The predictor (a model, or an ensemble of several) and its inference settings: the
    checkpoints', the manifest's, then the command line's (`kit.ensemble.load_predictor`)."""
    from kit.ensemble import describe, load_predictor

    given = {k: v for k, v in vars(args).items() if k in InferConfig.__dataclass_fields__}
    given["device"] = device or given.get("device")  # None: the default device
    loaded = load_predictor(args.weights, **given)
    print(describe(loaded))
    return loaded


def _predict(args: argparse.Namespace) -> None:
    """Under torchrun the processes share the slides (one GPU each) and rank 0 writes the CSV;
    a gloo group only for the final barrier, which waits without spinning a core."""
    from datetime import timedelta

    import torch.distributed as dist

    from kit.device import rank_device, torchrun_place
    from kit.submit import check_submission, write_submission

    rank, world, local = torchrun_place()
    device = rank_device(args.device, local, world) if world > 1 else None
    if world > 1:
        dist.init_process_group("gloo", timeout=timedelta(hours=9))  # Kaggle's session limit
    try:
        loaded = _load(args, device)
        out = write_submission(
            args.data, loaded.predictor, args.out, loaded.cfg, fingerprint=loaded.fingerprint,
            rank=rank, world=world, barrier=dist.barrier if world > 1 else None,
        )  # fmt: skip
    finally:
        if world > 1:
            dist.destroy_process_group()
    if rank == 0:
        check_submission(out, args.data)
        print(f"submission: {out}")


def _evaluate(args: argparse.Namespace) -> None:
    from kit.evaluate import evaluate_slides, format_report

    loaded = _load(args)
    table = evaluate_slides(args.data, loaded.predictor, args.slides, loaded.cfg)
    print(format_report(table))


def _train(args: argparse.Namespace) -> None:
    from kit.train import fit

    result = fit(config_from_args(args))
    if result.get("rank", 0) == 0:
        print(f"held-out whole-slide Dice: {result['best_dice']:.4f} ({result['best_path']})")


def _cv(args: argparse.Namespace) -> None:
    from kit.cv import run_cv

    run_cv(config_from_args(args), args.folds)  # prints the out-of-fold report (rank 0)


def _demo(args: argparse.Namespace) -> None:
    from kit.demo import run_demo

    run_demo(args.out, data=args.data)


def _export(args: argparse.Namespace) -> None:
    """Export the model dataset; warn when the kernel does not attach it."""
    root = Path(args.root) if args.root else kaggle.repo_root()
    out = checkpoint.export_model(
        args.run_dir, args.out, which=args.which, user=args.user, slug=args.slug,
        title=args.title, keep_training_state=args.keep_training_state, root=root,
    )  # fmt: skip
    meta = json.loads((out / kaggle.DATASET_METADATA).read_text())
    for path in sorted(out.iterdir()):
        print(f"  {path.name} ({kaggle.human_size(path)})")
    print(f"model dataset {meta['id']}: {out}")
    kernel = root / kaggle.KERNEL_METADATA
    if kernel.is_file():
        sources = json.loads(kernel.read_text()).get("dataset_sources", [])
        if meta["id"] not in sources:
            print(f"warning: {kernel} does not attach {meta['id']} (dataset_sources: {sources})")
    if meta["id"].startswith(kaggle.PLACEHOLDER_USER + "/"):
        print("warning: no Kaggle user recorded: python -m kit kaggle-metadata --user NAME")
    print(f"publish: kaggle datasets create -p {out}  (new version: kaggle datasets version)")


def _kaggle_metadata(args: argparse.Namespace) -> None:
    """Record the user's name and fill it into every metadata file, or ``--check`` them."""
    root = Path(args.root) if args.root else kaggle.repo_root()
    files = kaggle.metadata_files(root, args.datasets)
    if args.check:
        kaggle.check_all_metadata(root, args.datasets, user=args.user)
        print("metadata ready: " + ", ".join(str(p) for p in files))
        return
    for path in kaggle.fill_metadata(args.user, root=root, datasets=args.datasets):
        print(f"wrote {path}")
    user = kaggle.read_user(root)
    print(f"Kaggle user: {user} (recorded in {root / kaggle.USER_FILE})")
    if user == kaggle.PLACEHOLDER_USER:
        print("warning: still the placeholder name: python -m kit kaggle-metadata --user NAME")
    for path in files:
        for problem in kaggle.metadata_problems(path):
            print(f"warning: {path}: {problem}")


def _wheels(args: argparse.Namespace) -> None:
    """Build the wheelhouse(s); a kaggle wheelhouse also gets its dataset-metadata.json."""
    root = Path(args.root) if args.root else kaggle.repo_root()
    out = Path(args.out) if args.out else root / "wheels"
    targets = wheels.TARGETS if args.target == "both" else (args.target,)
    for target in targets:
        wheels.build_target(out, target, requirements=args.requirements, root=root, log=print)
    if "kaggle" in targets:
        print(f"publish: kaggle datasets create -p {out}  (new version: kaggle datasets version)")


# --------------------------------------------------------------------------- parser


# One straight list of the subcommands and their options: it reads best whole.
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

    p = sub.add_parser(
        "cv", help="cross-validation: every fold, out-of-fold Dice and threshold, fold ensemble"
    )
    # Each fold holds out its own slides: no --fold, --valid or --n-folds (--folds instead).
    add_train_arguments(p, skip=("fold", "valid", "n_folds"))
    p.add_argument(
        "--folds", type=int, metavar="K",
        help=f"folds of the grouped k-fold (default {DEFAULT_FOLDS}, or one per group if fewer)",
    )  # fmt: skip
    p.set_defaults(run=_cv)

    for name, helptext, run in (
        ("predict", "write submission.csv for the ids of sample_submission.csv", _predict),
        ("evaluate", "whole-slide Dice on training slides, with a threshold sweep", _evaluate),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--data", type=Path, required=True, help="competition folder")
        p.add_argument(
            "--weights", type=Path, nargs="+", required=True, metavar="W",
            help="kit checkpoints (.pt), run folders, a cv folder (every fold) or a folder with "
            "ensemble.json; several make an ensemble",
        )  # fmt: skip
        # The window, scale, tissue rule and stain normalisation are the checkpoint's.
        add_config_arguments(p, InferConfig, taken=set(), skip=(*SHARED_FIELDS, *FITTED_FIELDS))
        if name == "predict":
            p.add_argument("--out", type=Path, default=Path("submission.csv"))
        else:
            p.add_argument("--slides", nargs="+", metavar="ID", help="default: all of train.csv")
        p.set_defaults(run=run)

    p = sub.add_parser("demo", help="synth -> train (quick) -> evaluate -> predict")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder for all results")
    p.add_argument("--data", type=Path, help="use this dataset instead of the synthetic default")
    p.set_defaults(run=_demo)
    _add_kaggle_commands(sub)
    return parser


def _add_kaggle_commands(sub) -> None:
    """wheels, export and kaggle-metadata."""
    p = sub.add_parser("wheels", help="build the offline wheelhouse for the Kaggle notebook")
    p.add_argument("--out", type=Path, help="default: <repo>/wheels; local target: OUT/local")
    p.add_argument(
        "--target", choices=(*wheels.TARGETS, "both"), default="kaggle",
        help="kaggle: CPython 3.12 manylinux x86_64 (the Kaggle image); local: this interpreter",
    )  # fmt: skip
    p.add_argument("--requirements", type=Path, help="default: <repo>/wheels/requirements.txt")
    p.add_argument("--root", type=Path, help="the kit's source tree (default: this repo)")
    p.set_defaults(run=_wheels)

    p = sub.add_parser("export", help="write a model dataset (checkpoint + dataset-metadata.json)")
    # --run lands in args.run_dir: args.run is the command's handler.
    p.add_argument(
        "--run", dest="run_dir", metavar="RUN", type=Path, required=True,
        help="a run folder, or a folder with ensemble.json (kit cv's: every fold is exported)",
    )  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="the model dataset folder")
    p.add_argument("--which", choices=tuple(checkpoint.CHECKPOINTS), default="best")
    p.add_argument("--slug", default=kaggle.MODEL_SLUG, help="dataset URL slug (6-50 characters)")
    p.add_argument("--title", default=kaggle.MODEL_TITLE, help="dataset title (6-50 characters)")
    p.add_argument("--user", help="Kaggle owner (default: the one in kaggle-user.txt)")
    p.add_argument(
        "--keep-training-state", action="store_true",
        help="keep optimizer/scheduler state (only resuming training needs it)",
    )  # fmt: skip
    p.add_argument("--root", type=Path, help="the repository (default: this repo)")
    p.set_defaults(run=_export)

    p = sub.add_parser(
        "kaggle-metadata", help="fill your Kaggle user name into every metadata file"
    )
    p.add_argument("--user", help="your Kaggle user name (recorded in kaggle-user.txt)")
    p.add_argument("datasets", nargs="*", type=Path, help="model dataset folders to fill too")
    p.add_argument(
        "--check", action="store_true",
        help="only validate every metadata file (fails on problems or an unset user name)",
    )  # fmt: skip
    p.add_argument("--root", type=Path, help="the repository (default: this repo)")
    p.set_defaults(run=_kaggle_metadata)


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
