"""A Ray Tune sweep over α, β, γ, δ (plus selection mode, learning rates and epochs).

The search is Optuna's TPE behind a concurrency limit, the scheduler ASHA over CV folds (a trial
reports after each fold, so a poor one stops after its first). Every trial runs with the test
split fenced off (``SNP_FORBID_TEST_SPLIT=1``) and sees the market's few-shot data only. The
default configuration is the first point evaluated, and the same slicing with a different δ is
the third, so the sweep always measures the default and shows that a δ-only trial reuses every
fragment.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snp_ray.config import Config, check_range
from snp_ray.data.catalog import ENV_DATA_ROOT, data_root
from snp_ray.data.tables import test_split_fenced
from snp_ray.errors import ConfigError
from snp_ray.market import get_task
from snp_ray.market.market import Market
from snp_ray.market.tasks import target_sets
from snp_ray.packing import PackConfig, preset_pack_config
from snp_ray.slicing.config import SliceConfig, check_preset_name, save_preset, slice_preset
from snp_ray.tuning.objective import CVConfig, FragmentCache, cross_validate

log = logging.getLogger(__name__)

SEARCHES = ("optuna", "random")
SCHEDULERS = ("asha", "fifo")
#: trial keys that configure slicing (``epochs`` sets all three stages) and packing
SLICE_KEYS = ("alpha", "beta", "gamma", "mode", "lr_layer", "lr_repair", "epochs")
PACK_KEYS = {"delta": "delta", "pack_lr": "lr", "pack_epochs": "epochs"}


@dataclass
class SweepConfig(Config):
    market: str = ""               # market folder (trained; fragments are not needed)
    task: str = "T1"
    k: int = 10
    folds: int = 3
    n_targets: int = 2             # target class sets the objective packs (seeded)
    trials: int = 16
    base_preset: str = "quick"     # the default the sweep starts from and is compared with
    epochs: list[int] = field(default_factory=lambda: [4, 8])   # per-stage slicing epochs to try
    search: str = "optuna"
    scheduler: str = "asha"
    max_concurrent: int = 0        # 0: the cluster's CPUs
    seed: int = 0
    storage: str = "runs/tune"     # Tune's experiment folder and the fragment cache
    name: str = ""                 # experiment and preset name (default tuned-<task>)
    data_root: str = ""            # forwarded to trials (default: this process's SNP_DATA_ROOT)
    exclude_targets: list[list[int]] = field(default_factory=list)   # e.g. the sets tested later

    def validate(self) -> None:
        if not self.market:
            raise ConfigError("SweepConfig.market must name a trained market folder")
        get_task(self.task)
        check_range("SweepConfig", "trials", self.trials, 1, 100_000)
        check_range("SweepConfig", "n_targets", self.n_targets, 1, 1000)
        check_range("SweepConfig", "folds", self.folds, 2, self.k)
        if not self.epochs or any(e < 1 for e in self.epochs):
            raise ConfigError("SweepConfig.epochs must list positive epoch counts")
        for name, value, valid in (("search", self.search, SEARCHES),
                                   ("scheduler", self.scheduler, SCHEDULERS)):
            if value not in valid:
                raise ConfigError(f"SweepConfig.{name} must be one of {valid}, got {value!r}")
        slice_preset(self.base_preset)
        check_preset_name(self.preset_name())
        if self.preset_name() == self.base_preset:
            raise ConfigError(f"the sweep would overwrite its own base preset {self.base_preset!r}; "
                              f"pick another --name")

    def preset_name(self) -> str:
        return self.name or f"tuned-{self.task}"


def search_space(cfg: SweepConfig) -> dict[str, Any]:
    from ray import tune

    return {"alpha": tune.loguniform(1e-5, 1e-1), "beta": tune.uniform(0.3, 0.9),
            "gamma": tune.loguniform(0.1, 10.0), "mode": tune.choice(["threshold", "rate"]),
            "lr_layer": tune.loguniform(1e-4, 1e-3), "lr_repair": tune.loguniform(1e-3, 1e-2),
            "epochs": tune.choice(epoch_choices(cfg)),
            "delta": tune.loguniform(1e-2, 10.0), "pack_lr": tune.loguniform(3e-4, 3e-3)}


def epoch_choices(cfg: SweepConfig) -> list[int]:
    """The per-stage epochs to try, always including the base preset's (so the default trial is
    the default)."""
    return sorted(set(cfg.epochs) | {slice_preset(cfg.base_preset).pool_epochs})


def default_point(cfg: SweepConfig) -> dict[str, Any]:
    """The base preset (with its packing settings) as a point of the search space."""
    s, p = base_configs(cfg.base_preset)
    return {**{k: s[k] for k in SLICE_KEYS if k != "epochs"}, "epochs": s["pool_epochs"],
            **{src: p[dst] for src, dst in PACK_KEYS.items() if src in ("delta", "pack_lr")}}


def base_configs(base_preset: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(slice, pack) settings of a preset as plain dicts, resolved once in the driver: trials run
    in their own working directory and may not see the preset folder."""
    return slice_preset(base_preset).to_dict(), preset_pack_config(base_preset).to_dict()


