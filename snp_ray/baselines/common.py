"""What every baseline shares: the request's few-shot data, result objects, predictors, helpers.

Baselines see exactly what Slice-and-Pack sees: the task models' weights and their k-shot sets
(method notes section 1). Nothing here may reach the test split; evaluation calls ``predict``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from snp_ray.config import Config
from snp_ray.data.augment import augment_images
from snp_ray.data.fewshot import FewShotSet
from snp_ray.data.specs import InputSpec
from snp_ray.errors import ConfigError, DataError
from snp_ray.market.market import Market
from snp_ray.market.modelstore import ModelSpec
from snp_ray.models import Classifier, count_params, get_arch
from snp_ray.packing.packer import PackSamples

STATUSES = ("ok", "failed")


# ------------------------------------------------------------------------------ request data
@dataclass
class TaskData:
    """The task models (as stored, never modified) and the target classes' few-shot samples."""

    ids: list[str]
    models: list[Classifier]
    specs: list[ModelSpec]
    sets: list[FewShotSet]           # each model's whole k-shot set (all its classes)
    samples: PackSamples             # rows of the target classes, deduplicated across sets
    classes: list[int]               # target classes, head order

    @property
    def y(self) -> torch.Tensor:
        """Target-space labels (positions in ``classes``) of ``samples``."""
        pos = {c: i for i, c in enumerate(self.classes)}
        return torch.tensor([pos[int(c)] for c in self.samples.labels], dtype=torch.long)

    @property
    def modality(self) -> str:
        return self.specs[0].input_spec.kind


def load_task(market: Market, task_models: list[str], target_classes: list[int], k: int,
              seed: int = 0) -> TaskData:
    """Check a request and gather its few-shot data (``seed`` picks the k-shot draw)."""
    if not task_models:
        raise ConfigError("a baseline needs at least one original model")
    if len(set(task_models)) != len(task_models):
        raise ConfigError(f"duplicate models in {task_models}")
    classes = [int(c) for c in target_classes]
    if len(classes) < 2:
        raise ConfigError(f"a target task needs at least two classes, got {classes}")
    if len(set(classes)) != len(classes):
        raise ConfigError(f"duplicate classes in the target set {classes}")
    specs = [market.spec(i) for i in task_models]
    kinds = {s.input_spec.kind for s in specs}
    if len(kinds) != 1:
        raise ConfigError(f"the models {task_models} mix input kinds {sorted(kinds)}")
    held = {c for s in specs for c in s.classes}
    missing = sorted(set(classes) - held)
    if missing:
        raise ConfigError(f"target classes {missing} are held by none of the models {task_models}")
    models = [market.model(i)[0] for i in task_models]
    sets = [market.fewshot(i, k, seed) for i in task_models]
    samples = PackSamples.from_fewshot(sets, classes)
    absent = sorted(set(classes) - {int(c) for c in samples.labels})
    if absent:
        raise DataError(f"no few-shot samples of classes {absent}")
    return TaskData(list(task_models), models, specs, sets, samples, classes)


def check_image(data: TaskData, method: str, families: tuple[str, ...]) -> None:
    """Refuse models a baseline is not implemented for, naming the model and the reason."""
    for s in data.specs:
        arch = get_arch(s.arch)
        if arch.modality != "image":
            raise ConfigError(f"{method} is implemented for image models only; model {s.id} is "
                              f"a {arch.modality} model ({s.arch})")
        if arch.family not in families:
            raise ConfigError(f"{method} is implemented for {'/'.join(families)} models only; "
                              f"model {s.id} is {s.arch}")


# ------------------------------------------------------------------------------ results
class BaselineModel(nn.Module):
    """A deployable baseline model: raw samples in, global class ids out."""

    def __init__(self, classes: list[int]):
        super().__init__()
        self.classes = [int(c) for c in classes]

    def logits(self, raw: Any) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def predict_proba(self, raw: Any, batch_size: int = 512) -> torch.Tensor:
        self.eval()
        if isinstance(raw, str):
            raise DataError("text input must be a list of strings")
        out = [torch.softmax(self.logits(raw[i:i + batch_size]), 1)
               for i in range(0, len(raw), batch_size)]
        return torch.cat(out) if out else torch.empty(0, len(self.classes))

    def predict(self, raw: Any, batch_size: int = 512) -> np.ndarray:
        """Global class ids."""
        return np.asarray(self.classes)[self.predict_proba(raw, batch_size).argmax(1).numpy()]


class FeatureConcatModel(BaselineModel):
    """Frozen extractors, each on its own input encoding, RMS-scaled, concatenated, one head."""

    def __init__(self, classes: list[int], extractors: list[nn.Module], input_specs: list[InputSpec],
                 scales: torch.Tensor, head: nn.Module):
        super().__init__(classes)
        self.extractors = nn.ModuleList(extractors)
        self.input_specs = list(input_specs)
        self.register_buffer("scales", scales.detach().clone().float())
        self.head = head

    def features(self, raw: Any) -> torch.Tensor:
        return torch.cat([e(s.encode(raw)) * sc for e, s, sc in
                          zip(self.extractors, self.input_specs, self.scales)], 1)

    def logits(self, raw: Any) -> torch.Tensor:
        return self.head(self.features(raw))

    def params_deployable(self) -> int:
        return count_params(self.extractors) + count_params(self.head)


