"""Trace a feature extractor once and find its unit groups.

Every tensor in the traced graph gets a *channel layout*: which dim holds units, which
segments of it belong to which unit space, and how many contiguous positions of that dim one unit
occupies (1, or H*W after flattening a channel map: ``Layout.inner``). Producers (conv, linear,
embedding) open a new space; channel-wise ops (BN, activations, pooling, dropout) pass the layout
through; an element-wise add merges the spaces of its operands (a residual join: one coupled
group, one kept set); a concat along the unit dim lays spaces side by side. Spaces merged by
adds form the slicing groups. Modules find their part through a typed ``Handler``
(``handlers.handler_for``); functional and method ops through a typed ``OpRule`` looked up by
target in ``OP_RULES``, so following a new op is one ``register_op_rule``, not a longer ``trace``.

Nothing here knows what a VGG or a ResNet is: the groups fall out of the traced data flow.
"""
from __future__ import annotations

import math
import operator
from typing import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from snp_ray.errors import ConfigError, UnsupportedLayerError
from snp_ray.models.tracing import CHANNELWISE, OPAQUE, symbolic_trace
from snp_ray.slicing.handlers import Handler, ParamHandler, handler_for, is_depthwise

Segment = tuple[int, int, int]  # (space or group id, offset in the unit dim, size)


@dataclass
class Layout:
    dim: int                         # the unit dim (non-negative)
    segments: list[tuple[int, int]]  # (space id, size in units), in order along ``dim``
    #: positions of ``dim`` per unit: unit u holds positions u*inner .. u*inner+inner-1 (a
    #: flattened (C, H, W) map has inner = H*W); offsets and sizes are always in units
    inner: int = 1

    @property
    def width(self) -> int:
        return sum(s for _, s in self.segments)

    def at(self, dim: int) -> "Layout":
        """The same units on another dim (the tensor was permuted, squeezed, reduced...)."""
        return Layout(dim, self.segments, self.inner)

    def with_offsets(self) -> list[Segment]:
        out, off = [], 0
        for sid, size in self.segments:
            out.append((sid, off, size))
            off += size
        return out


@dataclass
class Group:
    """Units that must share one kept set, with every module that touches them."""

    id: int
    size: int
    producers: list[tuple[str, int]] = field(default_factory=list)   # (module, offset) units out
    consumers: list[tuple[str, int]] = field(default_factory=list)   # (module, offset) inputs
    gates: list[tuple[str, int]] = field(default_factory=list)       # (gate name, offset)
    output_offsets: list[int] = field(default_factory=list)          # where it lands in features
    order: int = 0                                                   # first producer's position
    fixed: str = ""              # why every unit must be kept ("" = the group can be sliced)
    #: grouped convolutions (see "Grouped convolutions" in docs/SLICING.md): the units form this
    #: many equal contiguous blocks, and every block keeps the same number of units
    blocks: int = 1
    #: a grouped convolution reads the units: a dropped unit may be rebuilt from kept units of
    #: its own block only (the repair is block-diagonal)
    block_diagonal: bool = False
    #: LayerNorms over exactly these units (the last dim, one group): a fused fragment that
    #: drops some of them replaces each with a ``RepairedLayerNorm`` (SliceConfig.layernorm)
    norms: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """Its first producer's module path; a group that no layer produces (channels the slicer
        stopped following, always fixed) is named by why it is kept."""
        return self.producers[0][0] if self.producers else f"<unproduced: {self.fixed}>"

    def block_of(self, units: torch.Tensor) -> torch.Tensor:
        """The block each of ``units`` lies in."""
        return units // (self.size // self.blocks)

    def repair_mask(self, kept: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor | None:
        """(|dropped|, |kept|) bool: the repair entries allowed (same block), or None if all."""
        if not self.block_diagonal or self.blocks == 1:
            return None
        return self.block_of(dropped.cpu())[:, None] == self.block_of(kept.cpu())[None, :]


@dataclass
class SliceGraph:
    module: fx.GraphModule        # the traced extractor with a Gate after every gated tensor
    groups: list[Group]           # in forward order
    gate_layouts: dict[str, list[Segment]]
    output_layout: list[Segment]
    #: producers that are not modules with a handler of their own (a bare parameter such as a
    #: layer scale, hosted by the module that owns it): producer name -> handler
    extra_handlers: dict[str, Handler] = field(default_factory=dict)
    #: positions per unit (``Layout.inner``) of the tensor each consumer reads, where not 1
    consumer_inner: dict[str, int] = field(default_factory=dict)
    #: positions per unit of the extractor's output (its flat features)
    output_inner: int = 1

    def inner(self, consumer: str) -> int:
        """Positions per unit of the input of consumer module ``consumer``."""
        return self.consumer_inner.get(consumer, 1)

    def group(self, gid: int) -> Group:
        return next(g for g in self.groups if g.id == gid)

    def handler(self, name: str, module: nn.Module) -> Handler | None:
        """The handler of producer/consumer ``name`` (``module`` is the module at that path)."""
        return self.extra_handlers.get(name) or handler_for(module)


class _UnionFind:
    def __init__(self):
        self.parent: dict[int, int] = {}

    def add(self, x: int) -> None:
        self.parent.setdefault(x, x)

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)


def _shape(node: fx.Node) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        raise ConfigError(f"cannot infer the shape of {node.name} while tracing")
    return tuple(meta.shape)


def _arg0(node: fx.Node) -> fx.Node:
    """The op's first node argument: the tensor it acts on."""
    return next(a for a in node.args if isinstance(a, fx.Node))


class _Layouts(dict):
    """Node -> layout, read through the trace's refinements (``_Tracing.resolve``)."""

    def __init__(self, tracing: "_Tracing"):
        super().__init__()
        self.tracing = tracing

    def __getitem__(self, node):
        return self.tracing.resolve(super().__getitem__(node))

    def get(self, node, default=None):
        lay = super().get(node)
        return default if lay is None else self.tracing.resolve(lay)


