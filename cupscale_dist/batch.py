"""Dataset-wide upscaling with Ray Data: a folder, a glob or a parquet of paths in; images + a manifest out.

Usage:
    cupscale batch --input DIR|GLOB|FILE.parquet --output DIR [--config PRESET] [--workers N] [--tile-parallel]

Flow (:func:`run_batch`), read top to bottom:
    1. list the inputs (a parquet may add per-row ``prompt``, ``negative_prompt``, ``regional_prompts``, ``seed``)
    2. give each a safe output name (no path traversal, never an input, collisions resolved deterministically)
    3. skip what ``manifest.parquet`` already records as done with the same config hash (resumable)
    4. run the rest: a Ray Data actor pool (:class:`UpscaleWorker`, one image per call, one GPU per worker by
       default), or with ``tile_parallel`` one image at a time through the tile orchestrator's actors
    5. write one manifest row per input as results arrive; a bad input is an error row, never a stopped dataset

Inputs and outputs are plain paths: on a multi-node cluster they must be on storage every node mounts at the
same path (the KubeRay manifests in ``cluster/`` mount one volume at ``/data``).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_file
from .config import UpscaleConfig
from .errors import UserError
from .folderlock import hold_lock_file

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.parquet"
ATTEMPTS_DIR = ".cupscale-attempts"  # per-input attempt markers of the running batch (removed at the end)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif")
PARQUET_PATH_COLUMNS = ("path", "input_path", "input")  # the first one present names the input column
PARQUET_ROW_FIELDS = ("prompt", "negative_prompt", "regional_prompts", "seed")  # per-row config overrides
MAX_ATTEMPTS = 2  # Ray retries a task whose worker process died forever; an input that kills its worker twice
#                   (host OOM, a crashing codec) becomes a 'failed' row instead of taking down every restart
MAX_BLOCKS = 4096  # one image per block balances the pool (images take seconds to minutes each); past a few
#                    thousand blocks Ray Data's per-block bookkeeping costs more than the balance gains
MANIFEST_EVERY_S = 10.0  # rewrite the manifest at most this often while running (and always at the end)
JOURNAL_DIR = ".cupscale-journal"  # one append-only JSON-lines file per writing process: rows not yet in the parquet
LOCK_NAME = ".cupscale.lock"  # flock'ed by the batch that owns the output folder
# Hidden files are usually tool debris (macOS '._x.jpg', '.thumbnails/'): recorded, not upscaled.
HIDDEN_INPUT = "hidden file (a name in its path starts with '.'), skipped; rename it to upscale it"

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


# ---------------------------------------------------------------------------------------------------------------
# 1. Inputs
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Item:
    """One input of the batch and everything decided about it on the driver."""

    input_path: str  # absolute
    rel: str  # path relative to the input root (posix): the base of the output name
    overrides: dict = field(default_factory=dict)  # per-row config fields from a parquet
    error: str | None = None  # known bad before any work (bad parquet row)
    output_path: str | None = None  # relative to the output dir, set in step 2
    config_hash: str | None = None
    input_bytes: int | None = None
    input_mtime_ns: int | None = None

    def to_json(self) -> str:
        return json.dumps({"input_path": self.input_path, "output_path": self.output_path,
                           "overrides": self.overrides, "input_bytes": self.input_bytes,
                           "input_mtime_ns": self.input_mtime_ns})


def list_inputs(spec: str, output_dir: Path, produced: Iterable[str] = ()) -> list[Item]:
    """``--input``: a directory (recursive), a glob, one image file, or a parquet of paths (+ per-row fields).

    Our own outputs are never inputs: files under ``output_dir`` when it lies inside the input folder, and the
    files of ``produced`` (the manifest's outputs; this covers ``--output`` equal to the input folder).
    """
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".parquet" and path.is_file():
        return _parquet_inputs(path)
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
        root = path
    elif any(ch in spec for ch in "*?["):
        files = [Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file()]
        root = _glob_root(spec)
    elif path.is_file():
        files, root = [path], path.parent
    else:
        raise UserError(f"--input {spec}: no such directory, file or matching glob; check the path")
    out, root = output_dir.resolve(), _absolute(root)
    nested = out != root.resolve() and _inside(out, root.resolve())
    produced = set(produced)
    files = sorted(p for p in {_absolute(p) for p in files}
                   if not (nested and _inside(p.resolve(), out)) and str(p.resolve()) not in produced)
    if not files:
        raise UserError(f"--input {spec}: no images found (looked for {', '.join(IMAGE_SUFFIXES)}); "
                        "check the path or pass a glob such as 'photos/**/*.jpg'")
    items = [Item(str(p), _relative(p, root)) for p in files]
    for item in items if path.is_dir() else []:  # a glob names hidden files only on purpose; a folder finds debris too
        if any(part.startswith(".") for part in PurePosixPath(item.rel).parts):
            item.error = f"input {item.input_path}: {HIDDEN_INPUT}"
    return items


def _parquet_inputs(path: Path) -> list[Item]:
    try:
        rows = pq.read_table(path).to_pylist()
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"--input {path}: not a readable parquet file ({str(exc).splitlines()[0]}); fix the file") from None
    columns = set(rows[0]) if rows else set()
    column = next((c for c in PARQUET_PATH_COLUMNS if c in columns), None)
    if column is None:
        raise UserError(f"--input {path}: no path column; name the column of image paths one of "
                        f"{', '.join(PARQUET_PATH_COLUMNS)} (optional columns: {', '.join(PARQUET_ROW_FIELDS)})")
    base = path.resolve().parent  # relative paths in the parquet are relative to the parquet file
    items, seen = [], {}
    for number, row in enumerate(rows):
        raw = row[column]
        overrides = {k: row[k] for k in PARQUET_ROW_FIELDS if row.get(k) is not None}
        if isinstance(overrides.get("seed"), float) and overrides["seed"].is_integer():
            overrides["seed"] = int(overrides["seed"])  # pandas writes an int column with nulls as float64
        if overrides.get("regional_prompts"):
            overrides["regional_prompts"] = str(base / Path(overrides["regional_prompts"]).expanduser())
        if not isinstance(raw, str) or not raw.strip():
            items.append(Item(f"{path}#row{number}", "", overrides,
                              error=f"--input {path} row {number}: empty {column!r}; give an image path"))
            continue
        resolved = _absolute(base / Path(raw).expanduser())
        if str(resolved) in seen:
            items.append(Item(f"{resolved}#row{number}", "", overrides,
                              error=f"--input {path} row {number}: {raw} is listed again (first at row "
                                    f"{seen[str(resolved)]}); each input is upscaled once, use a copy of the file "
                                    "to upscale it with another prompt"))
            continue
        seen[str(resolved)] = number
        items.append(Item(str(resolved), "", overrides))
    if not items:
        raise UserError(f"--input {path}: the parquet has no rows")
    real = [Path(i.input_path) for i in items if i.error is None]
    root = Path(os.path.commonpath([str(p.parent) for p in real])) if real else base
    for item in items:
        if item.error is None:
            item.rel = _relative(Path(item.input_path), root)
    return items


def _absolute(path: Path) -> Path:
    """Absolute and normalised ('..' folded) without resolving symlinks: names follow what the user listed."""
    return Path(os.path.abspath(path))


def _glob_root(spec: str) -> Path:
    """The directory part of a glob before its first wildcard: 'photos/*/a*.jpg' -> 'photos'."""
    parts = []
    for part in Path(os.path.expanduser(spec)).parts:
        if any(ch in part for ch in "*?["):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:  # outside the root (a parquet path through a symlink): mirror its absolute path
        return path.as_posix().lstrip("/")


def _inside(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


# ---------------------------------------------------------------------------------------------------------------
# 2. Output names
# ---------------------------------------------------------------------------------------------------------------
_UNSAFE = re.compile(r"[^\w.+-]+")  # anything but letters, digits, '_', '.', '+', '-' (unicode letters kept)
MAX_COMPONENT = 120  # characters per path component, far below every filesystem's 255-byte limit


def safe_component(name: str) -> str:
    """One path component with no separators, no leading dots (no '..', no hidden files), bounded length."""
    cleaned = _UNSAFE.sub("_", name).lstrip(".")[:MAX_COMPONENT]
    return cleaned or "_"


def output_name(rel: str) -> PurePosixPath:
    """``sub/photo.jpg`` -> ``sub/photo.png``: the input's relative path, every component made safe."""
    path = PurePosixPath(rel)
    return PurePosixPath(*[safe_component(p) for p in path.parent.parts if p not in ("", "/")],
                         safe_component(path.stem) + ".png")


def _suffixed(name: PurePosixPath, input_path: str) -> PurePosixPath:
    """The collision fallback: the name plus a short hash of the input path (stable across runs)."""
    digest = hashlib.sha1(input_path.encode()).hexdigest()[:8]
    return name.with_name(f"{name.stem}-{digest}.png")


def assign_outputs(items: list[Item], output_dir: Path, previous: dict[str, dict]) -> None:
    """Set ``item.output_path`` for every runnable item; deterministic for a given input set and manifest.

    Rules, in order: (a) an input keeps the name the manifest recorded for it; (b) names recorded for other
    inputs, the inputs' own files and existing files that are not ours are taken; (c) the rest, sorted by their
    relative path, get ``name.png``, else ``name-<hash of the input path>.png``. Names are compared
    case-insensitively (macOS/Windows filesystems) and always resolve inside ``output_dir``.
    """
    root = output_dir.resolve()
    inputs = {str(Path(i.input_path).resolve()) for i in items if i.error is None}
    taken: dict[str, str] = {}  # lower-cased relative name -> input path that owns it

    def usable(rel: PurePosixPath, owner: str) -> bool:
        key = str(rel).lower()
        if taken.get(key, owner) != owner:
            return False
        target = root / rel
        if not _inside(target.resolve(), root) or target.resolve() == root:
            return False  # a symlinked subdirectory pointing elsewhere
        if str(target.resolve()) in inputs:
            return False  # never overwrite an input
        return not target.exists() or _is_ours(target, owner, previous, root)

    for input_path, row in sorted(previous.items()):  # (a)/(b): what the manifest already assigned
        name = row.get("output_path")
        if name and _is_relative_safe(name):
            taken.setdefault(name.lower(), input_path)
    for item in sorted((i for i in items if i.error is None), key=lambda i: (i.rel, i.input_path)):  # (c)
        recorded = previous.get(item.input_path, {}).get("output_path")
        candidates = [PurePosixPath(recorded)] if recorded and _is_relative_safe(recorded) else []
        base = output_name(item.rel)
        candidates += [base, _suffixed(base, item.input_path)]
        candidates += [base.with_name(f"{_suffixed(base, item.input_path).stem}-{n}.png") for n in range(2, 100)]
        chosen = next((c for c in candidates if usable(c, item.input_path)), None)
        if chosen is None:
            item.error = f"input {item.input_path}: no free output name under {root}; clean up the output dir"
            continue
        taken[str(chosen).lower()] = item.input_path
        item.output_path = str(chosen)


def _is_relative_safe(name: str) -> bool:
    path = PurePosixPath(name)
    return not path.is_absolute() and ".." not in path.parts and name.endswith(".png")


def _is_ours(target: Path, input_path: str, previous: dict[str, dict], root: Path) -> bool:
    """An existing file we may overwrite: the manifest's output for this input, or a PNG we wrote from it."""
    from .imageio import read_png_metadata

    recorded = previous.get(input_path, {}).get("output_path")
    if recorded and (root / recorded).resolve() == target.resolve():
        return True
    try:
        return read_png_metadata(target).get("source") == input_path  # written, but the manifest missed it
    except Exception:  # noqa: BLE001 - not a PNG of ours: it's someone else's file
        return False


# ---------------------------------------------------------------------------------------------------------------
# 3. Resume
# ---------------------------------------------------------------------------------------------------------------
def item_config(config: UpscaleConfig, overrides: dict) -> UpscaleConfig:
    """The config of one row: the batch config plus the row's own prompt / seed / regional prompts."""
    return config.replace(**overrides)


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
    from .imageio import read_png_metadata

    try:
        meta = read_png_metadata(output)
    except Exception:  # noqa: BLE001 - missing, truncated or not a PNG: not our finished output
        return False
    return meta.get("source") == item.input_path and meta.get("config_hash") == item.config_hash


def read_manifest(path: Path) -> dict[str, dict]:
    """``{input_path: row}`` of an existing manifest (empty if there is none), with the rows of its journal
    (a run that was killed) on top: they are newer than the parquet."""
    rows = {}
    if path.exists():
        try:
            rows = {row["input_path"]: row for row in pq.read_table(path).to_pylist()}
        except (OSError, pa.ArrowException, KeyError) as exc:
            raise UserError(f"manifest {path} is unreadable ({str(exc).splitlines()[0]}); move it away to start "
                            "over") from None
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
        """Every complete line, oldest file first (a line cut short by a kill is skipped: that row is redone)."""
        files = sorted(self.directory.glob("*.jsonl"), key=lambda p: p.stat().st_mtime_ns) if self.directory.is_dir() else []
        rows = []
        for path in files:
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
        return [row for row in rows if isinstance(row, dict) and isinstance(row.get("input_path"), str)]

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
                                 "({holder}); wait for it to finish or choose another --output", f", started {_now()}")
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)  # closing the descriptor releases the lock; the file stays (unlinking it would race)


