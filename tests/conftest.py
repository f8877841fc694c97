"""Fixtures every test folder sees: the tiny real models saved to disk (built once per test process), a photo, a
local Ray cluster, the Hypothesis profiles. Plain helpers (the fast config, the CLI, the service client) are in
tests/helpers.py."""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download at test time
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # CPU matmul bits depend on the thread count: pin it everywhere we compare bytes


@pytest.fixture(scope="session")
def sdxl_dir(tmp_path_factory):
    from cupscale_dist.testing.tiny import build_tiny_sdxl

    return str(build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl")))


@pytest.fixture(scope="session")
def sd15_dir(tmp_path_factory):
    from cupscale_dist.testing.tiny import build_tiny_sd15

    return str(build_tiny_sd15(tmp_path_factory.mktemp("tiny-sd15")))


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory) -> str:
    """The tiny seeded Idefics3 captioner (cupscale_dist.testing.vlm), built once per test process."""
    from cupscale_dist.testing.vlm import build_tiny_vlm

    return str(build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny-idefics3", seed=0))


@pytest.fixture(scope="session")
def sdxl_model(sdxl_dir):
    from cupscale_dist.execution.worker import ModelWorker

    return ModelWorker(sdxl_dir, device="cpu", dtype="float32")


@pytest.fixture
def photo() -> Image.Image:
    """A small structured RGB image (smooth gradients + a disc), 96x128 so views are not square-only."""
    ys, xs = np.mgrid[0:96, 0:128]
    disc = ((ys - 48) ** 2 + (xs - 70) ** 2 < 20**2)[..., None]
    rgb = np.stack([xs * 2, ys * 2, 255 - xs], axis=-1) * (1 - disc) + disc * np.array([250, 200, 40])
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """A real local Ray cluster for one test module, bound to 127.0.0.1 as `cupscale` binds it (token auth on)."""
    ray = pytest.importorskip("ray")
    from cupscale_dist.execution.raycluster import start_local

    # short: Ray's socket paths must fit 107 bytes (a pytest-xdist worker's tmp path is longer than plain pytest's)
    temp_dir = tempfile.mkdtemp(prefix="cupscale-ray-", dir="/tmp")
    start_local(num_cpus=4, log_to_driver=False, _temp_dir=temp_dir)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def parse_ws(tmp_path_factory):
    """A folder holding one input image for the tests of bad input (knob text, config files, metadata, prompt files);
    tests write their bad files in their own tmp_path. The CLI has run once in it, so that no timed run pays the
    CLI's first imports."""
    import contextlib
    import io

    from helpers import structured, upscale_argv

    from cupscale_dist.cli.main import main

    ws = tmp_path_factory.mktemp("parsing")
    Image.fromarray(structured(64, 48)).save(ws / "in.png")
    with contextlib.redirect_stderr(io.StringIO()):
        main(upscale_argv(ws, ws / "out.png", "--set", "steps=many"))
    return ws


# Hypothesis profiles for the fuzz tests (tests/*/test_fuzz_*.py), chosen by HYPOTHESIS_PROFILE (default `ci`). `ci`: a
# small fixed budget, derandomized (the same examples every run, so CI is reproducible), no deadline (2 shared cores
# make any per-example time bound flaky). `nightly`: many more examples, drawn fresh each run.
try:
    from hypothesis import HealthCheck, settings

    settings.register_profile("ci", max_examples=150, deadline=None, derandomize=True, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("nightly", max_examples=2000, deadline=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # hypothesis is in the dev extra; without it the fuzz tests skip (pytest.importorskip)
    pass
