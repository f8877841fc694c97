"""The FID InceptionV3 (the TF graph pytorch-fid ports), built here and loaded from a local weights file only."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..models.weightfiles import plain_state_dict, refuse_code_archive

INCEPTION_SIZE = 299  # the FID InceptionV3's input side (TF graph inception-2015-12-05)


INCEPTION_FEATURES = 2048  # pool3 features: what FID and KID compare


INCEPTION_CLASSES = 1008  # the TF graph's classifier outputs: ImageNet's 1000 classes in 1008 slots


# --- the FID InceptionV3 -----------------------------------------------------------------------------------------
class ConvBN(nn.Module):
    """Conv without bias, batch norm (eps 1e-3 as in the TF graph), ReLU; `conv` / `bn` as the weights name them."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool_3x3(x):
    """The TF graph's pool branch: padded positions do not count in the average."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b..5d: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg pool -> 1x1."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(in_channels, 64, 1)
        self.branch5x5_1 = ConvBN(in_channels, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(in_channels, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(avg_pool_3x3(x))], 1)


class InceptionB(nn.Module):
    """Mixed_6a, halves the grid: 3x3 / 2 | 1x1 -> 3x3 -> 3x3 / 2 | max pool / 2."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = ConvBN(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    """Mixed_6b..6e, factorised 7x7: 1x1 | 1x7 -> 7x1 | (7x1 -> 1x7) twice | avg pool -> 1x1."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = ConvBN(in_channels, 192, 1)
        self.branch7x7_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x):
        dbl = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            dbl = conv(dbl)
        return torch.cat([self.branch1x1(x), self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))), dbl,
                          self.branch_pool(avg_pool_3x3(x))], 1)


class InceptionD(nn.Module):
    """Mixed_7a, halves the grid: 1x1 -> 3x3 / 2 | 1x1 -> 1x7 -> 7x1 -> 3x3 / 2 | max pool / 2."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(in_channels, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(in_channels, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """Mixed_7b / 7c, split 3x3s: 1x1 | 1x1 -> (1x3, 3x1) | 1x1 -> 3x3 -> (1x3, 3x1) | pool -> 1x1.

    The TF graph pools by average in Mixed_7b and by max in Mixed_7c (`max_pool`).
    """

    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(in_channels, 320, 1)
        self.branch3x3_1 = ConvBN(in_channels, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(in_channels, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg_pool_3x3(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl), self.branch_pool(pooled)], 1)


class FidInceptionV3(nn.Module):
    """uint8 images N x 3 x 299 x 299 -> (pool3 features N x 2048, logits without the fc bias N x 1008).

    Logits without bias are what Inception Score uses in torch-fidelity and torchmetrics ("logits_unbiased").
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(INCEPTION_FEATURES, INCEPTION_CLASSES)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dtype != torch.uint8 or images.shape[1:] != (3, INCEPTION_SIZE, INCEPTION_SIZE):
            raise ValueError(f"expected uint8 N x 3 x {INCEPTION_SIZE} x {INCEPTION_SIZE}, got {images.dtype} "
                             f"{tuple(images.shape)}")
        x = (images.float() - 128) / 128  # the TF graph's input scaling
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        features = x.mean(dim=(2, 3))
        return features, features @ self.fc.weight.T


def read_inception_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The FID Inception state dict at `path`, checked name by name and shape by shape against `FidInceptionV3`."""
    fix = "pass the FID Inception weights, pt_inception-2015-12-05-6726825d.pth (cupscale_dist/quality/distribution.py)"
    path = Path(path)
    if not path.exists():
        raise UserError(f"--inception {path}: no such file; {fix}")
    if not path.is_file():
        raise UserError(f"--inception {path}: is a directory, expected one weights file; {fix}")
    refuse_code_archive(path, f"--inception {path}")  # a TorchScript archive: refused by its entry names
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: nothing in it executes
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise UserError(f"--inception {path}: not a PyTorch weights file ({str(exc).splitlines()[0][:120]}); "
                        f"{fix}") from None
    if not isinstance(state_dict, dict):
        raise UserError(f"--inception {path}: holds a {type(state_dict).__name__}, not a state dict; {fix}")
    plain_state_dict(state_dict, f"--inception {path}", fix)  # names -> tensors only: .shape below is safe

    with torch.device("meta"):  # names and shapes only, no memory
        expected = {name: tuple(t.shape) for name, t in FidInceptionV3().state_dict().items()
                    if not name.endswith("num_batches_tracked")}  # a training counter, absent from some ports
    missing = sorted(set(expected) - set(state_dict))
    wrong = [f"{name} {tuple(state_dict[name].shape)} (expected {shape})" for name, shape in expected.items()
             if name in state_dict and tuple(state_dict[name].shape) != shape]
    if missing or wrong:
        problem = f"missing {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "") if missing \
            else f"shape of {wrong[0]}"
        raise UserError(f"--inception {path}: not the FID InceptionV3 ({problem}); {fix}")
    return {name: state_dict[name] for name in expected}


def load_fid_inception(path: str | Path, device: str | torch.device = "cpu") -> FidInceptionV3:
    """`FidInceptionV3` with the weights at `path`, in eval mode, on `device`."""
    network = FidInceptionV3()
    network.load_state_dict(read_inception_weights(path), strict=False)  # strict on every name but the BN counters
    return network.eval().requires_grad_(False).to(device)
