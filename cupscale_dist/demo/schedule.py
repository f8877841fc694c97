"""The learning-rate schedule every phase of the demo model's training uses."""

from __future__ import annotations

import math


def cosine_lr(step: int, steps: int, peak: float, warmup: int = 100, floor: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``floor`` times the peak."""
    warm = min(1.0, (step + 1) / warmup)
    return peak * warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * step / max(1, steps))))
