"""LoRA files (issue 11): checked on the driver from their header, loaded through diffusers + peft on every worker.

:func:`check_lora` reads only the safetensors header (key names and shapes, no weights) and refuses, in one line, a
file that is not a LoRA or one made for another family: its cross-attention ``to_k``/``to_v`` input width must be
the model's ``cross_attention_dim`` (768 for SD1.5, 2048 for SDXL), and the UNet blocks it names must exist in the
model's UNet (built on the meta device from its config, so no memory). Two key layouts are read: diffusers/peft
(``unet.down_blocks.1....to_k.lora_A.weight``) and kohya (``lora_unet_down_blocks_1_..._to_k.lora_down.weight``,
also SDXL's ``lora_unet_input_blocks_4_1_...`` in the original block names). It also refuses a file made for other
layer sizes (each UNet factor's outer width against its layer's), an incomplete one (a down factor without its up:
diffusers fails on it with an IndexError) and one with NaN or infinite weights (they make every pixel NaN: a black
image); the last is the one check that reads the weights, one tensor at a time.

:func:`apply_loras` runs on each worker before the attention processors go in: ``load_lora_weights`` (which
converts kohya keys itself and loads text-encoder layers where the file has them) under the names ``lora0``,
``lora1``, ... in the order given, then one ``set_adapters`` with the scales, so every actor holds the same model. A
file that still fails there is one line (diffusers' own multi-line error log is held back).
"""

from __future__ import annotations

import logging
import re

from ..errors import UserError, shown
from ..files.userfile import named
from .backbones.flux.lora import check_flux_lora, is_flux_lora
from .lora_keys import DOWN_FACTORS, FACTOR, LORA_KEY
from .weightfiles import check_finite, safetensors_tensors

# The down (A) factor of a cross-attention key or value projection: its input width is the text embedding width.
CROSS_ATTENTION_DOWN = re.compile(r"attn2[._](to_[kv])(?:_lora)?[._]"
                                  r"(?:lora_A|lora_down|lora\.down|lora_linear_layer\.down)\.weight$")
PEFT_UNET_MODULE = re.compile(r"^unet\.(.+?)\.(?:lora_A|lora_B)(?:\.[^.]+)?\.weight$")
KOHYA_UNET_MODULE = re.compile(r"^lora_unet_(.+?)\.(?:lora_down|lora_up)\.weight$")
ORIGINAL_BLOCK_NAMES = ("input_blocks", "middle_block", "output_blocks")  # kohya SDXL: names of the original UNet


def read_header(path: str, what: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a safetensors file, from its header alone (no tensor is read)."""
    from .single_file import safetensors_header

    try:
        return safetensors_header(path)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for every kind of bad file
        raise UserError(f"{what}: not a readable safetensors file ({type(exc).__name__}); pass a .safetensors "
                        "file") from None


def check_lora(path: str, spec) -> None:
    """Refuse (one line) a file that is not a LoRA, a LoRA for another model family or other layer sizes than
    ``spec``'s, one with a factor missing, or one with NaN/inf weights (the only check that reads the weights)."""
    what = named(f"--lora {path}")
    header = read_header(path, what)
    if not any(LORA_KEY.search(key) for key in header):
        raise UserError(f"{what}: no LoRA weights in it (no lora_A/lora_B/lora_down/lora_up keys); pass a LoRA file")
    check_float_tensors(path, what)
    if spec.family == "flux" or is_flux_lora(header):  # a DiT's LoRA names transformer blocks, not a UNet's
        check_flux_lora(header, spec, what)
        check_factor_pairs(header, what)
        check_finite(safetensors_tensors(path), what)
        return
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
    check_finite(safetensors_tensors(path), what)  # reads the weights, one tensor at a time


def check_float_tensors(path: str, what: str) -> None:
    """One UserError for a LoRA with an integer or boolean tensor (from the header): peft would cast it and apply
    it, where no trained factor or alpha is an integer (check_finite skips such tensors)."""
    from .backbones.flux.header import safetensors_dtypes
    from .backbones.flux.single_file import dtype_problem

    problem = dtype_problem(safetensors_dtypes(path))
    if problem:
        raise UserError(f"{what}: {problem}; pass the LoRA as its trainer saved it")


def factor_layers(header: dict) -> dict[str, dict[str, tuple[int, ...]]]:
    """Layer (the key before its factor) -> {'down'/'up': shape} for every low-rank factor in ``header``."""
    layers: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in header.items():
        match = FACTOR.search(key)
        if match:
            layers.setdefault(key[: match.start()], {})["down" if match[1] in DOWN_FACTORS else "up"] = shape
    return layers


def check_factor_pairs(header: dict, what: str) -> None:
    """Every layer has both factors of its pair (diffusers fails with an IndexError on a file of down factors only),
    and their ranks agree."""
    for layer, factors in sorted(factor_layers(header).items()):
        if len(factors) < 2:
            have, lack = ("down (lora_A)", "up (lora_B)") if "down" in factors else ("up (lora_B)", "down (lora_A)")
            raise UserError(f"{what}: layer {shown(layer)} has a {have} factor but no {lack} factor; the file is "
                            "incomplete: export the LoRA again")
        down, up = factors["down"], factors["up"]
        if len(down) < 2 or len(up) < 2 or down[0] != up[1]:
            raise UserError(f"{what}: the factors of layer {shown(layer)} do not fit together (down {shown(down, 30)}, "
                            f"up {shown(up, 30)}); "
                            "the file is damaged: export the LoRA again")


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


def adapter_names(count: int) -> list[str]:
    """The adapter names of ``count`` LoRAs: fixed and ordered, so every worker builds the same model."""
    return [f"lora{i}" for i in range(count)]


def apply_loras(pipe, loras) -> None:
    """Load ``loras`` (:class:`cupscale_dist.models.addons.Lora`) into ``pipe`` and activate them with their scales."""
    names = adapter_names(len(loras))
    loaders = logging.getLogger("diffusers.loaders")  # logs each failure as a multi-line error before raising it
    for name, lora in zip(names, loras):
        level = loaders.level
        loaders.setLevel(logging.CRITICAL)  # the UserError below says it in one line
        try:
            pipe.load_lora_weights(lora.path, adapter_name=name)
        except (ValueError, KeyError, RuntimeError, OSError, IndexError, TypeError) as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
            reason = next((line for line in lines if line.startswith("size mismatch")), lines[0])
            raise UserError(f"--lora {lora.path}: diffusers could not load it ({reason[:200]}); use a LoRA "
                            "trained for this model") from None
        finally:
            loaders.setLevel(level)
    pipe.set_adapters(names, adapter_weights=[lora.scale for lora in loras])
