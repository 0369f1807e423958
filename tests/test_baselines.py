"""Baselines: sizes, predictions in the target set, market untouched, CA-MKD's label mapping and
failure test, NetGraft's thin students, text models, the registry."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from snp_ray.baselines import (BASELINES, CAMKDConfig, EnsembleConfig, FinetuneConfig,
                               NetGraftConfig, TaskData, run_baseline)
from snp_ray.baselines.camkd import (distil, failure_rule, mapped_kd, stratified_folds, teacher_ce,
                                     teacher_map, teacher_weights)
from snp_ray.baselines.common import batches, binomial_sf
from snp_ray.baselines.netgraft import graft_model
from snp_ray.errors import ConfigError, DataError, UnknownNameError
from snp_ray.market import Market, ModelStore
from snp_ray.models import count_params
from snp_ray.packing.packer import PackSamples

TARGET = [0, 3, 6]                        # one class from each T1 model
FAST_ENS = EnsembleConfig(epochs=20, views=2)
FAST_FT = FinetuneConfig(epochs=3)
FAST_KD = CAMKDConfig(epochs=12, views=2)
FAST_NG = NetGraftConfig(block_epochs=2, net_epochs=2, views=2, head_epochs=20)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def t1(smoke_market):
    _, root, specs = smoke_market
    return Market(root), [s.id for s in specs]


@pytest.fixture(scope="module")
def fewshot_raw(t1):
    market, ids = t1
    return PackSamples.from_fewshot([market.fewshot(i, 5) for i in ids], TARGET).raw


def _synthetic(t1, raw: np.ndarray, labels: np.ndarray) -> TaskData:
    market, ids = t1
    return TaskData(ids, [market.model(i)[0] for i in ids], [market.spec(i) for i in ids], [],
                    PackSamples("cifar10", raw, labels, {}), TARGET)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------ ensemble
@pytest.mark.parametrize("hidden", [0, 16])
def test_ensemble_params_are_all_extractors_plus_head(t1, fewshot_raw, hidden):
    market, ids = t1
    [r] = run_baseline("ensemble", market, ids, TARGET, 5, config=FAST_ENS.replace(hidden=hidden))
    models = [market.model(i)[0] for i in ids]
    dim = sum(m.feature_dim for m in models)
    head = dim * 3 + 3 if hidden == 0 else dim * hidden + hidden + hidden * 3 + 3
    assert r.ok and r.name == "ensemble"
    assert r.params_deployable == sum(count_params(m.features) for m in models) + head
    assert r.params_training == r.params_deployable
    pred = r.predict(fewshot_raw)
    assert pred.shape == (len(fewshot_raw),) and set(pred) <= set(TARGET)
    assert r.metrics["train_samples"] == 15 and r.train_seconds > 0


# ------------------------------------------------------------------------------ finetune
def test_finetune_one_result_per_model_and_market_untouched(t1, fewshot_raw):
    market, ids = t1
    before = {i: _state(market.model(i)[0]) for i in ids}
    results = run_baseline("finetune", market, ids, TARGET, 5, config=FAST_FT)
    assert [r.source_model for r in results] == ids
    for r, i in zip(results, ids):
        model = market.model(i)[0]
        assert r.ok and set(r.predict(fewshot_raw)) <= set(TARGET)
        assert r.params_deployable == count_params(model.features) + model.feature_dim * 3 + 3
        tuned = r.model.model
        assert tuned is not model and tuned.head.out_features == 3
        # the tuned copy did change; the market's model (in memory and on disk) did not
        assert any(not torch.equal(a, b) for a, b in zip(tuned.features.state_dict().values(),
                                                         model.features.state_dict().values()))
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, before[i][k], rtol=0, atol=0)
        disk = ModelStore(market.root).load(i)[0].state_dict()
        for k, v in disk.items():
            torch.testing.assert_close(v, before[i][k], rtol=0, atol=0)


def test_finetune_uses_each_models_own_input_spec(t1, fewshot_raw):
    market, ids = t1
    results = run_baseline("finetune", market, ids[:2], [0, 3], 5, config=FAST_FT)
    for r, i in zip(results, ids):
        assert r.model.input_spec == market.spec(i).input_spec


# ------------------------------------------------------------------------------ CA-MKD
def test_camkd_label_mapping_with_hand_made_logits():
    # teacher holds global classes [0, 1, 2]; the target set is [1, 5, 2]
    m = teacher_map([0, 1, 2], [1, 5, 2])
    assert (m.t_sel, m.s_sel, m.t_rest, m.s_rest, m.local_of_target) == ([1, 2], [0, 2], [0], [1], [1, -1, 2])
    z_t = torch.tensor([[1.0, 2.0, 0.5]])
    z_s = torch.tensor([[0.3, -1.0, 0.8]])
    # restrict: both renormalised over target classes 1 and 2 only
    p = torch.softmax(torch.tensor([2.0, 0.5]), 0)
    q = torch.softmax(torch.tensor([0.3, 0.8]), 0)
    want = float((p * (p.log() - q.log())).sum())
    assert math.isclose(float(mapped_kd(z_t, z_s, m, 1.0, "restrict")), want, rel_tol=1e-5)
    # equal logits on the shared classes: no restricted KD, whatever the rest
    same = torch.tensor([[2.0, 7.0, 0.5]])
    assert float(mapped_kd(z_t, same, m, 1.0, "restrict")) == pytest.approx(0.0, abs=1e-6)
    # rest: teacher's non-target class 0 against the student's non-held target class 5
    pt = torch.softmax(z_t[0], 0)
    ps = torch.softmax(z_s[0], 0)
    p3 = torch.stack([pt[1], pt[2], pt[0]])
    q3 = torch.stack([ps[0], ps[2], ps[1]])
    want = float((p3 * (p3.log() - q3.log())).sum())
    assert math.isclose(float(mapped_kd(z_t, z_s, m, 1.0, "rest")), want, rel_tol=1e-5)
    # temperature scales by T^2 on softened distributions
    t = 4.0
    p3 = torch.softmax(z_t[0] / t, 0)[[1, 2, 0]]
    qs = torch.softmax(z_s[0] / t, 0)
    q3 = torch.stack([qs[0], qs[2], qs[1]])
    assert math.isclose(float(mapped_kd(z_t, z_s, m, t, "rest")),
                        float((p3 * (p3.log() - q3.log())).sum()) * t * t, rel_tol=1e-5)
    # a teacher holding a single target class: restricted KD is vacuous, rest is not
    single = teacher_map([0, 1, 2], [1, 5, 7])
    assert float(mapped_kd(z_t, z_s, single, 1.0, "restrict")) == pytest.approx(0.0, abs=1e-7)
    assert float(mapped_kd(z_t, z_s, single, 1.0, "rest")) > 0.01
    # a teacher holding none of the targets contributes nothing
    assert float(mapped_kd(z_t, z_s, teacher_map([0, 1, 2], [5, 6]), 1.0)) == 0.0
    # CE w.r.t. the true target label: finite for held classes only
    ce = teacher_ce(torch.cat([z_t, z_t]), m, torch.tensor([0, 1]))
    assert math.isclose(float(ce[0]), float(-torch.log_softmax(z_t[0], 0)[1]), rel_tol=1e-6)
    assert math.isinf(float(ce[1]))


def test_camkd_teacher_weights():
    inf = float("inf")
    ce = torch.tensor([[0.5, 0.3, inf], [inf, 1.0, inf], [2.0, inf, 0.7]])   # (K=3, B=3)
    w = teacher_weights(ce, "camkd")
    s = torch.softmax(torch.tensor([0.5, 2.0]), 0)
    torch.testing.assert_close(w[:, 0], torch.stack([1 - s[0], torch.tensor(0.0), 1 - s[1]]))
    assert float(w[0, 0]) > float(w[2, 0])                  # the more confident teacher counts more
    torch.testing.assert_close(w[:, 2], torch.tensor([0.0, 0.0, 1.0]))     # a lone holder: 1
    torch.testing.assert_close(w.sum(0), torch.ones(3))
    ws = teacher_weights(ce, "softmax")
    torch.testing.assert_close(ws[[0, 2], 0], torch.softmax(torch.tensor([-0.5, -2.0]), 0))
    assert float(ws[1, 0]) == 0.0


def test_camkd_fails_on_impossible_data_and_runs_on_easy_data(t1):
    rng = np.random.default_rng(0)
    labels = np.repeat(TARGET, 8)
    # easy: each class is a brightness level, learnable from a handful of images
    easy = np.concatenate([np.clip(rng.normal(b, 15, (8, 32, 32, 3)), 0, 255)
                           for b in (30, 128, 230)]).astype(np.uint8)
    ok = distil(_synthetic(t1, easy, labels), FAST_KD)
    assert ok.ok, ok.reason
    assert ok.metrics["cv_accuracy"] >= 0.6 and ok.metrics["cv_pvalue"] < 0.05
    assert set(ok.predict(easy)) <= set(TARGET)
    # impossible: labels carry no information about the (noise) images
    noise = rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    bad = distil(_synthetic(t1, noise, rng.permutation(labels)), FAST_KD)
    assert bad.status == "failed" and "chance" in bad.reason
    assert bad.params_deployable == ok.params_deployable > 0      # sizes are still reported
    with pytest.raises(DataError, match="failed"):
        bad.predict(noise)
    # one sample per class: nothing to validate on, failed before any training
    one = distil(_synthetic(t1, easy[::8], np.array(TARGET)), FAST_KD)
    assert one.status == "failed" and "fewer than 2" in one.reason


def test_camkd_on_the_market_and_authors_batch_rule(t1, fewshot_raw):
    market, ids = t1
    [r] = run_baseline("ca-mkd", market, ids, TARGET, 5, config=FAST_KD.replace(min_samples=64))
    assert r.status == "failed" and "15 few-shot samples" in r.reason
    [r] = run_baseline("ca-mkd", market, ids, TARGET, 5, config=FAST_KD)
    # the status is what the failure rule says on the run's own cross-validation numbers
    m = r.metrics
    correct = int(m["cv_correct"])
    assert (m["cv_samples"], m["chance"], m["cv_folds"]) == (15, pytest.approx(1 / 3), 3)
    assert m["cv_accuracy"] == correct / 15 and m["cv_pvalue"] == binomial_sf(correct, 15, m["chance"])
    rule = failure_rule(correct, 15, m["chance"], 3, FAST_KD)
    assert r.status == ("failed" if rule else "ok") and r.reason == rule
    student = count_params(market.model(ids[0])[0].features) + market.model(ids[0])[0].feature_dim * 3 + 3
    assert r.params_deployable == student
    assert r.params_training > r.params_deployable + sum(count_params(market.model(i)[0]) for i in ids) - 1
    if r.ok:
        assert set(r.predict(fewshot_raw)) <= set(TARGET)


def test_batches_cover_every_row_once():
    gen = torch.Generator().manual_seed(0)
    # a last batch of one joins the one before it (BatchNorm cannot train on one sample)
    for n, size, want in [(9, 8, [9]), (9, 4, [4, 5]), (13, 4, [4, 4, 5]), (15, 4, [4, 4, 4, 3]),
                          (1, 4, [1])]:
        out = batches(n, size, gen)
        assert [len(b) for b in out] == want and sorted(torch.cat(out).tolist()) == list(range(n))


def test_stratified_folds_and_binomial_tail():
    folds = stratified_folds(np.repeat([0, 1, 2], 5), 3, seed=0)
    for c in range(3):
        assert sorted(np.bincount(folds[c * 5:(c + 1) * 5], minlength=3)) == [1, 2, 2]
    assert binomial_sf(0, 10, 0.3) == 1.0
    assert math.isclose(binomial_sf(10, 10, 0.5), 0.5 ** 10)
    assert math.isclose(binomial_sf(2, 3, 0.5), 0.5)


# ------------------------------------------------------------------------------ NetGraft
def test_netgraft_student_is_thinner_exact_and_leaves_teacher_alone(t1):
    market, ids = t1
    teacher, spec = market.model(ids[0])
    before = _state(teacher)
    fs = market.fewshot(ids[0], 5)
    out = graft_model(teacher, spec.input_spec, fs.raw, FAST_NG)
    assert count_params(out.student) < count_params(teacher)
    assert out.student.feature_dim == round(teacher.feature_dim * 0.5)
    # the copied prefix is the teacher's; the fused adapters give the grafted network's output
    prefix = out.graft.prefix
    for (k, v), (_, w) in zip(prefix.state_dict().items(), out.student.features[0].state_dict().items()):
        torch.testing.assert_close(v, w)
    out.graft.eval()
    x = spec.input_spec.encode(fs.raw)
    with torch.no_grad():
        grafted = out.graft(prefix(x), set(range(FAST_NG.graft_blocks + 1)))
        torch.testing.assert_close(out.student(x), grafted, rtol=1e-4, atol=1e-4)
        teacher_logits = out.graft(prefix(x))
        torch.testing.assert_close(teacher_logits, teacher(x), rtol=1e-5, atol=1e-5)
        # agreement: the share of its k-shot images where student and teacher predict alike
        agree = (out.student(x).argmax(1) == teacher(x).argmax(1)).float().mean().item()
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert out.agreement == pytest.approx(agree, abs=1e-12) and math.isfinite(out.loss)


def test_netgraft_combined_model(t1, fewshot_raw):
    market, ids = t1
    [r] = run_baseline("netgraft", market, ids, TARGET, 5, config=FAST_NG)
    ensemble = sum(count_params(market.model(i)[0].features) for i in ids)
    assert r.ok and r.params_deployable < ensemble
    assert r.params_training > r.params_deployable
    assert set(r.predict(fewshot_raw)) <= set(TARGET)
    with pytest.raises(ConfigError, match="graft_blocks"):
        run_baseline("netgraft", market, ids, TARGET, 5, config=FAST_NG.replace(graft_blocks=5))


# ------------------------------------------------------------------------------ text
def test_text_ensemble_and_finetune_and_image_only_refusals(text_market):
    root, specs, _ = text_market
    market = Market(root)
    ids = [s.id for s in specs]
    classes = [0, 1, 2, 3, 4]
    texts = ["a gorgeous , witty , seductive movie .", "dull and lifeless", "it is a film"]
    [ens] = run_baseline("ensemble", market, ids, classes, 5, config=FAST_ENS)
    assert ens.ok and set(ens.predict(texts)) <= set(classes)
    models = [market.model(i)[0] for i in ids]
    assert ens.params_deployable == sum(count_params(m.features) for m in models) + \
        sum(m.feature_dim for m in models) * 5 + 5
    tuned = run_baseline("finetune", market, ids, classes, 5, config=FAST_FT)
    assert [r.source_model for r in tuned] == ids
    for r, i in zip(tuned, ids):
        assert r.ok and set(r.predict(texts)) <= set(classes)
        assert r.model.input_spec.vocab == market.spec(i).input_spec.vocab
    for name in ("ca-mkd", "netgraft"):
        with pytest.raises(ConfigError, match="image models only"):
            run_baseline(name, market, ids, classes, 5)


# ------------------------------------------------------------------------------ registry
def test_registry_and_request_checks(t1):
    market, ids = t1
    assert set(BASELINES) == {"ensemble", "finetune", "ca-mkd", "netgraft"}
    with pytest.raises(UnknownNameError):
        run_baseline("bagging", market, ids, TARGET, 5)
    with pytest.raises(ConfigError, match="FinetuneConfig"):
        run_baseline("finetune", market, ids, TARGET, 5, config=FAST_ENS)
    with pytest.raises(ConfigError, match="unknown keys"):
        run_baseline("ensemble", market, ids, TARGET, 5, config={"epochz": 3})
    with pytest.raises(ConfigError, match="epochs"):
        EnsembleConfig(epochs=0)
    with pytest.raises(ConfigError, match="weighting"):
        CAMKDConfig(weighting="mean")
    with pytest.raises(ConfigError, match="held by none"):
        run_baseline("ensemble", market, ids[:1], TARGET, 5)
    with pytest.raises(ConfigError, match="duplicate"):
        run_baseline("ensemble", market, ids, [0, 0, 3], 5)
    [r] = run_baseline("ensemble", market, ids, TARGET, 5, config={"epochs": 2, "views": 1})
    assert r.ok and r.config["epochs"] == 2 and r.summary()["status"] == "ok"
