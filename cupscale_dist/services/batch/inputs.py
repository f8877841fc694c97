"""Step 1 of a batch: the inputs of ``--input`` (a folder, a glob, one image, a parquet of paths and per-row
fields), each an :class:`Item` with its path relative to the input root."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq

from ...errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif")


PARQUET_PATH_COLUMNS = ("path", "input_path", "input")  # the first one present names the input column


PARQUET_ROW_FIELDS = ("prompt", "negative_prompt", "regional_prompts", "seed")  # per-row config overrides


MAX_SHOWN = 60  # characters of a bad cell quoted in its error row: enough to find it, never the whole cell


# Hidden files are usually tool debris (macOS '._x.jpg', '.thumbnails/'): recorded, not upscaled.
HIDDEN_INPUT = "hidden file (a name in its path starts with '.'), skipped; rename it to upscale it"


# A folder or glob is a boundary: a symlink in it that leads out (to ~/.ssh, another user's photos) is not followed,
# or `cupscale batch --input shared/` would read, upscale and copy into --output whatever a link points at (issue 35).
SYMLINK_OUT = ("a symlink to a file outside the input folder, skipped; copy the file into the folder, or list it in "
               "a parquet --input to upscale it")


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
    path = Path(os.path.expanduser(spec))
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
    out, root = output_dir.resolve(), absolute_path(root)
    nested = out != root.resolve() and is_inside(out, root.resolve())
    produced = set(produced)
    files = sorted(p for p in {absolute_path(p) for p in files}
                   if not (nested and is_inside(p.resolve(), out)) and str(p.resolve()) not in produced)
    if not files:
        raise UserError(f"--input {spec}: no images found (looked for {', '.join(IMAGE_SUFFIXES)}); "
                        "check the path or pass a glob such as 'photos/**/*.jpg'")
    items = [Item(str(p), _relative(p, root)) for p in files]
    for item in items if path.is_dir() else []:  # a glob names hidden files only on purpose; a folder finds debris too
        if any(part.startswith(".") for part in PurePosixPath(item.rel).parts):
            item.error = f"input {item.input_path}: {HIDDEN_INPUT}"
    real_root = root.resolve()  # the folder itself may be a link: what it leads to is the boundary
    for item in items if not path.is_file() else []:  # one file named on its own is the user's explicit choice
        if item.error is None and not is_inside(Path(item.input_path).resolve(), real_root):
            item.error = f"input {item.input_path}: {SYMLINK_OUT}"
    return items


def _parquet_inputs(path: Path) -> list[Item]:
    try:
        rows = pq.read_table(path).to_pylist()
    except (OSError, pa.ArrowException) as exc:
        reason = str(exc).splitlines()[0]
        raise UserError(f"--input {path}: not a readable parquet file ({reason}); fix the file") from None
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
        problem = cell_problem(column, raw) or cell_problem("regional_prompts", overrides.get("regional_prompts"))
        if problem:  # this row is an error row; the others still run
            items.append(Item(f"{path}#row{number}", "", overrides, error=f"--input {path} row {number}: {problem}"))
            continue
        if overrides.get("regional_prompts"):
            overrides["regional_prompts"] = str(base / os.path.expanduser(overrides["regional_prompts"]))
        resolved = absolute_path(base / os.path.expanduser(raw))  # os.path's: an unknown ~user stays as written
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


def cell_problem(column: str, value: object) -> str | None:
    """What is wrong with a parquet cell that names a file (an image path, a regional-prompts file), or None; the
    other per-row fields are typed by the config (a wrong type there is that row's error too)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None if column == "regional_prompts" else f"empty {column!r}; give an image path"  # optional / not
    if not isinstance(value, str):
        shown = repr(value)[:MAX_SHOWN]
        return f"{column!r} is {shown} (of type {type(value).__name__}), not a file path; give a path as text"
    if "\0" in value:
        return f"{column!r} {value[:MAX_SHOWN]!r} contains a NUL byte, which no file name can; fix the path"
    return None


def absolute_path(path: Path) -> Path:
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


def is_inside(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents
