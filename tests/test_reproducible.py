"""Reproducible by construction (issue #28 §1): every module that decides a number is in the code
digest; a stage works in a folder keyed by it, so after a code change it recomputes everything
(market, fragments, pack, numbers) instead of reusing what older code made; an unchanged rerun
recomputes nothing; ``--reuse`` is recorded; ``--force`` clears; the environment is recorded."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from snp_ray.config import code_digest
from snp_ray.errors import ConfigError, EngineError
from snp_ray.evaluation import reproduce

REPO = Path(__file__).resolve().parents[1]


def _package_copy(tmp_path: Path) -> Path:
    dest = tmp_path / "src" / "snp_ray"
    shutil.copytree(REPO / "snp_ray", dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def test_code_digest_covers_every_module_that_decides_a_number(tmp_path):
    pkg = _package_copy(tmp_path)
    assert code_digest(package=pkg) == code_digest()
    decides = ["runtime.py", "config.py", "artifacts.py", "engine/job.py", "store/fragments.py",
               "slicing/slicer.py", "packing/packer.py", "market/training.py", "data/tables.py",
               "tuning/objective.py", "evaluation/protocol.py"]
    presents = ["serve/api.py", "cli.py", "client.py", "evaluation/provenance.py",
                "evaluation/reproduce.py", "evaluation/report.py"]
    base = code_digest(package=pkg)
    for rel in decides + presents:
        path = pkg / rel
        before = path.read_bytes()
        path.write_bytes(before + b"\n# an edit\n")
        changed = code_digest(package=pkg) != base
        path.write_bytes(before)
        assert changed == (rel in decides), rel
    # a cache one module decides hashes only that module
    assert code_digest(only=("data/tables.py",), package=pkg) != base


def test_precision_auto_is_forceable_and_the_environment_is_recorded(monkeypatch):
    import torch

    from snp_ray.runtime import ENV_PRECISION, environment, resolve_precision

    monkeypatch.setenv(ENV_PRECISION, "fp32")
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"      # an explicit value stands
    env = environment()
    assert env["precision"] == {"slicing": "fp32", "packing": "fp32"} and env["precision_forced"] == "fp32"
    assert {"engine", "engine_kind", "device", "cpu_bf16_flags", "torch_threads", "torch", "ray",
            "python", "numpy"} <= set(env)
    assert env["torch"] == torch.__version__ and env["torch_threads"] == torch.get_num_threads()
    monkeypatch.setenv("SNP_SLICE_ENGINE", "batched")
    monkeypatch.setenv(ENV_PRECISION, "bf16")
    env = environment()
    assert env["engine_kind"] == "batched" and env["precision"]["slicing"] == "fp32"   # vmap runs fp32
    monkeypatch.setenv(ENV_PRECISION, "fp16")
    with pytest.raises(ConfigError, match=ENV_PRECISION):
        resolve_precision("auto", torch.device("cpu"))


# ----------------------------------------------------------------------------- a tiny stage
def _tiny_stage(work: Path, out: Path) -> None:
    """A table stage in miniature: train a market (the smoke preset's three T1 models), slice one
    model's classes, pack two classes and test the pack, reusing whatever ``work`` holds."""
    from snp_ray.engine.presets import get_preset
    from snp_ray.evaluation.packs import pack_accuracy
    from snp_ray.market import Market, ModelStore, build_market
    from snp_ray.packing import preset_pack_config
    from snp_ray.packing.request import pack_request
    from snp_ray.slicing import slice_preset
    from snp_ray.store import slice_missing
    from snp_ray.store import market_fragment_store

    cfg, scfg = get_preset("smoke").market.replace(ks=[5]), slice_preset("smoke")
    root = work / "market"
    had = set(ModelStore(root).ids()) if root.is_dir() else set()
    specs = build_market(cfg, root, progress=False)
    market = Market(root)
    sliced = [f for *_, f in slice_missing(market, 5, scfg, 0, [specs[0].id]) if f is not None]
    packed = pack_request(market, [0, 1], 5, scfg, preset_pack_config("smoke", epochs=20))
    frags = {str(r["class_id"]): r.get("metrics") for r in market_fragment_store(market).rows().values()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"acc": pack_accuracy(packed), "fragments": frags,
                               "weights": {s.id: s.weights_sha256 for s in specs},
                               "trained": len(set(s.id for s in specs) - had), "sliced": len(sliced)}))


