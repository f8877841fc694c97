"""One GPU is enough: model workers and the vLLM captioner placed together on a cluster that declares one GPU.

The cluster's GPU is a logical resource (``ray.init(num_gpus=1)``): placement, shares and the memory caps that
follow them are Ray's real bookkeeping; the models themselves run on CPU (``device='cpu'``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import numpy as np
import pytest
from helpers import small_config

from cupscale_dist import UserError, upscale
from cupscale_dist.execution.placement import CAPTIONER_GPU_SHARE, captioner_share, worker_count, worker_share
from cupscale_dist.execution.pool import RayExecutor, WorkerPool
from cupscale_dist.execution.raycluster import ClusterOptions
from cupscale_dist.models.spec import ModelSpec

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def one_gpu_cluster(no_shared_ray):
    temp_dir = tempfile.mkdtemp(prefix="ray-gpu-")  # short: Ray's socket paths must stay under ~107 chars
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    ray.init(num_cpus=4, num_gpus=1, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
             _temp_dir=temp_dir)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def free_gpu_after_release(expected: float = 1.0, timeout_s: float = 30.0) -> float:
    """The cluster's free GPU once killed actors and removed placement groups are returned (asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while (free := ray.available_resources().get("GPU", 0)) < expected - 1e-6 and time.monotonic() < deadline:
        time.sleep(0.2)
    return free


def test_shares_add_up_to_one_gpu_per_gpu():
    share = captioner_share(1, None, beside_workers=True)
    assert share == CAPTIONER_GPU_SHARE and worker_share(1, None, 1, share) + share <= 1
    assert worker_count(1, worker_share(1, None, 1, share), None) == 1
    assert worker_count(8, worker_share(8, None, 1, share), None) == 8  # one worker per GPU, not 8 / 0.6
    assert worker_count(2, 0.5, None) == 4 and worker_count(0, 0.0, None) == 1
    assert worker_share(2, None, 3, share) == pytest.approx(1 - 2 * share)  # two captioners on one of the GPUs
    assert captioner_share(1, None, beside_workers=False) == 1.0 and captioner_share(0, None, True) == 0.0
    with pytest.raises(UserError, match="leave no GPU for the model workers"):
        worker_share(1, None, 3, share)


def test_workers_and_vllm_captioner_share_one_gpu(one_gpu_cluster, sdxl_dir, tiny_vlm, photo):
    pytest.importorskip("vllm")
    config = small_config(sdxl_dir, captioner="vllm", captioner_model=tiny_vlm, captioner_dtype="float32", steps=2)
    spec = ModelSpec.load(sdxl_dir)
    seen: dict = {}

    class Watching(WorkerPool):
        def _submit(self, method, args, slot):  # while captions run, both pools hold their share of the one GPU
            if method == "encode_prompts" and "free_gpu" not in seen:
                seen["free_gpu"] = ray.available_resources().get("GPU", 0)
            return super()._submit(method, args, slot)

    pool = Watching(config.replace(keep_captioner=True), ClusterOptions(cpus_per_actor=0.5, start_timeout_s=60), spec)
    assert pool.count == 1 and pool.num_gpus == pytest.approx(1 - CAPTIONER_GPU_SHARE)
    out = upscale(photo, config.replace(keep_captioner=True), executor=RayExecutor(pool, spec, 4), progress=False)
    assert out.size == (256, 192) and np.asarray(out).std() > 0
    assert seen["free_gpu"] == pytest.approx(0.0, abs=1e-6)  # 0.6 (workers) + 0.4 (captioner) = the whole GPU
    assert free_gpu_after_release() == pytest.approx(1.0)  # both pools gave it back


def test_a_captioner_that_cannot_fit_beside_whole_gpu_workers_fails_within_the_start_timeout(
        one_gpu_cluster, sdxl_dir, tiny_vlm, photo):
    config = small_config(sdxl_dir, captioner="transformers", captioner_model=tiny_vlm, captioner_dtype="float32",
                          steps=2)
    spec = ModelSpec.load(sdxl_dir)
    pool = WorkerPool(config, ClusterOptions(gpus_per_actor=1, cpus_per_actor=0.5, start_timeout_s=5), spec)
    start = time.monotonic()
    with pytest.raises(UserError, match=r"captioner pool for .*: 1 x \(1 CPU, 0.4 GPU\) could not be placed within "
                                        r"5 s; the cluster has \{.*'GPU': 0.0.*\} free"):
        upscale(photo, config, executor=RayExecutor(pool, spec, 4), progress=False)
    assert time.monotonic() - start < 60
    assert free_gpu_after_release() == pytest.approx(1.0)  # nothing left holding the GPU


