"""The body of jobs/build_mixed_market.py: the mixed market (:mod:`snp_ray.market.mixed`) end to
end.

Each developer trains their own model and adds it with ``snp market add`` (a subprocess of the
CLI, weights file and all). Then the slice job slices every (model, class) pair on Ray, ``snp
pack`` packs one class of each family into one heterogeneous model (the families take different
input sizes: MobileNetV2 runs at 64x64), and every fragment's class-vs-rest AUC is measured on the
test split (:mod:`snp_ray.evaluation.mixed`). The summary is printed and written to
``<out>/mixed.json``.

With ``slice_preset="auto"`` each model's slicing config is chosen by cross-validation over its
own k shots only, with the test split fenced off (:func:`snp_ray.tuning.select.select_models`);
fold fragments are cached in ``<store>/cv-cache``.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snp_ray.market.mixed import (DATASET, DEFAULT_MEMBERS, add_args, default_pack_classes,
                                  member_set, train_member)

log = logging.getLogger("snp_ray.mixed")


@dataclass
class MixedJobConfig:
    """The job's settings; each is a flag of jobs/build_mixed_market.py."""

    store: str = "runs/mixed"
    members: str = DEFAULT_MEMBERS     # the member set (snp_ray.market.mixed.MEMBER_SETS)
    k: int = 10
    slice_preset: str = "quick"        # or "auto": each model's by few-shot CV
    candidates: str = ""               # with auto: comma-separated candidates (default: the list)
    auto_models: str = ""              # with auto: models to select for (others: first candidate)
    cv_folds: int = 3
    cv_folds_used: int = 0
    epochs_scale: float = 1.0
    train_fraction: float = 0.0
    pack: str = ""                     # classes to pack (default: the first of each family)
    retrain: bool = False
    threads: int = 1
    out: str = ""                      # where mixed.json goes (default: the store)


