"""Regional attention in a DiT's joint attention (method.md "Other backbones"): Flux's double- and single-stream blocks.

Text and image tokens attend jointly: one sequence ``[text; image]`` with queries, keys and values from both. The
C-Upscale priors act on the image->text block only:

* the text stream holds ``[global tokens | regional tokens]``; each text stream attends to itself and the image
  (as it would in its own plain pass), never to the other prompt;
* image queries: ``lambda * Attn(Q_img, [K_global; K_img]; mask) + (1 - lambda) * Attn(Q_img, [K_regional; K_img])``
  ('mix'), or one softmax over ``[K_global; K_regional; K_img]`` with log-lambda weights ('joint'); the mask
  screens the view's global-prompt tokens (an additive -inf bias on those keys, image queries only);
* every row of the batch (each view, each CFG half) gets its own rotary positions (``rotary``): the view's global
  position in the stage latent, which Flux's stock processor cannot take (one set of ids per batch).

With nothing screened and no regional tokens (lambda = 1) the attention is the stock ``FluxAttnProcessor``'s call,
so the plain transformer is reproduced bit for bit. Installed with ``set_attn_processor``; the transformer is given
``joint_attention_kwargs={"regional": JointRegional(...)}``; without it the processor is the stock one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn

# diffusers' transformer_flux is imported where a Flux model is used, not here: importing it loads all of
# diffusers.models.transformers (and peft through its hooks), ~2.6 CPU s that every SDXL worker and CLI process paid.


@dataclass
class JointRegional:
    """What the joint-attention composer needs for one transformer call (views, CFG halves included).

    Args:
        num_global_tokens (int): the text stream starts with this many global-prompt tokens...
        num_regional_tokens (int): ...then this many regional-prompt tokens (0: global prompt only).
        rotary (tuple of tensors (B, T + S, D)): cos and sin of each row's (text + image) positions.
        lambda_global (float): lambda of method.md step 8.
        composer ('mix' | 'joint'): two softmaxes blended by lambda, or one with log-lambda key weights.
        global_bias (tensor (B, 1, 1, G), *optional*): 0 where a global token is allowed, -inf where screened.
        probe (list, *optional*): when a list, each double-stream block appends its head-averaged image->text
            probabilities (B, S, G) of the joint softmax (the attention probe, method.md step 7).
    """

    num_global_tokens: int
    num_regional_tokens: int
    rotary: tuple[torch.Tensor, torch.Tensor]
    lambda_global: float = 0.5
    composer: str = "mix"
    global_bias: torch.Tensor | None = None
    probe: list | None = None

    @property
    def text_tokens(self) -> int:
        return self.num_global_tokens + self.num_regional_tokens

    @property
    def plain(self) -> bool:
        """Global prompt only, nothing screened: the stock joint attention."""
        return self.num_regional_tokens == 0 and self.global_bias is None


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Flux's real-valued RoPE (diffusers ``apply_rotary_emb``, ``use_real_unbind_dim=-1``) with one position table
    per batch row: x (B, S, H, D), cos/sin (B, S, D). Same arithmetic, so equal bytes where the rows agree."""
    cos, sin = cos[:, :, None, :].to(x.device), sin[:, :, None, :].to(x.device)
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


def attend(query, key, value, bias=None) -> torch.Tensor:
    """SDPA in the (B, S, H, D) layout of diffusers' attention dispatch."""
    out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                         attn_mask=bias)
    return out.transpose(1, 2)


def image_to_text_probabilities(query_img, keys, num_global: int) -> torch.Tensor:
    """(B, S, G): head-averaged joint-softmax weight of each image query on each global-prompt key (explicit
    softmax: the probe runs once per stage)."""
    scores = torch.einsum("bqhd,bkhd->bhqk", query_img.float(), keys.float()) / math.sqrt(query_img.shape[-1])
    return scores.softmax(dim=-1)[..., :num_global].mean(dim=1)


