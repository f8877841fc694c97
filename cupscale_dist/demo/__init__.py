"""The embedded demo model (`--model demo`): a small SDXL-family latent diffusion model trained here, on CPU.

`model/` is a diffusers directory (float16 safetensors, about 20 MB) written by :mod:`cupscale_dist.demo.train`
from the photos in :mod:`cupscale_dist.demo.photos`; `model/training.json` records how. It loads with
`from_pretrained` like SDXL, so every code path runs as it does on SDXL.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError

MODEL_DIR = Path(__file__).with_name("model")


def demo_model_dir() -> Path:
    """The shipped demo model's directory (read-only; nothing is built or downloaded)."""
    if not (MODEL_DIR / "model_index.json").is_file():
        raise UserError(f"the demo model is missing from {MODEL_DIR}; reinstall cupscale-dist, or rebuild it with "
                        "`python -m cupscale_dist.demo.train --out cupscale_dist/demo/model`")
    return MODEL_DIR
