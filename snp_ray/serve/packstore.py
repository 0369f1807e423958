"""Content-addressed pack store: ``<root>/<id>/`` holds a pack's spec, weights and metadata.

A pack's id is the sha256 of its fragment keys and its packing config, so the same plan always
lands in the same folder and a restarted service finds it. A folder appears whole or not at all:
it is written under ``.staging/`` and renamed into place. ``requests/<digest>.json`` remembers
which pack answered a request, so a repeated request costs two small reads. Exports (ONNX,
``torch.export``) are made on first download and kept beside the weights, one export per
(pack, file) at a time (single flight: others wait for it).

Packs are derived data (a request rebuilds one), so a store may be bounded in bytes
(``max_bytes``): after a write, the least recently used packs are evicted until the store fits.
A pack in use is never evicted: one held by this process (loaded in a predictor, being built,
loaded or exported: :meth:`PackStore.hold`, :meth:`PackStore.pinned`) or used by any process
within ``grace_s`` (last use is the mtime of ``meta.json``, which every serving read touches).
An evicted pack's request entries go with it, so no request names a missing pack.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from snp_ray.artifacts import (atomic_write_bytes, atomic_write_json, publish_dir, read_bytes,
                               sha256_bytes, staging_dir)
from snp_ray.errors import ArtifactNotFoundError, ConfigError, StoreError
from snp_ray.packing.model import PackedModel

log = logging.getLogger(__name__)

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
    """``max_bytes``: evict least recently used packs beyond this many bytes (0: unbounded);
    ``grace_s``: a pack used this recently (by any process sharing the folder) is never evicted,
    which covers a download between its route and its streaming, and other replicas' reads."""

    def __init__(self, root: str | os.PathLike, max_bytes: int = 0, grace_s: float = 60.0):
        self.root = Path(root)
        self.max_bytes, self.grace_s = int(max_bytes), float(grace_s)
        self._lock = threading.Lock()
        self._holds: dict[int, str] = {}                 # hold token -> pack id
        self._tokens = itertools.count()
        self._exports: dict[tuple[str, str], threading.Lock] = {}

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
        """Store a pack under its id and return the stored metadata: a no-op when it is already
        there (same id, same pack), and the winner's metadata when a concurrent writer of the
        same id renamed its folder first, so every caller answers with what the store holds."""
        final = self._dir(pid)
        if self.has(pid):
            return self.meta(pid)
        try:
            with staging_dir(self.root) as staging:
                spec, weights = packed.to_blobs()
                atomic_write_bytes(staging / "spec.json", spec)
                atomic_write_bytes(staging / "model.safetensors", weights)
                meta = {**meta, "id": pid, "files": {"spec.json": sha256_bytes(spec),
                                                     "model.safetensors": sha256_bytes(weights)}}
                atomic_write_json(staging / "meta.json", meta)
                if not publish_dir(staging, final):
                    meta = self.meta(pid)   # lost a race to an identical writer: its meta
        except OSError as e:
            raise StoreError(f"cannot store pack {pid} in {self.root}: {e}") from e
        if self.max_bytes:
            with self.pinned(pid):          # the pack just written is not what gets evicted
                self.evict()
        return meta

    def load(self, pid: str) -> PackedModel:
        folder = self._dir(pid)
        with self.pinned(pid):
            if not self.has(pid):
                raise ArtifactNotFoundError(f"no pack {pid} in {self.root}")
            self.used(pid)
            return PackedModel.from_blobs(read_bytes(folder / "spec.json", "pack spec"),
                                          read_bytes(folder / "model.safetensors", "pack weights"),
                                          f"pack {pid}")

    def file(self, pid: str, name: str) -> Path:
        """A pack's file, exporting it on first request (``model.onnx``, ``model.pt2``)."""
        if name not in FILES:
            raise ArtifactNotFoundError(f"no file {name!r}; a pack has {list(FILES)}")
        folder = self._dir(pid)
        with self.pinned(pid):
            if not self.has(pid):
                raise ArtifactNotFoundError(f"no pack {pid} in {self.root}")
            self.used(pid)
            path = folder / name
            if not path.is_file() and name in EXPORTS:
                with self._export_lock(pid, name):   # single flight: one export per file
                    if not path.is_file():           # the one we waited for made it
                        from snp_ray.packing.model import export_onnx, export_pt2

                        exporter = export_onnx if EXPORTS[name] == "onnx" else export_pt2
                        exporter(self.load(pid), path)
            return path

    def _export_lock(self, pid: str, name: str) -> threading.Lock:
        with self._lock:
            return self._exports.setdefault((pid, name), threading.Lock())

    # ---------------------------------------------------------------- use and eviction
    def used(self, pid: str) -> None:
        """Mark a pack as used now (its eviction order and grace period)."""
        try:
            os.utime(self._dir(pid) / "meta.json")
        except OSError:
            pass                            # gone meanwhile: the caller's read reports it

    def hold(self, pid: str) -> int:
        """Keep ``pid`` from eviction until :meth:`release` of the returned token (a predictor
        holds the packs it has loaded)."""
        with self._lock:
            token = next(self._tokens)
            self._holds[token] = pid
        return token

    def release(self, token: int) -> None:
        """End a :meth:`hold`; releasing a token twice is a no-op."""
        with self._lock:
            self._holds.pop(token, None)

    @contextmanager
    def pinned(self, pid: str) -> Iterator[None]:
        """Hold ``pid`` for the duration of a block (a build, load or export)."""
        token = self.hold(pid)
        try:
            yield
        finally:
            self.release(token)

    def in_use(self) -> set[str]:
        with self._lock:
            return set(self._holds.values())

    def size(self, pid: str) -> int:
        """A pack's bytes on disk (its exports included)."""
        try:
            return sum(p.stat().st_size for p in self._dir(pid).iterdir() if p.is_file())
        except OSError:
            return 0

    def evict(self) -> list[str]:
        """Remove least recently used packs until the store fits ``max_bytes``; packs held by
        this process or used within ``grace_s`` stay. Returns the ids removed."""
        if not self.max_bytes:
            return []
        with self._lock:                    # one eviction at a time; holds wait for it
            packs = []
            for pid in self.ids():
                try:
                    last = (self.root / pid / "meta.json").stat().st_mtime
                except OSError:
                    continue
                packs.append((last, pid, self.size(pid)))
            total = sum(size for _, _, size in packs)
            held, now = set(self._holds.values()), time.time()
            evicted = []
            for last, pid, size in sorted(packs):
                if total <= self.max_bytes:
                    break
                if pid in held or now - last < self.grace_s:
                    continue
                if self._unlink(pid):
                    total -= size
                    evicted.append(pid)
        self._forget(evicted)
        if evicted:
            log.info("evicted %d packs from %s (LRU, bound %d bytes; %d bytes left)",
                     len(evicted), self.root, self.max_bytes, total)
        return evicted

    def remove(self, pid: str) -> bool:
        """Remove a pack and the request entries that name it, held or not (retirement of a
        pack built on a model that no longer exists). Returns whether it was there."""
        self._dir(pid)
        with self._lock:
            gone = self._unlink(pid)
        self._forget([pid] if gone else [])
        return gone

    def _unlink(self, pid: str) -> bool:
        """Move the folder out in one rename (under ``_lock``: a reader sees the whole pack or
        none, and a hold taken before it is honoured by :meth:`evict`)."""
        trash = self.root / ".trash" / pid / uuid.uuid4().hex
        try:
            trash.parent.mkdir(parents=True, exist_ok=True)
            os.rename(self.root / pid, trash)
        except FileNotFoundError:
            return False
        except OSError as e:
            raise StoreError(f"cannot remove pack {pid} from {self.root}: {e}") from e
        return True

    def _forget(self, pids: list[str]) -> None:
        """Delete removed packs' bytes and the request entries that name them, so a later
        request rebuilds instead of being pointed at a missing pack."""
        if not pids:
            return
        gone = set(pids)
        for pid in pids:
            shutil.rmtree(self.root / ".trash" / pid, ignore_errors=True)
        for entry in (self.root / "requests").glob("*.json"):
            try:
                if json.loads(entry.read_text()).get("id") in gone:
                    entry.unlink()
            except (OSError, ValueError, AttributeError):
                continue                    # unreadable or removed meanwhile

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
