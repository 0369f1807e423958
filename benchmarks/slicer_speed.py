"""Naive vs optimised slicer, side by side: seconds per fragment, accuracy and peak RSS.

Each variant slices every (model, class) pair of the market (T1: 3 models, 10 pairs), model by
model, in its own fresh process (so its peak RSS is what one slicing actor holds), then its
fragments are scored on the test split:
- ``fragment AUC``: each fragment's class-vs-rest ROC-AUC over its model's classes;
- ``pack accuracy``: all the fragments packed into one classifier over all their classes.
The headline is the mean seconds per fragment (total slicing time / fragments): it includes the
one-off work of each model's first class (the cached engine fills its caches there).

Variants are ``engine:views:precision``. ``naive:0:fp32`` is the reference, the slicer before
#8: a fresh augmentation and whole fp32 forwards (the original model's included) at every step.
``naive:4:fp32`` and ``cached:4:fp32`` use the same 4 augmented views per image and give the same
fragments, so their ratio is the caching alone. ``cached:4:auto`` is the default (bf16 autocast
where the hardware has it).

Usage: python benchmarks/slicer_speed.py [--markets runs/bench/vgg11 runs/bench/resnet20]
           [--k 10] [--preset quick] [--variants naive:0:fp32 cached:4:auto]
           [--repeats 1] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from snp_ray.artifacts import atomic_write_bytes


def _run_variant(market_root: str, k: int, preset: str, n_classes: int, engine: str, views: int,
                 precision: str, device: str, threads: int, queue) -> None:
    """One variant in a fresh process: slice, then report times, fragments' scores and RSS."""
    from snp_ray.evaluation.fragments import fragment_auc
    from snp_ray.evaluation.packs import pack_accuracy
    from snp_ray.market import Market
    from snp_ray.packing import Packer, PackConfig
    from snp_ray.packing.packer import PackSamples
    from snp_ray.slicing import slice_preset
    from snp_ray.slicing.api import ModelSlicer

    torch.set_num_threads(threads)
    market = Market(market_root)
    cfg = slice_preset(preset, views=views, precision=precision)
    setup, frags, aucs, models = 0.0, [], [], []
    for mid in market.ids():
        if len(frags) >= n_classes:
            break
        t0 = time.perf_counter()
        ms = ModelSlicer(market, mid, k, cfg, engine=engine, device=device)
        setup += time.perf_counter() - t0
        models.append(mid)
        for c in ms.spec.classes[: n_classes - len(frags)]:
            frags.append(ms.slice(c))
            aucs.append(fragment_auc(frags[-1], ms.spec.dataset, ms.spec.classes))
        del ms                                   # one model's slicer at a time, like an actor
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    classes = [f.spec.class_id for f in frags]
    pack_acc = None
    if len(set(classes)) > 1:
        samples = PackSamples.from_fewshot([market.fewshot(m, k, 0) for m in models], classes)
        pack_acc = pack_accuracy(Packer(PackConfig()).pack(frags, samples, classes))
    queue.put({"setup_seconds": setup, "seconds": [f.spec.seconds for f in frags],
               "precision": frags[0].spec.precision, "device": frags[0].spec.device,
               "stage_seconds": [f.spec.stage_seconds for f in frags],
               "params": [f.spec.params for f in frags], "kept": [f.spec.kept for f in frags],
               "test_auc": aucs, "pack_accuracy": pack_acc, "peak_rss_mb": rss_mb})


