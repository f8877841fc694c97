"""Run one upscale end to end and write the result with its parameters (used by the CLI and the Ray driver)."""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image

from . import __version__
from .config import UpscaleConfig
from .imageio import save_png
from .pipeline import plan_stages, upscale

log = logging.getLogger(__name__)


def run_metadata(config: UpscaleConfig, input_size: tuple[int, int], source: str | None) -> dict[str, object]:
    """What a result carries in its PNG text chunks: enough to reproduce it."""
    return {
        "prompt": config.prompt, "negative_prompt": config.negative_prompt, "seed": str(config.seed),
        "model": config.model, "stages": [list(s) for s in plan_stages(input_size, config)],
        "tile": str(config.tile), "stride": str(config.stride), "config": config.to_dict(),
        "config_hash": config.config_hash(), "source": source or "", "version": __version__,
    }


def run_upscale(image: Image.Image, config: UpscaleConfig, output: str | Path, *, source: str | None = None,
                progress: bool = True, **upscale_kwargs) -> Image.Image:
    """Upscale and save atomically; the output file appears only when the whole run succeeded."""
    log.info("upscaling %s (%dx%d) with %s", source or "image", *image.size, config.model)
    result = upscale(image, config, progress=progress, **upscale_kwargs)
    save_png(result, output, run_metadata(config, image.size, source))
    return result
