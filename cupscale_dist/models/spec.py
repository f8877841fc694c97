"""The SDXL and SD1.5 families: what the driver knows of a model (configs, no weights) and how workers load it.

``--model`` is a hub id, a local diffusers directory, a single-file checkpoint (:mod:`cupscale_dist.models.single_file`)
or ``demo`` (:mod:`cupscale_dist.models.hub` turns it into a local path once, on the driver). The driver reads only
configs and the tokenizer (:class:`ModelSpec`): in Ray mode it holds no weights, so a CPU-only head scales. Workers
(:mod:`cupscale_dist.execution.worker`) load the modules with :func:`load_pipeline`, each component in the chosen
``variant`` where its files exist.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError, shown
from ..files.userfile import MAX_JSON_CONFIG_BYTES, check_regular_file, named, read_capped, read_json_object
from .backbones import BACKBONES, FAMILIES, FAMILY_COMPONENTS, backbone_class
from .demo_dir import demo_model_dir
from .hub import is_hub_id, pipeline_components, resolve_model
from .single_file import (
    checkpoint_family,
    checkpoint_kind,
    is_single_file,
    shipped_config,
    tokenizer_dir,
)

log = logging.getLogger(__name__)


def read_json(model_dir: str | Path, name: str, flag: str = "--model", fix: str = "re-save the pipeline") -> dict:
    """``model_dir/name``, a JSON object (the one reader of model configs); missing, unreadable, over
    :data:`~cupscale_dist.files.userfile.MAX_JSON_CONFIG_BYTES`, nested too deeply or not an object is one UserError
    naming ``flag``, the file and ``fix``."""
    return read_json_object(Path(model_dir) / name, f"{flag} {model_dir}: {name}", fix)


# A tokenizer's files; every one present is checked before transformers (or sentencepiece) opens it.
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                  "added_tokens.json")
TOKENIZER_TEXT = ("merges.txt",)
TOKENIZER_BINARY = ("spiece.model",)
T5_TOKENIZER_AGAIN = "again: huggingface-cli download black-forest-labs/FLUX.1-dev --include 'tokenizer_2/*'"
MAX_MODEL_MAX_LENGTH = int(1e30)  # transformers' own "no limit" value (VERY_LARGE_INTEGER)


def check_tokenizer_files(directory: str | Path, what: str, fix: str) -> None:
    """One UserError (``what``, the file, ``fix``) for a tokenizer file that is no file (a FIFO: the load would
    block), JSON that is not an object (too big, too deep, a list), merges that are not text, or a
    ``model_max_length`` that is no positive integer (Flux's T5 length is taken from it)."""
    directory = Path(directory)
    for name in TOKENIZER_JSON + TOKENIZER_TEXT + TOKENIZER_BINARY:
        path = directory / name
        check_regular_file(path, f"{what}: {name}", fix)
        if not path.is_file():
            continue
        if name in TOKENIZER_JSON:
            data = read_json_object(path, f"{what}: {name}", fix)
            length = data.get("model_max_length") if name == "tokenizer_config.json" else None
            if length is not None and not (type(length) is int and 1 <= length <= MAX_MODEL_MAX_LENGTH):
                raise UserError(f"{named(what)}: tokenizer_config.json has model_max_length={shown(length)} (expected "
                                f"a positive integer); {fix}")
        elif name in TOKENIZER_TEXT:
            try:
                read_capped(path, MAX_JSON_CONFIG_BYTES, f"{what}: {name}", fix).decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{named(what)}: {name} is not UTF-8 text; {fix}") from None


def load_tokenizer(cls, directory: str | Path, what: str, fix: str):
    """``cls.from_pretrained(directory)`` after :func:`check_tokenizer_files`, tried on a short text: whatever a
    damaged file makes transformers, tokenizers or sentencepiece raise is one UserError naming ``what`` and ``fix``."""
    check_tokenizer_files(directory, what, fix)
    try:
        tokenizer = cls.from_pretrained(str(directory))
        ids = tokenizer("a photo of a cat").input_ids
        if not ids or not all(type(i) is int for i in ids):
            raise ValueError("it gives no token ids")
    except Exception as exc:  # noqa: BLE001 - garbage reaches three libraries, each with its own errors
        reason = (str(exc).strip().splitlines() or [""])[0][:80]
        raise UserError(f"{named(what)}: the tokenizer does not load ({type(exc).__name__}"
                        f"{': ' + reason[:40] if reason else ''}); {fix}") from None
    return tokenizer


def vae_geometry(model_dir: str | Path, vae: dict) -> tuple[int, int]:
    """(pixels per latent pixel, latent channels) from a VAE config: one UserError when it lacks them."""
    blocks, channels = vae.get("block_out_channels"), vae.get("latent_channels", 4)
    if not isinstance(blocks, list) or not blocks or type(channels) is not int:
        raise UserError(f"--model {model_dir}: vae/config.json has no block_out_channels list and integer "
                        "latent_channels; re-save the pipeline")
    return 2 ** (len(blocks) - 1), channels


def model_family(model_dir: str | Path) -> str:
    """'sdxl' or 'sd15', from model_index.json's pipeline class; an SDXL refiner is refused (it has no first text
    encoder and wants aesthetic-score conditioning: it refines a base model's output, it does not upscale)."""
    index = read_json(model_dir, "model_index.json")
    class_name = index.get("_class_name")
    if not isinstance(class_name, str) or class_name not in FAMILIES:  # a list would be unhashable
        raise UserError(f"--model {model_dir}: {str(class_name)[:60]} is not supported; use an SDXL or SD1.5 pipeline")
    family = FAMILIES[class_name]
    missing = ", ".join(c for c in FAMILY_COMPONENTS[family] if c not in pipeline_components(index))
    if missing and index.get("requires_aesthetics_score"):
        raise UserError(f"--model {model_dir}: an SDXL refiner (no {missing}) refines a base model's output; use a "
                        "base model such as stabilityai/stable-diffusion-xl-base-1.0")
    if missing:
        raise UserError(f"--model {model_dir}: model_index.json lists no {missing}; re-save the whole pipeline "
                        "with save_pretrained, or use --model demo")
    return family


@dataclass
class ModelSpec:
    """The driver's view of a model: its configs and tokenizer, no weights (a CPU-only head can hold it)."""

    name: str  # what the user passed to --model
    path: str  # the local directory (or single-file checkpoint) every worker on a node sharing it loads from
    family: str  # 'sdxl' | 'sd15' | 'flux'
    vae_scale_factor: int  # pixels per latent pixel (8)
    latent_channels: int
    native_size: int  # the training resolution in pixels (1024 for SDXL, 512 for SD1.5)
    scheduler_config: dict
    force_zeros_for_empty_prompt: bool  # an empty negative prompt's embeddings are zeros (the backbone's option)
    tokenizer: object  # the first CLIP tokenizer: token counts for masks and caption budgets
    model_config: str | None = None  # a single file's diffusers config dir; None = the shipped one of its family
    mask_tokenizer: object | None = None  # the tokenizer of the tokens regional masks screen (Flux: T5); None = CLIP

    @classmethod
    def load(cls, model: str, variant: str | None = None, model_config: str | None = None) -> ModelSpec:
        """Resolve ``model`` (fetch a hub id once) and read its configs."""
        return cls.read(resolve_model(model, variant), name=model, model_config=model_config)

    @classmethod
    def read(cls, model_dir: str, name: str | None = None, model_config: str | None = None) -> ModelSpec:
        configs = config_dir(model_dir, model_config)
        family = model_family(configs)
        if model_config and is_single_file(model_dir):  # without one, configs are the file's own family's
            found = checkpoint_family(model_dir)
            if found != family:
                raise UserError(f"--model {model_dir} is an {found} checkpoint but model_config {configs} is an "
                                f"{family} config; give a config directory of the checkpoint's family")
        backbone = backbone_class(family)
        denoiser = read_json(configs, f"{backbone.denoiser_name}/config.json")
        if is_single_file(model_dir):  # from the header: what loading would need (the family's own check)
            backbone.check_single_file(model_dir, model_config, configs, denoiser)
        vae = read_json(configs, "vae/config.json")
        factor, channels = vae_geometry(configs, vae)
        if backbone.native_size is not None:  # a DiT's config has no sample size: the family's training size
            native = backbone.native_size
        elif type(denoiser.get("sample_size")) is not int:
            raise UserError(f"--model {configs}: unet/config.json has no integer sample_size; re-save the pipeline")
        else:
            native = denoiser["sample_size"] * factor
        index = read_json(configs, "model_index.json")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        mask_tokenizer = None
        if backbone.mask_tokenizer != "tokenizer":  # Flux screens T5 tokens: masks count those
            from transformers import AutoTokenizer

            where = tokenizer_dir(configs, backbone.mask_tokenizer)
            mask_tokenizer = load_tokenizer(AutoTokenizer, where, f"tokenizer {where}", T5_TOKENIZER_AGAIN)
        where = tokenizer_dir(configs, "tokenizer")
        tokenizer = load_tokenizer(backbone.tokenizer_class(), where, f"tokenizer {where}",
                                   "re-save the tokenizer (save_pretrained) or download it again")
        return cls(name or model_dir, str(model_dir), family, factor, channels, native,
                   read_json(configs, "scheduler/scheduler_config.json"),
                   bool(backbone.pipeline_options(index).get("force_zeros_for_empty_prompt", False)),
                   tokenizer, model_config, mask_tokenizer)

    @property
    def config_dir(self) -> str:
        """Where this model's configs are: its directory, or a single file's config directory."""
        return config_dir(self.path, self.model_config)

    def unet_config(self) -> dict:
        return read_json(self.config_dir, "unet/config.json")

    def denoiser_config(self) -> dict:
        """The UNet's or the DiT's config."""
        return read_json(self.config_dir, f"{backbone_class(self.family).denoiser_name}/config.json")

    def new_scheduler(self, kind: str, timestep_spacing: str | None = None, karras_sigmas: bool = False):
        """A fresh scheduler of the chosen kind, configured from the model's own scheduler config."""
        from ..method.schedulers import FLOW_KINDS, make_scheduler

        if self.scheduler_config.get("_class_name") == "FlowMatchEulerDiscreteScheduler":  # a flow-matching model
            if kind not in ("euler", *FLOW_KINDS):
                raise UserError(f"--model {self.name} is a flow-matching model; scheduler={kind!r} is for noise-"
                                "prediction models: use scheduler=euler (its flow-matching Euler)")
            return make_scheduler("flow_euler", self.scheduler_config)
        if kind in FLOW_KINDS:
            raise UserError(f"scheduler={kind!r} is for flow-matching models (Flux); --model {self.name} predicts "
                            "noise: use euler, ddim, dpmpp_2m, tcd or lcm")
        scheduler = make_scheduler(kind, self.scheduler_config, timestep_spacing=timestep_spacing,
                                   karras_sigmas=karras_sigmas)
        if scheduler.config.prediction_type != "epsilon":
            raise UserError(f"--model {self.name}: prediction_type {scheduler.config.prediction_type!r} is not "
                            "supported; use an epsilon-prediction model (SDXL base, SD1.5)")
        return scheduler

    def token_count(self, prompt: str) -> int:
        """Tokens of ``prompt`` including <start> and <end>, as the text encoder sees them (<= 77)."""
        return len(self.tokenizer(prompt, truncation=True, max_length=self.tokenizer.model_max_length).input_ids)

    def content_tokens_mask(self, prompt: str, length: int):
        """(length,) bool: the positions of the prompt's words in the embeddings the masks screen (CLIP: after
        <start>, before <end>; T5: before </s>, no start token)."""
        import numpy as np

        own = backbone_class(self.family).content_tokens_mask(self.tokenizer, prompt, length)  # a chat template's
        if own is not None:
            return own
        if self.mask_tokenizer is None:
            from ..method.masks import content_token_mask

            return content_token_mask(self.token_count(prompt), length)
        count = len(self.mask_tokenizer(prompt, truncation=True, max_length=length).input_ids)  # with </s>
        mask = np.zeros(length, dtype=bool)
        mask[: count - 1] = True
        return mask

    def content_tokens(self, text: str) -> int:
        """Untruncated word-piece count of ``text`` (what a caption must fit into 75)."""
        return len(self.tokenizer.tokenize(text))


# What a plan assumes for a model whose configs are not on this machine yet (a hub id not fetched, a dry run of a
# path that does not exist): the SDXL and SD1.5 VAE, 8 px per latent px and 4 channels. A run reads the real ones.
UNFETCHED_GEOMETRY = (8, 4)


def model_geometry(model: str, model_config: str | None = None) -> tuple[int, int]:
    """(VAE factor, latent channels) of ``model`` from its VAE config, no weights read: the demo model, a local
    directory, a single file's configs, a hub id already in the local cache, a family's published repository
    (:func:`published_facts`); :data:`UNFETCHED_GEOMETRY` otherwise."""
    if model == "demo":
        model = str(demo_model_dir())
    path = Path(os.path.expanduser(model))
    if path.is_file():
        vae = Path(config_dir(str(path), model_config)) / "vae" / "config.json"
    elif path.is_dir():
        vae = path / "vae" / "config.json"
    else:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "vae/config.json") if is_hub_id(model) else None
        vae = Path(cached) if isinstance(cached, str) else path / "vae" / "config.json"
    if not vae.is_file():
        published = published_facts(model)
        return published[1]["geometry"] if published else UNFETCHED_GEOMETRY
    return vae_geometry(vae.parent.parent, read_json(vae.parent.parent, "vae/config.json"))


