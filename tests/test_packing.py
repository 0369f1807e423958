"""Packing: heterogeneous packs, exports, plug-and-play, shared classes, files, bad requests."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from snp_ray.data.specs import ImageSpec, TextSpec
from snp_ray.errors import (ArtifactNotFoundError, ConfigError, DataError, ExportError,
                            IntegrityError, UnknownNameError)
from snp_ray.market import Market
from snp_ray.packing import (PackConfig, PackedModel, Packer, PackSamples, export_onnx,
                             export_pack, export_pt2)
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


def assert_exports_match(packed, raw_at, folder):
    """The ONNX file (onnxruntime) and the .pt2 archive (torch.export.load) give the pack's own
    logits and classes at batch sizes 1 and 7; both were traced at batch 2, so the batch axis
    is dynamic. The same comparison fails for a pack whose head differs by 0.01 in one logit."""
    import onnxruntime as ort

    paths = export_pack(packed, folder, ["onnx", "pt2"])
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "model.pt2"]  # one file each
    sess = ort.InferenceSession(str(paths["onnx"]))
    names = [i.name for i in sess.get_inputs()]
    assert all(i.shape[0] == "batch" for i in sess.get_inputs())
    loaded = torch.export.load(str(paths["pt2"])).module()
    off = copy.deepcopy(packed)
    with torch.no_grad():
        off.head.bias[0] += 0.01
    for n in (1, 7):
        raw = raw_at(n)
        xs = packed.encode(raw, strict=False)
        inputs = [torch.as_tensor(raw)] if names == ["images"] else xs
        with torch.no_grad():
            ref, ref_off = packed(*xs).numpy(), off(*xs).numpy()
            got_pt2 = loaded(*inputs).numpy()
        got_onnx = sess.run(None, {k: x.numpy() for k, x in zip(names, inputs)})[0]
        for got in (got_onnx, got_pt2):
            assert got.shape == (n, len(packed.class_ids))
            np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)
            assert np.array_equal(got.argmax(1), ref.argmax(1))
            with pytest.raises(AssertionError):
                np.testing.assert_allclose(got, ref_off, rtol=0, atol=1e-4)


def test_pt2_and_onnx_exports_match_at_any_batch_size(hetero, tmp_path):
    frags, samples = hetero
    packed = Packer(FAST).pack(frags, samples, [0, 4])
    rng = np.random.default_rng(0)
    assert_exports_match(packed, lambda n: rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                         tmp_path / "x")
    assert export_pt2(packed, tmp_path / "one.pt2").is_file()     # a one-format entry point


def test_text_pack_exports_match(tmp_path):
    """A GRU fragment and a TextCNN fragment with their own vocabularies and lengths: one
    token-id input per fragment, all sharing the dynamic batch axis."""
    vocab = ["<pad>", "<unk>"] + list("abcdefghij")
    a, fa = make_fragment("gru", 0, TextSpec(vocab=vocab, max_len=10), 1)
    b, fb = make_fragment("textcnn", 4, TextSpec(vocab=vocab[:8], max_len=12), 2, classes=(3, 4, 5))
    packed = Packer(FAST).pack([a, b], PackSamples.from_fewshot([fa, fb], [0, 4]), [0, 4])
    rng = np.random.default_rng(0)
    words = list("abcdefghijklm")               # some unknown to both vocabularies
    assert_exports_match(packed, lambda n: [" ".join(rng.choice(words, rng.integers(1, 16)))
                                            for _ in range(n)], tmp_path / "x")


class _DataDependent(nn.Module):
    """Branches on a tensor's value, which torch.export cannot capture as one graph."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        return y if float(y.sum()) > 0 else -y


