"""The ComfyUI node: upscale IMAGEs with a `cupscale serve` service.

ComfyUI's node contract (its custom-node docs): a class with ``INPUT_TYPES`` (a classmethod returning
``{"required": {...}, "optional": {...}}``), ``RETURN_TYPES``, ``FUNCTION`` (the method to call), ``CATEGORY``;
an ``IMAGE`` is a float tensor ``[B, H, W, C]`` in 0..1. An exception raised by the method is shown as the node's
error. Progress goes to ``comfy.utils.ProgressBar``; ComfyUI's cancel button is honoured between polls (the job is
cancelled on the service too).
"""

from __future__ import annotations

import io

import numpy as np

from .client import ServiceClient, ServiceError

SCALES = ["2", "4", "8", "16"]


def tensor_to_png(image) -> bytes:
    """One ``[H, W, C]`` float image in 0..1 -> PNG bytes (8-bit RGB)."""
    from PIL import Image

    array = np.clip(image.detach().cpu().float().numpy() * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(array[..., :3]).save(buffer, format="PNG")
    return buffer.getvalue()


def png_to_tensor(data: bytes):
    """PNG bytes -> ``[H, W, 3]`` float tensor in 0..1."""
    import torch
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array)


def parse_extra(text: str) -> dict:
    """``KEY=VALUE`` lines (any knob a request may set, as `cupscale upscale --set`)."""
    knobs = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            raise ServiceError(f"extra_knobs line {number}: {line!r} is not KEY=VALUE; e.g. lambda_global=0.7")
        key, value = line.split("=", 1)
        knobs[key.strip()] = value.strip()
    return knobs


def _progress_bar(total: int):
    try:
        from comfy.utils import ProgressBar
    except ImportError:  # outside ComfyUI (the tests of the class alone)
        return None
    return ProgressBar(total)


def _interrupt_check():
    try:
        from comfy.model_management import throw_exception_if_processing_interrupted
    except ImportError:
        return None
    return throw_exception_if_processing_interrupted


class CupscaleUpscale:
    """Send each image of the batch to `cupscale serve` and return the upscaled batch."""

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 - ComfyUI's name
        return {
            "required": {
                "image": ("IMAGE",),
                "prompt": ("STRING", {"multiline": True, "default": ""}),
                "scale": (SCALES, {"default": "2"}),
                "creativity": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 1.0, "step": 0.05,
                                         "tooltip": "0-1: how much new detail (sets strength, 0.75 = the method's "
                                                    "0.6); -1 = the service's default"}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**32 - 1}),
                "service_url": ("STRING", {"default": "http://127.0.0.1:8000"}),
            },
            "optional": {
                "token": ("STRING", {"default": "", "tooltip": "bearer token of the service, if it has one"}),
                "resemblance": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 1.0, "step": 0.05,
                                          "tooltip": "0-1: how closely to follow the input (the global prior's window "
                                                     "and weight, ControlNet scale); -1 = the service's default"}),
                "negative_prompt": ("STRING", {"multiline": True, "default": ""}),
                "steps": ("INT", {"default": 0, "min": 0, "max": 1000, "tooltip": "0 = the service's default"}),
                "guidance_scale": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 50.0, "step": 0.5,
                                             "tooltip": "0 = the service's default"}),
                "lambda_global": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 1.0, "step": 0.05,
                                            "tooltip": "global vs regional prompt weight; -1 = the service's default"}),
                "extra_knobs": ("STRING", {"multiline": True, "default": "",
                                           "tooltip": "KEY=VALUE lines: any knob of `cupscale knobs`"}),
            },
        }

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "upscale"
    CATEGORY = "image/upscaling"
    DESCRIPTION = "C-Upscale through a `cupscale serve` service (Ray): creative upscaling with global-regional priors."

    def upscale(self, image, prompt, scale, creativity, seed, service_url, token="", resemblance=-1.0,
                negative_prompt="", steps=0, guidance_scale=0.0, lambda_global=-1.0, extra_knobs=""):
        import torch

        knobs = {"prompt": prompt, "scale": scale, "seed": seed}
        if creativity >= 0:
            knobs["creativity"] = creativity
        if resemblance >= 0:
            knobs["resemblance"] = resemblance
        if negative_prompt:
            knobs["negative_prompt"] = negative_prompt
        if steps:
            knobs["steps"] = steps
        if guidance_scale:
            knobs["guidance_scale"] = guidance_scale
        if lambda_global >= 0:
            knobs["lambda_global"] = lambda_global
        knobs.update(parse_extra(extra_knobs))
        client = ServiceClient(service_url, token)
        count = int(image.shape[0])
        bar = _progress_bar(count * 100)
        outputs = []
        for index in range(count):
            job_id = client.submit(tensor_to_png(image[index]), knobs)

            def on_progress(progress, index=index):
                if bar is not None:
                    done = (progress["stage"] - 1) * progress["steps"] + progress["step"]
                    total = max(1, progress["stages"] * progress["steps"])
                    bar.update_absolute(index * 100 + int(100 * done / total), count * 100)

            outputs.append(png_to_tensor(client.wait(job_id, on_progress, _interrupt_check())))
        return (torch.stack(outputs),)
