"""LW-C10 end to end (issue #25): train the market, slice every pair on Ray, evaluate the users
on Ray workers, write ``learnware.json``, ``report.md`` and the budget figure."""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snp_ray.config import CLEAN_EVIDENCE_ENV, Config, check_clean_seed
from snp_ray.errors import ConfigError
from snp_ray.evaluation.learnware import MethodsConfig, UsersConfig, summarise

log = logging.getLogger(__name__)

#: what the learnware project publishes for its CIFAR-10 image scenario, on its own learnwares
#: (README "Image Scenario Experiment" and its label-budget curve, read to about ±0.1 point)
PUBLISHED: dict[str, dict[int, float]] = {
    "mean single model": {0: 34.5},
    "best single model (oracle on test)": {0: 69.6},
    "Top-1 reuse (RKME search) / JobSelector": {0: 59.4},
    "AverageEnsemble over the searched mixture": {0: 69.0},
    "EnsemblePruning over the mixture": {100: 66.2, 200: 66.5, 500: 66.6, 1000: 66.7, 2000: 66.7,
                                         4000: 66.6},
    "user model trained on the labels alone": {100: 49.9, 200: 56.0, 500: 61.2, 1000: 64.1,
                                               2000: 66.5, 4000: 68.8},
}


@dataclass
class LearnwareJobConfig(Config):
    preset: str = "lw-c10"
    store: str = ""                  # default: the preset's
    epochs: int = 0                  # market training epochs (0: the preset's, i.e. 35)
    users: UsersConfig = field(default_factory=UsersConfig)
    methods: MethodsConfig = field(default_factory=MethodsConfig)
    workers: int = 2                 # Ray tasks evaluating users side by side
    pack_preset: str = ""            # slice/pack preset (default: the job preset's)
    #: the python of the learnware package's own environment (make learnware-env); "" skips
    #: its reusers, and the report says so
    learnware_python: str = ""

    def validate(self) -> None:
        check_clean_seed(self.users.seed, "learnware user")
        if self.workers < 1:
            raise ConfigError("LearnwareJobConfig.workers must be >= 1")


def _evaluate_users(store: str, k: int, slice_name: str, cfg_dict: dict[str, Any],
                    user_ids: list[int], export_dir: str) -> list[dict[str, Any]]:
    """Body of one Ray task: a share of the users, one torch thread."""
    import numpy as np
    import torch

    from snp_ray.data.tables import read_split
    from snp_ray.data.testsplit import load_test_split
    from snp_ray.evaluation.learnware import TestCache, evaluate_user, make_users
    from snp_ray.market.market import Market
    from snp_ray.packing.config import preset_pack_config
    from snp_ray.packing.planner import FewShotPool, ScoreCache
    from snp_ray.runtime import worker_logging
    from snp_ray.slicing.config import slice_preset

    worker_logging()
    torch.set_num_threads(1)
    cfg = LearnwareJobConfig.from_dict(cfg_dict)
    market = Market(store)
    dataset = market.specs()[0].dataset
    train = read_split(dataset, "train")
    users = make_users(cfg.users, load_test_split(dataset).labels)
    cache = TestCache(market, dataset, np.concatenate([users[u].test_rows for u in user_ids]))
    scores = ScoreCache(FewShotPool.from_market(market, k))
    rows = []
    for u in user_ids:
        t0 = time.perf_counter()
        export: dict[str, Any] = {}
        rows += evaluate_user(market, users[u], cfg.users, k, slice_preset(slice_name),
                              preset_pack_config(slice_name), cache, train, cfg.methods, scores,
                              export)
        np.savez(Path(export_dir) / f"user{u}.npz", classes=np.asarray(users[u].classes), **export)
        log.info("user %d of %d evaluated in %.1f s", u + 1, cfg.users.users, time.perf_counter() - t0)
    return rows


