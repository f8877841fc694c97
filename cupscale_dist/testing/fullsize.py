"""Full-size SDXL base and SD1.5 in the hub's layout: the published configs, seeded random weights (issue #9).

``build_full_size("sdxl" | "sd15", directory)`` writes what a snapshot of ``stabilityai/stable-diffusion-xl-base-1.0``
or ``stable-diffusion-v1-5/stable-diffusion-v1-5`` holds for the components a pipeline loads: ``model_index.json``
and every component's config as published, tokenizer folders, and each weighted component as ``*.safetensors``
(float32) and ``*.fp16.safetensors``. The shapes are the real ones (SDXL: a 2.6 B-parameter UNet, 13.9 GB full /
6.9 GB fp16), so loading, the dtype rules and the hub's file selection meet what users with real weights meet; the
values are noise, so the pictures are too.

Fast and light: each module is built on the ``meta`` device only for its tensor names, shapes and norm layers (no
initialiser runs over 2.6 B parameters); every tensor is drawn from a seeded generator and streamed into both files,
so at most one tensor (<= 253 MB) is in memory, not a 10 GB state dict.

The real CLIP vocabulary (49,408 BPE tokens) can't be downloaded here: tokenizer folders hold the project's small
trained BPE (:func:`cupscale_dist.testing.tiny.write_clip_vocab`) with the published tokenizer configs; the text
encoders keep ``vocab_size`` 49,408, and every id the small tokenizer makes is a valid row of their embedding.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .tiny import BOS_TOKEN, EOS_TOKEN, MODEL_MAX_LENGTH, write_clip_vocab

SDXL_BASE_ID = "stabilityai/stable-diffusion-xl-base-1.0"
SD15_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"

# ---------------------------------------------------------------------------------------------------------------
# The published configs. Written back as diffusers and transformers write them (sorted keys, indent 2), SDXL's come
# out at the sizes the hub lists to the byte (tests/models/test_hub.py SDXL_BASE_FILES; asserted in
# tests/models/test_full_size.py)
# ---------------------------------------------------------------------------------------------------------------
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json without `_class_name` / `_diffusers_version`: the
# architecture, as `UNet2DConditionModel(**SDXL_UNET_CONFIG)` takes it (bench/step_cost.py builds its UNet from it).
SDXL_UNET_CONFIG = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
    "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}
# stable-diffusion-v1-5 unet/config.json (diffusers 0.6.0 wrote only these keys).
SD15_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

# SD's KL autoencoder (factor 8, 4 latent channels): the same architecture in both repositories.
SD_VAE_ARCHITECTURE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
# SDXL's VAE asks to be run in float32 (`force_upcast`: it overflows in fp16) and scales latents by 0.13025.
SDXL_VAE_CONFIG = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.20.0.dev0", "_name_or_path": "../sdxl-vae/",
                   **SD_VAE_ARCHITECTURE, "force_upcast": True, "sample_size": 1024, "scaling_factor": 0.13025}
# SD1.5's VAE config predates both keys: diffusers fills in scaling_factor 0.18215 and force_upcast True.
SD15_VAE_CONFIG = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", **SD_VAE_ARCHITECTURE,
                   "sample_size": 512}

# openai/clip-vit-large-patch14's text tower: SDXL's text_encoder and SD1.5's text_encoder.
CLIP_VIT_L_TEXT = {
    "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
    "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
    "model_type": "clip_text_model", "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1,
    "projection_dim": 768, "vocab_size": 49408,
}
# OpenCLIP ViT-bigG/14's text tower with its projection: SDXL's text_encoder_2 (its pooled output feeds `text_time`).
CLIP_VIT_BIGG_TEXT = {
    **CLIP_VIT_L_TEXT, "architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu", "hidden_size": 1280,
    "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32, "projection_dim": 1280,
}
SDXL_TRANSFORMERS = {"torch_dtype": "float16", "transformers_version": "4.32.0.dev0"}
SD15_TRANSFORMERS = {"_name_or_path": "openai/clip-vit-large-patch14", "torch_dtype": "float32",
                     "transformers_version": "4.22.0.dev0"}

# The betas both models were trained with, and the options both scheduler configs state.
SD_SCHEDULER_COMMON = {
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None,
}
SDXL_SCHEDULER_CONFIG = {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0",
                         **SD_SCHEDULER_COMMON, "interpolation_type": "linear", "prediction_type": "epsilon",
                         "sample_max_value": 1.0, "timestep_spacing": "leading", "use_karras_sigmas": False}
SD15_SCHEDULER_CONFIG = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", **SD_SCHEDULER_COMMON}


def added_token(content: str) -> dict:
    """A special token as transformers 4.x wrote it into tokenizer_config.json."""
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


def clip_tokenizer_config(pad_token: str) -> dict:
    """tokenizer_config.json of SDXL's tokenizer (pad <|endoftext|>) and tokenizer_2 (pad "!", as OpenCLIP pads).

    SD1.5 ships the same CLIP ViT-L/14 tokenizer with these values; its file also names local paths
    (``name_or_path``), which loading does not use and are left out here.
    """
    return {"add_prefix_space": False, "bos_token": added_token(BOS_TOKEN), "clean_up_tokenization_spaces": True,
            "do_lower_case": True, "eos_token": added_token(EOS_TOKEN), "errors": "replace",
            "model_max_length": MODEL_MAX_LENGTH, "pad_token": pad_token, "tokenizer_class": "CLIPTokenizer",
            "unk_token": added_token(EOS_TOKEN)}


def special_tokens_map(tokenizer_config: dict) -> dict:
    """special_tokens_map.json: the config's special tokens, written without their ``__type``."""
    return {name: {k: v for k, v in token.items() if k != "__type"} if isinstance(token, dict) else token
            for name, token in tokenizer_config.items() if name in ("bos_token", "eos_token", "pad_token", "unk_token")}