# ---------------------------------------------------------------------------------------------------------------
# 4. One image (the same function for the Ray Data worker and the tile-parallel driver)
# ---------------------------------------------------------------------------------------------------------------
def base_row(item: dict) -> dict:
    """A manifest row for ``item`` before anything is known about it ('failed' until proven otherwise)."""
    return {"input_path": item["input_path"], "output_path": None, "status": STATUS_FAILED, "error": None,
            "input_bytes": item.get("input_bytes"), "input_mtime_ns": item.get("input_mtime_ns"),
            "worker": f"{socket.gethostname()}:{os.getpid()}"}


def config_fields(config: UpscaleConfig) -> dict:
    """The manifest's record of what a row ran with."""
    return {"prompt": config.prompt, "negative_prompt": config.negative_prompt, "seed": config.seed,
            "model": config.model, "regional_prompts": config.regional_prompts, "captioner": config.captioner,
            "config_hash": config.config_hash()}


def process_item(item: dict, config: UpscaleConfig, output_dir: Path, model=None, executor=None) -> dict:
    """Load, upscale, save one input; always returns its manifest row (errors become ``error``/``failed`` rows)."""
    from .imageio import load_input, save_png
    from .pipeline import upscale
    from .runner import run_metadata

    start = time.perf_counter()
    row = base_row(item)
    try:
        cfg = item_config(config, item["overrides"])
        row.update(config_fields(cfg))
        image, carried = load_input(item["input_path"], cfg.max_input_pixels, cfg.min_input_side)
        row.update(input_width=image.width, input_height=image.height)
        check_item_plan(item["input_path"], image.size, cfg)
        loaded = time.perf_counter()
        result = upscale(image, cfg, model=model, executor=executor, progress=False)
        upscaled = time.perf_counter()
        target = output_dir / item["output_path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        save_png(result, target, run_metadata(cfg, image.size, item["input_path"]), carried=carried)
        row.update(status=STATUS_OK, output_path=item["output_path"], output_width=result.width,
                   output_height=result.height, load_s=loaded - start, upscale_s=upscaled - loaded,
                   save_s=time.perf_counter() - upscaled)
    except UserError as exc:
        row.update(status=STATUS_ERROR, error=str(exc))
    except Exception as exc:  # noqa: BLE001 - any failure is this row's failure, never the dataset's
        first = (str(exc).strip().splitlines() or [""])[0]
        row.update(status=STATUS_FAILED, error=f"{type(exc).__name__}: {first}; rerun the batch to retry it")
        log.exception("input %s failed", item["input_path"])
    row.update(total_s=time.perf_counter() - start, finished_at=_now())
    return row


def check_item_plan(input_path: str, size: tuple[int, int], config: UpscaleConfig) -> None:
    """What `cupscale upscale` checks before any work, per input: a plan exists, the output is within
    max_output_pixels, and a regional-prompts file fits this input's stages."""
    from .captioner import check_prompt_file, read_prompt_file
    from .plan import describe_plan

    try:
        plan = describe_plan(size, config)
    except ValueError as exc:
        raise UserError(f"input {input_path}: {exc}; ask for a larger --size or a --scale") from None
    config.check_output_size(tuple(plan["output"]))
    if config.regional_prompts:
        check_prompt_file(config.regional_prompts, read_prompt_file(Path(config.regional_prompts)), plan["stages"])


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class AttemptLedger:
    """Counts attempts per input in files under the output dir, so a retried task sees that its worker died."""

    def __init__(self, output_dir: Path):
        self.directory = output_dir / ATTEMPTS_DIR

    def _path(self, input_path: str) -> Path:
        return self.directory / hashlib.sha1(input_path.encode()).hexdigest()

    def begin(self, input_path: str) -> int:
        """Record one more attempt; returns how many there have been, this one included."""
        path = self._path(input_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            count = int(path.read_text() or 0) + 1
        except (OSError, ValueError):
            count = 1
        path.write_text(str(count))
        return count

    def end(self, input_path: str) -> None:
        self._path(input_path).unlink(missing_ok=True)

    def clear(self) -> None:
        if self.directory.is_dir():
            for marker in self.directory.iterdir():
                marker.unlink(missing_ok=True)
            self.directory.rmdir()


class UpscaleWorker:
    """Ray Data callable class: loads the model once, then upscales one image per call (thin, like ``_MapWorker``)."""

    def __init__(self, config: UpscaleConfig, output_dir: str):
        from .worker import ModelWorker

        self.config, self.output_dir = config, Path(output_dir)
        self.model = ModelWorker.for_config(config)
        self.ledger = AttemptLedger(self.output_dir)
        self.journal = Journal(self.output_dir)

    def __repr__(self) -> str:
        return f"UpscaleWorker(pid={os.getpid()}, device={self.model.device})"

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for item in map(json.loads, batch.column("item").to_pylist()):
            if self.ledger.begin(item["input_path"]) > MAX_ATTEMPTS:
                row = base_row(item)
                row.update(error=f"the worker process died {MAX_ATTEMPTS} times on this input (out of memory? "
                                 "see the Ray logs); rerun the batch to retry it", finished_at=_now())
            else:
                row = process_item(item, self.config, self.output_dir, self.model)
            self.journal.append(row)  # durable before the driver hears of it: a killed driver loses nothing
            self.ledger.end(item["input_path"])
            rows.append(row)
        return pa.Table.from_pylist([{n: r.get(n) for n in MANIFEST_SCHEMA.names} for r in rows], schema=MANIFEST_SCHEMA)


# ---------------------------------------------------------------------------------------------------------------
# The batch
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class BatchSummary:
    manifest: Path
    total: int  # inputs of this run
    done: int  # upscaled now
    skipped: int  # already done (same config hash, same input)
    errors: int  # bad inputs found now
    failed: int  # broken runs (retried on the next run)
    planned: list[dict] = field(default_factory=list)  # per input: input, output, action (for --dry-run)
    rows: list[dict] = field(default_factory=list)  # the manifest rows written by this run
    dry_run: bool = False
    todo: list[Item] = field(default_factory=list, repr=False)  # inputs to upscale (set by planning)
    bad: list[Item] = field(default_factory=list, repr=False)  # inputs known bad before any work
    previous: dict[str, dict] = field(default_factory=dict, repr=False)  # the manifest as it was, by input path

    def line(self) -> str:
        if self.dry_run:
            todo = sum(p["action"] == "upscale" for p in self.planned)
            return (f"batch (dry run): {self.total} inputs: {todo} to upscale, {self.skipped} already done, "
                    f"{self.errors} known bad; nothing was written")
        return (f"batch: {self.total} inputs: {self.done} upscaled, {self.skipped} already done, {self.errors} bad "
                f"inputs, {self.failed} failed; manifest {self.manifest}")


def run_batch(input_spec: str, output_dir: str | os.PathLike, config: UpscaleConfig, *, cluster=None,
              workers: int | None = None, tile_parallel: bool = False, retry_errors: bool = False,
              progress: bool = True, dry_run: bool = False) -> BatchSummary:
    """Upscale every input of ``input_spec`` into ``output_dir`` and keep ``output_dir/manifest.parquet``.

    Args:
        input_spec (str): a directory (recursive), a glob, an image file, or a parquet with a ``path`` column and
            optional ``prompt`` / ``negative_prompt`` / ``regional_prompts`` / ``seed`` columns.
        output_dir (path): created if missing; outputs mirror the inputs' relative paths, as ``.png``.
        config (UpscaleConfig): the method's knobs for every image (per-row parquet fields override).
        cluster (ClusterOptions, *optional*): where to run; ``gpus_per_actor`` / ``cpus_per_actor`` size each
            worker (default: 1 GPU when the cluster has GPUs, else CPU only).
        workers (int, *optional*): Ray Data pool size (default: one per GPU, else 1).
        tile_parallel (bool): one image at a time, its views fanned out to ``cluster.actors`` denoiser actors
            (for 8K/16K, where one image needs the whole cluster).
        retry_errors (bool): redo inputs recorded as bad (``error`` rows); ``failed`` rows are always redone.
        dry_run (bool): plan only (names, what would be skipped); nothing runs or is written.
    """
    from .raycluster import ClusterOptions

    cluster = cluster or ClusterOptions()
    # 1. Check inputs.
    if workers is not None and workers < 1:
        raise UserError(f"--workers {workers}: use a positive number of image workers")
    if tile_parallel and workers is not None:
        raise UserError("--workers sets images in parallel; --tile-parallel runs one image at a time on all "
                        "denoisers: size it with --actors instead")
    if not tile_parallel and cluster.actors is not None:
        raise UserError("--actors sets the denoisers of one image and needs --tile-parallel; "
                        "for images in parallel use --workers N")
    output_dir = _prepare_output_dir(Path(output_dir).expanduser(), create=not dry_run)
    if dry_run:
        return _plan_batch(input_spec, output_dir, config, retry_errors, dry_run=True)
    with OutputLock(output_dir):  # before reading the manifest: what it says must not change under us
        summary = _plan_batch(input_spec, output_dir, config, retry_errors, dry_run=False)
        _run_planned(summary, config, output_dir, cluster, workers, tile_parallel, progress)
    return summary


def _plan_batch(input_spec: str, output_dir: Path, config: UpscaleConfig, retry_errors: bool,
                dry_run: bool) -> BatchSummary:
    """Steps 1-3: the inputs, their output names and configs, and what is left to do (``summary.todo``)."""
    manifest = output_dir / MANIFEST_NAME
    previous = read_manifest(manifest)
    produced = {str((output_dir / r["output_path"]).resolve()) for r in previous.values() if r.get("output_path")}
    items = list_inputs(input_spec, output_dir, produced)
    # 2. Output names, per-row configs and input fingerprints.
    assign_outputs(items, output_dir, previous)
    for item in items:
        if item.error is None:
            try:
                item.config_hash = item_config(config, item.overrides).config_hash()
            except UserError as exc:
                item.error = f"input {item.input_path}: {exc}"
        try:
            stat = os.stat(item.input_path)
            item.input_bytes, item.input_mtime_ns = stat.st_size, stat.st_mtime_ns
        except OSError:
            pass
    # 3. What is left to do.
    todo = [i for i in items if i.error is None and not is_done(i, previous.get(i.input_path), output_dir, retry_errors)]
    bad = [i for i in items if i.error is not None]
    summary = BatchSummary(manifest, len(items), 0, len(items) - len(todo) - len(bad), 0, 0)
    todo_paths = {i.input_path for i in todo}
    summary.planned = [{"input": i.input_path, "output": i.output_path, "action": "error" if i.error else
                        ("upscale" if i.input_path in todo_paths else "skip")} for i in items]
    if dry_run:
        summary.errors, summary.dry_run = len(bad), True
    summary.todo, summary.bad, summary.previous = todo, bad, previous
    return summary


def _run_planned(summary: BatchSummary, config: UpscaleConfig, output_dir: Path, cluster, workers: int | None,
                 tile_parallel: bool, progress: bool) -> None:
    """Steps 4-5: run what is left, recording every row durably as it finishes."""
    todo, bad = summary.todo, summary.bad
    writer, journal = ManifestWriter(summary.manifest, summary.previous), Journal(output_dir)
    writer.write()  # rows a killed run left in the journal go into the parquet first
    journal.clear()

    def on_row(row: dict) -> None:
        writer.add(row)
        summary.rows.append(row)
        summary.done += row["status"] == STATUS_OK
        summary.errors += row["status"] == STATUS_ERROR
        summary.failed += row["status"] == STATUS_FAILED
        if row["status"] != STATUS_OK:
            log.info("%s: %s", row["input_path"], row["error"])

    def record(row: dict) -> None:  # a row made here, on the driver: journal it too (workers journal their own)
        journal.append(row)
        on_row(row)

    for item in bad:
        row = base_row({"input_path": item.input_path, "input_bytes": item.input_bytes,
                        "input_mtime_ns": item.input_mtime_ns})
        row.update(status=STATUS_ERROR, error=item.error, finished_at=_now())
        record(row)
    # 4. Run: a Ray Data actor pool over images, or the tile orchestrator image by image.
    try:
        if todo and tile_parallel:
            _run_tile_parallel(todo, config, output_dir, cluster, record, progress)
        elif todo:
            _run_pool(todo, config, output_dir, cluster, workers, on_row, progress)
    finally:
        writer.rows.update((row["input_path"], row) for row in journal.rows())  # rows the driver never heard of
        writer.write()  # 5. whatever finished is recorded, also when the run is interrupted
        journal.clear()


def _prepare_output_dir(path: Path, create: bool) -> Path:
    if path.exists() and not path.is_dir():
        raise UserError(f"--output {path} is a file; give a directory for the upscaled images and the manifest")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"--output {path}: can't create it ({exc.strerror or exc}); choose another directory") from None
        if not os.access(path, os.W_OK | os.X_OK):
            raise UserError(f"--output {path} is not writable; choose another directory")
    return path


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="img", desc="batch")


