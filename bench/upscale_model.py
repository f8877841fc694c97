"""resize='model' on its own: Real-ESRGAN vs bicubic at x4 on the held-out photos: prints one JSON object.

    python bench/upscale_model.py [--model realesrgan-x4plus] [--threads 2] [--tile 256] [--overlap 16]

Each held-out photo (`cupscale_dist.demo.photos.HELD_OUT`) is centre-cropped and downscaled x4 with bicubic exactly as
`cupscale eval` does (`evaluate.prepare_pair`), then brought back x4 by the upscale model (through
`method.resize.upscale_with_model` with an in-process tile map calling `run_upscale_model`, the worker's code) and
by bicubic. PSNR/SSIM against the original use `evaluate.psnr` / `evaluate.ssim`. CPU cost: seconds of the model
pass per output megapixel with ``torch.set_num_threads(--threads)`` (after the model is loaded; one run per photo).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, log, rounded  # noqa: E402
from cupscale_dist.method.resize import upscale_with_model  # noqa: E402
from cupscale_dist.models import upscale_models as um  # noqa: E402
from cupscale_dist.quality.evaluate import held_out_originals, prepare_pair
from cupscale_dist.quality.image_metrics import psnr, ssim  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="realesrgan-x4plus", help="bundled name or a model file")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tile", type=int, default=256, help="upscale_model_tile (input px)")
    parser.add_argument("--overlap", type=int, default=16, help="upscale_model_overlap (input px)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = um.resolve_upscale_model(args.model)
    um.check_upscale_model(path)
    model = um.load_upscale_model(path, "cpu")
    scale = model.scale

    def tile_map(method, calls):
        for (pixels,) in calls:
            yield um.run_upscale_model(model, pixels)

    photos = {}
    for name, original, _ in held_out_originals():
        original, low = prepare_pair(original, scale)
        log(f"{name}: {low.size} -> {original.size}")
        start = time.perf_counter()
        ours = upscale_with_model(tile_map, low, args.tile, args.overlap, progress=False)
        seconds = time.perf_counter() - start
        bicubic = low.resize(original.size, Image.Resampling.BICUBIC)
        photos[name] = {"input": list(low.size), "output": list(original.size),
                        "psnr_model": psnr(ours, original), "psnr_bicubic": psnr(bicubic, original),
                        "ssim_model": ssim(ours, original), "ssim_bicubic": ssim(bicubic, original),
                        "seconds": seconds, "s_per_output_mp": seconds / (original.width * original.height / 1e6)}
    summary = {key: float(np.mean([p[key] for p in photos.values()]))
               for key in ("psnr_model", "psnr_bicubic", "ssim_model", "ssim_bicubic", "s_per_output_mp")}
    print(json.dumps(rounded({"model": args.model, "architecture": model.architecture.name, "scale": scale,
                              "tags": model.tags, "threads": args.threads, "tile": args.tile, "overlap": args.overlap,
                              "torch": torch.__version__, "load_average": load_average(), "photos": photos,
                              "mean": summary}, 4), indent=1))


if __name__ == "__main__":
    main()
