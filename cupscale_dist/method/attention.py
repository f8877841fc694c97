"""Attention processors: the regional attention prior and the attention composer (method.md steps 7-8).

Installed with ``UNet2DConditionModel.set_attn_processor``; weights stay in the modules. Per call, the UNet is
given ``cross_attention_kwargs={"regional": RegionalAttention(...)}`` and encoder states laid out as
``[global tokens | regional tokens]`` along the sequence axis. Without ``regional`` the processor is diffusers'
plain ``AttnProcessor2_0``, so a bare UNet call through it is the plain UNet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0


@dataclass
class RegionalAttention:
    """What the composer needs for one UNet call (a batch of views, CFG halves included).

    Args:
        num_global_tokens (int): encoder states hold this many global tokens, then the regional ones.
        lambda_global (float): lambda of method.md step 8; 1 = global prompt only.
        composer ('mix' | 'joint'): two softmaxes blended by lambda, or one softmax over both key sets.
        token_allowed (bool tensor (B, G), *optional*): view mode; False = token screened out of this view.
        token_maps (bool tensor (G, hp, wp), *optional*): pixel mode: the stage's binary token maps at probe
            resolution; with ``rects`` (V, 4) the views' latent rectangles and ``latent_hw`` the stage latent
            size. The batch is CFG's [V unconditional; V conditional] rows; only the conditional half is screened.
        cfg (bool): False when the batch holds the V conditional rows only (guidance off: one pass per view).
    """

    num_global_tokens: int
    lambda_global: float = 0.5
    composer: Literal["mix", "joint"] = "mix"
    token_allowed: torch.Tensor | None = None
    token_maps: torch.Tensor | None = None
    rects: torch.Tensor | None = None
    latent_hw: tuple[int, int] | None = None
    cfg: bool = True
    _bias_cache: dict = field(default_factory=dict, repr=False)

    @property
    def reads_regional(self) -> bool:
        """Whether the composer reads the regional prompt at all: not when 'mix' weights it 0 (lambda 1). Then the
        backbones hand the model the global tokens alone: no regional keys and values projected, and no per-layer
        copy of a sliced half (140 such copies per SDXL call, bench/op_count.py)."""
        return not (self.lambda_global == 1.0 and self.composer == "mix")

    def global_bias(self, query_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """Additive bias over the global tokens, (B, 1, Lq or 1, G): 0 where allowed, -inf where screened.

        Built once per resolution and call (an additive bias costs ~1.5% where a boolean mask cost ~29%,
        architecture.md). None when nothing is screened, so the unmasked kernel runs.
        """
        key = (query_len, dtype, device)
        if key not in self._bias_cache:
            allowed = self._allowed_at(query_len)
            bias = None
            if allowed is not None and not bool(allowed.all()):
                bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
                bias.masked_fill_(~allowed.to(device), float("-inf"))
                bias = bias.unsqueeze(1)
            self._bias_cache[key] = bias
        return self._bias_cache[key]

    def _allowed_at(self, query_len: int) -> torch.Tensor | None:
        """Boolean (B, Lq or 1, G) allowed-token table for a layer with ``query_len`` query pixels."""
        if self.token_maps is not None:
            return self._pixel_allowed_at(query_len)
        if self.token_allowed is not None:
            return self.token_allowed.unsqueeze(1)
        return None


    def _pixel_allowed_at(self, query_len: int) -> torch.Tensor:
        """(B, Lq, G): each attention pixel of each view looks up its token maps by index arithmetic.

        Attention pixel i of a view maps to latent row ``top + i * view_h // h`` and that to probe row
        ``latent_row * hp // H`` (nearest at both steps); no full-resolution map is ever built.
        """
        maps, rects = self.token_maps, self.rects
        top, left, bottom, right = rects.T
        view_h, view_w = int(bottom[0] - top[0]), int(right[0] - left[0])  # a stage's views share one size
        height, width = attention_grid(view_h, view_w, query_len)
        (latent_h, latent_w), (probe_h, probe_w) = self.latent_hw, maps.shape[1:]
        rows = (top[:, None] + torch.arange(height) * view_h // height) * probe_h // latent_h  # (V, h)
        cols = (left[:, None] + torch.arange(width) * view_w // width) * probe_w // latent_w  # (V, w)
        cond = maps[:, rows[:, :, None], cols[:, None, :]]  # (G, V, h, w)
        cond = cond.permute(1, 2, 3, 0).reshape(len(rects), height * width, maps.shape[0])
        if not self.cfg:
            return cond
        return torch.cat([torch.ones_like(cond), cond])  # CFG layout: [unconditional views; conditional views]


def attention_grid(height: int, width: int, query_len: int) -> tuple[int, int]:
    """The (h, w) of an attention layer whose queries number ``query_len``, for a latent of height x width.

    UNet downsamplers are stride-2 convs with padding 1, so each level has ceil(size / 2) pixels per side.
    """
    while height * width > query_len:
        height, width = -(-height // 2), -(-width // 2)
    if height * width != query_len:
        raise ValueError(f"no UNet level of a {height}x{width} latent has {query_len} query pixels")
    return height, width


class RegionalAttnProcessor:
    """Cross-attention with the regional attention prior and the composer of method.md step 8.

    ``out = lambda * Attn(Q, K_global, V_global; mask) + (1 - lambda) * Attn(Q, K_regional, V_regional)``
    ('mix'), or one softmax over ``[global; regional]`` keys with the mask and log-lambda weights ('joint').
    Self-attention, and any call without ``regional``, is plain ``AttnProcessor2_0``.
    """

    def __init__(self) -> None:
        if not hasattr(F, "scaled_dot_product_attention"):
            raise ImportError("RegionalAttnProcessor needs torch >= 2.0 (scaled_dot_product_attention)")
        self.plain = AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        regional: RegionalAttention | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is None or regional is None:
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        n = regional.num_global_tokens
        global_states, regional_states = encoder_hidden_states[:, :n], encoder_hidden_states[:, n:]
        bias = regional.global_bias(hidden_states.shape[1], hidden_states.dtype, hidden_states.device)
        if regional.lambda_global == 1.0 and bias is None:
            # Regional prompt weighted 0, nothing screened: exactly the plain UNet (method.md invariant).
            return self.plain(attn, hidden_states, global_states, attention_mask, temb)
        if (attention_mask is not None or hidden_states.ndim != 3 or attn.spatial_norm is not None
                or attn.group_norm is not None):
            raise ValueError("RegionalAttnProcessor supports the UNet's transformer cross-attention layers only")

        batch = hidden_states.shape[0]
        heads = lambda x: x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)  # noqa: E731
        states = encoder_hidden_states  # [global; regional], or the global tokens alone (not reads_regional)
        if attn.norm_cross:  # each half on its own, as two prompts (a GroupNorm here would pool their statistics)
            halves = (global_states, regional_states) if regional.reads_regional else (global_states,)
            states = torch.cat([attn.norm_encoder_hidden_states(h) for h in halves], dim=1)
        query = heads(attn.to_q(hidden_states))
        # Keys and values of both halves in one projection each (per token, so the same as two), then split as
        # views: no copy of a sliced half per layer, half the GEMM launches.
        keys, values = heads(attn.to_k(states)), heads(attn.to_v(states))
        key_g, value_g = keys[:, :, :n], values[:, :, :n]
        key_r = value_r = None  # absent where the composer never reads them (the states hold no such half)
        if regional.reads_regional:
            key_r, value_r = keys[:, :, n:], values[:, :, n:]
        if attn.norm_q is not None:
            query, key_g = attn.norm_q(query), attn.norm_k(key_g)
            key_r = None if key_r is None else attn.norm_k(key_r)

        if regional.composer == "mix" and regional.lambda_global in (0.0, 1.0):
            # One prompt has weight 0: skip its attention entirely (masks-only runs cost one SDPA, not two).
            key, value = (key_g, value_g) if regional.lambda_global == 1.0 else (key_r, value_r)
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias if regional.lambda_global else None)
        elif regional.composer == "mix":
            out = mix_attention(query, key_g, value_g, key_r, value_r, bias, regional.lambda_global)
        else:
            out = joint_attention(query, key_g, value_g, key_r, value_r, bias, regional.lambda_global)
        out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[-1]).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def mix_attention(query, key_g, value_g, key_r, value_r, bias, lambda_global):
    """lambda-blend of two attentions, computed in ONE batched SDPA call (queries stacked twice)."""
    batch = query.shape[0]
    if bias is not None:  # the regional half is never screened (global and regional hold 77 tokens each)
        bias = torch.cat([bias, torch.zeros_like(bias)])
    both = F.scaled_dot_product_attention(
        torch.cat([query, query]), torch.cat([key_g, key_r]), torch.cat([value_g, value_r]), attn_mask=bias
    )
    return lambda_global * both[:batch] + (1 - lambda_global) * both[batch:]


def joint_attention(query, key_g, value_g, key_r, value_r, bias, lambda_global):
    """One softmax over [global; regional] keys; log(lambda) / log(1 - lambda) weight the two sets."""
    q_len, g_len, r_len = query.shape[2], key_g.shape[2], key_r.shape[2]
    log_w = lambda w: math.log(w) if w > 0 else float("-inf")  # noqa: E731
    weights = torch.cat([
        torch.full((g_len,), log_w(lambda_global), dtype=query.dtype, device=query.device),
        torch.full((r_len,), log_w(1 - lambda_global), dtype=query.dtype, device=query.device),
    ])
    full = weights.expand(query.shape[0], 1, q_len, g_len + r_len).clone()
    if bias is not None:
        full[..., :g_len] += bias
    return F.scaled_dot_product_attention(
        query, torch.cat([key_g, key_r], dim=2), torch.cat([value_g, value_r], dim=2), attn_mask=full
    )


class AttentionProbe:
    """Records cross-attention probabilities (softmax over the prompt tokens) of attn2 layers (method.md step 7).

    ``maps[query_len]`` collects (B, Lq, tokens) head-averaged probabilities per layer. Explicit softmax: the
    probe runs once per stage at the model's native size, so speed does not matter here.
    """

    def __init__(self) -> None:
        self.maps: dict[int, list[torch.Tensor]] = {}

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        batch = hidden_states.shape[0]
        heads = lambda x: x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)  # noqa: E731
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query = heads(attn.to_q(hidden_states))
        key, value = heads(attn.to_k(encoder_hidden_states)), heads(attn.to_v(encoder_hidden_states))
        probs = (query.float() @ key.float().transpose(-1, -2) * attn.scale).softmax(dim=-1)
        self.maps.setdefault(hidden_states.shape[1], []).append(probs.mean(dim=1))
        out = (probs.to(value.dtype) @ value).transpose(1, 2).reshape(batch, -1, attn.heads * value.shape[-1])
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor

    def lowest_resolution_map(self) -> torch.Tensor:
        """(B, Lq, tokens): probabilities averaged over the layers of the lowest-resolution level."""
        return torch.stack(self.maps[min(self.maps)]).mean(dim=0)


def install_regional_processors(unet) -> None:
    """Put RegionalAttnProcessor on every attention layer (plain behaviour unless `regional` is passed)."""
    unet.set_attn_processor(RegionalAttnProcessor())


def probe_processors(unet, probe: AttentionProbe) -> dict:
    """Processor dict for ``set_attn_processor``: the probe on attn2 (cross) layers, plain elsewhere."""
    return {name: (probe if name.endswith("attn2.processor") else AttnProcessor2_0()) for name in unet.attn_processors}
