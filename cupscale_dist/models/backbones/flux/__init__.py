"""FLUX.1 (dev, schnell): everything that knows the family.

``backbone`` (the :class:`Flux` backbone: prompt encoding, the denoise call, the probe, positions), ``joint_attention``
(regional attention in its joint-attention blocks), ``header`` (a single-file checkpoint from its header alone),
``single_file`` (its conversion, on the workers), ``lora`` (Flux LoRA files checked against the transformer).
"""

from .backbone import Flux

__all__ = ["Flux"]
