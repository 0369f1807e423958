"""CIFAR VGG with BatchNorm (Simonyan & Zisserman 2015, CIFAR variant with a single linear head).

At width 1 and 10 classes VGG16 has 14.73 M parameters, the number the paper reports.
"""
from __future__ import annotations

from torch import nn

from snp_ray.models.base import Classifier

CONFIGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}


def scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def vgg(depth_name: str, num_classes: int, width: float = 1.0, in_channels: int = 3) -> Classifier:
    layers: list[nn.Module] = []
    c_in = in_channels
    for item in CONFIGS[depth_name]:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        c_out = scaled(int(item), width)
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                   nn.ReLU(inplace=True)]
        c_in = c_out
    layers.append(nn.Flatten())  # 32x32 input -> 1x1 after five poolings
    return Classifier(nn.Sequential(*layers), c_in, num_classes)
