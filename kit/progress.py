"""Progress bars: whether to draw them, and the bars themselves, for every long loop of the kit.

    for images, masks in progress_bar(loader, desc="train", unit="batch", progress=None):
        ...
    with tile_bar(f"predict {slide_id} (1/5)", progress=None) as advance:
        rle = predict_slide_rle(path, model, cfg, on_progress=advance)

``progress=None``, the default everywhere, draws on a terminal or in Jupyter and nothing when
stderr goes to a file (CI logs, ``nohup``), where every redraw would become a line of the log.
``progress=False`` never draws, ``progress=True`` always does.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator

from tqdm.auto import tqdm

__all__ = ["progress_bar", "show_progress", "tile_bar"]


def show_progress(progress: bool | None) -> bool:
    """Whether to draw bars: ``progress``, or when None, on a terminal or in Jupyter."""
    if progress is not None:
        return bool(progress)
    return sys.stderr.isatty() or "ipykernel" in sys.modules


def progress_bar(
    iterable: Iterable | None = None,
    *,
    desc: str,
    unit: str,
    progress: bool | None,
    total: int | None = None,
    leave: bool = True,
) -> tqdm:
    """A tqdm bar (the notebook widget in Jupyter), disabled unless `show_progress` says so.

    Args:
        iterable: what to iterate over, or None for a bar moved by ``update``.
        desc, unit: the bar's label and the name of what it counts.
        progress: True, False, or None (see `show_progress`).
        total: the count at completion (default ``len(iterable)`` where it has one).
        leave: keep the finished bar on screen; False for inner bars, so a notebook's output
            does not fill with one bar per slide.
    """
    disable = not show_progress(progress)
    return tqdm(iterable, desc=desc, unit=unit, total=total, leave=leave, disable=disable)


@contextlib.contextmanager
def tile_bar(desc: str, progress: bool | None) -> Iterator[Callable[[int, int], None]]:
    """A bar over one slide's tiles, driven by the ``on_progress`` callback of `kit.infer`
    (and by the tile cache of `kit.data`).

    Yields ``advance(done, total)``, which moves the bar to ``done`` of ``total`` tiles
    (``total`` the same at every call); the bar is closed (and, being an inner bar, cleared)
    on exit.
    """
    bar = None

    def advance(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:  # made at the first call, when the plan's size is known
            bar = progress_bar(desc=desc, unit="tile", progress=progress, total=total, leave=False)
        bar.update(done - bar.n)
        if done == total:
            # Updates closer than tqdm's mininterval are not drawn, and closing a bar that is
            # not left clears it: draw the finished count once.
            bar.refresh()

    try:
        yield advance
    finally:
        if bar is not None:
            bar.close()
