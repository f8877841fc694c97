#!/usr/bin/env python
"""Mutation check of the fidelity tests (issue #9) and quality gates (#10): each mutation must fail its named tests.

Usage, from the repository root::

    python tests/mutants/run.py                 # all mutations; table on stderr, JSON on stdout
    python tests/mutants/run.py --only x0-sign  # some of them
    python tests/mutants/run.py --jobs 1        # one at a time (default: two, one per core of the CI machine)
    python tests/mutants/run.py --no-fork       # each mutant's pytest a fresh interpreter (slower; see below)
    python tests/mutants/run.py --passed-in report.xml  # the baseline trusts a JUnit report of the suite (CI)
    python tests/mutants/run.py --passed-in report.xml --wait-for-report 3600  # beside the suite's pytest (CI):
                                                # verdicts first, the baseline once that pytest wrote its report

Each mutation is applied to a temporary copy of ``cupscale_dist/``, ``actors/`` and ``configs/`` that goes first on
PYTHONPATH (and is the working directory) of a pytest subprocess running only the named tests; the working tree
is never edited. First the named tests run on an unmutated copy: they must pass there and import the copy, or no
verdict means anything. Exit status 1 if a mutation survives, no longer applies, or the unmutated run fails.

A mutant's pytest is forked from one process that imported the heavy libraries once (torch, diffusers,
transformers, Ray, pytest: ~8 of the ~10 CPU seconds a one-test pytest takes here) and never the package: the fork
puts its copy first on sys.path and PYTHONPATH, runs pytest in its copy as the working directory, and checks that
the package it tested was imported from the copy (else the verdict is an error). ``--no-fork`` runs each in a fresh
interpreter as before.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COPIED = ("cupscale_dist", "actors", "configs")
RUN_TIMEOUT_S = 600  # a run past this is broken, not slow (the baseline: ~2 min on 2 idle cores)
FIDELITY = "tests/method/test_fidelity.py::"


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository root
    old: str  # exact text; must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest node ids, relative to the repository root, that must catch it


def fidelity(*names: str) -> tuple[str, ...]:
    return tuple(FIDELITY + name for name in names)


def flux(*names: str) -> tuple[str, ...]:
    return tuple("tests/models/test_flux.py::" + name for name in names)


def zimage(*names: str) -> tuple[str, ...]:
    return tuple("tests/models/test_zimage.py::" + name for name in names)


X0, ZT = "test_x0_prior_holds_for_the_schedulers_own_x0", "test_zt_prior_pulls_the_next_latent_toward_the_noised_input"
START = "test_stage_starts_at_round_s_t_with_the_schedulers_add_noise"
MASKS = "test_masks_and_lambda_reach_cross_attention_only"
# issue 10: what only the picture shows (a pointwise denoiser cannot tell)
GATE = "tests/quality/test_quality_gate.py::"

MUTATIONS = [
    Mutation("ddim-alpha-sigma-one-step-off", "cupscale_dist/method/schedulers.py",
             "alpha_bar = float(scheduler.alphas_cumprod[int(scheduler.timesteps[step_index])])",
             "alpha_bar = float(scheduler.alphas_cumprod[int(scheduler.timesteps[min(step_index + 1, "
             "len(scheduler.timesteps) - 1)])])",
             fidelity(f"{X0}[ddim-J1-full]", f"{X0}[ddim-J2-partial]", f"{ZT}[ddim-J1-partial]")),
    Mutation("euler-sigma-one-step-off", "cupscale_dist/method/schedulers.py",
             "return 1.0, float(scheduler.sigmas[step_index])", "return 1.0, float(scheduler.sigmas[step_index + 1])",
             fidelity(f"{X0}[euler-J1-full]", f"{ZT}[euler-J2-partial]")),
    Mutation("x0-formula-sign", "cupscale_dist/method/prior.py",
             "return torch.sub(z_t, x0, out=x0).div_(alpha)",
             "return torch.add(z_t, x0, out=x0).div_(alpha)",
             fidelity(f"{X0}[euler-J1-partial]", f"{X0}[ddim-J2-partial]")),
    Mutation("ddim-clips-x0", "cupscale_dist/method/schedulers.py",
             "options = {**adapter.defaults, **given_options(scheduler_config)}",
             "options = given_options(scheduler_config)",
             fidelity("test_ddim_from_the_test_models_scheduler_config_keeps_the_prior", f"{X0}[ddim-J1-full]")),
    Mutation("zt-injection-no-op", "cupscale_dist/method/step.py",
             "latents = inject_global_prior_zt(latents,", "inject_global_prior_zt(latents,",
             fidelity(f"{ZT}[euler-J1-full]", f"{ZT}[ddim-J2-partial]")),
    Mutation("zt-target-at-current-t", "cupscale_dist/method/step.py",
             "noise_level(schedule.scheduler, schedule.start_index + step + 1)",
             "noise_level(schedule.scheduler, schedule.start_index + step)",
             fidelity(f"{ZT}[euler-J1-full]", f"{ZT}[ddim-J1-partial]")),
    Mutation("uniform-blend-uses-gaussian", "cupscale_dist/method/step.py",
             'if blend == "uniform":\n        return None', 'if blend == "none":\n        return None',
             fidelity("test_multidiffusion_through_the_local_executor[view-offset-uniform]",
                      "test_multidiffusion_through_ray_actors[view-offset-uniform]")),
    Mutation("micro-conditioning-hw-transposed", "cupscale_dist/models/backbones/sdxl/backbone.py",
             "(bottom - top) * f, (right - left) * f", "(right - left) * f, (bottom - top) * f",
             fidelity("test_micro_conditioning_values_reach_the_unet[per_view]")),
    Mutation("micro-conditioning-knob-ignored", "cupscale_dist/models/backbones/sdxl/backbone.py",
             'if sdxl.micro_conditioning == "global":', 'if sdxl.micro_conditioning == "none":',
             fidelity("test_micro_conditioning_values_reach_the_unet[global]",
                      "test_pipeline_sends_the_stage_size_as_global_micro_conditioning")),
    Mutation("stage-size-transposed", "cupscale_dist/pipeline.py",
             "image_hw=(stage.size[1], stage.size[0])", "image_hw=(stage.size[0], stage.size[1])",
             fidelity("test_pipeline_sends_the_stage_size_as_global_micro_conditioning")),
    Mutation("ray-results-out-of-call-order", "cupscale_dist/execution/pool.py",
             "yield self._collect(method, *pending.popleft())", "yield self._collect(method, *pending.pop())",
             fidelity("test_multidiffusion_through_ray_actors[pointwise-uniform]")),
    Mutation("start-index-off-by-one", "cupscale_dist/pipeline.py",
             "start = config.steps - stage.steps", "start = config.steps - stage.steps + 1",
             fidelity(f"{START}[0.6-4-euler]", f"{START}[0.7-4-ddim]")),
    Mutation("strength-floored", "cupscale_dist/plan.py",
             "return int(round(config.strength * config.steps))", "return int(config.strength * config.steps)",
             fidelity(f"{START}[0.7-4-ddim]", f"{START}[0.7-4-euler]")),
    Mutation("add-noise-one-step-late", "cupscale_dist/method/prior.py",
             "scheduler.timesteps[start_index : start_index + 1]",
             "scheduler.timesteps[start_index + 1 : start_index + 2]",
             fidelity(f"{START}[0.6-5-ddim]", f"{START}[0.7-4-ddim]")),  # Euler reads t_S from its begin index
    Mutation("lambda-reaches-self-attention", "cupscale_dist/method/attention.py",
             "        if encoder_hidden_states is None or regional is None:\n"
             "            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb)\n",
             "        if regional is None:\n"
             "            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb)\n"
             "        if encoder_hidden_states is None:\n"
             "            out = self.plain(attn, hidden_states, None, attention_mask, temb)\n"
             "            return regional.lambda_global * out + (1 - regional.lambda_global) * hidden_states\n",
             fidelity(f"{MASKS}[lambda]")),
    Mutation("regional-kwargs-dropped", "cupscale_dist/models/backbones/base.py",
             'cross_attention_kwargs={"regional": regional}, **residuals)', "cross_attention_kwargs=None, **residuals)",
             fidelity(f"{MASKS}[lambda]", f"{MASKS}[masks]")),
    Mutation("lambda-swapped", "cupscale_dist/method/attention.py",
             "return lambda_global * both[:batch] + (1 - lambda_global) * both[batch:]",
             "return (1 - lambda_global) * both[:batch] + lambda_global * both[batch:]",
             ("tests/method/test_attention.py::test_mix_composer_is_the_lambda_blend_of_two_attentions[0.3]",
              *fidelity(f"{MASKS}[lambda]"))),
    Mutation("mask-screens-regional-prompt", "cupscale_dist/method/attention.py",
             "bias = torch.cat([bias, torch.zeros_like(bias)])", "bias = torch.cat([bias, bias])",
             fidelity(f"{MASKS}[lambda+masks]")),
    Mutation("mask-screens-cfg-unconditional", "cupscale_dist/method/step.py",
             "token_allowed = torch.cat([torch.ones(count, tokens, dtype=torch.bool), token_allowed])",
             "token_allowed = torch.cat([token_allowed, token_allowed])",
             fidelity(f"{MASKS}[masks]")),
    # Views that are summed, not averaged (the per-pixel count ignored). The subtler "last view wins" (no blending)
    # is below: the gates cannot see it (overlapping views agree closely at strength 0.2), the invariant test can.
    Mutation("views-summed-not-averaged", "cupscale_dist/method/step.py",
             "    return total / weight\n", "    return total\n",
             (GATE + "test_defaults_keep_the_input_and_its_detail_and_hide_seams",)),
    Mutation("prior-never-injected", "cupscale_dist/method/step.py",
             "weight = schedule.prior_scale * prior_weight(",
             "weight = 0.0 * schedule.prior_scale * prior_weight(",
             (GATE + "test_the_global_prior_improves_consistency",)),
    # The prior from the SR network's picture (resize: model, the preset's first step) instead of the input's.
    Mutation("prior-from-the-sr-picture", "cupscale_dist/method/resize.py",
             '    if config.resize != "model" or config.prior_source != "input":\n',
             '    if True:\n',
             (GATE + "test_defaults_keep_the_input_and_its_detail_and_hide_seams",)),
    Mutation("vae-decode-tiles-unweighted", "cupscale_dist/method/vae.py",
             "acc[(slice(None), *target)].addcmul_(pixels[:, kept_rows], windows[size][kept_rows])",
             "acc[(slice(None), *target)].add_(pixels[:, kept_rows])",
             (GATE + "test_defaults_keep_the_input_and_its_detail_and_hide_seams",)),
    # Issue 11: every view the same (top-left) control image instead of its own crop; the scale never applied.
    Mutation("controlnet-same-crop-for-every-view", "cupscale_dist/models/controlnet.py",
             "pixels[top * factor : bottom * factor, left * factor : right * factor]",
             "pixels[: (bottom - top) * factor, : (right - left) * factor]",
             ("tests/models/test_controlnet.py::test_each_view_gets_its_own_crop_of_the_stage_input",)),
    Mutation("controlnet-scale-ignored", "cupscale_dist/models/backbones/base.py",
             "conditioning_scale=context.controlnet_scale", "conditioning_scale=1.0",
             ("tests/models/test_controlnet.py::test_scale_0_is_the_run_without_controlnet_bit_for_bit",)),
    Mutation("prior-scale-ignored", "cupscale_dist/method/step.py",
             "weight = schedule.prior_scale * prior_weight(", "weight = 1.0 * prior_weight(",
             ("tests/method/test_user_knobs.py::test_prior_scale_scales_the_injected_prior",)),
    # issue 23: each view overwriting the overlap instead of the average (a pointwise denoiser cannot tell)
    Mutation("last-view-wins", "cupscale_dist/method/step.py",
             "total[(..., *target)].add_(prediction if w is None else prediction * w)\n"
             "    if weight is not None:\n        weight[target].add_(1.0 if w is None else w)",
             "total[(..., *target)].copy_(prediction) if w is None else total[(..., *target)].add_(prediction * w)\n"
             "    if weight is not None:\n        weight[target].fill_(1.0) if w is None else weight[target].add_(w)",
             ("tests/method/test_invariants.py::test_overlapping_views_that_disagree_are_averaged_not_overwritten[uniform]",)),
    # issue 34: the step on the actors must keep the reference's bytes for any layout
    Mutation("parts-summed-out-of-view-order", "cupscale_dist/method/parts.py",
             "ordered = sorted(contributions, key=lambda c: c[0])", "ordered = contributions[::-1]",
             ("tests/execution/test_parts.py::test_owned_bands_give_the_reference_latent_for_any_layout[jitter-gaussian]",)),
    Mutation("step-noise-ignores-the-band-offset", "cupscale_dist/method/schedulers.py",
             "+ (row0 + row) * 7_919_113)", "+ row * 7_919_113)",
             ("tests/execution/test_parts.py::test_owned_bands_give_the_reference_latent_for_any_layout[lcm]",)),
    # Issue 34, the VAE on the owners: a band decoded without the tiles that start above it; a band's rows of the
    # stage noise taken from the top of the draw instead of its own rows.
    Mutation("band-decode-drops-the-tiles-above-it", "cupscale_dist/method/vae.py",
             "if top < hi and bottom > lo:", "if top < hi and top >= lo:",
             ("tests/execution/test_vae_on_owners.py::test_any_split_of_the_rows_decodes_to_the_whole_decodes_bytes",)),
    Mutation("band-noise-from-the-top-of-the-draw", "cupscale_dist/method/prior.py",
             "noise[..., rows[0] : rows[1], :]", "noise[..., : rows[1] - rows[0], :]",
             ("tests/execution/test_vae_on_owners.py::test_owners_decode_the_reference_bytes_and_the_driver_never_gathers",)),
    # issue 22: Flux.1 as a backbone (tests/models/test_flux.py)
    Mutation("flux-positions-dropped", "cupscale_dist/models/backbones/flux/backbone.py",
             "ids[..., 1] += float(top) / PATCH", "ids[..., 1] += 0 * float(top) / PATCH",
             flux("test_positional_stand_in_tiled_equals_untiled_with_global_positions",
                  "test_image_ids_carry_the_views_global_offset")),
    Mutation("flux-one-position-table-per-batch", "cupscale_dist/models/backbones/flux/joint_attention.py",
             "cos, sin = regional.rotary\n", "cos, sin = (t[:1].expand_as(t) for t in regional.rotary)\n",
             flux("test_lambda_one_nothing_screened_is_the_stock_transformer[dev-global]",
                  "test_lambda_one_nothing_screened_is_the_stock_transformer[schnell-global]")),
    Mutation("flux-mask-on-image-keys", "cupscale_dist/models/backbones/flux/joint_attention.py",
             "bias_g = torch.cat([bias, bias.new_zeros(*bias.shape[:-1], image)], dim=-1)",
             "bias_g = torch.cat([bias.new_zeros(*bias.shape[:-1], image), bias], dim=-1)",
             flux("test_screened_global_tokens_get_zero_weight_from_image_queries_only[mix-0.4]",
                  "test_mix_composer_is_lambda_blend_of_the_two_prompts_attentions")),
    Mutation("flux-mask-on-text-queries", "cupscale_dist/models/backbones/flux/joint_attention.py",
             "parts = [attend(q_g, keys_g, values_g)]", "parts = [attend(q_g, keys_g, values_g, bias_g)]",
             flux("test_screened_global_tokens_get_zero_weight_from_image_queries_only[mix-1.0]",
                  "test_mix_composer_is_lambda_blend_of_the_two_prompts_attentions")),
    Mutation("flux-prior-sign", "cupscale_dist/method/prior.py",
             "x0 = z_t - sigma * velocity", "x0 = z_t + sigma * velocity",
             flux("test_flow_x0_prior_holds_for_the_schedulers_own_convention[dev-J1-full]",
                  "test_flow_x0_prior_holds_for_the_schedulers_own_convention[schnell-J2-partial]")),
    Mutation("flux-flow-sigma-as-euler", "cupscale_dist/method/schedulers.py",
             "            return 1.0 - sigma, sigma", "            return 1.0, sigma",
             flux("test_flow_zt_prior_pulls_the_next_latent_toward_the_noised_input[dev-J1-full]")),
    Mutation("flux-resume-restarts-the-schedule", "cupscale_dist/pipeline.py",
             "scheduler.set_begin_index(start + (resume.step if resume else 0))", "scheduler.set_begin_index(start)",
             ("tests/models/test_flux_pipeline.py::test_a_resumed_flux_run_gives_the_uninterrupted_bytes[dev]",)),
    Mutation("flux-file-q-and-k-swapped", "cupscale_dist/models/backbones/flux/single_file.py",
             '"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),',
             '"img_attn.qkv": ("attn.to_k", "attn.to_q", "attn.to_v"),',
             ("tests/models/test_flux_single_file.py::test_our_transformer_conversion_equals_diffusers_at_flux_width",)),
    Mutation("flux-file-every-file-dev", "cupscale_dist/models/backbones/flux/header.py",
             'return "dev" if GUIDANCE_KEY in keys', 'return "dev" if True or GUIDANCE_KEY in keys',
             ("tests/models/test_flux_single_file.py::test_the_header_tells_layout_and_variant",
              ("tests/models/test_flux_single_file.py::test_a_single_file_loads_the_weights_of_its_diffusers_directory"
               "[schnell-bfl]"))),
    # issue 36: Z-Image as a backbone (tests/models/test_zimage.py)
    Mutation("zimage-positions-dropped", "cupscale_dist/models/backbones/zimage/positions.py",
             "grid[..., 1] += float(top) / PATCH", "grid[..., 1] += 0 * float(top) / PATCH",
             zimage("test_positional_stand_in_tiled_equals_untiled_with_global_positions",
                    "test_lambda_one_nothing_screened_is_the_stock_transformer[global]")),
    Mutation("zimage-caption-length-per-view", "cupscale_dist/models/backbones/zimage/backbone.py",
             "caption = self.caption_length(context, regional)",
             'caption = stage_caption_length([lengths["global"], *(lengths["regional"][i] for i in '
             "context.view_prompt[view_ids])])",
             zimage("test_every_view_of_a_stage_sits_at_the_same_image_position",)),
    Mutation("zimage-fed-sigma", "cupscale_dist/models/backbones/zimage/backbone.py",
             "t = (1000 - t) / 1000", "t = t / 1000",
             zimage("test_the_step_replays_zimage_pipelines_run_with_its_timestep_convention[3]",)),
    Mutation("zimage-output-not-negated", "cupscale_dist/models/backbones/zimage/backbone.py",
             "return -out  #", "return out  #",
             zimage("test_the_step_replays_zimage_pipelines_run_with_its_timestep_convention[3]",)),
    Mutation("zimage-rope-from-the-table", "cupscale_dist/models/backbones/zimage/backbone.py",
             "return rope_freqs(ids.to(self.device), embedder.axes_dims, embedder.theta)",
             "return embedder(ids.to(self.device).long())",
             zimage("test_positions_past_axes_lens_are_the_rope_formulas_not_an_index_error",)),
    Mutation("zimage-screen-dropped", "cupscale_dist/models/backbones/zimage/attention.py",
             "screen_g = screen if bias_g is None else bias_g + screen", "screen_g = bias_g",
             zimage("test_screened_global_tokens_get_zero_weight_from_the_views_image_queries[mix-0.4]",
                    "test_view_masks_and_regional_prompts_reach_every_single_stream_layer")),
    Mutation("zimage-prior-sign", "cupscale_dist/method/prior.py",
             "x0 = z_t - sigma * velocity", "x0 = z_t + sigma * velocity",
             zimage("test_the_flow_prior_is_exact_under_zimage_turbos_schedule[1]",)),
    Mutation("zimage-filler-attended", "cupscale_dist/models/backbones/zimage/backbone.py",
             "kept = positions < torch.tensor([padded_length(n) for n in lengths], device=device)[:, None]",
             "kept = positions < caption",
             zimage("test_a_shorter_caption_is_its_tokens_then_pad_tokens_then_masked_filler",)),
]


def copy_tree(dest: Path) -> None:
    for part in COPIED:
        shutil.copytree(ROOT / part, dest / part, ignore=shutil.ignore_patterns("__pycache__"))


def apply(mutation: Mutation, tree: Path) -> str | None:
    """Edit the copy; the reason when the mutation no longer applies (its text is gone or ambiguous)."""
    path = tree / mutation.file
    text = path.read_text()
    count = text.count(mutation.old)
    if count != 1:
        return f"old text found {count} times in {mutation.file}"
    path.write_text(text.replace(mutation.old, mutation.new))
    return None


def environment(tree: Path) -> dict:
    """The caller's environment with the copy first on PYTHONPATH (Ray workers inherit it), offline, no .pyc."""
    path = os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}