def trial_configs(base: str | tuple[dict[str, Any], dict[str, Any]],
                  trial: dict[str, Any]) -> tuple[SliceConfig, PackConfig]:
    """(SliceConfig, PackConfig) of one trial's sampled values on top of the base preset (a
    name, or :func:`base_configs`' resolved pair)."""
    base_slice, base_pack = base_configs(base) if isinstance(base, str) else base
    over = {k: trial[k] for k in SLICE_KEYS if k in trial and k != "epochs"}
    if "epochs" in trial:
        e = int(trial["epochs"])
        over.update(pool_epochs=e, adapt_epochs=e, combine_epochs=e)
    slice_cfg = SliceConfig.from_dict({**base_slice, **over})
    pack = dict(base_pack)
    pack.update({dst: trial[src] for src, dst in PACK_KEYS.items() if src in trial})
    return slice_cfg, PackConfig.from_dict(pack)


def _trainable(trial: dict[str, Any], *, sweep: dict[str, Any]) -> None:
    """One trial, in a Ray worker: fence the test split, then cross-validate."""
    import torch
    from ray import tune

    os.environ[ENV_DATA_ROOT] = sweep["data_root"]
    torch.set_num_threads(1)
    slice_cfg, pack_cfg = trial_configs((sweep["base_slice"], sweep["base_pack"]), trial)
    with test_split_fenced():
        cross_validate(Market(sweep["market"]), CVConfig.from_dict(sweep["cv"]), slice_cfg,
                       pack_cfg, FragmentCache(sweep["cache"]), report=tune.report)


