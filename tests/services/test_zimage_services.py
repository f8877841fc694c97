"""Z-Image through everything around the method (issue 36), as tests/services/test_flux_services.py and
tests/models/test_flux_pipeline.py do for FLUX.1: 3 Ray actors, one of them SIGKILLed mid-denoise, a checkpoint
resumed on another owner count, Ray Data batch (a worker per image and tile-parallel), the HTTP service and a Ray
Jobs submission to a real head (as tests/services/test_jobs.py for SDXL and FLUX.1); each gives the in-process
reference's (or the CLI's) bytes."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from helpers import Interrupted, as_bytes, small_config
from PIL import Image

from cupscale_dist import upscale
from cupscale_dist.cli.main import main
from cupscale_dist.execution.raycluster import ClusterOptions
from cupscale_dist.testing.tiny_zimage import MAX_SEQUENCE_LENGTH

ray = pytest.importorskip("ray")

# Turbo's one pass per view (guidance 1), the composer on (lambda 0.5), view masks from the probe
FAST = dict(steps=3, guidance_scale=1.0, lambda_global=0.5, max_sequence_length=MAX_SEQUENCE_LENGTH)


def zimage_config(model_dir, **changes):
    return small_config(model_dir, **{**FAST, "view_batch_size": 2, **changes})


def test_zimage_on_3_ray_actors_and_with_one_sigkilled_mid_denoise_gives_the_local_bytes(local_ray, zimage_dir,
                                                                                         photo):
    """3 actors owning bands of the latent give the in-process bytes; then the same with the owner that just got its
    predict call of step 2 SIGKILLed: Ray restarts it (its bands are gone), the driver rebuilds them from the
    stage-start snapshot and the steps replay; the bytes stay."""
    from helpers import KillingPool, ray_executor

    config = zimage_config(zimage_dir)
    expected = as_bytes(upscale(photo, config, progress=False))
    executor = ray_executor(config, 3)
    assert as_bytes(upscale(photo, config, executor=executor, progress=False)) == expected
    calls = executor.pool.calls  # 3 part owners; every step's windows on them, none through the driver
    assert calls["own:load"] == 3 and "predict" not in calls and calls["own:predict"] % 3 == 0, calls
    executor = ray_executor(config, 3, pool_class=KillingPool, method="own:predict", kill_at=4, hard=True)
    assert as_bytes(upscale(photo, config, executor=executor, progress=False)) == expected
    assert executor.pool.killed


def test_a_zimage_checkpoint_resumed_on_another_actor_count_gives_the_uninterrupted_bytes(local_ray, zimage_dir,
                                                                                           photo, tmp_path):
    """Stopped after step 1 of 4 on 3 local owners (the checkpoint gathers the latent from the bands; the flow
    scheduler resumes at its step), resumed with `resume=True` (what `--resume` sets) on 2 Ray actors."""
    from helpers import ray_executor

    from cupscale_dist.execution.executor import LocalExecutor
    from cupscale_dist.execution.worker import ModelWorker
    from cupscale_dist.services.runner import run_upscale

    worker = ModelWorker.load(zimage_dir, device="cpu", dtype="float32")
    config = zimage_config(zimage_dir, steps=4, strength=0.8)
    run_upscale(photo, config, tmp_path / "ref.png", progress=False, executor=LocalExecutor(worker, 2))

    def stop_after_one(info):
        if info["step"] == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        run_upscale(photo, config, tmp_path / "out.png", progress=False, callback=stop_after_one,
                    executor=LocalExecutor(worker, 2, owners=3), checkpoint_dir=str(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / "checkpoint.pt").exists() and not (tmp_path / "out.png").exists()
    run_upscale(photo, config, tmp_path / "out.png", progress=False, checkpoint_dir=str(tmp_path / "ckpt"),
                resume=True, executor=ray_executor(config, 2))
    with Image.open(tmp_path / "ref.png") as ref, Image.open(tmp_path / "out.png") as out:
        assert np.array_equal(np.asarray(ref), np.asarray(out))


def cli_argv(zimage_dir, source, out, seed=3):
    return ["upscale", str(source), "-o", str(out), "--model", zimage_dir, "--device", "cpu", "--dtype", "float32",
            "--scale", "2", "--tile", "16", "--stride", "8", "--steps", "2", "--seed", str(seed), "--set",
            "torch_threads=1", "--set", f"max_sequence_length={MAX_SEQUENCE_LENGTH}", "--actors", "0", "-q"]


def test_zimage_batch_per_image_and_tile_parallel_give_each_file_the_clis_bytes(local_ray, zimage_dir, photo,
                                                                               tmp_path):
    """`cupscale batch` over a folder of two pictures, a Ray Data worker per image and then tile-parallel on 2
    actors: each output is the `cupscale upscale` file's picture."""
    from helpers import png_bytes

    (tmp_path / "in").mkdir()
    photo.save(tmp_path / "in" / "photo.png")
    (tmp_path / "in" / "other.png").write_bytes(png_bytes(seed=1))
    expected = {}
    for name in ("photo.png", "other.png"):
        assert main(cli_argv(zimage_dir, tmp_path / "in" / name, tmp_path / f"cli-{name}")) == 0
        with Image.open(tmp_path / f"cli-{name}") as image:
            expected[name] = as_bytes(image)
    assert expected["photo.png"] != expected["other.png"]
    common = ["batch", "--input", str(tmp_path / "in"), "--model", zimage_dir, "--device", "cpu", "--dtype",
              "float32", "--scale", "2", "--tile", "16", "--stride", "8", "--steps", "2", "--seed", "3", "--set",
              "torch_threads=1", "--set", f"max_sequence_length={MAX_SEQUENCE_LENGTH}", "--gpus-per-actor", "0",
              "--cpus-per-actor", "0.5", "-q"]
    assert main([*common, "--output", str(tmp_path / "pool"), "--workers", "1"]) == 0
    assert main([*common, "--output", str(tmp_path / "tiles"), "--tile-parallel", "--actors", "2"]) == 0
    for folder in ("pool", "tiles"):
        for name, pixels in expected.items():
            with Image.open(tmp_path / folder / name) as image:
                assert as_bytes(image) == pixels, (folder, name)


