"""Tests for kit.rle: the competition's column-major, 1-indexed run-length encoding."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kit import rle
from kit.rle import RleEncoder, decode, decode_columns, encode, parse

FAST = settings(max_examples=60, deadline=None)


def reference_rle(mask) -> str:
    """Straightforward RLE, independent of kit.rle: flatten column-major, diff the padded flags."""
    flat = (np.asarray(mask) != 0).ravel(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [0]])))
    starts, ends = edges[0::2], edges[1::2]
    return " ".join(f"{s + 1} {e - s}" for s, e in zip(starts, ends, strict=True))


def blobby(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """uint8 (h, w) mask with long runs (sparse rectangles) or dense noise, chosen at random."""
    if rng.random() < 0.3:
        return (rng.random((h, w)) < rng.random()).astype(np.uint8)
    mask = np.zeros((h, w), np.uint8)
    for _ in range(rng.integers(0, 6)):
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        mask[y0 : y0 + rng.integers(1, h + 1), x0 : x0 + rng.integers(1, w + 1)] = 1
    return mask


masks = hnp.arrays(
    np.uint8,
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40),
    elements=st.integers(0, 1),
)


# --- The convention, pinned on hand-made masks ------------------------------------------------

HAND_MADE = [
    # The worked example of DOMAIN.md: column-major 0,1,1,1,1,0 -> pixels 2..5.
    ([[0, 1], [1, 1], [1, 0]], "2 4"),
    # Row-major would read "1 2": column-major numbering puts (0, 1) at pixel 3.
    ([[1, 1, 0], [0, 0, 0]], "1 1 3 1"),
    # A run wrapping from the bottom of column 0 to the top of column 1 is one run.
    ([[0, 1], [1, 0]], "2 2"),
    ([[1, 0], [0, 0]], "1 1"),  # first pixel
    ([[0, 0], [0, 1]], "4 1"),  # last pixel
    ([[0, 0, 0], [0, 0, 0]], ""),  # empty mask
    ([[1, 1, 1], [1, 1, 1]], "1 6"),  # full mask
    ([[1, 0, 1, 0, 1]], "1 1 3 1 5 1"),  # H = 1: pixels run left to right
    ([[1], [1], [0], [1]], "1 2 4 1"),  # W = 1
]


@pytest.mark.parametrize(("rows", "rle"), HAND_MADE)
def test_hand_made_masks(rows, rle):
    mask = np.array(rows, np.uint8)
    assert encode(mask) == rle
    np.testing.assert_array_equal(decode(rle, mask.shape), mask)


def test_parse_gives_zero_indexed_int64_runs():
    starts0, lengths = parse("2 4 9 1", (3, 4))
    assert starts0.dtype == np.int64 and lengths.dtype == np.int64
    assert starts0.tolist() == [1, 8] and lengths.tolist() == [4, 1]


def test_decode_returns_uint8_c_contiguous_zeros_and_ones():
    out = decode("2 4", (3, 2))
    assert out.dtype == np.uint8 and out.flags.c_contiguous and out.shape == (3, 2)


@pytest.mark.parametrize("empty", [None, float("nan"), np.float64("nan"), "", "   ", " \n\t"])
def test_empty_rle_decodes_to_zeros(empty):
    np.testing.assert_array_equal(decode(empty, (2, 3)), np.zeros((2, 3), np.uint8))
    assert decode_columns(empty, (2, 3), slice(1, 3)).shape == (2, 2)


def test_separators_and_touching_runs_are_accepted_on_decode():
    # Touching runs (3 starts where 1..2 ends) are non-canonical but not overlapping.
    mask = decode(" 1 2\n3\t1 ", (2, 2))
    np.testing.assert_array_equal(mask, [[1, 1], [1, 0]])
    assert encode(mask) == "1 3"  # encode merges them


def test_zero_sized_masks():
    assert encode(np.zeros((0, 5), np.uint8)) == ""
    assert encode(np.zeros((4, 0), bool)) == ""
    assert decode("", (0, 5)).shape == (0, 5)


# --- encode against the independent reference ---------------------------------------------------


@st.composite
def runs_on_a_shape(draw):
    """(h, w, sorted cut points): runs [c0, c1), [c2, c3) ... in column-major pixel indices."""
    h, w = draw(st.integers(1, 30)), draw(st.integers(1, 30))
    cuts = sorted(draw(st.lists(st.integers(0, h * w), unique=True, max_size=12)))
    return h, w, cuts[: len(cuts) // 2 * 2]


@given(runs_on_a_shape())
@FAST
def test_runs_drawn_in_pixel_order_round_trip(case):
    # Cuts at 0 and h * w give runs touching the first and last pixel; cuts not on a multiple of
    # h give runs wrapping from one column to the next. Distinct cuts keep the runs canonical.
    h, w, cuts = case
    flat = np.zeros(h * w, np.uint8)
    for lo, hi in zip(cuts[0::2], cuts[1::2], strict=True):
        flat[lo:hi] = 1
    mask = flat.reshape((h, w), order="F")
    pairs = zip(cuts[0::2], cuts[1::2], strict=True)
    expected = " ".join(f"{lo + 1} {hi - lo}" for lo, hi in pairs)
    assert encode(mask) == encode(np.ascontiguousarray(mask)) == expected
    np.testing.assert_array_equal(decode(expected, (h, w)), mask)


@given(masks)
@FAST
def test_round_trip_and_reference(mask):
    rle = encode(mask)
    assert rle == reference_rle(mask)
    np.testing.assert_array_equal(decode(rle, mask.shape), mask)


@pytest.mark.parametrize("shape", [(1, 1), (1, 37), (37, 1), (1, 1000), (1000, 1), (7, 9)])
@pytest.mark.parametrize("fill", [0, 1])
def test_constant_masks_on_thin_shapes(shape, fill):
    mask = np.full(shape, fill, np.uint8)
    expected = f"1 {mask.size}" if fill else ""
    assert encode(mask) == expected
    assert encode(np.asfortranarray(mask)) == expected
    np.testing.assert_array_equal(decode(expected, shape), mask)


LAYOUTS = {
    "C": lambda m: m,
    "F": np.asfortranarray,
    "strided view": lambda m: np.ascontiguousarray(np.repeat(np.repeat(m, 2, 0), 3, 1))[::2, 1::3],
    "F strided view": lambda m: np.asfortranarray(np.repeat(np.repeat(m, 3, 0), 2, 1))[1::3, ::2],
    "reversed": lambda m: np.ascontiguousarray(m[::-1, ::-1])[::-1, ::-1],
    "transposed copy": lambda m: np.ascontiguousarray(m.T).T,
}
DTYPES = {
    "bool": lambda m, v: m.astype(bool),
    "uint8 values > 1": lambda m, v: (m * v).astype(np.uint8),
    "int16 negative": lambda m, v: (m * -v).astype(np.int16),
    "uint32": lambda m, v: (m * v * 65536).astype(np.uint32),
    "int64 big-endian": lambda m, v: (m * v).astype(">i8"),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_any_layout_and_dtype_matches_reference(layout, dtype):
    rng = np.random.default_rng([list(LAYOUTS).index(layout), list(DTYPES).index(dtype)])
    for h, w in [(1, 1), (1, 300), (300, 1), (33, 70), (70, 33), (129, 257)]:
        base = blobby(rng, h, w)
        # Values 1..3 (and negatives): nonzero is foreground, whatever the value.
        mask = LAYOUTS[layout](DTYPES[dtype](base, rng.integers(1, 4, base.shape)))
        assert encode(mask) == reference_rle(base), (h, w)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_flag_copies_split_in_many_blocks(layout):
    # Strips that cannot be scanned in place are copied a few rows or columns at a time; tiny
    # blocks put many block boundaries (and carried column bottoms) inside one strip.
    rng = np.random.default_rng(list(LAYOUTS).index(layout))
    for h, w in [(1, 90), (90, 1), (13, 17), (40, 7), (7, 40)]:
        base = blobby(rng, h, w)
        mask = LAYOUTS[layout]((base * rng.integers(1, 4, base.shape)).astype(np.int16))
        encoder = RleEncoder(h, copy_pixels=50)
        encoder.add(mask)
        assert encoder.finish() == reference_rle(base), (h, w)


def test_broadcast_read_only_mask():
    # Zero row stride, read-only memory: scanned in place all the same.
    mask = np.broadcast_to(np.array([0, 1, 1, 0, 1], np.uint8), (4, 5))
    assert encode(mask) == reference_rle(mask) == "5 8 17 4"


def test_float_and_non_2d_masks_are_rejected():
    with pytest.raises(ValueError, match="float32 is not bool or integer"):
        encode(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match=r"2-D .* shape \(2, 2, 1\)"):
        encode(np.zeros((2, 2, 1), np.uint8))


# --- Streaming ------------------------------------------------------------------------------------


@given(st.integers(1, 30), st.integers(1, 40), st.integers(0, 2**32 - 1))
@FAST
def test_streaming_equals_encode_for_any_split(h, w, seed):
    rng = np.random.default_rng(seed)
    mask = blobby(rng, h, w)
    cuts = np.sort(rng.integers(0, w + 1, rng.integers(0, 6)))
    encoder = RleEncoder(h)
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, w], strict=True):
        strip = mask[:, lo:hi]
        encoder.add(np.asfortranarray(strip) if rng.random() < 0.5 else strip)
    assert encoder.width == w
    assert encoder.finish() == encode(mask) == reference_rle(mask)


def test_streaming_merges_runs_across_strips_and_column_wraps():
    # Foreground from (2, 0) to (1, 2) in column-major order: one run over three strips.
    mask = np.array([[0, 1, 1, 0], [0, 1, 1, 0], [1, 1, 0, 0]], np.uint8)
    encoder = RleEncoder(3)
    for j in range(4):
        encoder.add(mask[:, j : j + 1])
    assert encoder.finish() == "3 6"


def test_encoder_edge_cases():
    assert RleEncoder(5).finish() == ""  # no columns
    encoder = RleEncoder(2)
    encoder.add(np.zeros((2, 0), np.uint8))
    encoder.add(np.array([[0], [1]]))
    assert encoder.finish() == encoder.finish() == "2 1"  # finish is repeatable
    encoder.add(np.array([[1], [0]]))  # and adding more continues the run
    assert encoder.finish() == "2 2"


@pytest.mark.parametrize(
    ("height", "strip", "message"),
    [
        (3, np.zeros((2, 4), np.uint8), "strip has 2 rows, the encoder's height is 3"),
        (3, np.zeros(3, np.uint8), "2-D"),
        (3, np.zeros((3, 2), np.float64), "float64 is not bool or integer"),
    ],
)
def test_encoder_rejects_bad_strips(height, strip, message):
    with pytest.raises(ValueError, match=message):
        RleEncoder(height).add(strip)


@pytest.mark.parametrize("height", [-1, 2.5, "3", True])
def test_encoder_rejects_bad_height(height):
    with pytest.raises(ValueError, match="height"):
        RleEncoder(height)


def test_positions_past_2_to_the_31():
    # A 65536-row slide: foreground at column 32769 starts past pixel 2**31. The encoder is fed
    # a zero strip 128 times (2**31 pixels) then one marked column.
    h, zeros = 65536, np.zeros((65536, 256), np.uint8)
    encoder = RleEncoder(h)
    for _ in range(128):
        encoder.add(zeros)
    column = np.zeros((h, 1), np.uint8)
    column[h - 5 :] = 1
    encoder.add(column)
    start = 2**31 + h - 5 + 1
    assert encoder.finish() == f"{start} 5"
    shape = (h, 40000)  # 2.6e9 pixels: only the strip is ever built
    strip = decode_columns(f"{start} 5 {start + h} 2", shape, slice(32768, 32770))
    assert strip.shape == (h, 2) and strip.sum() == 7
    assert strip[h - 5 :, 0].all() and strip[h - 5 :, 1].tolist() == [1, 1, 0, 0, 0]


# --- decode_columns ----------------------------------------------------------------------------


@given(st.integers(1, 25), st.integers(1, 25), st.integers(0, 2**32 - 1))
@FAST
def test_decode_columns_equals_slice_of_decode(h, w, seed):
    rng = np.random.default_rng(seed)
    rle = reference_rle(blobby(rng, h, w))
    full = decode(rle, (h, w))
    bounds = [None, *range(-w - 2, w + 3)]
    for _ in range(10):
        cols = slice(rng.choice(bounds), rng.choice(bounds))
        strip = decode_columns(rle, (h, w), cols)
        assert strip.dtype == np.uint8 and strip.flags.c_contiguous
        np.testing.assert_array_equal(strip, full[:, cols], err_msg=str(cols))


def test_decode_columns_rejects_steps_and_non_slices():
    with pytest.raises(ValueError, match="step 1"):
        decode_columns("1 1", (2, 3), slice(0, 3, 2))
    with pytest.raises(ValueError, match="must be a slice"):
        decode_columns("1 1", (2, 3), 1)


def test_decode_columns_validates_the_whole_rle():
    with pytest.raises(ValueError, match="overlap"):
        decode_columns("1 1 5 2 6 1", (2, 4), slice(0, 1))


# --- Strict decoding: every error names the problem and where -----------------------------------


@pytest.mark.parametrize(
    ("rle", "message"),
    [
        ("1 2 3", r"odd number of tokens \(3\)"),
        ("1 2 x 1", r"token 2 'x' is not a decimal integer"),
        ("1 2 3 1.5", r"token 3 '1.5' is not a decimal integer"),
        ("1 2 +3 1", r"token 2 '\+3' is not a decimal integer"),
        ("1 2 3e1 1", r"token 2 '3e1'"),
        ("1 2 ５ 1", r"token 2 '５'"),  # a non-ASCII digit
        ("1 99999999999999999999", r"token 1 '99999999999999999999' does not fit in int64"),
        ("0 2", r"run 0 \(token 0\): start 0 < 1"),
        ("1 1 -3 2", r"run 1 \(token 2\): start -3 < 1"),
        ("1 1 3 0", r"run 1 \(token 3\): length 0 < 1"),
        ("1 1 5 -2", r"run 1 \(token 3\): length -2 < 1"),
        ("5 1 2 1", r"not sorted: run 1 \(token 2\) starts at 2, before run 0 at 5"),
        ("1 3 2 1", r"overlap: run 1 \(token 2\) starts at 2, inside run 0 covering pixels 1..3"),
        ("2 1 2 1", r"overlap: run 1 \(token 2\)"),
        ("1 1 5 3", r"run 1 \(tokens 2, 3: '5 3'\) ends at pixel 7, past H \* W = 6"),
        ("7 1", r"run 0 \(tokens 0, 1: '7 1'\) ends at pixel 7, past H \* W = 6"),
        ("1 9000000000000000000", r"ends at pixel 9000000000000000000, past H \* W = 6"),
    ],
)
def test_strict_decode_errors(rle, message):
    with pytest.raises(ValueError, match=message):
        decode(rle, (2, 3))
    with pytest.raises(ValueError, match=message):
        parse(rle, (2, 3))


@pytest.mark.parametrize("shape", [(3,), (2, 3, 1), (-1, 3), (2.0, 3), ("2", 3), (True, 3), 6])
def test_bad_shapes_are_rejected(shape):
    with pytest.raises(ValueError, match="shape"):
        decode("1 1", shape)


@pytest.mark.parametrize("rle", [5, 1.0, b"1 2", ["1", "2"]])
def test_non_string_rle_is_rejected(rle):
    with pytest.raises(ValueError, match="RLE must be a str"):
        decode(rle, (2, 3))


def test_decode_columns_takes_parsed_runs():
    mask = np.zeros((5, 7), np.uint8)
    mask[1:4, 2:6] = 1
    mask[4, 0] = 1
    text = rle.encode(mask)
    parsed = rle.parse(text, mask.shape)
    for cols in (slice(0, 3), slice(2, 7), slice(6, 7)):
        np.testing.assert_array_equal(rle.decode_columns(parsed, mask.shape, cols), mask[:, cols])
