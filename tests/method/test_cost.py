"""Cost per image (issue 20): one UNet pass per view when CFG is off, and the plan that counts it."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch
from helpers import small_config
from test_fidelity import sdxl_context

from cupscale_dist import upscale
from cupscale_dist.method import step as step_module
from cupscale_dist.method.step import predict_views
from cupscale_dist.models.backbones.sdxl.backbone import SDXL
from cupscale_dist.plan import make_plan

RECTS = np.array([[0, 0, 16, 16], [0, 8, 16, 24]])


def count_view_samples(unet) -> tuple[list[int], object]:
    """Batch sizes of the UNet calls that predict views (the probe's pass carries no regional attention)."""
    sizes = []

    def hook(_module, args, kwargs):
        if (kwargs.get("cross_attention_kwargs") or {}).get("regional") is not None:
            sizes.append((args[0] if args else kwargs["sample"]).shape[0])

    return sizes, unet.register_forward_pre_hook(hook, with_kwargs=True)


def test_guidance_one_runs_half_the_unet_samples_of_cfg(sdxl_model, photo):
    """A whole upscale at guidance 1 feeds the UNet exactly half the view samples of the same run with CFG."""
    counts = {}
    for guidance in (3.0, 1.0):
        sizes, handle = count_view_samples(sdxl_model.unet)
        try:
            upscale(photo, small_config(sdxl_model.name, steps=2, guidance_scale=guidance), model=sdxl_model,
                    progress=False)
        finally:
            handle.remove()
        counts[guidance] = sum(sizes)
    assert counts[3.0] > 0 and counts[1.0] * 2 == counts[3.0]
    plan = make_plan(photo.size, small_config(sdxl_model.name, steps=2, guidance_scale=1.0), (8, 4)).describe()
    cfg_plan = make_plan(photo.size, small_config(sdxl_model.name, steps=2, guidance_scale=3.0), (8, 4)).describe()
    assert plan["unet_evaluations"] * 2 == cfg_plan["unet_evaluations"]


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
def test_one_pass_equals_the_two_pass_formula_at_guidance_one(sdxl_model, monkeypatch, masked):
    """The conditional pass alone == eps_u + 1 * (eps_c - eps_u) of the two-pass batch, masks and SDXL's added
    conditioning included. In float64: in float32 the CPU kernels alone differ by ~1e-6 between batch sizes."""
    backbone = SDXL(copy.deepcopy(sdxl_model.unet).double())
    allowed = np.ones((2, 77), dtype=bool)
    if masked:
        allowed[:, 2:5] = False
    context = sdxl_context(sdxl_model, (16, 24), 2, guidance_scale=1.0, lambda_global=0.5, token_allowed=allowed)
    windows = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    sizes, handle = count_view_samples(backbone.unet)
    try:
        one_pass = predict_views(backbone, windows, 500, 0.5, context, [0, 1], RECTS)
        monkeypatch.setattr(step_module, "uses_cfg", lambda _guidance: True)  # the two-pass batch at g = 1
        two_pass = predict_views(backbone, windows, 500, 0.5, context, [0, 1], RECTS)
    finally:
        handle.remove()
    assert sizes == [2, 4]
    assert two_pass.abs().max() > 0.1 and (one_pass - two_pass).abs().max() <= 1e-6


@pytest.mark.parametrize("size", [4, 8, 16])
def test_fast_presets_run_a_quarter_and_lightning_a_tenth_of_the_default_evaluations(size):
    """The plan (what --dry-run prints) of each few-step preset against the default preset of the same size."""
    from cupscale_dist import UpscaleConfig

    def evaluations(preset: str) -> int:
        return make_plan((1024, 1024), UpscaleConfig.load(preset), (8, 4)).describe()["unet_evaluations"]

    default = evaluations(f"sdxl-{size}k")
    assert evaluations(f"sdxl-{size}k-fast") <= default / 4
    assert evaluations(f"sdxl-{size}k-lightning") <= default / 10


def test_a_preset_lora_on_the_hub_resolves_from_the_cache_or_says_how_to_fetch_it(tmp_path, monkeypatch):
    from cupscale_dist import UserError
    from cupscale_dist.models.addons import parse_lora

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    ref = "hf://owner/repo/sub/style.safetensors"
    with pytest.raises(UserError, match="hf download owner/repo sub/style.safetensors"):
        parse_lora(ref + ":0.5")
    snapshot = tmp_path / "models--owner--repo" / "snapshots" / ("a" * 40)
    (snapshot / "sub").mkdir(parents=True)
    (snapshot / "sub" / "style.safetensors").write_bytes(b"x")
    (tmp_path / "models--owner--repo" / "refs").mkdir()
    (tmp_path / "models--owner--repo" / "refs" / "main").write_text("a" * 40)
    lora = parse_lora(ref + ":0.5")
    assert lora.scale == 0.5 and lora.path == str((snapshot / "sub" / "style.safetensors").resolve())
    with pytest.raises(UserError, match="not hf://OWNER/REPO/FILE"):
        parse_lora("hf://owner/repo")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_fp8_weights_are_stored_in_fp8_and_keep_the_picture(sdxl_dir, sdxl_model, photo):
    """weights=fp8: the UNet's and text encoders' matmul weights are float8 in memory (not a no-op), computed in
    float32 on CPU; the picture stays close to the full-precision one."""
    from cupscale_dist.execution.worker import ModelWorker
    from cupscale_dist.models.weights import FP8

    config = small_config(sdxl_dir, steps=3, weights="fp8")
    worker = ModelWorker.for_config(config)
    linear = worker.pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_q.weight
    encoder = worker.pipe.text_encoder_2.text_model.encoder.layers[0].mlp.fc1.weight
    assert linear.dtype == FP8 and encoder.dtype == FP8
    assert worker.pipe.text_encoder_2.text_model.embeddings.token_embedding.weight.dtype == torch.float32
    fp8 = np.asarray(upscale(photo, config, model=worker, progress=False))
    full = np.asarray(upscale(photo, config.replace(weights="full"), model=sdxl_model, progress=False))
    assert not np.array_equal(fp8, full) and psnr(fp8, full) >= 25


def test_fp8_ray_actors_give_the_fp8_references_bytes(local_ray, sdxl_dir, photo):
    """Every weights mode keeps Ray == local bytes, the reference being the same mode's in-process run: two fp8
    actors (each reading its UNet straight into fp8) give the fp8 reference's bytes."""
    from helpers import as_bytes, ray_executor

    from cupscale_dist.execution.worker import ModelWorker

    config = small_config(sdxl_dir, steps=3, weights="fp8", view_batch_size=2)
    expected = as_bytes(upscale(photo, config, model=ModelWorker.for_config(config), progress=False))
    assert as_bytes(upscale(photo, config, executor=ray_executor(config, 2), progress=False)) == expected


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_the_unet_read_straight_into_fp8_is_diffusers_layerwise_casting_byte_for_byte(sdxl_dir, tmp_path, variant):
    """weights=fp8 reads the UNet tensor by tensor into fp8 storage (its peak memory never holds it whole in the
    compute dtype); what it holds is exactly what diffusers' layerwise casting of the loaded UNet holds: every tensor's
    dtype and bytes, and the hooks (same predictions). The fp16 variant's files are chosen where asked."""
    from diffusers import UNet2DConditionModel

    from cupscale_dist.models.fp8_loading import load_denoiser_fp8
    from cupscale_dist.models.weights import FP8

    model_dir = tmp_path / "model"
    shutil.copytree(sdxl_dir, model_dir)
    if variant:  # an fp16 variant beside the fp32 files, as hub repositories ship them
        UNet2DConditionModel.from_pretrained(model_dir / "unet").half().save_pretrained(model_dir / "unet",
                                                                                          variant=variant)
    reference = UNet2DConditionModel.from_pretrained(model_dir / "unet", variant=variant)
    reference.enable_layerwise_casting(storage_dtype=FP8, compute_dtype=torch.float32)
    streamed = load_denoiser_fp8(UNet2DConditionModel, model_dir / "unet", variant, torch.float32)
    ours, theirs = streamed.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert any(t.dtype == FP8 for t in ours.values()) and any(t.dtype == torch.float32 for t in ours.values())
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype, name
        assert torch.equal(ours[name].view(torch.uint8), tensor.view(torch.uint8)), name
    config = reference.config
    sample, states = torch.randn(1, 4, 16, 16), torch.randn(1, 77, config.cross_attention_dim)
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(1, pooled), "time_ids": torch.randn(1, 6)}
    with torch.no_grad():
        assert torch.equal(streamed(sample, 500, states, added_cond_kwargs=added).sample,
                           reference(sample, 500, states, added_cond_kwargs=added).sample)


