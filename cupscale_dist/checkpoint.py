"""Checkpoints of a run: the latent after a step, plus the current stage's input image.

Written atomically (temp file + rename) every K steps through the pipeline's step callback; they carry the
config hash and the input's hash, and a checkpoint from another config or input is refused. ``--resume``
continues bit-identically: noise, views and prompts are all re-derived from the seed.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path

import torch
from PIL import Image

from .errors import UserError
from .pipeline import StageState

FILE_NAME = "checkpoint.pt"


def image_sha(image: Image.Image) -> str:
    return hashlib.sha256(image.tobytes() + repr(image.size).encode()).hexdigest()[:16]


class Checkpointer:
    """Step callback that keeps ``DIR/checkpoint.pt`` up to date."""

    def __init__(self, directory: str | os.PathLike, every: int, config_hash: str, input_sha: str):
        if every < 1:
            raise UserError(f"--checkpoint-every {every}: use a positive number of steps")
        self.path = Path(directory) / FILE_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.every, self.config_hash, self.input_sha = every, config_hash, input_sha
        self.stage_input: bytes | None = None  # PNG bytes of the current stage's input image

    def __call__(self, state: dict) -> None:
        if "stage_input" in state:  # a stage starts: its input is what a resume needs to redo steps 1-8
            buffer = io.BytesIO()
            state["stage_input"].save(buffer, format="PNG")
            self.stage_input = buffer.getvalue()
        elif state["step"] % self.every == 0 or state["step"] == state["num_steps"]:
            self.write(state["stage"], state["step"], state["latents"])

    def write(self, stage: int, step: int, latents: torch.Tensor) -> None:
        payload = {"config_hash": self.config_hash, "input_sha": self.input_sha, "stage": stage, "step": step,
                   "latents": latents.clone(), "stage_input": self.stage_input}
        fd, tmp = tempfile.mkstemp(prefix=".checkpoint.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save(payload, handle)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load(self) -> tuple[StageState, dict[int, Image.Image]] | None:
        """The saved state (and the stage input it needs), or None if there is no checkpoint yet."""
        if not self.path.exists():
            return None
        try:
            payload = torch.load(self.path, weights_only=True)
        except Exception as exc:
            raise UserError(f"checkpoint {self.path} is unreadable ({type(exc).__name__}); delete it to start over") from None
        if payload["config_hash"] != self.config_hash:
            raise UserError(f"checkpoint {self.path} was written with another config ({payload['config_hash']} != "
                            f"{self.config_hash}); use the same options, or another --checkpoint-dir")
        if payload["input_sha"] != self.input_sha:
            raise UserError(f"checkpoint {self.path} belongs to another input image; use another --checkpoint-dir")
        self.stage_input = payload["stage_input"]
        image = Image.open(io.BytesIO(payload["stage_input"])).convert("RGB")
        return StageState(payload["stage"], payload["step"], payload["latents"]), {payload["stage"]: image}
