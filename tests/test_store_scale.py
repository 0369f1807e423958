"""The manifest at scale (issue #14 section 5): the store benchmark's counts on local disk and on
SeaweedFS, and the slice job writing, compacting and resuming on SeaweedFS (a real S3 server)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from jsonout import last_json
from snp_ray.engine.job import SliceJobConfig, run_slice_job
from snp_ray.store import FragmentStore

REPO = Path(__file__).resolve().parents[1]
TIMES = ("keys_s", "class_lookup_s", "key_lookup_s", "compact_s", "keys_s_after_compact",
         "class_lookup_s_after_compact", "key_lookup_s_after_compact", "fill_s", "put_s_per_fragment")


def _bench(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "store_scale.py"), "--json", *args],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return last_json(out.stdout)


@pytest.mark.parametrize("where", ["local", "seaweedfs"])
def test_store_scale_benchmark_counts(where, request, tmp_path):
    uri = (request.getfixturevalue("seaweed").uri(f"bench-{os.getpid()}") if where == "seaweedfs"
           else str(tmp_path / "s"))
    out = _bench("--rows", "600", "--classes", "6", "--part-rows", "200", "--fresh", "30", "--uri", uri)
    # 570 bulk rows in chunks of 200 (3 chunks x 6 classes) plus 30 one-part fragments
    assert (out["rows"], out["parts"], out["parts_removed"], out["parts_after_compact"]) == (600, 48, 48, 6)
    assert out["uri"] == ("s3" if where == "seaweedfs" else "local")
    assert all(isinstance(out[k], float) and out[k] >= 0 for k in TIMES)


def test_slice_job_on_seaweedfs_compacts_and_resumes(smoke_market, seaweed, tmp_path):
    _, root, _ = smoke_market
    market = tmp_path / "market"
    shutil.copytree(root, market, ignore=shutil.ignore_patterns("fragments"))
    uri = seaweed.uri(f"job-{os.getpid()}")
    cfg = SliceJobConfig(market=str(market), k=5, preset="smoke", fragments=uri)
    first = run_slice_job(cfg)
    assert (first.total, first.done, first.skipped, first.failed) == (10, 10, 0, 0)
    store = FragmentStore(uri)
    assert len(store.keys()) == 10 and store.dataset().count_rows() == 10
    assert {r["class_id"] for r in store.rows().values()} == set(range(10))
    base = f"{store.base}/manifest/"
    parts = sorted(i.path[len(base):] for i in store.fs.get_file_info(
        pafs.FileSelector(base, recursive=True)) if i.path.endswith(".parquet"))
    assert [p.split("/")[0] for p in parts] == [f"class_id={c}" for c in range(10)]   # compacted
    assert not (market / "fragments").exists()                     # nothing went to local disk
    key = sorted(store.keys())[0]
    assert store.get(key).spec.key == key
    again = run_slice_job(cfg)
    assert (again.done, again.skipped) == (0, 10)
