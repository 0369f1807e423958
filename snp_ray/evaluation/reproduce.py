"""Regenerate every published result from the code at HEAD (``make results``).

A :class:`Stage` is one published table, figure, sweep, study or benchmark: the commands that
make it, the results JSON files it writes, and the config digests the current code would use
for it (:data:`DIGESTS`). :func:`run_stages` runs the stages in order, skipping one only when its
commands, digests, code (:func:`code_digest`), scripts, environment and the runs of the stages it
reads are those of its last run and its outputs and working folder are unchanged since.

Each stage works in its own folder, ``RUNS/stages/STAGE/CODE`` (:func:`workdir`): markets,
fragments, fold caches and saved presets made by one code version are never read by another. A
stage that runs starts from nothing (its folder emptied and stamped with a new run id, and
``snp report`` told ``--fresh``) unless ``reuse``; then what it reused is recorded in its
outputs' provenance and printed. It stamps every output JSON with its provenance (the environment included) and
writes ``provenance.md`` beside them. :func:`stage_status` tells a fresh result from a stale one
(digests that no longer match the current defaults, or no provenance at all).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from snp_ray.artifacts import atomic_write_bytes
from snp_ray.config import CLEAN_EVIDENCE_ENV, CLEAN_SEEDS
from snp_ray.errors import ConfigError, EngineError, UnknownNameError
from snp_ray.evaluation.provenance import (ROOT, code_digest, git_commit, relative, reuse_note,
                                           stamp, staleness)
from snp_ray.runtime import decisive
from snp_ray.runtime import environment as current_environment

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
    from snp_ray.evaluation.protocol import config_digests

    out = config_digests(cfg)
    out.update({f"market:{a}": market_digest(cfg.task, a, cfg.width, cfg.epochs, cfg.train_fraction,
                                             cfg.ks) for a in cfg.archs})
    return out


def table_digests(task: str, archs: list[str], preset: str = "quick",
                  ks: list[int] | None = None, seed: int = 0) -> dict[str, str]:
    from snp_ray.evaluation.protocol import ProtocolConfig

    return protocol_digests(ProtocolConfig(task=task, archs=list(archs), ks=list(ks or PAPER_KS),
                                           slice_preset=preset, seed=seed))


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
#: the reserved seed every clean-evidence stage draws its target sets with (#28 section 2)
CLEAN_SEED = CLEAN_SEEDS


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


#: the static-table markets' budget: an all-class pack of the 2-model market holds 6 fragments,
#: so each keeps about a sixth of its model for the pack to stay near the Ensemble's size (fixed
#: from that arithmetic before any run, not on test data; #28 section 3, Bar 14)
BUDGET_VARIANTS = "threshold,rate0.1667"


def _budget() -> dict[str, str]:
    """Digests of the static-table budget study: its slice variants (parsed as the benchmark
    parses them), its packing config and both markets."""
    from snp_ray.packing import preset_pack_config
    from snp_ray.slicing.config import variant_overrides

    out = slice_digests("quick", {v: variant_overrides(v) for v in BUDGET_VARIANTS.split(",")})
    out["pack"] = preset_pack_config("quick", share_tables=False).digest()
    for task, arch in (("T6", "gru_static"), ("T7", "textcnn_static")):
        out[f"market:{arch}"] = market_digest(task, arch, ks=TEXT_KS)
    return out


def _preset(name: str) -> Callable[[], dict[str, str]]:
    """The digests of a stage that slices and packs with preset ``name`` as it stands."""
    return lambda: slice_digests(name, {name: {}})


# ------------------------------------------------------------------------------- the stages
@dataclass(frozen=True)
class Stage:
    """One published result. ``commands``: argv lists with ``{py}``, ``{out}`` (the results
    folder), ``{runs}`` (the stage's own working folder: markets, fragments, caches, saved
    presets), ``{runs:NAME}`` (the working folder of stage NAME, one of ``needs``) and
    ``{fresh}`` (``--fresh`` unless the run may reuse earlier work) filled in; ``outputs``: the
    JSON files it writes, relative to ``{out}``; ``digests``: the config digests the current
    code uses for it."""

    name: str
    title: str
    commands: tuple[tuple[str, ...], ...]
    outputs: tuple[str, ...]
    digests: Callable[[], dict[str, str]]
    needs: tuple[str, ...] = ()
    group: str = "tables"           # tables | studies | benchmarks
    #: environment variables its commands run with (a clean-evidence stage's fence key)
    env: tuple[tuple[str, str], ...] = ()

    def argv(self, out: str, runs: str, py: str = "", code: str = "",
             reuse: bool = False) -> list[list[str]]:
        """The commands to run, with the working folders of the code whose digest is ``code``
        under ``runs`` (:func:`workdir`)."""
        dirs = {n: workdir(runs, n, code) for n in (self.name, *self.needs)}

        def fill(x: str) -> str:
            if x == "{fresh}":
                return "--fresh"
            for n in self.needs:
                x = x.replace(f"{{runs:{n}}}", dirs[n])
            return (x.replace("{py}", py or sys.executable).replace("{out}", out)
                    .replace("{runs}", dirs[self.name]))
        return [[fill(x) for x in cmd if not (reuse and x == "{fresh}")] for cmd in self.commands]

    def command_line(self, out: str, runs: str, code: str = "", reuse: bool = False) -> str:
        """The commands as one shell line, ``python`` for the interpreter, each after the
        stage's environment variables."""
        pre = [f"{k}={v}" for k, v in self.env]
        return " && ".join(" ".join(pre + a) for a in self.argv(out, runs, "python", code, reuse))


