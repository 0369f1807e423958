"""The paper's evaluation protocol on one task: markets, fragments, packs, baselines, tables.

For each architecture: train (or reuse) the task's market; for each k, slice every pair once per
S&P variant (rate and threshold); for each seeded target class set, pack and evaluate, and run the
baselines on exactly the same few-shot data. Only evaluation touches the test split; every
fitting step sees few-shot data only.
"""
from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snp_ray.artifacts import require_keys, save_figure
from snp_ray.config import Config, code_digest
from snp_ray.errors import ConfigError
from snp_ray.evaluation.packs import accuracy_of, pack_accuracy
from snp_ray.market import Market, MarketConfig, TrainConfig, build_market, get_task
from snp_ray.market.tasks import target_sets
from snp_ray.market.training import ARCH_TRAIN
from snp_ray.models import get_arch
from snp_ray.packing import PackConfig, preset_pack_config
from snp_ray.packing.request import pack_request
from snp_ray.slicing import SliceConfig, slice_preset
from snp_ray.store import slice_missing

log = logging.getLogger(__name__)

#: (width, original-model epochs) per architecture at CPU scale
ARCH_DEFAULTS: dict[str, tuple[float, int]] = {
    "vgg11": (0.25, 12), "vgg16": (1.0, 30), "resnet20": (1.0, 8), "resnet34": (1.0, 30),
    "gru": (1.0, 10), "lstm": (1.0, 10), "textcnn": (1.0, 10), "vit": (1.0, 10),
    "transformer": (1.0, 10), "gru_static": (1.0, 10), "textcnn_static": (1.0, 10),
}
#: S&P variants of Table 2: rate (R) and threshold (T) selection
VARIANTS = {"S&P (R)": {"mode": "rate", "beta": 0.5}, "S&P (T)": {"mode": "threshold", "beta": 0.6}}
PAPER_ARCH = {"vgg": "VGG16", "resnet": "ResNet34"}


@dataclass
class ProtocolConfig(Config):
    task: str = "T1"
    archs: list[str] = field(default_factory=lambda: ["vgg11"])
    ks: list[int] = field(default_factory=lambda: [5, 10, 20])
    n_targets: int = 5
    seed: int = 0
    slice_preset: str = "quick"
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    baselines: list[str] = field(default_factory=lambda: ["ensemble", "finetune", "ca-mkd", "netgraft"])
    root: str = "runs/tables"
    width: float = 0.0             # 0: the architecture's CPU-scale default (ARCH_DEFAULTS)
    epochs: int = 0                # 0: the architecture's default for the original models
    train_fraction: float = 1.0
    pack_epochs: int = 200

    def validate(self) -> None:
        task = get_task(self.task)
        for a in self.archs:
            get_arch(a)
        if self.n_targets < 1 or not self.ks:
            raise ConfigError("n_targets must be >= 1 and ks non-empty")
        unknown = sorted(set(self.variants) - set(VARIANTS))
        if unknown:
            raise ConfigError(f"unknown S&P variants {unknown}; valid: {sorted(VARIANTS)}")
        if task.target_mode == "all":
            self.variants = [v for v in self.variants if v == "S&P (T)"] or self.variants[:1]


def market_config(task: str, arch: str, width: float = 0.0, epochs: int = 0,
                  train_fraction: float = 1.0, ks: list[int] | None = None) -> MarketConfig:
    """The CPU-scale market of ``task`` with ``arch`` (defaults from ARCH_DEFAULTS)."""
    w, e = ARCH_DEFAULTS.get(arch, (1.0, 10))
    return MarketConfig(task=task, arch=arch, width=width or w,
                        train=TrainConfig(epochs=epochs or e, train_fraction=train_fraction,
                                          **ARCH_TRAIN.get(arch, {})),
                        ks=ks or [5, 10, 20])


def _market_config(cfg: "ProtocolConfig", arch: str) -> MarketConfig:
    return market_config(cfg.task, arch, cfg.width, cfg.epochs, cfg.train_fraction, cfg.ks)