def run_variant(*args) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_run_variant, args=(*args, q))
    p.start()
    out = q.get()
    p.join()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--markets", nargs="*", default=["runs/bench/vgg11", "runs/bench/resnet20"])
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--preset", default="quick")
    p.add_argument("--classes", type=int, default=1000, help="at most this many pairs, model by model")
    p.add_argument("--variants", nargs="*",
                   default=["naive:0:fp32", "naive:4:fp32", "cached:4:fp32", "cached:4:auto"])
    p.add_argument("--repeats", type=int, default=1, help="rounds of all variants, interleaved")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/slicer_speed.json")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    results: dict[str, dict] = {}
    for root in a.markets:
        name = Path(root).name
        runs: dict[str, list[dict]] = {v: [] for v in a.variants}
        for r in range(a.repeats):
            for v in a.variants:          # interleaved, so that machine noise hits all alike
                engine, views, precision = v.split(":")
                out = run_variant(root, a.k, a.preset, a.classes, engine, int(views), precision,
                                  a.device, a.threads)
                runs[v].append(out)
                print(f"{name} {v:9s} round {r}: {statistics.fmean(out['seconds']):.2f} s/fragment "
                      f"({len(out['seconds'])} fragments, {out['precision']}), "
                      f"AUC {100 * np.mean(out['test_auc']):.2f}, pack "
                      f"{out['pack_accuracy'] if out['pack_accuracy'] is None else round(100 * out['pack_accuracy'], 2)}, "
                      f"RSS {out['peak_rss_mb']:.0f} MB", flush=True)
        summary = {}
        for v, outs in runs.items():
            per_round = [statistics.fmean(o["seconds"]) for o in outs]
            summary[v] = {"mean_seconds_per_fragment": statistics.median(per_round),
                          "median_seconds_per_fragment": statistics.median(
                              statistics.median(o["seconds"]) for o in outs),
                          "mean_seconds_per_round": per_round,
                          "seconds_per_fragment": outs[0]["seconds"], "fragments": len(outs[0]["seconds"]),
                          "precision": outs[0]["precision"], "device": outs[0]["device"],
                          "setup_seconds": outs[0]["setup_seconds"],
                          "test_auc_per_fragment": outs[0]["test_auc"],
                          "mean_test_auc": 100 * float(np.mean(outs[0]["test_auc"])),
                          "pack_accuracy": None if outs[0]["pack_accuracy"] is None else 100 * outs[0]["pack_accuracy"],
                          "peak_rss_mb": max(o["peak_rss_mb"] for o in outs),
                          "mean_params": float(np.mean(outs[0]["params"])),
                          "stage_seconds": {s: statistics.median(st[s] for o in outs for st in o["stage_seconds"])
                                            for s in outs[0]["stage_seconds"][0]},
                          "kept": outs[0]["kept"]}
        ref, opt = a.variants[0], a.variants[-1]
        same = None
        if "naive:4:fp32" in runs and "cached:4:fp32" in runs:
            same = runs["naive:4:fp32"][0]["kept"] == runs["cached:4:fp32"][0]["kept"]
        results[name] = {"variants": summary, "speedup": summary[ref]["mean_seconds_per_fragment"]
                         / summary[opt]["mean_seconds_per_fragment"],
                         "speedup_of": f"{ref} / {opt}", "naive4_cached4_same_kept_units": same}
        if "naive:4:fp32" in summary and "cached:4:fp32" in summary:
            results[name]["caching_speedup"] = (summary["naive:4:fp32"]["mean_seconds_per_fragment"]
                                                / summary["cached:4:fp32"]["mean_seconds_per_fragment"])
        for v in summary.values():
            v.pop("kept")
    meta = {"machine": f"{platform.node()} ({platform.machine()}, {platform.processor() or 'cpu'}), "
                       f"{a.threads} torch thread(s), device {a.device}",
            "torch": torch.__version__, "k": a.k, "preset": a.preset, "classes": a.classes,
            "repeats": a.repeats, "command": " ".join(sys.argv)}
    atomic_write_bytes(Path(a.out), json.dumps({"meta": meta, "results": results}, indent=2).encode())
    print(json.dumps({n: {"speedup": round(r["speedup"], 2), "caching_speedup": round(r.get("caching_speedup", 0), 2),
                          "same_kept": r["naive4_cached4_same_kept_units"]} for n, r in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
