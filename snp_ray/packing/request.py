"""Answer a user's class-set request from a market: pick fragments, gather few-shot data, pack."""
from __future__ import annotations

import logging
import numpy as np
import torch

from snp_ray.errors import ArtifactNotFoundError, ConfigError
from snp_ray.market.market import Market
from snp_ray.metrics import roc_auc
from snp_ray.packing.config import PackConfig
from snp_ray.packing.model import PackedModel
from snp_ray.packing.packer import Packer, PackSamples
from snp_ray.slicing.api import pair_key
from snp_ray.slicing.config import SliceConfig
from snp_ray.slicing.fragment import Fragment
from snp_ray.store import market_fragment_store

log = logging.getLogger(__name__)


def resolve_classes(market: Market, requested: list[str | int]) -> list[int]:
    if not requested:
        raise ConfigError("the pack request names no classes")
    ids = [market.class_id(c) for c in requested]
    dupes = sorted({c for c in ids if ids.count(c) > 1})
    if dupes:
        raise ConfigError(f"duplicate classes in the pack request: {dupes}")
    return ids


def load_fragments(market: Market, class_id: int, k: int, slice_cfg: SliceConfig,
                   seed: int = 0, store=None, fetch=None) -> list[Fragment]:
    """Every stored fragment of ``class_id`` (one per model that holds it).

    ``fetch(key)`` may supply fragments from elsewhere first (e.g. the Ray object store).
    """
    store = store or market_fragment_store(market)
    out = []
    for spec in market.holders(class_id):
        key = pair_key(spec, class_id, slice_cfg, k, seed)
        found = fetch(key) if fetch else None
        if found is not None:
            out.append(found)
            continue
        if not store.has(key):
            raise ArtifactNotFoundError(
                f"no fragment of class {class_id} from {spec.id} at k={k} with this slice config; "
                f"slice it first (snp slice --store {market.root} --k {k} --model {spec.id})")
        out.append(store.get(key))
    return out


def validation_auc(fragment: Fragment, samples: PackSamples) -> float:
    """Few-shot validation of a fragment: AUC of its class score on ``samples``, which the caller
    draws from the other holders' few-shot data (held out for this fragment)."""
    labels = (samples.labels == fragment.spec.class_id).astype(np.int64)
    raw = samples.raw
    if len(labels) == 0 or labels.all() or not labels.any():
        return fragment.spec.metrics.get("fewshot_auc", 0.0)
    with torch.no_grad():
        return roc_auc(fragment.class_score(raw).numpy(), labels)


def assignment_samples(market: Market, assignment: list[tuple[str, int]], k: int,
                       seed: int = 0) -> PackSamples:
    """Exactly the k shots of each class that its model's developer uploaded: the samples of a
    one-class-per-model combination (method notes section 5), never another holder's."""
    classes = [c for _, c in assignment]
    if len(set(classes)) != len(classes):
        raise ConfigError(f"duplicate classes in the assignment {assignment}")
    sets = []
    for mid, c in assignment:
        spec = market.spec(mid)
        if c not in spec.classes:
            raise ConfigError(f"class {c} is not held by model {mid} (it holds {spec.classes})")
        sets.append(market.fewshot(mid, k, seed).of_class(c))
    return PackSamples.from_fewshot(sets, classes)


def pack_assignment(market: Market, assignment: list[tuple[str, int]], k: int,
                    slice_cfg: SliceConfig, pack_cfg: PackConfig | None = None, seed: int = 0,
                    store=None, fetch=None) -> PackedModel:
    """Pack one fragment per class: for each ``(model id, class id)``, that model's fragment of
    the class, trained on that model's k shots of it only. Unlike :func:`pack_request`, another
    holder of the class contributes neither its fragment nor its samples, so k stays k."""
    store = store or market_fragment_store(market)
    fragments = []
    for mid, c in assignment:
        key = pair_key(market.spec(mid), c, slice_cfg, k, seed)
        found = fetch(key) if fetch else None
        if found is None:
            if not store.has(key):
                raise ArtifactNotFoundError(
                    f"no fragment of class {c} from {mid} at k={k} with this slice config; slice "
                    f"it first (snp slice --store {market.root} --k {k} --model {mid})")
            found = store.get(key)
        fragments.append(found)
    samples = assignment_samples(market, assignment, k, seed)
    classes = [c for _, c in assignment]
    return Packer(pack_cfg or PackConfig()).pack(fragments, samples, classes)


def pack_request(market: Market, requested: list[str | int], k: int, slice_cfg: SliceConfig,
                 pack_cfg: PackConfig | None = None, seed: int = 0,
                 warm_start: PackedModel | None = None, store=None, fetch=None,
                 requester: PackSamples | None = None, with_market_shots: bool = False
                 ) -> PackedModel:
    """Pack every holder's fragment of ``requested`` (``shared="best"``: the best-scoring one)
    on the holders' few-shot samples, or on a ``requester``'s own samples (with the market's
    beside them when ``with_market_shots``)."""
    pack_cfg = pack_cfg or PackConfig()
    classes = resolve_classes(market, requested)
    store = store or market_fragment_store(market)
    per_class = {c: load_fragments(market, c, k, slice_cfg, seed, store, fetch) for c in classes}
    holders = sorted({f.spec.source_model for fs in per_class.values() for f in fs})
    samples = PackSamples.from_fewshot([market.fewshot(m, k, seed) for m in holders], classes)
    train = samples
    if requester is not None:
        requester = requester.only(classes)
        train = requester.with_(samples) if with_market_shots else requester
    fragments = []
    for c in classes:
        frs = per_class[c]
        if len(frs) > 1 and pack_cfg.shared == "best":
            others = [market.fewshot(m, k, seed) for m in holders]
            scores = []
            for f in frs:
                held_out = [s for s, m in zip(others, holders) if m != f.spec.source_model]
                covered = set() if requester is None else set(np.unique(requester.labels).tolist())
                val = (requester if c in covered and len(covered) > 1
                       else PackSamples.from_fewshot(held_out, classes) if held_out else samples)
                scores.append(validation_auc(f, val))
            best = int(np.argmax(scores))
            log.info("class %s: keeping the fragment of %s (few-shot validation AUC %s)", c,
                     frs[best].spec.source_model, [round(s, 3) for s in scores])
            frs = [frs[best]]
        fragments += frs
    return Packer(pack_cfg).pack(fragments, train, classes, warm_start=warm_start)

