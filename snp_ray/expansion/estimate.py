"""The market's equivalent expansion rate (method notes section 5, the paper's Figure 6).

Sample S class combinations (one class from each of the task's N models, all distinct; all of
them when there are T <= S), pack and test each, and estimate p(e) = #{acc >= 1 - e} / S, with a
Wilson band, and R(e) = p(e) * T / N. The job that packs and tests the combinations on Ray is
:func:`snp_ray.engine.expansion.run_expansion`.

Holders (issue #14): by default a combination packs, for each class, only the fragment of the
model the class was drawn from, with that model's k shots of it (``holders="own"``), as the method
notes define a combination. ``holders="merge"`` is the earlier behaviour: every holder of a
class feeds it with its fragment and its own k shots, so a class held twice trains on 2k shots;
its output is labelled and written beside, never over, the default's.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from snp_ray.artifacts import atomic_write_bytes, require_keys, save_figure
from snp_ray.config import Config, check_range
from snp_ray.errors import UnknownNameError
from snp_ray.market.tasks import get_task


E_GRID = [round(0.01 * i, 2) for i in range(51)]
HOLDERS = {"own": "one fragment per class: the model it was drawn from, exactly k shots",
           "merge": "merged holders: every holder's fragment and k shots (2k for a class held twice)"}


@dataclass
class ExpansionConfig(Config):
    task: str = "T3-C10"
    market: str = "runs/expansion/T3-C10"
    ks: list[int] = field(default_factory=lambda: [5, 10, 20])
    combos: int = 100
    seed: int = 0
    slice_preset: str = "quick"
    pack_epochs: int = 200
    out: str = "results/expansion"
    z: float = 1.96                       # Wilson band width (95 %)
    holders: str = "own"                  # own (method notes) or merge (every holder; labelled)

    def validate(self) -> None:
        get_task(self.task)
        if self.holders not in HOLDERS:
            raise UnknownNameError("holders mode", self.holders, list(HOLDERS))
        check_range("ExpansionConfig", "combos", self.combos, 1, 1_000_000)
        check_range("ExpansionConfig", "z", self.z, 0.0, 10.0, lo_open=True)


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def rates(accs: list[float], total: int, n_models: int, z: float = 1.96,
          grid: list[float] | None = None) -> dict[str, Any]:
    """p(e), its Wilson band and R(e) = p(e) T / N over the e grid (default 0 to 0.5)."""
    s = len(accs)
    out: dict[str, dict[str, float]] = {"p": {}, "p_low": {}, "p_high": {}, "R": {}, "R_low": {}, "R_high": {}}
    for e in grid or E_GRID:
        hits = sum(a >= 1 - e - 1e-12 for a in accs)
        lo, hi = wilson(hits, s, z)
        p = hits / s if s else 0.0
        key = f"{e:g}"
        out["p"][key], out["p_low"][key], out["p_high"][key] = p, lo, hi
        for name, val in (("R", p), ("R_low", lo), ("R_high", hi)):
            out[name][key] = val * total / n_models
    return out


def count_one_per_model(model_classes: list[list[int]], size: int) -> int:
    """T for one-class-per-model combinations of ``size``: sets of ``size`` (model, class) pairs,
    distinct models and distinct classes. Exact, by dynamic programming over class subsets."""
    ways = {(0, 0): 1}                        # (classes used bitmask, models used) -> count
    for cs in model_classes:
        nxt = dict(ways)
        for (mask, n), w in ways.items():
            if n == size:
                continue
            for c in cs:
                if not mask >> c & 1:
                    key = (mask | 1 << c, n + 1)
                    nxt[key] = nxt.get(key, 0) + w
        ways = nxt
    return sum(w for (_, n), w in ways.items() if n == size)


def sample_one_per_model(model_classes: list[list[int]], size: int, n: int, seed: int
                         ) -> list[list[tuple[int, int]]]:
    """``n`` distinct seeded combinations: ``size`` distinct models, one class drawn from each
    (uniformly among its classes), all classes distinct; as sorted (model index, class) pairs.
    When every model holds equally many classes, each of the T combinations is equally likely."""
    rng = np.random.default_rng(seed)
    seen: dict[tuple, None] = {}
    while len(seen) < n:
        models = rng.choice(len(model_classes), size, replace=False)
        combo = tuple(sorted((int(m), int(rng.choice(model_classes[m]))) for m in models))
        if len({c for _, c in combo}) == size:
            seen.setdefault(combo, None)
    return [list(c) for c in seen]


def write_outputs(result: dict[str, Any], out: str | Path) -> dict[str, str]:
    """expansion.json, expansion.md and figure6.png in ``<out>/<task>`` (``<task>-merge`` for
    the merged-holders option, so it never replaces the default's files)."""
    holders = result.get("holders", "merge")
    folder = Path(out) / (result["task"] if holders == "own" else f"{result['task']}-{holders}")
    atomic_write_bytes(folder / "expansion.json", json.dumps(result, indent=1).encode())
    lines = [f"# Equivalent expansion rate: {result['task']}", "",
             f"Holders: **{holders}** ({HOLDERS.get(holders, holders)}).", "",
             f"T = {result['T']} combinations, N = {result['N']} original models, "
             f"S = {result['S']} sampled (all of them when T <= S).", "",
             "| k | mean acc | p(0.2) | R(0.2) [95 % band] | p(0.3) | R(0.3) [95 % band] |",
             "|---|---:|---:|---:|---:|---:|"]
    for k, r in result["k"].items():
        lines.append(f"| {k} | {100 * r['mean_acc']:.2f} | {r['p']['0.2']:.2f} | "
                     f"{r['R']['0.2']:.1f} [{r['R_low']['0.2']:.1f}, {r['R_high']['0.2']:.1f}] | "
                     f"{r['p']['0.3']:.2f} | {r['R']['0.3']:.1f} [{r['R_low']['0.3']:.1f}, "
                     f"{r['R_high']['0.3']:.1f}] |")
    atomic_write_bytes(folder / "expansion.md", ("\n".join(lines) + "\n").encode())
    return {"json": str(folder / "expansion.json"), "md": str(folder / "expansion.md"),
            "figure6": figure6(result, folder / "figure6.png")}


def plot_rate(ax, r: dict[str, Any], key: str = "R", log: bool = True, **line_kw):
    """One curve of p(e) or R(e) with its Wilson band; returns the line. On a log axis a zero has
    no place, so where p(e) = 0 neither the curve nor the band is drawn (the band would run off
    the bottom of the axis and show nothing but its upper end): the curve starts at the first e
    where some combination was usable. ``r`` holds p, the key and their _low/_high by e."""
    es = list(r["p"])
    x = np.array([float(e) for e in es])
    keep = np.array([r["p"][e] > 0 for e in es]) if log else np.ones(len(es), dtype=bool)
    y, lo, hi = (np.where(keep, [float(r[name][e]) for e in es], np.nan)
                 for name in (key, f"{key}_low", f"{key}_high"))
    line, = ax.plot(x, y, marker=".", markersize=4, **line_kw)
    ax.fill_between(x, lo, hi, where=keep, alpha=0.2, color=line.get_color(), linewidth=0,
                    gid=f"band:{line_kw.get('gid', '')}")
    return line


def zero_until(r: dict[str, Any]) -> str | None:
    """The largest e at which p(e) is still 0 (p grows with e), or None when p(0) > 0."""
    zeros = [e for e, v in r["p"].items() if v == 0]
    return zeros[-1] if zeros and r["p"][next(iter(r["p"]))] == 0 else None


def figure6(result: dict[str, Any], path: Path) -> str:
    """Figure 6 as a PNG at ``path``; see :func:`draw_figure6`."""
    return save_figure(draw_figure6(result), path)


def draw_figure6(result: dict[str, Any]):
    """R(e) per k on a log axis, drawn only where p(e) > 0, with its Wilson band and the ceiling
    T/N that R reaches when every combination is usable. Lines carry gid ``R k=<k>``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    require_keys(result, ("task", "T", "N", "k"), "figure 6's expansion result")
    total, n_models = result["T"], result["N"]
    fig, ax = plt.subplots(figsize=(8, 5.2), layout="constrained")
    for k, r in result["k"].items():
        zero = zero_until(r)
        note = f"; p(e) = 0 up to e = {zero}, not drawn" if zero is not None else ""
        plot_rate(ax, r, label=f"k={k}{note}", gid=f"R k={k}")
    ax.axhline(total / n_models, color="0.35", linestyle="--", linewidth=1,
               label=f"ceiling T/N = {total}/{n_models} = {total / n_models:.1f} (p = 1)")
    ax.set_yscale("log")
    ax.set_xlabel("acceptable error e (a combination is usable when its accuracy is at least 1 - e)")
    ax.set_ylabel("equivalent expansion rate R(e), log scale")
    z = result.get("config", {}).get("z", 1.96)
    ax.set_title(f"{result['task']}: R(e) = p(e) T / N, holders: {result.get('holders', 'merge')}\n"
                 f"T = {total} class combinations, N = {n_models} original models, "
                 f"S = {result.get('S', '?')} sampled; bands: Wilson, z = {z:g}", fontsize=10)
    grid = [float(e) for r in result["k"].values() for e in r["p"]]
    ax.set_xlim(min(grid), max(grid))            # the whole e grid, also where nothing is drawn
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2, fontsize=8)
    return fig
