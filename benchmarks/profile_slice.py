"""Where one fragment's slicing time goes: seconds per stage (pooling, adaption, combining,
fusion) and the share of the hot calls inside them (the original model's forward for targets,
the sliced network's forwards, backward, optimiser steps, augmentation, weight merging).

Usage: python benchmarks/profile_slice.py [--market runs/tables/T1/vgg11-w0.25] [--k 10]
                                          [--preset quick] [--classes 1] [--threads 1]
"""
from __future__ import annotations

import argparse
import cProfile
import json
import logging
import platform
import pstats
import sys
import time
from pathlib import Path

import torch

from snp_ray.artifacts import atomic_write_bytes
from snp_ray.market import Market
from snp_ray.slicing import slice_preset
from snp_ray.slicing.api import ModelSlicer

#: (label, file suffix, function name) of the calls whose cumulative time is reported
HOT = [("original model forward (targets)", "slicer.py", "original_logits"),
       ("sliced network forwards", "slicer.py", "_features"),
       ("backward", "__init__.py", "backward"),
       ("optimiser steps", "adam.py", "step"),
       ("augmentation", "augment.py", "augment_images"),
       ("f- merge of weights", "slicer.py", "_merged"),
       ("f~ weights", "slicer.py", "_tilde"),
       ("least-squares repair init", "slicer.py", "init_repair"),
       ("few-shot diagnostics", "slicer.py", "_fewshot_metrics")]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--market", default="runs/tables/T1/vgg11-w0.25")
    p.add_argument("--model", default="", help="model id (default: the market's first)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--preset", default="quick")
    p.add_argument("--classes", type=int, default=1, help="how many of the model's classes")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/profile_slice.json")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    torch.set_num_threads(a.threads)
    market = Market(a.market)
    mid = a.model or market.ids()[0]
    t0 = time.perf_counter()
    ms = ModelSlicer(market, mid, a.k, slice_preset(a.preset))
    setup = time.perf_counter() - t0
    rows = []
    for c in ms.spec.classes[: a.classes]:
        prof = cProfile.Profile()
        prof.enable()
        frag = ms.slice(c)
        prof.disable()
        stats = pstats.Stats(prof)
        hot = {}
        for (fname, _, func), (_, _, _, cum, _) in stats.stats.items():
            for label, suffix, name in HOT:
                if func == name and fname.endswith(suffix):
                    hot[label] = hot.get(label, 0.0) + cum
        total = frag.spec.seconds
        rows.append({"class": frag.spec.class_name, "seconds": total,
                     "stages": frag.spec.stage_seconds,
                     "hot_seconds": hot, "hot_share": {k: v / total for k, v in hot.items()}})
        print(f"{mid} class {frag.spec.class_name}: {total:.1f}s (under cProfile)")
        for stage, s in frag.spec.stage_seconds.items():
            print(f"  stage {stage:10s} {s:7.2f}s  {100 * s / total:5.1f} %")
        for label, s in sorted(hot.items(), key=lambda kv: -kv[1]):
            print(f"  call  {label:34s} {s:7.2f}s  {100 * s / total:5.1f} % (cumulative, overlaps)")
    out = {"machine": platform.platform(), "processor": platform.processor(),
           "threads": a.threads, "torch": torch.__version__, "market": a.market, "model": mid,
           "k": a.k, "preset": a.preset, "setup_seconds": setup, "fragments": rows}
    atomic_write_bytes(Path(a.out), json.dumps(out, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
