"""Issue 13 section 2: the slicer on modern CNN building blocks.

Ten outside families (torchvision, timm), each at 32x32 with 3 classes and random weights, either
slice (fusion exact, fragment smaller, any batch size) or refuse with a typed
``UnsupportedLayerError`` before any training. Then one tiny hand-written module per building
block, each sliced end to end with exact fusion and a smaller fragment. Groups always come from
tracing; nothing here tells the slicer what a block is."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from snp_ray.data.fewshot import FewShotManifest, FewShotSet
from snp_ray.data.specs import ImageSpec, TextSpec
from snp_ray.errors import ConfigError, UnsupportedLayerError
from snp_ray.models import Classifier, count_params, split_classifier
from snp_ray.slicing import Slicer, slice_preset
from snp_ray.slicing.graph import OP_RULES, OpRule, register_op_rule, trace

pytestmark = pytest.mark.usefixtures("one_thread")
ONE = dict(pool_epochs=1, adapt_epochs=1, combine_epochs=1, mode="rate", beta=0.5)


def _tv(name, **kw):
    return lambda: torchvision.models.get_model(name, weights=None, num_classes=3, **kw)


def _timm(name, **kw):
    def build():
        import timm   # a dependency (pyproject): never skipped

        return timm.create_model(name, pretrained=False, num_classes=3, **kw)
    return build


#: family -> (builder at reduced width where the builder allows it, expected outcome)
FAMILIES = {
    "resnet18": (lambda: torchvision.models.ResNet(     # resnet18's BasicBlocks, one per stage
        torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=3), "slices"),
    "mobilenet_v2": (lambda: torchvision.models.MobileNetV2(3, 0.25, [   # its first 3 stages
        [1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 2, 2]]), "slices"),
    "mobilenet_v3_small": (_tv("mobilenet_v3_small", width_mult=0.25), "slices"),
    "efficientnet_b0": (lambda: torchvision.models.EfficientNet(    # efficientnet_b0's MBConv+SE
        [torchvision.models.efficientnet.MBConvConfig(1, 3, 1, 16, 8, 1),   # blocks, 3 stages
         torchvision.models.efficientnet.MBConvConfig(6, 3, 2, 8, 16, 2),
         torchvision.models.efficientnet.MBConvConfig(6, 5, 2, 16, 24, 1)], 0.2, num_classes=3),
        "slices"),
    "densenet121": (lambda: torchvision.models.DenseNet(8, (2, 2, 2, 2), 16, 2, num_classes=3),
                    "slices"),                     # densenet121's layers and transitions, growth 8
    "regnet_y_400mf": (_tv("regnet_y_400mf"), "slices"),            # grouped convs + SE (#27 §2)
    # shufflenet_v2_x0_5's blocks (chunk, channel shuffle) at reduced width and depth
    "shufflenet_v2": (lambda: torchvision.models.ShuffleNetV2([2, 1, 1], [8, 16, 32, 64, 128],
                                                              num_classes=3), "slices"),
    # cspresnet50's CrossStage (x.split(c // 2)) and bottlenecks, 2 stages of depth 1
    "timm_cspresnet50": (lambda: _timm_model("cspnet", "CspNet", _csp_cfg(), num_classes=3), "slices"),
    # mixnet_s's mixed convs (torch.split of the unit dim, per-part kernels, concat), 3 stages
    "timm_mixnet_s": (lambda: _timm_model("efficientnet", "EfficientNet", block_args=_mixnet_args(),
                                          num_features=64, stem_size=16, num_classes=3), "slices"),
    # ghostnet_050's ghost modules (a depthwise half concatenated, out[:, :out_chs]), 4 stages
    "timm_ghostnet_050": (lambda: _timm_model("ghostnet", "GhostNet", [[[3, 16, 16, 0, 1]],
                                              [[3, 48, 24, 0, 2]], [[3, 72, 24, 0, 1]],
                                              [[5, 72, 40, 0.25, 2]]], num_classes=3, width=0.5),
                          "slices"),
    "convnext_tiny": (lambda: torchvision.models.ConvNeXt(   # convnext_tiny's blocks, 2 stages
        [torchvision.models.convnext.CNBlockConfig(24, 48, 1),
         torchvision.models.convnext.CNBlockConfig(48, None, 1)], num_classes=3), "slices"),
    "timm_resnet18d": (lambda: _timm_model(        # resnet18d's deep stem and avg-down, depth 1
        "resnet", "ResNet", _timm_class("resnet", "BasicBlock"), [1, 1, 1, 1], num_classes=3,
        stem_width=32, stem_type="deep", avg_down=True), "slices"),
    "timm_mobilenetv3_small_050": (_timm("mobilenetv3_small_050"), "slices"),
    # heads made of a 1x1 conv and global average pooling (#27 section 3): conv -> ReLU -> pool
    # (the conv stays in the features) and pool -> conv (the conv is the head)
    "squeezenet1_1": (_tv("squeezenet1_1"), "slices"),
    "timm_dla46_c": (_timm("dla46_c"), "slices"),  # dla34's head (pool, then a 1x1 conv), 1.3 M
    # mobilevit_xxs's blocks (a branch on the map size, patch unfold and fold, a transformer
    # layer) at 4x4 and at 1x1 (where it interpolates), transformer dim 32, 4 stages
    "timm_mobilevit_xxs": (lambda: _timm_model("byobnet", "ByobNet", _mobilevit_cfg(), num_classes=3),
                           "slices"),
}
REFUSED_BECAUSE: dict[str, str] = {}


def _timm_class(module: str, cls: str) -> type:
    import importlib

    return getattr(importlib.import_module(f"timm.models.{module}"), cls)


def _timm_model(module: str, cls: str, *args, **kw):
    return _timm_class(module, cls)(*args, **kw)


def _csp_cfg():
    from timm.models import cspnet

    return cspnet.CspModelCfg(stem=cspnet.CspStemCfg(out_chs=16, kernel_size=7, stride=4, pool="max"),
                              stages=cspnet.CspStagesCfg(depth=(1, 1), out_chs=(32, 64), stride=(1, 2),
                                                         expand_ratio=2., bottle_ratio=0.5,
                                                         cross_linear=True))


def _mixnet_args():
    from timm.models._efficientnet_builder import decode_arch_def

    return decode_arch_def([["ds_r1_k3_s1_e1_c16"], ["ir_r1_k3.5.7_s2_e6_c24_se0.5_nsw"],
                            ["ir_r1_k3.5_a1.1_p1.1_s1_e3_c24"]])


def _mobilevit_cfg():
    from timm.models.byobnet import ByoBlockCfg, ByoModelCfg

    def bottle(c):
        return ByoBlockCfg("bottle", d=1, c=c, s=2, gs=1, br=2.0,
                           block_kwargs={"bottle_in": True, "linear_out": True})

    def vit(c):
        return ByoBlockCfg("mobilevit", d=1, c=c, s=1, br=1.0, block_kwargs={
            "transformer_dim": 32, "transformer_depth": 1, "patch_size": 2})
    return ByoModelCfg(blocks=(bottle(16), (bottle(24), vit(24)), bottle(32), (bottle(32), vit(32))),
                       stem_chs=16, stem_type="3x3", stem_pool="", downsample="", num_features=64,
                       act_layer="silu")


VOCAB = ["<pad>", "<unk>"] + list("abcdefghij")


def _fewshot(per_class: int = 4, text: bool = False):
    """3 classes of random 32x32 images, or (``text``) random 8-word sentences."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], per_class)
    if text:
        raw = [" ".join(rng.choice(list("abcdefghij"), 8)) for _ in labels]
    else:
        raw = rng.integers(0, 256, (labels.size, 32, 32, 3), dtype=np.uint8)
    rows = [list(range(i * per_class, (i + 1) * per_class)) for i in range(3)]
    fs = FewShotSet(FewShotManifest(dataset="synthetic", k=per_class, seed=0, classes=[0, 1, 2],
                                    row_ids=rows), raw, labels)
    return (TextSpec(vocab=VOCAB, max_len=10) if text else ImageSpec()), fs


