"""Tiny, seeded, random-weight Flux.1 pipelines (dev: guidance embedding; schnell: none) built from configs.

As :mod:`cupscale_dist.testing.tiny` does for SDXL: nothing is downloaded, every component is built from a config
under ``torch.manual_seed(seed)`` and the pipeline is written with ``FluxPipeline.save_pretrained``, so it loads
back through the same ``from_pretrained`` path a hub id or a local directory takes.

Shapes follow Flux.1 where the method depends on them: a VAE with downsampling factor 8, 16 latent channels and
Flux's own ``scaling_factor`` / ``shift_factor``; a FluxTransformer2DModel over packed 2x2 latent patches
(``in_channels`` 64 = 16 x 4) with 3-axis RoPE (t, y, x); CLIP (pooled) + T5 (sequence) text encoders; Flux-dev's
and -schnell's FlowMatchEulerDiscreteScheduler configs. Everything else is small (one double- and one single-
stream block, width 32), so a build takes about a second on 2 CPU cores.

The T5 tokenizer is a real ``tokenizers`` Unigram model over a small word list (Metaspace pre-tokenizer, ``</s>``
appended, ``<pad>`` id 0 as T5's), wrapped in transformers' fast T5 tokenizer class.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .tiny import (
    EOS_TOKEN,
    TEXT_HIDDEN_SIZE,
    _load_tokenizer,
    _save_pipeline,
    _text_encoder,
)

# FLUX.1-dev's VAE (black-forest-labs/FLUX.1-dev, vae/config.json): latents are (z - shift) * scale.
FLUX_SCALING_FACTOR = 0.3611
FLUX_SHIFT_FACTOR = 0.1159
LATENT_CHANNELS = 16
VAE_BLOCK_OUT_CHANNELS = (8, 16, 16, 16)  # 4 blocks: factor 2**3 = 8, as Flux's VAE

# The tiny transformer: 2 heads of 16 dims; RoPE splits the head dim over the (t, y, x) axes as Flux's (16, 56, 56)
# splits 128, each axis even.
HEAD_DIM = 16
HEADS = 2
AXES_DIMS_ROPE = (4, 6, 6)
T5_HIDDEN_SIZE = 32
T5_MAX_LENGTH = 32  # the tiny T5's sequence length (Flux-dev: 512, schnell: 256); the backbone's knob decides

# black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json (dynamic shift from the image's token count);
# FLUX.1-schnell's turns dynamic shifting off and uses shift 1.
DEV_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                     base_image_seq_len=256, max_image_seq_len=4096)
SCHNELL_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
                         max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)

# Words the tiny T5 knows whole; anything else falls apart into single letters (still real tokens, no <unk>).
T5_WORDS = ["a", "photo", "of", "cat", "dog", "on", "the", "house", "red", "roof", "under", "blue", "sky", "tree", "in",
            "park", "with", "and", "night", "dark", "mountain", "landscape", "snow", "street", "city", "light",
            "detailed", "high", "resolution", "portrait", "woman", "man"]


def build_t5_tokenizer(directory: str | os.PathLike, max_length: int = T5_MAX_LENGTH):
    """A T5-style Unigram tokenizer written to ``directory`` (tokenizer.json + config), loaded back from there."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in T5_WORDS]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,"]
    model = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    model.pre_tokenizer = pre_tokenizers.Metaspace()
    model.decoder = decoders.Metaspace()
    model.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                         special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(tokenizer_object=model, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                extra_ids=0, model_max_length=max_length)
    tokenizer.save_pretrained(directory)
    return T5TokenizerFast.from_pretrained(directory)


def _t5_encoder(tokenizer, seed: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=len(tokenizer), d_model=T5_HIDDEN_SIZE, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def _flux_vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * len(VAE_BLOCK_OUT_CHANNELS),
                         up_block_types=("UpDecoderBlock2D",) * len(VAE_BLOCK_OUT_CHANNELS),
                         block_out_channels=VAE_BLOCK_OUT_CHANNELS, layers_per_block=1,
                         latent_channels=LATENT_CHANNELS, norm_num_groups=8, sample_size=128,
                         scaling_factor=FLUX_SCALING_FACTOR, shift_factor=FLUX_SHIFT_FACTOR,
                         use_quant_conv=False, use_post_quant_conv=False).eval()  # Flux's VAE has neither


