"""Adding, replacing and removing a market's models, with what hangs off them.

A model's fragments and the packs built on them are derived data: when the model is replaced
(new weights, corrected classes, input spec or few-shot source) or removed, they describe a model
that no longer exists. :func:`retire_stale` removes them for good (never served again, storage
reclaimed); :func:`add_model` and :func:`remove_model` call it, and so do the CLI's
``snp market add --replace`` / ``snp market remove`` and the service's upload routes, so there is
one rule for when a fragment is stale (:func:`snp_ray.store.belongs_to`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from snp_ray.errors import ArtifactNotFoundError
from snp_ray.market.market import Market
from snp_ray.market.modelstore import ModelSpec
from snp_ray.serve.packstore import PackStore
from snp_ray.store import FragmentStore, belongs_to

log = logging.getLogger(__name__)


@dataclass
class Retired:
    """What one retirement removed."""

    fragments: list[str] = field(default_factory=list)
    blobs: int = 0
    packs: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"fragments": len(self.fragments), "blobs": self.blobs, "packs": self.packs}


def default_stores(market: Market) -> tuple[FragmentStore, PackStore]:
    """The market's own fragment and pack stores (``<market>/fragments``, ``<market>/packs``)."""
    return FragmentStore(market.root / "fragments"), PackStore(market.root / "packs")


def key_belongs(key: str, spec: ModelSpec | None) -> bool:
    """Whether a fragment key (``<source[:16]>-c...``) was cut from the current version of
    ``spec``: its source is the model's identity, or, for keys made before identities, the
    weights' sha256."""
    if spec is None:
        return False
    source = key.split("-", 1)[0]
    return source in (spec.identity[:16], spec.weights_sha256[:16])


def retire_stale(market: Market, changed: list[str] = (), fragments: FragmentStore | None = None,
                 packs: PackStore | None = None) -> Retired:
    """Remove every stored fragment that is not of a model's current version, and every pack
    built on one. ``changed``: models just replaced or removed, whose rows from before model
    identities are judged strictly (see :func:`snp_ray.store.belongs_to`)."""
    own_fragments, own_packs = default_stores(market)
    fragments, packs = fragments or own_fragments, packs or own_packs
    specs = {s.id: s for s in market.specs()}
    fragments.refresh()
    listing = fragments.listing(["model_id", "model_sha256", "model_identity"])
    stale = sorted(key for key, row in listing.items()
                   if not belongs_to(row, specs.get(row["model_id"]),
                                     legacy=row["model_id"] not in set(changed)))
    out = Retired(fragments=stale)
    if stale:
        _, out.blobs = fragments.retire(stale)
    dead = set(stale)
    for pid in packs.ids():
        try:
            used = packs.meta(pid).get("fragments", [])
        except (ArtifactNotFoundError, ValueError, OSError):   # removed or rewritten meanwhile
            continue
        if any(f.get("key") in dead or not key_belongs(str(f.get("key", "")),
                                                       specs.get(f.get("model")))
               for f in used):
            packs.remove(pid)
            out.packs.append(pid)
    if out.fragments or out.packs:
        log.info("retired %d fragments (%d blobs) and %d packs of replaced or removed models",
                 len(out.fragments), out.blobs, len(out.packs))
    return out


def add_model(market: Market, arch: str, weights, classes: list[str], dataset: str, *,
              fragments: FragmentStore | None = None, packs: PackStore | None = None, **options):
    """:meth:`Market.add_model`, then retire what a replaced model leaves behind (in the
    market's own stores, or a service's ``fragments`` and ``packs``)."""
    added = market.add_model(arch, weights, classes, dataset, **options)
    retired = (retire_stale(market, [added.spec.id], fragments, packs) if options.get("replace")
               else Retired())
    return added, retired


def remove_model(market: Market, model_id: str, fragments: FragmentStore | None = None,
                 packs: PackStore | None = None) -> tuple[ModelSpec, Retired]:
    """Remove a model, its fragments and the packs built on them."""
    spec = market.remove_model(model_id)
    return spec, retire_stale(market, [model_id], fragments, packs)
