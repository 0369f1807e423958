"""Choose a model's slicing config by cross-validation over its few-shot samples only.

For every candidate :class:`SliceConfig`, each class of the model is sliced on ``folds - 1`` of
``folds`` stratified folds of the model's k shots, and the fragment's own binary head (class vs
the model's other classes) is scored by ROC-AUC on the held-out fold. A candidate's score is that
AUC averaged over folds and classes; the best mean wins, and a candidate within ``tie`` of the
best counts as tied: among tied candidates the smaller fragments win, then the earlier candidate
(list the default first). Nothing here reads the test split: the only data door is the market's
few-shot manifests of the train split (the tuning package is scanned by tests/test_isolation.py).

Fold fragments are cached on disk (:class:`FragmentCache`), keyed by everything that decides them,
so a rerun (or a job that resumes) reslices nothing it already has.
"""
from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from snp_ray.data.tables import test_split_fenced
from snp_ray.errors import ConfigError
from snp_ray.market.market import Market
from snp_ray.metrics import roc_auc
from snp_ray.slicing.api import ModelSlicer
from snp_ray.slicing.config import SliceConfig, slice_preset
from snp_ray.tuning.objective import FoldSlicer, FragmentCache, deal_folds, fold_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """A named slicing config: a preset plus field overrides."""

    name: str
    preset: str = "quick"
    overrides: tuple[tuple[str, Any], ...] = ()

    def config(self) -> SliceConfig:
        return slice_preset(self.preset, **dict(self.overrides))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "preset": self.preset, "overrides": dict(self.overrides),
                "digest": self.config().digest()}


#: the short list ``--slice-preset auto`` tries, default first. ``quick`` keeps the units whose
#: pooling score exceeds 0.4 of the layer's best (threshold mode, beta 0.6), which in MobileNetV2's
#: narrow late layers can be a few dozen of 480; the rate candidates keep a fixed share instead.
CANDIDATES: dict[str, Candidate] = {
    "quick": Candidate("quick"),
    "quick-rate0.3": Candidate("quick-rate0.3", "quick", (("mode", "rate"), ("beta", 0.3))),
    "quick-rate0.5": Candidate("quick-rate0.5", "quick", (("mode", "rate"), ("beta", 0.5))),
    # the expanded units of inverted residuals kept whole, the other layers as in quick
    "quick-dw1.0": Candidate("quick-dw1.0", "quick", (("depthwise_rate", 1.0),)),
    # a residual stage's shared units at a fixed share, the other layers as in quick (#17 §3)
    "quick-coupled0.5": Candidate("quick-coupled0.5", "quick", (("coupled_rate", 0.5),)),
    "quick-coupled0.35": Candidate("quick-coupled0.35", "quick", (("coupled_rate", 0.35),)),
    "quick-coupled0.25": Candidate("quick-coupled0.25", "quick", (("coupled_rate", 0.25),)),
    "quick-gamma4": Candidate("quick-gamma4", "quick", (("gamma", 4.0),)),
    "quick-adapt4": Candidate("quick-adapt4", "quick", (("adapt_epochs", 4),)),
}
DEFAULT_CANDIDATES = ("quick", "quick-rate0.3", "quick-rate0.5")


def parse_candidates(text: str) -> list[Candidate]:
    """``"quick,quick-rate0.3"``: names of :data:`CANDIDATES` (or of any preset, unchanged)."""
    out = []
    for name in (n.strip() for n in text.split(",")):
        if not name:
            continue
        cand = CANDIDATES.get(name) or Candidate(name, name)
        cand.config()                 # an unknown preset fails here, with the names it knows
        out.append(cand)
    if not out or len({c.name for c in out}) != len(out):
        raise ConfigError(f"candidates must be distinct and non-empty, got {text!r}")
    return out


def model_folds(market: Market, model_id: str, k: int, folds: int, seed: int = 0,
                fold_seed: int = 0):
    """(few-shot set, fold of each sample): the model's own k shots dealt into stratified folds."""
    fs = market.fewshot(model_id, k, seed)
    m = fs.manifest
    fmap = deal_folds({int(c): fs.keys[fs.labels == c].tolist() for c in m.classes}, folds, fold_seed)
    return fs, fold_of(fs, fmap)


