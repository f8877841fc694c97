"""The reference pipeline end to end on tiny real SDXL/SD1.5 pipelines loaded with from_pretrained."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from helpers import RecordingExecutor, as_bytes, small_config

from cupscale_dist import UpscaleConfig, UserError, upscale
from cupscale_dist.execution.executor import LocalExecutor
from cupscale_dist.execution.worker import ModelWorker
from cupscale_dist.method.step import predict_views
from cupscale_dist.models.spec import model_family
from cupscale_dist.plan import plan_stages


def test_same_seed_same_bytes_other_seed_other_bytes(sdxl_model, photo):
    config = small_config(sdxl_model.name)
    first = upscale(photo, config, model=sdxl_model, progress=False)
    assert first.size == (256, 192)
    assert as_bytes(first) == as_bytes(upscale(photo, config, model=sdxl_model, progress=False))
    assert as_bytes(first) != as_bytes(upscale(photo, config.replace(seed=1), model=sdxl_model, progress=False))


def test_view_batch_split_does_not_change_the_result(sdxl_model, photo):
    config = small_config(sdxl_model.name)
    one = upscale(photo, config.replace(view_batch_size=1), model=sdxl_model, progress=False)
    four = upscale(photo, config.replace(view_batch_size=4), model=sdxl_model, progress=False)
    diff = np.abs(np.asarray(one, dtype=int) - np.asarray(four, dtype=int))
    assert diff.max() <= 1  # CPU kernels may round differently per batch size; actors keep the split fixed


@pytest.mark.parametrize("changes", [
    dict(mask_mode="pixel"), dict(composer="joint"), dict(prior_target="zt"), dict(scheduler="ddim"),
    dict(blend="gaussian"), dict(jitter=4), dict(prior_space="pixel"), dict(wavelet="db2"), dict(dwt_levels=2),
    dict(sharpen=1.0, resize="lanczos"), dict(pooled_prompt="regional"), dict(mask_mode="off"), dict(prompt=""),
    dict(scale=4), dict(size=(200, 150)),
])
def test_every_option_runs_and_gives_a_valid_image(sdxl_model, photo, changes):
    config = small_config(sdxl_model.name, steps=3, **changes)
    out = upscale(photo, config, model=sdxl_model, progress=False)
    expected = config.size or (photo.width * config.scale, photo.height * config.scale)
    assert out.size == tuple(expected) and out.mode == "RGB"
    assert np.asarray(out).std() > 0


def test_lambda_one_without_masks_is_the_plain_unet(sdxl_model, photo):
    """predict_views with lambda=1 and all-true masks gives the same bytes as a bare CFG call of the plain UNet."""
    executor = RecordingExecutor(sdxl_model, 4)
    upscale(photo, small_config(sdxl_model.name, steps=2), model=sdxl_model, executor=executor, progress=False)
    context = executor.contexts[0]
    context.lambda_global = 1.0
    context.token_allowed = np.ones_like(context.token_allowed)
    unet, views = sdxl_model.unet, np.array([[0, 0, 16, 16], [8, 16, 24, 32]])
    windows = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ours = predict_views(sdxl_model.backbone, windows, 500, 0.5, context, [0, 1], views)

    from cupscale_dist.models.backbones.sdxl.backbone import micro_conditioning

    unet.set_attn_processor(AttnProcessor2_0())
    try:
        with torch.no_grad():
            states = torch.cat([context.negative_embeds.expand(2, -1, -1), context.global_embeds.expand(2, -1, -1)])
            time_ids = micro_conditioning(context, views)
            added = {"text_embeds": torch.cat([context.family.negative_pooled.expand(2, -1),
                                               context.family.global_pooled.expand(2, -1)]),
                     "time_ids": torch.cat([time_ids, time_ids])}
            eps = unet(torch.cat([windows * 0.5] * 2), 500, encoder_hidden_states=states,
                       added_cond_kwargs=added).sample
    finally:
        from cupscale_dist.method.attention import install_regional_processors

        install_regional_processors(unet)
    uncond, cond = eps.chunk(2)
    assert torch.equal(ours, uncond + context.guidance_scale * (cond - uncond))


def test_attention_probe_screens_tokens_per_view(sdxl_model, photo):
    executor = RecordingExecutor(sdxl_model, 4)
    config = small_config(sdxl_model.name, steps=2, mask_threshold=0.5)
    upscale(photo, config, model=sdxl_model, executor=executor, progress=False)
    allowed = executor.contexts[0].token_allowed
    n_tokens = sdxl_model.spec.token_count(config.prompt)
    assert allowed.shape == (6, 77)
    assert allowed[:, 0].all() and allowed[:, n_tokens - 1:].all()  # <start>, <end>, padding
    assert not allowed[:, 1 : n_tokens - 1].all()  # some word is screened out of some view


def test_regional_prompts_reach_the_composer(sdxl_model, photo, tmp_path):
    prompts = ["a red roof", "blue sky", "green tree", "a cat", "a dog", "a house"]
    file = tmp_path / "prompts.json"
    file.write_text(json.dumps({"prompt": "x", "stages": [{"stage": 0, "views": [{"prompt": p} for p in prompts]}]}))
    recorded = RecordingExecutor(sdxl_model, 4)
    plain = RecordingExecutor(sdxl_model, 4)
    with_file = upscale(photo, small_config(sdxl_model.name, regional_prompts=str(file)), model=sdxl_model,
                        executor=recorded, progress=False)
    without = upscale(photo, small_config(sdxl_model.name), model=sdxl_model, executor=plain, progress=False)
    context = recorded.contexts[0]
    per_view = context.regional_embeds[torch.from_numpy(context.view_prompt)]
    assert len(set(context.view_prompt.tolist())) == 6
    assert all(not torch.equal(per_view[i], per_view[j]) for i in range(6) for j in range(i + 1, 6))
    assert len(set(plain.contexts[0].view_prompt.tolist())) == 1
    assert as_bytes(with_file) != as_bytes(without)


def test_regional_prompt_file_with_wrong_view_count_is_refused(sdxl_model, photo, tmp_path):
    file = tmp_path / "prompts.json"
    file.write_text(json.dumps({"stages": [{"stage": 0, "views": [{"prompt": "a"}]}]}))
    with pytest.raises(UserError, match="lists 1 views but this run has 6"):
        upscale(photo, small_config(sdxl_model.name, regional_prompts=str(file)), model=sdxl_model, progress=False)


def test_sd15_model_dir_loads_and_upscales(sd15_dir, photo):
    assert model_family(sd15_dir) == "sd15"
    model = ModelWorker.load(sd15_dir, device="cpu", dtype="float32")
    out = upscale(photo, small_config(sd15_dir, steps=3), model=model, progress=False)
    assert out.size == (256, 192)


def test_stage_plan_doubles_until_the_target():
    config = UpscaleConfig(scale=8)
    assert plan_stages((1024, 1024), config) == [(2048, 2048), (4096, 4096), (8192, 8192)]
    # nearest multiples of 64; the result is resized to 2000x1500
    assert plan_stages((1000, 750), config.replace(scale=2)) == [(1984, 1472)]
    assert plan_stages((1024, 768), config.replace(size=(3000, 2000))) == [(1472, 1024), (3008, 1984)]


def test_uncached_hub_id_offline_names_the_fixes(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(UserError, match=r"--model PATH .*--model demo"):
        ModelWorker.load("someone/not-cached-sdxl", device="cpu")


def test_config_rejects_impossible_prior_settings_before_any_work():
    with pytest.raises(UserError, match="prior_target='zt' works in latent space only"):
        UpscaleConfig(prior_space="pixel", prior_target="zt")
    with pytest.raises(UserError, match="wavelet='foo' is not a discrete pywavelets wavelet"):
        UpscaleConfig(wavelet="foo")
    assert UpscaleConfig(wavelet="sym4").wavelet == "sym4"


def test_executor_is_released_when_setup_fails(sdxl_model, photo):
    class Tracking(LocalExecutor):
        closed = False

        def close(self):
            super().close()
            self.closed = True

    executor = Tracking(sdxl_model, 4)
    with pytest.raises(UserError, match="no such file"):
        upscale(photo, small_config(sdxl_model.name, regional_prompts="/nonexistent/prompts.json"),
                executor=executor, progress=False)
    assert executor.closed
