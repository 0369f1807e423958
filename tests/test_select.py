"""Choosing a model's slicing config by few-shot cross-validation (snp_ray.tuning.select): the
winner is the candidate with the best held-out AUC, ties go to smaller fragments, fold fragments
are cached, and the mixed-market job chooses with the test split fenced off."""
from __future__ import annotations

import math

import numpy as np
import pytest

import synthetic
from snp_ray.data.tables import ENV_FENCE
from snp_ray.errors import ConfigError, TestSplitAccessError
from snp_ray.market.modelstore import ModelSpec
from snp_ray.metrics import roc_auc
from snp_ray.tuning.objective import FragmentCache
from snp_ray.tuning.select import (CANDIDATES, Candidate, choose, cv_scores, model_folds,
                                   parse_candidates, select_config)

K = 6

pytestmark = pytest.mark.usefixtures("one_thread")


class _SyntheticMarket:
    """The three calls the selector makes of a market, over one synthetic model; no split at all
    behind it, so nothing can be read but the few-shot set handed in."""

    def __init__(self, model, fewshot):
        self._model, self._fewshot = model, fewshot
        self._spec = ModelSpec(id="synth", task="synthetic", index=0, arch="vgg11", width=0.125,
                               dataset="synthetic", classes=list(range(synthetic.CLASSES)),
                               class_names=fewshot.class_names, input=synthetic.SPEC.to_dict(),
                               weights_sha256="0" * 64)

    def spec(self, model_id):
        return self._spec

    def model(self, model_id):
        return self._model, self._spec

    def fewshot(self, model_id, k, seed=0):
        assert k == K
        return self._fewshot


def test_choose_prefers_held_out_auc_then_smaller_fragments_then_order():
    rows = [{"cv_auc": 0.80, "param_ratio_mean": 0.2}, {"cv_auc": 0.90, "param_ratio_mean": 0.5},
            {"cv_auc": float("nan"), "param_ratio_mean": 0.1}]
    assert choose(rows) == 1
    rows[0]["cv_auc"] = 0.898                     # within the tie margin: smaller fragments win
    assert choose(rows) == 0
    assert choose(rows, tie=0.0) == 1
    same = [{"cv_auc": 0.9, "param_ratio_mean": 0.3}, {"cv_auc": 0.9, "param_ratio_mean": 0.3}]
    assert choose(same) == 0                      # a full tie keeps the earlier (the default)
    assert choose([{"cv_auc": math.nan, "param_ratio_mean": 1.0}]) == 0


def test_parse_candidates():
    got = parse_candidates("quick, quick-rate0.3,smoke")
    assert [c.name for c in got] == ["quick", "quick-rate0.3", "smoke"]
    assert got[1].config().mode == "rate" and got[1].config().beta == 0.3
    assert got[0].config().digest() != got[1].config().digest()
    assert set(CANDIDATES) >= {"quick", "quick-rate0.3", "quick-rate0.5"}
    with pytest.raises(ConfigError):
        parse_candidates("quick,quick")
    with pytest.raises(Exception, match="nope"):
        parse_candidates("nope")


