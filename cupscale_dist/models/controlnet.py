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

from ..errors import UserError
from .backbones import BACKBONES, backbone_class
from .backbones.base import UNetBackbone
from .spec import read_json

log = logging.getLogger(__name__)

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
    owner = controlnet_family(config) or backbone_class(spec.family)  # a family's own class is checked by it
    owner.check_controlnet(folder, config, spec)


def controlnet_family(config: dict):
    """The family whose own ControlNet class ``config`` names (its Backbone class), or None (a UNet ControlNet)."""
    return next((backbone for backbone in BACKBONES.values() if backbone.claims_controlnet(config)), None)


def load_controlnet(folder: str, device: torch.device, dtype: torch.dtype):
    """The ControlNet (a UNet family's, or a family's own class) on the worker's device and dtype."""
    config = read_json(folder, "config.json", "--controlnet", "re-save the model")
    owner = controlnet_family(config) or UNetBackbone
    try:
        model = owner.controlnet_class().from_pretrained(folder, torch_dtype=dtype)
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
