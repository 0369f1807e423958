"""Slice one (model, class) pair into a fragment: pooling, selection, adaption, combining, fusion.

The method (method notes section 2), on a traced copy of the model's feature extractor:

1. Ability pooling, per layer i on its own: fine-tune layer i's weights on
   ``||M'(x) - M(x)||^2`` over the whole few-shot set D plus ``alpha * ||Z_i^c||_2,1`` on D_c.
2. Selection: score units by their mean l2 norm on D_c; keep by threshold or rate.
3. Ability adaption, per layer: train the kept weights f_i, a linear repair l_i (dropped units
   from kept ones) and a binary head H on ``CE(H(M(x; f~_i)), y_c) + gamma * ||M(x; f-_i) - M(x)||^2``,
   where f~ rebuilds dropped units through the repair and f- takes them from the ORIGINAL layer.
4. Combining, i = 1..L: the same loss with layers 1..i replaced.
5. Fusion: each repair is folded into the next linear layer; dropped units are removed.

A "layer" is a group from :mod:`snp_ray.slicing.graph` (a residual join is one group). The
network is evaluated functionally, with per-group weight overrides, so one traced graph serves
the original, pooled, repaired (f~) and original-dropped (f-) networks without copies.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from snp_ray.data.fewshot import FewShotSet
from snp_ray.data.specs import InputSpec
from snp_ray.errors import DataError
from snp_ray.market.training import augment_images
from snp_ray.models import Classifier, channels_last_safe
from snp_ray.slicing.config import SliceConfig
from snp_ray.slicing.graph import SliceGraph, attach, trace
from snp_ray.slicing.handlers import handler_for
from snp_ray.slicing.surgery import Repair, fold_into_linear, shrink

log = logging.getLogger(__name__)


@dataclass
class _Tensor:
    """One producer tensor of a group: its full name, unit dim and the group's segment in it."""

    name: str            # full name in the traced graph
    attr: str            # attribute on the module
    module: nn.Module
    handler: object
    offset: int
    trainable: bool


@dataclass
class SliceOutcome:
    features: nn.Module                  # the physical fragment (eager, sliced, repairs fused)
    probe: nn.Linear                     # the binary head folded onto the fragment's features
    kept: dict[int, list[int]]
    group_names: dict[int, str]
    stage_seconds: dict[str, float]
    metrics: dict[str, float] = field(default_factory=dict)


def select_units(scores: torch.Tensor, mode: str, beta: float, min_units: int = 1) -> torch.Tensor:
    """Indices of kept units, ascending. Threshold: s/max(s) > 1-beta. Rate: top ceil(beta*u)."""
    u = scores.numel()
    if mode == "rate":
        n = max(min_units, math.ceil(beta * u))
    else:
        top = float(scores.max())
        rel = scores / top if top > 0 else torch.zeros_like(scores)
        n = max(min_units, int((rel > 1 - beta).sum()))
    n = min(n, u)
    order = torch.argsort(scores, descending=True, stable=True)
    return torch.sort(order[:n]).values


