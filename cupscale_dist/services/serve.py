"""`cupscale serve`: upscaling as an HTTP service, a Ray Serve application with a FastAPI ingress.

Endpoints (OpenAPI at ``/docs`` and ``/openapi.json``; every ``/v1`` call needs ``Authorization: Bearer TOKEN`` when
the service was given a token, which it must be to bind anything but the loopback address):

    POST   /v1/upscale?KNOB=VALUE&...   body: the image bytes     -> 202 {"id", "status": "queued", ...}
    GET    /v1/jobs/{id}                status, progress {stage, stages, step, steps}, error
    GET    /v1/jobs/{id}/result         the PNG, the run's parameters in its text chunks (as `cupscale upscale`)
    DELETE /v1/jobs/{id}                cancel: a queued job now, a running one at its next step
    GET    /v1/knobs                    the knobs a request may set, with defaults and reasons
    GET    /v1/health                   queue length and capacity

Request knobs have the CLI's names and checks (``--set KNOB=VALUE``: a query parameter is typed the same way);
the knobs that pick the model, the device and the limits belong to the service (``cupscale serve --config ...
--set ...``) and a request that names one is refused. ``source`` (not a knob) names the input in the result's
metadata, as the CLI's input path does. Limits are enforced before decoding: the query's text (valid UTF-8), the
ceilings of knobs that lift memory bounds (:mod:`.servelimits`), the bytes of bodies in flight (reserved as they
arrive; a 429 when a body would pass the bound), the body's size (``Content-Length`` and while reading) and its
progress (a 408 when it stalls), then the pixel count from the image header (``max_input_pixels``). Every refusal
is a 4xx whose JSON body is ``{"error": "one line"}`` (at most 300 characters, no server paths in it); a full queue
or too many bytes in flight is 429 with ``Retry-After`` and leaves no job behind. Finished jobs expire after
``retention_s``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field, fields

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from ray import serve
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .. import __version__
from ..config import UpscaleConfig, parse_size, set_value
from ..errors import UserError, shown
from ..execution.raycluster import LOOPBACK_HOSTS, ClusterOptions
from .jobrunner import JobRunner, QueueFull, RunnerOptions
from .jobstore import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, JobStore
from .servelimits import (
    BODY_PROGRESS_BYTES,
    BODY_STALL_S,
    DECODES_AT_ONCE,
    INFLIGHT_BODIES,
    INFLIGHT_RETRY_AFTER_S,
    BodyReservation,
    InFlight,
    check_query_utf8,
    check_request_ceilings,
    check_token_text,
    one_line,
    read_token_file,
    request_megabytes,
    scrub_paths,
    server_paths,
)

log = logging.getLogger(__name__)

APP_NAME = "cupscale"
# Knobs that belong to the service, not to a request: the model, its add-ons (LoRAs, ControlNet, upscale model) and
# where and how it runs (the workers are loaded once: weights, compile; how its pool steps: step_design,
# snapshot_every), files on the server (regional_prompts), the captioner pool, and the limits that protect the
# service itself (a request must not lift the plan bounds: max_model_evaluations=1e12 was accepted).
SERVICE_KNOBS = frozenset({
    "model", "model_config", "variant", "lora", "controlnet", "upscale_model", "device", "dtype", "torch_threads",
    "weights", "compile",
    "regional_prompts", "captioner", "captioner_model",
    "captioner_actors", "captioner_gpus", "captioner_dtype", "keep_captioner", "caption_timeout_s",
    "max_input_pixels", "min_input_side", "max_output_pixels", "max_stage_pixels", "max_plan_memory_mb",
    "max_model_evaluations", "step_design", "snapshot_every"})
REQUEST_FIELDS = ("source",)  # request parameters that are not knobs
SIZE_TEXT = re.compile(r"[0-9]{1,12}[xX][0-9]{1,12}")  # size=WxH; more digits are past any max_output_pixels
MAX_REQUEST_MB = 64  # a 16-Mpx PNG (the default max_input_pixels) is at most ~48 MB
# Serve's proxy must answer a readiness check within 5 s of starting, else it is killed and started again; on a busy
# machine (measured: 2 loaded cores) it never makes it. Set in this process before it starts a local cluster.
SLOW_START_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60"}
HTTP_OVERHEAD_REQUESTS = 256  # concurrent HTTP calls a replica takes (they are short: the work is in the queue)
# Serve's proxy holds a request while no replica is up (one restarting after its node was lost loads its model
# workers first: seconds for the demo model, minutes for SDXL), and with no bound it holds it forever when no replica
# can be placed. Every request here is short (the work is in the queue; a 64 MB body at 1 MB/s is ~1 min): past this
# the client gets Serve's 408 and retries (measured after a lost replica node: docs/distributed.md).
REQUEST_TIMEOUT_S = 120.0
# Finished jobs (record and result) are kept this long: a client that submitted on Friday fetches on Monday, and a
# busy service's folder stops growing (16-Mpx results are tens of MB each).
DEFAULT_RETENTION_DAYS = 7.0


@dataclass
class ServiceOptions:
    """Everything a replica needs (pickled to it by Serve)."""

    results: str  # the results folder (jobs, inputs, results); shared storage for a multi-node cluster
    config: UpscaleConfig = field(default_factory=UpscaleConfig)  # the service's knobs; requests change run knobs
    queue_size: int = 16
    token: str | None = None  # bearer token every /v1 call must carry; None = none (loopback only)
    max_request_bytes: int = MAX_REQUEST_MB * 2**20
    cluster: ClusterOptions = field(default_factory=ClusterOptions)  # the model workers: actors=0 in the replica
    max_inflight_bytes: int | None = None  # bodies being received at once; None = INFLIGHT_BODIES largest bodies
    retention_s: float | None = DEFAULT_RETENTION_DAYS * 86400  # finished jobs expire after this; None = never
    # torch CPU threads of the process that started the service (`cupscale serve`), which `cupscale upscale` would
    # have too: Ray starts the replica with OMP_NUM_THREADS=1, and CPU bits depend on the thread count.
    # None = leave the replica's own (config.torch_threads, when set, wins either way).
    torch_threads: int | None = None
    owner: str = ""  # written after the replica's pid in the folder's lock file: who started the service, its URL
    request_timeout_s: float = REQUEST_TIMEOUT_S  # a request unanswered by then gets 408 (e.g. while no replica is up)
    body_stall_s: float = BODY_STALL_S  # a body bringing under BODY_PROGRESS_BYTES in this long is 408

    def __post_init__(self) -> None:
        if self.max_inflight_bytes is not None and self.max_inflight_bytes < self.max_request_bytes:
            raise UserError(f"--max-inflight-mb ({self.max_inflight_bytes / 2**20:g}) is below --max-request-mb "
                            f"({self.max_request_bytes / 2**20:g}): the largest body could never be received; raise it")

    @property
    def inflight_limit(self) -> int:
        return self.max_inflight_bytes or INFLIGHT_BODIES * self.max_request_bytes


def check_bind(host: str, token: str | None) -> None:
    """Anything but loopback is reachable from other machines: refuse to bind it without a token."""
    if host not in LOOPBACK_HOSTS and not token:
        raise UserError(f"--host {host} is reachable from other machines; pass --token-file FILE (clients send "
                        "'Authorization: Bearer TOKEN') or bind 127.0.0.1")


def read_token(path: str | None) -> str | None:
    if path is None:
        return None
    token = read_token_file(path)  # read with a size cap: `--token-file /dev/zero` is refused, not read forever
    if len(token) < 16:
        raise UserError(f"--token-file {path}: the token is {len(token)} characters; use at least 16 (e.g. "
                        "`python -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE`)")
    return token


def request_knobs(params) -> tuple[dict, dict]:
    """Query parameters -> (knobs typed as ``--set`` types them, request fields); unknown, service-owned or repeated
    names are refused by name."""
    names = {f.name for f in fields(UpscaleConfig)}
    knobs, extra = {}, {}
    for key in params.keys():
        values = params.getlist(key)
        if len(values) > 1:
            raise UserError(f"{shown(key)} is given {len(values)} times; give it once")
        value = values[0]
        if key in REQUEST_FIELDS:
            extra[key] = value
        elif key in SERVICE_KNOBS:
            raise UserError(f"{key} is set by the service (cupscale serve --config/--set), not per request; "
                            "drop it from the request")
        elif key not in names:
            raise UserError(f"unknown knob {shown(key)}; see GET /v1/knobs for the ones a request may set")
        elif key == "size" and "x" in value.lower():
            if not SIZE_TEXT.fullmatch(value.strip()):
                raise UserError(f"size={shown(value)} is not WxH (sides of at most 12 digits); use e.g. "
                                "size=4096x4096, or scale")
            knobs[key] = parse_size(value)
        else:
            knobs[key] = set_value(key, value)
            if knobs[key] is None:  # `tile=` or `tile=null`: UpscaleConfig.replace would keep the service's value
                raise UserError(f"{key}={shown(value)} gives no value; give one (see GET /v1/knobs) or leave {key} "
                                "out for the service's")
    return knobs, extra


def status_view(record: dict) -> dict:
    """What GET /v1/jobs/{id} shows of a record."""
    view = {k: record.get(k) for k in ("id", "status", "progress", "error", "created", "started", "finished",
                                       "input_size", "output_size", "source")}
    view["cancel_requested"] = bool(record.get("cancel_requested"))
    if record.get("status") == SUCCEEDED:
        view["result"] = f"/v1/jobs/{record['id']}/result"
    return view


def knob_parameters() -> list[dict]:
    """OpenAPI query parameters of POST /v1/upscale: every knob a request may set, with its default and reason."""
    params = [{"name": "source", "in": "query", "required": False, "schema": {"type": "string"},
               "description": "name of the input recorded in the result's metadata (the CLI records its input path)"}]
    for f in fields(UpscaleConfig):
        if f.name not in SERVICE_KNOBS:
            params.append({"name": f.name, "in": "query", "required": False, "schema": {"type": "string"},
                           "description": f"{f.metadata.get('why', '')} (default {f.default!r})"})
    return params


app = FastAPI(title="cupscale", version=__version__,
              description="C-Upscale as a service: submit an image, poll its job, fetch the result.")


@app.exception_handler(HTTPException)
async def _one_line(_request: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse({"error": one_line(str(exc.detail))}, status_code=exc.status_code, headers=exc.headers)


@app.exception_handler(RequestValidationError)
async def _one_line_validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    return JSONResponse({"error": one_line(f"{where}: {first.get('msg', 'invalid request')}")}, status_code=400)


def refuse(status: int, message: str, **headers: str) -> HTTPException:
    return HTTPException(status_code=status, detail=message, headers=headers or None)


@serve.deployment(name="UpscaleService", num_replicas=1, max_ongoing_requests=HTTP_OVERHEAD_REQUESTS,
                  ray_actor_options={"num_cpus": 0}, health_check_timeout_s=120)
@serve.ingress(app)
class UpscaleService:
    """The replica: owns the results folder, the queue and the model workers (one replica per results folder)."""

    def __init__(self, options: ServiceOptions):
        self.options = options
        if options.torch_threads and not options.config.torch_threads:
            import torch

            torch.set_num_threads(options.torch_threads)  # before the workers load: they take this process's count
        self.store = JobStore(options.results)
        self.store.claim(options.owner)
        interrupted = self.store.recover()
        if interrupted:
            log.warning("%d job(s) were interrupted by a restart and are now failed", len(interrupted))
        self.inflight = InFlight(options.inflight_limit)  # bytes of request bodies being received and decoded
        self.decoding = threading.BoundedSemaphore(DECODES_AT_ONCE)  # requests holding decoded pixels at once
        self.paths = server_paths(options.config, self.store.root)  # never shown to a client
        self.runner = JobRunner(self.store, options.config, RunnerOptions(options.queue_size, options.cluster,
                                                                          options.retention_s))

    def __del__(self):
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.close()
        if getattr(self, "store", None) is not None:
            self.store.release()

    def _authorize(self, request: Request) -> None:
        token = self.options.token
        if token is None:
            return
        sent = request.headers.get("authorization", "")
        scheme, _, value = sent.partition(" ")
        if scheme.lower() != "bearer" or not value:
            raise refuse(401, "missing token: send 'Authorization: Bearer TOKEN'", **{"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(value.strip().encode(), token.encode()):
            raise refuse(401, "the token was rejected; send the service's token", **{"WWW-Authenticate": "Bearer"})

    def _job(self, job_id: str) -> dict:
        record = self.store.get(job_id)
        if record is None:
            raise refuse(404, f"job {job_id[:64]!r}: no such job")
        return record

    @app.post("/v1/upscale", status_code=202, openapi_extra={
        "parameters": knob_parameters(),
        "requestBody": {"required": True, "description": "the image file's bytes (PNG, JPEG, WebP, TIFF, ...)",
                        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                                    "image/*": {"schema": {"type": "string", "format": "binary"}}}}})
    async def submit(self, request: Request) -> JSONResponse:
        """Queue an upscale of the body's image with the query's knobs; answers with the job id at once."""
        self._authorize(request)
        limit = self.options.max_request_bytes
        # 1. Check the knobs (cheap, before any byte of the body is read).
        try:
            check_query_utf8(request.scope.get("query_string", b""))
            knobs, extra = request_knobs(request.query_params)
            config = self.options.config.replace(**knobs)
            check_request_ceilings(knobs, self.options.config)
        except UserError as exc:
            raise refuse(400, scrub_paths(str(exc), self.paths)) from None
        if not self.runner.has_room():
            raise refuse(429, f"the queue is full ({self.options.queue_size} jobs waiting); retry later",
                         **{"Retry-After": str(self.runner.retry_after())})
        # 2. The body, under the size limit (the header's length first, then what really arrives), and under the
        # bound on bodies in flight: admitted if its length (a chunked body: the largest) fits in what is free now,
        # then reserved as its bytes arrive, so a slow client holds only what it sent.
        declared = request.headers.get("content-length")
        if declared is not None and not (declared.isascii() and declared.isdigit() and int(declared) <= limit):
            raise refuse(413, f"the body is {shown(declared, 20)} bytes, over the {limit}-byte limit; send a smaller "
                         "image")
        if not self.inflight.has_room(int(declared) if declared is not None else limit):
            raise self._busy()
        with BodyReservation(self.inflight) as held:
            record = await self._receive_and_create(request, limit, held, config, knobs, extra)
        try:
            self.runner.submit(record["id"])
        except QueueFull as full:
            raise refuse(429, f"the queue is full ({self.options.queue_size} jobs waiting); retry later",
                         **{"Retry-After": str(full.retry_after)}) from None
        return JSONResponse(status_view(record) | {"url": f"/v1/jobs/{record['id']}"}, status_code=202)

    def _busy(self) -> HTTPException:
        return refuse(429, f"the service is receiving other uploads (over {self.inflight.limit} bytes in flight with "
                      "this one); retry later", **{"Retry-After": str(INFLIGHT_RETRY_AFTER_S)})

    async def _read_body(self, request: Request, limit: int, held: BodyReservation) -> bytes:
        """The body's bytes (at most ``limit``), each reserved in the bound on bodies in flight as it arrives; a body
        that brings under BODY_PROGRESS_BYTES in ``body_stall_s`` is a 408."""
        stall_s, body, size = self.options.body_stall_s, [], 0
        window_end, window_bytes = time.monotonic() + stall_s, 0  # the current progress window and what it brought
        while True:
            try:
                message = await asyncio.wait_for(request.receive(), max(window_end - time.monotonic(), 0.0))
            except asyncio.TimeoutError:
                raise refuse(408, f"the body stalled: under {BODY_PROGRESS_BYTES} bytes arrived in {stall_s:g} s; "
                             "send the file at once (curl --data-binary @in.png)") from None
            if message["type"] == "http.disconnect":  # went away mid-upload: its reservation is released by the caller
                raise refuse(400, "the client disconnected before the body arrived")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise refuse(413, f"the body is over the {limit}-byte limit; send a smaller image")
            if not held.add(len(chunk)):
                raise self._busy()
            body.append(chunk)
            window_bytes += len(chunk)
            if window_bytes >= BODY_PROGRESS_BYTES:
                window_end, window_bytes = time.monotonic() + stall_s, 0
            if not message.get("more_body", False):
                return b"".join(body)

    async def _receive_and_create(self, request: Request, limit: int, held: BodyReservation, config: UpscaleConfig,
                                  knobs: dict, extra: dict) -> dict:
        """Read the body (at most ``limit`` bytes), decode it and create its job record."""
        upload = await self._read_body(request, limit, held)
        if not upload:
            raise refuse(400, "the body is empty; send the image file's bytes (curl --data-binary @in.png)")
        # 3. Decode under the pixel limit (checked from the header first), plan the run, queue it.
        try:
            return await run_in_threadpool(self._create, upload, config, knobs, extra)
        except UserError as exc:
            raise refuse(413 if "decompression bomb" in str(exc) else 400, scrub_paths(str(exc), self.paths)) from None

    def _create(self, upload: bytes, config: UpscaleConfig, knobs: dict, extra: dict) -> dict:
        """Decode the upload as the CLI decodes a file (same checks), then store it with its job record."""
        import tempfile

        from ..files.imageio import load_image
        from ..plan import check_inputs

        with self.decoding, tempfile.NamedTemporaryFile(dir=self.store.root / "inputs", prefix=".upload.") as handle:
            handle.write(upload)
            handle.flush()
            try:
                image = load_image(handle.name, config.max_input_pixels, config.min_input_side)
            except UserError as exc:  # the upload's temp name means nothing to the client, and is the server's
                raise UserError(scrub_paths(str(exc).replace(f"input {handle.name}", "image"),
                                            {handle.name: "the image"})) from None
            size = image.size
            del image  # the pixels are decoded again when the job runs; keep none while it waits
        plan = check_inputs(size, config)
        return self.store.create(upload, {"knobs": knobs, "source": extra.get("source", ""),
                                          "input_size": list(size), "output_size": list(plan.output_size)})

    @app.get("/v1/jobs/{job_id}")
    async def status(self, job_id: str, request: Request) -> dict:
        """The job's status (queued, running, succeeded, failed, cancelled), progress and error."""
        self._authorize(request)
        return status_view(self._job(job_id))

    @app.get("/v1/jobs/{job_id}/result", response_class=FileResponse,
             responses={200: {"content": {"image/png": {}}, "description": "the PNG with the run's parameters"}})
    async def result(self, job_id: str, request: Request):
        """The result PNG (text chunks ``cupscale:*``: prompt, seed, model, stages, config, config_hash, ...)."""
        self._authorize(request)
        record = self._job(job_id)
        if record["status"] in (QUEUED, RUNNING):
            raise refuse(409, f"job {job_id} is {record['status']}; poll GET /v1/jobs/{job_id} until it succeeded",
                         **{"Retry-After": "1"})
        if record["status"] in (FAILED, CANCELLED):
            raise refuse(409, f"job {job_id} {record['status']}: {record.get('error') or 'no result'}")
        path = self.store.result_path(job_id)
        if not path.is_file():
            raise refuse(410, f"job {job_id}: its result file is gone from the results folder")
        return FileResponse(path, media_type="image/png", filename=f"{job_id}.png",
                            headers={"X-Cupscale-Job": job_id})

    @app.delete("/v1/jobs/{job_id}")
    async def cancel(self, job_id: str, request: Request) -> JSONResponse:
        """Cancel: a queued job at once (200), a running one at its next step (202); a finished job is 409."""
        self._authorize(request)
        record = self._job(job_id)
        if record["status"] not in (QUEUED, RUNNING):
            raise refuse(409, f"job {job_id} already {record['status']}; nothing to cancel")
        record = await run_in_threadpool(self.runner.cancel, job_id)
        return JSONResponse(status_view(record), status_code=200 if record["status"] == CANCELLED else 202)

    @app.get("/v1/knobs")
    async def knobs(self, request: Request) -> dict:
        """The knobs a request may set: the service's value and the reason for each."""
        self._authorize(request)
        config = self.options.config
        return {f.name: {"value": getattr(config, f.name), "why": f.metadata.get("why", "")}
                for f in fields(UpscaleConfig) if f.name not in SERVICE_KNOBS}

    @app.get("/v1/health")
    async def health(self, request: Request) -> dict:
        self._authorize(request)
        return {"status": "ok", "queued": self.runner.queue.qsize(), "queue_size": self.options.queue_size,
                "model": self.options.config.model, "version": __version__}


