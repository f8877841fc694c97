"""`cupscale caption --tiles` prints the views the upscale will use, in the format --regional-prompts reads."""

from __future__ import annotations

import json

from cupscale_dist.cli.main import main


def test_caption_tiles_round_trips_into_regional_prompts(sdxl_dir, photo, tmp_path, capsys):
    image = tmp_path / "in.png"
    photo.save(image)
    common = ["--model", sdxl_dir, "--scale", "4", "--tile", "16", "--stride", "8", "--prompt", "a cat"]
    assert main(["caption", str(image), "--tiles", *common]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["prompt"] == "a cat"
    assert [s["size"] for s in plan["stages"]] == [[256, 192], [512, 384]]
    assert len(plan["stages"][0]["views"]) == 6 and len(plan["stages"][1]["views"]) == 35
    assert plan["stages"][1]["views"][-1]["box"] == [384, 256, 512, 384]  # clamped to the border, in pixels

    plan["stages"][0]["views"][0]["prompt"] = "a red roof"  # edit one by hand, as a user would
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(plan))
    out = tmp_path / "out.png"
    args = ["upscale", str(image), "-o", str(out), *common, "--regional-prompts", str(prompts), "--actors", "0",
            "--steps", "2", "--device", "cpu", "--dtype", "float32", "-q"]
    assert main(args) == 0 and out.exists()


def test_caption_without_tiles_prints_only_the_global_prompt(sdxl_dir, photo, tmp_path, capsys):
    image = tmp_path / "in.png"
    photo.save(image)
    assert main(["caption", str(image), "--prompt", "a dog", "--model", sdxl_dir]) == 0
    assert json.loads(capsys.readouterr().out) == {"prompt": "a dog", "stages": []}


def test_vlm_captions_reach_the_composer_per_view(local_ray, sdxl_model, photo, tiny_vlm, tmp_path):
    """A real (tiny) VLM captions every view's crop in the Ray pool; those captions become the views' prompts."""
    from helpers import RecordingExecutor, small_config

    from cupscale_dist import upscale

    config = small_config(sdxl_model.name, captioner="transformers", captioner_model=tiny_vlm,
                          captioner_dtype="float32", captioner_gpus=0.0, steps=2)
    executor = RecordingExecutor(sdxl_model, 4)
    upscale(photo, config, executor=executor, progress=False)
    context = executor.contexts[0]
    assert len(set(context.view_prompt.tolist())) > 1  # different crops, different captions, different embeddings
    per_view = context.regional_embeds[context.view_prompt]
    assert not all(per_view[0].equal(per_view[i]) for i in range(1, len(per_view)))
