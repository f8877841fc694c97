"""SDXL: two CLIP text encoders, a pooled embedding and micro-conditioning (``time_ids``) as added conditioning."""

from __future__ import annotations

import numpy as np
import torch

from ....method.step import StageContext
from ..base import UNetBackbone


def micro_conditioning(context: StageContext, rects: np.ndarray) -> torch.Tensor:
    """SDXL add_time_ids per view (method.md 9a): (original_size, crop top-left, target_size), in px.

    'global': ``(H, W, 0, 0, H, W)`` for every view, (H, W) the stage size (DemoFusion, diffusers' mixture-of-
    diffusers SDXL); 'per_view': original = stage size, crop top-left = view offset, target = view size.
    """
    f = context.vae_scale_factor
    if context.micro_conditioning == "global":
        rows = [[*context.image_hw, 0, 0, *context.image_hw]] * len(rects)
    else:
        rows = [[*context.image_hw, top * f, left * f, (bottom - top) * f, (right - left) * f]
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

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], max_tokens: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Both CLIP encoders' 77 tokens (``max_tokens`` does not apply)."""
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, device=self.pipe.device,
                                                       do_classifier_free_guidance=False)
        return embeds.float().cpu().numpy(), pooled.float().cpu().numpy()

    def added_conditioning(self, context: StageContext, prompt_ids: torch.Tensor, rects: np.ndarray,
                           cfg: bool = True) -> dict:
        count, device, dtype = len(prompt_ids), self.device, self.dtype
        pooled = (context.global_pooled.expand(count, -1) if context.pooled_prompt == "global"
                  else context.regional_pooled[prompt_ids])
        time_ids = micro_conditioning(context, rects).to(device)
        if not cfg:
            return {"text_embeds": pooled.to(device, dtype), "time_ids": time_ids.to(device, dtype)}
        return {"text_embeds": torch.cat([context.negative_pooled.expand(count, -1), pooled]).to(device, dtype),
                "time_ids": torch.cat([time_ids, time_ids]).to(device, dtype)}

    def probe_conditioning(self, pooled: torch.Tensor | None, height: int, width: int) -> dict:
        """Micro-conditioning of the native size, uncropped."""
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)
        return {"text_embeds": pooled.to(self.device, self.dtype), "time_ids": time_ids.to(self.device, self.dtype)}
