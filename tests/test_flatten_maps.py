"""Flattened unit maps: a (C, H, W) channel map flattened to C*H*W features, as in learnware's
ConvModel (``lwconv``). Channel u is then the H*W contiguous positions u*H*W .. u*H*W+H*W-1 of
the flat dim; the slicer keeps, scores, repairs and folds those positions together. Small random
models, a few seconds in all."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from snp_ray.errors import UnsupportedLayerError
from snp_ray.models import Classifier, count_params
from snp_ray.slicing import Slicer, slice_preset
from snp_ray.slicing.graph import attach, trace
from snp_ray.slicing.surgery import fold_into_linear
from test_slicing import TINY, _randomise_bn, setup

HALF = dict(TINY, mode="rate", beta=0.5)
pytestmark = pytest.mark.usefixtures("one_thread")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _assert_fuses_exactly(slicer: Slicer, features: nn.Module, x: torch.Tensor) -> None:
    """The fused fragment equals the unfused repaired network on its kept units, at batch 1 and 3."""
    for batch in (1, 3):
        with torch.no_grad():
            fused = features(x[:batch])
        unfused = slicer.repaired_features(x[:batch])
        assert fused.shape == unfused.shape
        assert _rel(fused, unfused) <= 1e-5, (batch, _rel(fused, unfused))


@pytest.mark.parametrize("engine", ["cached", "batched"])
def test_lwconv_fuses_exactly_into_a_physically_smaller_fragment(engine):
    model, spec, fs = setup("lwconv")
    slicer = Slicer(model, spec, fs, slice_preset("quick", **HALF), engine=engine)
    last = slicer.graph.groups[-1]
    assert slicer.graph.output_inner == 16 and last.output_offsets == [0]   # (C, 4, 4) flattened
    out = slicer.slice_classes([1])[0]
    x = spec.encode(fs.raw)
    _assert_fuses_exactly(slicer, out.features, x)
    convs = [m for m in out.features.modules() if isinstance(m, nn.Conv2d)]
    source = [m for m in model.features.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3 and all(a.out_channels < b.out_channels for a, b in zip(convs, source))
    assert [c.out_channels for c in convs] == [len(out.kept[g.id]) for g in slicer.graph.groups]
    feature_dim = out.features(x[:2]).shape[1]
    assert feature_dim == len(out.kept[last.id]) * 16 == out.probe.in_features
    assert count_params(out.features) < count_params(model.features)
    # a head on all 256 repaired features, folded onto the kept ones (how the probe is made)
    _, kept, repairs = slicer.last_slice
    full = slicer.repaired_features(x, all_units=True)
    with torch.no_grad():
        head = nn.Linear(full.shape[1], 2)
        folded = fold_into_linear(copy.deepcopy(head), slicer.graph,
                                  {g: tuple(t.cpu() for t in r) for g, r in repairs.items()}, kept)
        assert folded.in_features == feature_dim
        assert _rel(folded(out.features(x)), head(full)) <= 1e-5


class _LinearOnAMap(nn.Module):
    """A conv map pooled to 2x2, flattened, then a Linear inside the extractor: the Linear is
    the conv group's consumer and absorbs its repair column block by column block."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(32, 12)

    def forward(self, x):
        h = self.pool(torch.relu(self.bn(self.conv(x))))
        return torch.relu(self.fc(torch.flatten(h, 1)))


def test_a_linear_reading_a_flattened_map_absorbs_the_repair_exactly():
    _, spec, fs = setup("lwconv")
    torch.manual_seed(0)
    model = _randomise_bn(Classifier(_LinearOnAMap(), 12, 3))
    slicer = Slicer(model, spec, fs, slice_preset("quick", **HALF))
    assert slicer.graph.consumer_inner == {"fc": 4} and slicer.graph.output_inner == 1
    out = slicer.slice_class(1)
    conv_group, fc_group = slicer.graph.groups
    assert out.features.conv.out_channels == 4
    assert out.features.fc.in_features == len(out.kept[conv_group.id]) * 4 == 16
    assert out.features.fc.out_features == len(out.kept[fc_group.id]) == 6
    _assert_fuses_exactly(slicer, out.features, spec.encode(fs.raw))


def test_a_unit_of_a_flattened_map_is_scored_on_every_position():
    # unit 0 is non-zero at one position of its 2x2 map only: the last of its four flat positions
    features = nn.Sequential(nn.Conv2d(2, 3, 1, bias=False), nn.Flatten())
    with torch.no_grad():
        features[0].weight.copy_(torch.tensor([[1.0, 0], [0, 1], [0, 0]]).view(3, 2, 1, 1))
    x = torch.zeros(2, 2, 2, 2)
    x[:, 0, 1, 1] = 3.0
    graph = trace(features, x)
    state = attach(graph)
    state.observe = {graph.groups[0].id}
    graph.module(x)
    torch.testing.assert_close(state.unit_norms(graph.groups[0].id), torch.tensor([[3.0, 0, 0]] * 2))


def test_flattened_units_are_scored_and_repaired_on_their_whole_map():
    """lwconv's last group: its score is the norm of each channel's whole 4x4 map (as the l2,1
    penalty sees it), and the repair is fitted on one row per sample and position."""
    model, spec, fs = setup("lwconv")
    slicer = Slicer(model, spec, fs, slice_preset("quick", **TINY))
    gid = slicer.graph.groups[-1].id
    y = torch.as_tensor(fs.labels == 1).long()
    w = slicer.fresh_weights(gid)
    x = spec.encode(fs.raw)
    with torch.no_grad():
        maps = model.features[:12](x)                                    # (N, C, 4, 4)
    torch.testing.assert_close(slicer.scores(gid, w, y), maps[y.bool()].pow(2).sum((2, 3)).sqrt().mean(0))
    rows, samples = slicer.group_activations(gid, w)
    torch.testing.assert_close(rows, maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1]))
    assert samples.tolist() == torch.arange(len(fs.labels)).repeat_interleave(16).tolist()


class _Net(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.body = body

    def forward(self, x):
        return self.body(self, self.conv(x))


@pytest.mark.parametrize("body,op,why", [
    (lambda m, h: m.norm(torch.flatten(h, 1)), "BatchNorm1d", "one parameter per position"),
    (lambda m, h: h.permute(0, 2, 1, 3).flatten(1), "flatten", "units would interleave"),
    (lambda m, h: torch.cat([h.flatten(1), h.mean((2, 3))], 1), "cat", "different sizes"),
])
def test_what_cannot_follow_a_flattened_map_is_refused_by_name(body, op, why):
    net = _Net(body)
    net.norm = nn.BatchNorm1d(4 * 8 * 8)
    with pytest.raises(UnsupportedLayerError, match=why) as e:
        trace(net, torch.randn(2, 3, 8, 8))
    assert e.value.op == op or e.value.op.endswith(op), e.value.op
