"""Flux.1 as a backbone (issue 22), on tiny Flux pipelines built from configs and loaded with from_pretrained.

Invariants: (a) with a position-dependent stand-in transformer tiled == untiled with ``positions: global`` (and
not with 'local'); (b) screened global tokens get zero weight from image queries, only there; lambda = 1 with
nothing screened is the stock transformer bit for bit; (c) the global prior under flow matching is exact; (d) Ray
== local bytes. ``python tests/mutants/run.py --only flux-...`` shows each failing under its mutation.
"""

from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers.models.transformers.transformer_flux import (
    FluxAttnProcessor,
    FluxPosEmbed,
)

from cupscale_dist.execution.executor import LocalExecutor
from cupscale_dist.execution.worker import ModelWorker
from cupscale_dist.method.prior import GlobalPrior
from cupscale_dist.method.schedulers import make_scheduler
from cupscale_dist.method.step import (
    StageContext,
    StageSchedule,
    predict_views,
    reduce_and_step,
    reduce_predictions,
)
from cupscale_dist.method.views import make_views
from cupscale_dist.method.wavelets import dwt2, low_band
from cupscale_dist.models.backbones.flux.backbone import (
    Flux,
    FluxStage,
    image_ids,
    pack_latents,
    unpack_latents,
)
from cupscale_dist.models.backbones.flux.joint_attention import (
    JointRegional,
    JointRegionalProcessor,
    attend,
    composed_attention,
    install_joint_processors,
)
from cupscale_dist.pipeline import predict_step
from cupscale_dist.testing.tiny_flux import (
    AXES_DIMS_ROPE,
    DEV_SCHEDULER,
    SCHNELL_SCHEDULER,
    build_tiny_flux,
)


@pytest.fixture(scope="module", params=["dev", "schnell"])
def flux_pipe(request, tmp_path_factory):
    from diffusers import FluxPipeline

    directory = build_tiny_flux(tmp_path_factory.mktemp(f"flux-{request.param}"), variant=request.param)
    pipe = FluxPipeline.from_pretrained(directory)
    pipe.set_progress_bar_config(disable=True)
    return SimpleNamespace(variant=request.param, dir=directory, pipe=pipe, backbone=Flux(pipe.transformer, pipe=pipe))


def flux_context(backbone, view_count: int, latent_hw, positions: str = "global", **changes) -> StageContext:
    embeds, pooled = (torch.from_numpy(a) for a in backbone.encode_prompts(
        ["a photo of a cat on the house", "a red roof under a blue sky", "a dark night"]))
    flux = FluxStage(pooled[2:3], pooled[0:1], pooled[1:2], "global", positions, 3.5)
    context = StageContext(embeds[2:3], embeds[0:1], embeds[1:2], np.zeros(view_count, dtype=np.int64), None, None,
                           tuple(latent_hw), 8, 1.0, 1.0, "mix", family=flux)
    return dataclasses.replace(context, **changes)


# --- the tiny model itself ----------------------------------------------------------------------------------------
def test_tiny_flux_has_flux_shapes(flux_pipe):
    pipe = flux_pipe.pipe
    assert type(pipe).__name__ == "FluxPipeline" and pipe.vae.config.latent_channels == 16
    assert (pipe.vae.config.shift_factor == pytest.approx(0.1159)
            and pipe.vae.config.scaling_factor == pytest.approx(0.3611))
    assert pipe.transformer.config.in_channels == 64  # packed 2x2 patches of 16 channels
    assert pipe.transformer.config.guidance_embeds is (flux_pipe.variant == "dev")
    assert type(pipe.tokenizer_2).__name__.startswith("T5") and type(pipe.text_encoder_2).__name__ == "T5EncoderModel"
    embeds, pooled = flux_pipe.backbone.encode_prompts(["a photo of a cat", "a dog"])
    assert embeds.shape == (2, 32, 32) and pooled.shape == (2, 32)  # T5 sequence, CLIP pooled


def test_packing_round_trips_and_matches_diffusers():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 6, 10)
    packed = pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 6, 10))
    assert torch.equal(unpack_latents(packed, 6, 10), latents)