def reusable_entry(previous: dict[str, Any] | None, cfg: ProtocolConfig, arch: str, root: Path,
                   specs: list) -> dict[str, Any] | None:
    """The arch's entry of an earlier result when it was produced by the same protocol (every
    setting but the list of archs), config digests and code on the same market models; else
    None. What :func:`run_protocol` reuses instead of rerunning the arch, public so a caller
    can ask ahead whether an arch would be rerun."""
    if not previous or arch not in previous.get("archs", {}):
        return None
    same = {k: v for k, v in previous.get("config", {}).items() if k != "archs"} == \
        {k: v for k, v in cfg.to_dict().items() if k != "archs"}
    # a preset's content can change under its name (a re-saved preset, new defaults in the code):
    # only the same config digests reuse a result; one that recorded none is never reused
    same = same and previous.get("digests") == config_digests(cfg)
    # nor one the code has changed since (results stamped before #17 recorded none)
    same = same and (previous.get("provenance") or {}).get("code") == code_digest()
    entry = previous["archs"][arch]
    models = {s.id: s.metrics["test_accuracy"] for s in specs}
    if same and entry.get("market") == str(root) and entry.get("model_test_accuracy") == models:
        return entry
    return None


def _origin(previous: dict[str, Any]) -> dict[str, Any]:
    """Where a reused entry was made: the earlier result's commit, date and code digest."""
    prov = previous.get("provenance") or {}
    return {k: prov.get(k, "unknown") for k in ("commit", "created", "code")}


def slice_and_test(market: Market, targets: list, k: int, slice_cfg: SliceConfig,
                   pack_cfg: PackConfig, model_ids: list[str] | None = None
                   ) -> tuple[list[dict[str, Any]], int, float]:
    """Slice every pair not stored yet at ``k``, then pack and test each target set.

    Returns (one run per target set, fragments sliced now, seconds spent slicing)."""
    t0 = time.perf_counter()
    sliced = sum(1 for *_, f in slice_missing(market, k, slice_cfg, 0, model_ids) if f is not None)
    slice_s = time.perf_counter() - t0
    runs = []
    for combo in targets:
        packed = pack_request(market, list(combo), k, slice_cfg, pack_cfg)
        runs.append({"classes": list(combo), "acc": pack_accuracy(packed),
                     "params": packed.params_deployable(),
                     "params_training": packed.params_training(),
                     "pack_seconds": packed.spec.metrics["pack_seconds"]})
    return runs, sliced, slice_s


def config_digests(cfg: ProtocolConfig) -> dict[str, str]:
    """Digests of the slice config of every variant and of the packing config."""
    out = {v: slice_preset(cfg.slice_preset, **VARIANTS[v]).digest() for v in cfg.variants}
    out["pack"] = preset_pack_config(cfg.slice_preset, seed=cfg.seed, epochs=cfg.pack_epochs).digest()
    return out


