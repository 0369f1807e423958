"""The Ray engine: the slice job on the session cluster, resume, placement on logical GPUs,
node loss (multi-node runs in a subprocess), SIGKILL and resume, and `ray job submit` to a head
started with token auth on (the secure path `make cluster` / `make submit` take)."""
from __future__ import annotations

import json
import os
import pickle
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path


import pytest

from jsonout import last_json
from snp_ray.engine import localcluster
from snp_ray.engine.job import SliceJobConfig, check_actor_row, run_slice_job
from snp_ray.engine.noop import NOOP_BENCHMARK, job_pair_key
from snp_ray.errors import ConfigError, EngineError
from snp_ray.market import Market
from snp_ray.slicing.api import pair_key
from snp_ray.store import FragmentStore

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                "PYTHONPATH": str(REPO) + os.pathsep + str(REPO / "tests")})
    env.pop("RAY_ADDRESS", None)
    return env


def _market_copy(smoke_market, tmp_path) -> Path:
    _, root, _ = smoke_market
    dest = tmp_path / "market"
    shutil.copytree(root, dest, ignore=shutil.ignore_patterns("fragments"))
    return dest


def _spy_ray_get(monkeypatch) -> list:
    """Every value the driver's ``ray.get`` returns, recorded."""
    import ray

    seen, real = [], ray.get

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out)
        return out

    monkeypatch.setattr(ray, "get", spy)
    return seen


def _bulky(value, path="") -> list[str]:
    """Paths of weight-like values (bytes, tensors, arrays) inside ``value``."""
    import numpy as np
    import torch

    if isinstance(value, (bytes, bytearray, memoryview, torch.Tensor, np.ndarray)):
        return [f"{path}: {type(value).__name__}"]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _bulky(v, f"{path}.{k}")]
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in _bulky(v, f"{path}[{i}]")]
    return []


def test_slice_job_stores_every_pair_once_and_resumes(smoke_market, tmp_path, monkeypatch):
    market = _market_copy(smoke_market, tmp_path)
    cfg = SliceJobConfig(market=str(market), k=5, preset="smoke")
    got = _spy_ray_get(monkeypatch)
    first = run_slice_job(cfg)
    assert (first.total, first.done, first.skipped, first.failed) == (10, 10, 0, 0)
    # the driver never received weights: every ray.get it made returned small metadata
    rows = [r for g in got if isinstance(g, list) for r in g if isinstance(r, dict) and "key" in r]
    assert len(rows) == 10                              # one unit (one pair) per call
    for g in got:
        assert not _bulky(g), _bulky(g)
        assert len(pickle.dumps(g)) < 4096
    assert not hasattr(first, "refs")                    # no per-fragment object refs kept
    assert first.compacted_by == "actor"                 # the manifest read stays off the driver
    assert not _bulky(first.results) and len(pickle.dumps(first)) < 10 * 4096
    store = FragmentStore(market / "fragments")
    writers = {a["writer"] for a in first.actors}
    for key, row in store.rows().items():   # each fragment was written by the actor that sliced it
        assert row["writer"] == first.results[key]["writer"] in writers
        assert row["writer"].startswith("actor-")
        assert row["sha256"] == first.results[key]["weights_sha256"]
    assert len(store.keys()) == 10 and store.dataset().count_rows() == 10
    parts = sorted((market / "fragments" / "manifest").rglob("*.parquet"))   # compacted: one part
    assert [p.parent.name for p in parts] == [f"class_id={c}" for c in range(10)]  # per class
    assert {r["class_id"] for r in store.rows().values()} == set(range(10))
    again = run_slice_job(cfg)
    assert (again.done, again.skipped) == (0, 10)
    assert {k: r["writer"] for k, r in again.results.items()} == \
        {k: r["writer"] for k, r in first.results.items()}
    s1, s2 = first.summary(), again.summary()    # a fully skipped rerun reports the stored totals
    assert s1["fragment_params"] == sum(r["params"] for r in store.rows().values()) > 0
    assert s1["source_params"] == sum(r["source_params"] for r in store.rows().values())
    for name in ("fragment_params", "source_params", "fragments_stored"):
        assert s2[name] == s1[name], name
    assert s1["fragment_params_this_run"] == s1["fragment_params"]
    assert (s2["fragment_params_this_run"], s2["source_params_this_run"]) == (0, 0)


