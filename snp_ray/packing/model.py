"""PackedModel: frozen fragments, their concatenated features, Enc and the new head.

Deployable = fragments + Enc + head (+ fixed per-fragment feature scales). The decoders only shape
Enc during training; they are kept in the file as training state (for plug-and-play warm starts)
and counted separately. Fragments of one source model may share their lookup tables
(:mod:`snp_ray.packing.shared`); a shared table is one tied parameter, stored and counted once.
"""
from __future__ import annotations

import copy
import io
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from snp_ray.artifacts import (atomic_write_bytes, load_state_strict, read_bytes, sha256_bytes,
                               tensors_from_bytes, tensors_to_bytes)
from snp_ray.config import Config
from snp_ray.data.specs import ImageSpec
from snp_ray.errors import (ConfigError, DataError, ExportError, IntegrityError, SnpError,
                            UnknownNameError)
from snp_ray.models import count_params
from snp_ray.packing.shared import TableSpec, attach_tables, check_indices, share_tables
from snp_ray.slicing.fragment import Fragment, FragmentSpec, rebuild_features

FORMAT_VERSION = 1
log = logging.getLogger(__name__)


@dataclass
class PackSpec(Config):
    class_ids: list[int]                   # output j of the head is class_ids[j]
    class_names: list[str]
    fragments: list[dict[str, Any]]        # FragmentSpec dicts
    fragment_targets: list[int]            # head index each fragment serves
    hidden: int
    config: dict[str, Any]
    dataset: str
    metrics: dict[str, float] = field(default_factory=dict)
    weights_sha256: str = ""
    format_version: int = FORMAT_VERSION
    tables: list[TableSpec] = field(default_factory=list)   # shared lookup tables

    def validate(self) -> None:
        if self.format_version != FORMAT_VERSION:
            raise ConfigError(f"pack format {self.format_version} is not supported")
        if len(self.class_ids) != len(self.class_names) or not self.class_ids:
            raise ConfigError("a pack needs one name per class and at least one class")
        if len(self.fragments) != len(self.fragment_targets):
            raise ConfigError("a pack needs one target per fragment")
        if any(not 0 <= t < len(self.class_ids) for t in self.fragment_targets):
            raise ConfigError("a fragment target is outside the pack's classes")
        if len({t.name for t in self.tables}) != len(self.tables) or \
                any(r >= len(self.fragments) for t in self.tables for r in t.readers):
            raise ConfigError("a pack's shared tables must have distinct names and readers in it")


