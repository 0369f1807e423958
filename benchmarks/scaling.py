"""Throughput of the slice job with 1 and with 2 CPU actors on the same pairs, and the parallel
efficiency (speed-up / actors). Each run slices into a fresh fragment store; runs alternate
(1, 2, 1, 2, ...) and the medians are reported, so machine noise hits both sides alike.

Usage: python benchmarks/scaling.py [--market runs/quickstart] [--repeats 2] [--preset quick]
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from snp_ray.engine.job import SliceJobConfig, run_slice_job
from snp_ray.engine.presets import get_preset
from snp_ray.market import build_market
from snp_ray.runtime import ensure_ray


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--market", default="runs/quickstart")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--preset", default="quick")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--out", default="benchmarks/results/scaling.json")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    build_market(get_preset("quickstart").market, a.market, progress=False)
    ensure_ray(num_cpus=2)
    walls: dict[int, list[float]] = {1: [], 2: []}
    for rep in range(a.repeats):
        for n in (1, 2):
            with tempfile.TemporaryDirectory() as tmp:
                cfg = SliceJobConfig(market=a.market, fragments=str(Path(tmp) / "f"), k=a.k,
                                     preset=a.preset, actors=n)
                t0 = time.perf_counter()
                res = run_slice_job(cfg)
                walls[n].append(time.perf_counter() - t0)
                assert res.done == res.total, res.summary()
            print(f"repeat {rep}: {n} actor(s) {walls[n][-1]:.1f}s for {res.total} pairs", flush=True)
    m1, m2 = statistics.median(walls[1]), statistics.median(walls[2])
    out = {"pairs": res.total, "median_wall_1_actor": round(m1, 2), "median_wall_2_actors": round(m2, 2),
           "throughput_1": round(res.total / m1, 4), "throughput_2": round(res.total / m2, 4),
           "speedup": round(m1 / m2, 3), "parallel_efficiency": round(m1 / m2 / 2, 3),
           "walls": walls, "machine": f"{platform.node()} ({platform.machine()}), 2 CPUs to Ray",
           "preset": a.preset, "k": a.k}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