ZYGOTE = r"""
import json, os, sys

# The heavy libraries once, here; the package never (each fork imports its own copy).
import numpy, PIL.Image, pytest, safetensors.torch, torch, yaml  # noqa: E401, F401
import diffusers, transformers  # noqa: E401, F401
from diffusers import AutoencoderKL, FluxTransformer2DModel, UNet2DConditionModel  # noqa: F401
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel  # noqa: F401
try:
    import ray  # noqa: F401
except ImportError:
    pass
assert "cupscale_dist" not in sys.modules
print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            os.setsid()  # the mutant and what it starts (Ray) are one process group, killed as one on a timeout
            log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.chdir(job["tree"])
            os.environ.update(job["env"])
            sys.path[:] = [job["tree"]] + [p for p in sys.path if p and os.path.abspath(p) not in job["hide"]]
            code = int(pytest.main(job["args"]))
            import importlib.util

            where = [getattr(sys.modules.get("cupscale_dist"), "__file__", None) or "",
                     getattr(importlib.util.find_spec("actors"), "origin", None) or ""]
            with open(job["done"] + ".tmp", "w") as out:
                json.dump({"returncode": code, "imports": where}, out)
            os.rename(job["done"] + ".tmp", job["done"])
        finally:
            os._exit(code)
    print(pid, flush=True)
    while True:  # reap the forks that ended
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break
"""


