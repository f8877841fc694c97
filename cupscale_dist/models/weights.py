"""How a worker holds its weights (issue 20): in full, stored in fp8, or offloaded block by block, and compiled.

Thin wrappers over what diffusers provides: layerwise casting (``apply_layerwise_casting``: weights stored as
float8_e4m3fn, each layer cast to the compute dtype for its forward; the layers diffusers skips — norms,
embeddings — stay as they are), group offloading (``apply_group_offloading``: blocks live in CPU memory and move
to the GPU for their forward, on a CUDA stream so the copy overlaps compute) and regional compilation
(``compile_repeated_blocks``: the UNet's transformer blocks compiled once, reused by every block).
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from pathlib import Path

import torch

from ..errors import UserError

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn  # the storage type diffusers' layerwise casting and fp8 checkpoints use
# Text-encoder layers kept in their dtype under fp8: embeddings (a lookup, not a matmul) and norms, as diffusers
# skips them in its own models. T5 (Flux's text_encoder_2) names its token embedding `shared`, and its feed-forward
# output `wo` casts its input to the weight's dtype (T5 keeps `wo` in fp32 for 8-bit too: _keep_in_fp32_modules).
TEXT_ENCODER_SKIP = ("embed", "norm", "shared", r"DenseReluDense\.wo$")


def check_weights_mode(mode: str, device: torch.device) -> None:
    """One line before any weights load: group offloading moves blocks between CPU memory and a GPU."""
    if mode == "offload" and device.type != "cuda":
        raise UserError(f"weights=offload moves the model's blocks between CPU memory and a GPU; this worker runs on "
                        f"{device.type}: use weights=full or weights=fp8 (fp8 also runs on CPU)")


def check_compile(device: torch.device) -> None:
    """One line before any weights load: inductor needs a C++ compiler on CPU and Triton on a GPU."""
    import importlib.util
    import shutil

    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise UserError("compile=true on CPU needs a C++ compiler (torch's inductor builds kernels with it); "
                        "install g++ or set compile=false")
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise UserError("compile=true on a GPU needs Triton (torch's inductor); install it or set compile=false")


def apply_weights_mode(pipe, controlnet, mode: str, compute_dtype: torch.dtype, device: torch.device) -> None:
    """Put a loaded pipeline's (and ControlNet's) weights in ``mode``; 'full' leaves them as loaded."""
    if mode == "full":
        return
    # the UNet, or a DiT family's transformer (Flux), and the ControlNet
    denoisers = [m for m in (getattr(pipe, "unet", None), getattr(pipe, "transformer", None), controlnet)
                 if m is not None]
    encoders = [getattr(pipe, name) for name in ("text_encoder", "text_encoder_2") if getattr(pipe, name, None)]
    if mode == "fp8":
        from diffusers.hooks import apply_layerwise_casting

        for module in denoisers:
            if not stored_in_fp8(module):  # a UNet read straight into fp8 (models.fp8_loading) has its hooks
                module.enable_layerwise_casting(storage_dtype=FP8, compute_dtype=compute_dtype)
        for module in encoders:
            apply_layerwise_casting(module, FP8, compute_dtype, skip_modules_pattern=TEXT_ENCODER_SKIP)
        log.info("weights stored as %s, computed in %s", FP8, compute_dtype)
        return
    from diffusers.hooks import apply_group_offloading

    for module in denoisers:  # block level: one down/mid/up block on the GPU at a time, the next one prefetched
        module.to("cpu")
        module.enable_group_offload(onload_device=device, offload_device="cpu", offload_type="block_level",
                                    num_blocks_per_group=1, use_stream=True)
    for module in encoders:  # run once per stage: leaf level, no stream needed
        module.to("cpu")
        apply_group_offloading(module, onload_device=device, offload_type="leaf_level")
    log.info("weights offloaded to CPU memory, onloaded block by block onto %s", device)


def stored_in_fp8(module) -> bool:
    return any(p.dtype == FP8 for p in module.parameters())


def compile_denoiser(unet) -> None:
    """Regional compilation: each repeated transformer block is compiled once (seconds, not minutes), at its first
    call; the worker's warm-up call happens before any progress bar starts."""
    if not hasattr(torch, "compile"):
        raise UserError("compile=true needs torch.compile (torch >= 2.0); set compile=false")
    unet.compile_repeated_blocks(fullgraph=False, dynamic=False)


# Parameters per component of SDXL base (published safetensors): what a plan assumes for a model whose files are
# not on this machine yet (a hub id not fetched).
SDXL_PARAMETERS = {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_841,
                   "vae": 83_653_863}
