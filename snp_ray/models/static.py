"""Text models on a static word-embedding table (the paper's Table 3 models).

:class:`StaticEmbedding` looks token ids up in a frozen table that is *not* part of the model:
the vectors are a non-persistent buffer, so they are not a parameter (not counted, never trained),
not in the model's or a fragment's weights file, and the slicer sees the lookup as an untraced
input (it reads token ids, holds no parameter, so it opens no unit group and the 300 input
columns of the first layer are never cut). The table is named by the sha256 of its stored blob
(:mod:`snp_ray.data.embeddings`); models built on the same table in one process share one tensor.

* ``textcnn_static``: Kim (2014) CNN-static: 100 maps each of widths 3, 4, 5 over the 300-d
  vectors, max-over-time pooling, dropout 0.5: 360,300 parameters before the head.
* ``gru_static``: one GRU layer of 72 units over the 300-d vectors (80,784 parameters before the
  head), the paper's T6 RNN size (8 x 10^4).
"""
from __future__ import annotations

import torch
from torch import nn

from snp_ray.errors import ConfigError
from snp_ray.models.base import Classifier
from snp_ray.models.rnn import RNNFeatures
from snp_ray.models.textcnn import TextCNNFeatures
from snp_ray.models.vgg import scaled

#: hidden units of ``gru_static``: 3 x 72 x (300 + 72 + 2) = 80,784 parameters before the head
STATIC_GRU_HIDDEN = 72


class StaticEmbedding(nn.Module):
    """A frozen lookup table given from outside: ``table`` names it (sha256, "" for an
    anonymous one), ``weight`` is a non-persistent buffer."""

    def __init__(self, vectors: torch.Tensor, table: str = ""):
        super().__init__()
        if vectors.dim() != 2:
            raise ConfigError(f"a static table is (rows, dim), got {tuple(vectors.shape)}")
        self.table = table
        self.embedding_dim = int(vectors.shape[1])
        self.register_buffer("weight", vectors.detach(), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(tokens, self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.embedding_dim}, table={self.table[:12] or '-'}"


def static_embedding(table: str | torch.Tensor, vocab_size: int) -> StaticEmbedding:
    """The lookup of ``table`` (a stored table's sha256, or a tensor) checked against the model's
    vocabulary size."""
    if isinstance(table, torch.Tensor):
        vectors, name = table, ""
    else:
        from snp_ray.data.embeddings import table_vectors

        vectors, name = table_vectors(table), table
    if vectors.shape[0] != vocab_size:
        raise ConfigError(f"static table {name[:12] or '(given)'} has {vectors.shape[0]} rows but "
                          f"the model's vocabulary has {vocab_size} tokens")
    return StaticEmbedding(vectors, name)


def textcnn_static(num_classes: int, vocab_size: int, width: float = 1.0,
                   table: str | torch.Tensor = "", kernel_sizes: tuple[int, ...] = (3, 4, 5),
                   num_filters: int = 100, dropout: float = 0.5) -> Classifier:
    emb = static_embedding(table, vocab_size)
    feats = TextCNNFeatures(vocab_size, emb.embedding_dim, tuple(kernel_sizes),
                            scaled(num_filters, width), dropout, embedding=emb)
    return Classifier(feats, feats.out_dim, num_classes)


def rnn_static(num_classes: int, vocab_size: int, width: float = 1.0,
               table: str | torch.Tensor = "", cell: str = "gru",
               hidden: int = STATIC_GRU_HIDDEN, dropout: float = 0.3) -> Classifier:
    emb = static_embedding(table, vocab_size)
    feats = RNNFeatures(vocab_size, emb.embedding_dim, scaled(hidden, width), cell, dropout,
                        embedding=emb)
    return Classifier(feats, feats.out_dim, num_classes)
