"""Regional prompt files (captions/promptfile.py, issue 21 class 14): read with a size cap, /dev/zero and a file
over the cap are refused naming it."""

from __future__ import annotations

import pytest
from helpers import (
    address_space_ceiling,
    refused_run,
)

from cupscale_dist.captions.promptfile import MAX_PROMPT_FILE_BYTES, read_prompt_file
from cupscale_dist.errors import UserError

# ---------------------------------------------------------------------------------------------------------------
# 14. User files are read with a size cap
# ---------------------------------------------------------------------------------------------------------------


def test_regional_prompts_gh21_class14_dev_zero_is_refused_naming_the_cap(parse_ws, tmp_path, capsys):
    with address_space_ceiling(MAX_PROMPT_FILE_BYTES * 16):  # the old read ran into GBs
        line = refused_run(capsys, parse_ws, tmp_path, "--regional-prompts", "/dev/zero")
    assert f"--regional-prompts /dev/zero is over the {MAX_PROMPT_FILE_BYTES}-byte limit" in line


def test_regional_prompts_gh21_class14_file_over_the_cap_is_refused(tmp_path):
    head, tail = b'{"prompt": "', b'", "stages": []}'  # valid JSON that fits the schema, one byte over the cap
    path = tmp_path / "prompts.json"
    path.write_bytes(head + b"a" * (MAX_PROMPT_FILE_BYTES + 1 - len(head) - len(tail)) + tail)
    with pytest.raises(UserError, match=f"over the {MAX_PROMPT_FILE_BYTES}-byte limit"):
        read_prompt_file(path)
    path.write_bytes(head + b"a" * (MAX_PROMPT_FILE_BYTES - len(head) - len(tail)) + tail)  # at the cap: as before
    assert read_prompt_file(path)["stages"] == []
