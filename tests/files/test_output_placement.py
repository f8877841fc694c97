"""Output placement (issue 13): two upscales racing for one output, exactly one wins; without --overwrite a file that
appeared meanwhile is never replaced. Real processes, no sleeps hoping for an interleaving."""

from __future__ import annotations

import pytest
from helpers import CLI_FAST, cupscale, finish, noisy_picture, stderr_error_line

from cupscale_dist import UserError
from cupscale_dist.files.imageio import place, read_png_metadata, save_png

# The fast run: 64x64 -> 128x128 in one stage, views of 16 latent px, in-process unless a test says otherwise.


# ---------------------------------------------------------------------------------------------------------------
# 2. `upscale -o` without --overwrite: exactly one of two racing runs wins
# ---------------------------------------------------------------------------------------------------------------
def test_two_upscales_racing_for_one_output_exactly_one_wins(sdxl_dir, tmp_path):
    noisy_picture(0).save(tmp_path / "in.png")
    target = tmp_path / "out.png"
    runs = [cupscale("upscale", tmp_path / "in.png", "-o", target, "--model", sdxl_dir, *CLI_FAST, "--actors", "0",
                     "--seed", seed, "-q") for seed in (1, 2)]
    results = [finish(run) for run in runs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    (winner_seed,) = [seed for seed, (code, _, _) in zip((1, 2), results) if code == 0]
    (loser_err,) = [err for code, _, err in results if code == 2]
    assert "--overwrite" in stderr_error_line(loser_err)
    assert read_png_metadata(target)["seed"] == str(winner_seed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png", "out.png"]  # no partial file left behind


def test_placement_without_overwrite_never_replaces_a_file_that_appeared(tmp_path):
    """The check at the start passed, then another run wrote the name: the late one must fail, not replace."""
    target = tmp_path / "out.png"
    target.write_bytes(b"the other run's result")
    with pytest.raises(UserError, match="created by someone else while this run worked"):
        save_png(noisy_picture(0), target, {"seed": "1"}, overwrite=False)
    assert target.read_bytes() == b"the other run's result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
    partial = tmp_path / "partial"
    partial.write_bytes(b"new")
    place(partial, target, overwrite=True)  # --overwrite replaces
    assert target.read_bytes() == b"new" and not partial.exists()
