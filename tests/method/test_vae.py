"""Tiled VAE: the band-by-band 8-bit decode and the tile-by-tile encode blend tiles exactly like one big call
when the codec is local (a pointwise stand-in), and run on the real tiny VAE."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cupscale_dist.execution.executor import LocalExecutor
from cupscale_dist.execution.worker import ModelWorker
from cupscale_dist.method.vae import (
    decode_image,
    decode_latents,
    encode_image,
    encode_pixels,
    image_to_tensor,
    to_uint8,
)


class VAEWorker:
    """ModelWorker's two VAE calls around any VAE (the tiled functions only ever call these)."""

    encode_tile, decode_tile = ModelWorker.encode_tile, ModelWorker.decode_tile

    def __init__(self, vae):
        self.vae = vae


def tile_map(vae):
    return LocalExecutor(VAEWorker(vae), 1).map


class PointwiseVAE:
    """A VAE stand-in whose decode/encode only look at their own 8x8 block: tiling must not change a bit."""

    config = SimpleNamespace(block_out_channels=(1, 1, 1, 1), scaling_factor=0.5, latent_channels=4)
    device, dtype = torch.device("cpu"), torch.float32

    def decode(self, z):
        return SimpleNamespace(sample=torch.tanh(F.interpolate(z[:, :3] * 0.7 + z[:, 3:] * 0.2, scale_factor=8)))

    def encode(self, x):
        low = F.avg_pool2d(x, 8)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=torch.cat([low, low.mean(1, keepdim=True)], 1)))


@pytest.mark.parametrize("tile_px,overlap", [(64, 0.25), (96, 0.5), (128, 0.0)])
def test_tiled_decode_equals_one_call_for_a_local_codec(tile_px, overlap):
    vae = PointwiseVAE()
    latents = torch.randn(1, 4, 37, 52, generator=torch.Generator().manual_seed(0))
    whole = to_uint8(decode_latents(vae, latents)[0]).astype(int)
    tiled = np.asarray(decode_image(tile_map(vae), latents, 8, tile_px, overlap), dtype=int)
    assert tiled.shape == (296, 416, 3)
    assert np.abs(tiled - whole).max() <= 1  # float blending of equal tiles may round one step apart


def test_tiled_encode_equals_one_call_for_a_local_codec():
    vae = PointwiseVAE()
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (296, 416, 3), dtype=np.uint8))
    whole = encode_pixels(vae, image_to_tensor(image))
    assert (encode_image(tile_map(vae), image, 8, 4, 64, 0.25) - whole).abs().max() < 1e-5


def test_real_tiny_vae_tiles_large_images(sdxl_model):
    tiles = LocalExecutor(sdxl_model, 1).map
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (200, 264, 3), dtype=np.uint8))
    latents = encode_image(tiles, image, 8, 4, 128, 0.25)
    assert latents.shape == (1, 4, 25, 33) and torch.isfinite(latents).all()
    decoded = decode_image(tiles, latents, 8, 128, 0.25)
    assert decoded.size == (264, 200)
    assert np.asarray(decoded).tobytes() == np.asarray(decode_image(tiles, latents, 8, 128, 0.25)).tobytes()
