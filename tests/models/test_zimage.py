"""Z-Image as a backbone (issue 36, items 2-4), on the tiny Z-Image loaded with ``from_pretrained`` from a directory
the test writes (cupscale_dist/testing/tiny_zimage.py).

(a) the timestep convention: our step replays ZImagePipeline's own run (fed 1 - sigma, output negated, the fixed
shift's sigmas); (b) positions: with a position-dependent stand-in tiled == untiled with ``positions: global`` and not
with 'local'; every view of a stage at the same first-axis position (one caption length per stage); positions past
``axes_lens`` are the RoPE formula's, never an IndexError; (c) the single-stream composer: lambda = 1 with nothing
screened is the stock transformer bit for bit, screened and filler tokens get zero weight, the probe's maps.
``python tests/mutants/run.py --only zimage-...`` shows each guarded line failing under its mutation.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cupscale_dist.execution.executor import LocalExecutor
from cupscale_dist.execution.worker import ModelWorker
from cupscale_dist.method.step import StageContext, predict_views, reduce_predictions
from cupscale_dist.method.views import make_views
from cupscale_dist.models.backbones.zimage.attention import ZRegional, composed_attention
from cupscale_dist.models.backbones.zimage.backbone import ZImage, ZImageStage, caption_lengths, patchify, unpatchify
from cupscale_dist.models.backbones.zimage.positions import view_image_ids
from cupscale_dist.pipeline import predict_step
from cupscale_dist.testing.tiny_zimage import (
    AXES_DIMS,
    IM_START,
    MAX_SEQUENCE_LENGTH,
    SMALL_AXES_LENS,
    build_tiny_zimage,
)

GLOBAL = "a photo of a cat on the house"
REGIONAL = "a red roof under a blue sky"
NEGATIVE = "a dark night"
LONG = ("a high resolution photo of a mountain landscape with snow and trees under a blue sky, a small house with a "
        "red roof by the lake, detailed")


def load(directory):
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(directory)
    pipe.set_progress_bar_config(disable=True)
    return SimpleNamespace(dir=directory, pipe=pipe, backbone=ZImage(pipe.transformer, pipe=pipe))


@pytest.fixture(scope="module")
def zimage(tmp_path_factory):
    return load(build_tiny_zimage(tmp_path_factory.mktemp("zimage")))


@pytest.fixture(scope="module")
def small_table(tmp_path_factory):
    """The tiny Z-Image whose RoPE table ends at 8 patches (16 latent px) per image side."""
    return load(build_tiny_zimage(tmp_path_factory.mktemp("zimage-small"), axes_lens=SMALL_AXES_LENS))


def zimage_context(backbone, view_count: int, latent_hw, prompts=(GLOBAL, REGIONAL, NEGATIVE), view_prompt=None,
                   positions: str = "global", **changes) -> StageContext:
    """Prompts: the global one, the regional ones, the negative one last; every view the first regional prompt."""
    embeds = torch.from_numpy(backbone.encode_prompts(list(prompts), MAX_SEQUENCE_LENGTH)[0])
    view_prompt = np.zeros(view_count, dtype=np.int64) if view_prompt is None else np.asarray(view_prompt)
    context = StageContext(embeds[-1:], embeds[0:1], embeds[1:-1], view_prompt, None, None, tuple(latent_hw), 8, 1.0,
                           1.0, "mix", family=ZImageStage(positions))
    return dataclasses.replace(context, **changes)


def stock_velocity(transformer, latents, t, captions, offsets=None, table=None):
    """diffusers' own ``ZImageTransformer2DModel.forward`` on ``latents`` (B, 16, h, w), negated; ``offsets``: each
    row's (top, left) in patches added to its image ids (a test-only wrapper of ``patchify_and_embed``); ``table``:
    a longer RoPE table (``axes_lens``) for those ids."""
    from diffusers.models.transformers.transformer_z_image import RopeEmbedder

    original, rope = transformer.patchify_and_embed, transformer.rope_embedder

    def shifted(images, caps, patch_size, f_patch_size):
        out = list(original(images, caps, patch_size, f_patch_size))
        moved = []
        for ids, (top, left) in zip(out[3], offsets):
            ids = ids.clone()
            real = ids[:, 0] != 0  # pad patches sit at (0, 0, 0)
            ids[real, 1] += top
            ids[real, 2] += left
            moved.append(ids)
        out[3] = moved
        return tuple(out)

    if offsets is not None:
        transformer.patchify_and_embed = shifted
    if table is not None:
        transformer.rope_embedder = RopeEmbedder(rope.theta, rope.axes_dims, table)
    try:
        out = transformer(list(latents.unsqueeze(2).unbind(0)), t, captions, return_dict=False)[0]
    finally:
        transformer.__dict__.pop("patchify_and_embed", None)
        transformer.rope_embedder = rope
    return -torch.stack([o.float() for o in out]).squeeze(2)


def global_caption(backbone, context):
    return context.global_embeds[0, : caption_lengths(context.global_embeds)[0]]


# --- the pieces -----------------------------------------------------------------------------------------------------
def test_patchify_is_the_transformers_own_layout():
    from diffusers import ZImageTransformer2DModel

    latents = torch.randn(2, 16, 6, 10)
    for row in range(2):
        patches, _, _ = ZImageTransformer2DModel._patchify_image(None, latents[row][:, None], 2, 1)
        assert torch.equal(patchify(latents)[row], patches)
    assert torch.equal(unpatchify(patchify(latents), 6, 10), latents)


def test_prompts_are_the_pipelines_hidden_states_one_length_each(zimage):
    embeds, pooled = zimage.backbone.encode_prompts([GLOBAL, LONG, ""], MAX_SEQUENCE_LENGTH)
    theirs, _ = zimage.pipe.encode_prompt([GLOBAL, LONG, ""], do_classifier_free_guidance=False,
                                          max_sequence_length=MAX_SEQUENCE_LENGTH)
    assert pooled is None and embeds.shape == (3, MAX_SEQUENCE_LENGTH, 32)
    lengths = caption_lengths(torch.from_numpy(embeds))
    assert lengths == [len(t) for t in theirs] and lengths[1] > 32 >= lengths[0] > lengths[2] > 0
    for row, caption in enumerate(theirs):
        assert torch.equal(torch.from_numpy(embeds[row, : lengths[row]]), caption)
        assert not embeds[row, lengths[row]:].any()


@pytest.mark.parametrize("prompt", [GLOBAL, "user"])
def test_content_tokens_are_the_prompts_own_inside_the_chat_template(zimage, prompt):
    """The prompt's own tokens, after the template's head and before its tail (a prompt naming the template's roles
    too); an empty prompt has none."""
    from cupscale_dist.models.spec import ModelSpec

    spec = ModelSpec.read(str(zimage.dir))
    tokenizer = zimage.pipe.tokenizer
    mask = spec.content_tokens_mask(prompt, MAX_SEQUENCE_LENGTH)
    chat = tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                   add_generation_prompt=True, enable_thinking=True)).input_ids
    words = tokenizer(prompt).input_ids
    start = int(mask.argmax())
    assert mask.sum() == len(words) and chat[start : start + len(words)] == words
    assert not mask[:start].any() and not mask[start + len(words):].any()
    assert start == len(tokenizer(f"{IM_START}user\n").input_ids)  # the template's head (ChatML) is never content
    assert not spec.content_tokens_mask("", MAX_SEQUENCE_LENGTH).any()


# --- (a) the timestep convention: ZImagePipeline's own run, replayed ----------------------------------------------
@pytest.mark.parametrize("steps", [3, 8])
def test_the_step_replays_zimage_pipelines_run_with_its_timestep_convention(zimage, steps):
    """Our flow scheduler (the model's fixed shift) stepping ZImage.denoise's output gives the latents
    ZImagePipeline itself gives (guidance 0: one pass per step), byte for byte: the transformer is fed 1 - sigma
    and its output negated is the velocity."""
    from cupscale_dist.method.schedulers import kind_of, make_scheduler

    z = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    theirs = zimage.pipe(GLOBAL, height=64, width=64, num_inference_steps=steps, guidance_scale=0.0, latents=z.clone(),
                         output_type="latent", max_sequence_length=MAX_SEQUENCE_LENGTH).images
    scheduler = make_scheduler("flow_euler", dict(zimage.pipe.scheduler.config))
    kind_of(scheduler).set_timesteps(scheduler, steps, image_tokens=16)
    reference = type(zimage.pipe.scheduler).from_config(zimage.pipe.scheduler.config)
    reference.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps))
    assert torch.equal(scheduler.timesteps, reference.timesteps)  # the fixed shift 3: no token count moves it
    context = zimage_context(zimage.backbone, 1, (8, 8))
    latents = z
    for t in scheduler.timesteps:
        velocity = predict_views(zimage.backbone, latents, t, 1.0, context, [0], np.array([[0, 0, 8, 8]]))
        latents = scheduler.step(velocity, t, latents).prev_sample
    assert torch.equal(latents, theirs)


def test_img2img_from_the_stages_start_point_replays_zimage_img2img(zimage):
    """strength 0.6 of Turbo's 8 steps: our plan runs round(0.6 * 8) = 5 steps from the stage's start point
    (stage_start: the scheduler's scale_noise of the stage latent at timesteps[3]); ZImageImg2ImgPipeline, given that
    start latent, runs the same 5 steps (its int(8 - 4.8) = 3) to the same bytes."""
    from diffusers import ZImageImg2ImgPipeline
    from PIL import Image

    from cupscale_dist import UpscaleConfig
    from cupscale_dist.method.prior import stage_start
    from cupscale_dist.method.schedulers import kind_of, make_scheduler
    from cupscale_dist.plan import denoising_steps

    gen = torch.Generator().manual_seed(6)
    z_low, noise = torch.randn(1, 16, 8, 8, generator=gen), torch.randn(1, 16, 8, 8, generator=gen)
    steps = denoising_steps(UpscaleConfig(steps=8, strength=0.6))
    scheduler = make_scheduler("flow_euler", dict(zimage.pipe.scheduler.config))
    kind_of(scheduler).set_timesteps(scheduler, 8, image_tokens=16)
    start = 8 - steps
    scheduler.set_begin_index(start)
    _, z_start = stage_start(scheduler, start, z_low, z_low, noise, "haar", 1)
    img2img = ZImageImg2ImgPipeline(**zimage.pipe.components)
    img2img.set_progress_bar_config(disable=True)
    calls = []
    hook = zimage.pipe.transformer.register_forward_hook(lambda *args: calls.append(1))
    try:
        theirs = img2img(GLOBAL, image=Image.new("RGB", (64, 64)), strength=0.6, num_inference_steps=8,
                         guidance_scale=0.0, latents=z_start.clone(), output_type="latent",
                         max_sequence_length=MAX_SEQUENCE_LENGTH).images
    finally:
        hook.remove()
    context = zimage_context(zimage.backbone, 1, (8, 8))
    latents = z_start
    for t in scheduler.timesteps[start:]:
        velocity = predict_views(zimage.backbone, latents, t, 1.0, context, [0], np.array([[0, 0, 8, 8]]))
        latents = scheduler.step(velocity, t, latents).prev_sample
    assert steps == len(calls) == 5 and torch.equal(latents, theirs)


def test_cfg_is_diffusers_guidance_plus_one(zimage):
    """Our CFG scale s (uncond + s (cond - uncond)) is ZImagePipeline's guidance g = s - 1 (pos + g (pos - neg))."""
    from cupscale_dist.method.schedulers import kind_of, make_scheduler

    z = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    theirs = zimage.pipe(GLOBAL, negative_prompt=NEGATIVE, height=64, width=64, num_inference_steps=3,
                         guidance_scale=2.0, latents=z.clone(), output_type="latent",
                         max_sequence_length=MAX_SEQUENCE_LENGTH).images
    scheduler = make_scheduler("flow_euler", dict(zimage.pipe.scheduler.config))
    kind_of(scheduler).set_timesteps(scheduler, 3, image_tokens=16)
    context = zimage_context(zimage.backbone, 1, (8, 8), guidance_scale=3.0)
    latents = z
    for t in scheduler.timesteps:
        velocity = predict_views(zimage.backbone, latents, t, 1.0, context, [0], np.array([[0, 0, 8, 8]]))
        latents = scheduler.step(velocity, t, latents).prev_sample
    assert (latents - theirs).abs().max() <= 1e-5
    assert (latents - z).abs().max() > 1e-2


# --- (c) lambda = 1, nothing screened: the stock transformer, bit for bit ----------------------------------------
@pytest.mark.parametrize("positions", ["global", "local"])
def test_lambda_one_nothing_screened_is_the_stock_transformer(zimage, positions):
    """Two views in one batch, each at its own positions: each row equals diffusers' forward for that view with its
    image ids moved by the view's offset (local: not moved), negated."""
    backbone = zimage.backbone
    rects = np.array([[0, 0, 8, 8], [4, 6, 12, 14]])
    context = zimage_context(backbone, 2, (12, 14), positions=positions,
                             token_allowed=np.ones((2, MAX_SEQUENCE_LENGTH), dtype=bool))
    windows = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    out = predict_views(backbone, windows, 700.0, 1.0, context, [0, 1], rects)
    offsets = [(0, 0), (2, 3)] if positions == "global" else [(0, 0), (0, 0)]
    caption = global_caption(backbone, context)
    t = torch.full((2,), 0.3)
    expected = stock_velocity(backbone.transformer, windows, t, [caption, caption], offsets)
    assert torch.equal(out, expected)
    if positions == "global":
        unmoved = stock_velocity(backbone.transformer, windows, t, [caption, caption], [(0, 0), (0, 0)])
        assert not torch.allclose(out[1], unmoved[1], atol=1e-4)  # the second view's own positions reached it


def test_positions_past_axes_lens_are_the_rope_formulas_not_an_index_error(small_table):
    """A 24x24 stage latent of two 16x16 views on a model whose table ends at 8 patches: the second view's patches
    reach 11. diffusers' table raises there; the backbone gives the bytes of the same weights with a longer table."""
    backbone = small_table.backbone
    rects = np.array([[0, 0, 16, 16], [8, 8, 24, 24]])
    context = zimage_context(backbone, 2, (24, 24))
    windows = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    caption = global_caption(backbone, context)
    t = torch.full((2,), 0.3)
    with pytest.raises(IndexError):
        stock_velocity(backbone.transformer, windows, t, [caption, caption], [(0, 0), (4, 4)])
    out = predict_views(backbone, windows, 700.0, 1.0, context, [0, 1], rects)
    longer = stock_velocity(backbone.transformer, windows, t, [caption, caption], [(0, 0), (4, 4)], (256, 16, 16))
    assert torch.equal(out, longer)


# --- (b) one caption length per stage -------------------------------------------------------------------------------
def test_every_view_of_a_stage_sits_at_the_same_image_position(zimage):
    """Views whose regional prompts pad to 32 and to 64 tokens: every batch gets the stage's one caption length
    (64), so a view's prediction does not depend on its batch companions' captions; the ids put every image at 65."""
    backbone = zimage.backbone
    prompts = (GLOBAL, REGIONAL, LONG, NEGATIVE)
    rects = np.array([[0, 0, 8, 8], [0, 4, 8, 12]])
    context = zimage_context(backbone, 2, (8, 12), prompts, view_prompt=[0, 1], lambda_global=0.5)
    lengths = backbone.prompt_lengths(context)
    assert lengths["global"] <= 32 and lengths["regional"][0] <= 32 < lengths["regional"][1] <= 64
    seen = []
    original = backbone.forward
    backbone.forward = lambda *args, **kw: seen.append(args[3]) or original(*args, **kw)
    try:
        windows = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(5))
        together = predict_views(backbone, windows, 600.0, 1.0, context, [0, 1], rects)
        alone = predict_views(backbone, windows[:1], 600.0, 1.0, context, [0], rects[:1])
    finally:
        del backbone.forward
    assert seen == [64, 64]
    assert (together[0] - alone[0]).abs().max() <= 1e-6
    assert view_image_ids(rects, 64, "global")[:, :16, 0].eq(65).all()


def test_a_shorter_caption_is_its_tokens_then_pad_tokens_then_masked_filler(zimage):
    """A caption of n tokens in a 64-token stream: its pad tokens up to 32 are attended as diffusers attends them;
    the filler past 32 gets zero weight (changing it changes nothing)."""
    backbone = zimage.backbone
    embeds = torch.from_numpy(backbone.encode_prompts([GLOBAL], MAX_SEQUENCE_LENGTH)[0])
    n = caption_lengths(embeds)[0]
    feats, kept = backbone.caption_stream(embeds, [n], 64)
    assert kept[0, :32].all() and not kept[0, 32:].any()
    assert torch.equal(feats[0, n:], backbone.transformer.cap_pad_token.expand(64 - n, -1))
    g, image = 64, 16
    query, key, value = (torch.randn(1, image + g, 2, 16, generator=torch.Generator().manual_seed(s)) for s in range(3))
    bias = torch.zeros(1, 1, 1, image + g).masked_fill(~torch.cat([torch.ones(1, image, dtype=torch.bool), kept],
                                                                  dim=1)[:, None, None], float("-inf"))
    base = composed_attention(query, key, value, ZRegional(image, g, 0, bias))
    moved = value.clone()
    moved[:, image + 32:] += 100.0
    assert torch.equal(composed_attention(query, key, moved, ZRegional(image, g, 0, bias))[:, : image + 32],
                       base[:, : image + 32])


# --- (c) screening and the composer ---------------------------------------------------------------------------------
def screen(allowed: torch.Tensor) -> torch.Tensor:
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))[:, None, None, :]


