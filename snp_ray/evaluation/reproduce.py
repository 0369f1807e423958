"""Regenerate every published result from the code at HEAD (``make results``).

A :class:`Stage` is one published table, figure, sweep, study or benchmark: the commands that
make it, the results JSON files it writes, and the config digests the current code would use
for it (:data:`DIGESTS`). :func:`run_stages` runs the stages in order, skipping one only when its
commands, digests and algorithm code (:func:`provenance.code_digest`) are those of its last
run and its outputs are unchanged since; it stamps every output JSON with its provenance and
writes ``provenance.md`` beside them. :func:`stage_status` tells a fresh result from a stale
one (digests that no longer match the current defaults, or no provenance at all).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from snp_ray.artifacts import atomic_write_bytes
from snp_ray.errors import ConfigError, EngineError, UnknownNameError
from snp_ray.evaluation.provenance import ROOT, code_digest, git_commit, relative, stamp, staleness

log = logging.getLogger(__name__)

PAPER_KS = [5, 10, 20]
TEXT_KS = [5, 10]


# ------------------------------------------------------------------ digests of the current code
def market_digest(task: str, arch: str, width: float = 0.0, epochs: int = 0,
                  train_fraction: float = 1.0, ks: list[int] | None = None) -> str:
    """The digest of a task's CPU-scale market as the protocol builds it (training recipe and
    the k values of its few-shot manifests included)."""
    from snp_ray.evaluation.protocol import market_config

    return market_config(task, arch, width, epochs, train_fraction, ks=list(ks or PAPER_KS)).digest()


def market_label(path: str, task: str, arch: str) -> str:
    """A market folder named by the digest of the recipe that built it when it is the protocol's
    default market for (task, arch) (``.../<task>/<arch>-w<width>``); any other by its path."""
    from snp_ray.evaluation.protocol import market_config

    p = Path(path)
    default = f"{arch}-w{market_config(task, arch).width:g}"
    return market_digest(task, arch) if (p.parent.name, p.name) == (task, default) else path


def protocol_digests(cfg: Any) -> dict[str, str]:
    """A table's digests: each S&P variant's slice config, the packing config, every market."""
    from snp_ray.evaluation.protocol import _digests

    out = _digests(cfg)
    out.update({f"market:{a}": market_digest(cfg.task, a, cfg.width, cfg.epochs, cfg.train_fraction,
                                             cfg.ks) for a in cfg.archs})
    return out


def table_digests(task: str, archs: list[str], preset: str = "quick",
                  ks: list[int] | None = None) -> dict[str, str]:
    from snp_ray.evaluation.protocol import ProtocolConfig

    return protocol_digests(ProtocolConfig(task=task, archs=list(archs), ks=list(ks or PAPER_KS),
                                           slice_preset=preset))


def slice_digests(preset: str, variants: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Digests of ``preset`` with each variant's overrides, and of its packing config."""
    from snp_ray.packing import preset_pack_config
    from snp_ray.slicing import slice_preset

    out = {name: slice_preset(preset, **over).digest() for name, over in variants.items()}
    out["pack"] = preset_pack_config(preset).digest()
    return out


def tune_digests(preset: str, market: str) -> dict[str, str]:
    return {**slice_digests(preset, {"base": {}}), "market": market}


def figures_digests(preset: str, market: str) -> dict[str, str]:
    from snp_ray.evaluation.protocol import VARIANTS

    return {**slice_digests(preset, VARIANTS), "market": market}


def expansion_digests(cfg: Any) -> dict[str, str]:
    """The slice and packing configs, the expansion settings (not where files go), the market."""
    from snp_ray.market import get_task

    return {**slice_digests(cfg.slice_preset, {"slice": {}}),
            "expansion": cfg.replace(market="", out="").digest(),
            "market": market_digest(cfg.task, get_task(cfg.task).default_arch, ks=cfg.ks)}


def _t1_size() -> dict[str, str]:
    from snp_ray.tuning.select import parse_candidates

    out = {c.name: c.config().digest() for c in parse_candidates(SIZE_CANDIDATES)}
    out["market:resnet20"] = market_digest("T1", "resnet20")
    return out


def _expansion() -> dict[str, str]:
    from snp_ray.expansion import ExpansionConfig

    return expansion_digests(ExpansionConfig())


def _expansion_merge() -> dict[str, str]:
    from snp_ray.expansion import ExpansionConfig

    return expansion_digests(ExpansionConfig(holders="merge"))


