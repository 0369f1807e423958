"""T1 on one GPU: train (or load) a VGG16 market, slice all 10 (model, class) pairs with the Ray
slice job, pack the T1 target sets, and write seconds and accuracies to one JSON file.

Run it through ``benchmarks/gpu_t1.sh`` (which installs first). Without a GPU it runs the same
path on the CPU; use a tiny ``--width`` there (the CPU smoke run of this script).

Usage: python benchmarks/gpu_t1.py [--width 1.0] [--epochs 8] [--train-fraction 1.0] [--k 10]
           [--preset quick] [--targets 5] [--root runs/gpu-t1] [--out benchmarks/results/gpu_t1.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from snp_ray.artifacts import atomic_write_bytes


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=float, default=1.0, help="VGG16 width multiplier (1.0 = full)")
    p.add_argument("--epochs", type=int, default=8, help="training epochs of each original model")
    p.add_argument("--train-fraction", type=float, default=1.0)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--preset", default="quick", help="slice preset")
    p.add_argument("--targets", type=int, default=5, help="T1 target sets to pack and test")
    p.add_argument("--actors", type=int, default=0, help="slicing actors (0: 3 per GPU, or 1 per CPU)")
    p.add_argument("--root", default="runs/gpu-t1")
    p.add_argument("--out", default="benchmarks/results/gpu_t1.json")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from snp_ray.engine.job import SliceJobConfig, run_slice_job
    from snp_ray.evaluation.packs import pack_accuracy
    from snp_ray.evaluation.protocol import market_config
    from snp_ray.market import Market, build_market
    from snp_ray.market.tasks import get_task, target_sets
    from snp_ray.packing import PackConfig
    from snp_ray.packing.request import pack_request
    from snp_ray.runtime import default_device, ensure_ray
    from snp_ray.slicing import slice_preset

    import ray

    t_all = time.perf_counter()
    ensure_ray()
    gpus = float(ray.cluster_resources().get("GPU", 0))
    device = default_device()
    gpu_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    root = Path(a.root) / f"vgg16-w{a.width:g}-e{a.epochs}"

    t0 = time.perf_counter()
    cfg = market_config("T1", "vgg16", a.width, a.epochs, a.train_fraction, [a.k])
    specs = build_market(cfg, root, progress=True)
    train_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    job = SliceJobConfig(market=str(root), k=a.k, preset=a.preset, actors=a.actors or (3 if gpus else 0),
                         gpus_per_actor=min(1.0, gpus / 3) if gpus else 1.0)
    result = run_slice_job(job)
    slice_s = time.perf_counter() - t0
    done = [r for r in result.results.values() if r.get("status") == "done"]
    per_fragment = [r["seconds"] for r in done]
    # where the actors really sliced, and in which arithmetic (not the driver's view)
    sliced_on = dict(Counter(f"{r.get('device')}/{r.get('precision')}" for r in done))

    market, slice_cfg = Market(root), slice_preset(a.preset)
    t0 = time.perf_counter()
    packs = []
    for combo in target_sets(get_task("T1"), a.targets, 0):
        packed = pack_request(market, list(combo), a.k, slice_cfg, PackConfig())
        packs.append({"classes": list(combo), "accuracy": pack_accuracy(packed),
                      "params": packed.params_deployable(),
                      "pack_seconds": packed.spec.metrics["pack_seconds"]})
    pack_s = time.perf_counter() - t0
    out = {
        "machine": {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
                    "device": device, "gpu": gpu_name, "ray_gpus": gpus, "torch": torch.__version__},
        "config": {"width": a.width, "epochs": a.epochs, "train_fraction": a.train_fraction, "k": a.k,
                   "preset": a.preset, "targets": a.targets, "command": " ".join(sys.argv)},
        "original_models": [{"id": s.id, "test_accuracy": s.metrics.get("test_accuracy"),
                             "train_seconds": s.metrics.get("train_seconds"),
                             "train_on_gpu": bool(s.metrics.get("train_on_gpu", 0.0))} for s in specs],
        "train_wall_seconds": train_s,
        "slice": {"wall_seconds": slice_s, "fragments_done": len(done), "skipped": result.skipped,
                  "failed": result.failed, "sliced_on": sliced_on,
                  "peak_rss_mb_per_actor": result.summary()["peak_rss_mb_per_actor"],
                  "median_seconds_per_fragment":
                      statistics.median(per_fragment) if per_fragment else None,
                  "seconds_per_fragment": per_fragment},
        "packs": packs, "pack_wall_seconds": pack_s,
        "mean_pack_accuracy": statistics.fmean(p["accuracy"] for p in packs) if packs else None,
        "total_wall_seconds_after_install": time.perf_counter() - t_all,
    }
    atomic_write_bytes(Path(a.out), json.dumps(out, indent=2).encode())
    print(json.dumps({"slice_wall_s": round(slice_s, 1), "fragments": len(done),
                      "median_s_per_fragment": out["slice"]["median_seconds_per_fragment"],
                      "mean_pack_accuracy": out["mean_pack_accuracy"], "device": device, "gpu": gpu_name,
                      "sliced_on": sliced_on,
                      "models_test_accuracy": [m["test_accuracy"] for m in out["original_models"]],
                      "train_wall_s": round(train_s, 1), "total_s": round(out["total_wall_seconds_after_install"], 1)}))
    return 0 if not result.failed else 1


if __name__ == "__main__":
    sys.exit(main())
