"""The C-Upscale pipeline, stage by stage, as method.md numbers it.

``upscale(image, config)`` is the single-process reference. The Ray driver calls the same function with its
own ``predictor`` (which fans the views out to actors); everything else — stages, scheduler, prior, reduction —
is this code in both paths.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter
from tqdm.auto import tqdm

from .captioner import Prompter, make_prompter, pixel_boxes
from .config import UpscaleConfig
from .masks import binarize_maps, content_token_mask, probe_attention_maps, view_token_masks
from .models import DiffusionModel, load_model
from .prior import GlobalPrior
from .step import StageContext, StageSchedule, predict_views, reduce_and_step
from .vae import configure_tiling, decode_image, decode_latents, encode_image, encode_pixels, image_to_tensor
from .views import jitter_views, make_views, view_batches
from .wavelets import low_band

log = logging.getLogger(__name__)
SIZE_MULTIPLE = 64  # stage sizes in px: latent divisible by 2**3, the deepest DWT allowed (dwt_levels <= 3)

StepCallback = Callable[[dict], None]


# ---------------------------------------------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------------------------------------------
def plan_stages(input_size: tuple[int, int], config: UpscaleConfig) -> list[tuple[int, int]]:
    """Stage sizes (W, H): x2 per stage up to the target, each rounded to a multiple of 64 px ('Stages')."""
    width, height = input_size
    target = config.size or (width * config.scale, height * config.scale)
    ratio = max(target[0] / width, target[1] / height)
    if ratio <= 1:
        raise ValueError(f"size {target[0]}x{target[1]} is not larger than the input {width}x{height}")
    count = max(1, math.ceil(math.log2(ratio) - 1e-9))
    rounded = lambda v: max(SIZE_MULTIPLE, int(round(v / SIZE_MULTIPLE)) * SIZE_MULTIPLE)  # noqa: E731
    return [(rounded(target[0] / 2 ** (count - k)), rounded(target[1] / 2 ** (count - k))) for k in range(1, count + 1)]


def target_size(input_size: tuple[int, int], config: UpscaleConfig) -> tuple[int, int]:
    return config.size or (input_size[0] * config.scale, input_size[1] * config.scale)


def denoising_steps(config: UpscaleConfig) -> int:
    """S = round(s * T): the number of steps actually run per stage (method.md step 4)."""
    return int(round(config.strength * config.steps))


# ---------------------------------------------------------------------------------------------------------------
# Predictors: how a step's views become predictions. The reference runs them here; the Ray driver fans out.
# ---------------------------------------------------------------------------------------------------------------
class LocalPredictor:
    """Runs :func:`predict_views` in-process over fixed view batches, yielding them in view order."""

    def __init__(self, unet, batch_size: int):
        self.unet, self.batch_size, self.context = unet, batch_size, None

    def start_stage(self, context: StageContext) -> None:
        self.context = context.to(self.unet.device, self.unet.dtype)

    def predict(self, latents: torch.Tensor, views: np.ndarray, timestep, input_scale: float,
                step: int) -> Iterable[tuple[Sequence[int], torch.Tensor]]:
        for batch in view_batches(len(views), self.batch_size):
            rects = views[batch.start : batch.stop]
            windows = torch.stack([latents[0, :, t:b, l:r] for t, l, b, r in rects])
            yield batch, predict_views(self.unet, windows, timestep, input_scale, self.context, batch, rects)

    def close(self) -> None:
        self.context = None


# ---------------------------------------------------------------------------------------------------------------
# One stage
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class StageState:
    """Where a stage is: the latent before ``step`` (what a checkpoint stores)."""

    stage: int
    step: int
    latents: torch.Tensor


class PixelCodec:
    """prior_space='pixel': the VAE round trip around the low-band swap (costly: one decode+encode per step)."""

    def __init__(self, vae):
        self.vae = vae

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_latents(self.vae, latents)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return encode_pixels(self.vae, pixels)


def resize_input(image: Image.Image, size: tuple[int, int], config: UpscaleConfig) -> Image.Image:
    """Step 1: resize to the stage size, then optional unsharp mask."""
    resample = {"bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}[config.resize]
    out = image.resize(size, resample)
    if config.sharpen > 0:
        out = out.filter(ImageFilter.UnsharpMask(radius=config.sharpen_radius, percent=int(config.sharpen * 100), threshold=0))
    return out


def stage_generator(seed: int, stage: int, purpose: int = 0) -> torch.Generator:
    """Noise source for one stage: drawn once for the whole latent from the seed, never per actor."""
    return torch.Generator().manual_seed(seed * 1_000_003 + stage * 101 + purpose)


@torch.no_grad()
def attention_token_masks(model: DiffusionModel, config: UpscaleConfig, image: Image.Image, stage: int,
                          global_prompt: str, global_embeds, global_pooled, latent_hw, views):
    """Step 7: probe at native size -> binary per-token maps -> per-view masks (view) or the maps (pixel)."""
    content = content_token_mask(model.token_count(global_prompt), global_embeds.shape[1])
    if config.mask_mode == "off" or not content.any():
        return None, None
    native = model.native_size
    probe_latent = encode_pixels(model.vae, image_to_tensor(image.resize((native, native), Image.Resampling.BICUBIC)))
    scheduler = model.new_scheduler(config.scheduler)
    timestep = int(config.attn_probe_t * (scheduler.config.num_train_timesteps - 1))
    alpha_bar = float(scheduler.alphas_cumprod[timestep])
    noise = torch.randn(probe_latent.shape, generator=stage_generator(config.seed, stage, purpose=1))
    noisy = math.sqrt(alpha_bar) * probe_latent + math.sqrt(1 - alpha_bar) * noise  # the UNet's input space
    added = None
    if global_pooled is not None:
        time_ids = torch.tensor([[native, native, 0, 0, native, native]], dtype=torch.float32)
        added = {"text_embeds": global_pooled.to(model.device, model.dtype), "time_ids": time_ids.to(model.device, model.dtype)}
    attention = probe_attention_maps(model.unet, noisy.to(model.device), timestep, global_embeds.to(model.device), added)
    maps = binarize_maps(attention, content)
    if config.mask_mode == "pixel":
        return None, maps
    return view_token_masks(maps, latent_hw, views, config.mask_threshold), None


def run_stage(model: DiffusionModel, config: UpscaleConfig, image: Image.Image, stage: int, size: tuple[int, int],
              prompter: Prompter, global_prompt: str, predictor, callback: StepCallback | None = None,
              resume: StageState | None = None, progress: bool = True) -> Image.Image:
    """One x2 stage of method.md (steps 1-10); returns the stage output image."""
    # 1. Resize (+ sharpen) the stage input.
    image = resize_input(image, size, config)
    # 2. Encode with the tiled VAE (tile by tile from the 8-bit image).
    z_low = encode_image(model.vae, image, config.vae_tile, config.vae_tile_overlap)
    latent_hw = tuple(z_low.shape[-2:])
    # 4. Start point: S = round(s T) remaining steps, z_S = add_noise(z_L, eps, t_S); noise drawn once per stage.
    scheduler = model.new_scheduler(config.scheduler)
    scheduler.set_timesteps(config.steps, device="cpu")
    start = config.steps - denoising_steps(config)
    noise = torch.randn(z_low.shape, generator=stage_generator(config.seed, stage))
    # 3. Global structure prior G = LL(z_L) (or of the pixels, prior_space='pixel').
    if config.prior_space == "latent":
        prior, codec = GlobalPrior.from_latent(z_low, noise, config.wavelet, config.dwt_levels), None
    else:  # the pixel-space prior needs full float pixels (and a VAE round trip per step)
        low = low_band(image_to_tensor(image), config.wavelet, config.dwt_levels)
        configure_tiling(model.vae, config.vae_tile, config.vae_tile_overlap)
        prior, codec = GlobalPrior(low, torch.zeros_like(low), config.wavelet, config.dwt_levels), PixelCodec(model.vae)
    schedule = StageSchedule(scheduler, start, prior, config.prior_target, config.prior_fraction,
                             config.prior_schedule, codec)
    if schedule.num_steps == 0:
        return image
    if hasattr(scheduler, "set_begin_index"):  # stateful (Euler) schedulers count steps from here
        scheduler.set_begin_index(start + (resume.step if resume else 0))
    latents = resume.latents.clone() if resume else scheduler.add_noise(z_low, noise, scheduler.timesteps[start : start + 1])
    # 5. Views.
    views = make_views(*latent_hw, config.tile, config.stride)
    # 6. Regional prompts, encoded once per unique prompt.
    prompts = prompter.regional_prompts(stage, image, pixel_boxes(views, model.vae_scale_factor), global_prompt)
    if not config.keep_captioner:
        prompter.close()  # the captioner pool's GPU memory goes back to the UNet; its cache stays
    unique = sorted(set(prompts))
    view_prompt = np.array([unique.index(p) for p in prompts], dtype=np.int64)
    regional_embeds, regional_pooled = model.encode_prompts(unique)
    global_embeds, global_pooled = model.encode_prompts([global_prompt])
    negative_embeds, negative_pooled = model.encode_negative(config.negative_prompt)
    # 7. Regional attention masks from the attention probe.
    token_allowed, token_maps = attention_token_masks(model, config, image, stage, global_prompt, global_embeds,
                                                      global_pooled, latent_hw, views)
    # 8. The composer's inputs travel in the stage context (used inside every cross-attention layer).
    context = StageContext(negative_embeds, global_embeds, regional_embeds, view_prompt, negative_pooled,
                           global_pooled, regional_pooled, token_allowed, token_maps, latent_hw,
                           (size[1], size[0]), model.vae_scale_factor, config.guidance_scale,
                           config.lambda_global, config.composer, config.pooled_prompt)
    predictor.start_stage(context)
    # 9. Denoising loop: predict every view, reduce + prior, one scheduler step on the whole latent.
    first = resume.step if resume else 0
    bar = tqdm(total=schedule.num_steps, initial=first, disable=not progress, unit="step",
               desc=f"stage {stage + 1} {size[0]}x{size[1]} ({len(views)} views)")
    for step in range(first, schedule.num_steps):
        step_views = jitter_views(views, *latent_hw, config.jitter, np.random.default_rng([config.seed, stage, step]))
        batches = predictor.predict(latents, step_views, schedule.timestep(step), schedule.input_scale(step), step)
        latents = reduce_and_step(latents, batches, step_views, schedule, step, config.blend, config.gaussian_sigma)
        bar.update(1)
        if callback is not None:
            callback({"stage": stage, "step": step + 1, "num_steps": schedule.num_steps, "latents": latents,
                      "timestep": schedule.timestep(step)})
    bar.close()
    # 10. Decode with the tiled VAE (band by band into 8 bits).
    return decode_image(model.vae, latents, config.vae_tile, config.vae_tile_overlap)


# ---------------------------------------------------------------------------------------------------------------
# All stages
# ---------------------------------------------------------------------------------------------------------------
def upscale(image: Image.Image, config: UpscaleConfig, *, model: DiffusionModel | None = None, predictor=None,
            callback: StepCallback | None = None, resume: StageState | None = None, stage_inputs: dict | None = None,
            progress: bool = True) -> Image.Image:
    """Upscale ``image`` by ``config.scale`` (or to ``config.size``) in x2 stages (method.md 'Stages').

    Args:
        image (PIL.Image): RGB input.
        config (UpscaleConfig): every knob of the method.
        model (DiffusionModel, *optional*): a loaded model; loaded from ``config.model`` if omitted.
        predictor (*optional*): fans out view predictions (``LocalPredictor`` if omitted; the Ray driver passes its own).
        callback (*optional*): called after every step with ``{"stage", "step", "num_steps", "latents", "timestep"}``.
        resume (StageState, *optional*): continue a stage from a checkpointed latent;
        stage_inputs (dict, *optional*): ``{stage: input image}`` of finished stages, needed with ``resume``.
    """
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    prompter = None
    input_size = image.size
    try:  # whatever fails, the predictor (a Ray actor pool) and the captioner pool are released
        model = model or load_model(config.model, config.device, config.dtype)
        predictor = predictor or LocalPredictor(model.unet, config.view_batch_size)
        prompter = make_prompter(config, count_tokens=model.content_tokens)
        global_prompt = config.prompt or prompter.global_caption(image)
        sizes = plan_stages(image.size, config)
        first = resume.stage if resume else 0
        if resume is not None:
            image = stage_inputs[first]
        for stage in range(first, len(sizes)):
            if callback is not None:
                callback({"stage": stage, "step": 0, "stage_input": image})
            image = run_stage(model, config, image, stage, sizes[stage], prompter, global_prompt, predictor,
                              callback, resume if resume and resume.stage == stage else None, progress)
    finally:
        if prompter is not None:
            prompter.close()
        if predictor is not None:
            predictor.close()
    final = target_size(input_size, config)
    return image if image.size == final else image.resize(final, Image.Resampling.LANCZOS)
