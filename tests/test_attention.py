"""Issue 27 section 1: attention slices like any other layer.

timm's ViT/DeiT (fused qkv + scaled_dot_product_attention, class token, position embedding) and
torchvision's ViT (nn.MultiheadAttention) are rewritten exactly into the canonical
``SelfAttention``; slicing then drops whole heads (repaired into the output projection) and MLP
units, and the fused fragment equals the repaired network at batch sizes 1 and 3 with fewer
heads and consistent ``num_heads``/``head_dim`` bookkeeping."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from snp_ray.errors import ConfigError, UnsupportedLayerError
from snp_ray.models import Classifier, count_params, split_classifier
from snp_ray.models.attention import HeadAttention, SelfAttention, canonicalise, from_multihead
from snp_ray.slicing import Slicer, slice_preset
from snp_ray.slicing.graph import trace
from test_modern_cnns import ONE, _check_slice, _fewshot

pytestmark = pytest.mark.usefixtures("one_thread")


def _timm(name):
    import timm   # a dependency (pyproject): never skipped

    return timm.create_model(name, pretrained=False, num_classes=3, img_size=32, patch_size=4,
                             depth=2)


VITS = {
    "timm_vit_tiny": lambda: _timm("vit_tiny_patch16_224"),
    "timm_deit_tiny": lambda: _timm("deit_tiny_patch16_224"),
    "torchvision_vit": lambda: VisionTransformer(image_size=32, patch_size=4, num_layers=2,
                                                 num_heads=3, hidden_dim=48, mlp_dim=96,
                                                 num_classes=3),
}


@pytest.mark.parametrize("family", list(VITS))
def test_vit_drops_heads_and_fuses_exactly_at_batch_1_and_3(family):
    torch.manual_seed(0)
    spec, fs = _fewshot()
    model = VITS[family]().eval()
    x = spec.encode(fs.raw)
    clf = split_classifier(model, x[:2])
    with torch.no_grad():
        torch.testing.assert_close(clf(x), model(x), rtol=1e-5, atol=1e-5)
    slicer, out = _check_slice(clf, spec, fs)
    heads = [g for g in slicer.graph.groups
             if any(n.endswith(".core") for n, _ in g.producers)]
    assert len(heads) == 2 and all(g.size == model_heads(clf) for g in heads)
    assert any(len(out.kept[g.id]) < g.size for g in heads), "no head was dropped"
    mods = dict(out.features.named_modules())
    for name, core in mods.items():
        if isinstance(core, HeadAttention):
            att = name.rsplit(".", 1)[0]
            width = core.num_heads * core.head_dim
            assert core.num_heads < model_heads(clf)
            for p in ("q", "k", "v"):
                assert mods[f"{att}.{p}"].out_features == width
            assert mods[f"{att}.proj"].in_features == width
    for batch in (1, 3):
        xb = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            fused, unfused = out.features(xb), slicer.repaired_features(xb)
        assert float((fused - unfused).norm() / unfused.norm()) <= 1e-5


def model_heads(clf: Classifier) -> int:
    return next(m.num_heads for m in clf.features.modules() if isinstance(m, HeadAttention))


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_is_rewritten_exactly(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    att = from_multihead(mha).eval()
    x = torch.randn(5, 2, 16) if not batch_first else torch.randn(2, 5, 16)
    with torch.no_grad():
        want, _ = mha(x, x, x, need_weights=False)
        got, weights = att(x, x, x, need_weights=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert weights is None
    with pytest.raises(ConfigError, match="need_weights"):
        att(x, x, x, need_weights=True)


def test_an_unknown_attention_is_left_alone_and_refused_by_op_and_path():
    class Mine(nn.Module):           # heads by hand, with the head count written as a constant
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 24)

        def forward(self, x):
            q, k, v = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, 2, 4).unbind(2)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v).flatten(2)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.attn = nn.Linear(3, 8), Mine()

        def forward(self, x):
            return self.attn(self.embed(x.flatten(2).transpose(1, 2))).mean(1)

    net = canonicalise(Net())
    assert isinstance(net.attn, Mine)
    with pytest.raises(UnsupportedLayerError, match=r"reshape at attn"):
        trace(net, torch.randn(2, 3, 4, 4))


class _SE(nn.Module):
    """Squeeze-and-excitation written with ``view``; ``const`` writes the channel count as 8."""

    def __init__(self, const: bool):
        super().__init__()
        self.conv, self.fc1, self.fc2, self.const = nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4), nn.Linear(4, 8), const

    def forward(self, x):
        x = torch.relu(self.conv(x))
        b = x.size(0)
        w = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3)).view(b, -1)))))
        return x * (w.view(b, 8, 1, 1) if self.const else w.view(b, x.size(1), 1, 1))


class _SENet(nn.Module):
    def __init__(self, const: bool):
        super().__init__()
        self.stem, self.se, self.conv = nn.Conv2d(3, 8, 3, padding=1), _SE(const), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = self.conv(self.se(torch.relu(self.stem(x))))
        return x.reshape(x.size(0), -1)       # merged into the unit dim: 32*32 positions per unit


@pytest.mark.parametrize("const", [False, True])
def test_a_view_keeps_units_and_a_constant_count_keeps_its_group_whole(const):
    torch.manual_seed(0)
    spec, fs = _fewshot()
    slicer, out = _check_slice(Classifier(_SENet(const), 8 * 32 * 32, 3).eval(), spec, fs)
    se = next(g for g in slicer.graph.groups if ("se.conv", 0) in g.producers)
    assert ("se.fc2", 0) in se.producers          # the excitation is coupled to its channels
    assert slicer.graph.output_inner == 32 * 32
    if const:
        assert "constant 8" in se.fixed and len(out.kept[se.id]) == 8
    else:
        assert not se.fixed and len(out.kept[se.id]) < 8


def test_getitem_may_index_tokens_but_not_step_over_units():
    class Net(nn.Module):
        def __init__(self, units: bool):
            super().__init__()
            self.embed, self.units = nn.Linear(3, 8), units

        def forward(self, x):
            t = self.embed(x.flatten(2).transpose(1, 2))
            return t[:, 0, ::2] if self.units else t[:, 1:][:, 0]

    g = trace(Net(False), torch.randn(2, 3, 4, 4))
    assert g.groups[0].output_offsets == [0]
    with pytest.raises(UnsupportedLayerError, match="slices the unit dim"):
        trace(Net(True), torch.randn(2, 3, 4, 4))     # a stepped slice: no contiguous part


def test_zoo_transformers_slice_with_padding_masked():
    """The zoo's ViT and text Transformer: heads and MLP units drop, fusion is exact, and the
    text model's padding never changes a sentence's features (nor its fragment's)."""
    from snp_ray.data.fewshot import FewShotManifest, FewShotSet
    from snp_ray.data.specs import TextSpec
    from snp_ray.models import build_model

    torch.manual_seed(0)
    spec, fs = _fewshot()
    _check_slice(build_model("vit", 3, 0.5), spec, fs)
    vocab = ["<pad>", "<unk>"] + [f"w{i}" for i in range(40)]
    tspec = TextSpec(vocab=vocab, max_len=12)
    texts = [" ".join(f"w{(3 * i + j) % 40}" for j in range(2 + i % 7)) for i in range(12)]
    labels = torch.arange(12).remainder(3).numpy()
    rows = [[i for i in range(12) if labels[i] == c] for c in range(3)]
    tfs = FewShotSet(FewShotManifest(dataset="synthetic", k=4, seed=0, classes=[0, 1, 2], row_ids=rows),
                     texts, labels, ["a", "b", "c"])
    model = build_model("transformer", 3, 0.25, vocab_size=len(vocab)).eval()
    slicer = Slicer(model, tspec, tfs, slice_preset("quick", **ONE))
    out = slicer.slice_class(1)
    x = tspec.encode(texts)
    with torch.no_grad():
        fused, unfused = out.features(x), slicer.repaired_features(x)
        assert float((fused - unfused).norm() / unfused.norm()) <= 1e-5
        longer = torch.cat([x, torch.zeros(len(texts), 4, dtype=x.dtype)], 1)  # more padding
        torch.testing.assert_close(model.features(longer), model.features(x))
        torch.testing.assert_close(out.features(longer), fused)
    assert any(len(out.kept[g.id]) < g.size for g in slicer.graph.groups)


def test_a_vit_cnn_and_torchvision_pack_exports_match(tmp_path):
    """One ViT fragment, one VGG fragment and one from a torchvision model in one pack; its
    ONNX and torch.export files match PyTorch within 1e-4 at batch sizes 1 and 7."""
    import numpy as np
    import torchvision

    from conftest import as_fragment, make_fragment
    from snp_ray.data.fewshot import FewShotManifest, FewShotSet
    from snp_ray.data.specs import ImageSpec
    from snp_ray.packing import PackConfig, Packer, PackSamples
    from test_packing import assert_exports_match

    a, fa = make_fragment("vit", 0, ImageSpec(mean=[0.5, 0.4, 0.3], std=[0.2, 0.2, 0.2]), 1)
    b, fb = make_fragment("vgg11", 4, ImageSpec(), 2, classes=(3, 4, 5))
    torch.manual_seed(3)
    spec = ImageSpec()
    labels = np.repeat([6, 7, 8], 3)
    fc = FewShotSet(FewShotManifest(dataset="cifar10", k=3, seed=3, classes=[6, 7, 8],
                                    row_ids=[list(range(300 + 3 * i, 303 + 3 * i)) for i in range(3)]),
                    np.random.default_rng(3).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8),
                    labels, ["c6", "c7", "c8"])
    raw = torchvision.models.mobilenet_v3_small(weights=None, num_classes=3, width_mult=0.25).eval()
    tv = split_classifier(raw, spec.encode(fc.raw[:2]))
    slicer = Slicer(tv, spec, fc, slice_preset("quick", **ONE))
    c = as_fragment(slicer.slice_class(7), slicer, "torchvision:mobilenet_v3_small?width_mult=0.25",
                    1.0, 7, 3)
    samples = PackSamples.from_fewshot([fa, fb, fc], [0, 4, 7])
    packed = Packer(PackConfig(epochs=5, hidden=16, augment_views=2)).pack([a, b, c], samples, [0, 4, 7])
    rng = np.random.default_rng(0)
    assert_exports_match(packed, lambda n: rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                         tmp_path / "x")


