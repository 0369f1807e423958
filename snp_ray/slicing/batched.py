"""The ``batched`` slicer engine: every class of one model in one pass (issue #16).

The cached engine (:mod:`snp_ray.slicing.slicer`) runs each class's pooling, adaption and
combining one class after another over the same frozen frontier. Those passes are independent, so
this engine runs them side by side, ``SliceConfig.class_batch`` classes at a time:

- **Stacked state.** The per-class trainable state gets a leading class dim: the weights of the
  layer being trained (``(C, *shape)``), the repairs and the binary heads (``(C, 2, F)``). One
  Adam optimiser steps them all; Adam is element-wise and the loss is the sum of the per-class
  losses, so each class gets the same update as alone.
- **One forward and backward for all classes.** The network (or the suffix above the trained
  layer) runs under ``torch.func.vmap`` over the class dim, with the stacked weights as
  ``functional_call`` overrides. A convolution with stacked weights becomes one grouped
  convolution, a linear layer one batched matmul.
- **Repairs of equal shape, one group at a time.** Classes keep different units, so under vmap
  a repair (``dropped = R @ kept``, ``(|d|, |k|)``) runs as a full ``(u, u)`` matrix per class,
  ``M = diag(keep) + R ∘ mask`` with ``mask[d, k] = 1`` for the class's dropped rows and kept
  columns; the gates rebuild every unit as ``M @ z``. The masked entries get no gradient and stay
  zero under Adam. Between steps each class's repair is held as its own ``(|d|, |k|)`` matrix,
  as in the cached engine; the full ``(C, u, u)`` matrices are built for the group being trained
  (while it trains) and, detached, for the fixed groups whose gates the step's forward runs
  (the suffix above the trained layer, or the segment of a frontier), and dropped after the
  step. So stage 1 holds one group's full matrices at a time, not every group's. (A combining
  step without a frontier cache runs the whole network, so it builds every replaced group's: one
  vmapped forward needs all of its gates' matrices at once.)
- **The frontier once.** In pooling and adaption the frozen frontier of the original network is
  computed once per model (``Slicer.original_frontier``) and read by every class; each
  class gathers its own rows of it. In combining the layers below the trained one differ per
  class, so their frontier is computed once per step for all classes together (vmapped), from the
  previous step's frontier like the cached engine does.
- **Same randomness.** Each class keeps its own generator and draws its batches (and fresh
  augmentations) in the cached engine's order; its heads come from the same seeded global RNG.

Selection, repair initialisation (least squares), fusion and the few-shot metrics stay per class
and reuse the cached engine's code, through the slicer's public engine interface
(``Slicer.select``, ``scores``, ``init_repair``, ``fuse``; no private member of the slicer). The arithmetic differs from the cached engine only in
summation order (grouped instead of separate convolutions, repairs as full matrices), so kept
units match, up to near-ties in the scores; tests/test_slicer_engines.py holds the tolerances.

Arithmetic is fp32: CPU bf16 autocast does not reach the ops under vmap in this torch, so a
``bf16``/``auto`` precision runs fp32 here (the fragments record ``precision = fp32``).

Graphs the vmapped pass cannot run (recurrent layers have no batching rule) fall back to the
cached engine class by class (``batched_supported``).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.func import functional_call, vmap

from snp_ray.slicing.graph import Gate
from snp_ray.slicing.slicer import complement, upcast

if TYPE_CHECKING:
    from snp_ray.slicing.slicer import SliceOutcome, Slicer


def batched_supported(s: "Slicer") -> bool:
    """Whether this engine gives the slicer's fragments: every group has weights (none is an
    unproduced fixed group), every trained group can run under vmap (no recurrent layers), and combining trains only the step's own layer (``combine_train=
    "all"`` is left to the per-class engine, so one key never names two different fragments)."""
    return s.cfg.combine_train == "current" and all(s.tensors.values()) and \
        not any(t.handler.recurrent for ts in s.tensors.values() for t in ts)


def slice_classes(s: "Slicer", class_ids: list[int]) -> list["SliceOutcome"]:
    """Slice ``class_ids`` of the slicer's model, ``class_batch`` classes per pass."""
    if not batched_supported(s):
        return [s.slice_class(c) for c in class_ids]
    if s.precision == "bf16":
        # CPU autocast does not reach the ops under vmap (conv sees a bf16 input and an fp32
        # weight): this engine runs fp32, and the fragments record it
        s.set_precision("fp32")
    cap = s.cfg.class_batch or len(class_ids)
    out = []
    for i in range(0, len(class_ids), cap):
        out.extend(ClassBatch(s, [int(c) for c in class_ids[i:i + cap]]).run())
    return out