def test_workers_that_ask_for_more_gpus_than_exist_fail_within_the_start_timeout(one_gpu_cluster, sdxl_dir):
    start = time.monotonic()
    with pytest.raises(UserError, match=r"model workers: 2 x \(0.5 CPU, 1 GPU, [0-9.]+ GB memory\) could not be "
                                        r"placed within 3 s"):
        WorkerPool(small_config(sdxl_dir), ClusterOptions(actors=2, gpus_per_actor=1, cpus_per_actor=0.5,
                                                          start_timeout_s=3), ModelSpec.load(sdxl_dir))
    assert time.monotonic() - start < 30


def huge_model(sdxl_dir: str, root) -> str:
    """The tiny model's directory with a UNet file whose header (all a plan or a pool reads of it) declares 10^12
    float32 parameters: 4 TB of weights in full, 1 TB in fp8."""
    import json
    import struct

    path = root / "huge"
    shutil.copytree(sdxl_dir, path)
    header = json.dumps({"w": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 0]}}).encode()
    for old in (path / "unet").glob("*.safetensors"):
        old.write_bytes(struct.pack("<Q", len(header)) + header)
    return str(path)


def test_workers_reserve_their_weights_modes_memory_on_a_node(one_gpu_cluster, sdxl_dir, tmp_path):
    """Placement uses each weights mode's footprint: a CPU worker reserves its weights' memory on its node (Ray's
    `memory` resource), so a model bigger than any node fails within the start timeout, in one line naming the
    memory asked and weights=fp8; fp8 asks a quarter of float32's (one byte per stored weight instead of four)."""
    model = huge_model(sdxl_dir, tmp_path)
    asked = {}
    for weights in ("full", "fp8"):
        start = time.monotonic()
        with pytest.raises(UserError, match=r"model workers: 1 x \(1 CPU, ([0-9.]+) GB memory\) could not be placed "
                                            r"within 3 s; the cluster has .* free "
                                            r".*weights=fp8 for less memory") as err:
            WorkerPool(small_config(model, weights=weights),
                       ClusterOptions(actors=1, cpus_per_actor=1, gpus_per_actor=0, start_timeout_s=3),
                       ModelSpec.load(model))
        assert time.monotonic() - start < 30
        asked[weights] = float(err.value.args[0].split("CPU, ")[1].split(" GB")[0])
    assert asked["full"] == pytest.approx(4000, rel=0.01) and asked["fp8"] == pytest.approx(asked["full"] / 4, rel=0.01)


def test_a_gpu_share_too_small_for_the_weights_is_one_line_naming_the_lighter_modes():
    from cupscale_dist.models.weights import SDXL_PARAMETERS, check_fits_share, worker_memory_gb

    full, host = worker_memory_gb(SDXL_PARAMETERS, "full", "auto", "cuda")
    offload, offload_host = worker_memory_gb(SDXL_PARAMETERS, "offload", "auto", "cuda")
    assert host == 0 and offload_host == full and offload < full / 2  # offloaded blocks wait in the node's memory
    check_fits_share(full, 0.6, 24 * 10**9, "full")  # SDXL beside a captioner on a 24 GB card: fits
    with pytest.raises(UserError, match=r"need ~6.94 GB in weights=full, its GPU share \(0.2 of 24 GB\) caps it at "
                                        r"4.8 GB; use weights=fp8 or weights=offload"):
        check_fits_share(full, 0.2, 24 * 10**9, "full")


def test_batch_image_workers_leave_their_captioner_its_share_of_the_gpu(sdxl_dir):
    from cupscale_dist.services.batch.run import image_worker_gpus

    plain, captioned = small_config(sdxl_dir), small_config(sdxl_dir, captioner="vllm", captioner_model=sdxl_dir)
    assert image_worker_gpus(plain, ClusterOptions(), 8) == 1.0 and image_worker_gpus(plain, ClusterOptions(), 0) == 0
    assert image_worker_gpus(captioned, ClusterOptions(), 8) == pytest.approx(1 - CAPTIONER_GPU_SHARE)
    assert image_worker_gpus(captioned, ClusterOptions(), 0) == 0
    assert image_worker_gpus(captioned, ClusterOptions(gpus_per_actor=0.25), 8) == 0.25  # chosen wins
    assert worker_count(8, image_worker_gpus(captioned, ClusterOptions(), 8), None) == 8
