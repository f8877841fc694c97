"""The C-Upscale pipeline, stage by stage, as method.md numbers it.

``upscale(image, config)`` is the single-process reference. The Ray driver calls the same function with its own
*executor* (:class:`cupscale_dist.execution.pool.RayExecutor`), which runs every forward pass — UNet views, VAE tiles,
text encoders, the attention probe — on actors; everything else (stages, scheduler, prior, reduction, blending) is
this code in both paths, and it holds no model weights: only latents, prompts and 8-bit image bands.

Three tiles, three units (the knobs keep their names): views are ``tile`` latent px (``tile_latent``), the VAE runs
on ``vae_tile`` image px (``vae_tile_px``), the upscale model on ``upscale_model_tile`` input px (method/resize.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypedDict

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .captions.prompts import Prompter, make_prompter, pixel_boxes
from .config import UpscaleConfig
from .execution.contract import Executor
from .execution.executor import LocalExecutor, open_executor
from .execution.partloop import DenoiseJob
from .execution.partowner import PixelStart
from .execution.worker import ModelWorker
from .method.masks import binarize_maps, view_token_masks
from .method.prior import GlobalPrior, stage_generator, stage_noise, stage_start
from .method.resize import prior_picture, resize_input
from .method.schedulers import kind_of
from .method.step import StageContext, StageSchedule, check_finite_latent, is_finite, reduce_and_step
from .method.vae import (
    PixelCodec,
    TileGrid,
    decode_bands,
    encode_image,
    image_to_tensor,
    latent_tiles,
    read_only_tensor,
)
from .method.views import step_views, view_batches
from .method.wavelets import low_band
from .models.backbones import backbone_class
from .models.controlnet import control_crops
from .plan import Plan, StagePlan, make_plan

log = logging.getLogger(__name__)

class StepInfo(TypedDict):
    """What a step callback receives, one shape: at a stage's start (``step`` 0) its input image and no latent;
    while the stage is prepared (``step`` 0, no input, no ``gather``) between its forward passes, so a cancel raised
    there stops it; after each step the latent it produced (``step`` = steps done in the stage) and that step's
    timestep."""

    stage: int
    step: int
    num_steps: int
    timestep: torch.Tensor | None  # of the step just done; None at the stage's start
    # () -> (the whole latent after ``step`` steps, what a multistep scheduler carries to the next step or None);
    # None at the stage's start. A call, not a value: with the latent on the workers it is gathered (a checkpoint).
    gather: Callable[[], tuple[torch.Tensor, dict | None]] | None
    stage_input: Image.Image | None  # the image the stage starts from (what a resume redoes steps 1-8 from); start only


StepCallback = Callable[[StepInfo], None]
BandSink = Callable[[Iterator[np.ndarray]], object]  # consumes a stage output's uint8 bands, top to bottom


# ---------------------------------------------------------------------------------------------------------------
# One stage
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class StageState:
    """Where a stage is: the latent before ``step`` (what a checkpoint stores)."""

    stage: int
    step: int
    latents: torch.Tensor
    scheduler_state: dict | None = None  # a multistep scheduler's memory (schedulers.SchedulerKind.state)


def attention_token_masks(executor, config: UpscaleConfig, image: Image.Image, stage: int, global_prompt: str,
                          global_embeds: torch.Tensor, global_pooled: torch.Tensor | None, latent_hw, views):
    """Step 7: probe at native size (on a worker) -> binary per-token maps -> per-view masks (view) or the maps
    (pixel). The driver draws the probe's noise from the seed and binarises; the worker runs VAE + UNet."""
    spec = executor.spec
    content = spec.content_tokens_mask(global_prompt, global_embeds.shape[1])
    if config.mask_mode == "off" or not content.any():
        return None, None
    native = spec.native_size
    pixels = np.asarray(image.resize((native, native), Image.Resampling.BICUBIC))
    scheduler = spec.new_scheduler(config.scheduler, config.timestep_spacing, config.karras_sigmas)
    timestep = int(config.attn_probe_t * (scheduler.config.num_train_timesteps - 1))
    # a flow-matching probe noises to sigma = timestep / 1000 itself; alpha_bar is a VP schedule's notion
    alpha_bar = 0.0 if kind_of(scheduler).predicts_velocity else float(scheduler.alphas_cumprod[timestep])
    latent_shape = (1, spec.latent_channels, native // spec.vae_scale_factor, native // spec.vae_scale_factor)
    noise = torch.randn(latent_shape, generator=stage_generator(config.seed, stage, purpose=1)).numpy()
    pooled = None if global_pooled is None else global_pooled.numpy()
    call = (pixels, noise, timestep, alpha_bar, global_embeds.numpy(), pooled)
    (attention,) = executor.map("probe", [call])
    attention = read_only_tensor(attention)
    maps = binarize_maps(attention, content)
    if config.mask_mode == "pixel":
        return None, maps
    return view_token_masks(maps, latent_hw, views, config.mask_threshold), None


def predict_step(executor, context, latents: torch.Tensor, views: np.ndarray, timestep,
                 input_scale: float, control: np.ndarray | None = None) -> Iterator[tuple[range, torch.Tensor]]:
    """9a: every view's prediction, in fixed batches of ``executor.batch_size`` views, yielded in view order.

    Only each batch's windows leave the driver (and, with a ControlNet, each view's own crop of the stage input
    ``control``, uint8 HxWx3); ``context`` is the stage context as ``executor.share`` made it.
    """
    host = latents[0].numpy()
    batches = view_batches(len(views), executor.batch_size)

    def call(batch: range) -> tuple:
        rects = views[batch.start : batch.stop]
        args = (context, np.stack([host[:, t:b, l:r] for t, l, b, r in rects]), float(timestep), input_scale,
                np.arange(batch.start, batch.stop), rects)
        return args if control is None else (*args, control_crops(control, rects, executor.spec.vae_scale_factor))

    calls = (call(batch) for batch in batches)
    for batch, eps in zip(batches, executor.map("predict", calls)):
        yield batch, read_only_tensor(eps)  # only read by the reduction


def warm_up_compiled(executor, context, channels: int, views: np.ndarray, timestep, input_scale: float,
                     control: np.ndarray | None) -> None:
    """compile=true: every worker runs one batch of each size the loop sends (zeros, results dropped), so inductor
    compiles before the progress bar starts and the bar's rate is the compiled one."""
    top, left, bottom, right = views[0]  # every view has the tile's size
    calls = []
    for size in sorted({len(batch) for batch in view_batches(len(views), executor.batch_size)}):
        rects = views[:size]
        windows = np.zeros((size, channels, bottom - top, right - left), dtype=np.float32)
        args = (context, windows, float(timestep), input_scale, np.arange(size), rects)
        crops = () if control is None else (control_crops(control, rects, executor.spec.vae_scale_factor),)
        calls.append((*args, *crops))
    log.info("compiling the UNet's repeated blocks on every worker (batch sizes %s)", [len(c[1]) for c in calls])
    executor.broadcast("warm_up", calls)


@dataclass
class StagePrompts:
    """Step 6's output for one stage: unique prompts' embeddings and each view's index into them."""

    view_prompt: np.ndarray  # (N,) int64
    regional: tuple[torch.Tensor, torch.Tensor | None]  # (embeds (U, 77, D), pooled (U, Dp) or None)
    global_: tuple[torch.Tensor, torch.Tensor | None]
    negative: tuple[torch.Tensor, torch.Tensor | None]


def encode_stage_prompts(executor, config: UpscaleConfig, stage: StagePlan, image: Image.Image, prompter: Prompter,
                         global_prompt: str) -> StagePrompts:
    """Step 6: a regional prompt per view (a file or the captioner, on the view's pixel crop), encoded once per
    unique prompt (in bounded chunks, on the workers), beside the global and the negative prompt."""
    prompts = prompter.regional_prompts(stage.index, image, pixel_boxes(stage.views, executor.spec.vae_scale_factor),
                                        global_prompt)
    if not config.keep_captioner:
        prompter.close()  # the captioner pool's GPU memory goes back to the UNet; its cache stays
    unique = sorted(set(prompts))
    view_prompt = np.array([unique.index(p) for p in prompts], dtype=np.int64)
    tokens = config.max_sequence_length  # each family takes what its encoder can use of it (CLIP: 77, fixed)
    regional = encode_prompts(executor, unique, tokens)
    global_ = encode_prompts(executor, [global_prompt], tokens)
    return StagePrompts(view_prompt, regional, global_, encode_negative(executor, config.negative_prompt, tokens))


def prepare_latents(executor, config: UpscaleConfig, stage: StagePlan,
                    prior_input: tuple[Image.Image, torch.Tensor | None], z_low: torch.Tensor,
                    resume: StageState | None) -> tuple[StageSchedule, torch.Tensor]:
    """Steps 3 and 4: the global structure prior and the start point, from one noise draw for the whole latent.

    ``prior_input``: the prior's picture and its latent (step 1's and ``z_low``, or the stage input by bicubic under
    ``prior_source='input'``; the latent is None where the prior is in pixel space).

    Returns the stage's schedule (the driver's one scheduler, positioned at the first step to run) and the latent
    to denoise: ``z_S = add_noise(z_L, eps, t_S)``, ``S = round(s T)`` steps from the end, or the resumed one.
    """
    spec = executor.spec
    schedule = stage_schedule(executor, config, stage, resume)
    scheduler, start = schedule.scheduler, schedule.start_index
    noise = stage_noise(z_low.shape, config.seed, stage.index)
    # 3. Global structure prior G = LL(z_L) (or of the pixels, prior_space='pixel'); 4. the start point.
    prior_image, z_prior = prior_input
    if config.prior_space == "latent":
        schedule.prior, z_start = stage_start(scheduler, start, z_low, z_prior, noise, config.wavelet,
                                              config.dwt_levels)
    else:  # the pixel-space prior needs full float pixels (and a VAE round trip per step)
        low = low_band(image_to_tensor(prior_image), config.wavelet, config.dwt_levels)
        schedule.prior = GlobalPrior(low, torch.zeros_like(low), config.wavelet, config.dwt_levels)
        schedule.codec = PixelCodec(executor.map, spec.vae_scale_factor, spec.latent_channels, config.vae_tile,
                                    config.vae_tile_overlap)
        z_start = kind_of(scheduler).add_noise(scheduler, z_low, noise, scheduler.timesteps[start : start + 1])
    return schedule, resume.latents.clone() if resume is not None else z_start


def stage_schedule(executor, config: UpscaleConfig, stage: StagePlan, resume: StageState | None) -> StageSchedule:
    """The stage's one scheduler, positioned at the first step to run (``S = round(s T)`` steps from the end, or
    the resumed step, with a multistep solver's memory); its prior is set by steps 3-4."""
    scheduler = executor.spec.new_scheduler(config.scheduler, config.timestep_spacing, config.karras_sigmas)
    kind = kind_of(scheduler)
    kind.set_timesteps(scheduler, config.steps, shift_tokens(config, stage))
    start = config.steps - stage.steps
    if hasattr(scheduler, "set_begin_index"):  # stateful (Euler, DPM-Solver) schedulers count steps from here
        scheduler.set_begin_index(start + (resume.step if resume else 0))
    if resume is not None:
        kind.set_state(scheduler, resume.scheduler_state)  # a multistep solver's memory
    return StageSchedule(scheduler=scheduler, start_index=start, prior=None, prior_target=config.prior_target,
                         prior_fraction=config.prior_fraction, prior_schedule=config.prior_schedule,
                         prior_scale=config.prior_scale, seed=config.seed, stage=stage.index)


def shift_tokens(config: UpscaleConfig, stage: StagePlan) -> int:
    """The image token count that sets a flow scheduler's dynamic shift (``flow_shift_tokens``): one view's packed
    2x2 patches, or the whole stage latent's."""
    if config.flow_shift_tokens == "stage":
        height, width = stage.latent
    else:
        top, left, bottom, right = stage.views[0]
        height, width = bottom - top, right - left
    return int(height // 2) * int(width // 2)


def run_stage(executor, config: UpscaleConfig, stage: StagePlan, image: Image.Image, prompter: Prompter,
              global_prompt: str, *, callback: StepCallback | None = None, resume: StageState | None = None,
              progress: bool = True, sink: BandSink | None = None):
    """One x2 stage of method.md (steps 1-10); returns the stage output image, or what ``sink`` returns when it
    consumes the output's bands (a file writer: the output is never held whole)."""
    spec = executor.spec
    f, vae_tile_px, sink = spec.vae_scale_factor, config.vae_tile, sink or collect_image
    if callback is not None:
        callback(StepInfo(stage=stage.index, step=0, num_steps=stage.steps, timestep=None, gather=None,
                          stage_input=image))
    # The preparation's forward passes (upscale-model and VAE tiles: hundreds at 16K) call the callback between
    # results, so a cancel or a stop raised there takes effect while the stage is being prepared.
    def preparing() -> None:
        callback(StepInfo(stage=stage.index, step=0, num_steps=stage.steps, timestep=None, gather=None,
                          stage_input=None))

    tile_map = executor.map if callback is None else ticking(executor.map, preparing)
    on_owners = owners_denoise(executor, config)
    # 1. Resize (+ sharpen) the stage input; the prior's own picture where it is not this one (prior_source).
    prior_image = prior_picture(image, stage.size, config)
    image = resize_input(image, stage.size, config, tile_map, progress)
    latent_hw = stage.latent
    grid = TileGrid(*latent_hw, *latent_tiles(vae_tile_px, config.vae_tile_overlap, f))
    if on_owners is None:
        # 2. Encode with the tiled VAE (tile by tile from the 8-bit image, on the workers, blended here).
        z_low = encode_image(tile_map, image, f, spec.latent_channels, vae_tile_px, config.vae_tile_overlap)
        assert tuple(z_low.shape[-2:]) == latent_hw, (z_low.shape, latent_hw)  # the plan's geometry is the model's
        prior_input = (image, z_low)
        if prior_image is not None:
            z_prior = (encode_image(tile_map, prior_image, f, spec.latent_channels, vae_tile_px,
                                    config.vae_tile_overlap) if config.prior_space == "latent" else None)
            prior_input = (prior_image, z_prior)
        # 3-4. Global structure prior and start point.
        schedule, latents = prepare_latents(executor, config, stage, prior_input, z_low, resume)
        pixels = prior_input = None
    else:
        # 2-4 on the workers that own the latent's bands: each encodes its rows of the stage input and makes its
        # rows of the prior and the start point (PartOwner.load); only their prior's rows come back here.
        schedule = stage_schedule(executor, config, stage, resume)
        latents = resume.latents.clone() if resume is not None else None
        pixels = PixelStart(np.asarray(image), None if prior_image is None else np.asarray(prior_image), grid,
                            (1, spec.latent_channels, *latent_hw), config.seed, stage.index, config.dwt_levels, f)
    prior_image = None
    if schedule.num_steps == 0:
        return sink(iter([np.asarray(image)]))
    # 5. Views: the plan's windows of `tile` latent px every `stride` (jittered per step in 9).
    views = stage.views
    # 6. Regional prompts.
    prompts = encode_stage_prompts(executor, config, stage, image, prompter, global_prompt)
    if callback is not None:  # between the preparation's phases too (the captioner may take minutes)
        preparing()
    # 7. Regional attention masks from the attention probe.
    token_allowed, token_maps = attention_token_masks(executor, config, image, stage.index, global_prompt,
                                                      *prompts.global_, latent_hw, views)
    # The stage input is not needed past here (a 16K stage's input is as big as its output), except as the
    # ControlNet's control image, cropped per view at every step.
    control = (np.asarray(image) if pixels is None else pixels.image) if config.controlnet else None
    image = None
    # 8. The composer's inputs travel in the stage context (used inside every cross-attention layer), with the
    # family's own fields (pooled embeddings, micro-conditioning, positions, a guidance embedding) as its object.
    family = backbone_class(spec.family)
    pooled = (prompts.negative[1], prompts.global_[1], prompts.regional[1])
    context = StageContext(
        negative_embeds=prompts.negative[0], global_embeds=prompts.global_[0], regional_embeds=prompts.regional[0],
        view_prompt=prompts.view_prompt, token_allowed=token_allowed, token_maps=token_maps, latent_hw=latent_hw,
        vae_scale_factor=f, guidance_scale=family.cfg_scale(config), lambda_global=config.lambda_global,
        composer=config.composer, controlnet_scale=config.controlnet_scale,
        family=family.stage_fields(config, image_hw=(stage.size[1], stage.size[0]), pooled=pooled))
    shared = executor.share(context)  # sent once per stage; each call carries only its windows
    # 9. Denoising loop: predict every view, reduce + prior, one scheduler step on the whole latent.
    first = resume.step if resume else 0
    if config.compile:
        warm_up_compiled(executor, shared, spec.latent_channels, views, schedule.timestep(first),
                         schedule.input_scale(first), control)
    bar = tqdm(total=schedule.num_steps, initial=first, disable=not progress, unit="step",
               desc=f"stage {stage.index + 1} {stage.size[0]}x{stage.size[1]} ({len(views)} views)")

    def on_step(done: int, gather) -> None:
        bar.update(1)
        if callback is not None:
            callback(StepInfo(stage=stage.index, step=done, num_steps=schedule.num_steps,
                              timestep=schedule.timestep(done - 1), gather=gather, stage_input=None))

    job = DenoiseJob(latents=latents, schedule=schedule, views=views, context=shared, control=control, first=first,
                     jitter=config.jitter, seed=config.seed, stage=stage.index, blend=config.blend,
                     sigma_fraction=config.gaussian_sigma, batch_size=executor.batch_size,
                     dwt_levels=config.dwt_levels, vae_scale_factor=f, snapshot_every=config.snapshot_every,
                     on_step=on_step, decode=grid, pixels=pixels, on_loaded=preparing if callback else None)
    # 10. Decode with the tiled VAE (on the workers), band by band into 8 bits, into the sink.
    bands = denoise_and_decode(executor, config, job)
    try:
        return sink(bands)
    finally:  # a sink that stops early (a full disk) ends the decode at once: the workers free their bands
        bands.close()
        bar.close()


def denoise_and_decode(executor, config: UpscaleConfig, job: DenoiseJob) -> Iterator[np.ndarray]:
    """Steps 9 and 10: the stage output's uint8 bands, top to bottom. With the latent on the workers they denoise
    and decode their own bands (the latent never comes to the driver); else the driver's loop, then the tiled
    decode from the whole latent (tiles on the workers, the blend here)."""
    on_owners = owners_denoise(executor, config)
    if on_owners is not None:
        return on_owners(job)
    latents = denoise_on_driver(executor, job)
    return decode_bands(executor.map, latents, job.vae_scale_factor, config.vae_tile, config.vae_tile_overlap)


def ticking(tile_map, tick: Callable[[], None]):
    """An executor's ``map`` that calls ``tick`` before handing over each result (what it raises goes up)."""
    def mapped(method: str, calls):
        for result in tile_map(method, calls):
            tick()
            yield result

    return mapped


def owners_denoise(executor, config: UpscaleConfig):
    """The executor's loop with the latent on the workers (step_design='actors'), or None: the driver's loop, for
    an in-process reference, step_design='driver', or a prior that is not local to a row band (a pixel-space prior
    decodes the whole latent; a non-Haar wavelet's filters reach across bands)."""
    local_prior = config.prior_space == "latent" and config.wavelet == "haar"
    if config.step_design != "actors" or not local_prior:
        return None
    return getattr(executor, "denoise_on_owners", None)


def denoise_on_driver(executor, job: DenoiseJob) -> torch.Tensor:
    """Step 9 with the whole latent here: each step every view's prediction from the executor (9a), then
    MultiDiffusion, the prior and ONE scheduler step on the whole latent (:func:`reduce_and_step`)."""
    schedule, latents = job.schedule, job.latents
    latent_hw = tuple(latents.shape[-2:])
    for step in range(job.first, schedule.num_steps):
        rects = step_views(job.views, *latent_hw, job.jitter, job.seed, job.stage, step)
        batches = predict_step(executor, job.context, latents, rects, schedule.timestep(step),
                               schedule.input_scale(step), job.control)
        latents = reduce_and_step(latents, batches, rects, schedule, step, job.blend, job.sigma_fraction)
        check_finite_latent(is_finite(latents), job.stage, step)
        if job.on_step is not None:
            def gather(state=latents):  # this step's latent and the scheduler's memory now
                return state, kind_of(schedule.scheduler).get_state(schedule.scheduler)

            job.on_step(step + 1, gather)
    return latents


def encode_negative(executor, negative_prompt: str,
                    max_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CFG's unconditional embeddings; a model whose index says so (SDXL's default) zeroes an empty negative
    prompt, as its pipeline does."""
    embeds, pooled = encode_prompts(executor, [negative_prompt], max_tokens)
    if not negative_prompt and executor.spec.force_zeros_for_empty_prompt:
        return torch.zeros_like(embeds), None if pooled is None else torch.zeros_like(pooled)
    return embeds, pooled


def collect_image(bands: Iterator[np.ndarray]) -> Image.Image:
    """The default sink: the stage output as one 8-bit image."""
    return Image.fromarray(np.concatenate(list(bands)))


# ---------------------------------------------------------------------------------------------------------------
# All stages
# ---------------------------------------------------------------------------------------------------------------
def upscale(image: Image.Image, config: UpscaleConfig, *, executor: Executor | None = None,
            model: ModelWorker | None = None, plan: Plan | None = None, callback: StepCallback | None = None,
            resume: StageState | None = None, stage_inputs: dict | None = None, progress: bool = True,
            sink: BandSink | None = None):
    """Upscale ``image`` by ``config.scale`` (or to ``config.size``) in x2 stages (method.md 'Stages').

    Args:
        image (PIL.Image): RGB input.
        config (UpscaleConfig): every knob of the method.
        executor (Executor, *optional*): runs the forward passes (:func:`open_executor`'s in-process one if omitted;
            the Ray driver passes a ``RayExecutor``). It is closed at the end: an executor opened with ``keep=True``
            stays loaded for the next run.
        model (ModelWorker, *optional*): an already loaded in-process worker, run here (a ``LocalExecutor`` over
            it); ignored when ``executor`` is given.
        plan (Plan, *optional*): the run's :func:`~cupscale_dist.plan.check_inputs` result; made from the loaded
            model's spec if omitted (or if it was made for another VAE geometry).
        callback (*optional*): called with a :class:`StepInfo` at each stage's start and after every step.
        resume (StageState, *optional*): continue a stage from a checkpointed latent;
        stage_inputs (dict, *optional*): ``{stage: input image}`` of finished stages, needed with ``resume``.
        sink (*optional*): consumes the final image's uint8 bands (a streaming file writer) when the last stage's
            size is the target size; ``upscale`` then returns what ``sink`` returns instead of the image.

    Returns:
        PIL.Image: the upscaled image (or the sink's result, see ``sink``).
    """
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    prompter = None
    try:  # whatever fails, the executor (a Ray actor pool) and the captioner pool are released
        if executor is None:
            executor = LocalExecutor(model, config.view_batch_size) if model else open_executor(config)
        executor.check_serves(config)
        backbone_class(executor.spec.family).check_config(config)  # knobs the model family cannot honour
        geometry = (executor.spec.vae_scale_factor, executor.spec.latent_channels)
        if plan is None or (plan.vae_scale_factor, plan.latent_channels) != geometry:
            plan = make_plan(image.size, config, geometry)
        prompter = make_prompter(config, count_tokens=executor.spec.content_tokens,
                                 start_timeout_s=executor.start_timeout_s)
        global_prompt = config.prompt or prompter.global_caption(image)
        last = plan.stages[-1]
        streams = sink is not None and last.size == plan.output_size  # the last stage writes straight into the sink
        first = resume.stage if resume else 0
        if resume is not None:
            image = stage_inputs[first]
        for stage in plan.stages[first:]:
            image = run_stage(executor, config, stage, image, prompter, global_prompt, callback=callback,
                              resume=resume if resume and resume.stage == stage.index else None, progress=progress,
                              sink=sink if streams and stage is last else None)
    finally:
        if prompter is not None:
            prompter.close()
        if executor is not None:
            executor.close()
    if streams or image.size == plan.output_size:
        return image
    resized = image.resize(plan.output_size, Image.Resampling.LANCZOS)  # stage sizes are multiples of 64 px
    return sink(iter([np.asarray(resized)])) if sink is not None else resized


# Prompts per text-encoder call: every hidden state of a call is kept until it returns, so 961 unique regional
# prompts in one call would hold several GB of transient GPU memory; 16 keep it to tens of MB.
PROMPT_CHUNK = 16


def encode_prompts(executor, prompts: list[str],
                   max_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text embeddings of ``prompts`` in :data:`PROMPT_CHUNK`-sized calls (fanned out, gathered in order);
    ``max_tokens``: the run's cap on tokens per prompt (``max_sequence_length``), which each family's
    :meth:`~cupscale_dist.models.backbones.base.Backbone.encode_prompts` applies as its encoder allows."""
    chunks = [(prompts[i : i + PROMPT_CHUNK], max_tokens) for i in range(0, len(prompts), PROMPT_CHUNK)]
    parts = list(executor.map("encode_prompts", chunks))
    embeds = torch.from_numpy(np.concatenate([e for e, _ in parts]))
    pooled = None if parts[0][1] is None else torch.from_numpy(np.concatenate([p for _, p in parts]))
    return embeds, pooled
