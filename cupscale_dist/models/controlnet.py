"""ControlNet tile (issue 11): where the model comes from, the driver's check, the worker's load, the view crops.

Each view is conditioned on ITS OWN crop of the stage input (:func:`control_crops`), the pixels under its latent
window; feeding the whole image to every view (a known bug of other tiled upscalers) asks every tile to look like
the whole picture. The ControlNet runs on the workers inside :func:`cupscale_dist.method.step.predict_views`, with the
same regional cross-attention as the UNet, and its residuals are scaled by ``controlnet_scale``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError, shown
from .spec import read_json

log = logging.getLogger(__name__)

# What must agree between a ControlNet and the UNet it steers: its residuals are added to the UNet's skip
# connections (channels per block) and it reads the same text embeddings (cross-attention width, SDXL's pooled +
# time-ids embedding).
MATCHING_KEYS = ("block_out_channels", "cross_attention_dim", "in_channels", "addition_embed_type",
                 "projection_class_embeddings_input_dim", "addition_time_embed_dim")


def resolve_controlnet(name: str) -> str:
    """A local ControlNet directory (``config.json`` + weights) as it is; a hub id -> a local snapshot of its config
    and safetensors weights (fetched once; offline, the cached snapshot)."""
    path = Path(os.path.expanduser(name))
    if path.exists() or name.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise UserError(f"--controlnet {name}: not a diffusers ControlNet directory (no config.json); save it with "
                            "ControlNetModel.save_pretrained or pass a hub id such as xinsir/controlnet-tile-sdxl-1.0")
        return str(path.resolve())
    from huggingface_hub import snapshot_download

    patterns = ["config.json", "diffusion_pytorch_model*.safetensors"]
    try:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE")
        return snapshot_download(name, allow_patterns=patterns, local_files_only=offline)
    except Exception as exc:  # offline and not cached, unknown id, gated: one clear line
        raise UserError(f"--controlnet {name}: not available offline and could not be downloaded "
                        f"({type(exc).__name__}); pass a local ControlNet directory") from None


def check_controlnet(folder: str, spec) -> None:
    """Driver-side, from the configs alone: a ControlNet that does not fit the model is one line before any actor
    starts (an SD1.5 tile model on SDXL would fail deep inside the first UNet call on every worker)."""
    config = read_json(folder, "config.json", "--controlnet", "re-save the model")
    if spec.family == "flux" or config.get("_class_name") == "FluxControlNetModel":
        check_flux_controlnet(folder, config, spec)
        return
    if config.get("_class_name") != "ControlNetModel":
        raise UserError(f"--controlnet {folder}: a {shown(config.get('_class_name'))}, not a ControlNetModel; use a "
                        "ControlNet tile model such as xinsir/controlnet-tile-sdxl-1.0 (SDXL) or "
                        "lllyasviel/control_v11f1e_sd15_tile (SD1.5)")
    unet = spec.unet_config()  # from the model's config directory (a single-file checkpoint's too)
    for key in MATCHING_KEYS:
        if config.get(key) != unet.get(key):
            raise UserError(f"--controlnet {folder}: made for another model ({key} {shown(config.get(key))} here, "
                            f"{shown(unet.get(key))} in {spec.name}'s UNet); use a ControlNet of the "
                            f"{spec.family} family")


# What must agree between a Flux ControlNet and the transformer it steers: its block outputs are added to the
# transformer's hidden states (width = heads x head dim), it reads the same packed latents, text and positions.
FLUX_MATCHING_KEYS = ("in_channels", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                      "pooled_projection_dim", "axes_dims_rope")


def check_flux_controlnet(folder: str, config: dict, spec) -> None:
    """A Flux ControlNet on a UNet model, a UNet ControlNet on Flux, or one of other widths: one line."""
    if config.get("_class_name") != "FluxControlNetModel" or spec.family != "flux":
        raise UserError(f"--controlnet {folder}: a {shown(config.get('_class_name'))} and {spec.name} is an "
                        f"{spec.family} model; use a ControlNet of the model's family (FluxControlNetModel for Flux)")
    transformer = spec.denoiser_config()
    for key in FLUX_MATCHING_KEYS:
        mine, theirs = config.get(key), transformer.get(key)
        if (list(mine) if isinstance(mine, (list, tuple)) else mine) != (
                list(theirs) if isinstance(theirs, (list, tuple)) else theirs):
            raise UserError(f"--controlnet {folder}: made for another model ({key} {shown(mine)} here, "
                            f"{shown(theirs)} in {spec.name}'s transformer); use a Flux ControlNet for this model")


def load_controlnet(folder: str, device: torch.device, dtype: torch.dtype):
    """The ControlNet (a UNet family's, or a FluxControlNetModel) on the worker's device and dtype."""
    from diffusers import ControlNetModel, FluxControlNetModel

    class_name = read_json(folder, "config.json", "--controlnet", "re-save the model").get("_class_name")
    flux = class_name == "FluxControlNetModel"
    try:
        model = (FluxControlNetModel if flux else ControlNetModel).from_pretrained(folder, torch_dtype=dtype)
    except (OSError, ValueError) as exc:
        reason = (str(exc).splitlines() or [""])[0][:120]
        raise UserError(f"--controlnet {folder}: could not be loaded ({reason})") from None
    return model.to(device).eval()


def control_crops(pixels: np.ndarray, rects: np.ndarray, factor: int) -> np.ndarray:
    """Each view's control image: the stage input's pixels under its latent rectangle (B, h*f, w*f, 3) uint8."""
    return np.stack([pixels[top * factor : bottom * factor, left * factor : right * factor]
                     for top, left, bottom, right in np.asarray(rects)])


def control_tensor(crops: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [0, 1], what diffusers' ControlNet pipelines feed (tile models
    are trained on [0, 1] images, not the VAE's [-1, 1])."""
    return torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float() / 255.0
