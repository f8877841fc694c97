"""Global structure prior (method.md steps 3 and 9c): keep the low band of the input, let the rest be new.

Everything is written for the scheduler's own latent space ``z_t = alpha_t * x0 + sigma_t * eps``:
``(alpha, sigma) = (1, sigma_t)`` for sigma-parametrised schedulers (Euler) and ``(sqrt(abar), sqrt(1 - abar))``
for variance-preserving ones (DDIM, DPM-Solver, TCD, LCM); :func:`noise_level` reads them from the scheduler itself,
through its kind's adapter (:mod:`cupscale_dist.method.schedulers`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .schedulers import kind_of
from .wavelets import dwt2, idwt2, low_band


@dataclass
class GlobalPrior:
    """``G = LL_J(z_L)`` and ``LL_J(eps)`` of one stage (the latter for prior_target='zt')."""

    low: torch.Tensor
    noise_low: torch.Tensor
    wavelet: str = "haar"
    levels: int = 1

    @classmethod
    def from_latent(cls, z_low: torch.Tensor, noise: torch.Tensor, wavelet: str, levels: int) -> GlobalPrior:
        return cls(low_band(z_low, wavelet, levels), low_band(noise, wavelet, levels), wavelet, levels)


def stage_generator(seed: int, stage: int, purpose: int = 0) -> torch.Generator:
    """Noise source for one stage: drawn once for the whole latent from the seed, never per actor."""
    return torch.Generator().manual_seed(seed * 1_000_003 + stage * 101 + purpose)


def stage_noise(shape, seed: int, stage: int, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """The stage's one noise draw ``eps`` (steps 3-4), or its rows ``[lo, hi)``: drawn whole and cut, so a worker's
    band holds the same numbers as the whole latent's (a 16K SDXL latent's draw is 64 MB, a fraction of a second)."""
    noise = torch.randn(tuple(shape), generator=stage_generator(seed, stage))
    return noise if rows is None else noise[..., rows[0] : rows[1], :].clone()


def stage_start(scheduler, start_index: int, z_low: torch.Tensor, z_prior: torch.Tensor, noise: torch.Tensor,
                wavelet: str, levels: int) -> tuple[GlobalPrior, torch.Tensor]:
    """Steps 3 and 4 in latent space, for the whole latent or a band of it aligned to 2^J rows (Haar is local to its
    blocks, ``add_noise`` is elementwise): ``G = LL_J(z_prior)`` with ``LL_J(eps)``, and the start point
    ``z_S = add_noise(z_L, eps, t_S)``."""
    prior = GlobalPrior.from_latent(z_prior, noise, wavelet, levels)
    timesteps = scheduler.timesteps[start_index : start_index + 1]
    return prior, kind_of(scheduler).add_noise(scheduler, z_low, noise, timesteps)


def noise_level(scheduler, step_index: int) -> tuple[float, float]:
    """``(alpha, sigma)`` of the scheduler's latent at ``timesteps[step_index]``; past the end = clean (1, 0)."""
    return kind_of(scheduler).noise_level(scheduler, step_index)


def prior_weight(step: int, num_steps: int, fraction: float, schedule: str) -> float:
    """``w_t`` for the ``step``-th of ``num_steps`` denoising steps: active in the first ``fraction`` of them."""
    active = fraction * num_steps
    if step >= active:
        return 0.0
    if schedule == "constant":
        return 1.0
    progress = step / active
    return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def block_mean(x: torch.Tensor, f: int) -> torch.Tensor:
    """The mean of each ``f x f`` block of the last two axes, ``F.avg_pool2d(x, f)``'s bytes in less time on a CPU.

    Its kernel adds a block's pixels to 0 one by one in row order, divides by f² and adds that to a 0 output; here
    the same additions in the same order, one strided pass per pixel of the block. Only the zeros' signs could tell
    the two apart (0 + -0.0 is +0.0): the one ``+ 0.0`` at the end makes them alike (bench/reduce_step.py checks)."""
    total = x[..., 0::f, 0::f].clone()
    for dy in range(f):
        for dx in range(f):
            if dy or dx:
                total += x[..., dy::f, dx::f]
    return total.div_(f * f).add_(0.0)


def haar_block_change(x: torch.Tensor, target_low: torch.Tensor, weight: float, levels: int) -> torch.Tensor:
    """What Haar's ``IDWT(w * target + (1 - w) * LL(x), HF(x)) - x`` adds to each pixel of a ``2^J`` block: one value
    per block, ``w (target - LL(x)) / 2^J`` (in place on one block-sized buffer).

    ``LL_J`` is ``2^J`` times the mean of each ``2^J`` block, so no high band is ever materialised.
    """
    f = 2**levels
    low = block_mean(x, f).mul_(f)
    return torch.sub(target_low, low, out=low).mul_(weight).div_(f)


