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

``batched:4:auto`` (issue #16) slices all classes of a model in one vmapped pass
(snp_ray/slicing/batched.py). ``--c10`` adds a market of one model trained briefly on all 10
CIFAR-10 classes (task C10-1, built once under runs/bench/c10), where batching has most to gain.

``--flops`` also reports, per variant, the training FLOPs the engine really executes
(``torch.utils.flop_counter.FlopCounterMode`` over a whole untimed slice of the market's first
model, forward and backward, frontiers and fusion included), the achieved GFLOP/s (those FLOPs
over the timed run's seconds for the same fragments) and the fraction of the machine's peak,
measured in the same run by an fp32 and a bf16 matmul on the same threads; ``--plot`` draws the
roofline-style picture (achieved against peak per engine).

Usage: python benchmarks/slicer_speed.py [--markets runs/bench/vgg11 runs/bench/resnet20]
           [--k 10] [--preset quick] [--variants naive:0:fp32 cached:4:auto]
           [--repeats 1] [--device cpu] [--c10] [--flops] [--plot PNG]
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import platform
import queue
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from snp_ray.artifacts import atomic_write_bytes


def matmul_peak(threads: int, n: int = 1024, reps: int = 5) -> dict[str, float]:
    """The machine's practical peak: GFLOP/s of an n x n fp32 and bf16 matmul (median of reps)."""
    torch.set_num_threads(threads)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        out[name] = 2 * n ** 3 / statistics.median(times) / 1e9
    return out


def _count_flops(ms, classes: list[int], engine: str) -> float:
    """Training FLOPs of slicing ``classes`` with a fresh copy of ``ms``'s slicer (untimed)."""
    from torch.utils.flop_counter import FlopCounterMode

    from snp_ray.slicing.slicer import Slicer

    s = ms.slicer
    fresh = Slicer(ms.market_model, ms.spec.input_spec, ms.fewshot, ms.config, engine=engine, device=s.device)
    with FlopCounterMode(display=False) as counter:
        fresh.slice_classes(classes)
    return float(counter.get_total_flops())


def _run_variant(market_root: str, k: int, preset: str, n_classes: int, engine: str, views: int,
                 precision: str, device: str, threads: int, flops: bool, queue) -> None:
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
    setup, frags, aucs, models, model_seconds, flop_count = 0.0, [], [], [], [], None
    for mid in market.ids():
        if len(frags) >= n_classes:
            break
        t0 = time.perf_counter()
        ms = ModelSlicer(market, mid, k, cfg, engine=engine, device=device)
        setup += time.perf_counter() - t0
        models.append(mid)
        todo = ms.spec.classes[: n_classes - len(frags)]
        t0 = time.perf_counter()
        made = ms.slice_many(todo) if engine == "batched" else [ms.slice(c) for c in todo]
        model_seconds.append(time.perf_counter() - t0)
        if flops and len(models) == 1:          # FLOPs of the first model's slice, untimed
            ms.market_model = market.model(mid)[0]
            flop_count = (_count_flops(ms, todo, engine), model_seconds[0], len(todo))
        for f in made:
            frags.append(f)
            aucs.append(fragment_auc(f, ms.spec.dataset, ms.spec.classes))
        del ms                                   # one model's slicer at a time, like an actor
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    first = {}                   # one fragment per class (a market may hold a class twice)
    for f in frags:
        first.setdefault(f.spec.class_id, f)
    classes = list(first)
    pack_acc = None
    if len(classes) > 1:
        samples = PackSamples.from_fewshot([market.fewshot(m, k, 0) for m in models], classes)
        pack_acc = pack_accuracy(Packer(PackConfig()).pack(list(first.values()), samples, classes))
    queue.put({"setup_seconds": setup, "seconds": [f.spec.seconds for f in frags],
               "precision": frags[0].spec.precision, "device": frags[0].spec.device,
               "stage_seconds": [f.spec.stage_seconds for f in frags],
               "params": [f.spec.params for f in frags], "kept": [f.spec.kept for f in frags],
               "test_auc": aucs, "pack_accuracy": pack_acc, "peak_rss_mb": rss_mb,
               "model_seconds": model_seconds, "flops": flop_count})


def run_variant(*args) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_run_variant, args=(*args, q))
    p.start()
    while True:       # a child that dies (out of memory, a crash) must not hang the benchmark
        try:
            out = q.get(timeout=5)
            break
        except queue.Empty:
            if not p.is_alive():
                raise RuntimeError(f"variant {args[4]}:{args[5]}:{args[6]} exited with code "
                                   f"{p.exitcode} before reporting")
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
    p.add_argument("--c10", nargs="?", const="runs/bench/c10", default=None,
                   help="add the 10-class model's market (built here once: task C10-1)")
    p.add_argument("--c10-epochs", type=int, default=4)
    p.add_argument("--c10-fraction", type=float, default=0.3, help="train fraction of the C10-1 model")
    p.add_argument("--flops", action="store_true", help="count FLOPs; report GFLOP/s and peak fractions")
    p.add_argument("--plot", default="", help="write the achieved-vs-peak PNG here")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    results: dict[str, dict] = {}
    markets = list(a.markets)
    if a.c10:
        from snp_ray.evaluation.protocol import market_config
        from snp_ray.market import build_market

        t0 = time.perf_counter()
        build_market(market_config("C10-1", "vgg11", epochs=a.c10_epochs, train_fraction=a.c10_fraction),
                     a.c10, progress=False)
        print(f"C10-1 market ready in {time.perf_counter() - t0:.0f} s", flush=True)
        markets.append(a.c10)
    peaks = [matmul_peak(a.threads)]
    for root in markets:
        name = Path(root).name
        runs: dict[str, list[dict]] = {v: [] for v in a.variants}
        for r in range(a.repeats):
            for v in a.variants:          # interleaved, so that machine noise hits all alike
                engine, views, precision = v.split(":")
                out = run_variant(root, a.k, a.preset, a.classes, engine, int(views), precision,
                                  a.device, a.threads, a.flops and r == 0)
                peaks.append(matmul_peak(a.threads))
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
            fl = outs[0].get("flops")
            if fl:
                total, secs, n = fl
                summary[v].update({"flops_first_model": total, "seconds_first_model": statistics.median(
                    o["model_seconds"][0] for o in outs), "fragments_first_model": n})
                summary[v]["gflops_per_s"] = total / summary[v]["seconds_first_model"] / 1e9
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
        kept = {v: runs[v][0]["kept"] for v in runs}
        for v in summary:
            if v.startswith("batched"):
                ref_v = "cached" + v[len("batched"):]
                if ref_v in summary:
                    results[name][f"{v}_vs_{ref_v}"] = {
                        "speedup": summary[ref_v]["mean_seconds_per_fragment"] / summary[v]["mean_seconds_per_fragment"],
                        "same_kept_units": kept[v] == kept[ref_v],
                        "min_iou_per_group": min_iou(kept[v], kept[ref_v]),
                        "auc_delta": summary[v]["mean_test_auc"] - summary[ref_v]["mean_test_auc"],
                        "pack_delta": None if summary[v]["pack_accuracy"] is None else
                        summary[v]["pack_accuracy"] - summary[ref_v]["pack_accuracy"]}
        for v in summary.values():
            v.pop("kept")
    peak = {k: statistics.median(pk[k] for pk in peaks) for k in peaks[0]}
    for r in results.values():
        for v, s in r["variants"].items():
            if "gflops_per_s" in s:
                s["peak_gflops_per_s"] = peak["bf16" if s["precision"] == "bf16" else "fp32"]
                s["fraction_of_peak"] = s["gflops_per_s"] / s["peak_gflops_per_s"]
    if a.plot:
        plot(results, peak, a.plot)
    meta = {"matmul_peak_gflops_per_s": peak, "peaks_measured": peaks, "load_avg_at_end": list(os.getloadavg()),
            "machine": f"{platform.node()} ({platform.machine()}, {platform.processor() or 'cpu'}), "
                       f"{a.threads} torch thread(s), device {a.device}",
            "torch": torch.__version__, "k": a.k, "preset": a.preset, "classes": a.classes,
            "repeats": a.repeats, "command": " ".join(sys.argv)}
    atomic_write_bytes(Path(a.out), json.dumps({"meta": meta, "results": results}, indent=2).encode())
    print(json.dumps({n: {"speedup": round(r["speedup"], 2), "caching_speedup": round(r.get("caching_speedup", 0), 2),
                          "same_kept": r["naive4_cached4_same_kept_units"],
                          **{k: v for k, v in r.items() if "_vs_" in k},
                          "gflops": {v: round(s.get("gflops_per_s", 0), 2) for v, s in r["variants"].items()}}
                      for n, r in results.items()}, default=str))
    return 0


def min_iou(a: list[dict], b: list[dict]) -> float:
    """The smallest IoU of two runs' kept units, over every fragment and group."""
    out = 1.0
    for ka, kb in zip(a, b):
        for g in ka:
            sa, sb = set(ka[g]), set(kb[g])
            out = min(out, len(sa & sb) / max(1, len(sa | sb)))
    return out


def plot(results: dict, peak: dict, path: str) -> None:
    """Achieved GFLOP/s per engine and market as bars, against the fp32 and bf16 matmul peaks."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    variants = sorted({v for r in results.values() for v in r["variants"]})
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / max(1, len(variants))
    for i, v in enumerate(variants):
        ys = [results[n]["variants"].get(v, {}).get("gflops_per_s", 0) for n in names]
        xs = [j + i * width for j in range(len(names))]
        bars = ax.bar(xs, ys, width, label=v)
        for x, y, n in zip(xs, ys, names):
            frac = results[n]["variants"].get(v, {}).get("fraction_of_peak")
            if frac is not None:
                ax.text(x, y, f"{100 * frac:.0f}%", ha="center", va="bottom", fontsize=7)
    for k, style in (("fp32", "--"), ("bf16", ":")):
        ax.axhline(peak[k], color="k", linestyle=style, linewidth=1, label=f"{k} matmul peak ({peak[k]:.0f})")
    ax.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(names))], names)
    ax.set_ylabel("GFLOP/s (training FLOPs / wall time)")
    ax.set_title("Slicer engines: achieved vs the machine's peak (labels: % of peak)")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