def test_image_ids_carry_the_views_global_offset():
    rects = np.array([[0, 0, 4, 6], [2, 4, 6, 10]])
    local, global_ = image_ids(rects, "local"), image_ids(rects, "global")
    assert torch.equal(local[0], local[1]) and torch.equal(global_[0], local[0])
    assert global_[1][0].tolist() == [0.0, 1.0, 2.0] and global_[1][-1].tolist() == [0.0, 2.0, 4.0]
    assert torch.equal(global_[1] - local[1], torch.tensor([0.0, 1.0, 2.0]).expand_as(local[1]))


# --- (b) lambda = 1, nothing screened: the stock transformer, bit for bit ----------------------------------------
def stock_call(transformer, latents, states, pooled, ids, sigma, guidance):
    transformer.set_attn_processor(FluxAttnProcessor())
    try:
        return unpack_latents(transformer(hidden_states=pack_latents(latents), timestep=sigma, guidance=guidance,
                                          pooled_projections=pooled, encoder_hidden_states=states,
                                          txt_ids=torch.zeros(states.shape[1], 3), img_ids=ids,
                                          return_dict=False)[0], *latents.shape[-2:])
    finally:
        install_joint_processors(transformer)


@pytest.mark.parametrize("positions", ["global", "local"])
def test_lambda_one_nothing_screened_is_the_stock_transformer(flux_pipe, positions):
    """Two views in one batch, each with its own positions: each row equals the stock transformer's output for that
    view with its ids (the batch is the same, so the bytes must be)."""
    backbone = flux_pipe.backbone
    rects = np.array([[0, 0, 8, 8], [4, 6, 12, 14]])
    context = flux_context(backbone, 2, (12, 14), positions=positions, token_allowed=np.ones((2, 32), dtype=bool))
    windows = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    out = predict_views(backbone, windows, 700.0, 1.0, context, [0, 1], rects)
    ids = image_ids(rects, positions)
    guidance = torch.full((2,), 3.5) if flux_pipe.variant == "dev" else None
    for row in range(2):
        expected = stock_call(backbone.transformer, windows, context.global_embeds.expand(2, -1, -1),
                              context.family.global_pooled.expand(2, -1), ids[row], torch.full((2,), 0.7), guidance)
        assert torch.equal(out[row], expected[row])
    if positions == "global":
        other = stock_call(backbone.transformer, windows, context.global_embeds.expand(2, -1, -1),
                           context.family.global_pooled.expand(2, -1), ids[0], torch.full((2,), 0.7), guidance)
        assert not torch.allclose(out[1], other[1], atol=1e-4)  # the second view's own positions reached it


# --- (b) screened tokens get zero weight from image queries; the composer -------------------------------------------
def attention_inputs(g=5, r=4, image=6, heads=2, dim=8, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, g + r + image, heads, dim, generator=gen) for _ in range(3)]


def screen(allowed: torch.Tensor) -> torch.Tensor:
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))[:, None, None, :]


@pytest.mark.parametrize("composer,lam", [("mix", 1.0), ("mix", 0.4), ("joint", 0.4)])
def test_screened_global_tokens_get_zero_weight_from_image_queries_only(composer, lam):
    """Changing a screened global token's value moves no image output of the screened row (zero weight), but does
    move that row's global text stream (text->text is never masked) and the unscreened row's image outputs."""
    g, r, image = 5, 4, 6
    query, key, value = attention_inputs(g, r, image)
    allowed = torch.ones(2, g, dtype=torch.bool)
    allowed[1, 1:3] = False  # row 1 screens tokens 1 and 2; row 0 (a CFG unconditional row) screens nothing
    regional = JointRegional(g, r, (None, None), lam, composer, screen(allowed))
    base = composed_attention(query, key, value, regional)
    moved_value = value.clone()
    moved_value[:, 1:3] += 100.0
    moved = composed_attention(query, key, moved_value, regional)
    images = slice(g + r, None)
    assert torch.equal(moved[1, images], base[1, images])
    assert not torch.allclose(moved[0, images], base[0, images])
    assert not torch.allclose(moved[1, :g], base[1, :g])


