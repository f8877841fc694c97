"""Plain helpers shared by the test files (fixtures live in the conftest.py files): written once, imported as
``from helpers import ...`` (tests/ is on sys.path through tests/conftest.py).

Sections: paths and bytes; the fast config; the CLI in this process; PNG chunks; the service (constants, the HTTP
client, the in-process replica, uvicorn, raw sockets, the ComfyUI workflow); the Ray pool that counts its calls.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import types
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]  # the repository root (examples/, cluster/, comfyui_cupscale/)


# -- paths and bytes ----------------------------------------------------------------------------------------------
def as_bytes(image) -> bytes:
    """A picture's pixels as bytes: two runs are the same picture exactly when these are equal."""
    return np.asarray(image).tobytes()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


# -- the fast config ----------------------------------------------------------------------------------------------
def small_config(model: str, **changes):
    """A fast config on the tiny model: 2 x3 views per step, 3 steps, CPU float32, threads pinned."""
    from cupscale_dist import UpscaleConfig

    base = dict(model=model, scale=2, tile=16, stride=8, steps=5, strength=0.6, device="cpu", dtype="float32",
                prompt="a photo of a cat on a house", view_batch_size=4, torch_threads=1)
    return UpscaleConfig(**{**base, **changes})


# -- the CLI in this process --------------------------------------------------------------------------------------
# The fast run every end-to-end test uses: 64x48 -> 128x96 in one stage of one 16x16-latent view, 2 steps, in
# this process (--actors 0: the single-process reference; the Ray path, byte-identical, is tested on its own).
RUN = ["--tile", "16", "--stride", "8", "--steps", "4", "--device", "cpu", "--dtype", "float32", "--seed", "7",
       "--set", "torch_threads=1", "--actors", "0"]


def zimage_config(model_dir, **changes):
    """The tiny Z-Image's fast config: Turbo's one pass per view (guidance 1), the composer on (lambda 0.5), view
    masks from the probe."""
    from cupscale_dist.testing.tiny_zimage import MAX_SEQUENCE_LENGTH

    return small_config(str(model_dir), **{"steps": 3, "guidance_scale": 1.0, "lambda_global": 0.5,
                                           "max_sequence_length": MAX_SEQUENCE_LENGTH, **changes})


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run ``main(argv)`` like the console script does: (exit code, stdout, stderr)."""
    from cupscale_dist.cli.main import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse exits by itself
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code != 0
    assert len(lines) == 1, f"expected one stderr line, got:\n{err}"
    assert lines[0].startswith("cupscale: error:"), lines[0]
    assert "Traceback" not in err
    return lines[0]


def snapshot(*folders: Path) -> dict[str, tuple[int, bytes]]:
    """Every file below ``folders``: (mtime_ns, bytes); folders appear with an empty entry."""
    state = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            state[str(path)] = (path.stat().st_mtime_ns, path.read_bytes()) if path.is_file() else (0, b"")
    return state


def structured(width: int, height: int) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width]
    disc = ((ys - height // 2) ** 2 + (xs - width // 2) ** 2 < (height // 4) ** 2)[..., None]
    rgb = np.stack([xs * 4, ys * 5, 255 - xs * 3], axis=-1) * (1 - disc) + disc * np.array([250, 200, 40])
    return rgb.clip(0, 255).astype(np.uint8)


# -- PNG chunks ---------------------------------------------------------------------------------------------------
PARAMETERS = "café au lait, crème brûlée\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, Seed: 42"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def tEXt(key: str, data: bytes) -> bytes:  # noqa: N802
    return png_chunk(b"tEXt", key.encode("latin-1") + b"\0" + data)


def zTXt(key: str, text: str) -> bytes:  # noqa: N802
    return png_chunk(b"zTXt", key.encode("latin-1") + b"\0\0" + zlib.compress(text.encode("latin-1")))


def iTXt(key: str, data: bytes) -> bytes:  # noqa: N802
    return png_chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + data)


def png_with_chunks(path: Path, *chunks: bytes, width: int = 64, height: int = 48) -> Path:
    """A 64x48 RGB PNG with ``chunks`` between IHDR and IDAT."""
    from cupscale_dist.files.writers import PNG_SIGNATURE

    rows = structured(width, height)
    raw = b"".join(b"\0" + row.tobytes() for row in rows)
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    path.write_bytes(PNG_SIGNATURE + header + b"".join(chunks) + png_chunk(b"IDAT", zlib.compress(raw))
                     + png_chunk(b"IEND", b""))
    return path


# -- the service ---------------------------------------------------------------------------------------------------
TOKEN = "test-token-0123456789abcdef"
QUEUE = 4
MODEL = "demo"  # the trained demo model, as the issue asks of the load test (factor-4 VAE: 128x96 px = 32x24 latent)
# 64x48 -> 128x96: 6 views, 1 step (strength 0.3 of 2 steps; the preset's 0.2 would round to none)
FAST = {"tile": "16", "stride": "8", "steps": "2", "strength": "0.3"}
# A ComfyUI core (its nodes.py, execution.py, comfy/) and, if its dependencies are not in this environment, the
# folders that hold them: see docs/layout.md "The service and the ComfyUI node" for the packaging used here. Unset:
# the real-ComfyUI tests are skipped.
COMFYUI_DIR = os.environ.get("CUPSCALE_COMFYUI_DIR")
COMFYUI_PYTHONPATH = os.environ.get("CUPSCALE_COMFYUI_PYTHONPATH", "")


def png_bytes(seed: int = 0, size=(64, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0 : size[1], 0 : size[0]]
    rgb = np.stack([xs * 4, ys * 5, 255 - xs * 3], -1) + rng.integers(0, 20, (size[1], size[0], 3))
    buf = io.BytesIO()
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def huge_header_png(width=100_000, height=100_000) -> bytes:
    """A valid PNG signature and IHDR claiming width x height, then a few bytes of data: a decompression bomb's
    header (the pixels are never there)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


