"""Training of the market's original models (what each model's developer did before uploading).

The developer has the full training split of its own classes; the market later receives only the
trained weights and k samples per class. Training runs a fixed schedule: no early stopping and no
model selection, so nothing here looks at the test split.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from snp_ray.config import Config, added_field, check_range
from snp_ray.data.augment import augment_images
from snp_ray.data.specs import ImageSpec, InputSpec, TextSpec
from snp_ray.data.tables import Split
from snp_ray.data.text import build_vocab
from snp_ray.errors import ConfigError
from snp_ray.models import Classifier, build_model, channels_last_safe, get_arch

log = logging.getLogger(__name__)


SCHEDULES = ("warmup_cosine", "constant")
OPTIMIZERS = ("auto", "sgd", "adamw")


@dataclass
class TrainConfig(Config):
    """Schedule for one original model. ``None`` fields take the modality's default."""

    epochs: int = 15
    batch_size: int = 128
    lr: float | None = None            # peak LR. image: SGD 0.05; text: AdamW 2e-3
    weight_decay: float = 5e-4
    train_fraction: float = 1.0        # stratified share of the train split the developer used
    augment: bool = True               # random crop (pad 4) + horizontal flip for images
    seed: int = 0
    threads: int = 1                   # torch intra-op threads of one training task
    max_len: int = 48                  # text: tokens per sentence
    vocab_size: int = 20_000           # text: most frequent tokens kept
    #: image LR schedule: warm-up then cosine, or "constant" (the learnware recipe: plain SGD)
    schedule: str = added_field("warmup_cosine")
    nesterov: bool = added_field(True)
    #: "auto": SGD (momentum) for images, AdamW for text; "adamw" also for images (a ViT)
    optimizer: str = added_field("auto")

    def validate(self) -> None:
        name = "TrainConfig"
        check_range(name, "epochs", self.epochs, 1, 10_000)
        check_range(name, "batch_size", self.batch_size, 1, 65_536)
        check_range(name, "train_fraction", self.train_fraction, 0.0, 1.0, lo_open=True)
        check_range(name, "weight_decay", self.weight_decay, 0.0, 1.0)
        check_range(name, "threads", self.threads, 1, 1024)
        if self.lr is not None:
            check_range(name, "lr", self.lr, 0.0, 10.0, lo_open=True)
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"TrainConfig.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"TrainConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")


#: training settings per architecture beyond the defaults: a ViT trains with AdamW and decoupled
#: weight decay, the usual ViT recipe (fixed before any run; never tuned on test data). The
#: protocol's markets and the mixed market's ViT member (snp_ray.market.mixed) both use it.
ARCH_TRAIN: dict[str, dict[str, Any]] = {"vit": {"optimizer": "adamw", "lr": 2e-3,
                                                 "weight_decay": 0.05}}

#: the learnware image workflow's training recipe for its ConvModel (issue #25)
LW_TRAIN = TrainConfig(epochs=35, batch_size=128, lr=0.01, weight_decay=0.0, augment=False,
                       schedule="constant", nesterov=False)


@dataclass
class TrainedModel:
    model: Classifier
    input_spec: InputSpec
    metrics: dict[str, float]


