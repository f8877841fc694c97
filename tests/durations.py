#!/usr/bin/env python
"""Rewrite tests/durations.json (each test file's seconds, which tests/conftest.py runs heaviest first) from the
JUnit XML of a full run::

    python -m pytest -q --junitxml=/tmp/junit.xml && python tests/durations.py /tmp/junit.xml

and, from a run with ``CUPSCALE_TEST_CPU=DIR`` (tests/conftest.py), each file's CPU and wall seconds, heaviest
first, as one JSON object (it writes nothing)::

    CUPSCALE_TEST_CPU=/tmp/cpu python -m pytest -q && python tests/durations.py --cpu /tmp/cpu
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


def file_cpu(folder: str) -> dict:
    """{"total": {cpu_s, wall_s}, "files": {path: {cpu_s, wall_s, tests}}} from the per-test lines in ``folder``."""
    files: dict[str, dict] = defaultdict(lambda: {"cpu_s": 0.0, "wall_s": 0.0, "tests": 0})
    for lines in Path(folder).glob("*.jsonl"):
        for line in lines.read_text().splitlines():
            row = json.loads(line)
            entry = files[row["test"].split("::")[0]]
            entry["cpu_s"] += row["cpu_s"]
            entry["wall_s"] += row["wall_s"]
            entry["tests"] += 1
    ranked = sorted(files.items(), key=lambda kv: -kv[1]["cpu_s"])
    rounded = {path: {k: round(v, 1) for k, v in entry.items()} for path, entry in ranked}
    total = {k: round(sum(e[k] for e in files.values()), 1) for k in ("cpu_s", "wall_s")}
    return {"total": total, "files": rounded}


if __name__ == "__main__":
    if sys.argv[1] == "--cpu":
        print(json.dumps(file_cpu(sys.argv[2]), indent=1))
        raise SystemExit
    out = Path(__file__).with_name("durations.json")
    out.write_text(json.dumps(file_seconds(sys.argv[1]), indent=1) + "\n")
    print(f"wrote {out}")
