"""Fragment store: atomic, idempotent, concurrent-safe, checksummed, on local disk and real S3
(a moto server on 127.0.0.1), readable with pyarrow.dataset and Ray Data."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import make_fragment
from snp_ray.data.specs import ImageSpec
from snp_ray.errors import ArtifactNotFoundError, IntegrityError, StoreError
from snp_ray.store import SCHEMA, FragmentStore


@pytest.fixture(scope="module")
def frags():
    spec = ImageSpec()
    return [make_fragment("vgg11", c, spec, seed=5)[0] for c in (0, 1)]


def _files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


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
    b._rows = {}                             # b's stale view says "not stored"
    b.put(frags[0])
    assert len(list((tmp_path / "s" / "manifest").iterdir())) == 2
    fresh = FragmentStore(tmp_path / "s")
    assert list(fresh.keys()) == [frags[0].spec.key]
    assert fresh.compact() == 2
    assert len(list((tmp_path / "s" / "manifest").iterdir())) == 1
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    """A real S3-compatible HTTP server (moto's server mode) on 127.0.0.1."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3
    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket="market")
    yield port
    proc.terminate()
    proc.wait(timeout=10)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_s3_store_against_a_local_server(s3_server, frags):
    uri = f"s3://market/frags?endpoint_override=127.0.0.1:{s3_server}&scheme=http"
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
