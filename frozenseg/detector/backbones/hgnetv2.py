"""HGNetV2 (D-FINE's and DEIM's backbone), with frozen batch norm, in D-FINE's layout.

A stem (``stem1``: 3x3 stride 2; ``stem2a``/``stem2b``: 2x2 convolutions on the map padded
by one row and column at the bottom right, beside a 2x2 stride-1 max pool of it; their
concatenation through ``stem3``, 3x3 stride 2, and ``stem4``, 1x1) then four stages
(three in DEIMv2's Atto, Femto and Pico, whose last is at stride 16). A
stage is an optional depthwise 3x3 stride-2 ``downsample`` then HG blocks: ``layers``
convolutions in a chain (3x3, or "light": a 1x1 then a depthwise k x k), the block input
and every layer output concatenated and squeezed by ``aggregation`` (1x1 to half the
output width, 1x1 to the output width), with a residual after the first block. With
``lab`` every activated convolution ends in a learnable affine (one scale, one bias).
Names follow D-FINE's ``HGNetv2``: ``stem.stemN``, ``stages.i.downsample``,
``stages.i.blocks.j.layers.k`` (light: ``.conv1``, ``.conv2``), ``aggregation.0|1``, each a
``conv``/``bn``/``lab``.

Sizes: maps (B, C, H, W); stage widths are ``out_channels``, at strides 4, 8, 16, 32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d


class Affine(nn.Module):
    """x * scale + bias, one learned scalar each (D-FINE's LearnableAffineBlock)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x + self.bias


class ConvBNAct(nn.Module):
    """conv (no bias, padding (k - 1) // 2) -> frozen batch norm -> ReLU (+ affine)."""

    def __init__(self, *, in_dim: int, out_dim: int, kernel: int, stride: int = 1,
                 groups: int = 1, act: bool = True, lab: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, kernel, stride, padding=(kernel - 1) // 2,
                              groups=groups, bias=False)
        self.bn = FrozenBatchNorm2d(out_dim)
        self.act = nn.ReLU() if act else nn.Identity()
        self.lab = Affine() if act and lab else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lab(self.act(self.bn(self.conv(x))))


class LightConv(nn.Module):
    """1x1 (no activation) then depthwise k x k."""

    def __init__(self, *, in_dim: int, out_dim: int, kernel: int, lab: bool) -> None:
        super().__init__()
        self.conv1 = ConvBNAct(in_dim=in_dim, out_dim=out_dim, kernel=1, act=False, lab=lab)
        self.conv2 = ConvBNAct(in_dim=out_dim, out_dim=out_dim, kernel=kernel, groups=out_dim,
                               lab=lab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class Stem(nn.Module):
    def __init__(self, *, mid: int, out: int, lab: bool) -> None:
        super().__init__()
        self.stem1 = ConvBNAct(in_dim=3, out_dim=mid, kernel=3, stride=2, lab=lab)
        self.stem2a = ConvBNAct(in_dim=mid, out_dim=mid // 2, kernel=2, lab=lab)
        self.stem2b = ConvBNAct(in_dim=mid // 2, out_dim=mid, kernel=2, lab=lab)
        self.stem3 = ConvBNAct(in_dim=2 * mid, out_dim=mid, kernel=3, stride=2, lab=lab)
        self.stem4 = ConvBNAct(in_dim=mid, out_dim=out, kernel=1, lab=lab)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=1, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(self.stem1(x), (0, 1, 0, 1))
        branch = self.stem2b(F.pad(self.stem2a(x), (0, 1, 0, 1)))
        return self.stem4(self.stem3(torch.cat([self.pool(x), branch], 1)))


class HGBlock(nn.Module):
    def __init__(self, *, in_dim: int, mid: int, out: int, layers: int, kernel: int,
                 light: bool, residual: bool, lab: bool) -> None:
        super().__init__()
        self.residual = residual
        self.layers = nn.ModuleList(
            LightConv(in_dim=in_dim if i == 0 else mid, out_dim=mid, kernel=kernel, lab=lab)
            if light else
            ConvBNAct(in_dim=in_dim if i == 0 else mid, out_dim=mid, kernel=kernel, lab=lab)
            for i in range(layers))
        self.aggregation = nn.Sequential(
            ConvBNAct(in_dim=in_dim + layers * mid, out_dim=out // 2, kernel=1, lab=lab),
            ConvBNAct(in_dim=out // 2, out_dim=out, kernel=1, lab=lab))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [x]
        for layer in self.layers:
            outputs.append(layer(outputs[-1]))
        y = self.aggregation(torch.cat(outputs, 1))
        return y + x if self.residual else y


class HGStage(nn.Module):
    def __init__(self, *, in_dim: int, mid: int, out: int, blocks: int, layers: int,
                 kernel: int, light: bool, downsample: bool, lab: bool) -> None:
        super().__init__()
        self.downsample = (ConvBNAct(in_dim=in_dim, out_dim=in_dim, kernel=3, stride=2,
                                     groups=in_dim, act=False)
                           if downsample else nn.Identity())
        self.blocks = nn.ModuleList(
            HGBlock(in_dim=in_dim if j == 0 else out, mid=mid, out=out, layers=layers,
                    kernel=kernel, light=light, residual=j > 0, lab=lab)
            for j in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        for block in self.blocks:
            x = block(x)
        return x


class HGNetV2(nn.Module):
    """forward(images (B, 3, H, W)) -> the four stage maps at strides 4, 8, 16, 32 (three:
    4, 8, 16).

    stem: (mid, out) widths; per stage (four or three entries each): in/mid/out widths, HG blocks,
    layers per block, kernel, light blocks, a downsampling convolution; lab: learnable
    affines.
    """

    def __init__(self, *, stem: Sequence[int], in_channels: Sequence[int],
                 mid_channels: Sequence[int], out_channels: Sequence[int],
                 blocks: Sequence[int], layers: Sequence[int], kernels: Sequence[int],
                 light: Sequence[bool], downsample: Sequence[bool], lab: bool) -> None:
        super().__init__()
        per_stage = (in_channels, mid_channels, out_channels, blocks, layers, kernels, light,
                     downsample)
        if len({len(values) for values in per_stage}) != 1 or len(in_channels) not in (3, 4):
            raise ValueError("HGNetV2 needs four stages (or three), each described once")
        self.stem = Stem(mid=stem[0], out=stem[1], lab=lab)
        self.stages = nn.ModuleList(
            HGStage(in_dim=i, mid=m, out=o, blocks=b, layers=n, kernel=k, light=li,
                    downsample=d, lab=lab)
            for i, m, o, b, n, k, li, d in zip(*per_stage, strict=True))
        self.channels = list(out_channels)

    def forward(self, images: torch.Tensor, stages: int = 4) -> list[torch.Tensor]:
        """The first ``stages`` stage maps (training from the cache needs only stage 1)."""
        x = self.stem(images)
        outputs = []
        for stage in self.stages[:stages]:
            x = stage(x)
            outputs.append(x)
        return outputs
