"""Several machines: per denoising step, the bytes that cross nodes and the step time with the actors on the
driver's node vs on another node, with instant stand-in actors; extrapolated to 8K / 16K and to many GPUs. Prints
one JSON object.

    sudo python bench/multinode.py [--sides 256,512,1024] [--batch 4] [--repeats 3]

Needs root: the nodes are Ray nodes in network namespaces (cupscale_dist/testing/netns.py), joined by a bridge on
10.231.0.0/24, which exists only inside them. Two layouts, each timed by a driver process inside the head's
namespace (where a `cupscale` driver runs):
  * ``one_node``: the head (2 CPUs) alone; 2 instant actors x 1 CPU: driver and actors share the node.
  * ``two_nodes``: a second node (6 logical CPUs) joins; 2 actors x 3 CPUs fit only there, so every window and every
    prediction crosses between machines (the CPU-only head of cluster/: driver on the head, GPUs elsewhere).
One step = the real ``predict_step`` (windows cut, sent, ``0.5 * windows`` back, tile 128 / stride 64, fp32) on a
``RayExecutor`` over a real ``WorkerPool`` of ``InstantWorker`` actors (bench/orchestrator.py), then
``reduce_and_step`` (reduce, Haar prior, Euler step). Bytes crossing nodes: the payload (windows out + predictions
back, counted from the arrays) and what the driver node's link carried (``/proc/net/dev`` of its namespace, rx + tx:
Ray's framing and control traffic included).

Extrapolation (``extrapolated``): the veth link is memory-speed, so the measured two_nodes - one_node difference per
byte is the driver's own cost of moving a byte between machines (serialising, object store, gRPC), not a wire's.
For 1024^2 (8K) and 2048^2 (16K) latents: bytes per step are exact (views x per-view bytes x the measured
link/payload ratio); the driver's cross-node cost scales with bytes; a real link adds bytes / bandwidth (25 and
100 Gb/s, assumed); the serial tail (prior + scheduler step, measured in process) scales with latent pixels. Each is
set against the modelled GPU step, views / (28 tiles/s x G H100s) (architecture.md), and the G at which it would
pass 3 % is given. Only the serial tail sits on the critical path for certain (the GPUs wait for it); the transfers
overlap with GPU work while the driver and its link keep up (<= 2 calls in flight per actor), so for them 3 % is a
pessimistic mark and 100 % (``gpus_at_saturation``) the hard limit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout; the nodes get ROOT and bench/ on PYTHONPATH (InstantWorker)

from common import load_average, log, rounded

H100_TILES_PER_S = 28.0  # architecture.md: bare batched SDXL UNet + CFG, one H100, bf16
TILE, STRIDE, CHANNELS = 128, 64, 4  # SDXL's latent tile and stride, 4 latent channels
LINK_GBIT_S = (25, 100)  # assumed NICs between the driver's machine and the GPU machines
THRESHOLD = 0.03  # architecture.md target: host-side work <= 3 % of a step
DRIVER_TIMEOUT_S = 300  # one layout's driver: imports, 2 instant actors, (1 + repeats) steps per size; ~40-80 s here
LAYOUTS = {"one_node": 1.0, "two_nodes": 3.0}  # CPUs per actor: 1 fits the 2-CPU head twice; 3 fits only the 6-CPU node


def link_bytes(device: str = "eth0") -> int:
    """rx + tx bytes of ``device`` in this process's network namespace."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, counters = line.partition(":")
        if name.strip() == device:
            fields = counters.split()
            return int(fields[0]) + int(fields[8])
    return 0


# ---------------------------------------------------------------------------------------------------------------
# the driver: runs inside the head's namespace, one layout, every size
# ---------------------------------------------------------------------------------------------------------------
def drive(args) -> dict:
    import ray
    import torch

    from cupscale_dist import UpscaleConfig
    from cupscale_dist.execution.pool import RayExecutor, WorkerPool
    from cupscale_dist.execution.raycluster import ClusterOptions
    from cupscale_dist.models.spec import ModelSpec
    from orchestrator import InstantWorker

    torch.set_num_threads(1)
    spec = ModelSpec.load("demo")  # configs and tokenizer only: no weights are loaded
    config = UpscaleConfig.load("cpu-demo", view_batch_size=args.batch, torch_threads=1)
    options = ClusterOptions(actors=2, gpus_per_actor=0, cpus_per_actor=args.cpus_per_actor, start_timeout_s=30)
    executor = RayExecutor(WorkerPool(config, options, spec, actor_class=InstantWorker), spec, args.batch)
    here = ray.get_runtime_context().get_node_id()
    out = {"actors_on_the_drivers_node": sum(node == here for node in executor.pool.group.nodes),
           "sizes": [one_size(executor, side, args) for side in args.sides]}
    executor.release()
    return out


