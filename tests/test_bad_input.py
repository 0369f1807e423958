"""Bad input, case by case: each raises a typed error from snp_ray.errors whose message names the
problem and the object, and leaves the market and fragment store byte-identical."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from snp_ray.errors import (ArtifactNotFoundError, ConfigError, DataError, IntegrityError,
                            SnpError, UnknownNameError)
from snp_ray.market import Market, ModelStore
from snp_ray.packing import PackConfig, Packer, PackSamples
from snp_ray.packing.request import pack_request
from snp_ray.slicing import SliceConfig, slice_preset
from snp_ray.store import slice_missing
from snp_ray.store import FragmentStore

SMOKE = slice_preset("smoke")


@pytest.fixture(scope="module")
def sliced_market(sliced_smoke):
    return sliced_smoke


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def market_dir(sliced_market, tmp_path):
    dest = tmp_path / "m"
    shutil.copytree(sliced_market, dest)
    return dest


def _blob_of(root: Path) -> tuple[FragmentStore, str, Path]:
    store = FragmentStore(root / "fragments")
    key = sorted(store.keys())[0]
    return store, key, root / "fragments" / store.rows()[key]["blob"]


# Each case: (id, action(root) -> None, expected error type, words the message must contain).
# ``prepare`` corrupts a COPY before the snapshot, so the snapshot covers the damaged store too.
def truncate_blob(root):
    _, _, blob = _blob_of(root)
    blob.write_bytes(blob.read_bytes()[:100])


def flip_blob(root):
    _, _, blob = _blob_of(root)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))


def remove_blob(root):
    _, _, blob = _blob_of(root)
    blob.unlink()


def get_fragment(root):
    store, key, _ = _blob_of(root)
    store.get(key)


def tamper_model(root):
    w = sorted((root / "models").iterdir())[0] / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0xFF
    w.write_bytes(bytes(data))


def widen_spec(root):
    spec = sorted((root / "models").iterdir())[0] / "spec.json"
    spec.write_text(spec.read_text().replace('"width": 0.125', '"width": 0.5'))


def load_model(root):
    ModelStore(root).load(sorted(ModelStore(root).ids())[0])


def upload_nan(root):
    store = ModelStore(root)
    model, spec = store.load(store.ids()[0])
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    store.save(model, spec.replace(id="uploaded-nan"))


def pack(classes, **cfg):
    def run(root):
        pack_request(Market(root), classes, 5, SMOKE, PackConfig(epochs=2, **cfg))
    return run


def drop_model(root):
    shutil.rmtree(root / "models" / sorted(p.name for p in (root / "models").iterdir())[2])


def fewshot(k):
    def run(root):
        m = Market(root)
        m.fewshot(m.ids()[0], k, seed=99)
    return run


def slice_with(**cfg):
    def run(root):
        list(slice_missing(Market(root), 5, SliceConfig(**cfg)))
    return run


def predict_unknown_text(root):
    from snp_ray.data.specs import TextSpec
    TextSpec(vocab=["<pad>", "<unk>", "good"], max_len=8).encode(["zzz qqq"], strict=True)


def images_wrong_shape(root):
    from snp_ray.data.specs import ImageSpec
    ImageSpec().encode(np.zeros((2, 28, 28, 4), np.uint8))   # other sizes are resized; 4 channels are not images


def mixed_inputs(root):
    from conftest import make_fragment
    from snp_ray.data.specs import ImageSpec
    from snp_ray.slicing import Fragment

    img, fs = make_fragment("vgg11", 0, ImageSpec(), seed=3)
    spec = img.spec.replace(input={"kind": "text", "vocab": ["<pad>", "<unk>"], "max_len": 4})
    Packer(PackConfig(epochs=1)).pack([img, Fragment(spec, img.features, img.probe)],
                                      PackSamples.from_fewshot([fs], [0]), [0])


CASES: list[tuple[str, Callable | None, Callable, type, tuple[str, ...]]] = [
    ("truncated blob", truncate_blob, get_fragment, IntegrityError, ("sha256", "fragment")),
    ("corrupt blob", flip_blob, get_fragment, IntegrityError, ("sha256", "fragment")),
    ("manifest row without blob", remove_blob, get_fragment, ArtifactNotFoundError, ("missing", "weights of fragment")),
    ("model checksum", tamper_model, load_model, IntegrityError, ("sha256", "model")),
    ("spec does not match weights", widen_spec, load_model, IntegrityError, ("do not match the spec",)),
    ("NaN weights uploaded", None, upload_nan, IntegrityError, ("NaN", "uploaded-nan")),
    ("unknown class name", None, pack(["unicorn"]), UnknownNameError, ("unicorn", "held by no model")),
    ("empty class set", None, pack([]), ConfigError, ("names no classes",)),
    ("duplicate classes", None, pack(["cat", "cat"]), ConfigError, ("duplicate", "3")),
    ("duplicate by name and id", None, pack(["cat", "3"]), ConfigError, ("duplicate",)),
    ("class held by no model", drop_model, pack(["ship"]), UnknownNameError, ("ship", "held by no model")),
    ("not sliced with this config", None,
     lambda r: pack_request(Market(r), ["cat"], 10, SMOKE), ArtifactNotFoundError, ("slice it first", "class 3")),
    ("incompatible input specs", None, mixed_inputs, ConfigError, ("incompatible inputs",)),
    ("k = 0", None, fewshot(0), DataError, ("k must be a positive integer",)),
    ("k above the samples", None, fewshot(10_000), DataError, ("fewer than k=10000", "class")),
    ("text of unknown tokens", None, predict_unknown_text, DataError, ("no token known", "zzz")),
    ("images of the wrong shape", None, images_wrong_shape, DataError, ("shape", "28, 28, 4")),
    ("alpha out of range", None, slice_with(alpha=-1.0), ConfigError, ("alpha",)),
    ("beta out of range", None, slice_with(beta=1.5), ConfigError, ("beta",)),
    ("gamma out of range", None, slice_with(gamma=-0.1), ConfigError, ("gamma",)),
    ("delta out of range", None, pack(["cat"], delta=-1.0), ConfigError, ("delta",)),
    ("unknown slice preset", None, lambda r: slice_preset("turbo"), UnknownNameError, ("turbo", "quick")),
    ("unknown job preset", None, lambda r: __import__("snp_ray.engine.presets", fromlist=["x"]).get_preset("huge"),
     UnknownNameError, ("huge", "quickstart")),
    ("unknown selection mode", None, slice_with(mode="random"), ConfigError, ("mode", "random")),
]


@pytest.mark.parametrize("name,prepare,action,error,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_and_nothing_changes(market_dir, name, prepare, action, error, words):
    if prepare:
        prepare(market_dir)
    before = snapshot(market_dir)
    with pytest.raises(error) as e:
        action(market_dir)
    assert isinstance(e.value, SnpError)
    for w in words:
        assert w in str(e.value), (name, str(e.value))
    assert snapshot(market_dir) == before, f"{name}: the store changed"
