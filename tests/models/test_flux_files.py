"""FLUX.1 files refused from their header (issue 35 item 4): a 0-d img_in.weight, block gaps, integer weights,
another family's keys, LoRAs with integer weights or blocks the model lacks; sound files still pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import refused_line

from cupscale_dist import UserError


# ---------------------------------------------------------------------------------------------------------------
# FLUX.1 files: a 0-d img_in.weight, block gaps, integer weights, another family's keys: refused from the header
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    from safetensors.torch import load_file

    from cupscale_dist.testing.single_file import save_flux_single_file
    from cupscale_dist.testing.tiny_flux import build_tiny_flux, build_tiny_flux_lora

    root = tmp_path_factory.mktemp("round3-flux")
    directory = build_tiny_flux(root / "dev", variant="dev")
    bfl = save_flux_single_file(directory, root / "bfl.safetensors", "bfl")
    comfy = save_flux_single_file(directory, root / "comfy.safetensors", "comfy")
    lora = build_tiny_flux_lora(directory, root / "lora.safetensors", seed=3)
    return dict(dir=str(directory), bfl=load_file(str(bfl)), comfy=load_file(str(comfy)), lora=load_file(str(lora)))


def renamed(state: dict, old: str, new: str) -> dict:
    return {key.replace(old, new, 1) if key.startswith(old) else key: value for key, value in state.items()}


def flux_cases(bfl: dict, comfy: dict) -> dict:
    some = next(key for key in bfl if key.startswith("double_blocks.0.") and key.endswith(".weight"))
    return {
        "0-d-img_in": ({**bfl, "img_in.weight": torch.tensor(1.0)}, "has img_in.weight of shape () (expected 2"),
        "block-gap": (renamed(bfl, "double_blocks.0.", "double_blocks.1."), "with a gap (double_blocks.0 is missing"),
        "block-not-a-number": (renamed(bfl, "single_blocks.0.", "single_blocks.x."), "which is no block number"),
        "integer-weight": ({**bfl, some: bfl[some].to(torch.int32)}, "non-float tensor(s) (e.g. 'double_blocks.0"),
        "sdxl-unet-key": ({**bfl, "input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, "no FLUX.1 transformer has"),
        "scaled-fp8-scale": ({**bfl, "double_blocks.0.img_attn.qkv.scale_weight": torch.ones(1)},
                             "no FLUX.1 transformer has"),
        "qkv-not-3x-width": ({**bfl,
                              "double_blocks.0.img_attn.qkv.weight": bfl["double_blocks.0.img_attn.qkv.weight"][:-1]},
                             "not 3 x its width"),
        "comfy-foreign-prefix": ({**comfy, "first_stage_model.encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)},
                                 "of no Flux component"),
    }


@pytest.mark.parametrize("case", ["0-d-img_in", "block-gap", "block-not-a-number", "integer-weight", "sdxl-unet-key",
                                  "scaled-fp8-scale", "qkv-not-3x-width", "comfy-foreign-prefix"])
def test_flux_files_that_would_load_wrong_are_refused_from_the_header(case, tiny_flux, tmp_path):
    from safetensors.torch import save_file

    from cupscale_dist.models.spec import ModelSpec

    state, words = flux_cases(tiny_flux["bfl"], tiny_flux["comfy"])[case]
    path = tmp_path / f"{case}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(UserError) as error:
        ModelSpec.read(str(path), model_config=tiny_flux["dir"])
    line = refused_line(error)
    assert words in line and f"{case}.safetensors" in line, line


def test_sound_flux_files_still_pass_the_header_checks(tiny_flux, tmp_path):
    from safetensors.torch import save_file

    from cupscale_dist.models.spec import ModelSpec

    for layout in ("bfl", "comfy"):
        path = tmp_path / f"{layout}.safetensors"
        save_file(tiny_flux[layout], str(path))
        assert ModelSpec.read(str(path), model_config=tiny_flux["dir"]).family == "flux"


def test_flux_loras_with_integer_weights_blocks_layers_or_widths_the_model_lacks_are_refused(tiny_flux, tmp_path):
    from safetensors.torch import save_file

    from cupscale_dist.models.lora import check_lora
    from cupscale_dist.models.spec import ModelSpec

    spec, lora = ModelSpec.read(tiny_flux["dir"]), tiny_flux["lora"]
    some = next(iter(lora))
    kohya = "lora_unet_double_blocks_5_img_attn_qkv"
    cases = {
        "int": ({**lora, some: lora[some].to(torch.int64)}, "non-float tensor(s)"),
        "block-5": ({**lora, f"{kohya}.lora_down.weight": torch.zeros(4, 32),
                     f"{kohya}.lora_up.weight": torch.zeros(96, 4)},
                    "names double_blocks 5, and"),
        # peft names: a layer the transformer lacks, and a layer of other widths (its down factor's inputs)
        "layer": ({**lora, "transformer.single_transformer_blocks.0.attn.to_z.lora_A.weight": torch.zeros(4, 32),
                   "transformer.single_transformer_blocks.0.attn.to_z.lora_B.weight": torch.zeros(32, 4)},
                  "names a transformer layer"),
        "width": ({**lora, "transformer.single_transformer_blocks.0.attn.to_k.lora_A.weight": torch.zeros(4, 48)},
                  "has 48 inputs"),
    }
    for name, (state, words) in cases.items():
        save_file(state, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(UserError) as error:
            check_lora(str(tmp_path / f"{name}.safetensors"), spec)
        assert words in refused_line(error), (name, str(error.value))
    save_file(lora, str(tmp_path / "good.safetensors"))
    check_lora(str(tmp_path / "good.safetensors"), spec)


def safetensors_raw(path: Path, header: dict) -> None:
    import struct

    text = json.dumps(header).encode()
    size = max((end for entry in header.values() for end in entry["data_offsets"]), default=0)
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(size))


def test_fuzz_found_a_0d_unet_conv_in_a_flux_named_file_raised_indexerror(tmp_path):
    from cupscale_dist.models.single_file import checkpoint_kind

    path = tmp_path / "m.safetensors"  # the example Hypothesis found (nightly profile)
    safetensors_raw(path, {"double_blocks.0.img_attn.qkv.weight": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]},
                           "model.diffusion_model.input_blocks.0.0.weight": {"dtype": "F32", "shape": [],
                                                                             "data_offsets": [4, 8]}})
    assert checkpoint_kind(path) == "flux-schnell"  # the Flux checks of its header come next (and refuse it)
    sdxl = {"conditioner.embedders.1.model.x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            "model.diffusion_model.input_blocks.0.0.weight": {"dtype": "F32", "shape": [4], "data_offsets": [4, 20]}}
    safetensors_raw(path, sdxl)
    with pytest.raises(UserError) as error:
        checkpoint_kind(path)
    assert "a convolution has 4 dimensions" in refused_line(error)
