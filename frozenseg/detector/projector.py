"""LW-DETR's and RF-DETR's multi-scale projector: ViT maps -> the decoder's levels.

It takes the place of an encoder. Each level has a scale (2.0, 1.0 or 0.5 of the ViT's
stride-p grid) and its own path: every ViT map is resampled to the level's grid (scale
2: a 2x2 stride-2 transposed convolution halving the width, after a 1x1 ConvNorm + ReLU
halving it first when the width exceeds 512; scale 0.5: a 3x3 stride-2 ConvNorm + ReLU;
scale 1: nothing), the resampled maps are concatenated, and a C2f block and a channel
layer norm give the level, ``dim`` wide.

C2f (the YOLOv8 block): a 1x1 ConvNorm to 2h channels split in two halves; the second
half runs through ``blocks`` bottlenecks (two 3x3 ConvNorms each), every intermediate is
kept; all 2 + blocks pieces are concatenated and a 1x1 ConvNorm gives ``dim``
(h = dim * expansion). ConvNorm: a bias-free convolution, then frozen batch norm
(LW-DETR, eps 1e-5) or a channel layer norm (RF-DETR, ``norm_eps``), then the activation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU}


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNorm(nn.Module):
    """conv (k x k, stride, padding k // 2, no bias) -> norm -> activation."""

    def __init__(self, *, in_dim: int, out_dim: int, kernel: int, stride: int = 1,
                 norm: str, norm_eps: float, activation: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, kernel, stride, padding=kernel // 2, bias=False)
        self.norm = (FrozenBatchNorm2d(out_dim) if norm == "batch"
                     else ChannelLayerNorm(out_dim, eps=norm_eps))
        self.act = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, *, dim: int, **conv) -> None:
        super().__init__()
        self.conv1 = ConvNorm(in_dim=dim, out_dim=dim, kernel=3, **conv)
        self.conv2 = ConvNorm(in_dim=dim, out_dim=dim, kernel=3, **conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class C2f(nn.Module):
    """(B, in_dim, H, W) -> (B, out_dim, H, W), as the module docstring describes."""

    def __init__(self, *, in_dim: int, out_dim: int, blocks: int, expansion: float,
                 **conv) -> None:
        super().__init__()
        self.hidden = int(out_dim * expansion)
        self.conv1 = ConvNorm(in_dim=in_dim, out_dim=2 * self.hidden, kernel=1, **conv)
        self.blocks = nn.ModuleList(Bottleneck(dim=self.hidden, **conv) for _ in range(blocks))
        self.conv2 = ConvNorm(in_dim=(2 + blocks) * self.hidden, out_dim=out_dim, kernel=1,
                              **conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pieces = list(self.conv1(x).split(self.hidden, 1))
        for block in self.blocks:
            pieces.append(block(pieces[-1]))
        return self.conv2(torch.cat(pieces, 1))


def resampler(scale: float, dim: int, norm: str, norm_eps: float) -> tuple[nn.Sequential, int]:
    """One ViT map's path to a level of ``scale``, and the width it leaves."""
    conv = {"norm": norm, "norm_eps": norm_eps, "activation": "relu"}
    if scale == 2.0 and dim > 512:
        return nn.Sequential(ConvNorm(in_dim=dim, out_dim=dim // 2, kernel=1, **conv),
                             nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2)), dim // 4
    if scale == 2.0:
        return nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, 2)), dim // 2
    if scale == 0.5:
        return nn.Sequential(ConvNorm(in_dim=dim, out_dim=dim, kernel=3, stride=2, **conv)), dim
    if scale == 1.0:
        return nn.Sequential(), dim
    raise ValueError(f"projector scale {scale} is not one of 2.0, 1.0, 0.5")


class ProjectorLevel(nn.Module):
    def __init__(self, *, scale: float, in_dims: Sequence[int], dim: int, blocks: int,
                 expansion: float, norm: str, norm_eps: float, activation: str) -> None:
        super().__init__()
        paths = [resampler(scale, d, norm, norm_eps) for d in in_dims]
        self.sample = nn.ModuleList(path for path, _ in paths)
        self.c2f = C2f(in_dim=sum(width for _, width in paths), out_dim=dim, blocks=blocks,
                       expansion=expansion, norm=norm, norm_eps=norm_eps, activation=activation)
        self.norm = ChannelLayerNorm(dim, eps=1e-6)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        sampled = [path(m) for path, m in zip(self.sample, maps, strict=True)]
        return self.norm(self.c2f(torch.cat(sampled, 1)))


class MultiScaleProjector(nn.Module):
    """ViT maps (B, C_vit, h, w) -> one (B, dim, h * scale, w * scale) map per scale."""

    def __init__(self, *, scales: Sequence[float], in_dims: Sequence[int], dim: int,
                 blocks: int, expansion: float, norm: str = "batch", norm_eps: float = 1e-5,
                 activation: str = "silu") -> None:
        super().__init__()
        if norm not in ("batch", "layer") or activation not in ACTIVATIONS:
            raise ValueError(f"projector norm {norm!r} / activation {activation!r}: expected "
                             f"batch or layer / one of {', '.join(ACTIVATIONS)}")
        self.scales, self.dim = tuple(scales), dim
        self.levels = nn.ModuleList(
            ProjectorLevel(scale=s, in_dims=in_dims, dim=dim, blocks=blocks, expansion=expansion,
                           norm=norm, norm_eps=norm_eps, activation=activation)
            for s in self.scales)

    def forward(self, maps: list[torch.Tensor], levels: int | None = None) -> list[torch.Tensor]:
        return [level(maps) for level in self.levels[: levels or len(self.levels)]]
