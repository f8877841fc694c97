"""Where a model's files come from: ``demo``, a local diffusers directory, or a hub id fetched once.

The driver resolves ``--model`` once (a download or a cache check) and hands actors the local path, so the nodes
that share it (one machine, or a shared model cache) never fetch anything themselves. From the hub only what the
pipeline loads is fetched: the components ``model_index.json`` names, in the chosen ``variant``, as safetensors —
never a repository's root single-file checkpoints, LoRAs, extra VAEs (SDXL's ``vae_1_0/``), ONNX/Flax/OpenVINO.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

from ..errors import UserError, shown
from .backbones import FAMILIES, FAMILY_COMPONENTS
from .demo_dir import demo_model_dir

log = logging.getLogger(__name__)

# Files every component folder may need besides weights: configs, tokenizer vocabularies and merges.
SMALL_FILE = re.compile(r"\.(json|txt|model)$")
SAFETENSORS = re.compile(r"\.safetensors$")
TORCH_PICKLE = re.compile(r"pytorch_model.*\.bin$")  # only where a component has no safetensors (not OpenVINO's .bin)
# Sharded weights: `name-00001-of-00003.safetensors` (+ index json); variants sit before the suffix.
VARIANT_OF = re.compile(r"^(?P<stem>[^/]+?)\.(?P<variant>[A-Za-z0-9_]+)\.(safetensors|bin)$")


def pipeline_components(model_index: dict) -> list[str]:
    """Component folders model_index.json names: entries given as [library, class], not null."""
    return sorted(name for name, value in model_index.items()
                  if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and value[0] and value[1])


def needed_components(model_index: dict) -> list[str]:
    """The components of :func:`pipeline_components` the method loads: its family's, for a known family."""
    family = FAMILIES.get(model_index.get("_class_name"))
    named = pipeline_components(model_index)
    return [c for c in named if c in FAMILY_COMPONENTS[family]] if family else named


def file_variant(name: str) -> str | None:
    """``model.fp16.safetensors`` -> 'fp16'; ``model.safetensors`` -> None (the full-precision file)."""
    match = VARIANT_OF.match(name)
    return match["variant"] if match else None


def select_files(files: Iterable[str], model_index: dict, variant: str | None) -> list[str]:
    """The repository files a pipeline needs: per component, its small files plus the weights of ``variant`` where
    the component has them, else its full-precision ones; safetensors, or torch pickles where none exist."""
    files = list(files)
    chosen = ["model_index.json"] if "model_index.json" in files else []
    for component in needed_components(model_index):
        inside = [f for f in files if f.startswith(component + "/") and "/" not in f[len(component) + 1 :]]
        chosen += [f for f in inside if SMALL_FILE.search(f) and not f.endswith(".onnx_data")]
        weights = [f for f in inside if SAFETENSORS.search(f)] or [f for f in inside if TORCH_PICKLE.search(f)]
        wanted = [f for f in weights if variant and file_variant(Path(f).name) == variant]
        chosen += wanted or [f for f in weights if file_variant(Path(f).name) is None]
    return sorted(set(chosen))


def component_variant(model_dir: str | Path, component: str, variant: str | None) -> str | None:
    """The variant to load ``component`` with from a local directory: ``variant`` where its files are there, else
    the full-precision files, else the one variant the folder has (a cache holding only fp16 files loads whatever
    was asked). Components without weights (tokenizers, scheduler) get None."""
    folder = Path(model_dir) / component
    if not folder.is_dir():
        return None
    weights = [p.name for p in folder.iterdir() if SAFETENSORS.search(p.name) or TORCH_PICKLE.search(p.name)]
    present = {file_variant(name) for name in weights}
    if variant in present or None in present or not present:
        return variant if variant in present else None
    return sorted(present)[0]


def resolve_model(model: str, variant: str | None = None) -> str:
    """'demo' -> the embedded model dir; a local dir or single-file checkpoint -> checked; a hub id -> a local
    snapshot of the needed files."""
    if model == "demo":
        return str(demo_model_dir())
    path = Path(os.path.expanduser(model))
    if path.is_file():  # a single-file checkpoint: its family is checked from its keys (no weights read)
        from .single_file import SUFFIXES, checkpoint_family

        if path.suffix.lower() not in SUFFIXES:
            raise UserError(f"--model {model}: a file must be a .safetensors or .ckpt checkpoint (SDXL, SD1.5 or "
                            "Flux.1); or point --model at a diffusers directory")
        checkpoint_family(path)
        return str(path.resolve())
    if path.exists() or model.startswith((".", "/", "~")):
        if not (path / "model_index.json").is_file():
            raise UserError(f"--model {model}: not a diffusers model directory (no model_index.json); "
                            "point --model at a saved pipeline, or use --model demo")
        return str(path)
    try:
        return fetch_from_hub(model, variant)
    except UserError:
        raise
    except Exception as exc:  # offline, unknown id, gated: one clear line either way
        reason = type(exc).__name__
        raise UserError(f"--model {model}: not available offline and could not be downloaded ({reason}); "
                        "use --model PATH for a local diffusers directory, or --model demo") from None


