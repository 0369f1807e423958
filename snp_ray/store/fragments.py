"""The fragment store: safetensors blobs plus a Parquet manifest, on any pyarrow filesystem.

Layout under the store URI (a local path or ``s3://bucket/prefix``)::

    blobs/<sha256>.safetensors                         weights, content-addressed
    manifest/class_id=<c>/part-<time>-<writer>-<id>.parquet   manifest rows of class c
    manifest/part-*.parquet                            the flat layout of older stores (still read)

Why partition by class: a pack request asks for classes, and a fragment key names its class
(``<sha>-c<class>-<config>-k<k>-s<seed>``), so a class lookup and a key lookup each read one
partition, not the whole manifest. The directories are hive-style, so pyarrow, Ray Data and other
Parquet readers prune them on ``class_id`` filters (Ray Data takes ``class_id`` from the path, so it
sees none in the flat parts of an old store that was never compacted).

A fragment becomes visible only when a manifest part that names it exists, and a part is written
after its blob, each in one atomic step (rename on local disks, a single PUT on S3). Many writers
never touch the same file: each writes its own parts. Readers take the union of the parts and keep
one row per key (model weights hash + class + slice config + k + sample seed; the earliest write
wins), so a pair sliced twice (a retried task, a lost node) still appears once.

``compact`` folds each partition's parts into one part sorted by key, and moves the rows of old
flat parts into their partitions. It deletes only the parts it listed and read, and only after the
compacted parts are written, so a concurrent writer's new part is never lost; a reader that finds a
listed part gone (compacted meanwhile) lists again, so it never misses a row either.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import re
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable
from urllib.parse import parse_qs, urlparse

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from snp_ray.artifacts import atomic_write_bytes, sha256_bytes
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
    ("model_identity", pa.string()),
])
#: columns added after stores existed: a part written before them reads them as null
ADDED_COLUMNS = ("model_identity",)
#: the manifest's partition column (hive-style directories ``class_id=<c>``)
PARTITION = "class_id"
PARTITIONING = pads.partitioning(pa.schema([(PARTITION, pa.int32())]), flavor="hive")
_PARTITION_DIR = re.compile(rf"^{PARTITION}=(-?\d+)$")
_KEY_CLASS = re.compile(r"^[0-9a-f]+-c(\d+)-")
#: rows per row group of a compacted part: small enough that a key filter skips most of a part
ROW_GROUP = 4096
#: how often a reader lists again when a listed part vanished under a concurrent compaction
_RELIST = 5


def class_of_key(key: str) -> int | None:
    """The class a fragment key names (keys are ``<sha>-c<class>-...``); None if it names none."""
    m = _KEY_CLASS.match(key)
    return int(m.group(1)) if m else None


def belongs_to(row: dict[str, Any], spec, legacy: bool = True) -> bool:
    """Whether a manifest row is a fragment of the current version of model ``spec`` (a
    ``ModelSpec``, or None when the model is gone): its recorded model identity equals the
    model's. A row written before identities (``model_identity`` null) belongs by the rule the
    store always had, the model's id and weights' sha256, unless ``legacy`` is False: replacing
    or removing a model judges its own old rows that way, so none outlives the change."""
    if spec is None or row.get("model_id") != spec.id:
        return False
    if row.get("model_identity"):
        return row["model_identity"] == spec.identity
    return legacy and row.get("model_sha256") == spec.weights_sha256


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
        self._index = _Index()                 # what has been read of the manifest (refresh swaps it)

    def __repr__(self) -> str:
        return f"FragmentStore({self.uri!r})"

    # ------------------------------------------------------------------ low level
    def _path(self, *parts: str) -> str:
        return "/".join([self.base, *parts])

    def _write(self, path: str, data: bytes) -> None:
        """All or nothing: a temp file renamed into place locally
        (:func:`~snp_ray.artifacts.atomic_write_bytes`); one PUT on object stores."""
        try:
            if self.local:                     # the one atomic publish (artifacts)
                atomic_write_bytes(path, data)
            else:
                self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
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
            if _not_found(e):
                raise ArtifactNotFoundError(f"{what} {path} is missing from {self}") from None
            raise StoreError(f"cannot read {what} {path} from {self}: {e}") from e

    def _list(self, path: str, recursive: bool) -> list[pafs.FileInfo]:
        """List a manifest folder. A recursive listing can race a writer creating or a compaction
        emptying a subfolder ("Cannot list directory ...: No such file"); that is retried."""
        for attempt in range(5):
            try:
                return self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True,
                                                               recursive=recursive))
            except OSError as e:
                if attempt < 4 and _not_found(e):
                    time.sleep(0.02 * (attempt + 1))
                    continue
                raise StoreError(f"cannot list the manifest of {self}: {e}") from e
        raise AssertionError("unreachable")

    def _where(self, path: str) -> int | None | bool:
        """A part's partition: its class id, None for a flat (old-layout) part, False if the
        file is no part (a temp file, another file, a folder that is no partition)."""
        rel = path[len(self._path("manifest")) + 1:].split("/")
        name = rel[-1]
        if not name.endswith(".parquet") or name.startswith((".", "_")):
            return False
        if len(rel) == 1:
            return None
        m = _PARTITION_DIR.match(rel[0]) if len(rel) == 2 else None
        return int(m.group(1)) if m else False

    def _parts(self, class_id: int | None = None) -> list[str]:
        """Every manifest part, or those of one class partition plus the flat ones."""
        root = self._path("manifest")
        if class_id is None:
            infos = self._list(root, recursive=True)
        else:
            infos = self._list(root, False) + self._list(f"{root}/{PARTITION}={int(class_id)}", False)
        return sorted(i.path for i in infos if i.type == pafs.FileType.File
                      and self._where(i.path) is not False)

    def _read_part(self, path: str, columns: list[str] | None, key: str | None) -> pa.Table | None:
        """One part's rows (only ``columns``; only ``key``'s rows, skipping row groups whose key
        range excludes it); None if the part vanished, i.e. a compaction folded it meanwhile."""
        names = columns or SCHEMA.names
        try:
            with self.fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f)
                have = pf.schema_arrow.names
                missing = [n for n in SCHEMA.names if n not in have and n not in ADDED_COLUMNS]
                if not missing:
                    groups = _groups_holding(pf, key) if key is not None else None
                    present = [n for n in names if n in have]
                    t = (pf.read_row_groups(groups, columns=present) if groups is not None
                         else pf.read(columns=present))
                    for n in names:
                        if n not in have:
                            t = t.append_column(SCHEMA.field(n), pa.nulls(t.num_rows, SCHEMA.field(n).type))
                    t = t.select(names).cast(pa.schema([SCHEMA.field(n) for n in names]))
        except FileNotFoundError:
            return None
        except (pa.ArrowException, OSError) as e:
            if _not_found(e):
                return None
            raise IntegrityError(f"manifest part {path} of {self} is unreadable: {e}") from None
        if missing:
            raise IntegrityError(f"manifest part {path} of {self} lacks columns {missing}")
        return t.filter(pc.equal(t["key"], key)) if key is not None else t

    def _read_parts(self, paths: list[str], columns: list[str] | None = None,
                    key: str | None = None) -> tuple[list[pa.Table], list[str], list[str]]:
        """(tables, paths read, paths vanished), reading parts in parallel (S3 latency)."""
        if len(paths) > 1:
            with ThreadPoolExecutor(min(16, len(paths))) as ex:
                tables = list(ex.map(lambda p: self._read_part(p, columns, key), paths))
        else:
            tables = [self._read_part(p, columns, key) for p in paths]
        read = [p for p, t in zip(paths, tables) if t is not None]
        gone = [p for p, t in zip(paths, tables) if t is None]
        return [t for t in tables if t is not None], read, gone

    def _load(self, class_id: int | None = None, columns: list[str] | None = None,
              key: str | None = None) -> pa.Table:
        """The manifest's raw rows (or one partition's plus the flat parts'). A listed part that
        vanished was folded by a compaction whose part is already written: list again."""
        for _ in range(_RELIST):
            tables, _, gone = self._read_parts(self._parts(class_id), columns, key)
            if not gone:
                schema = pa.schema([SCHEMA.field(n) for n in columns or SCHEMA.names])
                return pa.concat_tables(tables) if tables else schema.empty_table()
            log.debug("%d manifest parts of %s vanished while read; listing again", len(gone), self)
        raise StoreError(f"the manifest of {self} kept changing under {_RELIST} reads; try again")

    # ------------------------------------------------------------------ manifest
    def refresh(self) -> "FragmentStore":
        """Forget what was read: the next reads see the manifest as it is then. Readers in other
        threads are not disturbed: this swaps one reference to a new, empty :class:`_Index`
        and each read method takes that reference once, so a read never mixes two generations
        (clearing the dicts in place made a concurrent ``class_rows`` raise ``KeyError``)."""
        self._index = _Index()
        return self

    def snapshot(self) -> "FragmentStore":
        """This store pinned to its current index: a later :meth:`refresh` of this store does not
        reach the snapshot, so one request reads one view of the manifest (a service takes a
        snapshot per catalogue and per request)."""
        return copy.copy(self)

    def rows(self) -> dict[str, dict[str, Any]]:
        """key -> manifest row, one per key (the earliest write wins)."""
        ix = self._index
        if ix.rows is None:
            ix.rows = _as_rows(self._load())
        return ix.rows

    def listing(self, columns: list[str]) -> dict[str, dict[str, Any]]:
        """key -> row of only ``columns``, one per key: a catalogue of a large store without
        reading every spec (rows() holds the kept units and specs too)."""
        rows = self._index.rows
        if rows is not None:
            return {k: {c: r[c] for c in columns} for k, r in rows.items()}
        cols = sorted(set(columns) | {"key", "created", "writer"})
        return {k: {c: r[c] for c in columns} for k, r in _as_rows(self._load(columns=cols)).items()}

    def manifest_table(self) -> pa.Table:
        """Every manifest row as read (duplicate keys included, until a compaction)."""
        return self._load()

    def dataset(self) -> pads.Dataset:
        """The raw manifest as a pyarrow dataset (may hold duplicate keys before compaction);
        ``class_id`` filters prune partitions."""
        return pads.dataset(self._path("manifest"), filesystem=self.fs, format="parquet",
                            schema=SCHEMA, partitioning=PARTITIONING)

    def keys(self) -> set[str]:
        """Every stored key, reading the key column alone."""
        ix = self._index
        if ix.rows is not None:
            return set(ix.rows)
        if ix.keys is None:
            ix.keys = set(self._load(columns=["key"])["key"].drop_null().to_pylist())
        return set(ix.keys)

    def has(self, key: str) -> bool:
        ix = self._index
        if ix.rows is not None:
            return key in ix.rows
        if ix.keys is not None:
            return key in ix.keys
        return self._lookup(ix, key) is not None

    def lookup(self, key: str) -> dict[str, Any] | None:
        """The manifest row of ``key`` or None, reading only the partition of the class it names."""
        return self._lookup(self._index, key)

    def _lookup(self, ix: "_Index", key: str) -> dict[str, Any] | None:
        if ix.rows is not None:
            return ix.rows.get(key)
        c = class_of_key(key)
        if c is None:
            if ix.rows is None:
                ix.rows = _as_rows(self._load())
            return ix.rows.get(key)
        rows = ix.classes.get(c)
        if rows is not None:
            return rows.get(key)
        row = ix.found.get(key)
        if row is None:                   # has() then get() reads the partition once
            row = _as_rows(self._load(c, key=key)).get(key)
            if row is None:
                return None
            ix.found[key] = row
        return row

    def class_rows(self, class_id: int) -> dict[str, dict[str, Any]]:
        """key -> row of one class's fragments, reading its partition (and any flat parts)."""
        c = int(class_id)
        ix = self._index
        if ix.rows is not None:
            return {k: r for k, r in ix.rows.items() if r["class_id"] == c}
        rows = ix.classes.get(c)
        if rows is None:
            t = self._load(c)
            rows = ix.classes[c] = _as_rows(t.filter(pc.equal(t[PARTITION], c)))
        return rows

    def _class_keys(self, class_id: int) -> set[str]:
        rows = self._index.classes.get(class_id)
        if rows is not None:
            return set(rows)
        t = self._load(class_id, columns=["key", PARTITION])
        return set(t.filter(pc.equal(t[PARTITION], class_id))["key"].to_pylist())

    def find(self, model_id: str | None = None, class_id: int | None = None,
             config_digest: str | None = None, k: int | None = None,
             seed: int | None = None) -> list[dict[str, Any]]:
        want = {"model_id": model_id, "class_id": class_id, "config_digest": config_digest,
                "k": k, "fewshot_seed": seed}
        rows = self.rows() if class_id is None else self.class_rows(class_id)
        return [r for r in rows.values() if all(v is None or r[f] == v for f, v in want.items())]

    # ------------------------------------------------------------------ fragments
    def put(self, fragment: Fragment) -> tuple[str, bool]:
        """Store ``fragment``; returns (key, written). Already stored keys are not rewritten."""
        spec_json, weights = fragment.to_blobs()
        spec = fragment.spec
        if self.has(spec.key):
            return spec.key, False
        row = {"key": spec.key, "model_id": spec.source_model, "model_sha256": spec.source_sha256,
               "model_identity": spec.source_identity or None,
               "class_id": spec.class_id, "class_name": spec.class_name,
               "config_digest": spec.config_digest, "k": spec.k, "fewshot_seed": spec.fewshot_seed,
               "arch": spec.arch, "kept": json.dumps(spec.kept), "feature_dim": spec.feature_dim,
               "params": spec.params, "source_params": spec.source_params, "flops": spec.flops,
               "metrics": json.dumps(spec.metrics), "seconds": spec.seconds,
               "spec": spec_json.decode()}
        self._append([(row, weights)])
        return spec.key, True

    def put_rows(self, items: Iterable[tuple[dict[str, Any], bytes]]) -> list[str]:
        """Store many fragments, each a (manifest row, weights) pair, in one part per class: a bulk
        import, where one part per fragment would be wasteful. The store fills in ``sha256``,
        ``spec_sha256``, ``blob``, ``created`` and ``writer``; stored keys are skipped. Returns the
        keys written."""
        items = list(items)
        for row, _ in items:
            missing = [n for n in SCHEMA.names if n not in row and n not in _FILLED + ADDED_COLUMNS]
            if missing:
                raise ConfigError(f"manifest row {row.get('key')!r} lacks fields {missing}")
            if class_of_key(row["key"]) not in (None, int(row["class_id"])):
                raise ConfigError(f"key {row['key']!r} names another class than {row['class_id']}")
        if self._index.rows is not None or self._index.keys is not None:
            stored = self.keys()
        else:                             # only the key column of the partitions these rows go to
            stored = set().union(*(self._class_keys(c) for c in {int(r["class_id"]) for r, _ in items}))
        fresh, seen = [], set()
        for row, weights in items:
            if row["key"] not in stored and row["key"] not in seen:
                seen.add(row["key"])
                fresh.append((row, weights))
        self._append(fresh)
        return [r["key"] for r, _ in fresh]

    def _append(self, items: list[tuple[dict[str, Any], bytes]]) -> None:
        """Blobs first, then one manifest part per class: a row is never visible before its blob."""
        blobs: dict[str, bytes] = {}
        rows = []
        now = time.time()
        for row, weights in items:
            sha = sha256_bytes(weights)
            blobs[sha] = weights
            rows.append({**row, "sha256": sha, "blob": f"blobs/{sha}.safetensors",
                         "spec_sha256": sha256_bytes(row["spec"].encode()), "created": now,
                         "writer": self.writer})
        self._each(lambda kv: self._write(self._path("blobs", f"{kv[0]}.safetensors"), kv[1]),
                   list(blobs.items()))
        by_class: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for row in rows:
            by_class[int(row["class_id"])].append(row)
        for c, group in sorted(by_class.items()):
            name = f"part-{time.time_ns()}-{_safe(self.writer)}-{uuid.uuid4().hex[:8]}.parquet"
            self._write_part(c, name, pa.Table.from_pylist(group, schema=SCHEMA))
        self._index.add(rows)

    def _write_part(self, class_id: int, name: str, table: pa.Table) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, row_group_size=ROW_GROUP)
        self._write(self._path("manifest", f"{PARTITION}={int(class_id)}", name),
                    sink.getvalue().to_pybytes())

    def _each(self, fn, items: list) -> None:
        """``fn`` over ``items``, in parallel threads when there are many (object-store latency)."""
        if len(items) > 1:
            with ThreadPoolExecutor(min(16, len(items))) as ex:
                list(ex.map(fn, items))
        else:
            for item in items:
                fn(item)

    def blobs(self, key: str) -> tuple[bytes, bytes]:
        """(spec JSON, weights) of a stored fragment, both checked against the manifest."""
        row = self.lookup(key)
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
        """Fold each partition's parts into one part sorted by key (one row per key), moving the
        rows of flat old-layout parts into their partitions; returns the number of parts removed.

        Safe beside writers and other compactions: only the parts listed here and read whole are
        deleted, and only after every compacted part is written. A part written meanwhile is not
        listed, so it stays; a listed part that vanished was folded by another compaction, whose
        part this one did not list and so leaves alone."""
        return self._fold(set(), None)

    def adopt_identities(self, specs: dict[str, Any]) -> int:
        """Migrate rows from before model identities (``model_identity`` null) that belong to a
        model of ``specs`` (id -> ModelSpec; :func:`belongs_to`'s rule for old rows) to the key
        that model's identity gives, so every reader that derives a key from a model finds them.
        Returns the rows migrated. Idempotent: the new rows are written before the old ones are
        retired, and a rerun after a crash in between only retires."""
        listing = self.listing(["model_id", "model_sha256", "model_identity"])
        legacy = [k for k, r in listing.items() if not r["model_identity"]
                  and belongs_to(r, specs.get(r["model_id"]))]
        if not legacy:
            return 0
        items = []
        for key in legacy:
            row = self.lookup(key)
            spec = specs[row["model_id"]]
            fspec = FragmentSpec.from_json(row["spec"]).replace(source_identity=spec.identity)
            weights = self._read(self._path(row["blob"]), f"weights of fragment {key}")
            items.append(({n: row[n] for n in SCHEMA.names if n not in _FILLED}
                          | {"key": fspec.key, "model_identity": spec.identity,
                             "spec": fspec.to_json()}, weights))
        self.put_rows(items)
        self.retire(legacy)
        log.info("gave %d fragments of %s from before model identities their model's identity",
                 len(legacy), self)
        return len(legacy)

    def retire(self, keys: Iterable[str]) -> tuple[int, int]:
        """Remove fragments for good: their rows leave the manifest (their partitions are folded
        without them, as :meth:`compact` folds) and their blobs are deleted unless another row
        still names the same bytes. Returns (rows removed, blobs deleted).

        Why not a tombstone: a retired fragment was cut for a model version that no longer
        exists (replaced or removed), so nothing may serve it again and its bytes are reclaimed."""
        rows = {k: r for k in set(keys) if (r := self.lookup(k)) is not None}
        if not rows:
            return 0, 0
        self._fold(set(rows), {int(r["class_id"]) for r in rows.values()})
        live = set(self._load(columns=["blob"])["blob"].drop_null().to_pylist())
        dead = sorted({r["blob"] for r in rows.values() if r["blob"]} - live)
        self._each(lambda b: self._delete(self._path(b)), dead)
        log.info("retired %d fragments of %s (%d blobs deleted)", len(rows), self, len(dead))
        return len(rows), len(dead)

    def _fold(self, drop: set[str], only: set[int] | None) -> int:
        """Rewrite partitions as one part each, without the rows of ``drop``: every partition
        with several parts (``only`` None, a compaction) or the partitions ``only`` names, plus
        the flat parts of old stores."""
        t0 = time.perf_counter()
        groups: dict[int | None, list[str]] = defaultdict(list)
        for p in self._parts():
            groups[self._where(p)].append(p)
        flat = groups.pop(None, [])
        tables, read, _ = self._read_parts(flat)
        classes = ({c for c, ps in groups.items() if len(ps) > 1} if only is None
                   else set(only))
        for t in tables:
            if t[PARTITION].null_count:
                raise IntegrityError(f"a flat manifest part of {self} has rows without a class_id")
            classes.update(pc.unique(t[PARTITION]).to_pylist())
        if not classes:
            return 0
        more, more_read, _ = self._read_parts(sorted(p for c in classes for p in groups.get(c, [])))
        tables, read = tables + more, read + more_read
        table = _unique(pa.concat_tables(tables)) if tables else SCHEMA.empty_table()
        if drop:
            table = table.filter(pc.invert(pc.is_in(table["key"], pa.array(sorted(drop)))))
        stamp = f"part-{time.time_ns()}-compact-{uuid.uuid4().hex[:8]}"
        by_class = {c: table.filter(pc.equal(table[PARTITION], c)) for c in sorted(classes)}
        written = [(c, t) for c, t in by_class.items() if t.num_rows]   # none if all vanished
        self._each(lambda ct: self._write_part(ct[0], f"{stamp}.parquet", ct[1]), written)
        self._each(self._delete, read)   # every row of these is in a part written above
        self.refresh()
        log.info("compacted %d manifest parts of %s into %d (%d rows) in %.2f s", len(read), self,
                 len(written), table.num_rows, time.perf_counter() - t0)
        return len(read)

    def _delete(self, path: str) -> None:
        try:
            self.fs.delete_file(path)
        except FileNotFoundError:
            pass                      # another compaction removed it after folding it
        except OSError as e:
            if not _not_found(e):
                log.warning("could not remove compacted part %s: %s", path, e)


