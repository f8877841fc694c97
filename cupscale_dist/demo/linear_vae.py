"""A linear autoencoder fitted in minutes, then written into diffusers' `AutoencoderKL` exactly (issue 23's first step).

Why: the demo VAE trained from random weights on 2 cores reaches ~25 dB round trip after 2,000 steps, and that is what
loses the picture. A *linear* autoencoder with exactly the linear path of an `AutoencoderKL` (any number of blocks;
the demo's 2, factor 2) fits in a few hundred steps, and can then be embedded in the real class with every nonlinear
part neutralised:

- every ResNet branch and the mid-block attention output are zero, so each block is its (linear) shortcut;
- the only nonlinearities left on the path, `conv_norm_out` (GroupNorm) + SiLU before each `conv_out`, are made linear:
  each GroupNorm group holds content channels beside their mirrors (-c: the group mean is exactly 0) and +K/-K
  constant channels (the group variance is ~K^2 whatever the content: the scale is fixed), and `conv_out` reads
  SiLU(c) - SiLU(-c), which is exactly c; zero padding pads both with SiLU(0) = 0, so borders match too.

Why factor 2: a decoder that upsamples by nearest neighbour and then convolves gives every sub-pixel position of a
latent pixel the same DC gain, so a flat latent decodes to flat blocks; at factor 4 that capped the linear fit near
28 dB on the held-out photos (PCA of 4x4 patches: 35 dB), at factor 2 only patterns of a 2-pixel period are out of
reach (PCA of 2x2 patches, 8 components: 45 dB).

The result is a plain `AutoencoderKL` directory (`from_pretrained`), a starting point that nonlinear fine-tuning can
only improve. `force_upcast` is set: the constants' variance (~1e6) is beyond float16's range.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .schedule import cosine_lr

BLOCK_OUT_CHANNELS = (32, 64)  # 2 blocks: factor 2 (issue 23: factor 4's nearest-upsample decoder caps near 28 dB)
NORM_GROUPS = 8  # per group: content pairs (value, mirror) + 2 constants; 8 channels give 3 pairs, 4 give 1
CONSTANT = 1000.0  # the +/-K channels: the group's std is ~K / sqrt(2) to 1e-6 relative for content below ~5
LOGVAR = -30.0  # diffusers clamps log-variance at -30: a deterministic latent (std 3e-7)


def content_capacity(channels: int, groups: int = NORM_GROUPS) -> int:
    """How many content channels a GroupNorm of ``channels`` in ``groups`` can carry linearly (pairs + 2 constants)."""
    return groups * ((channels // groups - 2) // 2)


def _linear_path(widths: tuple[int, ...], blocks: str, resample: str, samplers: str) -> list[tuple[str, int, int, str]]:
    """(kind, in, out, module path) of each linear layer after conv_in: per block, the first ResNet's 1x1 shortcut
    where the width changes, then the block's resampling conv (all blocks but the last)."""
    layers = []
    for i, width in enumerate(widths):
        previous = widths[max(0, i - 1)]
        if previous != width:
            layers.append(("shortcut", previous, width, f"{blocks}.{i}.resnets.0.conv_shortcut"))
        if i < len(widths) - 1:
            layers.append((resample, width, width, f"{blocks}.{i}.{samplers}.0.conv"))
    return layers


def encoder_layers(blocks: tuple[int, ...]) -> list[tuple[str, int, int, str]]:
    """The linear path of diffusers' Encoder after conv_in (downsampling: stride-2 convs)."""
    return _linear_path(tuple(blocks), "down_blocks", "down", "downsamplers")


def decoder_layers(blocks: tuple[int, ...]) -> list[tuple[str, int, int, str]]:
    """The linear path of diffusers' Decoder after conv_in (widths reversed; upsampling: nearest + conv)."""
    return _linear_path(tuple(reversed(blocks)), "up_blocks", "up", "upsamplers")


def _conv(kind: str, cin: int, cout: int) -> nn.Conv2d:
    if kind == "shortcut":
        return nn.Conv2d(cin, cout, 1)
    return nn.Conv2d(cin, cout, 3, stride=2 if kind == "down" else 1, padding=0 if kind == "down" else 1)


