"""The Ray driver's cost: overhead of one actor, scaling to two, and the host side at 8K / 16K: prints one JSON object.

    python bench/orchestrator.py [--threads 1] [--repeats 5] [--tile 32 --batch 1 --latent 96] [--skip-actors]
                                 [--host-sizes 1024,2048] [--host-batch 4] [--host-repeats 3] [--skip-host]

(a) overhead and (b) scaling, side by side in one local Ray cluster, round-robin per repeat, after a warm-up step:
one denoising step's worth of views (``reduce_predictions`` consuming the predictor, as ``reduce_and_step`` does)
through the in-process ``LocalPredictor`` (the reference), through ``RayPredictor`` over a ``DenoiserPool`` of 1
``TileDenoiser`` actor, and of 2. The tiny SDXL-architecture UNet's size (``--unet-channels``, ``--tile``,
``--batch``) is picked so one view batch costs near 50 ms on one thread; the measured cost is reported. Every
actor and the reference pin ``--threads`` torch threads (1), so their predictions must agree bit for bit (checked).
Targets: 1 actor >= 0.90 of the reference rate; 2 actors >= 1.7x one (only meaningful on 2 otherwise idle cores:
the host load is reported).

(c) host side at 8K and 16K (1024^2 and 2048^2 latent, tile 128, stride 64: 225 / 961 views per step), with a
synthetic instant denoiser, so only the driver's own work is timed:
  * in process, part by part: cutting the windows (as RayPredictor does), ``reduce_predictions``,
    ``inject_global_prior`` (Haar, prior active), the Euler ``scheduler.step``, and the real ``reduce_and_step``;
  * end to end through Ray: ``RayPredictor`` over 2 synthetic actors that return ``0.5 * windows`` (a pointwise
    stand-in for the UNet), reduced and stepped with ``reduce_and_step`` -- serialisation, object store, copies.
Bytes moved per step (windows out + predictions back, float32) and each time as a fraction of the modelled GPU
step time of architecture.md (one H100 ~ 28 tiles/s bare => views / 28 s). Target: host side <= 3 %.
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
sys.path.insert(0, str(ROOT))  # run from a checkout without installing; actors import `actors.denoiser` from here

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import load_average, log, rounded  # noqa: E402  (bench/common.py)

H100_TILES_PER_S = 28.0  # architecture.md: bare batched SDXL UNet + CFG, 8-16 tiles per batch, one H100, bf16
HOST_TILE, HOST_STRIDE = 128, 64


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
# (a) + (b): real TileDenoiser actors vs the in-process reference
# ---------------------------------------------------------------------------------------------------------------
def stage_context(model, views: np.ndarray, latent_hw, config, seed: int):
    """A StageContext as run_stage builds it: real prompt encodings, distinct regional prompts, view token masks."""
    from cupscale_dist.masks import content_token_mask
    from cupscale_dist.step import StageContext

    prompts = [f"a photo of a cat, detail {i}" for i in range(len(views))]
    regional_embeds, regional_pooled = model.encode_prompts(prompts)
    global_embeds, global_pooled = model.encode_prompts([config.prompt])
    negative_embeds, negative_pooled = model.encode_negative(config.negative_prompt)
    content = content_token_mask(model.token_count(config.prompt), global_embeds.shape[1])
    rng = np.random.default_rng(seed)
    token_allowed = np.ones((len(views), global_embeds.shape[1]), dtype=bool)
    token_allowed[:, content] = rng.random((len(views), int(content.sum()))) < 0.5
    f = model.vae_scale_factor
    return StageContext(negative_embeds, global_embeds, regional_embeds, np.arange(len(views)), negative_pooled,
                        global_pooled, regional_pooled, token_allowed, None, tuple(latent_hw),
                        (latent_hw[0] * f, latent_hw[1] * f), f, config.guidance_scale, config.lambda_global,
                        config.composer, config.pooled_prompt)


def actors_bench(args) -> dict:
    tmp = tempfile.mkdtemp(prefix="cupscale-bench-")
    try:
        return _actors_bench(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _actors_bench(args, tmp: str) -> dict:
    import ray

    from cupscale_dist import UpscaleConfig
    from cupscale_dist.models import load_model
    from cupscale_dist.orchestrator import DenoiserPool, RayPredictor
    from cupscale_dist.raycluster import ClusterOptions
    from cupscale_dist.pipeline import LocalPredictor
    from cupscale_dist.step import predict_views, reduce_predictions
    from cupscale_dist.testing import build_tiny_sdxl
    from cupscale_dist.views import make_views

    log(f"building the tiny SDXL (unet_channels={args.unet_channels}) ...")
    model_dir = str(build_tiny_sdxl(Path(tmp) / "model", seed=0, unet_channels=args.unet_channels))
    config = UpscaleConfig(model=model_dir, device="cpu", dtype="float32", torch_threads=args.threads,
                           tile=args.tile, stride=args.tile // 2, view_batch_size=args.batch,
                           prompt="a photo of a cat on a house")
    model = load_model(model_dir, device="cpu", dtype="float32")
    latent_hw = (args.latent, args.latent)
    views = make_views(*latent_hw, config.tile, config.stride)
    context = stage_context(model, views, latent_hw, config, args.seed)
    latents = torch.randn(1, 4, *latent_hw, generator=torch.Generator().manual_seed(args.seed))
    timestep, input_scale = 500.0, 0.5

    # Calibration: one view batch through predict_views in process (what one actor task computes).
    rects = views[: args.batch]
    windows = torch.stack([latents[0, :, t:b, l:r] for t, l, b, r in rects])
    batch_times = []
    for r in range(3 + 5):
        t0 = time.perf_counter()
        predict_views(model.unet, windows, timestep, input_scale, context, range(args.batch), rects)
        if r >= 3:
            batch_times.append(time.perf_counter() - t0)
    batch_s = statistics.median(batch_times)
    log(f"one batch of {args.batch} view(s) at {args.tile}^2 latent: {batch_s * 1e3:.1f} ms; "
        f"{len(views)} views per step")

    log("starting 1 + 2 TileDenoiser actors ...")
    options = dict(cpus_per_actor=1.0, start_timeout_s=300)
    predictors = {"local": LocalPredictor(model.unet, args.batch),
                  "ray_1_actor": RayPredictor(DenoiserPool(config, ClusterOptions(actors=1, **options)), args.batch),
                  "ray_2_actors": RayPredictor(DenoiserPool(config, ClusterOptions(actors=2, **options)), args.batch)}
    for predictor in predictors.values():
        predictor.start_stage(context)

    def one_step(predictor) -> torch.Tensor:
        batches = predictor.predict(latents, views, timestep, input_scale, 0)
        return reduce_predictions(batches, views, latents.shape)

    results = {name: one_step(p) for name, p in predictors.items()}  # warm-up: actors fetch the context, JIT paths
    identical = {name: bool(torch.equal(results[name], results["local"])) for name in results}
    max_diff = {name: float((results[name] - results["local"]).abs().max()) for name in results}
    times: dict[str, list[float]] = {name: [] for name in predictors}
    busy: dict[str, list[float]] = {name: [] for name in predictors}
    for r in range(args.repeats):  # round-robin, alternating order, so drift in the host load hits all alike
        order = list(predictors) if r % 2 == 0 else list(reversed(predictors))
        for name in order:
            c0, t0 = cpu_times(), time.perf_counter()
            one_step(predictors[name])
            times[name].append(time.perf_counter() - t0)
            cores = busy_cores(c0, cpu_times())
            if cores is not None:
                busy[name].append(cores)
        log(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in predictors))
    for name in ("ray_1_actor", "ray_2_actors"):
        predictors[name].close()
    ray.shutdown()

    median = {name: statistics.median(v) for name, v in times.items()}
    rate = {name: len(views) / s for name, s in median.items()}
    one_vs_local = rate["ray_1_actor"] / rate["local"]
    two_vs_one = rate["ray_2_actors"] / rate["ray_1_actor"]
    return {
        "model": f"tiny SDXL-architecture, random weights, unet_channels={list(args.unet_channels)}",
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
# (c) host side at 8K / 16K with a synthetic instant denoiser
# ---------------------------------------------------------------------------------------------------------------
class SyntheticDenoiser:
    """TileDenoiser's calling contract with a pointwise stand-in for the UNet: returns 0.5 * windows (float32)."""

    def __init__(self, index: int):
        self.index = index

    def where(self) -> dict:
        return {"index": self.index, "pid": os.getpid()}

    def predict(self, context_ref: list, windows: np.ndarray, timestep: float, input_scale: float,
                view_ids: np.ndarray, rects: np.ndarray) -> np.ndarray:
        return windows * np.float32(0.5)


