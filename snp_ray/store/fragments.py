"""The fragment store: safetensors blobs plus a Parquet manifest, on any pyarrow filesystem.

Layout under the store URI (a local path or ``s3://bucket/prefix``)::

    blobs/<sha256>.safetensors            weights, content-addressed
    manifest/part-<time>-<writer>-<id>.parquet   one row per fragment (spec JSON included)

A fragment becomes visible only when a manifest part that names it exists, and a part is written
after its blob, each in one atomic step (rename on local disks, a single PUT on S3). Many writers
never touch the same file: each writes its own parts. Readers take the union of the parts and keep
one row per key (model weights hash + class + slice config + k + sample seed), so a pair sliced
twice (a retried task, a lost node) still appears once. ``compact`` folds the parts into one.
"""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
from typing import Any, Iterable
from urllib.parse import parse_qs, urlparse

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from snp_ray.artifacts import sha256_bytes
from snp_ray.errors import ArtifactNotFoundError, ConfigError, IntegrityError, StoreError
from snp_ray.slicing.fragment import Fragment, FragmentSpec

log = logging.getLogger(__name__)

SCHEMA = pa.schema([
    ("key", pa.string()), ("model_id", pa.string()), ("model_sha256", pa.string()),
    ("class_id", pa.int32()), ("class_name", pa.string()), ("config_digest", pa.string()),
    ("k", pa.int32()), ("fewshot_seed", pa.int32()), ("arch", pa.string()),
    ("kept", pa.string()), ("feature_dim", pa.int32()), ("params", pa.int64()),
    ("source_params", pa.int64()), ("flops", pa.int64()), ("metrics", pa.string()),
    ("seconds", pa.float64()), ("sha256", pa.string()), ("spec_sha256", pa.string()),
    ("blob", pa.string()), ("spec", pa.string()), ("created", pa.float64()), ("writer", pa.string()),
])


