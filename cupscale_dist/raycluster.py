"""Joining or starting the Ray cluster every distributed command runs on (upscale, batch, caption)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from .errors import UserError


@dataclass
class ClusterOptions:
    """How to run on Ray; none of these change the output bytes (not part of the config hash)."""

    actors: int | None = None  # None = one per GPU in the cluster, else 1
    address: str | None = None  # None = RAY_ADDRESS or a new local cluster on 127.0.0.1
    gpus_per_actor: float | None = None  # None = 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = 1.0
    start_timeout_s: float = 120.0  # waiting for actors to be placed and load the model

    def __post_init__(self) -> None:
        if self.actors is not None and self.actors < 0:
            raise UserError(f"--actors {self.actors}: use 0 (single process) or a positive count")
        if self.cpus_per_actor < 0 or (self.gpus_per_actor or 0) < 0:
            raise UserError("--cpus-per-actor / --gpus-per-actor must be >= 0")


def check_address(address: str) -> None:
    """Fail fast with a clear line: ray.init waits a long time on an address where no cluster listens."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=3).close()
    except (OSError, ValueError):
        raise UserError(f"--address {address}: no Ray cluster answers there; start one with `ray start --head` "
                        "(or cluster/start-local-head.sh) or drop --address for a local cluster") from None


def connect(options: ClusterOptions):
    """ray.init on the given cluster, or a new local one bound to 127.0.0.1 (token auth left as Ray sets it)."""
    import ray

    if ray.is_initialized():
        return ray
    address = options.address or os.environ.get("RAY_ADDRESS")
    if address:
        check_address(address)
        try:
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UserError(f"--address {address}: could not join the Ray cluster ({str(exc).splitlines()[0]}); "
                            "check the address and RAY_AUTH_MODE/token") from None
    else:
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    return ray


def root_cause(exc: BaseException) -> str:
    """The last line of what really failed inside a Ray task or actor (not Ray's wrapper text)."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return text[-1] if text else type(cause).__name__
