"""The service's job runner: a bounded queue drained by one thread that runs each job through ``run_upscale``.

Jobs run one at a time on the service's model workers, which are loaded once when the service starts: a kept pool
of Ray actors (the tile orchestrator, ``--actors N``) or one in-process ``ModelWorker`` (``--actors 0``). One
image at a time is how the orchestrator is built (every actor works on the one image's views); more throughput is
more actors per job, not more jobs at once.

Progress and cancellation go through ``upscale``'s per-step callback: it writes ``{stage, stages, step, steps}`` to
the job's record and raises :class:`JobCancelled` at the first step after a cancel request (a queued job is
cancelled at once and never starts). Between jobs the thread expires finished jobs past the retention
(:meth:`JobStore.expire`); :meth:`JobRunner.close` (the service stopping) fails what was queued or running as
"interrupted: the service stopped", and the running job stops at its next step.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass

from ..config import UpscaleConfig
from ..errors import UserError
from ..execution.executor import open_executor
from ..execution.raycluster import ClusterOptions, root_cause
from ..files.imageio import load_input
from ..plan import check_inputs
from .jobstore import CANCELLED, FAILED, INTERRUPTED, QUEUED, RUNNING, SUCCEEDED, JobStore, now

log = logging.getLogger(__name__)

RETRY_AFTER_DEFAULT_S = 5  # Retry-After for a full queue before any job has finished (no duration measured yet)
RETRY_AFTER_MAX_S = 600
RECENT_JOBS = 20  # Retry-After is the mean duration of this many last jobs: recent load, not the service's history
SWEEP_EVERY_S = 600.0  # expiring old jobs lists the records folder: every 10 minutes keeps that cheap and timely


class JobCancelled(Exception):
    """Raised from the step callback when the job's cancel was requested."""


class JobInterrupted(Exception):
    """Raised from the step callback when the service is stopping (:meth:`JobRunner.close`)."""


class QueueFull(Exception):
    """The bounded queue has no room; ``retry_after`` is the seconds until a slot is likely free."""

    def __init__(self, retry_after: int):
        super().__init__(retry_after)
        self.retry_after = retry_after


@dataclass
class RunnerOptions:
    queue_size: int = 16  # jobs waiting (the running one not counted); past it a submit gets 429
    cluster: ClusterOptions | None = None  # where the workers live; actors=0: in this process
    retention_s: float | None = None  # finished jobs (record and result) expire after this; None = kept forever


