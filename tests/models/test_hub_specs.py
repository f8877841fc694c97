"""hf:// model specs (models/hub.py, issue 35 item 4): checked here, one line, never a huggingface_hub traceback;
exit 2 through the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import DEMO, IMAGE, refused_line, short_line

from cupscale_dist import UserError
from cupscale_dist.cli.main import main

# ---------------------------------------------------------------------------------------------------------------
# hf:// specs: checked here, never a huggingface_hub traceback
# ---------------------------------------------------------------------------------------------------------------
BAD_HUB_SPECS = {
    "dotdot-owner": ("hf://../repo/f.safetensors", "the owner '..' is no hub name"),
    "dotdot-repo": ("hf://o/../f.safetensors", "the repository '..' is no hub name"),
    "dotdot-file": ("hf://o/r/../../x.safetensors", "not a plain path inside the repository"),
    "absolute-file": ("hf://o/r//etc/passwd.safetensors", "not a plain path inside the repository"),
    "non-ascii-owner": ("hf://ö/r/f.safetensors", "the owner 'ö' is no hub name"),
    "owner-of-300": ("hf://" + "a" * 300 + "/r/f.safetensors", "is no hub name"),
    "double-dash": ("hf://o/r--x/f.safetensors", "the repository 'r--x' is no hub name"),
    "file-of-5000": ("hf://o/r/" + "x" * 5000, "over 1024 characters"),
}


@pytest.mark.parametrize("ref, words", BAD_HUB_SPECS.values(), ids=BAD_HUB_SPECS.keys())
def test_bad_hf_specs_are_one_line_not_a_hub_traceback(ref, words, monkeypatch):
    from cupscale_dist.models.addons import parse_lora

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as error:
        parse_lora(ref + ":0.5")
    line = refused_line(error)
    assert words in line and "give hf://OWNER/REPO/FILE" in line, line


def test_bad_hf_spec_through_the_cli_is_exit_2(capsys):
    assert main(["upscale", IMAGE, "-o", "/tmp/o-hf.png", *DEMO, "--lora", "hf://ö/r/f.safetensors",
                 "--actors", "0"]) == 2
    assert "the owner 'ö' is no hub name" in short_line(capsys.readouterr().err)
    assert not Path("/tmp/o-hf.png").exists()
