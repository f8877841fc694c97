"""The owner's per-step CPU work on one row band (issue 34, "Past one driver"), before vs after, side by side: prints
one JSON object (the last line of stdout) and writes it to ``--output``.

    python bench/reduce_step.py [--owners 8,16] [--latent 2048] [--repeats 15] [--threads 1]
                                [--output bench/results/reduce-step-cpu.json]

What is timed (CPU seconds, ``time.process_time``, one torch thread as bench/scale_sim.py's actors pin), per band of
a 16K SDXL stage (latent 2048 x 2048, 4 channels, tile 128 / stride 64: 961 views, view_batch_size 4, uniform blend,
no jitter, Euler with SDXL's config, the Haar prior at J = 1 active, as bench/scale_sim.py runs it), for the middle
worker of an even layout of ``--owners`` bands:

  * ``reduce_step``: ``PartOwner.reduce_step`` on the band, what sits on the owner's critical path every step: the
    blend of every prediction piece covering the band (its own pieces and those other workers sent), the Haar prior,
    ONE Euler step, the finite check, the halo rows cut for the neighbours. ``after`` is the package's code;
    ``before`` is the same method over the functions as they were (``Before`` below: a verbatim copy of
    ``add_view``, ``reduce_part``, ``haar_low_band_change``, ``inject_global_prior`` of the commit before this
    change, kept here only for the comparison; ``prior_and_step`` is the package's, bound to those). ``after`` is
    timed in the steady state (the band's blend weights cached from the step before, as every step but a stage's
    first) and once cold (``after_first_step``: the weights summed in that call);
  * ``crop_rows``: the predicting worker cutting its batch predictions into pieces per band (in ``predict``): before,
    every piece made contiguous (a copy wherever a band edge cut the view's rows); after, only the pieces sent to
    other workers (its own pieces stay views of the prediction).

``before`` and ``after`` alternate repetition by repetition (after warm-up), medians reported, and ``ratio`` =
after / before. Every repetition starts from the same band, pieces and scheduler position, and the outputs (the
band's next latent, the halo rows, the finite flag) of both paths are compared with ``torch.equal``; ``bitwise``
further checks, on a small latent, the reference's whole-latent path (``reduce_predictions`` + ``prior_and_step``)
and the owners' for the Gaussian blend, J = 2, DDIM, FlowMatchEuler (the flow prior) and the 'zt' prior, with
inputs salted with -0.0 blocks (the sign of zero is where a reordered sum would show first).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import load_average, log, rounded  # noqa: E402  (bench/common.py)

TILE, STRIDE, CHANNELS, BATCH = 128, 64, 4, 4
DEFAULT_OUTPUT = "bench/results/reduce-step-cpu.json"


# ---------------------------------------------------------------------------------------------------------------
# Before: the functions as they were before this change (verbatim but for names), for the comparison only
# ---------------------------------------------------------------------------------------------------------------
class Before:
    """The owner's step functions of the commit before (method/step.py, method/parts.py, method/prior.py)."""

    @staticmethod
    def add_view(total, weight, rect, rows, prediction, window, row0=0):
        top, left, bottom, right = (int(v) for v in rect)
        lo, hi = rows
        target = (slice(lo - row0, hi - row0), slice(left, right))
        if window is None:
            total[(..., *target)] += prediction
            weight[target] += 1.0
        else:
            w = window[lo - top : hi - top]
            total[(..., *target)] += prediction * w
            weight[target] += w

    @staticmethod
    def window_weights(height, width, blend, sigma_fraction):
        from cupscale_dist.method.step import window_weights

        return window_weights.__wrapped__(height, width, blend, sigma_fraction)  # the same formula, uncached then

    @classmethod
    def windows(cls, blend, sigma_fraction):
        cache = {}

        def window(rect):
            size = (int(rect[2] - rect[0]), int(rect[3] - rect[1]))
            if size not in cache:
                cache[size] = cls.window_weights(*size, blend, sigma_fraction)
            return cache[size]

        return window

    @staticmethod
    def crop_rows(view, rect, prediction, lo, hi):
        top = int(rect[0])
        return view, np.asarray(rect), lo, hi, np.ascontiguousarray(prediction[:, lo - top : hi - top])

    @classmethod
    def reduce_part(cls, contributions, rows, shape, blend, sigma_fraction):
        lo, hi = rows
        total = torch.zeros((*shape[:-2], hi - lo, shape[-1]), dtype=torch.float32)
        weight = torch.zeros((hi - lo, shape[-1]), dtype=torch.float32)
        windows = cls.windows(blend, sigma_fraction)
        for _view, rect, a, b, prediction in sorted(contributions, key=lambda c: c[0]):
            cls.add_view(total, weight, rect, (a, b), torch.from_numpy(np.asarray(prediction)), windows(rect), row0=lo)
        if not torch.all(weight > 0):
            raise ValueError(f"rows {lo}..{hi}: some pixels got no view's prediction")
        return total / weight

    @classmethod
    def reduce_predictions(cls, batches, views, latent_shape, blend="uniform", sigma_fraction=0.3):
        total = torch.zeros(latent_shape, dtype=torch.float32)
        weight = torch.zeros(latent_shape[-2:], dtype=torch.float32)
        windows = cls.windows(blend, sigma_fraction)
        for view_ids, predictions in batches:
            for k, view in enumerate(view_ids):
                rect = views[view]
                cls.add_view(total, weight, rect, (int(rect[0]), int(rect[2])), predictions[k], windows(rect))
        return total / weight

    @staticmethod
    def haar_low_band_change(x, target_low, weight, levels):
        f = 2**levels
        change = weight * (target_low - F.avg_pool2d(x, f) * f) / f
        return F.interpolate(change, scale_factor=f, mode="nearest")

    @classmethod
    def blend_low_band(cls, x, target_low, weight, wavelet, levels):
        assert wavelet == "haar"
        return x + cls.haar_low_band_change(x, target_low, weight, levels)

    @classmethod
    def inject_global_prior(cls, eps, z_t, prior, weight, alpha, sigma, codec=None):
        assert codec is None and prior.wavelet == "haar"
        x0 = (z_t - sigma * eps) / alpha
        return eps - (alpha / sigma) * cls.haar_low_band_change(x0, prior.low, weight, prior.levels)

    @classmethod
    def inject_global_prior_flow(cls, velocity, z_t, prior, weight, sigma, codec=None):
        assert codec is None and prior.wavelet == "haar"
        x0 = z_t - sigma * velocity
        return velocity - cls.haar_low_band_change(x0, prior.low, weight, prior.levels) / sigma

    @classmethod
    def inject_global_prior_zt(cls, z_prev, prior, weight, alpha, sigma):
        return cls.blend_low_band(z_prev, alpha * prior.low + sigma * prior.noise_low, weight, prior.wavelet,
                                  prior.levels)

    @classmethod
    def prior_and_step(cls, latents, eps, schedule, step, row0=0):
        """The package's ``prior_and_step`` (this change left its body as it was) over the injections above: the same
        code object with those three names bound to the before-versions, made once (no per-call cost)."""
        if "_prior_and_step" not in cls.__dict__:
            import types

            from cupscale_dist.method.step import prior_and_step

            names = {name: getattr(cls, name) for name in
                     ("inject_global_prior", "inject_global_prior_flow", "inject_global_prior_zt")}
            cls._prior_and_step = staticmethod(types.FunctionType(
                prior_and_step.__code__, {**prior_and_step.__globals__, **names}, "prior_and_step",
                prior_and_step.__defaults__))
        return cls._prior_and_step(latents, eps, schedule, step, row0)

    @classmethod
    def reduce_step(cls, owner, generation, step, *shares):
        """``PartOwner.reduce_step`` as it was (the same body, over the functions above)."""
        from cupscale_dist.method.step import is_finite

        owner._check(generation)
        started, job = time.perf_counter(), owner.job
        finite = True
        for index, part in owner.parts.items():
            contributions = owner.local.get(index, []) + [c for share in shares for c in share.get(index, [])]
            eps = cls.reduce_part(contributions, part.rows, tuple(part.latents.shape), job.blend, job.sigma_fraction)
            part.latents = cls.prior_and_step(part.latents, eps, part.schedule, step, row0=part.rows[0])
            finite = finite and is_finite(part.latents)
        owner.local = {}
        return owner._halos(step + 1) + [owner._status(step, "reduce_step", 0, time.perf_counter() - started, finite)]