def slow(**more):
    """A job of a few seconds: 60 steps at full strength."""
    return {**FAST, "steps": "60", "strength": "1.0", **more}


class ServiceClient:
    """The service's HTTP API as the tests call it, with the token unless told otherwise: over a real HTTP server
    (``ServiceClient.over_http(base)``, httpx) or FastAPI's TestClient on the in-process app."""

    def __init__(self, http, results=None, token: str | None = TOKEN, base: str = ""):
        self.http, self.results, self.token, self.base = http, results, token, base

    @classmethod
    def over_http(cls, base: str, token: str | None = TOKEN, results=None) -> ServiceClient:
        import httpx

        return cls(httpx.Client(base_url=base, timeout=60), results, token, base)

    def headers(self, token="default"):
        token = self.token if token == "default" else token
        return {"Authorization": f"Bearer {token}"} if token else {}

    def submit(self, body: bytes, token="default", **params):
        return self.http.post("/v1/upscale", params=params, content=body, headers=self.headers(token))

    def status(self, job_id: str):
        return self.http.get(f"/v1/jobs/{job_id}", headers=self.headers()).json()

    def wait(self, job_id: str, timeout=300, until=("succeeded", "failed", "cancelled")) -> dict:
        deadline = time.monotonic() + timeout
        while (record := self.status(job_id))["status"] not in until:
            assert time.monotonic() < deadline, f"job {job_id} still {record['status']} after {timeout} s"
            time.sleep(0.1)
        return record


def assert_one_line_error(response, status: int, *needles: str) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    message = response.json()["error"]
    assert "\n" not in message and message
    for needle in needles:
        assert needle in message, message
    return message