class PackedModel(nn.Module):
    def __init__(self, spec: PackSpec, fragments: list[Fragment], scales: torch.Tensor,
                 enc: nn.Linear, head: nn.Linear, decoders: nn.ModuleList | None = None):
        super().__init__()
        self.spec = spec
        # registered before the fragments, so a shared table's canonical name is ``tables.<t>``
        self.tables = nn.ModuleDict()
        self.fragments = nn.ModuleList(f.eval() for f in fragments)
        self.register_buffer("scales", scales.detach().clone().float())
        self.enc = enc
        self.head = head
        self.decoders = decoders  # training state, not used by forward
        for p in self.fragments.parameters():
            p.requires_grad_(False)

    @property
    def class_ids(self) -> list[int]:
        return self.spec.class_ids

    @property
    def modality(self) -> str:
        return self.fragments[0].spec.input_spec.kind

    # ---------------------------------------------------------------- inference
    def encode(self, raw: Any, strict: bool = True) -> list[torch.Tensor]:
        """Each fragment encodes the raw input with its own normalisation or vocabulary."""
        if self.modality == "text" and (isinstance(raw, str) or len(raw) == 0):
            raise DataError("text input must be a non-empty list of strings")
        return [f.encode(raw, strict=strict) for f in self.fragments]

    def fragment_features(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        feats = [f(x) * s for f, x, s in zip(self.fragments, inputs, self.scales)]
        return torch.cat(feats, dim=1)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Logits from per-fragment encoded inputs (one tensor per fragment)."""
        return self.head(torch.relu(self.enc(self.fragment_features(list(inputs)))))

    @torch.no_grad()
    def predict_proba(self, raw: Any, batch_size: int = 512, strict: bool = True) -> torch.Tensor:
        self.eval()
        n = len(raw)
        out = [torch.softmax(self(*self.encode(raw[i:i + batch_size], strict)), 1)
               for i in range(0, n, batch_size)]
        return torch.cat(out) if out else torch.empty(0, len(self.class_ids))

    def predict(self, raw: Any, batch_size: int = 512, strict: bool = True) -> np.ndarray:
        """Global class ids."""
        proba = self.predict_proba(raw, batch_size, strict)
        return np.asarray(self.class_ids)[proba.argmax(1).numpy()]

    # ---------------------------------------------------------------- sizes
    def params_deployable(self) -> int:
        """Every parameter but the training-only decoders'; a shared table counts once."""
        return count_params(self) - (count_params(self.decoders) if self.decoders else 0)

    def share_tables(self) -> int:
        """Let fragments of one source model share what they hold in common (exact: outputs
        do not change); returns how many deployable parameters that saved."""
        if self.spec.tables:
            return 0
        before = self.params_deployable()
        frags, specs = share_tables(list(self.fragments), self.tables)
        if specs:
            self.fragments = nn.ModuleList(f.eval() for f in frags)
            self.spec = self.spec.replace(tables=specs)
        return before - self.params_deployable()

    def params_training(self) -> int:
        return self.params_deployable() + (count_params(self.decoders) if self.decoders else 0)

    def flops(self) -> int:
        frag = sum(f.spec.flops for f in self.fragments)
        return int(frag + self.enc.in_features * self.enc.out_features
                   + self.head.in_features * self.head.out_features)

    # ---------------------------------------------------------------- files
    def to_blobs(self) -> tuple[bytes, bytes]:
        """(spec JSON, safetensors weights); a shared table is written once, under its
        ``tables.`` name (its readers' aliases are rebuilt on load)."""
        aliases = _aliases(self)
        weights = tensors_to_bytes({k: v for k, v in self.state_dict(keep_vars=True).items()
                                    if k not in aliases})
        self.spec = self.spec.replace(fragments=[f.spec.to_dict() for f in self.fragments],
                                      weights_sha256=sha256_bytes(weights))
        return self.spec.to_json().encode(), weights

    @classmethod
    def from_blobs(cls, spec_json: bytes, weights: bytes, what: str = "packed model") -> "PackedModel":
        try:
            spec = PackSpec.from_json(spec_json.decode("utf-8"))
            fspecs = [FragmentSpec.from_dict(d) for d in spec.fragments]
        except (ConfigError, UnicodeDecodeError) as e:
            raise IntegrityError(f"{what}: invalid spec ({e})") from None
        tensors = tensors_from_bytes(weights, spec.weights_sha256, what)
        try:
            frags = [Fragment(fs, rebuild_features(fs), nn.Linear(fs.feature_dim, 2)) for fs in fspecs]
        except SnpError as e:
            raise IntegrityError(f"{what}: a fragment cannot be rebuilt ({e})") from None
        dims = sum(fs.feature_dim for fs in fspecs)
        enc = nn.Linear(dims, spec.hidden)
        head = nn.Linear(spec.hidden, len(spec.class_ids))
        has_dec = any(k.startswith("decoders.") for k in tensors)
        decoders = nn.ModuleList(nn.Linear(spec.hidden, fs.feature_dim) for fs in fspecs) if has_dec else None
        model = cls(spec, frags, torch.ones(len(frags)), enc, head, decoders)
        attach_tables(frags, model.tables, spec.tables)
        aliases = _aliases(model)
        own = set(model.state_dict()) - set(aliases)
        if set(tensors) != own:
            raise IntegrityError(f"{what}: weights do not match the spec "
                                 f"(missing {sorted(own - set(tensors))[:3]}, "
                                 f"unexpected {sorted(set(tensors) - own)[:3]})")
        load_state_strict(model, tensors | {a: tensors[c] for a, c in aliases.items()}, what)
        check_indices(frags, model.tables, spec.tables)
        for p in model.parameters():
            p.requires_grad_(False)
        return model.eval()

    def save(self, path: str | Path) -> Path:
        """One folder: ``pack.json`` (spec, written last) and ``weights.safetensors``."""
        spec_json, weights = self.to_blobs()
        folder = Path(path)
        atomic_write_bytes(folder / "weights.safetensors", weights)
        atomic_write_bytes(folder / "pack.json", spec_json)
        return folder

    @classmethod
    def load(cls, path: str | Path) -> "PackedModel":
        folder = Path(path)
        return cls.from_blobs(read_bytes(folder / "pack.json", "pack spec"),
                              read_bytes(folder / "weights.safetensors", "pack weights"),
                              f"packed model {folder}")

    def summary(self) -> dict[str, Any]:
        return {"classes": self.spec.class_names, "class_ids": self.class_ids,
                "params_deployable": self.params_deployable(),
                "params_training": self.params_training(), "flops": self.flops(),
                "shared_tables": [{"module": t.module, "columns": len(t.units),
                                   "readers": t.readers} for t in self.spec.tables],
                "fragments": [{"model": f.spec.source_model, "class": f.spec.class_name,
                               "params": f.spec.params, "feature_dim": f.spec.feature_dim}
                              for f in self.fragments]}


def _aliases(module: nn.Module) -> dict[str, str]:
    """State-dict names that hold a tensor an earlier name holds (a tied parameter) -> that
    earlier, canonical name."""
    first: dict[int, str] = {}
    out = {}
    for k, v in module.state_dict(keep_vars=True).items():
        if id(v) in first:
            out[k] = first[id(v)]
        else:
            first[id(v)] = k
    return out


class RawImagePack(nn.Module):
    """Export wrapper: raw uint8 images (N, H, W, 3) in, logits out; every fragment's own
    resizing and normalisation run inside the graph, so exported files are self-contained.
    (H, W) is the size of the largest fragment input."""

    def __init__(self, packed: PackedModel):
        super().__init__()
        specs = [f.spec.input_spec for f in packed.fragments]
        if not all(isinstance(s, ImageSpec) for s in specs):
            raise ConfigError("raw-image export needs a pack of image fragments")
        self.packed = packed.eval()
        self.sizes = [tuple(s.size) for s in specs]
        self.size = max(self.sizes, key=lambda hw: hw[0] * hw[1])
        # not "mean"/"std": the ONNX exporter names values after their ops, and without its
        # optimiser a buffer called "mean" collided with a mean-pooling output ("Duplicate definition")
        shape = (len(specs), 1, 3, 1, 1)
        self.register_buffer("pixel_mean", torch.tensor([s.mean for s in specs]).view(shape))
        self.register_buffer("pixel_std", torch.tensor([s.std for s in specs]).view(shape))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float() / 255.0
        inputs = []
        for i, size in enumerate(self.sizes):
            xi = x if size == self.size else nn.functional.interpolate(
                x, size=size, mode="bilinear", align_corners=False, antialias=False)
            inputs.append((xi - self.pixel_mean[i]) / self.pixel_std[i])
        return self.packed(*inputs)


#: export format -> the file name ``snp pack --export`` writes in the pack's folder
EXPORT_FILES = {"onnx": "model.onnx", "pt2": "model.pt2"}
#: a single .onnx file is one protobuf message (2 GiB at most), graph included
ONNX_MAX_WEIGHT_BYTES = 2**31 - 2**26


def export_pt2(packed: PackedModel, path: str | Path) -> Path:
    """A ``torch.export`` archive (``.pt2``) with a dynamic batch dimension; load it with
    ``torch.export.load(path).module()``. Raw uint8 images (N, H, W, 3) in for image packs, one
    token-id tensor (N, max_len) per fragment for text packs; logits out."""
    return _write_pt2(_capture(packed, "pt2"), Path(path))


def export_onnx(packed: PackedModel, path: str | Path) -> Path:
    """One self-contained ONNX file (weights inside) from the dynamo exporter, with a dynamic
    ``batch`` axis; inputs as for :func:`export_pt2`, named ``images`` or ``tokens0``, ``tokens1``,
    ... Needs the ``onnx`` extra (onnx, onnxscript; onnxruntime to run it)."""
    return _write_onnx(_capture(packed, "onnx"), Path(path))


def export_pack(packed: PackedModel, folder: str | Path, formats: list[str]) -> dict[str, Path]:
    """Write each of ``formats`` (see :data:`EXPORT_FILES`) into ``folder`` from one capture."""
    formats = check_export_formats(formats)
    if not formats:
        return {}
    captured = _capture(packed, "/".join(formats))
    writers = {"onnx": _write_onnx, "pt2": _write_pt2}
    return {fmt: writers[fmt](captured, Path(folder) / EXPORT_FILES[fmt]) for fmt in formats}


def check_export_formats(formats: list[str]) -> list[str]:
    """The formats in order, once each; an unknown one is an :class:`UnknownNameError`."""
    for fmt in formats:
        if fmt not in EXPORT_FILES:
            raise UnknownNameError("export format", fmt, list(EXPORT_FILES))
    return list(dict.fromkeys(formats))


@dataclass
class _Captured:
    program: torch.export.ExportedProgram
    input_names: list[str]


def _capture(packed: PackedModel, fmt: str) -> _Captured:
    """One ``torch.export`` capture of the deployable pack, batch dimension dynamic; the ONNX
    file is translated from the same program, so both formats run the same graph."""
    module, example, names = _export_module(packed)
    batch = torch.export.Dim("batch", min=1)
    dims = ({0: batch},) if isinstance(module, RawImagePack) else \
        {"inputs": tuple({0: batch} for _ in example)}       # PackedModel.forward(*inputs)
    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            # nn.GRU/LSTM refresh their _flat_weights list on every call; harmless here
            warnings.filterwarnings("ignore", message=r"The tensor attributes .*_flat_weights",
                                    category=UserWarning)
            program = torch.export.export(module, example, dynamic_shapes=dims, strict=False)
    except Exception as e:  # the tracer raises many types; keep the cause, name the pack
        raise ExportError(fmt, f"torch.export cannot capture its graph "
                               f"({type(e).__name__}: {_first_line(e)})") from e
    log.debug("captured the pack with torch.export in %.2f s", time.perf_counter() - started)
    return _Captured(program, names)


def _write_pt2(captured: _Captured, path: Path) -> Path:
    started = time.perf_counter()
    buf = io.BytesIO()
    torch.export.save(captured.program, buf)
    atomic_write_bytes(path, buf.getvalue())
    log.info("exported %s (%.2f s)", path, time.perf_counter() - started)
    return path


def _write_onnx(captured: _Captured, path: Path) -> Path:
    started = time.perf_counter()
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's translator)
    except ImportError:
        raise ExportError("onnx", "the dynamo exporter needs onnxscript: "
                                  "pip install 'snp_ray[onnx]'") from None
    weights = sum(t.numel() * t.element_size() for t in captured.program.state_dict.values())
    if weights > ONNX_MAX_WEIGHT_BYTES:
        raise ExportError("onnx", f"its {weights / 2**30:.1f} GiB of weights do not fit in one "
                                  f"ONNX file (protobuf's 2 GiB limit); export pt2 instead")
    try:
        program = torch.onnx.export(captured.program, (), dynamo=True, verbose=False,
                                    input_names=captured.input_names, output_names=["logits"],
                                    external_data=False)
    except Exception as e:  # translation failures come as several types
        raise ExportError("onnx", f"the exporter cannot translate its graph "
                                  f"({type(e).__name__}: {_first_line(e)})") from e
    program.rename_axes({program.model.graph.inputs[0].shape[0]: "batch"})  # shared by all
    # weights inside the file (never external data): it is handed out as one file
    atomic_write_bytes(path, program.model_proto.SerializeToString())
    log.info("exported %s (%.2f s)", path, time.perf_counter() - started)
    return path


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def _export_module(packed: PackedModel) -> tuple[nn.Module, tuple[torch.Tensor, ...], list[str]]:
    """The deployable part of the pack (a copy without the training-only decoders, weights in
    the default memory layout) and example inputs at batch 2."""
    # the memo entry makes deepcopy put None where the decoders were, without touching ``packed``
    clone = copy.deepcopy(packed, memo={id(packed.decoders): None}).eval()
    for f in clone.fragments:
        if f.channels_last:  # a CPU speed-up only; the .pt2 archive wants dense weights
            f.features.to(memory_format=torch.contiguous_format)
            f.channels_last = False
    if clone.modality == "image":
        module = RawImagePack(clone).eval()
        return module, (torch.zeros(2, *module.size, 3, dtype=torch.uint8),), ["images"]
    lens = [f.spec.input_spec.max_len for f in clone.fragments]  # type: ignore[union-attr]
    return clone, tuple(torch.ones(2, n, dtype=torch.long) for n in lens), \
        [f"tokens{i}" for i in range(len(lens))]
