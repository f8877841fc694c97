"""Z-Image LoRA files: told apart from other families' by their header, checked against the Z-Image transformer.

Z-Image LoRAs name the transformer's blocks (``layers``, ``noise_refiner``, ``context_refiner``): diffusers/peft
(``transformer.layers.0.attention.to_q.lora_A.weight``, what ``ZImagePipeline.save_lora_weights`` writes),
ai-toolkit/ComfyUI (``diffusion_model.layers.0.attention.to_q.lora_A.weight``, alphas beside them) or kohya
(``lora_unet_layers_0_attention_to_q.lora_down.weight``, fused ``attention_qkv`` included). A Z-Image LoRA on another
family and another family's LoRA on Z-Image are refused in one line from the header. The file's keys go through
diffusers' own conversion (``ZImageLoraLoaderMixin.lora_state_dict``, on meta tensors: names and shapes only), and
every layer it names must exist in the model's transformer (built on the meta device from its config) with the
factor widths of that layer. Loading is ``ZImagePipeline.load_lora_weights`` through
:func:`cupscale_dist.models.lora.apply_loras`, as for every family.
"""

from __future__ import annotations

import re

from ....errors import UserError, shown
from ...lora_keys import check_factor_pairs, check_layer_widths, linear_layers

# A Z-Image block in any of the key layouts above (the transformer's own module names, any separator)
ZIMAGE_KEY = re.compile(r"^(transformer\.|diffusion_model\.|lora_unet_)"
                        r"(layers|noise_refiner|context_refiner)[._]\d+[._]")
UNET_KEYS = ("unet.", "lora_unet_down", "lora_unet_up", "lora_unet_mid", "lora_unet_input", "lora_unet_output",
             "lora_unet_middle")
PEFT_MODULE = re.compile(r"^transformer\.(.+?)\.(lora_A|lora_B)\.weight$")


def is_zimage_lora(header: dict) -> bool:
    """Whether a LoRA file's keys name Z-Image transformer blocks (and no UNet)."""
    return any(ZIMAGE_KEY.match(key) for key in header) and not any(key.startswith(UNET_KEYS) for key in header)


def transformer_layers(config: dict) -> dict[str, tuple[int, int] | None]:
    """Module path -> (in, out) features of every layer of the Z-Image transformer ``config`` describes."""
    from diffusers import ZImageTransformer2DModel

    return linear_layers(ZImageTransformer2DModel, config)


def converted_shapes(header: dict, what: str) -> dict[str, tuple[int, ...]]:
    """The file's keys and shapes as diffusers loads them (``transformer.<module>.lora_A/B.weight``): its own
    conversion run on meta tensors (an alpha as a real 1: its value scales the factors, it names nothing)."""
    import torch
    from diffusers import ZImagePipeline

    state = {key: (torch.ones(shape) if key.endswith(".alpha") else torch.empty(shape, device="meta"))
             for key, shape in header.items()}
    try:
        converted = ZImagePipeline.lora_state_dict(state)
    except (ValueError, KeyError, RuntimeError, IndexError, TypeError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{what}: diffusers cannot read its Z-Image keys ({shown(reason, 120)}); export the LoRA "
                        "again as diffusers or kohya saves it") from None
    return {key: tuple(value.shape) for key, value in converted.items()}


def check_zimage_lora(header: dict, spec, what: str) -> None:
    """One line for a Z-Image LoRA on another family, another family's LoRA on Z-Image, a factor missing, or a
    Z-Image LoRA of other layers or sizes."""
    zimage_file, zimage_model = is_zimage_lora(header), spec.family == "zimage"
    if zimage_file and not zimage_model:
        raise UserError(f"{what}: is a Z-Image LoRA (it names Z-Image transformer layers) and {spec.name} is an "
                        f"{spec.family} model; use a LoRA trained for this model's family")
    if zimage_model and not zimage_file:
        raise UserError(f"{what}: names no Z-Image transformer layer (another family's LoRA) and {spec.name} is a "
                        "Z-Image model; use a LoRA trained for Z-Image")
    check_factor_pairs(header, what)
    layers = transformer_layers(spec.denoiser_config())
    factors = ((found[1], found[2], shape) for key, shape in converted_shapes(header, what).items()
               if (found := PEFT_MODULE.match(key)))
    check_layer_widths(factors, layers, spec, what, "Z-Image")

