"""How a worker loads a model's modules (the driver never does): device, dtype, a diffusers directory or a single file."""

from __future__ import annotations

import importlib
import logging

import torch

from ..errors import UserError
from .hub import FAMILY_COMPONENTS, component_variant
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


def load_component(model_dir: str, name: str, dtype: torch.dtype, variant: str | None):
    """One component as model_index.json names its class, in ``variant`` where that component has its files."""
    library, class_name = read_json(model_dir, "model_index.json")[name]
    cls = getattr(importlib.import_module(library), class_name)
    if name.startswith(("tokenizer", "scheduler")):
        return cls.from_pretrained(model_dir, subfolder=name)
    return cls.from_pretrained(model_dir, subfolder=name, dtype=dtype,
                               variant=component_variant(model_dir, name, variant))


def load_pipeline(model_dir: str, device: torch.device, dtype: torch.dtype, variant: str | None = None,
                  model_config: str | None = None):
    """The family's diffusers pipeline built from its components (what a worker holds), on ``device``."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import logging as diffusers_logging

    configs = config_dir(model_dir, model_config)
    family = model_family(configs)
    if device.type == "cpu" and dtype == torch.float16:  # measured: a 320-channel 3x3 conv 31x slower than bf16
        log.warning("--dtype float16 on CPU has no fast kernels and runs many times slower; use bfloat16 or float32")
    diffusers_logging.disable_progress_bar()
    if is_single_file(model_dir):
        pipe = load_single_file(model_dir, configs, family, dtype)
    else:
        try:
            parts = {name: load_component(model_dir, name, dtype, variant) for name in FAMILY_COMPONENTS[family]}
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"--model {model_dir}: could not be loaded ({str(exc).splitlines()[0]}); "
                            "check the directory or use --model demo") from None
        if family == "sdxl":
            zeros = bool(read_json(model_dir, "model_index.json").get("force_zeros_for_empty_prompt", True))
            pipe = StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=zeros, add_watermarker=False)
        else:
            pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    if dtype == torch.float16 and family == "sdxl" and pipe.vae.config.force_upcast:
        pipe.vae.to(torch.float32)  # SDXL's VAE overflows in fp16; diffusers' SDXL pipelines upcast it, SD1.5's don't
    log.info("loaded %s (%s) on %s as %s", model_dir, family, device, dtype)
    return pipe


def load_single_file(path: str, configs: str, family: str, dtype: torch.dtype):
    """A single-file checkpoint through diffusers' ``from_single_file``, configured from ``configs`` only: offline
    (``local_files_only``), tokenizers from :func:`cupscale_dist.models.single_file.tokenizer_dir`."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    tokenizers = {name: CLIPTokenizer.from_pretrained(tokenizer_dir(configs, name))
                  for name in FAMILY_COMPONENTS[family] if name.startswith("tokenizer")}
    try:
        if family == "sdxl":
            zeros = bool(read_json(configs, "model_index.json").get("force_zeros_for_empty_prompt", True))
            return StableDiffusionXLPipeline.from_single_file(
                path, config=configs, local_files_only=True, torch_dtype=dtype, **tokenizers,
                force_zeros_for_empty_prompt=zeros, add_watermarker=False)
        return StableDiffusionPipeline.from_single_file(
            path, config=configs, local_files_only=True, torch_dtype=dtype, **tokenizers, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--model {path}: could not be loaded as a single-file {family} checkpoint "
                        f"({reason[:200]}); check the file, or give model_config for a model of other shapes") from None
