"""The sweep's objective: k-fold cross-validation on the few-shot data only.

Each model's k samples per class are split into ``folds`` stratified folds. For fold f, every
target class is sliced on the other folds, the target sets are packed on the other folds, and
the packs are scored on fold f. Nothing here can reach the test split: the functions receive a
market (whose only data door is the train split's few-shot manifests) and the tuning package is
scanned by tests/test_isolation.py.

Fragments are cached on disk by (model, class, slicing config, k, fold, code digest), so a
trial that changes only packing knobs (δ, the packing learning rate or epochs) reuses every
fragment instead of reslicing, and no code version reads another's.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from snp_ray.config import Config, check_range, code_digest
from snp_ray.data.fewshot import FewShotSet, key_order, sample_keys
from snp_ray.errors import ConfigError
from snp_ray.market.market import Market
from snp_ray.packing import PackConfig
from snp_ray.packing.packer import Packer, PackSamples
from snp_ray.slicing.api import ModelSlicer
from snp_ray.slicing.config import SliceConfig
from snp_ray.slicing.fragment import Fragment

log = logging.getLogger(__name__)


@dataclass
class CVConfig(Config):
    """What one objective evaluation covers."""

    k: int = 10
    folds: int = 3                 # stratified folds over each class's k samples
    targets: list[list[int]] = field(default_factory=list)   # target class sets (global ids)
    seed: int = 0                  # few-shot sample seed (the market's manifests)
    fold_seed: int = 0             # how samples are dealt into folds

    def validate(self) -> None:
        check_range("CVConfig", "k", self.k, 2, 100_000)
        check_range("CVConfig", "folds", self.folds, 2, self.k)
        if not self.targets or any(len(set(t)) != len(t) or not t for t in self.targets):
            raise ConfigError("CVConfig.targets must be non-empty class sets without duplicates")


def deal_folds(keys_by_class: dict[int, list[str]], folds: int, fold_seed: int) -> dict[str, int]:
    """Fold of every sample (by key, :attr:`FewShotSet.keys`): each class's samples are dealt
    round-robin after a seeded shuffle, so every fold holds ⌊n/folds⌋ or ⌈n/folds⌉ of them.
    Folds are a property of the sample, not of the model: a train row two models share is held
    out of both in the same fold, while two uploads' rows never collide."""
    out: dict[str, int] = {}
    for c in sorted(keys_by_class):
        keys = sorted(set(keys_by_class[c]), key=key_order)
        order = np.random.default_rng([int(fold_seed), int(c)]).permutation(len(keys))
        for i, j in enumerate(order):
            out[keys[j]] = i % folds
    return out


def fold_of(fs: FewShotSet, fold_map: dict[str, int]) -> np.ndarray:
    """Fold index of each sample of ``fs``."""
    return np.array([fold_map[k] for k in fs.keys], dtype=np.int64)


def manifest_keys(market: Market, model_id: str, manifest) -> dict[int, list[str]]:
    """The sample keys of a model's manifest, per class."""
    source = market.sample_source(model_id, manifest)
    return {int(c): sample_keys(source, rows).tolist()
            for c, rows in zip(manifest.classes, manifest.row_ids)}


def market_folds(market: Market, cv: "CVConfig") -> dict[str, int]:
    """:func:`deal_folds` over the k-shot samples of every model of the market, pooled per class."""
    by_class: dict[int, list[str]] = {}
    for spec in market.specs():
        for c, keys in manifest_keys(market, spec.id, market.manifest(spec.id, cv.k, cv.seed)).items():
            by_class.setdefault(c, []).extend(keys)
    return deal_folds(by_class, cv.folds, cv.fold_seed)


class FragmentCache:
    """Fragments of one CV fold on disk, keyed by everything that determines them, the code that
    slices them included (:func:`snp_ray.config.code_digest`): a cache made by older code is
    never read.

    Safe for concurrent trials on one node: a fragment becomes visible only when its spec (written
    last, atomically) exists; two trials that race both write identical content."""

    def __init__(self, root: str | Path, code: str | None = None):
        self.root = Path(root)
        self.code = code or code_digest()
        self.made = 0
        self.reused = 0

    def key(self, model_identity: str, class_id: int, cfg: SliceConfig, k: int, seed: int, folds: int,
            fold: int, fold_seed: int, train_rows: list[str]) -> str:
        """Everything that decides the fragment, the exact training rows included (folds depend
        on every model of the market, so the same model in another market may train on others),
        and the code digest."""
        body = json.dumps([model_identity, int(class_id), cfg.digest(), k, seed, folds, fold, fold_seed,
                           sorted(str(r) for r in train_rows), self.code])
        return hashlib.sha256(body.encode()).hexdigest()[:32]

    def has(self, key: str) -> bool:
        return (self.root / key / "fragment.json").is_file()

    def _load(self, folder: Path) -> Fragment | None:
        if (folder / "fragment.json").is_file():
            frag = Fragment.load(folder)
            self.reused += 1
            return frag
        return None

    def get_or_make(self, key: str, make: Callable[[], Fragment]) -> Fragment:
        """The cached fragment, or ``make()``'s. Makers of one key are serialised by an exclusive
        ``flock`` (released by the kernel if the holder dies), so concurrent trials slice each
        fragment once and nobody reads a half-written one: the spec is renamed in last."""
        folder = self.root / key
        frag = self._load(folder)
        if frag is not None:
            return frag
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / ".lock", "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                frag = self._load(folder)    # made while we waited
                if frag is not None:
                    return frag
                frag = make()
                frag.save(folder)
                self.made += 1
                return frag
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class FoldSlicer:
    """Makes one model's fragments on one fold's training rows; its slicer is built on first use
    (not at all when every fragment is cached). With the batched engine the first call slices
    every class of ``classes`` the cache still lacks in one pass and hands the others out as the
    cache asks for them; the other engines slice the asked class only."""

    def __init__(self, build: Callable[[], ModelSlicer], classes: list[int],
                 missing: Callable[[int], bool]):
        self.build, self.classes, self.missing = build, [int(c) for c in classes], missing
        self.slicer: ModelSlicer | None = None
        self.made: dict[int, Fragment] = {}

    def __call__(self, class_id: int) -> Fragment:
        class_id = int(class_id)
        if class_id in self.made:
            return self.made.pop(class_id)
        if self.slicer is None:
            self.slicer = self.build()
        if self.slicer.engine != "batched":
            return self.slicer.slice(class_id)
        todo = [class_id] + [c for c in self.classes if c != class_id and self.missing(c)]
        for unit in self.slicer.units(todo):
            self.made.update({f.spec.class_id: f for f in self.slicer.slice_many(unit)})
        return self.made.pop(class_id)


