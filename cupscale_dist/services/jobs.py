"""Ray Jobs: run `cupscale upscale|batch` on a cluster through its job server (``JobSubmissionClient``).

Usage:
    cupscale submit [--address URL] [--wait] [--working-dir DIR] [--pip SPEC]... -- upscale|batch ARGS...
    cupscale jobs list|status ID|logs ID [--follow]|stop ID [--address URL]

The address is the job server (the head's dashboard, ``http://HEAD:8265``): ``--address``, else
``RAY_API_SERVER_ADDRESS``, else an ``http(s)://`` ``RAY_ADDRESS``, else ``http://127.0.0.1:8265``.
Token auth (on by default for ``ray start --head``) is honoured: unless ``RAY_AUTH_MODE=disabled``, the token
from ``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token`` is sent as a Bearer token
(the same sources, in the same order, as Ray's own clients).

Paths in ARGS are read by the job on the cluster: give paths the cluster sees (shared storage).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from ..config import check_finite
from ..errors import UserError
from ..execution.raycluster import auth_token, token_error

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
SUBMITTABLE = ("upscale", "batch")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
POLL_S = 1.0  # how often --wait / --follow ask the job server for news
AGENT_WAIT_S = 60.0  # a head answers before its job agent has registered: submit retries "no available agent"
CONNECT_TIMEOUT_S = 3.0  # the reachability probe: requests would otherwise wait on a silent host for minutes
# Never shipped with --working-dir (Ray also honours .gitignore / .rayignore there): VCS, caches, built wheels.
WORKING_DIR_EXCLUDES = [".git", "__pycache__", "*.egg-info", ".pytest_cache", ".whl", ".venv", "venv"]


# ---------------------------------------------------------------------------------------------------------------
# Address and token
# ---------------------------------------------------------------------------------------------------------------
def job_server_address(address: str | None = None) -> str:
    """``--address``, RAY_API_SERVER_ADDRESS, an http(s) RAY_ADDRESS, or the local default; always with a scheme."""
    env_ray = os.environ.get("RAY_ADDRESS", "")
    address = (address or os.environ.get("RAY_API_SERVER_ADDRESS")
               or (env_ray if env_ray.startswith(("http://", "https://")) else None) or DEFAULT_ADDRESS)
    if "://" not in address:
        address = f"http://{address}"
    if not address.startswith(("http://", "https://")):
        raise UserError(f"--address {address}: the job server is the dashboard's http(s) address, e.g. "
                        f"{DEFAULT_ADDRESS} (not a ray:// or GCS address)")
    return address.rstrip("/")


def check_reachable(address: str) -> None:
    """Fail fast with one line when nothing listens at the job server's address."""
    url = urlparse(address)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "127.0.0.1", port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError:
        raise UserError(f"--address {address}: no Ray job server answers there (the head's dashboard, port 8265 by "
                        "default); start one with cluster/start-local-head.sh (or `ray start --head "
                        "--include-dashboard=true`), or pass the right --address") from None


@contextlib.contextmanager
def _address_env_cleared() -> Iterator[None]:
    """JobSubmissionClient lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override its address argument; ours wins."""
    saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str | None = None):
    """A JobSubmissionClient on the job server, with the token; unreachable / rejected are one clear line."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address = job_server_address(address)
    check_reachable(address)
    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        with _address_env_cleared():
            return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as exc:
        raise token_error(f"--address {address}", exc, token) from None
    except (ConnectionError, OSError) as exc:
        raise UserError(f"--address {address}: the job server did not answer ({_first_line(exc)}); check the "
                        "address (the dashboard's, port 8265 by default)") from None
    except RuntimeError as exc:
        raise UserError(f"--address {address}: not a Ray job server ({_first_line(exc)}); pass the head's "
                        "dashboard address, e.g. http://HEAD:8265") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")


@contextlib.contextmanager
def _requests_as_user_errors(address: str, job_id: str | None = None) -> Iterator[None]:
    """Map what the job server answers (auth, unknown job, connection loss) to one-line UserErrors."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as exc:
        raise token_error(f"--address {address}", exc, auth_token()) from None
    except RuntimeError as exc:
        text = str(exc)
        if job_id and ("404" in text or "does not exist" in text):
            raise UserError(f"job {job_id}: no such job on {address}; see `cupscale jobs list`") from None
        raise UserError(f"job server {address}: {_first_line(exc)}") from None
    except (ConnectionError, OSError) as exc:
        raise UserError(f"--address {address}: lost the job server ({_first_line(exc)}); "
                        "is the head still up?") from None