def _randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random norm statistics/affines (BatchNorm, InstanceNorm, GroupNorm), so that a unit's scale
    matters (a fresh norm is an identity)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):
            n = m.num_channels if isinstance(m, nn.GroupNorm) else m.num_features
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if m.weight is not None:
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model.eval()


def _check_slice(model: Classifier, spec, fs, **cfg):
    """Slice class 1; assert exact fusion (on D and at batch sizes 1 and 3), a physically smaller
    fragment and a group that lost units."""
    slicer = Slicer(model, spec, fs, slice_preset("quick", **{**ONE, **cfg}))
    out = slicer.slice_class(1)
    x = spec.encode(fs.raw)
    with torch.no_grad():
        fused = out.features(x)
    unfused = slicer.repaired_features(x)
    rel = float((fused - unfused).norm() / unfused.norm())
    assert rel <= 1e-5, rel
    assert count_params(out.features) < count_params(model.features)
    sliced = [g for g in slicer.graph.groups if len(out.kept[g.id]) < g.size]
    assert sliced, "no group lost units"
    for batch in (1, 3):     # random images; token ids: the last rows of D
        xb = torch.randn(batch, *x.shape[1:]) if x.dtype.is_floating_point else x[-batch:]
        with torch.no_grad():
            fb = out.features(xb)
        ub = slicer.repaired_features(xb)
        assert fb.shape == (batch, fused.shape[1])
        assert float((fb - ub).norm() / ub.norm()) <= 1e-5, batch
    return slicer, out


