"""Issue 35 item 6: a fuzz harness for the files a user hands the CLI. Generated JSON (model configs, regional
prompts), tokenizer files, safetensors headers, checkpoints, batch journals and paths go through the real readers
the CLI calls (in this process, so each example costs milliseconds): ``read_json_object``, ``read_prompt_file``,
``load_tokenizer``, ``checkpoint_kind`` / ``check_flux_tensors`` / the LoRA header reader,
``Checkpointer.load``, ``Journal.rows`` / ``read_manifest`` / ``ManifestWriter``, ``check_path_text`` /
``parse_lora``.

The property, for every example: the file is accepted, or refused with a UserError whose message is one line of at
most 300 characters; never another exception; memory bounded (each example runs under an address-space ceiling, so
a reader that slurps a file fails as MemoryError) and time bounded (sizes are bounded by the strategies, the
readers by their caps); nothing written outside the example's own folder (only ``ManifestWriter`` writes, into the
output folder it is given). Examples come from the Hypothesis profile in conftest.py (``HYPOTHESIS_PROFILE=ci``:
a fixed, derandomized budget; ``nightly``: many more). Failing examples found are plain regression tests in
the round-3 hardening tests (tests/files/test_user_paths.py and its siblings).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from helpers import MAX_LINE
from PIL import Image

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, strategies as st  # noqa: E402

from cupscale_dist import UserError  # noqa: E402

HEADROOM = 2 << 30  # bytes an example may map beyond what the process holds: every reader's cap is far under


def address_space_ceiling(headroom: int = HEADROOM):
    """This process may map at most ``headroom`` more bytes meanwhile: an unbounded read fails at once (the
    hardening tests' ceiling, with the fuzz harness's headroom)."""
    from helpers import address_space_ceiling as ceiling

    return ceiling(headroom)


def accepted_or_one_line(call):
    """``call()``'s result, or None when it raised a UserError of one short line; anything else fails the example."""
    try:
        with address_space_ceiling():
            return call()
    except UserError as exc:
        message = str(exc)
        assert message and "\n" not in message and "\r" not in message, repr(message)
        assert len(message) <= MAX_LINE, f"{len(message)} characters: {message}"
        return None


@contextlib.contextmanager
def example_dir():
    """A fresh folder per example (Hypothesis reruns the test body; function fixtures would be shared)."""
    folder = Path(tempfile.mkdtemp(prefix="cupscale-fuzz-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# -- generated JSON ---------------------------------------------------------------------------------------------
SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=20)
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=20)


@st.composite
def json_bytes(draw, objects=JSON_VALUES) -> bytes:
    """JSON text as a user's file may hold it: valid JSON of any type, deep nesting, truncated text, raw bytes."""
    kind = draw(st.sampled_from(["json", "json", "deep", "cut", "bytes"]))
    if kind == "json":
        return json.dumps(draw(objects)).encode()
    if kind == "deep":
        depth = draw(st.integers(1, 60_000))
        opener = draw(st.sampled_from(["[", '{"a":']))
        return (opener * depth + ("]" * depth if opener == "[" else "1" + "}" * depth)).encode()
    if kind == "cut":
        text = json.dumps(draw(objects)).encode()
        return text[: draw(st.integers(0, len(text)))]
    return draw(st.binary(max_size=200))


@given(data=json_bytes())
def test_fuzz_model_config_json_is_an_object_or_one_line(data):
    from cupscale_dist.files.userfile import read_json_object

    with example_dir() as folder:
        (folder / "config.json").write_bytes(data)
        result = accepted_or_one_line(lambda: read_json_object(folder / "config.json", "--model m: config.json",
                                                               "re-save the pipeline"))
        assert result is None or isinstance(result, dict)
        assert files_under(folder) == {"config.json"}


PROMPT_FILES = st.fixed_dictionaries({}, optional={
    "prompt": SCALARS,
    "stages": st.lists(st.fixed_dictionaries({}, optional={
        "stage": st.integers(-2, 3) | SCALARS, "size": st.lists(st.integers(-5, 70), max_size=3) | SCALARS,
        "views": st.lists(st.fixed_dictionaries({}, optional={
            "box": st.lists(st.integers(-5, 70), max_size=5) | SCALARS, "prompt": SCALARS}), max_size=3) | SCALARS}),
        max_size=3) | SCALARS,
}) | JSON_VALUES


@given(data=json_bytes(PROMPT_FILES))
def test_fuzz_regional_prompts_file_is_accepted_or_one_line(data):
    from cupscale_dist.captions.promptfile import read_prompt_file

    with example_dir() as folder:
        (folder / "prompts.json").write_bytes(data)
        accepted_or_one_line(lambda: read_prompt_file(folder / "prompts.json"))
        assert files_under(folder) == {"prompts.json"}


