"""The run plan: stages, sizes, views per stage and UNet evaluations, decided here once, before any model loads.

:func:`check_inputs` is what every entry point calls first (CLI, batch, service, eval, ``caption --tiles``,
``--dry-run``): it makes the :class:`Plan` and checks the output size, the output format's side limit, a
regional-prompts file and a checkpoint against it, so a bad run fails in one line before anything loads. The
pipeline runs the same plan (:func:`make_plan` with the loaded model's spec): its stage sizes and views are these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from .config import UpscaleConfig
from .errors import UserError
from .method.step import uses_cfg
from .method.views import make_views, window_starts

STEPS_MAX = next(f.metadata["max"] for f in fields(UpscaleConfig) if f.name == "steps")  # the steps knob's bound
SIZE_MULTIPLE = 64  # stage sizes in px: latent divisible by 2**3, the deepest DWT allowed (dwt_levels <= 3)
# Host float32 buffers of the full latent a stage holds at once: z_L, noise, z_t, eps sum, weights, next z.
LATENT_BUFFERS = 6


# ---------------------------------------------------------------------------------------------------------------
# The decisions
# ---------------------------------------------------------------------------------------------------------------
def plan_stages(input_size: tuple[int, int], config: UpscaleConfig) -> list[tuple[int, int]]:
    """Stage sizes (W, H): x2 per stage up to the target, each rounded to a multiple of 64 px ('Stages')."""
    width, height = input_size
    target = config.size or (width * config.scale, height * config.scale)
    ratio = max(target[0] / width, target[1] / height)
    if ratio <= 1 or target[0] < width or target[1] < height:  # a shrink on one axis: stages x2 the other up to it
        raise ValueError(f"size {target[0]}x{target[1]} is not larger than the input {width}x{height} on both axes")
    count = max(1, math.ceil(math.log2(ratio) - 1e-9))
    rounded = lambda v: max(SIZE_MULTIPLE, int(round(v / SIZE_MULTIPLE)) * SIZE_MULTIPLE)  # noqa: E731
    return [(rounded(target[0] / 2 ** (count - k)), rounded(target[1] / 2 ** (count - k))) for k in range(1, count + 1)]


def target_size(input_size: tuple[int, int], config: UpscaleConfig) -> tuple[int, int]:
    return config.size or (input_size[0] * config.scale, input_size[1] * config.scale)


def denoising_steps(config: UpscaleConfig) -> int:
    """S = round(s * T): the number of steps actually run per stage (method.md step 4)."""
    return int(round(config.strength * config.steps))


# ---------------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StagePlan:
    """One x2 stage: its size in px, its latent, its views (latent rects before jitter) and its step count."""

    index: int
    size: tuple[int, int]  # (W, H) px
    latent: tuple[int, int]  # (h, w) latent px
    views: np.ndarray  # (N, 4) latent rects (top, left, bottom, right)
    steps: int
    latent_channels: int
    passes_per_view: int = 2  # UNet samples per view and step: CFG's two halves, one with guidance off

    @property
    def unet_evaluations(self) -> int:
        return len(self.views) * self.steps * self.passes_per_view

    def describe(self) -> dict:
        width, height = self.size
        return {"stage": self.index, "size": [width, height], "latent": list(self.latent),
                "views_per_step": len(self.views), "steps": self.steps, "unet_evaluations": self.unet_evaluations,
                "est_host_memory_mb": round(stage_host_bytes(self.size, self.latent, self.latent_channels) / 2**20, 1)}


def stage_host_bytes(size: tuple[int, int], latent: tuple[int, int], channels: int) -> int:
    """Host memory a stage holds at once: :data:`LATENT_BUFFERS` float32 latents and two uint8 RGB pictures."""
    return LATENT_BUFFERS * channels * latent[0] * latent[1] * 4 + 2 * 3 * size[0] * size[1]


@dataclass(frozen=True)
class Plan:
    """What a run of ``config`` on an ``input_size`` image will do."""

    input_size: tuple[int, int]  # (W, H) px
    output_size: tuple[int, int]  # (W, H) px: the target (the last stage is Lanczos-resized to it if it differs)
    stages: tuple[StagePlan, ...]
    vae_scale_factor: int  # px per latent px, from the model's VAE config
    latent_channels: int
    config: UpscaleConfig

    @property
    def steps(self) -> int:
        return self.stages[0].steps

    @property
    def stage_inputs(self) -> list[tuple[int, int]]:
        """(W, H) of the image each stage starts from: the input, then each stage's output."""
        return [self.input_size] + [s.size for s in self.stages[:-1]]

    def describe(self) -> dict:
        """The JSON `--dry-run` prints."""
        config, stages = self.config, [s.describe() for s in self.stages]
        return {
            "input": list(self.input_size), "output": list(self.output_size), "model": config.model,
            "tile": config.tile, "stride": config.stride, "view_batch_size": config.view_batch_size,
            "stages": stages, "unet_evaluations": sum(s["unet_evaluations"] for s in stages),
            "est_peak_host_memory_mb": max(s["est_host_memory_mb"] for s in stages),
            **self.weights_estimate(),
            "config_hash": config.config_hash(),
        }

    def weights_estimate(self) -> dict:
        """GB of weights each model worker holds on its device, in the chosen mode and the others."""
        from .models.backbones import backbone_class
        from .models.spec import local_family
        from .models.weights import weights_gb

        parameters = model_parameters_of(self.config)  # headers read here only: a batch's per-item checks skip it
        family = local_family(self.config.model, self.config.model_config)  # None: not here (SDXL's rule)
        backbone = backbone_class(family) if family is not None else None
        modes = {mode: weights_gb(parameters, mode, self.config.dtype, backbone) for mode in ("full", "fp8", "offload")}
        return {"weights": self.config.weights, "est_weights_gb_per_actor": modes[self.config.weights],
                "est_weights_gb_per_actor_by_mode": modes}


