"""Shared test fixtures: small TIFFs in every slide layout, written by tifffile."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from kit.slides import Slide

TIFF_LAYOUTS = ("rgb", "planes", "grey", "rgba")


def write_tiff(
    path: str | Path,
    image: np.ndarray,
    layout: str = "rgb",
    *,
    tile: tuple[int, int] | None = (64, 64),
    rowsperstrip: int = 16,
    compression: str | None = "zlib",
    bigtiff: bool = False,
    byteorder: str = "<",
) -> Path:
    """Write ``image`` as a TIFF in one of the competition's layouts; returns the path.

    Args:
        path: the file to write.
        image: uint8 or uint16; (H, W, 3) for "rgb" (one page, 3 samples per pixel) and
            "planes" (three single-plane minisblack pages, R then G then B), (H, W) for "grey",
            (H, W, 4) for "rgba" (one page, RGB + unassociated alpha).
        layout: one of ``TIFF_LAYOUTS``.
        tile: (th, tw) multiples of 16 for a tiled file, or None for strips of ``rowsperstrip``.
        compression: tifffile compression name ("zlib", "lzw", None...).
        bigtiff, byteorder: header variants ("<" little-endian, ">" big-endian).
    """
    expected_ndim = {"rgb": 3, "planes": 3, "grey": 2, "rgba": 3}
    if layout not in expected_ndim:
        raise ValueError(f"layout must be one of {TIFF_LAYOUTS}, got {layout!r}")
    channels = {"rgb": 3, "planes": 3, "rgba": 4}.get(layout)
    if image.ndim != expected_ndim[layout] or (channels and image.shape[2] != channels):
        raise ValueError(f"image of shape {image.shape} does not fit layout {layout!r}")
    path = Path(path)
    layout_args = dict(compression=compression, metadata=None)
    if tile is None:
        layout_args["rowsperstrip"] = rowsperstrip
    else:
        layout_args["tile"] = tile
    with tifffile.TiffWriter(path, bigtiff=bigtiff, byteorder=byteorder) as tw:
        if layout == "planes":
            for c in range(3):
                tw.write(
                    np.ascontiguousarray(image[..., c]), photometric="minisblack", **layout_args
                )
        elif layout == "grey":
            tw.write(image, photometric="minisblack", **layout_args)
        elif layout == "rgba":
            tw.write(image, photometric="rgb", extrasamples=["unassalpha"], **layout_args)
        else:
            tw.write(image, photometric="rgb", **layout_args)
    return path


@pytest.fixture(name="write_tiff")
def write_tiff_fixture():
    """The `write_tiff(path, image, layout="rgb", *, tile=(64, 64), ...)` helper."""
    return write_tiff


def random_image(shape: tuple[int, ...], dtype=np.uint8, seed: int = 0) -> np.ndarray:
    """Uniform random pixels of ``dtype`` over its full range: every pixel differs from its
    neighbours, so an off-by-one window shows up."""
    info = np.iinfo(dtype)
    return np.random.default_rng(seed).integers(
        info.min, info.max, size=shape, dtype=dtype, endpoint=True
    )


@pytest.fixture(name="random_image")
def random_image_fixture():
    """The `random_image(shape, dtype=np.uint8, seed=0)` helper."""
    return random_image


class RecordingSlide(Slide):
    """A `Slide` that records each plane read as (y0, y1, x0, x1) in ``reads``."""

    def __init__(self, *args, **kwargs) -> None:
        self.reads: list[tuple[int, int, int, int]] = []
        super().__init__(*args, **kwargs)

    def read_planes(self, rows, cols, scale=1):
        self.reads.append((rows.start, rows.stop, cols.start, cols.stop))
        return super().read_planes(rows, cols, scale)


@pytest.fixture(name="recording_slide")
def recording_slide_fixture():
    """The `RecordingSlide` class: a Slide listing what it was asked to read."""
    return RecordingSlide