def assert_bad_requests_refused(service) -> None:
    """Every kind of bad request is a one-line 4xx, and none of them queues a job (the Serve instance and the
    in-process app share this list)."""
    good = png_bytes()
    assert_one_line_error(service.submit(good, token=None), 401, "missing token")
    assert_one_line_error(service.submit(good, token="wrong-token-0123456789"), 401, "rejected")
    assert_one_line_error(service.http.get("/v1/jobs/" + "0" * 32), 401)
    assert_one_line_error(service.submit(b"this is not an image at all"), 400, "not a readable image")
    assert_one_line_error(service.submit(good[: len(good) // 2]), 400, "image")  # truncated
    assert_one_line_error(service.submit(huge_header_png()), 413, "decompression bomb", "max_input_pixels")
    assert_one_line_error(service.submit(good, colour="red"), 400, "unknown knob 'colour'")
    assert_one_line_error(service.submit(good, strength="2"), 400, "strength=2.0", "out of range")
    assert_one_line_error(service.submit(good, guidance_scale=".nan"), 400, "finite")
    assert_one_line_error(service.submit(good, scale="3"), 400, "scale=3")
    assert_one_line_error(service.submit(good, model="/etc"), 400, "set by the service")
    assert_one_line_error(service.submit(good, max_input_pixels="99999999999"), 400, "set by the service")
    assert_one_line_error(service.submit(b""), 400, "empty")
    assert_one_line_error(service.submit(b"x" * (2**20 + 1)), 413, "limit")
    tiny = io.BytesIO()
    Image.new("RGB", (4, 4)).save(tiny, format="PNG")
    assert_one_line_error(service.submit(tiny.getvalue()), 400, "too small")
    assert_one_line_error(service.http.get("/v1/jobs/nope", headers=service.headers()), 404, "no such job")
    assert_one_line_error(service.http.get("/v1/jobs/" + "a" * 32 + "/result", headers=service.headers()), 404)
    assert service.http.get("/openapi.json").json()["paths"]["/v1/upscale"]["post"]["parameters"]
    assert service.http.get("/v1/health", headers=service.headers()).json()["queued"] == 0  # nothing was queued


@contextlib.contextmanager
def in_process_service(options):
    """The app of `cupscale serve` with its replica built in this process (what Serve runs in the replica), via
    FastAPI's TestClient: no Ray cluster."""
    from fastapi.testclient import TestClient
    from ray import serve

    from cupscale_dist.services import serve as service

    wrapper = service.UpscaleService.func_or_class  # Serve's ingress wrapper around our class
    ours = next(c for c in wrapper.__mro__[1:] if c.__name__ == "UpscaleService")
    replica = object.__new__(wrapper)
    ours.__init__(replica, options)  # what Serve runs in the replica; the ASGI wrapper part is Serve's
    saved = serve.get_replica_context
    serve.get_replica_context = lambda: types.SimpleNamespace(servable_object=replica)  # Serve's handler lookup
    try:
        with TestClient(service.app) as http:
            client = ServiceClient(http, Path(options.results))
            client.replica = replica
            yield client
    finally:
        serve.get_replica_context = saved
        replica.runner.close()
        replica.store.release()


@contextlib.contextmanager
def served_app(log_level: str = "warning"):
    """The service's app behind a real HTTP server on 127.0.0.1 (uvicorn in a thread); yields its port."""
    import threading

    import uvicorn

    from cupscale_dist.services import serve as service

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(service.app, host="127.0.0.1", port=port, log_level=log_level))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def post_head(port: int, length: int | None, query: str = "seed=1") -> socket.socket:
    """A POST /v1/upscale whose headers are sent and whose body is not (yet)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    size = f"Content-Length: {length}\r\n" if length is not None else "Transfer-Encoding: chunked\r\n"
    sock.sendall(f"POST /v1/upscale?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                 f"Content-Type: application/octet-stream\r\n{size}\r\n".encode())
    return sock


def read_answer(sock: socket.socket) -> tuple[int, dict, dict]:
    """Status, headers and JSON body of one HTTP/1.1 answer (Content-Length framed, as uvicorn sends JSON)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers["content-length"]):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, json.loads(body)


def run_comfyui_workflow(base: str, tmp_path: Path, extra_knobs: str) -> dict:
    """LoadImage -> CupscaleUpscale -> SaveImage in a real ComfyUI core (tests/comfyui_driver.py, a subprocess)."""
    import subprocess
    import sys

    inputs, outputs = tmp_path / "input", tmp_path / f"output-{abs(hash(extra_knobs))}"
    inputs.mkdir(exist_ok=True), outputs.mkdir()
    (inputs / "in.png").write_bytes(png_bytes())
    workflow = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
        "2": {"class_type": "CupscaleUpscale", "inputs": {
            "image": ["1", 0], "prompt": "a photo of an astronaut", "scale": "2", "creativity": 0.6, "seed": 3,
            "service_url": base, "token": TOKEN, "steps": 2, "extra_knobs": extra_knobs}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "cupscale"}},
    }
    env = {**os.environ, "PYTHONPATH": COMFYUI_PYTHONPATH}
    done = subprocess.run([sys.executable, str(REPO / "tests" / "comfyui_driver.py"), COMFYUI_DIR,
                           str(REPO / "comfyui_cupscale"), str(inputs), str(outputs), json.dumps(workflow)],
                          capture_output=True, text=True, env=env, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    report = json.loads(lines[-1].removeprefix("REPORT "))
    report["out_dir"] = str(outputs)
    return report


def check_comfyui_run(base: str, tmp_path: Path, expected_png: bytes) -> None:
    report = run_comfyui_workflow(base, tmp_path, f"tile={FAST['tile']}\nstride={FAST['stride']}")
    assert report["registered"] and report["display_name"] == "C-Upscale (cupscale serve)" and report["valid"]
    assert report["success"], report
    assert report["progress"] and report["progress"][-1] == [100, 100]
    (saved,) = report["saved"]
    with Image.open(Path(report["out_dir"]) / saved) as got, Image.open(io.BytesIO(expected_png)) as want:
        assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(want))
    report = run_comfyui_workflow(base, tmp_path, "colour=red")
    assert not report["success"]
    errors = [m[1] for m in report["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_type"] == "CupscaleUpscale"
    assert "unknown knob 'colour'" in errors[0]["exception_message"]


# -- pools and executors that record or break ------------------------------------------------------------------------
def _classes() -> dict:
    """``CountingPool``, ``KillingPool`` (Ray pools) and ``RecordingExecutor``: made on first use, as they subclass the
    package's executors (Ray's pool imports Ray), so importing this module stays light."""
    if "_CLASSES" in globals():
        return globals()["_CLASSES"]
    import signal

    import ray

    from cupscale_dist.execution.executor import LocalExecutor
    from cupscale_dist.execution.pool import WorkerPool

    class CountingPool(WorkerPool):
        """A real pool that counts the calls each kind of forward pass sent to the actors."""

        def __init__(self, *args):
            super().__init__(*args)
            self.calls: dict[str, int] = {}

        def _submit(self, method, args, slot):
            self.calls[method] = self.calls.get(method, 0) + 1
            return super()._submit(method, args, slot)

        def own(self, slot, method, count, args):  # step_design='actors': the step's calls on the part owners
            self.calls["own:" + method] = self.calls.get("own:" + method, 0) + 1
            return super().own(slot, method, count, args)

    class KillingPool(CountingPool):
        """Kills the actor that just received the ``kill_at``-th call of ``method`` (the call in flight)."""

        def __init__(self, *args, method, kill_at, hard):
            super().__init__(*args)
            self.method, self.kill_at, self.hard, self.killed = method, kill_at, hard, False

        def _submit(self, method, args, slot):
            submitted = super()._submit(method, args, slot)
            if method == self.method and self.calls[method] == self.kill_at and not self.killed:
                self._kill(submitted[3])
            return submitted

        def own(self, slot, method, count, args):  # the step on the actors: kill the owner that just got a step call
            refs = super().own(slot, method, count, args)
            if "own:" + method == self.method and self.calls[self.method] == self.kill_at and not self.killed:
                self._kill(self.actors[slot])
            return refs

        def _kill(self, actor):
            if self.hard:  # SIGKILL the worker process: Ray restarts the actor (its parts are gone), retries the call
                os.kill(ray.get(actor.where.remote())["pid"], signal.SIGKILL)
            else:  # gone for good: the driver must start a replacement and rebuild its parts
                ray.kill(actor, no_restart=True)
            self.killed = True

    class RecordingExecutor(LocalExecutor):
        """The reference executor, keeping each stage's context for inspection."""

        def __init__(self, worker, batch_size):
            super().__init__(worker, batch_size)
            self.contexts: list = []

        def share(self, value):
            self.contexts.append(value)
            return super().share(value)

    classes = {cls.__name__: cls for cls in (CountingPool, KillingPool, RecordingExecutor)}
    for cls in classes.values():
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
    globals()["_CLASSES"] = classes
    return classes


def __getattr__(name: str):  # `from helpers import CountingPool` (PEP 562)
    if name in ("CountingPool", "KillingPool", "RecordingExecutor"):
        return _classes()[name]
    raise AttributeError(name)


def ray_executor(config, actors, pool_class=None, **pool_kwargs):
    from cupscale_dist.execution.pool import RayExecutor
    from cupscale_dist.execution.raycluster import ClusterOptions
    from cupscale_dist.models.spec import ModelSpec

    pool_class = pool_class or _classes()["CountingPool"]
    spec = ModelSpec.load(config.model)
    return RayExecutor(pool_class(config, ClusterOptions(actors=actors, cpus_per_actor=0.5), spec, **pool_kwargs),
                       spec, config.view_batch_size)


# -- one line errors and bounds --------------------------------------------------------------------------------------
MAX_LINE = 300  # the bound on one error line (issue 35, item 6: the fuzz harness and hardening round 3)
HANG_BOUND_S = 120  # a FIFO case that still blocks is killed here and fails the test; it takes seconds when fixed
# a refusal or a metadata skip takes milliseconds (deep YAML too: refused while scanning); the defects took 7 s or more
QUICK_S = 2.0
FAST_S = 1.0  # "refused in well under a second": the bound a hostile 1 KB file gets


def exception_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message, message
    return message


def short_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line]
    assert len(lines) == 1 and len(lines[0]) <= MAX_LINE, text[-2000:]
    return lines[0]


