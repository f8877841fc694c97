"""Dataset throughput of `cupscale batch` on CPU with the demo model: prints one JSON object.

    python bench/batch.py [--images 8] [--size 256] [--threads 1] [--cpus-per-worker 0.5]

The same N images (``--size``² crops of the astronaut, resized, each different), the cpu-demo config (x2, so
256² -> 512², 9 views x 6 steps per image), torch pinned to ``--threads`` threads everywhere:
  * ``plain_loop``: one process, the model loaded once, ``load_image -> upscale -> save_png`` per image (the floor);
  * ``ray_data_1`` / ``ray_data_2``: ``run_batch`` with 1 and 2 CPU workers (a Ray Data actor pool), wall time
    from the call to the last manifest row, actor start-up and model load included, Ray already initialised.
Reported: images/hour for each; the Ray Data overhead (``ray_data_1`` time / plain loop time, target near 1
plus the one-off start-up); 2 vs 1 workers (only meaningful on 2 otherwise idle cores: the load is reported).
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

from statistics import median  # noqa: E402

from PIL import Image  # noqa: E402

from common import load_average, log  # noqa: E402  (bench/common.py)


def make_images(folder: Path, count: int, size: int) -> None:
    folder.mkdir(parents=True)
    with Image.open(ROOT / "examples" / "astronaut.png") as astronaut:
        astronaut = astronaut.convert("RGB")
        for i in range(count):  # different crops so no two inputs are the same work
            left, top = (i * 17) % 96, (i * 29) % 96
            astronaut.crop((left, top, left + 160, top + 160)).resize((size, size), Image.Resampling.BICUBIC) \
                .save(folder / f"img-{i:03d}.png")


def plain_loop(folder: Path, out: Path, config) -> tuple[float, list[float]]:
    from cupscale_dist.execution.executor import open_executor
    from cupscale_dist.files.imageio import load_image, save_png
    from cupscale_dist.pipeline import upscale
    from cupscale_dist.plan import check_inputs
    from cupscale_dist.services.runner import run_metadata

    out.mkdir()
    start = time.perf_counter()
    executor = open_executor(config, keep=True)  # loaded once, as `cupscale batch --tile-parallel --actors 0`
    per_image = []
    for path in sorted(folder.iterdir()):
        begin = time.perf_counter()
        image = load_image(path, config.max_input_pixels, config.min_input_side)
        plan = check_inputs(image.size, config)
        result = upscale(image, config, executor=executor, plan=plan, progress=False)
        save_png(result, out / path.name, run_metadata(plan, str(path)))
        per_image.append(time.perf_counter() - begin)
    return time.perf_counter() - start, per_image


def ray_data(folder: Path, out: Path, config, workers: int, cpus: float) -> tuple[float, dict]:
    from cupscale_dist.execution.raycluster import ClusterOptions
    from cupscale_dist.services.batch.run import run_batch

    start = time.perf_counter()
    summary = run_batch(str(folder), out, config, cluster=ClusterOptions(gpus_per_actor=0, cpus_per_actor=cpus),
                        workers=workers, progress=False)
    elapsed = time.perf_counter() - start
    assert summary.done == summary.total, summary.line()
    per_image = [r["total_s"] for r in summary.rows]
    return elapsed, {"median_s_per_image": round(median(per_image), 3),
                     "startup_s": round(elapsed - sum(per_image) / workers, 2)}  # pool start + model load + drain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cpus-per-worker", type=float, default=0.5)
    args = parser.parse_args()

    import ray
    import torch

    from cupscale_dist import UpscaleConfig

    torch.set_num_threads(args.threads)
    config = UpscaleConfig.load("cpu-demo", torch_threads=args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    try:
        make_images(work / "in", args.images, args.size)
        ray.init(num_cpus=os.cpu_count(), _node_ip_address="127.0.0.1", include_dashboard=False,
                 log_to_driver=False, _temp_dir=str(work / "ray"))
        load_before = load_average()
        log("plain loop ...")
        plain, plain_images = plain_loop(work / "in", work / "plain", config)
        results = {}
        for workers in (1, 2):
            log(f"ray data, {workers} worker(s) ...")
            results[workers] = ray_data(work / "in", work / f"ray{workers}", config, workers, args.cpus_per_worker)
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    per_hour = lambda seconds: round(args.images * 3600 / seconds, 1)  # noqa: E731
    report = {
        "bench": "batch", "images": args.images, "input": [args.size, args.size],
        "output": [2 * args.size, 2 * args.size], "config": "cpu-demo",
        "model": "demo (small trained SDXL-family model)",
        "torch_threads": args.threads, "cpus_per_worker": args.cpus_per_worker,
        "plain_loop": {"seconds": round(plain, 2), "images_per_hour": per_hour(plain),
                       "median_s_per_image": round(median(plain_images), 3)},
        "ray_data_1": {"seconds": round(results[1][0], 2), "images_per_hour": per_hour(results[1][0]), **results[1][1]},
        "ray_data_2": {"seconds": round(results[2][0], 2), "images_per_hour": per_hour(results[2][0]), **results[2][1]},
        "ray_data_overhead_ratio": round(results[1][0] / plain, 3),  # 1 worker vs the plain loop, start-up included
        "ray_data_per_image_ratio": round(results[1][1]["median_s_per_image"] / median(plain_images), 3),
        "speedup_2_vs_1_workers": round(results[1][0] / results[2][0], 3),
        "host": {"cpus": os.cpu_count(), "load_average_before": load_before, "load_average_after": load_average(),
                 "python": platform.python_version()},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
