"""`cupscale serve` against a real Ray Serve instance on a local Ray (127.0.0.1, Ray token auth on): the happy path
(bytes equal to `cupscale upscale`'s), bad requests, cancellation, a full queue, 50 concurrent requests, a replica
restart. The tiny random SDXL keeps each job well under a second of model time."""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# On a busy 2-core machine Serve's proxy takes longer than its 5 s readiness check to start (measured: killed and
# restarted in a loop); the service's own defaults (cupscale_dist.services.serve.SLOW_START_ENV) apply to the test cluster.
from cupscale_dist.services.serve import SLOW_START_ENV  # noqa: E402

for _key, _value in SLOW_START_ENV.items():
    os.environ.setdefault(_key, _value)

TOKEN = "test-token-0123456789abcdef"
QUEUE = 4
MODEL = "demo"  # the trained demo model, as the issue asks of the load test (factor-4 VAE: 128x96 px = 32x24 latent)
# 64x48 -> 128x96: 6 views, 1 step (strength 0.3 of 2 steps; the preset's 0.2 would round to none)
FAST = {"tile": "16", "stride": "8", "steps": "2", "strength": "0.3"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


class Client:
    """A small HTTP client for the service (httpx), with the token unless told otherwise."""

    def __init__(self, base: str, token: str | None):
        import httpx

        self.base, self.token = base, token
        self.http = httpx.Client(base_url=base, timeout=60)

    def headers(self, token="default"):
        token = self.token if token == "default" else token
        return {"Authorization": f"Bearer {token}"} if token else {}

    def submit(self, body: bytes, token="default", **params):
        return self.http.post("/v1/upscale", params=params, content=body, headers=self.headers(token))

    def status(self, job_id: str):
        return self.http.get(f"/v1/jobs/{job_id}", headers=self.headers()).json()

    def wait(self, job_id: str, timeout=240, until=("succeeded", "failed", "cancelled")) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            record = self.status(job_id)
            if record["status"] in until:
                return record
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} still {record['status']} after {timeout} s")


@pytest.fixture(scope="module")
def service(local_ray, tmp_path_factory):
    from ray import serve

    from cupscale_dist import UpscaleConfig
    from cupscale_dist.execution.raycluster import ClusterOptions
    from cupscale_dist.services.serve import ServiceOptions, deploy

    results = tmp_path_factory.mktemp("results")
    config = UpscaleConfig.load("cpu-demo", model=MODEL, torch_threads=1)
    options = ServiceOptions(str(results), config, queue_size=QUEUE, token=TOKEN, max_request_bytes=2**20,
                             cluster=ClusterOptions(actors=1, cpus_per_actor=1))
    port = free_port()
    deploy(options, "127.0.0.1", port)
    client = Client(f"http://127.0.0.1:{port}", TOKEN)
    client.results = results
    yield client
    serve.shutdown()


@pytest.fixture(scope="module")
def cli_bytes(tmp_path_factory):
    """`cupscale upscale` (the CLI's own code path, in this process, single-process reference) on the same input
    and parameters: its output file's bytes, per seed."""
    from cupscale_dist.cli.main import main

    folder = tmp_path_factory.mktemp("cli")
    source = folder / "in.png"
    source.write_bytes(png_bytes())
    cache = {}

    def run(seed: int) -> bytes:
        if seed not in cache:
            out = folder / f"out-{seed}.png"
            argv = ["upscale", str(source), "-o", str(out), "--config", "cpu-demo", "--model", MODEL, "--set",
                    "torch_threads=1", "--tile", FAST["tile"], "--stride", FAST["stride"], "--steps", FAST["steps"],
                    "--strength", FAST["strength"],
                    "--seed", str(seed), "--actors", "0", "-q"]
            assert main(argv) == 0
            cache[seed] = out.read_bytes()
        return cache[seed]

    run.source = str(source)
    return run


def assert_one_line_error(response, status: int, *needles: str) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    message = response.json()["error"]
    assert "\n" not in message and message
    for needle in needles:
        assert needle in message, message
    return message


