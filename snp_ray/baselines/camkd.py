"""CA-MKD baseline (Zhang, Chen & Wang, ICASSP 2022): confidence-aware multi-teacher distillation.

A student (the teachers' architecture and width, fresh init by default, as in CA-MKD) learns the
target classes from their few-shot samples with

    L = gamma * CE(student, y) + alpha * L_KD + beta * L_inter

* ``L_KD``: per teacher, KL(teacher || student) at temperature T (times T^2), weighted per
  sample by the teacher's confidence. CA-MKD's weight is ``(1 - softmax_k(CE_k)) / (K - 1)``,
  CE_k = cross-entropy of teacher k's prediction w.r.t. the true label; the sum over samples and
  teachers is divided by batch * K, as the authors' code does.
* ``L_inter``: the student's penultimate features, through one linear regressor per teacher,
  regress the teacher's penultimate features (MSE), weighted the same way, with the CE taken from
  the teacher's head applied to the regressed student features (as in CA-MKD); off in epoch 1.

Adaptation to the market (teachers hold other classes than the target set):
* a teacher can only judge samples of target classes it holds. For a sample of class y, the
  teachers holding y share the weight by the CA-MKD formula (one holder: weight 1); the others
  get weight 0 (their CE w.r.t. y is undefined);
* label mapping (``kd_mapping``): "restrict" renormalises teacher and student over the target
  classes the teacher holds. That is vacuous when a teacher holds a single target class (every
  T1-T5 request), so the default "rest" adds one bin: the teacher's mass on its non-target
  classes against the student's mass on the target classes the teacher does not hold (both are
  "not one of my target classes"). Without such student classes it falls back to "restrict".

Failure (the paper reports CA-MKD as "(failed)" where samples are too few): decided on the
few-shot data alone, before the final training. The run fails when a target class has fewer
than ``min_per_class`` samples, when training diverges (non-finite loss), or when stratified
``cv_folds``-fold cross-validation of the very same recipe on the few-shot samples cannot show
that the student learned anything: pooled held-out accuracy below chance + ``cv_margin``, or a
one-sided binomial test against chance with p > ``cv_alpha`` (:func:`failure_rule`). Chance = the
largest class share.
Optionally (``min_samples``, off by default) it also fails with fewer target samples than that:
the authors' training loop skips batches smaller than its batch size (64), so with 64 it takes
no step at all. The S&P paper's Table 2 reports "(failed)" exactly where k * |C| < 64, plus
one more cell (T2, VGG16, k=20).
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from snp_ray.baselines.common import (BaselineResult, SingleModel, TaskData, as_config, batches,
                                      binomial_sf, check_image, finite, frozen_features,
                                      image_views, load_task)
from snp_ray.config import Config, check_range
from snp_ray.data.specs import ImageSpec, InputSpec
from snp_ray.errors import ConfigError
from snp_ray.market.market import Market
from snp_ray.market.training import warmup_cosine
from snp_ray.models import Classifier, build_model, channels_last_safe, count_params

log = logging.getLogger(__name__)

WEIGHTINGS = ("camkd", "softmax")
MAPPINGS = ("rest", "restrict")


@dataclass
class CAMKDConfig(Config):
    epochs: int = 60             # passes over the training samples (one cached view per pass)
    batch_size: int = 64
    lr: float = 0.05             # SGD, Nesterov momentum 0.9, warm-up + cosine (as CA-MKD)
    weight_decay: float = 5e-4
    temperature: float = 4.0
    gamma: float = 1.0           # CE weight (CA-MKD -r)
    alpha: float = 1.0           # KD weight (-a)
    beta: float = 50.0           # intermediate-feature weight (-b); 0 turns it off
    weighting: str = "camkd"     # camkd: (1 - softmax(CE)) / (K - 1); softmax: softmax(-CE)
    kd_mapping: str = "rest"     # rest | restrict (module docstring)
    views: int = 8               # cached augmented views; teachers run once per view
    init_from: int = -1          # -1: fresh student; i: start from task model i (its spec too)
    cv_folds: int = 3            # failure test: stratified folds over the few-shot samples
    cv_alpha: float = 0.05       # ... binomial p-value above this: failed
    cv_margin: float = 0.1       # ... held-out accuracy below chance + margin: failed
    min_per_class: int = 2       # fewer samples of a class: failed (nothing to validate on)
    min_samples: int = 0         # fewer target samples in all: failed (0: off; 64 mimics the
                                 # authors' loop, which skips batches smaller than 64)
    seed: int = 0

    def validate(self) -> None:
        n = "CAMKDConfig"
        check_range(n, "epochs", self.epochs, 1, 100_000)
        check_range(n, "batch_size", self.batch_size, 2, 1 << 20)
        check_range(n, "lr", self.lr, 0.0, 10.0, lo_open=True)
        check_range(n, "weight_decay", self.weight_decay, 0.0, 1.0)
        check_range(n, "temperature", self.temperature, 0.0, 100.0, lo_open=True)
        for f in ("gamma", "alpha", "beta"):
            check_range(n, f, getattr(self, f), 0.0, 1e4)
        check_range(n, "views", self.views, 1, 256)
        check_range(n, "init_from", self.init_from, -1, 1 << 16)
        check_range(n, "cv_folds", self.cv_folds, 2, 100)
        check_range(n, "cv_alpha", self.cv_alpha, 0.0, 1.0)
        check_range(n, "cv_margin", self.cv_margin, 0.0, 1.0)
        check_range(n, "min_per_class", self.min_per_class, 2, 1 << 16)
        check_range(n, "min_samples", self.min_samples, 0, 1 << 30)
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"{n}.weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.kd_mapping not in MAPPINGS:
            raise ConfigError(f"{n}.kd_mapping must be one of {MAPPINGS}, got {self.kd_mapping!r}")


# ------------------------------------------------------------------------------ label mapping
@dataclass
class TeacherMap:
    """Where a teacher's classes meet the target classes (indices, in target order)."""

    t_sel: list[int]            # teacher-local ids of the target classes it holds
    s_sel: list[int]            # the target positions of those classes
    t_rest: list[int]           # teacher-local ids of its classes outside the target set
    s_rest: list[int]           # target positions of the target classes it does not hold
    local_of_target: list[int]  # per target position: teacher-local id, or -1


