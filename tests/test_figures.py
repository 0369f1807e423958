"""Figures 5 and 7 from a sliced market, and `snp report` gathering everything into report.md."""
from __future__ import annotations

import json
import shutil

from jsonout import last_json
from snp_ray.cli import main
from snp_ray.evaluation.figures import layer_iou, mean_off_diagonal, unit_iou
from snp_ray.slicing.fragment import FragmentSpec

PNG = b"\x89PNG\r\n\x1a\n"


def test_layer_iou_averages_layers_and_unit_iou_pools_them():
    a = FragmentSpec.__new__(FragmentSpec)
    b = FragmentSpec.__new__(FragmentSpec)
    a.kept, b.kept = {"0": [0, 1, 2], "1": [4]}, {"0": [1, 2, 3], "1": [4]}
    a.source_sha256 = b.source_sha256 = "s"
    assert unit_iou(a, b) == 3 / 5 and unit_iou(a, a) == 1.0
    assert layer_iou(a, b) == (2 / 4 + 1) / 2 and layer_iou(a, a) == 1.0
    assert mean_off_diagonal([[1, 0.5], [0.25, 1]]) == 0.375


def test_figures_and_gathered_report(smoke_market, tmp_path, capsys):
    _, root, _ = smoke_market
    market = tmp_path / "market"
    shutil.copytree(root, market, ignore=shutil.ignore_patterns("fragments"))
    out = tmp_path / "results"
    rc = main(["figures", "--market", str(market), "--k", "5", "--preset", "smoke",
               "--sizes", "1,3", "--out", str(out), "--json"])
    assert rc == 0
    res = last_json(capsys.readouterr().out)
    for name in ("figure5", "figure7"):
        assert open(res["paths"][name], "rb").read(8) == PNG
    rows = res["time_per_class"]
    assert [r["n"] for r in rows] == [1, 3]
    assert all(r["slice_seconds"] > 0 and r["pack_seconds"] > 0 for r in rows)
    saved = json.loads(open(res["paths"]["json"]).read())["iou"]
    for key, kind in (("iou_mean_off_diagonal", ""), ("iou_pooled_mean_off_diagonal", " pooled")):
        means = res[key]
        assert set(means) == {"S&P (R)", "S&P (T)"}
        for label, v in means.items():   # the summary is the mean of the saved matrices' values
            per_model = [mean_off_diagonal(saved[m][f"{label}{kind}"]) for m in saved]
            assert abs(v - sum(per_model) / len(per_model)) < 1e-12
    for entry in saved.values():          # a fragment against itself: exactly 1
        for label in ("S&P (R)", "S&P (T)", "S&P (R) pooled", "S&P (T) pooled"):
            assert [row[i] for i, row in enumerate(entry[label])] == [1.0] * len(entry["classes"])
    report = (out / "report.md").read_text()
    assert "figures/figure5.png" in report and "figures/figure7.png" in report
    assert "_not run yet_" in report                    # no tables were made in this folder
    assert main(["report", "--out", str(out), "--json"]) == 0
    assert last_json(capsys.readouterr().out)["report"] == str(out / "report.md")
