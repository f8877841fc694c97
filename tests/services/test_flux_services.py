"""Flux through everything around the method (issue 22, item 5): regional prompts from a prompt file, Ray Data
batch (a worker per image and tile-parallel), and the HTTP service; each gives the in-process reference's bytes."""

from __future__ import annotations

import io
import json

import pytest
from helpers import as_bytes, small_config
from PIL import Image

from cupscale_dist import upscale
from cupscale_dist.cli.main import main
from cupscale_dist.execution.raycluster import ClusterOptions
from cupscale_dist.testing.tiny_flux import build_tiny_flux

ray = pytest.importorskip("ray")

FAST = dict(steps=2, guidance_scale=3.5, lambda_global=0.5)


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return str(build_tiny_flux(tmp_path_factory.mktemp("flux-dev"), variant="dev"))


def test_regional_prompts_from_a_file_reach_flux_views_and_ray_gives_the_local_bytes(local_ray, flux_dir, photo,
                                                                                      tmp_path, capsys):
    from cupscale_dist.execution.pool import RayExecutor, WorkerPool
    from cupscale_dist.models.spec import ModelSpec

    image = tmp_path / "in.png"
    photo.save(image)
    common = ["--model", flux_dir, "--scale", "2", "--tile", "16", "--stride", "8", "--prompt", "a cat"]
    assert main(["caption", str(image), "--tiles", *common]) == 0
    plan = json.loads(capsys.readouterr().out)
    plan["stages"][0]["views"][0]["prompt"] = "a red roof on a blue house"
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(plan))
    plain = small_config(flux_dir, prompt="a cat", **FAST)
    regional = small_config(flux_dir, prompt="a cat", regional_prompts=str(prompts), **FAST)
    reference = as_bytes(upscale(photo, regional, progress=False))
    assert reference != as_bytes(upscale(photo, plain, progress=False))  # the edited view's prompt acts
    spec = ModelSpec.load(regional.model)
    pool = WorkerPool(regional, ClusterOptions(actors=2, cpus_per_actor=0.5), spec)
    assert as_bytes(upscale(photo, regional, executor=RayExecutor(pool, spec, regional.view_batch_size),
                            progress=False)) == reference


def test_flux_batch_per_image_and_tile_parallel_give_the_reference_bytes(local_ray, flux_dir, photo, tmp_path):
    from cupscale_dist.services.batch.run import run_batch

    (tmp_path / "in").mkdir()
    photo.save(tmp_path / "in" / "photo.png")
    config = small_config(flux_dir, view_batch_size=2, **FAST)
    reference = as_bytes(upscale(photo, config, progress=False))
    pool = run_batch(str(tmp_path / "in"), tmp_path / "pool", config, workers=1, progress=False,
                     cluster=ClusterOptions(gpus_per_actor=0, cpus_per_actor=0.5))
    tiles = run_batch(str(tmp_path / "in"), tmp_path / "tiles", config, tile_parallel=True, progress=False,
                      cluster=ClusterOptions(actors=2, gpus_per_actor=0, cpus_per_actor=0.5))
    assert pool.done == tiles.done == 1
    for folder in ("pool", "tiles"):
        with Image.open(tmp_path / folder / "photo.png") as image:
            assert as_bytes(image) == reference, folder


def test_the_service_upscales_with_flux_and_gives_the_clis_bytes(local_ray, flux_dir, tmp_path):
    from helpers import ServiceClient, free_port, png_bytes
    from ray import serve

    from cupscale_dist import UpscaleConfig
    from cupscale_dist.services.serve import ServiceOptions, deploy

    source, out = tmp_path / "in.png", tmp_path / "cli.png"
    source.write_bytes(png_bytes())
    argv = ["upscale", str(source), "-o", str(out), "--model", flux_dir, "--device", "cpu", "--dtype", "float32",
            "--scale", "2", "--tile", "16", "--stride", "8", "--steps", "2", "--seed", "3", "--set",
            "torch_threads=1", "--actors", "0", "-q"]
    assert main(argv) == 0
    config = UpscaleConfig(model=flux_dir, device="cpu", dtype="float32", scale=2, torch_threads=1)
    token = "flux-token-0123456789abcdef"
    options = ServiceOptions(str(tmp_path / "results"), config, queue_size=2, token=token, max_request_bytes=2**20,
                             cluster=ClusterOptions(actors=1, cpus_per_actor=1))
    port = free_port()
    deploy(options, "127.0.0.1", port)
    try:
        client = ServiceClient.over_http(f"http://127.0.0.1:{port}", token)
        answer = client.submit(png_bytes(), seed="3", source=str(source), tile="16", stride="8", steps="2")
        assert answer.status_code == 202, answer.text
        record = client.wait(answer.json()["id"])
        assert record["status"] == "succeeded", record
        result = client.http.get(record["result"], headers=client.headers())
        with Image.open(io.BytesIO(result.content)) as served, Image.open(out) as cli:
            assert as_bytes(served) == as_bytes(cli)
            assert json.loads(served.text["cupscale:config"])["model"] == flux_dir
    finally:
        serve.shutdown()


def test_vlm_captions_become_flux_views_prompts(local_ray, flux_dir, photo, tiny_vlm, tmp_path):
    """A real (tiny) VLM captions every view's crop in the Ray pool; with Flux those captions become the views' T5
    and CLIP prompts, each view its own."""
    from helpers import RecordingExecutor

    from cupscale_dist.execution.worker import ModelWorker
    config = small_config(flux_dir, captioner="transformers", captioner_model=tiny_vlm,
                          captioner_dtype="float32", captioner_gpus=0.0, **FAST)
    executor = RecordingExecutor(ModelWorker.load(flux_dir, device="cpu", dtype="float32"), 4)
    upscale(photo, config, executor=executor, progress=False)
    context = executor.contexts[0]
    assert len(set(context.view_prompt.tolist())) > 1  # different crops, different captions, different embeddings
    per_view = context.regional_embeds[context.view_prompt]
    assert not all(per_view[0].equal(per_view[i]) for i in range(1, len(per_view)))