@pytest.mark.parametrize("composer,lam", [("mix", 1.0), ("mix", 0.4), ("joint", 0.4)])
def test_screened_global_tokens_get_zero_weight_from_the_views_image_queries(composer, lam):
    """A screened global token's value moves no image output of the screened row, but moves that row's global caption
    stream (caption->caption is never screened) and the unscreened row's image outputs."""
    image, g, r = 6, 5, 4
    gen = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, image + g + r, 2, 8, generator=gen) for _ in range(3))
    allowed = torch.ones(2, g, dtype=torch.bool)
    allowed[1, 1:3] = False
    regional = ZRegional(image, g, r, None, screen(allowed), lam, composer)
    base = composed_attention(query, key, value, regional)
    moved = value.clone()
    moved[:, image + 1 : image + 3] += 100.0
    out = composed_attention(query, key, moved, regional)
    assert torch.equal(out[1, :image], base[1, :image])
    assert not torch.allclose(out[0, :image], base[0, :image])
    assert not torch.allclose(out[1, image : image + g], base[1, image : image + g])


def test_the_views_own_caption_drives_its_image_tokens_at_lambda_zero():
    """lambda 0: the image queries attend [image; regional] alone; the global caption's values move nothing there."""
    image, g, r = 6, 5, 4
    gen = torch.Generator().manual_seed(1)
    query, key, value = (torch.randn(1, image + g + r, 2, 8, generator=gen) for _ in range(3))
    regional = ZRegional(image, g, r, lambda_global=0.0)
    moved = value.clone()
    moved[:, image : image + g] += 100.0
    assert torch.equal(composed_attention(query, key, moved, regional)[:, :image],
                       composed_attention(query, key, value, regional)[:, :image])
    moved = value.clone()
    moved[:, image + g :] += 100.0
    assert not torch.allclose(composed_attention(query, key, moved, regional)[:, :image],
                              composed_attention(query, key, value, regional)[:, :image])


