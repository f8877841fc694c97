"""Tiled VAE encode/decode (method.md steps 2 and 10) that never holds a full-resolution float image.

Tiles are the views of :mod:`cupscale_dist.method.views` in latent pixels (``vae_tile`` / 8 wide, overlapping by
``vae_tile_overlap``; :class:`TileGrid`), blended with Gaussian window weights. The forward passes run wherever the
executor puts them (``encode_tile`` / ``decode_tile`` of :class:`cupscale_dist.execution.worker.ModelWorker`, one
tile per call, results in tile order); the caller only cuts tiles and blends: the driver for the whole latent, or
each worker for its band of it (:func:`encode_rows`, :func:`decode_float_rows`: the same bytes for any split).
Encoding cuts one pixel tile at a time from the 8-bit image;
decoding finishes the output row band by row band (:func:`decode_bands`), so a 16K stage holds its uint8 image
plus one band of floats (a float32 RGB copy of a 16K image alone would be 3.2 GB) — or, streamed into a file
writer, not even the uint8 image.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .step import ViewWindows, add_view, window_weights
from .views import window_starts

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
    return encode_rows(tile_map, cut, TileGrid(height, width, tile, stride), channels, (0, height))


def encode_rows(tile_map: TileMap, cut: Callable[[int, int, int, int], np.ndarray], grid: TileGrid, channels: int,
                rows: tuple[int, int]) -> torch.Tensor:
    """Latent rows ``rows`` (1, C, hi - lo, W) from the pixel tiles that reach them (``cut(top, left, bottom,
    right)``, latent px, gives a tile's pixels): each latent pixel is the Gaussian-weighted sum of its tiles in tile
    order over their weights, the same operations for the whole latent and for a worker's band (step 2 on the
    owners), so a band holds the whole encode's bytes."""
    lo, hi = rows
    if grid.single:
        (latent,) = tile_map("encode_tile", [(cut(0, 0, grid.height, grid.width),)])
        return read_only_tensor(latent)[None, :, lo:hi]
    rects = grid.rects(lo, hi)
    latents = tile_map("encode_tile", ((cut(*rect),) for rect in rects))
    total = torch.zeros(1, channels, hi - lo, grid.width)
    weight = torch.zeros(hi - lo, grid.width)
    windows = ViewWindows("gaussian", BLEND_SIGMA)
    for rect, latent in zip(rects, latents):
        top, a, b = rect[0], max(lo, rect[0]), min(hi, rect[2])
        add_view(total, weight, rect, (a, b), read_only_tensor(latent)[:, a - top : b - top], windows(rect), row0=lo)
    return total / weight


def encode_image(tile_map: TileMap, image: Image.Image, factor: int, channels: int, tile_px: int,
                 overlap: float) -> torch.Tensor:
    """8-bit RGB image -> scaled latent, one uint8 pixel tile at a time (step 2): no full-size array is made."""
    cut = lambda t, l, b, r: np.asarray(image.crop((l * factor, t * factor, r * factor, b * factor)))  # noqa: E731
    return encode_tiled(tile_map, cut, image.height // factor, image.width // factor, channels,
                        *latent_tiles(tile_px, overlap, factor))


def decode_float_bands(tile_map: TileMap, latents: torch.Tensor, factor: int, tile_px: int,
                       overlap: float) -> Iterator[torch.Tensor]:
    """Scaled latent -> float pixel bands (3, rows, W) in [-1, 1], top to bottom; each band is final when yielded."""
    height = latents.shape[-2]
    grid = TileGrid(height, latents.shape[-1], *latent_tiles(tile_px, overlap, factor))
    return (band for _rows, band in decode_float_rows(tile_map, latents, 0, grid, factor, (0, height)))


