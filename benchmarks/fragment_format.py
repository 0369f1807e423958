"""Fragment inference speed in NCHW vs channels_last on this CPU (what packing and testing pay).

Usage: python benchmarks/fragment_format.py [--market runs/tables/T1/vgg11-w0.25] [--k 10] [--repeats 7]
Reports the median seconds of one forward over the k-shot images x 8 views for each of the
market's fragments at the quick preset, in both formats, and the largest output difference.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from snp_ray.artifacts import atomic_write_bytes
from snp_ray.market import Market
from snp_ray.slicing import slice_preset
from snp_ray.slicing.api import pair_key
from snp_ray.store import market_fragment_store


def _median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--market", default="runs/tables/T1/vgg11-w0.25")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default="benchmarks/results/fragment_format.json")
    a = p.parse_args()
    torch.set_num_threads(1)
    market, cfg = Market(a.market), slice_preset("quick")
    store = market_fragment_store(market)
    rows = []
    for spec in market.specs():
        x = None
        for c in spec.classes:
            frag = store.get(pair_key(spec, c, cfg, a.k, 0))
            if x is None:
                x = frag.encode(market.fewshot(spec.id, a.k).raw).repeat(8, 1, 1, 1)
            nchw = copy.deepcopy(frag.features).to(memory_format=torch.contiguous_format)
            with torch.no_grad():
                base = _median_seconds(lambda: nchw(x), a.repeats)
                fast = _median_seconds(lambda: frag(x), a.repeats)
                diff = float((nchw(x) - frag(x)).abs().max())
            rows.append({"fragment": frag.spec.key, "channels_last": frag.channels_last,
                         "nchw_s": base, "used_s": fast, "speedup": base / fast, "max_abs_diff": diff})
            print(f"{spec.id} class {c}: NCHW {base * 1000:.1f} ms, as used "
                  f"{'channels_last' if frag.channels_last else 'NCHW'} {fast * 1000:.1f} ms, "
                  f"x{base / fast:.2f}, max diff {diff:.1e}")
    speedups = [r["speedup"] for r in rows]
    print(f"median speed-up x{statistics.median(speedups):.2f} over {len(rows)} fragments "
          f"(batch {x.shape[0]}, 1 thread)")
    out = {"machine": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
           "market": a.market, "k": a.k, "rows": rows, "median_speedup": statistics.median(speedups)}
    atomic_write_bytes(Path(a.out), json.dumps(out, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