def test_noop_benchmark_mode_keeps_its_fragments_apart(smoke_market, tmp_path, monkeypatch):
    """The benchmark-only mode writes placeholder fragments under keys no real pair has, still
    returns metadata only, and resumes like the real mode."""
    market = _market_copy(smoke_market, tmp_path)
    cfg = SliceJobConfig(market=str(market), k=5, preset="smoke", slice_mode=NOOP_BENCHMARK,
                         noop_fragment_kb=2, actors=2)
    got = _spy_ray_get(monkeypatch)
    first = run_slice_job(cfg)
    assert (first.done, first.failed) == (10, 0)
    assert all(not _bulky(g) for g in got)
    store = FragmentStore(market / "fragments")
    m = Market(market)
    real = {pair_key(m.spec(mid), c, cfg.slice_config(), 5, 0) for mid in m.ids()
            for c in m.spec(mid).classes}
    assert store.keys() == {f"{k}-{NOOP_BENCHMARK}" for k in real}
    assert not store.keys() & real
    for key in store.keys():
        row = store.rows()[key]
        assert json.loads(row["metrics"]) == {"noop_benchmark": 1.0}
        assert 2048 <= row["params"] * 4 < 2048 + 64          # ~2 KiB of fp32 weights
    again = run_slice_job(cfg)
    assert (again.done, again.skipped) == (0, 10)


def test_actor_returns_metadata_and_rechecks_the_store_on_retries(smoke_market, tmp_path, ray_cluster):
    """The actor body (run in-process here): a first attempt writes under its own writer id and
    returns metadata; a retry on another actor finds the key stored and skips it."""
    from snp_ray.engine.actors import SlicerActor
    from snp_ray.slicing.config import slice_preset

    market = _market_copy(smoke_market, tmp_path)
    m = Market(market)
    mid = m.ids()[0]
    c = m.spec(mid).classes[0]
    scfg = slice_preset("smoke")
    args = (str(market), str(tmp_path / "frags"), scfg.to_dict(), 5, 0, {})
    a = SlicerActor(*args, mode=NOOP_BENCHMARK)
    row = a.slice_pair(mid, c, False)
    key = job_pair_key(m.spec(mid), c, scfg, 5, 0, NOOP_BENCHMARK)
    assert row["key"] == key and row["status"] == "done" and not _bulky(row)
    assert check_actor_row(row, key) is row and len(pickle.dumps(row)) < 2048
    assert FragmentStore(tmp_path / "frags").rows()[key]["writer"] == row["writer"] == a.store.writer
    b = SlicerActor(*args, mode=NOOP_BENCHMARK)
    retry = b.slice_pair(mid, c, True)
    assert retry["status"] == "skipped" and retry["writer"] == a.store.writer
    assert FragmentStore(tmp_path / "frags").dataset().count_rows() == 1


def test_store_io_errors_are_retried_then_reported(smoke_market, tmp_path, caplog):
    """A StoreError in an actor (here: the blobs folder is a file) is an I/O failure, retried up
    to max_attempts like a lost actor, then reported as the pair's failure."""
    market = _market_copy(smoke_market, tmp_path)
    frags = tmp_path / "frags"
    frags.mkdir()
    (frags / "blobs").write_text("not a folder")
    cfg = SliceJobConfig(market=str(market), fragments=str(frags), k=5, preset="smoke",
                         slice_mode=NOOP_BENCHMARK, max_attempts=2, actors=2)
    with caplog.at_level("ERROR", logger="snp_ray.engine.job"):
        res = run_slice_job(cfg)
    assert (res.done, res.failed) == (0, 10)
    assert all("cannot write" in f["error"] for f in res.failures)
    assert caplog.text.count("after 2 attempts") == 10


def test_driver_refuses_actor_results_that_carry_weights():
    with pytest.raises(EngineError, match="blobs"):
        check_actor_row({"key": "k", "status": "done", "blobs": (b"{}", b"w")}, "k")
    with pytest.raises(EngineError, match="not a metadata dict"):
        check_actor_row((b"{}", b"w"), "k")
    with pytest.raises(EngineError, match="gpu_ids"):
        check_actor_row({"key": "k", "gpu_ids": [b"w"]}, "k")
    with pytest.raises(ConfigError, match="slice mode"):
        SliceJobConfig(market="m", slice_mode="fast")


def _multinode(mode: str, market: Path, store: Path) -> dict:
    out = subprocess.run([sys.executable, str(REPO / "tests" / "multinode.py"), mode, str(market),
                          str(store)], capture_output=True, text=True, env=_env(), timeout=420)
    assert out.returncode == 0, out.stderr[-3000:]
    return last_json(out.stdout)


