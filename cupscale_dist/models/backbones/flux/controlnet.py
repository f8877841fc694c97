"""Flux ControlNets (``FluxControlNetModel``): checked on the driver against the transformer, from the configs alone.

Loading and the per-view crops are the family-neutral :mod:`cupscale_dist.models.controlnet`; how the transformer
reads the crops is :meth:`.backbone.Flux.control_latents`.
"""

from __future__ import annotations

from ....errors import UserError, shown

# What must agree between a Flux ControlNet and the transformer it steers: its block outputs are added to the
# transformer's hidden states (width = heads x head dim), it reads the same packed latents, text and positions.
FLUX_MATCHING_KEYS = ("in_channels", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                      "pooled_projection_dim", "axes_dims_rope")


def check_flux_controlnet(folder: str, config: dict, spec) -> None:
    """A Flux ControlNet on a UNet model, a UNet ControlNet on Flux, or one of other widths: one line."""
    if config.get("_class_name") != "FluxControlNetModel" or spec.family != "flux":
        raise UserError(f"--controlnet {folder}: a {shown(config.get('_class_name'))} and {spec.name} is an "
                        f"{spec.family} model; use a ControlNet of the model's family (FluxControlNetModel for Flux)")
    transformer = spec.denoiser_config()
    for key in FLUX_MATCHING_KEYS:
        mine, theirs = config.get(key), transformer.get(key)
        if (list(mine) if isinstance(mine, (list, tuple)) else mine) != (
                list(theirs) if isinstance(theirs, (list, tuple)) else theirs):
            raise UserError(f"--controlnet {folder}: made for another model ({key} {shown(mine)} here, "
                            f"{shown(theirs)} in {spec.name}'s transformer); use a Flux ControlNet for this model")
