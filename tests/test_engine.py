"""The Ray engine: the slice job on the session cluster, resume, placement on logical GPUs,
node loss (multi-node runs in a subprocess), SIGKILL and resume, and `ray job submit` to a head
started with token auth on (the secure path `make cluster` / `make submit` take)."""
from __future__ import annotations

import json
import os
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


from jsonout import last_json
from snp_ray.engine import localcluster
from snp_ray.engine.job import SliceJobConfig, run_slice_job
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


def test_slice_job_stores_every_pair_once_and_resumes(smoke_market, tmp_path):
    market = _market_copy(smoke_market, tmp_path)
    cfg = SliceJobConfig(market=str(market), k=5, preset="smoke")
    first = run_slice_job(cfg)
    assert (first.total, first.done, first.skipped, first.failed) == (10, 10, 0, 0)
    assert set(first.refs) == set(first.results)                  # blobs in the object store
    store = FragmentStore(market / "fragments")
    assert len(store.keys()) == 10 and store.dataset().count_rows() == 10
    parts = sorted((market / "fragments" / "manifest").rglob("*.parquet"))   # compacted: one part
    assert [p.parent.name for p in parts] == [f"class_id={c}" for c in range(10)]  # per class
    assert {r["class_id"] for r in store.rows().values()} == set(range(10))
    again = run_slice_job(cfg)
    assert (again.done, again.skipped) == (0, 10)
    s1, s2 = first.summary(), again.summary()    # a fully skipped rerun reports the stored totals
    assert s1["fragment_params"] == sum(r["params"] for r in store.rows().values()) > 0
    assert s1["source_params"] == sum(r["source_params"] for r in store.rows().values())
    for name in ("fragment_params", "source_params", "fragments_stored"):
        assert s2[name] == s1[name], name
    assert s1["fragment_params_this_run"] == s1["fragment_params"]
    assert (s2["fragment_params_this_run"], s2["source_params_this_run"]) == (0, 0)


def _multinode(mode: str, market: Path, store: Path) -> dict:
    out = subprocess.run([sys.executable, str(REPO / "tests" / "multinode.py"), mode, str(market),
                          str(store)], capture_output=True, text=True, env=_env(), timeout=420)
    assert out.returncode == 0, out.stderr[-3000:]
    return last_json(out.stdout)


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
