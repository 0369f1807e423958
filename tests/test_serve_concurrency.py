"""Issue #26 part 2: a deterministic, race-free service. Packs built side by side equal packs
built one by one; fx tracing in one thread leaves other threads' forwards alone; fragment-store
reads see one snapshot; the pack store returns what it stored, exports once, and evicts by bytes
without losing a pack in use."""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from snp_ray.slicing.graph import symbolic_trace


class _Pause(nn.Module):
    """A traced (non-leaf) module that holds the trace open until another thread says so."""

    def __init__(self, inside: threading.Event, resume: threading.Event):
        super().__init__()
        self.inside, self.resume = inside, resume
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        self.inside.set()
        assert self.resume.wait(30), "the other thread never finished"
        return self.lin(x)


def test_a_trace_leaves_other_threads_forwards_alone():
    inside, resume = threading.Event(), threading.Event()
    traced = nn.Sequential(nn.Linear(4, 4), _Pause(inside, resume), nn.ReLU())
    other = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.randn(5, 4)
    expected = other(x)
    out: dict[str, object] = {}

    def tracer():
        out["gm"] = symbolic_trace(traced)

    t = threading.Thread(target=tracer)
    t.start()
    try:
        assert inside.wait(30)
        try:                             # fx's Module.__call__ patch is live right now
            out["forward"] = other(x)
        except Exception as e:           # plain fx: NameError (not installed as a submodule)
            out["forward"] = e
    finally:
        resume.set()
        t.join(30)
    assert isinstance(out["forward"], torch.Tensor), out["forward"]
    assert torch.equal(out["forward"], expected)
    gm = out["gm"]                       # and the trace itself is whole
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "call_module",
                                              "call_module", "output"]
    assert nn.Module.__call__ is torch.fx._symbolic_trace._orig_module_call


# ---------------------------------------------------------------- packs built side by side
FAST = dict(epochs=4, hidden=16, augment_views=2)


@pytest.fixture(scope="module")
def two_fragments():
    """Two fragments (classes 0 and 1) of one small VGG, and their few-shot samples."""
    from conftest import make_fragment
    from snp_ray.data.specs import ImageSpec
    from snp_ray.packing import PackSamples

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    spec = ImageSpec(mean=[0.5, 0.4, 0.3], std=[0.2, 0.2, 0.2])
    a, fs = make_fragment("vgg11", 0, spec, 1)
    b, _ = make_fragment("vgg11", 1, spec, 1)
    yield [a, b], PackSamples.from_fewshot([fs], [0, 1])
    torch.set_num_threads(before)


def _weights(packed) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in packed.state_dict().items()
            if not k.startswith("fragments.")}


