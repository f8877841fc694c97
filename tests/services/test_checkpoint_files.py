"""Resume checkpoint files (services/checkpoint.py, issue 35 item 4): latents of other dtypes and layouts, half
precision scheduler state, a damaged or unreadable zip, a directory or a FIFO, a tensor where a hash or position
belongs: each one line; a sound float32 checkpoint still loads."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch
from helpers import bounded, refused_line, short_line
from PIL import Image

from cupscale_dist import UserError


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: a FIFO, a directory, a damaged zip, latents of other dtypes and layouts
# ---------------------------------------------------------------------------------------------------------------
def stage_input_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (90, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def checkpointer(directory: Path):
    from cupscale_dist.services.checkpoint import Checkpointer

    return Checkpointer(directory, 1, "cfg", "sha")


def write_payload(directory: Path, **fields) -> Path:
    """A checkpoint ``checkpointer(directory)`` accepts as its own, with ``fields`` replaced."""
    from cupscale_dist.services.checkpoint import FILE_NAME

    payload = {"config_hash": "cfg", "input_sha": "sha", "stage": 0, "step": 1, "latents": torch.zeros(1, 4, 4, 4),
               "scheduler_state": None, "stage_input": stage_input_png(), **fields}
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(payload, directory / FILE_NAME)
    return directory / FILE_NAME


BAD_LATENTS = {
    "bf16": (torch.zeros(1, 4, 4, 4, dtype=torch.bfloat16), "of dtype bfloat16"),
    "fp16": (torch.zeros(1, 4, 4, 4, dtype=torch.float16), "of dtype float16"),
    "float64": (torch.zeros(1, 4, 4, 4, dtype=torch.float64), "of dtype float64"),
    "meta": (torch.zeros(1, 4, 4, 4, device="meta"), "on the meta device"),
    "sparse": (torch.zeros(1, 4, 4, 4).to_sparse(), "a sparse_coo tensor"),
}


@pytest.mark.parametrize("latents, words", BAD_LATENTS.values(), ids=BAD_LATENTS.keys())
def test_checkpoint_latents_of_other_dtypes_and_layouts_are_refused(latents, words, tmp_path):
    write_payload(tmp_path, latents=latents)
    with pytest.raises(UserError) as error:
        checkpointer(tmp_path).load()
    line = refused_line(error)
    assert words in line and "delete it to start over" in line, line


def test_checkpoint_scheduler_predictions_in_half_precision_are_refused(tmp_path):
    state = {"model_outputs": [torch.zeros(1, 4, 4, 4, dtype=torch.float16)], "lower_order_nums": 1}
    write_payload(tmp_path, scheduler_state=state)
    with pytest.raises(UserError, match="scheduler predictions"):
        checkpointer(tmp_path).load()


def test_a_sound_float32_checkpoint_still_loads(tmp_path):
    write_payload(tmp_path, latents=torch.ones(1, 4, 4, 4))
    state, images = checkpointer(tmp_path).load()
    assert state.step == 1 and torch.equal(state.latents, torch.ones(1, 4, 4, 4)) and images[0].size == (32, 32)


def test_a_damaged_checkpoint_zip_says_delete_it(tmp_path):
    path = write_payload(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a zip cut in half (a full disk, a copy stopped)
    with pytest.raises(UserError) as error:
        checkpointer(tmp_path).load()
    line = refused_line(error)
    assert "delete it to start over" in line and ".safetensors" not in line, line


def test_a_checkpoint_that_is_a_directory_or_a_fifo_is_one_line(tmp_path):
    (tmp_path / "dir" / "checkpoint.pt").mkdir(parents=True)
    with pytest.raises(UserError) as error:
        checkpointer(tmp_path / "dir").load()
    assert "is a directory, not a file" in refused_line(error)
    (tmp_path / "fifo").mkdir()
    os.mkfifo(tmp_path / "fifo" / "checkpoint.pt")
    out = bounded(f"""
        from cupscale_dist import UserError
        from cupscale_dist.services.checkpoint import Checkpointer
        try:
            Checkpointer({str(tmp_path / "fifo")!r}, 1, "cfg", "sha").load()
        except UserError as exc:
            print(exc)
        """)
    assert "is a named pipe (FIFO), not a file" in short_line(out) and "delete it to start over" in out, out


def test_fuzz_found_a_tensor_in_a_checkpoints_hash_or_position_split_the_error_line(tmp_path):
    for fields in ({"config_hash": torch.zeros(1, 4, 2, 2)}, {"stage": torch.zeros(3, 3)},
                   {"scheduler_state": {"model_outputs": [], "lower_order_nums": torch.zeros(2, 2)}}):
        write_payload(tmp_path, **fields)
        with pytest.raises(UserError) as error:
            checkpointer(tmp_path).load()
        assert "tensor(" in refused_line(error), str(error.value)


def test_fuzz_found_a_zip_that_python_cannot_read_raised_notimplementederror(tmp_path):
    path = write_payload(tmp_path)
    data = bytearray(path.read_bytes())
    central = data.rindex(b"PK\x01\x02")  # the central directory's first entry: its "version needed" field
    data[central + 6] = 0xFF  # zipfile: NotImplementedError("zip file version 25.5")
    path.write_bytes(bytes(data))
    with pytest.raises(UserError) as error:
        checkpointer(tmp_path).load()
    assert "delete it to start over" in refused_line(error)
