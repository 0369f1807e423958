"""Task presets T1-T7 and T3-C10 (method notes section 4) and their target class sets.

A task fixes the dataset, which global classes each original model holds, and how target class
sets are drawn. Splits the paper leaves open are our reconstruction, as documented in
``shared/docs/method-notes.md``.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from snp_ray.config import Config, check_clean_seed
from snp_ray.errors import ConfigError, UnknownNameError

#: CIFAR-100 fine class -> superclass (the official ``meta`` table, fine labels alphabetical)
CIFAR100_FINE_TO_COARSE = [
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11, 6, 11, 5, 10, 7, 6, 13, 15, 3,
    15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5, 5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0,
    17, 4, 18, 17, 10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13, 16, 19, 2,
    4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13]

TARGET_MODES = ("one_per_model", "all", "request")


@dataclass
class TaskConfig(Config):
    name: str
    dataset: str
    model_classes: list[list[int]]   # global class ids held by each original model
    target_mode: str                 # one_per_model: one class from each model; all: every class
    default_arch: str
    description: str = ""
    shards: bool = False             # each model trains on its own disjoint shard of the train rows
    request_size: int = 0            # target_mode "request": classes per request (any holders)
    #: images of each class each model trains on (aligned with ``model_classes``), drawn by a
    #: seeded permutation per (model, class), so models overlap (the learnware protocol);
    #: empty: every train row of the model's classes (or its shard)
    train_counts: list[list[int]] = field(default_factory=list)

    def validate(self) -> None:
        if self.target_mode not in TARGET_MODES:
            raise ConfigError(f"TaskConfig.target_mode must be one of {TARGET_MODES}")
        if self.target_mode == "request" and not 1 <= self.request_size <= len(self.classes):
            raise ConfigError(f"task {self.name}: request_size must be in [1, {len(self.classes)}], "
                              f"got {self.request_size}")
        if not self.model_classes or any(len(c) < 2 for c in self.model_classes):
            raise ConfigError(f"task {self.name}: every model needs at least two classes")
        if any(len(set(c)) != len(c) for c in self.model_classes):
            raise ConfigError(f"task {self.name}: a model lists a class twice")
        if self.train_counts and ([len(c) for c in self.train_counts] !=
                                  [len(c) for c in self.model_classes] or self.shards):
            raise ConfigError(f"task {self.name}: train_counts must give one count per class of "
                              "every model, and cannot be combined with shards")

    @property
    def num_models(self) -> int:
        return len(self.model_classes)

    @property
    def classes(self) -> list[int]:
        return sorted({c for cs in self.model_classes for c in cs})

    def holders(self, c: int) -> list[int]:
        """Indices of the models that hold global class ``c``."""
        return [i for i, cs in enumerate(self.model_classes) if c in cs]


def _cifar100_superclass_split() -> list[list[int]]:
    by_coarse = [[f for f in range(100) if CIFAR100_FINE_TO_COARSE[f] == s] for s in range(20)]
    return [[f for s in range(4 * i, 4 * i + 4) for f in by_coarse[s]] for i in range(5)]


def _cifar100_across_superclasses() -> list[list[int]]:
    by_coarse = [[f for f in range(100) if CIFAR100_FINE_TO_COARSE[f] == s] for s in range(20)]
    return [[by_coarse[s][i] for s in range(20)] for i in range(5)]


def _random_partition(n_classes: int, n_models: int, seed: int) -> list[list[int]]:
    perm = np.random.default_rng(seed).permutation(n_classes)
    size = n_classes // n_models
    return [sorted(int(c) for c in perm[i * size:(i + 1) * size]) for i in range(n_models)]


PARTITION_SEED = 2025


def _random_classes(n_classes: int, n_models: int, per_model: int, seed: int) -> list[list[int]]:
    """Each model draws ``per_model`` distinct classes at random (models may overlap; a market
    of many developers holds every class many times)."""
    rng = np.random.default_rng(seed)
    return [sorted(int(c) for c in rng.choice(n_classes, per_model, replace=False))
            for _ in range(n_models)]


def shard_rows(task: "TaskConfig", index: int, labels: np.ndarray) -> np.ndarray:
    """Train-split rows of model ``index``'s own shard (sorted): every class's rows are split,
    by a seeded permutation, into equal disjoint parts, one per model holding the class, so no
    two models see the same image. Training and few-shot sampling both draw from it."""
    if not task.shards:
        raise ConfigError(f"task {task.name} has no disjoint shards")
    rows = []
    for c in task.model_classes[index]:
        holders = task.holders(c)
        idx = np.flatnonzero(labels == c)
        perm = idx[np.random.default_rng([PARTITION_SEED, int(c)]).permutation(idx.size)]
        rows.append(np.array_split(perm, len(holders))[holders.index(index)])
    return np.sort(np.concatenate(rows))

def model_rows(task: "TaskConfig", index: int, labels: np.ndarray) -> np.ndarray | None:
    """Train-split rows model ``index`` trained on (sorted; None: every row of its classes).
    Training and few-shot sampling both draw from them."""
    if task.shards:
        return shard_rows(task, index, labels)
    if not task.train_counts:
        return None
    rows = []
    for c, n in zip(task.model_classes[index], task.train_counts[index]):
        idx = np.flatnonzero(labels == c)
        if idx.size < n:
            raise ConfigError(f"task {task.name}: class {c} has {idx.size} train rows, model "
                              f"{index} needs {n}")
        rows.append(idx[np.random.default_rng([PARTITION_SEED, index, int(c)]).permutation(idx.size)[:n]])
    return np.sort(np.concatenate(rows))


#: the learnware market's CIFAR-10 image scenario: each uploader's share of its 4 classes
LEARNWARE_RATIOS = (0.4, 0.4, 0.1, 0.1)


def _learnware_market(n_models: int, images: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """Each model draws 4 of the 10 classes, in a random order, and ``images`` train images
    split over them at :data:`LEARNWARE_RATIOS` (12,500: 5,000 / 5,000 / 1,250 / 1,250)."""
    rng = np.random.default_rng(seed)
    while True:            # redrawn until every class has a holder (users may ask for any)
        classes, counts = [], []
        for _ in range(n_models):
            drawn = [int(c) for c in rng.choice(10, len(LEARNWARE_RATIOS), replace=False)]
            n = {c: int(round(r * images)) for c, r in zip(drawn, LEARNWARE_RATIOS)}
            classes.append(sorted(drawn))
            counts.append([n[c] for c in sorted(drawn)])
        if len({c for cs in classes for c in cs}) == 10:
            return classes, counts


_LW = _learnware_market(50, 12_500, PARTITION_SEED)
_LW_SMOKE = _learnware_market(6, 500, PARTITION_SEED)

TASKS: dict[str, TaskConfig] = {t.name: t for t in [
    TaskConfig("T1", "cifar10", [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]], "one_per_model", "vgg11",
               "CIFAR-10, 3 models"),
    TaskConfig("T2", "cifar100", _cifar100_superclass_split(), "one_per_model", "vgg11",
               "CIFAR-100, 5 models, each 4 whole superclasses"),
    TaskConfig("T3", "cifar100", _cifar100_across_superclasses(), "one_per_model", "vgg11",
               "CIFAR-100, 5 models, each the i-th fine class of every superclass"),
    TaskConfig("T4", "cifar100", _random_partition(100, 5, PARTITION_SEED), "one_per_model",
               "vgg11", "CIFAR-100, 5 models, seeded random partition"),
    TaskConfig("T5", "cifar100", _random_partition(100, 10, PARTITION_SEED), "one_per_model",
               "vgg11", "CIFAR-100, 10 models, seeded random partition"),
    TaskConfig("T6", "trec", [[0, 1, 2], [3, 4, 5]], "all", "gru", "TREC, 2 RNN models"),
    TaskConfig("T7", "sst5", [[0, 1, 2], [2, 3, 4]], "all", "textcnn",
               "SST-5, 2 TextCNN models sharing class 2"),
    TaskConfig("C10-M50", "cifar10", _random_classes(10, 50, 4, PARTITION_SEED), "request", "vgg11",
               "CIFAR-10, 50 developers' models of 4 random classes, disjoint train shards",
               shards=True, request_size=6),
    TaskConfig("C10-M12", "cifar10", _random_classes(10, 12, 4, PARTITION_SEED), "request", "vgg11",
               "CIFAR-10, 12 models of 4 random classes, disjoint train shards (smoke)",
               shards=True, request_size=6),
    TaskConfig("C10-1", "cifar10", [list(range(10))], "all", "vgg11",
               "CIFAR-10, one model of all 10 classes (the batched slicer's benchmark)"),
    TaskConfig("LW-C10", "cifar10", _LW[0],
               "request", "lwconv", "CIFAR-10, the learnware market's image scenario: 50 models of "
               "4 classes, 12,500 train images each at 0.4/0.4/0.1/0.1", request_size=6,
               train_counts=_LW[1]),
    TaskConfig("LW-C10-S", "cifar10", _LW_SMOKE[0],
               "request", "lwconv", "LW-C10's smoke version: 6 models of 500 images", request_size=6,
               train_counts=_LW_SMOKE[1]),
    TaskConfig("T3-C10", "cifar10", [sorted({(2 * i + j) % 10 for j in range(4)}) for i in range(5)],
               "one_per_model", "vgg11", "CIFAR-10, 5 models of 4 classes, each class held twice"),
]}


def get_task(name: str) -> TaskConfig:
    try:
        return TASKS[name]
    except KeyError:
        raise UnknownNameError("task", name, list(TASKS)) from None


def combinations(task: TaskConfig) -> list[tuple[int, ...]]:
    """Every target class set of a one-class-per-model task (distinct classes), in order."""
    if task.target_mode == "all":
        return [tuple(task.classes)]
    if task.target_mode == "request":
        return list(itertools.combinations(task.classes, task.request_size))
    return [combo for combo in itertools.product(*task.model_classes) if len(set(combo)) == len(combo)]


def count_combinations(task: TaskConfig) -> int:
    """T of the expansion formula. Closed form when the models' class sets are disjoint."""
    sets = [set(c) for c in task.model_classes]
    disjoint = sum(map(len, sets)) == len(set().union(*sets))
    if task.target_mode == "all":
        return 1
    if task.target_mode == "request":
        return math.comb(len(task.classes), task.request_size)
    return math.prod(map(len, sets)) if disjoint else len(combinations(task))


def target_sets(task: TaskConfig, n: int, seed: int) -> list[tuple[int, ...]]:
    """``n`` distinct seeded target class sets (all of them when fewer exist). Every table's
    target sets, every planner request and every expansion combination is drawn here, so the
    reserved seeds are fenced here (:func:`snp_ray.config.check_clean_seed`)."""
    check_clean_seed(seed, "target-set")
    if n < 1:
        raise ConfigError(f"number of target sets must be >= 1, got {n}")
    if task.target_mode == "all":
        return [tuple(task.classes)]
    rng = np.random.default_rng(seed)
    total = count_combinations(task)
    if total <= n or total <= 100_000:
        combos = combinations(task)
        pick = rng.permutation(len(combos))[: min(n, len(combos))]
        return [combos[i] for i in pick]
    seen: dict[tuple[int, ...], None] = {}
    while len(seen) < n:
        combo = tuple(int(rng.choice(cs)) for cs in task.model_classes)
        if len(set(combo)) == len(combo):
            seen.setdefault(combo, None)
    return list(seen)
