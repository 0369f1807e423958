"""Tokenizer and vocabulary for the text models.

Each original model builds its own vocabulary from its own training texts and stores it in its
spec, so two text models in one market may disagree on token ids: a fragment always encodes its
input with the vocabulary of the model it came from.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

import torch

from snp_ray.errors import DataError

PAD, UNK = "<pad>", "<unk>"
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|'[a-z]+|[^\sa-z0-9]")


def tokenize(text: str) -> list[str]:
    """Lower-cased words, contractions (``'s``, ``n't``) and single punctuation marks."""
    return _TOKEN.findall(text.lower())


def build_vocab(texts: Iterable[str], min_freq: int = 1, max_size: int = 20_000) -> list[str]:
    """Most frequent tokens first (ties broken alphabetically, so the vocabulary is deterministic)."""
    counts = Counter(tok for t in texts for tok in tokenize(t))
    ranked = sorted((kv for kv in counts.items() if kv[1] >= min_freq), key=lambda kv: (-kv[1], kv[0]))
    return [PAD, UNK] + [tok for tok, _ in ranked[: max(0, max_size - 2)]]


def encode_texts(texts: list[str], vocab: list[str], max_len: int, strict: bool = False,
                 index: dict[str, int] | None = None) -> torch.Tensor:
    """Token ids, right-padded with 0, truncated to ``max_len``.

    ``strict`` refuses a text made only of unknown tokens, which would otherwise reach the model
    as a lone ``<unk>``: right for a user's request, wrong for bulk evaluation.
    """
    index = index or {tok: i for i, tok in enumerate(vocab)}
    out = torch.zeros((len(texts), max_len), dtype=torch.long)
    unk = index[UNK]
    for row, text in enumerate(texts):
        ids = [index.get(tok, unk) for tok in tokenize(text)][:max_len]
        if strict and all(i == unk for i in ids):
            raise DataError(f"text {row} ({text[:40]!r}) has no token known to the model's vocabulary")
        if not ids:
            ids = [unk]
        out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out
