"""The Ray driver: every forward pass on a pool of model-worker actors, fanned out and gathered in a fixed order.

The driver runs the very same :func:`cupscale_dist.pipeline.upscale` as the single-process reference; only the
executor differs (:class:`RayExecutor` instead of ``executor.LocalExecutor``). It holds no weights — configs and
the tokenizer only (:class:`cupscale_dist.models.spec.ModelSpec`) — and owns the one scheduler, the full latent and the
8-bit image bands. Each actor (``actors/worker.py``) holds the whole pipeline on its GPU share and answers the
same calls a local ``ModelWorker`` does: view predictions, VAE tiles, prompt chunks, the attention probe.

Why one pool for every kind of call (not a VAE pool beside a UNet pool): SDXL's modules together are ~7 GB in
bf16, small beside a GPU; one pool has one resource shape, one restart policy, and keeps every GPU busy in every
phase of a stage (encode, probe, denoise, decode) instead of idling one pool while the other works.

Why the bytes do not depend on the actor count: calls are fixed units (one view batch of ``view_batch_size``, one
VAE tile, one prompt chunk), their results are consumed strictly in call order, noise is drawn on the driver once
per stage, and CPU actors use the driver's torch thread count.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator

import torch

from ..config import UpscaleConfig
from ..errors import UserError
from ..models.addons import Addons, addon_request
from ..models.backbones import backbone_class
from ..models.spec import ModelSpec
from ..models.weights import parameters_of, worker_memory_gb
from .actorgroup import HEALTH_POLL_S, ActorGroup, NotPlaced, NotReady
from .contract import Shared, WorkerLoad
from .placement import memory_fraction, model_worker_share, worker_count
from .raycluster import ClusterOptions, connect, root_cause

log = logging.getLogger(__name__)

MAX_TASKS_IN_FLIGHT_PER_ACTOR = 2  # one call computing + one queued hides the driver's round trip per call
ACTOR_RESTARTS = 3  # Ray restarts a dead worker this often (and retries its call) before we replace it
MAX_CALL_ATTEMPTS = 4  # a call whose worker is lost is re-issued on another; losing this many is not bad luck
# Loading SDXL from a cold disk (or fetching it on a node without the shared cache) takes minutes; a pool not up
# after this is stuck, not slow. Placement has its own, shorter limit (--start-timeout).
MODEL_LOAD_TIMEOUT_S = 900.0


class WorkerPool:
    """N model-worker actors; the policy (placement, in-flight caps, ordered fan-out, replacement) lives here."""

    def __init__(self, config: UpscaleConfig, options: ClusterOptions, spec: ModelSpec, actor_class=None,
                 addons: Addons | None = None):
        addons = Addons.from_config(config, spec) if addons is None else addons  # checked before any actor starts
        self.addons, self.spec, self.built_for = addons, spec, addon_request(config)
        self.weights = (config.weights, config.compile)
        ray = connect(options)
        from actors.worker import PipelineWorker

        gpus = ray.cluster_resources().get("GPU", 0)
        self.num_gpus = model_worker_share(config, options.gpus_per_actor, gpus, spread_over=gpus)  # per actor
        self.num_cpus = options.cpus_per_actor
        self.count = worker_count(gpus, self.num_gpus, options.actors)
        self.start_timeout_s = options.start_timeout_s  # the captioner pool is placed under the same limit
        device = config.device if config.device != "auto" else ("cuda" if self.num_gpus else "cpu")
        device = "cuda" if device.startswith("cuda") else device  # Ray shows each actor only its own GPU(s)
        # CPU bits depend on the thread count: actors use the driver's, so --actors N gives the reference's bytes.
        threads = config.torch_threads or (torch.get_num_threads() if device == "cpu" else None)
        fraction = memory_fraction(self.num_gpus) if device == "cuda" else None
        # Each weights mode's footprint: the GPU share must hold the device part (checked on the actor, which knows
        # its GPU's size), the node's memory the host part (a Ray `memory` reservation).
        device_gb, host_gb = worker_memory_gb(parameters_of(spec.path), config.weights, config.dtype, device,
                                              backbone_class(spec.family))
        self.load = WorkerLoad(model_dir=spec.path, model=spec.name, device=device, dtype=config.dtype,
                               variant=config.variant, torch_threads=threads, memory_fraction=fraction, addons=addons,
                               model_config=spec.model_config, weights=config.weights, compile=config.compile,
                               device_gb=device_gb)
        # benches pass a stand-in subclass as actor_class
        self.group = ActorGroup(actor_class or PipelineWorker, self.count, num_cpus=self.num_cpus,
                                num_gpus=self.num_gpus, placement_timeout_s=options.start_timeout_s,
                                what="model workers", hint="use fewer --actors or a smaller --gpus-per-actor/"
                                "--cpus-per-actor (or captioner_gpus), or weights=fp8 for less memory",
                                memory_bytes=int(host_gb * 1e9), max_restarts=ACTOR_RESTARTS,
                                max_task_retries=ACTOR_RESTARTS)
        self.actors = self.group.actors  # live actors, by slot
        for index in range(self.count):
            self._start(index)
        self.in_flight = [0] * self.count  # calls submitted and not yet collected, per slot
        self.live = [True] * self.count  # slots whose actor takes calls (False: lost, a replacement loading)
        self.lost: list[str] = []  # what was lost, in order ("node 10.0.0.3 (ab12...)", or why), for the stop line
        self._wait_loaded()

    def _start(self, index: int):
        """One actor in its reserved bundle (a replacement takes the same bundle)."""
        return self.group.start(index, self.load, index)

    def _wait_loaded(self) -> None:
        import ray

        try:
            for where in self.group.wait_ready("where", MODEL_LOAD_TIMEOUT_S, self.start_timeout_s):
                log.info("worker %(index)s on node %(node)s pid %(pid)s gpus %(gpus)s (%(device)s)", where)
        except NotPlaced as lost:
            self.actors = []
            raise UserError(f"model workers: {lost} lost while the workers started, and the nodes left had no room "
                            f"for them within {self.start_timeout_s:.0f} s (--start-timeout); add a node or free "
                            "resources, then rerun the same command (with --resume if it checkpointed)") from None
        except NotReady as late:
            self.actors = []
            raise UserError(f"only {late.ready} of {self.count} model workers loaded {self.load.model} within "
                            f"{MODEL_LOAD_TIMEOUT_S:.0f} s (placed, still loading: a slow disk or a hub download?); "
                            "see the Ray logs") from None
        except ray.exceptions.RayError as exc:
            self.actors = []
            raise UserError(f"model workers failed to load the model: {root_cause(exc)}") from None

    def pick(self) -> int | None:
        """The least busy live actor with a free slot, or None when all are at capacity (backpressure). With no
        live actor left (their nodes lost) it waits for a replacement, or stops the run (:meth:`_no_worker_left`)."""
        index = self._least_busy()
        return index if self.in_flight[index] < MAX_TASKS_IN_FLIGHT_PER_ACTOR else None

    def _least_busy(self) -> int:
        self._admit_replacements()
        live = [index for index in range(self.count) if self.live[index]]
        if not live:
            return self._no_worker_left()
        return min(live, key=self.in_flight.__getitem__)

    def replace(self, index: int, dead, reason: str, method: str) -> None:
        """A worker is gone for good (restarts used up, or its node lost) while the driver waited on a ``method``
        call: start a fresh one in its bundle, once per death. Until it is up, its calls go to the other workers
        (:meth:`_collect` re-issues them in call order).

        After a node loss Ray places the bundle again where there is room; where there is none, the replacement
        waits unplaced and the run goes on with the workers left. Its other pending calls stay counted in
        ``in_flight`` until they are collected (and re-issued).
        """
        if self.actors[index] is not dead or not self.live[index]:
            return
        self.live[index] = False
        self.lost.append(self.group.lost_node(index) or reason)
        log.warning("model worker %d lost (%s) in a %s call; its calls go to the other workers while a replacement "
                    "starts", index, self.lost[-1], method)
        self.group.kill(index)  # no restart by Ray in a bundle that may never be placed again
        self._start(index)

    def _admit_replacements(self) -> None:
        """Replacements that have loaded the model take calls from now on."""
        import ray

        for index in range(self.count):
            if self.live[index] or self.actors[index] is None:
                continue
            try:
                if self.group.up(index):
                    self.live[index] = True
                    log.warning("model worker %d replaced (node %s)", index, self.group.nodes[index][:12])
            except ray.exceptions.RayError as exc:  # it failed to start: the slot stays empty
                log.warning("model worker %d: its replacement failed to start (%s)", index, root_cause(exc))
                self.actors[index] = None

    def _no_worker_left(self) -> int:
        """Every worker is lost: wait for a replacement to be placed (``--start-timeout``) and to load the model
        (``MODEL_LOAD_TIMEOUT_S``), or stop with one line naming the lost node(s) and ``--resume``."""
        import ray

        lost = ", ".join(dict.fromkeys(self.lost))
        stop = UserError(f"model workers lost ({lost}) and no replacement could be placed on the nodes left within "
                         f"{self.start_timeout_s:g} s; add a node or free resources, then rerun the same command with "
                         "--resume (it continues from the last checkpoint in --checkpoint-dir)")
        starting = [index for index in range(self.count) if self.actors[index] is not None]
        if not starting or not self.group.placed(starting, self.start_timeout_s):
            raise stop
        log.warning("no model worker left (%s); waiting for a replacement to load the model", lost)
        deadline = time.monotonic() + MODEL_LOAD_TIMEOUT_S
        while time.monotonic() < deadline:
            starting = [self.group.located[i] for i in range(self.count) if self.actors[i] is not None]
            if not starting:
                break
            ray.wait(starting, num_returns=1, timeout=HEALTH_POLL_S)
            self._admit_replacements()
            if any(self.live):
                return self.live.index(True)
        raise stop

    def map(self, method: str, calls: Iterable[tuple]) -> Iterator:
        """``method(*args)`` on the actors for each call, yielding results strictly in call order as they arrive.

        At most ``MAX_TASKS_IN_FLIGHT_PER_ACTOR`` calls per actor are out; the next call is taken from ``calls``
        only when a slot is free (backpressure: lazily cut windows or tiles are cut just in time).
        """
        import ray

        calls = iter(calls)
        pending: deque[tuple] = deque()  # (args, ref, slot, actor) in call order
        more = first = True
        try:
            while True:
                while more and (slot := self.pick()) is not None:
                    args = next(calls, None)
                    if args is None:
                        more = False
                    else:
                        pending.append(self._submit(method, args, slot))
                        if first:  # -v: which phase of the stage is on the actors now (tests time node losses by it)
                            log.info("%s calls start (first on worker %d)", method, slot)
                            first = False
                if not pending:
                    return
                yield self._collect(method, *pending.popleft())
        finally:  # a failed or interrupted call must not leave the pool's slots taken for the next image
            for _args, ref, slot, _actor in pending:
                try:
                    ray.cancel(ref)
                except Exception:  # already finished or its actor is gone: nothing left to cancel
                    pass
                self.in_flight[slot] -= 1

    def _submit(self, method: str, args: tuple, slot: int) -> tuple:
        actor = self.actors[slot]
        ref = actor.call.remote(method, args)
        self.in_flight[slot] += 1
        return args, ref, slot, actor

    def own(self, slot: int, method: str, count: int, args: tuple) -> list:
        """A ``PartOwner`` call on the actor of ``slot`` (``PipelineWorker.own``): its ``count`` result references.
        Ray resolves the references among ``args`` before the call, fetching them from where they were made."""
        refs = self.actors[slot].own.options(num_returns=count).remote(method, *args)
        return [refs] if count == 1 else list(refs)

    def _collect(self, method: str, args: tuple, ref, slot: int, actor):
        """Wait for one call; if its actor is gone for good (or its node lost), replace it and run the call again
        on a live worker. Never waits on a dead node: :meth:`_lost` is asked every ``HEALTH_POLL_S``."""
        import ray

        for _attempt in range(MAX_CALL_ATTEMPTS):
            reason = self._lost(ref, slot, actor)
            if reason is None:
                try:
                    result = ray.get(ref)
                    self.in_flight[slot] -= 1
                    return result
                except ray.exceptions.RayTaskError as exc:  # the model itself failed (e.g. out of memory)
                    self.in_flight[slot] -= 1
                    raise UserError(f"model worker failed in {method}: {root_cause(exc)}") from None
                except ray.exceptions.RayActorError as exc:  # an actor out of restarts
                    reason = root_cause(exc)
                except ray.exceptions.ObjectLostError:  # a result lost with its node; a live worker just reruns it
                    reason = self.group.lost_node(slot)
            self.in_flight[slot] -= 1
            if reason:
                self.replace(slot, actor, reason, method)
            args, ref, slot, actor = self._submit(method, args, self._least_busy())
        raise UserError(f"a {method} call lost its model worker {MAX_CALL_ATTEMPTS} times ({', '.join(self.lost)}); "
                        "see the Ray logs")

    def _lost(self, ref, slot: int, actor) -> str | None:
        """Wait until ``ref`` is ready (None) or its actor is known to be gone (why)."""
        import ray

        while not ray.wait([ref], timeout=HEALTH_POLL_S)[0]:
            if self.actors[slot] is not actor or not self.live[slot]:
                return "replaced"  # declared lost while waiting on an earlier call
            if self.group is not None and (node := self.group.lost_node(slot)):
                return f"{node} lost"
        return None

    def broadcast(self, method: str, calls: list[tuple]) -> None:
        """Every live actor runs every call (results dropped). A worker lost meanwhile (or its node) is left to
        :meth:`map`'s replacement, which compiles at its first call: a warm-up never stops or hangs a run."""
        import ray

        submitted = [(actor.call.remote(method, args), slot, actor)
                     for slot, (actor, live) in enumerate(zip(self.actors, self.live)) if live for args in calls]
        for ref, slot, actor in submitted:
            if (reason := self._lost(ref, slot, actor)) is None:
                try:
                    ray.get(ref)
                    continue
                except ray.exceptions.RayTaskError as exc:  # the model itself failed (e.g. inductor)
                    raise UserError(f"model worker failed in {method}: {root_cause(exc)}") from None
                except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as exc:
                    reason = root_cause(exc)
            log.warning("model worker %d lost during the %s (%s); the run goes on", slot, method, reason)

    def usage(self) -> list[dict]:
        """Per actor: pid and CPU seconds its process used so far (bench/scale.py compares them with the driver's)."""
        import ray

        return ray.get([a.usage.remote() for a, live in zip(self.actors, self.live) if live])

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.release()
            self.group = None
        self.actors = []


