"""The mixed market: three model families from three "developers", over T1's class groups.

Each developer trains their own model on their own classes of CIFAR-10 (the T1 split) by the
recipe here, saves it as safetensors and adds it as an outside developer would
(``snp market add``, with the arguments :func:`add_args` gives). The job that builds, slices,
packs and measures it is :mod:`snp_ray.engine.mixed` (``jobs/build_mixed_market.py``).

Like :mod:`snp_ray.market.training`, the recipe reads the train split only (no early stopping,
no model selection); tests/test_isolation.py scans this module.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snp_ray.data.classes import class_ids
from snp_ray.errors import UnknownNameError
from snp_ray.market.tasks import get_task
from snp_ray.market.training import ARCH_TRAIN

log = logging.getLogger("snp_ray.mixed")

DATASET = "cifar10"
#: the task whose class groups the developers split between them
TASK = "T1"


@dataclass(frozen=True)
class Member:
    """One developer's model: which family, which T1 classes, at which input size, and the
    developer's training budget (``train``: TrainConfig settings beyond the image defaults, the
    architecture's recipe: AdamW for a ViT)."""

    id: str
    arch: str                      # an architecture reference, as `snp market add --arch` takes
    classes: list[str]
    input_size: int = 32
    epochs: int = 12
    train_fraction: float = 0.5     # share of the class rows the developer trains on (CPU budget)
    train: dict[str, Any] = field(default_factory=dict, hash=False)

    def class_ids(self) -> list[int]:
        """The member's classes as CIFAR-10 ids (the one resolver, against the vocabulary)."""
        from snp_ray.data.tables import dataset_class_names

        return class_ids(self.classes, dataset_class_names(DATASET), kind=f"{DATASET} class",
                         what=f"member {self.id}")


#: T1's three class groups, one family each. The hardest group (cat, deer, dog) goes to the VGG,
#: the strongest of the three at 32x32; the assignment is ours, the issue leaves it open.
_VGG = Member("vgg11-w0.25", "snp:vgg11?width=0.25", ["cat", "deer", "dog"],
              epochs=15, train_fraction=0.4)
_MOBILENET = Member("mobilenet_v2-w0.5", "torchvision:mobilenet_v2?width_mult=0.5",
                    ["frog", "horse", "ship", "truck"], input_size=64, epochs=8, train_fraction=0.25)

#: the member sets a mixed market can be built from (``--members``). "cnn": three CNN families
#: (the `mixed` stage); "vit": the zoo ViT (4 blocks, 64-d, 4 heads, patch 4) in the ResNet-18's
#: place, on its classes and with its budget (10 epochs on 40 % of the rows), trained by the
#: ViT recipe of ARCH_TRAIN (AdamW, lr 2e-3, weight decay 0.05); both fixed before any run
MEMBER_SETS: dict[str, list[Member]] = {
    "cnn": [Member("resnet18", "torchvision:resnet18", ["airplane", "automobile", "bird"],
                   epochs=10, train_fraction=0.4), _VGG, _MOBILENET],
    "vit": [Member("vit", "snp:vit", ["airplane", "automobile", "bird"], epochs=10,
                   train_fraction=0.4, train=dict(ARCH_TRAIN["vit"])), _VGG, _MOBILENET],
}
DEFAULT_MEMBERS = "cnn"
MEMBERS = MEMBER_SETS[DEFAULT_MEMBERS]


def member_set(name: str) -> list[Member]:
    """The member set called ``name`` (:data:`MEMBER_SETS`)."""
    if name not in MEMBER_SETS:
        raise UnknownNameError("member set", name, list(MEMBER_SETS))
    return MEMBER_SETS[name]


def t1_groups() -> list[list[int]]:
    """T1's class groups, one per model of the task (the mixed market's members split them)."""
    return [list(g) for g in get_task(TASK).model_classes]


def default_pack_classes(members: list[Member] | None = None) -> list[str]:
    """What the job packs by default: the first class of each family (of ``members``, default
    :data:`MEMBERS`)."""
    return [m.classes[0] for m in (members or MEMBERS)]


def train_config(m: Member, epochs_scale: float = 1.0, train_fraction: float = 0.0,
                 threads: int = 1):
    """The developer's training schedule: the member's epochs (scaled, at least one) on its
    share of the train rows (``train_fraction`` overrides it when > 0), seed 0, and the member's
    own recipe settings (``Member.train``)."""
    from snp_ray.market.training import TrainConfig

    return TrainConfig(epochs=max(1, round(m.epochs * epochs_scale)), seed=0,
                       train_fraction=train_fraction or m.train_fraction,
                       threads=threads or os.cpu_count() or 1, **m.train)


def train_member(m: Member, weights: Path, epochs_scale: float = 1.0, train_fraction: float = 0.0,
                 threads: int = 1) -> dict[str, Any]:
    """The developer's side: train the family's model on its classes (:func:`train_config`),
    save a safetensors file at ``weights`` (atomically).

    Returns the input normalisation the developer used (given to ``snp market add``), the
    training metrics and the epochs."""
    import torch

    from snp_ray.artifacts import atomic_write_bytes, tensors_to_bytes
    from snp_ray.data.specs import ImageSpec
    from snp_ray.data.tables import read_split
    from snp_ray.market.training import fit_classifier, training_rows
    from snp_ray.models.refs import build_external, parse_ref, ref_width
    from snp_ray.models.registry import build_model

    ids = m.class_ids()
    split = read_split(DATASET, "train")
    cfg = train_config(m, epochs_scale, train_fraction, threads)
    rows, y = training_rows(split, ids, cfg)
    fitted = ImageSpec.fit(split.images[rows])
    spec = ImageSpec(mean=fitted.mean, std=fitted.std, size=[m.input_size, m.input_size])
    x = spec.encode(split.images[rows])
    torch.manual_seed(cfg.seed)
    ref = parse_ref(m.arch)
    model = build_external(ref, len(ids)) if ref.external else build_model(ref.name, len(ids), ref_width(ref))
    metrics = fit_classifier(model, x, y, cfg, image=True, label=m.id, progress=sys.stderr.isatty())
    atomic_write_bytes(weights, tensors_to_bytes(model.state_dict()))
    log.info("%s: trained %d epochs on %d rows in %.0f s (train acc %.3f)", m.id, cfg.epochs,
             len(rows), metrics["train_seconds"], metrics["train_accuracy"])
    return {"mean": spec.mean, "std": spec.std, "train": metrics, "epochs": cfg.epochs}


def add_args(m: Member, store: Path, weights: Path, trained: dict[str, Any], k: int,
             replace: bool = False) -> list[str]:
    """The ``snp market add`` arguments the developer of ``m`` runs (the normalisation it
    trained with, its classes by name, its input size)."""
    return ["market", "add", "--store", str(store), "--arch", m.arch, "--weights", str(weights),
            "--classes", ",".join(m.classes), "--dataset", DATASET, "--k", str(k), "--id", m.id,
            "--input-size", str(m.input_size),
            "--mean", ",".join(f"{v:.6f}" for v in trained["mean"]),
            "--std", ",".join(f"{v:.6f}" for v in trained["std"]),
            *(["--replace"] if replace else [])]
