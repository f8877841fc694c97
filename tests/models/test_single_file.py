"""Single-file checkpoints (``--model finetune.safetensors``): family from the header, configs shipped in the
package, weights through diffusers' ``from_single_file`` offline; the same weights give the same bytes."""

from __future__ import annotations

import pytest
import torch
from helpers import as_bytes, small_config

from cupscale_dist import UserError, upscale
from cupscale_dist.execution.worker import ModelWorker
from cupscale_dist.models.addons import Addons
from cupscale_dist.models.hub import resolve_model
from cupscale_dist.models.single_file import checkpoint_family, shipped_config
from cupscale_dist.models.spec import ModelSpec
from cupscale_dist.testing.single_file import copy_configs, save_single_file
from cupscale_dist.testing.tiny import build_tiny_sd15, build_tiny_sdxl


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny SDXL and SD1.5 as diffusers dirs, as original-layout single files, and their configs alone.

    The SDXL's second text encoder is 48 wide: diffusers' single-file loader tells SDXL's two encoders apart by width.
    """
    root = tmp_path_factory.mktemp("single-file")
    models = {}
    for family, build in (("sdxl", lambda p: build_tiny_sdxl(p, text_hidden_size_2=48)), ("sd15", build_tiny_sd15)):
        directory = build(root / family)
        models[family] = dict(dir=str(directory), file=str(save_single_file(directory, root / f"{family}.safetensors")),
                              config=str(copy_configs(directory, root / f"{family}-config")))
    return models


def test_families_are_read_from_the_header(tiny):
    assert checkpoint_family(tiny["sdxl"]["file"]) == "sdxl" and checkpoint_family(tiny["sd15"]["file"]) == "sd15"
    assert resolve_model(tiny["sdxl"]["file"]) == tiny["sdxl"]["file"]


@pytest.mark.parametrize("family", ["sdxl", "sd15"])
def test_single_file_gives_the_bytes_of_the_diffusers_directory(tiny, photo, monkeypatch, family):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tiny[family]
    reference = as_bytes(upscale(photo, small_config(model["dir"], steps=3), progress=False))
    config = small_config(model["file"], steps=3, model_config=model["config"])
    worker = ModelWorker.for_config(config)
    assert worker.spec.path == model["file"] and worker.spec.family == family
    assert as_bytes(upscale(photo, config, model=worker, progress=False)) == reference


def test_ray_actors_load_the_single_file(local_ray, tiny, photo, monkeypatch):
    from cupscale_dist.execution.pool import RayExecutor, WorkerPool
    from cupscale_dist.execution.raycluster import ClusterOptions

    model = tiny["sdxl"]
    reference = as_bytes(upscale(photo, small_config(model["dir"], steps=3), progress=False))
    config = small_config(model["file"], steps=3, model_config=model["config"])
    spec = ModelSpec.load(config.model, config.variant, config.model_config)
    monkeypatch.setattr("cupscale_dist.models.loading.load_pipeline",
                        lambda *a, **k: pytest.fail("the driver loaded weights"))
    executor = RayExecutor(WorkerPool(config, ClusterOptions(actors=2, cpus_per_actor=0.5), spec), spec,
                           config.view_batch_size)
    assert as_bytes(upscale(photo, config, executor=executor, progress=False)) == reference


def fake_checkpoint(path, keys: dict[str, tuple[int, ...]]) -> str:
    from safetensors.torch import save_file

    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, str(path))
    return str(path)


@pytest.mark.parametrize("keys,named", [
    ({"model.diffusion_model.input_blocks.0.0.weight": (1, 4, 1, 1),
      "cond_stage_model.model.token_embedding.weight": (1, 1)}, "is a Stable Diffusion 2 checkpoint"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (1, 4, 1, 1),
      "conditioner.embedders.0.model.text_projection": (1, 1)}, "is an SDXL refiner checkpoint"),
    ({"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": (1,)},
     "is a Stable Diffusion 3 checkpoint"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (1, 9, 1, 1),
      "cond_stage_model.transformer.text_model.final_layer_norm.bias": (1,)}, "is a SD1.5 inpainting"),
    ({"weight": (3, 3)}, "not a Stable Diffusion checkpoint"),
])
def test_other_checkpoints_are_refused_in_one_line_before_any_actor_starts(tmp_path, monkeypatch, keys, named):
    monkeypatch.setattr("cupscale_dist.execution.worker.load_pipeline",
                        lambda *a, **k: pytest.fail("a model was loaded"))
    path = fake_checkpoint(tmp_path / "other.safetensors", keys)
    with pytest.raises(UserError) as refused:
        ModelWorker.for_config(small_config(path))
    assert named in str(refused.value) and "\n" not in str(refused.value)
    assert "single files of SDXL, SD1.5 and Flux.1 are supported" in str(refused.value) or "not a Stable" in named


def test_unreadable_files_and_misplaced_model_config_are_refused(tmp_path, tiny, sdxl_dir):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="not a readable checkpoint"):
        ModelSpec.load(str(junk))
    with pytest.raises(UserError, match="model_config=.* is for a single-file checkpoint"):
        ModelSpec.load(sdxl_dir, model_config=tiny["sdxl"]["config"])
    with pytest.raises(UserError, match="is an sdxl checkpoint but model_config .* is an sd15 config"):
        ModelSpec.load(tiny["sdxl"]["file"], model_config=tiny["sd15"]["config"])


def test_a_lora_is_checked_against_a_single_files_config(tiny, tmp_path):
    from cupscale_dist.testing.tiny import build_tiny_lora

    lora = build_tiny_lora(tiny["sd15"]["dir"], tmp_path / "sd15.safetensors")
    config = small_config(tiny["sdxl"]["file"], model_config=tiny["sdxl"]["config"], lora=(str(lora),))
    with pytest.raises(UserError, match="takes 32 inputs .* has 80"):
        Addons.from_config(config)


def test_a_controlnet_is_checked_against_a_single_files_config(tiny, tmp_path):
    """The ControlNet check reads the UNet config from the single file's config directory (not from inside the
    checkpoint's path): a matching ControlNet passes, another family's is refused in one line."""
    from cupscale_dist.testing.controlnet import build_tiny_controlnet

    config = small_config(tiny["sdxl"]["file"], model_config=tiny["sdxl"]["config"])
    fitting = build_tiny_controlnet(tiny["sdxl"]["dir"], tmp_path / "sdxl-controlnet")
    assert Addons.from_config(config.replace(controlnet=str(fitting))).controlnet == str(fitting.resolve())
    other = build_tiny_controlnet(tiny["sd15"]["dir"], tmp_path / "sd15-controlnet")
    with pytest.raises(UserError, match="made for another model"):
        Addons.from_config(config.replace(controlnet=str(other)))


@pytest.mark.parametrize("family,unet_parameters", [("sdxl", 2_567_463_684), ("sd15", 859_520_964)])
def test_shipped_configs_are_the_real_models(family, unet_parameters):
    """The packaged configs build SDXL base 1.0's / SD1.5's UNet (on the meta device: no memory)."""
    from diffusers import UNet2DConditionModel

    spec = ModelSpec.read(shipped_config(family))
    assert spec.family == family and spec.native_size == {"sdxl": 1024, "sd15": 512}[family]
    assert len(spec.tokenizer) == 49408
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(shipped_config(family),
                                                                                 subfolder="unet"))
    assert sum(p.numel() for p in unet.parameters()) == unet_parameters


def test_shipped_sdxl_config_loads_a_full_size_layout_offline(tmp_path, monkeypatch):
    """The default configs (no model_config) are what `from_single_file` reads: a tiny file of SDXL's names but the
    wrong shapes fails inside the loader with one line, never a download."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from cupscale_dist.models.loading import load_pipeline

    path = fake_checkpoint(tmp_path / "sdxl.safetensors", {
        "model.diffusion_model.input_blocks.0.0.weight": (2, 4, 1, 1),
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
        "conditioner.embedders.1.model.positional_embedding": (77, 1280)})
    spec = ModelSpec.load(path)
    assert spec.family == "sdxl" and spec.config_dir == shipped_config("sdxl") and spec.native_size == 1024
    with pytest.raises(UserError, match="could not be loaded as a single-file sdxl checkpoint"):
        load_pipeline(path, torch.device("cpu"), torch.float32)
