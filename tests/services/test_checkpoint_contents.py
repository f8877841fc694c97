"""Resume checkpoints (services/checkpoint.py, issue 13): a checkpoint whose contents do not match the run is refused
in one line; a sound one still resumes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import CLI_FAST, cli_config, noisy_picture, stderr_error_line
from PIL import Image

# The fast run: 64x64 -> 128x128 in one stage, views of 16 latent px, in-process unless a test says otherwise.


# ---------------------------------------------------------------------------------------------------------------
# 7. Checkpoints with the right hashes and wrong contents
# ---------------------------------------------------------------------------------------------------------------
def resume_args(tmp_path: Path, model: str) -> list[str]:
    return ["upscale", str(tmp_path / "in.png"), "-o", str(tmp_path / "out.png"), "--model", model, *CLI_FAST,
            "--actors", "0", "-q", "--checkpoint-dir", str(tmp_path / "ckpt"), "--resume"]


def write_checkpoint(tmp_path: Path, model: str, drop: str | None = None, **fields) -> None:
    """A checkpoint this run accepts as its own (same config and input hashes), with ``fields`` replaced."""
    from cupscale_dist.files.imageio import load_image
    from cupscale_dist.services.checkpoint import Checkpointer, image_sha

    config = cli_config(resume_args(tmp_path, model))
    image = load_image(tmp_path / "in.png", config.max_input_pixels, config.min_input_side)
    checkpointer = Checkpointer(tmp_path / "ckpt", 1, config.config_hash(), image_sha(image))
    checkpointer({"stage": 0, "step": 0, "stage_input": image})
    checkpointer.write(0, 1, torch.zeros(1, 4, 16, 16))  # what a real run writes after its first step
    payload = torch.load(checkpointer.path, weights_only=True)
    payload.update(fields)
    if drop:
        del payload[drop]
    torch.save(payload, checkpointer.path)


def encoded(image: Image.Image, kind: str = "PNG") -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=kind)
    return buffer.getvalue()


BAD_CHECKPOINTS = {
    "latent-shape": ({"latents": torch.zeros(1, 4, 8, 8)}, "shape (1, 4, 8, 8) (expected (1, 4, 16, 16))"),
    "latent-channels": ({"latents": torch.zeros(1, 3, 16, 16)}, "shape (1, 3, 16, 16)"),
    "latent-ints": ({"latents": torch.zeros(1, 4, 16, 16, dtype=torch.int64)}, "expected a float tensor"),
    "latent-nan": ({"latents": torch.full((1, 4, 16, 16), float("nan"))}, "non-finite latents"),
    "step-negative": ({"step": -3}, "step=-3"),
    "step-huge": ({"step": 10**12}, "at step 1000000000000, but a stage of this run has 2 steps"),
    "stage-out-of-range": ({"stage": 4}, "at stage 4, but this run has 1 stage"),
    "stage-input-garbage": ({"stage_input": b"\x89PNG not really" * 1000}, "not a readable image"),
    "stage-input-huge": ({"stage_input": encoded(Image.new("L", (3000, 3000)))}, "3000x3000 (expected a PNG of 64x64)"),
    "stage-input-jpeg": ({"stage_input": encoded(noisy_picture(0), "JPEG")}, "a JPEG of 64x64"),
    "stage-input-text": ({"stage_input": "a string"}, "type str (expected PNG bytes)"),
    "field-missing": ({"drop": "latents"}, "does not hold the fields"),
    "hash-not-a-string": ({"config_hash": 5}, "written with another config (5 != "),
}


@pytest.mark.parametrize("fields, words", BAD_CHECKPOINTS.values(), ids=BAD_CHECKPOINTS.keys())
def test_a_checkpoint_with_wrong_contents_is_refused_in_one_line(fields, words, sdxl_dir, tmp_path, capsys):
    from cupscale_dist.cli.main import main

    noisy_picture(0).save(tmp_path / "in.png")
    write_checkpoint(tmp_path, sdxl_dir, **fields)
    code = main(resume_args(tmp_path, sdxl_dir))
    line = stderr_error_line(capsys.readouterr().err)
    assert code == 2 and words in line, line
    assert not (tmp_path / "out.png").exists()


def test_a_sound_checkpoint_still_resumes(sdxl_dir, tmp_path, capsys):
    from cupscale_dist.cli.main import main

    noisy_picture(0).save(tmp_path / "in.png")
    write_checkpoint(tmp_path, sdxl_dir)
    assert main(resume_args(tmp_path, sdxl_dir)) == 0, capsys.readouterr().err
    assert Image.open(tmp_path / "out.png").size == (128, 128)