def workdir(runs: str, stage: str, code: str) -> str:
    """A stage's working folder for the code whose digest is ``code``: ``RUNS/stages/STAGE/CODE``
    (``RUNS/stages/STAGE`` without one: every code version's). Code that differs in any module
    that decides a number gets another folder, so nothing one code version made (a market, a
    fragment, a fold cache, a saved preset) is read by another. Folders of the layout before
    (``RUNS/tables``, ``RUNS/market50``, ...) are left as they are."""
    return "/".join(x for x in (runs.rstrip("/"), "stages", stage, code) if x)


def _report(task: str, archs: str, ks: str, out: str = "{out}",
            baselines: tuple[str, ...] = (), preset: str = "quick", seed: int = 0,
            runs: str = "{runs}") -> tuple[str, ...]:
    """``snp report`` on the markets under ``runs`` (a stage's own folder, or ``{runs:NAME}``)."""
    return ("{py}", "-m", "snp_ray.cli", "report", "--task", task, "--archs", archs, "--k", ks,
            "--targets", "5", "--preset", preset, *baselines,
            *(("--seed", str(seed)) if seed else ()), "--root", f"{runs}/tables",
            "--out", out, "{fresh}", "--json")


def _on_markets_of(of: str, task: str, archs: str, ks: str, preset: str = "quick",
                   seed: int = 0) -> Callable[[], dict[str, str]]:
    """The digests of a table run with ``preset`` and ``seed`` on the markets of stage ``of``
    (its market digests, which its own ks decide)."""
    def digests() -> dict[str, str]:
        market = {k: v for k, v in STAGES[of].digests().items() if k.startswith("market:")}
        return {**table_digests(task, archs.split(","), preset=preset,
                                ks=[int(k) for k in ks.split(",")], seed=seed), **market}
    return digests


def _attention_stage(task: str, arch: str, ks: str, title: str) -> "Stage":
    """An attention model's table beside the task's CNN/RNN one (#27 section 4): its own results
    folder, so that the task's published table is not rewritten. The baselines the issue asks
    for (Ensemble, Finetune); CA-MKD and NetGraft are CNN-era methods left to the CNN tables."""
    return Stage(f"{task}-{arch}", title,
                 (_report(task, arch, ks, f"{{out}}/{arch}", ("--baselines", "ensemble,finetune")),),
                 (f"{arch}/{task}/results.json",),
                 lambda: table_digests(task, [arch], ks=[int(k) for k in ks.split(",")]))


def _stream_stage(of: str, task: str, arch: str, ks: str) -> "Stage":
    """Stage ``of``'s table again with the residual stream sliced (preset ``quick-ln``:
    ``layernorm="repair"``, #27 section 1): the same markets (``of``'s working folder), new
    fragments and the Ensemble (Finetune does not slice: ``of``'s table has it, same market and
    seed); its own results folder, ``{out}/<of>-ln``."""
    return Stage(f"{of}-ln", f"{of} with the residual stream sliced (layernorm=repair, #27 §1)",
                 (_report(task, arch, ks, f"{{out}}/{of}-ln", ("--baselines", "ensemble"),
                          preset="quick-ln", runs=f"{{runs:{of}}}"),),
                 (f"{of}-ln/{task}/results.json",), _on_markets_of(of, task, arch, ks, "quick-ln"),
                 needs=(of,))