@dataclass
class FoldResult:
    fold: int
    accuracy: float                 # mean over target sets of held-out accuracy
    per_target: list[float]
    fragments_made: int
    fragments_reused: int
    seconds: float
    rows: dict[str, dict[str, list[int]]]   # model id -> train-split rows it trained / held out


def _fold_sets(market: Market, model_id: str, cv: CVConfig, fold: int,
               fold_map: dict[str, int]) -> tuple[FewShotSet, FewShotSet]:
    fs = market.fewshot(model_id, cv.k, cv.seed)
    where = fold_of(fs, fold_map)
    return fs.select(where != fold), fs.select(where == fold)


def evaluate_fold(market: Market, cv: CVConfig, slice_cfg: SliceConfig, pack_cfg: PackConfig,
                  fold: int, cache: FragmentCache,
                  fold_map: dict[str, int] | None = None) -> FoldResult:
    """Slice on the other folds, pack, and score every target set on fold ``fold``."""
    t0 = time.perf_counter()
    made0, reused0 = cache.made, cache.reused
    needed: dict[str, list[int]] = {}
    for target in cv.targets:
        for c in target:
            for spec in market.holders(int(c)):
                needed.setdefault(spec.id, [])
                if c not in needed[spec.id]:
                    needed[spec.id].append(int(c))
    train, held, fragments, rows = {}, {}, {}, {}
    fold_map = fold_map if fold_map is not None else market_folds(market, cv)
    subset = f"cv{cv.folds}-f{fold}-s{cv.fold_seed}"
    for mid, classes in needed.items():
        train[mid], held[mid] = _fold_sets(market, mid, cv, fold, fold_map)
        rows[mid] = {"train": sorted(train[mid].row_ids.tolist()),
                     "held_out": sorted(held[mid].row_ids.tolist())}
        spec = market.spec(mid)
        keys = {c: cache.key(spec.identity, c, slice_cfg, cv.k, cv.seed, cv.folds, fold,
                             cv.fold_seed, train[mid].keys.tolist()) for c in classes}
        make = FoldSlicer(lambda mid=mid: ModelSlicer(market, mid, cv.k, slice_cfg, cv.seed,
                                                      fewshot=train[mid], subset=subset),
                          classes, lambda c, keys=keys: not cache.has(keys[c]))
        for c in classes:
            fragments[(mid, c)] = cache.get_or_make(keys[c], lambda c=c, make=make: make(c))
    accs = []
    for target in cv.targets:
        classes = [int(c) for c in target]
        frs = [f for (mid, c), f in fragments.items() if c in classes]
        holders = sorted({f.spec.source_model for f in frs})
        samples = PackSamples.from_fewshot([train[m] for m in holders], classes)
        val = PackSamples.from_fewshot([held[m] for m in holders], classes)
        packed = Packer(pack_cfg).pack(frs, samples, classes)
        accs.append(float(np.mean(packed.predict(val.raw) == val.labels)))
    return FoldResult(fold=fold, accuracy=statistics.fmean(accs), per_target=accs,
                      fragments_made=cache.made - made0, fragments_reused=cache.reused - reused0,
                      seconds=time.perf_counter() - t0, rows=rows)


def cross_validate(market: Market, cv: CVConfig, slice_cfg: SliceConfig, pack_cfg: PackConfig,
                   cache: FragmentCache,
                   report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """All folds in order; ``report`` receives the running result after each fold (Tune's
    scheduler stops a poor trial between folds)."""
    folds: list[FoldResult] = []
    fold_map = market_folds(market, cv)           # dealt once; every fold reads the same map
    for f in range(cv.folds):
        folds.append(evaluate_fold(market, cv, slice_cfg, pack_cfg, f, cache, fold_map))
        metrics = {"cv_accuracy": statistics.fmean(r.accuracy for r in folds), "folds_done": f + 1,
                   "fold_accuracy": folds[-1].accuracy,
                   "fragments_made": sum(r.fragments_made for r in folds),
                   "fragments_reused": sum(r.fragments_reused for r in folds)}
        log.info("fold %d/%d: held-out accuracy %.4f (made %d fragments, reused %d)", f + 1,
                 cv.folds, folds[-1].accuracy, folds[-1].fragments_made, folds[-1].fragments_reused)
        if report is not None:
            report(metrics)
    return {**metrics, "folds": [r.__dict__ for r in folds]}
