"""The contract every zoo model keeps: a feature extractor and a head, kept apart.

Slicing cuts the feature extractor into fragments and throws the head away; packing puts a new
head on top of concatenated fragment features. So each model exposes ``features`` (input ->
flat feature vector of ``feature_dim``) and ``head`` (one ``nn.Linear``).
"""
from __future__ import annotations

import torch
from torch import nn


class Classifier(nn.Module):
    """``head(features(x))`` with the two parts addressable by name."""

    def __init__(self, features: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.features = features
        self.feature_dim = int(feature_dim)
        self.num_classes = int(num_classes)
        self.head = nn.Linear(self.feature_dim, self.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def count_params(module: nn.Module) -> int:
    """Number of parameters (buffers such as BN running stats are not parameters)."""
    return sum(p.numel() for p in module.parameters())


def count_macs(module: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates per sample of conv, linear and recurrent layers."""
    total = 0

    def hook(mod, inp, out):
        nonlocal total
        batch = inp[0].shape[0]
        if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            per_out = mod.in_channels // mod.groups * int(torch.tensor(mod.kernel_size).prod())
            total += out.numel() // batch * per_out
        elif isinstance(mod, nn.Linear):
            total += out.numel() // batch * mod.in_features
        elif isinstance(mod, nn.RNNBase):      # every layer: its input, then its own state
            gates = {"GRU": 3, "LSTM": 4}.get(mod.mode, 1)
            steps = inp[0].shape[1] if mod.batch_first else inp[0].shape[0]
            h, dirs = mod.hidden_size, 2 if mod.bidirectional else 1
            for k in range(mod.num_layers):
                width = mod.input_size if k == 0 else dirs * h
                total += dirs * steps * gates * h * (width + h)

    hooks = [m.register_forward_hook(hook) for m in module.modules()
             if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear, nn.RNNBase))]
    try:
        with torch.no_grad():
            module.eval()(example[:1])
    finally:
        for h in hooks:
            h.remove()
    return int(total)


def channels_last_safe(module: nn.Module) -> bool:
    """Whether training ``module`` in channels_last memory format is safe here.

    torch 2.14.1 on CPU corrupts the heap in the weight-gradient of a strided 1x1 convolution
    with channels_last input at some batch sizes (seen with 2 threads: batch 7 and 12 crash,
    batch 9 does not). ResNet shortcuts are exactly such convolutions, so they train in NCHW;
    VGG-style nets keep the 10-50 % speed-up channels_last gives on CPU.
    """
    return not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1)
                   for m in module.modules())