def synthetic_pool(count: int):
    """A real DenoiserPool (its pick / in-flight policy) whose actors are SyntheticDenoisers."""
    import ray

    from cupscale_dist.orchestrator import DenoiserPool

    pool = DenoiserPool.__new__(DenoiserPool)
    remote = ray.remote(SyntheticDenoiser).options(num_cpus=0.5)
    pool.actors = [remote.remote(i) for i in range(count)]
    pool.in_flight = [0] * count
    pool.count, pool.num_gpus = count, 0
    ray.get([a.where.remote() for a in pool.actors])
    return pool


def euler_schedule(latents: torch.Tensor, seed: int):
    """The driver's StageSchedule as run_stage builds it (Euler, SDXL's scheduler config, 30 steps, strength 0.6)."""
    from diffusers import EulerDiscreteScheduler

    from cupscale_dist.prior import GlobalPrior
    from cupscale_dist.step import StageSchedule
    from cupscale_dist.testing import SCHEDULER_CONFIG

    scheduler = EulerDiscreteScheduler(**SCHEDULER_CONFIG)
    scheduler.set_timesteps(30, device="cpu")
    start = 30 - 18
    z_low = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed + 1))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed + 2))
    prior = GlobalPrior.from_latent(z_low, noise, "haar", 1)
    return StageSchedule(scheduler, start, prior, "x0", 0.5, "cosine"), start


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    times = []
    for r in range(warmup + repeats):
        t0 = time.perf_counter()
        fn()
        if r >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def host_side(args, side: int) -> dict:
    """One latent size: the driver's work per step, part by part in process, then end to end through Ray."""
    import ray

    from cupscale_dist.orchestrator import RayPredictor
    from cupscale_dist.prior import inject_global_prior, noise_level, prior_weight
    from cupscale_dist.step import reduce_and_step, reduce_predictions
    from cupscale_dist.views import make_views, view_batches

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

    def cut_windows():  # exactly RayPredictor._submit's cut, for every batch of the step
        host = latents[0].numpy()
        for b in batches:
            np.stack([host[:, t:bo, l:r] for t, l, bo, r in views[b.start : b.stop]])

    def result_copies():  # RayPredictor.predict's torch.from_numpy(result.copy()) per batch (Ray arrays are read-only)
        for p in predictions:
            torch.from_numpy(p.numpy().copy())

    eps = reduce_predictions(zip(batches, predictions), views, latents.shape)

    def scheduler_step():
        schedule.scheduler._step_index = None  # Euler counts its steps: start from the same index every repeat
        schedule.scheduler.set_begin_index(start + step)
        schedule.input_scale(step)  # the pipeline scales the model input before stepping (diffusers checks)
        schedule.scheduler.step(eps, schedule.timestep(step), latents)

    def full_reduce_and_step():
        schedule.scheduler._step_index = None
        schedule.scheduler.set_begin_index(start + step)
        schedule.input_scale(step)  # the pipeline scales the model input before stepping (diffusers checks)
        reduce_and_step(latents, zip(batches, predictions), views, schedule, step)

    reps = args.host_repeats
    parts = {
        "cut_windows": median_time(cut_windows, reps),
        "result_copies": median_time(result_copies, reps),
        "reduce": median_time(lambda: reduce_predictions(zip(batches, predictions), views, latents.shape), reps),
        "prior": median_time(lambda: inject_global_prior(eps, latents, schedule.prior, weight, alpha, sigma), reps),
        "scheduler_step": median_time(scheduler_step, reps),
    }
    reduce_and_step_s = median_time(full_reduce_and_step, reps)

    # End to end through Ray: the real RayPredictor over synthetic actors, reduced + stepped by reduce_and_step.
    pool = synthetic_pool(args.synthetic_actors)
    predictor = RayPredictor(pool, args.host_batch)
    predictor.start_stage({"synthetic": True})

    def ray_step():
        schedule.scheduler._step_index = None
        schedule.scheduler.set_begin_index(start + step)
        batches_iter = predictor.predict(latents, views, schedule.timestep(step), schedule.input_scale(step), step)
        reduce_and_step(latents, batches_iter, views, schedule, step)

    c0 = cpu_times()
    ray_s = median_time(ray_step, reps)
    ray_busy = busy_cores(c0, cpu_times())
    for actor in pool.actors:
        ray.kill(actor, no_restart=True)

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
        "ray_step_note": "the real RayPredictor + reduce_and_step with synthetic actors on the same host cores as the "
                         "driver: an upper bound of the driver's per-step cost, i.e. the rate it can feed",
        "driver_tiles_per_s": {"in_process_parts": n / host_total, "ray_synthetic": n / ray_s},
        "h100s_one_driver_can_feed": {"in_process_parts": n / host_total / H100_TILES_PER_S,
                                      "ray_synthetic": n / ray_s / H100_TILES_PER_S},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads: driver, reference and every actor")
    parser.add_argument("--seed", type=int, default=0)
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
    c.add_argument("--synthetic-actors", type=int, default=2)
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
    out: dict = {"bench": "orchestrator", "command": " ".join(["python", "bench/orchestrator.py", *sys.argv[1:]]),
                 "torch_threads": args.threads, "torch": torch.__version__, "ray": ray.__version__,
                 "python": platform.python_version(), "cpu_count": os.cpu_count(), "load_average_before": load_before}
    if not args.skip_actors:
        # 1 + 2 actors live side by side (idle ones cost nothing): 3 logical CPUs at 1 per actor.
        ray.init(num_cpus=4, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
                 _temp_dir=ray_tmp)
        out["actors"] = actors_bench(args)
    if not args.skip_host:
        if not ray.is_initialized():
            ray.init(num_cpus=4, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
                     _temp_dir=ray_tmp)
        sizes = [int(s) for s in args.host_sizes.split(",")]
        out["host_side"] = {
            "what": "driver work per step with an instant denoiser; modelled GPU step = views / 28 tiles/s (1 H100)",
            "driver_threads": args.threads, "tile": HOST_TILE, "stride": HOST_STRIDE, "repeats": args.host_repeats,
            "sizes": [host_side(args, side) for side in sizes],
            "target": "host side <= 0.03 of the modelled step",
        }
        ray.shutdown()
    shutil.rmtree(ray_tmp, ignore_errors=True)
    out["load_average_after"] = load_average()
    out["bench_seconds"] = time.perf_counter() - started
    print(json.dumps(rounded(out), indent=1))


if __name__ == "__main__":
    main()