def one_size(executor, side: int, args) -> dict:
    """One step's time and link bytes through the executor (after a warm-up), and the serial tail in process."""
    import torch

    from cupscale_dist.method.prior import (
        inject_global_prior,
        noise_level,
        prior_weight,
    )
    from cupscale_dist.method.step import reduce_and_step, reduce_predictions
    from cupscale_dist.method.views import make_views, view_batches
    from cupscale_dist.pipeline import predict_step
    from orchestrator import euler_schedule, median_time

    latents = torch.randn(1, CHANNELS, side, side, generator=torch.Generator().manual_seed(0))
    views = make_views(side, side, TILE, STRIDE)
    schedule, start = euler_schedule(latents, 0)
    timestep, input_scale = schedule.timestep(0), schedule.input_scale(0)
    shared = executor.share({"instant": True})  # a stage context's place; the stand-in ignores it

    def restart_scheduler():  # Euler counts its steps: the same step every repeat
        schedule.scheduler._step_index = None
        schedule.scheduler.set_begin_index(start)
        schedule.input_scale(0)

    def ray_step():
        restart_scheduler()
        reduce_and_step(latents, predict_step(executor, shared, latents, views, timestep, input_scale), views,
                        schedule, 0)

    ray_step()  # warm-up: actors fetch the shared value, first-call paths
    seconds, crossed = [], []
    for _ in range(args.repeats):
        b0, t0 = link_bytes(), time.perf_counter()
        ray_step()
        seconds.append(time.perf_counter() - t0)
        crossed.append(link_bytes() - b0)
    # the serial tail (the GPUs idle meanwhile): prior + scheduler step, in process
    batches = view_batches(len(views), args.batch)
    eps = reduce_predictions(((b, latents[:, :, :TILE, :TILE].expand(len(b), -1, -1, -1)) for b in batches), views,
                             latents.shape)
    weight = prior_weight(0, schedule.num_steps, schedule.prior_fraction, schedule.prior_schedule)
    alpha, sigma = noise_level(schedule.scheduler, start)

    def serial_tail():
        restart_scheduler()
        guided = inject_global_prior(eps, latents, schedule.prior, weight, alpha, sigma)
        schedule.scheduler.step(guided, timestep, latents)

    log(f"  {side}^2: {len(views)} views, {statistics.median(seconds):.3f} s/step, "
        f"{statistics.median(crossed) / 2**20:.1f} MiB on the link")
    return {"latent": side, "views": len(views), "batches": len(batches),
            "payload_bytes": 2 * len(views) * CHANNELS * TILE * TILE * 4,  # fp32 windows out + predictions back
            "link_bytes_median": statistics.median(crossed), "step_seconds_median": statistics.median(seconds),
            "step_seconds_all": seconds, "serial_tail_seconds": median_time(serial_tail, args.repeats)}


