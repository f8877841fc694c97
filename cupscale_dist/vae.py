"""Tiled VAE encode/decode (method.md steps 2 and 10) that never holds a full-resolution float image.

Tiles are the views of :mod:`cupscale_dist.views` in latent pixels (``vae_tile`` / 8 wide, overlapping by
``vae_tile_overlap``), blended with Gaussian window weights. Encoding converts one pixel tile at a time from the
8-bit image; decoding finishes the output row band by row band into an 8-bit array, so a 16K stage holds its
uint8 image plus one band of floats (a float32 RGB copy of a 16K image alone would be 3.2 GB).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .step import reduce_predictions, window_weights
from .views import make_views, window_starts

BLEND_SIGMA = 0.3  # Gaussian tile window std as a fraction of the tile: smooth seams, borders still weighted


def scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def configure_tiling(vae, tile_px: int, overlap: float) -> None:
    """diffusers' own tiling, for the full-float round trip of prior_space='pixel'."""
    vae.enable_tiling()
    vae.tile_sample_min_size = tile_px
    vae.tile_latent_min_size = tile_px // scale_factor(vae)
    vae.tile_overlap_factor = overlap


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (1, 3, H, W) float32 in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [-1, 1] -> (H, W, 3) uint8, rounded."""
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def tensor_to_image(x: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) in [-1, 1] -> RGB PIL image."""
    return Image.fromarray(to_uint8(x[0]))


@torch.no_grad()
def encode_pixels(vae, pixels: torch.Tensor) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1] -> scaled latent (1, C, H/8, W/8) float32 on CPU, the posterior mean."""
    posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return posterior.mean.float().cpu() * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latent -> (1, 3, H, W) pixels in [-1, 1], float32 on CPU."""
    pixels = vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample
    return pixels.float().cpu()


def latent_tiles(tile_px: int, overlap: float, factor: int) -> tuple[int, int]:
    """(tile, stride) in latent pixels for the VAE's tiles."""
    tile = max(1, tile_px // factor)
    return tile, max(1, tile - int(tile * overlap))


@torch.no_grad()
def encode_image(vae, image: Image.Image, tile_px: int, overlap: float) -> torch.Tensor:
    """8-bit image -> scaled latent, one pixel tile at a time (step 2)."""
    f = scale_factor(vae)
    height, width = image.height // f, image.width // f
    tile, stride = latent_tiles(tile_px, overlap, f)
    if max(height, width) <= tile:
        return encode_pixels(vae, image_to_tensor(image))
    views = make_views(height, width, tile, stride)
    tiles = ((range(i, i + 1), encode_pixels(vae, image_to_tensor(image.crop((l * f, t * f, r * f, b * f)))))
             for i, (t, l, b, r) in enumerate(views))
    channels = vae.config.latent_channels
    return reduce_predictions(tiles, views, (1, channels, height, width), "gaussian", BLEND_SIGMA)


@torch.no_grad()
def decode_image(vae, latents: torch.Tensor, tile_px: int, overlap: float) -> Image.Image:
    """Scaled latent -> 8-bit image, finished one band of tile rows at a time (step 10)."""
    f = scale_factor(vae)
    height, width = latents.shape[-2:]
    tile, stride = latent_tiles(tile_px, overlap, f)
    if max(height, width) <= tile:
        return tensor_to_image(decode_latents(vae, latents))
    tops, lefts = window_starts(height, tile, stride), window_starts(width, tile, stride)
    out = np.empty((height * f, width * f, 3), dtype=np.uint8)
    acc = torch.zeros(3, 0, width * f)  # weighted pixel sums of rows [done, band bottom), float32
    weight = torch.zeros(0, width * f)
    done = 0  # rows before this are final and live in `out` only
    windows: dict = {}
    for i, top in enumerate(tops):
        bottom = min(top + tile, height)
        grow = bottom * f - done - acc.shape[1]
        acc, weight = torch.cat([acc, torch.zeros(3, grow, width * f)], 1), torch.cat([weight, torch.zeros(grow, width * f)])
        for left in lefts:
            right = min(left + tile, width)
            pixels = decode_latents(vae, latents[..., top:bottom, left:right])[0]
            size = tuple(pixels.shape[-2:])
            if size not in windows:
                windows[size] = window_weights(*size, "gaussian", BLEND_SIGMA)
            rows, cols = slice(top * f - done, bottom * f - done), slice(left * f, right * f)
            acc[:, rows, cols] += pixels * windows[size]
            weight[rows, cols] += windows[size]
        final = (tops[i + 1] if i + 1 < len(tops) else height) * f  # later bands never reach above this row
        out[done:final] = to_uint8(acc[:, : final - done] / weight[: final - done])
        acc, weight, done = acc[:, final - done :], weight[final - done :], final
    return Image.fromarray(out)
