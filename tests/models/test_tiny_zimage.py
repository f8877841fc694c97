"""The tiny Z-Image(-Turbo) test model, and the facts of diffusers' Z-Image (0.42.1) the Z-Image backbone relies on
(issue 36; docs/zimage-notes.md has the file/line references).

1. ``build_tiny_zimage`` is seeded and deterministic, writes a directory ``ZImagePipeline.from_pretrained`` loads
   offline, and diffusers' own ZImagePipeline (with and without CFG) and ZImageImg2ImgPipeline run on it end to end.
2. Facts, pinned on the real diffusers classes:
   (a) the image tokens' first-axis RoPE position is the caption's padded length (a multiple of 32) + 1: two
       caption lengths in different 32-blocks move the image, and the move changes the output; the caption's pad
       tokens are attended to (not masked);
   (b) positions past ``axes_lens`` (the precomputed RoPE table) raise an IndexError; ``zimage_facts.rope_freqs``, the
       same formula without a table, equals the table inside it and a longer table past it;
   (c) the transformer is fed t = 1 - sigma and its output negated is what FlowMatchEuler steps with; Turbo's sigmas;
   (d) prompt embeds: Qwen3's second-to-last hidden layer over the ChatML text, pad tokens dropped;
   (e) the refiners see the image alone and the caption alone, the single-stream layers [image; caption]; attention
       processors get no call inputs beyond mask and RoPE (regional inputs must be bound to them).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from cupscale_dist.testing import zimage_facts as facts
from cupscale_dist.testing.tiny_zimage import (
    AXES_LENS,
    MAX_SEQUENCE_LENGTH,
    SMALL_AXES_LENS,
    TURBO_SCHEDULER,
    build_tiny_zimage,
    chat_text,
    zimage_transformer,
)

LONG_PROMPT = ("a high resolution photo of a mountain landscape with snow and trees under a blue sky, a small house "
               "with a red roof by the lake, detailed")


@pytest.fixture(scope="module")
def pipe(zimage_dir):
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(zimage_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def digests(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def image(size: tuple[int, int] = (8, 6), seed: int = 0) -> list[torch.Tensor]:
    """One (16, 1, h, w) latent, the transformer's input layout."""
    return [torch.randn(16, 1, *size, generator=torch.Generator().manual_seed(seed))]


def caption(tokens: int, seed: int = 1) -> list[torch.Tensor]:
    return [torch.randn(tokens, 32, generator=torch.Generator().manual_seed(seed))]


# -- 1. the model ---------------------------------------------------------------------------------------------------
def test_the_build_is_seeded_deterministic_and_loads_offline(zimage_dir, tmp_path, pipe):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen2Tokenizer, Qwen3Model

    assert digests(build_tiny_zimage(tmp_path / "again")) == digests(Path(zimage_dir))  # same seed, same bytes
    other = digests(build_tiny_zimage(tmp_path / "seed1", seed=1))
    assert other["transformer/diffusion_pytorch_model.safetensors"] != \
        digests(Path(zimage_dir))["transformer/diffusion_pytorch_model.safetensors"]
    assert isinstance(pipe.transformer, ZImageTransformer2DModel) and isinstance(pipe.text_encoder, Qwen3Model)
    assert isinstance(pipe.tokenizer, Qwen2Tokenizer) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    config = pipe.transformer.config
    assert (tuple(config.all_patch_size), config.in_channels, tuple(config.axes_lens)) == ((2,), 16, AXES_LENS)
    assert (config.rope_theta, config.t_scale) == (256.0, 1000.0)
    assert config.cap_feat_dim == pipe.text_encoder.config.hidden_size
    assert config.dim // config.n_heads == sum(config.axes_dims)
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor, pipe.vae_scale_factor) == (0.3611, 0.1159, 8)
    assert {k: pipe.scheduler.config[k] for k in TURBO_SCHEDULER} == TURBO_SCHEDULER
    small = ZImageTransformer2DModel.from_pretrained(build_tiny_zimage(tmp_path / "small", axes_lens=SMALL_AXES_LENS),
                                                     subfolder="transformer")
    assert tuple(small.config.axes_lens) == SMALL_AXES_LENS