def teacher_map(teacher_classes: list[int], target_classes: list[int]) -> TeacherMap:
    local = {int(c): i for i, c in enumerate(teacher_classes)}
    of_target = [local.get(int(c), -1) for c in target_classes]
    s_sel = [j for j, t in enumerate(of_target) if t >= 0]
    targets = {int(c) for c in target_classes}
    return TeacherMap(t_sel=[of_target[j] for j in s_sel], s_sel=s_sel,
                      t_rest=[i for i, c in enumerate(teacher_classes) if int(c) not in targets],
                      s_rest=[j for j, t in enumerate(of_target) if t < 0], local_of_target=of_target)


def mapped_kd(z_t: torch.Tensor, z_s: torch.Tensor, tmap: TeacherMap, temperature: float,
              mode: str = "rest") -> torch.Tensor:
    """Per-sample KL(teacher || student) * T^2 over the classes the teacher can speak for."""
    if not tmap.t_sel:
        return z_s.new_zeros(z_s.shape[0])
    t = temperature
    if mode == "rest" and tmap.s_rest:
        lp_full = F.log_softmax(z_t / t, 1)
        lq_full = F.log_softmax(z_s / t, 1)
        lp_rest = (torch.logsumexp(lp_full[:, tmap.t_rest], 1, keepdim=True) if tmap.t_rest
                   else lp_full.new_full((z_t.shape[0], 1), float("-inf")))
        lp = torch.cat([lp_full[:, tmap.t_sel], lp_rest], 1)
        lq = torch.cat([lq_full[:, tmap.s_sel], torch.logsumexp(lq_full[:, tmap.s_rest], 1, keepdim=True)], 1)
    elif mode in MAPPINGS:
        lp = F.log_softmax(z_t[:, tmap.t_sel] / t, 1)
        lq = F.log_softmax(z_s[:, tmap.s_sel] / t, 1)
    else:
        raise ConfigError(f"kd mapping must be one of {MAPPINGS}, got {mode!r}")
    p = lp.exp()
    terms = torch.where(p > 0, p * (lp - lq), torch.zeros_like(p))
    return terms.sum(1) * t * t


