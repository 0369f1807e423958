"""One fx tracer for the whole package: which modules stay whole, and tracing that is safe
beside other threads.

Bringing an outside model in (``split_classifier``) and slicing it trace the same graph, so both
must agree on which modules are leaves: every module type some slicing handler knows
(``LEAF_TYPES``, looked up along the MRO, so timm's LayerNorm or BatchNormAct2d subclasses stay
one module). The slicer registers each handler's type here (``register_leaf``); a test keeps the
two lists in step. ``CHANNELWISE`` lists the modules that act on each channel alone.

A module whose own Python cannot be traced (control flow on a shape, MobileViT's patch folding)
is kept whole instead of refusing the model: the trace is retried with it as a leaf, and its call
node is marked ``node.meta[OPAQUE]`` with the reason. The slicer keeps the units it reads and
follows none out of it (docs/SLICING.md, "Untraceable blocks").
"""
from __future__ import annotations

import copy
import logging
import threading
from typing import Callable

import torch
import torch.fx as fx
from torch import nn

from snp_ray.errors import UnsupportedLayerError
from snp_ray.models.attention import HeadAttention, HeadProjection

log = logging.getLogger(__name__)

#: ``node.meta`` key of a module call kept whole because its forward is untraceable (the reason)
OPAQUE = "snp_opaque"
#: at most this many untraceable modules are kept whole before a model is refused
MAX_OPAQUE = 64

#: module types that stay one module in a trace (the types slicing has a handler for)
LEAF_TYPES: set[type] = {nn.Conv1d, nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d,
                         nn.InstanceNorm1d, nn.InstanceNorm2d, nn.GroupNorm, nn.LayerNorm,
                         nn.Embedding, nn.GRU, nn.LSTM, nn.RNN, nn.PReLU, HeadProjection,
                         HeadAttention}

#: modules that keep units apart (act on each channel alone) and so pass a channel layout through
CHANNELWISE: tuple[type, ...] = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.Tanh, nn.Sigmoid,
                                 nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
                                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                                 nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Dropout,
                                 nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity, nn.SiLU,
                                 nn.Hardswish, nn.Hardsigmoid, nn.ELU, nn.SELU, nn.CELU, nn.Mish,
                                 nn.Softplus, nn.Hardtanh, nn.PReLU)


def register_leaf(module_type: type) -> Callable[[], None]:
    """Keep ``module_type`` (and its subclasses) one module in traces; returns an undo."""
    new = module_type not in LEAF_TYPES
    LEAF_TYPES.add(module_type)
    return (lambda: LEAF_TYPES.discard(module_type)) if new else (lambda: None)


def is_leaf(module: nn.Module) -> bool:
    return isinstance(module, tuple(LEAF_TYPES))


#: One fx trace at a time in this process. While ``fx.Tracer.trace`` runs it patches
#: ``nn.Module.__call__`` and ``__getattr__`` on the class (process-wide) and restores whatever it
#: found on exit, so two overlapping traces could restore each other's patch and leave every
#: module call of the process going through a finished tracer.
TRACE_LOCK = threading.Lock()


