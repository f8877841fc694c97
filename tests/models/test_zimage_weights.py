"""Z-Image with ``weights: fp8 | offload`` and ``compile: true`` (issue 36), on the tiny Z-Image, to the tolerances
the SDXL/FLUX cases use (tests/method/test_cost.py): fp8 within PSNR 25 of full, compiled within 1e-3 of eager.

Offload needs a GPU (it moves blocks between CPU memory and one); on CPU it is one line before any weights load, and
the part that is Z-Image's own is checked here with diffusers' block-level group offloading onto the CPU: Z-Image's
forward calls the transformer's parts itself (never ``transformer(...)``), so the hook diffusers puts on the
transformer's own forward, which onloads what lies outside the blocks (embedders, pad tokens, final layer), must be
run by the backbone (``models.offload_hooks.onloaded``), or on a GPU those would stay in CPU memory.

Also ``cupscale caption --tiles`` with a Z-Image model and the tiny VLM (the views of Z-Image's plan, each captioned),
and the weights each mode is estimated to hold (``models.weights.weights_gb``) for Z-Image-Turbo's published counts.
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from helpers import (
    block_groups,
    largest_leaf,
    offload_group_sizes,
    parameter_count,
    resident_share,
    zimage_config,
)

from cupscale_dist import UserError, upscale
from cupscale_dist.execution.worker import ModelWorker
from cupscale_dist.method.step import StageContext, predict_views
from cupscale_dist.models.backbones.zimage.backbone import ZImage, ZImageStage
from cupscale_dist.models.weights import weights_gb
from cupscale_dist.testing.tiny_zimage import MAX_SEQUENCE_LENGTH, zimage_transformer

RECTS = np.array([[0, 0, 16, 16], [0, 8, 16, 24]])  # two overlapping views of a 16 x 24 latent


@pytest.fixture(scope="module")
def worker(zimage_dir):
    return ModelWorker.load(str(zimage_dir), device="cpu", dtype="float32")


def step_context(backbone) -> StageContext:
    """CFG (guidance 3), the composer at lambda 0.5 (a regional stream), global positions: every path of the step."""
    embeds = torch.from_numpy(backbone.encode_prompts(["a cat on a house", "a red roof", "a dark night"],
                                                      MAX_SEQUENCE_LENGTH)[0])
    return StageContext(embeds[-1:], embeds[0:1], embeds[1:-1], np.zeros(len(RECTS), dtype=np.int64), None, None,
                        (16, 24), 8, 3.0, 0.5, "mix", family=ZImageStage("global"))


def windows() -> torch.Tensor:
    return torch.randn(len(RECTS), 16, 16, 16, generator=torch.Generator().manual_seed(5))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b) ** 2)))


def test_fp8_stores_the_transformer_and_qwen3_in_fp8_and_keeps_the_picture(zimage_dir, worker, photo):
    """weights=fp8: the transformer's and Qwen3's matmul weights are float8 in memory, norms and the token embedding
    stay float32; the picture is close to the full-precision one (PSNR >= 25, as SDXL's) and not the same bytes."""
    from cupscale_dist.models.weights import FP8

    fp8_worker = ModelWorker(str(zimage_dir), device="cpu", dtype="float32", weights="fp8")
    transformer, encoder = fp8_worker.pipe.transformer, fp8_worker.pipe.text_encoder
    assert transformer.layers[0].attention.to_q.weight.dtype == FP8
    assert transformer.layers[0].feed_forward.w1.weight.dtype == FP8
    assert encoder.layers[0].mlp.up_proj.weight.dtype == FP8 and encoder.layers[0].self_attn.q_proj.weight.dtype == FP8
    assert encoder.embed_tokens.weight.dtype == torch.float32 and encoder.norm.weight.dtype == torch.float32
    fp8 = np.asarray(upscale(photo, zimage_config(zimage_dir, weights="fp8"), model=fp8_worker, progress=False))
    full = np.asarray(upscale(photo, zimage_config(zimage_dir), model=worker, progress=False))
    assert not np.array_equal(fp8, full) and psnr(fp8, full) >= 25


def test_offload_of_a_zimage_without_a_gpu_is_one_line_before_any_weights_load(zimage_dir, monkeypatch):
    from cupscale_dist import UpscaleConfig

    with pytest.raises(UserError, match="weights=offload .* device=cpu has none"):
        UpscaleConfig(model=str(zimage_dir), device="cpu", weights="offload")
    monkeypatch.setattr("cupscale_dist.execution.worker.load_pipeline",
                        lambda *a, **k: pytest.fail("weights loaded before the check"))
    with pytest.raises(UserError, match="weights=offload .* this worker runs on cpu") as caught:
        ModelWorker(str(zimage_dir), device="auto", dtype="float32", weights="offload")
    assert "\n" not in str(caught.value)


def test_group_offloading_onloads_every_group_of_the_zimage_transformer_and_keeps_the_bytes(worker, monkeypatch):
    """Block-level group offloading (what weights=offload applies, without the CUDA stream) onto the CPU: every group
    is onloaded during a step, the transformer's own (embedders, pad tokens, final layer: onloaded by the hook on its
    forward, which Z-Image's forward runs itself) included, on every call; the predictions are the plain ones bit for
    bit."""
    from diffusers.hooks.group_offloading import ModuleGroup

    transformer = copy.deepcopy(worker.pipe.transformer)
    transformer.enable_group_offload(onload_device=torch.device("cpu"), offload_device="cpu",
                                     offload_type="block_level", num_blocks_per_group=1, use_stream=False)
    offloaded = ZImage(transformer, pipe=worker.pipe)
    context = step_context(worker.backbone)
    with torch.no_grad():
        expected = predict_views(worker.backbone, windows(), 500, 0.5, context, [0, 1], RECTS)
    onloaded = []
    original = ModuleGroup.onload_
    monkeypatch.setattr(ModuleGroup, "onload_", lambda group: onloaded.append(group.onload_leader) or original(group))
    for _ in range(2):
        onloaded.clear()
        with torch.no_grad():
            ours = predict_views(offloaded, windows(), 500, 0.5, context, [0, 1], RECTS)
        assert any(leader is transformer for leader in onloaded)  # the parameters outside the blocks
        blocks = [*transformer.noise_refiner, *transformer.context_refiner, *transformer.layers]
        assert all(any(leader is block for leader in onloaded) for block in blocks)
        assert torch.equal(ours, expected)


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="torch's inductor needs a C++ compiler on CPU (compile=true refuses to start without one)")
def test_a_compiled_zimage_transformer_gives_the_eager_predictions_within_1e_3(worker):
    """compile=true (regional compilation of the transformer's ZImageTransformerBlocks, inductor on CPU): a step's
    predictions (CFG, the regional stream, the composer) within 1e-3 of eager; the blocks are compiled for real."""
    from cupscale_dist.models.weights import compile_denoiser

    transformer = copy.deepcopy(worker.pipe.transformer)
    compile_denoiser(transformer)
    compiled = [m for m in transformer.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert compiled and all(type(m).__name__ == "ZImageTransformerBlock" for m in compiled)
    context = step_context(worker.backbone)
    with torch.no_grad():
        eager = predict_views(worker.backbone, windows(), 500, 0.5, context, [0, 1], RECTS)
        ours = predict_views(ZImage(transformer, pipe=worker.pipe), windows(), 500, 0.5, context, [0, 1], RECTS)
    assert (ours - eager).abs().max() <= 1e-3


def test_caption_tiles_with_a_zimage_model_gives_the_zimage_plans_views_each_with_its_vlm_caption(
        local_ray, zimage_dir, photo, tiny_vlm, tmp_path, capsys):
    """``cupscale caption --tiles --model <Z-Image>``: the views of the plan Z-Image's upscale makes (its geometry:
    factor 8, the same boxes ``check_inputs`` plans), every one with the tiny VLM's caption of its own crop, in the
    format ``--regional-prompts`` reads (a Z-Image upscale with the file runs)."""
    from cupscale_dist.cli.main import main
    from cupscale_dist.plan import check_inputs

    image = tmp_path / "in.png"
    photo.save(image)
    vlm = ["--set", "captioner=transformers", "--set", f"captioner_model={tiny_vlm}", "--set",
           "captioner_dtype=float32", "--set", "captioner_gpus=0"]
    common = ["--model", str(zimage_dir), "--scale", "2", "--tile", "16", "--stride", "8", "--prompt", "a cat"]
    assert main(["caption", str(image), "--tiles", *common, *vlm]) == 0
    printed = json.loads(capsys.readouterr().out)
    plan = check_inputs(photo.size, zimage_config(zimage_dir))
    assert [s["size"] for s in printed["stages"]] == [list(s.size) for s in plan.stages]
    views = printed["stages"][0]["views"]
    assert plan.vae_scale_factor == 8  # FLUX.1's VAE
    assert [v["box"] for v in views] == [[int(left) * 8, int(top) * 8, int(right) * 8, int(bottom) * 8]
                                         for top, left, bottom, right in plan.stages[0].views]  # PIL's crop order
    captions = [v["prompt"] for v in views]
    assert all(isinstance(c, str) and c.strip() for c in captions) and len(set(captions)) > 1
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(printed))
    out = upscale(photo, zimage_config(zimage_dir, prompt="a cat", regional_prompts=str(prompts)), progress=False)
    assert out.size == (photo.width * 2, photo.height * 2)


