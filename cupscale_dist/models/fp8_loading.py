"""weights=fp8 without ever holding the denoiser in its compute dtype: built on the meta device, its storage dtypes
decided by diffusers' own layerwise casting, then its safetensors read one tensor at a time, each cast straight to
the dtype its layer stores.

Why our own reader: diffusers offers layerwise casting only on a loaded model, and its loader maps the whole shard
(SDXL's UNet file: 10 GB in fp32) before casting, so a worker's peak memory is that of ``weights=full`` however it
stores them afterwards. Plain reads (no mmap) keep file pages out of the process too: the peak is the fp8 model plus
one tensor.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from ..errors import UserError

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
                      "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def weight_files(component_dir: Path, variant: str | None) -> list[Path]:
    """The component's safetensors files in ``variant`` (None: the plain ones), sharded or not."""
    from .hub import file_variant

    picked = [f for f in sorted(component_dir.glob("*.safetensors")) if file_variant(f.name) == variant]
    if not picked:
        raise UserError(f"{component_dir}: no .safetensors weights{f' in variant {variant}' if variant else ''} "
                        "(weights=fp8 reads safetensors); use weights=full")
    return picked


def read_tensors(path: Path):
    """(name, tensor) for each tensor of a safetensors file, one at a time, read into its own buffer."""
    with open(path, "rb") as handle:
        size = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(size))
        base = 8 + size
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            start, end = entry["data_offsets"]
            handle.seek(base + start)
            buffer = bytearray(end - start)
            handle.readinto(buffer)
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            tensor = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
            yield name, tensor.reshape(entry["shape"])


def load_denoiser_fp8(model_class, component_dir: Path, variant: str | None, compute_dtype: torch.dtype):
    """``model_class`` (a diffusers model with layerwise casting) from ``component_dir``, its weights stored as
    float8_e4m3fn where diffusers casts them and in ``compute_dtype`` where it skips (norms, embeddings)."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device

    from .weights import FP8

    with init_empty_weights():
        model = model_class.from_config(model_class.load_config(component_dir))
    torch.nn.Module.to(model, compute_dtype)  # on meta: dtypes only (diffusers' own to() warns about fp32 modules)
    model.enable_layerwise_casting(storage_dtype=FP8, compute_dtype=compute_dtype)
    targets = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    loaded = set()
    for path in weight_files(component_dir, variant):
        for name, tensor in read_tensors(path):
            if name not in targets:
                raise UserError(f"{path}: tensor {name!r} is not part of {model_class.__name__}; the directory does "
                                "not match its config (use weights=full to let diffusers report it)")
            target = targets[name]
            value = tensor.to(target.dtype) if tensor.is_floating_point() else tensor
            set_module_tensor_to_device(model, name, "cpu", value=value)
            loaded.add(name)
    missing = [name for name, t in targets.items() if t.is_meta and name not in loaded]
    if missing:
        raise UserError(f"{component_dir}: {len(missing)} weights missing (first: {missing[0]}); the files are "
                        "incomplete, fetch the model again")
    return model.eval()