_SLICED: dict = {}


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "regnet_y_400mf"])  # regnet's blocks: test_grouped.py
def test_family_slices_or_refuses_with_a_typed_error(family):
    build, expected = FAMILIES[family]
    torch.manual_seed(0)
    spec, fs = _fewshot()
    model = _randomise_norms(build().eval())
    clf = split_classifier(model, spec.encode(fs.raw[:2]))
    with torch.no_grad():     # a conv head run as a Linear sums in another order: 1e-5 relative
        torch.testing.assert_close(clf(spec.encode(fs.raw)), model(spec.encode(fs.raw)), rtol=1e-5, atol=1e-5)
    if expected == "refuses":
        with pytest.raises(UnsupportedLayerError, match=REFUSED_BECAUSE[family]):
            Slicer(clf, spec, fs, slice_preset("quick", **ONE))
        return
    _SLICED[family] = _check_slice(clf, spec, fs)


def test_a_fragment_with_decided_branches_exports_at_any_batch_size():
    """MobileViT's fragment (its shape branches decided on the 32x32 input, the 1x1 stage's
    interpolation kept) goes through ``torch.export`` with a dynamic batch and computes the same."""
    if "timm_mobilevit_xxs" not in _SLICED:
        test_family_slices_or_refuses_with_a_typed_error("timm_mobilevit_xxs")
    slicer, out = _SLICED["timm_mobilevit_xxs"]
    assert any(len(out.kept[g.id]) < g.size for g in slicer.graph.groups
               if any(name.startswith("stages.3.1.transformer") for name, _ in g.producers))
    features = out.features.eval()
    x = torch.randn(3, 3, 32, 32)
    program = torch.export.export(features, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    for batch in (1, 5):
        xb = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(xb), features(xb), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ building blocks
class _Net(nn.Module):
    """stem conv -> ``block`` -> 1x1 conv -> pool -> flatten: every block sits between two
    dense consumers, so its repairs are folded and checked."""

    def __init__(self, block: nn.Module, c_in: int, c_out: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c_in, 3, padding=1), nn.BatchNorm2d(c_in), nn.ReLU())
        self.block = block
        self.head_conv = nn.Conv2d(c_out, 8, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return torch.flatten(self.pool(nn.functional.silu(self.head_conv(self.block(self.stem(x))))), 1)


class InvertedResidual(nn.Module):
    """expand 1x1 -> depthwise 3x3 -> SE (x * hardsigmoid(conv(pool))) -> project 1x1, + x."""

    def __init__(self, c: int = 8, e: int = 16):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(c, e, 1), nn.BatchNorm2d(e), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(e, e, 3, padding=1, groups=e), nn.BatchNorm2d(e), nn.Hardswish())
        self.fc1, self.fc2 = nn.Conv2d(e, 4, 1), nn.Conv2d(4, e, 1)
        self.project = nn.Sequential(nn.Conv2d(e, c, 1), nn.BatchNorm2d(c))

    def forward(self, x):
        h = self.dw(self.expand(x))
        s = nn.functional.hardsigmoid(self.fc2(nn.functional.relu(self.fc1(h.mean((2, 3), keepdim=True)))))
        return x + self.project(h * s)


class Dense(nn.Module):
    """DenseNet-style: two layers whose outputs are concatenated with their input."""

    def __init__(self, c: int = 8, g: int = 4):
        super().__init__()
        self.l1 = nn.Sequential(nn.BatchNorm2d(c), nn.ELU(), nn.Conv2d(c, g, 3, padding=1))
        self.l2 = nn.Sequential(nn.BatchNorm2d(c + g), nn.GELU(), nn.Conv2d(c + g, g, 3, padding=1))

    def forward(self, x):
        x = torch.cat([x, self.l1(x)], 1)
        return torch.cat([x, self.l2(x)], 1)


