"""The ``snp`` command line.

Every subcommand prints a human summary; with ``--json`` it prints its result as one JSON object
on the last line of stdout, so scripts can read ``tail -n 1``. Logs go to stderr. Bad input exits
with status 2 and an ``error:`` line (and, with ``--json``, ``{"error": ...}``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

from snp_ray.engine.command import market_summary, run_command, table
from snp_ray.errors import ArtifactNotFoundError, ConfigError

log = logging.getLogger("snp_ray.cli")
Handler = Callable[[argparse.Namespace], dict[str, Any]]
COMMANDS: dict[str, tuple[Handler, Callable[[argparse.ArgumentParser], None], str]] = {}


def command(name: str, help_text: str, configure: Callable[[argparse.ArgumentParser], None]):
    def register(fn: Handler) -> Handler:
        COMMANDS[name] = (fn, configure, help_text)
        return fn
    return register


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


# ---------------------------------------------------------------- snp slice
def _slice_config_args(p: argparse.ArgumentParser) -> None:
    """The slice settings: ``snp pack`` takes the same ones to find the fragments they made."""
    p.add_argument("--mode", choices=["threshold", "rate"], default=None)
    p.add_argument("--beta", type=float, default=None)
    p.add_argument("--freeze-tables", action="store_true", default=None,
                   help="select embedding columns but never train them, so a pack stores one "
                        "table per source model (SliceConfig.freeze_tables)")
    p.add_argument("--table-rate", type=float, default=None,
                   help="keep this share of every embedding's columns (rate selection; "
                        "SliceConfig.table_rate)")


def _slice_config(a: argparse.Namespace):
    from snp_ray.slicing import slice_preset

    overrides = {k: v for k, v in (("mode", a.mode), ("beta", a.beta),
                                   ("freeze_tables", a.freeze_tables),
                                   ("table_rate", a.table_rate)) if v is not None}
    return slice_preset(a.preset, **overrides)


def _slice_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True, help="market store folder")
    p.add_argument("--k", type=int, default=10, help="few-shot samples per class (default 10)")
    p.add_argument("--model", default=None, help="model id (default: every model)")
    p.add_argument("--class", dest="klass", default=None, help="class name or id (default: all)")
    _slice_config_args(p)
    p.add_argument("--preset", default="quick", help="slice preset: quick, paper, or a name saved by `snp tune` (or its .json path)")
    p.add_argument("--seed", type=int, default=0, help="few-shot sample seed")
    p.add_argument("--force", action="store_true", help="reslice fragments already stored")
    p.add_argument("--engine", default=None, help="slicer engine: cached, batched (a model's classes "
                   "in one pass) or naive (default: SNP_SLICE_ENGINE, else cached)")


@command("slice", "slice (model, class) pairs of a market into fragments, locally", _slice_args)
def cmd_slice(a: argparse.Namespace) -> dict[str, Any]:
    from snp_ray.errors import DataError
    from snp_ray.market import Market
    from snp_ray.store import slice_missing

    cfg = _slice_config(a)
    market = Market(a.store)
    if not market.ids():
        raise ArtifactNotFoundError(f"the market at {a.store} holds no models; run snp train-market")
    ids = [market.spec(a.model).id] if a.model else None
    class_id = market.class_id(a.klass) if a.klass is not None else None
    if class_id is not None and a.model and class_id not in market.spec(a.model).classes:
        raise DataError(f"class {a.klass!r} is not held by model {a.model}")
    rows, out = [], []
    for mid, _, key, frag in slice_missing(market, a.k, cfg, a.seed, ids, class_id, a.force,
                                           engine=a.engine):
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


# ---------------------------------------------------------------- snp market add/list/remove
def _floats3(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",")]
    except ValueError:
        vals = []
    if len(vals) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers R,G,B, got {text!r}")
    return vals


def _market_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="market_command", required=True, metavar="ACTION")
    add = sub.add_parser("add", help="add your own trained model (safetensors weights)",
                         description="add your own trained model (safetensors weights), to a "
                                     "market folder (--store) or over HTTP to a market service "
                                     "(--remote)")
    _where(add, "market store folder (created if missing)")
    add.add_argument("--arch", required=True,
                     help="torchvision:NAME[?k=v&...], timm:NAME[?k=v&...] or snp:ZOO_NAME[?width=W]")
    add.add_argument("--weights", required=True, help="the model's state_dict as .safetensors")
    add.add_argument("--classes", required=True,
                     help="comma-separated class names (or ids) of the dataset: output i is class i")
    add.add_argument("--dataset", required=True, help="dataset whose class vocabulary is used")
    add.add_argument("--k", type=int, default=20, help="few-shot samples per class (default 20)")
    add.add_argument("--seed", type=int, default=0, help="few-shot sample seed")
    add.add_argument("--id", dest="model_id", default=None, help="model id (default: from the arch)")
    add.add_argument("--replace", action="store_true", help="overwrite a model with the same id")
    add.add_argument("--input-size", type=int, default=32, help="square input size (default 32)")
    add.add_argument("--mean", type=_floats3, default=None,
                     help="per-channel mean R,G,B on the 0..1 scale (default ImageNet's)")
    add.add_argument("--std", type=_floats3, default=None, help="per-channel std R,G,B (default ImageNet's)")
    add.add_argument("--fewshot", default=None,
                     help="your own few-shot samples: Parquet in the dataset's schema")
    add.add_argument("--wait", action="store_true",
                     help="with --remote: follow the upload until the model is ready (or failed)")
    add.add_argument("--wait-timeout", type=float, default=1800.0,
                     help="with --wait: give up after this many seconds (default 1800)")
    lst = sub.add_parser("list", help="the models of a market", description="the models of a market")
    _where(lst, "market store folder")
    rm = sub.add_parser("remove", help="remove a model from a market",
                        description="remove a model from a market")
    _where(rm, "market store folder")
    rm.add_argument("--id", dest="model_id", required=True, help="model id")
    for q in (add, lst, rm):   # --json after the action too; SUPPRESS keeps one given before it
        q.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                       help="print the result as JSON on the last line")


#: where ``--remote`` reads the token when ``--token`` is not given (keeps it out of shell history)
TOKEN_ENV = "SNP_MARKET_TOKEN"


def _where(p: argparse.ArgumentParser, store_help: str) -> None:
    """Exactly one of a local market folder or a market service's URL."""
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--store", help=store_help)
    where.add_argument("--remote", metavar="URL",
                       help="a market service, e.g. http://127.0.0.1:8000 (snp serve)")
    p.add_argument("--token", default=None,
                   help=f"with --remote: your access token (default: ${TOKEN_ENV})")


