"""Regional attention prior (method.md step 7): which global-prompt tokens each view may attend to.

One UNet pass of the global prompt over the stage input at the model's native size records cross-attention
maps per token; each content token's map is binarised at its mean. A view keeps a token when the token's map
covers at least ``mask_threshold`` of it. Start, end and padding tokens are always kept (an all-screened row
would give NaN).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .attention import AttentionProbe, install_regional_processors, probe_processors
from .vae import encode_pixels, tile_to_tensor


def content_token_mask(num_prompt_tokens: int, max_length: int = 77) -> np.ndarray:
    """True for the positions of real words: after <start>, before <end>/padding."""
    mask = np.zeros(max_length, dtype=bool)
    mask[1 : min(num_prompt_tokens, max_length) - 1] = True
    return mask


def binarize_maps(attention: torch.Tensor, content: np.ndarray) -> np.ndarray:
    """(tokens, h, w) probabilities -> bool maps ``A_j > mean(A_j)``; non-content tokens all True."""
    binary = (attention > attention.flatten(1).mean(dim=1)[:, None, None]).cpu().numpy()
    binary[~content] = True
    return binary


def crop_maps(maps: np.ndarray, latent_hw: tuple[int, int], rect) -> np.ndarray:
    """The (tokens, h, w) maps under one latent view: nearest resize of the probe-resolution maps to the stage
    latent, evaluated only inside the view (no full-size map is ever built)."""
    height, width = latent_hw
    top, left, bottom, right = (int(v) for v in rect)
    rows = np.arange(top, bottom) * maps.shape[1] // height
    cols = np.arange(left, right) * maps.shape[2] // width
    return maps[:, rows][:, :, cols]


def view_token_masks(maps: np.ndarray, latent_hw: tuple[int, int], views: np.ndarray, threshold: float) -> np.ndarray:
    """(N, tokens) bool: token j allowed in view n if its binary map covers >= threshold of the view."""
    return np.stack([crop_maps(maps, latent_hw, v).mean(axis=(1, 2)) >= threshold for v in views])


@torch.no_grad()
def probe_attention_maps(unet, latents: torch.Tensor, timestep: int, prompt_embeds: torch.Tensor,
                         added_cond_kwargs: dict | None) -> torch.Tensor:
    """One UNet pass with the attention probe: (tokens, h, w) head- and layer-averaged probabilities at the
    lowest attention resolution of a square native-size input."""
    probe = AttentionProbe()
    unet.set_attn_processor(probe_processors(unet, probe))
    try:
        unet(latents.to(unet.dtype), timestep, encoder_hidden_states=prompt_embeds.to(unet.dtype),
             added_cond_kwargs=added_cond_kwargs)
    finally:
        install_regional_processors(unet)
    probs = probe.lowest_resolution_map()[0].float()  # (Lq, tokens)
    side = int(round(probs.shape[0] ** 0.5))
    return probs.T.reshape(-1, side, side)


@torch.no_grad()
def probe_token_attention(unet, vae, pixels: np.ndarray, noise: torch.Tensor, timestep: int, alpha_bar: float,
                          prompt_embeds: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor:
    """Step 7's forward pass: the native-size stage input (uint8 HxWx3), encoded and noised to ``timestep``
    (``sqrt(abar) z + sqrt(1 - abar) noise``, the UNet's input space), through the UNet with the global prompt;
    returns the (tokens, h, w) attention maps. ``pooled``: SDXL's pooled global prompt (micro-conditioning is the
    native size, uncropped)."""
    latent = encode_pixels(vae, tile_to_tensor(pixels))
    noisy = math.sqrt(alpha_bar) * latent + math.sqrt(1 - alpha_bar) * noise
    added = None
    if pooled is not None:
        height, width = pixels.shape[:2]
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)
        added = {"text_embeds": pooled.to(unet.device, unet.dtype), "time_ids": time_ids.to(unet.device, unet.dtype)}
    return probe_attention_maps(unet, noisy.to(unet.device), timestep, prompt_embeds.to(unet.device), added)
