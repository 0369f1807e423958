"""Read a dataset split from Parquet into arrays, checking its schema and contents.

Images are decoded once and cached as ``.npy`` (no pickle) next to a key of the source file's
size and mtime, because PNG decoding of 50 000 images costs far more than a training epoch.

The test split is fenced off: :func:`read_split` refuses it unless the caller holds
``EVAL_ACCESS``, which only :mod:`snp_ray.data.testsplit` passes. Slicing, packing and tuning code
receive few-shot sets, never a reader, so they cannot reach test rows by accident.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from snp_ray.artifacts import atomic_write_bytes
from snp_ray.config import code_digest
from snp_ray.data.catalog import get_dataset, split_file
from snp_ray.errors import DataError, SchemaError, TestSplitAccessError

log = logging.getLogger(__name__)

#: the key that opens the test split; held by snp_ray.data.testsplit only
EVAL_ACCESS = object()
PROTECTED_SPLITS = frozenset({"test"})
#: set to "1" in a process that must never read a protected split at all (every tuning trial)
ENV_FENCE = "SNP_FORBID_TEST_SPLIT"
IMAGE_SHAPE = (32, 32, 3)


@dataclass
class Split:
    """One split in memory. ``images`` (N,32,32,3 uint8) for image data, ``texts`` for text."""

    dataset: str
    split: str
    labels: np.ndarray
    class_names: list[str]
    images: np.ndarray | None = None
    texts: list[str] | None = None
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def rows(self, idx: np.ndarray) -> "Split":
        idx = np.asarray(idx, dtype=np.int64)
        return Split(self.dataset, self.split, self.labels[idx], self.class_names,
                     None if self.images is None else self.images[idx],
                     None if self.texts is None else [self.texts[i] for i in idx],
                     {k: v[idx] for k, v in self.extra.items()})


_TYPE_CHECKS = {
    "binary": lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t),
    "int": pa.types.is_integer,
    "string": lambda t: pa.types.is_string(t) or pa.types.is_large_string(t),
    "bool": pa.types.is_boolean,
}


@contextlib.contextmanager
def test_split_fenced():
    """Within the block, any read of a protected (test) split fails, even through the
    evaluation API and in processes started inside it (an environment variable): every choice a
    job makes (plans, configs, presets) is made inside one."""
    before = os.environ.get(ENV_FENCE)
    os.environ[ENV_FENCE] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV_FENCE, None)
        else:
            os.environ[ENV_FENCE] = before


def check_schema(schema: pa.Schema, expected: dict[str, str], what: str) -> None:
    bad = [f"{c} ({t})" for c, t in expected.items()
           if c not in schema.names or not _TYPE_CHECKS[t](schema.field(c).type)]
    if bad:
        want = ", ".join(f"{c}: {t}" for c, t in expected.items())
        raise SchemaError(f"{what} has the wrong schema: expected columns {{{want}}}; "
                          f"missing or mistyped: {', '.join(bad)}; found {schema.names}")


def class_names_of(schema: pa.Schema, path: Path) -> list[str]:
    meta = schema.metadata or {}
    raw = meta.get(b"classes")
    if raw is None:
        sidecar = path.parent / "classes.json"
        if not sidecar.is_file():
            raise SchemaError(f"{path} carries no 'classes' metadata and {sidecar} is missing")
        raw = sidecar.read_bytes()
    try:
        names = json.loads(raw)
        names = names["classes"] if isinstance(names, dict) else names
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise SchemaError(f"{path}: cannot parse its class names ({e})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise SchemaError(f"{path}: class names must be a list of strings")
    return names


def read_split(name: str, split: str, *, access: object = None, path: Path | None = None) -> Split:
    """Load ``name``/``split``; the test split needs ``access=EVAL_ACCESS``."""
    if split in PROTECTED_SPLITS and os.environ.get(ENV_FENCE) == "1":
        raise TestSplitAccessError(
            f"the {split} split of {name} is fenced off in this process ({ENV_FENCE}=1, set by "
            f"tuning trials), even through snp_ray.data.testsplit")
    if split in PROTECTED_SPLITS and access is not EVAL_ACCESS:
        raise TestSplitAccessError(
            f"the {split} split of {name} is for evaluation only; use snp_ray.data.testsplit")
    info = get_dataset(name)
    path = path or split_file(name, split)
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path} is not a readable Parquet file: {e}") from None
    check_schema(schema, info.columns, str(path))
    classes = class_names_of(schema, path)
    cols = list(info.columns) + [c for c in ("coarse_label", "fine_label") if c in schema.names
                                  and c not in info.columns]
    text_cols = [c for c in cols if info.columns.get(c) != "binary"]
    table = pq.read_table(path, columns=text_cols)
    labels = table.column("label").to_numpy().astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DataError(f"{path}: labels out of range [0, {len(classes)}): "
                        f"found {int(labels.min())}..{int(labels.max())}")
    extra = {c: table.column(c).to_numpy().astype(np.int64) for c in cols
             if c not in ("label", "text", "image")}
    out = Split(name, split, labels, classes, extra=extra)
    if info.modality == "image":
        out.images = _decoded_images(path)
        if out.images.shape[0] != labels.shape[0]:
            raise DataError(f"{path}: {out.images.shape[0]} images but {labels.shape[0]} labels")
    else:
        out.texts = [t if t is not None else "" for t in table.column("text").to_pylist()]
    return out


def cache_dir() -> Path:
    base = os.environ.get("SNP_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "snp_ray")
    return Path(base)


def _decoded_images(path: Path) -> np.ndarray:
    """The images of a dataset file, decoded once per file version and decoder: the cache key
    holds the file's path, size and mtime, this module's source (which decodes) and Pillow's
    version, so a changed decoder never reads arrays an older one made."""
    import PIL

    st = path.stat()
    decoder = f"{code_digest(only=('data/tables.py',))}|{PIL.__version__}"
    body = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{decoder}"
    key = hashlib.sha256(body.encode()).hexdigest()[:24]
    cached = cache_dir() / "decoded" / f"{key}.npy"
    if cached.is_file():
        try:
            arr = np.load(cached, allow_pickle=False, mmap_mode="r")
            return np.ascontiguousarray(arr)
        except (ValueError, OSError):
            log.warning("ignoring unreadable image cache %s", cached)
    column = pq.read_table(path, columns=["image"]).column("image").to_pylist()
    arr = decode_images(column, str(path))
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    try:
        atomic_write_bytes(cached, buf.getvalue())
    except OSError as e:  # a read-only cache only costs speed
        log.warning("cannot cache decoded images at %s: %s", cached, e)
    return arr


#: formats a dataset or an upload may hold (others, e.g. EPS, run external decoders)
IMAGE_FORMATS = frozenset({"PNG", "JPEG", "WEBP"})


@contextlib.contextmanager
def open_image(blob: bytes | None, what: str, max_pixels: int):
    """One guard for every image the market decodes (datasets, uploads, requests): a PIL image
    whose format is PNG, JPEG or WEBP and whose size, read from the header, is at most
    ``max_pixels``; decoding happens only after both checks, in the caller's block."""
    from PIL import Image, UnidentifiedImageError

    if not blob:
        raise DataError(f"{what} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(blob)) as im:
                if im.format not in IMAGE_FORMATS:
                    raise DataError(f"{what} is a {im.format} image; PNG, JPEG or WEBP only")
                if im.width * im.height > max_pixels:
                    raise DataError(f"{what} is {im.width}x{im.height}: more than {max_pixels:,} "
                                    "pixels (checked before decoding)")
                yield im
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{what} is too large to decode ({e})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{what} does not decode as an image ({type(e).__name__}: {e})") from None


def decode_image(blob: bytes | None, what: str, *, size: tuple[int, int] = IMAGE_SHAPE[:2],
                 max_pixels: int | None = None, resize: bool = False) -> np.ndarray:
    """The one image decoder: PNG/JPEG/WEBP bytes -> (H, W, 3) uint8 at ``size`` (H, W), through
    :func:`open_image`'s guard. ``max_pixels`` caps the image read from the header (default 64
    times ``size``: a wrong size is named, a bomb never opens). Without ``resize`` another size is
    refused from the header, before decoding (a dataset row); with it, the image is resized
    bilinearly (an uploaded image: a pack's raw input is its dataset's image size)."""
    from PIL import Image

    h, w = size
    cap = max_pixels if max_pixels is not None else 64 * h * w
    with open_image(blob, what, cap) as im:
        if (im.height, im.width) != (h, w) and not resize:
            raise DataError(f"{what} has shape ({im.height}, {im.width}, 3), expected "
                            f"{(h, w, 3)} (checked before decoding)")
        rgb = im.convert("RGB") if im.mode != "RGB" else im
        if (rgb.height, rgb.width) != (h, w):
            rgb = rgb.resize((w, h), Image.Resampling.BILINEAR)
        arr = np.array(rgb, dtype=np.uint8)
    if arr.shape != (h, w, 3):
        raise DataError(f"{what} has shape {arr.shape}, expected {(h, w, 3)}")
    return arr


def decode_images(blobs: list[bytes | None], what: str, rows: list[int] | None = None
                  ) -> np.ndarray:
    """A dataset's images, (N, 32, 32, 3) uint8 by :func:`decode_image`; a missing image, a wrong
    size, format or mode is a DataError naming the row (``rows[i]``, default i)."""
    out = np.empty((len(blobs),) + IMAGE_SHAPE, dtype=np.uint8)
    for j, blob in enumerate(blobs):
        i = rows[j] if rows is not None else j
        if blob is None:
            raise DataError(f"{what}: row {i} has no image")
        out[j] = decode_image(blob, f"{what}: row {i}")
    return out


def uncompressed_bytes(file: pq.ParquetFile, columns) -> int:
    """The uncompressed size of ``columns`` as the footer states it: what reading them costs."""
    meta, names = file.metadata, set(columns)
    return sum(meta.row_group(g).column(c).total_uncompressed_size
               for g in range(meta.num_row_groups) for c in range(meta.num_columns)
               if meta.row_group(g).column(c).path_in_schema.split(".")[0] in names)


def split_from_bytes(data: bytes, dataset: str, split: str, class_names: list[str],
                     what: str, max_rows: int | None = None,
                     max_bytes: int | None = None) -> Split:
    """A split from Parquet bytes in ``dataset``'s schema (e.g. a developer's own few-shot
    samples); labels are ``dataset``'s class ids, checked against ``class_names``. Only the
    schema's columns are read, and ``max_rows`` and ``max_bytes`` (their uncompressed size) are
    checked from the footer before any of them is decompressed."""
    info = get_dataset(dataset)
    payload = "image" if info.modality == "image" else "text"
    try:
        # the payload column is read as a dictionary: a value repeated over many rows (a
        # dictionary-encoded file states its size once in the footer) is held and decoded once
        file = pq.ParquetFile(pa.BufferReader(data))
        if max_rows is not None and file.metadata.num_rows > max_rows:
            raise DataError(f"{what} holds {file.metadata.num_rows} rows, more than the "
                            f"{max_rows} allowed")
        check_schema(file.schema_arrow, info.columns, what)
        if max_bytes is not None:
            size = uncompressed_bytes(file, info.columns)
            if size > max_bytes:
                raise DataError(f"{what} decompresses to {size:,} bytes, more than the "
                                f"{max_bytes:,} allowed (checked before decompressing)")
        table = pq.ParquetFile(pa.BufferReader(data), read_dictionary=[payload]).read(
            columns=list(info.columns))
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{what} is not a readable Parquet file: {e}") from None
    if table.column("label").null_count:
        raise DataError(f"{what}: the label column has missing values")
    try:
        labels = np.asarray(table.column("label").to_numpy(zero_copy_only=False), dtype=np.int64)
    except (pa.ArrowInvalid, ValueError, TypeError) as e:
        raise DataError(f"{what}: unusable label column ({e})") from None
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise DataError(f"{what}: labels out of range [0, {len(class_names)}) of {dataset}: "
                        f"found {int(labels.min())}..{int(labels.max())}")
    out = Split(dataset, split, labels, list(class_names))
    values, index = distinct_rows(table.column(payload))
    if info.modality == "image":
        missing = np.flatnonzero(index < 0)
        if missing.size:
            raise DataError(f"{what}: row {int(missing[0])} has no image")
        used, first, inverse = np.unique(index, return_index=True, return_inverse=True)
        out.images = decode_images([values[u] for u in used], what, first.tolist())[inverse]
    else:
        out.texts = [values[i] if i >= 0 and values[i] is not None else "" for i in index]
    return out


def distinct_rows(column: pa.ChunkedArray) -> tuple[list[Any], np.ndarray]:
    """(the column's distinct values, each row's index into them, -1 for a null row), without
    making one Python object per row."""
    values: list[Any] = []
    parts = []
    for chunk in column.chunks:
        if not pa.types.is_dictionary(chunk.type):
            chunk = chunk.dictionary_encode()
        idx = np.asarray(pc.fill_null(chunk.indices, -1).to_numpy(zero_copy_only=False), np.int64)
        parts.append(np.where(idx >= 0, idx + len(values), -1))
        values.extend(chunk.dictionary.to_pylist())
    return values, (np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64))


def dataset_class_names(dataset: str) -> list[str]:
    """The class vocabulary of ``dataset`` (read from its train split's schema only)."""
    path = split_file(dataset, "train")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path} is not a readable Parquet file: {e}") from None
    return class_names_of(schema, path)
