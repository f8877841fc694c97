"""A result's metadata: the run's own keys (``cupscale:*``) plus the generator keys carried over from its source.

Carried: A1111's ``parameters`` and ComfyUI's ``prompt`` / ``workflow``, under their own names so A1111's PNG Info
and ComfyUI's loader re-open the output as they opened the source, and a previous cupscale pass's ``cupscale:*``
keys. Read from what the input's one open already parsed: PNG tEXt/zTXt/iTXt chunks, a JPEG/WebP's EXIF
UserComment (where A1111 keeps ``parameters``) and cupscale's own XMP packet, a TIFF's cupscale ImageDescription.
A source key never replaces one of the run's: a clash, or any key in the run's ``cupscale:`` namespace, is kept
as ``source:KEY``. What can't be carried (over
:data:`MAX_CARRIED_BYTES`, an undecodable or non-text UserComment, JSON nested past Python's recursion limit, an XMP
packet over :data:`MAX_XMP_BYTES`) is skipped with a warning (PIL drops a non-UTF-8 iTXt silently); the run goes on.

Where each format keeps the keys (:func:`read_metadata` reads every one back):
``.png`` one text chunk per key; ``.tif``/``.tiff`` all keys as JSON in ImageDescription; ``.webp``/``.jpg``/
``.jpeg`` all keys as JSON in an XMP packet, and the ``parameters`` text (the run's keys as JSON when the source
had none) in EXIF UserComment, A1111's convention.
"""

from __future__ import annotations

import html
import json
import logging
import os
from pathlib import Path

from PIL import Image

log = logging.getLogger(__name__)

RUN_PREFIX = "cupscale:"  # the run's own keys in a file; read_png_metadata strips it
SOURCE_PREFIX = "source:"  # a carried key that names one of the run's keys is kept under this prefix
CARRIED_KEYS = ("parameters", "prompt", "workflow")  # A1111's text; ComfyUI's API graph and its UI workflow
MAX_CARRIED_BYTES = 1 << 20  # per value (UTF-8): a ComfyUI workflow is tens of KB; larger is not a generator's record
EXIF_IFD, USER_COMMENT = 0x8769, 0x9286  # the Exif sub-IFD and its UserComment tag (EXIF 2.3, 4.6.5)
UNICODE_HEADER, ASCII_HEADER = b"UNICODE\0", b"ASCII\0\0\0"  # UserComment's 8-byte character-code prefixes
XMP_NS = "https://github.com/cupscale-dist/ns/1.0/"
XMP_OPEN, XMP_CLOSE = b"<cupscale:metadata>", b"</cupscale:metadata>"  # around the JSON in cupscale's XMP packet
# An XMP packet is searched only up to this size: PIL's total for a PNG's text (PngImagePlugin.MAX_TEXT_MEMORY).
# Ours holds a few carried keys of at most MAX_CARRIED_BYTES each (escaped), far below it.
MAX_XMP_BYTES = 64 << 20


def text_value(value: object) -> str:
    """A run key's value as file text: strings as they are, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, default=list)


def file_text(metadata: dict[str, object], carried: dict[str, str] | None = None) -> dict[str, str]:
    """Every key a result file holds: the run's as ``cupscale:KEY``, then the carried ones under their own names,
    or as ``source:KEY`` where that name is already taken or in the run's ``cupscale:`` namespace (ours is kept; an
    earlier pass's key never passes for this run's)."""
    text = {f"{RUN_PREFIX}{key}": text_value(value) for key, value in metadata.items()}
    for key, value in (carried or {}).items():
        text[f"{SOURCE_PREFIX}{key}" if key in text or key.startswith(RUN_PREFIX) else key] = value
    return text


def carried_text(image: Image.Image, name: str | os.PathLike = "input") -> dict[str, str]:
    """The keys of an opened (loaded) source image that its result carries, each checked by :func:`carry`."""
    found: dict[str, str] = {}
    if isinstance(getattr(image, "text", None), dict):  # PNG: tEXt/zTXt/iTXt, as PIL decoded them
        for key, value in image.text.items():
            found[key] = value if hasattr(value, "lang") else tEXt_text(value)  # PIL's iTXt values carry a lang
    if image.format == "TIFF":
        found.update(json_text(image.tag_v2.get(270), name, "ImageDescription"))
    if isinstance(image.info.get("xmp"), (bytes, bytearray)):
        found.update(xmp_text(image.info["xmp"], name))
    if image.format in ("JPEG", "WEBP", "MPO") and "parameters" not in found:
        try:
            comment = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
        except Exception:  # noqa: BLE001 - a malformed EXIF block carries nothing; the pixels are still good
            comment = None
        if comment:
            found["parameters"] = user_comment_text(comment, name)
    return carry(found, name)


def carry(found: dict[str, str | None], name: str | os.PathLike = "input") -> dict[str, str]:
    """Of ``found``, the keys a result carries (:data:`CARRIED_KEYS`, ``cupscale:*``) that fit: at most
    :data:`MAX_CARRIED_BYTES`, valid Unicode; the rest skipped with a warning."""
    kept = {}
    for key, value in found.items():
        if not carries(key):
            continue
        if value is None:
            continue  # already warned about where it was decoded
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError:
            log.warning("input %s: metadata %r is not valid Unicode; not carried to the output", name, key)
            continue
        if size > MAX_CARRIED_BYTES:
            log.warning("input %s: metadata %r is %d bytes, over the %d-byte limit; not carried to the output",
                        name, key, size, MAX_CARRIED_BYTES)
            continue
        kept[key] = value
    return kept


def carries(key: str) -> bool:
    """Whether a result carries a source key of this name (:data:`CARRIED_KEYS` and the ``cupscale:`` namespace)."""
    return key in CARRIED_KEYS or key.startswith(RUN_PREFIX)


def tEXt_text(value: str) -> str:  # noqa: N802 - named after the chunk
    """A tEXt/zTXt value PIL decoded as Latin-1 (PNG's rule): UTF-8 if its bytes are UTF-8 (what many writers
    put there), else the Latin-1 text."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value


