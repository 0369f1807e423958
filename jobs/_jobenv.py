"""Imported first by the job scripts: a job whose ``python`` is not the project's environment stops
at once with one ``error:`` line that names the fix, instead of a ModuleNotFoundError for torch.

Under ``ray job submit ... -- python jobs/...`` the job's ``python`` is whichever one comes first
on the PATH that ``ray start`` had: the system one unless the cluster was started from the venv
(``make cluster`` does; cluster.yaml's nodes do). Only the modules are looked up here (no import),
so this costs milliseconds and never hides an ImportError raised inside the project's own code.
"""
import importlib.util
import json
import sys

REQUIRED = ("torch", "ray", "numpy", "pyarrow", "safetensors", "snp_ray")


def missing() -> list[str]:
    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]


def check() -> None:
    gone = missing()
    if not gone:
        return
    msg = (f"this job's python ({sys.executable}) cannot import {', '.join(gone)}: it is not the "
           "project's venv. Start the local cluster with `make cluster` (it puts .venv/bin first "
           "on PATH, so a job's `python` is the venv's), or start Ray as `PATH=$PWD/.venv/bin:$PATH "
           "ray start ...`, or run the script with .venv/bin/python")
    print(f"error: {msg}", file=sys.stderr)
    if "--json" in sys.argv:
        print(json.dumps({"error": msg, "type": "JobEnvironmentError"}))
    sys.exit(2)


check()
