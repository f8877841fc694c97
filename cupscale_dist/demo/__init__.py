"""The embedded demo model (`--model demo`): a small SDXL-family latent diffusion model trained here, on CPU.

`model/` is a diffusers directory (float16 safetensors, about 20 MB) written by :mod:`cupscale_dist.demo.train`
from the photos in :mod:`cupscale_dist.demo.photos`; `model/training.json` records how. It loads with
`from_pretrained` like SDXL, so every code path runs as it does on SDXL. Where it is found lives with every other
model's files, in :mod:`cupscale_dist.models.demo_dir` (re-exported here).
"""

from __future__ import annotations

from ..models.demo_dir import DEMO_MODEL_DIR as MODEL_DIR, demo_model_dir

__all__ = ["MODEL_DIR", "demo_model_dir"]
