"""Full-reference and no-reference figures of one image: PSNR, SSIM, high-frequency detail, seam contrast at view
boundaries."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


# ---------------------------------------------------------------------------------------------------------------
# The figures (pure functions of uint8 arrays)
# ---------------------------------------------------------------------------------------------------------------
def as_float(image: Image.Image | np.ndarray) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio in dB for 8-bit images (inf when identical)."""
    mse = float(np.mean((as_float(a) - as_float(b)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def gaussian_blur(x: torch.Tensor, sigma: float, radius: int) -> torch.Tensor:
    """Separable Gaussian blur of (C, H, W) with reflect padding."""
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(x.dtype)
    c = x.shape[0]
    x = F.pad(x[None], (radius, radius, 0, 0), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    x = F.pad(x, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(x, kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)[0]


def to_chw(image) -> torch.Tensor:
    return torch.from_numpy(as_float(image)).permute(2, 0, 1)


def ssim(a, b) -> float:
    """Mean SSIM over RGB (Wang et al. 2004: K1 0.01, K2 0.03, Gaussian window 11, sigma 1.5, data range 255)."""
    x, y = to_chw(a), to_chw(b)
    blur = lambda t: gaussian_blur(t, SSIM_SIGMA, SSIM_WINDOW // 2)  # noqa: E731
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    score = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    pad = SSIM_WINDOW // 2  # as skimage: the border, where the window leaves the image, is left out
    return float(score[:, pad:-pad, pad:-pad].mean())


def luminance(image) -> np.ndarray:
    """ITU-R BT.601 luma of an RGB image, float64 (H, W)."""
    return as_float(image) @ np.array([0.299, 0.587, 0.114])


def high_frequency_energy(image) -> float:
    """Mean squared difference between the luma and its Gaussian blur (sigma :data:`DETAIL_SIGMA`)."""
    y = torch.from_numpy(luminance(image))[None]
    return float(((y - gaussian_blur(y, DETAIL_SIGMA, 3 * math.ceil(DETAIL_SIGMA))) ** 2).mean())


def boundary_contrast(image, columns: np.ndarray, rows: np.ndarray, period: int = 1) -> float:
    """Gradient energy across the lines x = column, y = row (+-:data:`SEAM_BAND` lines) over other lines in phase.

    The gradient across a vertical line at x is ``I[:, x] - I[:, x-1]``. A line's energy is the median along it: a
    seam runs the whole line, a photo's edges cross it at a few points. "Other lines" are the lines at multiples of
    ``period`` (the latent cell in output px) that are not boundaries: a VAE decoder leaves a faint pattern on its
    latent grid, and view boundaries always sit on that grid, so comparing with every line would count the grid.
    """
    y = luminance(image)
    gx = np.median(np.diff(y, axis=1) ** 2, axis=0) + SEAM_FLOOR
    gy = np.median(np.diff(y, axis=0) ** 2, axis=1) + SEAM_FLOOR

    def bands(length: int, lines) -> np.ndarray:
        mask = np.zeros(length, dtype=bool)  # gradient index i sits between pixel i and i+1: the line at i+1
        for line in lines:
            if 0 < line <= length:
                mask[max(0, line - 1 - SEAM_BAND) : line + SEAM_BAND] = True
        return mask

    def split(g: np.ndarray, lines: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        boundary = bands(len(g), lines)
        in_phase = bands(len(g), range(period, len(g) + 1, period)) & ~boundary
        return g[boundary], g[in_phase]

    (bx, ox), (by, oy) = split(gx, columns), split(gy, rows)
    on, off = np.concatenate([bx, by]), np.concatenate([ox, oy])
    if on.size == 0 or off.size == 0:
        return 1.0  # one view (no boundary), or boundaries on every grid line: nothing to compare
    return float(on.mean() / max(off.mean(), 1e-12))


def seam_score(image, reference, columns: np.ndarray, rows: np.ndarray, period: int = 1) -> float:
    """:func:`boundary_contrast` of ``image`` over the reference's (bicubic's upscale) on the same lines.

    A photo's own edges fall on a few boundary lines by chance (a 256 px crop has only a handful of lines), so the
    raw contrast scatters far from 1; dividing by bicubic's, which has the same content at the same resolution and
    no views, cancels that: 1 = the boundaries look as they do in bicubic's upscale, above 1 = seams. (Not the
    original's: a JPEG-born original carries its own 8 px block grid, on which every view boundary falls.)
    """
    return boundary_contrast(image, columns, rows, period) / boundary_contrast(reference, columns, rows, period)


SSIM_WINDOW, SSIM_SIGMA = 11, 1.5  # Wang et al. 2004, as skimage's gaussian_weights=True


DETAIL_SIGMA = 1.0  # px: detail = image minus its Gaussian blur at this sigma, the band a x2 bicubic resize loses


SEAM_FLOOR = 1.0  # grey levels^2 added to every line's energy: flat 8-bit areas have median 0 (no 0/0 ratios)


SEAM_BAND = 1  # lines each side of a boundary also counted: the VAE decoder spreads a latent seam over a few px
