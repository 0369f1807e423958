"""The ``snp`` command line.

Every subcommand prints a human summary; with ``--json`` it prints its result as one JSON object
on the last line of stdout, so scripts can read ``tail -n 1``. Logs go to stderr. Bad input exits
with status 2 and an ``error:`` line (and, with ``--json``, ``{"error": ...}``).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Callable

from snp_ray.errors import SnpError

log = logging.getLogger("snp_ray.cli")
Handler = Callable[[argparse.Namespace], dict[str, Any]]
COMMANDS: dict[str, tuple[Handler, Callable[[argparse.ArgumentParser], None], str]] = {}


def command(name: str, help_text: str, configure: Callable[[argparse.ArgumentParser], None]):
    def register(fn: Handler) -> Handler:
        COMMANDS[name] = (fn, configure, help_text)
        return fn
    return register


def table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------- snp models
def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classes", type=int, default=10, help="head size (default 10)")
    p.add_argument("--width", type=float, default=1.0, help="width multiplier (default 1)")


@command("models", "architectures of the zoo with their parameter counts", _models_args)
def cmd_models(a: argparse.Namespace) -> dict[str, Any]:
    from snp_ray.models import ARCHS, param_table
    from snp_ray.models.registry import REFERENCE_VOCAB

    counts = param_table(a.classes, a.width)
    rows = [[n, ARCHS[n].family, ARCHS[n].modality, f"{c:,}"] for n, c in counts.items()]
    print(table(rows, ["arch", "family", "input", "params"]))
    print(f"(width {a.width:g}, {a.classes} classes; text models with a {REFERENCE_VOCAB:,}-token vocabulary)")
    return {"models": counts}


# ---------------------------------------------------------------- snp data
@command("data", "datasets found under SNP_DATA_ROOT", lambda p: None)
def cmd_data(a: argparse.Namespace) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from snp_ray.data.catalog import available, get_dataset
    from snp_ray.data.tables import class_names_of

    out: dict[str, dict[str, int]] = {}
    for name, splits in available().items():
        info = get_dataset(name)
        entry: dict[str, int] = {}
        for s in splits:
            path = info.path(s)
            entry[s] = pq.ParquetFile(path).metadata.num_rows
            entry["classes"] = len(class_names_of(pq.read_schema(path), path))
        out[name] = entry
    rows = [[n, get_dataset(n).modality] + [e.get(s, "-") for s in ("train", "dev", "test")] + [e["classes"]]
            for n, e in out.items()]
    print(table(rows, ["dataset", "input", "train", "dev", "test", "classes"]))
    return {"datasets": out}


# ---------------------------------------------------------------- snp train-market
def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="task preset, e.g. T1")
    p.add_argument("--arch", default="", help="architecture (default: the task's)")
    p.add_argument("--width", type=float, default=0.25, help="width multiplier (default 0.25)")
    p.add_argument("--store", required=True, help="market store folder")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--train-fraction", type=float, default=1.0,
                   help="share of each class's train rows the developer trains on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per training task")


@command("train-market", "train a task's original models into a market store", _train_args)
def cmd_train_market(a: argparse.Namespace) -> dict[str, Any]:
    from snp_ray.market import MarketConfig, TrainConfig, build_market

    cfg = MarketConfig(task=a.task, arch=a.arch, width=a.width,
                       train=TrainConfig(epochs=a.epochs, train_fraction=a.train_fraction,
                                         seed=a.seed, threads=a.threads))
    specs = build_market(cfg, a.store, progress=sys.stderr.isatty())
    return market_summary(specs)


def market_summary(specs) -> dict[str, Any]:
    rows = [[s.id, ",".join(s.class_names), f"{s.params:,}", f"{s.metrics['test_accuracy']:.4f}",
             f"{s.metrics.get('train_seconds', 0):.1f}"] for s in specs]
    print(table(rows, ["model", "classes", "params", "test acc (own classes)", "train s"]))
    return {"models": [{"id": s.id, "classes": s.class_names, "class_ids": s.classes,
                        "test_accuracy": s.metrics["test_accuracy"], "params": s.params,
                        "train_seconds": s.metrics.get("train_seconds")} for s in specs]}


# ---------------------------------------------------------------- snp slice
def _slice_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True, help="market store folder")
    p.add_argument("--k", type=int, default=10, help="few-shot samples per class (default 10)")
    p.add_argument("--model", default=None, help="model id (default: every model)")
    p.add_argument("--class", dest="klass", default=None, help="class name or id (default: all)")
    p.add_argument("--mode", choices=["threshold", "rate"], default=None)
    p.add_argument("--beta", type=float, default=None)
    p.add_argument("--preset", default="quick", help="slice preset: quick or paper")
    p.add_argument("--seed", type=int, default=0, help="few-shot sample seed")
    p.add_argument("--force", action="store_true", help="reslice fragments already stored")


@command("slice", "slice (model, class) pairs of a market into fragments, locally", _slice_args)
def cmd_slice(a: argparse.Namespace) -> dict[str, Any]:
    from snp_ray.errors import ArtifactNotFoundError, DataError
    from snp_ray.market import Market
    from snp_ray.slicing import slice_preset
    from snp_ray.slicing.api import slice_missing

    overrides = {k: v for k, v in (("mode", a.mode), ("beta", a.beta)) if v is not None}
    cfg = slice_preset(a.preset, **overrides)
    market = Market(a.store)
    if not market.ids():
        raise ArtifactNotFoundError(f"the market at {a.store} holds no models; run snp train-market")
    ids = [market.spec(a.model).id] if a.model else None
    class_id = market.class_id(a.klass) if a.klass is not None else None
    if class_id is not None and a.model and class_id not in market.spec(a.model).classes:
        raise DataError(f"class {a.klass!r} is not held by model {a.model}")
    rows, out = [], []
    for mid, _, key, frag in slice_missing(market, a.k, cfg, a.seed, ids, class_id, a.force):
        if frag is None:
            continue
        f = frag.spec
        rows.append([mid, f.class_name, f"{f.source_params:,}", f"{f.params:,}", f.feature_dim,
                     f"{f.metrics.get('fewshot_auc', float('nan')):.3f}", f"{f.seconds:.1f}"])
        out.append({"model": mid, "class": f.class_name, "class_id": f.class_id,
                    "params": f.params, "source_params": f.source_params,
                    "feature_dim": f.feature_dim, "seconds": round(f.seconds, 3),
                    "key": key})
    print(table(rows, ["model", "class", "source params", "fragment params", "features",
                       "few-shot AUC", "seconds"]))
    return {"fragments": out}


# ---------------------------------------------------------------- snp pack / evaluate
def _pack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True, help="market store folder with sliced fragments")
    p.add_argument("--classes", required=True, help="comma-separated class names or ids")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--preset", default="quick", help="slice preset the fragments were made with")
    p.add_argument("--seed", type=int, default=0, help="few-shot sample seed")
    p.add_argument("--shared", choices=["merge", "best"], default="merge",
                   help="two fragments of one class: both feed it, or keep the better one")
    p.add_argument("--delta", type=float, default=None, help="reconstruction weight")
    p.add_argument("--out", default="", help="folder to save the packed model in")


@command("pack", "pack stored fragments for a class set and evaluate it on the test split", _pack_args)
def cmd_pack(a: argparse.Namespace) -> dict[str, Any]:
    from snp_ray.evaluation.packs import evaluate_pack
    from snp_ray.market import Market
    from snp_ray.packing import PackConfig
    from snp_ray.packing.request import pack_request
    from snp_ray.slicing import slice_preset

    cfg = PackConfig(shared=a.shared, **({"delta": a.delta} if a.delta is not None else {}))
    requested = [c.strip() for c in a.classes.split(",") if c.strip()]
    packed = pack_request(Market(a.store), requested, a.k, slice_preset(a.preset), cfg, a.seed)
    result = evaluate_pack(packed)
    if a.out:
        packed.save(a.out)
        result["path"] = a.out
    print(table([[", ".join(result["classes"]), f"{result['test_accuracy']:.4f}",
                  f"{result['params_deployable']:,}", f"{result['params_training']:,}",
                  f"{result['pack_seconds']:.2f}"]],
                ["classes", "test acc", "params (deployable)", "params (training)", "pack s"]))
    return result


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pack", required=True, help="folder of a saved packed model")


@command("evaluate", "evaluate a saved packed model on the test split of its classes", _evaluate_args)
def cmd_evaluate(a: argparse.Namespace) -> dict[str, Any]:
    from snp_ray.evaluation.packs import evaluate_pack
    from snp_ray.packing import PackedModel

    result = evaluate_pack(PackedModel.load(a.pack))
    print(table([[", ".join(result["classes"]), f"{result['test_accuracy']:.4f}",
                  f"{result['params_deployable']:,}", f"{result['flops']:,}",
                  f"{result['latency_ms_per_64']:.1f}"]],
                ["classes", "test acc", "params", "MACs/sample", "ms per 64"]))
    return result


# ---------------------------------------------------------------- snp report
def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="T1, T6, T7 (T2-T5 need CIFAR-100)")
    p.add_argument("--k", default="5,10,20", help="comma-separated k values")
    p.add_argument("--archs", default="", help="comma-separated architectures (default: the task's)")
    p.add_argument("--targets", type=int, default=5, help="seeded target class sets (>= 5)")
    p.add_argument("--preset", default="quick", help="slice preset")
    p.add_argument("--baselines", default="ensemble,finetune,ca-mkd,netgraft")
    p.add_argument("--root", default="runs/tables", help="where markets and fragments live")
    p.add_argument("--out", default="results", help="output folder")
    p.add_argument("--seed", type=int, default=0)


@command("report", "run the paper's protocol on a task and write its table and figures", _report_args)
def cmd_report(a: argparse.Namespace) -> dict[str, Any]:
    from snp_ray.evaluation.protocol import ProtocolConfig, paper_results, run_protocol, write_outputs
    from snp_ray.market import get_task

    archs = [x for x in a.archs.split(",") if x] or [get_task(a.task).default_arch]
    cfg = ProtocolConfig(task=a.task, archs=archs, ks=[int(k) for k in a.k.split(",") if k],
                         n_targets=a.targets, seed=a.seed, slice_preset=a.preset,
                         baselines=[b for b in a.baselines.split(",") if b], root=a.root)
    result = run_protocol(cfg, progress=sys.stderr.isatty())
    paths = write_outputs(result, a.out, paper_results())
    print(open(paths["table"]).read())
    cells = {arch: {m: {k: {x: c.get(x) for x in ("status", "acc_mean", "acc_std", "params",
                                                     "pct_of_ensemble")}
                        for k, c in cs.items()} for m, cs in d["cells"].items()}
             for arch, d in result["archs"].items()}
    return {"task": a.task, "paths": paths, "cells": cells}


# ---------------------------------------------------------------- snp expansion
def _expansion_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="T3-C10", help="T3-C10 here; T3 where CIFAR-100 is present")
    p.add_argument("--combos", type=int, default=100, help="S: combinations to sample")
    p.add_argument("--k", default="5,10,20")
    p.add_argument("--market", default="", help="market folder (default runs/expansion/<task>)")
    p.add_argument("--preset", default="quick", help="slice preset")
    p.add_argument("--out", default="results/expansion")
    p.add_argument("--seed", type=int, default=0)


@command("expansion", "estimate the market's equivalent expansion rate R(e) (Figure 6)", _expansion_args)
def cmd_expansion(a: argparse.Namespace) -> dict[str, Any]:
    from snp_ray.expansion import ExpansionConfig, run_expansion, write_outputs

    cfg = ExpansionConfig(task=a.task, market=a.market or f"runs/expansion/{a.task}",
                          ks=[int(k) for k in a.k.split(",") if k], combos=a.combos, seed=a.seed,
                          slice_preset=a.preset, out=a.out)
    result = run_expansion(cfg)
    paths = write_outputs(result, a.out)
    print(open(paths["md"]).read())
    return {"T": result["T"], "N": result["N"], "S": result["S"], "paths": paths,
            "k": {k: {"p": {e: r["p"][e] for e in ("0.1", "0.2", "0.3", "0.4", "0.5")},
                      "R": {e: r["R"][e] for e in ("0.1", "0.2", "0.3", "0.4", "0.5")},
                      "mean_acc": r["mean_acc"]} for k, r in result["k"].items()}}


# ---------------------------------------------------------------- snp convert-cifar
def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", required=True, choices=["cifar10", "cifar100"])
    p.add_argument("--root", required=True, help="torchvision download folder")
    p.add_argument("--out", required=True, help="data root to write <name>/{train,test}.parquet into")
    p.add_argument("--download", action="store_true", help="let torchvision download (needs a network)")


@command("convert-cifar", "convert torchvision's CIFAR download to the Parquet schema", _convert_args)
def cmd_convert(a: argparse.Namespace) -> dict[str, Any]:
    from snp_ray.data.convert import convert_cifar

    paths = convert_cifar(a.name, a.root, a.out, download=a.download)
    for split, path in paths.items():
        print(f"{split}: {path}")
    return {"files": {k: str(v) for k, v in paths.items()}}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="snp", description="Slice-and-Pack model markets on Ray")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (fn, configure, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        configure(p)
        p.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
        p.set_defaults(handler=fn)
    return parser


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: args.handler(args), args.json, args.verbose)[0]


if __name__ == "__main__":
    sys.exit(main())
