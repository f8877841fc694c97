"""The service's job records and results on disk (`cupscale serve --results DIR`).

Layout of ``DIR``: ``jobs/ID.json`` (the record, replaced atomically on every change), ``inputs/ID`` (the uploaded
bytes, deleted when the job ends), ``results/ID.png`` (written by :func:`cupscale_dist.files.imageio.write_image`
with the run's parameters in its text chunks, like every `cupscale upscale` output). Nothing lives only in memory:
a replica that restarts finds every finished result, and :meth:`JobStore.recover` marks what was queued or running
when the old one died as failed ("interrupted"), never lost. Finished jobs expire after the service's retention
(:meth:`JobStore.expire`: the record and its result go together); a job refused for a full queue leaves nothing.

One service owns a results folder at a time (``flock`` on ``DIR/.cupscale-serve.lock``, dropped by the kernel when
the replica's process ends): two replicas on one folder would each recover the other's running jobs as failed.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from pathlib import Path

from ..files.atomic import write_atomic
from ..files.folderlock import hold_lock_file, probe_lock_file

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
FINAL = (SUCCEEDED, FAILED, CANCELLED)
LOCK_NAME = ".cupscale-serve.lock"
JOB_ID = re.compile(r"^[0-9a-f]{32}$")  # uuid4 hex: ids from URLs never reach the filesystem unchecked
INTERRUPTED = "interrupted: the service {} while the job was {}; submit it again"


def now() -> float:
    return round(time.time(), 3)


class JobStore:
    """Job records as JSON files written atomically, inputs and results beside them."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        for sub in ("jobs", "inputs", "results"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # one writer at a time per record (the HTTP handlers and the runner thread)
        self._fd: int | None = None  # the folder lock, held for the store's life

    # -- ownership -------------------------------------------------------------------------------------------
    def claim(self, note: str = "") -> None:
        """Hold ``DIR/.cupscale-serve.lock``; a second service on the same folder is refused with its holder.
        ``note`` follows the holder's pid and host in the lock file (`cupscale serve` adds its own pid and URL)."""
        self._fd = hold_lock_file(self.lock_path, "a service", self.refusal(), note)

    @property
    def lock_path(self) -> Path:
        return self.root / LOCK_NAME

    def refusal(self) -> str:
        return (f"--results {self.root} is in use by another service (its lock {self.lock_path} is held by "
                "{holder}); stop that service or choose another --results folder")

    def check_free(self) -> None:
        """Refuse at once, naming the lock's holder, when another service holds the folder (before Ray starts);
        the replica claims it for real."""
        probe_lock_file(self.lock_path, "a service", self.refusal())

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- paths -----------------------------------------------------------------------------------------------
    def record_path(self, job_id: str) -> Path:
        return self.root / "jobs" / f"{job_id}.json"

    def input_path(self, job_id: str) -> Path:
        return self.root / "inputs" / job_id

    def result_path(self, job_id: str) -> Path:
        return self.root / "results" / f"{job_id}.png"

    # -- records ---------------------------------------------------------------------------------------------
    def create(self, upload: bytes, record: dict) -> dict:
        """A new queued job: its input bytes first, then its record (a record never points at a missing input)."""
        job_id = uuid.uuid4().hex
        write_atomic(self.input_path(job_id), upload)
        record = {"id": job_id, "status": QUEUED, "created": now(), "started": None, "finished": None,
                  "progress": None, "error": None, **record}
        with self._lock:
            write_atomic(self.record_path(job_id), json.dumps(record).encode())
        return record

    def get(self, job_id: str) -> dict | None:
        """The record, or None for an id that is malformed or unknown."""
        if not JOB_ID.match(job_id):
            return None
        try:
            return json.loads(self.record_path(job_id).read_text())
        except FileNotFoundError:
            return None

    def update(self, job_id: str, **changes) -> dict:
        """Change fields of a record in one atomic replace; a record in a final status is never changed again."""
        with self._lock:
            record = json.loads(self.record_path(job_id).read_text())
            if record["status"] in FINAL:
                return record
            record.update(changes)
            write_atomic(self.record_path(job_id), json.dumps(record).encode())
        if record["status"] in FINAL:
            self.input_path(job_id).unlink(missing_ok=True)
        return record

    def discard(self, job_id: str) -> None:
        """Remove a job that was created but never queued (its submit was refused): no record, no input."""
        with self._lock:
            self.record_path(job_id).unlink(missing_ok=True)
        self.input_path(job_id).unlink(missing_ok=True)

    def expire(self, max_age_s: float, at: float | None = None) -> int:
        """Remove finished jobs older than ``max_age_s`` (their result first, then the record, so a record never
        points at a result that is gone by accident), and results with no record as old; returns how many jobs went."""
        cutoff = (now() if at is None else at) - max_age_s
        gone = 0
        for record in self.records():
            job_id = record.get("id")
            if not isinstance(job_id, str) or not JOB_ID.match(job_id) or record.get("status") not in FINAL:
                continue
            finished = record.get("finished")
            if isinstance(finished, (int, float)) and finished < cutoff:
                self.result_path(job_id).unlink(missing_ok=True)
                with self._lock:
                    self.record_path(job_id).unlink(missing_ok=True)
                gone += 1
        for path in (self.root / "results").glob("*.png"):  # a result whose record went (or was never written)
            if JOB_ID.match(path.stem) and not self.record_path(path.stem).exists():
                try:
                    if path.stat().st_mtime < cutoff:
                        path.unlink()
                except FileNotFoundError:
                    pass
        return gone

    def records(self) -> list[dict]:
        out = []
        for path in sorted((self.root / "jobs").glob("*.json")):
            try:
                out.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue  # a foreign file: never ours (ours are replaced atomically)
        return out

    def recover(self, what: str = "restarted") -> list[str]:
        """At start (``what`` = "restarted") or stop ("stopped"): jobs queued or running are failed ('interrupted');
        returns their ids."""
        interrupted = []
        for record in self.records():
            if record.get("status") in (QUEUED, RUNNING):
                self.update(record["id"], status=FAILED, finished=now(),
                            error=INTERRUPTED.format(what, record["status"]))
                interrupted.append(record["id"])
        for path in (self.root / "inputs").iterdir():  # uploads whose record was never written
            if not self.record_path(path.name).exists():
                path.unlink(missing_ok=True)
        return interrupted