def test_text_to_image_runs_end_to_end(pipe):
    for guidance, negative in ((0.0, None), (2.0, "blurry")):  # Turbo's one pass; CFG's two
        out = pipe("a photo of a cat", negative_prompt=negative, height=48, width=64, num_inference_steps=2,
                   guidance_scale=guidance, generator=torch.Generator().manual_seed(0), output_type="pt",
                   max_sequence_length=MAX_SEQUENCE_LENGTH).images
        assert out.shape == (1, 3, 48, 64) and torch.isfinite(out).all()


def test_img2img_runs_end_to_end_from_the_strengths_start_point(zimage_dir):
    from diffusers import ZImageImg2ImgPipeline

    pipe = ZImageImg2ImgPipeline.from_pretrained(zimage_dir)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    out = pipe("a dog in the park", image=torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(0)),
               strength=0.6, num_inference_steps=8, guidance_scale=0.0, generator=torch.Generator().manual_seed(0),
               output_type="pt", max_sequence_length=MAX_SEQUENCE_LENGTH,
               callback_on_step_end=lambda p, i, t, kw: seen.append(float(t)) or {}).images
    assert out.shape == (1, 3, 64, 48) and torch.isfinite(out).all()
    # strength 0.6 of 8 steps: int(8 - 4.8) = 3 skipped, 5 run, as the plan's round(0.6 * 8) = 5
    assert len(seen) == 5 and seen[0] == pytest.approx(float(pipe.scheduler.timesteps[3]))


# -- 2a. the image sits after the padded caption ------------------------------------------------------------------
def test_image_first_position_is_the_captions_padded_length_plus_one():
    from diffusers.models.transformers import transformer_z_image

    assert facts.SEQ_MULTI_OF == transformer_z_image.SEQ_MULTI_OF == 32
    model = zimage_transformer(0)
    for tokens, padded in ((1, 32), (5, 32), (31, 32), (32, 32), (33, 64), (40, 64), (64, 64)):
        _, _, _, img_ids, cap_ids, img_pad, _ = model.patchify_and_embed(image(), caption(tokens), 2, 1)
        img_ids, cap_ids = img_ids[0], cap_ids[0]
        assert facts.padded_length(tokens) == padded
        assert set(img_ids[~img_pad[0], 0].tolist()) == {padded + 1} == {facts.image_first_position(tokens)}
        # a 4 x 3-patch image: 12 tokens at (padded + 1, row, col), padded to 32 with (0, 0, 0)
        assert torch.equal(img_ids[:12], facts.image_position_ids(tokens, 4, 3))
        assert torch.equal(img_ids[12:], torch.zeros(20, 3, dtype=torch.int32)) and img_pad[0][12:].all()
        # caption ids (1 .. padded, 0, 0); rows past `padded` (diffusers appends pad ids twice) are cut off when the
        # sequence is built (_prepare_sequence keeps feats.shape[1] rows)
        assert torch.equal(cap_ids[:padded], facts.caption_position_ids(tokens))
    # a view's offset: the grid helper the transformer pads with takes a start, as global positions need
    patches = torch.zeros(12, 64)
    _, ids, _, _, _ = model._pad_with_ids(patches, (1, 4, 3), (facts.image_first_position(5), 7, 11), "cpu")
    assert torch.equal(ids[:12], facts.image_position_ids(5, 4, 3, top=7, left=11))


