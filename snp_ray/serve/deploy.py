"""Ray Serve deployments: the FastAPI ingress and a multiplexed, batched pack predictor.

``MarketAPI`` answers every route (one :class:`MarketService` per replica: catalogue, planning,
single-flight builds). Predictions go to ``PackPredictor``: packs stay loaded per replica with an
LRU bound (``@serve.multiplexed``, keyed by pack id, so Serve routes a pack's requests to the
replicas that hold it), and concurrent requests for one pack run as one batch (``@serve.batch``).
Both are configured from one :class:`ServeConfig`, so ``snp serve`` and ``serve run`` agree.
"""
from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve

from snp_ray.serve.config import ServeConfig

log = logging.getLogger(__name__)

APP_NAME = "snp-market"


@serve.deployment(ray_actor_options={"num_cpus": 0})
class PackPredictor:
    def __init__(self, cfg: dict[str, Any]):
        import torch

        from snp_ray.serve.packstore import PackStore

        self.cfg = ServeConfig.from_dict(cfg)
        torch.set_num_threads(self.cfg.threads)
        store = PackStore(self.cfg.packs or Path(self.cfg.market) / "packs")

        async def load(pid: str):
            return await asyncio.to_thread(store.load, pid)

        async def run(batch: list[Any]) -> list[np.ndarray]:
            # Serve splits batches by multiplexed model id: every item here is for one pack
            model = await self._load(serve.get_multiplexed_model_id())
            sizes = [len(x) for x in batch]
            raw = np.concatenate(batch) if isinstance(batch[0], np.ndarray) else sum(batch, [])
            probs = (await asyncio.to_thread(model.predict_proba, raw)).numpy()
            return np.split(probs, np.cumsum(sizes)[:-1])

        # Applied here, not as class decorators, so that the bounds come from the config
        self._load = serve.multiplexed(max_num_models_per_replica=self.cfg.max_models_per_replica)(load)
        self._run = serve.batch(max_batch_size=self.cfg.max_batch_size,
                                batch_wait_timeout_s=self.cfg.batch_wait_timeout_s)(run)

    async def predict(self, raw: Any) -> np.ndarray:
        return await self._run(raw)


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress()
class MarketAPI:
    def __init__(self, cfg: dict[str, Any], predictor):
        from snp_ray.serve.service import MarketService

        self.service = MarketService(ServeConfig.from_dict(cfg))
        self.predictor = predictor

    def __serve_build_asgi_app__(self):
        from snp_ray.serve.api import create_api

        async def predict(pid: str, raw: Any) -> np.ndarray:
            handle = self.predictor.options(multiplexed_model_id=pid)
            return await handle.predict.remote(raw)

        return create_api(self.service, predict)


def build_app(cfg: ServeConfig):
    """The Serve application for ``cfg`` (paths made absolute: replicas run elsewhere)."""
    cfg = absolute(cfg)
    ongoing = max(64, 2 * cfg.max_batch_size)   # @serve.batch needs >= max_batch_size in flight
    predictor = PackPredictor.options(max_ongoing_requests=ongoing).bind(cfg.to_dict())
    return MarketAPI.options(max_ongoing_requests=256).bind(cfg.to_dict(), predictor)


def app_builder(args: dict[str, Any]):
    """``serve run`` entry point: the args are :class:`ServeConfig` fields (see serve.yaml)."""
    return build_app(ServeConfig.from_dict(dict(args)))


def absolute(cfg: ServeConfig) -> ServeConfig:
    base = Path(os.environ.get("SNP_SERVE_ROOT", os.getcwd()))
    fix = {}
    for name in ("market", "packs", "fragments"):
        value = getattr(cfg, name)
        if value and "://" not in value and not Path(value).is_absolute():
            fix[name] = str((base / value).resolve())
    return cfg.replace(**fix) if fix else cfg


def start(cfg: ServeConfig, blocking: bool = False) -> str:
    """Run the service on the connected Ray cluster; returns its URL once it answers."""
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg), name=APP_NAME, route_prefix="/", blocking=blocking)
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    return f"http://{host}:{cfg.port}/"