def published_facts(model: str) -> tuple[str, dict] | None:
    """(family, facts) of a hub repository a family describes (:attr:`~.backbones.base.Backbone.published`: its
    geometry and parameters, for a plan of a model not fetched yet); None for any other model."""
    if Path(os.path.expanduser(model)).exists():
        return None
    return next(((b.family, b.published[model]) for b in BACKBONES.values() if model in b.published), None)


def local_family(model: str, model_config: str | None = None) -> str | None:
    """The model family from configs already on this machine (the demo model, a local directory or single file, a
    hub id in the local cache), no weights read; None when they are not here yet (a run reads them)."""
    if model == "demo":
        model = str(demo_model_dir())
    path = Path(os.path.expanduser(model))
    if path.is_file() or path.is_dir():
        try:
            return model_family(config_dir(str(path), model_config))
        except UserError:  # a broken model is reported where it is loaded, with its own message
            return None
    if not is_hub_id(model):  # './x' or '~u/x' that is not here: huggingface_hub's validation would raise
        return None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model, "model_index.json")
    if not isinstance(cached, str):
        published = published_facts(model)  # a family's repository: its knobs are checked before it is fetched
        return published[0] if published else None
    class_name = read_json(Path(cached).parent, "model_index.json").get("_class_name")
    return FAMILIES.get(class_name) if isinstance(class_name, str) else None


def config_dir(model_path: str, model_config: str | None = None) -> str:
    """The diffusers config directory of a model: the directory itself, or for a single-file checkpoint
    ``model_config`` (a diffusers directory; its weights, if any, are not read) or the family's shipped configs."""
    if not is_single_file(model_path):
        if model_config:
            raise UserError(f"model_config={model_config} is for a single-file checkpoint, and --model {model_path} "
                            "is a diffusers directory (it has its own configs); drop model_config")
        return model_path
    if model_config is None:
        return shipped_config(checkpoint_kind(model_path))
    if not (Path(os.path.expanduser(model_config)) / "model_index.json").is_file():
        raise UserError(f"model_config={model_config}: not a diffusers config directory (no model_index.json); "
                        "point it at a saved pipeline's folder, or leave it unset for the shipped SDXL/SD1.5 configs")
    return str(Path(os.path.expanduser(model_config)))


