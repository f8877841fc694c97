"""The backbone contract, and what the Stable Diffusion UNet families share (k-diffusion's ``external.py`` idea:
wrap each model so the sampler sees one call).

Class level (no weights; the driver and the loader use it): ``family``, the ``model_index.json`` class names it
accepts, the components it loads, the diffusers pipeline class and its options, and every decision that depends on
the family: how guidance reaches the model, a single file's kind, checks and loading, its LoRA and ControlNet checks
(the rest of the code asks the family's class from :func:`cupscale_dist.models.backbones.backbone_class`, never
its name).
Instance level (a worker, weights loaded): ``encode_prompts`` (method.md step 6), ``denoise`` (the forward pass of
one CFG batch of views, step 9a, ControlNet included) and ``probe`` (the attention probe's pass, step 7). Every
tensor crosses the contract in the layouts :class:`cupscale_dist.method.step.StageContext` documents.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import torch

from ...errors import UserError
from ...method.attention import RegionalAttention, install_regional_processors
from ...method.masks import probe_attention_maps
from ...method.step import StageContext
from ...method.vae import encode_pixels, tile_to_tensor
from .unet_addons import check_unet_controlnet, check_unet_lora

TOKENIZER_FILES = ("vocab.json", "tokenizer.json")  # either one makes a folder a tokenizer of its own


class UnsupportedFile(Exception):  # noqa: N818 - not an error of ours: the caller words it (a UserError)
    """A single file of a family this project cannot run (``what``: 'SDXL inpainting (9 input channels)')."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


def has_prefix(keys, prefix: str) -> bool:
    """Whether any key of a checkpoint starts with ``prefix``."""
    return any(key.startswith(prefix) for key in keys)


@dataclass(frozen=True)
class PooledStage:
    """The pooled prompt embeddings of a stage (SDXL's and FLUX.1's pooled CLIP output), the part of their stage
    fields (``StageContext.family``) they share: float32 on CPU, on the denoiser's device after :meth:`to`."""

    negative_pooled: torch.Tensor  # (1, Dp)
    global_pooled: torch.Tensor  # (1, Dp)
    regional_pooled: torch.Tensor  # (U, Dp)
    pooled_prompt: str  # 'global': every view the global prompt's; 'regional': its own regional prompt's

    def pooled(self, prompt_ids: torch.Tensor, cfg: bool = True) -> torch.Tensor:
        """The pooled rows of a CFG batch [negative; the views' prompts] (``cfg``) or of the views alone."""
        count = len(prompt_ids)
        pooled = (self.global_pooled.expand(count, -1) if self.pooled_prompt == "global"
                  else self.regional_pooled[prompt_ids])
        return torch.cat([self.negative_pooled.expand(count, -1), pooled]) if cfg else pooled

    def to(self, device, dtype):
        """These fields with the embeddings on ``device`` in ``dtype`` (``StageContext.to``)."""
        names = ("negative_pooled", "global_pooled", "regional_pooled")
        return dataclasses.replace(self, **{name: getattr(self, name).to(device, dtype) for name in names})


