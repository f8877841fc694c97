"""Backbones: everything specific to one model family behind one calling contract (:class:`base.Backbone`).

A new family is one new folder here (``<family>/``: its backbone and everything else that knows the family),
registered in :data:`BACKBONES`; the method (``method/``), the pipeline and the workers call only the contract.
"""

from __future__ import annotations

from ...errors import UserError
from .base import Backbone
from .flux import Flux
from .sd15 import SD15
from .sdxl import SDXL
from .zimage import ZImage

BACKBONES: dict[str, type[Backbone]] = {b.family: b for b in (SDXL, SD15, Flux, ZImage)}
# model_index.json `_class_name` -> family
FAMILIES = {name: b.family for b in BACKBONES.values() for name in b.pipeline_names}
# What each family's method code calls; other components of a repository (SD1.5's safety checker and feature
# extractor, an image encoder) are neither fetched nor loaded.
FAMILY_COMPONENTS = {b.family: b.components for b in BACKBONES.values()}


def backbone_class(family: str) -> type[Backbone]:
    if family not in BACKBONES:
        raise UserError(f"model family {family!r} has no backbone; supported: {', '.join(BACKBONES)}")
    return BACKBONES[family]
