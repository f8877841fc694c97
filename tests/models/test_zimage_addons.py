"""Z-Image add-ons (issue 36 item 5): a LoRA in Z-Image's key grammar loaded onto the workers' transformer, other
families' LoRAs refused from the header in one line (and a Z-Image LoRA on them); the Z-Image ControlNet."""

from __future__ import annotations

import pytest
from helpers import as_bytes, refused_line, small_config

from cupscale_dist import UserError, upscale
from cupscale_dist.models.lora import check_lora
from cupscale_dist.models.spec import ModelSpec
from cupscale_dist.testing.tiny_zimage import MAX_SEQUENCE_LENGTH, build_tiny_zimage_lora


@pytest.fixture(scope="module")
def zimage_lora(zimage_dir, tmp_path_factory):
    return str(build_tiny_zimage_lora(zimage_dir, tmp_path_factory.mktemp("zlora") / "zimage.safetensors", seed=3))


def zimage_config(model_dir, **changes):
    """Turbo's one pass per view (guidance 1), masks off: the LoRA's effect alone."""
    return small_config(str(model_dir), **{"steps": 3, "guidance_scale": 1.0, "mask_mode": "off",
                                           "max_sequence_length": MAX_SEQUENCE_LENGTH, **changes})


# -- LoRA ------------------------------------------------------------------------------------------------------------
def test_zimage_lora_loads_onto_the_transformer_and_changes_the_output(zimage_dir, zimage_lora, photo, tmp_path):
    """A peft LoRA (ZImagePipeline.save_lora_weights) changes the picture; at scale 0 it is the plain model's; the
    same factors in kohya's and in ai-toolkit's/ComfyUI's names (alphas = rank) load through diffusers' conversion
    to the same picture."""
    plain = upscale(photo, zimage_config(zimage_dir), progress=False)
    with_lora = upscale(photo, zimage_config(zimage_dir, lora=(zimage_lora,)), progress=False)
    assert as_bytes(with_lora) != as_bytes(plain)
    zero_scale = upscale(photo, zimage_config(zimage_dir, lora=(f"{zimage_lora}:0",)), progress=False)
    assert as_bytes(zero_scale) == as_bytes(plain)
    for layout in ("kohya", "comfy"):
        other = str(build_tiny_zimage_lora(zimage_dir, tmp_path / f"{layout}.safetensors", seed=3, layout=layout))
        check_lora(other, ModelSpec.read(str(zimage_dir)))
        assert as_bytes(upscale(photo, zimage_config(zimage_dir, lora=(other,)), progress=False)) == as_bytes(
            with_lora), layout


def test_zimage_lora_on_other_families_and_theirs_on_zimage_are_refused_from_the_header(zimage_dir, zimage_lora,
                                                                                         sdxl_dir, sd15_dir,
                                                                                         tmp_path, monkeypatch):
    from cupscale_dist.testing.tiny import build_tiny_lora
    from cupscale_dist.testing.tiny_flux import build_tiny_flux, build_tiny_flux_lora

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("cupscale_dist.models.loading.load_pipeline", refuse)
    flux_dir = build_tiny_flux(tmp_path / "flux")
    zimage = ModelSpec.read(str(zimage_dir))
    for other in (sdxl_dir, sd15_dir, flux_dir):
        with pytest.raises(UserError) as refused:
            check_lora(zimage_lora, ModelSpec.read(str(other)))
        assert "is a Z-Image LoRA" in refused_line(refused)
    sdxl_lora = str(build_tiny_lora(sdxl_dir, tmp_path / "sdxl.safetensors"))
    with pytest.raises(UserError) as refused:
        check_lora(sdxl_lora, zimage)
    assert "names no Z-Image transformer layer" in refused_line(refused)
    flux_lora = str(build_tiny_flux_lora(flux_dir, tmp_path / "flux.safetensors"))
    with pytest.raises(UserError) as refused:
        check_lora(flux_lora, zimage)
    assert "is a Flux LoRA" in refused_line(refused)
    check_lora(zimage_lora, zimage)  # its own family passes


