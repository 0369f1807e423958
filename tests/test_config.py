"""Typed configs: JSON round trip, refusal of unknown keys, wrong types and bad ranges."""
from __future__ import annotations

import pytest

from snp_ray.errors import ConfigError
from snp_ray.market import MarketConfig, TrainConfig


def test_round_trip_through_json():
    cfg = MarketConfig(task="T7", arch="textcnn", width=1.0, train=TrainConfig(epochs=3, lr=0.01))
    again = MarketConfig.from_json(cfg.to_json())
    assert again == cfg and again.digest() == cfg.digest()
    assert isinstance(again.train, TrainConfig)


def test_an_added_field_leaves_the_digest_at_its_default():
    """Stores are keyed by config digests: a knob added later must not re-key them."""
    from dataclasses import dataclass

    from snp_ray.config import Config, added_field

    @dataclass
    class Old(Config):
        a: int = 1

    @dataclass
    class New(Config):
        a: int = 1
        b: bool = added_field(False)

    assert New().digest() == Old().digest() and New(b=False).to_dict() == {"a": 1, "b": False}
    assert New(b=True).digest() != Old().digest()
    assert New(a=2).digest() == Old(a=2).digest() != Old().digest()


def test_default_arch_comes_from_the_task():
    assert MarketConfig(task="T6").arch == "gru"


@pytest.mark.parametrize("data,match", [
    ({"epochs": 3, "epoch": 4}, "unknown keys"),
    ({"epochs": "3"}, "expected an integer"),
    ({"epochs": 0}, "epochs must be in"),
    ({"train_fraction": 0.0}, "train_fraction"),
    ({"lr": float("nan")}, "finite"),
    ({"augment": 1}, "true/false"),
])
def test_bad_train_configs_are_refused(data, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict(data)


def test_incompatible_arch_and_task():
    with pytest.raises(ConfigError, match="cannot learn"):
        MarketConfig(task="T1", arch="gru")


def test_not_json():
    with pytest.raises(ConfigError, match="not valid JSON"):
        TrainConfig.from_json("{epochs: 3")