def fetch_from_hub(repo_id: str, variant: str | None) -> str:
    """Download (or find in the cache) exactly :func:`select_files` of ``repo_id``; returns the snapshot dir.

    Offline (``HF_HUB_OFFLINE=1``) the cached snapshot is used as it is; loading then picks per component the
    variant its files have (:func:`component_variant`).
    """
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    if os.environ.get("HF_HUB_OFFLINE", "0").upper() not in ("1", "ON", "YES", "TRUE"):
        try:
            index = json.loads(Path(hf_hub_download(repo_id, "model_index.json")).read_text())
            files = select_files(HfApi().list_repo_files(repo_id), index, variant)
            log.info("fetching %d files of %s (variant %s)", len(files), repo_id, variant or "full precision")
            return snapshot_download(repo_id, allow_patterns=files)
        except Exception as exc:  # no network (or the hub refused): a cached snapshot may still do
            log.info("hub unreachable for %s (%s); looking in the local cache", repo_id, type(exc).__name__)
    return snapshot_download(repo_id, local_files_only=True)


HUB_FILE = "hf://"  # a file of a hub repository: hf://OWNER/REPO/FILE (a preset names its LoRA this way)
HUB_EXAMPLE = "hf://ByteDance/SDXL-Lightning/sdxl_lightning_4step_lora.safetensors"
# The hub's own rule for an owner or a repository name (huggingface_hub's validate_repo_id): ASCII letters, digits,
# '-', '_', '.', at most 96 characters, not starting or ending with '-' or '.', no '--' or '..' inside.
HUB_NAME = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?$")
MAX_HUB_FILENAME = 1024  # characters of a file's path in a repository: real ones are under 200


def is_hub_id(text: str) -> bool:
    """Whether ``text`` is OWNER/REPO by the hub's rule (:data:`HUB_NAME`), so huggingface_hub takes it."""
    parts = text.split("/")
    return len(parts) == 2 and all(HUB_NAME.match(part) for part in parts)


def hub_file_problem(owner: str, repo: str, filename: str) -> str | None:
    """Why ``hf://owner/repo/filename`` names no file of the hub (checked here, not by huggingface_hub, whose
    validation errors are tracebacks), or None."""
    for what, name in (("owner", owner), ("repository", repo)):
        if not HUB_NAME.match(name):
            return (f"the {what} {shown(name)} is no hub name (ASCII letters, digits, '-', '_', '.', at most 96, "
                    "no '--' or '..')")
    parts = filename.split("/")
    if filename.startswith("/") or "\\" in filename or any(part in ("", ".", "..") for part in parts):
        return f"the file {shown(filename)} is not a plain path inside the repository (no '..', '/x' or '//')"
    if len(filename) > MAX_HUB_FILENAME or any(ord(ch) < 32 for ch in filename):
        return f"the file {shown(filename)} is over {MAX_HUB_FILENAME} characters or holds control characters"
    return None


def resolve_hub_file(ref: str, flag: str) -> str:
    """``hf://OWNER/REPO/PATH`` -> the file in the local Hugging Face cache; never downloads (a run must not fetch
    hundreds of MB behind the user's back). Not cached: one line with the command that fetches it."""
    parts = ref[len(HUB_FILE):].split("/", 2)
    if len(parts) != 3 or not all(parts):
        raise UserError(f"{flag} {shown(ref)}: not hf://OWNER/REPO/FILE; e.g. {HUB_EXAMPLE}")
    problem = hub_file_problem(*parts)
    if problem:
        raise UserError(f"{flag} {shown(ref)}: {problem}; give hf://OWNER/REPO/FILE, e.g. {HUB_EXAMPLE}")
    from huggingface_hub import try_to_load_from_cache

    repo, filename = f"{parts[0]}/{parts[1]}", parts[2]
    try:
        cached = try_to_load_from_cache(repo, filename)
    except ValueError as exc:  # huggingface_hub's own validation (HFValidationError is a ValueError): still one line
        raise UserError(f"{flag} {shown(ref)}: not a valid hub file ({(str(exc).splitlines() or [''])[0][:80]}); "
                        f"give hf://OWNER/REPO/FILE, e.g. {HUB_EXAMPLE}") from None
    if not isinstance(cached, str):
        raise UserError(f"{flag} {shown(ref)}: not in the Hugging Face cache; fetch it once with `hf download {repo} "
                        f"{filename if len(filename) <= 100 else shown(filename, 100)}` (or give a "
                        "local file)")
    return cached
