"""Regional prompt files (captions/promptfile.py), a fuzz finding: unknown keys made a 301-character error line."""

from __future__ import annotations

import json

import pytest
from helpers import refused_line

from cupscale_dist import UserError


def test_fuzz_found_unknown_keys_in_a_prompts_file_made_a_301_character_line(tmp_path):
    from cupscale_dist.captions.promptfile import read_prompt_file

    path = tmp_path / "prompts.json"  # the example Hypothesis found (nightly profile), then a longer one
    for keys in (["00\U0001e95a\U0002ebe1", "\x1f\x1f\x1f\U00018d09", "0000\U00012544"], ["k" * 500] * 1 + ["j" * 500]):
        path.write_text(json.dumps(dict.fromkeys(keys)))
        with pytest.raises(UserError) as error:
            read_prompt_file(path)
        assert "has unknown key(s)" in refused_line(error)
