"""The service's own bounds on what a request may cost: bytes of bodies in flight, ceilings on the knobs that lift
memory bounds, valid UTF-8 in the query, the token file's size, and no server paths in what a client is told.

Every bound is a named constant with its reason; the operator raises a knob's ceiling by running the service with a
higher value of that knob (``cupscale serve --set view_batch_size=16``: the service's own value is always allowed).
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from urllib.parse import unquote_to_bytes

from ..config import UpscaleConfig
from ..errors import UserError, shown

MAX_TOKEN_FILE_BYTES = 4096  # a bearer token is tens of characters; a bigger file is no token file (/dev/zero)
# Bodies being received and decoded at once, in units of the largest body: 4 x 64 MB by default. A request reserves
# its bytes as they arrive (a reservation of what it only announced let 4 slow clients hold the whole bound with a
# byte each, issue 35); it is admitted only if its Content-Length (a chunked one: the largest body) fits in what is
# free, and a body whose bytes would pass the bound is a 429, before or while it is read.
INFLIGHT_BODIES = 4
INFLIGHT_RETRY_AFTER_S = 2  # an upload of 64 MB takes about a second on a LAN: retry soon
# A body must make progress: at least BODY_PROGRESS_BYTES every BODY_STALL_S, else 408. A 64 MB body at 1 MB/s brings
# 10 MB per window; a client dripping a byte every 5 s (which holds an HTTP slot until Serve's 120 s) brings 2 bytes.
BODY_STALL_S = 10.0
BODY_PROGRESS_BYTES = 4096  # 410 B/s: below any real link, above any drip
# Largest --max-request-mb: 16-bit TIFFs of the default 16 Mpx are ~100 MB; a bound of GBs per body times
# INFLIGHT_BODIES is no bound (and inf, which int() can't take, is none at all).
MAX_REQUEST_MB_CEILING = 4096.0
# A refusal is one line a person reads (issue 35): every echoed value is cut where the message is made; this is the
# HTTP boundary's own guarantee, for a message from deeper code that did not.
MAX_ERROR_CHARS = 300
# Decoded pixels (3 B a pixel: 48 MB at the default 16-Mpx max_input_pixels) held by at most this many requests at
# once; more wait their turn. With INFLIGHT_BODIES this bounds the memory of requests not yet queued.
DECODES_AT_ONCE = 2

# Request knobs whose value lifts a memory bound, and the highest value a request may set (the service's own value,
# if higher, is allowed too): knob -> (ceiling, why).
REQUEST_CEILINGS: dict[str, tuple[int, str]] = {
    "view_batch_size": (8, "views per UNet call: activation memory grows with it; the tile rate saturates near 4"),
    "tile": (128, "view size in latent px (SDXL's native 1024 px): attention memory grows with the square of its area"),
    "vae_tile": (1024, "VAE tile in image px (SDXL's VAE is trained at 1024): its memory grows with the tile's area"),
    "upscale_model_tile": (512, "upscale-model tile in input px: RRDBNet at 4x keeps ~64 maps of 4x the tile (1 GiB)"),
    "upscale_model_overlap": (64, "context px around an upscale-model tile, which grows it; RRDBNet needs ~10"),
    "caption_max_new_tokens": (128, "captioner tokens (its KV cache grows with them); CLIP reads only 75 of a caption"),
}
# Request knobs with a choice that lifts a memory bound: the choices a request may make (the service's own value is
# allowed too). resize=model runs an SR network on the whole image: only where the operator set it.
REQUEST_CHOICES: dict[str, tuple[tuple[str, ...], str]] = {
    "resize": (("bicubic", "lanczos"), "'model' runs an SR network over the whole image"),
}
# Reviewed and left to their own checks: steps (max 1000) and stride (more views) cost time, not memory, and a job's
# time is bounded by the one-at-a-time queue and DELETE; size/scale by the service's max_output_pixels; jitter by
# tile - stride; dwt_levels, gaussian_sigma, vae_tile_overlap, caption_token_budget by their own max.


def check_request_ceilings(knobs: dict, service: UpscaleConfig) -> None:
    """A request's knobs against the ceilings; the service's own value of a knob is always allowed."""
    for name, value in knobs.items():
        if name in REQUEST_CEILINGS:
            ceiling, why = REQUEST_CEILINGS[name]
            ceiling = max(ceiling, getattr(service, name))
            if value > ceiling:
                raise UserError(f"{name}={value} is over this service's ceiling of {ceiling} ({why}); use {ceiling} "
                                f"or less, or run the service with `cupscale serve --set {name}={value}`")
        elif name in REQUEST_CHOICES:
            allowed, why = REQUEST_CHOICES[name]
            allowed = tuple(dict.fromkeys((*allowed, getattr(service, name))))
            if value not in allowed:
                raise UserError(f"{name}={value} is off on this service ({why}); use {' or '.join(allowed)}, or run "
                                f"the service with `cupscale serve --set {name}={value}`")


def check_query_utf8(query: bytes) -> None:
    """Every name and value of the raw query string is valid UTF-8 once percent-decoded (Starlette would turn
    ``%ff`` into U+FFFD silently; the CLI refuses such text by name)."""
    for pair in query.decode("latin-1").split("&"):
        name, _, value = pair.partition("=")
        for part in (name, value):
            raw = unquote_to_bytes(part.replace("+", " "))
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                shown_name = unquote_to_bytes(name).decode("utf-8", "replace")[:64]
                raise UserError(f"query parameter {shown_name!r}: {repr(raw)[:60]} is not valid UTF-8 text; "
                                "percent-encode the text's UTF-8 bytes") from None


def read_token_file(path: str) -> str:
    """The token file's one line of text, read up to :data:`MAX_TOKEN_FILE_BYTES` (``/dev/zero`` is refused, not
    read on); a file of several lines, an empty one or one that is not UTF-8 holds no token."""
    where = f"--token-file {path if len(path) <= 40 else shown(path)}"
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_TOKEN_FILE_BYTES + 1)
    except OSError as exc:
        raise UserError(f"{where}: can't read it ({exc.strerror or type(exc).__name__}); fix the path") from None
    except ValueError:  # a NUL in the path
        raise UserError(f"{where}: not a usable path; fix the path") from None
    if len(data) > MAX_TOKEN_FILE_BYTES:
        raise UserError(f"{where}: over {MAX_TOKEN_FILE_BYTES} bytes, which no token is; pass the file "
                        "that holds only the token")
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise UserError(f"{where}: not UTF-8 text; the token is one line of text") from None
    if not text:
        raise UserError(f"{where}: the file is empty; write the token into it (e.g. `python -c 'import secrets; "
                        "print(secrets.token_urlsafe(32))' > FILE`)")
    check_token_text(where, text)
    return text


def check_token_text(where: str, text: str) -> None:
    """A bearer token is one line of printable characters without spaces: what a client can send in
    ``Authorization: Bearer TOKEN`` (a token with a line break would let no client in)."""
    if len(text.splitlines()) > 1:
        raise UserError(f"{where}: {len(text.splitlines())} lines, and the token is one line (a header can't "
                        "carry a line break); keep only the token")
    if not text.isprintable() or any(c.isspace() for c in text):
        raise UserError(f"{where}: the token holds spaces or control characters, which clients can't send in "
                        "'Authorization: Bearer TOKEN'; use e.g. `secrets.token_urlsafe(32)`")


def request_megabytes(flag: str, value) -> int:
    """``--max-request-mb`` / ``--max-inflight-mb`` (a number, or its text from a RayService's args) as bytes: a
    finite positive number up to :data:`MAX_REQUEST_MB_CEILING` (inf, nan, 0 and negatives are no bound)."""
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not 0 < number <= MAX_REQUEST_MB_CEILING:  # also false for nan
        raise UserError(f"{flag} {shown(value)}: use a number of megabytes in (0, {MAX_REQUEST_MB_CEILING:g}]")
    size = int(number * 2**20)
    if size < 1:
        raise UserError(f"{flag} {shown(value)}: under one byte; use a number of megabytes such as 64")
    return size


def one_line(message: str) -> str:
    """``message`` as one line (every run of white space, line breaks included, becomes one space) of at most
    :data:`MAX_ERROR_CHARS` characters."""
    text = " ".join(message.split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def scrub_paths(message: str, paths: dict[str, str]) -> str:
    """``message`` with each server path replaced by its neutral name (longest first, so a file inside a folder
    becomes the file's name, not the folder's)."""
    for path in sorted(paths, key=len, reverse=True):
        if path:
            message = message.replace(path, paths[path])
    return message


def server_paths(config: UpscaleConfig, results: Path) -> dict[str, str]:
    """The server's own paths a refusal could show, with what a client is told instead."""
    paths = {str(results): "the results folder", str(results.resolve()): "the results folder"}
    for name in ("model", "model_config", "controlnet", "upscale_model", "regional_prompts"):
        value = getattr(config, name)
        if isinstance(value, str) and ("/" in value or "\\" in value) and Path(value).exists():
            paths[value] = f"the service's {name}"
    return paths


class InFlight:
    """Bytes of request bodies being received and decoded, bounded; a request reserves its bytes as they arrive."""

    def __init__(self, limit: int):
        self.limit = limit  # bytes of bodies in flight at most
        self.used = 0  # bytes that arrived for requests now being received or decoded
        self._lock = threading.Lock()  # handlers of one replica may run on several threads

    def has_room(self, size: int) -> bool:
        """Whether ``size`` more bytes would fit now (a request's admission: nothing is reserved)."""
        with self._lock:
            return self.used + size <= self.limit

    def reserve(self, size: int) -> bool:
        with self._lock:
            if self.used + size > self.limit:
                return False
            self.used += size
            return True

    def release(self, size: int) -> None:
        with self._lock:
            self.used -= size


class BodyReservation:
    """One request's bytes reserved in an :class:`InFlight` as they arrive, released together at its end."""

    def __init__(self, inflight: InFlight):
        self.inflight = inflight  # the replica's bound
        self.size = 0  # bytes this request holds

    def add(self, size: int) -> bool:
        """Reserve ``size`` more bytes; False (nothing reserved) when they would pass the bound."""
        if not self.inflight.reserve(size):
            return False
        self.size += size
        return True

    def __enter__(self) -> BodyReservation:
        return self

    def __exit__(self, *_exc) -> None:
        self.inflight.release(self.size)
        self.size = 0
