"""Polygon annotations to masks: the one rasterizer of the kit.

Coordinates are full-resolution pixels, ``x`` the column and ``y`` the row, with the slide's
top-left corner at (0, 0) (QuPath's and GeoJSON rasters' convention): pixel (row r, col c) is the
unit square [c, c + 1) x [r, r + 1), and it is foreground when its centre (c + 0.5, r + 0.5) lies
inside a polygon. So a polygon with integer vertices covers exactly its area in pixels (a 10 x 10
square, 100 pixels). A centre exactly on an edge counts as inside when the polygon lies to its
right, or below it on a horizontal edge: polygons sharing an edge never share a pixel nor leave
a gap between them, and a polygon with a hole plus a polygon filling that hole cover exactly the
pixels of the outer ring. Each ring is filled by the even-odd rule (a self-crossing ring leaves
its twice-covered parts empty).

A mask is the union of its polygons, each polygon its outer ring minus its holes: overlapping
glomeruli stay foreground, a hole of one polygon does not cut into another.

    mask = rasterize([[outer, hole], [other]], (H, W))       # uint8 (H, W) of 0/1
    strip = rasterize(polygons, (H, W), slice(1024, 2048))  # == mask[:, 1024:2048]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["rasterize"]


def rasterize(
    polygons: Iterable[Sequence[np.ndarray]], shape: tuple[int, int], cols: slice | None = None
) -> np.ndarray:
    """The union of polygons as a 0/1 mask of ``shape``, or just its columns ``cols``.

    Args:
        polygons: each polygon a sequence of rings, its outer ring first and then its holes; a
            ring is an array-like (k, 2) of (x, y) vertices, closed or not (the last vertex is
            joined to the first either way).
        shape: (H, W) of the whole mask.
        cols: columns [start, stop) of the mask to return, default all of them. The strip
            equals ``rasterize(polygons, shape)[:, cols]`` (each row is filled on its own), so a
            slide's mask can be made strip by strip without ever holding it whole.

    Returns:
        uint8 (H, stop - start) of 0/1.
    """
    height, width = _check_shape(shape)
    x0, x1 = _check_cols(cols, width)
    mask = np.zeros((height, x1 - x0), np.uint8)
    for polygon in polygons:
        rings = [_check_ring(ring) for ring in polygon]
        if not rings:
            continue
        # The pixels whose centre lies in the outer ring's bounding box, within the strip:
        # nothing of the polygon (holes included) is outside them.
        (left, top), (right, bottom) = rings[0].min(axis=0), rings[0].max(axis=0)
        r0, r1 = max(_first_centre(top), 0), min(_first_centre(bottom), height)
        c0, c1 = max(_first_centre(left), x0), min(_first_centre(right), x1)
        if r0 >= r1 or c0 >= c1:
            continue
        part = _inside(rings[0], r0, r1, c0, c1)
        for hole in rings[1:]:
            part &= ~_inside(hole, r0, r1, c0, c1)
        mask[r0:r1, c0 - x0 : c1 - x0] |= part
    return mask


def _inside(ring: np.ndarray, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """bool (r1 - r0, c1 - c0): which pixels of rows [r0, r1), cols [c0, c1) the ring holds.

    Scanline even-odd fill: a pixel is inside when an odd number of edges cross its row's
    centre line at or left of its centre. Each crossing flips the first pixel whose centre is at
    or right of it; a running XOR along the row turns the flips into the fill.
    """
    a, b = ring, np.roll(ring, -1, axis=0)
    # Each edge from its upper to its lower end, so that an edge shared by two rings (a hole and
    # the polygon filling it) gives bit-identical crossings whichever way the rings run.
    down = (a[:, 1] > b[:, 1])[:, None]
    top, bottom = np.where(down, b, a), np.where(down, a, b)
    # Rows whose centre y is in [top y, bottom y): half-open, so a vertex between two edges
    # counts once and a horizontal edge never.
    first = np.clip(_first_centre(top[:, 1]), r0, r1)
    stop = np.clip(_first_centre(bottom[:, 1]), r0, r1)
    counts = stop - first
    # One (edge, row) pair per crossing: edge e crosses rows first[e], ..., stop[e] - 1.
    edge = np.repeat(np.arange(len(ring)), counts)
    row = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts - first, counts)
    (tx, ty), (bx, by) = top[edge].T, bottom[edge].T
    # Exact for integer (or half-integer) vertices: the product is exact, the quotient and sum
    # are correctly rounded, so a crossing that falls on a centre is computed as that centre.
    x = tx + (row + 0.5 - ty) * (bx - tx) / (by - ty)
    # Crossings left of the box flip its first pixel; those right of it land on a spare column.
    col = np.clip(_first_centre(x), c0, c1) - c0
    flips = np.zeros((r1 - r0, c1 - c0 + 1), np.uint8)
    np.bitwise_xor.at(flips, (row - r0, col), 1)
    return np.bitwise_xor.accumulate(flips, axis=1)[:, :-1].astype(bool)


def _first_centre(coordinate):
    """Index of the first pixel whose centre is at or after ``coordinate`` (int or int64 array).

    Pixel i's centre is i + 0.5, so pixels [_first_centre(a), _first_centre(b)) are those whose
    centre lies in [a, b).
    """
    first = np.ceil(np.asarray(coordinate, np.float64) - 0.5).astype(np.int64)
    return int(first) if first.ndim == 0 else first


def _check_shape(shape) -> tuple[int, int]:
    try:
        height, width = (int(n) for n in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be (H, W), got {shape!r}") from None
    if height < 1 or width < 1:
        raise ValueError(f"shape must be (H, W) of positive sizes, got {shape!r}")
    return height, width


def _check_cols(cols: slice | None, width: int) -> tuple[int, int]:
    if cols is None:
        return 0, width
    if not isinstance(cols, slice) or cols.step not in (None, 1):
        raise ValueError(f"cols must be a slice with step 1, got {cols!r}")
    start = 0 if cols.start is None else cols.start
    stop = width if cols.stop is None else cols.stop
    if not 0 <= start <= stop <= width:
        raise ValueError(f"cols {cols!r} must lie within the mask's {width} columns")
    return int(start), int(stop)


def _check_ring(ring) -> np.ndarray:
    try:
        points = np.asarray(ring, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"a ring must be (k, 2) (x, y) numbers, got {ring!r}") from None
    if points.ndim != 2 or points.shape[1] != 2 or len(points) == 0:
        raise ValueError(
            f"a ring must be (k, 2) (x, y) vertices, got shape {points.shape} (a polygon is a "
            "sequence of rings: outer first, then holes)"
        )
    if not np.isfinite(points).all():
        raise ValueError(f"a ring's vertices must be finite, got {points.tolist()!r}")
    return points
