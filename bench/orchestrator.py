"""The Ray driver's cost: overhead of one actor, scaling to two, the host side at 8K / 16K, and the driver's VAE
work: prints one JSON object.

    python bench/orchestrator.py [--threads 1] [--repeats 5] [--tile 32 --batch 1 --latent 96] [--skip-actors]
                                 [--host-sizes 1024,2048] [--host-batch 4] [--host-repeats 3] [--skip-host]
                                 [--vae-latent 1024] [--vae-repeats 3] [--skip-vae]

(a) overhead and (b) scaling, side by side in one local Ray cluster, round-robin per repeat, after a warm-up step:
one denoising step's worth of views (``predict_step`` consumed by ``reduce_predictions``, as ``reduce_and_step``
does) through the in-process ``LocalExecutor`` (the reference), through ``RayExecutor`` over a ``WorkerPool`` of 1
real ``PipelineWorker`` actor, and of 2. The tiny SDXL-architecture UNet's size (``--unet-channels``, ``--tile``,
``--batch``) is picked so one view batch costs near 50 ms on one thread; the measured cost is reported. Every
actor and the reference pin ``--threads`` torch threads (1), so their predictions must agree bit for bit (checked).
Targets: 1 actor >= 0.90 of the reference rate; 2 actors >= 1.7x one (only meaningful on 2 otherwise idle cores:
the host load is reported).

(c) host side at 8K and 16K (1024^2 and 2048^2 latent, tile 128, stride 64: 225 / 961 views per step), with
instant stand-in actors, so only the driver's own work is timed:
  * in process, part by part: ``predict_step``'s window cut and its result copies, ``reduce_predictions``,
    ``inject_global_prior`` (Haar, prior active), the Euler ``scheduler.step``, and the real ``reduce_and_step``;
  * end to end through Ray: ``predict_step`` on a ``RayExecutor`` over 2 ``InstantWorker`` actors (a
    ``PipelineWorker`` whose "predict" returns ``0.5 * windows``), reduced and stepped with ``reduce_and_step`` --
    serialisation, object store, copies.
Bytes moved per step (windows out + predictions back, float32) and each time as a fraction of the modelled GPU
step time of architecture.md (one H100 ~ 28 tiles/s bare => views / 28 s). Target: host side <= 3 %.

(d) the driver's VAE work in Ray mode for one 8K stage (1024^2 latent, vae_tile 1024 px, overlap 0.25: 121 tiles):
``vae.encode_image`` (cut uint8 pixel tiles, blend their latents) and ``vae.decode_bands`` (cut latent tiles,
blend the decoded pixel tiles, finish uint8 bands), with instant VAE stand-ins returning tiles of the right shapes,
so only the driver's work and the transfers are timed. Side by side, round-robin: ``in_process`` (a
``LocalExecutor`` over the stand-in) and ``ray`` (a ``RayExecutor`` over ``InstantWorker`` actors); wall seconds
and the driver process's CPU seconds, as fractions of the modelled GPU VAE time of the stage (architecture.md:
SDXL VAE 1024^2 tile decode 90 ms, encode 50 ms on one H100). Tiles are blended as they arrive, so this overlaps
with the GPUs while the driver keeps up: ``h100s_one_driver_can_feed`` says for how many.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing (Ray workers get it via PYTHONPATH below)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from actors.worker import PipelineWorker  # noqa: E402
from common import load_average, log, rounded  # noqa: E402  (bench/common.py)

H100_TILES_PER_S = 28.0  # architecture.md: bare batched SDXL UNet + CFG, 8-16 tiles per batch, one H100, bf16
H100_VAE_DECODE_S, H100_VAE_ENCODE_S = 0.090, 0.050  # architecture.md: SDXL VAE, one 1024^2 tile, one H100
HOST_TILE, HOST_STRIDE = 128, 64
SDXL_VAE_FACTOR, SDXL_LATENT_CHANNELS = 8, 4


def cpu_times() -> tuple[int, int]:
    """(total, idle) jiffies of the host (Linux /proc/stat): how busy the cores were during a measurement."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0, 0
    return sum(fields), fields[3] + fields[4]