def run_protocol(cfg: ProtocolConfig, progress: bool = True,
                 previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the whole protocol and return per-cell raw results and aggregates.

    ``previous`` (an earlier result, e.g. ``results/<task>/results.json``) lets an arch whose
    protocol and market are unchanged be reused rather than rerun, so adding an arch to a table
    costs only that arch. A reused entry says so (``reused``, ``reused_from``: the commit and
    date it was made at) and its table shows it (:func:`render_table`)."""
    task = get_task(cfg.task)
    targets = target_sets(task, cfg.n_targets, cfg.seed)
    out: dict[str, Any] = {"task": cfg.task, "config": cfg.to_dict(), "targets": targets,
                           "digests": config_digests(cfg), "archs": {}}
    for arch in cfg.archs:
        mcfg = _market_config(cfg, arch)
        root = Path(cfg.root) / cfg.task / f"{arch}-w{mcfg.width:g}"
        specs = build_market(mcfg, root, progress=progress)
        reused = reusable_entry(previous, cfg, arch, root, specs)
        if reused is not None:
            log.info("%s: reusing the earlier result for this arch (same protocol and market)", arch)
            out["archs"][arch] = {**reused, "reused": True,
                                  "reused_from": reused.get("reused_from") or _origin(previous)}
            continue
        market = Market(root)
        ids = [s.id for s in specs]
        ensemble_params = sum(s.params for s in specs)
        cells: dict[str, dict[str, Any]] = {}
        pcfg = preset_pack_config(cfg.slice_preset, seed=cfg.seed, epochs=cfg.pack_epochs)
        for k in cfg.ks:
            for variant in cfg.variants:
                scfg = slice_preset(cfg.slice_preset, **VARIANTS[variant])
                runs, sliced, slice_s = slice_and_test(market, targets, k, scfg, pcfg, ids)
                cells.setdefault(variant, {})[f"k{k}"] = _aggregate(runs, ensemble_params)
                cells[variant][f"k{k}"]["slice_seconds_new"] = slice_s
                cells[variant][f"k{k}"]["fragments_sliced"] = sliced
                log.info("%s %s k=%d: %.4f", arch, variant, k, cells[variant][f"k{k}"]["acc_mean"])
            for name in cfg.baselines:
                for label, by_k in _baseline_cells(name, market, ids, targets, k, cfg,
                                                   ensemble_params, task.dataset).items():
                    cells.setdefault(label, {}).update(by_k)
        out["archs"][arch] = {"market": str(root), "ensemble_params": ensemble_params,
                              "model_test_accuracy": {s.id: s.metrics["test_accuracy"] for s in specs},
                              "cells": cells}
    return out


def _baseline_cells(name, market, ids, targets, k, cfg, ensemble_params, dataset) -> dict[str, Any]:
    from snp_ray.baselines import run_baseline  # optional module; absent baselines are reported

    label = {"ensemble": "Ensemble", "finetune": "Finetune", "ca-mkd": "CA-MKD",
             "netgraft": "NetGraft"}.get(name, name)
    runs, failed = [], []
    for combo in targets:
        try:
            results = run_baseline(name, market, ids, list(combo), k, seed=cfg.seed)
        except ConfigError as e:   # e.g. a baseline that does not apply to this architecture
            return {label: {f"k{k}": {"status": "n/a", "reason": str(e)}}}
        accs = []
        for r in results:
            if r.status != "ok":
                failed.append(r.reason or "failed")
                continue
            accs.append(accuracy_of(r.predict, dataset, list(combo)))
        if accs:   # Finetune: the mean over which original model is fine-tuned
            ok = [r for r in results if r.status == "ok"]
            runs.append({"classes": list(combo), "acc": statistics.fmean(accs),
                         "params": statistics.fmean(r.params_deployable for r in ok),
                         "params_training": statistics.fmean(r.params_training for r in ok)})
    cell = _aggregate(runs, ensemble_params) if runs else {"status": "failed",
                                                           "reason": sorted(set(failed))[:3]}
    if runs and failed:
        cell["failed_runs"] = len(failed)
    return {label: {f"k{k}": cell}}


def _aggregate(runs: list[dict[str, Any]], ensemble_params: int) -> dict[str, Any]:
    accs = [r["acc"] for r in runs]
    params = statistics.fmean(r["params"] for r in runs)
    return {"status": "ok", "acc_mean": statistics.fmean(accs),
            "acc_std": statistics.pstdev(accs) if len(accs) > 1 else 0.0, "n": len(accs),
            "params": params, "pct_of_ensemble": 100.0 * params / ensemble_params,
            "params_training": statistics.fmean(r["params_training"] for r in runs), "runs": runs}


# ------------------------------------------------------------------------------ tables
def paper_results(path: str | Path | None = None) -> dict[str, Any]:
    """The paper's numbers (``shared/docs/paper-results.json``); empty when not found."""
    import os

    candidates = [Path(path)] if path else []
    if os.environ.get("SNP_DATA_ROOT"):
        candidates.append(Path(os.environ["SNP_DATA_ROOT"]).parent / "docs" / "paper-results.json")
    candidates.append(Path(__file__).resolve().parents[3] / "shared" / "docs" / "paper-results.json")
    for c in candidates:
        if c.is_file():
            return json.loads(c.read_text())
    return {}


def paper_arch(paper: dict[str, Any], task: str, arch: str) -> str:
    """The paper's architecture that our ``arch`` stands in for (VGG16 for vgg11, ...)."""
    return PAPER_ARCH.get(get_arch(arch).family) or paper.get("table3", {}).get(task, {}).get("arch", "–")


def paper_entry(paper: dict[str, Any], task: str, method: str, arch: str
                ) -> tuple[float | None, dict[str, Any]]:
    """The paper's (% of the ensemble, accuracy by k) for a method on ``arch``'s counterpart:
    Table 2 per architecture, else Table 3, whose single S&P row stands for both variants."""
    t2 = paper.get("table2", {}).get(task, {})
    t3 = paper.get("table3", {}).get(task, {})
    p = t2.get(method, {}).get(PAPER_ARCH.get(get_arch(arch).family), {}) if t2 else {}
    prow = t3.get("rows", {}).get("S&P" if method.startswith("S&P") else method, {}) if t3 else {}
    ppct = (p.get("params") or {}).get("pct_of_ensemble") if p else None
    if ppct is None and prow.get("params_1e4") and t3.get("rows", {}).get("Ensemble"):
        ppct = 100.0 * prow["params_1e4"] / t3["rows"]["Ensemble"]["params_1e4"]
    return ppct, (p.get("acc") or {}) if p else (prow.get("acc") or {})


def _fmt_ours(cell: dict[str, Any] | None) -> str:
    if not cell:
        return "–"
    if cell.get("status") == "n/a":
        return "n/a"
    if cell.get("status") != "ok":
        return "failed"
    text = f"{100 * cell['acc_mean']:.2f} ± {100 * cell['acc_std']:.2f}"
    if cell.get("failed_runs"):
        text += f" ({cell['failed_runs']} of {cell['n'] + cell['failed_runs']} failed)"
    return text


def _fmt_paper(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return f"{value['mean']:.2f} ± {value['std']:.2f}"
    return f"{value:.2f}"


def render_table(result: dict[str, Any], paper: dict[str, Any]) -> str:
    """Markdown: each cell shows ours | paper."""
    task = result["task"]
    ks = result["config"]["ks"]
    lines = [f"# {task}: ours vs paper", "",
             f"Target class sets: {len(result['targets'])} seeded ({[list(t) for t in result['targets']]}). "
             "Accuracy in %, mean ± std over target sets; each cell is `ours | paper`.", ""]
    for arch, data in result["archs"].items():
        lines += [f"## {arch} (paper: {paper_arch(paper, task, arch)})", ""]
        if data.get("reused"):
            origin = data.get("reused_from") or {}
            made = (f"`{str(origin.get('commit', 'unknown'))[:12]}` "
                    f"({origin.get('created') or 'date not recorded'})")
            lines += [f"**Reused, not rerun:** copied from an earlier results.json made at commit {made} "
                      "with the same configs, code and market (`snp report --fresh` reruns it).", ""]
        lines += [
                  f"Ensemble of all original models: {data['ensemble_params']:,} parameters. "
                  f"Original models' test accuracy on their own classes: "
                  + ", ".join(f"{v:.3f}" for v in data["model_test_accuracy"].values()), "",
                  "| method | params (ours) | % of ensemble (ours \\| paper) | "
                  + " | ".join(f"k={k} (ours \\| paper)" for k in ks) + " |",
                  "|---|---:|---:|" + "---:|" * len(ks)]
        for method, cells in data["cells"].items():
            first = next((c for c in cells.values() if c.get("status") == "ok"), None)
            ppct, pacc = paper_entry(paper, task, method, arch)
            ours_pct = f"{first['pct_of_ensemble']:.1f}" if first else "–"
            row = [method, f"{first['params']:,.0f}" if first else "–",
                   f"{ours_pct} \\| {_fmt_paper(ppct)}"]
            row += [f"{_fmt_ours(cells.get(f'k{k}'))} \\| {_fmt_paper(pacc.get(f'k{k}'))}" for k in ks]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def write_outputs(result: dict[str, Any], out_dir: str | Path, paper: dict[str, Any]) -> dict[str, str]:
    from snp_ray.artifacts import atomic_write_bytes

    import sys

    from snp_ray.evaluation.provenance import stamp
    from snp_ray.evaluation.reproduce import protocol_digests

    folder = Path(out_dir) / result["task"]
    if "config" in result:   # the commit and config digests the numbers were made with
        stamp(result, protocol_digests(ProtocolConfig.from_dict(result["config"])), sys.argv, result["task"])
    table = render_table(result, paper)
    atomic_write_bytes(folder / "table.md", table.encode())
    atomic_write_bytes(folder / "results.json", json.dumps(result, indent=1, default=str).encode())
    paths = {"table": str(folder / "table.md"), "json": str(folder / "results.json")}
    fig = figure4(result, folder / "figure4.png", paper)
    if fig:
        paths["figure4"] = fig
    return paths


#: one colour per method, the same in every task's Figure 4 (matplotlib's tab10 names)
METHOD_COLOURS = {"S&P (R)": "tab:blue", "S&P (T)": "tab:orange", "Ensemble": "tab:green",
                  "Finetune": "tab:red", "CA-MKD": "tab:purple", "NetGraft": "tab:brown"}
#: one marker per architecture, the same in every task's Figure 4
ARCH_MARKERS = {"vgg11": "o", "vgg16": "s", "resnet20": "^", "resnet34": "D", "gru": "v",
                "lstm": "P", "textcnn": "X"}
_SPARE_COLOURS = ["tab:pink", "tab:olive", "tab:cyan", "tab:gray"]
_SPARE_MARKERS = ["*", "h", "<", ">", "p"]


def _style(table: dict[str, str], spare: list[str], name: str, order: list[str]) -> str:
    """A fixed style for a known name; an unknown one takes the next spare by first appearance."""
    if name in table:
        return table[name]
    unknown = [n for n in dict.fromkeys(order) if n not in table]
    return spare[unknown.index(name) % len(spare)]


def figure4(result: dict[str, Any], path: Path, paper: dict[str, Any] | None = None) -> str | None:
    """Figure 4 as a PNG at ``path`` (None when no cell succeeded); see :func:`draw_figure4`."""
    fig = draw_figure4(result, paper)
    return save_figure(fig, path) if fig is not None else None


def draw_figure4(result: dict[str, Any], paper: dict[str, Any] | None = None):
    """Parameters vs accuracy at the largest k: colour = method, marker = architecture, ours
    filled and the paper's hollow, legends outside the axes so they hide no point. Each
    scatter's gid is ``ours|paper:<method>:<arch>`` so tests can read the figure back."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    require_keys(result, ("task", "config", "archs"), "figure 4's protocol result")
    paper = paper or {}
    task, k = result["task"], max(result["config"]["ks"])
    methods = list(dict.fromkeys(m for d in result["archs"].values() for m in d["cells"]))
    archs = list(result["archs"])
    colour = {m: _style(METHOD_COLOURS, _SPARE_COLOURS, m, methods) for m in methods}
    marker = {a: _style(ARCH_MARKERS, _SPARE_MARKERS, a, archs) for a in archs}
    fig, ax = plt.subplots(figsize=(9, 4.8), layout="constrained")
    drawn: set[str] = set()
    paper_drawn: set[str] = set()
    for arch, data in result["archs"].items():
        seen_paper: set[tuple[float, float]] = set()   # Table 3's one S&P row serves both variants
        for method, cells in data["cells"].items():
            c = cells.get(f"k{k}")
            if c and c.get("status") == "ok":
                x, y = c["pct_of_ensemble"], 100 * c["acc_mean"]
                if c.get("acc_std"):
                    ax.errorbar(x, y, yerr=100 * c["acc_std"], fmt="none", ecolor=colour[method],
                                alpha=0.6, capsize=3, zorder=2)
                ax.scatter(x, y, s=60, marker=marker[arch], color=colour[method],
                           edgecolors="black", linewidths=0.5, zorder=3, gid=f"ours:{method}:{arch}")
                drawn.add(method)
            ppct, pacc = paper_entry(paper, task, method, arch)
            pk = pacc.get(f"k{k}")
            pmean = pk.get("mean") if isinstance(pk, dict) else pk
            if ppct is None or not isinstance(pmean, (int, float)) or (ppct, pmean) in seen_paper:
                continue                                # the paper has no number here ("failed", none)
            seen_paper.add((ppct, pmean))
            if isinstance(pk, dict) and pk.get("std"):
                bars = ax.errorbar(ppct, pmean, yerr=pk["std"], fmt="none", ecolor=colour[method],
                                   alpha=0.5, capsize=3, zorder=2)
                bars.lines[2][0].set_linestyle(":")
            ax.scatter(ppct, pmean, s=70, marker=marker[arch], facecolors="none",
                       edgecolors=colour[method], linewidths=1.6, zorder=3,
                       gid=f"paper:{method}:{arch}")
            paper_drawn.add(method)
    if not drawn:
        plt.close(fig)
        return None
    ensemble = ax.axvline(100, color="grey", linestyle=":", zorder=1, label="ensemble size (100 %)")
    ax.margins(x=0.06, y=0.1)
    ax.set_xlabel("deployable parameters, % of the ensemble")
    ax.set_ylabel(f"test accuracy at k={k} (%)")
    ax.set_title(f"{task}: parameters vs accuracy at k={k} (Figure 4)")
    ax.grid(alpha=0.3)
    shown = [m for m in methods if m in drawn | paper_drawn]
    fig.legend(handles=[Patch(color=colour[m], label=m) for m in shown], title="method (colour)",
               loc="outside right upper", fontsize=8, title_fontsize=8)
    kinds = [Line2D([], [], linestyle="none", marker=marker[a], color="black", markersize=7,
                    label=f"{a} (paper: {paper_arch(paper, task, a)})") for a in archs]
    kinds += [Line2D([], [], linestyle="none", marker="o", color="0.3", markersize=7,
                     label="filled: ours (± std, solid)")]
    if paper_drawn:
        kinds.append(Line2D([], [], linestyle="none", marker="o", markerfacecolor="none",
                            markeredgecolor="0.3", markersize=7, label="hollow: paper (± std, dotted)"))
    kinds.append(ensemble)
    fig.legend(handles=kinds, title="architecture (marker), source", loc="outside right lower",
               fontsize=8, title_fontsize=8)
    return fig
