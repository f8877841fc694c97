"""Output encoders fed band by band as the tiled decode finishes rows: a 16K result is never held whole.

``.png``: a PNG stream of our own (IHDR, one text chunk per key, IDAT fed from a zlib stream of Sub-filtered
rows, IEND), readable by any PNG reader; ``.tif``/``.tiff``: a tiled BigTIFF through tifffile with the keys as
JSON in the ImageDescription tag. ``.webp``/``.jpg``/``.jpeg`` are *not* streamed: the bands are gathered into one
image that PIL encodes (XMP + EXIF UserComment, :mod:`cupscale_dist.files.metadata`). Every encoder takes the file's
keys as :func:`cupscale_dist.files.metadata.file_text` builds them. :func:`cupscale_dist.files.imageio.write_image`
puts them in a temp file and then in place, so a file appears only when complete.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import struct
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from .metadata import EXIF_IFD, RUN_PREFIX, USER_COMMENT, user_comment, xmp_packet

log = logging.getLogger(__name__)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# zlib level of PNG and TIFF outputs: a 16K image is 805 MB raw; level 1 compresses it about 6x faster than PIL's
# default 6 for files about 40% larger (measured on a 4K photo), and the compressing CPU is a head node's.
ZLIB_LEVEL = 1
IDAT_BYTES = 1 << 20  # compressed bytes per IDAT chunk (any size up to 2^31 is valid; 1 MiB keeps memory flat)
TIFF_TILE = 256  # tile side in px (a multiple of 16, as TIFF requires); viewers page 256 px tiles well
STREAMED_SUFFIXES = (".png", ".tif", ".tiff")
PIL_FORMATS = {".webp": "WEBP", ".jpg": "JPEG", ".jpeg": "JPEG"}  # encoded whole by PIL
MAX_SIDE = {"WEBP": 16383, "JPEG": 65500}  # px: the WebP bitstream's 14-bit sides; libjpeg's JPEG_MAX_DIMENSION
QUALITY = 95  # lossy quality of .webp/.jpg outputs: what A1111 saves with; near-transparent for upscaled detail
JPEG_SEGMENT_BYTES = 65000  # an XMP or EXIF block must fit one 64 KiB JPEG APP1 segment (PIL refuses more)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_text_chunk(key: str, text: str) -> bytes:
    """tEXt when the text is Latin-1 (what PNG's tEXt holds), else iTXt (UTF-8), as PIL writes them."""
    keyword = key.encode("latin-1")[:79]
    try:
        return png_chunk(b"tEXt", keyword + b"\0" + text.encode("latin-1"))
    except UnicodeEncodeError:
        return png_chunk(b"iTXt", keyword + b"\0\0\0\0\0" + text.encode("utf-8"))


def sub_filtered(band: np.ndarray) -> bytes:
    """PNG filter type 1 (Sub) on every row of an (rows, W, 3) uint8 band: each byte minus the pixel to its left."""
    rows = band.reshape(band.shape[0], -1)
    out = np.empty((rows.shape[0], rows.shape[1] + 1), dtype=np.uint8)
    out[:, 0] = 1
    out[:, 1:4] = rows[:, :3]
    np.subtract(rows[:, 3:], rows[:, :-3], out=out[:, 4:])  # uint8 arithmetic wraps modulo 256, as PNG wants
    return out.tobytes()


def write_png(handle, bands: Iterable[np.ndarray], width: int, height: int, text: dict[str, str]) -> None:
    """An RGB PNG from uint8 bands (rows, width, 3), top to bottom, with one text chunk per key of ``text``."""
    handle.write(PNG_SIGNATURE + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)))
    for key, value in text.items():
        handle.write(png_text_chunk(key, value))
    stream, pending, rows = zlib.compressobj(ZLIB_LEVEL), b"", 0
    for band in bands:
        if band.shape[1:] != (width, 3):
            raise ValueError(f"band of shape {band.shape} in a {width} px wide RGB image")
        rows += band.shape[0]
        pending += stream.compress(sub_filtered(band))
        while len(pending) >= IDAT_BYTES:
            handle.write(png_chunk(b"IDAT", pending[:IDAT_BYTES]))
            pending = pending[IDAT_BYTES:]
    if rows != height:
        raise ValueError(f"{rows} rows written for a {height} px high image")
    handle.write(png_chunk(b"IDAT", pending + stream.flush()) + png_chunk(b"IEND", b""))