class RayTransport:
    """How :class:`~cupscale_dist.execution.partloop.PartLoop` reaches the pool's workers: ``PartOwner`` calls on the
    actors (``PipelineWorker.own``), results fetched with the pool's health checks, losses classified."""

    def __init__(self, pool: WorkerPool):
        self.pool = pool
        self.slot_of: dict = {}  # object ref -> the slot whose call made it (which worker a failure names)
        self.call_of: dict = {}  # object ref -> the PartOwner method that made it (what the warning names)

    def workers(self) -> list[int]:
        """The slots that take parts now: the live ones (a loaded replacement is admitted here, at a re-layout);
        with none left, the pool waits for a replacement or stops in one line naming --resume."""
        pool = self.pool
        pool._admit_replacements()
        live = [index for index in range(pool.count) if pool.live[index]]
        if not live:
            live = [pool._no_worker_left()]
        return live

    def submit(self, worker: int, method: str, count: int, *args) -> list:
        refs = self.pool.own(worker, method, count, args)
        for ref in refs:
            self.slot_of[ref], self.call_of[ref] = worker, method
        return refs

    def fetch(self, refs: list) -> list:
        """The values of ``refs``; a worker's node declared dead while waiting, its process gone, or its state lost
        (restarted by Ray) is a :class:`WorkerLost`; a failure of the model itself is one line."""
        import ray

        from .partloop import WorkerLost

        slots = sorted({self.slot_of.get(ref) for ref in refs} - {None})
        call = next((self.call_of[ref] for ref in refs if ref in self.call_of), "step")
        pending = list(refs)
        while pending:
            _ready, pending = ray.wait(pending, num_returns=len(pending), timeout=HEALTH_POLL_S)
            for slot in slots:
                if self.pool.group is not None and (node := self.pool.group.lost_node(slot)):
                    raise WorkerLost(slot, f"{node} lost", call=call)
        try:
            return ray.get(list(refs))
        except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError, ray.exceptions.RayTaskError) as exc:
            from .partowner import PartsMissing

            slot = self._lost_slot(exc, slots)
            if slot is None:
                raise UserError(f"model worker failed in a step on the actors: {root_cause(exc)}") from None
            restarted = isinstance(getattr(exc, "cause", None), PartsMissing)
            raise WorkerLost(slot, root_cause(exc), restarted, call=call) from None
        finally:
            for ref in refs:
                self.slot_of.pop(ref, None)
                self.call_of.pop(ref, None)

    def _lost_slot(self, exc, slots: list[int]) -> int | None:
        """Which worker a failure means is gone, or None when it is the model's own error."""
        import ray

        from .partowner import PartsMissing

        cause = getattr(exc, "cause", None)
        if isinstance(cause, PartsMissing) or isinstance(exc, PartsMissing):
            return getattr(cause, "slot", None)
        actor_id = getattr(exc, "actor_id", None) or getattr(cause, "actor_id", None)
        if isinstance(exc, ray.exceptions.RayActorError) or isinstance(cause, ray.exceptions.RayActorError):
            for slot, actor in enumerate(self.pool.actors):
                if actor is not None and actor_id and actor._actor_id.hex() == actor_id:
                    return slot
            return slots[0] if slots else None
        if isinstance(exc, ray.exceptions.ObjectLostError) or isinstance(cause, ray.exceptions.ObjectLostError):
            for slot in slots:
                if self.pool.group is not None and self.pool.group.lost_node(slot):
                    return slot
            return slots[0] if slots else None
        return None

    def lose(self, lost) -> None:
        """A worker owning parts is gone: a replacement starts in its bundle (admitted at a later re-layout)."""
        pool = self.pool
        if pool.live[lost.slot] and not lost.restarted:  # a process Ray restarted is up: it takes parts again
            pool.replace(lost.slot, pool.actors[lost.slot], lost.reason, lost.call)


