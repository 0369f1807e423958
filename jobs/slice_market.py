"""The main job: train the preset's market if it is missing, then report it.

Run it directly (``python jobs/slice_market.py --preset quickstart``: attaches to RAY_ADDRESS or
starts Ray in-process) or through ``ray job submit -- python jobs/slice_market.py``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from snp_ray.cli import market_summary
from snp_ray.engine.presets import PRESETS, get_preset
from snp_ray.errors import SnpError
from snp_ray.market import build_market


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="quickstart", help=f"one of {sorted(PRESETS)}")
    p.add_argument("--store", default="", help="market store folder (default: the preset's)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on the last line")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        preset = get_preset(a.preset)
        specs = build_market(preset.market, a.store or preset.store, progress=sys.stderr.isatty())
    except SnpError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {"preset": preset.name, "store": a.store or preset.store, **market_summary(specs)}
    if a.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