class _Index:
    """One generation of what a :class:`FragmentStore` has read of its manifest: the whole
    manifest, its keys, class partitions and single rows, each filled once when first read.

    Swapped whole by ``refresh`` and never emptied in place; a reader takes the store's
    reference once and reads only from it. Writes of this process (:meth:`add`) replace a
    container instead of growing it, so a reader iterating one is never disturbed."""

    def __init__(self):
        self.rows: dict[str, dict[str, Any]] | None = None        # the whole manifest, once read
        self.keys: set[str] | None = None                         # its keys alone (cheaper)
        self.classes: dict[int, dict[str, dict[str, Any]]] = {}   # partitions read one by one
        self.found: dict[str, dict[str, Any]] = {}                # rows looked up one by one

    def add(self, rows: list[dict[str, Any]]) -> None:
        """Rows this process just wrote (a stored key keeps its earlier row), copy on write."""
        if not rows:
            return
        if self.rows is not None:
            merged = dict(self.rows)
            for row in rows:
                merged.setdefault(row["key"], row)
            self.rows = merged
        if self.keys is not None:
            self.keys = self.keys | {row["key"] for row in rows}
        for c in {int(row["class_id"]) for row in rows}:
            if c in self.classes:
                merged = dict(self.classes[c])
                for row in rows:
                    if int(row["class_id"]) == c:
                        merged.setdefault(row["key"], row)
                self.classes[c] = merged


