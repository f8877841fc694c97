"""The driver's side of the step on the actors (issue 34): a stage's denoising loop when the workers own the latent.

Each worker owns row bands of the stage latent (:class:`~cupscale_dist.method.parts.StageLayout`) and keeps them
between steps (:class:`~cupscale_dist.execution.partowner.PartOwner`). Per step the driver submits two calls per
worker and routes what they return, by reference, to the workers that read it:

* ``predict(step, *halos)``: the worker cuts its batches' windows from its bands and the halo rows others sent, runs
  the model, and returns each other owner's rows of the predictions;
* ``reduce_step(step, *shares)``: it blends every prediction that covers its bands (global view order), injects the
  prior and takes the scheduler step on them, and returns the halo rows others read at the next step.

Only halos and the overlapping rows of predictions move, worker to worker (Ray fetches an argument from where it was
made); the driver sees object references and one small status per call. It keeps the schedule, the step barrier
(progress, the step callback, cancellation), snapshots and checkpoints (a gather of the bands), and recovery: a lost
worker's bands are rebuilt from the last snapshot over the workers left and the steps since replay, giving the same
bytes (nothing depends on the layout).

Lookahead: step ``s + 1``'s ``predict`` calls are submitted before step ``s``'s barrier, so the workers compute while
the driver runs the callback; a gather asked for by the callback still reads the state after step ``s``
(``predict`` does not change the bands, and ``reduce_step(s + 1)`` is submitted after the callback returns).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError
from ..method.parts import StageLayout, join_states, slice_state
from ..method.schedulers import kind_of
from ..method.step import check_finite_latent
from .partowner import PartJob, part_schedule

log = logging.getLogger(__name__)

_generations = itertools.count()


class WorkerLost(Exception):
    """A worker that owns parts is gone (its process, its node, or its state after a restart by Ray)."""

    def __init__(self, slot: int, reason: str, restarted: bool = False):
        super().__init__(f"worker {slot}: {reason}")
        self.slot, self.reason = slot, reason
        self.restarted = restarted  # Ray restarted its process: it is up (model loaded) but holds no parts


@dataclass
class Snapshot:
    """The whole stage state at a step boundary, on the driver: what a lost worker's bands are rebuilt from."""

    step: int  # steps of the stage done
    latents: torch.Tensor
    state: dict | None  # a multistep scheduler's memory (whole latent)


@dataclass
class DenoiseJob:
    """One stage's denoising loop (method.md step 9), whoever runs it."""

    latents: torch.Tensor  # z at step ``first`` (1, C, h, w)
    schedule: object  # the driver's StageSchedule, positioned at ``first``
    views: np.ndarray  # the stage's views before jitter
    context: object  # the stage context as the executor shares it
    control: np.ndarray | None  # the stage input (uint8 HxWx3) for a ControlNet, else None
    first: int  # the first step to run (a resume's)
    jitter: int
    seed: int
    stage: int
    blend: str
    sigma_fraction: float
    batch_size: int
    dwt_levels: int
    vae_scale_factor: int
    snapshot_every: int = 0
    on_step: Callable[[int, Callable[[], tuple]], None] | None = None  # (steps done, gather) after each step