class Zygote:
    """A process that imported the heavy libraries once; each mutant's pytest is forked from it."""

    started: list[Zygote] = []  # for SIGTERM, which may come while one is still importing

    def __init__(self):
        self.lock = threading.Lock()
        self.running: set[int] = set()  # forks (each its own process group) not yet reaped by run()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        self.proc = subprocess.Popen([sys.executable, "-P", "-c", ZYGOTE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=tempfile.gettempdir(), env=env)
        Zygote.started.append(self)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the mutant zygote did not start")

    def run(self, tree: Path, args: list[str], timeout: float) -> tuple[int | None, str]:
        done, log = tree / "done.json", tree / "pytest.log"
        hide = sorted({str(ROOT), str(ROOT / "tests" / "mutants")})
        job = {"tree": str(tree), "args": args, "env": environment(tree), "log": str(log), "done": str(done),
               "hide": hide}
        with self.lock:
            self.proc.stdin.write(json.dumps(job) + "\n")
            self.proc.stdin.flush()
            pid = int(self.proc.stdout.readline())
            self.running.add(pid)
        deadline = time.monotonic() + timeout
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)  # what it left running (it ended), or all of it (timed out)
        self.running.discard(pid)
        output = log.read_text(errors="replace") if log.exists() else ""
        if not done.exists():
            return None, output + f"\ntimed out after {timeout} s"
        result = json.loads(done.read_text())
        if not all(where.startswith(str(tree)) for where in result["imports"]):
            return None, output + f"\nthe package and actors came from {result['imports']}, not the copy"
        return result["returncode"], output

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)

    def kill_all(self):
        for pid in list(self.running):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        self.proc.kill()