STORED_BYTES = {"float32": 4, "fp32": 4}  # else 2 (bf16/fp16: what 'auto' picks on a GPU)


def parameters_of(path) -> dict[str, int]:
    """Parameters per component, from what is on disk without reading weights: a diffusers directory's headers, a
    single file's (all of it counted as the UNet); SDXL base's published counts for what is not here (a hub id not
    fetched) or a directory without a UNet."""
    path = Path(os.path.expanduser(path))  # Path.expanduser raises for '~name' of no user (or './~0')
    if path.is_file():
        return {**dict.fromkeys(SDXL_PARAMETERS, 0), "unet": file_parameters(path)}
    if path.is_dir():
        counts = {name: folder_parameters(path / name) for name in SDXL_PARAMETERS}
        counts["unet"] = counts["unet"] or folder_parameters(path / "transformer")  # the denoiser: a DiT's too
        if counts["unet"]:
            return counts
    return SDXL_PARAMETERS


def folder_parameters(folder: Path) -> int:
    """A component's parameters: the sum over its weight files (every shard) of one variant, the full-precision
    one where it has it; 0 for a component the family has not (SD1.5's second text encoder)."""
    from .hub import file_variant

    files = sorted(f for f in folder.glob("*") if f.suffix in (".safetensors", ".bin")) if folder.is_dir() else []
    variants = {file_variant(f.name) for f in files}
    chosen = None if None in variants else min(variants, default=None)
    return sum(file_parameters(f) for f in files if file_variant(f.name) == chosen)


def file_parameters(path: Path) -> int:
    """Parameters in one weight file: its safetensors header's shapes; where there is no readable header (a torch
    pickle, a damaged file: the worker's load will say so), its size at two bytes per parameter."""
    try:
        with open(path, "rb") as handle:
            size = struct.unpack("<Q", handle.read(8))[0]
            header = json.loads(handle.read(min(size, 100_000_000)))
        return sum(math.prod(t["shape"]) for key, t in header.items() if key != "__metadata__")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error):
        return path.stat().st_size // 2


def worker_memory_gb(parameters: dict[str, int], mode: str, dtype: str, device_type: str,
                     backbone=None) -> tuple[float, float]:
    """(device GB, host GB) of one worker's weights: what its GPU share must hold, and what placement reserves of
    its node's memory (Ray's ``memory`` resource): all of it on CPU, the offloaded blocks with ``offload``.
    ``backbone``: the model's family class (:func:`weights_gb`)."""
    if dtype == "auto":  # what models.loading.resolve_dtype picks
        dtype = "bfloat16" if device_type == "cuda" else "float32"
    held = weights_gb(parameters, mode, dtype, backbone)
    if device_type != "cuda":
        return 0.0, held
    return held, weights_gb(parameters, "full", dtype, backbone) if mode == "offload" else 0.0


def check_fits_share(device_gb: float, fraction: float | None, total_bytes: int, mode: str) -> None:
    """One line at a worker's start, before any weights load, when its weights alone exceed its GPU share's cap."""
    if fraction and device_gb > fraction * total_bytes / 1e9:
        smaller = {"full": "weights=fp8 or weights=offload", "fp8": "weights=offload"}.get(mode, "a smaller model")
        raise UserError(f"a model worker's weights need ~{device_gb:g} GB in weights={mode}, its GPU share "
                        f"({fraction:g} of {total_bytes / 1e9:.0f} GB) caps it at {fraction * total_bytes / 1e9:.1f} "
                        f"GB; use {smaller}, a larger --gpus-per-actor, or a smaller captioner_gpus")


def weights_gb(parameters: dict[str, int], mode: str, dtype: str, backbone=None) -> float:
    """GB of weights one worker holds on its device in ``mode`` (activations come on top, per view batch);
    ``backbone``: the model's family class, whose ``offload_resident`` says what weights=offload keeps on the GPU
    (None: the base class's, SDXL's rule, for a model whose family is not known here)."""
    if backbone is None:
        from .backbones.base import Backbone

        backbone = Backbone
    width = STORED_BYTES.get(dtype, 2)
    unet, encoders = parameters["unet"], parameters["text_encoder"] + parameters["text_encoder_2"]
    if mode == "fp8":  # one byte per stored weight
        held = unet + encoders
    elif mode == "offload":  # resident block groups and the largest encoder leaf
        held = sum(parameters[name] * share for name, share in backbone.offload_resident.items()) * width
    else:
        held = (unet + encoders) * width
    return round((held + parameters["vae"] * width) / 1e9, 2)