class PartLoop:
    """Runs a :class:`DenoiseJob` on workers that own parts, through a ``transport`` (Ray actors, or in-process
    owners for tests) that submits ``PartOwner`` calls and fetches results, raising :class:`WorkerLost`."""

    def __init__(self, transport, job: DenoiseJob, bounds: tuple[int, ...] | None = None):
        self.transport, self.job = transport, job
        self.bounds = bounds  # a fixed layout (tests: uneven parts); None = even bands over the live workers
        self.kind = kind_of(job.schedule.scheduler)
        self.reported = job.first  # steps the callback has seen (a replay does not report them twice)
        self.snapshot = Snapshot(job.first, job.latents, self.kind.get_state(job.schedule.scheduler))
        self.layout: StageLayout | None = None
        self.generation = None
        self.done = job.first  # steps of the stage the bands have taken
        self.statuses: list[dict] = []  # every call's status, for the benches

    @property
    def num_steps(self) -> int:
        return self.job.schedule.num_steps

    def run(self) -> torch.Tensor:
        """The stage's latent after its last step."""
        while True:
            try:
                return self._run_from(self.snapshot)
            except WorkerLost as lost:
                log.warning("worker %d lost (%s) at stage %d; its parts are rebuilt from the snapshot of step %d "
                            "over the workers left and the steps since replay", lost.slot, lost.reason,
                            self.job.stage, self.snapshot.step)
                self.transport.lose(lost)

    # -- one generation of the stage's layout ----------------------------------------------------------------------
    def _layout(self) -> StageLayout:
        job, workers = self.job, self.transport.workers()
        hw = tuple(job.latents.shape[-2:])
        options = dict(jitter=job.jitter, seed=job.seed, stage=job.stage)
        if self.bounds is not None and len(self.bounds) - 1 == len(workers):
            if any(b % 2**job.dwt_levels for b in self.bounds):
                raise ValueError(f"part bounds {self.bounds} are not multiples of 2^J = {2**job.dwt_levels}: the "
                                 "Haar prior's blocks would straddle two parts")
            return StageLayout(self.bounds, tuple(workers), job.views, hw, job.batch_size, **options)
        return StageLayout.even(workers, job.views, hw, job.batch_size, 2**job.dwt_levels, **options)

    def _run_from(self, snapshot: Snapshot) -> torch.Tensor:
        job = self.job
        self.layout, self.generation = self._layout(), (job.stage, next(_generations))
        layout, generation = self.layout, self.generation
        halos = self._load(snapshot)
        previous: list = []
        for step in range(snapshot.step, self.num_steps):
            shares, predicted = {}, []
            for worker in layout.workers:
                sources = sorted(src for src, dst in layout.halo(step) if dst == worker)
                readers = sorted(dst for src, dst in layout.contributions(step) if src == worker)
                out = self.transport.submit(worker, "predict", len(readers) + 1, generation, step,
                                            *[halos[(src, worker)] for src in sources])
                shares.update({(worker, reader): ref for reader, ref in zip(readers, out)})
                predicted.append(out[-1])
            if previous:
                self._barrier(step - 1, previous)
            halos, reduced = {}, []
            nxt = layout.halo(step + 1) if step + 1 < self.num_steps else {}
            for worker in layout.workers:
                sources = sorted(src for src, dst in layout.contributions(step) if dst == worker)
                readers = sorted(dst for src, dst in nxt if src == worker)
                out = self.transport.submit(worker, "reduce_step", len(readers) + 1, generation, step,
                                            *[shares[(src, worker)] for src in sources])
                halos.update({(worker, reader): ref for reader, ref in zip(readers, out)})
                reduced.append(out[-1])
            previous = predicted + reduced
        if previous:
            self._barrier(self.num_steps - 1, previous)
        latents, _state = self.gather()
        self.transport.fetch([self.transport.submit(w, "drop", 1, generation)[0] for w in layout.workers])
        return latents

    def _load(self, snapshot: Snapshot) -> dict:
        """Every worker gets its bands of ``snapshot`` (rows of the latent, of the solver's memory, of the prior)."""
        job, layout = self.job, self.layout
        height = snapshot.latents.shape[-2]
        shared = PartJob(layout, job.context, job.blend, job.sigma_fraction, job.vae_scale_factor)
        halos = {}
        loads = []
        for worker in layout.workers:
            parts = {}
            for index in layout.parts_of(worker):
                lo, hi = layout.rows(index)
                state = slice_state(snapshot.state, lo, hi, height)
                parts[index] = (snapshot.latents[..., lo:hi, :].numpy(),
                                part_schedule(job.schedule, (lo, hi), job.dwt_levels, snapshot.step, state))
            control = self._control_band(worker)
            worker_job = shared if control is None else dataclasses.replace(shared, control=control[0],
                                                                            control_row0=control[1])
            readers = sorted(dst for src, dst in layout.halo(snapshot.step) if src == worker)
            out = self.transport.submit(worker, "load", len(readers) + 1, self.generation, worker_job, parts,
                                        snapshot.step)
            halos.update({(worker, reader): ref for reader, ref in zip(readers, out)})
            loads.append(out[-1])
        self.statuses += self.transport.fetch(loads)
        self.done = snapshot.step
        return halos

    def _control_band(self, worker: int) -> tuple[np.ndarray, int] | None:
        """The rows of the stage input a worker's views can reach at any step (views move by ``jitter`` at most)."""
        job = self.job
        if job.control is None:
            return None
        spans = [self.layout.reach(worker, self.layout.rects(step)) for step in range(self.num_steps)]
        spans = [s for s in spans if s is not None]
        if not spans:
            return None
        lo, hi = min(s[0] for s in spans), max(s[1] for s in spans)
        f = job.vae_scale_factor
        return np.ascontiguousarray(job.control[lo * f : hi * f]), lo

    def _barrier(self, step: int, statuses: list) -> None:
        """Step ``step`` is done on every worker: check the latent stayed finite, then report it."""
        done = self.transport.fetch(statuses)
        self.statuses += done
        check_finite_latent(all(s["finite"] for s in done), self.job.stage, step)
        steps_done = self.done = step + 1
        if self.job.snapshot_every and (steps_done - self.job.first) % self.job.snapshot_every == 0:
            self.gather()
        if steps_done > self.reported and self.job.on_step is not None:
            self.reported = steps_done
            self.job.on_step(steps_done, self.gather)

    def gather(self) -> tuple[torch.Tensor, dict | None]:
        """The whole latent and solver memory from the bands (in row order); it becomes the snapshot."""
        layout = self.layout
        refs = [self.transport.submit(worker, "gather", 1, self.generation)[0] for worker in layout.workers]
        held = {}
        for answer in self.transport.fetch(refs):
            held.update(answer)
        latents = torch.cat([torch.from_numpy(np.array(held[p][0])) for p in range(layout.num_parts)], dim=-2)
        states = [held[p][1] for p in range(layout.num_parts)]
        state = None if states[0] is None else join_states(states)
        self.snapshot = Snapshot(self.done, latents, state)
        return latents, state


class InProcessTransport:
    """Owners in this process (tests, benches): each call runs at once; its results are the "references"."""

    def __init__(self, owners: dict):
        self.owners = owners  # slot -> PartOwner

    def workers(self) -> list[int]:
        return sorted(self.owners)

    def submit(self, worker: int, method: str, count: int, *args) -> list:
        return list(getattr(self.owners[worker], method)(*args))

    def fetch(self, handles: list) -> list:
        return list(handles)

    def lose(self, lost: WorkerLost) -> None:
        raise UserError(f"in-process owner {lost.slot} lost: {lost.reason}")