class NeXt(nn.Module):
    """ConvNeXt-style: depthwise 7x7 -> permute -> LayerNorm -> Linear -> GELU -> Linear ->
    permute -> layer scale, + x; Dropout and Identity on the way."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.drop, self.skip = nn.Dropout(0.1), nn.Identity()
        self.layer_scale = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

    def forward(self, x):
        h = self.norm(self.dw(x).permute(0, 2, 3, 1))
        h = self.fc2(self.drop(nn.functional.gelu(self.fc1(h)))).permute(0, 3, 1, 2)
        return self.skip(x) + self.layer_scale * h


def _block_model(block, c_in, c_out):
    torch.manual_seed(0)
    net = _randomise_norms(_Net(block, c_in, c_out))
    return Classifier(net, 8, 3).eval()


def test_depthwise_and_se_couple_to_their_channels_and_fuse_exactly():
    spec, fs = _fewshot()
    model = _block_model(InvertedResidual(), 8, 8)
    graph = trace(model.features, spec.encode(fs.raw[:2]))
    names = {g.id: sorted(n for n, _ in g.producers) for g in graph.groups}
    # the depthwise conv, its BN and the SE's expanding conv share the expanded channels' units
    assert ["block.dw.0", "block.dw.1", "block.expand.0", "block.expand.1", "block.fc2"] in names.values()
    # the residual stream: stem and projection are one group
    assert ["block.project.0", "block.project.1", "stem.0", "stem.1"] in names.values()
    slicer, out = _check_slice(model, spec, fs)
    dw = out.features.block.dw[0]
    assert dw.groups == dw.in_channels == dw.out_channels < 16


def test_depthwise_rate_selects_the_expanded_units_on_their_own():
    """``depthwise_rate`` keeps that share of every group a depthwise conv touches (1.0: whole),
    the other groups follow mode/beta; at its default it changes neither selection nor digest."""
    spec, fs = _fewshot()
    model = _block_model(InvertedResidual(), 8, 8)
    slicer, out = _check_slice(model, spec, fs, depthwise_rate=1.0)
    dw = [g for g in slicer.graph.groups if slicer.is_depthwise_group(g.id)]
    assert [sorted(n for n, _ in g.producers) for g in dw] == [
        ["block.dw.0", "block.dw.1", "block.expand.0", "block.expand.1", "block.fc2"]]
    assert all(len(out.kept[g.id]) == g.size for g in dw)                    # kept whole
    assert out.features.block.dw[0].out_channels == 16
    others = [g for g in slicer.graph.groups if g not in dw and not g.fixed]
    assert any(len(out.kept[g.id]) < g.size for g in others)              # rate 0.5 elsewhere
    _, quarter = _check_slice(model, spec, fs, depthwise_rate=0.25)
    assert len(quarter.kept[dw[0].id]) == 4                                  # ceil(0.25 * 16)
    assert slice_preset("quick", depthwise_rate=0.0).digest() == slice_preset("quick").digest()
    assert slice_preset("quick", depthwise_rate=1.0).digest() != slice_preset("quick").digest()
    with pytest.raises(ConfigError, match="depthwise_rate"):
        slice_preset("quick", depthwise_rate=1.5)


def test_concatenated_parts_keep_their_own_units():
    spec, fs = _fewshot()
    model = _block_model(Dense(), 8, 16)
    graph = trace(model.features, spec.encode(fs.raw[:2]))
    names = [sorted({n for n, _ in g.producers}) for g in graph.groups]
    # stem, l1, l2 (+ the net's last conv): never merged by the concats; the BNs that read the
    # concatenation ride on every part they normalise
    assert names[:3] == [["block.l1.0", "block.l2.0", "stem.0", "stem.1"], ["block.l1.2", "block.l2.0"],
                         ["block.l2.2"]] and len(names) == 4
    slicer, out = _check_slice(model, spec, fs)
    assert out.features.block.l2[2].in_channels == len(out.kept[0]) + len(out.kept[1])


def test_layernorm_groups_stay_whole_and_layer_scale_rides_on_units():
    spec, fs = _fewshot()
    model = _block_model(NeXt(), 8, 8)
    graph = trace(model.features, spec.encode(fs.raw[:2]))
    stream = next(g for g in graph.groups if any(n == "stem.0" for n, _ in g.producers))
    assert "LayerNorm" in stream.fixed
    assert {"block.dw", "block.norm", "block.fc2", "block"} <= {n for n, _ in stream.producers}
    slicer, out = _check_slice(model, spec, fs)
    assert len(out.kept[stream.id]) == stream.size
    assert out.features.block.fc1.out_features == 16          # the MLP's 32 hidden units, halved


def test_layer_scale_is_sliced_with_its_units():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.gamma = nn.Parameter(torch.rand(8, 1, 1) + 0.5)

        def forward(self, x):
            return self.gamma * torch.relu(self.conv(x))

    spec, fs = _fewshot()
    model = _block_model(Scaled(), 8, 8)
    slicer, out = _check_slice(model, spec, fs)
    assert out.features.block.gamma.shape == (4, 1, 1)


@pytest.mark.parametrize("block, why", [   # grouped convs, GroupNorm slice now
    (nn.LocalResponseNorm(2), "LocalResponseNorm at block"),
])
def test_unsupported_blocks_are_typed_errors_naming_op_and_path(block, why):
    spec, fs = _fewshot()
    model = _block_model(block, 8, 8)
    with pytest.raises(UnsupportedLayerError, match=why):
        Slicer(model, spec, fs, slice_preset("quick", **ONE))


class Shuffle(nn.Module):
    def forward(self, x):
        n, c, h, w = x.size()
        return x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)


def test_channel_shuffle_keeps_its_units_whole_and_the_rest_slices():
    """A reshape that splits the unit dim (ShuffleNet's channel shuffle) is not followed: the
    units it reads are kept whole, and a conv reading the shuffled map keeps its inputs."""
    spec, fs = _fewshot()
    model = _block_model(Shuffle(), 8, 8)
    graph = trace(model.features, spec.encode(fs.raw[:2]))
    stem = next(g for g in graph.groups if g.name == "stem.0")
    assert "channel shuffle" in stem.fixed
    slicer, out = _check_slice(model, spec, fs)
    assert out.features.stem[0].out_channels == 8 and out.features.head_conv.in_channels == 8
    assert out.features.head_conv.out_channels < 8


class Parts(nn.Module):
    """x.split(5) into a 5-unit part and a 3-unit rest, and a channel slice x[:, 2:6] of the
    rest's conv: each part feeds its own conv, and their outputs are concatenated."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(5, 6, 1), nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        head, rest = x.split(5, dim=1)
        b = self.b(rest)
        return torch.cat([self.a(head), self.c(b[:, 2:6]), b[:, 1:]], 1)


def test_split_and_channel_slices_keep_their_own_units():
    """Each part of a split or a channel slice keeps its own units (the spaces a bound cuts are
    refined there); units before a constant bound are kept whole, units after the last one
    slice, and fusion is exact."""
    spec, fs = _fewshot()
    model = _block_model(Parts(), 8, 6 + 4 + 5)
    graph = trace(model.features, spec.encode(fs.raw[:2]))
    stem = sorted((g for g in graph.groups if g.name == "stem.0"), key=lambda g: g.producers[0][1])
    assert [(g.size, bool(g.fixed)) for g in stem] == [(5, True), (3, False)]
    b = sorted((g for g in graph.groups if any(n == "block.b" for n, _ in g.producers)),
               key=lambda g: dict(g.producers)["block.b"])
    assert [(g.size, bool(g.fixed)) for g in b] == [(1, True), (1, True), (4, False)]  # [0] [1] [2:]
    slicer, out = _check_slice(model, spec, fs)
    assert out.features.block.b.in_channels < 3 and out.features.block.a.in_channels == 5


class RexTail(nn.Module):
    """ReXNet's partial residual: ``cat([x[:, :c] + shortcut, x[:, c:]])`` for a block that
    widens c = 8 channels to 12."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12))

    def forward(self, shortcut):
        x = self.conv(shortcut)
        return torch.cat([x[:, 0:8] + shortcut, x[:, 8:]], dim=1)


def test_a_partial_residual_couples_only_the_channels_it_adds_to():
    spec, fs = _fewshot()
    model = _block_model(RexTail(), 8, 12)
    graph = trace(model.features, spec.encode(fs.raw[:2]))
    conv = sorted((g for g in graph.groups if any(n == "block.conv.0" for n, _ in g.producers)),
                  key=lambda g: dict(g.producers)["block.conv.0"])
    assert [g.size for g in conv] == [8, 4]
    assert any(n == "stem.0" for n, _ in conv[0].producers) and conv[0].fixed and not conv[1].fixed
    slicer, out = _check_slice(model, spec, fs)
    assert out.features.block.conv[0].out_channels < 12


class _Branchy(nn.Module):
    """Branches on a traced shape: the map size (decided on the example input, so traced) or
    the batch size (untraceable: a fragment runs at any batch size)."""

    def __init__(self, c: int, on_batch: bool):
        super().__init__()
        self.conv, self.on_batch = nn.Conv2d(c, c, 3, padding=1), on_batch

    def forward(self, x):
        if (x.shape[0] > 2) if self.on_batch else (x.shape[-1] > 4):
            return torch.relu(self.conv(x))
        return x


class _AfterUntraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.branchy = _Branchy(8, on_batch=True)
        self.expand = nn.Conv2d(8, 16, 1)
        self.sized = _Branchy(16, on_batch=False)
        self.project = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        y = self.branchy(x)
        return self.project(self.sized(torch.relu(self.expand(y)))) + y


def test_an_untraceable_block_is_kept_whole_and_the_rest_slices():
    """A branch on the map size is decided on the example input and traced through. A block
    whose forward still cannot be traced (a branch on the batch size) is kept whole (a leaf): the
    units it reads are kept, units added to its output are kept, the rest slices with exact
    fusion at batch sizes 1 and 3. Untraceable code in the traced module's own forward is
    refused, naming it."""
    spec, fs = _fewshot()
    model = _block_model(_AfterUntraceable(), 8, 8)
    graph = trace(model.features, spec.encode(fs.raw[:2]))
    by = {name: g for g in graph.groups for name, _ in g.producers}
    assert "kept whole (untraceable Python in block.branchy (_Branchy): TraceError: the branch " \
           "on gt depends on the batch size" in by["stem.0"].fixed
    assert "combines them with" in by["block.project"].fixed
    assert not by["block.expand"].fixed and not by["head_conv"].fixed
    assert not by["block.sized.conv"].fixed                # traced through its decided branch
    assert "block.branchy.conv" not in by                  # nothing inside it is followed
    slicer, out = _check_slice(model, spec, fs)
    assert len(out.kept[by["block.expand"].id]) < 16
    assert len(out.kept[by["stem.0"].id]) == len(out.kept[by["block.project"].id]) == 8

    class RootBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 4, 3), nn.Linear(4, 3)

        def forward(self, x):
            y = self.conv(x).mean((2, 3))
            return self.head(y if y.shape[0] > 2 else -y)

    with pytest.raises(UnsupportedLayerError, match=r"untraceable .* at <root> \(RootBranches\)"):
        split_classifier(RootBranches().eval(), spec.encode(fs.raw[:2]))


def test_a_new_op_is_one_registered_rule():
    """The op-rule registry is the extension point: torch.abs is refused until a rule for it is
    registered, then traced (and sliced) like any pass-through op, and refused again once removed."""
    class Abs(nn.Module):
        def forward(self, x):
            return torch.abs(x)

    class EachUnitAlone(OpRule):
        functions = (torch.abs,)

        def layout(self, node, ins, tracing):
            return ins[0]

    spec, fs = _fewshot()
    model = _block_model(Abs(), 8, 8)
    x = spec.encode(fs.raw[:2])
    with pytest.raises(UnsupportedLayerError, match="call_function abs at block"):
        trace(model.features, x)
    remove = register_op_rule(EachUnitAlone())
    try:
        graph = trace(model.features, x)
        assert len(graph.groups) == 2      # the stem's and the block conv's units, through abs
        _check_slice(model, spec, fs)
    finally:
        remove()
    assert torch.abs not in OP_RULES
    with pytest.raises(UnsupportedLayerError, match="call_function abs at block"):
        trace(model.features, x)


def test_split_classifier_needs_one_final_linear():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.a, self.b = nn.Conv2d(3, 4, 3), nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x):
            h = self.conv(x).mean((2, 3))
            return self.a(h) + self.b(h)

    with pytest.raises(ConfigError, match="one final nn.Linear"):
        split_classifier(TwoHeads(), torch.randn(2, 3, 8, 8))
    head = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
                         nn.Dropout(), nn.Identity())
    clf = split_classifier(head, torch.randn(2, 3, 8, 8))
    assert clf.feature_dim == 4 and clf.head.out_features == 3


def test_a_multiply_with_an_untraced_per_channel_tensor_keeps_the_units_whole():
    class Mask(nn.Module):       # a computed (N, C, 1, 1) tensor: it would not be sliced with the units
        def forward(self, x):
            return x * torch.ones(1, x.shape[1], 1, 1)

    spec, fs = _fewshot()
    graph = trace(_block_model(Mask(), 8, 8).features, spec.encode(fs.raw[:2]))
    stem = next(g for g in graph.groups if ("stem.0", 0) in g.producers)
    assert "multiply mul combines them with ones" in stem.fixed
    assert any(not g.fixed for g in graph.groups)              # the head conv's units still slice


# ------------------------------------------------------------------ issue #27 section 3
class Norms(nn.Module):
    """InstanceNorm (affine + running statistics, then plain), per-channel PReLU, GroupNorm with
    one channel per group, a single-slope PReLU, and GroupNorm over blocks of 4 channels."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1)
        self.in1 = nn.InstanceNorm2d(c, affine=True, track_running_stats=True)
        self.act1 = nn.PReLU(c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1)
        self.in2, self.gn2, self.act2 = nn.InstanceNorm2d(c), nn.GroupNorm(c, c), nn.PReLU()
        self.c3 = nn.Conv2d(c, c, 3, padding=1)
        self.gn3 = nn.GroupNorm(2, c)

    def forward(self, x):
        x = self.act1(self.in1(self.c1(x)))
        x = self.act2(self.gn2(self.in2(self.c2(x))))
        return self.gn3(self.c3(x))


def test_instance_norm_prelu_and_per_channel_group_norm_slice_and_group_norm_stays_whole():
    spec, fs = _fewshot()
    model = _block_model(Norms(), 8, 8)
    with torch.no_grad():                      # random slopes: a unit's slope matters
        model.features.block.act1.weight.uniform_(0.0, 0.5)
    graph = trace(model.features, spec.encode(fs.raw[:2]))
    by = {frozenset(n for n, _ in g.producers): g for g in graph.groups}
    first, second, third = (by[frozenset(s)] for s in (
        {"block.c1", "block.in1", "block.act1"}, {"block.c2", "block.in2", "block.gn2"},
        {"block.c3", "block.gn3"}))
    assert not first.fixed and not second.fixed
    assert "GroupNorm, 2 groups" in third.fixed and "block.gn3" in third.fixed
    slicer, out = _check_slice(model, spec, fs)
    b = out.features.block
    n1, n2 = len(out.kept[first.id]), len(out.kept[second.id])
    assert n1 < 8 and n2 < 8 and len(out.kept[third.id]) == 8
    assert b.in1.num_features == b.act1.num_parameters == b.in1.running_mean.numel() == n1
    assert b.in2.num_features == b.gn2.num_groups == b.gn2.num_channels == n2
    assert b.act2.num_parameters == 1 and b.gn3.num_groups == 2


@pytest.mark.parametrize("where, norm, why", [
    ("tokens", nn.InstanceNorm1d(6), "InstanceNorm1d at norm: its units are not the channels"),
    ("tokens", nn.GroupNorm(3, 6), "GroupNorm at norm: its units are not on the channel dim"),
    ("tokens", nn.PReLU(6), "PReLU at norm: its per-channel slopes index dim 1"),
    ("flat", nn.InstanceNorm1d(6), "InstanceNorm1d at norm: its units are not the channels"),
])
@pytest.mark.filterwarnings("ignore:input's size at dim=0")
def test_norms_and_prelu_off_the_channel_dim_are_refused(where, norm, why):
    """(N, T, C) tokens with units on the last dim (dim 1 is time) and a flat (N, C) vector,
    which InstanceNorm1d would read as one unbatched (C, L) map: refused, naming the module."""
    class OffChannels(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.norm = nn.Linear(4, 6), norm

        def forward(self, x):
            return self.norm(self.fc(x if where == "tokens" else x[:, 0]))

    with pytest.raises(UnsupportedLayerError, match=why):
        trace(OffChannels(), torch.randn(2, 6, 4))


class Resample(nn.Module):
    """Upsample, zero pad, conv, then F.interpolate (bilinear), a reflection pad of H and W only
    (``F.pad`` with zeros on the channel dim) and a replication pad module."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.up, self.pad = nn.Upsample(scale_factor=2), nn.ZeroPad2d(1)
        self.conv = nn.Conv2d(c, c, 3)
        self.rep = nn.ReplicationPad2d((0, 1, 1, 0))

    def forward(self, x):
        x = self.conv(self.pad(self.up(x)))
        x = nn.functional.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
        return self.rep(nn.functional.pad(x, (1, 1, 2, 0, 0, 0), mode="reflect"))


def test_interpolate_upsample_and_pads_pass_units_through():
    spec, fs = _fewshot()
    model = _block_model(Resample(), 8, 8)
    graph = trace(model.features, spec.encode(fs.raw[:2]))
    assert [sorted(n for n, _ in g.producers) for g in graph.groups] == [
        ["stem.0", "stem.1"], ["block.conv"], ["head_conv"]]
    _check_slice(model, spec, fs)


@pytest.mark.parametrize("pad, why", [
    (lambda x: nn.functional.pad(x, (0, 0, 0, 0, 1, 0)), r"call_function pad at pad: .*pads the "
                                                         r"unit dim 1 by \(1, 0\)"),
    (nn.ConstantPad3d((0, 0, 0, 0, 0, 2), 0.0), r"ConstantPad3d at block: .*pads the unit dim 1"),
    (lambda x: nn.functional.interpolate(x.permute(0, 2, 1, 3), scale_factor=2),
     "call_function interpolate at interpolate: .*resamples dims 2 on, and the units lie on dim 2"),
])
def test_a_pad_or_resampling_of_the_unit_dim_is_refused_naming_the_op(pad, why):
    class Padded(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.block = pad if isinstance(pad, nn.Module) else None

        def forward(self, x):
            x = self.conv(x)
            return self.block(x) if self.block is not None else pad(x)

    with pytest.raises(UnsupportedLayerError, match=why):
        trace(Padded(), torch.randn(2, 3, 8, 8))


class CBAM(nn.Module):
    """CBAM: channel attention (an SE on the average-pooled map; the original's shared MLP
    applied to the average- and max-pooled maps is one module called twice, which the slicer
    refuses), then spatial attention, ``x * sigmoid(conv7x7(cat[mean_c(x), max_c(x)]))``: a
    1-channel gate broadcast over x's channels."""

    def __init__(self, c: int = 8, r: int = 2):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // r, 1), nn.Conv2d(c // r, c, 1)
        self.spatial = nn.Conv2d(2, 1, 7, padding=3)

    def forward(self, x):
        x = x * torch.sigmoid(self.fc2(torch.relu(self.fc1(nn.functional.adaptive_avg_pool2d(x, 1)))))
        pooled = torch.cat([torch.mean(x, dim=1, keepdim=True), torch.max(x, dim=1, keepdim=True)[0]], 1)
        return x * torch.sigmoid(self.spatial(pooled))


def test_cbam_keeps_the_reduced_channels_whole_and_slices_the_rest():
    """The channel mean/max read every unit of x, so x's group is kept whole (dropping a unit
    would change both maps); the 1-channel gate is one unit broadcast over x's units, not coupled
    with them (before #27 section 3 the multiply was refused: units 'do not line up'); the SE's
    hidden units and the next conv's slice, with exact fusion."""
    spec, fs = _fewshot()
    model = _block_model(CBAM(), 8, 8)
    graph = trace(model.features, spec.encode(fs.raw[:2]))
    by = {frozenset(n for n, _ in g.producers): g for g in graph.groups}
    stream = by[frozenset({"stem.0", "stem.1", "block.fc2"})]
    gate = by[frozenset({"block.spatial"})]
    hidden = by[frozenset({"block.fc1"})]
    assert "reduced over its units by mean" in stream.fixed
    assert gate.size == 1 and "broadcast over 8 units by the multiply" in gate.fixed
    assert not hidden.fixed
    slicer, out = _check_slice(model, spec, fs)
    assert len(out.kept[stream.id]) == 8 and len(out.kept[hidden.id]) < 4
    assert out.features.block.spatial.weight.shape == (1, 2, 7, 7)


def test_a_one_wide_traced_operand_is_broadcast_not_coupled():
    """``x + g`` with g a traced 1-channel map: x keeps its 8 units and its own group (it can
    still be sliced), g's group holds its one unit whole."""
    class Broadcast(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.gate = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 1, 1)

        def forward(self, x):
            return self.conv(x) + self.gate(x)

    spec, fs = _fewshot()
    model = _block_model(Broadcast(), 8, 8)
    graph = trace(model.features, spec.encode(fs.raw[:2]))
    conv = next(g for g in graph.groups if ("block.conv", 0) in g.producers)
    gate = next(g for g in graph.groups if ("block.gate", 0) in g.producers)
    assert conv.id != gate.id and conv.size == 8 and not conv.fixed
    assert gate.size == 1 and "broadcast over 8 units by the add" in gate.fixed
    _, out = _check_slice(model, spec, fs)
    assert len(out.kept[conv.id]) < 8


class SEView(nn.Module):
    """A hand-written SE block: ``pool(x).view(b, c)`` -> fc -> ReLU -> fc -> sigmoid ->
    ``.view(b, c, 1, 1)``, times x."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, c // 2), nn.Linear(c // 2, c)

    def forward(self, x):
        b, c, _, _ = x.size()
        s = nn.functional.adaptive_avg_pool2d(x, 1).view(b, c)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s)))).view(b, c, 1, 1)


def test_se_block_written_with_view_slices_exactly():
    spec, fs = _fewshot()
    _check_slice(_block_model(SEView(), 8, 8), spec, fs)


class Recurrent(nn.Module):
    """Embedding -> ``cell`` -> the first and the last layer's final states side by side."""

    def __init__(self, cell: type, **kw):
        super().__init__()
        self.embedding = nn.Embedding(len(VOCAB), 8, padding_idx=0)
        self.rnn = cell(8, 6, batch_first=True, **kw)

    def forward(self, tokens):
        _, h = self.rnn(self.embedding(tokens))
        if isinstance(self.rnn, nn.LSTM):                # its final state is (h, c)
            h = h[0]
        return torch.cat([h[0], h[-1]], 1)


@pytest.mark.parametrize("cell, kw", [(nn.GRU, dict(num_layers=2)), (nn.RNN, {}),
                                      (nn.LSTM, dict(num_layers=2))])
def test_stacked_and_plain_recurrent_layers_slice_exactly(cell, kw):
    """Every layer of a stacked GRU/LSTM keeps the same hidden units (one ``hidden_size``):
    one group, whose dropped units leave the recurrence and the next layer's input; a plain RNN
    has one gate block."""
    torch.manual_seed(0)
    spec, fs = _fewshot(text=True)
    model = Classifier(Recurrent(cell, **kw), 12, 3).eval()
    graph = trace(model.features, spec.encode(fs.raw[:2]))
    assert [sorted({n for n, _ in g.producers}) for g in graph.groups] == [["embedding"], ["rnn"]]
    slicer, out = _check_slice(model, spec, fs)
    rnn, blocks = out.features.rnn, {nn.GRU: 3, nn.RNN: 1, nn.LSTM: 4}[cell]
    h = rnn.hidden_size
    assert h == len(out.kept[1]) < 6
    for k in range(rnn.num_layers):
        assert getattr(rnn, f"weight_hh_l{k}").shape == (blocks * h, h)
        assert getattr(rnn, f"weight_ih_l{k}").shape == (blocks * h, rnn.input_size if k == 0 else h)


@pytest.mark.parametrize("cell, kw, why", [
    (nn.GRU, dict(bidirectional=True), "bidirectional GRU at rnn: two directions"),
    (nn.LSTM, dict(proj_size=3), r"LSTM \(proj_size=3\) at rnn"),
])
def test_bidirectional_and_projected_recurrent_layers_are_refused(cell, kw, why):
    spec, fs = _fewshot(text=True)
    with pytest.raises(UnsupportedLayerError, match=why):
        trace(Recurrent(cell, **kw), spec.encode(fs.raw[:2]))


@pytest.mark.parametrize("act, linear", [(nn.Dropout(0.5), True), (nn.ReLU(), False)])
def test_a_conv_head_with_global_pooling_is_split_exactly(act, linear):
    """1x1 conv -> Dropout -> global average pool: pooling moves before the conv, the head is
    the conv as a Linear. With a ReLU in between (squeezenet) they do not commute: the conv stays
    in the features (its units: one per class) and the head is the identity. A strided 1x1 conv
    is not a pointwise head: refused."""
    def net(stride=1):
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 3, 1, stride=stride), act,
                             nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()

    torch.manual_seed(0)
    model, x = net(), torch.randn(3, 3, 8, 8)
    clf = split_classifier(model, x[:2])
    with torch.no_grad():
        torch.testing.assert_close(clf(x), model(x))
    assert clf.head_path == "2" and clf.head.out_features == 3
    assert clf.feature_dim == (8 if linear else 3)
    if not linear:
        assert torch.equal(clf.head.weight, torch.eye(3))
    with pytest.raises(ConfigError, match="nor by a 1x1 Conv2d head"):
        split_classifier(net(stride=2), x[:2])
