"""SDXL: two CLIP text encoders, a pooled embedding and micro-conditioning (``time_ids``) as added conditioning."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ....method.step import StageContext
from ..base import PooledStage, UNetBackbone


@dataclass(frozen=True)
class SDXLStage(PooledStage):
    """SDXL's part of the stage context (``StageContext.family``): the pooled embeddings (:class:`PooledStage`) and
    what its micro-conditioning reads."""

    image_hw: tuple[int, int]  # original_size: the stage size in px (H, W)
    micro_conditioning: str = "global"  # time_ids: 'global' one (H, W, 0, 0, H, W), 'per_view' crop offsets


def micro_conditioning(context: StageContext, rects: np.ndarray) -> torch.Tensor:
    """SDXL add_time_ids per view (method.md 9a): (original_size, crop top-left, target_size), in px.

    'global': ``(H, W, 0, 0, H, W)`` for every view, (H, W) the stage size (DemoFusion, diffusers' mixture-of-
    diffusers SDXL); 'per_view': original = stage size, crop top-left = view offset, target = view size.
    """
    f, sdxl = context.vae_scale_factor, context.family
    if sdxl.micro_conditioning == "global":
        rows = [[*sdxl.image_hw, 0, 0, *sdxl.image_hw]] * len(rects)
    else:
        rows = [[*sdxl.image_hw, top * f, left * f, (bottom - top) * f, (right - left) * f]
                for top, left, bottom, right in rects]
    return torch.tensor(rows, dtype=torch.float32)


class SDXL(UNetBackbone):
    family = "sdxl"
    pipeline_names = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
    components = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")
    upcast_vae_in_fp16 = True  # SDXL's VAE overflows in fp16; diffusers' SDXL pipelines upcast it, SD1.5's don't
    single_file_keys = ("conditioner.embedders.1.model.",)  # the OpenCLIP text encoder (a refiner has it as 0)
    single_file_name = "SDXL"

    @staticmethod
    def pipeline_class():
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    @classmethod
    def pipeline_options(cls, model_index: dict) -> dict:
        zeros = bool(model_index.get("force_zeros_for_empty_prompt", True))
        return {"force_zeros_for_empty_prompt": zeros, "add_watermarker": False}

    @classmethod
    def stage_fields(cls, config, image_hw: tuple[int, int], pooled: tuple) -> SDXLStage:
        """The pooled embeddings (``pooled_prompt``) and the micro-conditioning (``micro_conditioning``, the stage
        size as original_size)."""
        return SDXLStage(*pooled, config.pooled_prompt, image_hw, config.micro_conditioning)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], max_tokens: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Both CLIP encoders' 77 tokens (``max_tokens`` does not apply)."""
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, device=self.pipe.device,
                                                       do_classifier_free_guidance=False)
        return embeds.float().cpu().numpy(), pooled.float().cpu().numpy()

    def added_conditioning(self, context: StageContext, prompt_ids: torch.Tensor, rects: np.ndarray,
                           cfg: bool = True) -> dict:
        device, dtype = self.device, self.dtype
        pooled = context.family.pooled(prompt_ids, cfg)
        time_ids = micro_conditioning(context, rects).to(device)
        if not cfg:
            return {"text_embeds": pooled.to(device, dtype), "time_ids": time_ids.to(device, dtype)}
        return {"text_embeds": pooled.to(device, dtype), "time_ids": torch.cat([time_ids, time_ids]).to(device, dtype)}

    def probe_conditioning(self, pooled: torch.Tensor | None, height: int, width: int) -> dict:
        """Micro-conditioning of the native size, uncropped."""
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)
        return {"text_embeds": pooled.to(self.device, self.dtype), "time_ids": time_ids.to(self.device, self.dtype)}
