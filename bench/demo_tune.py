"""Tune the cpu-demo preset on training photos only: `cupscale eval` over a grid of knobs, side by side in one run.

    PYTHONPATH=$PWD python bench/demo_tune.py > bench/results/demo-tune-cpu.json   # progress on stderr

The held-out photos (astronaut, coffee) are never looked at here: the preset's strength, guidance and blending are
chosen on centre crops of colour training photos, then measured once on the held-out ones by `bench/quality.py`.
Each row is the mean over the photos of `cupscale eval`'s figures (consistency, detail and seam relative to bicubic;
docs/quality.md). `choice` is the row with the most detail among those meeting issue 23's targets (consistency >= 28 dB,
detail >= 1.0, seam <= 1.10) where the model acts, or, where none meets them all, the row with the smallest total
shortfall. A run of one step is not the model acting (`model_acts: false`): with SDXL's "leading" timesteps its only
step is t = 1, the VAE's round trip of the resized picture (under `resize: model`, the SR network's picture alone).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_set_option, knob_overrides, load_average, log, rounded  # noqa: E402

TUNING_PHOTOS = ("chelsea", "rocket", "sklearn:china.jpg", "sklearn:flower.jpg")  # training photos, in colour
CROP_PX = 384  # a square centre crop (at most): enough boundary lines for the seam score, a minute per row on 2 cores
TARGETS = {"consistency": 28.0, "detail": 1.0, "seam": 1.10}  # issue 23 (seam: at most)


def shortfall(figures: dict) -> float:
    """How far a row is from the targets, in target-relative units (0 = every target met)."""
    return (max(0.0, TARGETS["consistency"] - figures["consistency"]) / TARGETS["consistency"]
            + max(0.0, TARGETS["detail"] - figures["detail"]) / TARGETS["detail"]
            + max(0.0, figures["seam"] - TARGETS["seam"]) / TARGETS["seam"])


def grid(text: str) -> list[float | str]:
    return [v if v.isalpha() else float(v) for v in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--strength", type=grid, default=grid("0.3,0.45,0.6"))
    parser.add_argument("--guidance", type=grid, default=grid("2,4"))
    parser.add_argument("--blend", type=grid, default=grid("uniform,gaussian"))
    parser.add_argument("--threads", type=int, default=2)
    add_set_option(parser, "every row")
    args = parser.parse_args()

    import torch
    from PIL import Image

    from cupscale_dist import UpscaleConfig
    from cupscale_dist.demo.photos import HELD_OUT, load_photo, photo
    from cupscale_dist.execution.worker import ModelWorker
    from cupscale_dist.plan import denoising_steps
    from cupscale_dist.quality.evaluate import evaluate

    assert not set(TUNING_PHOTOS) & set(HELD_OUT)
    torch.set_num_threads(args.threads)
    overrides = knob_overrides(args)
    originals = []
    for name in TUNING_PHOTOS:
        image = load_photo(name)
        side = min(CROP_PX, *image.shape[:2])  # chelsea is 300 px high
        top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
        originals.append((name, Image.fromarray(image[top:top + side, left:left + side]), photo(name).caption))
    base = UpscaleConfig.load("cpu-demo", scale=args.scale, torch_threads=args.threads, **overrides)
    worker = ModelWorker.for_config(base)  # with the preset's add-ons (resize: model's SR network)
    rows, started = [], time.time()
    for strength, guidance, blend in itertools.product(args.strength, args.guidance, args.blend):
        knobs = {"strength": strength, "guidance_scale": guidance, "blend": blend}
        config = UpscaleConfig.load("cpu-demo", scale=args.scale, torch_threads=args.threads,
                                    **{**overrides, **knobs})
        overall = evaluate(originals, config, worker=worker, progress=False)["overall"]
        shown = ("psnr", "psnr_bicubic", "consistency", "detail", "seam")
        row = {**knobs, **rounded({k: overall[k] for k in shown}, 4)}
        row["shortfall"] = round(shortfall(overall), 4)
        row["model_acts"] = denoising_steps(config) >= 2
        rows.append(row)
        log(json.dumps(row))
    meeting = [r for r in rows if r["shortfall"] == 0 and r["model_acts"]]
    choice = max(meeting, key=lambda r: r["detail"]) if meeting else min(rows, key=lambda r: r["shortfall"])
    print(json.dumps({
        "bench": "demo_tune", "photos": list(TUNING_PHOTOS), "crop_px": CROP_PX, "scale": args.scale,
        "preset": "cpu-demo", "overrides": overrides, "targets": TARGETS, "threads": args.threads,
        "seconds": round(time.time() - started, 1),
        "load_average": load_average(), "rows": rows, "choice": choice, "all_targets_met": bool(meeting),
    }, indent=1))


if __name__ == "__main__":
    main()
