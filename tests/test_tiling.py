from itertools import pairwise

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kit.slides import downscale
from kit.tiling import MIN_TISSUE, Tile, has_tissue, plan, plan_axis, tissue_fraction, tissue_mask


@st.composite
def axis_args(draw):
    """(n, window, overlap, align) with n often at or next to window."""
    align = draw(st.sampled_from([1, 2, 3, 4, 8]))
    window = align * draw(st.integers(1, 64))
    overlap = draw(st.integers(0, window - align))
    n = draw(
        st.one_of(
            st.integers(1, 6 * window + 7),
            st.sampled_from([window - 1, window, window + 1, window + align, 2 * window + 1]),
        ).filter(lambda v: v >= 1)
    )
    return n, window, overlap, align


@settings(max_examples=400, deadline=None)
@given(axis_args())
def test_plan_axis_cores_partition_and_windows_cover(args):
    n, window, overlap, align = args
    tiles = plan_axis(n, window, overlap, align)
    starts = [s for s, _, _ in tiles]
    # Cores partition [0, n) in order, each non-empty.
    assert tiles[0][1] == 0 and tiles[-1][2] == n
    for (_, _, stop), (_, start, _) in pairwise(tiles):
        assert stop == start
    assert all(c0 < c1 for _, c0, c1 in tiles)
    # Each window holds its core.
    assert all(s <= c0 and c1 <= s + window for s, c0, c1 in tiles)
    # Starts aligned and increasing; the first at 0; the last as documented.
    assert all(s % align == 0 for s in starts)
    assert starts[0] == 0 and starts == sorted(set(starts))
    assert starts[-1] == (0 if n <= window else -(-(n - window) // align) * align)
    assert starts[-1] + window >= n and starts[-1] + window - n < max(align, window - n + 1)
    # Consecutive windows overlap by at least the request; interior boundaries are the
    # middle of the overlap rounded down to a multiple of align.
    for (a, _, boundary), (b, _, _) in pairwise(tiles):
        assert a + window - b >= overlap
        middle = (b + a + window) / 2
        assert boundary % align == 0 and middle - align < boundary <= middle


@pytest.mark.parametrize(
    "n, window, overlap, align, expected",
    [
        (3, 4, 1, 2, [(0, 0, 3)]),  # n < window: one tile past the edge
        (4, 4, 0, 1, [(0, 0, 4)]),  # n == window
        (5, 4, 0, 1, [(0, 0, 2), (1, 2, 5)]),  # n == window + 1
        (10, 4, 2, 1, [(0, 0, 3), (2, 3, 5), (4, 5, 7), (6, 7, 10)]),  # the docstring example
        # Last start is the smallest multiple of 2 >= 9 - 4: the window [6, 10) crosses by 1.
        (9, 4, 1, 2, [(0, 0, 2), (2, 2, 4), (4, 4, 6), (6, 6, 9)]),
        # 588 = 1100 - 512; two strides <= 384 spread evenly (292, 296); overlaps [292, 512) and
        # [588, 804) split at 402 and 696, rounded down to multiples of 4.
        (1100, 512, 128, 4, [(0, 0, 400), (292, 400, 696), (588, 696, 1100)]),
    ],
)
def test_plan_axis_examples(n, window, overlap, align, expected):
    assert plan_axis(n, window, overlap, align) == expected


@pytest.mark.parametrize(
    "n, window, overlap, align, word",
    [
        (0, 4, 0, 1, "n"),
        (10, 0, 0, 1, "window"),
        (10, 4, -1, 1, "overlap"),
        (10, 4, 4, 1, "overlap 4"),
        (10, 6, 0, 4, "window 6"),
        (10, 8, 5, 4, "overlap 5"),  # stride 3 < align 4
        (10, 4, 0, 0, "align"),
    ],
)
def test_plan_axis_rejects_bad_arguments(n, window, overlap, align, word):
    with pytest.raises(ValueError, match=word):
        plan_axis(n, window, overlap, align)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 70),
    st.integers(1, 70),
    st.sampled_from([(8, 0, 1), (8, 3, 1), (16, 4, 4), (12, 6, 2), (4, 2, 2)]),
)
def test_plan_cores_paint_the_slide_once_in_column_strips(h, w, params):
    window, overlap, align = params
    tiles = plan((h, w), window, overlap, align)
    painted = np.zeros((h, w), np.int64)
    covered = np.zeros((h, w), np.int64)
    for t in tiles:
        painted[t.core] += 1
        covered[t.window] = 1
        assert t.y1 - t.y0 == t.x1 - t.x0 == window
        assert t.y0 <= t.cy0 < t.cy1 <= t.y1 and t.x0 <= t.cx0 < t.cx1 <= t.x1
    assert (painted == 1).all() and (covered == 1).all()
    assert [(t.x0, t.y0) for t in tiles] == sorted((t.x0, t.y0) for t in tiles)
    assert len(tiles) == len(plan_axis(h, window, overlap, align)) * len(
        plan_axis(w, window, overlap, align)
    )


