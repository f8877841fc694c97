"""Weights fetched once, only the files needed: the hub file selection, variant loading, the driver's one resolve."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import small_config

from cupscale_dist import UserError, upscale
from cupscale_dist.execution.worker import ModelWorker
from cupscale_dist.models.hub import component_variant, resolve_model, select_files
from cupscale_dist.models.spec import ModelSpec, model_family
from cupscale_dist.testing.fullsize import LAYOUTS

GB = 1e9

# stabilityai/stable-diffusion-xl-base-1.0 as the Hub lists it (path: size in bytes), every file of the repository.
SDXL_BASE_FILES = {
    ".gitattributes": 1_966, "01.png": 4_609_524, "LICENSE.md": 14_070, "README.md": 5_923, "comparison.png": 129_863,
    "model_index.json": 609, "pipeline.png": 80_049,
    "sd_xl_base_1.0.safetensors": 6_938_078_334, "sd_xl_base_1.0_0.9vae.safetensors": 6_938_078_334,
    "sd_xl_offset_example-lora_1.0.safetensors": 49_553_604,
    "scheduler/scheduler_config.json": 479,
    "text_encoder/config.json": 565, "text_encoder/flax_model.msgpack": 492_248_682,
    "text_encoder/model.fp16.safetensors": 246_144_152, "text_encoder/model.onnx": 492_587_457,
    "text_encoder/model.safetensors": 492_265_168, "text_encoder/openvino_model.bin": 492_242_672,
    "text_encoder/openvino_model.xml": 1_057_789,
    "text_encoder_2/config.json": 575, "text_encoder_2/flax_model.msgpack": 2_778_635_267,
    "text_encoder_2/model.fp16.safetensors": 1_389_382_176, "text_encoder_2/model.onnx": 1_041_992,
    "text_encoder_2/model.onnx_data": 2_778_639_360, "text_encoder_2/model.safetensors": 2_778_702_264,
    "text_encoder_2/openvino_model.bin": 2_778_640_120, "text_encoder_2/openvino_model.xml": 2_790_164,
    "tokenizer/merges.txt": 524_619, "tokenizer/special_tokens_map.json": 472, "tokenizer/tokenizer_config.json": 737,
    "tokenizer/vocab.json": 1_059_962,
    "tokenizer_2/merges.txt": 524_619, "tokenizer_2/special_tokens_map.json": 460,
    "tokenizer_2/tokenizer_config.json": 725, "tokenizer_2/vocab.json": 1_059_962,
    "unet/config.json": 1_680, "unet/diffusion_flax_model.msgpack": 10_269_957_466,
    "unet/diffusion_pytorch_model.fp16.safetensors": 5_135_149_760,
    "unet/diffusion_pytorch_model.safetensors": 10_270_077_736,
    "unet/model.onnx": 7_293_842, "unet/model.onnx_data": 10_269_900_800, "unet/openvino_model.bin": 10_269_899_024,
    "unet/openvino_model.xml": 25_128_414,
    "vae/config.json": 642, "vae/diffusion_flax_model.msgpack": 334_595_328,
    "vae/diffusion_pytorch_model.fp16.safetensors": 167_335_342, "vae/diffusion_pytorch_model.safetensors": 334_643_268,
    "vae_1_0/config.json": 607, "vae_1_0/diffusion_pytorch_model.fp16.safetensors": 167_335_342,
    "vae_1_0/diffusion_pytorch_model.safetensors": 334_643_268,
    "vae_decoder/config.json": 607, "vae_decoder/model.onnx": 198_079_602,
    "vae_decoder/openvino_model.bin": 197_968_868,
    "vae_decoder/openvino_model.xml": 1_013_414,
    "vae_encoder/config.json": 607, "vae_encoder/model.onnx": 136_760_487,
    "vae_encoder/openvino_model.bin": 136_655_872,
    "vae_encoder/openvino_model.xml": 882_906,
}
SDXL_BASE_INDEX = LAYOUTS["sdxl"].model_index  # as published


def selected_bytes(files):
    return sum(SDXL_BASE_FILES[f] for f in files)


@pytest.mark.parametrize("variant,low,high", [(None, 13.5, 14.5), ("fp16", 6.5, 7.5)])
def test_sdxl_base_selection_is_the_pipeline_components_only(variant, low, high):
    files = select_files(SDXL_BASE_FILES, SDXL_BASE_INDEX, variant)
    assert low * GB < selected_bytes(files) < high * GB  # not the 60+ GB of everything, not 28 GB of *.safetensors
    assert "model_index.json" in files and "scheduler/scheduler_config.json" in files
    assert {"tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer_2/vocab.json", "unet/config.json"} <= set(files)
    assert not any("/" not in f and f.endswith(".safetensors") for f in files)  # root single files, the LoRA
    assert not any(f.startswith(("vae_1_0/", "vae_decoder/", "vae_encoder/")) for f in files)
    assert not any(f.endswith((".onnx", ".onnx_data", ".msgpack", ".bin", ".xml", ".png")) for f in files)
    weights = [f for f in files if f.endswith(".safetensors")]
    assert len(weights) == 4  # unet, vae, text_encoder, text_encoder_2: one file each
    assert all((".fp16." in f) == (variant == "fp16") for f in weights)


def test_a_variant_a_component_lacks_falls_back_to_its_full_precision_file():
    files = {k: v for k, v in SDXL_BASE_FILES.items() if k != "vae/diffusion_pytorch_model.fp16.safetensors"}
    chosen = select_files(files, SDXL_BASE_INDEX, "fp16")
    assert "vae/diffusion_pytorch_model.safetensors" in chosen
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in chosen
    assert "unet/diffusion_pytorch_model.safetensors" not in chosen


@pytest.fixture(scope="module")
def fp16_only_dir(tmp_path_factory, sdxl_dir):
    """The tiny SDXL saved with variant='fp16' only (what most SDXL caches hold): no full-precision weights."""
    from diffusers import StableDiffusionXLPipeline

    directory = tmp_path_factory.mktemp("fp16-only")
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    pipe.to(torch.float16).save_pretrained(directory, variant="fp16")
    assert not [p for p in directory.rglob("*.safetensors") if ".fp16." not in p.name]
    return str(directory)


def test_fp16_only_directory_loads_and_upscales(fp16_only_dir, photo):
    assert component_variant(fp16_only_dir, "unet", "fp16") == "fp16"
    assert component_variant(fp16_only_dir, "unet", None) == "fp16"  # what is there, whatever was asked
    assert component_variant(fp16_only_dir, "tokenizer", "fp16") is None
    for variant in ("fp16", None):  # the knob's default, and a user who asked for full precision
        worker = ModelWorker.load(fp16_only_dir, device="cpu", dtype="float32", variant=variant)
        assert worker.unet.dtype == torch.float32  # fp16 files, upcast to the run's dtype
        out = upscale(photo, small_config(fp16_only_dir, steps=2, variant=variant), model=worker, progress=False)
        assert out.size == (256, 192) and np.asarray(out).std() > 0


def test_full_precision_files_are_loaded_when_no_variant_file_exists(sdxl_dir):
    assert component_variant(sdxl_dir, "unet", "fp16") is None  # the test model has no fp16 files
    worker = ModelWorker.load(sdxl_dir, device="cpu", dtype="float32", variant="fp16")
    reference = ModelWorker(sdxl_dir, device="cpu", dtype="float32")
    for name, tensor in worker.unet.state_dict().items():
        assert torch.equal(tensor, reference.unet.state_dict()[name])


def test_hub_id_resolves_once_from_the_cache_offline(fp16_only_dir, tmp_path, monkeypatch):
    """A hub id found in the local cache (offline) resolves to its snapshot; ModelSpec reads it without weights."""
    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-sdxl"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(fp16_only_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    assert Path(resolve_model("someone/tiny-sdxl", "fp16")) == snapshot
    spec = ModelSpec.load("someone/tiny-sdxl", "fp16")
    assert spec.path == str(snapshot) and spec.name == "someone/tiny-sdxl" and spec.family == "sdxl"
    assert spec.native_size == 128 and spec.vae_scale_factor == 8 and spec.token_count("a cat") == 4


def test_hub_download_asks_for_exactly_the_selected_files(tmp_path, monkeypatch):
    """Online, the driver lists the repository and downloads only select_files (no network: the hub is faked)."""
    import huggingface_hub

    (tmp_path / "model_index.json").write_text(json.dumps(SDXL_BASE_INDEX))
    asked = {}
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name: str(tmp_path / name))
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo: list(SDXL_BASE_FILES))
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, allow_patterns=None, **kw: (asked.setdefault("files", allow_patterns)
                                                                 and str(tmp_path)))
    assert resolve_model("stabilityai/stable-diffusion-xl-base-1.0", "fp16") == str(tmp_path)
    assert asked["files"] == select_files(SDXL_BASE_FILES, SDXL_BASE_INDEX, "fp16")


def test_sdxl_refiner_is_refused_with_the_fix(tmp_path):
    index = {"_class_name": "StableDiffusionXLImg2ImgPipeline", "requires_aesthetics_score": True,
             "text_encoder": [None, None], "tokenizer": [None, None],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match=r"an SDXL refiner \(no text_encoder, tokenizer\) refines a base model's "
                                        r"output; use a base model"):
        model_family(tmp_path)