def busy_cores(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    total, idle = after[0] - before[0], after[1] - before[1]
    return (os.cpu_count() or 1) * (1 - idle / total) if total > 0 else None


# ---------------------------------------------------------------------------------------------------------------
# Instant stand-ins for every forward pass: what is left is the driver's own work
# ---------------------------------------------------------------------------------------------------------------
class InstantModel:
    """ModelWorker's calling contract with instant stand-ins: "predict" returns ``0.5 * windows``; the VAE calls
    return tiles of the right shapes (SDXL: factor 8, 4 channels), made once per shape, values irrelevant."""

    device = "cpu (instant stand-in)"

    def __init__(self, spec=None):
        self.spec = spec  # LocalExecutor.spec; unused by the calls
        self.tiles: dict[tuple, np.ndarray] = {}  # one output per shape: the stand-in costs ~nothing

    def _tile(self, shape: tuple, value: float) -> np.ndarray:
        if shape not in self.tiles:
            self.tiles[shape] = np.full(shape, value, dtype=np.float32)
        return self.tiles[shape]

    def predict(self, context, windows: np.ndarray, timestep: float, input_scale: float, view_ids: np.ndarray,
                rects: np.ndarray) -> np.ndarray:
        return np.asarray(windows, dtype=np.float32) * np.float32(0.5)

    def encode_tile(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3) -> latent (C, H/8, W/8) float32."""
        height, width = pixels.shape[:2]
        return self._tile((SDXL_LATENT_CHANNELS, height // SDXL_VAE_FACTOR, width // SDXL_VAE_FACTOR), 0.1)

    def decode_tile(self, latents: np.ndarray) -> np.ndarray:
        """latent (C, h, w) -> pixels (3, 8h, 8w) float32 in [-1, 1]."""
        height, width = latents.shape[-2:]
        return self._tile((3, height * SDXL_VAE_FACTOR, width * SDXL_VAE_FACTOR), 0.25)


class InstantWorker(PipelineWorker):
    """The real actor shell (``call``, ``where``, ``usage``, the per-stage ``Shared`` fetch) around InstantModel:
    loads no model."""

    def __init__(self, load, index: int):
        self.index = index
        self.worker = InstantModel()
        self.shared = (None, None)


def instant_executor(args, count: int, batch_size: int):
    """A RayExecutor over a real WorkerPool (placement, in-flight caps, ordered fan-out) of ``count`` InstantWorkers."""
    from cupscale_dist import UpscaleConfig
    from cupscale_dist.execution.pool import RayExecutor, WorkerPool
    from cupscale_dist.execution.raycluster import ClusterOptions
    from cupscale_dist.models.spec import ModelSpec

    spec = ModelSpec.load("demo")  # configs and tokenizer only: the pool needs a model name; no weights are loaded
    config = UpscaleConfig.load("cpu-demo", view_batch_size=batch_size, torch_threads=args.threads)
    options = ClusterOptions(actors=count, gpus_per_actor=0, cpus_per_actor=0.5, start_timeout_s=120)
    return RayExecutor(WorkerPool(config, options, spec, actor_class=InstantWorker), spec, batch_size)


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    times = []
    for r in range(warmup + repeats):
        t0 = time.perf_counter()
        fn()
        if r >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------------------------
# (a) + (b): real PipelineWorker actors vs the in-process reference
# ---------------------------------------------------------------------------------------------------------------
def stage_context(executor, views: np.ndarray, latent_hw, config, seed: int):
    """A StageContext as run_stage builds it: real prompt encodings, distinct regional prompts, view token masks."""
    from cupscale_dist.method.masks import content_token_mask
    from cupscale_dist.method.step import StageContext
    from cupscale_dist.models.backbones import backbone_class
    from cupscale_dist.pipeline import encode_negative, encode_prompts

    spec = executor.spec
    prompts = [f"a photo of a cat, detail {i}" for i in range(len(views))]
    regional_embeds, regional_pooled = encode_prompts(executor, prompts)
    global_embeds, global_pooled = encode_prompts(executor, [config.prompt])
    negative_embeds, negative_pooled = encode_negative(executor, config.negative_prompt)
    content = content_token_mask(spec.token_count(config.prompt), global_embeds.shape[1])
    rng = np.random.default_rng(seed)
    token_allowed = np.ones((len(views), global_embeds.shape[1]), dtype=bool)
    token_allowed[:, content] = rng.random((len(views), int(content.sum()))) < 0.5
    f = spec.vae_scale_factor
    family = backbone_class(spec.family)
    fields = family.stage_fields(config, (latent_hw[0] * f, latent_hw[1] * f),
                                 (negative_pooled, global_pooled, regional_pooled))
    return StageContext(negative_embeds, global_embeds, regional_embeds, np.arange(len(views)), token_allowed, None,
                        tuple(latent_hw), f, family.cfg_scale(config), config.lambda_global, config.composer,
                        family=fields)


def actors_bench(args) -> dict:
    tmp = tempfile.mkdtemp(prefix="cupscale-bench-")
    try:
        return _actors_bench(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _actors_bench(args, tmp: str) -> dict:
    from cupscale_dist import UpscaleConfig
    from cupscale_dist.execution.executor import LocalExecutor
    from cupscale_dist.execution.pool import RayExecutor, WorkerPool
    from cupscale_dist.execution.raycluster import ClusterOptions
    from cupscale_dist.execution.worker import ModelWorker
    from cupscale_dist.method.step import reduce_predictions
    from cupscale_dist.method.views import make_views
    from cupscale_dist.pipeline import predict_step
    from cupscale_dist.testing.tiny import build_tiny_sdxl

    log(f"building the tiny SDXL (unet_channels={args.unet_channels}) ...")
    model_dir = str(build_tiny_sdxl(Path(tmp) / "model", seed=0, unet_channels=args.unet_channels))
    config = UpscaleConfig(model=model_dir, device="cpu", dtype="float32", torch_threads=args.threads,
                           tile=args.tile, stride=args.tile // 2, view_batch_size=args.batch,
                           prompt="a photo of a cat on a house")
    worker = ModelWorker(model_dir, device="cpu", dtype="float32")
    local = LocalExecutor(worker, args.batch)
    latent_hw = (args.latent, args.latent)
    views = make_views(*latent_hw, config.tile, config.stride)
    context = stage_context(local, views, latent_hw, config, args.seed)
    latents = torch.randn(1, 4, *latent_hw, generator=torch.Generator().manual_seed(args.seed))
    timestep, input_scale = 500.0, 0.5

    # Calibration: one view batch through ModelWorker.predict in process (what one actor call computes).
    rects = views[: args.batch]
    windows = np.stack([latents[0, :, t:b, l:r].numpy() for t, l, b, r in rects])
    batch_times = []
    for r in range(3 + 5):
        t0 = time.perf_counter()
        worker.predict(context, windows, timestep, input_scale, np.arange(args.batch), rects)
        if r >= 3:
            batch_times.append(time.perf_counter() - t0)
    batch_s = statistics.median(batch_times)
    log(f"one batch of {args.batch} view(s) at {args.tile}^2 latent: {batch_s * 1e3:.1f} ms; "
        f"{len(views)} views per step")

    log("starting 1 + 2 PipelineWorker actors ...")
    options = dict(gpus_per_actor=0, cpus_per_actor=1.0, start_timeout_s=300)
    pool = lambda actors: WorkerPool(config, ClusterOptions(actors=actors, **options), worker.spec)  # noqa: E731
    executors = {"local": local,
                 "ray_1_actor": RayExecutor(pool(1), worker.spec, args.batch),
                 "ray_2_actors": RayExecutor(pool(2), worker.spec, args.batch)}
    shared = {name: executor.share(context) for name, executor in executors.items()}  # once per stage

    def one_step(name: str) -> torch.Tensor:
        batches = predict_step(executors[name], shared[name], latents, views, timestep, input_scale)
        return reduce_predictions(batches, views, latents.shape)

    results = {name: one_step(name) for name in executors}  # warm-up: actors fetch the context, JIT paths
    identical = {name: bool(torch.equal(results[name], results["local"])) for name in results}
    max_diff = {name: float((results[name] - results["local"]).abs().max()) for name in results}
    times: dict[str, list[float]] = {name: [] for name in executors}
    busy: dict[str, list[float]] = {name: [] for name in executors}
    for r in range(args.repeats):  # round-robin, alternating order, so drift in the host load hits all alike
        order = list(executors) if r % 2 == 0 else list(reversed(executors))
        for name in order:
            c0, t0 = cpu_times(), time.perf_counter()
            one_step(name)
            times[name].append(time.perf_counter() - t0)
            cores = busy_cores(c0, cpu_times())
            if cores is not None:
                busy[name].append(cores)
        log(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in executors))
    for executor in executors.values():
        executor.close()

    median = {name: statistics.median(v) for name, v in times.items()}
    rate = {name: len(views) / s for name, s in median.items()}
    one_vs_local = rate["ray_1_actor"] / rate["local"]
    two_vs_one = rate["ray_2_actors"] / rate["ray_1_actor"]
    return {
        "model": f"tiny SDXL-architecture, random weights, unet_channels={list(args.unet_channels)}",
        "executors": {"local": "LocalExecutor(ModelWorker)",
                      "ray_1_actor": "RayExecutor(WorkerPool of 1 PipelineWorker)",
                      "ray_2_actors": "RayExecutor(WorkerPool of 2 PipelineWorkers)"},
        "tile": args.tile, "stride": args.tile // 2, "latent_hw": list(latent_hw), "views_per_step": len(views),
        "view_batch_size": args.batch, "batches_per_step": -(-len(views) // args.batch),
        "composer": config.composer, "mask_mode": "view",
        "batch_seconds_in_process": batch_s,
        "cpus_per_actor": 1.0, "threads_per_actor": args.threads, "reference_threads": args.threads,
        "repeats": args.repeats, "warmup_steps": 1,
        "step_seconds_median": median,
        "step_seconds_all": times,
        "views_per_s": rate,
        "busy_cores_median": {k: statistics.median(v) if v else None for k, v in busy.items()},
        "ray_1_actor_vs_local": one_vs_local,
        "ray_2_actors_vs_1": two_vs_one,
        "ray_2_actors_vs_local": rate["ray_2_actors"] / rate["local"],
        "bit_identical_to_local": identical,
        "max_abs_diff_to_local": max_diff,
        "targets": {"ray_1_actor_vs_local": ">= 0.90", "ray_2_actors_vs_1": ">= 1.7 (2 idle cores)"},
        "meets_targets": {"ray_1_actor_vs_local": one_vs_local >= 0.90, "ray_2_actors_vs_1": two_vs_one >= 1.7},
    }


# ---------------------------------------------------------------------------------------------------------------
# (c) host side at 8K / 16K with instant actors
# ---------------------------------------------------------------------------------------------------------------
class ReplayExecutor:
    """An in-process executor answering "predict" from results made beforehand, to time predict_step's own parts:
    ``cut=True`` pulls every call (the windows are cut) and answers a tiny array (its copy costs nothing);
    ``cut=False`` never pulls a call (nothing is cut) and answers the real-sized predictions (their copies)."""

    def __init__(self, batch_size: int, results: list[np.ndarray], cut: bool):
        self.batch_size, self.results, self.cut = batch_size, results, cut
        self.tiny = np.zeros(1, dtype=np.float32)

    def map(self, method: str, calls):
        if self.cut:
            for _args in calls:
                yield self.tiny
        else:
            yield from self.results


def euler_schedule(latents: torch.Tensor, seed: int):
    """The driver's StageSchedule as run_stage builds it (Euler, SDXL's scheduler config, 30 steps, strength 0.6)."""
    from diffusers import EulerDiscreteScheduler

    from cupscale_dist.method.prior import GlobalPrior
    from cupscale_dist.method.step import StageSchedule
    from cupscale_dist.testing.tiny import SCHEDULER_CONFIG

    scheduler = EulerDiscreteScheduler(**SCHEDULER_CONFIG)
    scheduler.set_timesteps(30, device="cpu")
    start = 30 - 18
    z_low = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed + 1))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed + 2))
    prior = GlobalPrior.from_latent(z_low, noise, "haar", 1)
    return StageSchedule(scheduler, start, prior, "x0", 0.5, "cosine"), start


def host_side(args, side: int) -> dict:
    """One latent size: the driver's work per step, part by part in process, then end to end through Ray."""
    from cupscale_dist.method.prior import inject_global_prior, noise_level, prior_weight
    from cupscale_dist.method.step import reduce_and_step, reduce_predictions
    from cupscale_dist.method.views import make_views, view_batches
    from cupscale_dist.pipeline import predict_step

    channels = 4
    latents = torch.randn(1, channels, side, side, generator=torch.Generator().manual_seed(args.seed))
    views = make_views(side, side, HOST_TILE, HOST_STRIDE)
    batches = view_batches(len(views), args.host_batch)
    n = len(views)
    log(f"host side {side}^2 latent: {n} views, {len(batches)} batches of {args.host_batch}")
    # Random per-view predictions, made once (what actors would return), as the batches the reducer consumes.
    g = torch.Generator().manual_seed(args.seed + 3)
    predictions = [torch.randn(len(b), channels, HOST_TILE, HOST_TILE, generator=g) for b in batches]
    schedule, start = euler_schedule(latents, args.seed)
    step = 0  # first step: the prior is active with weight 1 (its most expensive case)
    weight = prior_weight(step, schedule.num_steps, schedule.prior_fraction, schedule.prior_schedule)
    alpha, sigma = noise_level(schedule.scheduler, start + step)
    timestep, input_scale = schedule.timestep(step), schedule.input_scale(step)

    cutter = ReplayExecutor(args.host_batch, [], cut=True)
    copier = ReplayExecutor(args.host_batch, [p.numpy() for p in predictions], cut=False)

    def predict_step_parts(executor):  # the real predict_step, every batch of the step
        for _ in predict_step(executor, None, latents, views, timestep, input_scale):
            pass

    eps = reduce_predictions(zip(batches, predictions), views, latents.shape)

    def restart_scheduler():  # Euler counts its steps: start from the same index every repeat
        schedule.scheduler._step_index = None
        schedule.scheduler.set_begin_index(start + step)
        schedule.input_scale(step)  # the pipeline scales the model input before stepping (diffusers checks)

    def scheduler_step():
        restart_scheduler()
        schedule.scheduler.step(eps, timestep, latents)

    def full_reduce_and_step():
        restart_scheduler()
        reduce_and_step(latents, zip(batches, predictions), views, schedule, step)

    reps = args.host_repeats
    parts = {
        "cut_windows": median_time(lambda: predict_step_parts(cutter), reps),
        "result_copies": median_time(lambda: predict_step_parts(copier), reps),
        "reduce": median_time(lambda: reduce_predictions(zip(batches, predictions), views, latents.shape), reps),
        "prior": median_time(lambda: inject_global_prior(eps, latents, schedule.prior, weight, alpha, sigma), reps),
        "scheduler_step": median_time(scheduler_step, reps),
    }
    reduce_and_step_s = median_time(full_reduce_and_step, reps)

    # End to end through Ray: predict_step on a RayExecutor over instant actors, reduced + stepped by reduce_and_step.
    executor = instant_executor(args, args.synthetic_actors, args.host_batch)
    shared = executor.share({"instant": True})  # a stage context's place; the stand-in ignores it

    def ray_step():
        restart_scheduler()
        batches_iter = predict_step(executor, shared, latents, views, timestep, input_scale)
        reduce_and_step(latents, batches_iter, views, schedule, step)

    c0 = cpu_times()
    ray_s = median_time(ray_step, reps)
    ray_busy = busy_cores(c0, cpu_times())
    executor.close()

    window_bytes = int(sum((b - t) * (r - l) for t, l, b, r in views)) * channels * 4
    modelled = n / H100_TILES_PER_S
    host_total = sum(parts.values())
    serial = parts["prior"] + parts["scheduler_step"]
    return {
        "latent_hw": [side, side], "image_px": side * 8, "views_per_step": n, "view_batch_size": args.host_batch,
        "bytes_per_step": {"windows_out": window_bytes, "predictions_back": window_bytes, "total": 2 * window_bytes,
                           "total_MiB": 2 * window_bytes / 2**20, "latent_MiB": latents.numel() * 4 / 2**20},
        "in_process_seconds": parts,
        "reduce_and_step_seconds": reduce_and_step_s,
        "host_total_seconds": host_total,
        "ray_step_seconds_synthetic": ray_s,
        "ray_step_busy_cores": ray_busy,
        "synthetic_actors": args.synthetic_actors,
        "modelled_gpu_step_seconds_1xH100": modelled,
        "fraction_of_modelled_step": {
            "reduce_plus_prior": (parts["reduce"] + parts["prior"]) / modelled,
            "host_total_in_process": host_total / modelled,
            "serial_tail_prior_plus_scheduler_step": serial / modelled,
            "ray_step_synthetic": ray_s / modelled,
        },
        "h100s_at_which_serial_tail_is_3pct": 0.03 * modelled / serial,
        "serial_tail_note": "prior + scheduler step run after the last prediction and before the next step's first "
                            "window, so GPUs idle meanwhile; with N GPUs the step is N times shorter and this "
                            "fraction N times larger. The rest (cut, copies, reduce) overlaps with GPU work as long "
                            "as the driver keeps up (driver_tiles_per_s).",
        "ray_step_note": "the real predict_step on a RayExecutor (WorkerPool of InstantWorker actors) + "
                         "reduce_and_step, the actors on the same host cores as the driver: an upper bound of the "
                         "driver's per-step cost, i.e. the rate it can feed",
        "driver_tiles_per_s": {"in_process_parts": n / host_total, "ray_synthetic": n / ray_s},
        "h100s_one_driver_can_feed": {"in_process_parts": n / host_total / H100_TILES_PER_S,
                                      "ray_synthetic": n / ray_s / H100_TILES_PER_S},
    }