def test_two_caption_lengths_move_the_image_in_the_pipeline(pipe):
    seen = []

    class Recorder:  # the first RoPE call of a forward is the image's (x embed & refine, before the caption's)
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, ids):
            seen.append(ids.clone())
            return self.inner(ids)

    stock = pipe.transformer.rope_embedder
    pipe.transformer.rope_embedder = Recorder(stock)
    try:
        lengths, firsts = [], []
        for prompt in ("a cat", LONG_PROMPT):
            embeds, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False,
                                           max_sequence_length=MAX_SEQUENCE_LENGTH)
            lengths.append(len(embeds[0]))
            seen.clear()
            pipe(prompt, height=32, width=32, num_inference_steps=1, guidance_scale=0.0, output_type="latent",
                 generator=torch.Generator().manual_seed(0), max_sequence_length=MAX_SEQUENCE_LENGTH)
            image_ids = seen[0][:4]  # 2 x 2 patches, then pad ids
            firsts.append(set(image_ids[:, 0].tolist()))
    finally:
        pipe.transformer.rope_embedder = stock
    assert lengths[0] < 32 < lengths[1] <= MAX_SEQUENCE_LENGTH
    assert firsts == [{33}, {65}] == [{facts.image_first_position(n)} for n in lengths]


def test_the_image_position_and_the_caption_pad_tokens_change_the_output():
    model = zimage_transformer(0)
    t = torch.tensor([0.4])

    def run(tokens=5, shift=0):
        stock = model.patchify_and_embed

        def shifted(*args):
            out = stock(*args)
            for ids in out[3]:
                ids[:, 0] += shift  # the image's first axis only, as a longer caption would move it
            return out

        model.patchify_and_embed = shifted
        try:
            with torch.no_grad():
                return model(image(), t, caption(tokens), return_dict=False)[0][0]
        finally:
            del model.patchify_and_embed

    plain = run()
    assert torch.equal(run(), plain)
    assert not torch.allclose(run(shift=32), plain, atol=1e-4)  # where a 33-64-token caption would put it
    # the 27 pad tokens of a 5-token caption are the learned cap_pad_token and attend (no mask): not neutral
    with torch.no_grad():
        model.cap_pad_token.add_(1.0)
    try:
        assert not torch.allclose(run(), plain, atol=1e-4)
        full = run(tokens=32)
        with torch.no_grad():
            model.cap_pad_token.sub_(1.0)
        assert torch.equal(run(tokens=32), full)  # a 32-token caption has no pad token
    finally:
        with torch.no_grad():
            model.cap_pad_token.zero_()


def test_the_layers_see_image_then_caption_and_processors_get_no_call_inputs():
    """For the regional processors: the refiners see the image alone and the caption alone, the single-stream layers
    [image; caption] in that order (Flux's joint attention is [text; image]); a processor is called with the hidden
    states, the batch-padding mask and per-row RoPE rotations only: ``joint_attention_kwargs`` reach no block, and the
    model has no ``set_attn_processor`` (each block's ``attention.set_processor``)."""
    from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor

    model = zimage_transformer(0)
    assert not hasattr(model, "set_attn_processor")
    seen = {}

    class Recording(ZSingleStreamAttnProcessor):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None,
                     **extra):
            seen[self.name] = (hidden_states.shape[1], freqs_cis, attention_mask, encoder_hidden_states, extra)
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, freqs_cis)

    t = torch.tensor([0.6])
    with torch.no_grad():
        stock = model(image(), t, caption(5), return_dict=False)[0][0]
        for group in ("noise_refiner", "context_refiner", "layers"):
            for index, block in enumerate(getattr(model, group)):
                block.attention.set_processor(Recording(f"{group}.{index}"))
        recorded = model(image(), t, caption(5), joint_attention_kwargs={"regional": "ignored"},
                         return_dict=False)[0][0]
    assert torch.equal(recorded, stock)
    assert set(seen) == {"noise_refiner.0", "context_refiner.0", "layers.0", "layers.1"}
    assert all(mask is None and states is None and extra == {} for _, _, mask, states, extra in seen.values())
    rope = model.rope_embedder
    image_rot = rope(facts.image_position_ids(5, 4, 3))
    caption_rot = rope(facts.caption_position_ids(5))
    assert seen["noise_refiner.0"][0] == 32 and torch.equal(seen["noise_refiner.0"][1][0, :12], image_rot)
    assert seen["context_refiner.0"][0] == 32 and torch.equal(seen["context_refiner.0"][1][0], caption_rot)
    length, rotations = seen["layers.0"][:2]
    assert length == 64  # 12 image tokens padded to 32, then the 5-token caption padded to 32
    assert torch.equal(rotations[0, :12], image_rot) and torch.equal(rotations[0, 32:], caption_rot)


