"""Z-Image ControlNets (``ZImageControlNetModel``, the VideoX-Fun "Union" models): checked on the driver against the
transformer, from the configs alone.

Loading and the per-view crops are the family-neutral :mod:`cupscale_dist.models.controlnet`; how the transformer
reads the crops and where the ControlNet's samples are added is :meth:`.backbone.ZImage.control_hints`. The ControlNet
shares the transformer's embedders and refiners (``ZImageControlNetModel.from_transformer``), runs its own control
layers over ``[control; caption]`` beside the transformer's ``[image; caption]``, and its samples are added after the
transformer layers it names (``control_layers_places``), as ``ZImageControlNetPipeline`` does.
"""

from __future__ import annotations

from ....errors import UserError, shown

# What must agree between a Z-Image ControlNet and the transformer it steers: its samples are added to the
# transformer's hidden states (width, heads), it reads the same patches and shares the refiners' blocks.
MATCHING_KEYS = ("dim", "n_heads", "n_kv_heads", "all_patch_size", "all_f_patch_size", "qk_norm", "norm_eps")


def as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def check_zimage_controlnet(folder: str, config: dict, spec) -> None:
    """A Z-Image ControlNet on another family, another family's ControlNet on Z-Image, one of other widths, or one
    naming layers the transformer does not have: one line."""
    if config.get("_class_name") != "ZImageControlNetModel" or spec.family != "zimage":
        raise UserError(f"--controlnet {folder}: a {shown(config.get('_class_name'))} and {spec.name} is an "
                        f"{spec.family} model; use a ControlNet of the model's family (ZImageControlNetModel for "
                        "Z-Image)")
    transformer = spec.denoiser_config()
    for key in MATCHING_KEYS:
        mine, theirs = config.get(key), transformer.get(key)
        if as_list(mine) != as_list(theirs):
            raise UserError(f"--controlnet {folder}: made for another model ({key} {shown(mine)} here, "
                            f"{shown(theirs)} in {spec.name}'s transformer); use a Z-Image ControlNet for this model")
    places = [("control_layers_places", "n_layers")]
    if config.get("add_control_noise_refiner") is not None:
        places.append(("control_refiner_layers_places", "n_refiner_layers"))
    for key, count_key in places:
        count, named = transformer.get(count_key), config.get(key)
        if not isinstance(named, list) or not all(type(i) is int and 0 <= i < count for i in named):
            raise UserError(f"--controlnet {folder}: its {key} {shown(named, 60)} name layers {spec.name}'s "
                            f"transformer does not have ({count} {count_key}); use a Z-Image ControlNet for this "
                            "model")
    channels = config.get("control_in_dim")
    if type(channels) is not int or channels < transformer.get("in_channels", 16):
        raise UserError(f"--controlnet {folder}: control_in_dim {shown(channels)} is below the transformer's "
                        f"{transformer.get('in_channels', 16)} latent channels; use a Z-Image ControlNet")
