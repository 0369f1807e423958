"""Typed per-layer handlers: what "keep these units" and "absorb a repair" mean for each module.

The slicing algorithm never asks what architecture it is working on; it asks the handler of a
module type. Adding a layer type means registering one handler here.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from snp_ray.errors import ConfigError, UnsupportedLayerError
from snp_ray.models.attention import HeadAttention, HeadProjection
from snp_ray.models.tracing import register_leaf


class Handler:
    """Channel surgery for one module type. ``out`` = the module's units; ``in`` = its inputs."""

    #: parameter/buffer names whose dim 0 (or ``out_dim``) indexes the module's output units
    out_tensors: tuple[str, ...] = ()
    out_dim: int = 0
    in_dim: int | None = None           # dim of ``in_weight`` that indexes input channels
    in_weight: str = "weight"

    def produces(self, module: nn.Module) -> bool:
        return bool(self.out_tensors)

    def consumes(self, module: nn.Module) -> bool:
        return self.in_dim is not None

    recurrent = False
    #: a lookup table: reads raw token ids, its columns are the units (``freeze_tables``)
    table = False
    #: the module mixes units through statistics over them (LayerNorm over channels): the groups
    #: it normalises are kept whole, since dropping a unit would change every other unit's output
    normalises = False
    #: a parameter-free module whose first ``couples_inputs`` tensor inputs carry the same units
    #: one to one and whose output carries them on (attention: q, k, v heads): one group
    couples_inputs = 0

    def out_inner(self, module: nn.Module) -> int:
        """Positions of the output's unit dim per unit (a head of ``head_dim`` outputs)."""
        return 1

    def unit_blocks(self, module: nn.Module) -> int:
        """Equal blocks its input and output units come in, output block g reading input block g
        only (a grouped convolution's groups); 1: every output reads every input."""
        return 1

    def unit_positions(self, module: nn.Module, tensor: str, units: torch.Tensor) -> torch.Tensor:
        """Indices along ``out_dim`` of ``tensor`` that belong to ``units``."""
        return units

    def tilde_override(self, module: nn.Module, tensor: str, value: torch.Tensor,
                       dropped: torch.Tensor) -> torch.Tensor:
        """The weight the repaired network (f~) uses; only recurrent layers change it."""
        return value

    def frozen_rows(self, module: nn.Module, tensor: str) -> list[int]:
        """Rows (dim 0) of ``tensor`` that training never changes: an embedding's padding row.
        The module's own backward already leaves them; under ``vmap`` it does not."""
        return []

    def keep_out(self, module: nn.Module, kept: torch.Tensor) -> None:
        """Physically keep only output units ``kept``."""
        for name in self.tensors(module):
            t = getattr(module, name, None)
            if t is None:
                continue
            new = t.detach().index_select(self.out_dim, self.unit_positions(module, name, kept)).clone()
            _set(module, name, new)
        self.set_out_size(module, int(kept.numel()))

    def absorb_repair(self, module: nn.Module, start: int, size: int, kept: torch.Tensor,
                      dropped: torch.Tensor, repair: torch.Tensor, inner: int = 1) -> None:
        """Fold a repair (dropped = repair @ kept) into input units ``start..start+size``.

        ``W'[:, kept] = W[:, kept] + W[:, dropped] @ repair``, per kernel position; afterwards the
        module reads only the kept units of that segment. ``inner``: input positions per unit
        (a flattened (C, H, W) map: H*W). The input dim of the weight is then viewed as
        (units, inner) and each of a unit's positions is one more kernel position.
        """
        w = getattr(module, self.in_weight).detach()
        d = self.in_dim
        if inner != 1:
            w = w.unflatten(d, (-1, inner))
        seg = w.narrow(d, start, size)
        wk = seg.index_select(d, kept)
        wd = seg.index_select(d, dropped)
        # move the input dim last, mix, move back
        mixed = wk.movedim(d, -1) + wd.movedim(d, -1) @ repair.to(w.dtype)
        new_seg = mixed.movedim(-1, d)
        parts = [w.narrow(d, 0, start), new_seg, w.narrow(d, start + size, w.shape[d] - start - size)]
        new = torch.cat(parts, dim=d)
        if inner != 1:
            new = new.flatten(d, d + 1)
        _set(module, self.in_weight, new.clone())
        self.set_in_size(module, int(getattr(module, self.in_weight).shape[d]))

    def keep_in(self, module: nn.Module, start: int, size: int, kept: torch.Tensor,
                inner: int = 1) -> None:
        """Keep only input units ``kept`` of segment ``start..start+size`` (no repair)."""
        empty = torch.empty(0, int(kept.numel()))
        self.absorb_repair(module, start, size, kept, torch.empty(0, dtype=torch.long), empty, inner)

    def set_out_size(self, module: nn.Module, n: int) -> None:
        raise NotImplementedError

    def set_in_size(self, module: nn.Module, n: int) -> None:
        raise NotImplementedError

    def tensors(self, module: nn.Module) -> tuple[str, ...]:
        """The names of ``module``'s tensors that hold its units (``out_tensors`` unless the
        module's own shape decides them: one set per layer of a stacked recurrent layer)."""
        return self.out_tensors

    def check(self, module: nn.Module, name: str) -> None:
        """Raise ``UnsupportedLayerError`` (naming the module's path ``name``) if the slicer
        cannot handle this configuration of the module at all."""

    def fixes(self, module: nn.Module, name: str, dim: int, ndim: int) -> str:
        """Checked when ``module`` (at path ``name``) rides on units that lie on ``dim`` of an
        ``ndim``-dim tensor: raise ``UnsupportedLayerError`` where it cannot, else say why the
        groups it touches must be kept whole ("": they can be sliced)."""
        return ""