def snp(*args: str) -> dict[str, Any]:
    """Run the `snp` CLI as a developer would, and read its JSON summary (the last stdout line)."""
    cmd = [sys.executable, "-m", "snp_ray.cli", *args, "--json"]
    log.info("$ snp %s", " ".join(args))
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        from snp_ray.errors import EngineError
        raise EngineError(f"`snp {' '.join(args)}` failed ({done.returncode}): "
                          f"{done.stderr.strip().splitlines()[-1:] or done.stdout[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def add_members(cfg: MixedJobConfig, store: Path) -> dict[str, dict[str, Any]]:
    """Train and add each member not yet in the market (all of them with ``retrain``)."""
    from snp_ray.market.modelstore import ModelStore

    existing = set(ModelStore(store).ids())
    added: dict[str, dict[str, Any]] = {}
    for m in member_set(cfg.members):
        if m.id in existing and not cfg.retrain:
            log.info("%s: already in the market, kept (pass --retrain to train it again)", m.id)
            added[m.id] = {"kept": True}
            continue
        weights = store / "uploads" / f"{m.id}.safetensors"     # the developer's own file
        trained = train_member(m, weights, cfg.epochs_scale, cfg.train_fraction, cfg.threads)
        out = snp(*add_args(m, store, weights, trained, cfg.k, replace=m.id in existing))
        added[m.id] = {"trained": trained, "added": out["model"]}
    return added


def select_configs(cfg: MixedJobConfig, store: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``slice_preset="auto"``: each model's slicing config by few-shot CV, the test split
    fenced off meanwhile. Returns (model id -> Candidate, the CV record)."""
    from snp_ray.market import Market
    from snp_ray.tuning.objective import FragmentCache
    from snp_ray.tuning.select import DEFAULT_CANDIDATES, parse_candidates, select_models

    candidates = parse_candidates(cfg.candidates or ",".join(DEFAULT_CANDIDATES))
    return select_models(Market(store), candidates, cfg.k, FragmentCache(store / "cv-cache"),
                         [m for m in cfg.auto_models.split(",") if m] or None,
                         folds=cfg.cv_folds, folds_used=cfg.cv_folds_used)


def slice_jobs(store: Path, k: int, preset: str, chosen: dict[str, Any] | None) -> list:
    """The slice job's configs: one with ``preset``, or one per chosen config (its models only,
    in the order they were first chosen)."""
    from snp_ray.engine.job import SliceJobConfig

    if not chosen:
        return [SliceJobConfig(market=str(store), k=k, preset=preset)]
    groups: dict[str, list[str]] = {}
    for mid, cand in chosen.items():
        groups.setdefault(cand.name, []).append(mid)
    return [SliceJobConfig(market=str(store), k=k, preset=chosen[ms[0]].preset,
                           overrides=dict(chosen[ms[0]].overrides), models=ms)
            for ms in groups.values()]


def slice_all(store: Path, k: int, preset: str, chosen: dict[str, Any] | None) -> dict[str, Any]:
    """Run :func:`slice_jobs`; a failed pair fails the job."""
    from snp_ray.engine.job import run_slice_job
    from snp_ray.errors import EngineError

    summaries = []
    for job in slice_jobs(store, k, preset, chosen):
        summary = run_slice_job(job).summary()
        if summary["failed"]:
            raise EngineError(f"the slice job failed on {summary['failed']} pairs: "
                              f"{summary.get('failures')}")
        summaries.append({**summary, "models": job.models or "all", "preset": job.preset,
                          "overrides": job.overrides})
    return summaries[0] if len(summaries) == 1 else {"jobs": summaries}


def run_mixed(cfg: MixedJobConfig) -> dict[str, Any]:
    """Build, slice, pack and measure the mixed market; print two tables; write and return the
    summary (``mixed.json``)."""
    from snp_ray.artifacts import atomic_write_json
    from snp_ray.engine.command import table
    from snp_ray.engine.main import ensure_data
    from snp_ray.evaluation.mixed import (family_summary, measure_fragments, measure_sources,
                                          pack_chosen)

    store = Path(cfg.store)
    members = member_set(cfg.members)
    ensure_data(DATASET, no_download=False)
    started = time.perf_counter()
    added = add_members(cfg, store)
    chosen, selection = None, None
    if cfg.slice_preset == "auto":     # chosen on few-shot folds only, before any test-split read
        t0 = time.perf_counter()
        chosen, selection = select_configs(cfg, store)
        selection["seconds"] = time.perf_counter() - t0
    summary = slice_all(store, cfg.k, cfg.slice_preset, chosen)
    frags = measure_fragments(store, cfg.k, cfg.slice_preset, chosen)
    sources = measure_sources(store, frags)
    classes = [c for c in cfg.pack.split(",") if c] or default_pack_classes(members)
    if chosen:
        pack = pack_chosen(store, classes, cfg.k, chosen)
    else:
        pack = snp("pack", "--store", str(store), "--classes", ",".join(classes), "--k", str(cfg.k),
                   "--preset", cfg.slice_preset)
    out = {"store": str(store), "k": cfg.k, "slice_preset": cfg.slice_preset,
           "members": cfg.members, "models": added,
           **({"selection": selection} if selection else {}), "slicing": summary,
           "fragments": frags, "sources": sources,
           "families": family_summary(members, frags, cfg.slice_preset, chosen),
           "pack": {k: pack[k] for k in ("classes", "test_accuracy", "params_deployable",
                                           "params_training", "pack_seconds") if k in pack},
           "wall_seconds": time.perf_counter() - started}
    print(table([[f["model"], f["class"], f"{f['seconds']:.1f}", f"{f['params']:,}",
                  f"{f['param_ratio']:.3f}", f"{f['test_auc']:.3f}", f"{f['source_auc']:.3f}"]
                 for f in frags],
                ["model", "class", "slice s", "params", "frag/source", "test AUC", "source AUC"]))
    print(table([[", ".join(out["pack"]["classes"]), f"{pack['test_accuracy']:.4f}",
                  f"{pack['params_deployable']:,}", f"{pack['pack_seconds']:.2f}"]],
                ["packed classes", "test acc", "params (deployable)", "pack s"]))
    atomic_write_json(Path(cfg.out or store) / "mixed.json", out)
    return out
