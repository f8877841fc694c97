"""What the driver asks of whatever runs its forward passes: the :class:`Executor` contract, and :class:`Shared`.

The pipeline never calls a model: it asks an executor to ``map`` a :class:`~cupscale_dist.execution.worker.ModelWorker`
method over calls and consumes the results in call order. ``LocalExecutor`` runs them in this process, ``RayExecutor``
on a pool of actors; both obey this one contract, so the pipeline cannot tell them apart (and the bytes do not).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..models.spec import ModelSpec


@dataclass(frozen=True)
class WorkerLoad:
    """What the driver sends each model worker to load (the same for every worker of a pool; its slot travels
    beside it): where the model is, how to place and load it, and its add-ons."""

    model_dir: str  # the model as the driver resolved it (a directory or a single file)
    model: str  # the name the user gave (``--model``): resolved again on a node that lacks ``model_dir``
    device: str  # 'cuda' or 'cpu' (Ray shows each actor only its own GPU share)
    dtype: str
    variant: str | None
    torch_threads: int | None  # the driver's thread count on CPU: the same CPU bits as the reference
    memory_fraction: float | None  # this actor's share of a GPU shared with others (None: the whole device)
    addons: object  # the checked :class:`~cupscale_dist.models.addons.Addons`
    model_config: str | None
    weights: str  # 'full' | 'fp8' | 'offload'
    compile: bool
    device_gb: float  # the weights' device footprint, checked against the share on the actor


@dataclass(frozen=True)
class Shared:
    """A per-stage value (the stage context) in the object store: sent once, each actor fetches it once."""

    ref: object


@runtime_checkable
class Executor(Protocol):
    """Runs model-worker calls, in order.

    Ownership: whoever opens an executor closes it. ``upscale`` closes the one it is given at the end of its run; an
    executor opened with ``keep=True`` (one pool serving many runs: ``batch --tile-parallel``, ``serve``) ignores
    that and is released by its owner with :meth:`release`.
    """

    spec: ModelSpec  # configs and tokenizer of the loaded model (the driver holds no weights)
    batch_size: int  # views per ``predict`` call: a fixed unit, so the bytes do not depend on the worker count
    keep: bool  # True: ``close`` leaves the workers loaded for the next run
    start_timeout_s: float | None  # placement limit a captioner pool beside it uses (None: nothing is placed)

    def check_serves(self, config) -> None:
        """Raise a one-line ``UserError`` when the loaded model cannot run ``config`` (other add-ons)."""

    def share(self, value) -> object:
        """What a call receives for a per-stage value: the value itself here, a :class:`Shared` reference on Ray."""

    def map(self, method: str, calls: Iterable[tuple]) -> Iterator:
        """``worker.method(*args)`` for each call, results in call order."""

    def broadcast(self, method: str, calls: list[tuple]) -> None:
        """Every worker runs every call, results dropped (the compile warm-up: each worker compiles its own UNet)."""

    def close(self) -> None:
        """The end of one run: release the workers, unless the executor was opened with ``keep=True``."""

    def release(self) -> None:
        """Release the workers now, kept or not (the owner of a kept executor, when it is done)."""
