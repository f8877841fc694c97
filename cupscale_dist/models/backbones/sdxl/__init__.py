"""SDXL: everything that knows the family (``backbone``: the :class:`SDXL` backbone and its micro-conditioning)."""

from .backbone import SDXL

__all__ = ["SDXL"]
