"""Throughput and latency of `cupscale serve` on CPU: prints one JSON object.

    python bench/serve.py [--requests 24] [--concurrency 1 4 16] [--queue 64] [--model tiny|demo|DIR]

Starts a local Ray (127.0.0.1, token auth on) and the service with one CPU model-worker actor (the tiny random
SDXL of the tests by default, 64x48 -> 128x96, tile 8 / stride 4, 2 steps: the service's own overhead dominates),
then for each concurrency sends ``--requests`` requests from that many client threads, each submit -> poll every
50 ms -> fetch. Reported per concurrency: requests/s (completed results per wall second), p50 / p99 latency from
submit to result bytes, 429 answers retried. Load average is reported: on a busy machine the figures are low.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from bench.common import load_average, log, rounded  # noqa: E402

TOKEN = "bench-token-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_bytes() -> bytes:
    from PIL import Image

    ys, xs = np.mgrid[0:48, 0:64]
    buffer = io.BytesIO()
    Image.fromarray(np.stack([xs * 4, ys * 5, 255 - xs * 3], -1).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def one_request(http, body: bytes, params: dict) -> tuple[float, int]:
    """Submit (retrying 429 after Retry-After), poll, fetch: seconds from first submit to result, 429 count."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    began, refused = time.monotonic(), 0
    while True:
        answer = http.post("/v1/upscale", params=params, content=body, headers=headers)
        if answer.status_code == 202:
            break
        if answer.status_code != 429:
            raise RuntimeError(answer.text)
        refused += 1
        time.sleep(float(answer.headers.get("Retry-After", "1")))
    job = answer.json()["id"]
    while (status := http.get(f"/v1/jobs/{job}", headers=headers).json()["status"]) not in ("succeeded", "failed"):
        time.sleep(0.05)
    if status != "succeeded":
        raise RuntimeError(http.get(f"/v1/jobs/{job}", headers=headers).text)
    http.get(f"/v1/jobs/{job}/result", headers=headers).raise_for_status()
    return time.monotonic() - began, refused


def measure(base: str, concurrency: int, requests: int, params: dict) -> dict:
    import httpx

    body, latencies, refusals, lock = image_bytes(), [], [0], threading.Lock()
    todo = iter(range(requests))

    def client() -> None:
        with httpx.Client(base_url=base, timeout=120) as http:
            while True:
                with lock:
                    if next(todo, None) is None:
                        return
                seconds, refused = one_request(http, body, params)
                with lock:
                    latencies.append(seconds)
                    refusals[0] += refused

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    began = time.monotonic()
    [t.start() for t in threads]
    [t.join() for t in threads]
    wall = time.monotonic() - began
    ordered = sorted(latencies)
    return {"concurrency": concurrency, "requests": len(ordered), "requests_per_s": len(ordered) / wall,
            "p50_s": float(np.percentile(ordered, 50)), "p99_s": float(np.percentile(ordered, 99)),
            "retried_429": refusals[0], "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--queue", type=int, default=64)
    parser.add_argument("--model", default="tiny", help="tiny (random, built here), demo, or a diffusers dir")
    args = parser.parse_args()
    from ray import serve

    from cupscale_dist import UpscaleConfig
    from cupscale_dist.execution.raycluster import ClusterOptions, start_local
    from cupscale_dist.services.serve import SLOW_START_ENV, ServiceOptions, deploy

    for key, value in SLOW_START_ENV.items():
        os.environ.setdefault(key, value)
    with tempfile.TemporaryDirectory(prefix="cupscale-bench-serve-") as tmp:
        model = args.model
        if model == "tiny":
            from cupscale_dist.testing.tiny import build_tiny_sdxl

            model = str(build_tiny_sdxl(Path(tmp) / "tiny"))
        config = UpscaleConfig.load("cpu-demo", model=model, torch_threads=1)
        start_local(num_cpus=4, log_to_driver=False, _temp_dir=str(Path(tmp) / "ray"))
        try:
            port = free_port()
            options = ServiceOptions(str(Path(tmp) / "results"), config, args.queue, TOKEN,
                                     cluster=ClusterOptions(actors=1, cpus_per_actor=1))
            started = time.monotonic()
            deploy(options, "127.0.0.1", port)
            log(f"service up in {time.monotonic() - started:.1f} s")
            params = {"tile": "8", "stride": "4", "steps": "2", "seed": "0"}
            rows = []
            for concurrency in args.concurrency:
                rows.append(measure(f"http://127.0.0.1:{port}", concurrency, args.requests, params))
                log(json.dumps(rounded(rows[-1], 4)))
        finally:
            serve.shutdown()
            import ray

            ray.shutdown()
    print(json.dumps(rounded({"bench": "serve", "model": args.model, "input": [64, 48], "output": [128, 96],
                              "rows": rows, "load_average": load_average()}, 4), indent=1))


if __name__ == "__main__":
    main()
