"""Tuning: stratified folds, named presets, δ-only trials reuse every fragment, and a real Ray
Tune sweep that runs with the test split poisoned and fenced off, so it fails if any test row
reaches the tuner."""
from __future__ import annotations

import json
import os
import types
from pathlib import Path

import numpy as np
import pytest

from snp_ray.data.fewshot import FewShotManifest, FewShotSet
from snp_ray.data.tables import ENV_FENCE
from snp_ray.errors import ConfigError, TestSplitAccessError, UnknownNameError
from snp_ray.market import Market
from snp_ray.packing import PackConfig
from snp_ray.slicing import Fragment, SliceConfig, slice_preset
from snp_ray.slicing.config import ENV_PRESETS, load_preset, pack_overrides, save_preset
from snp_ray.tuning import (CVConfig, FragmentCache, SweepConfig, cross_validate, deal_folds, fold_of,
                            run_sweep)
from snp_ray.tuning.sweep import trial_configs

SMOKE_CV = {"pool_epochs": 1, "adapt_epochs": 1, "combine_epochs": 1}


def test_folds_are_stratified_and_follow_the_row_not_the_model():
    rows = {3: list(range(0, 10)), 7: list(range(10, 20)), 9: list(range(20, 30))}
    keys = {c: [f"cifar10/train#{r}" for r in rs] for c, rs in rows.items()}
    fmap = deal_folds(keys, 3, fold_seed=1)
    for c, ks in keys.items():
        counts = np.bincount([fmap[k] for k in ks], minlength=3)
        assert sorted(counts.tolist()) == [3, 3, 4]
    assert fmap != deal_folds(keys, 3, fold_seed=2)       # the seed deals differently
    # two models' few-shot sets that share rows (a class held twice) put them in the same fold
    labels = np.repeat([3, 7], 10)
    a = FewShotSet(FewShotManifest(dataset="cifar10", k=10, seed=0, classes=[3, 7],
                                   row_ids=[rows[3], rows[7]]), np.zeros((20, 32, 32, 3), np.uint8), labels)
    b = FewShotSet(FewShotManifest(dataset="cifar10", k=10, seed=1, classes=[7, 9],
                                   row_ids=[rows[7], rows[9]]), np.zeros((20, 32, 32, 3), np.uint8),
                   np.repeat([7, 9], 10))
    fa, fb = fold_of(a, fmap), fold_of(b, fmap)
    assert fa[10:].tolist() == fb[:10].tolist()
    held = a.select(fa == 0)                              # select keeps each sample's row id
    assert set(held.row_ids.tolist()) == {r for r in range(20) if fmap[f"cifar10/train#{r}"] == 0}
    with pytest.raises(ConfigError):
        CVConfig(k=5, folds=6, targets=[[0, 3]])


def test_saved_preset_is_accepted_by_name_and_path(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_PRESETS, str(tmp_path))
    cfg = slice_preset("quick", alpha=0.02, beta=0.4, mode="rate")
    path = save_preset("tuned-x", cfg, {"delta": 0.3, "lr": 2e-3}, {"cv_accuracy": 0.9})
    assert slice_preset("tuned-x") == cfg and slice_preset(str(path)) == cfg
    assert slice_preset("tuned-x", beta=0.5).beta == 0.5
    assert pack_overrides("tuned-x") == {"delta": 0.3, "lr": 2e-3} and pack_overrides("quick") == {}
    assert load_preset("tuned-x")["source"]["cv_accuracy"] == 0.9
    with pytest.raises(ConfigError, match="built-in"):
        save_preset("quick", cfg)
    with pytest.raises(ConfigError):
        save_preset("../escape", cfg)
    with pytest.raises(UnknownNameError, match="tuned-x"):    # the message lists saved presets
        slice_preset("nope")
    (tmp_path / "bad.json").write_text('{"slice": {"beta": 7}}')
    with pytest.raises(ConfigError, match="beta"):
        slice_preset("bad")


def test_trial_configs_map_onto_slice_and_pack():
    s, p = trial_configs("quick", {"alpha": 0.01, "beta": 0.5, "mode": "rate", "epochs": 3,
                                   "delta": 0.2, "pack_lr": 5e-4})
    assert (s.alpha, s.beta, s.mode, s.pool_epochs, s.adapt_epochs, s.combine_epochs) == \
        (0.01, 0.5, "rate", 3, 3, 3)
    assert (p.delta, p.lr) == (0.2, 5e-4)
    assert trial_configs("quick", {}) == (slice_preset("quick"), PackConfig())


