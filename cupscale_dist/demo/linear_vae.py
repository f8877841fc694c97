"""A linear autoencoder fitted in minutes, then written into diffusers' `AutoencoderKL` exactly (issue 23's first step).

Why: the demo VAE trained from random weights on 2 cores reaches ~25 dB round trip after 2,000 steps, and that is what
loses the picture. A *linear* autoencoder with exactly the linear path of an `AutoencoderKL` (3 blocks, factor 4) fits
in a few hundred steps, and can then be embedded in the real class with every nonlinear part neutralised:

- every ResNet branch and the mid-block attention output are zero, so each block is its (linear) shortcut;
- the only nonlinearities left on the path, `conv_norm_out` (GroupNorm) + SiLU before each `conv_out`, are made linear:
  each GroupNorm group holds content channels beside their mirrors (-c: the group mean is exactly 0) and +K/-K
  constant channels (the group variance is ~K^2 whatever the content: the scale is fixed), and the content is offset by
  ``SILU_OFFSET`` where SiLU is the identity to ~1e-5; a constant channel (SiLU(offset), zero-padded like the content)
  lets `conv_out` remove the offset exactly, borders included.

The result is a plain `AutoencoderKL` directory (`from_pretrained`), a starting point that nonlinear fine-tuning can
only improve. Stored in float32: the offset cancellation needs more than float16's 11 bits (`force_upcast` is set).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .train import cosine_lr

BLOCK_OUT_CHANNELS = (32, 64, 64)  # as the shipped demo VAE: factor 4, ~1 M parameters
NORM_GROUPS = 8  # 8 channels per group at 64 (2 content pairs + 2 constants), 4 at 32 (1 pair + 2 constants)
DECODER_CONTENT = 8  # content channels before the decoder's conv_out: one pair per group of the 32-channel stage
CONSTANT = 1000.0  # the +/-K channels: the group's std is ~K / sqrt(2) to 1e-6 relative for content below ~5
SILU_OFFSET = 20.0  # SiLU(20 + x) = 20 + x to ~1e-6 for |x| <= 3 (at 14 the error was 2e-4)
CONTENT_RANGE = 3.0  # content is scaled into +/-3 around the offset before SiLU
LOGVAR = -30.0  # diffusers clamps log-variance at -30: a deterministic latent (std 3e-7)


class LinearAutoencoder(nn.Module):
    """The linear path of `AutoencoderKL(block_out_channels=(32, 64, 64), layers_per_block=1)`, layer for layer."""

    def __init__(self, latent_channels: int = 16):
        super().__init__()
        c0, c1, c2 = BLOCK_OUT_CHANNELS
        self.latent_channels = latent_channels
        # encoder: conv_in, down block 0's downsampler, block 1's shortcut (32 -> 64), block 1's downsampler, conv_out
        self.enc_conv_in = nn.Conv2d(3, c0, 3, padding=1)
        self.enc_down0 = nn.Conv2d(c0, c0, 3, stride=2)
        self.enc_shortcut = nn.Conv2d(c0, c1, 1)
        self.enc_down1 = nn.Conv2d(c1, latent_channels, 3, stride=2)
        self.enc_conv_out = nn.Conv2d(latent_channels, latent_channels, 3, padding=1)
        # decoder: conv_in, up blocks 0 and 1's upsamplers (nearest x2 + conv), block 2's shortcut (64 -> 32), conv_out
        self.dec_conv_in = nn.Conv2d(latent_channels, c2, 3, padding=1)
        self.dec_up0 = nn.Conv2d(c2, c1, 3, padding=1)
        self.dec_up1 = nn.Conv2d(c1, c1, 3, padding=1)
        self.dec_shortcut = nn.Conv2d(c1, DECODER_CONTENT, 1)
        self.dec_conv_out = nn.Conv2d(DECODER_CONTENT, 3, 3, padding=1)

    def encoder_content(self, x: torch.Tensor) -> torch.Tensor:
        x = self.enc_down0(F.pad(self.enc_conv_in(x), (0, 1, 0, 1)))  # diffusers' Downsample2D pads right/bottom
        return self.enc_down1(F.pad(self.enc_shortcut(x), (0, 1, 0, 1)))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc_conv_out(self.encoder_content(x))

    def decoder_content(self, z: torch.Tensor) -> torch.Tensor:
        x = self.dec_up0(F.interpolate(self.dec_conv_in(z), scale_factor=2.0, mode="nearest"))
        return self.dec_shortcut(self.dec_up1(F.interpolate(x, scale_factor=2.0, mode="nearest")))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.dec_conv_out(self.decoder_content(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def fit_linear_autoencoder(model: LinearAutoencoder, batches, steps: int, lr: float = 1e-3, progress=None) -> list:
    """Least squares by Adam on batches of [-1, 1] crops (`batches()` -> (B, 3, H, W)); returns the loss log."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    log = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=50, floor=0.02)
        x = batches()
        loss = ((model(x) - x) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None:
            progress(step, loss.item())
        if step % 50 == 0 or step == steps - 1:
            log.append({"phase": "linear vae", "step": step, "mse": round(loss.item(), 6)})
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
        raise ValueError(f"{content} content channels do not fit {groups} groups of {size} with their mirrors and constants")
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


def _write_linear_norm_and_out(norm: nn.GroupNorm, conv_out: nn.Conv2d, weight, bias, layout, content_max: float):
    """GroupNorm -> SiLU -> conv_out computing ``conv(content, weight, bias)`` (rows beyond ``weight``'s stay zero)."""
    values, _, constants = layout
    size = norm.num_channels // norm.num_groups
    constants_per_group = sum(1 for channel, _ in constants if channel < size)
    sigma = CONSTANT * math.sqrt(constants_per_group / size)  # the group std the constants set
    scale = CONTENT_RANGE / max(content_max, 1e-6)
    gamma, beta = torch.zeros_like(norm.weight), torch.zeros_like(norm.bias)
    gamma[values], beta[values] = scale * sigma, SILU_OFFSET
    offset_channel = constants[0][0]
    beta[offset_channel] = SILU_OFFSET  # gamma 0: SiLU(offset) everywhere inside, 0 in the padding, as the content
    norm.weight.copy_(gamma)
    norm.bias.copy_(beta)
    silu_offset = SILU_OFFSET * torch.sigmoid(torch.tensor(SILU_OFFSET, dtype=torch.float64)).item()
    rows = weight.shape[0]
    w = torch.zeros_like(conv_out.weight)
    w[:rows][:, values] = weight / scale
    w[:rows, offset_channel] = -(SILU_OFFSET / scale) * weight.sum(dim=1) / silu_offset
    b = torch.zeros_like(conv_out.bias)
    b[:rows] = bias
    conv_out.weight.copy_(w)
    conv_out.bias.copy_(b)


@torch.no_grad()
def embed_in_autoencoder_kl(model: LinearAutoencoder, x: torch.Tensor, sample_size: int = 128):
    """An `AutoencoderKL` whose mode round trip is ``model``'s; ``x`` (a batch of crops) sizes the content ranges."""
    from diffusers import AutoencoderKL

    lc = model.latent_channels
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=BLOCK_OUT_CHANNELS, layers_per_block=1, latent_channels=lc, norm_num_groups=NORM_GROUPS,
        sample_size=sample_size, force_upcast=True).float()
    for name, module in vae.named_modules():  # every residual branch adds nothing: each block is its shortcut
        if name.endswith(("conv2", "to_out.0")):
            module.weight.zero_()
            module.bias.zero_()
    enc, dec = vae.encoder, vae.decoder

    def copy(target: nn.Conv2d, source: nn.Conv2d):
        target.weight.copy_(source.weight)
        target.bias.copy_(source.bias)

    copy(enc.conv_in, model.enc_conv_in)
    copy(enc.down_blocks[0].downsamplers[0].conv, model.enc_down0)
    copy(enc.down_blocks[1].resnets[0].conv_shortcut, model.enc_shortcut)
    layout = _group_layout(lc, BLOCK_OUT_CHANNELS[-1], NORM_GROUPS)
    _write_content_conv(enc.down_blocks[1].downsamplers[0].conv, model.enc_down1.weight, model.enc_down1.bias, layout)
    _write_linear_norm_and_out(enc.conv_norm_out, enc.conv_out, model.enc_conv_out.weight, model.enc_conv_out.bias,
                               layout, model.encoder_content(x).abs().max().item())
    enc.conv_out.bias[lc:] = LOGVAR
    vae.quant_conv.weight.copy_(torch.eye(2 * lc)[:, :, None, None])
    vae.quant_conv.bias.zero_()
    vae.post_quant_conv.weight.copy_(torch.eye(lc)[:, :, None, None])
    vae.post_quant_conv.bias.zero_()

    copy(dec.conv_in, model.dec_conv_in)
    copy(dec.up_blocks[0].upsamplers[0].conv, model.dec_up0)
    copy(dec.up_blocks[1].upsamplers[0].conv, model.dec_up1)
    layout = _group_layout(DECODER_CONTENT, BLOCK_OUT_CHANNELS[0], NORM_GROUPS)
    _write_content_conv(dec.up_blocks[2].resnets[0].conv_shortcut, model.dec_shortcut.weight, model.dec_shortcut.bias,
                        layout)
    _write_linear_norm_and_out(dec.conv_norm_out, dec.conv_out, model.dec_conv_out.weight, model.dec_conv_out.bias,
                               layout, model.decoder_content(model.encode(x)).abs().max().item())
    return vae
