"""Issue 27 section 2: grouped convolutions (ResNeXt, RegNet) slice with exact fusion into a
physically smaller grouped convolution with the same number of groups.

The rule (docs/SLICING.md, "Grouped convolutions"): a grouped conv with G groups reads G equal
blocks of its input units and writes G equal blocks of output units; both groups keep the same
number of units in every block, and the repairs it absorbs are block-diagonal."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from snp_ray.errors import ConfigError, UnsupportedLayerError
from snp_ray.models import count_params, split_classifier
from snp_ray.slicing import Slicer, select_units, slice_preset
from snp_ray.slicing.graph import trace
from snp_ray.slicing.handlers import GROUPED, handler_for, is_grouped
from snp_ray.slicing.surgery import shrink
from tests.test_modern_cnns import ONE, _block_model, _check_slice, _fewshot, _randomise_norms
from tests.test_slicer_engines import _rel, float64  # noqa: F401  (float64 is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


class NeXtBlock(nn.Module):
    """ResNeXt's bottleneck at toy size: 1x1 -> BN -> 3x3 grouped (``groups`` blocks) -> BN ->
    1x1 -> BN, plus the input."""

    def __init__(self, c: int = 8, width: int = 16, groups: int = 4):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        return torch.relu(x + self.bn3(self.conv3(h)))


def _producers(group) -> set[str]:
    return {n for n, _ in group.producers}


def _assert_fused_at_batches(slicer, out, x):
    """The fused fragment equals the unfused repaired network at batch sizes 1 and 3."""
    for batch in (1, 3):
        with torch.no_grad():
            fused = out.features(x[:batch])
        assert _rel(slicer.repaired_features(x[:batch]), fused) <= 1e-5


def _assert_blocks_respected(slicer, out):
    """Every blocked group keeps the same count in every block; every repair a grouped conv
    reads is exactly zero off its blocks."""
    _, kept, repairs = slicer.last_slice
    for g in slicer.graph.groups:
        if g.blocks == 1:
            continue
        counts = torch.bincount(g.block_of(torch.tensor(out.kept[g.id])), minlength=g.blocks)
        assert bool((counts == counts[0]).all()), (g.id, counts)
        if g.block_diagonal and g.id in repairs:
            k, d, mat = repairs[g.id]
            allowed = g.repair_mask(k, d).to(mat.device)
            assert bool((mat[~allowed] == 0).all())


def _assert_grouped_fragment(source: nn.Module, fragment: nn.Module):
    """Every grouped conv is still one, with its groups, equal channels per group, and smaller."""
    src = dict(source.named_modules())
    grouped = [(n, m) for n, m in fragment.named_modules() if n in src and is_grouped(src[n])]
    assert grouped
    for name, conv in grouped:
        g = src[name].groups
        assert conv.groups == g and conv.in_channels % g == 0 and conv.out_channels % g == 0, name
        assert conv.weight.shape[:2] == (conv.out_channels, conv.in_channels // g)
    assert any(c.in_channels < src[n].in_channels and c.out_channels < src[n].out_channels
               for n, c in grouped)


@pytest.mark.parametrize("mode", ["rate", "threshold"])
def test_a_resnext_block_slices_into_a_smaller_grouped_conv(mode):
    spec, fs = _fewshot()
    model = _block_model(NeXtBlock(), 8, 8)
    x = spec.encode(fs.raw)
    graph = trace(model.features, x[:2])
    by_producer = {frozenset(_producers(g)): g for g in graph.groups}
    reads = by_producer[frozenset({"block.conv1", "block.bn1"})]     # read by the grouped conv
    writes = by_producer[frozenset({"block.conv2", "block.bn2"})]    # written by it
    assert (reads.blocks, reads.block_diagonal) == (4, True)
    assert (writes.blocks, writes.block_diagonal) == (4, False)      # its consumer is dense
    assert all(g.blocks == 1 for g in graph.groups if g not in (reads, writes))

    slicer, out = _check_slice(model, spec, fs, mode=mode)
    _assert_fused_at_batches(slicer, out, x)
    _assert_blocks_respected(slicer, out)
    conv = out.features.block.conv2
    assert conv.groups == 4
    assert conv.in_channels == len(out.kept[reads.id]) < 16
    assert conv.out_channels == len(out.kept[writes.id]) < 16
    _assert_grouped_fragment(model.features, out.features)

    # a stored fragment is rebuilt by cutting the source without repairs (keep_in per block):
    # the fused weights load into exactly those shapes
    rebuilt = shrink(copy.deepcopy(model.features).eval(), trace(model.features, x[:2]),
                     {g: torch.tensor(v) for g, v in out.kept.items()})
    rebuilt.load_state_dict(out.features.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), out.features(x))


def test_a_grouped_conv_folds_block_diagonal_repairs_exactly_and_refuses_others():
    """``W_g[:, kept_g] += W_g[:, dropped_g] @ R_g`` equals the grouped conv on the repaired
    input when R is block-diagonal. A repair reaching across blocks cannot be held by a grouped
    conv (output block g reads input block g only): its in-block part alone gives another
    result, so the handler refuses it rather than fuse it inexactly."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, 3, padding=1, groups=2).eval()
    z = torch.randn(3, 8, 5, 5)
    kept, dropped = torch.tensor([0, 2, 5, 6]), torch.tensor([1, 3, 4, 7])   # two per block
    same = (dropped // 4)[:, None] == (kept // 4)[None, :]

    def repaired(r):
        zr = z.clone()
        zr[:, dropped] = torch.einsum("dk,nkhw->ndhw", r, z[:, kept])
        return conv(zr)

    def folded(r):
        c = copy.deepcopy(conv)
        GROUPED.absorb_repair(c, 0, 8, kept, dropped, r)
        assert (c.groups, c.in_channels, c.weight.shape[1]) == (2, 4, 2)
        return c(z[:, kept])

    r = torch.randn(4, 4) * same
    with torch.no_grad():
        torch.testing.assert_close(folded(r), repaired(r), rtol=1e-5, atol=1e-5)
        across = torch.randn(4, 4)
        assert _rel(repaired(across), folded(across * same)) > 1e-2
    with pytest.raises(ConfigError, match="not block-diagonal"):
        GROUPED.absorb_repair(copy.deepcopy(conv), 0, 8, kept, dropped, across)
    with pytest.raises(ConfigError, match="same number in every block"):   # 3 + 1 kept
        GROUPED.keep_in(copy.deepcopy(conv), 0, 8, torch.tensor([0, 1, 2, 5]))
    assert handler_for(conv) is GROUPED and handler_for(nn.Conv2d(8, 8, 3, groups=8)) is not GROUPED


def test_selection_keeps_the_same_count_in_every_block():
    """The rule's count n, then the top ceil(n / blocks) (at least 1) of every block."""
    scores = torch.tensor([9., 8, 7, 6, 0.1, 0.2, 0.3, 0.4, 5, 4, 0.5, 3])   # 3 blocks of 4
    assert select_units(scores, "threshold", 0.6).tolist() == [0, 1, 2, 3, 8, 9]  # n = 6
    assert select_units(scores, "threshold", 0.6, blocks=3).tolist() == [0, 1, 6, 7, 8, 9]
    assert select_units(scores, "rate", 0.25, blocks=3).tolist() == [0, 7, 8]     # n = 3
    assert select_units(scores, "rate", 0.01, blocks=3).tolist() == [0, 7, 8]     # at least 1
    assert select_units(scores, "rate", 1.0, blocks=3).tolist() == list(range(12))


def test_grouped_convs_with_different_groups_on_one_group_take_the_lcm():
    """One group read by a 4-group and a 6-group conv, their outputs added: both groups get
    lcm(4, 6) = 12 blocks of 2 units. Equal counts per block of 2 give equal counts per block
    of 4 and of 6, and a repair inside the blocks of 2 stays inside both convs' blocks."""
    class TwoGroupings(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(8, 24, 1)
            self.b = nn.Conv2d(24, 24, 3, padding=1, groups=4)
            self.c = nn.Conv2d(24, 24, 3, padding=1, groups=6)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return torch.relu(self.b(h) + self.c(h))

    spec, fs = _fewshot()
    model = _block_model(TwoGroupings(), 8, 24)
    graph = trace(model.features, spec.encode(fs.raw[:2]))
    by_producer = {frozenset(_producers(g)): g for g in graph.groups}
    assert (by_producer[frozenset({"block.a"})].blocks, by_producer[frozenset({"block.a"})].block_diagonal) == (12, True)
    assert by_producer[frozenset({"block.b", "block.c"})].blocks == 12
    slicer, out = _check_slice(model, spec, fs)
    _assert_fused_at_batches(slicer, out, spec.encode(fs.raw))
    _assert_blocks_respected(slicer, out)
    assert (out.features.block.b.groups, out.features.block.c.groups) == (4, 6)
    assert out.features.block.b.in_channels == out.features.block.c.in_channels == 12


def test_a_grouped_conv_reading_a_concatenation_is_refused():
    """Its blocks would have to keep equal counts across two groups' selections."""
    class CatGrouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(8, 8, 1)
            self.g = nn.Conv2d(16, 8, 3, padding=1, groups=2)

        def forward(self, x):
            return self.g(torch.cat([x, self.a(x)], 1))

    spec, fs = _fewshot()
    with pytest.raises(UnsupportedLayerError, match=r"grouped Conv2d \(groups=2.* at block\.g.*concatenation"):
        Slicer(_block_model(CatGrouped(), 8, 8), spec, fs, slice_preset("quick", **ONE))


def test_batched_engine_slices_grouped_convs_like_the_cached_engine(float64, monkeypatch):
    """The batched engine masks its full (u, u) repairs to the blocks too: in float64 it gives
    the cached engine's kept units and fragments, and its fusion is exact."""
    monkeypatch.setattr(Slicer, "weights_channels_last", False)
    spec, fs = _fewshot()
    model = _block_model(NeXtBlock(), 8, 8)
    config = slice_preset("quick", **{**ONE, "adapt_epochs": 2, "combine_epochs": 2})
    ref = [Slicer(model, spec, fs, config).slice_class(c) for c in (0, 1)]
    batched = Slicer(model, spec, fs, config, engine="batched")
    out = batched.slice_classes([0, 1])
    x = spec.encode(fs.raw).double()
    for a, b in zip(ref, out):
        assert a.kept == b.kept
        assert _rel(a.features(x), b.features(x)) < 1e-9
    assert _rel(batched.repaired_features(x), out[-1].features(x)) <= 1e-9
    _assert_blocks_respected(batched, out[-1])


def _resnext_reduced():
    """torchvision resnext50_32x4d's block (Bottleneck, groups 32, width 4 per group) at depth
    [1, 1, 1, 1]: resnext50 itself slices too (ratio 0.25) but takes 35 s here."""
    return torchvision.models.ResNet(torchvision.models.resnet.Bottleneck, [1, 1, 1, 1], groups=32,
                                     width_per_group=4, num_classes=3)


def _regnet_y_reduced():
    """regnet_y_400mf's blocks (grouped 3x3 convs of group width 8, SE at ratio 0.25) at depth 4
    and 143 K parameters: regnet_y_400mf itself slices too (ratio 0.25) but takes 20 s here."""
    from torchvision.models.regnet import BlockParams, RegNet

    return RegNet(BlockParams.from_init_params(depth=4, w_0=24, w_a=36.44, w_m=2.49, group_width=8,
                                               se_ratio=0.25), num_classes=3)


@pytest.mark.parametrize("family", ["resnext_1111", "regnet_y_reduced"])
def test_torchvision_grouped_families_slice_exactly(family):
    build = _resnext_reduced if family == "resnext_1111" else _regnet_y_reduced
    torch.manual_seed(0)
    spec, fs = _fewshot()
    x = spec.encode(fs.raw)
    source = _randomise_norms(build().eval())
    clf = split_classifier(source, x[:2])
    slicer, out = _check_slice(clf, spec, fs)
    _assert_fused_at_batches(slicer, out, x)
    _assert_blocks_respected(slicer, out)
    _assert_grouped_fragment(clf.features, out.features)
    assert count_params(out.features) < 0.5 * count_params(clf.features)
    modules = dict(slicer.graph.module.named_modules())
    for name, conv in modules.items():
        if is_grouped(conv):   # it reads a block-diagonal group and writes a blocked one
            assert any(g.block_diagonal and g.blocks == conv.groups and name in {n for n, _ in g.consumers}
                       for g in slicer.graph.groups)
            assert any(g.blocks == conv.groups and name in _producers(g) for g in slicer.graph.groups)
    if family == "regnet_y_reduced":   # the SE's expanding conv is coupled to the grouped conv's units
        g = next(g for g in slicer.graph.groups if "trunk_output.block1.block1-0.f.b.0" in _producers(g))
        assert "trunk_output.block1.block1-0.f.se.fc2" in _producers(g)
        assert g.blocks == modules["trunk_output.block1.block1-0.f.b.0"].groups > 1
