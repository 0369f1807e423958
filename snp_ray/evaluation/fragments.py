"""Test-split checks of fragments: does a fragment separate its class from its model's others?"""
from __future__ import annotations

import numpy as np
import torch

from snp_ray.data.testsplit import load_test_split
from snp_ray.metrics import roc_auc
from snp_ray.slicing.fragment import Fragment


@torch.no_grad()
def fragment_auc(fragment: Fragment, dataset: str, source_classes: list[int],
                 batch_size: int = 1000) -> float:
    """ROC-AUC of the fragment's class score: its class vs the source model's other classes."""
    split = load_test_split(dataset, source_classes)
    raw = split.images if split.images is not None else split.texts
    scores = torch.cat([fragment.class_score(raw[i:i + batch_size])
                        for i in range(0, len(split), batch_size)])
    return roc_auc(scores.numpy(), (split.labels == fragment.spec.class_id).astype(np.int64))


@torch.no_grad()
def source_auc(model: torch.nn.Module, encode, dataset: str, source_classes: list[int],
               batch_size: int = 500) -> dict[int, float]:
    """The whole source model's ROC-AUC per class on the same rows as :func:`fragment_auc`
    (score: its class's softmax probability), the ceiling a fragment of it is measured against."""
    split = load_test_split(dataset, source_classes)
    raw = split.images if split.images is not None else split.texts
    model.eval()
    probs = torch.cat([torch.softmax(model(encode(raw[i:i + batch_size])), 1)
                       for i in range(0, len(split), batch_size)])
    return {c: roc_auc(probs[:, j].numpy(), (split.labels == c).astype(np.int64))
            for j, c in enumerate(source_classes)}