def test_batched_engine_job_slices_units_of_a_model_exactly_once(smoke_market, tmp_path):
    """engine="batched": an actor slices up to class_batch pairs of one model in one pass (T1's
    models hold 3, 3 and 4 classes; batch 3: units of 3, 3, 3 and 1), each pair still stored
    once under its own key, and a rerun skips them all."""
    market = _market_copy(smoke_market, tmp_path)
    cfg = SliceJobConfig(market=str(market), k=5, preset="smoke", engine="batched",
                         overrides={"class_batch": 3})
    first = run_slice_job(cfg)
    assert (first.total, first.done, first.skipped, first.failed) == (10, 10, 0, 0)
    assert {r["engine"] for r in first.results.values()} == {"batched"}
    # a pass records its wall time divided by its classes: one value per unit
    per_model = Counter((r["model"], r["seconds"]) for r in first.results.values())
    sizes = [len(Market(market).spec(mid).classes) for mid in Market(market).ids()]
    assert sorted(sizes) == [3, 3, 4]
    assert sorted(per_model.values()) == [1, 3, 3, 3]
    store = FragmentStore(market / "fragments")
    assert len(store.keys()) == 10 and store.dataset().count_rows() == 10
    assert set(store.keys()) == set(first.results)
    again = run_slice_job(cfg)
    assert (again.done, again.skipped) == (0, 10)
    with pytest.raises(ConfigError, match="engine"):
        SliceJobConfig(market="m", engine="fast")


def test_local_slicing_takes_the_engine_from_the_environment(smoke_market, tmp_path, monkeypatch):
    """`snp slice` and the expansion job slice through slice_missing: SNP_SLICE_ENGINE=batched
    reaches it, units of class_batch classes are sliced and stored one pass at a time, and an
    unknown engine name is a ConfigError."""
    from snp_ray.slicing import slice_preset
    from snp_ray.store import slice_missing

    market = Market(_market_copy(smoke_market, tmp_path))
    mid = market.ids()[0]
    monkeypatch.setenv("SNP_SLICE_ENGINE", "batched")
    out = list(slice_missing(market, 5, slice_preset("smoke", class_batch=2), model_ids=[mid]))
    seconds = [f.spec.seconds for *_, f in out]
    assert len(out) == 3 and seconds[0] == seconds[1] != seconds[2]     # units [2, 1]
    monkeypatch.setenv("SNP_SLICE_ENGINE", "fast")
    with pytest.raises(ConfigError, match="SNP_SLICE_ENGINE"):
        list(slice_missing(market, 5, slice_preset("smoke"), model_ids=[mid], force=True))


def test_actor_batch_rechecks_each_pair_and_slices_only_the_missing(smoke_market, tmp_path, ray_cluster):
    """A retried unit whose pairs are partly stored: the stored ones come back skipped (their
    first writer kept), the others are sliced in one pass, rows in the asked order."""
    from snp_ray.engine.actors import SlicerActor
    from snp_ray.slicing.config import slice_preset

    market = _market_copy(smoke_market, tmp_path)
    m = Market(market)
    mid = m.ids()[0]
    classes = m.spec(mid).classes[:3]
    scfg = slice_preset("smoke")
    args = (str(market), str(tmp_path / "frags"), scfg.to_dict(), 5, 0, {})
    a = SlicerActor(*args, engine="batched")
    first = a.slice_pairs(mid, [classes[1]], False)
    b = SlicerActor(*args, engine="batched")
    rows = b.slice_pairs(mid, classes, True)
    assert [r["class_id"] for r in rows] == classes
    assert [r["status"] for r in rows] == ["done", "skipped", "done"]
    assert rows[1]["writer"] == first[0]["writer"] == a.store.writer
    assert rows[1]["seconds"] == first[0]["seconds"] != rows[0]["seconds"]   # a's row, kept
    assert rows[0]["seconds"] == rows[2]["seconds"]          # one pass for the two missing
    assert FragmentStore(tmp_path / "frags").dataset().count_rows() == 3
    for r in rows:
        assert not _bulky(r) and check_actor_row(r, r["key"]) is r


def test_placement_one_gpu_per_actor(smoke_market, tmp_path):
    res = _multinode("placement", _market_copy(smoke_market, tmp_path), tmp_path / "frags")
    assert res["summary"]["done"] == 10 and len(res["actors"]) == 2
    assert all(len(a["gpu_ids"]) == 1 for a in res["actors"])
    per_node = Counter(a["node_id"] for a in res["actors"])
    assert all(per_node[n] <= res["node_gpus"].get(n, 0) for n in per_node)


