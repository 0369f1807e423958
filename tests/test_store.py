"""Fragment store: atomic, idempotent, concurrent-safe, checksummed, on local disk and real S3
(a SeaweedFS server on 127.0.0.1), readable with pyarrow.dataset and Ray Data; a manifest
partitioned by class, old flat stores still read and migrated, compaction beside writers."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

import pytest

from conftest import make_fragment
from snp_ray.data.specs import ImageSpec
from snp_ray.errors import ArtifactNotFoundError, ConfigError, IntegrityError, StoreError
from snp_ray.store import SCHEMA, FragmentStore
from snp_ray.store.synthetic import synthetic_rows


@pytest.fixture(scope="module")
def frags():
    spec = ImageSpec()
    return [make_fragment("vgg11", c, spec, seed=5)[0] for c in (0, 1)]


def _files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _parts(root) -> list:
    """Every manifest part under a store folder (flat or in a partition)."""
    return sorted((root / "manifest").rglob("*.parquet"))


def test_put_get_round_trip_and_idempotence(tmp_path, frags):
    store = FragmentStore(tmp_path / "s")
    key, written = store.put(frags[0])
    assert written and store.has(key) and key == frags[0].spec.key
    before = _files(tmp_path / "s")
    assert store.put(frags[0]) == (key, False)                 # same key: nothing rewritten
    assert FragmentStore(tmp_path / "s").put(frags[0]) == (key, False)
    assert _files(tmp_path / "s") == before
    again = store.get(key)
    for (n, a), (_, b) in zip(frags[0].state_dict().items(), again.state_dict().items()):
        assert a.equal(b), n
    row = store.find(class_id=0)[0]
    assert row["params"] == frags[0].spec.params and row["blob"].startswith("blobs/")


def test_two_writers_on_the_same_key_leave_one_fragment(tmp_path, frags):
    a, b = FragmentStore(tmp_path / "s", writer="a"), FragmentStore(tmp_path / "s", writer="b")
    a.keys(), b.keys()                       # both looked before either wrote: a real race
    a.put(frags[0])
    assert not b.has(frags[0].spec.key)      # b's stale view says "not stored"
    b.put(frags[0])
    assert len(_parts(tmp_path / "s")) == 2
    fresh = FragmentStore(tmp_path / "s")
    assert list(fresh.keys()) == [frags[0].spec.key]
    assert fresh.compact() == 2
    assert [p.parent.name for p in _parts(tmp_path / "s")] == ["class_id=0"]
    assert FragmentStore(tmp_path / "s").keys() == {frags[0].spec.key}


def test_readers_pyarrow_dataset_and_ray_data(tmp_path, frags, ray_cluster):
    import ray.data

    store = FragmentStore(tmp_path / "s")
    for f in frags:
        store.put(f)
    table = store.dataset().to_table()
    assert table.schema.equals(SCHEMA) and sorted(table["class_id"].to_pylist()) == [0, 1]
    ds = ray.data.read_parquet(str(tmp_path / "s" / "manifest"))
    assert sorted(r["key"] for r in ds.iter_rows()) == sorted(store.keys())


def test_tampered_and_missing_blobs(tmp_path, frags):
    store = FragmentStore(tmp_path / "s")
    key, _ = store.put(frags[0])
    blob = tmp_path / "s" / store.rows()[key]["blob"]
    data = bytearray(blob.read_bytes())
    data[100] ^= 1
    blob.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        store.get(key)
    blob.unlink()
    with pytest.raises(ArtifactNotFoundError, match="missing"):
        store.get(key)
    with pytest.raises(ArtifactNotFoundError):
        store.get("no-such-key")


def test_corrupt_manifest_part_is_named(tmp_path, frags):
    store = FragmentStore(tmp_path / "s")
    store.put(frags[0])
    (tmp_path / "s" / "manifest" / "part-0-bad.parquet").write_bytes(b"garbage")
    with pytest.raises(IntegrityError, match="part-0-bad.parquet"):
        FragmentStore(tmp_path / "s").keys()


def test_failed_write_leaves_nothing_visible(tmp_path, frags):
    store = FragmentStore(tmp_path / "s")
    store.put(frags[0])
    before = _files(tmp_path / "s")
    os.chmod(tmp_path / "s" / "manifest", 0o555)
    try:
        if os.access(tmp_path / "s" / "manifest", os.W_OK):   # root ignores permissions
            real = store._write

            def failing(path, data):
                if "/manifest/" in path:
                    raise StoreError("simulated failure")
                return real(path, data)
            store._write = failing
        with pytest.raises(StoreError):
            store.put(frags[1])
    finally:
        os.chmod(tmp_path / "s" / "manifest", 0o755)
    assert FragmentStore(tmp_path / "s").keys() == {frags[0].spec.key}
    after = _files(tmp_path / "s")
    assert {k: v for k, v in after.items() if "manifest" in k} == \
        {k: v for k, v in before.items() if "manifest" in k}
    assert not [k for k in after if k.endswith(".tmp")]


def test_manifest_is_partitioned_by_class_and_lookups_read_one_partition(tmp_path, frags):
    root = tmp_path / "s"
    store = FragmentStore(root)
    k0, _ = store.put(frags[0])
    k1, _ = store.put(frags[1])
    assert [p.parent.name for p in _parts(root)] == ["class_id=0", "class_id=1"]
    (root / "manifest" / "class_id=0" / "part-9-bad.parquet").write_bytes(b"garbage")
    fresh = FragmentStore(root)           # class 1's lookups never open class 0's partition
    assert [r["key"] for r in fresh.find(class_id=1)] == [k1]
    assert FragmentStore(root).lookup(k1)["class_id"] == 1 and FragmentStore(root).has(k1)
    assert FragmentStore(root).get(k1).spec.key == k1
    table = FragmentStore(root).dataset().to_table(filter=pads.field("class_id") == 1)
    assert table["key"].to_pylist() == [k1]
    for read in (lambda s: s.lookup(k0), lambda s: s.keys(), lambda s: s.find(class_id=0)):
        with pytest.raises(IntegrityError, match="part-9-bad.parquet"):
            read(FragmentStore(root))


def _flatten(root: Path) -> None:
    """Turn a store into the layout written before the partitioning: every part flat."""
    for p in _parts(root):
        p.rename(root / "manifest" / p.name)
    for d in (root / "manifest").iterdir():
        if d.is_dir():
            d.rmdir()


def test_old_flat_layout_reads_and_migrates_on_compaction(tmp_path, frags):
    root = tmp_path / "s"
    store = FragmentStore(root, writer="old")
    k0, _ = store.put(frags[0])
    k1, _ = store.put(frags[1])
    _flatten(root)
    late = {**FragmentStore(root).rows()[k0], "writer": "late"}
    late["created"] += 1                  # a later duplicate of k0 (a retried pair): loses
    pq.write_table(pa.Table.from_pylist([late], schema=SCHEMA), root / "manifest" / "part-late.parquet")
    assert len(_parts(root)) == 3 and all(p.parent.name == "manifest" for p in _parts(root))
    before = FragmentStore(root).rows()
    assert set(before) == {k0, k1} and before[k0]["writer"] == "old"
    assert [r["key"] for r in FragmentStore(root).find(class_id=1)] == [k1]
    assert FragmentStore(root).lookup(k0)["writer"] == "old"
    assert FragmentStore(root).compact() == 3
    assert [p.parent.name for p in _parts(root)] == ["class_id=0", "class_id=1"]
    assert FragmentStore(root).rows() == before
    assert FragmentStore(root).get(k1).spec.key == k1
    assert FragmentStore(root).compact() == 0 and len(_parts(root)) == 2


def test_put_rows_bulk_one_part_per_class(tmp_path):
    root = tmp_path / "s"
    items = list(synthetic_rows(10, classes=3))
    store = FragmentStore(root)
    assert store.put_rows(items + items[:2]) == [r["key"] for r, _ in items]
    assert sorted(p.parent.name for p in _parts(root)) == ["class_id=0", "class_id=1", "class_id=2"]
    assert FragmentStore(root).put_rows(items) == []
    assert len(FragmentStore(root).find(class_id=0)) == 4
    row, weights = items[4]
    assert FragmentStore(root).blobs(row["key"]) == (row["spec"].encode(), weights)
    with pytest.raises(ConfigError, match="another class"):
        store.put_rows([({**row, "class_id": 2}, weights)])
    with pytest.raises(ConfigError, match="lacks fields"):
        store.put_rows([({k: v for k, v in row.items() if k != "params"}, weights)])
    assert len(_parts(root)) == 3


def test_compaction_keeps_a_part_written_while_it_runs(tmp_path, frags, monkeypatch):
    root = tmp_path / "s"
    seed = FragmentStore(root, writer="seed")
    seed.put(frags[0])
    seed.put_rows(synthetic_rows(4, classes=2))      # class 0: two parts; class 1: one part
    late = list(synthetic_rows(2, classes=2, start=10))
    compactor = FragmentStore(root, writer="compactor")
    real = compactor._write_part

    def racing(class_id, name, table):  # another writer lands after the listing, before deletion
        if not list(root.rglob("*late*")):
            FragmentStore(root, writer="late").put_rows(late)
        return real(class_id, name, table)
    monkeypatch.setattr(compactor, "_write_part", racing)
    assert compactor.compact() == 2                   # only class 0's two listed parts
    late_parts = [p for p in _parts(root) if "-late-" in p.name]
    assert sorted(p.parent.name for p in late_parts) == ["class_id=0", "class_id=1"]
    want = {frags[0].spec.key} | {r["key"] for r, _ in synthetic_rows(4, classes=2)} | \
        {r["key"] for r, _ in late}
    assert FragmentStore(root).keys() == want and len(want) == 7
    assert FragmentStore(root).compact() == 4
    assert len(_parts(root)) == 2 and FragmentStore(root).dataset().count_rows() == 7


def test_reader_lists_again_when_a_compaction_folds_its_parts(tmp_path, frags, monkeypatch):
    root = tmp_path / "s"
    w = FragmentStore(root)
    w.put(frags[0])
    w.put(frags[1])
    w.put_rows(synthetic_rows(4, classes=2))
    expected = FragmentStore(root).rows()
    reader = FragmentStore(root)
    real, listings = reader._parts, []

    def racing(class_id=None):
        listed = real(class_id)
        listings.append(listed)
        if len(listings) == 1:            # everything listed is folded away before it is read
            assert FragmentStore(root).compact() == 4
        return listed
    monkeypatch.setattr(reader, "_parts", racing)
    assert reader.rows() == expected and len(expected) == 6
    assert len(listings) == 2 and not set(listings[0]) & set(listings[1])


def test_two_compactions_at_once_lose_nothing(tmp_path, monkeypatch):
    root = tmp_path / "s"
    w = FragmentStore(root)
    for i in range(3):                                  # three parts per class
        w.put_rows(synthetic_rows(6, classes=2, start=10 * i))
    a = FragmentStore(root, writer="a")
    real, fired = a._read_parts, []

    def racing(paths, *args, **kwargs):                 # b folds everything a listed, first
        if paths and not fired:
            fired.append(True)
            assert FragmentStore(root, writer="b").compact() == 6
        return real(paths, *args, **kwargs)
    monkeypatch.setattr(a, "_read_parts", racing)
    assert a.compact() == 0 and fired
    want = {r["key"] for i in range(3) for r, _ in synthetic_rows(6, classes=2, start=10 * i)}
    assert len(want) == 18 and FragmentStore(root).keys() == want
    assert len(_parts(root)) == 2 and FragmentStore(root).dataset().count_rows() == 18


_WRITER = """
import sys
from snp_ray.store import FragmentStore
from snp_ray.store.synthetic import synthetic_rows
store = FragmentStore(sys.argv[1], writer=sys.argv[2])
for item in synthetic_rows(int(sys.argv[4]), classes=3, start=int(sys.argv[3])):
    store.refresh()
    assert store.put_rows([item]) == [item[0]["key"]]