ZYGOTE_PROCESS: Zygote | None = None
TREES: str | None = None  # the folder of the mutants' copies (removed on SIGTERM too)


def run_pytest(tree: Path, tests: tuple[str, ...], stop_at_first: bool = False) -> dict:
    """Run ``tests`` against the copy in ``tree``: which of them failed, and pytest's exit status (``stop_at_first``:
    a mutant's first failing test is its verdict, the others need not run)."""
    report = tree / "report.xml"
    # a mutant: one process, stopping at its first failure (mutants run side by side); the baseline: forks side by
    # side, or (--no-fork) pyproject's two xdist workers
    forked = ZYGOTE_PROCESS is not None
    command = [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--rootdir={ROOT}",
               f"--junitxml={report}", *(["-x"] if stop_at_first else []),
               *(["-n", "0"] if stop_at_first or forked else []), *(str(ROOT / t) for t in tests)]
    started = time.monotonic()
    if forked:
        returncode, output = ZYGOTE_PROCESS.run(tree, command[command.index("pytest") + 1:], RUN_TIMEOUT_S)
    else:
        try:
            proc = subprocess.run(command, cwd=tree, env=environment(tree), capture_output=True, text=True,
                                  timeout=RUN_TIMEOUT_S)
            returncode, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired:
            returncode, output = None, f"timed out after {RUN_TIMEOUT_S} s"
    failed, ran = [], 0
    if report.exists():
        for case in ET.parse(report).iter("testcase"):
            ran += 1
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}")
        report.unlink()
    seconds = round(time.monotonic() - started, 1)
    return {"returncode": returncode, "ran": ran, "failed": failed, "seconds": seconds, "tail": output[-2000:]}