def test_placement_gpu_fractions(smoke_market, tmp_path):
    res = _multinode("fraction", _market_copy(smoke_market, tmp_path), tmp_path / "frags")
    assert res["summary"]["done"] == 10 and len(res["actors"]) == 4
    per_node = Counter(a["node_id"] for a in res["actors"])
    assert all(per_node[n] <= 2 * res["node_gpus"].get(n, 0) for n in per_node)


def test_node_loss_mid_job_still_finishes_exactly_once(smoke_market, tmp_path):
    res = _multinode("node_loss", _market_copy(smoke_market, tmp_path), tmp_path / "frags")
    assert res["removed"], "the worker node was never removed"
    s = res["summary"]
    assert s["done"] == 10 and s["failed"] == 0
    assert len(res["keys"]) == 10 and res["manifest_rows"] == 10
    survivors = {a["node_id"] for a in res["actors"]} - {res["removed"]["node_id"]}
    assert survivors


def test_node_loss_with_the_batched_engine_redoes_only_lost_units(smoke_market, tmp_path):
    """The same node loss with units of 2 pairs: the lost actor's unit goes back to the queue and
    every pair still ends stored exactly once."""
    res = _multinode("node_loss_batched", _market_copy(smoke_market, tmp_path), tmp_path / "frags")
    assert res["removed"], "the worker node was never removed"
    s = res["summary"]
    assert s["done"] == 10 and s["failed"] == 0
    assert len(res["keys"]) == 10 and res["manifest_rows"] == 10
    assert {r["engine"] for r in res["results"].values()} == {"batched"}


def _store_count(path: Path) -> int:
    try:
        return len(FragmentStore(path).refresh().keys())
    except Exception:  # noqa: BLE001 - mid-write reads may fail; try again
        return 0