def test_a_zimage_lora_of_other_layers_or_widths_is_one_line(zimage_dir, tmp_path):
    """A LoRA of a wider Z-Image (other factor widths) and one naming a block the model lacks."""
    import torch
    from safetensors.torch import load_file, save_file

    from cupscale_dist.testing.tiny_zimage import zimage_transformer

    zimage = ModelSpec.read(str(zimage_dir))
    deeper = tmp_path / "deeper"
    zimage_transformer(0, n_layers=3).save_pretrained(deeper / "transformer")
    extra = str(build_tiny_zimage_lora(deeper, tmp_path / "deeper.safetensors"))
    with pytest.raises(UserError) as refused:
        check_lora(extra, zimage)
    assert "names a transformer layer" in refused_line(refused) and "layers.2." in refused_line(refused)
    factors = load_file(str(build_tiny_zimage_lora(zimage_dir, tmp_path / "ok.safetensors")))
    key = "transformer.layers.0.attention.to_q.lora_A.weight"
    factors[key] = torch.zeros(factors[key].shape[0], 48)
    save_file(factors, str(tmp_path / "wide.safetensors"))
    with pytest.raises(UserError) as refused:
        check_lora(str(tmp_path / "wide.safetensors"), zimage)
    assert "has 48 inputs" in refused_line(refused)


# -- ControlNet ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zimage_controlnet(tmp_path_factory):
    from cupscale_dist.testing.tiny_zimage import build_tiny_zimage_controlnet

    return str(build_tiny_zimage_controlnet(tmp_path_factory.mktemp("zcontrolnet"), seed=5))


@pytest.mark.parametrize("refiner", [None, "control_noise_refiner", "control_layers"])
def test_the_controlnet_path_is_diffusers_controlnet_then_transformer(zimage_dir, refiner, tmp_path):
    """One view per row at diffusers' own positions ('local'), one caption: our forward with the ControlNet's samples
    equals ZImageControlNetModel's samples added by ZImageTransformer2DModel (ZImageControlNetPipeline's two calls),
    bit for bit, for the 1.x model and both 2.x layouts (noise-refiner samples); the samples change the output."""
    import numpy as np
    import torch
    from diffusers import ZImageControlNetModel, ZImagePipeline

    from cupscale_dist.models.backbones.zimage.backbone import ZImage, caption_lengths
    from cupscale_dist.models.backbones.zimage.positions import padded_length, view_image_ids
    from cupscale_dist.testing.tiny_zimage import build_tiny_zimage_controlnet

    pipe = ZImagePipeline.from_pretrained(zimage_dir)
    controlnet = ZImageControlNetModel.from_pretrained(build_tiny_zimage_controlnet(tmp_path, 5, refiner))
    backbone = ZImage(pipe.transformer, pipe=pipe, controlnet=controlnet)
    embeds = torch.from_numpy(backbone.encode_prompts(["a photo of a cat on the house"], MAX_SEQUENCE_LENGTH)[0])
    tokens = caption_lengths(embeds)[0]
    caption = padded_length(tokens)
    generator = torch.Generator().manual_seed(1)
    latents, control = torch.randn(2, 16, 8, 8, generator=generator), torch.randn(2, 16, 8, 8, generator=generator)
    t = torch.full((2,), 0.3)
    ids = view_image_ids(np.array([[0, 0, 8, 8]] * 2), caption, "local")
    stream = [(embeds.expand(2, -1, -1), [tokens, tokens])]
    with torch.no_grad():
        ours = backbone.forward(latents, t, stream, caption, ids, control=(control, 0.7))
        plain = backbone.forward(latents, t, stream, caption, ids)
        images, controls, captions = list(latents.unsqueeze(2)), list(control.unsqueeze(2)), [embeds[0, :tokens]] * 2
        shared = ZImageControlNetModel.from_transformer(controlnet, pipe.transformer)  # as the pipeline builds it
        samples = shared(images, t, captions, controls, conditioning_scale=0.7)
        expected = pipe.transformer(images, t, captions, controlnet_block_samples=samples, return_dict=False)[0]
    assert torch.equal(ours, torch.stack(expected).squeeze(2))
    assert (ours - plain).abs().max() > 0.1


