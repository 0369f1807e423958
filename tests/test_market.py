"""Market: task presets, the model store's integrity guarantees, training through Ray."""
from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from snp_ray.errors import ArtifactNotFoundError, IntegrityError, UnknownNameError
from snp_ray.market import Market, ModelSpec, ModelStore, build_market
from snp_ray.market.tasks import TASKS, combinations, count_combinations, get_task, target_sets
from snp_ray.models import build_model


def n_test_rows(dataset: str, classes) -> int:
    """How many test rows ``classes`` have, counted straight from the parquet file."""
    labels = pq.read_table(Path(os.environ["SNP_DATA_ROOT"]) / dataset / "test.parquet",
                           columns=["label"]).column("label").to_numpy()
    return int(np.isin(labels, list(classes)).sum())


def assert_is_test_accuracy(acc: float, dataset: str, classes) -> int:
    """``acc`` is a count of correct predictions over the test rows of ``classes``: a multiple of
    1/n (an accuracy on other rows, or a mean of per-batch accuracies, is not). Returns n."""
    n = n_test_rows(dataset, classes)
    assert n > 0 and abs(acc * n - round(acc * n)) < 1e-6, (acc, n)
    return n


def assert_stored_test_accuracy(root, model_id: str, reported: float) -> None:
    """``reported`` is the test accuracy of the weights stored under ``model_id``, recomputed here
    independently: the whole test split, filtered and labelled with numpy, the stored model run on
    it and its outputs mapped to global class ids by hand. Exact, except that a row whose two top
    logits lie within 1e-4 (where float rounding could flip the argmax) may count either way."""
    from snp_ray.data.testsplit import load_test_split

    model, spec = ModelStore(root).load(model_id)
    split = load_test_split(spec.dataset)
    rows = np.flatnonzero(np.isin(split.labels, spec.classes))
    assert rows.size == n_test_rows(spec.dataset, spec.classes)
    sub = split.rows(rows)
    raw = sub.images if sub.images is not None else sub.texts
    with torch.no_grad():
        logits = torch.cat([model.eval()(spec.input_spec.encode(raw[i:i + 1000]))
                            for i in range(0, len(raw), 1000)])
    assert logits.shape == (rows.size, len(spec.classes))
    top2 = logits.topk(2, dim=1).values
    close = int((top2[:, 0] - top2[:, 1] < 1e-4).sum())
    correct = int((np.asarray(spec.classes)[logits.argmax(1).numpy()] == sub.labels).sum())
    assert abs(reported * rows.size - correct) <= close + 1e-6, (model_id, reported, correct, rows.size)


def test_task_splits_follow_the_method_notes():
    assert TASKS["T1"].model_classes == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert TASKS["T7"].model_classes == [[0, 1, 2], [2, 3, 4]]
    for name in ("T2", "T3", "T4"):
        t = TASKS[name]
        assert t.num_models == 5 and all(len(c) == 20 for c in t.model_classes)
        assert sorted(itertools.chain(*t.model_classes)) == list(range(100))
    t5 = TASKS["T5"]
    assert t5.num_models == 10 and sorted(itertools.chain(*t5.model_classes)) == list(range(100))


def test_t2_models_hold_whole_superclasses_and_t3_spans_them():
    from snp_ray.market.tasks import CIFAR100_FINE_TO_COARSE as coarse
    for i, cs in enumerate(TASKS["T2"].model_classes):
        assert {coarse[c] for c in cs} == set(range(4 * i, 4 * i + 4))
    for cs in TASKS["T3"].model_classes:
        assert sorted(coarse[c] for c in cs) == list(range(20))


def test_t3_c10_has_464_combinations_by_enumeration():
    t = get_task("T3-C10")
    brute = [c for c in itertools.product(*t.model_classes) if len(set(c)) == 5]
    assert len(brute) == 464 == count_combinations(t) == len(combinations(t))
    assert all(t.holders(c) and len(t.holders(c)) == 2 for c in range(10))


def test_target_sets_are_distinct_and_seeded():
    t = get_task("T1")
    sets = target_sets(t, 5, seed=1)
    assert len(set(sets)) == 5 and sets == target_sets(t, 5, seed=1)
    assert all(s[i] in t.model_classes[i] for s in sets for i in range(3))
    assert len(target_sets(t, 1000, seed=0)) == 36
    assert target_sets(get_task("T7"), 5, 0) == [(0, 1, 2, 3, 4)]


def test_unknown_task_lists_valid_names():
    with pytest.raises(UnknownNameError, match="T3-C10"):
        get_task("T8")


def _spec(mid="T1-m0-vgg11-w0.125"):
    return ModelSpec(id=mid, task="T1", index=0, arch="vgg11", width=0.125, dataset="cifar10",
                     classes=[0, 1, 2], class_names=["a", "b", "c"],
                     input={"kind": "image", "mean": [0.5] * 3, "std": [0.2] * 3})


def test_model_store_round_trip_is_bit_exact(tmp_path):
    store = ModelStore(tmp_path)
    model = build_model("vgg11", 3, 0.125)
    saved = store.save(model, _spec())
    loaded, spec = store.load(saved.id)
    assert spec == saved and len(spec.weights_sha256) == 64
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_tampered_weights_fail_the_checksum(tmp_path):
    store = ModelStore(tmp_path)
    spec = store.save(build_model("vgg11", 3, 0.125), _spec())
    path = store.model_dir(spec.id) / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        store.load(spec.id)


def test_spec_that_does_not_match_its_weights(tmp_path):
    store = ModelStore(tmp_path)
    spec = store.save(build_model("vgg11", 3, 0.125), _spec())
    spec_path = store.model_dir(spec.id) / "spec.json"
    spec_path.write_text(spec_path.read_text().replace('"width": 0.125', '"width": 0.25'))
    with pytest.raises(IntegrityError, match="do not match the spec"):
        store.load(spec.id)


def test_missing_model_lists_what_is_there(tmp_path):
    store = ModelStore(tmp_path)
    store.save(build_model("vgg11", 3, 0.125), _spec())
    with pytest.raises(ArtifactNotFoundError, match="T1-m0-vgg11-w0.125"):
        store.load("T1-m9-vgg11-w0.125")


def test_build_market_trains_through_ray_and_skips_on_rerun(smoke_market):
    SMOKE, tmp_path, specs = smoke_market
    assert [s.id for s in specs] == [f"T1-m{i}-vgg11-w0.125" for i in range(3)]
    assert [s.classes for s in specs] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert specs[0].class_names == ["airplane", "automobile", "bird"]
    for s in specs:   # the reported test accuracy is exactly that of the stored weights
        assert s.params > 0
        assert_stored_test_accuracy(tmp_path, s.id, s.metrics["test_accuracy"])
    weights = ModelStore(tmp_path).model_dir(specs[0].id) / "weights.safetensors"
    before = os.stat(weights).st_mtime_ns
    again = build_market(SMOKE, tmp_path, progress=False)
    assert again == specs and os.stat(weights).st_mtime_ns == before

    market = Market(tmp_path)
    fs = market.fewshot(specs[2].id, 10)
    assert fs.raw.shape == (40, 32, 32, 3) and fs.classes == [6, 7, 8, 9]
    assert market.manifest(specs[2].id, 10) == fs.manifest  # stored, not redrawn
    assert set(fs.manifest.row_ids[0]) >= set(market.manifest(specs[2].id, 5).row_ids[0])
    assert market.class_id("cat") == 3 and market.class_id("3") == 3
