"""Image input/output (cupscale_dist.files.imageio): every odd mode converted to 8-bit RGB with the right pixels, every
bad input one clear UserError, outputs written atomically with their parameters. Real files, real Pillow."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cupscale_dist.errors import UserError
from cupscale_dist.files.imageio import check_output_path, load_image, read_png_metadata, save_png

BIG = 10**8  # a pixel limit no test image reaches


def load(path, max_pixels: int = BIG, min_side: int = 1) -> Image.Image:
    image = load_image(path, max_pixels, min_side)
    assert image.mode == "RGB"
    return image


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(int)


def quadrants(mode: str, colours: list, size: int = 16) -> Image.Image:
    """A 2x2 grid of solid ``size`` x ``size`` patches, top-left, top-right, bottom-left, bottom-right."""
    image = Image.new(mode, (2 * size, 2 * size))
    for k, colour in enumerate(colours):
        image.paste(colour, ((k % 2) * size, (k // 2) * size, (k % 2 + 1) * size, (k // 2 + 1) * size))
    return image


def centres(image: Image.Image, size: int = 16) -> list[tuple[int, ...]]:
    half = size // 2
    return [image.getpixel(((k % 2) * size + half, (k // 2) * size + half)) for k in range(4)]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(path: Path, width: int, height: int, *, full: bool) -> Path:
    """A greyscale PNG declaring ``width`` x ``height``; with ``full`` a complete, valid all-black image whose few
    kilobytes decompress to width*height bytes (a real decompression bomb), else the header and a corrupt IDAT."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    if full:
        packer, row = zlib.compressobj(9), b"\0" * (width + 1)
        data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    else:
        data = b"this is not a zlib stream"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b""))
    return path


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message and "Traceback" not in message
    return message


# ---------------------------------------------------------------------------------------------------------------
# Modes: converted, not crashed, with the expected pixels
# ---------------------------------------------------------------------------------------------------------------
def test_rgb_png_is_loaded_exactly(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "rgb.png")
    image = load(tmp_path / "rgb.png")
    assert image.size == (40, 24)
    np.testing.assert_array_equal(np.asarray(image), array)


def test_rgba_alpha_is_composited_on_white(tmp_path):
    colours = [(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128), (200, 100, 50, 255)]
    quadrants("RGBA", colours).save(tmp_path / "rgba.png")
    assert Image.open(tmp_path / "rgba.png").mode == "RGBA"
    got = centres(load(tmp_path / "rgba.png"))
    assert got[0] == (255, 255, 255)  # fully transparent red shows the white background, not red
    assert got[1] == (0, 0, 255)
    assert all(abs(v - 127) <= 1 for v in got[2])  # half-transparent black over white
    assert got[3] == (200, 100, 50)


def test_la_is_composited_on_white(tmp_path):
    quadrants("LA", [(0, 0), (100, 255), (0, 128), (255, 255)]).save(tmp_path / "la.png")
    assert Image.open(tmp_path / "la.png").mode == "LA"
    got = centres(load(tmp_path / "la.png"))
    assert got[0] == (255, 255, 255)
    assert got[1] == (100, 100, 100)
    assert all(abs(v - 127) <= 1 for v in got[2])
    assert got[3] == (255, 255, 255)


def _palette_image() -> Image.Image:
    image = quadrants("P", [0, 1, 2, 3])
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30] + [0] * (256 - 4) * 3)
    return image


def test_palette_with_transparent_index_is_composited_on_white(tmp_path):
    _palette_image().save(tmp_path / "p.png", transparency=0)
    reopened = Image.open(tmp_path / "p.png")
    assert reopened.mode == "P" and reopened.info["transparency"] == 0
    assert centres(load(tmp_path / "p.png")) == [(255, 255, 255), (0, 255, 0), (0, 0, 255), (10, 20, 30)]


def test_palette_with_alpha_table_is_composited_on_white(tmp_path):
    _palette_image().save(tmp_path / "p-alpha.png", transparency=bytes([0, 255, 128, 255]))
    got = centres(load(tmp_path / "p-alpha.png"))
    assert got[0] == (255, 255, 255)
    assert got[1] == (0, 255, 0)
    assert abs(got[2][0] - 127) <= 1 and abs(got[2][1] - 127) <= 1 and got[2][2] == 255  # half blue over white
    assert got[3] == (10, 20, 30)


