"""`cupscale caption`: the global caption and, per stage, one regional prompt per view (method.md step 6).

The output is the file format ``--regional-prompts`` reads. Views are the plan's, the ones the upscale will use; a
stage's crops are taken from the input resized to that stage's size (the upscale itself captions the previous
stage's output, which does not exist before the run).
"""

from __future__ import annotations

from PIL import Image

from ..captions.prompts import make_prompter, pixel_boxes
from ..config import UpscaleConfig
from ..method.resize import resize_input
from ..plan import Plan


def caption_views(image: Image.Image, config: UpscaleConfig, plan: Plan | None) -> dict:
    """``{"prompt": global caption, "stages": [{"stage", "size", "views": [{"box", "prompt"}]}]}``; the stages
    only with a ``plan`` (``--tiles``)."""
    prompter = make_prompter(config, beside_workers=False)  # no model workers: a captioner may take whole GPUs
    try:
        global_prompt = config.prompt or prompter.global_caption(image)
        result: dict = {"prompt": global_prompt, "stages": []}
        for stage in plan.stages if plan else []:
            boxes = pixel_boxes(stage.views, plan.vae_scale_factor)  # no diffusion model loaded here
            prompts = prompter.regional_prompts(stage.index, resize_input(image, stage.size, config), boxes,
                                                global_prompt)
            result["stages"].append({"stage": stage.index, "size": list(stage.size),
                                     "views": [{"box": b.tolist(), "prompt": p} for b, p in zip(boxes, prompts)]})
        return result
    finally:
        prompter.close()
