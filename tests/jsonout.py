"""Read the one JSON object a job or CLI prints, even when Ray's own processes (raylet, workers)
write log lines to the same inherited stdout after it."""
from __future__ import annotations

import json


def last_json(out: str) -> dict:
    """The last stdout line that is a JSON object; AssertionError (with the tail) if none is."""
    for line in reversed(out.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    raise AssertionError("no JSON object line in the output:\n" + out[-2000:])
