"""The test split stays behind the evaluation API: code that fits anything never imports it."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "snp_ray"
#: modules that train or select anything; they must see few-shot (or developer) data only
#: (the job bodies engine/main.py, engine/expansion.py and engine/learnware.py score packs on the
#: test split by design, through snp_ray.data.testsplit; the slice job's driver and actors, like
#: the service, never may)
FITTING = ["market/training.py", "market/mixed.py", "market/add.py", "data/fewshot.py", "data/augment.py", "metrics.py",
           "slicing", "store", "packing", "tuning", "baselines", "serve", "engine/job.py",
           "engine/actors.py", "engine/noop.py"]
FORBIDDEN = ("snp_ray.evaluation", "snp_ray.data.testsplit", "EVAL_ACCESS", "load_test_split",
             "test_accuracy")


def _files() -> list[Path]:
    out = []
    for rel in FITTING:
        p = PKG / rel
        out += sorted(p.rglob("*.py")) if p.is_dir() else ([p] if p.is_file() else [])
    return out


def test_fitting_code_cannot_reach_the_test_split():
    files = _files()
    assert files, "nothing scanned"
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.Name):
                names = [node.id]
            for bad in FORBIDDEN:
                assert not any(n == bad or n.startswith(bad + ".") for n in names), (
                    f"{path.relative_to(PKG)} uses {bad}")
