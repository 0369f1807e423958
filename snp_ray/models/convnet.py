"""The learnware benchmark's image ``ConvModel`` (learnware's dataset_image_workflow): ``depth``
blocks of [Conv2d 3x3 (padding 1, bias), norm, activation, 2x2 pooling], then the last map
flattened into the features and one linear head.

``lwconv`` is their CIFAR-10 setting: net_width=64, net_depth=3, net_norm="batchnorm",
net_act="relu", net_pooling="avgpooling" at 32x32. Its features are the (64, 4, 4) map flattened
to 1024 values, not a pooled vector: the slicer keeps or drops a channel's 16 positions together
(docs/SLICING.md, "Flattened unit maps").
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from snp_ray.models.base import Classifier
from snp_ray.models.vgg import scaled


@dataclass(frozen=True)
class ConvNetConfig:
    width: int = 64            # channels of every conv (times the width multiplier)
    depth: int = 3
    norm: str = "batchnorm"
    act: str = "relu"
    pooling: str = "avgpooling"
    im_size: int = 32          # square input; the flattened map is (width, im_size / 2^depth, ...)


#: the names learnware uses, as module types
NORMS: dict[str, type[nn.Module]] = {"batchnorm": nn.BatchNorm2d}
ACTS: dict[str, type[nn.Module]] = {"relu": nn.ReLU}
POOLINGS: dict[str, type[nn.Module]] = {"avgpooling": nn.AvgPool2d, "maxpooling": nn.MaxPool2d}

CONFIGS: dict[str, ConvNetConfig] = {"lwconv": ConvNetConfig()}


def convnet(name: str, num_classes: int, width: float = 1.0, in_channels: int = 3) -> Classifier:
    cfg = CONFIGS[name]
    c_out = scaled(cfg.width, width)
    layers: list[nn.Module] = []
    c_in, side = in_channels, cfg.im_size
    for _ in range(cfg.depth):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), NORMS[cfg.norm](c_out), ACTS[cfg.act](),
                   POOLINGS[cfg.pooling](2)]
        c_in, side = c_out, side // 2
    layers.append(nn.Flatten())      # (C, side, side) -> C * side^2 features, channel-major
    return Classifier(nn.Sequential(*layers), c_out * side * side, num_classes)
