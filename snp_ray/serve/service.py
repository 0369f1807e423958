"""The market's answers, without HTTP: the class catalogue, packs on request, predictions.

One :class:`MarketService` per replica keeps the market warm: fragments, few-shot sets and the
planner's score cache stay in memory between requests. A pack request is planned (few-shot data
only), named by a content hash, and built once: concurrent identical requests wait for the first
one's build (single flight), and a stored pack is answered from the pack store without packing.
A request may bring the requester's own labeled samples (``samples.py``): the plan scores the
candidates on them, the pack trains on them (beside the market's shots when asked), and their
sha256 is part of the request digest and of the pack id.
The service never reads a test split; its accuracy is a cross-validated few-shot estimate.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from snp_ray.errors import ConfigError
from snp_ray.market.market import Market
from snp_ray.packing.config import preset_pack_config
from snp_ray.packing.model import PackedModel
from snp_ray.packing.packer import CV_NONE, Packer, cv_method
from snp_ray.packing.planner import FewShotPool, PlanConfig, ScoreCache, plan_request, plan_samples
from snp_ray.packing.samples import PackSamples
from snp_ray.serve import samples as samples_io
from snp_ray.serve.catalogue import Catalogue
from snp_ray.serve.config import ServeConfig
from snp_ray.serve.packstore import PackStore, pack_id
from snp_ray.slicing.config import slice_preset
from snp_ray.slicing.fragment import Fragment

log = logging.getLogger(__name__)

REQUEST_KEYS = ("classes", "k", "plan", "samples", "with_market_shots")


@dataclass
class PackRequest:
    """A validated pack request: class ids (sorted), k, plan policy, the digest that names it,
    and the requester's own samples (None: the pack trains on the market's shots)."""

    ids: list[int]
    k: int
    plan: str
    digest: str
    requester: PackSamples | None = None
    market_shots: bool = False


class MarketService:
    def __init__(self, cfg: ServeConfig):
        from snp_ray.slicing.api import market_fragment_store
        from snp_ray.store import FragmentStore

        self.cfg = cfg
        torch.set_num_threads(cfg.threads)
        self.market = Market(cfg.market)
        self.store = FragmentStore(cfg.fragments) if cfg.fragments else market_fragment_store(self.market)
        self.packs = PackStore(cfg.packs or Path(cfg.market) / "packs")
        self.slice_cfg = slice_preset(cfg.preset)
        self.pack_cfg = preset_pack_config(cfg.preset)
        PlanConfig(policy=cfg.plan)                      # refuse a bad default plan at start
        self._lock = threading.Lock()
        self._inflight: dict[str, Future] = {}
        self._fragments: OrderedDict[str, Fragment] = OrderedDict()
        self._scores: dict[tuple[int, str], ScoreCache] = {}
        self.builds = 0                                  # packs built by this replica
        self._catalogue = self._load_catalogue()

    # ---------------------------------------------------------------- catalogue
    def _load_catalogue(self) -> Catalogue:
        self.market = Market(self.cfg.market)            # models may have been added or removed
        self.store.refresh()
        return Catalogue.load(self.market, self.store, self.slice_cfg.digest(), self.cfg.seed)

    def catalogue(self) -> Catalogue:
        """The catalogue, re-read at most every ``refresh_s`` seconds."""
        cat = self._catalogue
        if time.time() - cat.loaded_at > self.cfg.refresh_s:
            with self._lock:
                if self._catalogue is cat:
                    self._catalogue = self._load_catalogue()
            cat = self._catalogue
        return cat

    def classes(self) -> dict[str, Any]:
        return {**self.catalogue().to_dict(), "preset": self.cfg.preset, "seed": self.cfg.seed}

    # ---------------------------------------------------------------- requests
    def parse(self, body: Any, samples: bytes | None = None) -> PackRequest:
        """Validate a pack request (and a requester's Parquet ``samples``, when uploaded) into
        a :class:`PackRequest`, named by a digest that covers the samples' sha256."""
        if not isinstance(body, dict):
            raise ConfigError("a pack request is a JSON object with 'classes', 'k' and 'plan'")
        unknown = sorted(set(body) - set(REQUEST_KEYS))
        if unknown:
            raise ConfigError(f"unknown keys {unknown} in the pack request; valid keys: "
                              f"{list(REQUEST_KEYS)}")
        cat = self.catalogue()
        ids = cat.resolve(body.get("classes"))
        k = cat.check_k(ids, body.get("k", 10 if 10 in cat.ks else (cat.ks or [10])[0]))
        plan = body.get("plan", self.cfg.plan)
        if not isinstance(plan, str):
            raise ConfigError(f"'plan' must be a policy name, got {plan!r}")
        PlanConfig(policy=plan)
        requester = self._requester(cat, ids, body.get("samples"), samples)
        market_shots = body.get("with_market_shots", False)
        if not isinstance(market_shots, bool):
            raise ConfigError(f"'with_market_shots' must be true or false, got {market_shots!r}")
        if market_shots and requester is None:
            raise ConfigError("'with_market_shots' adds the market's shots to your own samples: "
                              "send 'samples' too (without samples, packs train on the market's)")
        if requester is not None and not market_shots:
            samples_io.check_covers(requester, {c: cat.classes[c].name for c in ids},
                                    '"with_market_shots": true')
        doc = {"classes": ids, "k": k, "plan": plan, "slice": self.slice_cfg.digest(),
               "pack": self.pack_cfg.digest(), "seed": self.cfg.seed, "folds": self.cfg.folds,
               "candidates": cat.candidates(ids, k)}
        if requester is not None:        # absent otherwise: earlier digests stay valid
            doc |= {"requester": requester.sha256, "with_market_shots": market_shots}
        digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]
        return PackRequest(ids, k, plan, digest, requester, market_shots)

    def _requester(self, cat: Catalogue, ids: list[int], in_json: Any, parquet: bytes | None
                   ) -> PackSamples | None:
        """The requester's own samples: a Parquet upload or the request's ``samples`` object."""
        if parquet is not None and in_json is not None:
            raise ConfigError("send samples once: as the 'samples' file part or in the request's "
                              "'samples', not both")
        if parquet is None and in_json is None:
            return None
        if cat.dataset is None:
            raise ConfigError("this market mixes datasets; it takes no requester samples")
        if parquet is not None:
            return samples_io.from_parquet(parquet, cat.dataset, ids, "the 'samples' file",
                                           self.cfg.max_images)
        return samples_io.from_json(in_json, cat.dataset, cat.modality,
                                    {c: cat.classes[c].name for c in ids}, self.cfg.max_images)

    def pack(self, body: Any, samples: bytes | None = None) -> dict[str, Any]:
        """Answer a pack request (``samples``: a requester's Parquet file): the stored pack,
        or one built now (once per request)."""
        req = self.parse(body, samples)
        digest = req.digest
        found = self.packs.lookup(digest)
        if found is not None:
            return answer(self.packs.meta(found), cached=True)
        with self._lock:
            fut = self._inflight.get(digest)
            leader = fut is None
            if leader:
                fut = self._inflight[digest] = Future()
        if not leader:
            return answer(fut.result(), cached=True)
        try:
            meta, built = self._build(req)
            fut.set_result(meta)
        except BaseException as e:
            fut.set_exception(e)
            raise
        finally:
            with self._lock:
                self._inflight.pop(digest, None)
        return answer(meta, cached=not built)

    def _build(self, req: PackRequest) -> tuple[dict[str, Any], bool]:
        t0 = time.perf_counter()
        cat = self.catalogue()
        ids, k = req.ids, req.k
        plan = plan_request(self.market, ids, k, self.slice_cfg, PlanConfig(policy=req.plan),
                            self.cfg.seed, cache=self._score_cache(cat, k), load=self._fragment,
                            holders_of=lambda c: cat.holders(c, k), requester=req.requester)
        fragments = plan.fragments()
        sample_doc = {"k": k, "seed": self.cfg.seed, "samples": plan.samples, "folds": self.cfg.folds}
        if req.requester is not None:
            sample_doc |= {"requester": req.requester.sha256, "market_shots": req.market_shots}
        pid = pack_id([f.spec.key for f in fragments], ids, self.pack_cfg.to_dict(), sample_doc)
        if self.packs.has(pid):                     # another request planned the same pack
            self.packs.remember(req.digest, pid)
            return self.packs.meta(pid), False
        scores = {row["key"]: row["score"] for rows in plan.candidates.values() for row in rows}
        samples = plan_samples(self.market, plan, k, self.cfg.seed, req.requester,
                               req.market_shots)
        packed = Packer(self.pack_cfg).pack(fragments, samples, ids, cv_folds=self.cfg.folds)
        metrics = packed.spec.metrics
        folds = int(metrics.get("cv_folds", 0))
        source = samples_io.origin(samples, req.requester)
        leaning = (" (the fragments were sliced on these samples too, so it leans optimistic; "
                   "no test data)" if source["market"] else
                   " (the requester's own samples, on which no fragment was sliced)")
        meta = {
            "classes": packed.spec.class_names, "class_ids": ids, "k": k,
            "dataset": packed.spec.dataset, "modality": packed.modality,
            "params": packed.params_deployable(), "params_training": packed.params_training(),
            "fewshot_accuracy": metrics.get("cv_accuracy"),
            "fewshot_accuracy_method": cv_method(folds) + leaning if folds else CV_NONE,
            "fewshot_samples": int(metrics["train_samples"]),
            "samples": source,
            "pack_seconds": round(packed.spec.metrics["pack_seconds"], 4),
            "plan": plan.to_dict(),
            "fragments": [{"model": f.spec.source_model, "class": f.spec.class_name,
                           "key": f.spec.key, "params": f.spec.params,
                           "fewshot_score": scores.get(f.spec.key)} for f in fragments],
            "preset": self.cfg.preset, "seed": self.cfg.seed, "created": time.time(),
        }
        meta["build_seconds"] = round(time.perf_counter() - t0, 4)
        meta = self.packs.put(pid, packed, meta)
        self.packs.remember(req.digest, pid)
        self.builds += 1
        log.info("built pack %s for %s in %.2fs", pid, meta["classes"], meta["build_seconds"])
        return meta, True

    def _fragment(self, key: str) -> Fragment:
        with self._lock:
            hit = self._fragments.get(key)
            if hit is not None:
                self._fragments.move_to_end(key)
                return hit
        fragment = self.store.get(key)
        with self._lock:
            self._fragments[key] = fragment
            while len(self._fragments) > 4096:
                self._fragments.popitem(last=False)
        return fragment

    def _score_cache(self, cat: Catalogue, k: int) -> ScoreCache:
        key = (k, cat.version)
        if key not in self._scores:
            holders = sorted({h.model for c in cat.classes.values() for h in c.holders if h.k == k})
            self._scores = {key: ScoreCache(FewShotPool.from_market(self.market, k, self.cfg.seed,
                                                                    holders))}
        return self._scores[key]

    # ---------------------------------------------------------------- packs
    def meta(self, pid: str) -> dict[str, Any]:
        return answer(self.packs.meta(pid), cached=True)

    def load(self, pid: str) -> PackedModel:
        return self.packs.load(pid)


