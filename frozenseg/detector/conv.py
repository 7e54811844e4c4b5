"""ConvNorm: a bias-free convolution, frozen batch norm and an optional activation.

The building block of RT-DETR's ResNet-vd backbone and hybrid encoder, with the official
parameter names (``conv``, ``norm``). Batch norm is frozen (running statistics, eps 1e-5):
the detector is never trained with batch statistics here.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU, None: nn.Identity}


class ConvNorm(nn.Module):
    """conv (k x k, stride, padding (k - 1) // 2, no bias) -> frozen batch norm -> activation."""

    def __init__(self, *, in_dim: int, out_dim: int, kernel: int, stride: int = 1,
                 groups: int = 1, activation: str | None = None) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation is {activation!r}; one of relu, silu, gelu or None")
        self.conv = nn.Conv2d(in_dim, out_dim, kernel, stride, padding=(kernel - 1) // 2,
                              groups=groups, bias=False)
        self.norm = FrozenBatchNorm2d(out_dim)
        self.act = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))
