"""The market's answers, without HTTP: the class catalogue, packs on request, predictions.

One :class:`MarketService` per replica keeps the market warm: fragments, few-shot sets and the
planner's score cache stay in memory between requests. A pack request is planned (few-shot data
only), named by a content hash, and built once: concurrent identical requests wait for the first
one's build (single flight), and a stored pack is answered from the pack store without packing.
A request may bring the requester's own labeled samples (``samples.py``): the plan scores the
candidates on them, the pack trains on them (beside the market's shots when asked), and their
sha256 is part of the request digest and of the pack id.
The service never reads a test split; its accuracy is a cross-validated few-shot estimate.

Requests run in threads side by side, so what they share is swapped, never changed in place: a
catalogue refresh builds a new :class:`_View` (catalogue, market, fragment-store snapshot) and
replaces one reference, and a request takes that reference once and reads only from it. A change
this replica makes (an upload's fragment stored, a model removed, ``uploads.py``) calls
:meth:`MarketService.invalidate`, so the next request re-reads the market at once.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from snp_ray.data.catalog import split_file
from snp_ray.errors import ArtifactNotFoundError, ConfigError
from snp_ray.market.market import Market
from snp_ray.packing.config import preset_pack_config
from snp_ray.packing.model import PackedModel
from snp_ray.packing.packer import CV_NONE, Packer, cv_method
from snp_ray.packing.planner import PLAN_NAMES, FewShotPool, PlanConfig, ScoreCache, plan_request, plan_samples
from snp_ray.packing.samples import PackSamples, check_covers
from snp_ray.serve import samples as samples_io
from snp_ray.serve.catalogue import Catalogue
from snp_ray.serve.config import ServeConfig
from snp_ray.serve.packstore import PackStore, pack_id
from snp_ray.serve.uploads import Uploads
from snp_ray.slicing.config import slice_preset
from snp_ray.slicing.fragment import Fragment
from snp_ray.store import FragmentStore, market_fragment_store

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
    view: "_View | None" = field(default=None, repr=False, compare=False)  # what parse read


@dataclass(frozen=True)
class _View:
    """One generation of the market as the service reads it: the catalogue, the market it was
    read from and a snapshot of the fragment store (see ``FragmentStore.snapshot``)."""

    catalogue: Catalogue
    market: Market
    store: FragmentStore
    generation: int = 0      # MarketService._generation when it was read


class ByteLRU:
    """A thread-safe LRU bounded in bytes (each entry's size given on insert); the newest entry
    always stays, even when it alone is over the bound."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def get(self, key: str) -> Any | None:
        with self._lock:
            hit = self._items.get(key)
            if hit is None:
                return None
            self._items.move_to_end(key)
            return hit[0]

    def put(self, key: str, value: Any, size: int) -> Any:
        """Insert and return ``value``, or the value already there (another thread's load)."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key][0]
            self._items[key] = (value, size)
            self.bytes += size
            while self.bytes > self.max_bytes and len(self._items) > 1:
                _, (_, dropped) = self._items.popitem(last=False)
                self.bytes -= dropped
            return value


def fragment_bytes(fragment: Fragment) -> int:
    """What a loaded fragment holds in memory (parameters and buffers)."""
    return sum(t.numel() * t.element_size() for t in (*fragment.parameters(), *fragment.buffers()))


def canonical_plan(plan: str, holders: int) -> str:
    """One spelling per plan: ``top-<m>`` (m > 1) with m at least the most holders any requested
    class has keeps them all (``all``), and ``top-1`` is ``best``, so ``top-99999`` cannot mint
    new request digests (each a planning pass) for the same pack."""
    if plan == "random":
        return plan
    m = PlanConfig(policy=plan).m
    if m is None or (m > 1 and m >= holders):
        return "all"
    return "best" if m == 1 else f"top-{m}"


class MarketService:
    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        torch.set_num_threads(cfg.threads)
        self.market = Market(cfg.market)
        self.store = FragmentStore(cfg.fragments) if cfg.fragments else market_fragment_store(self.market)
        self.packs = PackStore(cfg.packs or Path(cfg.market) / "packs", max_bytes=cfg.pack_store_bytes)
        for dataset in sorted({s.dataset for s in self.market.specs()}):
            split_file(dataset, "train")   # a service that could not build packs says so now
        # a store from before model identities is migrated once, here, not on a request's path
        self.store.adopt_identities({s.id: s for s in self.market.specs()})
        self.slice_cfg = slice_preset(cfg.preset)
        self.pack_cfg = preset_pack_config(cfg.preset)
        PlanConfig(policy=cfg.plan)                      # refuse a bad default plan at start
        self._lock = threading.Lock()
        self._inflight: dict[str, Future] = {}
        self._refreshing = threading.Lock()              # one catalogue re-read at a time
        self._fragments = ByteLRU(cfg.fragment_cache_bytes)
        self._scores: dict[tuple[int, str], ScoreCache] = {}
        self.builds = 0                                  # packs built by this replica
        self._generation = 0                             # bumped by invalidate()
        self._view = self._load_view()
        self.uploads = Uploads(self)
        self.uploads.resume()

    # ---------------------------------------------------------------- catalogue
    def _load_view(self) -> _View:
        """A new generation, built aside: nothing a running request reads is touched."""
        generation = self._generation                    # read first: a later bump re-reads
        market = Market(self.cfg.market)                 # models may have been added or removed
        store = self.store.refresh().snapshot()
        cat = Catalogue.load(market, store, self.slice_cfg.digest(), self.cfg.seed)
        self.market = market
        return _View(cat, market, store, generation)

    def _current(self) -> _View:
        """The current view, re-read at most every ``refresh_s`` seconds or after
        :meth:`invalidate` (one reader re-reads; the others go on with the view they have)."""
        view = self._view
        if (view.generation != self._generation
                or time.time() - view.catalogue.loaded_at > self.cfg.refresh_s):
            with self._refreshing:
                if self._view is view:
                    self._view = self._load_view()
            view = self._view
        return view

    def invalidate(self) -> None:
        """The market changed (a fragment stored, a model added or removed): the next request
        re-reads it instead of waiting out ``refresh_s``."""
        with self._lock:
            self._generation += 1

    def catalogue(self) -> Catalogue:
        """The catalogue, re-read at most every ``refresh_s`` seconds."""
        return self._current().catalogue

    def health(self) -> dict[str, Any]:
        """Liveness from memory alone: the catalogue as last read, never re-read here (a probe
        must stay cheap however slow the market's storage is)."""
        cat = self._view.catalogue
        return {"status": "ok", "models": len(cat.specs), "classes": len(cat.classes)}

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
        view = self._current()
        cat = view.catalogue
        requested = body.get("classes")
        if isinstance(requested, list) and len(requested) > self.cfg.max_classes:
            raise ConfigError(f"a pack request names at most {self.cfg.max_classes} classes, "
                              f"got {len(requested)}")
        ids = cat.resolve(requested)
        k = cat.check_k(ids, body.get("k", 10 if 10 in cat.ks else (cat.ks or [10])[0]))
        plan = body.get("plan", self.cfg.plan)
        if not isinstance(plan, str) or len(plan) > 16:
            raise ConfigError(f"'plan' must be a policy name ({', '.join(PLAN_NAMES)}), "
                              f"got {str(plan)[:40]!r}")
        plan = canonical_plan(plan, max(len(cat.holders(c, k)) for c in ids))
        requester = self._requester(cat, ids, body.get("samples"), samples)
        market_shots = body.get("with_market_shots", False)
        if not isinstance(market_shots, bool):
            raise ConfigError(f"'with_market_shots' must be true or false, got {market_shots!r}")
        if market_shots and requester is None:
            raise ConfigError("'with_market_shots' adds the market's shots to your own samples: "
                              "send 'samples' too (without samples, packs train on the market's)")
        if requester is not None and not market_shots:
            check_covers(requester, {c: cat.classes[c].name for c in ids},
                                    '"with_market_shots": true')
        doc = {"classes": ids, "k": k, "plan": plan, "slice": self.slice_cfg.digest(),
               "pack": self.pack_cfg.digest(), "seed": self.cfg.seed, "folds": self.cfg.folds,
               "candidates": cat.candidates(ids, k)}
        if requester is not None:        # absent otherwise: earlier digests stay valid
            doc |= {"requester": requester.sha256, "with_market_shots": market_shots}
        digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]
        return PackRequest(ids, k, plan, digest, requester, market_shots, view)

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
            return PackSamples.from_parquet(parquet, cat.dataset, what="the 'samples' file",
                                            max_rows=self.cfg.max_images).only(ids)
        return samples_io.from_json(in_json, cat.dataset, cat.modality,
                                    {c: cat.classes[c].name for c in ids}, self.cfg.max_images)

    def pack(self, body: Any, samples: bytes | None = None) -> dict[str, Any]:
        """Answer a pack request (``samples``: a requester's Parquet file): the stored pack,
        or one built now (once per request)."""
        req = self.parse(body, samples)
        digest = req.digest
        found = self.packs.lookup(digest)
        if found is not None:
            try:
                meta = self.packs.meta(found)
                self.packs.used(found)
                return answer(meta, cached=True)
            except ArtifactNotFoundError:       # evicted meanwhile: build it again
                pass
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
        view = req.view or self._current()
        cat, market, store = view.catalogue, view.market, view.store
        ids, k = req.ids, req.k
        plan = plan_request(market, ids, k, self.slice_cfg, PlanConfig(policy=req.plan),
                            self.cfg.seed, cache=self._score_cache(view, k),
                            load=lambda key: self._fragment(key, store),
                            holders_of=lambda c: cat.holders(c, k), requester=req.requester)
        fragments = plan.fragments()
        sample_doc = {"k": k, "seed": self.cfg.seed, "samples": plan.samples, "folds": self.cfg.folds}
        if req.requester is not None:
            sample_doc |= {"requester": req.requester.sha256, "market_shots": req.market_shots}
        pid = pack_id([f.spec.key for f in fragments], ids, self.pack_cfg.to_dict(), sample_doc)
        with self.packs.pinned(pid):                # not evicted between its build and answer
            return self._build_pack(req, plan, fragments, pid, market, t0)

    def _build_pack(self, req: PackRequest, plan, fragments: list[Fragment], pid: str,
                    market: Market, t0: float) -> tuple[dict[str, Any], bool]:
        ids, k = req.ids, req.k
        if self.packs.has(pid):                     # another request planned the same pack
            try:
                meta = self.packs.meta(pid)
                self.packs.remember(req.digest, pid)
                return meta, False
            except ArtifactNotFoundError:           # evicted just before the pin: build it
                pass
        scores = {row["key"]: row["score"] for rows in plan.candidates.values() for row in rows}
        samples = plan_samples(market, plan, k, self.cfg.seed, req.requester,
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
        with self._lock:
            self.builds += 1
        log.info("built pack %s for %s in %.2fs", pid, meta["classes"], meta["build_seconds"])
        return meta, True

    def _fragment(self, key: str, store: FragmentStore | None = None) -> Fragment:
        """A fragment by key (keys are content addresses, so the cache outlives views), kept in
        an LRU bounded by ``fragment_cache_bytes`` of weights (the newest always stays)."""
        hit = self._fragments.get(key)
        if hit is not None:
            return hit
        fragment = (store or self._view.store).get(key)
        return self._fragments.put(key, fragment, fragment_bytes(fragment))

    def _score_cache(self, view: _View, k: int) -> ScoreCache:
        key = (k, view.catalogue.version)
        scores = self._scores                        # one reference: another build may swap it
        cache = scores.get(key)
        if cache is None:
            cat = view.catalogue
            holders = sorted({h.model for c in cat.classes.values() for h in c.holders if h.k == k})
            cache = ScoreCache(FewShotPool.from_market(view.market, k, self.cfg.seed, holders))
            self._scores = {key: cache}
        return cache

    # ---------------------------------------------------------------- packs
    def meta(self, pid: str) -> dict[str, Any]:
        meta = self.packs.meta(pid)
        self.packs.used(pid)
        return answer(meta, cached=True)

    def load(self, pid: str) -> PackedModel:
        return self.packs.load(pid)


class LocalPredictor:
    """Predictions without Ray Serve (tests, one process): packs loaded on first use, at most
    ``max_models`` kept (least recently used out), as the Serve predictor does per replica.
    A loaded pack is held in the store (not evicted) until it leaves this LRU."""

    def __init__(self, packs: PackStore, max_models: int = 8):
        self.packs, self.max_models = packs, max_models
        self.models: OrderedDict[str, PackedModel] = OrderedDict()
        self._holds: dict[str, int] = {}

    def model(self, pid: str) -> PackedModel:
        if pid in self.models:
            self.models.move_to_end(pid)
        else:
            token = self.packs.hold(pid)
            try:
                self.models[pid] = self.packs.load(pid)
            except BaseException:
                self.packs.release(token)
                raise
            self._holds[pid] = token
            while len(self.models) > self.max_models:
                old, _ = self.models.popitem(last=False)
                self.packs.release(self._holds.pop(old))
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
