"""Reproduce the paper's tables at CPU scale: T1 (VGG and ResNet), T6 (TREC, RNN), T7 (SST-5,
TextCNN); T2-T5 where CIFAR-100 is present. Thin wrapper over ``snp report``.

Usage: python jobs/reproduce_tables.py [--tasks T1,T6,T7] [--targets 5] [--preset quick] [--out results]
"""
from __future__ import annotations

import argparse
import sys

import _jobenv  # noqa: F401  - exits with a hint when this python is not the project's venv
from snp_ray.cli import main as snp
from snp_ray.data.catalog import available

TASK_ARCHS = {"T1": "vgg11,resnet20", "T6": "gru", "T7": "textcnn", "T2": "vgg11", "T3": "vgg11",
              "T4": "vgg11", "T5": "vgg11"}
TASK_KS = {"T6": "5,10", "T7": "5,10"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tasks", default="")
    p.add_argument("--targets", type=int, default=5)
    p.add_argument("--preset", default="quick")
    p.add_argument("--out", default="results")
    p.add_argument("--baselines", default="ensemble,finetune,ca-mkd,netgraft")
    a = p.parse_args(argv)
    tasks = [t for t in a.tasks.split(",") if t] or (
        ["T1", "T6", "T7"] + (["T2", "T3", "T4", "T5"] if "cifar100" in available() else []))
    rc = 0
    for task in tasks:
        rc |= snp(["report", "--task", task, "--archs", TASK_ARCHS[task], "--k",
                   TASK_KS.get(task, "5,10,20"), "--targets", str(a.targets), "--preset", a.preset,
                   "--out", a.out, "--baselines", a.baselines, "--json"])
    return rc


if __name__ == "__main__":
    sys.exit(main())
