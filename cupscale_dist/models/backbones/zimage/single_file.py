"""Single-file Z-Image transformers (``--model z_image_turbo_bf16.safetensors``): the driver's checks from the header,
and the workers' load.

The file holds the transformer alone, in Tongyi-MAI's original key layout (``layers.0.attention.qkv.weight``,
``x_embedder``, ``final_layer``; ComfyUI's copies put it under ``model.diffusion_model.``), as the hub's and ComfyUI's
``diffusion_models/`` files do. It is told from other families' files by Z-Image's learned pad tokens
(``x_pad_token``, ``cap_pad_token``). Its conversion is diffusers' own (``ZImageTransformer2DModel.from_single_file``:
``convert_z_image_transformer_checkpoint_to_diffusers``, which splits the fused ``qkv`` by thirds, any width); the
driver runs the same conversion on the header's shapes (meta tensors), so a file whose keys or shapes do not fit the
configs is one line before any model loads. The text encoder, tokenizer and VAE come from a diffusers Z-Image
directory: ``model_config``, or else Z-Image-Turbo's snapshot in the hub cache (offline); neither is one line with the
download command.
"""

from __future__ import annotations

from pathlib import Path

from ....errors import UserError, shown
from ....files.userfile import named

COMFY_PREFIX = "model.diffusion_model."
MARKERS = ("x_pad_token", "cap_pad_token")  # Z-Image's learned pad tokens: no other family's file has both
TURBO_REPO = "Tongyi-MAI/Z-Image-Turbo"
DOWNLOAD = (f"huggingface-cli download {TURBO_REPO} --exclude 'transformer/diffusion_pytorch_model*'")
WEIGHTS_ELSEWHERE = ("text_encoder", "vae")  # components a transformer-only file lacks (besides the tokenizer)


def is_zimage_file(keys) -> bool:
    """Whether a checkpoint's keys are a Z-Image transformer's (its pad tokens, bare or under ComfyUI's prefix)."""
    keys = set(keys)
    return any(all(prefix + marker in keys for marker in MARKERS) for prefix in ("", COMFY_PREFIX))


def transformer_keys(keys: dict) -> dict:
    """The transformer's keys (ComfyUI's prefix removed) -> shapes; a key of no transformer is one UserError."""
    if not any(key.startswith(COMFY_PREFIX) for key in keys):
        return dict(keys)
    other = sorted(key for key in keys if not key.startswith(COMFY_PREFIX))
    if other:
        raise UserError(f"--model: holds {len(other)} key(s) of no Z-Image transformer (e.g. {shown(other[0])}); "
                        "pass the transformer file alone (ComfyUI's diffusion_models/ file)")
    return {key[len(COMFY_PREFIX):]: shape for key, shape in keys.items()}


def converted_shapes(keys: dict) -> dict[str, tuple[int, ...]]:
    """The file's transformer keys and shapes as diffusers' conversion names them (run on meta tensors)."""
    import torch
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    state = {key: torch.empty(shape, device="meta") for key, shape in keys.items()}
    return {key: tuple(value.shape) for key, value in
            convert_z_image_transformer_checkpoint_to_diffusers(state).items()}


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every weight of the Z-Image transformer ``config`` describes -> its shape (built on the meta device)."""
    import torch
    from diffusers import ZImageTransformer2DModel

    with torch.device("meta"):
        model = ZImageTransformer2DModel.from_config(config)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def check_zimage_file(path: str, keys: dict, configs: str, transformer_config: dict) -> None:
    """One UserError, from the header, for a Z-Image file that would not load with ``configs``: keys of no
    transformer, keys or shapes other than the configured transformer's, non-float tensors, or configs without the
    text encoder and VAE weights the file lacks."""
    from ...weightfiles import dtype_problem, safetensors_dtypes

    what = named(f"--model {path}")
    try:
        converted = converted_shapes(transformer_keys(keys))
    except UserError as exc:
        raise UserError(str(exc).replace("--model:", f"{what}:", 1)) from None
    except (ValueError, RuntimeError, KeyError) as exc:
        raise UserError(f"{what}: its transformer keys do not convert ({shown(str(exc), 100)}); pass a Z-Image "
                        "transformer file as Tongyi-MAI or ComfyUI saves it") from None
    expected = expected_shapes(transformer_config)
    missing, unexpected = sorted(set(expected) - set(converted)), sorted(set(converted) - set(expected))
    if missing or unexpected:
        some = (missing or unexpected)[0]
        raise UserError(f"{what}: its weights do not fit the configured Z-Image transformer ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected, e.g. {shown(some)}); give model_config for a model of its "
                        "layers")
    for key, shape in converted.items():
        if shape != expected[key]:
            raise UserError(f"{what}: its {shown(key)} has shape {shown(shape, 30)}, the configured Z-Image "
                            f"transformer's {shown(expected[key], 30)}; give model_config for a model of its shapes")
    problem = dtype_problem(safetensors_dtypes(path))
    if problem:
        raise UserError(f"{what}: {problem}; pass the file as Tongyi-MAI or ComfyUI saves it")
    for name in WEIGHTS_ELSEWHERE:
        folder = Path(configs) / name
        if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
            raise UserError(f"{what}: is a transformer-only Z-Image checkpoint and its configs hold no {name} "
                            "weights; --set model_config=DIR, a diffusers Z-Image directory with them")


def cached_turbo_dir() -> str | None:
    """Z-Image-Turbo's snapshot in the hub cache (offline), when its model_index.json is there."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(TURBO_REPO, "model_index.json")
    return str(Path(cached).parent) if isinstance(cached, str) else None


def configs_for_file() -> str:
    """Where a Z-Image file's configs, text encoder, tokenizer and VAE are without ``model_config``: the hub cache's
    Z-Image-Turbo; none there is one UserError."""
    found = cached_turbo_dir()
    if found is None:
        raise UserError(f"a single-file Z-Image transformer needs a diffusers Z-Image directory for its text encoder, "
                        f"tokenizer and VAE: --set model_config=DIR, or {DOWNLOAD}")
    return found


def load_transformer(path: str, configs: str, dtype):
    """The transformer of a Z-Image file through diffusers' own conversion, configured from ``configs`` (offline)."""
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel.from_single_file(path, config=configs, subfolder="transformer",
                                                     local_files_only=True, torch_dtype=dtype)