def imported_from(tree: Path) -> str:
    """Where a subprocess set up like the test runs imports the package and the actors from."""
    code = "import cupscale_dist, actors; print(cupscale_dist.__file__, actors.__file__)"
    return subprocess.run([sys.executable, "-P", "-c", code], cwd=tree, env=environment(tree), capture_output=True,
                          text=True).stdout


def verdict(mutation: Mutation, base: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="cupscale-mutant-", dir=base) as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        stale = apply(mutation, tree)
        if stale:
            return {"mutation": mutation.name, "status": "stale", "detail": stale}
        result = run_pytest(tree, mutation.tests, stop_at_first=True)
    if result["returncode"] == 1 and result["failed"]:
        status = "caught"
    elif result["returncode"] == 0:
        status = "survived"
    else:  # collection error, no tests collected, timeout: a broken mutation or stale test ids
        status = "error"
    return {"mutation": mutation.name, "status": status, "file": mutation.file, **result,
            "tail": result["tail"] if status == "error" else ""}


def split_by_file(tests: tuple[str, ...], parts: int) -> list[tuple[str, ...]]:
    """The tests in ``parts`` groups of whole files, about equal in time (tests/durations.json's seconds per file)."""
    durations = ROOT / "tests" / "durations.json"
    seconds = json.loads(durations.read_text()) if durations.exists() else {}
    files: dict[str, list[str]] = {}
    for test in tests:
        files.setdefault(test.split("::")[0], []).append(test)
    groups: list[list[str]] = [[] for _ in range(max(1, parts))]
    load = [0.0] * len(groups)
    for path in sorted(files, key=lambda path: -seconds.get(path, 20.0)):
        emptiest = load.index(min(load))
        groups[emptiest] += files[path]
        load[emptiest] += seconds.get(path, 20.0)
    return [tuple(group) for group in groups if group]