def open_filesystem(uri: str, connect_timeout: float = 3.0, retries: int = 3) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and base path for a local path or an ``s3://`` URI.

    S3 URIs may carry ``endpoint_override`` and ``scheme`` query parameters (for S3-compatible
    servers); credentials come from the usual AWS environment variables. Requests are retried a
    bounded number of times, so an unreachable endpoint fails in seconds, not minutes.
    """
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        q = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        unknown = set(q) - {"endpoint_override", "scheme", "region"}
        if unknown:
            raise ConfigError(f"unsupported S3 URI parameters {sorted(unknown)} in {uri}")
        fs = pafs.S3FileSystem(
            endpoint_override=q.get("endpoint_override"), scheme=q.get("scheme", "https"),
            region=q.get("region", os.environ.get("AWS_DEFAULT_REGION", "us-east-1")),
            connect_timeout=connect_timeout, request_timeout=connect_timeout * 2,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=retries))
        return fs, (parsed.netloc + parsed.path).rstrip("/")
    if parsed.scheme not in ("", "file"):
        raise ConfigError(f"unsupported store URI scheme {parsed.scheme!r} in {uri}")
    path = os.path.abspath(parsed.path if parsed.scheme == "file" else uri)
    return pafs.LocalFileSystem(), path


class FragmentStore:
    def __init__(self, uri: str | os.PathLike, writer: str | None = None):
        self.uri = str(uri)
        self.fs, self.base = open_filesystem(self.uri)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.writer = writer or f"{os.uname().nodename}-{os.getpid()}"
        self._rows: dict[str, dict[str, Any]] | None = None

    def __repr__(self) -> str:
        return f"FragmentStore({self.uri!r})"

    # ------------------------------------------------------------------ low level
    def _path(self, *parts: str) -> str:
        return "/".join([self.base, *parts])

    def _write(self, path: str, data: bytes) -> None:
        """All or nothing: a temp file renamed into place locally; one PUT on object stores."""
        try:
            parent = path.rsplit("/", 1)[0]
            self.fs.create_dir(parent, recursive=True)
            if self.local:
                tmp = f"{parent}/.{uuid.uuid4().hex}.tmp"
                try:
                    with self.fs.open_output_stream(tmp) as out:
                        out.write(data)
                    self.fs.move(tmp, path)
                except BaseException:
                    try:
                        self.fs.delete_file(tmp)
                    except OSError:
                        pass
                    raise
            else:
                with self.fs.open_output_stream(path) as out:
                    out.write(data)
        except OSError as e:
            raise StoreError(f"cannot write {path} in {self}: {e}") from e

    def _read(self, path: str, what: str) -> bytes:
        try:
            with self.fs.open_input_stream(path) as f:
                return f.read()
        except FileNotFoundError:
            raise ArtifactNotFoundError(f"{what} {path} is missing from {self}") from None
        except OSError as e:
            if "not found" in str(e).lower() or "no such" in str(e).lower():
                raise ArtifactNotFoundError(f"{what} {path} is missing from {self}") from None
            raise StoreError(f"cannot read {what} {path} from {self}: {e}") from e

    def _parts(self) -> list[str]:
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self._path("manifest"), allow_not_found=True))
        except OSError as e:
            raise StoreError(f"cannot list the manifest of {self}: {e}") from e
        return sorted(i.path for i in infos if i.type == pafs.FileType.File
                      and i.base_name.endswith(".parquet") and not i.base_name.startswith((".", "_")))

    # ------------------------------------------------------------------ manifest
    def refresh(self) -> "FragmentStore":
        self._rows = None
        return self

    def rows(self) -> dict[str, dict[str, Any]]:
        """key -> manifest row, one per key (the earliest write wins)."""
        if self._rows is None:
            table = self.manifest_table()
            rows: dict[str, dict[str, Any]] = {}
            for r in sorted(table.to_pylist(), key=lambda r: (r["created"], r["writer"])):
                rows.setdefault(r["key"], r)
            self._rows = rows
        return self._rows

    def manifest_table(self) -> pa.Table:
        tables = []
        for part in self._parts():
            try:
                with self.fs.open_input_file(part) as f:
                    t = pq.read_table(f)
            except (pa.ArrowInvalid, OSError) as e:
                raise IntegrityError(f"manifest part {part} of {self} is unreadable: {e}") from None
            missing = [n for n in SCHEMA.names if n not in t.schema.names]
            if missing:
                raise IntegrityError(f"manifest part {part} of {self} lacks columns {missing}")
            tables.append(t.select(SCHEMA.names).cast(SCHEMA))
        return pa.concat_tables(tables) if tables else SCHEMA.empty_table()

    def dataset(self) -> pads.Dataset:
        """The raw manifest as a pyarrow dataset (may hold duplicate keys before compaction)."""
        return pads.dataset(self._path("manifest"), filesystem=self.fs, format="parquet",
                            schema=SCHEMA)

    def keys(self) -> set[str]:
        return set(self.rows())

    def has(self, key: str) -> bool:
        return key in self.rows()

    def find(self, model_id: str | None = None, class_id: int | None = None,
             config_digest: str | None = None, k: int | None = None,
             seed: int | None = None) -> list[dict[str, Any]]:
        want = {"model_id": model_id, "class_id": class_id, "config_digest": config_digest,
                "k": k, "fewshot_seed": seed}
        return [r for r in self.rows().values()
                if all(v is None or r[f] == v for f, v in want.items())]

    # ------------------------------------------------------------------ fragments
    def put(self, fragment: Fragment) -> tuple[str, bool]:
        """Store ``fragment``; returns (key, written). Already stored keys are not rewritten."""
        spec_json, weights = fragment.to_blobs()
        spec = fragment.spec
        if self.has(spec.key):
            return spec.key, False
        blob = f"blobs/{spec.weights_sha256}.safetensors"
        self._write(self._path(blob), weights)
        row = {"key": spec.key, "model_id": spec.source_model, "model_sha256": spec.source_sha256,
               "class_id": spec.class_id, "class_name": spec.class_name,
               "config_digest": spec.config_digest, "k": spec.k, "fewshot_seed": spec.fewshot_seed,
               "arch": spec.arch, "kept": json.dumps(spec.kept), "feature_dim": spec.feature_dim,
               "params": spec.params, "source_params": spec.source_params, "flops": spec.flops,
               "metrics": json.dumps(spec.metrics), "seconds": spec.seconds,
               "sha256": spec.weights_sha256, "spec_sha256": sha256_bytes(spec_json), "blob": blob,
               "spec": spec_json.decode(), "created": time.time(), "writer": self.writer}
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist([row], schema=SCHEMA), sink)
        name = f"part-{time.time_ns()}-{_safe(self.writer)}-{uuid.uuid4().hex[:8]}.parquet"
        self._write(self._path("manifest", name), sink.getvalue().to_pybytes())
        if self._rows is not None:
            self._rows.setdefault(spec.key, row)
        return spec.key, True

    def blobs(self, key: str) -> tuple[bytes, bytes]:
        """(spec JSON, weights) of a stored fragment, both checked against the manifest."""
        row = self.rows().get(key)
        if row is None:
            raise ArtifactNotFoundError(f"fragment {key} is not in {self}")
        spec_json = row["spec"].encode()
        if sha256_bytes(spec_json) != row["spec_sha256"]:
            raise IntegrityError(f"fragment {key}: spec sha256 mismatch in the manifest of {self}")
        weights = self._read(self._path(row["blob"]), f"weights of fragment {key}")
        if sha256_bytes(weights) != row["sha256"]:
            raise IntegrityError(f"fragment {key}: weights sha256 mismatch in {self}")
        return spec_json, weights

    def get(self, key: str) -> Fragment:
        spec_json, weights = self.blobs(key)
        return Fragment.from_blobs(spec_json, weights, f"fragment {key}")

    def specs(self, rows: Iterable[dict[str, Any]] | None = None) -> list[FragmentSpec]:
        return [FragmentSpec.from_json(r["spec"]) for r in (rows or self.rows().values())]

    def compact(self) -> int:
        """Fold every manifest part into one file (duplicates dropped); returns parts removed."""
        parts = self._parts()
        if len(parts) <= 1:
            return 0
        self.refresh()
        rows = list(self.rows().values())
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), sink)
        name = f"part-{time.time_ns()}-compact-{uuid.uuid4().hex[:8]}.parquet"
        self._write(self._path("manifest", name), sink.getvalue().to_pybytes())
        for p in parts:  # the new part holds every row of these, so removing them loses nothing
            try:
                self.fs.delete_file(p)
            except OSError as e:
                log.warning("could not remove compacted part %s: %s", p, e)
        self.refresh()
        return len(parts)


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text)[:40]
