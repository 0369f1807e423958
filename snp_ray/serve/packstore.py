"""Content-addressed pack store: ``<root>/<id>/`` holds a pack's spec, weights and metadata.

A pack's id is the sha256 of its fragment keys and its packing config, so the same plan always
lands in the same folder and a restarted service finds it. A folder appears whole or not at all:
it is written under ``.staging/`` and renamed into place. ``requests/<digest>.json`` remembers
which pack answered a request, so a repeated request costs two small reads. Exports (ONNX,
``torch.export``) are made on first download and kept beside the weights.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from snp_ray.artifacts import atomic_write_bytes, atomic_write_json, read_bytes, sha256_bytes
from snp_ray.errors import ArtifactNotFoundError, ConfigError, StoreError
from snp_ray.packing.model import PackedModel

_ID = re.compile(r"[0-9a-f]{24}")
EXPORTS = {"model.onnx": "onnx", "model.pt2": "pt2"}
FILES = ("model.safetensors", "spec.json", *EXPORTS)


def pack_id(fragment_keys: list[str], classes: list[int], pack_config: dict[str, Any],
            samples: dict[str, Any]) -> str:
    """The content hash that names a pack (24 hex digits)."""
    doc = {"fragments": list(fragment_keys), "classes": list(classes), "pack": pack_config,
           "samples": samples, "format": 2}   # 2: the CV copies train in the pack's loop
    return sha256_bytes(json.dumps(doc, sort_keys=True).encode())[:24]


class PackStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def _dir(self, pid: str) -> Path:
        if not isinstance(pid, str) or not _ID.fullmatch(pid):
            raise ArtifactNotFoundError(f"no pack {pid!r}: a pack id is 24 hex digits")
        return self.root / pid

    def has(self, pid: str) -> bool:
        try:
            return (self._dir(pid) / "meta.json").is_file()
        except ArtifactNotFoundError:
            return False

    def meta(self, pid: str) -> dict[str, Any]:
        path = self._dir(pid) / "meta.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise ArtifactNotFoundError(f"no pack {pid} in {self.root}") from None

    def put(self, pid: str, packed: PackedModel, meta: dict[str, Any]) -> dict[str, Any]:
        """Store a pack under its id (a no-op when it is already there: same id, same pack)."""
        final = self._dir(pid)
        if self.has(pid):
            return self.meta(pid)
        staging = self.root / ".staging" / uuid.uuid4().hex
        try:
            spec, weights = packed.to_blobs()
            atomic_write_bytes(staging / "spec.json", spec)
            atomic_write_bytes(staging / "model.safetensors", weights)
            meta = {**meta, "id": pid, "files": {"spec.json": sha256_bytes(spec),
                                                 "model.safetensors": sha256_bytes(weights)}}
            atomic_write_json(staging / "meta.json", meta)
            try:
                os.rename(staging, final)
            except OSError:
                if not self.has(pid):       # lost a race to an identical writer: fine
                    raise
        except OSError as e:
            raise StoreError(f"cannot store pack {pid} in {self.root}: {e}") from e
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return meta

    def load(self, pid: str) -> PackedModel:
        folder = self._dir(pid)
        if not self.has(pid):
            raise ArtifactNotFoundError(f"no pack {pid} in {self.root}")
        return PackedModel.from_blobs(read_bytes(folder / "spec.json", "pack spec"),
                                      read_bytes(folder / "model.safetensors", "pack weights"),
                                      f"pack {pid}")

    def file(self, pid: str, name: str) -> Path:
        """A pack's file, exporting it on first request (``model.onnx``, ``model.pt2``)."""
        if name not in FILES:
            raise ArtifactNotFoundError(f"no file {name!r}; a pack has {list(FILES)}")
        folder = self._dir(pid)
        if not self.has(pid):
            raise ArtifactNotFoundError(f"no pack {pid} in {self.root}")
        path = folder / name
        if not path.is_file() and name in EXPORTS:
            from snp_ray.packing.model import export_onnx, export_pt2

            exporter = export_onnx if EXPORTS[name] == "onnx" else export_pt2
            exporter(self.load(pid), path)
        return path

    # ---------------------------------------------------------------- request index
    def _request_path(self, digest: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{32}", digest):
            raise ConfigError(f"bad request digest {digest!r}")
        return self.root / "requests" / f"{digest}.json"

    def lookup(self, digest: str) -> str | None:
        try:
            pid = json.loads(self._request_path(digest).read_text())["id"]
        except (FileNotFoundError, ValueError, KeyError):
            return None
        return pid if self.has(pid) else None

    def remember(self, digest: str, pid: str) -> None:
        atomic_write_json(self._request_path(digest), {"id": pid})

    def ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if _ID.fullmatch(p.name)
                      and (p / "meta.json").is_file())
