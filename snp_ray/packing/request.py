"""Answer a user's class-set request from a market: pick fragments, gather few-shot data, pack."""
from __future__ import annotations

from snp_ray.errors import ArtifactNotFoundError, ConfigError
from snp_ray.market.market import Market
from snp_ray.packing.config import PackConfig
from snp_ray.packing.model import PackedModel
from snp_ray.packing.packer import Packer, PackSamples
from snp_ray.packing.planner import FewShotPool, PlanConfig, ScoreCache, choose_holders
from snp_ray.slicing.api import pair_key
from snp_ray.slicing.config import SliceConfig
from snp_ray.slicing.fragment import Fragment
from snp_ray.store import market_fragment_store


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
    classes = market.class_ids(requested)
    store = store or market_fragment_store(market)
    per_class = {c: load_fragments(market, c, k, slice_cfg, seed, store, fetch) for c in classes}
    holders = sorted({f.spec.source_model for fs in per_class.values() for f in fs})
    samples = PackSamples.from_fewshot([market.fewshot(m, k, seed) for m in holders], classes)
    train = samples
    if requester is not None:
        requester = requester.only(classes)
        train = requester.with_(samples) if with_market_shots else requester
    shared = {c: frs for c, frs in per_class.items() if len(frs) > 1}
    if pack_cfg.shared == "best" and shared:     # the planner's selector and its tie-breaking
        pool = ScoreCache(FewShotPool.from_market(market, k, seed, holders))
        per_class.update(choose_holders(market, shared, classes, k, PlanConfig(policy="best"),
                                        seed, pool, requester)[0])
    fragments = [f for c in classes for f in per_class[c]]
    return Packer(pack_cfg).pack(fragments, train, classes, warm_start=warm_start)