def test_a_code_change_recomputes_the_stage_and_an_unchanged_rerun_reuses(
        ray_cluster, one_thread, tmp_path, monkeypatch):
    from snp_ray.slicing import slicer, slice_preset

    stage = reproduce.Stage("tiny", "a tiny table", (("{py}", "tiny", "{runs}", "{out}/tiny.json"),),
                            ("tiny.json",), lambda: {"slice": slice_preset("smoke").digest()})
    out, runs = str(tmp_path / "out"), str(tmp_path / "runs")
    calls = []

    def runner(argv, env):
        calls.append(argv)
        _tiny_stage(Path(argv[2]), Path(argv[3]))
        return 0

    def result():
        return json.loads(Path(out, "tiny.json").read_text())

    assert reproduce.run_stages([stage], out, runs, runner=runner)[0]["status"] == "ran"
    first = result()
    prov = first["provenance"]
    assert first["trained"] == 3 and first["sliced"] == 3 and prov["reused"] is False
    assert prov["code"] == code_digest() and prov["workdir"].endswith(f"stages/tiny/{code_digest()}")
    assert prov["environment"]["engine"] and prov["environment"]["precision"]["slicing"] in ("fp32", "bf16")
    # unchanged: skipped, nothing recomputed, the same stamp
    rows = reproduce.run_stages([stage], out, runs, runner=runner)
    assert rows[0]["status"].startswith("skipped") and len(calls) == 1 and result() == first
    # --reuse: the run keeps the working folder of the same code (no training, no slicing) and says so
    Path(out, "tiny.json").write_text("{}")
    rows = reproduce.run_stages([stage], out, runs, runner=runner, reuse=True)
    again = result()
    assert rows[0]["status"] == "ran" and again["trained"] == 0 and again["sliced"] == 0
    assert again["provenance"]["reused"]["workdir"]["run"] == prov["run"] == again["provenance"]["run"]
    assert "reused working folder of run" in reproduce.render_runs(rows)
    assert {k: v for k, v in again.items() if k not in ("provenance", "trained", "sliced")} == \
        {k: v for k, v in first.items() if k not in ("provenance", "trained", "sliced")}
    # a reused result is not up to date for a run from nothing
    assert not reproduce.up_to_date(stage, out, runs, json.loads(
        (Path(runs) / "reproduce" / "tiny.json").read_text())["key"], code=code_digest())

    # an algorithm constant changes: in the module (the computation) and in its source (the digest)
    pkg = _package_copy(tmp_path)
    src = pkg / "slicing" / "slicer.py"
    text = src.read_text()
    assert "\nRIDGE_GRID = (1e-4," in text
    src.write_text(text.replace("\nRIDGE_GRID = (1e-4,", "\nRIDGE_GRID = (math.inf,) or (1e-4,"))
    monkeypatch.setattr(slicer, "RIDGE_GRID", (math.inf,))           # never repair
    changed = code_digest(package=pkg)
    monkeypatch.setattr(reproduce, "code_digest", lambda *a, **k: changed)
    assert changed != prov["code"]
    assert reproduce.run_stages([stage], out, runs, runner=runner)[0]["status"] == "ran"
    second = result()
    p2 = second["provenance"]
    assert p2["code"] == changed and p2["run"] != prov["run"] and p2["workdir"] != prov["workdir"]
    assert second["trained"] == 3 and second["sliced"] == 3          # market, fragments, pack: all anew
    # different numbers, and from the constant alone: the retrained market is bit-identical
    assert second["weights"] == first["weights"] and second["fragments"] != first["fragments"]
    assert (Path(runs) / "stages" / "tiny" / prov["code"]).is_dir()   # the old folder is left alone


