"""Kim (2014) CNN for sentence classification: embedding, parallel 1-D convs of several widths,
max-over-time pooling, dropout. The filters are the units a slicer keeps or drops."""
from __future__ import annotations

import torch
from torch import nn

from snp_ray.models.base import Classifier
from snp_ray.models.vgg import scaled


class TextCNNFeatures(nn.Module):
    def __init__(self, vocab_size: int, embed_dim: int, kernel_sizes: tuple[int, ...],
                 num_filters: int, dropout: float, embedding: nn.Module | None = None):
        super().__init__()
        # ``embedding``: a lookup given from outside (a frozen static table); default: learnt
        self.embedding = embedding if embedding is not None else \
            nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.convs = nn.ModuleList(nn.Conv1d(embed_dim, num_filters, k) for k in kernel_sizes)
        self.dropout = nn.Dropout(dropout)
        self.out_dim = num_filters * len(kernel_sizes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        emb = self.embedding(tokens).transpose(1, 2)  # (B, E, T)
        pooled = [torch.relu(conv(emb)).amax(dim=2) for conv in self.convs]
        return self.dropout(torch.cat(pooled, dim=1))


def textcnn(num_classes: int, vocab_size: int, width: float = 1.0, embed_dim: int = 128,
            kernel_sizes: tuple[int, ...] = (3, 4, 5), num_filters: int = 100,
            dropout: float = 0.5) -> Classifier:
    feats = TextCNNFeatures(vocab_size, embed_dim, tuple(kernel_sizes), scaled(num_filters, width),
                            dropout)
    return Classifier(feats, feats.out_dim, num_classes)
