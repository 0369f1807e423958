"""A mixed market, end to end: three model families from three "developers".

Each developer trains their own model on their own classes of CIFAR-10 (the T1 split), saves it
as safetensors and adds it with ``snp market add``, exactly as an outside developer would (a
subprocess of the CLI, weights file and all). Then the slice job slices every (model, class) pair
on Ray, ``snp pack`` packs one class of each family into one heterogeneous model (the families
take different input sizes: MobileNetV2 runs at 64x64), and every fragment's class-vs-rest AUC is
measured on the test split. The summary (per-family slicing seconds, fragment/source parameter
ratios, AUCs, the pack's accuracy) is printed and written to ``<out>/mixed.json``.

    python jobs/build_mixed_market.py [--store runs/mixed] [--members cnn|vit] [--k 10] [--json]

``--members`` names the member set (snp_ray.market.mixed.MEMBER_SETS): ``cnn`` (default: ResNet-18,
VGG11 x 1/4, MobileNetV2 x 0.5) or ``vit`` (the zoo ViT in the ResNet-18's place).

Models already in the store are kept (the job resumes); ``--retrain`` trains them again.

``--slice-preset auto`` chooses each model's slicing config by cross-validation over its own k
shots only (snp_ray.tuning.select: every candidate of ``--candidates`` slices each class on 2 of 3
stratified folds and is scored by its binary head's AUC on the held-out fold, with the test split
fenced off); each model is then sliced, measured and packed with its own choice, and mixed.json
records the choice and every candidate's CV scores. Fold fragments are cached in
``<store>/cv-cache``, so a rerun reslices nothing.

This file parses the flags; the job is ``snp_ray.engine.mixed.run_mixed``, the market (members,
training recipe) ``snp_ray.market.mixed`` and its measurement ``snp_ray.evaluation.mixed``.
"""
from __future__ import annotations

import argparse
import sys

import _jobenv  # noqa: F401  - exits with a hint when this python is not the project's venv


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="build_mixed_market.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default="runs/mixed", help="market folder (default runs/mixed)")
    p.add_argument("--members", default="cnn",
                   help="the member set, a name in snp_ray.market.mixed.MEMBER_SETS (default cnn)")
    p.add_argument("--k", type=int, default=10, help="few-shot samples per class (default 10)")
    p.add_argument("--slice-preset", default="quick",
                   help="slice preset of every model, or 'auto': each model's by few-shot CV")
    p.add_argument("--candidates", default="",
                   help="with auto: comma-separated candidates (names in snp_ray.tuning.select."
                        "CANDIDATES or presets; default: " + "quick,quick-rate0.3,quick-rate0.5)")
    p.add_argument("--auto-models", default="",
                   help="with auto: the models to select for (default all); the others get the "
                        "first candidate")
    p.add_argument("--cv-folds", type=int, default=3, help="with auto: folds over the k shots")
    p.add_argument("--cv-folds-used", type=int, default=0,
                   help="with auto: score only the first n folds (0: all; a CPU budget knob)")
    p.add_argument("--epochs-scale", type=float, default=1.0,
                   help="multiply every member's training epochs (e.g. 0.25 for a smoke run)")
    p.add_argument("--train-fraction", type=float, default=0.0,
                   help="override every member's share of its train rows (0: the member's own)")
    p.add_argument("--pack", default="", help="classes to pack (default: the first of each family)")
    p.add_argument("--retrain", action="store_true", help="train and re-add models already stored")
    p.add_argument("--threads", type=int, default=1, help="torch threads for training (default 1: "
                   "with more threads than free cores, OpenMP spin-waits and a step is ~5x slower)")
    p.add_argument("--out", default="", help="where mixed.json goes (default <store>)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on the last line")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from snp_ray.runtime import ray_env_defaults

    ray_env_defaults()
    a = parse(argv)
    from snp_ray.engine.command import run_command
    from snp_ray.engine.mixed import MixedJobConfig, run_mixed

    cfg = MixedJobConfig(**{k: v for k, v in vars(a).items() if k != "json"})
    rc, _ = run_command(lambda: run_mixed(cfg), a.json)
    return rc


if __name__ == "__main__":
    sys.exit(main())