def flux_transformer(seed: int, guidance_embeds: bool, num_layers: int = 1, num_single_layers: int = 1):
    """The tiny FluxTransformer2DModel (also what the stand-in and benchmark tests size themselves by)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=LATENT_CHANNELS * 4, num_layers=num_layers,
                                  num_single_layers=num_single_layers, attention_head_dim=HEAD_DIM,
                                  num_attention_heads=HEADS, joint_attention_dim=T5_HIDDEN_SIZE,
                                  pooled_projection_dim=TEXT_HIDDEN_SIZE, guidance_embeds=guidance_embeds,
                                  axes_dims_rope=AXES_DIMS_ROPE).eval()


@torch.random.fork_rng(devices=[])  # seeds each component without touching the caller's RNG state
def build_tiny_flux(directory: str | os.PathLike, seed: int = 0, variant: str = "dev") -> Path:
    """Build a tiny random FluxPipeline and ``save_pretrained`` it to ``directory``.

    Args:
        directory (`str` or `os.PathLike`): where the pipeline is written (created if missing).
        seed (`int`, *optional*, defaults to 0): ``torch.manual_seed`` before each component.
        variant (`str`, *optional*, defaults to "dev"): "dev" (guidance embedding, dynamic shift) or "schnell"
            (no guidance embedding, shift 1).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    if variant not in ("dev", "schnell"):
        raise ValueError(f"variant={variant!r}: use 'dev' or 'schnell'")
    directory = Path(directory)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = _load_tokenizer(Path(scratch) / "tokenizer", pad_token=EOS_TOKEN)
        tokenizer_2 = build_t5_tokenizer(Path(scratch) / "tokenizer_2")
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**(DEV_SCHEDULER if variant == "dev" else SCHNELL_SCHEDULER)),
        vae=_flux_vae(seed),
        text_encoder=_text_encoder(tokenizer, seed, with_projection=False),
        tokenizer=tokenizer,
        text_encoder_2=_t5_encoder(tokenizer_2, seed),
        tokenizer_2=tokenizer_2,
        transformer=flux_transformer(seed, guidance_embeds=variant == "dev"),
    )
    _save_pipeline(pipe, directory, {"tokenizer": EOS_TOKEN})  # the CLIP tokenizer in the hub's vocab/merges layout
    return directory


def build_tiny_flux_lora(model_dir: str | os.PathLike, path: str | os.PathLike, seed: int = 0, rank: int = 4) -> Path:
    """A random LoRA for the tiny Flux in ``model_dir``: peft adapters on the transformer's attention projections
    (lora_B random, so it changes the output), saved with ``FluxPipeline.save_lora_weights`` as one file."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig, get_peft_model_state_dict

    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel.from_pretrained(model_dir, subfolder="transformer")
        transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                           target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        layers = get_peft_model_state_dict(transformer)
    FluxPipeline.save_lora_weights(path.parent, weight_name=path.name, safe_serialization=True,
                                   transformer_lora_layers=layers)
    return path


@torch.random.fork_rng(devices=[])
def build_tiny_flux_controlnet(model_dir: str | os.PathLike, directory: str | os.PathLike, seed: int = 0) -> Path:
    """A FluxControlNetModel for the tiny Flux in ``model_dir`` (one double- and one single-stream block, from its
    transformer), saved with ``save_pretrained``. diffusers zero-initialises its input embedder and output blocks (a
    fresh ControlNet changes nothing); here they are random, so the control image visibly steers the output."""
    from diffusers import FluxControlNetModel, FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(model_dir, subfolder="transformer")
    controlnet = FluxControlNetModel.from_transformer(transformer, num_layers=1, num_single_layers=1,
                                                      attention_head_dim=HEAD_DIM, num_attention_heads=HEADS)
    torch.manual_seed(seed)
    for module in [controlnet.controlnet_x_embedder, *controlnet.controlnet_blocks,
                   *controlnet.controlnet_single_blocks]:
        torch.nn.init.normal_(module.weight, std=0.2)
    controlnet.save_pretrained(directory, safe_serialization=True)
    return Path(directory)
