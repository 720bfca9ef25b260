"""The competition's submission file: one RLE per row of sample_submission.csv, atomically.

    write_submission("/kaggle/input/hubmap-kidney-segmentation", model, "submission.csv")
    check_submission("submission.csv", "/kaggle/input/hubmap-kidney-segmentation")

The rows answered are exactly those of ``sample_submission.csv``, in its order (the hidden test
set replaces ``test/`` at scoring time: ids are never hard-coded). Each slide is predicted by
`kit.infer.predict_slide_rle` and its RLE kept in a sidecar folder next to the output
(``submission.csv.parts/{id}.rle``), keyed by a fingerprint of the predictor, the config and
the TIFF; a run that was interrupted (a 9-hour Kaggle limit, a crash) resumes where it stopped
and writes the same bytes. The CSV is assembled from the parts into a temporary file and renamed
into place, then the sidecar is removed: a failed run leaves the previous file untouched.

Several processes (``torchrun --nproc_per_node 2 -m kit predict ...``, one per GPU) share the
slides: each predicts its own (`share_slides`: largest TIFFs first, each to the least loaded
process) into the same parts folder, and rank 0 assembles the CSV once every part is there, so
the file is byte-identical to a single process's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from kit import atomic
from kit.competition import Competition
from kit.infer import InferConfig, Predictor, predict_slide_rle, resolve_config
from kit.progress import tile_bar
from kit.rle import parse
from kit.slides import Slide

__all__ = ["check_submission", "read_ids", "read_submission", "share_slides", "write_submission"]

HEADER = "id,predicted"
# Config fields that cannot change a prediction: left out of the resume fingerprint.
_NEUTRAL_FIELDS = ("workers", "prefetch")


def write_submission(
    data_dir: str | os.PathLike,
    predictor: Predictor,
    out_csv: str | os.PathLike,
    cfg: InferConfig | None = None,
    *,
    progress: bool | None = None,
    fingerprint: str | None = None,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] | None = None,
) -> Path:
    """Predict every slide listed in ``data_dir/sample_submission.csv`` and write the CSV.

    Args:
        data_dir: the competition folder: ``sample_submission.csv`` and ``test/{id}.tiff``.
        predictor: float (N, 3, h, w) RGB in [0, 1] -> logits (N, 1, h, w).
        out_csv: the file to write (``id,predicted``; an empty mask is an empty field).
        cfg: the `InferConfig` (default ``InferConfig()``).
        progress: a bar over each slide's tiles, ``predict {id} ({i}/{n})``; None: on a
            terminal or in Jupyter, never into a log file (`kit.progress.show_progress`).
        fingerprint: what identifies the predictor's weights for resuming (e.g. a checkpoint's
            hash). Default: the predictor's ``fingerprint`` attribute, else for a module a hash
            of its parameters and buffers. Other callables without one are not resumed.
        rank, world: this process's place among ``world`` processes sharing the slides
            (torchrun's RANK and WORLD_SIZE); rank 0 writes the CSV.
        barrier: with ``world > 1``, waits for every process (e.g. ``torch.distributed.barrier``
            of a gloo group: it blocks without spinning a core), called once all of this
            process's slides are written.

    Returns:
        ``out_csv`` as a Path (with ``world > 1``: written by rank 0 once every process is done).

    Raises:
        FileNotFoundError: sample_submission.csv or a listed slide is missing (all missing ids
            are named, before any prediction).
        ValueError: sample_submission.csv has no ``id`` column or repeats an id.
    """
    cfg = resolve_config(cfg)
    data_dir, out_csv = Path(data_dir), Path(out_csv)
    comp = Competition(data_dir)
    ids = comp.test_ids
    paths = comp.slide_paths(ids)
    identity = _predictor_identity(predictor, fingerprint)
    if world > 1 and barrier is None:
        raise ValueError(f"world {world}: several processes need a barrier to meet at")
    mine = share_slides([paths[i] for i in ids], world)[rank] if world > 1 else range(len(ids))
    # Created by the first finished slide: a run that finishes none leaves nothing to resume.
    parts = out_csv.with_name(out_csv.name + ".parts")
    for n, k in enumerate(mine, 1):
        slide_id = ids[k]
        key = _slide_key(identity, cfg, paths[slide_id]) if identity is not None else None
        part = parts / f"{slide_id}.rle"
        if key is not None and _read_part(part, key) is not None:
            continue  # finished by an earlier, interrupted run
        label = f"predict {slide_id} ({n}/{len(mine)}" + (f", rank {rank})" if world > 1 else ")")
        with tile_bar(label, progress) as advance:
            keep = comp.cortex(slide_id) if cfg.cortex_only else None
            rle = predict_slide_rle(paths[slide_id], predictor, cfg, on_progress=advance, keep=keep)
        atomic.write_text(part, f"{key or '-'}\n{rle}\n", encoding="ascii", newline="")
    if world > 1:
        barrier()
        if rank != 0:
            return out_csv
    _assemble(out_csv, ids, parts)
    shutil.rmtree(parts, ignore_errors=True)
    return out_csv


def share_slides(paths: Sequence[Path], world: int) -> list[list[int]]:
    """Indices of ``paths`` per process: the largest files first, each to the process with the
    fewest bytes so far (ties: the lowest rank); each list in ascending order."""
    sizes = [Path(p).stat().st_size for p in paths]
    load = [0] * world
    shares: list[list[int]] = [[] for _ in range(world)]
    for k in sorted(range(len(paths)), key=lambda k: (-sizes[k], k)):
        r = min(range(world), key=lambda r: (load[r], r))
        shares[r].append(k)
        load[r] += sizes[k]
    return [sorted(share) for share in shares]


def _assemble(out_csv: Path, ids: Sequence[str], parts: Path) -> None:
    """Write ``out_csv`` atomically from the parts of ``ids``, in order.

    Always from the parts, so an interrupted and resumed run writes the same bytes.
    """
    with atomic.writer(out_csv, encoding="ascii", newline="") as fh:
        fh.write(HEADER + "\n")
        for slide_id in ids:
            rle = _read_part(parts / f"{slide_id}.rle")
            if rle is None:  # removed or damaged since it was written
                raise FileNotFoundError(f"prediction of {slide_id} lost from {parts}; run again")
            fh.write(f"{slide_id},{rle}\n")


def check_submission(csv: str | os.PathLike, data_dir: str | os.PathLike) -> None:
    """Check a submission against the competition folder; raise ValueError naming the problem.

    Checks: the header is ``id,predicted``; the ids are those of sample_submission.csv, in its
    order; every RLE is valid (sorted, non-overlapping, inside the slide) for its slide's shape,
    read from ``data_dir/test/{id}.tiff``.
    """
    csv, data_dir = Path(csv), Path(data_dir)
    if not csv.is_file():
        raise FileNotFoundError(f"submission not found: {csv}")
    with open(csv, encoding="utf-8", newline="") as fh:
        header = fh.readline().rstrip("\r\n")
    if header != HEADER:
        raise ValueError(f"{csv}: header is {header!r}, expected {HEADER!r}")
    frame = read_submission(csv)
    expected = read_ids(data_dir)
    got = frame["id"].tolist()
    if len(got) != len(expected):
        raise ValueError(
            f"{csv}: {len(got)} rows, sample_submission.csv has {len(expected)}"
            + _id_difference(got, expected)
        )
    for row, (a, b) in enumerate(zip(got, expected, strict=True)):
        if a != b:
            raise ValueError(
                f"{csv}: row {row} has id {a!r}, sample_submission.csv has {b!r} there"
                + _id_difference(got, expected)
            )
    paths = Competition(data_dir).slide_paths(expected)
    check_rles(csv, zip(got, frame["predicted"], strict=True), paths)


def check_rles(
    csv: str | os.PathLike,
    rows: Iterable[tuple[str, str]],
    paths: Mapping[str, str | os.PathLike],
) -> None:
    """ValueError naming ``csv``, the row, the id and the slide's shape for the first RLE of
    ``rows`` (id, rle) that does not fit its slide at ``paths[id]`` (sorted, non-overlapping,
    inside the slide)."""
    for row, (slide_id, rle) in enumerate(rows):
        with Slide(paths[slide_id]) as slide:
            shape = slide.shape
        try:
            parse(rle, shape)
        except ValueError as e:
            raise ValueError(f"{csv}: row {row}, id {slide_id} (shape {shape}): {e}") from e


def read_submission(csv: str | os.PathLike) -> pd.DataFrame:
    """A submission file as strings (``id``, ``predicted``; an empty mask stays ``""``)."""
    return pd.read_csv(csv, dtype=str, keep_default_na=False)


def read_ids(data_dir: str | os.PathLike) -> list[str]:
    """The ids of ``data_dir/sample_submission.csv``, in order (`Competition.test_ids`)."""
    return Competition(data_dir).test_ids


def _id_difference(got: Sequence[str], expected: Sequence[str]) -> str:
    """ "; missing id(s): ...; unexpected id(s): ..." ("" when the sets agree)."""
    extra = [i for i in got if i not in set(expected)]
    absent = [i for i in expected if i not in set(got)]
    notes = []
    if absent:
        notes.append(f"missing id(s): {', '.join(absent)}")
    if extra:
        notes.append(f"unexpected id(s): {', '.join(extra)}")
    return "; " + "; ".join(notes) if notes else ""


# ---------------------------------------------------------------------------------------------
# Resuming


def _predictor_identity(predictor: Predictor, fingerprint: str | None) -> str | None:
    """A string naming the predictor's weights, or None when nothing identifies them."""
    if fingerprint is not None:
        return str(fingerprint)
    attribute = getattr(predictor, "fingerprint", None)
    if attribute is not None:
        return str(attribute)
    if isinstance(predictor, nn.Module):
        digest = hashlib.sha256(type(predictor).__qualname__.encode())
        for name, tensor in predictor.state_dict().items():
            digest.update(name.encode())
            digest.update(str(tensor.dtype).encode())
            digest.update(str(tuple(tensor.shape)).encode())
            # Hash the raw bytes; bf16/fp16 have no numpy dtype, so view them as int16.
            t = tensor.detach().cpu().contiguous()
            if t.dtype in (torch.bfloat16, torch.float16):
                t = t.view(torch.int16)
            digest.update(t.numpy().tobytes())
        return "module:" + digest.hexdigest()
    return None


def _slide_key(identity: str, cfg: InferConfig, tiff: Path) -> str:
    """Fingerprint of one slide's prediction: predictor, the config's effective fields, TIFF."""
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NEUTRAL_FIELDS}
    stat = tiff.stat()
    payload = {
        "predictor": identity,
        "config": {k: str(v) if isinstance(v, torch.device) else v for k, v in fields.items()},
        "tiff": [tiff.name, stat.st_size, stat.st_mtime_ns],
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def _read_part(part: Path, key: str | None = None) -> str | None:
    """A part's RLE; None if it is absent, unreadable or was written under another ``key``."""
    try:
        stored, rle = part.read_text(encoding="ascii").split("\n")[:2]
    except (FileNotFoundError, ValueError):
        return None
    return rle if key is None or stored == key else None
