"""Request planner (issue 14): policies best / top-m / all scored on held-out few-shot data only,
the market12 preset (disjoint shards), and ``snp pack --plan``."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import synthetic
from conftest import as_fragment

K = 5


@pytest.fixture(scope="module")
def candidates(one_thread):
    """Three fragments of class 0 of the synthetic shape task: from a trained model, from an
    untrained one, and the trained one with its binary head inverted (deliberately broken)."""
    from snp_ray.slicing import Fragment, Slicer, slice_preset

    out = {}
    for seed, (name, model) in enumerate((("trained", synthetic.trained_model()),
                                          ("untrained", synthetic.untrained_model())), start=1):
        slicer = Slicer(model, synthetic.SPEC, synthetic.fewshot(K), slice_preset("quick"))
        f = as_fragment(slicer.slice_class(0), slicer, "vgg11", 0.125, 0, seed)
        out[name] = Fragment(f.spec.replace(source_model=name), f.features, f.probe)
    good = out["trained"]
    probe = copy.deepcopy(good.probe)
    with torch.no_grad():
        probe.weight.copy_(probe.weight.flip(0))
        probe.bias.copy_(probe.bias.flip(0))
    out["inverted"] = Fragment(good.spec.replace(source_model="inverted", source_sha256="03" * 32),
                               copy.deepcopy(good.features), probe)
    return out


def _pool():
    """Other developers' uploads (10 per class), plus the trained model's own samples carrying
    wrong labels: if the score used a fragment's own samples, the counts below would differ."""
    from snp_ray.packing.planner import FewShotPool

    raw, labels = synthetic.shapes(10, seed=11)
    own_raw, _ = synthetic.shapes(4, seed=12)                    # 12 images
    own_labels = np.zeros(len(own_raw), dtype=np.int64)          # all claim class 0
    return FewShotPool(np.concatenate([raw, own_raw]), np.concatenate([labels, own_labels]),
                       np.array(["dev-a"] * len(raw) + ["trained"] * len(own_raw)),
                       np.arange(len(raw) + len(own_raw)))


def test_best_picks_the_trained_fragment_over_broken_ones(candidates):
    from snp_ray.packing.planner import PlanConfig, ScoreCache, choose

    cache = ScoreCache(_pool())
    frags = [candidates["untrained"], candidates["inverted"], candidates["trained"]]
    chosen, rows = choose(frags, [0, 1, 2], cache, PlanConfig("best"))
    assert [f.spec.source_model for f in chosen] == ["trained"]
    score = {r["model"]: r["score"] for r in rows}
    assert score["trained"] >= 0.95
    assert score["untrained"] <= score["trained"] - 0.1
    assert score["inverted"] < 0.5                  # broken: it ranks the other classes higher
    assert [r["model"] for r in rows][-1] == "inverted"
    own = {r["model"]: (r["n_pos"], r["n_neg"], r["in_sample"]) for r in rows}
    assert own["trained"] == (10, 20, False)       # its own 12 (mislabelled) uploads left out
    assert own["untrained"] == (22, 20, False)     # another model's view: they count

    top2, _ = choose(frags, [0, 1, 2], cache, PlanConfig("top-2"))
    assert [f.spec.source_model for f in top2] == ["trained", "untrained"]
    everything, _ = choose(frags, [0, 1, 2], cache, PlanConfig("all"))
    assert len(everything) == 3

    # the control: one holder drawn whatever the scores, the same for the same (seed, request),
    # and over seeds every holder, the broken ones included
    drawn = {s: [f.spec.source_model for f in choose(frags, [0, 1, 2], cache, PlanConfig("random"),
                                                     seed=s)[0]] for s in range(30)}
    assert all(len(d) == 1 for d in drawn.values())
    assert drawn[7] == [f.spec.source_model for f in
                        choose(frags, [0, 1, 2], cache, PlanConfig("random"), seed=7)[0]]
    assert {d[0] for d in drawn.values()} == {"trained", "untrained", "inverted"}


def test_unknown_plan_names_are_typed_errors():
    from snp_ray.errors import UnknownNameError
    from snp_ray.packing.planner import PlanConfig

    assert PlanConfig("top-3").m == 3 and PlanConfig("best").m == 1 and PlanConfig("all").m is None
    assert PlanConfig("random").m == 1
    for bad in ("top-0", "top-", "worst", "top-2x"):
        with pytest.raises(UnknownNameError, match="plan"):
            PlanConfig(bad)
    with pytest.raises(UnknownNameError, match="sample source"):
        PlanConfig("best", samples="test")


