"""The command contract the ``snp`` CLI and the jobs/ scripts share: logs to stderr, typed
errors exit 2 with one ``error:`` line, and with ``--json`` the result as one JSON object on the
last line of stdout; and the plain-text tables both print."""
from __future__ import annotations

import json
import logging
import sys
from typing import Any, Callable

from snp_ray.errors import SnpError


def run_command(fn: Callable[[], dict[str, Any]], as_json: bool, verbose: bool = False) -> tuple[int, dict[str, Any] | None]:
    """Run a command body under the CLI contract: logs to stderr, typed errors -> exit 2,
    the result as one JSON object on the last line of stdout with ``--json``."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = fn()
    except SnpError as e:
        print(f"error: {e}", file=sys.stderr)
        if as_json:
            print(json.dumps({"error": str(e), "type": type(e).__name__}))
        return 2, None
    if as_json:
        print(json.dumps(result, default=str))
    return 0, result


def table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def market_summary(specs) -> dict[str, Any]:
    rows = [[s.id, ",".join(s.class_names), f"{s.params:,}", f"{s.metrics['test_accuracy']:.4f}",
             f"{s.metrics.get('train_seconds', 0):.1f}"] for s in specs]
    print(table(rows, ["model", "classes", "params", "test acc (own classes)", "train s"]))
    return {"models": [{"id": s.id, "classes": s.class_names, "class_ids": s.classes,
                        "test_accuracy": s.metrics["test_accuracy"], "params": s.params,
                        "train_seconds": s.metrics.get("train_seconds")} for s in specs]}
