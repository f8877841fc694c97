"""Tiled VAE encode/decode (method.md steps 2 and 10) that never holds a full-resolution float image.

Tiles are the views of :mod:`cupscale_dist.method.views` in latent pixels (``vae_tile`` / 8 wide, overlapping by
``vae_tile_overlap``), blended with Gaussian window weights. The forward passes run wherever the executor puts
them (``encode_tile`` / ``decode_tile`` of :class:`cupscale_dist.execution.worker.ModelWorker`, one tile per call, results in
tile order); the driver only cuts tiles and blends. Encoding cuts one pixel tile at a time from the 8-bit image;
decoding finishes the output row band by row band (:func:`decode_bands`), so a 16K stage holds its uint8 image
plus one band of floats (a float32 RGB copy of a 16K image alone would be 3.2 GB) — or, streamed into a file
writer, not even the uint8 image.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from .step import reduce_predictions, window_weights
from .views import make_views, window_starts

BLEND_SIGMA = 0.3  # Gaussian tile window std as a fraction of the tile: smooth seams, borders still weighted

TileMap = Callable[[str, Iterable[tuple]], Iterator]  # an executor's ``map``: (method, calls) -> results in order


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (1, 3, H, W) float32 in [-1, 1]."""
    return tile_to_tensor(np.asarray(image.convert("RGB")))


def tile_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """A pixel tile as a worker receives it -> (1, 3, H, W) float32 in [-1, 1]: uint8 (H, W, 3) is converted
    (a quarter of the bytes on the wire), float32 (3, H, W) already in [-1, 1] is taken as it is."""
    if pixels.dtype == np.uint8:
        array = np.asarray(pixels, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)
    return torch.from_numpy(np.array(pixels, dtype=np.float32)).unsqueeze(0)