def refused_line(exc_info) -> str:
    return short_line(str(exc_info.value))


def bounded(code: str) -> str:
    """Run ``code`` in a fresh interpreter with a bound (a FIFO that blocks fails the test instead of hanging it);
    returns its stdout."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=HANG_BOUND_S, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@contextlib.contextmanager
def address_space_ceiling(headroom: int):
    """This process may map at most ``headroom`` more bytes meanwhile: an unbounded read fails in a second with
    MemoryError instead of filling the machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    in_use = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    ceiling = in_use + headroom if hard == resource.RLIM_INFINITY else min(in_use + headroom, hard)
    resource.setrlimit(resource.RLIMIT_AS, (ceiling, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# -- the CLI as its own process --------------------------------------------------------------------------------------
START_HEAD = REPO / "cluster" / "start-local-head.sh"
CLI_FAST = ["--tile", "16", "--stride", "8", "--steps", "4", "--device", "cpu", "--dtype", "float32",
            "--set", "torch_threads=1", "--scale", "2"]
DEMO = ["--config", "cpu-demo"]
IMAGE = str(REPO / "examples" / "astronaut.png")


def env(**changes: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER"))}
    return {**base, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", **changes}


def cupscale(*args, **kwargs) -> subprocess.Popen:
    """``python -m cupscale_dist.cli ARGS`` as its own process (args may be bytes: argv that is not UTF-8)."""
    argv = [a if isinstance(a, bytes) else str(a) for a in args]
    return subprocess.Popen([sys.executable, "-m", "cupscale_dist.cli", *argv], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=kwargs.pop("env", None) or env(), **kwargs)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def stderr_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cupscale: error:") and "Traceback" not in err, err
    return lines[0]


def cli_config(argv: list):
    from cupscale_dist.cli.main import build_parser
    from cupscale_dist.cli.options import config_from_args

    return config_from_args(build_parser().parse_args([str(a) for a in argv]))


def upscale_argv(ws: Path, out: Path, *extra: str) -> list[str]:
    """A fast run's argv; its model does not exist: a bad input must be refused before the model is looked at."""
    return ["upscale", str(ws / "in.png"), "-o", str(out), "--model", str(ws / "no-such-model"), "--scale", "2",
            *RUN, "-q", *extra]


def refused_run(capsys, ws: Path, tmp_path: Path, *extra: str) -> str:
    """The one error line of a bad run; checks exit 2, nothing written, a short line, and that it came fast."""
    out = tmp_path / "out.png"
    before = snapshot(ws, tmp_path)
    started = time.monotonic()
    code, _, err = cli(capsys, *upscale_argv(ws, out, *extra))
    took = time.monotonic() - started
    line = assert_one_error_line(code, err)
    assert code == 2 and snapshot(ws, tmp_path) == before
    assert len(line) < 300, f"{len(line)}-character error line: {line[:200]}..."
    assert took < QUICK_S, f"refused after {took:.1f} s"
    return line


# -- a real Ray head (`cupscale submit` / `cupscale jobs`) -----------------------------------------------------------
def base_env(**changes: str) -> dict[str, str]:
    """This interpreter's bin first on PATH (the `ray` CLI), no inherited cluster address or auth settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER", "RAY_AUTH"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1",
               RAY_DISABLE_USAGE_STATS="1", PYTHONUNBUFFERED="1")
    env.update(changes)
    return env


def run_cupscale(*args, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    """``python -m cupscale_dist.cli ARGS`` to its end, its output captured as text."""
    return subprocess.run([sys.executable, "-m", "cupscale_dist.cli", *map(str, args)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@dataclass
class Head:
    address: str  # the job server (dashboard)
    env: dict[str, str]  # a client environment holding the right token
    gcs: str  # what `--address` of upscale/batch takes
    temp_dir: Path
    token_file: Path


@contextlib.contextmanager
def local_head():
    """A real head: `ray start --head` on 127.0.0.1 (token auth, its own temp dir, dashboard = job server), stopped
    on exit (a module fixture's body: tests/services/test_jobs.py, test_zimage_services.py)."""
    # short: Ray's socket paths must fit 107 bytes (a pytest-xdist worker's tmp path is longer than plain pytest's)
    root = Path(tempfile.mkdtemp(prefix="cupscale-head-", dir="/tmp"))
    token_file = root / "token"
    token_file.write_text(secrets.token_hex(16))
    token_file.chmod(0o644)  # as a plain `echo > file` leaves it: the script must take the others' access away
    env = base_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))  # never touches ~/.ray
    dashboard, gcs_port = free_port(), free_port()
    temp_dir = root / "ray"
    started = subprocess.run(["bash", str(START_HEAD), str(temp_dir)], capture_output=True, text=True, timeout=180,
                             env={**env, "RAY_PORT": str(gcs_port), "DASHBOARD_PORT": str(dashboard),
                                  "NUM_CPUS": "2"})
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.time() + 60  # the job agent registers a moment after `ray start` returns
        while run_cupscale("jobs", "list", "--address", address, env=env).returncode != 0 and time.time() < deadline:
            time.sleep(1)
        yield Head(address, env, f"127.0.0.1:{gcs_port}", temp_dir, token_file)
    finally:  # only this head's process group: `ray stop` would end every Ray cluster on the machine
        stopped = subprocess.run(["bash", str(START_HEAD), "--stop", str(temp_dir)], capture_output=True, text=True,
                                 timeout=60, env=env)
        assert stopped.returncode == 0, stopped.stderr
        deadline = time.time() + 15
        while (left := subprocess.run(["pgrep", "-f", str(temp_dir)], capture_output=True, text=True).stdout.split()):
            assert time.time() < deadline, f"head processes left: {left}"
            time.sleep(0.5)
        shutil.rmtree(root, ignore_errors=True)


# -- pictures and stand-ins ------------------------------------------------------------------------------------------
def noisy_picture(seed: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size]
    rgb = np.stack([xs * 4, ys * 4, 255 - xs * 2], axis=-1) + rng.normal(0, 10, (size, size, 3))
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def random_picture(seed: int, size=(64, 64)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size[::-1], 3), dtype=np.uint8))


def pointwise(z: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.sin(3 * z) * 0.7 + 0.1 * z


class Interrupted(Exception):
    pass


# -- service limits --------------------------------------------------------------------------------------------------
MAX_BODY = 2**20
INFLIGHT = MAX_BODY + MAX_BODY // 2  # one largest body and small ones fit; two largest do not


# -- weights=offload: what diffusers' group offloading keeps on the GPU (models.weights.weights_gb) ----------------
def parameter_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def block_groups(model) -> tuple[list[int], int]:
    """Parameters of each group diffusers' block-level offloading (one block per group) makes of ``model``, in the
    model's order: each block of its ModuleList / Sequential children; and of the rest, one group onloaded for the
    model's whole forward (``offload_group_sizes`` checks this against diffusers' own hooks)."""
    import torch

    lists = [child for child in model.children() if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential))]
    blocks = [parameter_count(block) for child in lists for block in child]
    return blocks, parameter_count(model) - sum(blocks)


def resident_share(model) -> float:
    """The share of ``model``'s parameters block-level offloading with a stream keeps on the GPU at most: the largest
    two consecutive groups (one computing, the next prefetched) and the rest."""
    blocks, rest = block_groups(model)
    return (max(a + b for a, b in zip(blocks, blocks[1:])) + rest) / parameter_count(model)


def largest_leaf(model) -> int:
    """Parameters of ``model``'s largest leaf module: what leaf-level offloading keeps on the GPU at most."""
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules() if not any(m.children()))


def offload_group_sizes(model) -> list[int]:
    """Parameters of each group diffusers' group-offloading hooks on ``model`` (applied) onload, sorted."""
    from cupscale_dist.models.offload_hooks import offload_hooks

    groups = {id(hook.group): hook.group for module in model.modules() for hook in offload_hooks(module)
              if getattr(hook, "group", None) is not None}
    sizes = []
    for group in groups.values():
        parameters = {id(p): p for module in group.modules for p in module.parameters()}
        parameters.update({id(p): p for p in group.parameters or ()})
        sizes.append(sum(p.numel() for p in parameters.values()))
    return sorted(sizes)
