"""1024² -> 16384² through the tile orchestrator on CPU with the demo model: prints one JSON object.

    python bench/scale.py [--input 1024] [--scale 16] [--actors 2] [--tile 32 --stride 16] [--batch 8]

One scheduler step per stage (``steps=1, strength=1.0``), x2 stages (2K, 4K, 8K, 16K for the defaults), views fanned
out to ``--actors`` TileDenoiser actors on a local Ray cluster (``RayPredictor``), the driver running everything
else (resize, tiled VAE encode/decode, prior, reduction). Per stage: seconds (stage start to the next stage's
start, the last one to the end of ``upscale``: the final decode included), the denoising step alone, views per
step, and the peak RSS of the driver (VmHWM, reset at every stage start) and of each actor. The target:
driver peak <= 4x the final image's bytes (W*H*3 uint8), i.e. no full-resolution float32 RGB copy (that is 4x
the final bytes alone). ``--scale 4`` / ``--scale 8`` give a reduced run where 16K does not fit the machine.
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

from PIL import Image  # noqa: E402

from common import load_average, log  # noqa: E402  (bench/common.py)

MB = 2**20


def peak_rss(pid: int | str = "self") -> int:
    """VmHWM (peak resident set) of a process on this machine, bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak(pid: int | str = "self") -> None:
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass


def current_rss(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class StageProbe:
    """Step callback: stage boundaries, step times, driver and actor peak RSS per stage."""

    def __init__(self, actor_pids: list[int]):
        self.actor_pids = actor_pids
        self.stages: list[dict] = []
        self.step_start = None

    def _close_stage(self, now: float) -> None:
        if self.stages:
            stage = self.stages[-1]
            stage["seconds"] = now - stage.pop("_start")
            stage["driver_peak_rss_mb"] = peak_rss() / MB
            for pid in self.actor_pids:
                try:
                    stage["actor_peak_rss_mb"].append(peak_rss(pid) / MB)
                except OSError:
                    stage["actor_peak_rss_mb"].append(None)

    def __call__(self, state: dict) -> None:
        now = time.perf_counter()
        if "stage_input" in state:  # a stage starts
            self._close_stage(now)
            reset_peak()
            for pid in self.actor_pids:
                reset_peak(pid)
            self.stages.append({"stage": state["stage"], "_start": now, "input": list(state["stage_input"].size),
                                "driver_rss_at_start_mb": current_rss() / MB, "actor_peak_rss_mb": [],
                                "step_seconds": []})
        else:
            stage = self.stages[-1]
            stage["step_seconds"].append(now - (self.step_start or stage["_start"]))
            # actors are idle from here on (the decode is the driver's): read their peaks now, they stop at the end
            stage["actor_peak_after_step_mb"] = [peak_rss(pid) / MB for pid in self.actor_pids]
        self.step_start = now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=int, default=1024)
    parser.add_argument("--scale", type=int, default=16)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--cpus-per-actor", type=float, default=0.5)
    parser.add_argument("--tile", type=int, default=32, help="view size in latent px (the demo model's 2x native)")
    parser.add_argument("--stride", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8, help="views per actor call")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import ray
    import torch

    from cupscale_dist import UpscaleConfig, upscale
    from cupscale_dist.models import load_model
    from cupscale_dist.orchestrator import make_predictor
    from cupscale_dist.raycluster import ClusterOptions
    from cupscale_dist.plan import describe_plan
    from cupscale_dist.testing import demo_model_dir

    torch.set_num_threads(args.threads)
    demo_model_dir()
    config = UpscaleConfig.load("cpu-demo", scale=args.scale, steps=1, strength=1.0, tile=args.tile,
                                stride=args.stride, view_batch_size=args.batch, torch_threads=args.threads)
    with Image.open(ROOT / "examples" / "astronaut.png") as astronaut:
        image = astronaut.convert("RGB").resize((args.input, args.input), Image.Resampling.BICUBIC)
    plan = describe_plan(image.size, config)
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        ray.init(num_cpus=os.cpu_count(), _node_ip_address="127.0.0.1", include_dashboard=False,
                 log_to_driver=False, _temp_dir=str(work / "ray"))
        model = load_model(config.model, config.device, config.dtype)
        predictor = make_predictor(config, ClusterOptions(actors=args.actors, gpus_per_actor=0,
                                                          cpus_per_actor=args.cpus_per_actor))
        actor_pids = [w["pid"] for w in ray.get([a.where.remote() for a in predictor.pool.actors])]
        probe = StageProbe(actor_pids)
        baseline = current_rss()  # torch, Ray, the loaded pipeline: what the driver holds before any stage
        log(f"{args.input}^2 -> {args.input * args.scale}^2, {len(plan['stages'])} stages, views per stage "
            f"{[s['views_per_step'] for s in plan['stages']]}, {args.actors} actors")
        start = time.perf_counter()
        result = upscale(image, config, model=model, predictor=predictor, callback=probe, progress=True)
        total = time.perf_counter() - start
        probe._close_stage(time.perf_counter())
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    final_bytes = result.width * result.height * 3
    stages = []
    for stage, planned in zip(probe.stages, plan["stages"]):
        width, height = planned["size"]
        stages.append({
            "stage": stage["stage"], "size": [width, height], "views_per_step": planned["views_per_step"],
            "steps": len(stage["step_seconds"]), "seconds": round(stage["seconds"], 2),
            "step_seconds": [round(s, 2) for s in stage["step_seconds"]],
            "driver_peak_rss_mb": round(stage["driver_peak_rss_mb"], 1),
            "driver_growth_mb": round(stage["driver_peak_rss_mb"] - baseline / MB, 1),  # peak minus the baseline
            "driver_growth_over_stage_image_bytes": round(
                (stage["driver_peak_rss_mb"] * MB - baseline) / (width * height * 3), 2),
            "actor_peak_rss_mb": [round(v, 1) for v in stage.get("actor_peak_after_step_mb", [])],
        })
    driver_peak = max(s["driver_peak_rss_mb"] for s in stages)
    report = {
        "bench": "scale", "input": [args.input, args.input], "output": [result.width, result.height],
        "model": "demo (tiny random SDXL)", "device": "cpu", "actors": args.actors,
        "cpus_per_actor": args.cpus_per_actor, "tile": args.tile, "stride": args.stride,
        "view_batch_size": args.batch, "steps_per_stage": 1, "torch_threads": args.threads,
        "completed": True, "total_seconds": round(total, 2), "stages": stages,
        "final_image_mb": round(final_bytes / MB, 1),
        "driver_baseline_rss_mb": round(baseline / MB, 1),
        "driver_peak_rss_mb": driver_peak,
        "driver_peak_over_final_image_bytes": round(driver_peak * MB / final_bytes, 2),
        "driver_growth_over_final_image_bytes": round((driver_peak * MB - baseline) / final_bytes, 2),
        "target_driver_peak_over_final_image_bytes": 4.0,
        "actor_peak_rss_mb": max((max(s["actor_peak_rss_mb"] or [0]) for s in stages), default=0),
        "host": {"cpus": os.cpu_count(), "load_average_after": load_average(),
                 "python": platform.python_version(), "machine": platform.machine()},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
