"""Reading a file a user names: at most a named number of bytes, and JSON that must be one object.

A path may name ``/dev/zero``, a pipe that never ends or a 10 GB file; read whole, each ends in MemoryError after
GBs. So every reader of a user's file passes its cap (a named constant beside the reader, with its reason) and reads
at most one byte more: past the cap it is one UserError naming the file, the cap and the fix. ``json.loads``
recurses once per nesting level (a RecursionError past Python's recursion limit) and returns whatever the file
holds (``[]`` where an object is expected fails later as an AttributeError): both are one UserError here.

A path may also name what is no file: a named pipe (FIFO) blocks ``open`` until a writer comes (forever), a
directory fails deep inside a library with a traceback, and a 5,000-character name is ``OSError: File name too
long``. :func:`open_user_file` opens without blocking and refuses anything but a regular file or a character device
(``/dev/zero`` then meets the cap); :func:`check_regular_file` does the same from ``stat`` for a file a library opens
itself (torch, safetensors, tokenizers); :func:`check_path_text` refuses a name no file system takes, before any
of them. Every message shows at most :data:`~cupscale_dist.errors.SHOWN_CHARS` characters of the path.
"""

from __future__ import annotations

import errno
import json
import os
import stat

from ..errors import UserError, shown

# A model's, ControlNet's or captioner's config.json / model_index.json is a few KB (ones with big label tables
# ~100 KB); 16 MiB leaves room for any real one and bounds what a wrong path (a weights file, /dev/zero) costs.
MAX_JSON_CONFIG_BYTES = 16 << 20


# What Linux file systems take (NAME_MAX, PATH_MAX): past these every call on the name is ENAMETOOLONG.
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4095


MAX_NAMED = 120  # characters of a "what" (a flag and a path) in a message: its start and its file name survive


def named(what: str) -> str:
    """``what`` (a flag and a user's path) cut in the middle to :data:`MAX_NAMED` characters: a message stays one
    short line however long the path."""
    return what if len(what) <= MAX_NAMED else what[:60] + "..." + what[-(MAX_NAMED - 63):]


def path_text_problem(path: str | os.PathLike) -> str | None:
    """Why no file can have the name ``path`` (a NUL byte, a part over :data:`MAX_NAME_BYTES` or the whole over
    :data:`MAX_PATH_BYTES` bytes), or why the CLI takes no such name (a control character), or None."""
    text = os.fsencode(os.fspath(path))
    if b"\0" in text:
        return "contains a NUL byte, which no file name can"
    if any(byte < 32 or byte == 127 for byte in text):  # a newline in a name would split every one-line error
        return "contains a control character (a newline, a tab, ...); rename the file"
    if len(text) > MAX_PATH_BYTES:
        return f"is {len(text)} bytes long, over the {MAX_PATH_BYTES} a path may have"
    longest = max((len(part) for part in text.split(b"/")), default=0)
    if longest > MAX_NAME_BYTES:
        return f"has a name of {longest} bytes, over the {MAX_NAME_BYTES} a file name may have"
    if text.startswith(b"~") and not home_of(os.fsdecode(text)):  # pathlib's expanduser raises RuntimeError
        return "starts with ~NAME, and this machine has no such user; give the full path"
    return None


def home_of(path: str) -> bool:
    """Whether ``~`` or ``~NAME`` at the start of ``path`` names a home this machine has."""
    try:
        return os.path.expanduser(path) != path
    except (ValueError, UnicodeError):  # a name pwd can't look up (surrogates from undecodable argv bytes)
        return False


def check_path_text(path: str | os.PathLike, flag: str, fix: str = "give a shorter path") -> None:
    """One UserError naming ``flag`` and the path (cut) when no file can have the name ``path``."""
    problem = path_text_problem(path)
    if problem:
        raise UserError(f"{flag} {shown(os.fspath(path))}: {problem}; {fix}")


def kind_problem(mode: int) -> str | None:
    """Why a file of ``mode`` is no user file (None for a regular file or a character device such as /dev/zero,
    which the caps bound)."""
    if stat.S_ISREG(mode) or stat.S_ISCHR(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    if stat.S_ISFIFO(mode):
        return "is a named pipe (FIFO), not a file: reading it would wait for a writer"
    return "is not a regular file (a socket or a block device)"


def check_regular_file(path: str | os.PathLike, what: str, fix: str) -> None:
    """One UserError (``what``, the problem, ``fix``) unless ``path`` is a regular file: for a file that a library
    opens itself, so it never blocks on a FIFO or fails on a directory. A missing file passes (the caller says so)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UserError(f"{named(what)} is unreadable ({errno.errorcode.get(exc.errno, type(exc).__name__)}); "
                        f"{fix}") from None
    problem = "is a character device, not a file" if stat.S_ISCHR(mode) else kind_problem(mode)
    if problem:
        raise UserError(f"{named(what)} {problem}; {fix}")


def open_user_file(path: str | os.PathLike, what: str, fix: str):
    """``path`` opened for reading in binary, without blocking on a FIFO; anything but a regular file or a
    character device is one UserError. OSError (missing, unreadable) is the caller's to word."""
    problem = path_text_problem(path)
    if problem:
        raise UserError(f"{named(what)}: the path {problem}; give a shorter path")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens at once instead of waiting for a writer
    try:
        problem = kind_problem(os.fstat(fd).st_mode)
        if problem:
            raise UserError(f"{named(what)} {problem}; {fix}")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_capped(path: str | os.PathLike, cap: int, what: str, fix: str) -> bytes:
    """At most ``cap`` bytes of ``path`` (``cap`` + 1 are read to tell); one UserError naming ``what``, the cap and
    ``fix`` when the file holds more, or when ``path`` is a FIFO or a directory (:func:`open_user_file`). OSError
    (missing, unreadable) is the caller's to word."""
    with open_user_file(path, what, fix) as handle:
        data = handle.read(cap + 1)
    if len(data) > cap:
        raise UserError(f"{named(what)} is over the {cap}-byte limit for such a file; {fix}")
    return data


def read_json_object(path: str | os.PathLike, what: str, fix: str, cap: int = MAX_JSON_CONFIG_BYTES) -> dict:
    """The JSON object in ``path`` (at most ``cap`` bytes); missing, unreadable, too big, invalid, nested too deeply
    or not an object ``{...}``: one UserError that starts with ``what`` and ends with ``fix``."""
    try:
        data = json.loads(read_capped(path, cap, what, fix).decode("utf-8"))
    except OSError:
        raise UserError(f"{named(what)} is missing or unreadable; {fix}") from None
    except RecursionError:  # the decoder recurses once per level: past Python's limit this is no config
        raise UserError(f"{named(what)} is nested too deeply to be a config file; {fix}") from None
    except ValueError as exc:  # JSONDecodeError, bytes that are not UTF-8, an int of over 4300 digits
        reason = str(exc).splitlines()[0][:40]
        raise UserError(f"{named(what)} is unreadable, not valid JSON ({reason}); {fix}") from None
    if not isinstance(data, dict):
        raise UserError(f"{named(what)} must be a JSON object {{...}}, got {json_kind(data)}; {fix}")
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
