"""Helpers shared by the bench scripts: stderr logging, JSON-friendly rounding, machine load."""

from __future__ import annotations

import os
import sys


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def rounded(value, digits: int = 5):
    """Round floats to ``digits`` significant digits, recursively through dicts and lists."""
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    return value


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None
