"""`cupscale serve` against a real Ray Serve instance on a local Ray (127.0.0.1, Ray token auth on): the happy path
(bytes equal to `cupscale upscale`'s), bad requests, cancellation, a full queue, 50 concurrent requests, a replica
restart. The tiny random SDXL keeps each job well under a second of model time."""

from __future__ import annotations

import io
import json
import os
import threading
import time

import numpy as np
import pytest
from helpers import (
    COMFYUI_DIR,
    FAST,
    MODEL,
    QUEUE,
    REPO,
    TOKEN,
    ServiceClient,
    assert_bad_requests_refused,
    assert_one_line_error,
    check_comfyui_run,
    free_port,
    png_bytes,
    slow,
)
from PIL import Image

# On a busy 2-core machine Serve's proxy takes longer than its 5 s readiness check to start (measured: killed and
# restarted in a loop); the service's own defaults (cupscale_dist.services.serve.SLOW_START_ENV) apply to the test
# cluster.
from cupscale_dist.services.serve import SLOW_START_ENV  # noqa: E402

for _key, _value in SLOW_START_ENV.items():
    os.environ.setdefault(_key, _value)


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
    client = ServiceClient.over_http(f"http://127.0.0.1:{port}", TOKEN, results)
    yield client
    serve.shutdown()


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


@pytest.mark.skipif(not COMFYUI_DIR, reason="no ComfyUI core: set CUPSCALE_COMFYUI_DIR "
                                             "(docs/layout.md 'The service and the ComfyUI node')")
def test_comfyui_node_in_a_real_comfyui(service, cli_bytes, tmp_path):
    """ComfyUI's own loader and executor: LoadImage -> CupscaleUpscale -> SaveImage. The saved pixels are the CLI's;
    a bad knob fails the node with the service's message as ComfyUI's execution_error."""
    check_comfyui_run(service.base, tmp_path, cli_bytes(3))
