"""Streamed outputs: PNG and tiled BigTIFF written band by band give the same pixels and parameters as the image
held whole, and appear only when complete."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from cupscale_dist.files.imageio import read_png_metadata, write_image
from cupscale_dist.files.writers import TIFF_TILE, read_tiff_metadata

METADATA = {"prompt": "a harbour at dusk, 港口", "seed": "7", "stages": [[512, 384]], "config": {"tile": 128}}


def bands_of(image: np.ndarray, heights=(5, 64, 1, 200)):
    """The image cut into bands of irregular heights, as the tiled decode yields them."""
    top, k = 0, 0
    while top < image.shape[0]:
        height = heights[k % len(heights)]
        yield image[top : top + height]
        top, k = top + height, k + 1


@pytest.fixture
def picture() -> np.ndarray:
    rng = np.random.default_rng(3)
    smooth = np.linspace(0, 255, 333 * 517 * 3).reshape(333, 517, 3)
    return (smooth + rng.integers(0, 40, smooth.shape)).clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_streamed_output_has_the_pixels_and_the_parameters(tmp_path, picture, suffix):
    out = write_image(tmp_path / f"out{suffix}", bands_of(picture), (517, 333), METADATA)
    with Image.open(out) as image:
        assert image.mode == "RGB" and image.size == (517, 333)
        assert np.array_equal(np.asarray(image), picture)
    read = read_png_metadata(out) if suffix == ".png" else read_tiff_metadata(out)
    assert read["prompt"] == METADATA["prompt"] and read["seed"] == "7" and read["stages"] == "[[512, 384]]"
    assert list(tmp_path.iterdir()) == [out]  # no temp file left beside it


def test_tiff_is_tiled_bigtiff(tmp_path, picture):
    import tifffile

    out = write_image(tmp_path / "out.tiff", bands_of(picture), (517, 333), METADATA)
    with tifffile.TiffFile(out) as tif:
        page = tif.pages[0]
        assert tif.is_bigtiff and page.is_tiled and (page.tilelength, page.tilewidth) == (TIFF_TILE, TIFF_TILE)
        assert np.array_equal(page.asarray(), picture)


@pytest.mark.parametrize("suffix", [".png", ".tif", ".webp", ".jpg"])
def test_a_run_that_fails_mid_write_leaves_nothing_and_keeps_an_existing_file(tmp_path, picture, suffix):
    target = tmp_path / f"out{suffix}"
    target.write_bytes(b"an earlier result")

    def failing():
        yield picture[:100]
        raise RuntimeError("decode failed")

    with pytest.raises(RuntimeError, match="decode failed"):
        write_image(target, failing(), (517, 333), METADATA)
    assert target.read_bytes() == b"an earlier result" and os.listdir(tmp_path) == [target.name]


def test_too_few_rows_is_an_error_not_a_short_image(tmp_path, picture):
    with pytest.raises(ValueError, match="300 rows written for a 333 px high image"):
        write_image(tmp_path / "out.png", iter([picture[:300]]), (517, 333), METADATA)
    assert not (tmp_path / "out.png").exists()
