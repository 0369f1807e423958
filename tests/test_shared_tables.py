"""Shared lookup tables in text packs (issue #17, section 2): fragments of one source model in a
pack share one embedding table, exactly (the same outputs), and the pack is smaller, saves,
loads and exports. Small random GRU/TextCNN models over real TREC sentences, briefly sliced."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from snp_ray.data.fewshot import FewShotManifest, FewShotSet
from snp_ray.data.specs import TextSpec
from snp_ray.data.tables import read_split
from snp_ray.data.text import build_vocab
from snp_ray.errors import IntegrityError
from snp_ray.data.testsplit import load_test_split
from snp_ray.models import build_model
from snp_ray.packing import PackConfig, PackedModel, Packer, PackSamples
from snp_ray.packing.shared import EmbeddingView
from snp_ray.slicing import Slicer, slice_preset
from conftest import as_fragment
from test_packing import assert_exports_match

FAST = PackConfig(epochs=5, hidden=16, augment_views=1)
TINY = dict(pool_epochs=1, adapt_epochs=1, combine_epochs=1)
K = 3


@pytest.fixture(scope="module")
def trec(real_data):
    """Real TREC sentences: the train rows of each class, and 200 test rows of all classes."""
    train = read_split("trec", "train")
    test = load_test_split("trec")
    return train, test.texts[:200]


def _model_fragments(arch: str, train, classes: list[int], sliced: list[int], seed: int,
                     **cfg) -> tuple[list, FewShotSet]:
    """Fragments of ``sliced`` classes from one random model of ``classes`` (its own TREC
    vocabulary), sliced on K real sentences per class."""
    torch.manual_seed(seed)
    rows = [np.flatnonzero(train.labels == c)[:40] for c in classes]
    spec = TextSpec(vocab=build_vocab([train.texts[i] for r in rows for i in r], max_size=1500),
                    max_len=20)
    picked = [r[:K] for r in rows]
    raw = [train.texts[i] for r in picked for i in r]
    fs = FewShotSet(FewShotManifest(dataset="trec", k=K, seed=seed, classes=classes,
                                    row_ids=[r.tolist() for r in picked]),
                    raw, np.repeat(classes, K), [train.class_names[c] for c in classes])
    model = build_model(arch, len(classes), 0.25, vocab_size=len(spec.vocab)).eval()
    slicer = Slicer(model, spec, fs, slice_preset("quick", **{**TINY, **cfg}))
    return [as_fragment(slicer.slice_class(c), slicer, arch, 0.25, c, seed) for c in sliced], fs


def _pack(arch: str, train, **cfg) -> tuple[PackedModel, list, PackSamples]:
    """Two fragments of model A (classes 0, 1) and one of model B (class 3), packed with one
    table per fragment."""
    a, fa = _model_fragments(arch, train, [0, 1, 2], [0, 1], 1, **cfg)
    b, fb = _model_fragments(arch, train, [3, 4, 5], [3], 2, **cfg)
    frags = a + b
    samples = PackSamples.from_fewshot([fa, fb], [0, 1, 3])
    return Packer(FAST.replace(share_tables=False)).pack(frags, samples, [0, 1, 3]), frags, samples


@pytest.fixture(scope="module", params=["gru", "textcnn"])
def frozen_pack(request, trec, one_thread):
    return request.param, *_pack(request.param, trec[0], freeze_tables=True, mode="rate", beta=0.5)


def _logits(packed: PackedModel, texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return packed(*packed.encode(texts, strict=False))


def test_shared_tables_are_exact_and_smaller(frozen_pack, trec):
    arch, packed, frags, _ = frozen_pack
    texts = trec[1]
    shared = copy.deepcopy(packed)
    saved = shared.share_tables()
    # one table, read by model A's two fragments; model B's single fragment keeps its own
    assert [(t.module, t.readers) for t in shared.spec.tables] == [("embedding", [0, 1])]
    table = shared.tables["t0"].weight
    kept = [frags[i].spec.kept["0"] for i in (0, 1)]
    assert table.shape == (frags[0].features.embedding.num_embeddings, len(set(kept[0]) | set(kept[1])))
    assert saved == table.shape[0] * (len(kept[0]) + len(kept[1]) - table.shape[1]) > 0
    assert shared.params_deployable() == packed.params_deployable() - saved
    assert isinstance(shared.fragments[0].features.embedding, EmbeddingView)
    assert not isinstance(frags[0].features.embedding, EmbeddingView)    # the inputs are untouched
    before, after = _logits(packed, texts), _logits(shared, texts)
    assert float((before - after).abs().max()) <= 1e-6
    pb, pa = packed.predict_proba(texts, strict=False), shared.predict_proba(texts, strict=False)
    assert float((pb - pa).abs().max()) <= 1e-6
    # the comparison can fail: fragment 1 reading its columns in the wrong order is caught
    wrong = copy.deepcopy(shared)
    view = wrong.fragments[1].features.embedding
    view.index.copy_(view.index.roll(1))
    assert float((before - _logits(wrong, texts)).abs().max()) > 1e-4


def test_shared_pack_saves_once_loads_and_exports(frozen_pack, trec, tmp_path):
    arch, packed, _, _ = frozen_pack
    shared = copy.deepcopy(packed)
    shared.share_tables()
    folder = shared.save(tmp_path / "pk")
    from safetensors import safe_open
    with safe_open(str(folder / "weights.safetensors"), "pt") as fh:
        keys = set(fh.keys())
    assert "tables.t0.weight" in keys and not any(k.endswith("embedding.table.weight") for k in keys)
    assert "fragments.0.features.embedding.index" in keys
    loaded = PackedModel.load(folder)
    assert loaded.params_deployable() == shared.params_deployable() < packed.params_deployable()
    assert torch.equal(_logits(loaded, trec[1]), _logits(shared, trec[1]))
    rng = np.random.default_rng(0)
    assert_exports_match(loaded, lambda n: list(rng.choice(trec[1], n)), tmp_path / "x")


def test_tampered_table_layout_is_refused(frozen_pack, tmp_path):
    _, packed, _, _ = frozen_pack
    shared = copy.deepcopy(packed)
    shared.share_tables()
    folder = shared.save(tmp_path / "pk")
    spec = json.loads((folder / "pack.json").read_text())
    spec["tables"][0]["units"] = list(reversed(spec["tables"][0]["units"]))   # weights untouched
    (folder / "pack.json").write_text(json.dumps(spec))
    with pytest.raises(IntegrityError, match="index into 't0' is invalid"):
        PackedModel.load(folder)


def test_packer_shares_by_default(frozen_pack, trec):
    """``PackConfig.share_tables`` (on by default, and then out of the config's digest)."""
    _, packed, frags, samples = frozen_pack
    assert not packed.spec.tables                                 # the fixture turned it off
    default = Packer(FAST).pack(frags, samples, [0, 1, 3])
    assert [t.readers for t in default.spec.tables] == [[0, 1]]
    assert default.params_deployable() < packed.params_deployable()
    assert torch.equal(_logits(default, trec[1]), _logits(packed, trec[1]))
    assert PackConfig().digest() == PackConfig(share_tables=True).digest() != \
        PackConfig(share_tables=False).digest()


def test_trained_tables_share_nothing(trec, one_thread):
    """Without ``freeze_tables`` each fragment fine-tunes its table: no column is shared, and
    the pack stays as it was."""
    packed, _, _ = _pack("gru", trec[0], mode="rate", beta=0.5)
    shared = copy.deepcopy(packed)
    assert shared.share_tables() == 0 and not shared.spec.tables
    assert shared.params_deployable() == packed.params_deployable()