# -- 2b. positions past the RoPE table -----------------------------------------------------------------------------
def test_positions_past_axes_lens_raise_an_index_error():
    model = zimage_transformer(0, SMALL_AXES_LENS)  # 8 patches per image axis
    with torch.no_grad():
        assert model(image((16, 16)), torch.tensor([0.5]), caption(5), return_dict=False)[0][0].shape == (16, 1, 16, 16)
        with pytest.raises(IndexError, match="index 8 is out of bounds for dimension 0 with size 8"):
            model(image((18, 16)), torch.tensor([0.5]), caption(5), return_dict=False)
    # the first axis too: image position = padded caption + 1 must be < axes_lens[0]
    short = zimage_transformer(0, (34, 8, 8))
    with torch.no_grad():
        short(image(), torch.tensor([0.5]), caption(31), return_dict=False)  # image at 33, the table's last row
        with pytest.raises(IndexError, match="index 65 is out of bounds for dimension 0 with size 34"):
            short(image(), torch.tensor([0.5]), caption(40), return_dict=False)  # image at 65


def test_the_rope_formula_equals_the_table_inside_it_and_a_longer_table_past_it():
    from diffusers.models.transformers.transformer_z_image import RopeEmbedder

    model = zimage_transformer(0, SMALL_AXES_LENS)
    rope = model.rope_embedder
    grid = torch.stack(torch.meshgrid(torch.arange(SMALL_AXES_LENS[0]), torch.arange(8), torch.arange(8),
                                      indexing="ij"), dim=-1).reshape(-1, 3).to(torch.int32)
    assert torch.equal(facts.rope_freqs(grid, rope.axes_dims, rope.theta), rope(grid))
    past = torch.tensor([[65, 8, 9], [1000, 511, 512], [1536, 1023, 1023]], dtype=torch.int32)  # 16K's global ids
    longer = RopeEmbedder(theta=rope.theta, axes_dims=rope.axes_dims, axes_lens=[1537, 1024, 1024])
    assert torch.equal(facts.rope_freqs(past, rope.axes_dims, rope.theta), longer(past))
    cos, sin = facts.rope_cos_sin(past, rope.axes_dims, rope.theta)
    assert torch.equal(torch.complex(cos, sin), longer(past))
    half = facts.rope_freqs(torch.tensor([[33.0, 7.5, 0.5]]), rope.axes_dims, rope.theta)  # half-patch offsets
    assert torch.isfinite(torch.view_as_real(half)).all() and torch.allclose(half.abs(), torch.ones(1))


def test_formula_rope_runs_past_the_table_as_a_longer_table_would():
    small = zimage_transformer(0, SMALL_AXES_LENS)
    wide = zimage_transformer(0, AXES_LENS)  # same seed: the same weights (the table is no parameter)
    assert all(torch.equal(a, b) for a, b in zip(small.state_dict().values(), wide.state_dict().values()))
    small.rope_embedder = facts.FormulaRope.of(small)
    t = torch.tensor([0.3])
    with torch.no_grad():
        for size in ((16, 16), (18, 24)):  # inside the small table; past it on both image axes
            assert torch.equal(small(image(size), t, caption(5), return_dict=False)[0][0],
                               wide(image(size), t, caption(5), return_dict=False)[0][0])