def teacher_ce(z_t: torch.Tensor, tmap: TeacherMap, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the teacher's prediction w.r.t. the true target label; +inf where the
    teacher does not hold the sample's class."""
    local = torch.tensor(tmap.local_of_target, dtype=torch.long)[y]
    held = local >= 0
    out = torch.full((y.shape[0],), float("inf"), dtype=z_t.dtype)
    if bool(held.any()):
        out[held] = F.cross_entropy(z_t[held], local[held], reduction="none")
    return out


def teacher_weights(ce: torch.Tensor, mode: str = "camkd") -> torch.Tensor:
    """(K, B) per-sample teacher weights from (K, B) CEs (+inf: the teacher cannot judge).

    camkd: ``(1 - softmax_k(CE_k)) / (K_y - 1)`` over the K_y teachers holding the label (a
    lone holder gets 1); softmax: ``softmax_k(-CE_k)``. Non-holders get 0; each column sums to 1.
    """
    held = torch.isfinite(ce)
    n_held = held.sum(0)
    if mode == "softmax":
        w = torch.softmax(torch.where(held, -ce, torch.full_like(ce, float("-inf"))), 0)
    elif mode == "camkd":
        s = torch.softmax(torch.where(held, ce, torch.full_like(ce, float("-inf"))), 0)
        w = torch.where(n_held > 1, (1.0 - s) / (n_held - 1).clamp_min(1), torch.ones_like(s))
    else:
        raise ConfigError(f"teacher weighting must be one of {WEIGHTINGS}, got {mode!r}")
    return torch.where(held, torch.nan_to_num(w), torch.zeros_like(w))


# ------------------------------------------------------------------------------ training
@dataclass
class _Cache:
    """Teacher outputs per cached view, computed once; the student's inputs per view."""

    xs: list[torch.Tensor]                  # per view: student inputs (N, ...)
    zt: list[list[torch.Tensor]]            # [teacher][view]: logits over the teacher's classes
    ft: list[list[torch.Tensor]]            # [teacher][view]: penultimate features
    w: list[torch.Tensor]                   # per view: (K, N) KD weights
    y: torch.Tensor
    maps: list[TeacherMap]


def _build_cache(data: TaskData, student_spec: InputSpec, cfg: CAMKDConfig) -> _Cache:
    views = image_views(data.samples.raw, cfg.views, cfg.seed + 1)
    y = data.y
    maps = [teacher_map(s.classes, data.classes) for s in data.specs]
    zt, ft = [], []
    for model, spec in zip(data.models, data.specs):
        feats = [frozen_features(model.features, spec.input_spec, v) for v in views]
        with torch.no_grad():
            zt.append([model.head(f) for f in feats])
        ft.append(feats)
    w = [teacher_weights(torch.stack([teacher_ce(zt[k][v], maps[k], y) for k in range(len(maps))]),
                         cfg.weighting) for v in range(len(views))]
    xs = [student_spec.encode(v) for v in views]
    return _Cache(xs, zt, ft, w, y, maps)


def _new_student(data: TaskData, cfg: CAMKDConfig) -> Classifier:
    n = len(data.classes)
    if cfg.init_from >= 0:
        student = copy.deepcopy(data.models[cfg.init_from])
        student.head = nn.Linear(student.feature_dim, n)
        student.num_classes = n
    else:
        s = data.specs[0]
        student = build_model(s.arch, n, s.width)
    for p in student.parameters():
        p.requires_grad_(True)
    return student


def _train(data: TaskData, cache: _Cache, rows: np.ndarray, cfg: CAMKDConfig, seed: int
           ) -> tuple[Classifier | None, nn.ModuleList, dict[str, float]]:
    """Distil on ``rows`` of the cache; the student is None when the loss stopped being finite."""
    torch.manual_seed(seed)
    student = _new_student(data, cfg)
    k_teachers = len(data.models)
    regressors = nn.ModuleList(nn.Linear(student.feature_dim, m.feature_dim) for m in data.models)
    fmt = torch.channels_last if channels_last_safe(student) else torch.contiguous_format
    student = student.to(memory_format=fmt)
    params = list(student.parameters()) + (list(regressors.parameters()) if cfg.beta > 0 else [])
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    rows_t = torch.as_tensor(rows, dtype=torch.long)
    per_epoch = len(batches(len(rows), cfg.batch_size, torch.Generator().manual_seed(0)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.epochs * per_epoch))
    heads = [m.head for m in data.models]
    stats = {"loss_ce": 0.0, "loss_kd": 0.0, "loss_inter": 0.0}
    student.train()
    for epoch in range(cfg.epochs):
        v = epoch % len(cache.xs)
        stats = {key: 0.0 for key in stats}
        for idx in batches(len(rows), cfg.batch_size, gen):
            r = rows_t[idx]
            bsz = len(r)
            yb = cache.y[r]
            feat = student.features(cache.xs[v][r].contiguous(memory_format=fmt))
            logits = student.head(feat)
            loss_ce = F.cross_entropy(logits, yb)
            wb = cache.w[v][:, r]
            kd = torch.stack([mapped_kd(cache.zt[k][v][r], logits, cache.maps[k], cfg.temperature,
                                        cfg.kd_mapping) for k in range(k_teachers)])
            loss_kd = (wb * kd).sum() / (bsz * k_teachers)
            loss = cfg.gamma * loss_ce + cfg.alpha * loss_kd
            loss_inter = torch.zeros(())
            if cfg.beta > 0 and epoch > 0:
                trans = [reg(feat) for reg in regressors]
                with torch.no_grad():
                    ce_i = torch.stack([teacher_ce(heads[k](trans[k]), cache.maps[k], yb)
                                        for k in range(k_teachers)])
                    wi = teacher_weights(ce_i, cfg.weighting)
                mse = torch.stack([(trans[k] - cache.ft[k][v][r]).pow(2).mean(1) for k in range(k_teachers)])
                loss_inter = (wi * mse).sum() / (bsz * k_teachers)
                loss = loss + cfg.beta * loss_inter
            if not finite(loss.item()):
                log.info("CA-MKD: loss %s in epoch %d", loss.item(), epoch)
                return None, regressors, stats
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            for key, val in (("loss_ce", loss_ce), ("loss_kd", loss_kd), ("loss_inter", loss_inter)):
                stats[key] += val.item() * bsz / len(rows)
    student = student.to(memory_format=torch.contiguous_format).eval()
    for p in student.parameters():
        p.requires_grad_(False)
    return student, regressors, stats


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold id per sample: each class's samples dealt round-robin over the folds, seeded."""
    rng = np.random.default_rng(seed)
    out = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        out[idx] = np.arange(len(idx)) % folds
    return out


def feasibility(data: TaskData, cache: _Cache, cfg: CAMKDConfig) -> tuple[str, dict[str, float]]:
    """'' when the few-shot data show the recipe learns the task, else the reason it fails."""
    y = cache.y.numpy()
    counts = np.bincount(y, minlength=len(data.classes))
    if len(y) < cfg.min_samples:
        return (f"{len(y)} few-shot samples of the target classes, fewer than min_samples="
                f"{cfg.min_samples}"), {}
    if counts.min() < cfg.min_per_class:
        c = data.classes[int(counts.argmin())]
        return (f"{int(counts.min())} few-shot sample(s) of class {c}, fewer than "
                f"{cfg.min_per_class}: too few to train and validate a student"), {}
    folds = min(cfg.cv_folds, int(counts.min()))
    fold_of = stratified_folds(y, folds, cfg.seed)
    correct = 0
    for f in range(folds):
        train_rows, held = np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)
        student, _, _ = _train(data, cache, train_rows, cfg, cfg.seed + 100 + f)
        if student is None:
            return "training diverged (non-finite loss) in cross-validation", {}
        with torch.no_grad():
            pred = student(cache.xs[0][held]).argmax(1).numpy()
        correct += int((pred == y[held]).sum())
    n = len(y)
    chance = float(counts.max() / n)
    metrics = {"cv_accuracy": correct / n, "cv_pvalue": binomial_sf(correct, n, chance),
               "chance": chance, "cv_folds": float(folds), "cv_correct": float(correct),
               "cv_samples": float(n)}
    return failure_rule(correct, n, chance, folds, cfg), metrics


