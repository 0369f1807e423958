"""Every fragment of a market against the mixed-market bar (test AUC >= 0.85, #13/#27), beside
its source model's own AUC on the same rows.

The bar asks each fragment to separate its class from its model's other classes on the test
split. A fragment cannot beat the whole model it was cut from by much, so the source model's AUC
per class is printed beside it: where the source is under the bar, so will its fragment be.

Usage: python benchmarks/fragment_auc.py --store runs/stages/T1-vit/<digest>/tables/T1/vit-w1
           --k 10 [--preset quick] [--out docs/history/vit-fragment-auc-k10.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from snp_ray.artifacts import atomic_write_bytes
from snp_ray.evaluation.mixed import measure_fragments, measure_sources
from snp_ray.runtime import environment

BAR = 0.85


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--preset", default="quick")
    p.add_argument("--out", default="")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t0 = time.perf_counter()
    rows = measure_fragments(a.store, a.k, a.preset)
    sources = measure_sources(a.store, rows)        # also writes each row's source_auc
    below = [r for r in rows if r["test_auc"] < BAR]
    out = {"store": a.store, "k": a.k, "preset": a.preset, "bar": BAR, "fragments": rows,
           "sources": sources,
           "min_test_auc": min(r["test_auc"] for r in rows), "below_bar": len(below),
           "seconds": round(time.perf_counter() - t0, 1), "machine": environment(),
           "command": f"python benchmarks/fragment_auc.py --store {a.store} --k {a.k} --preset {a.preset}"}
    print(f"{'model':16} {'class':12} {'fragment AUC':>12} {'source AUC':>10} {'params':>7}")
    for r in rows:
        print(f"{r['model']:16} {r['class']:12} {r['test_auc']:12.3f} {r['source_auc']:10.3f} "
              f"{r['param_ratio']:7.3f}")
    print(f"{len(below)} of {len(rows)} fragments under the bar {BAR}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(Path(a.out), (json.dumps(out, indent=1) + "\n").encode())


if __name__ == "__main__":
    main()
