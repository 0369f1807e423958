"""Figures 5 and 7 from a sliced market, `snp report` gathering everything into report.md, and
Figures 4 and 6 read back from their matplotlib artists (colours, markers, legends, p = 0)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from jsonout import last_json
from snp_ray.cli import main
from snp_ray.errors import SchemaError
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


# ------------------------------------------------------------------ Figures 4 and 6, read back
REPO = Path(__file__).resolve().parents[1]
PUBLISHED = REPO / "docs" / "results"


def _cell(pct: float, acc: float, std: float = 0.02) -> dict:
    return {"status": "ok", "pct_of_ensemble": pct, "acc_mean": acc, "acc_std": std, "n": 5}


def _protocol_result() -> dict:
    """Two architectures sharing four methods; CA-MKD failed on resnet20."""
    cells = {"vgg11": {"S&P (R)": _cell(28, 0.72), "S&P (T)": _cell(40, 0.83),
                       "Ensemble": _cell(100, 0.84), "CA-MKD": _cell(33, 0.62)},
             "resnet20": {"S&P (R)": _cell(28, 0.70), "S&P (T)": _cell(72, 0.83),
                          "Ensemble": _cell(100, 0.84), "CA-MKD": {"status": "failed"}}}
    return {"task": "T1", "config": {"ks": [5, 20]},
            "archs": {a: {"cells": {m: {"k20": c} for m, c in cs.items()}} for a, cs in cells.items()}}


def _paper() -> dict:
    def entry(pct, mean):
        return {"params": {"pct_of_ensemble": pct}, "acc": {"k20": {"mean": mean, "std": 5.0}}}
    return {"table2": {"T1": {
        "S&P (R)": {"VGG16": entry(26.1, 74.5), "ResNet34": entry(33.5, 80.4)},
        "S&P (T)": {"VGG16": entry(16.8, 76.4), "ResNet34": entry(45.3, 80.3)},
        "CA-MKD": {"VGG16": {"params": {"pct_of_ensemble": 33.3}, "acc": {"k20": "failed"}}}}}}


def _scatters(ax) -> dict[str, object]:
    return {c.get_gid(): c for c in ax.collections if (c.get_gid() or "").startswith(("ours:", "paper:"))}


def test_figure4_colour_per_method_marker_per_arch_paper_hollow_legends_outside():
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    from snp_ray.evaluation.protocol import draw_figure4

    fig = draw_figure4(_protocol_result(), _paper())
    ax = fig.axes[0]
    dots = _scatters(ax)
    ours = {g for g in dots if g.startswith("ours:")}
    paper = {g for g in dots if g.startswith("paper:")}
    assert len(ours) == 7                                       # the failed cell is not drawn
    assert paper == {f"paper:S&P ({v}):{a}" for v in "RT" for a in ("vgg11", "resnet20")}  # no "failed"
    colours: dict[str, set[str]] = {}
    shapes: dict[str, set[bytes]] = {}
    for gid, c in dots.items():
        kind, method, arch = gid.split(":")
        rgba = c.get_facecolor() if kind == "ours" else c.get_edgecolor()
        colours.setdefault(method, set()).add(to_hex(rgba[0]))
        shapes.setdefault(arch, set()).add(c.get_paths()[0].vertices.round(6).tobytes())
        if kind == "paper":
            assert len(c.get_facecolor()) == 0                  # facecolor 'none': hollow
        else:
            assert c.get_facecolor()[0][3] > 0                  # filled
    assert all(len(v) == 1 for v in colours.values()), colours  # one colour per method ...
    assert len({v.pop() for v in colours.values()}) == len(colours)   # ... and no two share one
    assert all(len(v) == 1 for v in shapes.values()) and shapes["vgg11"] != shapes["resnet20"]
    fig.canvas.draw()
    frame = ax.get_window_extent()
    assert ax.get_legend() is None and len(fig.legends) == 2
    for legend in fig.legends:
        assert not legend.get_window_extent().overlaps(frame)   # no legend over the data
        assert legend.get_window_extent().x0 >= frame.x1
    plt.close(fig)


def test_figure4_colours_agree_across_the_published_tasks():
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    from snp_ray.evaluation.protocol import draw_figure4

    seen: dict[str, str] = {}
    for task in ("T1", "T6", "T7"):
        fig = draw_figure4(json.loads((PUBLISHED / task / "results.json").read_text()), {})
        for gid, c in _scatters(fig.axes[0]).items():
            method = gid.split(":")[1]
            assert seen.setdefault(method, to_hex(c.get_facecolor()[0])) == to_hex(c.get_facecolor()[0]), (task, method)
        plt.close(fig)
    assert {"S&P (T)", "Ensemble", "Finetune"} <= set(seen)


def _expansion_result() -> dict:
    from snp_ray.expansion import rates

    accs = [0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.55, 0.5, 0.4]   # p(e) = 0 for e < 0.05
    return {"task": "T3-C10", "T": 464, "N": 5, "S": len(accs), "holders": "own",
            "config": {"z": 1.96}, "k": {"5": {"accuracies": accs, **rates(accs, 464, 5)}}}


def test_figure6_draws_nothing_where_p_is_zero_and_names_t_over_n():
    import matplotlib.pyplot as plt
    import numpy as np

    from snp_ray.expansion.estimate import draw_figure6

    result = _expansion_result()
    r = result["k"]["5"]
    positive = {float(e) for e, p in r["p"].items() if p > 0}
    assert 0 < len(positive) < len(r["p"])                      # the case under test: some zeros
    fig = draw_figure6(result)
    ax = fig.axes[0]
    (line,) = [ln for ln in ax.lines if ln.get_gid() == "R k=5"]
    x, y = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
    drawn = np.isfinite(y)
    assert set(np.round(x[drawn], 6)) == {round(e, 6) for e in positive}   # no point at p = 0
    assert y[drawn].min() >= min(v for v in r["R"].values() if v > 0)     # no floor value
    (band,) = [c for c in ax.collections if c.get_gid() == "band:R k=5"]
    corners = np.concatenate([p.vertices for p in band.get_paths()])
    assert corners[:, 0].min() >= min(positive) - 1e-9           # the band starts where p > 0 ...
    assert corners[:, 1].min() > 0                               # ... and never reaches 0
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any("T/N = 464/5 = 92.8" in t for t in labels)
    assert any("k=5" in t and "p(e) = 0 up to e = 0.04" in t for t in labels)
    ceiling = [ln for ln in ax.lines if "T/N" in ln.get_label()]
    assert ceiling and ceiling[0].get_ydata()[0] == 464 / 5
    assert "T = 464 class combinations, N = 5 original models" in ax.get_title()
    plt.close(fig)


def test_redraw_figures_from_json_only(tmp_path, capsys):
    from snp_ray.expansion.estimate import draw_figure6

    for folder, name, cmd in (("T1", "results.json", "report"),
                              ("expansion/T3-C10", "expansion.json", "expansion")):
        src = tmp_path / folder.replace("/", "-")
        src.mkdir()
        shutil.copy(PUBLISHED / folder / name, src / name)
        assert main([cmd, "--from-json", str(src / name), "--json"]) == 0
        out = last_json(capsys.readouterr().out)
        fig_name = "figure4" if cmd == "report" else "figure6"
        assert out[fig_name] == str(src / f"{fig_name}.png")
        assert (src / f"{fig_name}.png").read_bytes()[:8] == PNG
        assert sorted(p.name for p in src.iterdir()) == sorted([name, f"{fig_name}.png"])
    wrong = tmp_path / "wrong.json"                              # another kind of result
    wrong.write_text(json.dumps({"task": "T1", "config": {}}))
    assert main(["expansion", "--from-json", str(wrong), "--json"]) == 2
    assert last_json(capsys.readouterr().out)["type"] == "SchemaError"
    with pytest.raises(SchemaError, match="'T'"):
        draw_figure6({"task": "T1"})
