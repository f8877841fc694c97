"""The tiny random pipelines of `cupscale_dist.testing.tiny` load back through diffusers' and transformers' real
paths."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from cupscale_dist.testing.tiny import build_tiny_sdxl, write_clip_tokenizer


def _files(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_tokenizer_is_a_real_bpe(tmp_path):
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path / "tok"))
    vocab = json.loads((tmp_path / "tok" / "vocab.json").read_text(encoding="utf-8"))

    assert len(tokenizer) == len(vocab) > 512 + 300  # bytes, bytes + "</w>", a few hundred merges, 2 specials
    assert tokenizer.bos_token_id == vocab["<|startoftext|>"] == len(vocab) - 2
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == vocab["<|endoftext|>"] == len(vocab) - 1
    assert tokenizer.model_max_length == 77

    ids = tokenizer("a photo of a cat").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of a cat"
    assert tokenizer("a photo of a dog").input_ids != ids

    unseen = tokenizer("zebra xylophone").input_ids  # words outside the BPE corpus split into byte pieces
    assert len(unseen) > 4 and tokenizer.decode(unseen, skip_special_tokens=True) == "zebra xylophone"

    padded = tokenizer("a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == tokenizer.eos_token_id


def test_tokenizer_2_pads_with_exclamation_mark(tmp_path):
    tokenizer_2 = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path / "tok2", pad_token="!"))
    assert tokenizer_2.pad_token == "!" and tokenizer_2.pad_token_id == 0  # byte "!" is the first vocab entry
    padded = tokenizer_2("a cat", padding="max_length", max_length=8).input_ids
    assert padded[3] == tokenizer_2.eos_token_id and padded[4:] == [0] * 4


def test_sdxl_components_load_separately(sdxl_dir):  # sdxl_dir, sd15_dir: conftest's build_tiny_* (seed 0)
    sdxl_dir = Path(sdxl_dir)
    index = json.loads((sdxl_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    for name in ("tokenizer", "tokenizer_2"):  # the hub's layout, as SD / SDXL checkpoints ship it
        assert {"vocab.json", "merges.txt"} <= {p.name for p in (sdxl_dir / name).iterdir()}

    unet = UNet2DConditionModel.from_pretrained(sdxl_dir, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(sdxl_dir, subfolder="vae")
    tokenizer = CLIPTokenizer.from_pretrained(sdxl_dir, subfolder="tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained(sdxl_dir, subfolder="tokenizer_2")
    text_encoder = CLIPTextModel.from_pretrained(sdxl_dir, subfolder="text_encoder")
    text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(sdxl_dir, subfolder="text_encoder_2")
    scheduler = EulerDiscreteScheduler.from_pretrained(sdxl_dir, subfolder="scheduler")

    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8 and vae.config.latent_channels == 4
    assert vae.config.scaling_factor == 0.13025 and vae.config.sample_size == 128
    assert unet.config.sample_size == 16 and unet.config.addition_embed_type == "text_time"
    assert unet.config.cross_attention_dim == text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
    assert len(tokenizer) == text_encoder.config.vocab_size and len(tokenizer_2) == text_encoder_2.config.vocab_size
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer_2.pad_token == "!"
    assert scheduler.config.timestep_spacing == "leading" and scheduler.config.steps_offset == 1

    with torch.no_grad():  # one CFG batch at a 32x32 latent (256 px), as the tile loop calls it
        ids = tokenizer(["", "a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        hidden = text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        out_2 = text_encoder_2(ids, output_hidden_states=True)
        context = torch.cat([hidden, out_2.hidden_states[-2]], dim=-1)
        added = {"text_embeds": out_2.text_embeds, "time_ids": torch.tensor([[256.0, 256, 0, 0, 256, 256]] * 2)}
        eps = unet(torch.randn(2, 4, 32, 32), 999, context, added_cond_kwargs=added).sample
    assert eps.shape == (2, 4, 32, 32) and torch.isfinite(eps).all()


@pytest.mark.parametrize("kind", ["sdxl", "sd15"])
def test_pipeline_runs_end_to_end(kind, request):
    directory = request.getfixturevalue(f"{kind}_dir")
    pipeline_cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    pipe = pipeline_cls.from_pretrained(directory, local_files_only=True)
    assert type(pipe) is pipeline_cls and pipe.vae_scale_factor == 8
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 128  # native size

    image = pipe(
        "a photo of a cat",
        num_inference_steps=2,
        height=128,
        width=128,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, 128, 128, 3) and np.isfinite(image).all()


def test_builds_are_deterministic(tmp_path, sdxl_dir):
    rng_state = torch.get_rng_state()
    again = _files(build_tiny_sdxl(tmp_path / "again", seed=0))
    assert torch.equal(torch.get_rng_state(), rng_state)  # the caller's global RNG is left alone
    assert again == _files(Path(sdxl_dir))
    other = _files(build_tiny_sdxl(tmp_path / "other", seed=1))
    weights = Path("unet", "diffusion_pytorch_model.safetensors")
    assert other[weights] != again[weights]


def test_heavier_unet_channels(tmp_path):
    unet = UNet2DConditionModel.from_pretrained(build_tiny_sdxl(tmp_path, unet_channels=(64, 128)), subfolder="unet")
    assert tuple(unet.config.block_out_channels) == (64, 128)
    with pytest.raises(ValueError, match="unet_channels"):
        build_tiny_sdxl(tmp_path / "bad", unet_channels=(32, 64, 128))
