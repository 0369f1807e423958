"""Seconds per fragment for each family the slicer follows (#27 section 4), against a VGG11 x 1/4
in the same run.

Each family is built with random weights for 3 classes at 32x32 (as ``snp market add`` would
bring it in), and one class is sliced from k=10 random images per class with the ``quick``
preset on one thread. Families and the VGG reference alternate, ``--repeats`` times, so that the
ratio to VGG is measured side by side (timings on shared machines move 3-10x; the ratio moves
much less). Reported: the median seconds, the ratio to the VGG median, and the fragment's share of
the model's feature-extractor parameters.

Usage: python benchmarks/family_slice_time.py [--repeats 3] [--families vit_tiny,resnext]
           [--out docs/results/slicer/families.json]
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
    "timm vit_tiny (32px, patch 4)": _timm("vit_tiny_patch16_224", img_size=32, patch_size=4),
    "timm deit_tiny (32px, patch 4)": _timm("deit_tiny_patch16_224", img_size=32, patch_size=4),
    "torchvision squeezenet1_1": _tv("squeezenet1_1"),
    "torchvision regnet_y_400mf": _tv("regnet_y_400mf"),
    "torchvision resnext50_32x4d": _tv("resnext50_32x4d"),
    "timm dla34": _timm("dla34"),
}


def fewshot(k: int = 10) -> FewShotSet:
    labels = np.repeat([0, 1, 2], k)
    raw = np.random.default_rng(0).integers(0, 256, (labels.size, 32, 32, 3), dtype=np.uint8)
    rows = [list(range(i * k, (i + 1) * k)) for i in range(3)]
    return FewShotSet(FewShotManifest(dataset="cifar10", k=k, seed=0, classes=[0, 1, 2],
                                      row_ids=rows), raw, labels, ["a", "b", "c"])


def one(family: str, fs: FewShotSet, spec: ImageSpec) -> dict[str, float]:
    """Seconds to slice class 1, and the fragment's share of the extractor's parameters."""
    torch.manual_seed(0)
    build = FAMILIES[family]
    if isinstance(build, tuple):
        model = build_model(build[0], 3, build[1])
    else:
        model = split_classifier(build().eval(), spec.encode(fs.raw[:2]))
    slicer = Slicer(model, spec, fs, slice_preset("quick"))
    t0 = time.perf_counter()
    out = slicer.slice_class(1)
    return {"seconds": time.perf_counter() - t0,
            "share": count_params(out.features) / count_params(model.features)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--families", default=",".join(f for f in FAMILIES if f != "vgg11x0.25"))
    p.add_argument("--out", default="")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    fs, spec = fewshot(), ImageSpec()
    names = [f for f in a.families.split(",") if f]
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in ["vgg11x0.25", *names]}
    errors: dict[str, str] = {}
    for r in range(a.repeats):
        for name in names:
            for fam in ("vgg11x0.25", name):      # the reference beside every family
                if fam in errors:
                    continue
                try:
                    runs[fam].append(one(fam, fs, spec))
                except Exception as e:  # a family the slicer refuses is reported, not fatal
                    errors[fam] = f"{type(e).__name__}: {e}"
                    continue
                log.info("repeat %d %s: %.1f s", r + 1, fam, runs[fam][-1]["seconds"])
    ref = statistics.median(x["seconds"] for x in runs["vgg11x0.25"])
    rows = {}
    for fam, xs in runs.items():
        if not xs:
            rows[fam] = {"error": errors.get(fam, "no run")}
            continue
        med = statistics.median(x["seconds"] for x in xs)
        rows[fam] = {"median_seconds": round(med, 2), "ratio_to_vgg11x0.25": round(med / ref, 2),
                     "fragment_share_of_params": round(xs[0]["share"], 3), "runs": len(xs)}
    out = {"machine": environment(), "repeats": a.repeats, "preset": "quick", "k": 10,
           "threads": 1, "families": rows,
           "command": "python benchmarks/family_slice_time.py " + " ".join(
               f"--{k} {v}" for k, v in (("repeats", a.repeats),) if v)}
    print(f"{'family':34} {'median s':>9} {'x VGG':>7} {'fragment/model':>15}")
    for fam, row in rows.items():
        if "error" in row:
            print(f"{fam:34} refused: {row['error'][:80]}")
        else:
            print(f"{fam:34} {row['median_seconds']:9.1f} {row['ratio_to_vgg11x0.25']:7.2f} "
                  f"{row['fragment_share_of_params']:15.3f}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(Path(a.out), (json.dumps(out, indent=1) + "\n").encode())


if __name__ == "__main__":
    main()