def test_selector_picks_the_higher_held_out_auc_and_caches_folds(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_FENCE, "1")            # a test-split read anywhere below would raise
    market = _SyntheticMarket(synthetic.trained_model(), synthetic.fewshot(K))
    good = Candidate("good", "smoke")
    # one unit per layer and a binary head that never trains: clearly worse on held-out shots
    bad = Candidate("bad", "smoke", (("mode", "rate"), ("beta", 0.01), ("lr_repair", 0.0)))
    cache = FragmentCache(tmp_path / "cache")
    out = select_config(market, "synth", [bad, good], K, cache, folds=3)
    by = {r["name"]: r for r in out["table"]}
    assert out["chosen"] == "good" and by["good"]["cv_auc"] > by["bad"]["cv_auc"] + 0.05
    assert out["config"] == good.config().to_dict()
    assert by["good"]["fragments_made"] == 3 * synthetic.CLASSES and cache.made == 18
    # the score is the held-out AUC of each fold's fragment, averaged over folds and classes
    fs, where = model_folds(market, "synth", K, 3)
    assert sorted(np.bincount(where).tolist()) == [6, 6, 6]      # 2 shots of each class per fold
    for name, row in by.items():
        aucs = [a for per in row["per_fold"].values() for a in per]
        assert len(aucs) == 9 and row["cv_auc"] == pytest.approx(np.mean(aucs))
    # rerun: every fold fragment comes from the cache and the table is the same
    again = select_config(market, "synth", [bad, good], K, cache, folds=3)
    assert cache.made == 18 and all(r["fragments_reused"] == 9 for r in again["table"])
    assert [r["cv_auc"] for r in again["table"]] == [r["cv_auc"] for r in out["table"]]
    # scoring only the first fold reuses that fold's fragments and averages its AUCs alone
    first = cv_scores(market, "synth", good.config(), K, cache, folds=3, folds_used=1)
    assert first["fragments_made"] == 0 and first["folds_used"] == 1
    assert first["cv_auc"] == pytest.approx(np.mean([v[0] for v in by["good"]["per_fold"].values()]))
    with pytest.raises(ConfigError):
        cv_scores(market, "synth", good.config(), K, cache, folds=3, folds_used=4)
    # a cached fragment scored by hand on its held-out fold gives the recorded AUC
    from snp_ray.slicing import Fragment

    frags = [Fragment.load(p) for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    frag = next(f for f in frags if f.spec.config_digest == good.config().digest()
                and f.spec.subset.startswith("cv3-f0") and f.spec.class_id == 1)
    held = fs.select(where == 0)
    assert roc_auc(frag.class_score(held.raw).numpy(), held.labels == 1) == \
        pytest.approx(by["good"]["per_fold"][frag.spec.class_name][0])


def test_mixed_selection_chooses_with_the_test_split_fenced(tmp_path, monkeypatch):
    """``--slice-preset auto`` (snp_ray.tuning.select.select_models) runs the selector with the
    fence up (a test-split read raises) and takes it down afterwards; models outside
    ``--auto-models`` get the first candidate."""
    import snp_ray.tuning.select as select
    from snp_ray.data.testsplit import load_test_split

    seen = []

    def fake_select(market, mid, candidates, k, cache, folds=3, folds_used=0, **_):
        assert (folds, folds_used) == (3, 1)
        with pytest.raises(TestSplitAccessError, match="fenced"):
            load_test_split("cifar10")
        seen.append(mid)
        return {"model": mid, "chosen": candidates[-1].name, "table": [{"name": c.name, "cv_auc": 0.5}
                                                                      for c in candidates]}

    class _Market:
        def ids(self):
            return ["a", "b"]

    monkeypatch.setattr(select, "select_config", fake_select)
    monkeypatch.delenv(ENV_FENCE, raising=False)
    cands = parse_candidates("quick,quick-rate0.3")
    chosen, record = select.select_models(_Market(), cands, 10, FragmentCache(tmp_path), ["b"],
                                          folds=3, folds_used=1)
    assert seen == ["b"] and chosen["a"].name == "quick" and chosen["b"].name == "quick-rate0.3"
    assert list(record["models"]) == ["b"] and len(record["candidates"]) == 2
    assert (record["folds"], record["folds_used"]) == (3, 1)
    assert ENV_FENCE not in __import__("os").environ        # the fence is lifted afterwards


def test_budget_choice_takes_the_best_auc_within_the_size_budget():
    from snp_ray.tuning.budget import choose_under_budget

    rows = [{"cv_auc": 0.92, "param_ratio_mean": 0.63}, {"cv_auc": 0.90, "param_ratio_mean": 0.44},
            {"cv_auc": 0.85, "param_ratio_mean": 0.30}, {"cv_auc": math.nan, "param_ratio_mean": 0.1}]
    assert choose_under_budget(rows, 1.0) == 0            # no budget: the best AUC
    assert choose_under_budget(rows, 0.45) == 1           # the best AUC that fits
    assert choose_under_budget(rows, 0.35) == 2
    assert choose_under_budget(rows, 0.2) == 2            # none fits: the smallest scored one
    rows[2]["cv_auc"] = 0.897                             # tied with 0.90: the smaller wins
    assert choose_under_budget(rows, 0.45) == 2
    with pytest.raises(ConfigError):
        choose_under_budget([{"cv_auc": math.nan, "param_ratio_mean": 0.1}], 0.5)


def test_market_selection_pools_every_model_and_fences_the_test_split(tmp_path, monkeypatch):
    """One config for the whole market: a candidate's AUC is the mean over every model's
    (class, fold) scores, its size the mean over models; the budget decides between them."""
    import snp_ray.tuning.budget as budget

    seen = []

    class _Ids:
        def __init__(self, root):
            pass

        def ids(self):
            return ["m0", "m1"]

    scores = {("big", "m0"): ([0.95, 0.93], 0.6), ("big", "m1"): ([0.91, 0.89], 0.7),
              ("small", "m0"): ([0.90, 0.88], 0.4), ("small", "m1"): ([0.86, 0.80], 0.42)}

    def fake_cv(market, mid, cfg, k, cache, folds, seed, fold_seed, folds_used):
        import os

        seen.append(os.environ.get(ENV_FENCE))
        name = "big" if cfg.coupled_rate == 0 else "small"
        aucs, ratio = scores[(name, mid)]
        return {"cv_auc": float(np.mean(aucs)), "per_fold": {"a": aucs}, "per_class": {"a": 0.0},
                "param_ratio_mean": ratio, "seconds": 1.0, "fragments_made": 2,
                "fragments_reused": 0}

    monkeypatch.setattr(budget, "Market", _Ids)
    monkeypatch.setattr(budget, "cv_scores", fake_cv)
    monkeypatch.delenv(ENV_FENCE, raising=False)
    cands = [Candidate("big", "smoke"), Candidate("small", "smoke", (("coupled_rate", 0.5),))]
    out = budget.select_market_config("m", cands, K, str(tmp_path), max_param_ratio=0.5)
    by = {r["name"]: r for r in out["table"]}
    assert by["big"]["cv_auc"] == pytest.approx(0.92) and by["big"]["param_ratio_mean"] == pytest.approx(0.65)
    assert by["small"]["cv_auc"] == pytest.approx(0.86) and by["small"]["param_ratio_mean"] == pytest.approx(0.41)
    assert out["chosen"] == "small" and not by["big"]["within_budget"]
    assert budget.select_market_config("m", cands, K, str(tmp_path), 1.0)["chosen"] == "big"
    assert seen and all(v == "1" for v in seen)           # every scoring ran fenced
    import os

    assert ENV_FENCE not in os.environ                    # and the fence came down after
    with pytest.raises(ConfigError):
        budget.select_market_config("m", cands, K, str(tmp_path), 0.0)