def test_a_vit_reference_may_set_its_input_and_patch_size_within_a_token_cap():
    from snp_ray.models.refs import parse_ref

    ref = parse_ref("timm:vit_tiny_patch16_224?img_size=32&patch_size=4")
    assert ref.kwargs == {"img_size": 32, "patch_size": 4}
    for bad, why in (("img_size=224&patch_size=4", "3136 tokens"), ("img_size=32&patch_size=0", "1..1024"),
                     ("img_size=big", "integers")):
        with pytest.raises(ConfigError, match=why):
            parse_ref(f"timm:vit_tiny_patch16_224?{bad}")


@pytest.mark.parametrize("family", ["zoo_vit", "timm_vit_tiny"])
def test_layernorm_repair_slices_the_residual_stream_exactly(family):
    """``layernorm="repair"``: the residual stream, the units every LayerNorm normalises, loses
    units too, each of those LayerNorms becomes a ``RepairedLayerNorm``, and the fragment
    equals the repaired network at batch sizes 1 and 3. It is smaller than the fragment that
    keeps the stream whole, rebuilds from its kept units as a stored fragment does, and exports."""
    import copy

    from snp_ray.models import build_model
    from snp_ray.slicing.surgery import RepairedLayerNorm, shrink

    torch.manual_seed(0)
    spec, fs = _fewshot()
    x = spec.encode(fs.raw)
    clf = build_model("vit", 3, 1.0).eval() if family == "zoo_vit" else \
        split_classifier(VITS[family]().eval(), x[:2])
    slicer, out = _check_slice(clf, spec, fs, layernorm="repair")
    stream = [g for g in slicer.graph.groups if g.norms]
    assert len(stream) == 1 and not stream[0].fixed
    assert len(out.kept[stream[0].id]) < stream[0].size            # the stream lost units
    norms = [m for m in out.features.modules() if isinstance(m, RepairedLayerNorm)]
    assert len(norms) == len(stream[0].norms) and not any(
        isinstance(m, nn.LayerNorm) for m in out.features.modules())
    whole = Slicer(clf, spec, fs, slice_preset("quick", **ONE)).slice_class(1)
    assert count_params(out.features) < count_params(whole.features)
    # a stored fragment: traced as rebuild_features traces (the default mode), cut, loaded
    again = copy.deepcopy(clf.features).eval()
    shrink(again, trace(again, x[:2]), {g: torch.tensor(u) for g, u in out.kept.items()})
    again.load_state_dict(out.features.state_dict())
    ep = torch.export.export(out.features, (x[:3],))
    with torch.no_grad():
        assert torch.equal(again(x), out.features(x))
        torch.testing.assert_close(ep.module()(x[:3]), out.features(x[:3]), rtol=1e-5, atol=1e-6)
