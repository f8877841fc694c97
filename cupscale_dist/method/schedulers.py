"""The driver's scheduler (method.md steps 4 and 9b-9c), built from the model's own scheduler config, and one small
adapter per scheduler kind: how its latent is parametrised (what the global prior needs), whether its step draws
noise, and what state it carries from one step to the next (what a checkpoint must keep).

A config written for another scheduler class (SDXL base ships Euler, SD1.5 PNDM) names only some of DDIM's
options; diffusers' DDIM defaults for the missing ones (``clip_sample=True``, ``set_alpha_to_one=True``) clip
``x0`` to [-1, 1], which breaks the global prior (``LL(x0) = G``) and is not how SDXL/SD1.5 were trained. The
published SDXL and SD1.5 configs set both to False; those are the defaults here, and values a config does give win.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

# DDIM options SDXL base / SD1.5 publish in their scheduler_config.json, used when a config leaves them out.
DDIM_DEFAULTS = {"clip_sample": False, "set_alpha_to_one": False}


@dataclass(frozen=True)
class SchedulerKind:
    """What the method needs to know of one scheduler kind.

    ``level``: how ``z_t = alpha_t x0 + sigma_t eps`` is read off the scheduler at a step:
    'sigma' (Euler: ``(1, sigma_t)``, ``z`` unscaled), 'vp_sigma' (DPM-Solver: VP, from its own ``sigmas`` table,
    Karras-spaced or not), 'vp_alphas' (DDIM, TCD, LCM: ``(sqrt(abar_t), sqrt(1 - abar_t))`` at the timestep) or
    'flow' (flow matching, FlowMatchEuler: ``(1 - sigma_t, sigma_t)``; the model predicts the velocity
    ``v = eps - x0``, not eps, and its input is not scaled).
    """

    class_name: str
    level: Literal["sigma", "vp_sigma", "vp_alphas", "flow"]
    defaults: dict = field(default_factory=dict)  # options used when the model's config does not give them
    stochastic: bool = False  # its step draws noise: it gets a generator seeded per (seed, stage, step)
    state: tuple[str, ...] = ()  # attributes carried from step to step (a multistep solver's memory)

    def noise_level(self, scheduler, step_index: int) -> tuple[float, float]:
        """``(alpha, sigma)`` of the scheduler's latent at ``timesteps[step_index]``; past the end = clean (1, 0)."""
        if step_index >= len(scheduler.timesteps):
            return 1.0, 0.0
        if self.level == "sigma":
            return 1.0, float(scheduler.sigmas[step_index])
        if self.level == "flow":  # x_t = (1 - sigma) x0 + sigma noise (FlowMatchEulerDiscreteScheduler.scale_noise)
            sigma = float(scheduler.sigmas[step_index])
            return 1.0 - sigma, sigma
        if self.level == "vp_sigma":  # sigma = sqrt((1 - abar) / abar), as DPM-Solver's _sigma_to_alpha_sigma_t
            ratio = float(scheduler.sigmas[step_index])
            alpha = 1.0 / math.sqrt(ratio**2 + 1.0)
            return alpha, ratio * alpha
        alpha_bar = float(scheduler.alphas_cumprod[int(scheduler.timesteps[step_index])])
        return math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)

    @property
    def predicts_velocity(self) -> bool:
        """The model output this scheduler steps with is the flow-matching velocity (not the noise)."""
        return self.level == "flow"

    def input_scale(self, scheduler, timestep) -> float:
        """The scheduler's own model-input scaling (Euler: 1/sqrt(sigma^2+1); DDIM: 1; flow matching: none)."""
        if self.level == "flow":
            return 1.0
        return float(scheduler.scale_model_input(torch.ones(1), timestep))

    def add_noise(self, scheduler, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        """The scheduler's own forward process (``add_noise``; flow matching calls it ``scale_noise``)."""
        if self.level == "flow":
            return scheduler.scale_noise(sample, timesteps, noise)
        return scheduler.add_noise(sample, noise, timesteps)

    def set_timesteps(self, scheduler, steps: int, image_tokens: int | None = None) -> None:
        """``steps`` timesteps on the CPU; a flow scheduler with dynamic shifting gets FluxPipeline's sigmas
        (``linspace(1, 1/T, T)``) and ``mu`` from ``image_tokens`` (:func:`flow_shift_mu`)."""
        if self.level != "flow":
            scheduler.set_timesteps(steps, device="cpu")
            return
        import numpy as np

        sigmas = np.linspace(1.0, 1 / steps, steps)
        mu = flow_shift_mu(scheduler.config, image_tokens) if scheduler.config.use_dynamic_shifting else None
        scheduler.set_timesteps(steps, device="cpu", sigmas=sigmas, mu=mu)

    def get_state(self, scheduler) -> dict | None:
        """The carried state, detached (None for a single-step scheduler)."""
        if not self.state:
            return None
        def detached(value):
            if isinstance(value, list):
                return [detached(v) for v in value]
            return value.clone() if isinstance(value, torch.Tensor) else value

        return {name: detached(getattr(scheduler, name)) for name in self.state}

    def set_state(self, scheduler, state: dict | None) -> None:
        for name in self.state:
            if state is not None and name in state:
                setattr(scheduler, name, state[name])


KINDS: dict[str, SchedulerKind] = {
    "euler": SchedulerKind("EulerDiscreteScheduler", "sigma"),
    "ddim": SchedulerKind("DDIMScheduler", "vp_alphas", DDIM_DEFAULTS),
    # DPM-Solver++(2M): the most used SDXL sampler; second order, so each step needs the previous x0 prediction.
    "dpmpp_2m": SchedulerKind("DPMSolverMultistepScheduler", "vp_sigma",
                              {"algorithm_type": "dpmsolver++", "solver_order": 2},
                              state=("model_outputs", "lower_order_nums")),
    "tcd": SchedulerKind("TCDScheduler", "vp_alphas", stochastic=True),  # gamma > 0 re-noises each step
    "lcm": SchedulerKind("LCMScheduler", "vp_alphas", stochastic=True),  # re-noises each step but the last
    # Flux's scheduler (flow matching, first-order Euler in sigma); the only kind a flow model takes.
    "flow_euler": SchedulerKind("FlowMatchEulerDiscreteScheduler", "flow"),
}
FLOW_KINDS = ("flow_euler",)
BY_CLASS = {kind.class_name: kind for kind in KINDS.values()}
# Sigma-parametrised classes a caller may build itself (the prior reads them as Euler does).
for _name in ("EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler",
              "KDPM2DiscreteScheduler"):
    BY_CLASS.setdefault(_name, SchedulerKind(_name, "sigma"))


def kind_of(scheduler) -> SchedulerKind:
    """The adapter of a scheduler instance (by its class)."""
    name = type(scheduler).__name__
    if name not in BY_CLASS:
        raise ValueError(f"scheduler {name} has no adapter; use one of {', '.join(KINDS)}")
    return BY_CLASS[name]


def given_options(scheduler_config: Mapping) -> dict:
    """The options a scheduler config actually gives: diffusers marks the ones it filled with its own defaults."""
    defaulted = set(scheduler_config.get("_use_default_values", ()))
    return {k: v for k, v in scheduler_config.items() if k not in defaulted and k != "_use_default_values"}


def make_scheduler(kind: str, scheduler_config: Mapping, *, timestep_spacing: str | None = None,
                   karras_sigmas: bool = False):
    """A fresh ``kind`` scheduler (a key of :data:`KINDS`) from a model's scheduler config (method.md step 4).

    ``timestep_spacing``: None keeps the model's; ``karras_sigmas``: Karras et al.'s sigma spacing (Euler, DPM++).
    """
    import diffusers

    adapter = KINDS[kind]
    options = {**adapter.defaults, **given_options(scheduler_config)}
    if timestep_spacing is not None:
        options["timestep_spacing"] = timestep_spacing
    if karras_sigmas:
        options["use_karras_sigmas"] = True
    return getattr(diffusers, adapter.class_name).from_config(options)


def step_noise(seed: int, stage: int, step: int, shape, row0: int = 0) -> torch.Tensor:
    """The noise a stochastic scheduler's step draws (TCD, LCM), for latent rows ``row0 ..`` of a latent of
    ``shape`` (1, C, rows, W): each latent row from its own generator seeded by (seed, stage, step, row), so a
    resumed run, any actor count and any split of the latent into row bands (method/parts.py) draw the same values
    for the same pixel, with nothing carried between steps."""
    _, channels, rows, width = shape
    out = torch.empty(shape, dtype=torch.float32)
    generator = torch.Generator()
    for row in range(rows):
        generator.manual_seed(seed * 1_000_003 + stage * 10_007 + step * 101 + 7 + (row0 + row) * 7_919_113)
        out[0, :, row] = torch.randn((channels, width), generator=generator)
    return out


@contextlib.contextmanager
def supplied_noise(scheduler, noise: torch.Tensor):
    """While stepping ``scheduler``, its own ``randn_tensor`` returns ``noise``: the scheduler's formula with the
    noise of :func:`step_noise` (diffusers draws it inside ``step`` from a generator over the tensor it is given,
    which would tie the values to the shape of a worker's band)."""
    module = sys.modules[type(scheduler).__module__]
    original = getattr(module, "randn_tensor", None)
    if original is None:
        yield
        return

    def drawn(shape, generator=None, device=None, dtype=None, layout=None):
        if tuple(shape) != tuple(noise.shape):
            raise ValueError(f"supplied noise of shape {tuple(noise.shape)} for a draw of {tuple(shape)}")
        return noise.to(device=device, dtype=dtype)

    module.randn_tensor = drawn
    try:
        yield
    finally:
        module.randn_tensor = original


def flow_shift_mu(scheduler_config: Mapping, image_tokens: int | None) -> float:
    """FLUX's dynamic shift (FluxPipeline's ``calculate_shift``): ``mu`` linear in the image's token count between
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift)."""
    if image_tokens is None:
        raise ValueError("a flow scheduler with dynamic shifting needs the image token count that sets mu")
    base_len, max_len = scheduler_config.get("base_image_seq_len", 256), scheduler_config.get("max_image_seq_len", 4096)
    base_shift, max_shift = scheduler_config.get("base_shift", 0.5), scheduler_config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_tokens * slope + base_shift - slope * base_len
