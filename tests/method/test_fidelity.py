"""Fidelity to method.md on the real code paths, judged by the scheduler's and the UNet's own view (issue #9).

Each test here fails under a deliberate mutation of the code; ``python tests/mutants/run.py`` applies them one by
one and shows it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from helpers import pointwise, small_config

from cupscale_dist import upscale
from cupscale_dist.execution.executor import LocalExecutor
from cupscale_dist.execution.worker import ModelWorker
from cupscale_dist.method.prior import GlobalPrior
from cupscale_dist.method.resize import resize_input
from cupscale_dist.method.schedulers import make_scheduler
from cupscale_dist.method.step import StageContext, StageSchedule, predict_views, reduce_and_step, reduce_predictions
from cupscale_dist.method.vae import encode_image
from cupscale_dist.method.views import make_views
from cupscale_dist.method.wavelets import dwt2, low_band
from cupscale_dist.models.backbones.sd15.backbone import SD15
from cupscale_dist.models.backbones.sdxl.backbone import SDXLStage, micro_conditioning
from cupscale_dist.pipeline import encode_negative, encode_prompts, predict_step, stage_generator
from cupscale_dist.testing.tiny import SCHEDULER_CONFIG

TOKENS = 77


# --- 9c. the global prior, as the scheduler itself sees it ------------------------------------------------------
def stage_schedule(scheduler, steps: int, strength: float, prior: GlobalPrior, target: str, step: int) -> StageSchedule:
    """The driver's schedule as run_stage sets it up, positioned before denoising step ``step``; prior active over
    the whole run with a linear weight, so ``w = 1 - step / S``."""
    scheduler.set_timesteps(steps, device="cpu")
    start = steps - round(strength * steps)
    if hasattr(scheduler, "set_begin_index"):  # stateful (Euler): as run_stage does on resume
        scheduler.set_begin_index(start + step)
    return StageSchedule(scheduler, start, prior, target, prior_fraction=1.0, prior_schedule="linear")


def record_steps(scheduler) -> list:
    """Keep every output of ``scheduler.step`` (it carries the scheduler's own x0, ``pred_original_sample``)."""
    outputs, step = [], scheduler.step

    def recording(*args, **kwargs):
        outputs.append(step(*args, **kwargs))
        return outputs[-1]

    scheduler.step = recording
    return outputs


def one_full_view(z: torch.Tensor) -> np.ndarray:
    return np.array([[0, 0, z.shape[-2], z.shape[-1]]])


def prior_step(scheduler, levels: int, target: str, step: int) -> SimpleNamespace:
    """Denoising step ``step`` of a stage (T=10, s=0.6) through reduce_and_step on random z_L, stage noise, latent
    and reduced prediction: the next latent, the scheduler's own output inside reduce_and_step, and the output of
    an untouched copy of the scheduler on the same prediction (no prior)."""
    gen = torch.Generator().manual_seed(0)
    z_low, noise, z_t, eps = (torch.randn(1, 4, 16, 24, generator=gen) for _ in range(4))
    prior = GlobalPrior.from_latent(z_low, noise, "haar", levels)
    schedule = stage_schedule(scheduler, 10, 0.6, prior, target, step)
    untouched = copy.deepcopy(schedule.scheduler)
    inside = record_steps(schedule.scheduler)
    z_next = reduce_and_step(z_t, [(range(1), eps)], one_full_view(z_t), schedule, step)
    return SimpleNamespace(prior=prior, z_low=z_low, noise=noise, z_next=z_next, inside=inside[0],
                           without_prior=untouched.step(eps, schedule.timestep(step), z_t),
                           t_next=schedule.timestep(step + 1))


def assert_low_band_blended(after, before, target_low, weight, levels, atol=1e-5):
    """``LL_J(after) = w * target + (1 - w) * LL_J(before)`` and the high bands of ``after`` are ``before``'s."""
    low_after, highs_after = dwt2(after, "haar", levels)
    low_before, highs_before = dwt2(before, "haar", levels)
    assert (low_after - (weight * target_low + (1 - weight) * low_before)).abs().max() <= atol
    assert all((a - b).abs().max() <= atol for ha, hb in zip(highs_after, highs_before) for a, b in zip(ha, hb))


PRIOR_CASES = pytest.mark.parametrize("kind,levels,step,weight", [  # T=10, s=0.6: S=6 steps, w = 1 - step/6
    pytest.param(kind, levels, step, weight, id=f"{kind}-J{levels}-{label}") for kind in ("euler", "ddim")
    for levels in (1, 2) for step, weight, label in ((0, 1.0, "full"), (2, 2 / 3, "partial"))])


@PRIOR_CASES
def test_x0_prior_holds_for_the_schedulers_own_x0(kind, levels, step, weight):
    """9c, prior_target='x0': the x0 the scheduler derives from the adjusted eps has LL = w G + (1-w) LL(x0)."""
    run = prior_step(make_scheduler(kind, SCHEDULER_CONFIG), levels, "x0", step)
    assert_low_band_blended(run.inside.pred_original_sample, run.without_prior.pred_original_sample, run.prior.low,
                            weight, levels)


@PRIOR_CASES
def test_zt_prior_pulls_the_next_latent_toward_the_noised_input(kind, levels, step, weight):
    """9c, prior_target='zt': LL(z_next) = w LL(add_noise(z_L, eps, t_next)) + (1-w) LL(z_next without prior)."""
    run = prior_step(make_scheduler(kind, SCHEDULER_CONFIG), levels, "zt", step)
    fresh = make_scheduler(kind, SCHEDULER_CONFIG)  # no step taken: add_noise looks t_next up in its own table
    fresh.set_timesteps(10, device="cpu")
    target = fresh.add_noise(run.z_low, run.noise, run.t_next.reshape(1))
    assert_low_band_blended(run.z_next, run.without_prior.prev_sample, low_band(target, "haar", levels), weight, levels)


def test_ddim_from_the_test_models_scheduler_config_keeps_the_prior(sdxl_model):
    """A DDIM built from a config without clip_sample/set_alpha_to_one must not clip x0 (else LL(x0) != G)."""
    scheduler = sdxl_model.spec.new_scheduler("ddim")
    assert "clip_sample" not in sdxl_model.pipe.scheduler.config  # the case of the bug: DDIM's defaults would apply
    assert scheduler.config.clip_sample is False and scheduler.config.set_alpha_to_one is False
    run = prior_step(scheduler, 1, "x0", 0)
    assert (low_band(run.inside.pred_original_sample, "haar", 1) - run.prior.low).abs().max() <= 1e-5


def test_scheduler_options_a_config_gives_are_kept():
    ddim = make_scheduler("ddim", {**SCHEDULER_CONFIG, "clip_sample": True, "set_alpha_to_one": True})
    assert ddim.config.clip_sample is True and ddim.config.set_alpha_to_one is True
    assert ddim.config.steps_offset == SCHEDULER_CONFIG["steps_offset"]


# --- 4. start point: S = round(s T), z_S = add_noise(z_L, eps, t_S) -----------------------------------------------
class ZeroExecutor(LocalExecutor):
    """The reference executor, except that view predictions are zero noise (no UNet runs) and each step's windows
    and timestep are recorded."""

    def __init__(self, worker):
        super().__init__(worker, batch_size=4)
        self.windows, self.timesteps = [], []  # per predict call: (view rects, windows); its timestep

    def map(self, method, calls):
        if method != "predict":
            yield from super().map(method, calls)
            return
        for _context, windows, timestep, _scale, _ids, rects in calls:
            self.windows.append((rects, windows.copy()))
            self.timesteps.append(float(timestep))
            yield np.zeros_like(windows)


@pytest.mark.parametrize("strength,steps,kind", [(0.6, 4, "euler"), (0.7, 4, "ddim"), (0.7, 4, "euler"),
                                                 (0.6, 5, "ddim"), (1.0, 3, "euler"), (0.6, 5, "dpmpp_2m"),
                                                 (0.75, 4, "tcd"), (0.75, 4, "lcm")])
def test_stage_starts_at_round_s_t_with_the_schedulers_add_noise(sdxl_model, photo, strength, steps, kind):
    """Step 4: the stage runs S = round(s T) steps from z_S = scheduler.add_noise(z_L, stage noise, t_{T-S})."""
    config = small_config(sdxl_model.name, steps=steps, strength=strength, scheduler=kind, mask_mode="off",
                          guidance_scale=1.5 if kind == "lcm" else 7.5)  # LCM is distilled for guidance <= 2
    executor = ZeroExecutor(sdxl_model)
    upscale(photo, config, executor=executor, progress=False)
    remaining = math.floor(strength * steps + 0.5)  # round half up; no case here is a tie
    size = (photo.width * 2, photo.height * 2)
    z_low = encode_image(LocalExecutor(sdxl_model, 1).map, resize_input(photo, size, config), 8, 4, config.vae_tile,
                         config.vae_tile_overlap)
    noise = torch.randn(z_low.shape, generator=stage_generator(config.seed, 0))
    scheduler = sdxl_model.spec.new_scheduler(kind)
    scheduler.set_timesteps(steps, device="cpu")
    t_start = scheduler.timesteps[steps - remaining : steps - remaining + 1]
    batches = math.ceil(6 / 4)  # the 6 views of the 256 x 192 stage, 4 per call
    assert executor.timesteps[::batches] == [float(t) for t in scheduler.timesteps[steps - remaining :]]
    first = scheduler.add_noise(z_low, noise, t_start)[0].numpy()
    for rects, windows in executor.windows[:batches]:  # the first step's windows tile z_S
        for (top, left, bottom, right), window in zip(rects, windows):
            assert np.abs(window - first[:, top:bottom, left:right]).max() <= 1e-6


# --- 9b. MultiDiffusion through both predictors, border-clamped views -------------------------------------------


class StandInUNet(torch.nn.Module):
    """A UNet stand-in: a pointwise denoiser, plus (``view_offset``) each view's mean, a view-dependent term that
    tells a plain per-pixel average from a weighted one."""

    def __init__(self, view_offset: bool):
        super().__init__()
        self.view_offset = view_offset
        self.register_buffer("anchor", torch.zeros(()))

    device = property(lambda self: self.anchor.device)
    dtype = property(lambda self: self.anchor.dtype)

    def set_attn_processor(self, _processor) -> None:
        pass  # no attention layers

    def forward(self, sample, timestep, **_conditioning):
        out = pointwise(sample)
        return SimpleNamespace(sample=out + sample.mean(dim=(1, 2, 3), keepdim=True) if self.view_offset else out)


def stand_in_context(view_count: int, dim: int = 8) -> StageContext:
    """An SD1.5-shaped stage context (no pooled embeddings, nothing screened) for the stand-in UNet."""
    embeds = torch.zeros(1, TOKENS, dim)
    return StageContext(embeds, embeds, embeds, np.zeros(view_count, dtype=np.int64), None, None, (37, 53), 8, 7.5,
                        0.5, "mix")


LATENT_SHAPE, TILE, STRIDE, INPUT_SCALE = (1, 4, 37, 53), 16, 8, 0.5  # 37, 53: not multiples of the stride
BLEND_CASES = [pytest.param(False, "uniform", id="pointwise-uniform"),
               pytest.param(False, "gaussian", id="pointwise-gaussian"),
               pytest.param(True, "uniform", id="view-offset-uniform")]


def expected_reduction(z: torch.Tensor, views: np.ndarray, view_offset: bool) -> torch.Tensor:
    """What MultiDiffusion must give: the untiled prediction for a pointwise denoiser (any blend); for a
    view-dependent one, the plain per-pixel average of the views' own predictions (blend='uniform')."""
    unet = StandInUNet(view_offset)
    if not view_offset:
        return unet(z * INPUT_SCALE, 0).sample
    total, count = torch.zeros(z.shape), torch.zeros(z.shape[-2:])
    for top, left, bottom, right in views:
        total[..., top:bottom, left:right] += unet(z[..., top:bottom, left:right] * INPUT_SCALE, 0).sample
        count[top:bottom, left:right] += 1
    return total / count


class StandInWorker:
    """ModelWorker's predict (the real one) around the stand-in UNet."""

    predict = ModelWorker.predict

    def __init__(self, view_offset: bool):
        self.unet, self._context, self.controlnet = StandInUNet(view_offset), None, None
        self.backbone = SD15(self.unet)  # the UNet families' calling contract around the stand-in


def reduce_through(executor, view_offset: bool, blend: str) -> None:
    """Run one step's views through ``executor`` and check the reduction against :func:`expected_reduction`."""
    z = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(7))
    views = make_views(*LATENT_SHAPE[-2:], TILE, STRIDE)
    assert views[-1, 2] == LATENT_SHAPE[-2] and views[-1, 3] == LATENT_SHAPE[-1]  # last views clamped to the border
    context = executor.share(stand_in_context(len(views)))
    try:
        reduced = reduce_predictions(predict_step(executor, context, z, views, 500, INPUT_SCALE), views, z.shape, blend)
    finally:
        executor.close()
    assert (reduced - expected_reduction(z, views, view_offset)).abs().max() <= 1e-6


