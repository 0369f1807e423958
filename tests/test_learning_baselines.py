"""Learning canaries for the baselines (issue 12): each baseline, run with a small but real
config on the easy shapes task of ``synthetic.py``, must score clearly above chance on held-out
samples (drawn from the same generator with a seed no fitting ever sees), and beat a contrast in
which the mechanism it relies on is missing: the same run from untrained source models, or with
its training switched off. A no-op optimizer step or a flipped loss sign turns them red.

The market here: two VGG11 x 1/8 source models trained on overlapping subsets of the three
shapes (horizontal + vertical, vertical + diagonal); the target set is all three shapes, so every
baseline has to combine what the two models know. The few-shot sets of both models are drawn from
one pool (row id = pool index), so the shared class is deduplicated like a market's rows are.
The tests call each baseline's core on a ``TaskData`` (``concat_head``, ``finetune_model``,
``graft_model``/``graft_and_combine``, ``distil``): the ``run_*`` wrappers only add the market.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import synthetic
from snp_ray.baselines import CAMKDConfig, EnsembleConfig, FinetuneConfig, NetGraftConfig, TaskData
from snp_ray.baselines.camkd import distil, failure_rule
from snp_ray.baselines.common import BaselineResult, SingleModel, binomial_sf
from snp_ray.baselines.ensemble import concat_head
from snp_ray.baselines.finetune import finetune_model
from snp_ray.baselines.netgraft import graft_and_combine, graft_model
from snp_ray.data.fewshot import FewShotManifest, FewShotSet
from snp_ray.market.modelstore import ModelSpec
from snp_ray.models import Classifier, build_model
from snp_ray.packing.packer import PackSamples

ARCH, WIDTH = "vgg11", 0.125
SOURCES = {"hv": [0, 1], "vd": [1, 2]}      # model id -> the global classes (shapes) it holds
TARGET = [0, 1, 2]
CHANCE = 1 / 3                              # balanced target samples, balanced held-out set
HELD_OUT_SEED = 999                         # no fitting below draws from this seed
FEWSHOT_SEED = 100


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ the market
def _source_data(classes: list[int], n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    return synthetic.data(n_per_class, seed, classes)


def _train_source(classes: list[int], seed: int) -> Classifier:
    return synthetic.trained_model(ARCH, WIDTH, seed, classes)


def _untrained_source(classes: list[int], seed: int) -> Classifier:
    return synthetic.untrained_model(ARCH, WIDTH, seed, classes)


def _student_accuracy(student: Classifier, classes: list[int]) -> float:
    """A grafted student's accuracy on held-out shapes of its teacher's own classes."""
    raw, y = _source_data(classes, 100, HELD_OUT_SEED - 1)
    with torch.no_grad():
        return float((student(synthetic.SPEC.encode(raw)).argmax(1).numpy() == y).mean())


@pytest.fixture(scope="module")
def trained():
    models = [_train_source(c, seed=i) for i, c in enumerate(SOURCES.values())]
    for m, classes in zip(models, SOURCES.values()):      # the premise: the sources are good
        raw, y = _source_data(classes, 100, HELD_OUT_SEED)
        with torch.no_grad():
            assert float((m(synthetic.SPEC.encode(raw)).argmax(1).numpy() == y).mean()) >= 0.95
    return models


@pytest.fixture(scope="module")
def untrained():
    return [_untrained_source(c, seed=i) for i, c in enumerate(SOURCES.values())]


def _fewshot(classes: list[int], k: int, seed: int) -> FewShotSet:
    raw, labels = synthetic.shapes(k, seed)          # one pool per seed; row id = pool index
    rows = [np.flatnonzero(labels == c).tolist() for c in classes]
    order = np.concatenate(rows)
    return FewShotSet(FewShotManifest(dataset="synthetic", k=k, seed=seed, classes=list(classes),
                                      row_ids=rows), raw[order], labels[order],
                      [f"shape{c}" for c in classes])


def _task(models: list[Classifier], k: int) -> TaskData:
    ids = list(SOURCES)
    specs = [ModelSpec(id=mid, task="synthetic", index=i, arch=ARCH, width=WIDTH, dataset="synthetic",
                       classes=list(c), class_names=[f"shape{x}" for x in c],
                       input=synthetic.SPEC.to_dict()) for i, (mid, c) in enumerate(SOURCES.items())]
    sets = [_fewshot(c, k, FEWSHOT_SEED) for c in SOURCES.values()]
    samples = PackSamples.from_fewshot(sets, TARGET)
    assert np.bincount(samples.labels).tolist() == [k] * 3          # shared class deduplicated
    return TaskData(ids, models, specs, sets, samples, TARGET)


def _held_out(model) -> float:
    """Accuracy on 300 held-out shapes (100 per class) of whatever predicts global class ids."""
    raw, labels = synthetic.shapes(100, HELD_OUT_SEED)
    return float((model.predict(raw) == labels).mean())


# ------------------------------------------------------------------------------ Ensemble
def test_ensemble_learns_a_head_over_the_sources_features(trained, untrained):
    cfg = EnsembleConfig(epochs=50, views=1)
    good, _ = concat_head(_task(trained, 2), [m.features for m in trained], "ensemble", cfg)
    rand, _ = concat_head(_task(untrained, 2), [m.features for m in untrained], "ensemble", cfg)
    acc, acc_rand = _held_out(good), _held_out(rand)
    print(f"ensemble held-out: trained sources {acc:.3f}, untrained sources {acc_rand:.3f}")
    assert acc >= CHANCE + 0.55
    assert acc >= acc_rand + 0.15           # it uses what the sources learned


# ------------------------------------------------------------------------------ Finetune
def test_finetune_learns_the_target_classes(trained):
    data = _task(trained, 5)
    # no augmentation: its horizontal flip turns the diagonal bar into the other diagonal, a
    # shape of no class, and makes this tiny run noisy
    cfg = FinetuneConfig(epochs=15, batch_size=8, augment=False)
    off = cfg.replace(lr=0.0, head_lr=1e-9)     # training switched off: the run's starting point
    accs, accs_off = [], []
    for model, spec in zip(data.models, data.specs):
        accs.append(_held_out(_single(model, spec, data, cfg)))
        accs_off.append(_held_out(_single(model, spec, data, off)))
        print(f"finetune {spec.id} held-out: tuned {accs[-1]:.3f}, training off {accs_off[-1]:.3f}")
    assert min(accs) >= CHANCE + 0.45
    # a fresh random head on the source's features scores chance on average, by luck per model
    assert np.mean(accs) >= np.mean(accs_off) + 0.3


def _single(model, spec, data, cfg):
    tuned, _ = finetune_model(model, spec.input_spec, data.samples.raw, data.y, len(TARGET), cfg)
    return SingleModel(TARGET, tuned, spec.input_spec)


# ------------------------------------------------------------------------------ NetGraft
# batch 4: 10 images per model give 3 steps per epoch; with fewer steps the students' BatchNorm
# running statistics are not settled yet and the eval-mode student can disagree with its teacher
NG = NetGraftConfig(block_epochs=10, net_epochs=10, views=1, batch_size=4, head_epochs=50)


def test_netgraft_students_learn_their_teachers(trained):
    teacher, classes, raw = trained[0], SOURCES["hv"], _task(trained, 5).sets[0].raw
    grafted = graft_model(teacher, synthetic.SPEC, raw, NG)
    bare = graft_model(teacher, synthetic.SPEC, raw, NG.replace(block_epochs=0, net_epochs=0))
    acc, acc_bare = _student_accuracy(grafted.student, classes), _student_accuracy(bare.student, classes)
    print(f"netgraft student held-out on its teacher's classes: grafted {acc:.3f}, ungrafted {acc_bare:.3f}")
    assert acc >= 0.5 + 0.35 and acc >= acc_bare + 0.3       # two classes: chance 0.5


def test_netgraft_learns_the_target_classes(trained, untrained):
    r = graft_and_combine(_task(trained, 5), NG)
    r_rand = graft_and_combine(_task(untrained, 5), NG)
    acc, acc_rand = _held_out(r), _held_out(r_rand)
    print(f"netgraft held-out: trained sources {acc:.3f}, untrained sources {acc_rand:.3f}")
    assert r.ok and acc >= CHANCE + 0.5
    assert acc >= acc_rand + 0.15


# ------------------------------------------------------------------------------ CA-MKD
# views 1 (the flip, as above) and beta 5: with the default beta 50 this tiny SGD run diverges
KD = CAMKDConfig(epochs=30, views=1, batch_size=16, beta=5.0)
# each loss term on its own must teach the student too: a flipped sign in one of them is masked
# by the others in the full recipe (the KD term, scaled by T^2, dominates the CE term)
RECIPES = {"full": KD, "ce only": KD.replace(alpha=0.0, beta=0.0), "kd only": KD.replace(gamma=0.0, beta=0.0)}


def _rule_of(r: BaselineResult, cfg: CAMKDConfig) -> str:
    m = r.metrics
    return failure_rule(int(m["cv_correct"]), int(m["cv_samples"]), m["chance"], int(m["cv_folds"]), cfg)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_camkd_learns_the_target_classes(trained, recipe):
    data, cfg = _task(trained, 10), RECIPES[recipe]
    r = distil(data, cfg)
    acc = _held_out(r) if r.ok else float("nan")
    print(f"ca-mkd {recipe}: {r.status} {r.reason} cv {r.metrics.get('cv_accuracy')} held-out {acc:.3f}")
    assert r.ok, r.reason
    assert acc >= CHANCE + 0.45
    assert _rule_of(r, cfg) == ""
    if recipe == "full":
        # switched off, the student never moves from its init: the run fails, by the rule on its
        # own cross-validation numbers
        off = cfg.replace(lr=1e-9, epochs=1)
        r_off = distil(data, off)
        print(f"ca-mkd training off: {r_off.status}, cv {r_off.metrics.get('cv_accuracy')}")
        assert r_off.status == "failed" and r_off.reason == _rule_of(r_off, off)
        assert r_off.metrics["cv_accuracy"] <= r.metrics["cv_accuracy"] - 0.3


def test_camkd_failure_rule_alone():
    cfg = CAMKDConfig()                               # cv_margin 0.1, cv_alpha 0.05
    # 12 held-out predictions, 3 balanced classes: chance 1/3.
    # 9/12: accuracy 0.75 >= 0.433, P[Bin(12, 1/3) >= 9] = (220*8 + 66*4 + 12*2 + 1) / 3^12
    assert binomial_sf(9, 12, 1 / 3) == pytest.approx(2049 / 531441, rel=1e-12)
    assert failure_rule(9, 12, 1 / 3, 3, cfg) == ""
    # 6/12: accuracy 0.5 clears the margin, but P[Bin(12, 1/3) >= 6] = 94449 / 3^12 = 0.178 > 0.05
    assert binomial_sf(6, 12, 1 / 3) == pytest.approx(94449 / 531441, rel=1e-12)
    assert failure_rule(6, 12, 1 / 3, 3, cfg) == (
        "3-fold cross-validated few-shot accuracy 0.500 (6/12) is not clearly above chance 0.333 "
        "(needs >= chance + 0.1 and binomial p <= 0.05, got p = 0.178): too few samples")
    # 125/300: p = 0.00156 would pass, but accuracy 0.417 < chance + 0.1 = 0.433
    assert binomial_sf(125, 300, 1 / 3) == pytest.approx(0.0015638558939339, rel=1e-9)
    assert failure_rule(125, 300, 1 / 3, 5, cfg) == (
        "5-fold cross-validated few-shot accuracy 0.417 (125/300) is not clearly above chance 0.333 "
        "(needs >= chance + 0.1 and binomial p <= 0.05, got p = 0.00156): too few samples")
    # the same 6/12 passes under a looser test: both parts of the rule are read from the config
    assert failure_rule(6, 12, 1 / 3, 3, cfg.replace(cv_alpha=0.2)) == ""