# -- tokenizer files --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_tokenizer(tmp_path_factory) -> Path:
    """The tiny SDXL pipeline's first tokenizer (CLIP's files, a small vocabulary)."""
    from cupscale_dist.testing.tiny import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("fuzz-sdxl")) / "tokenizer"


TOKENIZER_CONFIGS = st.fixed_dictionaries({}, optional={
    "model_max_length": SCALARS, "bos_token": SCALARS, "eos_token": SCALARS, "pad_token": SCALARS,
    "unk_token": SCALARS, "do_lower_case": SCALARS}) | JSON_VALUES
VOCABS = st.dictionaries(st.text(max_size=6), st.integers(-3, 60) | SCALARS, max_size=8) | JSON_VALUES
MERGES = st.lists(st.text(max_size=8), max_size=6).map(lambda lines: "\n".join(["#version: 0.2", *lines]).encode())


@given(file=st.sampled_from(["tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"]),
       data=st.data())
def test_fuzz_clip_tokenizer_files_load_or_are_one_line(clip_tokenizer, file, data):
    from transformers import CLIPTokenizer

    from cupscale_dist.models.spec import load_tokenizer

    if file == "merges.txt":
        content = data.draw(MERGES | st.binary(max_size=100))
    else:
        content = data.draw(json_bytes(TOKENIZER_CONFIGS if file != "vocab.json" else VOCABS))
    with example_dir() as folder:
        shutil.copytree(clip_tokenizer, folder / "tokenizer")
        (folder / "tokenizer" / file).write_bytes(content)
        before = files_under(folder)
        accepted_or_one_line(lambda: load_tokenizer(CLIPTokenizer, folder / "tokenizer", f"tokenizer {folder}",
                                                    "re-save the tokenizer"))
        assert files_under(folder) == before


# -- safetensors headers ----------------------------------------------------------------------------------------
TENSOR_NAMES = st.sampled_from([
    "img_in.weight", "img_in.bias", "txt_in.weight", "double_blocks.0.img_attn.qkv.weight",
    "double_blocks.1.img_attn.qkv.weight", "double_blocks.x.img_mod.lin.weight", "single_blocks.0.linear1.weight",
    "single_blocks.0.norm.query_norm.scale", "model.diffusion_model.double_blocks.0.img_attn.qkv.weight",
    "model.diffusion_model.img_in.weight", "vae.encoder.conv_in.weight", "first_stage_model.decoder.conv_out.bias",
    "conditioner.embedders.1.model.ln_final.weight", "cond_stage_model.transformer.text_model.embeddings.x",
    "model.diffusion_model.input_blocks.0.0.weight", "joint_blocks.0.x", "unet.down_blocks.0.lora_A.weight",
    "transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
    "lora_unet_double_blocks_3_img_attn_qkv.lora_down.weight",
    "__metadata__"]) | st.text(max_size=30)
DTYPES = st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "XX"])
SIZES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1}


@st.composite
def safetensors_bytes(draw) -> bytes:
    """A safetensors file: an 8-byte header length, a JSON header of tensors (mostly consistent offsets, sometimes
    not), then the data; or a header of any JSON, or bytes."""
    kind = draw(st.sampled_from(["tensors", "tensors", "tensors", "header", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=120))
    if kind == "header":
        header = draw(json_bytes())
        return struct.pack("<Q", draw(st.sampled_from([len(header), 0, 2**63, len(header) + 5]))) + header
    header, offset = {}, 0
    for name in draw(st.lists(TENSOR_NAMES, min_size=1, max_size=6, unique=True)):
        if name == "__metadata__":
            header[name] = draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2) | JSON_VALUES)
            continue
        dtype = draw(DTYPES)
        shape = draw(st.lists(st.integers(0, 4), max_size=3) | st.lists(st.integers(-3, 2**40), max_size=2))
        count = 1
        for side in shape:
            count *= max(side, 0)
        length = count * SIZES.get(dtype, 1) if count < 4096 else 16
        begin, end = draw(st.sampled_from([(offset, offset + length), (offset, offset + length + 3), (5, 2)]))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
        offset = max(offset, end if end >= begin else offset)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + bytes(draw(st.integers(0, 3)) + max(offset, 0))


@given(data=safetensors_bytes())
def test_fuzz_safetensors_headers_through_the_model_and_lora_readers(data):
    from cupscale_dist.models.backbones.flux.header import check_flux_tensors
    from cupscale_dist.models.lora import read_header
    from cupscale_dist.models.single_file import checkpoint_keys, checkpoint_kind

    with example_dir() as folder:
        path = str(folder / "model.safetensors")
        Path(path).write_bytes(data)
        kind = accepted_or_one_line(lambda: checkpoint_kind(path))  # what --model FILE runs on the driver
        if kind and kind.startswith("flux"):
            accepted_or_one_line(lambda: check_flux_tensors(path, checkpoint_keys(path)))
        accepted_or_one_line(lambda: read_header(path, f"--lora {path}"))
        assert files_under(folder) == {"model.safetensors"}