# ---------------------------------------------------------------------------------------------------------------
def test_happy_path_matches_cli_bytes(service, cli_bytes):
    answer = service.submit(png_bytes(), seed="3", source=cli_bytes.source, **FAST)
    assert answer.status_code == 202, answer.text
    job = answer.json()
    assert job["status"] == "queued" and job["url"] == f"/v1/jobs/{job['id']}"
    record = service.wait(job["id"])
    assert record["status"] == "succeeded", record
    assert record["progress"] == {"stage": 1, "stages": 1, "step": 1, "steps": 1}
    assert record["output_size"] == [128, 96]
    result = service.http.get(record["result"], headers=service.headers())
    assert result.status_code == 200 and result.headers["content-type"] == "image/png"
    assert result.content == cli_bytes(3)  # the same file, byte for byte: pixels and parameters
    with Image.open(io.BytesIO(result.content)) as image:
        assert image.size == (128, 96)
        assert json.loads(image.text["cupscale:config"])["seed"] == 3
    # The job record and the result live in the results folder.
    assert (service.results / "results" / f"{job['id']}.png").read_bytes() == result.content
    assert json.loads((service.results / "jobs" / f"{job['id']}.json").read_text())["status"] == "succeeded"
    assert not (service.results / "inputs" / job["id"]).exists()  # the upload goes once the job ended


def test_bad_requests_are_one_line_4xx(service):
    assert_bad_requests_refused(service)


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


def slow(**more):
    """A job of a few seconds: 60 steps at full strength."""
    return {**FAST, "steps": "60", "strength": "1.0", **more}


def test_cancel_queued_and_running(service):
    first = service.submit(png_bytes(), **slow()).json()["id"]
    second = service.submit(png_bytes(), **slow()).json()["id"]
    answer = service.http.delete(f"/v1/jobs/{second}", headers=service.headers())
    assert answer.status_code == 200 and answer.json()["status"] == "cancelled"
    deadline = time.monotonic() + 120
    while (record := service.status(first))["status"] != "running" or not (record["progress"] or {}).get("step"):
        assert time.monotonic() < deadline, record
        time.sleep(0.1)
    answer = service.http.delete(f"/v1/jobs/{first}", headers=service.headers())
    assert answer.status_code == 202 and answer.json()["cancel_requested"]
    record = service.wait(first, timeout=60)
    assert record["status"] == "cancelled" and record["progress"]["step"] < 60, record
    assert_one_line_error(service.http.get(f"/v1/jobs/{first}/result", headers=service.headers()), 409, "cancelled")
    assert_one_line_error(service.http.delete(f"/v1/jobs/{first}", headers=service.headers()), 409, "already")
    assert service.wait(second)["status"] == "cancelled"  # it never started
    assert not (service.results / "results" / f"{first}.png").exists()


def test_full_queue_answers_429_with_retry_after(service):
    accepted, refused = [], None
    for _ in range(QUEUE + 3):  # one running + QUEUE waiting: the next is refused
        answer = service.submit(png_bytes(), **slow())
        if answer.status_code == 429:
            refused = answer
            break
        assert answer.status_code == 202, answer.text
        accepted.append(answer.json()["id"])
    assert refused is not None and len(accepted) >= QUEUE
    assert_one_line_error(refused, 429, "queue is full")
    assert int(refused.headers["Retry-After"]) >= 1
    for job_id in accepted:
        service.http.delete(f"/v1/jobs/{job_id}", headers=service.headers())
    for job_id in accepted:
        assert service.wait(job_id)["status"] in ("cancelled", "succeeded")


def test_50_concurrent_requests_all_answered_with_cli_bytes(service, cli_bytes):
    """50 clients at once against a queue of 4: each retries after 429 as Retry-After says; every request gets a
    job, every job succeeds, and every result is the CLI's file for its seed."""
    count, seeds = 50, (0, 1)
    ids: list[str | None] = [None] * count
    refusals = [0] * count
    start = threading.Barrier(count)

    def client(i: int) -> None:
        start.wait()
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            answer = service.submit(png_bytes(), seed=str(seeds[i % 2]), source=cli_bytes.source, **FAST)
            if answer.status_code == 202:
                ids[i] = answer.json()["id"]
                return
            assert answer.status_code == 429, answer.text
            refusals[i] += 1
            time.sleep(min(float(answer.headers["Retry-After"]), 2.0))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(count)]
    began = time.monotonic()
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert all(ids) and len(set(ids)) == count
    expected = {seed: cli_bytes(seed) for seed in seeds}
    for i, job_id in enumerate(ids):
        record = service.wait(job_id, timeout=600)
        assert record["status"] == "succeeded", record
        data = service.http.get(f"/v1/jobs/{job_id}/result", headers=service.headers()).content
        assert data == expected[seeds[i % 2]]
    print(f"\n50 requests: {time.monotonic() - began:.1f} s, {sum(refusals)} 429 answers retried")
    assert sum(refusals) > 0  # the queue (4) really was full at times


