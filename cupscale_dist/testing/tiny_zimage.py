"""A tiny, seeded, random-weight Z-Image(-Turbo) pipeline built from configs (issue 36's test model).

As :mod:`cupscale_dist.testing.tiny_flux` does for FLUX.1: nothing is downloaded, every component is built from a
config under ``torch.manual_seed(seed)`` and written with ``ZImagePipeline.save_pretrained``, so it loads back through
the same ``from_pretrained`` path a hub id or a local directory takes (``model_index.json`` names ``Qwen3Model`` and
``Qwen2Tokenizer``, as Tongyi-MAI/Z-Image-Turbo's does).

Shapes follow Z-Image where the method depends on them (docs/zimage-notes.md has the real values and their sources):

* ``ZImageTransformer2DModel`` over 2x2 latent patches of 16 channels (``all_patch_size`` (2,), ``all_f_patch_size``
  (1,)), 3-axis RoPE whose head dim splits over (caption/frame, height, width) as Z-Image's (32, 48, 48) splits 128,
  RoPE theta 256, ``t_scale`` 1000, noise and context refiner blocks before the single-stream layers;
* ``axes_lens``, the length of the precomputed RoPE table per axis, is a parameter: Z-Image-Turbo's is (1536, 512, 512)
  (512 patches = 8192 px); the tests pass :data:`SMALL_AXES_LENS` to run past the table cheaply;
* a Qwen3 text encoder (``Qwen3Model``, grouped-query attention, 3 layers so that the pipeline's ``hidden_states[-2]``
  is neither the embeddings nor the last layer) whose width is the transformer's ``cap_feat_dim``;
* a byte-level BPE tokenizer in Qwen2's layout (``Qwen2Tokenizer``: GPT-2 byte alphabet, merges trained here with
  ``tokenizers`` on :data:`cupscale_dist.testing.tiny._BPE_CORPUS`), ``<|im_start|>`` / ``<|im_end|>`` special
  tokens and a ChatML chat template written here that renders what Qwen3's does for the pipeline's call (a user
  message, ``add_generation_prompt=True``; ``enable_thinking=False`` adds Qwen3's empty think block);
* FLUX.1's VAE shape and factors (16 channels, ``scaling_factor`` 0.3611, ``shift_factor`` 0.1159: Z-Image ships
  FLUX.1's VAE), built by :func:`cupscale_dist.testing.tiny_flux._flux_vae`;
* ``FlowMatchEulerDiscreteScheduler`` with Z-Image-Turbo's fixed shift 3.0, no dynamic shifting.

Everything else is small: a build takes about a second on 2 CPU cores (most of it the imports).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

# The tiny transformer: width 32, 2 heads of 16 dims; RoPE splits the head dim (4, 6, 6) over (caption/frame, h, w),
# the proportions of Z-Image's (32, 48, 48) over 128, each axis even.
DIM = 32
HEADS = 2
AXES_DIMS = (4, 6, 6)
ROPE_THETA = 256.0  # Z-Image's rope_theta
T_SCALE = 1000.0  # Z-Image's t_scale: the transformer embeds t * 1000
LATENT_CHANNELS = 16
PATCH = 2
# RoPE table lengths: 256 caption positions (captions up to 255 tokens padded to 32s, the image after them) and 32
# patches (64 latent px = 512 px) per image side. SMALL_AXES_LENS runs out at 8 patches (16 latent px, 128 px).
AXES_LENS = (256, 32, 32)
SMALL_AXES_LENS = (256, 8, 8)

# The tiny Qwen3: width = the transformer's cap_feat_dim.
TEXT_HIDDEN_SIZE = 32
TEXT_LAYERS = 3
MAX_SEQUENCE_LENGTH = 64  # the tiny pipeline's caption cap (ZImagePipeline's default is 512)

# Tongyi-MAI/Z-Image-Turbo scheduler/scheduler_config.json: a fixed shift, no dynamic shifting.
TURBO_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
BPE_VOCAB_SIZE = 600  # 256 byte symbols, <|endoftext|>, and ~340 merges: common words whole, others in pieces

# ChatML as Qwen3's template renders it for plain text messages (no tools, no reasoning content): each message
# "<|im_start|>{role}\n{content}<|im_end|>\n"; the generation prompt "<|im_start|>assistant\n", followed by an empty
# think block only when enable_thinking is false. ZImagePipeline passes enable_thinking=True: no think block.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def chat_text(prompt: str) -> str:
    """The text ZImagePipeline tokenizes for ``prompt`` (its ``_encode_prompt``: one user message, generation prompt,
    ``enable_thinking=True``), as this module's template and Qwen3's render it."""
    return f"{IM_START}user\n{prompt}{IM_END}\n{IM_START}assistant\n"


def build_qwen_tokenizer(directory: str | os.PathLike):
    """A Qwen2-layout byte-level BPE tokenizer (vocab + merges trained here, offline) with ChatML special tokens and
    :data:`CHAT_TEMPLATE`, written to ``directory`` and loaded back from there."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    from .tiny import _BPE_CORPUS

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator([_BPE_CORPUS], trainer=trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[ENDOFTEXT],
        show_progress=False))
    model = json.loads(bpe.to_str())["model"]  # deterministic: same corpus, same vocab and merges
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(pair) for pair in model["merges"]],
                               unk_token=ENDOFTEXT, eos_token=IM_END, pad_token=ENDOFTEXT, model_max_length=131072)
    tokenizer.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    # Qwen's hub folders also hold the slow files (vocab.json, merges.txt), which the driver looks for
    Path(directory, "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False, sort_keys=True))
    Path(directory, "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in model["merges"]))
    return Qwen2Tokenizer.from_pretrained(directory)


def qwen3_text_encoder(tokenizer, seed: int):
    """A tiny ``Qwen3Model`` (what Z-Image-Turbo's model_index.json names) over ``tokenizer``'s vocab."""
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN_SIZE, intermediate_size=48,
                         num_hidden_layers=TEXT_LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         max_position_embeddings=512, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.convert_tokens_to_ids(IM_END))
    torch.manual_seed(seed)
    return Qwen3Model(config).eval()


def zimage_transformer(seed: int, axes_lens=AXES_LENS, n_layers: int = 2, n_refiner_layers: int = 1):
    """The tiny ``ZImageTransformer2DModel`` (also what the fact tests build directly)."""
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(seed)
    return ZImageTransformer2DModel(all_patch_size=(PATCH,), all_f_patch_size=(1,), in_channels=LATENT_CHANNELS,
                                    dim=DIM, n_layers=n_layers, n_refiner_layers=n_refiner_layers, n_heads=HEADS,
                                    n_kv_heads=HEADS, norm_eps=1e-5, qk_norm=True, cap_feat_dim=TEXT_HIDDEN_SIZE,
                                    rope_theta=ROPE_THETA, t_scale=T_SCALE, axes_dims=list(AXES_DIMS),
                                    axes_lens=list(axes_lens)).eval()


@torch.random.fork_rng(devices=[])  # seeds each component without touching the caller's RNG state
def build_tiny_zimage(directory: str | os.PathLike, seed: int = 0, axes_lens=AXES_LENS) -> Path:
    """Build a tiny random Z-Image-Turbo-shaped ``ZImagePipeline`` and ``save_pretrained`` it to ``directory``.

    Args:
        directory (`str` or `os.PathLike`): where the pipeline is written (created if missing).
        seed (`int`, *optional*, defaults to 0): ``torch.manual_seed`` before each component: same seed, same bytes.
        axes_lens (`tuple[int, int, int]`, *optional*, defaults to :data:`AXES_LENS`): the transformer's RoPE table
            lengths (caption/frame, height, width) in positions; :data:`SMALL_AXES_LENS` ends the image axes at 8
            patches (128 px) so that running past the table costs nothing.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    from .tiny_flux import _flux_vae

    directory = Path(directory)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = build_qwen_tokenizer(Path(scratch) / "tokenizer")
        pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**TURBO_SCHEDULER), vae=_flux_vae(seed),
                              text_encoder=qwen3_text_encoder(tokenizer, seed), tokenizer=tokenizer,
                              transformer=zimage_transformer(seed, axes_lens))
        pipe.save_pretrained(directory, safe_serialization=True)
        for name in ("vocab.json", "merges.txt"):  # save_pretrained writes tokenizer.json alone
            shutil.copyfile(Path(scratch) / "tokenizer" / name, directory / "tokenizer" / name)
    return directory


def build_tiny_zimage_lora(model_dir: str | os.PathLike, path: str | os.PathLike, seed: int = 0, rank: int = 4,
                           layout: str = "peft") -> Path:
    """A random LoRA for the tiny Z-Image in ``model_dir``: peft adapters on the attention projections and the
    feed-forward of every block (lora_B random, so it changes the output), saved with
    ``ZImagePipeline.save_lora_weights`` as one file (``layout`` 'peft'), or the same factors in kohya's names
    (``lora_unet_layers_0_attention_to_q.lora_down.weight`` with an alpha of ``rank``: ``layout`` 'kohya') or in
    ai-toolkit's / ComfyUI's (``diffusion_model.layers.0.attention.to_q.lora_A.weight``, alphas: ``layout`` 'comfy')."""
    from diffusers import ZImagePipeline, ZImageTransformer2DModel
    from peft import LoraConfig, get_peft_model_state_dict

    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = ZImageTransformer2DModel.from_pretrained(model_dir, subfolder="transformer")
        transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                           target_modules=["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"]))
        layers = get_peft_model_state_dict(transformer)
    if layout == "peft":
        ZImagePipeline.save_lora_weights(path.parent, weight_name=path.name, safe_serialization=True,
                                         transformer_lora_layers=layers)
        return path
    from safetensors.torch import save_file

    if layout not in ("kohya", "comfy"):
        raise ValueError(f"layout={layout!r}: use peft, kohya or comfy")
    out = {}
    for key, tensor in layers.items():  # 'layers.0.attention.to_q.lora_A.weight'
        module, factor = key.rsplit(".lora_", 1)
        if layout == "kohya":
            name = "lora_unet_" + module.replace(".", "_")
            out[f"{name}.lora_{'down' if factor.startswith('A') else 'up'}.weight"] = tensor.contiguous()
        else:
            name = "diffusion_model." + module
            out[f"{name}.lora_{factor}"] = tensor.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(out, str(path))
    return path


@torch.random.fork_rng(devices=[])
def build_tiny_zimage_controlnet(directory: str | os.PathLike, seed: int = 0, refiner: str | None = None,
                                 control_in_dim: int = LATENT_CHANNELS) -> Path:
    """A ``ZImageControlNetModel`` for the tiny Z-Image (control samples after both of its layers; ``refiner``:
    the 2.x models' ``add_control_noise_refiner``, with samples after its one noise-refiner block), saved with
    ``save_pretrained``. diffusers zero-initialises the samples' projections (a fresh ControlNet changes nothing);
    here they are random, so the control image visibly steers the output."""
    from diffusers import ZImageControlNetModel

    torch.manual_seed(seed)
    controlnet = ZImageControlNetModel(control_layers_places=[0, 1], control_in_dim=control_in_dim,
                                       control_refiner_layers_places=[0] if refiner else None,
                                       add_control_noise_refiner=refiner, all_patch_size=(PATCH,),
                                       all_f_patch_size=(1,), dim=DIM, n_refiner_layers=1, n_heads=HEADS,
                                       n_kv_heads=HEADS, norm_eps=1e-5, qk_norm=True)
    for name, module in controlnet.named_modules():
        if name.endswith(("before_proj", "after_proj")):
            torch.nn.init.normal_(module.weight, std=0.2)
    controlnet.save_pretrained(directory, safe_serialization=True)
    return Path(directory)
