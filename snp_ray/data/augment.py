"""Image augmentation shared by every trainer (original models, slicing, packing, baselines)."""
from __future__ import annotations

import torch
from torch import nn


def augment_images(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 32x32 crop of the zero-padded (by 4) batch, and a random horizontal flip."""
    n, _, h, w = x.shape
    padded = nn.functional.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=generator)
    dx = torch.randint(0, 9, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).view(n, 1, h, 1).expand(n, x.shape[1], h, w + 8)
    out = padded.gather(2, rows)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
    out = out.gather(3, cols)
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(3)
    return out.contiguous()