def test_mix_composer_is_lambda_blend_of_the_two_prompts_attentions():
    """Image queries: lambda Attn([K_g; K_img]; mask) + (1 - lambda) Attn([K_r; K_img]); text streams: each its own
    prompt and the image."""
    g, r, image, lam = 5, 4, 6, 0.3
    query, key, value = attention_inputs(g, r, image, seed=2)
    allowed = torch.ones(2, g, dtype=torch.bool)
    allowed[:, 3] = False
    out = composed_attention(query, key, value, JointRegional(g, r, (None, None), lam, "mix", screen(allowed)))
    sl_g, sl_r, sl_i = slice(0, g), slice(g, g + r), slice(g + r, None)
    def cat(t, a):
        return torch.cat([t[:, a], t[:, sl_i]], dim=1)

    bias = torch.cat([screen(allowed), torch.zeros(2, 1, 1, image)], dim=-1)
    expected_i = (lam * attend(query[:, sl_i], cat(key, sl_g), cat(value, sl_g), bias)
                  + (1 - lam) * attend(query[:, sl_i], cat(key, sl_r), cat(value, sl_r)))
    assert (out[:, sl_i] - expected_i).abs().max() <= 1e-6
    assert (out[:, sl_g] - attend(query[:, sl_g], cat(key, sl_g), cat(value, sl_g))).abs().max() <= 1e-6
    assert (out[:, sl_r] - attend(query[:, sl_r], cat(key, sl_r), cat(value, sl_r))).abs().max() <= 1e-6


def test_view_masks_reach_every_attention_layer_of_the_transformer(flux_pipe):
    """Through predict_views: every attention call (double- and single-stream) gets the cond rows' screen, and
    the output differs from the unscreened one."""
    backbone = flux_pipe.backbone
    rects = np.array([[0, 0, 8, 8], [0, 4, 8, 12]])
    allowed = np.ones((2, 32), dtype=bool)
    allowed[1, 2:4] = False
    context = flux_context(backbone, 2, (8, 12), token_allowed=allowed, lambda_global=0.5)
    windows = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    seen = []

    class Spy(JointRegionalProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None, regional=None):
            seen.append(regional.global_bias)
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                    regional)

    backbone.transformer.set_attn_processor(Spy())
    try:
        screened = predict_views(backbone, windows, 700.0, 1.0, context, [0, 1], rects)
    finally:
        install_joint_processors(backbone.transformer)
    processor = backbone.transformer.attn_processors
    assert len(seen) == len(processor) == 2  # one double- and one single-stream block
    for bias in seen:
        assert torch.equal(torch.isinf(bias[:, 0, 0]), torch.from_numpy(~allowed))
    plain = predict_views(backbone, windows, 700.0, 1.0, dataclasses.replace(context, token_allowed=None), [0, 1],
                          rects)
    assert torch.equal(screened[0], plain[0]) and not torch.allclose(screened[1], plain[1], atol=1e-5)


def test_probe_reads_image_to_text_maps_of_the_double_stream_blocks(flux_pipe):
    backbone = flux_pipe.backbone
    embeds, pooled = (torch.from_numpy(a) for a in backbone.encode_prompts(["a photo of a cat on the house"]))
    pixels = np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    noise = torch.randn(1, 16, 8, 6, generator=torch.Generator().manual_seed(0))
    maps = backbone.probe(flux_pipe.pipe.vae, pixels, noise, 500, 0.0, embeds, pooled)
    assert maps.shape == (32, 4, 3) and bool((maps >= 0).all())
    # joint softmax weights of image queries on text keys: positive, summing to below 1 (image keys take the rest)
    assert 0 < float(maps.sum(dim=0).max()) < 1


# --- (a) positions: tiled == untiled with global positions, not with local ---------------------------------------
class PositionalStandIn(torch.nn.Module):
    """A FluxTransformer2DModel stand-in: each image token's output is a function of its latent and of its own RoPE
    position table (the per-row tables the joint processor would apply), nothing else."""

    def __init__(self):
        super().__init__()
        self.register_buffer("anchor", torch.zeros(()))
        self.pos_embed = FluxPosEmbed(theta=10000, axes_dim=list(AXES_DIMS_ROPE))
        self.config = SimpleNamespace(guidance_embeds=True)

    device = property(lambda self: self.anchor.device)
    dtype = property(lambda self: self.anchor.dtype)

    def set_attn_processor(self, _processor) -> None:
        pass  # no attention layers

    def forward(self, hidden_states, timestep, guidance, pooled_projections, encoder_hidden_states, txt_ids, img_ids,
                joint_attention_kwargs, return_dict=False):
        cos, sin = joint_attention_kwargs["regional"].rotary
        text = joint_attention_kwargs["regional"].text_tokens
        position = (cos[:, text:] * 0.3 + sin[:, text:] * 0.7).mean(dim=-1, keepdim=True).float()  # (B, S, 1)
        return (torch.sin(3 * hidden_states) * 0.7 + 0.1 * hidden_states + position,)