def _static_stage(task: str, arch: str, title: str) -> "Stage":
    """A task's table with the paper's static-embedding text models (#28 section 3): one word2vec
    table per task, frozen and not counted; its own results folder beside the task's table, the
    Transformer's baselines (Ensemble, Finetune), k = 5 and 10."""
    return Stage(f"{task}-static", title,
                 (_report(task, arch, "5,10", "{out}/static", ("--baselines", "ensemble,finetune")),),
                 (f"static/{task}/results.json",),
                 lambda: table_digests(task, [arch], ks=TEXT_KS))


def _clean_stage(of: str, task: str, archs: str, ks: str) -> "Stage":
    """Stage ``of``'s goal rows on the reserved seed :data:`CLEAN_SEED` (#28 section 2): the same
    markets and fragments (``of``'s working folder), with the target class sets, the packs' and
    the baselines' seeds drawn from a seed no development run has used (the fence,
    :func:`snp_ray.config.check_clean_seed`, is opened for this stage only). The goals' k,
    Ensemble and Finetune; its own results folder, ``{out}/clean/<of>``."""
    return Stage(f"{of}-clean", f"{of}'s goal rows on the reserved seed {CLEAN_SEED} (#28 §2)",
                 (_report(task, archs, ks, f"{{out}}/clean/{of}",
                          ("--baselines", "ensemble,finetune"), seed=CLEAN_SEED,
                          runs=f"{{runs:{of}}}"),),
                 (f"clean/{of}/{task}/results.json",),
                 _on_markets_of(of, task, archs, ks, seed=CLEAN_SEED), needs=(of,),
                 env=((CLEAN_EVIDENCE_ENV, "1"),))


def _size_commands(out: str, seed: int = 0) -> tuple[tuple[str, ...], ...]:
    """ResNet-20 under a size budget (#17 section 3) on stage T1's markets: the few-shot CV
    choice (it reads no target set), then its table with ``seed``, into ``out``."""
    return (("{py}", "jobs/select_under_budget.py", "--task", "T1", "--arch", "resnet20", "--k",
             "20", "--candidates", SIZE_CANDIDATES, "--root", "{runs:T1}/tables",
             "--out", f"{out}/selection.json"),
            ("{py}", "-m", "snp_ray.cli", "report", "--task", "T1", "--archs", "resnet20", "--k",
             "20", "--targets", "5", "--preset", "size-T1-resnet20", "--baselines", "ensemble",
             *(("--seed", str(seed)) if seed else ()), "--root", "{runs:T1}/tables",
             "--out", out, "--fresh", "--json"))


def _mixed_stage(name: str, members: str, title: str) -> "Stage":
    """The mixed market built from member set ``members`` (snp_ray.market.mixed.MEMBER_SETS);
    every set's stage has the same k, slice preset and candidates, and its own results folder
    (``{out}/<name>/mixed.json``). The ``cnn`` set's command names no ``--members`` (its default),
    so the published `mixed` run keeps its command line."""
    return Stage(name, title,
                 (("{py}", "jobs/build_mixed_market.py", "--store", "{runs}/mixed",
                   *(("--members", members) if members != "cnn" else ()), "--k", "10",
                   "--slice-preset", "auto", "--auto-models", "mobilenet_v2-w0.5",
                   "--candidates", "quick,quick-dw1.0", "--out", f"{{out}}/{name}", "--json"),),
                 (f"{name}/mixed.json",),
                 lambda: {**slice_digests("quick", {"quick": {}, "quick-dw1.0": {"depthwise_rate": 1.0}})},
                 group="studies")


def _diagnosis(variants: tuple[str, ...], name: str) -> tuple[str, ...]:
    """The mixed market's MobileNetV2 diagnosis on class ship with ``variants`` (#13)."""
    return ("{py}", "benchmarks/mixed_diagnosis.py", "--store", "{runs:mixed}/mixed", "--k", "10",
            "--model", "mobilenet_v2-w0.5", "--klass", "ship", "--variants", *variants,
            "--out", f"{{out}}/mixed/{name}")


STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("T6", "T6 (TREC, GRU): the paper's Table 3", (_report("T6", "gru", "5,10"),),
          ("T6/results.json",), lambda: table_digests("T6", ["gru"], ks=TEXT_KS)),
    Stage("T7", "T7 (SST-5, TextCNN): the paper's Table 3", (_report("T7", "textcnn", "5,10"),),
          ("T7/results.json",), lambda: table_digests("T7", ["textcnn"], ks=TEXT_KS)),
    _attention_stage("T6", "transformer", "5,10", "T6 (TREC) with a 2-layer text Transformer (#27)"),
    _attention_stage("T7", "transformer", "5,10", "T7 (SST-5) with a 2-layer text Transformer (#27)"),
    _static_stage("T6", "gru_static", "T6 (TREC) with a GRU on a static word2vec table (#28 §3)"),
    _static_stage("T7", "textcnn_static", "T7 (SST-5) with Kim's CNN on a static word2vec table (#28 §3)"),
    _attention_stage("T1", "vit", "10,20", "T1 (CIFAR-10) with three 4-layer ViTs (#27): the goals' k"),
    _clean_stage("T6-static", "T6", "gru_static", "10"),
    _clean_stage("T7-static", "T7", "textcnn_static", "10"),
    _clean_stage("T6-transformer", "T6", "transformer", "10"),
    _clean_stage("T7-transformer", "T7", "transformer", "10"),
    _clean_stage("T1-vit", "T1", "vit", "10,20"),
    _stream_stage("T6-transformer", "T6", "transformer", "5,10"),
    _stream_stage("T7-transformer", "T7", "transformer", "5,10"),
    _stream_stage("T1-vit", "T1", "vit", "10,20"),
    Stage("T1", "T1 (CIFAR-10, VGG11 x 1/4 and ResNet-20): the paper's Table 2",
          (_report("T1", "vgg11,resnet20", "5,10,20"),), ("T1/results.json",),
          lambda: table_digests("T1", ["vgg11", "resnet20"])),
    Stage("T1-size", "ResNet-20 under a size budget chosen by few-shot CV (#17 §3)",
          _size_commands("{out}/T1-size"),
          ("T1-size/selection.json", "T1-size/T1/results.json"), _t1_size, needs=("T1",)),
    _clean_stage("T1", "T1", "vgg11,resnet20", "10,20"),
    Stage("T1-size-clean", f"T1-size's goal row on the reserved seed {CLEAN_SEED} (#28 §2)",
          _size_commands("{out}/clean/T1-size", seed=CLEAN_SEED),
          ("clean/T1-size/selection.json", "clean/T1-size/T1/results.json"), _t1_size,
          needs=("T1",), env=((CLEAN_EVIDENCE_ENV, "1"),)),
    Stage("tune-T1", "Tune sweep on T1 (VGG11 x 1/4)",
          (("{py}", "-m", "snp_ray.cli", "tune", "--task", "T1", "--trials", "16",
            "--market", "{runs:T1}/tables/T1/vgg11-w0.25", "--storage", "{runs}/tune",
            "--out", "{out}/tune", "--json"),),
          ("tune/T1/sweep.json",), lambda: tune_digests("quick", market_digest("T1", "vgg11")), needs=("T1",), group="studies"),
    Stage("figures", "Figures 5 and 7 on the T1 VGG11 x 1/4 market",
          (("{py}", "-m", "snp_ray.cli", "figures", "--market", "{runs:T1}/tables/T1/vgg11-w0.25",
            "--k", "10", "--out", "{out}", "--json"),),
          ("figures/figures.json",), lambda: figures_digests("quick", market_digest("T1", "vgg11")), needs=("T1",), group="studies"),
    Stage("shared-T6", "Shared lookup tables in T6 packs (#17 §2)",
          (("{py}", "benchmarks/text_pack_size.py", "--market", "{runs:T6}/tables/T6/gru-w1",
            "--slice", "--variants", SHARED_VARIANTS, "--out", "{out}/shared-tables/T6.json"),
           ("{py}", "benchmarks/text_pack_size.py", "--market", "{runs:T6}/tables/T6/gru-w1",
            "--slice", "--hidden", "64", "--variants", SHARED_ENC64,
            "--out", "{out}/shared-tables/T6-hidden64.json")),
          ("shared-tables/T6.json", "shared-tables/T6-hidden64.json"), _shared("T6", "gru"), needs=("T6",), group="studies"),
    Stage("shared-T7", "Shared lookup tables in T7 packs (#17 §2)",
          (("{py}", "benchmarks/text_pack_size.py", "--market", "{runs:T7}/tables/T7/textcnn-w1",
            "--slice", "--variants", SHARED_VARIANTS, "--out", "{out}/shared-tables/T7.json"),
           ("{py}", "benchmarks/text_pack_size.py", "--market", "{runs:T7}/tables/T7/textcnn-w1",
            "--slice", "--hidden", "64", "--variants", SHARED_ENC64,
            "--out", "{out}/shared-tables/T7-hidden64.json")),
          ("shared-tables/T7.json", "shared-tables/T7-hidden64.json"), _shared("T7", "textcnn"), needs=("T7",), group="studies"),
    Stage("static-budget", "Static-table packs at a budgeted rate of 1/6 (#28 §3, Bar 14)",
          tuple(("{py}", "benchmarks/text_pack_size.py", "--market",
                 f"{{runs:{task}-static}}/tables/{task}/{arch}-w1", "--k", "10", "--slice",
                 "--variants", BUDGET_VARIANTS, "--out", f"{{out}}/static/{task}-budget.json")
                for task, arch in (("T6", "gru_static"), ("T7", "textcnn_static"))),
          ("static/T6-budget.json", "static/T7-budget.json"), _budget,
          needs=("T6-static", "T7-static"), group="studies"),
    Stage("expansion", "Equivalent expansion rate on T3-C10 (Figure 6)",
          (("{py}", "-m", "snp_ray.cli", "expansion", "--task", "T3-C10", "--combos", "100",
            "--k", "5,10,20", "--market", "{runs}/expansion/T3-C10", "--out", "{out}/expansion",
            "--json"),),
          ("expansion/T3-C10/expansion.json",), _expansion, group="studies"),
    Stage("market50", "A market of 50 developers and its request planner",
          (("{py}", "jobs/slice_market.py", "--preset", "market50", "--store", "{runs}/market50",
            "--no-pack", "--json"),
           ("{py}", "benchmarks/planner_compare.py", "--market", "{runs}/market50", "--k", "10",
            "--preset", "fast", "--requests", "100", "--plans", "best,top-2,random,all", "--limit",
            "all=0", "--one-per-model", "100", "--out", "{out}/planner/market50/planner_compare.json",
            "--figure", "{out}/planner/market50/figure6-market50.png", "--json"),
           ("{py}", "benchmarks/planner_compare.py", "--market", "{runs}/market50", "--k", "10",
            "--preset", "fast", "--requests", "100", "--plans", "all", "--limit", "all=5",
            "--out", "{out}/planner/market50/planner_all.json", "--json")),
          ("planner/market50/planner_compare.json", "planner/market50/planner_all.json"),
          _preset("fast"), group="studies"),
    _mixed_stage("mixed", "cnn", "A mixed market: three families added by their developers"),
    _mixed_stage("mixed-vit", "vit", "A mixed market with a ViT in the ResNet-18's place (#27 §4)"),
    Stage("mixed-diagnosis", "Where MobileNetV2 loses AUC: slice variants and group kinds (#13)",
          (_diagnosis(("{}", '{"beta": 0.8}', '{"beta": 0.9}', '{"mode": "rate", "beta": 1.0}'),
                      "diagnosis.json"),
           _diagnosis(('{"keep_whole": "depthwise"}', '{"keep_whole": "residual"}',
                       '{"keep_whole": "last"}'), "diagnosis-groups.json")),
          ("mixed/diagnosis.json", "mixed/diagnosis-groups.json"), _preset("quick"),
          needs=("mixed",), group="studies"),
    Stage("expansion-merge", "Expansion with every holder's fragment and shots (labelled, #14)",
          (("{py}", "-m", "snp_ray.cli", "expansion", "--task", "T3-C10", "--combos", "100",
            "--k", "5,10,20", "--market", "{runs:expansion}/expansion/T3-C10", "--out", "{out}/expansion",
            "--holders", "merge", "--json"),),
          ("expansion/T3-C10-merge/expansion.json",), _expansion_merge, needs=("expansion",),
          group="studies"),
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
          (("{py}", "benchmarks/slicer_speed.py", "--markets", "{runs:T1}/tables/T1/vgg11-w0.25",
            "--c10", "{runs}/bench/c10",
            "--variants", "naive:4:fp32", "cached:4:fp32", "cached:4:auto", "batched:4:fp32",
            "--flops", "--plot", "{out}/slicer/batched_roofline.png",
            "--out", "{out}/slicer/batched.json"),),
          ("slicer/batched.json",), _preset("quick"), needs=("T1",), group="benchmarks"),
    Stage("slicer-speed-market50", "Batched slicing where kernels are small (market50)",
          (("{py}", "benchmarks/slicer_speed.py", "--markets", "{runs:market50}/market50", "--classes", "12",
            "--preset", "fast", "--variants", "cached:4:fp32", "cached:4:auto", "batched:4:fp32",
            "--repeats", "2", "--flops", "--out", "{out}/slicer/batched_market50.json"),),
          ("slicer/batched_market50.json",), _preset("fast"), needs=("market50",), group="benchmarks"),
    # full-size families, random weights: one repeat, what the 2-core VM allowed (RESULTS says so)
    Stage("family-time", "Seconds per fragment for each family the slicer follows (#27 §4)",
          (("{py}", "benchmarks/family_slice_time.py", "--repeats", "1",
            "--out", "{out}/slicer/families.json", "--md", "{out}/slicer/families.md"),),
          ("slicer/families.json",), _preset("quick"), group="benchmarks"),
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


