"""Z-Image(-Turbo): everything that knows the family.

``backbone`` (the :class:`ZImage` backbone: prompt encoding, the denoise call and its timestep convention, the
probe), ``positions`` (token positions and the RoPE formula past the transformer's table), ``attention`` (regional
attention in its single-stream layers), ``lora`` (Z-Image LoRA files checked against the transformer),
``controlnet`` (``ZImageControlNetModel`` checked against it; its samples per view: ``ZImage.control_hints``),
``single_file`` (a transformer file in the original key layout, from its header; loaded by diffusers' conversion).
"""

from .backbone import ZImage

__all__ = ["ZImage"]
