"""Regional semantic prior (method.md step 6): one prompt per view, from a captioner or a file.

Backends behind one interface (:class:`Prompter`): ``none`` (regional prompt = global prompt), a JSON file given
with ``--regional-prompts`` (the format ``cupscale caption --tiles`` prints), and the vision-language captioners
``vllm`` / ``transformers`` (:mod:`cupscale_dist.captions.captioner`).

The file's format and checks are in :mod:`cupscale_dist.captions.promptfile`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from .promptfile import check_view_count, read_prompt_file


class Prompter(Protocol):
    def global_caption(self, image: Image.Image) -> str: ...

    def regional_prompts(self, stage: int, image: Image.Image, boxes: np.ndarray, global_prompt: str) -> list[str]: ...

    def close(self) -> None: ...


def pixel_boxes(views: np.ndarray, vae_scale_factor: int) -> np.ndarray:
    """Latent views (top, left, bottom, right) -> pixel boxes (left, top, right, bottom), PIL's crop order."""
    return (views[:, [1, 0, 3, 2]] * vae_scale_factor).astype(np.int64)


class NoCaptioner:
    """Regional prompt = global prompt; no global caption (an empty prompt stays empty)."""

    def global_caption(self, image: Image.Image) -> str:
        return ""

    def regional_prompts(self, stage: int, image: Image.Image, boxes: np.ndarray, global_prompt: str) -> list[str]:
        return [global_prompt] * len(boxes)

    def close(self) -> None:
        pass


class FilePrompts(NoCaptioner):
    """Per-view prompts given by hand (``--regional-prompts FILE.json``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.data = read_prompt_file(self.path)

    def global_caption(self, image: Image.Image) -> str:
        return self.data.get("prompt", "")

    def regional_prompts(self, stage: int, image: Image.Image, boxes: np.ndarray, global_prompt: str) -> list[str]:
        entry = next((s for s in self.data.get("stages", []) if s.get("stage") == stage), None)
        if entry is None:
            return [global_prompt] * len(boxes)
        views = entry["views"]
        check_view_count(self.path, stage, len(views), len(boxes))
        return [v["prompt"] or global_prompt for v in views]


class VLMPrompter:
    """A vision-language captioner (vLLM actor pool or transformers) describing each view's crop."""

    def __init__(self, config, count_tokens=None, beside_workers: bool = True, start_timeout_s: float | None = None):
        from .captioner import VLMCaptioner, count_clip_tokens

        self.captioner = VLMCaptioner(
            config.captioner, config.captioner_model, pool_size=config.captioner_actors,
            gpus_per_actor=config.captioner_gpus, beside_workers=beside_workers, placement_timeout_s=start_timeout_s,
            max_new_tokens=config.caption_max_new_tokens, token_budget=config.caption_token_budget,
            instruction=config.caption_instruction, region_context=config.caption_region_context,
            timeout_s=config.caption_timeout_s, dtype=config.captioner_dtype,
            count_tokens=count_tokens or count_clip_tokens)

    def global_caption(self, image: Image.Image) -> str:
        return self.captioner.describe_image(image)

    def regional_prompts(self, stage: int, image: Image.Image, boxes: np.ndarray, global_prompt: str) -> list[str]:
        return self.captioner.describe_regions(image, [tuple(map(int, b)) for b in boxes], global_prompt)

    def close(self) -> None:
        self.captioner.close()


def make_prompter(config, count_tokens=None, beside_workers: bool = True,
                  start_timeout_s: float | None = None) -> Prompter:
    """The prompter the config asks for; a prompts file takes precedence over the captioner.

    ``count_tokens`` (text -> content tokens of the diffusion model's text encoder) fits captions to 77 tokens.
    ``beside_workers``: model workers share the GPUs (the captioner takes a part of a GPU, not a whole one);
    ``start_timeout_s``: how long the captioner pool may wait to be placed.
    """
    if config.regional_prompts:
        return FilePrompts(config.regional_prompts)
    if config.captioner == "none":
        return NoCaptioner()
    return VLMPrompter(config, count_tokens, beside_workers, start_timeout_s)