def test_zimage_controlnet_steers_each_view_with_its_own_crop_and_scale_0_is_without_it(zimage_dir, zimage_controlnet,
                                                                                        photo):
    """Every view, at every step (jittered views), gets the stage input's pixels under its own latent rectangle as
    [0, 1] crops, read as VAE latents; the ControlNet changes the picture; at scale 0 the picture is the run
    without a ControlNet, bit for bit."""
    import numpy as np
    import torch

    from cupscale_dist.execution.executor import LocalExecutor
    from cupscale_dist.execution.worker import ModelWorker
    from cupscale_dist.method.resize import resize_input
    from cupscale_dist.method.vae import encode_pixels
    from cupscale_dist.models.controlnet import control_tensor
    from cupscale_dist.plan import plan_stages

    plain_config = zimage_config(zimage_dir, jitter=2, steps=4)
    config = zimage_config(zimage_dir, controlnet=zimage_controlnet, controlnet_scale=1.0, jitter=2, steps=4)
    worker = ModelWorker.for_config(config)
    seen_rects, seen_crops = [], []
    original_predict, original_latents = worker.predict, worker.backbone.control_latents

    def recording_predict(context, windows, timestep, input_scale, view_ids, rects, control=None):
        seen_rects.extend(np.asarray(rects).tolist())
        return original_predict(context, windows, timestep, input_scale, view_ids, rects, control)

    worker.predict = recording_predict
    worker.backbone.control_latents = lambda control: seen_crops.append(control) or original_latents(control)
    controlled = upscale(photo, config, executor=LocalExecutor(worker, config.view_batch_size), progress=False)
    del worker.predict, worker.backbone.control_latents
    assert as_bytes(controlled) != as_bytes(upscale(photo, plain_config, progress=False))
    stage_input = np.asarray(resize_input(photo, plan_stages(photo.size, config)[0], config))
    f = worker.spec.vae_scale_factor
    received = torch.cat(seen_crops)
    assert len(received) == len(seen_rects) and len({tuple(r) for r in seen_rects}) > 6  # jittered views
    expected = control_tensor(np.stack([stage_input[t * f : b * f, l * f : r * f] for t, l, b, r in seen_rects]))
    assert received.shape[-2:] == (config.tile * f, config.tile * f) and torch.equal(received, expected)
    assert torch.equal(original_latents(received[:2]), encode_pixels(worker.pipe.vae, received[:2] * 2 - 1))
    zero = zimage_config(zimage_dir, controlnet=zimage_controlnet, controlnet_scale=0.0, jitter=2, steps=4)
    assert as_bytes(upscale(photo, zero, executor=LocalExecutor(worker, config.view_batch_size), progress=False)) == \
        as_bytes(upscale(photo, plain_config, progress=False))


def test_zimage_controlnets_mismatched_or_of_another_family_are_one_line(zimage_dir, zimage_controlnet, sdxl_dir,
                                                                         tmp_path):
    import json
    import shutil

    from diffusers import ControlNetModel, UNet2DConditionModel

    from cupscale_dist.models.controlnet import check_controlnet
    from cupscale_dist.testing.tiny_flux import build_tiny_flux, build_tiny_flux_controlnet

    zimage = ModelSpec.read(str(zimage_dir))
    flux_dir = build_tiny_flux(tmp_path / "flux")
    for other in (sdxl_dir, flux_dir):
        with pytest.raises(UserError) as refused:
            check_controlnet(zimage_controlnet, ModelSpec.read(str(other)))
        assert "a 'ZImageControlNetModel' and" in refused_line(refused)
    unet = UNet2DConditionModel.from_pretrained(sdxl_dir, subfolder="unet")
    ControlNetModel.from_unet(unet).save_pretrained(tmp_path / "sdxl-cn")
    flux_cn = build_tiny_flux_controlnet(flux_dir, tmp_path / "flux-cn")
    for other in (tmp_path / "sdxl-cn", flux_cn):
        with pytest.raises(UserError) as refused:
            check_controlnet(str(other), zimage)
        assert "is an zimage model; use a ControlNet of the model's family" in refused_line(refused)
    for change, words in (({"dim": 64}, "made for another model (dim 64 here, 32 in"),
                          ({"control_layers_places": [0, 5]}, "its control_layers_places [0, 5] name layers"),
                          ({"control_in_dim": 4}, "control_in_dim 4 is below")):
        changed = tmp_path / f"cn-{next(iter(change))}"
        shutil.copytree(zimage_controlnet, changed)
        config = json.loads((changed / "config.json").read_text())
        (changed / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(UserError) as refused:
            check_controlnet(str(changed), zimage)
        assert words in refused_line(refused)
    check_controlnet(zimage_controlnet, zimage)  # its own family passes


def test_zimage_lora_and_controlnet_on_two_ray_actors_give_the_local_bytes(local_ray, zimage_dir, zimage_lora,
                                                                           zimage_controlnet, photo):
    """The workers load the LoRA and the ControlNet themselves (the family-neutral path), and each actor's views get
    their own crops: 2 actors give the in-process bytes."""
    from cupscale_dist.execution.pool import RayExecutor, WorkerPool
    from cupscale_dist.execution.raycluster import ClusterOptions

    config = zimage_config(zimage_dir, view_batch_size=2, lora=(zimage_lora,), controlnet=zimage_controlnet,
                           controlnet_scale=1.0)
    reference = as_bytes(upscale(photo, config, progress=False))
    spec = ModelSpec.load(config.model)
    pool = WorkerPool(config, ClusterOptions(actors=2, cpus_per_actor=0.5), spec)
    assert as_bytes(upscale(photo, config, executor=RayExecutor(pool, spec, config.view_batch_size),
                            progress=False)) == reference
