"""Deployable size of text packs before and after table sharing (issue #17, section 2).

For each slice setting, packs every class of the market from its stored fragments once with one
lookup table per fragment (``PackConfig.share_tables`` off), then shares the tables of a copy
(:meth:`PackedModel.share_tables`) and reports both sizes against the Ensemble baseline's
deployable size (every task model's extractor + one linear head over their features), the
largest difference of the two packs' test-split probabilities, and the test accuracy.

Usage: python benchmarks/text_pack_size.py --market runs/t6 [--k 10] [--preset quick] [--hidden H]
           [--variants threshold,threshold+frozen,rate0.5,rate0.5+frozen] [--out FILE]
A variant is ``threshold`` or ``rate<beta>`` (``threshold<beta>`` too), then ``+frozen`` for
fragments sliced with ``freeze_tables`` and ``+table<rate>`` for ``table_rate``; each must be
sliced first (``snp slice`` with the same settings), or pass ``--slice`` to slice what is missing.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import sys

import torch

from snp_ray.artifacts import atomic_write_json

def table_params(module: torch.nn.Module) -> int:
    """Parameters held in lookup tables (embeddings, shared or not), each tensor once."""
    from snp_ray.packing.shared import SharedEmbedding

    seen = {id(m.weight): m.weight.numel() for m in module.modules()
            if isinstance(m, (torch.nn.Embedding, SharedEmbedding))}
    return sum(seen.values())


def ensemble_params(market, classes: list[int]) -> tuple[int, int]:
    """The Ensemble baseline's deployable size (every task model's extractor + a linear head over
    the concatenated features, as ``baselines.ensemble`` counts it) and its table part."""
    from snp_ray.models import count_params

    total, dims, tables = 0, 0, 0
    for mid in market.ids():
        model, _ = market.model(mid)
        total += count_params(model.features)
        tables += table_params(model.features)
        dims += model.feature_dim
    return total + (dims + 1) * len(classes), tables


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--market", required=True)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--preset", default="quick")
    p.add_argument("--hidden", type=int, default=0, help="Enc width (default: the preset's)")
    p.add_argument("--variants", default="threshold,threshold+frozen,rate0.5,rate0.5+frozen")
    p.add_argument("--out", default="")
    p.add_argument("--slice", action="store_true", help="slice each variant's missing fragments first")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    from snp_ray.data.testsplit import load_test_split
    from snp_ray.market import Market
    from snp_ray.packing import preset_pack_config
    from snp_ray.packing.request import pack_request
    from snp_ray.slicing import slice_preset
    from snp_ray.store import slice_missing
    from snp_ray.slicing.config import variant_overrides

    torch.set_num_threads(1)
    market = Market(a.market)
    classes = sorted({c for m in market.ids() for c in market.spec(m).classes})
    ens, ens_tables = ensemble_params(market, classes)
    split = load_test_split(market.spec(market.ids()[0]).dataset, classes)
    rows = []
    for variant in [v for v in a.variants.split(",") if v]:
        cfg = slice_preset(a.preset, **variant_overrides(variant))
        if a.slice:
            for _ in slice_missing(market, a.k, cfg):
                pass
        packed = pack_request(market, classes, a.k, cfg,
                              preset_pack_config(a.preset, share_tables=False,
                                                 **({"hidden": a.hidden} if a.hidden else {})))
        shared = copy.deepcopy(packed)
        shared.share_tables()
        before, after = packed.params_deployable(), shared.params_deployable()
        p0 = packed.predict_proba(split.texts, strict=False)
        p1 = shared.predict_proba(split.texts, strict=False)
        acc = float((torch.as_tensor(classes)[p1.argmax(1)].numpy() == split.labels).mean())
        tables = table_params(shared)
        rows.append({"variant": variant, "params_before": before, "params_after": after,
                     "ensemble_params": ens, "pct_before": round(100 * before / ens, 1),
                     "pct_after": round(100 * after / ens, 1), "tables_after": tables,
                     # the paper's text models (8e4, 36e4) look counted without their tables
                     "pct_after_without_tables": round(100 * (after - tables) / (ens - ens_tables), 1),
                     "table_columns": [len(t.units) for t in shared.spec.tables],
                     "max_abs_prob_diff": float((p0 - p1).abs().max()),
                     "test_accuracy": round(100 * acc, 2)})
        print(json.dumps(rows[-1]), flush=True)
    if a.out:
        atomic_write_json(a.out, {"market": a.market, "k": a.k, "preset": a.preset, "hidden": a.hidden,
                                  "command": " ".join(sys.argv), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
