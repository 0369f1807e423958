"""Regenerate every published result from the code at HEAD into a results folder (``make results``).

Each stage (``--list``) is a table, figure, sweep, study or benchmark of docs/RESULTS.md. A stage
is skipped only when its commands, config digests, code, environment and inputs are those of its
last run (recorded under RUNS/reproduce/) and its outputs are unchanged; ``--force`` reruns it
anyway and first deletes its working folders. A stage that runs starts from nothing in
RUNS/stages/STAGE/CODE-DIGEST unless ``--reuse`` lets it keep what an earlier run of the same code left
there (and ``snp report`` copy unchanged entries); the reuse is printed and recorded in the
outputs. ``--precision fp32`` forces what ``precision="auto"`` means (SNP_PRECISION). Every
output JSON is stamped with the commit, the config digests, the command and the environment; the
folder's ``provenance.md`` and ``report.md`` mark every result whose digests no longer match the
current defaults as stale, and the provenance block of docs/RESULTS.md names the commit.
See docs/REPRODUCIBILITY.md.

Usage: python jobs/reproduce_all.py [--only T6,T7] [--skip expansion] [--groups tables,studies]
           [--out docs/results] [--runs runs] [--force | --reuse] [--precision fp32]
           [--keep-going] [--status] [--list]
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
from snp_ray.evaluation.provenance import ROOT, git_commit, reuse_note
from snp_ray.evaluation.reproduce import (STAGES, here, render_provenance, render_runs, resolve,
                                          run_stages, status_table)
from snp_ray.evaluation.report import gather

log = logging.getLogger("reproduce_all")
BEGIN, END = "<!-- provenance:begin (jobs/reproduce_all.py writes this block) -->", "<!-- provenance:end -->"


def results_block(rows: list[dict], out: str) -> str:
    """The lines docs/RESULTS.md carries between its provenance markers."""
    sha, dirty = git_commit()
    clean = [r for r in rows if r["status"] == "fresh"]
    reused = sorted({r["stage"] for r in clean if r.get("reused")})
    fresh = sorted({r["stage"] for r in clean if not r.get("code_changed") and not r.get("dirty")}
                   - set(reused))
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
        f"- Made with reused work (`--reuse`, or entries `snp report` copied from an earlier run): "
        f"{', '.join(reused) or 'none'}.",
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
    p.add_argument("--force", action="store_true",
                   help="rerun stages that are up to date, after deleting their working folders")
    p.add_argument("--reuse", action="store_true",
                   help="let a stage keep what an earlier run of the same code left in its working "
                        "folder, and snp report copy unchanged entries (printed and recorded)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="",
                   help="force what precision=auto means in every stage (sets SNP_PRECISION)")
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
    if a.precision:         # before anything reads it: the environment and every stage see it
        os.environ["SNP_PRECISION"] = a.precision
    if a.list:
        from snp_ray.config import code_digest

        code = code_digest()
        for s in STAGES.values():
            print(f"{s.name:>13} [{s.group}] {s.title}\n{'':>14} {s.command_line(a.out, a.runs, code)}")
        return 0
    ran = []
    if a.adopt_legacy:
        adopt_legacy(Path(a.out))
    if not a.status:
        stages = resolve(split(a.only), split(a.skip), split(a.groups))
        ran = run_stages(stages, a.out, a.runs, force=a.force, keep_going=a.keep_going,
                         reuse=a.reuse)
    rows = status_table(a.out)
    paths = {"provenance": render_provenance(rows, a.out), "report": gather(here(a.out))}
    # the block describes docs/results only: a scratch --out leaves RESULTS.md alone
    if not a.no_results_md and here(a.out).resolve() == (ROOT / "docs" / "results").resolve():
        update_results_md(results_block(rows, a.out))
    if ran:
        print(render_runs(ran))
    for r in rows:
        note = reuse_note(r.get("reused"))
        print(f"{r['status']:>5}  {Path(r['path']).relative_to(here(a.out))}  "
              f"{'; '.join((r.get('why') or []) + ([note] if note else []))}")
    rel = (lambda p: os.path.relpath(p, ROOT))
    print(json.dumps({"stages": ran, "paths": {k: rel(v) for k, v in paths.items()},
                      "stale": [rel(r["path"]) for r in rows if r["status"] == "stale"]}))
    return 1 if any(r["status"] in ("failed", "blocked") for r in ran) else 0


if __name__ == "__main__":
    sys.exit(main())
