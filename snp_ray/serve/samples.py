"""A requester's own labeled samples in a pack request's JSON (issue #25) -> :class:`PackSamples`.

A Parquet file (``snp pack --samples``, or the request's ``samples`` part) is read by
:meth:`PackSamples.from_parquet` under the same limits (:mod:`snp_ray.packing.samples`); here are
the JSON lists, whose images decode through :mod:`snp_ray.serve.images` (the pixel guard), and
where a pack's samples came from. A sample of a class the request does not name is refused, never
dropped: it usually means labels in another numbering, and dropping it would quietly pack on less
than the requester sent.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from snp_ray.data.classes import class_id
from snp_ray.errors import ConfigError, DataError, UnknownNameError
from snp_ray.packing.samples import PackSamples


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


def label_ids(labels: list[Any], classes: dict[int, str]) -> list[int]:
    """Labels (class names or ids) -> ids, under the one resolver's rules
    (:mod:`snp_ray.data.classes`); each must name one of the request's classes."""
    out = []
    for i, label in enumerate(labels):
        try:
            out.append(class_id(label, classes))
        except UnknownNameError:
            raise DataError(f"samples: label {i} ({label!r}) is not a class of the request; "
                            f"requested: {[f'{n} ({c})' for c, n in classes.items()]}") from None
        except ConfigError as e:            # not a name or an id at all
            raise DataError(f"samples: label {i}: {e}") from None
    return out


def origin(train: PackSamples, requester: PackSamples | None) -> dict[str, Any]:
    """Where a pack's training samples came from: counts per origin, and the requester's
    samples' digest (None without them)."""
    counts = train.counts or {"market": len(train)}
    return {"requester": int(counts.get("requester", 0)), "market": int(counts.get("market", 0)),
            "sha256": requester.sha256 if requester is not None else None}
