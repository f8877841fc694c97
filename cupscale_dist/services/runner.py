"""Run one upscale end to end and write the result with its parameters (used by the CLI and the Ray driver)."""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image

from .. import __version__
from .checkpoint import Checkpointer, ResumePlan, image_sha
from ..config import UpscaleConfig
from ..errors import UserError
from ..files.imageio import check_output_side, write_image
from ..execution.executor import make_executor
from ..plan import plan_stages, target_size
from ..pipeline import upscale
from ..execution.raycluster import ClusterOptions

log = logging.getLogger(__name__)


def run_metadata(config: UpscaleConfig, input_size: tuple[int, int], source: str | None) -> dict[str, object]:
    """The run's own keys a result carries (``cupscale:*`` in the file, :mod:`cupscale_dist.files.metadata`): enough to
    reproduce it. The source's generator keys travel beside them as ``carried``."""
    return {
        "prompt": config.prompt, "negative_prompt": config.negative_prompt, "seed": str(config.seed),
        "model": config.model, "stages": [list(s) for s in plan_stages(input_size, config)],
        "tile": str(config.tile), "stride": str(config.stride), "config": config.to_dict(),
        "config_hash": config.config_hash(), "source": source or "", "version": __version__,
    }


def run_upscale(image: Image.Image, config: UpscaleConfig, output: str | Path, *, source: str | None = None,
                progress: bool = True, cluster: ClusterOptions | None = None, checkpoint_dir: str | None = None,
                checkpoint_every: int = 1, resume: bool = False, overwrite: bool = True,
                temp: str | Path | None = None, executor=None, model=None, callback=None,
                carried: dict[str, str] | None = None) -> Path:
    """Upscale and write ``output`` (.png or .tif band by band as the last stage decodes, so a 16K result is never
    held whole; .webp/.jpg whole, through PIL), atomically: the file appears only when the whole run succeeded.
    Returns the output path. ``carried``: the source's generator keys (:func:`cupscale_dist.files.imageio.load_input`),
    written beside the run's own.

    ``overwrite`` False: the output is claimed exclusively (of two runs racing for one name, one wins);
    ``temp``: a temp file beside ``output`` made beforehand (the CLI makes it before any model loads).

    ``cluster`` None or ``actors=0``: the single-process reference; otherwise the Ray driver (same functions).
    ``checkpoint_dir``: keep a checkpoint every ``checkpoint_every`` steps; ``resume`` continues from it.
    ``executor`` / ``model``: an executor (a kept Ray pool) or an in-process ``ModelWorker`` that serves many runs
    (`cupscale serve`), instead of one made from ``cluster`` for this run; ``callback``: ``upscale``'s per-step hook
    (progress, cancellation), called after the checkpoint's.
    """
    check_output_side(output, target_size(image.size, config))  # before any work: WebP holds 16383 px a side
    hook, callback = callback, None
    state = stage_inputs = checkpointer = None
    if checkpoint_dir:
        checkpointer = Checkpointer(checkpoint_dir, checkpoint_every, config.config_hash(), image_sha(image),
                                    ResumePlan.for_run(image.size, config))
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
    if executor is None and cluster is not None:
        executor = make_executor(config, cluster)
    log.info("upscaling %s (%dx%d) with %s", source or "image", *image.size, config.model)
    metadata = run_metadata(config, image.size, source)
    size = target_size(image.size, config)
    written = upscale(image, config, model=model, executor=executor, callback=callback, resume=state, stage_inputs=stage_inputs,
                      progress=progress, sink=lambda bands: write_image(output, bands, size, metadata, carried=carried,
                                                                       overwrite=overwrite, temp=temp))
    if checkpointer is not None:
        checkpointer.path.unlink(missing_ok=True)  # the run is complete: nothing left to resume
    return written
