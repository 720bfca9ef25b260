"""Files and folders that appear whole or not at all.

A file is written under a hidden name in its folder, synced and renamed over the target; on
failure the target is untouched. Files get mode 0644 (``mkstemp`` makes 0600; these files are
shared: datasets, submissions, runs). Folders are built next to the target, then swapped in.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

FILE_MODE = 0o644


@contextlib.contextmanager
def writer(
    path: str | os.PathLike, mode: str = "w", encoding: str = "utf-8", newline: str | None = None
) -> Iterator[IO]:
    """Open a temporary file next to ``path`` (``mode`` "w" or "wb"); on a clean exit it is
    synced and renamed over ``path``, on an exception it is removed and ``path`` is untouched."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic writer mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        text = {"encoding": encoding, "newline": newline} if mode == "w" else {}
        with os.fdopen(fd, mode, **text) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_text(
    path: str | os.PathLike, text: str, encoding: str = "utf-8", newline: str | None = None
) -> Path:
    """Write ``text`` to ``path`` atomically; return the path."""
    with writer(path, "w", encoding=encoding, newline=newline) as fh:
        fh.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, document: Any, indent: int = 2) -> Path:
    """Write ``document`` as UTF-8 JSON (non-ASCII kept, trailing newline) atomically."""
    return write_text(path, json.dumps(document, indent=indent, ensure_ascii=False) + "\n")


def swap_folder(staging: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Rename the finished folder ``staging`` to ``target``, replacing a previous ``target`` as
    a whole (it is moved aside first, then removed). ``staging`` must sit in ``target``'s
    file system, best in the same folder."""
    staging, target = Path(staging), Path(target)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def place_folder(built: str | os.PathLike, target: str | os.PathLike, keep) -> bool:
    """Rename the finished folder ``built`` to ``target`` (True) unless another builder got there
    first with a folder that ``keep(target)`` accepts (False: the caller discards ``built``).
    Anything else at ``target`` (stale, partial) is moved aside, removed, and the rename retried."""
    built, target = Path(built), Path(target)
    for attempt in range(3):
        try:
            os.rename(built, target)  # atomic; fails while `target` is a non-empty folder
            return True
        except OSError:
            if keep(target):
                return False
            aside = built.with_name(f"{built.name}.stale{attempt}")
            with contextlib.suppress(FileNotFoundError):
                os.rename(target, aside)
            shutil.rmtree(aside, ignore_errors=True)
    raise OSError(f"could not place {built} at {target}")
