"""docs/layout.md names every module: each ``cupscale_dist/**/*.py`` and ``actors/*.py`` is a word of its folder's
entry in the page's layout block (a module added without a line there fails here, naming it)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYOUT = ROOT / "docs" / "layout.md"
# An entry of the layout block starts at a folder name at the margin or indented by two ("cupscale_dist/",
# "  models/"); the deeper-indented lines below it continue it.
ENTRY = re.compile(r"^ {0,2}([\w.]+/)(?:\s|$)")


def layout_entries(text: str) -> dict[str, str]:
    """The layout block's entries: {"cupscale_dist/": ..., "models/": ..., "actors/": ...} -> their whole text."""
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    entries: dict[str, list[str]] = {}
    current = None
    for line in block.splitlines():
        match = ENTRY.match(line)
        if match:
            current = match.group(1)
            entries.setdefault(current, [])
        if current is not None:
            entries[current].append(line)
    return {name: "\n".join(lines) for name, lines in entries.items()}


def modules() -> list[Path]:
    """Every module of the package and the actor shells, relative to the repository root (``__init__``/``__main__``
    are their package's own name)."""
    found = [*(ROOT / "cupscale_dist").rglob("*.py"), *(ROOT / "actors").glob("*.py")]
    return sorted(p.relative_to(ROOT) for p in found if not p.name.startswith("__"))


def entry_and_words(module: Path) -> tuple[str, list[str]]:
    """The entry that must name ``module`` and the words it must hold: the module's name, and the folders between
    (``models/backbones/flux.py``: the ``models/`` entry, with ``backbones/`` and ``flux``)."""
    parts = module.with_suffix("").parts
    if parts[0] == "actors":
        return "actors/", [parts[1]]
    inner = parts[1:]  # below cupscale_dist/
    if len(inner) == 1:
        return "cupscale_dist/", [inner[0]]
    return inner[0] + "/", [f"{folder}/" for folder in inner[1:-1]] + [inner[-1]]


def is_named(word: str, text: str) -> bool:
    if word.endswith("/"):
        return re.search(rf"(?<![\w/]){re.escape(word)}", text) is not None
    return re.search(rf"(?<![\w/]){re.escape(word)}(?:\.py)?(?!\w)", text) is not None


def test_every_module_is_named_in_layout_md():
    entries = layout_entries(LAYOUT.read_text(encoding="utf-8"))
    assert {"cupscale_dist/", "actors/", "models/", "method/"} <= set(entries), sorted(entries)
    missing = []
    for module in modules():
        entry, words = entry_and_words(module)
        text = entries.get(entry, "")
        absent = [w for w in words if not is_named(w, text)]
        if absent:
            missing.append(f"{module} (no {', '.join(absent)} in the {entry} entry)")
    assert not missing, "docs/layout.md's layout block does not name: " + "; ".join(missing)


def test_the_check_sees_a_missing_name():
    """The check itself: a module dropped from its entry is reported, a nested one needs its folder too."""
    entries = layout_entries("## Layout\n\n```\ncupscale_dist/    config\n  models/         hub, backbones/ (flux)\n"
                             "actors/           worker\n```\n")
    assert is_named("config", entries["cupscale_dist/"]) and not is_named("plan", entries["cupscale_dist/"])
    assert entry_and_words(Path("cupscale_dist/models/backbones/flux.py")) == ("models/", ["backbones/", "flux"])
    assert is_named("backbones/", entries["models/"]) and is_named("flux", entries["models/"])
    assert not is_named("flux", "flux_header") and not is_named("header", "flux_header")
    assert is_named("train", "training script (train.py)")
