"""The worker's side of the step on the actors (issue 34): :class:`PartOwner` keeps this worker's row bands of the
stage latent between steps, predicts its view batches from them (and the halo rows it was sent), and blends,
injects the prior and steps its bands from the predictions that cover them. No Ray here: the actor shell
(``actors/worker.py``) calls these methods with what other workers returned; the driver only routes references
(:mod:`cupscale_dist.execution.partloop`).

Every method returns a list: the messages for the other workers, in the order of their slots, then one small
status dict for the driver (what a step did, whether the latent stayed finite).
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..method.parts import BlendWeights, Contribution, StageLayout, crop_rows, reduce_part
from ..method.prior import stage_noise, stage_start
from ..method.schedulers import kind_of
from ..method.step import StageSchedule, is_finite, prior_and_step
from ..method.vae import TileGrid, decode_float_rows, encode_rows, to_uint8


class PartsMissing(RuntimeError):
    """A call for a stage generation this worker does not hold (it was restarted, or the driver re-laid the parts
    after a loss): the driver treats the worker as lost. ``slot`` names the worker."""

    slot: int | None = None


@dataclass
class Part:
    """One row band ``[lo, hi)`` of the stage latent and the scheduler that steps it."""

    index: int
    rows: tuple[int, int]
    latents: torch.Tensor  # (1, C, hi - lo, W) float32
    schedule: StageSchedule  # this band's own scheduler (and its multistep memory) and its rows of the prior
    weights: BlendWeights = dataclasses.field(default_factory=BlendWeights)  # its blend weights while its views stay


@dataclass(frozen=True)
class PartJob:
    """What every owner of a stage generation shares (sent once, by reference)."""

    layout: StageLayout
    context: object  # the StageContext the predictions use
    blend: str
    sigma_fraction: float
    vae_scale_factor: int
    control: np.ndarray | None = None  # uint8 rows of the stage input from ``control_row0`` (ControlNet only)
    control_row0: int = 0  # latent row of ``control``'s first pixel row / vae_scale_factor
    decode: TileGrid | None = None  # the VAE's tiles when the owners decode their bands (step 10), else None

    def moves(self, step: int, last: int) -> dict:
        """The rows workers read of each other's parts before ``step``: its views' halos, or after the last step
        the decode's (none when the driver gathers the latent instead)."""
        if step < last:
            return self.layout.halo(step)
        return self.layout.decode_halo(self.decode) if self.decode is not None else {}


@dataclass(frozen=True)
class PixelStart:
    """Steps 2-4 on the owners: the 8-bit stage input (and the prior's own picture under prior_source='input'),
    whose rows each worker is sent to encode its bands, and what makes a band's prior and start point."""

    image: np.ndarray  # uint8 (H, W, 3) rows of the stage input from latent row ``row0`` (the driver's: all of it)
    prior_image: np.ndarray | None  # the same rows of the prior's picture, or None: the prior is of ``image``
    grid: TileGrid  # the VAE's tiles over the stage latent
    shape: tuple[int, ...]  # the stage latent's (1, C, h, w)
    seed: int
    stage: int
    levels: int  # J of the Haar prior
    factor: int  # image px per latent px
    row0: int = 0

    def rows(self, lo: int, hi: int) -> PixelStart:
        """What a worker whose bands span latent rows ``[lo, hi)`` is sent: the pixel rows their tiles read."""
        a, b = self.grid.span(lo, hi)
        f = self.factor

        def cut(pixels):
            return None if pixels is None else pixels[(a - self.row0) * f : (b - self.row0) * f]

        return dataclasses.replace(self, image=cut(self.image), prior_image=cut(self.prior_image), row0=a)


