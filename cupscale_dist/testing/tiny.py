"""Tiny, seeded, random-weight Stable Diffusion pipelines built from configs, for tests and benchmarks.

No weights are downloaded anywhere: every component is built from a config with `torch.manual_seed(seed)`, the
CLIP tokenizer is a real byte-level BPE whose vocab.json / merges.txt are trained here on a small English word
list, and the whole pipeline is written with diffusers' `save_pretrained`, so it loads back through the same
`from_pretrained` path users take with a hub id or a local dir (pipeline-wise or component-wise).

Shapes follow the real models where the pipeline depends on them: VAE downsampling factor 8 with 4 latent
channels and the real `scaling_factor`; UNet `sample_size` 16 (native size 128 px); SDXL's UNet architecture
(`text_time` added conditioning, cross-attention over both text encoders' hidden states); SDXL's scheduler config.
Everything else is small, so building and saving a model takes about a second on 2 CPU cores.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import torch

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
NUM_MERGES = 400  # "a few hundred": whole common words become one token, rarer words split into pieces

# Text encoders (both SDXL encoders and the SD1.5 one): tiny CLIP text transformers.
TEXT_HIDDEN_SIZE = 32
TEXT_PROJECTION_DIM = 32  # text_encoder_2's pooled projection; enters SDXL's `text_time` embedding
ADDITION_TIME_EMBED_DIM = 8  # SDXL: 6 micro-conditioning ids (original size, crop, target size), 8 dims each

# VAE: 4 blocks -> downsampling factor 2**3 = 8, as in SD / SDXL; `sample_size` 128 keeps tiling thresholds small.
VAE_BLOCK_OUT_CHANNELS = (8, 16, 16, 16)
VAE_SAMPLE_SIZE = 128
UNET_SAMPLE_SIZE = 16  # latent side; x 8 = the model's native size, 128 px
UNET_HEAD_DIM = 32  # attention head size in every transformer block (>= 8 for fused SDPA); heads = channels / 32

# SDXL base's scheduler (stabilityai/stable-diffusion-xl-base-1.0, scheduler/scheduler_config.json); SD1.5 uses the
# same betas (stable-diffusion-v1-5/stable-diffusion-v1-5 ships PNDM with these values) and gets an Euler scheduler
# as well.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    steps_offset=1,
    timestep_spacing="leading",
    interpolation_type="linear",
    use_karras_sigmas=False,
)

# Training text for the BPE merges: prompt-like English, so ordinary prompts tokenize into real words.
_BPE_CORPUS = """
a photo of a cat. a photo of a dog. a photograph of a cat sitting on a table. a dog running in the park.
a high resolution photo of a mountain landscape with snow and trees under a blue sky.
a painting of a house by the lake at sunset, oil on canvas, highly detailed.
a portrait of a woman with red hair, studio lighting, sharp focus, detailed skin.
a portrait of a man with a beard wearing a hat and a coat.
the city at night with lights, street, cars, buildings and people walking in the rain.
a beautiful garden with flowers, green grass, a small river and a wooden bridge.
an old castle on a hill, clouds in the sky, dramatic light, fantasy art.
a close up of a red apple on a white plate. a bowl of fruit on a kitchen table.
a forest in autumn with orange and yellow leaves, morning fog, sun rays through the trees.
a beach with blue water, white sand, palm trees and a boat on the ocean.
a bird on a branch. a horse in a field. a cow and a sheep on a farm. a fish in the sea.
a car on the road in the desert. a train on a bridge over a river. a plane in the clouds.
a child playing with a ball in the snow. two people sitting on a bench in the park.
a cup of coffee and a book on a desk near the window. a chair and a lamp in a room.
a black and white photo of a street in an old town. a colorful picture of a flower field.
the moon and the stars over the mountains. a lighthouse on the rocks by the sea.
a cute little kitten. a big brown dog. a tall tree. a small house. a long road. a dark night.
digital art, concept art, illustration, cinematic, realistic, photorealistic, masterpiece, best quality.
highly detailed texture, soft light, warm colors, bright, natural, beautiful, wide angle, landscape photography.
""" + " ".join(
    ["a photo of a cat"] * 8
    + ["a dog"] * 6
    + ["the sky"] * 4
    + ["a tree", "a house", "a photo", "detailed", "of the", "in the", "on the", "with a"] * 3
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level alphabet: every byte maps to one printable unicode character (openai/CLIP)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _train_bpe_merges(text: str, num_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE on `text` in CLIP's word form (byte symbols, last one suffixed "</w>"); ties broken by pair order."""
    byte_encoder = _bytes_to_unicode()
    words = Counter(w for w in "".join(c if c.isalpha() else " " for c in text.lower()).split())
    vocab: dict[tuple[str, ...], int] = {}
    for word, freq in words.items():
        symbols = [byte_encoder[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        vocab[tuple(symbols)] = freq

    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, freq in vocab.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: dict[tuple[str, ...], int] = {}
        for symbols, freq in vocab.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + freq
        vocab = merged
    return merges


def write_clip_vocab(directory: str | os.PathLike, merges: list[tuple[str, str]] | None = None) -> dict[str, int]:
    """Write a CLIP BPE's vocab.json and merges.txt into `directory`; return the vocab.

    Layout as openai/CLIP's `SimpleTokenizer`: the 256 byte symbols, their "</w>" variants, one token per merge,
    then "<|startoftext|>" and "<|endoftext|>" last (so <|endoftext|> has the highest id, as in the real 49,408).
    ``merges`` defaults to the small BPE trained here; the demo model passes CLIP's real 48,894 merges.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if merges is None:
        merges = _train_bpe_merges(_BPE_CORPUS, NUM_MERGES)
        if len(merges) != NUM_MERGES:
            raise RuntimeError(f"BPE corpus yields only {len(merges)} merges, need {NUM_MERGES}: extend _BPE_CORPUS")

    tokens = list(_bytes_to_unicode().values())
    tokens += [t + "</w>" for t in tokens]
    tokens += [a + b for a, b in merges]  # a merge that repeats a token keeps the first id (dict.fromkeys)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1), encoding="utf-8")
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    return vocab


def write_clip_tokenizer(directory: str | os.PathLike, pad_token: str = EOS_TOKEN,
                         merges: list[tuple[str, str]] | None = None) -> Path:
    """Write a CLIP BPE tokenizer (vocab.json, merges.txt, tokenizer_config, special tokens); return the dir.

    Small by default; ``merges`` as in :func:`write_clip_vocab`. Load it with `CLIPTokenizer.from_pretrained(directory)`
    (transformers 5.x ignores `CLIPTokenizer(vocab_file=..., merges_file=...)`).
    """
    directory = Path(directory)
    if pad_token not in write_clip_vocab(directory, merges):
        raise ValueError(
            f"pad_token={pad_token!r} is not in the tokenizer's vocab; use {EOS_TOKEN!r} or one byte symbol like '!'"
        )

    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": pad_token}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    config = dict(
        tokenizer_class="CLIPTokenizer",
        model_max_length=MODEL_MAX_LENGTH,
        do_lower_case=True,
        errors="replace",
        add_prefix_space=False,
        **special,
    )
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return directory


def _load_tokenizer(directory: Path, pad_token: str):
    """A CLIPTokenizer read back from files written by `write_clip_tokenizer`."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(write_clip_tokenizer(directory, pad_token=pad_token))


def _save_pipeline(pipe, directory: Path, tokenizer_pads: dict[str, str],
                   merges: list[tuple[str, str]] | None = None) -> None:
    """`save_pretrained`, then tokenizer folders in the hub's layout (vocab.json + merges.txt, as SD / SDXL ship them).

    transformers 5.x saves a CLIPTokenizer as tokenizer.json plus a tokenizer_config.json that records load-time
    kwargs; the hub layout makes loading go through the same vocab/merges conversion as a real SDXL checkpoint.
    """
    pipe.save_pretrained(directory, safe_serialization=True)
    for name, pad_token in tokenizer_pads.items():
        shutil.rmtree(directory / name)
        write_clip_tokenizer(directory / name, pad_token=pad_token, merges=merges)


def _text_encoder(tokenizer, seed: int, with_projection: bool, hidden_size: int = TEXT_HIDDEN_SIZE):
    """A tiny CLIP text transformer whose vocab and special ids match `tokenizer`."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        projection_dim=TEXT_PROJECTION_DIM,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        # The pooled output is read at the first eos id (CLIPTextTransformer): ids must be the tokenizer's.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model_cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_cls(config).eval()


def _vae(seed: int, scaling_factor: float):
    """A tiny AutoencoderKL with SD's downsampling factor 8 and 4 latent channels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_BLOCK_OUT_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_BLOCK_OUT_CHANNELS),
        block_out_channels=VAE_BLOCK_OUT_CHANNELS,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=VAE_SAMPLE_SIZE,
        scaling_factor=scaling_factor,
    ).eval()


def _unet_attention(unet_channels: tuple[int, ...]) -> dict:
    """Heads per block (diffusers' `attention_head_dim` counts heads) and norm groups that fit `unet_channels`."""
    if any(c <= 0 or c % UNET_HEAD_DIM for c in unet_channels):
        raise ValueError(
            f"unet_channels={unet_channels}: each entry must be a positive multiple of {UNET_HEAD_DIM}, e.g. (32, 64)"
        )
    heads = tuple(c // UNET_HEAD_DIM for c in unet_channels)
    groups = min(32, math.gcd(*unet_channels))
    return dict(attention_head_dim=heads, norm_num_groups=groups)


def _unet(unet_channels: tuple[int, ...], seed: int, **family):
    """A seeded two-block UNet at the tiny native size; ``family`` holds the SDXL- or SD1.5-specific blocks."""
    from diffusers import UNet2DConditionModel

    unet_channels = tuple(unet_channels)
    if len(unet_channels) != 2:
        raise ValueError(f"unet_channels={unet_channels}: the tiny UNets have 2 blocks, give 2 channel counts")
    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=UNET_SAMPLE_SIZE, in_channels=4, out_channels=4,
                                block_out_channels=unet_channels, layers_per_block=2,
                                **_unet_attention(unet_channels), **family).eval()


def _scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(**SCHEDULER_CONFIG)


@torch.random.fork_rng(devices=[])  # seeds each component without touching the caller's RNG state
def build_tiny_sdxl(directory: str | os.PathLike, seed: int = 0, unet_channels: tuple[int, ...] = (32, 64),
                    text_hidden_size_2: int = TEXT_HIDDEN_SIZE) -> Path:
    """Build a tiny random SDXL pipeline (two text encoders, `text_time` UNet) and `save_pretrained` it to `directory`.

    Args:
        directory (`str` or `os.PathLike`): where the pipeline is written (created if missing).
        seed (`int`, *optional*, defaults to 0): `torch.manual_seed` before each component: same seed, same bytes.
        unet_channels (`tuple[int, ...]`, *optional*, defaults to `(32, 64)`): the UNet's `block_out_channels`
            (multiples of 32); raise them, e.g. (128, 256), to make the UNet heavier for a benchmark.
        text_hidden_size_2 (`int`, *optional*, defaults to 32): the second text encoder's width. diffusers'
            single-file loader tells SDXL's two encoders apart by width (768 vs 1280), so a single-file test model
            needs two different ones (:mod:`cupscale_dist.testing.single_file`).
    """
    from diffusers import StableDiffusionXLPipeline

    directory = Path(directory)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = _load_tokenizer(Path(scratch) / "tokenizer", pad_token=EOS_TOKEN)
        tokenizer_2 = _load_tokenizer(Path(scratch) / "tokenizer_2", pad_token="!")  # as SDXL's tokenizer_2
    text_encoder = _text_encoder(tokenizer, seed, with_projection=False)
    text_encoder_2 = _text_encoder(tokenizer_2, seed, with_projection=True, hidden_size=text_hidden_size_2)
    unet = _unet(
        unet_channels, seed,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
        addition_embed_type="text_time",
        addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * ADDITION_TIME_EMBED_DIM + text_encoder_2.config.projection_dim,
    )

    pipe = StableDiffusionXLPipeline(
        vae=_vae(seed, scaling_factor=0.13025),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_scheduler(),
    )
    _save_pipeline(pipe, directory, {"tokenizer": EOS_TOKEN, "tokenizer_2": "!"})
    return directory


@torch.random.fork_rng(devices=[])  # seeds each component without touching the caller's RNG state
def build_tiny_sd15(directory: str | os.PathLike, seed: int = 0, unet_channels: tuple[int, ...] = (32, 64)) -> Path:
    """Build a tiny random SD1.5 pipeline (one text encoder, no safety checker) and `save_pretrained` it to `directory`.

    Args: as `build_tiny_sdxl`.
    """
    from diffusers import StableDiffusionPipeline

    directory = Path(directory)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = _load_tokenizer(Path(scratch) / "tokenizer", pad_token=EOS_TOKEN)
    text_encoder = _text_encoder(tokenizer, seed, with_projection=False)
    unet = _unet(
        unet_channels, seed,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_encoder.config.hidden_size,
    )

    pipe = StableDiffusionPipeline(
        vae=_vae(seed, scaling_factor=0.18215),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    _save_pipeline(pipe, directory, {"tokenizer": EOS_TOKEN})
    return directory


def build_tiny_lora(model_dir: str | os.PathLike, path: str | os.PathLike, seed: int = 0, rank: int = 4,
                    text_encoder: bool = True) -> Path:
    """A random LoRA for the tiny model in ``model_dir`` (its family's layout), saved with diffusers'
    ``save_lora_weights`` as one ``.safetensors`` file: peft adapters on the UNet's attention projections (and, with
    ``text_encoder``, on the first text encoder's), lora_B random so that the LoRA changes the output."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict
    from transformers import CLIPTextModel

    model_dir, path = Path(model_dir), Path(path)
    family_class = json.loads((model_dir / "model_index.json").read_text())["_class_name"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        layers = {"unet_lora_layers": get_peft_model_state_dict(unet)}
        if text_encoder:
            encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder")
            encoder.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                           target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
            layers["text_encoder_lora_layers"] = get_peft_model_state_dict(encoder)
    pipeline = StableDiffusionXLPipeline if family_class.startswith("StableDiffusionXL") else StableDiffusionPipeline
    pipeline.save_lora_weights(path.parent, weight_name=path.name, safe_serialization=True, **layers)
    return path
