"""Physical surgery on an eager feature extractor: keep units, fold repairs into consumers.

Used twice: to build a fragment from a finished slicing run (with repairs), and to rebuild a
stored fragment's shapes before loading its weights (without repairs).
"""
from __future__ import annotations

import torch
from torch import nn

from snp_ray.slicing.graph import SliceGraph
from snp_ray.slicing.handlers import handler_for

Repair = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # kept, dropped, matrix (|d| x |k|)


class RepairedLayerNorm(nn.Module):
    """A LayerNorm over units some of which were dropped (``SliceConfig.layernorm="repair"``).

    The sliced network's LayerNorm read its dropped inputs rebuilt from the kept ones,
    ``x_d = repair @ x_k``. Its statistics over all ``size`` units therefore follow from the kept
    inputs alone. This module rebuilds them, normalises the whole vector as the LayerNorm did,
    and returns the kept units with their affine. ``repair`` is a frozen parameter: it is part
    of the fragment, and counted in its size."""

    def __init__(self, kept: int, size: int, eps: float, elementwise_affine: bool = True):
        super().__init__()
        self.size, self.eps = int(size), float(eps)
        self.repair = nn.Parameter(torch.zeros(size - kept, kept), requires_grad=False)
        self.weight = nn.Parameter(torch.ones(kept)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(kept)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[-1]
        full = torch.cat([x, x @ self.repair.t()], dim=-1)
        y = nn.functional.layer_norm(full, (self.size,), eps=self.eps)[..., :k]
        return y * self.weight + self.bias if self.weight is not None else y


def _repaired_norm(norm: nn.Module, size: int, repair: torch.Tensor | None) -> RepairedLayerNorm:
    """``norm`` (already cut to its kept units) as a :class:`RepairedLayerNorm` over ``size``
    units; ``repair`` (|dropped|, |kept|), or None to be loaded with the fragment's weights."""
    kept = int(norm.normalized_shape[0])
    out = RepairedLayerNorm(kept, size, norm.eps, norm.weight is not None)
    with torch.no_grad():
        if repair is not None:
            out.repair.copy_(repair.to(out.repair.dtype))
        if norm.weight is not None:
            out.weight.copy_(norm.weight)
            if norm.bias is not None:
                out.bias.copy_(norm.bias)
    return out.to(norm.weight.device if norm.weight is not None else "cpu")


def shrink(features: nn.Module, graph: SliceGraph, kept: dict[int, torch.Tensor],
           repairs: dict[int, Repair] | None = None) -> nn.Module:
    """Slice ``features`` (an eager twin of ``graph.module``) in place to the kept units.

    With ``repairs``, every consumer first absorbs the repair of each input segment, so the
    result computes exactly what the repaired, unsliced network computes on the kept units.
    """
    modules = dict(features.named_modules())
    # consumers: fold repairs (or just drop columns), highest offset first so offsets stay valid
    inputs: dict[str, list[tuple[int, int]]] = {}
    for g in graph.groups:
        for name, off in g.consumers:
            inputs.setdefault(name, []).append((off, g.id))
    for name, segs in inputs.items():
        mod = modules[name]
        h = graph.handler(name, mod)
        inner = graph.inner(name)          # positions per unit of its input (flattened maps)
        for off, gid in sorted(segs, reverse=True):
            size = graph.group(gid).size
            if repairs and gid in repairs:
                k, d, mat = repairs[gid]
                h.absorb_repair(mod, off, size, k, d, mat, inner)
            else:
                h.keep_in(mod, off, size, kept[gid], inner)
    # producers: keep rows of every segment a module hosts
    outputs: dict[str, list[tuple[int, int]]] = {}
    for g in graph.groups:
        for name, off in g.producers:
            outputs.setdefault(name, []).append((off, g.id))
    for name, segs in outputs.items():
        idx = torch.cat([off + kept[gid] for off, gid in sorted(segs)])
        graph.handler(name, modules[name]).keep_out(modules[name], idx)
    # LayerNorms over units some of which were dropped: their statistics come through the repair
    for g in graph.groups:
        if len(kept[g.id]) == g.size:
            continue
        for name in g.norms:
            parent, _, child = name.rpartition(".")
            rep = repairs[g.id][2].detach().cpu() if repairs and g.id in repairs else None
            setattr(modules[parent] if parent else features, child,
                    _repaired_norm(modules[name], g.size, rep))
    return features


def fold_into_linear(linear: nn.Linear, graph: SliceGraph, repairs: dict[int, Repair],
                     kept: dict[int, torch.Tensor]) -> nn.Linear:
    """A linear map on the full repaired features -> the same map on the kept features only.
    Features flattened from (C, H, W) maps hold ``graph.output_inner`` = H*W columns per unit:
    the weight is viewed as (out, units, H*W) and every position absorbs the repair."""
    h = handler_for(linear)
    inner = graph.output_inner
    for gid, off, size in sorted(graph.output_layout, key=lambda s: s[1], reverse=True):
        if gid in repairs:
            k, d, mat = repairs[gid]
            h.absorb_repair(linear, off, size, k, d, mat, inner)
        else:
            h.keep_in(linear, off, size, kept[gid], inner)
    return linear
