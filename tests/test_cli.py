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


# ---------------------------------------------------------------- snp pack --samples
PACK = ["pack", "--classes", "airplane,cat,frog", "--k", "5", "--preset", "smoke", "--json"]


def _requester_file(path, real_data, per_class: dict[int, int], row_group: int = 9):
    """A Parquet file in CIFAR-10's schema: the first ``per_class[c]`` PNGs of class c in one
    row group of the train split."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    group = pq.ParquetFile(real_data / "cifar10" / "train.parquet").read_row_group(
        row_group, columns=["image", "label"])
    labels = group.column("label").to_numpy()
    rows = [i for c, n in per_class.items() for i in np.flatnonzero(labels == c)[:n]]
    pq.write_table(group.take(rows), path)
    return path


def test_pack_trains_on_the_requesters_samples(sliced_smoke, real_data, tmp_path, capsys):
    """--samples: the pack trains on exactly the file's rows (all of requested classes);
    --with-market-shots adds the market's k shots of each class; --balance is recorded."""
    import hashlib

    from snp_ray.packing import PackedModel
    from snp_ray.packing.samples import PackSamples

    path = _requester_file(tmp_path / "mine.parquet", real_data, {0: 4, 3: 2, 6: 5})
    out = tmp_path / "pack"
    assert main(PACK + ["--store", str(sliced_smoke), "--samples", str(path), "--out", str(out)]) == 0
    result = last_json(capsys.readouterr().out)
    data = path.read_bytes()
    assert result["samples"] == {
        "file": str(path), "source": "requester:" + hashlib.sha256(data).hexdigest(), "count": 11,
        "sha256": PackSamples.from_parquet(data, "cifar10").sha256, "market": 0}
    assert result["train_samples"] == 11
    assert PackedModel.load(out).spec.metrics["train_samples"] == 11

    assert main(PACK + ["--store", str(sliced_smoke), "--samples", str(path), "--plan", "best",
                        "--with-market-shots", "--balance", "class", "--out", str(tmp_path / "pack2")]) == 0
    result = last_json(capsys.readouterr().out)
    assert result["samples"]["count"] == 11 and result["samples"]["market"] == 3 * 5
    saved = PackedModel.load(tmp_path / "pack2").spec
    assert saved.metrics["train_samples"] == 11 + 15 and saved.config["balance"] == "class"
    assert [c["candidates"][0]["source"] for c in result["plan"]["classes"]] == ["requester AUC"] * 3


def test_pack_refuses_bad_samples_with_exit_2(sliced_smoke, real_data, tmp_path, capsys, monkeypatch):
    """A label of a class the request does not name is refused (never silently dropped); so are
    a file that is not Parquet, a missing class, a file over the service's byte or row cap, and
    --with-market-shots without --samples. Each exits 2 with an error line."""
    from snp_ray.packing import samples as samples_io

    stray = _requester_file(tmp_path / "stray.parquet", real_data, {0: 2, 3: 2, 6: 2, 5: 1})
    partial = _requester_file(tmp_path / "partial.parquet", real_data, {0: 2, 3: 2})
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not a parquet file")
    cases = [
        (["--samples", str(stray)], "the samples hold classes [5] that the request"),
        (["--samples", str(tmp_path / "bad.parquet")], "not a readable Parquet file"),
        (["--samples", str(tmp_path / "nowhere.parquet")], "does not exist"),
        (["--samples", str(partial)], "the samples hold none of ['frog (6)']"),
        (["--with-market-shots"], "give --samples"),
    ]
    for extra, text in cases:
        assert main(PACK + ["--store", str(sliced_smoke)] + extra) == 2, extra
        captured = capsys.readouterr()
        assert text in last_json(captured.out)["error"], (extra, captured.out[-500:])
        assert "error: " in captured.err
    ok = _requester_file(tmp_path / "ok.parquet", real_data, {0: 2, 3: 2, 6: 2})
    monkeypatch.setattr(samples_io, "MAX_ROWS", 5)
    assert main(PACK + ["--store", str(sliced_smoke), "--samples", str(ok)]) == 2
    assert "holds 6 rows, more than the 5 allowed" in last_json(capsys.readouterr().out)["error"]
    monkeypatch.setattr(samples_io, "MAX_BYTES", ok.stat().st_size - 1)
    assert main(PACK + ["--store", str(sliced_smoke), "--samples", str(ok)]) == 2
    err = last_json(capsys.readouterr().out)
    assert err["type"] == "PayloadTooLarge" and "over the limit" in err["error"]