@pytest.mark.parametrize("view_offset,blend", BLEND_CASES)
def test_multidiffusion_through_the_local_executor(view_offset, blend):
    reduce_through(LocalExecutor(StandInWorker(view_offset), batch_size=5), view_offset, blend)


@pytest.mark.parametrize("view_offset,blend", BLEND_CASES)
def test_multidiffusion_through_ray_actors(local_ray, view_offset, blend):
    """The Ray driver's executor and pool with the real actor shell (PipelineWorker.call) around the stand-in."""
    from actors.worker import PipelineWorker
    from cupscale_dist.execution.pool import RayExecutor, WorkerPool

    class StandInActor(PipelineWorker):
        def __init__(self, view_offset: bool, index: int):  # noqa: D107 - no model directory to load
            self.index, self.worker, self.shared = index, StandInWorker(view_offset), (None, None)

    local_ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # actors run this module's classes
    pool = WorkerPool.__new__(WorkerPool)  # the real pool policy; its __init__ would load a model directory
    remote = local_ray.remote(StandInActor).options(num_cpus=0.5)
    pool.actors, pool.in_flight, pool.group = [remote.remote(view_offset, i) for i in range(2)], [0, 0], None
    pool.start_timeout_s, pool.count, pool.live, pool.lost = None, 2, [True, True], []
    reduce_through(RayExecutor(pool, None, batch_size=5), view_offset, blend)


