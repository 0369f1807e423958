"""Add a developer's own trained model to a market: ``Market.add_model`` and ``snp market add``.

Everything is checked before anything is written, so bad input leaves the store unchanged:
the architecture reference, the weights (safetensors only: a pickle is refused by its magic
bytes and never opened; keys and shapes must match the architecture; no NaN/Inf), the classes
(names or ids of the dataset's vocabulary, as many as the head has outputs), the input size (the
model must run on it), and the few-shot samples (k seeded rows per class of the dataset's train
split, or the developer's own Parquet file in the dataset's schema). Then the model is stored
exactly like one the market trained: safetensors + spec with sha256, atomic writes, the spec
last. The test split is never read.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from snp_ray.artifacts import (atomic_write_bytes, read_bytes, sha256_bytes, staging_dir,
                               tensors_from_bytes)
from snp_ray.data.catalog import get_dataset
from snp_ray.data.classes import class_ids as resolve_class_ids
from snp_ray.data.fewshot import sample_k_shot
from snp_ray.data.specs import ImageSpec
from snp_ray.data.tables import dataset_class_names, split_from_bytes
from snp_ray.config import Config, check_range
from snp_ray.errors import (ConfigError, DataError, DatasetMismatchError, IntegrityError,
                            ModelExistsError, PayloadTooLarge, SnpError, WeightsError)
from snp_ray.market.modelstore import ModelSpec, ModelStore, check_id
from snp_ray.models import Classifier, count_macs, count_params, split_classifier
from snp_ray.models.refs import MAX_PARAMS, build_capped, build_external, parse_ref, ref_width
from snp_ray.models.registry import build_model

#: torchvision/timm models are trained on ImageNet statistics unless the developer says otherwise
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
UPLOAD_FILE = "fewshot/upload.parquet"
CONVERT_HINT = ("convert it with `from safetensors.torch import save_file; "
                "save_file(model.state_dict(), 'model.safetensors')`")


@dataclass
class AddLimits(Config):
    """What one added model may cost the market before it is checked further: each cap is
    tested from sizes on disk, in the Parquet footer or on the meta device, before the bytes
    are decompressed, decoded or allocated."""

    max_weights_bytes: int = 2 * 1024 ** 3
    max_params: int = MAX_PARAMS
    max_fewshot_bytes: int = 256 * 1024 ** 2       # the Parquet file
    max_fewshot_rows: int = 50_000
    max_fewshot_decoded_bytes: int = 1024 ** 3     # its columns, uncompressed

    def validate(self) -> None:
        for name in ("max_weights_bytes", "max_params", "max_fewshot_bytes", "max_fewshot_rows",
                     "max_fewshot_decoded_bytes"):
            check_range("AddLimits", name, getattr(self, name), 1, 2 ** 62)


@dataclass
class AddedModel:
    spec: ModelSpec
    macs: int
    fewshot_accuracy: float
    fewshot_samples: int

    def summary(self) -> dict[str, Any]:
        s = self.spec
        return {"id": s.id, "arch": s.arch, "params": s.params, "macs": self.macs,
                "classes": s.class_names, "class_ids": s.classes, "dataset": s.dataset,
                "input": s.input, "fewshot": s.train.get("fewshot", {}),
                "fewshot_accuracy": self.fewshot_accuracy,
                "fewshot_samples": self.fewshot_samples}


def read_capped(source: str | Path | bytes, max_bytes: int, what: str) -> bytes:
    """Bytes, or a file's bytes, refused by size before a file is read."""
    if isinstance(source, (bytes, bytearray)):
        size = len(source)
    else:
        try:
            size = os.stat(source).st_size
        except OSError:
            size = 0                           # read_bytes names the missing file
    if size > max_bytes:
        raise PayloadTooLarge(f"{what} is {size:,} bytes, more than the {max_bytes:,} allowed")
    return bytes(source) if isinstance(source, (bytes, bytearray)) else read_bytes(source, what)


