"""Self-attention in one canonical, sliceable form.

A ViT's attention reshapes its projections into heads with the head count baked into the code
(timm: ``reshape(B, N, 3, self.num_heads, self.head_dim)``, ``reshape(B, N, self.attn_dim)``;
``nn.MultiheadAttention``: inside one fused kernel call). A traced graph would keep those
constants after a head is dropped. So every attention is rewritten, exactly, into
:class:`SelfAttention`: three :class:`HeadProjection` linears (q, k, v), one parameter-free
:class:`HeadAttention` that splits heads, runs ``scaled_dot_product_attention`` and merges them
back using its *own* ``num_heads``/``head_dim``, then the output projection. Slicing then sees
heads as units (``head_dim`` positions each) and updates ``num_heads`` where it drops one.

:func:`canonicalise` rewrites a model in place; converters are looked up by module type in
``CONVERTERS`` (``register_converter`` adds one), never by attribute names.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from snp_ray.errors import ConfigError


class HeadProjection(nn.Linear):
    """A linear map whose outputs are ``out_features // head_dim`` heads of ``head_dim`` each."""

    def __init__(self, in_features: int, num_heads: int, head_dim: int, bias: bool = True):
        super().__init__(in_features, num_heads * head_dim, bias=bias)
        self.head_dim = int(head_dim)


class HeadAttention(nn.Module):
    """Scaled dot-product attention over heads, on (batch, tokens, heads * head_dim) tensors.

    Parameter-free apart from optional per-head-dim norms of q and k (timm's ``qk_norm``), which
    act inside one head and so do not change when a head is dropped."""

    def __init__(self, num_heads: int, head_dim: int, dropout: float = 0.0,
                 scale: float | None = None, q_norm: nn.Module | None = None,
                 k_norm: nn.Module | None = None):
        super().__init__()
        self.num_heads, self.head_dim = int(num_heads), int(head_dim)
        self.dropout = float(dropout)
        self.scale = scale
        self.q_norm = q_norm if q_norm is not None else nn.Identity()
        self.k_norm = k_norm if k_norm is not None else nn.Identity()

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """``keep``: optional (batch, tokens) bool, the keys each query may attend to."""
        q, k = self.q_norm(self._heads(q)), self.k_norm(self._heads(k))
        mask = None if keep is None else keep[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, self._heads(v), attn_mask=mask, scale=self.scale,
                                             dropout_p=self.dropout if self.training else 0.0)
        return out.transpose(1, 2).flatten(-2)


