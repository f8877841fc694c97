"""Flux LoRA files (issue 22): told apart from UNet LoRAs by their header, checked against the Flux transformer.

Flux LoRAs name the transformer's blocks: diffusers/peft (``transformer.transformer_blocks.0.attn.to_q.lora_A
.weight``), kohya (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``) or BFL/ComfyUI
(``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight``). A Flux LoRA on SDXL/SD1.5 and a UNet LoRA on Flux
are refused in one line from the header; for peft keys the named layers must exist in the model's transformer (built
on the meta device from its config) with the factor widths of those layers. Loading is diffusers' own
``FluxPipeline.load_lora_weights`` (it converts kohya and BFL keys), through
:func:`cupscale_dist.models.lora.apply_loras`.
"""

from __future__ import annotations

import re

from ....errors import UserError
from ...lora_keys import FACTOR, check_layer_widths, linear_layers

# diffusers/peft keys name FluxTransformer2DModel's modules (a Z-Image LoRA's 'transformer.layers.' are not Flux's)
FLUX_KEY = re.compile(r"^(transformer\.(transformer_blocks|single_transformer_blocks|x_embedder|context_embedder|"
                      r"time_text_embed|norm_out|proj_out)\.|lora_unet_(double|single)_blocks_|lora_transformer_|"
                      r"(diffusion_model\.)?(double|single)_blocks\.)")
BLOCK_INDEX = re.compile(r"^(?:lora_unet_|(?:diffusion_model\.)?)(double|single)_blocks[._](\d+)[._]")  # kohya, BFL
PEFT_TRANSFORMER_MODULE = re.compile(r"^transformer\.(.+?)\.(?:lora_A|lora_B)(?:\.[^.]+)?\.weight$")


def is_flux_lora(header: dict) -> bool:
    """Whether a LoRA file's keys name Flux transformer blocks (and no UNet)."""
    return any(FLUX_KEY.match(key) for key in header) and not any(
        key.startswith(("unet.", "lora_unet_down", "lora_unet_up", "lora_unet_mid", "lora_unet_input",
                        "lora_unet_output", "lora_unet_middle")) for key in header)


def transformer_layers(config: dict) -> dict[str, tuple[int, int] | None]:
    """Module path -> (in, out) features of every layer of the Flux transformer ``config`` describes."""
    from diffusers import FluxTransformer2DModel

    return linear_layers(FluxTransformer2DModel, config)


def check_flux_lora(header: dict, spec, what: str) -> None:
    """One line for a Flux LoRA on a UNet model, a UNet LoRA on Flux, or a Flux LoRA of other layers or sizes."""
    flux_file, flux_model = is_flux_lora(header), spec.family == "flux"
    if flux_file and not flux_model:
        raise UserError(f"{what}: is a Flux LoRA (it names transformer blocks) and {spec.name} is an {spec.family} "
                        "model; use a LoRA trained for this model's family")
    if flux_model and not flux_file:
        raise UserError(f"{what}: is a UNet (SD/SDXL) LoRA and {spec.name} is a Flux model; use a LoRA trained for "
                        "Flux")
    config = spec.denoiser_config()
    for key in header:  # kohya/BFL names: diffusers converts them, and drops a block the model lacks without a word
        found = BLOCK_INDEX.match(key)
        count = config.get("num_layers" if found and found[1] == "double" else "num_single_layers")
        if found and type(count) is int and int(found[2]) >= count:
            raise UserError(f"{what}: names {found[1]}_blocks {found[2][:12]}, and {spec.name} has {count} of them; "
                            "use a LoRA trained for this model")
    layers = transformer_layers(config)
    # kohya/BFL names (no peft module path): diffusers converts them while loading
    factors = ((found[1], factor[1], shape) for key, shape in header.items()
               if (found := PEFT_TRANSFORMER_MODULE.match(key)) and (factor := FACTOR.search(key)))
    check_layer_widths(factors, layers, spec, what, "Flux")
