"""How a worker holds its weights (issue 20): in full, stored in fp8, or offloaded block by block, and compiled.

Thin wrappers over what diffusers provides: layerwise casting (``apply_layerwise_casting``: weights stored as
float8_e4m3fn, each layer cast to the compute dtype for its forward; the layers diffusers skips — norms,
embeddings — stay as they are), group offloading (``apply_group_offloading``: blocks live in CPU memory and move
to the GPU for their forward, on a CUDA stream so the copy overlaps compute) and regional compilation
(``compile_repeated_blocks``: the UNet's transformer blocks compiled once, reused by every block).
"""

from __future__ import annotations

import logging

import torch

from ..errors import UserError

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn  # the storage type diffusers' layerwise casting and fp8 checkpoints use
# Text-encoder layers kept in their dtype under fp8: embeddings (a lookup, not a matmul) and norms, as diffusers
# skips them in its own models.
TEXT_ENCODER_SKIP = ("embed", "norm")


def check_weights_mode(mode: str, device: torch.device) -> None:
    """One line before any weights load: group offloading moves blocks between CPU memory and a GPU."""
    if mode == "offload" and device.type != "cuda":
        raise UserError(f"weights=offload moves the model's blocks between CPU memory and a GPU; this worker runs on "
                        f"{device.type}: use weights=full or weights=fp8 (fp8 also runs on CPU)")


def apply_weights_mode(pipe, controlnet, mode: str, compute_dtype: torch.dtype, device: torch.device) -> None:
    """Put a loaded pipeline's (and ControlNet's) weights in ``mode``; 'full' leaves them as loaded."""
    if mode == "full":
        return
    denoisers = [m for m in (pipe.unet, controlnet) if m is not None]
    encoders = [getattr(pipe, name) for name in ("text_encoder", "text_encoder_2") if getattr(pipe, name, None)]
    if mode == "fp8":
        from diffusers.hooks import apply_layerwise_casting

        for module in denoisers:
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


def compile_denoiser(unet) -> None:
    """Regional compilation: each repeated transformer block is compiled once (seconds, not minutes), at its first
    call; the worker's warm-up call happens before any progress bar starts."""
    if not hasattr(torch, "compile"):
        raise UserError("compile=true needs torch.compile (torch >= 2.0); set compile=false")
    unet.compile_repeated_blocks(fullgraph=False, dynamic=False)
