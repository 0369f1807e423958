"""Ray Tune sweep of the slicing and packing hyperparameters on few-shot CV (never the test split);
saves the best as a named preset that jobs/slice_market.py --slice-preset and snp slice accept.

Usage: python jobs/tune_hparams.py [--task T1] [--trials 16] [--json]
(``ray job submit --working-dir . -- python jobs/tune_hparams.py ...`` works the same.)
"""
import sys

import _jobenv  # noqa: F401  - exits with a hint when this python is not the project's venv
from snp_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
