"""DEIMv2's DINOv3 backbone: a ViT's semantic maps beside a small CNN's detail maps.

The spatial tuning adapter (STA) is a four-step CNN on the image: a stride-2 3x3 ConvNorm
(``dim`` wide, GELU) and a 3x3 stride-2 max pool (stride 4), then three stride-2 3x3
ConvNorms (2, 4 and 4 ``dim`` wide, strides 8, 16, 32), a GELU before the last two (the
maps themselves are taken before it). The ViT's three output maps (stride 16) are resized
bilinearly to strides 8, 16 and 32 (the first doubled, the second as it is, the third
halved) and each is concatenated with the adapter's map of that stride, ViT channels
first. DEIMv2 then projects each concatenation (1x1 conv + batch norm); here that is the
hybrid encoder's input projection, so this backbone's levels are the concatenations.

Stage 0 (C1, stride 4) is the adapter's pooled stem: the cheap stride-4 map that training
from the feature cache recomputes, without running the ViT.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from frozenseg.detector.backbones.dinov3 import DINOv3ViT
from frozenseg.detector.conv import ConvNorm

# The adapter's strides and DEIMv2's levels meet only on sides that are multiples of 32.
SIZE_MULTIPLE = 32


class SpatialTuningAdapter(nn.Module):
    """(B, 3, H, W) -> maps at strides 4, 8, 16, 32 (dim, 2 dim, 4 dim, 4 dim wide); the
    first ``stages`` of them."""

    def __init__(self, *, dim: int) -> None:
        super().__init__()
        self.stem_conv = ConvNorm(in_dim=3, out_dim=dim, kernel=3, stride=2, activation="gelu")
        self.stem_pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.conv2 = ConvNorm(in_dim=dim, out_dim=2 * dim, kernel=3, stride=2)
        self.conv3 = ConvNorm(in_dim=2 * dim, out_dim=4 * dim, kernel=3, stride=2)
        self.conv4 = ConvNorm(in_dim=4 * dim, out_dim=4 * dim, kernel=3, stride=2)
        self.channels = [dim, 2 * dim, 4 * dim, 4 * dim]

    def forward(self, images: torch.Tensor, stages: int = 4) -> list[torch.Tensor]:
        maps = [self.stem_pool(self.stem_conv(images))]
        for i, conv in enumerate((self.conv2, self.conv3, self.conv4)[: stages - 1]):
            maps.append(conv(maps[-1] if i == 0 else F.gelu(maps[-1])))
        return maps


class DINOv3STA(nn.Module):
    """The backbone: C1 (the adapter's stem, stride 4), then the three levels (strides 8,
    16, 32), each the resized ViT map and the adapter's map concatenated.

    Inputs of any size: padded (bottom, right, zeros) to a multiple of 32, where DEIMv2's
    maps line up, and every map cropped to ceil(side / stride) afterwards, as a CNN's would
    be (on multiples of 32, transformers' only working sizes, nothing is padded)."""

    def __init__(self, *, vit: DINOv3ViT, adapter: SpatialTuningAdapter) -> None:
        super().__init__()
        if len(vit.out_layers) != 3 or vit.patch != 16:
            raise ValueError("DEIMv2's DINOv3 backbone takes three ViT maps of 16 x 16 patches")
        self.vit, self.sta = vit, adapter
        width = vit.patch_embed.out_channels
        self.channels = [adapter.channels[0], *(width + c for c in adapter.channels[1:])]

    def forward(self, images: torch.Tensor, stages: int | None = None) -> list[torch.Tensor]:
        """``stages``: how many maps to return, C1 first (1: C1 alone; None: all four)."""
        h, w = images.shape[-2:]
        padded = F.pad(images, (0, -w % SIZE_MULTIPLE, 0, -h % SIZE_MULTIPLE))
        detail = self.sta(padded, 1 if stages == 1 else 4)
        maps = detail[:1]
        if stages != 1:
            semantic = self.vit(padded)
            maps += [torch.cat([self._resized(m, level), d], 1)
                     for level, (m, d) in enumerate(zip(semantic, detail[1:], strict=True))]
        strides = (4, 8, 16, 32)
        return [m[..., : math.ceil(h / s), : math.ceil(w / s)]
                for m, s in zip(maps, strides, strict=False)]

    @staticmethod
    def _resized(vit_map: torch.Tensor, level: int) -> torch.Tensor:
        """A stride-16 map at level 0, 1, 2 -> strides 8, 16, 32 (bilinear, corners not
        aligned; the stride-16 one is resampled onto itself, which leaves it unchanged)."""
        h, w = vit_map.shape[-2:]
        scale = 2.0 ** (1 - level)
        return F.interpolate(vit_map, size=[int(h * scale), int(w * scale)], mode="bilinear",
                             align_corners=False)


def build_dinov3_sta(*, adapter_dim: int, **vit) -> DINOv3STA:
    """A backbone spec (flat, to survive JSON): the adapter's width and DINOv3ViT's
    keywords."""
    return DINOv3STA(vit=DINOv3ViT(**vit), adapter=SpatialTuningAdapter(dim=adapter_dim))
