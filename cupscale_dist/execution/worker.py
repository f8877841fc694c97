"""Every forward pass of the method, on one device: :class:`ModelWorker`.

A ``ModelWorker`` holds the whole pipeline (UNet, VAE, text encoders) and offers one method per kind of call the
method makes: ``predict`` (9a), ``encode_tile`` (2), ``decode_tile`` (10), ``encode_prompts`` (6) and ``probe`` (7).
Each only calls a core function (:mod:`step`, :mod:`vae`, :mod:`masks`) and returns numpy arrays. The driver never
calls a module directly: it asks an *executor* to ``map`` a method over calls, in order. ``executor.LocalExecutor``
(the single-process reference) runs them in this process; ``pool.RayExecutor`` fans them out to actors that each
hold a ``ModelWorker``. Same functions, same calls, same order: the same bytes.

Why every forward pass sits on the workers, the VAE too: a CPU-only head decodes one 1024 px SDXL tile in about
2 minutes and a 16K stage has 441 of them (architecture.md); on a GPU worker it is 90 ms.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..errors import UserError
from ..method.step import StageContext, predict_views
from ..method.vae import decode_latents, encode_pixels, read_only_tensor, tile_to_tensor
from ..models.addons import Addons, addon_request
from ..models.backbones import backbone_class
from ..models.controlnet import control_tensor
from ..models.loading import load_pipeline, resolve_device, resolve_dtype
from ..models.spec import ModelSpec
from ..models.weights import apply_weights_mode, check_compile, check_weights_mode, compile_denoiser

log = logging.getLogger(__name__)


def finite_vae_output(tensor, what: str):
    """A VAE tile with NaN or inf stops the run in one line (checked here, on the worker: the clamp to 8 bits would
    turn it into a black or white picture written with exit 0)."""
    if not torch.isfinite(tensor).all():
        raise UserError(f"the VAE {what} a tile to NaN or inf; likely causes: a VAE file with NaN/inf weights, "
                        "float16 overflow (use --dtype bfloat16 or float32, or a VAE made for float16)")
    return tensor


NO_ADDONS = Addons()  # frozen: one shared default is safe


class ModelWorker:
    """The loaded pipeline on one device, one method per kind of forward pass (numpy in, numpy out)."""

    def __init__(self, model_dir: str, device: str = "auto", dtype: str = "auto", variant: str | None = None,
                 spec: ModelSpec | None = None, addons: Addons = NO_ADDONS, model_config: str | None = None,
                 weights: str = "full", compile: bool = False):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        check_weights_mode(weights, self.device)  # before any weights load
        if compile:
            check_compile(self.device)
        # a resolved spec keeps the user's name for logs and errors
        self.spec = spec or ModelSpec.read(model_dir, model_config=model_config)
        self.pipe = load_pipeline(model_dir, self.device, self.dtype, variant, self.spec.model_config, weights)
        self.addons = addons
        if addons.loras:  # before the regional processors go in: peft wraps the attention projections
            from ..models.lora import apply_loras

            apply_loras(self.pipe, addons.loras)
        self.controlnet = None
        if addons.controlnet:
            from ..models.controlnet import load_controlnet

            self.controlnet = load_controlnet(addons.controlnet, self.device, self.dtype)
        self.weights, self.compiled = weights, compile
        apply_weights_mode(self.pipe, self.controlnet, weights, self.dtype, self.device)
        # the family's calling contract; it installs the regional attention processors (after the LoRAs)
        family = backbone_class(self.spec.family)
        self.backbone = family(getattr(self.pipe, family.denoiser_name), pipe=self.pipe, controlnet=self.controlnet)
        if compile:  # after the processors: they are part of what is compiled
            compile_denoiser(self.unet)
        self._upscaler = None  # the upscale model, loaded at its first tile (resize='model')
        self._built_for: tuple | None = None  # the add-on request of the config it was loaded for (for_config)
        self._context: tuple[StageContext, StageContext] | None = None  # (as received, on the device)
        self._warmed: set[tuple] = set()  # (windows shape, with control) already run once (compile=true)

    @classmethod
    def load(cls, model: str, device: str = "auto", dtype: str = "auto", variant: str | None = None,
             addons: Addons = NO_ADDONS, model_config: str | None = None) -> ModelWorker:
        """Resolve ``model`` (demo, a local dir, a single file, a hub id) and load it: the reference's worker."""
        spec = ModelSpec.load(model, variant, model_config)
        return cls(spec.path, device, dtype, variant, spec, addons)

    @classmethod
    def for_config(cls, config) -> ModelWorker:
        """The in-process worker a config asks for: its model, device, dtype, variant and add-ons (checked first)."""
        spec = ModelSpec.load(config.model, config.variant, config.model_config)
        worker = cls(spec.path, config.device, config.dtype, config.variant, spec, Addons.from_config(config, spec),
                     weights=config.weights, compile=config.compile)
        worker._built_for = addon_request(config)
        return worker

    def holds_addons_of(self, config) -> bool:
        """Whether this worker holds the add-ons ``config`` asks for, in its weights mode. The request it was loaded
        for is answered without reading the files again: a batch or a service asks once per image."""
        if (config.weights, config.compile) != (self.weights, self.compiled):
            return False
        if addon_request(config) == self._built_for:
            return True
        return self.addons == Addons.from_config(config, self.spec)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def unet(self):
        """The denoiser: the UNet, or a DiT family's transformer."""
        return getattr(self.pipe, backbone_class(self.spec.family).denoiser_name)

    @property
    def vae(self):
        return self.pipe.vae

    def __repr__(self) -> str:
        return f"ModelWorker({self.spec.name}, {self.device}, {self.dtype})"

    # -- the calls ---------------------------------------------------------------------------------------------
    def predict(self, context: StageContext, windows: np.ndarray, timestep: float, input_scale: float,
                view_ids: np.ndarray, rects: np.ndarray, control: np.ndarray | None = None) -> np.ndarray:
        """9a: CFG noise predictions of a batch of view windows, (B, C, h, w) float32; ``control``: the views'
        uint8 crops of the stage input (B, H, W, 3) when a ControlNet is loaded."""
        if self._context is None or self._context[0] is not context:  # once per stage, not per call
            self._context = (context, context.to(self.unet.device, self.unet.dtype))
        if (control is None) != (self.controlnet is None):
            raise ValueError("a ControlNet run needs control crops and a worker holding the ControlNet, or neither")
        image = None if control is None else control_tensor(control)
        return predict_views(self.backbone, read_only_tensor(windows), timestep, input_scale, self._context[1],
                             view_ids, rects, image).numpy()

    def warm_up(self, context: StageContext, windows: np.ndarray, timestep: float, input_scale: float,
                view_ids: np.ndarray, rects: np.ndarray, control: np.ndarray | None = None) -> None:
        """compile=true: one :meth:`predict` of a batch shape this worker has not run yet, result dropped, so that
        inductor compiles before the denoising loop's progress bar starts (a kept worker skips shapes it knows)."""
        shape = (windows.shape, control is None)
        if shape not in self._warmed:
            self.predict(context, windows, timestep, input_scale, view_ids, rects, control)
            self._warmed.add(shape)

    def upscale_tile(self, pixels: np.ndarray) -> np.ndarray:
        """1 (resize='model'): one uint8 HxWx3 tile through the upscale model -> uint8 (sH)x(sW)x3."""
        from ..models.upscale_models import load_upscale_model, run_upscale_model

        if self._upscaler is None:
            self._upscaler = load_upscale_model(self.addons.upscale_model, self.device)
        return run_upscale_model(self._upscaler, pixels)

    def encode_tile(self, pixels: np.ndarray) -> np.ndarray:
        """2: one pixel tile (uint8 HxWx3, or float32 3xHxW in [-1, 1]) -> its scaled latent (C, h, w) float32."""
        return finite_vae_output(encode_pixels(self.vae, tile_to_tensor(pixels))[0], "encoded").numpy()

    def decode_tile(self, latents: np.ndarray) -> np.ndarray:
        """10: one latent tile (C, h, w) -> pixels (3, H, W) float32 in [-1, 1]."""
        return finite_vae_output(decode_latents(self.vae, read_only_tensor(latents)[None])[0], "decoded").numpy()

    def encode_prompts(self, prompts: list[str], max_tokens: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """6: (embeds (U, L, D), pooled (U, Dp) or None), float32; L is the family's text length for ``max_tokens``
        (:meth:`~cupscale_dist.models.backbones.base.Backbone.encode_prompts`)."""
        return self.backbone.encode_prompts(prompts, max_tokens)

    def probe(self, pixels: np.ndarray, noise: np.ndarray, timestep: int, alpha_bar: float, embeds: np.ndarray,
              pooled: np.ndarray | None) -> np.ndarray:
        """7: cross-attention maps (tokens, h, w) of the global prompt over the native-size stage input."""
        pooled = None if pooled is None else read_only_tensor(pooled)
        return self.backbone.probe(self.vae, pixels, read_only_tensor(noise), timestep, alpha_bar,
                                   read_only_tensor(embeds), pooled).numpy()