def test_offload_without_a_gpu_is_one_line_before_any_weights_load(sdxl_dir, monkeypatch):
    from cupscale_dist import UpscaleConfig, UserError
    from cupscale_dist.execution.worker import ModelWorker

    with pytest.raises(UserError, match="weights=offload .* device=cpu has none"):
        UpscaleConfig(model=sdxl_dir, device="cpu", weights="offload")
    monkeypatch.setattr("cupscale_dist.execution.worker.load_pipeline",
                        lambda *a, **k: pytest.fail("weights loaded before the check"))
    with pytest.raises(UserError, match="weights=offload .* this worker runs on cpu"):
        ModelWorker(sdxl_dir, device="auto", dtype="float32", weights="offload")


def test_compile_without_a_compiler_is_one_line_before_any_weights_load(sdxl_dir, monkeypatch):
    from cupscale_dist import UserError
    from cupscale_dist.execution.worker import ModelWorker

    monkeypatch.setattr("shutil.which", lambda _name: None)
    monkeypatch.setattr("cupscale_dist.execution.worker.load_pipeline",
                        lambda *a, **k: pytest.fail("weights loaded before the check"))
    with pytest.raises(UserError, match="compile=true on CPU needs a C.. compiler"):
        ModelWorker(sdxl_dir, device="cpu", dtype="float32", compile=True)