def build_app(options: ServiceOptions):
    """The bound Serve application (``serve.run(build_app(...))``)."""
    return UpscaleService.bind(options)


TOKEN_ENV = "CUPSCALE_SERVE_TOKEN"  # where a RayService's pods get the bearer token (from a Kubernetes Secret)


def app_from_args(args: dict):
    """Serve's application builder, for a RayService (``import_path: cupscale_dist.services.serve:app_from_args``).

    ``args``: ``results`` (a folder on shared storage), ``config`` (preset or file), ``knobs`` (service knobs),
    ``queue``, ``actors``, ``gpus_per_actor``, ``cpus_per_actor``, ``max_request_mb``, ``max_inflight_mb``,
    ``retention_days`` (0 = keep forever). The token comes from ``$CUPSCALE_SERVE_TOKEN``
    and is required: a RayService's proxy listens on every interface of its pod.
    """
    known = {"results", "config", "knobs", "queue", "actors", "gpus_per_actor", "cpus_per_actor", "max_request_mb",
             "max_inflight_mb", "retention_days"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise UserError(f"serve args: unknown key(s) {', '.join(unknown)}; use {', '.join(sorted(known))}")
    if "results" not in args:
        raise UserError("serve args: 'results' (a results folder on shared storage) is required")
    token = os.environ.get(TOKEN_ENV, "").strip()
    if len(token) < 16:
        raise UserError(f"${TOKEN_ENV} must hold the service's bearer token (>= 16 characters): the proxy of a "
                        "RayService listens on every interface")
    check_token_text(f"${TOKEN_ENV}", token)
    config = UpscaleConfig.load(args.get("config"), **dict(args.get("knobs") or {}))
    cluster = ClusterOptions(actors=args.get("actors"), gpus_per_actor=args.get("gpus_per_actor"),
                             cpus_per_actor=float(args.get("cpus_per_actor", 1.0)))
    inflight = args.get("max_inflight_mb")
    return build_app(ServiceOptions(str(args["results"]), config, int(args.get("queue", 16)), token,
                                    request_megabytes("max_request_mb", args.get("max_request_mb", MAX_REQUEST_MB)),
                                    cluster, max_inflight_bytes=(request_megabytes("max_inflight_mb", inflight)
                                                                 if inflight is not None else None),
                                    retention_s=retention_seconds(float(args.get("retention_days",
                                                                                  DEFAULT_RETENTION_DAYS)))))


def retention_seconds(days: float) -> float | None:
    """``--retention-days`` as seconds; 0 keeps finished jobs forever."""
    from ..config import check_finite

    check_finite("retention_days", days, "use a number of days >= 0 (0 = keep forever)")
    if days < 0:
        raise UserError(f"retention_days {days}: use a number of days >= 0 (0 = keep forever)")
    return days * 86400 if days else None


def http_options(options: ServiceOptions, host: str, port: int) -> dict:
    """Serve's proxy settings: where it listens, and how long a request may wait for an answer."""
    return {"host": host, "port": port, "request_timeout_s": options.request_timeout_s}


def deploy(options: ServiceOptions, host: str = "127.0.0.1", port: int = 8000, name: str = APP_NAME,
           route_prefix: str = "/"):
    """Start Serve's HTTP proxy on ``host:port`` (on the Ray cluster this process joined) and run the app."""
    check_bind(host, options.token)
    JobStore(options.results).check_free()  # a second service on the folder: refused here, not after Serve's retries
    serve.start(http_options=http_options(options, host, port), proxy_location="HeadOnly")
    try:
        return serve.run(build_app(options), name=name, route_prefix=route_prefix)
    except RuntimeError as exc:
        raise UserError(f"the service failed to start: {str(exc).strip().splitlines()[-1]}") from None