class SelfAttention(nn.Module):
    """q, k, v projections -> :class:`HeadAttention` -> output projection, on batch-first
    (batch, tokens, dim) tensors. Called like timm's ``Attention`` (``attn(x)``) or, with
    ``mha_call``, like ``nn.MultiheadAttention`` (``attn(q, k, v, need_weights=False)`` returning
    ``(out, None)``)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, qkv_bias: bool = True,
                 proj_bias: bool = True, dropout: float = 0.0, proj_dropout: float = 0.0,
                 scale: float | None = None, q_norm: nn.Module | None = None,
                 k_norm: nn.Module | None = None, out_dim: int | None = None,
                 mha_call: bool = False, batch_first: bool = True):
        super().__init__()
        self.q = HeadProjection(dim, num_heads, head_dim, qkv_bias)
        self.k = HeadProjection(dim, num_heads, head_dim, qkv_bias)
        self.v = HeadProjection(dim, num_heads, head_dim, qkv_bias)
        self.core = HeadAttention(num_heads, head_dim, dropout, scale, q_norm, k_norm)
        self.proj = nn.Linear(num_heads * head_dim, out_dim or dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_dropout)
        self.mha_call, self.batch_first = mha_call, batch_first

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.proj_drop(self.proj(self.core(self.q(query), self.k(key), self.v(value), keep)))

    def forward(self, query, key=None, value=None, key_padding_mask=None, need_weights=False,
                attn_mask=None, average_attn_weights=True, is_causal=False, keep=None):
        """``keep``: (batch, tokens) bool, the real tokens (our text encoder's padding mask)."""
        if not self.mha_call:       # timm: attn(x, attn_mask=None); no mask reaches a classifier
            return self.attend(query, query, query, keep)
        if key_padding_mask is not None or attn_mask is not None or need_weights:
            raise ConfigError("the sliceable attention supports unmasked self-attention without "
                              "returned weights (need_weights=False)")
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        out = self.attend(query, key, value)
        return (out if self.batch_first else out.transpose(0, 1)), None


def _split_rows(weight: torch.Tensor | None, parts: int) -> list[torch.Tensor | None]:
    return [None] * parts if weight is None else list(weight.detach().chunk(parts, dim=0))


def _load(proj: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    with torch.no_grad():
        proj.weight.copy_(weight)
        if bias is not None:
            proj.bias.copy_(bias)


def _fill(att: SelfAttention, qkv_w, qkv_b, proj: nn.Linear) -> SelfAttention:
    ws, bs = _split_rows(qkv_w, 3), _split_rows(qkv_b, 3)
    for lin, w, b in zip((att.q, att.k, att.v), ws, bs):
        _load(lin, w, b)
    _load(att.proj, proj.weight.detach(), None if proj.bias is None else proj.bias.detach())
    return att


def from_multihead(m: nn.MultiheadAttention) -> SelfAttention:
    """``nn.MultiheadAttention`` (torchvision's ViT), same q/k/v/out weights."""
    if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
        raise ConfigError("nn.MultiheadAttention with separate kdim/vdim, bias_k/bias_v or "
                          "add_zero_attn is not supported by the slicer")
    att = SelfAttention(m.embed_dim, m.num_heads, m.head_dim, m.in_proj_bias is not None,
                        m.out_proj.bias is not None, m.dropout, 0.0, mha_call=True,
                        batch_first=m.batch_first)
    return _fill(att, m.in_proj_weight, m.in_proj_bias, m.out_proj).train(m.training)


def from_timm(m: nn.Module) -> SelfAttention:
    """timm's ``Attention`` (fused qkv Linear, optional q/k norms), same weights."""
    if getattr(m, "gate", None) is not None or not isinstance(getattr(m, "norm", nn.Identity()),
                                                             nn.Identity):
        raise ConfigError(f"timm {type(m).__name__} with a gate or scale_norm is not supported "
                          "by the slicer")
    att = SelfAttention(m.qkv.in_features, m.num_heads, m.head_dim, m.qkv.bias is not None,
                        m.proj.bias is not None, m.attn_drop.p, m.proj_drop.p, scale=m.scale,
                        q_norm=m.q_norm, k_norm=m.k_norm, out_dim=m.proj.out_features)
    return _fill(att, m.qkv.weight, m.qkv.bias, m.proj).train(m.training)


#: module type -> converter into :class:`SelfAttention`; exact types (a subclass may change
#: ``forward``), so an unknown attention is left alone and the slicer refuses it by name
CONVERTERS: dict[type, Callable[[nn.Module], nn.Module]] = {nn.MultiheadAttention: from_multihead}
try:
    from timm.layers.attention import Attention as _TimmAttention
    CONVERTERS[_TimmAttention] = from_timm
except ImportError:  # pragma: no cover - timm is a dependency
    pass


def register_converter(module_type: type, convert: Callable[[nn.Module], nn.Module]) -> Callable[[], None]:
    """Rewrite modules of exactly ``module_type`` with ``convert``; returns an undo function."""
    before = CONVERTERS.get(module_type)
    CONVERTERS[module_type] = convert

    def remove() -> None:
        if before is None:
            CONVERTERS.pop(module_type, None)
        else:
            CONVERTERS[module_type] = before
    return remove


def canonicalise(model: nn.Module) -> nn.Module:
    """Replace, in place, every module with a converter by its sliceable equivalent."""
    for name, child in list(model.named_children()):
        convert = CONVERTERS.get(type(child))
        if convert is not None:
            setattr(model, name, convert(child))
        else:
            canonicalise(child)
    return model
