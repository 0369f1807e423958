"""Why do MobileNetV2 fragments of the mixed market miss the AUC bar? A diagnosis on the test split.

Nothing here chooses a preset or a model: it runs after every choice was made and says where the
loss comes from. Per model of the market it measures, on the test split (the model's classes):
- ``source_auc``: the source model's own one-vs-rest AUC (its softmax probability of the class);
- ``probe_auc``: a linear probe on the source's full features, trained on the model's k shots
  only (a ceiling for any fragment's own head at this k);
and for one model and class, the fragment's test AUC under slice-config variants (``--variants``,
JSON overrides of the ``quick`` preset), from keeping every unit to the ``quick`` selection.
A variant may name ``"keep_whole": KIND`` (not a SliceConfig field: an ablation of this script)
to keep every unit of one kind of group (through ``Slicer.keep_whole``) and select the others as
usual. Kinds, read from the traced graph: ``depthwise`` (groups whose units feed or leave a
depthwise convolution, i.e. an inverted residual's expanded units), ``residual`` (groups
produced by more than one convolution: a residual stream), ``last`` (the group that leaves the
extractor last).

Usage: python benchmarks/mixed_diagnosis.py --store runs/mixed --model mobilenet_v2-w0.5 \
           --klass ship --variants '{}' '{"beta": 0.8}' '{"beta": 0.9}' '{"mode": "rate", "beta": 1.0}' \
           --out docs/results/mixed/diagnosis.json
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from snp_ray.artifacts import atomic_write_bytes

log = logging.getLogger("mixed_diagnosis")


def _features(model, spec, raw, bs: int = 500) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.features(spec.input_spec.encode(raw[i:i + bs])) for i in range(0, len(raw), bs)])


def source_and_probe(market, mid: str, k: int, seed: int = 0) -> dict:
    from snp_ray.data.testsplit import load_test_split
    from snp_ray.metrics import roc_auc

    model, spec = market.model(mid)
    model.eval()
    split = load_test_split(spec.dataset, spec.classes)
    fs = market.fewshot(mid, k, seed)
    with torch.no_grad():
        probs = torch.cat([torch.softmax(model(spec.input_spec.encode(split.images[i:i + 500])), 1)
                           for i in range(0, len(split), 500)])
    ftr, fte = _features(model, spec, fs.raw), _features(model, spec, split.images)
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
    out = {"features": int(ftr.shape[1]), "source_auc": {}, "probe_auc": {},
           "source_accuracy": float((np.asarray(spec.classes)[probs.argmax(1).numpy()] == split.labels).mean())}
    for j, c in enumerate(spec.classes):
        name = spec.class_names[j]
        y_test = (split.labels == c).astype(np.int64)
        out["source_auc"][name] = roc_auc(probs[:, j].numpy(), y_test)
        torch.manual_seed(seed)
        y = torch.as_tensor(fs.labels == c).float()
        lin = torch.nn.Linear(ftr.shape[1], 1)
        opt = torch.optim.Adam(lin.parameters(), 1e-2, weight_decay=1e-3)
        pos_weight = (1 - y).sum() / y.sum()
        for _ in range(300):      # fixed before any test number was seen; never tuned
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                lin((ftr - mu) / sd).squeeze(1), y, pos_weight=pos_weight)
            loss.backward()
            opt.step()
        with torch.no_grad():
            out["probe_auc"][name] = roc_auc(lin((fte - mu) / sd).squeeze(1).numpy(), y_test)
    return out


def group_kinds(slicer) -> dict[str, set[int]]:
    """Group ids per kind (see the module docstring), from the traced graph."""
    from snp_ray.slicing.handlers import is_depthwise

    g = slicer.graph
    mods = dict(g.module.named_modules())
    kinds: dict[str, set[int]] = {"depthwise": set(), "residual": set(), "last": set()}
    for grp in g.groups:
        if slicer.is_depthwise_group(grp.id):         # the rule SliceConfig.depthwise_rate uses
            kinds["depthwise"].add(grp.id)
        convs = [mods.get(n) for n, _ in grp.producers]
        if sum(isinstance(m, torch.nn.modules.conv._ConvNd) and not is_depthwise(m) for m in convs) > 1:
            kinds["residual"].add(grp.id)
    kinds["last"].add(max(g.groups, key=lambda grp: grp.order).id)
    return kinds


def variants(market, mid: str, klass: str, k: int, overrides: list[dict]) -> list[dict]:
    from snp_ray.evaluation.fragments import fragment_auc
    from snp_ray.slicing import slice_preset
    from snp_ray.slicing.api import ModelSlicer

    rows = []
    for over in overrides:
        over = dict(over)
        whole = over.pop("keep_whole", None)
        ms = ModelSlicer(market, mid, k, slice_preset("quick", **over), engine="cached", device="cpu")
        extra = {}
        if whole:
            keep = group_kinds(ms.slicer)[whole]
            ms.slicer.keep_whole = set(keep)        # selection keeps every unit of these groups
            extra = {"keep_whole": whole, "groups_kept_whole": len(keep)}
        c = market.class_id(klass)
        t0 = time.perf_counter()
        f = ms.slice(c)
        rows.append({"overrides": {**over, **extra}, "class": f.spec.class_name, "params": f.spec.params,
                     "param_ratio": f.spec.params / f.spec.source_params,
                     "fewshot_auc": f.spec.metrics["fewshot_auc"],
                     "test_auc": fragment_auc(f, ms.spec.dataset, ms.spec.classes),
                     "seconds": time.perf_counter() - t0})
        log.info("%s", rows[-1])
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default="runs/mixed")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--model", default="mobilenet_v2-w0.5")
    p.add_argument("--klass", default="ship")
    p.add_argument("--variants", nargs="*", default=["{}"])
    p.add_argument("--out", default="docs/results/mixed/diagnosis.json")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    from snp_ray.market import Market

    market = Market(a.store)
    out = {"command": "python benchmarks/mixed_diagnosis.py " + " ".join(
               f"--{k.replace('_', '-')} {v if not isinstance(v, list) else ' '.join(repr(x) for x in v)}"
               for k, v in vars(a).items()),
           "k": a.k, "models": {mid: source_and_probe(market, mid, a.k) for mid in market.ids()}}
    for mid, r in out["models"].items():
        log.info("%s: source %s; few-shot probe %s", mid,
                 {c: round(v, 3) for c, v in r["source_auc"].items()},
                 {c: round(v, 3) for c, v in r["probe_auc"].items()})
    out["variants"] = {"model": a.model, "class": a.klass,
                       "rows": variants(market, a.model, a.klass, a.k, [json.loads(v) for v in a.variants])}
    atomic_write_bytes(Path(a.out), json.dumps(out, indent=2).encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
