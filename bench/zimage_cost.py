"""Z-Image-Turbo at scale, modelled (issue 36, item 6): prints one JSON object as its last stdout line.

    python bench/zimage_cost.py [--caption-tokens 512] [--strength 0.6] [--out bench/results/zimage-cost-cpu.json]

Nothing is timed and no weight is loaded: every figure comes from the published configs (docs/zimage-notes.md says
where each number is from), the models built on the meta device for their shapes and parameter counts.

1. ``flops``: one ZImageTransformer2DModel pass over one 1024 px view (128 x 128 latent = 64 x 64 = 4096 image
   tokens) with a caption of ``--caption-tokens`` (padded to a multiple of 32, as the transformer pads it): every
   per-token Linear (attention q/k/v/out, the SwiGLU MLP's w1/w2/w3, the patch and caption embedders, the final
   layer; adaLN modulation acts once per sample and is left out) plus attention's QK^T and PV, per block: the 2 noise
   refiner blocks over the image tokens, the 2 context refiner blocks over the caption tokens, the 30 single-stream
   layers over image + caption. ``by_caption_tokens`` repeats the count for other caption lengths.
2. ``plans``: transformer passes of a 1024 px -> 4K / 8K / 16K run with the planner's views
   (``cupscale_dist.plan.make_plan``: the zimage-* presets' tile/stride where they exist, otherwise the flux-* presets'
   tile 128 / stride 64, with Turbo's 8 steps and ``--strength``), one pass per view (guidance 0/1) and with CFG (two),
   plus one attention-probe pass per stage; the modelled one-H100 seconds at :data:`flux_cost.H100_TFLOPS`; and for
   each stage the largest global image position on the height/width axes against Z-Image's ``axes_lens`` (512).
3. ``memory``: weights per actor for ``weights: full`` (bf16), ``fp8`` (transformer and text encoder one byte per
   weight, VAE bf16) and ``offload`` (two transformer blocks resident, one prefetched, plus the transformer's
   embedders and final layer; the text encoder one leaf group at a time, its largest being the 151,936 x 2560
   embedding table; the VAE), from parameter counts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import load_average, log, rounded  # noqa: E402
from flux_cost import FLUX_VAE, H100_TFLOPS  # noqa: E402

# Tongyi-MAI/Z-Image-Turbo transformer/config.json (docs/zimage-notes.md: sources)
ZIMAGE_TURBO_TRANSFORMER = {"all_patch_size": [2], "all_f_patch_size": [1], "in_channels": 16, "dim": 3840,
                            "n_layers": 30, "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "norm_eps": 1e-5,
                            "qk_norm": True, "cap_feat_dim": 2560, "rope_theta": 256.0, "t_scale": 1000.0,
                            "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512]}
# Tongyi-MAI/Z-Image-Turbo text_encoder/config.json: Qwen3-4B, loaded as Qwen3Model (no LM head; tied embeddings)
QWEN3_4B = {"vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960,
            "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True}
# The VAE is FLUX.1's (same config and factors 0.3611 / 0.1159): flux_cost.FLUX_VAE
H100_BF16_DENSE_TFLOPS = 989.4  # NVIDIA's H100 SXM dense bf16 peak: H100_TFLOPS / this is the MFU assumed
VIEW_LATENT = 128  # a 1024 px view
PATCH = 2
SEQ_MULTI_OF = 32  # diffusers' transformer_z_image.SEQ_MULTI_OF
TURBO_STEPS = 8
CAPTION_LENGTHS = (32, 128, 256, 512)


def meta_transformer(config: dict = ZIMAGE_TURBO_TRANSFORMER):
    from diffusers import ZImageTransformer2DModel

    with torch.device("meta"):
        return ZImageTransformer2DModel(**config)


def padded(tokens: int) -> int:
    return tokens + (-tokens) % SEQ_MULTI_OF


def flops_per_view(model, caption_tokens: int, image_tokens: int = (VIEW_LATENT // PATCH) ** 2) -> dict:
    """FLOPs of one transformer pass over one view: 2 x (per-token Linear MACs + attention MACs), per part."""
    dim = model.config.dim
    caption = padded(caption_tokens)  # the transformer pads the caption with cap_pad_token (attended, not masked)
    image = padded(image_tokens)

    def block_macs(block, tokens: int) -> tuple[int, int]:
        linear = sum(m.in_features * m.out_features for name, m in block.named_modules()
                     if isinstance(m, torch.nn.Linear) and not name.startswith("adaLN"))
        return linear * tokens, 2 * tokens * tokens * dim  # QK^T and PV over all heads

    parts = {}
    for name, blocks, tokens in (("noise_refiner", model.noise_refiner, image),
                                 ("context_refiner", model.context_refiner, caption),
                                 ("layers", model.layers, image + caption)):
        linear = attention = 0
        for block in blocks:
            lin, att = block_macs(block, tokens)
            linear, attention = linear + lin, attention + att
        parts[name] = {"linear_macs": linear, "attention_macs": attention, "tokens": tokens}
    embed = (sum(m.in_features * m.out_features for m in model.all_x_embedder.values()) * image
             + model.cap_embedder[1].in_features * model.cap_embedder[1].out_features * caption
             + sum(layer.linear.in_features * layer.linear.out_features for layer in model.all_final_layer.values())
             * image)
    parts["embedders_and_final"] = {"linear_macs": embed, "attention_macs": 0}
    macs = sum(p["linear_macs"] + p["attention_macs"] for p in parts.values())
    attention = sum(p["attention_macs"] for p in parts.values())
    tflop = 2 * macs / 1e12
    return {"caption_tokens": caption_tokens, "caption_padded": caption, "image_tokens": image,
            "tflop_per_view": tflop, "attention_share": attention / macs,
            "tflop_by_part": {name: 2 * (p["linear_macs"] + p["attention_macs"]) / 1e12 for name, p in parts.items()},
            "h100_s_per_view": tflop / H100_TFLOPS}


def preset(target: int, strength: float, guidance: float):
    """The zimage preset of this size if it exists, else the flux one's views, with Turbo's steps."""
    from cupscale_dist import UpscaleConfig

    for name in (f"zimage-{target}k", f"flux-{target}k"):
        try:
            base = UpscaleConfig.load(name)
        except Exception:  # a preset not written yet
            continue
        return name, base.replace(model="Tongyi-MAI/Z-Image-Turbo", steps=TURBO_STEPS, strength=strength,
                                  guidance_scale=guidance)
    raise SystemExit(f"no zimage-{target}k or flux-{target}k preset to take the views from")


def plans(flops: dict, strength: float, axes_len: int) -> dict:
    """Transformer passes and modelled H100 time of 1K -> 4K / 8K / 16K, one pass per view and with CFG."""
    from cupscale_dist.plan import make_plan

    out = {}
    for target in (4, 8, 16):
        row = {}
        for mode, guidance in (("one_pass", 1.0), ("cfg", 4.0)):
            name, config = preset(target, strength, guidance)
            plan = make_plan((1024, 1024), config, (8, 16))
            evaluations = plan.describe()["unet_evaluations"]  # views x steps x passes, over the stages
            passes = evaluations + len(plan.stages)  # + one attention-probe pass per stage
            row[mode] = {"transformer_passes": passes, "h100_seconds": passes * flops["h100_s_per_view"],
                         "h100_hours": passes * flops["h100_s_per_view"] / 3600}
        row["views_from_preset"] = name
        row["tile"], row["stride"], row["steps_per_stage"] = config.tile, config.stride, plan.steps
        row["stages"] = [{"latent": list(stage.latent), "views": len(stage.views),
                          "max_global_patch_position": max(stage.latent) // PATCH - 1,
                          "past_axes_lens": max(stage.latent) // PATCH - 1 >= axes_len} for stage in plan.stages]
        out[f"{target}k"] = row
    return out


def memory_per_actor(model) -> dict:
    """GB of weights one actor holds per weights mode (bf16 compute; activations on top)."""
    from diffusers import AutoencoderKL
    from transformers import Qwen3Config, Qwen3Model

    with torch.device("meta"):
        text = Qwen3Model(Qwen3Config(**QWEN3_4B))
        vae = sum(p.numel() for p in AutoencoderKL(**FLUX_VAE).parameters())
    text_total = sum(p.numel() for p in text.parameters())
    text_largest_leaf = max(text.embed_tokens.weight.numel(),
                            max(sum(p.numel() for p in layer.parameters()) for layer in text.layers))
    transformer = sum(p.numel() for p in model.parameters())
    blocks = [*model.noise_refiner, *model.context_refiner, *model.layers]
    largest_block = max(sum(p.numel() for p in block.parameters()) for block in blocks)
    outside_blocks = transformer - sum(sum(p.numel() for p in block.parameters()) for block in blocks)

    def gb(n: int, width: int) -> float:
        return n * width / 1e9

    return {"parameters": {"transformer": transformer, "text_encoder_qwen3_4b": text_total, "vae": vae,
                           "transformer_largest_block": largest_block,
                           "transformer_outside_blocks": outside_blocks,
                           "text_encoder_largest_leaf": text_largest_leaf},
            "full_bf16_gb": gb(transformer + text_total + vae, 2),
            "fp8_gb": gb(transformer + text_total, 1) + gb(vae, 2),
            "offload_gb": gb(2 * largest_block + outside_blocks, 2) + gb(text_largest_leaf, 2) + gb(vae, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--caption-tokens", type=int, default=512,
                        help="caption tokens per view (ZImagePipeline's max_sequence_length: 512, the upper bound)")
    parser.add_argument("--strength", type=float, default=0.6, help="the flux presets' strength (zimage's: not set)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "zimage-cost-cpu.json")
    args = parser.parse_args()
    model = meta_transformer()
    log("counting FLOPs and parameters on the meta device")
    flops = flops_per_view(model, args.caption_tokens)
    result = {
        "bench": "zimage_cost", "model": "Tongyi-MAI/Z-Image-Turbo (published configs, meta device)",
        "load_average": load_average(),
        "assumptions": {"h100_tflops": H100_TFLOPS, "h100_bf16_dense_peak_tflops": H100_BF16_DENSE_TFLOPS,
                        "mfu": H100_TFLOPS / H100_BF16_DENSE_TFLOPS,
                        "h100_tflops_source": "bench/flux_cost.py H100_TFLOPS (SDXL UNet measured in "
                                              "architecture.md); the H200 ran FLUX.1 at 435 TFLOP/s",
                        "view_px": VIEW_LATENT * 8, "steps": TURBO_STEPS, "strength": args.strength,
                        "caption_tokens": args.caption_tokens},
        "flops": flops,
        "by_caption_tokens": {str(n): rounded(flops_per_view(model, n)["tflop_per_view"]) for n in CAPTION_LENGTHS},
        "plans": plans(flops, args.strength, ZIMAGE_TURBO_TRANSFORMER["axes_lens"][1]),
        "memory": memory_per_actor(model),
    }
    result = rounded(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    log(f"written {args.out}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
