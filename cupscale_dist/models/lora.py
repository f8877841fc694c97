"""LoRA files (issue 11): checked on the driver from their header, loaded through diffusers + peft on every worker.

:func:`check_lora` reads only the safetensors header (key names and shapes, no weights) and refuses, in one line, a
file that is not a LoRA or one made for another family: its cross-attention ``to_k``/``to_v`` input width must be
the model's ``cross_attention_dim`` (768 for SD1.5, 2048 for SDXL), and the UNet blocks it names must exist in the
model's UNet (built on the meta device from its config, so no memory). Two key layouts are read: diffusers/peft
(``unet.down_blocks.1....to_k.lora_A.weight``) and kohya (``lora_unet_down_blocks_1_..._to_k.lora_down.weight``,
also SDXL's ``lora_unet_input_blocks_4_1_...`` in the original block names).

:func:`apply_loras` runs on each worker before the attention processors go in: ``load_lora_weights`` (which
converts kohya keys itself and loads text-encoder layers where the file has them) under the names ``lora0``,
``lora1``, ... in the order given, then one ``set_adapters`` with the scales, so every actor holds the same model.
"""

from __future__ import annotations

import re

from ..errors import UserError

# Key fragments that mark LoRA factors: peft (lora_A/lora_B), kohya (lora_down/lora_up), older diffusers
# attention-processor files (to_k_lora.down), and LoCon/LyCORIS' hada/lokr factors.
LORA_KEY = re.compile(r"(lora_A|lora_B|lora_down|lora_up|lora\.down|lora\.up|lora_linear_layer|hada_w1|lokr_w1)")
# The down (A) factor of a cross-attention key or value projection: its input width is the text embedding width.
CROSS_ATTENTION_DOWN = re.compile(r"attn2[._](to_[kv])(?:_lora)?[._](?:lora_A|lora_down|lora\.down|lora_linear_layer\.down)"
                                  r"\.weight$")
PEFT_UNET_MODULE = re.compile(r"^unet\.(.+?)\.(?:lora_A|lora_B)(?:\.[^.]+)?\.weight$")
KOHYA_UNET_MODULE = re.compile(r"^lora_unet_(.+?)\.(?:lora_down|lora_up)\.weight$")
ORIGINAL_BLOCK_NAMES = ("input_blocks", "middle_block", "output_blocks")  # kohya SDXL: names of the original UNet


def read_header(path: str, what: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a safetensors file, from its header alone (no tensor is read)."""
    from .single_file import safetensors_header

    try:
        return safetensors_header(path)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for every kind of bad file
        raise UserError(f"{what}: not a readable safetensors file ({type(exc).__name__}); pass a .safetensors "
                        "file") from None


def check_lora(path: str, spec) -> None:
    """Refuse (one line) a file that is not a LoRA, or a LoRA for another model family than ``spec``'s."""
    what = f"--lora {path}"
    header = read_header(path, what)
    if not any(LORA_KEY.search(key) for key in header):
        raise UserError(f"{what}: no LoRA weights in it (no lora_A/lora_B/lora_down/lora_up keys); pass a LoRA file")
    unet_config = spec.unet_config()
    cross_dim = unet_config["cross_attention_dim"]
    for key, shape in header.items():
        match = CROSS_ATTENTION_DOWN.search(key)
        if match and (key.startswith("unet") or key.startswith("lora_unet")) and len(shape) >= 2 and shape[1] != cross_dim:
            family = {768: "SD1.5", 2048: "SDXL", 1024: "SD2"}.get(shape[1], f"a {shape[1]}-wide text encoder")
            raise UserError(f"{what}: its cross-attention {match[1]} takes {shape[1]} inputs ({family}), "
                            f"{spec.name} has {cross_dim}; use a LoRA trained for this model's family")
    missing = sorted(set(unet_modules_named(header)) - set(unet_module_names(unet_config)))
    if missing:
        raise UserError(f"{what}: names UNet layers {spec.name} does not have (e.g. {missing[0]}); use a LoRA "
                        "trained for this model's family")


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


def unet_module_names(unet_config: dict) -> list[str]:
    """Every module path of the UNet ``unet_config`` describes, in both spellings: dotted and kohya's '_' as '.'."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # structure only: no memory, no initialisation cost worth counting
        unet = UNet2DConditionModel.from_config(unet_config)
    names = [name for name, _ in unet.named_modules() if name]
    return names + [name.replace("_", ".") for name in names]


def adapter_names(count: int) -> list[str]:
    """The adapter names of ``count`` LoRAs: fixed and ordered, so every worker builds the same model."""
    return [f"lora{i}" for i in range(count)]


def apply_loras(pipe, loras) -> None:
    """Load ``loras`` (:class:`cupscale_dist.models.addons.Lora`) into ``pipe`` and activate them with their scales."""
    names = adapter_names(len(loras))
    for name, lora in zip(names, loras):
        try:
            pipe.load_lora_weights(lora.path, adapter_name=name)
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"--lora {lora.path}: diffusers could not load it ({reason[:200]}); use a LoRA "
                            "trained for this model") from None
    pipe.set_adapters(names, adapter_weights=[lora.scale for lora in loras])
