"""No pickle anywhere a market exchanges artefacts: with pickle and unsafe torch.load disabled,
models, fragments, the fragment store and packed models all still load."""
from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import torch

from snp_ray.market import Market, ModelStore
from snp_ray.packing import PackConfig, PackedModel
from snp_ray.packing.request import pack_request
from snp_ray.slicing import slice_preset
from snp_ray.store import slice_missing
from snp_ray.store import FragmentStore


@pytest.fixture
def no_pickle(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("pickle was used")

    real_torch_load = torch.load

    def torch_load(*a, **k):
        if k.get("weights_only") is not True:
            raise AssertionError("torch.load without weights_only=True")
        return real_torch_load(*a, **k)

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", torch_load)
    real_np_load = np.load
    monkeypatch.setattr(np, "load", lambda *a, **k: real_np_load(*a, **{**k, "allow_pickle": False}))


def test_everything_loads_without_pickle(smoke_market, tmp_path, no_pickle):
    _, root, specs = smoke_market
    market_dir = tmp_path / "m"
    shutil.copytree(root, market_dir, ignore=shutil.ignore_patterns("fragments"))
    cfg = slice_preset("smoke")
    list(slice_missing(Market(market_dir), 5, cfg))
    with pytest.raises(AssertionError, match="pickle was used"):   # the guard is live
        pickle.loads(b"")
    store = ModelStore(market_dir)
    for mid in store.ids():
        store.load(mid)
    frags = FragmentStore(market_dir / "fragments")
    for key in frags.keys():
        frags.get(key)
    packed = pack_request(Market(market_dir), ["airplane", "cat"], 5, cfg, PackConfig(epochs=2))
    packed.save(tmp_path / "pack")
    again = PackedModel.load(tmp_path / "pack")
    x = Market(market_dir).fewshot(specs[0].id, 5).raw
    assert np.array_equal(again.predict(x), packed.predict(x))
