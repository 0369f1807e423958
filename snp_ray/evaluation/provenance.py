"""Where a published number came from: the git commit, the code, the configs, the machine.

Every results JSON carries a ``provenance`` object (:func:`stamp`): the commit and whether the
tracked code differed from it, a digest of every module that decides a number
(:func:`snp_ray.config.code_digest`), the config digests the numbers were made with, the
command, the environment (:func:`snp_ray.runtime.environment`: engine, device, precision,
versions, CPU flags, threads) and what the run reused from earlier runs. :func:`staleness`
compares a stamp with what the current code would use, so a report can mark a table whose
configs have moved on.
"""
from __future__ import annotations

import datetime as _dt
import subprocess
from pathlib import Path
from typing import Any

from snp_ray.config import NOT_DIGESTED, code_digest
from snp_ray.errors import SchemaError

__all__ = ["ROOT", "ORCHESTRATION", "code_digest", "git_commit", "stamp", "relative",
           "last_commit_of", "stamp_legacy", "provenance_of", "staleness", "reuse_note"]

#: the repository root (this file is snp_ray/evaluation/provenance.py)
ROOT = Path(__file__).resolve().parents[2]
#: files that only orchestrate or present results: editing them does not make a run "dirty"
ORCHESTRATION = tuple(f"snp_ray/{p}" for p in NOT_DIGESTED if p.startswith("evaluation/")) + (
    "jobs/reproduce_all.py",)


def git_commit(root: Path = ROOT) -> tuple[str, bool]:
    """(HEAD's sha, whether code that decides results differs from it: the package, the jobs and
    the benchmarks, less :data:`ORCHESTRATION`); ("unknown", True) outside a checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True, timeout=30).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                  "snp_ray", "jobs", "benchmarks"], cwd=root, capture_output=True,
                                 text=True, check=True, timeout=30).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return "unknown", True
    paths = [line[3:].split(" -> ")[-1] for line in changed if line.strip()]
    return sha, any(p not in ORCHESTRATION for p in paths)


def stamp(result: dict[str, Any], digests: dict[str, str], command: list[str] | str = "",
          stage: str = "", at: tuple[str, bool, str] | None = None,
          environment: dict[str, Any] | None = None, reused: dict[str, Any] | None = None,
          workdir: str = "") -> dict[str, Any]:
    """``result`` with a ``provenance`` object (replaced if present); returns ``result``.
    ``at``: (commit, dirty, code digest) taken when the run started (default: now), so an edit
    or a commit made while a long run works cannot relabel what it made. ``environment``: what
    :func:`snp_ray.runtime.environment` said when the run started; ``reused``: what the run took
    from earlier runs (None or empty: nothing, the run started from nothing); ``workdir``: the
    stage's working folder (markets, fragments, caches)."""
    sha, dirty, code = at or (*git_commit(), code_digest())
    result["provenance"] = {
        "commit": sha, "dirty": dirty, "code": code, "digests": dict(sorted(digests.items())),
        "command": relative(command if isinstance(command, str) else " ".join(command)), "stage": stage,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "reused": dict(reused) if reused else False}
    if environment is not None:
        result["provenance"]["environment"] = dict(environment)
    if workdir:
        result["provenance"]["workdir"] = relative(workdir)
    return result


def reuse_note(reused: Any) -> str:
    """One line naming what a run reused (its ``provenance.reused``), "" when nothing."""
    if not isinstance(reused, dict) or not reused:
        return ""
    parts = []
    if reused.get("workdir"):
        w = reused["workdir"]
        parts.append(f"working folder of run {w.get('run', '?')} (made {w.get('created', '?')} at "
                     f"commit {str(w.get('commit', '?'))[:12]})")
    parts += [f"entry {e}" for e in reused.get("entries") or []]
    return "reused " + "; ".join(parts) if parts else ""


def relative(value: Any) -> Any:
    """``value`` with every path under the repository root written relative to it (strings in
    lists and dicts too): a published result names no machine's folders."""
    if isinstance(value, str):
        return value.replace(str(ROOT) + "/", "")
    if isinstance(value, list):
        return [relative(v) for v in value]
    if isinstance(value, dict):
        return {k: relative(v) for k, v in value.items()}
    return value


def last_commit_of(path: Path, root: Path = ROOT) -> str:
    """The last commit that changed ``path`` ("unknown" when git cannot say)."""
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%H", "--", str(path)], cwd=root,
                             capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out or "unknown"


def stamp_legacy(result: dict[str, Any], commit: str, why: str, stage: str = "") -> dict[str, Any]:
    """Provenance for a result published before results recorded it: the commit that last
    changed the file, no digests (so it reads as stale until it is regenerated)."""
    result["provenance"] = {"commit": commit, "dirty": False, "code": "", "digests": {},
                            "command": "", "stage": stage, "legacy": True, "why": why}
    return result


def provenance_of(result: Any, where: str = "result") -> dict[str, Any]:
    """The ``provenance`` object of a results JSON; SchemaError when it is missing or malformed."""
    prov = result.get("provenance") if isinstance(result, dict) else None
    if not isinstance(prov, dict):
        raise SchemaError(f"{where}: no 'provenance' object (commit and config digests)")
    if not isinstance(prov.get("digests"), dict) or not isinstance(prov.get("commit"), str):
        raise SchemaError(f"{where}: provenance needs 'commit' (string) and 'digests' (object)")
    return prov


def staleness(prov: dict[str, Any], current: dict[str, str]) -> list[str]:
    """Why a stamped result no longer matches what the current code would run: one line per
    config digest that differs or is missing ([] = fresh)."""
    recorded = prov.get("digests") or {}
    out = []
    for name, digest in sorted(current.items()):
        have = recorded.get(name)
        if have is None:
            out.append(f"{name}: not recorded (now {digest})")
        elif have != digest:
            out.append(f"{name}: made with {have}, the current default is {digest}")
    return out
