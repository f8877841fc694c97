"""One owner per folder: an ``flock`` on a lock file in it, which the kernel releases when the holder exits or dies
(no stale lock after a kill). The file names its holder, so a refused second owner is told who has the folder.
Used by a batch's output folder (:class:`cupscale_dist.services.batch.manifest.OutputLock`) and the service's results
folder (:meth:`cupscale_dist.services.jobstore.JobStore.claim`, probed by `cupscale serve` before it starts Ray)."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

from ..errors import UserError
from .userfile import kind_problem, named


def hold_lock_file(path: Path, owner: str, refusal: str, note: str = "") -> int:
    """Lock ``path`` (created if missing) for this process and write who holds it; returns the descriptor, whose
    closing releases the lock. Held elsewhere: ``refusal`` (with ``{holder}``) as a UserError; ``owner`` names a
    holder that has not written its line yet ("a batch" -> "a batch that is just starting")."""
    import fcntl

    fd = open_lock_file(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = read_holder(fd, owner)
        os.close(fd)
        raise UserError(refusal.format(holder=holder)) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}{note}\n".encode())
    return fd


def probe_lock_file(path: Path, owner: str, refusal: str) -> None:
    """Refuse at once (``refusal`` with ``{holder}``) when another owner holds ``path``; a free lock is left free,
    for the real owner to take later with :func:`hold_lock_file` (a command checks before it starts its workers)."""
    import fcntl

    fd = open_lock_file(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserError(refusal.format(holder=read_holder(fd, owner))) from None
    finally:
        os.close(fd)  # closing drops the probe's own lock


def open_lock_file(path: Path, mode: int) -> int:
    """``path`` opened (created if missing) without blocking: a FIFO or a folder in its place (opening a FIFO waits
    for a writer) is one UserError naming it and the fix, not a hang or a traceback."""
    try:
        fd = os.open(path, mode | os.O_CREAT | os.O_NONBLOCK, 0o644)
    except IsADirectoryError:
        fd = None
    mode = None if fd is None else os.fstat(fd).st_mode
    problem = "is a directory" if fd is None else ("is a device" if stat.S_ISCHR(mode) else kind_problem(mode))
    if problem:
        if fd is not None:
            os.close(fd)
        raise UserError(f"{named(f'lock file {path}')} {problem.split(',')[0].split(':')[0]}, not a lock file; "
                        "delete it (nothing is lost: it only names its holder)")
    os.set_blocking(fd, True)
    return fd


def read_holder(fd: int, owner: str) -> str:
    """The holder's line in the lock file (its first 512 bytes, as one line: it goes into a one-line error)."""
    return " ".join(os.pread(fd, 512, 0).decode(errors="replace").split()) or f"{owner} that is just starting"
