"""Z-Image's token positions and RoPE, written out as pure functions (issue 36, facts (a) and (b)).

``tests/models/test_tiny_zimage.py`` checks each function against diffusers' ``ZImageTransformer2DModel`` (0.42.1) so
that the Z-Image backbone can rely on them; docs/zimage-notes.md has the file/line references. The formula and the
padding live once, in :mod:`cupscale_dist.models.backbones.zimage.positions` (the backbone's); re-exported here.

* **Sequence layout** (``patchify_and_embed``, basic mode): the caption's tokens are padded to a multiple of
  :data:`SEQ_MULTI_OF` (32) and take first-axis positions ``1 .. padded`` (0 on the height and width axes); the image's
  patches all take first-axis position ``padded + 1`` and their (row, column) in patches on the other two axes,
  starting at 0. So the caption's padded length moves the image along the first axis: two views whose captions pad
  to different lengths sit at different positions.
* **RoPE** (``RopeEmbedder``): per axis of ``d`` dims, frequencies ``theta ** (-arange(0, d, 2) / d)`` (float64), angles
  ``position * frequency`` rounded to float32, ``polar(1, angle)`` as complex64; the axes concatenated. diffusers
  precomputes that table for positions ``0 .. axes_lens[i] - 1`` and indexes it with integer ids, so a position past
  the table raises an IndexError (on CUDA a device-side assert). :func:`rope_freqs` evaluates the same formula at any
  position (integer or not): equal, bit for bit, to the table inside it.
"""

from __future__ import annotations

import torch

from ..models.backbones.zimage.positions import SEQ_MULTI_OF, padded_length, rope_freqs

__all__ = ["SEQ_MULTI_OF", "padded_length", "rope_freqs", "image_first_position", "caption_position_ids",
           "image_position_ids", "rope_cos_sin", "FormulaRope"]


def image_first_position(caption_tokens: int) -> int:
    """The first-axis RoPE position of every image token, for a caption of ``caption_tokens`` real tokens."""
    return padded_length(caption_tokens) + 1


def caption_position_ids(caption_tokens: int) -> torch.Tensor:
    """(padded, 3) int32 ids of a caption's tokens, pad tokens included: (1 .. padded, 0, 0)."""
    ids = torch.zeros(padded_length(caption_tokens), 3, dtype=torch.int32)
    ids[:, 0] = torch.arange(1, padded_length(caption_tokens) + 1, dtype=torch.int32)
    return ids


def image_position_ids(caption_tokens: int, height: int, width: int, top: int = 0, left: int = 0) -> torch.Tensor:
    """(height * width, 3) int32 ids of an image of ``height`` x ``width`` patches, row-major: (caption's padded
    length + 1, top + row, left + column). ``top``/``left`` (patches) 0 is diffusers' own layout; a view's offset in
    the stage latent (in patches) gives its global positions. Pad patches (when height * width is not a multiple of
    32) are not included: diffusers gives them (0, 0, 0)."""
    rows = torch.arange(top, top + height, dtype=torch.int32)[:, None].expand(height, width)
    cols = torch.arange(left, left + width, dtype=torch.int32)[None, :].expand(height, width)
    first = torch.full((height, width), image_first_position(caption_tokens), dtype=torch.int32)
    return torch.stack([first, rows, cols], dim=-1).reshape(height * width, 3)


def rope_cos_sin(ids: torch.Tensor, axes_dims, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (N, sum(axes_dims) / 2) float32: the real and imaginary parts of :func:`rope_freqs` (Z-Image
    rotates interleaved pairs (x[2k], x[2k+1]) of each head by these angles)."""
    freqs = rope_freqs(ids, axes_dims, theta)
    return freqs.real.contiguous(), freqs.imag.contiguous()


class FormulaRope:
    """A drop-in for a ZImageTransformer2DModel's ``rope_embedder`` that evaluates :func:`rope_freqs` instead of
    indexing a table: positions past ``axes_lens`` get the same rotations the formula gives inside it (what the issue
    asks for at 16K; whether the model behaves well that far out is a question for the weights)."""

    def __init__(self, theta: float, axes_dims, axes_lens=None):
        self.theta, self.axes_dims, self.axes_lens = theta, list(axes_dims), axes_lens

    @classmethod
    def of(cls, transformer) -> "FormulaRope":
        rope = transformer.rope_embedder
        return cls(rope.theta, rope.axes_dims, rope.axes_lens)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return rope_freqs(ids, self.axes_dims, self.theta)
