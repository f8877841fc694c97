"""Tokenizer files (issue 35 item 4): a bad T5 tokenizer_2 file or a bad CLIP vocab.json / merges.txt /
tokenizer_config.json is one line naming it; a tokenizer file that is a FIFO is refused, not waited on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import bounded, refused_line, short_line

from cupscale_dist import UserError

# ---------------------------------------------------------------------------------------------------------------
# Tokenizer files: T5's tokenizer_2 and CLIP's vocab.json / merges.txt / tokenizer_config.json
# ---------------------------------------------------------------------------------------------------------------
DEEP = "[" * 100_000 + "]" * 100_000
T5_CASES = {
    "garbage": ("tokenizer.json", b"\x00\xff garbage \x13", "not valid JSON"),
    "empty": ("tokenizer.json", b"", "not valid JSON"),
    "a-list": ("tokenizer.json", b"[1, 2, 3]", "must be a JSON object"),
    "deep": ("tokenizer.json", DEEP.encode(), "nested too deeply"),
    "an-object-of-nothing": ("tokenizer.json", b"{}", "the tokenizer does not load"),
    "config-a-list": ("tokenizer_config.json", b"[]", "must be a JSON object"),
    "config-deep": ("tokenizer_config.json", DEEP.encode(), "nested too deeply"),
    "max-length-text": ("tokenizer_config.json", b'{"model_max_length": "512"}', "model_max_length='512'"),
    "max-length-zero": ("tokenizer_config.json", b'{"model_max_length": 0}', "model_max_length=0"),
    "max-length-negative": ("tokenizer_config.json", b'{"model_max_length": -5}', "model_max_length=-5"),
    "max-length-float": ("tokenizer_config.json", b'{"model_max_length": 1.5}', "model_max_length=1.5"),
    "max-length-huge": ("tokenizer_config.json", b'{"model_max_length": 1e400}', "model_max_length=inf"),
    "garbage-spiece": ("spiece.model", b"\x00garbage sentencepiece", "the tokenizer does not load"),
}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    from cupscale_dist.testing.tiny import build_tiny_sdxl
    from cupscale_dist.testing.tiny_flux import build_tiny_flux

    root = tmp_path_factory.mktemp("round3-tokenizers")
    return dict(flux=build_tiny_flux(root / "flux", variant="schnell"), sdxl=build_tiny_sdxl(root / "sdxl"))


def broken_copy(source: Path, target: Path, folder: str, name: str, data: bytes) -> Path:
    import shutil

    shutil.copytree(source, target)
    if name == "spiece.model":  # the slow tokenizer's file: a folder holding it and no tokenizer.json
        (target / folder / "tokenizer.json").unlink()
    (target / folder / name).write_bytes(data)
    return target


@pytest.mark.parametrize("case", T5_CASES)
def test_a_bad_t5_tokenizer_file_is_one_line_naming_it(case, tiny_dirs, tmp_path):
    from cupscale_dist.models.spec import ModelSpec

    name, data, words = T5_CASES[case]
    model = broken_copy(tiny_dirs["flux"], tmp_path / "flux", "tokenizer_2", name, data)
    with pytest.raises(UserError) as error:
        ModelSpec.read(str(model))
    line = refused_line(error)
    assert words in line and "tokenizer_2" in line and "huggingface-cli download" in line, line


CLIP_CASES = {
    "vocab-garbage": ("vocab.json", b"\xff\xfe not json", "not valid JSON"),
    "vocab-a-list": ("vocab.json", b'["a", "b"]', "must be a JSON object"),
    "vocab-deep": ("vocab.json", DEEP.encode(), "nested too deeply"),
    "vocab-of-numbers": ("vocab.json", b'{"1": "a", "2": "b"}', "the tokenizer does not load"),
    "merges-binary": ("merges.txt", b"\xff\xfe\x00\x01", "merges.txt is not UTF-8 text"),
    "merges-garbage": ("merges.txt", b"#version\nonlyone\n", "the tokenizer does not load"),
    "config-a-string": ("tokenizer_config.json", b'"hello"', "must be a JSON object"),
    "config-max-length-bool": ("tokenizer_config.json", b'{"model_max_length": true}', "model_max_length=True"),
}


@pytest.mark.parametrize("case", CLIP_CASES)
def test_a_bad_clip_tokenizer_file_is_one_line_naming_it(case, tiny_dirs, tmp_path):
    from cupscale_dist.models.spec import ModelSpec

    name, data, words = CLIP_CASES[case]
    model = broken_copy(tiny_dirs["sdxl"], tmp_path / "sdxl", "tokenizer", name, data)
    with pytest.raises(UserError) as error:
        ModelSpec.read(str(model))
    line = refused_line(error)
    assert words in line and "tokenizer" in line and "save_pretrained" in line, line


def test_a_tokenizer_file_that_is_a_fifo_is_refused_not_waited_on(tiny_dirs, tmp_path):
    import shutil

    model = tmp_path / "sdxl"
    shutil.copytree(tiny_dirs["sdxl"], model)
    (model / "tokenizer" / "merges.txt").unlink()
    os.mkfifo(model / "tokenizer" / "merges.txt")
    out = bounded(f"""
        from cupscale_dist import UserError
        from cupscale_dist.models.spec import ModelSpec
        try:
            ModelSpec.read({str(model)!r})
            print("ACCEPTED")
        except UserError as exc:
            print(exc)
        """)
    assert "merges.txt is a named pipe (FIFO), not a file" in short_line(out), out
