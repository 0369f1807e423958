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

With ``freeze_tables``, lookup tables (embeddings) go through selection and keep their repair,
but their own values are never trained, so all fragments of a model agree on every kept column.

A "layer" is a group from :mod:`snp_ray.slicing.graph` (a residual join is one group). The
network is evaluated functionally, with per-group weight overrides, so one traced graph serves
the original, pooled, repaired (f~) and original-dropped (f-) networks without copies.

Two engines give the same fragments for a fixed seed. ``naive`` runs the whole network, and the
original model for targets, at every step. ``cached`` (the default) draws the augmented views once
per model (``SliceConfig.views``), computes the original model's logits on them once for all
classes, and runs each step from the frozen frontier of the layer being trained
(:mod:`snp_ray.slicing.frontier`): the original network's frontier is shared by every class
of the model, and a combining step's frontier is computed once per step.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from snp_ray.data.augment import augment_images
from snp_ray.data.fewshot import FewShotSet
from snp_ray.data.specs import InputSpec
from snp_ray.errors import ConfigError, DataError
from snp_ray.metrics import roc_auc
from snp_ray.models import Classifier, channels_last_safe
from snp_ray.runtime import ENGINES, resolve_precision
from snp_ray.slicing.config import SliceConfig
from snp_ray.slicing.frontier import Split, batch_nodes, segment, split
from snp_ray.slicing.graph import Gate, SliceGraph, attach, trace
from snp_ray.slicing.handlers import is_depthwise
from snp_ray.slicing.surgery import Repair, fold_into_linear, shrink

log = logging.getLogger(__name__)

#: frontier caches of the original network are kept for every group up to this many MiB
ENV_CACHE_MB = "SNP_SLICE_CACHE_MB"


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