class _Tracing:
    """One trace in progress: each node's layout so far, the unit spaces opened and the
    union-find that couples them. Op rules read it and, to couple units, ``join``."""

    def __init__(self, gm: fx.GraphModule):
        self.modules = dict(gm.named_modules())
        self.params = dict(gm.named_parameters()) | dict(gm.named_buffers())
        self.layouts: dict[fx.Node, Layout] = _Layouts(self)
        #: a space cut in two (``refine``) -> its two pieces; layouts read through it
        self.pieces: dict[int, list[tuple[int, int]]] = {}
        #: node of a split/chunk of the unit dim -> the layout of each part (``_Split``)
        self.parts: dict[fx.Node, list[Layout | None]] = {}
        self.pos = 0                                    # the node being traced (forward order)
        self.next_sid = 0
        #: ops after which units are no longer followed (their inputs' units kept whole)
        self.lost: list[tuple[fx.Node, str]] = []
        self.uf = _UnionFind()
        self.sizes: dict[int, int] = {}
        self.producers: dict[int, list[tuple[str, int]]] = {}
        self.members: list[tuple[str, int, int]] = []   # channel-wise modules with params: (name, sid, off)
        self.consumers: list[tuple[str, fx.Node]] = []
        self.first_seen: dict[int, int] = {}
        self.called: set[str] = set()                   # modules with weights already called once
        self.recurrent: set[fx.Node] = set()
        self.sequences: list[fx.Node] = []              # a recurrent layer's per-step output
        self.fixed: dict[int, str] = {}                 # space -> why all its units must be kept
        self.extra: dict[str, Handler] = {}             # bare parameters hosted by their owner
        self.hosted: dict[str, list[int]] = {}          # owner -> the spaces its parameters ride on
        self.blocks: dict[int, int] = {}                # space -> blocks (grouped convolutions)
        #: LayerNorms over one space's units on the last dim: (module, the node it reads, space)
        self.norms: list[tuple[str, fx.Node, int]] = []
        self.block_diagonal: set[int] = set()           # spaces a grouped convolution reads

    def new_space(self, node: fx.Node, name: str, size: int, pos: int) -> int:
        sid = self._space(size, pos)
        self.producers[sid] = [(name, 0)]
        return sid

    def resolve(self, lay: Layout) -> Layout:
        """``lay`` with every space that was cut since (``refine``) replaced by its pieces."""
        if not any(sid in self.pieces for sid, _ in lay.segments):
            return lay
        out: list[tuple[int, int]] = []

        def expand(sid: int, size: int) -> None:
            if sid not in self.pieces:
                out.append((sid, size))
                return
            for p, n in self.pieces[sid]:
                expand(p, n)
        for sid, size in lay.segments:
            expand(sid, size)
        return Layout(lay.dim, out, lay.inner)

    def refine(self, node: fx.Node, sid: int, at: int) -> None:
        """Cut space ``sid`` into units ``0..at-1`` and ``at..``: every space coupled with it
        unit by unit is cut at the same unit, the pieces of each side are coupled again, and
        producers, riders and fixed marks follow their units. Layouts recorded earlier read the
        pieces through ``resolve``. A channel slice or split of the unit dim does this, so that
        each part keeps its own units, like a concat in reverse."""
        root = self.uf.find(sid)
        cls = [t for t in self.sizes if self.uf.find(t) == root]
        if any(t in self.blocks for t in cls):
            raise UnsupportedLayerError(f"{node.op} {_name(node.target)}", _path(node),
                                        f"{node.name} cuts the units of a grouped convolution")
        firsts, seconds = [], []
        for t in cls:
            size = self.sizes.pop(t)
            a = self._space(size=at, first=self.first_seen[t])
            b = self._space(size=size - at, first=self.first_seen[t])
            self.producers[a] = list(self.producers[t])
            self.producers[b] = [(n, off + at) for n, off in self.producers.pop(t)]
            if t in self.fixed:
                self.fixed[a] = self.fixed[b] = self.fixed.pop(t)
            self.members = [m for name, s, off in self.members for m in (
                ((name, a, off), (name, b, off + at)) if s == t else ((name, s, off),))]
            for owner, spaces in self.hosted.items():
                self.hosted[owner] = [p for s in spaces for p in ((a, b) if s == t else (s,))]
            self.pieces[t] = [(a, at), (b, size - at)]
            firsts.append(a)
            seconds.append(b)
        for side in (firsts, seconds):
            for t in side[1:]:
                self.uf.union(side[0], t)

    def _space(self, size: int, first: int) -> int:
        sid = self.next_sid
        self.next_sid += 1
        self.uf.add(sid)
        self.sizes[sid] = size
        self.first_seen[sid] = first
        return sid

    def cut_at(self, node: fx.Node, lay: Layout, at: int) -> Layout:
        """``lay`` with a segment boundary at unit position ``at``: a space straddling it is
        refined there."""
        off = 0
        for sid, size in lay.segments:
            if off < at < off + size:
                self.refine(node, sid, at - off)
                return self.resolve(lay)
            off += size
        return lay

    def cut(self, node: fx.Node, lay: Layout, at: int) -> tuple[Layout, Layout]:
        """``lay`` (whose ``width`` is in units) as the units before unit position ``at`` and
        from it on; a space straddling ``at`` is refined first."""
        lay = self.cut_at(node, lay, at)
        left, right, off = [], [], 0
        for sid, size in lay.segments:
            (left if off < at else right).append((sid, size))
            off += size
        return Layout(lay.dim, left, lay.inner), Layout(lay.dim, right, lay.inner)

    def fix(self, lay: Layout, why: str) -> None:
        """Keep every unit of ``lay`` (each of its spaces' groups is then kept whole)."""
        for sid, _ in lay.segments:
            self.fixed.setdefault(sid, why)

    def opaque(self, size: int, why: str) -> int:
        """A space of ``size`` units that no layer produces (channels whose units the slicer
        no longer follows, e.g. after a channel shuffle): its group is fixed, never sliced."""
        sid = self._space(size, self.pos)
        self.producers[sid] = []
        self.fixed[sid] = why
        return sid

    def member_param(self, node: fx.Node, p: fx.Node, lay: Layout) -> None:
        """A bare parameter combined element-wise with a unit tensor: if it has one entry per
        unit it rides on the units (like a BN affine); if it broadcasts over them it is inert."""
        t = self.params.get(p.target)
        if t is None:
            raise UnsupportedLayerError(f"{node.op} {_name(node.target)}", _path(node),
                                        f"combines units with the untraced tensor {p.name}")
        ndim = len(_shape(node))
        d = lay.dim - (ndim - t.dim())
        if d < 0 or t.shape[d] == 1:
            return                                     # broadcast over the units
        if lay.inner != 1:
            raise UnsupportedLayerError(f"{node.op} {_name(node.target)}", _path(node),
                                        f"parameter {p.target} has one entry per position of a "
                                        "flattened unit map; per-unit parameters there are not "
                                        "supported")
        if t.shape[d] != lay.width:
            raise UnsupportedLayerError(f"{node.op} {_name(node.target)}", _path(node),
                                        f"parameter {p.target} does not line up with the units")
        owner, _, attr = p.target.rpartition(".")
        segments = [sid for sid, _ in lay.segments]
        hosted = self.extra.get(owner)
        if hosted is not None and hosted.out_dim == d and self.hosted[owner] == segments:
            hosted.out_tensors += (attr,)      # a second parameter on the same units (ViT's
            return                             # class token and position embedding)
        if hosted is not None or (owner in self.modules and handler_for(self.modules[owner]) is not None):
            raise UnsupportedLayerError(f"parameter {p.target}", _path(node), "a module hosting "
                                        "per-unit parameters on different units is not supported")
        self.extra[owner] = ParamHandler(attr, d)
        self.hosted[owner] = segments
        for sid, off, _ in lay.with_offsets():
            self.members.append((owner, sid, off))

    def align(self, node: fx.Node, kind: str, lays: list[Layout]) -> Layout:
        """Couple tensors unit by unit (one group per segment position); their units must line
        up: same dim, same segment sizes, same positions per unit."""
        a = lays[0]
        if any(b.dim != a.dim or b.inner != a.inner or b.width != a.width for b in lays[1:]):
            raise UnsupportedLayerError(kind, _path(node),
                                        f"{node.name} combines tensors whose units do not line up")
        lays = [self.resolve(lay) for lay in lays]
        while len({tuple(s for _, s in lay.segments) for lay in lays}) > 1:
            # segmented differently (GhostNet: a block's input + the concat of a ghost module's
            # two halves): cut every operand at every operand's boundaries, then pair pieces
            bounds = {off for lay in lays for _, off, _ in lay.with_offsets()}
            for lay in lays:
                for at in bounds:
                    lay = self.cut_at(node, self.resolve(lay), at)
            lays = [self.resolve(lay) for lay in lays]
        a = lays[0]
        for b in lays[1:]:
            for (sa, _), (sb, _) in zip(a.segments, b.segments):
                self.uf.union(sa, sb)
        return a

    def couple(self, node: fx.Node, inputs: list[fx.Node]) -> Layout:
        """A module whose inputs carry the same units one to one (q, k and v of attention): the
        inputs' spaces become one group, the module rides on it, its output carries it."""
        lays = [self.layouts.get(a) for a in inputs]
        if not lays or any(lay is None for lay in lays):
            raise UnsupportedLayerError(_name(node.target), _path(node),
                                        "an input carries no traced units")
        a = self.align(node, _name(node.target), lays)
        for sid, off, _ in a.with_offsets():
            self.members.append((node.target, sid, off))
        return a

    def join(self, node: fx.Node, kind: str) -> Layout | None:
        """add / mul: traced operands are coupled unit by unit (one group); a parameter operand
        rides on the units; constants and tensors broadcast over the units are inert, and so is
        a traced operand one unit wide broadcast over the others' units (``_unbroadcast``); an
        untraced operand as wide as the units keeps them whole."""
        ops = [a for a in node.args if isinstance(a, fx.Node)]
        ndim = len(_shape(node))
        raw = _unbroadcast(self, node, ops, [self.layouts.get(a) for a in ops], kind)
        # broadcasting lines dims up from the end: (T, d) + (B, T, d) puts units on dim 2
        lays = [None if lay is None else lay.at(ndim - len(_shape(op)) + lay.dim)
                for op, lay in zip(ops, raw)]
        traced = [lay for lay in lays if lay is not None]
        if not traced:          # only broadcast width-1 operands carried units
            return None
        a = self.align(node, kind, traced)
        for op, lay in zip(ops, lays):
            if lay is not None:
                continue
            if op.op == "get_attr":
                self.member_param(node, op, a)
                continue
            shape = _shape(op) if hasattr(op.meta.get("tensor_meta"), "shape") else ()
            d = a.dim - (len(_shape(node)) - len(shape))
            if d >= 0 and shape[d] != 1:
                # channels no layer the slicer follows produced (an untraceable block's output,
                # the raw input, a computed mask): they are kept whole, and so are the units
                # combined with them
                self.fix(a, f"{kind} {node.name} combines them with {op.name}, whose channels "
                            "carry no units the slicer follows")
        return a