class JobRunner:
    """Queued jobs in submission order, one at a time, on model workers loaded once."""

    def __init__(self, store: JobStore, config: UpscaleConfig, options: RunnerOptions):
        self.store = store  # records, inputs, results
        self.config = config  # the service's config: model, device, dtype, limits (requests change run knobs only)
        self.queue: queue.Queue[str] = queue.Queue(maxsize=options.queue_size)  # job ids waiting to run
        self.cancel_requested: set[str] = set()  # ids whose DELETE came while they were queued or running
        self.durations: deque[float] = deque(maxlen=RECENT_JOBS)  # seconds of the last finished jobs (Retry-After)
        self.retention_s = options.retention_s  # age at which a finished job expires (None: never)
        self.next_sweep = time.monotonic()  # when the thread next expires old jobs (the first sweep at once)
        # loaded once for every job: in process (actors=0) or one pool of model-worker actors
        self.executor = open_executor(config, options.cluster or ClusterOptions(), keep=True)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="cupscale-jobs", daemon=True)
        self.thread.start()

    # -- called by the HTTP handlers -------------------------------------------------------------------------
    def submit(self, job_id: str) -> None:
        """Queue a created job; :class:`QueueFull` when there is no room, and the job is removed (a refused submit
        leaves no record: the client was told 429 and submits again)."""
        try:
            self.queue.put_nowait(job_id)
        except queue.Full:
            self.store.discard(job_id)
            raise QueueFull(self.retry_after()) from None

    def has_room(self) -> bool:
        return not self.queue.full()

    def cancel(self, job_id: str) -> dict:
        """A queued job is cancelled now; a running one at its next step (its record says ``cancel_requested``)."""
        record = self.store.get(job_id)
        if record["status"] == QUEUED:
            self.cancel_requested.add(job_id)
            return self.store.update(job_id, status=CANCELLED, finished=now(), error="cancelled before it started")
        if record["status"] == RUNNING:
            self.cancel_requested.add(job_id)
            return self.store.update(job_id, cancel_requested=True)
        return record

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely free: the mean of recent job durations (at least 1)."""
        if not self.durations:
            return RETRY_AFTER_DEFAULT_S
        mean = sum(self.durations) / len(self.durations)
        return int(min(RETRY_AFTER_MAX_S, max(1, math.ceil(mean))))

    def close(self) -> None:
        """Stop: queued and running jobs are failed as interrupted, the running one stops at its next step."""
        self._stop.set()
        interrupted = self.store.recover("stopped")
        if interrupted:
            log.warning("%d job(s) were interrupted by the service stopping", len(interrupted))
        self.queue.put(None) if not self.queue.full() else None  # wake the thread if it waits
        self.thread.join(timeout=5)
        self.executor.release()

    def sweep(self) -> None:
        """Expire finished jobs past the retention (record and result)."""
        self.next_sweep = time.monotonic() + SWEEP_EVERY_S
        if self.retention_s is not None:
            gone = self.store.expire(self.retention_s)
            if gone:
                log.info("%d finished job(s) older than %.0f s expired", gone, self.retention_s)

    # -- the thread ------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                job_id = self.queue.get(timeout=max(0.0, self.next_sweep - time.monotonic()))
            except queue.Empty:
                job_id = None
            if time.monotonic() >= self.next_sweep:
                try:
                    self.sweep()
                except OSError:  # a folder hiccup must not end the thread; the next sweep retries
                    log.exception("expiring old jobs")
            if job_id is None:
                continue
            if job_id in self.cancel_requested:  # cancelled while it waited: its record says so already
                self.cancel_requested.discard(job_id)
                continue
            try:
                self.run(job_id)
            except Exception:  # noqa: BLE001 - the thread must outlive any one job; run() records the error
                log.exception("job %s", job_id)

    def run(self, job_id: str) -> None:
        from .runner import run_upscale

        record = self.store.update(job_id, status=RUNNING, started=now())
        if record["status"] != RUNNING:
            return
        started = time.monotonic()
        try:
            config = self.config.replace(**record["knobs"])
            image, carried = load_input(self.store.input_path(job_id), config.max_input_pixels, config.min_input_side)
            plan = check_inputs(image.size, config)
            stages, steps = len(plan.stages), plan.steps
            self.store.update(job_id, progress={"stage": 1, "stages": stages, "step": 0, "steps": steps})

            def on_step(info: dict) -> None:
                if job_id in self.cancel_requested:
                    raise JobCancelled
                if self._stop.is_set():
                    raise JobInterrupted
                self.store.update(job_id, progress={"stage": info["stage"] + 1, "stages": stages,
                                                    "step": info["step"], "steps": steps})

            run_upscale(image, config, self.store.result_path(job_id), source=record.get("source") or None,
                        progress=False, executor=self.executor, callback=on_step, carried=carried, plan=plan)
        except JobCancelled:
            self.store.update(job_id, status=CANCELLED, finished=now(), error="cancelled while running")
        except JobInterrupted:
            self.store.update(job_id, status=FAILED, finished=now(), error=INTERRUPTED.format("stopped", RUNNING))
        except UserError as exc:
            self.store.update(job_id, status=FAILED, finished=now(), error=str(exc))
        except Exception as exc:  # noqa: BLE001 - a job's failure is its record's error, one line
            self.store.update(job_id, status=FAILED, finished=now(), error=f"{type(exc).__name__}: {root_cause(exc)}")
        else:
            self.durations.append(time.monotonic() - started)
            self.store.update(job_id, status=SUCCEEDED, finished=now(),
                              progress={"stage": stages, "stages": stages, "step": steps, "steps": steps})
        finally:
            self.cancel_requested.discard(job_id)
