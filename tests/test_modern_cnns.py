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
from snp_ray.data.specs import ImageSpec
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
    "resnet18": (_tv("resnet18"), "slices"),                       # BasicBlock: no width knob
    "mobilenet_v2": (_tv("mobilenet_v2", width_mult=0.25), "slices"),
    "mobilenet_v3_small": (_tv("mobilenet_v3_small", width_mult=0.25), "slices"),
    "efficientnet_b0": (_tv("efficientnet_b0"), "slices"),          # no width knob in the builder
    "densenet121": (lambda: torchvision.models.DenseNet(8, (6, 12, 24, 16), 16, 2, num_classes=3),
                    "slices"),                                      # densenet121's blocks, growth 8
    "regnet_y_400mf": (_tv("regnet_y_400mf"), "refuses"),           # grouped convolutions
    "shufflenet_v2_x0_5": (_tv("shufflenet_v2_x0_5"), "refuses"),   # channel shuffle / split
    "convnext_tiny": (_tv("convnext_tiny"), "slices"),
    "timm_resnet18d": (_timm("resnet18d"), "slices"),
    "timm_mobilenetv3_small_050": (_timm("mobilenetv3_small_050"), "slices"),
}
REFUSED_BECAUSE = {"regnet_y_400mf": r"grouped Conv2d .* at trunk_output\.block1",
                   "shufflenet_v2_x0_5": r"call_method view at stage2\.0"}


def _fewshot(per_class: int = 4):
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], per_class)
    raw = rng.integers(0, 256, (labels.size, 32, 32, 3), dtype=np.uint8)
    rows = [list(range(i * per_class, (i + 1) * per_class)) for i in range(3)]
    fs = FewShotSet(FewShotManifest(dataset="synthetic", k=per_class, seed=0, classes=[0, 1, 2],
                                    row_ids=rows), raw, labels)
    return ImageSpec(), fs


def _randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics/affines, so that a unit's scale matters (a fresh BN is an identity)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if m.weight is not None:
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model.eval()


def _check_slice(model: Classifier, spec, fs, **cfg):
    """Slice class 1; assert exact fusion, a physically smaller fragment, any batch size."""
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
    for batch in (1, 3):
        with torch.no_grad():
            assert out.features(torch.randn(batch, 3, 32, 32)).shape == (batch, fused.shape[1])
    return slicer, out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_slices_or_refuses_with_a_typed_error(family):
    build, expected = FAMILIES[family]
    torch.manual_seed(0)
    spec, fs = _fewshot()
    model = _randomise_norms(build().eval())
    clf = split_classifier(model, spec.encode(fs.raw[:2]))
    with torch.no_grad():
        torch.testing.assert_close(clf(spec.encode(fs.raw)), model(spec.encode(fs.raw)))
    if expected == "refuses":
        with pytest.raises(UnsupportedLayerError, match=REFUSED_BECAUSE[family]):
            Slicer(clf, spec, fs, slice_preset("quick", **ONE))
        return
    _check_slice(clf, spec, fs)


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
    dw = [g for g in slicer.graph.groups if slicer._is_depthwise(g.id)]
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


@pytest.mark.parametrize("block, why", [
    (nn.Conv2d(8, 8, 3, padding=1, groups=2), r"grouped Conv2d \(groups=2.* at block"),
    (nn.GroupNorm(2, 8), "GroupNorm at block"),
])
def test_unsupported_blocks_are_typed_errors_naming_op_and_path(block, why):
    spec, fs = _fewshot()
    model = _block_model(block, 8, 8)
    with pytest.raises(UnsupportedLayerError, match=why):
        Slicer(model, spec, fs, slice_preset("quick", **ONE))


def test_channel_shuffle_is_refused_before_training():
    class Shuffle(nn.Module):
        def forward(self, x):
            n, c, h, w = x.size()
            return x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)

    spec, fs = _fewshot()
    with pytest.raises(UnsupportedLayerError, match="view at block"):
        trace(_block_model(Shuffle(), 8, 8).features, spec.encode(fs.raw[:2]))


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


def test_a_multiply_with_an_untraced_per_channel_tensor_is_refused():
    class Mask(nn.Module):       # a computed (N, C, 1, 1) tensor: it would not be sliced with the units
        def forward(self, x):
            return x * torch.ones(1, x.shape[1], 1, 1)

    spec, fs = _fewshot()
    with pytest.raises(UnsupportedLayerError, match="multiply at block .*carries no traced units"):
        trace(_block_model(Mask(), 8, 8).features, spec.encode(fs.raw[:2]))
