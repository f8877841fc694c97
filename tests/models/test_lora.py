"""LoRAs (issue 11): checked on the driver from their header, applied through peft on every worker, the same bytes
on 1 or N actors; scale 0 is the plain model bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import as_bytes, small_config

from cupscale_dist import UserError, upscale
from cupscale_dist.execution.worker import ModelWorker
from cupscale_dist.models.addons import Addons, Lora, parse_lora
from cupscale_dist.testing.tiny import build_tiny_lora


@pytest.fixture(scope="module")
def loras(sdxl_dir, sd15_dir, tmp_path_factory):
    """Two random LoRAs of the tiny SDXL (UNet + first text encoder), one of the tiny SD1.5."""
    root = tmp_path_factory.mktemp("loras")
    return {"a": str(build_tiny_lora(sdxl_dir, root / "a.safetensors", seed=1)),
            "b": str(build_tiny_lora(sdxl_dir, root / "b.safetensors", seed=2)),
            "sd15": str(build_tiny_lora(sd15_dir, root / "sd15.safetensors", seed=3))}


@pytest.fixture
def plain(sdxl_dir, photo):
    return as_bytes(upscale(photo, small_config(sdxl_dir, steps=3), progress=False))


def run(sdxl_dir, photo, *lora: str) -> bytes:
    config = small_config(sdxl_dir, steps=3, lora=lora)
    return as_bytes(upscale(photo, config, model=ModelWorker.for_config(config), progress=False))


def test_scale_zero_is_the_plain_model_bit_for_bit(sdxl_dir, loras, plain, photo):
    assert run(sdxl_dir, photo, f"{loras['a']}:0") == plain


def test_a_lora_changes_the_output_and_a_second_one_changes_it_again(sdxl_dir, loras, plain, photo):
    one = run(sdxl_dir, photo, loras["a"])
    assert one != plain
    two = run(sdxl_dir, photo, f"{loras['a']}:1", f"{loras['b']}:0.5")
    assert two != one and two != plain
    assert run(sdxl_dir, photo, f"{loras['a']}:0.5") not in (one, plain)  # the scale reaches the layers


def test_text_encoder_layers_of_a_lora_are_applied(sdxl_dir, loras):
    plain = ModelWorker(sdxl_dir, "cpu", "float32").encode_prompts(["a photo of a cat"])
    worker = ModelWorker(sdxl_dir, "cpu", "float32", addons=Addons((Lora(loras["a"], 1.0),)))
    adapted = worker.encode_prompts(["a photo of a cat"])
    assert not np.array_equal(adapted[0], plain[0])
    assert np.array_equal(adapted[1], plain[1])  # the file has no text_encoder_2 layers: the pooled output stays


def test_ray_actors_give_the_same_bytes_as_the_reference(local_ray, sdxl_dir, loras, photo):
    from cupscale_dist.execution.pool import RayExecutor, WorkerPool
    from cupscale_dist.execution.raycluster import ClusterOptions
    from cupscale_dist.models.spec import ModelSpec

    config = small_config(sdxl_dir, steps=3, lora=(f"{loras['a']}:0.7", loras["b"]))
    reference = as_bytes(upscale(photo, config, model=ModelWorker.for_config(config), progress=False))
    spec = ModelSpec.load(config.model)
    executor = RayExecutor(WorkerPool(config, ClusterOptions(actors=2, cpus_per_actor=0.5), spec), spec,
                           config.view_batch_size)
    assert as_bytes(upscale(photo, config, executor=executor, progress=False)) == reference


def test_a_lora_of_another_family_is_refused_before_any_actor_starts(sdxl_dir, loras, monkeypatch):
    monkeypatch.setattr("cupscale_dist.execution.worker.load_pipeline",
                        lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(UserError) as refused:
        Addons.from_config(small_config(sdxl_dir, lora=(loras["sd15"],)))
    message = str(refused.value)
    assert "\n" not in message and "takes 32 inputs" in message and "has 64" in message
    assert "use a LoRA trained for this model's family" in message


def test_files_that_are_not_loras_are_refused(sdxl_dir, tmp_path):
    import torch
    from safetensors.torch import save_file

    weights = tmp_path / "weights.safetensors"
    save_file({"unet.conv_in.weight": torch.zeros(2, 2)}, str(weights))
    text = tmp_path / "notes.safetensors"
    text.write_text("not a tensor file")
    with pytest.raises(UserError, match="no LoRA weights in it"):
        Addons.from_config(small_config(sdxl_dir, lora=(str(weights),)))
    with pytest.raises(UserError, match="not a readable safetensors file"):
        Addons.from_config(small_config(sdxl_dir, lora=(str(text),)))


def test_kohya_names_are_checked_against_the_unet(sdxl_dir, tmp_path):
    import torch
    from safetensors.torch import save_file

    from cupscale_dist.models.lora import check_lora
    from cupscale_dist.models.spec import ModelSpec

    spec = ModelSpec.read(sdxl_dir)
    good = tmp_path / "good.safetensors"
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{name}.lora_down.weight": torch.zeros(4, 64), f"{name}.lora_up.weight": torch.zeros(64, 4)}, str(good))
    check_lora(str(good), spec)
    wrong_width = tmp_path / "sd15.safetensors"
    save_file({f"{name}.lora_down.weight": torch.zeros(4, 768)}, str(wrong_width))
    with pytest.raises(UserError, match=r"takes 768 inputs \(SD1.5\)"):
        check_lora(str(wrong_width), spec)
    absent = tmp_path / "absent.safetensors"
    other = "lora_unet_down_blocks_3_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{other}.lora_down.weight": torch.zeros(4, 64)}, str(absent))
    with pytest.raises(UserError, match="names UNet layers .* does not have"):
        check_lora(str(absent), spec)


def test_parse_lora(tmp_path):
    file = tmp_path / "style.safetensors"
    file.write_bytes(b"")
    assert parse_lora(f"{file}:0.5") == Lora(str(file.resolve()), 0.5)
    assert parse_lora(str(file)) == Lora(str(file.resolve()), 1.0)
    with pytest.raises(UserError, match="is not a finite number"):
        parse_lora(f"{file}:nan")
    with pytest.raises(UserError, match="not a file; pass a LoRA"):
        parse_lora(str(tmp_path / "missing.safetensors:0.5"))


def test_cli_maps_lora_flags_onto_the_config(tmp_path):
    from cupscale_dist.cli.main import build_parser
    from cupscale_dist.cli.options import config_from_args

    args = build_parser().parse_args(["upscale", "in.png", "-o", "out.png", "--lora", "a.safetensors:0.5",
                                      "--lora", "b.safetensors", "--creativity", "0.5", "--controlnet", "cn"])
    config = config_from_args(args)
    assert config.lora == ("a.safetensors:0.5", "b.safetensors") and config.controlnet == "cn"
    assert config.strength == pytest.approx(0.45)


def test_the_service_owns_the_add_ons():
    from starlette.datastructures import QueryParams

    from cupscale_dist.services.serve import request_knobs

    for knob in ("lora", "controlnet", "upscale_model", "model_config"):
        with pytest.raises(UserError, match=f"{knob} is set by the service"):
            request_knobs(QueryParams(f"{knob}=x"))