def stratified_fraction(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Row indices keeping ``fraction`` of every class (at least one row each)."""
    if fraction >= 1.0:
        return np.arange(labels.shape[0])
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep.append(rng.permutation(idx)[: max(1, int(round(fraction * idx.size)))])
    return np.sort(np.concatenate(keep))


def warmup_cosine(steps: int, warmup_share: float = 0.15):
    """LR factor per step: linear warm-up, then cosine decay to zero. Works for any ``steps``."""
    warm = max(1, int(warmup_share * steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, steps - warm))))
    return factor


def training_rows(split: Split, classes: list[int], cfg: TrainConfig) -> tuple[np.ndarray, torch.Tensor]:
    """The developer's training rows (``cfg.train_fraction`` of each class in ``classes``) and
    their local labels (index in ``classes``)."""
    rows = np.flatnonzero(np.isin(split.labels, classes))
    rows = rows[stratified_fraction(split.labels[rows], cfg.train_fraction, cfg.seed)]
    local_of = {c: i for i, c in enumerate(classes)}
    return rows, torch.tensor([local_of[int(c)] for c in split.labels[rows]], dtype=torch.long)


def train_original(split: Split, classes: list[int], arch: str, width: float,
                   cfg: TrainConfig, progress: bool = False, label: str = "",
                   table: str = "") -> TrainedModel:
    """Train ``arch`` on the rows of ``split`` whose label is in ``classes`` (global ids).
    A static-table text model reads ``table`` (a stored table's sha256), frozen, and takes its
    vocabulary from it.

    Logs one INFO line per epoch (``label``, epoch i/n, loss, seconds), so that a market that
    trains for minutes shows its progress; inside a Ray task the line reaches the driver.
    """
    a = get_arch(arch)
    if (a.modality == "image") != (split.images is not None):
        raise ConfigError(f"architecture {arch} ({a.modality}) does not fit dataset {split.dataset}")
    torch.manual_seed(cfg.seed)            # before the model is built: its init is seeded
    torch.set_num_threads(cfg.threads)
    rows, y = training_rows(split, classes, cfg)

    if a.modality == "image":
        spec: InputSpec = ImageSpec.fit(split.images[rows])
        model = build_model(arch, len(classes), width)
        x = spec.encode(split.images[rows])
    else:
        texts = [split.texts[i] for i in rows]
        if a.static_table:
            from snp_ray.data.embeddings import table_vocab

            if not table:
                raise ConfigError(f"architecture {arch} reads a static embedding table; none given")
            spec = TextSpec(vocab=table_vocab(table), max_len=cfg.max_len, table=table)
        else:
            spec = TextSpec(vocab=build_vocab(texts, max_size=cfg.vocab_size), max_len=cfg.max_len)
        x = spec.encode(texts)
        model = build_model(arch, len(classes), width, vocab_size=len(spec.vocab),
                            table=table or None)
    metrics = fit_classifier(model, x, y, cfg, image=a.modality == "image",
                             label=label or f"{arch} {classes}", progress=progress)
    return TrainedModel(model, spec, metrics)


def fit_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, *,
                   image: bool, label: str, progress: bool = False) -> dict[str, float]:
    """Train any logits module in place on encoded inputs ``x`` and local labels ``y``.

    The fixed schedule of :func:`train_original` (SGD + warm-up cosine for images, AdamW for
    text), shared so that a developer's torchvision/timm model (``jobs/build_mixed_market.py``) is
    trained exactly like ours. Logs one INFO line per epoch; returns the training metrics and
    leaves the model on the CPU in eval mode. The caller seeds torch (before building the model).
    """
    from snp_ray.runtime import default_device

    torch.set_num_threads(cfg.threads)
    device = torch.device(default_device())
    fmt = torch.contiguous_format
    if image:
        fmt = torch.channels_last if channels_last_safe(model) else torch.contiguous_format
        x = x.contiguous(memory_format=fmt)
        model = model.to(memory_format=fmt)
    opt: torch.optim.Optimizer
    if cfg.optimizer == "sgd" or (cfg.optimizer == "auto" and image):
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr or 0.05, momentum=0.9,
                              nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr or 2e-3, weight_decay=cfg.weight_decay)

    model.to(device)           # in place: the optimiser keeps the same parameters
    n = x.shape[0]
    steps = cfg.epochs * max(1, -(-n // cfg.batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(steps) if cfg.schedule == "warmup_cosine" else (lambda step: 1.0))
    gen = torch.Generator().manual_seed(cfg.seed)
    loss_fn = nn.CrossEntropyLoss()
    started = time.perf_counter()
    log.info("%s: training on %d rows of %d classes for %d epochs on %s", label, n,
             int(y.max()) + 1 if n else 0, cfg.epochs, device)
    bar = _bar(cfg.epochs, progress, label)
    correct = seen = 0
    loss_sum = 0.0
    for epoch in range(cfg.epochs):
        epoch_started = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=gen)
        correct = seen = 0
        loss_sum = 0.0
        for start in range(0, n, cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            xb, yb = x[idx], y[idx]
            if image and cfg.augment:
                xb = augment_images(xb, gen).contiguous(memory_format=fmt)
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            logits = model(xb)
            loss = loss_fn(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(idx)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        log.info("%s epoch %d/%d: loss %.4f, train acc %.4f, %.1f s", label, epoch + 1, cfg.epochs,
                 loss_sum / seen, correct / seen, time.perf_counter() - epoch_started)
    if bar is not None:
        bar.close()
    model.eval()
    model.cpu().to(memory_format=torch.contiguous_format)
    return {"train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1),
            "train_rows": int(n), "train_seconds": time.perf_counter() - started,
            "train_on_gpu": float(device.type == "cuda")}


def _bar(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="epoch", leave=False)
