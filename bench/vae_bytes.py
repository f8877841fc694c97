#!/usr/bin/env python
"""Bytes through the driver per stage for the VAE's encode and decode and the stage's latent (issue 34), the step on
the actors before and after the VAE moved onto the owners. Counted, not timed: every figure is the size of what
crosses the driver's link, from the same geometry the code uses (``TileGrid``, ``split_rows``), so it is exact for
the shapes given.

* before: the driver cuts every uint8 pixel tile, gets every latent tile back and blends, scatters ``z_S`` and the
  prior's rows to the owners, gathers the final latent, cuts every latent tile and gets float32 pixel tiles back;
* after: each owner is sent the uint8 pixel rows its tiles read and sends back its rows of the prior; at the end it
  sends its uint8 output rows (what the file writer needs anyway).

    python bench/vae_bytes.py --latent 1024,2048 --gpus 1,8,16   # prints one JSON object (last line)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cupscale_dist.method.parts import split_rows  # noqa: E402
from cupscale_dist.method.vae import TileGrid, latent_tiles  # noqa: E402

F, CHANNELS, FLOAT = 8, 4, 4  # SDXL: 8 px per latent px, 4 latent channels, float32 on the wire


def before(grid: TileGrid, levels: int) -> dict:
    rects = grid.rects(0, grid.height)
    tile_px = sum((b - t) * (r - l) for t, l, b, r in rects)  # latent px summed over the tiles (overlaps counted)
    latent = CHANNELS * grid.height * grid.width * FLOAT
    prior = 2 * latent // 4**levels  # G and LL_J(eps)
    return {"encode_pixels_out": tile_px * F * F * 3, "encode_latents_back": tile_px * CHANNELS * FLOAT,
            "scatter_z_s_and_prior": latent + prior, "gather_final_latent": latent,
            "decode_latents_out": tile_px * CHANNELS * FLOAT, "decode_float_pixels_back": tile_px * F * F * 3 * FLOAT}


def after(grid: TileGrid, levels: int, gpus: int) -> dict:
    bounds = split_rows(grid.height, gpus, 2**levels)
    spans = [grid.span(lo, hi) for lo, hi in zip(bounds, bounds[1:])]
    latent = CHANNELS * grid.height * grid.width * FLOAT
    return {"load_pixel_rows_out": sum(b - a for a, b in spans) * F * grid.width * F * 3,
            "prior_rows_back": 2 * latent // 4**levels,
            "decode_uint8_rows_back": grid.height * F * grid.width * F * 3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent", default="1024,2048", help="square latent sides (2048 = a 16K stage)")
    parser.add_argument("--gpus", default="1,8,16")
    parser.add_argument("--vae-tile", type=int, default=1024, help="image px (the vae_tile knob's default)")
    parser.add_argument("--overlap", type=float, default=0.25, help="the vae_tile_overlap knob's default")
    parser.add_argument("--levels", type=int, default=1, help="J (dwt_levels)")
    args = parser.parse_args()
    rows = []
    for side in (int(s) for s in args.latent.split(",")):
        grid = TileGrid(side, side, *latent_tiles(args.vae_tile, args.overlap, F))
        old = before(grid, args.levels)
        for gpus in (int(g) for g in args.gpus.split(",")):
            new = after(grid, args.levels, gpus)
            rows.append({"latent": side, "gpus": gpus, "before_bytes": sum(old.values()), "before": old,
                         "after_bytes": sum(new.values()), "after": new,
                         "ratio": round(sum(new.values()) / sum(old.values()), 4)})
    print(json.dumps({"what": "bytes through the driver per stage: VAE encode/decode and the stage latent, the step "
                      "on the actors with the VAE via the driver (before) and on the owners (after)",
                      "vae_tile": args.vae_tile, "overlap": args.overlap, "levels": args.levels, "rows": rows}))


if __name__ == "__main__":
    main()