def image_worker_gpus(config: UpscaleConfig, cluster, cluster_gpus: float) -> float:
    """GPU share of one image worker: the chosen one, else a whole GPU, or, with a captioner, what that image's
    own captioner pool leaves of it (both then share one GPU, as in `upscale`; placement.py)."""
    from .placement import model_worker_share

    return model_worker_share(config, cluster.gpus_per_actor, cluster_gpus, spread_over=min(cluster_gpus, 1))


def _run_pool(todo: list[Item], config: UpscaleConfig, output_dir: Path, cluster, workers: int | None,
              on_row: Callable[[dict], None], progress: bool) -> None:
    """Ray Data: paths -> UpscaleWorker actor pool (one image per call) -> manifest rows, as they finish."""
    from .placement import worker_count
    from .raycluster import connect, root_cause

    ray = connect(cluster)
    from ray.data import ActorPoolStrategy, DataContext

    resources = ray.cluster_resources()
    gpus = image_worker_gpus(config, cluster, resources.get("GPU", 0))
    cpus = cluster.cpus_per_actor
    deadline = time.monotonic() + cluster.start_timeout_s  # an autoscaling cluster may still be adding nodes
    while gpus > resources.get("GPU", 0) or cpus > resources.get("CPU", 0):
        if time.monotonic() > deadline:
            raise UserError(f"one batch worker needs {gpus:g} GPU and {cpus:g} CPU but the cluster has "
                            f"{resources.get('GPU', 0):g} GPU and {resources.get('CPU', 0):g} CPU after "
                            f"{cluster.start_timeout_s:g} s; lower --gpus-per-actor/--cpus-per-actor "
                            "(--gpus-per-actor 0 runs on CPU) or raise --start-timeout")
        time.sleep(1.0)
        resources = ray.cluster_resources()
    count = worker_count(resources.get("GPU", 0), gpus, workers)
    fits = min(int(resources.get("GPU", 0) // gpus) if gpus else count, int(resources.get("CPU", 0) // cpus) if cpus else count)
    # All workers fit: a fixed pool. Otherwise start what fits and let the pool grow as an autoscaler adds nodes.
    compute = ActorPoolStrategy(size=count) if fits >= count else ActorPoolStrategy(min_size=max(1, fits), max_size=count)
    context = DataContext.get_current()
    context.enable_progress_bars = False  # one bar (ours) counting images, not Ray Data's per-operator bars
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "bars disabled": we know
    if not log.isEnabledFor(logging.INFO):
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    AttemptLedger(output_dir).clear()
    log.info("batch: %d images on %d workers (%g GPU, %g CPU each)", len(todo), count, gpus, cpus)
    dataset = ray.data.from_items([{"item": i.to_json()} for i in todo], override_num_blocks=min(len(todo), MAX_BLOCKS))
    dataset = dataset.map_batches(UpscaleWorker, fn_constructor_args=(config, str(output_dir)), batch_size=1,
                                  batch_format="pyarrow", compute=compute, num_cpus=cpus, num_gpus=gpus)
    bar = _progress(len(todo), progress)
    try:
        for row in dataset.iter_rows():
            on_row(dict(row))
            bar.update(1)
    except ray.exceptions.RayError as exc:
        cause = root_cause(exc).removeprefix(f"{UserError.__module__}.{UserError.__name__}: ")
        raise UserError(f"batch workers failed: {cause}; finished images are in the manifest, rerun the same "
                        "command to resume") from None
    finally:
        bar.close()
    AttemptLedger(output_dir).clear()


def _run_tile_parallel(todo: list[Item], config: UpscaleConfig, output_dir: Path, cluster,
                       on_row: Callable[[dict], None], progress: bool) -> None:
    """One image at a time on this driver (which holds no weights); every forward pass of each image goes to one
    shared pool of model-worker actors."""
    from .orchestrator import make_executor

    executor = make_executor(config, cluster)
    model = None
    if executor is None:  # actors=0: the in-process reference, its model loaded once for every image
        from .worker import ModelWorker

        model = ModelWorker.for_config(config)
    else:
        executor.keep_pool = True  # one pool serves every image of the batch
    bar = _progress(len(todo), progress)
    try:
        for item in todo:
            on_row(process_item(json.loads(item.to_json()), config, output_dir, model, executor))
            bar.update(1)
    finally:
        bar.close()
        if executor is not None:
            executor.pool.shutdown()


def summarize_errors(rows: Iterable[dict], limit: int = 5) -> list[str]:
    """The first few error lines of a manifest, for the CLI's closing report."""
    bad = [r for r in rows if r.get("status") != STATUS_OK]
    lines = [f"  {r['status']}: {r['error']}" for r in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more (see the manifest's 'error' column)")
    return lines
