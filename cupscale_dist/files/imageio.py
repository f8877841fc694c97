"""Image input and output: every bad input is one clear UserError; outputs (.png, .tif streamed band by band;
.webp, .jpg through PIL) are written atomically, with the run's parameters and the source's carried keys in them."""

from __future__ import annotations

import errno
import io
import logging
import os
import struct
import tempfile
import threading
import warnings
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, PngImagePlugin

from ..errors import UserError
from .metadata import MAX_CARRIED_BYTES, carried_text, carries, file_text, read_run_metadata

log = logging.getLogger(__name__)

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never a half-grey image
# Text chunks PIL reads for the image itself (the XMP packet, ImageMagick's EXIF with the orientation): kept beside
# the carried ones when a PNG's text has to be thinned out (png_without_big_text).
IMAGE_TEXT_KEYS = ("XML:com.adobe.xmp", "Raw profile type exif")
_BOMB_LIMIT_LOCK = threading.Lock()  # guards the temporary change of PIL's global pixel limit


def load_image(path: str | os.PathLike, max_pixels: int, min_side: int) -> Image.Image:
    """Open ``path`` as an 8-bit RGB image; alpha, CMYK, palette, greyscale and 16-bit inputs are converted.

    ``max_pixels`` is the decompression-bomb limit: it is checked from the header before any pixel is decoded,
    and it replaces PIL's own global limit for this call (so raising it in the config really raises it).
    """
    return load_input(path, max_pixels, min_side)[0]


def load_input(path: str | os.PathLike, max_pixels: int, min_side: int) -> tuple[Image.Image, dict[str, str]]:
    """:func:`load_image`, plus the generator keys its result carries
    (:func:`cupscale_dist.files.metadata.carried_text`), read from the same open. A PNG whose text chunks PIL's
    zip-bomb guard refuses (one over 1 MB inflated, 64 MB in all) is opened again with only the text it can carry,
    within those limits (:func:`png_without_big_text`), with a warning: the rest is not carried."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"input {path}: no such file; check the path")
    if not path.is_file():
        raise UserError(f"input {path}: not a file; pass an image file")
    if path.stat().st_size == 0:
        raise UserError(f"input {path}: the file is empty (0 bytes); pass a real image")
    too_big = (f"input {path}: {{}} is over the {max_pixels}-pixel limit (decompression bomb guard); "
               "downscale it or raise max_input_pixels in the config")
    try:
        try:
            image = open_loaded(path, max_pixels, too_big)
        except ValueError as exc:
            if "MAX_TEXT" not in str(exc):  # PIL's guards on PNG text chunks: MAX_TEXT_CHUNK, MAX_TEXT_MEMORY
                raise
            image = open_loaded(png_without_big_text(path, exc), max_pixels, too_big)
        width, height = image.size
        carried = carried_text(image, path)
    except UserError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(too_big.format("the image")) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        truncated = isinstance(exc, OSError) and "truncated" in str(exc)
        kind = "truncated or corrupt" if truncated else "not a readable image"
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UserError(f"input {path}: {kind} ({first}); pass a PNG/JPEG/WebP/TIFF image") from None
    if min(width, height) < min_side:
        raise UserError(f"input {path}: {width}x{height} is too small; the shorter side needs >= {min_side} px")
    try:
        image = ImageOps.exif_transpose(image)  # phone photos: the pixels as viewers show them
    except Exception:  # noqa: BLE001 - a malformed EXIF block is no reason to refuse the pixels
        pass
    try:
        return to_rgb(image), carried
    except (ValueError, OSError) as exc:
        raise UserError(f"input {path}: mode {image.mode} can't be converted to RGB ({exc}); "
                        "save it as 8-bit RGB") from None


def png_without_big_text(path: Path, exc: ValueError) -> io.BytesIO:
    """The PNG at ``path`` (in memory) with only the text chunks PIL's text guards (``exc``) let through, so that the
    image opens: of those a result carries (and :data:`IMAGE_TEXT_KEYS`), each at most :data:`MAX_CARRIED_BYTES`
    inflated, while their sum stays within PIL's total (``PngImagePlugin.MAX_TEXT_MEMORY``); the others are left out
    unread (never carried anyway) and what would have been carried is named in a warning. At most that total (plus
    one chunk) is inflated, however many chunks the file has. A file that is no PNG re-raises ``exc``."""
    data = path.read_bytes()
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise exc
    budget = PngImagePlugin.MAX_TEXT_MEMORY  # read at call time: PIL's own total
    kept, at, measured, over_total, uncarried = [data[:8]], 8, 0, [], 0
    while at + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[at : at + 8])
        chunk, at = data[at : at + 12 + length], at + 12 + length
        if kind not in (b"tEXt", b"zTXt", b"iTXt"):
            kept.append(chunk)
            continue
        key = chunk[8:].split(b"\0", 1)[0].decode("latin-1")
        if not carries(key) and key not in IMAGE_TEXT_KEYS:
            uncarried += 1
            continue
        size = text_chunk_size(kind, chunk[8:-4]) if measured <= budget else None  # None: the total is spent
        measured += size or 0
        if size is not None and size > MAX_CARRIED_BYTES:
            log.warning("input %s: text chunk %r is over %d bytes; not carried to the output", path, key,
                        MAX_CARRIED_BYTES)
        elif size is None or measured > budget:
            over_total.append(key)
        else:
            kept.append(chunk)
    kept.append(data[at:])
    if over_total:
        named = ", ".join(map(repr, over_total[:5])) + (f" and {len(over_total) - 5} more" if over_total[5:] else "")
        log.warning("input %s: text chunk(s) %s pass PIL's %d-byte total for an image's text; not carried to the "
                    "output", path, named, budget)
    if uncarried:
        log.warning("input %s: PIL refused its text (%s); %d text chunk(s) a result does not carry were left out",
                    path, (str(exc).splitlines() or [type(exc).__name__])[0], uncarried)
    return io.BytesIO(b"".join(kept))


def text_chunk_size(kind: bytes, body: bytes) -> int:
    """A PNG text chunk's text size, inflating at most one byte past :data:`MAX_CARRIED_BYTES`."""
    key, _, rest = body.partition(b"\0")
    if kind == b"zTXt":
        packed = rest[1:]
    elif kind == b"iTXt" and rest[:1] == b"\1":
        packed = rest[2:].split(b"\0", 2)[-1]  # after the language tag and the translated keyword
    else:
        return len(rest)
    try:
        return len(zlib.decompressobj().decompress(packed, MAX_CARRIED_BYTES + 1))
    except zlib.error:
        return 0  # corrupt: PIL decides about it


