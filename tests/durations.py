#!/usr/bin/env python
"""Rewrite tests/durations.json (each test file's seconds, which tests/conftest.py runs heaviest first) from the
JUnit XML of a full run::

    python -m pytest -q --junitxml=/tmp/junit.xml && python tests/durations.py /tmp/junit.xml
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path


def file_seconds(junit: str) -> dict[str, float]:
    seconds: dict[str, float] = defaultdict(float)
    for case in ET.parse(junit).iter("testcase"):
        module = case.get("classname", "")  # tests.models.test_flux or tests.models.test_flux.SomeClass
        parts = module.split(".")
        while parts and not parts[-1].startswith("test_"):
            parts.pop()
        if parts:
            seconds["/".join(parts) + ".py"] += float(case.get("time", 0))
    return {path: round(value, 1) for path, value in sorted(seconds.items(), key=lambda kv: -kv[1])}


if __name__ == "__main__":
    out = Path(__file__).with_name("durations.json")
    out.write_text(json.dumps(file_seconds(sys.argv[1]), indent=1) + "\n")
    print(f"wrote {out}")