# -- checkpoints ------------------------------------------------------------------------------------------------
def stage_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                  torch.int64, torch.bool, torch.uint8]))
    shape = draw(st.sampled_from([(1, 4, 2, 2), (1, 4, 2, 2), (4, 2, 2), (1, 3, 2, 2), (0,), (), (1, 4, 0, 2)]))
    fill = draw(st.sampled_from([0.0, 1.0, float("nan"), float("inf"), -1e30]))
    tensor = torch.full(shape, fill).to(dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype)
    layout = draw(st.sampled_from(["strided", "strided", "sparse", "meta", "noncontiguous"]))
    if layout == "sparse" and tensor.dim() > 0:
        return tensor.to_sparse()
    if layout == "meta":
        return tensor.to("meta")
    if layout == "noncontiguous" and tensor.dim() == 4:
        return tensor.transpose(2, 3)
    return tensor


FIELD_VALUES = SCALARS | st.binary(max_size=20) | tensors() | st.lists(SCALARS | tensors(), max_size=3)


@st.composite
def checkpoint_payloads(draw):
    payload = {"config_hash": "cfg", "input_sha": "sha", "stage": 0, "step": 1, "latents": torch.zeros(1, 4, 2, 2),
               "scheduler_state": None, "stage_input": stage_png()}
    if draw(st.booleans()):  # half the examples: a checkpoint of this run whose latent is of any dtype and layout
        payload["latents"] = draw(tensors())
        return payload
    for name in draw(st.lists(st.sampled_from(sorted(payload) + ["extra"]), max_size=3, unique=True)):
        if draw(st.booleans()) and name != "extra":
            del payload[name]
        elif name == "scheduler_state":
            payload[name] = draw(st.none() | FIELD_VALUES | st.fixed_dictionaries({}, optional={
                "model_outputs": st.lists(st.none() | tensors(), max_size=5) | FIELD_VALUES,
                "lower_order_nums": st.integers(-2, 6) | SCALARS}))
        else:
            payload[name] = draw(FIELD_VALUES | tensors())
    return payload


@given(payload=checkpoint_payloads(), damage=st.sampled_from(["none", "none", "cut", "flip", "garbage"]),
       where=st.floats(0, 1))
def test_fuzz_checkpoints_resume_or_are_one_line(payload, damage, where):
    from cupscale_dist.services.checkpoint import FILE_NAME, Checkpointer

    with example_dir() as folder:
        path = folder / FILE_NAME
        torch.save(payload, path)
        data = path.read_bytes()
        at = int(where * (len(data) - 1))
        if damage == "cut":
            path.write_bytes(data[:at])
        elif damage == "flip":
            path.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:])
        elif damage == "garbage":
            path.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 3)
        result = accepted_or_one_line(lambda: Checkpointer(folder, 1, "cfg", "sha").load())
        if result is not None:  # what a resume continues from: a dense float32 latent, finite
            state, images = result
            assert state.latents.dtype == torch.float32 and state.latents.layout == torch.strided
            assert bool(torch.isfinite(state.latents).all()) and set(images) == {state.stage}
        assert files_under(folder) == {FILE_NAME}


# -- batch journals and manifests -------------------------------------------------------------------------------
ROW_FIELDS = ["input_path", "output_path", "status", "error", "input_width", "input_height", "seed", "input_bytes",
              "input_mtime_ns", "config_hash", "total_s", "prompt", "unknown"]
OUTPUT_PATHS = st.sampled_from(["a.png", "sub/a.png", "../a.png", "/etc/a.png", "sub/../../a.png", "a.jpg", "",
                                "./a.png", "a\x00.png"]) | st.text(max_size=20)


@st.composite
def journal_lines(draw) -> bytes:
    lines = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["row", "row", "row", "json", "bytes", "deep"]))
        if kind == "row":
            row = {"input_path": draw(st.sampled_from(["/in/a.png", "/in/b.png"]) | SCALARS), "status": "ok",
                   "output_path": draw(OUTPUT_PATHS)}
            for name in draw(st.lists(st.sampled_from(ROW_FIELDS), max_size=4, unique=True)):
                row[name] = draw(SCALARS | OUTPUT_PATHS)
            lines.append(json.dumps(row).encode())
        elif kind == "json":
            lines.append(json.dumps(draw(JSON_VALUES)).encode())
        elif kind == "deep":
            lines.append(b"[" * draw(st.integers(1, 50_000)))
        else:
            lines.append(draw(st.binary(max_size=60)).replace(b"\n", b" "))
    text = b"\n".join(lines) + (b"\n" if draw(st.booleans()) else b"")
    return text


