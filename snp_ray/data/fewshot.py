"""Deterministic k-shot sampling and the few-shot sets that slicing, packing and tuning see.

A manifest records the exact train-split row ids, so every run can be reproduced. Sampling draws
a seeded permutation per class and takes its prefix, so the k=5 set is inside the k=10 set, which
is inside the k=20 set: results across k differ by the extra samples only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from snp_ray.config import Config
from snp_ray.data.tables import PROTECTED_SPLITS, Split, read_split
from snp_ray.errors import ConfigError, DataError


@dataclass
class FewShotManifest(Config):
    dataset: str
    k: int
    seed: int
    classes: list[int]               # global class ids, in the model's local order
    row_ids: list[list[int]]         # row_ids[i]: the k rows of classes[i] in the split
    split: str = "train"

    def validate(self) -> None:
        if self.split in PROTECTED_SPLITS:
            raise ConfigError(f"a few-shot manifest may not draw from the {self.split} split")
        if self.k < 1:
            raise ConfigError(f"k must be >= 1, got {self.k}")
        if len(self.row_ids) != len(self.classes) or any(len(r) != self.k for r in self.row_ids):
            raise ConfigError("few-shot manifest: row_ids must hold k rows for every class")
        if len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"few-shot manifest: duplicate classes in {self.classes}")


def sample_k_shot(labels: np.ndarray, classes: list[int], k: int, seed: int, dataset: str,
                  split: str = "train") -> FewShotManifest:
    """Pick ``k`` rows of each class in ``classes`` from ``labels`` (a split's label column)."""
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise DataError(f"k must be a positive integer, got {k!r}")
    rows = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        if idx.size < k:
            raise DataError(f"{dataset}/{split}: class {c} has {idx.size} samples, fewer than k={k}")
        perm = np.random.default_rng([int(seed), int(c)]).permutation(idx.size)
        rows.append(sorted(int(i) for i in idx[perm[:k]]))
    return FewShotManifest(dataset=dataset, k=int(k), seed=int(seed), classes=[int(c) for c in classes],
                           row_ids=rows, split=split)


@dataclass
class FewShotSet:
    """The only data a model's developer uploads: k raw samples per class.

    ``raw`` is (N, 32, 32, 3) uint8 for images or a list of strings for text; ``labels`` are
    global class ids, ``local`` their positions in ``classes``.
    """

    manifest: FewShotManifest
    raw: np.ndarray | list[str]
    labels: np.ndarray
    class_names: list[str] = field(default_factory=list)
    rows: np.ndarray | None = None   # row of each sample in its source; None = the manifest's order
    #: where the rows live: ``dataset/split`` for seeded shots, ``upload:<sha256>`` for a
    #: developer's uploaded file. Row ids of two sources never mean the same sample.
    source: str = ""

    def __post_init__(self) -> None:
        if not self.source and self.manifest.split == "upload":
            raise DataError("an uploaded few-shot set needs its source (upload:<sha256>): rows "
                            "of two uploads are different samples")
        self.source = self.source or f"{self.manifest.dataset}/{self.manifest.split}"

    @property
    def row_ids(self) -> np.ndarray:
        """The row id of every sample in :attr:`source` (kept through :meth:`select`)."""
        if self.rows is not None:
            return self.rows
        return np.array([r for per_class in self.manifest.row_ids for r in per_class], dtype=np.int64)

    @property
    def keys(self) -> np.ndarray:
        """A global identity per sample, ``source#row``: equal keys are the same sample."""
        return sample_keys(self.source, self.row_ids)

    @property
    def classes(self) -> list[int]:
        return self.manifest.classes

    @property
    def local(self) -> np.ndarray:
        pos = {c: i for i, c in enumerate(self.classes)}
        return np.array([pos[int(c)] for c in self.labels], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def select(self, mask: np.ndarray) -> "FewShotSet":
        idx = np.flatnonzero(mask)
        raw = self.raw[idx] if isinstance(self.raw, np.ndarray) else [self.raw[i] for i in idx]
        return FewShotSet(self.manifest, raw, self.labels[idx], self.class_names, self.row_ids[idx],
                          self.source)

    def of_class(self, c: int) -> "FewShotSet":
        if c not in self.classes:
            raise DataError(f"class {c} is not one of this few-shot set's classes {self.classes}")
        return self.select(self.labels == c)


def sample_keys(source: str, rows) -> np.ndarray:
    """``source#row`` for each row: the one identity of a sample across markets and uploads."""
    return np.array([f"{source}#{int(r)}" for r in rows], dtype=object)


def key_order(key: str) -> tuple[str, int]:
    """Sort order of sample keys: by source, then by row as a number (so one source's keys sort
    as its row ids do)."""
    source, _, row = str(key).rpartition("#")
    return source, int(row)


def load_fewshot(manifest: FewShotManifest, split: Split | None = None,
                 source: str = "") -> FewShotSet:
    """Materialise a manifest from the train split (pass ``split`` to reuse one already loaded;
    ``source`` names an uploaded split, see :attr:`FewShotSet.source`)."""
    split = split or read_split(manifest.dataset, manifest.split)
    rows = np.array([r for per_class in manifest.row_ids for r in per_class], dtype=np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= len(split)):
        raise DataError(f"few-shot manifest refers to rows outside {manifest.dataset}/{manifest.split}")
    sub = split.rows(rows)
    expected = np.repeat(manifest.classes, manifest.k)
    if not np.array_equal(sub.labels, expected):
        raise DataError(f"few-shot manifest rows of {manifest.dataset} do not carry the labels it claims")
    raw = sub.images if sub.images is not None else sub.texts
    return FewShotSet(manifest, raw, sub.labels, [split.class_names[c] for c in manifest.classes], rows,
                      source)
