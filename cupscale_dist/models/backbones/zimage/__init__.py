"""Z-Image(-Turbo): everything that knows the family.

``backbone`` (the :class:`ZImage` backbone: prompt encoding, the denoise call and its timestep convention, the
probe), ``positions`` (token positions and the RoPE formula past the transformer's table), ``attention`` (regional
attention in its single-stream layers).
"""

from .backbone import ZImage

__all__ = ["ZImage"]
