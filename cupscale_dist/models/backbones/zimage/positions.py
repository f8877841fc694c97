"""Z-Image's token positions and RoPE (method.md "Other backbones": positions), as pure functions.

diffusers' ``ZImageTransformer2DModel`` (0.42.1, ``patchify_and_embed``, ``RopeEmbedder``; docs/zimage-notes.md has
the line references) lays one sample out as ``[image patches; caption tokens]``:

* the caption is padded to a multiple of :data:`SEQ_MULTI_OF` (32) and takes first-axis positions ``1 .. padded``;
* every image patch takes first-axis position ``padded + 1`` and its (row, column) in patches on the other two axes;
  image pad patches (up to a multiple of 32) take (0, 0, 0), as do the caption's filler tokens here;
* RoPE per axis of ``d`` dims: frequencies ``theta ** (-arange(0, d, 2) / d)`` in float64, angles rounded to float32,
  ``polar(1, angle)`` as complex64. diffusers indexes a table of positions ``0 .. axes_lens[i] - 1`` (an IndexError
  past it: 512 patches = 8192 px for Z-Image-Turbo); :func:`rope_freqs` evaluates the formula at any position, equal
  bit for bit to the table inside it (tests/models/test_tiny_zimage.py), so a 16K stage's positions need no table.

A view's image patches sit at ``(caption + 1, top / 2 + row, left / 2 + col)`` with ``positions: global`` (its offset in
the stage latent; an odd latent offset is a half-patch position, which the formula takes) or from 0 with ``local``.
"""

from __future__ import annotations

import numpy as np
import torch

SEQ_MULTI_OF = 32  # diffusers' transformer_z_image.SEQ_MULTI_OF: captions and images are padded to multiples of it
PATCH = 2  # Z-Image's 2x2 latent patches (all_patch_size (2,), all_f_patch_size (1,))


def padded_length(tokens: int) -> int:
    """The length a caption (or an image's patch sequence) of ``tokens`` is padded to inside the transformer."""
    return tokens + (-tokens) % SEQ_MULTI_OF


def rope_freqs(ids: torch.Tensor, axes_dims, theta: float) -> torch.Tensor:
    """(N, sum(axes_dims) / 2) complex64 rotations of positions ``ids`` (N, len(axes_dims)), any values (past a
    table, or real-valued): RopeEmbedder's formula without its table."""
    parts = []
    for axis, dim in enumerate(axes_dims):
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        angles = torch.outer(ids[:, axis].to(torch.float64).cpu(), freqs).float()
        parts.append(torch.polar(torch.ones_like(angles), angles).to(torch.complex64))
    return torch.cat(parts, dim=-1).to(ids.device)


def caption_ids(length: int) -> torch.Tensor:
    """(length, 3) ids of a caption stream of ``length`` tokens (pad and filler included): (1 .. length, 0, 0)."""
    ids = torch.zeros(length, 3)
    ids[:, 0] = torch.arange(1, length + 1)
    return ids


def view_image_ids(rects: np.ndarray, caption_length: int, positions: str) -> torch.Tensor:
    """(V, padded(patches), 3) ids of each view's image patches, row-major, then the pad patches at (0, 0, 0).

    ``caption_length``: the stage's caption length (a multiple of 32), so every view's image is at first-axis position
    ``caption_length + 1``; 'global' adds the view's offset in the stage latent in patches, 'local' starts at 0.
    """
    rows = []
    for top, left, bottom, right in np.asarray(rects):
        height, width = (int(bottom) - int(top)) // PATCH, (int(right) - int(left)) // PATCH
        ids = torch.zeros(padded_length(height * width), 3)
        grid = ids[: height * width].view(height, width, 3)
        grid[..., 0] = caption_length + 1
        grid[..., 1] = torch.arange(height)[:, None]
        grid[..., 2] = torch.arange(width)[None, :]
        if positions == "global":
            grid[..., 1] += float(top) / PATCH
            grid[..., 2] += float(left) / PATCH
        rows.append(ids)
    return torch.stack(rows)


def stage_caption_length(lengths) -> int:
    """The one caption length of every view of a stage: the longest prompt the stage's views read, padded to 32 (so
    every view's image sits at the same first-axis position, whatever its own caption's length)."""
    return padded_length(max(int(n) for n in lengths))
