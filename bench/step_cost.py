"""Where a denoising step's time goes, and what attention control costs over the plain UNet: prints one JSON object.

    python bench/step_cost.py [--threads 1] [--runs 3] [--input-size 256] [--unet-channels 32,64]
    python bench/step_cost.py --full-size --device cuda --dtype bfloat16 [--tiles 4,8] [--latent 128]
    python bench/step_cost.py --full-size --tiles 1 --latent 16 --repeats 2     # CPU smoke test (not a GPU figure)

Default mode (demo model): runs the real single-process pipeline (``cupscale_dist.upscale`` with a
``LocalExecutor`` over a ``ModelWorker``) on the tiny random SDXL-architecture model and splits every step, by
instrumenting the very functions the pipeline calls (no re-implementation), into: UNet (``ModelWorker.predict``
over all views), cutting the windows (``predict_step``), MultiDiffusion reduce (``reduce_predictions``), prior
injection (``inject_global_prior``), the scheduler step, and the rest; per stage, worker side (a GPU actor in Ray
mode): the VAE forwards (``ModelWorker.encode_tile`` / ``decode_tile``), the attention probe (``ModelWorker.probe``,
its native-size encode included), prompt encoding (``ModelWorker.encode_prompts``); driver side: cutting and
blending the VAE tiles (``vae.encode_image`` / ``vae.decode_bands``) and the masks around the probe. Seconds and
fractions; median over ``--runs`` after one warm-up run.

``--full-size``: an SDXL-architecture UNet (SDXL base's UNet config, random weights, built from the config, nothing
downloaded). Side by side, round-robin, after warm-up, median of ``--repeats``:
  * ``bare``: one batched UNet call with diffusers' plain ``AttnProcessor2_0`` (CFG batch of 2 x tiles, inputs
    already on the device) -- the reference;
  * ``predict_views_plain``: the pipeline's ``predict_views`` for the same tiles with lambda=1 and no masks (what
    the pipeline adds around the UNet: host->device inputs, CFG, micro-conditioning, result to host). Target: rate
    >= 0.98 of bare;
  * attention control through ``predict_views``: view masks (additive bias), pixel masks, lambda-mix composer
    (with and without view masks), joint composer. Targets (architecture.md): masks <= +2 %, lambda-mix <= +4 %
    over the plain UNet.
On CPU these are smoke-test figures only; the targets are GPU (H100, bf16) targets.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout (or the GPU box) without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import load_average, log, rounded  # noqa: E402  (bench/common.py)
from cupscale_dist.testing.fullsize import SDXL_UNET_CONFIG  # noqa: E402  (SDXL base's published UNet config)


# ---------------------------------------------------------------------------------------------------------------
# Demo mode: instrument the real pipeline
# ---------------------------------------------------------------------------------------------------------------
class Timer:
    """Exclusive time per region name: a region nested in another is subtracted from its parent."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.stack: list[list] = []

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        self.stack.append([name, 0.0])
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            _, children = self.stack.pop()
            self.totals[name] += elapsed - children
            if self.stack:
                self.stack[-1][1] += elapsed

    def snapshot(self) -> dict[str, float]:
        return dict(self.totals)


def timed(timer: Timer, name: str, fn):
    def wrapper(*args, **kwargs):
        with timer(name):
            return fn(*args, **kwargs)

    wrapper.__wrapped__ = fn
    return wrapper


def timed_bands(timer: Timer, name: str, fn):
    """Wrap a function returning an iterator (``decode_bands``): time each ``next``, where its work happens."""
    def wrapper(*args, **kwargs):
        bands = fn(*args, **kwargs)
        while True:
            with timer(name):
                band = next(bands, None)
            if band is None:
                return
            yield band

    wrapper.__wrapped__ = fn
    return wrapper


STEP_PARTS = ("unet", "cut_windows", "reduce", "prior", "scheduler_step")
# Exclusive per-stage parts: each VAE direction is split into the forwards (ModelWorker.encode_tile / decode_tile,
# on a GPU worker in Ray mode) and the driver's cut + blend around them (vae.encode_image / vae.decode_bands).
STAGE_PARTS = ("vae_encode_forward", "vae_encode_blend", "attention_probe", "attention_masks", "prompt_encode",
               "vae_decode_forward", "vae_decode_blend")
