import warnings

import numpy as np
import pytest
import rasterio
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.errors import NotGeoreferencedWarning

from kit import slides
from kit.slides import Slide, downscale

H, W = 301, 517  # awkward: prime-ish, not multiples of any scale or of the 64-px tiles


def reference_downscale(image: np.ndarray, scale: int, fill: int = 0) -> np.ndarray:
    """Pad with fill, reshape into blocks, mean, round half up."""
    h, w = image.shape[:2]
    ph, pw = -(-h // scale) * scale, -(-w // scale) * scale
    padded = np.full((ph, pw) + image.shape[2:], fill, np.float64)
    padded[:h, :w] = image
    blocks = padded.reshape(ph // scale, scale, pw // scale, scale, *image.shape[2:])
    return np.floor(blocks.mean(axis=(1, 3)) + 0.5).astype(np.uint8)


def padded_crop(image: np.ndarray, rows: slice, cols: slice, fill: int) -> np.ndarray:
    """image[rows, cols] of the image surrounded by fill, with slide (not Python) indexing."""
    margin = max(abs(rows.start), abs(rows.stop), abs(cols.start), abs(cols.stop)) + 1
    big = np.full((image.shape[0] + 2 * margin, image.shape[1] + 2 * margin, 3), fill, np.uint8)
    big[margin : margin + image.shape[0], margin : margin + image.shape[1]] = image
    return big[rows.start + margin : rows.stop + margin, cols.start + margin : cols.stop + margin]


# --- downscale ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (H, W), (13, 1, 3), (H, W, 3), (9, 11, 4)])
@pytest.mark.parametrize("scale", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("fill", [0, 255])
def test_downscale_matches_reshape_mean(random_image, shape, scale, fill):
    image = random_image(shape, seed=scale)
    out = downscale(image, scale, fill)
    assert out.shape == (-(-shape[0] // scale), -(-shape[1] // scale)) + shape[2:]
    np.testing.assert_array_equal(out, reference_downscale(image, scale, fill))


@settings(max_examples=50, deadline=None)
@given(
    st.integers(1, 40),
    st.integers(1, 40),
    st.sampled_from([(), (1,), (2,), (3,)]),
    st.integers(1, 12),
    st.integers(0, 255),
    st.integers(0, 2**31),
)
def test_downscale_matches_reshape_mean_anywhere(h, w, channels, scale, fill, seed):
    image = np.random.default_rng(seed).integers(0, 256, (h, w) + channels, dtype=np.uint8)
    np.testing.assert_array_equal(
        downscale(image, scale, fill), reference_downscale(image, scale, fill)
    )


def test_downscale_rounds_half_up_and_pads_with_fill():
    assert downscale(np.array([[1, 2], [1, 2]], np.uint8), 2).tolist() == [[2]]  # 1.5 -> 2
    assert downscale(np.array([[0, 0], [0, 1]], np.uint8), 2).tolist() == [[0]]  # 0.25 -> 0
    # A 1 x 3 image at scale 2 pads to 2 x 4: blocks [4, 6, 255, 255] and [9, 255, 255, 255].
    assert downscale(np.array([[4, 6, 9]], np.uint8), 2, fill=255).tolist() == [
        [130, 194]
    ]  # 193.5 up


def test_downscale_scale_one_returns_input_and_handles_views():
    image = np.arange(60, dtype=np.uint8).reshape(6, 10)
    assert downscale(image, 1) is image
    view = image[:, ::2]  # non-contiguous
    np.testing.assert_array_equal(downscale(view, 2), reference_downscale(view, 2))


@pytest.mark.parametrize("scale", [0, -2, 1.5, 2.0, "2", True, None])
def test_downscale_rejects_bad_scale(scale):
    with pytest.raises(ValueError, match="scale"):
        downscale(np.zeros((4, 4), np.uint8), scale)


def test_downscale_rejects_bad_image_and_fill():
    with pytest.raises(ValueError, match="uint8"):
        downscale(np.zeros((4, 4), np.uint16), 2)
    with pytest.raises(ValueError, match="uint8"):
        downscale(np.zeros(4, np.uint8), 2)
    with pytest.raises(ValueError, match="empty"):
        downscale(np.zeros((0, 4), np.uint8), 2)
    with pytest.raises(ValueError, match="fill"):
        downscale(np.zeros((4, 4), np.uint8), 2, fill=256)


# --- layouts -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rgb():
    """The slide's true RGB content."""
    return np.random.default_rng(7).integers(0, 256, (H, W, 3), dtype=np.uint8)


def write_layout(write_tiff, path, rgb, layout, **kw):
    """Write `rgb` in a layout; return (path, the RGB a reader must see)."""
    if layout == "grey":
        write_tiff(path, rgb[..., 1], "grey", **kw)
        return path, np.repeat(rgb[..., 1:2], 3, axis=2)
    if layout == "rgba":
        alpha = rgb[..., :1] ^ 0x5A  # varied, zeros included: reads must ignore it
        write_tiff(path, np.concatenate([rgb, alpha], axis=2), "rgba", **kw)
        return path, rgb
    write_tiff(path, rgb, layout, **kw)
    return path, rgb


@pytest.mark.parametrize("layout", ["rgb", "planes", "grey", "rgba"])
@pytest.mark.parametrize("tile", [(64, 64), None], ids=["tiled", "striped"])
def test_layouts_read_whole_slide(tmp_path, write_tiff, rgb, layout, tile):
    path, expected = write_layout(write_tiff, tmp_path / "s.tiff", rgb, layout, tile=tile)
    with Slide(path) as slide:
        assert slide.layout == layout
        assert slide.shape == (H, W)
        assert slide.dtype == np.uint8
        out = slide.read(slice(0, H), slice(0, W))
        assert out.dtype == np.uint8 and out.shape == (H, W, 3)
        np.testing.assert_array_equal(out, expected)
        np.testing.assert_array_equal(slide.read(slice(None), slice(None)), expected)


@pytest.mark.parametrize("layout", ["rgb", "planes"])
@pytest.mark.parametrize(
    ("tile", "expected"), [((32, 48), (32, 48)), (None, (16, W))], ids=["tiled", "striped"]
)
def test_block_shape_is_the_files_tile_or_strip(tmp_path, write_tiff, rgb, layout, tile, expected):
    path, _ = write_layout(write_tiff, tmp_path / "s.tiff", rgb, layout, tile=tile)
    with Slide(path) as slide:
        assert slide.block_shape == expected
    with pytest.raises(ValueError, match="closed"):
        _ = slide.block_shape


def test_planes_file_is_what_rasterio_sees_in_the_competition(tmp_path, write_tiff, rgb):
    path = write_tiff(tmp_path / "p.tiff", rgb, "planes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as ds:
            assert ds.count == 1
            assert ds.subdatasets == [f"GTIFF_DIR:{i}:{path}" for i in (1, 2, 3)]


def test_pages_of_another_size_are_not_planes(tmp_path, rgb):
    # A grey page followed by smaller pages (say, a label image): not colour planes.
    path = tmp_path / "g.tiff"
    with tifffile.TiffWriter(path) as tw:
        tw.write(rgb[..., 0], photometric="minisblack", tile=(64, 64))
        tw.write(rgb[:100, :100, 1], photometric="minisblack")
        tw.write(rgb[:100, :100, 2], photometric="minisblack")
    with Slide(path) as slide:
        assert slide.layout == "grey"
        np.testing.assert_array_equal(slide.read(slice(0, 5), slice(0, 5))[..., 2], rgb[:5, :5, 0])


@pytest.mark.parametrize("bigtiff, byteorder", [(True, "<"), (False, ">"), (True, ">")])
def test_bigtiff_and_big_endian(tmp_path, write_tiff, rgb, bigtiff, byteorder):
    path = write_tiff(tmp_path / "b.tiff", rgb, "planes", bigtiff=bigtiff, byteorder=byteorder)
    with Slide(path) as slide:
        assert slide.layout == "planes"
        np.testing.assert_array_equal(
            slide.read(slice(-3, H), slice(W - 70, W + 2))[3:, :70], rgb[:, W - 70 :]
        )


@pytest.mark.parametrize("layout", ["rgb", "grey"])
def test_uint16_is_shifted_right_by_8(tmp_path, write_tiff, layout):
    rng = np.random.default_rng(1)
    image16 = rng.integers(0, 65536, (H, W, 3), dtype=np.uint16)
    image16[0, :4, 0] = [0, 255, 256, 65535]  # -> 0, 0, 1, 255
    if layout == "grey":
        image16 = np.repeat(image16[..., :1], 3, axis=2)
    write_tiff(tmp_path / "u.tiff", image16[..., 0] if layout == "grey" else image16, layout)
    with Slide(tmp_path / "u.tiff") as slide:
        assert slide.dtype == np.uint16
        out = slide.read(slice(0, H), slice(0, W))
        assert out.dtype == np.uint8
        np.testing.assert_array_equal(out, (image16 >> 8).astype(np.uint8))
        assert out[0, :4, 0].tolist() == [0, 0, 1, 255]
        np.testing.assert_array_equal(
            slide.read(slice(-5, 60), slice(10, 77), scale=4),
            downscale(
                padded_crop((image16 >> 8).astype(np.uint8), slice(-5, 60), slice(10, 77), 0), 4
            ),
        )


# --- windows -----------------------------------------------------------------------------

WINDOWS = [
    (slice(0, H), slice(0, W)),  # the whole slide
    (slice(-37, 50), slice(-5, 70)),  # top-left corner
    (slice(-10, 40), slice(480, 530)),  # top-right corner
    (slice(290, 333), slice(-64, 1)),  # bottom-left corner
    (slice(250, 1000), slice(500, 600)),  # bottom-right corner
    (slice(-9, H + 9), slice(-9, W + 9)),  # all edges at once
    (slice(100, 163), slice(200, 263)),  # inside, crossing tile borders
    (slice(-100, -1), slice(5, 30)),  # entirely above
    (slice(400, 431), slice(-50, 10)),  # entirely below
    (slice(10, 20), slice(W, W + 7)),  # entirely right, touching the edge
    (slice(5, 6), slice(7, 8)),  # one pixel
]


@pytest.mark.parametrize("layout", ["rgb", "planes"])
@pytest.mark.parametrize("fill", [0, 255])
def test_read_equals_downscaled_padded_crop(tmp_path, write_tiff, rgb, layout, fill):
    path, expected = write_layout(write_tiff, tmp_path / "s.tiff", rgb, layout)
    with Slide(path, fill=fill) as slide:
        for rows, cols in WINDOWS:
            crop = padded_crop(expected, rows, cols, fill)
            for scale in (1, 2, 4):
                out = slide.read(rows, cols, scale)
                assert out.shape == (-(-crop.shape[0] // scale), -(-crop.shape[1] // scale), 3)
                np.testing.assert_array_equal(
                    out, reference_downscale(crop, scale, fill), err_msg=f"{rows} {cols} {scale}"
                )


def test_tiles_read_at_aligned_starts_reassemble_the_downscaled_slide(tmp_path, write_tiff, rgb):
    # Why reads are exact: tiled inference equals whole-image inference.
    path, expected = write_layout(write_tiff, tmp_path / "s.tiff", rgb, "rgb", tile=None)
    scale, window = 4, 96
    whole = reference_downscale(expected, scale)
    stitched = np.zeros_like(whole)
    with Slide(path) as slide:
        for y in range(0, H, window):
            for x in range(0, W, window):
                tile = slide.read(slice(y, y + window), slice(x, x + window), scale)
                ys, xs = (
                    slice(y // scale, (y + window) // scale),
                    slice(x // scale, (x + window) // scale),
                )
                part = stitched[ys, xs]
                part[...] = tile[: part.shape[0], : part.shape[1]]
    np.testing.assert_array_equal(stitched, whole)


@pytest.mark.parametrize(
    "rows, cols, word",
    [
        (slice(5, 5), slice(0, 4), "rows"),
        (slice(0, 4), slice(9, 3), "cols"),
        (slice(0, 10, 2), slice(0, 4), "step"),
        (slice(0.5, 4), slice(0, 4), "integers"),
        ((0, 4), slice(0, 4), "slice"),
    ],
)
def test_read_rejects_bad_windows(tmp_path, write_tiff, rgb, rows, cols, word):
    with Slide(write_tiff(tmp_path / "s.tiff", rgb)) as slide:
        with pytest.raises(ValueError, match=word):
            slide.read(rows, cols)


@pytest.mark.parametrize("scale", [0, -1, 2.0, 1.5])
def test_read_and_thumbnail_reject_bad_scale(tmp_path, write_tiff, rgb, scale):
    with Slide(write_tiff(tmp_path / "s.tiff", rgb)) as slide:
        with pytest.raises(ValueError, match="scale"):
            slide.read(slice(0, 4), slice(0, 4), scale)
        with pytest.raises(ValueError, match="scale"):
            slide.thumbnail(scale)


def test_numpy_integer_bounds(tmp_path, write_tiff, rgb):
    with Slide(write_tiff(tmp_path / "s.tiff", rgb)) as slide:
        out = slide.read(slice(np.int64(3), np.int32(9)), slice(np.int64(-2), 5), np.int64(2))
        np.testing.assert_array_equal(
            out, reference_downscale(padded_crop(rgb, slice(3, 9), slice(-2, 5), 0), 2)
        )


# --- thumbnails --------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["rgb", "planes", "grey", "rgba"])
def test_thumbnail_equals_block_means_when_scale_divides(tmp_path, write_tiff, layout):
    image = np.random.default_rng(2).integers(0, 256, (256, 320, 3), dtype=np.uint8)
    if layout == "grey":
        write_tiff(tmp_path / "t.tiff", image[..., 0], "grey")
        image = np.repeat(image[..., :1], 3, axis=2)
    elif layout == "rgba":
        # Opaque: GDAL's averaging leaves transparent pixels out.
        write_tiff(
            tmp_path / "t.tiff", np.dstack([image, np.full_like(image[..., :1], 255)]), "rgba"
        )
    else:
        write_tiff(tmp_path / "t.tiff", image, layout)
    with Slide(tmp_path / "t.tiff") as slide:
        for scale in (2, 8, 32):
            np.testing.assert_array_equal(slide.thumbnail(scale), reference_downscale(image, scale))


def test_thumbnail_of_awkward_size_is_close(tmp_path, write_tiff):
    # On a gradient, the thumbnail's slightly stretched sampling grid (H / ceil(H / s) source
    # pixels per output pixel instead of s) shows as a bounded shift.
    yy, xx = np.mgrid[0:H, 0:W]
    image = np.stack([yy * 255 // H, xx * 255 // W, (yy + xx) * 255 // (H + W)], 2)
    write_tiff(tmp_path / "t.tiff", image.astype(np.uint8), tile=None)
    with Slide(tmp_path / "t.tiff") as slide:
        for scale in (3, 4, 16):
            thumb = slide.thumbnail(scale)
            h, w = -(-H // scale), -(-W // scale)
            assert thumb.shape == (h, w, 3) and thumb.dtype == np.uint8
            shift = max((h - 1) * (scale - H / h), (w - 1) * (scale - W / w))  # source pixels
            bound = shift * 255 / H + 1  # the steepest gradient is 255 / H per pixel
            inner = reference_downscale(image.astype(np.uint8), scale)[:-1, :-1]  # no padding
            assert np.abs(thumb[:-1, :-1].astype(int) - inner).max() <= bound


@pytest.mark.parametrize("layout", ["rgb", "planes", "grey", "rgba"])
@pytest.mark.parametrize("tile", [(64, 48), None])
@pytest.mark.parametrize("chunk_pixels", [1, 5000, 2**22])
def test_thumbnail_without_overviews_is_the_exact_read_in_any_chunking(
    tmp_path, write_tiff, rgb, layout, tile, chunk_pixels
):
    # Chunks of one block (or one strip), of a few blocks and the whole slide: chunk edges at
    # multiples of the scale make the thumbnail read(full, scale) exactly, RGBA alpha ignored.
    path, expected = write_layout(write_tiff, tmp_path / "t.tiff", rgb, layout, tile=tile)
    with Slide(path, fill=255) as slide:
        for scale in (3, 16, 64, 600):
            np.testing.assert_array_equal(
                slide.thumbnail(scale, chunk_pixels),
                reference_downscale(expected, scale, 255),
                f"{scale}",
            )


@pytest.mark.parametrize(("tile", "scale"), [((64, 48), 3), ((16, 16), 64), (None, 4)])
@pytest.mark.parametrize("budget", [1, 5000, 10**6])
def test_thumbnail_chunks_decode_each_block_once(
    tmp_path, write_tiff, recording_slide, rgb, tile, scale, budget
):
    # Every chunk starts on a multiple of the scale and, where the file's blocks allow, on a
    # block edge: no block (or strip) is split between two chunks, so each is decoded once.
    path = write_tiff(tmp_path / "t.tiff", rgb, tile=tile, rowsperstrip=16)
    with recording_slide(path) as slide:
        slide.thumbnail(scale, chunk_pixels=budget)
        block_h, block_w = slide.block_shape
    reads = slide.reads
    hits = np.zeros((H, W), np.int64)
    for y0, y1, x0, x1 in reads:
        hits[y0:y1, x0:x1] += 1
        for start, block, n in ((y0, block_h, H), (x0, block_w, W)):
            assert start % scale == 0
            if block < n and np.lcm(block, scale) <= 4096:
                assert start % block == 0
    assert (hits == 1).all()


def test_reads_run_with_gdal_cache_capped_and_restore_it(tmp_path, write_tiff, rgb):
    # GDAL's block cache defaults to 5% of RAM; a Slide's reads run with it capped and leave
    # the caller's setting as it was.
    seen = []

    class Spy:
        def __init__(self, ds):
            self.ds = ds

        def read(self, *args, **kwargs):
            seen.append(rasterio.env.getenv().get("GDAL_CACHEMAX"))
            return self.ds.read(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.ds, name)

    path, _ = write_layout(write_tiff, tmp_path / "s.tiff", rgb, "rgb")
    with rasterio.Env(GDAL_CACHEMAX=123456789):
        with Slide(path) as slide:
            slide._datasets = [Spy(ds) for ds in slide._datasets]
            slide.read(slice(0, 10), slice(0, 10))
            slide.thumbnail(8)
            slide._datasets = [spy.ds for spy in slide._datasets]
        assert rasterio.env.getenv()["GDAL_CACHEMAX"] == 123456789
    assert seen and all(v == slides.GDAL_CACHE_BYTES for v in seen)


def test_thumbnail_uses_overviews(tmp_path, rgb):
    # The overview holds a distinct value, so the result shows where it came from.
    path = tmp_path / "o.tiff"
    with tifffile.TiffWriter(path) as tw:
        tw.write(rgb, photometric="rgb", tile=(64, 64))
        tw.write(np.full((151, 259, 3), 7, np.uint8), photometric="rgb", subfiletype=1)
    with Slide(path) as slide:
        assert slide.layout == "rgb"
        assert (slide.thumbnail(2) == 7).all() and (slide.thumbnail(4) == 7).all()
        np.testing.assert_array_equal(slide.read(slice(0, H), slice(0, W)), rgb)  # full res


# --- errors, warnings, lifetime ----------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tiff"):
        Slide(tmp_path / "nope.tiff")


def test_text_file_named_tiff(tmp_path):
    path = tmp_path / "notes.tiff"
    path.write_text("these are not pixels\n")
    with pytest.raises(ValueError, match="notes.tiff"):
        Slide(path)


def test_png_named_tiff(tmp_path):
    import cv2

    path = tmp_path / "picture.tiff"
    ok, data = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))
    path.write_bytes(data.tobytes())
    with pytest.raises(ValueError, match="picture.tiff"):
        Slide(path)


@pytest.mark.parametrize("layout", ["rgb", "planes", "grey"])
@pytest.mark.parametrize("tile", [(64, 64), None], ids=["tiled", "striped"])
@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999])
def test_truncated_file_fails_on_open(tmp_path, write_tiff, rgb, layout, tile, keep):
    path, _ = write_layout(write_tiff, tmp_path / "cut.tiff", rgb, layout, tile=tile)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match="cut.tiff"):
        Slide(path)


def test_truncated_header_or_page_chain(tmp_path, write_tiff, rgb):
    path = write_tiff(tmp_path / "cut.tiff", rgb, "planes", tile=None)
    data = path.read_bytes()
    for size in (0, 3, 7, 12):
        path.write_bytes(data[:size])
        with pytest.raises(ValueError, match="cut.tiff"):
            Slide(path)


def test_corrupt_block_fails_on_read_naming_file(tmp_path, write_tiff, rgb):
    path = write_tiff(tmp_path / "bad.tiff", rgb, tile=(64, 64))
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4000] = bytes(4000)  # zeros are not a zlib stream
    path.write_bytes(bytes(data))
    with Slide(path) as slide:  # the structure is intact
        slide.read(slice(0, 64), slice(0, 64))  # the first tile is fine
        with pytest.raises(ValueError, match="bad.tiff") as info:
            slide.read(slice(0, H), slice(0, W))
        assert isinstance(info.value.__cause__, rasterio.errors.RasterioError)
        with pytest.raises(ValueError, match="bad.tiff"):
            slide.thumbnail(2)


def test_unsupported_sample_type(tmp_path):
    tifffile.imwrite(tmp_path / "f.tiff", np.zeros((16, 16, 3), np.float32), photometric="rgb")
    with pytest.raises(ValueError, match="f.tiff.*float32"):
        Slide(tmp_path / "f.tiff")


def test_fill_is_validated(tmp_path, write_tiff, rgb):
    with pytest.raises(ValueError, match="fill"):
        Slide(write_tiff(tmp_path / "s.tiff", rgb), fill=300)


def test_no_georeferencing_warning_and_no_global_filter_change(tmp_path, write_tiff, rgb):
    paths = [write_tiff(tmp_path / f"{layout}.tiff", rgb, layout) for layout in ("rgb", "planes")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filters = list(warnings.filters)
        for path in paths:
            with Slide(path) as slide:
                slide.read(slice(0, 10), slice(0, 10), 2)
                slide.thumbnail(8)
        assert warnings.filters == filters
    assert [w for w in caught if issubclass(w.category, NotGeoreferencedWarning)] == []


def test_close_and_repr(tmp_path, write_tiff, rgb):
    path = write_tiff(tmp_path / "s.tiff", rgb, "planes")
    with Slide(path) as slide:
        text = repr(slide)
        assert "s.tiff" in text and "(301, 517)" in text and "'planes'" in text
    assert "closed" in repr(slide)
    with pytest.raises(ValueError, match="closed"):
        slide.read(slice(0, 4), slice(0, 4))
    slide.close()  # closing twice is harmless
