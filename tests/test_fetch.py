"""First run without a data folder: the download decision, the conversion of a (fake) torchvision
download, and the job's one clean error before Ray starts. Nothing here touches the network."""
from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from snp_ray.data.fetch import can_reach, default_data_root, ensure_dataset
from snp_ray.data.tables import read_split
from snp_ray.errors import DatasetNotFoundError
from test_convert import CIFAR10_CLASSES, make_cifar10

REPO = Path(__file__).resolve().parents[1]


def _never(*args):
    raise AssertionError(f"must not be called here (called with {args})")


@pytest.fixture
def empty_root(tmp_path, monkeypatch) -> Path:
    """An empty SNP_DATA_ROOT and a cache folder of our own (the default download root)."""
    root = tmp_path / "empty"
    root.mkdir()
    monkeypatch.setenv("SNP_DATA_ROOT", str(root))
    monkeypatch.setenv("SNP_CACHE_DIR", str(tmp_path / "cache"))
    return root


def test_present_dataset_is_used_without_probing_the_network(tiny_root):
    assert ensure_dataset("cifar10", online=_never, fetch=_never) == tiny_root.resolve()


def test_missing_and_online_downloads_converts_and_cleans_up(empty_root, tmp_path, caplog):
    probed, fetched = [], []

    def fake_download(name: str, folder: Path) -> None:  # what torchvision leaves on disk
        fetched.append((name, folder))
        make_cifar10(folder)

    with caplog.at_level("INFO", logger="snp_ray.data"):
        root = ensure_dataset("cifar10", allow_download=True, online=lambda u: probed.append(u) or True,
                              fetch=fake_download, verify=False, progress=False)
    cache = tmp_path / "cache" / "data"
    assert default_data_root() == tmp_path / "cache" / "data"   # SNP_CACHE_DIR moves it
    assert root == cache.resolve()
    assert len(probed) == 1 and fetched == [("cifar10", cache.resolve() / "_downloads")]
    assert not (cache / "_downloads").exists()                 # the raw download is deleted
    os.environ["SNP_DATA_ROOT"] = str(root)                    # monkeypatch restores it
    split = read_split("cifar10", "train")
    assert split.class_names == CIFAR10_CLASSES and len(split) == 15
    text = caplog.text
    assert "downloading cifar10" in text and "converting the cifar10 download to Parquet" in text
    # a second run finds the converted copy: no probe, no download
    assert ensure_dataset("cifar10", online=_never, fetch=_never) == root


def test_the_probe_is_asked_for_torchvisions_url(empty_root):
    asked = []
    with pytest.raises(DatasetNotFoundError):
        ensure_dataset("cifar10", allow_download=True, online=lambda u: asked.append(u) or False,
                       fetch=_never)
    assert asked == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]


def test_source_urls_are_torchvisions():
    from torchvision.datasets import CIFAR10, CIFAR100

    from snp_ray.data.convert import source_url

    assert [source_url("cifar10"), source_url("cifar100")] == [CIFAR10.url, CIFAR100.url]


def test_missing_and_offline_is_one_clean_error(empty_root, tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        ensure_dataset("cifar10", allow_download=True, online=lambda u: False, fetch=_never)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"SNP_DATA_ROOT={empty_root} has no cifar10/{{train,test}}.parquet" in msg
    assert "no network" in msg and "www.cs.toronto.edu" in msg
    assert "point SNP_DATA_ROOT at a folder holding cifar10" in msg
    assert not (tmp_path / "cache" / "data").exists()


def test_downloads_off_never_probes(empty_root):
    assert os.environ["SNP_DOWNLOAD"] == "0"   # conftest: tests never download
    with pytest.raises(DatasetNotFoundError, match=r"downloads are off \(SNP_DOWNLOAD=0"):
        ensure_dataset("cifar10", online=_never, fetch=_never)


def test_unset_root_names_the_variable_and_the_cache(empty_root, monkeypatch, tmp_path):
    monkeypatch.delenv("SNP_DATA_ROOT")
    with pytest.raises(DatasetNotFoundError,
                       match=f"SNP_DATA_ROOT is not set and {tmp_path / 'cache' / 'data'} has no"):
        ensure_dataset("cifar10", allow_download=True, online=lambda u: False, fetch=_never)


def test_only_cifar_is_downloadable(empty_root):
    with pytest.raises(DatasetNotFoundError, match="trec/.*shared/data"):
        ensure_dataset("trec", allow_download=True, online=_never, fetch=_never)


def test_can_reach_answers_and_times_out_locally():
    class Ok(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert can_reach(f"http://127.0.0.1:{server.server_port}/x", timeout=5)
    finally:
        server.shutdown()
    silent = socket.socket()                  # accepts the connection, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    try:
        started = time.monotonic()
        assert not can_reach(f"http://127.0.0.1:{silent.getsockname()[1]}/x", timeout=0.5)
        assert time.monotonic() - started < 3
    finally:
        silent.close()


def test_job_with_an_empty_data_root_fails_once_before_ray_starts(tmp_path):
    empty, ray_tmp = tmp_path / "empty", tmp_path / "raytmp"
    empty.mkdir()
    ray_tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(SNP_DATA_ROOT=str(empty), SNP_CACHE_DIR=str(tmp_path / "cache"),
               RAY_TMPDIR=str(ray_tmp), SNP_DOWNLOAD="0")
    out = subprocess.run([sys.executable, "jobs/slice_market.py", "--preset", "quickstart",
                          "--store", str(tmp_path / "store")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    assert out.returncode == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: SNP_DATA_ROOT="), lines
    assert "Traceback" not in out.stderr and "Unhandled error" not in out.stderr
    assert list(ray_tmp.iterdir()) == []          # Ray never started: no session folder
    assert not (tmp_path / "store").exists()


_FAILING_TRAINING = """
import gc, sys, tempfile, time
from snp_ray.errors import DatasetNotFoundError
from snp_ray.market import MarketConfig, TrainConfig, build_market
from snp_ray.runtime import ensure_ray
ensure_ray(num_cpus=2)
cfg = MarketConfig(task="T1", arch="vgg11", width=0.125, train=TrainConfig(epochs=1), ks=[5])
try:
    build_market(cfg, tempfile.mkdtemp(), progress=False)
    sys.exit("no error")
except DatasetNotFoundError as e:
    print("typed error:", e)
import ray
gc.collect()
time.sleep(2)   # Ray reports unread failed results when their references are collected
ray.shutdown()
"""


def test_a_failed_training_task_leaves_no_unhandled_errors(tmp_path):
    """Past the job's data check (e.g. data gone from a worker), the first failure is raised
    and the other training tasks' failures are consumed, not printed as "Unhandled error"."""
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(SNP_DATA_ROOT=str(empty), SNP_CACHE_DIR=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", _FAILING_TRAINING], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("typed error: dataset file") == 1, out.stdout
    assert "Unhandled error" not in out.stderr and "Traceback" not in out.stderr, out.stderr
