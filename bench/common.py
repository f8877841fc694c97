"""Helpers shared by the bench scripts: stderr logging, JSON-friendly rounding, machine load, knob overrides."""

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


def add_set_option(parser, applies_to: str) -> None:
    """The CLI's ``--set KEY=VALUE`` (repeatable) on a bench script's parser; :func:`knob_overrides` reads it."""
    from cupscale_dist.cli.options import parse_set

    parser.add_argument("--set", dest="overrides", type=parse_set, action="append", default=[], metavar="KEY=VALUE",
                        help=f"a knob of {applies_to}, as the CLI's --set (e.g. --set model=DIR)")


def knob_overrides(args) -> dict:
    """``--set`` values typed as the CLI types them: {knob: value}."""
    from cupscale_dist.config import set_value

    return {key: set_value(key, text) for key, text in args.overrides}