class Slicer:
    """Slices every class of one model; the traced graph and data are shared across classes."""

    def __init__(self, model: Classifier, input_spec: InputSpec, fewshot: FewShotSet,
                 config: SliceConfig):
        self.cfg = config
        self.model = model.eval()
        self.fewshot = fewshot
        self.x = input_spec.encode(fewshot.raw)
        self.labels = torch.as_tensor(fewshot.labels)
        self.is_image = self.x.dtype.is_floating_point and self.x.dim() == 4
        self.fmt = torch.contiguous_format
        if self.is_image and channels_last_safe(model):
            self.fmt = torch.channels_last
            self.x = self.x.contiguous(memory_format=self.fmt)
        self.graph: SliceGraph = trace(copy.deepcopy(model.features).eval(), self.x[:2])
        self.graph.module.eval()
        self.gates = attach(self.graph)
        self.head = model.head
        for p in list(self.graph.module.parameters()) + list(self.head.parameters()):
            p.requires_grad_(False)
        self.orig = {k: v.detach().clone() for k, v in self.graph.module.state_dict().items()}
        self.tensors: dict[int, list[_Tensor]] = {}
        params = dict(self.graph.module.named_parameters())
        for g in self.graph.groups:
            entries = []
            for mname, off in g.producers:
                mod = self.graph.module.get_submodule(mname)
                h = handler_for(mod)
                for t in h.out_tensors:
                    if getattr(mod, t, None) is not None:
                        full = f"{mname}.{t}"
                        entries.append(_Tensor(full, t, mod, h, off, full in params))
            self.tensors[g.id] = entries

    # ------------------------------------------------------------------ forward passes
    def _features(self, x: torch.Tensor, weights: dict[int, dict[str, torch.Tensor]],
                  repairs: dict[int, Repair], observe: Iterable[int] = ()) -> torch.Tensor:
        overrides = {name: t for ws in weights.values() for name, t in ws.items()}
        self.gates.repairs = repairs
        self.gates.observe = set(observe)
        self.gates.reset_records()
        try:
            return functional_call(self.graph.module, overrides, (x,), strict=False)
        finally:
            self.gates.repairs, self.gates.observe = {}, set()

    def _merged(self, gid: int, ft: dict[str, torch.Tensor], kept: torch.Tensor) -> dict[str, torch.Tensor]:
        """f-: kept units from the fine-tuned weights, dropped units from the original ones."""
        out = {}
        for t in self.tensors[gid]:
            full = self.orig[t.name]
            dim = t.handler.out_dim
            mask = torch.zeros(full.shape[dim], dtype=torch.bool)
            mask[t.handler.unit_positions(t.module, t.attr, t.offset + kept)] = True
            shape = [1] * full.dim()
            shape[dim] = -1
            out[t.name] = torch.where(mask.view(shape), ft[t.name], full)
        return out

    def _tilde(self, gid: int, ft: dict[str, torch.Tensor], kept: torch.Tensor) -> dict[str, torch.Tensor]:
        """f~: the fine-tuned weights as the sliced layer will run them (recurrent cuts applied)."""
        dropped = _complement(kept, self.graph.group(gid).size)
        return {t.name: t.handler.tilde_override(t.module, t.attr, ft[t.name], dropped)
                for t in self.tensors[gid]}

    @torch.no_grad()
    def original_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self._features(x, {}, {}))

    # ------------------------------------------------------------------ the algorithm
    def slice_class(self, class_id: int) -> SliceOutcome:
        if class_id not in self.fewshot.classes:
            raise DataError(f"class {class_id} is not a class of this model ({self.fewshot.classes})")
        cfg = self.cfg
        torch.manual_seed(cfg.seed * 7919 + int(class_id))
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + int(class_id))
        y_bin = (self.labels == class_id).long()
        n_pos = int(y_bin.sum())
        if n_pos == 0 or n_pos == len(y_bin):
            raise DataError(f"class {class_id} needs both positive and negative few-shot samples")
        weight = torch.tensor([len(y_bin) / (2.0 * (len(y_bin) - n_pos)), len(y_bin) / (2.0 * n_pos)])
        ce = nn.CrossEntropyLoss(weight=weight)
        groups = [g.id for g in self.graph.groups]
        times = {"pooling": 0.0, "adaption": 0.0, "combining": 0.0, "fusion": 0.0}
        feat_dim = self.head.in_features

        ft: dict[int, dict[str, torch.Tensor]] = {}
        kept: dict[int, torch.Tensor] = {}
        mats: dict[int, torch.Tensor] = {}
        heads: dict[int, nn.Linear] = {}

        # stage 1: every layer on its own
        for gid in groups:
            t0 = time.perf_counter()
            w = self._fresh(gid)
            self._pool(gid, w, y_bin, gen)
            scores = self._scores(gid, w, y_bin)
            kept[gid] = select_units(scores, cfg.mode, cfg.beta, cfg.min_units)
            times["pooling"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            mats[gid] = self._init_repair(gid, w, kept[gid])
            heads[gid] = nn.Linear(feat_dim, 2)
            self._adapt([gid], [gid], w_all={gid: w}, kept=kept, mats=mats, head=heads[gid],
                        y_bin=y_bin, ce=ce, gen=gen, epochs=cfg.adapt_epochs)
            ft[gid] = w
            times["adaption"] += time.perf_counter() - t0

        # stage 2: combine layer by layer from the front
        t0 = time.perf_counter()
        head = heads[groups[-1]]
        for i, gid in enumerate(groups):
            replaced = groups[: i + 1]
            train = replaced if cfg.combine_train == "all" else [gid]
            self._adapt(replaced, train, w_all=ft, kept=kept, mats=mats, head=head, y_bin=y_bin,
                        ce=ce, gen=gen, epochs=cfg.combine_epochs)
        times["combining"] = time.perf_counter() - t0

        # fusion
        t0 = time.perf_counter()
        repairs = self._repairs(kept, mats)
        features = self.fused_features(ft, kept, repairs)
        probe = fold_into_linear(copy.deepcopy(head), self.graph, repairs, kept)
        times["fusion"] = time.perf_counter() - t0
        outcome = SliceOutcome(features, probe, {g: kept[g].tolist() for g in groups},
                               {g.id: g.producers[0][0] for g in self.graph.groups}, times)
        self._last = (ft, kept, repairs)
        outcome.metrics = self._fewshot_metrics(features, probe, y_bin, ft, repairs)
        return outcome

    def _fresh(self, gid: int) -> dict[str, torch.Tensor]:
        return {t.name: self.orig[t.name].clone().requires_grad_(t.trainable) for t in self.tensors[gid]}

    def _batches(self, gen: torch.Generator, epochs: int):
        n = self.x.shape[0]
        bs = self.cfg.batch_size
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen)
            for s in range(0, n, bs):
                idx = order[s:s + bs]
                xb = self.x[idx]
                if self.cfg.augment and self.is_image:
                    xb = augment_images(xb, gen).contiguous(memory_format=self.fmt)
                yield idx, xb

    def _pool(self, gid: int, w: dict[str, torch.Tensor], y_bin: torch.Tensor, gen) -> None:
        cfg = self.cfg
        params = [t for t in w.values() if t.requires_grad]
        if cfg.pool_epochs == 0 or not params:
            return
        opt = torch.optim.Adam(params, lr=cfg.lr_layer)
        size = self.graph.group(gid).size
        for idx, xb in self._batches(gen, cfg.pool_epochs):
            target = self.original_logits(xb)
            feats = self._features(xb, {gid: w}, {}, observe=[gid])
            loss = (self.head(feats) - target).pow(2).sum(1).mean()
            pos = y_bin[idx].bool()
            if cfg.alpha > 0 and bool(pos.any()):
                z = self.gates.unit_norms(gid)[pos]
                l21 = z.sum(1).mean() / (size if cfg.l21_reduce == "mean" else 1)
                loss = loss + cfg.alpha * l21
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    @torch.no_grad()
    def _scores(self, gid: int, w: dict[str, torch.Tensor], y_bin: torch.Tensor) -> torch.Tensor:
        xc = self.x[y_bin.bool()]
        self._features(xc, {gid: w}, {}, observe=[gid])
        return self.gates.unit_norms(gid).mean(0)

    @torch.no_grad()
    def _init_repair(self, gid: int, w: dict[str, torch.Tensor], kept: torch.Tensor) -> torch.Tensor:
        size = self.graph.group(gid).size
        dropped = _complement(kept, size)
        if dropped.numel() == 0 or self.cfg.repair_init == "zeros":
            return torch.zeros(dropped.numel(), kept.numel())
        acts = self._group_activations(gid, w)
        zk, zd = acts[:, kept], acts[:, dropped]
        sol = torch.linalg.lstsq(zk.double(), zd.double(), driver="gelsd").solution  # (k, d)
        return sol.t().float().contiguous()

    def _group_activations(self, gid: int, w: dict[str, torch.Tensor], limit: int = 20_000) -> torch.Tensor:
        """Unit vectors of the group at every gate position on D, as rows (n_positions, units)."""
        captured: list[torch.Tensor] = []
        gates = [m for m in self.graph.module.modules() if hasattr(m, "segments")]
        hooks = []
        for gate in gates:
            for g, off, size in gate.segments:
                if g == gid:
                    def hook(mod, inp, out, off=off, size=size):
                        seg = inp[0].narrow(mod.dim, off, size).movedim(mod.dim, -1)
                        captured.append(seg.reshape(-1, size))
                    hooks.append(gate.register_forward_hook(hook))
        try:
            self._features(self.x, {gid: w}, {})
        finally:
            for h in hooks:
                h.remove()
        rows = torch.cat(captured)
        if rows.shape[0] > limit:
            rows = rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(0))[:limit]]
        return rows

    def _repairs(self, kept: dict[int, torch.Tensor], mats: dict[int, torch.Tensor]) -> dict[int, Repair]:
        out = {}
        for gid, k in kept.items():
            d = _complement(k, self.graph.group(gid).size)
            if d.numel():
                out[gid] = (k, d, mats[gid])
        return out

    def _adapt(self, replaced: list[int], train: list[int], w_all, kept, mats, head: nn.Linear,
               y_bin: torch.Tensor, ce: nn.Module, gen, epochs: int) -> None:
        cfg = self.cfg
        if epochs == 0:
            return
        layer_params = [t for g in train for t in w_all[g].values() if t.requires_grad]
        for g in train:
            mats[g] = mats[g].detach().clone().requires_grad_(True)
        repair_params = [mats[g] for g in train if mats[g].numel()] + list(head.parameters())
        opt = torch.optim.Adam([{"params": layer_params, "lr": cfg.lr_layer},
                                {"params": repair_params, "lr": cfg.lr_repair}])
        for idx, xb in self._batches(gen, epochs):
            weights = {g: self._tilde(g, w_all[g], kept[g]) for g in replaced}
            feats = self._features(xb, weights, self._repairs({g: kept[g] for g in replaced}, mats))
            loss = ce(head(feats), y_bin[idx])
            if cfg.gamma > 0:
                target = self.original_logits(xb)
                merged = {g: self._merged(g, w_all[g], kept[g]) for g in replaced}
                bar = self.head(self._features(xb, merged, {}))
                loss = loss + cfg.gamma * (bar - target).pow(2).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        for g in train:
            mats[g] = mats[g].detach()

    # ------------------------------------------------------------------ fusion and checks
    def fused_features(self, ft, kept, repairs) -> nn.Module:
        features = copy.deepcopy(self.model.features).eval()
        state = features.state_dict()
        for ws in ft.values():
            for name, t in ws.items():
                state[name] = t.detach().clone()
        features.load_state_dict(state)
        shrink(features, self.graph, kept, repairs)
        for p in features.parameters():
            p.requires_grad_(False)
        return features

    @torch.no_grad()
    def repaired_features(self, x: torch.Tensor) -> torch.Tensor:
        """The unfused, repaired network of the last slice, restricted to its kept output units."""
        ft, kept, repairs = self._last
        feats = self._features(x, {g: self._tilde(g, w, kept[g]) for g, w in ft.items()}, repairs)
        idx = torch.cat([off + kept[g] for g, off, _ in self.graph.output_layout])
        return feats.index_select(1, idx)

    @torch.no_grad()
    def _fewshot_metrics(self, features, probe, y_bin, ft, repairs) -> dict[str, float]:
        """Few-shot-only diagnostics: probe AUC on D and the f- network's fidelity to M."""
        features.eval()
        scores = torch.softmax(probe(features(self.x)), 1)[:, 1]
        target = self.original_logits(self.x)
        kept = self._last[1]
        merged = {g: self._merged(g, ft[g], kept[g]) for g in ft}
        bar = self.head(self._features(self.x, merged, {}))
        return {"fewshot_auc": roc_auc(scores.numpy(), y_bin.numpy()),
                "fewshot_consistency_mse": float((bar - target).pow(2).sum(1).mean()),
                "fewshot_original_agreement": float((bar.argmax(1) == target.argmax(1)).float().mean())}


def _complement(kept: torch.Tensor, size: int) -> torch.Tensor:
    mask = torch.ones(size, dtype=torch.bool)
    mask[kept] = False
    return torch.nonzero(mask).flatten()


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve by the rank statistic (ties counted half)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]  # 1-based, ties averaged
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))