def _model_row(s) -> dict[str, Any]:
    return {"id": s.id, "arch": s.arch_ref,
            "params": s.params, "classes": s.class_names, "dataset": s.dataset,
            "added": bool(s.train.get("added")), "input": s.input}


@command("market", "add your own model to a market, list its models, remove one", _market_args)
def cmd_market(a: argparse.Namespace) -> dict[str, Any]:
    if a.remote:
        return _market_remote(a)
    if a.token is not None or (a.market_command == "add" and a.wait):
        raise ConfigError("--token and --wait are for a market service (--remote URL)")
    from snp_ray.market import Market

    from snp_ray.serve import lifecycle

    market = Market(a.store)
    if a.market_command == "add":
        added, retired = lifecycle.add_model(
            market, a.arch, a.weights, [c for c in a.classes.split(",") if c.strip()], a.dataset,
            k=a.k, seed=a.seed, model_id=a.model_id, input_size=a.input_size, mean=a.mean,
            std=a.std, fewshot=a.fewshot, replace=a.replace)
        m = added.summary()
        print(table([[m["id"], m["arch"], f"{m['params']:,}", f"{m['macs']:,}", ",".join(m["classes"]),
                      f"{m['fewshot_accuracy']:.4f} ({m['fewshot_samples']} samples)"]],
                    ["model", "arch", "params", "MACs/sample", "classes",
                     "accuracy on the few-shot samples"]))
        if retired.fragments or retired.packs:
            print(f"retired {len(retired.fragments)} fragments and {len(retired.packs)} packs "
                  f"of the replaced model")
        return {"model": m, "retired": retired.to_dict()}
    if a.market_command == "list":
        rows = [_model_row(s) for s in market.specs()]
        print(table([[r["id"], r["arch"], f"{r['params']:,}", ",".join(r["classes"]),
                      "added" if r["added"] else "trained"] for r in rows],
                    ["model", "arch", "params", "classes", "origin"]))
        return {"models": rows}
    spec, retired = lifecycle.remove_model(market, a.model_id)
    print(f"removed {spec.id} with {len(retired.fragments)} fragments and {len(retired.packs)} packs")
    return {"removed": spec.id, "retired": retired.to_dict()}


