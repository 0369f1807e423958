"""Pack fragments into one classifier for a class set (method notes section 3).

``F(x) = Enc(concat_c F^c(x))``; one decoder Dec_c per fragment; a new head H^K over the class
set; ``L_K = E_{c, (x, y) in D_c}[CE(H^K(F(x)), y) + delta * ||Dec_c(F(x)) - F^c(x)||^2]``.
Fragments are frozen, so their features are computed once per sample (and per cached augmented
view) and only the small layers train.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from snp_ray.data.fewshot import FewShotSet
from snp_ray.errors import ConfigError, DataError
from snp_ray.market.training import augment_images
from snp_ray.packing.config import PackConfig
from snp_ray.packing.model import PackedModel, PackSpec
from snp_ray.runtime import resolve_precision
from snp_ray.slicing.fragment import Fragment

log = logging.getLogger(__name__)


@dataclass
class PackSamples:
    """The few-shot samples a pack trains on: raw inputs and global labels."""

    dataset: str
    raw: np.ndarray | list[str]
    labels: np.ndarray
    class_names: dict[int, str]

    @classmethod
    def from_fewshot(cls, sets: list[FewShotSet], classes: list[int]) -> "PackSamples":
        """The rows of ``classes`` from each model's few-shot set, each row once."""
        datasets = {s.manifest.dataset for s in sets}
        if len(datasets) != 1:
            raise ConfigError(f"a pack draws on one dataset, got {sorted(datasets)}")
        seen: set[int] = set()
        raws, labels, names = [], [], {}
        for s in sets:
            for i, (row, label) in enumerate(zip(s.row_ids.tolist(), s.labels)):
                if int(label) in classes and row not in seen:
                    seen.add(row)
                    raws.append(s.raw[i])
                    labels.append(int(label))
            names.update(zip(s.classes, s.class_names))
        if not labels:
            raise DataError(f"no few-shot samples of classes {classes}")
        raw = np.stack(raws) if isinstance(raws[0], np.ndarray) else list(raws)
        return cls(datasets.pop(), raw, np.asarray(labels, dtype=np.int64), names)


def check_compatible(fragments: list[Fragment]) -> None:
    if not fragments:
        raise ConfigError("a pack needs at least one fragment")
    first = fragments[0].spec.input_spec
    for f in fragments[1:]:
        if not first.compatible_with(f.spec.input_spec):
            raise ConfigError(f"fragments with incompatible inputs cannot be packed together: "
                              f"{fragments[0].spec.source_model} takes {first.kind}, "
                              f"{f.spec.source_model} takes {f.spec.input_spec.kind}")


