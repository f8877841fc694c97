"""What a worker loads beside the base pipeline (issue 11): LoRAs, a ControlNet tile model, an upscale model.

The driver builds :class:`Addons` from the config once (:meth:`Addons.from_config`): paths are resolved and every
file is checked against the model there, from headers and configs only (a LoRA's weights are read once, for NaN
and inf), so a bad or mismatched file is one clear line before any actor starts. Workers receive the resolved value
and load it (:mod:`cupscale_dist.execution.worker`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from ..config import split_lora
from ..errors import UserError, shown
from .hub import HUB_FILE, resolve_hub_file


@dataclass(frozen=True)
class Lora:
    path: str
    scale: float


@dataclass(frozen=True)
class Addons:
    loras: tuple[Lora, ...] = ()
    controlnet: str | None = None  # a local ControlNet directory
    upscale_model: str | None = None  # a local upscale-model file (resize='model')

    @classmethod
    def from_config(cls, config, spec=None) -> Addons:
        """Resolve and check the config's add-ons against ``spec`` (the model's :class:`ModelSpec`, read if None)."""
        if not (config.lora or config.controlnet or config.resize == "model"):
            return cls()
        if spec is None:
            from .spec import ModelSpec

            spec = ModelSpec.load(config.model, config.variant, config.model_config)
        loras = tuple(parse_lora(text) for text in config.lora)
        if loras:
            from .lora import check_lora

            for lora in loras:
                check_lora(lora.path, spec)
        controlnet = None
        if config.controlnet:
            from .controlnet import check_controlnet, resolve_controlnet

            controlnet = resolve_controlnet(config.controlnet)
            check_controlnet(controlnet, spec)
        upscale_model = None
        if config.resize == "model":
            from .upscale_models import check_upscale_model, resolve_upscale_model

            upscale_model = resolve_upscale_model(config.upscale_model)
            check_upscale_model(upscale_model)
        return cls(loras, controlnet, upscale_model)


def addon_request(config) -> tuple:
    """What a config asks of a worker's add-ons, as given (unresolved): equal requests get equal :class:`Addons`."""
    return config.lora, config.controlnet, config.upscale_model if config.resize == "model" else None


def parse_lora(text: str) -> Lora:
    """``PATH[:SCALE]`` -> :class:`Lora`; the scale is the part after the last colon when it parses as a number
    (so ``C:/loras/x.safetensors`` keeps its drive letter). PATH may be ``hf://OWNER/REPO/FILE`` (from the cache)."""
    path, scale = split_lora(text)
    if not math.isfinite(scale):
        raise UserError(f"--lora {shown(text)}: scale {shown(text.rpartition(':')[2], 20)} is not a finite number; use "
                        "PATH[:SCALE], e.g. style.safetensors:0.8")
    if path.startswith(HUB_FILE):
        path = resolve_hub_file(path, "--lora")
    if not Path(os.path.expanduser(path)).is_file():
        raise UserError(f"--lora {shown(text)}: not a file; pass a LoRA .safetensors file as PATH[:SCALE]")
    return Lora(str(Path(os.path.expanduser(path)).resolve()), scale)
