"""Step 3 and 5 of a batch: ``manifest.parquet`` (one row per input), its journal (rows durable the moment they
finish), what is already done, and the lock that gives an output folder to one batch at a time."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq

from ...errors import UserError, shown
from ...files.atomic import atomic_file
from ...files.folderlock import hold_lock_file
from ...files.userfile import check_regular_file, kind_problem, named
from .inputs import Item

log = logging.getLogger(__name__)


MANIFEST_NAME = "manifest.parquet"


#                    thousand blocks Ray Data's per-block bookkeeping costs more than the balance gains
MANIFEST_EVERY_S = 10.0  # rewrite the manifest at most this often while running (and always at the end)


JOURNAL_DIR = ".cupscale-journal"  # one append-only JSON-lines file per writing process: rows not yet in the parquet


LOCK_NAME = ".cupscale.lock"  # flock'ed by the batch that owns the output folder


STATUS_OK = "ok"  # upscaled and written


STATUS_ERROR = "error"  # the input itself is bad (unreadable, too small, ...): skipped on a rerun


STATUS_FAILED = "failed"  # the run broke (exception, dead worker): retried on every rerun


MANIFEST_SCHEMA = pa.schema([
    ("input_path", pa.string()),  # absolute path of the input
    ("output_path", pa.string()),  # relative to the manifest's directory; null when nothing was written
    ("status", pa.string()),  # ok | error | failed
    ("error", pa.string()),  # one line saying what went wrong and the fix
    ("input_width", pa.int32()), ("input_height", pa.int32()),
    ("output_width", pa.int32()), ("output_height", pa.int32()),
    ("prompt", pa.string()), ("negative_prompt", pa.string()),
    ("regional_prompts", pa.string()),  # the regional-prompts JSON file used, if any
    ("captioner", pa.string()),  # none | vllm | transformers: where regional prompts came from otherwise
    ("seed", pa.int64()),
    ("model", pa.string()),
    ("config_hash", pa.string()),  # UpscaleConfig.config_hash() of this row's effective config
    ("input_bytes", pa.int64()), ("input_mtime_ns", pa.int64()),  # the input as it was: a changed file is redone
    ("load_s", pa.float64()), ("upscale_s", pa.float64()), ("save_s", pa.float64()), ("total_s", pa.float64()),
    ("worker", pa.string()),  # host:pid that did the work
    ("finished_at", pa.string()),  # ISO 8601, UTC
])


MAX_JOURNAL_LINE = 1 << 20  # bytes of one journal row: paths and two prompts (16 KiB each at most) are far under
INT_RANGES = {pa.int32(): 2**31, pa.int64(): 2**63}  # what a parquet column of the type holds


def value_problem(name: str, value: object) -> str | None:
    """Why ``value`` can't be the manifest column ``name`` (its type in :data:`MANIFEST_SCHEMA`), or None."""
    if value is None:
        return None if name != "input_path" else "input_path is missing"
    kind = MANIFEST_SCHEMA.field(name).type
    if kind == pa.string():
        fits = isinstance(value, str) and "\0" not in value
    elif kind in INT_RANGES:
        fits = type(value) is int and -INT_RANGES[kind] <= value < INT_RANGES[kind]
    else:  # float64: a number, finite or not
        fits = type(value) in (int, float)
    return None if fits else f"{name} is {shown(value)} (expected {kind})"


def is_output_path(name: str) -> bool:
    """A recorded output name the batch may trust: relative, inside the output folder, a PNG."""
    path = PurePosixPath(name)
    return not path.is_absolute() and ".." not in path.parts and name.endswith(".png") and "\0" not in name


def clean_row(row: object, where: str, fix: str) -> dict:
    """``row`` as a manifest row: its columns only, each of its type (else one UserError saying ``where`` and ``fix``),
    and an ``output_path`` outside the output folder dropped: a row is a claim, never a path to trust."""
    if not isinstance(row, dict):
        raise UserError(f"{where} holds a row that is {shown(row)}, not an object; {fix}")
    row = {name: row.get(name) for name in MANIFEST_SCHEMA.names}
    problem = next(filter(None, (value_problem(name, value) for name, value in row.items())), None)
    if problem:
        raise UserError(f"{where} holds a row whose {problem}; {fix}")
    if row["output_path"] is not None and not is_output_path(row["output_path"]):
        log.warning("%s: the row of %s names an output outside the output folder (%s); ignored, the input is redone",
                    where, shown(row["input_path"]), shown(row["output_path"]))
        row["output_path"] = None
    return row


def is_done(item: Item, row: dict | None, output_dir: Path, retry_errors: bool) -> bool:
    """Same config hash and same input file, and either written (file present) or a bad input (kept unless retried)."""
    if row is None or row.get("config_hash") != item.config_hash:
        return False
    if (row.get("input_bytes"), row.get("input_mtime_ns")) != (item.input_bytes, item.input_mtime_ns):
        return False
    if row.get("status") == STATUS_OK:
        return bool(row.get("output_path")) and _written_from(output_dir / row["output_path"], item)
    return row.get("status") == STATUS_ERROR and not retry_errors


def _written_from(output: Path, item: Item) -> bool:
    """The output on disk carries this input and config (its PNG text chunks): a manifest row alone is a claim, and
    a file replaced since (another run, a hand edit) must be redone rather than reported done."""
    from ...files.imageio import read_png_metadata

    try:
        meta = read_png_metadata(output)
    except Exception:  # noqa: BLE001 - missing, truncated or not a PNG: not our finished output
        return False
    return meta.get("source") == item.input_path and meta.get("config_hash") == item.config_hash