def junit_outcomes(report: Path) -> dict[str, bool]:
    """A pytest JUnit report's cases as ``{"tests/x/test_y.py::name[param]": passed}`` (classes joined with
    ``::``); a skipped case counts as not passed."""
    outcomes = {}
    for case in ET.parse(report).iter("testcase"):
        parts = case.get("classname", "").split(".")
        module = next((i for i in range(len(parts), 0, -1) if (ROOT / Path(*parts[:i])).with_suffix(".py").exists()),
                      len(parts))
        node = "::".join(["/".join(parts[:module]) + ".py", *parts[module:], case.get("name", "")])
        bad = any(case.find(kind) is not None for kind in ("failure", "error", "skipped"))
        outcomes[node] = outcomes.get(node, True) and not bad
    return outcomes


def passed_in(tests: tuple[str, ...], report: Path) -> tuple[str, ...]:
    """The named tests that a JUnit report of this tree does not show passing (a name without parameters stands for
    all its cases, which must all have passed): these still need their baseline run."""
    outcomes = junit_outcomes(report)
    missing = []
    for test in tests:
        cases = [ok for node, ok in outcomes.items() if node == test or node.startswith(test + "[")]
        if not cases or not all(cases):
            missing.append(test)
    return tuple(missing)


def baseline(mutations: list[Mutation], base: Path, jobs: int = 2, passed: Path | None = None) -> dict:
    """All named tests on the unmutated copy: they must pass, and the copy must be what gets imported.

    ``passed``: a JUnit report of the whole suite on this tree (CI's pytest phase, minutes before): the named tests it
    shows passing are not run again (CI's baseline was 47 tests, 524 s of its 67 min); each mutant's fork still
    checks that it imported its copy, and a test the report lacks or shows failing or skipped runs here as before."""
    tests = tuple(dict.fromkeys(t for m in mutations for t in m.tests))
    if passed is not None:
        known = len(tests)
        tests = passed_in(tests, passed)
        if not tests:
            return {"mutation": "(none)", "status": "passes", "imports": "checked per mutant", "returncode": 0,
                    "ran": 0, "failed": [], "seconds": 0.0, "tail": "",
                    "passed_in": f"{passed}: all {known} named tests passed there"}
    if ZYGOTE_PROCESS is not None:  # side by side in forks, each its own copy (checked to be what they import)
        def part(group: tuple[str, ...]) -> dict:
            with tempfile.TemporaryDirectory(prefix="cupscale-mutant-", dir=base) as tmp:
                copy_tree(Path(tmp))
                return run_pytest(Path(tmp), group)

        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            parts = list(pool.map(part, split_by_file(tests, jobs)))
        ok = all(result["returncode"] == 0 for result in parts)
        return {"mutation": "(none)", "status": "passes" if ok else "baseline-broken", "imports": "each fork's copy",
                "returncode": 0 if ok else next(r["returncode"] for r in parts if r["returncode"] != 0),
                "ran": sum(r["ran"] for r in parts), "failed": [f for r in parts for f in r["failed"]],
                "seconds": round(time.monotonic() - started, 1),
                "tail": "" if ok else "\n".join(r["tail"] for r in parts if r["returncode"] != 0)}
    with tempfile.TemporaryDirectory(prefix="cupscale-mutant-", dir=base) as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        where = imported_from(tree)
        result = run_pytest(tree, tests)
    ok = result["returncode"] == 0 and where.count(str(tree)) == 2
    return {"mutation": "(none)", "status": "passes" if ok else "baseline-broken", "imports": where.strip(), **result,
            "tail": "" if ok else result["tail"]}


