"""A diffusers pipeline written back as one single-file checkpoint in the original Stability layout, for tests.

The inverse of diffusers' single-file conversion (``diffusers/loaders/single_file_utils.py``:
``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``,
``convert_open_clip_checkpoint``): UNet under ``model.diffusion_model.`` in input/middle/output blocks, VAE under
``first_stage_model.`` with 1x1-conv attention, the CLIP encoder under ``cond_stage_model.transformer.`` (SD1.5) or
``conditioner.embedders.0.transformer.`` (SDXL), SDXL's OpenCLIP encoder under ``conditioner.embedders.1.model.``
with fused ``in_proj`` and a transposed ``text_projection``. Loading the file back must give the same weights.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
UNET_LAYERS = {  # diffusers -> original, the layers outside the blocks
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
}
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_LAYERS = {"conv_norm_out": "norm_out"}  # encoder./decoder. conv_in, conv_out keep their names
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPEN_CLIP_LAYERS = {"text_model.embeddings.position_embedding.weight": "positional_embedding",
                    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                    "text_model.final_layer_norm.weight": "ln_final.weight",
                    "text_model.final_layer_norm.bias": "ln_final.bias"}
OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


def _split(key: str) -> tuple[str, str]:
    """'norm1.weight' -> ('norm1', 'weight'); 'to_out.0.bias' -> ('to_out.0', 'bias')."""
    module, _, leaf = key.rpartition(".")
    return module, leaf


def unet_key(key: str, config: dict) -> str:
    """One diffusers UNet key in the original layout (inverse of ``convert_ldm_unet_checkpoint``)."""
    per_block = config["layers_per_block"] + 1  # resnets (and attentions) per block, plus its down/upsampler
    module, leaf = _split(key)
    if module in UNET_LAYERS:
        return f"{UNET_LAYERS[module]}.{leaf}"

    def resnet(rest: str) -> str:
        head, _, tail = rest.partition(".")
        return f"{UNET_RESNET.get(head, head)}.{tail}"

    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$", key):
        block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + block * per_block + j
        return f"input_blocks.{index}.0.{resnet(rest)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)$", key):
        return f"input_blocks.{1 + int(m[1]) * per_block + per_block - 1}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)$", key):
        return f"middle_block.{2 * int(m[1])}.{resnet(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.+)$", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$", key):
        block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = block * per_block + j
        return f"output_blocks.{index}.0.{resnet(rest)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)$", key):
        block = int(m[1])
        has_attention = config["up_block_types"][block].startswith("CrossAttn")
        return f"output_blocks.{block * per_block + per_block - 1}.{2 if has_attention else 1}.conv.{m[2]}"
    raise KeyError(f"no original-layout name for UNet key {key}")


def vae_key(key: str, config: dict) -> tuple[str, bool]:
    """One diffusers VAE key in the original layout, and whether it is a linear attention weight stored as a 1x1
    conv there (inverse of ``convert_ldm_vae_checkpoint``)."""
    part, _, key = key.partition(".")  # encoder / decoder / quant_conv ...
    if part in ("quant_conv", "post_quant_conv"):
        return f"{part}.{key}", False
    module, leaf = _split(key)

    def resnet(rest: str) -> str:
        return rest.replace("conv_shortcut", "nin_shortcut")

    if module in VAE_LAYERS:
        return f"{part}.{VAE_LAYERS[module]}.{leaf}", False
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)$", key):
        return f"{part}.mid.block_{int(m[1]) + 1}.{resnet(m[2])}", False
    if m := re.match(r"mid_block\.attentions\.0\.(.+)$", module):
        name = VAE_ATTENTION[m[1]]
        return f"{part}.mid.attn_1.{name}.{leaf}", name != "norm" and leaf == "weight"
    if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", key):
        return f"{part}.down.{m[1]}.block.{m[2]}.{resnet(m[3])}", False
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)$", key):
        return f"{part}.down.{m[1]}.downsample.conv.{m[2]}", False
    last = len(config["up_block_types"]) - 1  # the original counts decoder blocks from the lowest resolution
    if m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", key):
        return f"{part}.up.{last - int(m[1])}.block.{m[2]}.{resnet(m[3])}", False
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)$", key):
        return f"{part}.up.{last - int(m[1])}.upsample.conv.{m[2]}", False
    return f"{part}.{key}", False  # conv_in, conv_out


def clip_state(state: dict, prefix: str) -> dict:
    """A transformers CLIP text encoder in the original layout: ``prefix`` + its ``text_model.`` keys."""
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in state.items() if not k.endswith("position_ids")}


def open_clip_state(state: dict, prefix: str) -> dict:
    """A transformers CLIPTextModelWithProjection in OpenCLIP's layout (inverse of ``convert_open_clip_checkpoint``)."""
    out = {prefix + "text_projection": state["text_projection.weight"].T.contiguous()}
    out.update({prefix + OPEN_CLIP_LAYERS[k]: v for k, v in state.items() if k in OPEN_CLIP_LAYERS})
    layers = {int(m[1]) for k in state if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))}
    for i in sorted(layers):
        inner = f"text_model.encoder.layers.{i}."
        block = f"{prefix}transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[block + f"attn.in_proj_{leaf}"] = torch.cat([state[inner + f"self_attn.{p}_proj.{leaf}"]
                                                             for p in ("q", "k", "v")])
            for ours, theirs in OPEN_CLIP_LAYER.items():
                out[block + f"{theirs}.{leaf}"] = state[inner + f"{ours}.{leaf}"]
    return out


