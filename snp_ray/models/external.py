"""Bring an outside classifier (torchvision, timm) into the zoo's features + head contract.

:func:`split_classifier` finds the head by tracing, never by attribute names: the last
``nn.Linear`` whose output is the model's output (Dropout/Identity after it are allowed). Everything
before it becomes the feature extractor, an fx GraphModule that returns the head's input.
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from snp_ray.errors import ConfigError
from snp_ray.models.attention import canonicalise
from snp_ray.models.base import Classifier

#: modules allowed between the head and the model's output (identities at inference)
_TRANSPARENT = (nn.Dropout, nn.Identity)


def split_classifier(model: nn.Module, example: torch.Tensor) -> Classifier:
    """``model`` (eval mode is used) as a :class:`Classifier`: ``features`` = the traced graph up
    to the head's input (a flat ``(batch, feature_dim)`` tensor), ``head`` = a copy of the final
    ``nn.Linear``. A model whose output is not produced by one final Linear is a ConfigError."""
    from snp_ray.slicing.graph import symbolic_trace   # slicing imports models: import late

    name = type(model).__name__
    model = canonicalise(copy.deepcopy(model)).eval()   # attention in its sliceable form
    try:
        gm = symbolic_trace(model)
    except Exception as e:  # fx raises many types for untraceable code
        raise ConfigError(f"cannot trace {name} to find its classifier head: {e}") from None
    modules = dict(gm.named_modules())
    out = next(n for n in gm.graph.nodes if n.op == "output")
    node = out.args[0]
    while isinstance(node, fx.Node) and node.op == "call_module" and \
            isinstance(modules[node.target], _TRANSPARENT):
        node = node.args[0]
    if not (isinstance(node, fx.Node) and node.op == "call_module"
            and isinstance(modules[node.target], nn.Linear) and len(node.users) == 1):
        raise ConfigError(f"{name}: its output is not produced by one final nn.Linear head "
                          "(only Dropout/Identity may follow it)")
    if len(node.args) != 1 or not isinstance(node.args[0], fx.Node):
        raise ConfigError(f"{name}: the head {node.target} must take exactly one tensor")
    head = copy.deepcopy(modules[node.target])
    feat = node.args[0]
    out.args = (feat,)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    ShapeProp(gm).propagate(example)
    shape = tuple(feat.meta["tensor_meta"].shape)
    if len(shape) != 2 or shape[1] != head.in_features:
        raise ConfigError(f"{name}: the head {node.target} reads a {shape} tensor, not "
                          f"(batch, {head.in_features}) features")
    clf = Classifier(gm, head.in_features, head.out_features)
    clf.head = head
    clf.head_path = str(node.target)   # the head's module path in ``model`` (for error messages)
    return clf.eval()
