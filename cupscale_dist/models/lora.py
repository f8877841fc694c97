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

from ..errors import UserError
from ..files.userfile import named
from .backbones import BACKBONES, backbone_class
from .lora_keys import LORA_KEY
from .weightfiles import check_finite, safetensors_tensors


def read_header(path: str, what: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a safetensors file, from its header alone (no tensor is read)."""
    from .weightfiles import safetensors_header

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
    # a file in a family's own key grammar (a DiT's LoRA names transformer blocks) is checked by that family
    owner = next((b for b in BACKBONES.values() if b.claims_lora(header)), None) or backbone_class(spec.family)
    owner.check_lora(header, spec, what)
    check_finite(safetensors_tensors(path), what)  # reads the weights, one tensor at a time


def check_float_tensors(path: str, what: str) -> None:
    """One UserError for a LoRA with an integer or boolean tensor (from the header): peft would cast it and apply
    it, where no trained factor or alpha is an integer (check_finite skips such tensors)."""
    from .weightfiles import dtype_problem, safetensors_dtypes

    problem = dtype_problem(safetensors_dtypes(path))
    if problem:
        raise UserError(f"{what}: {problem}; pass the LoRA as its trainer saved it")


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