def _market_remote(a: argparse.Namespace) -> dict[str, Any]:
    """``snp market add/list/remove --remote URL``: the same verbs over the service's HTTP API
    (:class:`snp_ray.client.MarketClient`), as a developer token."""
    from snp_ray.client import MarketClient

    client = MarketClient(a.remote, a.token or os.environ.get(TOKEN_ENV) or None)
    if a.market_command == "add":
        if a.fewshot is not None and not Path(a.fewshot).is_file():
            raise ConfigError(f"--fewshot: no file at {a.fewshot}")
        m = client.upload(a.weights, a.arch, [c.strip() for c in a.classes.split(",") if c.strip()],
                          a.dataset, k=a.k, seed=a.seed, model_id=a.model_id,
                          input_size=a.input_size, mean=a.mean, std=a.std, fewshot=a.fewshot,
                          replace=a.replace)
        log.info("uploaded %s: %s", m["id"], m["state"])
        if a.wait:
            m = client.wait_ready(m["id"], timeout_s=a.wait_timeout, on_progress=lambda x: log.info(
                "%s: %s %s", x["id"], x["state"], _progress_text(x)))
        print(table([[m["id"], m["arch"], m["state"], _progress_text(m), ",".join(map(str, m["classes"]))]],
                    ["model", "arch", "state", "progress", "classes"]))
        if not a.wait and m["state"] not in ("ready", "failed"):
            print(f"follow it with: snp market list --remote {a.remote}")
        return {"model": m}
    if a.market_command == "list":
        rows = client.models()
        print(table([[r["id"], r["arch"], f"{r['params']:,}" if r.get("params") is not None else "-",
                      ",".join(map(str, r["classes"])), r["state"], _progress_text(r),
                      r.get("owner") or "-"] for r in rows],
                    ["model", "arch", "params", "classes", "state", "progress", "owner"]))
        return {"models": rows}
    out = client.remove(a.model_id)
    r = out.get("retired", {})
    count = lambda v: len(v) if isinstance(v, list) else int(v or 0)   # noqa: E731 (lists or counts)
    print(f"removed {out['removed']} with {count(r.get('fragments'))} fragments and "
          f"{count(r.get('packs'))} packs")
    return out


def _progress_text(m: dict[str, Any]) -> str:
    p = m.get("progress") or {}
    return f"{p.get('done', 0)}/{p.get('total', 0)}" if p.get("total") else "-"


# ---------------------------------------------------------------- snp pack / evaluate
def _pack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True, help="market store folder with sliced fragments")
    p.add_argument("--classes", required=True, help="comma-separated class names or ids")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--preset", default="quick", help="slice preset the fragments were made with (a saved preset "
                                             "also sets the packing delta, lr and epochs)")
    _slice_config_args(p)
    p.add_argument("--seed", type=int, default=0, help="few-shot sample seed")
    p.add_argument("--shared", choices=["merge", "best"], default="merge",
                   help="two fragments of one class: both feed it, or keep the better one")
    p.add_argument("--plan", default="", help="plan the fragments per class: best, top-<m> "
                   "(e.g. top-2), all, or random (one holder drawn at random: a control), scored on "
                   "held-out few-shot data only (overrides --shared)")
    p.add_argument("--plan-samples", choices=["chosen", "union"], default="chosen",
                   help="with --plan: train on the chosen fragments' own k shots, or every holder's")
    p.add_argument("--delta", type=float, default=None, help="reconstruction weight")
    p.add_argument("--samples", default="", metavar="FILE.parquet",
                   help="train on your own labeled samples: a Parquet file in the dataset's schema "
                        "(image PNG bytes or text, and label = the dataset's class id), every label "
                        "one of --classes; with --plan, candidates are also scored on them")
    p.add_argument("--with-market-shots", action="store_true",
                   help="with --samples: train on the market's few-shot samples too")
    p.add_argument("--balance", choices=["none", "class"], default="none",
                   help="class: every class weighs the same in the loss, whatever its sample count "
                        "(for imbalanced --samples)")
    p.add_argument("--no-share-tables", dest="share_tables", action="store_false",
                   help="keep one lookup table per fragment (default: fragments of one source "
                        "model share theirs; exact, PackConfig.share_tables)")
    p.add_argument("--out", default="", help="folder to save the packed model in")
    p.add_argument("--export", default="", help="also export it into --out: comma-separated formats "
                   "of onnx (model.onnx, one self-contained file) and pt2 (model.pt2, torch.export)")


