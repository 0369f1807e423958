"""Learning canaries: each test goes red when one learning mechanism of slicing or packing breaks
(an optimiser step turned into a no-op, a loss term's sign flipped, a penalty that does nothing).

They run on the easy shape task of ``tests/synthetic.py``: a VGG11 x 1/8 learns it to ~100 % in a
few seconds, while random features plus a few-shot head do clearly worse. The baselines' canaries
are in ``test_learning_baselines.py``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import synthetic
from conftest import as_fragment
from snp_ray.packing import PackConfig, Packer, PackSamples
from snp_ray.slicing import Slicer, slice_preset
from synthetic import K, pack_accuracy, probe_auc, slice_all

CHANCE = 1 / synthetic.CLASSES


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained():
    model = synthetic.trained_model()
    acc = synthetic.accuracy(model, 100, seed=2)
    assert acc >= 0.95, f"the synthetic task should be easy: held-out accuracy {acc:.3f}"
    return model


@pytest.fixture(scope="module")
def held_out():
    """Samples no fitting step ever sees (another seed of the same generator)."""
    return synthetic.shapes(60, seed=7)


@pytest.fixture(scope="module")
def sliced(trained):
    return slice_all(trained)


# ------------------------------------------------------------------------------------ slicing
def test_slicing_learns_a_class_detector_and_needs_a_trained_model(sliced, held_out):
    """The fragment's binary head separates its class on held-out samples; a fragment sliced the
    same way from an untrained model of the same architecture scores clearly lower."""
    raw, labels = held_out
    _, outs = sliced
    trained_auc = [probe_auc(o, raw, labels, c) for c, o in enumerate(outs)]
    _, random_outs = slice_all(synthetic.untrained_model())
    untrained_auc = [probe_auc(o, raw, labels, c) for c, o in enumerate(random_outs)]
    assert min(trained_auc) >= 0.95, trained_auc
    assert np.mean(untrained_auc) <= np.mean(trained_auc) - 0.1, (trained_auc, untrained_auc)


def test_fragments_are_smaller_than_the_source(sliced, trained):
    from snp_ray.models import count_params

    _, outs = sliced
    assert all(count_params(o.features) < count_params(trained.features) for o in outs)


@pytest.mark.parametrize("alpha", [1e-2, 0.0])
def test_ability_pooling_sparsifies_only_with_alpha(trained, alpha):
    """After pooling with alpha > 0 the trained layer's l2,1 norm on D_c drops below the
    original's; with alpha = 0 the consistency term alone keeps it where it was."""
    slicer = Slicer(trained, synthetic.SPEC, synthetic.fewshot(10), slice_preset("quick", alpha=alpha))
    y = (slicer.labels == 1).long()
    ratios = []
    for g in slicer.graph.groups[:4]:
        before, after = slicer.pooling_l21(g.id, y, torch.Generator().manual_seed(0))
        ratios.append(after / before)
    if alpha > 0:
        assert max(ratios) < 0.97 and np.mean(ratios) < 0.95, ratios
    else:
        assert min(ratios) > 0.98, ratios


def test_consistency_term_keeps_the_f_bar_network_close_to_the_original(trained):
    """gamma > 0 pulls M(x; f-) towards M(x); without it (or with its sign flipped) it drifts."""
    mse = {}
    for gamma in (1.0, 0.0):
        slicer = Slicer(trained, synthetic.SPEC, synthetic.fewshot(K), slice_preset("quick", gamma=gamma))
        mse[gamma] = slicer.slice_class(1).metrics["fewshot_consistency_mse"]
    assert mse[1.0] < 0.5 * mse[0.0], mse


def test_f_bar_takes_dropped_units_from_the_original_weights(trained):
    """Perturbing the ORIGINAL weights of dropped units changes f- and leaves f~ unchanged."""
    slicer = Slicer(trained, synthetic.SPEC, synthetic.fewshot(K), slice_preset("quick", mode="rate", beta=0.5))
    slicer.slice_class(1)
    _, kept, _ = slicer.last_slice
    x = slicer.x

    def forwards():
        return slicer.merged_features(x), slicer.repaired_features(x, all_units=True)

    bar0, tilde0 = forwards()
    gen = torch.Generator().manual_seed(0)
    touched = 0
    for gid, entries in slicer.tensors.items():
        dropped = torch.tensor(sorted(set(range(slicer.graph.group(gid).size)) - set(kept[gid].tolist())))
        for t in entries:
            if t.attr != "weight" or dropped.numel() == 0:
                continue
            rows = t.handler.unit_positions(t.module, t.attr, t.offset + dropped)
            w = slicer.orig[t.name]
            w.index_add_(t.handler.out_dim, rows,
                         torch.randn(w.index_select(t.handler.out_dim, rows).shape, generator=gen))
            touched += 1
    assert touched > 0
    bar1, tilde1 = forwards()
    assert float((bar1 - bar0).norm() / bar0.norm()) > 0.05
    assert torch.equal(tilde1, tilde0)


