"""Split a traced network at the first layer a slicing step changes.

While one group's weights are trained, everything upstream of its producers is frozen: its
values depend only on the input row. :func:`split` cuts the graph there. The *prefix* returns
the frozen tensors the rest needs (the *frontier*), and the *suffix* starts from them. A step then
runs the suffix on cached frontier rows instead of the whole network. Graph ops that are not
per-row tensors (sizes, shapes) are recomputed in the suffix, so a cached row is always a slice
of a batch tensor.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp


@dataclass
class Split:
    frontier: list[str]          # names of the frozen nodes the suffix reads, in graph order
    prefix: fx.GraphModule       # x -> tuple of frontier values
    suffix: fx.GraphModule       # *frontier values -> the network's output
    trivial: bool                # the frontier is the input itself: nothing to cache


def batch_nodes(gm: fx.GraphModule, example: torch.Tensor) -> set[str]:
    """Names of the nodes whose value is a tensor with one row per input row: their first dim
    follows the batch size over two probe batches (a constant that happens to match one does not
    match both)."""
    sizes = (2, 3) if example.shape[0] >= 3 else (1, 2)
    seen = []
    for n in sizes:
        ShapeProp(gm).propagate(example[:n])
        rows = set()
        for node in gm.graph.nodes:
            meta = node.meta.get("tensor_meta")
            if node.op == "placeholder" or (hasattr(meta, "shape") and len(meta.shape) and meta.shape[0] == n):
                rows.add(node.name)
        seen.append(rows)
    return seen[0] & seen[1]


def split(gm: fx.GraphModule, varying_modules: set[str], per_row: set[str]) -> Split:
    """Cut ``gm`` below every node that depends on a module in ``varying_modules``."""
    nodes = list(gm.graph.nodes)
    needed: set[fx.Node] = set()
    for node in nodes:
        if node.op == "output":
            continue
        if (node.op in ("call_module", "get_attr") and _owned(node.target, varying_modules)) or \
                any(a in needed for a in node.all_input_nodes):
            needed.add(node)
    # values the suffix needs that are not per-row tensors are recomputed there, with their inputs
    stack = [a for n in needed for a in n.all_input_nodes if a not in needed]
    while stack:
        a = stack.pop()
        if a in needed or a.name in per_row:
            continue
        needed.add(a)
        stack.extend(x for x in a.all_input_nodes if x not in needed)
    frontier = [n for n in nodes if n not in needed and n.op != "output"
                and any(u in needed for u in n.users)]
    out_node = next(n for n in nodes if n.op == "output")

    sg, env = fx.Graph(), {}
    for f in frontier:
        env[f] = sg.placeholder(f"frontier_{f.name}")
    for n in nodes:
        if n in needed:
            env[n] = sg.node_copy(n, lambda a: env[a])
    sg.output(fx.map_arg(out_node.args[0], lambda a: env[a]))

    names = [f.name for f in frontier]
    _, prefix = segment(gm, set(), names)     # from the input alone
    trivial = len(frontier) == 1 and frontier[0].op == "placeholder"
    return Split(names, prefix, fx.GraphModule(gm, sg), trivial)


def _owned(target: str, modules: set[str]) -> bool:
    return any(target == m or target.startswith(m + ".") for m in modules)


def segment(gm: fx.GraphModule, known: set[str], outputs: list[str]) -> tuple[list[str], fx.GraphModule]:
    """A graph that computes the ``outputs`` nodes from already known node values.

    Walking up from the outputs stops at known nodes and at the input. Combining uses it to get
    step i's frontier from step i-1's, so it runs the layers in between, not the whole prefix.
    Returns the input node names, in graph order, and the graph module (``*inputs -> outputs``)."""
    by_name = {n.name: n for n in gm.graph.nodes}
    need: set[fx.Node] = set()
    stack = [by_name[o] for o in outputs]
    while stack:
        n = stack.pop()
        if n in need:
            continue
        need.add(n)
        if n.name not in known and n.op != "placeholder":
            stack.extend(n.all_input_nodes)
    order = [n for n in gm.graph.nodes if n in need]
    inputs = [n for n in order if n.name in known or n.op == "placeholder"]
    g, env = fx.Graph(), {}
    for n in inputs:
        env[n] = g.placeholder(f"in_{n.name}")
    for n in order:
        if n not in env:
            env[n] = g.node_copy(n, lambda a: env[a])
    g.output(tuple(env[by_name[o]] for o in outputs))
    return [n.name for n in inputs], fx.GraphModule(gm, g)
