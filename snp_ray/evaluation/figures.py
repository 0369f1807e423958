"""The paper's Figure 5 (IoU of kept units between one model's fragments, rate vs threshold) and
Figure 7 (seconds per class against the number of requested classes, slicing vs packing), from
fragments already in a market's store."""
from __future__ import annotations

import logging
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from snp_ray.artifacts import atomic_write_bytes, save_figure
from snp_ray.errors import ArtifactNotFoundError
from snp_ray.market import Market
from snp_ray.packing import PackConfig
from snp_ray.packing.request import pack_request
from snp_ray.slicing import SliceConfig
from snp_ray.slicing.api import pair_key
from snp_ray.slicing.fragment import FragmentSpec, kept_iou
from snp_ray.store import market_fragment_store

log = logging.getLogger(__name__)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def layer_iou(a: FragmentSpec, b: FragmentSpec) -> float:
    """The paper's Figure 5 value: the IoU of kept units per layer (group), averaged over layers."""
    per_group = kept_iou(a, b)
    return statistics.fmean(per_group.values()) if per_group else 1.0


def unit_iou(a: FragmentSpec, b: FragmentSpec) -> float:
    """IoU of the kept units of two fragments of one model, pooled over all its unit groups (wide
    layers weigh more than in :func:`layer_iou`; reported beside it)."""
    inter = union = 0
    for gid in a.kept:
        sa, sb = set(a.kept[gid]), set(b.kept.get(gid, []))
        inter += len(sa & sb)
        union += len(sa | sb)
    return inter / union if union else 1.0


def _specs(market: Market, model_id: str, k: int, cfg: SliceConfig) -> list[FragmentSpec]:
    store, spec = market_fragment_store(market), market.spec(model_id)
    out = []
    for c in spec.classes:
        key = pair_key(spec, c, cfg, k, 0)
        if key not in store.keys():
            raise ArtifactNotFoundError(f"no fragment of {model_id} class {c} at k={k} with config "
                                        f"{cfg.digest()}; slice the market first")
        out.append(store.get(key).spec)
    return out


def iou_matrices(market: Market, k: int, configs: dict[str, SliceConfig]) -> dict[str, Any]:
    """{model id: {"classes": [...], label: per-layer mean IoU matrix, "<label> pooled": pooled
    IoU matrix, and the mean off-diagonal value of each}} for every model of the market."""
    out: dict[str, Any] = {}
    for mid in market.ids():
        entry: dict[str, Any] = {"classes": market.spec(mid).class_names}
        for label, cfg in configs.items():
            specs = _specs(market, mid, k, cfg)
            for name, fn in ((label, layer_iou), (f"{label} pooled", unit_iou)):
                entry[name] = [[fn(a, b) for b in specs] for a in specs]
                entry[f"{name} mean off-diagonal"] = mean_off_diagonal(entry[name])
        out[mid] = entry
    return out


def mean_off_diagonal(matrix: list[list[float]]) -> float:
    off = [row[j] for i, row in enumerate(matrix) for j in range(len(row)) if i != j]
    return statistics.fmean(off) if off else 1.0


def figure5(data: dict[str, Any], labels: list[str], path: str | Path) -> str:
    plt = _plt()
    models = list(data)
    fig, axes = plt.subplots(len(models), len(labels), figsize=(3.4 * len(labels) + 1, 3.3 * len(models)),
                             squeeze=False, layout="constrained")
    for r, mid in enumerate(models):
        names = data[mid]["classes"]
        for c, label in enumerate(labels):
            ax = axes[r][c]
            m = np.asarray(data[mid][label])
            im = ax.imshow(m, vmin=0.0, vmax=1.0, cmap="viridis")
            for i in range(m.shape[0]):
                for j in range(m.shape[1]):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if m[i, j] < 0.6 else "black")
            ax.set_xticks(range(len(names)), names, rotation=45, fontsize=7)
            ax.set_yticks(range(len(names)), names, fontsize=7)
            ax.set_title(f"{mid}\n{label}: mean off-diag {data[mid][f'{label} mean off-diagonal']:.2f}"
                         f" (pooled {data[mid][f'{label} pooled mean off-diagonal']:.2f})", fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.6, label="IoU of kept units, mean over layers")
    return save_figure(fig, path)


def time_per_class(market: Market, k: int, cfg: SliceConfig, sizes: list[int], seed: int = 0,
                   pack: PackConfig | None = None) -> list[dict[str, Any]]:
    """For each number n of requested classes: a seeded set of n held classes, packed from
    stored fragments (timed), beside the slicing seconds its fragments cost (from their specs)."""
    held = sorted({c for s in market.specs() for c in s.classes})
    rng = np.random.default_rng(seed)
    pack_request(market, held[:2], k, cfg, pack or PackConfig())   # untimed warm-up: thread pool,
    rows = []                                                        # allocator, lazy imports
    for n in sizes:
        classes = sorted(int(c) for c in rng.choice(held, size=min(n, len(held)), replace=False))
        packed = pack_request(market, classes, k, cfg, pack or PackConfig())
        slice_s = sum(f.spec.seconds for f in packed.fragments)
        pack_s = packed.spec.metrics["pack_seconds"]
        rows.append({"n": len(classes), "classes": classes, "fragments": len(packed.fragments),
                     "slice_seconds": slice_s, "pack_seconds": pack_s,
                     "slice_per_class": slice_s / len(classes), "pack_per_class": pack_s / len(classes),
                     "pack_fraction": pack_s / slice_s if slice_s else None})
        log.info("n=%d: slicing %.1fs, packing %.2fs (%.2f %%)", len(classes), slice_s, pack_s,
                 100 * pack_s / max(slice_s, 1e-9))
    return rows


def figure7(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ns = [r["n"] for r in rows]
    ax.plot(ns, [r["slice_per_class"] for r in rows], "o-", label="slicing (once per class)")
    ax.plot(ns, [r["pack_per_class"] for r in rows], "s-", label="packing")
    ax.set_yscale("log")
    ax.set_xlabel("requested classes")
    ax.set_ylabel("seconds per class")
    ax.set_title(title or "Figure 7: time per class")
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def write_json(data: Any, path: str | Path) -> str:
    import json

    atomic_write_bytes(Path(path), json.dumps(data, indent=1).encode())
    return str(path)
