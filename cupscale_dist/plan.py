"""The run plan `--dry-run` prints: stages, views per step, UNet evaluations and a memory estimate."""

from __future__ import annotations

import numpy as np

from .config import UpscaleConfig
from .pipeline import denoising_steps, plan_stages, target_size
from .views import make_views

VAE_SCALE = 8  # SDXL and SD1.5 VAEs downsample by 8; the dry run does not load the model
LATENT_CHANNELS = 4
# Host float32 buffers of the full latent a stage holds at once: z_L, noise, z_t, eps sum, weights, next z.
LATENT_BUFFERS = 6


def stage_views(size: tuple[int, int], config: UpscaleConfig) -> np.ndarray:
    """The views of a stage of ``size`` (W, H) px, as the upscale will make them (latent = size / 8)."""
    return make_views(size[1] // VAE_SCALE, size[0] // VAE_SCALE, config.tile, config.stride)


def describe_plan(input_size: tuple[int, int], config: UpscaleConfig) -> dict:
    """What a run will do, without loading anything."""
    steps = denoising_steps(config)
    stages = []
    for index, (width, height) in enumerate(plan_stages(input_size, config)):
        latent = (height // VAE_SCALE, width // VAE_SCALE)
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