class RayExecutor:
    """The executor of :func:`cupscale_dist.pipeline.upscale` in Ray mode: calls go to a :class:`WorkerPool`."""

    def __init__(self, pool: WorkerPool, spec: ModelSpec, batch_size: int, keep: bool = False):
        self.pool, self.spec, self.batch_size = pool, spec, batch_size
        self.start_timeout_s = pool.start_timeout_s
        self.keep = keep  # `batch --tile-parallel`, `serve`: one pool serves every image
        self.bounds: tuple[int, ...] | None = None  # a fixed part layout (tests: uneven parts); None = even bands

    def denoise_on_owners(self, job):
        """Steps 9-10 with the latent on the workers (step_design='actors'): they denoise and decode their bands;
        the stage output's uint8 bands come here, top to bottom (:meth:`.partloop.PartLoop.bands`)."""
        from .partloop import PartLoop

        return PartLoop(RayTransport(self.pool), job, self.bounds).bands()

    def check_serves(self, config) -> None:
        pool = self.pool
        if (config.weights, config.compile) != pool.weights:
            raise UserError(f"the model workers hold weights={pool.weights[0]} compile={pool.weights[1]}, this run "
                            f"asks for weights={config.weights} compile={config.compile}; start a pool for this config")
        if addon_request(config) != pool.built_for and Addons.from_config(config, pool.spec) != pool.addons:
            raise UserError(f"the model workers hold add-ons {pool.addons}, this run asks for others (lora, "
                            "controlnet, resize='model'); start a pool for this config")

    def share(self, value) -> Shared:
        import ray

        return Shared(ray.put(value))

    def map(self, method: str, calls: Iterable[tuple]) -> Iterator:
        return self.pool.map(method, calls)

    def broadcast(self, method: str, calls: list[tuple]) -> None:
        self.pool.broadcast(method, calls)

    def close(self) -> None:
        if not self.keep:
            self.release()

    def release(self) -> None:
        """The actors (and their GPUs) and the placement group go back to the cluster."""
        self.pool.shutdown()


