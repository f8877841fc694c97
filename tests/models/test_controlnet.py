"""ControlNet tile (issue 11): every view is conditioned on its own crop of the stage input, on the workers; scale 0
is the run without ControlNet, bit for bit; any actor count gives the same bytes; a mismatched model is refused on
the driver before any actor starts."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import small_config

from cupscale_dist import UserError, upscale
from cupscale_dist.execution.executor import LocalExecutor
from cupscale_dist.execution.worker import ModelWorker
from cupscale_dist.method.resize import resize_input
from cupscale_dist.models.addons import Addons
from cupscale_dist.models.controlnet import control_tensor
from cupscale_dist.plan import plan_stages
from cupscale_dist.testing.controlnet import build_tiny_controlnet


@pytest.fixture(scope="module")
def controlnet_dir(sdxl_dir, tmp_path_factory):
    return str(build_tiny_controlnet(sdxl_dir, tmp_path_factory.mktemp("controlnet")))


@pytest.fixture(scope="module")
def worker_with_controlnet(sdxl_dir, controlnet_dir):
    config = small_config(sdxl_dir, controlnet=controlnet_dir)
    return ModelWorker.for_config(config)


def run(config, worker, photo) -> np.ndarray:
    return np.asarray(upscale(photo, config, executor=LocalExecutor(worker, config.view_batch_size), progress=False))


def test_each_view_gets_its_own_crop_of_the_stage_input(worker_with_controlnet, controlnet_dir, sdxl_dir, photo):
    """The ControlNet's conditioning image for every view, at every step (views jitter), is exactly the stage
    input's pixels under that view's latent rectangle, scaled to [0, 1] - never the whole image."""
    config = small_config(sdxl_dir, controlnet=controlnet_dir, controlnet_scale=1.0, jitter=2, steps=4)
    worker = worker_with_controlnet
    seen_rects, seen_images = [], []
    original_predict = worker.predict

    def recording_predict(context, windows, timestep, input_scale, view_ids, rects, control=None):
        seen_rects.extend(np.asarray(rects).tolist())
        return original_predict(context, windows, timestep, input_scale, view_ids, rects, control)

    def record_cond(module, args, kwargs):
        seen_images.append(kwargs["controlnet_cond"].detach().clone())

    hook = worker.controlnet.register_forward_pre_hook(record_cond, with_kwargs=True)
    worker.predict = recording_predict
    try:
        upscale(photo, config, executor=LocalExecutor(worker, config.view_batch_size), progress=False)
    finally:
        hook.remove()
        del worker.predict
    stage_input = np.asarray(resize_input(photo, plan_stages(photo.size, config)[0], config))
    f = worker.spec.vae_scale_factor
    received = torch.cat([image.chunk(2)[0] for image in seen_images])  # CFG: both halves get the same crops
    assert all(torch.equal(*image.chunk(2)) for image in seen_images)
    assert len(received) == len(seen_rects) and len({tuple(r) for r in seen_rects}) > 6  # jittered views
    expected = control_tensor(np.stack([stage_input[t * f : b * f, l * f : r * f] for t, l, b, r in seen_rects]))
    assert received.shape[-2:] == (config.tile * f, config.tile * f)
    assert torch.equal(received.to(expected.dtype), expected)


def test_scale_0_is_the_run_without_controlnet_bit_for_bit(worker_with_controlnet, sdxl_model, controlnet_dir,
                                                           sdxl_dir, photo):
    plain = run(small_config(sdxl_dir), sdxl_model, photo)
    zero = run(small_config(sdxl_dir, controlnet=controlnet_dir, controlnet_scale=0.0), worker_with_controlnet, photo)
    assert np.array_equal(plain, zero)
    steered = run(small_config(sdxl_dir, controlnet=controlnet_dir, controlnet_scale=1.0), worker_with_controlnet,
                  photo)
    assert np.abs(steered.astype(int) - plain).mean() > 1.0  # the residuals do reach the UNet


def test_ray_actors_give_the_reference_bytes(local_ray, worker_with_controlnet, controlnet_dir, sdxl_dir, photo):
    from cupscale_dist.execution.pool import RayExecutor, WorkerPool
    from cupscale_dist.execution.raycluster import ClusterOptions
    from cupscale_dist.models.spec import ModelSpec

    config = small_config(sdxl_dir, controlnet=controlnet_dir, controlnet_scale=1.0, view_batch_size=2)
    reference = run(config, worker_with_controlnet, photo)
    spec = ModelSpec.load(config.model)
    executor = RayExecutor(WorkerPool(config, ClusterOptions(actors=2, cpus_per_actor=0.5), spec), spec,
                           config.view_batch_size)
    assert np.array_equal(np.asarray(upscale(photo, config, executor=executor, progress=False)), reference)


def test_mismatched_or_broken_controlnets_are_refused_on_the_driver(sdxl_dir, sd15_dir, controlnet_dir, tmp_path):
    sd15_controlnet = build_tiny_controlnet(sd15_dir, tmp_path / "sd15-controlnet")
    with pytest.raises(UserError, match="made for another model.*cross_attention_dim") as info:
        Addons.from_config(small_config(sdxl_dir, controlnet=str(sd15_controlnet)))
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="no config.json"):
        Addons.from_config(small_config(sdxl_dir, controlnet=str(tmp_path)))
    not_controlnet = tmp_path / "unet"
    shutil.copytree(f"{sdxl_dir}/unet", not_controlnet)
    with pytest.raises(UserError, match="not a ControlNetModel"):
        Addons.from_config(small_config(sdxl_dir, controlnet=str(not_controlnet)))
    broken = tmp_path / "broken"
    shutil.copytree(controlnet_dir, broken)
    (broken / "config.json").write_bytes(b"\xff\xfe not json")
    with pytest.raises(UserError, match="unreadable"):
        Addons.from_config(small_config(sdxl_dir, controlnet=str(broken)))
    assert json.loads((tmp_path / "sd15-controlnet" / "config.json").read_text())["_class_name"] == "ControlNetModel"


def test_a_worker_without_the_runs_controlnet_is_refused(sdxl_model, controlnet_dir, sdxl_dir, photo):
    config = small_config(sdxl_dir, controlnet=controlnet_dir)
    with pytest.raises(UserError, match="add-ons"):
        upscale(photo, config, model=sdxl_model, progress=False)


def test_sd15_tile_controlnets_work_the_same_way(sd15_dir, tmp_path, photo):
    """SD1.5 (no pooled embedding, no time ids; lllyasviel's tile model is of this kind): scale 0 == plain, bit for bit,
    and a scale of 1 changes the image."""
    controlnet = str(build_tiny_controlnet(sd15_dir, tmp_path / "sd15-controlnet", seed=1))
    worker = ModelWorker.for_config(small_config(sd15_dir, controlnet=controlnet))
    plain = run(small_config(sd15_dir), ModelWorker.for_config(small_config(sd15_dir)), photo)
    zero = run(small_config(sd15_dir, controlnet=controlnet, controlnet_scale=0.0), worker, photo)
    steered = run(small_config(sd15_dir, controlnet=controlnet, controlnet_scale=1.0), worker, photo)
    assert np.array_equal(plain, zero)
    assert np.abs(steered.astype(int) - plain).mean() > 1.0


def test_a_worker_is_not_checked_again_for_the_request_it_was_loaded_for(worker_with_controlnet, controlnet_dir,
                                                                        sdxl_dir, photo, monkeypatch):
    """A batch or a service asks its worker once per image: the add-on files of the request the worker was loaded
    for are not read again; another request is still checked (and refused here)."""
    from cupscale_dist.execution import worker as worker_module

    checks = []
    real = worker_module.Addons.from_config
    monkeypatch.setattr(worker_module.Addons, "from_config", lambda *a, **k: checks.append(a) or real(*a, **k))
    same_request = small_config(sdxl_dir, controlnet=controlnet_dir, controlnet_scale=0.3, steps=2)
    upscale(photo, same_request, model=worker_with_controlnet, progress=False)
    assert checks == []
    with pytest.raises(UserError, match="add-ons"):
        upscale(photo, small_config(sdxl_dir, steps=2), model=worker_with_controlnet, progress=False)
    assert len(checks) == 1
