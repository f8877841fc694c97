"""Single-file checkpoints (``--model finetune.safetensors``): A1111/ComfyUI files in the original Stability layout.

The family is read from the file's keys alone (a safetensors header; a ``.ckpt`` is memory-mapped, not read), so the
driver holds no weights. SDXL base, SD1.5 and Flux.1 (dev, schnell: :mod:`.flux_single_file`) files and Z-Image
transformer files (:mod:`.backbones.zimage.single_file`: their text encoder, tokenizer and VAE from ``model_config``
or the hub cache) are accepted; an SDXL refiner, SD2, SD3 or anything else is refused in one line. Their diffusers
configs ship with the package (``single_file_configs/sdxl``, ``/sd15``, ``/flux-dev``, ``/flux-schnell``: the
published models' own values), so loading never touches the network; ``model_config`` names another diffusers config
directory for a file of other shapes (and, for a transformer-only Flux file, holds its VAE and text encoders). The
CLIP tokenizers are the demo model's files (CLIP's real 49,408-token vocabulary), used wherever a config directory
has no tokenizer of its own; T5's comes from the config directory or the hub cache
(:func:`.backbones.flux.header.t5_tokenizer_dir`).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError
from ..files.userfile import read_json_object
from .backbones import BACKBONES
from .backbones.base import TOKENIZER_FILES, UnsupportedFile, has_prefix
from .demo_dir import demo_model_dir
from .weightfiles import checkpoint_keys

CONFIGS = Path(__file__).resolve().parent / "single_file_configs"  # {family}/model_index.json, unet/, vae/, ...
SUFFIXES = (".safetensors", ".ckpt")
SUPPORTED = "single files of SDXL, SD1.5 and Flux.1 are supported, and Z-Image transformer files"


def is_single_file(model: str | Path) -> bool:
    """A path to a ``.safetensors`` / ``.ckpt`` file (not a diffusers directory)."""
    path = Path(os.path.expanduser(model))
    return path.suffix.lower() in SUFFIXES and path.is_file()


def checkpoint_family(path: str | Path) -> str:
    """'sdxl', 'sd15' or 'flux' from a single file's keys; any other model is one UserError naming what it is."""
    return checkpoint_kind(path).split("-")[0]


# Single files of models this project does not run, by the key prefixes that tell them apart (any of them): what a
# refusal calls them. The families' own files are told by each family (Backbone.single_file_kind).
UNSUPPORTED = ((("model.diffusion_model.joint_blocks.", "joint_blocks."), "Stable Diffusion 3"),
               (("conditioner.embedders.0.model.",), "an SDXL refiner"),
               (("cond_stage_model.model.",), "Stable Diffusion 2"))


def unsupported(path: str | Path, what: str) -> UserError:
    """The one line for a single file of a model this project does not run (``what``: 'Stable Diffusion 2')."""
    return UserError(f"--model {path}: is {what if what.startswith('an ') else 'a ' + what} checkpoint; {SUPPORTED}")


def checkpoint_kind(path: str | Path) -> str:
    """The shipped config a single file needs ('sdxl', 'sd15', 'flux-dev' or 'flux-schnell': its family's
    :meth:`~cupscale_dist.models.backbones.base.Backbone.single_file_kind`), from its keys."""
    keys = checkpoint_keys(path)
    for prefixes, what in UNSUPPORTED:
        if any(has_prefix(keys, prefix) for prefix in prefixes):
            raise unsupported(path, what)
    for backbone in BACKBONES.values():
        try:
            kind = backbone.single_file_kind(keys, str(path))
        except UnsupportedFile as exc:  # the family's file of a kind this project cannot run (inpainting)
            raise unsupported(path, exc.what) from None
        if kind is not None:
            return kind
    raise UserError(f"--model {path}: not a Stable Diffusion checkpoint (no model.diffusion_model / text "
                    f"encoder keys in the original layout); {SUPPORTED}, or pass a diffusers directory")


def shipped_config(kind: str) -> str:
    """The packaged diffusers config directory of ``kind`` (:func:`checkpoint_kind`; no weights), or where the
    kind's family finds its configs (Z-Image: the hub cache's pipeline,
    :meth:`~cupscale_dist.models.backbones.base.Backbone.single_file_configs`)."""
    for backbone in BACKBONES.values():
        where = backbone.single_file_configs(kind)
        if where is not None:
            return where
    return str(CONFIGS / kind)


def tokenizer_dir(config_dir: str | Path, name: str) -> str:
    """``config_dir/name`` where it holds a tokenizer (:data:`TOKENIZER_FILES`); else where its family finds it
    (Flux's T5: the hub cache, :meth:`~cupscale_dist.models.backbones.base.Backbone.tokenizer_elsewhere`); else
    the demo model's (CLIP's real vocabulary and merges; its tokenizer_2 pads with '!' as SDXL's does)."""
    own = Path(config_dir) / name
    # vocab.json (CLIP's, Qwen's) or tokenizer.json alone (a fast tokenizer's one file: Qwen's can ship only it); a
    # FIFO or folder there is refused by the loader, not swapped for the demo's
    if any((own / file).exists() for file in TOKENIZER_FILES):
        return str(own)
    index = Path(config_dir) / "model_index.json"
    entry = (read_json_object(index, f"--model {config_dir}: model_index.json", "re-save the pipeline").get(name)
             if index.is_file() else None)
    for backbone in BACKBONES.values():  # a family whose tokenizer is found elsewhere (Flux's T5: the hub cache)
        where = backbone.tokenizer_elsewhere(config_dir, name, entry)
        if where is not None:
            return where
    return str(Path(demo_model_dir()) / name)
