"""The service's own bounds on what a request may cost: bytes of bodies in flight, ceilings on the knobs that lift
memory bounds, valid UTF-8 in the query, the token file's size, and no server paths in what a client is told.

Every bound is a named constant with its reason; the operator raises a knob's ceiling by running the service with a
higher value of that knob (``cupscale serve --set view_batch_size=16``: the service's own value is always allowed).
"""

from __future__ import annotations

import threading
from pathlib import Path
from urllib.parse import unquote_to_bytes

from ..config import UpscaleConfig
from ..errors import UserError

MAX_TOKEN_FILE_BYTES = 4096  # a bearer token is tens of characters; a bigger file is no token file (/dev/zero)
# Bodies being received and decoded at once, in units of the largest body: 4 x 64 MB by default. A request reserves
# its Content-Length (a chunked one: the largest body) before any of its body is read; past the bound it is a 429.
INFLIGHT_BODIES = 4
INFLIGHT_RETRY_AFTER_S = 2  # an upload of 64 MB takes about a second on a LAN: retry soon
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
    """The token file's text, read up to :data:`MAX_TOKEN_FILE_BYTES` (``/dev/zero`` is refused, not read on)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_TOKEN_FILE_BYTES + 1)
    except OSError as exc:
        raise UserError(f"--token-file {path}: can't read it ({exc.strerror or exc}); fix the path") from None
    if len(data) > MAX_TOKEN_FILE_BYTES:
        raise UserError(f"--token-file {path}: over {MAX_TOKEN_FILE_BYTES} bytes, which no token is; pass the file "
                        "that holds only the token")
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise UserError(f"--token-file {path}: not UTF-8 text; the token is one line of text") from None


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
    """Bytes of request bodies being received and decoded, bounded; a request reserves before reading its body."""

    def __init__(self, limit: int):
        self.limit = limit  # bytes of bodies in flight at most
        self.used = 0  # bytes reserved by requests now being received or decoded
        self._lock = threading.Lock()  # handlers of one replica may run on several threads

    def reserve(self, size: int) -> bool:
        with self._lock:
            if self.used + size > self.limit:
                return False
            self.used += size
            return True

    def release(self, size: int) -> None:
        with self._lock:
            self.used -= size