class Backbone(ABC):
    """The calling contract of every model family (a UNet with cross-attention, a DiT with joint attention)."""

    family: str
    pipeline_names: tuple[str, ...]  # model_index.json `_class_name`s of this family
    components: tuple[str, ...]  # the pipeline components the method calls (others are neither fetched nor loaded)
    denoiser_name = "unet"  # the pipeline attribute holding the denoiser ('transformer' for a DiT)
    native_size: int | None = None  # training size in px when the denoiser's config has no sample_size (a DiT)
    mask_tokenizer = "tokenizer"  # the pipeline tokenizer whose tokens the regional masks screen
    upcast_vae_in_fp16 = False  # a VAE that overflows in fp16 is kept in fp32 (as the family's diffusers pipeline does)
    # Hub repositories of the family a plan may describe before their files are here (a preset's ``--dry-run``):
    # repo id -> {"geometry": (VAE factor, latent channels), "parameters": per component, models.weights' names}
    published: Mapping[str, dict] = MappingProxyType({})
    # What a worker keeps on its GPU under weights=offload (models.weights.weights_gb): the resident fraction of each
    # component's parameters, in models.weights' names ('unet': the denoiser, a DiT's transformer too; the VAE is
    # never offloaded). The denoiser is offloaded at block level: one block group computing, the next prefetched on
    # the stream, and what lies outside its block lists; the text encoders at leaf level, one after the other: the
    # largest leaf of either. SDXL's, the default: its largest up block holds about a fifth of the UNet, so two of
    # them bound it; of text_encoder_2 (OpenCLIP bigG) an eighth, above its largest leaf (the token embedding, 9 %).
    offload_resident: Mapping[str, float] = MappingProxyType({"unet": 0.4, "text_encoder_2": 1 / 8})

    @staticmethod
    @abstractmethod
    def pipeline_class():
        """The family's diffusers pipeline class (imported on call: the driver needs only its name)."""

    @classmethod
    @abstractmethod
    def pipeline_options(cls, model_index: dict) -> dict:
        """Keyword arguments the family's pipeline is built with (besides its components)."""

    @classmethod
    def check_config(cls, config) -> None:
        """One-line UserErrors for knobs this family cannot honour, before any work (none for the UNet families)."""
        return  # a hook with a default, not an abstract method: a family with nothing to refuse keeps it

    @classmethod
    def cfg_scale(cls, config) -> float:
        """The CFG scale of the stage context (:attr:`~cupscale_dist.method.step.StageContext.guidance_scale`; CFG
        runs above 1): ``guidance_scale``."""
        return config.guidance_scale

    @classmethod
    def stage_fields(cls, config, image_hw: tuple[int, int], pooled: tuple) -> object | None:
        """The family's own part of the stage context (``StageContext.family``): a frozen dataclass of its folder
        with a ``to(device, dtype)``, from the run's ``config``, the stage size ``image_hw`` (H, W) in px and the
        pooled embeddings (negative (1, Dp), global (1, Dp), regional (U, Dp); Nones for a family with none);
        None for a family that reads nothing of its own (SD1.5)."""
        return None

    @staticmethod
    def tokenizer_class():
        """The class the driver reads the pipeline's ``tokenizer`` with (token counts for masks and captions)."""
        from transformers import CLIPTokenizer

        return CLIPTokenizer

    @classmethod
    def content_tokens_mask(cls, tokenizer, prompt: str, length: int) -> np.ndarray | None:
        """(length,) bool: where the prompt's words sit in its embeddings, when the family lays them out its own way
        (a chat template); None: CLIP's or T5's layout (``ModelSpec.content_tokens_mask``)."""
        return None

    # -- single files (``--model x.safetensors``) --------------------------------------------------------------
    @classmethod
    def single_file_kind(cls, keys: dict, path: str) -> str | None:
        """The shipped config (``single_file_configs/<kind>``) a single file of this family needs, from its keys;
        None when the keys are not this family's; :class:`UnsupportedFile` for a file of the family this project
        cannot run, a UserError for a damaged one."""
        return None

    @classmethod
    def check_single_file(cls, path: str, model_config: str | None, configs: str, denoiser: dict) -> None:
        """One line, from a single file's header alone, for what loading it would need and lacks (driver side)."""
        return  # diffusers' from_single_file reads what the UNet families' files hold

    @classmethod
    def single_file_configs(cls, kind: str) -> str | None:
        """Where a single file of ``kind`` (:meth:`single_file_kind`) finds its diffusers configs when no
        ``model_config`` is given, or None: the shipped ``single_file_configs/<kind>``."""
        return None

    @classmethod
    def tokenizer_elsewhere(cls, config_dir: str, name: str, entry) -> str | None:
        """Where a tokenizer that ``config_dir`` lacks is found for this family (``entry``: its model_index.json
        entry, [library, class]), or None: the demo model's CLIP tokenizer files serve."""
        return None

    @classmethod
    def load_single_file(cls, path: str, configs: str, dtype, tokenizers: dict, options: dict, component):
        """The family's pipeline from a single-file checkpoint, configured from ``configs`` only (offline);
        ``component(name)``: a component the file lacks, loaded from ``configs``' directory."""
        return cls.pipeline_class().from_single_file(path, config=configs, local_files_only=True, torch_dtype=dtype,
                                                     **tokenizers, **options)

    # -- add-ons -----------------------------------------------------------------------------------------------
    @classmethod
    def claims_lora(cls, header: dict) -> bool:
        """Whether a LoRA file's keys are in this family's own key grammar (what no other family's file has)."""
        return False

    @classmethod
    @abstractmethod
    def check_lora(cls, header: dict, spec, what: str) -> None:
        """One line for a LoRA (its safetensors ``header``) that does not fit ``spec``'s model: another family's,
        other layers or sizes, a factor missing."""

    @classmethod
    def claims_controlnet(cls, config: dict) -> bool:
        """Whether a ControlNet's config is of this family's own ControlNet class (what no other family uses)."""
        return False

    @classmethod
    @abstractmethod
    def check_controlnet(cls, folder: str, config: dict, spec) -> None:
        """One line for a ControlNet (its ``config``) that does not fit ``spec``'s model."""

    @staticmethod
    @abstractmethod
    def controlnet_class():
        """The family's diffusers ControlNet class (imported on call)."""

    @abstractmethod
    def encode_prompts(self, prompts: list[str], max_tokens: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Step 6: (embeds (U, L, D), pooled (U, Dp) or None), float32. L is the family's text length: the family
        decides it from ``max_tokens`` (the run's ``max_sequence_length``; None: the family's default) and its
        encoder (a fixed-length encoder such as CLIP's 77 tokens ignores ``max_tokens``)."""

    @abstractmethod
    def denoise(self, latents: torch.Tensor, timestep, context: StageContext, view_ids: np.ndarray,
                rects: np.ndarray, regional: RegionalAttention, control: torch.Tensor | None = None) -> torch.Tensor:
        """Step 9a: the model output (the scheduler's parametrisation) of a CFG batch of view latents."""

    @abstractmethod
    def probe(self, vae, pixels: np.ndarray, noise: torch.Tensor, timestep: int, alpha_bar: float,
              prompt_embeds: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor:
        """Step 7: (tokens, h, w) attention maps of the global prompt over the native-size stage input."""


class UNetBackbone(Backbone):
    """A Stable Diffusion UNet family: CLIP text encoders, a 4-channel VAE, cross-attention over 77 tokens."""

    single_file_keys: tuple[str, ...] = ()  # key prefixes a single file of the family holds (all of them)
    single_file_name = ""  # how a refusal of the family's file names it ('SDXL')

    @classmethod
    def single_file_kind(cls, keys: dict, path: str) -> str | None:
        """The family's name when the file holds its keys; an inpainting UNet (other input channels) is refused."""
        if not cls.single_file_keys or not all(has_prefix(keys, prefix) for prefix in cls.single_file_keys):
            return None
        unet = "model.diffusion_model."
        conv_in = keys.get(unet + "input_blocks.0.0.weight", (0, 4, 3, 3))
        if len(conv_in) != 4:
            raise UserError(f"--model {path}: its {unet}input_blocks.0.0.weight has shape {tuple(conv_in)!r:.30} "
                            "(a convolution has 4 dimensions); the file is damaged: pass a sound checkpoint")
        if conv_in[1] != 4:
            raise UnsupportedFile(f"{cls.single_file_name} inpainting ({conv_in[1]} input channels)")
        return cls.family

    @classmethod
    def check_lora(cls, header: dict, spec, what: str) -> None:
        """Its cross-attention width and the UNet layers it names (:func:`.unet_addons.check_unet_lora`)."""
        check_unet_lora(header, spec, what)

    @classmethod
    def check_controlnet(cls, folder: str, config: dict, spec) -> None:
        """A ControlNetModel of the UNet's widths (:func:`.unet_addons.check_unet_controlnet`)."""
        check_unet_controlnet(folder, config, spec)

    @staticmethod
    def controlnet_class():
        from diffusers import ControlNetModel

        return ControlNetModel

    def __init__(self, unet, *, pipe=None, controlnet=None):
        self.unet, self.pipe, self.controlnet = unet, pipe, controlnet
        install_regional_processors(unet)  # plain attention unless a call passes `regional`
        if controlnet is not None:
            install_regional_processors(controlnet)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    # -- step 9a -----------------------------------------------------------------------------------------------
    def added_conditioning(self, context: StageContext, prompt_ids: torch.Tensor, rects: np.ndarray,
                           cfg: bool = True) -> dict | None:
        """The UNet's ``added_cond_kwargs`` for a CFG batch [uncond views; cond views] (``cfg``) or the cond views
        alone; None when it takes none."""
        return None

    @staticmethod
    def encoder_states(context: StageContext, prompt_ids: torch.Tensor, cfg: bool = True,
                       regional: bool = True) -> torch.Tensor:
        """Cross-attention states of a CFG batch: uncond rows [negative; negative], cond rows [global; regional]
        (the composer of :mod:`cupscale_dist.method.attention` splits them again); the cond rows alone without
        ``cfg``. ``regional`` False (:attr:`RegionalAttention.reads_regional`): the global tokens alone (uncond rows
        [negative]), as a plain pipeline's, so no layer projects or slices an unread half."""
        count = len(prompt_ids)
        cond = context.global_embeds.expand(count, -1, -1)
        uncond = context.negative_embeds
        if regional:
            cond = torch.cat([cond, context.regional_embeds[prompt_ids]], dim=1)
            uncond = torch.cat([uncond, uncond], dim=1)
        if not cfg:
            return cond
        return torch.cat([uncond.expand(count, -1, -1), cond])

    def denoise(self, latents: torch.Tensor, timestep, context: StageContext, view_ids: np.ndarray,
                rects: np.ndarray, regional: RegionalAttention, control: torch.Tensor | None = None) -> torch.Tensor:
        """The noise prediction of a CFG batch (2B, C, h, w) of scaled view latents, both halves in one call (or of
        the B conditional rows alone when ``regional.cfg`` is False).

        ``control`` (B, 3, H, W) in [0, 1]: each view's crop of the stage input for the ControlNet, whose residuals
        (times ``context.controlnet_scale``) join the UNet's skip connections.
        """
        device, dtype = self.device, self.dtype
        prompt_ids = torch.from_numpy(context.view_prompt[view_ids]).to(context.regional_embeds.device)
        states = self.encoder_states(context, prompt_ids, regional.cfg, regional.reads_regional).to(device, dtype)
        added = self.added_conditioning(context, prompt_ids, rects, regional.cfg)
        residuals = {}
        if self.controlnet is not None:  # both CFG halves see the view's crop, as diffusers' ControlNet pipelines do
            image = control.to(device, dtype)
            down, mid = self.controlnet(latents, timestep, encoder_hidden_states=states,
                                        controlnet_cond=torch.cat([image, image]) if regional.cfg else image,
                                        conditioning_scale=context.controlnet_scale, added_cond_kwargs=added,
                                        cross_attention_kwargs={"regional": regional}, return_dict=False)
            residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        return self.unet(latents, timestep, encoder_hidden_states=states, added_cond_kwargs=added,
                         cross_attention_kwargs={"regional": regional}, **residuals).sample

    # -- step 7 ------------------------------------------------------------------------------------------------
    def probe_conditioning(self, pooled: torch.Tensor | None, height: int, width: int) -> dict | None:
        """``added_cond_kwargs`` of the probe's pass over a native-size (height x width px) input."""
        return None

    @torch.no_grad()
    def probe(self, vae, pixels: np.ndarray, noise: torch.Tensor, timestep: int, alpha_bar: float,
              prompt_embeds: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor:
        """The native-size stage input (uint8 HxWx3), encoded and noised to ``timestep`` (``sqrt(abar) z +
        sqrt(1 - abar) noise``, the UNet's input space), through the UNet with the global prompt -> the
        (tokens, h, w) attention maps of :func:`cupscale_dist.method.masks.probe_attention_maps`."""
        latent = encode_pixels(vae, tile_to_tensor(pixels))
        noisy = math.sqrt(alpha_bar) * latent + math.sqrt(1 - alpha_bar) * noise
        added = self.probe_conditioning(pooled, *pixels.shape[:2])
        # Eager even under compile=true: the probe's processors record maps (a side effect dynamo recompiles every
        # block for), and its native-size shapes are used once; compiled, they would use up dynamo's recompile
        # limit and leave the denoising loop itself eager.
        with torch.compiler.set_stance("force_eager"):
            return probe_attention_maps(self.unet, noisy.to(self.device), timestep, prompt_embeds.to(self.device),
                                        added)