def test_sigkill_mid_run_then_resume(smoke_market, tmp_path):
    market = _market_copy(smoke_market, tmp_path)
    cmd = [sys.executable, str(REPO / "jobs" / "slice_market.py"), "--preset", "smoke", "--store",
           str(market), "--slice-preset", "quick", "--actors", "1", "--no-pack", "--json"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    frags = market / "fragments"
    deadline = time.time() + 240
    while time.time() < deadline and _store_count(frags) < 3:
        time.sleep(0.2)
    before = _store_count(frags)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert 3 <= before < 10, before
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    s = last_json(out.stdout)["slicing"]
    assert s["skipped"] >= before and s["done"] <= 10 - before + 1   # at most the in-flight pair redone
    store = FragmentStore(frags)
    assert len(store.keys()) == 10 and store.dataset().count_rows() == 10
    for key in store.keys():                                       # every visible fragment is whole
        store.get(key)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_cluster(temp_dir: str) -> None:
    """Stop only the processes of the cluster this test started (found by its temp dir)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="ignore")
        except OSError:
            continue
        if temp_dir in cmd and int(pid) != os.getpid():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass


def _token_env(token: Path) -> dict[str, str]:
    """Token auth on, as `make cluster` / `make submit` set it: the mode and the token's file, the
    same for `ray start` (and through it every job) and for the client. The token is a file of the
    test's own, so the user's ~/.ray/auth_token is never read or written."""
    env = _env()
    env.pop("RAY_AUTH_TOKEN", None)
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)})
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def test_job_script_outside_the_venv_says_how_to_fix_it(tmp_path):
    """A job whose `python` lacks the project's packages (a cluster started outside .venv) stops
    with a typed error naming `make cluster`, not a traceback for `No module named 'torch'`."""
    # -S -E -s: no site-packages at all, as the system python of a fresh machine
    out = subprocess.run([sys.executable, "-S", "-E", "-s", str(REPO / "jobs" / "slice_market.py"),
                          "--json"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "make cluster" in out.stderr
    err = last_json(out.stdout)
    assert err["type"] == "JobEnvironmentError" and "torch" in err["error"]


def test_ray_job_submit_end_to_end(smoke_market, tmp_path):
    market = _market_copy(smoke_market, tmp_path)
    temp_dir = tempfile.mkdtemp(prefix="snpray-")   # short: Ray's socket paths must fit 107 bytes
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    port, dash, agent, grpc, renv, metrics = (_free_port() for _ in range(6))
    env = _token_env(token)
    address = f"http://127.0.0.1:{dash}"
    ray_bin = str(Path(sys.executable).parent / "ray")
    start = subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--num-cpus=2",
                            f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
                            f"--dashboard-agent-listen-port={agent}",
                            f"--dashboard-agent-grpc-port={grpc}",
                            f"--runtime-env-agent-port={renv}", f"--metrics-export-port={metrics}",
                            "--include-dashboard=true", f"--temp-dir={temp_dir}",
                            "--node-ip-address=127.0.0.1", "--disable-usage-stats"],
                           env=env, capture_output=True, text=True, timeout=120)
    try:
        assert start.returncode == 0, start.stderr[-2000:]
        runtime_env = json.dumps({"env_vars": {"SNP_DATA_ROOT": os.environ["SNP_DATA_ROOT"],
                                               "SNP_PRESETS": str(tmp_path / "presets")}})

        def submit(*script: str) -> tuple[dict, str]:
            cmd = [ray_bin, "job", "submit", "--address", address, "--working-dir", str(REPO),
                   "--runtime-env-json", runtime_env, "--", "python", *script, "--json"]
            for _ in range(30):   # the job agent comes up a few seconds after `ray start` returns
                job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
                if "No available agent" not in job.stdout + job.stderr:
                    break
                time.sleep(2)
            assert job.returncode == 0, (script, job.stdout[-3000:], job.stderr[-2000:])
            return last_json(job.stdout), job.stdout

        res, _ = submit("jobs/slice_market.py", "--preset", "smoke", "--store", str(market))
        store = FragmentStore(market / "fragments")
        assert len(store.keys()) == 10
        assert res["slicing"]["done"] == 10 and res["slicing"]["fragment_params"] > 0

        # auth is really on: a client without the token, or with a wrong one, is refused
        probe = [ray_bin, "job", "submit", "--address", address, "--", "python", "-c",
                 "print('UNAUTHORISED JOB RAN')"]
        no_token = {k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
        wrong = {**env, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        invalid = "Invalid authentication token"
        for client, refusals in ((no_token, ("Missing authentication token", invalid)),
                                 (wrong, (invalid,))):
            out = subprocess.run(probe, env=client, capture_output=True, text=True, timeout=120)
            text = out.stdout + out.stderr
            assert out.returncode != 0 and "UNAUTHORISED JOB RAN" not in text, text[-2000:]
            assert any(r in text for r in refusals), text[-2000:]
        listed = subprocess.run([ray_bin, "job", "list", "--address", address], env=env,
                                capture_output=True, text=True, timeout=120)
        assert listed.returncode == 0 and "UNAUTHORISED" not in listed.stdout, listed.stderr[-2000:]
        assert "slice_market.py" in listed.stdout

        # a rerun skips every pair and still reports the stored fragments' totals
        again, text = submit("jobs/slice_market.py", "--preset", "smoke", "--store", str(market))
        assert (again["slicing"]["done"], again["slicing"]["skipped"]) == (0, 10)
        for name in ("fragment_params", "source_params"):
            assert again["slicing"][name] == res["slicing"][name] > 0, name
        assert "fragment params (all stored)" in text
        assert f"{res['slicing']['fragment_params']:,}" in text

        out = tmp_path / "results"
        exp, _ = submit("jobs/estimate_expansion.py", "--task", "T1", "--market", str(market),
                        "--k", "5", "--combos", "2", "--preset", "smoke", "--out",
                        str(out / "expansion"))
        assert exp["S"] == 2 and (out / "expansion" / "T1" / "figure6.png").is_file()
        tuned, _ = submit("jobs/tune_hparams.py", "--task", "T1", "--market", str(market), "--k",
                          "5", "--folds", "2", "--targets", "1", "--trials", "2", "--preset",
                          "smoke", "--epochs", "1", "--no-test", "--name", "tuned-submit",
                          "--storage", str(tmp_path / "tune"), "--out", str(out / "tune"))
        assert tuned["trials"] == 2 and (tmp_path / "presets" / "tuned-submit.json").is_file()
        report, _ = submit("-m", "snp_ray.cli", "report", "--out", str(out))
        text = Path(report["report"]).read_text()
        assert "expansion/T1/figure6.png" in text and "tune/T1/sweep.png" in text

        # `make cluster-stop`'s helper stops this cluster, all of it
        stopped, _ = localcluster.stop(temp_dir)
        assert stopped and not localcluster.cluster_pids(temp_dir)
    finally:
        _kill_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
