"""The service's job records and results on disk (`cupscale serve --results DIR`).

Layout of ``DIR``: ``jobs/ID.json`` (the record, replaced atomically on every change), ``inputs/ID`` (the uploaded
bytes, deleted when the job ends), ``results/ID.png`` (written by :func:`cupscale_dist.files.imageio.write_image` with the
run's parameters in its text chunks, like every `cupscale upscale` output). Nothing lives only in memory: a replica
that restarts finds every finished result, and :meth:`JobStore.recover` marks what was queued or running when the
old one died as failed ("interrupted"), never lost.

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
from ..files.folderlock import hold_lock_file

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
FINAL = (SUCCEEDED, FAILED, CANCELLED)
LOCK_NAME = ".cupscale-serve.lock"
JOB_ID = re.compile(r"^[0-9a-f]{32}$")  # uuid4 hex: ids from URLs never reach the filesystem unchecked
INTERRUPTED = "interrupted: the service restarted while the job was {}; submit it again"


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
    def claim(self) -> None:
        """Hold ``DIR/.cupscale-serve.lock``; a second service on the same folder is refused with its holder."""
        self._fd = hold_lock_file(self.root / LOCK_NAME, "a service", f"--results {self.root} is in use by another "
                                  "service ({holder}); stop it or choose another --results folder")

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

    def records(self) -> list[dict]:
        out = []
        for path in sorted((self.root / "jobs").glob("*.json")):
            try:
                out.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue  # a foreign file: never ours (ours are replaced atomically)
        return out

    def recover(self) -> list[str]:
        """At start: jobs the previous replica had queued or running are failed ('interrupted'); returns their ids."""
        interrupted = []
        for record in self.records():
            if record.get("status") in (QUEUED, RUNNING):
                self.update(record["id"], status=FAILED, finished=now(), error=INTERRUPTED.format(record["status"]))
                interrupted.append(record["id"])
        for path in (self.root / "inputs").iterdir():  # uploads whose record was never written
            if not self.record_path(path.name).exists():
                path.unlink(missing_ok=True)
        return interrupted
