"""Quality of the demo model, side by side in one run: `cupscale eval` on the held-out photos at x2 and x4.

    PYTHONPATH=$PWD python bench/quality.py > quality.json          # ~16 min on 2 cores; progress on stderr

Variants (each a knob change from the cpu-demo preset): the trained demo model at the defaults; the random-weight
tiny SDXL (`cupscale_dist.testing.tiny.build_tiny_sdxl`) with the same knobs; the global prior off (`prior_fraction=0`);
no overlap (`stride = tile`: the seam score must rise); lambda = 1 (global prompt only). Bicubic's figures come with
every row (`psnr_bicubic`, `ssim_bicubic`; detail and seam are relative to bicubic). Prints one JSON object
with every variant's overall figures and a markdown table (`table`) as pasted into the README.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_set_option, knob_overrides, load_average, log, rounded  # noqa: E402

SHOWN = ("psnr", "ssim", "consistency", "detail", "seam")


def variants(random_model: str, tile: int, stride: int, factor: int) -> dict[str, dict]:
    """Knob changes from the preset; ``factor``: the model's VAE factor (the random-weight tiny SDXL's is 8, so its
    tiles are scaled to cover the same pixels)."""
    return {
        "demo (defaults)": {},
        "random weights": {"model": random_model, "tile": tile * factor // 8, "stride": stride * factor // 8},
        "prior off": {"prior_fraction": 0.0},
        "stride = tile": {"stride": tile},
        "lambda = 1": {"lambda_global": 1.0},
    }


def markdown(results: dict) -> str:
    lines = ["| variant | scale | PSNR | SSIM | consistency (dB) | detail vs bicubic | seam |",
             "|---|---|---|---|---|---|---|"]
    for scale, by_variant in results.items():
        first = next(iter(by_variant.values()))
        lines.append(f"| bicubic | {scale} | {first['psnr_bicubic']:.2f} | {first['ssim_bicubic']:.3f} | – | 1.00 | "
                     "1 (reference) |")
        for name, o in by_variant.items():
            lines.append(f"| {name} | {scale} | {o['psnr']:.2f} | {o['ssim']:.3f} | {o['consistency']:.2f} | "
                         f"{o['detail']:.2f} | {o['seam']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", default="2,4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="keep each variant's eval dir (crops, upscales) here")
    add_set_option(parser, "every variant")
    args = parser.parse_args()

    import torch

    from cupscale_dist import UpscaleConfig
    from cupscale_dist.execution.worker import ModelWorker
    from cupscale_dist.models.spec import model_geometry
    from cupscale_dist.quality.evaluate import evaluate, held_out_originals
    from cupscale_dist.testing.tiny import build_tiny_sdxl

    torch.set_num_threads(args.threads)
    overrides = knob_overrides(args)
    originals = held_out_originals()
    results: dict[str, dict] = {}
    started = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        random_model = str(build_tiny_sdxl(Path(scratch) / "random", seed=0))
        workers: dict[str, ModelWorker] = {}
        for scale in (int(s) for s in args.scales.split(",")):
            results[f"x{scale}"] = {}
            base = UpscaleConfig.load("cpu-demo", scale=scale, torch_threads=args.threads, **overrides)
            factor = model_geometry(base.model)[0]
            for name, knobs in variants(random_model, base.tile, base.stride, factor).items():
                config = UpscaleConfig.load("cpu-demo", scale=scale, torch_threads=args.threads,
                                            **{**overrides, **knobs})
                worker = workers.get(config.model) or ModelWorker.for_config(config)  # with its add-ons
                workers[config.model] = worker
                out = Path(args.out) / f"x{scale}-{name.replace(' ', '_')}" if args.out else None
                log(f"x{scale} {name} ...")
                report = evaluate(originals, config, worker=worker, out_dir=out, progress=False,
                                  overwrite=True)  # a bench rerun replaces its own sheets
                results[f"x{scale}"][name] = report["overall"]
                log(f"  {json.dumps(rounded({k: report['overall'][k] for k in SHOWN}, 4))}")
    print(json.dumps({
        "bench": "quality", "images": [n for n, *_ in originals], "overrides": overrides, "threads": args.threads,
        "seconds": round(time.time() - started, 1), "load_average": load_average(),
        "results": rounded(results, 5), "table": markdown(results),
    }, indent=1))


if __name__ == "__main__":
    main()