class Packer:
    def __init__(self, config: PackConfig | None = None):
        self.cfg = config or PackConfig()

    def pack(self, fragments: list[Fragment], samples: PackSamples, classes: list[int],
             warm_start: PackedModel | None = None) -> PackedModel:
        """Train Enc, decoders and head for ``classes`` (global ids, head order) on ``samples``.

        ``warm_start``: reuse Enc columns, decoders and head rows of fragments and classes that
        the earlier pack already had (plug-and-play add or remove without reslicing).
        """
        cfg = self.cfg
        targets, y, raw = self._check(fragments, samples, classes)
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed)
        feats, y_all = self._cached_features(fragments, raw, y)
        scales = _scales(feats, len(y))
        dims = [f.spec.feature_dim for f in fragments]
        enc = nn.Linear(sum(dims), cfg.hidden)
        head = nn.Linear(cfg.hidden, len(classes))
        decoders = nn.ModuleList(nn.Linear(cfg.hidden, d) for d in dims)
        if warm_start is not None:
            _warm(warm_start, fragments, classes, enc, head, decoders)
        zcat = torch.cat([f * s for f, s in zip(feats, scales)], 1)
        nonneg = torch.cat([torch.full((d,), bool((f >= 0).all())) for d, f in zip(dims, feats)])
        bf16 = self._fit(zcat, y_all, torch.tensor(targets), dims, nonneg, enc, head, decoders)
        seconds = time.perf_counter() - t0
        names = [samples.class_names.get(c, str(c)) for c in classes]
        spec = PackSpec(class_ids=list(classes), class_names=names,
                        fragments=[f.spec.to_dict() for f in fragments], fragment_targets=targets,
                        hidden=cfg.hidden, config=cfg.to_dict(), dataset=samples.dataset,
                        metrics={"pack_seconds": seconds, "train_samples": float(len(y)),
                                 "train_bf16": float(bf16)})
        model = PackedModel(spec, fragments, scales, enc.eval(), head.eval(), decoders.eval())
        for p in model.parameters():
            p.requires_grad_(False)
        log.info("packed %d fragments for %s in %.2fs", len(fragments), names, seconds)
        return model

    def cross_validate(self, fragments: list[Fragment], samples: PackSamples, classes: list[int],
                       folds: int = 3) -> dict[str, Any]:
        """A few-shot accuracy estimate of the pack that :meth:`pack` would make: stratified
        ``folds``-fold cross-validation on the same few-shot samples. Each fold packs (scales,
        Enc, decoders, head) on the other folds' samples and all their augmented views, and is
        scored on its own samples' plain view. Fragment features are computed once for all folds.
        No test data exists here: a market request only has its few-shot uploads."""
        cfg = self.cfg
        targets, y, raw = self._check(fragments, samples, classes)
        t0 = time.perf_counter()
        n = len(y)
        folds = min(folds, int(np.bincount(y.numpy(), minlength=len(classes)).min()))
        if folds < 2:
            return {"accuracy": None, "folds": 0, "samples": n, "seconds": 0.0,
                    "method": "not estimated: a class has fewer than 2 few-shot samples"}
        feats, y_all = self._cached_features(fragments, raw, y)
        views = len(y_all) // n
        gen = torch.Generator().manual_seed(cfg.seed + 2)
        fold_of = torch.empty(n, dtype=torch.long)
        for c in range(len(classes)):           # stratified: each class spread over the folds
            idx = torch.nonzero(y == c).flatten()
            fold_of[idx[torch.randperm(len(idx), generator=gen)]] = torch.arange(len(idx)) % folds
        dims = [f.spec.feature_dim for f in fragments]
        nonneg = torch.cat([torch.full((d,), bool((f >= 0).all())) for d, f in zip(dims, feats)])
        correct = 0
        for k in range(folds):
            held = fold_of == k
            train = (~held).repeat(views)
            scales = _scales([f[:n][~held] for f in feats], int((~held).sum()))
            zcat = torch.cat([f * s for f, s in zip(feats, scales)], 1)
            torch.manual_seed(cfg.seed)
            enc = nn.Linear(sum(dims), cfg.hidden)
            head = nn.Linear(cfg.hidden, len(classes))
            decoders = nn.ModuleList(nn.Linear(cfg.hidden, d) for d in dims)
            self._fit(zcat[train], y_all[train], torch.tensor(targets), dims, nonneg, enc, head,
                      decoders)
            with torch.no_grad():
                pred = head(torch.relu(enc(zcat[:n][held]))).argmax(1)
            correct += int((pred == y[held]).sum())
        return {"accuracy": correct / n, "folds": folds, "samples": n,
                "seconds": time.perf_counter() - t0,
                "method": f"stratified {folds}-fold cross-validation on the few-shot samples"}

    def _check(self, fragments: list[Fragment], samples: PackSamples, classes: list[int]
               ) -> tuple[list[int], torch.Tensor, Any]:
        """Validate a pack request; returns (fragment -> head row, labels as head rows, inputs)."""
        check_compatible(fragments)
        if len(set(classes)) != len(classes):
            raise ConfigError(f"duplicate classes in the pack request {classes}")
        targets = []
        for f in fragments:
            if f.spec.class_id not in classes:
                raise ConfigError(f"fragment of class {f.spec.class_id} is not in the pack {classes}")
            targets.append(classes.index(f.spec.class_id))
        missing = sorted(set(classes) - {f.spec.class_id for f in fragments})
        if missing:
            raise ConfigError(f"no fragment serves classes {missing}")
        keep = np.isin(samples.labels, classes)
        y = torch.tensor([classes.index(int(c)) for c in samples.labels[keep]])
        absent = sorted(set(range(len(classes))) - set(y.tolist()))
        if absent:
            raise DataError(f"no few-shot samples of classes {[classes[i] for i in absent]}")
        raw = samples.raw[keep] if isinstance(samples.raw, np.ndarray) else \
            [t for t, k in zip(samples.raw, keep) if k]
        return targets, y, raw

    def _fit(self, zcat: torch.Tensor, y_all: torch.Tensor, serves: torch.Tensor, dims: list[int],
             nonneg: torch.Tensor, enc: nn.Linear, head: nn.Linear, decoders: nn.ModuleList) -> bool:
        """Train Enc, the decoders and the head in place on scaled features; returns whether the
        steps ran in bf16."""
        cfg = self.cfg
        # All decoders as one Linear: its output is the concatenation of every Dec_c's, so one
        # matmul replaces a loop over fragments. ``seg`` averages each fragment's slice of the
        # squared error; ``mine`` keeps Dec_c's term only on samples of class c (the same loss).
        # One difference from per-decoder optimisers: in a batch with no sample of class c, Dec_c
        # still gets Adam's momentum and weight decay (a zero gradient, not a skipped step); at
        # batch 256 over k·8 views per class such a batch practically never occurs.
        dec_all = nn.Linear(cfg.hidden, sum(dims))
        with torch.no_grad():
            dec_all.weight.copy_(torch.cat([d.weight for d in decoders]))
            dec_all.bias.copy_(torch.cat([d.bias for d in decoders]))
        seg = torch.zeros(sum(dims), len(dims))
        bounds = np.cumsum([0] + dims)
        for j in range(len(dims)):
            seg[bounds[j]:bounds[j + 1], j] = 1.0 / dims[j] if cfg.recon == "mean" else 1.0
        # Dec_c = Linear + activation, the activation matching the range of F^c (``nonneg``):
        # ReLU for fragments whose features are never negative (conv nets), none for signed ones
        # (a GRU's tanh states), which a ReLU decoder could not reconstruct
        mine_all = (y_all[:, None] == serves[None, :]).float()        # (samples, fragments)
        params = list(enc.parameters()) + list(head.parameters()) + list(dec_all.parameters())
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        ce = nn.CrossEntropyLoss()
        gen = torch.Generator().manual_seed(cfg.seed)
        n = zcat.shape[0]
        # bf16 autocast halves the step time on CPUs with native bf16 (the model stays fp32)
        bf16 = resolve_precision(cfg.precision, torch.device("cpu")) == "bf16"
        for _ in range(cfg.epochs):
            order = torch.randperm(n, generator=gen)
            for s in range(0, n, cfg.batch_size):
                idx = order[s:s + cfg.batch_size]
                zb = zcat[idx]
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    h = torch.relu(enc(zb))
                    loss = ce(head(h).float(), y_all[idx])
                    if cfg.delta > 0:
                        loss = loss + cfg.delta * reconstruction(h, zb, dec_all, seg, mine_all[idx],
                                                                 nonneg)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        with torch.no_grad():                   # back to one Dec_c per fragment for the model
            for j, d in enumerate(decoders):
                d.weight.copy_(dec_all.weight[bounds[j]:bounds[j + 1]])
                d.bias.copy_(dec_all.bias[bounds[j]:bounds[j + 1]])
        return bf16

    @torch.no_grad()
    def _cached_features(self, fragments: list[Fragment], raw, y: torch.Tensor):
        """Fragment features of every sample (and augmented view), computed once."""
        views = [raw]
        if isinstance(raw, np.ndarray) and self.cfg.augment_views > 1:
            gen = torch.Generator().manual_seed(self.cfg.seed + 1)
            base = torch.as_tensor(raw).permute(0, 3, 1, 2).float()
            for _ in range(self.cfg.augment_views - 1):
                aug = augment_images(base, gen).permute(0, 2, 3, 1).round().clamp(0, 255)
                views.append(aug.to(torch.uint8).numpy())
        feats = [torch.cat([f(f.encode(v)) for v in views]) for f in fragments]
        return feats, y.repeat(len(views))