def test_the_service_upscales_with_zimage_and_gives_the_clis_bytes(local_ray, zimage_dir, tmp_path):
    from helpers import ServiceClient, free_port, png_bytes
    from ray import serve

    from cupscale_dist import UpscaleConfig
    from cupscale_dist.services.serve import ServiceOptions, deploy

    source, out = tmp_path / "in.png", tmp_path / "cli.png"
    picture = png_bytes(size=(128, 96))  # several views at several offsets (64x48 is one view at the origin)
    source.write_bytes(picture)
    assert main(cli_argv(zimage_dir, source, out)) == 0
    config = UpscaleConfig(model=zimage_dir, device="cpu", dtype="float32", scale=2, torch_threads=1,
                           max_sequence_length=MAX_SEQUENCE_LENGTH)
    token = "zimage-token-0123456789abcdef"
    options = ServiceOptions(str(tmp_path / "results"), config, queue_size=2, token=token, max_request_bytes=2**20,
                             cluster=ClusterOptions(actors=1, cpus_per_actor=1))
    port = free_port()
    deploy(options, "127.0.0.1", port)
    try:
        client = ServiceClient.over_http(f"http://127.0.0.1:{port}", token)
        answer = client.submit(picture, seed="3", source=str(source), tile="16", stride="8", steps="2")
        assert answer.status_code == 202, answer.text
        record = client.wait(answer.json()["id"])
        assert record["status"] == "succeeded", record
        result = client.http.get(record["result"], headers=client.headers())
        with Image.open(io.BytesIO(result.content)) as served, Image.open(out) as cli:
            assert as_bytes(served) == as_bytes(cli)
            assert json.loads(served.text["cupscale:config"])["model"] == zimage_dir
    finally:
        serve.shutdown()


def test_a_zimage_ray_job_gives_the_png_bytes_of_the_local_cli_run(zimage_dir, photo, tmp_path):
    """`cupscale submit --wait` to a real head (`ray start --head`, token auth: helpers.local_head) of the CLI run's
    argv on one Ray actor of the head: the job's file is the in-process CLI run's, byte for byte. One submission,
    the fast config; the head is this test's own (no other test here submits)."""
    from helpers import REPO, local_head, run_cupscale

    photo.save(tmp_path / "in.png")
    assert main(cli_argv(zimage_dir, tmp_path / "in.png", tmp_path / "local.png")) == 0
    job = [*cli_argv(zimage_dir, tmp_path / "in.png", tmp_path / "job.png"), "--actors", "1", "--cpus-per-actor", "0.5"]
    with local_head() as head:
        done = run_cupscale("submit", "--address", head.address, "--wait", "--working-dir", REPO, "--env",
                            "HF_HUB_OFFLINE=1", "--entrypoint-num-cpus", "0.5", "--", *job, env=head.env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "job.png").read_bytes() == (tmp_path / "local.png").read_bytes()
