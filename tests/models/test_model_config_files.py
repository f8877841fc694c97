"""Model config JSON (issue 21 class 8): it must be an object of bounded depth, in one line otherwise, through every
reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cupscale_dist.errors import UserError
from cupscale_dist.models.backbones import FAMILY_COMPONENTS
from cupscale_dist.models.spec import ModelSpec, model_family, read_json


# ---------------------------------------------------------------------------------------------------------------
# 8. Model config JSON must be an object of bounded depth
# ---------------------------------------------------------------------------------------------------------------
def model_folder(root: Path, **files: str) -> Path:
    """A model folder whose model_index.json lists every SDXL component, with ``files`` (path: text) over it."""
    index = {"_class_name": "StableDiffusionXLPipeline", **{c: ["diffusers", "X"] for c in FAMILY_COMPONENTS["sdxl"]}}
    for name, text in {"model_index.json": json.dumps(index), **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


BAD_JSON = {  # file: text -> words of the one line
    "index-array-of-one": ({"model_index.json": "[1]"}, "model_index.json must be a JSON object {...}, got an array"),
    "index-string": ({"model_index.json": '"StableDiffusionXLPipeline"'}, "got a string"),
    "index-deep": ({"model_index.json": "[" * 100_000 + "]" * 100_000}, "model_index.json is nested too deeply"),
    "index-class-name-list": ({"model_index.json": '{"_class_name": []}'}, "is not supported"),
    "vae-empty-array": ({"vae/config.json": "[]", "unet/config.json": '{"sample_size": 8}'},
                        "vae/config.json must be a JSON object"),
    "vae-no-blocks": ({"vae/config.json": '{"block_out_channels": 4}', "unet/config.json": '{"sample_size": 8}'},
                      "no block_out_channels list"),
    "unet-deep": ({"vae/config.json": '{"block_out_channels": [1, 2]}', "unet/config.json": "{\"a\":" * 50_000},
                  "unet/config.json is nested too deeply"),
}


@pytest.mark.parametrize("files, words", BAD_JSON.values(), ids=BAD_JSON.keys())
def test_model_config_json_gh21_class8_is_one_line(files, words, tmp_path):
    folder = model_folder(tmp_path / "model", **files)
    with pytest.raises(UserError) as excinfo:
        ModelSpec.read(str(folder))  # was AttributeError / RecursionError / TypeError
    message = str(excinfo.value)
    assert words in message and message.startswith(f"--model {folder}") and "\n" not in message
    assert "re-save the pipeline" in message or "use an SDXL or SD1.5 pipeline" in message


def test_model_config_json_gh21_class8_other_readers(tmp_path):
    (tmp_path / "controlnet").mkdir()
    (tmp_path / "controlnet" / "config.json").write_text("[]")
    with pytest.raises(UserError, match="--controlnet .*config.json must be a JSON object.*re-save the model"):
        read_json(tmp_path / "controlnet", "config.json", "--controlnet", "re-save the model")
    from cupscale_dist.captions.engines import check_model

    with pytest.raises(UserError, match="--captioner-model .*config.json must be a JSON object"):
        check_model("transformers", str(tmp_path / "controlnet"))  # was AttributeError
    (tmp_path / "controlnet" / "config.json").write_text("[" * 100_000)
    from cupscale_dist.quality.distribution import check_clip_dir

    with pytest.raises(UserError, match="--clip .*no readable config.json"):
        check_clip_dir(str(tmp_path / "controlnet"))  # was RecursionError
    assert model_family(model_folder(tmp_path / "good")) == "sdxl"
