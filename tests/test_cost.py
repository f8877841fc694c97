"""Cost per image (issue 20): one UNet pass per view when CFG is off, and the plan that counts it."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import small_config
from test_fidelity import sdxl_context

from cupscale_dist import upscale
from cupscale_dist.method import step as step_module
from cupscale_dist.method.step import predict_views
from cupscale_dist.models.backbones.sdxl import SDXL
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
