"""Z-Image(-Turbo): a single-stream DiT over 2x2 latent patches of 16 channels, Qwen3 caption features.

What differs from FLUX.1 (docs/zimage.md; the facts in docs/zimage-notes.md, each pinned by a test):

* **the timestep convention**: the transformer is fed ``t = 1 - sigma`` (``(1000 - timestep) / 1000``, as
  ``ZImagePipeline`` computes it) and its output negated is the velocity ``v = noise - x0`` FlowMatchEuler steps with;
  :meth:`ZImage.denoise` returns that negated output, so the driver's scheduler, the flow prior and the start point
  are FLUX's, unchanged. The scheduler's shift is the model's own fixed 3.0 (no dynamic shifting).
* **positions**: each view's image patches sit at ``(caption + 1, top / 2 + row, left / 2 + col)`` (``positions:
  global``; 'local' from 0), computed by the RoPE formula, never the transformer's table (:mod:`.positions`), so a
  16K stage's positions past ``axes_lens`` are no IndexError;
* **one caption length per stage**: the image's first-axis position is the caption's padded length + 1, so every
  view's caption streams are the stage's one length (:meth:`ZImage.caption_length`): its real tokens, the model's
  ``cap_pad_token`` up to its own multiple of 32 (what diffusers does), then filler keys masked for every query;
* **captions**: Qwen3's ``hidden_states[-2]`` over the chat template, through ``ZImagePipeline.encode_prompt`` on the
  workers; every prompt keeps its own length (zero rows after it in the (U, L, D) array the contract carries);
* **regional attention** in the single-stream layers (:mod:`.attention`); guidance <= 1 is one pass per view, above
  1 the usual CFG batch ``uncond + s (cond - uncond)`` (= diffusers' ``pos + g (pos - neg)`` with ``g = s - 1``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch

from ....errors import UserError
from ....files.userfile import named
from ....method.attention import RegionalAttention
from ....method.step import StageContext
from ....method.vae import encode_pixels, tile_to_tensor
from ...offload_hooks import onload_device, onloaded
from ..base import TOKENIZER_FILES, Backbone
from .attention import ZRegional, bound, install_regional_processor
from .controlnet import check_zimage_controlnet
from .lora import check_zimage_lora, is_zimage_lora
from .positions import PATCH, caption_ids, padded_length, rope_freqs, stage_caption_length, view_image_ids
from .single_file import (
    TURBO_REPO,
    cached_turbo_dir,
    check_zimage_file,
    configs_for_file,
    is_zimage_file,
    load_transformer,
)

PROMPT_MARK = "{prompt}"  # a stand-in prompt that shows where the chat template puts the prompt
EMBEDDER = f"{PATCH}-1"  # the transformer's x_embedder / final layer key: patch size 2, frame patch 1


@dataclass(frozen=True)
class ZImageStage:
    """Z-Image's part of the stage context (``StageContext.family``): where each view's image patches sit
    ('global': the view's offset in the stage latent; 'local': from 0 in every view). No pooled prompt."""

    positions: str = "global"

    def to(self, device, dtype) -> ZImageStage:
        """Nothing to move (``StageContext.to``)."""
        return self


def caption_lengths(embeds: torch.Tensor) -> list[int]:
    """Each prompt's token count in a (U, L, D) array of captions zero-padded after their tokens (Qwen3's hidden
    states of real tokens are never all zero)."""
    nonzero = embeds.abs().amax(dim=-1) > 0  # (U, L)
    last = nonzero.shape[1] - nonzero.flip(-1).int().argmax(dim=-1)
    return [int(n) if bool(row.any()) else 0 for n, row in zip(last.tolist(), nonzero)]


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C) patches, row-major, each (ph, pw, C) as ``_patchify_image`` lays them."""
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // PATCH, PATCH, width // PATCH, PATCH).permute(0, 2, 4, 3, 5, 1)
    return patches.reshape(batch, (height // PATCH) * (width // PATCH), PATCH * PATCH * channels)


def unpatchify(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`patchify` for a (height x width) latent (the first h/2 * w/2 tokens)."""
    batch, _, dims = tokens.shape
    channels = dims // (PATCH * PATCH)
    count = (height // PATCH) * (width // PATCH)
    patches = tokens[:, :count].reshape(batch, height // PATCH, width // PATCH, PATCH, PATCH, channels)
    return patches.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, height, width)


def pad_rows(tokens: torch.Tensor, length: int) -> torch.Tensor:
    """(B, n, D) -> (B, length, D): the last row repeated (``_pad_with_ids``; the model replaces those rows)."""
    extra = length - tokens.shape[1]
    return tokens if extra <= 0 else torch.cat([tokens, tokens[:, -1:].expand(-1, extra, -1)], dim=1)


class ZImage(Backbone):
    family = "zimage"
    pipeline_names = ("ZImagePipeline", "ZImageImg2ImgPipeline")
    components = ("vae", "text_encoder", "tokenizer", "transformer", "scheduler")
    denoiser_name = "transformer"
    native_size = 1024  # Tongyi-MAI recommend 512-2048 px; the attention probe runs at 1024
    upcast_vae_in_fp16 = True  # FLUX.1's VAE: force_upcast
    max_sequence_length = 512  # ZImagePipeline's caption cap (tokens, chat template included)
    # Z-Image-Turbo before it is fetched (docs/zimage-notes.md, bench/results/zimage-cost-cpu.json: its published
    # configs built on the meta device): FLUX.1's VAE (factor 8, 16 channels), the transformer and Qwen3-4B
    published = MappingProxyType({"Tongyi-MAI/Z-Image-Turbo": {
        "geometry": (8, 16),
        "parameters": {"unet": 6_154_908_736, "text_encoder": 4_022_468_096, "text_encoder_2": 0, "vae": 83_819_683}}})
    # weights=offload (Backbone.offload_resident), on Turbo's published configs: of the transformer's 6.15 B
    # parameters, two 181 M layers (the 30 layers and 2 + 2 refiners are its block lists; the caption embedder, a
    # Sequential, gives two small ones) and the 2 M outside them; Qwen3 at leaf level: its 389 M token embedding
    offload_resident = MappingProxyType({"unet": (2 * 180_910_336 + 2_015_552) / 6_154_908_736,
                                         "text_encoder": 388_956_160 / 4_022_468_096})

    @staticmethod
    def pipeline_class():
        from diffusers import ZImagePipeline

        return ZImagePipeline

    @classmethod
    def pipeline_options(cls, model_index: dict) -> dict:
        return {}

    @classmethod
    def check_config(cls, config) -> None:
        """Z-Image patches 2x2 latent pixels and is a flow model with a fixed shift; what is not built says so."""
        if config.tile % PATCH or config.stride % PATCH:
            raise UserError(f"config: tile={config.tile}, stride={config.stride}: Z-Image patches 2x2 latent pixels; "
                            "use even values (e.g. tile 128, stride 64)")
        if config.scheduler not in ("euler", "flow_euler"):
            raise UserError(f"config: scheduler={config.scheduler!r}: Z-Image is a flow-matching model; use euler")
        spacing, shift_tokens = config.timestep_spacing, config.flow_shift_tokens
        refusals = [  # (refused, one line)
            (config.mask_mode == "pixel", "mask_mode=pixel is not implemented for Z-Image; use mask_mode=view or off"),
            (config.karras_sigmas,
             "karras_sigmas=true: Z-Image's sigmas are its pipeline's shifted linspace; set karras_sigmas=false"),
            (spacing is not None,
             f"timestep_spacing={spacing!r}: Z-Image's sigmas are its pipeline's; set timestep_spacing=none"),
            (shift_tokens != "view",
             f"flow_shift_tokens={shift_tokens!r}: Z-Image's shift is fixed; leave flow_shift_tokens=view"),
            (config.true_cfg != 1.0,
             f"true_cfg={config.true_cfg:g} is FLUX's; Z-Image's CFG is guidance_scale (> 1); set true_cfg=1"),
            (config.pooled_prompt != "global",
             "pooled_prompt=regional: Z-Image has no pooled prompt; set pooled_prompt=global"),
            (config.micro_conditioning != "global",
             "micro_conditioning=per_view is SDXL's; set micro_conditioning=global"),
        ]
        for refused, line in refusals:
            if refused:
                raise UserError(f"config: {line}")

    @classmethod
    def stage_fields(cls, config, image_hw: tuple[int, int], pooled: tuple) -> ZImageStage:
        """Each view's image at ``positions`` (CFG is the base's ``guidance_scale``, > 1; Turbo runs at 1: one pass
        per view)."""
        return ZImageStage(config.positions)

    @staticmethod
    def tokenizer_class():
        from transformers import AutoTokenizer

        return AutoTokenizer

    @classmethod
    def content_tokens_mask(cls, tokenizer, prompt: str, length: int) -> np.ndarray:
        """(length,) bool: the prompt's own tokens inside the chat template's (what the masks may screen); the
        template's tokens before and after it, and the padding, are always allowed."""
        def chat(content: str) -> str:  # ZImagePipeline's text for a prompt
            return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                 add_generation_prompt=True, enable_thinking=True)

        marked = chat(PROMPT_MARK)  # where the template puts the prompt (the prompt's own words could be "user")
        start = marked.index(PROMPT_MARK)
        before = len(tokenizer(marked[:start]).input_ids)
        after = len(tokenizer(marked[start + len(PROMPT_MARK):]).input_ids)
        mask = np.zeros(length, dtype=bool)
        mask[before : max(before, len(tokenizer(chat(prompt)).input_ids) - after)] = True
        return mask

    # -- single files (``--model z_image_turbo_bf16.safetensors``: the transformer alone) ---------------------------
    @classmethod
    def single_file_kind(cls, keys: dict, path: str) -> str | None:
        """'zimage' for a file holding Z-Image's transformer (its pad tokens; bare or ComfyUI's prefix)."""
        if not is_zimage_file(keys):
            return None
        if not str(path).lower().endswith(".safetensors"):
            raise UserError(f"--model {path}: Z-Image checkpoints are read as .safetensors only; save it as one")
        return cls.family

    @classmethod
    def single_file_configs(cls, kind: str) -> str | None:
        """Without ``model_config``: Z-Image-Turbo's pipeline in the hub cache (its text encoder, tokenizer, VAE)."""
        return configs_for_file() if kind == cls.family else None

    @classmethod
    def check_single_file(cls, path: str, model_config: str | None, configs: str, denoiser: dict) -> None:
        """From the header: its keys and shapes against the configs, and the weights it lacks in them
        (:func:`.single_file.check_zimage_file`)."""
        from ...weightfiles import checkpoint_keys

        check_zimage_file(path, checkpoint_keys(path), configs, denoiser)

    @classmethod
    def tokenizer_elsewhere(cls, config_dir: str, name: str, entry) -> str | None:
        """A Qwen tokenizer the directory lacks: Z-Image-Turbo's in the hub cache; none is one line (the demo's CLIP
        tokenizer would read other tokens)."""

        if not (isinstance(entry, list) and str(entry[-1]).startswith("Qwen")):
            return None
        cached = cached_turbo_dir()
        if cached is not None and any((Path(cached) / name / file).exists() for file in TOKENIZER_FILES):
            return str(Path(cached) / name)
        raise UserError(f"no Qwen tokenizer in {named(str(Path(config_dir) / name))} and none in the hub cache; "
                        f"huggingface-cli download {TURBO_REPO} --include 'tokenizer/*', or give model_config with one")

    @classmethod
    def load_single_file(cls, path: str, configs: str, dtype, tokenizers: dict, options: dict, component):
        """The transformer through diffusers' own conversion; the text encoder, VAE and scheduler from ``configs``'
        directory (model_config or the hub cache's)."""
        parts = {"transformer": load_transformer(path, configs, dtype)}
        for name in cls.components:
            if name not in parts and name not in tokenizers:
                parts[name] = component(name)
        return cls.pipeline_class()(**parts, **tokenizers, **options)

    # -- add-ons ---------------------------------------------------------------------------------------------------
    @classmethod
    def claims_lora(cls, header: dict) -> bool:
        """Z-Image LoRAs name its transformer's blocks (:func:`.lora.is_zimage_lora`)."""
        return is_zimage_lora(header)

    @classmethod
    def check_lora(cls, header: dict, spec, what: str) -> None:
        """Family both ways, its factor pairs, the layers and widths it names (:func:`.lora.check_zimage_lora`)."""
        check_zimage_lora(header, spec, what)

    @classmethod
    def claims_controlnet(cls, config: dict) -> bool:
        return config.get("_class_name") == "ZImageControlNetModel"

    @classmethod
    def check_controlnet(cls, folder: str, config: dict, spec) -> None:
        """Family both ways, widths, the layers it names (:func:`.controlnet.check_zimage_controlnet`)."""
        check_zimage_controlnet(folder, config, spec)

    @staticmethod
    def controlnet_class():
        from diffusers import ZImageControlNetModel

        return ZImageControlNetModel

    def __init__(self, transformer, *, pipe=None, controlnet=None):
        # a ControlNet's own layers and embedder; the embedders and refiners it shares with the transformer
        # (ZImageControlNetModel.from_transformer) are read from the transformer itself (control_hints)
        self.transformer, self.pipe, self.controlnet = transformer, pipe, controlnet
        self.processor = install_regional_processor(transformer)  # stock attention unless a call binds regional
        self._lengths: tuple[StageContext, dict] | None = None  # (context, its prompts' token counts)

    @property
    def device(self) -> torch.device:
        """Where the transformer computes: under weights=offload its blocks' onload device, not its parameters'."""
        return onload_device(self.transformer) or self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def text_length(self, requested: int | None = None) -> int:
        """Caption tokens per prompt (chat template included): the requested length, capped at the tokenizer's."""
        return min(requested or self.max_sequence_length, int(self.pipe.tokenizer.model_max_length))

    # -- step 6 ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], max_tokens: int | None = None) -> tuple[np.ndarray, None]:
        """(U, L, D) float32: each prompt's Qwen3 ``hidden_states[-2]`` over its chat text (ZImagePipeline's own
        encoding, on the worker), zero rows after its tokens; L = :meth:`text_length` of ``max_tokens``. No pooled."""
        length = self.text_length(max_tokens)
        embeds, _ = self.pipe.encode_prompt(list(prompts), device=self.pipe.device, do_classifier_free_guidance=False,
                                            max_sequence_length=length)  # a copy: diffusers rewrites the list
        out = np.zeros((len(prompts), length, embeds[0].shape[-1]), dtype=np.float32)
        for row, caption in enumerate(embeds):
            out[row, : len(caption)] = caption.float().cpu().numpy()
        return out, None

    def prompt_lengths(self, context: StageContext) -> dict:
        """Token counts of the stage's negative, global and regional prompts (counted once per stage context)."""
        if self._lengths is None or self._lengths[0] is not context:
            self._lengths = (context, {"negative": caption_lengths(context.negative_embeds)[0],
                                       "global": caption_lengths(context.global_embeds)[0],
                                       "regional": caption_lengths(context.regional_embeds)})
        return self._lengths[1]

    def caption_length(self, context: StageContext, regional: RegionalAttention) -> int:
        """The stage's one caption length: the longest prompt any view of the stage reads (the negative with CFG,
        the regional prompts when the composer reads them), padded to 32; the same for every view and batch."""
        lengths = self.prompt_lengths(context)
        read = [lengths["global"]]
        if regional.cfg:
            read.append(lengths["negative"])
        if regional.reads_regional:
            read.extend(lengths["regional"])
        return stage_caption_length(read)

    # -- step 9a -----------------------------------------------------------------------------------------------
    def denoise(self, latents: torch.Tensor, timestep, context: StageContext, view_ids: np.ndarray,
                rects: np.ndarray, regional: RegionalAttention, control: torch.Tensor | None = None) -> torch.Tensor:
        """The velocity (the negated model output) of a batch (B, 16, h, w) of view latents, a CFG batch
        [uncond views; cond views] when ``regional.cfg``."""
        if (control is None) != (self.controlnet is None):
            raise ValueError("a Z-Image ControlNet run needs control crops and a worker holding the ControlNet, or "
                             "neither")
        if regional.token_maps is not None:
            raise ValueError("mask_mode='pixel' is not implemented for Z-Image; use mask_mode='view'")
        lengths = self.prompt_lengths(context)
        caption = self.caption_length(context, regional)
        prompt_ids = context.view_prompt[view_ids]
        count = len(view_ids)
        streams = [(context.global_embeds.expand(count, -1, -1), [lengths["global"]] * count)]
        if regional.reads_regional:
            streams.append((context.regional_embeds[torch.from_numpy(prompt_ids)],
                            [lengths["regional"][i] for i in prompt_ids]))
        if regional.cfg:  # uncond rows: the negative prompt in every stream
            streams = [(torch.cat([context.negative_embeds.expand(count, -1, -1), embeds]),
                        [lengths["negative"]] * count + counts) for embeds, counts in streams]
        ids = view_image_ids(rects, caption, context.family.positions)
        if regional.cfg:
            ids = torch.cat([ids, ids])
        screen = regional.global_bias(1, self.dtype, self.device)  # (B, 1, 1, G) or None
        t = torch.full((latents.shape[0],), float(timestep), dtype=torch.float32, device=self.device)
        t = (1000 - t) / 1000  # ZImagePipeline: the transformer is fed 1 - sigma
        steer = {}  # no ControlNet: forward's own call (a subclass's forward may take no control)
        if control is not None:  # each view's own crop, both CFG halves alike
            cond = self.control_latents(control)
            steer = {"control": (torch.cat([cond, cond]) if regional.cfg else cond, context.controlnet_scale)}
        out = self.forward(latents, t, streams, caption, ids, screen, regional.lambda_global, regional.composer,
                           **steer)
        return -out  # ZImagePipeline negates the output: the velocity noise - x0 the scheduler steps with

    def forward(self, *args, **kwargs) -> torch.Tensor:
        """:meth:`run_layers` with the transformer's (and the ControlNet's) own forward hooks around it: under
        weights=offload they onload what lies outside the blocks (embedders, pad tokens, final layer)."""
        with onloaded(self.transformer), onloaded(self.controlnet):
            return self.run_layers(*args, **kwargs)

    def run_layers(self, latents: torch.Tensor, t: torch.Tensor, streams: list, caption: int, ids: torch.Tensor,
                   screen: torch.Tensor | None = None, lambda_global: float = 1.0, composer: str = "mix",
                   probe: list | None = None, control: tuple | None = None) -> torch.Tensor:
        """``ZImageTransformer2DModel.forward`` (basic mode) with each row's image at its own positions and up to two
        caption streams of ``caption`` tokens: the same modules and operations, so one stream whose captions pad to
        ``caption``, nothing screened and no probe is the stock forward's computation.

        Args:
            latents (tensor (B, 16, h, w)): the views, in the transformer's dtype.
            t (tensor (B,)): the model's time, 1 - sigma.
            streams (list of (embeds (B, L, D), token counts)): the global stream, then the regional one if any.
            caption (int): the stage's caption length (a multiple of 32); ids (B, padded patches, 3): image ids.
            screen (tensor (B, 1, 1, G), *optional*): the screen of the global stream's tokens, image queries only.
            control ((latents (B, 16, h, w), scale), *optional*): the views' control latents for the ControlNet, whose
                samples (:meth:`control_hints`) are added after the layers it names.
        """
        tr, device, dtype = self.transformer, self.device, self.dtype
        rows, (height, width) = latents.shape[0], latents.shape[-2:]
        x = latents.to(device, dtype)
        adaln = tr.t_embedder(t.to(device) * tr.t_scale).type_as(x)
        # image: patches padded to 32 (the last patch repeated, then the learned pad token), the noise refiner
        patches = patchify(x)
        count = patches.shape[1]
        image = padded_length(count)
        embedded = tr.all_x_embedder[EMBEDDER](pad_rows(patches, image).reshape(rows * image, -1))
        pad = (torch.arange(image, device=device) >= count)[None, :, None].expand(rows, -1, 1)
        x = torch.where(pad.reshape(-1, 1), tr.x_pad_token, embedded).view(rows, image, -1)
        x_freqs = self.rope(ids.reshape(-1, 3)).view(rows, image, -1)
        embedded_x = x
        for layer in tr.noise_refiner:
            x = layer(x, None, x_freqs, adaln)
        # captions: each stream through the context refiner on its own
        cap_freqs = self.rope(caption_ids(caption)).expand(rows, -1, -1)
        sequence, freqs, keep = [x], [x_freqs], [torch.ones(rows, image, dtype=torch.bool, device=device)]
        for embeds, lengths in streams:
            feats, kept = self.caption_stream(embeds, lengths, caption)
            for layer in tr.context_refiner:
                feats = layer(feats, None if bool(kept.all()) else kept, cap_freqs)
            sequence.append(feats)
            freqs.append(cap_freqs)
            keep.append(kept)
        first_stream = (sequence[:2], freqs[:2], keep[:2])  # [image; global caption]: what a ControlNet reads
        unified, unified_freqs, keep = torch.cat(sequence, dim=1), torch.cat(freqs, dim=1), torch.cat(keep, dim=1)
        regional = None
        if len(streams) > 1 or screen is not None or probe is not None or not bool(keep.all()):
            key_bias = None
            if not bool(keep.all()):
                key_bias = torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill(~keep, float("-inf"))
                key_bias = key_bias[:, None, None, :]
            regional = ZRegional(image, caption, caption if len(streams) > 1 else 0, key_bias,
                                 self.stage_screen(screen, caption), lambda_global, composer, probe)
        hints = {}
        if control is not None:  # on [image; global caption], as the ControlNet was trained (one caption)
            hints = self.control_hints(control[0], control[1], embedded_x, *first_stream, adaln)
            extra = unified.shape[1] - image - caption  # the regional stream: no sample of its own
            hints = {i: torch.cat([h, h.new_zeros(rows, extra, h.shape[-1])], dim=1) if extra else h
                     for i, h in hints.items()}
        with bound(self.processor, regional):
            for index, layer in enumerate(tr.layers):
                unified = layer(unified, None, unified_freqs, adaln)
                if index in hints:
                    unified = unified + hints[index]
        unified = tr.all_final_layer[EMBEDDER](unified, c=adaln)
        return unpatchify(unified, height, width)

    def control_latents(self, control: torch.Tensor) -> torch.Tensor:
        """Z-Image ControlNets read the control image as VAE latents (ZImageControlNetPipeline): [0, 1] crops ->
        [-1, 1] -> the posterior mean (the pipeline's ``argmax``) -> shifted and scaled."""
        return encode_pixels(self.pipe.vae, control * 2 - 1).to(self.device, self.dtype)

    def control_hints(self, latents: torch.Tensor, scale: float, embedded_x: torch.Tensor, sequence: list,
                      freqs: list, keep: list, adaln: torch.Tensor) -> dict[int, torch.Tensor]:
        """``ZImageControlNetModel.forward`` on the rows' own positions: layer index -> the (B, image + caption, dim)
        sample added after that transformer layer, times ``scale``.

        Args:
            latents (tensor (B, 16, h, w)): the control latents (zero channels appended up to ``control_in_dim``).
            embedded_x (tensor (B, image, dim)): the image tokens before the noise refiner.
            sequence, freqs, keep (lists of two): the refined image tokens and the global caption stream, their
                rotations and their kept keys ([image; caption] as the transformer's single-stream layers see it).
        """
        net, tr = self.controlnet, self.transformer
        rows, image = embedded_x.shape[:2]
        extra = net.config.control_in_dim - latents.shape[1]
        if extra > 0:  # the 2.x models take 33 channels: the latents, then zeros (ZImageControlNetPipeline)
            latents = torch.cat([latents, latents.new_zeros(rows, extra, *latents.shape[2:])], dim=1)
        patches = patchify(latents.to(self.device, self.dtype))
        count = patches.shape[1]
        embedded = net.control_all_x_embedder[EMBEDDER](pad_rows(patches, image).reshape(rows * image, -1))
        pad = (torch.arange(image, device=self.device) >= count)[None, :, None].expand(rows, -1, 1)
        c = torch.where(pad.reshape(-1, 1), tr.x_pad_token, embedded).view(rows, image, -1)
        x, x_freqs, x_keep = embedded_x, freqs[0], keep[0]
        if net.add_control_noise_refiner is not None:  # 2.x: samples for the noise refiner too (its own copy of x)
            layers = net.control_layers if net.add_control_noise_refiner == "control_layers" else \
                net.control_noise_refiner
            for layer in layers:
                c = layer(c, x, x_keep, x_freqs, adaln)
            *refiner_hints, c = torch.unbind(c)
            refiner_hints = dict(zip(net.control_refiner_layers_places, refiner_hints))
            for index, layer in enumerate(tr.noise_refiner):
                x = layer(x, x_keep, x_freqs, adaln)
                if index in refiner_hints:
                    x = x + refiner_hints[index] * scale
        else:
            for layer in tr.noise_refiner:
                x = layer(x, x_keep, x_freqs, adaln)
            for layer in net.control_noise_refiner:
                c = layer(c, x_keep, x_freqs, adaln)
        caption, cap_keep = sequence[1], keep[1]
        unified = torch.cat([x, caption], dim=1)
        unified_keep, unified_freqs = torch.cat([x_keep, cap_keep], dim=1), torch.cat(freqs, dim=1)
        c = torch.cat([c, caption], dim=1)
        for layer in net.control_layers:
            c = layer(c, unified, unified_keep, unified_freqs, adaln)
        return {place: hint * scale for place, hint in zip(net.control_layers_places, torch.unbind(c)[:-1])}

    def rope(self, ids: torch.Tensor) -> torch.Tensor:
        """The transformer's rotations at ``ids`` by the formula (any position: past ``axes_lens`` too)."""
        embedder = self.transformer.rope_embedder
        return rope_freqs(ids.to(self.device), embedder.axes_dims, embedder.theta)

    def caption_stream(self, embeds: torch.Tensor, lengths: list[int], caption: int):
        """(B, caption, dim) embedded captions: each row's real tokens, ``cap_pad_token`` up to its own multiple of 32
        (diffusers' padding) and on to ``caption`` (filler), and (B, caption) which keys are kept (not filler)."""
        tr, device = self.transformer, self.device
        rows = embeds.shape[0]
        feats = embeds[:, :caption].to(device, self.dtype)
        if feats.shape[1] < caption:
            feats = torch.cat([feats, feats.new_zeros(rows, caption - feats.shape[1], feats.shape[2])], dim=1)
        real = torch.tensor(lengths, device=device)[:, None]
        positions = torch.arange(caption, device=device)[None, :]
        embedded = tr.cap_embedder(feats.reshape(rows * caption, -1))
        pad = (positions >= real).reshape(-1, 1)
        feats = torch.where(pad, tr.cap_pad_token, embedded).view(rows, caption, -1)
        kept = positions < torch.tensor([padded_length(n) for n in lengths], device=device)[:, None]
        return feats, kept

    @staticmethod
    def stage_screen(screen: torch.Tensor | None, caption: int) -> torch.Tensor | None:
        """The (B, 1, 1, G) screen over the encoded prompt's G tokens, as (B, 1, 1, caption) over the caption stream
        (pad and filler tokens allowed)."""
        if screen is None:
            return None
        tokens = min(screen.shape[-1], caption)
        out = screen.new_zeros(*screen.shape[:-1], caption)
        out[..., :tokens] = screen[..., :tokens]
        return out

    # -- step 7 ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def probe(self, vae, pixels: np.ndarray, noise: torch.Tensor, timestep: int, alpha_bar: float,
              prompt_embeds: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor:
        """The native-size input, encoded and noised to ``sigma = timestep / 1000`` (``(1 - sigma) z + sigma noise``;
        ``alpha_bar`` is unused), through the transformer with the global prompt -> the (L, h/2, w/2) image->caption
        maps of the single-stream layers, averaged over heads and layers (rows past the caption's tokens: 0)."""
        sigma = float(timestep) / 1000
        latent = encode_pixels(vae, tile_to_tensor(pixels))
        noisy = (1 - sigma) * latent + sigma * noise
        height, width = noisy.shape[-2:]
        tokens = caption_lengths(prompt_embeds)[0]
        caption = padded_length(tokens)
        maps: list[torch.Tensor] = []
        ids = view_image_ids(np.array([[0, 0, height, width]]), caption, "global")
        t = torch.full((1,), 1 - sigma, dtype=torch.float32)
        self.forward(noisy.to(self.dtype), t, [(prompt_embeds, [tokens])], caption, ids, probe=maps)
        count = (height // PATCH) * (width // PATCH)
        probs = torch.stack(maps).mean(dim=0)[0, :count].float()  # (S, caption)
        out = torch.zeros(prompt_embeds.shape[1], count)
        shown = min(caption, prompt_embeds.shape[1])
        out[:shown] = probs.T[:shown].cpu()
        return out.reshape(-1, height // PATCH, width // PATCH)
