"""The one door to a dataset's test split, and a classifier's accuracy on it.

Only this module holds :data:`~snp_ray.data.tables.EVAL_ACCESS`. Slicing, packing, tuning and
the baselines receive few-shot sets, never this module, and a test checks that none of them
imports it (tests/test_isolation.py). Evaluation, the market's report of its models' accuracy,
the expansion estimate and the jobs that test packs come through here.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from snp_ray.data.specs import InputSpec
from snp_ray.data.tables import EVAL_ACCESS, Split, read_split
from snp_ray.errors import DataError
from snp_ray.runtime import default_device


def load_test_split(dataset: str, classes: list[int] | None = None) -> Split:
    """Test rows of ``dataset``, restricted to ``classes`` (global ids) when given."""
    split = read_split(dataset, "test", access=EVAL_ACCESS)
    if classes is None:
        return split
    unknown = sorted(set(classes) - set(range(split.num_classes)))
    if unknown:
        raise DataError(f"classes {unknown} are not classes of {dataset}")
    return split.rows(np.flatnonzero(np.isin(split.labels, classes)))


@torch.no_grad()
def predict_logits(model: nn.Module, spec: InputSpec, raw, batch_size: int = 1000) -> torch.Tensor:
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
