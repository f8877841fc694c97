"""Opening an executor: :func:`open_executor` is the one place that chooses between the in-process reference
(:class:`LocalExecutor`) and the Ray pool (:class:`~cupscale_dist.execution.pool.RayExecutor`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator

from ..config import UpscaleConfig
from ..errors import UserError
from ..models.spec import ModelSpec
from .contract import Executor
from .pool import RayExecutor, WorkerPool
from .raycluster import ClusterOptions
from .worker import ModelWorker

log = logging.getLogger(__name__)


class LocalExecutor:
    """The single-process reference: every call runs here, in order, on one :class:`ModelWorker`."""

    start_timeout_s = None  # nothing to place here (a captioner pool uses its own default)

    def __init__(self, worker: ModelWorker, batch_size: int, keep: bool = False, owners: int = 0,
                 bounds: tuple[int, ...] | None = None):
        self.worker, self.batch_size, self.keep = worker, batch_size, keep
        if owners:  # tests: the step on ``owners`` in-process part owners (any ``bounds``), no Ray
            self.owners, self.bounds = owners, bounds
            self.denoise_on_owners = self._denoise_on_owners

    def _denoise_on_owners(self, job):
        """Steps 9-10 as the Ray driver runs them with step_design='actors' (:mod:`.partloop`), the owners here:
        the stage output's uint8 bands."""
        from .partloop import InProcessTransport, PartLoop
        from .partowner import PartOwner

        worker = self.worker
        owners = {slot: PartOwner(worker.predict, slot, worker.decode_tile, worker.encode_tile)
                  for slot in range(self.owners)}
        return PartLoop(InProcessTransport(owners), job, self.bounds).bands()

    @property
    def spec(self) -> ModelSpec:
        return self.worker.spec

    def __repr__(self) -> str:
        return f"LocalExecutor({self.worker!r})"

    def check_serves(self, config) -> None:
        if not self.worker.holds_addons_of(config):
            worker = self.worker
            raise UserError(f"the loaded model has add-ons {worker.addons} (weights={worker.weights}, compile="
                            f"{worker.compiled}), this run asks for others (lora, controlnet, resize='model', weights, "
                            "compile); load a worker with ModelWorker.for_config(config)")

    def share(self, value):
        return value

    def map(self, method: str, calls: Iterable[tuple]) -> Iterator:
        run = getattr(self.worker, method)
        for args in calls:
            yield run(*args)

    def broadcast(self, method: str, calls: list[tuple]) -> None:
        for _ in self.map(method, calls):
            pass

    def close(self) -> None:
        pass  # the worker is the caller's (or dies with this executor): nothing is placed, nothing to free

    def release(self) -> None:
        pass


def open_executor(config: UpscaleConfig, cluster: ClusterOptions | None = None, *, keep: bool = False) -> Executor:
    """The executor a run of ``config`` uses: in-process when ``cluster`` is None or has ``actors=0``, else a Ray pool.

    ``keep=True``: the executor outlives one ``upscale`` (its ``close`` is a no-op); the caller releases it with
    ``release()``. The Ray driver resolves the model once (a hub download or a cache check); actors load that path.
    """
    if cluster is None or cluster.actors == 0:
        return LocalExecutor(ModelWorker.for_config(config), config.view_batch_size, keep=keep)
    started = time.monotonic()
    spec = ModelSpec.load(config.model, config.variant, config.model_config)
    log.info("model %s at %s (%.1f s)", config.model, spec.path, time.monotonic() - started)
    return RayExecutor(WorkerPool(config, cluster, spec), spec, config.view_batch_size, keep=keep)