def _set(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        module.register_buffer(name, value)


class ConvHandler(Handler):
    out_tensors = ("weight", "bias")
    in_dim = 1

    def set_out_size(self, module, n):
        module.out_channels = n

    def set_in_size(self, module, n):
        module.in_channels = n


def is_depthwise(module: nn.Module) -> bool:
    """A convolution whose output channel j reads input channel j only."""
    return (isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1
            and module.groups == module.in_channels == module.out_channels)


class DepthwiseConvHandler(Handler):
    """Depthwise convolution (groups == in == out channels): channel j of its output reads only
    channel j of its input, so it rides on its input's units like a batch norm: filter j is
    dropped together with input channel j, and it never absorbs a repair (a repair mixes
    channels, which a depthwise filter cannot hold)."""

    out_tensors = ("weight", "bias")

    def set_out_size(self, module, n):
        module.in_channels = module.out_channels = module.groups = n


# ------------------------------------------------------------------ grouped convolutions
def is_grouped(module: nn.Module) -> bool:
    """A convolution with 1 < groups that is not depthwise (ResNeXt, RegNet): output block g
    (``out/groups`` channels) reads input block g (``in/groups`` channels) only."""
    return (isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups > 1
            and not is_depthwise(module))


class GroupedConvHandler(ConvHandler):
    """A grouped convolution, weight ``(out, in/G, *kernel)``. Its input and output units come
    in G equal blocks (``unit_blocks``); the tracer makes both groups keep the same count in
    every block and the input's repairs block-diagonal, so the fragment is a grouped
    convolution with the same G and fewer channels per group. For block g a repair folds as
    ``W_g[:, kept_g] += W_g[:, dropped_g] @ R_g`` (per kernel position)."""

    def unit_blocks(self, module):
        return module.groups

    @staticmethod
    def _local(module: nn.Module, units: torch.Tensor, total: int, what: str) -> torch.Tensor:
        """``units`` (block after block, as the kept sets are: ascending) as (G, n) indices
        inside their blocks; every block needs the same n."""
        g, size = module.groups, total // module.groups
        block = units // size
        counts = torch.bincount(block, minlength=g)
        if bool((counts != counts[0]).any()) or bool((block.diff() < 0).any()):
            raise ConfigError(f"grouped convolution (groups={g}): kept {what} units must be the "
                              f"same number in every block, block after block; got {counts.tolist()}")
        return (units - block * size).view(g, -1)

    def keep_out(self, module, kept):
        self._local(module, kept, module.out_channels, "output")
        super().keep_out(module, kept)

    def absorb_repair(self, module, start, size, kept, dropped, repair, inner=1):
        g, total = module.groups, module.in_channels
        if start != 0 or size != total or inner != 1:
            raise ConfigError(f"grouped convolution (groups={g}) reads units {start}..{start + size} "
                              f"of {total} (positions per unit {inner}); it must read one group whole")
        per = total // g
        repair = repair.to(module.weight.dtype)
        same = (dropped // per)[:, None] == (kept // per)[None, :]
        if repair.numel() and bool((repair[~same] != 0).any()):
            raise ConfigError(f"grouped convolution (groups={g}): the repair is not block-"
                              "diagonal; a dropped unit can only be rebuilt from kept units "
                              "of its own block")
        local = self._local(module, kept, total, "input")
        w = module.weight.detach()
        rows = w.shape[0] // g
        parts = []
        for b in range(g):
            wb = w[b * rows:(b + 1) * rows]                         # (rows, per, *kernel)
            new = wb.index_select(1, local[b])
            d = dropped[dropped // per == b]
            if d.numel():
                r = repair[dropped // per == b][:, kept // per == b]     # (|d_b|, |k_b|)
                fold = wb.index_select(1, d - b * per).movedim(1, -1) @ r
                new = new + fold.movedim(-1, 1)
            parts.append(new)
        _set(module, "weight", torch.cat(parts).clone())
        module.in_channels = g * local.shape[1]


GROUPED = GroupedConvHandler()


class LayerNormHandler(Handler):
    """LayerNorm over the unit dim: per-unit affine, but its statistics mix every unit, so the
    groups it normalises are kept whole (``normalises``)."""

    out_tensors = ("weight", "bias")
    normalises = True

    def set_out_size(self, module, n):
        module.normalized_shape = (n,)


class ParamHandler(Handler):
    """A bare parameter multiplied or added onto a unit tensor (e.g. ConvNeXt's layer scale):
    its ``dim`` indexes the units. Hosted by the module that owns the parameter."""

    out_dim = 0

    def __init__(self, attr: str, dim: int):
        self.out_tensors = (attr,)
        self.out_dim = dim

    def set_out_size(self, module, n):
        pass


class LinearHandler(Handler):
    out_tensors = ("weight", "bias")
    in_dim = 1

    def set_out_size(self, module, n):
        module.out_features = n

    def set_in_size(self, module, n):
        module.in_features = n


class HeadProjectionHandler(LinearHandler):
    """q, k or v of an attention: its units are heads, ``head_dim`` output rows each."""

    def out_inner(self, module):
        return module.head_dim

    def unit_positions(self, module, tensor, units):
        hd = module.head_dim
        return (units.unsqueeze(1) * hd + torch.arange(hd, device=units.device)).flatten()

    def set_out_size(self, module, n):
        module.out_features = n * module.head_dim


class HeadAttentionHandler(Handler):
    """Attention over heads: couples the heads of q, k and v (one group) and passes them to its
    output; dropping heads only lowers ``num_heads``. A softmax sits between q.k and the output,
    so no repair can stand in for a dropped q or k unit: the unit is the whole head, and the
    repair of a dropped head rebuilds its *output* (all ``head_dim`` positions, every token)
    from the kept heads' outputs, folded into the output projection."""

    couples_inputs = 3          # q, k, v (a padding mask after them carries no units)

    def produces(self, module):
        return True

    def set_out_size(self, module, n):
        module.num_heads = n


class BatchNormHandler(Handler):
    """Per-channel affine + running statistics: follows its input's units, consumes nothing."""

    out_tensors = ("weight", "bias", "running_mean", "running_var")

    def set_out_size(self, module, n):
        module.num_features = n


class EmbeddingHandler(Handler):
    """The embedding dimensions are units; a token id is not a channel, so it consumes nothing."""

    out_tensors = ("weight",)
    out_dim = 1
    table = True

    def frozen_rows(self, module, tensor):
        return [module.padding_idx] if tensor == "weight" and module.padding_idx is not None else []

    def set_out_size(self, module, n):
        module.embedding_dim = n


class RecurrentHandler(Handler):
    """Single-layer, unidirectional GRU/LSTM (batch first). Hidden units are the units.

    Dropping unit j removes row j of every gate block of ``weight_ih``/``weight_hh``/biases AND
    column j of ``weight_hh``: the recurrence itself loses the unit. A repair cannot be folded
    into the recurrence (it would have to run inside every time step), so the repaired network
    used in training also cuts those recurrent columns (``tilde_override``); the fragment then
    equals it exactly, and the repair of the hidden units is folded into the next
    non-recurrent layer only. The input side (``weight_ih`` columns) absorbs repairs exactly.
    """

    out_tensors = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
    in_dim = 1
    in_weight = "weight_ih_l0"
    recurrent = True

    def _blocks(self, module) -> int:
        return 3 if isinstance(module, nn.GRU) else 4

    def consumes(self, module: nn.Module) -> bool:
        if module.num_layers != 1 or module.bidirectional or not module.batch_first:
            raise ConfigError("the slicer supports single-layer, unidirectional, batch-first "
                              f"recurrent layers, got {module}")
        return True

    def unit_positions(self, module, tensor, units):
        h = module.hidden_size
        return torch.cat([b * h + units for b in range(self._blocks(module))])

    def tilde_override(self, module, tensor, value, dropped):
        if tensor != "weight_hh_l0" or dropped.numel() == 0:
            return value
        mask = torch.ones(value.shape[1], dtype=value.dtype, device=value.device)
        mask[dropped.to(value.device)] = 0
        return value * mask

    def keep_out(self, module, kept):
        super().keep_out(module, kept)
        w = module.weight_hh_l0.detach().index_select(1, kept).clone()
        _set(module, "weight_hh_l0", w)
        module._flat_weights = [getattr(module, n) for n in module._flat_weights_names]

    def absorb_repair(self, module, start, size, kept, dropped, repair, inner=1):
        super().absorb_repair(module, start, size, kept, dropped, repair, inner)
        module._flat_weights = [getattr(module, n) for n in module._flat_weights_names]

    def set_out_size(self, module, n):
        module.hidden_size = n

    def set_in_size(self, module, n):
        module.input_size = n


#: module type -> handler; looked up along the MRO so subclasses inherit their parent's handler
HANDLERS: dict[type, Handler] = {
    nn.Conv1d: ConvHandler(), nn.Conv2d: ConvHandler(), nn.Linear: LinearHandler(),
    nn.BatchNorm1d: BatchNormHandler(), nn.BatchNorm2d: BatchNormHandler(),
    nn.Embedding: EmbeddingHandler(), nn.GRU: RecurrentHandler(), nn.LSTM: RecurrentHandler(),
    nn.LayerNorm: LayerNormHandler(), HeadProjection: HeadProjectionHandler(),
    HeadAttention: HeadAttentionHandler(),
}
DEPTHWISE = DepthwiseConvHandler()

def handler_for(module: nn.Module) -> Handler | None:
    if is_depthwise(module):
        return DEPTHWISE
    if is_grouped(module):
        return GROUPED
    for cls in type(module).__mro__:
        if cls in HANDLERS:
            return HANDLERS[cls]
    return None


def register_handler(module_type: type, handler: Handler) -> Callable[[], None]:
    """Add a handler for a new layer type; returns a function that removes it again."""
    HANDLERS[module_type] = handler
    unleaf = register_leaf(module_type)       # a handled module stays one module in a trace

    def remove() -> None:
        HANDLERS.pop(module_type, None)
        unleaf()
    return remove


# --- issue #27 §3 handlers: norms over space and channel groups, PReLU, stacked and plain RNNs
class InstanceNormHandler(Handler):
    """InstanceNorm1d/2d: each channel is normalised over its own positions (per sample, or with
    running statistics), so unit j of the output reads unit j of the input only. The affine and
    the running statistics, where present, ride on the units like a BatchNorm's; without them it
    has nothing to slice but ``num_features`` still follows the kept count."""

    out_tensors = ("weight", "bias", "running_mean", "running_var")

    def fixes(self, module, name, dim, ndim):
        if dim != 1 or ndim != module._get_no_batch_dim() + 1:
            raise UnsupportedLayerError(type(module).__name__, name, "its units are not the "
                                        "channels of a batched input, which it normalises one by one")
        return ""

    def set_out_size(self, module, n):
        module.num_features = n


class GroupNormHandler(Handler):
    """GroupNorm(G, C): per-channel affine; statistics over each block of C/G channels. With one
    channel per group (G == C) it is an InstanceNorm with affine and slices per unit; otherwise a
    dropped unit would change its block's statistics, hence every other unit of the block, so the
    groups it normalises are kept whole (like a LayerNorm's; ``fixes``)."""

    out_tensors = ("weight", "bias")

    def fixes(self, module, name, dim, ndim):
        if dim != 1 or ndim < 2:
            raise UnsupportedLayerError("GroupNorm", name, "its units are not on the channel dim "
                                        "it normalises in groups")
        if module.num_groups == module.num_channels:
            return ""
        return (f"normalised over blocks of {module.num_channels // module.num_groups} units by "
                f"{name} (GroupNorm, {module.num_groups} groups): a dropped unit would change "
                "its block's statistics")

    def set_out_size(self, module, n):
        if module.num_groups == module.num_channels:      # one channel per group
            module.num_groups = n
        elif n != module.num_channels:
            raise ConfigError(f"GroupNorm with {module.num_groups} groups keeps all its "
                              f"{module.num_channels} channels, not {n}")
        module.num_channels = n


class PReLUHandler(Handler):
    """PReLU with one slope per channel: the slopes are per-unit parameters (on the channel dim,
    dim 1). With a single slope (``num_parameters == 1``) it is channel-wise (``CHANNELWISE``)."""

    out_tensors = ("weight",)

    def produces(self, module):
        return module.num_parameters > 1

    def fixes(self, module, name, dim, ndim):
        if dim != (1 if ndim >= 2 else 0):
            raise UnsupportedLayerError("PReLU", name, "its per-channel slopes index dim 1, "
                                        "which does not hold the units")
        return ""

    def set_out_size(self, module, n):
        module.num_parameters = n


class StackedRecurrentHandler(RecurrentHandler):
    """GRU, LSTM and RNN (tanh or relu): any number of layers, one direction, batch first.

    ``nn.GRU`` & co. hold one ``hidden_size`` for every layer, so a fragment's layers keep the
    same number of units; here they keep the same units: all layers' hidden units are one group
    (one kept set; scored on the last layer's output sequence, the layer the next module reads).
    Layer l+1 reads layer l's hidden state inside the module, where no repair can run, so like the
    recurrent columns (``RecurrentHandler``) the columns of ``weight_ih_l{l+1}`` that read a dropped
    unit are cut in the repaired network as well, and the fragment equals it exactly. A plain RNN
    has one gate block, a GRU three, an LSTM four. Refused: two directions (the forward and the
    backward units lie side by side in the output sequence but on the layer dim of the final
    state, which one layout cannot say) and LSTM projections (``proj_size``)."""

    def _blocks(self, module) -> int:
        return {"RNN_TANH": 1, "RNN_RELU": 1, "GRU": 3, "LSTM": 4}[module.mode]

    def tensors(self, module):
        return tuple(f"{kind}_l{k}" for k in range(module.num_layers)
                     for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))

    def consumes(self, module):
        return True

    def check(self, module, name):
        kind = type(module).__name__
        if module.bidirectional:
            raise UnsupportedLayerError(f"bidirectional {kind}", name, "two directions: the "
                                        "forward and backward units lie side by side in the output "
                                        "sequence but on the layer dim of the final state; only "
                                        "one direction is supported")
        if getattr(module, "proj_size", 0):
            raise UnsupportedLayerError(f"{kind} (proj_size={module.proj_size})", name,
                                        "a projected LSTM outputs projections, not its hidden units")
        if not module.batch_first:
            raise UnsupportedLayerError(f"{kind} (batch_first=False)", name,
                                        "the slicer needs batch-first recurrent layers")

    @staticmethod
    def _reads_hidden(tensor: str) -> bool:
        """Whether the columns of ``tensor`` are hidden units: the recurrence, and the input of
        every layer above the first."""
        return tensor.startswith("weight_hh_l") or (tensor.startswith("weight_ih_l")
                                                    and tensor != "weight_ih_l0")

    def tilde_override(self, module, tensor, value, dropped):
        if not self._reads_hidden(tensor) or dropped.numel() == 0:
            return value
        mask = torch.ones(value.shape[1], dtype=value.dtype, device=value.device)
        mask[dropped.to(value.device)] = 0
        return value * mask

    def keep_out(self, module, kept):
        Handler.keep_out(self, module, kept)
        for name in self.tensors(module):
            if self._reads_hidden(name):
                _set(module, name, getattr(module, name).detach().index_select(1, kept).clone())
        module._flat_weights = [getattr(module, n) for n in module._flat_weights_names]


STACKED_RECURRENT = StackedRecurrentHandler()
HANDLERS.update({nn.InstanceNorm1d: InstanceNormHandler(), nn.InstanceNorm2d: InstanceNormHandler(),
                 nn.GroupNorm: GroupNormHandler(), nn.PReLU: PReLUHandler(),
                 nn.GRU: STACKED_RECURRENT, nn.LSTM: STACKED_RECURRENT, nn.RNN: STACKED_RECURRENT})
