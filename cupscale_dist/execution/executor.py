"""Executors: what runs the method's forward passes. The driver asks an executor to ``map`` a model-worker method over
calls and gets the results in call order; :class:`LocalExecutor` runs them here, ``pool.RayExecutor`` on actors."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import UpscaleConfig
from ..models.spec import ModelSpec
from .raycluster import ClusterOptions

if TYPE_CHECKING:
    from .pool import RayExecutor
    from .worker import ModelWorker

log = logging.getLogger(__name__)


class LocalExecutor:
    """The single-process reference: every call runs here, in order, on one :class:`ModelWorker`."""

    start_timeout_s = None  # nothing to place here (a captioner pool uses its own default)

    def __init__(self, worker: ModelWorker, batch_size: int):
        self.worker, self.batch_size = worker, batch_size

    @property
    def spec(self) -> ModelSpec:
        return self.worker.spec

    def share(self, value):
        """What a call receives for a per-stage value (the stage context): here the value itself."""
        return value

    def map(self, method: str, calls: Iterable[tuple]) -> Iterator:
        """``worker.method(*args)`` for each call, results in call order."""
        run = getattr(self.worker, method)
        for args in calls:
            yield run(*args)

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class Shared:
    """A per-stage value (the stage context) in the object store: sent once, each actor fetches it once."""

    ref: object


def make_executor(config: UpscaleConfig, options: ClusterOptions) -> RayExecutor | None:
    """``--actors 0`` = None (the in-process reference); otherwise a RayExecutor on a new pool.

    The driver resolves the model once (a hub download or a cache check) and the actors load that local path.
    """
    from .pool import RayExecutor, WorkerPool

    if options.actors == 0:
        return None
    started = time.monotonic()
    spec = ModelSpec.load(config.model, config.variant, config.model_config)
    log.info("model %s at %s (%.1f s)", config.model, spec.path, time.monotonic() - started)
    return RayExecutor(WorkerPool(config, options, spec), spec, config.view_batch_size)