def _gather(v: torch.Tensor, rows: torch.Tensor, batched: bool) -> torch.Tensor:
    """(C, B, ...) rows of a frontier value: shared (P, ...) or per class (C, P, ...)."""
    if not batched:
        return v[rows]
    return v[torch.arange(v.shape[0], device=v.device)[:, None], rows]


class ClassBatch:
    """One pass of this engine: the classes of one ``class_batch`` and their stacked state.
    Public as the unit :func:`slice_classes` runs, so a caller can see how a request splits
    into passes and what a pass holds between steps (``groups``; ``reps``: each class's repair
    per group, (|d|, |k|))."""

    def __init__(self, s: "Slicer", classes: list[int]):
        from snp_ray.errors import DataError

        self.s, self.classes, self.C = s, classes, len(classes)
        cfg, dev = s.cfg, s.device
        for c in classes:
            if c not in s.fewshot.classes:
                raise DataError(f"class {c} is not a class of this model ({s.fewshot.classes})")
        y = torch.stack([(s.labels == c).long() for c in classes])            # (C, n)
        npos = y.sum(1)
        for c, p in zip(classes, npos.tolist()):
            if p == 0 or p == y.shape[1]:
                raise DataError(f"class {c} needs both positive and negative few-shot samples")
        n = y.shape[1]
        self.y_bin = y.to(dev)
        self.cew = torch.stack([n / (2.0 * (n - npos)), n / (2.0 * npos)], 1).to(dev, torch.get_default_dtype())  # (C, 2)
        self.gens = [torch.Generator().manual_seed(cfg.seed * 7919 + c) for c in classes]
        self.groups = [g.id for g in s.graph.groups]
        feat_dim = s.head.in_features
        heads = []   # the cached engine draws one head per group from the class's seeded RNG
        for c in classes:
            torch.manual_seed(cfg.seed * 7919 + c)
            heads.append([nn.Linear(feat_dim, 2) for _ in self.groups])
        self.heads = {gid: (torch.stack([h[i].weight.detach() for h in heads]).to(dev),
                            torch.stack([h[i].bias.detach() for h in heads]).to(dev))
                      for i, gid in enumerate(self.groups)}
        self.names = {gid: [t.name for t in s.tensors[gid] if t.trainable] for gid in self.groups}
        self.arange = {g.id: torch.arange(g.size, device=dev) for g in s.graph.groups}
        self.times = {"pooling": 0.0, "adaption": 0.0, "combining": 0.0, "fusion": 0.0}
        self.kept: list[dict[int, torch.Tensor]] = [{} for _ in classes]   # per class: gid -> kept
        #: gid -> each class's repair, (|d|, |k|) as the cached engine holds it (see the docstring)
        self.reps: dict[int, list[torch.Tensor]] = {}
        self.wmasks: dict[int, dict[str, torch.Tensor]] = {}     # gid -> _keep_masks
        self.gated: dict[nn.Module, set[int]] = {}

    # ------------------------------------------------------------------ vmapped forward
    def _vcall(self, module, names, weights: dict[str, torch.Tensor], mats: dict[int, torch.Tensor],
               args: tuple, args_batched: tuple[bool, ...], observe: int | None = None):
        """``module`` under vmap over the classes: stacked weight overrides (filtered to ``names``),
        full repair matrices per group, and args batched per class or shared."""
        s = self.s
        weights = {n: t for n, t in weights.items() if names is None or n in names}
        ar = self.arange

        def one(w, m, *xs):
            s.gates.repairs = {g: (ar[g], ar[g], mat) for g, mat in m.items()}
            s.gates.observe = {observe} if observe is not None else set()
            s.gates.reset_records()
            try:
                out = functional_call(module, w, xs, strict=False)
                norms = s.gates.unit_norms(observe) if observe is not None else None
            finally:
                s.gates.repairs, s.gates.observe = {}, set()
                s.gates.reset_records()
            return out, norms

        dims = (0, 0) + tuple(0 if b else None for b in args_batched)
        return vmap(one, in_dims=dims, out_dims=(0, None if observe is None else 0))(weights, mats, *args)

    def _run(self, xb, rows, weights, mats, cache, observe=None):
        """Features (C, B, F) of every class: whole network on ``xb`` (C, B, ...), or the suffix
        of ``cache`` on each class's ``rows`` (C, B)."""
        s = self.s
        if cache is None or rows is None:
            out, norms = self._vcall(s.graph.module, None, weights, mats, (xb,), (True,), observe)
        else:
            sp, _, suffix_names, values, batched = cache
            args = tuple(_gather(v, rows, batched) for v in values)
            out, norms = self._vcall(sp.suffix, suffix_names, weights, mats, args,
                                     (True,) * len(args), observe)
        return upcast(out), norms

    def _batches(self, epochs: int):
        """Every class's next batch, drawn from its own generator: (idx, rows, xb) stacked."""
        its = [self.s.batches(g, epochs) for g in self.gens]
        for parts in zip(*its):
            idx = torch.stack([p[0] for p in parts])
            rows = None if parts[0][1] is None else torch.stack([p[1] for p in parts]).to(self.s.device)
            yield idx.to(self.s.device), rows, torch.stack([p[2] for p in parts])

    def _targets(self, rows, xb):
        s = self.s
        if rows is None:
            return s.original_logits(xb.flatten(0, 1)).view(self.C, xb.shape[1], -1)
        return s.pool_logits[rows]

    # ------------------------------------------------------------------ weights per class
    def _fresh(self, gid):
        """Stacked copies of the group's trained tensors, (C, *shape), one per class."""
        s = self.s
        return self._leaves(gid, {n: s.orig[n].unsqueeze(0).repeat(self.C, *[1] * s.orig[n].dim())
                                  for n in self.names[gid]})

    def _leaves(self, gid, w):
        """``w`` as trainable leaves. Rows the module's own backward leaves untouched (an
        embedding's padding row) get no gradient here either: under vmap the embedding backward
        ignores ``padding_idx``."""
        out = {}
        for t in self.s.tensors[gid]:
            if t.name not in w:
                continue
            leaf = w[t.name].detach().requires_grad_(True)
            rows = t.handler.frozen_rows(t.module, t.attr)
            if rows:
                idx = torch.tensor(rows, device=leaf.device)
                leaf.register_hook(lambda g, idx=idx: g.index_fill(1, idx, 0))
            out[t.name] = leaf
        return out

    def _keep_masks(self, gid):
        """Per trained tensor of ``gid``: (C, *shape) bool, True on each class's kept units."""
        s, out = self.s, {}
        for t in s.tensors[gid]:
            if not t.trainable:
                continue
            full = s.orig[t.name]
            masks = []
            for c in range(self.C):
                m = torch.zeros(full.shape[t.handler.out_dim], dtype=torch.bool)
                m[t.handler.unit_positions(t.module, t.attr, t.offset + self.kept[c][gid])] = True
                shape = [1] * full.dim()
                shape[t.handler.out_dim] = -1
                masks.append(m.view(shape).expand(full.shape))
            out[t.name] = torch.stack(masks).to(s.device)
        return out

    def _merged(self, gid, w, masks):
        """f-: kept units from the trained weights, dropped ones from the original weights."""
        return {n: torch.where(masks[n], w[n], self.s.orig[n]) for n in w}

    # ------------------------------------------------------------------ repairs per group
    def _init_repairs(self, gid, w):
        """Each class's repair start, (|d|, |k|) (``Slicer.init_repair``)."""
        s, dtype = self.s, torch.get_default_dtype()
        return [s.init_repair(gid, self._class_weights(gid, w, c), self.kept[c][gid]).to(s.device, dtype)
                for c in range(self.C)]

    def _units(self, gid, c):
        """Class ``c``'s (kept, dropped) units of ``gid``, on the device."""
        k = self.kept[c][gid]
        return k.to(self.s.device), complement(k, self.s.graph.group(gid).size).to(self.s.device)

    def _embed(self, gid):
        """Every class's repair of ``gid`` in a full (C, u, u) matrix, zero off its (d, k) block."""
        u = self.s.graph.group(gid).size
        full = torch.zeros(self.C, u, u, device=self.s.device)
        for c, r in enumerate(self.reps[gid]):
            k, d = self._units(gid, c)
            if d.numel():
                full[c, d[:, None], k[None, :]] = r
        return full

    def _compact(self, gid, full):
        """Holds each class's (d, k) block of the trained ``full`` matrices as its repair."""
        reps = []
        for c in range(self.C):
            k, d = self._units(gid, c)
            reps.append(full[c][d][:, k].contiguous())
        self.reps[gid] = reps

    @torch.no_grad()
    def _fixed(self, gid):
        """``M = diag(keep) + R`` of a group not trained in this step, (C, u, u), detached."""
        full = self._embed(gid)
        for c in range(self.C):
            k, _ = self._units(gid, c)
            full[c, k, k] = 1
        return full

    def _masks(self, gid):
        """(diag(keep), where R may be nonzero) of the trained group, (C, u, u) each: its dropped
        rows and kept columns, within the blocks of a grouped convolution."""
        s, group = self.s, self.s.graph.group(gid)
        u = group.size
        rmask, diag = [], []
        for c in range(self.C):
            k = self.kept[c][gid]
            d = complement(k, u)
            mk = torch.zeros(u, u)
            if d.numel():
                allowed = group.repair_mask(k, d)     # grouped convs: the blocks
                mk[d[:, None], k[None, :]] = 1 if allowed is None else allowed.to(mk.dtype)
            rmask.append(mk)
            dg = torch.zeros(u, u)
            dg[k, k] = 1
            diag.append(dg)
        return torch.stack(diag).to(s.device), torch.stack(rmask).to(s.device)

    def _gated_groups(self, module):
        """The groups whose repairs a gate inside ``module`` applies (a step needs only those)."""
        if module not in self.gated:
            self.gated[module] = {g for m in module.modules() if isinstance(m, Gate) and m.repairs
                                  for g, _, _ in m.segments}
        return self.gated[module]

    def _fixed_for(self, module, groups):
        """:meth:`_fixed` matrices of those ``groups`` whose gates ``module`` runs."""
        gated = self._gated_groups(module)
        return {g: self._fixed(g) for g in groups if g in gated}

    # ------------------------------------------------------------------ the stages
    def run(self) -> list["SliceOutcome"]:
        s, cfg, C = self.s, self.s.cfg, self.C
        kept = self.kept
        ft: dict[int, dict[str, torch.Tensor]] = {}
        for gid in self.groups:
            t0 = time.perf_counter()
            w = self._fresh(gid)
            group = s.graph.group(gid)
            if group.fixed:
                for c in range(C):
                    kept[c][gid] = torch.arange(group.size)
            else:
                self._pool(gid, w)
                for c in range(C):
                    wc = self._class_weights(gid, w, c)
                    kept[c][gid] = s.select(gid, s.scores(gid, wc, self.y_bin[c]))
            self.times["pooling"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            self.reps[gid] = self._init_repairs(gid, w)
            self.wmasks[gid] = self._keep_masks(gid)
            frozen = s.original_frontier(gid)
            frozen = None if frozen is None else (*frozen, False)
            self._adapt([gid], gid, {gid: w}, self.heads[gid], cfg.adapt_epochs, (frozen, frozen))
            ft[gid] = w
            self.times["adaption"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        head = self.heads[self.groups[-1]]
        known: tuple[dict, dict] = ({}, {})
        for i, gid in enumerate(self.groups):
            replaced = self.groups[: i + 1]
            caches, fixed = self._combine_caches(replaced, gid, ft, known)
            self._adapt(replaced, gid, ft, head, cfg.combine_epochs, caches, fixed)
        self.times["combining"] = time.perf_counter() - t0
        return [self._outcome(c, ft, head) for c in range(C)]

    def _class_weights(self, gid, w, c):
        """Class ``c``'s weights of ``gid`` as the cached engine holds them (buffers included)."""
        s = self.s
        return {t.name: (w[t.name][c].detach() if t.trainable else s.orig[t.name])
                for t in s.tensors[gid]}

    def _pool(self, gid, w):
        """Stage 1 for every class. The consistency target is the original network run through
        the same vmapped pass, not the cached engine's logits: at the start the trained weights
        are the original ones, and the loss must be exactly 0 there, as in the cached engine. A
        target from other arithmetic leaves a last-bit residue whose gradient Adam would scale
        into full learning-rate steps in random directions (with alpha = 0 that alone moved
        outputs by 2 % and changed kept units in the tests)."""
        s, cfg = self.s, self.s.cfg
        params = list(w.values())
        if cfg.pool_epochs == 0 or not params:
            return
        opt = torch.optim.Adam(params, lr=cfg.lr_layer)
        size = s.graph.group(gid).size
        frozen = s.original_frontier(gid)
        frozen = None if frozen is None else (*frozen, False)
        orig = {n: t.detach().clone() for n, t in w.items()}
        for idx, rows, xb in self._batches(cfg.pool_epochs):
            with s.autocast():
                with torch.no_grad():    # the target in this engine's arithmetic, see _pool
                    target = s.head(self._run(xb, rows, orig, {}, frozen)[0])
                feats, z = self._run(xb, rows, w, {}, frozen, observe=gid)
            # per class: mean over the batch and sum over classes = each class's own loss
            loss = (s.head(feats) - target).pow(2).sum(2).mean(1).sum()
            pos = torch.gather(self.y_bin, 1, idx).bool()                        # (C, B)
            if cfg.alpha > 0 and bool(pos.any()):
                npos = pos.sum(1)
                l21 = (upcast(z).sum(2) * pos).sum(1) / npos.clamp_min(1)
                l21 = l21 / (size if cfg.l21_reduce == "mean" else 1)
                loss = loss + cfg.alpha * l21[npos > 0].sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def _combine_caches(self, replaced, gid, ft, known):
        """The f~ and f- frontiers of one combining step (as in the cached engine) and the
        fixed layers' f~ and f- weights; the fixed repairs are built inside each frontier."""
        s, cfg = self.s, self.s.cfg
        if s.pool is None or cfg.combine_train != "current" or s.n_views >= cfg.combine_epochs:
            for k in known:
                k.clear()
            return (None, None), ({}, {})
        fixed = [g for g in replaced if g != gid]
        with torch.no_grad():
            tilde = {n: t.detach() for g in fixed for n, t in ft[g].items()}
            merged = {n: t.detach() for g in fixed for n, t in self._merged(g, ft[g], self.wmasks[g]).items()}
        caches = (self._frontier(gid, tilde, fixed, known[0]), self._frontier(gid, merged, [], known[1]))
        return caches, (tilde, merged)

    @torch.no_grad()
    def _frontier(self, gid, weights, repaired, known):
        """Frozen frontier of ``gid`` for every class (C, P, ...), from the last step's if known;
        ``repaired``: the fixed groups whose repairs the network runs."""
        s = self.s
        sp, prefix_names, suffix_names = s.frontier_split(gid)
        if sp.trivial:
            values, batched = [s.pool], False
        else:
            if known:
                inputs, module, names = s.frontier_segment(known, sp)
                sources = [known.get(n) for n in inputs]
                flags = [v is not None for v in sources]
                sources = [v if v is not None else s.pool for v in sources]
            else:
                module, names, sources, flags = sp.prefix, prefix_names, [s.pool], [False]
            # nothing per class below gid (e.g. only a frozen lookup table): the original
            # network's frontier, one for all classes
            batched = bool(repaired) or any(flags) or any(n in names for n in weights)
            if batched:
                mats = self._fixed_for(module, repaired)
                bs, parts = s.cfg.batch_size, []
                with s.autocast():
                    for st in range(0, s.pool.shape[0], bs):
                        args = tuple(v[:, st:st + bs] if b else v[st:st + bs] for v, b in zip(sources, flags))
                        parts.append(self._vcall(module, names, weights, mats, args, tuple(flags))[0])
                del mats
                values = [torch.cat(vals, 1) for vals in zip(*parts)]
            else:
                values = s.original_frontier(gid)[3]
        if known is not None:
            known.clear()
            if batched:
                known.update(zip(sp.frontier, values))
        return sp, prefix_names, suffix_names, values, batched

    def _adapt(self, replaced, gid, w_all, head, epochs, caches=(None, None), fixed=({}, {})):
        """Adaption (``replaced == [gid]``) or one combining step of ``gid``: its weights, its
        repairs (full matrices while it trains, its classes' (d, k) blocks after) and the head.
        ``fixed``: the f~ and f- weights of the other replaced layers when computed already."""
        s, cfg = self.s, self.s.cfg
        if epochs == 0:
            return
        w = w_all[gid]
        keep_diag, rmask = self._masks(gid)
        mat = self._embed(gid).requires_grad_(True)
        hw, hb = head
        hw.requires_grad_(True)
        hb.requires_grad_(True)
        opt = torch.optim.Adam([{"params": list(w.values()), "lr": cfg.lr_layer},
                                {"params": [mat, hw, hb], "lr": cfg.lr_repair}])
        cache_t, cache_m = caches
        fixed_t, fixed_m = fixed
        others = [g for g in replaced if g != gid]
        # the other layers are fixed for the whole step: their weights and repairs once
        with torch.no_grad():
            fixed_t = fixed_t or {n: t.detach() for g in others for n, t in w_all[g].items()}
            if cfg.gamma > 0:
                fixed_m = fixed_m or {n: t.detach() for g in others
                                      for n, t in self._merged(g, w_all[g], self.wmasks[g]).items()}
            fixed_r = self._fixed_for(s.graph.module if cache_t is None else cache_t[0].suffix, others)
        for idx, rows, xb in self._batches(epochs):
            weights = {**fixed_t, **w}       # f~: the trained weights (no recurrent cuts here)
            reps = {**fixed_r, gid: keep_diag + mat * rmask}
            with s.autocast():
                feats, _ = self._run(xb, rows, weights, reps, cache_t)
            logits = torch.baddbmm(hb.unsqueeze(1), feats, hw.transpose(1, 2))        # (C, B, 2)
            y = torch.gather(self.y_bin, 1, idx)
            nll = -torch.log_softmax(logits, 2).gather(2, y.unsqueeze(2)).squeeze(2)
            wy = torch.gather(self.cew, 1, y)
            loss = ((wy * nll).sum(1) / wy.sum(1)).sum()
            if cfg.gamma > 0:
                target = self._targets(rows, xb)
                merged = {**fixed_m, **self._merged(gid, w, self.wmasks[gid])}
                with s.autocast():
                    bar_feats, _ = self._run(xb, rows, merged, {}, cache_m)
                bar = s.head(bar_feats)
                loss = loss + cfg.gamma * (bar - target).pow(2).sum(2).mean(1).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        self._compact(gid, mat.detach())
        hw.requires_grad_(False)
        hb.requires_grad_(False)
        w.update(self._leaves(gid, w))

    # ------------------------------------------------------------------ per class: fusion
    def _outcome(self, c, ft, head) -> "SliceOutcome":
        s = self.s
        ft_c = {g: self._class_weights(g, ft[g], c) for g in self.groups}
        lin = nn.Linear(s.head.in_features, 2)
        with torch.no_grad():
            lin.weight.copy_(head[0][c])
            lin.bias.copy_(head[1][c])
        times = {k: v / self.C for k, v in self.times.items()}      # the batch's, per class
        return s.fuse(ft_c, self.kept[c], {g: self.reps[g][c] for g in self.groups}, lin, self.y_bin[c], times)
