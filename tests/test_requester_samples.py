"""Requesters bring their own labeled samples (issue #25 §1): sample identity by source and row,
the planner's score tiers and requester scoring, and packs trained on a requester's samples."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from snp_ray.data.fewshot import FewShotManifest, FewShotSet
from snp_ray.errors import DataError
from snp_ray.packing.samples import PackSamples


def _upload(sha: str, classes=(0, 1), k=5) -> FewShotSet:
    """A developer's uploaded few-shot file: rows 0..k*len(classes)-1 of its own file."""
    rows = [list(range(i * k, (i + 1) * k)) for i in range(len(classes))]
    raw = np.random.default_rng(len(sha)).integers(0, 256, (k * len(classes), 32, 32, 3), np.uint8)
    return FewShotSet(FewShotManifest(dataset="cifar10", k=k, seed=0, classes=list(classes),
                                      row_ids=rows, split="upload"),
                      raw, np.repeat(classes, k), ["a", "b"], source=f"upload:{sha}")


def test_two_uploaders_with_the_same_row_ids_keep_all_their_samples():
    a, b = _upload("aa" * 32), _upload("bb" * 32)
    assert a.row_ids.tolist() == b.row_ids.tolist() == list(range(10))
    samples = PackSamples.from_fewshot([a, b], [0, 1])
    assert len(samples) == 20 and len(set(samples.keys)) == 20
    # the same file reached through two models is one set of samples
    assert len(PackSamples.from_fewshot([a, _upload("aa" * 32)], [0, 1])) == 10
    # seeded shots of the train split are keyed by the split, not by an upload
    seeded = FewShotSet(a.manifest.replace(split="train"), a.raw, a.labels, a.class_names)
    assert seeded.keys[0] == "cifar10/train#0" and a.keys[0] == f"upload:{'aa' * 32}#0"


def test_tuning_folds_keep_two_uploads_apart():
    from snp_ray.tuning import deal_folds, fold_of

    a, b = _upload("aa" * 32), _upload("bb" * 32)
    by_class = {c: [k for s in (a, b) for k, y in zip(s.keys, s.labels) if y == c] for c in (0, 1)}
    fmap = deal_folds(by_class, 2, fold_seed=0)
    assert len(fmap) == 20
    for c in (0, 1):   # stratified over all 10 samples of the class, not 5 merged rows
        counts = np.bincount([fmap[k] for k in by_class[c]], minlength=2)
        assert counts.tolist() == [5, 5]
    assert fold_of(a, fmap).shape == (10,)


# ---------------------------------------------------------------------------- planner tiers
class _Stub:
    """A fragment as the planner sees it: a spec and a class score per input (here: the input
    itself, a float per sample)."""

    def __init__(self, model: str, class_id: int, scores: dict[str, float] | None = None):
        self.spec = SimpleNamespace(source_model=model, class_id=class_id, key=f"{model}-{class_id}",
                                    params=1, metrics={"fewshot_auc": 0.5})

    def eval(self):
        return self

    def class_score(self, raw):
        return torch.as_tensor(np.asarray(raw, dtype=np.float32))


def test_an_in_sample_score_never_outranks_an_honest_held_out_one():
    """Request {0, 1}. X holds both classes, Y holds only 0. Nobody but X uploaded class 1, so
    X's fragment of 0 has no held-out negatives and falls back to every sample, its own
    included (0.875). Y's fragment is judged honestly on X's uploads and scores less (0.75). Ranked together, X would win on its own training samples; it must not."""
    from snp_ray.packing.planner import FewShotPool, PlanConfig, ScoreCache, choose

    # scores are the raw inputs; Y's own samples score high, which only X's fallback counts
    raw = np.array([0.9, 0.3, 0.1, 0.5,          # X: class 0, 0, 1, 1
                    0.7, 0.6], dtype=np.float32)  # Y: class 0, 0
    labels = np.array([0, 0, 1, 1, 0, 0])
    models = np.array(["X"] * 4 + ["Y"] * 2)
    keys = np.array([f"cifar10/train#{r}" for r in range(6)], dtype=object)
    cache = ScoreCache(FewShotPool(raw, labels, models, keys))
    x0, y0 = _Stub("X", 0), _Stub("Y", 0)
    chosen, rows = choose([x0, y0], [0, 1], cache, PlanConfig("best"))
    by = {r["model"]: r for r in rows}
    assert by["X"]["source"] == "in-sample few-shot AUC" and by["X"]["score"] == 7 / 8
    assert by["Y"]["source"] == "held-out few-shot AUC" and by["Y"]["score"] == 3 / 4
    assert [f.spec.source_model for f in chosen] == ["Y"]
    # top-2 keeps both, the honest one first
    _, rows2 = choose([x0, y0], [0, 1], cache, PlanConfig("top-2"))
    assert [r["model"] for r in rows2] == ["Y", "X"]