class PartOwner:
    """This worker's parts of the current stage generation; ``predict`` is the worker's view prediction call
    (``ModelWorker.predict``'s signature)."""

    def __init__(self, predict: Callable, slot: int, decode_tile: Callable | None = None,
                 encode_tile: Callable | None = None):
        self.predict_views, self.slot = predict, slot
        self.decode_tile, self.encode_tile = decode_tile, encode_tile
        self.generation: object = None  # the driver's key of the stage generation held
        self.job: PartJob | None = None
        self.parts: dict[int, Part] = {}
        self.local: dict[int, list[Contribution]] = {}  # predictions of this worker for its own parts, this step

    def __repr__(self) -> str:
        return f"PartOwner(slot={self.slot}, parts={sorted(self.parts)})"

    # -- a stage generation ------------------------------------------------------------------------------------
    def load(self, generation, job: PartJob, parts: dict[int, tuple[np.ndarray | None, StageSchedule]], step: int,
             pixels: PixelStart | None = None) -> list:
        """Take the bands ``parts`` ({index: (latent rows, the band's schedule)}) of a stage at ``step``; returns
        the halo rows the others read at ``step``, then a status.

        With ``pixels`` (steps 2-4 here): each band's rows of the stage input are encoded (the VAE tiles that reach
        it), and its prior ``G`` and start point ``z_S`` made from them and its rows of the stage's noise; a band
        sent without latent rows (a fresh stage) starts from ``z_S``. The status then carries each band's prior
        rows, which the driver keeps for later layouts."""
        started = time.perf_counter()
        self.generation, self.job, self.local = generation, job, {}
        self.parts, priors = {}, {}
        for index, (latents, schedule) in parts.items():
            rows = job.layout.rows(index)
            if pixels is not None:
                start, schedule = self._start(pixels, rows, schedule)
                priors[index] = (schedule.prior.low.numpy(), schedule.prior.noise_low.numpy())
                latents = start if latents is None else latents
            self.parts[index] = Part(index, rows, torch.from_numpy(np.array(latents)), schedule)
        status = self._status(step, "load", 0, time.perf_counter() - started)
        return self._halos(step) + [{**status, "priors": priors} if priors else status]

    def _start(self, pixels: PixelStart, rows: tuple[int, int], schedule: StageSchedule):
        """Steps 2-4 for the band ``rows``: (its start point, its schedule with its rows of the prior)."""
        f = pixels.factor

        def cut(image):
            return lambda t, l, b, r: image[(t - pixels.row0) * f : (b - pixels.row0) * f, l * f : r * f]

        def tile_map(method: str, calls):
            assert method == "encode_tile", method
            return (self.encode_tile(*call) for call in calls)

        channels = pixels.shape[1]
        z_low = encode_rows(tile_map, cut(pixels.image), pixels.grid, channels, rows)
        z_prior = z_low if pixels.prior_image is None else encode_rows(tile_map, cut(pixels.prior_image),
                                                                       pixels.grid, channels, rows)
        noise = stage_noise(pixels.shape, pixels.seed, pixels.stage, rows)
        prior, start = stage_start(schedule.scheduler, schedule.start_index, z_low, z_prior, noise, "haar",
                                   pixels.levels)
        return start.numpy(), dataclasses.replace(schedule, prior=prior)

    def gather(self, generation) -> list[dict[int, tuple[np.ndarray, dict | None]]]:
        """Each band's latent rows and its scheduler's carried state (a snapshot, a checkpoint, the stage's end)."""
        self._check(generation)
        return [{index: (part.latents.numpy(), kind_of(part.schedule.scheduler).get_state(part.schedule.scheduler))
                 for index, part in sorted(self.parts.items())}]

    def drop(self, generation) -> list:
        """The stage is over (or re-laid): free the bands."""
        if generation == self.generation:
            self.generation, self.job, self.parts, self.local = None, None, {}, {}
        return [None]

    # -- a step ------------------------------------------------------------------------------------------------
    def predict(self, generation, step: int, *halos: dict) -> list:
        """9a for this worker's batches: windows cut from its bands and the halo rows it received, predicted in the
        reference's batches; returns each other owner's share of the predictions (rows of its parts)."""
        self._check(generation)
        started, job = time.perf_counter(), self.job
        layout = job.layout
        rects = layout.rects(step)
        span = layout.reach(self.slot, rects)
        outgoing: dict[int, dict[int, list[Contribution]]] = defaultdict(lambda: defaultdict(list))
        self.local = {index: [] for index in self.parts}
        views = 0
        if span is not None:
            rows = self._rows(*span, halos)
            schedule = next(iter(self.parts.values())).schedule
            timestep, input_scale = schedule.timestep(step), schedule.input_scale(step)
            for batch in layout.batches_of(self.slot):
                ids = np.arange(batch.start, batch.stop)
                batch_rects = rects[ids]
                windows = np.stack([rows[:, t - span[0] : b - span[0], l:r] for t, l, b, r in batch_rects])
                args = (job.context, windows, float(timestep), input_scale, ids, batch_rects)
                if job.control is not None:
                    from ..models.controlnet import control_crops

                    shifted = batch_rects - np.array([job.control_row0, 0, job.control_row0, 0])
                    args = (*args, control_crops(job.control, shifted, job.vae_scale_factor))
                predictions = np.asarray(self.predict_views(*args))
                views += len(ids)
                for k, view in enumerate(ids):
                    top, bottom = int(batch_rects[k, 0]), int(batch_rects[k, 2])
                    for index in layout.parts_in(top, bottom):
                        lo, hi = layout.rows(index)
                        owner = layout.owners[index]  # a piece for another worker is a copy, its own a view
                        piece = crop_rows(int(view), batch_rects[k], predictions[k], max(lo, top), min(hi, bottom),
                                          contiguous=owner != self.slot)
                        (self.local[index] if owner == self.slot else outgoing[owner][index]).append(piece)
        readers = sorted(owner for source, owner in layout.contributions(step) if source == self.slot)
        messages = [dict(outgoing.get(owner, {})) for owner in readers]
        return messages + [self._status(step, "predict", views, time.perf_counter() - started)]

    def reduce_step(self, generation, step: int, *shares: dict) -> list:
        """9b-9c for this worker's bands: every prediction covering them summed in global view order (over the band's
        blend weights, summed again only when its views change), the prior, one scheduler step; returns the halo
        rows the others read at the next step."""
        self._check(generation)
        started, job = time.perf_counter(), self.job
        finite = True
        for index, part in self.parts.items():
            contributions = self.local.get(index, []) + [c for share in shares for c in share.get(index, [])]
            eps = reduce_part(contributions, part.rows, tuple(part.latents.shape), job.blend, job.sigma_fraction,
                              part.weights)
            part.latents = prior_and_step(part.latents, eps, part.schedule, step, row0=part.rows[0])
            finite = finite and is_finite(part.latents)
        self.local = {}
        return self._halos(step + 1) + [self._status(step, "reduce_step", 0, time.perf_counter() - started, finite)]

    def decode(self, generation, *halos: dict) -> list:
        """Step 10 for this worker's bands: the VAE tiles that reach them, cut from its bands and the halo rows it
        received, blended into 8-bit pixel rows; returns each chunk of :meth:`TileGrid.chunks` of each part (row
        order), byte for byte the whole decode's rows there (:func:`decode_float_rows`)."""
        self._check(generation)
        started, job = time.perf_counter(), self.job
        grid, f = job.decode, job.vae_scale_factor
        spans = [grid.span(*part.rows) for _, part in sorted(self.parts.items())]
        lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
        rows = torch.from_numpy(self._rows(lo, hi, halos))[None]

        def tile_map(method: str, calls):
            assert method == "decode_tile", method
            return (self.decode_tile(*call) for call in calls)

        chunks = [to_uint8(band) for _, part in sorted(self.parts.items())
                  for _rows, band in decode_float_rows(tile_map, rows, lo, grid, f, part.rows)]
        last = next(iter(self.parts.values())).schedule.num_steps
        return chunks + [self._status(last, "decode", 0, time.perf_counter() - started)]

    # -- helpers -------------------------------------------------------------------------------------------------
    def _check(self, generation) -> None:
        if self.generation is None or generation != self.generation:
            missing = PartsMissing(f"worker {self.slot} holds no parts of stage generation {generation!r} "
                                   "(restarted, or re-laid after a loss)")
            missing.slot = self.slot
            raise missing

    def _rows(self, lo: int, hi: int, halos: tuple[dict, ...]) -> np.ndarray:
        """Latent rows ``[lo, hi)`` (C, hi - lo, W) from this worker's bands and the halo rows it received."""
        some = next(iter(self.parts.values())).latents
        rows = np.empty((some.shape[1], hi - lo, some.shape[3]), dtype=np.float32)
        filled = 0
        for part in self.parts.values():
            a, b = max(part.rows[0], lo), min(part.rows[1], hi)
            if a < b:
                rows[:, a - lo : b - lo] = part.latents[0, :, a - part.rows[0] : b - part.rows[0]].numpy()
                filled += b - a
        for halo in halos:
            for (a, b), block in halo.values():
                rows[:, a - lo : b - lo] = block
                filled += b - a
        if filled != hi - lo:
            raise ValueError(f"worker {self.slot}: rows {lo}..{hi} were assembled from {filled} rows")
        return rows

    def _halos(self, step: int) -> list[dict]:
        """For each worker that reads rows of this one's bands at ``step`` (in slot order):
        ``{part: ((lo, hi), rows)}``; after the last step, the rows of the decode's tiles."""
        moves = self.job.moves(step, next(iter(self.parts.values())).schedule.num_steps)
        readers = sorted(reader for source, reader in moves if source == self.slot)
        messages = []
        for reader in readers:
            message = {}
            for index, lo, hi in moves[(self.slot, reader)]:
                part = self.parts[index]
                block = part.latents[0, :, lo - part.rows[0] : hi - part.rows[0]]
                message[index] = ((lo, hi), np.ascontiguousarray(block.numpy()))
            messages.append(message)
        return messages

    def _status(self, step: int, what: str, views: int, seconds: float, finite: bool = True) -> dict:
        return {"slot": self.slot, "step": step, "call": what, "views": views, "seconds": seconds, "finite": finite}


def part_schedule(schedule: StageSchedule, rows: tuple[int, int], levels: int, step: int,
                  state: dict | None) -> StageSchedule:
    """A band's own schedule at ``step``: a copy of the stage's scheduler positioned there, with the band's rows of
    a multistep solver's memory (``state``, already cut) and of the prior (``G`` has one row per 2^J latent rows)."""
    import copy

    f = 2**levels
    lo, hi = rows[0] // f, rows[1] // f
    prior = schedule.prior  # None until the owners have made it from the pixels (PixelStart)
    band = None if prior is None else dataclasses.replace(prior, low=prior.low[..., lo:hi, :].clone(),
                                                          noise_low=prior.noise_low[..., lo:hi, :].clone())
    scheduler = copy.deepcopy(schedule.scheduler)
    if hasattr(scheduler, "set_begin_index"):  # stateful schedulers count their steps from here
        scheduler.set_begin_index(schedule.start_index + step)
    kind_of(scheduler).set_state(scheduler, state)
    return dataclasses.replace(schedule, scheduler=scheduler, prior=band)