"""


def test_writer_processes_and_compactions_lose_nothing(tmp_path):
    """Two writer processes add one part per fragment while this process compacts in a loop:
    every fragment is there at the end, once."""
    root = tmp_path / "s"
    FragmentStore(root).put_rows(synthetic_rows(30, classes=3))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, str(root), f"w{i}", str(100 + 100 * i),
                                 "60"], env=env) for i in range(2)]
    removed = compactions = 0
    while any(w.poll() is None for w in writers) or compactions == 0:
        removed += FragmentStore(root, writer="compactor").compact()
        compactions += 1
    assert [w.returncode for w in writers] == [0, 0]
    removed += FragmentStore(root).compact()
    want = {r["key"] for r, _ in synthetic_rows(30, classes=3)}
    for i in range(2):
        want |= {r["key"] for r, _ in synthetic_rows(60, classes=3, start=100 + 100 * i)}
    assert len(want) == 150 and FragmentStore(root).keys() == want
    assert FragmentStore(root).dataset().count_rows() == 150 and len(_parts(root)) == 3
    assert removed >= 120 and compactions >= 2


def test_s3_manifest_partitions_compaction_and_old_layout(seaweed, frags):
    uri = seaweed.uri("scale")
    store = FragmentStore(uri, writer="w")
    k0, _ = store.put(frags[0])
    store.put_rows(synthetic_rows(6, classes=3))
    old, weights = next(synthetic_rows(1, classes=3, start=20))      # class 2, in a flat old part
    FragmentStore(uri, writer="old").put_rows([(old, weights)])
    fs, base = seaweed.filesystem(), "market/scale/manifest"
    [flat] = [i.path for i in fs.get_file_info(pafs.FileSelector(f"{base}/class_id=2"))
              if "-old-" in i.path]
    fs.move(flat, f"{base}/part-old.parquet")
    want = {k0, old["key"]} | {r["key"] for r, _ in synthetic_rows(6, classes=3)}
    before = FragmentStore(uri).rows()
    assert set(before) == want and FragmentStore(uri).keys() == want
    assert sorted(r["key"] for r in FragmentStore(uri).find(class_id=2)) == \
        sorted([old["key"]] + [r["key"] for r, _ in synthetic_rows(6, classes=3) if r["class_id"] == 2])
    assert FragmentStore(uri).lookup(old["key"])["writer"] == "old"
    assert FragmentStore(uri).compact() == 4         # class 0's two parts, class 2's and the flat one
    listed = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    parts = sorted(i.path[len(base) + 1:].split("/")[0] for i in listed if i.path.endswith(".parquet"))
    assert parts == ["class_id=0", "class_id=1", "class_id=2"]
    assert FragmentStore(uri).rows() == before
    assert FragmentStore(uri).get(k0).spec.key == k0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_s3_store_against_a_local_server(seaweed, frags):
    uri = seaweed.uri("frags")
    store = FragmentStore(uri, writer="w1")
    key, written = store.put(frags[1])
    assert written
    other = FragmentStore(uri, writer="w2")
    assert other.keys() == {key} and other.put(frags[1]) == (key, False)
    again = other.get(key)
    assert again.spec == frags[1].spec.replace(weights_sha256=again.spec.weights_sha256)
    table = other.dataset().to_table()
    assert table.num_rows == 1 and table["key"][0].as_py() == key


def test_unreachable_s3_fails_fast_with_a_store_error(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    port = _free_port()     # nothing listens here
    store = FragmentStore(f"s3://market/f?endpoint_override=127.0.0.1:{port}&scheme=http")
    t0 = time.time()
    with pytest.raises(StoreError):
        store.keys()
    assert time.time() - t0 < 60


def test_a_listing_reads_only_the_named_columns_one_row_per_key(frags, tmp_path):
    """The service's catalogue lists a store by a few columns: one row per key (the earliest
    write wins, as rows() says) with only those columns, before and after rows() is cached."""
    store = FragmentStore(tmp_path / "s")
    frags = list(frags)[:2]
    for f in frags:
        store.put(f)
    store.put(frags[0])                                           # a second write of one key
    fresh = FragmentStore(tmp_path / "s")
    listing = fresh.listing(["class_id", "params"])
    assert set(listing) == {f.spec.key for f in frags}
    assert all(set(r) == {"class_id", "params"} for r in listing.values())
    assert listing == {k: {"class_id": r["class_id"], "params": r["params"]}
                       for k, r in fresh.rows().items()}
    assert fresh.listing(["class_id", "params"]) == listing        # from the cached rows


def test_one_atomic_publish_helper(tmp_path, monkeypatch):
    """snp_ray.artifacts: a folder is staged privately and renamed in whole; without a trash
    folder an existing one is kept (the first writer wins), with one it is replaced, and a
    failed replace puts the old folder back. The staging folder is gone afterwards."""
    from snp_ray.artifacts import atomic_write_bytes, publish_dir, staging_dir

    dest = tmp_path / "store" / "items" / "a"
    with staging_dir(tmp_path / "store") as staged:
        assert staged.parent == tmp_path / "store" / ".staging" and staged.is_dir()
        atomic_write_bytes(staged / "x", b"first")
        assert publish_dir(staged, dest)
    with staging_dir(tmp_path / "store") as staged:
        atomic_write_bytes(staged / "x", b"second")
        assert not publish_dir(staged, dest)                 # lost the race: the first stays
    assert _files(dest) == {"x": b"first"}
    with staging_dir(tmp_path / "store") as staged:
        atomic_write_bytes(staged / "x", b"third")
        assert publish_dir(staged, dest, trash=tmp_path / "store" / ".trash")
    assert _files(dest) == {"x": b"third"}
    real = os.rename

    def rename(a, b):                                        # the new folder cannot move in
        if ".staging" in str(a):
            raise OSError("full")
        return real(a, b)
    monkeypatch.setattr(os, "rename", rename)
    with staging_dir(tmp_path / "store") as staged, pytest.raises(OSError, match="full"):
        atomic_write_bytes(staged / "x", b"fourth")
        publish_dir(staged, dest, trash=tmp_path / "store" / ".trash")
    monkeypatch.undo()
    assert _files(dest) == {"x": b"third"}                   # the old folder is put back
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["items"]
    atomic_write_bytes(tmp_path / "f", b"1")
    atomic_write_bytes(tmp_path / "f", b"2")
    assert _files(tmp_path) == {"f": b"2", "store/items/a/x": b"third"}