#: the manifest fields the store fills in itself when it writes rows
_FILLED = ("sha256", "spec_sha256", "blob", "created", "writer")


def _not_found(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, FileNotFoundError) or any(
        s in text for s in ("not found", "no such", "does not exist", "nosuchkey"))


def _groups_holding(pf: pq.ParquetFile, key: str) -> list[int] | None:
    """Row groups whose key statistics admit ``key`` (None: no statistics, read the whole part)."""
    idx = pf.schema_arrow.get_field_index("key")
    out = []
    for g in range(pf.metadata.num_row_groups):
        st = pf.metadata.row_group(g).column(idx).statistics
        if st is None or not st.has_min_max:
            return None
        if st.min <= key <= st.max:
            out.append(g)
    return out


def _unique(table: pa.Table) -> pa.Table:
    """One row per key, the earliest write (``created``, then ``writer``) winning; sorted by key."""
    if table.num_rows < 2:
        return table
    t = table.sort_by([("key", "ascending"), ("created", "ascending"), ("writer", "ascending")])
    keys = t["key"].combine_chunks()
    first = pc.fill_null(pc.not_equal(keys[1:], keys[:-1]), True)
    return t.filter(pa.concat_arrays([pa.array([True]), first]))


def _as_rows(table: pa.Table) -> dict[str, dict[str, Any]]:
    """key -> row, one per key, in write order."""
    t = _unique(table).sort_by([("created", "ascending"), ("writer", "ascending")])
    names = t.column_names                # column by column: ~2x faster than Table.to_pylist
    return {r["key"]: r for r in (dict(zip(names, values))
                                  for values in zip(*(t[n].to_pylist() for n in names)))}


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text)[:40]
