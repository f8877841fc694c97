"""The C-Upscale step (method.md step 9): the two functions both execution paths call.

* :func:`predict_views` — CFG noise predictions for a batch of views (9a). Pure: a backbone, latent windows and
  the stage context in, arrays out. Denoiser actors call exactly this.
* :func:`reduce_and_step` — MultiDiffusion reduction of the views' predictions (9b), the global prior (9c) and
  ONE scheduler step on the whole latent. Only the driver holds the scheduler and the full latent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .attention import RegionalAttention
from .prior import (
    GlobalPrior,
    inject_global_prior,
    inject_global_prior_flow,
    inject_global_prior_zt,
    noise_level,
    prior_weight,
)
from .schedulers import kind_of, step_noise, supplied_noise


@dataclass
class StageContext:
    """Everything the view predictions of one stage need, sent to each actor once per stage.

    Embeddings are float32 on CPU; a view's regional prompt is ``regional_embeds[view_prompt[view]]`` (unique
    prompts are encoded once, so 961 views at 16K do not hold 961 copies). What only one family reads (SDXL's pooled
    embeddings and micro-conditioning, FLUX.1's positions and guidance embedding, Z-Image's positions) is that
    family's own object in ``family``, built by its backbone
    (:meth:`~cupscale_dist.models.backbones.base.Backbone.stage_fields`).
    """

    negative_embeds: torch.Tensor  # (1, 77, D)
    global_embeds: torch.Tensor  # (1, 77, D)
    regional_embeds: torch.Tensor  # (U, 77, D)
    view_prompt: np.ndarray  # (N,) int index into regional_embeds
    token_allowed: np.ndarray | None  # (N, 77) bool, mask_mode='view'
    token_maps: np.ndarray | None  # (77, h, w) bool at probe resolution, mask_mode='pixel'
    latent_hw: tuple[int, int]
    vae_scale_factor: int
    guidance_scale: float  # the CFG scale (CFG on above 1: uses_cfg)
    lambda_global: float
    composer: str
    controlnet_scale: float = 0.0  # ControlNet residual scale (used when the worker holds a ControlNet)
    # The family's own stage fields: a small frozen dataclass of its backbone's folder with its own ``to``
    # (SDXLStage, FluxStage, ZImageStage); None for a family with none (SD1.5).
    family: Any = None

    def to(self, device, dtype) -> StageContext:
        """The context with its embeddings (the family's too) on the denoiser's device and dtype: moved once per
        stage, not per call."""
        move = lambda t: None if t is None else t.to(device, dtype)  # noqa: E731
        names = ("negative_embeds", "global_embeds", "regional_embeds")
        moved = {name: move(getattr(self, name)) for name in names}
        return dataclasses.replace(self, **moved, family=move(self.family))


def uses_cfg(guidance_scale: float) -> bool:
    """Classifier-free guidance is on above 1 (as diffusers' pipelines decide); at or below 1 each view is one
    conditional pass: ``eps_u + 1 * (eps_c - eps_u) = eps_c`` at half the cost."""
    return guidance_scale > 1


def regional_attention(context: StageContext, view_ids: np.ndarray, rects: np.ndarray) -> RegionalAttention:
    """The composer's inputs for a CFG batch [uncond views; cond views] (uncond rows screen nothing), or for the
    cond views alone when guidance is off."""
    count, tokens, cfg = len(view_ids), context.global_embeds.shape[1], uses_cfg(context.guidance_scale)
    token_allowed = token_maps = None
    if context.token_allowed is not None:
        token_allowed = torch.from_numpy(context.token_allowed[view_ids])
        if cfg:
            token_allowed = torch.cat([torch.ones(count, tokens, dtype=torch.bool), token_allowed])
    if context.token_maps is not None:
        token_maps = torch.from_numpy(context.token_maps)
    return RegionalAttention(tokens, context.lambda_global, context.composer, token_allowed, token_maps,
                             torch.from_numpy(np.asarray(rects)), context.latent_hw, cfg)


@torch.no_grad()
def predict_views(backbone, windows: torch.Tensor, timestep, input_scale: float, context: StageContext,
                  view_ids: Sequence[int], rects: np.ndarray, control: torch.Tensor | None = None) -> torch.Tensor:
    """CFG noise predictions of a batch of views (method.md 9a) -> (B, C, h, w) float32 on CPU; one conditional
    pass per view when guidance is off (:func:`uses_cfg`).

    Args:
        backbone: the model family's adapter (:class:`cupscale_dist.models.backbones.base.UNetBackbone`): one
            ``denoise`` call for both CFG halves, regional attention installed.
        windows (tensor (B, C, h, w)): the views' windows of the current latent, in the scheduler's space.
        timestep: the scheduler timestep of this step.
        input_scale (float): the scheduler's model-input scaling at this step (1/sqrt(sigma^2+1) for Euler).
        context (StageContext): the stage's prompts, masks and the family's own fields.
        view_ids: indices of these views in the stage's view list; rects (N', 4): their current rectangles.
        control (tensor (B, 3, H, W) in [0, 1]): each view's own crop of the stage input, when the backbone holds
            a ControlNet tile model.
    """
    view_ids = np.asarray(view_ids)
    latents = (windows.to(backbone.device, torch.float32) * input_scale).to(backbone.dtype)
    regional = regional_attention(context, view_ids, rects)
    if not regional.cfg:
        return backbone.denoise(latents, timestep, context, view_ids, rects, regional, control).float().cpu()
    latents = torch.cat([latents, latents])
    eps = backbone.denoise(latents, timestep, context, view_ids, rects, regional, control).float()
    eps_uncond, eps_cond = eps.chunk(2)
    return (eps_uncond + context.guidance_scale * (eps_cond - eps_uncond)).cpu()


@functools.lru_cache(maxsize=32)
def window_weights(height: int, width: int, blend: str, sigma_fraction: float) -> torch.Tensor | None:
    """Per-pixel weight of a view (method.md 9b): None = uniform; 'gaussian' = centred Gaussian window. Made once per
    size and knobs (every step and part asks again); read only, never written."""
    if blend == "uniform":
        return None
    ys = torch.arange(height, dtype=torch.float32) - (height - 1) / 2
    xs = torch.arange(width, dtype=torch.float32) - (width - 1) / 2
    return torch.exp(-(ys[:, None] ** 2 / (2 * (sigma_fraction * height) ** 2)
                       + xs[None] ** 2 / (2 * (sigma_fraction * width) ** 2)))


def add_view(total: torch.Tensor | None, weight: torch.Tensor | None, rect, rows: tuple[int, int],
             prediction: torch.Tensor | None, window: torch.Tensor | None, row0: int = 0) -> None:
    """Adds one view's prediction over latent rows ``rows`` (global, within the view) into ``total`` / ``weight``,
    whose first row is global row ``row0`` (method.md 9b).

    The one accumulation of MultiDiffusion, for the whole latent (``row0`` 0, the whole view) and for a worker's row
    band (the rows of the view inside it): each pixel gets the same elementwise operations in the same order (its
    views in global view order), so a part holds the whole latent's bytes for its rows (method/parts.py). Either sum
    may be None: a part sums its weights once while its views stay (:class:`~cupscale_dist.method.parts.BlendWeights`)
    and only the predictions every step. In place (``+=`` on a slice would also copy the slice onto itself).
    """
    top, left, bottom, right = (int(v) for v in rect)
    lo, hi = rows
    target = (slice(lo - row0, hi - row0), slice(left, right))
    w = None if window is None else window[lo - top : hi - top]
    if total is not None:
        total[(..., *target)].add_(prediction if w is None else prediction * w)
    if weight is not None:
        weight[target].add_(1.0 if w is None else w)


class ViewWindows:
    """A view's blend window by its rect: one per size, not per view (:func:`window_weights` makes each once)."""

    def __init__(self, blend: str, sigma_fraction: float):
        self.blend, self.sigma_fraction = blend, sigma_fraction

    def __call__(self, rect) -> torch.Tensor | None:
        return window_weights(int(rect[2] - rect[0]), int(rect[3] - rect[1]), self.blend, self.sigma_fraction)


def reduce_predictions(batches: Iterable[tuple[Sequence[int], torch.Tensor]], views: np.ndarray,
                       latent_shape: Sequence[int], blend: str = "uniform",
                       sigma_fraction: float = 0.3) -> torch.Tensor:
    """MultiDiffusion (method.md 9b): per-pixel weighted sum of view predictions / per-pixel weight.

    ``batches`` yields ``(view_ids, predictions)`` in view order; accumulation order is fixed by view index, so
    the result has the same bytes whichever actor produced which batch.
    """
    total = torch.zeros(latent_shape, dtype=torch.float32)
    weight = torch.zeros(latent_shape[-2:], dtype=torch.float32)
    windows = ViewWindows(blend, sigma_fraction)
    for view_ids, predictions in batches:
        for k, view in enumerate(view_ids):
            rect = views[view]
            add_view(total, weight, rect, (int(rect[0]), int(rect[2])), predictions[k], windows(rect))
    return total / weight


@dataclass
class StageSchedule:
    """The driver's one scheduler for a stage plus what the prior needs (method.md steps 4 and 9c)."""

    scheduler: object
    start_index: int  # index into scheduler.timesteps of the first denoising step (T - S)
    prior: GlobalPrior
    prior_target: str
    prior_fraction: float
    prior_schedule: str
    codec: object | None = None  # prior_space='pixel': decode/encode around the low-band swap
    prior_scale: float = 1.0  # peak prior weight (config.prior_scale; resemblance sets it)
    seed: int = 0  # with ``stage``: the noise of a stochastic scheduler's steps (schedulers.step_noise)
    stage: int = 0

    @property
    def num_steps(self) -> int:
        return len(self.scheduler.timesteps) - self.start_index

    def timestep(self, step: int):
        return self.scheduler.timesteps[self.start_index + step]

    def input_scale(self, step: int) -> float:
        """The scheduler's own model-input scaling (Euler: 1/sqrt(sigma^2+1); DDIM: 1; flow matching: 1)."""
        return kind_of(self.scheduler).input_scale(self.scheduler, self.timestep(step))


def is_finite(latents: torch.Tensor) -> bool:
    """Whether a latent (or a band of it) holds no NaN or inf: a NaN or inf anywhere makes the sum non-finite, one
    reduction and no mask (an isfinite pass was 0.14 s of a 16K step's owner work on 2 cores)."""
    return bool(torch.isfinite(latents.sum()))


def check_finite_latent(finite: bool, stage: int, step: int) -> None:
    """Stop in one line when a step left NaN or inf in the latent: the picture would be black with exit 0."""
    if not finite:
        from ..errors import UserError

        raise UserError(f"stage {stage + 1}, step {step + 1}: the latent is no longer finite (NaN or inf); likely "
                        "causes: a LoRA or ControlNet with huge weights or scale, a model file with NaN/inf weights, "
                        "float16 overflow (use --dtype bfloat16 or float32)")


def reduce_and_step(latents: torch.Tensor, batches: Iterable[tuple[Sequence[int], torch.Tensor]], views: np.ndarray,
                    schedule: StageSchedule, step: int, blend: str = "uniform",
                    sigma_fraction: float = 0.3) -> torch.Tensor:
    """One denoising step of the whole latent from its views' predictions (method.md 9b-9c) -> next latent."""
    eps = reduce_predictions(batches, views, latents.shape, blend, sigma_fraction)
    return prior_and_step(latents, eps, schedule, step)


def prior_and_step(latents: torch.Tensor, eps: torch.Tensor, schedule: StageSchedule, step: int,
                   row0: int = 0) -> torch.Tensor:
    """9c and the step: the global prior on the reduced prediction, then ONE scheduler step -> next latent.

    ``latents`` / ``eps`` are the whole latent, or a worker's row band starting at global row ``row0`` with
    ``schedule`` holding that band's prior and its own scheduler (method/parts.py): every operation here is
    elementwise (the Haar prior on 2^J-aligned blocks), so a band gets the whole latent's bytes for its rows.
    """
    weight = schedule.prior_scale * prior_weight(step, schedule.num_steps, schedule.prior_fraction,
                                                 schedule.prior_schedule)
    if weight > 0 and schedule.prior_target == "x0":
        alpha, sigma = noise_level(schedule.scheduler, schedule.start_index + step)
        if kind_of(schedule.scheduler).predicts_velocity:  # `eps` holds the reduced velocity here
            eps = inject_global_prior_flow(eps, latents, schedule.prior, weight, sigma, schedule.codec)
        else:
            eps = inject_global_prior(eps, latents, schedule.prior, weight, alpha, sigma, schedule.codec)
    noise = contextlib.nullcontext()
    if kind_of(schedule.scheduler).stochastic:  # drawn from the seed per step and row: any layout, resumed or not
        drawn = step_noise(schedule.seed, schedule.stage, schedule.start_index + step, latents.shape, row0)
        noise = supplied_noise(schedule.scheduler, drawn)
    with noise:
        latents = schedule.scheduler.step(eps, schedule.timestep(step), latents).prev_sample
    if weight > 0 and schedule.prior_target == "zt":
        alpha, sigma = noise_level(schedule.scheduler, schedule.start_index + step + 1)
        latents = inject_global_prior_zt(latents, schedule.prior, weight, alpha, sigma)
    return latents