def test_packs_built_side_by_side_equal_packs_built_one_by_one(two_fragments):
    from snp_ray.packing import PackConfig, Packer

    frags, samples = two_fragments
    builds = [(PackConfig(seed=s, **FAST), frags if s % 2 else frags[:1], [0, 1] if s % 2 else [0])
              for s in range(8)]

    def build(i: int):
        cfg, fr, classes = builds[i]
        return _weights(Packer(cfg).pack(fr, samples, classes, cv_folds=2))

    alone = [build(i) for i in range(8)]
    state = torch.random.get_rng_state()
    start = threading.Barrier(8)
    side: list = [None] * 8

    def worker(i: int):
        start.wait()
        torch.manual_seed(1000 + i)     # what other threads do to the global RNG meanwhile
        side[i] = build(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    torch.random.set_rng_state(state)
    assert len({tuple(w["enc.weight"].flatten()[:4].tolist()) for w in alone}) == 8  # 8 distinct
    for i in range(8):
        assert side[i] is not None and side[i].keys() == alone[i].keys()
        for k in alone[i]:
            assert torch.equal(side[i][k], alone[i][k]), (i, k)


def test_a_pack_build_neither_reads_nor_moves_the_global_rng(two_fragments):
    from snp_ray.packing import PackConfig, Packer

    frags, samples = two_fragments
    torch.manual_seed(5)
    first = _weights(Packer(PackConfig(seed=3, **FAST)).pack(frags, samples, [0, 1]))
    after = torch.random.get_rng_state()
    torch.manual_seed(123)               # another global state: the same pack
    again = _weights(Packer(PackConfig(seed=3, **FAST)).pack(frags, samples, [0, 1]))
    torch.manual_seed(5)
    assert torch.equal(after, torch.random.get_rng_state())
    assert all(torch.equal(first[k], again[k]) for k in first)


# ---------------------------------------------------------------- fragment store snapshots
@pytest.fixture
def stored(two_fragments, tmp_path):
    from snp_ray.store import FragmentStore

    store = FragmentStore(tmp_path / "fragments")
    for f in two_fragments[0]:
        store.put(f)
    return store.refresh(), two_fragments[0]


def test_a_snapshot_is_one_view_of_the_manifest(stored, two_fragments):
    from snp_ray.store import FragmentStore

    store, frags = stored
    keys = [f.spec.key for f in frags]
    snap = store.snapshot()
    assert snap.keys() == set(keys) and set(snap.class_rows(0)) == {keys[0]}
    other = FragmentStore(store.uri, writer="other")           # another process's write
    extra = frags[0].spec.replace(k=7)
    from snp_ray.slicing import Fragment
    other.put(Fragment(extra, frags[0].features, frags[0].probe))
    store.refresh()
    assert store.keys() == set(keys) | {extra.key}              # the store sees the new row
    assert snap.keys() == set(keys)                             # the snapshot keeps its view
    assert set(snap.class_rows(0)) == {keys[0]} and snap.lookup(keys[1])["class_id"] == 1


# ---------------------------------------------------------------- pack store
PIDS = [f"{i:024x}" for i in range(1, 6)]


@pytest.fixture(scope="module")
def packed(two_fragments):
    from snp_ray.packing import PackConfig, Packer

    frags, samples = two_fragments
    return Packer(PackConfig(seed=0, **FAST)).pack(frags, samples, [0, 1])


def test_a_writer_that_lost_the_rename_race_returns_the_stored_meta(packed, tmp_path, monkeypatch):
    from snp_ray.serve.packstore import PackStore

    store = PackStore(tmp_path / "packs")
    won = store.put(PIDS[0], packed, {"created": 1.0, "who": "first"})
    late = PackStore(tmp_path / "packs")
    looks = iter([False])                                   # it looked before the first wrote
    monkeypatch.setattr(late, "has", lambda pid: next(looks, True))
    got = late.put(PIDS[0], packed, {"created": 2.0, "who": "second"})
    assert got == won == store.meta(PIDS[0]) and got["who"] == "first"
    staging = tmp_path / "packs" / ".staging"                # the loser's folder is gone
    assert not staging.exists() or not any(staging.iterdir())


def test_an_export_is_made_once_however_many_ask_at_once(packed, tmp_path, monkeypatch):
    import time

    import snp_ray.packing.model as model_mod
    from snp_ray.serve.packstore import PackStore

    store = PackStore(tmp_path / "packs")
    store.put(PIDS[0], packed, {})
    calls = []

    def slow_export(pack, path):
        calls.append(path)
        time.sleep(0.5)              # every other thread asks meanwhile
        path.write_bytes(b"onnx")
        return path

    monkeypatch.setattr(model_mod, "export_onnx", slow_export)
    start, got = threading.Barrier(4), []

    def ask():
        start.wait()
        got.append(store.file(PIDS[0], "model.onnx"))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(calls) == 1 and len(got) == 4 and {p.read_bytes() for p in got} == {b"onnx"}


def _age(store, pid: str, seconds_ago: float) -> None:
    import os
    import time

    t = time.time() - seconds_ago
    os.utime(store.root / pid / "meta.json", (t, t))


def test_the_pack_store_evicts_least_recently_used_packs_by_bytes(packed, tmp_path):
    from snp_ray.serve.packstore import PackStore

    probe = PackStore(tmp_path / "probe")
    probe.put(PIDS[0], packed, {})
    size = probe.size(PIDS[0])
    store = PackStore(tmp_path / "packs", max_bytes=int(2.5 * size), grace_s=10.0)
    for i, pid in enumerate(PIDS[:2]):
        store.put(pid, packed, {})
        _age(store, pid, 100 - i)                            # PIDS[0] least recently used
        store.remember(f"{i:032x}", pid)
    token = store.hold(PIDS[0])                              # loaded in a predictor
    store.put(PIDS[2], packed, {})                           # over the bound: PIDS[1] goes
    assert store.ids() == [PIDS[0], PIDS[2]]
    assert store.lookup(f"{1:032x}") is None and store.lookup(f"{0:032x}") == PIDS[0]
    assert not (store.root / "requests" / f"{1:032x}.json").exists()  # no entry names it
    store.used(PIDS[0])                                      # a pack used within grace_s stays
    store.release(token)
    store.put(PIDS[3], packed, {})
    assert store.ids() == [PIDS[0], PIDS[2], PIDS[3]]      # nothing evictable: over the bound
    _age(store, PIDS[0], 50)
    _age(store, PIDS[2], 60)
    store.put(PIDS[4], packed, {})
    assert store.ids() == [PIDS[3], PIDS[4]]              # the two oldest went, LRU first
    assert store.lookup(f"{0:032x}") is None
    assert not any((store.root / ".trash").iterdir())


def test_an_unbounded_pack_store_evicts_nothing(packed, tmp_path):
    from snp_ray.serve.packstore import PackStore

    store = PackStore(tmp_path / "packs", grace_s=0.0)
    for pid in PIDS:
        store.put(pid, packed, {})
    assert store.ids() == PIDS and store.evict() == []


# ---------------------------------------------------------------- predictor batches
def test_a_pack_that_fails_to_load_fails_only_its_own_requests():
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from snp_ray.errors import ArtifactNotFoundError
    from snp_ray.serve.deploy import run_batch

    class Pack:
        def predict_proba(self, raw):
            return torch.full((len(raw), 2), float(raw[0]))

    async def load(pid):
        if pid == "bad":
            raise ArtifactNotFoundError("no pack bad")
        return Pack()

    batch = [("good", np.array([1.0])), ("bad", np.array([2.0])), ("good", np.array([3.0, 3.0]))]
    # a thread of its own: the session's Playwright browser keeps an event loop in this one
    with ThreadPoolExecutor(1) as ex:
        out = ex.submit(asyncio.run, run_batch(batch, load)).result()
    assert isinstance(out[1], ArtifactNotFoundError)
    assert out[0].tolist() == [[1.0, 1.0]] and out[2].tolist() == [[1.0, 1.0], [1.0, 1.0]]


def test_a_held_pack_is_released_once_on_unload(tmp_path):
    from snp_ray.serve.deploy import Held
    from snp_ray.serve.packstore import PackStore

    store = PackStore(tmp_path / "packs")
    held = Held(object(), store, store.hold(PIDS[0]))
    other = store.hold(PIDS[0])
    assert store.in_use() == {PIDS[0]}
    held.__del__()                   # Serve's multiplexer on unload
    held.__del__()                   # and Python at collection: no second release
    assert store.in_use() == {PIDS[0]}
    store.release(other)
    assert store.in_use() == set()


# ---------------------------------------------------------------- caches and health
def test_the_fragment_cache_is_bounded_in_bytes():
    from snp_ray.serve.service import ByteLRU

    lru = ByteLRU(100)
    assert lru.put("a", "A", 40) == "A" and lru.put("b", "B", 40) == "B"
    assert lru.get("a") == "A"               # a is now the most recently used
    assert lru.put("c", "C", 40) == "C"      # 120 > 100: b (least recent) goes
    assert "b" not in lru and lru.get("a") == "A" and lru.bytes == 80
    assert lru.put("a", "other", 40) == "A"  # a concurrent second load keeps the first
    assert lru.put("huge", "H", 500) == "H"  # alone over the bound, the newest still stays
    assert len(lru) == 1 and lru.bytes == 500


def test_fragment_bytes_counts_parameters_and_buffers(two_fragments):
    from snp_ray.serve.service import fragment_bytes

    f = two_fragments[0][0]
    expected = sum(t.numel() * 4 for t in f.state_dict().values() if t.is_floating_point())
    expected += sum(t.numel() * t.element_size() for t in f.state_dict().values()
                    if not t.is_floating_point())
    assert fragment_bytes(f) == expected > 0


def test_health_answers_from_memory_without_reading_the_market():
    import time

    from snp_ray.serve.catalogue import Catalogue, ServedClass
    from snp_ray.serve.config import ServeConfig
    from snp_ray.serve.service import MarketService, _View

    service = MarketService.__new__(MarketService)          # no market: health must not need one
    service.cfg = ServeConfig(market="nowhere", refresh_s=0.0)
    cat = Catalogue({3: ServedClass(3, "cat")}, {}, None, time.time() - 3600)
    service._view = _View(cat, None, None)

    def reread():
        raise AssertionError("health re-read the catalogue")

    service._load_view = reread
    assert service.health() == {"status": "ok", "models": 0, "classes": 1}
