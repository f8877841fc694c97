"""1024² -> 16384² end to end through Ray on this machine: stage times, driver memory and driver CPU vs the actors'.

    python bench/scale.py [--input 1024] [--scale 16] [--actors 2] [--unet pointwise|demo] [--output out.tif]

The driver runs ``upscale()`` with a ``RayExecutor`` exactly as ``cupscale upscale --actors N`` does: every forward
pass (VAE tiles, prompt chunks, the probe, view predictions) on ``--actors`` PipelineWorker actors, the final stage
streamed into ``--output`` (.tif: tiled BigTIFF; .png) band by band. ``--unet pointwise`` replaces the UNet on the
actors by ``eps = 0.5 * window`` (a full 16K run of the demo UNet would take many hours on 2 cores; the JSON says
which ran); the VAE, the text encoders and the probe are the demo model's, for real. One scheduler step per
stage (``steps=1, strength=1``).

Reported per stage: seconds, views, the driver's peak RSS (VmHWM, reset at each stage start) and the CPU seconds
of the driver and of the actors (their processes' ``time.process_time``). Targets: driver peak <= 4x the final
image's bytes; driver CPU <= 3% of the actors' at 4K and above (what a CPU-only head can afford). With the
pointwise UNet the actors' share is the VAE and probe only, so the CPU ratio is an upper bound.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from actors.worker import PipelineWorker  # noqa: E402
from common import load_average, log  # noqa: E402  (bench/common.py)

MB = 2**20


class PointwiseUNetWorker(PipelineWorker):
    """The real actor with the UNet replaced by a pointwise stand-in (``eps = 0.5 * window``)."""

    def call(self, method: str, args: tuple):
        if method == "predict":
            return 0.5 * np.asarray(args[1], dtype=np.float32)
        return super().call(method, args)


def proc_status(field: str, pid: int | str = "self") -> int:
    """A /proc/PID/status memory field (VmHWM: peak resident set, VmRSS: now), bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak(pid: int | str = "self") -> None:
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass


