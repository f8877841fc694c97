"""The README's main job beside bicubic: `cupscale upscale examples/astronaut.png --config cpu-demo`, and the same
photo resized by bicubic to the same size, written as one picture (bicubic left, the demo model right) plus a 2x
nearest-neighbour enlargement of the face, where a reader judges an upscaler first.

    PYTHONPATH=$PWD python bench/main_job_sheet.py --out examples/quality   # ~1 min on 2 cores

There is no original at the output size (the bundled photo is the input), so this is a by-eye comparison; the
measured one is bench/quality.py on the held-out photos. Prints the run's figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_set_option, knob_overrides, load_average  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FACE_BOX = (150, 40, 406, 296)  # the face and the shuttle in the 512 px output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for main-job-bicubic-demo.png and main-job-face.png")
    parser.add_argument("--threads", type=int, default=2)
    add_set_option(parser, "the run")
    args = parser.parse_args()

    import torch
    from PIL import Image

    from cupscale_dist import UpscaleConfig, upscale
    from cupscale_dist.quality.evaluate import side_by_side

    torch.set_num_threads(args.threads)
    config = UpscaleConfig.load("cpu-demo", torch_threads=args.threads, **knob_overrides(args))
    photo = Image.open(REPO / "examples" / "astronaut.png").convert("RGB")
    started = time.time()
    ours = upscale(photo, config, progress=True)
    seconds = time.time() - started
    bicubic = photo.resize(ours.size, Image.BICUBIC)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    side_by_side([bicubic, ours], (0, 0, *ours.size), gap=8).save(out / "main-job-bicubic-demo.png")
    face = side_by_side([bicubic, ours], FACE_BOX, gap=4)
    face.resize((face.width * 2, face.height * 2), Image.NEAREST).save(out / "main-job-face.png")
    print(json.dumps({"bench": "main_job_sheet", "input": list(photo.size), "output": list(ours.size),
                      "strength": config.strength, "guidance_scale": config.guidance_scale, "steps": config.steps,
                      "tile": config.tile, "stride": config.stride, "seconds": round(seconds, 1),
                      "threads": args.threads, "load_average": load_average()}, indent=1))


if __name__ == "__main__":
    main()