def test_repairs_change_the_fused_fragment(trained):
    """Fusing with the learned repairs gives another fragment than dropping the units outright,
    and only the repaired one equals the network slicing trained (f~ on the kept units)."""
    slicer = Slicer(trained, synthetic.SPEC, synthetic.fewshot(K), slice_preset("quick", mode="rate", beta=0.5))
    out = slicer.slice_class(1)
    ft, kept, repairs = slicer.last_slice
    assert all(float(m.abs().sum()) > 0 for _, _, m in repairs.values())
    plain = slicer.fused_features(ft, kept, {})           # the same cut, no repairs folded in
    x = slicer.x_cpu
    with torch.no_grad():
        fused, unrepaired, trained_net = out.features(x), plain(x), slicer.repaired_features(x)
    assert float((fused - trained_net).norm() / trained_net.norm()) < 1e-5
    assert float((unrepaired - fused).norm() / fused.norm()) > 0.05


# ------------------------------------------------------------------------------------ packing
@pytest.fixture(scope="module")
def fragments(sliced):
    slicer, outs = sliced
    return [as_fragment(o, slicer, "vgg11", 0.125, c, 0) for c, o in enumerate(outs)]


def test_packing_learns_and_a_frozen_pack_does_not(fragments, held_out):
    """Enc + head over frozen, separable fragment features reach >= 95 % on held-out samples;
    with the learning rate at 0 (nothing trains) the pack stays near chance."""
    learned = pack_accuracy(fragments, held_out)
    frozen = pack_accuracy(fragments, held_out, lr=0.0)
    assert learned >= 0.95, learned
    assert frozen <= CHANCE + 0.2, frozen


def _cv_accuracy(fragments, labels=None, **cfg) -> float:
    fs = synthetic.fewshot(K)
    samples = PackSamples("synthetic", fs.raw, fs.labels if labels is None else labels,
                          dict(enumerate(fs.class_names)))
    config = PackConfig(**{"epochs": 60, "hidden": 32, "augment_views": 2, **cfg})
    out = Packer(config).cross_validate(fragments, samples, list(range(synthetic.CLASSES)), 3)
    assert out["folds"] == 3 and out["samples"] == len(samples.labels)
    return out["accuracy"]


def test_cross_validated_estimate_learns_and_holds_its_folds_out(fragments):
    """The service's few-shot accuracy estimate (3-fold CV on the k shots): high for trained
    fragments, near chance when nothing trains (lr 0), and near chance with shuffled labels,
    where a fold that trained on its own held-out samples would memorise them."""
    fs = synthetic.fewshot(K)
    shuffled = np.random.default_rng(0).permutation(fs.labels)
    learned = _cv_accuracy(fragments)
    frozen = _cv_accuracy(fragments, lr=0.0)
    noise = _cv_accuracy(fragments, shuffled, epochs=300, hidden=256, augment_views=1, weight_decay=0.0)
    memorised = _pack_accuracy_on(fragments, fs.raw, shuffled)
    assert learned >= 0.9, learned
    assert frozen <= CHANCE + 0.25, frozen
    assert memorised >= 0.9, f"a pack can memorise the shuffled shots ({memorised:.2f})"
    assert noise <= CHANCE + 0.25, f"CV on shuffled labels should be near chance: {noise:.2f}"


def _pack_accuracy_on(fragments, raw, labels) -> float:
    """Training accuracy of a pack trained on (raw, labels) itself."""
    samples = PackSamples("synthetic", raw, labels, {c: str(c) for c in range(synthetic.CLASSES)})
    packed = Packer(PackConfig(epochs=300, hidden=256, augment_views=1, weight_decay=0.0)).pack(
        fragments, samples, list(range(synthetic.CLASSES)))
    return float((packed.predict(raw) == labels).mean())


def test_decoders_reconstruct_signed_features():
    """A decoder trained on the reconstruction term alone reproduces signed fragment features
    (a GRU's tanh states); a ReLU decoder could not get below the negative part's energy."""
    from torch import nn

    from snp_ray.packing.packer import reconstruction

    torch.manual_seed(0)
    h = torch.randn(64, 16)
    target = h[:, :6] @ torch.randn(6, 6) / 3                       # signed, a linear map of h away
    dec = nn.Linear(16, 6)
    opt = torch.optim.Adam(dec.parameters(), lr=0.05)
    seg, mine = torch.full((6, 1), 1 / 6), torch.ones(64, 1)
    nonneg = torch.tensor([bool((target >= 0).all())] * 6)
    for _ in range(300):
        loss = reconstruction(h, target, dec, seg, mine, nonneg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        loss = reconstruction(h, target, dec, seg, mine, nonneg)
    floor = float(target.clamp(max=0).pow(2).mean())               # the best a ReLU decoder can do
    assert float(loss) < 0.1 * floor, (float(loss), floor)
