"""The market's model store: each original model as safetensors weights plus a JSON spec.

Layout under the store root::

    market.json                        the task and training settings that built the market
    models/<id>/weights.safetensors    the weights (no pickle)
    models/<id>/spec.json              ModelSpec, including the weights' sha256
    models/<id>/fewshot/k<K>-s<S>.json the k-shot manifest the developer uploaded

The spec is written after the weights, so a model becomes visible only once both are complete.

A model's :attr:`ModelSpec.identity` digests everything that decides what its fragments are: the
weights, which output is which class, the input spec, where its few-shot samples come from, the
architecture and the id. Fragment keys derive from it, so correcting ``--classes`` or ``--mean``
of a stored model (same weights) gives new keys and never serves a fragment cut for the old ones.
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from snp_ray.artifacts import (atomic_write_bytes, atomic_write_json, load_state_strict, publish_dir,
                               read_bytes, read_json, sha256_bytes, tensors_from_bytes,
                               tensors_to_bytes)
from snp_ray.config import Config
from snp_ray.data.fewshot import FewShotManifest
from snp_ray.data.specs import InputSpec
from snp_ray.errors import ArtifactNotFoundError, ConfigError, IntegrityError, SnpError, StoreError
from snp_ray.models import Classifier, count_params
from snp_ray.models.refs import build_arch

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass
class ModelSpec(Config):
    id: str
    task: str
    index: int
    arch: str
    width: float
    dataset: str
    classes: list[int]                     # global class ids; position = local id
    class_names: list[str]
    input: dict[str, Any]                  # InputSpec as a dict
    params: int = 0
    weights_sha256: str = ""
    train: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        check_id(self.id)
        if len(self.classes) != len(self.class_names):
            raise ConfigError(f"model {self.id}: {len(self.classes)} classes but "
                              f"{len(self.class_names)} class names")

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec.from_any(self.input)

    @property
    def arch_ref(self) -> str:
        """The architecture as ``snp market add --arch`` takes it (zoo models with their width)."""
        return self.arch if ":" in self.arch else f"snp:{self.arch}?width={self.width:g}"

    @functools.cached_property
    def identity(self) -> str:
        """sha256 of what decides this model's fragments (see the module docstring). The
        few-shot source is the developer's upload (its sha256) or seed for an added model; a
        trained market's models draw theirs from the slicing seed, which fragment keys carry.
        Computed once per spec: the catalogue compares it with every manifest row (specs are
        never changed in place; ``replace`` makes a new one)."""
        fewshot = self.train.get("fewshot") if isinstance(self.train, dict) else None
        doc = {"id": self.id, "index": self.index, "arch": self.arch, "width": self.width,
               "dataset": self.dataset, "weights": self.weights_sha256,
               "classes": list(self.classes), "class_names": list(self.class_names),
               "input": self.input, "fewshot": fewshot or None}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def build(self) -> Classifier:
        vocab = len(self.input.get("vocab", [])) or None
        return build_arch(self.arch, len(self.classes), self.width, vocab_size=vocab,
                          example=self.input_spec.example(), table=self.input.get("table", ""))


def check_id(model_id: str) -> str:
    if not isinstance(model_id, str) or not _ID.match(model_id):
        raise ConfigError(f"invalid id {model_id!r}: use letters, digits, '.', '_' or '-'")
    return model_id


class ModelStore:
    """Models of one market on a local filesystem."""

    def __init__(self, root: str | Path):
        from snp_ray.data.embeddings import FOLDER, add_table_dir

        self.root = Path(root)
        add_table_dir(self.root / FOLDER)    # the static word-embedding tables its models read

    def model_dir(self, model_id: str) -> Path:
        return self.root / "models" / check_id(model_id)

    def ids(self) -> list[str]:
        base = self.root / "models"
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if (p / "spec.json").is_file())

    def exists(self, model_id: str) -> bool:
        return (self.model_dir(model_id) / "spec.json").is_file()

    def save(self, model: Classifier, spec: ModelSpec) -> ModelSpec:
        """Upload a model. Non-finite weights are refused before anything is written."""
        state = model.state_dict()
        bad = [k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise IntegrityError(f"model {spec.id}: tensors {bad[:3]} hold NaN or Inf; not stored")
        blob = tensors_to_bytes(state)
        spec = spec.replace(params=count_params(model), weights_sha256=sha256_bytes(blob))
        folder = self.model_dir(spec.id)
        atomic_write_bytes(folder / "weights.safetensors", blob)
        atomic_write_json(folder / "spec.json", spec.to_dict())
        return spec

    def spec(self, model_id: str) -> ModelSpec:
        path = self.model_dir(model_id) / "spec.json"
        if not path.is_file():
            raise ArtifactNotFoundError(f"model {model_id!r} is not in the store at {self.root}; "
                                        f"models there: {self.ids()}")
        try:
            return ModelSpec.from_dict(read_json(path, f"spec of model {model_id}"))
        except ConfigError as e:
            raise IntegrityError(f"spec of model {model_id} is invalid: {e}") from None

    def load(self, model_id: str) -> tuple[Classifier, ModelSpec]:
        """Load and verify a model: checksum first, then names and shapes against its spec."""
        spec = self.spec(model_id)
        what = f"weights of model {model_id}"
        blob = read_bytes(self.model_dir(model_id) / "weights.safetensors", what)
        tensors = tensors_from_bytes(blob, spec.weights_sha256, what)
        try:
            model = spec.build()
        except SnpError as e:
            raise IntegrityError(f"spec of model {model_id} cannot be built: {e}") from None
        load_state_strict(model, tensors, what)
        return model.eval(), spec

    def remove(self, model_id: str) -> "ModelSpec":
        """Delete a model: its spec first (the model disappears at once), then its folder."""
        import shutil

        spec = self.spec(model_id)
        folder = self.model_dir(model_id)
        try:
            (folder / "spec.json").unlink()
            shutil.rmtree(folder)
        except OSError as e:
            raise StoreError(f"cannot remove model {model_id} at {folder}: {e.strerror or e}") from e
        return spec

    def install(self, staged: Path, model_id: str) -> None:
        """Move a complete model folder (written in a :func:`~snp_ray.artifacts.staging_dir` of
        this store) into place by :func:`~snp_ray.artifacts.publish_dir`: an existing model is
        renamed aside, the new one renamed in, the old one deleted, so readers see the old model
        or the new one, never a mix, and if the second rename fails the old one is put back."""
        dest = self.model_dir(model_id)
        try:
            publish_dir(staged, dest, trash=self.root / ".trash")
        except OSError as e:
            raise StoreError(f"cannot install model {model_id} at {dest}: {e.strerror or e}") from e

    def save_manifest(self, model_id: str, manifest: FewShotManifest) -> None:
        atomic_write_json(self._manifest_path(model_id, manifest.k, manifest.seed), manifest.to_dict())

    def manifest(self, model_id: str, k: int, seed: int) -> FewShotManifest | None:
        path = self._manifest_path(model_id, k, seed)
        if not path.is_file():
            return None
        try:
            return FewShotManifest.from_dict(read_json(path, "few-shot manifest"))
        except ConfigError as e:
            raise IntegrityError(f"few-shot manifest {path} is invalid: {e}") from None

    def _manifest_path(self, model_id: str, k: int, seed: int) -> Path:
        return self.model_dir(model_id) / "fewshot" / f"k{int(k)}-s{int(seed)}.json"

    def write_market_info(self, info: dict[str, Any]) -> None:
        atomic_write_json(self.root / "market.json", info)

    def market_info(self) -> dict[str, Any]:
        path = self.root / "market.json"
        return read_json(path, "market description") if path.is_file() else {}