# ---------------------------------------------------------------------------------------------------------------
# Submit
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class JobSpec:
    """What `cupscale submit` sends: the entrypoint, its runtime_env and the resources it reserves."""

    argv: list[str]  # ["upscale" | "batch", ARGS...]
    working_dir: str | None = None  # shipped to the cluster; the job runs in it (the code in it is imported)
    pip: list[str] = field(default_factory=list)  # installed in the job's environment
    env_vars: dict[str, str] = field(default_factory=dict)
    entrypoint_num_cpus: float | None = None  # reserved for the job's driver (Ray's default: 0)
    entrypoint_num_gpus: float | None = None  # 1 by default for `upscale --actors 0` (its driver runs the models)
    entrypoint_memory: int | None = None  # bytes

    def __post_init__(self) -> None:
        if not self.argv or self.argv[0] not in SUBMITTABLE:
            got = self.argv[0] if self.argv else "nothing"
            raise UserError(f"submit: the job must be `upscale ...` or `batch ...`, got {got!r}; write "
                            "`cupscale submit [options] -- upscale IN.png -o OUT.png ...`")
        if self.working_dir is not None and not Path(self.working_dir).is_dir():
            raise UserError(f"--working-dir {self.working_dir}: not a directory; pass the folder to ship (e.g. .)")
        for name in ("entrypoint_num_cpus", "entrypoint_num_gpus", "entrypoint_memory"):
            if getattr(self, name) is not None:
                check_finite(f"--{name.replace('_', '-')}", getattr(self, name), "use a value >= 0")
            if (getattr(self, name) or 0) < 0:
                raise UserError(f"--{name.replace('_', '-')}: use a value >= 0")

    @property
    def entrypoint(self) -> str:
        """``python -m cupscale_dist.cli ...``: imports the shipped working dir first, else the installed package."""
        return shlex.join(["python", "-m", "cupscale_dist.cli", *self.argv])

    @property
    def runtime_env(self) -> dict:
        env: dict = {}
        if self.working_dir:
            env["working_dir"] = str(Path(self.working_dir).resolve())
            env["excludes"] = list(WORKING_DIR_EXCLUDES)
        if self.pip:
            env["pip"] = list(self.pip)
        if self.env_vars:
            env["env_vars"] = dict(self.env_vars)
        return env

    def request(self) -> dict:
        """The keyword arguments of ``JobSubmissionClient.submit_job`` (also what --dry-run prints)."""
        args = {"entrypoint": self.entrypoint, "runtime_env": self.runtime_env,
                "entrypoint_num_cpus": self.entrypoint_num_cpus, "entrypoint_num_gpus": self.entrypoint_num_gpus,
                "entrypoint_memory": self.entrypoint_memory, "metadata": {"submitted_by": "cupscale"}}
        return {k: v for k, v in args.items() if v not in (None, {})}


def submit(spec: JobSpec, address: str | None = None) -> tuple[str, str]:
    """Submit the job; returns (submission id, job server address)."""
    if not logging.getLogger(__name__).isEnabledFor(logging.INFO):  # Ray logs every file it packs at INFO
        for name in ("ray._private.runtime_env", "ray.dashboard.modules.dashboard_sdk"):
            logging.getLogger(name).setLevel(logging.WARNING)
    address = job_server_address(address)
    client = connect(address)
    deadline = time.monotonic() + AGENT_WAIT_S
    with _requests_as_user_errors(address):
        while True:
            try:
                return client.submit_job(**spec.request()), address
            except (ValueError, TypeError) as exc:  # runtime_env checks (e.g. a bad pip spec or working_dir)
                raise UserError(f"submit: the runtime_env was refused ({_first_line(exc)}); "
                                "check --working-dir/--pip") from None
            except RuntimeError as exc:
                if "No available agent" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(POLL_S)


# ---------------------------------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------------------------------
def list_jobs(address: str | None = None) -> list:
    address = job_server_address(address)
    client = connect(address)
    with _requests_as_user_errors(address):
        return sorted(client.list_jobs(), key=lambda j: j.start_time or 0)


def job_info(job_id: str, address: str | None = None):
    address = job_server_address(address)
    client = connect(address)
    with _requests_as_user_errors(address, job_id):
        return client.get_job_info(job_id)


def job_logs(job_id: str, address: str | None = None) -> str:
    address = job_server_address(address)
    client = connect(address)
    with _requests_as_user_errors(address, job_id):
        return client.get_job_logs(job_id)


def stop_job(job_id: str, address: str | None = None) -> bool:
    """Ask the cluster to stop the job; False if it had already finished."""
    address = job_server_address(address)
    client = connect(address)
    with _requests_as_user_errors(address, job_id):
        return client.stop_job(job_id)


def follow(job_id: str, address: str | None = None, *, echo: bool = True, timeout_s: float | None = None,
           out=None) -> object:
    """Wait for the job to finish, printing its log as it grows; returns its final JobInfo."""
    out = out or sys.stdout
    address = job_server_address(address)
    client = connect(address)
    printed = 0
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with _requests_as_user_errors(address, job_id):
        while True:
            info = client.get_job_info(job_id)
            if echo:
                logs = client.get_job_logs(job_id)
                out.write(logs[printed:])
                out.flush()
                printed = len(logs)
            if str(info.status) in TERMINAL:
                return info
            if deadline is not None and time.monotonic() > deadline:
                raise UserError(f"job {job_id} still {info.status} after {timeout_s:g} s; it keeps running: follow it "
                                f"with `cupscale jobs logs {job_id} --follow` or stop it with "
                                f"`cupscale jobs stop {job_id}`")
            time.sleep(POLL_S)


def format_job(job) -> str:
    """One line per job: id, status, start time, entrypoint."""
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time / 1000)) if job.start_time else "-"
    entry = job.entrypoint if len(job.entrypoint) <= 80 else job.entrypoint[:77] + "..."
    return f"{job.submission_id or job.job_id}  {str(job.status):9}  {started}  {entry}"