class StageProbe:
    """Step callback: stage boundaries, the driver's peak RSS and the CPU seconds of driver and actors per stage."""

    def __init__(self, pool):
        self.pool, self.stages = pool, []

    def actor_cpu(self) -> float:
        return sum(u["cpu_s"] for u in self.pool.usage())

    def close_stage(self) -> None:
        if self.stages:
            stage = self.stages[-1]
            stage["seconds"] = time.perf_counter() - stage.pop("_start")
            stage["driver_peak_rss_mb"] = proc_status("VmHWM") / MB
            stage["driver_cpu_s"] = time.process_time() - stage.pop("_driver_cpu")
            stage["actor_cpu_s"] = self.actor_cpu() - stage.pop("_actor_cpu")

    def __call__(self, state: dict) -> None:
        if state["stage_input"] is not None:  # a stage starts: no call is in flight, the actors answer at once
            self.close_stage()
            reset_peak()
            self.stages.append({"stage": state["stage"], "input": list(state["stage_input"].size), "steps": 0,
                                "_start": time.perf_counter(), "_driver_cpu": time.process_time(),
                                "_actor_cpu": self.actor_cpu()})
        else:
            self.stages[-1]["steps"] += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=int, default=1024)
    parser.add_argument("--scale", type=int, default=16)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--cpus-per-actor", type=float, default=0.5)
    parser.add_argument("--tile", type=int, default=128, help="view size in latent px")
    parser.add_argument("--stride", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="views per actor call")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the driver and each actor")
    parser.add_argument("--unet", choices=["pointwise", "demo"], default="pointwise")
    parser.add_argument("--output", default=None, help="result file (.tif or .png); default: a temp .tif, deleted")
    args = parser.parse_args()

    import ray
    import torch

    from cupscale_dist import UpscaleConfig, upscale
    from cupscale_dist.execution.pool import RayExecutor, WorkerPool
    from cupscale_dist.execution.raycluster import ClusterOptions
    from cupscale_dist.files.imageio import write_image
    from cupscale_dist.models.spec import ModelSpec
    from cupscale_dist.plan import check_inputs

    torch.set_num_threads(args.threads)
    config = UpscaleConfig.load("cpu-demo", scale=args.scale, steps=1, strength=1.0, tile=args.tile,
                                stride=args.stride, view_batch_size=args.batch, torch_threads=args.threads)
    with Image.open(ROOT / "examples" / "astronaut.png") as astronaut:
        image = astronaut.convert("RGB").resize((args.input, args.input), Image.Resampling.BICUBIC)
    plan = check_inputs(image.size, config).describe()
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    output = Path(args.output) if args.output else work / "out.tif"
    try:
        ray.init(num_cpus=os.cpu_count(), _node_ip_address="127.0.0.1", include_dashboard=False,
                 log_to_driver=False, _temp_dir=str(work / "ray"))
        spec = ModelSpec.load(config.model)
        actor_class = PointwiseUNetWorker if args.unet == "pointwise" else None
        options = ClusterOptions(actors=args.actors, gpus_per_actor=0, cpus_per_actor=args.cpus_per_actor)
        pool = WorkerPool(config, options, spec, actor_class)
        probe = StageProbe(pool)
        baseline = proc_status("VmRSS")  # torch, Ray, configs and tokenizer: the driver before any stage
        log(f"{args.input}^2 -> {args.input * args.scale}^2, {len(plan['stages'])} stages, views per stage "
            f"{[s['views_per_step'] for s in plan['stages']]}, {args.actors} actors, UNet: {args.unet}")
        start = time.perf_counter()
        metadata = {"prompt": config.prompt, "seed": str(config.seed), "bench": "scale"}
        size = tuple(plan["output"])
        upscale(image, config, executor=RayExecutor(pool, spec, config.view_batch_size, keep=True),
                callback=probe, sink=lambda bands: write_image(output, bands, size, metadata))
        total = time.perf_counter() - start
        probe.close_stage()
        pool.shutdown()
        ray.shutdown()
        output_bytes = output.stat().st_size
    finally:
        shutil.rmtree(work, ignore_errors=True)

    final_bytes = size[0] * size[1] * 3
    stages = [{**{k: round(v, 2) if isinstance(v, float) else v for k, v in s.items()},
               "views_per_step": planned["views_per_step"], "size": planned["size"],
               "driver_cpu_over_actor_cpu": round(s["driver_cpu_s"] / max(s["actor_cpu_s"], 1e-9), 4)}
              for s, planned in zip(probe.stages, plan["stages"])]
    driver_peak = max(s["driver_peak_rss_mb"] for s in stages)
    big = [s for s in stages if min(s["size"]) >= 4096]
    report = {
        "bench": "scale", "input": [args.input, args.input], "output": list(size), "output_file": output.suffix,
        "output_file_mb": round(output_bytes / MB, 1), "model": "demo (tiny random SDXL)",
        "unet": "pointwise stand-in on the actors (eps = 0.5 * window)" if args.unet == "pointwise" else "demo UNet",
        "device": "cpu", "actors": args.actors, "cpus_per_actor": args.cpus_per_actor, "tile": args.tile,
        "stride": args.stride, "view_batch_size": args.batch, "steps_per_stage": 1, "torch_threads": args.threads,
        "total_seconds": round(total, 1), "stages": stages,
        "final_image_mb": round(final_bytes / MB, 1), "driver_baseline_rss_mb": round(baseline / MB, 1),
        "driver_peak_rss_mb": round(driver_peak, 1),
        "driver_peak_over_final_image_bytes": round(driver_peak * MB / final_bytes, 2),
        "target_driver_peak_over_final_image_bytes": 4.0,
        "driver_cpu_over_actor_cpu_at_4k_and_above": round(
            sum(s["driver_cpu_s"] for s in big) / max(sum(s["actor_cpu_s"] for s in big), 1e-9), 4) if big else None,
        "target_driver_cpu_over_actor_cpu": 0.03,
        "host": {"cpus": os.cpu_count(), "load_average_after": load_average(),
                 "python": platform.python_version(), "machine": platform.machine()},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