# --- 8. token masks and lambda reach cross-attention only ---------------------------------------------------------
def sdxl_context(model, latent_hw: tuple[int, int], view_count: int, micro_conditioning: str = "global",
                 **changes) -> StageContext:
    """A stage context for the tiny SDXL: one regional prompt for all views, a negative prompt, nothing screened,
    lambda = 1 (``micro_conditioning``: SDXL's own field)."""
    executor = LocalExecutor(model, 1)
    global_embeds, global_pooled = encode_prompts(executor, ["a photo of a cat on a house"])
    regional_embeds, regional_pooled = encode_prompts(executor, ["a red roof under a blue sky"])
    negative_embeds, negative_pooled = encode_negative(executor, "a dark night")  # not zeros: a mask on CFG rows shows
    f = model.spec.vae_scale_factor
    sdxl = SDXLStage(negative_pooled, global_pooled, regional_pooled, "global", (latent_hw[0] * f, latent_hw[1] * f),
                     micro_conditioning)
    context = StageContext(negative_embeds, global_embeds, regional_embeds, np.zeros(view_count, dtype=np.int64),
                           np.ones((view_count, TOKENS), dtype=bool), None, latent_hw, f, 7.5, 1.0, "mix", family=sdxl)
    return dataclasses.replace(context, **changes)


