"""Upscale one image with the library API: the embedded demo model on CPU (about ten seconds).

    python examples/upscale_one.py [--output astronaut-2x.png] [--actors N]

`--actors 0` (default) runs the single-process reference; `--actors N` starts a local Ray cluster and fans each
step's views out to N denoiser actors (the same bytes as the reference once torch's CPU thread count is pinned,
`torch_threads`; otherwise the last bits of CPU matmuls differ). The demo model has random weights: the result
shows the plumbing, not a real upscale. For a real model: the `sdxl-*` presets and a GPU.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo model is built locally; nothing is downloaded

from PIL import Image  # noqa: E402

from cupscale_dist import UpscaleConfig  # noqa: E402
from cupscale_dist.execution.raycluster import ClusterOptions  # noqa: E402
from cupscale_dist.files.imageio import load_image  # noqa: E402
from cupscale_dist.services.runner import run_upscale  # noqa: E402

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", default=str(HERE / "astronaut.png"))
    parser.add_argument("--output", default="astronaut-2x.png")
    parser.add_argument("--actors", type=int, default=0, help="0 = no Ray; N = N denoiser actors on a local cluster")
    args = parser.parse_args()

    config = UpscaleConfig.load("cpu-demo")  # configs/cpu-demo.yaml: model=demo, device=cpu, scale=2
    image = load_image(args.input, config.max_input_pixels, config.min_input_side)
    cluster = ClusterOptions(actors=args.actors, gpus_per_actor=0, cpus_per_actor=0.5)
    written = run_upscale(image, config, args.output, source=args.input, cluster=cluster)
    with Image.open(written) as result:
        print(f"wrote {written}: {image.size[0]}x{image.size[1]} -> {result.size[0]}x{result.size[1]}")


if __name__ == "__main__":
    main()
