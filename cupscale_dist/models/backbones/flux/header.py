"""What a single-file Flux checkpoint is, from its header alone (no tensors read): layout, variant, the components
it holds, whether it can load with the given ``model_config``, and where its T5 tokenizer is.

The driver decides all of this before any model loads (:mod:`cupscale_dist.models.spec`,
:mod:`cupscale_dist.models.single_file`); the conversion of the weights themselves is :mod:`.single_file` beside
it, on the workers. This module imports nothing else of ``models``, so both sides can take it without a circle.
"""

from __future__ import annotations

from pathlib import Path

from ....errors import UserError, shown
from ....files.userfile import named

COMFY_PREFIX = "model.diffusion_model."
VAE_PREFIX = "vae."
CLIP_PREFIX = "text_encoders.clip_l.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."
FILE_COMPONENTS = {"vae": VAE_PREFIX, "text_encoder": CLIP_PREFIX, "text_encoder_2": T5_PREFIX}
GUIDANCE_KEY = "guidance_in.in_layer.weight"  # FLUX.1-dev's distilled-guidance embedding; -schnell has none
# Where a T5 tokenizer may already be on this machine when a file's configs have none (the hub's cache, offline).
T5_TOKENIZER_REPOS = ("black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-schnell")
T5_TOKENIZER_FIX = ("huggingface-cli download black-forest-labs/FLUX.1-dev --include 'tokenizer_2/*', or "
                    "--set model_config=DIR (a diffusers Flux directory)")


def flux_layout(keys) -> str:
    """'bfl', 'comfy' or 'comfy-all-in-one' from a Flux file's keys."""
    keys = set(keys)
    if not any(key.startswith(COMFY_PREFIX) for key in keys):
        return "bfl"
    has = {name: any(key.startswith(prefix) for key in keys) for name, prefix in FILE_COMPONENTS.items()}
    return "comfy-all-in-one" if all(has.values()) else "comfy"


def flux_variant(keys) -> str:
    """'dev' (a guidance embedding) or 'schnell'."""
    return "dev" if GUIDANCE_KEY in keys or COMFY_PREFIX + GUIDANCE_KEY in keys else "schnell"


def components_in_file(keys) -> set[str]:
    """The pipeline components whose weights the file holds."""
    keys = set(keys)
    return {"transformer"} | {name for name, prefix in FILE_COMPONENTS.items()
                              if any(key.startswith(prefix) for key in keys)}


def check_flux_file(path: str, keys, model_config: str | None, config_dir: str, transformer_config: dict) -> None:
    """Refuse, from the header (``keys``), a Flux file that cannot load: its VAE or text encoders missing and no
    ``model_config`` with them, or a dev file with a schnell config (``transformer_config``, the one in
    ``config_dir``) or the reverse; and one whose transformer would not convert exactly (block gaps, keys the
    conversion would drop, wrong ranks or width, non-float tensors: :func:`check_flux_tensors`)."""
    missing = {"vae", "text_encoder", "text_encoder_2"} - components_in_file(keys)
    if missing and model_config is None:
        raise UserError(f"--model {path}: is a transformer-only Flux checkpoint (no {', '.join(sorted(missing))} "
                        "in it); --set model_config=DIR, a diffusers Flux directory with those weights (e.g. "
                        "huggingface-cli download black-forest-labs/FLUX.1-dev --exclude 'transformer/*' "
                        "'flux1-dev.safetensors' 'ae.safetensors')")
    for name in sorted(missing):
        if not any((Path(config_dir) / name).glob("*.safetensors")) and not any(
                (Path(config_dir) / name).glob("*.bin")):
            raise UserError(f"--model {path}: holds no {name} and model_config {config_dir} has no {name} weights; "
                            "point model_config at a diffusers Flux directory with them")
    guidance = bool(transformer_config.get("guidance_embeds", False))
    if guidance != (flux_variant(keys) == "dev"):
        raise UserError(f"--model {path}: is a FLUX.1-{flux_variant(keys)} checkpoint but {config_dir} configures "
                        f"FLUX.1-{'dev' if guidance else 'schnell'}; give model_config of the checkpoint's variant")
    check_flux_tensors(path, keys)


def check_flux_tensors(path: str, keys: dict) -> None:
    """One UserError, from the header, for a Flux file whose weights would not load as they are: its transformer keys
    (:func:`.single_file.transformer_key_problem`), keys of no component (another family's), and non-float
    tensors (:func:`cupscale_dist.models.weightfiles.dtype_problem`)."""
    from ...weightfiles import dtype_problem, safetensors_dtypes
    from .single_file import transformer_key_problem

    fix = "pass a FLUX.1 file as BFL or ComfyUI saves it"  # short: the message must fit one 300-character line
    if flux_layout(keys) == "bfl":
        transformer = dict(keys)
    else:
        transformer = {key[len(COMFY_PREFIX):]: shape for key, shape in keys.items() if key.startswith(COMFY_PREFIX)}
        other = sorted(key for key in keys if not key.startswith((COMFY_PREFIX, VAE_PREFIX, "text_encoders.")))
        if other:
            raise UserError(f"{named('--model ' + path)}: holds {len(other)} key(s) of no Flux component (e.g. "
                            f"{shown(other[0])}), dropped on loading; {fix}")
    problem = transformer_key_problem(transformer) or dtype_problem(safetensors_dtypes(path))
    if problem:
        raise UserError(f"{named('--model ' + path)}: {problem}; {fix}")


def t5_tokenizer_dir(config_dir: str | Path) -> str:
    """Where the T5 tokenizer of a Flux config directory is: its own ``tokenizer_2``, else the hub cache of
    FLUX.1-dev / -schnell (offline); none is one UserError with the download command."""
    own = Path(config_dir) / "tokenizer_2"
    if any((own / name).exists() for name in ("tokenizer.json", "spiece.model")):  # the loader checks what it is
        return str(own)
    from huggingface_hub import try_to_load_from_cache

    for repo in T5_TOKENIZER_REPOS:
        for name in ("tokenizer.json", "spiece.model"):
            cached = try_to_load_from_cache(repo, f"tokenizer_2/{name}")
            if isinstance(cached, str):
                return str(Path(cached).parent)
    raise UserError(f"no T5 tokenizer for the Flux checkpoint (none in {own}, none cached from the hub); "
                    f"{T5_TOKENIZER_FIX}")