def original_state_dict(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every weight of the diffusers pipeline in ``model_dir`` under its original single-file name."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    model_dir = Path(model_dir)
    sdxl = json.loads((model_dir / "model_index.json").read_text())["_class_name"].startswith("StableDiffusionXL")
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae")
    out = {UNET_PREFIX + unet_key(k, unet.config): v for k, v in unet.state_dict().items()}
    for k, v in vae.state_dict().items():
        name, conv = vae_key(k, vae.config)
        out[VAE_PREFIX + name] = v[:, :, None, None] if conv else v
    text = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder").state_dict()
    if sdxl:
        out.update(clip_state(text, "conditioner.embedders.0.transformer."))
        text_2 = CLIPTextModelWithProjection.from_pretrained(model_dir, subfolder="text_encoder_2").state_dict()
        out.update(open_clip_state(text_2, "conditioner.embedders.1.model."))
    else:
        out.update(clip_state(text, "cond_stage_model.transformer."))
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def save_single_file(model_dir: str | Path, path: str | Path) -> Path:
    """Write the pipeline in ``model_dir`` as one original-layout ``.safetensors`` checkpoint at ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file(original_state_dict(model_dir), str(path))
    return path


def copy_configs(model_dir: str | Path, out_dir: str | Path) -> Path:
    """The configs and tokenizers of a diffusers directory without its weights (a ``model_config`` directory)."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    for file in model_dir.rglob("*"):
        if file.is_file() and file.suffix in (".json", ".txt"):
            target = out_dir / file.relative_to(model_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, target)
    return out_dir


def bfl_transformer_state(state: dict) -> dict[str, torch.Tensor]:
    """A diffusers FluxTransformer2DModel state dict in Black Forest Labs' names (the inverse of
    :func:`cupscale_dist.models.backbones.flux.single_file.transformer_state`, through the same layer table)."""
    from ..models.backbones.flux.single_file import layer_table

    def count(prefix: str) -> int:
        return len({key.split(".")[1] for key in state if key.startswith(prefix)})

    out = {}
    for name, ours, how in layer_table(count("transformer_blocks."), count("single_transformer_blocks.")):
        leaves = ("",) if name.endswith(".scale") else (".weight", ".bias")
        for leaf in leaves:
            keys = [module + ("" if name.endswith(".scale") else leaf) for module in ours]
            if keys[0] not in state:
                continue
            if how == "swap":
                scale, shift = state[keys[0]].chunk(2, dim=0)
                out[name + leaf] = torch.cat([shift, scale], dim=0)
            else:
                out[name + leaf] = torch.cat([state[key] for key in keys], dim=0)
    return out


def save_flux_single_file(model_dir: str | Path, path: str | Path, layout: str = "bfl") -> Path:
    """Write the tiny Flux pipeline in ``model_dir`` as one ``.safetensors`` file: ``bfl`` (the transformer in
    BFL's names), ``comfy`` (the same under ``model.diffusion_model.``) or ``comfy-all-in-one`` (plus the VAE in the
    original LDM layout under ``vae.`` and the CLIP-L and T5 encoders under ``text_encoders.*.transformer.``)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, T5EncoderModel

    from ..models.backbones.flux.header import CLIP_PREFIX, COMFY_PREFIX, T5_PREFIX, VAE_PREFIX as FLUX_VAE_PREFIX

    transformer = FluxTransformer2DModel.from_pretrained(model_dir, subfolder="transformer")
    prefix = "" if layout == "bfl" else COMFY_PREFIX
    out = {prefix + k: v for k, v in bfl_transformer_state(transformer.state_dict()).items()}
    if layout == "comfy-all-in-one":
        vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae")
        for k, v in vae.state_dict().items():
            name, conv = vae_key(k, vae.config)
            out[FLUX_VAE_PREFIX + name] = v[:, :, None, None] if conv else v
        text = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder").state_dict()
        out.update(clip_state(text, CLIP_PREFIX))
        t5 = T5EncoderModel.from_pretrained(model_dir, subfolder="text_encoder_2").state_dict()
        out.update({T5_PREFIX + k: v for k, v in t5.items() if k != "encoder.embed_tokens.weight"})  # tied to shared
    elif layout not in ("bfl", "comfy"):
        raise ValueError(f"layout={layout!r}: use bfl, comfy or comfy-all-in-one")
    path = Path(path)
    save_file({k: v.detach().contiguous().clone() for k, v in out.items()}, str(path))
    return path


# diffusers -> Tongyi-MAI's original names of the Z-Image transformer (the inverse of diffusers'
# convert_z_image_transformer_checkpoint_to_diffusers; to_q/to_k/to_v are fused into attention.qkv)
ZIMAGE_ORIGINAL = {"all_final_layer.2-1.": "final_layer.", "all_x_embedder.2-1.": "x_embedder.",
                   ".attention.to_out.0.": ".attention.out.", ".attention.norm_k.": ".attention.k_norm.",
                   ".attention.norm_q.": ".attention.q_norm."}


def original_zimage_state(state: dict) -> dict[str, torch.Tensor]:
    """A diffusers ZImageTransformer2DModel state dict in Tongyi-MAI's original names (``attention.qkv`` fused)."""
    out = {}
    for key, tensor in state.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue  # fused into attention.qkv with to_q
        if ".attention.to_q." in key:
            parts = [state[key.replace(".to_q.", f".to_{p}.")] for p in "qkv"]
            out[key.replace(".attention.to_q.", ".attention.qkv.")] = torch.cat(parts, dim=0)
            continue
        for ours, theirs in ZIMAGE_ORIGINAL.items():
            key = key.replace(ours, theirs)
        out[key] = tensor
    return out


def save_zimage_single_file(model_dir: str | Path, path: str | Path, prefix: str = "") -> Path:
    """Write the tiny Z-Image's transformer in ``model_dir`` as one ``.safetensors`` file in the original key layout
    (``z_image_turbo_bf16.safetensors``'s), under ``prefix`` ('' or ComfyUI's ``model.diffusion_model.``)."""
    from diffusers import ZImageTransformer2DModel
    from safetensors.torch import save_file

    transformer = ZImageTransformer2DModel.from_pretrained(model_dir, subfolder="transformer")
    out = {prefix + k: v for k, v in original_zimage_state(transformer.state_dict()).items()}
    path = Path(path)
    save_file({k: v.detach().contiguous().clone() for k, v in out.items()}, str(path))
    return path
