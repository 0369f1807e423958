"""The body of jobs/slice_market.py: train the market if missing, slice every pair on the actor
pool (each actor writes its fragments to the fragment store), pack one class set reading only
the fragments it needs from that store, print a summary."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from snp_ray.engine.command import market_summary, run_command, table
from snp_ray.engine.job import SliceJobConfig, run_slice_job
from snp_ray.engine.presets import PRESETS, get_preset

log = logging.getLogger("snp_ray.job")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="slice_market.py", description=__doc__)
    p.add_argument("--preset", default="quickstart", help=f"one of {sorted(PRESETS)}")
    p.add_argument("--store", default="", help="market store folder (default: the preset's)")
    p.add_argument("--fragments", default="", help="fragment store URI (default <store>/fragments); "
                   "s3://bucket/prefix?endpoint_override=host:port&scheme=http works too")
    p.add_argument("--k", type=int, default=0, help="few-shot k (default: the preset's)")
    p.add_argument("--slice-preset", default="", help="slice preset (default: the job preset's); also a name saved by snp tune")
    p.add_argument("--actors", type=int, default=0, help="slicer actors (0: one per GPU or CPU)")
    p.add_argument("--gpus-per-actor", type=float, default=1.0)
    p.add_argument("--engine", default="", help="slicer engine: cached, batched (a model's classes "
                   "in one pass) or naive (default: SNP_SLICE_ENGINE, else cached)")
    p.add_argument("--pack", default="", help="comma-separated classes to pack (default: the "
                   "task's first seeded target set)")
    p.add_argument("--no-pack", action="store_true")
    p.add_argument("--no-download", action="store_true", help="never download a missing dataset "
                   "(also SNP_DOWNLOAD=0); by default CIFAR-10 is fetched when online")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on the last line")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from snp_ray.runtime import ray_env_defaults

    ray_env_defaults()         # before anything imports Ray, which reads them at import
    a = parse(argv)
    rc, summary = run_command(lambda: run(a), a.json)
    if rc:
        return rc
    return 0 if not summary["slicing"]["failed"] else 1


def run(a: argparse.Namespace) -> dict[str, Any]:
    from snp_ray.market import build_market
    from snp_ray.market.tasks import get_task, target_sets
    from snp_ray.runtime import default_engine

    preset = get_preset(a.preset)
    store = a.store or preset.store
    ensure_data(get_task(preset.market.task).dataset, a.no_download)
    specs = build_market(preset.market, store, progress=sys.stderr.isatty())
    cfg = SliceJobConfig(market=store, fragments=a.fragments, k=a.k or preset.k,
                         preset=a.slice_preset or preset.slice_preset, actors=a.actors,
                         gpus_per_actor=a.gpus_per_actor, engine=a.engine or default_engine())
    job = run_slice_job(cfg)
    out: dict[str, Any] = {"preset": preset.name, "store": store, "fragments": cfg.store_uri(),
                           "engine": cfg.engine,
                           **market_summary(specs), "slicing": job.summary()}
    s = out["slicing"]
    print()
    # parameter totals cover every stored fragment of the job's pairs, the skipped ones too
    print(table([[s["pairs"], s["done"], s["skipped"], s["failed"], f"{s['fragment_params']:,}",
                  f"{s['source_params']:,}", f"{s['wall_seconds']:.1f}",
                  f"{s['throughput_pairs_per_s']:.3f}"]],
                ["pairs", "sliced now", "skipped", "failed", "fragment params (all stored)",
                 "source params (all stored)", "wall s", "sliced/s"]))
    if preset.pack and not a.no_pack:
        classes = [c for c in a.pack.split(",") if c] or list(target_sets(get_task(preset.market.task), 1, 0)[0])
        out["pack"] = pack_step(store, classes, cfg, job)
        p = out["pack"]
        print()
        print(table([[", ".join(p["classes"]), f"{p['test_accuracy']:.4f}",
                      f"{p['params_deployable']:,}", f"{p['pack_seconds']:.2f}"]],
                    ["packed classes", "test acc", "params (deployable)", "pack s"]))
    return out


def ensure_data(dataset: str, no_download: bool) -> None:
    """Find (or download) the dataset before Ray starts: a missing dataset is then one clean
    error instead of a failure inside every training task. Sets ``SNP_DATA_ROOT`` to the
    (absolute) root found, which the job forwards to its Ray tasks and actors."""
    from snp_ray.data.catalog import ENV_DATA_ROOT
    from snp_ray.data.fetch import ensure_dataset

    root = ensure_dataset(dataset, allow_download=False if no_download else None)
    os.environ[ENV_DATA_ROOT] = str(root)


def pack_step(store: str, classes: list, cfg: SliceJobConfig, job) -> dict[str, Any]:
    """Pack ``classes`` from the fragment store the job wrote to, loading each fragment lazily
    (only the requested classes' fragments, one ``get`` each; the job itself holds no weights)."""
    from snp_ray.evaluation.packs import evaluate_pack
    from snp_ray.market import Market
    from snp_ray.packing import preset_pack_config
    from snp_ray.packing.request import pack_request
    from snp_ray.store import FragmentStore

    pack_cfg = preset_pack_config(cfg.preset)
    packed = pack_request(Market(store), classes, cfg.k, cfg.slice_config(), pack_cfg,
                          cfg.seed, store=FragmentStore(cfg.store_uri()))
    result = evaluate_pack(packed, with_latency=False)
    result["from_this_job"] = sum(1 for f in packed.fragments if f.spec.key in job.results)
    return result
