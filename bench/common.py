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


def random_model(model_class, config: dict, device: str, dtype, seed: int):
    """``model_class(**config)`` with random weights (seeded), built directly on ``device`` in ``dtype``; torch's
    default dtype is put back."""
    import torch

    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return model_class(**config).eval()
    finally:
        torch.set_default_dtype(default)


def regional_rates(backbone, windows, rects, base, allowed, bare, use_stock, use_regional, device: str,
                   warmup: int, repeats: int) -> dict[str, float]:
    """Seconds per view (median of ``repeats`` after ``warmup`` rounds) of ``bare()`` (a diffusers forward with the
    stock processors, which ``use_stock()`` installs and ``use_regional()`` takes out again, outside the timed
    region) and of ``predict_views`` on ``windows`` for three stage contexts: ``plain`` (``base``: lambda 1, nothing
    screened), ``masks`` (``allowed`` screens tokens) and ``mix`` (lambda 0.5), round-robin so drift hits every
    case alike. The GPU acceptance rows of FLUX.1 (flux_cost) and Z-Image (gpu.py) both come from here."""
    import dataclasses
    import statistics
    import time

    import torch

    from cupscale_dist.method.step import predict_views

    views = len(windows)
    cases = {"plain": base, "masks": dataclasses.replace(base, token_allowed=allowed),
             "mix": dataclasses.replace(base, lambda_global=0.5)}
    runs = {"bare": bare, **{name: (lambda c=context: predict_views(backbone, windows, 700.0, 1.0, c,
                                                                    list(range(views)), rects))
                             for name, context in cases.items()}}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for round_ in range(warmup + repeats):
            for name, run in runs.items():
                if name == "bare":
                    use_stock()
                sync()
                start = time.perf_counter()
                run()
                sync()
                if round_ >= warmup:
                    times[name].append(time.perf_counter() - start)
                if name == "bare":
                    use_regional()
    return {name: statistics.median(values) / views for name, values in times.items()}
