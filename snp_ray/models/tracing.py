"""One fx tracer for the whole package: which modules stay whole, and tracing that is safe
beside other threads.

Bringing an outside model in (``split_classifier``) and slicing it trace the same graph, so both
must agree on which modules are leaves: every module type some slicing handler knows
(``LEAF_TYPES``, looked up along the MRO, so timm's LayerNorm or BatchNormAct2d subclasses stay
one module). The slicer registers each handler's type here (``register_leaf``); a test keeps the
two lists in step. ``CHANNELWISE`` lists the modules that act on each channel alone.
"""
from __future__ import annotations

import copy
import threading
from typing import Callable

import torch.fx as fx
from torch import nn

from snp_ray.errors import UnsupportedLayerError
from snp_ray.models.attention import HeadAttention, HeadProjection

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

    def trace(self, root, concrete_args=None) -> fx.Graph:
        self._thread = threading.get_ident()
        self.failed_in = None
        return super().trace(root, concrete_args)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return super().is_leaf_module(m, qualname) or is_leaf(m)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        if threading.get_ident() != self._thread:
            return forward(*args, **kwargs)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = f"{self.path_of_module(m) or '<root>'} ({type(m).__name__})"
            raise

    def getattr(self, attr: str, attr_val, parameter_proxy_cache):
        if threading.get_ident() != self._thread:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


def symbolic_trace(module: nn.Module) -> fx.GraphModule:
    """``module`` as a GraphModule (a GraphModule's own graph is copied, keeping its meta).
    Untraceable code (control flow on a traced value, ``math.ceil`` of a shape) is an
    ``UnsupportedLayerError`` naming the innermost module whose forward failed."""
    if isinstance(module, fx.GraphModule):
        return fx.GraphModule(module, copy.deepcopy(module.graph))
    tracer = LeafTracer()
    try:
        with TRACE_LOCK:              # see TRACE_LOCK: fx's patches are process-wide
            graph = tracer.trace(module)
    except Exception as e:  # fx raises many types for untraceable code
        where = tracer.failed_in or f"<root> ({type(module).__name__})"
        raise UnsupportedLayerError("untraceable Python (fx symbolic tracing)", where,
                                    f"{type(e).__name__}: {e}") from None
    return fx.GraphModule(module, graph, type(module).__name__)