def test_replica_restart_keeps_results_and_fails_interrupted_jobs(service):
    import ray

    done = service.submit(png_bytes(), **FAST).json()["id"]
    assert service.wait(done)["status"] == "succeeded"
    before = service.http.get(f"/v1/jobs/{done}/result", headers=service.headers()).content
    running = service.submit(png_bytes(), **slow()).json()["id"]
    service.wait(running, until=("running",))
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"]]
    assert len(replicas) == 1
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
    deadline = time.monotonic() + 180
    while True:  # Serve's controller starts a new replica; it recovers the folder
        try:
            if service.http.get("/v1/health", headers=service.headers()).status_code == 200:
                break
        except Exception:  # noqa: BLE001 - the proxy may refuse while no replica is up
            pass
        assert time.monotonic() < deadline, "no replica came back"
        time.sleep(0.5)
    record = service.status(running)
    assert record["status"] == "failed" and "interrupted" in record["error"], record
    assert service.http.get(f"/v1/jobs/{done}/result", headers=service.headers()).content == before


# ---------------------------------------------------------------------------------------------------------------
# The ComfyUI node against the real service
# ---------------------------------------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]
# A ComfyUI core (its nodes.py, execution.py, comfy/) and, if its dependencies are not in this environment, the
# folders that hold them: see docs/layout.md "The service and the ComfyUI node" for the packaging used here. Unset: that test is skipped.
COMFYUI_DIR = os.environ.get("CUPSCALE_COMFYUI_DIR")
COMFYUI_PYTHONPATH = os.environ.get("CUPSCALE_COMFYUI_PYTHONPATH", "")


def node_class():
    import sys

    sys.path.insert(0, str(REPO))
    from comfyui_cupscale import NODE_CLASS_MAPPINGS

    return NODE_CLASS_MAPPINGS["CupscaleUpscale"]


def test_comfyui_node_class_against_the_service(service, cli_bytes):
    """The node's class as ComfyUI calls it: an IMAGE batch [B, H, W, C] in, an IMAGE batch out, the pixels of the
    service's (= the CLI's) result; a refusal of the service is the exception ComfyUI shows as the node's error."""
    import torch

    node = node_class()()
    with Image.open(io.BytesIO(png_bytes())) as source:
        pixels = torch.from_numpy(np.asarray(source, dtype=np.float32) / 255.0)
    batch = torch.stack([pixels, pixels])
    base = dict(prompt="a photo of an astronaut", scale="2", creativity=0.6, seed=3, service_url=service.base,
                token=TOKEN, steps=2, extra_knobs=f"tile={FAST['tile']}\nstride={FAST['stride']}")
    (out,) = getattr(node, node.FUNCTION)(batch, **base)
    assert out.shape == (2, 96, 128, 3) and out.dtype == torch.float32
    with Image.open(io.BytesIO(cli_bytes(3))) as expected:
        want = torch.from_numpy(np.asarray(expected, dtype=np.float32) / 255.0)
    assert torch.equal(out[0], want) and torch.equal(out[1], want)
    from comfyui_cupscale.client import ServiceError

    with pytest.raises(ServiceError, match="unknown knob 'colour'"):
        getattr(node, node.FUNCTION)(batch, **{**base, "extra_knobs": "colour=red"})
    with pytest.raises(ServiceError, match="token was rejected"):
        getattr(node, node.FUNCTION)(batch, **{**base, "token": "wrong-token-0123456789"})


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


@pytest.mark.skipif(not COMFYUI_DIR, reason="no ComfyUI core: set CUPSCALE_COMFYUI_DIR (docs/layout.md 'The service and the ComfyUI node')")
def test_comfyui_node_in_a_real_comfyui(service, cli_bytes, tmp_path):
    """ComfyUI's own loader and executor: LoadImage -> CupscaleUpscale -> SaveImage. The saved pixels are the CLI's;
    a bad knob fails the node with the service's message as ComfyUI's execution_error."""
    check_comfyui_run(service.base, tmp_path, cli_bytes(3))
