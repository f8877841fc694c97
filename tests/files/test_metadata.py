"""A source's generator metadata survives the upscale (issue 11, part 6), and .webp/.jpg outputs join .png/.tif.

The source PNG is built chunk by chunk so every byte is known: A1111's ``parameters`` as a Latin-1 tEXt (what PIL
writes for Latin-1 text), ComfyUI's ``prompt`` as a UTF-8 iTXt with non-ASCII text and its ``workflow`` as an ASCII
tEXt of JSON, as ComfyUI saves them. End to end through ``cupscale upscale`` on the tiny SDXL model, and through
the writers for every format; each output is read back with :func:`cupscale_dist.files.metadata.read_metadata`.
"""

from __future__ import annotations

import json
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import RUN, assert_one_error_line, cli, snapshot, structured
from PIL import Image

from cupscale_dist.errors import UserError
from cupscale_dist.files.imageio import check_output_path, load_input, write_image
from cupscale_dist.files.metadata import (
    EXIF_IFD,
    MAX_CARRIED_BYTES,
    USER_COMMENT,
    file_text,
    read_metadata,
    user_comment_text,
)
from cupscale_dist.files.writers import PNG_SIGNATURE, png_chunk

PARAMETERS = "café au lait, crème brûlée\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, Seed: 42"
COMFY_PROMPT = json.dumps({"3": {"class_type": "KSampler", "inputs": {"seed": 42}},
                           "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse, 灯台 🌊"}}},
                          ensure_ascii=False)
WORKFLOW = json.dumps({"last_node_id": 9, "nodes": [{"id": 6, "type": "CLIPTextEncode",
                                                     "widgets_values": ["a lighthouse, \u706f\u53f0"]}],
                       "links": [[1, 4, 0, 3, 0, "MODEL"]], "version": 0.4})  # ASCII, as ComfyUI's json.dumps
SOURCE = {"parameters": PARAMETERS, "prompt": COMFY_PROMPT, "workflow": WORKFLOW}
RUN_KEYS = {"prompt": "a harbour at dusk", "seed": "7", "model": "tiny", "stages": [[128, 96]]}
SUFFIXES = (".png", ".tif", ".webp", ".jpg")


def tEXt(key: str, data: bytes) -> bytes:  # noqa: N802
    return png_chunk(b"tEXt", key.encode("latin-1") + b"\0" + data)


def zTXt(key: str, text: str) -> bytes:  # noqa: N802
    return png_chunk(b"zTXt", key.encode("latin-1") + b"\0\0" + zlib.compress(text.encode("latin-1")))


def iTXt(key: str, data: bytes) -> bytes:  # noqa: N802
    return png_chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + data)


def png_with_chunks(path: Path, *chunks: bytes, width: int = 64, height: int = 48) -> Path:
    """A 64x48 RGB PNG with ``chunks`` between IHDR and IDAT."""
    rows = structured(width, height)
    raw = b"".join(b"\0" + row.tobytes() for row in rows)
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    path.write_bytes(PNG_SIGNATURE + header + b"".join(chunks) + png_chunk(b"IDAT", zlib.compress(raw))
                     + png_chunk(b"IEND", b""))
    return path


def text_chunks(path: Path) -> dict[str, tuple[bytes, bytes]]:
    """A PNG's text chunks by key: (chunk type, the bytes after the key's NUL)."""
    data, at, found = path.read_bytes(), 8, {}
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at : at + 8])
        body = data[at + 8 : at + 8 + length]
        if kind in (b"tEXt", b"iTXt", b"zTXt"):
            key, _, rest = body.partition(b"\0")
            found[key.decode("latin-1")] = (kind, rest)
        at += 12 + length
    return found


@pytest.fixture
def source(tmp_path) -> Path:
    """A1111 + ComfyUI metadata, chunk types and encodings as those tools write them."""
    return png_with_chunks(tmp_path / "source.png", tEXt("parameters", PARAMETERS.encode("latin-1")),
                           iTXt("prompt", COMFY_PROMPT.encode("utf-8")), tEXt("workflow", WORKFLOW.encode("ascii")),
                           tEXt("Software", b"not carried"))


