"""Joining or starting the Ray cluster every distributed command runs on (upscale, batch, caption).

A local cluster listens on 127.0.0.1 only. Ray turns ``_node_ip_address="127.0.0.1"`` into the machine's routable
address unless it believes multi-node clusters are off (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, what it does on
macOS/Windows): then the GCS, the raylet, every worker and both agents bind the loopback address. Metrics
collection is switched off (no Prometheus exporter in the dashboard agent). What still listens, all on 127.0.0.1,
is in docs/security.md; token auth stays on and covers every one of those except the two
``/metrics`` endpoints of the dashboard head and the autoscaler monitor.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# Ray's switch for "this machine hosts the whole cluster": node addresses stay the loopback one.
SINGLE_HOST_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# A local run needs no metrics: with collection off the dashboard agent starts no /metrics exporter.
LOCAL_SYSTEM_CONFIG = {"enable_metrics_collection": False}
GCS_PROBE_TIMEOUT_S = 5  # one internal-KV read of the token probe; a live GCS answers in milliseconds


@dataclass
class ClusterOptions:
    """How to run on Ray; none of these change the output bytes (not part of the config hash)."""

    actors: int | None = None  # None = one per GPU in the cluster, else 1
    address: str | None = None  # None = RAY_ADDRESS or a new local cluster on 127.0.0.1
    gpus_per_actor: float | None = None  # None = 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = 1.0
    start_timeout_s: float = 120.0  # waiting for actors to be placed and load the model

    def __post_init__(self) -> None:
        from ..config import check_finite

        if self.actors is not None and self.actors < 0:
            raise UserError(f"--actors {self.actors}: use 0 (single process) or a positive count")
        for flag, value in (("--cpus-per-actor", self.cpus_per_actor), ("--gpus-per-actor", self.gpus_per_actor),
                            ("--start-timeout", self.start_timeout_s)):
            if value is not None:
                check_finite(flag, value, "use a number >= 0")
        if self.cpus_per_actor < 0 or (self.gpus_per_actor or 0) < 0:
            raise UserError("--cpus-per-actor / --gpus-per-actor must be >= 0")


def check_address(address: str) -> None:
    """Fail fast with a clear line: ray.init waits a long time on an address where no cluster listens."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host or LOOPBACK, int(port)), timeout=3).close()
    except (OSError, ValueError):
        raise UserError(f"--address {address}: no Ray cluster answers there; start one with `ray start --head` "
                        "(or cluster/start-local-head.sh) or drop --address for a local cluster") from None


def connect(options: ClusterOptions):
    """ray.init on the given cluster, or a new local one bound to 127.0.0.1; token auth stays on."""
    import ray

    if ray.is_initialized():
        return ray
    address = options.address or os.environ.get("RAY_ADDRESS")
    if address:
        join(address)
    else:
        start_local(log_to_driver=False)
    return ray


def start_local(**init_args) -> None:
    """A new single-machine cluster where everything Ray lets us bind listens on 127.0.0.1 (``init_args``:
    more ``ray.init`` arguments, e.g. ``num_cpus``, ``_temp_dir``)."""
    import ray

    single_host()
    keep_token_private()
    ray.init(_node_ip_address=LOOPBACK, include_dashboard=False, _system_config=dict(LOCAL_SYSTEM_CONFIG),
             **init_args)


def join(address: str) -> None:
    """ray.init on a running cluster; an unreachable address or a missing/wrong token is one line, in seconds."""
    import ray
    from ray.exceptions import AuthenticationError

    check_address(address)
    if address.rpartition(":")[0] in LOOPBACK_HOSTS:
        single_host()  # else Ray swaps 127.0.0.1 for the routable address, where a local head doesn't listen
    check_token(address)
    try:
        ray.init(address=address, log_to_driver=False)
    except AuthenticationError as exc:
        raise token_error(f"--address {address}", exc, gcs_token(), needs_mode=True) from None
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UserError(f"--address {address}: could not join the Ray cluster ({str(exc).splitlines()[0]}); "
                        "check the address and RAY_AUTH_MODE/token") from None


