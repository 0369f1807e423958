"""Slice (model, class) pairs of a market into fragments: the library entry points."""
from __future__ import annotations

import logging
import time
from typing import Iterator

import torch

from snp_ray.data.fewshot import FewShotSet
from snp_ray.errors import ConfigError
from snp_ray.market.market import Market
from snp_ray.market.modelstore import ModelSpec
from snp_ray.models import count_macs, count_params
from snp_ray.runtime import default_device, default_engine
from snp_ray.slicing.config import SliceConfig
from snp_ray.slicing.fragment import Fragment, FragmentSpec, example_input, fragment_key
from snp_ray.slicing.slicer import Slicer

log = logging.getLogger(__name__)


class ModelSlicer:
    """Everything per model that every class's slicing shares: the model, its few-shot set,
    the traced graph and the source's size. Build it once per model, then call :meth:`slice`."""

    def __init__(self, market: Market, model_id: str, k: int, config: SliceConfig,
                 fewshot_seed: int = 0, fewshot: FewShotSet | None = None, subset: str = "",
                 engine: str | None = None, device: str | None = None):
        """``fewshot``: slice on this subset of the model's k-shot set instead (a tuning fold),
        named by ``subset`` so that its fragments never share a key with whole-set ones.
        ``engine``: naive, cached or batched (the same fragments up to rounding, see Slicer and
        :mod:`snp_ray.slicing.batched`; batched slices a class list at once in :meth:`slice_many`);
        None: ``SNP_SLICE_ENGINE``, else cached (:func:`snp_ray.runtime.default_engine`);
        ``device``: None picks a GPU when torch sees one. Floating-point results, and with
        ``precision="auto"`` the arithmetic, depend on the device; the fragment records both."""
        if (fewshot is None) != (not subset):
            raise ConfigError("a few-shot subset needs a subset name, and a name needs the subset")
        self.subset = subset
        model, self.spec = market.model(model_id)
        self.k, self.config, self.seed = int(k), config, int(fewshot_seed)
        self.fewshot = fewshot if fewshot is not None else market.fewshot(model_id, k, fewshot_seed)
        self.engine = engine or default_engine()
        self.slicer = Slicer(model, self.spec.input_spec, self.fewshot, config, engine=self.engine,
                             device=device or default_device())
        self.example = example_input(self.spec.input_spec)
        self.source_params = count_params(model.features)
        self.source_flops = count_macs(model.features, self.example)

    def slice(self, class_id: int) -> Fragment:
        t0 = time.perf_counter()
        outcome = self.slicer.slice_class(int(class_id))
        return self._fragment(int(class_id), outcome, time.perf_counter() - t0)

    def slice_many(self, class_ids: list[int]) -> list[Fragment]:
        """Fragments of ``class_ids``. The batched engine slices them in one pass (each fragment
        then records the pass's wall time divided by its classes); the others class by class."""
        if self.engine != "batched":
            return [self.slice(c) for c in class_ids]
        t0 = time.perf_counter()
        outcomes = self.slicer.slice_classes([int(c) for c in class_ids])
        seconds = (time.perf_counter() - t0) / max(1, len(outcomes))
        return [self._fragment(int(c), o, seconds) for c, o in zip(class_ids, outcomes)]

    def units(self, class_ids: list[int]) -> list[list[int]]:
        """``class_ids`` in the units one :meth:`slice_many` call should take: ``class_batch``
        classes for the batched engine (what it holds in memory at once), else one class."""
        step = self.config.class_batch if self.engine == "batched" else 1
        return [list(class_ids[i:i + step]) for i in range(0, len(class_ids), step)]

    def _fragment(self, class_id: int, outcome, seconds: float) -> Fragment:
        spec, config = self.spec, self.config
        with torch.no_grad():
            feature_dim = int(outcome.features(self.example).shape[1])
        fspec = FragmentSpec(
            source_model=spec.id, source_sha256=spec.weights_sha256,
            source_identity=spec.identity, arch=spec.arch,
            width=spec.width, source_classes=len(spec.classes), class_id=int(class_id),
            class_name=spec.class_names[spec.classes.index(int(class_id))],
            kept={str(g): v for g, v in outcome.kept.items()},
            group_names={str(g): n for g, n in outcome.group_names.items()},
            group_sizes={str(g.id): g.size for g in self.slicer.graph.groups},
            feature_dim=feature_dim, params=count_params(outcome.features),
            source_params=self.source_params, flops=count_macs(outcome.features, self.example),
            source_flops=self.source_flops, input=spec.input, config=config.to_dict(),
            config_digest=config.digest(), k=self.k, fewshot_seed=self.seed, seconds=seconds,
            stage_seconds=outcome.stage_seconds, metrics=outcome.metrics, subset=self.subset,
            device=self.slicer.device.type, precision=self.slicer.precision)
        log.info("sliced %s class %s (%s): %d -> %d params, %d features, %.1fs", spec.id,
                 class_id, fspec.class_name, self.source_params, fspec.params, feature_dim, seconds)
        return Fragment(fspec, outcome.features, outcome.probe)


def slice_model(market: Market, model_id: str, classes: list[int] | None, k: int,
                config: SliceConfig, fewshot_seed: int = 0, engine: str | None = None) -> Iterator[Fragment]:
    """Yield one fragment per class of ``model_id`` (all its classes by default), a unit of
    classes at a time (see :meth:`ModelSlicer.units`)."""
    ms = ModelSlicer(market, model_id, k, config, fewshot_seed, engine=engine)
    for unit in ms.units([int(c) for c in (classes if classes is not None else ms.spec.classes)]):
        yield from ms.slice_many(unit)


def pair_key(model: ModelSpec, class_id: int, config: SliceConfig, k: int, seed: int) -> str:
    return fragment_key(model.identity, class_id, config.digest(), k, seed)
