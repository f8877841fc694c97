"""Single-file Flux checkpoints: BFL's transformer file, ComfyUI's diffusion-model file and ComfyUI's all-in-one.

Three layouts, told apart from the header alone (the driver reads no weights):

* ``bfl``: the transformer in Black Forest Labs' own names (``double_blocks.0.img_attn.qkv.weight``, ...), as
  ``flux1-dev.safetensors`` ships;
* ``comfy``: the same keys under ``model.diffusion_model.`` (ComfyUI's ``diffusion_models/`` files);
* ``comfy-all-in-one``: that plus the VAE in the original LDM layout under ``vae.`` and the two text encoders in
  transformers' names under ``text_encoders.clip_l.transformer.`` and ``text_encoders.t5xxl.transformer.``
  (ComfyUI's ``checkpoints/`` files).

FLUX.1-dev is told from -schnell by its guidance embedding (``guidance_in``). A component the file lacks (the VAE
and text encoders of a transformer-only file) is loaded from ``model_config``, a diffusers Flux directory with
those weights; without one such a file is refused in one line before any model loads.

The transformer's keys are converted here (:func:`transformer_state`) rather than by diffusers'
``convert_flux_transformer_checkpoint_to_diffusers``: that one fixes the width at FLUX.1's 3072, so it cannot load
a model of other widths (the tests' tiny Flux). ``tests/models/test_flux_single_file.py`` checks that both converters
give the same tensors at FLUX.1's own width. The VAE goes through diffusers' own LDM conversion.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ....errors import UserError, shown
from .header import COMFY_PREFIX, FILE_COMPONENTS, VAE_PREFIX, components_in_file, flux_layout

# BFL name -> diffusers names of one transformer layer, and how the tensor maps: "same"; "qkv" (equal thirds, in
# q, k, v order); "qkv_mlp" (single blocks' linear1: q, k, v of the model width, then the MLP's input); "swap"
# (the final AdaLN: BFL stores (shift, scale), diffusers (scale, shift)).
TOP_LAYERS = {
    "time_in.in_layer": ("time_text_embed.timestep_embedder.linear_1",),
    "time_in.out_layer": ("time_text_embed.timestep_embedder.linear_2",),
    "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
    "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
    "guidance_in.in_layer": ("time_text_embed.guidance_embedder.linear_1",),
    "guidance_in.out_layer": ("time_text_embed.guidance_embedder.linear_2",),
    "txt_in": ("context_embedder",),
    "img_in": ("x_embedder",),
    "final_layer.linear": ("proj_out",),
}
DOUBLE_BLOCK_LAYERS = {
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
}
DOUBLE_BLOCK_NORMS = {  # RMSNorm scales: BFL ".scale", diffusers ".weight"
    "img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k",
}
SINGLE_BLOCK_LAYERS = {
    "modulation.lin": ("norm.linear",),
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
}
SINGLE_BLOCK_NORMS = {"norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k"}


def layer_table(num_layers: int, num_single_layers: int) -> list[tuple[str, tuple[str, ...], str]]:
    """Every transformer layer: (BFL module, diffusers modules, how the tensor maps); norms carry their leaf."""
    table = [(bfl, ours, "same") for bfl, ours in TOP_LAYERS.items()]
    table.append(("final_layer.adaLN_modulation.1", ("norm_out.linear",), "swap"))
    for i in range(num_layers):
        for bfl, ours in DOUBLE_BLOCK_LAYERS.items():
            table.append((f"double_blocks.{i}.{bfl}", tuple(f"transformer_blocks.{i}.{o}" for o in ours),
                          "qkv" if len(ours) == 3 else "same"))
        for bfl, ours in DOUBLE_BLOCK_NORMS.items():
            table.append((f"double_blocks.{i}.{bfl}.scale", (f"transformer_blocks.{i}.{ours}.weight",), "same"))
    for i in range(num_single_layers):
        for bfl, ours in SINGLE_BLOCK_LAYERS.items():
            table.append((f"single_blocks.{i}.{bfl}", tuple(f"single_transformer_blocks.{i}.{o}" for o in ours),
                          "qkv_mlp" if len(ours) == 4 else "same"))
        for bfl, ours in SINGLE_BLOCK_NORMS.items():
            table.append((f"single_blocks.{i}.{bfl}.scale", (f"single_transformer_blocks.{i}.{ours}.weight",),
                          "same"))
    return table


def expected_ranks(num_layers: int, num_single_layers: int) -> dict[str, int]:
    """Every key the conversion reads (BFL names) -> the rank its tensor must have: linear weights 2, biases and
    RMSNorm scales 1."""
    ranks = {}
    for name, _, _ in layer_table(num_layers, num_single_layers):
        ranks.update({name: 1} if name.endswith(".scale") else {f"{name}.weight": 2, f"{name}.bias": 1})
    return ranks


def transformer_key_problem(keys: dict[str, tuple[int, ...]]) -> str | None:
    """Why a Flux file's transformer keys (BFL names, any prefix removed; key -> shape, from the header) would not
    convert as they are, or None: blocks numbered with gaps, keys the conversion would silently drop (another
    family's, ComfyUI's scaled-fp8 scales), tensors of the wrong rank (a 0-d ``img_in.weight``) or fused layers that
    do not split by the file's width. Shapes against the model's config are the workers' load's to check."""
    counts = []
    for prefix in ("double_blocks.", "single_blocks."):
        found = {key.split(".")[1] for key in keys if key.startswith(prefix) and key.count(".") >= 2}
        if any(not index.isdigit() or len(index) > 6 for index in found):
            odd = next(index for index in sorted(found) if not index.isdigit() or len(index) > 6)
            return f"names a block {prefix}{shown(odd)}, which is no block number"
        numbers = sorted(int(index) for index in found)
        if numbers != list(range(len(numbers))):
            gap = next(n for n in range(len(numbers) + 1) if n not in numbers)
            return f"numbers its {prefix[:-1]} with a gap ({prefix}{gap} is missing of {len(numbers)})"
        counts.append(len(numbers))  # other counts than the config's: the workers' load says so in one line
    ranks = expected_ranks(*counts)
    unknown = sorted(set(keys) - set(ranks))
    if unknown:
        return (f"holds {len(unknown)} key(s) no FLUX.1 transformer has (e.g. {shown(unknown[0])}), which the "
                "conversion would drop")
    for key, shape in keys.items():
        if len(shape) != ranks[key]:
            return f"has {key} of shape {shown(tuple(shape), 30)} (expected {ranks[key]} dimensions)"
    if "img_in.weight" not in keys:
        return "holds no img_in.weight (the patch embedding)"
    width = keys["img_in.weight"][0]  # what transformer_state splits the fused layers by
    for key, shape in keys.items():
        if key.endswith(("_attn.qkv.weight", "_attn.qkv.bias")) and shape[0] != 3 * width:
            return f"has {key} of {shape[0]} rows, not 3 x its width {width} (img_in.weight)"
        if key.endswith(("linear1.weight", "linear1.bias")) and shape[0] <= 3 * width:
            return f"has {key} of {shape[0]} rows, not more than 3 x its width {width} (img_in.weight)"
    return None


def block_counts(keys) -> tuple[int, int]:
    """(double-stream, single-stream) block counts of BFL-named keys."""
    def count(prefix: str) -> int:
        return len({key.split(".")[1] for key in keys if key.startswith(prefix)})

    return count("double_blocks."), count("single_blocks.")


def transformer_state(bfl: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A BFL-named Flux transformer state dict in diffusers' names (any width, any number of blocks)."""
    width = bfl["img_in.weight"].shape[0]  # the model width: x_embedder's output features
    out = {}
    for name, ours, how in layer_table(*block_counts(bfl)):
        leaves = ("",) if name.endswith(".scale") else (".weight", ".bias")
        for leaf in leaves:
            if name + leaf not in bfl:
                continue  # a layer without bias, or guidance_in in -schnell
            tensor = bfl[name + leaf]
            if how == "qkv":
                parts = tensor.chunk(3, dim=0)
            elif how == "qkv_mlp":
                parts = tensor.split((width, width, width, tensor.shape[0] - 3 * width), dim=0)
            elif how == "swap":
                shift, scale = tensor.chunk(2, dim=0)
                parts = (torch.cat([scale, shift], dim=0),)
            else:
                parts = (tensor,)
            for module, part in zip(ours, parts):
                out[module + ("" if name.endswith(".scale") else leaf)] = part
    return out


