"""A requester's own labeled samples for a pack (issue #25): a Parquet file or JSON lists ->
:class:`PackSamples`, under the service's limits.

One set of limits for ``snp pack --samples`` and ``POST /v1/packs``: a file or body over
``ServeConfig.max_body_bytes`` and more than ``ServeConfig.max_images`` rows are refused before
anything is decoded. Images in JSON decode through :mod:`snp_ray.serve.images` (the pixel guard);
a Parquet file is read by :meth:`PackSamples.from_parquet` in the dataset's schema. A sample of a
class the request does not name is refused, never dropped: it usually means labels in another
numbering, and dropping it would quietly pack on less than the requester sent.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from snp_ray.errors import ArtifactNotFoundError, ConfigError, DataError, PayloadTooLarge, StoreError
from snp_ray.packing.samples import PackSamples
from snp_ray.serve.config import ServeConfig

#: the service's default limits, which ``snp pack --samples`` uses too
MAX_BYTES, MAX_ROWS = ServeConfig.max_body_bytes, ServeConfig.max_images


def read_capped(path: str | os.PathLike, max_bytes: int, what: str) -> bytes:
    """A file's bytes, refused (:class:`PayloadTooLarge`) past ``max_bytes`` without reading
    further: the same cap as the service's request bodies."""
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise ArtifactNotFoundError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise StoreError(f"cannot read {what} {path}: {e.strerror or e}") from e
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"{what} {path} is over the limit of {max_bytes:,} bytes")
    return data


def from_parquet(data: bytes, dataset: str, classes: list[int], what: str, max_rows: int
                 ) -> PackSamples:
    """A Parquet file in ``dataset``'s schema, every label one of ``classes``."""
    from PIL import Image

    try:
        samples = PackSamples.from_parquet(data, dataset, what=what, max_rows=max_rows)
    except Image.DecompressionBombError as e:    # Pillow refuses it at open, with its own type
        raise DataError(f"{what}: an image is too large to decode ({e})") from None
    return samples.only(classes)


def from_json(obj: Any, dataset: str, modality: str, classes: dict[int, str], max_rows: int
              ) -> PackSamples:
    """``{"images": [base64 PNG/JPEG, ...], "labels": [...]}`` (``"texts"`` for text markets);
    each label a name or id of one of the request's ``classes`` ({id: name})."""
    from snp_ray.serve.images import decode_base64, decode_batch

    key = "images" if modality == "image" else "texts"
    if not isinstance(obj, dict) or set(obj) != {key, "labels"}:
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ConfigError(f"'samples' must be an object with '{key}' and 'labels' (this market's "
                          f"packs take {modality}s), got {got}")
    items, labels = obj[key], obj["labels"]
    if not isinstance(items, list) or not items:
        raise DataError(f"samples: '{key}' must be a non-empty list")
    if len(items) > max_rows:
        raise DataError(f"samples: {len(items)} {key}, more than the {max_rows} allowed")
    if not isinstance(labels, list) or len(labels) != len(items):
        raise DataError(f"samples: 'labels' must be a list with one label per {key[:-1]} "
                        f"({len(items)})")
    ids = label_ids(labels, classes)
    if key == "images":
        names = [f"samples image {i}" for i in range(len(items))]
        raw = decode_batch([decode_base64(x, n) for x, n in zip(items, names)], names)
    else:
        if not all(isinstance(t, str) for t in items):
            raise DataError("samples: 'texts' must be strings")
        raw = list(items)
    return PackSamples.from_arrays(dataset, raw, np.asarray(ids, dtype=np.int64),
                                   {c: classes[c] for c in sorted(set(ids))})


def check_covers(samples: PackSamples, classes: dict[int, str], flag: str) -> None:
    """Samples that are all a pack trains on must hold every requested class ({id: name});
    ``flag`` names the option that adds the market's shots."""
    have = set(np.unique(samples.labels).tolist())
    missing = [f"{name} ({c})" for c, name in classes.items() if c not in have]
    if missing:
        raise DataError(f"the samples hold none of {missing}: give every requested class some, "
                        f"or add the market's shots ({flag})")


def label_ids(labels: list[Any], classes: dict[int, str]) -> list[int]:
    """Labels (class names or ids) -> ids; each must name one of the request's classes."""
    by_name = {name: c for c, name in classes.items()}
    out = []
    for i, label in enumerate(labels):
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise DataError(f"samples: label {i} must be a class name or id, got {label!r}")
        s = str(label).strip()
        cid = int(s) if s.isascii() and s.isdigit() else by_name.get(s)
        if cid not in classes:
            raise DataError(f"samples: label {i} ({label!r}) is not a class of the request; "
                            f"requested: {[f'{n} ({c})' for c, n in classes.items()]}")
        out.append(cid)
    return out


def source_of(samples: PackSamples) -> str:
    """Where the samples come from, e.g. ``requester:<sha256 of the file>`` (their keys'
    ``source`` part, :func:`snp_ray.data.fewshot.sample_keys`)."""
    return str(samples.keys[0]).rsplit("#", 1)[0]


def origin(train: PackSamples, requester: PackSamples | None) -> dict[str, Any]:
    """Where a pack's training samples came from: counts per origin, and the requester's
    samples' digest (None without them)."""
    counts = train.counts or {"market": len(train)}
    return {"requester": int(counts.get("requester", 0)), "market": int(counts.get("market", 0)),
            "sha256": requester.sha256 if requester is not None else None}