def _scales(feats: list[torch.Tensor], n: int) -> torch.Tensor:
    """One fixed scale per fragment: 1 / RMS of its features on the plain view of the samples."""
    return torch.stack([1.0 / f[:n].pow(2).mean().sqrt().clamp_min(1e-6) for f in feats])


def reconstruction(h: torch.Tensor, zb: torch.Tensor, dec_all: nn.Linear, seg: torch.Tensor,
                   mine: torch.Tensor, nonneg: torch.Tensor) -> torch.Tensor:
    """Σ_c Σ_{x of class c} ||Dec_c(h) − F^c(x)||² · seg / batch, for all decoders at once.

    ``seg`` maps dims to fragments (1/d_c: the mean over a fragment's dims; 1: the notes' squared
    norm); ``nonneg`` marks the dims whose decoder ends in ReLU (the others are linear)."""
    out = dec_all(h).float()
    out = torch.where(nonneg, torch.relu(out), out)
    err = (out - zb).pow(2) @ seg  # (batch, fragments)
    return (err * mine).sum() / h.shape[0]


def _warm(old: PackedModel, fragments: list[Fragment], classes: list[int], enc: nn.Linear,
          head: nn.Linear, decoders: nn.ModuleList) -> None:
    """Copy what the earlier pack learned for fragments and classes that carry over."""
    if old.enc.out_features != enc.out_features:
        raise ConfigError("warm start needs the same Enc width as the earlier pack")
    old_keys = [f.spec.key for f in old.fragments]
    old_offsets = np.cumsum([0] + [f.spec.feature_dim for f in old.fragments])
    off = 0
    with torch.no_grad():
        for j, f in enumerate(fragments):
            d = f.spec.feature_dim
            if f.spec.key in old_keys:
                i = old_keys.index(f.spec.key)
                enc.weight[:, off:off + d] = old.enc.weight[:, old_offsets[i]:old_offsets[i] + d]
                if old.decoders is not None:
                    decoders[j].load_state_dict(old.decoders[i].state_dict())
            else:
                enc.weight[:, off:off + d].mul_(0.1)  # a new fragment starts quiet
            off += d
        enc.bias.copy_(old.enc.bias)
        for r, c in enumerate(classes):
            if c in old.class_ids:
                i = old.class_ids.index(c)
                head.weight[r] = old.head.weight[i]
                head.bias[r] = old.head.bias[i]