def user_comment(text: str) -> bytes:
    """EXIF UserComment bytes as A1111 writes them (piexif's ``UserComment.dump(..., encoding="unicode")``)."""
    return UNICODE_HEADER + text.encode("utf-16-be")


def user_comment_text(comment: bytes | str, name: str | os.PathLike = "input") -> str | None:
    """The text of an EXIF UserComment: UNICODE (UTF-16, big-endian as A1111 writes it, or with a BOM), ASCII or
    undefined (UTF-8); None, with a warning, when it decodes as none of them."""
    if isinstance(comment, str):
        return comment
    if isinstance(comment, (tuple, list)) and all(type(b) is int and 0 <= b < 256 for b in comment):
        comment = bytes(comment)  # stored as numbers of byte size: still the bytes of a text
    if not isinstance(comment, (bytes, bytearray)):  # a number or a rational, as a tag of another type holds
        log.warning("input %s: EXIF UserComment is not text (type %s); not carried to the output", name,
                    type(comment).__name__)
        return None
    header, body = bytes(comment[:8]), bytes(comment[8:])
    try:
        if header == UNICODE_HEADER:
            encoding = "utf-16" if body[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-16-be"
            return body.decode(encoding)
        return (body if header in (ASCII_HEADER, b"\0" * 8) else bytes(comment)).decode("utf-8").rstrip("\0")
    except UnicodeDecodeError:
        log.warning("input %s: EXIF UserComment is not UTF-16/UTF-8 text; not carried to the output", name)
        return None


def xmp_packet(text: dict[str, str]) -> bytes:
    """An XMP packet holding ``text`` as one JSON value (ASCII-escaped, so any key or value survives XML)."""
    value = html.escape(json.dumps(text, ensure_ascii=True), quote=False)
    return ('<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
            '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            f'<rdf:Description rdf:about="" xmlns:cupscale="{XMP_NS}"><cupscale:metadata>{value}</cupscale:metadata>'
            '</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>').encode("utf-8")


def xmp_text(packet: bytes, name: str | os.PathLike = "input") -> dict[str, str]:
    """The keys :func:`xmp_packet` stored; {} for any other XMP.

    One forward scan: the first opening tag, then the first closing tag after it, which is what a non-greedy regex
    would match; but the regex retries from every later opening tag when no closing one follows, quadratic in a
    packet that repeats the opening tag (16,000 times: 34 s)."""
    if len(packet) > MAX_XMP_BYTES:
        log.warning("input %s: XMP packet of %d bytes is over the %d-byte limit; nothing carried from it", name,
                    len(packet), MAX_XMP_BYTES)
        return {}
    packet = bytes(packet)
    start = packet.find(XMP_OPEN)
    end = packet.find(XMP_CLOSE, start + len(XMP_OPEN)) if start >= 0 else -1
    if end < 0:
        return {}
    return json_text(html.unescape(packet[start + len(XMP_OPEN) : end].decode("ascii", "replace")), name, "XMP")


def json_text(value: object, name: str | os.PathLike, where: str) -> dict[str, str]:
    """A JSON object of strings (cupscale's TIFF description / XMP value); {} for anything else."""
    if not isinstance(value, str) or not value.startswith("{"):
        return {}
    try:
        data = json.loads(value)
    except (ValueError, RecursionError):  # RecursionError: nested past Python's recursion limit
        log.warning("%s: %s is not the JSON cupscale writes; nothing carried from it", name, where)
        return {}
    return {k: v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) else {}


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Every key a result file holds (``cupscale:*`` and carried), whatever its format (by suffix)."""
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        with tifffile.TiffFile(path) as tif:
            return json_text(tif.pages[0].description, path, "ImageDescription")
    with Image.open(path) as image:
        if image.format == "PNG":
            return dict(image.text)  # PIL reads the text chunks after the pixels too
        return xmp_text(image.info.get("xmp", b""), path)


def read_run_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The run's own keys of a result file (any format), without their ``cupscale:`` prefix."""
    return {k.removeprefix(RUN_PREFIX): v for k, v in read_metadata(path).items() if k.startswith(RUN_PREFIX)}
