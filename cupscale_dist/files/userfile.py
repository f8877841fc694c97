"""Reading a file a user names: at most a named number of bytes, and JSON that must be one object.

A path may name ``/dev/zero``, a pipe that never ends or a 10 GB file; read whole, each ends in MemoryError after
GBs. So every reader of a user's file passes its cap (a named constant beside the reader, with its reason) and reads
at most one byte more: past the cap it is one UserError naming the file, the cap and the fix. ``json.loads``
recurses once per nesting level (a RecursionError past Python's recursion limit) and returns whatever the file
holds (``[]`` where an object is expected fails later as an AttributeError): both are one UserError here.
"""

from __future__ import annotations

import json
import os

from ..errors import UserError

# A model's, ControlNet's or captioner's config.json / model_index.json is a few KB (ones with big label tables
# ~100 KB); 16 MiB leaves room for any real one and bounds what a wrong path (a weights file, /dev/zero) costs.
MAX_JSON_CONFIG_BYTES = 16 << 20


def read_capped(path: str | os.PathLike, cap: int, what: str, fix: str) -> bytes:
    """At most ``cap`` bytes of ``path`` (``cap`` + 1 are read to tell); one UserError naming ``what``, the cap and
    ``fix`` when the file holds more. OSError (missing, unreadable) is the caller's to word."""
    with open(path, "rb") as handle:
        data = handle.read(cap + 1)
    if len(data) > cap:
        raise UserError(f"{what} is over the {cap}-byte limit for such a file; {fix}")
    return data


def read_json_object(path: str | os.PathLike, what: str, fix: str, cap: int = MAX_JSON_CONFIG_BYTES) -> dict:
    """The JSON object in ``path`` (at most ``cap`` bytes); missing, unreadable, too big, invalid, nested too deeply
    or not an object ``{...}``: one UserError that starts with ``what`` and ends with ``fix``."""
    try:
        data = json.loads(read_capped(path, cap, what, fix).decode("utf-8"))
    except OSError:
        raise UserError(f"{what} is missing or unreadable; {fix}") from None
    except RecursionError:  # the decoder recurses once per level: past Python's limit this is no config
        raise UserError(f"{what} is nested too deeply to be a config file; {fix}") from None
    except ValueError as exc:  # JSONDecodeError, bytes that are not UTF-8, an int of over 4300 digits
        raise UserError(f"{what} is unreadable, not valid JSON ({str(exc).splitlines()[0][:80]}); {fix}") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} must be a JSON object {{...}}, got {json_kind(data)}; {fix}")
    return data


def json_kind(value: object) -> str:
    """What a decoded JSON value is, in JSON's words."""
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "true/false"
    return "null" if value is None else "a number"