def test_the_source_keys_are_read_with_their_encodings(source):
    image, carried = load_input(source, 1 << 24, 8)
    assert image.size == (64, 48) and carried == SOURCE  # Latin-1 tEXt, UTF-8 iTXt; other keys not carried


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_every_format_carries_the_source_keys_beside_the_runs(source, tmp_path, suffix):
    _, carried = load_input(source, 1 << 24, 8)
    picture = structured(128, 96)
    out = write_image(tmp_path / f"out{suffix}", [picture[:50], picture[50:]], (128, 96), RUN_KEYS, carried=carried)
    assert read_metadata(out) == file_text(RUN_KEYS, SOURCE)
    assert read_metadata(out)["cupscale:stages"] == "[[128, 96]]" and read_metadata(out)["prompt"] == COMFY_PROMPT
    with Image.open(out) as image:
        assert image.size == (128, 96) and image.mode == "RGB"
        if suffix in (".webp", ".jpg"):  # A1111 reads ``parameters`` from EXIF UserComment
            assert user_comment_text(image.getexif().get_ifd(EXIF_IFD)[USER_COMMENT]) == PARAMETERS
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["source.png", out.name])  # no temp file left


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_comfyui_workflow_round_trips_byte_identical(source, tmp_path, suffix):
    _, carried = load_input(source, 1 << 24, 8)
    out = write_image(tmp_path / f"out{suffix}", [structured(64, 48)], (64, 48), RUN_KEYS, carried=carried)
    assert read_metadata(out)["workflow"].encode("utf-8") == WORKFLOW.encode("ascii")
    if suffix == ".png":  # the very chunk ComfyUI's loader reads: same type, same bytes
        assert text_chunks(out)["workflow"] == text_chunks(source)["workflow"] == (b"tEXt", WORKFLOW.encode())
    again = load_input(out, 1 << 24, 8)[1]  # and an output fed back in carries it on unchanged
    assert again["workflow"] == WORKFLOW and again["parameters"] == PARAMETERS


def test_without_a_source_parameters_the_user_comment_holds_the_runs_keys(tmp_path):
    out = write_image(tmp_path / "out.webp", [structured(64, 48)], (64, 48), RUN_KEYS)
    with Image.open(out) as image:
        comment = json.loads(user_comment_text(image.getexif().get_ifd(EXIF_IFD)[USER_COMMENT]))
    assert comment["cupscale:seed"] == "7" and read_metadata(out) == file_text(RUN_KEYS)


def test_a_clash_keeps_ours_and_theirs_under_the_source_prefix(tmp_path):
    """Upscaling a cupscale result: its ``cupscale:*`` keys name the new run's; ours stay, theirs get ``source:``."""
    earlier = write_image(tmp_path / "earlier.png", [structured(64, 48)], (64, 48), {"seed": "99", "version": "0.0"},
                          carried={"parameters": PARAMETERS})
    _, carried = load_input(earlier, 1 << 24, 8)
    out = write_image(tmp_path / "out.png", [structured(64, 48)], (64, 48), RUN_KEYS, carried=carried)
    meta = read_metadata(out)
    assert meta["cupscale:seed"] == "7" and meta["source:cupscale:seed"] == "99"
    assert meta["source:cupscale:version"] == "0.0" and "cupscale:version" not in meta
    assert meta["parameters"] == PARAMETERS  # A1111's key has no clash: it keeps its name


def test_utf8_bytes_in_a_tEXt_chunk_are_read_as_utf8_and_others_as_latin1(tmp_path):  # noqa: N802
    path = png_with_chunks(tmp_path / "in.png", tEXt("prompt", "猫 café".encode("utf-8")),
                           tEXt("parameters", b"\xe9t\xe9 \xff"))  # not UTF-8: Latin-1 by PNG's rule
    assert load_input(path, 1 << 24, 8)[1] == {"prompt": "猫 café", "parameters": "été ÿ"}


@pytest.mark.parametrize("compressed", [False, True], ids=["tEXt", "zTXt"])
def test_oversized_and_undecodable_chunks_are_skipped_with_a_warning(tmp_path, caplog, compressed):
    big = "x" * (MAX_CARRIED_BYTES + 1)
    path = png_with_chunks(tmp_path / "in.png", zTXt("workflow", big) if compressed else tEXt("workflow", big.encode()),
                           iTXt("prompt", b"\xff\xfe not UTF-8"), tEXt("parameters", PARAMETERS.encode("latin-1")))
    with caplog.at_level(logging.WARNING):
        image, carried = load_input(path, 1 << 24, 8)
    assert image.size == (64, 48) and carried == {"parameters": PARAMETERS}
    assert "'workflow'" in caplog.text and str(MAX_CARRIED_BYTES) in caplog.text
    out = write_image(tmp_path / "out.png", [np.asarray(image)], image.size, RUN_KEYS, carried=carried)
    assert read_metadata(out) == file_text(RUN_KEYS, {"parameters": PARAMETERS})


def test_a1111_jpeg_and_webp_parameters_are_read_from_exif(tmp_path):
    exif = Image.Exif()
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = b"UNICODE\0" + PARAMETERS.encode("utf-16-be")  # piexif, as A1111 writes
    for name in ("a1111.jpg", "a1111.webp"):
        Image.fromarray(structured(64, 48)).save(tmp_path / name, exif=exif.tobytes())
        assert load_input(tmp_path / name, 1 << 24, 8)[1] == {"parameters": PARAMETERS}