def run(cfg: LearnwareJobConfig, out_dir: str | Path) -> dict[str, Any]:
    from snp_ray.engine.job import SliceJobConfig, run_slice_job
    from snp_ray.engine.presets import get_preset
    from snp_ray.market import build_market
    from snp_ray.runtime import ensure_ray, worker_env

    t_start = time.perf_counter()
    preset = get_preset(cfg.preset)
    store = cfg.store or preset.store
    market_cfg = preset.market
    if cfg.epochs:
        market_cfg = market_cfg.replace(train=market_cfg.train.replace(epochs=cfg.epochs))
    specs = build_market(market_cfg, store, progress=False)
    slice_name = cfg.pack_preset or preset.slice_preset
    job = run_slice_job(SliceJobConfig(market=store, k=preset.k, preset=slice_name))
    ensure_ray()
    import ray

    out = Path(out_dir)
    export = out / "reuse"
    if export.exists():           # an earlier run's users must not enter this run's rows
        shutil.rmtree(export)
    export.mkdir(parents=True)
    env = worker_env(CLEAN_EVIDENCE_ENV)
    remote = ray.remote(num_cpus=1, max_retries=1)(_evaluate_users)
    shares = [list(range(cfg.users.users))[i::cfg.workers] for i in range(cfg.workers)]
    refs = [remote.options(runtime_env={"env_vars": env}).remote(
        str(Path(store).resolve()), preset.k, slice_name, cfg.to_dict(), share, str(export.resolve()))
        for share in shares if share]
    rows = [r for part in ray.get(refs) for r in part]
    reuse = run_learnware_reusers(cfg.learnware_python, export)
    rows += reuse.pop("rows", [])
    summary = summarise(rows)
    result = {
        "config": cfg.to_dict(), "preset": preset.name, "store": store, "k": preset.k,
        "slice_preset": slice_name,
        "market": {"models": len(specs), "epochs": market_cfg.train.epochs,
                   "preset_epochs": preset.market.train.epochs,
                   "own_class_test_accuracy": {s.id: s.metrics.get("test_accuracy") for s in specs},
                   "params_per_model": specs[0].params},
        "slicing": job.summary(), "pack_balance": "none", "learnware_package": reuse,
        "rows": rows, "summary": summary, "published": PUBLISHED,
        "wall_seconds": time.perf_counter() - t_start,
    }
    (out / "learnware.json").write_text(json.dumps(result, indent=1))
    (out / "report.md").write_text(report_md(result))
    figure(result, out / "learnware-budgets.png")
    return result


def redraw(out_dir: str | Path) -> dict[str, Any]:
    """Rewrite ``report.md`` and the figure from ``learnware.json`` and, when the learnware
    package's own run left it beside them, ``learnware_package.json`` (their reusers' rows)."""
    out = Path(out_dir)
    result = json.loads((out / "learnware.json").read_text())
    package = out / "learnware_package.json"
    if package.is_file():
        theirs = json.loads(package.read_text())["rows"]
        result["rows"] = [r for r in result["rows"] if not r["method"].startswith("learnware ")] + theirs
        result["summary"] = summarise(result["rows"])
    (out / "report.md").write_text(report_md(result))
    figure(result, out / "learnware-budgets.png")
    return {k: v for k, v in result.items() if k != "rows"}


def reuse(python: str, out_dir: str | Path) -> dict[str, Any]:
    """The learnware package's reusers on a finished run's exports (``learnware_package.json``),
    then :func:`redraw`; a typed error when they cannot run."""
    out = Path(out_dir)
    got = run_learnware_reusers(python, out / "reuse", out / "learnware_package.json")
    if not got["ran"]:
        raise ConfigError(f"the learnware package's reusers did not run: {got['why']}")
    return redraw(out)


