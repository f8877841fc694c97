"""A simulated cluster: the driver-centred step vs the step on the actors, side by side, 1 .. N stand-in GPUs, 8K and
16K latents; a stated model for 64 and 128 GPUs. Prints one JSON object (the last line of stdout).

    python bench/scale_sim.py [--gpus 1,2,4,8,16,32,max] [--latent 1024,2048] [--models sdxl-cfg,sdxl-one-pass,flux]
                              [--steps 3] [--designs driver,actors] [--output bench/results/scale-sim-cpu.json]
    python bench/scale_sim.py --model-from bench/results/scale-sim-cpu.json   # the model again, no runs

What runs (issue 34, deliverable 1): the REAL driver code and the REAL actor shell, only the model replaced.
  * design ``driver``: ``pipeline.denoise_on_driver(RayExecutor, job)``: every window cut on the driver, sent to a
    ``PipelineWorker.call("predict")``, every prediction back, reduced, the Haar prior and the Euler step on the
    driver's whole latent (today's step_design='driver');
  * design ``actors``: ``PartLoop(RayTransport(pool), job).run()``, which is ``RayExecutor.denoise_on_owners(job)``:
    each actor owns a row band (``PipelineWorker.own`` -> ``PartOwner``), predicts its batches, blends, injects the
    prior and steps its band; halos and prediction rows move actor to actor by reference; the driver routes.
Both over one real ``WorkerPool`` of ``SleepWorker`` actors (a ``PipelineWorker`` subclass, like
bench/orchestrator.py's ``InstantWorker``, with no model loaded) whose ``predict`` sleeps for the modelled one-GPU
time of its call (views in the call x seconds per view) and returns ``0.5 * windows`` (float32, the right shape).
Each actor holds one Ray logical GPU (``ray.init(num_gpus=N)``; there are no GPUs here) and no CPU reservation, so N
of them fit on this 2-core machine; the pool is started once at the largest G and a case with G GPUs uses its first
G slots (``pool.count = G``; the others idle). Actors and driver pin 1 torch thread (``--threads``).

Per case: a real ``EulerDiscreteScheduler`` (SDXL's config, 30 timesteps, the stage's last ``--steps`` of them), the
Haar prior (J = 1) active at every step (``prior_fraction`` 1: the most expensive step), tile 128 / stride 64,
``view_batch_size`` 4, 4 channels, uniform blend, no jitter. Step time = the time between the loop's ``on_step``
callbacks (both designs call it after each step), median over the steps after the first. Rows:
  * ``efficiency`` = ideal GPU time per step (views x seconds per view / G) / measured step time;
  * ``gpu_busy_fraction``: the stand-ins' measured sleep seconds / (G x wall seconds) over the whole case (every
    step, the first and the stage's load and gather included, so a little under ``efficiency``);
    ``balance_ceiling``: what the split of view batches over the G GPUs allows at best (mean / max views per GPU);
  * ``driver_cpu_s_per_step``: ``time.process_time`` of the driver process per step (its Ray threads included);
  * ``driver_bytes_per_step``: driver: windows out + predictions back (array bytes, counted on the executor);
    actors: what the driver sends and receives per step through ``predict``/``reduce_step`` (arguments, statuses;
    references count as 28 bytes, plus any actor-to-actor message under Ray's 100 KiB inline limit, which the driver
    relays), and separately ``driver_stage_bytes`` (load scatter + gather + drop) and its share amortised over an
    18-step stage (the default preset: 30 steps, strength 0.6);
  * ``actor_bytes_per_step``: halo rows + prediction rows that cross workers (from ``StageLayout.halo`` /
    ``contributions`` and the array sizes), float32;
  * ``profile`` (actors): per worker and step, seconds in ``predict`` (of which the stand-in slept), in
    ``reduce_step``, from the calls' statuses;
  * ``load``: the load average before, the busy cores of the machine during the case and the part of them that was
    not this bench's process tree (``foreign_cores``); a case with foreign_cores > ``--foreign-limit`` is run again
    once while the time budget allows, and the quieter run is kept (both recorded).
Rates (one GPU, seconds per view): SDXL with CFG 1/28.4 (architecture.md's plateau of the bare batched UNet on one
H100; its batch-4 figure is 26.9 tiles/s, so 28.4 is slightly pessimistic for efficiency), SDXL one pass per view
1/56.8, FLUX.1-dev 0.171 (bench/results/gpu-h200.json: an H200 figure, 1024-px view, bare, 4 views per call).

``model``: not a measurement. For G = 64, 128 (and the measured G, to compare), per design and case, the step time
from stated parts: GPU time with the real batch split, the owners' elementwise work at H100 memory bandwidth,
halos and prediction rows over 25 Gb/s between nodes, and the Ray per-call costs measured here (see ``ASSUMPTIONS``).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import fields, is_dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout; the actors get ROOT through the job's runtime_env

import numpy as np  # noqa: E402
import torch  # noqa: E402

from actors.worker import PipelineWorker  # noqa: E402
from common import load_average, log, rounded  # noqa: E402  (bench/common.py)

MODELS = {  # seconds per view on one GPU, and where the figure comes from
    "sdxl-cfg": (1 / 28.4, ("SDXL UNet with CFG: 28.4 views/s on one H100 (architecture.md 'Performance anchors', "
                            "bare batched UNet; 26.9 at 4 per batch, so 28.4 is the pessimistic side)")),
    "sdxl-one-pass": (1 / 56.8, "SDXL UNet, one pass per view (no CFG): 56.8 views/s on one H100 (twice the CFG rate)"),
    "flux": (0.17097, ("FLUX.1-dev, 1024-px view, bare: 0.171 s on one H200 (bench/results/gpu-h200.json, "
                       "sections.flux.s_per_view.bare, 4 views per call); an H200 figure, not an H100 one")),
}
TILE, STRIDE, CHANNELS, BATCH, DWT_LEVELS = 128, 64, 4, 4, 1
STAGE_STEPS = 18  # the default preset's stage: 30 steps at strength 0.6 (what the per-stage bytes amortise over)
RAY_INLINE_BYTES = 100 * 1024  # Ray returns objects under this inline to their owner (the driver), which relays them
OBJECT_REF_BYTES = 28  # an ObjectID
MiB, GiB = 2**20, 2**30
DEFAULT_OUTPUT = "bench/results/scale-sim-cpu.json"
CASE_OPTIONS = ("gpus", "latent", "models", "designs", "steps", "max_step_s", "max_step_s_others")

ASSUMPTIONS = {
    "what": "a model, not a measurement: step time on G GPUs from the parts below; efficiency = ideal / modelled",
    "gpu": "per step the busiest GPU's views x seconds per view (the real static split of view batches for "
           "'actors'; an even split for 'driver', whose pool deals batches to the least busy actor)",
    "owner_elementwise": "actors: the slowest owner's bytes touched per step at H100 memory bandwidth 3.0e12 B/s "
                         "(cut windows: read+write 2 x window bytes; crop predictions into pieces: 2 x window bytes; "
                         "blend: per prediction piece read piece + read/write the sum and the weight, ~3.5 x piece "
                         "bytes; divide, Haar prior, Euler step, finite check: 16 passes over the band) plus kernel "
                         "launches at 5 us each (8 per view piece, 12 per batch, 60 per step); in series with the GPU "
                         "work (same stream)",
    "halos": "actors: the slowest worker's incoming halo rows and incoming prediction rows per step over 25 Gb/s "
             "(3.125e9 B/s), both on the critical path (predict waits for halos, reduce_step for prediction rows), "
             "as if every neighbour were on another node (pessimistic: bands of one 8-GPU node are neighbours)",
    "ray_calls": "actors: 2 calls per worker per step on the critical path, each costing a two-call dependency chain "
                 "between actors measured here; the driver submits 2 G calls and fetches 2 G statuses per step at the "
                 "driver CPU cost per call measured here, and the step cannot be shorter than that loop (it is "
                 "pipelined one step ahead, so it hides until it is longer)",
    "layout_queries": "actors: the StageLayout queries as the code makes them today, timed here in process (CPU of "
                      "this machine, not a GPU's): per step the driver's loop asks halo/contributions once per worker "
                      "and call (O(G^2 x views)), each owner asks contributions (O(views x parts)) and halo; the "
                      "owner's share sits on its critical path, the driver's in the driver loop. "
                      "'actors-cached-layout' is a what-if with both computed once per step",
    "driver_design": "driver: the step cannot be shorter than the driver's CPU per step measured here at the same "
                     "latent (cut, copy, reduce, prior, Euler step, Ray; the same for any G) nor than its bytes per "
                     "step over one 25 Gb/s link; the serial tail (prior + step, measured here with the driver CPU) "
                     "is added since the GPUs wait for it",
    "not_modelled": "GPU-side Ray object transfers inside one node (NVLink / shared memory: faster than the 25 Gb/s "
                    "used), stragglers, the VAE phases, checkpoints/snapshots (snapshot_every 0)",
}
H100_BYTES_PER_S = 3.0e12
LINK_BYTES_PER_S = 25e9 / 8
LAUNCH_S = 5e-6


# ---------------------------------------------------------------------------------------------------------------
# The stand-in GPU: the real actor shell around a model that sleeps
# ---------------------------------------------------------------------------------------------------------------
class SleepModel:
    """``ModelWorker.predict``'s contract: sleeps for the modelled one-GPU time of the call (``seconds_per_view``
    from the stage context x views in the call) and returns ``0.5 * windows`` (float32)."""

    device = "cpu (sleeping stand-in)"

    def __init__(self):
        self.slept = 0.0  # seconds actually slept (the "GPU busy" time, oversleep included)
        self.views = 0

    def predict(self, context, windows, timestep, input_scale, view_ids, rects, *control) -> np.ndarray:
        started = time.perf_counter()
        time.sleep(float(context["seconds_per_view"]) * len(windows))
        self.slept += time.perf_counter() - started
        self.views += len(windows)
        return np.asarray(windows, dtype=np.float32) * np.float32(0.5)


def _memory_kib(pid: int | str = "self") -> dict:
    """Resident, proportional and private set sizes (KiB) of a process (/proc/PID/smaps_rollup)."""
    out = {"rss": 0, "pss": 0, "private": 0}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("Rss", "Pss"):
                out[key.lower()] = int(value.split()[0])
            elif key in ("Private_Clean", "Private_Dirty"):
                out["private"] += int(value.split()[0])
    except OSError:
        pass
    return out


class SleepWorker(PipelineWorker):
    """The real actor shell (``call``, ``own`` -> ``PartOwner``, ``where``, the per-stage ``Shared`` fetch) around a
    SleepModel: loads no model. One torch thread, as the driver."""

    def __init__(self, load, index: int):
        torch.set_num_threads(1)
        self.index = index
        self.worker = SleepModel()
        self.shared = (None, None)
        self.owner = None

    def counters(self) -> dict:
        return {"index": self.index, "pid": os.getpid(), "cpu_s": time.process_time(), "slept_s": self.worker.slept,
                "views": self.worker.views, **_memory_kib()}

    def noop(self, *args) -> None:
        return None


def start_pool(count: int, threads: int):
    """A RayExecutor over a real WorkerPool of ``count`` SleepWorkers, one logical GPU each."""
    from cupscale_dist import UpscaleConfig
    from cupscale_dist.execution.pool import RayExecutor, WorkerPool
    from cupscale_dist.execution.raycluster import ClusterOptions
    from cupscale_dist.models.spec import ModelSpec

    spec = ModelSpec.load("demo")  # configs and tokenizer only: the pool needs a model name; no weights are loaded
    config = UpscaleConfig.load("cpu-demo", view_batch_size=BATCH, torch_threads=threads)
    options = ClusterOptions(actors=count, gpus_per_actor=1, cpus_per_actor=0, start_timeout_s=600)
    return RayExecutor(WorkerPool(config, options, spec, actor_class=SleepWorker), spec, BATCH)


# ---------------------------------------------------------------------------------------------------------------
# Counting what goes through the driver
# ---------------------------------------------------------------------------------------------------------------
def payload_bytes(value) -> int:
    """Bytes a value costs on the wire, roughly: arrays by their data, references by their id, the rest pickled."""
    import ray

    from cupscale_dist.execution.contract import Shared

    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (ray.ObjectRef, Shared)):
        return OBJECT_REF_BYTES
    if isinstance(value, dict):
        return sum(payload_bytes(k) + payload_bytes(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(payload_bytes(v) for v in value) + 2
    if is_dataclass(value) and not isinstance(value, type):
        return sum(payload_bytes(getattr(value, f.name)) for f in fields(value))
    try:
        return len(pickle.dumps(value))
    except Exception:  # an object holding references: its attributes
        return sum(payload_bytes(v) for v in vars(value).values())


class CountingExecutor:
    """The RayExecutor as ``denoise_on_driver`` sees it (``map``, ``batch_size``, ``spec``), counting the array bytes
    of the windows it sends and the predictions it gets back."""

    def __init__(self, inner):
        self.inner, self.batch_size, self.spec = inner, inner.batch_size, inner.spec
        self.sent = self.received = 0

    def map(self, method: str, calls):
        def counted():
            for args in calls:
                self.sent += args[1].nbytes
                yield args

        for result in self.inner.map(method, counted()):
            self.received += np.asarray(result).nbytes
            yield result


def counting_transport(pool):
    """RayTransport (the real one) counting, per PartOwner method, the bytes the driver sends (arguments) and
    receives (fetched values)."""
    from cupscale_dist.execution.pool import RayTransport

    class CountingTransport(RayTransport):
        def __init__(self, pool):
            super().__init__(pool)
            self.sent: dict[str, int] = defaultdict(int)
            self.received: dict[str, int] = defaultdict(int)
            self.calls: dict[str, int] = defaultdict(int)
            self.method_of: dict = {}

        def submit(self, worker, method, count, *args):
            self.sent[method] += payload_bytes((method, *args))
            self.calls[method] += 1
            refs = super().submit(worker, method, count, *args)
            for ref in refs:
                self.method_of[ref] = method
            return refs

        def fetch(self, refs):
            values = super().fetch(refs)
            for ref, value in zip(refs, values):
                self.received[self.method_of.pop(ref, "?")] += payload_bytes(value)
            return values

    return CountingTransport(pool)


# ---------------------------------------------------------------------------------------------------------------
# What a layout moves between actors, and how evenly it loads the GPUs
# ---------------------------------------------------------------------------------------------------------------
def layout_of(side: int, gpus: int):
    from cupscale_dist.method.parts import StageLayout
    from cupscale_dist.method.views import make_views

    views = make_views(side, side, TILE, STRIDE)
    return StageLayout.even(list(range(gpus)), views, (side, side), BATCH, 2**DWT_LEVELS)


def layout_traffic(layout, step: int = 1) -> dict:
    """Bytes between actors at ``step`` (float32): halo rows each reader gets, prediction rows each owner gets from
    other predictors; per message (source, reader) and per worker (in)."""
    width = layout.latent_hw[1]
    row_bytes = CHANNELS * width * 4
    halo = {pair: sum(hi - lo for _, lo, hi in moves) * row_bytes for pair, moves in layout.halo(step).items()}
    rects, shares = layout.rects(step), defaultdict(int)
    for batch, worker in zip(layout.batches, layout.batch_worker):
        for view in batch:
            top, left, bottom, right = (int(v) for v in rects[view])
            for part in layout.parts_in(top, bottom):
                owner = layout.owners[part]
                if owner != worker:
                    lo, hi = layout.rows(part)
                    shares[(int(worker), owner)] += (min(hi, bottom) - max(lo, top)) * (right - left) * CHANNELS * 4
    messages = list(halo.values()) + list(shares.values())
    halo_in, shares_in = defaultdict(int), defaultdict(int)
    for (_, dst), n in halo.items():
        halo_in[dst] += n
    for (_, dst), n in shares.items():
        shares_in[dst] += n
    return {"halo_bytes": sum(halo.values()), "prediction_rows_bytes": sum(shares.values()),
            "total_bytes": sum(messages), "messages": len(messages),
            "smallest_message_bytes": min(messages) if messages else 0,
            "inlined_via_driver_bytes": sum(n for n in messages if n < RAY_INLINE_BYTES),
            "max_halo_in_bytes": max(halo_in.values(), default=0),
            "max_prediction_rows_in_bytes": max(shares_in.values(), default=0)}


def views_per_worker(layout) -> list[int]:
    per = defaultdict(int)
    for batch, worker in zip(layout.batches, layout.batch_worker):
        per[int(worker)] += len(batch)
    return [per[w] for w in layout.workers]


def balance(counts: list[int], gpus: int) -> float:
    """Mean / max views per GPU (GPUs without work count as idle)."""
    return (sum(counts) / gpus) / max(counts)


def even_split(views: int, gpus: int) -> list[int]:
    """Views per GPU when batches of BATCH are dealt evenly (the driver design's pool)."""
    batches = [min(BATCH, views - i) for i in range(0, views, BATCH)]
    per = [0] * gpus
    for n in sorted(batches, reverse=True):
        per[min(range(gpus), key=per.__getitem__)] += n
    return per


# ---------------------------------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------------------------------
def make_job(side: int, steps: int, shared, seed: int, on_step):
    """A DenoiseJob as run_stage builds one: Euler (SDXL's config), the stage's last ``steps`` of 30 timesteps, the
    Haar prior active at every step."""
    from diffusers import EulerDiscreteScheduler

    from cupscale_dist.execution.partloop import DenoiseJob
    from cupscale_dist.method.prior import GlobalPrior
    from cupscale_dist.method.step import StageSchedule
    from cupscale_dist.method.views import make_views
    from cupscale_dist.testing.tiny import SCHEDULER_CONFIG

    g = torch.Generator().manual_seed(seed)
    z_low = torch.randn(1, CHANNELS, side, side, generator=g)
    noise = torch.randn(1, CHANNELS, side, side, generator=g)
    scheduler = EulerDiscreteScheduler(**SCHEDULER_CONFIG)
    scheduler.set_timesteps(30, device="cpu")
    start = 30 - steps
    scheduler.set_begin_index(start)
    prior = GlobalPrior.from_latent(z_low, noise, "haar", DWT_LEVELS)
    schedule = StageSchedule(scheduler, start, prior, "x0", 1.0, "cosine", seed=seed)
    latents = scheduler.add_noise(z_low, noise, scheduler.timesteps[start : start + 1])
    return DenoiseJob(latents=latents, schedule=schedule, views=make_views(side, side, TILE, STRIDE), context=shared,
                      control=None, first=0, jitter=0, seed=seed, stage=0, blend="uniform", sigma_fraction=0.3,
                      batch_size=BATCH, dwt_levels=DWT_LEVELS, vae_scale_factor=8, snapshot_every=0, on_step=on_step)


def cpu_times() -> tuple[int, int]:
    """(total, idle) jiffies of the host."""
    try:
        fields_ = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0, 0
    return sum(fields_), fields_[3] + fields_[4]


def descendants(root: int) -> list[int]:
    """``root`` and every process below it (the driver, Ray's GCS/raylet/agents, the actors)."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    children = defaultdict(list)
    for pid, ppid in parent.items():
        children[ppid].append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def tree_memory_kib(root: int) -> int:
    """PSS (KiB) of ``root``'s process tree: shared pages counted once in all."""
    return sum(_memory_kib(pid)["pss"] for pid in descendants(root))


def tree_cpu_jiffies(root: int) -> int:
    """CPU jiffies (user + system) of ``root`` and all its descendants (the driver, Ray's raylet/GCS, the actors)."""
    parent, used = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        rest = stat.rsplit(")", 1)[1].split()
        parent[int(entry)] = int(rest[1])
        used[int(entry)] = int(rest[11]) + int(rest[12])
    children = defaultdict(list)
    for pid, ppid in parent.items():
        children[ppid].append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += used.get(pid, 0)
        todo += children.get(pid, [])
    return total


class Meter:
    """Busy cores of the machine over an interval, and the part of them that was not this process tree."""

    def __init__(self):
        self.host, self.ours, self.t = cpu_times(), tree_cpu_jiffies(os.getpid()), time.perf_counter()

    def read(self) -> dict:
        host, ours = cpu_times(), tree_cpu_jiffies(os.getpid())
        wall = time.perf_counter() - self.t
        tick = os.sysconf("SC_CLK_TCK")
        busy = ((host[0] - self.host[0]) - (host[1] - self.host[1])) / tick / wall if wall > 0 else 0.0
        mine = (ours - self.ours) / tick / wall if wall > 0 else 0.0
        return {"busy_cores": busy, "bench_cores": mine, "foreign_cores": max(0.0, busy - mine), "wall_s": wall}


def wait_quiet(args, budget: dict) -> dict:
    """A short idle check before a case: up to ``--idle-wait`` s (and while the run's idle budget lasts) until the
    machine's other processes use under ``--foreign-limit`` cores over 1 s."""
    waited, reading = 0.0, None
    deadline = time.perf_counter() + min(args.idle_wait, budget["idle_s"])
    while True:
        meter = Meter()
        time.sleep(1.0)
        reading = meter.read()
        waited += reading["wall_s"]
        if reading["foreign_cores"] <= args.foreign_limit or time.perf_counter() >= deadline:
            break
    budget["idle_s"] = max(0.0, budget["idle_s"] - waited)
    return {"load_average": load_average(), "idle_check_s": waited, "foreign_cores_before": reading["foreign_cores"]}


def worker_counters(executor, gpus: int) -> list[dict]:
    import ray

    return ray.get([executor.pool.actors[i].counters.remote() for i in range(gpus)])


def run_case(executor, design: str, side: int, gpus: int, model: str, steps: int, seed: int) -> dict:
    """One design, one case: ``steps`` steps of the stage; times, bytes, the stand-ins' sleep and the statuses."""
    from cupscale_dist.execution.partloop import PartLoop
    from cupscale_dist.pipeline import denoise_on_driver

    seconds_per_view = MODELS[model][0]
    shared = executor.share({"seconds_per_view": seconds_per_view})
    marks = []  # (wall, driver cpu) after each step

    def on_step(done: int, gather) -> None:
        marks.append((time.perf_counter(), time.process_time()))

    job = make_job(side, steps, shared, seed, on_step)
    views = len(job.views)
    before = worker_counters(executor, gpus)
    meter = Meter()
    t0, c0 = time.perf_counter(), time.process_time()
    out: dict = {}
    if design == "driver":
        counting = CountingExecutor(executor)
        latents = denoise_on_driver(counting, job)
        out["driver_bytes_per_step"] = (counting.sent + counting.received) / steps
        out["driver_bytes_detail"] = {"windows_out_per_step": counting.sent / steps,
                                      "predictions_back_per_step": counting.received / steps}
    else:
        transport = counting_transport(executor.pool)
        loop = PartLoop(transport, job)
        latents = loop.run()
        step_calls = ("predict", "reduce_step")
        stage_calls = ("load", "gather", "drop")
        per_step = sum(transport.sent[m] + transport.received[m] for m in step_calls) / steps
        traffic = layout_traffic(loop.layout)
        stage_bytes = sum(transport.sent[m] + transport.received[m] for m in stage_calls)
        out["driver_bytes_per_step"] = per_step + traffic["inlined_via_driver_bytes"]
        out["driver_bytes_detail"] = {
            "calls_args_and_statuses_per_step": per_step,
            "inlined_actor_messages_per_step": traffic["inlined_via_driver_bytes"],
            "by_method": {m: {"sent": transport.sent[m], "received": transport.received[m], "calls": transport.calls[m]}
                          for m in sorted(transport.calls)},
        }
        out["driver_stage_bytes"] = stage_bytes
        out["driver_stage_bytes_per_step_amortised"] = stage_bytes / STAGE_STEPS
        out["actor_bytes_per_step"] = traffic["total_bytes"]
        out["actor_bytes_detail"] = traffic
        out["statuses"] = [s for s in loop.statuses if s["call"] in step_calls]
    wall = time.perf_counter() - t0
    load = meter.read()
    after = worker_counters(executor, gpus)
    assert bool(torch.isfinite(latents).all())
    times = [t for t, _ in marks]
    cpus = [c for _, c in marks]
    step_s = np.diff([t0, *times])
    step_cpu = np.diff([c0, *cpus])
    measured = step_s[1:] if len(step_s) > 1 else step_s
    measured_wall = float(times[-1] - times[0]) if len(times) > 1 else float(step_s[0])
    step = float(statistics.median(measured))
    ideal = views * seconds_per_view / gpus
    slept = [a["slept_s"] - b["slept_s"] for a, b in zip(after, before)]
    cpu_actors = [a["cpu_s"] - b["cpu_s"] for a, b in zip(after, before)]
    out.update({
        "step_seconds": step, "step_seconds_all": step_s.tolist(), "ideal_step_seconds": ideal,
        "efficiency": ideal / step,
        "driver_cpu_s_per_step": float(statistics.median(step_cpu[1:] if len(step_cpu) > 1 else step_cpu)),
        "driver_cpu_s_all": step_cpu.tolist(),
        # the stand-ins slept over the whole run (every step): busy = slept / (G x the run's wall)
        "gpu_busy_fraction": sum(slept) / (gpus * wall),
        "gpu_busy_fraction_per_gpu": {"min": min(slept) / wall, "max": max(slept) / wall},
        "actor_cpu_s_per_step": sum(cpu_actors) / steps,
        "slept_per_worker_per_step": [v / steps for v in slept],
        "run_seconds": wall, "measured_steps": len(measured), "measured_wall_s": measured_wall,
        "load": load,
    })
    return out


def profile_actors(statuses: list[dict], slept: list[float], steps: int, step_s: float) -> dict:
    """Where a step's time goes on the workers (steps after the first, from the calls' statuses): seconds per step
    in ``predict`` (of which the stand-in slept: the "GPU"), and in ``reduce_step`` (blend, prior, Euler step, halos
    cut), mean / max over workers; ``critical_path_s`` = the slowest worker's predict + the slowest reduce_step (a
    worker's reduce_step waits for its neighbours' predictions, its next predict for their halos);
    ``waiting_s`` = the step less that (Ray, the driver, transfers, CPU contention between the calls)."""
    later = [s for s in statuses if s["step"] >= 1]
    by = defaultdict(lambda: defaultdict(float))
    for s in later:
        by[s["call"]][s["slot"]] += s["seconds"]
    n = max(1, steps - 1)
    out = {}
    for call, slots in by.items():
        values = [v / n for v in slots.values()]
        out[call] = {"mean_s": statistics.mean(values), "max_s": max(values), "min_s": min(values)}
    out["stand_in_sleep"] = {"mean_s": statistics.mean(slept), "max_s": max(slept), "min_s": min(slept),
                             "note": "per step over all steps (first included)"}
    if "predict" in out:
        out["predict_host_mean_s"] = max(0.0, out["predict"]["mean_s"] - out["stand_in_sleep"]["mean_s"])
        critical = out["predict"]["max_s"] + out.get("reduce_step", {}).get("max_s", 0.0)
        out["critical_path_s"] = critical
        out["waiting_s"] = step_s - critical
    return out


# ---------------------------------------------------------------------------------------------------------------
# Ray's per-call costs, measured here
# ---------------------------------------------------------------------------------------------------------------
def ray_call_costs(executor, gpus: int, repeats: int = 200) -> dict:
    import ray

    actors = executor.pool.actors[:gpus]
    ray.get([a.noop.remote() for a in actors])
    latency = []
    for k in range(repeats // 4):
        t0 = time.perf_counter()
        ray.get(actors[k % len(actors)].noop.remote())
        latency.append(time.perf_counter() - t0)
    c0, t0 = time.process_time(), time.perf_counter()
    refs = [actors[k % len(actors)].own.options(num_returns=1).remote("drop", None) for k in range(repeats)]
    submit_cpu = (time.process_time() - c0) / repeats
    ray.get(refs)
    total = (time.perf_counter() - t0) / repeats
    call_cpu = (time.process_time() - c0) / repeats  # the driver's CPU per call: submit + fetch
    # a chained dependency: an actor call that takes another actor's result (what predict / reduce_step do)
    chain = []
    for _ in range(repeats // 8):
        t0 = time.perf_counter()
        first = actors[0].noop.remote()
        ray.get(actors[-1].noop.remote(first))
        chain.append(time.perf_counter() - t0)
    return {"noop_round_trip_s": statistics.median(latency), "driver_cpu_per_submit_s": submit_cpu,
            "driver_cpu_per_call_s": call_cpu, "pipelined_s_per_call": total,
            "two_call_chain_s": statistics.median(chain), "actors": gpus}


# ---------------------------------------------------------------------------------------------------------------
# The model for G beyond this machine
# ---------------------------------------------------------------------------------------------------------------
def owner_bytes_touched(layout, worker: int) -> tuple[float, int]:
    """(bytes touched, kernel launches) of one owner's elementwise work per step (ASSUMPTIONS owner_elementwise)."""
    width = layout.latent_hw[1]
    window = CHANNELS * TILE * TILE * 4
    batches = layout.batches_of(worker)
    nviews = sum(len(b) for b in batches)
    rows = sum(layout.rows(p)[1] - layout.rows(p)[0] for p in layout.parts_of(worker))
    band = rows * width * CHANNELS * 4
    # prediction pieces that land on this worker's bands: every view covering its rows
    rects = layout.rects(1)
    pieces, piece_bytes = 0, 0
    for part in layout.parts_of(worker):
        lo, hi = layout.rows(part)
        for t, l, b, r in rects:
            if t < hi and lo < b:
                pieces += 1
                piece_bytes += (min(hi, b) - max(lo, t)) * (r - l) * CHANNELS * 4
    touched = 4 * nviews * window + 3.5 * piece_bytes + 16 * band
    launches = 8 * pieces + 12 * len(batches) + 60
    return touched, launches


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def layout_costs(side: int, gpus: int, repeats: int) -> dict:
    """CPU seconds per step of the layout queries, measured here, in process: what ``PartLoop._run_from`` asks the
    StageLayout per step on the driver (``halo`` and ``contributions`` once per worker and call), what one
    ``PartOwner`` asks per step (``rects``, ``reach``, ``batches_of``, ``parts_in`` per view, ``contributions`` in
    predict, ``halo`` in reduce_step's ``_halos``), and one ``contributions`` + ``halo`` (what a per-step cache
    costs)."""
    layout, step = layout_of(side, gpus), 1

    def driver():
        for worker in layout.workers:
            sorted(src for src, dst in layout.halo(step) if dst == worker)
            sorted(dst for src, dst in layout.contributions(step) if src == worker)
        nxt = layout.halo(step + 1)
        for worker in layout.workers:
            sorted(src for src, dst in layout.contributions(step) if dst == worker)
            sorted(dst for src, dst in nxt if src == worker)

    def worker():
        w = layout.workers[len(layout.workers) // 2]
        rects = layout.rects(step)
        layout.reach(w, rects)
        for batch in layout.batches_of(w):
            for view in batch:
                layout.parts_in(int(rects[view, 0]), int(rects[view, 2]))
        sorted(o for src, o in layout.contributions(step) if src == w)
        layout.halo(step + 1)

    def once():
        layout.contributions(step)
        layout.halo(step + 1)

    return {"driver_layout_s": median_time(driver, repeats), "worker_layout_s": median_time(worker, repeats),
            "once_s": median_time(once, repeats)}


def model_rows(measured: list[dict], costs: dict, sides: list[int], models: list[str], gpu_list: list[int]) -> list:
    rows = []
    for side in sides:
        driver_rows = [r for r in measured if r["design"] == "driver" and r["latent"] == side]
        # the driver's CPU per step at this latent (the most G measured: every view still passes through it)
        driver_cpu = max((r["driver_cpu_s_per_step"] for r in driver_rows), default=None)
        serial = next((r["serial_tail_s"] for r in driver_rows), 0.0)
        for gpus in gpu_list:
            layout = layout_of(side, gpus)
            traffic = layout_traffic(layout)
            counts = views_per_worker(layout)
            views = sum(counts)
            owner = max(owner_bytes_touched(layout, w) for w in layout.workers)
            owner_s = owner[0] / H100_BYTES_PER_S + owner[1] * LAUNCH_S
            link_s = (traffic["max_halo_in_bytes"] + traffic["max_prediction_rows_in_bytes"]) / LINK_BYTES_PER_S
            calls_s = 2 * costs["two_call_chain_s"]
            # the driver's CPU per call: submit + fetch its status (older results: twice the submit's)
            per_call = costs.get("driver_cpu_per_call_s", 2 * costs["driver_cpu_per_submit_s"])
            ray_loop_s = 2 * gpus * per_call
            queries = layout_costs(side, gpus, 3 if gpus <= 32 else 1)
            log(f"model G={gpus} {side}: layout queries per step, driver {queries['driver_layout_s']:.3f} s, "
                f"one worker {queries['worker_layout_s']:.3f} s")
            driver_bytes = 2 * views * CHANNELS * TILE * TILE * 4
            for model in models:
                spv = MODELS[model][0]
                ideal = views * spv / gpus
                gpu_s = max(counts) * spv
                variants = {"actors": (queries["worker_layout_s"], queries["driver_layout_s"]),
                            # what-if: the layout's halo/contributions computed once per step and shared
                            "actors-cached-layout": (queries["once_s"], queries["once_s"])}
                for design, (worker_q, driver_q) in variants.items():
                    critical = gpu_s + owner_s + worker_q + link_s + calls_s
                    loop = driver_q + ray_loop_s
                    step = max(critical, loop)
                    rows.append({"gpus": gpus, "latent": side, "design": design, "model": model,
                                 "efficiency": ideal / step, "step_seconds": step, "ideal_step_seconds": ideal,
                                 "bound_by": "driver loop" if loop > critical else "owners' critical path",
                                 "parts_s": {"gpu": gpu_s, "owner_elementwise": owner_s, "worker_layout": worker_q,
                                             "halo_and_rows_link": link_s, "ray_calls_critical_path": calls_s,
                                             "driver_layout": driver_q, "driver_ray_calls": ray_loop_s},
                                 "balance_ceiling": balance(counts, gpus)})
                if driver_cpu is not None:
                    even = even_split(views, gpus)
                    gpu_d = max(even) * spv
                    step_d = max(gpu_d, driver_cpu, driver_bytes / LINK_BYTES_PER_S) + serial
                    rows.append({"gpus": gpus, "latent": side, "design": "driver", "model": model,
                                 "efficiency": ideal / step_d, "step_seconds": step_d, "ideal_step_seconds": ideal,
                                 "parts_s": {"gpu": gpu_d, "driver_cpu": driver_cpu,
                                             "driver_link": driver_bytes / LINK_BYTES_PER_S, "serial_tail": serial},
                                 "balance_ceiling": balance(even, gpus)})
    return rows


def serial_tail_seconds(side: int, seed: int, repeats: int = 3) -> float:
    """The driver design's serial tail at one latent, in process: the Haar prior + the Euler step on the whole
    latent (the GPUs wait for it)."""
    from cupscale_dist.method.step import prior_and_step

    times = []
    for _ in range(repeats):
        job = make_job(side, 3, None, seed, None)
        job.schedule.input_scale(0)  # the pipeline scales the model input before stepping (diffusers checks)
        eps = torch.randn_like(job.latents)
        t0 = time.perf_counter()
        prior_and_step(job.latents, eps, job.schedule, 0)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------
def code_version() -> dict:
    """The checkout's commit and whether the step's code differs from it (others edit the tree meanwhile)."""
    import subprocess

    def git(*argv: str) -> str:
        try:
            return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    step_code = ["cupscale_dist/method/parts.py", "cupscale_dist/execution/partowner.py",
                 "cupscale_dist/execution/partloop.py", "cupscale_dist/execution/pool.py", "actors/worker.py",
                 "cupscale_dist/pipeline.py", "cupscale_dist/method/step.py"]
    return {"git_head": git("rev-parse", "--short", "HEAD"),
            "step_code_modified": git("status", "--porcelain", "--", *step_code).splitlines()}


def parse_gpus(text: str, fit: int | None) -> list[int]:
    out = []
    for item in text.split(","):
        item = item.strip()
        if item == "max":
            if fit is not None:
                out.append(fit)
        elif item:
            out.append(int(item))
    return sorted(set(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", default="1,2,4,8,16,32,max",
                        help="stand-in GPU counts; 'max' = as many actors as --memory-gib holds (measured)")
    parser.add_argument("--latent", default="1024,2048", help="square latent sides (1024 = 8K px, 2048 = 16K px)")
    parser.add_argument("--models", default="sdxl-cfg,sdxl-one-pass,flux", help=",".join(MODELS))
    parser.add_argument("--designs", default="driver,actors")
    parser.add_argument("--steps", type=int, default=3, help="steps per case (the first is not measured)")
    parser.add_argument("--long-step-s", type=float, default=12.0,
                        help="cases whose ideal step is longer run 2 steps (1 measured), to fit the time budget")
    parser.add_argument("--max-step-s", type=float, default=36.0,
                        help="skip sdxl-cfg cases whose ideal step is longer")
    parser.add_argument("--max-step-s-others", type=float, default=10.0,
                        help="skip sdxl-one-pass and flux cases whose ideal step is longer (the default run's budget: "
                             "one pass 16K from 2 GPUs, FLUX 8K from 4, 16K from 20)")
    parser.add_argument("--memory-gib", type=float, default=10.0, help="memory the bench may use in all")
    parser.add_argument("--max-actors", type=int, default=64, help="'max' never above this")
    parser.add_argument("--model-gpus", default="64,128", help="G for the model beyond this machine")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the driver and of every actor")
    parser.add_argument("--idle-wait", type=float, default=10.0, help="seconds a case waits at most for quiet")
    parser.add_argument("--idle-budget", type=float, default=120.0, help="seconds the whole run waits at most")
    parser.add_argument("--foreign-limit", type=float, default=1.0,
                        help="other processes' busy cores above which a case counts as loaded (repeated once)")
    parser.add_argument("--budget-s", type=float, default=1380.0,
                        help="a loaded case is repeated only if the cases left still fit in this many seconds")
    parser.add_argument("--object-store-gib", type=float, default=1.0, help="Ray object store (shared memory)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-from", default=None, metavar="JSON",
                        help="no runs: recompute the model section from a previous result's rows and Ray costs")
    parser.add_argument("--output", default=None,
                        help=f"also write the JSON here (the default run writes {DEFAULT_OUTPUT})")
    args = parser.parse_args()
    if args.output is None and all(getattr(args, k) == parser.get_default(k) for k in CASE_OPTIONS):
        args.output = str(ROOT / DEFAULT_OUTPUT)
    started = time.perf_counter()
    sides = [int(s) for s in args.latent.split(",")]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    designs = [d.strip() for d in args.designs.split(",") if d.strip()]
    for m in models:
        if m not in MODELS:
            raise SystemExit(f"--models: {m!r} is not one of {', '.join(MODELS)}")
    for d in designs:
        if d not in ("driver", "actors"):
            raise SystemExit(f"--designs: {d!r} is not driver or actors")

    torch.set_num_threads(args.threads)
    if args.model_from:
        remodel(args)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import ray

    from cupscale_dist.execution.raycluster import start_local

    requested = parse_gpus(args.gpus, None)
    wants_max = "max" in args.gpus
    ceiling = max(requested + ([args.max_actors] if wants_max else []))
    ray_tmp = tempfile.mkdtemp(prefix="rs-", dir="/tmp")  # short path (Unix socket limit), own session dir
    python_path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    out: dict = {"bench": "scale_sim", "command": " ".join(["python", "bench/scale_sim.py", *sys.argv[1:]]),
                 "torch": torch.__version__, "ray": ray.__version__, "python": platform.python_version(),
                 "cpu_count": os.cpu_count(), "torch_threads": args.threads, "load_average_before": load_average(),
                 "code": code_version(),
                 "models": {m: {"seconds_per_view": MODELS[m][0], "source": MODELS[m][1]} for m in models},
                 "geometry": {"tile": TILE, "stride": STRIDE, "channels": CHANNELS, "view_batch_size": BATCH,
                              "dwt_levels": DWT_LEVELS, "scheduler": "EulerDiscreteScheduler (SDXL config), 30 "
                              "timesteps, the stage's last --steps", "prior": "haar, active at every step",
                              "blend": "uniform", "jitter": 0}}
    start_local(num_cpus=2, num_gpus=ceiling, _temp_dir=ray_tmp, log_to_driver=False,
                object_store_memory=int(args.object_store_gib * GiB),
                runtime_env={"env_vars": {"PYTHONPATH": python_path, "OMP_NUM_THREADS": str(args.threads)}})
    executor = None
    try:
        # 1. How many actors fit: start 2, measure what they and everything else take, then the pool at the
        #    largest G that fits the budget (each actor's private memory x G + the rest once).
        log("measuring the memory of 2 stand-in actors ...")
        probe = start_pool(2, args.threads)
        ray.get([a.own.options(num_returns=1).remote("drop", None) for a in probe.pool.actors])  # PartOwner imported
        mem = worker_counters(probe, 2)
        actor_private = max(m["private"] for m in mem) * 1024
        tree = tree_memory_kib(os.getpid()) * 1024  # driver, Ray's processes, the 2 actors (shared pages once)
        probe.release()
        rest = tree - 2 * actor_private
        data = 0.3 * GiB  # latents, prior bands, halos, windows in flight (16K: a 64 MiB latent)
        fit = int(min(args.max_actors, (args.memory_gib * GiB - rest - args.object_store_gib * GiB - data)
                      // actor_private))
        gpu_list = parse_gpus(args.gpus, fit if wants_max else None)
        skipped = [g for g in gpu_list if g > fit]
        gpu_list = [g for g in gpu_list if g <= fit]
        out["memory"] = {"actor_private_bytes": actor_private, "actor_pss_bytes": max(m["pss"] for m in mem) * 1024,
                         "actor_rss_bytes": max(m["rss"] for m in mem) * 1024, "rest_pss_bytes": rest,
                         "budget_gib": args.memory_gib, "object_store_gib": args.object_store_gib,
                         "actors_that_fit": fit, "skipped_gpu_counts": skipped,
                         "note": "fit = (budget - the rest (driver, Ray's processes, shared pages: PSS of the process "
                                 "tree less the actors' private memory) - object store - 0.3 GiB of data) / one "
                                 "actor's private memory (Private_Clean + Private_Dirty after its first PartOwner "
                                 "call: the shell imports cupscale_dist with torch, diffusers, transformers)"}
        log(f"one actor: {actor_private / MiB:.0f} MiB private (PSS {out['memory']['actor_pss_bytes'] / MiB:.0f}); "
            f"the rest {rest / MiB:.0f} MiB; {fit} actors fit in {args.memory_gib:g} GiB; G = {gpu_list}"
            + (f"; skipped {skipped}: they do not fit" if skipped else ""))
        top = max(gpu_list)
        log(f"starting {top} stand-in actors ...")
        t0 = time.perf_counter()
        executor = start_pool(top, args.threads)
        out["pool_start_s"] = time.perf_counter() - t0
        full = worker_counters(executor, top)
        out["memory"]["pool_pss_bytes"] = sum(m["pss"] for m in full) * 1024
        out["memory"]["pool_rss_bytes"] = sum(m["rss"] for m in full) * 1024
        log(f"pool of {top} up in {out['pool_start_s']:.0f} s, PSS {out['memory']['pool_pss_bytes'] / GiB:.2f} GiB")

        # 2. Ray's per-call costs here, and the driver design's serial tail.
        costs = {}
        for g in sorted({min(2, top), top}):
            executor.pool.count = g
            costs[g] = ray_call_costs(executor, g)
        executor.pool.count = top
        out["ray_call_costs"] = costs
        tails = {side: serial_tail_seconds(side, args.seed) for side in sides}
        out["driver_serial_tail_s"] = tails
        log(f"ray costs: {json.dumps(rounded(costs, 3))}; serial tail {rounded(tails, 3)}")

        # 3. The cases: per G (one sub-pool), latent, model; the designs alternate their order.
        plan = []
        for gpus in gpu_list:
            for side in sides:
                for model in models:
                    ideal = len(layout_of(side, 1).views) * MODELS[model][0] / gpus
                    cap = args.max_step_s if model == "sdxl-cfg" else args.max_step_s_others
                    if ideal > cap:
                        log(f"skip G={gpus} {side} {model}: ideal step {ideal:.1f} s > {cap:g} s")
                        out.setdefault("skipped_cases", []).append({"gpus": gpus, "latent": side, "model": model,
                                                                    "ideal_step_seconds": ideal})
                        continue
                    steps = args.steps if ideal <= args.long_step_s else min(args.steps, 2)
                    plan.append((gpus, side, model, steps, ideal))
        estimate = lambda cases: sum(len(designs) * (1.3 * c[3] * c[4] + 4.0) for c in cases)  # noqa: E731
        log(f"{len(plan)} cases x {len(designs)} designs, about {estimate(plan) / 60:.0f} min without repeats")
        rows, budget = [], {"idle_s": args.idle_budget}
        for number, (gpus, side, model, steps, ideal) in enumerate(plan):
            executor.pool.count = gpus  # the first G slots take calls (RayTransport.workers, WorkerPool.map)
            order = designs if number % 2 == 0 else list(reversed(designs))
            for design in order:
                left = args.budget_s - (time.perf_counter() - started) - estimate(plan[number + 1 :])
                rows.append(measure(executor, args, design, side, gpus, model, steps, tails, budget,
                                    repeat_allowed=left > 1.3 * steps * ideal + 4.0))
        out["rows"] = rows
        out["summary"] = summary(rows)
        out["targets_actors_16k_sdxl_cfg"] = targets(rows)

        # 4. The model beyond this machine.
        model_gpus = sorted(set(gpu_list + [int(g) for g in args.model_gpus.split(",") if g]))
        large_costs = costs[max(costs)]
        out["model"] = {"assumptions": ASSUMPTIONS, "ray_costs_used": large_costs,
                        "rows": model_rows(rows, large_costs, sides, models, model_gpus)}
    finally:
        if executor is not None:
            executor.pool.count = len(executor.pool.actors)
            executor.release()
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    out["load_average_after"] = load_average()
    out["bench_seconds"] = time.perf_counter() - started
    text = json.dumps(rounded(out))
    if args.output:
        Path(args.output).write_text(json.dumps(rounded(out), indent=1) + "\n")
    print(text)


def remodel(args) -> None:
    """``--model-from``: the model section again from a result file's measured rows and Ray costs (no Ray)."""
    text = Path(args.model_from).read_text().strip().splitlines()
    out = json.loads(text[-1]) if len(text) > 1 and text[-1].startswith("{") else json.loads("\n".join(text))
    rows, costs = out["rows"], out["ray_call_costs"]
    large = costs[max(costs, key=int)]
    sides = sorted({r["latent"] for r in rows})
    models = list(dict.fromkeys(r["model"] for r in rows))
    measured_gpus = sorted({r["gpus"] for r in rows})
    model_gpus = sorted(set(measured_gpus + [int(g) for g in args.model_gpus.split(",") if g]))
    out["model"] = {"assumptions": ASSUMPTIONS, "ray_costs_used": large,
                    "rows": model_rows(rows, large, sides, models, model_gpus),
                    "recomputed": f"--model-from {args.model_from} at load {load_average()}", "code": code_version()}
    if args.output:
        Path(args.output).write_text(json.dumps(rounded(out), indent=1) + "\n")
    print(json.dumps(rounded(out)))


def measure(executor, args, design, side, gpus, model, steps, tails, budget, repeat_allowed: bool) -> dict:
    """One row; a case run while other processes loaded the machine is repeated once (time permitting)."""
    runs = []
    for attempt in range(2):
        quiet = wait_quiet(args, budget)
        result = run_case(executor, design, side, gpus, model, steps, args.seed + attempt)
        result["load"].update(quiet)
        runs.append(result)
        log(f"G={gpus:3d} {side} {model:14s} {design:7s} step {result['step_seconds']:7.3f} s "
            f"(ideal {result['ideal_step_seconds']:.3f}) eff {result['efficiency']:.3f} "
            f"driver cpu {result['driver_cpu_s_per_step']:.3f} s, {result['driver_bytes_per_step'] / MiB:.1f} MiB; "
            f"foreign {result['load']['foreign_cores']:.2f} cores")
        loaded = result["load"]["foreign_cores"] > args.foreign_limit
        if not loaded or not repeat_allowed:
            break
        log("  loaded by other processes: once more")
    best = min(runs, key=lambda r: r["load"]["foreign_cores"])
    layout = layout_of(side, gpus)
    counts = views_per_worker(layout) if design == "actors" else even_split(len(layout.views), gpus)
    row = {"gpus": gpus, "latent": side, "design": design, "model": model, "efficiency": best["efficiency"],
           "steps": steps, "balance_ceiling": balance(counts, gpus), **{k: v for k, v in best.items()
                                                                          if k not in ("efficiency", "statuses")}}
    if design == "driver":
        row["serial_tail_s"] = tails[side]
    else:
        row["profile"] = profile_actors(best["statuses"], best["slept_per_worker_per_step"], steps,
                                        best["step_seconds"])
    if len(runs) > 1:
        row["other_runs"] = [{"efficiency": r["efficiency"], "step_seconds": r["step_seconds"], "load": r["load"]}
                             for r in runs if r is not best]
    return row


def summary(rows: list[dict]) -> list[dict]:
    """One line per case: both designs' efficiency and driver bytes per step side by side."""
    cases = defaultdict(dict)
    for row in rows:
        key = (row["model"], row["latent"], row["gpus"])
        cases[key][row["design"]] = row
    out = []
    for (model, side, gpus), designs in cases.items():
        line = {"model": model, "latent": side, "gpus": gpus}
        for design, row in designs.items():
            line[design] = row["efficiency"]
            line[f"{design}_driver_MiB_per_step"] = row["driver_bytes_per_step"] / MiB
            line[f"{design}_foreign_cores"] = row["load"]["foreign_cores"]
        out.append(line)
    return out


def targets(rows: list[dict]) -> dict:
    wanted = {("sdxl-cfg", 1): 0.95, ("sdxl-cfg", 8): 0.90, ("sdxl-cfg", 16): 0.85, ("sdxl-one-pass", 8): 0.85}
    out = {}
    for (model, gpus), target in wanted.items():
        for row in rows:
            if row["design"] == "actors" and row["latent"] == 2048 and row["model"] == model and row["gpus"] == gpus:
                out[f"{model} G={gpus}"] = {"target": target, "measured": row["efficiency"],
                                            "met": row["efficiency"] >= target}
    return out


if __name__ == "__main__":
    main()