def read_prefixed(path: str, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of ``path`` whose keys start with ``prefix``, prefix removed; only those are read."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return {key[len(prefix):]: f.get_tensor(key) for key in f.keys() if key.startswith(prefix)}


def build_from_state(cls, config_dir: Path, state: dict, dtype: torch.dtype, what: str):
    """``cls`` built from ``config_dir``'s config with empty weights, then given ``state`` (every weight, no other:
    a file of other shapes or layers is one UserError)."""
    config = cls.load_config(str(config_dir)) if hasattr(cls, "load_config") else cls.config_class.from_pretrained(
        str(config_dir))
    from accelerate import init_empty_weights

    with init_empty_weights():  # weights on meta (never allocated twice); buffers (RoPE, position ids) real
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    expected = set(model.state_dict())
    if not any(key.startswith("text_model.") for key in expected):  # transformers 5's CLIP: no text_model wrapper
        state = {key.removeprefix("text_model."): value for key, value in state.items()}
    state = {key: value for key, value in state.items() if not key.endswith("position_ids")}  # a buffer, not a weight
    tied = {"encoder.embed_tokens.weight"} if "shared.weight" in state else set()  # T5: one tensor, two names
    missing, unexpected = expected - set(state) - tied, set(state) - expected
    if missing or unexpected:
        some = min(missing or unexpected)
        raise UserError(f"{what}: its weights do not fit the config in {config_dir} ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected, e.g. {some}); give model_config for a model of its shapes")
    try:
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    except RuntimeError as exc:
        raise UserError(f"{what}: its weights do not fit the config in {config_dir} ({str(exc).splitlines()[1][:160]}"
                        "); give model_config for a model of its shapes") from None
    if tied:
        model.tie_weights()
    return model.eval()


def flux_file_components(path: str, configs: str, dtype: torch.dtype) -> dict:
    """The pipeline components a single Flux file holds, loaded: always the transformer, and the VAE and text
    encoders where it has them (configured from ``configs``); the caller loads the rest from ``configs``."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    from ...weightfiles import checkpoint_keys

    configs_path = Path(configs)
    keys = checkpoint_keys(path)
    inside = components_in_file(keys)
    prefix = "" if flux_layout(keys) == "bfl" else COMFY_PREFIX
    parts = {"transformer": build_from_state(FluxTransformer2DModel, configs_path / "transformer",
                                             transformer_state(read_prefixed(path, prefix)), dtype, f"--model {path}")}
    if "vae" in inside:  # the original LDM layout: diffusers' own conversion
        parts["vae"] = AutoencoderKL.from_single_file(read_prefixed(path, VAE_PREFIX), config=configs, subfolder="vae",
                                                      local_files_only=True, torch_dtype=dtype)
    for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", T5EncoderModel)):
        if name in inside:
            parts[name] = build_from_state(cls, configs_path / name, read_prefixed(path, FILE_COMPONENTS[name]),
                                           dtype, f"--model {path} ({name})")
    return parts
