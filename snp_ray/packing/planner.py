"""Request planner: which stored fragments serve each requested class (issue #14).

In a market of many developers a class has many holders, and packing every holder's fragment
costs pack time and parameters while a weak fragment can hurt. A policy picks per class:

- ``best``: the one fragment with the best few-shot validation score;
- ``top-<m>`` (e.g. ``top-2``): the m best;
- ``all``: every holder's fragment;
- ``random``: one holder drawn at random (seeded by the request, the class and the seed): the
  control that shows what the scores buy, on the same requests.

Score [ours]: the AUC of the fragment's own binary head (class c vs rest) on the market's
few-shot samples of c against those of the request's other classes, **held out**: the samples of
the fragment's own model (it was sliced on them) are left out, so a fragment is judged on other
developers' uploads. Only few-shot data is read, never the test split. The class scores of a
fragment on the market's few-shot pool are computed once and cached, so scoring a request costs
one forward pass per fragment not seen before (then only index arithmetic).
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from snp_ray.config import Config
from snp_ray.errors import ArtifactNotFoundError, ConfigError, UnknownNameError
from snp_ray.market.market import Market
from snp_ray.market.modelstore import ModelSpec
from snp_ray.metrics import roc_auc
from snp_ray.packing.config import PackConfig
from snp_ray.packing.model import PackedModel
from snp_ray.packing.packer import Packer, PackSamples
from snp_ray.slicing.api import pair_key
from snp_ray.slicing.config import SliceConfig
from snp_ray.slicing.fragment import Fragment
from snp_ray.store import market_fragment_store

log = logging.getLogger(__name__)

_TOP = re.compile(r"top-([1-9][0-9]*)")
PLAN_NAMES = ("best", "top-<m>", "all", "random")
SAMPLES = ("chosen", "union")


@dataclass
class PlanConfig(Config):
    """How a request is planned. ``samples``: the pack trains on the chosen fragments' own
    developers' k shots (``chosen``: ``best`` then packs with exactly k shots per class) or on
    every holder's k shots (``union``: the same data whatever the policy)."""

    policy: str = "best"
    samples: str = "chosen"
    #: score candidates on at most this many of a requester's samples per class (a seeded
    #: subset; 0: all): scoring costs a forward pass per candidate and sample, packing does not
    score_samples: int = 0

    def validate(self) -> None:
        if self.policy not in ("best", "all", "random") and not _TOP.fullmatch(self.policy):
            raise UnknownNameError("plan", self.policy, PLAN_NAMES)
        if self.score_samples < 0:
            raise ConfigError(f"PlanConfig.score_samples must be >= 0, got {self.score_samples}")
        if self.samples not in SAMPLES:
            raise UnknownNameError("plan sample source", self.samples, SAMPLES)

    @property
    def m(self) -> int | None:
        """Fragments kept per class (None: all)."""
        if self.policy == "all":
            return None
        return 1 if self.policy in ("best", "random") else int(_TOP.fullmatch(self.policy).group(1))


class FewShotPool:
    """Labeled samples the planner scores on, loaded once, each tagged with the model that
    uploaded it ("" for a requester's) and its key (:attr:`FewShotSet.keys`)."""

    def __init__(self, raw, labels: np.ndarray, models: np.ndarray, keys: np.ndarray):
        self.raw, self.labels = raw, np.asarray(labels)
        self.models, self.keys = np.asarray(models), np.asarray(keys, dtype=object)

    @classmethod
    def from_market(cls, market: Market, k: int, seed: int = 0,
                    model_ids: list[str] | None = None) -> "FewShotPool":
        raws, labels, models, keys = [], [], [], []
        for mid in model_ids or market.ids():
            s = market.fewshot(mid, k, seed)
            raws.append(s.raw)
            labels.append(s.labels)
            models += [mid] * len(s)
            keys.append(s.keys)
        if not raws:
            raise ConfigError(f"the market at {market.root} holds no models")
        raw = np.concatenate(raws) if isinstance(raws[0], np.ndarray) else sum(map(list, raws), [])
        return cls(raw, np.concatenate(labels), np.asarray(models), np.concatenate(keys))

    @classmethod
    def from_samples(cls, samples: PackSamples) -> "FewShotPool":
        """A requester's samples: no fragment was sliced on them, so all are held out."""
        return cls(samples.raw, samples.labels, np.full(len(samples), ""), samples.keys)


class ScoreCache:
    """Class scores of fragments on a pool, one forward pass per fragment key."""

    def __init__(self, pool: FewShotPool, batch: int = 1000):
        self.pool, self.batch = pool, batch
        self._scores: dict[str, np.ndarray] = {}

    @torch.no_grad()
    def scores(self, fragment: Fragment) -> np.ndarray:
        key = fragment.spec.key
        if key not in self._scores:
            fragment.eval()
            raw = self.pool.raw
            self._scores[key] = np.concatenate([fragment.class_score(raw[i:i + self.batch]).numpy()
                                                for i in range(0, len(self.pool.labels), self.batch)])
        return self._scores[key]