def select_units(scores: torch.Tensor, mode: str, beta: float, min_units: int = 1,
                 blocks: int = 1) -> torch.Tensor:
    """Indices of kept units, ascending. Threshold: s/max(s) > 1-beta. Rate: top ceil(beta*u).

    ``blocks`` > 1 (units read or written by a grouped convolution, ``Group.blocks``): the units
    are that many equal contiguous blocks, and each keeps its top ``ceil(n / blocks)`` (at least
    1), n being the count the rule keeps overall."""
    u = scores.numel()
    if mode == "rate":
        n = max(min_units, math.ceil(beta * u))
    else:
        top = float(scores.max())
        rel = scores / top if top > 0 else torch.zeros_like(scores)
        n = max(min_units, int((rel > 1 - beta).sum()))
    n = min(n, u)
    if blocks > 1:
        per = max(1, math.ceil(n / blocks))
        order = torch.argsort(scores.reshape(blocks, -1), dim=1, descending=True, stable=True)
        top = order[:, :per] + torch.arange(blocks)[:, None] * (u // blocks)
        return torch.sort(top.flatten()).values
    order = torch.argsort(scores, descending=True, stable=True)
    return torch.sort(order[:n]).values


class Slicer:
    """Slices every class of one model; the traced graph and data are shared across classes."""

    #: the cached engine runs channels_last-safe nets with channels_last weights (+20-30 % per
    #: step); it changes summation order, so the bit-exact engine test turns it off
    weights_channels_last = True

    def __init__(self, model: Classifier, input_spec: InputSpec, fewshot: FewShotSet,
                 config: SliceConfig, engine: str = "cached", device: str | torch.device | None = None):
        if engine not in ENGINES:
            raise ConfigError(f"slicer engine must be one of {ENGINES}, got {engine!r}")
        self.cfg, self.engine = config, engine
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.model = model.eval()              # stays on the CPU: fusion copies from it
        self.fewshot, self.input_spec = fewshot, input_spec
        x = input_spec.encode(fewshot.raw)
        dtype = next(model.parameters()).dtype
        if x.dtype.is_floating_point and x.dtype != dtype:
            x = x.to(dtype)       # a float64 model slices in float64 (the engine tests do)
        self.labels = torch.as_tensor(fewshot.labels)
        self.is_image = x.dtype.is_floating_point and x.dim() == 4
        self.fmt = torch.contiguous_format
        if self.is_image and channels_last_safe(model):
            self.fmt = torch.channels_last
            x = x.contiguous(memory_format=self.fmt)
        self.graph: SliceGraph = trace(copy.deepcopy(model.features).eval(), x[:2],
                                       layernorm=config.layernorm)
        self.graph.module.eval()
        self.per_row = batch_nodes(self.graph.module, x)
        self.gates = attach(self.graph)
        self.head = copy.deepcopy(model.head).eval()
        for p in list(self.graph.module.parameters()) + list(self.head.parameters()):
            p.requires_grad_(False)
        self.graph.module.to(self.device)
        if engine != "naive" and self.fmt == torch.channels_last and self.weights_channels_last:
            self.graph.module.to(memory_format=torch.channels_last)
        self.head.to(self.device)
        self.x_cpu, self.x = x, x.to(self.device)
        self.orig = {k: v.detach().clone() for k, v in self.graph.module.state_dict().items()}
        self.tensors: dict[int, list[_Tensor]] = {}
        params = dict(self.graph.module.named_parameters())
        for g in self.graph.groups:
            entries = []
            for mname, off in g.producers:
                mod = self.graph.module.get_submodule(mname)
                h = self.graph.handler(mname, mod)
                for t in h.tensors(mod):
                    if getattr(mod, t, None) is not None:
                        full = f"{mname}.{t}" if mname else t   # "": a root parameter
                        frozen = config.freeze_tables and h.table   # selected, never trained
                        entries.append(_Tensor(full, t, mod, h, off, full in params and not frozen))
            self.tensors[g.id] = entries
        self.pool, self.n_views = self._view_pool()
        self._pool_logits: torch.Tensor | None = None
        self._splits: dict[int, tuple[Split, set[str], set[str]]] = {}
        self._orig_frontier: dict[int, list[torch.Tensor]] = {}
        self._segments: dict[tuple, tuple] = {}
        self._over_budget: tuple | None = None   # the last frontier that did not fit the budget
        self._cache_budget = float(os.environ.get(ENV_CACHE_MB, 4096)) * 2 ** 20
        self.precision = resolve_precision(config.precision, self.device)
        #: group ids that keep every unit whatever their scores (:meth:`select`): an ablation
        #: hook for experiments (benchmarks/mixed_diagnosis.py's ``keep_whole``). Pooling still
        #: trains these groups; only selection is overridden. Not part of the config's digest.
        self.keep_whole: set[int] = set()

    # ------------------------------------------------------------------ the engines' interface
    # What another engine (snp_ray/slicing/batched.py) runs through: the same selection, repair
    # starts, frontiers, batches and fusion as this engine, so the two give the same fragments.

    def autocast(self):
        """bf16 autocast for training steps when the config asks for it; fp32 otherwise. Every
        engine's training forwards and frontiers run under it, so they share one precision."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def set_precision(self, precision: str) -> None:
        """Run in ``precision`` from now on. The original network's frontiers cached in the old
        one are dropped (the batched engine switches to fp32: autocast does not reach under vmap)."""
        if precision != self.precision:
            self.precision = precision
            self._orig_frontier.clear()
            self._over_budget = None

    @property
    def pool_logits(self) -> torch.Tensor:
        """The original model's logits on every view-pool row, computed on first use and shared
        by every class and engine (the consistency targets); index it with pool rows."""
        if self._pool_logits is None:
            with torch.no_grad():
                self._pool_logits = torch.cat([self.original_logits(c) for c in self._chunks(self.pool)])
        return self._pool_logits

    def cache_info(self) -> dict[str, Any]:
        """What this slicer keeps across classes, read-only: ``pool_logits`` (whether the view
        pool's targets are computed), ``frontier_groups`` (the groups whose original frontier is
        cached; :meth:`original_frontier` returns it), ``frontier_bytes`` against
        ``budget_bytes`` (``SNP_SLICE_CACHE_MB``), and ``segments`` (combining segments built,
        :meth:`frontier_segment`). To see what the caches hold and size the budget."""
        return {"pool_logits": self._pool_logits is not None,
                "frontier_groups": sorted(self._orig_frontier),
                "frontier_bytes": self._frontier_bytes(), "budget_bytes": self._cache_budget,
                "segments": len(self._segments)}

    def _view_pool(self) -> tuple[torch.Tensor | None, int]:
        """The few-shot rows every step draws from: ``views`` augmented copies of D, drawn once
        per model from the seed, so that their targets and frozen activations can be cached.
        ``views = 0`` draws a fresh augmentation at every step instead (no pool)."""
        if not (self.cfg.augment and self.is_image):
            return self.x, 1
        if self.cfg.views == 0:
            return None, 0
        gen = torch.Generator().manual_seed(self.cfg.seed * 7919 + 104_729)
        views = [augment_images(self.x_cpu, gen) for _ in range(self.cfg.views)]
        return torch.cat(views).contiguous(memory_format=self.fmt).to(self.device), self.cfg.views

    # ------------------------------------------------------------------ forward passes
    def _features(self, x: torch.Tensor, weights: dict[int, dict[str, torch.Tensor]],
                  repairs: dict[int, Repair], observe: Iterable[int] = ()) -> torch.Tensor:
        return upcast(self._call(self.graph.module, None, weights, (x,), repairs, observe))

    def _call(self, module: nn.Module, names: set[str] | None, weights, args: tuple, repairs,
              observe: Iterable[int] = ()):
        """``module`` (the graph or a piece of it) with the groups' weight overrides that it has
        (``names``; None: all) and the gates set to ``repairs``/``observe`` for this call only."""
        overrides = {n: t for ws in weights.values() for n, t in ws.items() if names is None or n in names}
        self.gates.repairs = repairs
        self.gates.observe = set(observe)
        self.gates.reset_records()
        try:
            return functional_call(module, overrides, args, strict=False)
        finally:
            self.gates.repairs, self.gates.observe = {}, set()

    def _run(self, xb: torch.Tensor, rows: torch.Tensor | None, weights, repairs,
             observe: Iterable[int] = (), cache=None) -> torch.Tensor:
        """The network on one batch: whole (``cache`` None), or from cached frontier rows."""
        if cache is None or rows is None:
            return self._features(xb, weights, repairs, observe)
        sp, _, suffix_names, values = cache
        return upcast(self._call(sp.suffix, suffix_names, weights, tuple(v[rows] for v in values), repairs,
                              observe))

    def _targets(self, rows: torch.Tensor | None, xb: torch.Tensor) -> torch.Tensor:
        """The original model's logits on a batch; cached per view row for every class."""
        if self.engine == "naive" or rows is None:
            return self.original_logits(xb)
        return self.pool_logits[rows]

    def _chunks(self, t: torch.Tensor):
        bs = self.cfg.batch_size
        for s in range(0, t.shape[0], bs):
            yield t[s:s + bs]

    def frontier_split(self, gid: int) -> tuple[Split, set[str], set[str]]:
        """Where the network splits while ``gid`` trains: ``(split, prefix parameter names,
        suffix parameter names)``, computed once per group (the frontier is the prefix's output)."""
        if gid not in self._splits:
            varying = {t.name.rsplit(".", 1)[0] for t in self.tensors[gid]}
            sp = split(self.graph.module, varying, self.per_row)
            self._splits[gid] = (sp, set(sp.prefix.state_dict()), set(sp.suffix.state_dict()))
        return self._splits[gid]

    @torch.no_grad()
    def _frontier(self, gid: int, weights, repairs, known: dict[str, torch.Tensor] | None = None) -> tuple:
        """Frozen frontier values of every pool row while ``gid`` trains (weights fixed).

        ``known``: node values of the previous combining step's frontier (same fixed weights
        upstream); the new frontier is computed from them and replaces them."""
        sp, prefix_names, suffix_names = self.frontier_split(gid)
        if sp.trivial:
            values = [self.pool]
        else:
            if known:
                inputs, module, names = self.frontier_segment(known, sp)
                sources = [known.get(n, self.pool) for n in inputs]
            else:
                module, names, sources = sp.prefix, prefix_names, [self.pool]
            bs, rows = self.cfg.batch_size, self.pool.shape[0]
            with self.autocast():    # under no_grad: the fixed weights and repairs need no detaching
                parts = [self._call(module, names, weights, tuple(v[s:s + bs] for v in sources), repairs)
                         for s in range(0, rows, bs)]
            values = [torch.cat(vals) for vals in zip(*parts)]
        if known is not None:
            known.clear()
            known.update(zip(sp.frontier, values))
        return sp, prefix_names, suffix_names, values

    def frontier_segment(self, known, sp: Split) -> tuple:
        """The graph from the ``known`` nodes to ``sp``'s frontier: (inputs, module, names),
        computed once per pair. Combining runs a step's frontier from the previous step's."""
        key = (frozenset(known), tuple(sp.frontier))
        if key not in self._segments:
            inputs, seg = segment(self.graph.module, set(known), sp.frontier)
            self._segments[key] = (inputs, seg, set(seg.state_dict()))
        return self._segments[key]

    def original_frontier(self, gid: int):
        """The original network's frontier for ``gid`` over the view pool, ``(split, prefix
        names, suffix names, values)``, or None where steps run the whole network (naive engine,
        no pool). Shared by every class of the model (cached within ``SNP_SLICE_CACHE_MB``)."""
        if self.engine == "naive" or self.pool is None:
            return None
        if gid in self._orig_frontier:
            return self._orig_frontier[gid]
        if self._over_budget is not None and self._over_budget[0] == gid:   # pooling, then adaption
            return self._over_budget[1]
        cache = self._frontier(gid, {}, {})
        size = sum(v.numel() * v.element_size() for v in cache[3])
        if self._frontier_bytes() + size <= self._cache_budget:
            self._orig_frontier[gid] = cache
            self._over_budget = None
        else:
            self._over_budget = (gid, cache)
        return cache

    def _frontier_bytes(self) -> int:
        """Bytes the cached original frontiers hold (against ``SNP_SLICE_CACHE_MB``)."""
        return sum(v.numel() * v.element_size() for c in self._orig_frontier.values() for v in c[3])

    def _merged(self, gid: int, ft: dict[str, torch.Tensor], kept: torch.Tensor) -> dict[str, torch.Tensor]:
        """f-: kept units from the fine-tuned weights, dropped units from the original ones."""
        out = {}
        for t in self.tensors[gid]:
            full = self.orig[t.name]
            dim = t.handler.out_dim
            mask = torch.zeros(full.shape[dim], dtype=torch.bool)
            mask[t.handler.unit_positions(t.module, t.attr, t.offset + kept)] = True
            mask = mask.to(full.device)
            shape = [1] * full.dim()
            shape[dim] = -1
            out[t.name] = torch.where(mask.view(shape), ft[t.name], full)
        return out

    def _tilde(self, gid: int, ft: dict[str, torch.Tensor], kept: torch.Tensor) -> dict[str, torch.Tensor]:
        """f~: the fine-tuned weights as the sliced layer will run them (recurrent cuts applied)."""
        dropped = complement(kept, self.graph.group(gid).size).to(self.device)
        return {t.name: t.handler.tilde_override(t.module, t.attr, ft[t.name], dropped)
                for t in self.tensors[gid]}

    @torch.no_grad()
    def original_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self._features(x, {}, {}))

    # ------------------------------------------------------------------ the algorithm
    def slice_classes(self, class_ids: Iterable[int]) -> list[SliceOutcome]:
        """Every class of ``class_ids``; the batched engine runs them side by side."""
        if self.engine == "batched":
            from snp_ray.slicing.batched import slice_classes
            return slice_classes(self, [int(c) for c in class_ids])
        return [self.slice_class(int(c)) for c in class_ids]

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
        ce = nn.CrossEntropyLoss(weight=weight.to(self.device))
        y_bin = y_bin.to(self.device)
        # groups with weights; a group no layer produces (channels the slicer stopped
        # following, e.g. after a channel shuffle) is fixed and has nothing to train
        groups = [g.id for g in self.graph.groups if self.tensors[g.id]]
        times = {"pooling": 0.0, "adaption": 0.0, "combining": 0.0, "fusion": 0.0}
        feat_dim = self.head.in_features

        ft: dict[int, dict[str, torch.Tensor]] = {}
        kept: dict[int, torch.Tensor] = {g.id: torch.arange(g.size) for g in self.graph.groups
                                         if not self.tensors[g.id]}
        mats: dict[int, torch.Tensor] = {}
        heads: dict[int, nn.Linear] = {}

        # stage 1: every layer on its own
        for gid in groups:
            t0 = time.perf_counter()
            w = self.fresh_weights(gid)
            group = self.graph.group(gid)
            if group.fixed:          # e.g. normalised by a LayerNorm: every unit stays
                kept[gid] = torch.arange(group.size)
            else:
                self._pool(gid, w, y_bin, gen)
                scores = self.scores(gid, w, y_bin)
                kept[gid] = self.select(gid, scores)
            times["pooling"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            mats[gid] = self.init_repair(gid, w, kept[gid])
            heads[gid] = nn.Linear(feat_dim, 2).to(self.device)
            frozen = self.original_frontier(gid)
            self._adapt([gid], [gid], w_all={gid: w}, kept=kept, mats=mats, head=heads[gid],
                        y_bin=y_bin, ce=ce, gen=gen, epochs=cfg.adapt_epochs, caches=(frozen, frozen))
            ft[gid] = w
            times["adaption"] += time.perf_counter() - t0

        # stage 2: combine layer by layer from the front
        t0 = time.perf_counter()
        head = heads[groups[-1]]
        known: tuple[dict, dict] = ({}, {})     # the last step's f~ and f- frontier values
        for i, gid in enumerate(groups):
            replaced = groups[: i + 1]
            train = replaced if cfg.combine_train == "all" else [gid]
            caches, fixed = self._combine_caches(replaced, train, ft, kept, mats, known)
            self._adapt(replaced, train, w_all=ft, kept=kept, mats=mats, head=head, y_bin=y_bin,
                        ce=ce, gen=gen, epochs=cfg.combine_epochs, caches=caches, fixed=fixed)
        times["combining"] = time.perf_counter() - t0

        return self.fuse(ft, kept, mats, head, y_bin, times)

    def fuse(self, ft: dict[int, dict[str, torch.Tensor]], kept: dict[int, torch.Tensor],
             mats: dict[int, torch.Tensor], head: nn.Linear, y_bin: torch.Tensor,
             times: dict[str, float]) -> SliceOutcome:
        """One class's fragment from its trained state, for every engine: ``ft`` the trained
        tensors per group, ``kept`` the kept units, ``mats`` the (dropped, kept) repairs, ``head``
        the binary head. Fuses the repairs, folds the head into the probe, adds the few-shot
        metrics and ``times["fusion"]``, and remembers the slice for :meth:`repaired_features`."""
        t0 = time.perf_counter()
        repairs = self._repairs(kept, mats)
        cpu_repairs = {g: tuple(t.cpu() for t in r) for g, r in repairs.items()}
        features = self.fused_features(ft, kept, cpu_repairs)
        probe = fold_into_linear(copy.deepcopy(head).cpu(), self.graph, cpu_repairs, kept)
        times["fusion"] = time.perf_counter() - t0
        outcome = SliceOutcome(features, probe, {g.id: kept[g.id].tolist() for g in self.graph.groups},
                               {g.id: g.name for g in self.graph.groups}, times)
        self._last = (ft, kept, repairs)
        outcome.metrics = self._fewshot_metrics(features, probe, y_bin)
        return outcome

    def select(self, gid: int, scores: torch.Tensor) -> torch.Tensor:
        """Kept units of ``gid`` (every engine): every unit for a group in :attr:`keep_whole`;
        rate ``table_rate`` on lookup tables, rate ``depthwise_rate`` on groups coupled to a
        depthwise convolution and rate ``coupled_rate`` on groups several mixing layers write,
        each when set; else the config's mode and beta."""
        cfg = self.cfg
        if gid in self.keep_whole:
            return torch.arange(self.graph.group(gid).size)
        if cfg.table_rate > 0 and self.is_table_group(gid):
            mode, beta = "rate", cfg.table_rate
        elif cfg.depthwise_rate > 0 and self.is_depthwise_group(gid):
            mode, beta = "rate", cfg.depthwise_rate
        elif cfg.coupled_rate > 0 and self.is_coupled_group(gid):
            mode, beta = "rate", cfg.coupled_rate
        else:
            mode, beta = cfg.mode, cfg.beta
        return select_units(scores.cpu(), mode, beta, cfg.min_units, self.graph.group(gid).blocks)

    def is_depthwise_group(self, gid: int) -> bool:
        """Whether a depthwise convolution produces or reads the group's units (its channel j
        is unit j: an inverted residual's expanded units)."""
        g = self.graph.group(gid)
        mods = dict(self.graph.module.named_modules())
        return any(is_depthwise(mods[n]) for n, _ in g.producers + g.consumers if n in mods)

    def is_coupled_group(self, gid: int) -> bool:
        """Whether more than one mixing layer (one that reads input channels: a conv, a linear)
        writes the group's units: a residual stage's stem or shortcut and its blocks' last convs."""
        g = self.graph.group(gid)
        mods = dict(self.graph.module.named_modules())
        writers = set()
        for n, _ in g.producers:
            h = self.graph.handler(n, mods[n]) if n in mods else None
            if h is not None and h.consumes(mods[n]):
                writers.add(n)
        return len(writers) > 1

    def is_table_group(self, gid: int) -> bool:
        """Whether the group is produced by lookup tables only (embeddings)."""
        return bool(self.tensors[gid]) and all(t.handler.table for t in self.tensors[gid])

    def fresh_weights(self, gid: int) -> dict[str, torch.Tensor]:
        """New copies of the group's original tensors, trainable where the config trains them:
        what a class's slice starts the group from, and the ``w`` that :meth:`scores` and
        :meth:`init_repair` take."""
        return {t.name: self.orig[t.name].clone().requires_grad_(t.trainable) for t in self.tensors[gid]}

    def batches(self, gen: torch.Generator, epochs: int):
        """``(few-shot indices, view-pool rows or None, batch)``; epoch e reads view e mod V.
        Every engine draws a class's batches here, from the class's own generator, so the
        engines see the same batches in the same order."""
        n = self.x.shape[0]
        bs = self.cfg.batch_size
        for e in range(epochs):
            order = torch.randperm(n, generator=gen)
            for s in range(0, n, bs):
                idx = order[s:s + bs]
                if self.pool is None:     # a fresh augmentation at every step
                    xb = augment_images(self.x_cpu[idx], gen).contiguous(memory_format=self.fmt)
                    yield idx, None, xb.to(self.device)
                else:
                    rows = idx + (e % self.n_views) * n
                    yield idx, rows, self.pool[rows]

    def _combine_caches(self, replaced, train, ft, kept, mats, known: tuple[dict, dict]):
        """Frontiers of the f~ and f- networks for one combining step, where every replaced layer
        but the trained one is fixed; worth it only when the pool is smaller than the step's rows.
        ``known``: the previous step's frontier values per network, updated in place.
        Returns the two caches and the fixed layers' f~ and f- weights (detached, for the step)."""
        cfg = self.cfg
        if (self.engine == "naive" or self.pool is None or len(train) != 1
                or self.n_views >= cfg.combine_epochs):
            for k in known:
                k.clear()
            return (None, None), ({}, {})
        gid = train[0]
        fixed = [g for g in replaced if g != gid]
        with torch.no_grad():
            tilde = {g: self._tilde(g, ft[g], kept[g]) for g in fixed}
            merged = {g: self._merged(g, ft[g], kept[g]) for g in fixed}
        caches = (self._frontier(gid, tilde, self._repairs({g: kept[g] for g in fixed}, mats), known[0]),
                  self._frontier(gid, merged, {}, known[1]))
        return caches, (tilde, merged)

    def _pool(self, gid: int, w: dict[str, torch.Tensor], y_bin: torch.Tensor, gen) -> None:
        cfg = self.cfg
        params = [t for t in w.values() if t.requires_grad]
        if cfg.pool_epochs == 0 or not params:
            return
        opt = torch.optim.Adam(params, lr=cfg.lr_layer)
        size = self.graph.group(gid).size
        frozen = self.original_frontier(gid)
        for idx, rows, xb in self.batches(gen, cfg.pool_epochs):
            target = self._targets(rows, xb)
            with self.autocast():
                feats = self._run(xb, rows, {gid: w}, {}, observe=[gid], cache=frozen)
            loss = (self.head(feats) - target).pow(2).sum(1).mean()
            pos = y_bin[idx].bool()
            if cfg.alpha > 0 and bool(pos.any()):
                z = upcast(self.gates.unit_norms(gid)[pos])
                l21 = z.sum(1).mean() / (size if cfg.l21_reduce == "mean" else 1)
                loss = loss + cfg.alpha * l21
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def pooling_l21(self, gid: int, y_bin: torch.Tensor, gen: torch.Generator) -> tuple[float, float]:
        """Ability pooling of group ``gid`` on its own, from its original weights, measured:
        ``(before, after)``, the l2,1 norm ||Z_i^c||_2,1 of the group's units on the class's
        few-shot rows (``y_bin``; the sum of :meth:`scores`) before and after pooling, with the
        same pooling step :meth:`slice_class` runs. What alpha should lower, measured from outside
        the slicer: the pooling canary (tests/test_learning.py), benchmarks/canary_numbers.py."""
        w = self.fresh_weights(gid)
        before = float(self.scores(gid, w, y_bin).sum())
        self._pool(gid, w, y_bin, gen)
        return before, float(self.scores(gid, w, y_bin).sum())

    @torch.no_grad()
    def scores(self, gid: int, w: dict[str, torch.Tensor], y_bin: torch.Tensor) -> torch.Tensor:
        """Unit scores of ``gid`` with its weights ``w``: the mean l2 norm of each unit over the
        class's positive few-shot samples (``y_bin``), what :meth:`select` ranks."""
        xc = self.x[y_bin.bool()]
        self._features(xc, {gid: w}, {}, observe=[gid])
        return self.gates.unit_norms(gid).mean(0)

    @torch.no_grad()
    def init_repair(self, gid: int, w: dict[str, torch.Tensor], kept: torch.Tensor) -> torch.Tensor:
        """The repair's start (``repair_init``: ridge, least squares or zeros), (dropped, kept):
        dropped units of ``gid`` fitted from its kept ones on D, block by block for a grouped
        convolution's group."""
        size = self.graph.group(gid).size
        dropped = complement(kept, size)
        if dropped.numel() == 0 or self.cfg.repair_init == "zeros":
            return torch.zeros(dropped.numel(), kept.numel(), device=self.device)
        acts, samples = self.group_activations(gid, w)
        zk, zd = acts[:, kept].double().cpu(), acts[:, dropped].double().cpu()
        group = self.graph.group(gid)
        if group.repair_mask(kept, dropped) is None:
            sol = self._fit_repair(gid, zk, zd, samples)
        else:     # read by a grouped convolution: one fit per block, zero across blocks
            sol = torch.zeros(dropped.numel(), kept.numel(), dtype=zk.dtype)
            blk_d, blk_k = group.block_of(dropped), group.block_of(kept.cpu())
            for b in torch.unique(blk_d).tolist():
                rows, cols = torch.nonzero(blk_d == b).flatten(), torch.nonzero(blk_k == b).flatten()
                sol[rows[:, None], cols[None, :]] = self._fit_repair(gid, zk[:, cols], zd[:, rows], samples)
        return sol.to(acts.dtype).contiguous().to(self.device)

    def _fit_repair(self, gid: int, zk: torch.Tensor, zd: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
        """``repair_init``'s fit of dropped activations ``zd`` from kept ones ``zk``: (d, k)."""
        if self.cfg.repair_init == "lstsq":
            return torch.linalg.lstsq(zk, zd, driver="gelsd").solution.t()          # (d, k)
        sol, rho = ridge_repair(zk, zd, samples.cpu(), seed=self.cfg.seed * 7919 + gid)
        log.debug("group %d: repair ridge %s (%d rows, %d kept)", gid, rho, zk.shape[0], zk.shape[1])
        return sol

    def group_activations(self, gid: int, w: dict[str, torch.Tensor],
                          limit: int = 20_000) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit vectors of the group at every gate position on D, as rows (n_positions, units),
        and the few-shot sample each row comes from. A flattened map's positions of a unit (its
        H*W block) are positions like a conv map's: one row each. What :meth:`init_repair` fits
        the repair on (at most ``limit`` rows, a seeded draw), so a repair can be checked on
        the rows it saw or, from another slicer, on other samples."""
        captured: list[torch.Tensor] = []
        owners: list[torch.Tensor] = []
        n = self.x.shape[0]
        gates = [m for m in self.graph.module.modules() if isinstance(m, Gate) and m.repairs]
        hooks = []
        for gate in gates:
            for g, off, size in gate.segments:
                if g == gid:
                    def hook(mod, inp, out, off=off, size=size):
                        seg = mod.unit_view(inp[0]).narrow(mod.dim, off, size).movedim(mod.dim, -1)
                        captured.append(seg.reshape(-1, size))
                        # the batch dim leads and stays first (the unit dim is never 0),
                        # merged with other dims sample-major where the gate says so (rows)
                        owners.append((torch.arange(seg.shape[0]) // mod.rows)
                                      .repeat_interleave(seg[0].numel() // size))
                    hooks.append(gate.register_forward_hook(hook))
        try:
            self._features(self.x, {gid: w}, {})
        finally:
            for h in hooks:
                h.remove()
        rows, samples = torch.cat(captured), torch.cat(owners)
        if samples.numel() != rows.shape[0] or int(samples.max()) >= n:
            raise ConfigError(f"group {gid}: its activations do not lead with the batch dim; "
                              f"repair_init='zeros' slices without them")
        if rows.shape[0] > limit:
            pick = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(0))[:limit]
            rows, samples = rows[pick], samples[pick]
        return rows, samples

    def _repair_mask(self, gid: int, kept: torch.Tensor) -> torch.Tensor | None:
        """Where the repair of ``gid`` may be nonzero (grouped convolutions: its blocks), or None."""
        mask = self.graph.group(gid).repair_mask(kept, complement(kept, self.graph.group(gid).size))
        return None if mask is None else mask.to(self.device)

    def _repairs(self, kept: dict[int, torch.Tensor], mats: dict[int, torch.Tensor]) -> dict[int, Repair]:
        out = {}
        for gid, k in kept.items():
            d = complement(k, self.graph.group(gid).size)
            if d.numel():
                out[gid] = (k.to(self.device), d.to(self.device), mats[gid])
        return out

    def _adapt(self, replaced: list[int], train: list[int], w_all, kept, mats, head: nn.Linear,
               y_bin: torch.Tensor, ce: nn.Module, gen, epochs: int, caches=(None, None),
               fixed=({}, {})) -> None:
        """``fixed``: f~ and f- weights of layers this step does not train, computed once."""
        cfg = self.cfg
        if epochs == 0:
            return
        layer_params = [t for g in train for t in w_all[g].values() if t.requires_grad]
        for g in train:
            mats[g] = mats[g].detach().clone().requires_grad_(True)
            mask = self._repair_mask(g, kept[g])
            if mask is not None and mats[g].numel():   # a block-diagonal repair stays so under Adam
                mats[g].register_hook(lambda grad, m=mask: grad.masked_fill(~m, 0))
        repair_params = [mats[g] for g in train if mats[g].numel()] + list(head.parameters())
        opt = torch.optim.Adam([{"params": layer_params, "lr": cfg.lr_layer},
                                {"params": repair_params, "lr": cfg.lr_repair}])
        cache_t, cache_m = caches
        fixed_t, fixed_m = fixed
        # the repairs hold the trained matrices themselves (updated in place), so built once
        repairs = self._repairs({g: kept[g] for g in replaced}, mats)
        for idx, rows, xb in self.batches(gen, epochs):
            weights = {g: fixed_t.get(g) or self._tilde(g, w_all[g], kept[g]) for g in replaced}
            with self.autocast():
                feats = self._run(xb, rows, weights, repairs, cache=cache_t)
            loss = ce(head(feats), y_bin[idx])
            if cfg.gamma > 0:
                target = self._targets(rows, xb)
                merged = {g: fixed_m.get(g) or self._merged(g, w_all[g], kept[g]) for g in replaced}
                with self.autocast():
                    bar_feats = self._run(xb, rows, merged, {}, cache=cache_m)
                bar = self.head(bar_feats)
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

    @property
    def last_slice(self) -> tuple[dict, dict, dict]:
        """The last slice's unfused state, for inspection: ``(trained tensors, kept units,
        repairs)`` per group, as :meth:`fuse` got them (a repair is ``(kept, dropped, matrix)``);
        what :meth:`repaired_features` and :meth:`merged_features` run."""
        return self._last

    @torch.no_grad()
    def repaired_features(self, x: torch.Tensor, all_units: bool = False) -> torch.Tensor:
        """The unfused, repaired network (f~) of the last slice, restricted to its kept output
        units (all ``output_inner`` positions of each, in the fragment's order); with
        ``all_units``, every output unit of the source (a head on them folds onto the fragment's
        features with ``fold_into_linear``). On the CPU."""
        ft, kept, repairs = self._last
        x = x.to(self.device)
        feats = self._features(x, {g: self._tilde(g, w, kept[g]) for g, w in ft.items()}, repairs)
        if all_units:
            return feats.cpu()
        units = torch.cat([off + kept[g] for g, off, _ in self.graph.output_layout])
        inner = self.graph.output_inner
        idx = (units[:, None] * inner + torch.arange(inner)).flatten()
        return feats.index_select(1, idx.to(self.device)).cpu()

    @torch.no_grad()
    def merged_features(self, x: torch.Tensor) -> torch.Tensor:
        """The f- network of the last slice, every output unit: kept units from the trained
        weights, dropped ones from the original weights, no repairs; what the consistency term
        (gamma) pulls towards the original model. On the CPU."""
        ft, kept, _ = self._last
        merged = {g: self._merged(g, ft[g], kept[g]) for g in ft}
        return self._features(x.to(self.device), merged, {}).cpu()

    @torch.no_grad()
    def _fewshot_metrics(self, features, probe, y_bin) -> dict[str, float]:
        """Few-shot-only diagnostics of the last slice: probe AUC on D and the f- network's
        fidelity to M."""
        features.eval()
        scores = torch.softmax(probe(features(self.x_cpu)), 1)[:, 1]
        target = self.original_logits(self.x)
        bar = self.head(self.merged_features(self.x).to(self.device))
        return {"fewshot_auc": roc_auc(scores.numpy(), y_bin.cpu().numpy()),
                "fewshot_consistency_mse": float((bar - target).pow(2).sum(1).mean()),
                "fewshot_original_agreement": float((bar.argmax(1) == target.argmax(1)).float().mean())}


#: ridge strengths tried for a repair, relative to the mean eigenvalue of the kept units' Gram
#: matrix; ``inf`` is "no repair" (the dropped units read as zero before the next layer)
RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, math.inf)


def ridge_repair(zk: torch.Tensor, zd: torch.Tensor, samples: torch.Tensor, folds: int = 5,
                 grid: tuple[float, ...] | None = None, seed: int = 0) -> tuple[torch.Tensor, float]:
    """The repair ``L`` (dropped x kept) that predicts dropped activations from kept ones, by
    ridge regression with its strength chosen by cross-validation over few-shot SAMPLES.

    ``zk`` (rows, k) and ``zd`` (rows, d) are activations at every position of every sample;
    ``samples`` names each row's sample. Rows of one sample are never split across folds (its
    positions are correlated). An unregularised fit interpolates where rows < k (a 1x1 layer of
    a 32x32 ResNet has one row per sample) and predicts held-out samples worse than no repair at
    all; here "no repair" (``inf``) is a candidate, so on the held-out folds the chosen repair
    does no worse than none. ``grid``: the strengths tried (default :data:`RIDGE_GRID`, read at
    each call). Returns ``(L, chosen strength)``."""
    grid = RIDGE_GRID if grid is None else grid
    zk, zd = zk.double(), zd.double()
    k = zk.shape[1]
    ids = torch.unique(samples)
    folds = min(folds, ids.numel())
    if folds < 2 or k == 0:
        return torch.zeros(zd.shape[1], k, dtype=zk.dtype), math.inf
    order = ids[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(seed))]
    fold_of = torch.empty(int(ids.max()) + 1, dtype=torch.long)
    fold_of[order] = torch.arange(order.numel()) % folds
    row_fold = fold_of[samples]

    def fit(a: torch.Tensor, b: torch.Tensor):
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        scale = float(s.pow(2).sum()) / k
        return vh.t(), s, u.t() @ b, scale       # L^T = V diag(s/(s^2+lam)) U^T b

    errors = torch.zeros(len(grid), dtype=torch.float64)
    for f in range(folds):
        tr, te = row_fold != f, row_fold == f
        v, s, ub, scale = fit(zk[tr], zd[tr])
        q = zk[te] @ v
        for i, rho in enumerate(grid):
            if math.isinf(rho) or scale == 0:
                errors[i] += zd[te].pow(2).sum()
            else:
                shrink = s / (s.pow(2) + rho * scale)
                errors[i] += ((q * shrink) @ ub - zd[te]).pow(2).sum()
    best = grid[int(torch.argmin(errors))]
    v, s, ub, scale = fit(zk, zd)
    if math.isinf(best) or scale == 0:
        return torch.zeros(zd.shape[1], k, dtype=zk.dtype), math.inf
    return ((v * (s / (s.pow(2) + best * scale))) @ ub).t(), best


def upcast(t: torch.Tensor) -> torch.Tensor:
    """A bf16/fp16 (autocast) result in fp32 for losses; fp32 and fp64 stay as they are. Every
    engine's losses read their forwards through it."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def complement(kept: torch.Tensor, size: int) -> torch.Tensor:
    """The dropped units, ascending: ``0..size-1`` without ``kept``."""
    mask = torch.ones(size, dtype=torch.bool)
    mask[kept] = False
    return torch.nonzero(mask).flatten()