def run_learnware_reusers(python: str, export: Path, dest: Path | None = None) -> dict[str, Any]:
    """The learnware package's own reusers on the exported arrays, in its own environment
    (benchmarks/learnware_reuse.py); without one, a record saying they did not run."""
    import subprocess
    import sys

    if not python:
        return {"ran": False, "why": "no learnware environment given (make learnware-env, then "
                "--learnware-python .venv-learnware/bin/python)"}
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "learnware_reuse.py"
    dest = dest or export / "reuse.json"
    done = subprocess.run([python, str(script), "--export", str(export), "--out", str(dest)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout)[-2000:]
        log.error("the learnware reusers failed:\n%s", tail)
        return {"ran": False, "why": f"benchmarks/learnware_reuse.py exited {done.returncode}",
                "stderr_tail": tail}
    sys.stderr.write(done.stderr[-2000:])
    return {"ran": True, **json.loads(dest.read_text())}


def report_md(result: dict[str, Any]) -> str:
    """The side-by-side table: our rows (mean ± std over users, params, s/request) and the
    learnware project's published rows."""
    budgets = sorted({r["budget"] for r in result["summary"]})
    head = "| method (measured here unless marked published) | " + " | ".join(
        "no labels" if b == 0 else f"{b:,}" for b in budgets) + " | params | s/request (p50) |"
    lines = [head, "|---|" + "---:|" * (len(budgets) + 2)]
    by_method: dict[str, dict[int, dict[str, Any]]] = {}
    for s in result["summary"]:
        by_method.setdefault(s["method"], {})[s["budget"]] = s
    for method, cells in by_method.items():
        vals = [f"{100 * cells[b]['accuracy_mean']:.1f} ± {100 * cells[b]['accuracy_std']:.1f}"
                if b in cells else "" for b in budgets]
        params = [c["params_mean"] for c in cells.values() if c.get("params_mean")]
        secs = [c["seconds_p50"] for c in cells.values() if c.get("seconds_p50") is not None]
        lines.append(f"| {method} | " + " | ".join(vals) +
                     (f" | {int(max(params)):,} |" if params else " |  |"))
        lines[-1] += f" {max(secs):.2f} |" if secs else "  |"
    for method, cells in result["published"].items():
        cells = {int(b): v for b, v in cells.items()}
        vals = [f"{cells[b]:.1f}" if b in cells else "" for b in budgets]
        lines.append(f"| {method} (published, their learnwares) | " + " | ".join(vals) + " |  |  |")
    return "\n".join(lines) + "\n"


def figure(result: dict[str, Any], path: Path) -> Path:
    """Accuracy against the label budget (log x; the no-label point at the left)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    left = 30
    by_method: dict[str, list[dict[str, Any]]] = {}
    for s in result["summary"]:
        by_method.setdefault(s["method"], []).append(s)
    for method, cells in by_method.items():
        cells = sorted(cells, key=lambda c: c["budget"])
        x = [c["budget"] or left for c in cells]
        y = [100 * c["accuracy_mean"] for c in cells]
        band = [100 * c["accuracy_ci95"] for c in cells]
        style = "--s" if method.startswith("learnware ") else "-o"
        ax.plot(x, y, style, label=method, ms=4)
        ax.fill_between(x, [a - b for a, b in zip(y, band)], [a + b for a, b in zip(y, band)], alpha=0.15)
    for method, cells in result["published"].items():
        cells = {int(b): v for b, v in cells.items()}      # JSON keys come back as strings
        xs = sorted(cells)
        ax.plot([b or left for b in xs], [cells[b] for b in xs], "--o", mfc="none",
                label=f"{method} (published)", ms=5)
    ax.set_xscale("log")
    ax.set_xticks([left, 100, 200, 500, 1000, 2000, 4000])
    ax.set_xticklabels(["no labels", "100", "200", "500", "1k", "2k", "4k"])
    ax.set_xlabel("labeled samples of the user")
    ax.set_ylabel("accuracy on the user's 3,000 test images (%)")
    ax.set_title(f"LW-C10: {result['market']['models']} models, "
                 f"{result['config']['users']['users']} users, market trained "
                 f"{result['market']['epochs']} of {result['market']['preset_epochs']} epochs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
