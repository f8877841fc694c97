"""Captioner throughput on CPU with the tiny test VLM: prints one JSON object.

    python bench/captioner.py [--backend vllm|transformers] [--crops 16] [--rounds 3]

Measures, in one local Ray cluster: pool start-up (engine load) for 1 and 2 actors; crops/s of one actor
given all crops in one batched call vs one crop per call (ratio); crops/s of a pool of 2 vs 1 (ratio). The
cache is cleared before every timed round, so every crop reaches the engine. The tiny model makes these
overhead-bound numbers: they show batching and pool scaling, not what a 7B model does on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cupscale_dist.captions.captioner import VLMCaptioner
from cupscale_dist.testing.vlm import build_tiny_vlm

GLOBAL_PROMPT = "a photo"


def crops_and_boxes(n: int, tile: int = 128) -> tuple[Image.Image, list[tuple[int, int, int, int]]]:
    """An image with `n` distinct tile boxes (a row-major grid), like the pipeline's views."""
    side = int(np.ceil(np.sqrt(n)))
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (side * tile, side * tile, 3), dtype=np.uint8))
    boxes = [(c * tile, r * tile, (c + 1) * tile, (r + 1) * tile) for r in range(side) for c in range(side)]
    return image, boxes[:n]


def _cpu_times() -> tuple[int, int]:
    """(total, idle) jiffies of this host (Linux /proc/stat), for the busy-cores figure."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields), fields[3] + fields[4]


def crops_per_s(captioner: VLMCaptioner, image, boxes, rounds: int, per_call: int) -> tuple[float, float]:
    """Median crops/s over `rounds` sending `per_call` crops per call, and the host's busy cores meanwhile.

    Busy cores tell whether a pool can scale here: one vLLM actor runs a frontend, an engine core and a
    worker process, so it may already keep every core of a small host busy.
    """
    rates = []
    total0 = idle0 = 0
    for r in range(rounds + 1):  # the first round warms up
        captioner.cache.clear()
        if r == 1:
            total0, idle0 = _cpu_times()
        start = time.perf_counter()
        for i in range(0, len(boxes), per_call):
            captioner.describe_regions(image, boxes[i:i + per_call], GLOBAL_PROMPT)
        rates.append(len(boxes) / (time.perf_counter() - start))
    total1, idle1 = _cpu_times()
    busy = (os.cpu_count() or 1) * (1 - (idle1 - idle0) / max(total1 - total0, 1))
    return statistics.median(rates[1:]), busy


def start_pool(backend: str, model: str, pool_size: int) -> tuple[VLMCaptioner, float]:
    """A captioner with its pool up; returns it and the seconds the start (engine load) took."""
    captioner = VLMCaptioner(backend, model, pool_size=pool_size, cpus_per_actor=1.0, dtype="float32")
    image, boxes = crops_and_boxes(1)
    start = time.perf_counter()
    captioner.describe_regions(image, boxes, GLOBAL_PROMPT)  # the first call starts the pool
    return captioner, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="vllm", choices=["vllm", "transformers"])
    parser.add_argument("--crops", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import ray

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    temp = tempfile.mkdtemp(prefix="ray-bench-")
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, _temp_dir=temp,
             log_to_driver=False)
    model = str(build_tiny_vlm(Path(temp) / "tiny-vlm"))
    image, boxes = crops_and_boxes(args.crops)
    result = {"backend": args.backend, "crops": len(boxes), "cpus": os.cpu_count(), "rounds": args.rounds}

    captioner, result["pool1_start_s"] = start_pool(args.backend, model, 1)
    result["pool1_batched_crops_per_s"], result["pool1_busy_cores"] = crops_per_s(
        captioner, image, boxes, args.rounds, len(boxes))
    result["pool1_single_crops_per_s"], _ = crops_per_s(captioner, image, boxes, args.rounds, 1)
    captioner.close()

    captioner, result["pool2_start_s"] = start_pool(args.backend, model, 2)
    result["pool2_batched_crops_per_s"], result["pool2_busy_cores"] = crops_per_s(
        captioner, image, boxes, args.rounds, len(boxes))
    captioner.close()

    result["batched_over_single"] = result["pool1_batched_crops_per_s"] / result["pool1_single_crops_per_s"]
    result["pool2_over_pool1"] = result["pool2_batched_crops_per_s"] / result["pool1_batched_crops_per_s"]
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}, indent=1))


if __name__ == "__main__":
    main()