# -- the weights estimate of each mode (models.weights.weights_gb: --dry-run, a worker's GPU share check) -------------
TURBO = "Tongyi-MAI/Z-Image-Turbo"
# Turbo's published transformer/config.json and text_encoder/config.json (Qwen3-4B, loaded as Qwen3Model: no LM head),
# as bench/zimage_cost.py builds them on the meta device (docs/zimage-notes.md: sources)
TURBO_TRANSFORMER = {"all_patch_size": [2], "all_f_patch_size": [1], "in_channels": 16, "dim": 3840, "n_layers": 30,
                     "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "norm_eps": 1e-5, "qk_norm": True,
                     "cap_feat_dim": 2560, "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": [32, 48, 48],
                     "axes_lens": [1536, 512, 512]}
QWEN3_4B = {"vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": True}


def test_zimage_weights_estimates_follow_its_published_parameter_counts():
    """Turbo in bf16 (dtype auto on a GPU): full, every parameter at 2 bytes; fp8, the transformer's and Qwen3's at
    one; offload, two of the transformer's 181 M layers and the 2 M outside its block lists, Qwen3's 389 M token
    embedding (leaf level) and the VAE: 1.67 GB, not SDXL's rule (40 % of the denoiser: 5.09 GB)."""
    counts = ZImage.published[TURBO]["parameters"]
    transformer, qwen3, vae = counts["unet"], counts["text_encoder"], counts["vae"]
    estimate = {mode: weights_gb(counts, mode, "bfloat16", ZImage) for mode in ("full", "fp8", "offload")}
    assert estimate["full"] == round((transformer + qwen3 + vae) * 2 / 1e9, 2) == 20.52
    assert estimate["fp8"] == round((transformer + qwen3 + vae * 2) / 1e9, 2) == 10.35
    assert estimate["offload"] == round((2 * 180_910_336 + 2_015_552 + 388_956_160 + vae) * 2 / 1e9, 2) == 1.67
    assert estimate["offload"] < estimate["fp8"] < estimate["full"]
    assert weights_gb(counts, "offload", "bfloat16") == 5.09  # the rule of a model whose family is not known