def test_unexportable_pack_is_refused_with_a_typed_error(hetero, tmp_path, monkeypatch):
    import snp_ray.packing.model as model_module

    frags, samples = hetero
    packed = Packer(FAST).pack(frags, samples, [0, 4])
    with pytest.raises(UnknownNameError, match="valid export formats: onnx, pt2"):
        export_pack(packed, tmp_path, ["onnx", "torchscript"])
    monkeypatch.setattr(model_module, "ONNX_MAX_WEIGHT_BYTES", 1000)
    with pytest.raises(ExportError, match="do not fit in one ONNX file"):
        export_onnx(packed, tmp_path / "big.onnx")
    broken = copy.deepcopy(packed)                  # the fixture's fragments stay as they are
    broken.fragments[0].features = _DataDependent(broken.fragments[0].features)
    for export, name in ((export_pt2, "p.pt2"), (export_onnx, "p.onnx")):
        with pytest.raises(ExportError, match="torch.export cannot capture its graph"):
            export(broken, tmp_path / name)
    assert not any(tmp_path.iterdir())          # nothing written, not even a temporary file


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
    """What the warm start copies, seen in a pack that does not train (lr 0, the config's
    frozen control): the layers leave the pack as the warm start set them."""
    frags, samples = hetero
    one = Packer(FAST).pack(frags[:1], samples, [0])
    still = FAST.replace(lr=0.0)
    both = Packer(still).pack(frags, samples, [0, 4], warm_start=one)
    d0 = frags[0].spec.feature_dim
    assert both.enc.in_features == d0 + frags[1].spec.feature_dim
    assert torch.equal(both.enc.weight[:, :d0], one.enc.weight)
    assert torch.equal(both.head.weight[0], one.head.weight[0])
    assert torch.equal(both.decoders[0].weight, one.decoders[0].weight)


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


def test_cli_pack_exports_onnx_and_pt2(text_market, tmp_path, capsys):
    """``snp pack --export onnx,pt2`` writes both files beside the saved pack, and they compute
    what the saved pack computes; bad --export values are refused before any packing."""
    import json

    import onnxruntime as ort

    from snp_ray.cli import main

    root, specs, scfg = text_market
    preset = tmp_path / "tiny.json"      # the fixture's slicing config, a short packing
    preset.write_text(json.dumps({"slice": scfg.to_dict(), "pack": {"epochs": 5, "hidden": 8}}))
    out = tmp_path / "pack"
    argv = ["pack", "--store", str(root), "--classes", "very negative,very positive", "--k", "5",
            "--preset", str(preset), "--json"]

    def run(*extra: str) -> tuple[int, dict]:
        rc = main(argv + list(extra))
        return rc, json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    rc, err = run("--out", str(out), "--export", "onnx,tflite")
    assert rc == 2 and err["type"] == "UnknownNameError" and "onnx, pt2" in err["error"]
    rc, err = run("--export", "onnx")
    assert rc == 2 and err["type"] == "ConfigError" and "--out" in err["error"]
    assert not out.exists()
    rc, res = run("--out", str(out), "--export", "onnx,pt2")
    assert rc == 0, res
    assert res["exports"] == [str(out / "model.onnx"), str(out / "model.pt2")]
    packed = PackedModel.load(out)
    xs = packed.encode(["a fine film", "awful , just awful", "the plot"], strict=False)
    with torch.no_grad():
        ref = packed(*xs).numpy()
        got_pt2 = torch.export.load(res["exports"][1]).module()(*xs).numpy()
    sess = ort.InferenceSession(res["exports"][0])
    got_onnx = sess.run(None, {i.name: x.numpy() for i, x in zip(sess.get_inputs(), xs)})[0]
    for got in (got_onnx, got_pt2):
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)


def test_pack_request_errors(text_market):
    root, specs, scfg = text_market
    market = Market(root)
    with pytest.raises(ConfigError, match="names no classes"):
        pack_request(market, [], 5, scfg)
    with pytest.raises(ConfigError, match="duplicate"):
        pack_request(market, ["neutral", "2"], 5, scfg)
    with pytest.raises(UnknownNameError, match="held by no model"):
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
    rng = np.random.default_rng(0)      # the exports take the largest size, 40x40, and resize
    assert_exports_match(packed, lambda n: rng.integers(0, 256, (n, 40, 40, 3), dtype=np.uint8),
                         tmp_path / "x")