def wait_for_report(report: Path, timeout: float) -> None:
    """Until the pytest beside this run has written its JUnit report (pytest writes it once, at its end)."""
    deadline = time.monotonic() + timeout
    while not report.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"no JUnit report at {report} after {timeout:g} s: did the suite's pytest run with "
                             f"--junitxml={report}?")
        time.sleep(1.0)
    time.sleep(1.0)  # pytest writes the file in one go; let it close


def stop_on_sigterm(signum, frame) -> None:
    """SIGTERM: the mutants running now (their own process groups) and the zygote go too, then exit 143."""
    for zygote in Zygote.started:
        zygote.kill_all()
    if TREES is not None:
        shutil.rmtree(TREES, ignore_errors=True)
    os._exit(128 + signum)


TABLE_HEADER = f"{'mutation':34} {'status':16} {'failed/ran':>10} {'s':>6}\n" + "-" * 70


def table_row(row: dict) -> str:
    counts = f"{len(row.get('failed', []))}/{row.get('ran', 0)}"
    return f"{row['mutation']:34} {row['status']:16} {counts:>10} {row.get('seconds', 0):>6}"


def main() -> int:
    global RUN_TIMEOUT_S, ZYGOTE_PROCESS, TREES
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutations")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="mutants tested at once (each pytest runs its model on one thread)")
    parser.add_argument("--timeout", type=float, default=RUN_TIMEOUT_S, metavar="S",
                        help=f"seconds one pytest run may take before it counts as broken (default {RUN_TIMEOUT_S}; "
                             "raise it on a machine loaded by other work)")
    parser.add_argument("--passed-in", type=Path, metavar="JUNIT",
                        help="a JUnit report of the suite on this tree (CI's pytest phase): the baseline skips the "
                             "named tests it shows passing")
    parser.add_argument("--wait-for-report", type=float, default=0.0, metavar="S",
                        help="with --passed-in: the report is still being written by a pytest run beside this one "
                             "(CI runs the two at once: the suite mostly waits on process starts, not the CPU); run "
                             "the verdicts first, then wait up to S seconds for the report, then the baseline")
    parser.add_argument("--no-fork", action="store_true",
                        help="each mutant's pytest in a fresh interpreter (default: forked from one that imported "
                             "the heavy libraries once)")
    args = parser.parse_args()
    RUN_TIMEOUT_S = args.timeout
    unknown = sorted(set(args.only or ()) - {m.name for m in MUTATIONS})
    if unknown:
        parser.error(f"unknown mutation(s) {', '.join(unknown)}; known: {', '.join(m.name for m in MUTATIONS)}")
    mutations = [m for m in MUTATIONS if not args.only or m.name in args.only]
    started = time.monotonic()
    print(TABLE_HEADER, file=sys.stderr, flush=True)
    if args.wait_for_report and args.passed_in is None:
        parser.error("--wait-for-report needs --passed-in (the report to wait for)")
    signal.signal(signal.SIGTERM, stop_on_sigterm)  # CI stops it when the pytest beside it failed
    ZYGOTE_PROCESS = None if args.no_fork else Zygote()
    try:
        with tempfile.TemporaryDirectory(prefix="cupscale-mutants-") as base:
            TREES, verdicts = base, []

            def run_verdicts() -> None:
                with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
                    for row in pool.map(lambda mutation: verdict(mutation, Path(base)), mutations):
                        verdicts.append(row)
                        print(table_row(row), file=sys.stderr, flush=True)

            if args.wait_for_report:  # verdicts while the suite runs; they count only if the baseline then passes
                run_verdicts()
                wait_for_report(args.passed_in, args.wait_for_report)
            rows = [baseline(mutations, Path(base), args.jobs, args.passed_in)]
            print(table_row(rows[0]), file=sys.stderr, flush=True)
            if rows[0]["status"] == "passes" and not args.wait_for_report:
                run_verdicts()
            rows += verdicts
    finally:
        if ZYGOTE_PROCESS is not None:
            ZYGOTE_PROCESS.close()
    seconds = round(time.monotonic() - started, 1)
    print(f"total {seconds} s", file=sys.stderr)
    ok = rows[0]["status"] == "passes" and all(row["status"] == "caught" for row in rows[1:])
    print(json.dumps({"ok": ok, "seconds": seconds, "results": rows}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
