"""Regenerate every published result from the code at HEAD into a results folder (``make results``).

Each stage (``--list``) is a table, figure, sweep, study or benchmark of docs/RESULTS.md. A stage
is skipped only when its commands, config digests and algorithm code are those of its last run
(recorded under RUNS/reproduce/) and its outputs are unchanged; ``--force`` reruns it anyway.
Every output JSON is stamped with the commit, the config digests and the command; the folder's
``provenance.md`` and ``report.md`` mark every result whose digests no longer match the current
defaults as stale, and the provenance block of docs/RESULTS.md names the commit.

Usage: python jobs/reproduce_all.py [--only T6,T7] [--skip expansion] [--groups tables,studies]
           [--out docs/results] [--runs runs] [--force] [--keep-going] [--status] [--list]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

import _jobenv  # noqa: F401  - exits with a hint when this python is not the project's venv
from snp_ray.artifacts import atomic_write_bytes
from snp_ray.evaluation.provenance import ROOT, git_commit
from snp_ray.evaluation.reproduce import (STAGES, here, render_provenance, resolve, run_stages,
                                          status_table)
from snp_ray.evaluation.report import gather

log = logging.getLogger("reproduce_all")
BEGIN, END = "<!-- provenance:begin (jobs/reproduce_all.py writes this block) -->", "<!-- provenance:end -->"


def results_block(rows: list[dict], out: str) -> str:
    """The lines docs/RESULTS.md carries between its provenance markers."""
    sha, dirty = git_commit()
    clean = [r for r in rows if r["status"] == "fresh"]
    fresh = sorted({r["stage"] for r in clean if not r.get("code_changed") and not r.get("dirty")})
    older = sorted({r["stage"] for r in clean if r.get("code_changed") or r.get("dirty")} - set(fresh))
    stale = sorted({r.get("stage") or Path(r["path"]).relative_to(here(out)).as_posix()
                    for r in rows if r["status"] == "stale"})
    commits = sorted({r["commit"][:12] for r in clean})
    return "\n".join([
        BEGIN,
        f"Checked against commit `{sha[:12]}`{' (with uncommitted changes)' if dirty else ''} by "
        f"`python jobs/reproduce_all.py --status`; per file: "
        f"[provenance.md]({os.path.relpath(here(out) / 'provenance.md', ROOT / 'docs')}).",
        f"- Regenerated from commit {', '.join(f'`{c}`' for c in commits) or '–'} with the current "
        f"config digests and algorithm code: {', '.join(fresh) or 'none'}.",
        f"- Current config digests, older algorithm code or uncommitted changes: {', '.join(older) or 'none'}.",
        f"- **Stale** (made with older defaults, or before results recorded their digests; their "
        f"sections below show the numbers published then): {', '.join(stale) or 'none'}.",
        END])


def update_results_md(block: str, path: Path = ROOT / "docs" / "RESULTS.md") -> None:
    if not path.is_file():
        return
    text = path.read_text()
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.replace(
        "\n## ", "\n" + block + "\n\n## ", 1)
    atomic_write_bytes(path, text.encode())


def adopt_legacy(out: Path) -> list[str]:
    """Stamp the results JSON files that predate provenance (see --adopt-legacy)."""
    from snp_ray.evaluation.provenance import last_commit_of, stamp_legacy
    from snp_ray.evaluation.reproduce import stage_for

    done = []
    for path in sorted(here(out).rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            log.warning("%s: unreadable (%s); left as it is (it reads as stale)", path, e)
            continue
        if not isinstance(data, dict) or "provenance" in data:
            continue
        stage = stage_for(path, out)
        stamp_legacy(data, last_commit_of(path), "published before results recorded their config "
                     "digests (issue #17); not regenerated since", stage.name if stage else "")
        atomic_write_bytes(path, json.dumps(data, indent=1, default=str).encode())
        done.append(str(path))
    log.info("stamped %d legacy results", len(done))
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma-separated stage names (default: all)")
    p.add_argument("--skip", default="", help="comma-separated stage names to leave out")
    p.add_argument("--groups", default="", help="tables, studies, benchmarks (default: all)")
    p.add_argument("--out", default="docs/results")
    p.add_argument("--runs", default="runs", help="markets, fragments and caches")
    p.add_argument("--force", action="store_true", help="rerun stages that are up to date")
    p.add_argument("--keep-going", action="store_true", help="a failed stage blocks only its dependants")
    p.add_argument("--status", action="store_true", help="only mark fresh/stale; run nothing")
    p.add_argument("--list", action="store_true", help="list the stages and their commands")
    p.add_argument("--adopt-legacy", action="store_true",
                   help="stamp every results JSON that has no provenance with the commit that last "
                        "changed it and no digests (it stays stale until regenerated)")
    p.add_argument("--no-results-md", action="store_true", help="leave docs/RESULTS.md alone")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    split = (lambda s: [x for x in s.split(",") if x])
    if a.list:
        for s in STAGES.values():
            print(f"{s.name:>13} [{s.group}] {s.title}\n{'':>14} {s.command_line(a.out, a.runs)}")
        return 0
    ran = []
    if a.adopt_legacy:
        adopt_legacy(Path(a.out))
    if not a.status:
        stages = resolve(split(a.only), split(a.skip), split(a.groups))
        ran = run_stages(stages, a.out, a.runs, force=a.force, keep_going=a.keep_going)
    rows = status_table(a.out)
    paths = {"provenance": render_provenance(rows, a.out), "report": gather(here(a.out))}
    # the block describes docs/results only: a scratch --out leaves RESULTS.md alone
    if not a.no_results_md and here(a.out).resolve() == (ROOT / "docs" / "results").resolve():
        update_results_md(results_block(rows, a.out))
    for r in ran:
        print(json.dumps(r))
    for r in rows:
        print(f"{r['status']:>5}  {Path(r['path']).relative_to(here(a.out))}  {'; '.join(r.get('why') or [])}")
    rel = (lambda p: os.path.relpath(p, ROOT))
    print(json.dumps({"stages": ran, "paths": {k: rel(v) for k, v in paths.items()},
                      "stale": [rel(r["path"]) for r in rows if r["status"] == "stale"]}))
    return 1 if any(r["status"] in ("failed", "blocked") for r in ran) else 0


if __name__ == "__main__":
    sys.exit(main())