class OpRule:
    """How units flow through a functional or method op (``torch.cat``, ``x.permute``...): the
    function-side twin of a module's ``Handler``. ``trace`` finds a node's rule by its target in
    ``OP_RULES``, so following a new op is one rule given to ``register_op_rule``."""

    #: call_function targets (the function objects) and call_method names the rule handles
    functions: tuple[Callable, ...] = ()
    methods: tuple[str, ...] = ()

    def inputs(self, node: fx.Node) -> list[fx.Node]:
        """The tensors whose units flow in: by default the node's positional node arguments."""
        return [a for a in node.args if isinstance(a, fx.Node)]

    def layout(self, node: fx.Node, ins: list[Layout | None], tracing: _Tracing) -> Layout | None:
        """The output's layout (None: it carries no units), or raise ``UnsupportedLayerError``.
        Called only when some input carries units; ``ins`` = the layouts of ``inputs(node)``
        (None where a tensor has none); ``tracing`` = the trace in progress."""
        raise NotImplementedError


#: call_function target (a function object) or call_method name -> the rule that follows it
OP_RULES: dict[Callable | str, OpRule] = {}


def _register(table: dict, keys: tuple, rule: OpRule) -> Callable[[], None]:
    """Route ``keys`` of ``table`` to ``rule``; returns a function that restores what it replaced."""
    before = {k: table.get(k) for k in keys}
    table.update(dict.fromkeys(keys, rule))

    def remove() -> None:
        for k, old in before.items():
            if table.get(k) is rule:
                if old is None:
                    del table[k]
                else:
                    table[k] = old
    return remove


def register_op_rule(rule: OpRule) -> Callable[[], None]:
    """Route every target of ``rule`` to it (per process: register at import time so that worker
    processes see it too); returns a function that restores what it replaced."""
    return _register(OP_RULES, (*rule.functions, *rule.methods), rule)


def _rule_for(node: fx.Node) -> OpRule | None:
    try:
        return OP_RULES.get(node.target)
    except TypeError:          # an unhashable callable: no rule can name it
        return None


def _refusal(node: fx.Node) -> UnsupportedLayerError:
    """The refusal of an op that no rule follows (or follows only in other forms)."""
    return UnsupportedLayerError(f"{node.op} {_name(node.target)}", _path(node),
                                 f"the slicer cannot follow units through it ({node.name}); "
                                 "e.g. a reshape, split or channel shuffle of the unit dim")