def test_positional_stand_in_tiled_equals_untiled_with_global_positions():
    assert tiled_minus_untiled("global") <= 1e-6


def test_positional_stand_in_tiled_differs_from_untiled_with_local_positions():
    """The same test fails with positions: local: the tiles restart at 0, so they disagree with the whole image."""
    assert tiled_minus_untiled("local") > 1e-3


def tiled_minus_untiled(positions: str) -> float:
    latent_shape = (1, 16, 20, 28)
    z = torch.randn(latent_shape, generator=torch.Generator().manual_seed(7))
    worker = SimpleNamespace(_context=None, controlnet=None, backbone=Flux(PositionalStandIn()))
    worker.predict = ModelWorker.predict.__get__(worker)
    worker.unet = worker.backbone.transformer
    views = make_views(20, 28, 8, 4)
    executor = LocalExecutor(worker, batch_size=5)
    context = executor.share(flux_context_stub(len(views), (20, 28), positions))
    tiled = reduce_predictions(predict_step(executor, context, z, views, 500, 1.0), views, z.shape)
    whole = np.array([[0, 0, 20, 28]])
    untiled = reduce_predictions(predict_step(executor, context, z, whole, 500, 1.0), whole, z.shape)
    return float((tiled - untiled).abs().max())


def flux_context_stub(view_count: int, latent_hw, positions: str) -> StageContext:
    embeds, pooled = torch.zeros(1, 4, 8), torch.zeros(1, 8)
    return StageContext(embeds, embeds, embeds, np.zeros(view_count, dtype=np.int64), None, None, latent_hw, 8, 1.0,
                        1.0, "mix", family=FluxStage(pooled, pooled, pooled, "global", positions, 3.5))


# --- (c) the global prior under flow matching ---------------------------------------------------------------------
def flow_prior_step(config: dict, levels: int, target: str, step: int) -> SimpleNamespace:
    """Denoising step ``step`` of a stage (T=10, s=0.6) through reduce_and_step with the flow scheduler: the velocity
    the scheduler received, the latents, and an untouched copy of the scheduler."""
    scheduler = make_scheduler("flow_euler", config)
    from cupscale_dist.method.schedulers import kind_of

    kind_of(scheduler).set_timesteps(scheduler, 10, image_tokens=4096)
    start = 10 - 6
    scheduler.set_begin_index(start + step)
    gen = torch.Generator().manual_seed(0)
    z_low, noise, z_t, velocity = (torch.randn(1, 16, 16, 24, generator=gen) for _ in range(4))
    prior = GlobalPrior.from_latent(z_low, noise, "haar", levels)
    schedule = StageSchedule(scheduler, start, prior, target, prior_fraction=1.0, prior_schedule="linear")
    untouched = copy.deepcopy(scheduler)
    received = []
    original = scheduler.step
    scheduler.step = lambda v, t, z, **kw: received.append(v) or original(v, t, z, **kw)
    z_next = reduce_and_step(z_t, [(range(1), velocity)], np.array([[0, 0, 16, 24]]), schedule, step)
    return SimpleNamespace(prior=prior, z_low=z_low, noise=noise, z_t=z_t, velocity=velocity, received=received[0],
                           z_next=z_next, untouched=untouched, schedule=schedule,
                           without_prior=untouched.step(velocity, schedule.timestep(step), z_t).prev_sample)


FLOW_CASES = pytest.mark.parametrize("config,levels,step,weight", [
    pytest.param(config, levels, step, weight, id=f"{name}-J{levels}-{label}")
    for name, config in (("dev", DEV_SCHEDULER), ("schnell", SCHNELL_SCHEDULER)) for levels in (1, 2)
    for step, weight, label in ((0, 1.0, "full"), (2, 2 / 3, "partial"))])


