"""The ComfyUI node (comfyui_cupscale/) follows ComfyUI's node contract, without ComfyUI or a service."""

from __future__ import annotations

import sys

import pytest
from helpers import REPO


def test_comfyui_node_follows_the_node_contract():
    """ComfyUI's documented custom-node contract: mappings, INPUT_TYPES with (type, options) tuples, RETURN_TYPES,
    FUNCTION naming a method whose parameters are the inputs, CATEGORY."""
    import inspect

    sys.path.insert(0, str(REPO))
    import comfyui_cupscale
    from comfyui_cupscale.nodes import png_to_tensor, tensor_to_png

    cls = comfyui_cupscale.NODE_CLASS_MAPPINGS["CupscaleUpscale"]
    assert set(comfyui_cupscale.NODE_DISPLAY_NAME_MAPPINGS) == set(comfyui_cupscale.NODE_CLASS_MAPPINGS)
    types = cls.INPUT_TYPES()
    assert set(types) <= {"required", "optional", "hidden"} and types["required"]["image"] == ("IMAGE",)
    for section in types.values():
        for spec in section.values():
            assert isinstance(spec, tuple) and isinstance(spec[0], (str, list))
    assert cls.RETURN_TYPES == ("IMAGE",) and isinstance(cls.CATEGORY, str)
    params = inspect.signature(getattr(cls(), cls.FUNCTION)).parameters
    assert set(types["required"]) <= set(params) and set(types["optional"]) <= set(params)
    assert all(params[name].default is not inspect.Parameter.empty for name in types["optional"])
    torch = pytest.importorskip("torch")
    image = torch.rand(5, 7, 3)
    back = png_to_tensor(tensor_to_png(image))
    assert back.shape == (5, 7, 3) and float((back - image).abs().max()) <= 0.5 / 255 + 1e-6