class _Cat(OpRule):
    """A concat along the unit dim lays the operands' spaces side by side."""

    functions = (torch.cat,)

    def inputs(self, node):
        return node.args[0]

    def layout(self, node, ins, tracing):
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        dim = dim % len(_shape(node))
        traced = [lay for lay in ins if lay is not None]
        if all(lay.dim != dim for lay in traced):
            return self.along_tokens(node, ins, tracing)
        inner = traced[0].inner
        for i, (op, lay) in enumerate(zip(self.inputs(node), ins)):
            if lay is None:     # no units the slicer follows (a shuffled or reduced tensor, an
                width = _shape(op)[dim]      # input): its channels are kept whole
                if width % inner:
                    raise UnsupportedLayerError("cat", _path(node), f"{node.name} concatenates "
                                                f"{op.name}, which carries no traced units, with "
                                                "a flattened unit map")
                why = f"concatenated by {node.name} at {_path(node)} from {op.name}, whose " \
                      "channels carry no units the slicer follows"
                ins[i] = Layout(dim, [(tracing.opaque(width // inner, why), width // inner)], inner)
        if not all(lay.dim == dim for lay in ins):
            raise UnsupportedLayerError("cat", _path(node), f"{node.name}: concatenation along a "
                                        "non-unit dim")
        if len({lay.inner for lay in ins}) > 1:
            raise UnsupportedLayerError("cat", _path(node), f"{node.name} concatenates "
                                        "unit maps flattened from different sizes "
                                        f"({sorted({lay.inner for lay in ins})} positions "
                                        "per unit)")
        return Layout(dim, [s for lay in ins for s in lay.segments], ins[0].inner)

    def along_tokens(self, node, ins, tracing):
        """Along another dim (tokens: ViT's class token before the patches) every operand has
        the same units: traced ones are coupled, and an untraced one must be a parameter (seen
        through ``expand``/``repeat``) with one entry per unit, which rides on them."""
        lay = tracing.align(node, "cat", [lay for lay in ins if lay is not None])
        for op, own in zip(self.inputs(node), ins):
            if own is None:
                param = _parameter_behind(op)
                if param is None:
                    raise UnsupportedLayerError("cat", _path(node), f"{node.name} concatenates "
                                                f"units with {op.name}, which is neither traced "
                                                "nor a parameter")
                tracing.member_param(node, param, lay)
        return lay


#: ops that only broadcast or copy a tensor: a parameter seen through them is still itself
_BROADCASTS = {"expand", "expand_as", "repeat", "contiguous", "to", "type_as", "clone"}


def _parameter_behind(node: fx.Node) -> fx.Node | None:
    """The ``get_attr`` node that ``node`` broadcasts (``cls_token.expand(B, -1, -1)``), if any."""
    while node.op == "call_method" and node.target in _BROADCASTS:
        node = _arg0(node)
    return node if node.op == "get_attr" else None


class _Shape(OpRule):
    """``x.size()``, ``x.shape``: shapes are not tensors with units."""

    functions, methods = (getattr,), ("size", "dim")

    def layout(self, node, ins, tracing):
        return None


class _GetItem(OpRule):
    """An integer index drops a tensor's first dim, or picks one element of a module's tuple
    output (a recurrent layer's element 0 is its per-step output, scored on its own)."""

    functions = (operator.getitem,)

    def layout(self, node, ins, tracing):
        if isinstance(node.args[1], tuple):
            return self.indexed(node, ins[0], tracing)
        if not isinstance(node.args[1], int):
            raise _refusal(node)
        src = _arg0(node)
        if src in tracing.parts:               # one part of a split or chunk (``_Split``)
            part = tracing.parts[src][node.args[1]]
            return None if part is None else tracing.resolve(part)
        if hasattr(src.meta.get("tensor_meta"), "shape"):
            if ins[0].dim == 0:
                raise UnsupportedLayerError("getitem", _path(node), f"{node.name}: an integer "
                                            "index on the unit dim of the output "
                                            f"of {_source(src)}")
            return ins[0].at(ins[0].dim - 1)
        if src in tracing.recurrent and node.args[1] == 0:
            tracing.sequences.append(node)
        return ins[0]

    @staticmethod
    def indexed(node: fx.Node, lay: Layout, tracing: _Tracing) -> Layout:
        """``x[:, 0]``, ``x[:, 1:]``, ``x[..., None]``: other dims may be indexed, sliced or
        added; the unit dim may be sliced with constant bounds (``_slice_units``)."""
        index, ndim = node.args[1], len(_shape(_arg0(node)))
        if sum(1 for i in index if i is Ellipsis) > 1:
            raise _refusal(node)
        eaten = sum(1 for i in index if i is not None and i is not Ellipsis)
        expanded: list = []
        for i in index:
            expanded += [slice(None)] * (ndim - eaten) if i is Ellipsis else [i]
        expanded += [slice(None)] * (ndim - sum(1 for i in expanded if i is not None))
        src_dim, out_dim = 0, 0
        for i in expanded:
            if i is None:
                out_dim += 1
                continue
            if src_dim == lay.dim:
                if i == slice(None):
                    return lay.at(out_dim)
                if not isinstance(i, slice):
                    raise UnsupportedLayerError("getitem", _path(node), f"{node.name} indexes "
                                                f"the unit dim ({i!r}); only a slice is "
                                                "supported there")
                return _slice_units(tracing, node, lay, i).at(out_dim)
            if not isinstance(i, (int, slice)):
                raise _refusal(node)       # a tensor index: rows move, units could too
            src_dim += 1
            out_dim += 0 if isinstance(i, int) else 1
        raise _refusal(node)


def _slice_units(tracing: _Tracing, node: fx.Node, lay: Layout, index: slice) -> Layout:
    """``x[:, s:e]`` on the unit dim (GhostNet's ``out[:, :out_chs]``, ReXNet's
    ``x[:, 0:in_channels]``): the part keeps its own units, like a concat in reverse, and the
    spaces cut by a bound are refined there. The fragment runs the same code with the same
    constant bounds, so every unit before the last bound that cuts must be kept: before ``s``,
    and before ``e`` when ``e`` ends the slice short of the end. A slice of the whole dim is
    the identity."""
    bounds = (index.start, index.stop, index.step)
    if index.step not in (None, 1) or lay.inner != 1 or \
            any(b is not None and not isinstance(b, int) for b in bounds):
        raise UnsupportedLayerError("getitem", _path(node), f"{node.name} slices the unit dim "
                                    f"({index!r}); only a contiguous slice with constant bounds "
                                    "of an unflattened map is supported there")
    start, stop, _ = index.indices(lay.width)
    if start == 0 and stop == lay.width:
        return lay
    if stop <= start:
        raise UnsupportedLayerError("getitem", _path(node), f"{node.name} slices the unit dim "
                                    "to nothing")
    head, rest = tracing.cut(node, lay, start)
    part, tail = tracing.cut(node, rest, stop - start)
    why = f"before the constant bound of the channel slice {node.name} ({index!r}) at {_path(node)}"
    tracing.fix(tracing.resolve(head), why)
    if tail.segments:
        tracing.fix(tracing.resolve(part), why)
    return tracing.resolve(part)


class _Split(OpRule):
    """``split``/``chunk``: along another dim every part keeps all the units; along the unit
    dim each part keeps its own (the spaces a boundary cuts are refined there). The fragment
    splits with the same constants, so a part's units are kept whole wherever a sliced part
    would move a boundary: every part of ``chunk`` and of ``split`` with a list of sizes, and
    every part but the last of ``split`` with one size (CSPNet's ``x.split(c // 2)``)."""

    functions, methods = (torch.split, torch.chunk), ("split", "chunk")

    def layout(self, node, ins, tracing):
        lay, src = ins[0], _arg0(node)
        ndim = len(_shape(src))
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0) % ndim
        metas = node.meta.get("tensor_meta")
        sizes = [m.shape[dim] for m in metas]
        if dim != lay.dim:
            tracing.parts[node] = [lay] * len(sizes)
            return lay
        if lay.inner != 1:
            raise UnsupportedLayerError(_name(node.target), _path(node), f"{node.name} splits a "
                                        "flattened unit map")
        how = node.kwargs.get("split_size_or_sections", node.kwargs.get("split_size", node.kwargs.get(
            "chunks", node.args[1] if len(node.args) > 1 else None)))
        by_size = _name(node.target) == "split" and isinstance(how, int)
        parts, rest = [], lay
        for k, size in enumerate(sizes):
            part, rest = tracing.cut(node, rest, size) if k + 1 < len(sizes) else (rest, None)
            parts.append(part)
        why = f"split by {node.name} at {_path(node)} with constant part sizes {sizes}"
        for k, part in enumerate(parts):
            if not (by_size and k + 1 == len(parts)):
                tracing.fix(tracing.resolve(part), why)
        tracing.parts[node] = parts
        return lay


class _Gather(OpRule):
    """Gathering along another dim keeps every unit whole."""

    methods = ("gather",)

    def layout(self, node, ins, tracing):
        if node.args[1] % len(_shape(_arg0(node))) == ins[0].dim:
            raise UnsupportedLayerError("gather", _path(node), f"{node.name} gathers along the unit dim")
        return ins[0]


class _Squeeze(OpRule):
    """Squeezing another dim only renumbers the unit dim."""

    methods = ("squeeze",)

    def layout(self, node, ins, tracing):
        d = node.args[1] % len(_shape(_arg0(node)))
        lay = ins[0]
        if d == lay.dim:
            raise UnsupportedLayerError("squeeze", _path(node), f"{node.name} squeezes the unit dim")
        return lay.at(lay.dim - (1 if d < lay.dim else 0))


class _Join(OpRule):
    """add / mul: operands with units become one group (``_Tracing.join``)."""

    def __init__(self, kind: str, functions: tuple, methods: tuple[str, ...]):
        self.kind, self.functions, self.methods = kind, functions, methods

    def layout(self, node, ins, tracing):
        return tracing.join(node, self.kind)


class _Flatten(OpRule):
    """Flattening from the unit dim on keeps units contiguous (``_flatten``)."""

    functions, methods = (torch.flatten,), ("flatten",)

    def layout(self, node, ins, tracing):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return _flatten(node, _arg0(node), ins[0], start, end)


class _Permute(OpRule):
    """Permuting dims moves the unit dim, never mixes units."""

    functions, methods = (torch.permute,), ("permute",)

    def layout(self, node, ins, tracing):
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) \
            else node.args[1:]
        dims = node.kwargs.get("dims", dims)
        ndim = len(_shape(_arg0(node)))
        return ins[0].at([d % ndim for d in dims].index(ins[0].dim))


class _Transpose(OpRule):
    """Swapping two dims moves the unit dim if it is one of them."""

    functions, methods = (torch.transpose,), ("transpose",)

    def layout(self, node, ins, tracing):
        d0, d1 = (x % len(_shape(_arg0(node))) for x in node.args[1:3])
        lay = ins[0]
        return lay.at(d1 if lay.dim == d0 else d0 if lay.dim == d1 else lay.dim)


def _unfollowed(node: fx.Node, lay: Layout, tracing: _Tracing, does: str, e_g: str) -> None:
    """A reshape that mixes the unit dim with other dims (``does``): its units are kept whole
    (the model's own constants then still fit) and not followed beyond it."""
    shapes = f"{tuple(_shape(_arg0(node)))} -> {tuple(_shape(node))}"
    tracing.fix(lay, f"{node.name} at {_path(node)} {does} their dim {shapes} ({e_g}): the "
                     "slicer does not follow units through it, so they are kept whole")
    tracing.lost.append((node, f"it {does} the unit dim ({shapes}), so the units are kept whole "
                               "and not followed beyond it"))
    return None


class _Reshape(OpRule):
    """``view``/``reshape`` that keeps the unit dim whole: it may add or drop size-1 dims
    (an SE block's ``x.view(b, c, 1, 1)``), reshape the dims after it among themselves, or merge
    them into it (``x.view(x.size(0), -1)``: each unit then holds their positions). One that
    splits the unit dim or merges it with other dims (a channel shuffle, a patch unfold) keeps
    its units whole and is not followed (``_unfollowed``). A unit count written as a constant
    (``view(b, 64, 1, 1)``) could not follow a sliced group, so that group is kept whole."""

    functions, methods = (torch.reshape,), ("view", "reshape")

    def layout(self, node, ins, tracing):
        lay, src = ins[0], _arg0(node)
        shape_in, shape_out = _shape(src), _shape(node)
        before = math.prod(shape_in[:lay.dim])
        e = next((i for i in range(len(shape_out)) if math.prod(shape_out[:i]) == before), None)
        while e is not None and e + 1 < len(shape_out) and shape_out[e] == 1 \
                and shape_in[lay.dim] != 1:
            e += 1                                   # size-1 dims inserted before the units
        if e is not None and lay.inner == 1 and shape_out[e] < shape_in[lay.dim] and \
                any(math.prod(shape_out[e:k]) == shape_in[lay.dim] for k in range(e + 2, len(shape_out) + 1)):
            return _unfollowed(node, lay, tracing, "splits", "a channel shuffle")
        if e is None or shape_out[e] % shape_in[lay.dim]:
            return _unfollowed(node, lay, tracing, "merges with the dims before it",
                               "a patch unfold")
        merged = shape_out[e] // shape_in[lay.dim]
        after, k = 1, lay.dim + 1
        while after < merged and k < len(shape_in):
            after *= shape_in[k]
            k += 1
        if after != merged:
            return _unfollowed(node, lay, tracing, "merges with part of a dim after it", "a fold")
        sizes = node.args[1:] if node.op == "call_method" else node.args[1:2]
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
            sizes = sizes[0]
        named = sizes[e] if len(sizes) == len(shape_out) else None
        if isinstance(named, int) and named != -1:
            tracing.fix(lay, f"{node.name} writes their count as the constant {named} "
                             f"({_path(node)})")
        return Layout(e, lay.segments, lay.inner * merged)


class _Pass(OpRule):
    """Ops that act on each unit alone (first argument = the tensor): the layout passes."""

    def __init__(self, functions: tuple, methods: tuple[str, ...]):
        self.functions, self.methods = functions, methods

    def layout(self, node, ins, tracing):
        return ins[0]


class _Reduce(OpRule):
    """Reductions over non-unit dims (``_reduce``)."""

    def __init__(self, functions: tuple, methods: tuple[str, ...]):
        self.functions, self.methods = functions, methods

    def layout(self, node, ins, tracing):
        return _reduce(node, _arg0(node), ins[0])


F = nn.functional
_PASS_FUNCS = (torch.relu, F.relu, torch.sigmoid, torch.tanh, F.dropout, F.dropout1d, F.dropout2d,
               F.gelu, F.relu6, F.silu, F.hardswish, F.hardsigmoid, F.elu, F.selu, F.celu, F.mish,
               F.hardtanh, F.softplus, F.leaky_relu, F.sigmoid, F.tanh, torch.relu_, F.relu_,
               F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool1d,
               F.adaptive_max_pool2d, F.avg_pool1d, F.avg_pool2d, F.max_pool1d, F.max_pool2d)
try:   # per-sample (row) dropping: acts on whole rows, never across units
    from torchvision.ops import stochastic_depth as _stochastic_depth
    _PASS_FUNCS += (_stochastic_depth,)
except ImportError:  # pragma: no cover - torchvision is a dependency
    pass
for _rule in (_Cat(), _Shape(), _GetItem(), _Split(), _Gather(), _Squeeze(), _Flatten(), _Permute(),
              _Transpose(), _Reshape(),
              _Join("add", (operator.add, torch.add, operator.iadd), ("add", "add_")),
              _Join("multiply", (operator.mul, torch.mul, operator.imul), ("mul", "mul_")),
              _Pass(_PASS_FUNCS, ("relu", "relu_", "contiguous", "float", "sigmoid", "sigmoid_",
                                  "tanh", "clone")),
              _Reduce((torch.amax, torch.mean, torch.sum), ("amax", "max", "mean", "sum"))):
    register_op_rule(_rule)
del _rule


# --- issue #27 §3 rules: resampling and padding, reductions over the unit dim, a one-unit operand
# broadcast over the units (CBAM's spatial gate), and weightless modules that follow an op rule
def _where(node: fx.Node) -> str:
    """The module path for an error message: a module's own path, else the node's (``_path``)."""
    return str(node.target) if node.op == "call_module" else _path(node)


def _op_name(node: fx.Node, tracing: _Tracing) -> str:
    if node.op == "call_module":
        return type(tracing.modules[node.target]).__name__
    return f"{node.op} {_name(node.target)}"


def _unbroadcast(tracing: _Tracing, node: fx.Node, ops: list[fx.Node], lays: list[Layout | None],
                 kind: str) -> list[Layout | None]:
    """``lays`` without the traced operands that are one position wide on the unit dim while the
    result is wider there: such an operand is broadcast over the other operands' units (CBAM's
    spatial gate ``x * sigmoid(conv(...))``, a 1-channel conv), so its one unit is read by every
    unit of the result and must not be coupled with them unit by unit. Its group is kept whole
    (fixed: dropping its unit would zero the gate) and the operand is then inert, like any tensor
    broadcast over the units."""
    out_shape = _shape(node)
    out = list(lays)
    for i, (op, lay) in enumerate(zip(ops, lays)):
        if lay is None or _shape(op)[lay.dim] != 1:
            continue
        d = lay.dim + len(out_shape) - len(_shape(op))
        if out_shape[d] == 1:
            continue
        tracing.fix(lay, f"its one unit is broadcast over {out_shape[d]} units by the {kind} "
                         f"{node.name} at {_path(node)}")
        out[i] = None
    return out


class _ReduceOverUnits(_Reduce):
    """Reductions (mean, sum, max, min): over other dims the units stay (``_reduce``). A
    reduction over the unit dim (CBAM's channel mean and max, ``x.mean(1, keepdim=True)``) carries
    no units: its value reads every unit of its input, so dropping any of them would change it
    for every layer that reads it, and no repair can be folded into a mean or a max. The groups of
    its input are therefore kept whole (fixed, like the groups a LayerNorm normalises), and the
    result is an untraced tensor: a conv reading it keeps its input channels."""

    def layout(self, node, ins, tracing):
        src, lay = _arg0(node), ins[0]
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        if isinstance(dims, fx.Node) or lay is None:  # torch.max(a, b): element-wise, two tensors
            raise _refusal(node)
        ndim = len(_shape(src))
        if dims is None or lay.dim not in [d % ndim for d in (dims if isinstance(dims, (list, tuple))
                                                              else [dims])]:
            return _reduce(node, src, lay)
        tracing.fix(lay, f"reduced over its units by {_name(node.target)} ({node.name}) at "
                         f"{_path(node)}: a dropped unit would change what every later reader "
                         "of the reduction sees")
        return None


class _Resample(OpRule):
    """``F.interpolate`` / ``nn.Upsample``: each channel's map is resampled on its own (dims 2
    on), so the units pass through while they lie on dim 1."""

    functions = (F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear)
    modules: tuple[type, ...] = (nn.Upsample,)

    def layout(self, node, ins, tracing):
        lay = ins[0]
        if lay.dim >= 2 or lay.inner != 1:
            raise UnsupportedLayerError(_op_name(node, tracing), _where(node), f"{node.name} "
                                        f"resamples dims 2 on, and the units lie on dim {lay.dim}"
                                        + (" (a flattened map)" if lay.inner != 1 else ""))
        return lay


class _Pad(OpRule):
    """``F.pad`` and the padding modules (zero, constant, reflection, replication, circular):
    padding other dims keeps every unit's values apart (a constant pad value is the same for
    every unit; the repair is applied after it, at the next consumer's gate). Padding the unit
    dim would add units that no layer produces, so it is refused."""

    functions = tuple({F.pad, torch._C._nn.pad})
    modules: tuple[type, ...] = tuple(getattr(nn.modules.padding, n) for n in (
        "_ConstantPadNd", "_ReflectionPadNd", "_ReplicationPadNd", "_CircularPadNd")
        if hasattr(nn.modules.padding, n))

    def layout(self, node, ins, tracing):
        lay = ins[0]
        if node.op == "call_module":
            pad = tuple(tracing.modules[node.target].padding)
        else:
            pad = node.kwargs.get("pad", node.args[1] if len(node.args) > 1 else None)
        j = len(_shape(_arg0(node))) - 1 - lay.dim          # pad lists the last dim first
        amounts = tuple(pad[2 * j:2 * j + 2]) if pad is not None else ("?",)
        if any(not isinstance(p, int) or p != 0 for p in amounts):
            raise UnsupportedLayerError(_op_name(node, tracing), _where(node), f"{node.name} pads "
                                        f"the unit dim {lay.dim} by {amounts}: padded positions "
                                        "would be units that no layer produces")
        return lay


#: weightless module type -> the op rule it follows (looked up along the MRO; modules with a
#: handler or in ``CHANNELWISE`` never get here)
MODULE_RULES: dict[type, OpRule] = {}


def register_module_rule(rule: OpRule) -> Callable[[], None]:
    """Route the module types ``rule.modules`` to ``rule``; returns a function that undoes it."""
    return _register(MODULE_RULES, tuple(getattr(rule, "modules", ())), rule)


def _module_rule(mod: nn.Module) -> OpRule | None:
    return next((MODULE_RULES[c] for c in type(mod).__mro__ if c in MODULE_RULES), None)


for _rule in (_ReduceOverUnits((torch.amax, torch.mean, torch.sum, torch.max, torch.amin, torch.min),
                               ("amax", "max", "mean", "sum", "amin", "min")),
              _Resample(), _Pad()):
    register_op_rule(_rule)
    register_module_rule(_rule)
del _rule


def trace(features: nn.Module, example: torch.Tensor, layernorm: str = "keep") -> SliceGraph:
    """Trace ``features`` on ``example`` and return its groups and a gated GraphModule.

    ``layernorm`` (``SliceConfig.layernorm``): "keep" keeps the units a LayerNorm normalises
    whole; "repair" lets them be sliced when the LayerNorm normalises one group on the last dim.
    Its input is then gated, so that it reads dropped units rebuilt through the group's repair,
    as the fused ``RepairedLayerNorm`` will."""
    gm = symbolic_trace(features, example)   # untraceable code: UnsupportedLayerError naming the module
    ShapeProp(gm).propagate(example)
    st = _Tracing(gm)
    out_node: fx.Node | None = None
    for pos, node in enumerate(gm.graph.nodes):
        st.pos = pos
        args = [a for a in node.args if isinstance(a, fx.Node)]
        lay_in = st.layouts.get(args[0]) if args else None
        if node.op == "placeholder" or node.op == "get_attr":
            continue
        if node.op == "output":
            out_node = node.args[0]
            continue
        if node.op == "call_module" and OPAQUE in node.meta:    # untraceable: kept whole
            why = f"read by {node.target} ({type(st.modules[node.target]).__name__}), kept " \
                  f"whole ({node.meta[OPAQUE]})"
            for a in node.all_input_nodes:
                if a in st.layouts:
                    st.fix(st.layouts[a], why)
            continue                                   # no units are followed out of it
        if node.op == "call_module":
            mod = st.modules[node.target]
            h = handler_for(mod)
            if h is not None:
                h.check(mod, node.target)
            if any(True for _ in mod.parameters(recurse=False)) or h is not None:
                if node.target in st.called:   # one module, two layers: one set of kept units cannot serve both
                    raise ConfigError(f"module {node.target} ({type(mod).__name__}) is called more than "
                                      "once (shared weights); the slicer needs one call per layer")
                st.called.add(node.target)
            if h is not None and h.consumes(mod):          # conv / linear / recurrent
                if lay_in is not None:
                    expected = len(_shape(args[0])) - 1 if (isinstance(mod, nn.Linear) or h.recurrent) else 1
                    if lay_in.dim != expected:
                        raise UnsupportedLayerError(type(mod).__name__, node.target,
                                                    "units are not on its input channel dim")
                    st.consumers.append((node.target, args[0]))
                if h.recurrent:   # (output sequence, final state): units on the last dim of both
                    out_dim, size = 2, mod.hidden_size
                    st.recurrent.add(node)
                else:
                    out_dim = len(_shape(node)) - 1 if isinstance(mod, nn.Linear) else 1
                    size = _shape(node)[out_dim]
                inner = h.out_inner(mod)             # a head of head_dim outputs is one unit
                sid = st.new_space(node, node.target, size // inner, pos)
                st.layouts[node] = Layout(out_dim, [(sid, st.sizes[sid])], inner)
                if h.unit_blocks(mod) > 1:          # a grouped convolution
                    _block_units(st, node, mod, h.unit_blocks(mod), lay_in, sid)
            elif h is not None and h.couples_inputs:        # attention over heads
                st.layouts[node] = st.couple(node, list(node.args[:h.couples_inputs]))
            elif h is not None and h.produces(mod) and not h.consumes(mod) and isinstance(mod, nn.Embedding):
                out_dim = len(_shape(node)) - 1
                sid = st.new_space(node, node.target, _shape(node)[out_dim], pos)
                st.layouts[node] = Layout(out_dim, [(sid, st.sizes[sid])])
            elif h is not None and h.produces(mod):        # BN, depthwise conv, LayerNorm: ride on units
                if lay_in is None:      # channels the slicer does not follow (a shuffled
                    shape = _shape(args[0])     # map, the raw input): they are kept whole
                    dim = (_normalised_dim(mod, shape) if h.normalises else 1)
                    if dim is None or len(shape) < 2:
                        raise UnsupportedLayerError(type(mod).__name__, node.target,
                                                    "it acts on a tensor with no traced units")
                    why = f"read by {node.target} ({type(mod).__name__}) from a tensor whose " \
                          "channels carry no units the slicer follows"
                    lay_in = Layout(dim, [(st.opaque(shape[dim], why), shape[dim])])
                if is_depthwise(mod) and lay_in.dim != 1:
                    raise UnsupportedLayerError(type(mod).__name__, node.target,
                                                "units are not on its input channel dim")
                if lay_in.inner != 1:       # its parameters would index positions, not units
                    raise UnsupportedLayerError(type(mod).__name__, node.target,
                                                f"it reads a flattened unit map ({lay_in.inner} "
                                                "positions per unit) and has one parameter per "
                                                "position; only consumers (conv, linear) and "
                                                "parameter-free ops may read flattened maps")
                if h.normalises:
                    _check_normalised(node, mod, args[0], lay_in)
                    one = len(lay_in.segments) == 1 and lay_in.dim == len(_shape(args[0])) - 1
                    if one and args[0] in st.layouts:   # not an untraced (opaque) input
                        st.norms.append((node.target, args[0], lay_in.segments[0][0]))
                    if not (one and layernorm == "repair"):
                        st.fix(lay_in, f"normalised over its units by {node.target} "
                                       f"({type(mod).__name__})")
                why = h.fixes(mod, node.target, lay_in.dim, len(_shape(args[0])))
                if why:
                    st.fix(lay_in, why)
                for sid, off, _ in lay_in.with_offsets():
                    st.members.append((node.target, sid, off))
                st.layouts[node] = lay_in
            elif isinstance(mod, CHANNELWISE):
                if lay_in is not None:
                    st.layouts[node] = lay_in
            elif isinstance(mod, nn.Flatten):
                if lay_in is not None:
                    st.layouts[node] = _flatten(node, args[0], lay_in, mod.start_dim, mod.end_dim)
            elif _module_rule(mod) is not None:        # weightless: Upsample, pads
                lay = _module_rule(mod).layout(node, [lay_in], st) if lay_in is not None else None
                if lay is not None:
                    st.layouts[node] = lay
            elif lay_in is not None or any(True for _ in mod.parameters()):
                raise UnsupportedLayerError(type(mod).__name__, node.target,
                                            f"the slicer has no handler for {type(mod).__name__}; "
                                            "register one in snp_ray.slicing.handlers")
            continue
        # call_function / call_method: the op's rule says where its units go
        rule = _rule_for(node)
        ins = [st.layouts.get(a) for a in (rule.inputs(node) if rule else args)]
        if not any(ins):
            continue                                   # no units flow through it
        if rule is None:
            raise _refusal(node)
        lay = rule.layout(node, ins, st)
        if lay is not None:
            st.layouts[node] = lay
    if out_node is None or out_node not in st.layouts:
        if st.lost:
            node, why = st.lost[0]
            raise UnsupportedLayerError(f"{node.op} {_name(node.target)}", _path(node),
                                        f"{why}; the extractor's output carries no traced units")
        raise ConfigError("the feature extractor's output carries no traced units")

    # groups = union-find roots
    roots = sorted({st.uf.find(s) for s in st.sizes}, key=lambda r: min(st.first_seen[s] for s in st.sizes if st.uf.find(s) == r))
    gid_of = {r: i for i, r in enumerate(roots)}
    groups = [Group(id=i, size=st.sizes[r]) for i, r in enumerate(roots)]
    for sid in st.sizes:
        g = groups[gid_of[st.uf.find(sid)]]
        if st.sizes[sid] != g.size:
            raise ConfigError("coupled unit spaces of different sizes")
        g.producers += st.producers[sid]
        g.order = min(g.order or st.first_seen[sid], st.first_seen[sid])
    for name, sid, off in st.members:
        groups[gid_of[st.uf.find(sid)]].producers.append((name, off))
    for sid, why in st.fixed.items():
        g = groups[gid_of[st.uf.find(sid)]]
        g.fixed = g.fixed or why
    for sid, n in st.blocks.items():            # grouped convolutions: see _block_units
        g = groups[gid_of[st.uf.find(sid)]]
        g.blocks = math.lcm(g.blocks, n)
        g.block_diagonal = g.block_diagonal or sid in st.block_diagonal

    def gid(sid: int) -> int:
        return gid_of[st.uf.find(sid)]

    # one gate after every tensor a consumer (or, in "repair" mode, a LayerNorm) reads, and one
    # on the output
    gated: dict[fx.Node, str] = {}
    gate_layouts: dict[str, list[Segment]] = {}
    consumer_inner: dict[str, int] = {}

    def gate(node: fx.Node, lay: Layout) -> None:
        """One gate after ``node`` (whose layout is ``lay``), whatever number of readers."""
        if node not in gated:
            gated[node] = f"gate{len(gated)}"
            gate_layouts[gated[node]] = [(gid(s), off, size) for s, off, size in lay.with_offsets()]
    for cname, node in st.consumers:
        lay = st.layouts[node]
        if lay.inner != 1:
            consumer_inner[cname] = lay.inner
        gate(node, lay)
        for s, off, _ in lay.with_offsets():
            groups[gid(s)].consumers.append((cname, off))
    for name, node, sid in st.norms:
        lay = st.layouts[node]
        if len(lay.segments) != 1:       # its units were cut into several groups since: whole
            for s, _ in lay.segments:
                groups[gid(s)].fixed = groups[gid(s)].fixed or \
                    f"normalised over its units by {name}, which were cut into several groups"
            continue
        groups[gid(lay.segments[0][0])].norms.append(name)
        if layernorm == "repair":                # it reads its units rebuilt
            gate(node, lay)
    out_lay = st.layouts[out_node]
    output_layout = [(gid(s), off, size) for s, off, size in out_lay.with_offsets()]
    gated.setdefault(out_node, f"gate{len(gated)}")
    gate_layouts[gated[out_node]] = output_layout
    for g, off, _ in output_layout:
        groups[g].output_offsets.append(off)
    # a recurrent layer's units are scored on their whole output map (every time step), not on
    # the state its consumers read: a score-only gate there, and the other gates stop scoring it
    scored_at: dict[int, str] = {}
    score_only: dict[fx.Node, str] = {}
    for node in st.sequences:
        gname = f"score{len(score_only)}"
        score_only[node] = gname
        gate_layouts[gname] = [(gid(s), off, size) for s, off, size in st.layouts[node].with_offsets()]
        scored_at.update((g, gname) for g, _, _ in gate_layouts[gname])
    for node, gname in list(gated.items()) + list(score_only.items()):
        for g, off, _ in gate_layouts[gname]:
            groups[g].gates.append((gname, off))
        scores = {g for g, _, _ in gate_layouts[gname] if scored_at.get(g, gname) == gname}
        rows, batch = _shape(node)[0], example.shape[0]
        if st.layouts[node].dim == 0 or rows % batch:
            raise UnsupportedLayerError(f"{node.op} {_name(node.target)}", _path(node),
                                        f"{node.name} {tuple(_shape(node))}: its first dim is not "
                                        f"the batch ({batch} inputs), nor the batch merged with "
                                        "other dims")
        gm.add_submodule(gname, Gate(gname, st.layouts[node].dim, gate_layouts[gname], scores,
                                     repairs=node not in score_only, inner=st.layouts[node].inner,
                                     rows=rows // batch))
        with gm.graph.inserting_after(node):
            gate_node = gm.graph.call_module(gname, (node,))
        node.replace_all_uses_with(gate_node, delete_user_cb=lambda user: user is not gate_node)
    gm.graph.lint()
    gm.recompile()
    return SliceGraph(gm, groups, gate_layouts, output_layout, st.extra, consumer_inner, out_lay.inner)


# ------------------------------------------------------------------ grouped convolutions
def _block_units(st: _Tracing, node: fx.Node, mod: nn.Module, blocks: int, lay_in: Layout | None,
                 sid: int) -> None:
    """A grouped convolution (``blocks`` = its groups) reads ``blocks`` equal blocks of its input
    units and writes ``blocks`` equal blocks of output units, output block g reading input block
    g only. Both unit spaces keep the same number of units in every block (so the fragment is a
    grouped convolution with the same groups), and the input's repairs, which it absorbs, stay
    inside the blocks. Spaces coupled later take the lcm of their block counts: every count
    divides the group's size, so the lcm blocks refine all of them."""
    st.blocks[sid] = math.lcm(st.blocks.get(sid, 1), blocks)
    if lay_in is None:
        return                                       # it reads the raw input
    op = f"grouped {type(mod).__name__} (groups={blocks}, {mod.in_channels}->{mod.out_channels} channels)"
    if len(lay_in.segments) != 1 or lay_in.inner != 1:
        raise UnsupportedLayerError(op, node.target, "it reads a concatenation of several unit "
                                    "groups (or a flattened map); each of its groups must read "
                                    "the same number of kept units of one group")
    (src, _), = lay_in.segments
    st.blocks[src] = math.lcm(st.blocks.get(src, 1), blocks)
    st.block_diagonal.add(src)


def _name(target) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", repr(target))


def _path(node: fx.Node) -> str:
    """The module path a graph node sits in (its innermost traced module), for error messages."""
    stack = node.meta.get("nn_module_stack") or {}
    path = next(reversed(stack), None) if stack else None
    return f"{path} ({node.name})" if path else node.name


def _check_normalised(node: fx.Node, mod: nn.Module, src: fx.Node, lay: Layout) -> None:
    """A LayerNorm must normalise exactly the unit dim: the last dim for ``nn.LayerNorm`` itself,
    the channel dim for a channels-first subclass (one that overrides ``forward``)."""
    shape = getattr(mod, "normalized_shape", None)
    ok = shape is not None and tuple(shape) == (lay.width,)
    if not ok or _normalised_dim(mod, _shape(src)) != lay.dim:
        raise UnsupportedLayerError(type(mod).__name__, node.target,
                                    "it does not normalise exactly the unit dim")


@torch.no_grad()
def _normalised_dim(mod: nn.Module, shape: tuple[int, ...]) -> int | None:
    """The dim a LayerNorm (or a subclass with its own ``forward``: timm's fast LayerNorm,
    a channels-first LayerNorm2d) normalises, found by running it on a probe, not by its name."""
    x = torch.randn((1, *shape[1:]), generator=torch.Generator().manual_seed(0),
                    dtype=mod.weight.dtype if getattr(mod, "weight", None) is not None else None)
    try:
        y = mod(x)
    except (RuntimeError, ValueError):
        return None
    for d in dict.fromkeys((x.dim() - 1, 1)):
        if (x.shape[d],) != tuple(mod.normalized_shape):
            continue
        ref = F.layer_norm(x.movedim(d, -1), tuple(mod.normalized_shape), mod.weight, mod.bias,
                           mod.eps).movedim(-1, d)
        if torch.allclose(y, ref, rtol=1e-4, atol=1e-5):
            return d
    return None


def _source(node: fx.Node) -> str:
    """The module whose output ``node`` is, or reads from most directly (for error messages)."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop(0)
        if n.op == "call_module":
            return f"module {n.target}"
        seen.add(n)
        stack.extend(a for a in n.all_input_nodes if a not in seen)
    return f"node {node.name}"


def _flatten(node: fx.Node, src: fx.Node, lay: Layout, start: int, end: int = -1) -> Layout:
    """Flattening dims ``start..end``. With the unit dim first among them, unit u's values end
    up contiguous: the positions u*P .. u*P+P-1 of the new dim, P = the product of the other
    flattened sizes (times the layout's own positions per unit). A unit dim inside the range
    but not first would interleave units with the dims before it."""
    shape = _shape(src)
    start, end = start % len(shape), end % len(shape)
    if lay.dim < start:
        return lay
    if lay.dim > end:
        return lay.at(lay.dim - (end - start))
    if lay.dim == start:
        return Layout(start, lay.segments, lay.inner * math.prod(shape[start + 1:end + 1]))
    raise UnsupportedLayerError("flatten", _path(node), f"{node.name}: flattening dims "
                                f"{start}..{end} mixes the unit dim {lay.dim} with the dims before "
                                "it (units would interleave); flatten from the unit dim on")


def _reduce(node: fx.Node, src: fx.Node, lay: Layout) -> Layout:
    ndim = len(_shape(src))
    dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
    if dims is None:
        raise UnsupportedLayerError(_name(node.target), _path(node),
                                    f"{node.name} reduces over every dim, units included")
    dims = [d % ndim for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    if lay.dim in dims:
        raise UnsupportedLayerError(_name(node.target), _path(node),
                                    f"{node.name} reduces over the unit dim")
    shift = 0 if keep else sum(1 for d in dims if d < lay.dim)
    return lay.at(lay.dim - shift)


class Gate(nn.Module):
    """Sits on a traced tensor. Idle it is the identity; it can record per-unit norms (for
    scores and the l2,1 penalty) and rebuild dropped units from kept ones through a repair.

    ``scores``: the groups whose norms this gate records (default: all of its segments);
    ``repairs``: False for a score-only gate, which never rebuilds units;
    ``inner``: positions of ``dim`` per unit (a flattened channel map's H*W). A unit's norm is
    taken over all its positions and a repair rebuilds every position, as on a conv map.
    ``rows``: rows of dim 0 per input sample, where the batch was merged with other dims
    (MobileViT's unfolded patches, ``(batch * patch_area, patches, dim)``, sample-major): a
    unit's norm for a sample is taken over all of the sample's rows."""

    def __init__(self, name: str, dim: int, segments: list[Segment], scores: set[int] | None = None,
                 repairs: bool = True, inner: int = 1, rows: int = 1):
        super().__init__()
        self.gate_name, self.dim, self.segments = name, dim, segments
        self.scores = {g for g, _, _ in segments} if scores is None else set(scores)
        self.repairs = repairs
        self.inner = int(inner)
        self.rows = int(rows)
        self.state: "GateState | None" = None

    def unit_view(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with one index per unit on ``dim``: a flattened map's unit dim is split into
        (units, positions per unit), the positions becoming one more non-unit dim."""
        return x.unflatten(self.dim, (-1, self.inner)) if self.inner != 1 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self.state
        if st is None:
            return x
        units = self.unit_view(x)
        pieces, changed = [], False
        for g, off, size in self.segments:
            seg = units.narrow(self.dim, off, size)
            if g in st.observe and g in self.scores:
                other = [d for d in range(units.dim()) if d not in (0, self.dim)]
                if self.rows != 1:                  # (batch * rows, units) -> (batch, units)
                    sq = seg.pow(2).sum(dim=other) if other else seg.pow(2)
                    norms = sq.unflatten(0, (-1, self.rows)).sum(1).clamp_min(1e-12).sqrt()
                else:
                    norms = seg.pow(2).sum(dim=other).clamp_min(1e-12).sqrt() if other else seg.abs()
                st.record(g, norms)
            repair = st.repairs.get(g) if self.repairs else None
            if repair is not None:
                kept, dropped, mat = repair
                k = seg.index_select(self.dim, kept).movedim(self.dim, -1)
                rebuilt = (k @ mat.t()).movedim(-1, self.dim)
                seg = seg.index_copy(self.dim, dropped, rebuilt.to(seg.dtype))
                changed = True
            pieces.append(seg)
        if not changed:
            return x
        out = torch.cat(pieces, dim=self.dim) if len(pieces) > 1 else pieces[0]
        return out.flatten(self.dim, self.dim + 1) if self.inner != 1 else out


class GateState:
    """What all gates of one graph do on the next forward."""

    def __init__(self):
        self.observe: set[int] = set()
        self.repairs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.records: dict[int, list[torch.Tensor]] = {}

    def record(self, g: int, norms: torch.Tensor) -> None:
        self.records.setdefault(g, []).append(norms)

    def unit_norms(self, g: int) -> torch.Tensor:
        """(batch, units): summed over every gate of group ``g`` seen in the last forward."""
        recs = self.records.get(g)
        if not recs:
            raise RuntimeError(f"group {g} was not observed")
        return torch.stack(recs).sum(0)

    def reset_records(self) -> None:
        self.records.clear()


def attach(graph: SliceGraph) -> GateState:
    state = GateState()
    for m in graph.module.modules():
        if isinstance(m, Gate):
            m.state = state
    return state