def open_loaded(source, max_pixels: int, too_big: str) -> Image.Image:
    """Open ``source`` under the pixel limit (checked from the header), then decode it."""
    with open_with_limit(source, max_pixels) as image:
        width, height = image.size
        if width * height > max_pixels:
            raise UserError(too_big.format(f"{width}x{height}"))
        image.load()
    return image


def open_with_limit(path, max_pixels: int) -> Image.Image:
    """``Image.open`` with PIL's bomb guard set to ``max_pixels``: PIL errors past 2x its limit, warns past 1x."""
    with _BOMB_LIMIT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own check below is the limit
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max(max_pixels, saved or 0)
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: transparency composited on white, 16/32-bit scaled down, CMYK/palette/greyscale converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = float(array.max()) if array.size else 0.0
        if image.mode.startswith("I;16") or peak > 255:
            top = 65535.0  # 16-bit data (a 32-bit "I" image past 8-bit range is 16-bit data in practice)
        elif image.mode == "F" and peak <= 1.0:
            top = 1.0  # floating-point images are conventionally 0..1
        else:
            top = 255.0
        grey = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        key = image.info.get("transparency")  # 16-bit PNG tRNS: one grey value is transparent
        if isinstance(key, int) and not isinstance(key, bool):
            grey.putalpha(Image.fromarray(np.where(array == key, 0, 255).astype(np.uint8), "L"))
        image = grey
    if image.mode in ("P", "L", "RGB", "1") and "transparency" in image.info:
        image = image.convert("RGBA")  # palette / colour-key transparency (PNG tRNS, GIF)
    if image.mode == "La":  # premultiplied grey+alpha: PIL converts it to RGBA only via LA
        image = image.convert("LA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


OUTPUT_SUFFIXES = (".png", ".tif", ".tiff", ".webp", ".jpg", ".jpeg")  # each carries the parameters (metadata.py)


def check_output_path(path: str | os.PathLike, overwrite: bool, *, source: str | os.PathLike | None = None) -> Path:
    """Fail before any work if the output can't be written, exists without ``overwrite``, or is the input itself.

    Permission bits don't prove a directory takes new files (root passes ``os.access`` everywhere, ``/proc`` refuses
    them all): the run creates its result's temp file (:func:`temp_beside`) before any model loads.
    """
    path = Path(path)
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise UserError(f"output {path}: unknown image type {path.suffix or '(no suffix)'!r}; "
                        f"name it with one of {', '.join(OUTPUT_SUFFIXES)}")
    if source is not None and path.exists() and Path(source).exists() and os.path.samefile(path, source):
        raise UserError(f"output {path} is the input image; choose another -o (an input is never overwritten)")
    if path.exists() and not overwrite:
        raise UserError(f"output {path} already exists; pass --overwrite or choose another name")
    if path.is_dir():
        raise UserError(f"output {path} is a directory; give a file name ending in .png or .tif")
    if not path.parent.is_dir():
        what = "is not a directory" if path.parent.exists() else "does not exist"
        raise UserError(f"output {path}: directory {path.parent} {what}; create it first")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise UserError(f"output {path}: directory {path.parent} is not writable; choose another output directory")
    return path


def check_output_side(path: str | os.PathLike, size: tuple[int, int]) -> None:
    """Fail before any work if the output's format can't hold a ``size`` (W, H) image (WebP: 16383 px a side)."""
    from .writers import MAX_SIDE, PIL_FORMATS

    kind = PIL_FORMATS.get(Path(path).suffix.lower())
    if kind and max(size) > MAX_SIDE[kind]:
        raise UserError(f"output {path}: {size[0]}x{size[1]} is over {kind}'s {MAX_SIDE[kind]} px side limit; "
                        "write a .png or .tif instead")


def temp_beside(path: str | os.PathLike) -> Path:
    """An empty private file beside ``path`` (same filesystem, so placing it is a rename) for a result to be written
    to, then moved under its name by :func:`place`; one UserError if the folder takes no new files."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise UserError(f"output {path}: can't write to {path.parent} ({exc.strerror or exc}); "
                        "choose another output directory") from None
    os.close(fd)
    return Path(tmp)


def write_image(path: str | os.PathLike, bands: Iterable[np.ndarray], size: tuple[int, int],
                metadata: dict[str, object], *, carried: dict[str, str] | None = None, overwrite: bool = True,
                temp: str | os.PathLike | None = None) -> Path:
    """Encode uint8 ``bands`` of a ``size`` (W, H) image (PNG, TIFF, WebP or JPEG, by ``path``'s name) with the
    run's ``metadata`` and the source's ``carried`` keys into ``temp`` (default: a new temp file beside ``path``),
    then :func:`place` it under ``path``: it appears complete or not at all."""
    from .writers import encoder_for

    path = Path(path)
    temp = temp or temp_beside(path)
    try:
        with open(temp, "wb") as handle:  # a named handle: tifffile wants the file's name
            encoder_for(path)(handle, bands, size[0], size[1], file_text(metadata, carried))
        place(temp, path, overwrite)
    finally:
        Path(temp).unlink(missing_ok=True)
    return path


def save_png(image: Image.Image, path: str | os.PathLike, metadata: dict[str, object], *,
             carried: dict[str, str] | None = None, overwrite: bool = True) -> Path:
    """Write ``image`` as PNG with one text chunk per metadata (and carried) key, atomically."""
    return write_image(path, [np.asarray(image.convert("RGB"))], image.size, metadata, carried=carried,
                       overwrite=overwrite)


def place(tmp: str | os.PathLike, path: str | os.PathLike, overwrite: bool) -> None:
    """Move a finished file to its name in one step. ``overwrite``: replace what is there (``os.replace``).
    Otherwise exclusive: a hard link fails if the name exists, so of two runs racing for one name exactly one wins
    (a check-then-rename would let the second silently replace the first)."""
    path = Path(path)
    os.chmod(tmp, _new_file_mode(path))  # mkstemp makes 0600; give the output the mode a new file gets
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        try:
            os.link(tmp, path)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))  # no hard links here: claim the name
            os.replace(tmp, path)
    except FileExistsError:
        raise UserError(f"output {path} was created by someone else while this run worked; nothing was "
                        "overwritten: pass --overwrite or choose another name") from None
    Path(tmp).unlink(missing_ok=True)


def _new_file_mode(path: Path) -> int:
    """An existing output keeps its permissions; a new one gets 0666 minus the umask, like ``open(path, 'w')``."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        pass
    try:  # Linux exposes the umask without changing it (os.umask would race with other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def read_png_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``cupscale:*`` text chunks of a PNG written by :func:`save_png`, without the prefix (every key of every
    format: :func:`cupscale_dist.files.metadata.read_metadata`)."""
    return read_run_metadata(path)
