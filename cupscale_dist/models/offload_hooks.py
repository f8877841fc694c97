"""The group-offloading hooks of a model under ``weights: offload`` (diffusers' ``enable_group_offload``), for a
backbone whose forward calls the model's parts itself. Kept apart from :mod:`.weights` (which reads hub files), so
that a backbone can use it without importing upward."""

from __future__ import annotations

from contextlib import contextmanager

import torch


def offload_hooks(module) -> list:
    """The group-offloading hooks diffusers put on a model's own forward (weights=offload): they onload what lies
    outside the model's blocks (embedders, final layer, top-level parameters); [] when the model is not offloaded."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None:
        return []
    names = ("group_offloading", "lazy_prefetch_group_offloading")  # diffusers' names, in registration order
    return [hook for hook in (registry.get_hook(name) for name in names) if hook is not None]


def onload_device(module) -> torch.device | None:
    """Where an offloaded model computes (its blocks' onload device); None when it is not offloaded."""
    hooks = offload_hooks(module)
    return torch.device(hooks[0].group.onload_device) if hooks else None


@contextmanager
def onloaded(module):
    """Run the body as the model's own forward would be run under weights=offload: for a backbone whose forward calls
    the model's parts directly (Z-Image), the model's top-level hooks never fire, and its embedders would stay in CPU
    memory. A no-op for a model that is not offloaded (or None)."""
    hooks = offload_hooks(module) if module is not None else []
    for hook in reversed(hooks):  # the last registered is the outermost
        hook.pre_forward(module)
    try:
        yield
    finally:
        for hook in hooks:
            hook.post_forward(module, None)