@FLOW_CASES
def test_flow_x0_prior_holds_for_the_schedulers_own_convention(config, levels, step, weight):
    """x0 of the velocity the scheduler steps with, in its own convention (scale_noise(x0, t, x0 + v) == x_t), has
    LL = w G + (1 - w) LL(x0 of the unadjusted velocity); the high bands are untouched."""
    run = flow_prior_step(config, levels, "x0", step)
    t = run.schedule.timestep(step).reshape(1)
    sigma = float(run.schedule.scheduler.sigmas[run.schedule.start_index + step])
    x0 = run.z_t - sigma * run.received
    fresh = copy.deepcopy(run.untouched)
    fresh._begin_index = None  # scale_noise looks t up in its own table
    assert (fresh.scale_noise(x0, t, x0 + run.received) - run.z_t).abs().max() <= 1e-5  # the scheduler's convention
    x0_plain = run.z_t - sigma * run.velocity
    low, highs = dwt2(x0, "haar", levels)
    low_plain, highs_plain = dwt2(x0_plain, "haar", levels)
    assert (low - (weight * run.prior.low + (1 - weight) * low_plain)).abs().max() <= 1e-4
    assert all((a - b).abs().max() <= 1e-4 for ha, hb in zip(highs, highs_plain) for a, b in zip(ha, hb))


@FLOW_CASES
def test_flow_zt_prior_pulls_the_next_latent_toward_the_noised_input(config, levels, step, weight):
    run = flow_prior_step(config, levels, "zt", step)
    fresh = copy.deepcopy(run.untouched)
    fresh._begin_index = None
    t_next = run.schedule.timestep(step + 1).reshape(1)
    target = low_band(fresh.scale_noise(run.z_low, t_next, run.noise), "haar", levels)
    low, highs = dwt2(run.z_next, "haar", levels)
    low_plain, highs_plain = dwt2(run.without_prior, "haar", levels)
    assert (low - (weight * target + (1 - weight) * low_plain)).abs().max() <= 1e-4
    assert all((a - b).abs().max() <= 1e-4 for ha, hb in zip(highs, highs_plain) for a, b in zip(ha, hb))


def test_rotary_tables_equal_the_transformers_own_position_embedding():
    """The per-axis gathered tables are FluxPosEmbed's on every id, byte for byte (global, half-patch offsets too)."""
    from cupscale_dist.models.backbones.flux.backbone import rotary_tables

    pos_embed = FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])
    ids = torch.cat([torch.zeros(7, 3), image_ids(np.array([[0, 0, 8, 6], [3, 5, 11, 11], [40, 64, 48, 70]]),
                                                  "global").reshape(-1, 3)])
    cos, sin = rotary_tables(pos_embed, ids)
    expected_cos, expected_sin = pos_embed(ids)
    assert torch.equal(cos, expected_cos) and torch.equal(sin, expected_sin)


@pytest.mark.parametrize("config", [DEV_SCHEDULER, SCHNELL_SCHEDULER], ids=["dev", "schnell"])
def test_flow_noise_level_is_the_schedulers_own_forward_process(config):
    """(alpha, sigma) = (1 - sigma_t, sigma_t), the coefficients of the scheduler's own scale_noise at every step."""
    from cupscale_dist.method.prior import noise_level
    from cupscale_dist.method.schedulers import kind_of

    scheduler = make_scheduler("flow_euler", config)
    kind = kind_of(scheduler)
    kind.set_timesteps(scheduler, 8, image_tokens=4096)
    one, zero = torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1)
    for index, timestep in enumerate(scheduler.timesteps):
        fresh = make_scheduler("flow_euler", config)
        kind.set_timesteps(fresh, 8, image_tokens=4096)
        alpha, sigma = noise_level(scheduler, index)
        assert float(kind.add_noise(fresh, one, zero, timestep.reshape(1))) == pytest.approx(alpha, rel=1e-5)
        assert float(kind.add_noise(fresh, zero, one, timestep.reshape(1))) == pytest.approx(sigma, rel=1e-5)


@pytest.mark.parametrize("tokens", [256, 1024, 4096])
def test_dynamic_shift_timesteps_are_flux_pipelines(tokens):
    """With dynamic shifting the timesteps are FluxPipeline's for an image of ``tokens`` packed tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from cupscale_dist.method.schedulers import kind_of

    ours = make_scheduler("flow_euler", DEV_SCHEDULER)
    kind_of(ours).set_timesteps(ours, 28, image_tokens=tokens)
    theirs = FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER)
    theirs.set_timesteps(28, sigmas=np.linspace(1.0, 1 / 28, 28), mu=calculate_shift(tokens, 256, 4096, 0.5, 1.15))
    assert torch.equal(ours.timesteps, theirs.timesteps) and torch.equal(ours.sigmas, theirs.sigmas)