# ---------------------------------------------------------------------------------------------------------------
# One band of a stage, as an owner holds it at a step
# ---------------------------------------------------------------------------------------------------------------
def make_scheduler(kind: str, steps: int, start: int):
    import diffusers

    from cupscale_dist.method.schedulers import KINDS
    from cupscale_dist.testing.tiny import SCHEDULER_CONFIG

    config = dict(SCHEDULER_CONFIG)
    if kind == "flow_euler":
        config = {"num_train_timesteps": 1000, "shift": 3.0}
    scheduler = getattr(diffusers, KINDS[kind].class_name).from_config({**KINDS[kind].defaults, **config})
    scheduler.set_timesteps(steps, device="cpu")
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler


@dataclasses.dataclass
class Band:
    """A worker's band at a step: the owner (real ``PartOwner``), its own pieces and the shares other workers sent."""

    owner: object
    latents: torch.Tensor  # the band's latent before the step
    local_before: dict  # {part: [pieces]}: every piece contiguous (the old crop_rows)
    local_after: dict  # the pieces as the new crop_rows gives them (own pieces views)
    shares: list  # the messages of other workers: {part: [pieces]}, contiguous
    own_predictions: list  # (view, rect, prediction) this worker predicted (for the crop timing)


def make_band(side: int, owners: int, *, blend="uniform", levels=1, scheduler="euler", prior_target="x0",
              jitter=0, seed=0, salt_zeros=False, worker=None) -> Band:
    from cupscale_dist.execution.partowner import Part, PartJob, PartOwner, part_schedule
    from cupscale_dist.method.parts import StageLayout, crop_rows
    from cupscale_dist.method.prior import GlobalPrior
    from cupscale_dist.method.step import StageSchedule
    from cupscale_dist.method.views import make_views

    steps, start = 30, 27
    tile, stride = min(TILE, side // 2), min(STRIDE, side // 4)
    views = make_views(side, side, tile, stride)
    layout = StageLayout.even(list(range(owners)), views, (side, side), BATCH, 2**levels, jitter=jitter, seed=seed)
    g = torch.Generator().manual_seed(seed)
    z_low = torch.randn(1, CHANNELS, side, side, generator=g)
    noise = torch.randn(1, CHANNELS, side, side, generator=g)
    sched = make_scheduler(scheduler, steps, start)
    prior = GlobalPrior.from_latent(z_low, noise, "haar", levels)
    schedule = StageSchedule(sched, start, prior, prior_target, 1.0, "cosine", seed=seed)
    schedule.input_scale(0)  # the pipeline scales the model input before stepping (Euler checks it)
    from cupscale_dist.method.schedulers import kind_of

    latents = kind_of(sched).add_noise(sched, z_low, noise, sched.timesteps[start : start + 1])
    rng = np.random.default_rng(seed)
    step = 0
    rects = layout.rects(step)
    predictions = {v: rng.standard_normal((CHANNELS, int(r[2] - r[0]), int(r[3] - r[1])), dtype=np.float32)
                   for v, r in enumerate(rects)}
    if salt_zeros:  # -0.0 latent blocks whose prediction is +0.0 everywhere: x0 = -0.0 there
        f = 2**levels
        for y in range(0, side, side // 4):
            latents[..., y : y + f, 3 * f : 5 * f] = -0.0
            for v, r in enumerate(rects):
                top, left, bottom, right = (int(x) for x in r)
                if top <= y < bottom:
                    a, b = max(left, 3 * f), min(right, 5 * f)
                    if a < b:
                        predictions[v][:, y - top : y - top + f, a - left : b - left] = 0.0
    worker = layout.workers[len(layout.workers) // 2] if worker is None else worker
    owner = PartOwner(predict=None, slot=worker)
    owner.generation = ("bench", 0)
    owner.job = PartJob(layout, None, blend, 0.3, 8)
    owner.parts = {}
    for index in layout.parts_of(worker):
        rows = layout.rows(index)
        owner.parts[index] = Part(index, rows, latents[..., rows[0] : rows[1], :].clone(),
                                  part_schedule(schedule, rows, levels, 0, None))
    mine = set(layout.parts_of(worker))
    local_before, local_after, shares, own = {i: [] for i in mine}, {i: [] for i in mine}, {}, []
    for batch, predictor in zip(layout.batches, layout.batch_worker):
        for view in batch:
            top, bottom = int(rects[view, 0]), int(rects[view, 2])
            if predictor == worker:
                own.append((view, rects[view], predictions[view]))
            for index in layout.parts_in(top, bottom):
                if index not in mine:
                    continue
                lo, hi = layout.rows(index)
                a, b = max(lo, top), min(hi, bottom)
                if predictor == worker:
                    local_before[index].append(Before.crop_rows(view, rects[view], predictions[view], a, b))
                    local_after[index].append(crop_rows(view, rects[view], predictions[view], a, b, contiguous=False))
                else:
                    shares.setdefault(int(predictor), {}).setdefault(index, []).append(
                        crop_rows(view, rects[view], predictions[view], a, b))
    return Band(owner, latents, local_before, local_after, [shares[k] for k in sorted(shares)], own)


def reset(band: Band, local: dict, parts_state: dict) -> None:
    """The band as it was before the step: its latent rows, its schedulers' position, its own pieces."""
    for index, part in band.owner.parts.items():
        part.latents = parts_state[index][0]
        part.schedule = dataclasses.replace(part.schedule, scheduler=copy.deepcopy(parts_state[index][1]))
    band.owner.local = {i: list(pieces) for i, pieces in local.items()}


def run_step(band: Band, path: str, parts_state: dict, step: int = 0):
    """One reduce_step of the band by ``path`` ('before' / 'after') -> (CPU s, wall s, outputs)."""
    reset(band, band.local_before if path == "before" else band.local_after, parts_state)
    cpu, wall = time.process_time(), time.perf_counter()
    if path == "before":
        out = Before.reduce_step(band.owner, band.owner.generation, step, *band.shares)
    else:
        out = band.owner.reduce_step(band.owner.generation, step, *band.shares)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    latents = {i: p.latents for i, p in band.owner.parts.items()}
    return cpu, wall, (latents, out[:-1], out[-1]["finite"])


def same(a, b) -> bool:
    (la, ha, fa), (lb, hb, fb) = a, b
    if fa != fb or la.keys() != lb.keys() or len(ha) != len(hb):
        return False
    if not all(torch.equal(la[i], lb[i]) and torch.equal(torch.signbit(la[i]), torch.signbit(lb[i])) for i in la):
        return False
    for ma, mb in zip(ha, hb):
        if ma.keys() != mb.keys():
            return False
        for k in ma:
            (ra, xa), (rb, xb) = ma[k], mb[k]
            if ra != rb or not np.array_equal(xa, xb) or not np.array_equal(np.signbit(xa), np.signbit(xb)):
                return False
    return True


def state_of(band: Band) -> dict:
    return {i: (p.latents, copy.deepcopy(p.schedule.scheduler)) for i, p in band.owner.parts.items()}


# ---------------------------------------------------------------------------------------------------------------
# Timings
# ---------------------------------------------------------------------------------------------------------------
def time_band(side: int, owners: int, repeats: int, warmup: int) -> dict:
    from cupscale_dist.method.parts import crop_rows

    band = make_band(side, owners)
    state = state_of(band)
    rows = [band.owner.parts[i].rows for i in sorted(band.owner.parts)]
    pieces = sum(len(v) for v in band.local_before.values()) + sum(len(p) for s in band.shares for p in s.values())
    # the first step of a stage: the band's weights are summed in the call (a fresh BlendWeights)
    cold = []
    for _ in range(max(3, repeats // 3)):
        for part in band.owner.parts.values():
            part.weights = type(part.weights)()
        cold.append(run_step(band, "after", state)[0])
    times = {"before": [], "after": []}
    walls = {"before": [], "after": []}
    outputs = {}
    for rep in range(warmup + repeats):
        for path in (("before", "after") if rep % 2 == 0 else ("after", "before")):
            cpu, wall, out = run_step(band, path, state)
            outputs[path] = out
            if rep >= warmup:
                times[path].append(cpu)
                walls[path].append(wall)
    equal = same(outputs["before"], outputs["after"])
    # crop_rows in predict: this worker's own predictions cut into pieces per part (before: all copied)
    layout = band.owner.job.layout

    def crop(fn, contiguous_for_own):
        for view, rect, prediction in band.own_predictions:
            top, bottom = int(rect[0]), int(rect[2])
            for index in layout.parts_in(top, bottom):
                lo, hi = layout.rows(index)
                own = layout.owners[index] == band.owner.slot
                args = (view, rect, prediction, max(lo, top), min(hi, bottom))
                fn(*args) if contiguous_for_own is None else fn(*args, contiguous=not own)

    crops = {"before": [], "after": []}
    for rep in range(warmup + repeats):
        for path in (("before", "after") if rep % 2 == 0 else ("after", "before")):
            t0 = time.process_time()
            crop(Before.crop_rows, None) if path == "before" else crop(crop_rows, True)
            if rep >= warmup:
                crops[path].append(time.process_time() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    crop_med = {k: statistics.median(v) for k, v in crops.items()}
    return {"owners": owners, "worker": band.owner.slot, "band_rows": rows, "pieces": pieces,
            "own_views": len(band.own_predictions),
            "reduce_step_cpu_s": {"before": med["before"], "after": med["after"],
                                  "ratio": med["after"] / med["before"],
                                  "after_first_step": statistics.median(cold),
                                  "before_min": min(times["before"]), "after_min": min(times["after"]),
                                  "wall_before": statistics.median(walls["before"]),
                                  "wall_after": statistics.median(walls["after"])},
            "crop_rows_cpu_s": {"before": crop_med["before"], "after": crop_med["after"],
                                "ratio": crop_med["after"] / crop_med["before"] if crop_med["before"] else None},
            "bitwise_equal": equal}


def phase_profile(side: int, owners: int, repeats: int) -> dict:
    """Where the band's reduce_step CPU goes, before and after (each phase timed alone, medians)."""
    from cupscale_dist.method.parts import reduce_part
    from cupscale_dist.method.prior import inject_global_prior, noise_level
    from cupscale_dist.method.step import is_finite

    band = make_band(side, owners)
    index, part = next(iter(band.owner.parts.items()))
    contributions = band.local_before[index] + [c for s in band.shares for c in s.get(index, [])]
    after_contribs = band.local_after[index] + [c for s in band.shares for c in s.get(index, [])]
    shape = tuple(part.latents.shape)
    scheduler = part.schedule.scheduler
    alpha, sigma = noise_level(scheduler, part.schedule.start_index)
    eps = Before.reduce_part(contributions, part.rows, shape, "uniform", 0.3)
    def euler():
        scheduler._step_index = None  # the same step again (Euler restarts from its begin index)
        scheduler.step(eps, part.schedule.timestep(0), part.latents)

    phases = {
        "blend (reduce_part)": (lambda: Before.reduce_part(contributions, part.rows, shape, "uniform", 0.3),
                                lambda: reduce_part(after_contribs, part.rows, shape, "uniform", 0.3, part.weights)),
        "haar prior (inject_global_prior)": (
            lambda: Before.inject_global_prior(eps, part.latents, part.schedule.prior, 1.0, alpha, sigma),
            lambda: inject_global_prior(eps, part.latents, part.schedule.prior, 1.0, alpha, sigma)),
        "euler step (diffusers, unchanged)": (euler, euler),
        "is_finite (unchanged)": (lambda: is_finite(part.latents), lambda: is_finite(part.latents)),
        "halos (unchanged)": (lambda: band.owner._halos(1), lambda: band.owner._halos(1)),
    }
    out = {}
    for name, (before, after) in phases.items():
        before(), after()
        t = {"before": [], "after": []}
        for rep in range(repeats):
            for path, fn in ((("before", before), ("after", after)) if rep % 2 == 0 else
                             (("after", after), ("before", before))):
                t0 = time.process_time()
                fn()
                t[path].append(time.process_time() - t0)
        out[name] = {k: statistics.median(v) for k, v in t.items()}
    return out


# ---------------------------------------------------------------------------------------------------------------
# Bytes: the same outputs, on small latents, for every branch the change touched
# ---------------------------------------------------------------------------------------------------------------
def bitwise_checks() -> dict:
    from cupscale_dist.method.prior import GlobalPrior
    from cupscale_dist.method.step import StageSchedule, prior_and_step, reduce_predictions
    from cupscale_dist.method.views import make_views

    out = {}
    cases = {"uniform-J1-euler": {}, "gaussian-J1-euler": {"blend": "gaussian"}, "uniform-J2-euler": {"levels": 2},
             "uniform-J1-ddim": {"scheduler": "ddim"}, "uniform-J1-flow": {"scheduler": "flow_euler"},
             "gaussian-J2-zt-euler": {"blend": "gaussian", "levels": 2, "prior_target": "zt"},
             "jitter-gaussian-J1-dpmpp_2m": {"blend": "gaussian", "jitter": 3, "scheduler": "dpmpp_2m"}}
    for name, options in cases.items():
        results = []
        for owners in (3, 5):
            band = make_band(128, owners, salt_zeros=True, seed=7, **options)
            state = state_of(band)
            before = run_step(band, "before", state)[2]
            after = run_step(band, "after", state)[2]
            again = run_step(band, "after", state)[2]  # the band's cached weights
            results.append(same(before, after) and same(before, again))
        out[f"owners:{name}"] = all(results)
    # the reference's whole-latent path (reduce_predictions + prior_and_step), salted with -0.0 blocks
    for blend, levels, kind, target in (("uniform", 1, "euler", "x0"), ("gaussian", 2, "ddim", "x0"),
                                        ("uniform", 1, "flow_euler", "x0"), ("gaussian", 1, "euler", "zt")):
        side = 96
        views = make_views(side, side, 32, 16)
        g = torch.Generator().manual_seed(3)
        z = torch.randn(1, CHANNELS, side, side, generator=g)
        z[..., 8:16, 8:16] = -0.0
        preds = torch.randn(len(views), CHANNELS, 32, 32, generator=g)
        preds[..., :8, :8] = 0.0
        batches = [(range(i, min(i + 4, len(views))), preds[i : i + 4]) for i in range(0, len(views), 4)]
        prior = GlobalPrior.from_latent(torch.randn(1, CHANNELS, side, side, generator=g), z.clone(), "haar", levels)
        outs = []
        for path in ("before", "after"):
            scheduler = make_scheduler(kind, 30, 27)
            schedule = StageSchedule(scheduler, 27, prior, target, 1.0, "cosine")
            schedule.input_scale(0)
            reduce = Before.reduce_predictions if path == "before" else reduce_predictions
            step = Before.prior_and_step if path == "before" else prior_and_step
            eps = reduce(batches, views, z.shape, blend, 0.3)
            outs.append((eps, step(z, eps, schedule, 0)))
        (e0, z0), (e1, z1) = outs
        out[f"reference:{blend}-J{levels}-{kind}-{target}"] = bool(
            torch.equal(e0, e1) and torch.equal(z0, z1) and torch.equal(torch.signbit(z0), torch.signbit(z1)))
    # the Haar block mean alone vs F.avg_pool2d, on values of huge range and -0.0 blocks (any reordering shows)
    from cupscale_dist.method.prior import block_mean

    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 4, 64, 96, generator=g) * torch.exp(8 * torch.randn(2, 4, 64, 96, generator=g))
    x[..., :8, :8] = -0.0  # blocks of -0.0 (the kernel's sum from 0 gives +0.0)
    x[..., 0, 8:16, 8:16] = 0.0  # blocks whose mean underflows to -0.0 (the kernel's 0 + mean gives +0.0)
    x[..., 0, 8:16:2, 8:16:2] = -torch.finfo(torch.float32).smallest_normal * 2**-23
    for f in (2, 4, 8):
        a, b = F.avg_pool2d(x, f), block_mean(x, f)
        out[f"block_mean_vs_avg_pool2d:f{f}"] = bool(torch.equal(a, b) and torch.equal(a.signbit(), b.signbit()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--owners", default="8,16", help="bands of the 16K latent (comma list)")
    parser.add_argument("--latent", type=int, default=2048, help="latent side (2048 = 16K pixels)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started, load_before = time.perf_counter(), load_average()
    log("bitwise checks ...")
    bitwise = bitwise_checks()
    rows = []
    for owners in (int(v) for v in args.owners.split(",")):
        log(f"latent {args.latent}, {owners} owners ...")
        rows.append(time_band(args.latent, owners, args.repeats, args.warmup))
        log(json.dumps(rounded(rows[-1])))
    owners0 = int(args.owners.split(",")[0])
    log(f"phases at {owners0} owners ...")
    phases = phase_profile(args.latent, owners0, max(5, args.repeats // 2))
    result = {
        "bench": "reduce_step", "command": "python " + " ".join(sys.argv),
        "torch": torch.__version__, "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "geometry": {"latent": args.latent, "channels": CHANNELS, "tile": TILE, "stride": STRIDE, "batch": BATCH,
                     "blend": "uniform", "prior": "haar J=1 x0, active", "scheduler": "euler (SDXL config)"},
        "rows": rows, "phases_cpu_s": {"owners": owners0, **phases}, "bitwise": bitwise,
        "all_bitwise_equal": all(bitwise.values()) and all(r["bitwise_equal"] for r in rows),
        "load_average_after": load_average(), "bench_seconds": time.perf_counter() - started,
    }
    result = rounded(result, 4)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
