"""How a worker loads a model's modules (the driver never does): device, dtype, a diffusers directory or a single
file."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import torch

from ..errors import UserError
from .backbones import backbone_class
from .hub import component_variant
from .single_file import is_single_file, tokenizer_dir
from .spec import config_dir, model_family, read_json

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is visible here; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a torch device; use auto, cpu or cuda[:N]") from None


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise UserError(f"--dtype {dtype!r} is unknown; use auto, float32, bfloat16 or float16")
    return table[dtype]


def load_component(model_dir: str, name: str, dtype: torch.dtype, variant: str | None, streamed_fp8: bool = False):
    """One component as model_index.json names its class, in ``variant`` where that component has its files
    (``streamed_fp8``: stored in fp8 as it is read, :mod:`cupscale_dist.models.fp8_loading`)."""
    library, class_name = read_json(model_dir, "model_index.json")[name]
    cls = getattr(importlib.import_module(library), class_name)
    if name.startswith(("tokenizer", "scheduler")):
        return cls.from_pretrained(model_dir, subfolder=name)
    variant = component_variant(model_dir, name, variant)
    if streamed_fp8:
        from .fp8_loading import load_denoiser_fp8

        return load_denoiser_fp8(cls, Path(model_dir) / name, variant, dtype)
    return cls.from_pretrained(model_dir, subfolder=name, dtype=dtype, variant=variant)


def load_pipeline(model_dir: str, device: torch.device, dtype: torch.dtype, variant: str | None = None,
                  model_config: str | None = None, weights: str = "full"):
    """The family's diffusers pipeline built from its components (what a worker holds), on ``device``.
    ``weights='fp8'``: a diffusers directory's UNet is read straight into fp8 storage (never whole in ``dtype``)."""
    from diffusers.utils import logging as diffusers_logging

    configs = config_dir(model_dir, model_config)
    family = model_family(configs)
    backbone = backbone_class(family)
    if device.type == "cpu" and dtype == torch.float16:  # measured: a 320-channel 3x3 conv 31x slower than bf16
        log.warning("--dtype float16 on CPU has no fast kernels and runs many times slower; use bfloat16 or float32")
    diffusers_logging.disable_progress_bar()
    if is_single_file(model_dir):
        pipe = load_single_file(model_dir, configs, family, dtype)
    else:
        try:
            streamed = {"unet"} if weights == "fp8" else set()
            parts = {name: load_component(model_dir, name, dtype, variant, streamed_fp8=name in streamed)
                     for name in backbone.components}
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"--model {model_dir}: could not be loaded ({(str(exc).splitlines() or [''])[0][:120]}); "
                            "check the directory or use --model demo") from None
        pipe = backbone.pipeline_class()(**parts, **backbone.pipeline_options(read_json(model_dir, "model_index.json")))
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    if dtype == torch.float16 and backbone.upcast_vae_in_fp16 and pipe.vae.config.force_upcast:
        pipe.vae.to(torch.float32)
    log.info("loaded %s (%s) on %s as %s", model_dir, family, device, dtype)
    return pipe


def load_single_file(path: str, configs: str, family: str, dtype: torch.dtype):
    """A single-file checkpoint through diffusers' ``from_single_file``, configured from ``configs`` only: offline
    (``local_files_only``), tokenizers from :func:`cupscale_dist.models.single_file.tokenizer_dir`."""
    import transformers

    backbone = backbone_class(family)
    index = read_json(configs, "model_index.json")
    tokenizers = {name: getattr(transformers, index[name][1]).from_pretrained(tokenizer_dir(configs, name))
                  for name in backbone.components if name.startswith("tokenizer")}
    options = backbone.pipeline_options(index)
    try:
        return backbone.load_single_file(path, configs, dtype, tokenizers, options,
                                         lambda name: load_component(configs, name, dtype, None))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--model {path}: could not be loaded as a single-file {family} checkpoint "
                        f"({reason[:200]}); check the file, or give model_config for a model of other shapes") from None