def test_delta_only_change_reuses_every_fragment(smoke_market, tmp_path):
    _, root, _ = smoke_market
    market = Market(root)
    cv = CVConfig(k=5, folds=2, targets=[[0, 3, 6]])
    cache = FragmentCache(tmp_path / "cache")
    scfg = slice_preset("quick", **SMOKE_CV)
    first = cross_validate(market, cv, scfg, PackConfig(delta=1.0, epochs=20), cache)
    assert (first["fragments_made"], first["fragments_reused"]) == (6, 0)   # 3 classes x 2 folds
    assert first["folds_done"] == 2
    # the CV accuracy is the mean of the folds'; a fold's is a count of correct predictions over
    # its held-out rows of the target classes (only 3 classes x 2 or 3 rows: a multiple of 1/n)
    manifests = {mid: market.manifest(mid, 5) for mid in first["folds"][0]["rows"]}
    target_rows = {r for m in manifests.values() for c, rs in zip(m.classes, m.row_ids)
                   if c in cv.targets[0] for r in rs}
    assert len(target_rows) == 15
    for fold in first["folds"]:
        (acc,) = fold["per_target"]
        assert fold["accuracy"] == acc
        n = len(target_rows & {r for rows in fold["rows"].values() for r in rows["held_out"]})
        assert 6 <= n <= 9 and abs(acc * n - round(acc * n)) < 1e-9, (acc, n)
    assert first["cv_accuracy"] == pytest.approx(
        sum(f["accuracy"] for f in first["folds"]) / 2, abs=1e-12)
    again = cross_validate(market, cv, scfg, PackConfig(delta=0.1, epochs=20), cache)
    assert (again["fragments_made"], again["fragments_reused"]) == (0, 6)
    other = cross_validate(market, cv, slice_preset("quick", **SMOKE_CV, beta=0.3),
                           PackConfig(epochs=20), cache)
    assert other["fragments_made"] == 6                    # a slicing change does reslice
    # each fold slices and packs on the other fold's rows only: held-out rows never train
    for fold in first["folds"]:
        for rows in fold["rows"].values():
            assert rows["train"] and rows["held_out"]
            assert not set(rows["train"]) & set(rows["held_out"])
    for mid in first["folds"][0]["rows"]:   # every k-shot row is held out in exactly one fold
        held = [f["rows"][mid]["held_out"] for f in first["folds"]]
        everything = set(held[0]) | set(first["folds"][0]["rows"][mid]["train"])
        assert sorted(r for h in held for r in h) == sorted(everything)
    # fold fragments carry the fold in their key, so they never collide with whole-set ones
    frag = Fragment.load(next(p for p in (tmp_path / "cache").iterdir() if p.is_dir()))
    assert frag.spec.key.endswith(frag.spec.subset) and frag.spec.subset.startswith("cv2-f")


def _poisoned_root(real: Path, dest: Path) -> Path:
    """A data root whose train splits are the real ones and whose test splits are garbage."""
    for ds in real.iterdir():
        if not ds.is_dir():
            continue
        (dest / ds.name).mkdir(parents=True)
        for f in ds.iterdir():
            if f.name.startswith("test"):
                (dest / ds.name / f.name).write_bytes(b"POISON: a tuner read the test split\n")
            else:
                (dest / ds.name / f.name).symlink_to(f.resolve())
    return dest


def test_sweep_never_reads_the_test_split(smoke_market, tmp_path, monkeypatch):
    from snp_ray.data.testsplit import load_test_split

    _, root, _ = smoke_market
    poisoned = _poisoned_root(Path(os.environ["SNP_DATA_ROOT"]), tmp_path / "data")
    monkeypatch.setenv("SNP_DATA_ROOT", str(poisoned))
    with pytest.raises(Exception):          # the poison is real: reading the test split fails
        load_test_split("cifar10")
    monkeypatch.setenv(ENV_FENCE, "1")
    with pytest.raises(TestSplitAccessError, match="fenced"):
        load_test_split("cifar10")
    monkeypatch.delenv(ENV_FENCE)
    monkeypatch.setenv(ENV_PRESETS, str(tmp_path / "presets"))
    cfg = SweepConfig(market=str(root), task="T1", k=5, folds=2, n_targets=1, trials=3,
                      base_preset="smoke", epochs=[1], storage=str(tmp_path / "tune"),
                      name="tuned-test", data_root=str(poisoned), max_concurrent=1)
    result = run_sweep(cfg)
    assert result["errors"] == []
    assert len(result["trials"]) == 3
    assert all(t["folds_done"] >= 1 for t in result["trials"])
    first, third = result["trials"][0], result["trials"][2]   # default, then the same with δ changed
    assert first["config"]["delta"] != third["config"]["delta"]
    assert third["fragments_made"] == 0 and third["fragments_reused"] > 0
    saved = json.loads((tmp_path / "presets" / "tuned-test.json").read_text())
    assert saved["source"]["cv_accuracy"] == result["best"]["cv_accuracy"]
    assert isinstance(slice_preset(str(tmp_path / "presets" / "tuned-test.json")), SliceConfig)


