"""The service's HTTP semantics without a Ray cluster: the very FastAPI app of `cupscale serve`, bound to one
replica object made in this process (``--actors 0``: the model in the replica) and called through FastAPI's
TestClient. tests/services/test_serve.py runs the same checks against a real Serve instance on a local Ray; this layer
runs in seconds and needs no Ray processes (on a loaded machine a local Ray may not start within Ray's 30 s)."""

from __future__ import annotations

import pytest
from helpers import (
    COMFYUI_DIR,
    FAST,
    MODEL,
    QUEUE,
    TOKEN,
    assert_bad_requests_refused,
    assert_one_line_error,
    check_comfyui_run,
    in_process_service,
    png_bytes,
    served_app,
    slow,
)

pytestmark = pytest.mark.filterwarnings("ignore:coroutine .*__del__.* was never awaited:RuntimeWarning")


@pytest.fixture(scope="module")
def app_service(tmp_path_factory):
    from cupscale_dist import UpscaleConfig
    from cupscale_dist.execution.raycluster import ClusterOptions
    from cupscale_dist.services import serve as service

    results = tmp_path_factory.mktemp("app-results")
    config = UpscaleConfig.load("cpu-demo", model=MODEL, torch_threads=1)
    options = service.ServiceOptions(str(results), config, QUEUE, TOKEN, 2**20, ClusterOptions(actors=0))
    with in_process_service(options) as client:
        yield client


def test_app_happy_path_matches_cli_bytes(app_service, cli_bytes):
    answer = app_service.submit(png_bytes(), seed="3", source=cli_bytes.source, **FAST)
    assert answer.status_code == 202, answer.text
    record = app_service.wait(answer.json()["id"])
    assert record["status"] == "succeeded", record
    assert record["progress"] == {"stage": 1, "stages": 1, "step": 1, "steps": 1}
    result = app_service.http.get(record["result"], headers=app_service.headers())
    assert result.status_code == 200 and result.headers["content-type"] == "image/png"
    assert result.content == cli_bytes(3)


def test_app_bad_requests_are_one_line_4xx(app_service):
    assert_bad_requests_refused(app_service)


def test_app_cancel_and_full_queue(app_service):
    running = app_service.submit(png_bytes(), **slow()).json()["id"]
    app_service.wait(running, until=("running",))
    queued = [app_service.submit(png_bytes(), **slow()) for _ in range(QUEUE)]
    assert all(a.status_code == 202 for a in queued), [a.text for a in queued]
    refused = app_service.submit(png_bytes(), **slow())
    assert_one_line_error(refused, 429, "queue is full")
    assert int(refused.headers["Retry-After"]) >= 1
    first = queued[0].json()["id"]
    answer = app_service.http.delete(f"/v1/jobs/{first}", headers=app_service.headers())
    assert answer.status_code == 200 and answer.json()["status"] == "cancelled"
    answer = app_service.http.delete(f"/v1/jobs/{running}", headers=app_service.headers())
    assert answer.status_code == 202 and answer.json()["cancel_requested"]
    assert app_service.wait(running)["status"] == "cancelled"
    for other in queued[1:]:
        app_service.http.delete(f"/v1/jobs/{other.json()['id']}", headers=app_service.headers())
    for other in queued:
        assert app_service.wait(other.json()["id"])["status"] == "cancelled"
    assert_one_line_error(app_service.http.get(f"/v1/jobs/{running}/result", headers=app_service.headers()), 409)


@pytest.fixture(scope="module")
def app_http(app_service):
    """The same app over HTTP, for clients in other processes."""
    with served_app() as port:
        yield f"http://127.0.0.1:{port}"


@pytest.mark.skipif(not COMFYUI_DIR, reason="no ComfyUI core: set CUPSCALE_COMFYUI_DIR "
                                             "(docs/layout.md 'The service and the ComfyUI node')")
def test_app_comfyui_node_in_a_real_comfyui(app_http, cli_bytes, tmp_path):
    """ComfyUI's own loader and executor run the node against the service's app over HTTP: the CLI's pixels come
    out of SaveImage; a bad knob is the node's execution_error with the service's message."""
    check_comfyui_run(app_http, tmp_path, cli_bytes(3))