def test_view_masks_and_regional_prompts_reach_every_single_stream_layer(zimage):
    """Through predict_views: the screened row's output differs from the unscreened one, the other row's does not;
    every single-stream layer composes (the refiners never do)."""
    backbone = zimage.backbone
    rects = np.array([[0, 0, 8, 8], [0, 4, 8, 12]])
    allowed = np.ones((2, MAX_SEQUENCE_LENGTH), dtype=bool)
    allowed[1, 6:9] = False
    context = zimage_context(backbone, 2, (8, 12), token_allowed=allowed, lambda_global=0.5)
    windows = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    seen = []
    original = backbone.processor.__class__.__call__

    def spy(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        seen.append(self.bound)
        return original(self, attn, hidden_states, encoder_hidden_states, attention_mask, freqs_cis)

    backbone.processor.__class__.__call__ = spy
    try:
        screened = predict_views(backbone, windows, 700.0, 1.0, context, [0, 1], rects)
    finally:
        backbone.processor.__class__.__call__ = original
    assert len(seen) == len(backbone.transformer.layers) and all(b is not None for b in seen)
    assert all(b.num_regional_tokens == b.num_global_tokens for b in seen)
    assert torch.isinf(seen[0].global_bias[1, 0, 0, 6:9]).all() and not torch.isinf(seen[0].global_bias[0]).any()
    plain = predict_views(backbone, windows, 700.0, 1.0, dataclasses.replace(context, token_allowed=None), [0, 1],
                          rects)
    assert torch.equal(screened[0], plain[0]) and not torch.allclose(screened[1], plain[1], atol=1e-5)


def test_probe_reads_image_to_caption_maps_of_the_single_stream_layers(zimage):
    backbone = zimage.backbone
    embeds = torch.from_numpy(backbone.encode_prompts([GLOBAL], MAX_SEQUENCE_LENGTH)[0])
    pixels = np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    noise = torch.randn(1, 16, 8, 6, generator=torch.Generator().manual_seed(0))
    maps = backbone.probe(zimage.pipe.vae, pixels, noise, 500, 0.0, embeds, None)
    assert maps.shape == (MAX_SEQUENCE_LENGTH, 4, 3) and bool((maps >= 0).all())
    # softmax weights of image queries on caption keys: positive, below 1 in sum (image keys take the rest)
    assert 0 < float(maps.sum(dim=0).max()) < 1 and not maps[32:].any()


# --- (b) positions: tiled == untiled with global positions, not with local ---------------------------------------
class PositionalStandIn(torch.nn.Module):
    """A ZImageTransformer2DModel stand-in: no layers; its RoPE settings are the tiny model's."""

    def __init__(self):
        super().__init__()
        self.register_buffer("anchor", torch.zeros(()))
        self.layers = torch.nn.ModuleList()
        self.rope_embedder = SimpleNamespace(axes_dims=list(AXES_DIMS), theta=256.0)

    device = property(lambda self: self.anchor.device)
    dtype = property(lambda self: self.anchor.dtype)


class PositionalZImage(ZImage):
    """Each latent pixel's output is a function of its value and of its patch's RoPE rotations (the ids the backbone
    builds for the view), nothing else."""

    def forward(self, latents, t, streams, caption, ids, screen=None, lambda_global=1.0, composer="mix", probe=None):
        height, width = latents.shape[-2:]
        rope = self.rope(ids.reshape(-1, 3)).view(*ids.shape[:2], -1)
        position = (rope.real * 0.3 + rope.imag * 0.7).mean(dim=-1)[:, : (height // 2) * (width // 2), None]
        return torch.sin(3 * latents) * 0.7 + 0.1 * latents + unpatchify(position.expand(-1, -1, 64), height, width)


def tiled_minus_untiled(positions: str) -> float:
    z = torch.randn(1, 16, 20, 28, generator=torch.Generator().manual_seed(7))
    worker = SimpleNamespace(_context=None, controlnet=None, backbone=PositionalZImage(PositionalStandIn()))
    worker.predict = ModelWorker.predict.__get__(worker)
    worker.unet = worker.backbone.transformer
    views = make_views(20, 28, 8, 4)
    executor = LocalExecutor(worker, batch_size=5)
    embeds = torch.ones(1, 4, 8)
    context = executor.share(StageContext(embeds, embeds, embeds, np.zeros(len(views), dtype=np.int64), None, None,
                                          (20, 28), 8, 1.0, 1.0, "mix", family=ZImageStage(positions)))
    tiled = reduce_predictions(predict_step(executor, context, z, views, 500, 1.0), views, z.shape)
    whole = np.array([[0, 0, 20, 28]])
    untiled = reduce_predictions(predict_step(executor, context, z, whole, 500, 1.0), whole, z.shape)
    return float((tiled - untiled).abs().max())


def test_positional_stand_in_tiled_equals_untiled_with_global_positions():
    assert tiled_minus_untiled("global") <= 1e-6


def test_positional_stand_in_tiled_differs_from_untiled_with_local_positions():
    """The same test fails with positions: local: the tiles restart at 0, so they disagree with the whole image."""
    assert tiled_minus_untiled("local") > 1e-3


# --- the global prior under Z-Image's flow convention ---------------------------------------------------------------
@pytest.mark.parametrize("levels", [1, 2])
def test_the_flow_prior_is_exact_under_zimage_turbos_schedule(levels):
    """Z-Image-Turbo's scheduler (fixed shift 3), 8 steps at strength 0.6, the first step with w = 1: x0 of the
    velocity the scheduler steps with, in its own convention (scale_noise(x0, t, x0 + v) == x_t), has LL = G (the
    stage input's low band); the high bands are those of the unadjusted velocity's x0."""
    from cupscale_dist.method.prior import GlobalPrior
    from cupscale_dist.method.schedulers import kind_of, make_scheduler
    from cupscale_dist.method.step import StageSchedule, reduce_and_step
    from cupscale_dist.method.wavelets import dwt2
    from cupscale_dist.testing.tiny_zimage import TURBO_SCHEDULER

    scheduler = make_scheduler("flow_euler", TURBO_SCHEDULER)
    kind_of(scheduler).set_timesteps(scheduler, 8, image_tokens=4096)
    start = 8 - 5
    scheduler.set_begin_index(start)
    gen = torch.Generator().manual_seed(0)
    z_low, noise, z_t, velocity = (torch.randn(1, 16, 16, 24, generator=gen) for _ in range(4))
    prior = GlobalPrior.from_latent(z_low, noise, "haar", levels)
    schedule = StageSchedule(scheduler, start, prior, "x0", prior_fraction=1.0, prior_schedule="linear")
    fresh = type(scheduler).from_config(scheduler.config)
    kind_of(fresh).set_timesteps(fresh, 8, image_tokens=4096)
    received = []
    original = scheduler.step
    scheduler.step = lambda v, t, z, **kw: received.append(v) or original(v, t, z, **kw)
    reduce_and_step(z_t, [(range(1), velocity)], np.array([[0, 0, 16, 24]]), schedule, 0)
    sigma = float(scheduler.sigmas[start])
    x0 = z_t - sigma * received[0]
    t = scheduler.timesteps[start].reshape(1)
    assert (fresh.scale_noise(x0, t, x0 + received[0]) - z_t).abs().max() <= 1e-5  # the scheduler's convention
    low, highs = dwt2(x0, "haar", levels)
    low_plain, highs_plain = dwt2(z_t - sigma * velocity, "haar", levels)
    assert (low - prior.low).abs().max() <= 1e-4 and (low_plain - prior.low).abs().max() > 1e-2
    assert all((a - b).abs().max() <= 1e-4 for ha, hb in zip(highs, highs_plain) for a, b in zip(ha, hb))