def single_host() -> None:
    """Tell Ray (this process and the ones it starts) that the cluster is this machine: addresses stay loopback."""
    from ray._private import ray_constants

    os.environ[SINGLE_HOST_ENV] = "0"  # read at import by every Ray process started from here
    ray_constants.ENABLE_RAY_CLUSTER = False  # this process imported Ray already


# ---------------------------------------------------------------------------------------------------------------
# Token auth
# ---------------------------------------------------------------------------------------------------------------
def token_path() -> Path:
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()


def auth_token() -> str | None:
    """The token Ray's clients would send: RAY_AUTH_TOKEN, the RAY_AUTH_TOKEN_PATH file, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    try:
        return token_path().read_text().strip() or None
    except OSError:
        if os.environ.get("RAY_AUTH_TOKEN_PATH"):
            raise UserError(f"RAY_AUTH_TOKEN_PATH={token_path()}: can't read the token file; fix the path") from None
        return None


def gcs_token() -> str | None:
    """What ``ray.init(address=...)`` sends: an explicit address gets the token only with RAY_AUTH_MODE=token."""
    return auth_token() if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" else None


def token_error(what: str, exc: BaseException, token: str | None, *, needs_mode: bool = False) -> UserError:
    """A rejected or missing token as one line that says which, and where the token goes. ``needs_mode``: the
    client sends its token only with RAY_AUTH_MODE=token (ray.init on an explicit address)."""
    if token:
        why = "the token was rejected"
    elif needs_mode and os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        why = "it requires a token, and without RAY_AUTH_MODE=token none is sent"
    else:
        why = "it requires a token and none was found"
    detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0].rstrip(".")  # Ray adds a page
    return UserError(f"{what}: {why} ({detail}); put the cluster's token in ~/.ray/auth_token (or RAY_AUTH_TOKEN_PATH "
                     "/ RAY_AUTH_TOKEN) and set RAY_AUTH_MODE=token")


def check_token(address: str) -> None:
    """One authenticated GCS call before ray.init: a wrong or missing token fails here in well under a second,
    where ray.init retries for ~25 s and prints a screen of client warnings that never say "token".

    The probe sends a made-up cluster id, so the client doesn't first look up the real one (which waits ~45 s on a
    port where no GCS speaks). The GCS checks the token before the id: "InvalidAuthToken" is the token,
    "WrongClusterID" means the token passed.
    """
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    import ray
    from ray._raylet import GcsClient
    from ray.exceptions import AuthenticationError, RpcError

    try:
        with _stderr_silenced():  # the C++ client logs each refusal on fd 2 itself; our one line says it better
            client = GcsClient(address=address, cluster_id=ray.ClusterID.from_random().hex())
            client.internal_kv_get(b"session_name", b"session", timeout=GCS_PROBE_TIMEOUT_S)
    except AuthenticationError as exc:
        if "InvalidAuthToken" in str(exc):
            raise token_error(f"--address {address}", exc, gcs_token(), needs_mode=True) from None
    except RpcError as exc:
        first_line = str(exc).splitlines()[0]
        raise UserError(f"--address {address}: no Ray GCS answers there ({first_line}); pass the head's GCS address "
                        "(port 6379 by default; the dashboard's 8265 is for `cupscale submit`)") from None


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved), os.close(devnull)


def keep_token_private() -> None:
    """Ray writes ``~/.ray/auth_token`` with the umask's mode (world-readable under 022): create it 0600 first,
    and take group/other access away from an existing one of ours."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled" or os.environ.get("RAY_AUTH_TOKEN"):
        return
    path = token_path()
    if not os.environ.get("RAY_AUTH_TOKEN_PATH"):
        from ray._private.authentication.authentication_token_generator import generate_new_authentication_token

        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(generate_new_authentication_token())
    with contextlib.suppress(OSError):
        mode = path.stat()
        if mode.st_mode & 0o077 and mode.st_uid == os.getuid():
            os.chmod(path, 0o600)
            log.warning("token file %s was readable by others; made it 0600", path)


def root_cause(exc: BaseException) -> str:
    """The last line of what really failed inside a Ray task or actor (not Ray's wrapper text)."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return text[-1] if text else type(cause).__name__
