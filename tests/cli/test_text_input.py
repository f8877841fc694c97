"""Text a user types (issue 13): prompt bytes that are not UTF-8 are one line in upscale and batch; any lone surrogate
in a text knob is one UserError."""

from __future__ import annotations

import pytest
from helpers import cupscale, finish, noisy_picture, stderr_error_line

from cupscale_dist import UserError


# ---------------------------------------------------------------------------------------------------------------
# 4. Text that is not UTF-8 in a real process's argv
# ---------------------------------------------------------------------------------------------------------------
def test_prompt_bytes_that_are_not_utf8_are_one_line_in_upscale_and_batch(sdxl_dir, tmp_path):
    noisy_picture(0).save(tmp_path / "in.png")
    out = tmp_path / "out"
    for argv in (["upscale", tmp_path / "in.png", "-o", tmp_path / "x.png", "--model", sdxl_dir, "--prompt",
                  b"\xff\xfe"],
                 ["batch", "--input", tmp_path / "in.png", "--output", out, "--model", sdxl_dir,
                  "--negative-prompt", b"ok \xff"]):
        code, stdout, err = finish(cupscale(*argv))
        assert code == 2 and "not valid UTF-8" in stderr_error_line(err) and stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]  # no output, no manifest, no folder


def test_any_lone_surrogate_in_a_text_knob_is_one_user_error():
    """Not only argv's escaped bytes: a surrogate from an API caller or a JSON escape is refused the same way."""
    from cupscale_dist import UpscaleConfig

    for text in ("\udcff", "a \ud800 b"):
        with pytest.raises(UserError, match="is not valid UTF-8"):
            UpscaleConfig(prompt=text)
