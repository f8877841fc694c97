"""The stage latent in row bands ("parts") owned by the workers (issue 34, docs/distributed.md "The step on the
actors"): which rows each part holds, which view batches each worker predicts, what moves between workers at a
step, and the per-part blend that gives the whole latent's bytes.

Why the bytes do not depend on the layout (any worker count, any bounds): every per-pixel operation of a step is
elementwise (the blend's sums and its division, the Haar prior on 2^J-aligned blocks, the scheduler's step), and a
pixel's contributions are summed in global view order wherever it lives (:func:`cupscale_dist.method.step.add_view`
is the one accumulation, for the whole latent and for a part). View batches stay the fixed units of the reference
(``view_batches``), so each batch's predictions are the reference's too.

Pure: numpy/torch in, numpy/torch out; the worker side is :class:`cupscale_dist.execution.partowner.PartOwner`, the
driver side :mod:`cupscale_dist.execution.partloop`.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from .step import ViewWindows, add_view
from .views import step_views, view_batches


# ---------------------------------------------------------------------------------------------------------------
# Who owns what
# ---------------------------------------------------------------------------------------------------------------
def split_rows(height: int, count: int, align: int) -> tuple[int, ...]:
    """Bounds of ``count`` row bands over ``height`` latent rows, as even as multiples of ``align`` allow
    (``align`` = 2^J: the Haar prior's blocks never straddle two parts). Fewer bands when rows run out."""
    blocks = height // align
    count = max(1, min(count, blocks))
    return tuple(int(round(k * blocks / count)) * align for k in range(count)) + (height,)


@dataclass(frozen=True)
class StageLayout:
    """One stage's split of the latent among workers, and everything a worker needs to plan a step alone.

    Part ``p`` holds rows ``[bounds[p], bounds[p + 1])`` and lives on worker slot ``owners[p]``; the view batches
    (``view_batches(len(views), batch_size)``, the reference's units) are dealt to the workers in contiguous runs,
    in the row order of their first part, so each worker predicts views near the rows it holds.
    """

    bounds: tuple[int, ...]
    owners: tuple[int, ...]  # worker slot of each part
    views: np.ndarray  # (N, 4) the stage's views before jitter
    latent_hw: tuple[int, int]
    batch_size: int
    jitter: int = 0
    seed: int = 0
    stage: int = 0
    # per step: its rects, halo and contribution plans (each worker and the driver ask for them several times a step)
    _plans: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if len(self.bounds) != len(self.owners) + 1 or self.bounds[0] != 0 or self.bounds[-1] != self.latent_hw[0]:
            raise ValueError(f"layout bounds {self.bounds} do not cover {self.latent_hw[0]} rows in "
                             f"{len(self.owners)} parts")
        if any(b <= a for a, b in zip(self.bounds, self.bounds[1:])):
            raise ValueError(f"layout bounds {self.bounds} hold an empty part")

    @classmethod
    def even(cls, workers: list[int], views: np.ndarray, latent_hw, batch_size: int, align: int,
             **options) -> StageLayout:
        """One part per worker, even row bands aligned to ``align`` (fewer workers own parts when rows run out)."""
        bounds = split_rows(latent_hw[0], len(workers), align)
        return cls(bounds, tuple(workers[: len(bounds) - 1]), views, tuple(latent_hw), batch_size, **options)

    # -- parts ----------------------------------------------------------------------------------------------
    @property
    def num_parts(self) -> int:
        return len(self.owners)

    def rows(self, part: int) -> tuple[int, int]:
        return self.bounds[part], self.bounds[part + 1]

    @cached_property
    def workers(self) -> tuple[int, ...]:
        """The slots that own parts, in the row order of their first part."""
        return tuple(dict.fromkeys(self.owners))

    def parts_of(self, worker: int) -> list[int]:
        return [p for p, owner in enumerate(self.owners) if owner == worker]

    def parts_in(self, lo: int, hi: int) -> range:
        """Parts holding any of rows ``[lo, hi)``."""
        return range(bisect.bisect_right(self.bounds, lo) - 1, bisect.bisect_left(self.bounds, hi))

    # -- work --------------------------------------------------------------------------------------------------
    @cached_property
    def batches(self) -> list[range]:
        return view_batches(len(self.views), self.batch_size)

    @cached_property
    def batch_worker(self) -> np.ndarray:
        """The worker slot of each batch: contiguous runs over :attr:`workers` whose largest holds as few views as
        possible (a batch's cost is its views: the short last batch does not count as a full one). By plain batch
        counts 16 workers at 16K were capped at 0.94 of ideal (bench/scale_sim.py); this gives 0.985."""
        workers, sizes = self.workers, [len(b) for b in self.batches]
        cap = smallest_largest_run(sizes, len(workers))
        share = sum(sizes) / len(workers)  # runs also end near each worker's share, so none is left idle needlessly
        for spread in (True, False):  # spread: runs end near k * share; else greedy up to the cap (always fits)
            out, run, held, before = [], 0, 0, 0
            for size in sizes:
                if held and (held + size > cap or (spread and before + size / 2 > (run + 1) * share)):
                    run, held = run + 1, 0
                out.append(run)
                held, before = held + size, before + size
            if run < len(workers):
                return np.asarray([workers[r] for r in out], dtype=np.int64)
        raise AssertionError("a greedy fill up to the least cap always fits")  # smallest_largest_run's contract

    def batches_of(self, worker: int) -> list[range]:
        return self._by_worker.get(worker, [])

    @cached_property
    def _by_worker(self) -> dict[int, list[range]]:
        out = defaultdict(list)
        for batch, worker in zip(self.batches, self.batch_worker):
            out[int(worker)].append(batch)
        return dict(out)

    def _plan(self, what: str, step: int, make):
        key = (what, step)
        if key not in self._plans:
            if len(self._plans) > 64:  # a stage's steps come in order: old plans are not asked for again
                self._plans.clear()
            self._plans[key] = make()
        return self._plans[key]

    def rects(self, step: int) -> np.ndarray:
        """The views at ``step``: jittered from the seed exactly as the reference does (method.md step 5)."""
        return self._plan("rects", step, lambda: step_views(self.views, *self.latent_hw, self.jitter, self.seed,
                                                            self.stage, step))

    # -- what moves at a step ----------------------------------------------------------------------------------
    def reach(self, worker: int, rects: np.ndarray) -> tuple[int, int] | None:
        """Rows ``[lo, hi)`` the views of ``worker``'s batches cover at a step (None: it predicts nothing)."""
        ids = [i for batch in self.batches_of(worker) for i in batch]
        if not ids:
            return None
        return int(rects[ids, 0].min()), int(rects[ids, 2].max())

    def halo(self, step: int) -> dict[tuple[int, int], list[tuple[int, int, int]]]:
        """What each worker reads of others' parts at ``step``: ``{(source, reader): [(part, lo, hi), ...]}``."""
        return self._plan("halo", step, lambda: self._halo(step))

    def _halo(self, step: int) -> dict[tuple[int, int], list[tuple[int, int, int]]]:
        rects = self.rects(step)
        return self._reads({reader: self.reach(reader, rects) for reader in self.workers})

    def decode_halo(self, grid) -> dict[tuple[int, int], list[tuple[int, int, int]]]:
        """What each worker reads of others' parts to decode its own (step 10 on the owners): the rows of the VAE
        tiles that reach its parts (``grid``: :class:`~cupscale_dist.method.vae.TileGrid`)."""
        def make():
            spans = {}
            for reader in self.workers:
                reads = [grid.span(*self.rows(part)) for part in self.parts_of(reader)]
                spans[reader] = min(a for a, _ in reads), max(b for _, b in reads)
            return self._reads(spans)

        return self._plan("decode", grid, make)

    def _reads(self, spans: dict[int, tuple[int, int] | None]) -> dict[tuple[int, int], list[tuple[int, int, int]]]:
        """``{(source, reader): [(part, lo, hi), ...]}``: the rows of ``spans`` (reader -> rows it reads) that
        other workers' parts hold."""
        moves = defaultdict(list)
        for reader, span in spans.items():
            if span is None:
                continue
            for part in self.parts_in(*span):
                source = self.owners[part]
                if source != reader:
                    a, b = self.rows(part)
                    moves[(source, reader)].append((part, max(a, span[0]), min(b, span[1])))
        return dict(moves)

    def contributions(self, step: int) -> set[tuple[int, int]]:
        """``(predictor, owner)`` pairs whose predictions cross workers at ``step``."""
        return self._plan("contributions", step, lambda: self._contributions(step))

    def _contributions(self, step: int) -> set[tuple[int, int]]:
        rects, pairs = self.rects(step), set()
        for batch, worker in zip(self.batches, self.batch_worker):
            for view in batch:
                for part in self.parts_in(int(rects[view, 0]), int(rects[view, 2])):
                    if self.owners[part] != worker:
                        pairs.add((int(worker), self.owners[part]))
        return pairs

    def memory(self, channels: int, step: int = 0) -> dict[int, dict[str, int]]:
        """Bytes each worker holds at ``step``: its parts, the halo rows it reads (float32); what ``--dry-run``
        prints per actor."""
        width, row_bytes = self.latent_hw[1], channels * self.latent_hw[1] * 4
        halo = self.halo(step)
        out = {}
        for worker in self.workers:
            own = sum(self.rows(p)[1] - self.rows(p)[0] for p in self.parts_of(worker))
            read = sum(hi - lo for (src, dst), moves in halo.items() if dst == worker for _, lo, hi in moves)
            out[worker] = {"part_rows": own, "part_bytes": own * row_bytes, "halo_rows": read,
                           "halo_bytes": read * row_bytes, "width": width}
        return out


def smallest_largest_run(sizes: list[int], runs: int) -> int:
    """The least ``cap`` such that ``sizes``, in order, split into at most ``runs`` contiguous runs of at most
    ``cap`` each (binary search over the cap, greedy fill)."""
    def fits(cap: int) -> bool:
        count, held = 1, 0
        for size in sizes:
            if held + size > cap:
                count, held = count + 1, 0
            held += size
        return count <= runs

    lo, hi = max(sizes), sum(sizes)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
    return lo


# ---------------------------------------------------------------------------------------------------------------
# The blend of one part
# ---------------------------------------------------------------------------------------------------------------
Contribution = tuple[int, np.ndarray, int, int, np.ndarray]  # (view id, rect (4,), row lo, row hi, prediction rows)


def crop_rows(view: int, rect: np.ndarray, prediction: np.ndarray, lo: int, hi: int,
              contiguous: bool = True) -> Contribution:
    """The rows ``[lo, hi)`` (global) of one view's prediction ``(C, h, w)``, as a contribution to a part: a copy of
    its own when it is sent to another worker (``contiguous``), else a view of the prediction (the owner's own)."""
    top = int(rect[0])
    rows = prediction[:, lo - top : hi - top]
    return view, np.asarray(rect), lo, hi, np.ascontiguousarray(rows) if contiguous else rows


class BlendWeights:
    """One part's MultiDiffusion weights (method.md 9b), summed once while the views that cover it stay.

    A pixel's weight is its views' window values summed in global view order (:func:`add_view`), the same every
    step of a stage without jitter: the cached map is the bytes of summing them again. It is keyed by all it is made
    of (the part's rows and width, the blend and its sigma, each contribution's view, rect and rows), so another
    layout, jittered rects or a missing view make a new one (and its check that every pixel got a view)."""

    def __init__(self):
        self.key: tuple | None = None
        self.weight: torch.Tensor | None = None

    def __call__(self, ordered: list[Contribution], rows: tuple[int, int], width: int,
                 windows: ViewWindows) -> torch.Tensor:
        """The weights of rows ``rows`` for ``ordered`` (the contributions in global view order)."""
        key = (rows, width, windows.blend, windows.sigma_fraction,
               tuple((view, a, b, *(int(v) for v in rect)) for view, rect, a, b, _ in ordered))
        if key != self.key:
            lo, hi = rows
            weight = torch.zeros((hi - lo, width), dtype=torch.float32)
            for _view, rect, a, b, _prediction in ordered:
                add_view(None, weight, rect, (a, b), None, windows(rect), row0=lo)
            if not torch.all(weight > 0):
                raise ValueError(f"rows {lo}..{hi}: some pixels got no view's prediction")
            self.key, self.weight = key, weight
        return self.weight


def reduce_part(contributions: list[Contribution], rows: tuple[int, int], shape: tuple[int, ...], blend: str,
                sigma_fraction: float, weights: BlendWeights | None = None) -> torch.Tensor:
    """MultiDiffusion for one part (method.md 9b): the contributions summed in global view order -> ``eps`` of
    rows ``[lo, hi)``, bit for bit the whole latent's ``reduce_predictions`` there. ``weights``: the part's cached
    weight map (kept by its owner from step to step), else summed for this call."""
    lo, hi = rows
    windows = ViewWindows(blend, sigma_fraction)
    ordered = sorted(contributions, key=lambda c: c[0])
    weight = (weights if weights is not None else BlendWeights())(ordered, rows, shape[-1], windows)
    total = torch.zeros((*shape[:-2], hi - lo, shape[-1]), dtype=torch.float32)
    for _view, rect, a, b, prediction in ordered:
        add_view(total, None, rect, (a, b), torch.from_numpy(np.asarray(prediction)), windows(rect), row0=lo)
    return total.div_(weight)


# ---------------------------------------------------------------------------------------------------------------
# A multistep scheduler's memory, split and joined by rows
# ---------------------------------------------------------------------------------------------------------------
def slice_state(state, lo: int, hi: int, height: int):
    """A scheduler's carried state (``SchedulerKind.get_state``) cut to rows ``[lo, hi)``: latent-shaped tensors
    (rows = ``height``) are cut, everything else is kept as it is."""
    if isinstance(state, dict):
        return {k: slice_state(v, lo, hi, height) for k, v in state.items()}
    if isinstance(state, list):
        return [slice_state(v, lo, hi, height) for v in state]
    if isinstance(state, torch.Tensor) and state.dim() == 4 and state.shape[-2] == height:
        return state[..., lo:hi, :].clone()
    return state


def join_states(states: list):
    """The inverse of :func:`slice_state` over the parts in row order."""
    first = states[0]
    if isinstance(first, dict):
        return {k: join_states([s[k] for s in states]) for k in first}
    if isinstance(first, list):
        return [join_states([s[i] for s in states]) for i in range(len(first))]
    if isinstance(first, torch.Tensor) and first.dim() == 4:
        return torch.cat(states, dim=-2)
    return first


def describe_parts(stages, config, actors: int) -> dict:
    """What ``--dry-run`` prints of the step on the actors: per stage, each actor's band and halo (rows and MB of
    float32 latent at the first step), the bound of its memory beyond its weights (docs/distributed.md)."""
    if config.step_design != "actors" or config.prior_space != "latent" or config.wavelet != "haar":
        return {"step_design": "driver", "why": "step_design='driver'" if config.step_design != "actors" else
                "the prior is not local to a band (prior_space='pixel' or a non-Haar wavelet)"}
    out = []
    for stage in stages:
        layout = StageLayout.even(list(range(actors)), stage.views, stage.latent, config.view_batch_size,
                                  2**config.dwt_levels, jitter=config.jitter, seed=config.seed, stage=stage.index)
        rows = [{"actor": worker, "part_rows": m["part_rows"], "part_mb": round(m["part_bytes"] / 2**20, 2),
                 "halo_rows": m["halo_rows"], "halo_mb": round(m["halo_bytes"] / 2**20, 2)}
                for worker, m in layout.memory(stage.latent_channels).items()]
        out.append({"stage": stage.index, "actors": rows})
    return {"step_design": "actors", "actors": actors, "stages": out}
