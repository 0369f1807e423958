"""Quality bar of the original models: test accuracy on own classes and wall time per market.

Usage: python benchmarks/train_market.py [--only NAME ...] [--out benchmarks/results/train_market.json]
Each market trains into a fresh temporary store, so nothing is reused between runs.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from snp_ray.evaluation.protocol import market_config
from snp_ray.market import build_market

RUNS = {
    "T1-vgg11x0.25": market_config("T1", "vgg11"),
    "T1-resnet20": market_config("T1", "resnet20"),
    "T6-gru": market_config("T6", "gru"),
    "T7-textcnn": market_config("T7", "textcnn"),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--only", nargs="*", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--out", default="benchmarks/results/train_market.json")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    results = {}
    for name in a.only:
        cfg = RUNS[name]
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            specs = build_market(cfg, tmp, progress=False)
            wall = time.perf_counter() - t0
        results[name] = {"config": cfg.to_dict(), "wall_seconds": round(wall, 1),
                         "models": [{"id": s.id, "classes": s.class_names, "params": s.params,
                                     "test_accuracy": round(s.metrics["test_accuracy"], 4),
                                     "train_seconds": round(s.metrics["train_seconds"], 1)}
                                    for s in specs]}
        accs = ", ".join(f"{m['test_accuracy']:.3f}" for m in results[name]["models"])
        print(f"{name}: wall {wall:.0f}s, test accuracy per model {accs}", flush=True)
    meta = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                       f"{torch.get_num_threads()} torch threads", "torch": torch.__version__}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(json.dumps({"results": {k: {"wall_seconds": v["wall_seconds"],
                                      "test_accuracy": [m["test_accuracy"] for m in v["models"]]}
                                  for k, v in results.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
