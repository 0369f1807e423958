"""A fragment: the sliced feature extractor of one (model, class) pair, and its metadata.

Stored as safetensors weights plus a JSON spec holding everything needed to rebuild the module
without pickle: the source architecture and the kept units of every group. Loading rebuilds the
source extractor, traces it, cuts it to the kept shapes and loads the weights strictly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from snp_ray.artifacts import (atomic_write_bytes, load_state_strict,
                               read_bytes, sha256_bytes, tensors_from_bytes,
                               tensors_to_bytes)
from snp_ray.config import Config
from snp_ray.data.specs import InputSpec, TextSpec
from snp_ray.errors import ConfigError, IntegrityError, SnpError
from snp_ray.models.refs import build_arch
from snp_ray.models.base import channels_last_safe
from snp_ray.slicing.graph import trace
from snp_ray.slicing.surgery import shrink

FORMAT_VERSION = 1


@dataclass
class FragmentSpec(Config):
    source_model: str
    source_sha256: str
    arch: str
    width: float
    source_classes: int
    class_id: int
    class_name: str
    kept: dict[str, list[int]]            # group id -> kept unit indices
    group_names: dict[str, str]           # group id -> first producer module
    group_sizes: dict[str, int]
    feature_dim: int
    params: int
    source_params: int                    # the source's feature extractor
    flops: int                            # multiply-accumulates per sample
    source_flops: int
    input: dict[str, Any]
    config: dict[str, Any]
    config_digest: str
    k: int
    fewshot_seed: int
    seconds: float
    stage_seconds: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    weights_sha256: str = ""
    subset: str = ""               # "" = the whole k-shot set; e.g. "cv3-f0-s0" = a tuning fold's
    device: str = "cpu"            # where it was sliced, and in which arithmetic (same key either way)
    precision: str = "fp32"
    format_version: int = FORMAT_VERSION
    #: the source model's :attr:`ModelSpec.identity`; "" in fragments made before identities
    #: (their key starts with the weights' sha256, see ``docs/SLICING.md``, "Identity")
    source_identity: str = ""

    def validate(self) -> None:
        if self.format_version != FORMAT_VERSION:
            raise ConfigError(f"fragment format {self.format_version} is not supported "
                              f"(this build reads {FORMAT_VERSION})")
        for gid, units in self.kept.items():
            size = self.group_sizes.get(gid)
            if size is None or not units or len(set(units)) != len(units) or \
                    min(units) < 0 or max(units) >= size:
                raise ConfigError(f"fragment kept units of group {gid} are invalid")

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec.from_any(self.input)

    @property
    def key(self) -> str:
        """Identity in a store: source model identity + class + slicing config (+ k and sample
        seed). Fragments made before identities existed keep their key of the weights' sha256."""
        key = fragment_key(self.source_identity or self.source_sha256, self.class_id,
                           self.config_digest, self.k, self.fewshot_seed)
        return f"{key}-{self.subset}" if self.subset else key


def fragment_key(source: str, class_id: int, config_digest: str, k: int, seed: int) -> str:
    """``source``: the model's identity (or, for fragments made before identities, its weights'
    sha256)."""
    return f"{source[:16]}-c{int(class_id)}-{config_digest}-k{int(k)}-s{int(seed)}"