def test_requester_samples_score_every_candidate_on_the_same_data():
    from snp_ray.packing.planner import FewShotPool, PlanConfig, ScoreCache, choose

    req = PackSamples("cifar10", np.array([0.9, 0.7, 0.6, 0.1], np.float32), np.array([0, 0, 1, 1]),
                      {}, np.array([f"requester:x#{i}" for i in range(4)], dtype=object))
    # X's score is the input, Z's is the negated input: on these labels X separates, Z inverts
    z = _Stub("Z", 0)
    z.class_score = lambda raw: -torch.as_tensor(np.asarray(raw, dtype=np.float32))
    chosen, rows = choose([_Stub("X", 0), z], [0, 1], ScoreCache(FewShotPool.from_samples(req)),
                          PlanConfig("best"))
    assert {r["source"] for r in rows} == {"requester AUC"}
    assert {r["model"]: r["score"] for r in rows} == {"X": 1.0, "Z": 0.0}
    assert [f.spec.source_model for f in chosen] == ["X"]
    assert rows[0]["n_pos"] == 2 and rows[0]["n_neg"] == 2


# ---------------------------------------------------------------------------- packs
@pytest.fixture(scope="module")
def requester(real_data):
    """A requester's imbalanced samples of classes 0, 3, 6 (3:1:1) from the train split."""
    from snp_ray.data.tables import read_split

    split = read_split("cifar10", "train")
    rows = np.concatenate([np.flatnonzero(split.labels == c)[-n:] for c, n in ((0, 9), (3, 3), (6, 3))])
    return split.images[rows], split.labels[rows]


def test_a_pack_trains_on_the_requesters_samples(sliced_smoke, requester, tmp_path):
    from conftest import write_image_parquet
    from snp_ray.data.tables import dataset_class_names
    from snp_ray.market import Market
    from snp_ray.packing import PackConfig
    from snp_ray.packing.request import pack_request
    from snp_ray.slicing import slice_preset

    images, labels = requester
    path = write_image_parquet(tmp_path / "mine.parquet", images, labels,
                               dataset_class_names("cifar10"))
    samples = PackSamples.from_parquet(path.read_bytes(), "cifar10")
    assert len(samples) == 15 and samples.counts == {"requester": 15}
    assert samples.sha256 == PackSamples.from_arrays("cifar10", images, labels).sha256
    assert samples.keys[0].startswith("requester:")
    market, cfg = Market(sliced_smoke), PackConfig(epochs=3, augment_views=1)
    alone = pack_request(market, [0, 3, 6], 5, slice_preset("smoke"), cfg, requester=samples)
    assert alone.spec.metrics["train_samples"] == 15
    both = pack_request(market, [0, 3, 6], 5, slice_preset("smoke"), cfg, requester=samples,
                        with_market_shots=True)
    assert both.spec.metrics["train_samples"] == 15 + 3 * 5     # one holder per class, k = 5
    balanced = pack_request(market, [0, 3, 6], 5, slice_preset("smoke"),
                            cfg.replace(balance="class"), requester=samples)
    assert not torch.equal(balanced.head.weight, alone.head.weight)
    with pytest.raises(DataError, match="does not name"):       # a class outside the request
        pack_request(market, [0, 3], 5, slice_preset("smoke"), cfg, requester=samples)
    with pytest.raises(DataError, match="rows"):
        PackSamples.from_parquet(path.read_bytes(), "cifar10", max_rows=10)


def test_class_weights_equalise_classes():
    from snp_ray.packing.samples import class_weights

    w = class_weights(np.array([0, 0, 0, 1]), 2)
    assert w.tolist() == pytest.approx([2 / 3, 2 / 3, 2 / 3, 2.0])
    assert w[:3].sum() == pytest.approx(w[3:].sum())


def test_requester_samples_a_fragment_was_sliced_on_do_not_score_it():
    """A benchmark's user labels are train rows, and a fragment's own k shots may be among them:
    those samples are left out of that fragment's requester AUC."""
    from snp_ray.packing.planner import FewShotPool, PlanConfig, ScoreCache, choose

    keys = np.array([f"cifar10/train#{i}" for i in range(4)], dtype=object)
    req = PackSamples("cifar10", np.array([0.9, 0.1, 0.6, 0.4], np.float32), np.array([0, 0, 1, 1]),
                      {}, keys)
    cache = ScoreCache(FewShotPool.from_samples(req))
    _, rows = choose([_Stub("X", 0)], [0, 1], cache, PlanConfig("best"))
    assert rows[0]["score"] == 0.5 and rows[0]["n_pos"] == 2
    # X was sliced on train row 1 (a positive it scores badly): without it, X separates
    _, rows = choose([_Stub("X", 0)], [0, 1], cache, PlanConfig("best"),
                     seen=lambda f: np.array(["cifar10/train#1"], dtype=object))
    assert rows[0]["score"] == 1.0 and rows[0]["n_pos"] == 1


def test_merged_samples_count_only_what_they_add():
    a = PackSamples("cifar10", np.zeros((2, 32, 32, 3), np.uint8), np.array([0, 1]), {},
                    np.array(["cifar10/train#1", "cifar10/train#2"], dtype=object), {"requester": 2})
    b = PackSamples("cifar10", np.zeros((2, 32, 32, 3), np.uint8), np.array([1, 0]), {},
                    np.array(["cifar10/train#2", "cifar10/train#3"], dtype=object), {"market": 2})
    both = a.with_(b)
    assert len(both) == 3 and both.counts == {"requester": 2, "market": 1}


def test_an_upload_without_its_source_is_refused():
    m = FewShotManifest(dataset="cifar10", k=1, seed=0, classes=[0], row_ids=[[0]], split="upload")
    with pytest.raises(DataError, match="source"):
        FewShotSet(m, np.zeros((1, 32, 32, 3), np.uint8), np.array([0]), ["a"])