class LocalPredictor:
    """Predictions without Ray Serve (tests, one process): packs loaded on first use, at most
    ``max_models`` kept (least recently used out), as the Serve predictor does per replica."""

    def __init__(self, packs: PackStore, max_models: int = 8):
        self.packs, self.max_models = packs, max_models
        self.models: OrderedDict[str, PackedModel] = OrderedDict()

    def model(self, pid: str) -> PackedModel:
        if pid in self.models:
            self.models.move_to_end(pid)
        else:
            self.models[pid] = self.packs.load(pid)
            while len(self.models) > self.max_models:
                self.models.popitem(last=False)
        return self.models[pid]

    async def __call__(self, pid: str, raw: Any) -> np.ndarray:
        import asyncio

        model = self.model(pid)
        return await asyncio.to_thread(lambda: model.predict_proba(raw).numpy())


def answer(meta: dict[str, Any], cached: bool) -> dict[str, Any]:
    """What a client sees of a pack (its full metadata, and whether it was already stored)."""
    return {**meta, "cached": cached}


def top_classes(meta: dict[str, Any], probs: np.ndarray, top: int = 5) -> list[list[dict[str, Any]]]:
    """Per input, the pack's ``top`` classes (head order: ``meta['classes']``) with their
    probabilities, most likely first."""
    top = min(top, probs.shape[1])
    out = []
    for p in probs:
        order = np.argsort(-p, kind="stable")[:top]
        out.append([{"class": meta["classes"][i], "class_id": meta["class_ids"][i],
                     "probability": float(p[i])} for i in order])
    return out