def _apply(kind: str, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    if kind == "down":
        x = F.pad(x, (0, 1, 0, 1))  # diffusers' Downsample2D pads right/bottom
    elif kind == "up":
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
    return conv(x)


class LinearAutoencoder(nn.Module):
    """The linear path of `AutoencoderKL(block_out_channels=blocks, layers_per_block=1)`, layer for layer: the last
    layer before each GroupNorm writes as many content channels as that norm can carry (:func:`content_capacity`)."""

    def __init__(self, latent_channels: int = 8, blocks: tuple[int, ...] = BLOCK_OUT_CHANNELS):
        super().__init__()
        if len(blocks) < 2:
            raise ValueError("the linear path needs at least 2 blocks (one down- and one upsampling)")
        self.latent_channels, self.blocks = latent_channels, tuple(blocks)
        self.enc_kinds = [kind for kind, *_ in encoder_layers(self.blocks)]
        self.dec_kinds = [kind for kind, *_ in decoder_layers(self.blocks)]
        self.encoder_content = content_capacity(self.blocks[-1])
        self.decoder_content = content_capacity(self.blocks[0])
        self.enc_conv_in = nn.Conv2d(3, self.blocks[0], 3, padding=1)
        self.enc_layers = nn.ModuleList(
            _conv(kind, cin, self.encoder_content if i == len(self.enc_kinds) - 1 else cout)
            for i, (kind, cin, cout, _) in enumerate(encoder_layers(self.blocks)))
        self.enc_conv_out = nn.Conv2d(self.encoder_content, latent_channels, 3, padding=1)
        self.dec_conv_in = nn.Conv2d(latent_channels, self.blocks[-1], 3, padding=1)
        self.dec_layers = nn.ModuleList(
            _conv(kind, cin, self.decoder_content if i == len(self.dec_kinds) - 1 else cout)
            for i, (kind, cin, cout, _) in enumerate(decoder_layers(self.blocks)))
        self.dec_conv_out = nn.Conv2d(self.decoder_content, 3, 3, padding=1)

    def encoder_features(self, x: torch.Tensor) -> torch.Tensor:
        """What reaches the encoder's GroupNorm (the content channels)."""
        x = self.enc_conv_in(x)
        for kind, conv in zip(self.enc_kinds, self.enc_layers):
            x = _apply(kind, conv, x)
        return x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc_conv_out(self.encoder_features(x))

    def decoder_features(self, z: torch.Tensor) -> torch.Tensor:
        """What reaches the decoder's GroupNorm (the content channels)."""
        x = self.dec_conv_in(z)
        for kind, conv in zip(self.dec_kinds, self.dec_layers):
            x = _apply(kind, conv, x)
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.dec_conv_out(self.decoder_features(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def _minimise_round_trip(module: nn.Module, round_trip, batches, steps: int, lr: float, floor: float, phase: str,
                         progress=None) -> list:
    """Adam on the MSE of ``round_trip(x)`` against ``x`` over ``batches()`` of [-1, 1] crops; warm-up over 50 steps,
    then cosine to ``floor`` times ``lr``. Returns the loss log (every 50 steps and the last)."""
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    log = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=50, floor=floor)
        x = batches()
        loss = ((round_trip(x) - x) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None:
            progress(step, loss.item())
        if step % 50 == 0 or step == steps - 1:
            log.append({"phase": phase, "step": step, "mse": round(loss.item(), 6)})
    return log


def fit_linear_autoencoder(model: LinearAutoencoder, batches, steps: int, lr: float = 1e-3, progress=None) -> list:
    """Least squares by Adam on batches of [-1, 1] crops (`batches()` -> (B, 3, H, W)); returns the loss log."""
    return _minimise_round_trip(model, model, batches, steps, lr, 0.02, "linear vae", progress)


def finetune_autoencoder_kl(vae, batches, steps: int, lr: float, progress=None) -> list:
    """MSE of the mode round trip on batches of [-1, 1] crops, every weight free (the nonlinear parts now bend past
    the linear limit), cosine to 5 % of ``lr``. Returns the loss log; leaves ``vae`` in eval."""
    vae.train().requires_grad_(True)
    log = _minimise_round_trip(vae, lambda x: vae.decode(vae.encode(x).latent_dist.mode()).sample, batches, steps,
                               lr, 0.05, "vae fine-tuning", progress)
    vae.eval()
    return log


@torch.no_grad()
def whiten_latents(model: LinearAutoencoder, x: torch.Tensor) -> None:
    """Rescale each latent channel to unit std on ``x`` (encoder rows / s, decoder columns * s): the same map."""
    std = model.encode(x).std(dim=(0, 2, 3))
    model.enc_conv_out.weight /= std[:, None, None, None]
    model.enc_conv_out.bias /= std
    model.dec_conv_in.weight *= std[None, :, None, None]


def _group_layout(content: int, channels: int, groups: int) -> tuple[list[int], list[int], list[tuple[int, float]]]:
    """Per group: content channels at even offsets with their mirrors after them, then +K/-K constants."""
    size = channels // groups
    per_group = math.ceil(content / groups)
    if 2 * per_group + 2 > size:
        raise ValueError(f"{content} content channels do not fit {groups} groups of {size} with their mirrors "
                         "and constants")
    values, mirrors, constants = [], [], []
    for g in range(groups):
        start = g * size
        here = min(per_group, content - len(values))
        values += [start + 2 * i for i in range(here)]
        mirrors += [start + 2 * i + 1 for i in range(here)]
        rest = range(start + 2 * here, start + size)
        if len(rest) % 2:
            raise ValueError("each group needs an even number of constant channels (+K, -K) for a zero mean")
        constants += [(ch, CONSTANT if i % 2 == 0 else -CONSTANT) for i, ch in enumerate(rest)]
    return values, mirrors, constants


def _write_content_conv(conv: nn.Conv2d, weight, bias, layout) -> None:
    values, mirrors, constants = layout
    w, b = torch.zeros_like(conv.weight), torch.zeros_like(conv.bias)
    w[values], b[values] = weight, bias
    w[mirrors], b[mirrors] = -weight, -bias
    for channel, value in constants:
        b[channel] = value
    conv.weight.copy_(w)
    conv.bias.copy_(b)


def _write_linear_norm_and_out(norm: nn.GroupNorm, conv_out: nn.Conv2d, weight, bias, layout) -> None:
    """GroupNorm -> SiLU -> conv_out computing ``conv(content, weight, bias)`` (rows beyond ``weight``'s stay zero):
    the norm passes each content channel and its mirror unchanged (the constants fix the group std), and conv_out
    takes SiLU(c) - SiLU(-c) = c (sigmoid(c) + sigmoid(-c) = 1): exact at any scale and in any precision."""
    values, mirrors, constants = layout
    size = norm.num_channels // norm.num_groups
    constants_per_group = sum(1 for channel, _ in constants if channel < size)
    sigma = CONSTANT * math.sqrt(constants_per_group / size)  # the group std the constants set
    gamma = torch.zeros_like(norm.weight)
    gamma[values] = gamma[mirrors] = sigma  # the constants' own gamma 0: SiLU(0) = 0, as in the zero padding
    norm.weight.copy_(gamma)
    norm.bias.zero_()
    rows = weight.shape[0]
    w = torch.zeros_like(conv_out.weight)
    w[:rows][:, values] = weight
    w[:rows][:, mirrors] = -weight
    b = torch.zeros_like(conv_out.bias)
    b[:rows] = bias
    conv_out.weight.copy_(w)
    conv_out.bias.copy_(b)


@torch.no_grad()
def embed_in_autoencoder_kl(model: LinearAutoencoder, sample_size: int = 128):
    """An `AutoencoderKL` whose mode round trip is ``model``'s (to float rounding)."""
    from diffusers import AutoencoderKL

    lc, blocks = model.latent_channels, model.blocks
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * len(blocks), up_block_types=("UpDecoderBlock2D",) * len(blocks),
        block_out_channels=blocks, layers_per_block=1, latent_channels=lc, norm_num_groups=NORM_GROUPS,
        sample_size=sample_size, force_upcast=True).float()
    for name, module in vae.named_modules():  # every residual branch adds nothing: each block is its shortcut
        if name.endswith(("conv2", "to_out.0")):
            module.weight.zero_()
            module.bias.zero_()
    enc, dec = vae.encoder, vae.decoder

    def copy(target: nn.Conv2d, source: nn.Conv2d):
        target.weight.copy_(source.weight)
        target.bias.copy_(source.bias)

    def write_path(root: nn.Module, layers, sources, norm, conv_out, source_out):
        *inner, (_, _, width, last) = layers
        for (_, _, _, path), source in zip(inner, sources):
            copy(root.get_submodule(path), source)
        layout = _group_layout(source_out.in_channels, width, NORM_GROUPS)
        _write_content_conv(root.get_submodule(last), sources[-1].weight, sources[-1].bias, layout)
        _write_linear_norm_and_out(norm, conv_out, source_out.weight, source_out.bias, layout)

    copy(enc.conv_in, model.enc_conv_in)
    write_path(enc, encoder_layers(blocks), list(model.enc_layers), enc.conv_norm_out, enc.conv_out,
               model.enc_conv_out)
    enc.conv_out.bias[lc:] = LOGVAR
    vae.quant_conv.weight.copy_(torch.eye(2 * lc)[:, :, None, None])
    vae.quant_conv.bias.zero_()
    vae.post_quant_conv.weight.copy_(torch.eye(lc)[:, :, None, None])
    vae.post_quant_conv.bias.zero_()

    copy(dec.conv_in, model.dec_conv_in)
    write_path(dec, decoder_layers(blocks), list(model.dec_layers), dec.conv_norm_out, dec.conv_out,
               model.dec_conv_out)
    return vae
