"""The evaluation protocol end to end on a tiny market: cells, aggregation, paper columns, files."""
from __future__ import annotations

import json
import statistics

import pytest
from test_market import assert_is_test_accuracy

from snp_ray.evaluation.protocol import ProtocolConfig, paper_results, render_table, run_protocol, write_outputs


def test_protocol_writes_table_json_and_figure(ray_cluster, real_data, tmp_path):
    cfg = ProtocolConfig(task="T1", archs=["vgg11"], ks=[5, 10], n_targets=2, slice_preset="smoke",
                         baselines=["ensemble"], root=str(tmp_path / "runs"), width=0.125, epochs=1,
                         train_fraction=0.02, pack_epochs=5)
    result = run_protocol(cfg, progress=False)
    cells = result["archs"]["vgg11"]["cells"]
    assert set(cells) == {"S&P (R)", "S&P (T)", "Ensemble"}
    for method, by_k in cells.items():
        assert set(by_k) == {"k5", "k10"}, method          # every method has every k
        for c in by_k.values():
            assert c["status"] == "ok" and c["n"] == 2
            assert [r["classes"] for r in c["runs"]] == [list(t) for t in result["targets"]]
            # each run's accuracy counts correct predictions over the test rows of its classes
            # (3000 for three CIFAR-10 classes), and the cell summarises exactly those runs
            accs = [r["acc"] for r in c["runs"]]
            for r in c["runs"]:
                assert assert_is_test_accuracy(r["acc"], "cifar10", r["classes"]) == 3000, method
            assert c["acc_mean"] == pytest.approx(statistics.fmean(accs), abs=1e-12), method
            assert c["acc_std"] == pytest.approx(statistics.pstdev(accs), abs=1e-12), method
    assert abs(cells["Ensemble"]["k5"]["pct_of_ensemble"] - 100) < 1
    assert cells["S&P (R)"]["k5"]["pct_of_ensemble"] < 100
    paper = paper_results()
    assert "table2" in paper
    table = render_table(result, paper)
    assert "S&P (R)" in table and "62.20 ± 4.00" in table   # the paper's S&P (T) k=5 VGG16 cell
    paths = write_outputs(result, tmp_path / "results", paper)
    assert json.loads(open(paths["json"]).read())["task"] == "T1"
    assert open(paths["figure4"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
