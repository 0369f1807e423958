"""Accuracy of a classifier on the test split of its classes (evaluation only)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from snp_ray.data.specs import InputSpec
from snp_ray.evaluation.testsplit import load_test_split


@torch.no_grad()
def predict_logits(model: nn.Module, spec: InputSpec, raw, batch_size: int = 1000) -> torch.Tensor:
    from snp_ray.runtime import default_device

    device = torch.device(default_device())
    home = next(model.parameters()).device
    model.eval().to(device)
    n = len(raw)
    try:
        chunks = [model(spec.encode(raw[i:i + batch_size]).to(device)).cpu() for i in range(0, n, batch_size)]
    finally:
        model.to(home)
    return torch.cat(chunks) if chunks else torch.empty(0)


def test_accuracy(model: nn.Module, spec: InputSpec, dataset: str, classes: list[int]) -> float:
    """Top-1 accuracy on the test rows of ``classes``; output j of the model is ``classes[j]``."""
    split = load_test_split(dataset, classes)
    raw = split.images if split.images is not None else split.texts
    logits = predict_logits(model, spec, raw)
    pred = np.asarray(classes)[logits.argmax(1).numpy()]
    return float((pred == split.labels).mean())