def test_market_shards_are_disjoint_and_cover_the_held_classes(real_data):
    from snp_ray.data.tables import read_split
    from snp_ray.market.tasks import get_task, shard_rows

    labels = read_split("cifar10", "train").labels
    for name, n in (("C10-M12", 12), ("C10-M50", 50)):
        task = get_task(name)
        assert task.num_models == n and all(len(c) == 4 for c in task.model_classes)
        shards = [shard_rows(task, i, labels) for i in range(n)]
        allrows = np.concatenate(shards)
        assert len(allrows) == len(set(allrows.tolist()))               # no image seen twice
        for i, rows in enumerate(shards):
            assert set(np.unique(labels[rows]).tolist()) == set(task.model_classes[i])
        held = np.flatnonzero(np.isin(labels, task.classes))
        assert np.array_equal(np.sort(allrows), held)                    # nothing wasted


@pytest.fixture(scope="module")
def market12(ray_cluster, real_data, tmp_path_factory):
    """The market12 preset's market, trained once; the holders of classes 0, 1 and 9 sliced."""
    from snp_ray.engine.presets import get_preset
    from snp_ray.market import Market, build_market
    from snp_ray.slicing import slice_preset
    from snp_ray.store import slice_missing

    preset = get_preset("market12")
    root = tmp_path_factory.mktemp("market12")
    specs = build_market(preset.market, root, progress=False)
    market = Market(root)
    ids = sorted({s.id for c in (0, 1, 9) for s in market.holders(c)})
    list(slice_missing(market, preset.k, slice_preset(preset.slice_preset), 0, ids))
    return preset, root, specs


def test_market12_models_train_and_draw_few_shots_on_their_own_shard(market12):
    from snp_ray.data.tables import read_split
    from snp_ray.market import Market
    from snp_ray.market.tasks import get_task, shard_rows

    preset, root, specs = market12
    task = get_task(preset.market.task)
    labels = read_split("cifar10", "train").labels
    market = Market(root)
    assert len(specs) == 12
    for s in specs:
        shard = set(shard_rows(task, s.index, labels).tolist())
        rows = market.fewshot(s.id, preset.k).row_ids.tolist()
        assert len(rows) == 4 * preset.k and set(rows) <= shard
        assert s.metrics["train_rows"] == pytest.approx(0.25 * len(shard), abs=4)


def test_snp_pack_plan_lists_choices_and_never_reads_the_test_split(market12, monkeypatch, capsys):
    from snp_ray.cli import main
    from snp_ray.data.tables import ENV_FENCE
    from snp_ray.errors import TestSplitAccessError
    from snp_ray.market import Market
    from snp_ray.packing import PackConfig
    from snp_ray.packing.planner import PlanConfig, pack_planned, plan_request
    from snp_ray.slicing import slice_preset

    preset, root, _ = market12
    market, k, scfg = Market(root), preset.k, slice_preset(preset.slice_preset)
    holders = {c: len(market.holders(c)) for c in (0, 1, 9)}
    assert holders[1] == 1 and holders[0] >= 2 and holders[9] >= 2
    monkeypatch.setenv(ENV_FENCE, "1")              # planning and packing: test split fenced off
    plan = plan_request(market, [0, 1, 9], k, scfg, PlanConfig("best"))
    packed = pack_planned(market, plan, k, PackConfig(epochs=2, hidden=8))
    assert [f.spec.class_id for f in packed.fragments] == [0, 1, 9]
    assert packed.spec.metrics["train_samples"] == 3 * k               # exactly k per class
    everyone = plan_request(market, [0, 1, 9], k, scfg, PlanConfig("all"))
    assert len(everyone.fragments()) == sum(holders.values())
    with pytest.raises(TestSplitAccessError):       # the fence is real
        from snp_ray.evaluation.packs import pack_accuracy
        pack_accuracy(packed)
    monkeypatch.delenv(ENV_FENCE)

    argv = ["pack", "--store", str(root), "--classes", "0,1,9", "--k", str(k), "--preset",
            preset.slice_preset, "--plan", "top-2", "--json"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    per_class = {c["class_id"]: c for c in res["plan"]["classes"]}
    assert res["plan"]["policy"] == "top-2"
    assert [len(per_class[c]["chosen"]) for c in (0, 1, 9)] == [2, 1, 2]
    for c, entry in per_class.items():
        assert len(entry["candidates"]) == holders[c]
        scores = [r["score"] for r in entry["candidates"]]
        assert scores == sorted(scores, reverse=True)               # why: ranked by score
        assert entry["chosen"] == [r["model"] for r in entry["candidates"] if r["chosen"]]
    assert len(res["fragments"]) == 5 and 0.0 <= res["test_accuracy"] <= 1.0
    assert main(argv[:-3] + ["--plan", "worst", "--json"]) == 2
    err = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert err["type"] == "UnknownNameError"