def make_plan(input_size: tuple[int, int], config: UpscaleConfig, geometry: tuple[int, int]) -> Plan:
    """The plan for a model of ``geometry`` = (VAE factor, latent channels); a size that is no upscale is one line."""
    factor, channels = geometry
    try:
        sizes = plan_stages(input_size, config)
    except ValueError as exc:
        raise UserError(f"{exc}; ask for a larger size or a scale of 2, 4, 8 or 16") from None
    steps, passes = denoising_steps(config), 2 if uses_cfg(config.guidance_scale) else 1
    if steps == 0:  # as diffusers' img2img refuses it: the run would return the VAE round trip, silently
        most = STEPS_MAX  # no --steps past the knob's maximum can help a strength this small (and 0.5/s may overflow)
        fix = ("set a strength above 0" if config.strength == 0 else
               f"use a --strength above {0.5 / most:g}" if config.strength * most <= 0.5 else
               f"use --steps {math.floor(0.5 / config.strength) + 1} or more, or a higher --strength")
        raise UserError(f"strength {config.strength} x steps {config.steps} rounds to 0 denoising steps; {fix}")
    check_plan_bounds(sizes, config, geometry, steps * passes)  # before any view is laid out
    stages = []
    for index, (width, height) in enumerate(sizes):
        latent = (height // factor, width // factor)
        stages.append(StagePlan(index, (width, height), latent, make_views(*latent, config.tile, config.stride), steps,
                                channels, passes))
    return Plan(tuple(input_size), target_size(input_size, config), tuple(stages), factor, channels, config)


def check_plan_bounds(sizes: list[tuple[int, int]], config: UpscaleConfig, geometry: tuple[int, int],
                      evaluations_per_view: int) -> None:
    """Bound what a plan builds, not only its output (issue 35): every stage's pixels (``max_stage_pixels``), the
    host memory of its biggest stage (``max_plan_memory_mb``) and its model evaluations (``max_model_evaluations``),
    from the stage sizes alone: a refused plan never lays out its views."""
    factor, channels = geometry
    evaluations = 0
    for width, height in sizes:
        latent = (height // factor, width // factor)
        if width * height > config.max_stage_pixels:
            raise UserError(f"the plan has a {width}x{height} stage, over the {config.max_stage_pixels}-pixel limit "
                            "(max_stage_pixels); ask for a smaller or less elongated --size/--scale, or raise "
                            "max_stage_pixels")
        memory_mb = stage_host_bytes((width, height), latent, channels) / 2**20
        if memory_mb > config.max_plan_memory_mb:
            raise UserError(f"the plan's {width}x{height} stage needs about {memory_mb:.0f} MB of host memory, over "
                            f"the {config.max_plan_memory_mb} MB limit (max_plan_memory_mb); ask for a smaller "
                            "--size/--scale, or raise max_plan_memory_mb")
        views = len(window_starts(latent[0], config.tile, config.stride)) * len(
            window_starts(latent[1], config.tile, config.stride))
        evaluations += views * evaluations_per_view
    if evaluations > config.max_model_evaluations:
        raise UserError(f"the plan needs {evaluations} model evaluations, over the {config.max_model_evaluations} "
                        "limit (max_model_evaluations); use fewer --steps, a lower --strength, a larger --stride or a "
                        "smaller --size/--scale, or raise max_model_evaluations")


def check_inputs(input_size: tuple[int, int], config: UpscaleConfig, spec=None, *, output: str | Path | None = None,
                 checkpoint=None) -> Plan:
    """The plan of a run, and everything it reads besides the image checked against it, before any model loads.

    ``spec`` (a :class:`~cupscale_dist.models.spec.ModelSpec`) when the model is already resolved; else its geometry
    is read from its configs (:func:`~cupscale_dist.models.spec.model_geometry`, no weights). Checks: the output
    within ``max_output_pixels``; ``output``'s format can hold it (WebP: 16383 px a side); the regional-prompts
    file's stages, sizes and view counts; ``checkpoint`` (a :class:`~cupscale_dist.services.checkpoint.Checkpointer`
    to resume from): every field of it.
    """
    plan = make_plan(input_size, config, model_geometry_of(config, spec))
    config.check_output_size(plan.output_size)
    check_family_knobs(config, spec)
    if output is not None:
        from .files.imageio import check_output_side

        check_output_side(output, plan.output_size)
    if config.regional_prompts:
        from .captions.promptfile import check_prompt_file, read_prompt_file

        check_prompt_file(config.regional_prompts, read_prompt_file(Path(config.regional_prompts)), plan)
    if checkpoint is not None:
        checkpoint.check_against(plan)
    return plan


def check_family_knobs(config: UpscaleConfig, spec=None) -> None:
    """Knobs the model's family cannot honour (Flux: odd tiles, pixel masks, noise schedulers) as one line before any
    model loads, where the family is known from configs on this machine (a run checks again once it has the spec)."""
    from .models.backbones import backbone_class
    from .models.spec import local_family

    family = spec.family if spec is not None else local_family(config.model, config.model_config)
    if family is not None:
        backbone_class(family).check_config(config)


def model_parameters_of(config: UpscaleConfig) -> dict[str, int]:
    """Parameters per component of the config's model (the demo's directory, a local one, a family's published
    repository's counts, else SDXL base's)."""
    from .models.spec import published_facts
    from .models.weights import parameters_of

    path = config.model
    published = published_facts(path)
    if published is not None:
        return dict(published[1]["parameters"])
    if path == "demo":
        from .models.demo_dir import demo_model_dir

        path = str(demo_model_dir())
    return parameters_of(path)


def model_geometry_of(config: UpscaleConfig, spec=None) -> tuple[int, int]:
    if spec is not None:
        return spec.vae_scale_factor, spec.latent_channels
    from .models.spec import model_geometry

    return model_geometry(config.model, config.model_config)