SHARED_VARIANTS = ("threshold,threshold+frozen,threshold+frozen+table0.5,"
                   "threshold+frozen+table0.25,rate0.5,rate0.5+frozen")
SHARED_ENC64 = "threshold+frozen,threshold0.3+frozen+table1.0"
SIZE_CANDIDATES = "quick,quick-coupled0.5,quick-coupled0.35,quick-coupled0.25"


def _shared(task: str, arch: str) -> Callable[[], dict[str, str]]:
    """Digests of the shared-table study's slice variants (parsed as the benchmark parses them)."""
    def digests() -> dict[str, str]:
        from snp_ray.slicing.config import variant_overrides

        from snp_ray.packing import preset_pack_config

        names = SHARED_VARIANTS.split(",") + SHARED_ENC64.split(",")
        out = slice_digests("quick", {v: variant_overrides(v) for v in names})
        out["pack"] = preset_pack_config("quick", share_tables=False).digest()
        out["pack-enc64"] = preset_pack_config("quick", share_tables=False, hidden=64).digest()
        out[f"market:{arch}"] = market_digest(task, arch, ks=TEXT_KS)
        return out
    return digests


def _preset(name: str) -> Callable[[], dict[str, str]]:
    """The digests of a stage that slices and packs with preset ``name`` as it stands."""
    return lambda: slice_digests(name, {name: {}})


# ------------------------------------------------------------------------------- the stages
@dataclass(frozen=True)
class Stage:
    """One published result. ``commands``: argv lists, ``{py}``, ``{out}`` (the results folder)
    and ``{runs}`` (markets, fragments, caches) filled in; ``outputs``: the JSON files it writes,
    relative to ``{out}``; ``digests``: the config digests the current code uses for it."""

    name: str
    title: str
    commands: tuple[tuple[str, ...], ...]
    outputs: tuple[str, ...]
    digests: Callable[[], dict[str, str]]
    needs: tuple[str, ...] = ()
    group: str = "tables"           # tables | studies | benchmarks

    def argv(self, out: str, runs: str, py: str = "") -> list[list[str]]:
        return [[x.replace("{py}", py or sys.executable).replace("{out}", out).replace("{runs}", runs)
                 for x in cmd] for cmd in self.commands]

    def command_line(self, out: str, runs: str) -> str:
        """The commands as one shell line, ``python`` for the interpreter."""
        return " && ".join(" ".join(a) for a in self.argv(out, runs, "python"))


def _report(task: str, archs: str, ks: str) -> tuple[str, ...]:
    return ("{py}", "-m", "snp_ray.cli", "report", "--task", task, "--archs", archs, "--k", ks,
            "--targets", "5", "--preset", "quick", "--root", "{runs}/tables", "--out", "{out}",
            "--json")


def _diagnosis(variants: tuple[str, ...], name: str) -> tuple[str, ...]:
    """The mixed market's MobileNetV2 diagnosis on class ship with ``variants`` (#13)."""
    return ("{py}", "benchmarks/mixed_diagnosis.py", "--store", "{runs}/mixed", "--k", "10",
            "--model", "mobilenet_v2-w0.5", "--klass", "ship", "--variants", *variants,
            "--out", f"{{out}}/mixed/{name}")


STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("T6", "T6 (TREC, GRU): the paper's Table 3", (_report("T6", "gru", "5,10"),),
          ("T6/results.json",), lambda: table_digests("T6", ["gru"], ks=TEXT_KS)),
    Stage("T7", "T7 (SST-5, TextCNN): the paper's Table 3", (_report("T7", "textcnn", "5,10"),),
          ("T7/results.json",), lambda: table_digests("T7", ["textcnn"], ks=TEXT_KS)),
    Stage("T1", "T1 (CIFAR-10, VGG11 x 1/4 and ResNet-20): the paper's Table 2",
          (_report("T1", "vgg11,resnet20", "5,10,20"),), ("T1/results.json",),
          lambda: table_digests("T1", ["vgg11", "resnet20"])),
    Stage("T1-size", "ResNet-20 under a size budget chosen by few-shot CV (#17 §3)",
          (("{py}", "jobs/select_under_budget.py", "--task", "T1", "--arch", "resnet20", "--k", "20",
            "--candidates", SIZE_CANDIDATES, "--root", "{runs}/tables",
            "--out", "{out}/T1-size/selection.json"),
           ("{py}", "-m", "snp_ray.cli", "report", "--task", "T1", "--archs", "resnet20", "--k",
            "20", "--targets", "5", "--preset", "size-T1-resnet20", "--baselines", "ensemble",
            "--root", "{runs}/tables", "--out", "{out}/T1-size", "--fresh", "--json")),
          ("T1-size/selection.json", "T1-size/T1/results.json"), _t1_size, needs=("T1",)),
    Stage("tune-T1", "Tune sweep on T1 (VGG11 x 1/4)",
          (("{py}", "-m", "snp_ray.cli", "tune", "--task", "T1", "--trials", "16",
            "--market", "{runs}/tables/T1/vgg11-w0.25", "--storage", "{runs}/tune",
            "--out", "{out}/tune", "--json"),),
          ("tune/T1/sweep.json",), lambda: tune_digests("quick", market_digest("T1", "vgg11")), needs=("T1",), group="studies"),
    Stage("figures", "Figures 5 and 7 on the T1 VGG11 x 1/4 market",
          (("{py}", "-m", "snp_ray.cli", "figures", "--market", "{runs}/tables/T1/vgg11-w0.25",
            "--k", "10", "--out", "{out}", "--json"),),
          ("figures/figures.json",), lambda: figures_digests("quick", market_digest("T1", "vgg11")), needs=("T1",), group="studies"),
    Stage("shared-T6", "Shared lookup tables in T6 packs (#17 §2)",
          (("{py}", "benchmarks/text_pack_size.py", "--market", "{runs}/tables/T6/gru-w1",
            "--slice", "--variants", SHARED_VARIANTS, "--out", "{out}/shared-tables/T6.json"),
           ("{py}", "benchmarks/text_pack_size.py", "--market", "{runs}/tables/T6/gru-w1",
            "--slice", "--hidden", "64", "--variants", SHARED_ENC64,
            "--out", "{out}/shared-tables/T6-hidden64.json")),
          ("shared-tables/T6.json", "shared-tables/T6-hidden64.json"), _shared("T6", "gru"), needs=("T6",), group="studies"),
    Stage("shared-T7", "Shared lookup tables in T7 packs (#17 §2)",
          (("{py}", "benchmarks/text_pack_size.py", "--market", "{runs}/tables/T7/textcnn-w1",
            "--slice", "--variants", SHARED_VARIANTS, "--out", "{out}/shared-tables/T7.json"),
           ("{py}", "benchmarks/text_pack_size.py", "--market", "{runs}/tables/T7/textcnn-w1",
            "--slice", "--hidden", "64", "--variants", SHARED_ENC64,
            "--out", "{out}/shared-tables/T7-hidden64.json")),
          ("shared-tables/T7.json", "shared-tables/T7-hidden64.json"), _shared("T7", "textcnn"), needs=("T7",), group="studies"),
    Stage("expansion", "Equivalent expansion rate on T3-C10 (Figure 6)",
          (("{py}", "-m", "snp_ray.cli", "expansion", "--task", "T3-C10", "--combos", "100",
            "--k", "5,10,20", "--market", "{runs}/expansion/T3-C10", "--out", "{out}/expansion",
            "--json"),),
          ("expansion/T3-C10/expansion.json",), _expansion, group="studies"),
    Stage("market50", "A market of 50 developers and its request planner",
          (("{py}", "jobs/slice_market.py", "--preset", "market50", "--store", "{runs}/market50",
            "--no-pack", "--json"),
           ("{py}", "benchmarks/planner_compare.py", "--market", "{runs}/market50", "--k", "10",
            "--preset", "fast", "--requests", "100", "--plans", "best,top-2,all", "--limit",
            "all=0", "--one-per-model", "100", "--out", "{out}/planner/market50/planner_compare.json",
            "--figure", "{out}/planner/market50/figure6-market50.png", "--json"),
           ("{py}", "benchmarks/planner_compare.py", "--market", "{runs}/market50", "--k", "10",
            "--preset", "fast", "--requests", "100", "--plans", "all", "--limit", "all=5",
            "--out", "{out}/planner/market50/planner_all.json", "--json")),
          ("planner/market50/planner_compare.json", "planner/market50/planner_all.json"),
          _preset("fast"), group="studies"),
    Stage("mixed", "A mixed market: three families added by their developers",
          (("{py}", "jobs/build_mixed_market.py", "--store", "{runs}/mixed", "--k", "10",
            "--slice-preset", "auto", "--auto-models", "mobilenet_v2-w0.5",
            "--candidates", "quick,quick-dw1.0", "--out", "{out}/mixed", "--json"),),
          ("mixed/mixed.json",), lambda: {**slice_digests("quick", {"quick": {}, "quick-dw1.0": {"depthwise_rate": 1.0}})},
          group="studies"),
    Stage("mixed-diagnosis", "Where MobileNetV2 loses AUC: slice variants and group kinds (#13)",
          (_diagnosis(("{}", '{"beta": 0.8}', '{"beta": 0.9}', '{"mode": "rate", "beta": 1.0}'),
                      "diagnosis.json"),
           _diagnosis(('{"keep_whole": "depthwise"}', '{"keep_whole": "residual"}',
                       '{"keep_whole": "last"}'), "diagnosis-groups.json")),
          ("mixed/diagnosis.json", "mixed/diagnosis-groups.json"), _preset("quick"),
          needs=("mixed",), group="studies"),
    Stage("expansion-merge", "Expansion with every holder's fragment and shots (labelled, #14)",
          (("{py}", "-m", "snp_ray.cli", "expansion", "--task", "T3-C10", "--combos", "100",
            "--k", "5,10,20", "--market", "{runs}/expansion/T3-C10", "--out", "{out}/expansion",
            "--holders", "merge", "--json"),),
          ("expansion/T3-C10-merge/expansion.json",), _expansion_merge, group="studies"),
    # the market trains 1 of the recipe's 35 epochs and 6 of the protocol's 100 users, one
    # repeat per budget: what 2 cores allow (RESULTS says so beside every number)
    Stage("LW-C10", "The learnware market's CIFAR-10 scenario, side by side (#25)",
          (("{py}", "jobs/learnware_benchmark.py", "--store", "{runs}/lw-c10", "--epochs", "1",
            "--users", "6", "--max-repeats", "1", "--user-model-budgets", "100,200,500,1000",
            "--reuse-budgets", "100,200,500,1000", "--out", "{out}/learnware/LW-C10", "--json"),
           ("{py}", "jobs/learnware_benchmark.py", "--reuse", "--learnware-python",
            ".venv-learnware/bin/python", "--out", "{out}/learnware/LW-C10")),
          ("learnware/LW-C10/learnware.json", "learnware/LW-C10/learnware_package.json"),
          _preset("fast"), group="studies"),
    Stage("slicer-speed", "Naive, cached and batched slicing side by side (performance)",
          (("{py}", "benchmarks/slicer_speed.py", "--markets", "{runs}/tables/T1/vgg11-w0.25",
            "--c10", "{runs}/bench/c10",
            "--variants", "naive:4:fp32", "cached:4:fp32", "cached:4:auto", "batched:4:fp32",
            "--flops", "--plot", "{out}/slicer/batched_roofline.png",
            "--out", "{out}/slicer/batched.json"),),
          ("slicer/batched.json",), _preset("quick"), needs=("T1",), group="benchmarks"),
    Stage("slicer-speed-market50", "Batched slicing where kernels are small (market50)",
          (("{py}", "benchmarks/slicer_speed.py", "--markets", "{runs}/market50", "--classes", "12",
            "--preset", "fast", "--variants", "cached:4:fp32", "cached:4:auto", "batched:4:fp32",
            "--repeats", "2", "--flops", "--out", "{out}/slicer/batched_market50.json"),),
          ("slicer/batched_market50.json",), _preset("fast"), needs=("market50",), group="benchmarks"),
    Stage("driver-memory", "Driver memory and scheduler overhead of the slice job (#14)",
          (("{py}", "benchmarks/driver_memory.py", "--out", "{out}/driver_memory/after.json"),),
          ("driver_memory/after.json",), lambda: {"benchmark": "noop-benchmark slice mode"},
          group="benchmarks"),
    Stage("serve", "The market service under load (loopback)",
          (("{py}", "jobs/slice_market.py", "--preset", "quickstart", "--store", "{runs}/quickstart"),
           ("{py}", "benchmarks/serve_load.py", "--market", "{runs}/quickstart", "--preset", "quick",
            "--k", "10", "--requests", "300", "--new-packs", "24", "--seconds", "60",
            "--out", "{out}/serve/serve_load.json", "--json"),),
          ("serve/serve_load.json",), _preset("quick"), group="benchmarks"),
]}