class LeafTracer(fx.Tracer):
    """fx tracing where every module of a ``LEAF_TYPES`` type is a leaf.

    Thread-confined: the class-wide patches that fx installs while tracing also catch module
    calls of *other* threads (a service rebuilding a fragment beside predictions and pack
    builds), which plain fx turns into graph nodes or a ``NameError: module is not installed as
    a submodule``. Here those calls and attribute reads go straight to the real module, so a
    trace leaves every other thread's forward as it would run without it."""

    _thread: int | None = None       # the thread that runs trace()
    #: the innermost module whose forward raised while tracing (for the error message)
    failed_in: str | None = None
    #: its path (None: the root's own code raised)
    failed_path: str | None = None

    _evaluating = False              # running the graph so far on the examples (a branch)

    def __init__(self, opaque: frozenset[str] = frozenset(), examples: tuple = ()):
        super().__init__()
        self.opaque = opaque             # module paths kept whole (untraceable forwards)
        self.examples = examples         # inputs that decide branches on traced values
        self.branches: list[tuple[str, bool]] = []

    def trace(self, root, concrete_args=None) -> fx.Graph:
        self._thread = threading.get_ident()
        self.failed_in = self.failed_path = None
        return super().trace(root, concrete_args)

    def to_bool(self, obj: fx.Proxy) -> bool:
        """A branch on a traced value (MobileViT: ``if new_h != H``) is decided by running the
        graph so far on the examples: two batch sizes of the market's input. The graph keeps the
        branch taken, so it holds for that input size; a branch whose outcome changes with the
        batch size is refused."""
        if not self.examples:
            return super().to_bool(obj)
        g = fx.Graph()
        env: dict = {}
        g.graph_copy(self.graph, env)
        g.output(env[obj.node])
        self._evaluating = True
        try:
            gm = fx.GraphModule(self.root, g)
            with torch.no_grad():
                taken = {bool(gm(x)) for x in self.examples}
        finally:
            self._evaluating = False
        if len(taken) != 1:
            raise fx.proxy.TraceError(f"the branch on {obj.node.name} depends on the batch size")
        self.branches.append((obj.node.name, taken.pop()))
        return self.branches[-1][1]

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return super().is_leaf_module(m, qualname) or is_leaf(m) or qualname in self.opaque

    def call_module(self, m: nn.Module, forward, args, kwargs):
        if threading.get_ident() != self._thread or self._evaluating:
            return forward(*args, **kwargs)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_path = self.path_of_module(m) or None
                self.failed_in = f"{self.failed_path or '<root>'} ({type(m).__name__})"
            raise

    def getattr(self, attr: str, attr_val, parameter_proxy_cache):
        if threading.get_ident() != self._thread or self._evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


def symbolic_trace(module: nn.Module, example: torch.Tensor | None = None) -> fx.GraphModule:
    """``module`` as a GraphModule (a GraphModule's own graph is copied, keeping its meta).

    With ``example`` (a batch of the input), a branch on a traced value is decided on it
    (``LeafTracer.to_bool``). Other untraceable code (a branch without an example, ``int()`` of
    a shape) inside a submodule keeps that submodule whole: the trace is retried with it as a
    leaf, and its call node carries ``meta[OPAQUE]`` (why). Untraceable code in ``module``'s own
    forward, or in more than ``MAX_OPAQUE`` submodules, is an ``UnsupportedLayerError`` naming
    the module."""
    if isinstance(module, fx.GraphModule):
        return fx.GraphModule(module, copy.deepcopy(module.graph))
    examples = () if example is None else (example, torch.cat([example, example[:1]]))
    opaque: dict[str, str] = {}
    while True:
        tracer = LeafTracer(frozenset(opaque), examples)
        try:
            with TRACE_LOCK:              # see TRACE_LOCK: fx's patches are process-wide
                graph = tracer.trace(module)
            break
        except Exception as e:  # fx raises many types for untraceable code
            why = f"{type(e).__name__}: {e}"
            path = tracer.failed_path
            if path is None or path in opaque or len(opaque) >= MAX_OPAQUE:
                where = tracer.failed_in or f"<root> ({type(module).__name__})"
                raise UnsupportedLayerError("untraceable Python (fx symbolic tracing)", where,
                                            why) from None
            opaque[path] = f"untraceable Python in {tracer.failed_in}: {why.splitlines()[0]}"
            log.info("%s is kept whole: %s", tracer.failed_in, opaque[path])
    for node in graph.nodes:
        if node.op == "call_module" and node.target in opaque:
            node.meta[OPAQUE] = opaque[node.target]
    gm = fx.GraphModule(module, graph, type(module).__name__)
    if tracer.branches:             # the conditions' nodes feed nothing now
        log.info("%s: branches decided on the example input: %s", type(module).__name__,
                 ", ".join(f"{n}={v}" for n, v in tracer.branches))
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return gm
