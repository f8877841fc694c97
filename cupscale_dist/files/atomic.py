"""Files that appear whole or not at all: written to a temp file beside their name, flushed to disk, then renamed
over it in one step (``os.replace``). A kill between any two writes leaves the old file (or none) and at most a
hidden temp file, which is removed whenever the writer itself fails. Used for checkpoints, batch manifests, the
service's job records and uploads, and converted upscale models. (Result images have their own
:func:`cupscale_dist.files.imageio.place`: they may also claim a name exclusively.)"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary handle on a temp file beside ``path``; on a clean exit it is fsynced and takes ``path``'s name."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """``data`` as the whole content of ``path``, atomically (:func:`atomic_file`)."""
    with atomic_file(path) as handle:
        handle.write(data)
