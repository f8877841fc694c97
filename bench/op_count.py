"""Operators per UNet call, side by side: the bare SDXL-structured UNet vs `predict_views` in each attention variant,
counted on CPU by torch.profiler (a device-independent proxy for kernel launches and copies, which the first GPU run
suggested cost `predict_views` a fixed ~21 ms per call).

    PYTHONPATH=$PWD python bench/op_count.py > op_count.json      # ~1 min on 1 core

The UNet has SDXL base's structure (blocks, transformer depths 1 / 2 / 10, cross-attention width 2048, `text_time`
conditioning) at a tenth of its channels, so the operator counts are SDXL's while the arithmetic is small.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_cost  # noqa: E402  (the full-size benchmark's context, variants and UNet config)
from common import rounded  # noqa: E402

SMALL_CHANNELS = (64, 128, 256)  # SDXL's (320, 640, 1280) / 5; heads of 64 as SDXL's
SMALL_HEADS = (1, 2, 4)
SHOWN = ("aten::clone", "aten::copy_", "aten::cat", "aten::linear", "aten::scaled_dot_product_attention")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", type=int, default=2)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from torch.profiler import ProfilerActivity, profile

    from cupscale_dist.method.attention import install_regional_processors
    from cupscale_dist.method.step import predict_views
    from cupscale_dist.models.backbones.sdxl.backbone import SDXL

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    config = dict(step_cost.SDXL_UNET_CONFIG, block_out_channels=SMALL_CHANNELS, attention_head_dim=SMALL_HEADS)
    unet = UNet2DConditionModel(**config).eval()
    backbone = SDXL(unet)
    tiles, latent = args.tiles, args.latent
    base, rects, windows, bare_inputs = step_cost.side_by_side_inputs(tiles, latent, args.seed, torch.device("cpu"),
                                                                      torch.float32)

    def count(call) -> Counter:
        call()  # warm
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            call()
        return Counter({e.key: e.count for e in prof.key_averages()})

    rows = {}
    with torch.no_grad():
        unet.set_attn_processor(AttnProcessor2_0())
        rows["bare"] = count(lambda: unet(**bare_inputs).sample)
        install_regional_processors(unet)
        for name, spec in step_cost.VARIANTS.items():
            context = step_cost.variant_context(base, *spec)
            rows[name] = count(lambda c=context: predict_views(backbone, windows, step_cost.TIMESTEP,
                                                               step_cost.INPUT_SCALE, c, np.arange(tiles), rects))
    bare = rows["bare"]
    result = {"bench": "op_count", "unet": {"block_out_channels": SMALL_CHANNELS, "transformer_layers_per_block":
                                            config["transformer_layers_per_block"]},
              "tiles": tiles, "latent": latent,
              "operators": {name: sum(c.values()) for name, c in rows.items()},
              "operators_vs_bare": {name: sum(c.values()) / sum(bare.values()) for name, c in rows.items()},
              "shown": {name: {op: c.get(op, 0) for op in SHOWN} for name, c in rows.items()}}
    print(json.dumps(rounded(result), indent=1))


if __name__ == "__main__":
    main()
