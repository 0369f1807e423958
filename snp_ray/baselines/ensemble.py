"""Ensemble baseline: every original model's frozen feature extractor, concatenated, one new head.

Paper (Table 3, Figure 4): "concatenates the features of the original models and trains a
classifier based on the concatenated feature". Deployable = all task models' extractors + head.
Extractors stay frozen, so their features are computed once per sample and augmented view.
Each block of features is scaled by 1/RMS (as the packer does) so no model dominates by scale.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from snp_ray.baselines.common import (BaselineResult, FeatureConcatModel, TaskData, as_config,
                                      fit_head, frozen_features, image_views, load_task, rms_scale)
from snp_ray.config import Config, check_range
from snp_ray.market.market import Market
from snp_ray.models import count_params

log = logging.getLogger(__name__)


@dataclass
class EnsembleConfig(Config):
    hidden: int = 0              # 0: linear head; > 0: MLP with one hidden layer of this width
    epochs: int = 200            # passes over the cached features (all views)
    lr: float = 3e-3             # Adam
    weight_decay: float = 1e-4
    batch_size: int = 256
    views: int = 8               # images: cached views per sample (1 = no augmentation)
    seed: int = 0

    def validate(self) -> None:
        n = "EnsembleConfig"
        check_range(n, "hidden", self.hidden, 0, 65_536)
        check_range(n, "epochs", self.epochs, 1, 100_000)
        check_range(n, "lr", self.lr, 0.0, 1.0, lo_open=True)
        check_range(n, "weight_decay", self.weight_decay, 0.0, 1.0)
        check_range(n, "batch_size", self.batch_size, 1, 1 << 20)
        check_range(n, "views", self.views, 1, 256)


def concat_head(data: TaskData, extractors: list[torch.nn.Module], name: str,
                cfg: EnsembleConfig) -> tuple[FeatureConcatModel, dict[str, float]]:
    """Fit a head over the concatenated frozen features of ``extractors`` (one per task model)."""
    raw = data.samples.raw
    views = image_views(raw, cfg.views, cfg.seed + 1) if isinstance(raw, np.ndarray) else [raw]
    specs = [s.input_spec for s in data.specs]
    blocks = [torch.cat([frozen_features(e, sp, v) for v in views]) for e, sp in zip(extractors, specs)]
    n = len(data.samples.labels)
    scales = torch.stack([rms_scale(b[:n]) for b in blocks])
    x = torch.cat([b * s for b, s in zip(blocks, scales)], 1)
    y = data.y.repeat(len(views))
    head, loss = fit_head(x, y, len(data.classes), cfg.hidden, cfg.epochs, cfg.lr,
                          cfg.weight_decay, cfg.batch_size, cfg.seed)
    model = FeatureConcatModel(data.classes, extractors, specs, scales, head).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    train_acc = float((model.head(x[:n]).argmax(1) == y[:n]).float().mean())
    log.info("%s head over %d features: loss %.4f, few-shot accuracy %.3f", name, x.shape[1], loss,
             train_acc)
    return model, {"head_loss": loss, "fewshot_accuracy": train_acc, "train_samples": float(n),
                   "feature_dim": float(x.shape[1])}


def run_ensemble(market: Market, task_models: list[str], target_classes: list[int], k: int,
                 seed: int = 0, config: EnsembleConfig | dict | None = None) -> list[BaselineResult]:
    """One result: the head over all task models' frozen features."""
    cfg = as_config(config, EnsembleConfig)
    data = load_task(market, task_models, target_classes, k, seed)
    t0 = time.perf_counter()
    model, metrics = concat_head(data, [m.features for m in data.models], "ensemble", cfg)
    seconds = time.perf_counter() - t0
    params = count_params(model.extractors) + count_params(model.head)
    return [BaselineResult("ensemble", "ok", list(data.classes), params, params, seconds, model,
                           metrics=metrics, config=cfg.to_dict())]
