"""Small pre-norm Transformers built from the sliceable attention: a ViT for 32x32 images
(4-pixel patches, 64 tokens) and a text encoder (token + position embeddings, padding masked).

Both pool by averaging tokens rather than through a class token: on a few thousand images a
mean-pooled ViT trains faster, and the slicer follows either (see docs/SLICING.md, Attention).
"""
from __future__ import annotations

import torch
from torch import nn

from snp_ray.models.attention import SelfAttention
from snp_ray.models.base import Classifier
from snp_ray.models.vgg import scaled


class Block(nn.Module):
    """x + attn(LN(x)), then x + MLP(LN(x)); ``mask`` (batch, tokens) marks the real tokens."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dim // heads, dropout=0.0, proj_dropout=dropout)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, keep=mask)
        return x + self.mlp(self.norm2(x))


class ViTFeatures(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, patch: int, image: int,
                 mlp_ratio: float, dropout: float, in_channels: int = 3):
        super().__init__()
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.randn(1, (image // patch) ** 2, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.out_dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x).mean(dim=1)


class TextTransformerFeatures(nn.Module):
    """Token ids (0 = padding) -> the mean of the real tokens' final states."""

    def __init__(self, vocab_size: int, dim: int, depth: int, heads: int, max_len: int,
                 mlp_ratio: float, dropout: float):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.positions = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.out_dim = dim

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        real = tokens != 0
        real = torch.cat([torch.ones_like(real[:, :1]), real[:, 1:]], dim=1)  # never all padding
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embedding(tokens) + self.positions(pos)
        for block in self.blocks:
            x = block(x, real)
        weights = real.unsqueeze(-1).to(x.dtype)
        pooled = (self.norm(x) * weights).sum(dim=1) * torch.reciprocal(weights.sum(dim=1))
        return self.dropout(pooled)


def vit(num_classes: int, width: float = 1.0, dim: int = 64, depth: int = 4, heads: int = 4,
        patch: int = 4, image: int = 32, mlp_ratio: float = 2.0, dropout: float = 0.1) -> Classifier:
    d = scaled(dim // heads, width) * heads
    feats = ViTFeatures(d, depth, heads, patch, image, mlp_ratio, dropout)
    return Classifier(feats, feats.out_dim, num_classes)


def transformer(num_classes: int, vocab_size: int, width: float = 1.0, dim: int = 128,
                depth: int = 2, heads: int = 4, max_len: int = 64, mlp_ratio: float = 2.0,
                dropout: float = 0.3) -> Classifier:
    d = scaled(dim // heads, width) * heads
    feats = TextTransformerFeatures(vocab_size, d, depth, heads, max_len, mlp_ratio, dropout)
    return Classifier(feats, feats.out_dim, num_classes)