# ---------------------------------------------------------------------------------------------------------------
# (d) the driver's VAE work per stage (cut tiles, blend the encode, blend the decode into uint8 bands)
# ---------------------------------------------------------------------------------------------------------------
def vae_driver(args) -> dict:
    from PIL import Image

    from cupscale_dist import UpscaleConfig
    from cupscale_dist.execution.executor import LocalExecutor
    from cupscale_dist.method.vae import decode_bands, encode_image, latent_tiles
    from cupscale_dist.method.views import make_views

    side, f, channels = args.vae_latent, SDXL_VAE_FACTOR, SDXL_LATENT_CHANNELS
    tile, stride = latent_tiles(args.vae_tile, args.vae_overlap, f)
    tiles = len(make_views(side, side, tile, stride))
    pixels = side * f
    log(f"VAE driver work: {pixels}^2 px stage ({side}^2 latent), {tiles} tiles of {args.vae_tile} px ...")
    rng = np.random.default_rng(args.seed)
    image = Image.fromarray(rng.integers(0, 256, (pixels, pixels, 3), dtype=np.uint8))  # the stage input
    latents = torch.randn(1, channels, side, side, generator=torch.Generator().manual_seed(args.seed))
    executors = {"in_process": LocalExecutor(InstantModel(), 1),
                 "ray": instant_executor(args, args.synthetic_actors, 1)}

    def encode(executor):
        z = encode_image(executor.map, image, f, channels, args.vae_tile, args.vae_overlap)
        assert tuple(z.shape) == (1, channels, side, side), z.shape

    def decode(executor):  # consumed band by band, as the streaming writer does (writing itself not timed)
        rows = sum(band.shape[0] for band in decode_bands(executor.map, latents, f, args.vae_tile, args.vae_overlap))
        assert rows == pixels, rows

    phases = {"encode": encode, "decode": decode}
    wall = {name: {p: [] for p in phases} for name in executors}
    cpu = {name: {p: [] for p in phases} for name in executors}
    for r in range(1 + args.vae_repeats):  # the first round warms up (actors, allocator); round-robin after
        order = list(executors) if r % 2 == 0 else list(reversed(executors))
        for name in order:
            for phase, run in phases.items():
                c0, t0 = time.process_time(), time.perf_counter()
                run(executors[name])
                if r > 0:
                    wall[name][phase].append(time.perf_counter() - t0)
                    cpu[name][phase].append(time.process_time() - c0)
        if r > 0:
            log(f"VAE repeat {r}/{args.vae_repeats}: " + ", ".join(
                f"{n} {p} {wall[n][p][-1]:.2f} s" for n in executors for p in phases))
    executors["ray"].close()

    wall_s, cpu_s = ({n: {p: statistics.median(v) for p, v in ps.items()} for n, ps in t.items()} for t in (wall, cpu))
    driver_s = {n: sum(cpu_s[n].values()) for n in executors}  # the driver process's CPU, encode + decode
    modelled = {"encode": tiles * H100_VAE_ENCODE_S, "decode": tiles * H100_VAE_DECODE_S}
    modelled_total = modelled["encode"] + modelled["decode"]
    # The whole stage on one H100 with the sdxl-8k preset's views and steps: the denoising steps plus the VAE.
    preset = UpscaleConfig.load("sdxl-8k")
    steps = int(round(preset.strength * preset.steps))
    stage_s = steps * len(make_views(side, side, preset.tile, preset.stride)) / H100_TILES_PER_S + modelled_total
    return {
        "what": "driver work of one stage's tiled VAE (vae.encode_image + vae.decode_bands) with instant VAE "
                "stand-ins: cut tiles, blend latents, blend pixel tiles into uint8 bands (+ Ray transfers for 'ray')",
        "stage_px": [pixels, pixels], "latent_hw": [side, side], "vae_tile_px": args.vae_tile,
        "vae_overlap": args.vae_overlap, "vae_tiles": tiles, "tile_latent": tile, "tile_stride_latent": stride,
        "bytes_per_stage": {"encode_pixels_out_MiB": tiles * (tile * f) ** 2 * 3 / 2**20,
                            "decode_pixels_back_MiB": tiles * (tile * f) ** 2 * 3 * 4 / 2**20},
        "repeats": args.vae_repeats, "warmup": 1, "synthetic_actors": args.synthetic_actors,
        "wall_seconds": wall_s,
        "driver_cpu_seconds": cpu_s,
        "driver_cpu_seconds_per_stage": driver_s,
        "modelled_gpu_vae_seconds_1xH100": {**modelled, "total": modelled_total},
        "fraction_of_modelled_gpu_vae": {n: driver_s[n] / modelled_total for n in executors},
        "fraction_of_modelled_gpu_vae_wall": {n: sum(wall_s[n].values()) / modelled_total for n in executors},
        "h100s_one_driver_can_feed": {n: modelled_total / driver_s[n] for n in executors},
        "modelled_stage_seconds_1xH100": stage_s,
        "modelled_stage_note": f"sdxl-8k preset: {steps} steps x views / {H100_TILES_PER_S:g} tiles/s + the VAE",
        "fraction_of_modelled_stage": {n: driver_s[n] / stage_s for n in executors},
        "note": "driver_cpu = time.process_time of the driver process (its Ray threads included), so the instant "
                "actors' own CPU on the shared cores is not counted; wall includes it. Tiles are cut lazily and "
                "blended in tile order as they arrive, so this work overlaps with the GPUs' VAE passes as long as "
                "the driver keeps up: with N GPUs the VAE phase is N times shorter, and the driver falls behind "
                "beyond h100s_one_driver_can_feed.",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads: driver, reference and every actor")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--synthetic-actors", type=int, default=2, help="instant actors for (c) and (d)")
    a = parser.add_argument_group("(a) overhead and (b) scaling")
    a.add_argument("--skip-actors", action="store_true")
    a.add_argument("--unet-channels", default="32,64", help="tiny UNet block_out_channels")
    a.add_argument("--tile", type=int, default=32, help="view side in latent px (stride = tile / 2)")
    a.add_argument("--batch", type=int, default=1, help="views per actor task (view_batch_size)")
    a.add_argument("--latent", type=int, default=96, help="square latent side of the stage")
    a.add_argument("--repeats", type=int, default=5)
    c = parser.add_argument_group("(c) host side")
    c.add_argument("--skip-host", action="store_true")
    c.add_argument("--host-sizes", default="1024,2048", help="latent sides (1024 = 8K px, 2048 = 16K px)")
    c.add_argument("--host-batch", type=int, default=4, help="views per batch (the config default)")
    c.add_argument("--host-repeats", type=int, default=3)
    d = parser.add_argument_group("(d) the driver's VAE work")
    d.add_argument("--skip-vae", action="store_true")
    d.add_argument("--vae-latent", type=int, default=1024, help="square latent side of the stage (1024 = 8K px)")
    d.add_argument("--vae-tile", type=int, default=1024, help="VAE tile in px (the config's vae_tile)")
    d.add_argument("--vae-overlap", type=float, default=0.25, help="the config's vae_tile_overlap")
    d.add_argument("--vae-repeats", type=int, default=3)
    args = parser.parse_args()
    args.unet_channels = tuple(int(v) for v in args.unet_channels.split(","))

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by Ray workers unless Ray sets its own
    import ray

    load_before = load_average()
    started = time.perf_counter()
    ray_tmp = tempfile.mkdtemp(prefix="rb-", dir="/tmp")  # short path (Unix socket limit), own session dir
    # Actors import this checkout's `actors` and `cupscale_dist`, not whichever copy is installed.
    python_path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    out: dict = {"bench": "orchestrator", "command": " ".join(["python", "bench/orchestrator.py", *sys.argv[1:]]),
                 "torch_threads": args.threads, "torch": torch.__version__, "ray": ray.__version__,
                 "python": platform.python_version(), "cpu_count": os.cpu_count(), "load_average_before": load_before}
    # 1 + 2 actors live side by side (idle ones cost nothing): 3 logical CPUs at 1 per actor.
    ray.init(num_cpus=4, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
             _temp_dir=ray_tmp, runtime_env={"env_vars": {"PYTHONPATH": python_path}})
    if not args.skip_actors:
        out["actors"] = actors_bench(args)
    if not args.skip_host:
        sizes = [int(s) for s in args.host_sizes.split(",")]
        out["host_side"] = {
            "what": "driver work per step with instant actors; modelled GPU step = views / 28 tiles/s (1 H100)",
            "driver_threads": args.threads, "tile": HOST_TILE, "stride": HOST_STRIDE, "repeats": args.host_repeats,
            "sizes": [host_side(args, side) for side in sizes],
            "target": "host side <= 0.03 of the modelled step",
        }
    if not args.skip_vae:
        out["vae_driver"] = vae_driver(args)
    ray.shutdown()
    shutil.rmtree(ray_tmp, ignore_errors=True)
    out["load_average_after"] = load_average()
    out["bench_seconds"] = time.perf_counter() - started
    print(json.dumps(rounded(out), indent=1))


if __name__ == "__main__":
    main()