def test_a_jpeg_leaves_out_what_its_64k_segment_cannot_hold(tmp_path, caplog):
    carried = {"parameters": PARAMETERS, "workflow": json.dumps({"nodes": ["n" * 100] * 1000})}  # ~100 KB
    with caplog.at_level(logging.WARNING):
        jpeg = write_image(tmp_path / "out.jpg", [structured(64, 48)], (64, 48), RUN_KEYS, carried=carried)
    assert read_metadata(jpeg) == file_text(RUN_KEYS, {"parameters": PARAMETERS}) and "'workflow'" in caplog.text
    webp = write_image(tmp_path / "out.webp", [structured(64, 48)], (64, 48), RUN_KEYS, carried=carried)
    assert read_metadata(webp) == file_text(RUN_KEYS, carried)  # WebP's RIFF chunks have no such limit


def test_an_unknown_extension_is_refused_naming_the_supported_ones(tmp_path):
    with pytest.raises(UserError) as excinfo:
        check_output_path(tmp_path / "out.gif", overwrite=False)
    message = str(excinfo.value)
    assert "\n" not in message and "'.gif'" in message
    assert all(s in message for s in (".png", ".tif", ".tiff", ".webp", ".jpg", ".jpeg"))


# ---------------------------------------------------------------------------------------------------------------
# End to end: `cupscale upscale` on the tiny SDXL model
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".png", ".webp"])
def test_cli_carries_the_source_metadata(source, sdxl_dir, tmp_path, capsys, suffix):
    out = tmp_path / f"up{suffix}"
    code, stdout, err = cli(capsys, "upscale", source, "-o", out, "--model", sdxl_dir, "--scale", "2", *RUN, "-q",
                            "--prompt", "a lighthouse")
    assert code == 0, err
    assert f"wrote {out} (128x96)" in stdout
    meta = read_metadata(out)
    assert {k: meta[k] for k in SOURCE} == SOURCE
    assert meta["cupscale:prompt"] == "a lighthouse" and meta["cupscale:seed"] == "7"
    assert meta["cupscale:model"] == sdxl_dir and meta["cupscale:source"] == str(source)
    assert json.loads(meta["cupscale:config"])["tile"] == 16
    with Image.open(out) as image:
        assert image.size == (128, 96)


def test_cli_run_succeeds_past_an_oversized_chunk(sdxl_dir, tmp_path, capsys, caplog):
    path = png_with_chunks(tmp_path / "in.png", zTXt("workflow", "x" * (MAX_CARRIED_BYTES + 1)),
                           tEXt("parameters", PARAMETERS.encode("latin-1")))
    out = tmp_path / "up.jpg"
    code, _, err = cli(capsys, "upscale", path, "-o", out, "--model", sdxl_dir, "--scale", "2", *RUN, "-q")
    assert code == 0, err
    meta = read_metadata(out)
    assert meta["parameters"] == PARAMETERS and "workflow" not in meta and meta["cupscale:seed"] == "7"


def test_cli_refuses_webp_over_its_side_limit_before_any_work(tmp_path, capsys):
    Image.fromarray(structured(1100, 825)).save(tmp_path / "in.png")  # x16 = 17600x13200: within max_output_pixels
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "upscale", tmp_path / "in.png", "-o", tmp_path / "up.webp", "--scale", "16",
                       "--model", tmp_path / "no-such-model", *RUN, "-q")  # a model that would fail if it loaded
    line = assert_one_error_line(code, err)
    assert "16383" in line and "17600x13200" in line and ".png" in line and ".tif" in line
    assert snapshot(tmp_path) == before  # nothing written, not even a temp file
    code, _, err = cli(capsys, "upscale", tmp_path / "in.png", "-o", tmp_path / "up.webp", "--scale", "16",
                       "--model", tmp_path / "no-such-model", *RUN, "--dry-run")
    assert "16383" in assert_one_error_line(code, err)


def test_a_batch_item_carries_the_source_metadata(source, sdxl_dir, sdxl_model, tmp_path):
    """`cupscale batch`'s per-image function (the Ray Data worker's and the tile-parallel driver's) carries them too."""
    from helpers import small_config

    from cupscale_dist.execution.executor import LocalExecutor
    from cupscale_dist.services.batch.manifest import STATUS_OK
    from cupscale_dist.services.batch.worker import process_item

    item = {"input_path": str(source), "output_path": "source.png", "overrides": {}}
    row = process_item(item, small_config(sdxl_dir), tmp_path / "out", LocalExecutor(sdxl_model, 4))
    assert row["status"] == STATUS_OK, row["error"]
    meta = read_metadata(tmp_path / "out" / "source.png")
    assert {k: meta[k] for k in SOURCE} == SOURCE and meta["cupscale:source"] == str(source)
