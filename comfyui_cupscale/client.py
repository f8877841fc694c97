"""A small client of `cupscale serve` (standard library only, so the node needs nothing installed in ComfyUI's
environment): submit an image with knobs, poll its job, fetch the result; every refusal is a ServiceError carrying
the service's one-line message."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable

POLL_S = 0.25  # between status polls of a running job
HTTP_TIMEOUT_S = 60


class ServiceError(Exception):
    """What the service (or the connection to it) said went wrong, as one line."""


class ServiceClient:
    def __init__(self, url: str, token: str | None = None):
        self.url = url.rstrip("/")
        self.token = (token or "").strip() or None

    def _call(self, method: str, path: str, body: bytes | None = None,
              params: dict | None = None) -> tuple[int, dict, bytes]:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        request = urllib.request.Request(f"{self.url}{path}{query}", data=body, method=method)
        if body is not None:
            request.add_header("Content-Type", "application/octet-stream")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as answer:  # noqa: S310 - the user's URL
                return answer.status, dict(answer.headers), answer.read()
        except urllib.error.HTTPError as exc:
            data = exc.read()
            try:
                message = json.loads(data)["error"]
            except (ValueError, KeyError, TypeError):
                message = data.decode(errors="replace").strip()[:200] or exc.reason
            error = ServiceError(f"cupscale service: {message} (HTTP {exc.code})")
            error.status, error.headers = exc.code, dict(exc.headers)
            raise error from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServiceError(f"cupscale service at {self.url} can't be reached ({reason}); start it with "
                               "`cupscale serve` or fix the URL") from None

    def submit(self, image_bytes: bytes, knobs: dict, retry_for_s: float = 600.0) -> str:
        """POST the image; a full queue (429) is retried after its Retry-After until ``retry_for_s`` passed."""
        deadline = time.monotonic() + retry_for_s
        while True:
            try:
                _, _, data = self._call("POST", "/v1/upscale", image_bytes, {k: str(v) for k, v in knobs.items()})
                return json.loads(data)["id"]
            except ServiceError as exc:
                if getattr(exc, "status", None) != 429 or time.monotonic() > deadline:
                    raise
                time.sleep(float(exc.headers.get("Retry-After", "5")))

    def status(self, job_id: str) -> dict:
        return json.loads(self._call("GET", f"/v1/jobs/{job_id}")[2])

    def cancel(self, job_id: str) -> None:
        try:
            self._call("DELETE", f"/v1/jobs/{job_id}")
        except ServiceError:
            pass  # already finished: nothing to cancel

    def result(self, job_id: str) -> bytes:
        return self._call("GET", f"/v1/jobs/{job_id}/result")[2]

    def wait(self, job_id: str, on_progress: Callable[[dict], None] | None = None,
             check_interrupt: Callable[[], None] | None = None, timeout_s: float = 3600.0) -> bytes:
        """Poll until the job ends; the result's bytes, or ServiceError with the job's error. ``check_interrupt``
        raises to stop waiting (the job is then cancelled on the service)."""
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                record = self.status(job_id)
                if on_progress is not None and record.get("progress"):
                    on_progress(record["progress"])
                if record["status"] == "succeeded":
                    return self.result(job_id)
                if record["status"] in ("failed", "cancelled"):
                    raise ServiceError(f"cupscale job {job_id} {record['status']}: {record.get('error')}")
                if time.monotonic() > deadline:
                    raise ServiceError(f"cupscale job {job_id} still {record['status']} after {timeout_s:.0f} s")
                if check_interrupt is not None:
                    check_interrupt()
                time.sleep(POLL_S)
        except BaseException as exc:
            if not isinstance(exc, ServiceError):
                self.cancel(job_id)  # interrupted in ComfyUI: don't leave the job running on the service
            raise
