"""The main job: train the preset's market if missing, slice every (model, class) pair in
parallel on Ray actors into the fragment store, pack one class set, print a summary.

Run it directly (``python jobs/slice_market.py --preset quickstart``: joins RAY_ADDRESS or starts
Ray in-process) or with ``ray job submit --working-dir . -- python jobs/slice_market.py``.
"""
import sys

import _jobenv  # noqa: F401  - exits with a hint when this python is not the project's venv
from snp_ray.engine.main import main

if __name__ == "__main__":
    sys.exit(main())
