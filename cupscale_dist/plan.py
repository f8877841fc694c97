"""The run plan `--dry-run` prints: stages, views per step, UNet evaluations and a memory estimate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .config import UpscaleConfig
from .pipeline import denoising_steps, plan_stages, target_size
from .views import make_views

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
