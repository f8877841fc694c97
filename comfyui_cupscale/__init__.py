"""ComfyUI custom node package for `cupscale serve` (copy or symlink this folder into ComfyUI/custom_nodes/)."""

from .nodes import CupscaleUpscale

NODE_CLASS_MAPPINGS = {"CupscaleUpscale": CupscaleUpscale}
NODE_DISPLAY_NAME_MAPPINGS = {"CupscaleUpscale": "C-Upscale (cupscale serve)"}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