@dataclass(frozen=True)
class Layout:
    """What a published repository holds for the components a pipeline loads."""

    repo_id: str
    model_index: dict  # model_index.json as published
    models: dict[str, dict]  # weighted component -> its config.json
    scheduler: dict  # scheduler/scheduler_config.json
    tokenizers: dict[str, dict]  # tokenizer folder -> its tokenizer_config.json (vocab and merges: the small BPE)


CLIP_TOKENIZER = ["transformers", "CLIPTokenizer"]
LAYOUTS = {
    "sdxl": Layout(
        repo_id=SDXL_BASE_ID,
        model_index={"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.19.0.dev0",
                     "add_watermarker": None, "force_zeros_for_empty_prompt": True,
                     "scheduler": ["diffusers", "EulerDiscreteScheduler"],
                     "text_encoder": ["transformers", "CLIPTextModel"],
                     "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                     "tokenizer": CLIP_TOKENIZER, "tokenizer_2": CLIP_TOKENIZER,
                     "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]},
        models={"unet": {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0",
                         **SDXL_UNET_CONFIG},
                "vae": SDXL_VAE_CONFIG,
                "text_encoder": {**CLIP_VIT_L_TEXT, **SDXL_TRANSFORMERS},
                "text_encoder_2": {**CLIP_VIT_BIGG_TEXT, **SDXL_TRANSFORMERS}},
        scheduler=SDXL_SCHEDULER_CONFIG,
        tokenizers={"tokenizer": clip_tokenizer_config(EOS_TOKEN), "tokenizer_2": clip_tokenizer_config("!")},
    ),
    # The index names the safety checker and its feature extractor as published (a user's snapshot has them);
    # their folders are not written: the project never loads them (backbones.FAMILY_COMPONENTS), and the checker
    # would be 1.2 GB more to write for nothing.
    "sd15": Layout(
        repo_id=SD15_ID,
        model_index={"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0",
                     "feature_extractor": ["transformers", "CLIPImageProcessor"],
                     "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
                     "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
                     "tokenizer": CLIP_TOKENIZER, "unet": ["diffusers", "UNet2DConditionModel"],
                     "vae": ["diffusers", "AutoencoderKL"]},
        models={"unet": SD15_UNET_CONFIG, "vae": SD15_VAE_CONFIG,
                "text_encoder": {**CLIP_VIT_L_TEXT, **SD15_TRANSFORMERS}},
        scheduler=SD15_SCHEDULER_CONFIG,
        tokenizers={"tokenizer": clip_tokenizer_config(EOS_TOKEN)},
    ),
}

# ---------------------------------------------------------------------------------------------------------------
# Seeded random weights, streamed into safetensors files
# ---------------------------------------------------------------------------------------------------------------
# (guess) Standard deviation of every weight matrix, kernel and embedding: CLIP's own `initializer_range`. It keeps
# a random 2.6 B-parameter net's activations finite in bf16/fp16 through its ~70 transformer blocks.
WEIGHT_STD = 0.02
NORM_LAYERS = (torch.nn.LayerNorm, torch.nn.GroupNorm)  # weight ones, bias zeros: the identity, as at initialisation
WEIGHT_FILE_STEM = {"diffusers": "diffusion_pytorch_model", "transformers": "model"}  # each library's file name
SAFETENSORS_DTYPE = {torch.float32: "F32", torch.float16: "F16"}
FULL_PRECISION = torch.float32  # the published `*.safetensors` hold float32, the `*.fp16.safetensors` float16


def weight_file(component_dir: Path, library: str, dtype: torch.dtype) -> Path:
    """``model.safetensors`` / ``diffusion_pytorch_model.fp16.safetensors``: the name each library loads."""
    variant = "" if dtype == FULL_PRECISION else ".fp16"
    return component_dir / f"{WEIGHT_FILE_STEM[library]}{variant}.safetensors"


def model_on_meta(library: str, class_name: str, config: dict) -> torch.nn.Module:
    """The module ``config`` describes, on the ``meta`` device: names and shapes without memory or initialisers."""
    cls = getattr(importlib.import_module(library), class_name)
    with torch.device("meta"):
        if library == "diffusers":
            return cls.from_config(config)
        return cls(cls.config_class.from_dict(config))


def init_kinds(model: torch.nn.Module) -> dict[str, str]:
    """How each saved tensor is filled: 'ones' (norm weights), 'zeros' (every bias) or 'normal'."""
    norm_weights = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, NORM_LAYERS)}
    return {name: "ones" if name in norm_weights else "zeros" if name.endswith(".bias") else "normal"
            for name in model.state_dict()}