@given(data=journal_lines())
def test_fuzz_batch_journals_are_rows_or_one_line_and_never_trusted_outside(data):
    from cupscale_dist.services.batch.manifest import (
        JOURNAL_DIR,
        MANIFEST_NAME,
        ManifestWriter,
        is_output_path,
        read_manifest,
    )

    with example_dir() as folder:
        out = folder / "out"
        (out / JOURNAL_DIR).mkdir(parents=True)
        (out / JOURNAL_DIR / "host-1.jsonl").write_bytes(data)
        rows = accepted_or_one_line(lambda: read_manifest(out / MANIFEST_NAME))
        if rows is not None:
            for row in rows.values():  # a row the batch keeps never points outside the output folder
                assert row["output_path"] is None or is_output_path(row["output_path"]), row
            ManifestWriter(out / MANIFEST_NAME, rows).write()  # the rows fit the parquet's schema: no Arrow error
            again = read_manifest(out / MANIFEST_NAME)
            assert set(again) == set(rows)
        assert files_under(folder) <= {"out", f"out/{JOURNAL_DIR}", f"out/{JOURNAL_DIR}/host-1.jsonl",
                                       f"out/{MANIFEST_NAME}"}


# -- generated paths --------------------------------------------------------------------------------------------
PATH_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="*?["), max_size=40) | st.sampled_from(
    ["a" * 300, "x/" * 2100, "..", "../..", "/", "\x00", "é" * 200, "a/" + "b" * 256]) | st.builds(
    lambda a, b: a + b, st.sampled_from(["", "../", "./", "sub/"]), st.text(max_size=20))


@given(text=PATH_TEXT)
def test_fuzz_paths_through_the_path_check_and_the_readers(text):
    from cupscale_dist.captions.promptfile import read_prompt_file
    from cupscale_dist.files.userfile import check_path_text
    from cupscale_dist.models.addons import parse_lora

    with example_dir() as folder:
        (folder / "prompts.json").write_text('{"prompt": "p", "stages": []}')
        before = files_under(folder)
        for flag, value in (("--regional-prompts", str(folder / text)), ("--lora", text),
                            ("--lora", "hf://" + text), ("--lora", str(folder / text) + ":0.5")):
            if accepted_or_one_line(lambda: check_path_text(value, flag) or True) is None:  # noqa: B023 - called at once
                continue  # the CLI stops here (check_path_args), before any reader
            if flag == "--regional-prompts":
                accepted_or_one_line(lambda: read_prompt_file(Path(value)))  # noqa: B023 - called at once
            else:
                accepted_or_one_line(lambda: parse_lora(value))  # noqa: B023 - called at once
        assert files_under(folder) == before


# -- generated input folders: output names stay inside the output folder ----------------------------------------
NAME_PART = st.text(st.characters(codec="utf-8", exclude_characters="/\x00"), min_size=1, max_size=30).filter(
    lambda name: name not in (".", "..") and len(name.encode()) <= 200)
SUFFIX = st.sampled_from([".png", ".JPG", ".webp", ".txt", ".png.png", ""])


@given(names=st.lists(st.tuples(st.lists(NAME_PART, max_size=2), NAME_PART, SUFFIX), min_size=1, max_size=6),
       links_out=st.integers(0, 2), output_inside=st.booleans())
def test_fuzz_batch_input_folders_name_outputs_inside_the_output_folder(names, links_out, output_inside):
    from cupscale_dist.services.batch.inputs import SYMLINK_OUT, is_inside, list_inputs
    from cupscale_dist.services.batch.naming import assign_outputs

    with example_dir() as folder:
        inputs, elsewhere = folder / "in", folder / "elsewhere"
        inputs.mkdir(), elsewhere.mkdir()
        for parts, stem, suffix in names:
            target = inputs.joinpath(*parts, stem + suffix)
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(b"x")
            except OSError:
                continue  # a name this file system refuses (the parts of a path that is a file already, ...)
        for number in range(links_out):
            (elsewhere / f"secret{number}.png").write_bytes(b"x")
            (inputs / f"link{number}.png").symlink_to(elsewhere / f"secret{number}.png")
        out = inputs / "up" if output_inside else folder / "out"
        before = files_under(folder)
        items = accepted_or_one_line(lambda: list_inputs(str(inputs), out))
        if items is None:
            return
        assign_outputs(items, out, {})
        for item in items:
            assert item.input_path.startswith(str(inputs))
            if Path(item.input_path).name.startswith("link"):
                assert item.error == f"input {item.input_path}: {SYMLINK_OUT}", item
            if item.output_path is not None:
                target = (out / item.output_path).resolve()
                assert is_inside(target, out.resolve()) and target != Path(item.input_path).resolve(), item
                assert not any(part.startswith(".") for part in Path(item.output_path).parts), item
        assert files_under(folder) == before  # naming writes nothing