@command("pack", "pack stored fragments for a class set and evaluate it on the test split", _pack_args)
def cmd_pack(a: argparse.Namespace) -> dict[str, Any]:
    from snp_ray.evaluation.packs import evaluate_pack
    from snp_ray.market import Market
    from snp_ray.packing import export_pack, preset_pack_config
    from snp_ray.packing.model import check_export_formats
    from snp_ray.packing.request import pack_request

    formats = check_export_formats([f.strip() for f in a.export.split(",") if f.strip()])
    if formats and not a.out:
        raise ConfigError("--export writes into the pack's folder: give --out too")
    cfg = preset_pack_config(a.preset, shared=a.shared, share_tables=a.share_tables,
                             balance=a.balance,
                             **({"delta": a.delta} if a.delta is not None else {}))
    slice_cfg = _slice_config(a)
    requested = [c.strip() for c in a.classes.split(",") if c.strip()]
    market, plan = Market(a.store), None
    ids = market.class_ids(requested)
    requester = _requester_samples(market, ids, a.samples) if a.samples else None
    if a.with_market_shots and requester is None:
        raise ConfigError("--with-market-shots adds the market's shots to your own: give --samples")
    if requester is not None and not a.with_market_shots:
        from snp_ray.packing.samples import check_covers

        check_covers(requester, {c: _class_name(market, c) for c in ids}, "--with-market-shots")
    if a.plan:                 # choose first, on few-shot data only; the test split comes after
        from snp_ray.packing.planner import PlanConfig, pack_planned, plan_request

        plan = plan_request(market, ids, a.k, slice_cfg,
                            PlanConfig(policy=a.plan, samples=a.plan_samples), a.seed,
                            requester=requester)
        packed = pack_planned(market, plan, a.k, cfg, a.seed, requester=requester,
                              with_market_shots=a.with_market_shots)
    else:
        packed = pack_request(market, requested, a.k, slice_cfg, cfg, a.seed,
                              requester=requester, with_market_shots=a.with_market_shots)
    result = evaluate_pack(packed)
    if plan is not None:
        result["plan"] = plan.to_dict()
    result["train_samples"] = int(packed.spec.metrics["train_samples"])
    if requester is not None:
        from snp_ray.packing.samples import source_of

        result["samples"] = {"file": a.samples, "source": source_of(requester),
                             "count": len(requester), "sha256": requester.sha256,
                             "market": result["train_samples"] - len(requester)}
    if a.out:
        packed.save(a.out)
        result["path"] = a.out
        result["exports"] = [str(p) for p in export_pack(packed, a.out, formats).values()]
    print(table([[", ".join(result["classes"]), f"{result['test_accuracy']:.4f}",
                  f"{result['params_deployable']:,}", f"{result['params_training']:,}",
                  f"{result['pack_seconds']:.2f}"]],
                ["classes", "test acc", "params (deployable)", "params (training)", "pack s"]))
    return result


def _requester_samples(market, ids: list[int], path: str):
    """``--samples``: the file read under the requester-samples byte cap, then its rows (at most
    the row cap; the service's defaults are the same caps) in the market's dataset schema, every
    label one of ``ids``."""
    from snp_ray.packing import samples as samples_io

    datasets = sorted({s.dataset for c in ids for s in market.holders(c)})
    if len(datasets) != 1:
        raise ConfigError(f"the requested classes come from several datasets {datasets}")
    data = samples_io.read_capped(path, samples_io.MAX_BYTES, "samples file")
    return samples_io.PackSamples.from_parquet(data, datasets[0], what=f"samples file {path}",
                                               max_rows=samples_io.MAX_ROWS).only(ids)


def _class_name(market, class_id: int) -> str:
    spec = market.holders(class_id)[0]
    return spec.class_names[spec.classes.index(class_id)]


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
    p.add_argument("--task", default="", help="T1, T6, T7 (T2-T5 need CIFAR-100); without it, "
                                              "only gather OUT's tables and figures into report.md")
    p.add_argument("--k", default="5,10,20", help="comma-separated k values")
    p.add_argument("--archs", default="", help="comma-separated architectures (default: the task's)")
    p.add_argument("--targets", type=int, default=5, help="seeded target class sets (>= 5)")
    p.add_argument("--preset", default="quick", help="slice preset")
    p.add_argument("--baselines", default="ensemble,finetune,ca-mkd,netgraft")
    p.add_argument("--root", default="runs/tables", help="where markets and fragments live")
    p.add_argument("--out", default="results", help="output folder")
    p.add_argument("--seed", type=int, default=0,
                   help="target-set, pack and baseline seed; seeds >= 1000 are reserved for clean "
                        "evidence and refused unless SNP_CLEAN_EVIDENCE=1")
    p.add_argument("--fresh", action="store_true",
                   help="rerun every arch (default: reuse an arch whose protocol, code and market "
                        "are unchanged from OUT/TASK/results.json; the table marks it reused)")
    p.add_argument("--from-json", default="", metavar="RESULTS_JSON",
                   help="only redraw Figure 4 beside an existing results.json (nothing is run)")


