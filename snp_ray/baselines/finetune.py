"""Finetune baseline: one original model, all of it trained, with a new head over the target set.

Paper: "fine-tunes one of the original models using data of the target task"; Table 2 reports
the mean over which original model is chosen, so :func:`run_finetune` tunes every task model and
returns one result each. The model is deep-copied first: the market's model is never changed.
Inputs go through the chosen model's own input spec (normalisation or vocabulary).
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from snp_ray.baselines.common import (BaselineResult, SingleModel, as_config, batches, finite,
                                      load_task)
from snp_ray.config import Config, check_range
from snp_ray.data.augment import augment_images
from snp_ray.data.specs import InputSpec
from snp_ray.errors import DataError
from snp_ray.market.market import Market
from snp_ray.market.training import warmup_cosine
from snp_ray.models import Classifier, channels_last_safe, count_params

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig(Config):
    epochs: int = 40             # passes over the target few-shot samples
    batch_size: int = 32
    lr: float = 1e-3             # AdamW, feature extractor (warm-up + cosine)
    head_lr: float = 1e-2        # AdamW, the new head
    weight_decay: float = 5e-4
    augment: bool = True         # images: random crop + flip per batch
    seed: int = 0

    def validate(self) -> None:
        n = "FinetuneConfig"
        check_range(n, "epochs", self.epochs, 1, 100_000)
        check_range(n, "batch_size", self.batch_size, 1, 1 << 20)
        check_range(n, "lr", self.lr, 0.0, 10.0)
        check_range(n, "head_lr", self.head_lr, 0.0, 10.0, lo_open=True)
        check_range(n, "weight_decay", self.weight_decay, 0.0, 1.0)


def finetune_model(model: Classifier, spec: InputSpec, raw, y: torch.Tensor, n_classes: int,
                   cfg: FinetuneConfig) -> tuple[Classifier, dict[str, float]]:
    """A tuned deep copy of ``model`` with a fresh ``n_classes`` head; ``model`` is untouched."""
    torch.manual_seed(cfg.seed)
    tuned = copy.deepcopy(model)
    tuned.head = nn.Linear(tuned.feature_dim, n_classes)
    tuned.num_classes = n_classes
    for p in tuned.parameters():
        p.requires_grad_(True)
    image = isinstance(raw, np.ndarray)
    fmt = torch.channels_last if image and channels_last_safe(tuned) else torch.contiguous_format
    x = spec.encode(raw)
    if image:
        x = x.contiguous(memory_format=fmt)
        tuned = tuned.to(memory_format=fmt)
    opt = torch.optim.AdamW([{"params": tuned.features.parameters(), "lr": cfg.lr},
                             {"params": tuned.head.parameters(), "lr": cfg.head_lr}],
                            weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = x.shape[0]
    per_epoch = len(batches(n, cfg.batch_size, torch.Generator().manual_seed(0)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.epochs * per_epoch))
    ce = nn.CrossEntropyLoss()
    loss_sum, seen = 0.0, 0
    tuned.train()
    for _ in range(cfg.epochs):
        loss_sum, seen = 0.0, 0
        for idx in batches(n, cfg.batch_size, gen):
            xb = x[idx]
            if image and cfg.augment:
                xb = augment_images(xb, gen).contiguous(memory_format=fmt)
            loss = ce(tuned(xb), y[idx])
            if not finite(loss.item()):
                raise DataError(f"fine-tuning diverged (loss {loss.item()})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            seen += len(idx)
    tuned = tuned.to(memory_format=torch.contiguous_format).eval()
    for p in tuned.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        acc = float((tuned(spec.encode(raw)).argmax(1) == y).float().mean())
    return tuned, {"train_loss": loss_sum / max(seen, 1), "fewshot_accuracy": acc,
                   "train_samples": float(n)}


def run_finetune(market: Market, task_models: list[str], target_classes: list[int], k: int,
                 seed: int = 0, config: FinetuneConfig | dict | None = None) -> list[BaselineResult]:
    """One result per task model (in ``task_models`` order), each tuned on the same samples."""
    cfg = as_config(config, FinetuneConfig)
    data = load_task(market, task_models, target_classes, k, seed)
    y = data.y
    out = []
    for mid, model, spec in zip(data.ids, data.models, data.specs):
        t0 = time.perf_counter()
        try:
            tuned, metrics = finetune_model(model, spec.input_spec, data.samples.raw, y,
                                            len(data.classes), cfg)
        except DataError as e:
            seconds = time.perf_counter() - t0
            params = count_params(model.features) + model.feature_dim * len(data.classes) + len(data.classes)
            out.append(BaselineResult("finetune", "failed", list(data.classes), params, params,
                                      seconds, reason=str(e), source_model=mid, config=cfg.to_dict()))
            continue
        seconds = time.perf_counter() - t0
        params = count_params(tuned)
        log.info("finetune %s: few-shot accuracy %.3f in %.1fs", mid, metrics["fewshot_accuracy"], seconds)
        out.append(BaselineResult("finetune", "ok", list(data.classes), params, params, seconds,
                                  SingleModel(data.classes, tuned, spec.input_spec), source_model=mid,
                                  metrics=metrics, config=cfg.to_dict()))
    return out
