"""Stable Diffusion 1.x/2.x: one CLIP text encoder, no pooled embedding, no micro-conditioning."""

from __future__ import annotations

import numpy as np
import torch

from ..base import UNetBackbone


class SD15(UNetBackbone):
    family = "sd15"
    pipeline_names = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
    components = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
    single_file_keys = ("cond_stage_model.transformer.", "model.diffusion_model.")  # CLIP-L and the UNet
    single_file_name = "SD1.5"

    @staticmethod
    def pipeline_class():
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    @classmethod
    def pipeline_options(cls, model_index: dict) -> dict:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], max_tokens: int | None = None) -> tuple[np.ndarray, None]:
        """CLIP's 77 tokens (``max_tokens`` does not apply)."""
        embeds, _ = self.pipe.encode_prompt(prompts, self.pipe.device, 1, False)
        return embeds.float().cpu().numpy(), None
