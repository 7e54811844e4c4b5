"""ResNet-50 with frozen batch norm, in torchvision's (and DETR's) parameter layout."""

from __future__ import annotations

import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d


class ResNet(nn.Module):
    """torchvision ResNet trunk; batch norm is frozen (running statistics, eps 1e-5).

    forward(images (B, 3, H, W)) -> the outputs of layer1..layer4, at strides 4, 8, 16, 32.
    """

    def __init__(self, *, depth: int = 50) -> None:
        super().__init__()
        builders = {50: torchvision.models.resnet50, 101: torchvision.models.resnet101}
        if depth not in builders:
            raise ValueError(f"ResNet depth {depth} is not supported (50 or 101)")
        net = builders[depth](weights=None, norm_layer=FrozenBatchNorm2d)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1, net.layer2, net.layer3, net.layer4
        )
        self.channels = [256, 512, 1024, 2048]

    def forward(self, images: torch.Tensor, stages: int = 4) -> list[torch.Tensor]:
        """The first ``stages`` stage maps (training from the cache needs only stage 1)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        outputs = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4)[:stages]:
            x = layer(x)
            outputs.append(x)
        return outputs
