"""Image input and output: every bad input is one clear UserError; outputs are written atomically with their
parameters in PNG text chunks."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, PngImagePlugin

from .errors import UserError

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never a half-grey image


def load_image(path: str | os.PathLike, max_pixels: int, min_side: int) -> Image.Image:
    """Open ``path`` as an 8-bit RGB image; alpha, CMYK, palette, greyscale and 16-bit inputs are converted."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"input {path}: no such file; check the path")
    if not path.is_file():
        raise UserError(f"input {path}: not a file; pass an image file")
    if path.stat().st_size == 0:
        raise UserError(f"input {path}: the file is empty (0 bytes); pass a real image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            width, height = image.size
            if width * height > max_pixels:
                raise UserError(f"input {path}: {width}x{height} is over the {max_pixels}-pixel limit; "
                                "downscale it or raise max_input_pixels in the config")
            image.load()
    except UserError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(f"input {path}: too many pixels (decompression bomb guard); downscale it or raise "
                        "max_input_pixels") from None
    except (OSError, SyntaxError, ValueError) as exc:
        kind = "truncated or corrupt" if isinstance(exc, OSError) and "truncated" in str(exc) else "not a readable image"
        raise UserError(f"input {path}: {kind} ({str(exc).splitlines()[0]}); pass a PNG/JPEG/WebP/TIFF image") from None
    if min(width, height) < min_side:
        raise UserError(f"input {path}: {width}x{height} is too small; the shorter side needs >= {min_side} px")
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: transparency composited on white, 16/32-bit scaled down, CMYK/palette/greyscale converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def check_output_path(path: str | os.PathLike, overwrite: bool) -> Path:
    """Fail before any work if the output can't be written or exists without ``overwrite``."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UserError(f"output {path}: only .png is written (it carries the run's parameters); use a .png name")
    if path.exists() and not overwrite:
        raise UserError(f"output {path} already exists; pass --overwrite or choose another name")
    if path.is_dir():
        raise UserError(f"output {path} is a directory; give a file name ending in .png")
    if not path.parent.exists():
        raise UserError(f"output {path}: directory {path.parent} does not exist; create it first")
    return path


def save_png(image: Image.Image, path: str | os.PathLike, metadata: dict[str, object]) -> None:
    """Write ``image`` as PNG with one tEXt chunk per metadata key, atomically (temp file + rename)."""
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_text(f"cupscale:{key}", value if isinstance(value, str) else json.dumps(value, default=list))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            image.save(handle, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_png_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``cupscale:*`` text chunks of a PNG written by :func:`save_png`."""
    with Image.open(path) as image:
        return {k.removeprefix("cupscale:"): v for k, v in image.text.items() if k.startswith("cupscale:")}
