"""Step 1 of every stage: bring the previous stage's image to this stage's size (Lanczos or an upscale model), then
sharpen.

The upscale model runs on the workers (``ModelWorker.upscale_tile``); cutting its input into tiles of
``upscale_model_tile`` input px with context, and pasting the cores back, is driver work and lives here: a tile's
output does not depend on which worker ran it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from ..config import UpscaleConfig
from .vae import TileMap


def resize_input(image: Image.Image, size: tuple[int, int], config: UpscaleConfig, tile_map=None,
                 progress: bool = True) -> Image.Image:
    """Step 1: resize to the stage size, then optional unsharp mask.

    ``resize='model'``: the upscale model runs tile by tile on the workers (``tile_map``), then Lanczos brings its
    output (x4 for Real-ESRGAN) to the stage size (x2), as Ultimate SD Upscale does. Without workers (the caption
    crops of `cupscale caption`) it is Lanczos alone: captions do not need the model's detail.
    """
    if config.resize == "model" and tile_map is not None:
        image = upscale_with_model(tile_map, image, config.upscale_model_tile, config.upscale_model_overlap, progress)
    resample = {"bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
                "model": Image.Resampling.LANCZOS}[config.resize]
    out = image.resize(size, resample)
    if config.sharpen > 0:
        out = out.filter(ImageFilter.UnsharpMask(radius=config.sharpen_radius, percent=int(config.sharpen * 100),
                                                 threshold=0))
    return out


def prior_picture(image: Image.Image, size: tuple[int, int], config: UpscaleConfig) -> Image.Image | None:
    """Step 3's picture where it is not step 1's: under ``resize='model'`` with ``prior_source='input'``, the stage
    input by bicubic (interpolation invents nothing, so the prior keeps what the input says; the SR network's
    picture is the start point only). None where the prior comes from step 1's picture."""
    if config.resize != "model" or config.prior_source != "input":
        return None
    return image.resize(size, Image.Resampling.BICUBIC)


def tile_boxes(width: int, height: int, tile: int, overlap: int) -> list[tuple[tuple[int, int, int, int], tuple]]:
    """[(core box, input box)] row by row: cores of ``tile`` px cover the image once; each input box adds ``overlap``
    px of context on every side, clipped at the borders. Boxes are (left, top, right, bottom)."""
    boxes = []
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            right, bottom = min(left + tile, width), min(top + tile, height)
            context = (max(left - overlap, 0), max(top - overlap, 0), min(right + overlap, width),
                       min(bottom + overlap, height))
            boxes.append(((left, top, right, bottom), context))
    return boxes


def upscale_with_model(tile_map: TileMap, image: Image.Image, tile_px: int, overlap_px: int,
                       progress: bool = True) -> Image.Image:
    """Step 1, resize='model': the upscale model over ``image`` in tiles run by the workers (``upscale_tile``),
    each tile's context cropped away and its core pasted; the scale is read from the first result."""
    from tqdm.auto import tqdm

    image = image.convert("RGB")
    boxes = tile_boxes(image.width, image.height, tile_px, overlap_px)
    results = tile_map("upscale_tile", ((np.asarray(image.crop(context)),) for _, context in boxes))
    out, scale = None, 0
    with tqdm(total=len(boxes), disable=not progress, unit="tile", desc="upscale model", leave=False) as bar:
        for ((left, top, right, bottom), (c_left, c_top, c_right, c_bottom)), result in zip(boxes, results):
            height, width = c_bottom - c_top, c_right - c_left
            if out is None:
                scale = result.shape[0] // height
                out = np.empty((image.height * scale, image.width * scale, 3), np.uint8)
            if scale < 1 or result.shape != (height * scale, width * scale, 3):
                raise RuntimeError(f"upscale_tile returned {result.shape} for a {width}x{height} tile; expected "
                                   f"({height * scale}, {width * scale}, 3) (scale {scale} from the first tile)")
            core = result[(top - c_top) * scale : (bottom - c_top) * scale,
                          (left - c_left) * scale : (right - c_left) * scale]
            out[top * scale : bottom * scale, left * scale : right * scale] = core
            bar.update()
    return Image.fromarray(out)