# ---------------------------------------------------------------------------------------------------------------
# the bench: the cluster, both layouts, the comparison and the extrapolation
# ---------------------------------------------------------------------------------------------------------------
def run_layout(cluster, name: str, args) -> dict:
    log(f"{name}: driver in the head's namespace ...")
    argv = [cluster.python, str(Path(__file__).resolve()), "--driver", "--cpus-per-actor", str(LAYOUTS[name]),
            "--sides", ",".join(map(str, args.sides)), "--batch", str(args.batch), "--repeats", str(args.repeats)]
    done = cluster.run(cluster.head, argv, timeout=DRIVER_TIMEOUT_S)
    sys.stderr.write(done.stderr[-2000:] if done.returncode else "".join(
        line + "\n" for line in done.stderr.splitlines() if line.startswith("  ")))
    if done.returncode != 0:
        raise SystemExit(f"{name}: the driver failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


def extrapolate(one: dict, two: dict) -> dict:
    """8K / 16K figures from the largest measured size (see the module docstring)."""
    big1, big2 = one["sizes"][-1], two["sizes"][-1]
    per_byte_s = max(big2["step_seconds_median"] - big1["step_seconds_median"], 0.0) / big2["link_bytes_median"]
    link_per_payload = big2["link_bytes_median"] / big2["payload_bytes"]
    tail_per_px = big1["serial_tail_seconds"] / big1["latent"] ** 2
    out = {"from_latent": big1["latent"], "driver_seconds_per_cross_node_GB": per_byte_s * 1e9,
           "link_bytes_per_payload_byte": link_per_payload, "sizes": []}
    for side, label in ((1024, "8K"), (2048, "16K")):
        views = ((side - TILE) // STRIDE + 1) ** 2
        link = 2 * views * CHANNELS * TILE * TILE * 4 * link_per_payload
        gpu_step_1 = views / H100_TILES_PER_S  # one H100; G of them: / G
        costs = {"serial_tail": tail_per_px * side**2, "driver_transfer_cost": per_byte_s * link,
                 **{f"link_{g}Gbit": link * 8 / (g * 1e9) for g in LINK_GBIT_S}}
        out["sizes"].append({
            "size": label, "latent": side, "views": views, "link_bytes_per_step": link,
            "modelled_step_seconds_1xH100": gpu_step_1, "seconds_per_step": costs,
            "fraction_of_step_per_H100": {k: v / gpu_step_1 for k, v in costs.items()},
            "gpus_at_3pct": {k: THRESHOLD * gpu_step_1 / v if v else None for k, v in costs.items()},
            "gpus_at_saturation": {k: gpu_step_1 / v if v else None for k, v in costs.items() if k != "serial_tail"},
        })
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sides", default="256,512,1024", help="square latent sides (1024 = 8K px), small first")
    parser.add_argument("--batch", type=int, default=4, help="views per call (the config's view_batch_size)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per size, after one warm-up")
    parser.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)  # one layout, in a namespace
    parser.add_argument("--cpus-per-actor", type=float, default=1.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.sides = [int(s) for s in args.sides.split(",")]
    if args.driver:
        print(json.dumps(drive(args)))
        return

    from cupscale_dist.testing import netns

    reason = netns.unavailable()
    if reason:
        raise SystemExit(f"bench/multinode.py: {reason}")
    started, load_before = time.perf_counter(), load_average()
    cluster = netns.Cluster(sys.executable, f"{ROOT}{os.pathsep}{ROOT / 'bench'}")
    try:
        cluster.add_node(2, "head")
        one = run_layout(cluster, "one_node", args)
        cluster.add_node(6, "b")  # logical CPUs: room for 2 x 3
        two = run_layout(cluster, "two_nodes", args)
    finally:
        cluster.close()
    import ray
    import torch

    steps = [{"latent": a["latent"], "views": a["views"], "batches": a["batches"], "payload_bytes": a["payload_bytes"],
              "link_bytes": {"one_node": a["link_bytes_median"], "two_nodes": b["link_bytes_median"]},
              "step_seconds": {"one_node": a["step_seconds_median"], "two_nodes": b["step_seconds_median"]},
              "two_nodes_vs_one": b["step_seconds_median"] / a["step_seconds_median"],
              "serial_tail_seconds": a["serial_tail_seconds"], "all_step_seconds": {"one_node": a["step_seconds_all"],
                                                                                 "two_nodes": b["step_seconds_all"]}}
             for a, b in zip(one["sizes"], two["sizes"])]
    print(json.dumps(rounded({
        "bench": "multinode", "command": " ".join(["python", "bench/multinode.py", *sys.argv[1:]]),
        "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
        "cpu_count": os.cpu_count(), "load_average_before": load_before, "load_average_after": load_average(),
        "layouts": {"one_node": f"head (2 CPUs) only; actors on the driver's node: {one['actors_on_the_drivers_node']}",
                    "two_nodes": f"+ a 6-CPU node; actors on the driver's node: {two['actors_on_the_drivers_node']}"},
        "tile": TILE, "stride": STRIDE, "view_batch_size": args.batch, "repeats": args.repeats,
        "per_step": steps, "extrapolated": extrapolate(one, two),
        "bench_seconds": time.perf_counter() - started,
    }), indent=1))


if __name__ == "__main__":
    main()
