"""The mixed market measured (:mod:`snp_ray.market.mixed`): every fragment's class-vs-rest AUC on
the test split, a pack made of each model's fragments under its own slicing config, and the
per-family summary of ``mixed.json``.

``chosen`` maps a model id to its slicing :class:`~snp_ray.tuning.select.Candidate` when each
model was sliced with its own config (``--slice-preset auto``); without it every model was sliced
with one preset.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from snp_ray.market.market import Market
from snp_ray.market.mixed import Member
from snp_ray.slicing.api import pair_key
from snp_ray.slicing.config import SliceConfig, slice_preset


def slice_config_of(model_id: str, preset: str, chosen: dict[str, Any] | None) -> SliceConfig:
    """The slicing config ``model_id``'s fragments were made with: its chosen candidate's, else
    the preset's."""
    return chosen[model_id].config() if chosen else slice_preset(preset)


def measure_fragments(store: str | Path, k: int, preset: str,
                      chosen: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every fragment of the market at this k: slicing seconds, sizes, and its test-split AUC."""
    from snp_ray.evaluation.fragments import fragment_auc
    from snp_ray.store import FragmentStore

    market = Market(store)
    fstore = FragmentStore(Path(store) / "fragments")
    rows = []
    for spec in market.specs():
        scfg = slice_config_of(spec.id, preset, chosen)
        for c in spec.classes:
            key = pair_key(spec, c, scfg, k, 0)
            frag = fstore.get(key)
            row = fstore.rows()[key]
            rows.append({"model": spec.id, "arch": spec.arch, "class": frag.spec.class_name,
                         "slice_config": chosen[spec.id].name if chosen else preset,
                         "seconds": row["seconds"], "params": frag.spec.params,
                         "source_params": frag.spec.source_params,
                         "param_ratio": frag.spec.params / frag.spec.source_params,
                         "test_auc": fragment_auc(frag, spec.dataset, spec.classes)})
    return rows


def measure_sources(store: str | Path, frags: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each source model on the test rows of its classes: its top-1 accuracy and its own
    ROC-AUC per class (:func:`~snp_ray.evaluation.fragments.source_auc`, the ceiling of its
    fragments), which is also written beside each fragment row of ``frags`` (``source_auc``)."""
    from snp_ray.data.testsplit import test_accuracy
    from snp_ray.evaluation.fragments import source_auc

    market = Market(store)
    out = {}
    for spec in market.specs():
        model, spec = market.model(spec.id)
        aucs = source_auc(model, spec.input_spec.encode, spec.dataset, spec.classes)
        by_name = {n: aucs[c] for n, c in zip(spec.class_names, spec.classes)}
        out[spec.id] = {"test_accuracy": test_accuracy(model, spec.input_spec, spec.dataset,
                                                       spec.classes),
                        "test_auc": by_name}
        for f in frags:
            if f["model"] == spec.id:
                f["source_auc"] = by_name[f["class"]]
    return out


def chosen_keys(market: Market, ids: list[int], k: int, chosen: dict[str, Any]) -> list[str]:
    """The fragment key of every holder of each class in ``ids``, each under its own model's
    chosen slicing config (``snp pack`` takes one preset for every model)."""
    return [pair_key(spec, c, chosen[spec.id].config(), k, 0)
            for c in ids for spec in market.holders(c)]


def pack_chosen(store: str | Path, classes: list[str], k: int, chosen: dict[str, Any]
                ) -> dict[str, Any]:
    """Pack ``classes`` from each holder's fragment of its own chosen config on the holders'
    k shots, and evaluate the pack on the test split."""
    from snp_ray.evaluation.packs import evaluate_pack
    from snp_ray.packing import PackConfig
    from snp_ray.packing.packer import Packer, PackSamples
    from snp_ray.store import market_fragment_store

    market = Market(store)
    fstore = market_fragment_store(market)
    ids = market.class_ids(classes)
    frags = [fstore.get(key) for key in chosen_keys(market, ids, k, chosen)]
    holders = sorted({f.spec.source_model for f in frags})
    samples = PackSamples.from_fewshot([market.fewshot(m, k, 0) for m in holders], ids)
    return evaluate_pack(Packer(PackConfig()).pack(frags, samples, ids))


def family_summary(members: list[Member], frags: list[dict[str, Any]], preset: str,
                   chosen: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Per member (family): its slicing config, source size, median slicing seconds, mean
    fragment/source parameter ratio, and the lowest and mean test AUC of its fragments."""
    families = {}
    for m in members:
        own = [f for f in frags if f["model"] == m.id]
        families[m.id] = {"arch": m.arch, "input_size": m.input_size,
                          "slice_config": chosen[m.id].name if chosen else preset,
                          "source_params": own[0]["source_params"],
                          "slice_seconds_median": statistics.median(f["seconds"] for f in own),
                          "param_ratio_mean": statistics.mean(f["param_ratio"] for f in own),
                          "test_auc_min": min(f["test_auc"] for f in own),
                          "test_auc_mean": statistics.mean(f["test_auc"] for f in own)}
    return families
