"""Seconds per fragment (k=10, this machine) for each model family and slice preset, with the
fragment's size and its class-vs-rest ROC-AUC on the test split (evaluation only).

Usage: python benchmarks/slice_one.py [--families vgg11 resnet20 textcnn gru]
                                      [--presets quick paper] [--all-classes]
Markets are trained once into runs/bench/<family> (reused on later runs).
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
from pathlib import Path

import torch

from snp_ray.evaluation.fragments import fragment_auc
from snp_ray.evaluation.protocol import market_config
from snp_ray.market import Market, build_market
from snp_ray.slicing import slice_model, slice_preset

MARKETS = {"vgg11": market_config("T1", "vgg11"), "resnet20": market_config("T1", "resnet20"),
           "textcnn": market_config("T7", "textcnn"), "gru": market_config("T6", "gru")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--families", nargs="*", default=list(MARKETS), choices=list(MARKETS))
    p.add_argument("--presets", nargs="*", default=["quick", "paper"])
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--all-classes", action="store_true", help="slice every class, not only the first of each model")
    p.add_argument("--root", default="runs/bench")
    p.add_argument("--out", default="benchmarks/results/slice_one.json")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    torch.set_num_threads(1)
    results = {}
    for fam in a.families:
        root = Path(a.root) / fam
        specs = build_market(MARKETS[fam], root, progress=False)
        market = Market(root)
        for preset in a.presets:
            cfg = slice_preset(preset)
            rows = []
            for spec in specs:
                classes = spec.classes if a.all_classes else spec.classes[:1]
                for frag in slice_model(market, spec.id, classes, a.k, cfg):
                    f = frag.spec
                    auc = fragment_auc(frag, spec.dataset, spec.classes)
                    rows.append({"model": spec.id, "class": f.class_name, "seconds": round(f.seconds, 2),
                                 "stage_seconds": {k: round(v, 2) for k, v in f.stage_seconds.items()},
                                 "params": f.params, "source_params": f.source_params,
                                 "feature_dim": f.feature_dim, "flops": f.flops,
                                 "source_flops": f.source_flops, "test_auc": round(auc, 4),
                                 "fewshot_auc": round(f.metrics["fewshot_auc"], 4)})
                    print(f"{fam:9s} {preset:6s} {spec.id:22s} {f.class_name:12s} {f.seconds:6.1f}s "
                          f"params {f.params:>9,}/{f.source_params:<9,} AUC {auc:.3f}", flush=True)
            results[f"{fam}/{preset}"] = {
                "median_seconds": statistics.median(r["seconds"] for r in rows),
                "median_param_ratio": statistics.median(r["params"] / r["source_params"] for r in rows),
                "min_test_auc": min(r["test_auc"] for r in rows),
                "mean_test_auc": statistics.fmean(r["test_auc"] for r in rows), "fragments": rows}
    meta = {"machine": f"{platform.node()} ({platform.machine()}), 1 torch thread",
            "torch": torch.__version__, "k": a.k}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(json.dumps({k: {x: v[x] for x in ("median_seconds", "median_param_ratio", "min_test_auc",
                                              "mean_test_auc")} for k, v in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
