"""An easy image task that a small CNN learns in seconds, for the learning canaries.

Class c is a bar of one orientation (0: horizontal, 1: vertical, 2: diagonal) at a random
position, in a random bright colour, on dark noise. Colour and position carry no label, so a
network has to learn the shape: random features plus a few-shot head do clearly worse than a
trained network, which is the contrast the canaries assert.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from snp_ray.data.fewshot import FewShotManifest, FewShotSet
from snp_ray.data.specs import ImageSpec
from snp_ray.metrics import roc_auc
from snp_ray.models import Classifier, build_model
from snp_ray.packing import PackConfig, Packer, PackSamples
from snp_ray.slicing import Slicer, slice_preset
from snp_ray.slicing.slicer import SliceOutcome

CLASSES = 3
SPEC = ImageSpec(mean=[0.3, 0.3, 0.3], std=[0.3, 0.3, 0.3])
#: shots per class of the learning canaries (tests/test_learning.py, benchmarks/canary_numbers.py)
K = 5


def shapes(n_per_class: int, seed: int, classes: int = CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 32, 32, 3) uint8, labels (N,)), classes interleaved, from one seed."""
    rng = np.random.default_rng(seed)
    labels = np.tile(np.arange(classes), n_per_class)
    images = rng.integers(0, 60, (labels.size, 32, 32, 3)).astype(np.uint8)
    for i, c in enumerate(labels):
        colour = rng.integers(140, 256, 3).astype(np.uint8)
        r, s, length = rng.integers(4, 28), rng.integers(2, 10), rng.integers(14, 22)
        for t in range(length):
            for w in (0, 1, 2):            # a bar 3 pixels thick
                if c == 0:
                    y, x = r + w - 1, s + t
                elif c == 1:
                    y, x = s + t, r + w - 1
                else:
                    y, x = s + t, s + t + w - 1
                images[i, np.clip(y, 0, 31), np.clip(x, 0, 31)] = colour
    return images, labels


def fewshot(k: int, seed: int = 100, classes: int = CLASSES) -> FewShotSet:
    raw, labels = shapes(k, seed, classes)
    rows = [np.flatnonzero(labels == c).tolist() for c in range(classes)]
    return FewShotSet(FewShotManifest(dataset="synthetic", k=k, seed=seed, classes=list(range(classes)),
                                      row_ids=rows), raw, labels, [f"shape{c}" for c in range(classes)])


def data(n_per_class: int, seed: int, classes: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Shapes of ``classes`` only (default all), with labels local to ``classes``."""
    raw, labels = shapes(n_per_class, seed)
    if classes is None:
        return raw, labels
    keep = np.isin(labels, classes)
    return raw[keep], np.searchsorted(classes, labels[keep])


def fit(model: nn.Module, raw: np.ndarray, labels: np.ndarray, epochs: int = 6) -> nn.Module:
    """Adam on cross-entropy, batches of 32 (the global torch seed orders them)."""
    x, y = SPEC.encode(raw), torch.as_tensor(labels)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y))
        for s in range(0, len(y), 32):
            idx = order[s:s + 32]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, n_per_class: int, seed: int, classes: list[int] | None = None) -> float:
    raw, labels = data(n_per_class, seed, classes)
    return float((model.eval()(SPEC.encode(raw)).argmax(1).numpy() == labels).mean())


def trained_model(arch: str = "vgg11", width: float = 0.125, seed: int = 0,
                  classes: list[int] | None = None) -> Classifier:
    """What a model's developer did: train on plenty of its own classes' data (~2-4 s)."""
    torch.manual_seed(seed)
    model = build_model(arch, len(classes) if classes else CLASSES, width)
    return fit(model, *data(200, seed + 1, classes))


def untrained_model(arch: str = "vgg11", width: float = 0.125, seed: int = 0,
                    classes: list[int] | None = None) -> Classifier:
    """Same architecture, random weights; BN statistics set from the data so activations are sane."""
    torch.manual_seed(seed)
    model = build_model(arch, len(classes) if classes else CLASSES, width)
    raw, _ = data(50, seed + 3, classes)
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None          # cumulative average over this one pass
    with torch.no_grad():
        model(SPEC.encode(raw))
    return model.eval()


# ------------------------------------------------------------------ the canaries' measurements
# shared by tests/test_learning.py (which asserts on them) and benchmarks/canary_numbers.py
# (which prints them)
def slice_all(model: Classifier, **cfg) -> tuple[Slicer, list[SliceOutcome]]:
    """Every class of ``model`` sliced on K shots with the quick preset (``cfg`` overrides)."""
    slicer = Slicer(model, SPEC, fewshot(K), slice_preset("quick", **cfg))
    return slicer, [slicer.slice_class(c) for c in range(CLASSES)]


@torch.no_grad()
def probe_auc(out: SliceOutcome, raw: np.ndarray, labels: np.ndarray, c: int) -> float:
    """Class ``c`` against the rest on (raw, labels), scored by the fragment's binary probe."""
    scores = torch.softmax(out.probe(out.features(SPEC.encode(raw))), 1)[:, 1]
    return roc_auc(scores.numpy(), labels == c)


def pack_accuracy(fragments: list, held_out: tuple[np.ndarray, np.ndarray], **cfg) -> float:
    """Held-out accuracy of a pack of ``fragments`` trained on the K shots (``cfg``: PackConfig
    overrides)."""
    fs = fewshot(K)
    samples = PackSamples("synthetic", fs.raw, fs.labels, dict(enumerate(fs.class_names)))
    config = PackConfig(**{"epochs": 60, "hidden": 32, "augment_views": 2, **cfg})
    packed = Packer(config).pack(fragments, samples, list(range(CLASSES)))
    raw, labels = held_out
    return float((packed.predict(raw) == labels).mean())
