"""Pseudo-labels: test slides labelled by a submission, added to the training slides.

    labels = read_pseudo_labels("runs/r1/submission.csv", "data/synthetic")
    labels.ids, labels.masks["aa05346ff"], labels.sha256

The 1st and 4th places trained a second round on the test slides labelled by their first
model's predictions (the 17th found it useless on the private leaderboard: measure it). The
recipe, with the kit::

    python -m kit train --data DIR --out runs/r1 --preset full
    python -m kit predict --data DIR --weights runs/r1/best.pt --out runs/r1/submission.csv
    python -m kit train --data DIR --out runs/r2 --preset full --pseudo runs/r1/submission.csv

The listed slides are training slides only, in every fold (`kit.train`, `kit.cv`): never held
out, never scored out of fold. Their tile caches are keyed by the submission's RLE (the cache
key hashes the mask), so another submission gives other caches.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from kit.competition import Competition
from kit.submit import check_rles, read_submission

__all__ = ["PseudoLabels", "file_digest", "read_pseudo_labels"]


@dataclass(frozen=True)
class PseudoLabels:
    """The test slides of a submission file and their masks, as RLE strings."""

    csv: Path
    sha256: str  # of the file's bytes: config.json records it
    masks: dict[str, str]  # slide id -> RLE ("" for an empty mask), in the file's order

    @property
    def ids(self) -> list[str]:
        return list(self.masks)

    def record(self) -> dict:
        """What a run folder records of them: the file, its digest and the slides."""
        return {"csv": str(self.csv), "sha256": self.sha256, "ids": self.ids}


def read_pseudo_labels(csv: str | os.PathLike, data_dir: str | os.PathLike) -> PseudoLabels:
    """The masks of a submission file (``id,predicted``) for test slides of ``data_dir``.

    Every check is made here, before any training: each error names the file.

    Raises:
        FileNotFoundError: no such file, or a listed slide has no TIFF in ``test/``.
        ValueError: not an ``id,predicted`` CSV, no rows, repeated ids, ids that are not test
            ids (rows of sample_submission.csv; training slides included), or an RLE that does
            not fit its slide (out of bounds, unsorted, not integers).
    """
    csv = Path(csv)
    if not csv.is_file():
        raise FileNotFoundError(f"pseudo-label file not found: {csv}")
    frame = _read(csv)
    ids = [i.strip() for i in frame["id"]]
    if not ids:
        raise ValueError(f"{csv}: no rows, no slides to pseudo-label")
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise ValueError(f"{csv}: repeated id(s): {', '.join(repeated)}")
    comp = Competition(data_dir)
    # A training slide has its truth, and may be held out: it is never pseudo-labelled.
    not_test = [i for i in ids if i not in set(comp.test_ids) or i in set(comp.train_ids)]
    if not_test:
        raise ValueError(
            f"{csv}: id(s) not among the test slides of {comp.root / 'sample_submission.csv'}: "
            f"{', '.join(not_test)} (pseudo-labels are for test slides only)"
        )
    try:
        paths = comp.slide_paths(ids)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{csv}: {err}") from err
    masks = dict(zip(ids, (str(rle).strip() for rle in frame["predicted"]), strict=True))
    check_rles(csv, masks.items(), paths)
    return PseudoLabels(csv, file_digest(csv), masks)


def file_digest(csv: str | os.PathLike) -> str:
    """The sha256 of a pseudo-label file's bytes (`PseudoLabels.sha256`)."""
    return hashlib.sha256(Path(csv).read_bytes()).hexdigest()


def _read(csv: Path):
    """The file as `kit.submit.read_submission` reads it, with its two columns checked."""
    try:
        frame = read_submission(csv)
    except (ValueError, UnicodeDecodeError) as err:  # pandas' ParserError is a ValueError
        raise ValueError(f"{csv}: not a submission CSV ({err})") from err
    missing = [c for c in ("id", "predicted") if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{csv}: no column(s) {', '.join(missing)} (columns: {list(frame.columns)}); "
            "expected a submission file: id,predicted"
        )
    return frame
