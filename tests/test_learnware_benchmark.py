"""LW-C10, the learnware market's CIFAR-10 scenario rebuilt (issue #25 §2): exact bookkeeping of
the market, the users, the label budgets and the test-split fence. A 1-epoch smoke market's
accuracies are not asserted (they say nothing)."""
from __future__ import annotations

import numpy as np
import pytest

from snp_ray.evaluation.learnware import UsersConfig, make_users, ratio_counts
from snp_ray.market.tasks import LEARNWARE_RATIOS, get_task, model_rows


def test_ratio_counts_split_exactly():
    assert ratio_counts(3000, [0.3, 0.3, 0.1, 0.1, 0.1, 0.1]) == [900, 900, 300, 300, 300, 300]
    assert ratio_counts(100, [0.3, 0.3, 0.1, 0.1, 0.1, 0.1]) == [30, 30, 10, 10, 10, 10]
    assert ratio_counts(12_500, list(LEARNWARE_RATIOS)) == [5000, 5000, 1250, 1250]
    assert sum(ratio_counts(7, [0.3, 0.3, 0.1, 0.1, 0.1, 0.1])) == 7


def test_the_market_follows_the_learnware_protocol(real_data):
    from snp_ray.data.tables import read_split

    task = get_task("LW-C10")
    assert task.num_models == 50 and task.default_arch == "lwconv" and task.request_size == 6
    assert all(len(c) == 4 for c in task.model_classes)
    assert all(sorted(n) == [1250, 1250, 5000, 5000] for n in task.train_counts)
    labels = read_split("cifar10", "train").labels
    rows = [model_rows(task, i, labels) for i in (0, 1)]
    for i, r in enumerate(rows):
        assert r.size == 12_500 and np.unique(r).size == r.size
        got = {int(c): int((labels[r] == c).sum()) for c in task.model_classes[i]}
        assert got == dict(zip(task.model_classes[i], task.train_counts[i]))
    # models overlap (a 0.4 class takes every one of its 5,000 train images)
    assert np.intersect1d(rows[0], rows[1]).size > 0


def test_users_hold_six_classes_at_the_ratio(real_data):
    from snp_ray.data.testsplit import load_test_split

    test = load_test_split("cifar10").labels
    train = __import__("snp_ray.data.tables", fromlist=["read_split"]).read_split("cifar10", "train").labels
    cfg = UsersConfig(users=4)
    users = make_users(cfg, test)
    assert users[0].classes != users[1].classes
    for u in users:
        assert len(set(u.classes)) == 6 and u.test_rows.size == 3000
        counts = [int((test[u.test_rows] == c).sum()) for c in u.classes]
        assert counts == [900, 900, 300, 300, 300, 300]
        for budget in (100, 4000):
            rows = u.label_rows(train, budget, 0, cfg)
            assert [int((train[rows] == c).sum()) for c in u.classes] == ratio_counts(budget, cfg.ratios)
        assert not np.array_equal(u.label_rows(train, 100, 0, cfg), u.label_rows(train, 100, 1, cfg))
        assert np.array_equal(u.label_rows(train, 100, 0, cfg), u.label_rows(train, 100, 0, cfg))
        assert set(u.label_rows(train, 100, 0, cfg)) <= set(u.label_rows(train, 200, 0, cfg))
    assert [u.classes for u in make_users(cfg, test)] == [u.classes for u in users]   # seeded


def test_clean_evidence_seeds_are_refused_in_development():
    from snp_ray.errors import ConfigError
    from snp_ray.engine.learnware import LearnwareJobConfig

    with pytest.raises(ConfigError, match="reserved"):
        LearnwareJobConfig(users=UsersConfig(seed=1000))


