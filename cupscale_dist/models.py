"""Model loading and the one calling contract the method uses (SDXL and SD1.5 families).

``--model`` is a hub id, a local diffusers directory, or ``demo`` (the embedded tiny SDXL built by
:mod:`cupscale_dist.testing`). Everything loads through diffusers ``from_pretrained``; the family is told apart
from ``model_index.json``. Actors load only the UNet (:func:`load_unet`); the driver loads the pipeline.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .attention import install_regional_processors
from .errors import UserError

log = logging.getLogger(__name__)

FAMILIES = {"StableDiffusionXLPipeline": "sdxl", "StableDiffusionXLImg2ImgPipeline": "sdxl",
            "StableDiffusionPipeline": "sd15", "StableDiffusionImg2ImgPipeline": "sd15"}


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


def resolve_model(model: str) -> str:
    """'demo' -> the embedded model dir; a local dir -> checked; a hub id -> the cached snapshot dir."""
    if model == "demo":
        from .testing import demo_model_dir

        return str(demo_model_dir())
    path = Path(model).expanduser()
    if path.exists() or model.startswith((".", "/", "~")):
        if not (path / "model_index.json").is_file():
            raise UserError(f"--model {model}: not a diffusers model directory (no model_index.json); "
                            "point --model at a saved pipeline, or use --model demo")
        return str(path)
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model, allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model"],
                                 ignore_patterns=["*.fp16.safetensors", "*.bin"])
    except Exception as exc:  # offline, unknown id, gated: one clear line either way
        reason = type(exc).__name__
        raise UserError(f"--model {model}: not available offline and could not be downloaded ({reason}); "
                        "use --model PATH for a local diffusers directory, or --model demo") from None


def model_family(model_dir: str) -> str:
    """'sdxl' or 'sd15', from model_index.json's pipeline class."""
    try:
        class_name = json.loads((Path(model_dir) / "model_index.json").read_text())["_class_name"]
    except (OSError, ValueError, KeyError):
        raise UserError(f"--model {model_dir}: model_index.json is unreadable; re-save the pipeline") from None
    if class_name not in FAMILIES:
        raise UserError(f"--model {model_dir}: {class_name} is not supported; use an SDXL or SD1.5 pipeline")
    return FAMILIES[class_name]


def load_unet(model: str, device: str = "auto", dtype: str = "auto"):
    """Only the UNet, with the regional attention processors installed (what a denoiser actor needs)."""
    from diffusers import UNet2DConditionModel

    dev = resolve_device(device)
    unet = UNet2DConditionModel.from_pretrained(resolve_model(model), subfolder="unet",
                                                dtype=resolve_dtype(dtype, dev))
    install_regional_processors(unet)
    return unet.to(dev).eval().requires_grad_(False)


@dataclass
class DiffusionModel:
    """The driver's view of a pipeline: components plus the few model-specific calls the method makes."""

    pipe: object
    family: str
    name: str
    device: torch.device
    dtype: torch.dtype

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        """The training resolution in pixels (1024 for SDXL, 512 for SD1.5)."""
        return self.unet.config.sample_size * self.vae_scale_factor

    def new_scheduler(self, kind: str):
        """A fresh scheduler of the chosen kind, configured from the model's own scheduler config."""
        from .schedulers import make_scheduler

        scheduler = make_scheduler(kind, self.pipe.scheduler.config)
        if scheduler.config.prediction_type != "epsilon":
            raise UserError(f"--model {self.name}: prediction_type {scheduler.config.prediction_type!r} is not "
                            "supported; use an epsilon-prediction model (SDXL base, SD1.5)")
        return scheduler

    def token_count(self, prompt: str) -> int:
        """Tokens of ``prompt`` including <start> and <end>, as the text encoder sees them (<= 77)."""
        tokenizer = self.pipe.tokenizer
        return len(tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids)

    def content_tokens(self, text: str) -> int:
        """Untruncated word-piece count of ``text`` (what a caption must fit into 75)."""
        return len(self.pipe.tokenizer.tokenize(text))

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(embeds (U, 77, D), pooled (U, Dp) or None for SD1.5), float32 on CPU: cut to 77 tokens."""
        if self.family == "sdxl":
            embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, device=self.device, do_classifier_free_guidance=False)
            return embeds.float().cpu(), pooled.float().cpu()
        embeds, _ = self.pipe.encode_prompt(prompts, self.device, 1, False)
        return embeds.float().cpu(), None

    @torch.no_grad()
    def encode_negative(self, negative_prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """CFG's unconditional embeddings; SDXL zeroes an empty negative prompt, as its pipeline does."""
        if self.family == "sdxl" and not negative_prompt and self.pipe.config.force_zeros_for_empty_prompt:
            embeds, pooled = self.encode_prompts([""])
            return torch.zeros_like(embeds), torch.zeros_like(pooled)
        return self.encode_prompts([negative_prompt])


def load_model(model: str, device: str = "auto", dtype: str = "auto") -> DiffusionModel:
    """Load a pipeline for the driver (text encoders, VAE, UNet with regional processors)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import logging as diffusers_logging

    model_dir = resolve_model(model)
    family = model_family(model_dir)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    diffusers_logging.disable_progress_bar()
    try:
        if family == "sdxl":
            pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, dtype=torch_dtype)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(model_dir, dtype=torch_dtype, safety_checker=None,
                                                           requires_safety_checker=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"--model {model}: could not be loaded ({str(exc).splitlines()[0]}); "
                        "check the directory or use --model demo") from None
    pipe.set_progress_bar_config(disable=True)
    pipe.to(dev)
    if torch_dtype == torch.float16 and getattr(pipe.vae.config, "force_upcast", False):
        pipe.vae.to(torch.float32)  # SDXL's VAE overflows in fp16, as diffusers' own pipeline knows
    install_regional_processors(pipe.unet)
    log.info("loaded %s (%s) on %s as %s", model, family, dev, torch_dtype)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return DiffusionModel(pipe, family, model, dev, torch_dtype)