STAGE_TOTALS = {"vae_encode": ("vae_encode_forward", "vae_encode_blend"),  # inclusive, as before the split
                "vae_decode": ("vae_decode_forward", "vae_decode_blend")}


def demo_breakdown(args) -> dict:
    from PIL import Image

    from cupscale_dist import UpscaleConfig, pipeline as pipeline_mod, upscale
    from cupscale_dist.execution.executor import LocalExecutor
    from cupscale_dist.execution.worker import ModelWorker
    from cupscale_dist.method import step as step_mod
    from cupscale_dist.testing.tiny import build_tiny_sdxl

    timer = Timer()
    steps: list[dict] = []  # per step: exclusive seconds per part + inclusive total
    stages: list[dict] = []

    class TimedLocalExecutor(LocalExecutor):
        """LocalExecutor.map with predict_step's window cut (its lazily made calls) timed apart from the UNet."""

        def map(self, method, calls):
            if method != "predict":
                yield from super().map(method, calls)
                return
            calls = iter(calls)
            while True:
                with timer("cut_windows"):
                    args = next(calls, None)
                if args is None:
                    return
                yield from super().map(method, [args])

    def reduce_and_step(*a, **k):
        before = timer.snapshot()
        start = time.perf_counter()
        with timer("step_other"):
            out = original["reduce_and_step"](*a, **k)
        record = {name: timer.totals[name] - before.get(name, 0.0) for name in (*STEP_PARTS, "step_other")}
        record["total"] = time.perf_counter() - start
        steps.append(record)
        return out

    def run_stage(*a, **k):
        before, first_step = timer.snapshot(), len(steps)
        start = time.perf_counter()
        with timer("stage_other"):
            out = original["run_stage"](*a, **k)
        record = {name: timer.totals[name] - before.get(name, 0.0) for name in (*STAGE_PARTS, "stage_other")}
        record["total"] = time.perf_counter() - start
        record["steps"] = sum(s["total"] for s in steps[first_step:])  # all steps of the stage, inclusive
        stages.append(record)
        return out

    original = {"reduce_and_step": pipeline_mod.reduce_and_step, "run_stage": pipeline_mod.run_stage}
    patches = [  # module functions, as the pipeline looks them up
        (pipeline_mod, "reduce_and_step", reduce_and_step),
        (pipeline_mod, "run_stage", run_stage),
        (pipeline_mod, "encode_image", timed(timer, "vae_encode_blend", pipeline_mod.encode_image)),  # step 2
        (pipeline_mod, "decode_bands", timed_bands(timer, "vae_decode_blend", pipeline_mod.decode_bands)),  # 10
        (pipeline_mod, "attention_token_masks", timed(timer, "attention_masks", pipeline_mod.attention_token_masks)),
        (step_mod, "reduce_predictions", timed(timer, "reduce", step_mod.reduce_predictions)),
        (step_mod, "inject_global_prior", timed(timer, "prior", step_mod.inject_global_prior)),
        (step_mod, "inject_global_prior_zt", timed(timer, "prior", step_mod.inject_global_prior_zt)),
    ]

    with tempfile.TemporaryDirectory() as tmp:
        log(f"building the tiny SDXL (unet_channels={args.unet_channels}) ...")
        model_dir = str(build_tiny_sdxl(Path(tmp) / "model", seed=0, unet_channels=args.unet_channels))
        worker = ModelWorker(model_dir, device="cpu", dtype="float32")
        # Instance-level wraps: every forward pass the executor runs, and every scheduler the pipeline creates.
        for method, name in (("predict", "unet"), ("encode_tile", "vae_encode_forward"),
                             ("decode_tile", "vae_decode_forward"), ("encode_prompts", "prompt_encode"),
                             ("probe", "attention_probe")):
            setattr(worker, method, timed(timer, name, getattr(worker, method)))
        new_scheduler = worker.spec.new_scheduler

        def timed_scheduler(kind):
            scheduler = new_scheduler(kind)
            scheduler.step = timed(timer, "scheduler_step", scheduler.step)
            return scheduler

        worker.spec.new_scheduler = timed_scheduler

        config = UpscaleConfig.load("cpu-demo", model=model_dir, torch_threads=args.threads)
        if args.steps:
            config = config.replace(steps=args.steps)
        image = Image.open(ROOT / "examples" / "astronaut.png").convert("RGB")
        image = image.resize((args.input_size, args.input_size), Image.Resampling.BICUBIC)
        saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
        for module, name, fn in patches:
            setattr(module, name, fn)
        runs = []
        try:
            for run in range(args.runs + 1):
                steps.clear()
                stages.clear()
                start = time.perf_counter()
                executor = TimedLocalExecutor(worker, config.view_batch_size)
                upscale(image, config, executor=executor, progress=False)
                wall = time.perf_counter() - start
                log(f"run {run}{' (warm-up)' if run == 0 else ''}: {wall:.2f} s, {len(steps)} steps")
                if run > 0:
                    runs.append({"wall": wall, "steps": [dict(s) for s in steps], "stages": [dict(s) for s in stages]})
        finally:
            for module, name, fn in saved:
                setattr(module, name, fn)

    from cupscale_dist.method.views import make_views
    from cupscale_dist.plan import plan_stages

    sizes = plan_stages(image.size, config)
    latent = [(h // 8, w // 8) for w, h in sizes]
    views = [len(make_views(h, w, config.tile, config.stride)) for h, w in latent]

    def per_step(run: dict) -> dict:
        means = {part: statistics.fmean(s[part] for s in run["steps"]) for part in (*STEP_PARTS, "step_other", "total")}
        active = [s["prior"] for s in run["steps"] if s["prior"] > 0]
        means["prior_when_active"] = statistics.fmean(active) if active else 0.0
        return means

    per_run = [per_step(r) for r in runs]
    seconds = {k: statistics.median(r[k] for r in per_run) for k in per_run[0]}
    fractions = {k: seconds[k] / seconds["total"] for k in (*STEP_PARTS, "step_other")}
    stage_rows = []
    for i in range(len(sizes)):
        row = {k: statistics.median(r["stages"][i][k] for r in runs)
               for k in (*STAGE_PARTS, "stage_other", "steps", "total")}
        fraction = {k: row[k] / row["total"] for k in row if k != "total"}
        row.update({total: sum(row[k] for k in parts) for total, parts in STAGE_TOTALS.items()})
        stage_rows.append({"size_wh": list(sizes[i]), "latent_hw": list(latent[i]), "views": views[i],
                           "seconds": row, "fraction_of_stage": fraction})
    unet_per_view = seconds["unet"] / views[-1] if len(set(views)) == 1 else None
    return {
        "mode": "demo",
        "what": "real single-process pipeline (upscale + LocalExecutor over a ModelWorker), every step split by "
                "instrumenting the functions it calls; medians over runs of the per-step mean",
        "model": f"tiny SDXL-architecture, random weights, unet_channels={list(args.unet_channels)}",
        "config": {k: getattr(config, k) for k in ("scale", "tile", "stride", "steps", "strength", "view_batch_size",
                                                     "composer", "mask_mode", "prior_space", "prior_target",
                                                     "prior_fraction", "scheduler", "vae_tile")},
        "input_size": [args.input_size, args.input_size],
        "runs": args.runs, "warmup_runs": 1,
        "steps_per_stage": int(round(config.strength * config.steps)),
        "per_step_seconds": seconds,
        "per_step_fraction": fractions,
        "per_step_notes": "unet = ModelWorker.predict for all views of the step (predict_views, CFG included); "
                          "cut_windows = predict_step cutting each batch's windows; prior is active in the "
                          "first prior_fraction of the steps (prior_when_active = its mean over those steps); "
                          "step_other = reduce_and_step's own code (prior weight, noise level) + predict_step's "
                          "result copies + generator glue",
        "per_stage_notes": "worker side (a GPU actor in Ray mode): vae_*_forward = ModelWorker.encode_tile / "
                           "decode_tile, attention_probe = ModelWorker.probe (its native-size VAE encode + UNet "
                           "pass), prompt_encode = ModelWorker.encode_prompts; driver side: vae_*_blend = cutting "
                           "tiles + blending in vae.encode_image / vae.decode_bands (uint8 bands), attention_masks "
                           "= attention_token_masks around the probe (resize, noise, binarise, view masks). "
                           "vae_encode / vae_decode = forward + blend (inclusive, not in fraction_of_stage)",
        "unet_seconds_per_view": unet_per_view,
        "per_stage": stage_rows,
        "wall_seconds_per_run": statistics.median(r["wall"] for r in runs),
    }


# ---------------------------------------------------------------------------------------------------------------
# Full size: SDXL-architecture UNet, our predict_views vs the bare batched call; attention control variants
# ---------------------------------------------------------------------------------------------------------------
POOLED_DIM = 1280  # text_encoder_2 projection; 2816 = 6 * 256 + 1280
TOKENS = 77

# name -> (lambda_global, composer, view masks, pixel masks)
TIMESTEP, INPUT_SCALE = 500, 0.5  # one mid-schedule step: the bare call and predict_views see the same inputs
VARIANTS = {
    "predict_views_plain": (1.0, "mix", False, False),
    "view_masks": (1.0, "mix", True, False),
    "pixel_masks": (1.0, "mix", False, True),
    "mix": (0.5, "mix", False, False),
    "mix_view_masks": (0.5, "mix", True, False),
    "joint_view_masks": (0.5, "joint", True, False),
}


def build_sdxl_unet(device: torch.device, dtype: torch.dtype, seed: int):
    """SDXL base's UNet architecture with seeded random weights, built directly on the device in the target dtype."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype if dtype.is_floating_point else torch.float32)
    try:
        with torch.device(device):
            unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    finally:
        torch.set_default_dtype(previous)
    return unet.to(device, dtype).eval().requires_grad_(False)


def full_context(tiles: int, latent: int, seed: int):
    """A StageContext for ``tiles`` side-by-side views of ``latent``^2, distinct regional prompts, random masks."""
    from cupscale_dist.method.step import StageContext
    from cupscale_dist.models.backbones.sdxl.backbone import SDXLStage

    g = torch.Generator().manual_seed(seed)
    dim = SDXL_UNET_CONFIG["cross_attention_dim"]
    content = np.zeros(TOKENS, dtype=bool)
    content[1:13] = True  # a 13-token prompt: <start>, 11 words, <end>; the rest is padding (always allowed)
    rng = np.random.default_rng(seed)
    token_allowed = np.ones((tiles, TOKENS), dtype=bool)
    token_allowed[:, content] = rng.random((tiles, int(content.sum()))) < 0.5
    probe = 32  # SDXL's lowest attention resolution at the 1024 px probe
    maps = np.ones((TOKENS, probe, probe), dtype=bool)
    ys, xs = np.mgrid[0:probe, 0:probe]
    for j in np.flatnonzero(content):  # one disc per content token: a plausible binarised attention map
        cy, cx, r = rng.integers(0, probe, 2).tolist() + [int(rng.integers(4, 12))]
        maps[j] = (ys - cy) ** 2 + (xs - cx) ** 2 < r * r
    return StageContext(
        negative_embeds=torch.zeros(1, TOKENS, dim), global_embeds=torch.randn(1, TOKENS, dim, generator=g),
        regional_embeds=torch.randn(tiles, TOKENS, dim, generator=g), view_prompt=np.arange(tiles),
        token_allowed=token_allowed, token_maps=maps, latent_hw=(latent, latent * tiles), vae_scale_factor=8,
        guidance_scale=7.5, lambda_global=0.5, composer="mix",
        family=SDXLStage(negative_pooled=torch.zeros(1, POOLED_DIM),
                         global_pooled=torch.randn(1, POOLED_DIM, generator=g),
                         regional_pooled=torch.randn(tiles, POOLED_DIM, generator=g), pooled_prompt="global",
                         image_hw=(latent * 8, latent * tiles * 8)))


def variant_context(base, lambda_global: float, composer: str, view_masks: bool, pixel_masks: bool):
    import dataclasses

    return dataclasses.replace(base, lambda_global=lambda_global, composer=composer,
                               token_allowed=base.token_allowed if view_masks else None,
                               token_maps=base.token_maps if pixel_masks else None)


# architecture.md, H100 bf16 SDXL UNet with CFG: bare batched tiles/s at 1 / 2 / 4 / 8 / 16 tiles per batch.
H100_BARE_TILES_PER_S = {1: 14.6, 2: 25.6, 4: 26.9, 8: 28.1, 16: 28.4}


class StubUNet:
    """Stands in for the UNet and returns zeros: isolates what predict_views costs around the UNet call.

    Like the real UNet's first cross-attention layer at each resolution, it asks the call's RegionalAttention for
    its additive bias at SDXL's two attention resolutions (latent/2, latent/4), so building the masks' biases
    (once per resolution and call) is counted too; the attention itself is not.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype

    def set_attn_processor(self, _processor) -> None:
        pass  # no attention layers: the backbone's processor install has nothing to do

    def __call__(self, sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None,
                 cross_attention_kwargs=None):
        from types import SimpleNamespace

        regional = (cross_attention_kwargs or {}).get("regional")
        if regional is not None:
            height, width = sample.shape[-2:]
            for level in (1, 2):
                h, w = height, width
                for _ in range(level):
                    h, w = -(-h // 2), -(-w // 2)
                regional.global_bias(h * w, self.dtype, self.device)
        return SimpleNamespace(sample=torch.zeros_like(sample))


def predict_views_overhead(args, device, dtype, sync) -> list[dict]:
    """predict_views around a zero-cost UNet: its host-side preparation (embeddings, CFG batch, micro-conditioning,
    masks, host<->device copies) per call, as a fraction of the H100 bare call time of the same batch."""
    from cupscale_dist.method.step import predict_views
    from cupscale_dist.models.backbones.sdxl.backbone import SDXL

    stub, rows = SDXL(StubUNet(device, dtype)), []
    for tiles in args.tiles:
        base = full_context(tiles, args.latent, args.seed)
        rects = np.array([[0, i * args.latent, args.latent, (i + 1) * args.latent] for i in range(tiles)])
        windows = torch.randn(tiles, 4, args.latent, args.latent, generator=torch.Generator().manual_seed(args.seed))
        medians = {}
        for name in ("predict_views_plain", "mix_view_masks", "pixel_masks"):
            context = variant_context(base, *VARIANTS[name])
            times = []
            for r in range(args.warmup + args.repeats):
                sync()
                t0 = time.perf_counter()
                predict_views(stub, windows, TIMESTEP, INPUT_SCALE, context, np.arange(tiles), rects)
                sync()
                if r >= args.warmup:
                    times.append(time.perf_counter() - t0)
            medians[name] = statistics.median(times)
        anchor = tiles / H100_BARE_TILES_PER_S[tiles] if tiles in H100_BARE_TILES_PER_S else None
        rows.append({"tiles_per_batch": tiles, "latent": args.latent, "median_seconds": medians,
                     "h100_bare_call_seconds_modelled": anchor,
                     "fraction_of_h100_bare_call": {k: v / anchor for k, v in medians.items()} if anchor else None})
    return rows


def side_by_side_inputs(tiles: int, latent: int, seed: int, device: torch.device, dtype: torch.dtype):
    """What the bare call and ``predict_views`` are compared on: the stage context, ``tiles`` side-by-side view rects,
    their windows, and the bare reference's UNet inputs (a CFG batch [negative; global], prepared on the device)."""
    from cupscale_dist.models.backbones.sdxl.backbone import micro_conditioning

    base = full_context(tiles, latent, seed)
    rects = np.array([[0, i * latent, latent, (i + 1) * latent] for i in range(tiles)])
    windows = torch.randn(tiles, 4, latent, latent, generator=torch.Generator().manual_seed(seed))
    time_ids = micro_conditioning(base, rects)
    bare_inputs = dict(
        sample=torch.cat([windows * INPUT_SCALE] * 2).to(device, dtype),
        timestep=TIMESTEP,
        encoder_hidden_states=torch.cat([base.negative_embeds.expand(tiles, -1, -1),
                                         base.global_embeds.expand(tiles, -1, -1)]).to(device, dtype),
        added_cond_kwargs={"text_embeds": torch.cat([base.family.negative_pooled.expand(tiles, -1),
                                                     base.family.global_pooled.expand(tiles, -1)]).to(device, dtype),
                           "time_ids": torch.cat([time_ids, time_ids]).to(device, dtype)},
    )
    return base, rects, windows, bare_inputs


def profile_call(call, install, device: torch.device, top: int = 12) -> dict:
    """torch.profiler over two calls of one variant: where its time goes, host and device, to find what a gap
    between two variants is made of (the first GPU run left a fixed ~21 ms per call unexplained)."""
    from torch.profiler import ProfilerActivity, profile

    install()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(2):
            call()
    wall = (time.perf_counter() - start) / 2
    events = prof.key_averages()
    device_time = lambda e: getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))  # noqa: E731

    def rows(key):
        ranked = sorted(events, key=key, reverse=True)[:top]
        return [{"op": e.key[:80], "calls": e.count // 2, "self_cpu_ms": e.self_cpu_time_total / 2e3,
                 "self_device_ms": device_time(e) / 2e3} for e in ranked]

    syncs = {e.key: e.count // 2 for e in events if "synchronize" in e.key.lower() or "memcpy" in e.key.lower()}
    return {"wall_ms_per_call": wall * 1e3, "self_cpu_ms_per_call": sum(e.self_cpu_time_total for e in events) / 2e3,
            "self_device_ms_per_call": sum(device_time(e) for e in events) / 2e3, "sync_and_copy_calls": syncs,
            "top_by_device": rows(device_time), "top_by_cpu": rows(lambda e: e.self_cpu_time_total)}


def variant_calls(unet, backbone, sync, bare_inputs, windows, contexts, view_ids, rects):
    """One tile count's timed calls: the bare batched UNet call and predict_views per variant (name -> call), and
    install(name), which puts that call's attention processors on the UNet."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from cupscale_dist.method.attention import install_regional_processors
    from cupscale_dist.method.step import predict_views

    timestep, input_scale = TIMESTEP, INPUT_SCALE

    def bare():
        with torch.no_grad():
            out = unet(**bare_inputs).sample
        sync()
        return out

    def ours(name):
        def call():
            out = predict_views(backbone, windows, timestep, input_scale, contexts[name], view_ids, rects)
            sync()
            return out
        return call

    calls = {"bare": bare, **{name: ours(name) for name in VARIANTS}}
    plain = AttnProcessor2_0()

    def install(name):
        if name == "bare":
            unet.set_attn_processor(plain)
        else:
            install_regional_processors(unet)

    return calls, install


def full_size(args) -> dict:
    from cupscale_dist.models.backbones.sdxl.backbone import SDXL

    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    overhead = predict_views_overhead(args, device, dtype, sync)
    log("predict_views around a zero-cost UNet: " + json.dumps(rounded(overhead, 3)))
    common = {
        "mode": "full-size", "device": str(device), "dtype": args.dtype,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "predict_views_overhead": overhead,
        "predict_views_overhead_note": "predict_views with a UNet stand-in that returns zeros but builds the masks' "
            "additive biases at both attention resolutions as the real processors do (no UNet or attention work): "
            "the pipeline's own per-call cost, vs the H100 bare call time of architecture.md (modelled)",
    }
    if args.stub_only:
        return common
    start = time.perf_counter()
    unet = build_sdxl_unet(device, dtype, args.seed)
    backbone = SDXL(unet)  # the contract predict_views calls; installs the regional processors
    build_s = time.perf_counter() - start
    params = sum(p.numel() for p in unet.parameters())
    log(f"SDXL-architecture UNet: {params / 1e9:.3f} B params on {device} as {dtype}, built in {build_s:.1f} s")

    results = []
    for tiles in args.tiles:
        latent = args.latent
        # The bare reference: inputs prepared on the device once, one plain batched call per repeat.
        base, rects, windows, bare_inputs = side_by_side_inputs(tiles, latent, args.seed, device, dtype)
        contexts = {name: variant_context(base, *spec) for name, spec in VARIANTS.items()}
        calls, install = variant_calls(unet, backbone, sync, bare_inputs, windows, contexts, np.arange(tiles), rects)
        finite = {}
        for name, call in calls.items():  # warm-up (kernels, autotuning, allocator) per variant
            install(name)
            for _ in range(args.warmup):
                out = call()
            finite[name] = bool(torch.isfinite(out).all())
        times = defaultdict(list)
        for r in range(args.repeats):  # round-robin so drift (clocks, other load) hits every variant alike
            order = list(calls) if r % 2 == 0 else list(reversed(calls))
            for name in order:
                install(name)
                sync()
                t0 = time.perf_counter()
                calls[name]()
                times[name].append(time.perf_counter() - t0)
            log(f"tiles={tiles} repeat {r + 1}/{args.repeats}: " +
                ", ".join(f"{n} {times[n][-1] * 1e3:.1f} ms" for n in calls))
        profiles = {name: profile_call(calls[name], partial(install, name), device)
                    for name in ("bare", "predict_views_plain")} if getattr(args, "profile", False) else None
        install("ours")
        median = {name: statistics.median(v) for name, v in times.items()}
        spread = {name: (max(v) - min(v)) / statistics.median(v) for name, v in times.items()}
        bare_s = median["bare"]
        results.append({
            "tiles_per_batch": tiles, "cfg_batch": 2 * tiles, "latent": latent,
            "median_seconds": median,
            "relative_spread": spread,
            "tiles_per_s": {name: tiles / s for name, s in median.items()},
            "predict_views_rate_vs_bare": bare_s / median["predict_views_plain"],
            "overhead_vs_bare": {name: median[name] / bare_s - 1 for name in VARIANTS},
            "overhead_vs_predict_views_plain": {name: median[name] / median["predict_views_plain"] - 1
                                                for name in VARIANTS if name != "predict_views_plain"},
            "outputs_finite": finite,
            **({"profile": profiles} if profiles else {}),
        })

    on_gpu = device.type == "cuda"
    targets = {"predict_views_rate_vs_bare": ">= 0.98", "view_masks / pixel_masks overhead_vs_bare": "<= 0.02",
               "mix / mix_view_masks overhead_vs_bare": "<= 0.04"}
    checks = []
    for row in results:
        o = row["overhead_vs_bare"]
        checks.append({"tiles_per_batch": row["tiles_per_batch"],
                       "predict_views_rate_vs_bare": row["predict_views_rate_vs_bare"] >= 0.98,
                       "view_masks": o["view_masks"] <= 0.02, "pixel_masks": o["pixel_masks"] <= 0.02,
                       "mix": o["mix"] <= 0.04, "mix_view_masks": o["mix_view_masks"] <= 0.04})
    return {
        **common,
        "what": "SDXL-architecture UNet (SDXL base config, random weights): bare batched UNet call with plain "
                "AttnProcessor2_0 vs the pipeline's predict_views, plain and with attention control; round-robin, "
                "median of repeats after warm-up",
        "params": params, "build_seconds": build_s,
        "repeats": args.repeats, "warmup": args.warmup,
        "variants": {name: {"lambda_global": s[0], "composer": s[1], "view_masks": s[2], "pixel_masks": s[3]}
                     for name, s in VARIANTS.items()},
        "results": results,
        "targets": targets,
        "meets_targets": checks if on_gpu else None,
        "cpu_only_note": None if on_gpu else
            "CPU smoke-test figures at a tiny latent: NOT comparable to the GPU targets (H100, bf16, latent 128)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-size", action="store_true", help="SDXL-architecture UNet comparison (GPU run)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (pinned, reported)")
    parser.add_argument("--seed", type=int, default=0)
    demo = parser.add_argument_group("demo mode")
    demo.add_argument("--runs", type=int, default=3, help="timed pipeline runs (after one warm-up run)")
    demo.add_argument("--input-size", type=int, default=256, help="square input side in px (x2 by the cpu-demo preset)")
    demo.add_argument("--steps", type=int, default=None, help="override the preset's scheduler steps")
    demo.add_argument("--unet-channels", default="32,64", help="tiny UNet block_out_channels (32,64 = the demo model)")
    full = parser.add_argument_group("--full-size")
    full.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    full.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                      help="default: bfloat16 on cuda, float32 on cpu")
    full.add_argument("--tiles", default="4", help="views per UNet call (CFG doubles it); comma list, e.g. 4,8")
    full.add_argument("--latent", type=int, default=128, help="view side in latent px (128 = a 1024 px SDXL tile)")
    full.add_argument("--repeats", type=int, default=10)
    full.add_argument("--warmup", type=int, default=3)
    full.add_argument("--profile", action="store_true", help="add a torch.profiler summary of the bare call and "
                      "predict_views plain (host vs device time, top ops, synchronising copies) to each row")
    full.add_argument("--stub-only", action="store_true",
                      help="only predict_views' own cost around a zero-cost UNet (no 2.6 B-param model is built)")
    args = parser.parse_args()
    args.unet_channels = tuple(int(c) for c in args.unet_channels.split(","))
    args.tiles = [int(t) for t in str(args.tiles).split(",")]
    if args.dtype is None:
        args.dtype = "bfloat16" if str(args.device).startswith("cuda") else "float32"

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    load_before = load_average()
    start = time.perf_counter()
    body = full_size(args) if args.full_size else demo_breakdown(args)
    import diffusers

    out = {
        "bench": "step_cost",
        "command": " ".join(["python", "bench/step_cost.py", *sys.argv[1:]]),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "load_average_before": load_before, "load_average_after": load_average(),
        "bench_seconds": time.perf_counter() - start,
        **body,
    }
    print(json.dumps(rounded(out), indent=1))


if __name__ == "__main__":
    main()
