"""CIFAR ResNets with BasicBlocks (He et al. 2016).

Depths 20/32/56 use three stages of 16/32/64 channels; ``resnet34`` uses the ImageNet layout
[3, 4, 6, 3] with 64..512 channels and a 3x3 stem, as is usual on CIFAR. Shortcuts that change
shape are 1x1 conv + BN (option B), so every channel group is a real, sliceable tensor.
"""
from __future__ import annotations

import torch
from torch import nn

from snp_ray.models.base import Classifier
from snp_ray.models.vgg import scaled


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_mid: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_mid, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_mid)
        self.conv2 = nn.Conv2d(c_mid, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNetFeatures(nn.Module):
    def __init__(self, stage_blocks: list[int], stage_channels: list[int], in_channels: int = 3):
        super().__init__()
        c = stage_channels[0]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(c), nn.ReLU(inplace=True))
        blocks: list[nn.Module] = []
        for i, (n, width) in enumerate(zip(stage_blocks, stage_channels)):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(c, width, width, stride))
                c = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_channels = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.blocks(self.stem(x)))


LAYOUTS: dict[str, tuple[list[int], list[int]]] = {
    "resnet20": ([3, 3, 3], [16, 32, 64]),
    "resnet32": ([5, 5, 5], [16, 32, 64]),
    "resnet56": ([9, 9, 9], [16, 32, 64]),
    "resnet34": ([3, 4, 6, 3], [64, 128, 256, 512]),
}


def resnet(depth_name: str, num_classes: int, width: float = 1.0, in_channels: int = 3) -> Classifier:
    blocks, channels = LAYOUTS[depth_name]
    feats = ResNetFeatures(blocks, [scaled(c, width) for c in channels], in_channels)
    return Classifier(feats, feats.out_channels, num_classes)