def test_gif_with_transparency_is_composited_on_white(tmp_path):
    _palette_image().save(tmp_path / "p.gif", transparency=1)
    assert centres(load(tmp_path / "p.gif")) == [(255, 0, 0), (255, 255, 255), (0, 0, 255), (10, 20, 30)]


def test_grey_and_rgb_colour_key_transparency_is_composited_on_white(tmp_path):
    quadrants("L", [0, 100, 200, 0]).save(tmp_path / "l-key.png", transparency=0)
    assert centres(load(tmp_path / "l-key.png")) == [(255, 255, 255), (100,) * 3, (200,) * 3, (255, 255, 255)]
    quadrants("RGB", [(0, 0, 0), (10, 20, 30), (0, 0, 0), (1, 2, 3)]).save(tmp_path / "rgb-key.png",
                                                                            transparency=(0, 0, 0))
    assert centres(load(tmp_path / "rgb-key.png")) == [(255, 255, 255), (10, 20, 30), (255, 255, 255), (1, 2, 3)]


def test_cmyk_jpeg_is_converted(tmp_path):
    colours = [(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255), (0, 255, 255, 0)]  # white, cyan, black, red
    quadrants("CMYK", colours).save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    got = centres(load(tmp_path / "cmyk.jpg"))
    expected = [(255, 255, 255), (0, 255, 255), (0, 0, 0), (255, 0, 0)]
    for g, e in zip(got, expected):
        assert max(abs(a - b) for a, b in zip(g, e)) <= 12, (got, expected)


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 256, 1000, 32768], [40000, 50000, 65280, 65535]], dtype=np.uint16)
    array = np.repeat(np.repeat(values, 8, axis=0), 8, axis=1)  # 32 x 16
    Image.fromarray(array).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    got = pixels(load(tmp_path / "grey16.png"))
    expected = np.floor(array / 65535 * 255 + 0.5).astype(int)
    assert np.all(got == expected[..., None])
    assert got.max() == 255 and got.min() == 0 and len(np.unique(got)) == 8  # no clipping at 255


def test_dark_16bit_png_stays_dark(tmp_path):
    """All values <= 255 in a 16-bit file are still 16-bit values: 200/65535 is near black, not grey 200."""
    Image.fromarray(np.full((16, 16), 200, dtype=np.uint16)).save(tmp_path / "dark16.png")
    assert pixels(load(tmp_path / "dark16.png")).max() <= 1


def test_16bit_big_endian_tiff_is_scaled(tmp_path):
    array = np.array([[40000] * 8 + [0] * 8] * 16, dtype=">u2")
    image = Image.frombytes("I;16B", (16, 16), array.tobytes())  # (Image.paste mangles I;16B values)
    image.save(tmp_path / "grey16b.tif")
    assert Image.open(tmp_path / "grey16b.tif").mode == "I;16B"
    got = pixels(load(tmp_path / "grey16b.tif"))
    assert got[0, 0].tolist() == [156] * 3 and got[0, 15].tolist() == [0] * 3


def test_16bit_grey_png_colour_key_is_composited_on_white(tmp_path):
    Image.fromarray(np.array([[1000] * 8 + [40000] * 8] * 16, dtype=np.uint16)).save(tmp_path / "key16.png",
                                                                                    transparency=1000)
    got = pixels(load(tmp_path / "key16.png"))
    assert got[0, 0].tolist() == [255] * 3 and got[0, 15].tolist() == [156] * 3


def test_float_tiff_in_unit_range_is_scaled(tmp_path):
    Image.fromarray(np.array([[0.0] * 8 + [0.5] * 8] * 16, dtype=np.float32)).save(tmp_path / "float.tif")
    assert Image.open(tmp_path / "float.tif").mode == "F"
    got = pixels(load(tmp_path / "float.tif"))
    assert got[0, 0].tolist() == [0] * 3 and got[0, 15].tolist() == [128] * 3


def test_32bit_int_tiff_with_16bit_data_is_scaled(tmp_path):
    Image.fromarray(np.array([[0] * 8 + [65535] * 8] * 16, dtype=np.int32)).save(tmp_path / "int.tif")
    assert Image.open(tmp_path / "int.tif").mode == "I"
    got = pixels(load(tmp_path / "int.tif"))
    assert got[0, 0].tolist() == [0] * 3 and got[0, 15].tolist() == [255] * 3