@command("report", "run the paper's protocol on a task and write its table and figures", _report_args)
def cmd_report(a: argparse.Namespace) -> dict[str, Any]:
    from snp_ray.evaluation.protocol import ProtocolConfig, paper_results, run_protocol, write_outputs
    from snp_ray.evaluation.report import gather
    from snp_ray.market import get_task

    if a.from_json:
        return {"figure4": _redraw(a.from_json, "figure4.png")}
    if not a.task:
        path = gather(a.out)
        print(f"wrote {path}")
        return {"report": path}

    archs = [x for x in a.archs.split(",") if x] or [get_task(a.task).default_arch]
    cfg = ProtocolConfig(task=a.task, archs=archs, ks=[int(k) for k in a.k.split(",") if k],
                         n_targets=a.targets, seed=a.seed, slice_preset=a.preset,
                         baselines=[b for b in a.baselines.split(",") if b], root=a.root)
    earlier = Path(a.out) / a.task / "results.json"
    previous = None
    if not a.fresh and earlier.exists():
        try:
            previous = json.loads(earlier.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            log.warning("ignoring unreadable earlier result %s (%s): every arch is rerun", earlier, e)
    result = run_protocol(cfg, progress=sys.stderr.isatty(), previous=previous)
    paths = write_outputs(result, a.out, paper_results())
    paths["report"] = gather(a.out)
    print(open(paths["table"]).read())
    cells = {arch: {m: {k: {x: c.get(x) for x in ("status", "acc_mean", "acc_std", "params",
                                                     "pct_of_ensemble")}
                        for k, c in cs.items()} for m, cs in d["cells"].items()}
             for arch, d in result["archs"].items()}
    return {"task": a.task, "paths": paths, "cells": cells}


def _redraw(result_json: str, name: str) -> str:
    """Redraw Figure 4 or 6 from its saved result, beside it: no training, slicing or packing."""
    from snp_ray.artifacts import read_json

    result = read_json(result_json, "result")
    path = Path(result_json).parent / name
    if name == "figure4.png":
        from snp_ray.evaluation.protocol import figure4, paper_results

        drawn = figure4(result, path, paper_results())
        if drawn is None:
            raise ConfigError(f"{result_json}: no cell at the largest k succeeded; nothing to draw")
    else:
        from snp_ray.expansion.estimate import figure6

        drawn = figure6(result, path)
    print(f"wrote {drawn}")
    return drawn


# ---------------------------------------------------------------- snp tune
def _tune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="T1")
    p.add_argument("--arch", default="", help="architecture (default: the task's)")
    p.add_argument("--market", default="", help="trained market folder (default: the report's "
                                                "CPU-scale market under runs/tables, built if missing)")
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--folds", type=int, default=3, help="CV folds over each class's k samples")
    p.add_argument("--targets", type=int, default=2, help="target class sets in the objective")
    p.add_argument("--test-targets", type=int, default=5,
                   help="target sets for the one test-split comparison after the sweep")
    p.add_argument("--preset", default="quick", help="base preset: the default it is compared with")
    p.add_argument("--epochs", default="4,8", help="per-stage slicing epochs to try")
    p.add_argument("--search", choices=["optuna", "random"], default="optuna")
    p.add_argument("--scheduler", choices=["asha", "fifo"], default="asha")
    p.add_argument("--name", default="", help="preset name to save (default tuned-<task>)")
    p.add_argument("--storage", default="runs/tune", help="Tune experiments and the fold cache")
    p.add_argument("--out", default="results/tune")
    p.add_argument("--no-test", action="store_true", help="skip the test-split comparison")
    p.add_argument("--seed", type=int, default=0)


@command("tune", "Ray Tune sweep of alpha, beta, gamma, delta on few-shot CV; saves a preset", _tune_args)
def cmd_tune(a: argparse.Namespace) -> dict[str, Any]:
    from snp_ray.evaluation.protocol import market_config
    from snp_ray.evaluation.tuned import compare_on_test, render_report, sweep_figure
    from snp_ray.market import Market, build_market, get_task
    from snp_ray.market.tasks import target_sets
    from snp_ray.tuning import SweepConfig, run_sweep, write_sweep
    from snp_ray.tuning.sweep import trial_configs

    arch = a.arch or get_task(a.task).default_arch
    market = a.market
    if not market:
        mcfg = market_config(a.task, arch)
        market = f"runs/tables/{a.task}/{arch}-w{mcfg.width:g}"
        build_market(mcfg, market, progress=sys.stderr.isatty())
    cfg = SweepConfig(market=market, task=a.task, k=a.k, folds=a.folds, n_targets=a.targets,
                      trials=a.trials, base_preset=a.preset, search=a.search, scheduler=a.scheduler,
                      epochs=[int(e) for e in a.epochs.split(",") if e], storage=a.storage,
                      name=a.name, seed=a.seed,
                      exclude_targets=[list(t) for t in target_sets(get_task(a.task), a.test_targets,
                                                                    a.seed)])
    result = run_sweep(cfg, progress=sys.stderr.isatty())
    if not a.no_test:   # the preset is saved: nothing below can change what was chosen
        base = (result["base"]["slice"], result["base"]["pack"])
        chosen = trial_configs(base, result["best"]["config"])
        default = trial_configs(base, {})
        if chosen[0].digest() == default[0].digest() and chosen[1].digest() == default[1].digest():
            log.info("the sweep chose the default configuration")
        result["test"] = compare_on_test(Market(market), a.task, a.k,
                                         {"default": default, "chosen": chosen},
                                         n_targets=a.test_targets, seed=a.seed)
    from snp_ray.evaluation.provenance import stamp
    from snp_ray.evaluation.reproduce import market_label, tune_digests

    stamp(result, tune_digests(a.preset, market_label(market, a.task, arch)), sys.argv, f"tune-{a.task}")
    folder = Path(a.out) / a.task
    paths = {"json": str(write_sweep(result, folder / "sweep.json")),
             "figure": sweep_figure(result, folder / "sweep.png")}
    paths["report"] = render_report(result, folder / "report.md")
    print(Path(paths["report"]).read_text())
    test = result.get("test", {}).get("configs", {})
    return {"task": a.task, "trials": len(result["trials"]), "seconds": result["seconds"],
            "preset": result["preset"], "best_cv_accuracy": result["best"]["cv_accuracy"],
            "fragments_made": result["fragments_made"],
            "fragments_reused": result["fragments_reused"], "paths": paths,
            "test": {label: {x: c[x] for x in ("acc_mean", "acc_std", "params_mean")}
                     for label, c in test.items()}}


