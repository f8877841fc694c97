"""The Ray driver on a real local cluster: same bytes as the reference for any actor count, survives a killed
actor and a killed driver, and fails clearly on bad clusters."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import small_config
from cupscale_dist import UserError, upscale
from cupscale_dist.orchestrator import DenoiserPool, RayPredictor, make_predictor
from cupscale_dist.raycluster import ClusterOptions

ray = pytest.importorskip("ray")


def as_bytes(image) -> bytes:
    return np.asarray(image).tobytes()


def run(model, photo, actors, predictor=None, **changes):
    config = small_config(model.name, **changes)
    predictor = predictor or make_predictor(config, ClusterOptions(actors=actors, cpus_per_actor=0.5))
    return upscale(photo, config, model=model, predictor=predictor, progress=False)


def test_output_bytes_identical_for_0_1_2_3_actors(local_ray, sdxl_model, photo):
    results = {n: as_bytes(run(sdxl_model, photo, n, view_batch_size=2)) for n in (0, 1, 2, 3)}
    assert results[1] == results[0] and results[2] == results[0] and results[3] == results[0]


class KillingPredictor(RayPredictor):
    """Kills actor 0 right after the ``kill_at``-th batch was submitted to it (mid-step, batch in flight)."""

    def __init__(self, pool, batch_size, kill_at, hard):
        super().__init__(pool, batch_size)
        self.kill_at, self.hard, self.submitted, self.killed = kill_at, hard, 0, False

    def _submit(self, batch, host, views, timestep, input_scale, slot):
        submitted = super()._submit(batch, host, views, timestep, input_scale, slot)
        self.submitted += 1
        if self.submitted == self.kill_at and not self.killed:
            actor = submitted[2]
            if self.hard:  # SIGKILL the worker process: Ray restarts the actor and retries the batch
                os.kill(ray.get(actor.where.remote())["pid"], signal.SIGKILL)
            else:  # gone for good: the driver must start a replacement and resubmit
                ray.kill(actor, no_restart=True)
            self.killed = True
        return submitted


@pytest.mark.parametrize("hard", [True, False], ids=["sigkill-restart", "killed-for-good"])
def test_killed_actor_mid_step_gives_identical_output(local_ray, sdxl_model, photo, hard):
    config = small_config(sdxl_model.name, view_batch_size=2)
    expected = as_bytes(upscale(photo, config, model=sdxl_model, progress=False))
    pool = DenoiserPool(config, ClusterOptions(actors=2, cpus_per_actor=0.5))
    predictor = KillingPredictor(pool, config.view_batch_size, kill_at=5, hard=hard)
    result = upscale(photo, config, model=sdxl_model, predictor=predictor, progress=False)
    assert predictor.killed
    assert as_bytes(result) == expected


def test_no_resources_for_the_actors_is_a_clear_error(local_ray, sdxl_dir):
    config = small_config(sdxl_dir)
    with pytest.raises(UserError, match="only 0 of 1 denoisers started"):
        DenoiserPool(config, ClusterOptions(actors=1, gpus_per_actor=1, start_timeout_s=3))


def test_actor_that_cannot_load_the_model_is_a_clear_error(local_ray, tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    with pytest.raises(UserError, match="failed to load the model"):
        DenoiserPool(small_config(str(tmp_path)), ClusterOptions(actors=1, cpus_per_actor=0.5, start_timeout_s=60))


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


class KeepPoolPredictor(RayPredictor):
    """As `cupscale batch --tile-parallel` uses it: the pool outlives one image."""

    def close(self) -> None:
        self.context_ref = None


def test_a_failed_step_leaves_the_pool_free_for_the_next_image(local_ray, sdxl_model, photo):
    config = small_config(sdxl_model.name, view_batch_size=1)
    pool = DenoiserPool(config, ClusterOptions(actors=1, cpus_per_actor=0.5))
    try:
        def fail_at_step_one(state):
            if state.get("step") == 1:
                raise RuntimeError("disk full")

        with pytest.raises(RuntimeError, match="disk full"):
            upscale(photo, config, model=sdxl_model, predictor=KeepPoolPredictor(pool, 1), callback=fail_at_step_one,
                    progress=False)
        assert pool.in_flight == [0]
        expected = as_bytes(upscale(photo, config, model=sdxl_model, progress=False))
        assert as_bytes(upscale(photo, config, model=sdxl_model, predictor=KeepPoolPredictor(pool, 1),
                                progress=False)) == expected
    finally:
        pool.shutdown()
