"""Regional semantic prior (method.md step 6): one prompt per view, from a captioner or a file.

Backends behind one interface (:class:`Prompter`): ``none`` (regional prompt = global prompt), a JSON file given
with ``--regional-prompts`` (the format ``cupscale caption --tiles`` prints), and the vision-language captioners
``vllm`` / ``transformers`` of :mod:`cupscale_dist.vlm`.

File format::

    {"prompt": "global caption",
     "stages": [{"stage": 0, "size": [W, H], "views": [{"box": [left, top, right, bottom], "prompt": "..."}, ...]}]}

A stage missing from the file uses the global prompt for all its views.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from .errors import UserError


class Prompter(Protocol):
    def global_caption(self, image: Image.Image) -> str: ...

    def regional_prompts(self, stage: int, image: Image.Image, boxes: np.ndarray, global_prompt: str) -> list[str]: ...

    def close(self) -> None: ...


def pixel_boxes(views: np.ndarray, vae_scale_factor: int) -> np.ndarray:
    """Latent views (top, left, bottom, right) -> pixel boxes (left, top, right, bottom), PIL's crop order."""
    return (views[:, [1, 0, 3, 2]] * vae_scale_factor).astype(np.int64)


class NoCaptioner:
    """Regional prompt = global prompt; no global caption (an empty prompt stays empty)."""

    def global_caption(self, image: Image.Image) -> str:
        return ""

    def regional_prompts(self, stage: int, image: Image.Image, boxes: np.ndarray, global_prompt: str) -> list[str]:
        return [global_prompt] * len(boxes)

    def close(self) -> None:
        pass


class FilePrompts(NoCaptioner):
    """Per-view prompts given by hand (``--regional-prompts FILE.json``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.data = read_prompt_file(self.path)

    def global_caption(self, image: Image.Image) -> str:
        return self.data.get("prompt", "")

    def regional_prompts(self, stage: int, image: Image.Image, boxes: np.ndarray, global_prompt: str) -> list[str]:
        entry = next((s for s in self.data.get("stages", []) if s.get("stage") == stage), None)
        if entry is None:
            return [global_prompt] * len(boxes)
        views = entry["views"]
        check_view_count(self.path, stage, len(views), len(boxes))
        return [v["prompt"] or global_prompt for v in views]


def read_prompt_file(path: Path) -> dict:
    """Read the regional-prompts JSON and check its schema (module docstring); every problem is one UserError."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"--regional-prompts {path}: no such file; check the path") from None
    except RecursionError:  # json recurses once per nesting level
        raise UserError(f"--regional-prompts {path}: nested too deeply to be a prompts file; write it with "
                        "`cupscale caption --tiles`") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"--regional-prompts {path}: not valid JSON ({exc}); fix the file") from None
    problem = _schema_problem(data)
    if problem:
        raise UserError(f"--regional-prompts {path}: {problem}; expected {{'prompt': str, 'stages': [{{'stage': "
                        "k, 'views': [{'box': [l, t, r, b], 'prompt': str}]}]} (write it with `cupscale caption "
                        "--tiles`)")
    return data


def _schema_problem(data) -> str | None:
    """The first place where ``data`` departs from the file format, named by its JSON path; None if it fits."""
    problem = _mapping_problem(data, "the file", {"prompt": str, "stages": list})
    if problem:
        return problem
    seen: set[int] = set()
    for s, stage in enumerate(data.get("stages", [])):
        where = f"stages[{s}]"
        problem = (_mapping_problem(stage, where, {"stage": int, "size": list, "views": list}, required=("stage", "views"))
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
        return f"{where} has unknown key(s) {', '.join(map(repr, unknown))}"
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


def check_prompt_file(path, data: dict, stages: list[dict]) -> None:
    """The file against this run's plan (``describe_plan``'s stages): every stage exists, with its size and views."""
    for entry in data.get("stages", []):
        stage = entry["stage"]
        if stage >= len(stages):
            raise UserError(f"--regional-prompts {path}: stage {stage} does not exist, this run has {len(stages)} "
                            f"stage(s) (0..{len(stages) - 1}); regenerate it with `cupscale caption --tiles` using "
                            "the same scale/size")
        planned = stages[stage]
        if entry.get("size") not in (None, planned["size"]):
            raise UserError(f"--regional-prompts {path}: stage {stage} is {entry['size'][0]}x{entry['size'][1]} in "
                            f"the file but {planned['size'][0]}x{planned['size'][1]} in this run; regenerate it with "
                            "`cupscale caption --tiles` using the same scale/size")
        check_view_count(path, stage, len(entry["views"]), planned["views_per_step"])


def check_view_count(path, stage: int, listed: int, expected: int) -> None:
    if listed != expected:
        raise UserError(f"--regional-prompts {path}: stage {stage} lists {listed} views but this run has {expected}; "
                        "regenerate it with `cupscale caption --tiles` using the same tile/stride/scale")


class VLMPrompter:
    """A vision-language captioner (vLLM actor pool or transformers) describing each view's crop."""

    def __init__(self, config, count_tokens=None, beside_workers: bool = True, start_timeout_s: float | None = None):
        from .vlm import VLMCaptioner, count_clip_tokens

        self.captioner = VLMCaptioner(
            config.captioner, config.captioner_model, pool_size=config.captioner_actors,
            gpus_per_actor=config.captioner_gpus, beside_workers=beside_workers, placement_timeout_s=start_timeout_s,
            max_new_tokens=config.caption_max_new_tokens, token_budget=config.caption_token_budget,
            instruction=config.caption_instruction, region_context=config.caption_region_context,
            timeout_s=config.caption_timeout_s, dtype=config.captioner_dtype,
            count_tokens=count_tokens or count_clip_tokens)

    def global_caption(self, image: Image.Image) -> str:
        return self.captioner.describe_image(image)

    def regional_prompts(self, stage: int, image: Image.Image, boxes: np.ndarray, global_prompt: str) -> list[str]:
        return self.captioner.describe_regions(image, [tuple(map(int, b)) for b in boxes], global_prompt)

    def close(self) -> None:
        self.captioner.close()


def make_prompter(config, count_tokens=None, beside_workers: bool = True, start_timeout_s: float | None = None) -> Prompter:
    """The prompter the config asks for; a prompts file takes precedence over the captioner.

    ``count_tokens`` (text -> content tokens of the diffusion model's text encoder) fits captions to 77 tokens.
    ``beside_workers``: model workers share the GPUs (the captioner takes a part of a GPU, not a whole one);
    ``start_timeout_s``: how long the captioner pool may wait to be placed.
    """
    if config.regional_prompts:
        return FilePrompts(config.regional_prompts)
    if config.captioner == "none":
        return NoCaptioner()
    return VLMPrompter(config, count_tokens, beside_workers, start_timeout_s)