def test_zimage_offload_shares_are_what_group_offloading_keeps_of_the_published_models():
    """``ZImage.offload_resident`` from Turbo's published configs built on the meta device: the transformer's largest
    two consecutive block groups and the rest (block level, a stream), Qwen3's largest leaf (leaf level)."""
    from diffusers import ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    with torch.device("meta"):
        transformer, qwen3 = ZImageTransformer2DModel(**TURBO_TRANSFORMER), Qwen3Model(Qwen3Config(**QWEN3_4B))
    counts = ZImage.published[TURBO]["parameters"]
    assert (parameter_count(transformer), parameter_count(qwen3)) == (counts["unet"], counts["text_encoder"])
    shares = {"unet": resident_share(transformer), "text_encoder": largest_leaf(qwen3) / counts["text_encoder"]}
    assert dict(ZImage.offload_resident) == pytest.approx(shares, rel=1e-12)


def test_the_groups_counted_are_the_ones_diffusers_group_offloading_makes_of_zimage():
    """What the shares count (helpers.block_groups, largest_leaf) against diffusers' own hooks on the same classes,
    tiny: block level (weights=offload's transformer), one group per block of its lists and one for the rest; leaf
    level (its text encoder), one per leaf."""
    from diffusers.hooks import apply_group_offloading
    from transformers import Qwen3Config, Qwen3Model

    transformer = zimage_transformer(0)
    blocks, rest = block_groups(transformer)
    transformer.enable_group_offload(onload_device=torch.device("cpu"), offload_device="cpu",
                                     offload_type="block_level", num_blocks_per_group=1, use_stream=False)
    assert offload_group_sizes(transformer) == sorted([*blocks, rest])
    qwen3 = Qwen3Model(Qwen3Config(vocab_size=96, hidden_size=16, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    apply_group_offloading(qwen3, onload_device=torch.device("cpu"), offload_type="leaf_level")
    assert offload_group_sizes(qwen3)[-1] == largest_leaf(qwen3) == 96 * 16  # the token embedding
