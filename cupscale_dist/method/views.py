"""Views: the overlapping latent windows of method.md step 5, as one int array.

A view is a row ``(top, left, bottom, right)`` in latent pixels. Views are listed row-major; the last window of
each row/column is clamped to the border so every latent pixel is covered.
"""

from __future__ import annotations

import numpy as np


def window_starts(length: int, tile_latent: int, stride_latent: int) -> np.ndarray:
    """Start offsets along one axis: every ``stride_latent``, the last one clamped so the window ends at the border."""
    tile = min(tile_latent, length)
    starts = list(range(0, length - tile + 1, stride_latent))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return np.asarray(starts, dtype=np.int64)


def make_views(height: int, width: int, tile_latent: int, stride_latent: int) -> np.ndarray:
    """All views of a ``height`` x ``width`` latent, shape (N, 4) int64 ``(top, left, bottom, right)``; the knobs
    ``tile``/``stride`` are these, in latent px."""
    tile_h, tile_w = min(tile_latent, height), min(tile_latent, width)
    tops = window_starts(height, tile_latent, stride_latent)
    lefts = window_starts(width, tile_latent, stride_latent)
    top, left = np.meshgrid(tops, lefts, indexing="ij")
    top, left = top.ravel(), left.ravel()
    return np.stack([top, left, top + tile_h, left + tile_w], axis=1)


def jitter_views(views: np.ndarray, height: int, width: int, jitter: int, rng: np.random.Generator) -> np.ndarray:
    """Shift every view by up to ``jitter`` latent px (method.md step 5, optional), keeping coverage.

    Views touching a border stay on it; interior views move independently. With ``2*jitter <= tile - stride``
    (checked by the config) neighbouring views still overlap or touch, so no pixel is left uncovered.
    """
    if jitter == 0:
        return views
    shift = rng.integers(-jitter, jitter + 1, size=(len(views), 2))
    out = views.copy()
    for axis, (lo, hi, length) in enumerate([(0, 2, height), (1, 3, width)]):
        size = views[:, hi] - views[:, lo]
        pinned = (views[:, lo] == 0) | (views[:, hi] == length)
        start = np.where(pinned, views[:, lo], np.clip(views[:, lo] + shift[:, axis], 0, length - size))
        out[:, lo], out[:, hi] = start, start + size
    return out


def step_views(views: np.ndarray, height: int, width: int, jitter: int, seed: int, stage: int, step: int) -> np.ndarray:
    """The views of one denoising step: jittered from (seed, stage, step) alone, so the driver's loop, every part
    owner and a resumed run draw the same shifts."""
    return jitter_views(views, height, width, jitter, np.random.default_rng([seed, stage, step]))


def coverage(views: np.ndarray, height: int, width: int) -> np.ndarray:
    """How many views cover each latent pixel, (height, width) int."""
    count = np.zeros((height, width), dtype=np.int64)
    for top, left, bottom, right in views:
        count[top:bottom, left:right] += 1
    return count


def view_batches(num_views: int, batch_size: int) -> list[range]:
    """Fixed batches of view indices: the same split for the reference and every actor count (same bytes)."""
    return [range(i, min(i + batch_size, num_views)) for i in range(0, num_views, batch_size)]
