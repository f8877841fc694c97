"""The trained demo model (issue #10): the shipped weights, and the script that reproduces them (run for a few steps)."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from cupscale_dist.demo import MODEL_DIR, demo_model_dir
from cupscale_dist.demo.photos import HELD_OUT, PHOTOS, load_photo, training_photos
from cupscale_dist.demo.train import CropSampler, train
from cupscale_dist.models.spec import ModelSpec
from cupscale_dist.models.loading import load_pipeline

PACKAGE_BUDGET = 25 * 2**20  # bytes of safetensors the issue allows in the package


def test_every_photo_has_a_licence_and_loads_without_a_download():
    assert len(PHOTOS) >= 10 and set(HELD_OUT) <= {p.name for p in PHOTOS} and "astronaut" in HELD_OUT
    for entry in PHOTOS:
        assert entry.licence and entry.caption
        image = load_photo(entry.name)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and min(image.shape[:2]) >= 128


def test_training_never_samples_a_held_out_photo():
    sampler = CropSampler(training_photos(), seed=0)
    held_out = {p.caption for p in PHOTOS if p.name in HELD_OUT}
    _, captions, time_ids = sampler.batch(64, 64)
    assert not held_out & set(captions)
    assert len(set(captions)) > 5  # many photos are drawn, not one
    assert (time_ids[:, 4:] == 64).all()  # target size = the crop; original size and crop corner vary
    assert len(set(time_ids[:, 0].tolist())) > 3


def test_shipped_model_is_a_small_sdxl_family_pipeline():
    path = demo_model_dir()
    weights = sorted(path.rglob("*.safetensors"))
    assert {w.parent.name for w in weights} == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert sum(w.stat().st_size for w in weights) <= PACKAGE_BUDGET
    for file in weights:
        with safe_open(file, "pt") as f:
            assert all(f.get_slice(k).get_dtype() == "F16" for k in f.keys())
    spec = ModelSpec.read(str(path))
    assert spec.family == "sdxl" and spec.vae_scale_factor == 4 and spec.latent_channels == 4
    unet = json.loads((path / "unet" / "config.json").read_text())
    assert unet["addition_embed_type"] == "text_time" and unet["cross_attention_dim"] == 64
    record = json.loads((path / "training.json").read_text())
    assert set(record["held_out"]) == set(HELD_OUT) and not set(record["photos"]) & set(HELD_OUT)
    assert record["vae_steps"] >= 1000 and record["unet_steps"] >= 1000
    assert record["vae_minutes"] + record["unet_minutes"] <= 120  # the training budget


def test_shipped_model_uses_clips_real_tokenizer():
    from transformers import CLIPTokenizer

    for folder, pad_id in (("tokenizer", 49407), ("tokenizer_2", 0)):
        tokenizer = CLIPTokenizer.from_pretrained(MODEL_DIR / folder)
        assert len(tokenizer) == 49408 and tokenizer.pad_token_id == pad_id
        assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # openai/CLIP's ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shipped_model_loads_in_any_dtype(dtype):
    pipe = load_pipeline(str(MODEL_DIR), torch.device("cpu"), dtype)
    assert pipe.unet.dtype == dtype and pipe.text_encoder_2.dtype == dtype
    embeds, _, pooled, _ = pipe.encode_prompt(["a photo of a cat"], device="cpu", do_classifier_free_guidance=False)
    assert embeds.shape == (1, 77, 64) and pooled.shape == (1, 32) and torch.isfinite(embeds.float()).all()


def test_training_script_runs_a_few_steps_and_writes_a_loadable_model(tmp_path):
    out = train(tmp_path / "model", vae_steps=2, unet_steps=3, vae_batch=2, unet_batch=4, threads=2)
    record = json.loads((out / "training.json").read_text())
    assert [e["phase"] for e in record["log"]] == ["vae", "vae", "unet", "unet"]
    assert all(np.isfinite(e.get("l1", e.get("mse"))) for e in record["log"])
    spec = ModelSpec.read(str(out))
    assert spec.family == "sdxl" and spec.vae_scale_factor == 4
    vae = json.loads((out / "vae" / "config.json").read_text())
    assert 0.05 < vae["scaling_factor"] < 50  # 1/std of the trained VAE's latents, not SDXL's constant
    pipe = load_pipeline(str(out), torch.device("cpu"), torch.float32)
    assert pipe.unet.config.sample_size * 4 == 128
    assert not (out / ".tokenizers").exists()
