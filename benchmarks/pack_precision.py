"""Packing in fp32 vs bf16 autocast on stored fragments: test accuracy and seconds per pack.

The packs are the T1 target sets plus one pack of every class of the market, all at k. Each
precision runs the same packs after one warm-up pack each; the order of the two precisions
alternates from round to round, and seconds are medians over the rounds.

Usage: python benchmarks/pack_precision.py [--market runs/fig7-vgg11] [--k 10] [--preset quick]
           [--targets 5] [--rounds 2]
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

from snp_ray.artifacts import atomic_write_bytes


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--market", default="runs/fig7-vgg11")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--preset", default="quick", help="slice preset of the stored fragments")
    p.add_argument("--targets", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/pack_precision.json")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    from snp_ray.evaluation.packs import pack_accuracy
    from snp_ray.market import Market
    from snp_ray.market.tasks import get_task, target_sets
    from snp_ray.packing import PackConfig
    from snp_ray.packing.request import pack_request
    from snp_ray.slicing import slice_preset

    torch.set_num_threads(1)
    market = Market(a.market)
    task = get_task(market.spec(market.ids()[0]).task)
    every = sorted({c for m in market.ids() for c in market.spec(m).classes})
    combos = [list(c) for c in target_sets(task, a.targets, 0)] + [every]
    slice_cfg = slice_preset(a.preset)
    for prec in ("fp32", "bf16"):                                                   # warm-up
        pack_request(market, combos[0], a.k, slice_cfg, PackConfig(precision=prec))
    runs: dict[str, dict] = {p: {"accuracy": None, "seconds": [[] for _ in combos]} for p in ("fp32", "bf16")}
    for r in range(a.rounds):
        for prec in (("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32")):
            accs = []
            for i, combo in enumerate(combos):
                packed = pack_request(market, combo, a.k, slice_cfg, PackConfig(precision=prec))
                accs.append(100 * pack_accuracy(packed))
                runs[prec]["seconds"][i].append(packed.spec.metrics["pack_seconds"])
            runs[prec]["accuracy"] = accs
    out = {"meta": {"machine": f"{platform.node()} ({platform.machine()}), 1 torch thread",
                    "torch": torch.__version__, "command": " ".join(sys.argv), "market": a.market, "k": a.k},
           "packs": [{"classes": c, **{f"{p}_accuracy": runs[p]["accuracy"][i] for p in runs},
                      **{f"{p}_seconds": statistics.median(runs[p]["seconds"][i]) for p in runs}}
                     for i, c in enumerate(combos)]}
    for prec in runs:
        out[f"{prec}_mean_target_accuracy"] = statistics.fmean(runs[prec]["accuracy"][:-1])
    atomic_write_bytes(Path(a.out), json.dumps(out, indent=2).encode())
    print(json.dumps({k: v for k, v in out.items() if k.endswith("accuracy")} |
                     {"seconds": [(round(r["fp32_seconds"], 3), round(r["bf16_seconds"], 3)) for r in out["packs"]]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
