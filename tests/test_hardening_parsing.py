"""Issue 21, hardening round 2: what parses a user's text and files. Classes 1 (YAML alias bombs in knob values and
config files), 2 (a quadratic XMP scan), 3 (metadata that crashed the run), 8 (model config JSON that is no
object), 10 (text chunks that together pass PIL's cap) and 14 (user files read without a size limit).

Every adversarial input is built here, a few bytes to a few MB, and each test failed on the code before the fix.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import resource
import time
import zlib
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pytest
from PIL import Image, PngImagePlugin, TiffImagePlugin

from cupscale_dist.cli.main import main
from cupscale_dist.captions.promptfile import MAX_PROMPT_FILE_BYTES, read_prompt_file
from cupscale_dist.config import MAX_CONFIG_BYTES, MAX_KNOB_TEXT, UpscaleConfig, set_value
from cupscale_dist.errors import UserError
from cupscale_dist.files.imageio import load_input
from cupscale_dist.files.metadata import EXIF_IFD, USER_COMMENT, read_metadata
from cupscale_dist.models.backbones import FAMILY_COMPONENTS
from cupscale_dist.models.spec import ModelSpec, model_family, read_json

from test_cli import RUN, assert_one_error_line, cli, snapshot, structured
from test_metadata_carry import PARAMETERS, iTXt, png_with_chunks, tEXt

QUICK_S = 2.0  # a refusal or a metadata skip takes milliseconds (deep YAML too: refused while scanning); the defects took 7 s or more


def alias_bomb(levels: int) -> str:
    """A flow list of ``levels`` anchors, each nine aliases of the one before: 9**levels values from ~50 bytes a
    level (10 levels: 526 bytes, 3.5 billion values; the issue's ``?steps=``)."""
    items = ["&a0 [x, x, x, x, x, x, x, x, x]"]
    items += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "[" + ", ".join(items) + "]"


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A folder holding one input image; tests write their bad files in their own tmp_path."""
    ws = tmp_path_factory.mktemp("parsing")
    Image.fromarray(structured(64, 48)).save(ws / "in.png")
    with contextlib.redirect_stderr(io.StringIO()):  # once, so that no timed run pays the CLI's first imports
        main(upscale_argv(ws, ws / "out.png", "--set", "steps=many"))
    return ws


def upscale_argv(ws: Path, out: Path, *extra: str) -> list[str]:
    """A fast run's argv; its model does not exist: a bad input must be refused before the model is looked at."""
    return ["upscale", str(ws / "in.png"), "-o", str(out), "--model", str(ws / "no-such-model"), "--scale", "2",
            *RUN, "-q", *extra]


def refused(capsys, ws: Path, tmp_path: Path, *extra: str) -> str:
    """The one error line of a bad run; checks exit 2, nothing written, a short line, and that it came fast."""
    out = tmp_path / "out.png"
    before = snapshot(ws, tmp_path)
    started = time.monotonic()
    code, _, err = cli(capsys, *upscale_argv(ws, out, *extra))
    took = time.monotonic() - started
    line = assert_one_error_line(code, err)
    assert code == 2 and snapshot(ws, tmp_path) == before
    assert len(line) < 300, f"{len(line)}-character error line: {line[:200]}..."
    assert took < QUICK_S, f"refused after {took:.1f} s"
    return line


# ---------------------------------------------------------------------------------------------------------------
# 1. YAML alias bombs in knob values (--set, service query parameters) and config files
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("knob", ["steps", "size", "lora", "guidance_scale"])
def test_alias_bomb_gh21_class1_knob_value_is_refused_at_once(knob):
    started = time.monotonic()
    with pytest.raises(UserError, match="anchors and aliases") as excinfo:
        set_value(knob, alias_bomb(10))
    assert time.monotonic() - started < QUICK_S and len(str(excinfo.value)) < 200


def test_alias_bomb_gh21_class1_service_query_is_refused_at_once():
    datastructures = pytest.importorskip("starlette.datastructures")
    from cupscale_dist.services.serve import request_knobs

    started = time.monotonic()
    with pytest.raises(UserError, match="anchors and aliases") as excinfo:
        request_knobs(datastructures.QueryParams(urlencode({"steps": alias_bomb(10)})))
    assert time.monotonic() - started < QUICK_S and len(str(excinfo.value)) < 200


BAD_KNOB_TEXT = {  # --set values whose error was megabytes long, a traceback, or that ran for seconds
    "alias-bomb": (f"steps={alias_bomb(6)}", "anchors and aliases"),
    "anchor-alone": ("size=&w [64, 64]", "anchors and aliases"),
    "over-the-length-cap": ("steps=[" + "1, " * (MAX_KNOB_TEXT // 3) + "]", f"{MAX_KNOB_TEXT}-character limit"),
    "nested-deep": ("size=" + "[" * 3000, "nested more than"),
    "int-of-1200-hex-digits": ("steps=0x" + "f" * 1200, "past 2**63"),
    "int-of-5000-digits": ("steps=" + "9" * 5000, "not a number"),
    "huge-int-for-a-float": ("guidance_scale=0x" + "f" * 300, "past 2**63"),
}


@pytest.mark.parametrize("value, words", BAD_KNOB_TEXT.values(), ids=BAD_KNOB_TEXT.keys())
def test_bad_knob_text_gh21_class1_is_one_short_line(value, words, ws, tmp_path, capsys):
    assert words in refused(capsys, ws, tmp_path, "--set", value)


BAD_CONFIG_FILES = {
    "alias-bomb": (f"steps: {alias_bomb(6)}\n", "anchors and aliases"),
    "merge-key": ("base: &base {steps: 4}\nstrength: 0.5\n", "anchors and aliases"),
    "nested-deep": ("steps: " + "[" * 3000 + "]" * 3000 + "\n", "nested more than"),
    "int-of-5000-digits": ("steps: " + "9" * 5000 + "\n", "not valid YAML"),
    "int-of-1200-hex-digits": ("seed: 0x" + "f" * 1200 + "\n", "past 2**63"),
    "mixed-unknown-keys": ("1: a\nbogus: b\n" + "x" * 1000 + ": c\n", "unknown key(s) 1, bogus, xxxx"),
}


@pytest.mark.parametrize("text, words", BAD_CONFIG_FILES.values(), ids=BAD_CONFIG_FILES.keys())
def test_bad_config_file_gh21_class1_is_one_short_line(text, words, ws, tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text(text)
    assert words in refused(capsys, ws, tmp_path, "--config", str(tmp_path / "bad.yaml"))


def test_valid_yaml_knobs_still_parse_as_before(tmp_path):
    assert set_value("size", "[2048, 1536]") == [2048, 1536] and set_value("steps", "30") == 30
    assert set_value("lora", "a.safetensors") == "a.safetensors" and set_value("prompt", "&x *y") == "&x *y"
    (tmp_path / "ok.yaml").write_text("steps: 12\nsize: [256, 192]\nlora: [a.safetensors, 'b.safetensors:0.5']\n")
    config = UpscaleConfig.load(str(tmp_path / "ok.yaml"))
    assert (config.steps, config.size, config.lora) == (12, (256, 192), ("a.safetensors", "b.safetensors:0.5"))


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


def test_metadata_gh21_class3_cli_run_goes_on_past_it(sdxl_dir, ws, tmp_path, capsys):
    source = tmp_path / "in.jpg"
    packet = f"<x:xmpmeta><cupscale:metadata>{deep_json(30000)}</cupscale:metadata></x:xmpmeta>".encode()
    Image.fromarray(structured(64, 48)).save(source, xmp=packet, exif=user_comment_exif(TiffImagePlugin.IFDRational(1, 3)))
    out = tmp_path / "up.png"
    code, _, err = cli(capsys, "upscale", source, "-o", out, "--model", sdxl_dir, "--scale", "2", *RUN, "-q")
    assert code == 0, err
    assert Image.open(out).size == (128, 96) and read_metadata(out)["cupscale:seed"] == "7"


# ---------------------------------------------------------------------------------------------------------------
# 10. Many text chunks that together pass PIL's total: the image is kept, what can't be carried is dropped
# ---------------------------------------------------------------------------------------------------------------
def zTXt_of_size(key: str, size: int) -> bytes:  # noqa: N802
    from test_cli import png_chunk

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


# ---------------------------------------------------------------------------------------------------------------
# 8. Model config JSON must be an object of bounded depth
# ---------------------------------------------------------------------------------------------------------------
def model_folder(root: Path, **files: str) -> Path:
    """A model folder whose model_index.json lists every SDXL component, with ``files`` (path: text) over it."""
    index = {"_class_name": "StableDiffusionXLPipeline", **{c: ["diffusers", "X"] for c in FAMILY_COMPONENTS["sdxl"]}}
    for name, text in {"model_index.json": json.dumps(index), **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


BAD_JSON = {  # file: text -> words of the one line
    "index-array-of-one": ({"model_index.json": "[1]"}, "model_index.json must be a JSON object {...}, got an array"),
    "index-string": ({"model_index.json": '"StableDiffusionXLPipeline"'}, "got a string"),
    "index-deep": ({"model_index.json": "[" * 100_000 + "]" * 100_000}, "model_index.json is nested too deeply"),
    "index-class-name-list": ({"model_index.json": '{"_class_name": []}'}, "is not supported"),
    "vae-empty-array": ({"vae/config.json": "[]", "unet/config.json": '{"sample_size": 8}'},
                        "vae/config.json must be a JSON object"),
    "vae-no-blocks": ({"vae/config.json": '{"block_out_channels": 4}', "unet/config.json": '{"sample_size": 8}'},
                      "no block_out_channels list"),
    "unet-deep": ({"vae/config.json": '{"block_out_channels": [1, 2]}', "unet/config.json": "{\"a\":" * 50_000},
                  "unet/config.json is nested too deeply"),
}


@pytest.mark.parametrize("files, words", BAD_JSON.values(), ids=BAD_JSON.keys())
def test_model_config_json_gh21_class8_is_one_line(files, words, tmp_path):
    folder = model_folder(tmp_path / "model", **files)
    with pytest.raises(UserError) as excinfo:
        ModelSpec.read(str(folder))  # was AttributeError / RecursionError / TypeError
    message = str(excinfo.value)
    assert words in message and message.startswith(f"--model {folder}") and "\n" not in message
    assert "re-save the pipeline" in message or "use an SDXL or SD1.5 pipeline" in message


def test_model_config_json_gh21_class8_other_readers(tmp_path):
    (tmp_path / "controlnet").mkdir()
    (tmp_path / "controlnet" / "config.json").write_text("[]")
    with pytest.raises(UserError, match="--controlnet .*config.json must be a JSON object.*re-save the model"):
        read_json(tmp_path / "controlnet", "config.json", "--controlnet", "re-save the model")
    from cupscale_dist.captions.engines import check_model

    with pytest.raises(UserError, match="--captioner-model .*config.json must be a JSON object"):
        check_model("transformers", str(tmp_path / "controlnet"))  # was AttributeError
    (tmp_path / "controlnet" / "config.json").write_text("[" * 100_000)
    from cupscale_dist.quality.distribution import check_clip_dir

    with pytest.raises(UserError, match="--clip .*no readable config.json"):
        check_clip_dir(str(tmp_path / "controlnet"))  # was RecursionError
    assert model_family(model_folder(tmp_path / "good")) == "sdxl"


# ---------------------------------------------------------------------------------------------------------------
# 14. User files are read with a size cap
# ---------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def address_space_ceiling(headroom: int):
    """This process may map at most ``headroom`` more bytes meanwhile: an unbounded read fails in a second with
    MemoryError instead of filling the machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    in_use = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    ceiling = in_use + headroom if hard == resource.RLIM_INFINITY else min(in_use + headroom, hard)
    resource.setrlimit(resource.RLIMIT_AS, (ceiling, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_regional_prompts_gh21_class14_dev_zero_is_refused_naming_the_cap(ws, tmp_path, capsys):
    with address_space_ceiling(MAX_PROMPT_FILE_BYTES * 16):  # the old read ran into GBs
        line = refused(capsys, ws, tmp_path, "--regional-prompts", "/dev/zero")
    assert f"--regional-prompts /dev/zero is over the {MAX_PROMPT_FILE_BYTES}-byte limit" in line


def test_regional_prompts_gh21_class14_file_over_the_cap_is_refused(tmp_path):
    head, tail = b'{"prompt": "', b'", "stages": []}'  # valid JSON that fits the schema, one byte over the cap
    path = tmp_path / "prompts.json"
    path.write_bytes(head + b"a" * (MAX_PROMPT_FILE_BYTES + 1 - len(head) - len(tail)) + tail)
    with pytest.raises(UserError, match=f"over the {MAX_PROMPT_FILE_BYTES}-byte limit"):
        read_prompt_file(path)
    path.write_bytes(head + b"a" * (MAX_PROMPT_FILE_BYTES - len(head) - len(tail)) + tail)  # at the cap: as before
    assert read_prompt_file(path)["stages"] == []


def test_config_file_gh21_class14_over_the_cap_is_refused(ws, tmp_path, capsys):
    path = tmp_path / "big.yaml"  # a valid config, one byte over the cap (a long comment)
    path.write_text("steps: 4\n#" + "x" * (MAX_CONFIG_BYTES - 10) + "\n")
    line = refused(capsys, ws, tmp_path, "--config", str(path))
    assert f"config: {path} is over the {MAX_CONFIG_BYTES}-byte limit" in line
    path.write_text("steps: 4\n#" + "x" * (MAX_CONFIG_BYTES - 11) + "\n")  # at the cap: read as before
    assert UpscaleConfig.load(str(path)).steps == 4
