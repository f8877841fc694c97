"""Step 1 of every stage: bring the previous stage's image to this stage's size (Lanczos or an upscale model), then sharpen."""

from __future__ import annotations


from PIL import Image, ImageFilter

from ..config import UpscaleConfig


def resize_input(image: Image.Image, size: tuple[int, int], config: UpscaleConfig, tile_map=None,
                 progress: bool = True) -> Image.Image:
    """Step 1: resize to the stage size, then optional unsharp mask.

    ``resize='model'``: the upscale model runs tile by tile on the workers (``tile_map``), then Lanczos brings its
    output (x4 for Real-ESRGAN) to the stage size (x2), as Ultimate SD Upscale does. Without workers (the caption
    crops of `cupscale caption`) it is Lanczos alone: captions do not need the model's detail.
    """
    if config.resize == "model" and tile_map is not None:
        from ..models.upscale_models import upscale_with_model

        image = upscale_with_model(tile_map, image, config.upscale_model_tile, config.upscale_model_overlap, progress)
    resample = {"bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
                "model": Image.Resampling.LANCZOS}[config.resize]
    out = image.resize(size, resample)
    if config.sharpen > 0:
        out = out.filter(ImageFilter.UnsharpMask(radius=config.sharpen_radius, percent=int(config.sharpen * 100), threshold=0))
    return out
