"""Checkpoints of a run: the latent after a step, plus the current stage's input image.

Written atomically (temp file + rename) every K steps through the pipeline's step callback; they carry the
config hash and the input's hash, and a checkpoint from another config or input is refused. ``--resume``
continues bit-identically: noise, views and prompts are all re-derived from the seed.

The hashes say whose checkpoint it is, not that its contents are sound: a file edited or written by another
version could hold a latent of the wrong shape, NaNs, a step past the stage's end or a stage that does not exist.
:meth:`Checkpointer.load` checks every field (against the run's :class:`~cupscale_dist.plan.Plan` when given) before
resuming.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import torch
from PIL import Image

from ..errors import UserError, shown
from ..files.atomic import atomic_file
from ..files.userfile import check_regular_file, named
from ..models.weightfiles import refuse_code_archive
from ..pipeline import StageState
from ..plan import Plan

FILE_NAME = "checkpoint.pt"
FIELDS = ("config_hash", "input_sha", "stage", "step", "latents", "scheduler_state", "stage_input")
DELETE_FIX = "delete it to start over"  # the fix for a checkpoint that can't be used: the run redoes its steps
LATENT_DTYPE = torch.float32  # what the driver's latent is (noise, windows and blends are float32); all a run writes
MAX_SOLVER_ORDER = 4  # a multistep scheduler's memory holds at most this many past predictions (DPM-Solver: 1-3)


def image_sha(image: Image.Image) -> str:
    return hashlib.sha256(image.tobytes() + repr(image.size).encode()).hexdigest()[:16]


class Checkpointer:
    """Step callback that keeps ``DIR/checkpoint.pt`` up to date."""

    def __init__(self, directory: str | os.PathLike, every: int, config_hash: str, input_sha: str,
                 plan: Plan | None = None):
        if every < 1:
            raise UserError(f"--checkpoint-every {every}: use a positive number of steps")
        self.path = Path(directory) / FILE_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.every, self.config_hash, self.input_sha, self.plan = every, config_hash, input_sha, plan
        self.stage_input: bytes | None = None  # PNG bytes of the current stage's input image

    def check_against(self, plan: Plan) -> None:
        """Every field of the checkpoint against ``plan``: a resume that cannot fit fails before any model loads."""
        self.plan = plan
        self.load()

    def __call__(self, state: dict) -> None:
        if state["stage_input"] is not None:  # a stage starts: its input is what a resume needs to redo steps 1-8
            buffer = io.BytesIO()
            state["stage_input"].save(buffer, format="PNG")
            self.stage_input = buffer.getvalue()
        elif state["gather"] is None:  # the stage is being prepared: nothing to keep yet
            return
        elif state["step"] % self.every == 0 or state["step"] == state["num_steps"]:
            latents, scheduler_state = state["gather"]()  # with the latent on the workers: gathered here
            self.write(state["stage"], state["step"], latents, scheduler_state)

    def write(self, stage: int, step: int, latents: torch.Tensor, scheduler_state: dict | None = None) -> None:
        payload = {"config_hash": self.config_hash, "input_sha": self.input_sha, "stage": stage, "step": step,
                   "latents": latents.clone(), "scheduler_state": scheduler_state, "stage_input": self.stage_input}
        with atomic_file(self.path) as handle:  # a kill mid-write keeps the previous checkpoint
            torch.save(payload, handle)

    def load(self) -> tuple[StageState, dict[int, Image.Image]] | None:
        """The saved state (and the stage input it needs), or None if there is no checkpoint yet."""
        if not self.path.exists():
            return None
        what = named(f"checkpoint {self.path}")
        # a folder, a FIFO (open would wait for a writer forever) or a device where the file should be: one line
        check_regular_file(self.path, what, f"{DELETE_FIX}, or give another --checkpoint-dir")
        refuse_code_archive(self.path, what, DELETE_FIX, DELETE_FIX)  # a folder the user names: never run its code
        try:
            payload = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - truncated, damaged or foreign: the fix is the same
            raise UserError(f"{what} is unreadable ({type(exc).__name__}); {DELETE_FIX}") from None
        if not isinstance(payload, dict) or set(payload) != set(FIELDS):
            raise self._bad("does not hold the fields " + ", ".join(FIELDS))
        if payload["config_hash"] != self.config_hash:
            raise UserError(f"{what} was written with another config ({one_line(payload['config_hash'], 40)} != "
                            f"{self.config_hash}); use the same options, or another --checkpoint-dir")
        if payload["input_sha"] != self.input_sha:
            raise UserError(f"{what} belongs to another input image; use another --checkpoint-dir")
        stage, step = self._position(payload["stage"], payload["step"])
        latents = self._latents(payload["latents"], stage)
        scheduler_state = self._scheduler_state(payload["scheduler_state"], latents.shape)
        image = self._stage_input(payload["stage_input"], stage)
        self.stage_input = payload["stage_input"]
        return StageState(stage, step, latents, scheduler_state), {stage: image}

    # -- the checks of load(), one per field ---------------------------------------------------------------------
    def _bad(self, problem: str) -> UserError:
        return UserError(f"{named(f'checkpoint {self.path}')} {problem}; it is damaged or from another version: "
                         f"{DELETE_FIX}")

    def _position(self, stage, step) -> tuple[int, int]:
        """A stage of this run and a step within it (0..steps: the latent before that step)."""
        if type(stage) is not int or type(step) is not int or stage < 0 or step < 0:
            raise self._bad(f"has stage={one_line(stage)}, step={one_line(step)} (expected non-negative integers)")
        if self.plan is not None and stage >= len(self.plan.stages):
            raise self._bad(f"is at stage {stage}, but this run has {len(self.plan.stages)} stage(s)")
        if self.plan is not None and step > self.plan.steps:
            raise self._bad(f"is at step {step}, but a stage of this run has {self.plan.steps} steps")
        return stage, step

    def _latents(self, latents, stage: int) -> torch.Tensor:
        """A finite float32 latent of the stage's shape, (1, 4, H/8, W/8), dense and in memory."""
        problem = tensor_problem(latents)
        if problem:
            raise self._bad(f"holds latents that are {problem} (expected a float tensor: dense float32, in memory)")
        expected = (1, self.plan.latent_channels, *self.plan.stages[stage].latent) if self.plan else None
        if latents.dim() != 4 or latents.shape[0] != 1 or (expected and latents.shape != expected):
            raise self._bad(f"holds latents of shape {tuple(latents.shape)} (expected {expected or '(1, C, h, w)'})")
        if not torch.isfinite(latents).all():
            raise self._bad("holds non-finite latents (NaN or inf)")
        return latents

    def _scheduler_state(self, state, shape: torch.Size) -> dict | None:
        """None, or a multistep scheduler's memory: past predictions (None or finite latents of the stage's shape)
        and a count of lower-order steps taken."""
        if state is None:
            return None
        if not isinstance(state, dict) or not set(state) <= {"model_outputs", "lower_order_nums"}:
            raise self._bad(f"holds a scheduler state of type {type(state).__name__} or unknown keys")
        outputs, count = state.get("model_outputs", []), state.get("lower_order_nums", 0)
        if not isinstance(outputs, list) or len(outputs) > MAX_SOLVER_ORDER or any(
                o is not None and (tensor_problem(o) or o.shape != shape or not bool(torch.isfinite(o).all()))
                for o in outputs):
            raise self._bad(f"holds scheduler predictions that are not finite latents of shape {tuple(shape)}")
        if type(count) is not int or not 0 <= count <= MAX_SOLVER_ORDER:
            raise self._bad(f"holds lower_order_nums={one_line(count)} (expected 0..{MAX_SOLVER_ORDER})")
        return state

    def _stage_input(self, data, stage: int) -> Image.Image:
        """The PNG the stage started from, decoded under the bomb guard at exactly the size the plan expects."""
        from ..files.imageio import open_with_limit

        if not isinstance(data, bytes):
            raise self._bad(f"holds a stage input of type {type(data).__name__} (expected PNG bytes)")
        expected = self.plan.stage_inputs[stage] if self.plan else None
        limit = expected[0] * expected[1] if expected else Image.MAX_IMAGE_PIXELS
        try:
            with open_with_limit(io.BytesIO(data), limit) as image:
                if image.format != "PNG" or (expected and image.size != expected) or image.width * image.height > limit:
                    got = f"a {image.format} of {image.width}x{image.height}"
                    raise self._bad(f"holds a stage input that is {got} (expected a PNG of "
                                    f"{'x'.join(map(str, expected)) if expected else 'at most ' + str(limit) + ' px'})")
                return image.convert("RGB")
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - PIL raises many kinds on garbage
            raise self._bad(f"holds a stage input that is not a readable image ({type(exc).__name__})") from None


def tensor_problem(value) -> str | None:
    """Why ``value`` is no latent the run could continue from (None if it is a dense float32 CPU tensor): half
    precision would change the picture, a meta tensor holds no numbers, a sparse one no dense latent."""
    if not isinstance(value, torch.Tensor):
        return f"of type {type(value).__name__}"
    if value.layout != torch.strided:
        return f"a {str(value.layout).removeprefix('torch.')} tensor"
    if value.device.type != "cpu":
        return f"on the {value.device.type} device (no values)"
    if value.dtype != LATENT_DTYPE:
        return f"of dtype {str(value.dtype).removeprefix('torch.')}"
    return None


def one_line(value, limit: int = 20) -> str:
    """:func:`~cupscale_dist.errors.shown` of a value from the file, on one line (a tensor's repr has newlines)."""
    return shown(value, limit).replace("\n", " ")
