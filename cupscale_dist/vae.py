"""Tiled VAE encode/decode (method.md steps 2 and 10), through diffusers' own AutoencoderKL tiling."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def configure_tiling(vae, tile_px: int, overlap: float) -> None:
    """Tile large images at ``tile_px`` pixels with ``overlap`` blending (diffusers' tiled encode/decode)."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    vae.enable_tiling()
    vae.tile_sample_min_size = tile_px
    vae.tile_latent_min_size = tile_px // factor
    vae.tile_overlap_factor = overlap


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (1, 3, H, W) float32 in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


def tensor_to_image(x: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) in [-1, 1] -> RGB PIL image (uint8, rounded)."""
    array = ((x[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


@torch.no_grad()
def encode_pixels(vae, pixels: torch.Tensor) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1] -> scaled latent (1, C, H/8, W/8) float32, the posterior mean (deterministic)."""
    posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return posterior.mean.float() * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latent -> (1, 3, H, W) pixels in [-1, 1], float32 on CPU."""
    pixels = vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample
    return pixels.float().cpu()