def here(path: str | Path) -> Path:
    """``path`` as the stages' commands see it: they run in the repository root."""
    p = Path(path)
    return p if p.is_absolute() else ROOT / p


def stage_for(path: str | Path, out: str | Path) -> Stage | None:
    """The stage that writes ``path`` (a JSON under the results folder ``out``), if any."""
    rel = here(path).resolve().relative_to(here(out).resolve()).as_posix()
    return next((s for s in STAGES.values() if rel in s.outputs), None)


def resolve(names: list[str] | None = None, skip: list[str] | None = None,
            groups: list[str] | None = None) -> list[Stage]:
    """Stages in registry order: ``names`` (all when empty) in ``groups`` minus ``skip``."""
    for n in (names or []) + (skip or []):
        if n not in STAGES:
            raise UnknownNameError("stage", n, list(STAGES))
    chosen = [s for s in STAGES.values() if (not names or s.name in names)
              and (not groups or s.group in groups) and s.name not in (skip or [])]
    if not chosen:
        raise ConfigError("no stage selected")
    return chosen


# ------------------------------------------------------------------------------ the runner
def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


#: runtime packages whose code moves a benchmark's numbers (timings, memory), not a table's
RUNTIME_PACKAGES = ("engine", "store", "serve")


def scripts_digest(stage: Stage) -> str:
    """sha256 over the files a stage's commands execute (a job or benchmark script, or the CLI
    module), and for benchmarks the runtime packages too: code outside the algorithm's packages
    that still decides what a stage writes."""
    files = set()
    for cmd in stage.commands:
        target = cmd[1] if cmd[1] != "-m" else cmd[2].replace(".", "/") + ".py"
        files.add(ROOT / target)
    if stage.group == "benchmarks":
        for pkg in RUNTIME_PACKAGES:
            files.update((ROOT / "snp_ray" / pkg).rglob("*.py"))
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + (f.read_bytes() if f.is_file() else b"")
                 + b"\0")
    return h.hexdigest()[:16]


