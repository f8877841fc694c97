"""Step 2 of a batch: a safe output name for every input (no traversal, never an input, never someone else's file,
collisions resolved deterministically)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path, PurePosixPath

from .inputs import Item, is_inside

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
        if not is_inside(target.resolve(), root) or target.resolve() == root:
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
    from ...files.imageio import read_png_metadata

    recorded = previous.get(input_path, {}).get("output_path")
    if recorded and (root / recorded).resolve() == target.resolve():
        return True
    try:
        return read_png_metadata(target).get("source") == input_path  # written, but the manifest missed it
    except Exception:  # noqa: BLE001 - not a PNG of ours: it's someone else's file
        return False
