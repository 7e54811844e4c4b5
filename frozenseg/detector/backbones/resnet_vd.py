"""ResNet-vd (RT-DETR's PResNet), with frozen batch norm, in the official parameter layout.

The "vd" tweaks of ResNet: a stem of three 3x3 convolutions (``conv1.conv1_1..3``), the
stride on the bottleneck's 3x3 convolution, and shortcuts that downsample by a 2x2 average
pool before their 1x1 convolution (``short.pool`` + ``short.conv``). Names follow
lyuwenyu/RT-DETR: ``conv1.conv1_k``, ``res_layers.i.blocks.j.branch2{a,b,c}``, ``short``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from frozenseg.detector.conv import ConvNorm


class Shortcut(nn.Sequential):
    """The projection of a stage's first block: 2x2 average pool + 1x1 ConvNorm when the
    block halves the resolution (``pool``, ``conv``)."""

    def __init__(self, *, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(2, 2, 0, ceil_mode=True)
        self.conv = ConvNorm(in_dim=in_dim, out_dim=out_dim, kernel=1)


class Block(nn.Module):
    """A bottleneck (1x1, 3x3 with the stride, 1x1) or basic (3x3 with the stride, 3x3)
    residual block; ``project``: the first of a stage, whose shortcut is a projection."""

    def __init__(self, *, kind: str, in_dim: int, out_dim: int, stride: int,
                 project: bool) -> None:
        super().__init__()
        if kind == "bottleneck":
            width = out_dim // 4
            self.branch2a = ConvNorm(in_dim=in_dim, out_dim=width, kernel=1, activation="relu")
            self.branch2b = ConvNorm(in_dim=width, out_dim=width, kernel=3, stride=stride,
                                     activation="relu")
            self.branch2c = ConvNorm(in_dim=width, out_dim=out_dim, kernel=1)
        else:
            self.branch2a = ConvNorm(in_dim=in_dim, out_dim=out_dim, kernel=3, stride=stride,
                                     activation="relu")
            self.branch2b = ConvNorm(in_dim=out_dim, out_dim=out_dim, kernel=3)
        self.short: nn.Module = nn.Identity()
        if project:
            self.short = (Shortcut(in_dim=in_dim, out_dim=out_dim) if stride == 2
                          else ConvNorm(in_dim=in_dim, out_dim=out_dim, kernel=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.branch2b(self.branch2a(x))
        if hasattr(self, "branch2c"):
            y = self.branch2c(y)
        return torch.relu(y + self.short(x))


class Stage(nn.Module):
    def __init__(self, *, blocks: list[Block]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class ResNetVd(nn.Module):
    """forward(images (B, 3, H, W)) -> the four stage maps at strides 4, 8, 16, 32.

    depths: blocks per stage; widths: each stage's output channels; stem: the stem's width.
    """

    def __init__(self, *, block: Literal["bottleneck", "basic"] = "bottleneck",
                 depths: tuple[int, ...] = (3, 4, 6, 3),
                 widths: tuple[int, ...] = (256, 512, 1024, 2048), stem: int = 64) -> None:
        super().__init__()
        if block not in ("bottleneck", "basic") or len(depths) != 4 or len(widths) != 4:
            raise ValueError(f"ResNet-vd needs a bottleneck or basic block and four stages, "
                             f"not {block} with depths {depths}, widths {widths}")
        self.conv1 = nn.Sequential()
        half = stem // 2
        for name, a, b, stride in (("conv1_1", 3, half, 2), ("conv1_2", half, half, 1),
                                   ("conv1_3", half, stem, 1)):
            self.conv1.add_module(name, ConvNorm(in_dim=a, out_dim=b, kernel=3, stride=stride,
                                                 activation="relu"))
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.res_layers = nn.ModuleList()
        in_dim = stem
        for i, (depth, width) in enumerate(zip(depths, widths, strict=True)):
            # A stage's first block projects its shortcut (a bottleneck only when the width
            # or the resolution changes, as transformers builds it: always, in real models).
            project = block == "basic" or in_dim != width or i > 0
            self.res_layers.append(Stage(blocks=[
                Block(kind=block, in_dim=in_dim if j == 0 else width, out_dim=width,
                      stride=2 if i > 0 and j == 0 else 1, project=project and j == 0)
                for j in range(depth)
            ]))
            in_dim = width
        self.channels = list(widths)

    def forward(self, images: torch.Tensor, stages: int = 4) -> list[torch.Tensor]:
        """The first ``stages`` stage maps (training from the cache needs only stage 1)."""
        x = self.maxpool(self.conv1(images))
        outputs = []
        for stage in self.res_layers[:stages]:
            x = stage(x)
            outputs.append(x)
        return outputs
