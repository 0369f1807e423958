"""Estimate the market's equivalent expansion rate (the paper's Figure 6) on Ray.

Usage: python jobs/estimate_expansion.py [--task T3-C10] [--combos 100] [--k 5,10,20] [--json]
(``ray job submit --working-dir . -- python jobs/estimate_expansion.py ...`` works the same.)
"""
import sys

import _jobenv  # noqa: F401  - exits with a hint when this python is not the project's venv
from snp_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["expansion", *sys.argv[1:]]))
