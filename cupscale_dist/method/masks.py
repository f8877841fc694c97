"""Regional attention prior (method.md step 7): which global-prompt tokens each view may attend to.

One UNet pass of the global prompt over the stage input at the model's native size records cross-attention
maps per token; each content token's map is binarised at its mean. A view keeps a token when the token's map
covers at least ``mask_threshold`` of it. Start, end and padding tokens are always kept (an all-screened row
would give NaN).
"""

from __future__ import annotations

import numpy as np
import torch

from .attention import AttentionProbe, install_regional_processors, probe_processors


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
    lowest attention resolution of a square native-size input, float32 on the CPU (as every step's core returns)."""
    probe = AttentionProbe()
    unet.set_attn_processor(probe_processors(unet, probe))
    try:
        unet(latents.to(unet.dtype), timestep, encoder_hidden_states=prompt_embeds.to(unet.dtype),
             added_cond_kwargs=added_cond_kwargs)
    finally:
        install_regional_processors(unet)
    probs = probe.lowest_resolution_map()[0].float().cpu()  # (Lq, tokens); the caller hands it on as numpy
    side = int(round(probs.shape[0] ** 0.5))
    return probs.T.reshape(-1, side, side)