#: code outside :func:`code_digest` that still moves a benchmark's numbers (the service's)
RUNTIME_PACKAGES = ("serve",)


def scripts_digest(stage: Stage) -> str:
    """sha256 over the files a stage's commands execute (a job or benchmark script, or the CLI
    module), and for benchmarks the service's package too: code outside :func:`code_digest`
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


def stage_key(stage: Stage, out: str, runs: str, digests: dict[str, str], code: str,
              needs: dict[str, str] | None = None, env: dict[str, Any] | None = None) -> str:
    """Everything a stage's numbers depend on: its commands (with its working folders), the
    config digests, the code (:func:`code_digest`), the scripts it runs (:func:`scripts_digest`),
    the runs of the stages it reads (``needs``: name -> run id) and the environment's decisive
    part (``env``: :func:`snp_ray.runtime.decisive`)."""
    body = json.dumps([stage.command_line(out, runs, code), digests, code, scripts_digest(stage),
                       needs or {}, env or {}], sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()[:32]


def _record_path(runs: str, stage: Stage) -> Path:
    return here(runs) / "reproduce" / f"{stage.name}.json"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


#: the file in a working folder that says which code, scripts and environment made it, and when
STAMP_FILE = "STAMP.json"


def read_stamp(folder: str | Path) -> dict[str, Any] | None:
    """A working folder's stamp (None when it has none, or it cannot be read)."""
    return _read_json(here(folder) / STAMP_FILE)


