"""Stable Diffusion 1.x/2.x: everything that knows the family (``backbone``: the :class:`SD15` backbone)."""

from .backbone import SD15

__all__ = ["SD15"]
