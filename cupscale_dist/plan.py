"""The run plan `--dry-run` prints: stages, views per step, UNet evaluations and a memory estimate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .config import UpscaleConfig
from .method.views import make_views

VAE_SCALE = 8  # SDXL and SD1.5 VAEs downsample by 8: the factor of a model not on disk yet (a hub id)
LATENT_CHANNELS = 4
# Host float32 buffers of the full latent a stage holds at once: z_L, noise, z_t, eps sum, weights, next z.
LATENT_BUFFERS = 6


def vae_scale(model: str) -> int:
    """Pixels per latent pixel of ``model``, read from its VAE config when it is on disk (``demo``, a local dir);
    :data:`VAE_SCALE` otherwise. The dry run and the captioner's crops need it without loading any weights."""
    if model == "demo":
        from .demo import demo_model_dir

        model = str(demo_model_dir())
    config = Path(model).expanduser() / "vae" / "config.json"
    if config.is_file():
        return 2 ** (len(json.loads(config.read_text(encoding="utf-8"))["block_out_channels"]) - 1)
    return VAE_SCALE


def stage_views(size: tuple[int, int], config: UpscaleConfig) -> np.ndarray:
    """The views of a stage of ``size`` (W, H) px, as the upscale will make them (latent = size / VAE factor)."""
    factor = vae_scale(config.model)
    return make_views(size[1] // factor, size[0] // factor, config.tile, config.stride)


def describe_plan(input_size: tuple[int, int], config: UpscaleConfig) -> dict:
    """What a run will do, without loading anything."""
    steps, factor = denoising_steps(config), vae_scale(config.model)
    stages = []
    for index, (width, height) in enumerate(plan_stages(input_size, config)):
        latent = (height // factor, width // factor)
        views = len(stage_views((width, height), config))
        latent_bytes = LATENT_CHANNELS * latent[0] * latent[1] * 4
        stages.append({
            "stage": index, "size": [width, height], "latent": list(latent), "views_per_step": views,
            "steps": steps, "unet_evaluations": views * steps * 2,  # x2: CFG's two halves
            "est_host_memory_mb": round((LATENT_BUFFERS * latent_bytes + 2 * 3 * width * height) / 2**20, 1),
        })
    return {
        "input": list(input_size), "output": list(target_size(input_size, config)), "model": config.model,
        "tile": config.tile, "stride": config.stride, "view_batch_size": config.view_batch_size,
        "stages": stages, "unet_evaluations": sum(s["unet_evaluations"] for s in stages),
        "est_peak_host_memory_mb": max(s["est_host_memory_mb"] for s in stages),
        "config_hash": config.config_hash(),
    }


SIZE_MULTIPLE = 64  # stage sizes in px: latent divisible by 2**3, the deepest DWT allowed (dwt_levels <= 3)


# ---------------------------------------------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------------------------------------------
def plan_stages(input_size: tuple[int, int], config: UpscaleConfig) -> list[tuple[int, int]]:
    """Stage sizes (W, H): x2 per stage up to the target, each rounded to a multiple of 64 px ('Stages')."""
    width, height = input_size
    target = config.size or (width * config.scale, height * config.scale)
    ratio = max(target[0] / width, target[1] / height)
    if ratio <= 1:
        raise ValueError(f"size {target[0]}x{target[1]} is not larger than the input {width}x{height}")
    count = max(1, math.ceil(math.log2(ratio) - 1e-9))
    rounded = lambda v: max(SIZE_MULTIPLE, int(round(v / SIZE_MULTIPLE)) * SIZE_MULTIPLE)  # noqa: E731
    return [(rounded(target[0] / 2 ** (count - k)), rounded(target[1] / 2 ** (count - k))) for k in range(1, count + 1)]


def target_size(input_size: tuple[int, int], config: UpscaleConfig) -> tuple[int, int]:
    return config.size or (input_size[0] * config.scale, input_size[1] * config.scale)


def denoising_steps(config: UpscaleConfig) -> int:
    """S = round(s * T): the number of steps actually run per stage (method.md step 4)."""
    return int(round(config.strength * config.steps))