class Fragment(nn.Module):
    """``features`` maps raw-encoded input to the class's kept features; ``probe`` is the
    binary (class vs the source's other classes) head folded onto them."""

    def __init__(self, spec: FragmentSpec, features: nn.Module, probe: nn.Linear):
        super().__init__()
        self.spec = spec
        self.features = features.eval()
        self.probe = probe.eval()
        # Fragments only run inference, where channels_last makes CPU convolutions and pooling
        # ~1.7x faster (benchmarks/fragment_format.py). Saved bytes are unchanged: weights are
        # made contiguous before serialising. Nets with strided 1x1 convs stay NCHW (see
        # channels_last_safe) to keep one rule for when the format is used.
        self.channels_last = any(isinstance(m, nn.Conv2d) for m in features.modules()) and \
            channels_last_safe(features)
        if self.channels_last:
            self.features.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.features(x)

    def encode(self, raw: Any, strict: bool = False) -> torch.Tensor:
        return self.spec.input_spec.encode(raw, strict)

    @torch.no_grad()
    def class_score(self, raw: Any) -> torch.Tensor:
        """P(class | x) according to the fragment's own binary head."""
        return torch.softmax(self.probe(self.features(self.encode(raw))), 1)[:, 1]

    # -------------------------------------------------------------- serialisation
    def to_blobs(self) -> tuple[bytes, bytes]:
        """(spec JSON, safetensors weights); the spec carries the weights' sha256."""
        weights = tensors_to_bytes({f"features.{k}": v for k, v in self.features.state_dict().items()}
                                   | {f"probe.{k}": v for k, v in self.probe.state_dict().items()})
        self.spec = self.spec.replace(weights_sha256=sha256_bytes(weights))
        return self.spec.to_json().encode(), weights

    @classmethod
    def from_blobs(cls, spec_json: bytes, weights: bytes, what: str = "fragment") -> "Fragment":
        try:
            spec = FragmentSpec.from_json(spec_json.decode("utf-8"))
        except (ConfigError, UnicodeDecodeError) as e:
            raise IntegrityError(f"{what}: invalid spec ({e})") from None
        tensors = tensors_from_bytes(weights, spec.weights_sha256, what)
        try:
            features = rebuild_features(spec)
        except SnpError as e:
            raise IntegrityError(f"{what}: spec cannot be rebuilt ({e})") from None
        probe = nn.Linear(spec.feature_dim, 2)
        stray = sorted(k for k in tensors if not k.startswith(("features.", "probe.")))
        if stray:
            raise IntegrityError(f"{what}: unexpected tensors {stray[:5]}")
        load_state_strict(features, {k[9:]: v for k, v in tensors.items() if k.startswith("features.")},
                          what)
        load_state_strict(probe, {k[6:]: v for k, v in tensors.items() if k.startswith("probe.")}, what)
        return cls(spec, features, probe)

    def save(self, folder: str | Path) -> Path:
        spec_json, weights = self.to_blobs()
        folder = Path(folder)
        atomic_write_bytes(folder / "weights.safetensors", weights)
        atomic_write_bytes(folder / "fragment.json", spec_json)   # last: makes it visible
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "Fragment":
        folder = Path(folder)
        spec_json = read_bytes(folder / "fragment.json", "fragment spec")
        weights = read_bytes(folder / "weights.safetensors", "fragment weights")
        return cls.from_blobs(spec_json, weights, f"fragment {folder}")


def example_input(spec: InputSpec, batch: int = 2) -> torch.Tensor:
    """An encoded input of the shape the fragment's own input spec gives."""
    return spec.example(batch)


def rebuild_features(spec: FragmentSpec) -> nn.Module:
    """The source architecture's extractor cut to the fragment's shapes (weights not loaded)."""
    inp = spec.input_spec
    vocab = len(inp.vocab) if isinstance(inp, TextSpec) else None
    # a static embedding table is named in the input spec, never stored in the fragment
    model = build_arch(spec.arch, spec.source_classes, spec.width, vocab_size=vocab,
                       example=example_input(inp), table=getattr(inp, "table", ""))
    features = model.features.eval()
    graph = trace(features, example_input(inp))
    sizes = {str(g.id): g.size for g in graph.groups}
    if sizes != spec.group_sizes:
        raise IntegrityError("the fragment's groups do not match its source architecture")
    kept = {g.id: torch.tensor(spec.kept[str(g.id)], dtype=torch.long) for g in graph.groups}
    return shrink(features, graph, kept)


def kept_iou(a: FragmentSpec, b: FragmentSpec) -> dict[str, float]:
    """IoU of kept-unit sets per group between two fragments of the same model (Figure 5)."""
    if a.source_sha256 != b.source_sha256:
        raise ConfigError(f"IoU compares fragments of one model; got {a.source_model} and {b.source_model}")
    out = {}
    for gid in a.kept:
        sa, sb = set(a.kept[gid]), set(b.kept[gid])
        out[gid] = len(sa & sb) / len(sa | sb)
    return out