def up_to_date(stage: Stage, out: str, runs: str, key: str, reuse: bool = False,
               code: str = "") -> bool:
    """Whether the stage's last run had this key, left outputs that are still as it wrote them
    and a working folder still as it stamped it, and (unless ``reuse``) reused nothing."""
    data = _read_json(_record_path(runs, stage))
    if not data or data.get("key") != key or (data.get("reused") and not reuse):
        return False
    stamp_ = read_stamp(workdir(runs, stage.name, code or data.get("code", "")))
    if not stamp_ or stamp_.get("run") != data.get("run"):
        return False
    for rel, sha in (data.get("outputs") or {}).items():
        p = here(out) / rel
        if not p.is_file() or _sha(p) != sha:
            return False
    return set(data.get("outputs") or {}) == set(stage.outputs)


def open_workdir(folder: str | Path, want: dict[str, Any], reuse: bool = False,
                 clear: str | Path | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Make ``folder`` ready for a run; returns (its stamp, what is reused of an earlier run).

    ``want``: what the run will be made with (stage, code, scripts, environment). By default the
    folder is emptied and stamped afresh with a new run id: the run starts from nothing. With
    ``reuse``, a folder whose stamp matches ``want`` keeps what an earlier run left (markets,
    fragments, caches) and the reuse is returned; a mismatch still empties it. ``clear``: a
    folder to delete first (``--force``: the stage's folders of every code version)."""
    path = here(folder)
    if clear is not None and here(clear).exists():
        shutil.rmtree(here(clear))
    old = read_stamp(path)
    kept = (reuse and old is not None and all(old.get(k) == v for k, v in want.items())
            and any(p.name != STAMP_FILE for p in path.iterdir()))
    if kept:
        return old, {"run": old.get("run"), "created": old.get("created"), "commit": old.get("commit")}
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    sha, _ = git_commit()
    new = {**want, "run": uuid.uuid4().hex[:12], "commit": sha,
           "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    atomic_write_bytes(path / STAMP_FILE, json.dumps(new, indent=1, sort_keys=True).encode())
    return new, None


def reused_entries(value: Any, where: str = "") -> list[str]:
    """Where a result holds entries copied from an earlier one (``"reused": true``, as
    ``snp report`` marks an arch it did not rerun), with the commit each was made at."""
    out = []
    if isinstance(value, dict):
        if value.get("reused") is True:
            origin = (value.get("reused_from") or {}).get("commit")
            out.append(where + (f" (made at commit {str(origin)[:12]})" if origin else ""))
        for k, v in value.items():
            if k != "provenance":
                out += reused_entries(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += reused_entries(v, f"{where}[{i}]")
    return out


def _needed_runs(stage: Stage, runs: str, code: str) -> dict[str, str]:
    """Run id of each stage ``stage`` reads, from its working folder for this code;
    EngineError when one has not run with this code (it must run first)."""
    out = {}
    for n in stage.needs:
        st = read_stamp(workdir(runs, n, code))
        if not st or not st.get("run"):
            raise EngineError(f"stage {stage.name} reads stage {n}'s working folder "
                              f"{workdir(runs, n, code)}, which this code has not made: run {n} "
                              f"first (--only {n},{stage.name})")
        out[n] = st["run"]
    return out


def run_stage(stage: Stage, out: str, runs: str, env: dict[str, str] | None = None,
              runner: Callable[[list[str], dict[str, str]], int] | None = None,
              reuse: bool = False, force: bool = False,
              environment: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one stage's commands in its working folder (fresh unless ``reuse``; every code
    version's folder of the stage deleted first with ``force``), then stamp its outputs and
    record the run."""
    digests, code = stage.digests(), code_digest()
    environment = environment or current_environment()
    at = (*git_commit(), code)          # what the outputs are stamped with, taken before the run
    needs = _needed_runs(stage, runs, code)
    folder = workdir(runs, stage.name, code)
    want = {"stage": stage.name, "code": code, "scripts": scripts_digest(stage),
            "environment": decisive(environment)}
    stamp_, reused_dir = open_workdir(folder, want, reuse,
                                      clear=workdir(runs, stage.name, "") if force else None)
    key = stage_key(stage, out, runs, digests, code, needs, decisive(environment))
    t0 = time.perf_counter()
    # saved presets (tuned-T1, size-T1-resnet20) live with the stage's other run files
    run_env = {**os.environ, "SNP_PRESETS": str(Path(folder) / "presets"), **dict(stage.env),
               **(env or {}),
               "PYTHONPATH": os.pathsep.join(
                   [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    for argv in stage.argv(out, runs, code=code, reuse=reuse):
        log.info("[%s] %s", stage.name, " ".join(argv))
        rc = (runner or _subprocess)(argv, run_env)
        if rc != 0:
            raise EngineError(f"stage {stage.name}: `{' '.join(argv)}` exited with {rc}")
    seconds = time.perf_counter() - t0
    results = {}
    for rel in stage.outputs:
        path = here(out) / rel
        if not path.is_file():
            raise EngineError(f"stage {stage.name} did not write {path}")
        results[rel] = relative(json.loads(path.read_text()))
    entries = sorted({f"{rel}: {e}" for rel, r in results.items() for e in reused_entries(r)})
    reused = {k: v for k, v in (("workdir", reused_dir), ("entries", entries)) if v}
    shas = {}
    for rel, result in results.items():
        stamp(result, digests, stage.command_line(out, runs, code, reuse), stage.name, at,
              environment=environment, reused=reused, workdir=folder)
        result["provenance"]["seconds"] = round(seconds, 1)
        result["provenance"]["run"] = stamp_["run"]
        path = here(out) / rel
        atomic_write_bytes(path, json.dumps(result, indent=1, default=str).encode())
        shas[rel] = _sha(path)
    sha, dirty, _ = at
    record = {"stage": stage.name, "key": key, "commit": sha, "dirty": dirty, "code": code,
              "digests": digests, "seconds": round(seconds, 1), "outputs": shas,
              "run": stamp_["run"], "workdir": folder, "needs": needs, "reused": reused or False,
              "environment": environment}
    atomic_write_bytes(_record_path(runs, stage), json.dumps(record, indent=1).encode())
    return record


def _subprocess(argv: list[str], env: dict[str, str]) -> int:
    return subprocess.run(argv, cwd=ROOT, env=env).returncode


def run_stages(stages: list[Stage], out: str, runs: str, force: bool = False,
               runner: Callable[[list[str], dict[str, str]], int] | None = None,
               keep_going: bool = False, reuse: bool = False) -> list[dict[str, Any]]:
    """Run ``stages`` in order (each after the stages it needs, when those are selected),
    skipping the up-to-date ones unless ``force``. Each stage that runs gets a fresh working
    folder unless ``reuse`` (:func:`open_workdir`); ``force`` deletes the stage's working
    folders first. Returns one row per stage, naming what a run reused."""
    if force and reuse:
        raise ConfigError("--force deletes the working folders that --reuse would keep: give one")
    rows, failed = [], set()
    code, environment = code_digest(), current_environment()
    for stage in stages:
        if any(n in failed for n in stage.needs):
            rows.append({"stage": stage.name, "status": "blocked", "by": sorted(failed & set(stage.needs))})
            continue
        try:            # a stage it reads that this code has not made fails it like its commands
            needs = _needed_runs(stage, runs, code)
            key = stage_key(stage, out, runs, stage.digests(), code, needs, decisive(environment))
            if not force and up_to_date(stage, out, runs, key, reuse, code):
                log.info("[%s] up to date: skipped", stage.name)
                rec = _read_json(_record_path(runs, stage)) or {}
                rows.append({"stage": stage.name, "status": "skipped (inputs unchanged)",
                             "workdir": workdir(runs, stage.name, code), "reused": rec.get("reused") or False})
                continue
            rec = run_stage(stage, out, runs, runner=runner, reuse=reuse, force=force,
                            environment=environment)
        except EngineError as e:
            if not keep_going:
                raise
            log.error("%s", e)
            failed.add(stage.name)
            rows.append({"stage": stage.name, "status": "failed", "error": str(e)})
            continue
        rows.append({"stage": stage.name, "status": "ran", "seconds": rec["seconds"],
                     "workdir": rec["workdir"], "reused": rec["reused"]})
    return rows


def render_runs(rows: list[dict[str, Any]]) -> str:
    """The stages of one ``make results`` as a table: what ran, where, and what it reused."""
    lines = ["| stage | status | working folder | reused |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['status']} | {r.get('workdir') or '–'} | "
                     f"{reuse_note(r.get('reused')) or 'nothing (from nothing)'} |")
    return "\n".join(lines)


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
    # what it reused: as its stamp says, or (stamped before stamps said) the entries it copied
    copied = reused_entries(result)
    reused = prov.get("reused") or ({"entries": copied} if copied else False)
    row = {"path": str(path), "stage": name, "commit": prov.get("commit", "unknown"),
           "created": prov.get("created", ""), "dirty": bool(prov.get("dirty")),
           "code_changed": bool(prov.get("code")) and prov.get("code") != (code or code_digest()),
           "reused": reused, "environment": prov.get("environment")}
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


def made_with(env: Any) -> str:
    """An environment (:func:`snp_ray.runtime.environment`) in a few words: engine, device,
    precision (slicing/packing), torch; "–" when none was recorded."""
    if not isinstance(env, dict):
        return "–"
    prec = env.get("precision") or {}
    prec = "/".join(str(prec.get(k, "?")) for k in ("slicing", "packing")) if isinstance(prec, dict) else prec
    forced = " (forced)" if env.get("precision_forced") else ""
    return (f"{env.get('engine', '?')}, {env.get('device', '?')}, {prec}{forced}, "
            f"torch {env.get('torch', '?')}")


def render_provenance(rows: list[dict[str, Any]], out: str | Path) -> str:
    """provenance.md: which commit each results JSON came from, what it was made with, what it
    reused, and whether it is stale."""
    sha, dirty = git_commit()
    lines = ["# Where each published result came from", "",
             f"Checked against the code at `{sha[:12]}`{' (with uncommitted changes)' if dirty else ''}"
             f" (code digest `{code_digest()}`). A result is **stale** when the config digests"
             " it recorded differ from those the current defaults give, or it recorded none. "
             "`make results` (python jobs/reproduce_all.py) regenerates them from nothing; "
             "*reused* names what a result took from earlier runs instead "
             "(docs/REPRODUCIBILITY.md).", "",
             "| results JSON | stage | commit | status | made with | reused | why |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        notes = (["code changed since"] if r.get("code_changed") else []) + (
            ["made with uncommitted changes"] if r.get("dirty") else []) + (
            ["reused earlier work"] if r.get("reused") else [])
        why = "; ".join((r.get("why") or []) + ([] if r["status"] == "stale" else notes))
        status = "**stale**" if r["status"] == "stale" else ("fresh" if not notes else "current digests")
        lines.append(f"| `{Path(r['path']).relative_to(here(out)).as_posix()}` | {r.get('stage') or '–'} | "
                     f"{(r.get('commit') or '–')[:12]} | {status} | {made_with(r.get('environment'))} | "
                     f"{reuse_note(r.get('reused')) or '–'} | {why} |")
    text = "\n".join(lines) + "\n"
    atomic_write_bytes(here(out) / "provenance.md", text.encode())
    return str(here(out) / "provenance.md")
