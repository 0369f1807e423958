"""The `snp` CLI contract: subcommands, --help, and one JSON object on the last line."""
from __future__ import annotations

import subprocess
import sys

import pytest

from jsonout import last_json
from snp_ray.cli import COMMANDS, main


def test_console_script_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "snp_ray.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for name in ("models", "data", "train-market"):
        assert name in out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0 and "--json" in capsys.readouterr().out


def test_models_json(capsys):
    assert main(["models", "--json"]) == 0
    models = last_json(capsys.readouterr().out)["models"]
    assert abs(models["vgg16"] - 14.7e6) / 14.7e6 < 0.02 and "resnet20" in models


def test_data_json(real_data, capsys):
    assert main(["data", "--json"]) == 0
    data = last_json(capsys.readouterr().out)["datasets"]
    assert data["cifar10"] == {"train": 50000, "test": 10000, "classes": 10}
    assert data["sst5"]["dev"] == 1101 and data["trec"]["classes"] == 6


def test_train_market_json(ray_cluster, real_data, tmp_path, capsys):
    rc = main(["train-market", "--task", "T6", "--arch", "gru", "--width", "0.25", "--store",
               str(tmp_path), "--epochs", "1", "--train-fraction", "0.2", "--json"])
    assert rc == 0
    out = last_json(capsys.readouterr().out)
    assert [m["classes"] for m in out["models"]] == [["ABBR", "DESC", "ENTY"], ["HUM", "LOC", "NUM"]]
    assert all(m["params"] > 0 for m in out["models"])
    from test_market import assert_stored_test_accuracy
    for m in out["models"]:   # the printed accuracy is exactly that of the weights it stored
        assert_stored_test_accuracy(tmp_path, m["id"], m["test_accuracy"])


def test_bad_input_exits_2_with_json_error(capsys, tmp_path):
    assert main(["train-market", "--task", "T0", "--store", str(tmp_path), "--json"]) == 2
    captured = capsys.readouterr()
    err = last_json(captured.out)
    assert err["type"] == "UnknownNameError" and "T1" in err["error"]
    assert "error: unknown task" in captured.err


def test_slice_json_then_skip(smoke_market, capsys):
    _, root, specs = smoke_market
    args = ["slice", "--store", str(root), "--k", "5", "--model", specs[0].id, "--class", "bird",
            "--mode", "rate", "--beta", "0.5", "--json"]
    assert main(args) == 0
    frags = last_json(capsys.readouterr().out)["fragments"]
    assert len(frags) == 1
    f = frags[0]
    assert f["model"] == specs[0].id and f["class"] == "bird"
    assert 0 < f["params"] < f["source_params"] and f["feature_dim"] == 32 and f["seconds"] > 0
    from snp_ray.store import FragmentStore
    assert FragmentStore(root / "fragments").get(f["key"]).spec.class_id == 2
    assert main(args) == 0                       # already stored: skipped, nothing resliced
    assert last_json(capsys.readouterr().out)["fragments"] == []


def test_slice_unknown_class(smoke_market, capsys):
    _, root, _ = smoke_market
    assert main(["slice", "--store", str(root), "--class", "unicorn", "--json"]) == 2
    assert "held by no model" in last_json(capsys.readouterr().out)["error"]
