"""Source metadata the project cannot use (issue 21 classes 2, 3, 10): the XMP scan is linear, unusable metadata is
skipped with a warning and the run goes on, text chunks past PIL's total keep the image and what is carried."""

from __future__ import annotations

import logging
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import PARAMETERS, QUICK_S, RUN, cli, iTXt, png_with_chunks, structured, tEXt
from PIL import Image, PngImagePlugin, TiffImagePlugin

from cupscale_dist.files.imageio import load_input
from cupscale_dist.files.metadata import EXIF_IFD, USER_COMMENT, read_metadata


# ---------------------------------------------------------------------------------------------------------------
# 2. The XMP scan is linear; 3. metadata the project can't use is skipped with a warning, the run goes on
# ---------------------------------------------------------------------------------------------------------------
def repeated_open_tag_xmp(count: int) -> bytes:
    """An XMP packet that opens cupscale's tag ``count`` times and never closes it (8,000: 152 KB)."""
    return b'<x:xmpmeta xmlns:x="adobe:ns:meta/">' + b"<cupscale:metadata>" * count + b"</x:xmpmeta>"


@pytest.mark.parametrize("kind", ["webp", "png"])
def test_xmp_gh21_class2_repeated_opening_tags_are_scanned_in_linear_time(kind, tmp_path):
    packet = repeated_open_tag_xmp(8000)  # the old regex: ~7 s; 16,000 took 34 s in the issue
    path = tmp_path / f"in.{kind}"
    if kind == "webp":
        Image.fromarray(structured(64, 48)).save(path, xmp=packet, lossless=True)
    else:
        png_with_chunks(path, iTXt("XML:com.adobe.xmp", packet))
    started = time.monotonic()
    image, carried = load_input(path, 1 << 24, 8)
    assert time.monotonic() - started < QUICK_S
    assert image.size == (64, 48) and carried == {}


def deep_json(levels: int) -> str:
    return '{"prompt": ' + "[" * levels + "]" * levels + "}"  # json recurses once per level


def user_comment_exif(value) -> bytes:
    exif = Image.Exif()
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = value
    return exif.tobytes()


def write_with_bad_metadata(path: Path, case: str) -> None:
    image = Image.fromarray(structured(64, 48))
    packet = f"<x:xmpmeta><cupscale:metadata>{deep_json(30000)}</cupscale:metadata></x:xmpmeta>".encode()
    if case in ("deep-xmp-jpeg", "deep-xmp-webp"):
        image.save(path, xmp=packet)  # 60 KB: fits a JPEG's one XMP segment
    elif case == "deep-tiff-description":
        image.save(path, description=deep_json(30000))
    else:
        image.save(path, exif=user_comment_exif({"user-comment-int": 5, "user-comment-rational":
                                                 TiffImagePlugin.IFDRational(1, 3)}[case]))


BAD_METADATA = {"deep-xmp-jpeg": ".jpg", "deep-xmp-webp": ".webp", "deep-tiff-description": ".tif",
                "user-comment-int": ".jpg", "user-comment-rational": ".webp"}


@pytest.mark.parametrize("case", BAD_METADATA, ids=BAD_METADATA)
def test_metadata_gh21_class3_that_cannot_be_used_is_skipped_with_a_warning(case, tmp_path, caplog):
    path = tmp_path / f"in{BAD_METADATA[case]}"
    write_with_bad_metadata(path, case)
    with caplog.at_level(logging.WARNING):
        image, carried = load_input(path, 1 << 24, 8)  # was RecursionError / TypeError
    assert image.size == (64, 48) and carried == {}
    assert ("UserComment is not text" if "comment" in case else "is not the JSON cupscale writes") in caplog.text
    if case == "deep-tiff-description":
        assert read_metadata(path) == {}  # the reader of results (tifffile) too


def test_metadata_gh21_class3_cli_run_goes_on_past_it(sdxl_dir, parse_ws, tmp_path, capsys):
    source = tmp_path / "in.jpg"
    packet = f"<x:xmpmeta><cupscale:metadata>{deep_json(30000)}</cupscale:metadata></x:xmpmeta>".encode()
    Image.fromarray(structured(64, 48)).save(source, xmp=packet,
                                             exif=user_comment_exif(TiffImagePlugin.IFDRational(1, 3)))
    out = tmp_path / "up.png"
    code, _, err = cli(capsys, "upscale", source, "-o", out, "--model", sdxl_dir, "--scale", "2", *RUN, "-q")
    assert code == 0, err
    assert Image.open(out).size == (128, 96) and read_metadata(out)["cupscale:seed"] == "7"


# ---------------------------------------------------------------------------------------------------------------
# 10. Many text chunks that together pass PIL's total: the image is kept, what can't be carried is dropped
# ---------------------------------------------------------------------------------------------------------------
def zTXt_of_size(key: str, size: int) -> bytes:  # noqa: N802
    from helpers import png_chunk

    return png_chunk(b"zTXt", key.encode("latin-1") + b"\0\0" + zlib.compress(b"x" * size, 9))


def test_text_chunks_gh21_class10_past_pils_total_keep_the_image(tmp_path, caplog):
    chunk = 1 << 20  # each at PIL's 1 MiB per-chunk limit, so none is skipped for its own size
    count = PngImagePlugin.MAX_TEXT_MEMORY // chunk + 1  # 65 x 1 MiB: past the 64 MiB total; the file is ~70 KB
    path = png_with_chunks(tmp_path / "in.png", tEXt("parameters", PARAMETERS.encode("latin-1")),
                           *(zTXt_of_size(f"note{i}", chunk) for i in range(count)))
    with caplog.at_level(logging.WARNING):
        image, carried = load_input(path, 1 << 24, 8)  # was "not a readable image"
    assert image.size == (64, 48) and np.asarray(image).tobytes() == structured(64, 48).tobytes()
    assert carried == {"parameters": PARAMETERS} and f"{count} text chunk(s)" in caplog.text


def test_text_chunks_gh21_class10_carried_ones_are_kept_up_to_the_total(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(PngImagePlugin, "MAX_TEXT_MEMORY", 4 << 20)  # PIL's total, smaller: a cheaper test
    path = png_with_chunks(tmp_path / "in.png", tEXt("parameters", PARAMETERS.encode("latin-1")),
                           *(zTXt_of_size(f"cupscale:k{i}", 1 << 20) for i in range(6)))
    with caplog.at_level(logging.WARNING):
        image, carried = load_input(path, 1 << 24, 8)
    assert image.size == (64, 48)
    assert sorted(carried) == ["cupscale:k0", "cupscale:k1", "cupscale:k2", "parameters"]
    assert "'cupscale:k3', 'cupscale:k4', 'cupscale:k5'" in caplog.text
