"""A tiny ControlNet for tests: built from a tiny pipeline's UNet config, saved with ``save_pretrained``.

``ControlNetModel.from_unet`` copies the UNet's encoder and starts its zero convolutions at zero (so a fresh one
changes nothing); the zero convolutions are drawn at random here so that its residuals, and a wrong crop, show.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch


def build_tiny_controlnet(model_dir: str | os.PathLike, directory: str | os.PathLike, seed: int = 0,
                          residual_std: float = 0.05) -> Path:
    """A ControlNet for the tiny pipeline at ``model_dir`` (matching UNet, control embedding downsampling by the
    VAE factor), random zero convolutions of std ``residual_std``, saved in ``directory``."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    vae = json.loads((Path(model_dir) / "vae" / "config.json").read_text())
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    embedding = tuple(8 * 2**k for k in range(int(math.log2(factor)) + 1))  # one stride-2 block per factor of 2
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=embedding)
    with torch.no_grad():
        for block in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            block.weight.normal_(0.0, residual_std)
            block.bias.normal_(0.0, residual_std)
        controlnet.controlnet_cond_embedding.conv_out.weight.normal_(0.0, residual_std)
    controlnet.save_pretrained(directory)
    return Path(directory)