def test_sweep_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="market"):
        SweepConfig(market="")
    with pytest.raises(ConfigError, match="search"):
        SweepConfig(market=str(tmp_path), search="grid-of-dreams")
    with pytest.raises(UnknownNameError):
        SweepConfig(market=str(tmp_path), base_preset="nope")


def test_snp_tune_cli_compares_chosen_and_default_on_test(smoke_market, tmp_path, monkeypatch, capsys):
    import shutil

    from jsonout import last_json
    from snp_ray.cli import main

    _, root, _ = smoke_market
    market = tmp_path / "market"
    shutil.copytree(root, market, ignore=shutil.ignore_patterns("fragments"))
    monkeypatch.setenv(ENV_PRESETS, str(tmp_path / "presets"))
    rc = main(["tune", "--task", "T1", "--market", str(market), "--k", "5", "--folds", "2",
               "--targets", "1", "--trials", "2", "--test-targets", "2", "--preset", "smoke",
               "--epochs", "1", "--search", "random", "--storage", str(tmp_path / "tune"),
               "--out", str(tmp_path / "out"), "--name", "tuned-cli", "--json"])
    assert rc == 0
    res = last_json(capsys.readouterr().out)
    assert res["trials"] == 2 and res["preset"] == "tuned-cli"
    assert set(res["test"]) == {"default", "chosen"}
    # each configuration's test accuracy is the mean over the 2 seeded target sets of a count of
    # correct predictions over their 3000 test rows (the per-set values are in sweep.json)
    from snp_ray.market import get_task
    from snp_ray.market.tasks import target_sets
    from test_market import assert_is_test_accuracy

    test = json.loads(Path(res["paths"]["json"]).read_text())["test"]
    assert test["targets"] == [list(t) for t in target_sets(get_task("T1"), 2, 0)]
    for label, c in res["test"].items():
        accs = test["configs"][label]["accs"]
        assert len(accs) == 2, label
        for acc, classes in zip(accs, test["targets"]):
            assert assert_is_test_accuracy(acc, "cifar10", classes) == 3000, label
        assert c["acc_mean"] == pytest.approx(sum(accs) / 2, abs=1e-12), label
        assert c["acc_std"] == pytest.approx(abs(accs[0] - accs[1]) / 2, abs=1e-12), label
    report = (tmp_path / "out" / "T1" / "report.md").read_text()
    assert "| default |" in report and "| chosen |" in report and "tuned-cli" in report
    assert open(res["paths"]["figure"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # the saved preset slices through the ordinary CLI by name
    assert main(["slice", "--store", str(market), "--k", "5", "--preset", "tuned-cli",
                 "--model", "T1-m0-vgg11-w0.125", "--json"]) == 0


class _FakeSlicer:
    """Stands in for ModelSlicer: records each slicing call; a 'fragment' is its class id."""

    def __init__(self, engine: str, calls: list):
        self.engine, self.calls = engine, calls

    def slice(self, c):
        self.calls.append([c])
        return types.SimpleNamespace(spec=types.SimpleNamespace(class_id=c))

    def slice_many(self, classes):
        self.calls.append(list(classes))
        return [types.SimpleNamespace(spec=types.SimpleNamespace(class_id=c)) for c in classes]

    def units(self, classes):
        return [list(classes[i:i + 2]) for i in range(0, len(classes), 2)]   # class_batch 2


@pytest.mark.parametrize("engine", ["cached", "batched"])
def test_fold_slicer_batches_the_missing_classes_only(engine):
    """The Tune sweep's and the selector's fold slicing: with the batched engine the first class
    asked slices every class the cache lacks, in class_batch units, and the rest are handed out
    without slicing again; the cached engine slices the asked class only; a slicer is built only
    when something is missing."""
    from snp_ray.tuning.objective import FoldSlicer

    calls, built = [], []

    def build():
        built.append(1)
        return _FakeSlicer(engine, calls)

    cached = {5}
    make = FoldSlicer(build, [3, 4, 5, 6, 7], lambda c: c not in cached)
    got = [make(c).spec.class_id for c in (4, 3, 6, 7)]     # 5 is cached: never asked
    assert got == [4, 3, 6, 7] and built == [1]
    if engine == "batched":
        assert calls == [[4, 3], [6, 7]]
    else:
        assert calls == [[4], [3], [6], [7]]
    assert FoldSlicer(build, [1], lambda c: False) and built == [1]   # nothing built up front
