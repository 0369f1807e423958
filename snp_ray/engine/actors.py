"""Slicer actors: one per GPU (or GPU fraction), else one per CPU with one torch thread.

An actor keeps the last models it sliced (model, few-shot set, traced graph) so consecutive
pairs of one model pay the loading and tracing once. It writes each fragment to the shared store
itself (its own manifest parts, so writers never collide) and returns only the fragment's key and
a small dict of metadata, never weights: the driver's memory does not grow with the fragments,
and packing reads them back from the store when it needs them.
"""
from __future__ import annotations

import logging
import os
import resource
import socket
import sys
import time
from collections import OrderedDict
from typing import Any

log = logging.getLogger(__name__)


class SlicerActor:
    """The body of the remote actor (wrapped with ``ray.remote`` by the pool)."""

    def __init__(self, market_root: str, store_uri: str, slice_config: dict[str, Any], k: int,
                 seed: int, env: dict[str, str], cache_models: int = 2, mode: str = "slice",
                 noop_kb: int = 1, engine: str = "cached"):
        os.environ.update(env)
        import ray
        import torch

        from snp_ray.engine.noop import check_mode
        from snp_ray.market.market import Market
        from snp_ray.slicing.config import SliceConfig
        from snp_ray.store import FragmentStore

        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        if not self.gpu_ids:
            torch.set_num_threads(1)
        ctx = ray.get_runtime_context()
        self.actor_id = ctx.get_actor_id() or f"pid{os.getpid()}"
        self.node_id = ctx.get_node_id()
        self.market = Market(market_root)
        self.store = FragmentStore(store_uri, writer=f"actor-{self.actor_id[:12]}-{os.getpid()}")
        self.config = SliceConfig.from_dict(slice_config)
        self.k, self.seed = int(k), int(seed)
        self.mode, self.noop_kb = check_mode(mode), int(noop_kb)
        self.engine = engine
        self.cache: OrderedDict[str, Any] = OrderedDict()
        self.cache_models = cache_models

    def info(self) -> dict[str, Any]:
        return {"actor_id": self.actor_id, "node_id": self.node_id, "gpu_ids": self.gpu_ids,
                "pid": os.getpid(), "host": socket.gethostname(), "writer": self.store.writer}

    def ping(self) -> bool:
        return True

    def compact(self) -> int:
        """Fold the store's manifest parts into one (see FragmentStore.compact); parts removed."""
        return self.store.refresh().compact()

    def slice_pair(self, model_id: str, class_id: int, recheck: bool = True) -> dict[str, Any]:
        """Slice one pair into the store; returns its key and metadata only (no weights)."""
        return self.slice_pairs(model_id, [class_id], recheck)[0]

    def slice_pairs(self, model_id: str, class_ids: list[int], recheck: bool = True) -> list[dict[str, Any]]:
        """Slice pairs of one model into the store (the batched engine in one pass); returns one
        metadata row per pair, in order, never weights.

        ``recheck`` rereads the manifest first and skips keys already stored (a retry after a
        lost actor, or another writer got there); the driver asks for it on retries only, as it
        planned the first attempts against the store already. Each fragment is stored under its
        own key as soon as the pass returns, so a lost pass redoes at most its own pairs.
        """
        from snp_ray.engine.noop import NOOP_BENCHMARK, job_pair_key, noop_fragment
        from snp_ray.slicing.api import ModelSlicer

        spec = self.market.spec(model_id)
        keys = {int(c): job_pair_key(spec, c, self.config, self.k, self.seed, self.mode) for c in class_ids}
        rows: dict[int, dict[str, Any]] = {}
        if recheck:
            self.store.refresh()
            for c, key in keys.items():
                row = self.store.lookup(key)          # reads only the key's class partition
                if row is not None:
                    rows[c] = {"key": key, "status": "skipped", **self._row(row)}
        todo = [c for c in keys if c not in rows]
        if self.mode == NOOP_BENCHMARK:
            frags = [noop_fragment(spec, c, self.config, self.k, self.seed, self.noop_kb) for c in todo]
        elif todo:
            ms = self.cache.get(model_id)
            if ms is None:
                ms = ModelSlicer(self.market, model_id, self.k, self.config, self.seed, engine=self.engine)
                self.cache[model_id] = ms
                while len(self.cache) > self.cache_models:
                    self.cache.popitem(last=False)
            self.cache.move_to_end(model_id)
            frags = ms.slice_many(todo)
        else:
            frags = []
        for c, frag in zip(todo, frags):
            t_put = time.perf_counter()
            stored_key, written = self.store.put(frag)
            rows[c] = {"key": stored_key, "status": "done", "model": model_id, "class_id": int(c),
                       "class": frag.spec.class_name, "params": frag.spec.params,
                       "source_params": frag.spec.source_params, "seconds": frag.spec.seconds,
                       "actor": self.actor_id, "node": self.node_id, "gpu_ids": self.gpu_ids,
                       "device": frag.spec.device, "precision": frag.spec.precision,
                       "engine": self.engine, "writer": self.store.writer, "written": written,
                       "weights_sha256": frag.spec.weights_sha256,
                       "put_seconds": time.perf_counter() - t_put, "peak_rss_mb": _peak_rss_mb()}
        return [rows[int(c)] for c in class_ids]

    @staticmethod
    def _row(row: dict[str, Any]) -> dict[str, Any]:
        return {"model": row["model_id"], "class_id": row["class_id"], "class": row["class_name"],
                "params": row["params"], "source_params": row["source_params"],
                "seconds": row["seconds"], "writer": row["writer"],
                "weights_sha256": row["sha256"]}


def _peak_rss_mb() -> float:
    """This actor process's peak resident memory so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024