def test_a_worker_loaded_in_one_weights_mode_refuses_a_run_in_another(sdxl_model, photo):
    from cupscale_dist import UserError

    with pytest.raises(UserError, match="add-ons"):
        upscale(photo, small_config(sdxl_model.name, weights="fp8"), model=sdxl_model, progress=False)


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="torch's inductor needs a C++ compiler on CPU (compile=true refuses to start without one)")
def test_a_compiled_unet_gives_the_eager_latents_within_1e_3(sdxl_model):
    """compile=true (regional compilation of the UNet's transformer blocks, inductor on CPU): a step's predictions,
    hence its latent, within 1e-3 of eager; the blocks are compiled for real."""
    from cupscale_dist.models.weights import compile_denoiser

    backbone = SDXL(copy.deepcopy(sdxl_model.unet))
    compile_denoiser(backbone.unet)
    compiled = [m for m in backbone.unet.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert compiled and all(type(m).__name__ == "BasicTransformerBlock" for m in compiled)
    context = sdxl_context(sdxl_model, (16, 24), 2, guidance_scale=3.0, lambda_global=0.5)
    windows = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    eager = predict_views(sdxl_model.backbone, windows, 500, 0.5, context, [0, 1], RECTS)
    ours = predict_views(backbone, windows, 500, 0.5, context, [0, 1], RECTS)
    assert (ours - eager).abs().max() <= 1e-3


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="torch's inductor needs a C++ compiler on CPU (compile=true refuses to start without one)")
def test_compile_happens_before_the_progress_bar_for_every_batch_size(sdxl_dir, photo, monkeypatch):
    """compile=true: the warm-up runs each batch size the loop sends (here a full batch of 4 and a remainder) before
    the denoising bar starts, so no graph is compiled while the bar runs; and every frame dynamo met was compiled
    (the probe's pass runs eager: compiled, its recompiles used up dynamo's limit and left the loop eager)."""
    from torch._dynamo.utils import counters

    from cupscale_dist import pipeline
    from cupscale_dist.execution.worker import ModelWorker

    config = small_config(sdxl_dir, steps=4, compile=True, view_batch_size=4)
    plan = make_plan(photo.size, config, (8, 4))
    assert len(plan.stages[0].views) % 4  # a remainder batch: two shapes to compile
    at_bar = []

    def bar(*args, **kwargs):
        at_bar.append(counters["stats"]["unique_graphs"])
        return pipeline_tqdm(*args, **kwargs)

    pipeline_tqdm = pipeline.tqdm
    monkeypatch.setattr(pipeline, "tqdm", bar)
    torch._dynamo.reset()
    counters.clear()
    worker = ModelWorker(sdxl_dir, device="cpu", dtype="float32", compile=True)
    upscale(photo, config, model=worker, progress=False)
    assert at_bar and at_bar[0] > 0  # compiled by then (the warm-up, after the probe's own shapes)
    assert counters["stats"]["unique_graphs"] == at_bar[0]
    assert counters["frames"]["ok"] == counters["frames"]["total"]


def test_lcm_with_a_cfg_guidance_is_one_line():
    from cupscale_dist import UpscaleConfig, UserError

    with pytest.raises(UserError, match="scheduler=lcm with guidance_scale=5"):
        UpscaleConfig(scheduler="lcm", guidance_scale=5.0)
    assert UpscaleConfig(scheduler="lcm", guidance_scale=1.5).scheduler == "lcm"
