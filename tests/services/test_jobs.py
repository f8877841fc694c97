"""`cupscale submit` / `cupscale jobs` against a real Ray head started here (token auth on), and their errors."""

from __future__ import annotations

import json
import os
import re
import stat
import time

import pytest
from helpers import REPO, base_env, free_port, local_head, run_cupscale
from PIL import Image


@pytest.fixture(scope="module")
def head():
    """A real head: `ray start --head` on 127.0.0.1 (token auth, its own temp dir, dashboard = job server)."""
    with local_head() as started:
        yield started


def submitted_id(stdout: str) -> str:
    return re.search(r"submitted (raysubmit_\w+)", stdout).group(1)


def test_submit_wait_upscales_on_a_real_head_then_jobs_commands(head, sdxl_dir, photo, tmp_path):
    address, env = head.address, head.env
    photo.save(tmp_path / "in.png")
    out = tmp_path / "out.png"
    done = run_cupscale("submit", "--address", address, "--wait", "--working-dir", REPO, "--env", "HF_HUB_OFFLINE=1",
                        "--entrypoint-num-cpus", "0.5", "--",
                        "upscale", tmp_path / "in.png", "-o", out, "--model", sdxl_dir, "--device", "cpu", "--dtype",
                        "float32", "--scale", "2", "--tile", "16", "--stride", "8", "--steps", "5", "--set",
                        "torch_threads=1", "--cpus-per-actor", "0.5", "-q", env=env, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    job_id = submitted_id(done.stdout)
    assert f"wrote {out} (256x192)" in done.stdout and f"job {job_id} SUCCEEDED" in done.stdout  # its log, echoed
    with Image.open(out) as image:
        assert image.size == (256, 192)

    listed = run_cupscale("jobs", "list", "--address", address, env=env)
    assert listed.returncode == 0 and job_id in listed.stdout and "SUCCEEDED" in listed.stdout
    status = run_cupscale("jobs", "status", job_id, "--address", address, env=env)
    assert status.returncode == 0 and status.stdout.startswith(f"{job_id} SUCCEEDED")
    logs = run_cupscale("jobs", "logs", job_id, "--address", address, env=env)
    assert logs.returncode == 0 and f"wrote {out}" in logs.stdout
    unknown = run_cupscale("jobs", "status", "raysubmit_nosuchjob", "--address", address, env=env)
    assert unknown.returncode == 2 and "no such job" in unknown.stderr


def test_a_flux_job_gives_the_bytes_of_a_local_run(head, photo, tmp_path):
    """A Flux model through Ray Jobs: the job's driver fans out to actors on the head; the in-process run's pixels."""
    import numpy as np

    from cupscale_dist.testing.tiny_flux import build_tiny_flux

    flux_dir = build_tiny_flux(tmp_path / "flux", variant="schnell")
    photo.save(tmp_path / "in.png")
    run = ["--model", flux_dir, "--device", "cpu", "--dtype", "float32", "--scale", "2", "--tile", "16", "--stride",
           "8", "--steps", "2", "--set", "torch_threads=1", "-q"]
    local = run_cupscale("upscale", tmp_path / "in.png", "-o", tmp_path / "local.png", *run, "--actors", "0",
                         env=head.env, timeout=240)
    assert local.returncode == 0, local.stderr
    done = run_cupscale("submit", "--address", head.address, "--wait", "--working-dir", REPO, "--env",
                        "HF_HUB_OFFLINE=1", "--entrypoint-num-cpus", "0.5", "--", "upscale", tmp_path / "in.png",
                        "-o", tmp_path / "job.png", *run, "--cpus-per-actor", "0.5", env=head.env, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    with Image.open(tmp_path / "local.png") as a, Image.open(tmp_path / "job.png") as b:
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_stop_a_running_job(head, sdxl_dir, photo, tmp_path):
    address, env = head.address, head.env
    photo.save(tmp_path / "in.png")
    sent = run_cupscale("submit", "--address", address, "--", "upscale", tmp_path / "in.png", "-o", tmp_path / "o.png",
                        "--model", sdxl_dir, "--device", "cpu", "--scale", "2", "--tile", "16", "--stride", "8",
                        "--steps", "1000", "--strength", "1.0", "--cpus-per-actor", "0.5", "-q", env=env)
    assert sent.returncode == 0, sent.stderr
    job_id = submitted_id(sent.stdout)
    stopped = run_cupscale("jobs", "stop", job_id, "--address", address, env=env)
    assert stopped.returncode == 0 and f"stop requested for {job_id}" in stopped.stdout, stopped.stderr
    deadline = time.time() + 60
    while "STOPPED" not in (s := run_cupscale("jobs", "status", job_id, "--address", address, env=env)).stdout:
        assert time.time() < deadline, s.stdout + s.stderr
        time.sleep(1)
    assert not (tmp_path / "o.png").exists()


def test_a_wrong_token_is_one_clear_line(head):
    address, env = head.address, head.env
    wrong = run_cupscale("jobs", "list", "--address", address, env={**env, "RAY_AUTH_TOKEN": "0" * 32})
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1
    assert wrong.stderr.startswith(f"cupscale: error: --address {address}: the token was rejected")


def test_no_token_is_one_clear_line(head, tmp_path):
    address, env = head.address, head.env
    env = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    missing = run_cupscale("jobs", "list", "--address", address, env={**env, "HOME": str(tmp_path)})
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "requires a token and none was found" in missing.stderr and "~/.ray/auth_token" in missing.stderr


# --- issue 13: the head binds loopback only, its token is private, `--address` token errors are one line ---------
def listening(pgid: int) -> list[tuple[str, str]]:
    """(address, process) of every listening socket of the head's process group."""
    import psutil

    found = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN and conn.pid:
            try:
                if os.getpgid(conn.pid) == pgid:
                    found.append((conn.laddr.ip, psutil.Process(conn.pid).name()))
            except (OSError, psutil.Error):
                continue
    return found


def test_the_local_head_listens_on_loopback_only_and_keeps_its_token_private(head):
    sockets = listening(int((head.temp_dir / "cupscale-head.pgid").read_text()))
    names = {name for _, name in sockets}
    assert {"gcs_server", "raylet"} <= names and any("Agent" in n for n in names), sockets
    assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1") for ip, _ in sockets), sockets
    assert stat.S_IMODE(head.token_file.stat().st_mode) == 0o600


@pytest.mark.parametrize("auth", ["wrong", "missing"])
def test_address_with_a_wrong_or_missing_token_is_one_line_naming_the_token(auth, head, photo, tmp_path):
    photo.save(tmp_path / "in.png")
    env = {k: v for k, v in head.env.items() if not k.startswith("RAY_AUTH")}
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 32} if auth == "wrong" else {"HOME": str(tmp_path)})
    for command in (["upscale", tmp_path / "in.png", "-o", tmp_path / "out.png"],
                    ["batch", "--input", tmp_path / "in.png", "--output", tmp_path / "out"]):
        done = run_cupscale(*command, "--config", "cpu-demo", "--address", head.gcs, env=env, timeout=120)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert "token" in done.stderr and done.stderr.startswith(f"cupscale: error: --address {head.gcs}: ")
        assert ("the token was rejected" if auth == "wrong" else "without RAY_AUTH_MODE=token") in done.stderr
    assert not (tmp_path / "out.png").exists() and not (tmp_path / "out" / "manifest.parquet").exists()


