"""Attention control (method.md steps 7-8): screened tokens get exactly zero probability; lambda=1 with nothing
screened is the plain UNet; the composer computes what method.md writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from cupscale_dist.method.attention import RegionalAttention, RegionalAttnProcessor, attention_grid
from cupscale_dist.method.masks import content_token_mask, view_token_masks

TOKENS, DIM, CROSS = 77, 32, 24


@pytest.fixture
def layer():
    torch.manual_seed(0)
    return Attention(query_dim=DIM, cross_attention_dim=CROSS, heads=4, dim_head=8).eval()


def inputs(batch=2, h=4, w=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, h * w, DIM, generator=gen)
    states = torch.randn(batch, 2 * TOKENS, CROSS, generator=gen)
    return hidden, states


def run(layer, hidden, states, regional):
    return RegionalAttnProcessor()(layer, hidden, states, regional=regional)


@pytest.mark.parametrize("composer", ["mix", "joint"])
@pytest.mark.parametrize("mode", ["view", "pixel"])
def test_screened_tokens_get_exactly_zero_attention(layer, composer, mode):
    hidden, states = inputs()
    allowed = torch.ones(2, TOKENS, dtype=torch.bool)
    allowed[0, 3:9] = False
    allowed[1, 20:40] = False
    if mode == "view":
        regional = lambda: RegionalAttention(TOKENS, 0.5, composer, token_allowed=allowed)  # noqa: E731
    else:  # CFG layout: row 0 unconditional (screens nothing), row 1 one 8x12 view seen by a 4x6 layer
        maps = torch.ones(TOKENS, 4, 6, dtype=torch.bool)  # probe-resolution maps of a 16x24 stage latent
        maps[3:9] = maps[20:40] = False
        maps[50, 2] = False  # the view covers probe rows 2-3: token 50 only in its bottom half
        rects = torch.tensor([[8, 12, 16, 24]])
        regional = lambda: RegionalAttention(TOKENS, 0.5, composer, token_maps=maps, rects=rects,  # noqa: E731
                                             latent_hw=(16, 24))
    with torch.no_grad():
        before = run(layer, hidden, states, regional())
        row = 0 if mode == "view" else 1  # pixel mode screens the conditional row only
        poked = states.clone()
        poked[row, 3:9] = 1e4 * torch.randn(6, CROSS)  # a screened token's key/value can be anything...
        poked[1, 20:40] = -3e4 * torch.rand(20, CROSS)  # its weight is exactly 0, so the output is bit-identical
        after = run(layer, hidden, poked, regional())
        assert torch.equal(before, after)
        visible = states.clone()
        visible[row, 10] += 1.0  # an allowed token does matter
        assert not torch.equal(before, run(layer, hidden, visible, regional()))
        if mode == "pixel":
            poked = states.clone()
            poked[0, 3:9] += 5.0  # the unconditional row attends to every token
            assert not torch.equal(before[0], run(layer, hidden, poked, regional())[0])
            poked = states.clone()
            poked[1, 50] += 5.0  # token 50 is screened for the top rows of the view, visible in the bottom rows
            changed = (run(layer, hidden, poked, regional()) != before)[1].any(dim=-1).view(4, 6)
            assert not changed[:2].any() and changed[2:].all()


def test_lambda_one_and_nothing_screened_is_the_plain_layer(layer):
    hidden, states = inputs()
    with torch.no_grad():
        ours = run(layer, hidden, states,
                   RegionalAttention(TOKENS, 1.0, "mix", torch.ones(2, TOKENS, dtype=torch.bool)))
        plain = AttnProcessor2_0()(layer, hidden, states[:, :TOKENS].contiguous())
    assert torch.equal(ours, plain)


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.5, 0.9])
def test_mix_composer_is_the_lambda_blend_of_two_attentions(layer, lam):
    hidden, states = inputs()
    with torch.no_grad():
        ours = run(layer, hidden, states, RegionalAttention(TOKENS, lam, "mix"))
        plain = AttnProcessor2_0()
        expected = lam * plain(layer, hidden, states[:, :TOKENS]) + (1 - lam) * plain(layer, hidden, states[:, TOKENS:])
    assert (ours - expected).abs().max() < 1e-5


def test_joint_composer_at_half_is_one_softmax_over_both_prompts(layer):
    hidden, states = inputs()
    with torch.no_grad():
        ours = run(layer, hidden, states, RegionalAttention(TOKENS, 0.5, "joint"))
        expected = AttnProcessor2_0()(layer, hidden, states)
    assert (ours - expected).abs().max() < 1e-5


def test_attention_grid_follows_unet_downsampling():
    assert attention_grid(16, 16, 64) == (8, 8)
    assert attention_grid(15, 9, 40) == (8, 5)
    with pytest.raises(ValueError):
        attention_grid(16, 16, 50)


def test_view_masks_keep_start_end_and_padding_tokens():
    content = content_token_mask(num_prompt_tokens=6)  # <start> w1 w2 w3 w4 <end>
    assert content[1:5].all() and not content[0] and not content[5:].any()
    maps = np.ones((TOKENS, 4, 4), dtype=bool)
    maps[1] = False  # word 1 appears nowhere
    maps[2, :, :2] = True
    maps[2, :, 2:] = False  # word 2 only on the left half
    views = np.array([[0, 0, 16, 8], [0, 8, 16, 16]])
    allowed = view_token_masks(maps, (16, 16), views, threshold=0.3)
    assert allowed[:, 0].all() and allowed[:, 5:].all()
    assert not allowed[:, 1].any()
    assert allowed[0, 2] and not allowed[1, 2]


def test_a_prompt_weighted_zero_is_not_handed_to_the_layer(layer):
    """lambda 1 under 'mix' never reads the regional prompt: the backbones then pass the global tokens alone (as a
    plain pipeline does: no unread half projected or copied per layer, what the first GPU run's fixed cost per call
    pointed at), and the layer's output is the one it gives with both halves present, masks or not."""
    hidden, states = inputs()
    allowed = torch.ones(2, TOKENS, dtype=torch.bool)
    allowed[1, 5:30] = False
    for token_allowed in (None, allowed):
        regional = RegionalAttention(TOKENS, 1.0, "mix", token_allowed=token_allowed)
        assert not regional.reads_regional
        with torch.no_grad():
            both = run(layer, hidden, states, regional)
            alone = run(layer, hidden, states[:, :TOKENS],
                        RegionalAttention(TOKENS, 1.0, "mix", token_allowed=token_allowed))
        torch.testing.assert_close(alone, both, rtol=0, atol=1e-6)
    assert RegionalAttention(TOKENS, 0.5, "mix").reads_regional
    assert RegionalAttention(TOKENS, 1.0, "joint").reads_regional  # weight 0 inside one softmax: still read


