"""Upscale a folder through Ray Data on CPU with the demo model, then run it again (nothing left to do).

    python examples/batch_folder.py [--workdir DIR] [--workers 2]

Makes DIR/in with four crops of the astronaut and one broken file, runs `run_batch` (the library behind
`cupscale batch`) with CPU workers, and prints DIR/out/manifest.parquet: four upscaled images and one error row.
The same from the shell:

    cupscale batch --input DIR/in --output DIR/out --config cpu-demo --gpus-per-actor 0 --cpus-per-actor 0.5 --workers 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402

from cupscale_dist import UpscaleConfig  # noqa: E402
from cupscale_dist.execution.raycluster import ClusterOptions  # noqa: E402
from cupscale_dist.services.batch.run import run_batch  # noqa: E402

HERE = Path(__file__).resolve().parent


def make_inputs(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with Image.open(HERE / "astronaut.png") as astronaut:
        for i, (left, top) in enumerate([(0, 0), (128, 0), (0, 128), (128, 128)]):
            astronaut.crop((left, top, left + 128, top + 128)).save(folder / f"crop-{i}.png")
    (folder / "broken.jpg").write_bytes(b"this is not a JPEG")  # becomes an error row, the rest goes on


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=tempfile.mkdtemp(prefix="cupscale-batch-"))
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    workdir = Path(args.workdir)
    make_inputs(workdir / "in")
    config = UpscaleConfig.load("cpu-demo")
    workers = ClusterOptions(gpus_per_actor=0, cpus_per_actor=0.5)  # CPU-only workers, fractional CPUs
    for run in ("first run", "second run"):
        summary = run_batch(str(workdir / "in"), workdir / "out", config, cluster=workers, workers=args.workers)
        print(f"{run}: {summary.line()}")

    columns = ["input_path", "output_path", "status", "output_width", "output_height", "upscale_s", "error"]
    for row in pq.read_table(summary.manifest, columns=columns).to_pylist():
        name = Path(row["input_path"]).name
        if row["status"] == "ok":
            print(f"  {name:12} -> {row['output_path']} {row['output_width']}x{row['output_height']} "
                  f"in {row['upscale_s']:.1f} s")
        else:
            print(f"  {name:12} {row['status']}: {row['error']}")


if __name__ == "__main__":
    main()
