"""A GRU/LSTM sentence classifier: embedding, one recurrent layer, the last valid hidden state.

Sequences are right-padded with token 0; the feature is the hidden state at each sequence's
last real token, so padding never changes a prediction.
"""
from __future__ import annotations

import torch
from torch import nn

from snp_ray.models.base import Classifier
from snp_ray.models.vgg import scaled

CELLS = {"gru": nn.GRU, "lstm": nn.LSTM}


class RNNFeatures(nn.Module):
    def __init__(self, vocab_size: int, embed_dim: int, hidden: int, cell: str, dropout: float,
                 embedding: nn.Module | None = None):
        super().__init__()
        # ``embedding``: a lookup given from outside (a frozen static table); default: learnt
        self.embedding = embedding if embedding is not None else \
            nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.rnn = CELLS[cell](embed_dim, hidden, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.out_dim = hidden

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        lengths = (tokens != 0).sum(dim=1).clamp(min=1)
        out, _ = self.rnn(self.embedding(tokens))  # (B, T, H)
        idx = (lengths - 1).view(-1, 1, 1).expand(-1, 1, out.shape[2])
        return self.dropout(out.gather(1, idx).squeeze(1))


def rnn(num_classes: int, vocab_size: int, width: float = 1.0, cell: str = "gru",
        embed_dim: int = 128, hidden: int = 128, dropout: float = 0.3) -> Classifier:
    feats = RNNFeatures(vocab_size, embed_dim, scaled(hidden, width), cell, dropout)
    return Classifier(feats, feats.out_dim, num_classes)