def read_only_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing an array's memory, for arrays that are only ever read: Ray hands arguments and results over
    read-only, and copying them (a decoded 1024 px tile is 12 MB, a 16K step's predictions 240 MB) costs for nothing."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [-1, 1] -> (H, W, 3) uint8, rounded. Works in place on a float32 ``pixels`` (a 16K band
    is 200 MB of floats: no temporaries), so pass a tensor you no longer need."""
    pixels = pixels.float().clamp_(-1, 1).add_(1).mul_(127.5).round_()
    return pixels.to(torch.uint8).permute(1, 2, 0).contiguous().cpu().numpy()


@torch.no_grad()
def encode_pixels(vae, pixels: torch.Tensor) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1] -> scaled latent (1, C, H/8, W/8) float32 on CPU, the posterior mean; a VAE with a
    ``shift_factor`` (Flux's) is shifted first, as its pipeline does: ``(z - shift) * scale``."""
    posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    shift = getattr(vae.config, "shift_factor", None)
    if shift is None:
        return posterior.mean.float().cpu() * vae.config.scaling_factor
    return (posterior.mean.float().cpu() - shift) * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latent -> (1, 3, H, W) pixels in [-1, 1], float32 on CPU (``z / scale + shift`` with a shift)."""
    latents = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        latents = latents + shift
    pixels = vae.decode(latents).sample
    return pixels.float().cpu()


def latent_tiles(tile_px: int, overlap: float, factor: int) -> tuple[int, int]:
    """(tile, stride) in latent pixels for the VAE's tiles."""
    tile = max(1, tile_px // factor)
    return tile, max(1, tile - int(tile * overlap))


def encode_tiled(tile_map: TileMap, cut: Callable[[int, int, int, int], np.ndarray], height: int, width: int,
                 channels: int, tile: int, stride: int) -> torch.Tensor:
    """Latent (1, C, height, width) from pixel tiles: ``cut(top, left, bottom, right)`` (latent px) gives what the
    worker encodes; the tiles' latents are blended in tile order."""
    if max(height, width) <= tile:
        (latent,) = tile_map("encode_tile", [(cut(0, 0, height, width),)])
        return read_only_tensor(latent)[None]
    views = make_views(height, width, tile, stride)
    latents = tile_map("encode_tile", ((cut(*view),) for view in views))
    tiles = ((range(i, i + 1), read_only_tensor(latent)[None]) for i, latent in enumerate(latents))
    return reduce_predictions(tiles, views, (1, channels, height, width), "gaussian", BLEND_SIGMA)


def encode_image(tile_map: TileMap, image: Image.Image, factor: int, channels: int, tile_px: int,
                 overlap: float) -> torch.Tensor:
    """8-bit RGB image -> scaled latent, one uint8 pixel tile at a time (step 2): no full-size array is made."""
    cut = lambda t, l, b, r: np.asarray(image.crop((l * factor, t * factor, r * factor, b * factor)))  # noqa: E731
    return encode_tiled(tile_map, cut, image.height // factor, image.width // factor, channels,
                        *latent_tiles(tile_px, overlap, factor))


def decode_float_bands(tile_map: TileMap, latents: torch.Tensor, factor: int, tile_px: int,
                       overlap: float) -> Iterator[torch.Tensor]:
    """Scaled latent -> float pixel bands (3, rows, W) in [-1, 1], top to bottom; each band is final when yielded."""
    height, width = latents.shape[-2:]
    tile, stride = latent_tiles(tile_px, overlap, factor)
    if max(height, width) <= tile:
        (pixels,) = tile_map("decode_tile", [(latents[0].numpy(),)])
        yield read_only_tensor(pixels).clone()  # the band is the caller's to convert in place (to_uint8)
        return
    tops, lefts = window_starts(height, tile, stride), window_starts(width, tile, stride)
    rects = [(top, left, min(top + tile, height), min(left + tile, width)) for top in tops for left in lefts]
    decoded = tile_map("decode_tile", ((np.ascontiguousarray(latents[0, :, t:b, l:r].numpy()),) for t, l, b, r in rects))
    rows_held = min(tile, height) * factor  # a band of tiles spans at most one tile of rows
    acc = torch.zeros(3, rows_held, width * factor)  # weighted pixel sums of rows [done, done + rows_held)
    weight = torch.zeros(rows_held, width * factor)
    done = 0  # rows before this are final and were yielded; the band of tiles at tops[i] starts here
    windows: dict = {}
    for i, top in enumerate(tops):
        bottom = min(top + tile, height)
        for left in lefts:
            right = min(left + tile, width)
            pixels = read_only_tensor(next(decoded))
            size = tuple(pixels.shape[-2:])
            if size not in windows:
                windows[size] = window_weights(*size, "gaussian", BLEND_SIGMA)
            rows, cols = slice(top * factor - done, bottom * factor - done), slice(left * factor, right * factor)
            acc[:, rows, cols].addcmul_(pixels, windows[size])
            weight[rows, cols] += windows[size]
        final = (tops[i + 1] if i + 1 < len(tops) else height) * factor  # later bands never reach above this row
        ready, kept = final - done, bottom * factor - final  # finished rows; rows already summed below them
        yield acc[:, :ready] / weight[:ready]
        acc[:, :kept], weight[:kept] = acc[:, ready : ready + kept].clone(), weight[ready : ready + kept].clone()
        acc[:, kept:], weight[kept:] = 0, 0
        done = final


def decode_bands(tile_map: TileMap, latents: torch.Tensor, factor: int, tile_px: int,
                 overlap: float) -> Iterator[np.ndarray]:
    """Scaled latent -> uint8 bands (rows, W, 3), top to bottom (step 10): what a file writer streams."""
    return (to_uint8(band) for band in decode_float_bands(tile_map, latents, factor, tile_px, overlap))


def decode_image(tile_map: TileMap, latents: torch.Tensor, factor: int, tile_px: int, overlap: float) -> Image.Image:
    """Scaled latent -> 8-bit image, finished one band of tile rows at a time (step 10)."""
    return Image.fromarray(np.concatenate(list(decode_bands(tile_map, latents, factor, tile_px, overlap))))


class PixelCodec:
    """prior_space='pixel': the tiled VAE round trip around the low-band swap (one decode + encode per step,
    on the workers; the full float image is what a pixel-space prior needs by nature)."""

    def __init__(self, tile_map: TileMap, factor: int, channels: int, tile_px: int, overlap: float):
        self.tile_map, self.factor, self.channels = tile_map, factor, channels
        self.tile_px, self.overlap = tile_px, overlap

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        bands = decode_float_bands(self.tile_map, latents, self.factor, self.tile_px, self.overlap)
        return torch.cat(list(bands), dim=1)[None]

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        f = self.factor
        cut = lambda t, l, b, r: pixels[0, :, t * f : b * f, l * f : r * f].contiguous().numpy()  # noqa: E731
        return encode_tiled(self.tile_map, cut, pixels.shape[-2] // f, pixels.shape[-1] // f, self.channels,
                            *latent_tiles(self.tile_px, self.overlap, f))
