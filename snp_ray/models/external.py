"""Bring an outside classifier (torchvision, timm) into the zoo's features + head contract.

:func:`split_classifier` finds the head by tracing, never by attribute names: the last
``nn.Linear`` whose output is the model's output (Dropout/Identity after it are allowed), or a head
made of a 1x1 ``nn.Conv2d`` and global average pooling (:func:`_conv_head`). Everything before it
becomes the feature extractor, an fx GraphModule that returns the head's input.
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
from snp_ray.models.tracing import CHANNELWISE, symbolic_trace

#: modules allowed between the head and the model's output (identities at inference)
_TRANSPARENT = (nn.Dropout, nn.Identity)


def split_classifier(model: nn.Module, example: torch.Tensor) -> Classifier:
    """``model`` (eval mode is used) as a :class:`Classifier`: ``features`` = the traced graph up
    to the head's input (a flat ``(batch, feature_dim)`` tensor), ``head`` = a copy of the final
    ``nn.Linear``. A model whose output is not produced by one final Linear is a ConfigError."""

    name = type(model).__name__
    model = canonicalise(copy.deepcopy(model)).eval()   # attention in its sliceable form
    gm = symbolic_trace(model, example)      # untraceable code: UnsupportedLayerError naming the module
    modules = dict(gm.named_modules())
    out = next(n for n in gm.graph.nodes if n.op == "output")
    node = out.args[0]
    while isinstance(node, fx.Node) and node.op == "call_module" and \
            isinstance(modules[node.target], _TRANSPARENT):
        node = node.args[0]
    conv_head = _conv_head(gm, modules, node, example)
    if conv_head is not None:                       # (head, features' output, head's path)
        head, feat, head_path = conv_head
    else:
        if not (isinstance(node, fx.Node) and node.op == "call_module"
                and isinstance(modules[node.target], nn.Linear) and len(node.users) == 1):
            raise ConfigError(f"{name}: its output is not produced by one final nn.Linear head "
                              "(only Dropout/Identity may follow it) nor by a 1x1 Conv2d head "
                              "and global average pooling")
        if len(node.args) != 1 or not isinstance(node.args[0], fx.Node):
            raise ConfigError(f"{name}: the head {node.target} must take exactly one tensor")
        head, feat, head_path = copy.deepcopy(modules[node.target]), node.args[0], str(node.target)
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
    clf.head_path = head_path          # the head's module path in ``model`` (for error messages)
    return clf.eval()


# --- issue #27 §3: heads made of a 1x1 conv and global average pooling (squeezenet, dla)
def _conv_head(gm: fx.GraphModule, modules: dict[str, nn.Module], node,
               example: torch.Tensor) -> tuple[nn.Linear, fx.Node, str] | None:
    """A head made of a 1x1 ``Conv2d`` and global average pooling, as an ``nn.Linear`` on flat
    features, or None where ``node`` (the model's output, Dropout/Identity stripped) is not one.
    Returns (head, the features' output node, the conv's path); nodes are added to ``gm`` for the
    features' output where needed. Three exact forms:

    - ``conv`` on a 1x1 map, then flatten (timm's dla: pooling, then the conv): the head is the
      conv's weight as a Linear, the features end with the flattened map;
    - ``conv`` -> Dropout/Identity -> global average pooling -> flatten: average pooling is linear
      and a 1x1 conv (stride 1, no padding) acts on each position alike, so pooling first and
      then the conv's Linear computes the same; the features end with the pooled, flattened map;
    - ``conv`` -> a channel-wise non-linearity (squeezenet's ReLU) -> global average pooling ->
      flatten: pooling and the conv no longer commute, so the conv stays in the features, which
      then end with the model's own class scores, and the head is the identity Linear on them.
    """

    def only(n) -> bool:
        return isinstance(n, fx.Node) and len(n.users) == 1

    def is_flatten(n) -> bool:
        if n.op == "call_module":
            m = modules[n.target]
            return isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1
        start = n.args[1] if len(n.args) > 1 else n.kwargs.get("start_dim", 0)
        end = n.args[2] if len(n.args) > 2 else n.kwargs.get("end_dim", -1)
        return n.target in (torch.flatten, "flatten") and start == 1 and end == -1

    def is_global_avg(n) -> bool:
        if n.op == "call_module":
            m = modules[n.target]
            return isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1))
        if n.target is nn.functional.adaptive_avg_pool2d:
            return (n.args[1] if len(n.args) > 1 else n.kwargs.get("output_size")) in (1, (1, 1))
        if n.target in (torch.mean, "mean"):
            dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
            return isinstance(dims, (list, tuple)) and sorted(d % 4 for d in dims) == [2, 3]
        return False

    def pointwise_conv(n) -> nn.Conv2d | None:
        m = modules.get(n.target) if n.op == "call_module" else None
        ok = (isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1) and tuple(m.stride) == (1, 1)
              and tuple(m.padding) == (0, 0) and m.groups == 1 and only(n)
              and len(n.args) == 1 and isinstance(n.args[0], fx.Node))
        return m if ok else None

    if not isinstance(node, fx.Node) or node.op not in ("call_module", "call_function", "call_method"):
        return None
    flat = is_flatten(node)
    n = node.args[0] if flat else node
    if not only(n) or n.op == "placeholder":
        return None
    if flat and pointwise_conv(n) is not None:                      # dla: pooled, then the conv
        ShapeProp(gm).propagate(example)
        if tuple(n.args[0].meta["tensor_meta"].shape[2:]) != (1, 1):
            return None
        src, pool = n.args[0], False
    elif is_global_avg(n) and (flat or (n.target in (torch.mean, "mean")
                                         and not n.kwargs.get("keepdim", False))):
        m, linear = n.args[0], True                                  # the conv, then pooling
        while only(m) and m.op == "call_module" and isinstance(modules[m.target], CHANNELWISE):
            linear = linear and isinstance(modules[m.target], _TRANSPARENT)
            m = m.args[0]
        if pointwise_conv(m) is None:
            return None
        n, src, pool = m, m.args[0], True
        if not linear:              # pooling and the conv do not commute: the conv stays
            k = modules[n.target].out_channels
            ident = nn.Linear(k, k).to(modules[n.target].weight.dtype)
            with torch.no_grad():
                ident.weight.copy_(torch.eye(k))
                ident.bias.zero_()
            return ident, node, str(n.target)
    else:
        return None
    conv = modules[n.target]
    head = nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None)
    head = head.to(conv.weight.dtype)
    with torch.no_grad():
        head.weight.copy_(conv.weight[:, :, 0, 0])
        if conv.bias is not None:
            head.bias.copy_(conv.bias)
    with gm.graph.inserting_after(src):
        pooled = gm.graph.call_function(nn.functional.adaptive_avg_pool2d, (src, 1)) if pool else src
    with gm.graph.inserting_after(pooled):
        feat = gm.graph.call_function(torch.flatten, (pooled, 1))
    return head, feat, str(n.target)