# ---------------------------------------------------------------- snp figures
def _figures_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--market", default="runs/tables/T1/vgg11-w0.25",
                   help="a market whose fragments are stored (both selection modes for Figure 5)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--preset", default="quick", help="slice preset of the stored fragments")
    p.add_argument("--sizes", default="1,2,3,4,5,6,8,10", help="numbers of requested classes (Fig. 7)")
    p.add_argument("--out", default="results")
    p.add_argument("--seed", type=int, default=0)


@command("figures", "Figure 5 (IoU of kept units, rate vs threshold) and Figure 7 (time per class)",
         _figures_args)
def cmd_figures(a: argparse.Namespace) -> dict[str, Any]:
    from snp_ray.evaluation.figures import figure5, figure7, iou_matrices, time_per_class, write_json
    from snp_ray.evaluation.protocol import VARIANTS
    from snp_ray.evaluation.report import gather
    from snp_ray.market import Market
    from snp_ray.packing import preset_pack_config
    from snp_ray.slicing import slice_preset
    from snp_ray.store import slice_missing

    market = Market(a.market)
    configs = {label: slice_preset(a.preset, **VARIANTS[label]) for label in VARIANTS}
    for cfg in configs.values():        # slices only pairs not stored yet
        for _ in slice_missing(market, a.k, cfg):
            pass
    folder = Path(a.out) / "figures"
    iou = iou_matrices(market, a.k, configs)
    chosen = configs["S&P (T)"]
    rows = time_per_class(market, a.k, chosen, [int(n) for n in a.sizes.split(",") if n], a.seed,
                          preset_pack_config(a.preset))
    paths = {"figure5": figure5(iou, list(configs), folder / "figure5.png"),
             "figure7": figure7(rows, folder / "figure7.png",
                                f"Figure 7: {Path(a.market).name}, k={a.k}, S&P (T)"),
             "json": write_json(_figures_record(a, iou, rows), folder / "figures.json")}
    means, pooled = ({label: sum(iou[m][f"{label}{kind} mean off-diagonal"] for m in iou) / len(iou)
                      for label in configs} for kind in ("", " pooled"))
    lines = [f"Market `{a.market}`, k = {a.k}, preset `{a.preset}`.", "",
             "Mean off-diagonal IoU of kept units between one model's fragments, per layer then "
             "averaged (the paper's Figure 5): "
             + ", ".join(f"{label} {v:.3f}" for label, v in means.items())
             + "; pooled over all units: " + ", ".join(f"{label} {v:.3f}" for label, v in pooled.items())
             + ".", "",
             "| classes | fragments | slicing s | packing s | packing / slicing |",
             "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['n']} | {r['fragments']} | {r['slice_seconds']:.1f} | {r['pack_seconds']:.2f} | "
              + (f"{100 * r['pack_fraction']:.2f} % |" if r["pack_fraction"] is not None else "– |")
              for r in rows]
    from snp_ray.artifacts import atomic_write_bytes

    atomic_write_bytes(folder / "figures.md", ("\n".join(lines) + "\n").encode())
    paths["md"] = str(folder / "figures.md")
    paths["report"] = gather(a.out)
    print("\n".join(lines))
    return {"paths": paths, "iou_mean_off_diagonal": means, "iou_pooled_mean_off_diagonal": pooled,
            "time_per_class": [{x: r[x] for x in ("n", "slice_seconds", "pack_seconds", "pack_fraction")}
                               for r in rows]}