def stage_key(stage: Stage, out: str, runs: str, digests: dict[str, str], code: str) -> str:
    """Everything a stage's numbers depend on: its commands, the config digests, the
    algorithm's code and the scripts it runs (:func:`scripts_digest`)."""
    body = json.dumps([stage.command_line(out, runs), digests, code, scripts_digest(stage)],
                      sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:32]


def _record_path(runs: str, stage: Stage) -> Path:
    return here(runs) / "reproduce" / f"{stage.name}.json"


def up_to_date(stage: Stage, out: str, runs: str, key: str) -> bool:
    """Whether the stage's last run had this key and left outputs that are still as it wrote them."""
    rec = _record_path(runs, stage)
    try:
        data = json.loads(rec.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    if data.get("key") != key:
        return False
    for rel, sha in (data.get("outputs") or {}).items():
        p = here(out) / rel
        if not p.is_file() or _sha(p) != sha:
            return False
    return set(data.get("outputs") or {}) == set(stage.outputs)


def run_stage(stage: Stage, out: str, runs: str, env: dict[str, str] | None = None,
              runner: Callable[[list[str], dict[str, str]], int] | None = None) -> dict[str, Any]:
    """Run one stage's commands, then stamp its outputs and record the run."""
    digests, code = stage.digests(), code_digest()
    key = stage_key(stage, out, runs, digests, code)
    at = (*git_commit(), code)          # what the outputs are stamped with, taken before the run
    t0 = time.perf_counter()
    # saved presets (tuned-T1, size-T1-resnet20) live with the stage's other run files
    run_env = {**os.environ, "SNP_PRESETS": str(Path(runs) / "presets"), **(env or {}),
               "PYTHONPATH": os.pathsep.join(
                   [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    for argv in stage.argv(out, runs):
        log.info("[%s] %s", stage.name, " ".join(argv))
        rc = (runner or _subprocess)(argv, run_env)
        if rc != 0:
            raise EngineError(f"stage {stage.name}: `{' '.join(argv)}` exited with {rc}")
    seconds = time.perf_counter() - t0
    shas = {}
    for rel in stage.outputs:
        path = here(out) / rel
        if not path.is_file():
            raise EngineError(f"stage {stage.name} did not write {path}")
        result = relative(json.loads(path.read_text()))
        stamp(result, digests, stage.command_line(out, runs), stage.name, at)
        result["provenance"]["seconds"] = round(seconds, 1)
        atomic_write_bytes(path, json.dumps(result, indent=1, default=str).encode())
        shas[rel] = _sha(path)
    sha, dirty, _ = at
    record = {"stage": stage.name, "key": key, "commit": sha, "dirty": dirty, "code": code,
              "digests": digests, "seconds": round(seconds, 1), "outputs": shas}
    atomic_write_bytes(_record_path(runs, stage), json.dumps(record, indent=1).encode())
    return record


def _subprocess(argv: list[str], env: dict[str, str]) -> int:
    return subprocess.run(argv, cwd=ROOT, env=env).returncode


def run_stages(stages: list[Stage], out: str, runs: str, force: bool = False,
               runner: Callable[[list[str], dict[str, str]], int] | None = None,
               keep_going: bool = False) -> list[dict[str, Any]]:
    """Run ``stages`` in order (each after the stages it needs, when those are selected),
    skipping the up-to-date ones unless ``force``. Returns one row per stage."""
    rows, failed = [], set()
    for stage in stages:
        if any(n in failed for n in stage.needs):
            rows.append({"stage": stage.name, "status": "blocked", "by": sorted(failed & set(stage.needs))})
            continue
        key = stage_key(stage, out, runs, stage.digests(), code_digest())
        if not force and up_to_date(stage, out, runs, key):
            log.info("[%s] up to date: skipped", stage.name)
            rows.append({"stage": stage.name, "status": "skipped (inputs unchanged)"})
            continue
        try:
            rec = run_stage(stage, out, runs, runner=runner)
        except EngineError as e:
            if not keep_going:
                raise
            log.error("%s", e)
            failed.add(stage.name)
            rows.append({"stage": stage.name, "status": "failed", "error": str(e)})
            continue
        rows.append({"stage": stage.name, "status": "ran", "seconds": rec["seconds"]})
    return rows


# ------------------------------------------------------------------------------- staleness
def stage_status(path: str | Path, out: str | Path, code: str | None = None) -> dict[str, Any]:
    """Fresh or stale, and why, for one results JSON under ``out`` (``code``: the current
    algorithm digest, when the caller has it already)."""
    path = Path(path)
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        return {"path": str(path), "status": "stale", "why": [f"unreadable ({e})"]}
    prov = result.get("provenance") if isinstance(result, dict) else None
    stage = stage_for(path, out)
    if not isinstance(prov, dict) or not isinstance(prov.get("digests"), dict):
        return {"path": str(path), "status": "stale", "stage": stage and stage.name,
                "why": ["no provenance: made before results recorded their commit and digests"]}
    name = stage.name if stage else prov.get("stage")
    row = {"path": str(path), "stage": name, "commit": prov.get("commit", "unknown"),
           "created": prov.get("created", ""), "dirty": bool(prov.get("dirty")),
           "code_changed": bool(prov.get("code")) and prov.get("code") != (code or code_digest())}
    if prov.get("legacy"):
        row.update(status="stale", why=[prov.get("why") or "made before make results existed"])
        return row
    if name not in STAGES:      # nothing to compare with: it cannot be shown to be current
        row.update(status="stale", why=[f"no stage {name!r} regenerates it"])
        return row
    why = staleness(prov, STAGES[name].digests())
    row.update(status="stale" if why else "fresh", why=why)
    return row


def status_table(out: str | Path) -> list[dict[str, Any]]:
    """:func:`stage_status` of every results JSON under ``out``, sorted by path."""
    out, code = here(out), code_digest()      # hashed once, not once per file
    return [stage_status(p, out, code) for p in sorted(out.rglob("*.json"))]


def render_provenance(rows: list[dict[str, Any]], out: str | Path) -> str:
    """provenance.md: which commit each results JSON came from, and whether it is stale."""
    sha, dirty = git_commit()
    lines = ["# Where each published result came from", "",
             f"Checked against the code at `{sha[:12]}`{' (with uncommitted changes)' if dirty else ''}"
             f" (algorithm digest `{code_digest()}`). A result is **stale** when the config digests"
             " it recorded differ from those the current defaults give, or it recorded none. "
             "`make results` (python jobs/reproduce_all.py) regenerates them.", "",
             "| results JSON | stage | commit | status | why |", "|---|---|---|---|---|"]
    for r in rows:
        notes = (["algorithm code changed since"] if r.get("code_changed") else []) + (
            ["made with uncommitted changes"] if r.get("dirty") else [])
        why = "; ".join((r.get("why") or []) + ([] if r["status"] == "stale" else notes))
        status = "**stale**" if r["status"] == "stale" else ("fresh" if not notes else "current digests")
        lines.append(f"| `{Path(r['path']).relative_to(here(out)).as_posix()}` | {r.get('stage') or '–'} | "
                     f"{(r.get('commit') or '–')[:12]} | {status} | {why} |")
    text = "\n".join(lines) + "\n"
    atomic_write_bytes(here(out) / "provenance.md", text.encode())
    return str(here(out) / "provenance.md")
