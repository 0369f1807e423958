"""Request planner: which stored fragments serve each requested class (issue #14).

In a market of many developers a class has many holders, and packing every holder's fragment
costs pack time and parameters while a weak fragment can hurt. A policy picks per class:

- ``best``: the one fragment with the best few-shot validation score;
- ``top-<m>`` (e.g. ``top-2``): the m best;
- ``all``: every holder's fragment.

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
from snp_ray.packing.config import PackConfig
from snp_ray.packing.model import PackedModel
from snp_ray.packing.packer import Packer, PackSamples
from snp_ray.slicing.api import market_fragment_store, pair_key
from snp_ray.slicing.config import SliceConfig
from snp_ray.slicing.fragment import Fragment
from snp_ray.slicing.slicer import roc_auc

log = logging.getLogger(__name__)

_TOP = re.compile(r"top-([1-9][0-9]*)")
PLAN_NAMES = ("best", "top-<m>", "all")
SAMPLES = ("chosen", "union")


@dataclass
class PlanConfig(Config):
    """How a request is planned. ``samples``: the pack trains on the chosen fragments' own
    developers' k shots (``chosen``: ``best`` then packs with exactly k shots per class) or on
    every holder's k shots (``union``: the same data whatever the policy)."""

    policy: str = "best"
    samples: str = "chosen"

    def validate(self) -> None:
        if self.policy not in ("best", "all") and not _TOP.fullmatch(self.policy):
            raise UnknownNameError("plan", self.policy, PLAN_NAMES)
        if self.samples not in SAMPLES:
            raise UnknownNameError("plan sample source", self.samples, SAMPLES)

    @property
    def m(self) -> int | None:
        """Fragments kept per class (None: all)."""
        if self.policy == "all":
            return None
        return 1 if self.policy == "best" else int(_TOP.fullmatch(self.policy).group(1))


class FewShotPool:
    """The few-shot samples every model of the market uploaded at (k, seed), loaded once, each
    tagged with its model and train-split row: the only data the planner scores on."""

    def __init__(self, raw, labels: np.ndarray, models: np.ndarray, rows: np.ndarray):
        self.raw, self.labels = raw, np.asarray(labels)
        self.models, self.rows = np.asarray(models), np.asarray(rows)

    @classmethod
    def from_market(cls, market: Market, k: int, seed: int = 0,
                    model_ids: list[str] | None = None) -> "FewShotPool":
        raws, labels, models, rows = [], [], [], []
        for mid in model_ids or market.ids():
            s = market.fewshot(mid, k, seed)
            raws.append(s.raw)
            labels.append(s.labels)
            models += [mid] * len(s)
            rows.append(s.row_ids)
        if not raws:
            raise ConfigError(f"the market at {market.root} holds no models")
        raw = np.concatenate(raws) if isinstance(raws[0], np.ndarray) else sum(map(list, raws), [])
        return cls(raw, np.concatenate(labels), np.asarray(models), np.concatenate(rows))


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


def held_out_auc(fragment: Fragment, classes: list[int], cache: ScoreCache) -> dict[str, Any]:
    """AUC of ``fragment``'s class score: its class against the request's other classes, on the
    pool's samples that its own model did not upload (and no row its model saw)."""
    pool, c = cache.pool, fragment.spec.class_id
    own_rows = pool.rows[pool.models == fragment.spec.source_model]
    held = (pool.models != fragment.spec.source_model) & ~np.isin(pool.rows, own_rows)
    others = [x for x in classes if x != c]
    pos, neg = held & (pool.labels == c), held & np.isin(pool.labels, others)
    in_sample = not pos.any() or not neg.any()
    if in_sample:          # nobody else uploaded c (or the others): judge on every sample, flagged
        pos, neg = pool.labels == c, np.isin(pool.labels, others)
    mask = pos | neg
    if not pos.any() or not neg.any():
        return {"score": fragment.spec.metrics.get("fewshot_auc", 0.0), "n_pos": int(pos.sum()),
                "n_neg": int(neg.sum()), "in_sample": True, "source": "slice-time few-shot AUC"}
    s = cache.scores(fragment)
    return {"score": roc_auc(s[mask], pos[mask]), "n_pos": int(pos.sum()), "n_neg": int(neg.sum()),
            "in_sample": in_sample, "source": "held-out few-shot AUC"}


def choose(frags: list[Fragment], classes: list[int], cache: ScoreCache, cfg: PlanConfig
           ) -> tuple[list[Fragment], list[dict[str, Any]]]:
    """Rank one class's candidate fragments by held-out score (ties: by model id) and keep the
    policy's share. Returns (chosen fragments, every candidate's row, best first)."""
    rows = [{"model": f.spec.source_model, "key": f.spec.key, "params": f.spec.params,
             **held_out_auc(f, classes, cache)} for f in frags]
    order = sorted(range(len(frags)), key=lambda i: (-rows[i]["score"], rows[i]["model"]))
    keep = order if cfg.m is None else order[:cfg.m]
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
                 holders_of: Callable[[int], list[ModelSpec]] | None = None) -> Plan:
    """Score every holder's fragment of each requested class and keep the policy's choice.

    ``load(key)`` fetches a fragment (default: the market's fragment store); ``cache`` reuses
    class scores across requests (default: a pool of the holders of the requested classes);
    ``holders_of(class)`` limits the candidates (default: every model holding the class, e.g. a
    service passes the holders whose fragment is stored)."""
    holders_of = holders_of or market.holders
    t0 = time.perf_counter()
    if load is None:
        store = market_fragment_store(market)

        def load(key: str) -> Fragment:
            if not store.has(key):
                raise ArtifactNotFoundError(f"no fragment {key} in {market.root}; slice the "
                                            f"market first (snp slice --store {market.root} --k {k})")
            return store.get(key)
    if cache is None:
        holders = sorted({s.id for c in classes for s in holders_of(c)})
        cache = ScoreCache(FewShotPool.from_market(market, k, seed, holders))
    chosen, candidates = {}, {}
    for c in classes:
        holders = holders_of(c)
        if not holders:
            raise ConfigError(f"class {c} is held by no model of {market.root}")
        frags = [load(pair_key(spec, c, slice_cfg, k, seed)) for spec in holders]
        chosen[c], candidates[c] = choose(frags, classes, cache, cfg)
        log.info("class %s: %s of %d holders (best held-out AUC %.3f)", c, cfg.policy,
                 len(frags), candidates[c][0]["score"])
    return Plan(cfg.policy, cfg.samples, list(classes), chosen, candidates,
                time.perf_counter() - t0)


def plan_samples(market: Market, plan: Plan, k: int, seed: int = 0) -> PackSamples:
    """The few-shot samples the planned pack trains on (see :class:`PlanConfig`)."""
    sets = []
    for c in plan.classes:
        models = ([f.spec.source_model for f in plan.chosen[c]] if plan.samples == "chosen"
                  else [s.id for s in market.holders(c)])
        sets += [market.fewshot(m, k, seed).of_class(c) for m in models]
    return PackSamples.from_fewshot(sets, plan.classes)


def pack_planned(market: Market, plan: Plan, k: int, pack_cfg: PackConfig | None = None,
                 seed: int = 0) -> PackedModel:
    """Pack the plan's fragments on the plan's samples."""
    samples = plan_samples(market, plan, k, seed)
    return Packer(pack_cfg or PackConfig()).pack(plan.fragments(), samples, plan.classes)