def test_smoke_job_counts_and_fences_every_choice(ray_cluster, real_data, tmp_path, monkeypatch):
    """The lw-c10-smoke preset end to end on Ray: every (user, method, budget) row is there,
    each pack trained on exactly its samples, and every plan, pack and user model was made with
    the test split fenced (checked inside each call, in the worker)."""
    import json

    from snp_ray.evaluation.learnware import MethodsConfig, UsersConfig
    from snp_ray.engine.learnware import LearnwareJobConfig, run

    methods = MethodsConfig(plans=["best", "top-2"], user_epochs=1, reuse_budgets=[12])
    cfg = LearnwareJobConfig(preset="lw-c10-smoke", store=str(tmp_path / "market"),
                             users=UsersConfig(users=2, budgets=[12, 24], repeats=[2, 1]),
                             methods=methods, workers=2)
    result = run(cfg, tmp_path / "out")
    rows = result["rows"]
    assert result["market"]["models"] == 6 and result["slicing"]["failed"] == 0
    assert result["market"]["epochs"] == 1 and result["market"]["preset_epochs"] == 1
    methods = {(r["user"], r["method"], r["budget"], r["repeat"]) for r in rows}
    assert len(methods) == len(rows)                        # no row twice
    per_user_label_rows = (2 + 1) * 3                       # (2 + 1 repeats) x 3 methods
    per_user_plain = 3 + 2             # mean, oracle, holders' average; best, top-2
    assert len(rows) == 2 * (per_user_plain + per_user_label_rows)
    assert result["learnware_package"]["ran"] is False        # no environment given: said so
    exported = np.load(tmp_path / "out" / "reuse" / "user0.npz", allow_pickle=False)
    assert exported["test_logp"].shape == (len(exported["mixture"]), 3000, 10)
    assert exported["label_logp_12"].shape == (len(exported["mixture"]), 12, 10)
    for r in rows:
        if r["method"] == "S&P best (user labels)":
            assert r["train_samples"] == r["budget"]
        if r["method"] == "S&P best (user labels + market shots)":
            # the user's rows plus the chosen holders' k = 5 shots of each of the 6 classes,
            # less any train row both drew (keys dedupe them)
            assert r["budget"] < r["train_samples"] <= r["budget"] + 6 * 5
    assert json.loads((tmp_path / "out" / "learnware.json").read_text())["summary"]
    assert "(published, their learnwares)" in (tmp_path / "out" / "report.md").read_text()
    assert (tmp_path / "out" / "learnware-budgets.png").stat().st_size > 10_000
    # every choice of a user's evaluation runs fenced: re-run one user in this process with
    # each choosing call wrapped by a check that the test split is unreadable inside it
    import snp_ray.evaluation.learnware as lw
    from snp_ray.data.tables import EVAL_ACCESS, read_split
    from snp_ray.errors import TestSplitAccessError
    from snp_ray.market import Market
    from snp_ray.packing.config import preset_pack_config
    from snp_ray.slicing.config import slice_preset

    calls = []

    def fenced(fn):
        def wrapped(*a, **kw):
            with pytest.raises(TestSplitAccessError):
                read_split("cifar10", "test", access=EVAL_ACCESS)
            calls.append(fn.__name__)
            return fn(*a, **kw)
        return wrapped

    for name in ("plan_request", "pack_planned", "train_user_model"):
        monkeypatch.setattr(lw, name, fenced(getattr(lw, name)))
    market = Market(tmp_path / "market")
    one = UsersConfig(users=1, budgets=[12], repeats=[1])
    users = lw.make_users(one, lw.load_test_split("cifar10").labels)
    cache = lw.TestCache(market, "cifar10", users[0].test_rows)
    out = lw.evaluate_user(market, users[0], one, 5, slice_preset("smoke"),
                           preset_pack_config("smoke"), cache, read_split("cifar10", "train"),
                           lw.MethodsConfig(plans=["best"], user_epochs=1))
    assert sorted(set(calls)) == ["pack_planned", "plan_request", "train_user_model"]
    assert calls.count("pack_planned") == 3                 # no labels, labels, labels + market
    assert {r["method"] for r in out} >= {"S&P best (user labels)", "user model (labels alone)"}


def test_every_class_has_a_holder_in_both_markets():
    for name in ("LW-C10", "LW-C10-S"):
        held = {c for cs in get_task(name).model_classes for c in cs}
        assert held == set(range(10)), name


def test_a_market_trained_before_a_recipe_knob_existed_is_not_retrained():
    from snp_ray.market.build import same_recipe
    from snp_ray.market.training import TrainConfig

    old = TrainConfig(epochs=3).to_dict()
    for knob in ("schedule", "nesterov"):
        old.pop(knob)
    assert same_recipe(old, TrainConfig(epochs=3))
    assert not same_recipe(old, TrainConfig(epochs=4))
    assert not same_recipe({**old, "fewshot": {"source": "upload"}}, TrainConfig(epochs=3))