@dataclass(frozen=True)
class TileGrid:
    """The VAE's tiles over a ``height`` x ``width`` latent (``tile`` every ``stride`` latent px), and the row
    chunks the decode's output is finished in: the rows no later row of tiles reaches. The one geometry of the
    encode and the decode for the whole latent (the driver's loop) and for a worker's band of it (the step on the
    actors): a pixel's tiles, and the order they are summed in, do not depend on who encodes or decodes it."""

    height: int
    width: int
    tile: int
    stride: int

    @property
    def single(self) -> bool:
        """One tile covers the latent: it is decoded whole, with no blend."""
        return max(self.height, self.width) <= self.tile

    @property
    def tops(self) -> np.ndarray:
        return window_starts(self.height, self.tile, self.stride)

    def tile_rows(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """``(top, bottom, final)`` of each row of tiles that reaches latent rows ``[lo, hi)``, top to bottom;
        ``final``: the rows above it are finished once this row of tiles is summed."""
        tops = self.tops
        out = []
        for i, top in enumerate(tops):
            bottom = min(int(top) + self.tile, self.height)
            final = int(tops[i + 1]) if i + 1 < len(tops) else self.height
            if top < hi and bottom > lo:
                out.append((int(top), bottom, final))
        return out

    def rects(self, lo: int, hi: int) -> list[tuple[int, int, int, int]]:
        """The tiles that reach latent rows ``[lo, hi)``, ``(top, left, bottom, right)`` in tile order (rows of
        tiles top to bottom, left to right in each)."""
        lefts = window_starts(self.width, self.tile, self.stride)
        return [(top, int(left), bottom, min(int(left) + self.tile, self.width))
                for top, bottom, _ in self.tile_rows(lo, hi) for left in lefts]

    def span(self, lo: int, hi: int) -> tuple[int, int]:
        """The latent rows the tiles that reach ``[lo, hi)`` read."""
        if self.single:
            return 0, self.height
        rows = self.tile_rows(lo, hi)
        return rows[0][0], rows[-1][1]

    def chunks(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """The row chunks (latent rows) in which ``[lo, hi)`` is finished and handed on, top to bottom."""
        if self.single:
            return [(lo, hi)]
        out, done = [], lo
        for _top, _bottom, final in self.tile_rows(lo, hi):
            end = min(final, hi)
            if end > done:
                out.append((done, end))
                done = end
        return out


def decode_float_rows(tile_map: TileMap, latents: torch.Tensor, row0: int, grid: TileGrid, factor: int,
                      rows: tuple[int, int]) -> Iterator[tuple[tuple[int, int], torch.Tensor]]:
    """Latent rows ``rows`` of the stage latent decoded into float pixel bands, ``((lo, hi), (3, (hi - lo) f, W f))``
    per chunk of :meth:`TileGrid.chunks`, top to bottom. ``latents`` holds rows ``[row0, row0 + its height)`` of
    the latent, at least :meth:`TileGrid.span` of ``rows``.

    Each pixel is the Gaussian-weighted sum of the tiles covering it, in tile order (rows of tiles top to bottom,
    left to right in each), divided by their weights: the same operations in the same order for the whole latent
    and for a band of it, so a worker's rows are the whole decode's rows byte for byte."""
    lo, hi = rows
    width, f = grid.width, factor
    if grid.single:
        (pixels,) = tile_map("decode_tile", [(latents[0].numpy(),)])
        yield rows, read_only_tensor(pixels)[:, lo * f : hi * f].clone()  # the caller's to convert in place
        return
    tile_rows, lefts = grid.tile_rows(lo, hi), window_starts(width, grid.tile, grid.stride)
    rects = grid.rects(lo, hi)
    decoded = tile_map("decode_tile", ((np.ascontiguousarray(latents[0, :, t - row0 : b - row0, l:r].numpy()),)
                                       for t, l, b, r in rects))
    rows_held = min(grid.tile, grid.height) * f  # a row of tiles spans at most one tile of rows
    acc = torch.zeros(3, rows_held, width * f)  # weighted pixel sums of rows [done, done + rows_held)
    weight = torch.zeros(rows_held, width * f)
    done = lo * f  # pixel rows before this are finished (or not this call's); the next row of tiles adds from here
    windows: dict = {}
    for top, bottom, final in tile_rows:
        skip, end = max(done - top * f, 0), min(bottom, hi) * f  # rows of these tiles above `done` / past `hi`
        for left in lefts:
            right = min(left + grid.tile, width)
            pixels = read_only_tensor(next(decoded))
            size = tuple(pixels.shape[-2:])
            if size not in windows:
                windows[size] = window_weights(*size, "gaussian", BLEND_SIGMA)
            target = (slice(top * f + skip - done, end - done), slice(left * f, right * f))
            kept_rows = slice(skip, end - top * f)
            acc[(slice(None), *target)].addcmul_(pixels[:, kept_rows], windows[size][kept_rows])
            weight[target] += windows[size][kept_rows]
        finished = min(final, hi) * f  # later rows of tiles never reach above this row
        ready, kept = finished - done, end - finished  # finished rows; rows already summed below them
        if ready > 0:
            yield (done // f, finished // f), acc[:, :ready] / weight[:ready]
            acc[:, :kept], weight[:kept] = acc[:, ready : ready + kept].clone(), weight[ready : ready + kept].clone()
            acc[:, kept:], weight[kept:] = 0, 0
            done = finished


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
