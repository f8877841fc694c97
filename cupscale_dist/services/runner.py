"""Run one upscale end to end and write the result with its parameters (used by the CLI and the Ray driver)."""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image

from .. import __version__
from ..config import UpscaleConfig
from ..errors import UserError
from ..execution.contract import Executor
from ..execution.executor import open_executor
from ..execution.raycluster import ClusterOptions
from ..files.imageio import write_image
from ..pipeline import upscale
from ..plan import Plan, check_inputs
from .checkpoint import Checkpointer, image_sha

log = logging.getLogger(__name__)


def run_metadata(plan: Plan, source: str | None) -> dict[str, object]:
    """The run's own keys a result carries (``cupscale:*`` in the file, :mod:`cupscale_dist.files.metadata`): enough to
    reproduce it. The source's generator keys travel beside them as ``carried``."""
    config = plan.config
    return {
        "prompt": config.prompt, "negative_prompt": config.negative_prompt, "seed": str(config.seed),
        "model": config.model, "stages": [list(s.size) for s in plan.stages],
        "tile": str(config.tile), "stride": str(config.stride), "config": config.to_dict(),
        "config_hash": config.config_hash(), "source": source or "", "version": __version__,
    }


def run_upscale(image: Image.Image, config: UpscaleConfig, output: str | Path, *, source: str | None = None,
                progress: bool = True, cluster: ClusterOptions | None = None, checkpoint_dir: str | None = None,
                checkpoint_every: int = 1, resume: bool = False, overwrite: bool = True,
                temp: str | Path | None = None, executor: Executor | None = None, callback=None,
                carried: dict[str, str] | None = None, plan: Plan | None = None) -> Path:
    """Upscale and write ``output`` (.png or .tif band by band as the last stage decodes, so a 16K result is never
    held whole; .webp/.jpg whole, through PIL), atomically: the file appears only when the whole run succeeded.
    Returns the output path. ``carried``: the source's generator keys (:func:`cupscale_dist.files.imageio.load_input`),
    written beside the run's own.

    ``overwrite`` False: the output is claimed exclusively (of two runs racing for one name, one wins);
    ``temp``: a temp file beside ``output`` made beforehand (the CLI makes it before any model loads).

    ``cluster`` None or ``actors=0``: the single-process reference; otherwise the Ray driver (same functions).
    ``checkpoint_dir``: keep a checkpoint every ``checkpoint_every`` steps; ``resume`` continues from it.
    ``executor``: one that serves many runs (opened with ``keep=True``: `cupscale serve`), instead of one opened from
    ``cluster`` for this run; ``callback``: ``upscale``'s per-step hook (progress, cancellation), called after the
    checkpoint's. ``plan``: the run's :func:`~cupscale_dist.plan.check_inputs` result, if the caller has it.
    """
    plan = plan or check_inputs(image.size, config, output=output)  # before any work
    hook, callback = callback, None
    state = stage_inputs = checkpointer = None
    if checkpoint_dir:
        checkpointer = Checkpointer(checkpoint_dir, checkpoint_every, config.config_hash(), image_sha(image), plan)
        if checkpointer.path.exists() and not resume:
            raise UserError(f"{checkpointer.path} exists; pass --resume to continue that run, or delete it")
        loaded = checkpointer.load() if resume else None
        if loaded:
            state, stage_inputs = loaded
            log.info("resuming stage %d at step %d from %s", state.stage, state.step, checkpointer.path)
        callback = checkpointer
    elif resume:
        raise UserError("--resume needs --checkpoint-dir DIR (where the interrupted run kept its checkpoint)")
    if hook is not None:
        callback = hook if checkpointer is None else (lambda info: (checkpointer(info), hook(info)))
    if executor is None:
        executor = open_executor(config, cluster)  # upscale closes it at the end of the run
    log.info("upscaling %s (%dx%d) with %s", source or "image", *image.size, config.model)
    metadata = run_metadata(plan, source)
    written = upscale(image, config, executor=executor, callback=callback, resume=state, stage_inputs=stage_inputs,
                      progress=progress, plan=plan,
                      sink=lambda bands: write_image(output, bands, plan.output_size, metadata, carried=carried,
                                                     overwrite=overwrite, temp=temp))
    if checkpointer is not None:
        checkpointer.path.unlink(missing_ok=True)  # the run is complete: nothing left to resume
    return written
