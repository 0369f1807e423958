"""A market's fragment store, and filling it: slice the (model, class) pairs it lacks.

Slicing makes fragments and knows no store; this is where the two meet for in-process runs (the
slice job, :mod:`snp_ray.engine.job`, does the same on an actor pool).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

from snp_ray.market.market import Market
from snp_ray.slicing.api import pair_key, slice_model
from snp_ray.slicing.config import SliceConfig
from snp_ray.slicing.fragment import Fragment
from snp_ray.store.fragments import FragmentStore

log = logging.getLogger(__name__)


def market_fragment_store(market: Market) -> FragmentStore:
    """The market's default fragment store: ``<market root>/fragments``."""
    return FragmentStore(Path(market.root) / "fragments")


def slice_missing(market: Market, k: int, config: SliceConfig, seed: int = 0,
                  model_ids: list[str] | None = None, class_id: int | None = None,
                  force: bool = False, store=None,
                  engine: str | None = None) -> Iterator[tuple[str, int, str, Fragment | None]]:
    """Slice every selected pair whose fragment is not stored yet, storing each as it is made.

    Yields ``(model id, class id, key, fragment or None when it was already stored)``.
    """
    store = store or market_fragment_store(market)
    store.adopt_identities({s.id: s for s in market.specs()})
    stored = store.keys()
    for mid in model_ids or market.ids():
        spec = market.spec(mid)
        if class_id is not None and class_id not in spec.classes:
            continue
        classes = [class_id] if class_id is not None else spec.classes
        todo = []
        for c in classes:
            key = pair_key(spec, c, config, k, seed)
            if key in stored and not force:
                log.info("fragment of %s class %s already stored, skipping", mid, c)
                yield mid, c, key, None
            else:
                todo.append(c)
        if todo:
            for frag in slice_model(market, mid, todo, k, config, seed, engine):
                if force and frag.spec.key in stored:
                    log.info("reslicing %s class %s: the stored fragment is replaced",
                             mid, frag.spec.class_id)
                    store.retire([frag.spec.key])
                store.put(frag)
                yield mid, frag.spec.class_id, frag.spec.key, frag
