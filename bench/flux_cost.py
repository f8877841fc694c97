"""Flux.1 at scale, measured and modelled (issue 22, item 7): prints one JSON object.

    python bench/flux_cost.py [--runs 3] [--threads 2]

1. ``flops``: a FLUX.1-dev transformer pass over one view, counted from its published config (the transformer is
   built on the meta device: shapes, no weights): every per-token Linear of the double- and single-stream blocks
   plus the joint attention's QK^T and PV, for a 1024 px view (4096 image tokens) and 512 T5 tokens.
2. ``host_8k``: the host-side work of one 8K step (a 1024 x 1024 x 16 stage latent, 225 views of 128 at stride 64),
   timed on this CPU through the functions the pipeline runs: cutting the windows (``predict_step``'s stack),
   packing and RoPE position tables per view (the worker's CPU-side prelude, ``pack_latents``, ``image_ids``,
   the transformer's own ``FluxPosEmbed``), the MultiDiffusion reduce, the flow-matching prior and the scheduler
   step; and that sum as a fraction of a modelled H100 step (flops x views / ``H100_TFLOPS``).
3. ``plans``: transformer evaluations per run for 1K -> 4K / 8K / 16K with the flux presets (28 steps, strength
   0.6: 17 steps per stage; one probe pass per stage) and the modelled H100 hours.
4. ``memory``: weights per actor for each ``weights`` mode, from parameter counts of the published configs (the
   transformer, T5-XXL's encoder, CLIP-L's text model, the VAE), built on the meta device.
Figures from a shared 2-core CPU are upper bounds on a GPU node's host; the load average is printed beside them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch

from common import load_average, random_model, regional_rates, rounded

# black-forest-labs/FLUX.1-dev transformer/config.json
FLUX_DEV_TRANSFORMER = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
                        "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
                        "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)}
# google/t5-v1_1-xxl (FLUX.1's text_encoder_2, encoder only) and openai/clip-vit-large-patch14 (text_encoder)
T5_XXL = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
          "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32}
CLIP_L_TEXT = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
               "num_attention_heads": 12, "max_position_embeddings": 77, "projection_dim": 768}
# FLUX.1's VAE: SD's AutoencoderKL with 16 latent channels, no quant convs
FLUX_VAE = {"block_out_channels": (128, 256, 512, 512), "latent_channels": 16, "layers_per_block": 2,
            "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
            "use_quant_conv": False, "use_post_quant_conv": False}
# What one H100 sustains in bf16 on these matmuls: architecture.md measured 384 TFLOP/s for SDXL's UNet batched;
# a DiT's larger, regular matmuls usually run at least as well, so this is the conservative figure.
H100_TFLOPS = 384.0
VIEW_TOKENS, TEXT_TOKENS = 4096, 512  # a 1024 px view (128 latent px, 64 x 64 patches), FLUX.1-dev's T5 length
STEPS, STRENGTH = 28, 0.6  # the flux presets


def meta_transformer(config: dict = FLUX_DEV_TRANSFORMER):
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(**config)


def flops_per_view(config: dict = FLUX_DEV_TRANSFORMER, image_tokens: int = VIEW_TOKENS,
                   text_tokens: int = TEXT_TOKENS) -> dict:
    """FLOPs of one transformer pass over one view: 2 x (per-token Linear MACs + attention MACs)."""
    model = meta_transformer(config)
    tokens = image_tokens + text_tokens
    dim = config["attention_head_dim"] * config["num_attention_heads"]
    linear = 0
    for blocks, stream_tokens in ((model.transformer_blocks, None), (model.single_transformer_blocks, tokens)):
        for block in blocks:
            for name, module in block.named_modules():
                if not isinstance(module, torch.nn.Linear) or name.startswith("norm"):
                    continue  # AdaLN modulation acts once per sample (on temb), not per token
                if stream_tokens is None:  # double-stream: text layers see text tokens, image layers image tokens
                    text_side = "context" in name or "add_" in name or name.startswith("ff_context")
                    count = text_tokens if text_side else image_tokens
                else:
                    count = stream_tokens
                linear += module.in_features * module.out_features * count
    attention = (len(model.transformer_blocks) + len(model.single_transformer_blocks)) * 2 * tokens * tokens * dim
    parameters = sum(p.numel() for p in model.parameters())
    return {"tflop_per_view": 2 * (linear + attention) / 1e12, "attention_share": attention / (linear + attention),
            "transformer_parameters": parameters,
            "h100_s_per_view": 2 * (linear + attention) / (H100_TFLOPS * 1e12)}


def host_step_8k(runs: int) -> dict:
    """Seconds of each host-side part of one 8K Flux step (median over ``runs``)."""
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    from cupscale_dist.method.prior import GlobalPrior, inject_global_prior_flow
    from cupscale_dist.method.schedulers import kind_of, make_scheduler
    from cupscale_dist.method.step import reduce_predictions
    from cupscale_dist.method.views import make_views, view_batches
    from cupscale_dist.models.backbones.flux.backbone import (
        image_ids,
        pack_latents,
        rotary_tables,
    )
    from cupscale_dist.testing.tiny_flux import DEV_SCHEDULER

    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 1024, 1024, generator=gen)
    views = make_views(1024, 1024, 128, 64)
    batches = view_batches(len(views), 4)
    prediction = torch.randn(4, 16, 128, 128, generator=gen)
    prior = GlobalPrior.from_latent(torch.randn(1, 16, 1024, 1024, generator=gen), latents, "haar", 1)
    pos_embed = FluxPosEmbed(theta=10000, axes_dim=list(FLUX_DEV_TRANSFORMER["axes_dims_rope"]))
    scheduler = make_scheduler("flow_euler", DEV_SCHEDULER)
    times: dict[str, list[float]] = {k: [] for k in ("cut", "pack", "positions", "reduce", "prior", "step")}
    host = latents[0].numpy()
    for _ in range(runs):
        kind_of(scheduler).set_timesteps(scheduler, STEPS, VIEW_TOKENS)
        scheduler.set_begin_index(STEPS - round(STRENGTH * STEPS))
        start = time.perf_counter()
        windows = [np.stack([host[:, t:b, l:r] for t, l, b, r in views[batch.start:batch.stop]]) for batch in batches]
        times["cut"].append(time.perf_counter() - start)
        start = time.perf_counter()
        for window in windows:
            pack_latents(torch.from_numpy(window))
        times["pack"].append(time.perf_counter() - start)
        start = time.perf_counter()
        for batch in batches:  # as Flux.rotary: the batch's ids, tables per distinct position
            ids = image_ids(views[batch.start:batch.stop], "global")
            every = torch.cat([torch.zeros(len(ids), TEXT_TOKENS, 3), ids], dim=1).reshape(-1, 3)
            rotary_tables(pos_embed, every)
        times["positions"].append(time.perf_counter() - start)
        start = time.perf_counter()
        velocity = reduce_predictions(((batch, prediction[: len(batch)]) for batch in batches), views, latents.shape)
        times["reduce"].append(time.perf_counter() - start)
        start = time.perf_counter()
        sigma = float(scheduler.sigmas[scheduler.begin_index])
        velocity = inject_global_prior_flow(velocity, latents, prior, 1.0, sigma)
        times["prior"].append(time.perf_counter() - start)
        start = time.perf_counter()
        scheduler.step(velocity, scheduler.timesteps[scheduler.begin_index], latents)
        times["step"].append(time.perf_counter() - start)
    parts = {name: statistics.median(values) for name, values in times.items()}
    driver = sum(parts[name] for name in ("cut", "reduce", "prior", "step"))
    # pack and positions run in the worker's process beside the transformer (on its device in a real run)
    return {"views": len(views), "seconds": parts, "driver_s": driver,
            "worker_prelude_s": parts["pack"] + parts["positions"]}


def plan_evaluations(flops: dict) -> dict:
    """Transformer passes of a 1K -> NK run with the flux presets, and the modelled H100 time."""
    from cupscale_dist.method.views import make_views

    per_stage_steps = round(STRENGTH * STEPS)
    out = {}
    for target in (4, 8, 16):
        side, passes, views_per_stage = 1024, 0, []
        while side < target * 1024:
            side *= 2
            count = len(make_views(side // 8, side // 8, 128, 64))
            views_per_stage.append(count)
            passes += count * per_stage_steps + 1  # + the attention probe
        out[f"{target}k"] = {"views_per_stage": views_per_stage, "transformer_passes": passes,
                             "h100_hours": passes * flops["h100_s_per_view"] / 3600}
    return out


def memory_per_actor(flops: dict) -> dict:
    """GB of weights one actor holds per weights mode (bf16 compute; activations on top)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.device("meta"):
        t5 = sum(p.numel() for p in T5EncoderModel(T5Config(**T5_XXL)).parameters())
        clip = sum(p.numel() for p in CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)).parameters())
        vae = sum(p.numel() for p in AutoencoderKL(**FLUX_VAE).parameters())
    model = meta_transformer()
    largest_block = max(sum(p.numel() for p in block.parameters())
                        for block in [*model.transformer_blocks, *model.single_transformer_blocks])
    transformer = flops["transformer_parameters"]
    params = {"transformer": transformer, "text_encoder_2_t5": t5, "text_encoder_clip": clip, "vae": vae,
              "largest_block": largest_block}

    def gb(n, width):
        return n * width / 1e9

    return {"parameters": params,
            "full_bf16_gb": gb(transformer + t5 + clip + vae, 2),
            "fp8_gb": gb(transformer + t5 + clip, 1) + gb(vae, 2),
            # group offload, block level: one block resident plus the next prefetched; the rest of the transformer
            # (embedders, norm_out) stays; text encoders leaf level, about one T5 layer at a time
            "offload_gb": gb(2 * largest_block, 2) + gb(t5 / T5_XXL["num_layers"], 2) + gb(vae, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    flops = flops_per_view()
    host = host_step_8k(args.runs)
    step_h100_s = host["views"] * flops["h100_s_per_view"]
    result = {"bench": "flux_cost", "threads": args.threads, "load_average": load_average(), "flops": flops,
              "host_8k": host, "h100_step_8k_s": step_h100_s,
              "driver_fraction_of_h100_step": host["driver_s"] / step_h100_s,
              "worker_prelude_fraction_of_h100_step": host["worker_prelude_s"] / step_h100_s,
              "plans": plan_evaluations(flops), "memory": memory_per_actor(flops)}
    print(json.dumps(rounded(result), indent=1))


if __name__ == "__main__":
    main()


def transformer_rates(device: str = "cuda", dtype=torch.bfloat16, config: dict = FLUX_DEV_TRANSFORMER,
                      views: int = 4, view_latent: int = 128, text_tokens: int = TEXT_TOKENS, repeats: int = 5,
                      warmup: int = 2, seed: int = 0) -> dict:
    """Seconds per view batch of a Flux transformer (random weights, built on ``device`` in ``dtype``), side by
    side after warm-up, median of ``repeats``: ``bare`` (the stock processor, one position table for the batch),
    ``plain`` (``predict_views`` with lambda = 1, nothing screened: per-view global positions), ``masks`` (view
    masks screening half the global tokens), ``mix`` (lambda 0.5: the text stream doubles) -> s/view, the ratios to
    bare and the achieved TFLOP/s (FLOPs counted from the config)."""
    from types import SimpleNamespace

    from diffusers import FluxTransformer2DModel
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    from cupscale_dist.method.step import StageContext
    from cupscale_dist.method.views import make_views
    from cupscale_dist.models.backbones.flux.backbone import Flux, FluxStage, image_ids, pack_latents
    from cupscale_dist.models.backbones.flux.joint_attention import install_joint_processors

    transformer = random_model(FluxTransformer2DModel, config, device, dtype, seed)
    channels, dim = config["in_channels"] // 4, config["joint_attention_dim"]
    backbone = Flux(transformer, pipe=SimpleNamespace(tokenizer_2=SimpleNamespace(model_max_length=text_tokens)))
    gen = torch.Generator().manual_seed(seed)
    embeds = torch.randn(3, text_tokens, dim, generator=gen)
    pooled = torch.randn(3, config["pooled_projection_dim"], generator=gen)
    side = view_latent * 2
    rects = make_views(side, side, view_latent, view_latent // 2)[:views]
    windows = torch.randn(views, channels, view_latent, view_latent, generator=gen)
    allowed = np.ones((views, text_tokens), dtype=bool)
    allowed[:, 1 : text_tokens // 2] = False
    flux = FluxStage(pooled[2:3], pooled[0:1], pooled[1:2], "global", "global", 3.5)
    base = StageContext(embeds[2:3], embeds[0:1], embeds[1:2], np.zeros(views, dtype=np.int64), None, None,
                        (side, side), 8, 1.0, 1.0, "mix", family=flux).to(device, dtype)
    guidance = torch.full((views,), 3.5, device=device) if config.get("guidance_embeds") else None
    packed = pack_latents(windows).to(device, dtype)

    def bare():  # the stock processor is installed around it, outside the timed region
        transformer(hidden_states=packed, timestep=torch.full((views,), 0.7, device=device, dtype=dtype),
                    guidance=guidance, pooled_projections=base.family.global_pooled.expand(views, -1),
                    encoder_hidden_states=base.global_embeds.expand(views, -1, -1),
                    txt_ids=torch.zeros(text_tokens, 3, device=device),
                    img_ids=image_ids(rects[:1], "local")[0].to(device), return_dict=False)

    def use_stock():
        transformer.set_attn_processor(FluxAttnProcessor())

    per_view = regional_rates(backbone, windows, rects, base, allowed, bare, use_stock,
                              lambda: install_joint_processors(transformer), device, warmup, repeats)
    flops = flops_per_view(config, (view_latent // 2) ** 2, text_tokens)["tflop_per_view"]
    return {"device": device, "views_per_call": views, "s_per_view": per_view,
            "vs_bare": {name: per_view[name] / per_view["bare"] for name in per_view},
            "achieved_tflops_bare": flops / per_view["bare"]}