def cv_scores(market: Market, model_id: str, cfg: SliceConfig, k: int, cache: FragmentCache,
              folds: int = 3, seed: int = 0, fold_seed: int = 0, folds_used: int = 0,
              classes: list[int] | None = None) -> dict[str, Any]:
    """Held-out binary-head AUC of every (class, fold) fragment of ``model_id`` under ``cfg``.

    ``folds_used``: score only the first n of the ``folds`` folds (0: all), a CPU budget knob:
    each fragment still trains on ``folds - 1`` folds and is scored on the one it never saw.
    ``classes``: a subset of the model's classes (to share the work between processes; the
    cache serves the rest to a later full call)."""
    if not 2 <= folds <= k:
        raise ConfigError(f"folds must be in [2, k={k}], got {folds}")
    if not 0 <= folds_used <= folds:
        raise ConfigError(f"folds_used must be in [0, folds={folds}], got {folds_used}")
    spec = market.spec(model_id)
    fs, where = model_folds(market, model_id, k, folds, seed, fold_seed)
    t0, made0, reused0 = time.perf_counter(), cache.made, cache.reused
    per_class: dict[str, list[float]] = {}
    params, seconds = [], []
    for f in range(folds_used or folds):
        train, held = fs.select(where != f), fs.select(where == f)
        train_rows = sorted(train.keys.tolist())
        todo = [int(c) for c in (classes if classes is not None else spec.classes)]
        keys = {c: cache.key(spec.identity, c, cfg, k, seed, folds, f, fold_seed, train_rows)
                for c in todo}
        make = FoldSlicer(lambda train=train, f=f: ModelSlicer(market, model_id, k, cfg, seed, fewshot=train,
                                                               subset=f"cv{folds}-f{f}-s{fold_seed}"),
                          todo, lambda c, keys=keys: not cache.has(keys[c]))
        for c in todo:
            frag = cache.get_or_make(keys[c], lambda c=c, make=make: make(c))
            scores = frag.class_score(held.raw).numpy()
            auc = roc_auc(scores, (held.labels == c).astype(np.int64))
            per_class.setdefault(frag.spec.class_name, []).append(auc)
            params.append(frag.spec.params / frag.spec.source_params)
            seconds.append(frag.spec.seconds)
            log.info("%s %s fold %d/%d: held-out AUC %.3f (%d held-out samples)", model_id,
                     frag.spec.class_name, f + 1, folds, auc, len(held))
    aucs = [a for v in per_class.values() for a in v if not math.isnan(a)]
    return {"cv_auc": statistics.fmean(aucs) if aucs else float("nan"), "folds_used": folds_used or folds,
            "per_class": {c: statistics.fmean(v) for c, v in per_class.items()},
            "per_fold": per_class, "param_ratio_mean": statistics.fmean(params),
            "fold_slice_seconds": seconds, "seconds": time.perf_counter() - t0,
            "fragments_made": cache.made - made0, "fragments_reused": cache.reused - reused0}


def choose(rows: list[dict[str, Any]], tie: float = 0.005) -> int:
    """Index of the winner among ``rows`` (each with ``cv_auc`` and ``param_ratio_mean``, in
    candidate order): the best mean CV AUC; candidates within ``tie`` of it are tied, and among
    them the smaller fragments win, then the earlier candidate."""
    valid = [i for i, r in enumerate(rows) if not math.isnan(r["cv_auc"])]
    if not valid:
        return 0
    best = max(rows[i]["cv_auc"] for i in valid)
    tied = [i for i in valid if rows[i]["cv_auc"] >= best - tie]
    return min(tied, key=lambda i: (round(rows[i]["param_ratio_mean"], 6), i))


def select_config(market: Market, model_id: str, candidates: list[Candidate], k: int,
                  cache: FragmentCache, folds: int = 3, seed: int = 0, fold_seed: int = 0,
                  tie: float = 0.005, folds_used: int = 0) -> dict[str, Any]:
    """Score every candidate by :func:`cv_scores` and pick one by :func:`choose`.

    Returns ``{"model", "chosen" (candidate name), "config" (its SliceConfig as a dict),
    "table" (one row per candidate: name, overrides, cv_auc, per-class AUCs, ...)}``."""
    table = []
    for cand in candidates:
        row = {**cand.describe(), **cv_scores(market, model_id, cand.config(), k, cache, folds,
                                              seed, fold_seed, folds_used)}
        log.info("%s: candidate %s CV AUC %.4f (fragments %.3f of the source, %.0f s)", model_id,
                 cand.name, row["cv_auc"], row["param_ratio_mean"], row["seconds"])
        table.append(row)
    i = choose(table, tie)
    return {"model": model_id, "chosen": candidates[i].name, "candidate": candidates[i].describe(),
            "config": candidates[i].config().to_dict(), "folds": folds,
            "folds_used": folds_used or folds, "fold_seed": fold_seed,
            "tie": tie, "table": table}


def select_models(market: Market, candidates: list[Candidate], k: int, cache: FragmentCache,
                  models: list[str] | None = None, folds: int = 3, folds_used: int = 0
                  ) -> tuple[dict[str, Candidate], dict[str, Any]]:
    """Each model's slicing config by :func:`select_config`, with the test split fenced off in
    this process while it runs (:func:`~snp_ray.data.tables.test_split_fenced`); a model not in
    ``models`` (default: all) gets the first candidate. Returns (model id -> its candidate, the
    record: candidates, folds, fold fragments made and reused, each selected model's result)."""
    wanted = models or market.ids()
    chosen, record = {}, {}
    with test_split_fenced():
        for mid in market.ids():
            if mid not in wanted:
                chosen[mid] = candidates[0]
                continue
            t0 = time.perf_counter()
            result = select_config(market, mid, candidates, k, cache, folds=folds,
                                   folds_used=folds_used)
            result["seconds"] = time.perf_counter() - t0
            chosen[mid] = next(c for c in candidates if c.name == result["chosen"])
            record[mid] = result
            log.info("%s: chose %s (CV AUC %s)", mid, result["chosen"],
                     {r["name"]: round(r["cv_auc"], 4) for r in result["table"]})
    return chosen, {"candidates": [c.describe() for c in candidates], "folds": folds,
                    "folds_used": folds_used or folds, "fold_fragments_made": cache.made,
                    "fold_fragments_reused": cache.reused, "models": record}
