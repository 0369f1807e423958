"""Pack fragments into one classifier for a class set (method notes section 3).

``F(x) = Enc(concat_c F^c(x))``; one decoder Dec_c per fragment; a new head H^K over the class
set; ``L_K = E_{c, (x, y) in D_c}[CE(H^K(F(x)), y) + delta * ||Dec_c(F(x)) - F^c(x)||^2]``.
Fragments are frozen, so their features are computed once per sample (and per cached augmented
view) and only the small layers train.
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

from snp_ray.data.augment import augment_images
from snp_ray.errors import ConfigError, DataError
from snp_ray.packing.config import PackConfig
from snp_ray.packing.model import PackedModel, PackSpec
from snp_ray.packing.samples import PackSamples, class_weights
from snp_ray.runtime import resolve_precision
from snp_ray.slicing.fragment import Fragment

log = logging.getLogger(__name__)


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
             warm_start: PackedModel | None = None, cv_folds: int = 0) -> PackedModel:
        """Train Enc, decoders and head for ``classes`` (global ids, head order) on ``samples``.

        ``warm_start``: reuse Enc columns, decoders and head rows of fragments and classes that
        the earlier pack already had (plug-and-play add or remove without reslicing).
        ``cv_folds`` > 1: also estimate the pack's accuracy from the few-shot samples alone, by
        stratified cross-validation. Each fold's copy (scales, Enc, decoders, head) trains on the
        other folds' samples and their augmented views, in the same steps as the pack itself (the
        copies are stacked, so the estimate costs little more than the pack), and is scored on its
        own samples' plain view. The result is in ``spec.metrics`` (``cv_accuracy``, ...).
        """
        cfg = self.cfg
        targets, y, raw = self._check(fragments, samples, classes)
        t0 = time.perf_counter()
        # The pack's own generator, never the global RNG: the service builds packs from
        # concurrent threads, and a content-addressed pack id must name the same weights
        # whatever else runs (same draws as the former torch.manual_seed(cfg.seed) stream)
        gen = torch.Generator().manual_seed(cfg.seed)
        feats, y_all = self._cached_features(fragments, raw, y)
        n, dims = len(y), [f.spec.feature_dim for f in fragments]
        fold_of = _folds(y, len(classes), cv_folds, cfg.seed)
        folds = 0 if fold_of is None else int(fold_of.max()) + 1
        uses = [torch.ones(n, dtype=torch.bool)] + [fold_of != k for k in range(folds)]
        scales = [_scales([f[:n][u] for f in feats], int(u.sum())) for u in uses]
        mods = []
        for i in range(len(uses)):
            enc = _linear(sum(dims), cfg.hidden, gen)
            head = _linear(cfg.hidden, len(classes), gen)
            decoders = nn.ModuleList(_linear(cfg.hidden, d, gen) for d in dims)
            if warm_start is not None:
                _warm(warm_start, fragments, classes, enc, head, decoders)
            mods.append((enc, head, decoders))
        z = torch.stack([torch.cat([f * sc for f, sc in zip(feats, s)], 1) for s in scales])
        nonneg = torch.cat([torch.full((d,), bool((f >= 0).all())) for d, f in zip(dims, feats)])
        views = len(y_all) // n
        bf16 = self._fit(z, torch.stack([u.repeat(views) for u in uses]), y_all,
                         torch.tensor(targets), dims, nonneg, mods)
        metrics = {"pack_seconds": time.perf_counter() - t0, "train_samples": float(n),
                   "train_bf16": float(bf16)}
        if folds:
            correct = 0
            with torch.no_grad():
                for k in range(folds):
                    enc, head, _ = mods[k + 1]
                    held = fold_of == k
                    correct += int((head(torch.relu(enc(z[k + 1][:n][held]))).argmax(1)
                                    == y[held]).sum())
            metrics |= {"cv_accuracy": correct / n, "cv_folds": float(folds)}
        enc, head, decoders = mods[0]
        names = [samples.class_names.get(c, str(c)) for c in classes]
        spec = PackSpec(class_ids=list(classes), class_names=names,
                        fragments=[f.spec.to_dict() for f in fragments], fragment_targets=targets,
                        hidden=cfg.hidden, config=cfg.to_dict(), dataset=samples.dataset,
                        metrics=metrics)
        model = PackedModel(spec, fragments, scales[0], enc.eval(), head.eval(), decoders.eval())
        for p in model.parameters():
            p.requires_grad_(False)
        if cfg.share_tables:
            model.share_tables()
        log.info("packed %d fragments for %s in %.2fs", len(fragments), names,
                 metrics["pack_seconds"])
        return model

    def cross_validate(self, fragments: list[Fragment], samples: PackSamples, classes: list[int],
                       folds: int = 3) -> dict[str, Any]:
        """Only the few-shot accuracy estimate of :meth:`pack` (see ``cv_folds`` there)."""
        t0 = time.perf_counter()
        m = self.pack(fragments, samples, classes, cv_folds=folds).spec.metrics
        if "cv_accuracy" not in m:
            return {"accuracy": None, "folds": 0, "samples": int(m["train_samples"]),
                    "seconds": time.perf_counter() - t0, "method": CV_NONE}
        return {"accuracy": m["cv_accuracy"], "folds": int(m["cv_folds"]),
                "samples": int(m["train_samples"]), "seconds": time.perf_counter() - t0,
                "method": cv_method(int(m["cv_folds"]))}

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

    def _fit(self, z: torch.Tensor, use: torch.Tensor, y_all: torch.Tensor, serves: torch.Tensor,
             dims: list[int], nonneg: torch.Tensor,
             mods: list[tuple[nn.Linear, nn.Linear, nn.ModuleList]]) -> bool:
        """Train M stacked copies of (Enc, decoders, head) in place, in the same steps: copy i
        sees scaled features ``z[i]`` and learns only from the rows where ``use[i]`` holds
        (losses summed over copies, so their gradients stay apart). Returns whether the steps
        ran in bf16."""
        cfg = self.cfg
        # All decoders as one Linear: its output is the concatenation of every Dec_c's, so one
        # matmul replaces a loop over fragments. ``seg`` averages each fragment's slice of the
        # squared error; ``mine`` keeps Dec_c's term only on samples of class c (the same loss).
        # One difference from per-decoder optimisers: in a batch with no sample of class c, Dec_c
        # still gets Adam's momentum and weight decay (a zero gradient, not a skipped step); at
        # batch 256 over k·8 views per class such a batch practically never occurs.
        def stack(get) -> torch.Tensor:
            return torch.stack([get(m).detach() for m in mods]).clone().requires_grad_()
        we, be = stack(lambda m: m[0].weight), stack(lambda m: m[0].bias)       # (M, H, D), (M, H)
        wh, bh = stack(lambda m: m[1].weight), stack(lambda m: m[1].bias)       # (M, C, H), (M, C)
        wd = stack(lambda m: torch.cat([d.weight for d in m[2]]))              # (M, ΣD, H)
        bd = stack(lambda m: torch.cat([d.bias for d in m[2]]))                # (M, ΣD)
        seg = torch.zeros(sum(dims), len(dims))
        bounds = np.cumsum([0] + dims)
        for j in range(len(dims)):
            seg[bounds[j]:bounds[j + 1], j] = 1.0 / dims[j] if cfg.recon == "mean" else 1.0
        # Dec_c = Linear + activation, the activation matching the range of F^c (``nonneg``):
        # ReLU for fragments whose features are never negative (conv nets), none for signed ones
        # (a GRU's tanh states), which a ReLU decoder could not reconstruct
        mine_all = (y_all[:, None] == serves[None, :]).float()        # (samples, fragments)
        weight = (torch.tensor(class_weights(y_all.numpy(), int(y_all.max()) + 1),
                               dtype=torch.float32) if cfg.balance == "class"
                  else torch.ones(len(y_all)))
        opt = torch.optim.Adam([we, be, wh, bh, wd, bd], lr=cfg.lr, weight_decay=cfg.weight_decay)
        gen = torch.Generator().manual_seed(cfg.seed)
        n, copies = z.shape[1], len(mods)
        # bf16 autocast halves the step time on CPUs with native bf16 (the model stays fp32)
        bf16 = resolve_precision(cfg.precision, torch.device("cpu")) == "bf16"
        for _ in range(cfg.epochs):
            order = torch.randperm(n, generator=gen)
            for s in range(0, n, cfg.batch_size):
                idx = order[s:s + cfg.batch_size]
                zb, m = z[:, idx], use[:, idx].float()                # (M, B, D), (M, B)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    h = torch.relu(torch.baddbmm(be[:, None], zb, we.transpose(1, 2)))
                    logits = torch.baddbmm(bh[:, None], h, wh.transpose(1, 2)).float()
                    ce = nn.functional.cross_entropy(logits.flatten(0, 1), y_all[idx].repeat(copies),
                                                     reduction="none").view(copies, -1)
                    loss = (ce * m * weight[idx]).sum() / len(idx)
                    if cfg.delta > 0:
                        def dec_all(hh: torch.Tensor) -> torch.Tensor:
                            return torch.baddbmm(bd[:, None], hh, wd.transpose(1, 2))
                        loss = loss + cfg.delta * reconstruction(
                            h, zb, dec_all, seg, mine_all[idx][None] * m[..., None], nonneg)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        with torch.no_grad():                   # back to modules: one Dec_c per fragment
            for i, (enc, head, decoders) in enumerate(mods):
                enc.weight.copy_(we[i]), enc.bias.copy_(be[i])
                head.weight.copy_(wh[i]), head.bias.copy_(bh[i])
                for j, d in enumerate(decoders):
                    d.weight.copy_(wd[i, bounds[j]:bounds[j + 1]])
                    d.bias.copy_(bd[i, bounds[j]:bounds[j + 1]])
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


CV_NONE = "not estimated: a class has fewer than 2 few-shot samples"


def cv_method(folds: int) -> str:
    return f"stratified {folds}-fold cross-validation on the few-shot samples"


def _folds(y: torch.Tensor, classes: int, folds: int, seed: int) -> torch.Tensor | None:
    """A seeded, stratified fold number per sample (None: no cross-validation possible)."""
    folds = min(folds, int(np.bincount(y.numpy(), minlength=classes).min()))
    if folds < 2:
        return None
    gen = torch.Generator().manual_seed(seed + 2)
    fold_of = torch.empty(len(y), dtype=torch.long)
    for c in range(classes):                   # stratified: each class spread over the folds
        idx = torch.nonzero(y == c).flatten()
        fold_of[idx[torch.randperm(len(idx), generator=gen)]] = torch.arange(len(idx)) % folds
    return fold_of


def _linear(n_in: int, n_out: int, gen: torch.Generator) -> nn.Linear:
    """``nn.Linear(n_in, n_out)`` with its default init drawn from ``gen``: built without init
    (``skip_init``), so constructing it does not draw from (or advance) the global RNG."""
    layer = torch.nn.utils.skip_init(nn.Linear, n_in, n_out)
    with torch.no_grad():   # nn.Linear.reset_parameters, from the pack's generator
        nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=gen)
        bound = 1 / math.sqrt(n_in) if n_in > 0 else 0.0
        nn.init.uniform_(layer.bias, -bound, bound, generator=gen)
    return layer


def _scales(feats: list[torch.Tensor], n: int) -> torch.Tensor:
    """One fixed scale per fragment: 1 / RMS of its features on the plain view of the samples."""
    return torch.stack([1.0 / f[:n].pow(2).mean().sqrt().clamp_min(1e-6) for f in feats])


def reconstruction(h: torch.Tensor, zb: torch.Tensor, dec_all: nn.Linear, seg: torch.Tensor,
                   mine: torch.Tensor, nonneg: torch.Tensor) -> torch.Tensor:
    """Σ_c Σ_{x of class c} ||Dec_c(h) − F^c(x)||² · seg / batch, for all decoders at once (and
    for stacked copies: leading dims of ``h``, ``zb`` and ``mine`` are summed over).

    ``seg`` maps dims to fragments (1/d_c: the mean over a fragment's dims; 1: the notes' squared
    norm); ``nonneg`` marks the dims whose decoder ends in ReLU (the others are linear)."""
    out = dec_all(h).float()
    out = torch.where(nonneg, torch.relu(out), out)
    err = (out - zb).pow(2) @ seg  # (batch, fragments)
    return (err * mine).sum() / h.shape[-2]


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
