"""Regional attention in Z-Image's single-stream layers (method.md steps 7-8, "Other backbones").

A single-stream layer attends over one sequence ``[image; caption]`` (image first). Here a view's sequence holds
``[image | global caption | regional caption]``, each caption stream ``caption_length`` tokens (the stage's one
length; a shorter caption's filler keys are masked for every query), and the priors act on the image queries only:

* each caption stream attends to the image and to itself (as in its own plain pass), never to the other prompt;
* image queries: ``lambda * Attn(Q_img, [K_img; K_global]; screen) + (1 - lambda) * Attn(Q_img, [K_img; K_regional])``
  ('mix'), or one softmax over ``[K_img; K_global; K_regional]`` with log-lambda weights ('joint'); the screen is an
  additive -inf bias on the view's screened global tokens, for image queries only;
* the probe (step 7) records the image queries' head-averaged softmax weights on the global caption's keys.

Z-Image's blocks pass their processor no call inputs beyond the mask and the rotations (``joint_attention_kwargs``
reach no block), so the call's :class:`ZRegional` is bound to the processor around the call (:func:`bound`);
unbound, the processor is diffusers' ``ZSingleStreamAttnProcessor``, and a call with the global caption alone and
nothing screened is never bound: the plain transformer, bit for bit.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from ..flux.joint_attention import attend


@dataclass
class ZRegional:
    """What the composer needs for one transformer call (views, CFG halves included).

    Args:
        image_tokens (int): the sequence starts with this many image tokens (pad patches included)...
        num_global_tokens (int): ...then the global caption stream (the stage's caption length)...
        num_regional_tokens (int): ...then the regional caption stream (0: global prompt only).
        key_bias (tensor (B, 1, 1, T), *optional*): 0 on every kept key, -inf on caption filler keys (all queries).
        global_bias (tensor (B, 1, 1, G), *optional*): 0 where a global token is allowed, -inf where screened
            (image queries only).
        lambda_global (float): lambda of method.md step 8; composer ('mix' | 'joint').
        probe (list, *optional*): each layer appends (B, image_tokens, G) image->global-caption probabilities.
    """

    image_tokens: int
    num_global_tokens: int
    num_regional_tokens: int = 0
    key_bias: torch.Tensor | None = None
    global_bias: torch.Tensor | None = None
    lambda_global: float = 1.0
    composer: str = "mix"
    probe: list | None = None


def rotate(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Z-Image's RoPE (``ZSingleStreamAttnProcessor``'s ``apply_rotary_emb``): interleaved pairs of each head as complex
    numbers times the per-row rotations, x (B, T, H, D), freqs_cis (B, T, D / 2) complex64."""
    with torch.amp.autocast("cuda", enabled=False):
        rotated = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * freqs_cis.unsqueeze(2)
        return torch.view_as_real(rotated).flatten(3).type_as(x)


def image_to_caption_probabilities(query_img, keys, image_tokens: int, num_global: int, bias=None) -> torch.Tensor:
    """(B, S, G): head-averaged softmax weight of each image query on each global-caption key, over the keys
    ``[image; global]`` (explicit softmax: the probe runs once per stage)."""
    scores = torch.einsum("bqhd,bkhd->bhqk", query_img.float(), keys.float()) / math.sqrt(query_img.shape[-1])
    if bias is not None:
        scores = scores + bias.float()
    return scores.softmax(dim=-1)[..., image_tokens : image_tokens + num_global].mean(dim=1)


def composed_attention(query, key, value, regional: ZRegional) -> torch.Tensor:
    """The attention of ``[image | global | regional]`` tokens with the composer on the image queries' caption keys."""
    s, g, r = regional.image_tokens, regional.num_global_tokens, regional.num_regional_tokens
    q_i, q_g, q_r = query.split([s, g, r], dim=1)
    k_i, k_g, k_r = key.split([s, g, r], dim=1)
    v_i, v_g, v_r = value.split([s, g, r], dim=1)
    keys_g, values_g = torch.cat([k_i, k_g], dim=1), torch.cat([v_i, v_g], dim=1)
    keys_r, values_r = torch.cat([k_i, k_r], dim=1), torch.cat([v_i, v_r], dim=1)
    bias_g = bias_r = None  # the filler keys of each stream, for every query
    if regional.key_bias is not None:
        bias = regional.key_bias.to(query.device, query.dtype)
        bias_g, bias_r = bias[..., : s + g], torch.cat([bias[..., :s], bias[..., s + g :]], dim=-1)
    screen_g = bias_g  # image queries: the screen on the global caption's keys on top
    if regional.global_bias is not None:
        screen = regional.global_bias.to(query.device, query.dtype)
        screen = torch.cat([screen.new_zeros(*screen.shape[:-1], s), screen], dim=-1)
        screen_g = screen if bias_g is None else bias_g + screen
    parts = [attend(q_g, keys_g, values_g, bias_g)]  # caption streams: each its own caption and the image
    if r:
        parts.append(attend(q_r, keys_r, values_r, bias_r))
    lam = regional.lambda_global
    if r == 0 or (regional.composer == "mix" and lam == 1.0):
        out_i = attend(q_i, keys_g, values_g, screen_g)
    elif regional.composer == "mix" and lam == 0.0:
        out_i = attend(q_i, keys_r, values_r, bias_r)
    elif regional.composer == "mix":
        out_i = lam * attend(q_i, keys_g, values_g, screen_g) + (1 - lam) * attend(q_i, keys_r, values_r, bias_r)
    else:  # 'joint': one softmax over [image; global; regional] keys, weighted 1, lambda, 1 - lambda
        def log_w(w):
            return math.log(w) if w > 0 else float("-inf")

        weights = torch.cat([torch.zeros(s), torch.full((g,), log_w(lam)), torch.full((r,), log_w(1 - lam))])
        full = weights.to(query.device, query.dtype).expand(query.shape[0], 1, 1, s + g + r).clone()
        if regional.key_bias is not None:
            full = full + regional.key_bias.to(query.device, query.dtype)
        if regional.global_bias is not None:
            full[..., s : s + g] += regional.global_bias.to(query.device, query.dtype)
        out_i = attend(q_i, key, value, full)
    return torch.cat([out_i.to(query.dtype), *parts], dim=1)


class ZImageRegionalProcessor:
    """Z-Image single-stream attention with the regional composer, the screen and the probe (weights stay in the
    module; only the attention between the projections and the output changes). Unbound: the stock processor."""

    def __init__(self) -> None:
        from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor  # where used (flux's)

        self.stock = ZSingleStreamAttnProcessor()
        self.bound: ZRegional | None = None

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, freqs_cis: torch.Tensor | None = None) -> torch.Tensor:
        regional = self.bound
        if regional is None:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, freqs_cis)
        if attention_mask is not None:
            raise ValueError("a bound ZImageRegionalProcessor takes no attention_mask: filler is the key bias")
        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        query, key = rotate(query, freqs_cis), rotate(key, freqs_cis)
        s, g = regional.image_tokens, regional.num_global_tokens
        if regional.probe is not None:
            bias = None if regional.key_bias is None else regional.key_bias[..., : s + g]
            regional.probe.append(image_to_caption_probabilities(query[:, :s], key[:, : s + g], s, g, bias))
        out = composed_attention(query, key, value, regional).flatten(2, 3).to(query.dtype)
        out = attn.to_out[0](out)
        if len(attn.to_out) > 1:  # dropout
            out = attn.to_out[1](out)
        return out


def install_regional_processor(transformer) -> ZImageRegionalProcessor:
    """One :class:`ZImageRegionalProcessor` on every single-stream layer (the refiners keep the stock one: the noise
    refiner sees no caption, the context refiner no image)."""
    processor = ZImageRegionalProcessor()
    for layer in transformer.layers:
        layer.attention.set_processor(processor)
    return processor


@contextlib.contextmanager
def bound(processor: ZImageRegionalProcessor, regional: ZRegional | None):
    """The processor composes ``regional`` for the calls inside the block; stock again after it (an error too)."""
    processor.bound = regional
    try:
        yield
    finally:
        processor.bound = None