#: how a candidate was scored, best evidence first; candidates are ranked within a tier only
TIERS = ("requester AUC", "held-out few-shot AUC", "in-sample few-shot AUC",
         "slice-time few-shot AUC")


def held_out_auc(fragment: Fragment, classes: list[int], cache: ScoreCache,
                 basis: str = "held-out few-shot AUC", seen: np.ndarray | None = None
                 ) -> dict[str, Any]:
    """AUC of ``fragment``'s class score: its class against the request's other classes, on the
    pool's samples that its own model did not upload (and no sample its model saw). Where
    nobody else uploaded the class (or the others), the score falls back to every sample, then
    to the slice-time AUC; ``source`` says which, and :func:`choose` never ranks a fallback
    above an honest held-out score. ``seen``: more sample keys the fragment was sliced on (its
    model's shots, when the pool is a requester's that may hold the same train rows)."""
    pool, c = cache.pool, fragment.spec.class_id
    own_keys = pool.keys[pool.models == fragment.spec.source_model]
    if seen is not None:
        own_keys = np.concatenate([own_keys, seen])
    held = (pool.models != fragment.spec.source_model) & ~np.isin(pool.keys, own_keys)
    others = [x for x in classes if x != c]
    pos, neg = held & (pool.labels == c), held & np.isin(pool.labels, others)
    source = basis
    if not pos.any() or not neg.any():   # nobody else uploaded c (or the others)
        pos, neg = pool.labels == c, np.isin(pool.labels, others)
        source = "in-sample few-shot AUC"
    mask = pos | neg
    if not pos.any() or not neg.any():
        return {"score": fragment.spec.metrics.get("fewshot_auc", 0.0), "n_pos": int(pos.sum()),
                "n_neg": int(neg.sum()), "in_sample": True, "source": TIERS[-1]}
    s = cache.scores(fragment)
    return {"score": roc_auc(s[mask], pos[mask]), "n_pos": int(pos.sum()), "n_neg": int(neg.sum()),
            "in_sample": source == "in-sample few-shot AUC", "source": source}


def choose(frags: list[Fragment], classes: list[int], cache: ScoreCache, cfg: PlanConfig,
           seen: Callable[[Fragment], np.ndarray] | None = None, seed: int = 0
           ) -> tuple[list[Fragment], list[dict[str, Any]]]:
    """Rank one class's candidate fragments and keep the policy's share. Scores of different
    kinds are not comparable (an in-sample AUC is inflated by the samples the fragment was
    sliced on), so candidates rank by tier first (:data:`TIERS`), then by score, then by model
    id. ``random`` keeps one candidate drawn by an RNG seeded with (seed, the class, the
    request), whatever the scores. Returns (chosen fragments, every candidate's row, best first)."""
    basis = "requester AUC" if (cache.pool.models == "").all() else "held-out few-shot AUC"
    rows = [{"model": f.spec.source_model, "key": f.spec.key, "params": f.spec.params,
             **held_out_auc(f, classes, cache, basis, seen(f) if seen else None)} for f in frags]
    order = sorted(range(len(frags)), key=lambda i: (TIERS.index(rows[i]["source"]),
                                                     -rows[i]["score"], rows[i]["model"]))
    keep = order if cfg.m is None else order[:cfg.m]
    if cfg.policy == "random":
        drawn = np.random.default_rng([seed, frags[0].spec.class_id, *sorted(classes)])
        keep = [order[int(drawn.integers(len(order)))]]
    for rank, i in enumerate(order):
        rows[i]["rank"] = rank + 1
        rows[i]["chosen"] = i in keep
    return [frags[i] for i in keep], [rows[i] for i in order]


@dataclass
class Plan:
    """The fragments chosen per class, and every candidate's score (why)."""

    policy: str
    samples: str
    classes: list[int]
    chosen: dict[int, list[Fragment]]
    candidates: dict[int, list[dict[str, Any]]]
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def fragments(self) -> list[Fragment]:
        return [f for c in self.classes for f in self.chosen[c]]

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "samples": self.samples, "seconds": round(self.seconds, 4),
                "classes": [{"class_id": c,
                             "chosen": [f.spec.source_model for f in self.chosen[c]],
                             "candidates": self.candidates[c]} for c in self.classes]}