def test_greyscale_l_is_replicated(tmp_path):
    quadrants("L", [0, 77, 200, 255]).save(tmp_path / "grey.png")
    assert centres(load(tmp_path / "grey.png")) == [(0,) * 3, (77,) * 3, (200,) * 3, (255,) * 3]


def test_bilevel_is_black_and_white(tmp_path):
    quadrants("1", [0, 1, 1, 0]).save(tmp_path / "bw.png")
    assert centres(load(tmp_path / "bw.png")) == [(0,) * 3, (255,) * 3, (255,) * 3, (0,) * 3]


def test_rgb_jpeg_is_loaded(tmp_path):
    colours = [(250, 10, 10), (10, 250, 10), (10, 10, 250), (128, 128, 128)]
    quadrants("RGB", colours).save(tmp_path / "photo.jpg", quality=95)
    got = centres(load(tmp_path / "photo.jpg"))
    for g, e in zip(got, colours):
        assert max(abs(a - b) for a, b in zip(g, e)) <= 8, (got, colours)


def test_grey_jpeg_is_loaded(tmp_path):
    quadrants("L", [0, 77, 200, 255]).save(tmp_path / "grey.jpg", quality=95)
    got = centres(load(tmp_path / "grey.jpg"))
    assert all(g[0] == g[1] == g[2] for g in got)
    assert all(abs(g[0] - e) <= 6 for g, e in zip(got, [0, 77, 200, 255]))


def test_exif_orientation_is_applied(tmp_path):
    """A phone JPEG stored landscape with 'rotate 90 CW' in EXIF is the portrait image every viewer shows."""
    image = Image.new("RGB", (40, 20), (255, 255, 255))
    image.paste((255, 0, 0), (0, 0, 10, 20))  # red band on the left
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    got = load(tmp_path / "rotated.jpg")
    assert got.size == (20, 40)
    top, bottom = got.getpixel((10, 2)), got.getpixel((10, 37))
    assert top[0] > 200 and top[1] < 60 and min(bottom) > 200  # the left band is now on top


def test_loaded_image_does_not_hold_the_file(tmp_path):
    path = tmp_path / "in.png"
    Image.new("RGB", (20, 20), (1, 2, 3)).save(path)
    image = load(path)
    path.unlink()
    assert image.getpixel((5, 5)) == (1, 2, 3) and image.copy().size == (20, 20)


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: one clear UserError each
# ---------------------------------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(UserError) as excinfo:
        load(tmp_path / "nope.png")
    assert "no such file" in one_line_error(excinfo)


def test_directory(tmp_path):
    with pytest.raises(UserError) as excinfo:
        load(tmp_path)
    assert "not a file" in one_line_error(excinfo)


def test_empty_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(UserError) as excinfo:
        load(tmp_path / "empty.png")
    assert "empty" in one_line_error(excinfo)


@pytest.mark.parametrize("content", [b"hello, I am text\n", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, bytes(range(256)) * 4])
def test_not_an_image(tmp_path, content):
    (tmp_path / "fake.png").write_bytes(content)
    with pytest.raises(UserError) as excinfo:
        load(tmp_path / "fake.png")
    assert "fake.png" in one_line_error(excinfo)


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_truncated_image(tmp_path, fmt):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / f"full.{fmt}")
    data = (tmp_path / f"full.{fmt}").read_bytes()
    (tmp_path / f"half.{fmt}").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as excinfo:
        load(tmp_path / f"half.{fmt}")
    assert "truncated" in one_line_error(excinfo) or "corrupt" in str(excinfo.value)


def test_pixel_limit_is_inclusive(tmp_path):
    Image.new("RGB", (40, 25), (9, 9, 9)).save(tmp_path / "in.png")
    assert load(tmp_path / "in.png", max_pixels=1000).size == (40, 25)
    with pytest.raises(UserError) as excinfo:
        load(tmp_path / "in.png", max_pixels=999)
    assert "40x25" in one_line_error(excinfo) and "999" in str(excinfo.value)


def test_decompression_bomb_over_the_configured_limit(tmp_path):
    """A real, valid 5000x5000 PNG of a few KB (25 MB decoded) against the default limit's order of magnitude."""
    path = bomb_png(tmp_path / "bomb.png", 5000, 5000, full=True)
    assert path.stat().st_size < 100_000
    with pytest.raises(UserError) as excinfo:
        load(path, max_pixels=4096 * 4096)
    assert "5000x5000" in one_line_error(excinfo) and "limit" in str(excinfo.value)