def test_backbones_build_the_global_tokens_alone_when_the_regional_prompt_is_unread():
    from types import SimpleNamespace

    from cupscale_dist.models.backbones.base import UNetBackbone

    gen = torch.Generator().manual_seed(2)
    context = SimpleNamespace(global_embeds=torch.randn(1, TOKENS, CROSS, generator=gen),
                              negative_embeds=torch.randn(1, TOKENS, CROSS, generator=gen),
                              regional_embeds=torch.randn(3, TOKENS, CROSS, generator=gen))
    prompt_ids = torch.tensor([2, 0])
    full = UNetBackbone.encoder_states(context, prompt_ids)  # CFG rows [uncond views; cond views]
    alone = UNetBackbone.encoder_states(context, prompt_ids, regional=False)
    assert full.shape == (4, 2 * TOKENS, CROSS) and alone.shape == (4, TOKENS, CROSS)
    assert torch.equal(alone, full[:, :TOKENS])
    assert torch.equal(full[2, TOKENS:], context.regional_embeds[2])  # cond rows: each view's own regional prompt
    assert torch.equal(full[3, TOKENS:], context.regional_embeds[0])
    assert torch.equal(full[0, TOKENS:], context.negative_embeds[0])  # uncond rows: [negative; negative]
    assert torch.equal(alone[0], context.negative_embeds[0])
    assert UNetBackbone.encoder_states(context, prompt_ids, cfg=False, regional=False).shape == (2, TOKENS, CROSS)