def read_manifest(path: Path) -> dict[str, dict]:
    """``{input_path: row}`` of an existing manifest (empty if there is none), with the rows of its journal
    (a run that was killed) on top: they are newer than the parquet."""
    rows = {}
    what, fix = named(f"manifest {path}"), "move it away to start over (finished outputs are kept and redone)"
    if path.exists() or path.is_symlink():
        check_regular_file(path, what, fix)  # a folder reads as a parquet dataset, a FIFO would block
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as exc:
            reason = (str(exc).splitlines() or [type(exc).__name__])[0][:80]
            raise UserError(f"{what} is unreadable ({reason}); {fix}") from None
        for name in table.column_names:
            if name in MANIFEST_SCHEMA.names and table.schema.field(name).type != MANIFEST_SCHEMA.field(name).type:
                raise UserError(f"{what} has a column {name} of type {table.schema.field(name).type} (expected "
                                f"{MANIFEST_SCHEMA.field(name).type}); {fix}")
        if "input_path" not in table.column_names:
            raise UserError(f"{what} has no input_path column; {fix}")
        rows = {row["input_path"]: row for row in (clean_row(r, what, fix) for r in table.to_pylist())}
    rows.update((row["input_path"], row) for row in Journal(path.parent).rows())
    return rows


class Journal:
    """Every finished row, durable the moment it is recorded: one JSON line per row, fsynced, in a file per writing
    process (a worker on any node, or the driver) under ``DIR/.cupscale-journal/``. A killed driver loses no
    finished image: the next run folds these lines into ``manifest.parquet`` before anything else."""

    def __init__(self, output_dir: Path):
        self.directory = Path(output_dir) / JOURNAL_DIR

    def append(self, row: dict) -> None:
        self.directory.mkdir(exist_ok=True)
        line = json.dumps({name: row.get(name) for name in MANIFEST_SCHEMA.names}) + "\n"
        with open(self.directory / f"{socket.gethostname()}-{os.getpid()}.jsonl", "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def rows(self) -> list[dict]:
        """Every complete line, oldest file first (a line cut short by a kill is skipped: that row is redone), each a
        manifest row (:func:`clean_row`). A file that is no journal (a folder, a FIFO) or a line that is no row (deep
        JSON, wrong types, over :data:`MAX_JOURNAL_LINE`) poisons every rerun: one UserError naming the file and how
        to clear it."""
        if not self.directory.is_dir():
            if self.directory.exists() or self.directory.is_symlink():  # a file there: appends would fail later
                raise UserError(f"{named(f'batch journal folder {self.directory}')} is not a folder; delete it "
                                "(rm it; it holds no finished rows)")
            return []
        files = sorted(self.directory.glob("*.jsonl"), key=lambda p: p.lstat().st_mtime_ns)
        rows = []
        for path in files:
            what = f"batch journal {shown(path.name)}"  # the fix names the whole path, once
            fix = f"delete it to clear it: rm '{path}' (the rows it holds are redone)"
            problem = kind_problem(path.lstat().st_mode) if not path.is_symlink() else "is a symlink, not a file"
            if problem:
                raise UserError(f"{what} {problem}; {fix}")
            with open(path, "rb") as handle:
                lines = iter(lambda: handle.readline(MAX_JOURNAL_LINE + 1), b"")
                for number, line in enumerate(lines, 1):
                    if len(line) > MAX_JOURNAL_LINE:
                        raise UserError(f"{what}: line {number} is over {MAX_JOURNAL_LINE} bytes, which no row "
                                        f"is; {fix}")
                    if not line.endswith(b"\n"):
                        continue  # cut short by a kill: that row is redone
                    try:
                        row = json.loads(line.decode("utf-8"))
                    except RecursionError:
                        raise UserError(f"{what}: line {number} is JSON nested too deeply to be a row; {fix}") from None
                    except ValueError:
                        continue  # a line a kill left half-written before the next append: that row is redone
                    rows.append(clean_row(row, f"{what}: line {number}", fix))
        return rows

    def clear(self) -> None:
        """After the rows are in the parquet."""
        if self.directory.is_dir():
            for path in self.directory.glob("*.jsonl"):
                path.unlink(missing_ok=True)


class ManifestWriter:
    """Keeps every row by input path and rewrites ``manifest.parquet`` atomically (temp file + rename)."""

    def __init__(self, path: Path, rows: dict[str, dict]):
        self.path = path
        self.rows = dict(rows)  # input path -> row; rows of earlier runs are kept (their outputs are still there)
        self.last_write = time.monotonic()

    def add(self, row: dict) -> None:
        self.rows[row["input_path"]] = row
        if time.monotonic() - self.last_write > MANIFEST_EVERY_S:
            self.write()

    def write(self) -> None:
        """The parquet of every row so far, then the journal is folded in; no rows, no file (a run that failed
        before any work leaves nothing behind)."""
        if not self.rows:
            return
        rows = [{name: row.get(name) for name in MANIFEST_SCHEMA.names} for _, row in sorted(self.rows.items())]
        table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
        with atomic_file(self.path) as handle:
            pq.write_table(table, handle)
        self.last_write = time.monotonic()


class OutputLock:
    """An output folder belongs to one batch at a time: ``flock`` on ``DIR/.cupscale.lock``, which the kernel
    releases when its holder exits or dies (no stale lock after a kill). The file names the holder for the refusal.
    Two runs into one folder would pair manifest rows with the other run's images."""

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_NAME
        self.fd: int | None = None

    def __enter__(self) -> OutputLock:
        self.fd = hold_lock_file(self.path, "a batch", f"--output {self.path.parent} is in use by another batch "
                                 "({holder}); wait for it to finish or choose another --output",
                                 f", started {utc_now()}")
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)  # closing the descriptor releases the lock; the file stays (unlinking it would race)


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
