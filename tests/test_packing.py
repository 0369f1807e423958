"""Packing: heterogeneous packs, exports, plug-and-play, shared classes, files, bad requests."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from snp_ray.data.specs import ImageSpec
from snp_ray.errors import ArtifactNotFoundError, ConfigError, DataError, IntegrityError
from snp_ray.market import Market
from snp_ray.packing import (PackConfig, PackedModel, Packer, PackSamples, export_onnx,
                             export_torchscript)
from snp_ray.packing.request import pack_request
from snp_ray.slicing import slice_preset
from conftest import make_fragment

FAST = PackConfig(epochs=5, hidden=16, augment_views=2)


@pytest.fixture(scope="module")
def hetero():
    """A VGG fragment and a ResNet fragment with different normalisations, plus their data."""
    a, fa = make_fragment("vgg11", 0, ImageSpec(mean=[0.5, 0.4, 0.3], std=[0.2, 0.2, 0.2]), 1)
    b, fb = make_fragment("resnet20", 4, ImageSpec(mean=[0.1, 0.1, 0.1], std=[0.5, 0.6, 0.7]), 2,
                      classes=(3, 4, 5))
    return [a, b], PackSamples.from_fewshot([fa, fb], [0, 4])


def test_heterogeneous_pack_uses_each_fragments_own_input_spec(hetero):
    frags, samples = hetero
    packed = Packer(FAST).pack(frags, samples, [0, 4])
    xs = packed.encode(samples.raw)
    assert not torch.allclose(xs[0], xs[1])                     # two normalisations
    torch.testing.assert_close(xs[1], frags[1].encode(samples.raw))
    proba = packed.predict_proba(samples.raw)
    assert proba.shape == (len(samples.labels), 2)
    torch.testing.assert_close(proba.sum(1), torch.ones(len(samples.labels)))
    assert set(packed.predict(samples.raw)) <= {0, 4}
    assert packed.params_training() > packed.params_deployable() > 0


def test_features_are_cached_not_recomputed(hetero, monkeypatch):
    frags, samples = hetero
    calls = []
    for f in frags:
        orig = f.features.forward
        monkeypatch.setattr(f.features, "forward", lambda x, orig=orig: calls.append(1) or orig(x))
    Packer(PackConfig(epochs=20, hidden=8, augment_views=3)).pack(frags, samples, [0, 4])
    assert len(calls) == 2 * 3      # one pass per fragment and view, whatever the epochs


def test_torchscript_and_onnx_exports_match(hetero, tmp_path):
    import onnxruntime as ort

    frags, samples = hetero
    packed = Packer(FAST).pack(frags, samples, [0, 4])
    x = samples.raw[:4]
    ref = packed(*packed.encode(x))
    ts = torch.jit.load(str(export_torchscript(packed, tmp_path / "p.pt")))
    torch.testing.assert_close(ts(torch.as_tensor(x)), ref)
    sess = ort.InferenceSession(str(export_onnx(packed, tmp_path / "p.onnx")))
    np.testing.assert_allclose(sess.run(None, {"images": x})[0], ref.numpy(), rtol=1e-4, atol=1e-5)


def test_save_load_bit_exact_and_tamper(hetero, tmp_path):
    frags, samples = hetero
    packed = Packer(FAST).pack(frags, samples, [0, 4])
    packed.save(tmp_path / "pk")
    again = PackedModel.load(tmp_path / "pk")
    for (k, a), (_, b) in zip(packed.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    assert np.array_equal(again.predict(samples.raw), packed.predict(samples.raw))
    (tmp_path / "pk" / "pack.json").write_text((tmp_path / "pk" / "pack.json").read_text()
                                               .replace('"hidden": 16', '"hidden": 17'))
    with pytest.raises(IntegrityError):
        PackedModel.load(tmp_path / "pk")


def test_plug_and_play_add_and_remove_without_reslicing(hetero):
    frags, samples = hetero
    one = Packer(FAST).pack(frags[:1], samples, [0])
    before = {k: v.clone() for k, v in frags[0].state_dict().items()}
    both = Packer(FAST).pack(frags, samples, [0, 4], warm_start=one)
    assert both.class_ids == [0, 4] and len(both.fragments) == 2
    for k, v in both.fragments[0].state_dict().items():        # the fragment was not touched
        assert torch.equal(v, before[k])
    back = Packer(FAST).pack(frags[:1], samples, [0], warm_start=both)
    assert back.class_ids == [0] and back.enc.in_features == frags[0].spec.feature_dim


def test_warm_start_copies_enc_columns_and_head_rows(hetero):
    from snp_ray.packing.packer import _warm
    frags, samples = hetero
    one = Packer(FAST).pack(frags[:1], samples, [0])
    d0 = frags[0].spec.feature_dim
    enc = torch.nn.Linear(d0 + frags[1].spec.feature_dim, 16)
    head = torch.nn.Linear(16, 2)
    decs = torch.nn.ModuleList([torch.nn.Linear(16, f.spec.feature_dim) for f in frags])
    _warm(one, frags, [0, 4], enc, head, decs)
    assert torch.equal(enc.weight[:, :d0], one.enc.weight)
    assert torch.equal(head.weight[0], one.head.weight[0])
    assert torch.equal(decs[0].weight, one.decoders[0].weight)


def test_bad_pack_requests(hetero):
    frags, samples = hetero
    p = Packer(FAST)
    with pytest.raises(ConfigError, match="at least one fragment"):
        p.pack([], samples, [0])
    with pytest.raises(ConfigError, match="duplicate"):
        p.pack(frags, samples, [0, 4, 0])
    with pytest.raises(ConfigError, match="no fragment serves"):
        p.pack(frags[:1], samples, [0, 4])
    with pytest.raises(ConfigError, match="not in the pack"):
        p.pack(frags, samples, [0])


def test_incompatible_inputs_are_refused(hetero, text_market):
    frags, samples = hetero
    root, specs, scfg = text_market
    from snp_ray.store import FragmentStore
    store = FragmentStore(root / "fragments")
    text_frag = store.get(store.find(model_id=specs[0].id)[0]["key"])
    with pytest.raises(ConfigError, match="incompatible inputs"):
        Packer(FAST).pack([frags[0], text_frag], samples, [0, text_frag.spec.class_id])


def test_shared_class_merge_and_best(text_market):
    root, specs, scfg = text_market
    market = Market(root)
    merged = pack_request(market, ["very negative", "neutral", "very positive"], 5, scfg,
                          PackConfig(epochs=5, hidden=8))
    assert merged.class_ids == [0, 2, 4]
    assert sorted(merged.spec.fragment_targets) == [0, 1, 1, 2]   # class 2 fed by both models
    best = pack_request(market, ["very negative", "neutral", "very positive"], 5, scfg,
                        PackConfig(epochs=5, hidden=8, shared="best"))
    assert sorted(best.spec.fragment_targets) == [0, 1, 2]
    assert best.predict(["a fine film", "awful"]).shape == (2,)


def test_pack_request_errors(text_market):
    root, specs, scfg = text_market
    market = Market(root)
    with pytest.raises(ConfigError, match="names no classes"):
        pack_request(market, [], 5, scfg)
    with pytest.raises(ConfigError, match="duplicate"):
        pack_request(market, ["neutral", "2"], 5, scfg)
    with pytest.raises(DataError, match="held by no model"):
        pack_request(market, ["sarcastic"], 5, scfg)
    with pytest.raises(ArtifactNotFoundError, match="slice it first"):
        pack_request(market, ["neutral"], 5, slice_preset("paper"))


@pytest.mark.parametrize("recon", ["mean", "sum"])
def test_vectorised_reconstruction_equals_one_decoder_per_fragment(recon):
    """The packer's one-matmul reconstruction term is the method's per-fragment sum: ReLU
    decoders for non-negative fragments, linear ones for signed fragments (the second here)."""
    from torch import nn

    from snp_ray.packing.packer import reconstruction

    torch.manual_seed(0)
    dims, serves, hidden, batch = [5, 3, 7], torch.tensor([0, 2, 1]), 8, 12
    signed = [False, True, False]
    decoders = [nn.Linear(hidden, d) for d in dims]
    h = torch.randn(batch, hidden)
    z = [torch.randn(batch, d) if s else torch.rand(batch, d) for d, s in zip(dims, signed)]
    y = torch.randint(0, 3, (batch,))
    loop = 0.0
    for j, dec in enumerate(decoders):
        mine = y == serves[j]
        if bool(mine.any()):
            out = dec(h[mine]) if signed[j] else torch.relu(dec(h[mine]))
            err = (out - z[j][mine]).pow(2)
            loop = loop + (err.mean(1) if recon == "mean" else err.sum(1)).sum() / batch
    dec_all = nn.Linear(hidden, sum(dims))
    with torch.no_grad():
        dec_all.weight.copy_(torch.cat([d.weight for d in decoders]))
        dec_all.bias.copy_(torch.cat([d.bias for d in decoders]))
    seg = torch.zeros(sum(dims), len(dims))
    off = 0
    for j, d in enumerate(dims):
        seg[off:off + d, j] = 1.0 / d if recon == "mean" else 1.0
        off += d
    mine = (y[:, None] == serves[None, :]).float()
    nonneg = torch.cat([torch.full((d,), not s) for d, s in zip(dims, signed)])
    got = reconstruction(h, torch.cat(z, 1), dec_all, seg, mine, nonneg)
    assert torch.allclose(got, loop, atol=1e-5), (got, loop)


def test_fragments_of_different_input_sizes_rebuild_pack_and_export(tmp_path):
    """Each fragment runs at its own input size (the spec's, not a constant): it rebuilds from
    its files at that size, packs beside a 32x32 fragment, and the exported graph resizes too."""
    import onnxruntime as ort

    from snp_ray.slicing import Fragment

    a, fa = make_fragment("resnet20", 0, ImageSpec(size=[40, 40]), 3)
    b, fb = make_fragment("resnet20", 4, ImageSpec(), 4, classes=(3, 4, 5))
    a.save(tmp_path / "a")
    again = Fragment.load(tmp_path / "a")
    x = fa.raw[:3]
    assert tuple(again.encode(x).shape[-2:]) == (40, 40)
    torch.testing.assert_close(again(again.encode(x)), a(a.encode(x)))
    samples = PackSamples.from_fewshot([fa, fb], [0, 4])
    packed = Packer(FAST).pack([again, b], samples, [0, 4])
    raw40 = np.random.default_rng(0).integers(0, 256, (4, 40, 40, 3), dtype=np.uint8)
    ref = packed(*packed.encode(raw40))
    sess = ort.InferenceSession(str(export_onnx(packed, tmp_path / "p.onnx")))
    np.testing.assert_allclose(sess.run(None, {"images": raw40})[0], ref.numpy(), rtol=1e-4, atol=1e-5)