def random_tensor(shape: tuple[int, ...], kind: str, generator: torch.Generator) -> torch.Tensor:
    """One float32 tensor of ``kind`` (see :func:`init_kinds`), drawn from ``generator``."""
    if kind == "ones":
        return torch.ones(shape)
    if kind == "zeros":
        return torch.zeros(shape)
    return torch.empty(shape).normal_(0.0, WEIGHT_STD, generator=generator)


def safetensors_header(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> bytes:
    """A safetensors file's first bytes, as the safetensors library writes them: u64 length, compact JSON with
    ``{"format": "pt"}`` metadata and the tensors in name order, space-padded to 8 bytes. Same names, shapes and
    dtype as the published files give the published sizes exactly."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in sorted(shapes):
        size = math.prod(shapes[name]) * itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPE[dtype], "shape": list(shapes[name]),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def write_random_weights(model: torch.nn.Module, files: dict[torch.dtype, Path], seed: int) -> None:
    """Seeded random values for every tensor of ``model.state_dict()``, streamed into one safetensors file per
    dtype: the files hold the same draws, each rounded to its dtype; one tensor is in memory at a time."""
    state = model.state_dict()
    if any(not t.dtype.is_floating_point for t in state.values()):
        raise ValueError(f"{type(model).__name__} saves integer tensors; random_tensor only draws float weights")
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    kinds = init_kinds(model)
    generator = torch.Generator().manual_seed(seed)
    with contextlib.ExitStack() as stack:
        outs = {dtype: stack.enter_context(open(path, "wb")) for dtype, path in files.items()}
        for dtype, out in outs.items():
            out.write(safetensors_header(shapes, dtype))
        for name in sorted(shapes):  # the header's order
            tensor = random_tensor(shapes[name], kinds[name], generator)
            for dtype, out in outs.items():
                out.write(memoryview(tensor.to(dtype).numpy()).cast("B"))  # little-endian, as safetensors stores


def component_seed(seed: int, component: str) -> int:
    """Each component's own stream: the same seed gives the same bytes, whatever else is written."""
    return zlib.crc32(f"{seed}:{component}".encode())


# ---------------------------------------------------------------------------------------------------------------
# The layout on disk
# ---------------------------------------------------------------------------------------------------------------
def write_json(path: Path, value: dict) -> None:
    """As diffusers and transformers write configs: sorted keys, indent 2, a final newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_tokenizer(folder: Path, tokenizer_config: dict) -> None:
    """The small trained BPE's vocab.json and merges.txt, with the published tokenizer config and special tokens."""
    if tokenizer_config["pad_token"] not in write_clip_vocab(folder):
        raise ValueError(f"{folder.name}: pad token {tokenizer_config['pad_token']!r} is not in the vocab")
    write_json(folder / "tokenizer_config.json", tokenizer_config)
    write_json(folder / "special_tokens_map.json", special_tokens_map(tokenizer_config))


def write_model(directory: Path, layout: Layout, component: str, seed: int, full_precision: bool) -> None:
    """One weighted component: its config.json and its fp16 (and float32) weights."""
    library, class_name = layout.model_index[component]
    config = layout.models[component]
    write_json(directory / component / "config.json", config)
    dtypes = (FULL_PRECISION, torch.float16) if full_precision else (torch.float16,)
    files = {dtype: weight_file(directory / component, library, dtype) for dtype in dtypes}
    write_random_weights(model_on_meta(library, class_name, config), files, component_seed(seed, component))


def build_full_size(family: str, directory: str | os.PathLike, seed: int = 0, full_precision: bool = True) -> Path:
    """Write SDXL base (``family='sdxl'``) or SD1.5 (``'sd15'``) at full size, in the hub's layout, to ``directory``.

    Args:
        family (`str`): 'sdxl' (stabilityai/stable-diffusion-xl-base-1.0) or 'sd15'
            (stable-diffusion-v1-5/stable-diffusion-v1-5).
        directory (`str` or `os.PathLike`): where the layout is written (created if missing).
        seed (`int`, *optional*, defaults to 0): same seed, same bytes.
        full_precision (`bool`, *optional*, defaults to True): also write the float32 ``*.safetensors`` beside the
            ``*.fp16.safetensors`` (SDXL: 13.9 GB more on disk, most of the build time).

    ``model_index.json`` is written last: a directory a failed build left behind is never taken for a model.
    """
    if family not in LAYOUTS:
        raise ValueError(f"family={family!r} is not one of {sorted(LAYOUTS)}; use 'sdxl' or 'sd15'")
    layout, directory = LAYOUTS[family], Path(directory)
    write_json(directory / "scheduler" / "scheduler_config.json", layout.scheduler)
    for folder, tokenizer_config in layout.tokenizers.items():
        write_tokenizer(directory / folder, tokenizer_config)
    for component in layout.models:  # one at a time: only one component's tensors ever exist
        write_model(directory, layout, component, seed, full_precision)
    write_json(directory / "model_index.json", layout.model_index)
    return directory