def failure_rule(correct: int, n: int, chance: float, folds: int, cfg: CAMKDConfig) -> str:
    """The cross-validation failure rule: '' when ``correct`` of ``n`` held-out predictions are
    clearly above ``chance`` (accuracy >= chance + ``cv_margin`` and one-sided binomial
    p <= ``cv_alpha``), else the reason the run fails. ``folds`` only enters the reason."""
    acc = correct / n
    pvalue = binomial_sf(correct, n, chance)
    if acc < chance + cfg.cv_margin or pvalue > cfg.cv_alpha:
        return (f"{folds}-fold cross-validated few-shot accuracy {acc:.3f} ({correct}/{n}) is not "
                f"clearly above chance {chance:.3f} (needs >= chance + {cfg.cv_margin} and "
                f"binomial p <= {cfg.cv_alpha}, got p = {pvalue:.3g}): too few samples")
    return ""


def distil(data: TaskData, cfg: CAMKDConfig) -> BaselineResult:
    """CA-MKD on a prepared request: feasibility first, then the student on all samples."""
    check_image(data, "CA-MKD", ("vgg", "resnet"))
    if cfg.init_from >= len(data.models):
        raise ConfigError(f"CAMKDConfig.init_from={cfg.init_from} but the task has {len(data.models)} models")
    if cfg.init_from < 0 and len({(s.arch, s.width) for s in data.specs}) > 1:
        log.info("CA-MKD: teachers differ in architecture; the student takes %s's", data.ids[0])
    t0 = time.perf_counter()
    spec = (data.specs[cfg.init_from].input_spec if cfg.init_from >= 0
            else ImageSpec.fit(data.samples.raw))
    cache = _build_cache(data, spec, cfg)
    probe = _new_student(data, cfg)
    regs = sum(probe.feature_dim * m.feature_dim + m.feature_dim for m in data.models)
    deploy = count_params(probe)
    training = deploy + (regs if cfg.beta > 0 else 0) + sum(count_params(m) for m in data.models)
    reason, metrics = feasibility(data, cache, cfg)
    student = None
    if not reason:
        student, _, stats = _train(data, cache, np.arange(len(cache.y)), cfg, cfg.seed)
        metrics.update(stats)
        if student is None:
            reason = "training diverged (non-finite loss)"
    seconds = time.perf_counter() - t0
    if reason:
        log.info("CA-MKD failed for %s: %s", data.classes, reason)
        return BaselineResult("ca-mkd", "failed", list(data.classes), deploy, training, seconds,
                              reason=reason, metrics=metrics, config=cfg.to_dict())
    with torch.no_grad():
        metrics["fewshot_accuracy"] = float((student(cache.xs[0]).argmax(1) == cache.y).float().mean())
    return BaselineResult("ca-mkd", "ok", list(data.classes), deploy, training, seconds,
                          SingleModel(data.classes, student, spec), metrics=metrics,
                          config=cfg.to_dict())


def run_camkd(market: Market, task_models: list[str], target_classes: list[int], k: int,
              seed: int = 0, config: CAMKDConfig | dict | None = None) -> list[BaselineResult]:
    """One result; status 'failed' (with the reason) when the few-shot data cannot support it."""
    cfg = as_config(config, CAMKDConfig)
    return [distil(load_task(market, task_models, target_classes, k, seed), cfg)]
