"""Score configurations on the test split, once each, after a sweep has chosen one.

The sweep never calls this module (it lives behind the evaluation API); the CLI runs it after
the sweep has finished and the preset has been saved, so nothing chosen can depend on it.
"""
from __future__ import annotations

import logging
import statistics
from pathlib import Path
from typing import Any

from snp_ray.artifacts import save_figure
from snp_ray.evaluation.protocol import slice_and_test
from snp_ray.market import Market, get_task
from snp_ray.market.tasks import target_sets
from snp_ray.packing import PackConfig
from snp_ray.slicing import SliceConfig

log = logging.getLogger(__name__)


def compare_on_test(market: Market, task: str, k: int,
                    configs: dict[str, tuple[SliceConfig, PackConfig]], n_targets: int = 5,
                    seed: int = 0) -> dict[str, Any]:
    """Slice the market at ``k`` with each config (stored fragments are reused) and pack the
    task's seeded target sets; test accuracy mean ± std per config, side by side."""
    targets = [list(t) for t in target_sets(get_task(task), n_targets, seed)]
    out: dict[str, Any] = {"targets": targets, "k": k, "configs": {}}
    for label, (slice_cfg, pack_cfg) in configs.items():
        runs, made, slice_s = slice_and_test(market, targets, k, slice_cfg, pack_cfg)
        accs, params = [r["acc"] for r in runs], [r["params"] for r in runs]
        out["configs"][label] = {
            "acc_mean": statistics.fmean(accs), "acc_std": statistics.pstdev(accs), "accs": accs,
            "params_mean": statistics.fmean(params), "fragments_sliced": made,
            "slice_seconds": slice_s, "slice": slice_cfg.to_dict(), "pack": pack_cfg.to_dict()}
        log.info("%s: test accuracy %.4f ± %.4f over %d target sets", label,
                 out["configs"][label]["acc_mean"], out["configs"][label]["acc_std"], len(accs))
    return out


def _fmt(x: Any, nd: int = 4) -> str:
    return "–" if x is None else (f"{x:.{nd}g}" if isinstance(x, float) else str(x))


def render_report(result: dict[str, Any], path: str | Path) -> str:
    """A Markdown page: the sweep's settings, every trial by CV accuracy, the saved preset, and
    the one test-split comparison of the chosen and default configurations."""
    from snp_ray.artifacts import atomic_write_bytes

    cfg, best = result["config"], result["best"]
    lines = [f"# Tune sweep on {cfg['task']} (k = {cfg['k']})", "",
             f"{len(result['trials'])} trials ({cfg['search']} search, {cfg['scheduler']} "
             f"scheduler) in {result['seconds']:.0f} s; objective: {cfg['folds']}-fold CV on the "
             f"few-shot data of {len(result['cv']['targets'])} target sets "
             f"{result['cv']['targets']}. The test split was fenced off in every trial.",
             f"Fragments sliced: {result['fragments_made']}; reused from the fold cache: "
             f"{result['fragments_reused']}.", "",
             f"Saved preset **{result['preset']}** (`{result['preset_path']}`): best CV accuracy "
             f"{best['cv_accuracy']:.4f}.", ""]
    test = result.get("test")
    if test:
        lines += [f"## Test split, once per configuration ({len(test['targets'])} target sets)", "",
                  "| config | test accuracy (mean ± std) | deployable params | slice s |",
                  "|---|---:|---:|---:|"]
        for label, c in test["configs"].items():
            lines.append(f"| {label} | {100 * c['acc_mean']:.2f} ± {100 * c['acc_std']:.2f} | "
                         f"{c['params_mean']:,.0f} | {c['slice_seconds']:.0f} |")
        lines.append("")
    keys = ["alpha", "beta", "gamma", "mode", "lr_layer", "lr_repair", "epochs", "delta", "pack_lr"]
    lines += ["## Trials by CV accuracy", "",
              "| CV acc | folds | " + " | ".join(keys) + " | made | reused | s |",
              "|" + "---:|" * 2 + "---|" * len(keys) + "---:|" * 3]
    for t in sorted(result["trials"], key=lambda t: -(t["cv_accuracy"] or -1)):
        c = t["config"]
        lines.append(f"| {_fmt(t['cv_accuracy'])} | {t['folds_done']} | "
                     + " | ".join(_fmt(c.get(k), 3) for k in keys)
                     + f" | {t['fragments_made']} | {t['fragments_reused']} | {_fmt(t['seconds'], 3)} |")
    text = "\n".join(lines) + "\n"
    atomic_write_bytes(Path(path), text.encode())
    return str(path)


def sweep_figure(result: dict[str, Any], path: str | Path) -> str:
    """CV accuracy of each trial (in the order trials were created), by selection mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    full = result["config"]["folds"]
    for mode, marker in (("threshold", "o"), ("rate", "s")):
        pts = [(i, t["cv_accuracy"], t["folds_done"]) for i, t in enumerate(result["trials"])
               if t["cv_accuracy"] is not None and t["config"].get("mode") == mode]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=mode,
                       c=["C0" if p[2] == full else "0.7" for p in pts])
    ax.set_xlabel("trial (creation order)")
    ax.set_ylabel("few-shot CV accuracy")
    ax.set_title("Tune sweep (grey: stopped early by ASHA)")
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)