def test_tile_slices():
    t = Tile(y0=8, x0=16, y1=24, x1=32, cy0=10, cx0=16, cy1=20, cx1=30)
    assert t.window == (slice(8, 24), slice(16, 32))
    assert t.core == (slice(10, 20), slice(16, 30))
    assert t.core_in_window == (slice(2, 12), slice(0, 14))
    with pytest.raises(AttributeError):
        t.y0 = 0  # frozen


def test_aligned_tiles_downscale_to_crops_of_the_downscaled_slide(random_image):
    # Why align exists: a tile's block means are the whole image's block means.
    image = random_image((83, 61, 3), seed=3)
    scale = 4
    small = downscale(image, scale)
    padded = np.zeros((83 + 32, 61 + 32, 3), np.uint8)
    padded[:83, :61] = image
    for t in plan(image.shape[:2], window=32, overlap=8, align=scale):
        tile = downscale(padded[t.window], scale)
        rows = slice(t.cy0 // scale, -(-t.cy1 // scale))
        cols = slice(t.cx0 // scale, -(-t.cx1 // scale))
        inner = (
            slice(rows.start - t.y0 // scale, rows.stop - t.y0 // scale),
            slice(cols.start - t.x0 // scale, cols.stop - t.x0 // scale),
        )
        np.testing.assert_array_equal(tile[inner], small[rows, cols])


GLASS, BLACK = (242, 240, 245), (0, 0, 0)
PINK, PURPLE = (225, 140, 190), (120, 60, 150)


def synthetic_thumb() -> np.ndarray:
    """40 x 60: glass everywhere, black padding in the last 10 columns, tissue blocks."""
    thumb = np.empty((40, 60, 3), np.uint8)
    thumb[:] = GLASS
    thumb[:, 50:] = BLACK
    thumb[5:15, 0:20] = PINK
    thumb[20:40, 20:30] = PURPLE
    thumb[2, 55] = (3, 0, 0)  # near-black: saturation 255, still background
    thumb[30, 5] = (250, 235, 245)  # near-white with a tint
    return thumb


def test_tissue_mask_finds_stained_tissue_only():
    thumb = synthetic_thumb()
    expected = np.zeros((40, 60), bool)
    expected[5:15, 0:20] = True
    expected[20:40, 20:30] = True
    mask = tissue_mask(thumb)
    assert mask.dtype == bool and mask.shape == (40, 60)
    np.testing.assert_array_equal(mask, expected)
    # The saturation threshold is strict and adjustable: OpenCV gives pink S = 96.
    assert not tissue_mask(thumb, saturation=96)[5:15, 0:20].any()
    assert tissue_mask(thumb, saturation=95)[5:15, 0:20].all()
    # Thresholds for dark and white are parameters too.
    assert tissue_mask(thumb, dark=0)[2, 55]
    assert not tissue_mask(thumb, saturation=10)[30, 5]  # S = 15 > 10 but near-white
    assert tissue_mask(thumb, saturation=10, white=256)[30, 5]


def test_tissue_mask_close_fills_small_holes():
    thumb = synthetic_thumb()
    thumb[8, 8] = GLASS  # a one-pixel hole in the pink block
    assert not tissue_mask(thumb)[8, 8]
    assert tissue_mask(thumb, close=3)[8, 8]


def test_tissue_mask_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        tissue_mask(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        tissue_mask(np.zeros((4, 4, 3), np.float32))


def test_tissue_fraction_measures_each_core_not_its_window():
    picture = synthetic_thumb()  # 40 x 60 at scale 4 -> slide 160 x 240
    tiles = plan((160, 240), window=80, overlap=40, align=4)
    fractions = tissue_fraction(tiles, picture, scale=4)
    assert fractions.dtype == np.float64 and fractions.shape == (15,)
    # Cores in picture pixels: rows [0, 15), [15, 25), [25, 40); cols [0, 15), [15, 25),
    # [25, 35), [35, 45), [45, 60). Pink: rows 5..15, cols 0..20; purple: rows 20..40, cols 20..30.
    by_core = {(t.cy0 // 4, t.cx0 // 4): f for t, f in zip(tiles, fractions, strict=True)}
    expected = dict.fromkeys(by_core, 0.0)
    expected.update(
        {
            (0, 0): 10 * 15 / 225,
            (0, 15): 10 * 5 / 150,
            (15, 15): 5 * 5 / 100,
            (15, 25): 5 * 5 / 100,
            (25, 15): 15 * 5 / 150,
            (25, 25): 15 * 5 / 150,
        }
    )
    assert by_core == pytest.approx(expected)
    # Pink lies in this tile's window (rows [10, 30) of the picture), not in its core.
    assert by_core[(15, 0)] == 0.0
    # A part of the picture starting at slide column 60 gives its tiles the same fractions.
    part = [i for i, t in enumerate(tiles) if 60 <= t.cx0 and t.cx1 <= 140]
    crop = tissue_fraction([tiles[i] for i in part], picture[:, 15:35], 4, origin=(0, 60))
    np.testing.assert_array_equal(crop, fractions[part])


def test_tissue_fraction_counts_outside_as_no_tissue_and_rounds_outwards():
    picture = np.full((10, 10, 3), PINK, np.uint8)
    tiles = [
        Tile(0, 0, 40, 40, 0, 0, 40, 40),  # core: picture [0, 10) x [0, 10), all tissue
        Tile(0, 0, 80, 80, 20, 20, 60, 60),  # core: picture [5, 15)^2, a quarter inside
        Tile(0, 0, 8, 8, 2, 2, 6, 6),  # unaligned core: picture [0, 2) x [0, 2)
        Tile(100, 100, 140, 140, 100, 100, 140, 140),  # entirely outside
    ]
    np.testing.assert_allclose(tissue_fraction(tiles, picture, scale=4), [1.0, 0.25, 1.0, 0.0])
    assert tissue_fraction([], picture, 4).shape == (0,)
    with pytest.raises(ValueError, match="scale"):
        tissue_fraction(tiles, picture, 0)
    with pytest.raises(ValueError, match="origin"):
        tissue_fraction(tiles, picture, 4, origin=(0, 6))
    with pytest.raises(ValueError, match="uint8"):
        tissue_fraction(tiles, picture[..., 0], 4)
    with pytest.raises(ValueError, match="empty core"):
        tissue_fraction([Tile(0, 0, 4, 4, 2, 2, 2, 4)], picture, 4)


def test_has_tissue_is_strict_and_defaults_to_the_shared_threshold():
    fractions = np.array([0.0, MIN_TISSUE, np.nextafter(MIN_TISSUE, 1), 0.5])
    np.testing.assert_array_equal(has_tissue(fractions), [False, False, True, True])
    np.testing.assert_array_equal(has_tissue(fractions, 0.0), [False, True, True, True])
    assert has_tissue(0.2, 0.3).shape == () and not has_tissue(0.2, 0.3)
    with pytest.raises(ValueError, match="min_tissue"):
        has_tissue(fractions, 1.0)