def plan_request(market: Market, classes: list[int], k: int, slice_cfg: SliceConfig,
                 cfg: PlanConfig, seed: int = 0, cache: ScoreCache | None = None,
                 load: Callable[[str], Fragment] | None = None,
                 holders_of: Callable[[int], list[ModelSpec]] | None = None,
                 requester: PackSamples | None = None) -> Plan:
    """Score every holder's fragment of each requested class and keep the policy's choice.

    ``load(key)`` fetches a fragment (default: the market's fragment store); ``cache`` reuses
    class scores across requests (default: a pool of the holders of the requested classes);
    ``holders_of(class)`` limits the candidates (default: every model holding the class, e.g. a
    service passes the holders whose fragment is stored). With ``requester`` samples, a class
    that they hold (with samples of another requested class) is scored on them alone: no
    fragment was sliced on them; other classes fall back to the market's held-out shots."""
    holders_of = holders_of or market.holders
    t0 = time.perf_counter()
    if load is None:
        store = market_fragment_store(market)

        def load(key: str) -> Fragment:
            if not store.has(key):
                raise ArtifactNotFoundError(f"no fragment {key} in {market.root}; slice the "
                                            f"market first (snp slice --store {market.root} --k {k})")
            return store.get(key)
    frags = {}
    for c in classes:
        holders = holders_of(c)
        if not holders:
            raise ConfigError(f"class {c} is held by no model of {market.root}")
        frags[c] = [load(pair_key(spec, c, slice_cfg, k, seed)) for spec in holders]
    chosen, candidates = choose_holders(market, frags, list(classes), k, cfg, seed, cache, requester)
    return Plan(cfg.policy, cfg.samples, list(classes), chosen, candidates,
                time.perf_counter() - t0)


def choose_holders(market: Market, frags: dict[int, list[Fragment]], classes: list[int], k: int,
                   cfg: PlanConfig, seed: int = 0, cache: ScoreCache | None = None,
                   requester: PackSamples | None = None
                   ) -> tuple[dict[int, list[Fragment]], dict[int, list[dict[str, Any]]]]:
    """The one holder selector: for each class of ``frags`` (class -> its holders' fragments),
    the policy's share by :func:`choose` (tier, then score, then model id). ``classes`` are the
    request's (a fragment is scored against the others); ``cache`` scores on the market's k shots
    (default: a pool of the holders' shots). With ``requester`` samples, a class they hold (with
    samples of another requested class) is scored on them alone, less the shots each fragment
    was sliced on; other classes on the market's held-out shots. Returns (chosen, candidates)."""
    theirs = None
    if requester is not None:
        requester = requester.only(classes)
        theirs = ScoreCache(FewShotPool.from_samples(scoring_subset(requester, cfg.score_samples)))
    present = set() if requester is None else set(np.unique(requester.labels).tolist())

    def market_cache() -> ScoreCache:
        nonlocal cache
        if cache is None:
            holders = sorted({f.spec.source_model for fs in frags.values() for f in fs})
            cache = ScoreCache(FewShotPool.from_market(market, k, seed, holders))
        return cache

    chosen, candidates = {}, {}
    for c, fs in frags.items():
        if c in present and len(present) > 1:    # the requester's samples, less the shots
            shots = market_cache().pool       # each fragment was sliced on (same train rows)
            chosen[c], candidates[c] = choose(
                fs, classes, theirs, cfg,
                seen=lambda f: shots.keys[shots.models == f.spec.source_model], seed=seed)
        else:
            chosen[c], candidates[c] = choose(fs, classes, market_cache(), cfg, seed=seed)
        log.info("class %s: %s of %d holders (%s %.3f: %s)", c, cfg.policy, len(fs),
                 candidates[c][0]["source"], candidates[c][0]["score"],
                 [f.spec.source_model for f in chosen[c]])
    return chosen, candidates


def scoring_subset(samples: PackSamples, per_class: int, seed: int = 0) -> PackSamples:
    """At most ``per_class`` samples of each class (0: all), a seeded choice."""
    if per_class <= 0:
        return samples
    keep = []
    for c in np.unique(samples.labels):
        idx = np.flatnonzero(samples.labels == c)
        keep.append(idx[np.random.default_rng([seed, int(c)]).permutation(idx.size)[:per_class]])
    idx = np.sort(np.concatenate(keep))
    if idx.size == len(samples):
        return samples
    raw = samples.raw[idx] if isinstance(samples.raw, np.ndarray) else [samples.raw[i] for i in idx]
    return PackSamples(samples.dataset, raw, samples.labels[idx], samples.class_names,
                       samples.keys[idx], samples.counts)


def plan_samples(market: Market, plan: Plan, k: int, seed: int = 0,
                 requester: PackSamples | None = None,
                 with_market_shots: bool = False) -> PackSamples:
    """The samples the planned pack trains on: the market's few-shot samples (see
    :class:`PlanConfig`), or a ``requester``'s own, optionally with the market's beside them."""
    if requester is not None:
        requester = requester.only(plan.classes)
        if not with_market_shots:
            return requester
    sets = []
    for c in plan.classes:
        models = ([f.spec.source_model for f in plan.chosen[c]] if plan.samples == "chosen"
                  else [s.id for s in market.holders(c)])
        sets += [market.fewshot(m, k, seed).of_class(c) for m in models]
    shots = PackSamples.from_fewshot(sets, plan.classes)
    return shots if requester is None else requester.with_(shots)


def pack_planned(market: Market, plan: Plan, k: int, pack_cfg: PackConfig | None = None,
                 seed: int = 0, requester: PackSamples | None = None,
                 with_market_shots: bool = False) -> PackedModel:
    """Pack the plan's fragments on the plan's samples."""
    samples = plan_samples(market, plan, k, seed, requester, with_market_shots)
    return Packer(pack_cfg or PackConfig()).pack(plan.fragments(), samples, plan.classes)
