"""One slicing config for a whole market, chosen by few-shot cross-validation under a size budget.

:func:`snp_ray.tuning.select.select_config` picks a config per model by held-out AUC and breaks
ties towards smaller fragments. A market that must also meet a size goal (ResNet-20 packs at
<= 50 % of the Ensemble, issue #17) needs the budget in the rule itself: among the candidates
whose mean fragment size (fraction of the source's feature extractor) is within
``max_param_ratio``, the best mean CV AUC wins; when none is, the smallest does. Every number
comes from the models' own k shots, dealt into folds; the test split is fenced off while it runs.
"""
from __future__ import annotations

import logging
import math
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from snp_ray.errors import ConfigError
from snp_ray.market.market import Market
from snp_ray.tuning.objective import FragmentCache
from snp_ray.tuning.select import Candidate, cv_scores

log = logging.getLogger(__name__)


def choose_under_budget(rows: list[dict[str, Any]], max_param_ratio: float,
                        tie: float = 0.005) -> int:
    """Index of the winner among ``rows`` (``cv_auc``, ``param_ratio_mean``; candidate order):
    the best CV AUC among rows within the budget (ties within ``tie`` go to the smaller, then the
    earlier); with none within it, the smallest row."""
    valid = [i for i, r in enumerate(rows) if not math.isnan(r["cv_auc"])]
    if not valid:
        raise ConfigError("no candidate produced a CV score")
    feasible = [i for i in valid if rows[i]["param_ratio_mean"] <= max_param_ratio]
    if not feasible:
        return min(valid, key=lambda i: (rows[i]["param_ratio_mean"], i))
    best = max(rows[i]["cv_auc"] for i in feasible)
    tied = [i for i in feasible if rows[i]["cv_auc"] >= best - tie]
    return min(tied, key=lambda i: (round(rows[i]["param_ratio_mean"], 6), i))


def _score(args: tuple) -> tuple[str, str, dict[str, Any]]:
    """One (candidate, model) cell in a worker process: one torch thread, the test split fenced."""
    import torch

    from snp_ray.data.tables import test_split_fenced

    root, cache_root, cand, mid, k, folds, folds_used, seed, fold_seed = args
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with test_split_fenced():    # in-process (workers=1) the caller's environment comes back
            row = cv_scores(Market(root), mid, cand.config(), k, FragmentCache(cache_root), folds,
                            seed, fold_seed, folds_used)
    finally:
        torch.set_num_threads(threads)
    return cand.name, mid, row


def select_market_config(market_root: str, candidates: list[Candidate], k: int, cache_root: str,
                         max_param_ratio: float, folds: int = 3, folds_used: int = 0,
                         seed: int = 0, fold_seed: int = 0, tie: float = 0.005,
                         workers: int = 1) -> dict[str, Any]:
    """Score every candidate on every model of the market by :func:`cv_scores` (``workers``
    processes over the (candidate, model) cells) and choose one by :func:`choose_under_budget`.

    A candidate's ``cv_auc`` is the mean over every (model, class, fold) AUC; its
    ``param_ratio_mean`` the mean fragment/source size over the same fold fragments."""
    if not 0 < max_param_ratio <= 1:
        raise ConfigError(f"max_param_ratio must be in (0, 1], got {max_param_ratio!r}")
    if not candidates:
        raise ConfigError("no candidates")
    ids = Market(market_root).ids()
    cells = [(market_root, cache_root, c, mid, k, folds, folds_used, seed, fold_seed)
             for c in candidates for mid in ids]
    t0 = time.perf_counter()
    if workers > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            done = list(pool.map(_score, cells))
    else:
        done = [_score(c) for c in cells]
    per = {(name, mid): row for name, mid, row in done}
    table = []
    for cand in candidates:
        rows = [per[(cand.name, mid)] for mid in ids]
        aucs = [a for r in rows for v in r["per_fold"].values() for a in v if not math.isnan(a)]
        ratios = [r["param_ratio_mean"] for r in rows]
        table.append({**cand.describe(), "cv_auc": statistics.fmean(aucs) if aucs else float("nan"),
                      "param_ratio_mean": statistics.fmean(ratios),
                      "within_budget": statistics.fmean(ratios) <= max_param_ratio,
                      "models": {mid: {x: r[x] for x in ("cv_auc", "per_class", "param_ratio_mean",
                                                         "seconds", "fragments_made",
                                                         "fragments_reused")}
                                 for mid, r in zip(ids, rows)}})
        log.info("candidate %s: CV AUC %.4f, fragments %.3f of the source%s", cand.name,
                 table[-1]["cv_auc"], table[-1]["param_ratio_mean"],
                 "" if table[-1]["within_budget"] else " (over the budget)")
    i = choose_under_budget(table, max_param_ratio, tie)
    return {"market": market_root, "k": k, "folds": folds, "folds_used": folds_used or folds,
            "fold_seed": fold_seed, "seed": seed, "tie": tie, "max_param_ratio": max_param_ratio,
            "chosen": candidates[i].name, "candidate": candidates[i].describe(),
            "config": candidates[i].config().to_dict(), "table": table,
            "seconds": time.perf_counter() - t0}
