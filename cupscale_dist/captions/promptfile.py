"""The regional-prompts file (``--regional-prompts FILE.json``, what ``cupscale caption --tiles`` prints): its schema,
read and checked before any model loads, and checked against a run's plan.

File format::

    {"prompt": "global caption",
     "stages": [{"stage": 0, "size": [W, H], "views": [{"box": [left, top, right, bottom], "prompt": "..."}, ...]}]}

A stage missing from the file uses the global prompt for all its views.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError, shown
from ..files.userfile import named, read_capped

# A 16K run's file (about 1,300 views at the default tile/stride, one ~75-token caption each) is under 1 MB; 16 MiB
# leaves room for denser views and bounds what a wrong path (/dev/zero, a video) costs before it is refused.
MAX_PROMPT_FILE_BYTES = 16 << 20


def read_prompt_file(path: Path) -> dict:
    """Read the regional-prompts JSON and check its schema (module docstring); every problem is one UserError."""
    what = named(f"--regional-prompts {path}")
    try:
        data = json.loads(read_capped(path, MAX_PROMPT_FILE_BYTES, f"--regional-prompts {path}",
                                      "pass the JSON `cupscale caption --tiles` writes").decode("utf-8"))
    except FileNotFoundError:
        raise UserError(f"{what}: no such file; check the path") from None
    except RecursionError:  # json recurses once per nesting level
        raise UserError(f"{what}: nested too deeply to be a prompts file; write it with "
                        "`cupscale caption --tiles`") from None
    except (OSError, ValueError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:60]
        raise UserError(f"{what}: not valid JSON ({reason}); fix the file") from None
    problem = _schema_problem(data)
    if problem:
        raise UserError(f"{what}: {problem}; expected {{'prompt', 'stages': [{{'stage', 'size', 'views': "
                        "[{'box', 'prompt'}]}]} (write it with `cupscale caption --tiles`)")
    return data


def _schema_problem(data) -> str | None:
    """The first place where ``data`` departs from the file format, named by its JSON path; None if it fits."""
    problem = _mapping_problem(data, "the file", {"prompt": str, "stages": list})
    if problem:
        return problem
    seen: set[int] = set()
    for s, stage in enumerate(data.get("stages", [])):
        where = f"stages[{s}]"
        problem = (_mapping_problem(stage, where, {"stage": int, "size": list, "views": list},
                                    required=("stage", "views"))
                   or _ints_problem(stage.get("size"), f"{where}.size", 2))
        if problem:
            return problem
        if stage["stage"] < 0 or stage["stage"] in seen:
            return f"{where}.stage={stage['stage']} is {'negative' if stage['stage'] < 0 else 'listed twice'}"
        seen.add(stage["stage"])
        for v, view in enumerate(stage["views"]):
            problem = (_mapping_problem(view, f"{where}.views[{v}]", {"box": list, "prompt": str}, required=("prompt",))
                       or _ints_problem(view.get("box"), f"{where}.views[{v}].box", 4))
            if problem:
                return problem
    return None


def _mapping_problem(value, where: str, types: dict[str, type], required: tuple[str, ...] = ()) -> str | None:
    """``value`` is an object whose keys are known, present when required, and of their type (a bool is no int)."""
    if not isinstance(value, dict):
        return f"{where} must be an object, got {type(value).__name__}"
    unknown = sorted(set(value) - set(types))
    if unknown:
        more = f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""
        return f"{where} has unknown key(s) {shown(unknown[0], 30)}{more}"
    for key, kind in types.items():
        if key not in value:
            if key in required:
                return f"{where} has no {key!r}"
            continue
        if not isinstance(value[key], kind) or (kind is int and isinstance(value[key], bool)):
            return f"{where}.{key} must be {'a list' if kind is list else f'a {kind.__name__}'}, got {value[key]!r:.40}"
    return None


def _ints_problem(value, where: str, length: int) -> str | None:
    if value is None or (len(value) == length and all(type(v) is int for v in value)):
        return None
    return f"{where} must be {length} integers, got {value!r:.60}"


def check_prompt_file(path, data: dict, plan) -> None:
    """The file against this run's :class:`~cupscale_dist.plan.Plan`: every stage exists, with its size and views."""
    stages = plan.stages
    for entry in data.get("stages", []):
        stage = entry["stage"]
        if stage >= len(stages):
            raise UserError(f"{named(f'--regional-prompts {path}')}: stage {stage} does not exist, this run has "
                            f"{len(stages)} stage(s) (0..{len(stages) - 1}); regenerate it with "
                            "`cupscale caption --tiles` using the same scale/size")
        planned = stages[stage]
        if entry.get("size") not in (None, list(planned.size)):
            raise UserError(f"{named(f'--regional-prompts {path}')}: stage {stage} is "
                            f"{entry['size'][0]}x{entry['size'][1]} in the file but "
                            f"{planned.size[0]}x{planned.size[1]} in this run; regenerate it with "
                            "`cupscale caption --tiles` using the same scale/size")
        check_view_count(path, stage, len(entry["views"]), len(planned.views))


def check_view_count(path, stage: int, listed: int, expected: int) -> None:
    if listed != expected:
        raise UserError(f"{named(f'--regional-prompts {path}')}: stage {stage} lists {listed} views but this run "
                        f"has {expected}; regenerate it with `cupscale caption --tiles` using the same "
                        "tile/stride/scale")
