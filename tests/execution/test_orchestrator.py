"""The Ray driver on a real local cluster: every forward pass on the actors, the same bytes as the reference for
any actor count, survives a killed actor (in any kind of call) and a killed driver, and fails clearly on bad
clusters."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import KillingPool, as_bytes, ray_executor, small_config

from cupscale_dist import UserError, upscale
from cupscale_dist.execution.pool import WorkerPool
from cupscale_dist.execution.raycluster import ClusterOptions
from cupscale_dist.method.vae import latent_tiles
from cupscale_dist.method.views import make_views
from cupscale_dist.models.spec import ModelSpec

ray = pytest.importorskip("ray")


def forbid_models_in_the_driver(monkeypatch):
    """From here on this process (the driver) cannot load a model: every forward pass must run on the actors."""
    def refuse(*args, **kwargs):
        raise AssertionError("the driver loaded a model")

    monkeypatch.setattr("cupscale_dist.execution.worker.load_pipeline", refuse)
    monkeypatch.setattr("cupscale_dist.models.loading.load_pipeline", refuse)


def test_output_bytes_identical_for_0_1_2_3_actors_with_every_forward_pass_on_them(local_ray, sdxl_model, photo,
                                                                                  monkeypatch):
    config = small_config(sdxl_model.name, view_batch_size=2, vae_tile=64)  # 128 px stage tiles: several VAE tiles
    results = {0: as_bytes(upscale(photo, config, model=sdxl_model, progress=False))}
    forbid_models_in_the_driver(monkeypatch)
    for actors in (1, 2, 3):
        executor = ray_executor(config, actors)
        results[actors] = as_bytes(upscale(photo, config, executor=executor, progress=False))
        calls = executor.pool.calls  # the driver ran none of them itself
        vae_tiles = len(make_views(24, 32, *latent_tiles(64, 0.25, 8)))  # the 256x192 stage's latent
        assert calls["probe"] == 1 and calls["encode_prompts"] == 3  # regional, global, negative
        # the step on the actors: each worker encodes its band from pixel rows (the VAE tiles that reach it) in its
        # load call, takes one predict and one reduce_step call per step, then decodes its band in one call: the
        # latent never comes to the driver
        assert "predict" not in calls and calls["own:predict"] == calls["own:reduce_step"] == 3 * actors
        assert calls["own:load"] == calls["own:decode"] == actors and "own:gather" not in calls
        assert "encode_tile" not in calls and "decode_tile" not in calls
    executor = ray_executor(config.replace(step_design="driver"), 2)  # every window through the driver
    results["driver"] = as_bytes(upscale(photo, config.replace(step_design="driver"), executor=executor,
                                         progress=False))
    assert executor.pool.calls["predict"] == 3 * 3 and "own:predict" not in executor.pool.calls  # 3 steps x 3 batches
    calls = executor.pool.calls  # the driver's encode and decode: every tile through the driver
    assert calls["encode_tile"] == calls["decode_tile"] == vae_tiles
    assert results[1] == results[0] and results[2] == results[0] and results[3] == results[0]
    assert results["driver"] == results[0]


@pytest.mark.parametrize("method,kill_at", [("own:load", 2), ("own:predict", 3), ("own:reduce_step", 4),
                                            ("own:decode", 2), ("probe", 1)])
@pytest.mark.parametrize("hard", [True, False], ids=["sigkill-restart", "killed-for-good"])
def test_killed_actor_mid_call_gives_identical_output(local_ray, sdxl_model, photo, hard, method, kill_at):
    config = small_config(sdxl_model.name, view_batch_size=2, vae_tile=64)
    expected = as_bytes(upscale(photo, config, model=sdxl_model, progress=False))
    executor = ray_executor(config, 2, KillingPool, method=method, kill_at=kill_at, hard=hard)
    result = upscale(photo, config, executor=executor, progress=False)
    assert executor.pool.killed
    assert as_bytes(result) == expected


def test_no_resources_for_the_actors_is_a_clear_error_within_the_start_timeout(local_ray, sdxl_dir):
    config = small_config(sdxl_dir)
    start = time.monotonic()
    with pytest.raises(UserError, match=r"model workers: 1 x \(1 CPU, 1 GPU, [0-9.]+ GB memory\) could not be placed "
                                        r"within 3 s; the cluster has \{.*'CPU': .*\} free"):
        WorkerPool(config, ClusterOptions(actors=1, cpus_per_actor=1, gpus_per_actor=1, start_timeout_s=3),
                   ModelSpec.load(sdxl_dir))
    assert time.monotonic() - start < 30


def test_actor_that_cannot_load_the_model_is_a_clear_error(local_ray, sdxl_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(sdxl_dir, broken)
    for weights in broken.glob("unet/*.safetensors"):
        weights.write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="failed to load the model"):
        WorkerPool(small_config(str(broken)), ClusterOptions(actors=1, cpus_per_actor=0.5, start_timeout_s=60),
                   ModelSpec.load(str(broken)))


# --- the CLI driver as a real process ---------------------------------------------------------------------------
def cli(*args, **kwargs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_DISABLE_USAGE_STATS": "1"}
    return subprocess.Popen([sys.executable, "-m", "cupscale_dist.cli", "upscale", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs)


def cli_args(sdxl_dir, image, out, *extra):
    return [str(image), "-o", str(out), "--model", sdxl_dir, "--device", "cpu", "--dtype", "float32", "-q",
            "--scale", "2", "--tile", "16", "--stride", "8", "--steps", "12", "--strength", "1.0",
            "--set", "torch_threads=1", "--set", "view_batch_size=2", "--cpus-per-actor", "0.5", *extra]


def test_killed_driver_resumes_from_checkpoint_with_identical_output(sdxl_dir, photo, tmp_path):
    image = tmp_path / "in.png"
    photo.save(image)
    reference = cli(*cli_args(sdxl_dir, image, tmp_path / "ref.png", "--actors", "0"))
    assert reference.wait(timeout=300) == 0, reference.stderr.read()

    ckpt = tmp_path / "ckpt"
    out = tmp_path / "out.png"
    driver = cli(*cli_args(sdxl_dir, image, out, "--actors", "1", "--checkpoint-dir", str(ckpt)))
    deadline = time.time() + 240
    while not (ckpt / "checkpoint.pt").exists() and driver.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started, mid-run
    driver.wait()
    assert (ckpt / "checkpoint.pt").exists() and not out.exists()

    import torch

    assert 0 < torch.load(ckpt / "checkpoint.pt", weights_only=True)["step"] < 12
    other = cli(*cli_args(sdxl_dir, image, out, "--actors", "1", "--checkpoint-dir", str(ckpt), "--resume",
                          "--seed", "7"))
    assert other.wait(timeout=120) != 0 and "another config" in other.stderr.read()
    resumed = cli(*cli_args(sdxl_dir, image, out, "--actors", "1", "--checkpoint-dir", str(ckpt), "--resume"))
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert out.read_bytes() != b"" and as_bytes_png(out) == as_bytes_png(tmp_path / "ref.png")
    assert not (ckpt / "checkpoint.pt").exists()


def as_bytes_png(path) -> bytes:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image).tobytes()


def test_bad_cluster_address_fails_fast_and_writes_nothing(sdxl_dir, photo, tmp_path):
    image = tmp_path / "in.png"
    photo.save(image)
    start = time.time()
    proc = cli(*cli_args(sdxl_dir, image, tmp_path / "out.png", "--actors", "1", "--address", "127.0.0.1:1"))
    assert proc.wait(timeout=60) != 0
    err = proc.stderr.read().strip().splitlines()
    assert err[-1].startswith("cupscale: error: --address 127.0.0.1:1: no Ray cluster answers there")
    assert time.time() - start < 30 and not (tmp_path / "out.png").exists()


def test_a_failed_step_leaves_the_pool_free_for_the_next_image(local_ray, sdxl_model, photo):
    config = small_config(sdxl_model.name, view_batch_size=1)
    executor = ray_executor(config, 1)
    executor.keep = True  # as `cupscale batch --tile-parallel` uses it: the pool outlives one image
    try:
        def fail_at_step_one(state):
            if state.get("step") == 1:
                raise RuntimeError("disk full")

        with pytest.raises(RuntimeError, match="disk full"):
            upscale(photo, config, executor=executor, callback=fail_at_step_one, progress=False)
        assert executor.pool.in_flight == [0]
        expected = as_bytes(upscale(photo, config, model=sdxl_model, progress=False))
        assert as_bytes(upscale(photo, config, executor=executor, progress=False)) == expected
    finally:
        executor.release()