def read_weights(weights: str | Path | bytes, max_bytes: int = AddLimits.max_weights_bytes
                 ) -> tuple[dict[str, torch.Tensor], str]:
    """Safetensors bytes (or a file) -> tensors; pickles and zip archives are refused unopened."""
    what = "weights" if isinstance(weights, (bytes, bytearray)) else f"weights file {weights}"
    blob = read_capped(weights, max_bytes, "weights" if isinstance(weights, (bytes, bytearray))
                       else "weights file")
    if blob[:2] == b"PK" or (len(blob) >= 2 and blob[0] == 0x80 and 2 <= blob[1] <= 5):
        kind = "a zip archive (torch.save)" if blob[:2] == b"PK" else "a pickle"
        raise WeightsError(f"{what} is {kind}; only safetensors is accepted (pickles can run "
                           f"code when loaded, so they are never opened): {CONVERT_HINT}")
    try:
        tensors = tensors_from_bytes(blob, None, what)
    except IntegrityError as e:
        raise WeightsError(f"{e}; weights must be a safetensors file: {CONVERT_HINT}") from None
    return tensors, sha256_bytes(blob)


def check_state(module: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    """Every key and shape must match; the error lists all that do not (up to 20 of each)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    shapes = [f"{k}: model {tuple(own[k].shape)} vs file {tuple(tensors[k].shape)}"
              for k in sorted(set(own) & set(tensors)) if own[k].shape != tensors[k].shape]
    if missing or extra or shapes:
        parts = [f"{label} ({len(items)}): {items[:20]}" for label, items in
                 (("missing keys", missing), ("unexpected keys", extra), ("shape mismatches", shapes))
                 if items]
        raise WeightsError(f"{what} do not fit the architecture: " + "; ".join(parts))


def _default_id(arch: str, existing: list[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", arch.split("?")[0].replace(":", "-")).strip("-.") or "model"
    i = 0
    while f"{base}-{i}" in existing:
        i += 1
    return f"{base}-{i}"


def _head_outputs(tensors: dict[str, torch.Tensor], head_path: str) -> int | None:
    w = tensors.get(f"{head_path}.weight")      # a Linear's, or a 1x1 conv head's (K, C, 1, 1)
    return int(w.shape[0]) if w is not None and w.dim() in (2, 4) else None


def add_model(market, arch: str, weights: str | Path | bytes, classes: list[str], dataset: str, *,
              k: int = 20, seed: int = 0, model_id: str | None = None, input_size: int = 32,
              mean: list[float] | None = None, std: list[float] | None = None,
              fewshot: str | Path | bytes | None = None, replace: bool = False,
              limits: AddLimits | None = None) -> AddedModel:
    """Check everything, then store the model; returns its spec and what was measured.
    ``weights`` and ``fewshot`` are files or their bytes (an upload over HTTP)."""
    limits = limits or AddLimits()
    from snp_ray.market.market import fewshot_seed

    store = market.store
    info = get_dataset(dataset)
    if info.modality != "image":
        raise ConfigError(f"adding models is supported for image datasets; {dataset} is {info.modality}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    existing = store.ids()
    mid = check_id(model_id) if model_id else _default_id(arch, existing)
    if mid in existing and not replace:
        raise ModelExistsError(f"model {mid!r} is already in the store at {store.root}; "
                               "pass --replace to overwrite it")
    others = sorted({store.spec(i).dataset for i in existing if i != mid})
    if others and others != [dataset]:
        raise DatasetMismatchError(f"this market holds {', '.join(others)} models; a market holds "
                                   f"one dataset (its classes are keyed by id), so a {dataset} "
                                   "model goes into a market of its own")
    vocab = dataset_class_names(dataset)
    class_ids = resolve_class_ids(list(classes), vocab, kind=f"{dataset} class", what="--classes")
    ref = parse_ref(arch)
    if not isinstance(input_size, int) or isinstance(input_size, bool):
        raise ConfigError(f"input size must be an integer, got {input_size!r}")
    spec_in = ImageSpec(mean=list(mean) if mean is not None else (IMAGENET_MEAN if ref.external else [0.5] * 3),
                        std=list(std) if std is not None else (IMAGENET_STD if ref.external else [0.25] * 3),
                        size=[input_size, input_size])
    example = spec_in.example()

    # --- the architecture, its head, and the weights
    n = len(class_ids)
    if ref.external:
        raw = build_external(ref, n, limits.max_params)
        try:
            with torch.no_grad():
                raw(example)
            probe = split_classifier(raw, example)
        except SnpError:
            raise
        except (RuntimeError, ValueError, AssertionError, IndexError) as e:
            raise ConfigError(f"{ref} cannot run on a {input_size}x{input_size} input: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        head_path = probe.head_path
    else:
        raw = build_capped(lambda: build_model(ref.name, n, ref_width(ref)), str(ref),
                           limits.max_params)
        head_path = "head"
    tensors, weights_sha = read_weights(weights, limits.max_weights_bytes)
    outputs = _head_outputs(tensors, head_path)
    if outputs is not None and outputs != n:
        raise ConfigError(f"--classes names {n} classes but the weights' head {head_path} has "
                          f"{outputs} outputs; output i of the model is class i of --classes")
    what = f"weights for {ref}" if isinstance(weights, (bytes, bytearray)) else f"weights in {weights}"
    check_state(raw, tensors, what)
    raw.load_state_dict(tensors, strict=True)
    raw.eval()
    try:
        model: Classifier = split_classifier(raw, example) if ref.external else raw
        with torch.no_grad():
            out = model(example)
    except SnpError:
        raise
    except (RuntimeError, ValueError, AssertionError, IndexError) as e:
        raise ConfigError(f"{ref} cannot run on a {input_size}x{input_size} input: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if out.shape != (example.shape[0], n):
        raise ConfigError(f"{ref} outputs {tuple(out.shape)}, expected (batch, {n})")

    # --- the few-shot samples
    index = max((store.spec(i).index for i in existing if i != mid), default=-1) + 1
    if mid in existing:
        index = store.spec(mid).index
    mseed = fewshot_seed(seed, index)
    upload_blob = None
    if fewshot is not None:
        what = "few-shot file" if isinstance(fewshot, (bytes, bytearray)) else f"few-shot file {fewshot}"
        upload_blob = read_capped(fewshot, limits.max_fewshot_bytes, "few-shot file")
        split = split_from_bytes(upload_blob, dataset, "upload", vocab, what,
                                 limits.max_fewshot_rows, limits.max_fewshot_decoded_bytes)
        stray = sorted(set(np.unique(split.labels).tolist()) - set(class_ids))
        if stray:
            raise DataError(f"{what} holds rows of classes {[vocab[c] for c in stray]} that the "
                            f"model does not have ({[vocab[c] for c in class_ids]})")
        counts = {vocab[c]: int((split.labels == c).sum()) for c in class_ids}
        short = {c: m for c, m in counts.items() if m < k}
        if short:
            raise DataError(f"{what} has fewer than k={k} rows of classes {short}")
        manifest = sample_k_shot(split.labels, class_ids, k, mseed, dataset, "upload")
        source = {"source": "upload", "file": UPLOAD_FILE, "sha256": sha256_bytes(upload_blob),
                  "rows": int(len(split)), "class_names": vocab, "seed": seed}
    else:
        split = market.train_split(dataset)
        manifest = sample_k_shot(split.labels, class_ids, k, mseed, dataset)
        source = {"source": "train", "dataset": dataset, "k": k, "seed": seed}
    rows = np.array([r for per in manifest.row_ids for r in per], dtype=np.int64)
    sub = split.rows(rows)
    local = np.array([class_ids.index(int(c)) for c in sub.labels])
    with torch.no_grad():
        pred = model(spec_in.encode(sub.images)).argmax(1).numpy()
    accuracy = float((pred == local).mean())

    spec = ModelSpec(id=mid, task="added", index=index, arch=str(ref) if ref.external else ref.name,
                     width=ref_width(ref), dataset=dataset, classes=class_ids,
                     class_names=[vocab[c] for c in class_ids], input=spec_in.to_dict(),
                     train={"added": True, "fewshot": source, "weights_file_sha256": weights_sha},
                     metrics={"fewshot_accuracy": accuracy, "fewshot_k": float(k),
                              "macs": float(count_macs(model, example))})
    spec.validate()

    # --- write: nothing above wrote anything. The model is written to a private staging folder
    # and moved into place by renames, so a failure at any point leaves the old model (or none).
    with staging_dir(store.root) as folder:
        staged = ModelStore(folder)
        if upload_blob is not None:
            atomic_write_bytes(staged.model_dir(mid) / UPLOAD_FILE, upload_blob)
        saved = staged.save(model, spec)       # weights, then the spec
        staged.save_manifest(mid, manifest)
        store.install(staged.model_dir(mid), mid)
    return AddedModel(saved, int(spec.metrics["macs"]), accuracy, int(rows.size))
