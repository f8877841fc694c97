"""The driver's scheduler (method.md steps 4 and 9b-9c), built from the model's own scheduler config.

A config written for another scheduler class (SDXL base ships Euler, SD1.5 PNDM) names only some of DDIM's
options; diffusers' DDIM defaults for the missing ones (``clip_sample=True``, ``set_alpha_to_one=True``) clip
``x0`` to [-1, 1], which breaks the global prior (``LL(x0) = G``) and is not how SDXL/SD1.5 were trained. The
published SDXL and SD1.5 configs set both to False; those are the defaults here, and values a config does give win.
"""

from __future__ import annotations

from collections.abc import Mapping

SCHEDULER_CLASSES = {"euler": "EulerDiscreteScheduler", "ddim": "DDIMScheduler"}

# DDIM options SDXL base / SD1.5 publish in their scheduler_config.json, used when a config leaves them out.
DDIM_DEFAULTS = {"clip_sample": False, "set_alpha_to_one": False}


def given_options(scheduler_config: Mapping) -> dict:
    """The options a scheduler config actually gives: diffusers marks the ones it filled with its own defaults."""
    defaulted = set(scheduler_config.get("_use_default_values", ()))
    return {k: v for k, v in scheduler_config.items() if k not in defaulted and k != "_use_default_values"}


def make_scheduler(kind: str, scheduler_config: Mapping):
    """A fresh ``kind`` ('euler' | 'ddim') scheduler from a model's scheduler config (method.md step 4)."""
    import diffusers

    options = given_options(scheduler_config)
    if kind == "ddim":
        options = {**DDIM_DEFAULTS, **options}
    return getattr(diffusers, SCHEDULER_CLASSES[kind]).from_config(options)
