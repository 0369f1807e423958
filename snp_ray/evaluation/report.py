"""Gather every table and figure under a results folder into one ``report.md`` that reads top
to bottom: the paper's tables, Figure 4, the Tune sweep, the expansion estimate (Figure 6), and
Figures 5 and 7. Only what exists is included; each section says which command makes it."""
from __future__ import annotations

from pathlib import Path

from snp_ray.artifacts import atomic_write_bytes

TASK_ORDER = ["T1", "T2", "T3", "T4", "T5", "T6", "T7"]


def _demote(md: str) -> str:
    """Push a section's headings one level down so the report keeps one title."""
    return "\n".join("#" + line if line.startswith("#") else line for line in md.splitlines())


def provenance_line(result_json: Path, out: Path) -> str:
    """One line under a section: the commit its numbers came from, and **stale** with the reason
    when its config digests differ from the current defaults' (or were never recorded)."""
    from snp_ray.evaluation.reproduce import stage_status

    if not result_json.is_file():
        return ""
    st = stage_status(result_json, out)
    made = f"commit `{st['commit'][:12]}`" if st.get("commit") else "an unrecorded commit"
    if st["status"] == "stale":
        return f"> **Stale** ({result_json.relative_to(out).as_posix()}, {made}): {'; '.join(st['why'])}."
    note = "; the algorithm's code has changed since" if st.get("code_changed") else ""
    return f"> Made at {made} with the current defaults' config digests{note}."


def gather(out: str | Path) -> str:
    out = Path(out)
    parts = ["# snp_ray results", "",
             "Every number below comes from a run recorded with its command in docs/RESULTS.md. "
             "Accuracy cells read `ours | paper`.", ""]
    tasks = [t for t in TASK_ORDER if (out / t / "table.md").is_file()]
    parts += ["## The paper's tables (`snp report --task T`)", ""]
    if not tasks:
        parts += ["_not run yet_", ""]
    for t in tasks:
        line = provenance_line(out / t / "results.json", out)
        parts += [_demote(_demote((out / t / "table.md").read_text())), ""] + ([line, ""] if line else [])
        if (out / t / "figure4.png").is_file():
            parts += [f"![Figure 4, {t}]({t}/figure4.png)", ""]
    size = out / "T1-size" / "T1"
    if (size / "table.md").is_file():
        parts += ["## ResNet-20 under a size budget chosen by few-shot CV (`jobs/select_under_budget.py`)", ""]
        line = provenance_line(size / "results.json", out)
        parts += [_demote(_demote((size / "table.md").read_text())), ""] + ([line, ""] if line else [])
    sections = [
        ("Tune sweep (`snp tune`)", out / "tune", "report.md", ["sweep.png"]),
        ("Equivalent expansion rate (`snp expansion`)", out / "expansion", "expansion.md",
         ["figure6.png"]),
    ]
    for title, folder, md, figs in sections:
        parts += [f"## {title}", ""]
        found = sorted(p.parent for p in folder.glob(f"*/{md}")) if folder.is_dir() else []
        if not found:
            parts += ["_not run yet_", ""]
        for sub in found:
            line = next((provenance_line(j, out) for j in sorted(sub.glob("*.json"))), "")
            parts += [_demote(_demote((sub / md).read_text())), ""] + ([line, ""] if line else [])
            parts += [f"![{f}]({sub.relative_to(out)}/{f})" for f in figs if (sub / f).is_file()]
            parts.append("")
    parts += ["## Figures 5 and 7 (`snp figures`)", ""]
    figs = out / "figures"
    if (figs / "figures.md").is_file():
        line = provenance_line(figs / "figures.json", out)
        parts += [_demote(_demote((figs / "figures.md").read_text())), ""] + ([line, ""] if line else [])
    shown = [f for f in ("figure5.png", "figure7.png") if (figs / f).is_file()]
    parts += [f"![{f}](figures/{f})" for f in shown] or ["_not run yet_"]
    if (out / "provenance.md").is_file():
        parts += ["", "Which commit every results JSON came from, and which are stale: "
                  "[provenance.md](provenance.md)."]
    text = "\n".join(parts) + "\n"
    atomic_write_bytes(out / "report.md", text.encode())
    return str(out / "report.md")