class SingleModel(BaselineModel):
    """One classifier over the target classes with its own input encoding."""

    def __init__(self, classes: list[int], model: Classifier, input_spec: InputSpec):
        super().__init__(classes)
        self.model = model
        self.input_spec = input_spec

    def logits(self, raw: Any) -> torch.Tensor:
        return self.model(self.input_spec.encode(raw))

    def params_deployable(self) -> int:
        return count_params(self.model)


@dataclass
class BaselineResult:
    """One baseline run. ``params_training`` counts every parameter training held in memory
    (frozen teachers, adapters, training-only heads included); ``params_deployable`` what a user
    receives. A failed run keeps its sizes and says why in ``reason``; it cannot predict."""

    name: str
    status: str
    classes: list[int]
    params_deployable: int
    params_training: int
    train_seconds: float
    model: BaselineModel | None = None
    reason: str = ""
    source_model: str = ""                       # finetune: the original model that was tuned
    metrics: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ConfigError(f"baseline status must be one of {STATUSES}, got {self.status!r}")
        if self.status == "ok" and self.model is None:
            raise ConfigError(f"baseline {self.name}: an 'ok' result needs a model")
        if self.status == "failed" and not self.reason:
            raise ConfigError(f"baseline {self.name}: a failed result needs a reason")

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def predict(self, raw: Any) -> np.ndarray:
        """Global class ids of ``raw`` (images (N,32,32,3) uint8 or a list of texts)."""
        if self.model is None:
            raise DataError(f"baseline {self.name} failed ({self.reason}); it has no model")
        return self.model.predict(raw)

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "reason": self.reason,
                "classes": self.classes, "source_model": self.source_model,
                "params_deployable": self.params_deployable, "params_training": self.params_training,
                "train_seconds": self.train_seconds, "metrics": dict(self.metrics),
                "config": dict(self.config)}


# ------------------------------------------------------------------------------ helpers
def as_config(config: Any, cls: type[Config]) -> Config:
    """None -> defaults; a dict -> parsed; an instance of ``cls`` -> itself."""
    if config is None:
        return cls()
    if isinstance(config, cls):
        return config
    if isinstance(config, dict):
        return cls.from_dict(config)
    raise ConfigError(f"expected a {cls.__name__} (or a dict of its fields), got {type(config).__name__}")


def image_views(raw: np.ndarray, views: int, seed: int) -> list[np.ndarray]:
    """The raw images and ``views - 1`` augmented copies (crop + flip), as uint8 images."""
    out = [raw]
    if views > 1:
        gen = torch.Generator().manual_seed(seed)
        base = torch.as_tensor(raw).permute(0, 3, 1, 2).float()
        for _ in range(views - 1):
            aug = augment_images(base, gen).permute(0, 2, 3, 1).round().clamp(0, 255)
            out.append(aug.to(torch.uint8).numpy())
    return out


def take(raw: Any, idx: np.ndarray | list[int]) -> Any:
    """Rows ``idx`` of an image array or a list of texts."""
    idx = np.asarray(idx, dtype=np.int64)
    return raw[idx] if isinstance(raw, np.ndarray) else [raw[i] for i in idx]


def batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A shuffled split of range(n); a last batch of one joins the previous one, since
    BatchNorm cannot train on a single sample."""
    order = torch.randperm(n, generator=generator)
    out = [order[s:s + batch_size] for s in range(0, n, batch_size)]
    if len(out) > 1 and len(out[-1]) == 1:
        last = out.pop()          # popped first: in `out[-2] = cat([out[-2], out.pop()])` the
        out[-1] = torch.cat([out[-1], last])    # target index is taken after the pop
    return out


@torch.no_grad()
def frozen_features(extractor: nn.Module, spec: InputSpec, raw: Any, batch_size: int = 512) -> torch.Tensor:
    """Features of a frozen extractor in eval mode (its training mode is restored after)."""
    was = extractor.training
    extractor.eval()
    try:
        out = [extractor(spec.encode(raw[i:i + batch_size])) for i in range(0, len(raw), batch_size)]
    finally:
        extractor.train(was)
    return torch.cat(out)


def rms_scale(features: torch.Tensor) -> torch.Tensor:
    """1 / RMS of a feature block, so concatenated blocks start on one scale (as in packing)."""
    return 1.0 / features.pow(2).mean().sqrt().clamp_min(1e-6)


def make_head(in_dim: int, n_classes: int, hidden: int) -> nn.Module:
    """A linear head, or a one-hidden-layer MLP when ``hidden`` > 0."""
    if hidden <= 0:
        return nn.Linear(in_dim, n_classes)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))


def fit_head(x: torch.Tensor, y: torch.Tensor, n_classes: int, hidden: int, epochs: int, lr: float,
             weight_decay: float, batch_size: int, seed: int) -> tuple[nn.Module, float]:
    """Train a head on cached features with Adam + cross-entropy; returns it and the last loss."""
    torch.manual_seed(seed)
    head = make_head(x.shape[1], n_classes, hidden)
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    ce = nn.CrossEntropyLoss()
    loss = torch.tensor(float("nan"))
    for _ in range(epochs):
        for idx in batches(x.shape[0], batch_size, gen):
            loss = ce(head(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for p in head.parameters():
        p.requires_grad_(False)
    return head.eval(), loss.item()


def binomial_sf(successes: int, trials: int, p: float) -> float:
    """P[Binomial(trials, p) >= successes]: how likely chance alone scores this well."""
    if successes <= 0:
        return 1.0
    return float(min(1.0, sum(math.comb(trials, i) * p ** i * (1 - p) ** (trials - i)
                              for i in range(successes, trials + 1))))


def finite(value: float) -> bool:
    return math.isfinite(value)