def run_sweep(cfg: SweepConfig, progress: bool = False) -> dict[str, Any]:
    """Run the sweep, save the best configuration as a named preset, return every trial."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from snp_ray.runtime import ensure_ray

    ensure_ray()
    market = Market(cfg.market)
    task = get_task(cfg.task)
    excluded = {tuple(sorted(t)) for t in cfg.exclude_targets}
    pool = [list(t) for t in target_sets(task, cfg.n_targets + len(excluded), cfg.seed)]
    kept = [t for t in pool if tuple(sorted(t)) not in excluded]
    targets = kept[: cfg.n_targets] or pool[: cfg.n_targets]   # "all classes" tasks have one set
    cv = CVConfig(k=cfg.k, folds=cfg.folds, targets=targets, seed=0, fold_seed=cfg.seed)
    missing = sorted({c for t in targets for c in t if not market.holders(c)})
    if missing:
        raise ConfigError(f"classes {missing} of task {cfg.task} are held by no model of {cfg.market}")
    storage = Path(cfg.storage).resolve()
    name = cfg.preset_name()
    base = base_configs(cfg.base_preset)
    sweep = {"market": str(Path(cfg.market).resolve()), "cv": cv.to_dict(),
             "base_preset": cfg.base_preset, "cache": str(storage / "cache"),
             "base_slice": base[0], "base_pack": base[1],
             "data_root": cfg.data_root or str(data_root().resolve())}
    points = [default_point(cfg)]
    alt = dict(points[0], mode="rate", beta=0.5)                  # the table's S&P (R)
    points += [alt, dict(points[0], delta=0.1 if points[0]["delta"] != 0.1 else 1.0)]
    points = points[: cfg.trials]
    concurrent = cfg.max_concurrent or max(1, int(ray.cluster_resources().get("CPU", 1)))
    if cfg.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher = ConcurrencyLimiter(OptunaSearch(points_to_evaluate=points, seed=cfg.seed),
                                      max_concurrent=concurrent)
    else:
        searcher = BasicVariantGenerator(points_to_evaluate=points, random_state=cfg.seed,
                                         max_concurrent=concurrent)
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=cfg.folds, grace_period=1,
                               reduction_factor=2) if cfg.scheduler == "asha" else FIFOScheduler())
    trainable = tune.with_resources(tune.with_parameters(_trainable, sweep=sweep), {"cpu": 1})
    t0 = time.perf_counter()
    tuner = tune.Tuner(
        trainable, param_space=search_space(cfg),
        tune_config=tune.TuneConfig(metric="cv_accuracy", mode="max", search_alg=searcher,
                                    scheduler=scheduler, num_samples=cfg.trials),
        run_config=tune.RunConfig(name=f"{name}-{int(time.time())}", storage_path=str(storage),
                                  verbose=1 if progress else 0))
    grid = tuner.fit()
    seconds = time.perf_counter() - t0
    trials = []
    for r in grid:
        m = r.metrics or {}
        trials.append({"config": {k: r.config[k] for k in sorted(r.config)} if r.config else {},
                       "cv_accuracy": m.get("cv_accuracy"), "folds_done": m.get("folds_done", 0),
                       "fragments_made": m.get("fragments_made", 0),
                       "fragments_reused": m.get("fragments_reused", 0),
                       "seconds": m.get("time_total_s"),
                       "error": None if r.error is None else f"{type(r.error).__name__}: {r.error}"})
    errors = [t["error"] for t in trials if t["error"]]
    complete = [t for t in trials if t["folds_done"] == cfg.folds and t["cv_accuracy"] is not None]
    if not complete:
        raise ConfigError(f"no trial completed every fold; errors: {errors[:3]}")
    best = max(complete, key=lambda t: t["cv_accuracy"])
    default = next((t for t in complete if t["config"] == points[0]), None)
    slice_cfg, pack_cfg = trial_configs(base, best["config"])
    pack_all = {k: v for k, v in pack_cfg.to_dict().items() if k != "seed"}
    path = save_preset(name, slice_cfg, pack_all,
                       {"sweep": cfg.to_dict(), "cv_accuracy": best["cv_accuracy"],
                        "trial": best["config"], "trials": len(trials)})
    log.info("sweep of %d trials in %.0fs; best CV accuracy %.4f saved as preset %r (%s)",
             len(trials), seconds, best["cv_accuracy"], name, path)
    return {"config": cfg.to_dict(), "cv": cv.to_dict(), "seconds": seconds, "trials": trials,
            "base": {"slice": base[0], "pack": base[1]},
            "errors": errors, "best": best, "default": default, "preset": name,
            "preset_path": str(path), "slice": slice_cfg.to_dict(), "pack": pack_cfg.to_dict(),
            "fragments_made": sum(t["fragments_made"] for t in trials),
            "fragments_reused": sum(t["fragments_reused"] for t in trials)}


def write_sweep(result: dict[str, Any], path: str | Path) -> Path:
    from snp_ray.artifacts import atomic_write_bytes

    path = Path(path)
    atomic_write_bytes(path, json.dumps(result, indent=1, default=str).encode())
    return path
