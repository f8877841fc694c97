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
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError
from ..method.parts import StageLayout, join_states, slice_state
from ..method.prior import GlobalPrior
from ..method.schedulers import kind_of
from ..method.step import check_finite_latent
from ..method.vae import TileGrid
from .partowner import PartJob, PixelStart, part_schedule

log = logging.getLogger(__name__)

_generations = itertools.count()


class WorkerLost(Exception):
    """A worker that owns parts is gone (its process, its node, or its state after a restart by Ray)."""

    def __init__(self, slot: int, reason: str, restarted: bool = False, call: str = "step"):
        super().__init__(f"worker {slot}: {reason}")
        self.slot, self.reason, self.call = slot, reason, call  # call: the PartOwner method it was lost in
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

    latents: torch.Tensor | None  # z at step ``first`` (1, C, h, w); None: the owners make it from ``pixels``
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
    decode: TileGrid | None = None  # the VAE's tiles, for :meth:`PartLoop.bands` (the owners decode, step 10)
    pixels: PixelStart | None = None  # steps 2-4 on the owners (schedule.prior None until they made it), else None
    on_loaded: Callable[[], None] | None = None  # after the workers took their bands (a cancel raised there stops)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.latents.shape) if self.latents is not None else self.pixels.shape


class PartLoop:
    """Runs a :class:`DenoiseJob` on workers that own parts, through a ``transport`` (Ray actors, or in-process
    owners for tests) that submits ``PartOwner`` calls and fetches results, raising :class:`WorkerLost`."""

    def __init__(self, transport, job: DenoiseJob, bounds: tuple[int, ...] | None = None):
        self.transport, self.job = transport, job
        self.bounds = bounds  # a fixed layout (tests: uneven parts); None = even bands over the live workers
        self.kind = kind_of(job.schedule.scheduler)
        self.reported = job.first  # steps the callback has seen (a replay does not report them twice)
        # None latents: the stage's start, made again from the pixels (kept here until a gather replaces it)
        self.snapshot = Snapshot(job.first, job.latents, self.kind.get_state(job.schedule.scheduler))
        self.pixels = job.pixels
        self.layout: StageLayout | None = None
        self.generation = None
        self.done = job.first  # steps of the stage the bands have taken
        self.statuses: list[dict] = []  # every call's status, for the benches

    @property
    def num_steps(self) -> int:
        return self.job.schedule.num_steps

    def run(self) -> torch.Tensor:
        """The stage's latent after its last step, gathered here (benches, tests; :meth:`bands` decodes it where
        it lives)."""
        while True:
            try:
                self._run_from(self.snapshot)
                latents, _state = self.gather()
                self._drop()
                return latents
            except WorkerLost as lost:
                self._lost(lost)

    def bands(self) -> Iterator[np.ndarray]:
        """Steps 9 and 10: the stage's steps, then its output decoded by the owners of the latent's bands, as uint8
        pixel rows top to bottom (what a file writer streams); the latent never comes here.

        A worker lost while decoding: the steps since the last snapshot replay over the workers left and the decode
        goes on from the first row not yet handed on (the replay gives the same bytes, so the rows handed on stand).
        """
        job = self.job
        f, handed = job.vae_scale_factor, 0  # output rows (latent px) already yielded
        finished = False
        while not finished:
            try:
                halos = self._run_from(self.snapshot)
                layout, generation, pieces, statuses = self.layout, self.generation, [], []
                for worker in layout.workers:  # every worker decodes at once ...
                    sources = sorted(src for src, dst in layout.decode_halo(job.decode) if dst == worker)
                    chunks = [c for p in layout.parts_of(worker) for c in job.decode.chunks(*layout.rows(p))]
                    out = self.transport.submit(worker, "decode", len(chunks) + 1, generation,
                                                *[halos[(src, worker)] for src in sources])
                    if not pieces:  # -v: which phase is on the workers now (the multi-node tests time losses by it)
                        log.info("decode calls start (first on worker %d)", worker)
                    pieces += zip(chunks, out)
                    statuses.append(out[-1])
                for (lo, hi), ref in sorted(pieces, key=lambda piece: piece[0]):  # ... the chunks come one at a time
                    if hi > handed:
                        (band,) = self.transport.fetch([ref])
                        yield band[(max(lo, handed) - lo) * f :]
                        handed = hi
                self.statuses += self.transport.fetch(statuses)
                finished = True
            except WorkerLost as lost:
                self._lost(lost)  # the next generation's load replaces what the survivors hold
            except BaseException:  # closed early by the sink (GeneratorExit), or a failure: free the bands
                self._drop()
                raise
        self._drop()

    def _lost(self, lost: WorkerLost) -> None:
        log.warning("worker %d lost (%s) at stage %d; its parts are rebuilt from the snapshot of step %d over the "
                    "workers left and the steps since replay", lost.slot, lost.reason, self.job.stage,
                    self.snapshot.step)
        self.transport.lose(lost)

    def _drop(self) -> None:
        """The workers free this generation's bands; not waited for (a worker being replaced takes it whenever it
        starts, and a drop of a generation it does not hold does nothing)."""
        if self.layout is not None:
            for worker in self.layout.workers:
                self.transport.submit(worker, "drop", 1, self.generation)

    # -- one generation of the stage's layout ----------------------------------------------------------------------
    def _layout(self) -> StageLayout:
        job, workers = self.job, self.transport.workers()
        hw = job.shape[-2:]
        options = dict(jitter=job.jitter, seed=job.seed, stage=job.stage)
        if self.bounds is not None and len(self.bounds) - 1 == len(workers):
            if any(b % 2**job.dwt_levels for b in self.bounds):
                raise ValueError(f"part bounds {self.bounds} are not multiples of 2^J = {2**job.dwt_levels}: the "
                                 "Haar prior's blocks would straddle two parts")
            return StageLayout(self.bounds, tuple(workers), job.views, hw, job.batch_size, **options)
        return StageLayout.even(workers, job.views, hw, job.batch_size, 2**job.dwt_levels, **options)

    def _run_from(self, snapshot: Snapshot) -> dict:
        """The stage from ``snapshot`` to its last step on a fresh layout; returns the halos sent after the last
        step (the decode's, with ``job.decode``)."""
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
            nxt = self._moves(step + 1)
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
        return halos

    def _moves(self, step: int) -> dict:
        """What workers read of each other's parts before ``step`` (views' halos; after the last, the decode's)."""
        return self._shared_job().moves(step, self.num_steps)

    def _shared_job(self) -> PartJob:
        job = self.job
        return PartJob(self.layout, job.context, job.blend, job.sigma_fraction, job.vae_scale_factor,
                       decode=job.decode)

    def _load(self, snapshot: Snapshot) -> dict:
        """Every worker gets its bands of ``snapshot`` (rows of the latent, of the solver's memory, of the prior);
        at the stage's start (or before the prior is known: a resume) the pixel rows it encodes them from instead."""
        job, layout = self.job, self.layout
        height = job.shape[-2]
        from_pixels = snapshot.latents is None or job.schedule.prior is None
        shared = self._shared_job()
        halos = {}
        loads = []
        for worker in layout.workers:
            parts = {}
            for index in layout.parts_of(worker):
                lo, hi = layout.rows(index)
                state = slice_state(snapshot.state, lo, hi, height)
                rows = None if snapshot.latents is None else snapshot.latents[..., lo:hi, :].numpy()
                parts[index] = (rows, part_schedule(job.schedule, (lo, hi), job.dwt_levels, snapshot.step, state))
            control = self._control_band(worker)
            worker_job = shared if control is None else dataclasses.replace(shared, control=control[0],
                                                                            control_row0=control[1])
            span = [layout.rows(p) for p in layout.parts_of(worker)]
            pixels = self.pixels.rows(span[0][0], span[-1][1]) if from_pixels else None
            readers = sorted(dst for src, dst in self._moves(snapshot.step) if src == worker)
            out = self.transport.submit(worker, "load", len(readers) + 1, self.generation, worker_job, parts,
                                        snapshot.step, pixels)
            if not loads:  # -v: as for decode (a load with pixels is the stage's VAE encode)
                log.info("load calls start (first on worker %d)", worker)
            halos.update({(worker, reader): ref for reader, ref in zip(readers, out)})
            loads.append(out[-1])
        statuses = self.transport.fetch(loads)
        self.statuses += statuses
        if job.on_loaded is not None:  # the load may have been the stage's VAE encode: a cancel can stop here
            job.on_loaded()
        if from_pixels and job.schedule.prior is None:  # the bands' prior rows, joined: later layouts slice it
            rows = {index: low for status in statuses for index, low in status["priors"].items()}
            low, noise_low = (torch.cat([torch.from_numpy(rows[p][k]) for p in range(layout.num_parts)], dim=-2)
                              for k in (0, 1))
            job.schedule.prior = GlobalPrior(low, noise_low, "haar", job.dwt_levels)
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
        self.pixels = None  # the prior is known and the snapshot holds the latent: the stage input is not needed
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
