"""Single-file checkpoints (``--model finetune.safetensors``): A1111/ComfyUI files in the original Stability layout.

The family is read from the file's keys alone (a safetensors header; a ``.ckpt`` is memory-mapped, not read), so
the driver holds no weights. SDXL base, SD1.5 and Flux.1 (dev, schnell: :mod:`.flux_single_file`) files are
accepted; an SDXL refiner, SD2, SD3 or anything else is refused in one line. Their diffusers configs ship with the
package (``single_file_configs/sdxl``, ``/sd15``, ``/flux-dev``, ``/flux-schnell``: the published models' own
values), so loading never touches the network; ``model_config`` names another diffusers config directory for a
file of other shapes (and, for a transformer-only Flux file, holds its VAE and text encoders). The CLIP tokenizers
are the demo model's files (CLIP's real 49,408-token vocabulary), used wherever a config directory has no tokenizer
of its own; T5's comes from the config directory or the hub cache (:func:`.flux_header.t5_tokenizer_dir`).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError
from ..files.userfile import read_json_object
from .demo_dir import demo_model_dir
from .backbones.flux.header import flux_variant, t5_tokenizer_dir
from .weightfiles import MAX_ENTRIES, load_pickled, unwrap_state_dict

CONFIGS = Path(__file__).resolve().parent / "single_file_configs"  # {family}/model_index.json, unet/, vae/, ...
SUFFIXES = (".safetensors", ".ckpt")
SUPPORTED = "single files of SDXL, SD1.5 and Flux.1 are supported"


def is_single_file(model: str | Path) -> bool:
    """A path to a ``.safetensors`` / ``.ckpt`` file (not a diffusers directory)."""
    path = Path(os.path.expanduser(model))
    return path.suffix.lower() in SUFFIXES and path.is_file()


def safetensors_header(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a safetensors file, from its header alone (no tensor is read); at most
    :data:`~cupscale_dist.models.weightfiles.MAX_ENTRIES` keys."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = f.keys()
        if len(keys) > MAX_ENTRIES:  # a header of tiny entries: bound the walks over its keys
            raise UserError(f"{path}: holds {len(keys)} tensors, over the {MAX_ENTRIES} a model has; not a model file")
        return {key: tuple(f.get_slice(key).get_shape()) for key in keys}


def checkpoint_keys(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a checkpoint without reading its tensors (header only; a .ckpt is memory-mapped, read as
    tensors and plain containers only, its ``state_dict`` wrappers unwrapped a bounded number of times)."""
    path = str(path)
    what = f"--model {path}"
    try:
        if path.lower().endswith(".safetensors"):
            return safetensors_header(path)
        import torch

        fix = "pass a .safetensors file of an SDXL, SD1.5 or Flux.1 model, or a diffusers directory"
        state = unwrap_state_dict(load_pickled(path, what, mmap=True, fix=fix), what, fix=fix)
        return {key: tuple(value.shape) for key, value in state.items()
                if isinstance(key, str) and isinstance(value, torch.Tensor)}
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file: one line either way
        raise UserError(f"--model {path}: not a readable checkpoint ({type(exc).__name__}); pass a .safetensors "
                        "file of an SDXL, SD1.5 or Flux.1 model, or a diffusers directory") from None


def checkpoint_family(path: str | Path) -> str:
    """'sdxl', 'sd15' or 'flux' from a single file's keys; any other model is one UserError naming what it is."""
    return checkpoint_kind(path).split("-")[0]


def checkpoint_kind(path: str | Path) -> str:
    """The shipped config a single file needs: 'sdxl', 'sd15', 'flux-dev' or 'flux-schnell', from its keys."""
    keys = checkpoint_keys(path)
    unet = "model.diffusion_model."

    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in keys)

    if has(unet + "joint_blocks.") or has("joint_blocks."):
        family = "Stable Diffusion 3"
    elif has(unet + "double_blocks.") or has("double_blocks."):
        family = "Flux"
    elif has("conditioner.embedders.1.model."):
        family = "sdxl"
    elif has("conditioner.embedders.0.model."):
        family = "an SDXL refiner"
    elif has("cond_stage_model.model."):
        family = "Stable Diffusion 2"
    elif has("cond_stage_model.transformer.") and has(unet):
        family = "sd15"
    else:
        raise UserError(f"--model {path}: not a Stable Diffusion checkpoint (no model.diffusion_model / text "
                        f"encoder keys in the original layout); {SUPPORTED}, or pass a diffusers directory")
    conv_in = keys.get(unet + "input_blocks.0.0.weight", (0, 4, 3, 3))
    if family in ("sdxl", "sd15") and len(conv_in) != 4:
        raise UserError(f"--model {path}: its {unet}input_blocks.0.0.weight has shape {tuple(conv_in)!r:.30} "
                        "(a convolution has 4 dimensions); the file is damaged: pass a sound checkpoint")
    in_channels = conv_in[1] if len(conv_in) > 1 else 4
    if family in ("sdxl", "sd15") and in_channels != 4:
        family = f"{'SDXL' if family == 'sdxl' else 'SD1.5'} inpainting ({in_channels} input channels)"
    if family == "Flux":
        if not str(path).lower().endswith(".safetensors"):
            raise UserError(f"--model {path}: Flux checkpoints are read as .safetensors only; save it as one")

        return f"flux-{flux_variant(keys)}"
    if family not in ("sdxl", "sd15"):
        raise UserError(f"--model {path}: is {family if family.startswith('an ') else 'a ' + family} checkpoint; "
                        f"{SUPPORTED}")
    return family


def shipped_config(kind: str) -> str:
    """The packaged diffusers config directory of ``kind`` (:func:`checkpoint_kind`; no weights)."""
    return str(CONFIGS / kind)


def tokenizer_dir(config_dir: str | Path, name: str) -> str:
    """``config_dir/name`` where it holds a tokenizer; else, for T5 (Flux's ``tokenizer_2``), the hub cache's; else
    the demo model's (CLIP's real vocabulary and merges; its tokenizer_2 pads with '!' as SDXL's does)."""
    own = Path(config_dir) / name
    if (own / "vocab.json").exists():  # a FIFO or folder there is refused by the loader, not swapped for the demo's
        return str(own)
    index = Path(config_dir) / "model_index.json"
    entry = (read_json_object(index, f"--model {config_dir}: model_index.json", "re-save the pipeline").get(name)
             if index.is_file() else None)
    if isinstance(entry, list) and str(entry[-1]).startswith("T5"):
        return t5_tokenizer_dir(config_dir)
    return str(Path(demo_model_dir()) / name)
