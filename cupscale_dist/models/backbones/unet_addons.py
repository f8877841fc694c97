"""What the UNet families (SDXL, SD1.5) share beyond the calling contract: their LoRA and ControlNet checks, from
a LoRA file's header and a ControlNet's config, against the model's UNet config (no weights)."""

from __future__ import annotations

import re

from ...errors import UserError, shown
from ..lora_keys import DOWN_FACTORS, FACTOR, check_factor_pairs

# The down (A) factor of a cross-attention key or value projection: its input width is the text embedding width.
CROSS_ATTENTION_DOWN = re.compile(r"attn2[._](to_[kv])(?:_lora)?[._]"
                                  r"(?:lora_A|lora_down|lora\.down|lora_linear_layer\.down)\.weight$")
PEFT_UNET_MODULE = re.compile(r"^unet\.(.+?)\.(?:lora_A|lora_B)(?:\.[^.]+)?\.weight$")
KOHYA_UNET_MODULE = re.compile(r"^lora_unet_(.+?)\.(?:lora_down|lora_up)\.weight$")
ORIGINAL_BLOCK_NAMES = ("input_blocks", "middle_block", "output_blocks")  # kohya SDXL: names of the original UNet

# What must agree between a ControlNet and the UNet it steers: its residuals are added to the UNet's skip
# connections (channels per block) and it reads the same text embeddings (cross-attention width, SDXL's pooled +
# time-ids embedding).
MATCHING_KEYS = ("block_out_channels", "cross_attention_dim", "in_channels", "addition_embed_type",
                 "projection_class_embeddings_input_dim", "addition_time_embed_dim")


def check_unet_lora(header: dict, spec, what: str) -> None:
    """A UNet LoRA against ``spec``'s UNet: its cross-attention width, the layers it names, factor pairs and widths
    (the UNet families' check)."""
    unet_config = spec.unet_config()
    cross_dim = unet_config["cross_attention_dim"]
    for key, shape in header.items():
        match = CROSS_ATTENTION_DOWN.search(key)
        if (match and (key.startswith("unet") or key.startswith("lora_unet")) and len(shape) >= 2
                and shape[1] != cross_dim):
            family = {768: "SD1.5", 2048: "SDXL", 1024: "SD2"}.get(shape[1], f"a {shape[1]}-wide text encoder")
            raise UserError(f"{what}: its cross-attention {match[1]} takes {shape[1]} inputs ({family}), "
                            f"{spec.name} has {cross_dim}; use a LoRA trained for this model's family")
    layers = unet_layers(unet_config)
    missing = sorted(set(unet_modules_named(header)) - set(layers))
    if missing:
        raise UserError(f"{what}: names UNet layers {spec.name} does not have (e.g. {shown(missing[0])}); use a LoRA "
                        "trained for this model's family")
    check_factor_pairs(header, what)  # after the family checks: "made for another model" is the likelier news
    check_factor_widths(header, layers, what, spec.name)


def check_factor_widths(header: dict, layers: dict[str, tuple[int, int] | None], what: str, model: str) -> None:
    """Each UNet factor's outer width equals its layer's: down = the layer's input width, up = its output width
    (peft would print a multi-line size-mismatch log on every worker and fail)."""
    for key, shape in header.items():
        found = PEFT_UNET_MODULE.match(key) or KOHYA_UNET_MODULE.match(key)
        factor = FACTOR.search(key)
        widths = layers.get(found[1].replace("_", ".")) if found and factor else None
        if widths is None or len(shape) < 2:
            continue  # original-layout kohya names: checked by cross-attention width only
        width_in, width_out = widths
        down = factor[1] in DOWN_FACTORS
        have, want = (shape[1], width_in) if down else (shape[0], width_out)
        if have != want:
            side = "inputs" if down else "outputs"
            raise UserError(f"{what}: its layer {shown(found[1])} has {have} {side}, {model}'s has {want}; the LoRA "
                            "was trained for a model of other layer sizes: use one trained for this model")


def unet_modules_named(header: dict) -> list[str]:
    """UNet module paths a LoRA file adapts, dotted, in diffusers' names; kohya names are compared with '_' as '.'."""
    names = []
    for key in header:
        peft = PEFT_UNET_MODULE.match(key)
        kohya = KOHYA_UNET_MODULE.match(key)
        if peft:
            names.append(peft[1])
        elif kohya and not kohya[1].startswith(ORIGINAL_BLOCK_NAMES):  # original-layout names: checked by width only
            names.append(kohya[1].replace("_", "."))
    return names


def unet_layers(unet_config: dict) -> dict[str, tuple[int, int] | None]:
    """Every module path of the UNet ``unet_config`` describes, in both spellings (dotted, and kohya's '_' as '.'),
    -> (input width, output width): features of a linear layer, channels of a convolution, None for others."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # structure only: no memory, no initialisation cost worth counting
        unet = UNet2DConditionModel.from_config(unet_config)
    layers = {}
    for name, module in unet.named_modules():
        if name:
            width_in = getattr(module, "in_features", None) or getattr(module, "in_channels", None)
            width_out = getattr(module, "out_features", None) or getattr(module, "out_channels", None)
            widths = (width_in, width_out) if isinstance(width_in, int) and isinstance(width_out, int) else None
            layers[name] = layers[name.replace("_", ".")] = widths
    return layers


def check_unet_controlnet(folder: str, config: dict, spec) -> None:
    """A ControlNetModel whose widths are the UNet's (the UNet families' check)."""
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
