"""Choose one slicing config for a task's market by few-shot CV under a size budget, save it as a
preset (issue #17 §3: ResNet-20 packs at <= 50 % of the Ensemble's parameters).

The candidates differ only in fields the table's S&P variants do not override (mode and beta
are theirs), so ``snp report --preset NAME`` tests exactly the chosen config. Nothing here reads
the test split: the workers fence it off (snp_ray.data.tables.ENV_FENCE).

Usage: python jobs/select_under_budget.py --task T1 --arch resnet20 --k 20 --max-param-ratio 0.45
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import _jobenv  # noqa: F401  - exits with a hint when this python is not the project's venv
from snp_ray.artifacts import atomic_write_bytes
from snp_ray.evaluation.protocol import market_config
from snp_ray.evaluation.provenance import stamp
from snp_ray.market import build_market
from snp_ray.slicing.config import save_preset
from snp_ray.tuning.budget import select_market_config
from snp_ray.tuning.select import parse_candidates

log = logging.getLogger("select_under_budget")
DEFAULT = "quick,quick-coupled0.5,quick-coupled0.35,quick-coupled0.25"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="T1")
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--root", default="runs/tables", help="where the report's markets live")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--candidates", default=DEFAULT)
    p.add_argument("--max-param-ratio", type=float, default=0.45,
                   help="budget: mean fragment size as a fraction of its source's feature "
                        "extractor (0.45 leaves ~5 points of a 50 %% goal to the pack's layers)")
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--folds-used", type=int, default=2, help="score the first n folds (0: all)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--preset-name", default="", help="default size-<task>-<arch>")
    p.add_argument("--out", default="results/T1-size/selection.json")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    mcfg = market_config(a.task, a.arch)
    root = str(Path(a.root) / a.task / f"{a.arch}-w{mcfg.width:g}")
    build_market(mcfg, root)                       # reused when already trained
    candidates = parse_candidates(a.candidates)
    result = select_market_config(root, candidates, a.k, str(Path(root) / "cv-cache"),
                                  a.max_param_ratio, a.folds, a.folds_used, workers=a.workers)
    name = a.preset_name or f"size-{a.task}-{a.arch}"
    chosen = next(c for c in candidates if c.name == result["chosen"])
    result["preset"] = name
    result["preset_path"] = str(save_preset(name, chosen.config(), source={
        "by": "jobs/select_under_budget.py", "market": root, "k": a.k,
        "max_param_ratio": a.max_param_ratio, "cv_auc": next(r["cv_auc"] for r in result["table"]
                                                             if r["name"] == chosen.name)}))
    from snp_ray.evaluation.reproduce import market_digest

    stamp(result, {**{c.name: c.config().digest() for c in candidates},
                   f"market:{a.arch}": market_digest(a.task, a.arch)},
          ["python", "jobs/select_under_budget.py", *(argv if argv is not None else sys.argv[1:])],
          stage="T1-size")
    atomic_write_bytes(Path(a.out), json.dumps(result, indent=1, sort_keys=True).encode())
    log.info("chose %s (saved as preset %s); wrote %s", chosen.name, name, a.out)
    for r in result["table"]:
        print(f"{r['name']:>20}: CV AUC {r['cv_auc']:.4f}  fragments {r['param_ratio_mean']:.3f} "
              f"of the source{'' if r['within_budget'] else '  (over budget)'}")
    print(f"chosen: {chosen.name} -> preset {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
