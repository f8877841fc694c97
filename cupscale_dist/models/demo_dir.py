"""Where the shipped demo model is (`--model demo`): a diffusers directory in the package, written by
:mod:`cupscale_dist.demo.train`.

Here, below everything that resolves a model name (:mod:`.hub`, :mod:`.spec`, :mod:`.single_file`, the plan), so
none of them imports ``demo/``, whose training script sits above ``models/`` in the layers; ``demo/`` re-exports it.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError

DEMO_MODEL_DIR = Path(__file__).parent.parent / "demo" / "model"


def demo_model_dir() -> Path:
    """The shipped demo model's directory (read-only; nothing is built or downloaded)."""
    if not (DEMO_MODEL_DIR / "model_index.json").is_file():
        raise UserError(f"the demo model is missing from {DEMO_MODEL_DIR}; reinstall cupscale-dist, or rebuild it "
                        "with `python -m cupscale_dist.demo.train --out cupscale_dist/demo/model`")
    return DEMO_MODEL_DIR
