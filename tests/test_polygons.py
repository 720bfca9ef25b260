"""kit.polygons.rasterize: the fill convention, unions, holes and column strips."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.path import Path

from kit.polygons import rasterize


def square(x0, y0, x1, y1) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float)


def centres(shape) -> np.ndarray:
    """(H * W, 2) pixel centres (x, y), row by row."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return np.stack([xx.ravel() + 0.5, yy.ravel() + 0.5], axis=1)


def test_pixels_whose_centre_is_inside_match_an_independent_point_in_polygon_test():
    # A concave, non-convex star with fractional vertices, partly off the mask on two sides.
    theta = np.linspace(0, 2 * np.pi, 11, endpoint=False)
    radius = np.where(np.arange(11) % 2, 9.3, 21.7)
    ring = np.stack([18.2 + radius * np.cos(theta), 14.6 + radius * np.sin(theta)], axis=1)
    shape = (29, 37)
    expected = Path(ring).contains_points(centres(shape)).reshape(shape)
    mask = rasterize([[ring]], shape)
    assert mask.dtype == np.uint8 and mask.shape == shape
    assert 200 < expected.sum() < expected.size - 100  # non-trivial, and clipped by the edges
    np.testing.assert_array_equal(mask, expected)


def test_integer_vertices_cover_their_area_and_shared_edges_split_pixels():
    mask = rasterize([[square(10, 5, 20, 15)]], (23, 41))
    assert mask.sum() == 100 and mask[5:15, 10:20].all()
    # The diagonal of a square runs through pixel centres: its two halves still share none of
    # them and leave none out.
    lower = np.array([[0, 0], [6, 6], [0, 6]])
    upper = np.array([[0, 0], [6, 0], [6, 6]])
    a, b = rasterize([[lower]], (7, 7)), rasterize([[upper]], (7, 7))
    assert not (a & b).any()
    np.testing.assert_array_equal(a | b, rasterize([[square(0, 0, 6, 6)]], (7, 7)))
    assert a.sum() == 15 and b.sum() == 21  # centres on the diagonal go to the right-hand half


def test_overlapping_polygons_stay_foreground():
    first, second = square(2, 2, 12, 10), square(7, 4, 18, 14)
    mask = rasterize([[first], [second]], (16, 20))
    assert mask[4:10, 7:12].all()  # the overlap (one fillPoly call would leave it a hole)
    np.testing.assert_array_equal(
        mask, rasterize([[first]], (16, 20)) | rasterize([[second]], (16, 20))
    )
    assert mask.sum() == 80 + 110 - 30


def test_a_hole_is_background_until_another_polygon_fills_it():
    outer, hole = square(1, 1, 15, 13), square(4, 3.5, 9.5, 9)
    with_hole = rasterize([[outer, hole]], (15, 17))
    whole = rasterize([[outer]], (15, 17))
    hole_pixels = rasterize([[hole]], (15, 17))
    assert hole_pixels.sum() == 6 * 5
    np.testing.assert_array_equal(with_hole, whole & (1 - hole_pixels))
    # A second polygon exactly filling the hole (its ring running the other way) restores it.
    np.testing.assert_array_equal(rasterize([[outer, hole], [hole[::-1]]], (15, 17)), whole)
    # One polygon's hole does not cut into another polygon.
    np.testing.assert_array_equal(
        rasterize([[outer, hole], [square(3, 3, 6, 6)]], (15, 17))[3:6, 3:6], 1
    )


def test_a_self_crossing_ring_is_filled_even_odd():
    theta = np.pi / 2 + np.arange(5) * 4 * np.pi / 5  # a pentagram, drawn in one stroke
    ring = np.stack([20 + 18 * np.cos(theta), 20 - 18 * np.sin(theta)], axis=1)
    mask = rasterize([[ring]], (40, 40))
    assert mask[20, 20] == 0 and mask[5, 20] == 1  # the centre is crossed twice, a tip once


@pytest.mark.parametrize(
    "cols", [slice(0, 53), slice(0, 1), slice(7, 19), slice(19, 20), slice(40, 53)]
)
def test_a_column_strip_equals_those_columns_of_the_whole_mask(cols):
    rng = np.random.default_rng(5)
    shape = (31, 53)  # awkward: odd sizes, polygons running past every edge
    polygons = []
    for _ in range(12):
        centre = rng.uniform(-5, 58, 2)
        theta = np.sort(rng.uniform(0, 2 * np.pi, rng.integers(3, 12)))
        radius = rng.uniform(2, 14, len(theta))
        outer = centre + np.stack([np.cos(theta), np.sin(theta)], 1) * radius[:, None]
        hole = centre + np.stack([np.cos(theta), np.sin(theta)], 1) * radius[:, None] * 0.3
        polygons.append([np.round(outer) if rng.random() < 0.5 else outer, hole])
    whole = rasterize(polygons, shape)
    assert 0.1 < whole.mean() < 0.9
    np.testing.assert_array_equal(rasterize(polygons, shape, cols), whole[:, cols])


def test_bad_input_names_the_problem():
    ring = square(1, 1, 4, 4)
    with pytest.raises(ValueError, match="sequence of rings"):
        rasterize([ring], (5, 5))  # a ring where a polygon belongs
    with pytest.raises(ValueError, match="numbers"):
        rasterize([[[[0, 0], [1]]]], (5, 5))
    with pytest.raises(ValueError, match="finite"):
        rasterize([[np.array([[0, 0], [np.nan, 1], [1, 1]])]], (5, 5))
    with pytest.raises(ValueError, match="within"):
        rasterize([[ring]], (5, 5), slice(2, 6))
    with pytest.raises(ValueError, match="shape"):
        rasterize([[ring]], (5,))
    assert rasterize([], (3, 4)).shape == (3, 4)
    assert rasterize([[ring]], (5, 5), slice(2, 2)).shape == (5, 0)
