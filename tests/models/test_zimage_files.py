"""Z-Image's files beyond the backbone (issue 36 item 5): the zimage presets and their dry-run plan, a tokenizer folder
holding ``tokenizer.json`` alone (Qwen's), and single-file Z-Image transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import refused_line

from cupscale_dist import UpscaleConfig, UserError
from cupscale_dist.models.backbones.zimage import ZImage
from cupscale_dist.models.spec import ModelSpec
from cupscale_dist.testing.tiny_zimage import IM_START, build_tiny_zimage

TURBO = "Tongyi-MAI/Z-Image-Turbo"


@pytest.fixture(scope="module")
def zimage_dir(tmp_path_factory):
    return build_tiny_zimage(tmp_path_factory.mktemp("zimage"))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache, offline (huggingface_hub reads its cache path at import: the constant is patched)."""
    import huggingface_hub

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


# -- presets -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset,scale,views", [("zimage-4k", 4, [9, 49]), ("zimage-8k", 8, [9, 49, 225]),
                                                ("zimage-16k", 16, [9, 49, 225, 961])])
def test_zimage_presets_load_pass_the_family_check_and_plan_as_z_image(preset, scale, views, hub_cache, capsys,
                                                                      tmp_path):
    """Turbo's 8 steps at guidance 1 (one pass per view), FlowMatch euler, the flux presets' tile/stride; the dry run
    of a 1K input plans Z-Image's 16 latent channels and its weights (transformer + Qwen3-4B + VAE), not SDXL's
    guesses, before anything is fetched (HF_HUB_OFFLINE, an empty cache)."""
    from PIL import Image

    from cupscale_dist.cli.main import main
    from cupscale_dist.plan import make_plan

    config = UpscaleConfig.load(preset)
    assert config.model == TURBO and config.scale == scale and config.steps == 8 and config.guidance_scale == 1.0
    assert config.scheduler == "euler" and config.positions == "global" and config.tile == 128 and config.stride == 64
    ZImage.check_config(config)
    Image.new("RGB", (1024, 1024), (120, 80, 40)).save(tmp_path / "in.png")
    assert main(["upscale", str(tmp_path / "in.png"), "-o", str(tmp_path / "out.png"), "--config", preset,
                 "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [stage["views_per_step"] for stage in plan["stages"]] == views
    assert [stage["steps"] for stage in plan["stages"]] == [5] * len(views)  # round(0.6 * 8), one pass per view
    assert plan["unet_evaluations"] == 5 * sum(views)
    assert plan["stages"][-1]["latent"] == [1024 * scale // 8] * 2
    # the host memory of 16-channel latents (FLUX.1's VAE), not of SDXL's 4 channels
    assert plan["stages"] == make_plan((1024, 1024), config, (8, 16)).describe()["stages"]
    # Z-Image-Turbo: 6.15 B transformer + 4.02 B Qwen3-4B + 84 M VAE parameters, in bf16 (dtype auto on a GPU)
    assert plan["est_weights_gb_per_actor_by_mode"]["full"] == pytest.approx(20.52, abs=0.01)
    assert plan["est_weights_gb_per_actor_by_mode"]["fp8"] == pytest.approx(10.35, abs=0.01)
    # offload: Z-Image's resident groups (ZImage.offload_resident), not SDXL's rule (5.09)
    assert plan["est_weights_gb_per_actor_by_mode"]["offload"] == pytest.approx(1.67, abs=0.01)


def test_the_dry_run_checks_z_image_knobs_before_the_model_is_fetched(hub_cache):
    """The preset's model is known to be Z-Image before it is fetched: a knob Z-Image refuses is one line."""
    from cupscale_dist.plan import check_inputs

    with pytest.raises(UserError, match="true_cfg=2 is FLUX's"):
        check_inputs((1024, 1024), UpscaleConfig.load("zimage-4k", true_cfg=2.0))


# -- a tokenizer folder with tokenizer.json alone --------------------------------------------------------------------
def test_a_tokenizer_folder_with_tokenizer_json_alone_is_the_models_own(zimage_dir, tmp_path):
    """Qwen's tokenizers ship tokenizer.json; a folder without vocab.json was read with the demo's CLIP tokenizer."""
    from cupscale_dist.models.single_file import tokenizer_dir

    model = tmp_path / "zimage"
    shutil.copytree(zimage_dir, model)
    for name in ("vocab.json", "merges.txt"):
        (model / "tokenizer" / name).unlink()
    assert (model / "tokenizer" / "tokenizer.json").is_file()
    assert tokenizer_dir(model, "tokenizer") == str(model / "tokenizer")
    spec = ModelSpec.read(str(model))
    assert type(spec.tokenizer).__name__ == "Qwen2Tokenizer" and IM_START in spec.tokenizer.get_vocab()
    assert spec.tokenizer("a cat").input_ids == ModelSpec.read(str(zimage_dir)).tokenizer("a cat").input_ids


# -- single-file Z-Image transformers --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zimage_file(zimage_dir, tmp_path_factory):
    from cupscale_dist.testing.single_file import save_zimage_single_file

    return str(save_zimage_single_file(zimage_dir, tmp_path_factory.mktemp("zfile") / "z_image_turbo.safetensors"))


def zimage_config(model, **changes):
    from helpers import small_config

    from cupscale_dist.testing.tiny_zimage import MAX_SEQUENCE_LENGTH

    return small_config(str(model), **{"steps": 3, "guidance_scale": 1.0, "lambda_global": 0.5,
                                       "max_sequence_length": MAX_SEQUENCE_LENGTH, **changes})


def fake_turbo_cache(cache, snapshot_of) -> Path:
    """A hub cache holding ``snapshot_of`` as Tongyi-MAI/Z-Image-Turbo's snapshot (what huggingface-cli download
    leaves)."""
    repo = cache / "models--Tongyi-MAI--Z-Image-Turbo"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(snapshot_of, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    return snapshot


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."], ids=["tongyi", "comfy"])
def test_a_zimage_transformer_file_with_model_config_gives_the_directorys_bytes(zimage_dir, photo, tmp_path, prefix):
    """The original key layout (fused qkv; bare or under ComfyUI's prefix) is told from its header and loads through
    diffusers' conversion; with the directory's text encoder, tokenizer and VAE it is the directory's model."""
    from helpers import as_bytes

    from cupscale_dist import upscale
    from cupscale_dist.models.single_file import checkpoint_kind
    from cupscale_dist.testing.single_file import save_zimage_single_file

    path = save_zimage_single_file(zimage_dir, tmp_path / "z.safetensors", prefix=prefix)
    assert checkpoint_kind(path) == "zimage"
    spec = ModelSpec.read(str(path), model_config=str(zimage_dir))
    assert spec.family == "zimage" and spec.latent_channels == 16
    assert as_bytes(upscale(photo, zimage_config(path, model_config=str(zimage_dir)), progress=False)) == as_bytes(
        upscale(photo, zimage_config(zimage_dir), progress=False))


def test_a_zimage_file_without_model_config_reads_turbo_from_the_hub_cache(zimage_dir, zimage_file, hub_cache,
                                                                           photo):
    from helpers import as_bytes

    from cupscale_dist import upscale

    with pytest.raises(UserError) as refused:
        ModelSpec.read(zimage_file)
    assert "--set model_config=DIR, or huggingface-cli download Tongyi-MAI/Z-Image-Turbo" in refused_line(refused)
    snapshot = fake_turbo_cache(hub_cache, zimage_dir)
    spec = ModelSpec.read(zimage_file)
    assert spec.config_dir == str(snapshot) and type(spec.tokenizer).__name__ == "Qwen2Tokenizer"
    assert as_bytes(upscale(photo, zimage_config(zimage_file), progress=False)) == as_bytes(
        upscale(photo, zimage_config(zimage_dir), progress=False))


def test_zimage_file_refusals_are_one_line_before_any_model_loads(zimage_dir, zimage_file, tmp_path, monkeypatch,
                                                                  hub_cache):
    """Configs without the text encoder / VAE weights or the tokenizer, a file of other layers, a key of no
    transformer, and a file of another family given as Z-Image (or the reverse)."""
    from safetensors.torch import load_file, save_file

    from cupscale_dist.testing.single_file import copy_configs, save_flux_single_file, save_zimage_single_file
    from cupscale_dist.testing.tiny_flux import build_tiny_flux
    from cupscale_dist.testing.tiny_zimage import zimage_transformer

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("cupscale_dist.models.loading.load_pipeline", refuse)

    def line(model, model_config) -> str:
        with pytest.raises(UserError) as refused:
            ModelSpec.read(str(model), model_config=str(model_config))
        return refused_line(refused)

    configs_only = copy_configs(zimage_dir, tmp_path / "configs")
    assert "transformer-only Z-Image checkpoint" in line(zimage_file, configs_only)
    assert "hold no text_encoder weights" in line(zimage_file, configs_only)
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(zimage_dir, no_tokenizer)
    shutil.rmtree(no_tokenizer / "tokenizer")
    assert "no Qwen tokenizer in" in line(zimage_file, no_tokenizer)
    deeper = tmp_path / "deeper"
    zimage_transformer(0, n_layers=3).save_pretrained(deeper / "transformer")
    other = save_zimage_single_file(deeper, tmp_path / "deeper.safetensors")
    refused = line(other, zimage_dir)  # a third layer's 15 weights
    assert "do not fit the configured Z-Image transformer (0 missing, 15 unexpected, e.g. 'layers.2." in refused
    comfy = save_zimage_single_file(zimage_dir, tmp_path / "comfy.safetensors", prefix="model.diffusion_model.")
    tensors = load_file(str(comfy))
    tensors["vae.decoder.conv_in.weight"] = tensors["model.diffusion_model.x_pad_token"].clone()
    save_file(tensors, str(tmp_path / "aio.safetensors"))
    assert "key(s) of no Z-Image transformer" in line(tmp_path / "aio.safetensors", zimage_dir)
    flux_dir = build_tiny_flux(tmp_path / "flux")
    flux_file = save_flux_single_file(flux_dir, tmp_path / "flux.safetensors")
    assert "is an flux checkpoint but model_config" in line(flux_file, zimage_dir)
    assert "is an zimage checkpoint but model_config" in line(zimage_file, flux_dir)
