"""The fragment store's manifest at scale (issue #14 section 5): fill a store with N synthetic
manifest rows (tiny blobs), then time ``keys()``, the lookup of all fragments of one class, the
lookup of one key and a compaction, each on a fresh store object (no cache).

The fill writes N - ``--fresh`` rows in bulk parts (``--part-rows`` rows each, split by class),
as many jobs would leave them before compaction, then the last ``--fresh`` rows through the normal
per-fragment path (one blob and one manifest part each, after a fresh store's check that the key
is new, as a slicing actor does); their mean seconds are ``put_s_per_fragment``. ``--layout flat`` instead
writes the layout of stores before the partitioning (one flat part per row), to compare with; the
timing phase uses only ``keys``/``find``/``rows``/``compact``, so ``--reuse`` can time a filled
store with an older snp_ray on PYTHONPATH.

Every timed result is checked (the key count, the class's fragments, the key's row), so a fast
wrong answer fails instead of looking good.

Usage: python benchmarks/store_scale.py --rows N --json [--uri URI] [--classes 100]
           [--part-rows 10000] [--fresh 200] [--layout partitioned|flat] [--fill-only] [--reuse]
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time

log = logging.getLogger("store_scale")


def fill(uri: str, rows: int, classes: int, part_rows: int, fresh: int, layout: str) -> dict:
    from snp_ray.store import FragmentStore
    from snp_ray.store.synthetic import synthetic_rows

    out: dict = {}
    t0 = time.perf_counter()
    if layout == "flat":
        _fill_flat(uri, rows, classes)
    else:
        store = FragmentStore(uri, writer="bulk")
        for start in range(0, rows, part_rows):
            store.put_rows(synthetic_rows(min(part_rows, rows - start), classes, start=start))
    out["fill_s"] = round(time.perf_counter() - t0, 3)
    if fresh:
        store = FragmentStore(uri, writer="fresh")
        t0 = time.perf_counter()
        for item in synthetic_rows(fresh, classes, start=rows):
            store.refresh()
            assert store.put_rows([item]) == [item[0]["key"]]
        out["put_s_per_fragment"] = round((time.perf_counter() - t0) / fresh, 4)
    return out


def _fill_flat(uri: str, rows: int, classes: int) -> None:
    """One part per row, flat under manifest/: the layout before the partitioning."""
    import uuid

    import pyarrow as pa
    import pyarrow.parquet as pq

    from snp_ray.artifacts import sha256_bytes
    from snp_ray.store import SCHEMA, open_filesystem
    from snp_ray.store.synthetic import synthetic_rows

    fs, base = open_filesystem(uri)
    fs.create_dir(f"{base}/manifest", recursive=True)
    fs.create_dir(f"{base}/blobs", recursive=True)
    written = set()
    for i, (row, weights) in enumerate(synthetic_rows(rows, classes)):
        sha = sha256_bytes(weights)
        if sha not in written:
            with fs.open_output_stream(f"{base}/blobs/{sha}.safetensors") as f:
                f.write(weights)
            written.add(sha)
        row = {**row, "sha256": sha, "blob": f"blobs/{sha}.safetensors",
               "spec_sha256": sha256_bytes(row["spec"].encode()), "created": time.time(),
               "writer": "flat"}
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist([row], schema=SCHEMA), sink)
        with fs.open_output_stream(f"{base}/manifest/part-{time.time_ns()}-flat-{uuid.uuid4().hex[:8]}"
                                   f".parquet") as f:
            f.write(sink.getvalue().to_pybytes())


def _count_parts(uri: str) -> int:
    import pyarrow.fs as pafs

    from snp_ray.store import open_filesystem

    fs, base = open_filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(f"{base}/manifest", recursive=True, allow_not_found=True))
    return sum(i.type == pafs.FileType.File and i.base_name.endswith(".parquet")
               and not i.base_name.startswith((".", "_")) for i in infos)


def _timed(fn):
    t0 = time.perf_counter()
    value = fn()
    return value, round(time.perf_counter() - t0, 4)


def measure(uri: str, total: int, classes: int) -> dict:
    """Time the lookups on fresh store objects, compact, and time them again; check every answer."""
    import hashlib

    from snp_ray.slicing.fragment import fragment_key
    from snp_ray.store import FragmentStore

    cls = 7 % classes
    per_class = sum(1 for i in range(total) if i % classes == cls)
    i = total // 2                            # row i is class i % classes of model i // classes
    key = fragment_key(hashlib.sha256(f"synthetic-model-{i // classes}".encode()).hexdigest(),
                       i % classes, "synthetic", 5, 0)

    def lookup(store, k):
        return store.lookup(k) if hasattr(store, "lookup") else store.rows().get(k)

    out: dict = {}
    for phase in ("", "_after_compact"):
        out[f"parts{phase}"] = _count_parts(uri)
        keys, out[f"keys_s{phase}"] = _timed(lambda: FragmentStore(uri).keys())
        found, out[f"class_lookup_s{phase}"] = _timed(lambda: FragmentStore(uri).find(class_id=cls))
        row, out[f"key_lookup_s{phase}"] = _timed(lambda: lookup(FragmentStore(uri), key))
        if len(keys) != total or len(found) != per_class or {r["class_id"] for r in found} != {cls} \
                or row is None or row["key"] != key:
            raise SystemExit(f"wrong answers{phase}: {len(keys)} keys (want {total}), "
                             f"{len(found)} rows of class {cls} (want {per_class}), row {row and row['key']}")
        if not phase:
            removed, out["compact_s"] = _timed(lambda: FragmentStore(uri).compact())
            out["parts_removed"] = removed
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, required=True)
    ap.add_argument("--uri", default="", help="store URI (default: a fresh temp folder)")
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--part-rows", type=int, default=10_000)
    ap.add_argument("--fresh", type=int, default=200, help="rows written one part each, as jobs do")
    ap.add_argument("--layout", choices=("partitioned", "flat"), default="partitioned")
    ap.add_argument("--fill-only", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="time an already filled store")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    tmp = None
    uri = args.uri
    if not uri:
        tmp = tempfile.TemporaryDirectory(prefix="store_scale-")
        uri = tmp.name
    fresh = 0 if args.layout == "flat" else min(args.fresh, args.rows)
    out = {"rows": args.rows, "classes": args.classes,
           "layout": args.layout, "uri": "s3" if uri.startswith("s3://") else "local",
           "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs"}
    if not args.reuse:
        out.update(fill(uri, args.rows - fresh, args.classes, args.part_rows, fresh, args.layout))
    if not args.fill_only:
        out.update(measure(uri, out["rows"], args.classes))
    if tmp is not None:
        tmp.cleanup()
    print(json.dumps(out) if args.json else "\n".join(f"{k}: {v}" for k, v in out.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
