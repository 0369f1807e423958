"""Evaluation of packed models (and any classifier over global class ids) on the test split."""
from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import torch

from snp_ray.data.testsplit import load_test_split
from snp_ray.packing.model import PackedModel
from snp_ray.slicing.fragment import Fragment


def pack_accuracy(packed: PackedModel) -> float:
    split = load_test_split(packed.spec.dataset, packed.class_ids)
    raw = split.images if split.images is not None else split.texts
    return float((packed.predict(raw, strict=False) == split.labels).mean())


@torch.no_grad()
def latency_ms(packed: PackedModel, batch: int = 64, repeats: int = 5) -> float:
    """Median CPU milliseconds per batch of already-encoded inputs (this process's threads)."""
    split = load_test_split(packed.spec.dataset, packed.class_ids)
    raw = split.images[:batch] if split.images is not None else split.texts[:batch]
    inputs = packed.encode(raw, strict=False)
    packed(*inputs)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        packed(*inputs)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def evaluate_pack(packed: PackedModel, with_latency: bool = True) -> dict[str, Any]:
    out = packed.summary()
    out["test_accuracy"] = pack_accuracy(packed)
    out["pack_seconds"] = packed.spec.metrics.get("pack_seconds")
    if with_latency:
        out["latency_ms_per_64"] = latency_ms(packed)
    return out


def accuracy_of(predict, dataset: str, classes: list[int]) -> float:
    """Accuracy of any ``predict(raw) -> global ids`` on the test rows of ``classes``."""
    split = load_test_split(dataset, classes)
    raw = split.images if split.images is not None else split.texts
    return float((np.asarray(predict(raw)) == split.labels).mean())


@torch.no_grad()
def test_features(fragment: Fragment, dataset: str, batch: int = 1000) -> dict[str, np.ndarray]:
    """A fragment's features on every test row of ``dataset`` (its classes are all the rows a
    pack can be tested on). Jobs that test many packs sharing fragments compute these once per
    fragment and reuse them (see :func:`accuracy_from_features`)."""
    split = load_test_split(dataset)
    raw = split.images if split.images is not None else split.texts
    fragment.eval()
    feats = [fragment(fragment.encode(raw[i:i + batch], strict=False)) for i in range(0, len(raw), batch)]
    return {"features": torch.cat(feats).numpy(), "labels": np.asarray(split.labels)}


@torch.no_grad()
def accuracy_from_features(packed: PackedModel, cached: dict[str, dict[str, np.ndarray]]) -> float:
    """``pack_accuracy(packed)`` from its fragments' cached test features (keyed by fragment
    key): the same rows, the same scales, Enc and head; only the fragment forwards are reused."""
    labels = cached[packed.fragments[0].spec.key]["labels"]
    rows = np.isin(labels, packed.class_ids)
    pred = predict_from_features(packed, [torch.as_tensor(cached[f.spec.key]["features"][rows])
                                          for f in packed.fragments])
    return float((pred == labels[rows]).mean())


@torch.no_grad()
def predict_from_features(packed: PackedModel, features: list[torch.Tensor]) -> np.ndarray:
    """The pack's class ids from its fragments' features (one tensor per fragment, in order),
    computed elsewhere and cached: the pack's scales, Enc and head only."""
    z = torch.cat([f * s for f, s in zip(features, packed.scales)], 1)
    return np.asarray(packed.class_ids)[packed.head(torch.relu(packed.enc(z))).argmax(1).numpy()]