def haar_low_band_change(x: torch.Tensor, target_low: torch.Tensor, weight: float, levels: int) -> torch.Tensor:
    """:func:`haar_block_change` on every pixel (each block's value repeated over it)."""
    return F.interpolate(haar_block_change(x, target_low, weight, levels), scale_factor=2**levels, mode="nearest")


def minus_blocks(x: torch.Tensor, blocks: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``x - blocks`` with each value of ``blocks`` repeated over its ``f x f`` block of ``x`` (nearest upsampling),
    written into ``out`` (shaped as ``x``): the blocks are repeated along the rows only, the f rows of a block read
    that one row (no full-size upsampled copy)."""
    bh, f = blocks.shape[-2], x.shape[-2] // blocks.shape[-2]
    split = (*x.shape[:-2], bh, f, x.shape[-1])
    if not out.is_contiguous():
        out = torch.empty(x.shape, dtype=out.dtype, device=out.device)
    rows = blocks.repeat_interleave(f, dim=-1)
    torch.sub(x.reshape(split), rows.unsqueeze(-2), out=out.view(split))
    return out


def predicted_x0(z_t: torch.Tensor, eps: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
    """``x0 = (z_t - sigma * eps) / alpha`` (method.md 9c), the same three operations in one new buffer."""
    x0 = torch.mul(eps, sigma)
    return torch.sub(z_t, x0, out=x0).div_(alpha)


def blend_low_band(x: torch.Tensor, target_low: torch.Tensor, weight: float, wavelet: str, levels: int) -> torch.Tensor:
    """``IDWT(w * target_low + (1 - w) * LL(x), HF(x))``.

    Haar in closed form (:func:`haar_low_band_change`): same result to 1e-6, a third of the full transform's time.
    """
    if wavelet == "haar":
        return x + haar_low_band_change(x, target_low, weight, levels)
    low, highs = dwt2(x, wavelet, levels)
    return idwt2(weight * target_low + (1.0 - weight) * low, highs, wavelet)


def inject_global_prior(eps: torch.Tensor, z_t: torch.Tensor, prior: GlobalPrior, weight: float,
                        alpha: float, sigma: float, codec=None) -> torch.Tensor:
    """Prior on the predicted clean latent (prior_target='x0', method.md 9c); returns the adjusted eps.

    ``x0 = (z_t - sigma * eps) / alpha``; ``x0' = IDWT(w G + (1 - w) LL(x0), HF(x0))``;
    ``eps' = (z_t - alpha x0') / sigma``.
    With a ``codec`` (prior_space='pixel') the swap happens on decoded pixels, then x0' is encoded back.
    """
    if codec is None and prior.wavelet == "haar":
        # eps' = eps - (alpha / sigma) (x0' - x0), x0' - x0 one value per 2^J block: x0's buffer, once read, takes
        # eps'; nothing else full-size is made (16K latents).
        x0 = predicted_x0(z_t, eps, alpha, sigma)
        return minus_blocks(eps, (alpha / sigma) * haar_block_change(x0, prior.low, weight, prior.levels), out=x0)
    x0 = (z_t - sigma * eps) / alpha
    if codec is None:
        x0 = blend_low_band(x0, prior.low, weight, prior.wavelet, prior.levels)
    else:
        x0 = codec.encode(blend_low_band(codec.decode(x0), prior.low, weight, prior.wavelet, prior.levels))
    return (z_t - alpha * x0) / sigma


def inject_global_prior_flow(velocity: torch.Tensor, z_t: torch.Tensor, prior: GlobalPrior, weight: float,
                             sigma: float, codec=None) -> torch.Tensor:
    """Prior on the predicted clean latent under flow matching (method.md "Prior under flow matching").

    ``x_t = (1 - sigma) x0 + sigma eps`` and ``v = eps - x0``, so ``x0 = x_t - sigma v``; ``x0'`` as in
    :func:`inject_global_prior`; ``v' = (x_t - x0') / sigma``.
    """
    x0 = z_t - sigma * velocity
    if codec is None and prior.wavelet == "haar":  # v' = v - (x0' - x0) / sigma, no x0' kept
        return minus_blocks(velocity, haar_block_change(x0, prior.low, weight, prior.levels) / sigma, out=x0)
    if codec is None:
        x0 = blend_low_band(x0, prior.low, weight, prior.wavelet, prior.levels)
    else:
        x0 = codec.encode(blend_low_band(codec.decode(x0), prior.low, weight, prior.wavelet, prior.levels))
    return (z_t - x0) / sigma


def inject_global_prior_zt(z_prev: torch.Tensor, prior: GlobalPrior, weight: float, alpha: float,
                           sigma: float) -> torch.Tensor:
    """Prior on the next latent (prior_target='zt'): blend toward ``LL(add_noise(z_L, eps, t-1))``.

    The DWT is linear, so that low band is ``alpha * G + sigma * LL(eps)`` with no per-step transform of z_L.
    """
    return blend_low_band(z_prev, alpha * prior.low + sigma * prior.noise_low, weight, prior.wavelet, prior.levels)