def test_decompression_bomb_over_pillows_own_limit(tmp_path):
    path = bomb_png(tmp_path / "huge.png", 100_000, 100_000, full=False)  # 10^10 pixels: PIL refuses to open it
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(UserError) as excinfo:
        load(path, max_pixels=4096 * 4096)
    assert "pixel" in one_line_error(excinfo)
    assert Image.MAX_IMAGE_PIXELS == before  # the global guard is left as it was


def test_raised_pixel_limit_is_honoured_past_pillows_default(tmp_path):
    """max_input_pixels above PIL's built-in limit (89 M) must really let such an image through the size check:
    this 10000x10000 header with corrupt data then fails as a corrupt file, not as 'too many pixels'."""
    path = bomb_png(tmp_path / "large.png", 10_000, 10_000, full=False)
    with pytest.raises(UserError) as excinfo:
        load(path, max_pixels=200_000_000)
    message = one_line_error(excinfo)
    assert "pixel limit" not in message and "bomb" not in message
    assert "truncated" in message or "corrupt" in message or "readable" in message


@pytest.mark.parametrize("size", [(1, 1), (15, 100), (100, 15)])
def test_too_small(tmp_path, size):
    Image.new("RGB", size).save(tmp_path / "small.png")
    with pytest.raises(UserError) as excinfo:
        load(tmp_path / "small.png", min_side=16)
    assert f"{size[0]}x{size[1]}" in one_line_error(excinfo) and "too small" in str(excinfo.value)


def test_min_side_is_inclusive(tmp_path):
    Image.new("RGB", (16, 100)).save(tmp_path / "ok.png")
    assert load(tmp_path / "ok.png", min_side=16).size == (16, 100)


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------
def test_check_output_path(tmp_path):
    (tmp_path / "exists.png").write_bytes(b"x")
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "file").write_bytes(b"x")
    assert check_output_path(tmp_path / "new.png", overwrite=False) == tmp_path / "new.png"
    assert check_output_path(tmp_path / "NEW.PNG", overwrite=False) == tmp_path / "NEW.PNG"
    assert check_output_path(tmp_path / "exists.png", overwrite=True) == tmp_path / "exists.png"
    bad = {
        tmp_path / "out.gif": ".jpeg", tmp_path / "out": ".png", tmp_path / "exists.png": "--overwrite",
        tmp_path / "missing" / "out.png": "does not exist", tmp_path / "file" / "out.png": "not a directory",
    }
    for path, words in bad.items():
        with pytest.raises(UserError) as excinfo:
            check_output_path(path, overwrite=False)
        assert words in one_line_error(excinfo), path
    with pytest.raises(UserError) as excinfo:
        check_output_path(tmp_path / "folder.png", overwrite=True)
    assert "directory" in one_line_error(excinfo)


def test_save_png_round_trips_metadata_and_leaves_no_temp_file(tmp_path):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (8, 12, 3), dtype=np.uint8))
    meta = {"prompt": "a café by the sea, 猫 🐈", "seed": "7", "stages": [[128, 128]], "config": {"tile": 16}}
    save_png(image, tmp_path / "out.png", meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
    with Image.open(tmp_path / "out.png") as reopened:
        np.testing.assert_array_equal(np.asarray(reopened), np.asarray(image))
    got = read_png_metadata(tmp_path / "out.png")
    assert got["prompt"] == meta["prompt"] and got["seed"] == "7"
    assert json.loads(got["stages"]) == [[128, 128]] and json.loads(got["config"]) == {"tile": 16}


def test_save_png_gives_a_new_file_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        save_png(Image.new("RGB", (4, 4)), tmp_path / "new.png", {})
    finally:
        os.umask(old)
    assert (tmp_path / "new.png").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600


def test_save_png_replaces_an_existing_file_keeping_its_permissions(tmp_path):
    path = tmp_path / "out.png"
    path.write_bytes(b"old")
    path.chmod(0o640)
    save_png(Image.new("RGB", (4, 4), (5, 6, 7)), path, {"seed": "1"})
    assert path.stat().st_mode & 0o777 == 0o640
    assert Image.open(path).getpixel((0, 0)) == (5, 6, 7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_save_png_into_a_missing_directory_is_a_user_error(tmp_path):
    with pytest.raises(UserError) as excinfo:
        save_png(Image.new("RGB", (4, 4)), tmp_path / "gone" / "out.png", {})
    assert "gone" in one_line_error(excinfo)