def _figures_record(a: argparse.Namespace, iou: Any, rows: Any) -> dict[str, Any]:
    """figures.json, stamped: the table market is named by its digest, any other by its path."""
    from snp_ray.evaluation.provenance import stamp
    from snp_ray.evaluation.reproduce import figures_digests, market_label

    return stamp({"market": a.market, "k": a.k, "iou": iou, "time_per_class": rows},
                 figures_digests(a.preset, market_label(a.market, "T1", "vgg11")), sys.argv, "figures")


# ---------------------------------------------------------------- snp expansion
def _expansion_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="T3-C10", help="T3-C10 here; T3 where CIFAR-100 is present")
    p.add_argument("--combos", type=int, default=100, help="S: combinations to sample")
    p.add_argument("--k", default="5,10,20")
    p.add_argument("--market", default="", help="market folder (default runs/expansion/<task>)")
    p.add_argument("--preset", default="quick", help="slice preset")
    p.add_argument("--out", default="results/expansion")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holders", choices=["own", "merge"], default="own",
                   help="own (default, method notes): each class packs only the fragment of the model "
                        "it was drawn from, with exactly k shots; merge: every holder's fragment and shots")
    p.add_argument("--from-json", default="", metavar="EXPANSION_JSON",
                   help="only redraw Figure 6 beside an existing expansion.json (nothing is run)")


@command("expansion", "estimate the market's equivalent expansion rate R(e) (Figure 6)", _expansion_args)
def cmd_expansion(a: argparse.Namespace) -> dict[str, Any]:
    from snp_ray.engine.expansion import run_expansion
    from snp_ray.expansion import ExpansionConfig, write_outputs

    if a.from_json:
        return {"figure6": _redraw(a.from_json, "figure6.png")}
    cfg = ExpansionConfig(task=a.task, market=a.market or f"runs/expansion/{a.task}",
                          ks=[int(k) for k in a.k.split(",") if k], combos=a.combos, seed=a.seed,
                          slice_preset=a.preset, out=a.out, holders=a.holders)
    result = run_expansion(cfg)
    from snp_ray.evaluation.provenance import stamp
    from snp_ray.evaluation.reproduce import expansion_digests

    stamp(result, expansion_digests(cfg), sys.argv, "expansion" if cfg.holders == "own" else f"expansion-{cfg.holders}")
    paths = write_outputs(result, a.out)
    print(open(paths["md"]).read())
    return {"T": result["T"], "N": result["N"], "S": result["S"], "holders": result["holders"],
            "paths": paths,
            "k": {k: {"p": {e: r["p"][e] for e in ("0.1", "0.2", "0.3", "0.4", "0.5")},
                      "R": {e: r["R"][e] for e in ("0.1", "0.2", "0.3", "0.4", "0.5")},
                      "mean_acc": r["mean_acc"]} for k, r in result["k"].items()}}


# ---------------------------------------------------------------- snp tokens
def _tokens_args(p: argparse.ArgumentParser) -> None:
    from snp_ray.serve.accounts import ROLES, Limits

    sub = p.add_subparsers(dest="tokens_command", required=True, metavar="ACTION")
    new = sub.add_parser("create", help="make a token (printed once, stored hashed)",
                         description="make a token (printed once, stored hashed)")
    new.add_argument("--role", required=True, choices=ROLES,
                     help="developer: adds and removes its own models; requester: builds packs, "
                          "predicts, downloads; admin: everything")
    new.add_argument("--name", required=True, help="who the token is for (unique among active tokens)")
    new.add_argument("--packs-per-hour", type=int, default=Limits.packs_per_hour,
                     help=f"pack builds per hour; stored packs answered do not count "
                          f"(default {Limits.packs_per_hour})")
    new.add_argument("--concurrent-builds", type=int, default=Limits.concurrent_builds,
                     help=f"pack builds under way at once (default {Limits.concurrent_builds})")
    new.add_argument("--predictions-per-second", type=float, default=Limits.predictions_per_second,
                     help=f"prediction requests per second, per replica "
                          f"(default {Limits.predictions_per_second:g})")
    lst = sub.add_parser("list", help="the tokens (never the tokens themselves)",
                         description="the tokens: id, name, role, created, revoked, quotas")
    rev = sub.add_parser("revoke", help="revoke a token by id or name; it stops working at once",
                         description="revoke a token by id or name; it stops working at once")
    rev.add_argument("which", metavar="ID_OR_NAME")
    for q in (new, lst, rev):   # --json after the action too; SUPPRESS keeps one given before it
        q.add_argument("--market", required=True, help="market folder (the tokens live in "
                                                       "MARKET/accounts.sqlite)")
        q.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                       help="print the result as JSON on the last line")