# -- 2c. the timestep convention -----------------------------------------------------------------------------------
def test_the_transformer_sees_one_minus_sigma_and_the_scheduler_steps_its_negated_output(pipe):
    from diffusers import FlowMatchEulerDiscreteScheduler

    latents = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(3))
    calls, after = [], []

    def hook(module, args, kwargs):
        calls.append((args[0][0].clone(), args[1].clone(), args[2][0].clone()))

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipe("a photo of a cat", height=32, width=48, num_inference_steps=3, guidance_scale=0.0, latents=latents,
             output_type="latent", max_sequence_length=MAX_SEQUENCE_LENGTH,
             callback_on_step_end=lambda p, i, t, kw: after.append(kw["latents"].clone()) or {})
    finally:
        handle.remove()
    scheduler = FlowMatchEulerDiscreteScheduler(**TURBO_SCHEDULER)
    scheduler.set_timesteps(sigmas=torch.linspace(1.0, 1 / 3, 3).tolist(), mu=0.0)  # the pipeline's default sigmas
    sigmas = scheduler.sigmas
    x = latents
    for step, (x_in, t_in, embeds) in enumerate(calls):
        assert torch.equal(x_in, x[0].unsqueeze(1))  # (C, 1, h, w): the frame axis the pipeline adds
        assert torch.allclose(t_in, 1 - sigmas[step:step + 1], atol=1e-7)  # t = 1 - sigma, not sigma
        with torch.no_grad():
            out = pipe.transformer([x_in], t_in, [embeds], return_dict=False)[0][0]
        velocity = -out.squeeze(1)[None].float()  # v = noise - x0: what FlowMatchEuler's step expects
        x = x + (sigmas[step + 1] - sigmas[step]) * velocity
        assert torch.equal(x, after[step])
    assert len(calls) == 3


def test_turbo_sigmas_are_the_fixed_shift_of_the_pipelines_linspace():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas

    scheduler = FlowMatchEulerDiscreteScheduler(**TURBO_SCHEDULER)
    for mu in (0.5, 1.15):  # the pipeline passes a dynamic-shift mu; Turbo's config ignores it
        scheduler.set_timesteps(sigmas=get_default_z_image_sigmas(8), mu=mu)
        s = torch.linspace(1.0, 1 / 8, 8, dtype=torch.float64)
        assert torch.allclose(scheduler.sigmas[:-1].double(), 3 * s / (1 + 2 * s), atol=1e-6)
        assert scheduler.sigmas[-1] == 0 and torch.allclose(scheduler.timesteps, scheduler.sigmas[:-1] * 1000)
    # Tongyi-MAI's own loop (sigma_min 0, 9 steps, the final t = 0 skipped) runs the same 8 sigmas
    original = FlowMatchEulerDiscreteScheduler(**TURBO_SCHEDULER)
    original.sigma_min = 0.0
    original.set_timesteps(9, mu=1.0)
    assert torch.allclose(original.sigmas[:8], scheduler.sigmas[:8], atol=1e-6) and original.timesteps[8] == 0


# -- 2d. the prompt embeds -----------------------------------------------------------------------------------------
def test_prompt_embeds_are_qwen3s_second_to_last_layer_over_the_chat_text(pipe):
    prompts = ["a cat", LONG_PROMPT]
    for prompt in prompts:
        text = pipe.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True, enable_thinking=True)
        assert text == chat_text(prompt) == f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    passed = list(prompts)
    embeds, negative = pipe.encode_prompt(passed, do_classifier_free_guidance=False,
                                          max_sequence_length=MAX_SEQUENCE_LENGTH)
    assert negative == []
    assert passed == [chat_text(p) for p in prompts]  # diffusers writes the chat text into the caller's list
    for prompt, got in zip(prompts, embeds):
        ids = pipe.tokenizer(chat_text(prompt), truncation=True, max_length=MAX_SEQUENCE_LENGTH,
                             return_tensors="pt").input_ids
        with torch.no_grad():
            hidden = pipe.text_encoder(input_ids=ids, output_hidden_states=True).hidden_states
        assert len(hidden) == pipe.text_encoder.config.num_hidden_layers + 1  # embeddings + every layer
        assert got.shape == (ids.shape[1], 32)  # its own length: the batch's pad tokens dropped
        assert torch.allclose(got, hidden[-2][0], atol=1e-5)
        assert not torch.allclose(got, hidden[-1][0], atol=1e-2)
    # a caption is capped at max_sequence_length tokens (the chat text's tail, assistant prompt included, cut off)
    capped, _ = pipe.encode_prompt(LONG_PROMPT, do_classifier_free_guidance=False, max_sequence_length=16)
    assert len(capped[0]) == 16
