"""The Ray driver: fans each step's views out to TileDenoiser actors and reduces their predictions on arrival.

The driver runs the very same :func:`cupscale_dist.pipeline.upscale` as the single-process reference; only the
``predictor`` differs (:class:`RayPredictor`). It owns the one scheduler and the full latent; actors only ever
return per-view noise predictions. Batches of views are fixed (``view_batch_size``) and reduced in view order, so
the output bytes do not depend on the actor count or on which actor finished first.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from .config import UpscaleConfig
from .errors import UserError
from .raycluster import ClusterOptions, connect, root_cause
from .views import view_batches

log = logging.getLogger(__name__)

MAX_TASKS_IN_FLIGHT_PER_ACTOR = 2  # one batch computing + one queued hides the driver's round trip per batch
ACTOR_RESTARTS = 3  # Ray restarts a dead denoiser this often (and retries its batch) before we replace it


class DenoiserPool:
    """N TileDenoiser actors; policy (placement wait, in-flight caps, replacement) lives here, on the driver."""

    def __init__(self, config: UpscaleConfig, options: ClusterOptions):
        ray = connect(options)
        from actors.denoiser import TileDenoiser

        gpus_in_cluster = ray.cluster_resources().get("GPU", 0)
        self.num_gpus = options.gpus_per_actor if options.gpus_per_actor is not None else (1 if gpus_in_cluster else 0)
        self.count = options.actors or max(1, int(gpus_in_cluster / max(self.num_gpus, 1e-9)) if self.num_gpus else 1)
        self.remote_cls = ray.remote(TileDenoiser).options(
            num_gpus=self.num_gpus, num_cpus=options.cpus_per_actor,
            max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS)
        device = config.device if config.device != "auto" else ("cuda" if self.num_gpus else "cpu")
        device = "cuda" if device.startswith("cuda") else device  # Ray shows each actor only its own GPU(s)
        # CPU bits depend on the thread count: actors use the driver's, so --actors N gives the reference's bytes.
        threads = config.torch_threads or (torch.get_num_threads() if device == "cpu" else None)
        self.load_args = (config.model, device, config.dtype, threads)
        self.timeout = options.start_timeout_s
        self.actors = [self.remote_cls.remote(*self.load_args, i) for i in range(self.count)]  # live actors
        self.in_flight = [0] * self.count  # tasks submitted and not yet collected, per actor
        self._wait_ready(options)

    def _wait_ready(self, options: ClusterOptions) -> None:
        import ray

        placements = [a.where.remote() for a in self.actors]
        ready, pending = ray.wait(placements, num_returns=len(placements), timeout=self.timeout)
        if pending:
            self.shutdown()
            raise UserError(
                f"--actors {self.count}: only {len(ready)} of {self.count} denoisers started within {self.timeout:.0f} s; "
                f"each needs {self.num_gpus} GPU and {options.cpus_per_actor} CPU, the cluster has "
                f"{ray.available_resources()} free; use fewer --actors or smaller --gpus-per-actor/--cpus-per-actor")
        try:
            for where in ray.get(placements):
                log.info("denoiser %(index)s on node %(node)s pid %(pid)s gpus %(gpus)s (%(device)s)", where)
        except ray.exceptions.RayError as exc:
            self.shutdown()
            raise UserError(f"denoiser actors failed to load the model: {root_cause(exc)}") from None

    def pick(self) -> int | None:
        """The least busy actor with a free slot, or None when all are at capacity (backpressure)."""
        index = int(np.argmin(self.in_flight))
        return index if self.in_flight[index] < MAX_TASKS_IN_FLIGHT_PER_ACTOR else None

    def replace(self, index: int, dead, reason: str) -> None:
        """A denoiser died for good (restarts used up): start a fresh one in its place, once per death.

        Its other pending batches stay counted in ``in_flight`` until they are collected (and resubmitted).
        """
        if self.actors[index] is dead:
            log.warning("denoiser %d lost (%s); starting a replacement", index, reason)
            self.actors[index] = self.remote_cls.remote(*self.load_args, index)

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []


class RayPredictor:
    """Predictor for :func:`cupscale_dist.pipeline.upscale` that runs the views' batches on a DenoiserPool.

    Per step: cut each batch's windows from the latent (only those go out), keep at most
    ``MAX_TASKS_IN_FLIGHT_PER_ACTOR`` batches queued per actor, and yield results strictly in view order as they
    arrive, so the driver reduces batch k while later batches are still computing (reduce on arrival).
    """

    def __init__(self, pool: DenoiserPool, batch_size: int):
        self.pool, self.batch_size = pool, batch_size
        self.context_ref = None

    def start_stage(self, context) -> None:
        import ray

        self.context_ref = ray.put(context)  # once per stage; actors fetch it once each

    def predict(self, latents: torch.Tensor, views: np.ndarray, timestep, input_scale: float,
                step: int) -> Iterable[tuple[Sequence[int], torch.Tensor]]:
        import ray

        host = latents[0].numpy()
        batches = view_batches(len(views), self.batch_size)
        submitted: dict[int, tuple] = {}  # batch number -> (object ref, actor index, actor)
        next_submit = 0
        try:
            for current in range(len(batches)):
                while next_submit < len(batches) and (slot := self.pool.pick()) is not None:
                    submitted[next_submit] = self._submit(batches[next_submit], host, views, timestep, input_scale, slot)
                    next_submit += 1
                result = self._collect(submitted.pop(current), batches[current], host, views, timestep, input_scale)
                yield batches[current], torch.from_numpy(result.copy())  # Ray's arrays are read-only views
        finally:  # a failed or interrupted step must not leave the pool's slots taken for the next image
            for ref, slot, _ in submitted.values():
                try:
                    ray.cancel(ref)
                except Exception:  # already finished or its actor is gone: nothing left to cancel
                    pass
                self.pool.in_flight[slot] -= 1

    def _submit(self, batch: range, host: np.ndarray, views: np.ndarray, timestep, input_scale: float, slot: int):
        rects = views[batch.start : batch.stop]
        windows = np.stack([host[:, t:b, l:r] for t, l, b, r in rects])
        actor = self.pool.actors[slot]
        ref = actor.predict.remote([self.context_ref], windows, float(timestep), input_scale,
                                   np.arange(batch.start, batch.stop), rects)
        self.pool.in_flight[slot] += 1
        return ref, slot, actor

    def _collect(self, submitted: tuple, batch: range, host, views, timestep, input_scale) -> np.ndarray:
        """Wait for one batch; if its actor is gone for good, replace it and run the batch again."""
        import ray

        ref, slot, actor = submitted
        for _attempt in range(ACTOR_RESTARTS + 1):
            try:
                result = ray.get(ref)
                self.pool.in_flight[slot] -= 1
                return result
            except ray.exceptions.RayActorError as exc:
                self.pool.in_flight[slot] -= 1
                self.pool.replace(slot, actor, root_cause(exc))
                ref, slot, actor = self._submit(batch, host, views, timestep, input_scale, slot)
            except ray.exceptions.RayTaskError as exc:  # the model itself failed (e.g. out of memory)
                self.pool.in_flight[slot] -= 1
                raise UserError(f"denoiser failed on views {batch.start}-{batch.stop - 1}: {root_cause(exc)}") from None
        raise UserError(f"views {batch.start}-{batch.stop - 1} failed on {ACTOR_RESTARTS + 1} denoisers; see the Ray logs")

    def close(self) -> None:
        """End of the run: release the actors (and their GPUs)."""
        self.context_ref = None
        self.pool.shutdown()


def make_predictor(config: UpscaleConfig, options: ClusterOptions):
    """``--actors 0`` = None (the in-process reference predictor); otherwise a RayPredictor on a new pool."""
    if options.actors == 0:
        return None
    return RayPredictor(DenoiserPool(config, options), config.view_batch_size)
