"""2-D discrete wavelet transform for the global structure prior (method.md step 3).

Haar runs in torch on any device (the prior is applied every step on the driver's latent); other wavelets go
through pywavelets in 'periodization' mode so each level halves the size exactly. Bands follow pywavelets'
order and signs: ``(LL, [(H, V, D) coarsest ... finest])``, so the two paths agree.
"""

from __future__ import annotations

import numpy as np
import torch

Highs = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def haar_dwt2(x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One orthonormal Haar level over the last two axes: LL and (H, V, D), pywavelets' conventions."""
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    return (a + b + c + d) / 2, ((a + b - c - d) / 2, (a - b + c - d) / 2, (a - b - c + d) / 2)


def haar_idwt2(ll: torch.Tensor, highs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`haar_dwt2` (exact up to rounding)."""
    h, v, d = highs
    out = ll.new_empty(*ll.shape[:-2], 2 * ll.shape[-2], 2 * ll.shape[-1])
    out[..., 0::2, 0::2] = (ll + h + v + d) / 2
    out[..., 0::2, 1::2] = (ll + h - v - d) / 2
    out[..., 1::2, 0::2] = (ll - h + v - d) / 2
    out[..., 1::2, 1::2] = (ll - h - v + d) / 2
    return out


def dwt2(x: torch.Tensor, wavelet: str = "haar", levels: int = 1) -> tuple[torch.Tensor, Highs]:
    """J-level 2-D DWT of the last two axes: ``(LL_J, [(H, V, D) of level J, ..., of level 1])``."""
    if x.shape[-1] % 2**levels or x.shape[-2] % 2**levels:
        raise ValueError(f"dwt2: size {tuple(x.shape[-2:])} is not divisible by 2**{levels}")
    if wavelet == "haar":
        highs: Highs = []
        for _ in range(levels):
            x, high = haar_dwt2(x)
            highs.insert(0, high)
        return x, highs
    import pywt

    coeffs = pywt.wavedec2(x.detach().cpu().double().numpy(), wavelet, mode="periodization", level=levels)
    as_torch = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(x.device, x.dtype)  # noqa: E731
    return as_torch(coeffs[0]), [tuple(as_torch(b) for b in band) for band in coeffs[1:]]


def idwt2(ll: torch.Tensor, highs: Highs, wavelet: str = "haar") -> torch.Tensor:
    """Inverse of :func:`dwt2`."""
    if wavelet == "haar":
        for high in highs:
            ll = haar_idwt2(ll, high)
        return ll
    import pywt

    as_np = lambda a: a.detach().cpu().double().numpy()  # noqa: E731
    coeffs = [as_np(ll)] + [tuple(as_np(b) for b in band) for band in highs]
    out = pywt.waverec2(coeffs, wavelet, mode="periodization")
    return torch.from_numpy(np.ascontiguousarray(out)).to(ll.device, ll.dtype)


def low_band(x: torch.Tensor, wavelet: str = "haar", levels: int = 1) -> torch.Tensor:
    """``LL_J(x)``: the low-frequency band that carries global layout and colour."""
    return dwt2(x, wavelet, levels)[0]


def replace_low_band(x: torch.Tensor, new_low: torch.Tensor, wavelet: str = "haar", levels: int = 1) -> torch.Tensor:
    """``IDWT(new_low, HF(x))``: keep x's high frequencies, swap in another low band."""
    _, highs = dwt2(x, wavelet, levels)
    return idwt2(new_low, highs, wavelet)
