"""`cupscale caption`: the global caption and, per stage, one regional prompt per view (method.md step 6).

The output is the file format ``--regional-prompts`` reads. Views are the ones the upscale will use; a stage's
crops are taken from the input resized to that stage's size (the upscale itself captions the previous stage's
output, which does not exist before the run).
"""

from __future__ import annotations

from PIL import Image

from .prompts import make_prompter, pixel_boxes
from ..config import UpscaleConfig
from ..plan import plan_stages
from ..method.resize import resize_input
from ..plan import stage_views, vae_scale


def caption_views(image: Image.Image, config: UpscaleConfig, tiles: bool) -> dict:
    """``{"prompt": global caption, "stages": [{"stage", "size", "views": [{"box", "prompt"}]}]}``."""
    prompter = make_prompter(config, beside_workers=False)  # no model workers: a captioner may take whole GPUs
    try:
        global_prompt = config.prompt or prompter.global_caption(image)
        result: dict = {"prompt": global_prompt, "stages": []}
        for stage, size in enumerate(plan_stages(image.size, config) if tiles else []):
            boxes = pixel_boxes(stage_views(size, config), vae_scale(config.model))  # no diffusion model loaded here
            prompts = prompter.regional_prompts(stage, resize_input(image, size, config), boxes, global_prompt)
            result["stages"].append({"stage": stage, "size": list(size),
                                     "views": [{"box": b.tolist(), "prompt": p} for b, p in zip(boxes, prompts)]})
        return result
    finally:
        prompter.close()