def tiff_tiles(bands: Iterable[np.ndarray], width: int) -> Iterator[np.ndarray]:
    """Re-cut uint8 bands into TIFF_TILE x TIFF_TILE tiles, row of tiles by row, edge tiles zero-padded."""
    buffer = np.zeros((0, width, 3), dtype=np.uint8)

    def tile_row(block: np.ndarray) -> Iterator[np.ndarray]:
        for left in range(0, width, TIFF_TILE):
            tile = np.zeros((TIFF_TILE, TIFF_TILE, 3), dtype=np.uint8)
            part = block[:, left : left + TIFF_TILE]
            tile[: part.shape[0], : part.shape[1]] = part
            yield tile

    for band in bands:
        buffer = np.concatenate([buffer, band])
        while buffer.shape[0] >= TIFF_TILE:
            yield from tile_row(buffer[:TIFF_TILE])
            buffer = buffer[TIFF_TILE:]
    if buffer.shape[0]:
        yield from tile_row(buffer)


def write_tiff(handle, bands: Iterable[np.ndarray], width: int, height: int, text: dict[str, str]) -> None:
    """A tiled BigTIFF from uint8 bands (zlib with horizontal differencing, like PNG's Sub filter); ``text`` as
    JSON (ASCII) in ImageDescription."""
    import tifffile

    description = json.dumps(text)
    tifffile.imwrite(handle, tiff_tiles(bands, width), shape=(height, width, 3), dtype=np.uint8,
                     tile=(TIFF_TILE, TIFF_TILE), bigtiff=True, photometric="rgb", compression="zlib",
                     compressionargs={"level": ZLIB_LEVEL}, predictor=True, description=description, metadata=None)


def gather(bands: Iterable[np.ndarray], width: int, height: int) -> np.ndarray:
    """The whole (height, width, 3) image from its bands, for the encoders that can't stream."""
    image = np.empty((height, width, 3), dtype=np.uint8)
    top = 0
    for band in bands:
        if band.shape[1:] != (width, 3) or top + band.shape[0] > height:
            raise ValueError(f"band of shape {band.shape} at row {top} in a {width}x{height} RGB image")
        image[top : top + band.shape[0]] = band
        top += band.shape[0]
    if top != height:
        raise ValueError(f"{top} rows written for a {height} px high image")
    return image


def pil_blocks(text: dict[str, str], kind: str) -> tuple[bytes, bytes]:
    """(EXIF, XMP) for a WebP/JPEG: UserComment holds ``parameters`` (the run's keys as JSON if none is carried),
    XMP all of ``text``. A JPEG keeps each in one 64 KiB segment: carried keys that don't fit are left out, largest
    first, with a warning (the run's keys always fit)."""
    from PIL import Image

    text = dict(text)
    while True:
        comment = text.get("parameters") or json.dumps({k: v for k, v in text.items() if k.startswith(RUN_PREFIX)})
        exif = Image.Exif()
        exif.get_ifd(EXIF_IFD)[USER_COMMENT] = user_comment(comment)
        blocks = exif.tobytes(), xmp_packet(text)
        carried = [k for k in text if not k.startswith(RUN_PREFIX)]
        if kind != "JPEG" or max(map(len, blocks)) <= JPEG_SEGMENT_BYTES or not carried:
            return blocks
        largest = max(carried, key=lambda k: len(text[k]))
        log.warning("metadata %r (%d chars) does not fit a JPEG's 64 KiB metadata segment; left out of the output "
                    "(use .png/.webp/.tif to keep it)", largest, len(text[largest]))
        del text[largest]


def write_pil(handle, bands: Iterable[np.ndarray], width: int, height: int, text: dict[str, str], *,
              kind: str = "WEBP") -> None:
    """A WebP or JPEG (``kind``) at :data:`QUALITY` through PIL, with ``text`` in EXIF UserComment and XMP. Not
    streamed: the whole image is held (3 bytes a pixel) while PIL encodes it."""
    from PIL import Image

    if max(width, height) > MAX_SIDE[kind]:
        raise ValueError(f"{width}x{height} is over {kind}'s {MAX_SIDE[kind]} px side limit")
    exif, xmp = pil_blocks(text, kind)
    options = {"method": 4} if kind == "WEBP" else {"subsampling": 0}  # JPEG: full-resolution colour (4:4:4)
    Image.fromarray(gather(bands, width, height), "RGB").save(handle, format=kind, quality=QUALITY, exif=exif,
                                                              xmp=xmp, **options)


def encoder_for(path: str | os.PathLike):
    """The band encoder an output name asks for: TIFF for .tif/.tiff, PIL for .webp/.jpg/.jpeg, else PNG."""
    suffix = Path(path).suffix.lower()
    if suffix in PIL_FORMATS:
        return functools.partial(write_pil, kind=PIL_FORMATS[suffix])
    return write_tiff if suffix in (".tif", ".tiff") else write_png


def read_tiff_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``cupscale:*`` parameters of a TIFF written by :func:`write_tiff`, without the prefix."""
    from .metadata import read_run_metadata

    return read_run_metadata(path)
