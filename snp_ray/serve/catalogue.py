"""What the market can serve: every class with a stored fragment, who holds it, at which k.

Read from the market's model specs and the fragment store's manifest (never from fragment
weights), so listing a market of thousands of fragments stays cheap. Only fragments of the
service's slice config and seed, of the current version of a model in the market
(:func:`snp_ray.store.belongs_to`), count.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

from snp_ray.data.classes import class_ids
from snp_ray.errors import ConfigError
from snp_ray.market.market import Market
from snp_ray.market.modelstore import ModelSpec
from snp_ray.store import belongs_to


@dataclass
class Holder:
    """One stored fragment of a class."""

    model: str
    family: str
    key: str
    k: int
    params: int
    source_params: int
    fewshot_auc: float | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ServedClass:
    id: int
    name: str
    holders: list[Holder] = field(default_factory=list)

    @property
    def ks(self) -> list[int]:
        return sorted({h.k for h in self.holders})

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "ks": self.ks,
                "holders": [h.to_dict() for h in self.holders]}


class Catalogue:
    """A snapshot of the servable classes; :meth:`load` builds a fresh one."""

    def __init__(self, classes: dict[int, ServedClass], specs: dict[str, ModelSpec],
                 dataset: str | None, loaded_at: float):
        self.classes, self.specs, self.dataset, self.loaded_at = classes, specs, dataset, loaded_at
        keys = sorted(h.key for c in classes.values() for h in c.holders)
        #: changes whenever a fragment or a model comes or goes
        self.version = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]

    @classmethod
    def load(cls, market: Market, store, config_digest: str, seed: int) -> "Catalogue":
        specs = {s.id: s for s in market.specs()}
        datasets = {s.dataset for s in specs.values()}
        classes: dict[int, ServedClass] = {}
        listing = store.listing(["model_id", "model_sha256", "model_identity", "class_id", "class_name",
                                 "config_digest", "k", "fewshot_seed", "params", "source_params",
                                 "metrics"])
        for key, row in sorted(listing.items()):
            spec = specs.get(row["model_id"])
            if (not belongs_to(row, spec)
                    or row["config_digest"] != config_digest or int(row["fewshot_seed"]) != seed):
                continue
            cid = int(row["class_id"])
            served = classes.setdefault(cid, ServedClass(cid, str(row["class_name"])))
            metrics = json.loads(row["metrics"] or "{}")
            served.holders.append(Holder(
                model=spec.id, family=spec.arch, key=key, k=int(row["k"]),
                params=int(row["params"]), source_params=int(row["source_params"]),
                fewshot_auc=metrics.get("fewshot_auc")))
        return cls(dict(sorted(classes.items())), specs,
                   datasets.pop() if len(datasets) == 1 else None, time.time())

    @property
    def ks(self) -> list[int]:
        return sorted({k for c in self.classes.values() for k in c.ks})

    def resolve(self, requested: Any) -> list[int]:
        """Class names or ids -> ids, sorted (one pack per class set, whatever the order), under
        the one resolver's rules (:mod:`snp_ray.data.classes`)."""
        names = {i: c.name for i, c in self.classes.items()}
        return sorted(class_ids(requested, names, what="'classes'"))

    def check_k(self, ids: list[int], k: Any) -> int:
        if isinstance(k, bool) or not isinstance(k, int):
            raise ConfigError(f"'k' must be an integer, got {k!r}")
        if k not in self.ks:
            raise ConfigError(f"k={k} is not sliced in this market; sliced k values: {self.ks}")
        missing = [self.classes[i].name for i in ids if k not in self.classes[i].ks]
        if missing:
            raise ConfigError(f"no fragment of {missing} is sliced at k={k}")
        return k

    def holders(self, class_id: int, k: int) -> list[ModelSpec]:
        """The models with a stored fragment of ``class_id`` at ``k``."""
        return [self.specs[h.model] for h in self.classes[class_id].holders if h.k == k]

    def candidates(self, ids: list[int], k: int) -> list[str]:
        return sorted(h.key for i in ids for h in self.classes[i].holders if h.k == k)

    @property
    def modality(self) -> str | None:
        """``image`` or ``text``: what the market's packs take as input."""
        from snp_ray.data.catalog import get_dataset

        return get_dataset(self.dataset).modality if self.dataset else None

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "modality": self.modality, "ks": self.ks, "version": self.version,
                "models": len(self.specs), "classes": [c.to_dict() for c in self.classes.values()]}
