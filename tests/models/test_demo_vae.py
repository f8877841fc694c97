"""Issue 23, first step: a linear autoencoder written into diffusers' AutoencoderKL gives the same round trip.

The embedding must be exact (borders included) for the fitted linear VAE to be a real starting point, and the saved
directory must load through `from_pretrained` like every other model here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cupscale_dist.demo.linear_vae import (
    LinearAutoencoder,
    _group_layout,
    embed_in_autoencoder_kl,
    fit_linear_autoencoder,
    whiten_latents,
)
from cupscale_dist.demo.photos import load_photo


def photo_crops(height: int = 64, width: int = 96) -> torch.Tensor:
    """Two crops of a training photo (chelsea), [-1, 1], not square: borders on both axes matter."""
    image = torch.from_numpy(load_photo("chelsea")).permute(2, 0, 1).float() / 127.5 - 1
    return torch.stack([image[:, 40 : 40 + height, 60 : 60 + width], image[:, 120 : 120 + height, 200 : 200 + width]])


@pytest.fixture(scope="module", params=[(32, 64), (32, 64, 64)], ids=["factor2", "factor4"])
def fitted(request):
    torch.manual_seed(0)
    model = LinearAutoencoder(latent_channels=8, blocks=request.param)
    crops = photo_crops()
    fit_linear_autoencoder(model, lambda: crops, steps=30, lr=2e-3)
    whiten_latents(model, crops)
    return model.eval(), crops


def test_autoencoder_kl_reproduces_the_linear_round_trip(fitted, tmp_path):
    from diffusers import AutoencoderKL

    model, crops = fitted
    vae = embed_in_autoencoder_kl(model)
    vae.save_pretrained(tmp_path / "vae")
    loaded = AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    with torch.no_grad():
        expected_latents, expected = model.encode(crops), model(crops)
        for candidate in (vae.eval(), loaded):
            posterior = candidate.encode(crops).latent_dist
            assert torch.allclose(posterior.mode(), expected_latents, atol=1e-4)
            assert float(posterior.std.max()) < 1e-6  # deterministic: sample() == mode()
            pixels = candidate.decode(posterior.mode()).sample
            assert (pixels - expected).abs().max().item() < 1e-3
    assert loaded.config.latent_channels == 8 and loaded.config.force_upcast
    assert loaded.config.block_out_channels == list(model.blocks)


def test_the_embedding_holds_in_bfloat16(fitted):
    """SiLU(c) - SiLU(-c) = c at any scale: the embedded VAE in bfloat16 stays close to the float32 round trip
    (an offset-based linearisation, SiLU(20 + c) - 20, loses it to bfloat16's 8 bits)."""
    model, crops = fitted
    vae = embed_in_autoencoder_kl(model).eval()
    with torch.no_grad():
        expected = model(crops)
        half = vae.to(torch.bfloat16)
        pixels = half.decode(half.encode(crops.to(torch.bfloat16)).latent_dist.mode()).sample.float()
    error = ((pixels - expected) ** 2).mean().item()
    assert 10 * np.log10(4 / error) > 40, error  # dB over the [-1, 1] range


def test_whitening_keeps_the_round_trip_and_gives_unit_latents():
    torch.manual_seed(1)
    model, crops = LinearAutoencoder(latent_channels=8), photo_crops()
    with torch.no_grad():
        before = model(crops)
        whiten_latents(model, crops)
        after, latents = model(crops), model.encode(crops)
    assert torch.allclose(before, after, atol=1e-5)
    assert np.allclose(latents.std(dim=(0, 2, 3)).numpy(), 1.0, atol=1e-4)


def test_fitting_lowers_the_reconstruction_error():
    torch.manual_seed(2)
    model, crops = LinearAutoencoder(latent_channels=8), photo_crops()
    log = fit_linear_autoencoder(model, lambda: crops, steps=60, lr=2e-3)
    assert log[-1]["mse"] < 0.5 * log[0]["mse"]


def test_groups_without_room_for_mirrors_and_constants_are_refused():
    values, mirrors, constants = _group_layout(16, 64, 8)
    assert len(values) == len(mirrors) == 16 and len(constants) == 32
    assert sum(value for channel, value in constants if channel < 8) == 0  # +K and -K: each group's mean stays 0
    with pytest.raises(ValueError, match="do not fit"):
        _group_layout(32, 64, 8)
