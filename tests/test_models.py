"""Model zoo: sizes from the paper, feature/head split, width multipliers, text models."""
from __future__ import annotations

import pytest
import torch

from snp_ray.errors import ConfigError, UnknownNameError
from snp_ray.models import ARCHS, build_model, count_params
from snp_ray.models.resnet import BasicBlock


def test_vgg16_has_the_papers_parameter_count():
    params = count_params(build_model("vgg16", 10, 1.0))
    assert abs(params - 14.7e6) / 14.7e6 <= 0.02, params


@pytest.mark.parametrize("arch", ["vgg11", "vgg13", "vgg16", "vgg19", "resnet20", "resnet32",
                                  "resnet56", "resnet34", "lwconv"])
def test_image_models_split_features_from_head(arch):
    m = build_model(arch, 7, 0.25).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = m.features(x)
    assert feats.shape == (2, m.feature_dim)
    assert isinstance(m.head, torch.nn.Linear) and m.head.out_features == 7
    torch.testing.assert_close(m(x), m.head(feats))


@pytest.mark.parametrize("arch", ["textcnn", "gru", "lstm"])
def test_text_models_take_token_ids(arch):
    m = build_model(arch, 3, 1.0, vocab_size=50).eval()
    tokens = torch.randint(2, 50, (4, 12))
    assert m(tokens).shape == (4, 3)
    assert m.features(tokens).shape == (4, m.feature_dim)


def test_rnn_ignores_right_padding():
    m = build_model("gru", 3, 1.0, vocab_size=30).eval()
    short = torch.tensor([[5, 6, 7]])
    padded = torch.tensor([[5, 6, 7, 0, 0, 0]])
    torch.testing.assert_close(m(short), m(padded))


def test_width_multiplier_scales_channels():
    narrow, wide = build_model("vgg11", 10, 0.25), build_model("vgg11", 10, 1.0)
    assert narrow.feature_dim == 128 and wide.feature_dim == 512
    assert count_params(narrow) < count_params(wide) / 10


@pytest.mark.parametrize("arch,blocks", [("resnet20", 9), ("resnet32", 15), ("resnet56", 27),
                                         ("resnet34", 16)])
def test_resnet_depths(arch, blocks):
    m = build_model(arch, 10, 0.25)
    assert sum(isinstance(b, BasicBlock) for b in m.modules()) == blocks


def test_lwconv_is_learnwares_cifar_convmodel():
    """3 x [Conv2d 3x3 (bias), BatchNorm2d, ReLU, AvgPool2d(2)] at 64 channels, the (64, 4, 4) map
    flattened to 1024 features, Linear(1024, classes): 86,282 parameters at 10 classes, the
    count of learnware's ConvModel(3, 10) (net_width=64, net_depth=3)."""
    m = build_model("lwconv", 10).eval()
    assert count_params(m) == 86_282
    convs = [c for c in m.features if isinstance(c, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.padding, c.bias is not None) for c in convs] == \
        [(64, (3, 3), (1, 1), True)] * 3
    assert sum(isinstance(c, torch.nn.AvgPool2d) for c in m.features) == 3
    assert m.features(torch.randn(2, 3, 32, 32)).shape == (2, 1024) and m.feature_dim == 1024
    assert (m.head.in_features, m.head.out_features) == (1024, 10)
    half = build_model("lwconv", 4, 0.5)
    assert half.feature_dim == 32 * 16 and half.head.out_features == 4


def test_unknown_arch_lists_valid_names():
    with pytest.raises(UnknownNameError) as e:
        build_model("vgg99", 10)
    for name in ARCHS:
        assert name in str(e.value)


def test_text_model_needs_a_vocabulary():
    with pytest.raises(ConfigError, match="vocab_size"):
        build_model("textcnn", 3)
