"""Planner policies and the market's expansion on a many-developer market (issue #14, 2 and 3).

For S seeded requests of the task's request size (6 classes on market50), each policy
(``best``, ``top-2``, ``all``, ...) plans the fragments per class on held-out few-shot data only,
then packs; only after that is the pack tested on the test split (from every fragment's cached
test features). Also the one-class-per-model combinations of the expansion study (6 distinct
models, one class from each, distinct classes; each class's fragment from the model it was drawn
from, with exactly k shots), so that both expansion curves, R(e) = p(e) T / N, can be drawn.

Every result is appended to a JSON-lines log as soon as it is known (a killed run resumes).

Usage:
  python benchmarks/planner_compare.py --market runs/market50 --k 10 --requests 100 \\
      --plans best,top-2,all --one-per-model 100 --json
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("planner_compare")


def _read(path: Path) -> dict[tuple, dict]:
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
                done[(rec["label"], tuple(map(tuple, rec["request"])) if rec["label"] == "one-per-model"
                      else tuple(rec["request"]))] = rec
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--market", default="runs/market50")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--preset", default="quick")
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plans", default="best,top-2,all")
    p.add_argument("--plan-samples", default="chosen", choices=["chosen", "union"])
    p.add_argument("--limit", default="", help="e.g. all=20: score only the first 20 requests "
                   "with that policy (a policy too slow for all of them)")
    p.add_argument("--one-per-model", type=int, default=0, help="one-class-per-model combinations")
    p.add_argument("--log", default="runs/planner/compare.jsonl")
    p.add_argument("--out", default="benchmarks/results/planner_compare.json")
    p.add_argument("--figure", default="")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-warm", dest="warm", action="store_false",
                   help="skip the timed warm-up (load and score every fragment first)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--redraw", action="store_true",
                   help="only redraw --figure from the result JSON at --out (nothing is packed)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if a.redraw:
        if not a.figure:
            p.error("--redraw needs --figure")
        from snp_ray.artifacts import read_json

        print(figure(read_json(a.out, "planner result"), Path(a.figure)))
        return 0
    import torch

    torch.set_num_threads(a.threads)
    from snp_ray.evaluation.packs import accuracy_from_features, test_features
    from snp_ray.expansion.estimate import count_one_per_model, sample_one_per_model
    from snp_ray.market import Market
    from snp_ray.market.tasks import count_combinations, get_task, target_sets
    from snp_ray.packing import preset_pack_config
    from snp_ray.packing.planner import (FewShotPool, PlanConfig, ScoreCache, pack_planned,
                                         plan_request)
    from snp_ray.packing.request import pack_assignment
    from snp_ray.slicing import slice_preset
    from snp_ray.slicing.api import pair_key
    from snp_ray.store import market_fragment_store

    market = Market(a.market)
    specs = market.specs()
    task = get_task(specs[0].task)
    scfg, pcfg = slice_preset(a.preset), preset_pack_config(a.preset, seed=a.seed)
    store = market_fragment_store(market)
    frags: dict = {}

    def load(key: str):
        if key not in frags:
            frags[key] = store.get(key)
        return frags[key]

    # warm-up, timed apart: load every fragment once and score it on the market's few-shot pool
    # (plan times below are then the per-request cost with a warm cache, as a market would run)
    t0 = time.perf_counter()
    cache = ScoreCache(FewShotPool.from_market(market, a.k, a.seed))
    for spec in specs if a.warm else []:
        for c in spec.classes:
            cache.scores(load(pair_key(spec, c, scfg, a.k, a.seed)))
    pool_s = time.perf_counter() - t0
    log.info("loaded and scored %d fragments on %d few-shot samples in %.1f s", len(frags),
             len(cache.pool.labels), pool_s)
    test_feats: dict = {}

    def accuracy(packed) -> float:
        """Only after choosing and packing: the test split, through cached fragment features."""
        for f in packed.fragments:
            if f.spec.key not in test_feats:
                test_feats[f.spec.key] = test_features(f, task.dataset)
        return accuracy_from_features(packed, test_feats)

    requests = [list(r) for r in target_sets(task, a.requests, a.seed)]
    limits = {k: int(v) for k, v in (x.split("=") for x in a.limit.split(",") if x)}
    log_path = Path(a.log)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    done = _read(log_path)
    tag = {"k": a.k, "preset": a.preset, "samples": a.plan_samples, "pack": pcfg.digest()}
    by_index = {s.index: s for s in specs}
    combos = sample_one_per_model(task.model_classes, task.request_size, a.one_per_model,
                                  a.seed) if a.one_per_model else []
    jobs = [(plan, tuple(r)) for plan in a.plans.split(",") if plan
            for r in requests[:limits.get(plan, len(requests))]]
    # past its limit, a policy is still planned and sized for every request, not packed
    jobs += [(f"{plan}:size", tuple(r)) for plan in limits for r in requests[limits[plan]:]]
    jobs += [("one-per-model", tuple(map(tuple, c))) for c in combos]
    with open(log_path, "a") as fh:
        for i, (label, req) in enumerate(jobs):
            if (label, req) in done and done[(label, req)].get("tag") == tag:
                continue
            t0 = time.perf_counter()
            if label.endswith(":size"):
                if label == "all:size":     # every holder's fragment: no ranking needed to size it
                    fr = [load(pair_key(s, c, scfg, a.k, a.seed)) for c in req for s in market.holders(c)]
                else:
                    fr = plan_request(market, list(req), a.k, scfg, PlanConfig(label[:-5], a.plan_samples),
                                      a.seed, cache, load).fragments()
                dims = sum(f.spec.feature_dim for f in fr)
                rec = {"label": label, "request": list(req), "tag": tag, "fragments": len(fr),
                       "plan_s": time.perf_counter() - t0,
                       # deployable = fragments (with their binary probes) + Enc + head, as
                       # PackedModel.params_deployable counts them
                       "params": sum(f.spec.params + 2 * f.spec.feature_dim + 2 for f in fr)
                       + dims * pcfg.hidden + pcfg.hidden + pcfg.hidden * len(req) + len(req)}
                fh.write(json.dumps(rec) + "\n")
                done[(label, req)] = rec
                continue
            if label == "one-per-model":
                assignment = [(by_index[m].id, c) for m, c in req]
                plan_s = 0.0
                packed = pack_assignment(market, assignment, a.k, scfg, pcfg, a.seed, fetch=load)
                chosen = [[m for m, _ in assignment]]
            else:
                plan = plan_request(market, list(req), a.k, scfg,
                                    PlanConfig(label, a.plan_samples), a.seed, cache, load)
                plan_s = time.perf_counter() - t0
                packed = pack_planned(market, plan, a.k, pcfg, a.seed)
                chosen = [[f.spec.source_model for f in plan.chosen[c]] for c in plan.classes]
            wall = time.perf_counter() - t0
            rec = {"label": label, "request": [list(x) for x in req] if label == "one-per-model"
                   else list(req), "tag": tag, "chosen": chosen,
                   "fragments": len(packed.fragments), "params": packed.params_deployable(),
                   "train_samples": packed.spec.metrics["train_samples"],
                   "plan_s": plan_s, "pack_s": packed.spec.metrics["pack_seconds"],
                   "plan_pack_s": wall}
            rec["acc"] = accuracy(packed)
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            done[(label, req)] = rec
            log.info("[%d/%d] %s %s: acc %.4f, %d fragments, %.1f s", i + 1, len(jobs), label,
                     list(req), rec["acc"], rec["fragments"], wall)
    result = summarise(a, done, jobs, tag, task, pool_s,
                       count_combinations(task), count_one_per_model(task.model_classes, task.request_size))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    if a.figure:
        result["figure"] = figure(result, Path(a.figure))
    for label, r in result["policies"].items():
        if label.endswith(":size"):
            print(f"{label:14s} n={r['n']:3d} (planned, not packed)  fragments {r['fragments_mean']:.1f}  "
                  f"params {r['params_mean']:,.0f}  plan {r['plan_s_mean']:.3f} s")
            continue
        print(f"{label:14s} n={r['n']:3d} acc {100 * r['acc_mean']:.2f} ± {100 * r['acc_std']:.2f}  "
              f"fragments {r['fragments_mean']:.1f}  params {r['params_mean']:,.0f}  "
              f"plan {r['plan_s_mean']:.3f} s  pack {r['pack_s_mean']:.2f} s")
    for label, r in result["paired"].items():
        print(f"{label:14s} n={r['n']:3d} paired diff {100 * r['mean']:+.2f} points "
              f"[{100 * r['ci95'][0]:+.2f}, {100 * r['ci95'][1]:+.2f}]  wins/ties/losses "
              f"{r['wins']}/{r['ties']}/{r['losses']}  sign test p = {r['sign_test_p']:.2g}")
    if a.json:
        print(json.dumps({k: v for k, v in result.items() if k != "expansion"}
                         | {"expansion": {k: {e: v["p"][e] for e in ("0.3", "0.4", "0.5", "0.6")}
                                          for k, v in result["expansion"].items()}}))
    return 0


def summarise(a, done, jobs, tag, task, pool_s, t_requests, t_one_per_model) -> dict:
    from snp_ray.expansion.estimate import rates

    out = {"market": a.market, "k": a.k, "preset": a.preset, "plan_samples": a.plan_samples,
           "requests": a.requests, "request_size": task.request_size, "N": task.num_models,
           "pool_scoring_s": pool_s, "policies": {}, "expansion": {}}
    labels = list(dict.fromkeys(label for label, _ in jobs))
    for label in labels:
        recs = [done[j] for j in jobs if j[0] == label and j in done and done[j].get("tag") == tag]
        if not recs:
            continue
        if label.endswith(":size"):
            out["policies"][label] = {
                "n": len(recs), "fragments_mean": float(np.mean([r["fragments"] for r in recs])),
                "params_mean": float(np.mean([r["params"] for r in recs])),
                "plan_s_mean": float(np.mean([r["plan_s"] for r in recs]))}
            continue
        accs = [r["acc"] for r in recs]
        out["policies"][label] = {
            "n": len(recs), "acc_mean": float(np.mean(accs)), "acc_std": float(np.std(accs)),
            "acc_min": float(np.min(accs)), "acc_max": float(np.max(accs)),
            "fragments_mean": float(np.mean([r["fragments"] for r in recs])),
            "params_mean": float(np.mean([r["params"] for r in recs])),
            "train_samples_mean": float(np.mean([r["train_samples"] for r in recs])),
            "plan_s_mean": float(np.mean([r["plan_s"] for r in recs])),
            "pack_s_mean": float(np.mean([r["pack_s"] for r in recs])),
            "plan_pack_s_mean": float(np.mean([r["plan_pack_s"] for r in recs])),
            "accuracies": accs}
        total = t_one_per_model if label == "one-per-model" else t_requests
        # weak market models: the usable range of e reaches past the paper's 0.5
        grid = [round(0.01 * i, 2) for i in range(81)]
        out["expansion"][label] = {"T": total, **rates(accs, total, task.num_models, grid=grid)}
    out["paired"] = paired(done, jobs, tag, control="random")
    return out


def paired(done, jobs, tag, control: str) -> dict:
    """Each scored policy against ``control`` on the same requests: the mean difference in
    accuracy, its 95 % interval (a seeded bootstrap over requests), wins/ties/losses and the
    exact two-sided sign test."""
    acc = {}
    for label, req in jobs:
        rec = done.get((label, req))
        if rec is not None and rec.get("tag") == tag and "acc" in rec and label != "one-per-model":
            acc.setdefault(label, {})[req] = rec["acc"]
    out = {}
    for label in acc:
        shared = sorted(set(acc[label]) & set(acc.get(control, {})))
        if label == control or not shared:
            continue
        d = np.array([acc[label][r] - acc[control][r] for r in shared])
        boot = np.random.default_rng(0).choice(d, (10000, len(d))).mean(1)
        wins, losses = int((d > 0).sum()), int((d < 0).sum())
        n = wins + losses
        tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2 ** n if n else 1.0
        out[f"{label} - {control}"] = {
            "n": len(d), "mean": float(d.mean()), "std": float(d.std()),
            "ci95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))],
            "wins": wins, "ties": len(d) - n, "losses": losses, "sign_test_p": min(1.0, 2 * tail)}
    return out


def figure(result: dict, path: Path) -> str:
    """p(e) and R(e) of the planner-based requests (best) beside the one-class-per-model ones.
    On the log R panel nothing is drawn where p(e) = 0; each series' ceiling T/N is dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from snp_ray.artifacts import save_figure
    from snp_ray.expansion.estimate import plot_rate, zero_until

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2), layout="constrained")
    names = {"best": "any holder, planned by best", "one-per-model": "one class per model (own fragment)"}
    n_models = result["N"]
    for label, r in result["expansion"].items():
        if label not in names:
            continue
        zero = zero_until(r)
        note = f"; p = 0 up to e = {zero}" if zero is not None else ""
        line = plot_rate(axes[0], r, "p", log=False, label=f"{names[label]}{note}")
        plot_rate(axes[1], r, "R", color=line.get_color(), gid=f"R {label}")
        axes[1].axhline(r["T"] / n_models, color=line.get_color(), linestyle="--", linewidth=1,
                        label=f"{names[label]}: ceiling T/N = {r['T']:,}/{n_models} = {r['T'] / n_models:.3g}")
    axes[0].set_ylabel("usable fraction p(e)")
    axes[1].set_ylabel("equivalent expansion rate R(e) = p(e) T / N, log scale")
    axes[1].set_yscale("log")
    grid = [float(e) for r in result["expansion"].values() for e in r["p"]]
    for ax in axes:
        ax.set_xlabel("acceptable error e")
        ax.set_xlim(min(grid), max(grid))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    fig.suptitle(f"{Path(result['market']).name}: {result['request_size']}-class requests, "
                 f"k={result['k']}, N={n_models} models, S={result['requests']} each; "
                 f"T = combinations of each kind; 95 % Wilson bands (R only where p > 0)", fontsize=10)
    return save_figure(fig, path)

if __name__ == "__main__":
    sys.exit(main())