def composed_attention(query, key, value, regional: JointRegional) -> torch.Tensor:
    """The joint attention of ``[global | regional | image]`` tokens with the composer on the image->text block."""
    g, r = regional.num_global_tokens, regional.num_regional_tokens
    image = query.shape[1] - g - r
    q_g, q_r, q_i = query.split([g, r, image], dim=1)
    k_g, k_r, k_i = key.split([g, r, image], dim=1)
    v_g, v_r, v_i = value.split([g, r, image], dim=1)
    keys_g, values_g = torch.cat([k_g, k_i], dim=1), torch.cat([v_g, v_i], dim=1)
    keys_r, values_r = torch.cat([k_r, k_i], dim=1), torch.cat([v_r, v_i], dim=1)
    bias_g = None  # over [global; image] keys: the screen on the global part, image keys untouched
    if regional.global_bias is not None:
        bias = regional.global_bias.to(query.device, query.dtype)
        bias_g = torch.cat([bias, bias.new_zeros(*bias.shape[:-1], image)], dim=-1)
    parts = [attend(q_g, keys_g, values_g)]  # text streams: each its own prompt and the image, never masked
    if r:
        parts.append(attend(q_r, keys_r, values_r))
    lam = regional.lambda_global
    if r == 0 or (regional.composer == "mix" and lam == 1.0):
        out_i = attend(q_i, keys_g, values_g, bias_g)
    elif regional.composer == "mix" and lam == 0.0:
        out_i = attend(q_i, keys_r, values_r)
    elif regional.composer == "mix":
        out_i = lam * attend(q_i, keys_g, values_g, bias_g) + (1 - lam) * attend(q_i, keys_r, values_r)
    else:  # 'joint': one softmax; global keys weighted lambda, regional 1 - lambda, image keys 1
        def log_w(w):
            return math.log(w) if w > 0 else float("-inf")

        weights = torch.cat([torch.full((g,), log_w(lam)), torch.full((r,), log_w(1 - lam)), torch.zeros(image)])
        full = weights.to(query.device, query.dtype).expand(query.shape[0], 1, 1, g + r + image).clone()
        if regional.global_bias is not None:
            full[..., :g] += regional.global_bias.to(query.device, query.dtype)
        out_i = attend(q_i, key, value, full)
    return torch.cat([*parts, out_i.to(query.dtype)], dim=1)


class JointRegionalProcessor:
    """Flux attention (double- and single-stream blocks) with per-row positions and the regional composer.

    The projections, norms and output layers are the module's own (weights stay in the module); only the
    attention between them changes. Without ``regional`` this is diffusers' ``FluxAttnProcessor``.
    """

    def __init__(self) -> None:
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections

        self.stock, self.projections = FluxAttnProcessor(), _get_qkv_projections

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None,
                 regional: JointRegional | None = None) -> torch.Tensor:
        if regional is None:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if attention_mask is not None:
            raise ValueError("JointRegionalProcessor takes no attention_mask: screening is the regional bias")
        query, key, value, encoder_query, encoder_key, encoder_value = self.projections(
            attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        double_stream = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if double_stream:  # the text stream has its own projections here; single-stream blocks get [text; image]
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        cos, sin = regional.rotary
        query, key = rotate(query, cos, sin), rotate(key, cos, sin)
        if regional.probe is not None and double_stream:
            regional.probe.append(image_to_text_probabilities(query[:, regional.text_tokens:], key,
                                                              regional.num_global_tokens))
        if regional.plain:  # the stock call: bit for bit the plain transformer
            out = dispatch_attention_fn(query, key, value, backend=self.stock._attention_backend,
                                        parallel_config=self.stock._parallel_config)
        else:
            out = composed_attention(query, key, value, regional)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        text_len = encoder_hidden_states.shape[1]
        text, image = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
        return attn.to_out[1](attn.to_out[0](image.contiguous())), attn.to_add_out(text.contiguous())


class BoundJointProcessor(JointRegionalProcessor):
    """For a model that does not hand ``joint_attention_kwargs`` to its blocks (diffusers' FluxControlNetModel): the
    caller binds the call's regional inputs to ``bound`` around the call; unbound, it is the stock processor."""

    def __init__(self) -> None:
        super().__init__()
        self.bound: JointRegional | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 regional: JointRegional | None = None):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                regional or self.bound)


def install_joint_processors(transformer) -> None:
    """Put JointRegionalProcessor on every attention layer (stock behaviour unless ``regional`` is passed)."""
    transformer.set_attn_processor(JointRegionalProcessor())