def record_attention_calls(unet) -> tuple[list, list]:
    """Forward hooks on every attention layer: (layer, input hidden states, encoder states, output) per call."""
    calls, handles = [], []
    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            def hook(module, args, kwargs, output, name=name):
                hidden = args[0] if args else kwargs["hidden_states"]
                calls.append((name, module, hidden, kwargs.get("encoder_hidden_states"), output))
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
    return calls, handles


def composer_output(layer, hidden, states, lambda_global: float, screened_tokens: torch.Tensor) -> torch.Tensor:
    """Method.md step 8 from two plain attentions: lambda Attn(Q, K_g, V_g; mask) + (1 - lambda) Attn(Q, K_r, V_r)."""
    plain = AttnProcessor2_0()
    bias = torch.zeros(screened_tokens.shape, dtype=hidden.dtype).masked_fill(screened_tokens, float("-inf"))
    screened_global = plain(layer, hidden, states[:, :TOKENS], attention_mask=bias[:, None])
    return lambda_global * screened_global + (1 - lambda_global) * plain(layer, hidden, states[:, TOKENS:])


@pytest.mark.parametrize("lambda_global,masked", [(0.3, False), (1.0, True), (0.3, True)],
                         ids=["lambda", "masks", "lambda+masks"])
def test_masks_and_lambda_reach_cross_attention_only(sdxl_model, lambda_global, masked):
    """Step 8 in the real UNet: attn1 (self-attention) is exactly the plain attention of its input; attn2 is the
    composer over [global | regional] with the view's token mask (CFG's unconditional rows screen nothing)."""
    rects = np.array([[0, 0, 16, 16], [0, 8, 16, 24]])
    allowed = np.ones((2, TOKENS), dtype=bool)
    if masked:
        allowed[:, 2:5] = False
        allowed[1, 6] = False
    context = sdxl_context(sdxl_model, (16, 24), 2, lambda_global=lambda_global, token_allowed=allowed)
    windows = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    calls, handles = record_attention_calls(sdxl_model.unet)
    try:
        predict_views(sdxl_model.backbone, windows, 500, 0.5, context, [0, 1], rects)
    finally:
        for handle in handles:
            handle.remove()
    screened_tokens = torch.cat([torch.zeros(2, TOKENS, dtype=torch.bool), torch.from_numpy(~allowed)])
    self_calls = [c for c in calls if c[0].endswith("attn1")]
    cross_calls = [c for c in calls if c[0].endswith("attn2")]
    assert self_calls and len(cross_calls) == len(self_calls)
    with torch.no_grad():
        for _, layer, hidden, _, output in self_calls:
            assert torch.equal(output, AttnProcessor2_0()(layer, hidden))
        for _, layer, hidden, states, output in cross_calls:
            expected = composer_output(layer, hidden, states, lambda_global, screened_tokens)
            assert (output - expected).abs().max() <= 1e-5
            assert not torch.allclose(output, AttnProcessor2_0()(layer, hidden, states[:, :TOKENS]), atol=1e-4)