def _when(t: float | None) -> str:
    import time

    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


@command("tokens", "make, list and revoke the access tokens of a market's service", _tokens_args)
def cmd_tokens(a: argparse.Namespace) -> dict[str, Any]:
    from snp_ray.serve.accounts import Accounts, Limits, accounts_path
    from snp_ray.serve.config import ServeConfig

    if not (Path(a.market) / "market.json").is_file():
        raise ArtifactNotFoundError(f"no market at {a.market} (market.json is missing)")
    accounts = Accounts(accounts_path(ServeConfig(market=a.market)))
    if a.tokens_command == "create":
        token, info = accounts.create(a.name, a.role, Limits(a.packs_per_hour, a.concurrent_builds,
                                                             a.predictions_per_second))
        print(f"token {info.id} for {info.name} (role {info.role}); it is shown only now, the "
              f"market keeps its sha256:\n{token}")
        return {"token": token, **info.to_dict()}
    if a.tokens_command == "list":
        infos = accounts.list()
        print(table([[t.id, t.name, t.role, _when(t.created), _when(t.revoked),
                      t.limits.packs_per_hour, t.limits.concurrent_builds,
                      f"{t.limits.predictions_per_second:g}"] for t in infos],
                    ["id", "name", "role", "created", "revoked", "packs/h", "builds", "predictions/s"]))
        return {"tokens": [t.to_dict() for t in infos]}
    info = accounts.revoke(a.which)
    print(f"revoked {info.id} ({info.name}, role {info.role})")
    return {"revoked": info.to_dict()}


# ---------------------------------------------------------------- snp serve
def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--market", required=True, help="market store folder with sliced fragments")
    p.add_argument("--fragments", default="", help="fragment store URI (default MARKET/fragments)")
    p.add_argument("--packs", default="", help="pack store folder (default MARKET/packs)")
    p.add_argument("--preset", default="quick", help="slice preset of the fragments to serve")
    p.add_argument("--plan", default="best", help="default plan policy: best, top-<m>, all or random (a control)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-models-per-replica", type=int, default=8,
                   help="packs kept loaded per predictor replica (LRU)")
    p.add_argument("--max-batch-size", type=int, default=32, help="predictions batched per pack")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a host name clients reach the service under, beyond loopback and --host "
                        "(repeatable; '*' for any)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="another site whose pages may call the API, e.g. https://example.org "
                        "(repeatable; default none)")
    p.add_argument("--insecure-open", action="store_true",
                   help="answer anyone without a token, even beyond loopback (no quotas)")
    p.add_argument("--seconds", type=float, default=0.0,
                   help="stop after this many seconds (default: run until Ctrl-C)")


@command("serve", "serve the market over HTTP: packs on request, downloads, predictions, a web page",
         _serve_args)
def cmd_serve(a: argparse.Namespace) -> dict[str, Any]:
    import time

    from snp_ray.runtime import ensure_ray
    from snp_ray.serve.config import ServeConfig
    from snp_ray.serve.deploy import start

    cfg = ServeConfig(market=a.market, fragments=a.fragments, packs=a.packs, preset=a.preset,
                      plan=a.plan, host=a.host, port=a.port,
                      max_models_per_replica=a.max_models_per_replica,
                      max_batch_size=a.max_batch_size, allowed_hosts=a.allowed_host,
                      cors_origins=a.cors_origin, insecure_open=a.insecure_open)
    if not (Path(cfg.market) / "market.json").is_file():
        raise ArtifactNotFoundError(f"no market at {cfg.market} (market.json is missing)")
    from snp_ray.serve.accounts import Accounts, accounts_path, check_exposure

    check_exposure(cfg.host, Accounts(accounts_path(cfg)), cfg.insecure_open)   # before Ray starts
    ensure_ray()
    from ray import serve

    url = start(cfg)
    print(f"snp serve: the market at {cfg.market} is ready at {url}", flush=True)
    try:
        deadline = time.monotonic() + a.seconds if a.seconds > 0 else None
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return {"url": url, "market": cfg.market}


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _find_data()
    return run_command(lambda: args.handler(args), args.json, args.verbose)[0]


def _find_data() -> None:
    """Find the datasets the way ``make`` does: without SNP_DATA_ROOT, ``../shared/data``
    beside the checkout (set in the environment, so Ray workers started from here see it)."""
    from snp_ray.data.catalog import ENV_DATA_ROOT, checkout_data_root

    if not os.environ.get(ENV_DATA_ROOT) and (found := checkout_data_root()) is not None:
        os.environ[ENV_DATA_ROOT] = str(found)
        log.info("%s is not set: using %s beside this checkout", ENV_DATA_ROOT, found)


if __name__ == "__main__":
    sys.exit(main())
