"""Seconds per fragment for each family the slicer follows (#27 section 4), against a VGG11 x 1/4
in the same run.

Each family is built with random weights for 3 classes at 32x32 (as ``snp market add`` would
bring it in), and one class is sliced from k=10 random images per class with the ``quick``
preset on one thread. Families and the VGG reference alternate, ``--repeats`` times, so that the
ratio to VGG is measured side by side (timings on shared machines move 3-10x; the ratio moves
much less). Reported: the median seconds, the ratio to the VGG median, and the fragment's share of
the model's feature-extractor parameters.

A family the slicer refuses is reported with its typed error and where it was refused (``add``:
bringing the model in, ``slice``: slicing it), not fatal. Per family also: the slicer's groups
(``slicer.graph.groups``) and how many of them are fixed (kept whole, ``Group.fixed``).

Usage: python benchmarks/family_slice_time.py [--repeats 3] [--families "timm mixnet_s,..."]
           [--out docs/results/slicer/families.json] [--md docs/results/slicer/families.md]
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from snp_ray.artifacts import atomic_write_bytes
from snp_ray.data.fewshot import FewShotManifest, FewShotSet
from snp_ray.data.specs import ImageSpec
from snp_ray.models import build_model, count_params, split_classifier
from snp_ray.runtime import environment
from snp_ray.slicing import Slicer, slice_preset

log = logging.getLogger("family_slice_time")


def _tv(name: str, **kw) -> Callable[[], torch.nn.Module]:
    import torchvision

    return lambda: torchvision.models.get_model(name, weights=None, num_classes=3, **kw)


def _timm(name: str, **kw) -> Callable[[], torch.nn.Module]:
    def build():
        import timm

        return timm.create_model(name, pretrained=False, num_classes=3, **kw)
    return build


#: family -> builder of the outside model, or (zoo name, width) for build_model
FAMILIES: dict[str, Callable[[], torch.nn.Module] | tuple[str, float]] = {
    "vgg11x0.25": ("vgg11", 0.25),
    "snp:vit": ("vit", 1.0),
    "timm vit_tiny (32px patch 4)": _timm("vit_tiny_patch16_224", img_size=32, patch_size=4),
    "timm deit_tiny (32px patch 4)": _timm("deit_tiny_patch16_224", img_size=32, patch_size=4),
    "torchvision squeezenet1_1": _tv("squeezenet1_1"),
    "torchvision regnet_y_400mf": _tv("regnet_y_400mf"),
    "torchvision resnext50_32x4d": _tv("resnext50_32x4d"),
    "timm dla34": _timm("dla34"),
    "torchvision shufflenet_v2_x0_5": _tv("shufflenet_v2_x0_5"),
    "timm ghostnet_050": _timm("ghostnet_050"),
    "timm mixnet_s": _timm("mixnet_s"),
    "timm cspresnet50": _timm("cspresnet50"),
    "timm rexnet_100": _timm("rexnet_100"),
    "timm mobilevit_xxs": _timm("mobilevit_xxs"),     # shape branches decided on the input
}


def fewshot(k: int = 10) -> FewShotSet:
    labels = np.repeat([0, 1, 2], k)
    raw = np.random.default_rng(0).integers(0, 256, (labels.size, 32, 32, 3), dtype=np.uint8)
    rows = [list(range(i * k, (i + 1) * k)) for i in range(3)]
    return FewShotSet(FewShotManifest(dataset="cifar10", k=k, seed=0, classes=[0, 1, 2],
                                      row_ids=rows), raw, labels, ["a", "b", "c"])


class Refused(Exception):
    """A family the slicer refuses: where (``add`` or ``slice``) and the typed error."""

    def __init__(self, where: str, error: Exception):
        super().__init__(f"{type(error).__name__}: {error}")
        self.where = where


def one(family: str, fs: FewShotSet, spec: ImageSpec) -> dict[str, float]:
    """Seconds to slice class 1 (building and tracing the model untimed), the fragment's share of
    the extractor's parameters, and the slicer's groups and fixed groups."""
    torch.manual_seed(0)
    build = FAMILIES[family]
    try:
        if isinstance(build, tuple):
            model = build_model(build[0], 3, build[1])
        else:
            model = split_classifier(build().eval(), spec.encode(fs.raw[:2]))
    except Exception as e:  # what ``snp market add`` runs: a refusal there
        raise Refused("add", e) from e
    try:
        slicer = Slicer(model, spec, fs, slice_preset("quick"))
        t0 = time.perf_counter()
        out = slicer.slice_class(1)
        seconds = time.perf_counter() - t0
    except Exception as e:
        raise Refused("slice", e) from e
    groups = slicer.graph.groups
    return {"seconds": seconds, "groups": len(groups), "fixed": sum(1 for g in groups if g.fixed),
            "fragment_params": count_params(out.features), "model_params": count_params(model.features)}


def markdown(out: dict) -> str:
    """The published table: one row a family, the reference first."""
    lines = ["| family | groups | fixed | fragment / model params | median s | × VGG11×¼ |",
             "|---|---:|---:|---:|---:|---:|"]
    for fam, row in out["families"].items():
        if "error" in row:
            lines.append(f"| {fam} | — | — | refused at {row['refused_at']}: `{row['error']}` | — | — |")
        else:
            lines.append(f"| {fam} | {row['groups']} | {row['fixed']} | {row['fragment_share_of_params']:.3f} "
                         f"({row['fragment_params']:,} / {row['model_params']:,}) | "
                         f"{row['median_seconds']:.2f} | {row['ratio_to_vgg11x0.25']:.2f} |")
    return (f"Seconds to slice one class (`quick` preset, k = {out['k']}, {out['threads']} torch thread, "
            f"{out['repeats']} repeat(s), each family beside a VGG11×¼ slice; random weights, 3 classes, "
            "32×32).\n\n" + "\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--families", default=",".join(f for f in FAMILIES if f != "vgg11x0.25"))
    p.add_argument("--out", default="")
    p.add_argument("--md", default="", help="also write the table as Markdown here")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    fs, spec = fewshot(), ImageSpec()
    names = [f for f in a.families.split(",") if f]      # family names hold no comma
    if unknown := [n for n in names if n not in FAMILIES]:
        p.error(f"unknown families {unknown}; known: {list(FAMILIES)}")
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in ["vgg11x0.25", *names]}
    errors: dict[str, Refused] = {}
    for r in range(a.repeats):
        for name in names:
            for fam in ("vgg11x0.25", name):      # the reference beside every family
                if fam in errors:
                    continue
                try:
                    runs[fam].append(one(fam, fs, spec))
                except Refused as e:  # a family the slicer refuses is reported, not fatal
                    errors[fam] = e
                    log.info("repeat %d %s: refused at %s: %s", r + 1, fam, e.where, e)
                    continue
                log.info("repeat %d %s: %.1f s", r + 1, fam, runs[fam][-1]["seconds"])
    ref = statistics.median(x["seconds"] for x in runs["vgg11x0.25"])
    rows = {}
    for fam, xs in runs.items():
        if not xs:
            e = errors.get(fam)
            rows[fam] = {"error": str(e) if e else "no run", "refused_at": e.where if e else ""}
            continue
        med = statistics.median(x["seconds"] for x in xs)
        rows[fam] = {"groups": xs[0]["groups"], "fixed": xs[0]["fixed"],
                     "fragment_params": xs[0]["fragment_params"], "model_params": xs[0]["model_params"],
                     "fragment_share_of_params": round(xs[0]["fragment_params"] / xs[0]["model_params"], 3),
                     "median_seconds": round(med, 2), "ratio_to_vgg11x0.25": round(med / ref, 2),
                     "seconds": [round(x["seconds"], 2) for x in xs], "runs": len(xs)}
    out = {"machine": environment(), "repeats": a.repeats, "preset": "quick", "k": 10,
           "threads": 1, "families": rows,
           "command": "python benchmarks/family_slice_time.py " + " ".join(
               f"--{k} {v}" for k, v in (("repeats", a.repeats),) if v)}
    print(markdown(out))
    for path, body in ((a.out, json.dumps(out, indent=1) + "\n"), (a.md, markdown(out))):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(Path(path), body.encode())


if __name__ == "__main__":
    main()