# --- 9a. SDXL micro-conditioning ------------------------------------------------------------------------------------
RECTS = np.array([[0, 0, 8, 16], [4, 8, 12, 24]])  # non-square views in a non-square 12 x 24 latent


def record_time_ids(unet) -> tuple[list, object]:
    """A hook on the UNet's time-id projection: the (rows, 6) micro-conditioning values it actually receives."""
    received = []
    handle = unet.add_time_proj.register_forward_pre_hook(lambda _, args: received.append(args[0].reshape(-1, 6)))
    return received, handle


def expected_time_ids(mode: str, image_hw: tuple[int, int], rects: np.ndarray, f: int = 8) -> list[list[float]]:
    """method.md 9a and the anchors: (H, W, 0, 0, H, W) for all views, or (H, W, top, left, h, w) per view, in px."""
    height, width = image_hw
    if mode == "global":
        return [[height, width, 0, 0, height, width]] * len(rects)
    return [[height, width, t * f, l * f, (b - t) * f, (r - l) * f] for t, l, b, r in rects]


@pytest.mark.parametrize("mode", ["global", "per_view"])
def test_micro_conditioning_values_reach_the_unet(sdxl_model, mode):
    context = sdxl_context(sdxl_model, (12, 24), 2, micro_conditioning=mode)
    assert context.family.image_hw == (96, 192)
    expected = expected_time_ids(mode, (96, 192), RECTS)
    assert micro_conditioning(context, RECTS).tolist() == expected
    received, handle = record_time_ids(sdxl_model.unet)
    try:
        predict_views(sdxl_model.backbone, torch.zeros(2, 4, 8, 16), 500, 0.5, context, [0, 1], RECTS)
    finally:
        handle.remove()
    assert len(received) == 1 and received[0].tolist() == expected + expected  # CFG: [uncond views; cond views]


def run_recording_time_ids(model, photo, **changes) -> list[list[float]]:
    """Upscale the (non-square) photo once; every time-id row the UNet received while denoising."""
    config = small_config(model.name, steps=2, strength=0.5, mask_mode="off", **changes)
    received, handle = record_time_ids(model.unet)
    try:
        upscale(photo, config, model=model, progress=False)
    finally:
        handle.remove()
    return [row for batch in received for row in batch.tolist()]


def test_pipeline_sends_the_stage_size_as_global_micro_conditioning(sdxl_model, photo):
    """The default: every view gets (H, W, 0, 0, H, W) with (H, W) the stage size, 192 x 256 for the 96 x 128 photo."""
    rows = run_recording_time_ids(sdxl_model, photo)
    assert rows and all(row == [192, 256, 0, 0, 192, 256] for row in rows)


def test_pipeline_sends_per_view_micro_conditioning_when_asked(sdxl_model, photo):
    rows = run_recording_time_ids(sdxl_model, photo, micro_conditioning="per_view")
    views = make_views(24, 32, 16, 8)  # the 192 x 256 stage's latent in small_config's views
    assert {tuple(row) for row in rows} == {tuple(row) for row in expected_time_ids("per_view", (192, 256), views)}