def test_a_run_starts_from_nothing_reuse_is_recorded_and_force_clears(tmp_path, monkeypatch):
    out, runs = str(tmp_path / "out"), str(tmp_path / "runs")
    seen = []

    def runner(argv, env):
        work = Path(argv[2])
        seen.append(sorted(p.name for p in work.iterdir()))
        (work / "market").mkdir(exist_ok=True)
        Path(argv[3]).parent.mkdir(parents=True, exist_ok=True)
        Path(argv[3]).write_text(json.dumps({"value": 1, "arch": {"reused": True,
                                                                  "reused_from": {"commit": "c" * 40}}}))
        return 0

    stage = reproduce.Stage("fake", "", (("{py}", "fake", "{runs}", "{out}/x.json"),), ("x.json",),
                            lambda: {"slice": "d1"})
    reproduce.run_stages([stage], out, runs, runner=runner)
    assert seen[-1] == [reproduce.STAMP_FILE]
    first = json.loads(Path(out, "x.json").read_text())["provenance"]
    # an entry the command copied from an earlier result is disclosed
    assert first["reused"] == {"entries": ["x.json: arch (made at commit cccccccccccc)"]}
    Path(out, "x.json").write_text("{}")
    reproduce.run_stages([stage], out, runs, runner=runner)             # default: from nothing
    assert seen[-1] == [reproduce.STAMP_FILE]
    Path(out, "x.json").write_text("{}")
    rows = reproduce.run_stages([stage], out, runs, runner=runner, reuse=True)
    assert seen[-1] == [reproduce.STAMP_FILE, "market"] and rows[0]["reused"]["workdir"]
    kept = json.loads(Path(out, "x.json").read_text())["provenance"]
    # an older code version's folder, then --force: every folder of the stage is deleted first
    old = Path(runs) / "stages" / "fake" / "older-code"
    old.mkdir()
    with pytest.raises(ConfigError, match="--force"):
        reproduce.run_stages([stage], out, runs, runner=runner, force=True, reuse=True)
    rows = reproduce.run_stages([stage], out, runs, runner=runner, force=True)
    forced = json.loads(Path(out, "x.json").read_text())["provenance"]
    assert rows[0]["status"] == "ran" and seen[-1] == [reproduce.STAMP_FILE] and not old.exists()
    assert forced["run"] != kept["run"] and forced["reused"] == {"entries": first["reused"]["entries"]}


def test_a_stage_reads_only_what_its_needs_made_with_this_code(tmp_path):
    out, runs = str(tmp_path / "out"), str(tmp_path / "runs")

    def runner(argv, env):
        Path(argv[-1]).parent.mkdir(parents=True, exist_ok=True)
        Path(argv[-1]).write_text(json.dumps({"read": argv[2]}))
        return 0

    base = reproduce.Stage("base", "", (("{py}", "x", "{runs}", "{out}/a.json"),), ("a.json",),
                           lambda: {"s": "1"})
    user = reproduce.Stage("user", "", (("{py}", "x", "{runs:base}/market", "{out}/b.json"),),
                           ("b.json",), lambda: {"s": "1"}, needs=("base",))
    with pytest.raises(EngineError, match="run base first"):
        reproduce.run_stages([user], out, runs, runner=runner)
    rows = reproduce.run_stages([base, user], out, runs, runner=runner)
    assert [r["status"] for r in rows] == ["ran", "ran"]
    assert json.loads(Path(out, "b.json").read_text())["read"] == \
        f"{runs}/stages/base/{code_digest()}/market"
    assert reproduce.run_stages([base, user], out, runs, runner=runner)[1]["status"].startswith("skipped")
    # base rerun from nothing (a new run id): what read it reruns too
    rows = reproduce.run_stages([base, user], out, runs, runner=runner, force=True)
    assert [r["status"] for r in rows] == ["ran", "ran"]
    Path(out, "a.json").write_text("{}")
    rows = reproduce.run_stages([base, user], out, runs, runner=runner)
    assert [r["status"] for r in rows] == ["ran", "ran"]


def test_snp_report_tables_show_every_reused_entry():
    from snp_ray.evaluation.protocol import render_table

    cell = {"status": "ok", "acc_mean": 0.5, "acc_std": 0.0, "n": 1, "params": 10.0,
            "pct_of_ensemble": 10.0}
    result = {"task": "T6", "config": {"ks": [5]}, "targets": [[0, 1]], "archs": {
        "gru": {"ensemble_params": 100, "model_test_accuracy": {"m": 0.9}, "cells": {"S&P (T)": {"k5": cell}},
                "reused": True, "reused_from": {"commit": "d" * 40, "created": "2025-01-01T00:00:00+00:00"}},
        "lstm": {"ensemble_params": 100, "model_test_accuracy": {"m": 0.9},
                 "cells": {"S&P (T)": {"k5": cell}}}}}
    table = render_table(result, {})
    gru, lstm = table.split("## lstm")
    assert "**Reused, not rerun:**" in gru and "dddddddddddd" in gru and "Reused" not in lstm