# --- without a cluster --------------------------------------------------------------------------------------------
def test_unreachable_address_fails_fast_in_one_line():
    start = time.time()
    result = run_cupscale("jobs", "list", "--address", f"127.0.0.1:{free_port()}", env=base_env())
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "no Ray job server answers there" in result.stderr and time.time() - start < 20


def test_submit_dry_run_shows_runtime_env_and_entrypoint_resources(tmp_path):
    result = run_cupscale("submit", "--dry-run", "--address", "http://head:8265", "--working-dir", REPO,
                          "--pip", "pywavelets", "--env", "HF_HUB_OFFLINE=1", "--entrypoint-num-gpus", "1", "--",
                          "batch", "--input", "/data/in", "--output", "/data/out", "--config", "sdxl-4k",
                          env=base_env())
    assert result.returncode == 0, result.stderr
    request = json.loads(result.stdout)
    assert request["address"] == "http://head:8265"
    assert request["entrypoint"] == ("python -m cupscale_dist.cli batch --input /data/in --output /data/out "
                                     "--config sdxl-4k")
    assert request["runtime_env"]["working_dir"] == str(REPO) and request["runtime_env"]["pip"] == ["pywavelets"]
    assert request["runtime_env"]["env_vars"] == {"HF_HUB_OFFLINE": "1"} and request["entrypoint_num_gpus"] == 1


@pytest.mark.parametrize("job, message", [
    (["caption", "x.png"], "the job must be `upscale ...` or `batch ...`, got 'caption'"),
    ([], "the job must be `upscale ...` or `batch ...`, got 'nothing'"),
    (["upscale", "x.png"], "the following arguments are required: -o/--output"),
])
def test_submit_checks_the_job_before_sending(job, message):
    result = run_cupscale("submit", "--address", "http://127.0.0.1:1", "--", *job, env=base_env())
    assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.parametrize("job, gpus", [
    (["upscale", "in.png", "-o", "out.png", "--config", "sdxl-4k", "--actors", "0"], 1),  # its driver runs the models
    (["upscale", "in.png", "-o", "out.png", "--config", "sdxl-4k"], None),  # Ray mode: a CPU-only head will do
    (["upscale", "in.png", "-o", "out.png", "--config", "cpu-demo", "--actors", "0"], None),  # a CPU run
    (["batch", "--input", "/data/in", "--output", "/data/out", "--config", "sdxl-4k"], None),  # Ray Data workers
    (["upscale", "in.png", "-o", "out.png", "--config", "sdxl-4k", "--actors", "0", "--entrypoint-num-gpus", "0"], 0),
])
def test_submit_reserves_a_gpu_only_for_a_driver_that_runs_models(job, gpus):
    flags = job[-2:] if job[-2] == "--entrypoint-num-gpus" else []
    result = run_cupscale("submit", "--dry-run", "--address", "http://head:8265", *flags, "--",
                          *(job[:-2] if flags else job), env=base_env())
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout).get("entrypoint_num_gpus") == gpus
