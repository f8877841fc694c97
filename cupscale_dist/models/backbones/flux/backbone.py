"""Flux.1 (dev and schnell): a DiT over packed 2x2 latent patches, CLIP pooled + T5 sequence text, joint attention.

Three differences from the UNet families (method.md "Other backbones"):

* **positions**: each view's image tokens carry RoPE ids of their place in the whole stage latent (the view's
  offset in packed patches), per view in one batched call (:mod:`cupscale_dist.models.backbones.flux.joint_attention`);
* **regional attention**: the screening mask and the lambda composer act on the image->text block of the joint
  attention; lambda = 1 with nothing screened sends the global prompt alone through the stock attention;
* **guidance**: FLUX.1-dev takes ``guidance_scale`` as an input embedding (:attr:`FluxStage.distilled_guidance`), one
  pass per view; real CFG with a negative prompt (the ``true_cfg`` knob) is the usual CFG batch at twice the cost.
The model output is the flow-matching velocity ``v = noise - x0``; the driver's scheduler adapter knows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import torch

from ....errors import UserError
from ....method.attention import RegionalAttention
from ....method.step import StageContext
from ....method.vae import encode_pixels, tile_to_tensor
from ...lora_keys import check_factor_pairs
from ..base import Backbone, PooledStage, UNetBackbone, has_prefix
from .controlnet import check_flux_controlnet
from .header import check_flux_file, flux_variant, t5_tokenizer_dir
from .joint_attention import (
    BoundJointProcessor,
    JointRegional,
    install_joint_processors,
)
from .lora import check_flux_lora, is_flux_lora

PATCH = 2  # Flux packs 2x2 latent pixels into one token


@dataclass(frozen=True)
class FluxStage(PooledStage):
    """FLUX.1's part of the stage context (``StageContext.family``): the pooled CLIP embeddings
    (:class:`PooledStage`), where each view's image tokens sit and the guidance embedding's value."""

    positions: str = "global"  # 'global': the view's offset in the stage latent; 'local': from 0 in every view
    distilled_guidance: float | None = None  # FLUX.1-dev's guidance embedding (None: the model has none)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C) tokens, row-major over patches (FluxPipeline._pack_latents' layout)."""
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // PATCH, PATCH, width // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // PATCH) * (width // PATCH), channels * PATCH * PATCH)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for a (height x width) latent."""
    batch, _, dims = tokens.shape
    channels = dims // (PATCH * PATCH)
    patches = tokens.view(batch, height // PATCH, width // PATCH, channels, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, channels, height, width)


def image_ids(rects: np.ndarray, positions: str) -> torch.Tensor:
    """(V, tokens, 3) RoPE ids (t, y, x) of each view's patches, in patch units (method.md "Positions").

    'global': the view's offset in the stage latent is added (an odd latent offset is a half-patch position:
    RoPE takes real-valued positions); 'local': every view starts at 0, as a whole image would (what peers do).
    """
    rows = []
    for top, left, bottom, right in np.asarray(rects):
        height, width = (int(bottom) - int(top)) // PATCH, (int(right) - int(left)) // PATCH
        ids = torch.zeros(height, width, 3)
        ids[..., 1] = torch.arange(height)[:, None]
        ids[..., 2] = torch.arange(width)[None, :]
        if positions == "global":
            ids[..., 1] += float(top) / PATCH
            ids[..., 2] += float(left) / PATCH
        rows.append(ids.reshape(height * width, 3))
    return torch.stack(rows)


def rotary_tables(pos_embed, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``pos_embed(ids)`` (Flux's FluxPosEmbed: one 1-D RoPE table per axis, concatenated) evaluated once per distinct
    position of each axis and gathered: the same bytes, since each entry depends on its own position only.

    A view batch repeats few positions (a 64 x 64-patch view has 64 rows, 64 columns, and text ids all 0); calling
    ``pos_embed`` on every id cost 9.7 s per 8K step on 2 CPU cores (bench/flux_cost.py), this a few ms.
    """
    cos_parts, sin_parts = [], []
    for axis in range(ids.shape[-1]):
        values, where = torch.unique(ids[:, axis], return_inverse=True)
        single = torch.zeros(len(values), ids.shape[-1], device=ids.device, dtype=ids.dtype)
        single[:, axis] = values
        cos, sin = pos_embed(single)  # every axis evaluated; this axis' slice of the table is what is kept
        start = sum(pos_embed.axes_dim[:axis])
        stop = start + pos_embed.axes_dim[axis]
        cos_parts.append(cos[where, start:stop])
        sin_parts.append(sin[where, start:stop])
    return torch.cat(cos_parts, dim=-1), torch.cat(sin_parts, dim=-1)


class Flux(Backbone):
    family = "flux"
    pipeline_names = ("FluxPipeline", "FluxImg2ImgPipeline")
    components = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "transformer", "scheduler")
    denoiser_name = "transformer"
    native_size = 1024  # FLUX.1 was trained around 1024 px (the attention probe's size)
    mask_tokenizer = "tokenizer_2"  # the T5 sequence is what the transformer attends to; CLIP only gives the pooled
    # The attention probe's embedded guidance (a guess: the probe's call carries no config): FluxPipeline's default
    # guidance_scale, what FLUX.1-dev is mostly run at, so the probe's maps are those of an ordinary pass.
    probe_guidance = 3.5
    # T5 tokens per prompt when a call gives none (config.max_sequence_length does): FLUX.1-dev's 512
    max_sequence_length = 512
    # FLUX.1-dev and -schnell before they are fetched (the shipped configs, models/single_file_configs/flux-*, are
    # theirs: built on the meta device, tests/models/test_flux_single_file.py): the VAE's factor 8 and 16 latent
    # channels (vae_geometry of a local directory: the 2x2 packing is the transformer's), CLIP-L, T5-XXL's encoder and
    # the transformer, schnell's without the 10.2 M guidance embedder
    published = MappingProxyType({
        "black-forest-labs/FLUX.1-dev": {"geometry": (8, 16), "parameters": {
            "unet": 11_901_408_320, "text_encoder": 123_060_480, "text_encoder_2": 4_762_310_656, "vae": 83_819_683}},
        "black-forest-labs/FLUX.1-schnell": {"geometry": (8, 16), "parameters": {
            "unet": 11_891_178_560, "text_encoder": 123_060_480, "text_encoder_2": 4_762_310_656, "vae": 83_819_683}}})
    # weights=offload (Backbone.offload_resident), on FLUX.1-dev's published configs: of the transformer's 11.9 B
    # parameters, two 340 M double-stream blocks (its block lists: 19 of those, 38 single-stream ones of 142 M) and
    # the 64 M outside them; the encoders at leaf level: T5's largest leaf, its 132 M token embedding (CLIP's: 38 M)
    offload_resident = MappingProxyType({"unet": (2 * 339_831_296 + 64_124_992) / 11_901_408_320,
                                         "text_encoder_2": 131_596_288 / 4_762_310_656})

    @staticmethod
    def pipeline_class():
        from diffusers import FluxPipeline

        return FluxPipeline

    @classmethod
    def pipeline_options(cls, model_index: dict) -> dict:
        return {}

    @classmethod
    def check_config(cls, config) -> None:
        """Flux packs 2x2 latent pixels: views must have even sides; the parts not built for Flux yet say so."""
        if config.tile % PATCH or config.stride % PATCH:
            raise UserError(f"config: tile={config.tile}, stride={config.stride}: Flux packs 2x2 latent patches; use "
                            "even values (e.g. tile 128, stride 64)")
        if config.mask_mode == "pixel":
            raise UserError("config: mask_mode=pixel is not implemented for Flux; use mask_mode=view or off")
        if config.scheduler not in ("euler", "flow_euler"):
            raise UserError(f"config: scheduler={config.scheduler!r}: Flux is a flow-matching model; use euler")
        # FluxPipeline's sigmas (linspace(1, 1/T, T), shifted by mu) are passed to the scheduler: its own spacing and
        # Karras option are never read, so these knobs would change only the metadata.
        if config.karras_sigmas:
            raise UserError("config: karras_sigmas=true: Flux's sigmas are FluxPipeline's shifted linspace and "
                            "ignore it; set karras_sigmas=false")
        if config.timestep_spacing is not None:
            raise UserError(f"config: timestep_spacing={config.timestep_spacing!r}: Flux's sigmas are FluxPipeline's "
                            "shifted linspace and ignore it; set timestep_spacing=none")

    @classmethod
    def cfg_scale(cls, config) -> float:
        """CFG runs only with ``true_cfg`` > 1 (its negative prompt); ``guidance_scale`` is the guidance embedding."""
        return config.true_cfg

    @classmethod
    def stage_fields(cls, config, image_hw: tuple[int, int], pooled: tuple) -> FluxStage:
        """The pooled embeddings (``pooled_prompt``), each view's image tokens at ``positions``, and FLUX.1-dev's
        guidance embedding ``guidance_scale``."""
        return FluxStage(*pooled, config.pooled_prompt, config.positions, config.guidance_scale)

    # -- single files ------------------------------------------------------------------------------------------
    @classmethod
    def single_file_kind(cls, keys: dict, path: str) -> str | None:
        """'flux-dev' or 'flux-schnell' for a file with Flux's double-stream blocks (BFL or ComfyUI layout)."""
        if not (has_prefix(keys, "model.diffusion_model.double_blocks.") or has_prefix(keys, "double_blocks.")):
            return None
        if not str(path).lower().endswith(".safetensors"):
            raise UserError(f"--model {path}: Flux checkpoints are read as .safetensors only; save it as one")
        return f"flux-{flux_variant(keys)}"

    @classmethod
    def check_single_file(cls, path: str, model_config: str | None, configs: str, denoiser: dict) -> None:
        """From the header: the components it lacks, its variant against the configs, its tensors (:mod:`.header`)."""
        from ...weightfiles import checkpoint_keys

        check_flux_file(path, checkpoint_keys(path), model_config, configs, denoiser)

    @classmethod
    def tokenizer_elsewhere(cls, config_dir: str, name: str, entry) -> str | None:
        """A T5 tokenizer (``tokenizer_2``) the directory lacks: the hub cache's (:func:`.header.t5_tokenizer_dir`)."""
        if isinstance(entry, list) and str(entry[-1]).startswith("T5"):
            return t5_tokenizer_dir(config_dir)
        return None

    @classmethod
    def load_single_file(cls, path: str, configs: str, dtype, tokenizers: dict, options: dict, component):
        """diffusers' Flux conversion is fixed at FLUX.1's width: ours (:mod:`.single_file`), any width; what the
        file lacks comes from ``configs``' directory (model_config)."""
        from .single_file import flux_file_components

        parts = flux_file_components(path, configs, dtype)
        for name in cls.components:  # what the file lacks: from model_config's directory
            if name not in parts and name not in tokenizers:
                parts[name] = component(name)
        return cls.pipeline_class()(**parts, **tokenizers, **options)

    # -- add-ons -----------------------------------------------------------------------------------------------
    @classmethod
    def claims_lora(cls, header: dict) -> bool:
        """Flux LoRAs name transformer blocks (:func:`.lora.is_flux_lora`)."""
        return is_flux_lora(header)

    @classmethod
    def check_lora(cls, header: dict, spec, what: str) -> None:
        """Family both ways, the blocks and layers it names, then its factor pairs (:func:`.lora.check_flux_lora`)."""
        check_flux_lora(header, spec, what)
        check_factor_pairs(header, what)

    @classmethod
    def claims_controlnet(cls, config: dict) -> bool:
        return config.get("_class_name") == "FluxControlNetModel"

    @classmethod
    def check_controlnet(cls, folder: str, config: dict, spec) -> None:
        """Family both ways and the transformer's widths (:func:`.controlnet.check_flux_controlnet`)."""
        check_flux_controlnet(folder, config, spec)

    @staticmethod
    def controlnet_class():
        from diffusers import FluxControlNetModel

        return FluxControlNetModel

    def __init__(self, transformer, *, pipe=None, controlnet=None):
        self.transformer, self.pipe, self.controlnet = transformer, pipe, controlnet
        install_joint_processors(transformer)  # stock attention unless a call passes `regional`
        self.control_processor = None
        if controlnet is not None:  # its blocks get no joint_attention_kwargs: the call's inputs are bound instead
            self.control_processor = BoundJointProcessor()
            controlnet.set_attn_processor(self.control_processor)

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def text_length(self, requested: int | None = None) -> int:
        """T5 tokens per prompt: the requested length, capped at the tokenizer's own model_max_length."""
        return min(requested or self.max_sequence_length, int(self.pipe.tokenizer_2.model_max_length))

    # -- step 6 ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], max_tokens: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(T5 sequence (U, L, D), CLIP pooled (U, Dp)), float32 (the encoders run on the worker); L =
        :meth:`text_length` of ``max_tokens``."""
        embeds, pooled, _ = self.pipe.encode_prompt(prompts, prompt_2=None, device=self.pipe.device,
                                                    max_sequence_length=self.text_length(max_tokens))
        return embeds.float().cpu().numpy(), pooled.float().cpu().numpy()

    # -- step 9a -----------------------------------------------------------------------------------------------
    def rotary(self, text_tokens: int, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row (cos, sin) (B, T + S, D) from the transformer's own position embedding; text ids are 0."""
        rows, tokens = ids.shape[:2]
        every = torch.cat([torch.zeros(rows, text_tokens, 3), ids], dim=1).reshape(-1, 3)
        cos, sin = rotary_tables(self.transformer.pos_embed, every.to(self.device))
        return cos.reshape(rows, text_tokens + tokens, -1), sin.reshape(rows, text_tokens + tokens, -1)

    def denoise(self, latents: torch.Tensor, timestep, context: StageContext, view_ids: np.ndarray,
                rects: np.ndarray, regional: RegionalAttention, control: torch.Tensor | None = None) -> torch.Tensor:
        """The velocity prediction of a batch (B, 16, h, w) of view latents (a CFG batch with ``true_cfg``)."""
        if (control is None) != (self.controlnet is None):
            raise ValueError("a Flux ControlNet run needs control crops and a worker holding the ControlNet, or "
                             "neither")
        if regional.token_maps is not None:
            raise ValueError("mask_mode='pixel' is not implemented for Flux; use mask_mode='view'")
        device, dtype = self.device, self.dtype
        height, width = latents.shape[-2:]
        prompt_ids = torch.from_numpy(context.view_prompt[view_ids]).to(context.regional_embeds.device)
        bias = regional.global_bias(1, dtype, device)  # (B, 1, 1, G) or None when nothing is screened
        states = UNetBackbone.encoder_states(context, prompt_ids, regional.cfg, regional.reads_regional)
        pooled = context.family.pooled(prompt_ids, regional.cfg)
        ids = image_ids(rects, context.family.positions)
        if regional.cfg:
            ids = torch.cat([ids, ids])
        global_tokens = context.global_embeds.shape[1]
        joint = JointRegional(global_tokens, states.shape[1] - global_tokens, self.rotary(states.shape[1], ids),
                              regional.lambda_global, regional.composer, bias)
        rows = latents.shape[0]
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((rows,), float(context.family.distilled_guidance), device=device,
                                  dtype=torch.float32)
        # Flux's timestep input is sigma = t / 1000 (FluxPipeline passes timestep / 1000)
        sigma = torch.full((rows,), float(timestep) / 1000, device=device, dtype=dtype)
        inputs = {"hidden_states": pack_latents(latents).to(device, dtype), "timestep": sigma, "guidance": guidance,
                  "pooled_projections": pooled.to(device, dtype), "encoder_hidden_states": states.to(device, dtype),
                  "txt_ids": torch.zeros(states.shape[1], 3, device=device), "img_ids": ids[0].to(device),
                  "joint_attention_kwargs": {"regional": joint}, "return_dict": False}
        residuals = {}
        if self.controlnet is not None:  # each view's own crop, both CFG halves alike
            cond = self.control_latents(control)
            self.control_processor.bound = joint
            try:
                blocks, singles = self.controlnet(controlnet_cond=torch.cat([cond, cond]) if regional.cfg else cond,
                                                  conditioning_scale=context.controlnet_scale, **inputs)
            finally:
                self.control_processor.bound = None
            residuals = {"controlnet_block_samples": blocks, "controlnet_single_block_samples": singles}
        out = self.transformer(**inputs, **residuals)[0]
        return unpack_latents(out, height, width)

    def control_latents(self, control: torch.Tensor) -> torch.Tensor:
        """Flux ControlNets read the control image as packed VAE latents (FluxControlNetPipeline): [0, 1] crops ->
        [-1, 1] -> the posterior mean (deterministic, where the pipeline samples) -> shifted, scaled, packed."""
        latents = encode_pixels(self.pipe.vae, control * 2 - 1)
        return pack_latents(latents).to(self.device, self.dtype)

    # -- step 7 ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def probe(self, vae, pixels: np.ndarray, noise: torch.Tensor, timestep: int, alpha_bar: float,
              prompt_embeds: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor:
        """The native-size input, encoded and noised to ``sigma = timestep / 1000`` (``(1 - sigma) z + sigma
        noise``, flow matching; ``alpha_bar`` is unused), through the transformer with the global prompt -> the
        (tokens, h/2, w/2) image->text maps of the double-stream blocks, averaged over heads and blocks."""
        sigma = float(timestep) / 1000
        latent = encode_pixels(vae, tile_to_tensor(pixels))
        noisy = (1 - sigma) * latent + sigma * noise
        height, width = noisy.shape[-2:]
        rects = np.array([[0, 0, height, width]])
        tokens = prompt_embeds.shape[1]
        maps: list[torch.Tensor] = []
        ids = image_ids(rects, "global")
        joint = JointRegional(tokens, 0, self.rotary(tokens, ids), probe=maps)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((1,), self.probe_guidance, device=self.device, dtype=torch.float32)
        self.transformer(hidden_states=pack_latents(noisy).to(self.device, self.dtype),
                         timestep=torch.full((1,), sigma, device=self.device, dtype=self.dtype), guidance=guidance,
                         pooled_projections=pooled.to(self.device, self.dtype),
                         encoder_hidden_states=prompt_embeds.to(self.device, self.dtype),
                         txt_ids=torch.zeros(tokens, 3, device=self.device), img_ids=ids[0].to(self.device),
                         joint_attention_kwargs={"regional": joint}, return_dict=False)
        probs = torch.stack(maps).mean(dim=0)[0].float()  # (S, G)
        return probs.T.reshape(tokens, height // PATCH, width // PATCH).cpu()
