"""Z-Image end to end (issue 36): ``upscale`` on the tiny Z-Image loaded from a saved directory, in process and on Ray
actors (the same bytes), with the attention probe, the composer, regional prompts from a file and CFG; knobs Z-Image
cannot honour are one line before any model loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import as_bytes, zimage_config

from cupscale_dist import UserError, upscale
from cupscale_dist.execution.worker import ModelWorker
from cupscale_dist.models.spec import ModelSpec


@pytest.fixture(scope="module")
def worker(zimage_dir):
    return ModelWorker.load(str(zimage_dir), device="cpu", dtype="float32")


def test_zimage_spec_reads_the_transformer_qwen_tokenizer_and_the_fixed_shift(zimage_dir):
    spec = ModelSpec.read(str(zimage_dir))
    assert spec.family == "zimage" and spec.latent_channels == 16 and spec.native_size == 1024
    assert type(spec.tokenizer).__name__ == "Qwen2Tokenizer"
    scheduler = spec.new_scheduler("euler")
    assert type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert scheduler.config.shift == 3.0 and not scheduler.config.use_dynamic_shifting
    with pytest.raises(UserError, match="flow-matching"):
        spec.new_scheduler("ddim")


def test_zimage_upscale_is_finite_deterministic_and_follows_the_positions_knob(zimage_dir, worker, photo):
    config = zimage_config(zimage_dir)
    first = upscale(photo, config, model=worker, progress=False)
    pixels = np.asarray(first)
    assert first.size == (photo.width * 2, photo.height * 2) and np.isfinite(pixels).all() and pixels.std() > 1
    assert as_bytes(upscale(photo, config, model=worker, progress=False)) == as_bytes(first)
    local = upscale(photo, zimage_config(zimage_dir, positions="local"), model=worker, progress=False)
    assert as_bytes(local) != as_bytes(first)


def test_zimage_cfg_runs_a_negative_pass(zimage_dir, worker, photo):
    plain = upscale(photo, zimage_config(zimage_dir, negative_prompt="a dark night"), model=worker, progress=False)
    cfg = upscale(photo, zimage_config(zimage_dir, negative_prompt="a dark night", guidance_scale=2.0), model=worker,
                  progress=False)
    assert as_bytes(plain) != as_bytes(cfg)


def test_regional_prompts_from_a_file_reach_the_zimage_views(zimage_dir, worker, photo, tmp_path, capsys):
    from cupscale_dist.cli.main import main

    image = tmp_path / "in.png"
    photo.save(image)
    common = ["--model", str(zimage_dir), "--scale", "2", "--tile", "16", "--stride", "8", "--prompt", "a cat"]
    assert main(["caption", str(image), "--tiles", *common]) == 0
    plan = json.loads(capsys.readouterr().out)
    plan["stages"][0]["views"][0]["prompt"] = "a red roof on a blue house"
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(plan))
    encoded = []
    original = worker.backbone.encode_prompts
    worker.backbone.encode_prompts = lambda texts, tokens=None: encoded.extend(texts) or original(texts, tokens)
    try:
        regional = upscale(photo, zimage_config(zimage_dir, prompt="a cat", regional_prompts=str(prompts)),
                           model=worker, progress=False)
    finally:
        del worker.backbone.encode_prompts
    assert "a red roof on a blue house" in encoded
    plain = upscale(photo, zimage_config(zimage_dir, prompt="a cat"), model=worker, progress=False)
    assert as_bytes(regional) != as_bytes(plain)  # the edited view's prompt acts


@pytest.mark.parametrize("changes,message", [
    ({"tile": 15, "stride": 8}, "even values"), ({"mask_mode": "pixel"}, "mask_mode=pixel"),
    ({"scheduler": "ddim"}, "flow-matching"), ({"true_cfg": 2.0}, "true_cfg=2"),
    ({"karras_sigmas": True}, "karras_sigmas"), ({"flow_shift_tokens": "stage"}, "shift is fixed"),
    ({"micro_conditioning": "per_view"}, "SDXL's")])
def test_zimage_knob_refusals_are_one_line_before_any_model_loads(zimage_dir, monkeypatch, changes, message):
    """check_inputs (what the CLI, batch and the service call first) knows the family from the local configs."""
    from cupscale_dist.plan import check_inputs

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("cupscale_dist.models.loading.load_pipeline", refuse)
    with pytest.raises(UserError, match=message) as caught:
        check_inputs((64, 48), zimage_config(zimage_dir, **changes))
    assert "\n" not in str(caught.value)
    check_inputs((64, 48), zimage_config(zimage_dir))


def test_zimage_ray_actors_give_the_local_bytes(local_ray, zimage_dir, photo):
    from cupscale_dist.execution.pool import RayExecutor, WorkerPool
    from cupscale_dist.execution.raycluster import ClusterOptions

    config = zimage_config(zimage_dir, view_batch_size=2)
    reference = as_bytes(upscale(photo, config, progress=False))
    spec = ModelSpec.load(config.model)
    for actors in (1, 2):
        pool = WorkerPool(config, ClusterOptions(actors=actors, cpus_per_actor=0.5), spec)
        assert as_bytes(upscale(photo, config, executor=RayExecutor(pool, spec, config.view_batch_size),
                                progress=False)) == reference


def test_vlm_captions_become_zimage_views_prompts_at_one_caption_length(local_ray, zimage_dir, photo, tiny_vlm):
    """A real (tiny) VLM captions every view's crop in the Ray pool; with Z-Image those captions become the views'
    Qwen3 captions, each view its own, and every batch of the stage gets the same caption length (here the tiny VLM's
    captions all pad to 64, so the rule itself is guarded by test_zimage.py's
    test_every_view_of_a_stage_sits_at_the_same_image_position, not by this run)."""
    from helpers import RecordingExecutor

    config = zimage_config(zimage_dir, captioner="transformers", captioner_model=tiny_vlm, captioner_dtype="float32",
                           captioner_gpus=0.0)
    worker = ModelWorker.load(str(zimage_dir), device="cpu", dtype="float32")
    lengths = []
    original = worker.backbone.forward

    def recording(*args, **kwargs):
        if kwargs.get("probe") is None:  # the denoising calls, not the probe's (the global prompt alone)
            lengths.append(args[3])
        return original(*args, **kwargs)

    worker.backbone.forward = recording
    executor = RecordingExecutor(worker, 4)
    upscale(photo, config, executor=executor, progress=False)
    context = executor.contexts[0]
    assert len(set(context.view_prompt.tolist())) > 1  # different crops, different captions, different embeddings
    per_view = context.regional_embeds[context.view_prompt]
    assert not all(per_view[0].equal(per_view[i]) for i in range(1, len(per_view)))
    assert len(lengths) > 1 and len(set(lengths)) == 1
